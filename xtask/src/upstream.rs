//! The real upstream for the e2e tier: kube-apiserver and kube-controller-manager
//! v1.20.2 built from Debian bookworm's `kubernetes` source package, Debian's etcd,
//! and the real clients (kubectl, Python `kubernetes`). See
//! shared/notes/real-apiserver.md for why it is built from source: no registry ships
//! the server binaries, and Debian's source package is the upstream tree with vendor/.
//!
//! Everything lands in the tools cache outside the repository and is reused by
//! every later run and every fresh clone on the same machine.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    paths,
    run::{self, note, step},
    setup,
};

pub const K8S_VERSION: &str = "1.20.2";
/// Debian bookworm's source package version carrying the upstream v1.20.2 tree.
const K8S_DEBIAN_SOURCE: &str = "1.20.5+really1.20.2-1.1+deb12u1";
const GO: &str = "/usr/lib/go-1.19/bin/go";
const PY_KUBERNETES: &str = "31.0.0";

/// Where the e2e harness finds each real part.
pub struct Upstream {
    /// kube-apiserver, kube-controller-manager and the test-only pc-fake-kubelet.
    pub kube_bin_dir: PathBuf,
    pub kubectl: PathBuf,
    pub pythonpath: PathBuf,
}

/// Tells the e2e harness (tests/src/cluster.rs) where each part is.
pub fn export(up: &Upstream, cmd: &mut Command) {
    cmd.env("PORTCULLIS_KUBE_BIN_DIR", &up.kube_bin_dir)
        .env("PORTCULLIS_KUBECTL", &up.kubectl)
        .env("PORTCULLIS_PYTHONPATH", &up.pythonpath);
}

pub fn ensure() -> Result<Upstream> {
    packages()?;
    let kube_bin_dir = kube_binaries()?;
    let kubectl = kubectl()?;
    let pythonpath = python_client()?;
    Ok(Upstream {
        kube_bin_dir,
        kubectl,
        pythonpath,
    })
}

fn packages() -> Result<()> {
    // (present when, package, why)
    let wanted: [(bool, &str, &str); 5] = [
        (
            Path::new(GO).exists(),
            "golang-1.19-go",
            "kube-apiserver 1.20 builds with Go 1.19",
        ),
        (
            run::have("rsync"),
            "rsync",
            "the kubernetes build copies with rsync (without it, empty binaries)",
        ),
        (
            run::have("etcd"),
            "etcd-server",
            "the apiserver stores its objects in a real etcd",
        ),
        (
            run::have("dpkg-source"),
            "dpkg-dev",
            "apt-get source unpacks with dpkg-source",
        ),
        (
            run::have("openssl"),
            "openssl",
            "the e2e harness checks certificates it generates",
        ),
    ];
    let missing: Vec<_> = wanted.iter().filter(|(have, ..)| !have).collect();
    if missing.is_empty() {
        step("upstream packages: go 1.19, rsync, etcd, dpkg-dev, openssl present");
        return Ok(());
    }
    for (_, pkg, why) in &missing {
        note(&format!("{pkg}: {why}"));
    }
    let pkgs: Vec<&str> = missing.iter().map(|(_, p, _)| *p).collect();
    step(&format!("installing Debian packages {}", pkgs.join(" ")));
    setup::apt_install(&pkgs)
}

fn kube_dir() -> PathBuf {
    paths::cache().join(format!("kubernetes-{K8S_VERSION}"))
}

fn built_ok(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(K8S_VERSION))
        .unwrap_or(false)
}

