//! pc-abuse: hostile HTTP clients for the e2e tier, run as an agent so the kernel
//! redirects them to the daemon. Each run makes one attempt and prints one JSON line.
//! Test-only: nothing here is part of the product.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    /// CA that signs the daemon's leaf certificates.
    #[arg(long)]
    ca: PathBuf,
    /// TLS server name to ask for.
    #[arg(long, default_value = "kubernetes.default.svc")]
    sni: String,
    /// Bearer token sent with the requests (the gate authenticates before forwarding).
    #[arg(long)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum H1 {
    /// Not HTTP at all.
    Garbage,
    /// Content-Length and Transfer-Encoding together, a second request hidden in the body.
    Smuggle,
    /// Two different Content-Length values.
    DuplicateLength,
    /// A 100 KiB header.
    HugeHeader,
    /// Headers trickled one byte per 500 ms.
    SlowHeaders,
}

#[derive(Subcommand)]
enum Cmd {
    /// One hostile HTTP/1.1 exchange; reports the status line and whether the server
    /// closed the connection.
    H1 { kind: H1, addr: SocketAddr },
    /// HTTP/2 streams opened and cancelled at once, as fast as possible.
    RapidReset {
        addr: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        count: u32,
        /// Wait this long between opening a stream and cancelling it (0: at once).
        #[arg(long, default_value_t = 0)]
        pace_us: u64,
    },
}

fn tls_config(ca: &PathBuf, alpn: &[u8]) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

fn h1(cli: &Cli, kind: H1, addr: SocketAddr) -> Result<serde_json::Value> {
    let cfg = tls_config(&cli.ca, b"http/1.1")?;
    let name = ServerName::try_from(cli.sni.clone())?;
    let conn = ClientConnection::new(cfg, name)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut s = StreamOwned::new(conn, tcp);
    let t0 = Instant::now();
    let path = "/api/v1/namespaces/e2e/configmaps";
    let auth = cli
        .token
        .as_ref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut write_error = None;
    match kind {
        H1::Garbage => s.write_all(b"HELLO THERE\r\n\r\n")?,
        H1::Smuggle => s.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: k\r\n{auth}Content-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nDELETE {path}/x HTTP/1.1\r\nHost: k\r\n{auth}\r\n"
            )
            .as_bytes(),
        )?,
        H1::DuplicateLength => s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: k\r\n{auth}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}")
                .as_bytes(),
        )?,
        H1::HugeHeader => s.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: k\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            )
            .as_bytes(),
        )?,
        H1::SlowHeaders => {
            s.write_all(format!("GET {path} HTTP/1.1\r\n").as_bytes())?;
            // Bounded: at most 60 bytes over 30 s.
            for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
                std::thread::sleep(Duration::from_millis(500));
                if let Err(e) = s.write_all(&[*b]).and_then(|_| s.flush()) {
                    write_error = Some(e.to_string());
                    break;
                }
            }
        }
    }
    let _ = s.flush();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut closed = false;
    loop {
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break;
            }
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let statuses: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .collect();
    Ok(json!({
        "statuses": statuses,
        "closed": closed,
        "write_error": write_error,
        "elapsed_ms": t0.elapsed().as_millis() as u64,
        "body": text.chars().take(2000).collect::<String>(),
    }))
}

async fn rapid_reset(
    cli: &Cli,
    addr: SocketAddr,
    count: u32,
    pace_us: u64,
) -> Result<serde_json::Value> {
    let cfg = tls_config(&cli.ca, b"h2")?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(cli.sni.clone())?, tcp)
        .await?;
    // An attacker's client does not give up by itself: h2's own client closes the
    // connection (ENHANCE_YOUR_CALM, "detected") once it has forgotten more than a few
    // reset streams and answers the server's frames on them with more resets; only the
    // daemon's verdict on the connection is of interest.
    let (mut client, conn) = h2::client::Builder::new()
        .max_concurrent_reset_streams(count as usize)
        .max_local_error_reset_streams(None)
        .handshake::<_, bytes::Bytes>(tls)
        .await?;
    let driver = tokio::spawn(conn);
    let t0 = Instant::now();
    let mut sent = 0u32;
    let mut error = None;
    for _ in 0..count {
        if t0.elapsed() > Duration::from_secs(20) {
            break;
        }
        let ready = match client.clone().ready().await {
            Ok(r) => r,
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        };
        client = ready;
        let mut b =
            http::Request::get("https://kubernetes.default.svc/api/v1/namespaces/e2e/configmaps");
        if let Some(t) = &cli.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b.body(()).context("request")?;
        match client.send_request(req, true) {
            Ok((_resp, mut stream)) => {
                if pace_us > 0 {
                    tokio::time::sleep(Duration::from_micros(pace_us)).await;
                }
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    // Wait for the server's verdict on the connection.
    let verdict = tokio::time::timeout(Duration::from_secs(10), driver).await;
    let conn_result = match verdict {
        Ok(Ok(Ok(()))) => "closed cleanly".to_string(),
        Ok(Ok(Err(e))) => e.to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "still open".to_string(),
    };
    Ok(json!({
        "sent": sent,
        "send_error": error,
        "connection": conn_result,
        "elapsed_ms": t0.elapsed().as_millis() as u64,
    }))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let v = match cli.cmd {
        Cmd::H1 { kind, addr } => h1(&cli, kind, addr)?,
        Cmd::RapidReset {
            addr,
            count,
            pace_us,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(rapid_reset(&cli, addr, count, pace_us))?,
    };
    println!("{v}");
    Ok(())
}
