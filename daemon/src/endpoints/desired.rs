//! The protected set, computed from what the watches saw.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use portcullis_common::{SockKey, protection_flags};
use serde::Serialize;

use crate::config::{Discovery, Endpoint};

/// One protected endpoint: where, and whether it is redirected or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Rule {
    pub ip: IpAddr,
    /// 0: every port.
    pub port: u16,
    pub refuse: bool,
}

impl Rule {
    pub fn key(&self) -> SockKey {
        SockKey::from(SocketAddr::new(self.ip, self.port))
    }
    pub fn flags(&self) -> u32 {
        if self.refuse {
            protection_flags::REFUSE
        } else {
            0
        }
    }
}

/// What the watches know.
#[derive(Debug, Default)]
pub struct Desired {
    /// The `kubernetes` Service: ClusterIPs and port.
    pub service: Vec<SocketAddr>,
    /// EndpointSlice name → its endpoints.
    pub slices: BTreeMap<String, Vec<SocketAddr>>,
    /// Node name → (addresses, kubelet port).
    pub nodes: BTreeMap<String, (Vec<IpAddr>, u16)>,
    /// This node's own interface addresses.
    pub local: Vec<IpAddr>,
}

fn ep(e: &Endpoint, refuse: bool) -> Rule {
    Rule {
        ip: e.ip,
        port: e.port.unwrap_or(0),
        refuse,
    }
}

impl Desired {
    /// The rules for `cfg` (an exact endpoint beats an address-wide one in the kernel,
    /// so the API server on a node address stays redirected under a node-wide refusal).
    pub fn rules(&self, cfg: &Discovery) -> BTreeSet<Rule> {
        let mut out = BTreeSet::new();
        let mut api_ports = BTreeSet::new();
        if cfg.apiserver {
            for a in self.service.iter().chain(self.slices.values().flatten()) {
                out.insert(Rule {
                    ip: a.ip(),
                    port: a.port(),
                    refuse: false,
                });
            }
            api_ports.extend(self.slices.values().flatten().map(|a| a.port()));
        }
        for (name, (addrs, kubelet)) in &self.nodes {
            for ip in addrs {
                for p in &api_ports {
                    out.insert(Rule {
                        ip: *ip,
                        port: *p,
                        refuse: false,
                    });
                }
                if cfg.kubelet && *kubelet != 0 {
                    out.insert(Rule {
                        ip: *ip,
                        port: *kubelet,
                        refuse: true,
                    });
                }
                if cfg.node_local && *name == cfg.node_name {
                    out.insert(Rule {
                        ip: *ip,
                        port: 0,
                        refuse: true,
                    });
                }
            }
        }
        if cfg.node_local {
            for ip in self.local.iter().filter(|ip| !ip.is_loopback()) {
                out.insert(Rule {
                    ip: *ip,
                    port: 0,
                    refuse: true,
                });
            }
        }
        out.extend(cfg.redirect.iter().map(|e| ep(e, false)));
        out.extend(cfg.refuse.iter().map(|e| ep(e, true)));
        // One rule per key: a redirect wins over a refusal of the same key.
        let mut by_key: BTreeMap<(IpAddr, u16), Rule> = BTreeMap::new();
        for r in out {
            by_key
                .entry((r.ip, r.port))
                .and_modify(|x| x.refuse &= r.refuse)
                .or_insert(r);
        }
        by_key.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Discovery {
        Discovery {
            node_name: "n1".into(),
            apiserver: true,
            kubelet: true,
            node_local: true,
            redirect: vec![],
            refuse: vec!["169.254.169.254:*".parse().unwrap()],
        }
    }

    #[test]
    fn the_cluster_becomes_rules() {
        let d = Desired {
            service: vec!["10.96.0.1:443".parse().unwrap()],
            slices: [(
                "kubernetes".into(),
                vec!["172.31.0.1:6443".parse().unwrap()],
            )]
            .into(),
            nodes: [
                ("n1".into(), (vec!["172.31.0.1".parse().unwrap()], 10250)),
                ("n2".into(), (vec!["172.31.0.2".parse().unwrap()], 10250)),
            ]
            .into(),
            local: vec!["10.244.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        };
        let r: Vec<String> = d
            .rules(&cfg())
            .iter()
            .map(|r| {
                format!(
                    "{}:{}{}",
                    r.ip,
                    r.port,
                    if r.refuse { " refuse" } else { "" }
                )
            })
            .collect();
        assert_eq!(
            r,
            vec![
                "10.96.0.1:443",
                "10.244.0.1:0 refuse",
                "169.254.169.254:0 refuse",
                "172.31.0.1:0 refuse",
                "172.31.0.1:6443",
                "172.31.0.1:10250 refuse",
                "172.31.0.2:6443",
                "172.31.0.2:10250 refuse",
            ]
        );
    }
}
