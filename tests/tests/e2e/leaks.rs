//! Masking on every response path, on the real node: the leak classes of issue 12,
//! each tried by a real agent pod against the real apiserver, each compared with the
//! same request straight to the apiserver (which shows the canary, so the test can
//! fail):
//! - a watch and a log follow sent as WebSocket upgrades (Python's websocket-client in
//!   the agent pod, every subprotocol framing) are masked message by message; other
//!   upgrade requests are served without their upgrade;
//! - credentials in structured places (split and joined argv flags, `sh -c` command
//!   strings, env literals, connection URLs, annotations, a custom resource's printer
//!   column) in Pods, ephemeral and init containers and every workload template, read
//!   as objects, lists, watches, Tables and `describe`;
//!
//! Placeholders written back and recorded request bodies are `write_back.rs`.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use portcullis_tests::gate::{Gate, POD, POD_CA, TARGET_POD};
use serde_json::Value;

use crate::{Clients, Env, run_bounded, run_pod, stderr};

/// Each canary as it may appear: as is, and base64-encoded.
fn forms(canaries: &[&str]) -> Vec<String> {
    canaries
        .iter()
        .flat_map(|c| {
            [
                c.to_string(),
                base64::engine::general_purpose::STANDARD.encode(c),
            ]
        })
        .collect()
}

pub fn assert_none(what: &str, text: &str, canaries: &[&str]) -> Result<()> {
    for c in forms(canaries) {
        ensure!(
            !text.contains(&c),
            "{what}: canary {c} reached the agent:\n{text}"
        );
    }
    Ok(())
}

pub fn assert_all(what: &str, text: &str, canaries: &[&str]) -> Result<()> {
    for c in canaries {
        ensure!(
            text.contains(c),
            "{what}: {c} missing (the test could not fail):\n{text}"
        );
    }
    Ok(())
}

// ---- WebSocket upgrades ----

/// A WebSocket client (websocket-client, as the Python `kubernetes` client uses for
/// exec): one JSON line when the handshake is done (or failed), then one per message
/// (opcode, payload in base64, arrival time), until the server closes or `secs` pass.
const WS_CLIENT: &str = r#"
import base64, json, ssl, sys, time, websocket
url, ca, token, protos, secs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), float(sys.argv[5])
def out(**kw):
    print(json.dumps(kw), flush=True)
try:
    ws = websocket.create_connection(url, header=["Authorization: Bearer " + token],
        subprotocols=protos or None, sslopt={"ca_certs": ca, "cert_reqs": ssl.CERT_REQUIRED},
        origin="https://kubernetes.default.svc", timeout=secs)
except websocket.WebSocketBadStatusException as e:
    body = getattr(e, "resp_body", None) or b""
    out(status=e.status_code, body=body.decode("latin-1") if isinstance(body, bytes) else str(body))
    sys.exit(0)
out(status=101, protocol=ws.getsubprotocol() or "")
deadline = time.time() + secs
while time.time() < deadline:
    ws.settimeout(max(0.1, deadline - time.time()))
    try:
        op, data = ws.recv_data(control_frame=True)
    except websocket.WebSocketTimeoutException:
        break
    except websocket.WebSocketConnectionClosedException:
        break
    out(op=op, data=base64.b64encode(data).decode(), t=time.time())
    if op == 8:
        break
"#;

/// What a WebSocket client saw.
#[derive(Debug, Default)]
struct WsSeen {
    status: u16,
    protocol: String,
    /// The handshake's body when it was not 101.
    body: String,
    /// Data messages (for a framed stream decoded from the subprotocol's framing:
    /// channel byte removed, base64 decoded), with their arrival time.
    data: Vec<(f64, Vec<u8>)>,
    close: bool,
}

