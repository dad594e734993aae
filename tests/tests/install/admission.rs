//! The admission webhook: CA trust for unmodified agent pods, the guard (each refusal
//! naming its field), agents' children (workloads an agent creates are agents and
//! cannot shed the label), and its failure policy (no webhook: no agent pod).
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use portcullis_tests::{
    gate::{NAMESPACE, POD, POD_CA},
    install, node,
};

use crate::{Env, run};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pem_count(s: &str) -> usize {
    s.matches("-----BEGIN CERTIFICATE-----").count()
}

pub fn ca_trust(env: &mut Env) -> Result<()> {
    // The agent pod's image, command and kubeconfig are untouched: its in-cluster
    // ca.crt now holds the cluster CA and the interception CA.
    let ca = env.node.kubectl_ok(&[
        "exec", "-n", NAMESPACE, POD, "-c", "main", "--", "cat", POD_CA,
    ])?;
    let interception = std::fs::read_to_string(env.state_dir().join("ca/ca.crt"))?;
    let cluster = std::fs::read_to_string(&env.node.ca_pem)?;
    ensure!(
        ca.contains(interception.trim()) && ca.contains(cluster.trim()),
        "the agent's ca.crt ({} certificates) lacks the cluster CA or the interception CA",
        pem_count(&ca)
    );
    // A pod that is not an agent keeps the cluster's own bundle.
    let by = env.node.kubectl_ok(&[
        "exec",
        "-n",
        NAMESPACE,
        portcullis_tests::gate::BYSTANDER_POD,
        "-c",
        "main",
        "--",
        "cat",
        POD_CA,
    ])?;
    ensure!(
        !by.contains(interception.trim()),
        "a non-agent pod trusts the interception CA"
    );
    Ok(())
}

/// (what, the pod spec fragment, the field the refusal must name)
const ESCAPES: &[(&str, &str, &str)] = &[
    (
        "privileged",
        "containers: [{name: c, image: IMG, securityContext: {privileged: true}}]",
        "spec.containers[0].securityContext.privileged",
    ),
    (
        "hostNetwork",
        "hostNetwork: true\n  containers: [{name: c, image: IMG}]",
        "spec.hostNetwork",
    ),
    (
        "hostPID",
        "hostPID: true\n  containers: [{name: c, image: IMG}]",
        "spec.hostPID",
    ),
    (
        "hostIPC",
        "hostIPC: true\n  containers: [{name: c, image: IMG}]",
        "spec.hostIPC",
    ),
    (
        "hostPath bpffs",
        "volumes: [{name: b, hostPath: {path: /sys/fs/bpf}}]\n  containers: [{name: c, image: IMG}]",
        "spec.volumes[0].hostPath",
    ),
    (
        "hostPath cgroupfs",
        "volumes: [{name: b, hostPath: {path: /sys/fs/cgroup}}]\n  containers: [{name: c, image: IMG}]",
        "spec.volumes[0].hostPath",
    ),
    (
        "hostPath state",
        "volumes: [{name: b, hostPath: {path: /var/lib/portcullis}}]\n  containers: [{name: c, image: IMG}]",
        "spec.volumes[0].hostPath",
    ),
    (
        "NET_RAW",
        "containers: [{name: c, image: IMG, securityContext: {capabilities: {add: [NET_RAW]}}}]",
        "spec.containers[0].securityContext.capabilities.add[0]",
    ),
    (
        "NET_ADMIN",
        "containers: [{name: c, image: IMG, securityContext: {capabilities: {add: [NET_ADMIN]}}}]",
        "spec.containers[0].securityContext.capabilities.add[0]",
    ),
    (
        "SYS_ADMIN",
        "containers: [{name: c, image: IMG, securityContext: {capabilities: {add: [SYS_ADMIN]}}}]",
        "spec.containers[0].securityContext.capabilities.add[0]",
    ),
    (
        "BPF",
        "containers: [{name: c, image: IMG, securityContext: {capabilities: {add: [CAP_BPF]}}}]",
        "spec.containers[0].securityContext.capabilities.add[0]",
    ),
    (
        "SYS_PTRACE",
        "initContainers: [{name: i, image: IMG, securityContext: {capabilities: {add: [SYS_PTRACE]}}}]\n  containers: [{name: c, image: IMG}]",
        "spec.initContainers[0].securityContext.capabilities.add[0]",
    ),
    (
        "runtimeClass",
        "runtimeClassName: kata\n  containers: [{name: c, image: IMG}]",
        "spec.runtimeClassName",
    ),
];

pub fn guard(env: &mut Env) -> Result<()> {
    // The RuntimeClass must exist, or the apiserver's own RuntimeClass admission refuses
    // the pod before the webhook is asked.
    env.node.apply(
        "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: kata}\nhandler: kata\n",
    )?;
    let r = guard_cases(env);
    let _ = env
        .node
        .kubectl(&["delete", "runtimeclass", "kata", "--ignore-not-found"]);
    r
}

