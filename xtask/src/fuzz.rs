//! `cargo xtask fuzz [--secs N] [--runs N] [TARGET...]`: the cargo-fuzz targets under
//! `fuzz/`, each run bounded by time (and optionally executions), with a report.
//!
//! Installs what it needs, idempotently: the nightly toolchain (cargo-fuzz builds with
//! `-Zsanitizer` and coverage instrumentation, which only nightly has) and cargo-fuzz
//! itself, pinned, into the tools cache outside the repository.
//!
//! Each target fuzzes a working corpus under `target/fuzz/corpus/<target>` (kept, so a
//! later run starts from the coverage an earlier one reached) seeded from the committed
//! `fuzz/corpus/<target>`, which it never writes to. `target/fuzz/report.json` keeps
//! per-target figures: the last run's and the totals over every run since the working
//! corpus was started (`--fresh` starts both again). A crash is minimized, added to the
//! committed corpus as a regression seed (`fuzz/corpus/<target>/crash-<hash>`) and fails
//! the command once every target has run.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    paths,
    run::{self, note, step},
};

const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// Every target, as `fuzz/Cargo.toml` lists them (and `portcullis::fuzzing::TARGETS`).
const TARGETS: &[&str] = &[
    "policy_document",
    "cel_condition",
    "request_info",
    "json_mask",
    "text_mask",
    "body_decode",
    "protobuf",
    "websocket",
    "config",
    "audit_verify",
    "jwt",
];

pub struct Options {
    pub secs: u64,
    pub runs: Option<u64>,
    pub fresh: bool,
    pub sanitizer: String,
    pub targets: Vec<String>,
}

/// One run of one target, from libFuzzer's final stats.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RunFigures {
    executions: u64,
    secs: u64,
    execs_per_sec: u64,
    new_units: u64,
    peak_rss_mb: u64,
    crashes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TargetReport {
    /// Executions over every run since the working corpus was started.
    total_executions: u64,
    total_secs: u64,
    runs: u64,
    /// Inputs in the working corpus (coverage found so far) and committed seeds.
    corpus_size: u64,
    seeds: u64,
    /// Every crash found (the regression seeds it left), over all runs.
    crashes: Vec<String>,
    last_run: RunFigures,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    sanitizer: String,
    targets: BTreeMap<String, TargetReport>,
}

