//! Outbound HTTPS for the daemon's side calls (OIDC discovery and JWKS, approval
//! webhooks): rustls with the configured CA or the public web roots, bounded bodies,
//! timeouts on every call.
use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("reading CA file {path}: {why}")]
    Ca { path: String, why: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("`{0}` is not a valid URL")]
    Url(String),
    #[error("{url}: {why}")]
    Request { url: String, why: String },
    #[error("{url}: answered {code}")]
    Status { url: String, code: StatusCode },
    #[error("{url}: no answer within {secs} s")]
    Timeout { url: String, secs: u64 },
}

/// A client trusting `ca_file` (PEM bundle) or, without it, the public web roots.
/// `allow_http`: plain http:// too (webhooks inside the cluster network).
pub fn client(ca_file: Option<&Path>, allow_http: bool) -> Result<HttpClient, HttpError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let ca_err = |why: String| HttpError::Ca {
                path: p.display().to_string(),
                why,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no PEM certificate in it".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| ca_err(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let b = if allow_http {
        b.https_or_http()
    } else {
        b.https_only()
    };
    Ok(Client::builder(TokioExecutor::new()).build(b.enable_http1().wrap_connector(http)))
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// GET `url`, expecting 2xx, body at most `limit` bytes.
pub async fn get(c: &HttpClient, url: &str, limit: usize) -> Result<Bytes, HttpError> {
    let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.into()))?;
    let req = Request::get(uri)
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| HttpError::Request {
            url: url.into(),
            why: e.to_string(),
        })?;
    send(c, url, req, limit).await
}

/// POST a JSON body to `url`, expecting 2xx.
pub async fn post_json(c: &HttpClient, url: &str, body: Vec<u8>) -> Result<Bytes, HttpError> {
    let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.into()))?;
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| HttpError::Request {
            url: url.into(),
            why: e.to_string(),
        })?;
    send(c, url, req, 64 * 1024).await
}

async fn send(
    c: &HttpClient,
    url: &str,
    req: Request<Full<Bytes>>,
    limit: usize,
) -> Result<Bytes, HttpError> {
    let call = async {
        let resp = c.request(req).await.map_err(|e| HttpError::Request {
            url: url.into(),
            why: crate::util::source_chain(&e),
        })?;
        let code = resp.status();
        if !code.is_success() {
            return Err(HttpError::Status {
                url: url.into(),
                code,
            });
        }
        Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| HttpError::Request {
                url: url.into(),
                why: format!("reading the body: {e}"),
            })
    };
    tokio::time::timeout(TIMEOUT, call)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.into(),
            secs: TIMEOUT.as_secs(),
        })?
}
