//! The CLI side of the admin API: `portcullis approvals ...` and `portcullis grants
//! ...` over the node socket (default) or HTTPS to a remote daemon with an OIDC token.
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(clap::Args)]
pub struct Conn {
    /// The daemon's config (for the socket path).
    #[arg(long, default_value = crate::DEFAULT_CONFIG)]
    config: PathBuf,
    /// The admin socket (default: from the config).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// A remote daemon's admin HTTPS address, e.g. https://node-1:15444.
    #[arg(long, conflicts_with = "socket")]
    server: Option<String>,
    /// Remote: a file holding your OIDC token.
    #[arg(long, requires = "server")]
    token_file: Option<PathBuf>,
    /// Remote: the CA that signs the daemon's certificate.
    #[arg(long, requires = "server")]
    ca_file: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

fn socket_path(c: &Conn) -> Result<PathBuf> {
    if let Some(s) = &c.socket {
        return Ok(s.clone());
    }
    let cfg = crate::config::Config::load(&c.config)
        .with_context(|| "finding the admin socket (or pass --socket)")?;
    Ok(cfg.admin_socket())
}

async fn call_async(c: &Conn, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let body = Full::new(Bytes::from(
        body.map(|b| serde_json::to_vec(&b))
            .transpose()?
            .unwrap_or_default(),
    ));
    let resp = match &c.server {
        None => {
            let sock = socket_path(c)?;
            let stream = tokio::net::UnixStream::connect(&sock)
                .await
                .with_context(|| format!("connecting to the admin socket {} (is the daemon running, and are you root?)", sock.display()))?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, "portcullis")
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)?;
            send.send_request(req).await?.map(|b| b.boxed())
        }
        Some(server) => {
            let client = crate::http_client::client(c.ca_file.as_deref(), false)?;
            let token = match &c.token_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim()
                    .to_owned(),
                None => bail!("--token-file is required with --server"),
            };
            let req = Request::builder()
                .method(method)
                .uri(format!("{}{path}", server.trim_end_matches('/')))
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)?;
            client.request(req).await?.map(|b| b.boxed())
        }
    };
    let code = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v: Value = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "admin API answered {code}: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    if !code.is_success() {
        bail!(
            "{} ({code})",
            v["error"].as_str().unwrap_or("admin API error")
        );
    }
    Ok(v)
}

fn call(c: &Conn, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(call_async(c, method, path, body))
}

pub fn print_call(c: &Conn, method: &str, path: &str, body: Option<Value>) -> Result<()> {
    let v = call(c, method, path, body)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn request_text(r: &Value) -> String {
    if r["path"].as_str().is_some_and(|p| !p.is_empty()) {
        return format!("{} {}", s(&r["verb"]), s(&r["path"]));
    }
    let mut res = s(&r["resource"]);
    if r["api_group"].as_str().is_some_and(|g| !g.is_empty()) {
        res = format!("{res}.{}", s(&r["api_group"]));
    }
    if r["subresource"].as_str().is_some_and(|g| !g.is_empty()) {
        res = format!("{res}/{}", s(&r["subresource"]));
    }
    let ns = r["namespace"]
        .as_str()
        .filter(|n| !n.is_empty())
        .unwrap_or("-");
    let name = r["name"].as_str().filter(|n| !n.is_empty()).unwrap_or("-");
    format!("{} {res} {ns}/{name}", s(&r["verb"]))
}

pub fn list(c: &Conn, path: &str, output: Output) -> Result<()> {
    let v = call(c, "GET", path, None)?;
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows = v.as_array().cloned().unwrap_or_default();
    let now = crate::util::unix_secs() as i64;
    let rel = |t: &Value| -> String {
        let d = t.as_i64().unwrap_or(0) - now;
        if d >= 0 {
            format!("in {d}s")
        } else {
            format!("{}s ago", -d)
        }
    };
    if path.ends_with("approvals") {
        println!(
            "{:<22} {:<9} {:<36} {:<44} {:<18} EXPIRES",
            "ID", "STATE", "SUBJECT", "REQUEST", "RULE"
        );
        for a in rows {
            println!(
                "{:<22} {:<9} {:<36} {:<44} {:<18} {}",
                s(&a["id"]),
                s(&a["state"]),
                s(&a["subject"]["username"]),
                request_text(&a["request"]),
                s(&a["rule"]),
                rel(&a["expires_at"])
            );
        }
    } else {
        println!(
            "{:<22} {:<8} {:<36} {:<44} {:<16} EXPIRES",
            "ID", "STATUS", "SUBJECT", "REQUEST", "APPROVED BY"
        );
        for g in rows {
            println!(
                "{:<22} {:<8} {:<36} {:<44} {:<16} {}",
                s(&g["id"]),
                s(&g["status"]),
                s(&g["username"]),
                request_text(&g["request"]),
                s(&g["approved_by"]),
                rel(&g["expires_at"])
            );
        }
    }
    Ok(())
}
