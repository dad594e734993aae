//! Where things live: the repository, its target dir, and the tools cache outside it.
use std::path::PathBuf;

/// Repository root (xtask's manifest dir is `<root>/xtask`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
        .to_path_buf()
}

pub fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Cache for installed tools, kept outside the repository so a fresh clone reuses it:
/// `$PORTCULLIS_CACHE`, else `$XDG_CACHE_HOME/portcullis`, else `~/.cache/portcullis`.
pub fn cache() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTCULLIS_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("portcullis");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/portcullis")
}

/// The built eBPF object.
pub fn bpf_object() -> PathBuf {
    target().join("bpf/portcullis.bpf.o")
}

pub fn release_bin(name: &str) -> PathBuf {
    target().join("release").join(name)
}
