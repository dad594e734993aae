//! `lab-load --callgrind`: the floor and the daemon run under valgrind's callgrind with
//! instrumentation off, switched on over each round's measured part only and read back as
//! instructions per request — a cost that repeats on a shared machine where CPU time
//! moves by tens of per cent between runs. User space only (the kernel's share, the
//! same system calls for both, is not counted).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

pub struct Callgrind {
    dir: PathBuf,
}

/// What one measured part executed, in instructions (user space).
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub total: u64,
    /// The audit chain's SHA-256: valgrind cannot run the SHA extensions, so under it
    /// the hash runs in software, many times what it costs natively.
    pub sha256: u64,
    /// The audit writer's commits: a fixed cost per 100 ms of traffic (signing a
    /// head), not per request — and a run under valgrind lasts ten times longer.
    pub commits: u64,
}

impl Counts {
    /// What the requests themselves cost: without the software hash and the commits.
    pub fn per_request_work(&self) -> u64 {
        self.total.saturating_sub(self.sha256 + self.commits)
    }
}

impl Callgrind {
    pub fn new(dir: &Path) -> Result<Callgrind> {
        for tool in ["valgrind", "callgrind_control", "callgrind_annotate"] {
            let found = Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            ensure!(
                found,
                "--callgrind needs {tool} (Debian's valgrind: apt-get install valgrind)"
            );
        }
        let dir = dir.join("callgrind");
        std::fs::create_dir_all(&dir)?;
        Ok(Callgrind { dir })
    }

    /// The command line a proxy named `name` is started under.
    pub fn wrap(&self, name: &str) -> Vec<String> {
        vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            "--instr-atstart=no".into(),
            format!("--callgrind-out-file={}/{name}.%p", self.dir.display()),
        ]
    }

    /// Counts from now on (from zero).
    pub fn start(&self, pid: u32) -> Result<()> {
        control(pid, &["--zero"])?;
        control(pid, &["--instr=on"])
    }

    /// Stops counting and reads what was counted since [`Self::start`].
    pub fn stop(&self, name: &str, pid: u32) -> Result<Counts> {
        control(pid, &["--instr=off"])?;
        let before = self.last_dump(name, pid);
        control(pid, &["--dump"])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let file = loop {
            match self.last_dump(name, pid) {
                Some((n, f)) if before.as_ref().is_none_or(|(b, _)| n > *b) => break f,
                _ if Instant::now() > deadline => bail!("callgrind wrote no dump for {name}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        read(&file)
    }

    /// The newest dump of process `pid` (`<name>.<pid>.<n>`) and its number.
    fn last_dump(&self, name: &str, pid: u32) -> Option<(u32, PathBuf)> {
        let prefix = format!("{name}.{pid}.");
        std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e
                    .file_name()
                    .to_str()?
                    .strip_prefix(&prefix)?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .max_by_key(|(n, _)| *n)
    }
}

fn control(pid: u32, args: &[&str]) -> Result<()> {
    let o = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .context("callgrind_control")?;
    ensure!(
        o.status.success(),
        "callgrind_control {args:?} {pid}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

fn annotate(file: &Path, inclusive: bool) -> Result<String> {
    let o = Command::new("callgrind_annotate")
        .arg(format!(
            "--inclusive={}",
            if inclusive { "yes" } else { "no" }
        ))
        .arg("--threshold=100")
        // The function table only: no source, whose call lines name functions again.
        .arg("--auto=no")
        .arg(file)
        .output()
        .context("callgrind_annotate")?;
    ensure!(
        o.status.success(),
        "callgrind_annotate {}: {}",
        file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The leading count of a callgrind_annotate line (`384,206,743 (100.0%)  …`).
fn count(line: &str) -> Option<u64> {
    line.split_whitespace()
        .next()?
        .replace(',', "")
        .parse()
        .ok()
}

fn read(file: &Path) -> Result<Counts> {
    let own = annotate(file, false)?;
    let total = own
        .lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(count)
        .context("no PROGRAM TOTALS in the dump")?;
    // Self costs of the compression function (its lines fall under several source
    // files once inlined).
    let sha256 = own
        .lines()
        .filter(|l| l.contains("sha2::sha256::compress256"))
        .filter_map(count)
        .sum();
    let commits = annotate(file, true)?
        .lines()
        .filter(|l| l.contains("AuditWriter::commit") && !l.contains("=>"))
        .filter_map(count)
        .max()
        .unwrap_or(0);
    Ok(Counts {
        total,
        sha256,
        commits,
    })
}
