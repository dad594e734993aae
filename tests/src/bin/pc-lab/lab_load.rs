//! `pc-lab lab-load`: one workload through the daemon on the kernel lab, against the
//! stand-in upstream with synthetic bodies shaped like the API server's: the daemon's
//! CPU time per request in a few seconds, without the node. For profiling (`--perf`
//! records the daemon with `perf record` over exactly the measured part) and for the
//! before/after figures of an optimisation; `cargo xtask bench proxy` remains the
//! reference, against nginx and the real API server.
use std::{io::BufRead, path::PathBuf, process::Stdio};

use anyhow::{Context, Result, ensure};
use base64::Engine;
use portcullis_tests::{Lab, bin, node::pki::Pki};
use serde_json::{Value, json};

use crate::{bench_proxy::Driven, procs};

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
}

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

pub fn run(o: Opts) -> Result<()> {
    let lab = Lab::without_standin("load")?;
    let pki = Pki::new()?;
    let api = lab.api();
    pki.server("standin", &[&api.ip().to_string(), "kubernetes"])?
        .write(&lab.dir, "standin")?;
    let ca = lab.dir.join("upstream-ca.crt");
    std::fs::write(&ca, &pki.ca_cert)?;
    let token = lab.dir.join("token");
    std::fs::write(&token, "bench")?;
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
    let ready = lab.start_daemon()?;
    let pid = ready["pid"].as_u64().context("daemon pid")? as u32;
    let path = match o.workload.as_str() {
        "small_get" => format!("/api/v1/namespaces/{NS}/configmaps/small"),
        "list_1mb" => format!("/api/v1/namespaces/{NS}/configmaps"),
        "secret_list" => format!("/api/v1/namespaces/{NS}/secrets"),
        _ => format!("/api/v1/namespaces/{NS}/watched"),
    };
    let mut per = Vec::new();
    for round in 0..o.rounds {
        let mut c = lab.agent_command(&bin("pc-load"));
        c.arg(format!("--url=https://{}", lab.cluster_ip()))
            .arg(format!(
                "--ca={}",
                lab.state_dir().join("ca/ca.crt").display()
            ))
            .arg("--token=agent")
            .args(["--go", "--max-secs=60"]);
        let tag = format!("l{round}");
        if o.workload == "watch_event" {
            c.args(["watch", "--path", &path, "--tag", &tag])
                .arg(format!("--watchers={}", o.watchers))
                .arg(format!("--events={}", o.count));
        } else {
            c.args(["get", "--path", &path])
                .arg(format!("--count={}", o.count))
                .arg(format!("--concurrency={}", o.concurrency));
        }
        let mut d = Driven::spawn(c, "pc-load".into(), lab.dir.join("load.stderr"))?;
        let r = d.line()?;
        ensure!(r["ready"] == true, "pc-load not ready: {r}");
        let perf = match (&o.attach, round) {
            (Some(cmd), 0) => Some(
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {}", cmd.replace("{pid}", &pid.to_string())))
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting the attached command")?,
            ),
            _ => None,
        };
        if perf.is_some() {
            std::thread::sleep(std::time::Duration::from_millis(1000));
        }
        let c0 = procs::sample(&[pid]);
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
        let c1 = procs::sample(&[pid]);
        if let Some(mut p) = perf {
            let _ = portcullis_tests::signal(p.id(), libc::SIGINT);
            let _ = p.wait();
        }
        d.finish()?;
        let n = v["requests"]
            .as_f64()
            .or(v["events"].as_f64())
            .unwrap_or(0.0);
        ensure!(
            v["errors"].as_u64().unwrap_or(0) == 0 && v["missing"].as_u64().unwrap_or(0) == 0,
            "failures: {v}"
        );
        let us = procs::cpu_ns(&c0, &c1) as f64 / 1e3 / n.max(1.0);
        println!(
            "round {round}: daemon CPU {us:>8.1} µs per {} ({n} in {:.2} s; p50 {} µs, p99 {} µs)",
            if o.workload == "watch_event" {
                "event"
            } else {
                "request"
            },
            v["elapsed_s"].as_f64().unwrap_or(0.0),
            v["p50_us"],
            v["p99_us"]
        );
        per.push(us);
    }
    per.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}: daemon CPU per unit, median of {} rounds {:.1} µs (min {:.1}, max {:.1})",
        o.workload,
        per.len(),
        per[per.len() / 2],
        per[0],
        per[per.len() - 1]
    );
    Ok(())
}
