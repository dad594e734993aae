//! Building the eBPF object on stable Rust without rust-src (shared/notes/ebpf-toolchain.md):
//! the eBPF crate is compiled for the *host* target with `-C linker-plugin-lto`, so every
//! crate (including the prebuilt `core`) carries LLVM bitcode, and bpf-linker retargets
//! the bitcode to BPF. Two shims make that work, both this same binary under another name:
//!
//! - `pc-bpf-link`: rustc calls its linker cc-style; keep only the object/rlib inputs and
//!   `-o`, drop rustc's `symbols.o` (no bitcode), read the exported symbols from the
//!   `--version-script`, and run `bpf-linker --target bpfel --btf`.
//! - `pc-bpf-rustc`: a RUSTC_WRAPPER that sets `cfg(target_arch = "bpf")` for
//!   `aya_log_ebpf` only (it declares its maps only under that cfg; setting it for every
//!   crate breaks aya-ebpf-cty).
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    paths,
    run::{self, step},
    setup,
};

const LINK_SHIM: &str = "pc-bpf-link";
const RUSTC_SHIM: &str = "pc-bpf-rustc";
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";
const BPF_LINKER_ENV: &str = "PORTCULLIS_BPF_LINKER";

/// Called first in `main`: runs the shim named `name`, if it is one.
pub fn dispatch_shim(name: &str) -> Result<Option<i32>> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match name {
        LINK_SHIM => link_shim(&args).map(Some),
        RUSTC_SHIM => rustc_shim(&args).map(Some),
        _ => Ok(None),
    }
}

/// Builds the eBPF object, then the daemon and test helpers, which embed/locate it.
pub fn build_all() -> Result<PathBuf> {
    let obj = build_object()?;
    step("building the daemon and test helpers (release)");
    run::status(
        Command::new("cargo")
            .current_dir(paths::root())
            .args(["build", "--release", "--workspace", "--bins"])
            .env("PORTCULLIS_BPF_OBJECT", &obj),
    )?;
    Ok(obj)
}

pub fn build_object() -> Result<PathBuf> {
    let linker = setup::bpf_linker()?;
    let tools = paths::target().join("bpf-tools");
    std::fs::create_dir_all(&tools)?;
    let me = std::env::current_exe().context("locating the xtask binary")?;
    for shim in [LINK_SHIM, RUSTC_SHIM] {
        let p = tools.join(shim);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(&me, &p)
            .with_context(|| format!("linking {} -> {}", p.display(), me.display()))?;
    }

    step("building the eBPF programs (stable rustc + bpf-linker, target bpfel)");
    let target_dir = paths::target().join("bpf");
    let rustflags = format!(
        "-C linker-plugin-lto -C linker={} -C panic=abort",
        tools.join(LINK_SHIM).display()
    );
    run::status(
        Command::new("cargo")
            .current_dir(paths::root().join("ebpf"))
            .args(["build", "--release", "--lib", "--target", HOST_TARGET])
            .arg("--target-dir")
            .arg(&target_dir)
            // With an explicit --target, RUSTFLAGS reach only the target crates, not
            // build scripts or proc-macros (which must stay ordinary host code).
            .env("RUSTFLAGS", rustflags)
            .env("RUSTC_WRAPPER", tools.join(RUSTC_SHIM))
            .env(BPF_LINKER_ENV, &linker)
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )?;
    let built = target_dir
        .join(HOST_TARGET)
        .join("release/libportcullis_ebpf.so");
    let obj = paths::bpf_object();
    std::fs::copy(&built, &obj)
        .with_context(|| format!("copying {} to {}", built.display(), obj.display()))?;
    check_bpf_elf(&obj)?;
    run::note(&format!("eBPF object: {}", obj.display()));
    Ok(obj)
}

/// The output must be an ELF for EM_BPF (247), not a host library.
fn check_bpf_elf(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path)?;
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        bail!("{} is not an ELF file", path.display());
    }
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    if machine != 247 {
        bail!(
            "{} has ELF machine {machine}, not BPF (247): the linker shim was bypassed",
            path.display()
        );
    }
    Ok(())
}

fn rustc_shim(args: &[OsString]) -> Result<i32> {
    let (rustc, rest) = args
        .split_first()
        .context("pc-bpf-rustc: expected the rustc path as first argument")?;
    let mut cmd = Command::new(rustc);
    cmd.args(rest);
    let is_aya_log = rest
        .windows(2)
        .any(|w| w[0] == "--crate-name" && w[1] == "aya_log_ebpf");
    if is_aya_log {
        cmd.args([
            "--cfg",
            "target_arch=\"bpf\"",
            "-A",
            "explicit_builtin_cfgs_in_flags",
        ]);
    }
    Ok(cmd.status()?.code().unwrap_or(1))
}

/// Expands `@file` response-file arguments the way cc does.
fn expand_args(args: &[OsString]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for a in args {
        let a = a.to_string_lossy();
        if let Some(file) = a.strip_prefix('@') {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading linker response file {file}"))?;
            out.extend(text.lines().map(|l| l.trim_matches('"').to_string()));
        } else {
            out.push(a.into_owned());
        }
    }
    Ok(out)
}

fn link_shim(args: &[OsString]) -> Result<i32> {
    let args = expand_args(args)?;
    let linker = std::env::var_os(BPF_LINKER_ENV).context(
        "pc-bpf-link: PORTCULLIS_BPF_LINKER is not set (run through `cargo xtask build`)",
    )?;
    let mut output = None;
    let mut inputs = Vec::new();
    let mut exports = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-o" {
            output = it.next().cloned();
        } else if let Some(script) = a.strip_prefix("-Wl,--version-script=") {
            exports.extend(version_script_exports(Path::new(script))?);
        } else if a.starts_with('-') {
            continue;
        } else if (a.ends_with(".o") || a.ends_with(".rlib") || a.ends_with(".a"))
            && !Path::new(a)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("symbols.o"))
        {
            inputs.push(a.clone());
        }
    }
    let output = output.context("pc-bpf-link: rustc passed no -o")?;
    if exports.is_empty() {
        bail!("pc-bpf-link: no exported symbols found (is the eBPF crate a cdylib?)");
    }
    let status = Command::new(linker)
        .args(["--target", "bpfel", "--btf", "--export"])
        .arg(exports.join(","))
        .arg("-o")
        .arg(&output)
        .args(&inputs)
        .status()
        .context("running bpf-linker")?;
    Ok(status.code().unwrap_or(1))
}

/// Names between `global:` and `local:` in a linker version script.
fn version_script_exports(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading version script {}", path.display()))?;
    let mut in_global = false;
    let mut out = Vec::new();
    for tok in text.split(|c: char| c.is_whitespace() || c == ';' || c == '{' || c == '}') {
        match tok {
            "" => {}
            "global:" => in_global = true,
            "local:" => in_global = false,
            t if in_global && t != "*" => out.push(t.to_string()),
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_script_globals_only() {
        let dir = tempfile::Builder::new().prefix("pc-vs-").tempdir().unwrap();
        let p = dir.path().join("vs");
        std::fs::write(
            &p,
            "{\n  global:\n    pc_connect4;\n    PC_EVENTS;\n\n  local:\n    *;\n};\n",
        )
        .unwrap();
        assert_eq!(
            version_script_exports(&p).unwrap(),
            vec!["pc_connect4".to_string(), "PC_EVENTS".to_string()]
        );
    }
}
