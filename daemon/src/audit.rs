//! Tamper-evident audit evidence: append-only segments of JSON lines, each record
//! carrying the SHA-256 of the previous record's line (across segments), and a signed
//! head per segment (ed25519, the daemon's audit key) naming its first and last record
//! and the chain value it continues from. `verify` detects an edited, deleted,
//! reordered or appended record, a truncated or missing segment and swapped segments,
//! and says where.
//!
//! Layout of an audit directory:
//! ```text
//! seg-000001.jsonl       {"seq":1,"prev":"00…","time":…,"kind":"…","record":{…}}
//! seg-000001.head.json   {"segment":1,"first_seq":1,"last_seq":…,"chain_in":"…","last_hash":"…","sig":"…"}
//! ```
//!
//! Record kinds (the `kind` of each chained line, [`Kind`]):
//! - `request`: who (identity, kernel origin), what (method, path, attributes), the
//!   decision, and for mutations the masked request body. Written before the request is
//!   forwarded; for a mutation, durable before it is forwarded.
//! - `response`: the outcome of a `request` (same `id`): status, latency, bytes, whether
//!   the body was delivered whole, and at `RequestResponse` level the masked body. For an
//!   upgraded session (exec, attach, port-forward) it is written when the session ends.
//! - `kernel-event`: a redirect or a blocked bypass attempt from the kernel ring buffer.
//! - `approval`: a state change of a just-in-time approval or grant.
//! - `recovery`: a writer signed the tail a crashed predecessor left unsigned.
//! - `damage`: a writer found the log damaged when it opened it (records cut or
//!   edited, a head missing or forged), or the off-node anchor vouches for records the
//!   log no longer holds; `verify` reports every such record as a problem.
//!
//! By job: `chain` (kinds, lines, heads, the key), `writer` (appending, group commit),
//! `reopen` (checking what a predecessor left before signing anything), `anchor`
//! (heads published off the node, and a log checked against them),
//! `log` (the daemon's handle: one writer thread, durable or queued records),
//! `records` (the gate's records and decisions), `verify`, `read` (records back,
//! exchanges, sessions, Kubernetes audit events), `sink` (shipping to a collector),
//! `replay` (a recorded session against a sandbox cluster).
mod anchor;
mod chain;
mod log;
mod read;
mod records;
mod reopen;
mod replay;
mod sink;
mod verify;
mod writer;

pub use anchor::{
    Anchor, AnchorError, AnchorStore, check as check_anchor, latest_head, publish_heads,
    publish_last,
};
pub use chain::{AuditError, Head, Kind, head_path, list_segments, load_or_create_key, seg_path};
pub use log::{AuditLog, AuditUnavailable};
pub use read::{
    Entry, Exchange, ReadError, Session, exchanges, k8s_event, read_all, sessions, subject_of,
};
pub use records::{Decision, Origin, RequestRecord, ResponseRecord, Subject, body_value};
pub use replay::{Outcome as ReplayOutcome, ReplayError, Step, Target, replay};
pub use sink::Shipper;
pub use verify::{Report, verify, verify_settled};
pub use writer::AuditWriter;
