//! The real node the e2e tier, the demo and the proxy benchmark run on: Kubernetes
//! (kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubelet and
//! kubectl of ONE version), etcd, containerd + runc and the CNI plugins, all built from
//! their Go modules with the machine's Go (`GOTOOLCHAIN=local`), plus a static pause
//! binary and the Python `kubernetes` client.
//!
//! Versions are pinned in small wrapper modules under `xtask/go/<part>/` whose `go.mod`
//! and `go.sum` are committed: `go.mod` is the one place a version is written, and
//! `cargo xtask bump PART VERSION` rewrites it (for Kubernetes, with the `replace`
//! lines for every staging module taken from that release's own go.mod). A part is
//! rebuilt only when its wrapper module or the Go version changed (a stamp beside the
//! binaries records what they were built from).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    paths,
    run::{self, note, step},
    setup,
};

const PY_KUBERNETES: &str = "31.0.0";

/// Free space the Go module and build caches need for a cold build (measured: ~2 GB
/// of modules, ~3 GB of build cache, the binaries ~0.7 GB).
const GO_CACHE_BYTES: u64 = 8 << 30;

/// One Go-built part: its wrapper module directory name, the packages to build, and
/// whether it needs cgo.
struct Part {
    name: &'static str,
    why: &'static str,
    packages: &'static [&'static str],
    cgo: bool,
    tags: &'static str,
    /// Output file name when a single package's binary is named after the module root.
    rename: Option<&'static str>,
}

const PARTS: &[Part] = &[
    Part {
        name: "kubernetes",
        why: "the control plane and a real kubelet: agents are real pods on a current cluster",
        packages: &[
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes/cmd/kube-proxy",
            "k8s.io/kubernetes/cmd/kubelet",
            "k8s.io/kubernetes/cmd/kubectl",
        ],
        cgo: false,
        tags: "",
        rename: None,
    },
    Part {
        name: "etcd",
        why: "the apiserver's store (Debian's etcd 3.4 is older than current apiservers expect)",
        packages: &["go.etcd.io/etcd/server/v3"],
        cgo: false,
        tags: "",
        rename: Some("etcd"),
    },
    Part {
        name: "containerd",
        why: "the container runtime (kubelets from 1.36 need containerd 2.x)",
        packages: &[
            "github.com/containerd/containerd/v2/cmd/containerd",
            "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
            "github.com/containerd/containerd/v2/cmd/ctr",
        ],
        cgo: false,
        tags: "",
        rename: None,
    },
    Part {
        name: "runc",
        why: "the OCI runtime that creates the pods' cgroups and namespaces",
        packages: &["github.com/opencontainers/runc"],
        cgo: true,
        tags: "seccomp urfave_cli_no_docs",
        rename: Some("runc"),
    },
    Part {
        name: "informer",
        why: "a real client-go informer (WatchList) for the e2e tier (test-only client)",
        packages: &["."],
        cgo: false,
        tags: "",
        rename: Some("pc-informer"),
    },
    Part {
        name: "cni",
        why: "pod networking (bridge, host-local, loopback, portmap)",
        packages: &[
            "github.com/containernetworking/plugins/plugins/main/bridge",
            "github.com/containernetworking/plugins/plugins/main/loopback",
            "github.com/containernetworking/plugins/plugins/ipam/host-local",
            "github.com/containernetworking/plugins/plugins/meta/portmap",
        ],
        cgo: false,
        tags: "",
        rename: None,
    },
];

/// The module each wrapper pins (the first `require`), for messages and `bump`.
fn pinned_module(part: &str) -> &'static str {
    match part {
        "kubernetes" => "k8s.io/kubernetes",
        "etcd" => "go.etcd.io/etcd/server/v3",
        "containerd" => "github.com/containerd/containerd/v2",
        "runc" => "github.com/opencontainers/runc",
        "cni" => "github.com/containernetworking/plugins",
        "informer" => "k8s.io/client-go",
        _ => "",
    }
}

