//! The daemon installed the way a cluster installs it: the repository's kustomize
//! base (`deploy/`) through the test overlay (`tests/deploy/`: the image this
//! checkout built, imported into the node's containerd, never pulled), applied with
//! `kubectl apply -k`. The DaemonSet's init step mounts and shares bpffs on the host;
//! its pod runs `portcullis run` on the node's network with the host's cgroupfs.
//!
//! For the e2e harness ([`crate::gate::Gate`] with `install`), a generated overlay on
//! top of `tests/deploy` points the daemon at the harness's config and state
//! directory (a hostPath at the same path inside the pod), so the harness's files,
//! the CLI on the node and the pod's daemon see the same state and pins.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::node::{self, Node, run_with_stdin};

pub const NAMESPACE: &str = "portcullis-system";
pub const DAEMONSET: &str = "portcullis";
pub const DAEMON_SELECTOR: &str = "app.kubernetes.io/component=node";
/// What the test overlay names the image.
pub const TEST_IMAGE: &str = "portcullis.local/portcullis:e2e";
/// What the base names the image (a release name; imported here, so never pulled).
pub const RELEASE_IMAGE: &str = "docker.io/portcullis/portcullis:0.1.0";

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// The Portcullis image of this checkout, under the test and the release name.
pub fn image() -> Result<node::image::Image> {
    node::image::portcullis(&crate::bin("portcullis"), &[TEST_IMAGE, RELEASE_IMAGE])
}

/// An overlay of `tests/deploy` for the harness: the daemon reads `config` (a file in
/// `dir`, which it sees at the same path) and keeps its state there; the node's PKI is
/// mounted read-only at its own path too (CA files the config names).
pub fn harness_overlay(dir: &Path, config: &Path, pki: &Path) -> Result<PathBuf> {
    let out = dir.join("overlay");
    std::fs::create_dir_all(&out)?;
    let (d, c, p) = (dir.display(), config.display(), pki.display());
    let text = format!(
        r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- {base}
patches:
- target: {{kind: DaemonSet, name: {DAEMONSET}}}
  patch: |
    - op: replace
      path: /spec/template/spec/containers/0/command
      value: [portcullis, run, --config, "{c}"]
    - op: replace
      path: /spec/template/spec/containers/0/readinessProbe/exec/command
      value: [portcullis, ready, --config, "{c}"]
    - op: replace
      path: /spec/template/spec/volumes/2/hostPath/path
      value: "{d}"
    - op: replace
      path: /spec/template/spec/containers/0/volumeMounts/2/mountPath
      value: "{d}"
    - op: add
      path: /spec/template/spec/volumes/-
      value: {{name: pki, hostPath: {{path: "{p}", type: Directory}}}}
    - op: add
      path: /spec/template/spec/containers/0/volumeMounts/-
      value: {{name: pki, mountPath: "{p}", readOnly: true}}
"#,
        base = relative(&out, &repo().join("tests/deploy")).display(),
    );
    node::write(&out.join("kustomization.yaml"), &text)?;
    Ok(out)
}

/// `to` relative to the directory `from` (kustomize refuses absolute bases).
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let (f, t): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut p = PathBuf::new();
    for _ in common..f.len() {
        p.push("..");
    }
    for c in &t[common..] {
        p.push(c);
    }
    p
}

/// `kubectl apply -k DIR` as the cluster admin.
pub fn apply_k(node: &Node, dir: &Path) -> Result<String> {
    node.kubectl_ok(&["apply", "-k", &dir.display().to_string()])
}

/// `kubectl delete -k DIR` (waits for the objects to go).
pub fn delete_k(node: &Node, dir: &Path) -> Result<String> {
    node.kubectl_ok(&[
        "delete",
        "-k",
        &dir.display().to_string(),
        "--ignore-not-found",
        "--timeout=60s",
    ])
}

/// Waits until the DaemonSet's pods on the node are all updated and ready.
pub fn wait_rolled_out(node: &Node, secs: u64) -> Result<()> {
    let o = node.kubectl(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        &format!("daemonset/{DAEMONSET}"),
        &format!("--timeout={secs}s"),
    ])?;
    if !o.status.success() {
        bail!(
            "the DaemonSet did not roll out in {secs} s: {}\n{}",
            String::from_utf8_lossy(&o.stderr).trim(),
            describe_daemon(node)
        );
    }
    Ok(())
}

