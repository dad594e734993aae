//! The admission webhook: CA trust for unmodified agent pods, the guard (each refusal
//! naming its field), agents' children (workloads an agent creates are agents and
//! cannot shed the label), and its failure policy (no webhook: no agent pod).
use std::time::{Duration, Instant};

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
    let ca = env.node.kubectl_ok(&["exec", "-n", NAMESPACE, POD, "-c", "main", "--", "cat", POD_CA])?;
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
    ("privileged", "containers: [{name: c, image: IMG, securityContext: {privileged: true}}]", "spec.containers[0].securityContext.privileged"),
    ("hostNetwork", "hostNetwork: true\n  containers: [{name: c, image: IMG}]", "spec.hostNetwork"),
    ("hostPID", "hostPID: true\n  containers: [{name: c, image: IMG}]", "spec.hostPID"),
    ("hostIPC", "hostIPC: true\n  containers: [{name: c, image: IMG}]", "spec.hostIPC"),
    ("hostPath bpffs", "volumes: [{name: b, hostPath: {path: /sys/fs/bpf}}]\n  containers: [{name: c, image: IMG}]", "spec.volumes[0].hostPath"),
    ("hostPath cgroupfs", "volumes: [{name: b, hostPath: {path: /sys/fs/cgroup}}]\n  containers: [{name: c, image: IMG}]", "spec.volumes[0].hostPath"),
    ("hostPath state", "volumes: [{name: b, hostPath: {path: /var/lib/portcullis}}]\n  containers: [{name: c, image: IMG}]", "spec.volumes[0].hostPath"),
    ("NET_RAW", "containers: [{name: c, image: IMG, securityContext: {capabilities: {add: [NET_RAW]}}}]", "spec.containers[0].securityContext.capabilities.add[0]"),
    ("NET_ADMIN", "containers: [{name: c, image: IMG, securityContext: {capabilities: {add: [NET_ADMIN]}}}]", "spec.containers[0].securityContext.capabilities.add[0]"),
    ("SYS_ADMIN", "containers: [{name: c, image: IMG, securityContext: {capabilities: {add: [SYS_ADMIN]}}}]", "spec.containers[0].securityContext.capabilities.add[0]"),
    ("BPF", "containers: [{name: c, image: IMG, securityContext: {capabilities: {add: [CAP_BPF]}}}]", "spec.containers[0].securityContext.capabilities.add[0]"),
    ("SYS_PTRACE", "initContainers: [{name: i, image: IMG, securityContext: {capabilities: {add: [SYS_PTRACE]}}}]\n  containers: [{name: c, image: IMG}]", "spec.initContainers[0].securityContext.capabilities.add[0]"),
    ("runtimeClass", "runtimeClassName: kata\n  containers: [{name: c, image: IMG}]", "spec.runtimeClassName"),
];

pub fn guard(env: &mut Env) -> Result<()> {
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
        let o = run(env.gate_cmd(&args))?;
        ensure!(
            !o.status.success() && text(&o).contains("agent label cannot be removed"),
            "{args:?}: {}",
            text(&o)
        );
    }
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
        .kubectl_ok(&["-n", NAMESPACE, "delete", "pod", "no-webhook-plain", "--wait=false"])
        .context("cleanup")?;
    Ok(())
}
