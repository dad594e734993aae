//! Node setup for a DaemonSet (`portcullis node-setup`, its init container): bpffs
//! mounted and shared in the HOST's mount namespace, so pins outlive the pod and the
//! next pod (a restart, an upgrade) adopts them. Host mounts are often private, and a
//! bpffs mounted inside a pod's own mount namespace dies with the pod, so the setup
//! enters the host's mount namespace first (hostPID: `/proc/1/ns/mnt`, as Cilium's
//! init step does; where PID 1's namespaces cannot be opened — a sandboxed init — the
//! kubelet's, which is where hostPath volumes are resolved anyway).
use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::{KernelError, bpffs, sys};

/// Which process's mount namespace is the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostNamespace {
    /// PID 1's, else the kubelet's.
    Auto,
    Pid1,
    Kubelet,
}

/// What node setup did, for its log line.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub mounted: bool,
    pub made_shared: bool,
}

fn nerr(path: &Path, message: String) -> KernelError {
    KernelError::Bpffs {
        path: path.to_owned(),
        message,
    }
}

/// The pid of a process whose command name is `comm` (first found).
fn pid_named(comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
}

fn open_ns(pid: u32) -> std::io::Result<(File, PathBuf)> {
    let p = PathBuf::from(format!("/proc/{pid}/ns/mnt"));
    File::open(&p).map(|f| (f, p))
}

/// Enters the host's mount namespace (see the module doc); returns which one.
pub fn enter_host_mount_namespace(how: HostNamespace) -> Result<String, KernelError> {
    let err = |m: String| nerr(Path::new("/proc"), m);
    let (file, path) = match how {
        HostNamespace::Pid1 => open_ns(1).map_err(|e| err(format!("/proc/1/ns/mnt: {e}")))?,
        HostNamespace::Kubelet | HostNamespace::Auto => {
            let pid1 = (how == HostNamespace::Auto).then(|| open_ns(1));
            match pid1 {
                Some(Ok(found)) => found,
                other => {
                    let why = match other {
                        Some(Err(e)) => format!("/proc/1/ns/mnt: {e}; "),
                        _ => String::new(),
                    };
                    let pid = pid_named("kubelet").ok_or_else(|| {
                        err(format!(
                            "{why}no kubelet process in /proc (does the pod have hostPID: true?)"
                        ))
                    })?;
                    open_ns(pid).map_err(|e| err(format!("{why}kubelet (pid {pid}): {e}")))?
                }
            }
        }
    };
    let own = std::fs::metadata("/proc/self/ns/mnt").map(|m| m.ino()).ok();
    let target = file.metadata().map(|m| m.ino()).ok();
    if own.is_some() && own == target {
        return Ok(format!("{} (already in it)", path.display()));
    }
    sys::enter_mount_namespace(&file)
        .map_err(|e| err(format!("entering {}: {e}", path.display())))?;
    Ok(path.display().to_string())
}

/// The propagation of the mount at exactly `path` (`shared`, `private`, ...), from
/// /proc/self/mountinfo; None when nothing is mounted there.
pub fn propagation(path: &Path) -> Option<&'static str> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for l in text.lines() {
        let (left, _) = l.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        if fields.get(4).map(Path::new) != Some(path) {
            continue;
        }
        // The last mount at a path is the visible one.
        let optional = &fields[6.min(fields.len())..];
        found = Some(if optional.iter().any(|f| f.starts_with("shared:")) {
            "shared"
        } else if optional.iter().any(|f| f.starts_with("master:")) {
            "slave"
        } else {
            "private"
        });
    }
    found
}

/// bpffs mounted at `dir` and shared (in the current mount namespace).
pub fn share_bpffs(dir: &Path) -> Result<SetupReport, KernelError> {
    let mut r = SetupReport::default();
    if !bpffs::is_bpffs(dir) {
        std::fs::create_dir_all(dir).map_err(|e| nerr(dir, e.to_string()))?;
        sys::mount_bpffs(dir).map_err(|e| nerr(dir, format!("mounting bpffs: {e}")))?;
        r.mounted = true;
    }
    if propagation(dir) != Some("shared") {
        sys::make_shared(dir).map_err(|e| nerr(dir, format!("making it shared: {e}")))?;
        r.made_shared = true;
    }
    Ok(r)
}
