//! Masking never destroys data, and never leaves a body raw in the audit log, on the
//! real node:
//! - masking placeholders written back (`get -o yaml | apply`, `replace`, `edit
//!   --save-config`, `edit` of a partly masked string, JSON
//!   patch, server-side apply, a detector's `[masked]`) are refused and the stored
//!   values stay; writes of real values (a manifest over a masked object, `edit` of
//!   an unmasked field, `set env`, a label, a protobuf create) go through;
//! - request bodies (server-side apply YAML, protobuf creates, JSON and merge
//!   patches) are recorded in the daemon's audit log decoded and masked.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use portcullis_tests::gate::POD;
use serde_json::Value;

use crate::{
    Clients, Env, audit_text,
    leaks::{apply_file, assert_none},
    run_pod, stderr,
};

// ---- placeholders written back ----

const EDIT_LABEL: &str = r#"#!/bin/sh
# An editor for `kubectl edit`: adds a label under the top-level metadata.
f="$1"
while IFS= read -r line; do
  printf '%s\n' "$line"
  if [ "$line" = "metadata:" ]; then printf '  labels:\n    edited: "yes"\n'; fi
done < "$f" > "$f.new" && mv "$f.new" "$f"
"#;

fn agent_sh(env: &Env, script: &str, envs: &[(&str, &str)]) -> Result<std::process::Output> {
    let kv: Vec<String> = envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut argv = vec!["env"];
    argv.extend(kv.iter().map(String::as_str));
    argv.extend(["sh", "-c", script]);
    run_pod(env.in_pod(POD, &argv), None)
}

/// How many write-backs the daemon's audit log records as refused.
fn refusals(env: &Env) -> Result<usize> {
    Ok(audit_text(env)?
        .matches("masking placeholder written back at")
        .count())
}

fn secret_value(env: &Env, name: &str, key: &str) -> Result<String> {
    let b = env.admin_ok(&[
        "get",
        "secret",
        name,
        "-o",
        &format!("jsonpath={{.data.{key}}}"),
    ])?;
    Ok(String::from_utf8(
        base64::engine::general_purpose::STANDARD.decode(b.trim())?,
    )?)
}

