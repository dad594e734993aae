//! `pc-lab lab-load`: one workload through the daemon on the kernel lab, against the
//! stand-in upstream with synthetic bodies shaped like the API server's: the daemon's
//! CPU time per request in a few seconds, without the node. For profiling (`--perf`
//! records the daemon with `perf record` over exactly the measured part) and for the
//! before/after figures of an optimisation; `cargo xtask bench proxy` remains the
//! reference, against nginx and the real API server.
use std::{
    io::BufRead,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, Result, ensure};
use base64::Engine;
use portcullis_tests::{Lab, bin, node::pki::Pki};
use serde_json::{Value, json};

use crate::{bench_proxy::Driven, callgrind::Callgrind, nginx, procs};

#[derive(clap::Args, Clone)]
pub struct Opts {
    /// small_get, list_1mb, secret_list or watch_event.
    #[arg(long, default_value = "small_get")]
    pub workload: String,
    #[arg(long, default_value_t = 5000)]
    pub count: u32,
    #[arg(long, default_value_t = 4)]
    pub concurrency: u32,
    /// Watches (watch_event); `count` is then the number of events.
    #[arg(long, default_value_t = 50)]
    pub watchers: usize,
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Audit level of the daemon.
    #[arg(long, default_value = "Metadata")]
    pub audit: String,
    /// A command attached to the daemon over the measured part of the first round
    /// (`{pid}` becomes the daemon's pid), stopped with SIGINT; e.g.
    /// `perf record -F 2000 --call-graph dwarf,32768 -o /tmp/small.data -p {pid}` or
    /// `perf stat -e 'syscalls:sys_enter_*' -p {pid}`.
    #[arg(long)]
    pub attach: Option<String>,
    /// What is measured, each in turn every round: `daemon` (pass-through, the agent
    /// redirected to it), `floor` (pc-floor: the daemon's HTTP/2 + TLS stack without
    /// the gate), `floor-h1` (the same, HTTP/1.1 upstream), `nginx` (the configuration
    /// of `bench proxy`). `--attach` applies to the first one.
    #[arg(long, value_delimiter = ',', default_value = "daemon")]
    pub targets: Vec<String>,
    /// Requests per second, open loop (`pc-load rate`), instead of the closed loop:
    /// the cost of a request that arrives alone (a wake-up each).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Runs the floor and the daemon under valgrind's callgrind (Debian's `valgrind`),
    /// counting over each round's measured part only, and prints the instructions each
    /// executes per request (user space): repeatable where CPU time is not. Slow (use
    /// a `--count` of a few thousand); the CPU times printed beside are valgrind's.
    #[arg(long)]
    pub callgrind: bool,
    /// The proxies' own credential to the upstream (the daemon's, and what nginx and
    /// the floor put in place of the agent's): `sa` (default) a token shaped like the
    /// projected service-account token of an installed daemon (a JWT of ~1.2 KB, RS256
    /// as kubeadm's clusters sign them; the stand-in does not verify it), `short` a
    /// 5-byte one (the figures before session 32). The agent's own token stays short:
    /// kubectl and client-go index it in HPACK after the first request, so a proxy
    /// decodes it once per connection; pc-load's h2 client never indexes an
    /// `Authorization` header, and a long one would charge every proxy a decode per
    /// request that real agents do not cause.
    #[arg(long, default_value = "sa")]
    pub upstream_token: String,
}

const TARGETS: [&str; 4] = ["daemon", "floor", "floor-h1", "nginx"];

const NS: &str = "e2e";

fn meta(name: &str, i: u64) -> Value {
    json!({"name": name, "namespace": NS, "uid": format!("6f1c2b1e-0000-4000-8000-{i:012}"),
        "resourceVersion": (1000 + i).to_string(), "creationTimestamp": "2026-12-01T10:00:00Z",
        "managedFields": [{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
            "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:data": {".": {}, "f:d": {}}}}]})
}

