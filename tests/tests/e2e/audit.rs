//! Audit evidence: per-request records (durable before a mutation acts, even across a
//! kill -9), the HTTP sink, sessions, export, replay, and the hash chain's tamper check.
use std::{
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use portcullis_tests::gate::{ANCHOR_NAME, ANCHOR_NAMESPACE, AUDIT_SECTION, POD, SA_ISSUER};

use crate::{Clients, Env, masking::assert_no_canary, python, stderr};

/// The chained records of the daemon's audit directory.
fn chain(env: &Env) -> Result<Vec<serde_json::Value>> {
    let dir = env.state_dir().join("audit");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    segs.sort();
    let mut out = Vec::new();
    for s in segs {
        for l in std::fs::read_to_string(s)?.lines() {
            if let Ok(v) = serde_json::from_str(l) {
                out.push(v);
            }
        }
    }
    Ok(out)
}

fn cli(env: &Env, args: &[&str]) -> Result<Output> {
    env.portcullis_plain(args)
}

pub fn requests(env: &mut Env) -> Result<()> {
    env.gate_ok(&["get", "configmaps", "-l", "audit-probe=1"])?;
    std::thread::sleep(Duration::from_millis(500));
    let recs = chain(env)?;
    let list = recs
        .iter()
        .rev()
        .find(|r| {
            r["kind"] == "request"
                && r["record"]["query"]
                    .as_str()
                    .is_some_and(|q| q.contains("audit-probe"))
        })
        .context("no request record for the list")?;
    let r = &list["record"];
    ensure!(
        r["user"]["username"] == "system:serviceaccount:e2e:agent"
            && r["user"]["issuer"] == SA_ISSUER
            && r["user"]["token_id"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            && r["origin"]["pod_uid"] == env.work_uid.as_str()
            && r["origin"]["comm"]
                .as_str()
                .is_some_and(|c| c.starts_with("kubectl"))
            && r["origin"]["pid"].as_u64().is_some_and(|p| p > 0)
            && r["origin"]["cgroup_id"].as_u64().is_some_and(|p| p > 0)
            && r["attributes"]["verb"] == "list"
            && r["attributes"]["resource"] == "configmaps"
            && r["decision"] == "allow"
            && r["rule"] == "agent-everything",
        "request record: {r}"
    );
    let all = serde_json::to_string(&recs)?;
    ensure!(
        !all.contains(env.agent_token.trim()),
        "the agent's token is in the audit log"
    );
    let id = r["id"].as_str().context("id")?;
    let resp = recs
        .iter()
        .find(|x| x["kind"] == "response" && x["record"]["id"] == id)
        .context("no response record")?;
    ensure!(
        resp["record"]["code"] == 200
            && resp["record"]["complete"] == true
            && resp["record"]["latency_ms"]
                .as_f64()
                .is_some_and(|l| l > 0.0),
        "response record: {resp}"
    );
    // A mutation's masked body is recorded (level Request), never its secret values.
    let f = env.file(
        "audit-json.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: audit-json\n  namespace: e2e\nstringData:\n  t: pc-canary-py-7\n",
    )?;
    env.gate_ok(&["create", "-f", &f])?;
    std::thread::sleep(Duration::from_millis(300));
    let recs = chain(env)?;
    let body_rec = recs
        .iter()
        .find(|x| {
            x["kind"] == "request"
                && x["record"]["method"] == "POST"
                && x["record"]["attributes"]["resource"] == "secrets"
                && x["record"]["request_body"]["metadata"]["name"] == "audit-json"
        })
        .context("no recorded body for the JSON secret create")?;
    ensure!(body_rec["record"]["mutating"] == true, "{body_rec}");
    assert_no_canary("audit record of a Secret create", &body_rec.to_string())?;
    env.gate_ok(&[
        "create",
        "secret",
        "generic",
        "audit-pb",
        "--from-literal=k=pc-canary-alpha-2",
    ])?;
    std::thread::sleep(Duration::from_millis(300));
    let pb = chain(env)?
        .into_iter()
        .rev()
        .find(|x| {
            x["kind"] == "request"
                && x["record"]["method"] == "POST"
                && x["record"]["attributes"]["resource"] == "secrets"
        })
        .context("no record of kubectl's create")?;
    // kubectl's protobuf body is decoded and recorded masked.
    ensure!(
        pb["record"]["content_type"]
            .as_str()
            .is_some_and(|c| c.starts_with("application/vnd.kubernetes.protobuf"))
            && pb["record"]["request_body"]["metadata"]["name"] == "audit-pb"
            && pb["record"]["request_body"]["data"]["k"] == crate::masking::PLACEHOLDER_B64,
        "protobuf body: {pb}"
    );
    assert_no_canary("audit record of a protobuf create", &pb.to_string())?;

    // kill -9 during a burst of deletes: every delete the apiserver applied has a
    // durable record.
    let n = 40;
    let mut names = Vec::new();
    let mut yaml = String::new();
    for i in 0..n {
        names.push(format!("burst-{i}"));
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: burst-{i}\n  namespace: e2e\n"
        ));
    }
    env.file("burst.yaml", &yaml)?;
    env.admin_ok(&[
        "apply",
        "-f",
        &env.host_file("burst.yaml").display().to_string(),
    ])?;
    let script = env.file(
        "burst.py",
        r#"
import sys
from kubernetes import client, config
config.load_incluster_config()
v1 = client.CoreV1Api()
for i in range(int(sys.argv[1])):
    try:
        v1.delete_namespaced_config_map("burst-%d" % i, "e2e")
    except Exception as e:
        print("stopped at", i, type(e).__name__, flush=True)
        break
"#,
    )?;
    let remaining = |env: &Env| -> Result<std::collections::HashSet<String>> {
        Ok(env
            .direct_ok(&["get", "configmaps", "-o", "name"])?
            .lines()
            .map(|l| l.trim_start_matches("configmap/").to_owned())
            .collect())
    };
    let n_s = n.to_string();
    let mut burst = env
        .in_pod(POD, &["python3", &script, &n_s])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Kill once some deletes went through, mid-burst.
    let t0 = Instant::now();
    loop {
        let left = remaining(env)?;
        let gone = names.iter().filter(|x| !left.contains(*x)).count();
        if gone >= 5 || t0.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    env.daemon.kill(); // SIGKILL
    let _ = burst.wait();
    let left = remaining(env)?;
    let deleted: Vec<&String> = names.iter().filter(|x| !left.contains(*x)).collect();
    ensure!(
        !deleted.is_empty() && deleted.len() < n,
        "the kill did not land mid-burst: {} of {n} deleted",
        deleted.len()
    );
    let recs = chain(env)?;
    for name in &deleted {
        let path = format!("/api/v1/namespaces/e2e/configmaps/{name}");
        ensure!(
            recs.iter().any(|r| r["kind"] == "request"
                && r["record"]["method"] == "DELETE"
                && r["record"]["path"] == path.as_str()),
            "{name} was deleted by the apiserver but has no durable audit record"
        );
    }
    env.restart_with_audit(AUDIT_SECTION)?;
    let dir = env.state_dir().join("audit").display().to_string();
    let o = cli(env, &["audit", "verify", &dir])?;
    ensure!(
        o.status.success(),
        "chain broken after kill -9: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    println!(
        "    kill -9 after {} of {n} deletes: each has a durable record; chain verifies",
        deleted.len()
    );
    Ok(())
}

pub fn sink(env: &mut Env) -> Result<()> {
    let idp_dir = env.idp.as_ref().context("no idp")?.dir.clone();
    let down = idp_dir.join("sink.down");
    let shipped = idp_dir.join("sink.jsonl");
    std::fs::write(&down, "")?;
    let _ = std::fs::remove_file(&shipped);
    env.restart_with_audit(&env.audit_with_sink())?;
    for _ in 0..5 {
        env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    }
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        !shipped.exists(),
        "the sink was down, yet something arrived"
    );
    ensure!(
        env.daemon_log().contains("audit sink unavailable"),
        "the daemon did not notice the sink was down"
    );
    // Back up: everything arrives, in order, nothing missing or repeated.
    std::fs::remove_file(&down)?;
    for _ in 0..3 {
        env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    }
    let t0 = Instant::now();
    let want: Vec<u64> = loop {
        std::thread::sleep(Duration::from_millis(500));
        let chain_seqs: Vec<u64> = chain(env)?
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .collect();
        let got: Vec<u64> = std::fs::read_to_string(&shipped)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Vec<serde_json::Value>>(l).ok())
            .flatten()
            .filter_map(|r| r["seq"].as_u64())
            .collect();
        // Everything recorded before the last request is shipped.
        let last = *chain_seqs.last().context("empty chain")?;
        if got.last().is_some_and(|g| *g + 5 >= last) || t0.elapsed() > Duration::from_secs(40) {
            let expect: Vec<u64> = (1..=*got.last().unwrap_or(&0)).collect();
            ensure!(
                got == expect,
                "shipped sequence has gaps or repeats: {got:?}"
            );
            break got;
        }
    };
    ensure!(want.len() > 10, "too little shipped: {want:?}");
    println!(
        "    sink down then up: {} records shipped in order, none missing",
        want.len()
    );
    env.restart_with_audit(AUDIT_SECTION)?;
    Ok(())
}

