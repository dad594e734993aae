//! The compiled policy: subjects, rules and their RBAC-style matching, and the
//! decision (deny beats approve beats allow; no match is a deny).
use globset::{Glob, GlobMatcher};
use serde::Serialize;

use super::document::{Action, ApprovalSpec, Scoped, SubjectKind, SubjectSpec};
use crate::k8s::{RequestInfo, UserInfo};

#[derive(Debug)]
pub(super) struct Subject {
    kind: SubjectKind,
    name: GlobMatcher,
    namespace: Option<GlobMatcher>,
}

impl Subject {
    pub(super) fn compile(s: &SubjectSpec) -> Result<Subject, SubjectError> {
        if s.namespace.is_some() && s.kind != SubjectKind::ServiceAccount {
            return Err(SubjectError::NamespaceNotForKind);
        }
        Ok(Subject {
            kind: s.kind,
            name: glob(&s.name)?,
            namespace: s.namespace.as_deref().map(glob).transpose()?,
        })
    }

    fn matches(&self, u: &UserInfo) -> bool {
        match self.kind {
            SubjectKind::User => self.name.is_match(&u.username),
            SubjectKind::Group => u.groups.iter().any(|g| self.name.is_match(g)),
            SubjectKind::ServiceAccount => {
                let Some((ns, name)) = u.service_account_name() else {
                    return false;
                };
                self.name.is_match(name) && self.namespace.as_ref().is_none_or(|m| m.is_match(ns))
            }
        }
    }
}

/// A subject entry or pattern that cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    #[error("`namespace` is only for kind ServiceAccount")]
    NamespaceNotForKind,
    #[error("`{pattern}` is not a valid glob: {source}")]
    Glob {
        pattern: String,
        #[source]
        source: globset::Error,
    },
}

pub(super) fn glob(p: &str) -> Result<GlobMatcher, SubjectError> {
    Glob::new(p)
        .map(|g| g.compile_matcher())
        .map_err(|source| SubjectError::Glob {
            pattern: p.to_owned(),
            source,
        })
}

#[derive(Debug)]
pub(super) struct Rule {
    pub(super) name: String,
    pub(super) subjects: Vec<Subject>,
    pub(super) verbs: Vec<String>,
    pub(super) api_groups: Vec<String>,
    pub(super) resources: Vec<String>,
    pub(super) resource_names: Vec<GlobMatcher>,
    pub(super) namespaces: Vec<GlobMatcher>,
    pub(super) non_resource_urls: Vec<GlobMatcher>,
    pub(super) action: Action,
    pub(super) message: Option<String>,
    pub(super) approval: Option<ApprovalSpec>,
}

fn any_or(list: &[String], v: &str) -> bool {
    list.iter().any(|x| x == "*" || x == v)
}

impl Rule {
    fn matches(&self, u: &UserInfo, r: &RequestInfo) -> bool {
        if !self.subjects.is_empty() && !self.subjects.iter().any(|s| s.matches(u)) {
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
pub(super) fn resource_matches(pattern: &str, r: &RequestInfo) -> bool {
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
    pub(super) identities: Vec<(Vec<Subject>, Scoped)>,
    pub(super) rules: Vec<Rule>,
}

impl Policy {
    /// deny > approve > allow; nothing matching is a deny.
    pub fn decide(&self, u: &UserInfo, r: &RequestInfo) -> Decision {
        let mut best: Option<&Rule> = None;
        for rule in self.rules.iter().filter(|rule| rule.matches(u, r)) {
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
    pub fn scoped_identity(&self, u: &UserInfo) -> Option<&Scoped> {
        self.identities
            .iter()
            .find(|(subjects, _)| subjects.iter().any(|s| s.matches(u)))
            .map(|(_, scoped)| scoped)
    }

    /// Whether `approver` is one of `spec`'s approvers (empty list: anyone).
    pub fn is_listed_approver(spec: &[SubjectSpec], approver: &UserInfo) -> bool {
        spec.is_empty()
            || spec
                .iter()
                .filter_map(|s| Subject::compile(s).ok())
                .any(|s| s.matches(approver))
    }
}
