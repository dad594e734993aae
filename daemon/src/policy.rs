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
//! `conditions` (CEL over `object`, `oldObject` and `request`, as in a
//! ValidatingAdmissionPolicy) narrow a rule to what the request does.
//!
//! By job: `document` (the YAML, parsed and checked with field paths and lines),
//! `rules` (subjects, rules, matching, the decision), `condition` (CEL conditions),
//! `library` (the Kubernetes functions conditions use), `input` (a request as policy
//! sees it), `handle` (the live policy, reloaded on change), `cases` (`portcullis
//! policy test`: decision tables).
mod cases;
mod condition;
mod document;
pub mod fuzz;
mod handle;
mod input;
mod library;
pub mod rbac;
mod rules;

use std::{path::PathBuf, time::Duration};

pub use cases::{CaseResult, CasesError, Report as CasesReport, run as run_cases};
pub use condition::{Inputs, Needs};
pub use document::{Action, ApprovalSpec, Scoped, SubjectKind, SubjectSpec};
pub use handle::PolicyHandle;
pub use input::Request;
pub use rules::{Decision, Policy};

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{rules::resource_matches, *};
    use crate::k8s::{self, RequestInfo, UserInfo};

    pub fn sa(ns: &str, name: &str) -> UserInfo {
        UserInfo::service_account(ns, name)
    }

    fn req(method: &str, path: &str) -> RequestInfo {
        let (p, q) = path.split_once('?').unwrap_or((path, ""));
        k8s::resolve(method, p, (!q.is_empty()).then_some(q)).unwrap()
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
        let cases: &[(&UserInfo, &str, &str, Action, Option<&str>)] = &[
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
            let d = p.decide_plain(id, &req(m, path));
            assert_eq!(
                (d.action, d.rule.as_deref()),
                (*action, *rule),
                "{m} {path} as {}",
                id.username
            );
        }
        let d = p.decide_plain(
            &agent,
            &req("DELETE", "/api/v1/namespaces/e2e/configmaps/keep-a"),
        );
        let a = d.approval.unwrap();
        assert_eq!((a.hold.as_secs(), a.grant_ttl.as_secs()), (30, 300));
    }

    /// Restricting rules that name namespaces or objects decide collections that could
    /// include them; allowing rules stay exact.
    #[test]
    fn restricting_rules_cover_collections_that_could_include_their_objects() {
        let doc = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: c}
spec:
  rules:
  - {name: reads, verbs: [get, list, watch], apiGroups: ["*"], resources: ["*"], action: allow}
  - {name: writes, verbs: [create, delete, deletecollection], apiGroups: [""], resources: [configmaps], action: allow}
  - {name: prod-secrets, verbs: [get, list, watch], apiGroups: [""], resources: [secrets], namespaces: [prod], action: deny}
  - {name: keep, verbs: [get, list, watch, create, delete, deletecollection], apiGroups: [""], resources: [configmaps], resourceNames: ["keep-*"], action: approve,
     approval: {holdTime: 0s}}
  - {name: dev-only, verbs: [update], apiGroups: [""], resources: [configmaps], namespaces: [dev], action: allow}
"#;
        let p = Policy::parse(doc, Path::new("c.yaml")).unwrap();
        let agent = sa("e2e", "agent");
        let d = |m: &str, path: &str| p.decide_plain(&agent, &req(m, path));
        let with_query = |m: &str, path: &str, name: Option<&str>| {
            let info = req(m, path);
            let mut r = Request::new(&agent, &info);
            r.query = path.split_once('?').map_or("", |(_, q)| q);
            r.create_name = name.map(str::to_owned);
            p.decide(&r, &r.inputs(None, None, None))
        };
        for (m, path) in [
            ("GET", "/api/v1/secrets"),
            ("GET", "/api/v1/secrets?watch=true"),
            ("GET", "/api/v1/namespaces/prod/secrets/s"),
        ] {
            assert_eq!(
                d(m, path).rule.as_deref(),
                Some("prod-secrets"),
                "{m} {path}"
            );
        }
        // A field selector that pins another namespace (or this one) decides.
        let r = with_query(
            "GET",
            "/api/v1/secrets?fieldSelector=metadata.namespace%3Ddev",
            None,
        );
        assert_eq!(
            (r.action, r.rule.as_deref()),
            (Action::Allow, Some("reads"))
        );
        let r = with_query(
            "GET",
            "/api/v1/secrets?fieldSelector=metadata.namespace%3Dprod",
            None,
        );
        assert_eq!(r.rule.as_deref(), Some("prod-secrets"));
        assert_eq!(
            d("GET", "/api/v1/namespaces/dev/secrets").action,
            Action::Allow
        );
        // Cluster-scoped resources are in no namespace.
        assert_eq!(d("GET", "/api/v1/nodes").action, Action::Allow);
        // Names: collections and creates without a name could be `keep-*`.
        for (m, path) in [
            ("GET", "/api/v1/namespaces/e2e/configmaps"),
            ("GET", "/api/v1/configmaps?watch=1"),
            ("DELETE", "/api/v1/namespaces/e2e/configmaps"),
            ("POST", "/api/v1/namespaces/e2e/configmaps"),
            ("DELETE", "/api/v1/namespaces/e2e/configmaps/keep-a"),
        ] {
            assert_eq!(d(m, path).action, Action::Approve, "{m} {path}");
        }
        let r = with_query(
            "GET",
            "/api/v1/namespaces/e2e/configmaps?fieldSelector=metadata.name%3Dother",
            None,
        );
        assert_eq!(r.action, Action::Allow);
        let r = with_query("POST", "/api/v1/namespaces/e2e/configmaps", Some("other"));
        assert_eq!(r.action, Action::Allow);
        let r = with_query("POST", "/api/v1/namespaces/e2e/configmaps", Some("keep-b"));
        assert_eq!(r.action, Action::Approve);
        // An allowing rule with namespaces does not cover a request in no namespace.
        assert_eq!(
            d("PUT", "/api/v1/namespaces/dev/configmaps/x").action,
            Action::Allow
        );
        assert_eq!(
            d("PUT", "/api/v1/namespaces/e2e/configmaps/x").action,
            Action::Deny
        );
    }

    /// The `request` variable is made only when a condition is evaluated: reads meet
    /// no condition, and paid for it on every request.
    #[test]
    fn the_request_variable_is_made_only_for_a_condition() {
        let doc = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: c}
