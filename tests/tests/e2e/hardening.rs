//! Hostile clients and outages: the agent's identity never reaches the API server,
//! unredirected connections, malformed heads and smuggling, slow senders, HTTP/2 rapid
//! reset, the API server down.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use portcullis_tests::gate::{AGENT_USER, DAEMON_ADDR, DAEMON_USER, NAMESPACE, POD_CA};

use crate::{Clients, Env, apiserver_audit, run_bounded, stderr};

pub fn identity_replaced(env: &mut Env) -> Result<()> {
    // The agent's own token has no RBAC at all; what it may do comes from the scoped
    // identity the daemon impersonates. Its attempts to impersonate are stripped,
    // whatever form they take. (kubectl ignores its in-cluster configuration once
    // `--as` is given, so the impersonating runs name the server explicitly, as an
    // agent writing its own kubeconfig would.)
    let token = format!("--token={}", env.agent_token.trim());
    let explicit = [
        "--server=https://10.96.0.1:443",
        "--certificate-authority=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        token.as_str(),
    ];
    for extra in [
        &[][..],
        &["--as=system:admin", "--as-group=system:masters"][..],
        &["--as=system:admin", "--as-uid=0"][..],
    ] {
        let mut args = vec!["get", "secrets", "-n", "kube-system"];
        if !extra.is_empty() {
            args.extend_from_slice(&explicit);
        }
        args.extend_from_slice(extra);
        let o = env.gate(&args)?;
        let e = stderr(&o);
        ensure!(
            !o.status.success(),
            "agent read kube-system secrets with {extra:?}"
        );
        ensure!(
            e.contains("Forbidden") && e.contains(&format!("User \"{AGENT_USER}\"")),
            "with {extra:?}: {e}"
        );
    }
    // Raw headers, every Impersonate-* form, and a second Authorization.
    let (code, _, body) = crate::identity::agent_request(
        env,
        portcullis_tests::gate::POD,
        Some(env.agent_token.trim()),
        "/api/v1/namespaces/kube-system/secrets",
        None,
        &[
            ("Impersonate-User", "system:admin"),
            ("Impersonate-Group", "system:masters"),
            ("impersonate-uid", "0"),
            ("Impersonate-Extra-Scopes", "all"),
        ],
    )?;
    ensure!(
        code == 403 && body.contains(&format!("User \\\"{AGENT_USER}\\\"")),
        "raw Impersonate-* headers: {code} {body}"
    );
    let entries = apiserver_audit(env);
    let agent_sa = format!("system:serviceaccount:{NAMESPACE}:agent");
    ensure!(
        !entries
            .iter()
            .any(|e| e["user"]["username"] == agent_sa.as_str()),
        "the agent's own token reached the apiserver"
    );
    let via_gate = entries
        .iter()
        .filter(|e| {
            e["user"]["username"] == DAEMON_USER && e["impersonatedUser"]["username"] == AGENT_USER
        })
        .count();
    ensure!(
        via_gate > 10,
        "only {via_gate} audit entries show the daemon impersonating the agent"
    );
    ensure!(
        !entries.iter().any(|e| e["user"]["username"] == DAEMON_USER
            && e["impersonatedUser"]["username"] == "system:admin"),
        "an agent-requested impersonation reached the apiserver"
    );
    Ok(())
}

pub fn unredirected_refused(env: &mut Env) -> Result<()> {
    // From the node, not an agent: straight to the daemon's address, with the agent's
    // own token (which could come from any pod).
    let kc = env.dir.join("unredirected.kubeconfig");
    std::fs::write(
        &kc,
        portcullis_tests::gate::kubeconfig(
            &format!("https://{DAEMON_ADDR}"),
            &env.state_dir().join("ca/ca.crt"),
            &env.agent_token,
            None,
        ),
    )?;
    let mut c = env.node.command(&env.node.parts.bin("kubectl"));
    c.arg(format!("--kubeconfig={}", kc.display()))
        .arg("--tls-server-name=kubernetes.default.svc")
        // --raw skips discovery, whose errors kubectl reports only as "unknown".
        .args(["get", "--raw", "/api/v1/namespaces/e2e/configmaps"])
        .env("HOME", env.dir.join("home-node"));
    let o = run_bounded(c, None)?;
    let e = stderr(&o);
    ensure!(!o.status.success(), "served an unredirected connection");
    ensure!(e.contains("Forbidden") && e.contains("redirected"), "{e}");
    Ok(())
}

