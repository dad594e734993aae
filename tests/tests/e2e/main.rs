//! End-to-end tier on a real node: unmodified kubectl and the Python `kubernetes`
//! client run in real agent pods (their own service account, the projected token and
//! CA bundle the kubelet mounted, the cgroups the kubelet and runc made); the kernel
//! redirects their connections to the API Service to the daemon, which terminates TLS
//! and forwards to a real kube-apiserver of the current release. Each command's result
//! is compared with the same command run directly from the node as the same scoped
//! identity.
//!
//! One node, one daemon and one set of pods are shared by every case (the node takes
//! seconds to start), so this binary has its own small runner: `cargo xtask test --tier
//! e2e -- FILTER` runs the cases whose name contains FILTER. One file per concern:
//! `clients` (transparent proxy with real clients), `current_api` (what only a current
//! apiserver exposes), `hardening` (hostile clients, outages), `identity`, `policy`,
//! `content` (policy on what requests do: the shipped policy, the check-to-write race,
//! exact grants, TokenReview), `approvals`, `masking`, `leaks` (masking on every
//! response path), `write_back` (placeholders refused, bodies recorded masked),
//! `audit`. Needs root.
use std::{
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use portcullis_tests::gate::{Gate, GateOptions, NAMESPACE};

mod approvals;
mod audit;
mod clients;
mod content;
mod current_api;
mod hardening;
mod identity;
mod leaks;
mod masking;
mod policy;
mod write_back;

/// Shared by every case.
pub type Env = Gate;

type Case = (&'static str, fn(&mut Env) -> Result<()>);

const CASES: &[Case] = &[
    (
        "version_and_discovery_match_direct",
        clients::version_and_discovery,
    ),
    ("get_table_matches_direct", clients::get_table),
    ("create_and_apply_from_files", clients::create_and_apply),
    (
        "create_secret_generic_protobuf_body",
        clients::create_secret,
    ),
    ("get_watch_streams_each_event", clients::watch_streams),
    ("delete_and_its_follow_up_watch", clients::delete_waits),
    ("logs_follow_streams_lines", clients::logs_follow),
    ("exec_over_websocket", clients::exec_websocket),
    ("exec_over_spdy_fallback", clients::exec_spdy),
    (
        "cp_attach_and_port_forward",
        clients::cp_attach_and_port_forward,
    ),
    ("python_client_list_create_watch", clients::python_client),
    ("goaway_races_never_reach_the_agent", clients::goaway_races),
    (
        "pretty_output_and_curl_user_agents",
        current_api::pretty_and_user_agents,
    ),
    ("aggregated_discovery_v2", current_api::aggregated_discovery),
    (
        "client_go_informer_watchlist_bookmark",
        current_api::watchlist_informer,
    ),
    ("crd_with_credentials_is_masked", current_api::crd_masking),
    ("cbor_is_masked_or_refused_never_passed", current_api::cbor),
    (
        "websocket_exec_is_decided_as_create",
        current_api::websocket_exec_is_create,
    ),
    (
        "agent_identity_is_replaced_by_impersonation",
        hardening::identity_replaced,
    ),
    (
        "unredirected_connection_is_refused",
        hardening::unredirected_refused,
    ),
    (
        "malformed_requests_get_clear_errors",
        hardening::malformed_requests,
    ),
    (
        "slow_header_sender_is_cut_off_while_others_are_served",
        hardening::slow_headers,
    ),
    (
        "http2_rapid_reset_closes_only_that_connection",
        hardening::rapid_reset,
    ),
    (
        "projected_token_is_bound_to_its_pod",
        identity::projected_tokens,
    ),
    (
        "oidc_tokens_are_verified_and_keys_rotate",
        identity::oidc_tokens,
    ),
    (
        "policy_decides_and_rbac_stays_second_line",
        policy::policy_decisions,
    ),
    (
        "approval_within_hold_lets_the_request_proceed",
        approvals::within_hold,
    ),
    (
        "approval_after_hold_grants_a_retry_until_ttl",
        approvals::after_hold,
    ),
    (
        "denied_and_expired_approvals",
        approvals::denied_and_expired,
    ),
    (
        "no_self_approval_and_remote_approvers",
        approvals::self_approval,
    ),
    (
        "pending_approval_survives_a_daemon_restart",
        approvals::restart,
    ),
    (
        "policy_hot_reload_keeps_the_last_good_policy",
        policy::policy_reload,
    ),
    (
        "admin_socket_is_root_only_and_policy_test_exits_nonzero",
        policy::admin_socket_and_policy_cli,
    ),
    (
        "shipped_policy_closes_exfiltration_and_destructive_paths",
        content::shipped_policy_closes_exfiltration_and_destructive_paths,
    ),
    (
        "policy_race_change_between_check_and_write_is_a_conflict",
        content::a_change_between_check_and_write_is_a_conflict,
    ),
    (
        "grants_cover_only_the_approved_request",
        content::grants_cover_only_the_approved_request,
    ),
    (
        "tokenreview_revokes_deleted_service_accounts_and_pods",
        content::tokenreview_revokes_deleted_service_accounts_and_pods,
    ),
    ("masking_canaries_never_reach_the_agent", masking::canaries),
    // After `masking`: these start further rounds of the target's canary log.
    (
        "websocket_watch_and_logs_are_masked_per_message",
        leaks::websocket_watch_and_logs,
    ),
    (
        "structured_credentials_in_workloads_are_masked",
        leaks::structured_credentials,
    ),
    (
        "placeholder_write_back_is_refused",
        write_back::placeholder_write_back,
    ),
    (
        "request_bodies_are_recorded_decoded_and_masked",
        write_back::request_bodies_recorded_masked,
    ),
    (
        "audit_records_requests_and_mutations_before_they_act",
        audit::requests,
    ),
    ("audit_sink_down_then_up_loses_nothing", audit::sink),
    (
        "audit_sessions_export_and_replay",
        audit::sessions_and_replay,
    ),
    (
        "audit_chain_of_kernel_events_verifies_then_detects_a_tamper",
        audit::chain_tamper,
    ),
    (
        "audit_tamper_across_stops_is_caught_against_the_anchor",
        audit::tamper_across_stops_is_caught_against_the_anchor,
    ),
    // Last: stops the apiserver.
    ("apiserver_down_is_a_503_status", hardening::apiserver_down),
];

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("running {} e2e cases", selected.len());
    if selected.is_empty() {
        return;
    }
    let started = Instant::now();
    let mut env = match setup() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("e2e setup failed: {e:#}");
            std::process::exit(1);
        }
    };
    println!(
        "node, pods and daemon ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut failed = Vec::new();
    for (name, f) in selected {
        let t = Instant::now();
        let r = f(&mut env);
        match r {
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
        println!("\ndaemon log (tail):\n{}", tail(&env.daemon_log(), 40));
        // Repeated last: CI shows the tail of the output.
        for (name, why) in &failed {
            println!("\nFAILED {name}: {}", tail(why, 15));
        }
        let names: Vec<&str> = failed.iter().map(|(n, _)| **n).collect();
        println!("\nfailed: {names:?}");
        drop(env);
        std::process::exit(1);
    }
    println!(
        "e2e: all passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

pub fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// The e2e policy. The transparent-proxy cases run as the pod-bound service account
/// e2e/agent, which may do anything RBAC lets its scoped identity do; the identity,
/// policy and approval cases use it and OIDC users from the test IdP.
pub const POLICY: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: e2e}
spec:
  identities:
  - subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}, {kind: Group, name: "oidc:devs"}, {kind: Group, name: "oidc:execget"}]
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
  - name: devs-discovery
    subjects: [{kind: Group, name: "oidc:devs"}]
    verbs: [get]
    nonResourceURLs: ["/api", "/api/*", "/apis", "/apis/*", "/version"]
    action: allow
  - name: devs-read
    subjects: [{kind: Group, name: "oidc:devs"}]
    verbs: [get, list, watch]
    apiGroups: ["*"]
    resources: ["*"]
    action: allow
  - name: devs-write-configmaps
    subjects: [{kind: Group, name: "oidc:devs"}]
    verbs: [create, delete]
    apiGroups: [""]
    resources: [configmaps]
    action: allow
  - name: devs-no-exec
    subjects: [{kind: Group, name: "oidc:devs"}]
    verbs: ["*"]
    apiGroups: [""]
    resources: ["pods/exec", "pods/attach", "pods/portforward"]
    action: deny
    message: interactive access is not for agents
  - name: held-deletes
    subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}, {kind: Group, name: "oidc:devs"}]
    verbs: [delete]
    apiGroups: [""]
    resources: [configmaps]
    resourceNames: ["held-*"]
    action: approve
    message: deleting held-* needs a human
    approval:
      approvers: [{kind: Group, name: "oidc:oncall"}]
      holdTime: 4s
      grantTTL: 8s
  - name: execget-read
    subjects: [{kind: Group, name: "oidc:execget"}]
    verbs: [get, list]
    apiGroups: [""]
    resources: [pods]
    action: allow
  - name: execget-exec-get-only
    subjects: [{kind: Group, name: "oidc:execget"}]
    verbs: [get]
    apiGroups: [""]
    resources: ["pods/exec"]
    action: allow
