//! Run-time administration through the pinned maps: works whether or not the daemon is
//! running, and takes effect at once for every new socket operation.
use std::path::PathBuf;

use anyhow::{Context, Result};
use portcullis_common::SockKey;

use crate::{
    config::{Config, Endpoint},
    kernel::{self, PinnedMaps, cgroup},
};

fn maps(cfg: &Config) -> Result<PinnedMaps> {
    Ok(PinnedMaps::open(
        &kernel::Paths::new(&cfg.kernel.bpffs_dir).maps(),
    )?)
}

pub fn endpoint_key(ep: &Endpoint) -> SockKey {
    SockKey::from(std::net::SocketAddr::new(ep.ip, ep.port.unwrap_or(0)))
}

pub fn enroll(cfg: &Config, cgroups: &[PathBuf]) -> Result<()> {
    let mut m = maps(cfg)?;
    for cg in cgroups {
        let id = cgroup::id_of(cg)?;
        m.enroll(id)
            .with_context(|| format!("enrolling {}", cg.display()))?;
        println!("enrolled {} (cgroup id {id})", cg.display());
    }
    Ok(())
}

pub fn unenroll(cfg: &Config, cgroups: &[PathBuf]) -> Result<()> {
    let mut m = maps(cfg)?;
    for cg in cgroups {
        let id = cgroup::id_of(cg)?;
        if m.unenroll(id)? {
            println!("unenrolled {} (cgroup id {id})", cg.display());
        } else {
            println!("{} (cgroup id {id}) was not enrolled", cg.display());
        }
    }
    Ok(())
}

pub fn protect(cfg: &Config, eps: &[Endpoint]) -> Result<()> {
    let mut m = maps(cfg)?;
    for ep in eps {
        m.protect(endpoint_key(ep), 0)?;
        println!("protected {ep}");
    }
    Ok(())
}

pub fn unprotect(cfg: &Config, eps: &[Endpoint]) -> Result<()> {
    let mut m = maps(cfg)?;
    for ep in eps {
        if m.unprotect(&endpoint_key(ep))? {
            println!("unprotected {ep}");
        } else {
            println!("{ep} was not protected");
        }
    }
    Ok(())
}

pub fn status(cfg: &Config) -> Result<()> {
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
    Ok(())
}

pub fn unload(cfg: &Config) -> Result<()> {
    let n = kernel::unload(&kernel::Paths::new(&cfg.kernel.bpffs_dir))?;
    let _ = std::fs::remove_file(cfg.state().kernel_state());
    println!(
        "detached {n} programs and removed pins under {}",
        cfg.kernel.bpffs_dir.display()
    );
    Ok(())
}

/// `portcullis ca init`: the CA agents must trust (distribute ca.crt, never ca.key).
pub fn ca_init(cfg: &Config) -> Result<()> {
    let paths = crate::ca::CaPaths::new(&cfg.state().ca_dir());
    let out = crate::ca::init(&paths)?;
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
    Ok(())
}
