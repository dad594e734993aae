//! `portcullis`: the node daemon and its CLI.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod ca;
mod cli;
mod config;
mod daemon;
mod doctor;
mod jsonl;
mod kernel;
mod listener;
mod origin;
mod proxy;
mod request_info;
mod status;
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

const DEFAULT_CONFIG: &str = "/etc/portcullis/portcullis.yaml";

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
        Cmd::Status { config } => cli::status(&config::Config::load(&config)?),
        Cmd::Unload { config } => cli::unload(&config::Config::load(&config)?),
    }
}
