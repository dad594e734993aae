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
    parse(&annotate(file, false)?, &annotate(file, true)?)
}

/// Counts from callgrind_annotate's function tables: `own` (self costs), `inclusive`.
fn parse(own: &str, inclusive: &str) -> Result<Counts> {
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
    let commits = inclusive
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

#[cfg(test)]
mod tests {
    /// The shape callgrind_annotate 3.19 prints (`--auto=no`), cut from a real dump.
    #[test]
    fn counts_are_read_from_the_function_tables() {
        let own = "\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
361,218,234 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                    file:function
--------------------------------------------------------------------------------
361,186,839 (99.99%)  ./misc/../sysdeps/unix/sysv/linux/x86_64/clone.S:clone [/usr/lib/x86_64-linux-gnu/libc.so.6]
 49,494,000 (13.70%)  /root/.cargo/registry/src/sha2-0.10.9/src/sha256/soft.rs:sha2::sha256::compress256
 29,310,000 ( 8.11%)  /rustc/x/library/core/src/intrinsics/mod.rs:sha2::sha256::compress256
 23,190,000 ( 6.42%)  /rustc/x/library/core/src/num/uint_macros.rs:sha2::sha256::compress256
  6,772,035 ( 1.87%)  /work/main/daemon/src/mask/json.rs:portcullis::mask::json::JsonMasker::feed [/work/main/target/release/portcullis]
";
        let inclusive = "\
361,218,234 (100.0%)  PROGRAM TOTALS
  5,961,428 ( 1.65%)  daemon/src/audit/writer.rs:portcullis::audit::writer::AuditWriter::commit [/work/main/target/release/portcullis]
  5,746,164 ( 1.59%)  /work/main/daemon/src/audit/writer.rs:portcullis::audit::writer::AuditWriter::commit
  5,706,299 ( 1.58%)  /work/main/daemon/src/audit/writer.rs:portcullis::audit::writer::AuditWriter::write_head
";
        let c = super::parse(own, inclusive).unwrap();
        assert_eq!(c.total, 361_218_234);
        assert_eq!(c.sha256, 49_494_000 + 29_310_000 + 23_190_000);
        assert_eq!(c.commits, 5_961_428);
        assert_eq!(c.per_request_work(), 361_218_234 - 101_994_000 - 5_961_428);
        // No total: an error, not a zero.
        assert!(super::parse("nothing", inclusive).is_err());
    }
}
