//! pc-load: the load generator behind `cargo xtask bench proxy|watches`. HTTP/2 over
//! `--connections` connections (one, as client-go uses, unless told), bounded in
//! requests and in time; prints one JSON line of results.
//!
//! - `get`: closed loop (`--concurrency` requests in flight), a fixed count;
//! - `rate`: open loop at a fixed rate, each request's latency counted from the time
//!   it was MEANT to be sent (a slow answer does not delay the next request, so there
//!   is no coordinated omission);
//! - `watch`: watches on a collection; each event's delivery latency is counted from
//!   the wall-clock stamp its creator put in the object (`data.sent`, microseconds
//!   modulo 10^9: every process on this machine shares the clock);
//! - `create`: ConfigMaps stamped so, at a fixed rate (the events of `watch`);
//! - `invoke`: a command run N times (e.g. kubectl), wall time of each.
//!
//! With `--go` it prints `{"ready":...}` once connected and warmed up, waits for a line
//! on stdin, measures, prints the results, then waits for stdin to close: the caller
//! reads the processes' CPU time around exactly the measured part.
//! Test-only: nothing here is part of the product.
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value = "")]
    url: String,
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    token: Option<String>,
    /// Extra header NAME:VALUE (repeatable), e.g. impersonation for the direct baseline.
    #[arg(long)]
    header: Vec<String>,
    /// HTTP/2 connections; requests and watches are spread over them in turn.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Bound on the measured part.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
    /// Report ready, wait for a line on stdin, measure, then wait for stdin to close.
    #[arg(long)]
    go: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Clone)]