pub fn run(o: &Options) -> Result<()> {
    let targets: Vec<&str> = if o.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &o.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target `{t}`; targets: {}", TARGETS.join(", "));
            }
        }
        o.targets.iter().map(String::as_str).collect()
    };
    nightly()?;
    let cargo_fuzz = cargo_fuzz()?;
    let out = paths::target().join("fuzz");
    let build_dir = out.join("build");
    step(&format!(
        "building {} fuzz target(s) on nightly (sanitizer {}, debug assertions on)",
        targets.len(),
        o.sanitizer
    ));
    run::timed("fuzz build", || {
        // `cargo fuzz build` takes one target, or none for all of them.
        let one_by_one: Vec<Option<&str>> = if targets.len() == TARGETS.len() {
            vec![None]
        } else {
            targets.iter().map(|t| Some(*t)).collect()
        };
        for t in one_by_one {
            run::status(
                fuzz_cmd(&cargo_fuzz)
                    .arg("build")
                    .args(common_args(&o.sanitizer, &build_dir))
                    .args(t),
            )?;
        }
        Ok(())
    })?;

    let report_path = out.join("report.json");
    let read_report = || -> Report {
        std::fs::read(&report_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    if o.fresh {
        // Only this run's targets start over; the others' figures stay.
        let mut r = read_report();
        for t in &targets {
            r.targets.remove(*t);
        }
        std::fs::create_dir_all(&out)?;
        std::fs::write(&report_path, serde_json::to_vec_pretty(&r)?)?;
    }
    let mut crashed = Vec::new();
    for t in &targets {
        let figures = run::timed(&format!("fuzz {t}"), || fuzz_one(&cargo_fuzz, t, o))?;
        let work = out.join("corpus").join(t);
        // Read again and only this target's entry changed: another `cargo xtask fuzz`
        // (other targets, on the other core) may have written its own meanwhile.
        let mut report = read_report();
        report.sanitizer = o.sanitizer.clone();
        let e = report.targets.entry((*t).to_string()).or_default();
        e.total_executions += figures.executions;
        e.total_secs += figures.secs;
        e.runs += 1;
        e.corpus_size = count_files(&work);
        e.seeds = count_files(&paths::root().join("fuzz/corpus").join(t));
        e.crashes.extend(figures.crashes.iter().cloned());
        if !figures.crashes.is_empty() {
            crashed.push(format!("{t}: {}", figures.crashes.join(", ")));
        }
        e.last_run = figures;
        // Written after every target, so an interrupted run keeps what it measured.
        std::fs::create_dir_all(&out)?;
        let tmp = report_path.with_extension(format!("json.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &report_path)?;
    }
    let report = read_report();
    print_report(&report, &targets);
    note(&format!("report: {}", report_path.display()));
    if !crashed.is_empty() {
        bail!(
            "fuzzing found crashes (minimized, added to fuzz/corpus as regression seeds): {}",
            crashed.join("; ")
        );
    }
    Ok(())
}

fn fuzz_cmd(cargo_fuzz: &Path) -> Command {
    let mut c = Command::new(cargo_fuzz);
    // cargo-fuzz is a cargo subcommand: it expects its own name first.
    c.arg("fuzz").current_dir(paths::root());
    // Not the toolchain `cargo xtask` itself runs under.
    c.env("RUSTUP_TOOLCHAIN", "nightly");
    for v in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(v);
    }
    c
}

fn common_args(sanitizer: &str, build_dir: &Path) -> Vec<String> {
    vec![
        "--fuzz-dir".into(),
        "fuzz".into(),
        "--release".into(),
        "--debug-assertions".into(),
        "--sanitizer".into(),
        sanitizer.into(),
        "--target-dir".into(),
        build_dir.display().to_string(),
    ]
}

fn fuzz_one(cargo_fuzz: &Path, target: &str, o: &Options) -> Result<RunFigures> {
    let out = paths::target().join("fuzz");
    let work = out.join("corpus").join(target);
    if o.fresh {
        let _ = std::fs::remove_dir_all(&work);
    }
    let artifacts = out.join("artifacts").join(target);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&artifacts)?;
    let seeds = paths::root().join("fuzz/corpus").join(target);
    let before: Vec<PathBuf> = crash_files(&artifacts);
    step(&format!(
        "fuzzing {target} for {} s{} (working corpus {}, seeds {})",
        o.secs,
        o.runs
            .map(|r| format!(" or {r} executions"))
            .unwrap_or_default(),
        work.display(),
        seeds.display()
    ));
    let mut libfuzzer = vec![
        format!("-max_total_time={}", o.secs),
        format!("-artifact_prefix={}/", artifacts.display()),
        "-print_final_stats=1".into(),
        "-timeout=20".into(),
        "-rss_limit_mb=2048".into(),
    ];
    if let Some(r) = o.runs {
        libfuzzer.push(format!("-runs={r}"));
    }
    let started = std::time::Instant::now();
    let child = fuzz_cmd(cargo_fuzz)
        .arg("run")
        .args(common_args(&o.sanitizer, &out.join("build")))
        .arg(target)
        .arg(work.as_os_str())
        .arg(seeds.as_os_str())
        .arg("--")
        .args(libfuzzer)
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("could not start cargo fuzz run {target}"))?;
    let secs = started.elapsed().as_secs();
    let stderr = String::from_utf8_lossy(&child.stderr);
    // libFuzzer's progress goes to stderr; keep its last lines visible.
    let lines: Vec<&str> = stderr.lines().collect();
    for l in &lines[lines.len().saturating_sub(12)..] {
        note(l);
    }
    let stat = |name: &str| -> u64 {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut figures = RunFigures {
        executions: stat("number_of_executed_units"),
        secs,
        execs_per_sec: stat("average_exec_per_sec"),
        new_units: stat("new_units_added"),
        peak_rss_mb: stat("peak_rss_mb"),
        crashes: Vec::new(),
    };
    let new: Vec<PathBuf> = crash_files(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if !child.status.success() && new.is_empty() {
        bail!(
            "cargo fuzz run {target} failed ({}) without leaving a crash input",
            child.status
        );
    }
    for crash in new {
        figures
            .crashes
            .push(keep_crash(cargo_fuzz, target, &crash, &seeds, o)?);
    }
    Ok(figures)
}

/// Minimizes a crash input and commits it to the seed corpus as a regression seed.
fn keep_crash(
    cargo_fuzz: &Path,
    target: &str,
    crash: &Path,
    seeds: &Path,
    o: &Options,
) -> Result<String> {
    step(&format!(
        "minimizing the crash input {} of {target}, to keep as a regression seed",
        crash.display()
    ));
    // tmin writes `minimized-from-<hash>` beside the input; failing to minimize still
    // keeps the original.
    let _ = fuzz_cmd(cargo_fuzz)
        .arg("tmin")
        .args(common_args(
            &o.sanitizer,
            &paths::target().join("fuzz/build"),
        ))
        .args(["-r", "2000"])
        .arg(target)
        .arg(crash)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let dir = crash.parent().unwrap_or(Path::new("."));
    let hash = crash
        .file_name()
        .map(|n| n.to_string_lossy().trim_start_matches("crash-").to_string())
        .unwrap_or_default();
    let minimized = dir.join(format!("minimized-from-{hash}"));
    let input = if minimized.exists() {
        minimized
    } else {
        crash.to_path_buf()
    };
    let name = format!("crash-{}", &hash[..hash.len().min(12)]);
    let dest = seeds.join(&name);
    std::fs::copy(&input, &dest)
        .with_context(|| format!("copying {} to {}", input.display(), dest.display()))?;
    note(&format!(
        "regression seed {} (reproduce: cargo test -p portcullis --lib fuzzing)",
        dest.display()
    ));
    Ok(name)
}

fn crash_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with("crash-")
                            || n.starts_with("oom-")
                            || n.starts_with("timeout-")
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn count_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| r.flatten().filter(|e| e.path().is_file()).count() as u64)
        .unwrap_or(0)
}

