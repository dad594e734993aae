//! The gate's records as written in the chain: `request` (who, from where, what, the
//! decision) and `response` (its outcome), and the decisions.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::chain::{EncodeJson, json_bool, json_key, json_str, json_u64};
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

// The records every request makes, written directly: the same bytes as serde_json's
// derive above (field order, skipped fields; `the_gates_records_are_written_as_serde_json_writes_them`),
// each struct taken apart whole so that a field added to it cannot be left out here.

/// `,"key":"s"` unless `s` is empty (serde's `skip_serializing_if = "String::is_empty"`).
macro_rules! str_unless_empty {
    ($out:expr, $key:literal, $s:expr) => {
        if !$s.is_empty() {
            json_key!($out, $key);
            json_str($out, $s);
        }
    };
}

impl EncodeJson for RequestRecord {
    fn encode_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let RequestRecord {
            id,
            received_ns,
            conn,
            user,
            origin,
            method,
            path,
            query,
            attributes,
            upgrade,
            mutating,
            decision,
            rule,
            approval,
            grant,
            content_type,
            request_body,
            precondition,
        } = self;
        json_key!(first out, "id");
        json_str(out, id);
        json_key!(out, "received_ns");
        json_u64(out, *received_ns);
        json_key!(out, "conn");
        json_u64(out, *conn);
        json_key!(out, "user");
        match user {
            Some(u) => subject_json(out, u),
            None => out.extend_from_slice(b"null"),
        }
        json_key!(out, "origin");
        origin_json(out, origin);
        json_key!(out, "method");
        json_str(out, method);
        json_key!(out, "path");
        json_str(out, path);
        str_unless_empty!(out, "query", query);
        json_key!(out, "attributes");
        attributes_json(out, attributes);
        json_key!(out, "upgrade");
        json_bool(out, *upgrade);
        json_key!(out, "mutating");
        json_bool(out, *mutating);
        json_key!(out, "decision");
        json_str(out, decision.as_str());
        str_unless_empty!(out, "rule", rule);
        str_unless_empty!(out, "approval", approval);
        str_unless_empty!(out, "grant", grant);
        str_unless_empty!(out, "content_type", content_type);
        if let Some(body) = request_body {
            json_key!(out, "request_body");
            serde_json::to_writer(&mut *out, body)?;
        }
        str_unless_empty!(out, "precondition", precondition);
        out.push(b'}');
        Ok(())
    }
}

impl EncodeJson for ResponseRecord {
    fn encode_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let ResponseRecord {
            id,
            code,
            latency_ms,
            bytes,
            complete,
            error,
            response_body,
            session_bytes,
        } = self;
        json_key!(first out, "id");
        json_str(out, id);
        json_key!(out, "code");
        json_u64(out, u64::from(*code));
        json_key!(out, "latency_ms");
        serde_json::to_writer(&mut *out, latency_ms)?;
        json_key!(out, "bytes");
        json_u64(out, *bytes);
        json_key!(out, "complete");
        json_bool(out, *complete);
        if let Some(e) = error {
            json_key!(out, "error");
            json_str(out, e);
        }
        if let Some(body) = response_body {
            json_key!(out, "response_body");
            serde_json::to_writer(&mut *out, body)?;
        }
        if let Some((sent, received)) = session_bytes {
            json_key!(out, "session_bytes");
            out.push(b'[');
            json_u64(out, *sent);
            out.push(b',');
            json_u64(out, *received);
            out.push(b']');
        }
        out.push(b'}');
        Ok(())
    }
}

fn subject_json(out: &mut Vec<u8>, s: &Subject) {
    let Subject {
        username,
        groups,
        issuer,
        token_id,
    } = s;
    json_key!(first out, "username");
    json_str(out, username);
    if !groups.is_empty() {
        json_key!(out, "groups");
        out.push(b'[');
        for (i, g) in groups.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, g);
        }
        out.push(b']');
    }
    str_unless_empty!(out, "issuer", issuer);
    str_unless_empty!(out, "token_id", token_id);
    out.push(b'}');
}

fn origin_json(out: &mut Vec<u8>, o: &Origin) {
    let Origin {
        peer,
        original_dst,
        pid,
        comm,
        cgroup_id,
        pod_uid,
    } = o;
    json_key!(first out, "peer");
    json_str(out, peer);
    str_unless_empty!(out, "original_dst", original_dst);
    json_key!(out, "pid");
    json_u64(out, u64::from(*pid));
    str_unless_empty!(out, "comm", comm);
    json_key!(out, "cgroup_id");
    json_u64(out, *cgroup_id);
    str_unless_empty!(out, "pod_uid", pod_uid);
    out.push(b'}');
}