impl WsSeen {
    /// `framed`: the payload is framed as the subprotocol says (a log, by
    /// wsstream.Reader); a watch's messages are the events themselves whatever
    /// subprotocol was echoed.
    fn parse(lines: &[String], framed: bool) -> Result<WsSeen> {
        let mut s = WsSeen::default();
        for l in lines {
            let v: Value = serde_json::from_str(l).with_context(|| format!("client said {l}"))?;
            if let Some(st) = v["status"].as_u64() {
                s.status = st as u16;
                s.protocol = v["protocol"].as_str().unwrap_or("").to_owned();
                s.body = v["body"].as_str().unwrap_or("").to_owned();
                continue;
            }
            let op = v["op"].as_u64().unwrap_or(0);
            let raw = base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap_or(""))?;
            if op == 8 {
                s.close = true;
                continue;
            }
            if op != 1 && op != 2 {
                continue;
            }
            let mut p = &raw[..];
            if framed && s.protocol.contains("channel.k8s.io") && !p.is_empty() {
                p = &p[1..];
            }
            let bytes = if framed && s.protocol.contains("base64") {
                base64::engine::general_purpose::STANDARD.decode(p.trim_ascii())?
            } else {
                p.to_vec()
            };
            s.data.push((v["t"].as_f64().unwrap_or(0.0), bytes));
        }
        Ok(s)
    }

    fn text(&self) -> String {
        self.data
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

fn ws_agent_cmd(
    env: &Env,
    path: &str,
    protos: &[&str],
    secs: u32,
) -> Result<std::process::Command> {
    let script = env.file("ws_client.py", WS_CLIENT)?;
    let url = format!("wss://{}{path}", env.cluster_ip());
    let protos = serde_json::to_string(protos)?;
    let secs = secs.to_string();
    Ok(env.in_pod(
        POD,
        &[
            "python3",
            &script,
            &url,
            POD_CA,
            &env.agent_token,
            &protos,
            &secs,
        ],
    ))
}

/// The WebSocket client in the agent pod, through the gate.
fn ws_agent(env: &Env, path: &str, protos: &[&str], secs: u32, framed: bool) -> Result<WsSeen> {
    let o = run_pod(ws_agent_cmd(env, path, protos, secs)?, None)?;
    ensure!(o.status.success(), "ws client: {}", stderr(&o));
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    WsSeen::parse(&lines, framed)
}

/// The same client on the node, straight at the apiserver as the cluster admin.
fn ws_direct(env: &Env, path: &str, protos: &[&str], secs: u32, framed: bool) -> Result<WsSeen> {
    let url = format!("{}{path}", env.api_url().replacen("https://", "wss://", 1));
    let mut c = env.node.command(&env.node.parts.python);
    c.env("PYTHONPATH", &env.node.parts.pythonpath)
        .args(["-c", WS_CLIENT])
        .arg(&url)
        .arg(&env.node.ca_pem)
        .arg(&env.node.admin_token)
        .arg(serde_json::to_string(protos)?)
        .arg(secs.to_string());
    let o = run_bounded(c, None)?;
    ensure!(o.status.success(), "direct ws client: {}", stderr(&o));
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    WsSeen::parse(&lines, framed)
}

const WS_CANARY: &str = "pc-leak-ws-1";
const LOG_CANARIES: &[&str] = &[
    "pc-log-canary-1",
    "PCLOGCANARYKEY2",
    "AKIAPCLOGCANARY34567",
    "eyJwY2xvZ2NhbmFyeSI6NH0",
];

/// Starts the next round of the target's canary container (one line every 300 ms,
/// credentials among them) and returns its number; `wait` until it is written.
fn canary_round(env: &Env, wait: bool) -> Result<u32> {
    let log = env.admin_ok(&["logs", TARGET_POD, "-c", "canary"])?;
    let round = log.matches("done\n").count() as u32 + 1;
    env.trigger("canary", &format!("canary-{round}"))?;
    let t = std::time::Instant::now();
    if !wait {
        return Ok(round);
    }
    loop {
        let log = env.admin_ok(&["logs", TARGET_POD, "-c", "canary"])?;
        if log.matches("done\n").count() as u32 >= round {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "canary round {round} never finished"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(round)
}

pub fn websocket_watch_and_logs(env: &mut Env) -> Result<()> {
    env.admin_ok(&[
        "create",
        "secret",
        "generic",
        "ws-canary",
        &format!("--from-literal=k={WS_CANARY}"),
    ])?;
    let watch = "/api/v1/namespaces/e2e/secrets?watch=1&timeoutSeconds=3&fieldSelector=metadata.name%3Dws-canary";
    // The test can fail: straight from the apiserver, the watch's WebSocket carries it.
    let direct = ws_direct(env, watch, &[], 5, false)?;
    ensure!(
        direct.status == 101,
        "direct watch over WebSocket: {direct:?}"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(WS_CANARY);
    ensure!(
        direct.text().contains(&b64),
        "direct: no canary in {}",
        direct.text()
    );

    // Through the gate, in every framing a client may ask for (the apiserver's watch
    // echoes the offered protocol and sends raw JSON events).
    for protos in [
        &[][..],
        &["base64.channel.k8s.io"],
        &["v5.channel.k8s.io"],
        &["base64.binary.k8s.io"],
    ] {
        let seen = ws_agent(env, watch, protos, 5, false)?;
        ensure!(seen.status == 101, "watch {protos:?}: {seen:?}");
        let text = seen.text();
        assert_none(&format!("WebSocket watch {protos:?}"), &text, &[WS_CANARY])?;
        let events: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("watch {protos:?}: events are not JSON: {text}"))?;
        ensure!(
            events
                .iter()
                .any(|e| e["object"]["data"]["k"] == crate::masking::PLACEHOLDER_B64),
            "watch {protos:?}: no masked event: {text}"
        );
    }

    // `logs -f` as a WebSocket: every framing wsstream.Reader offers; the lines of a
    // round written while the client follows arrive as they are written.
    let log = "/api/v1/namespaces/e2e/pods/target/log?container=canary&follow=true";
    canary_round(env, true)?;
    let direct = ws_direct(env, log, &["base64.binary.k8s.io"], 3, true)?;
    ensure!(
        direct.status == 101,
        "direct log over WebSocket: {direct:?}"
    );
    assert_all(
        "direct log",
        &direct.text(),
        &["pc-log-canary-1", "AKIAPCLOGCANARY34567"],
    )?;
    for protos in [&[][..], &["binary.k8s.io"], &["base64.binary.k8s.io"]] {
        let seen = ws_agent(env, log, protos, 3, true)?;
        ensure!(seen.status == 101, "log {protos:?}: {seen:?}");
        let text = seen.text();
        assert_none(&format!("WebSocket log {protos:?}"), &text, LOG_CANARIES)?;
        ensure!(
            text.contains("password=[masked]")
                && text.contains("[masked:aws-key]")
                && text.contains("done\n"),
            "log {protos:?}: {text}"
        );
    }
    // The client follows for 6 s; the round (8 lines, 300 ms apart) starts once it
    // is connected.
    let lines = Gate::stream_lines(
        ws_agent_cmd(env, log, &["base64.binary.k8s.io"], 6)?,
        30,
        |_: &[(Duration, String)]| false,
        || canary_round(env, false).map(drop),
    )?;
    let raw: Vec<String> = lines.iter().map(|(_, l)| l.clone()).collect();
    let seen = WsSeen::parse(&raw, true)?;
    assert_none("WebSocket logs -f", &seen.text(), LOG_CANARIES)?;
    let times: Vec<f64> = seen
        .data
        .iter()
        .filter(|(_, b)| !b.is_empty())
        .map(|(t, _)| *t)
        .collect();
    let spread = times.last().copied().unwrap_or(0.0)
        - times
            .get(times.len().saturating_sub(6))
            .copied()
            .unwrap_or(0.0);
    ensure!(
        spread > 1.0,
        "WebSocket logs -f: the last lines arrived together ({spread:.2} s): {raw:?}"
    );

    // Other requests that ask to switch are served as what they also are: plain, masked.
    let get = "/api/v1/namespaces/e2e/secrets/ws-canary";
    let seen = ws_agent(env, get, &["v5.channel.k8s.io"], 3, false)?;
    ensure!(seen.status != 101, "a plain GET was switched: {seen:?}");
    assert_none(
        "a GET sent as a WebSocket",
        &format!("{seen:?}"),
        &[WS_CANARY],
    )?;
    for (what, path, headers) in [
        (
            "SPDY watch",
            watch,
            vec![
                ("Connection", "Upgrade"),
                ("Upgrade", "SPDY/3.1"),
                ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
            ],
        ),
        (
            "h2c GET",
            get,
            vec![("Connection", "Upgrade"), ("Upgrade", "h2c")],
        ),
    ] {
        let (code, _, body) = raw_upgrade(env, path, &headers)?;
        ensure!(code == 200, "{what}: {code} {body}");
        assert_none(what, &body, &[WS_CANARY])?;
        ensure!(
            body.contains(crate::masking::PLACEHOLDER_B64),
            "{what}: {body}"
        );
    }
    // The interactive byte stream still works where policy allows it (exec).
    let o = env.gate(&[
        "exec",
        TARGET_POD,
        "-c",
        "main",
        "--",
        "echo",
        "still-interactive",
    ])?;
    ensure!(
        String::from_utf8_lossy(&o.stdout).contains("still-interactive"),
        "exec: {}",
        stderr(&o)
    );
    println!(
        "    watch in 4 framings, logs in 3, lines spread over {spread:.1} s, 3 stripped upgrades"
    );
    Ok(())
}

/// A request with raw upgrade headers from the agent pod (http.client: urllib would
/// set `Connection: close`): (status, headers, body; no body read after a 101).
fn raw_upgrade(env: &Env, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String, String)> {
    const PY: &str = r#"
import http.client, json, ssl, sys
host, path, ca, token, extra = sys.argv[1:6]
c = http.client.HTTPSConnection(host, context=ssl.create_default_context(cafile=ca), timeout=20)
c.putrequest("GET", path, skip_accept_encoding=True)
c.putheader("Authorization", "Bearer " + token)
for k, v in json.loads(extra):
    c.putheader(k, v)
c.endheaders()
r = c.getresponse()
body = r.read() if r.status != 101 else b""
print(json.dumps({"code": r.status, "headers": str(r.getheaders()), "body": body.decode("latin-1")}))
"#;
    let host = env
        .cluster_ip()
        .split(':')
        .next()
        .unwrap_or("10.96.0.1")
        .to_owned();
    let o = run_bounded(
        env.in_pod(
            POD,
            &[
                "python3",
                "-c",
                PY,
                &host,
                path,
                POD_CA,
                &env.agent_token,
                &serde_json::to_string(headers)?,
            ],
        ),
        None,
    )?;
    let v: Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "python said {} {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        )
    })?;
    Ok((
        v["code"].as_u64().unwrap_or(0) as u16,
        v["headers"].as_str().unwrap_or("").to_owned(),
        v["body"].as_str().unwrap_or("").to_owned(),
    ))
}

// ---- credentials in structured places ----

const WL: &[&str] = &[
    "pc-leak-wl-1",
    "pc-leak-wl-2",
    "pc-leak-wl-3",
    "pc-leak-wl-4",
    "pc-leak-wl-5",
    "pc-leak-wl-6",
    "pc-leak-wl-7",
    "pc-leak-wl-8",
    "pc-leak-wl-9",
    "pc-leak-wl-10",
    "pc-leak-wl-11",
    "pc-leak-wl-12",
];
const EPHEMERAL: &[&str] = &["pc-leak-wl-13", "pc-leak-wl-14"];
const CR_CANARIES: &[&str] = &["pc-leak-wl-15", "pc-leak-wl-16"];

/// A pod template with a credential in every structured place the issue names.
fn template(labels: &str, indent: usize) -> String {
    let img = portcullis_tests::node::WORKLOAD_IMAGE;
    let t = format!(
        r#"metadata:
  labels: {{app: {labels}}}
  annotations:
    example.com/db-password: pc-leak-wl-10
    example.com/dsn: "mysql://root:pc-leak-wl-11@db/x"
    example.com/run: "app --api-token pc-leak-wl-12"
spec:
  terminationGracePeriodSeconds: 1
  restartPolicy: {{restart}}
  initContainers:
  - name: init
    image: {img}
    imagePullPolicy: Never
    command: ["sh", "-c", "PASSWORD=pc-leak-wl-1 DB_PASS=pc-leak-wl-2 true --api-token pc-leak-wl-3"]
  containers:
  - name: app
    image: {img}
    imagePullPolicy: Never
    command: ["sh", "-c", "sleep 3600", "app"]
    args: ["--db-password", "pc-leak-wl-4", "--db-pass=pc-leak-wl-5", "--client-secret", "pc-leak-wl-6", "--port", "8080"]
    env:
    - {{name: DB_PASSWORD, value: pc-leak-wl-7}}
    - {{name: STRIPE_KEY, value: pc-leak-wl-8}}
    - {{name: DATABASE_URL, value: "postgres://app:pc-leak-wl-9@db:5432/app"}}
    - {{name: MODE, value: fast}}
"#
    );
    let pad = " ".repeat(indent);
    t.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn workloads() -> String {
    let always = template("creds", 4).replace("{restart}", "Always");
    let never = template("creds-job", 4).replace("{restart}", "Never");
    let job_never = template("creds-cj", 8).replace("{restart}", "Never");
    let pod = template("creds-pod", 0).replace("{restart}", "Always");
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: creds-deploy, namespace: e2e}}
spec:
  replicas: 0
  selector: {{matchLabels: {{app: creds}}}}
  template:
{always}---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: creds-sts, namespace: e2e}}
spec:
  replicas: 0
  serviceName: creds
  selector: {{matchLabels: {{app: creds}}}}
  template:
{always}---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: creds-ds, namespace: e2e}}
spec:
  selector: {{matchLabels: {{app: creds}}}}
  template:
{ds}---
apiVersion: batch/v1
kind: Job
metadata: {{name: creds-job, namespace: e2e}}
spec:
  suspend: true
  template:
{never}---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: creds-cj, namespace: e2e}}
spec:
  schedule: "0 0 1 1 *"
  suspend: true
  jobTemplate:
    spec:
      template:
{job_never}---
apiVersion: v1
kind: Pod
metadata:
  name: creds-pod
  namespace: e2e
{pod_rest}"#,
        // The DaemonSet's pods would land on the node: it selects no node.
        ds = always.replace(
            "    spec:\n      terminationGracePeriodSeconds: 1\n",
            "    spec:\n      terminationGracePeriodSeconds: 1\n      nodeSelector: {pc-none: none}\n"
        ),
        pod_rest = pod.replacen("metadata:\n", "", 1),
    )
}