pub fn placeholder_write_back(env: &mut Env) -> Result<()> {
    apply_file(
        env,
        "wb-secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: wb-secret\n  namespace: e2e\nstringData:\n  token: pc-leak-wb-1\n",
    )?;
    apply_file(
        env,
        "wb-cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: wb-cm\n  namespace: e2e\ndata:\n  app.properties: |\n    db.host=db\n    db.password=pc-leak-wb-2\n",
    )?;
    let img = portcullis_tests::node::WORKLOAD_IMAGE;
    env.file(
        "wb-deploy.yaml",
        &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: wb-deploy\n  namespace: e2e\nspec:\n  replicas: 0\n  selector: {{matchLabels: {{app: wb}}}}\n  template:\n    metadata: {{labels: {{app: wb}}}}\n    spec:\n      containers:\n      - name: app\n        image: {img}\n        args: [\"--db-password\", \"pc-leak-wb-4\"]\n        env:\n        - {{name: DB_PASSWORD, value: pc-leak-wb-3}}\n"),
    )?;
    env.admin_ok(&[
        "create",
        "-f",
        &env.host_file("wb-deploy.yaml").display().to_string(),
    ])?;
    let editor = env.file("edit_label.sh", EDIT_LABEL)?;
    let editor = format!("sh {editor}");
    let host_editor = env.file(
        "edit_host.sh",
        "#!/bin/sh\nsed -i 's/db.host=db$/db.host=db2/' \"$1\"\n",
    )?;
    let host_editor = format!("sh {host_editor}");

    type Env2<'a> = Vec<(&'a str, &'a str)>;
    let refused: Vec<(&str, String, Env2)> = vec![
        ("get -o yaml | apply", "kubectl get secret wb-secret -o yaml | kubectl apply -f -".into(), vec![]),
        ("get -o json | replace", "kubectl get secret wb-secret -o json | kubectl replace -f -".into(), vec![]),
        ("configmap get | apply", "kubectl get configmap wb-cm -o yaml | kubectl apply -f -".into(), vec![]),
        ("deployment get | replace", "kubectl get deployment wb-deploy -o json | kubectl replace -f -".into(), vec![]),
        (
            "server-side apply of get output",
            "kubectl get secret wb-secret -o yaml --show-managed-fields=false | kubectl apply --server-side --force-conflicts --field-manager=agent -f -".into(),
            vec![],
        ),
        // `--save-config` writes what was read (masked) into the last-applied annotation.
        (
            "edit --save-config",
            "kubectl edit --save-config secret wb-secret".into(),
            vec![("KUBE_EDITOR", editor.as_str())],
        ),
        // Editing a string that holds a masked part sends the whole string back.
        (
            "edit of a partly masked value",
            "kubectl edit configmap wb-cm".into(),
            vec![("KUBE_EDITOR", host_editor.as_str())],
        ),
        (
            "JSON patch",
            format!(
                "kubectl patch secret wb-secret --type=json -p '[{{\"op\":\"replace\",\"path\":\"/data/token\",\"value\":\"{}\"}}]'",
                crate::masking::PLACEHOLDER_B64
            ),
            vec![],
        ),
        (
            "merge patch with a detector marker",
            "kubectl patch configmap wb-cm --type=merge -p '{\"data\":{\"app.properties\":\"db.password=[masked]\"}}'".into(),
            vec![],
        ),
    ];
    for (what, script, envs) in &refused {
        let before = refusals(env)?;
        let o = agent_sh(env, script, envs)?;
        let err = stderr(&o);
        ensure!(!o.status.success(), "{what}: went through: {err}");
        // kubectl shows the gate's Status (`kubectl edit` only in the re-opened file's
        // header, as it does for every Invalid answer); the daemon's audit log has the
        // refusal either way.
        ensure!(
            what.starts_with("edit") || err.contains("masking placeholder at"),
            "{what}: not refused by the gate: {err}"
        );
        let t = std::time::Instant::now();
        while refusals(env)? == before {
            ensure!(
                t.elapsed() < Duration::from_secs(3),
                "{what}: no refusal in the audit log: {err}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Nothing was overwritten.
    ensure!(
        secret_value(env, "wb-secret", "token")? == "pc-leak-wb-1",
        "wb-secret changed"
    );
    let cm = env.admin_ok(&["get", "configmap", "wb-cm", "-o", "yaml"])?;
    ensure!(
        cm.contains("db.password=pc-leak-wb-2"),
        "wb-cm changed: {cm}"
    );
    let d = env.admin_ok(&["get", "deployment", "wb-deploy", "-o", "json"])?;
    ensure!(
        d.contains("pc-leak-wb-3") && d.contains("pc-leak-wb-4"),
        "wb-deploy changed: {d}"
    );
    let labels = env.admin_ok(&[
        "get",
        "secret",
        "wb-secret",
        "-o",
        "jsonpath={.metadata.labels}",
    ])?;
    ensure!(
        !labels.contains("edited"),
        "the refused edit landed: {labels}"
    );

    // Writes of real values go through: edits of unmasked fields, set env, labels, a
    // fresh manifest over the masked object, a protobuf create.
    env.file(
        "wb-secret-new.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: wb-secret\n  namespace: e2e\nstringData:\n  token: pc-leak-wb-5\n",
    )?;
    let allowed: Vec<(&str, &str, Env2)> = vec![
        (
            "edit of a label",
            "kubectl edit deployment wb-deploy",
            vec![("KUBE_EDITOR", editor.as_str())],
        ),
        // Without --save-config kubectl sends only the difference: the masked data
        // stays out of the patch.
        (
            "edit of a label of the masked Secret",
            "kubectl edit secret wb-secret",
            vec![("KUBE_EDITOR", editor.as_str())],
        ),
        (
            "set env",
            "kubectl set env deployment/wb-deploy MODE=fast",
            vec![],
        ),
        (
            "label",
            "kubectl label secret wb-secret reviewed=yes",
            vec![],
        ),
        (
            "apply of a manifest",
            "kubectl apply -f /work/wb-secret-new.yaml",
            vec![],
        ),
        (
            "protobuf create",
            "kubectl create secret generic wb-created --from-literal=k=pc-leak-wb-6",
            vec![],
        ),
    ];
    for (what, script, envs) in &allowed {
        let o = agent_sh(env, script, envs)?;
        ensure!(o.status.success(), "{what}: {}", stderr(&o));
    }
    let labels = env.admin_ok(&[
        "get",
        "secret",
        "wb-secret",
        "-o",
        "jsonpath={.metadata.labels}",
    ])?;
    ensure!(
        labels.contains("edited") && labels.contains("reviewed"),
        "the allowed edits of wb-secret did not land: {labels}"
    );
    ensure!(
        secret_value(env, "wb-secret", "token")? == "pc-leak-wb-5",
        "the manifest did not apply"
    );
    ensure!(
        secret_value(env, "wb-created", "k")? == "pc-leak-wb-6",
        "the protobuf create lost its value"
    );
    let d = env.admin_ok(&["get", "deployment", "wb-deploy", "-o", "json"])?;
    ensure!(
        d.contains("pc-leak-wb-3") && d.contains("\"edited\"") && d.contains("MODE"),
        "wb-deploy after the allowed edits: {d}"
    );
    let log = audit_text(env)?;
    ensure!(
        log.contains("masking placeholder written back at"),
        "the refusals are not in the audit log"
    );
    println!(
        "    {} write-backs refused, {} real writes passed",
        refused.len(),
        allowed.len()
    );
    Ok(())
}

// ---- request bodies in the audit log ----

pub fn request_bodies_recorded_masked(env: &mut Env) -> Result<()> {
    let canaries = [
        "pc-leak-au-1",
        "pc-leak-au-2",
        "pc-leak-au-3",
        "pc-leak-au-4",
        "pc-leak-au-5",
    ];
    env.file(
        "au-ssa.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: au-ssa\n  namespace: e2e\nstringData:\n  token: pc-leak-au-1\n",
    )?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for args in [
        vec![
            "apply",
            "--server-side",
            "--field-manager=agent",
            "-f",
            "/work/au-ssa.yaml",
        ],
        vec![
            "create",
            "secret",
            "generic",
            "au-pb",
            "--from-literal=k=pc-leak-au-2",
        ],
        vec![
            "create",
            "deployment",
            "au-deploy",
            "--image=x",
            "--replicas=0",
            "--",
            "app",
            "--db-password",
            "pc-leak-au-3",
        ],
    ] {
        env.gate_ok(&args)?;
    }
    let jp = format!(
        r#"[{{"op":"replace","path":"/data/k","value":"{}"}}]"#,
        b64("pc-leak-au-4")
    );
    env.gate_ok(&["patch", "secret", "au-pb", "--type=json", "-p", &jp])?;
    env.gate_ok(&[
        "patch",
        "secret",
        "au-ssa",
        "--type=merge",
        "-p",
        r#"{"stringData":{"x":"pc-leak-au-5"}}"#,
    ])?;
    // The test can fail: the apiserver holds every value.
    ensure!(
        secret_value(env, "au-ssa", "token")? == "pc-leak-au-1",
        "au-ssa"
    );
    ensure!(secret_value(env, "au-pb", "k")? == "pc-leak-au-4", "au-pb");
    ensure!(
        secret_value(env, "au-ssa", "x")? == "pc-leak-au-5",
        "au-ssa x"
    );
    let d = env.admin_ok(&["get", "deployment", "au-deploy", "-o", "json"])?;
    ensure!(d.contains("pc-leak-au-3"), "au-deploy: {d}");
    std::thread::sleep(Duration::from_millis(300));
    let log = audit_text(env)?;
    assert_none("the daemon's audit log", &log, &canaries)?;
    // Each body is there, decoded and masked (not omitted).
    let records: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "request")
        .map(|r| r["record"].clone())
        .collect();
    // The last record of `method` on `path` whose body came as `ctype`: its content
    // type and body.
    let body_of = |method: &str, path: &str, ctype: &str| -> Result<(String, Value)> {
        records
            .iter()
            .rfind(|r| {
                r["method"] == method
                    && r["path"] == path
                    && r["content_type"].as_str().unwrap_or("").starts_with(ctype)
            })
            .map(|r| {
                (
                    r["content_type"].as_str().unwrap_or("").to_owned(),
                    r["request_body"].clone(),
                )
            })
            .with_context(|| format!("no record of {method} {path} with a {ctype} body"))
    };
    let mut kinds = Vec::new();
    for (method, path, ctype) in [
        (
            "PATCH",
            "/api/v1/namespaces/e2e/secrets/au-ssa",
            "application/apply-patch+yaml",
        ),
        (
            "POST",
            "/api/v1/namespaces/e2e/secrets",
            "application/vnd.kubernetes.protobuf",
        ),
        ("POST", "/apis/apps/v1/namespaces/e2e/deployments", ""),
        (
            "PATCH",
            "/api/v1/namespaces/e2e/secrets/au-pb",
            "application/json-patch+json",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/e2e/secrets/au-ssa",
            "application/merge-patch+json",
        ),
    ] {
        let (ctype, body) = body_of(method, path, ctype)?;
        ensure!(
            body.get("omitted").is_none() && !body.is_null(),
            "{method} {path} ({ctype}): {body}"
        );
        kinds.push(format!("{method} {ctype}"));
    }
    let (_, pb) = body_of(
        "POST",
        "/api/v1/namespaces/e2e/secrets",
        "application/vnd.kubernetes.protobuf",
    )?;
    ensure!(
        pb["metadata"]["name"] == "au-pb" && pb["data"]["k"] == crate::masking::PLACEHOLDER_B64,
        "the protobuf Secret as recorded: {pb}"
    );
    let (_, ssa) = body_of(
        "PATCH",
        "/api/v1/namespaces/e2e/secrets/au-ssa",
        "application/apply-patch+yaml",
    )?;
    ensure!(
        ssa["metadata"]["name"] == "au-ssa" && ssa["stringData"]["token"] == "portcullis-masked",
        "the server-side apply as recorded: {ssa}"
    );
    let (_, d) = body_of("POST", "/apis/apps/v1/namespaces/e2e/deployments", "")?;
    ensure!(
        d.to_string().contains("--db-password") && d.to_string().contains("portcullis-masked"),
        "the deployment as recorded: {d}"
    );
    println!("    bodies recorded decoded and masked: {kinds:?}");
    Ok(())
}
