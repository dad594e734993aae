//! Protected endpoints discovered, not typed: the API server (the `kubernetes`
//! Service's ClusterIPs, its EndpointSlice addresses, and every node's addresses on
//! those ports) is redirected to the gate; every node's kubelet port is refused (a
//! second door to exec and logs); and every port of this node's own addresses but the
//! gate's is refused, so agents reach nothing on the node but the gate (the daemon's
//! admin, webhook and metrics listeners included). Kept live from watches; what the
//! config lists stays as it is.
mod desired;
mod watch;

pub use watch::run;