pub fn apiserver_down(env: &mut Env) -> Result<()> {
    env.node.stop("kube-apiserver");
    // `kubectl exec` needs the apiserver, so the agent's kubectl is started in its
    // container through containerd directly (same container, cgroup and namespaces).
    let o = crate::run_bounded(
        env.in_pod_via_runtime(
            portcullis_tests::gate::POD,
            // In-cluster configuration needs nothing from the API server, but kubectl
            // run this way gets no KUBERNETES_SERVICE_* environment: name the Service.
            &[
                "kubectl",
                "--server=https://10.96.0.1:443",
                &format!("--certificate-authority={POD_CA}"),
                &format!("--token={}", env.agent_token.trim()),
                "get",
                "configmaps",
                "--request-timeout=20s",
            ],
        )?,
        None,
    )?;
    let e = stderr(&o);
    ensure!(!o.status.success(), "succeeded with the apiserver down");
    ensure!(
        e.contains("cannot reach the Kubernetes API server"),
        "kubectl said: {e}"
    );
    Ok(())
}

/// pc-abuse as an agent: a hostile client, redirected to the daemon like any other.
fn abuse(env: &Env, args: &[&str]) -> Result<serde_json::Value> {
    let token = format!("--token={}", env.agent_token.trim());
    let mut full = vec!["--ca", POD_CA, token.as_str()];
    full.extend_from_slice(args);
    let o = run_bounded(env.agent_bin("pc-abuse", &full), None)?;
    ensure!(
        o.status.success(),
        "pc-abuse {args:?} failed: {}",
        stderr(&o)
    );
    Ok(serde_json::from_slice(&o.stdout)?)
}

fn first_status(v: &serde_json::Value) -> String {
    v["statuses"][0].as_str().unwrap_or("").to_string()
}

pub fn malformed_requests(env: &mut Env) -> Result<()> {
    let api = env.cluster_ip().to_string();
    for (kind, want) in [
        ("garbage", "HTTP/1.1 400"),
        ("duplicate-length", "HTTP/1.1 400"),
        ("huge-header", "HTTP/1.1 431"),
    ] {
        let v = abuse(env, &["h1", kind, &api])?;
        ensure!(first_status(&v).starts_with(want), "{kind}: {v}");
        ensure!(v["closed"] == true, "{kind}: connection left open: {v}");
    }
    // Smuggling: refused with a Status, the connection closed, and the request hidden
    // in the body never reaches the API server.
    let v = abuse(env, &["h1", "smuggle", &api])?;
    ensure!(first_status(&v).starts_with("HTTP/1.1 400"), "smuggle: {v}");
    ensure!(
        v["statuses"].as_array().map(Vec::len) == Some(1),
        "second request answered: {v}"
    );
    ensure!(
        v["body"]
            .as_str()
            .unwrap_or("")
            .contains("\"kind\":\"Status\""),
        "no Status body: {v}"
    );
    ensure!(v["closed"] == true, "smuggle: connection left open: {v}");
    let hidden = apiserver_audit(env).into_iter().any(|e| {
        e["verb"] == "delete"
            && e["objectRef"]["resource"] == "configmaps"
            && e["objectRef"]["name"] == "x"
    });
    ensure!(!hidden, "the smuggled DELETE reached the API server");
    // And the gate still serves.
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    Ok(())
}

