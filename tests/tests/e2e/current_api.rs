//! What only a current apiserver exposes: pretty-printed responses and curl-style
//! User-Agents, aggregated discovery v2, a client-go informer with WatchList, a CRD
//! whose objects carry credentials, CBOR, and WebSocket exec authorized as `create`.
use std::process::Stdio;

use anyhow::{Context, Result, ensure};
use portcullis_tests::gate::{NAMESPACE, POD, TARGET_POD};

use crate::{
    Clients, Env, identity::agent_request, masking::PLACEHOLDER_B64, policy::gate_as, run_bounded,
    stderr,
};

/// One HTTPS GET straight at the apiserver from the node (admin token): (code,
/// Content-Type, body as latin-1).
fn direct_request(
    env: &Env,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, String)> {
    const PY: &str = r#"
import json, ssl, sys, urllib.request, urllib.error
url, ca, token, extra = sys.argv[1:5]
req = urllib.request.Request(url)
req.add_header("Authorization", "Bearer " + token)
for k, v in json.loads(extra):
    req.add_header(k, v)
ctx = ssl.create_default_context(cafile=ca)
try:
    r = urllib.request.urlopen(req, context=ctx, timeout=20)
    print(json.dumps({"code": r.status, "type": r.headers.get("Content-Type", ""), "body": r.read().decode("latin-1")}))
except urllib.error.HTTPError as e:
    print(json.dumps({"code": e.code, "type": e.headers.get("Content-Type", ""), "body": e.read().decode("latin-1")}))
"#;
    let url = format!("{}{path}", env.api_url());
    let mut c = env.node.command(&env.node.parts.python);
    c.args(["-c", PY])
        .arg(&url)
        .arg(&env.node.ca_pem)
        .arg(&env.node.admin_token)
        .arg(serde_json::to_string(headers)?);
    let o = run_bounded(c, None)?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "python said {} {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        )
    })?;
    Ok((
        v["code"].as_u64().unwrap_or(0) as u16,
        v["type"].as_str().unwrap_or("").to_owned(),
        v["body"].as_str().unwrap_or("").to_owned(),
    ))
}

fn agent(env: &Env, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String, String)> {
    agent_request(env, POD, Some(&env.agent_token), path, None, headers)
}

const SECRET_PATH: &str = "/api/v1/namespaces/e2e/secrets/pretty-secret";

pub fn pretty_and_user_agents(env: &mut Env) -> Result<()> {
    env.admin_ok(&[
        "create",
        "secret",
        "generic",
        "pretty-secret",
        "--from-literal=k=pc-canary-alpha-1",
    ])?;
    env.admin_ok(&[
        "create",
        "configmap",
        "pretty-cm",
        "--from-literal=colour=teal",
    ])?;
    // The apiserver pretty-prints for ?pretty=true and for curl/wget/browser agents
    // (the 1.20 build crashed on exactly this). Each answer: valid JSON, equal to the
    // direct one as a value, and a Secret masked.
    let cm = "/api/v1/namespaces/e2e/configmaps/pretty-cm";
    for (what, path, headers) in [
        ("?pretty=true", format!("{cm}?pretty=true"), vec![]),
        (
            "curl User-Agent",
            cm.to_string(),
            vec![("User-Agent", "curl/8.11.0")],
        ),
        (
            "wget User-Agent",
            cm.to_string(),
            vec![("User-Agent", "Wget/1.21")],
        ),
    ] {
        let (code, _, body) = agent(env, &path, &headers)?;
        let (dcode, _, dbody) = direct_request(env, &path, &headers)?;
        ensure!(
            code == 200 && dcode == 200,
            "{what}: gate {code}, direct {dcode}: {body}"
        );
        ensure!(
            dbody.contains("\n    "),
            "{what}: the direct answer is not pretty-printed: {dbody}"
        );
        let g: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("{what}: {body}"))?;
        let d: serde_json::Value = serde_json::from_str(&dbody)?;
        ensure!(g == d, "{what}: gate and direct differ:\n{g}\n{d}");
    }
    for (what, path, headers) in [
        ("?pretty=true", format!("{SECRET_PATH}?pretty=true"), vec![]),
        (
            "curl User-Agent",
            SECRET_PATH.to_string(),
            vec![("User-Agent", "curl/8.11.0")],
        ),
    ] {
        let (code, _, body) = agent(env, &path, &headers)?;
        ensure!(code == 200, "{what}: {code} {body}");
        crate::masking::assert_no_canary(&format!("pretty Secret ({what})"), &body)?;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("{what}: {body}"))?;
        ensure!(v["data"]["k"] == PLACEHOLDER_B64, "{what}: {v}");
    }
    // kubectl with --raw and pretty, through the gate.
    let out = env.gate_ok(&["get", "--raw", &format!("{SECRET_PATH}?pretty=true")])?;
    crate::masking::assert_no_canary("kubectl get --raw ?pretty=true", &out)?;
    Ok(())
}

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub fn aggregated_discovery(env: &mut Env) -> Result<()> {
    for path in ["/api", "/apis"] {
        let (code, ctype, body) = agent(env, path, &[("Accept", AGGREGATED)])?;
        ensure!(code == 200, "{path}: {code} {body}");
        ensure!(
            ctype.contains("apidiscovery.k8s.io") && ctype.contains("v=v2"),
            "{path}: aggregated discovery not served through the gate: {ctype}"
        );
        let v: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(
            v["kind"] == "APIGroupDiscoveryList",
            "{path}: {}",
            v["kind"]
        );
        let (_, dtype, dbody) = direct_request(env, path, &[("Accept", AGGREGATED)])?;
        let d: serde_json::Value = serde_json::from_str(&dbody)?;
        ensure!(ctype == dtype, "{path}: {ctype} vs {dtype}");
        ensure!(v == d, "{path}: aggregated discovery differs from direct");
    }
    // kubectl's discovery through the gate asks for exactly this (one request per
    // root, no per-group fallback).
    let o = env.gate(&["api-resources", "-v=6"])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    ensure!(
        !e.contains("/apis/apps/v1 200"),
        "kubectl fell back to per-group discovery: {}",
        crate::tail(&e, 20)
    );
    Ok(())
}

