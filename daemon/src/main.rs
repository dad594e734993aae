//! `portcullis`: the node daemon and its CLI.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use portcullis::{
    DEFAULT_CONFIG, admin_client, audit, audit_read, cli, config, daemon, doctor, policy_cases,
    replay,
};

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
    /// Re-issue a recorded session against a (sandbox) cluster and report where the
    /// outcomes differ from the recording; exits 1 if any do.
    Replay {
        /// A session ID from `portcullis audit sessions`.
        session: String,
        /// The audit directory.
        #[arg(long, default_value = DEFAULT_AUDIT_DIR)]
        dir: PathBuf,
        /// The API server to replay against, e.g. https://sandbox:6443.
        #[arg(long)]
        server: String,
        /// A bearer token for --server.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The CA of --server (PEM).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Really apply mutations (default: each carries dryRun=All).
        #[arg(long)]
        apply: bool,
        /// The idle gap that ends a session.
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
        #[arg(short, long, value_enum, default_value_t = admin_client::Output::Table)]
        output: admin_client::Output,
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
    /// List agent sessions: one subject from one pod until idle for --idle.
    Sessions {
        #[arg(default_value = DEFAULT_AUDIT_DIR)]
        dir: PathBuf,
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
        #[arg(short, long, value_enum, default_value_t = admin_client::Output::Table)]
        output: admin_client::Output,
    },
    /// Write the records as JSON lines: `k8s` (audit.k8s.io/v1 Events, one per request)
    /// or `raw` (the chained records as stored).
    Export {
        #[arg(default_value = DEFAULT_AUDIT_DIR)]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = ExportFormat::K8s)]
        format: ExportFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    K8s,
    Raw,
}

const DEFAULT_AUDIT_DIR: &str = "/var/lib/portcullis/audit";

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
            let r = audit::verify_settled(&dir, &public, std::time::Duration::from_secs(2))?;
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
        Cmd::Audit {
            cmd: AuditCmd::Sessions { dir, idle, output },
        } => {
            let entries = audit_read::read_all(&dir)?;
            let sessions = audit_read::sessions(audit_read::exchanges(&entries), idle);
            match output {
                admin_client::Output::Json => {
                    let v: Vec<serde_json::Value> = sessions
                        .iter()
                        .map(|s| {
                            serde_json::json!({
                                "id": s.id, "subject": s.subject, "pod_uid": s.pod_uid,
                                "start": portcullis::util::rfc3339_nanos(s.first_ns),
                                "end": portcullis::util::rfc3339_nanos(s.last_ns),
                                "requests": s.exchanges.len(),
                                "mutations": s.exchanges.iter().filter(|e| e.request.mutating).count(),
                                "refused": s.exchanges.iter().filter(|e| e.response.as_ref().is_some_and(|r| r.code >= 400)).count(),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                admin_client::Output::Table => {
                    println!(
                        "{:<17} {:<45} {:<37} {:<20} {:>8} {:>9}",
                        "SESSION", "SUBJECT", "POD", "START", "REQUESTS", "MUTATIONS"
                    );
                    for s in &sessions {
                        println!(
                            "{:<17} {:<45} {:<37} {:<20} {:>8} {:>9}",
                            s.id,
                            s.subject,
                            if s.pod_uid.is_empty() {
                                "-"
                            } else {
                                &s.pod_uid
                            },
                            portcullis::util::rfc3339_nanos(s.first_ns)
                                .get(..19)
                                .unwrap_or(""),
                            s.exchanges.len(),
                            s.exchanges.iter().filter(|e| e.request.mutating).count()
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Audit {
            cmd: AuditCmd::Export { dir, format },
        } => {
            use std::io::Write;
            let entries = audit_read::read_all(&dir)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match format {
                ExportFormat::Raw => {
                    for e in &entries {
                        let line =
                            serde_json::json!({"seq": e.seq, "kind": e.kind, "record": e.record});
                        writeln!(out, "{line}")?;
                    }
                }
                ExportFormat::K8s => {
                    for ex in audit_read::exchanges(&entries) {
                        writeln!(out, "{}", audit_read::k8s_event(&ex))?;
                    }
                }
            }
            out.flush()?;
            Ok(())
        }
        Cmd::Replay {
            session,
            dir,
            server,
            token_file,
            ca_file,
            apply,
            idle,
            output,
        } => {
            let entries = audit_read::read_all(&dir)?;
            let sessions = audit_read::sessions(audit_read::exchanges(&entries), idle);
            let s = sessions
                .into_iter()
                .find(|s| s.id == session)
                .with_context(|| {
                    format!(
                        "no session {session} in {} (see `portcullis audit sessions`)",
                        dir.display()
                    )
                })?;
            let target = replay::Target {
                server,
                token_file,
                ca_file,
                apply,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let steps = rt.block_on(replay::replay(&s.exchanges, &target))?;
            match output {
                admin_client::Output::Json => println!("{}", serde_json::to_string_pretty(&steps)?),
                admin_client::Output::Table => {
                    for st in &steps {
                        println!(
                            "{:>6} {:<8} {:<7} {:<6} {:<6} {} {}",
                            st.seq,
                            st.outcome,
                            st.method,
                            st.recorded.map_or("-".into(), |c| c.to_string()),
                            st.replayed.map_or("-".into(), |c| c.to_string()),
                            st.uri,
                            st.note
                        );
                    }
                }
            }
            let differ = steps
                .iter()
                .filter(|s| matches!(s.outcome, "differs" | "error"))
                .count();
            eprintln!(
                "session {}: {} requests, {} replayed, {} differ{}",
                s.id,
                steps.len(),
                steps.iter().filter(|s| s.replayed.is_some()).count(),
                differ,
                if apply {
                    " (applied)"
                } else {
                    " (mutations with dryRun=All)"
                }
            );
            std::process::exit(if differ == 0 { 0 } else { 1 });
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
