//! The interception CA's signer for nodes: each node daemon asks, through the API
//! server's CertificateSigningRequest API (signer `portcullis.dev/node-intermediate`),
//! for a short-lived intermediate for a key it made and keeps. The request is granted
//! only to the daemon's service account, for the node its pod-bound token names (the
//! API server records both in the request); a compromised node holds one short-lived
//! intermediate, never the interception CA's key.
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tracing::{info, warn};

use crate::tls;

pub use crate::nodeca::SIGNER;
/// The API server's extra key for the node a pod-bound service-account token names.
pub const NODE_EXTRA: &str = "authentication.kubernetes.io/node-name";

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Why a request is refused, or the node it is for.
fn judge(csr: &CertificateSigningRequest, daemon_user: &str) -> Result<String, String> {
    let spec = &csr.spec;
    if spec.username.as_deref() != Some(daemon_user) {
        return Err(format!(
            "requested by {:?}, not the node daemon ({daemon_user})",
            spec.username
        ));
    }
    spec.extra
        .as_ref()
        .and_then(|e| e.get(NODE_EXTRA))
        .and_then(|v| v.first())
        .cloned()
        .ok_or_else(|| "the requester's token names no node (not a pod-bound token)".into())
}

fn decided(csr: &CertificateSigningRequest) -> bool {
    csr.status.as_ref().is_some_and(|s| {
        s.certificate.is_some()
            || s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Denied" || c.type_ == "Failed")
    })
}

pub async fn run(
    client: Client,
    root_cert: String,
    root_key: String,
    daemon_user: String,
    validity: Duration,
) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let stream = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("spec.signerName={SIGNER}")),
    )
    .default_backoff()
    .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let pp = PatchParams::default();
    while let Some(ev) = stream.next().await {
        let csr = match ev {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "CSR watch (retrying)");
                continue;
            }
        };
        let Some(name) = csr.metadata.name.clone() else {
            continue;
        };
        if decided(&csr) {
            continue;
        }
        let verdict = judge(&csr, &daemon_user).and_then(|node| {
            let pem = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
            tls::node_intermediate(&root_cert, &root_key, &pem, &node, validity)
                .map(|c| (node, c))
                .map_err(|e| e.to_string())
        });
        let (cond, cert) = match verdict {
            Ok((node, cert)) => {
                info!(csr = %name, node = %node, "issuing a node intermediate");
                (
                    json!({"type": "Approved", "status": "True", "reason": "PortcullisNode",
                        "message": format!("node daemon of {node}")}),
                    Some(cert),
                )
            }
            Err(why) => {
                warn!(csr = %name, why = %why, "refusing a node intermediate");
                (
                    json!({"type": "Denied", "status": "True", "reason": "NotANodeDaemon", "message": why}),
                    None,
                )
            }
        };
        let approval = json!({"status": {"conditions": [cond]}});
        if let Err(e) = api
            .patch_subresource("approval", &name, &pp, &Patch::Merge(&approval))
            .await
        {
            warn!(csr = %name, error = %e, "recording the decision");
            continue;
        }
        if let Some(cert) = cert {
            let status = json!({"status": {"certificate": b64(cert.as_bytes())}});
            if let Err(e) = api.patch_status(&name, &pp, &Patch::Merge(&status)).await {
                warn!(csr = %name, error = %e, "writing the certificate");
            }
        }
    }
}