/// Bodies shaped like the API server's for the workloads (sizes as in bench proxy).
fn canned(dir: &std::path::Path) -> Result<PathBuf> {
    let small = json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": meta("small", 0),
        "data": {"k": "v"}});
    let big = "x".repeat(10 * 1024);
    let cms: Vec<Value> = (0..100)
        .map(|i| json!({"metadata": meta(&format!("big-{i}"), i + 1), "data": {"d": big}}))
        .collect();
    let list = json!({"kind": "ConfigMapList", "apiVersion": "v1",
        "metadata": {"resourceVersion": "5000"}, "items": cms});
    let b64 = base64::engine::general_purpose::STANDARD;
    let secrets: Vec<Value> = (0..100u64)
        .map(|i| {
            let k = |j: u64| b64.encode(crate::bench_proxy::filler(i * 3 + j, 2560));
            json!({"metadata": meta(&format!("bench-{i}"), 200 + i), "type": "Opaque",
                "data": {"username": k(0), "password": k(1), "tls.key": k(2)}})
        })
        .collect();
    let slist = json!({"kind": "SecretList", "apiVersion": "v1",
        "metadata": {"resourceVersion": "5000"}, "items": secrets});
    let mut index = serde_json::Map::new();
    for (path, body) in [
        (format!("/api/v1/namespaces/{NS}/configmaps/small"), small),
        (format!("/api/v1/namespaces/{NS}/configmaps"), list),
        (format!("/api/v1/namespaces/{NS}/secrets"), slist),
    ] {
        let file = format!("{}.json", index.len());
        std::fs::write(dir.join(&file), body.to_string())?;
        index.insert(
            path,
            json!({"file": file, "content_type": "application/json"}),
        );
    }
    let p = dir.join("index.json");
    std::fs::write(&p, serde_json::to_vec(&Value::Object(index))?)?;
    Ok(p)
}

/// A proxy measured by `lab-load`.
struct Target {
    name: String,
    /// Processes whose CPU is counted (nginx: its master and workers).
    pids: Vec<u32>,
    /// The URL and CA the load uses; `None`: the agent's (redirected to the daemon).
    url: Option<String>,
}

fn start_nginx(
    lab: &Lab,
    listen: SocketAddr,
    upstream: SocketAddr,
    token: &str,
) -> Result<nginx::Nginx> {
    let path = std::env::var("PORTCULLIS_NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into());
    ensure!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: `cargo xtask bench proxy` installs Debian's nginx"
    );
    nginx::Nginx::start(
        lab.command_in_ns(lab.ns_node(), std::path::Path::new(&path)),
        &lab.dir.join("nginx"),
        &[nginx::Server {
            listen: listen.to_string(),
            upstream: upstream.to_string(),
            cert: lab.dir.join("proxy.crt"),
            key: lab.dir.join("proxy.key"),
        }],
        &nginx::Upstream {
            token,
            user: "portcullis:agent",
            group: "portcullis:agents",
            ca: &lab.dir.join("upstream-ca.crt"),
        },
    )
}