enum Mode {
    /// Closed loop: `count` GETs of `path`, `concurrency` in flight; latency until the
    /// whole body is read.
    Get {
        #[arg(long)]
        path: String,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 4)]
        concurrency: u32,
        #[arg(long, default_value_t = 10)]
        warmup: u32,
    },
    /// Open loop: `count` GETs at `rate` per second; latency from each request's
    /// intended send time until its whole body is read.
    Rate {
        #[arg(long)]
        path: String,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        warmup: u32,
    },
    /// `watchers` watches of `path`; each waits for `events` ADDED events of objects
    /// labelled `bench=<tag>`.
    Watch {
        #[arg(long)]
        path: String,
        #[arg(long)]
        watchers: usize,
        #[arg(long)]
        events: usize,
        #[arg(long)]
        tag: String,
        /// Ready once every watch has its response head, or after this long (a proxy
        /// may hold a watch's head until its first event).
        #[arg(long, default_value_t = 3000)]
        settle_ms: u64,
    },
    /// `count` ConfigMaps labelled `bench=<tag>`, POSTed to `path` at `rate` per second.
    Create {
        #[arg(long)]
        path: String,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        tag: String,
    },
    /// Runs the command after `--` `count` times, one after another (`{i}` in an
    /// argument becomes the run's number).
    Invoke {
        #[arg(long)]
        count: u32,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
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

/// One client per connection: each keeps its own single HTTP/2 connection.
fn clients(cli: &Cli) -> Result<Vec<C>> {
    let ca = cli.ca.as_ref().context("--ca is required")?;
    (0..cli.connections.max(1)).map(|_| client(ca)).collect()
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

/// p50, p90, p99, max of microsecond samples.
fn percentiles(mut v: Vec<u64>) -> Value {
    if v.is_empty() {
        return json!({"p50_us": 0, "p90_us": 0, "p99_us": 0, "max_us": 0});
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    json!({"p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99), "max_us": v[v.len() - 1]})
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
    a
}

/// Wall-clock microseconds modulo 10^9 (nine digits: never mistaken for a card number
/// by the gate's detectors; wraps every 16 minutes, which `since` accounts for).
fn stamp() -> u64 {
    (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
        % 1_000_000_000) as u64
}

/// The creator's stamp in an `ADDED` event of an object labelled so (found by bytes:
/// a full JSON parse per event would make the client the bottleneck at 10,000 watches).
fn event_stamp(line: &[u8], label: &str) -> Option<u64> {
    let find = |needle: &[u8]| line.windows(needle.len()).position(|w| w == needle);
    find(br#""type":"ADDED""#)?;
    find(label.as_bytes())?;
    let key = br#""sent":""#;
    let at = find(key)? + key.len();
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// One GET: (latency from `from`, body bytes) or why it failed.
async fn get_once(cli: &Cli, c: &C, path: &str, from: Instant) -> Result<(u64, usize), String> {
    let req = request(cli, "GET", path, None).map_err(|e| e.to_string())?;
    match c.request(req).await {
        Ok(resp) if resp.status().is_success() => {
            let b = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((from.elapsed().as_micros() as u64, b.len()))
        }
        Ok(resp) => {
            let st = resp.status();
            let b = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Err(format!(
                "{st}: {}",
                String::from_utf8_lossy(&b)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))
        }
        Err(e) => Err(format!("{e:?}")),
    }
}

/// Sends `n` requests on every connection, so connections and TLS are set up and the
/// far side is warm before measuring.
async fn warm(cli: &Cli, cs: &[C], path: &str, n: u32) -> Result<()> {
    for c in cs {
        for _ in 0..n.max(1) {
            get_once(cli, c, path, Instant::now())
                .await
                .map_err(|e| anyhow::anyhow!("warm-up GET {path}: {e}"))?;
        }
    }
    Ok(())
}

struct Tally {
    lat: Vec<u64>,
    bytes: u64,
    errors: u32,
    why: Vec<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            lat: Vec::new(),
            bytes: 0,
            errors: 0,
            why: Vec::new(),
        }
    }
    fn add(&mut self, r: Result<(u64, usize), String>) {
        match r {
            Ok((us, b)) => {
                self.lat.push(us);
                self.bytes += b as u64;
            }
            Err(e) => {
                self.errors += 1;
                if self.why.len() < 3 {
                    self.why.push(e);
                }
            }
        }
    }
    fn report(self, secs: f64) -> Value {
        let n = self.lat.len();
        merge(
            json!({"requests": n, "errors": self.errors, "first_errors": self.why,
                "rps": n as f64 / secs, "elapsed_s": secs,
                "bytes_per_response": if n > 0 { self.bytes / n as u64 } else { 0 }}),
            percentiles(self.lat),
        )
    }
}

async fn closed_loop(
    cli: Arc<Cli>,
    cs: Arc<Vec<C>>,
    path: String,
    count: u32,
    concurrency: u32,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(cli.max_secs);
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency as usize {
        let (cli, cs, next, path) = (cli.clone(), cs.clone(), next.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let c = &cs[w % cs.len()];
            let mut t = Tally::new();
            while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                t.add(get_once(&cli, c, &path, Instant::now()).await);
            }
            t
        }));
    }
    let mut all = Tally::new();
    for t in tasks {
        let t = t.await?;
        all.lat.extend(t.lat);
        all.bytes += t.bytes;
        all.errors += t.errors;
        all.why.extend(t.why);
    }
    all.why.truncate(3);
    Ok(all.report(t0.elapsed().as_secs_f64()))
}

async fn open_loop(
    cli: Arc<Cli>,
    cs: Arc<Vec<C>>,
    path: String,
    count: u32,
    rate: f64,
) -> Result<Value> {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let t0 = Instant::now() + Duration::from_millis(5);
    let deadline = t0 + Duration::from_secs(cli.max_secs);
    let mut tasks = Vec::with_capacity(count as usize);
    let mut late_max = Duration::ZERO;
    for i in 0..count {
        let at = t0 + period * i;
        if at > deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        late_max = late_max.max(at.elapsed());
        let (cli, cs, path) = (cli.clone(), cs.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let c = &cs[i as usize % cs.len()];
            get_once(&cli, c, &path, at).await
        }));
    }
    let mut all = Tally::new();
    for t in tasks {
        all.add(t.await?);
    }
    let mut v = all.report(t0.elapsed().as_secs_f64());
    v["rate"] = json!(rate);
    v["sender_late_max_us"] = json!(late_max.as_micros() as u64);
    Ok(v)
}

