//! `cargo xtask test` and `cargo xtask demo`.
use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    ebpf, node, paths,
    run::{self, step},
    setup,
};

/// `install` runs last: it replaces whatever the e2e tier left with `kubectl apply -k deploy/`.
const TIERS: &[&str] = &["unit", "kernel", "e2e", "install"];

fn require_root(what: &str) -> Result<()> {
    if !run::is_root() {
        bail!(
            "{what} needs root: it creates cgroups and network namespaces and loads eBPF \
             programs into the running kernel. Run it as root (CI does)."
        );
    }
    Ok(())
}

pub fn run(tiers: &[String], args: &[String]) -> Result<()> {
    let tiers: Vec<&str> = if tiers.is_empty() {
        TIERS.to_vec()
    } else {
        for t in tiers {
            if !TIERS.contains(&t.as_str()) {
                bail!("unknown tier `{t}`; tiers: {}", TIERS.join(", "));
            }
        }
        tiers.iter().map(String::as_str).collect()
    };
    let result = run_tiers(&tiers, args);
    run::print_times();
    result
}

fn run_tiers(tiers: &[&str], args: &[String]) -> Result<()> {
    run::timed("setup", setup::all)?;
    // Installed before anything runs, so a missing part fails the run up front.
    let node = if tiers.contains(&"e2e") || tiers.contains(&"install") {
        Some(run::timed("node parts", node::ensure)?)
    } else {
        None
    };
    let obj = run::timed("build", ebpf::build_all)?;

    if tiers.contains(&"unit") {
        step("tier unit: in-process tests of every crate (no root needed)");
        run::timed("unit tier", || {
            run::status(
                Command::new("cargo")
                    .current_dir(paths::root())
                    .args(["test", "--release", "--workspace", "--lib", "--bins"])
                    .env("PORTCULLIS_BPF_OBJECT", &obj)
                    .args(args),
            )?;
            // The daemon's check of its own source: imports against its layer table.
            run::status(
                Command::new("cargo")
                    .current_dir(paths::root())
                    .args(["test", "--release", "-p", "portcullis", "--test", "layers"])
                    .env("PORTCULLIS_BPF_OBJECT", &obj)
                    .args(args),
            )
        })?;
    }
    if tiers.contains(&"kernel") {
        require_root("the kernel tier")?;
        step("tier kernel: real programs in the running kernel, own cgroups and netns");
        run::timed("kernel tier", || {
            run::status(
                Command::new("cargo")
                    .current_dir(paths::root())
                    .args([
                        "test",
                        "--release",
                        "-p",
                        "portcullis-tests",
                        "--test",
                        "kernel",
                    ])
                    .env("PORTCULLIS_BPF_OBJECT", &obj)
                    .env("PORTCULLIS_BIN_DIR", paths::target().join("release"))
                    .arg("--")
                    .arg("--test-threads=1")
                    .args(args),
            )
        })?;
    }
    let Some(up) = node else { return Ok(()) };
    if tiers.contains(&"e2e") {
        require_root("the e2e tier")?;
        step(&format!(
            "tier e2e: real agent pods (kubectl, the Python client) through the gate on a real \
             Kubernetes {} node",
            up.kubernetes_version
        ));
        let mut cmd = Command::new("cargo");
        cmd.current_dir(paths::root())
            .args([
                "test",
                "--release",
                "-p",
                "portcullis-tests",
                "--test",
                "e2e",
            ])
            .env("PORTCULLIS_BPF_OBJECT", &obj)
            .env("PORTCULLIS_BIN_DIR", paths::target().join("release"))
            .arg("--")
            .args(args);
        node::export(&up, &mut cmd);
        run::timed("e2e tier", || run::status(&mut cmd))?;
    }
    if tiers.contains(&"install") {
        require_root("the install tier")?;
        step("tier install: deploy/ applied with kubectl apply -k; agents gated by the DaemonSet");
        let mut cmd = Command::new("cargo");
        cmd.current_dir(paths::root())
            .args([
                "test",
                "--release",
                "-p",
                "portcullis-tests",
                "--test",
                "install",
            ])
            .env("PORTCULLIS_BPF_OBJECT", &obj)
            .env("PORTCULLIS_BIN_DIR", paths::target().join("release"))
            .arg("--")
            .args(args);
        node::export(&up, &mut cmd);
        run::timed("install tier", || run::status(&mut cmd))?;
    }
    Ok(())
}

/// Runs the lab binary (tests/src/bin/pc-lab.rs) as root with `sub` and `args`;
/// `real_upstream`: it also needs the real kube-apiserver and clients.
pub fn lab(sub: &[&str], args: &[String], real_upstream: bool) -> Result<()> {
    lab_with_env(sub, args, real_upstream, &[])
}

pub fn lab_with_env(
    sub: &[&str],
    args: &[String],
    real_upstream: bool,
    env: &[(&str, std::path::PathBuf)],
) -> Result<()> {
    require_root("the lab")?;
    setup::all()?;
    let up = if real_upstream {
        Some(node::ensure()?)
    } else {
        None
    };
    ebpf::build_all()?;
    let mut cmd = Command::new(paths::release_bin("pc-lab"));
    cmd.args(sub)
        .args(args)
        .env("PORTCULLIS_BIN_DIR", paths::target().join("release"));
    if let Some(up) = &up {
        node::export(up, &mut cmd);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run::status(&mut cmd)
}

pub fn demo() -> Result<()> {
    lab(&["demo"], &[], true)
}
