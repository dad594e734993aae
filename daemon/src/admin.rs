//! The admin API for approvals and grants: a unix socket on the node (root only, by
//! peer credentials) and, optionally, HTTPS for remote approvers who present an OIDC
//! token from a configured issuer and belong to an approver group.
//!
//! ```text
//! GET  /v1/approvals            GET  /v1/approvals/{id}
//! POST /v1/approvals/{id}/approve {"justification": "...", "as": "name"}
//! POST /v1/approvals/{id}/deny    {"reason": "...", "as": "name"}
//! GET  /v1/grants               POST /v1/grants/{id}/revoke {"as": "name"}
//! GET  /v1/policy
//! ```
//!
//! By job: `routes` (the calls and who may make them), `serve` (the socket and HTTPS
//! listeners), `client` (the calls from the CLI, as a library).
mod client;
mod routes;
mod serve;

use std::sync::Arc;

pub use client::{AdminClient, AdminError, Endpoint};
pub use serve::{serve_https, serve_unix};

use crate::{approvals::Approvals, identity::Authenticator, policy::PolicyHandle};

pub struct Admin {
    pub approvals: Arc<Approvals>,
    pub policy: Arc<PolicyHandle>,
    pub authenticator: Arc<Authenticator>,
    pub approver_groups: Vec<String>,
}

/// Who is calling, before any request is read.
#[derive(Clone)]
enum Caller {
    /// A local process; `uid` from SO_PEERCRED.
    Local {
        uid: u32,
    },
    Remote {
        peer: std::net::SocketAddr,
    },
}