fn attributes_json(out: &mut Vec<u8>, a: &RequestInfo) {
    let RequestInfo {
        is_resource_request,
        path,
        verb,
        api_prefix,
        api_group,
        api_version,
        namespace,
        resource,
        subresource,
        name,
    } = a;
    json_key!(first out, "is_resource_request");
    json_bool(out, *is_resource_request);
    json_key!(out, "path");
    json_str(out, path);
    json_key!(out, "verb");
    json_str(out, verb);
    str_unless_empty!(out, "api_prefix", api_prefix);
    str_unless_empty!(out, "api_group", api_group);
    str_unless_empty!(out, "api_version", api_version);
    str_unless_empty!(out, "namespace", namespace);
    str_unless_empty!(out, "resource", resource);
    str_unless_empty!(out, "subresource", subresource);
    str_unless_empty!(out, "name", name);
    out.push(b'}');
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

    /// Strings that need escaping (and some that only look as if they might), at the
    /// start, inside and at the end of a 16-byte block and in the tail after the last.
    fn odd_strings() -> Vec<String> {
        let mut v: Vec<String> = [
            "",
            "plain",
            "quote \" inside",
            "back\\slash",
            "new\nline",
            "tab\tand\rreturn",
            "nul \u{0} and unit separator \u{1f}",
            "DEL \u{7f} and space \u{20}",
            "é ☃ 𝄞 non-ASCII",
            "/api/v1/namespaces/default/configmaps/small",
            "\u{8}\u{c}",
            "</script>",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        for at in [0usize, 1, 7, 15, 16, 17, 31, 32, 33, 40] {
            for c in ['"', '\\', '\n', '\u{1}', '\u{1f}', 'x', 'é'] {
                let mut s: String =
                    "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"[..at.min(40)].into();
                s.push(c);
                s.push_str("tail");
                v.push(s);
            }
        }
        v
    }

    #[test]
    fn the_gates_records_are_written_as_serde_json_writes_them() {
        use super::super::chain::Encoded;
        let odd = odd_strings();
        let pick = |i: usize| odd[i % odd.len()].clone();
        let mut checked = 0;
        for i in 0..odd.len() * 3 {
            let full = i % 3 != 0;
            let s = |k: usize| if full { pick(i + k) } else { String::new() };
            let c = |k: usize| compact_str::CompactString::from(s(k));
            let rec = RequestRecord {
                id: pick(i),
                received_ns: (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                conn: i as u64,
                user: (i % 4 != 0).then(|| {
                    Arc::new(Subject {
                        username: pick(i + 1),
                        groups: (0..i % 3).map(|k| pick(i + k + 2)).collect(),
                        issuer: s(3),
                        token_id: s(4),
                    })
                }),
                origin: Arc::new(Origin {
                    peer: pick(i + 5),
                    original_dst: s(6),
                    pid: i as u32 * 7919,
                    comm: s(7),
                    cgroup_id: u64::MAX - i as u64,
                    pod_uid: s(8),
                }),
                method: pick(i + 9),
                path: pick(i + 10),
                query: s(11),
                attributes: RequestInfo {
                    is_resource_request: full,
                    path: pick(i + 12),
                    verb: c(13).into_string().into(),
                    api_prefix: c(14),
                    api_group: c(15),
                    api_version: c(16),
                    namespace: c(17),
                    resource: c(18),
                    subresource: c(19),
                    name: c(20),
                },
                upgrade: i % 2 == 0,
                mutating: i % 5 == 0,
                decision: if i % 7 == 0 {
                    Decision::Other(pick(i + 21))
                } else {
                    Decision::from(["pass-through", "allow", "deny", "held"][i % 4])
                },
                rule: s(22),
                approval: s(23),
                grant: s(24),
                content_type: s(25),
                request_body: (i % 3 == 1)
                    .then(|| serde_json::json!({"data": {"k": pick(i + 26)}, "n": i, "f": 0.5})),
                precondition: s(27),
            };
            let want = serde_json::to_vec(&rec).unwrap();
            let got = Encoded::own(&rec).unwrap();
            assert_eq!(
                String::from_utf8_lossy(got.as_bytes()),
                String::from_utf8_lossy(&want),
                "request record {i}"
            );
            for latency_ms in [0.0, 0.102784, 1e-7, 12345.678, 1e21, f64::NAN] {
                let resp = ResponseRecord {
                    id: pick(i),
                    code: [200u16, 404, 0, u16::MAX][i % 4],
                    latency_ms,
                    bytes: i as u64 * 394,
                    complete: i % 2 == 1,
                    error: (i % 3 == 2).then(|| pick(i + 1)),
                    response_body: (i % 4 == 3).then(|| serde_json::json!([pick(i + 2), null])),
                    session_bytes: (i % 5 == 4).then_some((i as u64, u64::MAX)),
                };
                let want = serde_json::to_vec(&resp).unwrap();
                let got = Encoded::own(&resp).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(got.as_bytes()),
                    String::from_utf8_lossy(&want),
                    "response record {i}"
                );
            }
            checked += 1;
        }
        assert!(checked > 200, "{checked}");
    }

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
