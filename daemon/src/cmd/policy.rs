//! `portcullis policy test`: one line per case, then the totals; exit 1 on a mismatch.
use std::{path::Path, process::ExitCode};

use anyhow::Result;

use crate::policy;

pub fn test(policy_path: &Path, cases: &Path) -> Result<ExitCode> {
    let report = policy::run_cases(policy_path, cases)?;
    for c in &report.cases {
        if c.passed() {
            println!("PASS  {}", c.name);
        } else {
            println!("FAIL  {}: {}", c.name, c.wrong.join("; "));
        }
    }
    println!("{} passed, {} failed", report.passed(), report.failed());
    Ok(super::exit(report.failed() == 0))
}
