//! The webhook's HTTPS server: POST /mutate and /validate (AdmissionReview v1),
//! GET /healthz. Bodies are bounded; every review is answered or refused with 400.
use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::review::{Policy, answer};
use crate::util;

/// AdmissionReviews carry one object; the API server's own limit is 3 MiB.
const MAX_BODY: usize = 4 << 20;
const HANDSHAKE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the webhook's serving certificate: {0}")]
    Cert(String),
}

/// A server configuration for the webhook's certificate chain and key (PEM).
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, ServeError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Cert(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ServeError::Cert(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| ServeError::Cert(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn reply(code: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    r
}

async fn handle(policy: Arc<Policy>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, b"{\"ok\":true}".to_vec()),
        (&Method::POST, "/mutate" | "/validate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        format!("{{\"error\":\"{e}\"}}").into_bytes(),
                    );
                }
            };
            match answer(&path, &body, &policy) {
                Ok(v) => {
                    let r = &v["response"];
                    if r["allowed"] == false {
                        info!(path, message = %r["status"]["message"], "admission refused");
                    } else if r.get("patch").is_some() {
                        debug!(path, "admission patched");
                    }
                    reply(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default())
                }
                Err(e) => {
                    warn!(error = %e, "bad admission review");
                    reply(
                        StatusCode::BAD_REQUEST,
                        serde_json::to_vec(&serde_json::json!({"error": e.to_string()}))
                            .unwrap_or_default(),
                    )
                }
            }
        }
        _ => reply(StatusCode::NOT_FOUND, b"{}".to_vec()),
    }
}

pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, policy: Arc<Policy>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = util::next_connection("webhook", || listener.accept()).await;
        let (acceptor, policy) = (acceptor.clone(), policy.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = service_fn(move |req| {
                let policy = policy.clone();
                async move { Ok::<_, Infallible>(handle(policy, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE)
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                debug!(error = %e, "webhook connection ended");
            }
        });
    }
}
