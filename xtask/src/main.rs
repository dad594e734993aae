//! `cargo xtask ...`: everything from a fresh machine to a demo, in Rust.
//!
//! The same binary also serves as the eBPF build's linker shim and rustc wrapper: it is
//! linked under other names in the tools cache and dispatches on the name it was run
//! under (see `ebpf.rs`).
use std::path::Path;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod ebpf;
mod fuzz;
mod node;
mod paths;
mod run;
mod setup;
mod test;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Portcullis build, setup, demo, test and bench"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and every test tier need (apt packages, bpf-linker, the
    /// node parts: Kubernetes, etcd, containerd, runc, CNI plugins, pause, the Python
    /// client), idempotently.
    Setup,
    /// Build the eBPF object, the daemon and the test helpers (release).
    Build,
    /// Set up, build, then run every test tier (unit; kernel, e2e and install as root).
    Test {
        /// Run only these tiers (unit, kernel, e2e, install); default all.
        #[arg(long, value_delimiter = ',')]
        tier: Vec<String>,
        /// Extra arguments passed to the test harness (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, then show an agent being redirected and its bypass attempts blocked.
    Demo,
    /// Pin another release of a node part (kubernetes, etcd, containerd, runc, cni) in
    /// its wrapper module under xtask/go/; commit the go.mod and go.sum it rewrites.
    Bump {
        part: String,
        /// A Go module version, e.g. v1.37.3.
        version: String,
    },
    /// Benchmarks, reported as ratios against a baseline measured in the same run.
    Bench {
        /// Which benchmark: `kernel`, `proxy`, `watches`, `mask` or `audit`.
        what: String,
        /// Extra arguments passed to the benchmark.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets under fuzz/, each bounded by time, and report
    /// executions, execs/s, crashes and corpus size (target/fuzz/report.json).
    /// Installs nightly and cargo-fuzz (pinned, in the tools cache) when missing.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Also stop a target after this many executions.
        #[arg(long)]
        runs: Option<u64>,
        /// Start the working corpora and the report's totals again.
        #[arg(long)]
        fresh: bool,
        /// cargo-fuzz sanitizer: none (fastest; the daemon forbids unsafe), address, ...
        #[arg(long, default_value = "none")]
        sanitizer: String,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    // Invoked under another name by the eBPF build?
    if let Some(name) = std::env::args_os()
        .next()
        .as_deref()
        .and_then(|a| Path::new(a).file_name().map(|n| n.to_owned()))
        && let Some(code) = ebpf::dispatch_shim(&name.to_string_lossy())?
    {
        std::process::exit(code);
    }

    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => {
            setup::all()?;
            node::ensure().map(|_| ())
        }
        Cmd::Build => {
            setup::build_tools()?;
            ebpf::build_all().map(|_| ())
        }
        Cmd::Test { tier, args } => test::run(&tier, &args),
        Cmd::Demo => test::demo(),
        Cmd::Bump { part, version } => node::bump(&part, &version),
        Cmd::Bench { what, args } => bench::run(&what, &args),
        Cmd::Fuzz {
            secs,
            runs,
            fresh,
            sanitizer,
            targets,
        } => fuzz::run(&fuzz::Options {
            secs,
            runs,
            fresh,
            sanitizer,
            targets,
        }),
    }
}