/// Watches: returns (ready report, the handles that finish with each watch's
/// latencies).
#[allow(clippy::type_complexity)]
async fn watches(
    cli: &Arc<Cli>,
    cs: &Arc<Vec<C>>,
    path: &str,
    watchers: usize,
    events: usize,
    tag: &str,
    settle: Duration,
) -> Result<(
    Value,
    Vec<tokio::task::JoinHandle<Result<Vec<u64>, String>>>,
)> {
    let deadline = Instant::now() + Duration::from_secs(cli.max_secs);
    let sep = if path.contains('?') { '&' } else { '?' };
    let watch_path = format!("{path}{sep}watch=true&labelSelector=bench%3D{tag}");
    let heads = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(watchers);
    for i in 0..watchers {
        let req = request(cli, "GET", &watch_path, None)?;
        let (cs, heads, tag) = (cs.clone(), heads.clone(), tag.to_string());
        handles.push(tokio::spawn(async move {
            let c = &cs[i % cs.len()];
            let resp = match tokio::time::timeout_at(deadline.into(), c.request(req)).await {
                Ok(Ok(r)) if r.status().is_success() => r,
                Ok(Ok(r)) => return Err(format!("watch answered {}", r.status())),
                Ok(Err(e)) => return Err(format!("watch: {e:?}")),
                Err(_) => return Err("watch: no response head before the deadline".into()),
            };
            heads.fetch_add(1, Ordering::Relaxed);
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            let mut lat = Vec::with_capacity(events);
            let label = format!("\"bench\":\"{tag}\"");
            while lat.len() < events {
                let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
                    Ok(Some(Ok(f))) => f,
                    _ => break,
                };
                // Stamped on arrival, before any parsing: the client's own work does
                // not count.
                let now = stamp();
                if let Ok(d) = frame.into_data() {
                    buf.extend_from_slice(&d);
                }
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if let Some(sent) = event_stamp(&line, &label) {
                        lat.push((now + 1_000_000_000 - sent) % 1_000_000_000);
                    }
                }
            }
            Ok(lat)
        }));
    }
    let settle_by = Instant::now() + settle;
    while heads.load(Ordering::Relaxed) < watchers && Instant::now() < settle_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let established = heads.load(Ordering::Relaxed);
    Ok((
        json!({"ready": true, "watches": watchers, "heads": established,
            "establish_ms": t0.elapsed().as_millis() as u64}),
        handles,
    ))
}

async fn finish_watches(
    handles: Vec<tokio::task::JoinHandle<Result<Vec<u64>, String>>>,
    watchers: usize,
    events: usize,
) -> Result<Value> {
    let mut lat = Vec::new();
    let mut failed = Vec::new();
    for h in handles {
        match h.await? {
            Ok(l) => lat.extend(l),
            Err(e) => failed.push(e),
        }
    }
    let expected = watchers * events;
    let n = lat.len();
    failed.truncate(3);
    Ok(merge(
        json!({"events": n, "expected": expected, "missing": expected - n.min(expected),
            "failed_watches": failed}),
        percentiles(lat),
    ))
}

async fn create(cli: Arc<Cli>, c: C, path: String, count: u32, rate: f64, tag: String) -> Value {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(cli.max_secs);
    let mut tasks = Vec::new();
    for i in 0..count {
        let at = t0 + period * i;
        if at > deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let (cli, c, path, tag) = (cli.clone(), c.clone(), path.clone(), tag.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("bench-{tag}-{i}"), "labels": {"bench": tag}},
                "data": {"sent": stamp().to_string()}});
            let req =
                request(&cli, "POST", &path, Some(body.to_string())).map_err(|e| e.to_string())?;
            let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
            let st = resp.status();
            let _ = resp.into_body().collect().await;
            if st.is_success() {
                Ok(())
            } else {
                Err(format!("create: {st}"))
            }
        }));
    }
    let (mut ok, mut why) = (0u32, Vec::new());
    for t in tasks {
        match t.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => why.push(e),
            Err(e) => why.push(e.to_string()),
        }
    }
    let errors = why.len();
    why.truncate(3);
    json!({"created": ok, "errors": errors, "first_errors": why})
}

