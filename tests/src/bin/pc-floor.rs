//! pc-floor: a test-only REFERENCE proxy for `pc-lab lab-load --targets`: the daemon's
//! own stack with nothing of the gate in it. rustls + hyper/h2 toward the client, the
//! daemon's own lane connection toward the upstream (`portcullis::H2Connection`: one
//! HTTP/2 connection, rustls + h2, opened again when it closes), or hyper-util's pooled
//! client for an HTTP/1.1 upstream, on one single-threaded runtime as one of the
//! daemon's event loops. It swaps
//! the client's `Authorization` for its own bearer token and adds impersonation, as the
//! benchmark's nginx does; bodies pass through untouched: no attributes, identity,
//! policy, masking or audit. What it costs per request is the floor of the daemon's
//! HTTP and TLS stack, so a benchmark can tell the gate's own share from the stack's.
//! Prints `ready` once listening; stops when its parent kills it. Not part of the product.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The upstream's base URL, e.g. `https://10.1.2.2:6443`.
    #[arg(long)]
    upstream: String,
    /// The CA that signed the upstream's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// The bearer token sent upstream in place of the client's.
    #[arg(long)]
    token: String,
    /// HTTP/1.1 with keep-alive toward the upstream (as the benchmark's nginx) instead
    /// of HTTP/2.
    #[arg(long)]
    upstream_http1: bool,
}

type Out = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// How requests go upstream.
enum Upstream {
    /// HTTP/1.1 with keep-alive: hyper-util's pooled client.
    Pooled(Client<Connector, Incoming>),
    /// One HTTP/2 connection: the daemon's lane connection.
    Direct(portcullis::H2Connection),
}

impl Upstream {
    async fn send(&self, req: Request<Incoming>) -> Result<Response<Out>> {
        Ok(match self {
            Upstream::Pooled(client) => client
                .request(req)
                .await?
                .map(|b| b.map_err(Into::into).boxed()),
            Upstream::Direct(c) => c.send(req).await?.map(|b| b.map_err(Into::into).boxed()),
        })
    }
}

fn bad_gateway(e: &dyn std::fmt::Display) -> Response<Out> {
    let body = format!(
        r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":"upstream: {}","code":502}}"#,
        e.to_string().replace('"', "'")
    );
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // As the daemon (`init_tracing`): a subscriber at its default level. Without one,
    // hyper's and h2's spans fell back to the `log` crate's check, ~5,000 instructions
    // a request the daemon does not spend (callgrind).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(cli))
}

async fn serve(cli: Cli) -> Result<()> {
    let certs = CertificateDer::pem_file_iter(&cli.cert)
        .with_context(|| format!("reading {}", cli.cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&cli.key)
        .with_context(|| format!("reading {}", cli.key.display()))?;
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cli.ca)? {
        roots.add(c?)?;
    }
    let client_tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls)
        .https_only();
    let connector = if cli.upstream_http1 {
        b.enable_http1().wrap_connector(http)
    } else {
        b.enable_http2().wrap_connector(http)
    };
    let base = cli.upstream.trim_end_matches('/').to_string();
    let client = Arc::new(if cli.upstream_http1 {
        Upstream::Pooled(
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .build(connector),
        )
    } else {
        Upstream::Direct(portcullis::H2Connection::new(connector, base.parse()?))
    });
    let auth = HeaderValue::from_str(&format!("Bearer {}", cli.token))?;

    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    println!("ready");
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let (client, base, auth) = (client.clone(), base.clone(), auth.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let (client, auth) = (client.clone(), auth.clone());
                let uri = format!(
                    "{base}{}",
                    req.uri().path_and_query().map_or("/", |p| p.as_str())
                )
                .parse::<Uri>();
                async move {
                    let Ok(uri) = uri else {
                        return Ok::<_, hyper::Error>(bad_gateway(&"bad request target"));
                    };
                    *req.uri_mut() = uri;
                    if req.version() != http::Version::HTTP_2 {
                        // What describes an HTTP/1.1 hop cannot go on an HTTP/2
                        // stream (h2 refuses the request); HTTP/2 clients send none.
                        for n in [
                            "connection",
                            "keep-alive",
                            "proxy-connection",
                            "transfer-encoding",
                            "upgrade",
                            "te",
                        ] {
                            req.headers_mut().remove(n);
                        }
                    }
                    *req.version_mut() = http::Version::HTTP_11;
                    let h = req.headers_mut();
                    h.remove(header::HOST);
                    h.insert(header::AUTHORIZATION, auth);
                    h.insert(
                        "impersonate-user",
                        HeaderValue::from_static("portcullis:agent"),
                    );
                    h.insert(
                        "impersonate-group",
                        HeaderValue::from_static("portcullis:agents"),
                    );
                    Ok(match client.send(req).await {
                        Ok(r) => r,
                        Err(e) => bad_gateway(&e),
                    })
                }
            });
            let io = TokioIo::new(tls);
            let _ = if h2 {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(io, svc)
                    .await
            } else {
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
            };
        });
    }
}
