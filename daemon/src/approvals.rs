//! Just-in-time approvals. A request a rule marks `approve` is held (up to the rule's
//! hold time) while approvers are notified; approved in time, it proceeds. Either way
//! an approval creates a grant scoped to the subject and the request's attributes,
//! valid for the rule's TTL, so the agent's retry passes; grants expire by themselves
//! and can be revoked. Approvals and grants live in a durable store and survive a
//! restart; every state change is written to the approvals audit log.
//!
//! By job: `service` (holding, deciding, expiring), `model` (approvals and grants as
//! stored and listed), `store` (the durable store: a trait, redb embedded),
//! `journal` (every state change, to `approvals.jsonl` and the audit chain),
//! `notify` (telling approvers).
mod journal;
mod model;
mod notify;
mod service;
mod store;

pub use model::{Approval, Grant, Revocation, State};
pub use notify::Notifier;
pub use service::Approvals;
pub use store::{RedbStore, Store, StoreError};

use crate::k8s::UserInfo;

/// Who is deciding, as the admin API authenticated them.
#[derive(Debug, Clone)]
pub struct Approver {
    pub user: UserInfo,
    /// The issuer and `sub` of the approver's token (empty on the node socket, where
    /// root names the human it acts for).
    pub issuer: String,
    pub subject: String,
    /// Root on the node, through the admin socket: may decide any approval (still
    /// not one requested under the same name).
    pub node_admin: bool,
}

impl Approver {
    /// Whether this approver is the subject that asked: the same identity (issuer and
    /// `sub`), or (for root acting for a named human, who has no token here) the same
    /// name.
    pub fn is(&self, s: &model::SubjectRecord) -> bool {
        let same_identity = !self.issuer.is_empty()
            && !self.subject.is_empty()
            && self.issuer == s.issuer
            && self.subject == s.subject;
        same_identity || self.user.username == s.username
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("no approval or grant {0}")]
    NotFound(String),
    #[error("approval {id} is already {state}")]
    NotPending { id: String, state: &'static str },
    #[error("{who} requested {id} and cannot approve or deny it (no self-approval)")]
    SelfApproval { who: String, id: String },
    #[error("{who} is not an approver for rule {rule}")]
    NotApprover { who: String, rule: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a held request ends.
#[derive(Debug)]
pub enum Held {
    /// Proceed: an active grant (just created or from an earlier approval).
    Granted {
        grant_id: String,
    },
    Denied {
        approval_id: String,
        by: String,
        reason: String,
    },
    /// Nobody decided within the hold time; the approval stays pending.
    Pending {
        approval_id: String,
    },
    Expired {
        approval_id: String,
    },
    /// The subject already has MAX_PENDING_PER_SUBJECT approvals waiting; no new one
    /// is opened (nor announced) until some are decided or expire.
    TooMany {
        pending: usize,
    },
}

/// Open approvals one subject may have at once: an agent that varies names cannot
/// page approvers or grow the store without bound.
pub const MAX_PENDING_PER_SUBJECT: usize = 20;