const VAULT_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: vaults.e2e.portcullis.dev
spec:
  group: e2e.portcullis.dev
  names: {kind: Vault, plural: vaults, singular: vault}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
    additionalPrinterColumns:
    - {name: Token, type: string, jsonPath: .spec.auth.apiToken}
    - {name: Endpoint, type: string, jsonPath: .spec.endpoint}
    - {name: Mode, type: string, jsonPath: .spec.mode}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: vaults-edit, namespace: e2e}
rules:
- apiGroups: [e2e.portcullis.dev]
  resources: [vaults]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: vaults-edit, namespace: e2e}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: vaults-edit}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "portcullis:agents"}
"#;

const VAULT: &str = r#"apiVersion: e2e.portcullis.dev/v1
kind: Vault
metadata: {name: main, namespace: e2e}
spec:
  auth: {apiToken: pc-leak-wl-15}
  endpoint: "https://svc:pc-leak-wl-16@vault.internal"
  mode: fast
"#;

pub fn apply_file(env: &Env, name: &str, text: &str) -> Result<()> {
    env.file(name, text)?;
    env.admin_ok(&["apply", "-f", &env.host_file(name).display().to_string()])
        .map(drop)
}

pub fn structured_credentials(env: &mut Env) -> Result<()> {
    apply_file(env, "creds-workloads.yaml", &workloads())?;
    apply_file(env, "vault-crd.yaml", VAULT_CRD)?;
    let t = std::time::Instant::now();
    while apply_file(env, "vault.yaml", VAULT).is_err() {
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the Vault CRD never served"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    env.admin_ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/creds-pod",
        "--timeout=60s",
    ])?;
    let img = portcullis_tests::node::WORKLOAD_IMAGE;
    let ephemeral = serde_json::json!({"spec": {"ephemeralContainers": [{
        "name": "dbg", "image": img, "imagePullPolicy": "Never",
        "command": ["sh", "-c", "sleep 1"], "args": ["--api-token", "pc-leak-wl-13"],
        "env": [{"name": "API_TOKEN", "value": "pc-leak-wl-14"}]}]}});
    env.admin_ok(&[
        "patch",
        "pod",
        "creds-pod",
        "--subresource=ephemeralcontainers",
        "--type=strategic",
        "-p",
        &ephemeral.to_string(),
    ])?;
    // The test can fail: straight from the apiserver, every canary is there.
    let all: Vec<&str> = WL
        .iter()
        .chain(EPHEMERAL)
        .chain(CR_CANARIES)
        .copied()
        .collect();
    let direct = format!(
        "{}{}{}",
        env.direct_ok(&[
            "get",
            "deployments,statefulsets,daemonsets,jobs,cronjobs",
            "-o",
            "yaml"
        ])?,
        env.direct_ok(&["get", "pod", "creds-pod", "-o", "yaml"])?,
        env.direct_ok(&["get", "vaults"])?
    );
    assert_all("direct", &direct, &all)?;

    let mut checked = 0;
    for args in [
        &["get", "deployment", "creds-deploy", "-o", "yaml"][..],
        &["get", "deployment", "creds-deploy", "-o", "json"],
        &["get", "statefulsets,daemonsets,jobs,cronjobs", "-o", "yaml"],
        &["get", "deployments", "-o", "json"],
        &["get", "pod", "creds-pod", "-o", "json"],
        &["get", "pods", "-o", "yaml"],
        &["get", "pods,deployments,cronjobs", "-o", "wide"],
        &["get", "vaults"],
        &["get", "vaults", "-o", "wide"],
        &["get", "vault", "main", "-o", "yaml"],
        &["describe", "deployment", "creds-deploy"],
        &["describe", "pod", "creds-pod"],
        &["describe", "cronjob", "creds-cj"],
        &["describe", "statefulset", "creds-sts"],
        &[
            "get",
            "--raw",
            "/apis/apps/v1/namespaces/e2e/deployments?watch=1&timeoutSeconds=2",
        ],
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/e2e/pods?watch=1&timeoutSeconds=2&fieldSelector=metadata.name%3Dcreds-pod",
        ],
        &["get", "events"],
    ] {
        let o = env.gate(args)?;
        ensure!(o.status.success(), "{args:?}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert_none(&format!("kubectl {args:?}"), &out, &all)?;
        checked += 1;
        if args == ["get", "deployment", "creds-deploy", "-o", "json"] {
            let v: Value = serde_json::from_str(&out)?;
            let c = &v["spec"]["template"]["spec"]["containers"][0];
            ensure!(
                c["args"][5] == "--port"
                    && c["args"][6] == "8080"
                    && c["env"][3]["value"] == "fast"
                    && c["image"] == img,
                "non-credential fields changed: {c}"
            );
            ensure!(
                c["env"][2]["value"] == "postgres://app:[masked]@db:5432/app",
                "the URL lost more than its password: {c}"
            );
        }
        if args == ["get", "vaults"] {
            ensure!(
                out.contains("main") && out.contains("fast"),
                "vault table: {out}"
            );
        }
    }
    // Tables with whole objects, and a watch as kubectl runs it.
    for accept in [
        "application/json;as=Table;v=v1;g=meta.k8s.io",
        "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io",
    ] {
        let (code, _, body) = crate::masking::agent_get_accept(
            env,
            "/apis/apps/v1/namespaces/e2e/deployments?includeObject=Object",
            accept,
        )?;
        ensure!(code == 200 && body.contains("\"rows\""), "{code} {body}");
        assert_none("Table includeObject=Object", &body, &all)?;
    }
    let lines = Gate::stream_lines(
        env.gate_cmd(&["get", "pods", "-w", "-o", "json"]),
        20,
        |got| got.iter().filter(|(_, l)| l.contains("creds-pod")).count() > 1,
        || Ok(()),
    )?;
    let wt: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    ensure!(wt.contains("creds-pod"), "watch: {wt}");
    assert_none("kubectl get pods -w -o json", &wt, &all)?;
    println!("    {} read paths of 7 kinds checked", checked + 3);
    Ok(())
}
