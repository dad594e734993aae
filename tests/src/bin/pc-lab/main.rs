//! pc-lab: the lab behind `cargo xtask demo` and `cargo xtask bench kernel|proxy|watches`.
//! Needs root.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use portcullis_tests::{
    Lab, Probe,
    gate::{self, Gate, GateOptions},
};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

mod bench_kernel;
mod bench_proxy;
mod bench_watches;
mod callgrind;
mod lab_load;
mod nginx;
mod procs;

#[derive(Subcommand)]
enum Cmd {
    /// Direct vs nginx vs Portcullis (pass-through and gated) in front of the real
    /// apiserver and a stand-in: CPU per request, fixed-rate latency, watch events,
    /// kubectl invocations (see bench_proxy.rs).
    BenchProxy(bench_proxy::Opts),
    /// 10,000 concurrent watches through one daemon against the stand-in upstream:
    /// memory, CPU, event delivery latency (see bench_watches.rs).
    BenchWatches(bench_watches::Opts),
    /// One workload through the daemon on the kernel lab against the stand-in: the
    /// daemon's CPU per request in seconds, optionally with `perf` attached (for
    /// profiling and before/after figures; see lab_load.rs).
    LabLoad(lab_load::Opts),
    /// An agent redirected through the gate, its bypass attempts blocked, kernel events.
    Demo,
    /// Starts the real node, runs one agent pod and one command in it, stops (a quick
    /// check of the node harness; prints how long each start step took).
    NodeSmoke,
    /// Starts the gate on a real node (pods, daemon, IdP) and keeps it for `secs`, for
    /// poking at by hand; prints how to reach it.
    GateShell {
        #[arg(long, default_value_t = 600)]
        secs: u64,
    },
    /// connect() latency with and without the programs, per-hook cost (bpf_stats) and
    /// size, the cost to non-agent processes, ring-buffer events/s.
    BenchKernel {
        /// Connects per measurement (bounded; each measurement also stops after 20 s).
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// Alternating attached/detached rounds.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Refused datagrams (one kernel event each) for the events/s measurement.
        #[arg(long, default_value_t = 50_000)]
        events: u32,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Demo => demo(),
        Cmd::NodeSmoke => node_smoke(),
        Cmd::GateShell { secs } => gate_shell(secs),
        Cmd::BenchProxy(opts) => bench_proxy::run(opts),
        Cmd::BenchWatches(opts) => bench_watches::run(opts),
        Cmd::LabLoad(opts) => lab_load::run(opts),
        Cmd::BenchKernel {
            count,
            events,
            rounds,
        } => bench_kernel::bench(count, events, rounds),
    }
}

fn say(s: &str) {
    println!("\n\x1b[1m{s}\x1b[0m");
}

fn verdict(label: &str, blocked: bool, detail: &str) {
    let mark = if blocked {
        "\x1b[32mBLOCKED \x1b[0m"
    } else {
        "\x1b[31mREACHED \x1b[0m"
    };
    println!("  {mark} {label:<42} {detail}");
}

