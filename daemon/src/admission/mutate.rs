//! What the webhook changes in an agent pod, and in a workload an agent creates:
//!
//! - the agent label (`portcullis.dev/agent: "true"`), on the object and in every pod
//!   template, so the pods controllers make from it are agents too (and enrolled);
//! - the barrier as the pod's first init container: nothing else in the pod runs
//!   before its connections are answered by the gate;
//! - CA trust without touching the image or command: the service-account volume the
//!   API server injects (`kube-api-access-*`) takes `ca.crt` from a ConfigMap that
//!   holds the cluster CA plus the interception CA, instead of `kube-root-ca.crt`;
//! - `NET_RAW` dropped from every container (raw and packet sockets are a way around
//!   the cgroup hooks; container runtimes grant it by default).
use serde_json::{Value, json};

pub const AGENT_LABEL: &str = "portcullis.dev/agent";
pub const BARRIER: &str = "portcullis-barrier";
/// The ConfigMap in every namespace with the cluster CA and the interception CA.
pub const CA_CONFIGMAP: &str = "portcullis-root-ca.crt";
const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";

/// What the mutation needs to know.
pub struct Context<'a> {
    pub barrier_image: &'a str,
    /// The interception CA (PEM): the barrier trusts only it.
    pub ca_pem: &'a str,
}

fn ensure_label(meta: &mut Value) {
    if !meta.is_object() {
        *meta = json!({});
    }
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"][AGENT_LABEL] = json!("true");
}

/// The pod spec of a pod or workload, by kind: (path for messages, the spec).
pub fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &["spec"],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template", "spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        "PodTemplate" => &["template", "spec"],
        _ => return None,
    })
}

/// Metadata paths that must carry the label: the object's and each template's.
fn label_paths(kind: &str) -> Vec<&'static [&'static str]> {
    match kind {
        "Pod" => vec![&["metadata"]],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => vec![&["metadata"], &["spec", "template", "metadata"]],
        "CronJob" => vec![
            &["metadata"],
            &["spec", "jobTemplate", "metadata"],
            &["spec", "jobTemplate", "spec", "template", "metadata"],
        ],
        "PodTemplate" => vec![&["metadata"], &["template", "metadata"]],
        _ => vec![],
    }
}

pub fn at<'v>(v: &'v Value, path: &[&str]) -> &'v Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn at_mut<'v>(v: &'v mut Value, path: &[&str]) -> &'v mut Value {
    path.iter().fold(v, |v, k| &mut v[*k])
}

/// The object as the webhook wants it (the API server gets the JSON patch between).
pub fn mutate(kind: &str, obj: &Value, ctx: &Context) -> Value {
    let mut out = obj.clone();
    for p in label_paths(kind) {
        ensure_label(at_mut(&mut out, p));
    }
    if kind == "Pod" {
        mutate_pod_spec(at_mut(&mut out, &["spec"]), ctx);
    } else if let Some(p) = pod_spec_path(kind) {
        drop_net_raw(at_mut(&mut out, p));
    }
    out
}

fn drop_net_raw(spec: &mut Value) {
    for kind in ["initContainers", "containers"] {
        let Some(cs) = spec[kind].as_array_mut() else {
            continue;
        };
        for c in cs {
            if c["name"] == BARRIER {
                continue;
            }
            let drop = &mut c["securityContext"]["capabilities"]["drop"];
            if !drop.is_array() {
                *drop = json!([]);
            }
            if let Some(d) = drop.as_array_mut()
                && !d.iter().any(|x| x == "ALL" || x == "NET_RAW")
            {
                d.push(json!("NET_RAW"));
            }
        }
    }
}

fn mutate_pod_spec(spec: &mut Value, ctx: &Context) {
    drop_net_raw(spec);
    // CA trust: the API server's injected service-account volume.
    if let Some(vols) = spec["volumes"].as_array_mut() {
        for vol in vols {
            let is_sa = vol["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("kube-api-access-"));
            if !is_sa {
                continue;
            }
            if let Some(sources) = vol["projected"]["sources"].as_array_mut() {
                for s in sources {
                    if s["configMap"]["name"] == ROOT_CA_CONFIGMAP {
                        s["configMap"]["name"] = json!(CA_CONFIGMAP);
                    }
                }
            }
        }
    }
    // The barrier first.
    let has = spec["initContainers"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["name"] == BARRIER));
    if !has {
        let barrier = json!({
            "name": BARRIER,
            "image": ctx.barrier_image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["portcullis", "barrier"],
            "env": [{"name": "PORTCULLIS_CA_PEM", "value": ctx.ca_pem}],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
            "securityContext": {
                "runAsUser": 65534, "runAsGroup": 65534, "runAsNonRoot": true,
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]}
            }
        });
        match spec["initContainers"].as_array_mut() {
            Some(a) => a.insert(0, barrier),
            None => spec["initContainers"] = json!([barrier]),
        }
    }
}

