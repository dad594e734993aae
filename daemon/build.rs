//! Embeds the eBPF object when one is available (`cargo xtask build` sets
//! PORTCULLIS_BPF_OBJECT; otherwise target/bpf/portcullis.bpf.o is used if present).
//! Without one the daemon still builds (for clippy, unit tests) and needs
//! `kernel.bpf_object` in its config at run time.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(embedded_bpf)");
    println!("cargo::rerun-if-env-changed=PORTCULLIS_BPF_OBJECT");
    let manifest = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .expect("cargo sets CARGO_MANIFEST_DIR for build scripts"),
    );
    let candidate = std::env::var_os("PORTCULLIS_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/portcullis.bpf.o"));
    println!("cargo::rerun-if-changed={}", candidate.display());
    if candidate.is_file() {
        println!("cargo::rustc-cfg=embedded_bpf");
        println!(
            "cargo::rustc-env=PORTCULLIS_BPF_OBJECT_PATH={}",
            candidate
                .canonicalize()
                .unwrap_or_else(|e| panic!("resolving {}: {e}", candidate.display()))
                .display()
        );
    }
}
