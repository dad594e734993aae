//! Masking: canary values planted in the real apiserver and in a real container's log
//! never reach the agent on any read path, while the direct path shows them.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use portcullis_tests::gate::{Gate, POD, TARGET_POD};

use crate::{Clients, Env, identity::agent_request, python, stderr};

/// Unique marker strings planted in the real apiserver; none may reach the agent.
pub const CANARIES: &[&str] = &[
    "pc-canary-alpha-1",
    "pc-canary-alpha-2",
    "pc-canary-beta-3",
    "pc-canary-beta-4",
    "pc-canary-gamma-5",
    "PCCANARYGAMMA6",
    "pc-canary-py-7",
];

/// Markers the target pod's `canary` container writes in its log.
const LOG_CANARIES: &[&str] = &[
    "pc-log-canary-1",
    "PCLOGCANARYKEY2",
    "AKIAPCLOGCANARY34567",
    "eyJwY2xvZ2NhbmFyeSI6NH0",
];

/// Each canary as it may appear: as is, and base64-encoded (Secret data).
fn canary_forms() -> Vec<String> {
    use base64::Engine;
    CANARIES
        .iter()
        .chain(LOG_CANARIES)
        .flat_map(|c| {
            [
                c.to_string(),
                base64::engine::general_purpose::STANDARD.encode(c),
            ]
        })
        .collect()
}

pub fn assert_no_canary(what: &str, text: &str) -> Result<()> {
    for c in canary_forms() {
        ensure!(
            !text.contains(&c),
            "{what}: canary {c} reached the agent:\n{text}"
        );
    }
    Ok(())
}

fn gate_text(env: &Env, args: &[&str]) -> Result<String> {
    let o = env.gate(args)?;
    ensure!(
        o.status.success(),
        "kubectl {args:?} failed: {}",
        stderr(&o)
    );
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    ))
}

/// A GET from the agent's pod with its own token and an Accept header.
pub fn agent_get_accept(env: &Env, path: &str, accept: &str) -> Result<(u16, String, String)> {
    agent_request(env, POD, Some(&env.agent_token), path, Some(accept), &[])
}

pub const PLACEHOLDER_B64: &str = "cG9ydGN1bGxpcy1tYXNrZWQ=";