/// Where the e2e harness finds each real part.
pub struct NodeParts {
    /// Every node binary: etcd, kube-*, kubelet, kubectl, containerd*, ctr, runc, pause.
    pub bin_dir: PathBuf,
    /// The CNI plugins.
    pub cni_dir: PathBuf,
    /// The Python `kubernetes` client (a pip `--target` directory).
    pub pythonpath: PathBuf,
    /// The Python interpreter the agent image copies.
    pub python: PathBuf,
    pub kubernetes_version: String,
}

/// Tells the harness (tests/src/node) where each part is.
pub fn export(p: &NodeParts, cmd: &mut Command) {
    cmd.env("PORTCULLIS_NODE_BIN_DIR", &p.bin_dir)
        .env("PORTCULLIS_CNI_BIN_DIR", &p.cni_dir)
        .env("PORTCULLIS_PYTHONPATH", &p.pythonpath)
        .env("PORTCULLIS_PYTHON", &p.python)
        .env("PORTCULLIS_K8S_VERSION", &p.kubernetes_version);
}

fn go_dir(part: &str) -> PathBuf {
    match part {
        // Test-only clients live beside the tests.
        "informer" => paths::root().join("tests/go").join(part),
        _ => paths::root().join("xtask/go").join(part),
    }
}

/// The version a wrapper module pins for its part.
pub fn pinned_version(part: &str) -> Result<String> {
    let gomod = go_dir(part).join("go.mod");
    let text =
        std::fs::read_to_string(&gomod).with_context(|| format!("reading {}", gomod.display()))?;
    let module = pinned_module(part);
    text.lines()
        .find_map(|l| {
            let l = l.split("//").next().unwrap_or("");
            let l = l.trim().trim_start_matches("require").trim();
            let (m, v) = l.split_once(' ')?;
            (m == module).then(|| v.trim().to_string())
        })
        .with_context(|| format!("{} requires no {module}", gomod.display()))
}

pub fn kubernetes_version() -> Result<String> {
    pinned_version("kubernetes")
}

fn node_dir() -> PathBuf {
    paths::cache().join("node")
}

pub fn ensure() -> Result<NodeParts> {
    packages()?;
    let go = go_version()?;
    let bin_dir = node_dir().join("bin");
    let cni_dir = node_dir().join("cni");
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::create_dir_all(&cni_dir)?;
    let stale: Vec<&Part> = PARTS
        .iter()
        .filter(|p| stamp(p, &go).ok() != read_stamp(p))
        .collect();
    if !stale.is_empty() {
        check_free_space()?;
    }
    for part in PARTS {
        let version = pinned_version(part.name)?;
        let out = if part.name == "cni" {
            &cni_dir
        } else {
            &bin_dir
        };
        if !stale.iter().any(|p| p.name == part.name) {
            step(&format!(
                "{} {version}: cached in {}",
                part.name,
                out.display()
            ));
            continue;
        }
        build(part, &version, &go, out)?;
    }
    pause(&bin_dir)?;
    let (python, pythonpath) = python_client()?;
    Ok(NodeParts {
        bin_dir,
        cni_dir,
        pythonpath,
        python,
        kubernetes_version: kubernetes_version()?,
    })
}

fn packages() -> Result<()> {
    // (present when, package, why)
    let wanted: [(bool, &str, &str); 4] = [
        (
            Path::new("/usr/include/seccomp.h").exists(),
            "libseccomp-dev",
            "runc is built with cgo against libseccomp (seccomp profiles for containers)",
        ),
        (
            run::have("nft"),
            "nftables",
            "kube-proxy's nftables mode programs Service addresses with `nft`",
        ),
        (
            Path::new("/bin/busybox").exists(),
            "busybox-static",
            "the pods' images get their shell and tools from one static busybox",
        ),
        (
            Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists() && run::have("gcc"),
            "gcc libc6-dev",
            "the pause binary is a static C program",
        ),
    ];
    let missing: Vec<_> = wanted.iter().filter(|(have, ..)| !have).collect();
    if missing.is_empty() {
        step("node packages: libseccomp-dev, nftables, busybox-static, gcc present");
        return Ok(());
    }
    for (_, pkg, why) in &missing {
        note(&format!("{pkg}: {why}"));
    }
    let pkgs: Vec<&str> = missing.iter().flat_map(|(_, p, _)| p.split(' ')).collect();
    step(&format!("installing Debian packages {}", pkgs.join(" ")));
    setup::apt_install(&pkgs)
}

