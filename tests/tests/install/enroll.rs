//! Enrollment by selector, race-free: agent pods (a pod label, or a namespace label)
//! are enrolled by the DaemonSet's daemon, and their first init container (the
//! barrier) holds every other container until the pod's own connection is answered
//! by the gate. Proof: containers whose FIRST instruction is a connection to the API
//! server (kubectl as PID 1); none of them ever reaches the API server directly (the
//! apiserver's audit log), each is seen by the gate (the kernel's redirect records);
//! a control pod without the label is seen directly, so the check can fail. Deleted
//! pods are unenrolled.
use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use portcullis_tests::{gate::NAMESPACE, install, node};

use crate::Env;

pub const AGENT_LABEL: &str = "portcullis.dev/agent";
pub const NS_LABEL: &str = "portcullis.dev/agents";
/// A namespace whose label makes every pod in it an agent.
pub const AGENT_NS: &str = "agents-by-ns";

/// An agent pod as the webhook will shape it: the barrier first, then a container
/// whose first instruction is a connection to the API server. kubectl gets no flag
/// that overrides its config (not even `--request-timeout`): client-go falls back to
/// the in-cluster config only when the merged config is the default one, and would
/// otherwise try localhost:8080.
pub fn first_instruction_pod(
    name: &str,
    ns: &str,
    labelled: bool,
    barrier: bool,
    ca_pem: &str,
) -> String {
    let labels = if labelled {
        format!("  labels: {{{AGENT_LABEL}: \"true\"}}\n")
    } else {
        String::new()
    };
    let init = if barrier {
        let pem = ca_pem
            .lines()
            .map(|l| format!("          {l}\n"))
            .collect::<String>();
        format!(
            "  initContainers:\n  - name: portcullis-barrier\n    image: {img}\n    imagePullPolicy: Never\n    command: [portcullis, barrier, --timeout, 120s]\n    env:\n    - name: PORTCULLIS_CA_PEM\n      value: |\n{pem}",
            img = install::TEST_IMAGE
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n{labels}spec:\n  serviceAccountName: {sa}\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n{init}  containers:\n  - name: main\n    image: {agent}\n    imagePullPolicy: Never\n    command: [kubectl, get, --raw, /api]\n",
        sa = if ns == NAMESPACE { "agent" } else { "default" },
        agent = node::AGENT_IMAGE,
    )
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pod_field(env: &Env, ns: &str, pod: &str, path: &str) -> Result<String> {
    env.node.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "pod",
        pod,
        "-o",
        &format!("jsonpath={{{path}}}"),
    ])
}

