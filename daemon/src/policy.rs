//! The policy document: which subjects may do what, which need a human's approval, and
//! which upstream identity each subject is impersonated as.
//!
//! ```yaml
//! apiVersion: portcullis.dev/v1alpha1
//! kind: AgentPolicy
//! metadata: {name: coding-agents}
//! spec:
//!   identities:        # subject -> the scoped identity the daemon impersonates
//!   - subjects: [{kind: Group, name: system:serviceaccounts}]
//!     impersonate: {user: "portcullis:agent", groups: ["portcullis:agents"]}
//!   rules:
//!   - name: reads
//!     verbs: [get, list, watch]
//!     apiGroups: ["*"]
//!     resources: ["*"]
//!     action: allow
//! ```
//!
//! Matching follows RBAC: `*` for all verbs/groups/resources, `pods/exec` for a
//! subresource, `pods/*` and `*/scale` for families; resourceNames, namespaces and
//! nonResourceURLs are globs. A rule without `subjects` applies to everyone. Every
//! matching rule counts: deny beats approve beats allow, and no match is a deny.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::{identity::Identity, request_info::RequestInfo};

pub const API_VERSION: &str = "portcullis.dev/v1alpha1";
pub const KIND: &str = "AgentPolicy";
/// Longest a request may be held waiting for a human.
pub const MAX_HOLD: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {location}`{field}`: {message}")]
    Invalid {
        path: PathBuf,
        location: String,
        field: String,
        message: String,
    },
}

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

#[derive(Debug)]
struct Subject {
    kind: SubjectKind,
    name: GlobMatcher,
    namespace: Option<GlobMatcher>,
}

impl Subject {
    fn compile(s: &SubjectSpec) -> Result<Subject, String> {
        if s.namespace.is_some() && s.kind != SubjectKind::ServiceAccount {
            return Err("`namespace` is only for kind ServiceAccount".into());
        }
        Ok(Subject {
            kind: s.kind,
            name: glob(&s.name)?,
            namespace: s.namespace.as_deref().map(glob).transpose()?,
        })
    }

    fn matches(&self, id: &Identity) -> bool {
        match self.kind {
            SubjectKind::User => self.name.is_match(&id.username),
            SubjectKind::Group => id.groups.iter().any(|g| self.name.is_match(g)),
            SubjectKind::ServiceAccount => {
                let Some(rest) = id.username.strip_prefix("system:serviceaccount:") else {
                    return false;
                };
                let Some((ns, name)) = rest.split_once(':') else {
                    return false;
                };
                self.name.is_match(name) && self.namespace.as_ref().is_none_or(|m| m.is_match(ns))
            }
        }
    }
}

fn glob(p: &str) -> Result<GlobMatcher, String> {
    Glob::new(p)
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("`{p}` is not a valid glob: {e}"))
}

#[derive(Debug)]
struct Rule {
    name: String,
    subjects: Vec<Subject>,
    verbs: Vec<String>,
    api_groups: Vec<String>,
    resources: Vec<String>,
    resource_names: Vec<GlobMatcher>,
    namespaces: Vec<GlobMatcher>,
    non_resource_urls: Vec<GlobMatcher>,
    action: Action,
    message: Option<String>,
    approval: Option<ApprovalSpec>,
}

fn any_or(list: &[String], v: &str) -> bool {
    list.iter().any(|x| x == "*" || x == v)
}

impl Rule {
    fn matches(&self, id: &Identity, r: &RequestInfo) -> bool {
        if !self.subjects.is_empty() && !self.subjects.iter().any(|s| s.matches(id)) {
            return false;
        }
        if !any_or(&self.verbs, &r.verb) {
            return false;
        }
        if !r.is_resource_request {
            return self.non_resource_urls.iter().any(|m| m.is_match(&r.path));
        }
        if self.resources.is_empty() || !any_or(&self.api_groups, &r.api_group) {
            return false;
        }
        if !self.resources.iter().any(|p| resource_matches(p, r)) {
            return false;
        }
        if !self.resource_names.is_empty()
            && !self.resource_names.iter().any(|m| m.is_match(&r.name))
        {
            return false;
        }
        if !self.namespaces.is_empty()
            && (r.namespace.is_empty() || !self.namespaces.iter().any(|m| m.is_match(&r.namespace)))
        {
            return false;
        }
        true
    }
}