pub fn sessions_and_replay(env: &mut Env) -> Result<()> {
    // A short session after an idle gap (sessions here end after 1 s idle): a create
    // with a JSON body (Python client), reads; then replayed against the real apiserver
    // with dryRun=All.
    std::thread::sleep(Duration::from_millis(1500));
    let o = python(
        env,
        POD,
        "replay.py",
        r#"
from kubernetes import client, config
config.load_incluster_config()
client.CoreV1Api().create_namespaced_config_map("e2e", {"metadata": {"name": "replay-me"}, "data": {"a": "b"}})
"#,
        &[],
    )?;
    ensure!(o.status.success(), "python: {}", stderr(&o));
    env.gate_ok(&["get", "configmap", "replay-me", "-o", "name"])?;
    env.gate_ok(&["create", "configmap", "replay-me-2", "--from-literal=a=b"])?;
    std::thread::sleep(Duration::from_millis(500));
    let dir = env.state_dir().join("audit").display().to_string();
    let o = cli(
        env,
        &["audit", "sessions", &dir, "--idle", "1s", "-o", "json"],
    )?;
    ensure!(o.status.success(), "sessions: {}", stderr(&o));
    let sessions: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let s = sessions
        .as_array()
        .context("sessions")?
        .iter()
        .rev()
        .find(|s| {
            s["subject"] == "system:serviceaccount:e2e:agent"
                && s["pod_uid"] == env.work_uid.as_str()
        })
        .context("no session of the agent's pod")?;
    let id = s["id"].as_str().context("id")?.to_owned();
    ensure!(
        (3..100).contains(&s["requests"].as_u64().unwrap_or(0))
            && s["mutations"].as_u64() >= Some(2),
        "{s}"
    );
    // Export: Kubernetes audit Events.
    let o = cli(env, &["audit", "export", &dir, "--format", "k8s"])?;
    ensure!(o.status.success(), "export: {}", stderr(&o));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let ev = events
        .iter()
        .find(|e| e["objectRef"]["name"] == "replay-me" && e["verb"] == "create")
        .context("no exported event for the create")?;
    ensure!(
        ev["apiVersion"] == "audit.k8s.io/v1"
            && ev["kind"] == "Event"
            && ev["stage"] == "ResponseComplete"
            && ev["responseStatus"]["code"] == 201
            && ev["user"]["username"] == "system:serviceaccount:e2e:agent"
            && ev["annotations"]["portcullis.dev/decision"] == "allow",
        "exported event: {ev}"
    );
    // Replay with the sandbox credential (here the test cluster's admin token) straight
    // at the apiserver.
    let token = env.dir.join("sandbox.token");
    std::fs::write(&token, &env.node.admin_token)?;
    let o = cli(
        env,
        &[
            "replay",
            &id,
            "--dir",
            &dir,
            "--server",
            &env.api_url(),
            "--ca-file",
            &env.node.ca_pem.display().to_string(),
            "--token-file",
            &token.display().to_string(),
            "--idle",
            "1s",
            "-o",
            "json",
        ],
    )?;
    let steps: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "replay printed {} {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        )
    })?;
    let find = |method: &str, needle: &str| {
        steps
            .iter()
            .rev()
            .find(|s| {
                s["method"] == method && s["uri"].as_str().is_some_and(|u| u.contains(needle))
            })
            .cloned()
    };
    let get = find("GET", "/configmaps/replay-me").context("the get was not replayed")?;
    ensure!(get["outcome"] == "same", "get: {get}");
    // The create now meets the object it made: 409 instead of the recorded 201, with
    // dryRun=All (the apiserver validates, changes nothing).
    let create = find("POST", "/namespaces/e2e/configmaps?dryRun=All")
        .context("the create was not replayed")?;
    ensure!(
        create["outcome"] == "differs"
            && create["recorded"] == 201
            && create["replayed"] == 409
            && create["uri"]
                .as_str()
                .is_some_and(|u| u.contains("dryRun=All")),
        "create: {create}"
    );
    ensure!(!o.status.success(), "replay with differences exited 0");
    ensure!(
        steps.iter().any(|s| s["outcome"] == "skipped"
            && s["note"]
                .as_str()
                .is_some_and(|n| n.contains("not recorded"))),
        "no skipped step with a reason"
    );
    println!(
        "    session {id}: {} steps, {} same, {} differ, {} skipped",
        steps.len(),
        steps.iter().filter(|s| s["outcome"] == "same").count(),
        steps.iter().filter(|s| s["outcome"] == "differs").count(),
        steps.iter().filter(|s| s["outcome"] == "skipped").count()
    );
    Ok(())
}

