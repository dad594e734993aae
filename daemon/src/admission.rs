//! The admission webhook (`portcullis webhook`, a small Deployment from the same
//! binary): agent pods are shaped (agent label, the barrier first, CA trust, no
//! NET_RAW: `mutate`) and guarded (`guard`); workloads an agent creates carry the agent
//! label in their pod templates, which cannot be removed afterwards. At start it sets
//! up what it serves with (`bootstrap`): the interception CA, its own serving pair,
//! the webhook configurations' `caBundle`, the CA bundle ConfigMap of every namespace.
mod bootstrap;
mod guard;
mod mutate;
mod review;
mod serve;
mod signer;

use std::{net::IpAddr, net::SocketAddr, path::PathBuf, sync::Arc};

use tracing::info;

pub use bootstrap::BootstrapError;

/// How the webhook runs.
pub struct Options {
    pub listen: SocketAddr,
    /// Its own namespace (Secrets live there).
    pub namespace: String,
    pub service: String,
    /// Name of both webhook configurations.
    pub configuration: String,
    pub ca_secret: String,
    pub tls_secret: String,
    /// None: this pod's own image (POD_NAME in the environment).
    pub barrier_image: Option<String>,
    pub runtime_classes: Vec<String>,
    pub extra_names: Vec<String>,
    pub extra_ips: Vec<IpAddr>,
    /// The cluster CA (the service account's ca.crt).
    pub cluster_ca: PathBuf,
    /// The node daemons' service account (the only requester of intermediates).
    pub daemon_service_account: String,
    /// How long a node's intermediate is valid.
    pub intermediate_validity: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("the API client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Config(crate::enroll::EnrollError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub async fn run(o: Options) -> Result<(), AdmissionError> {
    let kcfg = crate::enroll::incluster().map_err(AdmissionError::Config)?;
    let client = kube::Client::try_from(kcfg).map_err(AdmissionError::Client)?;
    let (ca_crt, ca_key) = bootstrap::interception_ca(
        &client,
        &o.namespace,
        &o.ca_secret,
        &o.extra_names,
        &o.extra_ips,
    )
    .await?;
    let barrier_image = match o.barrier_image {
        Some(i) => i,
        None => bootstrap::own_image(&client, &o.namespace).await?,
    };
    let (bundle, cert, key) =
        bootstrap::serving_pair(&client, &o.namespace, &o.tls_secret, &o.service).await?;
    bootstrap::patch_ca_bundle(&client, &o.configuration, &bundle).await?;
    let cluster_ca =
        std::fs::read_to_string(&o.cluster_ca).map_err(|source| AdmissionError::Io {
            what: format!("reading the cluster CA {}", o.cluster_ca.display()),
            source,
        })?;
    let mut trust = cluster_ca.trim_end().to_string();
    trust.push('\n');
    trust.push_str(&ca_crt);
    tokio::spawn(bootstrap::publish_ca_bundle(client.clone(), trust));
    // Nodes' intermediates: only this Deployment holds the interception CA's key.
    tokio::spawn(signer::run(
        client.clone(),
        ca_crt.clone(),
        ca_key,
        format!(
            "system:serviceaccount:{}:{}",
            o.namespace, o.daemon_service_account
        ),
        o.intermediate_validity,
    ));
    let listener =
        crate::util::reuseport_listener(o.listen).map_err(|source| AdmissionError::Io {
            what: format!("binding {}", o.listen),
            source,
        })?;
    let tls = serve::tls_config(&cert, &key)?;
    let policy = Arc::new(review::Policy {
        barrier_image,
        ca_pem: ca_crt,
        runtime_classes: o.runtime_classes,
    });
    info!(listen = %o.listen, "admission webhook serving");
    serve::serve(listener, tls, policy).await;
    Ok(())
}
