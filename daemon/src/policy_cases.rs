//! `portcullis policy test --policy FILE --cases FILE`: table-driven decision checks,
//! resolved through the same RequestInfo and policy code the daemon runs. Non-zero
//! exit on any mismatch, like `opa test`.
//!
//! ```yaml
//! cases:
//! - name: agents read pods
//!   subject: {serviceAccount: e2e/agent}     # or {user: alice, groups: [devs]}
//!   request: {method: GET, path: /api/v1/namespaces/e2e/pods}
//!   expect: allow                            # allow | deny | approve
//!   rule: reads                              # optional: the deciding rule
//!   impersonate: portcullis:agent            # optional: the upstream user
//! ```
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{
    identity::Identity,
    policy::{Action, Policy},
    request_info,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    subject: Subject,
    request: Req,
    expect: Action,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    impersonate: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Subject {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    /// `NAMESPACE/NAME`: a projected service-account token's identity.
    #[serde(default)]
    service_account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Req {
    method: String,
    path: String,
}

impl Subject {
    fn identity(&self) -> Result<Identity> {
        let (username, mut groups) = match (&self.user, &self.service_account) {
            (Some(u), None) => (u.clone(), Vec::new()),
            (None, Some(sa)) => {
                let (ns, name) = sa
                    .split_once('/')
                    .context("serviceAccount is NAMESPACE/NAME")?;
                (
                    format!("system:serviceaccount:{ns}:{name}"),
                    vec![
                        "system:serviceaccounts".to_string(),
                        format!("system:serviceaccounts:{ns}"),
                    ],
                )
            }
            _ => bail!("a subject has exactly one of user or serviceAccount"),
        };
        groups.extend(self.groups.iter().cloned());
        groups.push("system:authenticated".into());
        Ok(Identity {
            issuer: "policy-test".into(),
            username,
            groups,
            token_id: String::new(),
            expires_at: u64::MAX,
            token_pod: None,
            kernel_pod: None,
        })
    }
}

/// Runs every case; returns (passed, failed) and prints one line per case.
pub fn run(
    policy_path: &Path,
    cases_path: &Path,
    out: &mut impl std::io::Write,
) -> Result<(usize, usize)> {
    let policy = Policy::load(policy_path)?;
    let text = std::fs::read_to_string(cases_path)
        .with_context(|| format!("reading {}", cases_path.display()))?;
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    let cases: Cases = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        anyhow::anyhow!("{}: `{field}`: {}", cases_path.display(), e.into_inner())
    })?;
    let (mut pass, mut fail) = (0, 0);
    for (i, c) in cases.cases.iter().enumerate() {
        let id = c
            .subject
            .identity()
            .with_context(|| format!("cases[{i}] ({})", c.name))?;
        let (p, q) = c
            .request
            .path
            .split_once('?')
            .unwrap_or((&c.request.path, ""));
        let info = request_info::resolve(&c.request.method, p, (!q.is_empty()).then_some(q))
            .with_context(|| format!("cases[{i}] ({}): request", c.name))?;
        let d = policy.decide(&id, &info);
        let mut wrong = Vec::new();
        if d.action != c.expect {
            wrong.push(format!("decision {:?}, expected {:?}", d.action, c.expect));
        }
        if let Some(r) = &c.rule
            && d.rule.as_deref() != Some(r.as_str())
        {
            wrong.push(format!("rule {:?}, expected {r}", d.rule));
        }
        if let Some(u) = &c.impersonate {
            let got = policy.scoped_identity(&id).map(|s| s.user.clone());
            if got.as_deref() != Some(u.as_str()) {
                wrong.push(format!("upstream identity {got:?}, expected {u}"));
            }
        }
        if wrong.is_empty() {
            pass += 1;
            writeln!(out, "PASS  {}", c.name)?;
        } else {
            fail += 1;
            writeln!(out, "FAIL  {}: {}", c.name, wrong.join("; "))?;
        }
    }
    writeln!(out, "{pass} passed, {fail} failed")?;
    Ok((pass, fail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policy_passes_its_cases() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy");
        let mut out = Vec::new();
        let (pass, fail) = run(
            &dir.join("coding-agents.yaml"),
            &dir.join("coding-agents.cases.yaml"),
            &mut out,
        )
        .unwrap();
        assert_eq!(fail, 0, "{}", String::from_utf8_lossy(&out));
        assert!(pass >= 10);
    }

    #[test]
    fn a_wrong_expectation_fails() {
        let dir = std::env::temp_dir().join(format!("pc-cases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases = dir.join("c.yaml");
        std::fs::write(
            &cases,
            "cases:\n- name: exec is allowed (wrong)\n  subject: {serviceAccount: e2e/agent}\n  request: {method: POST, path: /api/v1/namespaces/e2e/pods/w/exec}\n  expect: allow\n",
        )
        .unwrap();
        let policy =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy/coding-agents.yaml");
        let mut out = Vec::new();
        let (pass, fail) = run(&policy, &cases, &mut out).unwrap();
        assert_eq!((pass, fail), (0, 1));
        assert!(String::from_utf8_lossy(&out).contains("FAIL  exec is allowed (wrong)"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
