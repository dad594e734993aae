//! Approvals and grants as stored, listed and announced.
use serde::{Deserialize, Serialize};

use crate::{
    identity::Identity,
    k8s::{Attributes, PodRef, RequestScope},
    policy::SubjectSpec,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubjectRecord {
    pub username: String,
    pub groups: Vec<String>,
    pub issuer: String,
    /// The token's `sub`: with `issuer`, who the subject is (a user name is only how
    /// the policy maps them).
    #[serde(default)]
    pub subject: String,
    pub token_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

impl From<&Identity> for SubjectRecord {
    fn from(id: &Identity) -> Self {
        SubjectRecord {
            username: id.user.username.clone(),
            groups: id.user.groups.clone(),
            issuer: id.issuer.clone(),
            subject: id.subject.clone(),
            token_id: id.token_id.clone(),
            pod: id.kernel_pod.clone().or_else(|| id.token_pod.clone()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum State {
    Pending,
    Approved {
        by: String,
        at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        justification: Option<String>,
    },
    Denied {
        by: String,
        at: u64,
        reason: String,
    },
    Expired {
        at: u64,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved { .. } => "approved",
            State::Denied { .. } => "denied",
            State::Expired { .. } => "expired",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Approval {
    pub id: String,
    pub created_at: u64,
    /// A pending approval expires (nobody decided) at this time.
    pub expires_at: u64,
    pub subject: SubjectRecord,
    pub request: Attributes,
    /// Exactly which request: the grant covers this and nothing else.
    #[serde(default)]
    pub scope: RequestScope,
    pub rule: String,
    pub message: String,
    pub approvers: Vec<SubjectSpec>,
    pub grant_ttl_secs: u64,
    #[serde(flatten)]
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub approval_id: String,
    pub username: String,
    /// The subject's issuer and `sub`: a grant is for that identity.
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub subject: String,
    pub request: Attributes,
    /// Exactly which request it lets through (method, path, query, body digest, pod).
    #[serde(default)]
    pub scope: RequestScope,
    pub approved_by: String,
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
    /// Set once the expiry has been written to the audit log.
    #[serde(default)]
    pub expiry_recorded: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    pub by: String,
    pub at: u64,
}

impl Grant {
    pub fn active(&self, t: u64) -> bool {
        self.revoked.is_none() && t < self.expires_at
    }
    pub fn status(&self, t: u64) -> &'static str {
        match (&self.revoked, t < self.expires_at) {
            (Some(_), _) => "revoked",
            (None, true) => "active",
            (None, false) => "expired",
        }
    }
}
