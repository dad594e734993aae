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
//! - name: a pod mounting a Secret
//!   subject: {serviceAccount: e2e/agent}
//!   request:
//!     method: POST
//!     path: /api/v1/namespaces/e2e/pods
//!     object: {kind: Pod, spec: {...}}       # what the request would store (the
//!     oldObject: {...}                       # dry run's result), what is stored
//!   expect: deny
//!   rule: reads                              # optional: the deciding rule
//!   impersonate: portcullis:agent            # optional: the upstream user
//! ```
use std::path::Path;

use serde::Deserialize;

use super::{Action, Policy, PolicyError, Request};
use crate::k8s::{self, RequestInfoError, UserInfo};

/// Why the cases could not be run (not a failing case: those are in the report).
#[derive(Debug, thiserror::Error)]
pub enum CasesError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("reading {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: `{field}`: {message}", path.display())]
    Invalid {
        path: std::path::PathBuf,
        field: String,
        message: String,
    },
    #[error("cases[{index}] ({name})")]
    Subject {
        index: usize,
        name: String,
        #[source]
        source: SubjectError,
    },
    #[error("cases[{index}] ({name}): request")]
    Request {
        index: usize,
        name: String,
        #[source]
        source: RequestInfoError,
    },
}

/// A case's subject that does not say who it is.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    #[error("serviceAccount is NAMESPACE/NAME")]
    ServiceAccountForm,
    #[error("a subject has exactly one of user or serviceAccount")]
    OneOf,
}

/// One case's outcome: what differed from the expectation (empty: it passed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub name: String,
    pub wrong: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.wrong.is_empty()
    }
}

/// Every case, in order.
#[derive(Debug, Default)]
pub struct Report {
    pub cases: Vec<CaseResult>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }
}

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
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Req {
    method: String,
    path: String,
    /// `object` as the conditions read it: what the request would store.
    #[serde(default)]
    object: Option<serde_json::Value>,
    /// `oldObject`: what is stored.
    #[serde(default)]
    old_object: Option<serde_json::Value>,
}

impl Subject {
    fn user(&self) -> Result<UserInfo, SubjectError> {
        let (username, mut groups) = match (&self.user, &self.service_account) {
            (Some(u), None) => (u.clone(), Vec::new()),
            (None, Some(sa)) => {
                let (ns, name) = sa.split_once('/').ok_or(SubjectError::ServiceAccountForm)?;
                let u = UserInfo::service_account(ns, name);
                (u.username, u.groups)
            }
            _ => return Err(SubjectError::OneOf),
        };
        groups.extend(self.groups.iter().cloned());
        groups.push("system:authenticated".into());
        Ok(UserInfo { username, groups })
    }
}

/// Runs every case of `cases_path` against the policy in `policy_path`.
pub fn run(policy_path: &Path, cases_path: &Path) -> Result<Report, CasesError> {
    let policy = Policy::load(policy_path)?;
    let text = std::fs::read_to_string(cases_path).map_err(|source| CasesError::Read {
        path: cases_path.to_owned(),
        source,
    })?;
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    let cases: Cases = serde_path_to_error::deserialize(de).map_err(|e| CasesError::Invalid {
        path: cases_path.to_owned(),
        field: e.path().to_string(),
        message: e.into_inner().to_string(),
    })?;
    let mut report = Report::default();
    for (index, c) in cases.cases.iter().enumerate() {
        let user = c.subject.user().map_err(|source| CasesError::Subject {
            index,
            name: c.name.clone(),
            source,
        })?;
        let (p, q) = c
            .request
            .path
            .split_once('?')
            .unwrap_or((&c.request.path, ""));
        let info =
            k8s::resolve(&c.request.method, p, (!q.is_empty()).then_some(q)).map_err(|source| {
                CasesError::Request {
                    index,
                    name: c.name.clone(),
                    source,
                }
            })?;
        let mut request = Request::new(&user, &info);
        request.query = q;
        request.create_name = c
            .request
            .object
            .as_ref()
            .and_then(|o| o["metadata"]["name"].as_str().map(str::to_owned));
        let d = policy.decide(
            &request,
            &request.inputs(
                c.request.object.as_ref(),
                c.request.old_object.as_ref(),
                None,
            ),
        );
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
            let got = policy.scoped_identity(&user).map(|s| s.user.clone());
            if got.as_deref() != Some(u.as_str()) {
                wrong.push(format!("upstream identity {got:?}, expected {u}"));
            }
        }
        report.cases.push(CaseResult {
            name: c.name.clone(),
            wrong,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policy_passes_its_cases() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy");
        let r = run(
            &dir.join("coding-agents.yaml"),
            &dir.join("coding-agents.cases.yaml"),
        )
        .unwrap();
        assert_eq!(r.failed(), 0, "{:?}", r.cases);
        assert!(r.passed() >= 60, "{}", r.passed());
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
        let r = run(&policy, &cases).unwrap();
        assert_eq!((r.passed(), r.failed()), (0, 1));
        assert_eq!(r.cases[0].name, "exec is allowed (wrong)");
        assert!(!r.cases[0].passed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