/// RBAC's resource matching: `*`, `res`, `res/sub`, `res/*`, `*/sub`.
fn resource_matches(pattern: &str, r: &RequestInfo) -> bool {
    if pattern == "*" {
        return true;
    }
    let (pr, ps) = match pattern.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (pattern, None),
    };
    let res_ok = pr == "*" || pr == r.resource;
    match ps {
        None => res_ok && pr != "*" && r.subresource.is_empty(),
        Some("*") => res_ok && !r.subresource.is_empty(),
        Some(s) => res_ok && s == r.subresource,
    }
}

/// One decision, with what explains it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The deciding rule (None: nothing matched).
    pub rule: Option<String>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
}

/// A loaded, compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub name: String,
    identities: Vec<(Vec<Subject>, Scoped)>,
    rules: Vec<Rule>,
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
                    Subject::compile(s)
                        .map_err(|e| field_err(format!("spec.identities[{i}].subjects[{j}]"), e))
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
                    .map_err(|e| field_err(at(f), e))
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
                        Subject::compile(s)
                            .map_err(|e| field_err(at(&format!("approval.approvers[{j}]")), e))?;
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
            rules.push(Rule {
                subjects: r
                    .subjects
                    .iter()
                    .enumerate()
                    .map(|(j, s)| {
                        Subject::compile(s).map_err(|e| field_err(at(&format!("subjects[{j}]")), e))
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

    /// deny > approve > allow; nothing matching is a deny.
    pub fn decide(&self, id: &Identity, r: &RequestInfo) -> Decision {
        let mut best: Option<&Rule> = None;
        for rule in self.rules.iter().filter(|rule| rule.matches(id, r)) {
            if best.is_none_or(|b| rule.action > b.action) {
                best = Some(rule);
            }
            if rule.action == Action::Deny {
                break;
            }
        }
        match best {
            Some(rule) => Decision {
                action: rule.action,
                rule: Some(rule.name.clone()),
                message: rule.message.clone().unwrap_or_else(|| match rule.action {
                    Action::Allow => format!("allowed by rule {}", rule.name),
                    Action::Approve => format!("rule {} requires approval", rule.name),
                    Action::Deny => format!("denied by rule {}", rule.name),
                }),
                approval: rule.approval.clone(),
            },
            None => Decision {
                action: Action::Deny,
                rule: None,
                message: "no policy rule allows this request".into(),
                approval: None,
            },
        }
    }

    /// The upstream identity for a subject (first matching mapping).
    pub fn scoped_identity(&self, id: &Identity) -> Option<&Scoped> {
        self.identities
            .iter()
            .find(|(subjects, _)| subjects.iter().any(|s| s.matches(id)))
            .map(|(_, scoped)| scoped)
    }

    /// Whether `approver` is one of `spec`'s approvers (empty list: anyone).
    pub fn is_listed_approver(spec: &[SubjectSpec], approver: &Identity) -> bool {
        spec.is_empty()
            || spec
                .iter()
                .filter_map(|s| Subject::compile(s).ok())
                .any(|s| s.matches(approver))
    }
}

/// The live policy: swapped atomically when the file changes and parses; a bad edit
/// keeps the previous policy and is reported.
pub struct PolicyHandle {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
    last_error: RwLock<Option<String>>,
}

impl PolicyHandle {
    pub fn load(path: &Path) -> Result<Arc<PolicyHandle>, PolicyError> {
        let p = Policy::load(path)?;
        info!(path = %path.display(), name = %p.name, rules = p.rules.len(), "policy loaded");
        Ok(Arc::new(PolicyHandle {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(p)),
            last_error: RwLock::new(None),
        }))
    }

    pub fn get(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rereads the file; true if a new policy is in force.
    pub fn reload(&self) -> bool {
        match Policy::load(&self.path) {
            Ok(p) => {
                info!(path = %self.path.display(), name = %p.name, rules = p.rules.len(), "policy reloaded");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
                *self.last_error.write().unwrap_or_else(|p| p.into_inner()) = None;
                true
            }
            Err(e) => {
                error!(error = %e, "policy change refused; the previous policy stays in force");
                *self.last_error.write().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                false
            }
        }
    }

    /// Polls the file (content hash through symlinks, as ConfigMap mounts swap them)
    /// and reloads on change.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let fingerprint = |p: &Path| -> Option<(SystemTime, Vec<u8>)> {
            let m = std::fs::metadata(p).ok()?;
            let text = std::fs::read(p).ok()?;
            use sha2::Digest;
            Some((m.modified().ok()?, sha2::Sha256::digest(&text).to_vec()))
        };
        let mut last = fingerprint(&self.path).map(|f| f.1);
        loop {
            tokio::time::sleep(every).await;
            let now = fingerprint(&self.path).map(|f| f.1);
            if now.is_some() && now != last {
                last = now;
                self.reload();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_info;

    pub fn sa(ns: &str, name: &str) -> Identity {
        Identity {
            issuer: "k8s".into(),
            username: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
            ],
            token_id: "t".into(),
            expires_at: 0,
            token_pod: None,
            kernel_pod: None,
        }
    }

    fn req(method: &str, path: &str) -> RequestInfo {
        let (p, q) = path.split_once('?').unwrap_or((path, ""));
        request_info::resolve(method, p, (!q.is_empty()).then_some(q)).unwrap()
    }

    const DOC: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: t}
spec:
  identities:
  - subjects: [{kind: ServiceAccount, namespace: e2e, name: "*"}]
    impersonate: {user: "portcullis:agent", groups: ["portcullis:agents"]}
  rules:
  - name: reads
    verbs: [get, list, watch]
    apiGroups: ["*"]
    resources: ["*"]
    action: allow
  - name: cm-writes
    subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}]
    verbs: [create, update, patch]
    apiGroups: [""]
    resources: [configmaps]
    namespaces: ["e2e"]
    action: allow
  - name: exec
    verbs: ["*"]
    apiGroups: [""]
    resources: ["pods/exec", "pods/attach", "pods/portforward", "*/proxy"]
    action: deny
    message: interactive access is not for agents
  - name: deletes
    verbs: [delete]
    apiGroups: [""]
    resources: [configmaps]
    resourceNames: ["keep-*"]
    action: approve
    approval: {approvers: [{kind: Group, name: oncall}], holdTime: 30s, grantTTL: 5m}
  - name: health
    verbs: [get]
    nonResourceURLs: ["/healthz", "/version", "/api*"]
    action: allow
"#;

    fn policy() -> Policy {
        Policy::parse(DOC, Path::new("t.yaml")).unwrap()
    }

    #[test]
    fn decision_table() {
        let p = policy();
        let agent = sa("e2e", "agent");
        let other = sa("prod", "bot");
        let cases: &[(&Identity, &str, &str, Action, Option<&str>)] = &[
            (
                &agent,
                "GET",
                "/api/v1/namespaces/e2e/pods",
                Action::Allow,
                Some("reads"),
            ),
            (
                &agent,
                "GET",
                "/apis/apps/v1/deployments",
                Action::Allow,
                Some("reads"),
            ),
            (
                &agent,
                "POST",
                "/api/v1/namespaces/e2e/configmaps",
                Action::Allow,
                Some("cm-writes"),
            ),
            (
                &other,
                "POST",
                "/api/v1/namespaces/e2e/configmaps",
                Action::Deny,
                None,
            ),
            (
                &agent,
                "POST",
                "/api/v1/namespaces/prod/configmaps",
                Action::Deny,
                None,
            ),
            (
                &agent,
                "POST",
                "/api/v1/namespaces/e2e/pods/w/exec",
                Action::Deny,
                Some("exec"),
            ),
            // exec over WebSocket is a GET: reads would allow it, deny wins.
            (
                &agent,
                "GET",
                "/api/v1/namespaces/e2e/pods/w/exec?command=sh",
                Action::Deny,
                Some("exec"),
            ),
            (
                &agent,
                "GET",
                "/api/v1/namespaces/e2e/services/s/proxy/x",
                Action::Deny,
                Some("exec"),
            ),
            (
                &agent,
                "DELETE",
                "/api/v1/namespaces/e2e/configmaps/keep-a",
                Action::Approve,
                Some("deletes"),
            ),
            (
                &agent,
                "DELETE",
                "/api/v1/namespaces/e2e/configmaps/other",
                Action::Deny,
                None,
            ),
            (&agent, "GET", "/healthz", Action::Allow, Some("health")),
            (&agent, "GET", "/apis", Action::Allow, Some("health")),
            (&agent, "GET", "/metrics", Action::Deny, None),
            (
                &agent,
                "GET",
                "/api/v1/namespaces/e2e/pods/w/log",
                Action::Allow,
                Some("reads"),
            ),
        ];
        for (id, m, path, action, rule) in cases {
            let d = p.decide(id, &req(m, path));
            assert_eq!(
                (d.action, d.rule.as_deref()),
                (*action, *rule),
                "{m} {path} as {}",
                id.username
            );
        }
        let d = p.decide(
            &agent,
            &req("DELETE", "/api/v1/namespaces/e2e/configmaps/keep-a"),
        );
        let a = d.approval.unwrap();
        assert_eq!((a.hold.as_secs(), a.grant_ttl.as_secs()), (30, 300));
    }

    #[test]
    fn subjects_map_to_scoped_identities() {
        let p = policy();
        assert_eq!(
            p.scoped_identity(&sa("e2e", "x")).map(|s| s.user.as_str()),
            Some("portcullis:agent")
        );
        assert!(p.scoped_identity(&sa("prod", "x")).is_none());
    }

    #[test]
    fn resource_patterns_follow_rbac() {
        let r = req("GET", "/apis/apps/v1/namespaces/a/deployments/d/scale");
        assert!(resource_matches("*", &r));
        assert!(resource_matches("deployments/scale", &r));
        assert!(resource_matches("*/scale", &r));
        assert!(resource_matches("deployments/*", &r));
        assert!(!resource_matches("deployments", &r));
        let plain = req("GET", "/apis/apps/v1/namespaces/a/deployments/d");
        assert!(resource_matches("deployments", &plain));
        assert!(!resource_matches("deployments/*", &plain));
    }

    fn err(doc: &str) -> String {
        Policy::parse(doc, Path::new("p.yaml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn invalid_documents_name_the_field_and_line() {
        let bad_action = DOC.replace(
            "action: allow\n  - name: cm-writes",
            "action: alow\n  - name: cm-writes",
        );
        let e = err(&bad_action);
        assert!(
            e.contains("spec.rules[0].action") && e.contains("line "),
            "{e}"
        );
        let e = err(&DOC.replace("holdTime: 30s", "holdTime: 30 parsecs"));
        assert!(e.contains("spec.rules[3].approval.holdTime"), "{e}");
        let e = err(&DOC.replace("portcullis.dev/v1alpha1", "v1"));
        assert!(e.contains("apiVersion"), "{e}");
        let e = err(&DOC.replace("\"portcullis:agents\"", "system:masters"));
        assert!(e.contains("system:masters"), "{e}");
        let e = err(&DOC.replace("    approval: {approvers", "    approvalx: {approvers"));
        assert!(e.contains("approvalx"), "{e}");
    }

    #[test]
    fn the_shipped_default_policy_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy/coding-agents.yaml");
        Policy::load(&p).unwrap();
    }
}