/// The daemon pods' state and the last lines of their logs, for an error.
pub fn describe_daemon(node: &Node) -> String {
    let pods = node
        .kubectl(&["-n", NAMESPACE, "get", "pods", "-o", "wide"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let desc = node
        .kubectl(&["-n", NAMESPACE, "describe", "pods", "-l", DAEMON_SELECTOR])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut logs = String::new();
    for c in ["node-setup", "daemon"] {
        if let Ok(o) = node.kubectl(&[
            "-n",
            NAMESPACE,
            "logs",
            "-l",
            DAEMON_SELECTOR,
            "-c",
            c,
            "--tail=20",
            "--prefix",
        ]) {
            logs.push_str(&String::from_utf8_lossy(&o.stdout));
            logs.push_str(&String::from_utf8_lossy(&o.stderr));
        }
    }
    format!("{pods}\n{}\n{logs}", last(&desc, 40))
}

fn last(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// The names of the daemon pods.
pub fn daemon_pods(node: &Node) -> Result<Vec<String>> {
    let out = node.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        DAEMON_SELECTOR,
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    Ok(out.split_whitespace().map(str::to_owned).collect())
}

/// Deletes the daemon pods (the DaemonSet makes new ones).
pub fn delete_daemon_pods(node: &Node) -> Result<()> {
    node.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "delete",
        "pods",
        "-l",
        DAEMON_SELECTOR,
        "--wait=false",
    ])
    .map(drop)
}

/// A command run in the daemon pod's container (the image has only `portcullis`).
pub fn exec_daemon(node: &Node, argv: &[&str]) -> Result<std::process::Output> {
    let pod = daemon_pods(node)?
        .into_iter()
        .next()
        .context("no daemon pod")?;
    let mut args = vec!["exec", "-n", NAMESPACE, pod.as_str(), "-c", "daemon", "--"];
    args.extend_from_slice(argv);
    run_with_stdin(&mut node.kubectl_cmd(&args), "")
}

/// Waits until `ready` (the daemon's ready file) names a live pid other than `not`.
pub fn wait_ready_file(ready: &Path, not: Option<u32>, secs: u64) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(text) = std::fs::read_to_string(ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(pid) = v["pid"].as_u64()
            && Some(pid as u32) != not
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("no ready daemon in {} after {secs} s", ready.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates the namespace and the `portcullis-ca` Secret from a CA directory
/// (`ca.crt`, `ca.key`) before the install, so the webhook keeps it instead of
/// creating its own: the harness's files and the cluster then name the same CA.
pub fn preset_ca(node: &Node, ca_dir: &Path) -> Result<()> {
    let o = node.kubectl(&["create", "namespace", NAMESPACE])?;
    if !o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("AlreadyExists") {
        bail!(
            "creating namespace {NAMESPACE}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    node.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "create",
        "secret",
        "generic",
        "portcullis-ca",
        &format!("--from-file=ca.crt={}", ca_dir.join("ca.crt").display()),
        &format!("--from-file=ca.key={}", ca_dir.join("ca.key").display()),
    ])
    .map(drop)
}

/// Waits until the webhook Deployment is available and has set the caBundle.
pub fn wait_webhook(node: &Node, secs: u64) -> Result<()> {
    let o = node.kubectl(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        "deployment/portcullis-webhook",
        &format!("--timeout={secs}s"),
    ])?;
    if !o.status.success() {
        bail!(
            "the webhook did not become available in {secs} s: {}\n{}",
            String::from_utf8_lossy(&o.stderr).trim(),
            describe_webhook(node)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let b = node.kubectl_ok(&[
            "get",
            "mutatingwebhookconfiguration",
            "portcullis",
            "-o",
            "jsonpath={.webhooks[*].clientConfig.caBundle}",
        ])?;
        if b.split_whitespace().count() == 3 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the webhook never set its caBundle\n{}",
                describe_webhook(node)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn describe_webhook(node: &Node) -> String {
    let logs = node
        .kubectl(&[
            "-n",
            NAMESPACE,
            "logs",
            "-l",
            "app.kubernetes.io/component=webhook",
            "--tail=30",
        ])
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    format!("webhook logs:\n{logs}")
}
