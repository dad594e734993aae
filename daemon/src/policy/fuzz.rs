//! The fuzz targets' bodies (`fuzz/fuzz_targets/`), here so the seed corpus
//! (`fuzz/corpus/<target>/`) also runs as ordinary unit tests on stable: any input
//! either parses or is refused with an error, never a panic, and what parses decides.
use std::path::Path;

use super::{Policy, Request, condition::Condition};
use crate::k8s::{self, UserInfo};

/// Requests every parsed policy is asked about.
const REQUESTS: &[(&str, &str)] = &[
    ("GET", "/api/v1/namespaces/prod-a/pods"),
    (
        "GET",
        "/api/v1/pods?watch=1&fieldSelector=metadata.namespace%3Dprod-a",
    ),
    ("POST", "/api/v1/namespaces/prod-a/pods"),
    (
        "PATCH",
        "/apis/apps/v1/namespaces/prod-a/deployments/keep-web",
    ),
    ("DELETE", "/api/v1/namespaces/prod-a/configmaps"),
    ("POST", "/api/v1/namespaces/prod-a/pods/p/exec"),
    ("GET", "/version"),
];

fn object() -> serde_json::Value {
    serde_json::json!({"kind": "Deployment", "metadata": {"name": "keep-web", "namespace": "prod-a",
        "ownerReferences": [{"kind": "ReplicaSet", "name": "x", "controller": true}]},
        "spec": {"replicas": 0, "template": {"spec": {"serviceAccountName": "agent",
            "containers": [{"name": "a", "image": "x", "envFrom": [{"secretRef": {"name": "s"}}]}],
            "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}}})
}

/// An AgentPolicy document from any bytes.
pub fn document(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(policy) = Policy::parse(&text, Path::new("fuzz.yaml")) else {
        return;
    };
    let user = UserInfo::service_account("prod-a", "agent");
    let obj = object();
    for (m, p) in REQUESTS {
        let (path, q) = p.split_once('?').unwrap_or((p, ""));
        let Ok(info) = k8s::resolve(m, path, (!q.is_empty()).then_some(q)) else {
            continue;
        };
        let mut r = Request::new(&user, &info);
        r.query = q;
        let _ = policy.needs(&r);
        let _ = policy.decide(&r, &r.inputs(Some(&obj), Some(&obj), None));
        let _ = policy.decide(&r, &r.inputs(None, None, Some("fuzz".into())));
        let _ = policy.scoped_identity(&user);
    }
}

/// A condition's expression from any bytes.
pub fn condition(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(c) = Condition::compile("fuzz".into(), &text) else {
        return;
    };
    let user = UserInfo::service_account("prod-a", "agent");
    let info = match k8s::resolve(
        "PATCH",
        "/apis/apps/v1/namespaces/prod-a/deployments/keep-web",
        None,
    ) {
        Ok(i) => i,
        Err(_) => return,
    };
    let r = Request::new(&user, &info);
    let obj = object();
    let _ = c.eval(&r.inputs(Some(&obj), Some(&obj), None));
    let _ = c.eval(&r.inputs(None, None, None));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(target: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| {
                let p = e.path();
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        out.sort();
        assert!(
            out.len() >= 5,
            "a corpus of {} seeds for {target}",
            out.len()
        );
        out
    }

    #[test]
    fn the_policy_document_corpus_runs() {
        let seeds = corpus("policy_document");
        let parsed = seeds
            .iter()
            .filter(|(_, b)| Policy::parse(&String::from_utf8_lossy(b), Path::new("s")).is_ok())
            .count();
        // Both kinds of seed are there: documents that parse and that do not.
        assert!(
            parsed >= 2 && parsed < seeds.len(),
            "{parsed} of {}",
            seeds.len()
        );
        for (_, b) in &seeds {
            document(b);
        }
    }

    #[test]
    fn the_cel_condition_corpus_runs() {
        let seeds = corpus("cel_condition");
        let compiled = seeds
            .iter()
            .filter(|(_, b)| Condition::compile("s".into(), &String::from_utf8_lossy(b)).is_ok())
            .count();
        assert!(
            compiled >= 5 && compiled < seeds.len(),
            "{compiled} of {}",
            seeds.len()
        );
        for (_, b) in &seeds {
            condition(b);
        }
    }

    /// Inputs that once troubled parsers of this kind: deep nesting, huge numbers,
    /// invalid UTF-8, NUL bytes, long strings.
    #[test]
    fn hostile_inputs_do_not_panic() {
        let deep = format!("{}1{}", "(".repeat(2000), ")".repeat(2000));
        let lists = format!("{}{}", "[".repeat(3000), "]".repeat(3000));
        for input in [
            deep.as_bytes(),
            lists.as_bytes(),
            b"99999999999999999999999999999 == 1",
            b"\xff\xfe\x00object",
            b"'\\u{110000}'",
            b"object.?a.?b.?c.orValue(object)",
            b"size('x' + 'y' * 3)",
        ] {
            condition(input);
        }
        let yaml_bomb = "a: &a [\"x\",\"x\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n";
        document(yaml_bomb.as_bytes());
        document(b"apiVersion: portcullis.dev/v1alpha1\nkind: AgentPolicy\nspec: {rules: [{name: x, verbs: [a], apiGroups: [b], resources: [c], action: allow, conditions: [{expression: \"\\u0000\"}]}]}\n");
    }
}