/// `go version` of the machine's Go (never a downloaded toolchain).
fn go_version() -> Result<String> {
    let out = run::output(go().arg("version")).context(
        "the node parts are built with Go (the polyglot machine has it on PATH); install Go 1.26",
    )?;
    Ok(out.trim().to_string())
}

fn go() -> Command {
    let mut c = Command::new("go");
    c.env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false")
        // A parent cargo's flags mean nothing to go.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    c
}

/// What a part's binaries are built from: its go.mod, go.sum, the packages and flags,
/// and the Go version.
fn stamp(part: &Part, go: &str) -> Result<String> {
    let dir = go_dir(part.name);
    let mut s = String::new();
    for f in ["go.mod", "go.sum"] {
        let p = dir.join(f);
        s.push_str(
            &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
        );
    }
    s.push_str(go);
    s.push_str(&part.packages.join(" "));
    s.push_str(part.tags);
    Ok(format!("{:016x}", fnv1a(s.as_bytes())))
}

fn stamp_file(part: &Part) -> PathBuf {
    node_dir().join(format!("{}.stamp", part.name))
}

fn read_stamp(part: &Part) -> Option<String> {
    std::fs::read_to_string(stamp_file(part))
        .ok()
        .map(|s| s.trim().to_string())
}

/// FNV-1a: a stable content key for the stamp (not a security boundary).
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100000001b3)
    })
}

fn check_free_space() -> Result<()> {
    let gocache = run::output(go().args(["env", "GOCACHE"]))?
        .trim()
        .to_string();
    let probe = Path::new(&gocache)
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let out = run::output(Command::new("df").arg("-Pk").arg(&probe))?;
    let avail_kb: u64 = out
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("cannot read free space from `df -Pk`: {out}"))?;
    let avail = avail_kb * 1024;
    note(&format!(
        "free disk for the Go caches ({}): {:.1} GB",
        probe.display(),
        avail as f64 / 1e9
    ));
    ensure!(
        avail >= GO_CACHE_BYTES,
        "building the node parts needs about {:.0} GB free for the Go module and build caches \
         ({}), but only {:.1} GB is free",
        GO_CACHE_BYTES as f64 / 1e9,
        probe.display(),
        avail as f64 / 1e9
    );
    Ok(())
}

