//! The watchers: the pods scheduled to this node and every namespace's labels, from
//! the API server (kube-rs, relisting with backoff when a watch breaks), fed to the
//! [`Enroller`]; agent pods whose cgroup runc has not created yet are looked up again
//! every 50 ms, and stale map entries removed every 10 s.
use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

use super::state::{Enroller, PinnedCgroups, PodView};
use crate::{
    config::{Config, Credential, Enrollment},
    kernel::PinnedMaps,
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("proxy.upstream.url `{0}` is not a URL")]
    Url(String),
    #[error("the in-cluster API configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("the API client: {0}")]
    Client(#[source] kube::Error),
    #[error("the API server's CA {0}: {1}")]
    Ca(std::path::PathBuf, String),
}

/// The API client: the upstream the proxy uses (its URL, CA and credential), or the
/// pod's service account.
pub fn kube_config(cfg: &Config) -> Result<kube::Config, EnrollError> {
    let up = cfg.proxy.as_ref().map(|p| &p.upstream);
    let mut c = match up.and_then(|u| u.url.as_deref()) {
        Some(url) => kube::Config::new(
            url.parse::<http::Uri>()
                .map_err(|_| EnrollError::Url(url.into()))?,
        ),
        None => kube::Config::incluster().map_err(EnrollError::InCluster)?,
    };
    if let Some(up) = up {
        if let Some(ca) = &up.ca_file {
            c.root_cert = Some(read_ders(ca)?);
            c.root_cert_file = None;
        }
        match &up.credential {
            Credential::BearerTokenFile(p) => {
                c.auth_info.token_file = Some(p.display().to_string());
                c.auth_info.token = None;
            }
            Credential::ClientCertificate {
                cert_file,
                key_file,
            } => {
                c.auth_info.client_certificate = Some(cert_file.display().to_string());
                c.auth_info.client_key = Some(key_file.display().to_string());
                c.auth_info.token_file = None;
                c.auth_info.token = None;
            }
            Credential::InCluster => {
                if up.url.is_some() {
                    let sa = std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
                    c.auth_info.token_file = Some(sa.join("token").display().to_string());
                    if up.ca_file.is_none() {
                        c.root_cert = Some(read_ders(&sa.join("ca.crt"))?);
                        c.root_cert_file = None;
                    }
                }
            }
        }
    }
    trust_from_file(&mut c)?;
    Ok(c)
}

/// The in-cluster configuration (the pod's service account).
pub fn incluster() -> Result<kube::Config, EnrollError> {
    let mut c = kube::Config::incluster().map_err(EnrollError::InCluster)?;
    trust_from_file(&mut c)?;
    Ok(c)
}

/// The CA file read into the trusted roots (the client's own file loading did not
/// find them).
fn trust_from_file(c: &mut kube::Config) -> Result<(), EnrollError> {
    if let Some(f) = c.root_cert_file.take() {
        c.root_cert = Some(read_ders(&f)?);
    }
    Ok(())
}

/// The certificates of a PEM file, DER-encoded (what the API client trusts).
fn read_ders(path: &std::path::Path) -> Result<Vec<Vec<u8>>, EnrollError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let certs: Result<Vec<Vec<u8>>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| EnrollError::Ca(path.to_owned(), e.to_string()))?
        .map(|c| c.map(|c| c.to_vec()))
        .collect();
    let certs = certs.map_err(|e| EnrollError::Ca(path.to_owned(), e.to_string()))?;
    if certs.is_empty() {
        return Err(EnrollError::Ca(path.to_owned(), "no certificate".into()));
    }
    Ok(certs)
}

fn view(p: &Pod) -> Option<PodView> {
    let m = &p.metadata;
    Some(PodView {
        uid: m.uid.clone()?,
        namespace: m.namespace.clone()?,
        name: m.name.clone().unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
    })
}

/// Runs until the task is dropped; writes what it enrolled to `status_file`.
pub async fn run(
    selector: Enrollment,
    kcfg: kube::Config,
    root: PathBuf,
    maps: Arc<Mutex<PinnedMaps>>,
    status_file: PathBuf,
) -> Result<(), EnrollError> {
    let client = Client::try_from(kcfg).map_err(EnrollError::Client)?;
    let node = selector.node_name.clone();
    let mut enroller = Enroller::new(selector, PinnedCgroups::new(&root, maps));
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
    .default_backoff();
    let namespaces =
        watcher(Api::<Namespace>::all(client), watcher::Config::default()).default_backoff();
    let mut pods = std::pin::pin!(pods);
    let mut namespaces = std::pin::pin!(namespaces);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut gc = tokio::time::interval(Duration::from_secs(10));
    let mut listing: Option<HashSet<String>> = None;
    let mut written = String::new();
    info!(node = %node, root = %root.display(), "enrolling agent pods by selector");
    loop {
        tokio::select! {
            Some(ev) = pods.next() => match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                    if let Some(v) = view(&p) {
                        if let Some(l) = listing.as_mut() {
                            l.insert(v.uid.clone());
                        }
                        enroller.pod(v);
                    }
                }
                Ok(watcher::Event::Delete(p)) => {
                    if let Some(uid) = &p.metadata.uid {
                        enroller.pod_gone(uid);
                    }
                }
                Ok(watcher::Event::Init) => listing = Some(HashSet::new()),
                Ok(watcher::Event::InitDone) => {
                    if let Some(l) = listing.take() {
                        enroller.pods_listed(&l);
                    }
                }
                Err(e) => warn!(error = %e, "pod watch (retrying)"),
            },
            Some(ev) = namespaces.next() => match ev {
                Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                    if let Some(name) = &n.metadata.name {
                        enroller.namespace(name, n.metadata.labels.clone().unwrap_or_default());
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "namespace watch (retrying)"),
            },
            _ = tick.tick() => {
                enroller.tick();
                let now = serde_json::to_string(&enroller.agents()).unwrap_or_default();
                if now != written {
                    if let Err(e) = std::fs::write(&status_file, &now) {
                        warn!(error = %e, path = %status_file.display(), "writing enrollment status");
                    }
                    written = now;
                }
            }
            _ = gc.tick() => {
                enroller.collect_garbage();
            }
        }
    }
}
