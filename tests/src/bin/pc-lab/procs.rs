//! CPU time and memory of processes, from /proc: what the benchmarks charge to the
//! daemon, nginx (master + workers) and the upstream.
//!
//! CPU time is user + system. It is read per thread from `/proc/PID/task/TID/schedstat`
//! (the scheduler's run time, in nanoseconds); if a thread ended between two samples
//! (its time is no longer listed there), the process's `utime + stime` from
//! `/proc/PID/stat` is used instead (clock ticks, 10 ms, but it keeps ended threads).
use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::MetadataExt,
    path::Path,
};

/// Clock ticks per second for `/proc/PID/stat` (`getconf CLK_TCK` is 100 on Linux).
const TICKS_PER_S: u64 = 100;

#[derive(Clone, Default)]
struct Proc {
    /// utime + stime of the whole process, ticks.
    ticks: u64,
    /// utime alone, ticks.
    user_ticks: u64,
    /// Run time of each live thread, ns.
    threads: BTreeMap<u32, u64>,
}

/// One reading of a set of processes.
#[derive(Clone, Default)]
pub struct Sample {
    procs: HashMap<u32, Proc>,
}

fn read_proc(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let user_ticks = f.get(11)?.parse::<u64>().ok()?;
    let ticks = user_ticks + f.get(12)?.parse::<u64>().ok()?;
    let mut threads = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ns) = std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            threads.insert(tid, ns);
        }
    }
    Some(Proc {
        ticks,
        user_ticks,
        threads,
    })
}

pub fn sample(pids: &[u32]) -> Sample {
    Sample {
        procs: pids
            .iter()
            .filter_map(|&p| Some((p, read_proc(p)?)))
            .collect(),
    }
}

/// The share of user time in the CPU time the processes of `after` used since
/// `before`, from `/proc/PID/stat` (clock ticks: coarse, for a few seconds' load).
pub fn user_share(before: &Sample, after: &Sample) -> Option<f64> {
    let (mut user, mut all) = (0, 0);
    for (pid, b) in &after.procs {
        let a = before.procs.get(pid).cloned().unwrap_or_default();
        user += b.user_ticks.saturating_sub(a.user_ticks);
        all += b.ticks.saturating_sub(a.ticks);
    }
    (all > 0).then(|| user as f64 / all as f64)
}

/// CPU time (ns) the processes of `after` used since `before`.
pub fn cpu_ns(before: &Sample, after: &Sample) -> u64 {
    after
        .procs
        .iter()
        .map(|(pid, b)| {
            let a = before.procs.get(pid).cloned().unwrap_or_default();
            if a.threads.keys().all(|t| b.threads.contains_key(t)) {
                let sum = |p: &Proc| p.threads.values().sum::<u64>();
                sum(b).saturating_sub(sum(&a))
            } else {
                b.ticks.saturating_sub(a.ticks) * (1_000_000_000 / TICKS_PER_S)
            }
        })
        .sum()
}

/// `root` and every process descended from it (nginx's master and its workers).
pub fn tree(root: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()
                })
            {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Processes named `comm` in the network namespace `netns` (a path under /run/netns).
pub fn find_in_netns(comm: &str, netns: &Path) -> Vec<u32> {
    let Ok(ino) = std::fs::metadata(netns).map(|m| m.ino()) else {
        return Vec::new();
    };
    let want = format!("net:[{ino}]");
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
                && std::fs::read_link(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == want)
        })
        .collect()
}

/// (resident, peak resident) memory of a process, bytes.
pub fn rss(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// A command attached to process `pid` for a measurement (`perf stat/record -p {pid}`,
/// `strace`): `{pid}` and `{tag}` substituted, started through `sh`, given a second to
/// attach before the measured part. Stop it with [`detach`].
pub fn attach(cmd: &str, pid: u32, tag: &str) -> anyhow::Result<std::process::Child> {
    use anyhow::Context;
    let c = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {}",
            cmd.replace("{pid}", &pid.to_string()).replace("{tag}", tag)
        ))
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the attached command")?;
    std::thread::sleep(std::time::Duration::from_millis(1000));
    Ok(c)
}

/// Stops an [`attach`]ed command the way perf writes its results: SIGINT, then waits.
pub fn detach(mut c: std::process::Child) {
    let _ = portcullis_tests::signal(c.id(), libc::SIGINT);
    let _ = c.wait();
}
