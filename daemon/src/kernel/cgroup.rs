//! cgroup v2 paths and ids.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::KernelError;

/// The id the kernel reports for a cgroup v2 (`bpf_get_current_cgroup_id`) is the inode
/// number of its directory in cgroupfs.
pub fn id_of(path: &Path) -> Result<u64, KernelError> {
    let md = std::fs::metadata(path).map_err(|e| KernelError::Cgroup {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if !md.is_dir() {
        return Err(KernelError::Cgroup {
            path: path.to_owned(),
            message: "not a directory".into(),
        });
    }
    if !path.join("cgroup.procs").exists() {
        return Err(KernelError::Cgroup {
            path: path.to_owned(),
            message: "no cgroup.procs: not a cgroup directory".into(),
        });
    }
    Ok(md.ino())
}

/// Mount points of cgroup2 filesystems, from /proc/self/mountinfo.
pub fn cgroup2_mounts() -> Vec<PathBuf> {
    mounts_of_type("cgroup2")
}

/// Mount points whose filesystem type is `fstype`.
pub fn mounts_of_type(fstype: &str) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            // ... mount_point ... - fstype source options
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split(' ').nth(4)?;
            (right.split(' ').next()? == fstype).then(|| PathBuf::from(mp))
        })
        .collect()
}

/// Is `path` on a cgroup2 filesystem?
pub fn is_cgroup2(path: &Path) -> bool {
    cgroup2_mounts().iter().any(|m| path.starts_with(m))
}

/// Is `path` the cgroup `root` or below it (both resolved through symlinks)?
pub fn is_below(path: &Path, root: &Path) -> bool {
    match (std::fs::canonicalize(path), std::fs::canonicalize(root)) {
        (Ok(p), Ok(r)) => p.starts_with(r),
        _ => false,
    }
}

/// cgroup2 mount points that show the whole hierarchy (their root is `/`), e.g. the
/// host's cgroupfs bound into the daemon's pod, not a container's own subtree.
pub fn cgroup2_full_mounts() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let mp = f.get(4)?;
            (right.split(' ').next()? == "cgroup2" && f.get(3) == Some(&"/"))
                .then(|| PathBuf::from(mp))
        })
        .collect()
}

/// Is `name` the cgroup directory the kubelet (cgroupfs: `pod<UID>`; systemd:
/// `kubepods-<qos>-pod<UID_>.slice`) or runc made for pod `uid`?
fn is_pod_dir(name: &str, uid: &str) -> bool {
    name == format!("pod{uid}") || name.ends_with(&format!("pod{}.slice", uid.replace('-', "_")))
}

/// The kubelet's pod cgroup root (`kubepods` or `kubepods.slice`, wherever its
/// cgroupRoot put it) in cgroup v2, found from a pod known to live below it: the
/// daemon's own (its UID from the downward API).
pub fn kubelet_root_of_pod(uid: &str) -> Result<PathBuf, KernelError> {
    const MAX_DEPTH: usize = 8;
    let mounts = cgroup2_full_mounts();
    for m in &mounts {
        let mut queue = std::collections::VecDeque::from([(m.clone(), 0usize)]);
        while let Some((dir, depth)) = queue.pop_front() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name();
                let name = name.to_string_lossy();
                if is_pod_dir(&name, uid) {
                    let pod = e.path();
                    return pod
                        .ancestors()
                        .take_while(|a| a.starts_with(m))
                        .find(|a| {
                            a.file_name()
                                .is_some_and(|n| n == "kubepods" || n == "kubepods.slice")
                        })
                        .map(Path::to_path_buf)
                        .ok_or_else(|| KernelError::Cgroup {
                            path: pod.clone(),
                            message: "the pod's cgroup has no `kubepods` ancestor".into(),
                        });
                }
                if depth < MAX_DEPTH {
                    queue.push_back((e.path(), depth + 1));
                }
            }
        }
    }
    Err(KernelError::Cgroup {
        path: mounts.first().cloned().unwrap_or_default(),
        message: format!(
            "no cgroup v2 directory of pod {uid} below {} (is the host's /sys/fs/cgroup mounted into the pod?)",
            mounts
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::is_pod_dir;

    #[test]
    fn pod_directories_of_both_drivers() {
        let uid = "3f2a1c9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b";
        assert!(is_pod_dir(&format!("pod{uid}"), uid));
        assert!(is_pod_dir(
            "kubepods-besteffort-pod3f2a1c9e_5b7d_4e8f_9a0b_1c2d3e4f5a6b.slice",
            uid
        ));
        assert!(!is_pod_dir("pod3f2a1c9e", uid));
        assert!(!is_pod_dir("kubepods-besteffort.slice", uid));
    }
}
