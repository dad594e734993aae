//! The watches behind discovery (the `kubernetes` Service and EndpointSlices, the
//! Nodes) and the map writes: rules that appear are written, rules that disappear
//! are removed, the config's own endpoints are never touched.
use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use portcullis_common::SockKey;
use tracing::{info, warn};

use super::desired::{Desired, Rule};
use crate::{
    config::{Discovery, Endpoint},
    enroll::EnrollError,
    kernel::{PinnedMaps, endpoint_key},
};

/// The id discovered rules carry in the map (config entries use their index).
const DISCOVERED_ID: u32 = 1000;

fn service_addrs(s: &Service) -> Vec<SocketAddr> {
    let Some(spec) = &s.spec else {
        return Vec::new();
    };
    let ips: Vec<IpAddr> = spec
        .cluster_ips
        .clone()
        .or(spec.cluster_ip.clone().map(|i| vec![i]))
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i.parse().ok())
        .collect();
    let ports: Vec<u16> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| u16::try_from(p.port).ok())
        .collect();
    ips.iter()
        .flat_map(|ip| ports.iter().map(|p| SocketAddr::new(*ip, *p)))
        .collect()
}

fn slice_addrs(s: &EndpointSlice) -> Vec<SocketAddr> {
    let ports: Vec<u16> = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
        .collect();
    s.endpoints
        .iter()
        .flatten()
        .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()))
        .flat_map(|ip| ports.iter().map(move |p| SocketAddr::new(ip, *p)))
        .collect()
}

fn node_addrs(n: &Node) -> (Vec<IpAddr>, u16) {
    let st = n.status.as_ref();
    let addrs = st
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let kubelet = st
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref())
        .and_then(|k| u16::try_from(k.port).ok())
        .unwrap_or(10250);
    (addrs, kubelet)
}

/// Writes `want` over what was written before (`have`), leaving `fixed` alone.
fn apply(
    maps: &Mutex<PinnedMaps>,
    have: &mut BTreeSet<Rule>,
    want: BTreeSet<Rule>,
    fixed: &HashSet<SockKey>,
) {
    let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
    for r in have.difference(&want) {
        let key = r.key();
        if fixed.contains(&key) || want.iter().any(|w| w.key() == key) {
            continue;
        }
        match m.unprotect(&key) {
            Ok(_) => info!(ip = %r.ip, port = r.port, refuse = r.refuse, "no longer protected"),
            Err(e) => warn!(error = %e, "unprotecting"),
        }
    }
    for r in want.difference(have) {
        if fixed.contains(&r.key()) {
            continue;
        }
        match m.protect_with(r.key(), DISCOVERED_ID, r.flags()) {
            Ok(()) => info!(ip = %r.ip, port = r.port, refuse = r.refuse, "protected (discovered)"),
            Err(e) => warn!(error = %e, "protecting"),
        }
    }
    *have = want;
}

pub async fn run(
    cfg: Discovery,
    kcfg: kube::Config,
    fixed: Vec<Endpoint>,
    maps: Arc<Mutex<PinnedMaps>>,
    status_file: PathBuf,
) -> Result<(), EnrollError> {
    let client = Client::try_from(kcfg).map_err(EnrollError::Client)?;
    let fixed: HashSet<SockKey> = fixed.iter().map(endpoint_key).collect();
    let services = watcher(
        Api::<Service>::namespaced(client.clone(), "default"),
        watcher::Config::default().fields("metadata.name=kubernetes"),
    )
    .default_backoff();
    let slices = watcher(
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        watcher::Config::default().labels("kubernetes.io/service-name=kubernetes"),
    )
    .default_backoff();
    let nodes = watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff();
    let (mut services, mut slices, mut nodes) = (
        std::pin::pin!(services),
        std::pin::pin!(slices),
        std::pin::pin!(nodes),
    );
    let mut d = Desired::default();
    let mut have = BTreeSet::new();
    let mut local_check = tokio::time::interval(Duration::from_secs(10));
    info!(node = %cfg.node_name, "discovering protected endpoints");
    loop {
        tokio::select! {
            Some(ev) = services.next() => match ev {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => d.service = service_addrs(&s),
                Ok(watcher::Event::Delete(_)) => d.service.clear(),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "Service watch (retrying)"),
            },
            Some(ev) = slices.next() => match ev {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                    d.slices.insert(s.metadata.name.clone().unwrap_or_default(), slice_addrs(&s));
                }
                Ok(watcher::Event::Delete(s)) => {
                    d.slices.remove(&s.metadata.name.clone().unwrap_or_default());
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "EndpointSlice watch (retrying)"),
            },
            Some(ev) = nodes.next() => match ev {
                Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                    d.nodes.insert(n.metadata.name.clone().unwrap_or_default(), node_addrs(&n));
                }
                Ok(watcher::Event::Delete(n)) => {
                    d.nodes.remove(&n.metadata.name.clone().unwrap_or_default());
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "Node watch (retrying)"),
            },
            _ = local_check.tick() => {
                match crate::kernel::interface_addresses() {
                    Ok(a) => d.local = a,
                    Err(e) => warn!(error = %e, "reading this node's addresses"),
                }
            }
        }
        let want = d.rules(&cfg);
        if want != have {
            apply(&maps, &mut have, want, &fixed);
            if let Err(e) =
                std::fs::write(&status_file, serde_json::to_vec(&have).unwrap_or_default())
            {
                warn!(error = %e, path = %status_file.display(), "writing the protected set");
            }
        }
    }
}
