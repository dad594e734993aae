//! The daemon's side of the audit evidence: every task hands records to one writer
//! thread (fsync never blocks the runtime), which appends them to the hash chain in
//! batches and makes each batch durable with one fsync (group commit). A caller that
//! must not act before its record is durable (a mutation) awaits the acknowledgement;
//! others only queue. If a batch cannot be written the log reports itself unhealthy,
//! and the proxy refuses what it must not do unrecorded.
//!
//! Record kinds (the `kind` of each chained line):
//! - `request`: who (identity, kernel origin), what (method, path, attributes), the
//!   decision, and for mutations the masked request body. Written before the request is
//!   forwarded; for a mutation, durable before it is forwarded.
//! - `response`: the outcome of a `request` (same `id`): status, latency, bytes, whether
//!   the body was delivered whole, and at `RequestResponse` level the masked body. For an
//!   upgraded session (exec, attach, port-forward) it is written when the session ends.
//! - `kernel-event`: a redirect or a blocked bypass attempt from the kernel ring buffer.
//! - `approval`: a state change of a just-in-time approval or grant.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

pub use crate::audit::Kind;
use crate::{
    audit::AuditWriter,
    config::{Audit as AuditCfg, AuditLevel},
    request_info::RequestInfo,
};

const QUEUE: usize = 8192;
const MAX_BATCH: usize = 1024;

struct Entry {
    kind: Kind,
    record: Box<RawValue>,
    ack: Option<oneshot::Sender<Result<u64, String>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the audit log cannot be written: {0}")]
pub struct AuditUnavailable(pub String);

/// The handle every task holds.
pub struct AuditLog {
    tx: mpsc::Sender<Entry>,
    healthy: Arc<AtomicBool>,
    /// Told after each durable batch (the HTTP sink ships from the segments).
    committed: Arc<tokio::sync::Notify>,
    pub level: AuditLevel,
    pub max_body_bytes: usize,
    pub fail_closed_reads: bool,
}

impl AuditLog {
    /// Starts the writer thread over `writer`.
    pub fn start(writer: AuditWriter, cfg: &AuditCfg) -> std::io::Result<Arc<AuditLog>> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let committed = Arc::new(tokio::sync::Notify::new());
        {
            let healthy = healthy.clone();
            let committed = committed.clone();
            std::thread::Builder::new()
                .name("audit".into())
                .spawn(move || write_loop(writer, rx, &healthy, &committed))?;
        }
        Ok(Arc::new(AuditLog {
            tx,
            healthy,
            committed,
            level: cfg.level,
            max_body_bytes: cfg.max_body_bytes,
            fail_closed_reads: cfg.fail_closed_reads,
        }))
    }

    fn entry<T: Serialize>(kind: Kind, rec: &T) -> Option<Entry> {
        match serde_json::value::to_raw_value(rec) {
            Ok(record) => Some(Entry {
                kind,
                record,
                ack: None,
            }),
            Err(e) => {
                warn!(error = %e, kind = kind.as_str(), "an audit record could not be encoded");
                None
            }
        }
    }

    /// Queues a record without waiting. A full queue makes a task wait for room
    /// rather than drop the record.
    pub fn record<T: Serialize>(&self, kind: Kind, rec: &T) {
        let Some(e) = Self::entry(kind, rec) else {
            return;
        };
        match self.tx.try_send(e) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(e)) => {
                let tx = self.tx.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(async move {
                            if tx.send(e).await.is_err() {
                                warn!("audit writer stopped: a record is lost");
                            }
                        });
                    }
                    // Outside the runtime (shutdown): wait for room on this thread.
                    Err(_) => {
                        if tx.blocking_send(e).is_err() {
                            warn!("audit writer stopped: a record is lost");
                        }
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.healthy.store(false, Ordering::SeqCst);
                warn!("audit writer stopped: a record is lost");
            }
        }
    }

    /// Queues a record and returns once it is durable (its sequence number).
    pub async fn durable<T: Serialize>(
        &self,
        kind: Kind,
        rec: &T,
    ) -> Result<u64, AuditUnavailable> {
        let mut e = Self::entry(kind, rec)
            .ok_or_else(|| AuditUnavailable("the record could not be encoded".into()))?;
        let (ack, done) = oneshot::channel();
        e.ack = Some(ack);
        self.tx
            .send(e)
            .await
            .map_err(|_| AuditUnavailable("the audit writer has stopped".into()))?;
        match done.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(why)) => Err(AuditUnavailable(why)),
            Err(_) => Err(AuditUnavailable("the audit writer has stopped".into())),
        }
    }

    /// False after a batch failed to be written, until one succeeds.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub fn committed(&self) -> Arc<tokio::sync::Notify> {
        self.committed.clone()
    }
}

