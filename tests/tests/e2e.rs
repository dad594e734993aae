//! End-to-end tier: unmodified kubectl and the Python `kubernetes` client, running as
//! an enrolled agent, talk to the API Service address; the kernel redirects them to the
//! daemon, which terminates TLS and forwards to a real kube-apiserver 1.20.2. Each
//! command's result is compared with the same command run directly against the
//! apiserver (as the same scoped identity).
//!
//! One lab and one control plane are shared by every case (starting the apiserver takes
//! seconds), so this binary has its own small runner: `cargo xtask test --tier e2e --
//! FILTER` runs the cases whose name contains FILTER. Needs root.
use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use portcullis_tests::{
    bin,
    cluster::{self, AGENT_USER, Gate, NAMESPACE, POD},
};

/// Shared by every case.
type Env = Gate;

type Case = (&'static str, fn(&mut Env) -> Result<()>);

const CASES: &[Case] = &[
    ("version_and_discovery_match_direct", version_and_discovery),
    ("get_table_matches_direct", get_table),
    ("create_and_apply_from_files", create_and_apply),
    ("create_secret_generic_protobuf_body", create_secret),
    ("get_watch_streams_each_event", watch_streams),
    ("delete_and_its_follow_up_watch", delete_waits),
    ("logs_follow_streams_lines", logs_follow),
    ("exec_over_websocket", exec_websocket),
    ("exec_over_spdy_fallback", exec_spdy),
    ("python_client_list_create_watch", python_client),
    (
        "agent_identity_is_replaced_by_impersonation",
        identity_replaced,
    ),
    ("unredirected_connection_is_refused", unredirected_refused),
    ("malformed_requests_get_clear_errors", malformed_requests),
    (
        "slow_header_sender_is_cut_off_while_others_are_served",
        slow_headers,
    ),
    ("http2_rapid_reset_closes_only_that_connection", rapid_reset),
    // Last: stops the apiserver.
    ("apiserver_down_is_a_503_status", apiserver_down),
];

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("running {} e2e cases", selected.len());
    if selected.is_empty() {
        return;
    }
    let started = Instant::now();
    let mut env = match setup() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("e2e setup failed: {e:#}");
            std::process::exit(1);
        }
    };
    println!(
        "control plane and daemon ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut failed = Vec::new();
    for (name, f) in selected {
        let t = Instant::now();
        let r = f(&mut env);
        match r {
            Ok(()) => println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!(
                    "test {name} ... FAILED ({:.1} s)\n{e:#}\n",
                    t.elapsed().as_secs_f64()
                );
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\ndaemon log (tail):\n{}", tail(&env.lab.daemon_log(), 40));
        println!("\nfailed: {failed:?}");
        drop(env);
        std::process::exit(1);
    }
    println!(
        "e2e: all passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

fn setup() -> Result<Env> {
    // A short header timeout keeps the slow-sender case quick.
    Gate::start("e2e", "  header_timeout: 3s\n")
}

trait Clients {
    fn kubectl(&self) -> &Path;
    fn gate(&self, args: &[&str]) -> Result<Output>;
    fn direct(&self, args: &[&str]) -> Result<Output>;
    fn gate_ok(&self, args: &[&str]) -> Result<String>;
    fn direct_ok(&self, args: &[&str]) -> Result<String>;
    fn admin_ok(&self, args: &[&str]) -> Result<String>;
    fn file(&self, name: &str, text: &str) -> Result<String>;
}

impl Clients for Env {
    fn kubectl(&self) -> &Path {
        &self.cluster.parts.kubectl
    }

    fn gate(&self, args: &[&str]) -> Result<Output> {
        run_bounded(self.gate_cmd(args), None)
    }

    fn direct(&self, args: &[&str]) -> Result<Output> {
        run_bounded(self.direct_cmd(args), None)
    }

    fn gate_ok(&self, args: &[&str]) -> Result<String> {
        ok(self.gate(args)?, "gate", args)
    }

    fn direct_ok(&self, args: &[&str]) -> Result<String> {
        ok(self.direct(args)?, "direct", args)
    }

    fn admin_ok(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", NAMESPACE];
        full.extend_from_slice(args);
        ok(self.cluster.kubectl_admin(&full)?, "admin", args)
    }

    fn file(&self, name: &str, text: &str) -> Result<String> {
        let p = self.lab.dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    }
}

fn ok(o: Output, who: &str, args: &[&str]) -> Result<String> {
    if !o.status.success() {
        bail!(
            "{who} kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs with a 60 s bound (every client run stops by itself).
fn run_bounded(mut cmd: Command, stdin: Option<&str>) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting a client")?;
    if let Some(text) = stdin {
        let mut si = child.stdin.take().context("stdin")?;
        si.write_all(text.as_bytes())?;
    }
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => Ok(r?),
        Err(_) => {
            // SAFETY-free: kill by pid through the kill command.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            bail!("client did not finish within 60 s")
        }
    }
}

/// Replaces ages ("5s", "2m3s", "<unknown>") so two listings taken a moment apart compare.
fn normalize_ages(s: &str) -> String {
    s.lines()
        .map(|l| {
            l.split_whitespace()
                .map(|w| {
                    let is_age = w.len() <= 8
                        && w.chars().next().is_some_and(|c| c.is_ascii_digit())
                        && w.chars().all(|c| c.is_ascii_digit() || "smhdy".contains(c))
                        && w.chars().last().is_some_and(|c| "smhdy".contains(c));
                    if is_age { "<age>" } else { w }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---- cases ----

fn version_and_discovery(env: &mut Env) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(&env.gate_ok(&["version", "-o", "json"])?)?;
    ensure!(
        v["serverVersion"]["gitVersion"] == "v1.20.2",
        "server version through the gate: {v}"
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

fn get_table(env: &mut Env) -> Result<()> {
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
        normalize_ages(&gate) == normalize_ages(&direct),
        "pods:\n{gate}\n---\n{direct}"
    );
    Ok(())
}

fn create_and_apply(env: &mut Env) -> Result<()> {
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
    let out = env.direct_ok(&["apply", "-f", &f2])?;
    ensure!(
        out.trim() == "configmap/applied-by-agent unchanged",
        "direct apply: {out}"
    );
    let out = env.gate_ok(&["apply", "-f", &f2])?;
    ensure!(
        out.trim() == "configmap/applied-by-agent unchanged",
        "gate apply: {out}"
    );
    Ok(())
}

fn create_secret(env: &mut Env) -> Result<()> {
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

fn watch_streams(env: &mut Env) -> Result<()> {
    let mut child = env
        .gate_cmd(&[
            "get",
            "configmaps",
            "-w",
            "-o",
            "name",
            "--request-timeout=0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
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

fn delete_waits(env: &mut Env) -> Result<()> {
    env.admin_ok(&["create", "configmap", "delete-me-gate"])?;
    env.admin_ok(&["create", "configmap", "delete-me-direct"])?;
    // kubectl deletes, then GETs and watches with fieldSelector=metadata.name until gone.
    let gate = env.gate_ok(&["delete", "configmap", "delete-me-gate", "--wait=true"])?;
    let direct = env.direct_ok(&["delete", "configmap", "delete-me-direct", "--wait=true"])?;
    ensure!(
        gate.trim() == "configmap \"delete-me-gate\" deleted",
        "gate: {gate}"
    );
    ensure!(
        gate.replace("-gate", "") == direct.replace("-direct", ""),
        "{gate} vs {direct}"
    );
    let o = env
        .cluster
        .kubectl_admin(&["-n", NAMESPACE, "get", "configmap", "delete-me-gate"])?;
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

fn logs_follow(env: &mut Env) -> Result<()> {
    let gate = env.gate_ok(&["logs", POD])?;
    let direct = env.direct_ok(&["logs", POD])?;
    ensure!(
        gate == "log line 1\nlog line 2\nlog line 3\n",
        "logs: {gate:?}"
    );
    ensure!(gate == direct);
    // -f: the fake kubelet writes 3 lines, then one every 400 ms. Lines must arrive as
    // they are written, not when the stream ends.
    let mut child = env
        .gate_cmd(&["logs", "-f", POD])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let t0 = Instant::now();
    let mut arrivals = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        arrivals.push((t0.elapsed(), line));
        if arrivals.len() == 8 || t0.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
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

fn kubelet_saw(env: &Env, needle: &str) -> bool {
    std::fs::read_to_string(env.cluster.dir.join("pc-fake-kubelet.log"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(needle))
}

fn exec_cases(env: &Env, envs: &[(&str, &str)], tag: &str) -> Result<()> {
    let with = |args: &[&str], stdin: Option<&str>| {
        let mut c = env.gate_cmd(args);
        for (k, v) in envs {
            c.env(k, v);
        }
        run_bounded(c, stdin)
    };
    let o = with(&["exec", POD, "--", "echo", "hello", tag], None)?;
    ensure!(o.status.success(), "exec failed: {}", stderr(&o));
    ensure!(
        String::from_utf8_lossy(&o.stdout) == format!("hello {tag}\n"),
        "{o:?}"
    );
    let o = with(
        &["exec", "-i", POD, "--", "cat"],
        Some("piped through stdin\n"),
    )?;
    ensure!(o.status.success(), "exec -i failed: {}", stderr(&o));
    ensure!(
        String::from_utf8_lossy(&o.stdout) == "piped through stdin\n",
        "{o:?}"
    );
    let o = with(&["exec", POD, "--", "fail", "3"], None)?;
    ensure!(
        o.status.code() == Some(3),
        "exit code {:?}: {}",
        o.status.code(),
        stderr(&o)
    );
    ensure!(stderr(&o).contains("failing"), "{}", stderr(&o));
    // Same as direct.
    let mut c = env.direct_cmd(&["exec", POD, "--", "echo", "hello", tag]);
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

fn exec_websocket(env: &mut Env) -> Result<()> {
    exec_cases(env, &[], "websocket")?;
    ensure!(
        kubelet_saw(env, r#"["echo" "hello" "websocket"] upgrade="websocket""#),
        "the kubelet did not see a WebSocket exec:\n{}",
        env.cluster.log_tail("pc-fake-kubelet")
    );
    Ok(())
}

fn exec_spdy(env: &mut Env) -> Result<()> {
    exec_cases(
        env,
        &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")],
        "spdy",
    )?;
    ensure!(
        kubelet_saw(env, r#"["echo" "hello" "spdy"] upgrade="SPDY/3.1""#),
        "the kubelet did not see a SPDY exec:\n{}",
        env.cluster.log_tail("pc-fake-kubelet")
    );
    Ok(())
}

const PYTHON: &str = r#"
import sys, json
from kubernetes import client, config, watch
config.load_kube_config(config_file=sys.argv[1])
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

fn python_client(env: &mut Env) -> Result<()> {
    let script = env.file("client.py", PYTHON)?;
    let mut c = env.lab.agent_command(Path::new("/usr/bin/env"));
    c.arg("python3")
        .arg(&script)
        .arg(&env.agent_kubeconfig)
        .env("PYTHONPATH", &env.cluster.parts.pythonpath);
    let o = run_bounded(c, None)?;
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

fn audit_entries(env: &Env) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&env.cluster.audit_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn identity_replaced(env: &mut Env) -> Result<()> {
    // The agent's own token has no RBAC at all; what it may do comes from the scoped
    // identity the daemon impersonates. Its attempts to impersonate are stripped.
    for extra in [
        &[][..],
        &["--as=system:admin", "--as-group=system:masters"][..],
    ] {
        let mut args = vec!["get", "secrets", "-n", "kube-system"];
        args.extend_from_slice(extra);
        let o = env.gate(&args)?;
        let e = stderr(&o);
        ensure!(
            !o.status.success(),
            "agent read kube-system secrets with {extra:?}"
        );
        ensure!(
            e.contains("Forbidden") && e.contains(&format!("User \"{AGENT_USER}\"")),
            "with {extra:?}: {e}"
        );
    }
    let entries = audit_entries(env);
    let agent_sa = format!("system:serviceaccount:{NAMESPACE}:agent");
    ensure!(
        !entries
            .iter()
            .any(|e| e["user"]["username"] == agent_sa.as_str()),
        "the agent's own token reached the apiserver"
    );
    let via_gate = entries
        .iter()
        .filter(|e| {
            e["user"]["username"] == cluster::DAEMON_USER
                && e["impersonatedUser"]["username"] == AGENT_USER
        })
        .count();
    ensure!(
        via_gate > 10,
        "only {via_gate} audit entries show the daemon impersonating the agent"
    );
    ensure!(
        !entries
            .iter()
            .any(|e| e["user"]["username"] == cluster::DAEMON_USER
                && e["impersonatedUser"]["username"] == "system:admin"),
        "an agent-requested impersonation reached the apiserver"
    );
    Ok(())
}

fn unredirected_refused(env: &mut Env) -> Result<()> {
    // From the node namespace, not an agent: straight to the daemon's address.
    let mut c = env.lab.command_in_ns(env.lab.ns_node(), env.kubectl());
    c.arg(format!("--kubeconfig={}", env.agent_kubeconfig.display()))
        .arg(format!("--server=https://{}", env.lab.daemon_v4()))
        .arg("--tls-server-name=kubernetes.default.svc")
        // --raw skips discovery, whose errors kubectl reports only as "unknown".
        .args(["get", "--raw", "/api/v1/namespaces/e2e/configmaps"])
        .env("HOME", env.lab.dir.join("home-node"));
    let o = run_bounded(c, None)?;
    let e = stderr(&o);
    ensure!(!o.status.success(), "served an unredirected connection");
    ensure!(e.contains("Forbidden") && e.contains("redirected"), "{e}");
    Ok(())
}

fn apiserver_down(env: &mut Env) -> Result<()> {
    env.cluster.stop("kube-apiserver");
    let o = env.gate(&["get", "configmaps", "--request-timeout=20s"])?;
    let e = stderr(&o);
    ensure!(!o.status.success(), "succeeded with the apiserver down");
    ensure!(
        e.contains("ServiceUnavailable") || e.contains("cannot reach the Kubernetes API server"),
        "kubectl said: {e}"
    );
    ensure!(
        e.contains("cannot reach the Kubernetes API server"),
        "kubectl said: {e}"
    );
    Ok(())
}

/// pc-abuse as an agent: a hostile client, redirected to the daemon like any other.
fn abuse(env: &Env, args: &[&str]) -> Result<serde_json::Value> {
    let mut c = env.lab.agent_command(&bin("pc-abuse"));
    c.arg("--ca")
        .arg(env.lab.state_dir().join("ca/ca.crt"))
        .args(args);
    let o = run_bounded(c, None)?;
    ensure!(
        o.status.success(),
        "pc-abuse {args:?} failed: {}",
        stderr(&o)
    );
    Ok(serde_json::from_slice(&o.stdout)?)
}

fn first_status(v: &serde_json::Value) -> String {
    v["statuses"][0].as_str().unwrap_or("").to_string()
}

fn malformed_requests(env: &mut Env) -> Result<()> {
    let api = env.lab.cluster_ip().to_string();
    for (kind, want) in [
        ("garbage", "HTTP/1.1 400"),
        ("duplicate-length", "HTTP/1.1 400"),
        ("huge-header", "HTTP/1.1 431"),
    ] {
        let v = abuse(env, &["h1", kind, &api])?;
        ensure!(first_status(&v).starts_with(want), "{kind}: {v}");
        ensure!(v["closed"] == true, "{kind}: connection left open: {v}");
    }
    // Smuggling: refused with a Status, the connection closed, and the request hidden
    // in the body never reaches the API server.
    let v = abuse(env, &["h1", "smuggle", &api])?;
    ensure!(first_status(&v).starts_with("HTTP/1.1 400"), "smuggle: {v}");
    ensure!(
        v["statuses"].as_array().map(Vec::len) == Some(1),
        "second request answered: {v}"
    );
    ensure!(
        v["body"]
            .as_str()
            .unwrap_or("")
            .contains("\"kind\":\"Status\""),
        "no Status body: {v}"
    );
    ensure!(v["closed"] == true, "smuggle: connection left open: {v}");
    let hidden = audit_entries(env).into_iter().any(|e| {
        e["verb"] == "delete"
            && e["objectRef"]["resource"] == "configmaps"
            && e["objectRef"]["name"] == "x"
    });
    ensure!(!hidden, "the smuggled DELETE reached the API server");
    // And the gate still serves.
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    Ok(())
}

fn slow_headers(env: &mut Env) -> Result<()> {
    let api = env.lab.cluster_ip().to_string();
    let mut c = env.lab.agent_command(&bin("pc-abuse"));
    c.arg("--ca")
        .arg(env.lab.state_dir().join("ca/ca.crt"))
        .args(["h1", "slow-headers", &api])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let slow = c.spawn()?;
    // While it trickles, everyone else is served normally.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "served slowly: {:?}",
        t.elapsed()
    );
    let o = slow.wait_with_output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("pc-abuse said {}", String::from_utf8_lossy(&o.stdout)))?;
    // header_timeout is 3 s in this lab; the trickle would take 30 s.
    let ms = v["elapsed_ms"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        v["closed"] == true || !v["write_error"].is_null(),
        "slow sender not cut off: {v}"
    );
    ensure!((2500..10_000).contains(&ms), "cut off after {ms} ms: {v}");
    Ok(())
}

fn rapid_reset(env: &mut Env) -> Result<()> {
    let api = env.lab.cluster_ip().to_string();
    let lists = |env: &Env| {
        audit_entries(env)
            .iter()
            .filter(|e| e["verb"] == "list" && e["objectRef"]["resource"] == "configmaps")
            .count()
    };
    // A burst: h2's limit on streams reset before they were accepted answers it.
    // Paced: each stream is accepted and forwarded before its reset, so the daemon's
    // own cancel budget has to close the connection.
    for (pace, max_reached) in [("0", 1500), ("300", 600)] {
        let before = lists(env);
        let v = abuse(
            env,
            &["rapid-reset", &api, "--count", "5000", "--pace-us", pace],
        )?;
        let verdict = format!("{} {}", v["connection"], v["send_error"]);
        ensure!(
            [
                "ENHANCE_YOUR_CALM",
                "GOAWAY",
                "closed",
                "broken pipe",
                "reset"
            ]
            .iter()
            .any(|w| verdict.contains(w)),
            "pace {pace}: connection not closed: {v}"
        );
        // Audit is written asynchronously: give it a moment.
        std::thread::sleep(Duration::from_secs(2));
        let reached = lists(env) - before;
        ensure!(
            reached < max_reached,
            "pace {pace}: {reached} of the cancelled streams reached the API server"
        );
        println!("    rapid reset, pace {pace} µs: {v}; {reached} reached the API server");
    }
    ensure!(
        env.lab.daemon_log().contains("too many cancelled requests"),
        "the daemon's cancel budget did not close the paced attack"
    );
    let t = Instant::now();
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "gate slow after the attack: {:?}",
        t.elapsed()
    );
    Ok(())
}
