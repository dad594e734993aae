//! The install tier: Portcullis installed on the real test node the way a cluster
//! installs it — `kubectl apply -k` of the repository's `deploy/` (through the test
//! overlay `tests/deploy/`, which only swaps in the image this checkout built) — and
//! real agent pods gated by the DaemonSet's daemon. Runs after the e2e tier on its own
//! node (`cargo xtask test --tier e2e -- FILTER` filters both). Needs root.
use std::time::Instant;

use anyhow::Result;
use portcullis_tests::gate::{Gate, GateOptions};

mod admission;
mod daemonset;
mod endpoints;
mod enroll;
mod readme;
mod upgrade;

/// Shared by every case.
pub type Env = Gate;

type Case = (&'static str, fn(&mut Env) -> Result<()>);

const CASES: &[Case] = &[
    (
        "install_daemonset_sets_up_the_node_and_serves",
        daemonset::sets_up_and_serves,
    ),
    (
        "install_agent_is_gated_by_the_daemonset",
        daemonset::agent_gated,
    ),
    (
        "install_crashed_daemon_fails_closed_and_its_replacement_adopts",
        daemonset::crash_fails_closed,
    ),
    (
        "install_agent_pods_enrolled_by_label_before_their_first_instruction",
        enroll::first_instruction,
    ),
    (
        "install_pod_without_label_is_untouched",
        enroll::unselected_untouched,
    ),
    (
        "install_protected_endpoints_discovered_kubelet_and_node_ports_refused",
        endpoints::discovered,
    ),
    (
        "install_unmodified_agent_pods_trust_the_gate_through_the_webhook",
        admission::ca_trust,
    ),
    (
        "install_admission_guard_refuses_each_escape_by_field",
        admission::guard,
    ),
    (
        "install_agents_children_are_agents_and_keep_the_label",
        admission::children,
    ),
    (
        "install_node_intermediates_only_for_node_daemons",
        admission::intermediates,
    ),
    (
        "install_no_webhook_no_agent_pod",
        admission::fails_closed_without_webhook,
    ),
    (
        "install_rolling_upgrade_leaves_no_direct_path_and_a_small_gap",
        upgrade::rolling_upgrade,
    ),
    // Last: replaces the harness's install with the README's, then uninstalls.
    (
        "install_readme_block_install_label_gate_upgrade_uninstall",
        readme::readme_install_block,
    ),
];

/// The policy the installed daemon runs with: the e2e agent may do what its scoped
/// identity's RBAC allows.
pub const POLICY: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: install}
spec:
  identities:
  - subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}]
    impersonate: {user: "portcullis:agent", groups: ["portcullis:agents"]}
  rules:
  - name: agent-everything
    subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}]
    verbs: ["*"]
    apiGroups: ["*"]
    resources: ["*"]
    action: allow
  - name: agent-non-resource
    subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}]
    verbs: ["*"]
    nonResourceURLs: ["*"]
    action: allow
"#;

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("running {} install cases", selected.len());
    if selected.is_empty() {
        return;
    }
    let started = Instant::now();
    let mut env = match Gate::start(
        "install",
        GateOptions {
            policy: Some(POLICY),
            install: true,
            ..Default::default()
        },
    ) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("install setup failed: {e:#}");
            std::process::exit(1);
        }
    };
    println!(
        "node, pods and the installed daemon ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut failed = Vec::new();
    for (name, f) in selected {
        let t = Instant::now();
        match f(&mut env) {
            Ok(()) => println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!(
                    "test {name} ... FAILED ({:.1} s)\n{e:#}\n",
                    t.elapsed().as_secs_f64()
                );
                failed.push((name, format!("{e:#}")));
            }
        }
    }
    if !failed.is_empty() {
        println!("\ndaemon:\n{}", env.daemon_log());
        for (name, why) in &failed {
            println!("\nFAILED {name}: {why}");
        }
        drop(env);
        std::process::exit(1);
    }
    println!(
        "install: all passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Runs a command with a 90 s bound; the outer kubectl's exit line is kept.
pub fn run(mut cmd: std::process::Command) -> Result<std::process::Output> {
    use std::{process::Stdio, sync::mpsc, time::Duration};
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(r) => Ok(r?),
        Err(_) => {
            let _ = portcullis_tests::signal(pid, libc::SIGKILL);
            anyhow::bail!("command did not finish within 90 s")
        }
    }
}