fn demo() -> Result<()> {
    say("Building a lab: agent pod netns + cgroup, node netns (daemon), API server netns");
    let lab = Lab::new("demo")?;
    println!(
        "  API Service ClusterIP {}   API server {} / {}",
        lab.cluster_ip(),
        lab.api(),
        lab.api_v6()
    );
    println!("  agent cgroup {}", lab.agent_cg.display());
    let ready = lab.start_daemon()?;
    println!(
        "  portcullis run: mode {}, {} programs attached at {}",
        ready["mode"],
        ready["programs"].as_array().map(|a| a.len()).unwrap_or(0),
        lab.cg_root.display()
    );

    say("1. The agent connects to the kubernetes Service as usual");
    let p = lab.agent(&["tcp", &lab.cluster_ip().to_string()])?;
    println!(
        "  agent: connect {} -> ok={}, getpeername() = {}",
        lab.cluster_ip(),
        p.ok(),
        p.json["peer"]
    );
    if let Some(c) = lab.wait_connection(5, |c| c["kernel"]["origin"]["pid"].as_u64() == p.pid()) {
        let k = &c["kernel"];
        println!(
            "  daemon: accepted from {} — kernel says: original destination {}, pid {} ({}), cgroup {}",
            c["peer"],
            k["original_dst"],
            k["origin"]["pid"],
            k["origin"]["comm"],
            k["origin"]["cgroup_id"]
        );
    }

    say("2. Bypass attempts from the agent cgroup");
    let api = lab.api().to_string();
    let v6 = lab.api_v6().to_string();
    let procs = lab.bystander_cg.join("cgroup.procs");
    let attempts: Vec<(&str, Vec<String>)> = vec![
        (
            "hard-coded real API server IP (TCP)",
            vec!["tcp".into(), api.clone()],
        ),
        (
            "IPv6 address of the API server",
            vec!["tcp".into(), v6.clone()],
        ),
        (
            "IPv4-mapped IPv6 (::ffff:a.b.c.d)",
            vec!["tcp-mapped".into(), api.clone()],
        ),
        ("UDP / QUIC datagram", vec!["udp".into(), api.clone()]),
        (
            "TCP Fast Open (sendto MSG_FASTOPEN)",
            vec!["tfo".into(), api.clone()],
        ),
        ("io_uring connect", vec!["uring".into(), api.clone()]),
        ("raw IP socket", vec!["raw".into(), api.clone()]),
        ("AF_PACKET socket", vec!["packet".into()]),
        (
            "leave the cgroup, then connect (and fork)",
            vec!["leave".into(), procs.display().to_string(), api.clone()],
        ),
    ];
    for (label, args) in &attempts {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = lab.agent(&argv)?;
        let (blocked, detail) = judge(&lab, &p);
        verdict(label, blocked, &detail);
    }
    std::thread::sleep(Duration::from_millis(300));
    let reached = lab
        .standin_log()
        .into_iter()
        .filter(|e| {
            e["peer"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("10.{}.1.2", lab.s))
        })
        .count();
    println!("  stand-in API server: {reached} connections/datagrams from the agent network");

    say("3. The daemon is killed (kill -9): agents fail closed");
    lab.kill_daemon();
    let p = lab.agent(&["tcp", &api])?;
    verdict(
        "connect while the daemon is down",
        !p.ok(),
        &format!("{}", p.json["error"]),
    );
    let ready = lab.start_daemon()?;
    println!(
        "  restarted: mode {} (pinned programs and maps adopted, no reload)",
        ready["mode"]
    );
    let p = lab.agent(&["tcp", &api])?;
    println!(
        "  agent connect after restart: ok={}, getpeername() = {}",
        p.ok(),
        p.json["peer"]
    );

    say("4. Kernel events (ring buffer -> daemon -> kernel-events.jsonl)");
    std::thread::sleep(Duration::from_millis(300));
    for e in lab.kernel_events() {
        println!(
            "  {:<22} {:<28} pid {:>7} {:<10} dst {:<24} {}",
            e["kind"].as_str().unwrap_or(""),
            e["hook"].as_str().unwrap_or(""),
            e["origin"]["pid"],
            e["origin"]["comm"].as_str().unwrap_or(""),
            e["dst"].as_str().unwrap_or(""),
            e["redirected_to"]
                .as_str()
                .map(|r| if r.is_empty() {
                    String::new()
                } else {
                    format!("-> {r}")
                })
                .unwrap_or_default()
        );
    }
    if reached != 0 {
        bail!("the stand-in API server was reached by the agent");
    }
    drop(lab);
    demo_kubectl()?;
    say("Done: every attempt was redirected to the daemon or refused, and reported;");
    println!("      unmodified kubectl worked through the gate as the scoped identity.");
    Ok(())
}

/// The shipped default policy for coding agents.
const DEFAULT_POLICY: &str = include_str!("../../../../deploy/policy/coding-agents.yaml");

