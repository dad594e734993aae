//! Reading audit evidence back: the chained records of a directory, requests joined to
//! their outcomes, agent sessions, and export as Kubernetes audit events.
//!
//! A session is what one agent did in one sitting: the requests of one subject from one
//! pod (the kernel's pod, by UID), in order, until that pair is idle for longer than
//! the idle gap (default 15 minutes). Its ID is derived from the subject, the pod and
//! its first request's ID, so the same evidence always yields the same sessions.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::Path,
    time::Duration,
};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Kind, RequestRecord, ResponseRecord, list_segments, seg_path};

/// Evidence that cannot be read (the cause is the source, printed after it).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening {}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One chained line.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub kind: String,
    pub record: serde_json::Value,
}

/// Every complete record of `dir`, in chain order. (Run `audit verify` to know they
/// are authentic; this only reads.)
pub fn read_all(dir: &Path) -> Result<Vec<Entry>, ReadError> {
    let read = |path: &Path| {
        let path = path.to_owned();
        move |source| ReadError::Read { path, source }
    };
    let mut out = Vec::new();
    for n in list_segments(dir).map_err(read(dir))? {
        let p = seg_path(dir, n);
        let f = std::fs::File::open(&p).map_err(|source| ReadError::Open {
            path: p.clone(),
            source,
        })?;
        for line in BufReader::new(f).lines() {
            let line = line.map_err(read(&p))?;
            let v: serde_json::Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                // A torn last line from a crash: not a record.
                Err(_) => continue,
            };
            out.push(Entry {
                seq: v["seq"].as_u64().unwrap_or(0),
                kind: v["kind"].as_str().unwrap_or("").to_owned(),
                record: v.get("record").cloned().unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

/// A request and, if it was recorded, its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Exchange {
    pub seq: u64,
    pub request: RequestRecord,
    pub response: Option<ResponseRecord>,
}

pub fn exchanges(entries: &[Entry]) -> Vec<Exchange> {
    let mut responses: HashMap<String, ResponseRecord> = entries
        .iter()
        .filter(|e| e.kind == Kind::Response.as_str())
        .filter_map(|e| serde_json::from_value::<ResponseRecord>(e.record.clone()).ok())
        .map(|r| (r.id.clone(), r))
        .collect();
    entries
        .iter()
        .filter(|e| e.kind == Kind::Request.as_str())
        .filter_map(|e| {
            let request: RequestRecord = serde_json::from_value(e.record.clone()).ok()?;
            let response = responses.remove(&request.id);
            Some(Exchange {
                seq: e.seq,
                request,
                response,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub id: String,
    pub subject: String,
    pub pod_uid: String,
    pub first_ns: u64,
    pub last_ns: u64,
    pub exchanges: Vec<Exchange>,
}

pub fn subject_of(r: &RequestRecord) -> String {
    r.user
        .as_ref()
        .map(|u| u.username.clone())
        .unwrap_or_else(|| "(unauthenticated)".into())
}

pub fn sessions(exchanges: Vec<Exchange>, idle: Duration) -> Vec<Session> {
    let idle_ns = idle.as_nanos() as u64;
    let mut open: HashMap<(String, String), usize> = HashMap::new();
    let mut out: Vec<Session> = Vec::new();
    for ex in exchanges {
        let key = (subject_of(&ex.request), ex.request.origin.pod_uid.clone());
        let t = ex.request.received_ns;
        match open.get(&key) {
            Some(&i) if t.saturating_sub(out[i].last_ns) <= idle_ns => {
                out[i].last_ns = t;
                out[i].exchanges.push(ex);
            }
            _ => {
                let mut h = Sha256::new();
                h.update(key.0.as_bytes());
                h.update([0]);
                h.update(key.1.as_bytes());
                h.update([0]);
                h.update(ex.request.id.as_bytes());
                let id = format!("ses-{}", &hex::encode(h.finalize())[..12]);
                open.insert(key.clone(), out.len());
                out.push(Session {
                    id,
                    subject: key.0,
                    pod_uid: key.1,
                    first_ns: t,
                    last_ns: t,
                    exchanges: vec![ex],
                });
            }
        }
    }
    out
}

/// The exchange as an `audit.k8s.io/v1` Event, as the API server's log backend writes
/// them; what only Portcullis knows (decision, rule, approval, grant, kernel origin)
/// goes into annotations.
pub fn k8s_event(ex: &Exchange) -> serde_json::Value {
    use serde_json::json;
    let r = &ex.request;
    let a = &r.attributes;
    let level = if ex
        .response
        .as_ref()
        .is_some_and(|s| s.response_body.is_some())
    {
        "RequestResponse"
    } else if r.request_body.is_some() {
        "Request"
    } else {
        "Metadata"
    };
    let mut uri = r.path.clone();
    if !r.query.is_empty() {
        uri.push('?');
        uri.push_str(&r.query);
    }
    let mut ev = json!({
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": level,
        "auditID": r.id,
        "stage": if ex.response.is_some() { "ResponseComplete" } else { "RequestReceived" },
        "requestURI": uri,
        "verb": a.verb,
        "sourceIPs": [r.origin.peer.rsplit_once(':').map_or(r.origin.peer.as_str(), |(ip, _)| ip)],
        "requestReceivedTimestamp": crate::util::rfc3339_nanos(r.received_ns),
        "annotations": {
            "portcullis.dev/decision": r.decision,
            "portcullis.dev/rule": r.rule,
            "portcullis.dev/approval": r.approval,
            "portcullis.dev/grant": r.grant,
            "portcullis.dev/pod-uid": r.origin.pod_uid,
            "portcullis.dev/cgroup-id": r.origin.cgroup_id.to_string(),
            "portcullis.dev/pid": r.origin.pid.to_string(),
            "portcullis.dev/comm": r.origin.comm,
        },
    });
    if let Some(u) = &r.user {
        ev["user"] = json!({
            "username": u.username,
            "groups": u.groups,
            "extra": {
                "portcullis.dev/issuer": [u.issuer],
                "portcullis.dev/token-id": [u.token_id],
            },
        });
    }
    if a.is_resource_request {
        // A create names its object in the body, as the API server's audit shows it.
        let name = if a.name.is_empty() {
            r.request_body
                .as_ref()
                .and_then(|b| b["metadata"]["name"].as_str())
                .unwrap_or("")
        } else {
            a.name.as_str()
        };
        ev["objectRef"] = json!({
            "resource": a.resource,
            "namespace": a.namespace,
            "name": name,
            "apiGroup": a.api_group,
            "apiVersion": a.api_version,
            "subresource": a.subresource,
        });
    }
    if let Some(b) = &r.request_body {
        ev["requestObject"] = b.clone();
    }
    if let Some(s) = &ex.response {
        ev["responseStatus"] = json!({ "metadata": {}, "code": s.code });
        ev["stageTimestamp"] = json!(crate::util::rfc3339_nanos(
            r.received_ns + (s.latency_ms * 1e6) as u64
        ));
        if let Some(b) = &s.response_body {
            ev["responseObject"] = b.clone();
        }
    }
    ev
}
