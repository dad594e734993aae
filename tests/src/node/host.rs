//! Everything the node changes on the host, and how it is put back — at the end of a
//! run, and at the START of the next one, because a run killed by a time limit skips
//! every destructor.
//!
//! What the node changes outside its own network namespace:
//! - global sysctls the kubelet sets (`vm.overcommit_memory`, `vm.panic_on_oom`,
//!   `kernel.panic`, `kernel.panic_on_oops`, `kernel.keys.root_max*`): saved to a file
//!   before the kubelet starts, restored from it afterwards;
//! - cgroups: `<hierarchy>/portcullis-node` in every v1 hierarchy and in cgroup2 (the
//!   kubelet's cgroupRoot), with everything the kubelet and runc create below;
//! - mounts under the node's directory (the kubelet's rshared root dir, projected
//!   volumes, containerd's rootfs, shm and netns mounts);
//! - bpffs pins of the daemon under `/sys/fs/bpf/portcullis-node` (the harness's
//!   daemon) and `/sys/fs/bpf/portcullis` (the installed DaemonSet's default);
//! - the bpffs mount at `/sys/fs/bpf` itself: the DaemonSet's node setup mounts it if
//!   missing and makes it shared (its propagation and whether it was mounted are saved
//!   before the node starts and put back after);
//! - `/var/lib/portcullis`, the installed DaemonSet's default state directory, when
//!   the harness created it (it carries a marker file then);
//! - processes: every component runs in the node's network namespace, pods in the
//!   cgroups above; the daemon's own pins keep enforcement until removed.
//!
//! Everything else (addresses, routes, nftables rules of kube-proxy, the CNI bridge,
//! ip_forward) lives inside the network namespace and goes with it.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{CGROUP_ROOT, NETNS};

/// Sysctls the kubelet writes at start (kubelet `setupKernelTunables`).
pub const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

pub fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name)
}

/// Saves the sysctls the kubelet will change (unless a save from a killed run is still
/// there: that one holds the values from before the node ever ran).
pub fn save_sysctls(file: &Path) -> Result<()> {
    if file.exists() {
        return Ok(());
    }
    let mut saved = serde_json::Map::new();
    for name in KUBELET_SYSCTLS {
        let v = std::fs::read_to_string(sysctl_path(name))
            .with_context(|| format!("reading sysctl {name}"))?;
        saved.insert(name.to_string(), v.trim().into());
    }
    super::write(file, &serde_json::Value::Object(saved).to_string())
}

/// Puts saved sysctls back and removes the save; returns what was restored.
pub fn restore_sysctls(file: &Path) -> Result<Vec<String>> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Ok(Vec::new());
    };
    let saved: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("reading {}", file.display()))?;
    let mut restored = Vec::new();
    for (name, v) in saved {
        let v = v.as_str().unwrap_or_default();
        let now = std::fs::read_to_string(sysctl_path(&name)).unwrap_or_default();
        if now.trim() != v {
            std::fs::write(sysctl_path(&name), v)
                .with_context(|| format!("restoring sysctl {name}={v}"))?;
            restored.push(format!("{name}={v}"));
        }
    }
    std::fs::remove_file(file)?;
    Ok(restored)
}

/// The host's bpffs mount point, which the DaemonSet's node setup mounts and shares.
pub const HOST_BPFFS: &str = "/sys/fs/bpf";
/// The installed DaemonSet's default pin directory and state directory.
pub const INSTALLED_PINS: &str = "/sys/fs/bpf/portcullis";
pub const INSTALLED_STATE: &str = "/var/lib/portcullis";
/// In `INSTALLED_STATE` when the harness created it (so cleanup may remove it).
pub const STATE_MARKER: &str = ".created-by-portcullis-node-harness";

/// The propagation of the mount at exactly `path`, or None if nothing is mounted.
pub fn propagation(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for l in text.lines() {
        let Some((left, _)) = l.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = left.split(' ').collect();
        if f.get(4).map(Path::new) != Some(path) {
            continue;
        }
        let opt = &f[6.min(f.len())..];
        found = Some(if opt.iter().any(|x| x.starts_with("shared:")) {
            "shared".to_string()
        } else if opt.iter().any(|x| x.starts_with("master:")) {
            "slave".into()
        } else {
            "private".into()
        });
    }
    found
}

/// Saves whether `/sys/fs/bpf` is mounted and its propagation (unless a save from a
/// killed run is still there).
pub fn save_bpffs(file: &Path) -> Result<()> {
    if file.exists() {
        return Ok(());
    }
    let v = serde_json::json!({"propagation": propagation(Path::new(HOST_BPFFS))});
    super::write(file, &v.to_string())
}