"#;

fn setup() -> Result<Env> {
    // A short header timeout keeps the slow-sender case quick. CBOR serving is a feature
    // gate of the apiserver (clients ask for it with KUBE_FEATURE_ClientsAllowCBOR).
    Gate::start(
        "e2e",
        GateOptions {
            policy: Some(POLICY),
            proxy_extra: "  header_timeout: 3s\n",
            // GOAWAYs as an HA cluster's API servers send them (the most the flag
            // allows: 1 request in 50), under every case: the daemon's connection to
            // the API server goes away while requests are on their way.
            apiserver_flags: vec![
                "--feature-gates=CBORServingAndStorage=true".into(),
                "--goaway-chance=0.02".into(),
            ],
            // PORTCULLIS_E2E_INSTALL=1: the daemon is the DaemonSet of deploy/.
            install: std::env::var_os("PORTCULLIS_E2E_INSTALL").is_some(),
            // The shipped level, a line per request, and the lanes' connection events
            // (the GOAWAY case counts the resends in them).
            log_level: Some(
                "info,portcullis::requests=debug,portcullis::upstream::connection=debug",
            ),
        },
    )
}

/// What the cases call on the shared environment.
pub trait Clients {
    fn gate(&self, args: &[&str]) -> Result<Output>;
    fn direct(&self, args: &[&str]) -> Result<Output>;
    fn gate_ok(&self, args: &[&str]) -> Result<String>;
    fn direct_ok(&self, args: &[&str]) -> Result<String>;
    /// kubectl as the cluster admin, in the e2e namespace.
    fn admin(&self, args: &[&str]) -> Result<Output>;
    fn admin_ok(&self, args: &[&str]) -> Result<String>;
}

