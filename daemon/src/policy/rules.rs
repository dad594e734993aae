//! The compiled policy: subjects, rules and their RBAC-style matching, conditions on
//! what a request does, and the decision (deny beats approve beats allow; no match is
//! a deny).
//!
//! Rules that restrict (`deny`, `approve`) and name objects (`namespaces`,
//! `resourceNames`) also match collection requests that could include those objects:
//! a list, watch or deletecollection across namespaces, or of a whole resource,
//! unless a field selector pins the namespace or name to one they do not name. A
//! create names its object in the body: such rules match a create whose name is not
//! known. Rules that allow stay exact, as RBAC's are.
use globset::{Glob, GlobMatcher};
use serde::Serialize;

use super::{
    condition::{Condition, Inputs, Needs, Outcome},
    document::{Action, ApprovalSpec, Scoped, SubjectKind, SubjectSpec},
    input::Request,
};
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
    pub(super) conditions: Vec<Condition>,
}

fn any_or(list: &[String], v: &str) -> bool {
    list.iter().any(|x| x == "*" || x == v)
}

impl Rule {
    /// Whether the rule's subjects, verbs, resources, names and namespaces cover the
    /// request (its conditions aside).
    fn covers(&self, u: &UserInfo, r: &Request) -> bool {
        let info = r.info;
        if !self.subjects.is_empty() && !self.subjects.iter().any(|s| s.matches(u)) {
            return false;
        }
        if !any_or(&self.verbs, &info.verb) {
            return false;
        }
        if !info.is_resource_request {
            return self
                .non_resource_urls
                .iter()
                .any(|m| m.is_match(&info.path));
        }
        if self.resources.is_empty() || !any_or(&self.api_groups, &info.api_group) {
            return false;
        }
        if !self.resources.iter().any(|p| resource_matches(p, info)) {
            return false;
        }
        let restricts = self.action != Action::Allow;
        if !self.resource_names.is_empty() {
            let name = r.object_name();
            match name {
                Some(n) => {
                    if !self.resource_names.iter().any(|m| m.is_match(n)) {
                        return false;
                    }
                }
                // A collection, or a create whose name the body does not say: it
                // could be one of the named objects.
                None if restricts && r.could_name_any() => {}
                None => return false,
            }
        }
        if !self.namespaces.is_empty() {
            match r.namespace() {
                Some(ns) => {
                    if !self.namespaces.iter().any(|m| m.is_match(&ns)) {
                        return false;
                    }
                }
                // Across namespaces: could include objects in the named ones.
                None if restricts && r.spans_namespaces() => {}
                None => return false,
            }
        }
        true
    }

    /// What its conditions read.
    fn needs(&self) -> Needs {
        let mut n = Needs::default();
        for c in &self.conditions {
            n.add(c.needs);
        }
        n
    }

    /// Whether every condition holds. An error counts against the request: a
    /// restricting rule matches, an allowing one does not; the error is kept for the
    /// decision's message.
    fn conditions_hold(&self, inputs: &Inputs, errors: &mut Vec<String>) -> bool {
        for c in &self.conditions {
            match c.eval(inputs) {
                Outcome::True => {}
                Outcome::False => return false,
                Outcome::Error(e) => {
                    if self.action == Action::Allow {
                        return false;
                    }
                    errors.push(e);
                }
            }
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
    /// What the rules that could decide this request read of its content (nothing,
    /// for most requests: then the gate fetches nothing).
    pub fn needs(&self, r: &Request) -> Needs {
        let mut n = Needs::default();
        for rule in self.rules.iter().filter(|rule| rule.covers(r.user, r)) {
            n.add(rule.needs());
        }
        n
    }

    /// deny > approve > allow; nothing matching is a deny. `inputs` is what the
    /// conditions read (see [`Request::inputs`]).
    pub fn decide(&self, r: &Request, inputs: &Inputs) -> Decision {
        let mut best: Option<(&Rule, Vec<String>)> = None;
        for rule in self.rules.iter().filter(|rule| rule.covers(r.user, r)) {
            if best.as_ref().is_some_and(|(b, _)| rule.action <= b.action) {
                continue;
            }
            let mut errors = Vec::new();
            if !rule.conditions_hold(inputs, &mut errors) {
                continue;
            }
            let deny = rule.action == Action::Deny;
            best = Some((rule, errors));
            if deny {
                break;
            }
        }
        match best {
            Some((rule, errors)) => {
                let mut message = rule.message.clone().unwrap_or_else(|| match rule.action {
                    Action::Allow => format!("allowed by rule {}", rule.name),
                    Action::Approve => format!("rule {} requires approval", rule.name),
                    Action::Deny => format!("denied by rule {}", rule.name),
                });
                if !errors.is_empty() {
                    message = format!(
                        "{message} (its conditions could not be evaluated, which counts against the request: {})",
                        errors.join("; ")
                    );
                }
                Decision {
                    action: rule.action,
                    rule: Some(rule.name.clone()),
                    message,
                    approval: rule.approval.clone(),
                }
            }
            None => Decision {
                action: Action::Deny,
                rule: None,
                message: "no policy rule allows this request".into(),
                approval: None,
            },
        }
    }

    /// [`Policy::decide`] for a request whose content is not at hand: conditions that
    /// read `object` or `oldObject` count as not evaluable.
    pub fn decide_plain(&self, u: &UserInfo, info: &RequestInfo) -> Decision {
        let r = Request::new(u, info);
        self.decide(
            &r,
            &r.inputs(
                None,
                None,
                Some("the request's content is not known".into()),
            ),
        )
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
