//! The node: running the daemon, its prerequisites, run-time administration through
//! the pinned maps (works whether or not the daemon is running, and takes effect at
//! once for every new socket operation), the interception CA, uninstalling.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};

use crate::{
    app,
    config::{Config, Endpoint},
    kernel::{self, PinnedMaps, cgroup, doctor, endpoint_key},
    tls,
};

/// `portcullis run`.
pub fn run(cfg: Config) -> Result<ExitCode> {
    app::init_tracing(&cfg.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(app::run(cfg))?;
    Ok(ExitCode::SUCCESS)
}

/// `portcullis doctor`: one line per check, with the fix for each that fails.
pub fn doctor(cfg: Option<Config>) -> ExitCode {
    let checks = doctor::checks(cfg.as_ref());
    for c in &checks {
        let mark = match (c.ok, c.advisory) {
            (true, _) => "ok  ",
            (false, true) => "WARN",
            (false, false) => "FAIL",
        };
        println!("[{mark}] {:<16} {}", c.name, c.detail);
        if !c.ok {
            println!("       fix: {}", c.fix);
        }
    }
    let all = checks.iter().all(doctor::Check::passes);
    if all {
        println!("all required prerequisites met");
    }
    super::exit(all)
}

fn maps(cfg: &Config) -> Result<PinnedMaps> {
    Ok(PinnedMaps::open(
        &kernel::Paths::new(&cfg.kernel.bpffs_dir).maps(),
    )?)
}

pub fn enroll(cfg: &Config, cgroups: &[PathBuf]) -> Result<ExitCode> {
    let mut m = maps(cfg)?;
    for cg in cgroups {
        let id = cgroup::id_of(cg)?;
        m.enroll(id)
            .with_context(|| format!("enrolling {}", cg.display()))?;
        println!("enrolled {} (cgroup id {id})", cg.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unenroll(cfg: &Config, cgroups: &[PathBuf]) -> Result<ExitCode> {
    let mut m = maps(cfg)?;
    for cg in cgroups {
        let id = cgroup::id_of(cg)?;
        if m.unenroll(id)? {
            println!("unenrolled {} (cgroup id {id})", cg.display());
        } else {
            println!("{} (cgroup id {id}) was not enrolled", cg.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn protect(cfg: &Config, eps: &[Endpoint]) -> Result<ExitCode> {
    let mut m = maps(cfg)?;
    for ep in eps {
        m.protect(endpoint_key(ep), 0)?;
        println!("protected {ep}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unprotect(cfg: &Config, eps: &[Endpoint]) -> Result<ExitCode> {
    let mut m = maps(cfg)?;
    for ep in eps {
        if m.unprotect(&endpoint_key(ep))? {
            println!("unprotected {ep}");
        } else {
            println!("{ep} was not protected");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(cfg: &Config) -> Result<ExitCode> {
    let m = maps(cfg)?;
    let state = std::fs::read_to_string(cfg.state().kernel_state())
        .unwrap_or_else(|_| "(no kernel-state.json)".into());
    println!("kernel state: {state}");
    println!("enrolled cgroup ids: {:?}", m.enrolled());
    let eps: Vec<String> = m
        .protected_endpoints()
        .iter()
        .map(|k| k.to_string())
        .collect();
    println!("protected endpoints: {}", eps.join(", "));
    Ok(ExitCode::SUCCESS)
}

pub fn unload(cfg: &Config) -> Result<ExitCode> {
    let n = kernel::unload(&kernel::Paths::new(&cfg.kernel.bpffs_dir))?;
    let _ = std::fs::remove_file(cfg.state().kernel_state());
    println!(
        "detached {n} programs and removed pins under {}",
        cfg.kernel.bpffs_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `portcullis ca init`: the CA agents must trust (distribute ca.crt, never ca.key).
pub fn ca_init(cfg: &Config) -> Result<ExitCode> {
    let paths = tls::CaPaths::new(&cfg.state().ca_dir());
    let out = tls::init(&paths)?;
    if out.created {
        println!("created interception CA {}", out.cert_path.display());
    } else {
        println!(
            "interception CA already exists: {} (kept)",
            out.cert_path.display()
        );
    }
    println!(
        "agents must trust this certificate; the key stays in {}",
        paths.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
