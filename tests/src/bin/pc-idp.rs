//! Test-only OIDC identity provider and webhook receiver (see portcullis_tests::idp):
//! `pc-idp --dir D --listen ADDR --cert C --key K --issuer URL`. Serves the discovery
//! document, the JWKS file (reread per request) and POST /webhook (appended to
//! D/webhook.jsonl), and POST /audit-sink (a test-only audit collector, see below).
//! Stops when its parent test kills it.
use std::{convert::Infallible, io::Write, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    listen: std::net::SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    issuer: String,
}

fn main() -> Result<()> {
    let cli = Arc::new(Cli::parse());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&cli.cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&cli.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(cli.listen)
            .await
            .with_context(|| format!("binding {}", cli.listen))?;
        println!("pc-idp listening on {}", cli.listen);
        loop {
            let (s, _) = l.accept().await?;
            let (acceptor, cli) = (acceptor.clone(), cli.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let cli = cli.clone();
                    async move {
                        let (code, body) = match (req.method(), req.uri().path()) {
                            (&Method::GET, "/.well-known/openid-configuration") => (
                                StatusCode::OK,
                                serde_json::json!({"issuer": cli.issuer,
                                    "jwks_uri": format!("{}/jwks", cli.issuer)})
                                .to_string(),
                            ),
                            (&Method::GET, "/jwks") => {
                                match std::fs::read_to_string(cli.dir.join("jwks.json")) {
                                    Ok(t) => (StatusCode::OK, t),
                                    Err(_) => (StatusCode::NOT_FOUND, "{}".into()),
                                }
                            }
                            (&Method::POST, "/webhook") => {
                                let b = Limited::new(req.into_body(), 1 << 20)
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let line = String::from_utf8_lossy(&b).replace('\n', " ");
                                if let Ok(mut f) = std::fs::OpenOptions::new()
                                    .create(true)
                                    .append(true)
                                    .open(cli.dir.join("webhook.jsonl"))
                                {
                                    let _ = writeln!(f, "{line}");
                                }
                                (StatusCode::OK, "{}".into())
                            }
                            // Test-only audit collector: each batch (a JSON array of
                            // chained records) becomes one line of D/sink.jsonl; while
                            // D/sink.down exists it answers 503 (the sink is "down").
                            (&Method::POST, "/audit-sink") => {
                                if cli.dir.join("sink.down").exists() {
                                    (StatusCode::SERVICE_UNAVAILABLE, "{}".into())
                                } else {
                                    let b = Limited::new(req.into_body(), 64 << 20)
                                        .collect()
                                        .await
                                        .map(|b| b.to_bytes())
                                        .unwrap_or_default();
                                    let line = String::from_utf8_lossy(&b).replace('\n', " ");
                                    match std::fs::OpenOptions::new()
                                        .create(true)
                                        .append(true)
                                        .open(cli.dir.join("sink.jsonl"))
                                        .and_then(|mut f| writeln!(f, "{line}"))
                                    {
                                        Ok(()) => (StatusCode::OK, "{}".into()),
                                        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "{}".into()),
                                    }
                                }
                            }
                            _ => (StatusCode::NOT_FOUND, "{}".into()),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = code;
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    })
}
