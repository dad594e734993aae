//! The transparent proxy with real clients: unmodified kubectl and the Python client in
//! an agent pod, each result compared with the same command run directly.
use std::{
    process::Stdio,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use portcullis_tests::gate::{Gate, NAMESPACE, POD, POD_CA, TARGET_POD};

use crate::{
    Clients, Env, apiserver_audit, normalize_ages, python, run_bounded, run_pod, stderr, tail,
};

pub fn version_and_discovery(env: &mut Env) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(&env.gate_ok(&["version", "-o", "json"])?)?;
    let want = &env.node.parts.k8s_version;
    ensure!(
        v["serverVersion"]["gitVersion"] == want.as_str(),
        "server version through the gate (want {want}): {v}"
    );
    let gate = env.gate_ok(&["api-resources", "-o", "name"])?;
    let direct = env.direct_ok(&["api-resources", "-o", "name"])?;
    ensure!(gate.lines().count() > 40, "few resources: {gate}");
    ensure!(
        gate == direct,
        "api-resources differ:\n{gate}\n---\n{direct}"
    );
    Ok(())
}

pub fn get_table(env: &mut Env) -> Result<()> {
    for n in ["table-a", "table-b"] {
        env.admin_ok(&["create", "configmap", n, "--from-literal=k=v"])?;
    }
    let gate = env.gate_ok(&["get", "configmaps"])?;
    let direct = env.direct_ok(&["get", "configmaps"])?;
    ensure!(
        gate.starts_with("NAME") && gate.contains("table-a") && gate.contains("table-b"),
        "table through the gate: {gate}"
    );
    ensure!(
        normalize_ages(&gate) == normalize_ages(&direct),
        "tables differ:\n{gate}\n---\n{direct}"
    );
    let gate = env.gate_ok(&["get", "pods", "-o", "wide"])?;
    let direct = env.direct_ok(&["get", "pods", "-o", "wide"])?;
    ensure!(
        gate.contains(POD) && gate.contains("Running"),
        "pods through the gate: {gate}"
    );
    ensure!(
        normalize_ages(&gate) == normalize_ages(&direct),
        "pods:\n{gate}\n---\n{direct}"
    );
    Ok(())
}

pub fn create_and_apply(env: &mut Env) -> Result<()> {
    let f = env.file(
        "cm-create.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: made-by-agent\ndata:\n  colour: blue\n",
    )?;
    let out = env.gate_ok(&["create", "-f", &f])?;
    ensure!(
        out.trim() == "configmap/made-by-agent created",
        "create said: {out}"
    );
    let v = env.admin_ok(&[
        "get",
        "configmap",
        "made-by-agent",
        "-o",
        "jsonpath={.data.colour}",
    ])?;
    ensure!(v == "blue", "stored value {v}");

    let f = env.file(
        "cm-apply.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied-by-agent\ndata:\n  colour: green\n",
    )?;
    let out = env.gate_ok(&["apply", "-f", &f])?;
    ensure!(
        out.trim() == "configmap/applied-by-agent created",
        "apply said: {out}"
    );
    let f2 = env.file(
        "cm-apply2.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied-by-agent\ndata:\n  colour: red\n",
    )?;
    // The second apply is a strategic-merge PATCH computed from the last-applied annotation.
    let out = env.gate_ok(&["apply", "-f", &f2])?;
    ensure!(
        out.trim() == "configmap/applied-by-agent configured",
        "apply said: {out}"
    );
    let v = env.admin_ok(&[
        "get",
        "configmap",
        "applied-by-agent",
        "-o",
        "jsonpath={.data.colour}",
    ])?;
    ensure!(v == "red", "after apply: {v}");
    // Same answer for the same command directly.
    let host = env.host_file("cm-apply2.yaml").display().to_string();
    let out = env.direct_ok(&["apply", "-f", &host])?;
    ensure!(
        out.trim() == "configmap/applied-by-agent unchanged",
        "direct apply: {out}"
    );
    let out = env.gate_ok(&["apply", "-f", &f2])?;
    ensure!(
        out.trim() == "configmap/applied-by-agent unchanged",
        "gate apply: {out}"
    );
    // Server-side apply (a YAML PATCH body).
    let f3 = env.file(
        "cm-ssa.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa-by-agent\ndata:\n  colour: amber\n",
    )?;
    let out = env.gate_ok(&["apply", "--server-side", "-f", &f3])?;
    ensure!(
        out.trim() == "configmap/ssa-by-agent serverside-applied",
        "server-side apply said: {out}"
    );
    Ok(())
}

