//! pc-load: the load generator behind `cargo xtask bench proxy`. One HTTP/2 connection
//! (as client-go uses), bounded in requests and in time; prints one JSON line.
//! Test-only: nothing here is part of the product.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::json;

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Repeated GETs of `path`; latency = until the whole body is read.
    Get,
    /// `watchers` watches on `path`; then `count` creates of labelled ConfigMaps;
    /// latency = from the create to each watcher seeing its ADDED event.
    Watch,
}

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    url: String,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    token: Option<String>,
    /// Extra header NAME:VALUE (repeatable), e.g. impersonation for the direct baseline.
    #[arg(long)]
    header: Vec<String>,
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    path: String,
    #[arg(long, default_value_t = 1000)]
    count: u32,
    #[arg(long, default_value_t = 8)]
    concurrency: u32,
    #[arg(long, default_value_t = 20)]
    watchers: u32,
    #[arg(long, default_value_t = 30)]
    max_secs: u64,
    /// Tag for object names (watch mode), so rounds do not collide.
    #[arg(long, default_value = "w")]
    tag: String,
}

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;
type C = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

fn client(ca: &PathBuf) -> Result<C> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_adaptive_window(true)
        .build(conn))
}

fn request(
    cli: &Cli,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<http::Request<Body>> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", cli.url))
        .header("accept", "application/json");
    if let Some(t) = &cli.token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    for h in &cli.header {
        let (n, v) = h.split_once(':').context("--header NAME:VALUE")?;
        b = b.header(n.trim(), v.trim());
    }
    let body: Body = match body {
        Some(s) => {
            b = b.header("content-type", "application/json");
            Full::new(Bytes::from(s)).map_err(|n| match n {}).boxed()
        }
        None => Empty::new().map_err(|n| match n {}).boxed(),
    };
    Ok(b.body(body)?)
}

fn percentiles(mut v: Vec<Duration>) -> (u64, u64) {
    if v.is_empty() {
        return (0, 0);
    }
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_micros() as u64;
    (at(0.5), at(0.99))
}

async fn get(cli: Arc<Cli>, c: C) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(cli.max_secs);
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cli.concurrency {
        let (cli, c, next) = (cli.clone(), c.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut errors, mut bytes) = (0u32, 0u64);
            let mut why: Vec<String> = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < cli.count
                && Instant::now() < deadline
            {
                let t = Instant::now();
                let req = request(&cli, "GET", &cli.path, None)?;
                match c.request(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        let b = resp.into_body().collect().await?.to_bytes();
                        bytes += b.len() as u64;
                        lat.push(t.elapsed());
                    }
                    Ok(resp) => {
                        errors += 1;
                        let st = resp.status();
                        let b = resp.into_body().collect().await?.to_bytes();
                        why.push(format!(
                            "{st}: {}",
                            String::from_utf8_lossy(&b)
                                .chars()
                                .take(200)
                                .collect::<String>()
                        ));
                    }
                    Err(e) => {
                        errors += 1;
                        why.push(format!("{e:?}"));
                    }
                }
            }
            Ok::<_, anyhow::Error>((lat, errors, bytes, why))
        }));
    }
    let (mut lat, mut errors, mut bytes, mut whys) = (Vec::new(), 0, 0, Vec::new());
    for t in tasks {
        let (l, e, b, w) = t.await??;
        lat.extend(l);
        errors += e;
        bytes += b;
        whys.extend(w);
    }
    whys.truncate(3);
    let secs = t0.elapsed().as_secs_f64();
    let n = lat.len();
    let (p50, p99) = percentiles(lat);
    Ok(
        json!({"requests": n, "errors": errors, "first_errors": whys, "p50_us": p50, "p99_us": p99,
              "rps": n as f64 / secs, "bytes_per_response": if n > 0 { bytes / n as u64 } else { 0 }}),
    )
}

async fn watch(cli: Arc<Cli>, c: C) -> Result<serde_json::Value> {
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(cli.max_secs);
    let watch_path = format!("{}?watch=true&labelSelector=bench%3D{}", cli.path, cli.tag);
    let mut watchers = Vec::new();
    // Each watcher awaits its own response head: a proxy may hold the head back until
    // the first event (nginx over HTTP/2 does), so waiting for every head before the
    // first create would deadlock.
    for _ in 0..cli.watchers {
        let req = request(&cli, "GET", &watch_path, None)?;
        let (created, want, c) = (created.clone(), cli.count as usize, c.clone());
        watchers.push(tokio::spawn(async move {
            let resp = match tokio::time::timeout_at(deadline.into(), c.request(req)).await {
                Ok(Ok(r)) if r.status().is_success() => r,
                Ok(Ok(r)) => return Err(format!("watch answered {}", r.status())),
                Ok(Err(e)) => return Err(format!("watch: {e}")),
                Err(_) => return Err("watch: no response head before the deadline".into()),
            };
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            let mut lat = Vec::new();
            while lat.len() < want && Instant::now() < deadline {
                let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
                    Ok(Some(Ok(f))) => f,
                    _ => break,
                };
                if let Ok(d) = frame.into_data() {
                    buf.extend_from_slice(&d);
                }
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let now = Instant::now();
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line)
                        && v["type"] == "ADDED"
                        && let Some(name) = v["object"]["metadata"]["name"].as_str()
                        && let Some(t) = created.lock().unwrap().get(name)
                    {
                        lat.push(now - *t);
                    }
                }
            }
            Ok(lat)
        }));
    }
    // Let every watch be established upstream before the first event.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t0 = Instant::now();
    for i in 0..cli.count {
        if Instant::now() > deadline {
            break;
        }
        let name = format!("bench-{}-{i}", cli.tag);
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"bench": cli.tag}}, "data": {"i": i.to_string()}});
        created.lock().unwrap().insert(name.clone(), Instant::now());
        let resp = c
            .request(request(&cli, "POST", &cli.path, Some(body.to_string()))?)
            .await?;
        let st = resp.status();
        resp.into_body().collect().await?;
        if !st.is_success() {
            bail!("create {name}: {st}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut lat = Vec::new();
    let mut watch_errors = Vec::new();
    for w in watchers {
        match w.await? {
            Ok(l) => lat.extend(l),
            Err(e) => watch_errors.push(e),
        }
    }
    if let Some(e) = watch_errors.first() {
        bail!(
            "{} of {} watches failed, first: {e}",
            watch_errors.len(),
            cli.watchers
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    let expected = cli.count as usize * cli.watchers as usize;
    let n = lat.len();
    let (p50, p99) = percentiles(lat);
    Ok(
        json!({"events": n, "expected": expected, "missing": expected - n.min(expected),
              "p50_us": p50, "p99_us": p99, "rps": n as f64 / secs}),
    )
}

fn main() -> Result<()> {
    let cli = Arc::new(Cli::parse());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let v = rt.block_on(async {
        let c = client(&cli.ca)?;
        match cli.mode {
            Mode::Get => get(cli.clone(), c).await,
            Mode::Watch => watch(cli.clone(), c).await,
        }
    })?;
    println!("{v}");
    Ok(())
}
