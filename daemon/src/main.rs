//! `portcullis`: the node daemon and its CLI.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod admin;
mod admin_client;
mod approvals;
mod audit;
mod audit_log;
mod audit_sink;
mod ca;
mod cli;
mod config;
mod daemon;
mod doctor;
mod http_client;
mod identity;
mod jsonl;
mod jwks;
mod kernel;
mod listener;
mod mask;
mod notify;
mod origin;
mod pod;
mod policy;
mod policy_cases;
mod proxy;
mod request_info;
mod response;
mod status;
mod store;
mod upstream;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "The gate between AI agents and the Kubernetes API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

pub const DEFAULT_CONFIG: &str = "/etc/portcullis/portcullis.yaml";

#[derive(Subcommand)]
enum Cmd {
    /// Run the node daemon: attach (or adopt) the kernel programs and serve agents.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check the kernel prerequisites and say how to fix each one that is missing.
    Doctor {
        /// Also check the paths in this config (attach cgroup, bpffs directory).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Enroll agent cgroups (they and their descendants go through the gate).
    Enroll {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        cgroups: Vec<PathBuf>,
    },
    /// Unenroll agent cgroups (their processes reach endpoints normally again).
    Unenroll {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        cgroups: Vec<PathBuf>,
    },
    /// Protect endpoints at run time (IP:PORT, [IPv6]:PORT, IP:*).
    Protect {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        endpoints: Vec<config::Endpoint>,
    },
    /// Stop protecting endpoints.
    Unprotect {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        endpoints: Vec<config::Endpoint>,
    },
    /// Show enrolled cgroups, protected endpoints and attached programs.
    Status {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// The interception CA agents trust for the API server's names.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Check a policy document against a table of expected decisions.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Requests waiting for a human (through the admin API).
    Approvals {
        #[command(flatten)]
        conn: admin_client::Conn,
        #[command(subcommand)]
        cmd: ApprovalsCmd,
    },
    /// Just-in-time grants created by approvals.
    Grants {
        #[command(flatten)]
        conn: admin_client::Conn,
        #[command(subcommand)]
        cmd: GrantsCmd,
    },
    /// Tamper-evident audit evidence.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Detach every program and remove the pins (uninstall). Agents then reach the API
    /// server directly: this is the only way enforcement ends.
    Unload {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the CA in the state directory (kept if it exists) and print its path.
    Init {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check every segment's hash chain and signed head; non-zero exit on any problem.
    Verify {
        /// The audit directory (segments and heads).
        dir: PathBuf,
        /// The daemon's audit public key (hex); default: DIR/../audit.pub.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Run table-driven decision cases; exits non-zero on any mismatch.
    Test {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        cases: PathBuf,
    },
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    /// All approvals (pending first is up to you: `-o json | jq`).
    List {
        #[arg(short, long, default_value = "table")]
        output: admin_client::Output,
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
enum GrantsCmd {
    List {
        #[arg(short, long, default_value = "table")]
        output: admin_client::Output,
    },
    Revoke {
        id: String,
        #[arg(long = "as")]
        as_name: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = config::Config::load(&config)?;
            daemon::init_tracing(&cfg.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(daemon::run(cfg))
        }
        Cmd::Doctor { config } => {
            let cfg = config.map(|p| config::Config::load(&p)).transpose()?;
            let ok = doctor::run(cfg.as_ref());
            std::process::exit(if ok { 0 } else { 1 });
        }
        Cmd::Enroll { config, cgroups } => cli::enroll(&config::Config::load(&config)?, &cgroups),
        Cmd::Unenroll { config, cgroups } => {
            cli::unenroll(&config::Config::load(&config)?, &cgroups)
        }
        Cmd::Protect { config, endpoints } => {
            cli::protect(&config::Config::load(&config)?, &endpoints)
        }
        Cmd::Unprotect { config, endpoints } => {
            cli::unprotect(&config::Config::load(&config)?, &endpoints)
        }
        Cmd::Ca {
            cmd: CaCmd::Init { config },
        } => cli::ca_init(&config::Config::load(&config)?),
        Cmd::Audit {
            cmd: AuditCmd::Verify { dir, key },
        } => {
            let key_path = key.unwrap_or_else(|| dir.join("../audit.pub"));
            let hexkey = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading the audit public key {}", key_path.display()))?;
            let public = hex::decode(hexkey.trim())
                .with_context(|| format!("{} is not a hex public key", key_path.display()))?;
            let r = audit::verify(&dir, &public)?;
            for p in &r.problems {
                println!("FAIL  {p}");
            }
            println!(
                "{} segments, {} records: {}",
                r.segments,
                r.records,
                if r.problems.is_empty() {
                    "intact".to_string()
                } else {
                    format!("{} problems", r.problems.len())
                }
            );
            std::process::exit(if r.problems.is_empty() { 0 } else { 1 });
        }
        Cmd::Policy {
            cmd: PolicyCmd::Test { policy, cases },
        } => {
            let (_, failed) = policy_cases::run(&policy, &cases, &mut std::io::stdout())?;
            std::process::exit(if failed == 0 { 0 } else { 1 });
        }
        Cmd::Approvals { conn, cmd } => {
            use serde_json::json;
            let call = match cmd {
                ApprovalsCmd::List { output } => {
                    return admin_client::list(&conn, "/v1/approvals", output);
                }
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
            admin_client::print_call(&conn, call.0, &call.1, call.2)
        }
        Cmd::Grants { conn, cmd } => match cmd {
            GrantsCmd::List { output } => admin_client::list(&conn, "/v1/grants", output),
            GrantsCmd::Revoke { id, as_name } => admin_client::print_call(
                &conn,
                "POST",
                &format!("/v1/grants/{id}/revoke"),
                Some(serde_json::json!({"as": as_name})),
            ),
        },
        Cmd::Status { config } => cli::status(&config::Config::load(&config)?),
        Cmd::Unload { config } => cli::unload(&config::Config::load(&config)?),
    }
}
