//! TLS, both ways: the interception CA and the leaf certificates agents (and remote
//! approvers) are served with, the one server-side accept (SNI read, leaf minted,
//! handshake bounded in time), and the one outbound client configuration (a CA file
//! or the public web roots, optionally a client certificate) used for the API server
//! and every side call (OIDC, webhooks, the audit sink, replay, the remote admin CLI).
mod accept;
mod ca;
mod client;
mod https;
mod issue;
mod probe;

pub use accept::accept;
pub use ca::{CaError, CaPaths, LeafMinter, init};
pub use client::{ClientError, client_config};
pub use https::{HttpClient, HttpError, client as https_client, get, post_json};
pub use issue::{IssueError, interception_ca, node_intermediate, node_request, webhook_serving};
pub use probe::{answered_by_gate, only_ca};
