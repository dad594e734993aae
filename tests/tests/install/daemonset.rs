//! The DaemonSet itself: node setup, the daemon serving agents, a crash.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use portcullis_tests::{
    gate::{AGENT_USER, NAMESPACE, POD},
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
        // With a selector kubectl shows only the last 10 lines unless told otherwise.
        "--tail=-1",
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
    // Where the kill fallback is in use, the daemon located packet_create from inside
    // its (privileged) pod, so only packet sockets kill an agent, not every CAP_NET_RAW;
    // checked where this host shows kernel addresses to root at all.
    let visible = std::fs::read_to_string("/proc/kallsyms")
        .map(|t| {
            t.lines()
                .any(|l| l.ends_with(" packet_create") && !l.starts_with("0000000000000000"))
        })
        .unwrap_or(false);
    ensure!(
        !visible
            || state["packet_guard"] != "tracepoints"
            || state["packet_guard_scope"] == "callers located",
        "packet guard in the pod: {state}"
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

/// SIGKILL of the daemon while the agent keeps connecting (one fresh TLS connection
/// every 50 ms): the agent is refused while no daemon runs (the pins keep redirecting
/// to a port nobody listens on), nothing reaches the API server directly (its audit
/// log), and the kubelet's restarted container adopts the same programs and links.
pub fn crash_fails_closed(env: &mut Env) -> Result<()> {
    let before: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.state_dir().join("kernel-state.json"))?)?;
    let old = env.daemon.pid().context("no daemon pid")?;
    let script = env.file("crash-load.py", crate::upgrade::LOAD)?;
    let audit_before = env.apiserver_audit().len();
    let load = env.in_pod(POD, &["python3", &script, "15"]);
    let handle = std::thread::spawn(move || crate::run(load));
    std::thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    env.daemon.kill();
    // The kubelet restarts the container; the new daemon adopts the pins.
    env.daemon.start()?;
    let down = killed.elapsed();
    let new = env
        .daemon
        .pid()
        .context("no daemon pid after the restart")?;
    ensure!(new != old, "the daemon was not replaced (pid {old})");
    let out = handle
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("load: {line} {}", String::from_utf8_lossy(&out.stderr)))?;
    println!(
        "  crash: daemon down {:.2} s (SIGKILL to the replacement ready), agent's view: {v}",
        down.as_secs_f64()
    );
    ensure!(
        v["failed"].as_u64().unwrap_or(0) > 0,
        "no request of the agent failed while the daemon was down for {:.2} s: {v}",
        down.as_secs_f64()
    );
    let direct = crate::upgrade::direct_since(env, audit_before)?;
    ensure!(
        direct == 0,
        "{direct} requests of the agent reached the API server directly while the daemon was down"
    );
    ensure!(
        v["last_ok"] == true,
        "the agent is still refused after the replacement started: {v}"
    );
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.state_dir().join("kernel-state.json"))?)?;
    ensure!(after["mode"] == "adopted", "after the crash: {after}");
    ensure!(
        after["programs"] == before["programs"],
        "program/link ids changed:\n{before}\n{after}"
    );
    let o = crate::run(env.gate_cmd(&["get", "configmaps"]))?;
    ensure!(o.status.success(), "after the restart: {}", text(&o));
    Ok(())
}