/// Kernel events (every redirect) are hash-chained with signed segment heads;
/// `portcullis audit verify` passes, then fails after one byte of a record is changed.
pub fn chain_tamper(env: &mut Env) -> Result<()> {
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    // Records nobody waited for are signed within 100 ms.
    std::thread::sleep(Duration::from_millis(500));
    let dir = env.state_dir().join("audit");
    let dir_s = dir.display().to_string();
    let o = cli(env, &["audit", "verify", &dir_s])?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success() && out.contains("intact"),
        "verify: {out}{}",
        stderr(&o)
    );
    let seg = dir.join("seg-000001.jsonl");
    let text = std::fs::read_to_string(&seg)?;
    const KIND: &str = "\"kind\":\"kernel-event\"";
    let at = text
        .find(KIND)
        .context("no kernel events in the audit chain")?;
    // One byte changed in place and put back the same way: the daemon keeps appending
    // meanwhile (a grant expiring, a kernel event), and rewriting the whole file would
    // erase what it appended between the read and the write back.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&seg)?;
    let byte = (at + KIND.len() - 2) as u64;
    f.write_at(b"T", byte)?;
    let o = cli(env, &["audit", "verify", &dir_s]);
    f.write_at(b"t", byte)?;
    let o = o?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        !o.status.success() && out.contains("FAIL  seg-000001"),
        "tamper not detected: {out}"
    );
    Ok(())
}