pub fn watchlist_informer(env: &mut Env) -> Result<()> {
    env.admin_ok(&[
        "create",
        "secret",
        "generic",
        "informer-secret",
        "--from-literal=k=pc-canary-alpha-2",
    ])?;
    let before = env.apiserver_audit().len();
    let o = run_bounded(
        env.in_pod(POD, &["pc-informer", "--namespace", NAMESPACE]),
        None,
    )?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(o.status.success(), "pc-informer: {out} {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    ensure!(
        v["watchlist"] == true,
        "client-go did not enable WatchList: {v}"
    );
    ensure!(v["synced"] == true, "informer caches never synced: {v}");
    let ms = v["synced_ms"].as_u64().unwrap_or(u64::MAX);
    // A dropped or delayed initial-events-end bookmark stalls the sync ~10 s.
    ensure!(
        ms < 5000,
        "informer synced only after {ms} ms (bookmark stalled?)"
    );
    ensure!(
        v["secrets"]["informer-secret"]["k"] == PLACEHOLDER_B64,
        "the informer cache holds an unmasked Secret: {v}"
    );
    crate::masking::assert_no_canary("client-go informer cache", &out)?;
    // Proof that it was a WatchList stream through the gate, not list + watch.
    let watchlist = env.apiserver_audit()[before..].iter().any(|e| {
        e["verb"] == "watch"
            && e["objectRef"]["resource"] == "secrets"
            && e["requestURI"]
                .as_str()
                .is_some_and(|u| u.contains("sendInitialEvents=true"))
            && e["impersonatedUser"]["username"] == portcullis_tests::gate::AGENT_USER
    });
    ensure!(
        watchlist,
        "no sendInitialEvents watch for secrets reached the apiserver"
    );
    println!("    informer synced through the gate in {ms} ms with WatchList");
    Ok(())
}

const CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: databases.e2e.portcullis.dev
spec:
  group: e2e.portcullis.dev
  names: {kind: Database, plural: databases, singular: database}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;

const CR: &str = r#"apiVersion: e2e.portcullis.dev/v1
kind: Database
metadata:
  name: orders
  namespace: e2e
spec:
  host: db.internal
  password: pc-canary-beta-3
  connection:
    token: pc-canary-beta-4
  args: ["--verbose"]
  note: "aws key AKIAPCLOGCANARY34567 in a free-text field"
"#;

/// The agents' scoped identity may use the custom resource (the built-in `edit` role
/// does not cover custom resources).
const CRD_RBAC: &str = r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: databases-edit, namespace: e2e}
rules:
- apiGroups: [e2e.portcullis.dev]
  resources: [databases]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: databases-edit, namespace: e2e}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: databases-edit}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "portcullis:agents"}
"#;

