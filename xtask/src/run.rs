//! Running commands with a visible step line and errors that say what failed.
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

static TIMES: std::sync::Mutex<Vec<(String, f64)>> = std::sync::Mutex::new(Vec::new());

/// Runs one phase of a command, printing and remembering how long it took.
pub fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = std::time::Instant::now();
    let r = f();
    let secs = t.elapsed().as_secs_f64();
    note(&format!("{what}: {secs:.0} s"));
    TIMES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((what.to_string(), secs));
    r
}

/// Prints how long each timed phase took (after a whole command).
pub fn print_times() {
    let times = TIMES.lock().unwrap_or_else(|p| p.into_inner());
    let total: f64 = times.iter().map(|(_, s)| s).sum();
    let parts: Vec<String> = times.iter().map(|(w, s)| format!("{w} {s:.0} s")).collect();
    step(&format!(
        "timings: {} (total {total:.0} s)",
        parts.join(", ")
    ));
}

/// Prints a step header: what is happening and why.
pub fn step(what: &str) {
    eprintln!("\x1b[1;36m==>\x1b[0m {what}");
}

pub fn note(what: &str) {
    eprintln!("    {what}");
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; fails with the command line if it fails.
pub fn status(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    let st = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !st.success() {
        bail!("`{line}` failed ({st})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; stderr is passed through.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Is `prog` on PATH?
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // /proc/self/status "Uid:" real effective ...; avoid libc for one number.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
