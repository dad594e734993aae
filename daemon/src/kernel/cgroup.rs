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
