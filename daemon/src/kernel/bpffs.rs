//! bpffs: where pins live. Mounted at /sys/fs/bpf on most distributions; not on this
//! machine kind by default.
use std::path::Path;

use super::{KernelError, sys};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Is `path` on a bpf filesystem?
pub fn is_bpffs(path: &Path) -> bool {
    sys::is_fs_type(path, BPF_FS_MAGIC)
}

/// Makes sure `dir`'s parent is bpffs, mounting it there when `mount` allows.
pub fn ensure(dir: &Path, mount: bool) -> Result<(), KernelError> {
    let parent = dir.parent().unwrap_or(dir);
    if is_bpffs(parent) {
        return Ok(());
    }
    let err = |m: String| KernelError::Bpffs {
        path: parent.to_owned(),
        message: m,
    };
    if !mount {
        return Err(err("not a bpf filesystem; mount it (`mount -t bpf bpf /sys/fs/bpf`) or set kernel.mount_bpffs".into()));
    }
    std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    sys::mount_bpffs(parent).map_err(|e| err(format!("mounting bpffs failed: {e}")))?;
    tracing::info!(path = %parent.display(), "mounted bpffs");
    Ok(())
}
