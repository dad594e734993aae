//! `enrollment`: which pods on this node are agents. The daemon watches the pods
//! scheduled to `node_name` and enrolls the pod cgroup of every pod that carries
//! `pod_labels`, or whose namespace carries `namespace_labels` (each a set of
//! `key: value` that must all match; either set may be empty, not both).
use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    /// This node's name (`${NODE_NAME}` from the downward API).
    pub node_name: String,
    /// Namespaces with all of these labels hold agent pods.
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, String>,
    /// Pods with all of these labels are agents (in any namespace).
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
    /// Namespaces never enrolled, whatever their labels (the daemon's own).
    #[serde(default = "default_exempt")]
    pub exempt_namespaces: Vec<String>,
}

fn default_exempt() -> Vec<String> {
    vec!["portcullis-system".into(), "kube-system".into()]
}

impl Enrollment {
    fn matches(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
        !want.is_empty() && want.iter().all(|(k, v)| have.get(k) == Some(v))
    }

    /// Is a pod with these labels, in a namespace with those, an agent?
    pub fn selects(
        &self,
        namespace: &str,
        pod_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> bool {
        !self.exempt_namespaces.iter().any(|n| n == namespace)
            && (Self::matches(&self.pod_labels, pod_labels)
                || Self::matches(&self.namespace_labels, namespace_labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pod_or_namespace_labels_select() {
        let e = Enrollment {
            node_name: "n".into(),
            namespace_labels: m(&[("portcullis.dev/agents", "enabled")]),
            pod_labels: m(&[("portcullis.dev/agent", "true")]),
            exempt_namespaces: default_exempt(),
        };
        let none = m(&[]);
        assert!(e.selects("a", &m(&[("portcullis.dev/agent", "true")]), &none));
        assert!(e.selects("a", &none, &m(&[("portcullis.dev/agents", "enabled")])));
        assert!(!e.selects("a", &m(&[("portcullis.dev/agent", "false")]), &none));
        assert!(!e.selects("a", &none, &none));
        assert!(!e.selects(
            "portcullis-system",
            &m(&[("portcullis.dev/agent", "true")]),
            &none
        ));
        let only_pods = Enrollment {
            namespace_labels: BTreeMap::new(),
            ..e
        };
        // An empty set selects nothing (not everything).
        assert!(!only_pods.selects("a", &none, &none));
    }
}