fn guard_cases(env: &mut Env) -> Result<()> {
    for (i, (what, spec, field)) in ESCAPES.iter().enumerate() {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: escape-{i}\n  namespace: {NAMESPACE}\n  labels: {{portcullis.dev/agent: \"true\"}}\nspec:\n  {}\n",
            spec.replace("IMG", node::WORKLOAD_IMAGE)
        );
        let o = node::run_with_stdin(&mut env.node.kubectl_cmd(&["apply", "-f", "-"]), &yaml)?;
        let t = text(&o);
        ensure!(!o.status.success(), "{what}: admitted\n{yaml}");
        ensure!(
            t.contains("portcullis") && t.contains(field),
            "{what}: refused without naming {field}: {t}"
        );
    }
    // The same through the gate, by the agent itself (no label: it is the agent's).
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: agent-escape\nspec:\n  hostNetwork: true\n  containers: [{{name: c, image: {}}}]\n",
        node::WORKLOAD_IMAGE
    );
    let path = env.file("agent-escape.yaml", &yaml)?;
    let o = run(env.gate_cmd(&["apply", "-f", &path]))?;
    ensure!(!o.status.success(), "the agent created a hostNetwork pod");
    ensure!(text(&o).contains("spec.hostNetwork"), "{}", text(&o));
    Ok(())
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn children(env: &mut Env) -> Result<()> {
    // The agent creates a Deployment (a would-be relay) through the gate.
    let o = run(env.gate_cmd(&[
        "create",
        "deployment",
        "relay",
        &format!("--image={}", node::AGENT_IMAGE),
        "--",
        "sleep",
        "3600",
    ]))?;
    ensure!(o.status.success(), "agent create deployment: {}", text(&o));
    let label = env.node.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "get",
        "deployment",
        "relay",
        "-o",
        "jsonpath={.spec.template.metadata.labels.portcullis\\.dev/agent}",
    ])?;
    ensure!(label == "true", "template label: `{label}`");
    // Its pod is an agent: barrier injected, enrolled, its connections gated.
    let pod = wait_for("the relay's pod running", 90, || {
        let o = env.node.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            "app=relay",
            "-o",
            "jsonpath={range .items[?(@.status.phase==\"Running\")]}{.metadata.name}{end}",
        ])?;
        let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
        Ok((!name.is_empty()).then_some(name))
    })?;
    let init = env.node.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "get",
        "pod",
        &pod,
        "-o",
        "jsonpath={.spec.initContainers[0].name}",
    ])?;
    ensure!(init == "portcullis-barrier", "relay pod init: {init}");
    let uid = env.node.pod_uid(NAMESPACE, &pod)?;
    let id = std::fs::metadata(env.node.pod_cgroup(&uid)?)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))?;
    let enrolled = crate::enroll::enrolled_ids(env)?;
    ensure!(enrolled.contains(&id), "the relay pod is not enrolled");
    // The agent cannot shed the label, on the Deployment or its template.
    for args in [
        vec!["label", "deployment", "relay", "portcullis.dev/agent-"],
        vec![
            "patch",
            "deployment",
            "relay",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/template/metadata/labels/portcullis.dev~1agent"}]"#,
        ],
    ] {
        // Refused, or put back by the mutating webhook: either way it stays.
        let o = run(env.gate_cmd(&args))?;
        for path in [
            "{.metadata.labels.portcullis\\.dev/agent}",
            "{.spec.template.metadata.labels.portcullis\\.dev/agent}",
        ] {
            let v = env.node.kubectl_ok(&[
                "-n",
                NAMESPACE,
                "get",
                "deployment",
                "relay",
                "-o",
                &format!("jsonpath={path}"),
            ])?;
            ensure!(
                v == "true",
                "{args:?} removed the label ({path}): {}",
                text(&o)
            );
        }
    }
    // Nor from its own pod (pods are shaped once, so the removal is refused).
    let o = run(env.gate_cmd(&["label", "pod", POD, "portcullis.dev/agent-"]))?;
    ensure!(
        !o.status.success() && text(&o).contains("agent label cannot be removed"),
        "unlabelling its own pod: {}",
        text(&o)
    );
    let o = run(env.gate_cmd(&["delete", "deployment", "relay", "--wait=false"]))?;
    ensure!(o.status.success(), "delete relay: {}", text(&o));
    Ok(())
}

pub fn fails_closed_without_webhook(env: &mut Env) -> Result<()> {
    let scale = |n: &str| {
        env.node.kubectl_ok(&[
            "-n",
            install::NAMESPACE,
            "scale",
            "deployment/portcullis-webhook",
            &format!("--replicas={n}"),
        ])
    };
    scale("0")?;
    wait_for("the webhook pods gone", 60, || {
        let o = env.node.kubectl_ok(&[
            "-n",
            install::NAMESPACE,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=webhook",
            "-o",
            "name",
        ])?;
        Ok(o.trim().is_empty().then_some(()))
    })?;
    let pod = |name: &str, label: bool| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n{}spec:\n  containers: [{{name: c, image: {}, imagePullPolicy: Never, command: [sleep, '60']}}]\n",
            if label {
                "  labels: {portcullis.dev/agent: \"true\"}\n"
            } else {
                ""
            },
            node::WORKLOAD_IMAGE
        )
    };
    let agent = node::run_with_stdin(
        &mut env.node.kubectl_cmd(&["apply", "-f", "-"]),
        &pod("no-webhook-agent", true),
    )?;
    let plain = node::run_with_stdin(
        &mut env.node.kubectl_cmd(&["apply", "-f", "-"]),
        &pod("no-webhook-plain", false),
    )?;
    scale("1")?;
    install::wait_webhook(&env.node, 90)?;
    ensure!(
        !agent.status.success(),
        "an agent pod was admitted without the webhook"
    );
    ensure!(
        plain.status.success(),
        "a non-agent pod was refused without the webhook: {}",
        text(&plain)
    );
    env.node
        .kubectl_ok(&[
            "-n",
            NAMESPACE,
            "delete",
            "pod",
            "no-webhook-plain",
            "--wait=false",
        ])
        .context("cleanup")?;
    Ok(())
}