fn build(part: &Part, version: &str, go_version: &str, out: &Path) -> Result<()> {
    let minutes = match part.name {
        "kubernetes" => "~10 min on 2 cores cold",
        "containerd" => "~1 min",
        _ => "under a minute",
    };
    step(&format!(
        "building {} {version} from its Go modules ({minutes}, once)",
        part.name
    ));
    note(&format!("why: {}", part.why));
    let t = Instant::now();
    let mut ldflags = String::from("-s -w");
    if part.name == "kubernetes" {
        let v = version.trim_start_matches('v');
        let mut it = v.split('.');
        let (major, minor) = (it.next().unwrap_or("1"), it.next().unwrap_or("0"));
        for pkg in [
            "k8s.io/component-base/version",
            "k8s.io/client-go/pkg/version",
        ] {
            ldflags.push_str(&format!(
                " -X {pkg}.gitVersion={version} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} \
                 -X {pkg}.gitTreeState=clean -X {pkg}.buildDate=1970-01-01T00:00:00Z"
            ));
        }
    }
    let tmp = out.join(format!(".building-{}", part.name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut cmd = go();
    cmd.current_dir(go_dir(part.name))
        .env("CGO_ENABLED", if part.cgo { "1" } else { "0" })
        .args(["build", "-trimpath", "-ldflags", &ldflags]);
    if !part.tags.is_empty() {
        cmd.args(["-tags", part.tags]);
    }
    match part.rename {
        Some(name) => cmd.arg("-o").arg(tmp.join(name)),
        None => cmd.arg("-o").arg(format!("{}/", tmp.display())),
    };
    cmd.args(part.packages);
    run::status(&mut cmd).with_context(|| format!("building {} {version}", part.name))?;
    for e in std::fs::read_dir(&tmp)? {
        let e = e?;
        std::fs::rename(e.path(), out.join(e.file_name()))?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::write(stamp_file(part), stamp(part, go_version)?)?;
    note(&format!(
        "built {} in {:.0} s",
        part.name,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The pod sandbox's pause process: Kubernetes' own `build/pause/linux/pause.c`, from
/// the pinned module, linked statically.
fn pause(bin_dir: &Path) -> Result<()> {
    let dest = bin_dir.join("pause");
    let dir = run::output(go().current_dir(go_dir("kubernetes")).args([
        "list",
        "-m",
        "-f",
        "{{.Dir}}",
        "k8s.io/kubernetes",
    ]))?;
    let source = Path::new(dir.trim()).join("build/pause/linux/pause.c");
    let marker = bin_dir.join("pause.source");
    let from = source.display().to_string();
    if dest.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(from.as_str()) {
        step("pause: cached");
        return Ok(());
    }
    step("building the static pause binary from Kubernetes' pause.c");
    run::status(
        Command::new("gcc")
            .args(["-Os", "-static", "-DVERSION=portcullis", "-o"])
            .arg(&dest)
            .arg(&source),
    )?;
    std::fs::write(marker, from)?;
    Ok(())
}

/// Python's `kubernetes` client, installed with pip into the cache (not the system);
/// returns (the interpreter, the package directory).
fn python_client() -> Result<(PathBuf, PathBuf)> {
    if !run::have("python3") {
        step("python3 missing; installing Debian's python3 and pip");
        setup::apt_install(&["python3", "python3-pip"])?;
    }
    let python = PathBuf::from(
        run::output(Command::new("python3").args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ]))?
        .trim(),
    );
    let dir = paths::cache().join(format!("python-kubernetes-{PY_KUBERNETES}"));
    let probe = |dir: &Path| {
        Command::new(&python)
            .args([
                "-c",
                "import kubernetes, sys; print(kubernetes.__version__)",
            ])
            .env("PYTHONPATH", dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if probe(&dir) {
        step(&format!("python kubernetes {PY_KUBERNETES}: cached"));
        return Ok((python, dir));
    }
    step(&format!(
        "installing the Python `kubernetes` client {PY_KUBERNETES} into {}",
        dir.display()
    ));
    note("why: the e2e tier proves a second, independent real client works through the gate");
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    run::status(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg("--target")
            .arg(&tmp)
            .arg(format!("kubernetes=={PY_KUBERNETES}")),
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    if !probe(&dir) {
        bail!(
            "pip installed kubernetes into {} but python cannot import it",
            dir.display()
        );
    }
    Ok((python, dir))
}

/// Debian's nginx, the benchmark's reference reverse proxy (not needed by the tests).
pub fn nginx() -> Result<PathBuf> {
    let p = PathBuf::from("/usr/sbin/nginx");
    if !p.exists() {
        step("installing Debian's nginx (the proxy benchmark's reference reverse proxy)");
        setup::apt_install(&["nginx"])?;
    }
    if !p.exists() {
        bail!("apt installed nginx but {} is missing", p.display());
    }
    Ok(p)
}

/// `cargo xtask bump PART VERSION`: pins another release of a node part. For
/// Kubernetes the wrapper's go.mod is regenerated from that release's own go.mod (one
/// `replace` per staging module, at the matching v0.MINOR.PATCH); the others take
/// `go get MODULE@VERSION`. Then `go mod tidy`; the next build rebuilds what changed.
pub fn bump(part: &str, version: &str) -> Result<()> {
    let module = pinned_module(part);
    ensure!(
        !module.is_empty(),
        "unknown part `{part}`; parts: {}",
        PARTS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    );
    ensure!(
        version.starts_with('v'),
        "a Go module version starts with v (e.g. v1.37.3), not `{version}`"
    );
    let dir = go_dir(part);
    if part == "kubernetes" {
        let upstream_mod = kubernetes_go_mod(version)?;
        let staging = staging_modules(&upstream_mod);
        ensure!(
            !staging.is_empty(),
            "k8s.io/kubernetes {version}'s go.mod has no staging replace lines"
        );
        let v = version.trim_start_matches('v');
        let staging_version = format!("v0.{}", v.split_once('.').map_or(v, |(_, r)| r));
        let go_line = upstream_mod
            .lines()
            .find(|l| l.starts_with("go "))
            .unwrap_or("go 1.26.0");
        let mut text = format!(
            "module portcullis.dev/build/kubernetes\n\n{go_line}\n\nrequire k8s.io/kubernetes {version}\n\ntool (\n"
        );
        for p in PARTS[0].packages {
            text.push_str(&format!("\t{p}\n"));
        }
        text.push_str(")\n\nreplace (\n");
        for m in &staging {
            // Staging modules nobody publishes (samples) are not needed to build.
            if m.contains("/sample-") {
                continue;
            }
            text.push_str(&format!("\t{m} => {m} {staging_version}\n"));
        }
        text.push_str(")\n");
        std::fs::write(dir.join("go.mod"), text)?;
    } else {
        run::status(
            go().current_dir(&dir)
                .env("GOFLAGS", "-mod=mod")
                .args(["get", &format!("{module}@{version}")]),
        )?;
    }
    run::status(
        go().current_dir(&dir)
            .env("GOFLAGS", "-mod=mod")
            .args(["mod", "tidy"]),
    )?;
    step(&format!(
        "{part} pinned at {version} in {}; commit go.mod and go.sum",
        dir.display()
    ));
    Ok(())
}

/// The go.mod of a k8s.io/kubernetes release, from the module proxy.
fn kubernetes_go_mod(version: &str) -> Result<String> {
    let out = run::output(
        go().current_dir(paths::root())
            .env("GOFLAGS", "-mod=mod")
            .args([
                "mod",
                "download",
                "-json",
                &format!("k8s.io/kubernetes@{version}"),
            ]),
    )?;
    let path = out
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("\"GoMod\": \"")
                .and_then(|r| r.strip_suffix("\","))
        })
        .context("`go mod download -json` printed no GoMod path")?;
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

/// The modules a Kubernetes go.mod replaces with `./staging/...`.
fn staging_modules(gomod: &str) -> Vec<String> {
    gomod
        .lines()
        .filter(|l| l.contains("=> ./staging/"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_modules_come_from_the_replace_block() {
        let m = "replace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/kubelet => ./staging/src/k8s.io/kubelet\n)\nrequire x v1\n";
        assert_eq!(staging_modules(m), vec!["k8s.io/api", "k8s.io/kubelet"]);
    }

    #[test]
    fn every_part_pins_its_module() {
        for p in PARTS {
            let v = pinned_version(p.name).unwrap();
            assert!(v.starts_with('v'), "{}: {v}", p.name);
        }
        assert!(kubernetes_version().unwrap().starts_with("v1."));
    }

    #[test]
    fn stamps_change_with_the_go_version() {
        let a = stamp(&PARTS[1], "go1.26.8").unwrap();
        let b = stamp(&PARTS[1], "go1.26.9").unwrap();
        assert_ne!(a, b);
    }
}