/// Part two: unmodified kubectl, as an agent, against a real kube-apiserver.
fn demo_kubectl() -> Result<()> {
    say(
        "5. A real Kubernetes node: etcd, kube-apiserver, controller manager, scheduler, \
         containerd + runc, kubelet, kube-proxy",
    );
    let gate = Gate::start(
        "demo-kubectl",
        GateOptions {
            policy: Some(DEFAULT_POLICY),
            ..Default::default()
        },
    )?;
    println!(
        "  Kubernetes {}; node ready: {}",
        gate.node.parts.k8s_version, gate.node.timings
    );
    println!(
        "  agent pod e2e/{} (real pod, service account e2e/agent, in-cluster config: \
         https://{} with its projected token; the cluster's CA bundle includes Portcullis' CA)",
        gate::POD,
        gate.cluster_ip()
    );
    println!("  pod cgroup (enrolled): {}", gate.work_cg.display());
    println!(
        "  daemon upstream: {} as {} impersonating {}",
        gate.api_url(),
        gate::DAEMON_USER,
        gate::AGENT_USER
    );
    let steps: &[(&str, &[&str])] = &[
        ("kubectl version", &["version"]),
        ("kubectl get pods", &["get", "pods"]),
        (
            "kubectl create configmap",
            &["create", "configmap", "hello", "--from-literal=greeting=hi"],
        ),
        ("kubectl get configmaps", &["get", "configmaps"]),
        (
            "kubectl exec (WebSocket): denied by policy",
            &["exec", "target", "--", "echo", "hello from the pod"],
        ),
        ("kubectl logs", &["logs", "target", "-c", "main"]),
        (
            "kubectl get secrets -n kube-system --as=system:admin",
            &["get", "secrets", "-n", "kube-system", "--as=system:admin"],
        ),
    ];
    say("6. The agent runs kubectl, unmodified, in its pod (kubectl exec e2e/work -- kubectl ...)");
    for (label, args) in steps {
        let out = gate
            .gate_cmd(args)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running {label}"))?;
        println!("\n  \x1b[36m$ {label}\x1b[0m");
        for l in String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            println!("    {l}");
        }
        if label.contains("denied by policy")
            && !String::from_utf8_lossy(&out.stderr).contains("Portcullis policy denies")
        {
            bail!("{label}: expected a policy denial");
        }
    }
    demo_approval(&gate)?;
    say("8. What the daemon saw: each request, its identity, attributes and decision");
    let log = gate.daemon_log();
    let mut shown = 0;
    for line in log.lines().filter(|l| l.contains(" request ")) {
        let plain = strip_ansi(line);
        let field = |k: &str| {
            plain
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        let verb = field("verb");
        let resource = field("resource");
        if resource.is_empty() {
            continue; // discovery and /version: non-resource requests
        }
        let sub = field("subresource");
        println!(
            "  {:<36} {:<7} {:<24} ns={:<12} name={:<10} {:<9} -> {}",
            field("subject"),
            verb,
            if sub.is_empty() {
                resource
            } else {
                format!("{resource}/{sub}")
            },
            field("namespace"),
            field("name"),
            field("decision"),
            field("code")
        );
        shown += 1;
    }
    if shown == 0 {
        bail!("the daemon logged no resource requests:\n{log}");
    }
    demo_evidence(&gate)?;
    Ok(())
}

