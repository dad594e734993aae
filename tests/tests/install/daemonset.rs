//! The DaemonSet itself: node setup, the daemon serving agents, a crash.
use std::path::Path;

use anyhow::{Context, Result, ensure};
use portcullis_tests::{
    gate::{AGENT_USER, NAMESPACE},
    install,
    node::host,
};

use crate::Env;

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn sets_up_and_serves(env: &mut Env) -> Result<()> {
    install::wait_rolled_out(&env.node, 60)?;
    // Node setup ran in the host's mount namespace: bpffs is mounted there, shared.
    let logs = env.node.kubectl_ok(&[
        "-n",
        install::NAMESPACE,
        "logs",
        "-l",
        install::DAEMON_SELECTOR,
        "-c",
        "node-setup",
    ])?;
    ensure!(logs.contains("host mount namespace:"), "node-setup: {logs}");
    ensure!(
        logs.contains("all required prerequisites met"),
        "node-setup: {logs}"
    );
    ensure!(
        host::propagation(Path::new(host::HOST_BPFFS)).as_deref() == Some("shared"),
        "bpffs at {} is not shared on the host: {:?}",
        host::HOST_BPFFS,
        host::propagation(Path::new(host::HOST_BPFFS))
    );
    // The pins are on the host, where the next pod finds them.
    let pins = portcullis_tests::node::bpffs_dir().join("links");
    let n = std::fs::read_dir(&pins)
        .with_context(|| format!("reading {}", pins.display()))?
        .count();
    ensure!(n >= 12, "only {n} pinned links in {}", pins.display());
    // The daemon found the kubelet's cgroup root from its own pod.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.state_dir().join("kernel-state.json"))?)?;
    let attach = state["attach_cgroup"].as_str().unwrap_or_default();
    ensure!(
        attach.ends_with(&format!(
            "/{}/kubepods",
            portcullis_tests::node::CGROUP_ROOT
        )),
        "attached at {attach}"
    );
    // doctor works inside the pod.
    let o = install::exec_daemon(&env.node, &["portcullis", "doctor"])?;
    ensure!(o.status.success(), "doctor in the pod: {}", text(&o));
    ensure!(
        text(&o).contains("all required prerequisites met"),
        "{}",
        text(&o)
    );
    Ok(())
}

pub fn agent_gated(env: &mut Env) -> Result<()> {
    let before = env.daemon.connections().len();
    let o = crate::run(env.gate_cmd(&["get", "configmaps", "-n", NAMESPACE]))?;
    ensure!(o.status.success(), "agent kubectl: {}", text(&o));
    ensure!(
        env.daemon.connections().len() > before,
        "the installed daemon recorded no connection"
    );
    // The apiserver saw the scoped identity, impersonated by the daemon's credential.
    let seen = env.apiserver_audit().iter().any(|e| {
        e["impersonatedUser"]["username"] == AGENT_USER
            && e["objectRef"]["resource"] == "configmaps"
            && e["objectRef"]["namespace"] == NAMESPACE
    });
    ensure!(
        seen,
        "no impersonated configmaps list in the apiserver's audit"
    );
    Ok(())
}

pub fn crash_fails_closed(env: &mut Env) -> Result<()> {
    let before: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.state_dir().join("kernel-state.json"))?)?;
    let old = env.daemon.pid().context("no daemon pid")?;
    let events = env.daemon.kernel_events().len();
    env.daemon.kill();
    // While it is down the agent's connection is redirected and refused; it never
    // reaches the API server directly.
    let o = crate::run(env.gate_cmd(&["get", "configmaps", "--request-timeout=5s"]))?;
    let down = text(&o);
    let restarted_already = env.daemon.pid().is_some_and(|p| p != old);
    ensure!(
        !o.status.success() || restarted_already,
        "agent reached the API with the daemon down: {down}"
    );
    // The kubelet restarts the container; the new daemon adopts the pins.
    env.daemon.start()?;
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.state_dir().join("kernel-state.json"))?)?;
    ensure!(after["mode"] == "adopted", "after the crash: {after}");
    ensure!(
        after["programs"] == before["programs"],
        "program/link ids changed:\n{before}\n{after}"
    );
    let redirected = env.daemon.kernel_events()[events.min(env.daemon.kernel_events().len())..]
        .iter()
        .any(|e| e["kind"] == "redirected");
    ensure!(
        redirected || restarted_already,
        "no redirect recorded for the attempt while down"
    );
    let o = crate::run(env.gate_cmd(&["get", "configmaps"]))?;
    ensure!(o.status.success(), "after the restart: {}", text(&o));
    Ok(())
}
