//! `portcullis approvals ...` and `portcullis grants ...`: the admin API over the node
//! socket (default) or HTTPS to a remote daemon with an OIDC token, as tables or JSON.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::{DEFAULT_CONFIG, Output};
use crate::{
    admin::{AdminClient, Endpoint},
    config::Config,
    util::{escape_json, escape_text, unix_secs},
};

#[derive(clap::Args)]
pub struct Conn {
    /// The daemon's config (for the socket path).
    #[arg(long, default_value = DEFAULT_CONFIG)]
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

#[derive(Subcommand)]
pub enum ApprovalsCmd {
    /// All approvals (pending first is up to you: `-o json | jq`).
    List {
        #[arg(short, long, default_value = "table")]
        output: Output,
    },
    Show {
        id: String,
    },
    Approve {
        id: String,
        /// Why (recorded).
        #[arg(long)]
        justification: Option<String>,
        /// On the node socket: the human root acts for (recorded; no self-approval).
        #[arg(long = "as")]
        as_name: Option<String>,
    },
    Deny {
        id: String,
        #[arg(long, required = true)]
        reason: String,
        #[arg(long = "as")]
        as_name: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum GrantsCmd {
    List {
        #[arg(short, long, default_value = "table")]
        output: Output,
    },
    Revoke {
        id: String,
        #[arg(long = "as")]
        as_name: Option<String>,
    },
}

/// The client the flags ask for: the node socket (from `--socket` or the config), or
/// a remote daemon.
fn client(c: &Conn) -> Result<AdminClient> {
    let endpoint = match &c.server {
        None => Endpoint::Socket(match &c.socket {
            Some(s) => s.clone(),
            None => Config::load(&c.config)
                .with_context(|| "finding the admin socket (or pass --socket)")?
                .admin_socket(),
        }),
        Some(server) => {
            let token = match &c.token_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim()
                    .to_owned(),
                None => bail!("--token-file is required with --server"),
            };
            Endpoint::Https {
                server: server.clone(),
                token,
                ca_file: c.ca_file.clone(),
            }
        }
    };
    Ok(AdminClient::new(endpoint))
}

pub fn approvals(conn: &Conn, cmd: ApprovalsCmd) -> Result<ExitCode> {
    let (method, path, body) = match cmd {
        ApprovalsCmd::List { output } => return list(conn, "/v1/approvals", output),
        ApprovalsCmd::Show { id } => ("GET", format!("/v1/approvals/{id}"), None),
        ApprovalsCmd::Approve {
            id,
            justification,
            as_name,
        } => (
            "POST",
            format!("/v1/approvals/{id}/approve"),
            Some(json!({"justification": justification, "as": as_name})),
        ),
        ApprovalsCmd::Deny {
            id,
            reason,
            as_name,
        } => (
            "POST",
            format!("/v1/approvals/{id}/deny"),
            Some(json!({"reason": reason, "as": as_name})),
        ),
    };
    print_call(conn, method, &path, body)
}

pub fn grants(conn: &Conn, cmd: GrantsCmd) -> Result<ExitCode> {
    match cmd {
        GrantsCmd::List { output } => list(conn, "/v1/grants", output),
        GrantsCmd::Revoke { id, as_name } => print_call(
            conn,
            "POST",
            &format!("/v1/grants/{id}/revoke"),
            Some(json!({"as": as_name})),
        ),
    }
}

fn print_call(c: &Conn, method: &str, path: &str, body: Option<Value>) -> Result<ExitCode> {
    let mut v = client(c)?.call(method, path, body)?;
    // A daemon escapes what it sends; a terminal is not left to trust that.
    escape_json(&mut v);
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

/// A field for a table cell, escaped for the terminal.
fn s(v: &Value) -> String {
    match v {
        Value::String(s) => escape_text(s).into_owned(),
        Value::Null => "-".into(),
        other => escape_text(&other.to_string()).into_owned(),
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
    format!(
        "{} {res} {}/{}",
        s(&r["verb"]),
        escape_text(ns),
        escape_text(name)
    )
}

fn list(c: &Conn, path: &str, output: Output) -> Result<ExitCode> {
    let mut v = client(c)?.call("GET", path, None)?;
    escape_json(&mut v);
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows = v.as_array().cloned().unwrap_or_default();
    let now = unix_secs() as i64;
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
    Ok(ExitCode::SUCCESS)
}
