//! One AdmissionReview in, one out: `/mutate` answers with the JSON patch from the
//! object to [`super::mutate::mutate`]'s result; `/validate` with the guard's
//! refusals (and the removal of the agent label, which only an update can do).
use base64::Engine;
use serde_json::{Value, json};

use super::{
    guard::{self, Violation},
    mutate::{self, Context},
};

/// What the webhook is configured with.
pub struct Policy {
    pub barrier_image: String,
    pub ca_pem: String,
    /// RuntimeClasses whose sandboxes the cgroup hooks see.
    pub runtime_classes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the AdmissionReview has no request.uid")]
    NoUid,
}

fn response(uid: &Value, body: Value) -> Value {
    let mut r = json!({"uid": uid});
    if let (Some(r), Some(b)) = (r.as_object_mut(), body.as_object()) {
        r.extend(b.clone());
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r})
}

/// The answer to `review` for `path` (`/mutate` or `/validate`).
pub fn answer(path: &str, review: &[u8], policy: &Policy) -> Result<Value, ReviewError> {
    let v: Value = serde_json::from_slice(review)?;
    let req = &v["request"];
    let uid = req.get("uid").cloned().ok_or(ReviewError::NoUid)?;
    let kind = req["kind"]["kind"].as_str().unwrap_or_default();
    let name = req["name"]
        .as_str()
        .or(req["object"]["metadata"]["name"].as_str())
        .or(req["object"]["metadata"]["generateName"].as_str())
        .unwrap_or("(unnamed)");
    let op = req["operation"].as_str().unwrap_or_default();
    let obj = &req["object"];
    if obj.is_null() || mutate::pod_spec_path(kind).is_none() {
        return Ok(response(&uid, json!({"allowed": true})));
    }
    match path {
        "/mutate" => {
            // Pods are shaped at creation; workloads on every write, so a template
            // replaced by an update is labelled again.
            if kind == "Pod" && op != "CREATE" {
                return Ok(response(&uid, json!({"allowed": true})));
            }
            // The guard first, on the object as its author wrote it, so a refused
            // field is named by the author's own path (the barrier injected below
            // would shift every init container's index). `/validate` checks again
            // after every mutation.
            let violations = violations(kind, obj, &req["oldObject"], op, policy);
            if !violations.is_empty() {
                return Ok(refused(&uid, kind, name, &violations));
            }
            let ctx = Context {
                barrier_image: &policy.barrier_image,
                ca_pem: &policy.ca_pem,
            };
            let want = mutate::mutate(kind, obj, &ctx);
            let patch = json_patch::diff(obj, &want);
            if patch.0.is_empty() {
                return Ok(response(&uid, json!({"allowed": true})));
            }
            let bytes = serde_json::to_vec(&patch)?;
            Ok(response(
                &uid,
                json!({
                    "allowed": true,
                    "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
                }),
            ))
        }
        _ => {
            let violations = violations(kind, obj, &req["oldObject"], op, policy);
            if violations.is_empty() {
                return Ok(response(&uid, json!({"allowed": true})));
            }
            Ok(refused(&uid, kind, name, &violations))
        }
    }
}

/// What the guard refuses in `obj` (an agent workload of `kind`).
fn violations(kind: &str, obj: &Value, old: &Value, op: &str, policy: &Policy) -> Vec<Violation> {
    let mut out: Vec<Violation> = Vec::new();
    if let Some(p) = mutate::pod_spec_path(kind) {
        out.extend(guard::check_pod_spec(
            mutate::at(obj, p),
            &p.join("."),
            &policy.runtime_classes,
        ));
    }
    if op == "UPDATE"
        && let Some(field) = mutate::label_removed(kind, old, obj)
    {
        out.push(Violation {
            field,
            message: "the agent label cannot be removed from an agent workload".into(),
        });
    }
    out
}

fn refused(uid: &Value, kind: &str, name: &str, violations: &[Violation]) -> Value {
    let message = guard::message(kind, name, violations);
    response(
        uid,
        json!({"allowed": false, "status": {"code": 403, "reason": "Forbidden", "message": message}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            barrier_image: "img".into(),
            ca_pem: "PEM".into(),
            runtime_classes: vec![],
        }
    }

    fn review(op: &str, kind: &str, obj: Value, old: Value) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": kind},
                "operation": op, "name": "p", "object": obj, "oldObject": old}}),
        )
        .unwrap()
    }

    #[test]
    fn mutate_returns_a_patch_that_applies() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        let a = answer(
            "/mutate",
            &review("CREATE", "Pod", pod.clone(), Value::Null),
            &policy(),
        )
        .unwrap();
        assert_eq!(a["response"]["uid"], "u1");
        assert_eq!(a["response"]["allowed"], true);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut patched = pod;
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(
            patched["spec"]["initContainers"][0]["name"],
            "portcullis-barrier"
        );
    }

    #[test]
    fn mutate_refuses_with_the_authors_own_path() {
        // Before the barrier is injected: the author's initContainers[0] keeps its index.
        let pod = json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "i", "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}}],
            "containers": [{"name": "c"}]}});
        let a = answer(
            "/mutate",
            &review("CREATE", "Pod", pod, Value::Null),
            &policy(),
        )
        .unwrap();
        assert_eq!(a["response"]["allowed"], false);
        let m = a["response"]["status"]["message"].as_str().unwrap();
        assert!(
            m.contains("spec.initContainers[0].securityContext.capabilities.add[0]"),
            "{m}"
        );
        assert!(a["response"]["patch"].is_null());
    }

    #[test]
    fn validate_refuses_with_the_field_named() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"hostNetwork": true, "containers": [{"name": "c"}]}});
        let a = answer(
            "/validate",
            &review("CREATE", "Pod", pod, Value::Null),
            &policy(),
        )
        .unwrap();
        assert_eq!(a["response"]["allowed"], false);
        let m = a["response"]["status"]["message"].as_str().unwrap();
        assert!(m.contains("spec.hostNetwork"), "{m}");
        let old = json!({"metadata": {"labels": {"portcullis.dev/agent": "true"}}, "spec": {"containers": []}});
        let new = json!({"metadata": {"labels": {}}, "spec": {"containers": []}});
        let a = answer("/validate", &review("UPDATE", "Pod", new, old), &policy()).unwrap();
        assert_eq!(a["response"]["allowed"], false);
        let other = answer(
            "/validate",
            &review("CREATE", "ConfigMap", json!({"data": {}}), Value::Null),
            &policy(),
        )
        .unwrap();
        assert_eq!(other["response"]["allowed"], true);
    }
}