/// The anchor ConfigMap as `kubectl get -o json` prints it.
fn anchor_json(env: &Env) -> Result<String> {
    env.node.kubectl_ok(&[
        "-n",
        ANCHOR_NAMESPACE,
        "get",
        "configmap",
        ANCHOR_NAME,
        "-o",
        "json",
    ])
}

fn anchored_seq(cm: &str) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(cm)?;
    let head: serde_json::Value = serde_json::from_str(
        v["data"]["head"]
            .as_str()
            .context("no head in the anchor")?,
    )?;
    head["last_seq"].as_u64().context("no last_seq")
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// What root on the node can do while the daemon is stopped: cut the last `n` records
/// of the newest segment and, with the node's key, sign a head over what is left.
fn cut_and_resign(state: &Path, n: usize, resign: bool) -> Result<()> {
    let dir = state.join("audit");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    segs.sort();
    let seg = segs.last().context("no segment")?;
    let text = std::fs::read_to_string(seg)?;
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines.len() > n, "too few records to cut");
    let kept = &lines[..lines.len() - n];
    std::fs::write(
        seg,
        kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )?;
    if resign {
        let head_path = seg.with_extension("head.json");
        let h: serde_json::Value = serde_json::from_slice(&std::fs::read(&head_path)?)?;
        let last: serde_json::Value = serde_json::from_str(kept.last().context("empty")?)?;
        let unsigned = format!(
            r#"{{"segment":{},"first_seq":{},"last_seq":{},"chain_in":"{}","last_hash":"{}","sig":""}}"#,
            h["segment"],
            h["first_seq"],
            last["seq"],
            h["chain_in"].as_str().unwrap_or(""),
            sha256_hex(kept.last().context("empty")?.as_bytes())
        );
        let key =
            ring::signature::Ed25519KeyPair::from_pkcs8(&std::fs::read(state.join("audit.key"))?)
                .map_err(|e| anyhow::anyhow!("audit key: {e}"))?;
        let sig: String = key
            .sign(unsigned.as_bytes())
            .as_ref()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        std::fs::write(
            &head_path,
            unsigned.replace(r#""sig":"""#, &format!(r#""sig":"{sig}""#)),
        )?;
    }
    Ok(())
}