pub fn create_secret(env: &mut Env) -> Result<()> {
    // kubectl sends this body as protobuf (application/vnd.kubernetes.protobuf).
    let o = env.gate(&[
        "create",
        "secret",
        "generic",
        "agent-secret",
        "--from-literal=password=hunter2",
        "-v=8",
    ])?;
    let err = stderr(&o);
    ensure!(o.status.success(), "create secret failed: {err}");
    ensure!(
        err.contains("application/vnd.kubernetes.protobuf"),
        "kubectl did not send protobuf; -v=8 said:\n{}",
        tail(&err, 30)
    );
    let v = env.admin_ok(&[
        "get",
        "secret",
        "agent-secret",
        "-o",
        "jsonpath={.data.password}",
    ])?;
    ensure!(v == "aHVudGVyMg==", "stored secret {v}");
    Ok(())
}

pub fn watch_streams(env: &mut Env) -> Result<()> {
    let mut child = env
        .gate_cmd(&[
            "get",
            "configmaps",
            "-w",
            "-o",
            "name",
            "--request-timeout=0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| {
        // The initial list arrives first.
        let first = rx
            .recv_timeout(Duration::from_secs(20))
            .context("no initial list")?;
        ensure!(first.starts_with("configmap/"), "first line {first}");
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..3 {
            let name = format!("watched-{i}");
            let t = Instant::now();
            env.admin_ok(&["create", "configmap", &name])?;
            // Each event must arrive on its own, while the watch stays open.
            loop {
                let line = rx
                    .recv_timeout(Duration::from_secs(10))
                    .with_context(|| format!("event for {name} never arrived"))?;
                if line == format!("configmap/{name}") {
                    break;
                }
            }
            ensure!(t.elapsed() < Duration::from_secs(10));
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub fn delete_waits(env: &mut Env) -> Result<()> {
    env.admin_ok(&["create", "configmap", "delete-me-gate"])?;
    env.admin_ok(&["create", "configmap", "delete-me-direct"])?;
    // kubectl deletes, then GETs and watches with fieldSelector=metadata.name until gone.
    let gate = env.gate_ok(&["delete", "configmap", "delete-me-gate", "--wait=true"])?;
    let direct = env.direct_ok(&["delete", "configmap", "delete-me-direct", "--wait=true"])?;
    ensure!(
        gate.trim() == "configmap \"delete-me-gate\" deleted from e2e namespace"
            || gate.trim() == "configmap \"delete-me-gate\" deleted",
        "gate: {gate}"
    );
    ensure!(
        gate.replace("-gate", "") == direct.replace("-direct", ""),
        "{gate} vs {direct}"
    );
    let o = env.admin(&["get", "configmap", "delete-me-gate"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("NotFound"),
        "still there: {}",
        stderr(&o)
    );
    // A missing object: the apiserver's 404 Status comes back as kubectl prints it.
    let g = env.gate(&["delete", "configmap", "never-existed"])?;
    let d = env.direct(&["delete", "configmap", "never-existed"])?;
    ensure!(
        !g.status.success() && stderr(&g) == stderr(&d),
        "{} vs {}",
        stderr(&g),
        stderr(&d)
    );
    Ok(())
}

pub fn logs_follow(env: &mut Env) -> Result<()> {
    // The target pod's `main` container has written three lines and waits for /tmp/go.
    let gate = env.gate_ok(&["logs", TARGET_POD, "-c", "main"])?;
    let direct = env.direct_ok(&["logs", TARGET_POD, "-c", "main"])?;
    ensure!(
        gate == "log line 1\nlog line 2\nlog line 3\n",
        "logs: {gate:?}"
    );
    ensure!(gate == direct, "{gate:?} vs {direct:?}");
    // -f: once triggered, a line every 400 ms. Lines must arrive as they are written,
    // not when the stream ends.
    let arrivals = Gate::stream_lines(
        env.gate_cmd(&["logs", "-f", TARGET_POD, "-c", "main"]),
        40,
        |got| got.len() >= 8,
        || env.trigger("main", "go"),
    )?;
    let lines: Vec<&str> = arrivals.iter().map(|(_, l)| l.as_str()).collect();
    let want: Vec<String> = (1..=8).map(|i| format!("log line {i}")).collect();
    ensure!(lines == want, "lines {lines:?}");
    let spread = arrivals[7].0 - arrivals[3].0;
    ensure!(
        spread >= Duration::from_millis(1200),
        "lines 4..8 arrived together ({spread:?} apart): the stream was buffered"
    );
    Ok(())
}

/// The apiserver's audit events for exec into the target pod whose command line
/// contains `marker`.
fn exec_events(env: &Env, marker: &str) -> Vec<serde_json::Value> {
    apiserver_audit(env)
        .into_iter()
        .filter(|e| {
            e["objectRef"]["subresource"] == "exec"
                && e["objectRef"]["name"] == TARGET_POD
                && e["stage"] == "ResponseStarted"
                && e["requestURI"].as_str().is_some_and(|u| u.contains(marker))
        })
        .collect()
}

fn exec_cases(env: &Env, envs: &[(&str, &str)], tag: &str) -> Result<()> {
    let with =
        |args: &[&str], stdin: Option<&str>| run_bounded(env.gate_cmd_env(envs, args), stdin);
    let o = with(
        &["exec", TARGET_POD, "-c", "main", "--", "echo", "hello", tag],
        None,
    )?;
    ensure!(o.status.success(), "exec failed: {}", stderr(&o));
    ensure!(
        String::from_utf8_lossy(&o.stdout) == format!("hello {tag}\n"),
        "{o:?}"
    );
    let o = with(
        &["exec", "-i", TARGET_POD, "-c", "main", "--", "cat"],
        Some("piped through stdin\n"),
    )?;
    ensure!(o.status.success(), "exec -i failed: {}", stderr(&o));
    ensure!(
        String::from_utf8_lossy(&o.stdout) == "piped through stdin\n",
        "{o:?}"
    );
    let o = with(
        &[
            "exec",
            TARGET_POD,
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "echo failing >&2; exit 3",
        ],
        None,
    )?;
    ensure!(
        o.status.code() == Some(3),
        "exit code {:?}: {}",
        o.status.code(),
        stderr(&o)
    );
    ensure!(stderr(&o).contains("failing"), "{}", stderr(&o));
    // Same as direct.
    let mut c = env.direct_cmd(&["exec", TARGET_POD, "-c", "main", "--", "echo", "hello", tag]);
    for (k, v) in envs {
        c.env(k, v);
    }
    let d = run_bounded(c, None)?;
    ensure!(
        d.stdout == format!("hello {tag}\n").as_bytes(),
        "direct: {d:?}"
    );
    Ok(())
}

pub fn exec_websocket(env: &mut Env) -> Result<()> {
    exec_cases(env, &[], "websocket")?;
    // Proof from the API server: kubectl's WebSocket exec is a GET (the apiserver
    // translates it to the kubelet), the SPDY fallback a POST (verb create).
    let ev = exec_events(env, "command=websocket");
    ensure!(
        ev.iter().any(|e| e["verb"] == "get"
            && e["impersonatedUser"]["username"] == portcullis_tests::gate::AGENT_USER),
        "the apiserver saw no WebSocket (GET) exec from the gate: {ev:?}"
    );
    Ok(())
}

pub fn exec_spdy(env: &mut Env) -> Result<()> {
    exec_cases(
        env,
        &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")],
        "spdy",
    )?;
    let ev = exec_events(env, "command=spdy");
    ensure!(
        ev.iter().any(|e| e["verb"] == "create"
            && e["impersonatedUser"]["username"] == portcullis_tests::gate::AGENT_USER),
        "the apiserver saw no SPDY (POST) exec from the gate: {ev:?}"
    );
    Ok(())
}

pub fn cp_attach_and_port_forward(env: &mut Env) -> Result<()> {
    // kubectl cp: a tar stream over exec, both ways.
    let f = env.file("cp-source.txt", "copied through the gate\n")?;
    let o = env.gate(&[
        "cp",
        &f,
        &format!("{TARGET_POD}:/tmp/cp-dest.txt"),
        "-c",
        "main",
    ])?;
    ensure!(
        o.status.success(),
        "kubectl cp into the pod: {}",
        stderr(&o)
    );
    let back = env.admin_ok(&[
        "exec",
        TARGET_POD,
        "-c",
        "main",
        "--",
        "cat",
        "/tmp/cp-dest.txt",
    ])?;
    ensure!(back == "copied through the gate\n", "copied file: {back:?}");
    let o = env.gate(&[
        "cp",
        &format!("{TARGET_POD}:/tmp/cp-dest.txt"),
        "/work/cp-back.txt",
        "-c",
        "main",
    ])?;
    ensure!(
        o.status.success(),
        "kubectl cp from the pod: {}",
        stderr(&o)
    );
    let o = run_pod(env.in_pod(POD, &["cat", "/work/cp-back.txt"]), None)?;
    ensure!(
        String::from_utf8_lossy(&o.stdout) == "copied through the gate\n",
        "copied back: {o:?}"
    );
    // port-forward over WebSocket (kubectl's default) and the SPDY fallback: the target
    // serves on 8080 (busybox nc), the agent forwards a local port to it through the
    // gate and reads the answer.
    env.admin_ok(&[
        "exec",
        TARGET_POD,
        "-c",
        "main",
        "--",
        "sh",
        "-c",
        "(for i in $(seq 1 10); do echo forwarded-answer | nc -l -p 8080; done) >/dev/null 2>&1 &",
    ])?;
    for (proto, websockets) in [("websocket", "true"), ("spdy", "false")] {
        let script = format!(
            "export KUBECTL_PORT_FORWARD_WEBSOCKETS={websockets}; \
             kubectl port-forward {TARGET_POD} 18080:8080 >/work/pf-{proto}.log 2>&1 & pf=$!; \
             for i in $(seq 1 50); do grep -q Forwarding /work/pf-{proto}.log && break; sleep 0.2; done; \
             nc 127.0.0.1 18080 </dev/null; kill $pf"
        );
        let o = run_pod(env.in_pod(POD, &["sh", "-c", &script]), None)?;
        let out = String::from_utf8_lossy(&o.stdout);
        ensure!(
            out.contains("forwarded-answer"),
            "port-forward ({proto}) through the gate: {out} {}",
            stderr(&o)
        );
    }
    let pf = apiserver_audit(env)
        .into_iter()
        .filter(|e| {
            e["objectRef"]["subresource"] == "portforward"
                && e["stage"] == "ResponseStarted"
                && e["impersonatedUser"]["username"] == portcullis_tests::gate::AGENT_USER
        })
        .map(|e| e["verb"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>();
    // WebSocket arrives as a GET (verb get), SPDY as a POST (verb create).
    ensure!(
        pf.iter().any(|v| v == "get") && pf.iter().any(|v| v == "create"),
        "the apiserver did not see both port-forward protocols from the gate: {pf:?}"
    );
    // attach to a container that echoes its stdin, both protocols.
    for (proto, websockets) in [("websocket", "true"), ("spdy", "false")] {
        let script = format!(
            "export KUBECTL_REMOTE_COMMAND_WEBSOCKETS={websockets}; \
             (echo attached-{proto}; sleep 2) | timeout 8 kubectl attach -i {TARGET_POD} -c echo; true"
        );
        let o = run_pod(env.in_pod(POD, &["sh", "-c", &script]), None)?;
        let out = String::from_utf8_lossy(&o.stdout);
        ensure!(
            out.contains(&format!("attached-{proto}")),
            "attach ({proto}) through the gate: {out} {}",
            stderr(&o)
        );
    }
    let attach = apiserver_audit(env).into_iter().any(|e| {
        e["objectRef"]["subresource"] == "attach"
            && e["impersonatedUser"]["username"] == portcullis_tests::gate::AGENT_USER
    });
    ensure!(attach, "the apiserver saw no attach from the gate");
    let _ = NAMESPACE;
    Ok(())
}

const PYTHON: &str = r#"
import sys, json
from kubernetes import client, config, watch
config.load_incluster_config()
v1 = client.CoreV1Api()
names = [c.metadata.name for c in v1.list_namespaced_config_map("e2e").items]
v1.create_namespaced_config_map("e2e", client.V1ConfigMap(
    metadata=client.V1ObjectMeta(name="made-by-python"), data={"lang": "python"}))
got = v1.read_namespaced_config_map("made-by-python", "e2e").data
seen = []
w = watch.Watch()
for ev in w.stream(v1.list_namespaced_config_map, "e2e", timeout_seconds=10):
    seen.append((ev["type"], ev["object"].metadata.name))
    if ev["object"].metadata.name == "made-by-python":
        w.stop()
print(json.dumps({"listed": names, "read": got, "seen": seen}))
"#;

pub fn python_client(env: &mut Env) -> Result<()> {
    let o = python(env, POD, "client.py", PYTHON, &[])?;
    ensure!(o.status.success(), "python client failed: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("python printed {}", String::from_utf8_lossy(&o.stdout)))?;
    ensure!(v["read"]["lang"] == "python", "{v}");
    ensure!(
        v["seen"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e[1] == "made-by-python")),
        "watch did not show the new object: {v}"
    );
    let direct = env.direct_ok(&["get", "configmaps", "-o", "name"])?;
    for n in v["listed"].as_array().context("listed")? {
        let n = n.as_str().unwrap_or_default();
        ensure!(
            direct.contains(&format!("configmap/{n}")),
            "python listed {n}, direct did not"
        );
    }
    Ok(())
}

/// The API server sends a GOAWAY after 1 request in 50 (the node's `--goaway-chance`),
/// as HA clusters run it: while an agent keeps 32 requests in flight, the daemon's
/// connection to the API server goes away under them again and again, and the requests
/// it sent after the API server's GOAWAY left are refused unprocessed. The daemon sends
/// those again, as Go's client does for kubectl talking to the API server directly: not
/// one of 4,000 GETs from an agent pod fails (before, the daemon answered them 502).
pub fn goaway_races(env: &mut Env) -> Result<()> {
    const RESENT: &str = "the API server refused a request unprocessed: sending it again";
    let resent_before = env.daemon_log().matches(RESENT).count();
    env.admin_ok(&["create", "configmap", "goaway-probe", "--from-literal=k=v"])?;
    let path = format!("/api/v1/namespaces/{NAMESPACE}/configmaps/goaway-probe");
    let url = format!("--url=https://{}", env.cluster_ip());
    let token = format!("--token={}", env.agent_token.trim());
    let ca = format!("--ca={POD_CA}");
    let argv = [
        "pc-load",
        url.as_str(),
        ca.as_str(),
        token.as_str(),
        "--max-secs=120",
        "get",
        "--path",
        path.as_str(),
        "--count=4000",
        "--concurrency=32",
    ];
    let o = run_pod(env.in_pod(POD, &argv), None)?;
    ensure!(
        o.status.success(),
        "pc-load in the agent pod: {}",
        tail(&stderr(&o), 10)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or(""))
        .with_context(|| format!("pc-load's result: {out}"))?;
    ensure!(
        v["requests"] == 4000 && v["errors"] == 0,
        "requests failed while the API server sent GOAWAYs: {v}"
    );
    // Proof the race happened (else the case would pass for nothing): the daemon
    // sent some requests again. The installed daemon logs at the shipped level.
    if !env.daemon.installed {
        let resent = env.daemon_log().matches(RESENT).count() - resent_before;
        ensure!(
            resent > 0,
            "no request was refused unprocessed: the GOAWAY race was not exercised"
        );
        println!("    {resent} requests refused unprocessed and sent again; none failed");
    }
    Ok(())
}
