//! The one outbound TLS client configuration: trust a CA bundle (PEM), or without one
//! the public web roots; present a client certificate if one is given.
use std::{path::Path, sync::Arc};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: {source}", path.display())]
    Pem {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate { path: std::path::PathBuf },
    #[error("{}: not a usable CA certificate: {source}", path.display())]
    BadCa {
        path: std::path::PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: no usable private key: {source}", path.display())]
    NoKey {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let pem = |source| ClientError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<_, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(ClientError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A client trusting `ca_file` (or the public web roots), presenting `identity`
/// (certificate chain file, key file) if given.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, ClientError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|source| ClientError::BadCa {
                    path: path.to_owned(),
                    source,
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let chain = read_certs(cert_file)?;
            let key =
                PrivateKeyDer::from_pem_file(key_file).map_err(|source| ClientError::NoKey {
                    path: key_file.to_owned(),
                    source,
                })?;
            builder.with_client_auth_cert(chain, key)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_named() {
        let p = std::env::temp_dir().join(format!("pc-tls-empty-{}.pem", std::process::id()));
        std::fs::write(&p, "not a certificate\n").unwrap();
        let e = client_config(Some(&p), None).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        std::fs::remove_file(&p).unwrap();
        assert!(client_config(None, None).is_ok());
    }
}
