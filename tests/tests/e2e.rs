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
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use portcullis_tests::{
    bin,
    cluster::{self, AGENT_USER, Gate, NAMESPACE, POD},
    idp::Sign,
};
use serde_json::json;

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
    ("projected_token_is_bound_to_its_pod", projected_tokens),
    ("oidc_tokens_are_verified_and_keys_rotate", oidc_tokens),
    (
        "policy_decides_and_rbac_stays_second_line",
        policy_decisions,
    ),
    (
        "approval_within_hold_lets_the_request_proceed",
        approval_within_hold,
    ),
    (
        "approval_after_hold_grants_a_retry_until_ttl",
        approval_after_hold,
    ),
    ("denied_and_expired_approvals", denied_and_expired),
    ("no_self_approval_and_remote_approvers", self_approval),
    (
        "pending_approval_survives_a_daemon_restart",
        approval_restart,
    ),
    (
        "policy_hot_reload_keeps_the_last_good_policy",
        policy_reload,
    ),
    (
        "admin_socket_is_root_only_and_policy_test_exits_nonzero",
        admin_socket_and_policy_cli,
    ),
    ("masking_canaries_never_reach_the_agent", masking_canaries),
    (
        "audit_records_requests_and_mutations_before_they_act",
        audit_requests,
    ),
    ("audit_sink_down_then_up_loses_nothing", audit_sink),
    (
        "audit_sessions_export_and_replay",
        audit_sessions_and_replay,
    ),
    (
        "audit_chain_of_kernel_events_verifies_then_detects_a_tamper",
        audit_chain,
    ),
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
                failed.push((name, format!("{e:#}")));
            }
        }
    }
    if !failed.is_empty() {
        println!("\ndaemon log (tail):\n{}", tail(&env.lab.daemon_log(), 40));
        // Repeated last: CI shows the tail of the output.
        for (name, why) in &failed {
            println!("\nFAILED {name}: {}", tail(why, 15));
        }
        let names: Vec<&str> = failed.iter().map(|(n, _)| **n).collect();
        println!("\nfailed: {names:?}");
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

/// The e2e policy. The transparent-proxy cases run as the pod-bound service account
/// e2e/agent, which may do anything RBAC lets its scoped identity do; the identity,
/// policy and approval cases use it and OIDC users from the test IdP.
const POLICY: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: e2e}
spec:
  identities:
  - subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}, {kind: Group, name: "oidc:devs"}]
    impersonate: {user: "portcullis:agent", groups: ["portcullis:agents"]}
  rules:
  - name: agent-everything
    subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}]
    verbs: ["*"]
    apiGroups: ["*"]
    resources: ["*"]
    action: allow
  - name: agent-non-resource
    subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}]
    verbs: ["*"]
    nonResourceURLs: ["*"]
    action: allow
  - name: devs-discovery
    subjects: [{kind: Group, name: "oidc:devs"}]
    verbs: [get]
    nonResourceURLs: ["/api", "/api/*", "/apis", "/apis/*", "/version"]
    action: allow
  - name: devs-read
    subjects: [{kind: Group, name: "oidc:devs"}]
    verbs: [get, list, watch]
    apiGroups: ["*"]
    resources: ["*"]
    action: allow
  - name: devs-write-configmaps
    subjects: [{kind: Group, name: "oidc:devs"}]
    verbs: [create, delete]
    apiGroups: [""]
    resources: [configmaps]
    action: allow
  - name: devs-no-exec
    subjects: [{kind: Group, name: "oidc:devs"}]
    verbs: ["*"]
    apiGroups: [""]
    resources: ["pods/exec", "pods/attach", "pods/portforward"]
    action: deny
    message: interactive access is not for agents
  - name: held-deletes
    subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}, {kind: Group, name: "oidc:devs"}]
    verbs: [delete]
    apiGroups: [""]
    resources: [configmaps]
    resourceNames: ["held-*"]
    action: approve
    message: deleting held-* needs a human
    approval:
      approvers: [{kind: Group, name: "oidc:oncall"}]
      holdTime: 4s
      grantTTL: 8s
"#;

fn setup() -> Result<Env> {
    // A short header timeout keeps the slow-sender case quick.
    Gate::start("e2e", Some(POLICY), "  header_timeout: 3s\n")
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
            let _ = portcullis_tests::signal(pid, libc::SIGKILL);
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
    let mut c = env
        .lab
        .command_in_cgroup(&env.pod_cg, Path::new("/usr/bin/env"));
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
    let mut c = env.agent_bin("pc-abuse");
    c.arg("--ca")
        .arg(env.lab.state_dir().join("ca/ca.crt"))
        .arg(format!("--token={}", env.agent_token))
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
    let mut c = env.agent_bin("pc-abuse");
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
    // On a loaded machine the daemon may accept streams later than the client resets
    // them, and then h2's own limit (ENHANCE_YOUR_CALM) closes the paced attack before
    // the daemon's budget does; the pace is then slowed until the budget is what acts.
    let budget_log = |env: &Env| {
        env.lab
            .daemon_log()
            .matches("too many cancelled requests")
            .count()
    };
    let mut budget_acted = false;
    for (pace, max_reached) in [("0", 1500), ("300", 600), ("1000", 600), ("3000", 600)] {
        if budget_acted {
            break;
        }
        let before = lists(env);
        let log_before = budget_log(env);
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
        budget_acted = pace != "0" && budget_log(env) > log_before;
        println!(
            "    rapid reset, pace {pace} µs: {v}; {reached} reached the API server; \
             daemon budget acted: {budget_acted}"
        );
    }
    ensure!(
        budget_acted,
        "the daemon's cancel budget never closed a paced attack"
    );
    let t = Instant::now();
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(15),
        "gate slow after the attack: {:?}",
        t.elapsed()
    );
    Ok(())
}

// ---- identity, policy, approvals ----

