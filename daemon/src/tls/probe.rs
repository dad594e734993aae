//! Is this connection answered by the gate? A TLS handshake that trusts only the
//! interception CA succeeds exactly when the kernel redirected the connect to the
//! daemon: the real API server cannot present a certificate from that CA. The agent
//! pod's first init container (`portcullis barrier`) waits for this, so nothing else
//! in the pod runs before its cgroup is enrolled.
use std::{sync::Arc, time::Duration};

use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the interception CA: {0}")]
    Ca(String),
    #[error("connect {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect {addr}: timed out")]
    Timeout { addr: String },
    /// The handshake failed: typically the real API server's certificate, which the
    /// interception CA did not sign (the pod is not enrolled yet).
    #[error("TLS with {addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A client that trusts only the CA certificates in `pem`.
pub fn only_ca(pem: &str) -> Result<Arc<ClientConfig>, ProbeError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| ProbeError::Ca(e.to_string()))?;
        roots.add(c).map_err(|e| ProbeError::Ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ProbeError::Ca("no PEM certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProbeError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// One attempt: connect to `addr` and finish a handshake for `name` trusting `cfg`.
pub async fn answered_by_gate(
    cfg: Arc<ClientConfig>,
    addr: &str,
    name: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let a = addr.to_string();
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ProbeError::Connect {
                addr: a.clone(),
                source,
            })?;
        let server = ServerName::try_from(name.to_string())
            .map_err(|e| ProbeError::Ca(format!("server name {name}: {e}")))?;
        tokio_rustls::TlsConnector::from(cfg)
            .connect(server, tcp)
            .await
            .map(drop)
            .map_err(|source| ProbeError::Handshake {
                addr: a.clone(),
                source,
            })
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ProbeError::Timeout { addr: a.clone() })?
}