pub fn crd_masking(env: &mut Env) -> Result<()> {
    env.node.apply(CRD_RBAC)?;
    env.file("crd.yaml", CRD)?;
    env.admin_ok(&[
        "apply",
        "-f",
        &env.host_file("crd.yaml").display().to_string(),
    ])?;
    let t = std::time::Instant::now();
    while !env
        .admin(&[
            "get",
            "crd",
            "databases.e2e.portcullis.dev",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ])?
        .stdout
        .starts_with(b"True")
    {
        ensure!(t.elapsed().as_secs() < 30, "CRD never established");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    env.file("cr.yaml", CR)?;
    env.admin_ok(&[
        "apply",
        "-f",
        &env.host_file("cr.yaml").display().to_string(),
    ])?;
    let direct = env.direct_ok(&["get", "databases", "orders", "-o", "json"])?;
    ensure!(direct.contains("pc-canary-beta-3"), "direct: {direct}");
    for args in [
        &["get", "databases", "orders", "-o", "json"][..],
        &["get", "databases", "-o", "yaml"],
        &["get", "databases"],
        &[
            "get",
            "--raw",
            "/apis/e2e.portcullis.dev/v1/namespaces/e2e/databases/orders?pretty=true",
        ],
    ] {
        let o = env.gate(args)?;
        ensure!(o.status.success(), "{args:?}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        crate::masking::assert_no_canary(&format!("custom resource {args:?}"), &out)?;
        if args.contains(&"json") {
            let v: serde_json::Value = serde_json::from_str(&out)?;
            ensure!(
                v["spec"]["host"] == "db.internal",
                "non-credential field changed: {v}"
            );
        }
    }
    Ok(())
}

pub fn cbor(env: &mut Env) -> Result<()> {
    env.admin_ok(&[
        "create",
        "secret",
        "generic",
        "cbor-secret",
        "--from-literal=k=pc-canary-gamma-5",
    ])?;
    let path = "/api/v1/namespaces/e2e/secrets/cbor-secret";
    // The test can fail: directly, the apiserver (CBORServingAndStorage on) answers CBOR.
    let (code, ctype, body) = direct_request(env, path, &[("Accept", "application/cbor")])?;
    ensure!(
        code == 200 && ctype.starts_with("application/cbor"),
        "the apiserver does not serve CBOR directly: {code} {ctype}"
    );
    ensure!(
        body.contains("pc-canary-gamma-5"),
        "the direct CBOR body lacks the value"
    );
    // Through the gate: masked (negotiated to JSON) or refused, never CBOR with the value.
    for (what, p, accept) in [
        ("get", path.to_string(), "application/cbor"),
        (
            "list",
            "/api/v1/namespaces/e2e/secrets".to_string(),
            "application/cbor",
        ),
        (
            "watch",
            "/api/v1/namespaces/e2e/secrets?watch=1&timeoutSeconds=2".to_string(),
            "application/cbor-seq",
        ),
        (
            "get, CBOR preferred",
            path.to_string(),
            "application/cbor;q=1, application/json;q=0.5",
        ),
    ] {
        let (code, ctype, body) = agent(env, &p, &[("Accept", accept)])?;
        ensure!(
            !ctype.starts_with("application/cbor"),
            "{what}: CBOR passed through the gate ({code} {ctype})"
        );
        crate::masking::assert_no_canary(&format!("CBOR {what}"), &body)?;
        ensure!(
            code == 200 || code == 406 || code == 502,
            "{what}: unexpected {code} {ctype} {body}"
        );
    }
    // client-go asking for CBOR (its feature gates on): kubectl still works and masks.
    let o = crate::run_pod(
        env.gate_cmd_env(
            &[
                ("KUBE_FEATURE_ClientsAllowCBOR", "true"),
                ("KUBE_FEATURE_ClientsPreferCBOR", "true"),
            ],
            &["get", "secret", "cbor-secret", "-o", "json"],
        ),
        None,
    )?;
    let out = String::from_utf8_lossy(&o.stdout);
    crate::masking::assert_no_canary("kubectl with CBOR preferred", &out)?;
    ensure!(
        o.status.success(),
        "kubectl with CBOR preferred failed: {}",
        stderr(&o)
    );
    Ok(())
}

pub fn websocket_exec_is_create(env: &mut Env) -> Result<()> {
    // The agent's WebSocket exec (a GET) is recorded and decided as `create`, as the
    // 1.35+ apiserver authorizes it.
    let o = env.gate(&["exec", TARGET_POD, "-c", "main", "--", "echo", "ws-create"])?;
    ensure!(o.status.success(), "exec: {}", stderr(&o));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = crate::audit_text(env)?;
    let rec = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "request")
        .find(|r| {
            r["record"]["query"]
                .as_str()
                .is_some_and(|q| q.contains("ws-create"))
        })
        .context("no request record for the WebSocket exec")?;
    let r = &rec["record"];
    ensure!(
        r["method"] == "GET"
            && r["upgrade"] == true
            && r["attributes"]["verb"] == "create"
            && r["attributes"]["subresource"] == "exec",
        "WebSocket exec not resolved as create: {r}"
    );
    // A subject allowed only `get` on pods/exec cannot exec over WebSocket.
    let bob = crate::identity::oidc(env, "bob", &["execget"])?;
    let o = gate_as(
        env,
        &bob,
        &["exec", TARGET_POD, "-c", "main", "--", "echo", "get-only"],
    )?;
    ensure!(
        !o.status.success() && stderr(&o).contains("no policy rule allows"),
        "get-only subject exec'd over WebSocket: {}",
        stderr(&o)
    );
    let o = gate_as(env, &bob, &["get", "pod", TARGET_POD, "-o", "name"])?;
    ensure!(o.status.success(), "bob's read: {}", stderr(&o));
    let _ = Stdio::null();
    Ok(())
}