/// One HTTPS GET from cgroup `cg` (agent netns) to the Service address with `token`
/// and, if given, an Accept header, by Python's urllib (stdlib only): (status code,
/// Content-Type, body read as latin-1 so any bytes survive).
fn agent_request(
    env: &Env,
    cg: &Path,
    token: Option<&str>,
    path: &str,
    accept: Option<&str>,
) -> Result<(u16, String, String)> {
    const PY: &str = r#"
import json, ssl, sys, urllib.request, urllib.error
url, ca, token, accept = sys.argv[1:5]
req = urllib.request.Request(url)
if token:
    req.add_header("Authorization", "Bearer " + token)
if accept:
    req.add_header("Accept", accept)
ctx = ssl.create_default_context(cafile=ca)
try:
    r = urllib.request.urlopen(req, context=ctx, timeout=20)
    print(json.dumps({"code": r.status, "type": r.headers.get("Content-Type", ""), "body": r.read().decode("latin-1")}))
except urllib.error.HTTPError as e:
    print(json.dumps({"code": e.code, "type": e.headers.get("Content-Type", ""), "body": e.read().decode("latin-1")}))
"#;
    let mut c = env.lab.command_in_cgroup(cg, Path::new("/usr/bin/env"));
    c.args(["python3", "-c", PY])
        .arg(format!("https://{}{path}", env.lab.cluster_ip()))
        .arg(env.lab.state_dir().join("ca/ca.crt"))
        .arg(token.unwrap_or(""))
        .arg(accept.unwrap_or(""));
    let o = run_bounded(c, None)?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "python said: {} {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        )
    })?;
    Ok((
        v["code"].as_u64().unwrap_or(0) as u16,
        v["type"].as_str().unwrap_or("").to_owned(),
        v["body"].as_str().unwrap_or("").to_owned(),
    ))
}

/// [`agent_request`] without an Accept header: (status code, body).
fn agent_get(env: &Env, cg: &Path, token: Option<&str>, path: &str) -> Result<(u16, String)> {
    let (code, _, body) = agent_request(env, cg, token, path, None)?;
    Ok((code, body))
}

const PODS: &str = "/api/v1/namespaces/e2e/pods";

fn expect_401(env: &Env, cg: &Path, token: Option<&str>, needle: &str, what: &str) -> Result<()> {
    let (code, body) = agent_get(env, cg, token, PODS)?;
    ensure!(code == 401, "{what}: expected 401, got {code}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{what}: {body}"))?;
    ensure!(
        v["kind"] == "Status" && v["reason"] == "Unauthorized",
        "{what}: not a Status: {body}"
    );
    let msg = v["message"].as_str().unwrap_or("");
    ensure!(
        msg.contains(needle),
        "{what}: message `{msg}` lacks `{needle}`"
    );
    Ok(())
}

fn projected_tokens(env: &mut Env) -> Result<()> {
    let (code, body) = agent_get(env, &env.pod_cg, Some(&env.agent_token), PODS)?;
    ensure!(code == 200, "own pod: {code} {body}");
    // The same token from another pod's cgroup: stolen.
    expect_401(
        env,
        &env.other_cg,
        Some(&env.agent_token),
        "bound to pod e2e/work",
        "stolen token",
    )?;
    expect_401(env, &env.pod_cg, None, "no bearer token", "no token")?;
    let wrong_aud = env
        .cluster
        .agent_token_for(Some(&["not-the-api"]), Some((POD, &env.work_uid)))?;
    expect_401(
        env,
        &env.pod_cg,
        Some(&wrong_aud),
        "audience",
        "wrong audience",
    )?;
    // A token that names no pod works from any enrolled pod; the kernel's pod is recorded.
    let unbound = env.cluster.agent_token_for(None, None)?;
    let (code, body) = agent_get(env, &env.other_cg, Some(&unbound), PODS)?;
    ensure!(code == 200, "unbound token: {code} {body}");
    let log = env.lab.daemon_log();
    ensure!(
        log.lines()
            .any(|l| l.contains("system:serviceaccount:e2e:agent") && l.contains(&env.other_uid)),
        "no request record with the kernel's pod {}",
        env.other_uid
    );
    ensure!(
        !log.contains(&env.agent_token),
        "a token reached the daemon log"
    );
    Ok(())
}

fn idp(env: &Env) -> &portcullis_tests::idp::Idp {
    env.idp.as_ref().expect("gated e2e has an IdP")
}

fn oidc(env: &Env, user: &str, groups: &[&str]) -> Result<String> {
    let i = idp(env);
    i.mint(
        &i.claims(
            user,
            cluster::IDP_AUDIENCE,
            600,
            serde_json::json!({"groups": groups}),
        ),
        Sign::Key("k1"),
    )
}

