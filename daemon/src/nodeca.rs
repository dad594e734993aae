//! This node's intermediate CA: a key made here (it never leaves the node) and a
//! short-lived certificate for it from the cluster's interception CA, requested
//! through the API server (CertificateSigningRequest, signer
//! `portcullis.dev/node-intermediate`, granted by the webhook Deployment, which alone
//! holds the interception CA's key). Renewed at half its lifetime; the gate's leaves
//! are minted from it, and agents verify them up to the interception CA.
use std::{path::Path, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tracing::info;

use crate::tls::{self, CaPaths};

pub const SIGNER: &str = "portcullis.dev/node-intermediate";

#[derive(Debug, thiserror::Error)]
pub enum NodeCaError {
    #[error("the API client: {0}")]
    Client(#[source] kube::Error),
    #[error("requesting the node intermediate: {0}")]
    Api(#[source] kube::Error),
    #[error(transparent)]
    Issue(#[from] tls::IssueError),
    #[error("the node intermediate request {0} was denied: {1}")]
    Denied(String, String),
    #[error("no node intermediate after {0:?} (is the webhook Deployment running?)")]
    Timeout(Duration),
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Requests an intermediate for a new key and writes both to `paths` (key 0600).
pub async fn obtain(
    client: &Client,
    node: &str,
    validity: Duration,
    paths: &CaPaths,
    wait: Duration,
) -> Result<(), NodeCaError> {
    let (key_pem, csr_pem) = tls::node_request(node)?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("portcullis-node-{node}-")),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "portcullis".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: SIGNER.into(),
            expiration_seconds: i32::try_from(validity.as_secs()).ok(),
            usages: Some(vec!["cert sign".into(), "crl sign".into()]),
            ..Default::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &csr)
        .await
        .map_err(NodeCaError::Api)?;
    let name = created.metadata.name.clone().unwrap_or_default();
    let stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let got = tokio::time::timeout(wait, async {
        while let Some(Ok(c)) = stream.next().await {
            let Some(st) = &c.status else { continue };
            if let Some(d) = st.conditions.iter().flatten().find(|c| c.type_ == "Denied") {
                return Err(NodeCaError::Denied(
                    name.clone(),
                    d.message.clone().unwrap_or_default(),
                ));
            }
            if let Some(cert) = &st.certificate {
                return Ok(String::from_utf8_lossy(&cert.0).into_owned());
            }
        }
        Err(NodeCaError::Timeout(wait))
    })
    .await
    .map_err(|_| NodeCaError::Timeout(wait))??;
    std::fs::create_dir_all(&paths.dir).map_err(|source| NodeCaError::Write {
        path: paths.dir.clone(),
        source,
    })?;
    write(&paths.key(), key_pem.as_bytes(), 0o600)?;
    write(&paths.cert(), got.as_bytes(), 0o644)?;
    info!(csr = %name, node, "node intermediate issued");
    Ok(())
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), NodeCaError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let werr = |source| NodeCaError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(data).map_err(werr)?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

/// Renews the intermediate at half its lifetime (retrying every 30 s until it is
/// renewed) and reloads the minter.
pub async fn renew(
    client: Client,
    node: String,
    validity: Duration,
    paths: CaPaths,
    minter: std::sync::Arc<tls::LeafMinter>,
) {
    loop {
        tokio::time::sleep(validity / 2).await;
        loop {
            match obtain(&client, &node, validity, &paths, Duration::from_secs(60)).await {
                Ok(()) => {
                    match minter.reload(&paths) {
                        Ok(()) => info!("node intermediate renewed"),
                        Err(e) => {
                            tracing::warn!(error = %e, "reloading the renewed node intermediate")
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the node intermediate (retrying in 30 s)");
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        }
    }
}

/// The client for the CA requests.
pub fn client(kcfg: kube::Config) -> Result<Client, NodeCaError> {
    Client::try_from(kcfg).map_err(NodeCaError::Client)
}