/// Masked secrets, a bypass attempt in the audit chain, and the chain's verification.
fn demo_evidence(gate: &Gate) -> Result<()> {
    say("9. Secret values never reach the agent");
    let o = gate.node.kubectl(&[
        "create",
        "secret",
        "generic",
        "db-credentials",
        "-n",
        "e2e",
        "--from-literal=username=app",
        "--from-literal=password=S3cr3t-hunter2",
    ])?;
    if !o.status.success() {
        bail!(
            "creating the secret: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    println!("\n  \x1b[36m$ kubectl get secret db-credentials -o yaml\x1b[0m   (as the agent)");
    let o = gate
        .gate_cmd(&["get", "secret", "db-credentials", "-o", "yaml"])
        .stdin(std::process::Stdio::null())
        .output()?;
    if !o.status.success() {
        bail!("kubectl get secret: {}", String::from_utf8_lossy(&o.stderr));
    }
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    for l in out.lines().filter(|l| {
        !l.contains("managedFields") && !l.starts_with("  - ") && !l.starts_with("    ")
    }) {
        println!("    {l}");
    }
    let leaked = ["S3cr3t-hunter2", "UzNjcjN0LWh1bnRlcjI="]
        .iter()
        .any(|v| out.contains(v));
    if leaked || !out.contains("cG9ydGN1bGxpcy1tYXNrZWQ=") {
        bail!("the secret was not masked:\n{out}");
    }
    println!("    (base64 of \"portcullis-masked\"; the API server holds the real values)");

    say("10. A bypass attempt from the agent's pod is evidence in the audit chain");
    let api = gate.api_url().trim_start_matches("https://").to_string();
    for (label, kind) in [
        ("TCP to the API server's real address", "tcp"),
        ("UDP to the API server", "udp"),
    ] {
        let o = gate
            .agent_bin("pc-probe", &[kind, &api])
            .stdin(std::process::Stdio::null())
            .output()?;
        let p: Value = String::from_utf8_lossy(&o.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        println!(
            "  {label} ({api}): {}",
            if p["ok"] == true {
                format!(
                    "connected to {} (the daemon, not the API server)",
                    p["peer"]
                )
            } else {
                format!("refused: {}", p["error"])
            }
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let dir = gate.state_dir().join("audit");
    let mut kernel = Vec::new();
    let mut segs: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    segs.sort();
    let text: String = segs
        .iter()
        .map(|s| std::fs::read_to_string(s).unwrap_or_default())
        .collect();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        if v["kind"] == "kernel-event" && v["record"]["dst"].as_str() == Some(api.as_str()) {
            kernel.push(v);
        }
    }
    for v in &kernel {
        let r = &v["record"];
        println!(
            "  seq {:>5}  {:<22} {:<26} pid {:>7} {:<8} dst {} {}",
            v["seq"],
            r["kind"].as_str().unwrap_or(""),
            r["hook"].as_str().unwrap_or(""),
            r["origin"]["pid"],
            r["origin"]["comm"].as_str().unwrap_or(""),
            r["dst"].as_str().unwrap_or(""),
            r["redirected_to"]
                .as_str()
                .filter(|x| !x.is_empty())
                .map(|x| format!("-> {x}"))
                .unwrap_or_default()
        );
    }
    if kernel.is_empty() {
        bail!("no kernel event for the bypass attempts in the audit chain");
    }

    say("11. The evidence verifies; any edit is found");
    let pc = |args: &[&str]| -> Result<std::process::Output> {
        Ok(gate
            .node
            .command(&portcullis_tests::bin("portcullis"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()?)
    };
    let dir_s = dir.display().to_string();
    println!("\n  \x1b[36m$ portcullis audit sessions\x1b[0m");
    let o = pc(&["audit", "sessions", &dir_s])?;
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        println!("    {l}");
    }
    // Records nobody waited for (reads) are signed within 100 ms.
    std::thread::sleep(Duration::from_millis(500));
    println!("\n  \x1b[36m$ portcullis audit verify {dir_s}\x1b[0m");
    let o = pc(&[
        "audit",
        "verify",
        &dir_s,
        "--key",
        &gate.state_dir().join("audit.pub").display().to_string(),
    ])?;
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        println!("    {l}");
    }
    if !o.status.success() {
        bail!("the audit chain does not verify");
    }
    // Tamper with a copy (the daemon keeps appending to the original).
    let copy = gate.state_dir().join("audit-tampered");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy)?;
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        std::fs::copy(e.path(), copy.join(e.file_name()))?;
    }
    let seg = copy.join("seg-000001.jsonl");
    let text = std::fs::read_to_string(&seg)?;
    let edited = text.replacen("\"decision\":\"deny\"", "\"decision\":\"allow\"", 1);
    if edited == text {
        bail!("no denied request to edit in the audit chain");
    }
    std::fs::write(&seg, edited)?;
    println!("\n  (a copy of the evidence, with one denied request edited to \"allow\")");
    println!("  \x1b[36m$ portcullis audit verify audit-tampered\x1b[0m");
    let o = pc(&[
        "audit",
        "verify",
        &copy.display().to_string(),
        "--key",
        &gate.state_dir().join("audit.pub").display().to_string(),
    ])?;
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        println!("    {l}");
    }
    if o.status.success() {
        bail!("the tampered copy verified");
    }
    println!("    exit status {}", o.status.code().unwrap_or(-1));
    Ok(())
}

/// A workload delete waits for a human, who approves it from the node's CLI.
fn demo_approval(gate: &Gate) -> Result<()> {
    say("7. Deleting a workload needs a human: the request is held, an approver runs the CLI");
    println!("\n  \x1b[36m$ kubectl delete pod target\x1b[0m   (in the background, as the agent)");
    let child = gate
        .gate_cmd(&["delete", "pod", "target", "--wait=false"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let t = std::time::Instant::now();
    let id = loop {
        let out = gate.portcullis(&["approvals", "list", "-o", "json"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["state"] == "pending")
            .and_then(|a| a["id"].as_str())
        {
            break id.to_owned();
        }
        if t.elapsed() > std::time::Duration::from_secs(20) {
            bail!("no pending approval appeared:\n{}", gate.daemon_log());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let show = |args: &[&str]| -> Result<String> {
        let o = gate.portcullis(args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        println!("\n  \x1b[36m$ portcullis {}\x1b[0m", args.join(" "));
        for l in text.lines() {
            println!("    {l}");
        }
        if !o.status.success() {
            bail!("portcullis {args:?} failed");
        }
        Ok(text)
    };
    show(&["approvals", "list"])?;
    show(&[
        "approvals",
        "approve",
        &id,
        "--as",
        "demo-approver",
        "--justification",
        "agent cleanup, reviewed",
    ])?;
    let out = child.wait_with_output()?;
    println!("\n  the held kubectl delete, after approval:");
    for l in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("    {l}");
    }
    if !out.status.success() {
        bail!("the approved delete failed");
    }
    show(&["grants", "list"])?;
    Ok(())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Blocked means: refused/killed, or it landed on the daemon (redirected), never the API.
fn judge(lab: &Lab, p: &Probe) -> (bool, String) {
    if let Some(sig) = p.killed_by() {
        return (
            true,
            format!("killed by signal {sig} before socket() returned"),
        );
    }
    let j = &p.json;
    if j["probe"] == "leave" {
        let parent = &j["parent"]["names"]["peer"];
        let on_daemon = lab
            .wait_connection(3, |c| c["kernel"]["origin"]["pid"].as_u64() == p.pid())
            .is_some();
        return (
            on_daemon,
            format!(
                "moved to {}, still redirected (peer {parent})",
                j["cgroup_after_move"]
                    .as_str()
                    .unwrap_or("")
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
            ),
        );
    }
    if !p.ok() {
        return (
            true,
            format!("refused: {}", j["error"].as_str().unwrap_or("")),
        );
    }
    let on_daemon = lab
        .wait_connection(3, |c| c["kernel"]["origin"]["pid"].as_u64() == p.pid())
        .is_some();
    (
        on_daemon,
        if on_daemon {
            "redirected to the daemon (agent still sees the original peer)".into()
        } else {
            "NOT redirected".into()
        },
    )
}

fn node_smoke() -> Result<()> {
    use portcullis_tests::node::{self, Node};
    let mut n = Node::start(node::Options {
        agent_bins: vec![portcullis_tests::bin("pc-probe")],
        ..Default::default()
    })?;
    println!("node ready: {}", n.timings);
    n.wait_service_account("default", "default")?;
    let t = Instant::now();
    n.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: smoke, namespace: default}}\nspec:\n  containers:\n  - name: main\n    image: {}\n    imagePullPolicy: Never\n    command: [sleep, '3600']\n",
        node::AGENT_IMAGE
    ))?;
    let uid = n.wait_pod_ready("default", "smoke")?;
    println!(
        "pod ready in {:.1}s, cgroup {}",
        t.elapsed().as_secs_f64(),
        n.pod_cgroup(&uid)?.display()
    );
    for argv in [
        &["kubectl", "version", "--client"][..],
        &[
            "python3",
            "-c",
            "import kubernetes, ssl; print('python kubernetes', kubernetes.__version__)",
        ][..],
        &["pc-probe", "--help"][..],
        &[
            "sh",
            "-c",
            "cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo; ls /var/run/secrets/kubernetes.io/serviceaccount",
        ][..],
    ] {
        let o = n.exec_cmd("default", "smoke", "main", argv).output()?;
        println!(
            "{argv:?} -> {}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let t = Instant::now();
    drop(n);
    println!(
        "node stopped and cleaned in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn gate_shell(secs: u64) -> Result<()> {
    let gate = Gate::start(
        "shell",
        GateOptions {
            policy: Some(DEFAULT_POLICY),
            ..Default::default()
        },
    )?;
    println!("node ready: {}", gate.node.timings);
    println!(
        "admin: nsenter --net=/run/netns/{} {} --kubeconfig={} -n e2e get pods",
        portcullis_tests::node::NETNS,
        gate.node.parts.bin("kubectl").display(),
        gate.node.admin_kubeconfig.display()
    );
    println!("daemon config: {}", gate.daemon.config.display());
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}