/// Builds kube-apiserver and kube-controller-manager once; returns their directory.
fn kube_binaries() -> Result<PathBuf> {
    let bin_dir = kube_dir().join("bin");
    let wanted = ["kube-apiserver", "kube-controller-manager"];
    if wanted.iter().all(|b| built_ok(&bin_dir.join(b))) && fake_kubelet_current(&bin_dir) {
        step(&format!(
            "kube-apiserver {K8S_VERSION}: cached in {}",
            bin_dir.display()
        ));
        return Ok(bin_dir);
    }
    let tree = source_tree()?;
    std::fs::create_dir_all(&bin_dir)?;
    for (what, minutes) in [("kube-apiserver", "~9"), ("kube-controller-manager", "~2")] {
        let dest = bin_dir.join(what);
        if built_ok(&dest) {
            continue;
        }
        step(&format!(
            "building {what} v{K8S_VERSION} from Debian's source ({minutes} min on 2 cores, once)"
        ));
        note("why: the e2e tier talks to a real apiserver; no registry ships its binary");
        make(&tree, what)?;
        install_built(&tree, what, &dest)?;
        if !built_ok(&dest) {
            bail!(
                "{} does not report v{K8S_VERSION} from --version",
                dest.display()
            );
        }
    }
    if !fake_kubelet_current(&bin_dir) {
        step("building pc-fake-kubelet (test-only) in the same tree (~1 min)");
        note(
            "why: exec and logs need a kubelet; this one uses the real kubelet streaming code \
             for SPDY and answers WebSocket v5 itself",
        );
        let source = paths::root().join("tests/fake-kubelet/main.go");
        let dir = tree.join("cmd/pc-fake-kubelet");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&source, dir.join("main.go"))
            .with_context(|| format!("copying {}", source.display()))?;
        make(&tree, "pc-fake-kubelet")?;
        install_built(&tree, "pc-fake-kubelet", &bin_dir.join("pc-fake-kubelet"))?;
        std::fs::copy(&source, bin_dir.join("pc-fake-kubelet.go"))?;
    }
    Ok(bin_dir)
}

/// The cached fake kubelet was built from the repository's current source.
fn fake_kubelet_current(bin_dir: &Path) -> bool {
    let source = std::fs::read(paths::root().join("tests/fake-kubelet/main.go")).ok();
    let built_from = std::fs::read(bin_dir.join("pc-fake-kubelet.go")).ok();
    source.is_some() && source == built_from && bin_dir.join("pc-fake-kubelet").exists()
}

fn make(tree: &Path, what: &str) -> Result<()> {
    {
        let go_bin = Path::new(GO).parent().expect("GO has a parent");
        let path = format!(
            "{}:{}",
            go_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run::status(
            Command::new("make")
                .current_dir(tree)
                .arg(format!("WHAT=cmd/{what}"))
                .env("PATH", path)
                .env("CGO_ENABLED", "0")
                .env("GOCACHE", paths::cache().join("go-build"))
                .env("KUBE_GIT_VERSION", format!("v{K8S_VERSION}"))
                .env("KUBE_GIT_TREE_STATE", "clean")
                .env("KUBE_GIT_MAJOR", "1")
                .env("KUBE_GIT_MINOR", "20")
                // A parent cargo's flags mean nothing to go.
                .env_remove("RUSTFLAGS"),
        )
    }
}

/// Copies a binary out of the build tree into the cache, refusing empty results.
fn install_built(tree: &Path, what: &str, dest: &Path) -> Result<()> {
    let built = tree.join("_output/local/bin/linux/amd64").join(what);
    let len = std::fs::metadata(&built)
        .with_context(|| format!("make finished but {} is missing", built.display()))?
        .len();
    if len < 1_000_000 {
        bail!(
            "{} is only {len} bytes: the kubernetes build copies with rsync; is it installed?",
            built.display()
        );
    }
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} into the cache", built.display()))?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

/// Fetches and unpacks Debian's `kubernetes` source package without touching the
/// system's apt configuration: a private source list and lists directory in the cache.
fn source_tree() -> Result<PathBuf> {
    let src = kube_dir().join("src");
    if let Some(tree) = find_tree(&src) {
        return Ok(tree);
    }
    step(&format!(
        "fetching Debian's kubernetes source package {K8S_DEBIAN_SOURCE} (34 MB, includes vendor/)"
    ));
    let apt = paths::cache().join("apt-src");
    let parts = apt.join("sources.list.d");
    let lists = apt.join("lists");
    std::fs::create_dir_all(&parts)?;
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::write(parts.join("debian-src.sources"), source_entries()?)?;
    let apt_opts = |cmd: &mut Command| {
        cmd.arg("-o")
            .arg(format!("Dir::Etc::SourceParts={}", parts.display()))
            .arg("-o")
            .arg("Dir::Etc::SourceList=/dev/null")
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", lists.display()));
    };
    let mut update = Command::new("apt-get");
    apt_opts(&mut update);
    run::status(update.args(["update", "-q"]))?;

    let unpack = kube_dir().join("src.partial");
    let _ = std::fs::remove_dir_all(&unpack);
    std::fs::create_dir_all(&unpack)?;
    let mut source = Command::new("apt-get");
    apt_opts(&mut source);
    run::status(
        source
            .current_dir(&unpack)
            .args(["source", "-q", "--only-source"])
            .arg(format!("kubernetes={K8S_DEBIAN_SOURCE}")),
    )?;
    let _ = std::fs::remove_dir_all(&src);
    std::fs::rename(&unpack, &src)?;
    find_tree(&src).with_context(|| {
        format!(
            "apt-get source finished but no kubernetes tree with a Makefile is in {}",
            src.display()
        )
    })
}

fn find_tree(src: &Path) -> Option<PathBuf> {
    std::fs::read_dir(src)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir() && p.join("Makefile").exists() && p.join("vendor").is_dir())
}