/// Records nobody waits for are written at once (a daemon crash keeps them: they are
/// in the file) and made durable and signed within this; a batch with a waiter is
/// committed at once. Under a read-heavy load this keeps fsyncs to a few per second
/// instead of one round (data, head, directory) per batch.
const COMMIT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

fn write_loop(
    mut w: AuditWriter,
    mut rx: mpsc::Receiver<Entry>,
    healthy: &AtomicBool,
    committed: &tokio::sync::Notify,
) {
    let mut batch: Vec<Entry> = Vec::with_capacity(MAX_BATCH);
    // Appended but not yet committed since this instant.
    let mut dirty: Option<std::time::Instant> = None;
    loop {
        let first = match dirty {
            None => match rx.blocking_recv() {
                Some(e) => Some(e),
                None => return,
            },
            Some(since) => loop {
                match rx.try_recv() {
                    Ok(e) => break Some(e),
                    Err(mpsc::error::TryRecvError::Empty) if since.elapsed() < COMMIT_EVERY => {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(_) => break None,
                }
            },
        };
        if let Some(first) = first {
            batch.push(first);
            while batch.len() < MAX_BATCH
                && let Ok(e) = rx.try_recv()
            {
                batch.push(e);
            }
        }
        let appended: Vec<Result<u64, String>> = batch
            .iter()
            .map(|e| w.append(e.kind, &e.record).map_err(|e| e.to_string()))
            .collect();
        let appended_ok = appended.iter().all(Result::is_ok);
        let since = *dirty.get_or_insert_with(std::time::Instant::now);
        let waiter = batch.iter().any(|e| e.ack.is_some());
        if !(waiter || !appended_ok || since.elapsed() >= COMMIT_EVERY || batch.is_empty()) {
            batch.clear();
            continue;
        }
        let commit = w.commit().map_err(|e| e.to_string());
        dirty = None;
        let ok = commit.is_ok() && appended_ok;
        if !ok {
            warn!(error = ?commit.as_ref().err().or(appended.iter().find_map(|r| r.as_ref().err())),
                  "audit records could not be made durable");
        }
        healthy.store(ok, Ordering::SeqCst);
        for (e, r) in batch.drain(..).zip(appended) {
            if let Some(ack) = e.ack {
                let _ = ack.send(match (&commit, r) {
                    (Err(c), _) => Err(c.clone()),
                    (Ok(()), r) => r,
                });
            }
        }
        committed.notify_waiters();
    }
}

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
    pub user: Option<Subject>,
    pub origin: Origin,
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

    fn log(dir: &std::path::Path) -> Arc<AuditLog> {
        let key = crate::audit::load_or_create_key(&dir.join("k")).unwrap();
        let w = AuditWriter::open(&dir.join("audit"), key, 1 << 20).unwrap();
        AuditLog::start(w, &AuditCfg::default()).unwrap()
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

    #[tokio::test]
    async fn durable_records_are_on_disk_when_acknowledged() {
        let dir = tempdir();
        let log = log(&dir);
        let mut seqs = Vec::new();
        for i in 0..20 {
            seqs.push(
                log.durable(Kind::Request, &serde_json::json!({ "i": i }))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        let text = std::fs::read_to_string(dir.join("audit/seg-000001.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 20);
        assert!(log.healthy());
    }

    #[tokio::test]
    async fn queued_records_are_committed_within_the_interval() {
        let dir = tempdir();
        let log = log(&dir);
        for i in 0..5 {
            log.record(Kind::Request, &i);
        }
        tokio::time::sleep(COMMIT_EVERY * 3).await;
        let key = std::fs::read_to_string(dir.join("k.pub")).unwrap();
        let r =
            crate::audit::verify(&dir.join("audit"), &hex::decode(key.trim()).unwrap()).unwrap();
        assert!(
            r.problems.is_empty() && r.unsigned_tail == 0 && r.records == 5,
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn an_unwritable_log_fails_durable_records_and_reports_unhealthy() {
        let dir = tempdir();
        let log = log(&dir);
        log.durable(Kind::Request, &1).await.unwrap();
        // The directory goes away under the writer: the head cannot be rewritten.
        std::fs::remove_dir_all(dir.join("audit")).unwrap();
        let r = log.durable(Kind::Request, &2).await;
        assert!(r.is_err(), "{r:?}");
        assert!(!log.healthy());
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "pc-auditlog-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        u64::from_le_bytes(b)
    }
}
