//! Credential-bearing structures, one test per class, each in objects, lists, watch
//! events and Tables, fed in every chunking: a canary that must never survive, beside
//! a neighbour that must.
use std::sync::Arc;

use serde_json::{Value, json};

use super::{Detectors, JsonMasker, Plan, TextMasker};

fn plan() -> Arc<Plan> {
    Arc::new(Plan::new(
        Vec::new(),
        Some(Arc::new(Detectors::new())),
        None,
    ))
}

fn mask_chunks(plan: &Arc<Plan>, body: &[u8], chunk: usize) -> Vec<u8> {
    let mut m = JsonMasker::new(plan.clone());
    let mut out = Vec::new();
    for c in body.chunks(chunk.max(1)) {
        out.extend(m.feed(c).unwrap());
    }
    out.extend(m.finish().unwrap());
    out
}

/// `body` masked whole and in chunks of 1, 2, 3, 7 and 64 bytes (all equal).
fn mask(body: &str) -> String {
    let p = plan();
    let whole = mask_chunks(&p, body.as_bytes(), body.len());
    for chunk in [1, 2, 3, 7, 64] {
        assert_eq!(
            String::from_utf8_lossy(&mask_chunks(&p, body.as_bytes(), chunk)),
            String::from_utf8_lossy(&whole),
            "chunk size {chunk}"
        );
    }
    String::from_utf8(whole).unwrap()
}

/// `obj` as a document, in a list, as two watch events, and as a Table row's object:
/// every form masked; the masked document (from the first form) returned.
fn every_shape(obj: &Value, canaries: &[&str]) -> Value {
    let forms = [
        obj.to_string(),
        json!({"kind": "List", "items": [obj, obj]}).to_string(),
        format!(
            "{}\n{}\n",
            json!({"type": "ADDED", "object": obj}),
            json!({"type": "MODIFIED", "object": obj})
        ),
        json!({"kind": "Table", "columnDefinitions": [{"name": "Name"}],
               "rows": [{"cells": ["x"], "object": obj}]})
        .to_string(),
    ];
    let mut first = None;
    for f in forms {
        let out = mask(&f);
        for c in canaries {
            assert!(!out.contains(c), "{c} survived in {out}");
        }
        first.get_or_insert(out);
    }
    serde_json::from_str(&first.unwrap_or_default()).unwrap()
}

fn pod_spec(container: Value) -> Value {
    json!({"initContainers": [container.clone()], "containers": [container.clone()],
           "ephemeralContainers": [container]})
}