fn start_floor(
    lab: &Lab,
    listen: SocketAddr,
    api: SocketAddr,
    token: &str,
    http1: bool,
    wrap: &[String],
) -> Result<u32> {
    let mut c = match wrap.split_first() {
        Some((program, args)) => {
            let mut c = lab.command_in_ns(lab.ns_node(), Path::new(program));
            c.args(args).arg(bin("pc-floor"));
            c
        }
        None => lab.command_in_ns(lab.ns_node(), &bin("pc-floor")),
    };
    c.arg(format!("--listen={listen}"))
        .arg(format!("--cert={}", lab.dir.join("proxy.crt").display()))
        .arg(format!("--key={}", lab.dir.join("proxy.key").display()))
        .arg(format!("--upstream=https://{api}"))
        .arg(format!(
            "--ca={}",
            lab.dir.join("upstream-ca.crt").display()
        ))
        .arg(format!("--token={token}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if http1 {
        c.arg("--upstream-http1");
    }
    let mut child = c.spawn().context("starting pc-floor")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let pid = child.id();
    lab.adopt(child);
    ensure!(line.trim() == "ready", "pc-floor did not start");
    Ok(pid)
}

pub fn run(o: Opts) -> Result<()> {
    for t in &o.targets {
        ensure!(
            TARGETS.contains(&t.as_str()),
            "unknown target {t:?} (known: {TARGETS:?})"
        );
    }
    let lab = Lab::without_standin("load")?;
    let pki = Pki::new()?;
    let api = lab.api();
    pki.server("standin", &[&api.ip().to_string(), "kubernetes"])?
        .write(&lab.dir, "standin")?;
    let proxy_ip = lab.sink().ip();
    pki.server("proxy", &[&proxy_ip.to_string()])?
        .write(&lab.dir, "proxy")?;
    let ca = lab.dir.join("upstream-ca.crt");
    std::fs::write(&ca, &pki.ca_cert)?;
    let daemon_token = match o.upstream_token.as_str() {
        "sa" => {
            portcullis_tests::node::service_account_shaped_token("portcullis-system", "portcullis")
        }
        "short" => "bench".to_string(),
        other => anyhow::bail!("--upstream-token: sa or short, not {other}"),
    };
    let token = lab.dir.join("token");
    std::fs::write(&token, &daemon_token)?;
    let index = canned(&lab.dir)?;
    let mut standin = lab
        .command_in_ns(lab.ns_api(), &bin("pc-standin"))
        .arg(format!("--listen={api}"))
        .arg(format!("--cert={}", lab.dir.join("standin.crt").display()))
        .arg(format!("--key={}", lab.dir.join("standin.key").display()))
        .arg(format!("--canned={}", index.display()))
        .arg("--max-streams=1000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting pc-standin")?;
    let mut line = String::new();
    std::io::BufReader::new(standin.stdout.take().context("stdout")?).read_line(&mut line)?;
    lab.adopt(standin);
    ensure!(line.trim() == "ready", "pc-standin did not start");
    lab.append_config(&format!(
        "proxy:\n  upstream:\n    url: https://{api}\n    ca_file: {}\n    credential:\n      bearer_token_file: {}\n  impersonate:\n    user: \"portcullis:agent\"\n    groups: [\"portcullis:agents\"]\n  audit:\n    level: {}\n",
        ca.display(),
        token.display(),
        o.audit
    ))?;
    let init = std::process::Command::new(bin("portcullis"))
        .args(["ca", "init", "--config"])
        .arg(&lab.config)
        .output()?;
    ensure!(
        init.status.success(),
        "portcullis ca init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let cg = o.callgrind.then(|| Callgrind::new(&lab.dir)).transpose()?;
    let wrap = |name: &str| cg.as_ref().map(|c| c.wrap(name)).unwrap_or_default();
    let ready = lab.start_daemon_wrapped(&wrap("daemon"))?;
    let daemon = ready["pid"].as_u64().context("daemon pid")? as u32;
    let mut targets = Vec::new();
    let mut nginx = None;
    for (i, t) in o.targets.iter().enumerate() {
        let listen = SocketAddr::new(proxy_ip, 16444 + i as u16);
        let pids = match t.as_str() {
            "daemon" => vec![daemon],
            "floor" | "floor-h1" => {
                vec![start_floor(
                    &lab,
                    listen,
                    api,
                    &daemon_token,
                    t == "floor-h1",
                    &wrap(t),
                )?]
            }
            _ => {
                let n = start_nginx(&lab, listen, api, &daemon_token)?;
                let root = n.child.id();
                nginx = Some(n);
                procs::tree(root)
            }
        };
        targets.push(Target {
            name: t.clone(),
            pids,
            url: (t != "daemon").then(|| format!("https://{listen}")),
        });
    }
    let path = match o.workload.as_str() {
        "small_get" => format!("/api/v1/namespaces/{NS}/configmaps/small"),
        "list_1mb" => format!("/api/v1/namespaces/{NS}/configmaps"),
        "secret_list" => format!("/api/v1/namespaces/{NS}/secrets"),
        _ => format!("/api/v1/namespaces/{NS}/watched"),
    };
    let unit = if o.workload == "watch_event" {
        "event"
    } else {
        "request"
    };
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    // Instructions per request (callgrind): everything, and without the software hash
    // and the commits ([`crate::callgrind::Counts::per_request_work`]).
    let mut instr: Vec<Vec<(f64, f64)>> = vec![Vec::new(); targets.len()];
    let counted = |t: &Target| cg.is_some() && t.name != "nginx";
    for round in 0..o.rounds {
        for (ti, t) in targets.iter().enumerate() {
            let mut c = match &t.url {
                None => {
                    let mut c = lab.agent_command(&bin("pc-load"));
                    c.arg(format!("--url=https://{}", lab.cluster_ip()))
                        .arg(format!(
                            "--ca={}",
                            lab.state_dir().join("ca/ca.crt").display()
                        ));
                    c
                }
                // Not an agent: the bystander cgroup in the agent's namespace, so the
                // load crosses the same veth to a proxy on the node.
                Some(url) => {
                    let mut c = lab.command_in_cgroup(&lab.bystander_cg, &bin("pc-load"));
                    c.arg(format!("--url={url}"))
                        .arg(format!("--ca={}", ca.display()));
                    c
                }
            };
            c.arg("--token=agent").args(["--go", "--max-secs=60"]);
            let tag = format!("l{round}{ti}");
            if o.workload == "watch_event" {
                c.args(["watch", "--path", &path, "--tag", &tag])
                    .arg(format!("--watchers={}", o.watchers))
                    .arg(format!("--events={}", o.count));
            } else if let Some(rate) = o.rate {
                c.args(["rate", "--path", &path])
                    .arg(format!("--count={}", o.count))
                    .arg(format!("--rate={rate}"));
            } else {
                c.args(["get", "--path", &path])
                    .arg(format!("--count={}", o.count))
                    .arg(format!("--concurrency={}", o.concurrency));
            }
            let mut d = Driven::spawn(c, "pc-load".into(), lab.dir.join("load.stderr"))?;
            let r = d.line()?;
            ensure!(r["ready"] == true, "pc-load not ready: {r}");
            let perf = match (&o.attach, round, ti) {
                (Some(cmd), 0, 0) => Some(procs::attach(cmd, t.pids[0], "lab-load")?),
                _ => None,
            };
            if let Some(cg) = cg.as_ref().filter(|_| counted(t)) {
                cg.start(t.pids[0])?;
            }
            let c0 = procs::sample(&t.pids);
            d.go()?;
            if o.workload == "watch_event" {
                let out = lab
                    .command_in_ns(lab.ns_node(), &bin("pc-load"))
                    .arg(format!("--url=https://{api}"))
                    .arg(format!("--ca={}", ca.display()))
                    .args(["--max-secs=60", "create", "--path", &path, "--tag", &tag])
                    .arg(format!("--count={}", o.count))
                    .arg("--rate=50")
                    .stdin(Stdio::null())
                    .output()?;
                ensure!(
                    out.status.success(),
                    "creator: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let v = d.line()?;
            let c1 = procs::sample(&t.pids);
            let counts = match cg.as_ref().filter(|_| counted(t)) {
                Some(cg) => Some(cg.stop(&t.name, t.pids[0])?),
                None => None,
            };
            if let Some(p) = perf {
                procs::detach(p);
            }
            d.finish()?;
            let n = v["requests"]
                .as_f64()
                .or(v["events"].as_f64())
                .unwrap_or(0.0);
            ensure!(
                n > 0.0
                    && v["errors"].as_u64().unwrap_or(0) == 0
                    && v["missing"].as_u64().unwrap_or(0) == 0,
                "{}: failures: {v}",
                t.name
            );
            let us = procs::cpu_ns(&c0, &c1) as f64 / 1e3 / n;
            let user = procs::user_share(&c0, &c1)
                .map(|u| format!("{:.0}% user", u * 100.0))
                .unwrap_or_else(|| "user share unknown".into());
            println!(
                "round {round}: {:<8} CPU {us:>8.1} µs per {unit} ({user}; {n} in {:.2} s; p50 {} µs, p99 {} µs)",
                t.name,
                v["elapsed_s"].as_f64().unwrap_or(0.0),
                v["p50_us"],
                v["p99_us"]
            );
            per[ti].push(us);
            if let Some(c) = counts {
                let (all, work) = (c.total as f64 / n, c.per_request_work() as f64 / n);
                println!(
                    "round {round}: {:<8} {all:>9.0} instructions per {unit} (callgrind, user space); {work:.0} without the chain's SHA-256 in software ({:.0}) and the commits ({:.0})",
                    t.name,
                    c.sha256 as f64 / n,
                    c.commits as f64 / n
                );
                instr[ti].push((all, work));
            }
        }
    }
    let mut medians = Vec::new();
    for (t, v) in targets.iter().zip(per.iter_mut()) {
        v.sort_by(|a, b| a.total_cmp(b));
        let m = v[v.len() / 2];
        println!(
            "{}: {} CPU per {unit}, median of {} rounds {m:.1} µs (min {:.1}, max {:.1})",
            o.workload,
            t.name,
            v.len(),
            v[0],
            v[v.len() - 1]
        );
        medians.push((t.name.as_str(), m));
    }
    let mut work = Vec::new();
    for (t, v) in targets.iter().zip(instr.iter_mut()) {
        if v.is_empty() {
            continue;
        }
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (all, w) = v[v.len() / 2];
        println!(
            "{}: {} instructions per {unit}, median of {} rounds: {w:.0} without the software SHA-256 and the commits ({all:.0} in all)",
            o.workload,
            t.name,
            v.len()
        );
        work.push((t.name.as_str(), w));
    }
    if let (Some((_, d)), Some((_, f))) = (
        work.iter().find(|(n, _)| *n == "daemon"),
        work.iter().find(|(n, _)| *n == "floor"),
    ) {
        println!("instructions, daemon / floor: {:.2}×", d / f);
    }
    for (a, ma) in &medians {
        for (b, mb) in &medians {
            if a != b && (*b == "nginx" || (*b == "floor" && *a == "daemon")) {
                println!("{a} / {b}: {:.2}×", ma / mb);
            }
        }
    }
    drop(nginx);
    Ok(())
}
