//! Policy that sees what a request does, against the real apiserver: the shipped
//! coding-agents policy closing every exfiltration and destructive-edit path a real
//! agent pod tries (decided on the apiserver's dry run of each request), the race
//! between the check and the write, grants that cover exactly the approved request,
//! and TokenReview revoking the tokens of deleted service accounts and pods.
use std::{
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use portcullis_tests::{
    gate::{NAMESPACE, OTHER_POD, POD, TARGET_POD},
    node::AGENT_IMAGE,
};

use crate::{Clients, Env, POLICY, approvals::pc, repo, run_bounded, run_pod, stderr};

/// Puts `policy` in force (the daemon reloads it) and waits until it is.
pub fn use_policy(env: &Env, policy: &str, name: &str) -> Result<()> {
    let before = env.daemon_log().len();
    std::fs::write(env.dir.join("policy.yaml"), policy)?;
    let t = Instant::now();
    loop {
        let log = env.daemon_log();
        let new = log.get(before..).unwrap_or("");
        // (The log may colour field names, so the name is looked for on its own.)
        if new
            .lines()
            .any(|l| l.contains("policy reloaded") && l.contains(name))
        {
            return Ok(());
        }
        if let Some(l) = new.lines().find(|l| l.contains("policy change refused")) {
            bail!("policy {name} was refused: {l}");
        }
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "policy {name} not in force after 15 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Back to the e2e policy, whatever happened.
struct Restore<'a>(&'a Env);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if let Err(e) = use_policy(self.0, POLICY, "e2e") {
            eprintln!("restoring the e2e policy: {e:#}");
        }
    }
}

/// The agent's kubectl in pod `work`, with `yaml` as a file in the pod.
fn agent_create(env: &Env, name: &str, yaml: &str) -> Result<Output> {
    let f = env.file(&format!("{name}.yaml"), yaml)?;
    env.gate(&["create", "-f", &f])
}

fn refused(o: &Output, needle: &str, what: &str) -> Result<()> {
    ensure!(
        !o.status.success() && stderr(o).contains(needle),
        "{what}: expected a refusal saying `{needle}`; exit {:?}, stdout {}, stderr {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
    Ok(())
}

fn absent(env: &Env, kind: &str, name: &str) -> Result<()> {
    let o = env.admin(&["get", kind, name, "-o", "name"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("NotFound"),
        "{kind}/{name} exists although the request was refused"
    );
    Ok(())
}

const IMG: &str = "pc-e2e/none:1";

fn pod(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  serviceAccountName: agent\n  containers: [{{name: c, image: {IMG}, imagePullPolicy: Never}}]\n{spec}"
    )
}

fn workload(kind: &str, api: &str, name: &str, pod_spec: &str) -> String {
    let tmpl = format!(
        "    template:\n      metadata: {{labels: {{app: {name}}}}}\n      spec:\n        serviceAccountName: agent\n        restartPolicy: {rp}\n{pod_spec}",
        rp = if kind == "Job" || kind == "CronJob" {
            "Never"
        } else {
            "Always"
        }
    );
    match kind {
        "CronJob" => format!(
            "apiVersion: {api}\nkind: CronJob\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  schedule: \"0 0 1 1 *\"\n  jobTemplate:\n    spec:\n{}",
            tmpl.lines().map(|l| format!("  {l}\n")).collect::<String>()
        ),
        "Job" => format!(
            "apiVersion: {api}\nkind: Job\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  suspend: true\n{}",
            tmpl.lines()
                .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
                .collect::<String>()
        ),
        _ => format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {name}}}}}\n{}",
            tmpl.lines()
                .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
                .collect::<String>()
        ),
    }
}

/// The shipped policy, with short holds so refusals that wait for a human come back
/// quickly.
fn shipped() -> Result<String> {
    let p = std::fs::read_to_string(repo().join("deploy/policy/coding-agents.yaml"))?;
    Ok(p.replace("holdTime: 60s", "holdTime: 1s"))
}

