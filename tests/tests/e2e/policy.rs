//! Policy: decisions per subject, RBAC as the second line, hot reload, the admin socket
//! and `portcullis policy test`.
use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use portcullis_tests::gate::TARGET_POD;

use crate::{Env, POLICY, apiserver_audit, identity::oidc, portcullis_bin, repo, run_pod, stderr};

/// kubectl as the agent in pod `work`, but with `token`.
pub fn gate_as(env: &Env, token: &str, args: &[&str]) -> Result<Output> {
    let flag = format!("--token={token}");
    let mut full = vec![flag.as_str()];
    full.extend_from_slice(args);
    run_pod(env.gate_cmd(&full), None)
}

pub fn policy_decisions(env: &mut Env) -> Result<()> {
    let alice = oidc(env, "alice", &["devs"])?;
    let o = gate_as(env, &alice, &["get", "pods"])?;
    ensure!(o.status.success(), "alice get pods: {}", stderr(&o));
    let o = gate_as(
        env,
        &alice,
        &[
            "exec",
            TARGET_POD,
            "-c",
            "main",
            "--",
            "echo",
            "denied-by-policy",
        ],
    )?;
    ensure!(
        !o.status.success()
            && stderr(&o).contains("Portcullis policy denies")
            && stderr(&o).contains("interactive access"),
        "exec should be denied by policy: {}",
        stderr(&o)
    );
    ensure!(
        !apiserver_audit(env)
            .iter()
            .any(|e| e["objectRef"]["name"] == TARGET_POD
                && e["objectRef"]["subresource"] == "exec"
                && e["requestURI"]
                    .as_str()
                    .is_some_and(|u| u.contains("denied-by-policy"))),
        "the denied exec reached the API server"
    );
    let o = gate_as(
        env,
        &alice,
        &["create", "secret", "generic", "nope", "--from-literal=a=b"],
    )?;
    ensure!(
        !o.status.success() && stderr(&o).contains("no policy rule allows"),
        "create secret: {}",
        stderr(&o)
    );
    // Policy allows reads everywhere; RBAC for the impersonated identity does not.
    let o = gate_as(env, &alice, &["get", "pods", "--all-namespaces"])?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("portcullis:agent") && e.contains("at the cluster scope"),
        "cluster-wide list should be refused by the real apiserver's RBAC: {e}"
    );
    // An OIDC user outside every mapped group gets no upstream identity.
    let mallory = oidc(env, "mallory", &["visitors"])?;
    let o = gate_as(env, &mallory, &["get", "pods"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("Forbidden"),
        "unmapped user: {}",
        stderr(&o)
    );
    Ok(())
}

/// The admin socket answers root only; `portcullis policy test` exits non-zero on a
/// mismatch.
pub fn admin_socket_and_policy_cli(env: &mut Env) -> Result<()> {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(portcullis_bin())
        .args(["approvals", "--socket"])
        .arg(env.state_dir().join("admin.sock"))
        .args(["list"])
        .stdin(Stdio::null())
        .output()
        .context("setpriv (util-linux) runs the CLI as nobody")?;
    ensure!(
        !o.status.success(),
        "a non-root caller listed approvals: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let root = repo().join("deploy/policy");
    let policy = root.join("coding-agents.yaml");
    let run = |cases: &std::path::Path| -> Result<Output> {
        Ok(Command::new(portcullis_bin())
            .args(["policy", "test", "--policy"])
            .arg(&policy)
            .arg("--cases")
            .arg(cases)
            .stdin(Stdio::null())
            .output()?)
    };
    let o = run(&root.join("coding-agents.cases.yaml"))?;
    ensure!(
        o.status.success(),
        "shipped cases: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let wrong = env.dir.join("wrong-cases.yaml");
    std::fs::write(
        &wrong,
        "cases:\n- name: exec allowed (wrong)\n  subject: {serviceAccount: e2e/agent}\n  request: {method: POST, path: /api/v1/namespaces/e2e/pods/w/exec}\n  expect: allow\n",
    )?;
    let o = run(&wrong)?;
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.code() == Some(1) && out.contains("FAIL  exec allowed (wrong)"),
        "a mismatch must exit 1: {:?} {out}",
        o.status
    );
    Ok(())
}

pub fn policy_reload(env: &mut Env) -> Result<()> {
    let path = env.dir.join("policy.yaml");
    let alice = oidc(env, "alice", &["devs"])?;
    let before = env.daemon_log().len();
    std::fs::write(&path, POLICY.replace("action: deny", "action: forbid"))?;
    let t = Instant::now();
    loop {
        let log = env.daemon_log();
        if log[before..].contains("policy change refused") {
            let line = log[before..]
                .lines()
                .find(|l| l.contains("policy change refused"))
                .unwrap_or("");
            ensure!(
                line.contains("spec.rules[5].action") && line.contains("line "),
                "error lacks field/line: {line}"
            );
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "invalid policy not reported"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = gate_as(env, &alice, &["get", "pods"])?;
    ensure!(
        o.status.success(),
        "previous policy should stay: {}",
        stderr(&o)
    );
    // A valid change takes effect without a restart: devs lose reads.
    std::fs::write(
        &path,
        POLICY.replace(
            "name: devs-read\n    subjects: [{kind: Group, name: \"oidc:devs\"}]",
            "name: devs-read\n    subjects: [{kind: Group, name: \"oidc:nobody\"}]",
        ),
    )?;
    let t = Instant::now();
    loop {
        let o = gate_as(env, &alice, &["get", "pods"])?;
        if !o.status.success() && stderr(&o).contains("no policy rule allows") {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "policy change not applied"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::write(&path, POLICY)?;
    let t = Instant::now();
    while !gate_as(env, &alice, &["get", "pods"])?.status.success() {
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "policy restore not applied"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}
