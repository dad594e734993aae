//! pc-standin: a test-only STAND-IN for the Kubernetes API server, for the benchmarks.
//! It serves canned responses (bodies captured from the real API server, or generated)
//! as fast as it can, so a benchmark can tell the proxy's cost from the API server's:
//!
//! - `GET <path>`: the canned body for the path (`--canned index.json`: `{"<path>":
//!   {"file": "...", "content_type": "..."}}`), else a 404 Status;
//! - `GET <collection>?watch=...`: a watch; the head at once, then one
//!   `{"type":"ADDED","object":...}` line per object POSTed to the same collection;
//! - `POST <path>` with a canned answer: that answer (201; the TokenReview the gated
//!   daemon makes, captured from the real API server for the agent's token);
//! - `POST <collection>`: the object back (201), its `ADDED` event to every watch of
//!   that collection.
//!
//! TLS with `--cert`/`--key`, HTTP/2 (at most `--max-streams` per connection; 100 is
//! what kube-apiserver 1.37 allows by default) and HTTP/1.1. Nothing is checked: no
//! authentication, no authorization, no selectors. Prints `ready` once listening;
//! stops when its parent kills it. Not part of the product.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::{
    body::{Body, Frame},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Cli {
    /// Where to listen (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The canned responses' index (see the module doc).
    #[arg(long)]
    canned: Option<PathBuf>,
    /// HTTP/2 streams per connection (kube-apiserver 1.37's default is 100).
    #[arg(long, default_value_t = 100)]
    max_streams: u32,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

type Out = BoxBody<Bytes, Infallible>;

struct Canned {
    body: Bytes,
    content_type: HeaderValue,
}

#[derive(Default)]
struct State {
    canned: HashMap<String, Canned>,
    /// Open watches per collection path.
    watches: Mutex<HashMap<String, Vec<mpsc::Sender<Bytes>>>>,
    resource_version: AtomicU64,
}

/// A watch's body: the events sent to it, as they come.
struct WatchBody(mpsc::Receiver<Bytes>);

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn load_canned(index: &PathBuf) -> Result<HashMap<String, Canned>> {
    let dir = index.parent().map(PathBuf::from).unwrap_or_default();
    let v: Value = serde_json::from_slice(
        &std::fs::read(index).with_context(|| format!("reading {}", index.display()))?,
    )?;
    let mut out = HashMap::new();
    for (path, e) in v.as_object().context("the index is a JSON object")? {
        let file = dir.join(e["file"].as_str().context("file")?);
        let body = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let ct = e["content_type"].as_str().unwrap_or("application/json");
        out.insert(
            path.clone(),
            Canned {
                body: Bytes::from(body),
                content_type: HeaderValue::from_str(ct)?,
            },
        );
    }
    Ok(out)
}

fn status(code: StatusCode, msg: &str) -> Response<Out> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": msg, "code": code.as_u16()})
    .to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn is_watch(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1" || kv == "watch")
    })
}

async fn handle(state: Arc<State>, req: http::Request<hyper::body::Incoming>) -> Response<Out> {
    let path = req.uri().path().to_owned();
    match *req.method() {
        Method::GET if is_watch(req.uri().query()) => {
            let (tx, rx) = mpsc::channel(256);
            state
                .watches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(path)
                .or_default()
                .push(tx);
            let mut r = Response::new(WatchBody(rx).boxed());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Method::GET => match state.canned.get(&path) {
            Some(c) => {
                let mut r = Response::new(Full::new(c.body.clone()).boxed());
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, c.content_type.clone());
                r
            }
            None => status(StatusCode::NOT_FOUND, &format!("stand-in: no {path}")),
        },
        // A canned POST answer (the TokenReview the gated daemon makes once per token).
        Method::POST if state.canned.contains_key(&path) => {
            let c = &state.canned[&path];
            let mut r = Response::new(Full::new(c.body.clone()).boxed());
            *r.status_mut() = StatusCode::CREATED;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, c.content_type.clone());
            r
        }
        Method::POST => {
            let body = match Limited::new(req.into_body(), 3 << 20).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return status(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            let mut obj: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            let rv = state.resource_version.fetch_add(1, Ordering::Relaxed) + 1;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{rv:012}"));
            let mut line = json!({"type": "ADDED", "object": &obj}).to_string();
            line.push('\n');
            let line = Bytes::from(line);
            if let Some(list) = state
                .watches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&path)
            {
                // A watch whose client left is dropped; a full one misses this event
                // (the benchmark counts what arrives).
                list.retain(|tx| match tx.try_send(line.clone()) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
            }
            let mut r = Response::new(Full::new(Bytes::from(obj.to_string())).boxed());
            *r.status_mut() = StatusCode::CREATED;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "stand-in: GET and POST only",
        ),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&cli.cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&cli.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let state = Arc::new(State {
        canned: match &cli.canned {
            Some(p) => load_canned(p)?,
            None => HashMap::new(),
        },
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for a in &cli.listen {
            listeners.push(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding {a}"))?,
            );
        }
        println!("ready");
        let max_streams = cli.max_streams;
        let mut tasks = Vec::new();
        for l in listeners {
            let (acceptor, state) = (acceptor.clone(), state.clone());
            tasks.push(tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    let _ = s.set_nodelay(true);
                    let (acceptor, state) = (acceptor.clone(), state.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(s).await else {
                            return;
                        };
                        let svc = service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(state, req).await) }
                        });
                        let mut b =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        b.http2().max_concurrent_streams(max_streams);
                        let _ = b.serve_connection(TokioIo::new(tls), svc).await;
                    });
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        Ok(())
    })
}