fn oidc_tokens(env: &mut Env) -> Result<()> {
    let i = idp(env);
    let cg = env.pod_cg.clone();
    let good = oidc(env, "alice", &["devs"])?;
    let (code, body) = agent_get(env, &cg, Some(&good), PODS)?;
    ensure!(code == 200, "valid OIDC token: {code} {body}");
    let c =
        |ttl: i64, extra: serde_json::Value| i.claims("alice", cluster::IDP_AUDIENCE, ttl, extra);
    let cases: Vec<(String, &str, &str)> = vec![
        (
            i.mint(&c(-120, json!({})), Sign::Key("k1"))?,
            "expired",
            "expired",
        ),
        (
            i.mint(
                &c(600, json!({"nbf": portcullis_tests::idp::now() + 300})),
                Sign::Key("k1"),
            )?,
            "not valid yet",
            "not yet valid",
        ),
        (
            i.mint(&c(600, json!({"aud": "someone-else"})), Sign::Key("k1"))?,
            "audience",
            "wrong audience",
        ),
        (
            i.mint(
                &c(600, json!({"iss": "https://evil.example"})),
                Sign::Key("k1"),
            )?,
            "not trusted",
            "wrong issuer",
        ),
        (
            i.tampered(&c(600, json!({})), "k1", &json!({"email": "admin"}))?,
            "signature",
            "bad signature",
        ),
        (
            i.mint(&c(600, json!({})), Sign::HmacWithPublicKey("k1"))?,
            "HS256 is not allowed",
            "alg confusion",
        ),
        (
            i.mint(&c(600, json!({})), Sign::None)?,
            "not a well-formed JWT",
            "alg none",
        ),
    ];
    for (token, needle, what) in &cases {
        expect_401(env, &cg, Some(token), needle, what)?;
    }
    // A key the IdP has not published yet: unknown kid, until it is published (rotation
    // without a restart; the refetch is rate-limited to one per 10 s).
    i.keygen("k2")?;
    let rotated = i.mint(&c(600, json!({"groups": ["devs"]})), Sign::Key("k2"))?;
    expect_401(env, &cg, Some(&rotated), "key id `k2`", "unknown kid")?;
    i.publish(&["k1", "k2"])?;
    let t = Instant::now();
    loop {
        let (code, body) = agent_get(env, &cg, Some(&rotated), PODS)?;
        if code == 200 {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(25),
            "rotated key still refused after 25 s: {code} {body}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "    rotated key accepted {:.1} s after publishing",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// kubectl as the agent in pod `work`, but with `token`.
fn gate_as(env: &Env, token: &str, args: &[&str]) -> Result<Output> {
    let mut full = vec![format!("--token={token}")];
    full.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    run_bounded(env.gate_cmd(&refs), None)
}

fn policy_decisions(env: &mut Env) -> Result<()> {
    let alice = oidc(env, "alice", &["devs"])?;
    let o = gate_as(env, &alice, &["get", "pods"])?;
    ensure!(o.status.success(), "alice get pods: {}", stderr(&o));
    let o = gate_as(env, &alice, &["exec", POD, "--", "echo", "hi"])?;
    ensure!(
        !o.status.success()
            && stderr(&o).contains("Portcullis policy denies")
            && stderr(&o).contains("interactive access"),
        "exec should be denied by policy: {}",
        stderr(&o)
    );
    ensure!(
        !kubelet_saw(env, "echo hi"),
        "denied exec reached the kubelet"
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

fn pc(env: &Env, args: &[&str]) -> Result<serde_json::Value> {
    let o = env.portcullis(args)?;
    ensure!(o.status.success(), "portcullis {args:?}: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(&out).with_context(|| format!("portcullis {args:?} printed {out}"))
}

fn pc_err(env: &Env, args: &[&str]) -> Result<String> {
    let o = env.portcullis(args)?;
    ensure!(
        !o.status.success(),
        "portcullis {args:?} should fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    Ok(stderr(&o))
}

/// The pending approval for configmap `name`, waiting up to `secs`.
fn pending_for(env: &Env, name: &str, secs: u64) -> Result<String> {
    let t = Instant::now();
    loop {
        let v = pc(env, &["approvals", "list", "-o", "json"])?;
        if let Some(a) = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["request"]["name"] == name && a["state"] == "pending")
        {
            return Ok(a["id"].as_str().unwrap_or_default().to_owned());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(secs),
            "no pending approval for {name}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cm_exists(env: &Env, name: &str) -> Result<bool> {
    Ok(env
        .cluster
        .kubectl_admin(&["-n", NAMESPACE, "get", "configmap", name])?
        .status
        .success())
}

fn approval_id_in(msg: &str) -> Option<String> {
    let at = msg.find("approval apr-")? + "approval ".len();
    Some(
        msg[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect(),
    )
}

/// Creates configmap `name` and starts the agent's delete of it in the background.
fn start_held_delete(env: &Env, name: &str) -> Result<std::process::Child> {
    env.admin_ok(&["create", "configmap", name])?;
    Ok(env
        .gate_cmd(&["delete", "configmap", name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn approval_within_hold(env: &mut Env) -> Result<()> {
    let child = start_held_delete(env, "held-a")?;
    let id = pending_for(env, "held-a", 4)?;
    ensure!(cm_exists(env, "held-a")?, "deleted before approval");
    let v = pc(
        env,
        &[
            "approvals",
            "approve",
            &id,
            "--as",
            "oncall-human",
            "--justification",
            "e2e",
        ],
    )?;
    ensure!(v["approval"]["state"] == "approved", "{v}");
    let o = child.wait_with_output()?;
    ensure!(
        o.status.success(),
        "held delete after approval: {}",
        stderr(&o)
    );
    ensure!(!cm_exists(env, "held-a")?, "configmap still there");
    let hooks = idp(env).webhook_calls();
    ensure!(
        hooks.iter().any(|h| h["approval"]["id"] == id.as_str()
            && h["approveCommand"]
                .as_str()
                .is_some_and(|c| c.contains(&id))),
        "webhook not called for {id}: {hooks:?}"
    );
    let log = std::fs::read_to_string(env.lab.state_dir().join("approvals.jsonl"))?;
    ensure!(
        log.contains("approval.requested") && log.contains("approval.approved"),
        "approvals audit: {log}"
    );
    Ok(())
}

fn approval_after_hold(env: &mut Env) -> Result<()> {
    env.admin_ok(&["create", "configmap", "held-b"])?;
    let t = Instant::now();
    let o = env.gate(&["delete", "configmap", "held-b"])?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("is pending"),
        "expected a pending 403: {e}"
    );
    ensure!(
        t.elapsed() >= Duration::from_secs(3),
        "not held: {:?}",
        t.elapsed()
    );
    let id = approval_id_in(&e).context("no approval id in the message")?;
    ensure!(
        e.contains(&format!("portcullis approvals approve {id}")),
        "no approve command: {e}"
    );
    pc(env, &["approvals", "approve", &id, "--as", "oncall-human"])?;
    let granted = Instant::now();
    env.gate_ok(&["delete", "configmap", "held-b"])?;
    // Within the TTL the same request passes again at once.
    env.admin_ok(&["create", "configmap", "held-b"])?;
    let t = Instant::now();
    env.gate_ok(&["delete", "configmap", "held-b"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "grant did not apply: {:?}",
        t.elapsed()
    );
    let grants = pc(env, &["grants", "list", "-o", "json"])?;
    ensure!(
        grants
            .as_array()
            .into_iter()
            .flatten()
            .any(|g| g["approval_id"] == id.as_str() && g["status"] == "active"),
        "{grants}"
    );
    // After the TTL (8 s) it is held again.
    std::thread::sleep(Duration::from_secs(9).saturating_sub(granted.elapsed()));
    env.admin_ok(&["create", "configmap", "held-b"])?;
    let o = env.gate(&["delete", "configmap", "held-b"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("is pending"),
        "after the TTL: {}",
        stderr(&o)
    );
    Ok(())
}

fn denied_and_expired(env: &mut Env) -> Result<()> {
    let child = start_held_delete(env, "held-c")?;
    let id = pending_for(env, "held-c", 4)?;
    let e = pc_err(
        env,
        &[
            "approvals",
            "deny",
            &id,
            "--as",
            "oncall-human",
            "--reason",
            "",
        ],
    )?;
    ensure!(e.contains("needs a reason"), "{e}");
    pc(
        env,
        &[
            "approvals",
            "deny",
            &id,
            "--as",
            "oncall-human",
            "--reason",
            "not today",
        ],
    )?;
    let o = child.wait_with_output()?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("denied by oncall-human: not today"),
        "{e}"
    );
    ensure!(cm_exists(env, "held-c")?, "denied delete happened");
    let e = pc_err(env, &["approvals", "approve", &id, "--as", "oncall-human"])?;
    ensure!(e.contains("already denied"), "{e}");
    // Expiry: nobody decides within pending_ttl (10 s).
    let o = env.gate(&["delete", "configmap", "held-c"])?;
    let id2 = approval_id_in(&stderr(&o)).context("no approval id")?;
    let t = Instant::now();
    loop {
        let a = pc(env, &["approvals", "show", &id2])?;
        if a["state"] == "expired" {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "approval {id2} never expired: {a}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let e = pc_err(env, &["approvals", "approve", &id2, "--as", "oncall-human"])?;
    ensure!(e.contains("already expired"), "{e}");
    ensure!(cm_exists(env, "held-c")?, "expired delete happened");
    Ok(())
}

fn admin_https(env: &Env, token: &str, args: &[&str]) -> Result<Output> {
    let f = env
        .lab
        .dir
        .join(format!("approver-{}.token", portcullis_tests::idp::now()));
    std::fs::write(&f, token)?;
    let (first, rest) = args.split_first().context("args")?;
    Ok(env
        .lab
        .command_in_ns(env.lab.ns_node(), &bin("portcullis"))
        .arg(first)
        .arg(format!("--server=https://{}", cluster::ADMIN_ADDR))
        .arg(format!("--token-file={}", f.display()))
        .arg(format!(
            "--ca-file={}",
            env.lab.state_dir().join("ca/ca.crt").display()
        ))
        .args(rest)
        .stdin(Stdio::null())
        .output()?)
}

fn self_approval(env: &mut Env) -> Result<()> {
    let alice = oidc(env, "alice", &["devs", "oncall"])?;
    env.admin_ok(&["create", "configmap", "held-e"])?;
    let o = gate_as(env, &alice, &["delete", "configmap", "held-e"])?;
    let id =
        approval_id_in(&stderr(&o)).with_context(|| format!("no approval id: {}", stderr(&o)))?;
    let o = admin_https(env, &alice, &["approvals", "approve", &id])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("no self-approval"),
        "alice approving herself: {}",
        stderr(&o)
    );
    let e = pc_err(env, &["approvals", "approve", &id, "--as", "oidc:alice"])?;
    ensure!(e.contains("no self-approval"), "root acting as alice: {e}");
    let bob = oidc(env, "bob", &["devs"])?;
    let o = admin_https(env, &bob, &["approvals", "approve", &id])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("not an approver"),
        "bob: {}",
        stderr(&o)
    );
    let o = admin_https(env, "not-a-token", &["approvals", "list"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("401"),
        "bad token: {}",
        stderr(&o)
    );
    let carol = oidc(env, "carol", &["oncall"])?;
    let o = admin_https(
        env,
        &carol,
        &["approvals", "approve", &id, "--justification", "reviewed"],
    )?;
    ensure!(o.status.success(), "carol: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    ensure!(
        v["approval"]["state"] == "approved" && v["approval"]["by"] == "oidc:carol",
        "{v}"
    );
    let o = gate_as(env, &alice, &["delete", "configmap", "held-e"])?;
    ensure!(o.status.success(), "alice's retry: {}", stderr(&o));
    Ok(())
}

fn approval_restart(env: &mut Env) -> Result<()> {
    env.admin_ok(&["create", "configmap", "held-f"])?;
    let o = env.gate(&["delete", "configmap", "held-f"])?;
    let id = approval_id_in(&stderr(&o)).context("no approval id")?;
    env.switch(true)?;
    let a = pc(env, &["approvals", "show", &id])?;
    ensure!(a["state"] == "pending", "after restart: {a}");
    let v = pc(env, &["approvals", "approve", &id, "--as", "oncall-human"])?;
    env.gate_ok(&["delete", "configmap", "held-f"])?;
    ensure!(!cm_exists(env, "held-f")?, "still there");
    // A revoked grant stops applying at once.
    let grant = v["grant"]["id"].as_str().context("no grant id")?.to_owned();
    let r = pc(env, &["grants", "revoke", &grant, "--as", "oncall-human"])?;
    ensure!(r["grant"]["revoked"]["by"] == "oncall-human", "{r}");
    env.admin_ok(&["create", "configmap", "held-f"])?;
    let o = env.gate(&["delete", "configmap", "held-f"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("is pending"),
        "after revoking the grant: {}",
        stderr(&o)
    );
    Ok(())
}

/// The admin socket answers root only; `portcullis policy test` exits non-zero on a
/// mismatch.
fn admin_socket_and_policy_cli(env: &mut Env) -> Result<()> {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("portcullis"))
        .args(["approvals", "--socket"])
        .arg(env.lab.state_dir().join("admin.sock"))
        .args(["list"])
        .stdin(Stdio::null())
        .output()
        .context("setpriv (util-linux) runs the CLI as nobody")?;
    ensure!(
        !o.status.success(),
        "a non-root caller listed approvals: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy");
    let policy = root.join("coding-agents.yaml");
    let run = |cases: &Path| -> Result<Output> {
        Ok(Command::new(bin("portcullis"))
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
    let wrong = env.file(
        "wrong-cases.yaml",
        "cases:\n- name: exec allowed (wrong)\n  subject: {serviceAccount: e2e/agent}\n  request: {method: POST, path: /api/v1/namespaces/e2e/pods/w/exec}\n  expect: allow\n",
    )?;
    let o = run(Path::new(&wrong))?;
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.code() == Some(1) && out.contains("FAIL  exec allowed (wrong)"),
        "a mismatch must exit 1: {:?} {out}",
        o.status
    );
    Ok(())
}

fn policy_reload(env: &mut Env) -> Result<()> {
    let path = env.lab.dir.join("policy.yaml");
    let alice = oidc(env, "alice", &["devs"])?;
    let before = env.lab.daemon_log().len();
    std::fs::write(&path, POLICY.replace("action: deny", "action: forbid"))?;
    let t = Instant::now();
    loop {
        let log = env.lab.daemon_log();
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

/// Groundwork of the audit issue: kernel events (every redirect) are hash-chained with
/// signed segment heads; `portcullis audit verify` passes, then fails after one byte of
/// a record is changed.
fn audit_chain(env: &mut Env) -> Result<()> {
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    // Records nobody waited for are signed within 100 ms.
    std::thread::sleep(Duration::from_millis(500));
    let dir = env.lab.state_dir().join("audit");
    let dir_s = dir.display().to_string();
    let run = || -> Result<Output> {
        Ok(env
            .lab
            .command_in_ns(env.lab.ns_node(), &bin("portcullis"))
            .args(["audit", "verify", &dir_s])
            .stdin(Stdio::null())
            .output()?)
    };
    let o = run()?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success() && out.contains("intact"),
        "verify: {out}{}",
        stderr(&o)
    );
    let seg = dir.join("seg-000001.jsonl");
    let text = std::fs::read_to_string(&seg)?;
    ensure!(
        text.contains("kernel-event"),
        "no kernel events in the audit chain"
    );
    let tampered = text.replacen("\"kind\":\"kernel-event\"", "\"kind\":\"kernel-evenT\"", 1);
    std::fs::write(&seg, tampered)?;
    let o = run()?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    std::fs::write(&seg, text)?;
    ensure!(
        !o.status.success() && out.contains("FAIL  seg-000001"),
        "tamper not detected: {out}"
    );
    Ok(())
}

// ---- masking and audit evidence ----

/// Unique marker strings planted in the real apiserver; none may reach the agent.
const CANARIES: &[&str] = &[
    "pc-canary-alpha-1",
    "pc-canary-alpha-2",
    "pc-canary-beta-3",
    "pc-canary-beta-4",
    "pc-canary-gamma-5",
    "PCCANARYGAMMA6",
    "pc-canary-py-7",
];

/// Markers the fake kubelet writes in the `canary` container's log.
const LOG_CANARIES: &[&str] = &[
    "pc-log-canary-1",
    "PCLOGCANARYKEY2",
    "AKIAPCLOGCANARY34567",
    "eyJwY2xvZ2NhbmFyeSI6NH0",
];

/// Each canary as it may appear: as is, and base64-encoded (Secret data).
fn canary_forms() -> Vec<String> {
    use base64::Engine;
    CANARIES
        .iter()
        .chain(LOG_CANARIES)
        .flat_map(|c| {
            [
                c.to_string(),
                base64::engine::general_purpose::STANDARD.encode(c),
            ]
        })
        .collect()
}

fn assert_no_canary(what: &str, text: &str) -> Result<()> {
    for c in canary_forms() {
        ensure!(
            !text.contains(&c),
            "{what}: canary {c} reached the agent:\n{text}"
        );
    }
    Ok(())
}

fn gate_text(env: &Env, args: &[&str]) -> Result<String> {
    let o = env.gate(args)?;
    ensure!(
        o.status.success(),
        "kubectl {args:?} failed: {}",
        stderr(&o)
    );
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    ))
}

/// A GET from the agent's pod with its own token and an Accept header.
fn agent_get_accept(env: &Env, path: &str, accept: &str) -> Result<(u16, String, String)> {
    agent_request(env, &env.pod_cg, Some(&env.agent_token), path, Some(accept))
}

const PLACEHOLDER_B64: &str = "cG9ydGN1bGxpcy1tYXNrZWQ=";

fn masking_canaries(env: &mut Env) -> Result<()> {
    // Planted straight in the apiserver: generic data, apply with stringData (the
    // last-applied annotation then holds it), and credentials in a ConfigMap.
    env.admin_ok(&[
        "create",
        "secret",
        "generic",
        "canary-a",
        "--from-literal=k1=pc-canary-alpha-1",
        "--from-literal=k2=pc-canary-alpha-2",
    ])?;
    let applied = env.file(
        "canary-b.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: canary-b\n  namespace: e2e\nstringData:\n  p: pc-canary-beta-3\ndata:\n  k: cGMtY2FuYXJ5LWJldGEtNA==\n",
    )?;
    env.admin_ok(&["apply", "-f", &applied])?;
    let cm = env.file(
        "canary-cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: canary-cm\n  namespace: e2e\ndata:\n  app.properties: |\n    db.host=db\n    db.password=pc-canary-gamma-5\n  key.pem: |\n    -----BEGIN PRIVATE KEY-----\n    PCCANARYGAMMA6\n    -----END PRIVATE KEY-----\n",
    )?;
    env.admin_ok(&["apply", "-f", &cm])?;
    // The test can fail: straight from the apiserver, the values are there.
    let direct = env.direct_ok(&["get", "secret", "canary-a", "-o", "yaml"])?;
    ensure!(
        direct.contains("cGMtY2FuYXJ5LWFscGhhLTE="),
        "direct: {direct}"
    );
    let direct = env.direct_ok(&["get", "secret", "canary-b", "-o", "json"])?;
    ensure!(
        direct.contains("pc-canary-beta-3"),
        "no last-applied directly: {direct}"
    );

    // Every read path, as the agent.
    let mut outputs = Vec::new();
    for args in [
        &["get", "secret", "canary-a", "-o", "yaml"][..],
        &["get", "secret", "canary-a", "-o", "json"],
        &["get", "secret", "canary-b", "-o", "yaml"],
        &[
            "get",
            "secret",
            "canary-b",
            "-o",
            "jsonpath={.metadata.annotations}",
        ],
        &["get", "secrets"],
        &["get", "secrets", "-o", "wide", "--show-labels"],
        &["get", "secrets", "-o", "yaml"],
        &["get", "secrets", "-o", "json"],
        &["get", "configmap", "canary-cm", "-o", "yaml"],
        &["get", "configmaps", "-o", "json"],
        &["get", "--raw", "/api/v1/namespaces/e2e/secrets"],
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/e2e/secrets?watch=1&timeoutSeconds=2",
        ],
        &["logs", POD, "-c", "canary"],
    ] {
        let out = gate_text(env, args)?;
        assert_no_canary(&format!("kubectl {args:?}"), &out)?;
        outputs.push(out);
    }
    ensure!(
        outputs[0].contains(PLACEHOLDER_B64),
        "no placeholder: {}",
        outputs[0]
    );
    ensure!(
        outputs[2].contains("portcullis-masked")
            && outputs[3].contains("last-applied-configuration"),
        "last-applied not masked in place: {} {}",
        outputs[2],
        outputs[3]
    );
    ensure!(
        outputs[4].contains("canary-a") && outputs[4].contains("Opaque"),
        "table: {}",
        outputs[4]
    );
    ensure!(
        outputs[8].contains("db.password=[masked]") && outputs[8].contains("[masked:private-key]"),
        "configmap: {}",
        outputs[8]
    );
    let logs = outputs.last().context("no outputs")?;
    ensure!(
        logs.contains("password=[masked]") && logs.contains("[masked:aws-key]"),
        "logs: {logs}"
    );
    // The placeholder is valid base64: kubectl decodes it like any value.
    let v = env.gate_ok(&["get", "secret", "canary-a", "-o", "jsonpath={.data.k1}"])?;
    ensure!(v == PLACEHOLDER_B64, "{v}");

    // Table with the whole objects, protobuf asked for, and a watch through kubectl.
    let (code, ctype, body) = agent_get_accept(
        env,
        "/api/v1/namespaces/e2e/secrets?includeObject=Object",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )?;
    ensure!(code == 200 && body.contains("\"rows\""), "{code} {body}");
    assert_no_canary("Table includeObject=Object", &body)?;
    let _ = ctype;
    let (code, ctype, body) = agent_get_accept(
        env,
        "/api/v1/namespaces/e2e/secrets/canary-a",
        "application/vnd.kubernetes.protobuf",
    )?;
    ensure!(
        code == 200 && ctype.starts_with("application/json"),
        "protobuf was not negotiated to JSON: {code} {ctype}"
    );
    assert_no_canary("protobuf-asked get", &body)?;
    let mut watch = env
        .gate_cmd(&["get", "secrets", "-w", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    env.admin_ok(&[
        "create",
        "secret",
        "generic",
        "canary-c",
        "--from-literal=k=pc-canary-alpha-1",
    ])?;
    std::thread::sleep(Duration::from_millis(1500));
    let _ = watch.kill();
    let w = watch.wait_with_output()?;
    let wt = String::from_utf8_lossy(&w.stdout);
    ensure!(wt.contains("canary-c"), "watch did not show canary-c: {wt}");
    assert_no_canary("kubectl get -w", &wt)?;

    // Python client: typed read and list decode the placeholders.
    let script = env.file(
        "canary_secrets.py",
        r#"
import json, sys
from kubernetes import client, config
config.load_kube_config(sys.argv[1])
v1 = client.CoreV1Api()
v1.create_namespaced_secret("e2e", {"metadata": {"name": "canary-py"}, "stringData": {"t": "pc-canary-py-7"}})
s = v1.read_namespaced_secret("canary-py", "e2e")
l = v1.list_namespaced_secret("e2e")
print(json.dumps({"read": s.data, "list": [i.data for i in l.items]}))
"#,
    )?;
    let mut c = env
        .lab
        .command_in_cgroup(&env.pod_cg, Path::new("/usr/bin/env"));
    c.arg("python3")
        .arg(&script)
        .arg(&env.agent_kubeconfig)
        .env("PYTHONPATH", &env.cluster.parts.pythonpath);
    let o = run_bounded(c, None)?;
    ensure!(o.status.success(), "python: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_no_canary("python client (create response, read, list)", &out)?;
    ensure!(out.contains(PLACEHOLDER_B64), "python: {out}");

    // logs -f: masked line by line as they arrive (the kubelet writes one per 300 ms).
    let mut child = env
        .gate_cmd(&["logs", "-f", POD, "-c", "canary"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let t0 = Instant::now();
    let mut arrivals = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        arrivals.push((t0.elapsed(), line));
        if t0.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text: String = arrivals.iter().map(|(_, l)| format!("{l}\n")).collect();
    assert_no_canary("logs -f", &text)?;
    ensure!(
        text.starts_with("starting\n") && text.ends_with("done\n"),
        "logs -f: {text}"
    );
    let spread = arrivals.last().context("no lines")?.0 - arrivals[0].0;
    ensure!(
        spread > Duration::from_millis(1000),
        "logs -f lines arrived together ({spread:?}): buffered, not streamed"
    );
    println!(
        "    {} read paths checked; logs -f lines spread over {spread:?}",
        outputs.len() + 5
    );
    Ok(())
}

/// The chained records of the daemon's audit directory.
fn chain(env: &Env) -> Result<Vec<serde_json::Value>> {
    let dir = env.lab.state_dir().join("audit");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    segs.sort();
    let mut out = Vec::new();
    for s in segs {
        for l in std::fs::read_to_string(s)?.lines() {
            if let Ok(v) = serde_json::from_str(l) {
                out.push(v);
            }
        }
    }
    Ok(out)
}

fn portcullis_cli(env: &Env, args: &[&str]) -> Result<Output> {
    Ok(env
        .lab
        .command_in_ns(env.lab.ns_node(), &bin("portcullis"))
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

fn audit_requests(env: &mut Env) -> Result<()> {
    env.gate_ok(&["get", "configmaps", "-l", "audit-probe=1"])?;
    std::thread::sleep(Duration::from_millis(500));
    let recs = chain(env)?;
    let list = recs
        .iter()
        .rev()
        .find(|r| {
            r["kind"] == "request"
                && r["record"]["query"]
                    .as_str()
                    .is_some_and(|q| q.contains("audit-probe"))
        })
        .context("no request record for the list")?;
    let r = &list["record"];
    ensure!(
        r["user"]["username"] == "system:serviceaccount:e2e:agent"
            && r["user"]["issuer"] == cluster::SA_ISSUER
            && r["user"]["token_id"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            && r["origin"]["pod_uid"] == env.work_uid.as_str()
            && r["origin"]["comm"]
                .as_str()
                .is_some_and(|c| c.starts_with("kubectl"))
            && r["origin"]["pid"].as_u64().is_some_and(|p| p > 0)
            && r["origin"]["cgroup_id"].as_u64().is_some_and(|p| p > 0)
            && r["attributes"]["verb"] == "list"
            && r["attributes"]["resource"] == "configmaps"
            && r["decision"] == "allow"
            && r["rule"] == "agent-everything",
        "request record: {r}"
    );
    let all = serde_json::to_string(&recs)?;
    ensure!(
        !all.contains(&env.agent_token),
        "the agent's token is in the audit log"
    );
    let id = r["id"].as_str().context("id")?;
    let resp = recs
        .iter()
        .find(|x| x["kind"] == "response" && x["record"]["id"] == id)
        .context("no response record")?;
    ensure!(
        resp["record"]["code"] == 200
            && resp["record"]["complete"] == true
            && resp["record"]["latency_ms"]
                .as_f64()
                .is_some_and(|l| l > 0.0),
        "response record: {resp}"
    );
    // A mutation's masked body is recorded (level Request), never its secret values.
    let f = env.file(
        "audit-json.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: audit-json\n  namespace: e2e\nstringData:\n  t: pc-canary-py-7\n",
    )?;
    env.gate_ok(&["create", "-f", &f])?;
    std::thread::sleep(Duration::from_millis(300));
    let recs = chain(env)?;
    let body_rec = recs
        .iter()
        .find(|x| {
            x["kind"] == "request"
                && x["record"]["method"] == "POST"
                && x["record"]["attributes"]["resource"] == "secrets"
                && x["record"]["request_body"]["metadata"]["name"] == "audit-json"
        })
        .context("no recorded body for the JSON secret create")?;
    ensure!(body_rec["record"]["mutating"] == true, "{body_rec}");
    assert_no_canary("audit record of a Secret create", &body_rec.to_string())?;
    // kubectl's protobuf bodies cannot be masked: noted, not recorded.
    env.gate_ok(&[
        "create",
        "secret",
        "generic",
        "audit-pb",
        "--from-literal=k=pc-canary-alpha-2",
    ])?;
    std::thread::sleep(Duration::from_millis(300));
    let pb = chain(env)?
        .into_iter()
        .rev()
        .find(|x| {
            x["kind"] == "request"
                && x["record"]["method"] == "POST"
                && x["record"]["attributes"]["resource"] == "secrets"
        })
        .context("no record of kubectl's create")?;
    ensure!(
        pb["record"]["request_body"]["omitted"]
            .as_str()
            .is_some_and(|o| o.contains("cannot be masked, so it is not recorded")),
        "protobuf body: {pb}"
    );
    assert_no_canary("audit record of a protobuf create", &pb.to_string())?;

    // kill -9 during a burst of deletes: every delete the apiserver applied has a
    // durable record.
    let n = 40;
    let mut names = Vec::new();
    let mut yaml = String::new();
    for i in 0..n {
        names.push(format!("burst-{i}"));
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: burst-{i}\n  namespace: e2e\n"
        ));
    }
    let f = env.file("burst.yaml", &yaml)?;
    env.admin_ok(&["apply", "-f", &f])?;
    let script = env.file(
        "burst.py",
        r#"
import sys
from kubernetes import client, config
config.load_kube_config(sys.argv[1])
v1 = client.CoreV1Api()
for i in range(int(sys.argv[2])):
    try:
        v1.delete_namespaced_config_map("burst-%d" % i, "e2e")
    except Exception as e:
        print("stopped at", i, type(e).__name__, flush=True)
        break
"#,
    )?;
    let mut c = env
        .lab
        .command_in_cgroup(&env.pod_cg, Path::new("/usr/bin/env"));
    c.arg("python3")
        .arg(&script)
        .arg(&env.agent_kubeconfig)
        .arg(n.to_string())
        .env("PYTHONPATH", &env.cluster.parts.pythonpath)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let remaining = |env: &Env| -> Result<std::collections::HashSet<String>> {
        Ok(env
            .direct_ok(&["get", "configmaps", "-o", "name"])?
            .lines()
            .map(|l| l.trim_start_matches("configmap/").to_owned())
            .collect())
    };
    let mut burst = c.spawn()?;
    // Kill once some deletes went through, mid-burst.
    let t0 = Instant::now();
    loop {
        let left = remaining(env)?;
        let gone = names.iter().filter(|x| !left.contains(*x)).count();
        if gone >= 5 || t0.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    env.lab.kill_daemon(); // SIGKILL
    let _ = burst.wait();
    let left = remaining(env)?;
    let deleted: Vec<&String> = names.iter().filter(|x| !left.contains(*x)).collect();
    ensure!(
        !deleted.is_empty() && deleted.len() < n,
        "the kill did not land mid-burst: {} of {n} deleted",
        deleted.len()
    );
    let recs = chain(env)?;
    for name in &deleted {
        let path = format!("/api/v1/namespaces/e2e/configmaps/{name}");
        ensure!(
            recs.iter().any(|r| r["kind"] == "request"
                && r["record"]["method"] == "DELETE"
                && r["record"]["path"] == path.as_str()),
            "{name} was deleted by the apiserver but has no durable audit record"
        );
    }
    env.restart_with_audit(cluster::AUDIT_SECTION)?;
    let o = portcullis_cli(
        env,
        &[
            "audit",
            "verify",
            &env.lab.state_dir().join("audit").display().to_string(),
        ],
    )?;
    ensure!(
        o.status.success(),
        "chain broken after kill -9: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    println!(
        "    kill -9 after {} of {n} deletes: each has a durable record; chain verifies",
        deleted.len()
    );
    Ok(())
}

fn audit_sink(env: &mut Env) -> Result<()> {
    let idp_dir = env.idp.as_ref().context("no idp")?.dir.clone();
    let down = idp_dir.join("sink.down");
    let shipped = idp_dir.join("sink.jsonl");
    std::fs::write(&down, "")?;
    let _ = std::fs::remove_file(&shipped);
    env.restart_with_audit(&env.audit_with_sink())?;
    for _ in 0..5 {
        env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    }
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        !shipped.exists(),
        "the sink was down, yet something arrived"
    );
    ensure!(
        env.lab.daemon_log().contains("audit sink unavailable"),
        "the daemon did not notice the sink was down"
    );
    // Back up: everything arrives, in order, nothing missing or repeated.
    std::fs::remove_file(&down)?;
    for _ in 0..3 {
        env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    }
    let t0 = Instant::now();
    let want: Vec<u64> = loop {
        std::thread::sleep(Duration::from_millis(500));
        let chain_seqs: Vec<u64> = chain(env)?
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .collect();
        let got: Vec<u64> = std::fs::read_to_string(&shipped)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Vec<serde_json::Value>>(l).ok())
            .flatten()
            .filter_map(|r| r["seq"].as_u64())
            .collect();
        // Everything recorded before the last request is shipped.
        let last = *chain_seqs.last().context("empty chain")?;
        if got.last().is_some_and(|g| *g + 5 >= last) || t0.elapsed() > Duration::from_secs(40) {
            let expect: Vec<u64> = (1..=*got.last().unwrap_or(&0)).collect();
            ensure!(
                got == expect,
                "shipped sequence has gaps or repeats: {got:?}"
            );
            break got;
        }
    };
    ensure!(want.len() > 10, "too little shipped: {want:?}");
    println!(
        "    sink down then up: {} records shipped in order, none missing",
        want.len()
    );
    env.restart_with_audit(cluster::AUDIT_SECTION)?;
    Ok(())
}

fn audit_sessions_and_replay(env: &mut Env) -> Result<()> {
    // A short session after an idle gap (sessions here end after 1 s idle): a create
    // with a JSON body (Python client), reads; then replayed against the real apiserver
    // with dryRun=All.
    std::thread::sleep(Duration::from_millis(1500));
    let script = env.file(
        "replay.py",
        r#"
import sys
from kubernetes import client, config
config.load_kube_config(sys.argv[1])
client.CoreV1Api().create_namespaced_config_map("e2e", {"metadata": {"name": "replay-me"}, "data": {"a": "b"}})
"#,
    )?;
    let mut c = env
        .lab
        .command_in_cgroup(&env.pod_cg, Path::new("/usr/bin/env"));
    c.arg("python3")
        .arg(&script)
        .arg(&env.agent_kubeconfig)
        .env("PYTHONPATH", &env.cluster.parts.pythonpath);
    let o = run_bounded(c, None)?;
    ensure!(o.status.success(), "python: {}", stderr(&o));
    env.gate_ok(&["get", "configmap", "replay-me", "-o", "name"])?;
    env.gate_ok(&["create", "configmap", "replay-me-2", "--from-literal=a=b"])?;
    std::thread::sleep(Duration::from_millis(500));
    let dir = env.lab.state_dir().join("audit").display().to_string();
    let o = portcullis_cli(
        env,
        &["audit", "sessions", &dir, "--idle", "1s", "-o", "json"],
    )?;
    ensure!(o.status.success(), "sessions: {}", stderr(&o));
    let sessions: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let s = sessions
        .as_array()
        .context("sessions")?
        .iter()
        .rev()
        .find(|s| {
            s["subject"] == "system:serviceaccount:e2e:agent"
                && s["pod_uid"] == env.work_uid.as_str()
        })
        .context("no session of the agent's pod")?;
    let id = s["id"].as_str().context("id")?.to_owned();
    ensure!(
        (3..100).contains(&s["requests"].as_u64().unwrap_or(0))
            && s["mutations"].as_u64() >= Some(2),
        "{s}"
    );
    // Export: Kubernetes audit Events.
    let o = portcullis_cli(env, &["audit", "export", &dir, "--format", "k8s"])?;
    ensure!(o.status.success(), "export: {}", stderr(&o));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let ev = events
        .iter()
        .find(|e| e["objectRef"]["name"] == "replay-me" && e["verb"] == "create")
        .context("no exported event for the create")?;
    ensure!(
        ev["apiVersion"] == "audit.k8s.io/v1"
            && ev["kind"] == "Event"
            && ev["stage"] == "ResponseComplete"
            && ev["responseStatus"]["code"] == 201
            && ev["user"]["username"] == "system:serviceaccount:e2e:agent"
            && ev["annotations"]["portcullis.dev/decision"] == "allow",
        "exported event: {ev}"
    );
    // Replay with the scoped identity's credential straight at the apiserver.
    // The sandbox credential: here the test cluster's admin token.
    let token = env.file("sandbox.token", &env.cluster.admin_token)?;
    let o = portcullis_cli(
        env,
        &[
            "replay",
            &id,
            "--dir",
            &dir,
            "--server",
            &env.cluster.url(),
            "--ca-file",
            &env.cluster.ca_pem.display().to_string(),
            "--token-file",
            &token,
            "--idle",
            "1s",
            "-o",
            "json",
        ],
    )?;
    let steps: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "replay printed {} {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        )
    })?;
    let find = |method: &str, needle: &str| {
        steps
            .iter()
            .rev()
            .find(|s| {
                s["method"] == method && s["uri"].as_str().is_some_and(|u| u.contains(needle))
            })
            .cloned()
    };
    let get = find("GET", "/configmaps/replay-me").context("the get was not replayed")?;
    ensure!(get["outcome"] == "same", "get: {get}");
    // The create now meets the object it made: 409 instead of the recorded 201, with
    // dryRun=All (the apiserver validates, changes nothing).
    let create = find("POST", "/namespaces/e2e/configmaps?dryRun=All")
        .context("the create was not replayed")?;
    ensure!(
        create["outcome"] == "differs"
            && create["recorded"] == 201
            && create["replayed"] == 409
            && create["uri"]
                .as_str()
                .is_some_and(|u| u.contains("dryRun=All")),
        "create: {create}"
    );
    ensure!(!o.status.success(), "replay with differences exited 0");
    ensure!(
        steps.iter().any(|s| s["outcome"] == "skipped"
            && s["note"]
                .as_str()
                .is_some_and(|n| n.contains("not recorded"))),
        "no skipped step with a reason"
    );
    println!(
        "    session {id}: {} steps, {} same, {} differ, {} skipped",
        steps.len(),
        steps.iter().filter(|s| s["outcome"] == "same").count(),
        steps.iter().filter(|s| s["outcome"] == "differs").count(),
        steps.iter().filter(|s| s["outcome"] == "skipped").count()
    );
    Ok(())
}
