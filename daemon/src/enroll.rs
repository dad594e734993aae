//! Enrollment by selector: the daemon watches the pods scheduled to its node and the
//! namespaces' labels, and writes the pod cgroup of every selected pod (see
//! `config::Enrollment`) into the pinned agent map; a deleted pod's cgroup is removed,
//! and so is any entry whose cgroup no longer exists, so the map stays bounded by the
//! pods alive on the node.
//!
//! Race-free start: the pod cgroup (v2) appears only when runc starts the sandbox, and
//! a watcher alone would race the first container. Agent pods therefore get an init
//! container from the admission webhook, `portcullis barrier`, that runs before any
//! other container and exits only once its own connection to the API server is
//! answered by the gate (a certificate from the interception CA, which the real API
//! server cannot present). Init containers run in order, so no container of the pod
//! executes an instruction before the pod's cgroup is enrolled; if the daemon is down,
//! the pod waits (fail closed). Enrollment is sticky: a pod that was selected stays
//! enrolled until it is deleted, whatever happens to its labels.
mod cgroups;
mod state;
mod watch;

pub use watch::{EnrollError, incluster, kube_config, run};