fn wait_finished(env: &Env, ns: &str, pod: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let phase = pod_field(env, ns, pod, ".status.phase").unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return Ok(phase);
        }
        if Instant::now() > deadline {
            let d = env
                .node
                .kubectl(&["-n", ns, "describe", "pod", pod])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            bail!("pod {ns}/{pod} still {phase} after 120 s:\n{d}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Apiserver audit events authenticated directly as a pod's service account from
/// the pod's IP (what an unenforced connection looks like).
fn direct_requests(env: &Env, sa_user: &str, pod_ip: &str) -> usize {
    env.apiserver_audit()
        .iter()
        .filter(|e| {
            e["user"]["username"] == sa_user
                && e["sourceIPs"]
                    .as_array()
                    .is_some_and(|ips| ips.iter().any(|i| i == pod_ip))
        })
        .count()
}

fn interception_ca(env: &Env) -> Result<String> {
    let p = env.state_dir().join("ca/ca.crt");
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

pub fn first_instruction(env: &mut Env) -> Result<()> {
    let ca = interception_ca(env)?;
    env.node.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {AGENT_NS}\n  labels: {{{NS_LABEL}: enabled}}\n"
    ))?;
    env.node.wait_service_account(AGENT_NS, "default")?;
    // Agents: by pod label (e2e, the agent service account) and by namespace label.
    let mut pods: Vec<(String, String)> = Vec::new();
    let mut yaml = String::new();
    for i in 0..4 {
        let (name, ns, labelled) = if i % 2 == 0 {
            (format!("first-{i}"), NAMESPACE, true)
        } else {
            (format!("first-ns-{i}"), AGENT_NS, false)
        };
        // The webhook injects the barrier (the manifest has none).
        yaml.push_str(&first_instruction_pod(&name, ns, labelled, false, &ca));
        yaml.push_str("---\n");
        pods.push((ns.to_string(), name));
    }
    // The control: the same container, not an agent.
    yaml.push_str(&first_instruction_pod(
        "first-control",
        NAMESPACE,
        false,
        false,
        &ca,
    ));
    env.node.apply(&yaml)?;
    let control_phase = wait_finished(env, NAMESPACE, "first-control")?;
    let control_ip = pod_field(env, NAMESPACE, "first-control", ".status.podIP")?;
    let control_direct = direct_requests(env, "system:serviceaccount:e2e:agent", &control_ip);
    if control_direct == 0 {
        let logs = env
            .node
            .kubectl(&["-n", NAMESPACE, "logs", "first-control", "-c", "main"])
            .map(|o| text(&o))
            .unwrap_or_default();
        let spec = env
            .node
            .kubectl(&["-n", NAMESPACE, "get", "pod", "first-control", "-o", "yaml"])
            .map(|o| text(&o))
            .unwrap_or_default();
        let logs = format!("{logs}\n{spec}");
        bail!(
            "the control pod ({control_phase}, {control_ip}) left no direct request in the apiserver's audit log: the check below could not fail; its log:\n{logs}"
        );
    }
    let mut barrier_waits = Vec::new();
    let mut pod_ids: HashSet<u64> = HashSet::new();
    for (ns, name) in &pods {
        let phase = wait_finished(env, ns, name)?;
        let uid = node_uid(env, ns, name)?;
        let ip = pod_field(env, ns, name, ".status.podIP")?;
        let sa = if ns == NAMESPACE {
            "system:serviceaccount:e2e:agent".to_string()
        } else {
            format!("system:serviceaccount:{ns}:default")
        };
        let direct = direct_requests(env, &sa, &ip);
        ensure!(
            direct == 0,
            "{ns}/{name} ({phase}): {direct} request(s) reached the apiserver directly"
        );
        // A finished pod's cgroup is gone (the kubelet removes it): then the pod is
        // known by its address; while it exists, by its cgroup id too.
        let id = env
            .node
            .pod_cgroup(&uid)
            .ok()
            .and_then(|cg| std::fs::metadata(cg).ok())
            .map(|m| m.ino());
        let conns = env.daemon.connections();
        let seen = conns.iter().find(|c| {
            c["kernel"]["origin"]["comm"] == "kubectl"
                && c["peer"]
                    .as_str()
                    .and_then(|p| p.rsplit_once(':'))
                    .is_some_and(|(a, _)| a == ip)
                && id.is_none_or(|id| c["kernel"]["origin"]["agent_cgroup_id"] == id)
        });
        let by_kubectl = seen.is_some();
        // The enrolled cgroup the pod's kubectl ran in (the pod may be gone by now).
        if let Some(cg) = seen.and_then(|c| c["kernel"]["origin"]["agent_cgroup_id"].as_u64()) {
            pod_ids.insert(cg);
        }
        ensure!(
            by_kubectl,
            "{ns}/{name}: the gate saw no connection from its kubectl ({ip}, cgroup {id:?})"
        );
        let first_init = pod_field(env, ns, name, ".spec.initContainers[0].name")?;
        ensure!(
            first_init == "portcullis-barrier",
            "{ns}/{name}: first init container `{first_init}`, not the injected barrier"
        );
        let logs = env
            .node
            .kubectl_ok(&["-n", ns, "logs", name, "-c", "portcullis-barrier"])?;
        ensure!(logs.contains("enforced:"), "{ns}/{name} barrier: {logs}");
        barrier_waits.push(format!(
            "{name}: {}",
            logs.lines()
                .find_map(|l| l
                    .split_once("(after ")
                    .map(|(_, r)| r.trim_end_matches(')')))
                .unwrap_or("?")
        ));
    }
    // A barrier that needed more than one attempt started before its pod was
    // enrolled: without it, that pod's first connection would have gone direct.
    println!("  barrier waits: {}", barrier_waits.join("; "));
    // Finished, then deleted, pods are unenrolled: the cgroups their kubectl ran in
    // (each one enrolled: the gate attributed its connections to it) leave the map.
    let ids = pod_ids;
    ensure!(
        ids.len() == pods.len(),
        "enrolled cgroup per pod, from the gate's connections: {ids:?}"
    );
    for (ns, name) in &pods {
        env.node
            .kubectl_ok(&["-n", ns, "delete", "pod", name, "--wait=true"])?;
    }
    env.node
        .kubectl_ok(&["-n", NAMESPACE, "delete", "pod", "first-control"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: HashSet<u64> = enrolled_ids(env)?.intersection(&ids).copied().collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("deleted pods still enrolled: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

fn node_uid(env: &Env, ns: &str, name: &str) -> Result<String> {
    env.node.pod_uid(ns, name)
}

/// The enrolled cgroup ids, from `portcullis status` on the node.
pub fn enrolled_ids(env: &Env) -> Result<HashSet<u64>> {
    let o = env.portcullis(&["status"])?;
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("enrolled cgroup ids: "))
        .context("no enrolled line in `portcullis status`")?;
    Ok(line
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect())
}

/// A pod without the label in a namespace without it stays untouched.
pub fn unselected_untouched(env: &mut Env) -> Result<()> {
    let enrolled = enrolled_ids(env)?;
    let uid = env
        .node
        .pod_uid(NAMESPACE, portcullis_tests::gate::BYSTANDER_POD)?;
    let id = std::fs::metadata(env.node.pod_cgroup(&uid)?)?.ino();
    ensure!(
        !enrolled.contains(&id),
        "the bystander pod (no label) is enrolled"
    );
    // Nor shaped by the webhook: no barrier, no label, its own service-account volume.
    let bystander = portcullis_tests::gate::BYSTANDER_POD;
    let inits = pod_field(env, NAMESPACE, bystander, ".spec.initContainers[*].name")?;
    ensure!(
        !inits.contains("portcullis-barrier"),
        "the bystander got the barrier: {inits}"
    );
    let label = pod_field(
        env,
        NAMESPACE,
        bystander,
        ".metadata.labels.portcullis\\.dev/agent",
    )?;
    ensure!(
        label.is_empty(),
        "the bystander got the agent label: {label}"
    );
    let sources = pod_field(
        env,
        NAMESPACE,
        bystander,
        ".spec.volumes[*].projected.sources",
    )?;
    ensure!(
        !sources.contains("portcullis-root-ca.crt"),
        "the bystander's CA was rewritten: {sources}"
    );
    Ok(())
}
