//! `cargo xtask bench watches`: 10,000 concurrent watches through one daemon, over 100
//! HTTP/2 agent connections, against the stand-in upstream (`pc-standin`, which allows
//! as many HTTP/2 streams per connection as kube-apiserver does by default: 100). On
//! the kernel lab: the watches come from the enrolled agent cgroup and are redirected
//! by the kernel like any agent's. Measures the daemon's memory (RSS, before and with
//! the watches open, and its peak), its CPU time to open them, idle with them open, and
//! per delivered event, and each event's delivery latency (from the creator's
//! wall-clock stamp to the watcher). Bounded: every phase has a deadline.
use std::{io::BufRead, path::Path, process::Stdio, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use portcullis_tests::{Lab, bin, node::pki::Pki};
use serde_json::{Value, json};

use crate::{bench_proxy::Driven, procs};

#[derive(clap::Args, Clone)]
pub struct Opts {
    #[arg(long, default_value_t = 10_000)]
    pub watches: usize,
    /// Agent HTTP/2 connections the watches are spread over.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Objects created while the watches are open (each one event on every watch).
    #[arg(long, default_value_t = 10)]
    pub events: usize,
    /// Creates per second.
    #[arg(long, default_value_t = 2.0)]
    pub create_rate: f64,
    /// HTTP/2 streams the stand-in allows per connection (kube-apiserver 1.37: 100).
    #[arg(long, default_value_t = 100)]
    pub upstream_max_streams: u32,
    /// How long the watches may take to open.
    #[arg(long, default_value_t = 60)]
    pub settle_secs: u64,
    /// The daemon's `proxy.event_loops` (default: the daemon's own, one per CPU).
    #[arg(long)]
    pub event_loops: Option<usize>,
}

const WATCH_PATH: &str = "/api/v1/namespaces/bench/configmaps";
const RSS_GOAL: u64 = 200 << 20;

pub fn run(o: Opts) -> Result<()> {
    let lab = Lab::without_standin("watches")?;
    // The stand-in API server, with a certificate from a CA of its own.
    let pki = Pki::new()?;
    let api = lab.api();
    let pair = pki.server("standin", &[&api.ip().to_string(), "kubernetes"])?;
    pair.write(&lab.dir, "standin")?;
    let ca = lab.dir.join("upstream-ca.crt");
    std::fs::write(&ca, &pki.ca_cert)?;
    let token = lab.dir.join("token");
    std::fs::write(&token, "bench")?;
    let mut standin = lab
        .command_in_ns(lab.ns_api(), &bin("pc-standin"))
        .arg(format!("--listen={api}"))
        .arg(format!("--cert={}", lab.dir.join("standin.crt").display()))
        .arg(format!("--key={}", lab.dir.join("standin.key").display()))
        .arg(format!("--max-streams={}", o.upstream_max_streams))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting pc-standin")?;
    let mut line = String::new();
    std::io::BufReader::new(standin.stdout.take().context("stdout")?).read_line(&mut line)?;
    lab.adopt(standin);
    ensure!(line.trim() == "ready", "pc-standin did not start");

    // Every watch comes from one agent cgroup here, so the per-agent fair share
    // (1,024 requests in flight by default) is raised to hold them all: the bench
    // measures the daemon's cost per watch, not the share.
    lab.append_config(&format!(
        "proxy:\n  upstream:\n    url: https://{api}\n    ca_file: {}\n    credential:\n      bearer_token_file: {}\n  impersonate:\n    user: \"portcullis:agent\"\n    groups: [\"portcullis:agents\"]\n  limits:\n    max_requests_per_agent: {}\n    max_connections_per_agent: {}\n",
        ca.display(),
        token.display(),
        o.watches + 100,
        o.connections.max(256) + 16
    ))?;
    if let Some(n) = o.event_loops {
        lab.append_config(&format!("  event_loops: {n}\n"))?;
    }
    let o2 = std::process::Command::new(bin("portcullis"))
        .args(["ca", "init", "--config"])
        .arg(&lab.config)
        .output()?;
    ensure!(
        o2.status.success(),
        "portcullis ca init: {}",
        String::from_utf8_lossy(&o2.stderr)
    );
    let ready = lab.start_daemon()?;
    let pid = ready["pid"].as_u64().context("daemon pid")? as u32;
    let pids = [pid];
    let (rss_start, _) = procs::rss(pid);

    let max_secs = o.settle_secs + (o.events as f64 / o.create_rate) as u64 + 30;
    let mut watcher = lab.agent_command(&bin("pc-load"));
    watcher
        .arg(format!("--url=https://{}", lab.cluster_ip()))
        .arg(format!(
            "--ca={}",
            lab.state_dir().join("ca/ca.crt").display()
        ))
        .arg("--token=agent")
        .arg(format!("--connections={}", o.connections))
        .arg("--go")
        .arg(format!("--max-secs={max_secs}"))
        .args(["watch", "--path", WATCH_PATH, "--tag", "w"])
        .arg(format!("--watchers={}", o.watches))
        .arg(format!("--events={}", o.events))
        .arg(format!("--settle-ms={}", o.settle_secs * 1000));
    println!(
        "opening {} watches over {} connections through the daemon (upstream allows {} streams per connection) ...",
        o.watches, o.connections, o.upstream_max_streams
    );
    let c0 = procs::sample(&pids);
    let mut d = Driven::spawn(
        watcher,
        "pc-load watch".into(),
        lab.dir.join("watcher.stderr"),
    )?;
    let opened = d.line()?;
    let c1 = procs::sample(&pids);
    let heads = opened["heads"].as_u64().unwrap_or(0);
    let (rss_open, _) = procs::rss(pid);
    println!(
        "  {heads} of {} watches answered in {} ms; daemon RSS {:.1} MB (from {:.1} MB), CPU {:.0} ms to open them",
        o.watches,
        opened["establish_ms"],
        mb(rss_open),
        mb(rss_start),
        procs::cpu_ns(&c0, &c1) as f64 / 1e6
    );
    // Idle with the watches open.
    let idle_secs = 5;
    std::thread::sleep(Duration::from_secs(idle_secs));
    let c2 = procs::sample(&pids);
    d.go()?;
    let mut creator = lab.command_in_ns(lab.ns_node(), &bin("pc-load"));
    creator
        .arg(format!("--url=https://{api}"))
        .arg(format!("--ca={}", ca.display()))
        .arg("--max-secs=60")
        .args(["create", "--path", WATCH_PATH, "--tag", "w"])
        .arg(format!("--count={}", o.events))
        .arg(format!("--rate={}", o.create_rate))
        .stdin(Stdio::null());
    let out = creator.output()?;
    let created: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let result = d.line()?;
    let c3 = procs::sample(&pids);
    let (rss_end, rss_peak) = procs::rss(pid);
    d.finish().ok();
    if created["errors"] != 0 {
        bail!("creating the events failed: {created}");
    }

    let events = result["events"].as_f64().unwrap_or(0.0);
    let open_cpu_ms = procs::cpu_ns(&c0, &c1) as f64 / 1e6;
    let idle_cpu_ms_per_s = procs::cpu_ns(&c1, &c2) as f64 / 1e6 / idle_secs as f64;
    let event_cpu_us = procs::cpu_ns(&c2, &c3) as f64 / 1e3 / events.max(1.0);
    let goal_rss = rss_peak <= RSS_GOAL && heads as usize == o.watches;
    println!(
        "  events delivered {} of {}; latency p50 {} µs p99 {} µs max {} µs",
        result["events"], result["expected"], result["p50_us"], result["p99_us"], result["max_us"]
    );
    println!(
        "  daemon CPU: {open_cpu_ms:.0} ms to open the watches ({:.1} µs each), {idle_cpu_ms_per_s:.1} ms/s idle with them open, {event_cpu_us:.2} µs per delivered event",
        open_cpu_ms * 1e3 / heads.max(1) as f64
    );
    println!(
        "  daemon RSS: {:.1} MB at start, {:.1} MB with the watches open, {:.1} MB at the end, peak {:.1} MB",
        mb(rss_start),
        mb(rss_open),
        mb(rss_end),
        mb(rss_peak)
    );
    println!(
        "goal:\n  {:<7} {} watches <= 200 MB RSS: peak {:.1} MB with {heads} of them open",
        if goal_rss { "MET" } else { "MISSED" },
        o.watches,
        mb(rss_peak)
    );
    if (heads as usize) < o.watches {
        println!(
            "  only {heads} watches were answered (the upstream allows {} streams per connection; see daemon.log for 429s or upstream errors)",
            o.upstream_max_streams
        );
    }
    let report = json!({
        "watches": o.watches, "connections": o.connections, "events": o.events,
        "create_rate": o.create_rate, "upstream_max_streams": o.upstream_max_streams,
        "answered": heads, "establish_ms": opened["establish_ms"],
        "rss_mb": {"start": mb(rss_start), "open": mb(rss_open), "end": mb(rss_end), "peak": mb(rss_peak)},
        "cpu": {"open_ms": open_cpu_ms, "open_us_per_watch": open_cpu_ms * 1e3 / heads.max(1) as f64,
            "idle_ms_per_s": idle_cpu_ms_per_s, "us_per_delivered_event": event_cpu_us},
        "delivery": result,
        "goals": {"rss_le_200mb_with_all_open": goal_rss},
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("watches.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    println!("report: {}", out.join("watches.json").display());
    Ok(())
}

fn mb(b: u64) -> f64 {
    (b as f64 / (1 << 20) as f64 * 10.0).round() / 10.0
}