impl Clients for Env {
    fn gate(&self, args: &[&str]) -> Result<Output> {
        run_pod(self.gate_cmd(args), None)
    }

    fn direct(&self, args: &[&str]) -> Result<Output> {
        run_bounded(self.direct_cmd(args), None)
    }

    fn gate_ok(&self, args: &[&str]) -> Result<String> {
        ok(self.gate(args)?, "gate", args)
    }

    fn direct_ok(&self, args: &[&str]) -> Result<String> {
        ok(self.direct(args)?, "direct", args)
    }

    fn admin(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", NAMESPACE];
        full.extend_from_slice(args);
        run_bounded(self.node.kubectl_cmd(&full), None)
    }

    fn admin_ok(&self, args: &[&str]) -> Result<String> {
        ok(self.admin(args)?, "admin", args)
    }
}

pub fn ok(o: Output, who: &str, args: &[&str]) -> Result<String> {
    if !o.status.success() {
        bail!(
            "{who} kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs with a 90 s bound (every client run stops by itself).
pub fn run_bounded(mut cmd: Command, stdin: Option<&str>) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting a client")?;
    if let Some(text) = stdin {
        let mut si = child.stdin.take().context("stdin")?;
        si.write_all(text.as_bytes())?;
    }
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(r) => Ok(r?),
        Err(_) => {
            let _ = portcullis_tests::signal(pid, libc::SIGKILL);
            bail!("client did not finish within 90 s")
        }
    }
}

/// [`run_bounded`] for a command run in a pod by `kubectl exec`: the outer kubectl's
/// own last line ("command terminated with exit code N") is not the inner program's
/// output, so it is removed.
pub fn run_pod(cmd: Command, stdin: Option<&str>) -> Result<Output> {
    let mut o = run_bounded(cmd, stdin)?;
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    let trimmed = text.trim_end_matches('\n');
    if let Some((head, last)) = trimmed.rsplit_once('\n').or(Some(("", trimmed)))
        && last.starts_with("command terminated with exit code ")
    {
        o.stderr = if head.is_empty() {
            Vec::new()
        } else {
            format!("{head}\n").into_bytes()
        };
    }
    Ok(o)
}

/// Replaces ages ("5s", "2m3s", "<unknown>") so two listings taken a moment apart compare.
pub fn normalize_ages(s: &str) -> String {
    s.lines()
        .map(|l| {
            l.split_whitespace()
                .map(|w| {
                    let is_age = w.len() <= 8
                        && w.chars().next().is_some_and(|c| c.is_ascii_digit())
                        && w.chars().all(|c| c.is_ascii_digit() || "smhdy".contains(c))
                        && w.chars().last().is_some_and(|c| "smhdy".contains(c));
                    if is_age { "<age>" } else { w }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Python in an agent pod: `script` (written into the pods) with `args`.
pub fn python(env: &Env, pod: &str, name: &str, script: &str, args: &[&str]) -> Result<Output> {
    let path = env.file(name, script)?;
    let mut argv = vec!["python3", path.as_str()];
    argv.extend_from_slice(args);
    run_pod(env.in_pod(pod, &argv), None)
}

/// The apiserver's audit events (what reached it, and as whom).
pub fn apiserver_audit(env: &Env) -> Vec<serde_json::Value> {
    env.apiserver_audit()
}

/// The portcullis binary as a path (for CLI calls on the node).
pub fn portcullis_bin() -> std::path::PathBuf {
    portcullis_tests::bin("portcullis")
}

/// Repository root (for the shipped policy).
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Every record of the daemon's audit chain, as text (segments in order).
pub fn audit_text(env: &Env) -> Result<String> {
    let dir = env.state_dir().join("audit");
    let mut segs: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    segs.sort();
    let mut out = String::new();
    for s in segs {
        out.push_str(&std::fs::read_to_string(s)?);
    }
    Ok(out)
}
