//! Kernel enforcement: loading, attaching and pinning the eBPF programs, adopting
//! pinned state on restart, run-time enrollment through the pinned maps, the event
//! ring buffer, and the kernel's answers the gate asks for (where a connection was
//! going and who opened it; which pod a cgroup is). Everything the daemon later does
//! with the kernel goes through the pinned maps (`maps.rs`), so a fresh start, an
//! adoption and the CLI share one code path.
//!
//! Every `unsafe` block and every libc call of the daemon is in `sys.rs`.
pub mod bpffs;
pub mod btf;
pub mod cgroup;
pub mod doctor;
mod effect;
pub mod events;
pub mod flood;
mod kallsyms;
mod load;
mod maps;
pub mod node;
mod origin;
mod pods;
#[allow(unsafe_code)]
mod sys;
pub mod watch;

use std::path::PathBuf;

pub use effect::Effect;
pub use load::{AttachState, Paths, object_bytes, program_id, start, unload};
pub use maps::PinnedMaps;
pub use origin::{BpfOriginLookup, ConnOrigin, OriginLookup};
pub use pods::PodResolver;
pub use sys::{effective_uid, interface_addresses, raise_nofile_limit, release_free_heap};

/// Checks that the programs would be in effect on `cgroup` (enrollment time).
pub fn verify_enrollable(
    cgroup: &std::path::Path,
    attach_cgroup: &std::path::Path,
    paths: &Paths,
    state: &AttachState,
) -> Result<(), String> {
    effect::check_one(cgroup, attach_cgroup, paths, state)
}

use crate::config::Endpoint;

/// The protected-endpoints map key of an endpoint (port 0: every port).
pub fn endpoint_key(ep: &Endpoint) -> portcullis_common::SockKey {
    portcullis_common::SockKey::from(std::net::SocketAddr::new(ep.ip, ep.port.unwrap_or(0)))
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cgroup {}: {message}", path.display())]
    Cgroup { path: PathBuf, message: String },
    #[error("kernel BTF: {0} (is CONFIG_DEBUG_INFO_BTF set? see `portcullis doctor`)")]
    Btf(String),
    #[error("bpffs {}: {message} (see `portcullis doctor`)", path.display())]
    Bpffs { path: PathBuf, message: String },
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("program {program}: {message}")]
    Program { program: String, message: String },
    #[error("map {map}: {message}")]
    Map { map: String, message: String },
    #[cfg_attr(embedded_bpf, allow(dead_code))]
    #[error(
        "no eBPF object: this binary was built without one (use `cargo xtask build`) and kernel.bpf_object is not set"
    )]
    NoObject,
    #[error("{}: {message}", path.display())]
    State { path: PathBuf, message: String },
}
