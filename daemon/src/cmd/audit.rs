//! Audit evidence on the command line: verify, sessions, export, replay.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result};

use super::Output;
use crate::{audit, util::rfc3339_nanos};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    K8s,
    Raw,
}

/// `portcullis audit verify`: each problem, then the totals; exit 1 on any problem.
pub fn verify(dir: &Path, key: Option<PathBuf>, anchor: Option<PathBuf>) -> Result<ExitCode> {
    let anchor = anchor
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("reading the anchor {}", p.display()))?;
            audit::Anchor::parse(&text).with_context(|| format!("{}", p.display()))
        })
        .transpose()?;
    let hexkey = match (&key, &anchor) {
        (Some(k), _) => std::fs::read_to_string(k)
            .with_context(|| format!("reading the audit public key {}", k.display()))?,
        (None, Some(a)) => a.public_key.clone(),
        (None, None) => {
            let beside = dir.join("../audit.pub");
            println!(
                "NOTE  using the key beside the log ({}): whoever can edit the log can replace it; pass --anchor or --key",
                beside.display()
            );
            std::fs::read_to_string(&beside)
                .with_context(|| format!("reading the audit public key {}", beside.display()))?
        }
    };
    let public = hex::decode(hexkey.trim()).context("the audit public key is not hex")?;
    let mut r = audit::verify_settled(dir, &public, Duration::from_secs(2))?;
    if let Some(a) = &anchor {
        r.problems.extend(
            audit::check_anchor(dir, a, &public)
                .into_iter()
                .map(|p| format!("anchor: {p}")),
        );
    }
    for p in &r.problems {
        println!("FAIL  {p}");
    }
    println!(
        "{} segments, {} records{}: {}",
        r.segments,
        r.records,
        anchor
            .as_ref()
            .map(|a| format!(", anchored up to seq {}", a.head.last_seq))
            .unwrap_or_default(),
        if r.problems.is_empty() {
            "intact".to_string()
        } else {
            format!("{} problems", r.problems.len())
        }
    );
    Ok(super::exit(r.problems.is_empty()))
}

/// The sessions of `dir`.
fn sessions_of(dir: &Path, idle: Duration) -> Result<Vec<audit::Session>> {
    let entries = audit::read_all(dir)?;
    Ok(audit::sessions(audit::exchanges(&entries), idle))
}

/// `portcullis audit sessions`.
pub fn sessions(dir: &Path, idle: Duration, output: Output) -> Result<ExitCode> {
    let sessions = sessions_of(dir, idle)?;
    match output {
        Output::Json => {
            let v: Vec<serde_json::Value> = sessions
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "id": s.id, "subject": s.subject, "pod_uid": s.pod_uid,
                        "start": rfc3339_nanos(s.first_ns),
                        "end": rfc3339_nanos(s.last_ns),
                        "requests": s.exchanges.len(),
                        "mutations": s.exchanges.iter().filter(|e| e.request.mutating).count(),
                        "refused": s.exchanges.iter().filter(|e| e.response.as_ref().is_some_and(|r| r.code >= 400)).count(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            println!(
                "{:<17} {:<45} {:<37} {:<20} {:>8} {:>9}",
                "SESSION", "SUBJECT", "POD", "START", "REQUESTS", "MUTATIONS"
            );
            for s in &sessions {
                println!(
                    "{:<17} {:<45} {:<37} {:<20} {:>8} {:>9}",
                    s.id,
                    s.subject,
                    if s.pod_uid.is_empty() {
                        "-"
                    } else {
                        &s.pod_uid
                    },
                    rfc3339_nanos(s.first_ns).get(..19).unwrap_or(""),
                    s.exchanges.len(),
                    s.exchanges.iter().filter(|e| e.request.mutating).count()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `portcullis audit export`: JSON lines on stdout.
pub fn export(dir: &Path, format: ExportFormat) -> Result<ExitCode> {
    let entries = audit::read_all(dir)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match format {
        ExportFormat::Raw => {
            for e in &entries {
                let line = serde_json::json!({"seq": e.seq, "kind": e.kind, "record": e.record});
                writeln!(out, "{line}")?;
            }
        }
        ExportFormat::K8s => {
            for ex in audit::exchanges(&entries) {
                writeln!(out, "{}", audit::k8s_event(&ex))?;
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `portcullis replay`: one line per request (stdout), the summary on stderr; exit 1
/// if any outcome differs.
pub fn replay(
    session: &str,
    dir: &Path,
    target: audit::Target,
    idle: Duration,
    output: Output,
) -> Result<ExitCode> {
    let s = sessions_of(dir, idle)?
        .into_iter()
        .find(|s| s.id == session)
        .with_context(|| {
            format!(
                "no session {session} in {} (see `portcullis audit sessions`)",
                dir.display()
            )
        })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let steps = rt.block_on(audit::replay(&s.exchanges, &target))?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&steps)?),
        Output::Table => {
            for st in &steps {
                println!(
                    "{:>6} {:<8} {:<7} {:<6} {:<6} {} {}",
                    st.seq,
                    st.outcome,
                    st.method,
                    st.recorded.map_or("-".into(), |c| c.to_string()),
                    st.replayed.map_or("-".into(), |c| c.to_string()),
                    st.uri,
                    st.note
                );
            }
        }
    }
    let differ = steps.iter().filter(|s| s.outcome.differs()).count();
    eprintln!(
        "session {}: {} requests, {} replayed, {} differ{}",
        s.id,
        steps.len(),
        steps.iter().filter(|s| s.replayed.is_some()).count(),
        differ,
        if target.apply {
            " (applied)"
        } else {
            " (mutations with dryRun=All)"
        }
    );
    Ok(super::exit(differ == 0))
}