pub fn slow_headers(env: &mut Env) -> Result<()> {
    let api = env.cluster_ip().to_string();
    let slow = env
        .agent_bin("pc-abuse", &["--ca", POD_CA, "h1", "slow-headers", &api])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // While it trickles, everyone else is served normally.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "served slowly: {:?}",
        t.elapsed()
    );
    let o = slow.wait_with_output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("pc-abuse said {}", String::from_utf8_lossy(&o.stdout)))?;
    // header_timeout is 3 s here; the trickle would take 30 s.
    let ms = v["elapsed_ms"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        v["closed"] == true || !v["write_error"].is_null(),
        "slow sender not cut off: {v}"
    );
    ensure!((2500..10_000).contains(&ms), "cut off after {ms} ms: {v}");
    Ok(())
}

pub fn rapid_reset(env: &mut Env) -> Result<()> {
    let api = env.cluster_ip().to_string();
    let lists = |env: &Env| {
        apiserver_audit(env)
            .iter()
            .filter(|e| {
                e["verb"] == "list"
                    && e["objectRef"]["resource"] == "configmaps"
                    // The apiserver has not applied impersonation when it records a
                    // request's arrival: those are the daemon's.
                    && e["user"]["username"] == DAEMON_USER
                    && e["stage"] == "RequestReceived"
            })
            .count()
    };
    // A burst: h2's limit on streams reset before they were accepted answers it.
    // Paced: each stream is accepted and forwarded before its reset, so the daemon's
    // own cancel budget has to close the connection.
    // On a loaded machine the daemon may accept streams later than the client resets
    // them, and then h2's own limit (ENHANCE_YOUR_CALM) closes the paced attack before
    // the daemon's budget does; the pace is then slowed until the budget is what acts.
    let budget_log = |env: &Env| {
        env.daemon_log()
            .matches("too many cancelled requests")
            .count()
    };
    // The count can fail: one ordinary list through the gate shows up in it.
    let before = lists(env);
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        lists(env) > before,
        "an ordinary list through the gate was not counted: the count below would prove nothing"
    );
    let mut budget_acted = false;
    // Bounds: what a starved daemon forwards before it acts stays far below the 5000
    // streams sent (measured 500-650 on 2 busy cores).
    for (pace, max_reached) in [("0", 1500), ("300", 1000), ("1000", 1000), ("3000", 1000)] {
        if budget_acted {
            break;
        }
        let before = lists(env);
        let log_before = budget_log(env);
        let v = abuse(
            env,
            &["rapid-reset", &api, "--count", "5000", "--pace-us", pace],
        )?;
        let verdict = format!("{} {}", v["connection"], v["send_error"]);
        ensure!(
            [
                "ENHANCE_YOUR_CALM",
                // The same reason as h2 displays it: in a burst the client's own h2
                // may give up first (too many of its streams answered after it reset
                // them), as it did on a busy CI run.
                "excessive load generating behavior",
                "GOAWAY",
                "closed",
                "broken pipe",
                "reset"
            ]
            .iter()
            .any(|w| verdict.contains(w)),
            "pace {pace}: connection not closed: {v}"
        );
        // Audit is written asynchronously: give it a moment.
        std::thread::sleep(Duration::from_secs(2));
        let reached = lists(env) - before;
        ensure!(
            reached < max_reached,
            "pace {pace}: {reached} of the cancelled streams reached the API server"
        );
        budget_acted = pace != "0" && budget_log(env) > log_before;
        println!(
            "    rapid reset, pace {pace} µs: {v}; {reached} reached the API server; \
             daemon budget acted: {budget_acted}"
        );
    }
    ensure!(
        budget_acted,
        "the daemon's cancel budget never closed a paced attack"
    );
    let t = Instant::now();
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(15),
        "gate slow after the attack: {:?}",
        t.elapsed()
    );
    Ok(())
}