/// Puts `/sys/fs/bpf` back as saved: unmounted if it was not mounted (and holds no
/// one else's pins), private if it was private. Returns what was done.
pub fn restore_bpffs(file: &Path) -> Result<Vec<String>> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Ok(Vec::new());
    };
    let saved: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("reading {}", file.display()))?;
    let was = saved["propagation"].as_str().map(str::to_owned);
    let host = Path::new(HOST_BPFFS);
    let now = propagation(host);
    let mut done = Vec::new();
    match (was.as_deref(), now.as_deref()) {
        (None, Some(_)) => {
            let others = std::fs::read_dir(host)
                .map(|rd| rd.filter_map(|e| e.ok()).count())
                .unwrap_or(0);
            if others == 0 {
                umount(host);
                done.push(format!("unmounted bpffs at {HOST_BPFFS}"));
            } else {
                done.push(format!(
                    "bpffs at {HOST_BPFFS} kept: {others} entries of others appeared in it"
                ));
            }
        }
        (Some(w), Some(n)) if w != n && w == "private" => {
            let _ = nix::mount::mount(
                None::<&str>,
                host,
                None::<&str>,
                nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            );
            done.push(format!("{HOST_BPFFS} made private again (was {n})"));
        }
        _ => {}
    }
    std::fs::remove_file(file)?;
    Ok(done)
}

/// Every mounted cgroup hierarchy (v1 controllers and the cgroup2 mount).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mp = left.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mp))
        })
        .collect()
}

/// The cgroup2 mount (hybrid machines mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mp = left.split(' ').nth(4)?;
        (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mp))
    })
}

/// Creates the kubelet's cgroupRoot in every hierarchy (the kubelet requires it to
/// exist); a cpuset cgroup starts empty, so it gets its parent's CPUs and memory nodes.
pub fn make_cgroup_root() -> Result<()> {
    for h in cgroup_mounts() {
        let dir = h.join(CGROUP_ROOT);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(h.join(f))
                && dir.join(f).exists()
            {
                std::fs::write(dir.join(f), v.trim())
                    .with_context(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
    }
    Ok(())
}

fn netns_inode(name: &str) -> Option<u64> {
    std::fs::metadata(format!("/run/netns/{name}"))
        .ok()
        .map(|m| m.ino())
}

/// PIDs of processes whose network namespace is `ino`.
fn pids_in_netns(ino: u64) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.ino() == ino)
                .unwrap_or(false)
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn umount(p: &Path) {
    let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
}

/// Removes a cgroup directory tree bottom-up (cgroupfs directories cannot be removed
/// recursively, only rmdir'd when empty).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Stops everything a node left behind, in an order that lets each step succeed:
/// processes (the node's network namespace, then the pods' cgroups), mounts, the
/// namespace, cgroups, pins, saved sysctls, and finally the node's directory.
/// Returns a line per kind of leftover found (empty when the host was clean).
pub fn clean(
    dir: &Path,
    bpffs: &Path,
    sysctl_save: &Path,
    bpffs_save: &Path,
) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    if let Some(ino) = netns_inode(NETNS) {
        let pids = pids_in_netns(ino);
        if !pids.is_empty() {
            found.push(format!("{} processes in netns {NETNS}", pids.len()));
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        while !pids_in_netns(ino).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if let Some(v2) = cgroup2_mount() {
        let root = v2.join(CGROUP_ROOT);
        if root.exists() {
            let procs = |d: &Path| -> usize {
                let mut n = 0;
                let mut stack = vec![d.to_path_buf()];
                while let Some(d) = stack.pop() {
                    n += std::fs::read_to_string(d.join("cgroup.procs"))
                        .map(|s| s.lines().count())
                        .unwrap_or(0);
                    if let Ok(rd) = std::fs::read_dir(&d) {
                        stack.extend(
                            rd.filter_map(|e| e.ok())
                                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                                .map(|e| e.path()),
                        );
                    }
                }
                n
            };
            let n = procs(&root);
            if n > 0 {
                found.push(format!("{n} pod processes in cgroup {}", root.display()));
                let _ = std::fs::write(root.join("cgroup.kill"), "1");
                while procs(&root) > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    let mounts = mounts_under(dir);
    if !mounts.is_empty() {
        found.push(format!("{} mounts under {}", mounts.len(), dir.display()));
    }
    for m in mounts {
        umount(&m);
    }
    if netns_inode(NETNS).is_some() {
        found.push(format!("netns {NETNS}"));
        let _ = Command::new("ip").args(["netns", "del", NETNS]).output();
    }
    for h in cgroup_mounts() {
        let d = h.join(CGROUP_ROOT);
        if d.exists() {
            remove_cgroup_tree(&d);
            if d.exists() {
                found.push(format!("cgroup {} could not be removed", d.display()));
            }
        }
    }
    for pins in [bpffs, Path::new(INSTALLED_PINS)] {
        if pins.exists() {
            found.push(format!("pins in {}", pins.display()));
            let _ = std::fs::remove_dir_all(pins);
        }
    }
    let state = Path::new(INSTALLED_STATE);
    if state.join(STATE_MARKER).exists() {
        found.push(format!("state directory {}", state.display()));
        let _ = std::fs::remove_dir_all(state);
    }
    found.extend(restore_bpffs(bpffs_save)?);
    let restored = restore_sysctls(sysctl_save)?;
    if !restored.is_empty() {
        found.push(format!("sysctls restored: {}", restored.join(" ")));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(found)
}
