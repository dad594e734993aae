//! Kubernetes RBAC from a policy (`portcullis rbac`), so RBAC stays the second line
//! without being written twice:
//!
//! - for each scoped identity the policy impersonates, the rules its unconditional
//!   `allow` and `approve` rules grant (cluster-wide, or per namespace when a rule
//!   names them; `deny` grants nothing, RBAC being additive; a rule with conditions
//!   only narrows what the others grant), bound to that user;
//! - for the daemon, impersonation of exactly those users and groups — with
//!   constrained impersonation (Kubernetes 1.36+: `impersonate:user-info` on the
//!   names, and `impersonate-on:user-info:<verb>` only for what the policy may allow),
//!   or, with `legacy`, the classic `impersonate` verb on the names.
use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::{Value, json};

use super::document::{Action, Scoped, SubjectSpec};

#[derive(Deserialize)]
struct Doc {
    spec: Spec,
}

#[derive(Deserialize)]
struct Spec {
    #[serde(default)]
    identities: Vec<Identity>,
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

#[derive(Deserialize)]
struct Identity {
    subjects: Vec<SubjectSpec>,
    impersonate: Scoped,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleDoc {
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
    /// Only whether there are any: a conditional rule narrows what others grant.
    #[serde(default)]
    conditions: Vec<serde_yaml_ng::Value>,
    action: Action,
}

/// Who the daemon is and how it may impersonate.
pub struct Target {
    pub daemon_namespace: String,
    pub daemon_service_account: String,
    pub legacy: bool,
}

/// The verbs `*` stands for when it must be spelled out.
const VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// An RBAC rule from a policy rule (glob resource names cannot be expressed: the
/// restriction is then left to the policy).
fn rbac_rule(r: &RuleDoc, verbs: &[String]) -> Value {
    if !r.non_resource_urls.is_empty() {
        return json!({"nonResourceURLs": r.non_resource_urls, "verbs": verbs});
    }
    let mut rule = json!({
        "apiGroups": r.api_groups,
        "resources": r.resources,
        "verbs": verbs,
    });
    if !r.resource_names.is_empty() && !r.resource_names.iter().any(|n| is_glob(n)) {
        rule["resourceNames"] = json!(r.resource_names);
    }
    rule
}

fn applies(rule: &RuleDoc, id: &Identity) -> bool {
    rule.subjects.is_empty() || rule.subjects.iter().any(|s| id.subjects.contains(s))
}

fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ':' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

fn meta(name: &str, ns: Option<&str>) -> Value {
    let mut m = json!({"name": name, "labels": {"app.kubernetes.io/part-of": "portcullis"}});
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

/// The RBAC objects for `policy_yaml`, as a list of JSON objects.
pub fn generate(policy_yaml: &str, t: &Target) -> Result<Vec<Value>, serde_yaml_ng::Error> {
    let doc: Doc = serde_yaml_ng::from_str(policy_yaml)?;
    let mut out = Vec::new();
    let granting: Vec<&RuleDoc> = doc
        .spec
        .rules
        .iter()
        // A rule with conditions grants nothing to RBAC: it guards a part of what
        // unconditional rules allow (e.g. "changing ownerReferences of anything waits
        // for a human"), and RBAC cannot express its condition, so granting its whole
        // scope would widen the second line far past what the policy allows. A
        // conditional rule that alone allows something is refused upstream until an
        // unconditional rule (or hand-written RBAC) grants it.
        .filter(|r| matches!(r.action, Action::Allow | Action::Approve) && r.conditions.is_empty())
        .collect();
    let mut users = BTreeSet::new();
    let mut groups = BTreeSet::new();
    let mut daemon_rules: Vec<Value> = Vec::new();
    for id in &doc.spec.identities {
        let user = &id.impersonate.user;
        users.insert(user.clone());
        groups.extend(id.impersonate.groups.iter().cloned());
        let mut cluster_rules = Vec::new();
        let mut ns_rules: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
        for r in granting.iter().filter(|r| applies(r, id)) {
            let rule = rbac_rule(r, &r.verbs);
            if r.namespaces.is_empty()
                || r.namespaces.iter().any(|n| is_glob(n))
                || !r.non_resource_urls.is_empty()
            {
                cluster_rules.push(rule);
            } else {
                for n in &r.namespaces {
                    ns_rules.entry(n.clone()).or_default().push(rule.clone());
                }
            }
            if !t.legacy {
                let verbs: Vec<String> = r
                    .verbs
                    .iter()
                    .flat_map(|v| {
                        if v == "*" {
                            VERBS.iter().map(|s| s.to_string()).collect::<Vec<_>>()
                        } else {
                            vec![v.clone()]
                        }
                    })
                    .map(|v| format!("impersonate-on:user-info:{v}"))
                    .collect();
                let mut d = rbac_rule(r, &verbs);
                // The daemon's secondary check is on the request's own resource; a
                // name restriction is the policy's business.
                if let Some(o) = d.as_object_mut() {
                    o.remove("resourceNames");
                }
                daemon_rules.push(d);
            }
            let _ = &r.name;
        }
        let name = format!("portcullis:scoped:{}", safe(user));
        let subject =
            json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]);
        if !cluster_rules.is_empty() {
            out.push(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": meta(&name, None), "rules": cluster_rules}),
            );
            out.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": meta(&name, None),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": subject}));
        }
        for (ns, rules) in ns_rules {
            out.push(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": meta(&name, Some(&ns)), "rules": rules}),
            );
            out.push(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": meta(&name, Some(&ns)),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": subject}),
            );
        }
    }
    let (group, verb) = if t.legacy {
        ("", "impersonate")
    } else {
        ("authentication.k8s.io", "impersonate:user-info")
    };
    let mut rules = vec![
        json!({"apiGroups": [group], "resources": ["users"], "verbs": [verb], "resourceNames": users}),
    ];
    if !groups.is_empty() {
        rules.push(json!({"apiGroups": [group], "resources": ["groups"], "verbs": [verb], "resourceNames": groups}));
    }
    rules.extend(daemon_rules);
    let name = "portcullis:daemon-impersonation";
    out.push(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": meta(name, None), "rules": rules}),
    );
    out.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": meta(name, None),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": t.daemon_service_account, "namespace": t.daemon_namespace}]}));
    Ok(out)
}