/// Did an update remove the agent label from the object or a template that had it?
/// Returns the path of the first such place.
pub fn label_removed(kind: &str, old: &Value, new: &Value) -> Option<String> {
    label_paths(kind).into_iter().find_map(|p| {
        let had = at(old, p)["labels"][AGENT_LABEL] == "true";
        let has = at(new, p)["labels"][AGENT_LABEL] == "true";
        (had && !has).then(|| format!("{}.labels[{AGENT_LABEL}]", p.join(".")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Context = Context {
        barrier_image: "portcullis/portcullis:0.1.0",
        ca_pem: "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
    };

    fn pod() -> Value {
        json!({
            "metadata": {"name": "a"},
            "spec": {
                "initContainers": [{"name": "setup"}],
                "containers": [{"name": "main", "securityContext": {"capabilities": {"add": ["CHOWN"]}}}],
                "volumes": [{"name": "kube-api-access-x1", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {}}]}},
                    {"name": "mine", "configMap": {"name": "kube-root-ca.crt"}}]
            }
        })
    }

    #[test]
    fn agent_pods_get_label_barrier_ca_and_no_net_raw() {
        let m = mutate("Pod", &pod(), &CTX);
        assert_eq!(m["metadata"]["labels"][AGENT_LABEL], "true");
        let init = m["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init[0]["name"], BARRIER);
        assert_eq!(init[1]["name"], "setup");
        assert_eq!(init[0]["env"][0]["value"], CTX.ca_pem);
        assert_eq!(
            m["spec"]["volumes"][0]["projected"]["sources"][1]["configMap"]["name"],
            CA_CONFIGMAP
        );
        // The pod's own volumes are its business.
        assert_eq!(
            m["spec"]["volumes"][1]["configMap"]["name"],
            "kube-root-ca.crt"
        );
        assert_eq!(
            m["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"],
            json!(["NET_RAW"])
        );
        // Idempotent: a second pass changes nothing.
        assert_eq!(mutate("Pod", &m, &CTX), m);
    }

    #[test]
    fn workload_templates_are_labelled_and_removal_is_seen() {
        let d = json!({"metadata": {"name": "d"}, "spec": {"template": {"metadata": {}, "spec": {"containers": [{"name": "c"}]}}}});
        let m = mutate("Deployment", &d, &CTX);
        assert_eq!(
            m["spec"]["template"]["metadata"]["labels"][AGENT_LABEL],
            "true"
        );
        assert!(m["spec"]["template"]["spec"]["initContainers"].is_null());
        let c = json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": {}}}}}});
        let m2 = mutate("CronJob", &c, &CTX);
        assert_eq!(
            m2["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"][AGENT_LABEL],
            "true"
        );
        let mut stripped = m.clone();
        stripped["spec"]["template"]["metadata"]["labels"] = json!({});
        assert_eq!(
            label_removed("Deployment", &m, &stripped).as_deref(),
            Some("spec.template.metadata.labels[portcullis.dev/agent]")
        );
        assert_eq!(label_removed("Deployment", &m, &m), None);
    }
}
