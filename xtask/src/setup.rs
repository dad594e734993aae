//! Idempotent installation of what the build and the tests need, into caches.
//!
//! - apt packages, only when the program they provide is missing;
//! - bpf-linker, built from crates.io against rustc's *own* libLLVM, so its LLVM major
//!   always equals the one that produced the bitcode it links (see
//!   shared/notes/ebpf-toolchain.md). The install is keyed by rustc's version: a new
//!   toolchain gets a new bpf-linker, and an LLVM major this bpf-linker cannot build
//!   against is reported with what to do.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{
    paths,
    run::{self, note, step},
};

pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors bpf-linker 0.13.0 has a cargo feature for.
const BPF_LINKER_LLVM_MAJORS: &[u32] = &[19, 20, 21, 22];

/// (program, Debian package, why it is needed)
const APT_TOOLS: &[(&str, &str, &str)] = &[
    (
        "ip",
        "iproute2",
        "tests build network namespaces and veth pairs",
    ),
    (
        "nsenter",
        "util-linux",
        "tests enter network namespaces without remounting /sys",
    ),
    ("mount", "mount", "mounting bpffs / securityfs when absent"),
];

pub fn all() -> Result<()> {
    apt_tools()?;
    build_tools()
}

/// Tools the build itself needs.
pub fn build_tools() -> Result<()> {
    bpf_linker().map(|_| ())
}

pub fn apt_tools() -> Result<()> {
    let missing: Vec<_> = APT_TOOLS
        .iter()
        .filter(|(prog, _, _)| !run::have(prog))
        .collect();
    if missing.is_empty() {
        step("system tools: ip, nsenter, mount present");
        return Ok(());
    }
    let pkgs: Vec<&str> = missing.iter().map(|(_, pkg, _)| *pkg).collect();
    step(&format!("installing Debian packages {}", pkgs.join(" ")));
    for (prog, pkg, why) in &missing {
        note(&format!("{pkg} for `{prog}`: {why}"));
    }
    apt_install(&pkgs)
}

pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    if !run::is_root() {
        bail!(
            "installing {} needs root (apt-get); run as root or install them yourself",
            pkgs.join(" ")
        );
    }
    run::status(Command::new("apt-get").args(["update", "-q"]))?;
    run::status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub struct Rustc {
    pub release: String,
    pub llvm_major: u32,
    pub sysroot: PathBuf,
}

pub fn rustc_info() -> Result<Rustc> {
    let vv = run::output(Command::new("rustc").arg("-vV"))?;
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .with_context(|| format!("`rustc -vV` printed no `{name}` line"))
    };
    let release = field("release:")?;
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major from `{llvm}`"))?;
    let sysroot =
        PathBuf::from(run::output(Command::new("rustc").args(["--print", "sysroot"]))?.trim());
    Ok(Rustc {
        release,
        llvm_major,
        sysroot,
    })
}

/// A bpf-linker can be built against this rustc's LLVM only if it has a feature for it.
fn check_llvm_major(release: &str, major: u32) -> Result<()> {
    if !BPF_LINKER_LLVM_MAJORS.contains(&major) {
        bail!(
            "rustc {release} uses LLVM {major}, but bpf-linker {BPF_LINKER_VERSION} can only be \
             built against LLVM {BPF_LINKER_LLVM_MAJORS:?}. Bump BPF_LINKER_VERSION in \
             xtask/src/setup.rs to a release with an `llvm-{major}` feature, or use the Rust \
             toolchain this repository pins."
        );
    }
    Ok(())
}

/// Path to a bpf-linker whose LLVM matches rustc's, installing it when needed.
pub fn bpf_linker() -> Result<PathBuf> {
    let rustc = rustc_info()?;
    check_llvm_major(&rustc.release, rustc.llvm_major)?;
    let key = format!(
        "bpf-linker-{BPF_LINKER_VERSION}-rustc-{}-llvm{}",
        rustc.release, rustc.llvm_major
    );
    let root = paths::cache().join("tools").join(&key);
    let bin = root.join("bin/bpf-linker");
    if bin.exists()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    {
        return Ok(bin);
    }

    // rustc ships its LLVM as one shared library; give bpf-linker's build an LLVM
    // "prefix" made of symlinks to it.
    let lib_name = std::fs::read_dir(rustc.sysroot.join("lib"))
        .context("reading rustc's sysroot lib directory")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}/lib: this toolchain does not ship LLVM as a shared \
                 library; install Debian's llvm-{}-dev and point LLVM_PREFIX at it",
                rustc.sysroot.display(),
                rustc.llvm_major
            )
        })?;
    let prefix = paths::cache().join(format!("llvm-rust-{}", rustc.release));
    let lib_dir = prefix.join("lib");
    std::fs::create_dir_all(&lib_dir)?;
    let target = rustc.sysroot.join("lib").join(&lib_name);
    for link in ["libLLVM.so".to_string(), lib_name.clone()] {
        let p = lib_dir.join(&link);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(&target, &p)
            .with_context(|| format!("linking {} -> {}", p.display(), target.display()))?;
    }

    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against rustc's own LLVM {} (~2 min, once per toolchain)",
        rustc.llvm_major
    ));
    note(
        "why: rustc emits LLVM bitcode for the eBPF crate and bpf-linker must read the same LLVM major",
    );
    run::status(
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{}", rustc.llvm_major),
                "--root",
            ])
            .arg(&root)
            .env("LLVM_PREFIX", &prefix)
            // Do not let a parent build's flags leak into this unrelated build.
            .env_remove("RUSTFLAGS")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    if !bin.exists() {
        bail!("cargo install finished but {} is missing", bin.display());
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::check_llvm_major;

    #[test]
    fn a_new_llvm_major_is_caught_with_what_to_do() {
        check_llvm_major("1.95.0", 22).expect("LLVM 22 is supported");
        let e = check_llvm_major("1.99.0", 23).unwrap_err().to_string();
        assert!(
            e.contains("LLVM 23") && e.contains("llvm-23") && e.contains("BPF_LINKER_VERSION"),
            "{e}"
        );
    }
}