/// deb-src entries for the system's own Debian mirrors (whatever hosts it names).
fn source_entries() -> Result<String> {
    let deb822 = Path::new("/etc/apt/sources.list.d/debian.sources");
    if let Ok(text) = std::fs::read_to_string(deb822) {
        return Ok(deb822_to_src(&text));
    }
    let legacy = std::fs::read_to_string("/etc/apt/sources.list")
        .context("no /etc/apt/sources.list.d/debian.sources nor /etc/apt/sources.list")?;
    // One-line format: the same entries as deb-src lines.
    Ok(legacy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("deb "))
        .map(|rest| format!("deb-src {rest}\n"))
        .collect())
}

fn deb822_to_src(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with("Types:") {
                "Types: deb-src".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
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

/// kubectl: 1.32 from the image's Google Cloud SDK, else Debian's kubectl 1.20.
fn kubectl() -> Result<PathBuf> {
    let candidates = [
        "/usr/lib/google-cloud-sdk/bin/kubectl.1.32",
        "/usr/share/google-cloud-sdk/bin/kubectl.1.32",
    ];
    if let Some(p) = candidates.iter().map(PathBuf::from).find(|p| p.exists()) {
        step(&format!("kubectl 1.32: {}", p.display()));
        return Ok(p);
    }
    if let Ok(out) = run::output(Command::new("sh").args(["-c", "command -v kubectl.1.32 || true"]))
        && !out.trim().is_empty()
    {
        return Ok(PathBuf::from(out.trim()));
    }
    let debian = PathBuf::from("/usr/bin/kubectl");
    let is_real = Command::new(&debian)
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("dispatcher"))
        .unwrap_or(false);
    if !is_real {
        step("kubectl 1.32 is not in the image; installing Debian's kubernetes-client (1.20)");
        setup::apt_install(&["kubernetes-client"])?;
    }
    Ok(debian)
}

/// Python's `kubernetes` client, installed with pip into the cache (not the system).
fn python_client() -> Result<PathBuf> {
    let dir = paths::cache().join(format!("python-kubernetes-{PY_KUBERNETES}"));
    let probe = |dir: &Path| {
        Command::new("python3")
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
        return Ok(dir);
    }
    if !run::have("python3") {
        step("python3 missing; installing Debian's python3 and pip");
        setup::apt_install(&["python3", "python3-pip"])?;
    }
    step(&format!(
        "installing the Python `kubernetes` client {PY_KUBERNETES} into {}",
        dir.display()
    ));
    note("why: the e2e tier proves a second, independent real client works through the gate");
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    run::status(
        Command::new("python3")
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
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::deb822_to_src;

    #[test]
    fn deb822_types_become_source_only() {
        let s = deb822_to_src("Types: deb\nURIs: http://x/debian\nSuites: bookworm\n");
        assert!(s.contains("Types: deb-src\n"), "{s}");
        assert!(s.contains("URIs: http://x/debian"), "{s}");
        assert!(!s.contains("Types: deb\n"), "{s}");
    }
}
