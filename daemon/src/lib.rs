//! The Portcullis daemon as a library: the `portcullis` binary (node daemon and CLI)
//! is `cmd` on top of it, and the benchmarks use its masking and audit parts.
//!
//! # Layers
//!
//! Each top-level module sits in one layer and imports only from layers below it;
//! within an ordered layer (`a < b`) a module imports only those before it, and the
//! modules of an unordered layer (`a | b`) never import each other. So there is no
//! import cycle, and `tests/layers` fails the unit tier on any import this table does
//! not allow (it reads the code with `syn`: `use` trees, inline paths, macros).
//!
//! ```text
//! L5  cmd
//! L4  app
//! L3  gate | admin | admission | fuzzing
//! L2  kernel < enroll < endpoints < nodeca < audit < mask < upstream < identity < policy < approvals
//! L1  config < tls
//! L0  util < k8s < loops
//! ```
//!
//! # Where each concern lives
//!
//! - `util` — plumbing with no Portcullis knowledge: the body type, error chains,
//!   clocks and timestamps, media types, ids, JSON-lines files, the accept retry.
//! - `k8s` — Kubernetes vocabulary: RequestInfo (the apiserver's resolver), grant
//!   Attributes, UserInfo, PodRef, metav1.Status.
//! - `loops` — the agents' event loops: single-threaded runtimes that own the
//!   connections handed to them (and, through `upstream`, their own API server
//!   connections), the least-loaded choice, stopping them.
//! - `config` — the one config file: parsed, checked with field paths, the gate's
//!   mode decided once; the state directory's layout (`StatePaths`).
//! - `tls` — the interception CA and leaves, the one TLS accept, the one outbound
//!   client configuration and HTTPS client.
//! - `kernel` — the eBPF programs: load, attach, adopt, unload; the pinned maps; the
//!   event ring; origin lookup; cgroup → pod; doctor checks; all `unsafe` and libc
//!   calls (`kernel/sys.rs`).
//! - `enroll` — agent pods on this node enrolled by selector: the pod and namespace
//!   watchers, each pod's cgroup, removal when pods go.
//! - `endpoints` — protected endpoints discovered from the cluster and kept live:
//!   the API server redirected, kubelet ports and the node's other ports refused.
//! - `nodeca` — this node's short-lived intermediate CA, requested from the cluster's
//!   signer and renewed.
//! - `audit` — the tamper-evident chain: writer, verify, the daemon's log handle, the
//!   gate's records and decisions, reading back (sessions, k8s export), sink, replay.
//! - `mask` — response masking: paths, the streaming JSON masker, text, detectors,
//!   media types and the per-request plan.
//! - `upstream` — the API server connection: credential, head rewrite, impersonation.
//! - `identity` — agent tokens: issuers' keys (JWKS), verification, pod binding.
//! - `policy` — the AgentPolicy document, decisions, hot reload, `policy test`.
//! - `approvals` — holding requests for humans, grants, the store, the journal,
//!   webhooks.
//! - `gate` — the data path: accept → connection → precheck → authorize → forward or
//!   upgrade → relay; refusals and the gate's audit records in one place each.
//! - `admission` — the admission webhook (its own Deployment): agent pods shaped
//!   and guarded, agents' workloads labelled, the cluster's CA objects set up.
//! - `admin` — the admin API: routes, the socket and HTTPS listeners, the client.
//! - `app` — `portcullis run`: the only place every part is wired together.
//! - `cmd` — the CLI: arguments, and every line it prints.
//! - `fuzzing` — the fuzz targets' bodies (`fuzz/`), which reach the parsers that take
//!   agent or file input; hidden, and also run on the seed corpus as unit tests.
#![deny(unsafe_code)]

pub mod admin;
mod admission;
mod app;
mod approvals;
pub mod audit;
pub mod cmd;
pub mod config;
mod endpoints;
mod enroll;
#[doc(hidden)]
pub mod fuzzing;
mod gate;
mod identity;
pub mod k8s;
mod kernel;
mod loops;
pub mod mask;
mod nodeca;
pub mod policy;
mod tls;
mod upstream;
mod util;

/// A lane's own HTTP/2 connection to the API server, also for `pc-floor` (the test-only
/// reference proxy whose cost is the daemon's stack without the gate, this included).
pub use upstream::{H2Connection, ResponseBody, SendError};