/// Waits until the canary container's `round` has been written completely.
fn canary_round(env: &Env, round: u32) -> Result<()> {
    env.trigger("canary", &format!("canary-{round}"))?;
    let t = std::time::Instant::now();
    loop {
        let log = env.admin_ok(&["logs", TARGET_POD, "-c", "canary"])?;
        if log.matches("done\n").count() as u32 >= round {
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "canary round {round} never finished: {log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn canaries(env: &mut Env) -> Result<()> {
    // Planted straight in the apiserver: generic data, apply with stringData (the
    // last-applied annotation then holds it), and credentials in a ConfigMap.
    env.admin_ok(&[
        "create",
        "secret",
        "generic",
        "canary-a",
        "--from-literal=k1=pc-canary-alpha-1",
        "--from-literal=k2=pc-canary-alpha-2",
    ])?;
    env.file(
        "canary-b.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: canary-b\n  namespace: e2e\nstringData:\n  p: pc-canary-beta-3\ndata:\n  k: cGMtY2FuYXJ5LWJldGEtNA==\n",
    )?;
    env.admin_ok(&[
        "apply",
        "-f",
        &env.host_file("canary-b.yaml").display().to_string(),
    ])?;
    env.file(
        "canary-cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: canary-cm\n  namespace: e2e\ndata:\n  app.properties: |\n    db.host=db\n    db.password=pc-canary-gamma-5\n  key.pem: |\n    -----BEGIN PRIVATE KEY-----\n    PCCANARYGAMMA6\n    -----END PRIVATE KEY-----\n",
    )?;
    env.admin_ok(&[
        "apply",
        "-f",
        &env.host_file("canary-cm.yaml").display().to_string(),
    ])?;
    canary_round(env, 1)?;
    // The test can fail: straight from the apiserver, the values are there.
    let direct = env.direct_ok(&["get", "secret", "canary-a", "-o", "yaml"])?;
    ensure!(
        direct.contains("cGMtY2FuYXJ5LWFscGhhLTE="),
        "direct: {direct}"
    );
    let direct = env.direct_ok(&["get", "secret", "canary-b", "-o", "json"])?;
    ensure!(
        direct.contains("pc-canary-beta-3"),
        "no last-applied directly: {direct}"
    );
    let direct = env.direct_ok(&["logs", TARGET_POD, "-c", "canary"])?;
    ensure!(
        direct.contains("pc-log-canary-1") && direct.contains("AKIAPCLOGCANARY34567"),
        "the real container log lacks its canaries: {direct}"
    );

    // Every read path, as the agent.
    let mut outputs = Vec::new();
    for args in [
        &["get", "secret", "canary-a", "-o", "yaml"][..],
        &["get", "secret", "canary-a", "-o", "json"],
        &["get", "secret", "canary-b", "-o", "yaml"],
        &[
            "get",
            "secret",
            "canary-b",
            "-o",
            "jsonpath={.metadata.annotations}",
        ],
        &["get", "secrets"],
        &["get", "secrets", "-o", "wide", "--show-labels"],
        &["get", "secrets", "-o", "yaml"],
        &["get", "secrets", "-o", "json"],
        &["get", "configmap", "canary-cm", "-o", "yaml"],
        &["get", "configmaps", "-o", "json"],
        &["get", "--raw", "/api/v1/namespaces/e2e/secrets"],
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/e2e/secrets?watch=1&timeoutSeconds=2",
        ],
        &["describe", "secret", "canary-a"],
        &["describe", "configmap", "canary-cm"],
        &["logs", TARGET_POD, "-c", "canary"],
    ] {
        let out = gate_text(env, args)?;
        assert_no_canary(&format!("kubectl {args:?}"), &out)?;
        outputs.push(out);
    }
    ensure!(
        outputs[0].contains(PLACEHOLDER_B64),
        "no placeholder: {}",
        outputs[0]
    );
    ensure!(
        outputs[2].contains("portcullis-masked")
            && outputs[3].contains("last-applied-configuration"),
        "last-applied not masked in place: {} {}",
        outputs[2],
        outputs[3]
    );
    ensure!(
        outputs[4].contains("canary-a") && outputs[4].contains("Opaque"),
        "table: {}",
        outputs[4]
    );
    ensure!(
        outputs[8].contains("db.password=[masked]") && outputs[8].contains("[masked:private-key]"),
        "configmap: {}",
        outputs[8]
    );
    let logs = outputs.last().context("no outputs")?;
    ensure!(
        logs.contains("password=[masked]") && logs.contains("[masked:aws-key]"),
        "logs: {logs}"
    );
    // The placeholder is valid base64: kubectl decodes it like any value.
    let v = env.gate_ok(&["get", "secret", "canary-a", "-o", "jsonpath={.data.k1}"])?;
    ensure!(v == PLACEHOLDER_B64, "{v}");

    // Table with the whole objects, protobuf asked for, and a watch through kubectl.
    let (code, _, body) = agent_get_accept(
        env,
        "/api/v1/namespaces/e2e/secrets?includeObject=Object",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )?;
    ensure!(code == 200 && body.contains("\"rows\""), "{code} {body}");
    assert_no_canary("Table includeObject=Object", &body)?;
    let (code, ctype, body) = agent_get_accept(
        env,
        "/api/v1/namespaces/e2e/secrets/canary-a",
        "application/vnd.kubernetes.protobuf",
    )?;
    ensure!(
        code == 200 && ctype.starts_with("application/json"),
        "protobuf was not negotiated to JSON: {code} {ctype}"
    );
    assert_no_canary("protobuf-asked get", &body)?;
    let lines = Gate::stream_lines(
        env.gate_cmd(&["get", "secrets", "-w", "-o", "json"]),
        30,
        {
            let mut seen_at: Option<std::time::Instant> = None;
            move |got: &[(Duration, String)]| {
                if seen_at.is_none() && got.iter().any(|(_, l)| l.contains("canary-c")) {
                    seen_at = Some(std::time::Instant::now());
                }
                seen_at.is_some_and(|t| t.elapsed() > Duration::from_millis(1500))
            }
        },
        || {
            std::thread::sleep(Duration::from_millis(500));
            env.admin_ok(&[
                "create",
                "secret",
                "generic",
                "canary-c",
                "--from-literal=k=pc-canary-alpha-1",
            ])
            .map(drop)
        },
    )?;
    let wt: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    ensure!(wt.contains("canary-c"), "watch did not show canary-c: {wt}");
    assert_no_canary("kubectl get -w", &wt)?;

    // Python client: typed read and list decode the placeholders.
    let o = python(
        env,
        POD,
        "canary_secrets.py",
        r#"
import json, sys
from kubernetes import client, config
config.load_incluster_config()
v1 = client.CoreV1Api()
v1.create_namespaced_secret("e2e", {"metadata": {"name": "canary-py"}, "stringData": {"t": "pc-canary-py-7"}})
s = v1.read_namespaced_secret("canary-py", "e2e")
l = v1.list_namespaced_secret("e2e")
print(json.dumps({"read": s.data, "list": [i.data for i in l.items]}))
"#,
        &[],
    )?;
    ensure!(o.status.success(), "python: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_no_canary("python client (create response, read, list)", &out)?;
    ensure!(out.contains(PLACEHOLDER_B64), "python: {out}");

    // logs -f: masked line by line as the container writes them (one per 300 ms in
    // the second round, triggered once the follow has started).
    let arrivals = Gate::stream_lines(
        env.gate_cmd(&["logs", "-f", TARGET_POD, "-c", "canary"]),
        30,
        |got| got.iter().filter(|(_, l)| l == "done").count() >= 2,
        || env.trigger("canary", "canary-2"),
    )?;
    let text: String = arrivals.iter().map(|(_, l)| format!("{l}\n")).collect();
    assert_no_canary("logs -f", &text)?;
    ensure!(
        text.starts_with("starting\n")
            && text.ends_with("done\n")
            && text.matches("done\n").count() == 2,
        "logs -f: {text}"
    );
    let second: Vec<_> = arrivals
        .iter()
        .skip_while(|(_, l)| l != "done")
        .skip(1)
        .collect();
    let spread = second.last().context("no lines")?.0 - second.first().context("no lines")?.0;
    ensure!(
        spread > Duration::from_millis(1000),
        "logs -f lines arrived together ({spread:?}): buffered, not streamed"
    );
    println!(
        "    {} read paths checked; logs -f lines spread over {spread:?}",
        outputs.len() + 5
    );
    Ok(())
}