/// A CSR for the node-intermediate signer, created with `token` (None: the admin).
fn request_intermediate(env: &Env, name: &str, token: Option<&str>) -> Result<()> {
    let dir = env.dir.join("csr");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let o = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
        ])
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()?;
    ensure!(
        o.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    use base64::Engine;
    let req = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&csr)?);
    let yaml = format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: {name}}}\nspec:\n  signerName: portcullis.dev/node-intermediate\n  usages: [cert sign]\n  expirationSeconds: 3600\n  request: {req}\n"
    );
    let mut args = vec!["create", "-f", "-"];
    let tok;
    if let Some(t) = token {
        tok = format!("--token={t}");
        args.push(&tok);
    }
    let mut c = env.node.kubectl_cmd(&args);
    if token.is_some() {
        // The token alone, not the admin's client certificate.
        c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", node::NETNS))
            .arg(env.node.parts.bin("kubectl"))
            .arg(format!("--server={}", env.api_url()))
            .arg(format!(
                "--certificate-authority={}",
                env.node.ca_pem.display()
            ))
            .args(&args)
            .env("HOME", env.dir.join("home-csr"));
    }
    let o = node::run_with_stdin(&mut c, &yaml)?;
    ensure!(o.status.success(), "creating CSR {name}: {}", text(&o));
    Ok(())
}

fn csr_outcome(env: &Env, name: &str) -> Result<(String, String)> {
    wait_for(&format!("a decision on CSR {name}"), 60, || {
        let cond = env.node.kubectl_ok(&[
            "get",
            "csr",
            name,
            "-o",
            "jsonpath={.status.conditions[0].type}|{.status.conditions[0].message}",
        ])?;
        let cert =
            env.node
                .kubectl_ok(&["get", "csr", name, "-o", "jsonpath={.status.certificate}"])?;
        if cond.starts_with("Denied") || (cond.starts_with("Approved") && !cert.is_empty()) {
            return Ok(Some((cond, cert)));
        }
        Ok(None)
    })
}

pub fn intermediates(env: &mut Env) -> Result<()> {
    // Anyone else is refused.
    request_intermediate(env, "not-a-node", None)?;
    let (cond, _) = csr_outcome(env, "not-a-node")?;
    ensure!(
        cond.starts_with("Denied") && cond.contains("not the node daemon"),
        "an admin's request: {cond}"
    );
    // The daemon's service account, with a token bound to its pod (which names the
    // node), gets a short-lived intermediate for that node, from the interception CA.
    let pod = install::daemon_pods(&env.node)?
        .into_iter()
        .next()
        .context("no daemon pod")?;
    let uid = env.node.kubectl_ok(&[
        "-n",
        install::NAMESPACE,
        "get",
        "pod",
        &pod,
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let token = env.node.kubectl_ok(&[
        "-n",
        install::NAMESPACE,
        "create",
        "token",
        "portcullis-daemon",
        "--bound-object-kind=Pod",
        &format!("--bound-object-name={pod}"),
        &format!("--bound-object-uid={uid}"),
    ])?;
    request_intermediate(env, "node-daemon", Some(token.trim()))?;
    let (cond, cert) = csr_outcome(env, "node-daemon")?;
    ensure!(cond.starts_with("Approved"), "the daemon's request: {cond}");
    use base64::Engine;
    let pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(cert.trim())?)?;
    let mut c = Command::new("openssl");
    c.args(["x509", "-noout", "-subject", "-issuer", "-text"]);
    let o = node::run_with_stdin(&mut c, &pem)?;
    let t = text(&o);
    ensure!(
        t.contains(&format!("Portcullis node {}", node::NODE_NAME))
            && t.contains("CA:TRUE, pathlen:0"),
        "the intermediate: {t}"
    );
    // Signed by the interception CA.
    let ca = env.state_dir().join("ca/ca.crt");
    let p = env.dir.join("csr/node-daemon.crt");
    std::fs::write(&p, &pem)?;
    let o = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca)
        .arg(&p)
        .output()?;
    ensure!(
        o.status.success(),
        "not signed by the interception CA: {}",
        text(&o)
    );
    for n in ["not-a-node", "node-daemon"] {
        let _ = env.node.kubectl(&["delete", "csr", n]);
    }
    Ok(())
}
