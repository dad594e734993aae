//! `portcullis policy test`: one line per case, then the totals; exit 1 on a mismatch.
//! `portcullis policy rbac`: the RBAC a policy implies.
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

/// `portcullis policy rbac`: the policy is checked as the daemon would load it, then
/// the RBAC it implies is printed as one YAML stream.
pub fn rbac(
    policy_path: &Path,
    daemon_namespace: String,
    daemon_service_account: String,
    legacy: bool,
) -> Result<ExitCode> {
    policy::PolicyHandle::load(policy_path)?;
    let text = std::fs::read_to_string(policy_path)?;
    let objects = policy::rbac::generate(
        &text,
        &policy::rbac::Target {
            daemon_namespace,
            daemon_service_account,
            legacy,
        },
    )?;
    print!(
        "{}",
        policy::rbac::to_yaml(&objects, &policy_path.display().to_string())?
    );
    Ok(ExitCode::SUCCESS)
}