fn print_report(r: &Report, ran: &[&str]) {
    step("fuzzing report (this run; totals since the working corpus was started)");
    eprintln!(
        "    {:<16} {:>12} {:>9} {:>14} {:>5} {:>7} {:>6} {:>8}",
        "target", "execs (run)", "execs/s", "execs (total)", "runs", "corpus", "seeds", "crashes"
    );
    for (name, t) in &r.targets {
        if !ran.contains(&name.as_str()) {
            continue;
        }
        eprintln!(
            "    {:<16} {:>12} {:>9} {:>14} {:>5} {:>7} {:>6} {:>8}",
            name,
            t.last_run.executions,
            t.last_run.execs_per_sec,
            t.total_executions,
            t.runs,
            t.corpus_size,
            t.seeds,
            t.crashes.len()
        );
    }
}

/// The nightly toolchain, installed through rustup when missing.
fn nightly() -> Result<()> {
    let list = run::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to find or install the nightly toolchain")?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        step("nightly toolchain present (cargo-fuzz needs it for sanitizer and coverage flags)");
        return Ok(());
    }
    step("installing the nightly toolchain through rustup");
    note(
        "why: cargo-fuzz builds with -Zsanitizer and libFuzzer's coverage instrumentation, nightly-only",
    );
    run::status(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]))
}

/// cargo-fuzz, pinned, in the tools cache.
fn cargo_fuzz() -> Result<PathBuf> {
    let root = paths::cache()
        .join("tools")
        .join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin/cargo-fuzz");
    let works = |b: &Path| {
        Command::new(b)
            .args(["fuzz", "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if bin.exists() && works(&bin) {
        step(&format!(
            "cargo-fuzz {CARGO_FUZZ_VERSION} present in {}",
            root.display()
        ));
        return Ok(bin);
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (~1 min, once)",
        root.display()
    ));
    note("why: it builds the targets with libFuzzer and runs, minimizes and reports them");
    run::status(
        Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .arg("--root")
            .arg(root.as_os_str()),
    )?;
    if !works(&bin) {
        bail!("{} was installed but does not run", bin.display());
    }
    Ok(bin)
}