/// Records cut from the log while the daemon is stopped: with the head re-signed by
/// the node's key the log verifies on its own, but not against the anchor the daemon
/// published off the node (nor does the restarted daemon sign over it: it records the
/// damage); cut without the key, the restarted daemon records the damage itself.
pub fn tamper_across_stops_is_caught_against_the_anchor(env: &mut Env) -> Result<()> {
    for _ in 0..3 {
        env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    }
    let state = env.state_dir().to_owned();
    let dir = state.join("audit");
    let dir_s = dir.display().to_string();
    env.daemon.stop()?;
    // The anchor after a clean stop vouches for the last records (a record written
    // in the last moments of the stop may follow it).
    let cm = anchor_json(env).context("the daemon published no anchor")?;
    let last_local = chain(env)?
        .last()
        .and_then(|r| r["seq"].as_u64())
        .context("empty log")?;
    let anchored = anchored_seq(&cm)?;
    ensure!(
        anchored <= last_local && anchored + 2 >= last_local,
        "the anchor vouches for seq {anchored} but the log ends at {last_local}"
    );
    let cut = (last_local - anchored) as usize + 3;
    let saved = state.join("audit.saved");
    let _ = std::fs::remove_dir_all(&saved);
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&saved)
        .output()?;
    ensure!(o.status.success(), "saving the log");
    let anchor_file = env.dir.join("anchor.json");
    std::fs::write(&anchor_file, &cm)?;
    let anchor_s = anchor_file.display().to_string();
    let o = cli(env, &["audit", "verify", &dir_s, "--anchor", &anchor_s])?;
    ensure!(
        o.status.success(),
        "intact log against its anchor: {}",
        String::from_utf8_lossy(&o.stdout)
    );

    // Root with the node's key.
    cut_and_resign(&state, cut, true)?;
    let o = cli(env, &["audit", "verify", &dir_s])?;
    ensure!(
        o.status.success(),
        "the re-signed log should verify on its own (which is why anchors exist): {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = cli(env, &["audit", "verify", &dir_s, "--anchor", &anchor_s])?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        !o.status.success() && out.contains("records were cut"),
        "cut records not caught against the anchor: {out}"
    );
    // The restarted daemon checks itself against the anchor and records the damage.
    env.daemon.start()?;
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    std::thread::sleep(Duration::from_millis(500));
    let o = cli(env, &["audit", "verify", &dir_s])?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        !o.status.success()
            && out.contains("the daemon recorded damage")
            && out.contains("records were cut"),
        "the restarted daemon did not record the cut: {out}"
    );
    // Without the key: a plain cut, found by the daemon itself when it reopens.
    env.daemon.stop()?;
    cut_and_resign(&state, 2, false)?;
    env.daemon.start()?;
    env.gate_ok(&["get", "configmaps", "-o", "name"])?;
    std::thread::sleep(Duration::from_millis(500));
    let recs = chain(env)?;
    let damage: Vec<&serde_json::Value> = recs.iter().filter(|r| r["kind"] == "damage").collect();
    ensure!(
        damage
            .iter()
            .any(|d| d["record"]["findings"].to_string().contains("were cut")),
        "no damage record for the plain cut: {damage:?}"
    );
    println!(
        "    cut + re-signed: verifies alone, fails against the anchor (seq {anchored}); both cuts recorded as damage by the restarted daemon ({} damage records)",
        damage.len()
    );
    // Put the evidence back as it was before this case (and forget the anchor of the
    // damaged log), so later cases start from an intact log.
    env.daemon.stop()?;
    std::fs::remove_dir_all(&dir)?;
    std::fs::rename(&saved, &dir)?;
    env.node
        .kubectl_ok(&["-n", ANCHOR_NAMESPACE, "delete", "configmap", ANCHOR_NAME])?;
    env.daemon.start()?;
    let o = cli(env, &["audit", "verify", &dir_s])?;
    ensure!(
        o.status.success(),
        "restored log: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    Ok(())
}
