//! Approvals and grants as stored, listed and announced.
use serde::{Deserialize, Serialize};

use crate::{identity::Identity, pod::PodRef, policy::SubjectSpec, request_info::RequestInfo};

/// What a grant is scoped to: the request's Kubernetes attributes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub verb: String,
    #[serde(default)]
    pub api_group: String,
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub subresource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    /// Non-resource requests only.
    #[serde(default)]
    pub path: String,
}

impl From<&RequestInfo> for Attributes {
    fn from(r: &RequestInfo) -> Self {
        Attributes {
            verb: r.verb.clone(),
            api_group: r.api_group.clone(),
            resource: r.resource.clone(),
            subresource: r.subresource.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            path: if r.is_resource_request {
                String::new()
            } else {
                r.path.clone()
            },
        }
    }
}

impl std::fmt::Display for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.path.is_empty() {
            return write!(f, "{} {}", self.verb, self.path);
        }
        let mut res = self.resource.clone();
        if !self.api_group.is_empty() {
            res = format!("{res}.{}", self.api_group);
        }
        if !self.subresource.is_empty() {
            res = format!("{res}/{}", self.subresource);
        }
        write!(f, "{} {res}", self.verb)?;
        if !self.name.is_empty() {
            write!(f, " {}", self.name)?;
        }
        if !self.namespace.is_empty() {
            write!(f, " in {}", self.namespace)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubjectRecord {
    pub username: String,
    pub groups: Vec<String>,
    pub issuer: String,
    pub token_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

impl From<&Identity> for SubjectRecord {
    fn from(id: &Identity) -> Self {
        SubjectRecord {
            username: id.username.clone(),
            groups: id.groups.clone(),
            issuer: id.issuer.clone(),
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
    pub request: Attributes,
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