spec:
  rules:
  - name: reads
    verbs: [get, list, watch]
    apiGroups: [""]
    resources: ["*"]
    action: allow
  - name: own-namespace
    verbs: [create]
    apiGroups: [""]
    resources: [configmaps]
    conditions: [{expression: "request.namespace == request.serviceAccount.namespace"}]
    action: allow
"#;
        let p = Policy::parse(doc, Path::new("c.yaml")).expect("policy");
        let agent = sa("e2e", "agent");
        let get = req("GET", "/api/v1/namespaces/e2e/configmaps/x");
        let r = Request::new(&agent, &get);
        let inputs = r.inputs(None, None, None);
        assert_eq!(p.decide(&r, &inputs).action, Action::Allow);
        assert!(!inputs.request_made(), "a read built the request variable");
        for (ns, action) in [("e2e", Action::Allow), ("prod", Action::Deny)] {
            let create = req("POST", &format!("/api/v1/namespaces/{ns}/configmaps"));
            let r = Request::new(&agent, &create);
            let inputs = r.inputs(None, None, None);
            assert_eq!(p.decide(&r, &inputs).action, action, "create in {ns}");
            assert!(inputs.request_made(), "the condition read the request");
        }
    }

    #[test]
    fn conditions_decide_on_content_and_errors_count_against_the_request() {
        let doc = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: c}
spec:
  rules:
  - name: writes
    verbs: [create, update, patch]
    apiGroups: ["", apps]
    resources: ["*"]
    action: allow
  - name: small-only
    verbs: [create]
    apiGroups: [""]
    resources: [configmaps]
    conditions: [{expression: "size(object.data) < 2"}]
    action: allow
  - name: no-scale-to-zero
    verbs: [update, patch]
    apiGroups: [apps]
    resources: [deployments, deployments/scale]
    conditions:
    - {name: running, expression: "oldObject.spec.replicas > 0"}
    - {name: to-zero, expression: "object.spec.replicas == 0"}
    action: deny
    message: scaling a running workload to zero deletes its pods
"#;
        let p = Policy::parse(doc, Path::new("c.yaml")).unwrap();
        let agent = sa("e2e", "agent");
        let info = req("PATCH", "/apis/apps/v1/namespaces/e2e/deployments/web");
        let r = Request::new(&agent, &info);
        assert_eq!(
            p.needs(&r),
            Needs {
                object: true,
                old_object: true
            }
        );
        let dep = |n: i64| serde_json::json!({"spec": {"replicas": n}});
        let decide = |obj: serde_json::Value, old: serde_json::Value| {
            p.decide(&r, &r.inputs(Some(&obj), Some(&old), None))
        };
        assert_eq!(
            decide(dep(0), dep(3)).rule.as_deref(),
            Some("no-scale-to-zero")
        );
        assert_eq!(decide(dep(0), dep(0)).action, Action::Allow);
        assert_eq!(decide(dep(2), dep(3)).action, Action::Allow);
        // Not evaluable: a deny rule matches, and says why.
        let d = p.decide(&r, &r.inputs(None, None, Some("the dry run failed".into())));
        assert_eq!(d.action, Action::Deny);
        assert!(d.message.contains("the dry run failed"), "{}", d.message);
        let d = decide(serde_json::json!({}), dep(3));
        assert_eq!(d.action, Action::Deny, "{d:?}");
        // Reads need nothing.
        let get = req("GET", "/apis/apps/v1/namespaces/e2e/deployments/web");
        assert!(!p.needs(&Request::new(&agent, &get)).any());
        // Allow with an error: not allowed by that rule (here another rule allows).
        let cm = req("POST", "/api/v1/namespaces/e2e/configmaps");
        let r = Request::new(&agent, &cm);
        let d = p.decide(
            &r,
            &r.inputs(
                Some(&serde_json::json!({"data": {"a": "1", "b": "2"}})),
                None,
                None,
            ),
        );
        assert_eq!(d.rule.as_deref(), Some("writes"));
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
