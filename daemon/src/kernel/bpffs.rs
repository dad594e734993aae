//! bpffs: where pins live. Mounted at /sys/fs/bpf on most distributions; not on this
//! machine kind by default.
use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

use super::KernelError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Is `path` on a bpf filesystem?
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
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
    let target = CString::new(parent.as_os_str().as_bytes()).map_err(|e| err(e.to_string()))?;
    // SAFETY: all pointers are valid NUL-terminated strings owned here; mount(2) does not
    // keep them.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(format!(
            "mounting bpffs failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    tracing::info!(path = %parent.display(), "mounted bpffs");
    Ok(())
}
