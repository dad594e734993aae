//! A rolling upgrade of the DaemonSet while an agent keeps connecting: the next
//! daemon starts beside the old one (maxSurge), binds the same address and takes the
//! node over. Measured from the agent: every request's outcome, the longest run of
//! failures and the time in them. Proved from the API server's audit log and the
//! kernel's records: no request of the agent ever reached the API server directly.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use portcullis_tests::{gate::POD, install};
use serde_json::Value;

use crate::Env;

/// The agent's load: GET /version through its in-cluster configuration, one request
/// per fresh TLS connection, every 50 ms, for `secs`; prints a JSON summary.
pub const LOAD: &str = r#"
import json, ssl, sys, time, http.client, os
secs = float(sys.argv[1])
host = os.environ["KUBERNETES_SERVICE_HOST"]; port = int(os.environ["KUBERNETES_SERVICE_PORT"])
d = "/var/run/secrets/kubernetes.io/serviceaccount"
ctx = ssl.create_default_context(cafile=d + "/ca.crt")
res = []
end = time.time() + secs
while time.time() < end:
    t = time.time()
    try:
        token = open(d + "/token").read().strip()
        c = http.client.HTTPSConnection(host, port, context=ctx, timeout=5)
        c.request("GET", "/version", headers={"Authorization": "Bearer " + token})
        r = c.getresponse(); r.read(); c.close()
        res.append((t, time.time(), r.status == 200, str(r.status)))
    except Exception as e:
        res.append((t, time.time(), False, type(e).__name__ + ": " + str(e)[:80]))
    time.sleep(0.05)
fails = [r for r in res if not r[2]]
longest = 0.0; cur_start = None; failed_time = 0.0
for (t0, t1, ok, why) in res:
    if not ok:
        if cur_start is None: cur_start = t0
        longest = max(longest, t1 - cur_start)
    else:
        cur_start = None
for (t0, t1, ok, why) in fails:
    failed_time += t1 - t0
print(json.dumps({"requests": len(res), "failed": len(fails), "longest_failure_s": round(longest, 3),
                  "last_ok": bool(res) and res[-1][2],
                  "time_failing_s": round(failed_time, 3),
                  "errors": sorted(set(f[3] for f in fails))[:10]}))
"#;

pub fn rolling_upgrade(env: &mut Env) -> Result<()> {
    let script = env.file("upgrade-load.py", LOAD)?;
    let before_audit = env.apiserver_audit().len();
    let old_pods = install::daemon_pods(&env.node)?;
    let load = env.in_pod(POD, &["python3", &script, "25"]);
    let handle = std::thread::spawn(move || crate::run(load));
    std::thread::sleep(Duration::from_secs(4));
    env.node.kubectl_ok(&[
        "-n",
        install::NAMESPACE,
        "rollout",
        "restart",
        &format!("daemonset/{}", install::DAEMONSET),
    ])?;
    install::wait_rolled_out(&env.node, 90)?;
    let out = handle
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("load: {line} {}", String::from_utf8_lossy(&out.stderr)))?;
    println!("  rolling upgrade, agent's view: {v}");
    let new_pods = install::daemon_pods(&env.node)?;
    ensure!(
        new_pods.iter().all(|p| !old_pods.contains(p)),
        "the DaemonSet did not roll: {old_pods:?} -> {new_pods:?}"
    );
    ensure!(
        v["requests"].as_u64().unwrap_or(0) > 50,
        "too few requests: {v}"
    );
    // No direct connection: every request the API server saw from the agent's pod came
    // through the daemon (impersonated), none as the pod's own service account.
    let direct = direct_since(env, before_audit)?;
    ensure!(
        direct == 0,
        "{direct} requests reached the API server directly during the upgrade"
    );
    // The gap is small: the longest run of failures.
    let longest = v["longest_failure_s"].as_f64().unwrap_or(f64::MAX);
    ensure!(
        longest < 3.0,
        "agents were refused for {longest} s in a row: {v}"
    );
    Ok(())
}

/// Requests in the API server's audit log (from entry `from` on) authenticated as an
/// `e2e` service account from the agent pod's own IP: what reaching the API server
/// directly looks like (the gate connects from the node's address, impersonating).
pub fn direct_since(env: &Env, from: usize) -> Result<usize> {
    let ip = env.node.kubectl_ok(&[
        "-n",
        portcullis_tests::gate::NAMESPACE,
        "get",
        "pod",
        POD,
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    ensure!(!ip.is_empty(), "the agent pod has no IP");
    let audit = env.apiserver_audit();
    Ok(audit[from.min(audit.len())..]
        .iter()
        .filter(|e| {
            e["user"]["username"]
                .as_str()
                .is_some_and(|u| u.starts_with("system:serviceaccount:e2e:"))
                && e["sourceIPs"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|i| i == ip.as_str()))
        })
        .count())
}