async fn invoke(count: u32, argv: &[String], max_secs: u64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let mut wall = Vec::new();
    let mut why: Vec<String> = Vec::new();
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let args: Vec<String> = argv
            .iter()
            .map(|a| a.replace("{i}", &i.to_string()))
            .collect();
        let t = Instant::now();
        let out = tokio::process::Command::new(&args[0])
            .args(&args[1..])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", args[0]))?;
        if out.status.success() {
            wall.push(t.elapsed().as_micros() as u64);
        } else if why.len() < 3 {
            why.push(
                String::from_utf8_lossy(&out.stderr)
                    .chars()
                    .take(300)
                    .collect(),
            );
        }
    }
    let n = wall.len();
    let mean = if n > 0 {
        wall.iter().sum::<u64>() / n as u64
    } else {
        0
    };
    Ok(merge(
        json!({"runs": n, "errors": count as usize - n, "first_errors": why, "mean_us": mean}),
        percentiles(wall),
    ))
}

async fn line(stdin: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>) -> Result<()> {
    stdin.next_line().await?;
    Ok(())
}

async fn run(cli: Arc<Cli>) -> Result<Value> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let go = cli.go;
    // Set up (not measured), then `ready`, then measure.
    let ready = |v: Value| {
        if go {
            println!("{v}");
        }
    };
    let result = match cli.mode.clone() {
        Mode::Get {
            path,
            count,
            concurrency,
            warmup,
        } => {
            let cs = Arc::new(clients(&cli)?);
            warm(&cli, &cs, &path, warmup).await?;
            ready(json!({"ready": true}));
            if go {
                line(&mut stdin).await?;
            }
            closed_loop(cli.clone(), cs, path, count, concurrency).await?
        }
        Mode::Rate {
            path,
            count,
            rate,
            warmup,
        } => {
            let cs = Arc::new(clients(&cli)?);
            warm(&cli, &cs, &path, warmup).await?;
            ready(json!({"ready": true}));
            if go {
                line(&mut stdin).await?;
            }
            open_loop(cli.clone(), cs, path, count, rate).await?
        }
        Mode::Watch {
            path,
            watchers,
            events,
            tag,
            settle_ms,
        } => {
            let cs = Arc::new(clients(&cli)?);
            let settle = Duration::from_millis(settle_ms);
            let (r, handles) = watches(&cli, &cs, &path, watchers, events, &tag, settle).await?;
            let heads = r["heads"].clone();
            let establish = r["establish_ms"].clone();
            ready(r);
            if go {
                line(&mut stdin).await?;
            }
            let mut v = finish_watches(handles, watchers, events).await?;
            v["heads"] = heads;
            v["establish_ms"] = establish;
            v
        }
        Mode::Create {
            path,
            count,
            rate,
            tag,
        } => {
            let c = clients(&cli)?.remove(0);
            ready(json!({"ready": true}));
            if go {
                line(&mut stdin).await?;
            }
            create(cli.clone(), c, path, count, rate, tag).await
        }
        Mode::Invoke { count, argv } => {
            ready(json!({"ready": true}));
            if go {
                line(&mut stdin).await?;
            }
            invoke(count, &argv, cli.max_secs).await?
        }
    };
    println!("{result}");
    if go {
        // Stay until the caller has read what it measures around us.
        while stdin.next_line().await?.is_some() {}
    }
    Ok(result)
}

fn main() -> Result<()> {
    let cli = Arc::new(Cli::parse());
    if cli.url.is_empty() && !matches!(cli.mode, Mode::Invoke { .. }) {
        bail!("--url is required");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cli)).map(drop)
}
