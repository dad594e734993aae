//! Protected endpoints discovered from the cluster: the API server on the node's
//! address is redirected like the Service; the kubelet's port is refused (not
//! redirected); every other port of the node is refused to agents (the daemon's own
//! listeners included) while the gate's port stays reachable. A pod that is not an
//! agent reaches the same node ports: the checks can fail.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use portcullis_tests::{
    gate::{BYSTANDER_POD, DAEMON_ADDR, POD},
    node,
};
use serde_json::Value;

use crate::Env;

/// pc-probe tcp ADDR in a pod: (connected, errno).
fn probe(env: &Env, pod: &str, addr: &str) -> Result<(bool, Option<i64>)> {
    let o = crate::run(env.in_pod(pod, &["pc-probe", "tcp", addr]))?;
    let line = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(line.trim()).with_context(|| {
        format!(
            "pc-probe in {pod}: {line} {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    Ok((v["ok"] == true, v["errno"].as_i64()))
}

struct Listener(std::process::Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn discovered(env: &mut Env) -> Result<()> {
    // What discovery wrote.
    let file = env.state_dir().join("protected.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r: Vec<Value> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let has = |ip: &str, port: u64, refuse: bool| {
            r.iter()
                .any(|x| x["ip"] == ip && x["port"] == port && x["refuse"] == refuse)
        };
        if has("10.96.0.1", 443, false)
            && has(node::NODE_IP, 6443, false)
            && has(node::NODE_IP, 10250, true)
            && has(node::NODE_IP, 0, true)
            && has("10.244.0.1", 0, true)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("discovery wrote {}", serde_json::to_string(&r)?);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // A listener on the node (as the daemon's admin or metrics would be).
    let bin = portcullis_tests::bin("pc-probe");
    let log = env.dir.join("node-listener.log");
    let child = env
        .node
        .command(&bin)
        .args(["serve", "--log", &log.display().to_string()])
        .arg(format!("{}:19999", node::NODE_IP))
        .arg("10.244.0.1:19998")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _listener = Listener(child);
    std::thread::sleep(Duration::from_millis(300));
    let kubelet = format!("{}:10250", node::NODE_IP);
    let node_port = format!("{}:19999", node::NODE_IP);
    let gw_port = "10.244.0.1:19998";
    // The control: a pod that is not an agent reaches all of them.
    for a in [&kubelet, &node_port, gw_port] {
        let (ok, e) = probe(env, BYSTANDER_POD, a)?;
        ensure!(
            ok,
            "the bystander could not reach {a} ({e:?}): the check below could not fail"
        );
    }
    let before = env.daemon.kernel_events().len();
    for a in [&kubelet, &node_port, gw_port] {
        let (ok, e) = probe(env, POD, a)?;
        ensure!(!ok, "the agent reached {a} on the node");
        ensure!(e == Some(1) || e == Some(111), "{a}: errno {e:?}");
    }
    // The gate's port stays reachable (and unredirected connections get its 403).
    let (ok, e) = probe(env, POD, DAEMON_ADDR)?;
    ensure!(
        ok,
        "the agent cannot reach the gate's port {DAEMON_ADDR} ({e:?})"
    );
    // The refusals are kernel events, not redirects.
    let events = env.daemon.kernel_events();
    let refused: Vec<&Value> = events[before.min(events.len())..]
        .iter()
        .filter(|e| e["kind"] == "connect_refused")
        .collect();
    ensure!(
        refused
            .iter()
            .any(|e| e["dst"].as_str().is_some_and(|d| d.ends_with(":10250"))),
        "no connect_refused event for the kubelet port: {refused:?}"
    );
    // The API server on the node's own address goes through the gate.
    let o = crate::run(env.in_pod(
        POD,
        &[
            "kubectl",
            &format!("--server=https://{}:{}", node::NODE_IP, node::API_PORT),
            &format!("--certificate-authority={}", portcullis_tests::gate::POD_CA),
            &format!("--token={}", env.agent_token.trim()),
            "get",
            "--raw",
            "/version",
        ],
    ))?;
    ensure!(
        o.status.success(),
        "kubectl at the node's API address: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The event reaches the daemon's event log through the ring buffer a little after
    // the connection it records (a check right after kubectl returned once missed it).
    let want = format!("{}:{}", node::NODE_IP, node::API_PORT);
    let deadline = Instant::now() + Duration::from_secs(5);
    let redirected = loop {
        let seen = env
            .daemon
            .kernel_events()
            .iter()
            .any(|e| e["kind"] == "redirected" && e["dst"] == want);
        if seen || Instant::now() > deadline {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        redirected,
        "no redirect of {}:{}",
        node::NODE_IP,
        node::API_PORT
    );
    Ok(())
}
