//! `discovery`: the endpoints agents may reach only through the gate, or not at all,
//! found in the cluster and kept live instead of typed into the config.
use serde::Deserialize;

use super::Endpoint;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// This node's name (`${NODE_NAME}`).
    pub node_name: String,
    /// Redirect the API server: the `kubernetes` Service's ClusterIPs, its
    /// EndpointSlice addresses, and every node's addresses on those ports.
    #[serde(default = "yes")]
    pub apiserver: bool,
    /// Refuse every node's kubelet port (exec and logs without the API server).
    #[serde(default = "yes")]
    pub kubelet: bool,
    /// Refuse every port of this node's own addresses but the gate's (the daemon's
    /// admin, webhook and metrics listeners, the node's other services).
    #[serde(default = "yes")]
    pub node_local: bool,
    /// More endpoints redirected like the API server (public or load-balancer names'
    /// addresses).
    #[serde(default)]
    pub redirect: Vec<Endpoint>,
    /// More endpoints refused (e.g. cloud metadata: `169.254.169.254:*`).
    #[serde(default)]
    pub refuse: Vec<Endpoint>,
}

fn yes() -> bool {
    true
}

/// `node_ca`: the gate serves from this node's own short-lived intermediate CA,
/// requested from the cluster's signer (the webhook Deployment), instead of a CA key
/// on the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCa {
    /// This node's name (`${NODE_NAME}`).
    pub node_name: String,
    /// How long the intermediate is valid (renewed at half of it).
    #[serde(default = "day", with = "humantime_serde_compat")]
    pub validity: std::time::Duration,
}

fn day() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}

mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}
