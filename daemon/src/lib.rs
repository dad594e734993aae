//! The Portcullis daemon as a library: the `portcullis` binary (node daemon and CLI)
//! is built on it, and so are the benchmarks.
pub mod admin;
pub mod admin_client;
pub mod approvals;
pub mod audit;
pub mod audit_log;
pub mod audit_read;
pub mod audit_sink;
pub mod ca;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod http_client;
pub mod identity;
pub mod jwks;
pub mod kernel;
pub mod listener;
pub mod mask;
pub mod origin;
pub mod pod;
pub mod policy;
pub mod policy_cases;
pub mod proxy;
pub mod replay;
pub mod request_info;
pub mod status;
pub mod upstream;
pub mod util;

/// Where the daemon and the CLI read their configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/portcullis/portcullis.yaml";
