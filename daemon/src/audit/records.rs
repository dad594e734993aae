//! The gate's records as written in the chain: `request` (who, from where, what, the
//! decision) and `response` (its outcome), and the decisions.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::k8s::RequestInfo;

/// What the gate decided about a request, as recorded (`decision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Pass-through mode: forwarded as the one configured identity.
    PassThrough,
    /// Allowed by policy and forwarded.
    Allow,
    /// Forwarded on an approval's grant.
    Approved,
    /// Denied by policy (or no rule matched).
    Deny,
    /// Needs approval; still pending when the hold time ran out.
    Held,
    /// Its approval was denied while it was held.
    Denied,
    /// Its approval expired undecided while it was held.
    Expired,
    /// Needed approval, but its subject had too many waiting.
    TooManyPending,
    /// The agent's token was missing or invalid.
    Unauthenticated,
    /// The subject has no upstream identity in the policy.
    Unmapped,
    /// Refused before identity and policy (not redirected, malformed), or because the
    /// gate could not keep a record it needs (the approval store).
    Refused,
    /// A decision this build does not know, read from other evidence; kept verbatim.
    Other(String),
}

impl Decision {
    pub fn as_str(&self) -> &str {
        match self {
            Decision::PassThrough => "pass-through",
            Decision::Allow => "allow",
            Decision::Approved => "approved",
            Decision::Deny => "deny",
            Decision::Held => "held",
            Decision::Denied => "denied",
            Decision::Expired => "expired",
            Decision::TooManyPending => "too-many-pending",
            Decision::Unauthenticated => "unauthenticated",
            Decision::Unmapped => "unmapped",
            Decision::Refused => "refused",
            Decision::Other(s) => s,
        }
    }

    /// The request went on to the API server.
    pub fn forwarded(&self) -> bool {
        matches!(
            self,
            Decision::PassThrough | Decision::Allow | Decision::Approved
        )
    }
}

impl From<&str> for Decision {
    fn from(s: &str) -> Decision {
        [
            Decision::PassThrough,
            Decision::Allow,
            Decision::Approved,
            Decision::Deny,
            Decision::Held,
            Decision::Denied,
            Decision::Expired,
            Decision::TooManyPending,
            Decision::Unauthenticated,
            Decision::Unmapped,
            Decision::Refused,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
        .unwrap_or_else(|| Decision::Other(s.to_owned()))
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Decision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Decision {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Decision, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(Decision::from(s.as_ref()))
    }
}

/// Who made a request, as verified (never the token itself).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Subject {
    pub username: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub issuer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_id: String,
}

/// Where the connection came from, as the kernel saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Origin {
    pub peer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub original_dst: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comm: String,
    #[serde(default)]
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
}

/// The `request` record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: String,
    /// Nanoseconds since the epoch when the request arrived.
    pub received_ns: u64,
    pub conn: u64,
    #[serde(default)]
    pub user: Option<Arc<Subject>>,
    /// Shared by the records of one connection.
    pub origin: std::sync::Arc<Origin>,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query: String,
    pub attributes: RequestInfo,
    #[serde(default)]
    pub upgrade: bool,
    #[serde(default)]
    pub mutating: bool,
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub approval: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub grant: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content_type: String,
    /// The masked request body (level Request and above), or a note why it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body: Option<serde_json::Value>,
    /// The resourceVersion the write was made conditional on: the version of the
    /// object the policy decision read (`object`/`oldObject`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub precondition: String,
}

/// The `response` record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseRecord {
    pub id: String,
    pub code: u16,
    /// From arrival to the end of the response (or of the session).
    pub latency_ms: f64,
    pub bytes: u64,
    /// The whole body reached the agent (false: the agent went away, or the stream
    /// failed; see `error`).
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<serde_json::Value>,
    /// Upgraded sessions: bytes agent→server and server→agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_bytes: Option<(u64, u64)>,
}

/// A body for a record: JSON kept as JSON, text as a string, cut at `max` bytes.
pub fn body_value(bytes: &[u8], max: usize) -> serde_json::Value {
    if bytes.len() > max {
        return serde_json::json!({
            "truncated": true,
            "bytes": bytes.len(),
            "head": String::from_utf8_lossy(&bytes[..max]),
        });
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_written_and_read_as_before() {
        for s in [
            "pass-through",
            "allow",
            "approved",
            "deny",
            "held",
            "denied",
            "expired",
            "too-many-pending",
            "unauthenticated",
            "unmapped",
            "refused",
        ] {
            let d: Decision = serde_json::from_value(serde_json::json!(s)).unwrap();
            assert!(!matches!(d, Decision::Other(_)), "{s}");
            assert_eq!(serde_json::to_value(&d).unwrap(), s);
        }
        let odd: Decision = serde_json::from_value(serde_json::json!("")).unwrap();
        assert_eq!(odd, Decision::Other(String::new()));
        assert_eq!(serde_json::to_value(&odd).unwrap(), "");
        let forwarded: Vec<&str> = ["pass-through", "allow", "approved", "deny", "held"]
            .into_iter()
            .filter(|s| Decision::from(*s).forwarded())
            .collect();
        assert_eq!(forwarded, ["pass-through", "allow", "approved"]);
    }
}