/// The objects as one YAML stream, with a header saying where they come from.
pub fn to_yaml(objects: &[Value], source: &str) -> Result<String, serde_yaml_ng::Error> {
    let mut s = format!(
        "# Generated by `portcullis policy rbac` from {source}: do not edit; regenerate.\n"
    );
    for o in objects {
        s.push_str("---\n");
        s.push_str(&serde_yaml_ng::to_string(o)?);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
spec:
  identities:
  - subjects: [{kind: Group, name: "system:serviceaccounts"}]
    impersonate: {user: "portcullis:agent", groups: ["portcullis:agents"]}
  rules:
  - {name: reads, verbs: [get, list], apiGroups: [""], resources: [pods], action: allow}
  - {name: ns-writes, verbs: [create], apiGroups: [""], resources: [configmaps], namespaces: [dev], action: approve}
  - {name: held, verbs: [delete], apiGroups: [""], resources: [configmaps], resourceNames: ["held-*"], action: approve}
  - {name: no, verbs: ["*"], apiGroups: [""], resources: [secrets], action: deny}
  - {name: disc, verbs: [get], nonResourceURLs: ["/api"], action: allow}
"#;

    #[test]
    fn scoped_identity_rbac_and_constrained_impersonation() {
        let t = Target {
            daemon_namespace: "portcullis-system".into(),
            daemon_service_account: "portcullis-daemon".into(),
            legacy: false,
        };
        let o = generate(POLICY, &t).unwrap();
        let kinds: Vec<&str> = o.iter().map(|x| x["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            vec![
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "ClusterRole",
                "ClusterRoleBinding"
            ]
        );
        let text = serde_json::to_string(&o).unwrap();
        assert!(!text.contains("secrets"), "a deny rule granted something");
        assert_eq!(o[2]["metadata"]["namespace"], "dev");
        // Glob names are left to the policy, plain names kept.
        assert!(o[0]["rules"][1].get("resourceNames").is_none());
        let d = &o[4]["rules"];
        assert_eq!(d[0]["verbs"][0], "impersonate:user-info");
        assert_eq!(d[0]["resourceNames"][0], "portcullis:agent");
        assert_eq!(d[1]["resourceNames"][0], "portcullis:agents");
        assert!(text.contains("impersonate-on:user-info:list"));
        let legacy = generate(POLICY, &Target { legacy: true, ..t }).unwrap();
        let d = &legacy[4]["rules"];
        assert_eq!(d[0]["verbs"][0], "impersonate");
        assert_eq!(d.as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_shipped_rbac_is_generated_from_the_shipped_policy() {
        let policy = include_str!("../../../deploy/policy/coding-agents.yaml");
        let t = Target {
            daemon_namespace: "portcullis-system".into(),
            daemon_service_account: "portcullis-daemon".into(),
            legacy: false,
        };
        let want = to_yaml(
            &generate(policy, &t).unwrap(),
            "deploy/policy/coding-agents.yaml",
        )
        .unwrap();
        let have = include_str!("../../../deploy/cluster/rbac-policy.yaml");
        assert!(
            have == want,
            "deploy/cluster/rbac-policy.yaml is stale: regenerate with `portcullis policy rbac --policy deploy/policy/coding-agents.yaml > deploy/cluster/rbac-policy.yaml`"
        );
    }
}
