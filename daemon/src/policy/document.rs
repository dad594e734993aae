//! The policy document as written: YAML, parsed in one place, every error naming the
//! field (and where the parser knows it, the line).
use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    API_VERSION, KIND, MAX_HOLD, PolicyError,
    condition::Condition,
    rules::{Policy, Rule, Subject, glob},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    spec: Spec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    identities: Vec<IdentitySpec>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentitySpec {
    subjects: Vec<SubjectSpec>,
    impersonate: Scoped,
}

/// The upstream identity the daemon impersonates for a subject.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Scoped {
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubjectSpec {
    pub kind: SubjectKind,
    /// User or group name (glob), or the service account's name (glob).
    pub name: String,
    /// ServiceAccount only: its namespace (glob, default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum SubjectKind {
    User,
    Group,
    ServiceAccount,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Approve,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleSpec {
    name: String,
    #[serde(default)]
    subjects: Vec<SubjectSpec>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
    action: Action,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    approval: Option<ApprovalSpecRaw>,
    /// CEL expressions over `object`, `oldObject` and `request`; all must hold.
    #[serde(default)]
    conditions: Vec<ConditionSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionSpec {
    #[serde(default)]
    name: Option<String>,
    expression: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApprovalSpecRaw {
    #[serde(default)]
    approvers: Vec<SubjectSpec>,
    #[serde(default = "default_hold")]
    hold_time: String,
    #[serde(default = "default_ttl", rename = "grantTTL")]
    grant_ttl: String,
}

fn default_hold() -> String {
    "60s".into()
}
fn default_ttl() -> String {
    "15m".into()
}

/// What an `approve` rule asks for.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApprovalSpec {
    /// Who may approve (empty: any configured approver).
    pub approvers: Vec<SubjectSpec>,
    #[serde(with = "secs")]
    pub hold: Duration,
    #[serde(with = "secs")]
    pub grant_ttl: Duration,
}

mod secs {
    use serde::Serializer;
    pub fn serialize<S: Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let invalid = |location: String, field: String, message: String| PolicyError::Invalid {
            path: path.to_owned(),
            location,
            field,
            message,
        };
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let doc: Document = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let location = inner
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            invalid(location, field, inner.to_string())
        })?;
        let field_err = |field: String, message: String| invalid(String::new(), field, message);
        if doc.api_version != API_VERSION {
            return Err(field_err(
                "apiVersion".into(),
                format!("must be {API_VERSION}, not `{}`", doc.api_version),
            ));
        }
        if doc.kind != KIND {
            return Err(field_err(
                "kind".into(),
                format!("must be {KIND}, not `{}`", doc.kind),
            ));
        }
        let mut identities = Vec::new();
        for (i, m) in doc.spec.identities.iter().enumerate() {
            let subjects = m
                .subjects
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    Subject::compile(s).map_err(|e| {
                        field_err(format!("spec.identities[{i}].subjects[{j}]"), e.to_string())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if subjects.is_empty() {
                return Err(field_err(
                    format!("spec.identities[{i}].subjects"),
                    "at least one subject".into(),
                ));
            }
            if m.impersonate.user.is_empty() || m.impersonate.user.starts_with("system:") {
                return Err(field_err(
                    format!("spec.identities[{i}].impersonate.user"),
                    "must be a non-empty user outside the reserved `system:` names".into(),
                ));
            }
            if m.impersonate.groups.iter().any(|g| g == "system:masters") {
                return Err(field_err(
                    format!("spec.identities[{i}].impersonate.groups"),
                    "system:masters bypasses RBAC and is refused".into(),
                ));
            }
            identities.push((subjects, m.impersonate.clone()));
        }
        let mut rules = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, r) in doc.spec.rules.into_iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{i}].{f}");
            if r.name.is_empty() || !names.insert(r.name.clone()) {
                return Err(field_err(at("name"), "must be non-empty and unique".into()));
            }
            if r.verbs.is_empty() {
                return Err(field_err(at("verbs"), "at least one verb (or `*`)".into()));
            }
            match (r.resources.is_empty(), r.non_resource_urls.is_empty()) {
                (true, true) => {
                    return Err(field_err(
                        at("resources"),
                        "a rule needs resources or nonResourceURLs".into(),
                    ));
                }
                (false, false) => {
                    return Err(field_err(
                        at("nonResourceURLs"),
                        "a rule has either resources or nonResourceURLs, not both".into(),
                    ));
                }
                (false, true) if r.api_groups.is_empty() => {
                    return Err(field_err(
                        at("apiGroups"),
                        "resource rules need apiGroups (\"\" is the core group, \"*\" any)".into(),
                    ));
                }
                _ => {}
            }
            let compile_all = |f: &str, v: &[String]| {
                v.iter()
                    .map(|p| glob(p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| field_err(at(f), e.to_string()))
            };
            let approval = match (r.action, r.approval) {
                (Action::Approve, Some(a)) => {
                    let dur = |f: &str, s: &str| {
                        humantime::parse_duration(s)
                            .map_err(|e| field_err(at(f), format!("`{s}`: {e}")))
                    };
                    let hold = dur("approval.holdTime", &a.hold_time)?;
                    if hold > MAX_HOLD {
                        return Err(field_err(
                            at("approval.holdTime"),
                            format!("at most {}s", MAX_HOLD.as_secs()),
                        ));
                    }
                    let grant_ttl = dur("approval.grantTTL", &a.grant_ttl)?;
                    if grant_ttl.is_zero() {
                        return Err(field_err(at("approval.grantTTL"), "must be > 0".into()));
                    }
                    let approvers = a.approvers.clone();
                    for (j, s) in approvers.iter().enumerate() {
                        Subject::compile(s).map_err(|e| {
                            field_err(at(&format!("approval.approvers[{j}]")), e.to_string())
                        })?;
                    }
                    Some(ApprovalSpec {
                        approvers,
                        hold,
                        grant_ttl,
                    })
                }
                (Action::Approve, None) => {
                    return Err(field_err(
                        at("approval"),
                        "action approve needs an approval block (approvers, holdTime, grantTTL)"
                            .into(),
                    ));
                }
                (_, Some(_)) => {
                    return Err(field_err(
                        at("approval"),
                        "only rules with action approve take an approval block".into(),
                    ));
                }
                (_, None) => None,
            };
            let mut conditions = Vec::new();
            for (j, c) in r.conditions.iter().enumerate() {
                let name = c.name.clone().unwrap_or_else(|| format!("{}[{j}]", r.name));
                conditions.push(Condition::compile(name, &c.expression).map_err(|e| {
                    field_err(at(&format!("conditions[{j}].expression")), e.to_string())
                })?);
            }
            if !conditions.is_empty() && !r.non_resource_urls.is_empty() {
                return Err(field_err(
                    at("conditions"),
                    "conditions are for resource rules (non-resource URLs have no objects)".into(),
                ));
            }
            rules.push(Rule {
                conditions,
                subjects: r
                    .subjects
                    .iter()
                    .enumerate()
                    .map(|(j, s)| {
                        Subject::compile(s)
                            .map_err(|e| field_err(at(&format!("subjects[{j}]")), e.to_string()))
                    })
                    .collect::<Result<_, _>>()?,
                resource_names: compile_all("resourceNames", &r.resource_names)?,
                namespaces: compile_all("namespaces", &r.namespaces)?,
                non_resource_urls: compile_all("nonResourceURLs", &r.non_resource_urls)?,
                name: r.name,
                verbs: r.verbs,
                api_groups: r.api_groups,
                resources: r.resources,
                action: r.action,
                message: r.message,
                approval,
            });
        }
        Ok(Policy {
            name: doc.metadata.name,
            identities,
            rules,
        })
    }
}