fn container() -> Value {
    json!({
        "name": "app", "image": "app:1",
        "command": ["sh", "-c", "PASSWORD=canary-cmd-1 DB_PASS=canary-cmd-2 exec app --api-token canary-cmd-3"],
        "args": ["--db-password", "canary-arg-1", "--db-pass=canary-arg-2", "--host", "db",
                 "--client-secret", "canary-arg-3", "-v"],
        "env": [
            {"name": "DB_PASSWORD", "value": "canary-env-1"},
            {"value": "canary-env-2", "name": "STRIPE_KEY"},
            {"name": "DATABASE_URL", "value": "postgres://app:canary-env-3@db:5432/app"},
            {"name": "MODE", "value": "fast"},
            {"name": "SECRET_NAME", "value": "my-secret"},
            {"name": "FROM_REF", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password"}}}
        ],
        "livenessProbe": {"exec": {"command": ["check", "--token", "canary-probe-1"]}}
    })
}

const CONTAINER_CANARIES: &[&str] = &[
    "canary-cmd-1",
    "canary-cmd-2",
    "canary-cmd-3",
    "canary-arg-1",
    "canary-arg-2",
    "canary-arg-3",
    "canary-env-1",
    "canary-env-2",
    "canary-env-3",
    "canary-probe-1",
];

fn check_container(c: &Value) {
    assert_eq!(c["args"][3], "--host");
    assert_eq!(c["args"][4], "db", "a plain flag's value is kept");
    assert_eq!(c["args"][7], "-v");
    assert_eq!(c["args"][1], "portcullis-masked");
    assert_eq!(c["args"][2], "--db-pass=[masked]");
    assert_eq!(c["env"][0]["value"], "portcullis-masked");
    assert_eq!(
        c["env"][1]["value"], "portcullis-masked",
        "value before name"
    );
    assert_eq!(c["env"][2]["value"], "postgres://app:[masked]@db:5432/app");
    assert_eq!(c["env"][3]["value"], "fast");
    assert_eq!(
        c["env"][4]["value"], "my-secret",
        "a reference, not a value"
    );
    assert_eq!(c["env"][5]["valueFrom"]["secretKeyRef"]["key"], "password");
    assert_eq!(c["image"], "app:1");
}

#[test]
fn containers_in_every_workload_template() {
    let spec = pod_spec(container());
    let template = json!({"metadata": {"labels": {"app": "a"}}, "spec": spec});
    let objects = [
        json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": spec}),
        json!({"kind": "Deployment", "spec": {"replicas": 1, "template": template}}),
        json!({"kind": "StatefulSet", "spec": {"template": template}}),
        json!({"kind": "DaemonSet", "spec": {"template": template}}),
        json!({"kind": "ReplicaSet", "spec": {"template": template}}),
        json!({"kind": "Job", "spec": {"template": template}}),
        json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": template}}}}),
        json!({"kind": "PodTemplate", "template": template}),
    ];
    for o in objects {
        let m = every_shape(&o, CONTAINER_CANARIES);
        let spec = match o["kind"].as_str() {
            Some("Pod") => &m["spec"],
            Some("CronJob") => &m["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            Some("PodTemplate") => &m["template"]["spec"],
            _ => &m["spec"]["template"]["spec"],
        };
        for list in ["initContainers", "containers", "ephemeralContainers"] {
            check_container(&spec[list][0]);
        }
    }
}

#[test]
fn annotations_and_embedded_documents() {
    let applied = json!({"kind": "ConfigMap", "data": {"password": "canary-la-1"}}).to_string();
    let cm = json!({
        "kind": "ConfigMap",
        "metadata": {"name": "c", "annotations": {
            "example.com/db-password": "canary-ann-1",
            "example.com/dsn": "mysql://root:canary-ann-2@db/x",
            "example.com/run": "app --api-token canary-ann-3",
            "other.tool/last-config": applied,
            "note": "plain"
        }},
        "data": {
            "config.json": json!({"db": {"user": "app", "password": "canary-emb-1"},
                                  "args": ["--token", "canary-emb-2"]}).to_string(),
            "app.env": "DB_PASS=canary-emb-3\nMODE=fast\n",
            "notjson": "{not json --token canary-emb-4}",
            "list": "[1, 2]"
        }
    });
    let m = every_shape(
        &cm,
        &[
            "canary-la-1",
            "canary-ann-1",
            "canary-ann-2",
            "canary-ann-3",
            "canary-emb-1",
            "canary-emb-2",
            "canary-emb-3",
            "canary-emb-4",
        ],
    );
    assert_eq!(m["metadata"]["annotations"]["note"], "plain");
    let inner: Value = serde_json::from_str(m["data"]["config.json"].as_str().unwrap()).unwrap();
    assert_eq!(inner["db"]["user"], "app");
    assert_eq!(inner["db"]["password"], "portcullis-masked");
    assert_eq!(
        m["data"]["list"], "[1, 2]",
        "unchanged documents keep their bytes"
    );
    assert_eq!(m["data"]["app.env"], "DB_PASS=[masked]\nMODE=fast\n");
}

#[test]
fn table_columns_that_show_credentials() {
    let defs = json!([
        {"name": "Name", "type": "string", "description": "Name must be unique"},
        {"name": "Password", "type": "string", "description": "the password"},
        {"name": "Conn", "type": "string",
         "description": "Custom resource definition column (in JSONPath format): .spec.auth.apiToken"},
        {"name": "Replicas", "type": "integer",
         "description": "Custom resource definition column (in JSONPath format): .spec.replicas"}
    ]);
    // Built-in columns describe themselves in prose: a Secret's `Type` column says
    // "secret" and must stay.
    let secrets = json!({"kind": "Table", "columnDefinitions": [
        {"name": "Name", "type": "string", "description": "Name must be unique within a namespace."},
        {"name": "Type", "type": "string", "description": "Used to facilitate programmatic handling of secret data. More info: https://kubernetes.io/docs/concepts/configuration/secret/#secret-types"},
        {"name": "Data", "type": "string", "description": "Data contains the secret data."}
    ], "rows": [{"cells": ["s", "Opaque", 2]}]});
    let m: Value = serde_json::from_str(&mask(&secrets.to_string())).unwrap();
    assert_eq!(m["rows"][0]["cells"], json!(["s", "Opaque", 2]));
    let row = |n: &str| json!({"cells": [n, "canary-col-1", "canary-col-2", 3]});
    // Tables stand at the top of a response or in a watch event (never in a list).
    let table = json!({"kind": "Table", "columnDefinitions": defs, "rows": [row("a"), row("b")]});
    let out = mask(&table.to_string());
    assert!(!out.contains("canary-col"), "{out}");
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        m["rows"][1]["cells"],
        json!(["b", "portcullis-masked", "portcullis-masked", 3])
    );
    // A watched Table: later events carry no column definitions; the columns stay known.
    let watch = format!(
        "{}\n{}\n",
        json!({"type": "ADDED", "object": {"kind": "Table", "columnDefinitions": defs, "rows": [row("a")]}}),
        json!({"type": "MODIFIED", "object": {"kind": "Table", "columnDefinitions": null, "rows": [row("b")]}})
    );
    let out = mask(&watch);
    assert!(!out.contains("canary-col"), "{out}");
    assert!(out.contains("\"b\""), "{out}");
}

#[test]
fn logs_and_event_messages_with_flags_urls_and_headers() {
    let d = Arc::new(Detectors::new());
    let log = "starting app --db-password canary-log-1 --port 80\n\
               DATABASE_URL=postgres://u:canary-log-2@db/x\n\
               curl -H 'Authorization: Basic canary-log-3' http://x\n\
               GET with Bearer canary-log-4-abcdefgh ok\n\
               export DB_PASS=canary-log-5\n\
               done\n";
    let mut m = TextMasker::new(d);
    let mut out = m.feed(log.as_bytes());
    out.extend(m.finish());
    let out = String::from_utf8(out).unwrap();
    for c in 1..=5 {
        assert!(!out.contains(&format!("canary-log-{c}")), "{out}");
    }
    assert!(
        out.contains("--port 80") && out.ends_with("done\n"),
        "{out}"
    );
    let event = json!({"kind": "Event", "reason": "Failed",
        "message": "Error: exec: \"app --client-secret canary-ev-1\": not found"});
    every_shape(&event, &["canary-ev-1"]);
}

#[test]
fn a_held_value_is_released_when_its_object_closes() {
    // Output stops at a value whose name is still to come, and resumes after.
    let p = plan();
    let mut m = JsonMasker::new(p);
    let a = m.feed(br#"{"env":[{"value":"canary-held","na"#).unwrap();
    assert_eq!(String::from_utf8_lossy(&a), r#"{"env":[{"value":"#);
    let b = m.feed(br#"me":"API_TOKEN"},{"value":"x"#).unwrap();
    let c = m.feed(br#"","name":"MODE"}]}"#).unwrap();
    let mut all = a;
    all.extend(b);
    all.extend(c);
    all.extend(m.finish().unwrap());
    let v: Value = serde_json::from_slice(&all).unwrap();
    assert_eq!(v["env"][0]["value"], "portcullis-masked");
    assert_eq!(v["env"][1]["value"], "x");
}
