//! `cargo xtask bench kernel`: what the kernel programs cost, on the kernel lab.
//!
//! - connect() latency from the agent cgroup with the programs attached and detached
//!   (wall clock, same targets, alternating rounds);
//! - per program, from the kernel's own accounting (`kernel.bpf_stats_enabled`, on only
//!   for the measurement and restored): run time per call and calls per redirected
//!   connect; and its size (translated instructions, JIT-ed bytes, instructions the
//!   verifier processed);
//! - the cost imposed on processes that are NOT agents: which programs run at all on
//!   their syscalls (getppid, fork + exec + exit), socket creation, UDP sends and TCP
//!   connects, from a non-enrolled cgroup under the attach point (another pod on the
//!   node) and from a process outside it; and what runs node-wide while the lab is idle
//!   (other processes on this machine: a program that runs there taxes every process);
//! - ring-buffer events per second.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use portcullis_tests::{Lab, bin, wait_for};
use serde_json::{Value, json};

struct Stat {
    p50: f64,
    p99: f64,
    n: u64,
}

fn connect_stat(lab: &Lab, addr: std::net::SocketAddr, count: u32) -> Result<Stat> {
    let p = lab.agent(&[
        "bench-connect",
        &addr.to_string(),
        "--count",
        &count.to_string(),
        "--max-secs",
        "20",
    ])?;
    let j = &p.json;
    if j["n"].as_u64().unwrap_or(0) == 0 {
        bail!("no successful connects to {addr}: {j}");
    }
    Ok(Stat {
        p50: j["p50_ns"].as_f64().unwrap_or(0.0) / 1000.0,
        p99: j["p99_ns"].as_f64().unwrap_or(0.0) / 1000.0,
        n: j["n"].as_u64().unwrap_or(0),
    })
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` on while it lives; the previous value comes back on drop
/// (also on an error).
struct StatsOn(String);

impl StatsOn {
    fn new() -> Result<StatsOn> {
        let was = std::fs::read_to_string(BPF_STATS)
            .context("reading kernel.bpf_stats_enabled")?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(StatsOn(was))
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

/// The lab daemon's programs: kernel program id → pin name.
fn lab_programs(ready: &Value) -> BTreeMap<u32, String> {
    ready["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p[1].as_u64()? as u32, p[0].as_str()?.to_string())))
        .collect()
}

/// (pin name, run time ns, run count) of the lab's programs (other labs and the test
/// node load programs with the same names: only ours count).
type Snapshot = Vec<(String, u64, u64)>;

fn program_stats(ours: &BTreeMap<u32, String>) -> Snapshot {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = ours.get(&p.id())?.clone();
            Some((name, p.run_time().as_nanos() as u64, p.run_count()))
        })
        .collect()
}

/// Per program: (name, ns per op, runs per op) between two snapshots, `ops`
/// operations; programs that did not run are left out.
fn program_delta(before: &Snapshot, after: &Snapshot, ops: f64) -> Vec<(String, f64, f64)> {
    let mut out: Vec<(String, f64, f64)> = after
        .iter()
        .filter_map(|(name, ns, runs)| {
            let (_, ns0, runs0) = before.iter().find(|(n, _, _)| n == name)?;
            let runs = runs.saturating_sub(*runs0);
            (runs > 0).then(|| {
                (
                    name.clone(),
                    ns.saturating_sub(*ns0) as f64 / ops,
                    runs as f64 / ops,
                )
            })
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

fn median_stat(mut v: Vec<Stat>) -> Stat {
    let n = v.len() as u64;
    let mid = v.len() / 2;
    v.sort_by(|a, b| a.p50.total_cmp(&b.p50));
    let p50 = v[mid].p50;
    v.sort_by(|a, b| a.p99.total_cmp(&b.p99));
    Stat {
        p50,
        p99: v[mid].p99,
        n: v.iter().map(|s| s.n).sum::<u64>() / n,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Size of each of the lab's programs, from the kernel's program info.
fn program_sizes(ours: &BTreeMap<u32, String>) -> Vec<Value> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = ours.get(&p.id())?.clone();
            Some(json!({
                "name": name,
                "kernel_name": p.name_as_str().unwrap_or_default(),
                "type": format!("{:?}", p.program_type()),
                // bpf_prog_info.xlated_prog_len is in bytes; an instruction is 8.
                "xlated_insns": p.size_translated().map(|b| b / 8),
                "jited_bytes": p.size_jitted(),
                "verified_insns": p.verified_instruction_count(),
            }))
        })
        .collect()
}

/// One operation run by a non-agent process, and the programs that ran for it.
struct OpCost {
    who: &'static str,
    op: &'static str,
    ops: f64,
    /// (program, ns per op, runs per op), with what ran node-wide in an idle window of
    /// the same length subtracted.
    programs: Vec<(String, f64, f64)>,
}

/// Runs `op` `count` times as a non-agent (`who`: `bystander`, a cgroup under the
/// attach point that is not enrolled; `outside`, a process outside the attach point),
/// then sleeps as long with nothing running (the idle baseline).
fn non_agent_op(
    lab: &Lab,
    ours: &BTreeMap<u32, String>,
    who: &'static str,
    op: &'static str,
    count: u32,
) -> Result<OpCost> {
    let sink = lab.sink().to_string();
    let mut args = vec![
        "bench-ops".to_string(),
        op.to_string(),
        format!("--count={count}"),
        "--max-secs=20".into(),
    ];
    if matches!(op, "udp" | "connect") {
        args.push(format!("--addr={sink}"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let before = program_stats(ours);
    let t = Instant::now();
    let (n, _elapsed) = match who {
        "bystander" => {
            let p = lab.bystander(&refs)?;
            (
                p.json["n"].as_f64().unwrap_or(0.0),
                p.json["elapsed_ns"].as_u64(),
            )
        }
        _ => {
            // A process outside the attach point, in the node's namespace (where the
            // sink is).
            let o = lab
                .command_in_ns(lab.ns_node(), &bin("pc-probe"))
                .args(&refs)
                .output()?;
            let v: Value = serde_json::from_slice(&o.stdout)
                .with_context(|| String::from_utf8_lossy(&o.stderr).into_owned())?;
            (v["n"].as_f64().unwrap_or(0.0), v["elapsed_ns"].as_u64())
        }
    };
    let busy = t.elapsed();
    let after = program_stats(ours);
    // The same time with nothing of ours running: what other processes on the machine
    // cause (a node-wide program runs for them too).
    std::thread::sleep(busy);
    let idle = program_stats(ours);
    let ops = n.max(1.0);
    let work = program_delta(&before, &after, ops);
    let background = program_delta(&after, &idle, ops);
    let programs = work
        .into_iter()
        .map(|(name, ns, runs)| {
            let (bns, bruns) = background
                .iter()
                .find(|(b, _, _)| *b == name)
                .map(|(_, ns, r)| (*ns, *r))
                .unwrap_or((0.0, 0.0));
            (name, (ns - bns).max(0.0), (runs - bruns).max(0.0))
        })
        .filter(|(_, _, runs)| *runs >= 0.01)
        .collect();
    Ok(OpCost {
        who,
        op,
        ops,
        programs,
    })
}

pub fn bench(count: u32, events: u32, rounds: u32) -> Result<()> {
    let lab = Lab::new("bench")?;
    lab.start_sink()?;
    let ready = lab.start_daemon()?;
    // Warm up ARP/ND and the daemon.
    let _ = connect_stat(&lab, lab.sink(), 200);
    let _ = connect_stat(&lab, lab.daemon_v4(), 200);

    // Ring buffer: each refused datagram is one event; measure how fast they arrive.
    let before = lab.kernel_events().len();
    let t = Instant::now();
    let burst = lab.agent(&[
        "bench-events",
        &lab.api().to_string(),
        "--count",
        &events.to_string(),
        "--max-secs",
        "20",
    ])?;
    let produced = burst.json["refused"].as_u64().unwrap_or(0);
    let send_ns = burst.json["elapsed_ns"].as_u64().unwrap_or(1);
    let mut delivered = 0u64;
    let settle = wait_for(30, || {
        let n = (lab.kernel_events().len() - before) as u64;
        if n == delivered && n > 0 {
            return Some(n);
        }
        delivered = n;
        std::thread::sleep(Duration::from_millis(200));
        None
    });
    let delivered = settle.unwrap_or(delivered);
    let elapsed = t.elapsed().as_secs_f64();

    // Latency: alternate rounds with the programs attached and detached (the daemon
    // keeps listening while detached), so drift hits both sides alike. Each round
    // reports its p50/p99; the table gives the median of the rounds.
    println!(
        "connect() latency from the agent cgroup, {rounds} rounds x {count} connects each (µs)"
    );
    let mut on_sink = Vec::new();
    let mut on_direct = Vec::new();
    let mut on_redirect = Vec::new();
    let mut off_sink = Vec::new();
    let mut off_direct = Vec::new();
    // Per round: (program, ns per redirected connect, runs per connect).
    let mut per_connect: Vec<Vec<(String, f64, f64)>> = Vec::new();
    let mut sizes = Vec::new();
    let mut non_agent = Vec::new();
    let mut idle_rate: Vec<(String, f64, f64)> = Vec::new();
    {
        // The kernel's own accounting of time spent in our programs.
        let _stats = StatsOn::new()?;
        let mut ours = lab_programs(&ready);
        for round in 0..rounds {
            if round > 0 {
                ours = lab_programs(&lab.start_daemon()?);
            }
            on_sink.push(connect_stat(&lab, lab.sink(), count)?);
            on_direct.push(connect_stat(&lab, lab.daemon_v4(), count)?);
            let before = program_stats(&ours);
            let r = connect_stat(&lab, lab.api(), count)?;
            per_connect.push(program_delta(&before, &program_stats(&ours), r.n as f64));
            on_redirect.push(r);
            if round == 0 {
                sizes = program_sizes(&ours);
                // What non-agents pay.
                for who in ["bystander", "outside"] {
                    for (op, n) in [
                        ("syscall", 200_000),
                        ("fork", 300),
                        ("socket", 20_000),
                        ("udp", 20_000),
                        ("connect", count),
                    ] {
                        non_agent.push(non_agent_op(&lab, &ours, who, op, n)?);
                    }
                }
                // Node-wide, nothing of ours running: per second.
                let a = program_stats(&ours);
                std::thread::sleep(Duration::from_secs(2));
                idle_rate = program_delta(&a, &program_stats(&ours), 2.0);
            }
            lab.portcullis(&["unload"])
                .context("detaching for the baseline")?;
            off_sink.push(connect_stat(&lab, lab.sink(), count)?);
            off_direct.push(connect_stat(&lab, lab.daemon_v4(), count)?);
            lab.kill_daemon();
        }
    }
    let (on_sink, on_direct, on_redirect, off_sink, off_direct) = (
        median_stat(on_sink),
        median_stat(on_direct),
        median_stat(on_redirect),
        median_stat(off_sink),
        median_stat(off_direct),
    );

    let row = |name: &str, s: &Stat, base: &Stat| {
        println!(
            "  {name:<46} p50 {:>7.1}  p99 {:>7.1}  n {:>5}  p50 ratio {:>5.3}  added p50 {:>+6.2} µs",
            s.p50,
            s.p99,
            s.n,
            s.p50 / base.p50,
            s.p50 - base.p50
        );
    };
    row(
        "baseline: programs detached, node sink",
        &off_sink,
        &off_sink,
    );
    row(
        "programs attached, node sink (not protected)",
        &on_sink,
        &off_sink,
    );
    row(
        "baseline: programs detached, daemon address",
        &off_direct,
        &off_direct,
    );
    row(
        "programs attached, daemon address (direct)",
        &on_direct,
        &off_direct,
    );
    row(
        "programs attached, API address -> daemon",
        &on_redirect,
        &off_direct,
    );
    let added = on_redirect.p50 - off_direct.p50;
    println!("  redirect path added at p50 (wall clock, noisy): {added:+.2} µs");

    // Per program, median over rounds.
    let mut names: Vec<String> = per_connect
        .iter()
        .flatten()
        .map(|(n, _, _)| n.clone())
        .collect();
    names.sort();
    names.dedup();
    let mut hooks = Vec::new();
    for name in &names {
        let pick = |f: fn(&(String, f64, f64)) -> f64| {
            median(
                per_connect
                    .iter()
                    .map(|r| r.iter().find(|p| &p.0 == name).map(f).unwrap_or(0.0))
                    .collect(),
            )
        };
        let ns = pick(|p| p.1);
        let runs = pick(|p| p.2);
        hooks.push((name.clone(), ns, runs));
    }
    hooks.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total_ns: f64 = hooks.iter().map(|(_, ns, _)| ns).sum();
    println!("\nper hook, one redirected connect (bpf_stats; median of {rounds} rounds) and size:");
    println!(
        "  {:<24} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9}",
        "program", "ns/connect", "runs", "ns/run", "xlated", "jited B", "verified"
    );
    let size_of = |name: &str| sizes.iter().find(|s| s["name"] == name).cloned();
    let mut hook_json = Vec::new();
    for (name, ns, runs) in &hooks {
        let s = size_of(name).unwrap_or(Value::Null);
        println!(
            "  {name:<24} {ns:>10.0} {runs:>10.2} {:>10.0} {:>8} {:>8} {:>9}",
            ns / runs.max(f64::MIN_POSITIVE),
            s["xlated_insns"],
            s["jited_bytes"],
            s["verified_insns"]
        );
        hook_json.push(
            json!({"program": name, "ns_per_connect": ns, "runs_per_connect": runs,
            "ns_per_run": ns / runs.max(f64::MIN_POSITIVE), "size": s}),
        );
    }
    println!("  {:<24} {total_ns:>10.0}", "total");
    println!("\nall programs (size):");
    for s in &sizes {
        println!(
            "  {:<24} {:<28} xlated {:>5} insns, jited {:>6} B, verifier processed {}",
            s["name"].as_str().unwrap_or_default(),
            s["type"].as_str().unwrap_or_default(),
            s["xlated_insns"],
            s["jited_bytes"],
            s["verified_insns"]
        );
    }

    println!(
        "\ncost to processes that are NOT agents (programs that ran, net of an idle window of the same length):"
    );
    let mut non_agent_json = Vec::new();
    let mut on_syscalls: Vec<String> = Vec::new();
    for c in &non_agent {
        let list: Vec<String> = c
            .programs
            .iter()
            .map(|(n, ns, runs)| {
                format!(
                    "{n} x{runs:.2} {ns:.0} ns ({:.0} ns/run)",
                    ns / runs.max(f64::MIN_POSITIVE)
                )
            })
            .collect();
        println!(
            "  {:<9} {:<8} ({:>6} ops): {}",
            c.who,
            c.op,
            c.ops,
            if list.is_empty() {
                "nothing".to_string()
            } else {
                list.join(", ")
            }
        );
        if matches!(c.op, "syscall" | "fork") {
            on_syscalls.extend(
                c.programs
                    .iter()
                    .map(|p| format!("{} ({} {})", p.0, c.who, c.op)),
            );
        }
        non_agent_json.push(json!({"who": c.who, "op": c.op, "ops": c.ops,
            "programs": c.programs.iter().map(|(n, ns, runs)| json!({"program": n,
                "ns_per_op": ns, "runs_per_op": runs,
                "ns_per_run": ns / runs.max(f64::MIN_POSITIVE)})).collect::<Vec<_>>()}));
    }
    println!("  node-wide while idle (every process on this machine, per second):");
    for (n, ns, runs) in &idle_rate {
        println!("    {n:<24} {runs:>9.0} runs/s {ns:>12.0} ns/s");
    }
    println!(
        "ring buffer: {produced} refused datagrams in {:.3} s ({:.0} events/s produced), {delivered} delivered to the event log in {elapsed:.2} s ({:.0} events/s end to end, {} lost)",
        send_ns as f64 / 1e9,
        produced as f64 / (send_ns as f64 / 1e9),
        delivered as f64 / elapsed,
        produced.saturating_sub(delivered)
    );
    on_syscalls.sort();
    on_syscalls.dedup();
    let goal_connect = total_ns <= 2000.0;
    let goal_syscalls = on_syscalls.is_empty();
    println!("\ngoals:");
    println!(
        "  {:<7} redirected connect: {total_ns:.0} ns of program time (bpf_stats) <= 2000 ns",
        if goal_connect { "MET" } else { "MISSED" }
    );
    println!(
        "  {:<7} no program runs on a non-agent process's syscalls (getppid, fork/exec/exit){}",
        if goal_syscalls { "MET" } else { "MISSED" },
        if goal_syscalls {
            String::new()
        } else {
            format!(": {}", on_syscalls.join(", "))
        }
    );
    let report = json!({
        "connect_us": {
            "off_sink": [off_sink.p50, off_sink.p99], "on_sink": [on_sink.p50, on_sink.p99],
            "off_daemon": [off_direct.p50, off_direct.p99], "on_daemon": [on_direct.p50, on_direct.p99],
            "on_redirect": [on_redirect.p50, on_redirect.p99],
            "added_p50_redirect_us": added,
            "added_p50_miss_us": on_sink.p50 - off_sink.p50,
            "program_ns_per_redirected_connect": total_ns,
        },
        "hooks_per_redirected_connect": hook_json,
        "programs": sizes,
        "non_agent": non_agent_json,
        "node_wide_idle_per_s": idle_rate.iter().map(|(n, ns, runs)| json!({"program": n, "ns_per_s": ns, "runs_per_s": runs})).collect::<Vec<_>>(),
        "events": {"produced": produced, "delivered": delivered, "produce_per_s": produced as f64 / (send_ns as f64 / 1e9), "end_to_end_per_s": delivered as f64 / elapsed},
        "goals": {
            "redirected_connect_program_ns_le_2000": goal_connect,
            "no_program_on_non_agent_syscalls": goal_syscalls,
            "programs_on_non_agent_syscalls": on_syscalls,
        },
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("kernel.json"), serde_json::to_vec_pretty(&report)?)?;
    println!("report: {}", out.join("kernel.json").display());
    Ok(())
}