pub fn shipped_policy_closes_exfiltration_and_destructive_paths(env: &mut Env) -> Result<()> {
    // Objects an agent may touch, made by the cluster's admin first.
    env.admin_ok(&[
        "create",
        "secret",
        "generic",
        "exfil-canary",
        "--from-literal=k=pc-canary-exfil",
    ])?;
    env.node.apply(&workload(
        "Deployment",
        "apps/v1",
        "victim",
        "        containers: [{name: c, image: pc-e2e/none:1, imagePullPolicy: Never}]\n",
    ))?;
    env.node.apply(&workload(
        "Job",
        "batch/v1",
        "victim-job",
        "        containers: [{name: c, image: pc-e2e/none:1, imagePullPolicy: Never}]\n",
    ))?;
    env.node.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: victim-svc, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: victim}}\n  ports: [{{port: 80}}]\n"
    ))?;
    use_policy(env, &shipped()?, "coding-agents")?;
    let _restore = Restore(env);
    let secrets = "workloads may not reference Secrets";
    let other_sa = "never as another";
    let host = "may not have host access";
    let c = "  containers: [{name: c, image: pc-e2e/none:1, imagePullPolicy: Never";
    let tc = "        containers: [{name: c, image: pc-e2e/none:1, imagePullPolicy: Never";
    let denied: Vec<(&str, String, &str, &str)> = vec![
        ("pod", pod("x-secret-volume", "  volumes: [{name: s, secret: {secretName: exfil-canary}}]\n"), secrets, "x-secret-volume"),
        ("pod", pod("x-projected", "  volumes: [{name: s, projected: {sources: [{secret: {name: exfil-canary}}]}}]\n"), secrets, "x-projected"),
        ("pod", pod("x-env", "").replace(&format!("{c}}}]"), &format!("{c}, env: [{{name: K, valueFrom: {{secretKeyRef: {{name: exfil-canary, key: k}}}}}}]}}]")), secrets, "x-env"),
        ("pod", pod("x-pull", "  imagePullSecrets: [{name: exfil-canary}]\n"), secrets, "x-pull"),
        ("deployment", workload("Deployment", "apps/v1", "x-envfrom", &format!("{tc}, envFrom: [{{secretRef: {{name: exfil-canary}}}}]}}]\n")), secrets, "x-envfrom"),
        ("cronjob", workload("CronJob", "batch/v1", "x-cron", &format!("{tc}, env: [{{name: K, valueFrom: {{secretKeyRef: {{name: exfil-canary, key: k}}}}}}]}}]\n")), secrets, "x-cron"),
        ("statefulset", workload("StatefulSet", "apps/v1", "x-sts", &format!("{tc}}}]\n        volumes: [{{name: s, secret: {{secretName: exfil-canary}}}}]\n")).replace("  replicas: 1\n", "  replicas: 1\n  serviceName: x\n"), secrets, "x-sts"),
        ("pod", pod("x-default-sa", "").replace("serviceAccountName: agent", "serviceAccountName: default"), other_sa, "x-default-sa"),
        ("deployment", workload("Deployment", "apps/v1", "x-other-sa", &format!("{tc}}}]\n")).replace("serviceAccountName: agent", "serviceAccountName: builder"), other_sa, "x-other-sa"),
        ("pod", pod("x-privileged", "").replace(&format!("{c}}}]"), &format!("{c}, securityContext: {{privileged: true}}}}]")), host, "x-privileged"),
        ("pod", pod("x-hostpath", "  volumes: [{name: root, hostPath: {path: /}}]\n"), host, "x-hostpath"),
        ("pod", pod("x-hostnet", "  hostNetwork: true\n"), host, "x-hostnet"),
        ("job", workload("Job", "batch/v1", "x-caps", &format!("{tc}, securityContext: {{capabilities: {{add: [NET_ADMIN]}}}}}}]\n")), host, "x-caps"),
        ("service", format!("apiVersion: v1\nkind: Service\nmetadata: {{name: x-extip, namespace: {NAMESPACE}}}\nspec:\n  ports: [{{port: 80}}]\n  externalIPs: [192.0.2.10]\n"), "externalIPs", "x-extip"),
        ("service", format!("apiVersion: v1\nkind: Service\nmetadata: {{name: x-extname, namespace: {NAMESPACE}}}\nspec:\n  type: ExternalName\n  externalName: db.example.com\n"), "ExternalName", "x-extname"),
        ("service", format!("apiVersion: v1\nkind: Service\nmetadata: {{name: x-lb, namespace: {NAMESPACE}}}\nspec:\n  type: LoadBalancer\n  ports: [{{port: 80}}]\n"), "is pending", "x-lb"),
    ];
    for (kind, yaml, needle, name) in &denied {
        let o = agent_create(env, name, yaml)?;
        refused(&o, needle, &format!("{kind} {name}"))?;
        absent(env, kind, name)?;
    }
    // What is not forbidden still works: a plain pod and a deployment as the agent's
    // own service account (created on the apiserver's dry run of the same request),
    // server-side applied twice (the second an apply patch made conditional on the
    // checked version).
    let o = agent_create(env, "ok-pod", &pod("ok-pod", ""))?;
    ensure!(o.status.success(), "a plain pod: {}", stderr(&o));
    let ok = workload("Deployment", "apps/v1", "ok-web", &format!("{tc}}}]\n"));
    let f = env.file("ok-web.yaml", &ok)?;
    for round in 0..2 {
        let o = env.gate(&["apply", "--server-side", "-f", &f])?;
        ensure!(
            o.status.success(),
            "server-side apply {round}: {}",
            stderr(&o)
        );
    }
    let o = env.gate(&["set", "image", "deployment/ok-web", "c=pc-e2e/none:2"])?;
    ensure!(o.status.success(), "image bump: {}", stderr(&o));
    // Patches that would add a Secret: strategic merge and JSON patch.
    let o = env.gate(&["patch", "deployment", "ok-web", "-p", r#"{"spec":{"template":{"spec":{"volumes":[{"name":"s","secret":{"secretName":"exfil-canary"}}]}}}}"#])?;
    refused(&o, secrets, "strategic-merge patch adding a secret volume")?;
    let o = env.gate(&["patch", "deployment", "ok-web", "--type=json", "-p", r#"[{"op":"add","path":"/spec/template/spec/containers/0/envFrom","value":[{"secretRef":{"name":"exfil-canary"}}]}]"#])?;
    refused(&o, secrets, "JSON patch adding envFrom")?;
    let dep = env.admin_ok(&["get", "deployment", "ok-web", "-o", "json"])?;
    ensure!(
        !dep.contains("exfil-canary"),
        "a secret reference landed: {dep}"
    );

    // Destructive edits without a delete wait for a human (then 403 pending).
    let pending = "is pending";
    let destructive: Vec<(&str, Vec<&str>)> = vec![
        (
            "ownerReferences to a missing owner",
            vec![
                "patch",
                "deployment",
                "victim",
                "--type=merge",
                "-p",
                r#"{"metadata":{"ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"gone","uid":"6f1e2d3c-0000-4000-8000-000000000000"}]}}"#,
            ],
        ),
        (
            "scale to zero",
            vec!["scale", "deployment", "victim", "--replicas=0"],
        ),
        (
            "history limit to zero",
            vec![
                "patch",
                "deployment",
                "victim",
                "-p",
                r#"{"spec":{"revisionHistoryLimit":0}}"#,
            ],
        ),
        (
            "a finalizer added",
            vec![
                "patch",
                "deployment",
                "victim",
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":["example.dev/hold"]}}"#,
            ],
        ),
        (
            "ttlSecondsAfterFinished on a job",
            vec![
                "patch",
                "job",
                "victim-job",
                "--type=merge",
                "-p",
                r#"{"spec":{"ttlSecondsAfterFinished":0}}"#,
            ],
        ),
        (
            "a service selector change",
            vec![
                "patch",
                "service",
                "victim-svc",
                "-p",
                r#"{"spec":{"selector":{"app":"elsewhere"}}}"#,
            ],
        ),
    ];
    for (what, args) in &destructive {
        let o = env.gate(args)?;
        refused(&o, pending, what)?;
    }
    let v: serde_json::Value =
        serde_json::from_str(&env.admin_ok(&["get", "deployment", "victim", "-o", "json"])?)?;
    ensure!(
        v["spec"]["replicas"] == 1
            && v["spec"]["revisionHistoryLimit"] == 10
            && v["metadata"]["ownerReferences"].is_null()
            && v["metadata"]["finalizers"].is_null(),
        "the victim deployment was changed: {v}"
    );
    let j = env.admin_ok(&[
        "get",
        "job",
        "victim-job",
        "-o",
        "jsonpath={.spec.ttlSecondsAfterFinished}",
    ])?;
    ensure!(j.trim().is_empty(), "the job got a TTL: {j}");
    let s = env.admin_ok(&[
        "get",
        "service",
        "victim-svc",
        "-o",
        "jsonpath={.spec.selector.app}",
    ])?;
    ensure!(s.trim() == "victim", "the service selector changed: {s}");

    // Sessions: only into the agent's own pods.
    let o = env.gate(&[
        "exec",
        TARGET_POD,
        "-c",
        "main",
        "--",
        "echo",
        "into-a-workload",
    ])?;
    refused(
        &o,
        "only into the agent's own pods",
        "exec into a workload pod",
    )?;
    let o = env.gate(&[
        "exec",
        OTHER_POD,
        "-c",
        "main",
        "--",
        "echo",
        "into-an-agent-pod",
    ])?;
    ensure!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("into-an-agent-pod"),
        "exec into an agent pod: {}",
        stderr(&o)
    );
    let o = env.gate(&["attach", TARGET_POD, "-c", "main"])?;
    refused(
        &o,
        "only into the agent's own pods",
        "attach to a workload pod",
    )?;
    println!(
        "    {} exfiltration paths denied, {} destructive edits held, sessions into workload pods denied",
        denied.len(),
        destructive.len()
    );
    for (kind, name) in [
        ("pod", "ok-pod"),
        ("deployment", "ok-web"),
        ("deployment", "victim"),
        ("job", "victim-job"),
        ("service", "victim-svc"),
        ("secret", "exfil-canary"),
    ] {
        let _ = env.admin(&["delete", kind, name, "--wait=false"]);
    }
    Ok(())
}

/// A policy for the race and the grants: the e2e policy plus a scale-to-zero deny, an
/// approval for edits of `race-*` deployments, and held deletes with a long grant.
fn race_policy() -> String {
    POLICY
        .replace("metadata: {name: e2e}", "metadata: {name: e2e-content}")
        .replace(
            "      holdTime: 4s\n      grantTTL: 8s",
            "      holdTime: 2s\n      grantTTL: 120s",
        )
        + r#"  - name: race-edits
    verbs: [patch]
    apiGroups: [apps]
    resources: [deployments]
    resourceNames: ["race-*"]
    action: approve
    message: edits of race-* need a human
    approval:
      approvers: [{kind: Group, name: "oidc:oncall"}]
      holdTime: 20s
      grantTTL: 60s
  - name: no-scale-to-zero
    verbs: [update, patch]
    apiGroups: [apps]
    resources: [deployments, deployments/scale]
    conditions:
    - {name: running, expression: "oldObject.spec.replicas > 0"}
    - {name: to-zero, expression: "object.spec.replicas == 0"}
    action: deny
    message: scaling a running workload to zero deletes its pods
"#
}

/// The check is made on one version of the object, the write must not land on
/// another: a deployment at zero replicas, an agent's patch keeping it at zero (no
/// scale-down: allowed, but held for a human); while it waits, the admin scales the
/// deployment up; then it is approved. Unconditionally forwarded, the same patch would
/// now scale a running deployment to zero.
pub fn a_change_between_check_and_write_is_a_conflict(env: &mut Env) -> Result<()> {
    env.node.apply(
        &workload(
            "Deployment",
            "apps/v1",
            "race-web",
            "        containers: [{name: c, image: pc-e2e/none:1, imagePullPolicy: Never}]\n",
        )
        .replace("replicas: 1", "replicas: 0"),
    )?;
    use_policy(env, &race_policy(), "e2e-content")?;
    let _restore = Restore(env);
    let patch = r#"{"metadata":{"annotations":{"race":"agent"}},"spec":{"replicas":0}}"#;
    let child = env
        .gate_cmd(&[
            "patch",
            "deployment",
            "race-web",
            "--type=merge",
            "-p",
            patch,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let t = Instant::now();
    let id = loop {
        let v = pc(env, &["approvals", "list", "-o", "json"])?;
        if let Some(a) = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["request"]["name"] == "race-web" && a["state"] == "pending")
        {
            break a["id"].as_str().unwrap_or_default().to_owned();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "the patch was not held"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    env.admin_ok(&["scale", "deployment", "race-web", "--replicas=2"])?;
    pc(env, &["approvals", "approve", &id, "--as", "oncall-human"])?;
    let o = child.wait_with_output()?;
    ensure!(
        !o.status.success()
            && (stderr(&o).contains("Conflict") || stderr(&o).contains("has been modified")),
        "the approved patch should meet a changed object and get 409: exit {:?} {}",
        o.status.code(),
        stderr(&o)
    );
    let v: serde_json::Value =
        serde_json::from_str(&env.admin_ok(&["get", "deployment", "race-web", "-o", "json"])?)?;
    ensure!(
        v["spec"]["replicas"] == 2 && v["metadata"]["annotations"]["race"].is_null(),
        "the checked patch landed on the changed object: {}",
        v["spec"]
    );
    // The retry is decided on the object as it is now.
    let o = env.gate(&[
        "patch",
        "deployment",
        "race-web",
        "--type=merge",
        "-p",
        patch,
    ])?;
    refused(&o, "scaling a running workload to zero", "the retry")?;
    let r = env.admin_ok(&[
        "get",
        "deployment",
        "race-web",
        "-o",
        "jsonpath={.spec.replicas}",
    ])?;
    ensure!(r.trim() == "2", "replicas {r}");
    println!(
        "    approved during a concurrent scale-up: 409 Conflict, the retry denied, replicas stay 2"
    );
    let _ = env.admin(&["delete", "deployment", "race-web", "--wait=false"]);
    Ok(())
}

/// A grant lets through the request that was approved — method, path, query, body,
/// pod — and nothing else.
pub fn grants_cover_only_the_approved_request(env: &mut Env) -> Result<()> {
    use_policy(env, &race_policy(), "e2e-content")?;
    let _restore = Restore(env);
    env.admin_ok(&["create", "configmap", "held-scope"])?;
    let o = env.gate(&["delete", "configmap", "held-scope"])?;
    refused(&o, "is pending", "the first delete")?;
    let e = stderr(&o);
    let at = e.find("approval apr-").context("no approval id")? + "approval ".len();
    let id: String = e[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    pc(env, &["approvals", "approve", &id, "--as", "oncall-human"])?;
    // The same attributes, another request each: still held.
    let variants: Vec<(&str, Output)> = vec![
        (
            "another body (propagationPolicy)",
            env.gate(&["delete", "configmap", "held-scope", "--cascade=orphan"])?,
        ),
        (
            "another query (dryRun)",
            env.gate(&["delete", "configmap", "held-scope", "--dry-run=server"])?,
        ),
        (
            "another body (grace period)",
            env.gate(&["delete", "configmap", "held-scope", "--grace-period=3"])?,
        ),
        (
            "another pod",
            run_pod(
                env.in_pod(OTHER_POD, &["kubectl", "delete", "configmap", "held-scope"]),
                None,
            )?,
        ),
    ];
    for (what, o) in &variants {
        refused(o, "is pending", what)?;
    }
    ensure!(
        env.admin(&["get", "configmap", "held-scope"])?
            .status
            .success(),
        "a request the grant does not cover deleted the configmap"
    );
    // The approved request itself passes.
    env.gate_ok(&["delete", "configmap", "held-scope"])?;
    ensure!(
        !env.admin(&["get", "configmap", "held-scope"])?
            .status
            .success(),
        "the approved delete did not happen"
    );
    println!(
        "    the grant passed its request and held {} variants",
        variants.len()
    );
    Ok(())
}

/// Deleting a service account, or a pod, ends its tokens at once at the API server
/// (TokenReview); the gate asks it, so the next requests through the gate are refused.
pub fn tokenreview_revokes_deleted_service_accounts_and_pods(env: &mut Env) -> Result<()> {
    let policy = POLICY
        .replace("metadata: {name: e2e}", "metadata: {name: e2e-any-sa}")
        .replace(
            "{kind: ServiceAccount, namespace: e2e, name: agent}",
            "{kind: ServiceAccount, namespace: e2e, name: \"*\"}",
        );
    let pod_yaml = |name: &str, sa: &str, grace: u32| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  serviceAccountName: {sa}\n  terminationGracePeriodSeconds: {grace}\n  containers:\n  - name: main\n    image: {AGENT_IMAGE}\n    imagePullPolicy: Never\n    command: [sh, -c, \"trap '' TERM; while true; do sleep 1; done\"]\n"
        )
    };
    env.node.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: revocable, namespace: {NAMESPACE}}}\n"
    ))?;
    env.node.wait_service_account(NAMESPACE, "revocable")?;
    env.node.apply(&pod_yaml("revocable", "revocable", 1))?;
    env.node.apply(&pod_yaml("revoke-pod", "agent", 60))?;
    let mut containers = Vec::new();
    for name in ["revocable", "revoke-pod"] {
        let uid = env.node.wait_pod_ready(NAMESPACE, name)?;
        let cg = env.node.pod_cgroup(&uid)?;
        let o = env
            .daemon
            .cli(&["enroll", &cg.display().to_string()])
            .output()?;
        ensure!(
            o.status.success(),
            "enroll {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let id = env.node.kubectl_ok(&[
            "-n",
            NAMESPACE,
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.status.containerStatuses[0].containerID}",
        ])?;
        containers.push(id.trim_start_matches("containerd://").to_owned());
    }
    use_policy(env, &policy, "e2e-any-sa")?;
    let _restore = Restore(env);
    // Straight through containerd (the container's own environment and in-cluster
    // configuration): works while the pod object is gone.
    let in_container = |id: &str| -> Result<Output> {
        let mut c = std::process::Command::new(env.node.parts.bin("ctr"));
        c.arg("-a")
            .arg(env.node.containerd_sock())
            .args(["-n", "k8s.io", "tasks", "exec", "--exec-id"])
            .arg(format!("rv-{}", portcullis_tests::node::random_token()))
            .arg(id)
            .args([
                "timeout",
                "-s",
                "KILL",
                "30",
                "kubectl",
                "get",
                "configmaps",
                "-o",
                "name",
            ]);
        run_bounded(c, None)
    };
    for (name, id) in ["revocable", "revoke-pod"].iter().zip(&containers) {
        let o = in_container(id)?;
        ensure!(o.status.success(), "{name} before deletion: {}", stderr(&o));
    }
    let refused_within = |id: &str, what: &str| -> Result<Duration> {
        let t = Instant::now();
        loop {
            let o = in_container(id)?;
            if !o.status.success() {
                let e = stderr(&o);
                ensure!(
                    e.contains("no longer valid") || e.contains("Unauthorized"),
                    "{what}: refused for another reason: {e}"
                );
                return Ok(t.elapsed());
            }
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "{what}: still accepted 30 s after the deletion"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    env.admin_ok(&["delete", "serviceaccount", "revocable"])?;
    let sa = refused_within(&containers[0], "deleted service account")?;
    // The pod keeps running (its SIGTERM is ignored for its grace period) after its
    // object is force-deleted.
    env.admin_ok(&["delete", "pod", "revoke-pod", "--grace-period=0", "--force"])?;
    let pod = refused_within(&containers[1], "deleted pod")?;
    println!(
        "    refused {:.1} s after the service account was deleted, {:.1} s after the pod was (apiserver token cache 10 s + review TTL 3 s)",
        sa.as_secs_f64(),
        pod.as_secs_f64()
    );
    let _ = env.admin(&["delete", "pod", "revocable", "--grace-period=0", "--force"]);
    // The work pod's token is untouched.
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    let _ = POD;
    Ok(())
}
