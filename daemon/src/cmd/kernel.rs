//! The node: running the daemon, its prerequisites, run-time administration through
//! the pinned maps (works whether or not the daemon is running, and takes effect at
//! once for every new socket operation), the interception CA, uninstalling.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};

use crate::{
    app,
    config::{Config, Endpoint},
    kernel::{self, PinnedMaps, cgroup, doctor, endpoint_key, node},
    tls,
};

/// `portcullis run`.
pub fn run(cfg: Config) -> Result<ExitCode> {
    app::init_tracing(&cfg.log);
    let cfg = resolve(cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(app::run(cfg))?;
    Ok(ExitCode::SUCCESS)
}

/// The config with what is found at start filled in: `attach_cgroup: auto` becomes
/// the kubelet's pod cgroup root, found from this pod (`POD_UID`).
pub fn resolve(mut cfg: Config) -> Result<Config> {
    if cfg.kernel.attach_auto() {
        let uid = std::env::var("POD_UID").context(
            "kernel.attach_cgroup is `auto` but POD_UID is not set (the DaemonSet passes \
             metadata.uid through the downward API)",
        )?;
        let root = cgroup::kubelet_root_of_pod(&uid)
            .context("finding the kubelet's cgroup root (kernel.attach_cgroup: auto)")?;
        tracing::info!(cgroup = %root.display(), "kubelet cgroup root found");
        cfg.kernel.attach_cgroup = root;
    }
    Ok(cfg)
}

/// `portcullis node-setup`: bpffs mounted and shared in the host's mount namespace,
/// then the prerequisites (non-zero exit if a required one is missing).
pub fn node_setup(bpffs: &std::path::Path, how: node::HostNamespace) -> Result<ExitCode> {
    let ns = node::enter_host_mount_namespace(how)?;
    println!("host mount namespace: {ns}");
    let r = node::share_bpffs(bpffs)?;
    println!(
        "bpffs at {}: {}, {}",
        bpffs.display(),
        if r.mounted {
            "mounted"
        } else {
            "already mounted"
        },
        if r.made_shared {
            "made shared"
        } else {
            "already shared"
        }
    );
    // Rolling upgrades: connections waiting in a closing listener's queue move to the
    // successor's listener on the same address (SO_REUSEPORT) instead of being reset.
    // A per-network-namespace sysctl: the node's, as the DaemonSet runs on its network.
    let migrate = std::path::Path::new("/proc/sys/net/ipv4/tcp_migrate_req");
    match std::fs::write(migrate, "1") {
        Ok(()) => println!("net.ipv4.tcp_migrate_req = 1"),
        Err(e) => println!(
            "net.ipv4.tcp_migrate_req not set ({e}): an upgrade resets connections queued at that moment"
        ),
    }
    Ok(doctor(None))
}

/// `portcullis ready`: the ready file names a live daemon.
pub fn ready(cfg: &Config) -> Result<ExitCode> {
    let text = std::fs::read_to_string(cfg.state().ready()).unwrap_or_default();
    let pid = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["pid"].as_u64());
    let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
    if !alive {
        println!("not ready: {}", cfg.state().ready().display());
    }
    Ok(super::exit(alive))
}

/// `portcullis webhook`.
pub fn webhook(o: crate::admission::Options) -> Result<ExitCode> {
    app::init_tracing(&crate::config::Log {
        format: crate::config::LogFormat::Json,
        level: "info".into(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(crate::admission::run(o))?;
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

/// `portcullis enroll`: refused for a cgroup outside the attach point (the programs
/// would never see it); checked against the kernel's effective programs afterwards.
pub fn enroll(cfg: &Config, cgroups: &[PathBuf]) -> Result<ExitCode> {
    let mut m = maps(cfg)?;
    let attach = &cfg.kernel.attach_cgroup;
    let state: Option<kernel::AttachState> = std::fs::read(cfg.state().kernel_state())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let paths = kernel::Paths::new(&cfg.kernel.bpffs_dir);
    let mut all_in_effect = true;
    for cg in cgroups {
        let id = cgroup::id_of(cg)?;
        if !cgroup::is_below(cg, attach) {
            anyhow::bail!(
                "refusing to enroll {}: it is not below kernel.attach_cgroup {}, so the programs attached there never see its sockets (it would look enforced without being enforced)",
                cg.display(),
                attach.display()
            );
        }
        m.enroll(id)
            .with_context(|| format!("enrolling {}", cg.display()))?;
        println!("enrolled {} (cgroup id {id})", cg.display());
        if let Some(state) = &state
            && let Err(why) = kernel::verify_enrollable(cg, attach, &paths, state)
        {
            all_in_effect = false;
            eprintln!(
                "NOT ENFORCED: {}: {why} (the daemon re-attaches or freezes it at its next check)",
                cg.display()
            );
        }
    }
    Ok(super::exit(all_in_effect))
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
    match std::fs::read(cfg.state().kernel_effect())
        .ok()
        .and_then(|b| serde_json::from_slice::<kernel::Effect>(&b).ok())
    {
        Some(e) if e.ok => println!(
            "programs in effect: yes, on all {} enrolled cgroups (checked {})",
            e.enrolled, e.time
        ),
        Some(e) => {
            println!("programs in effect: NO (checked {})", e.time);
            for p in &e.attachment {
                println!("  attachment: {p}");
            }
            for u in &e.uncovered {
                println!(
                    "  NOT ENFORCED: cgroup {} {}: {}",
                    u.cgroup_id,
                    u.path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    u.why
                );
            }
        }
        None => println!("programs in effect: not checked yet (is `portcullis run` running?)"),
    }
    let eps: Vec<String> = m
        .protections()
        .iter()
        .map(|(k, p)| {
            if p.flags & portcullis_common::protection_flags::REFUSE != 0 {
                format!("{k} (refused)")
            } else {
                k.to_string()
            }
        })
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
