//! Just-in-time approvals: held within the hold time, granted for a retry until the
//! TTL, denied, expired, no self-approval, remote approvers, surviving a restart.
use std::{
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use portcullis_tests::gate::ADMIN_ADDR;

use crate::{Clients, Env, identity::idp, identity::oidc, policy::gate_as, portcullis_bin, stderr};

pub fn pc(env: &Env, args: &[&str]) -> Result<serde_json::Value> {
    let o = env.portcullis(args)?;
    ensure!(o.status.success(), "portcullis {args:?}: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(&out).with_context(|| format!("portcullis {args:?} printed {out}"))
}

fn pc_err(env: &Env, args: &[&str]) -> Result<String> {
    let o = env.portcullis(args)?;
    ensure!(
        !o.status.success(),
        "portcullis {args:?} should fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    Ok(stderr(&o))
}

/// The pending approval for configmap `name`, waiting up to `secs`.
fn pending_for(env: &Env, name: &str, secs: u64) -> Result<String> {
    let t = Instant::now();
    loop {
        let v = pc(env, &["approvals", "list", "-o", "json"])?;
        if let Some(a) = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["request"]["name"] == name && a["state"] == "pending")
        {
            return Ok(a["id"].as_str().unwrap_or_default().to_owned());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(secs),
            "no pending approval for {name}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cm_exists(env: &Env, name: &str) -> Result<bool> {
    Ok(env.admin(&["get", "configmap", name])?.status.success())
}

fn approval_id_in(msg: &str) -> Option<String> {
    let at = msg.find("approval apr-")? + "approval ".len();
    Some(
        msg[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect(),
    )
}

/// Creates configmap `name` and starts the agent's delete of it in the background.
fn start_held_delete(env: &Env, name: &str) -> Result<std::process::Child> {
    env.admin_ok(&["create", "configmap", name])?;
    Ok(env
        .gate_cmd(&["delete", "configmap", name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

pub fn within_hold(env: &mut Env) -> Result<()> {
    let child = start_held_delete(env, "held-a")?;
    // The exec into the pod takes a moment before kubectl even starts there.
    let id = pending_for(env, "held-a", 8)?;
    ensure!(cm_exists(env, "held-a")?, "deleted before approval");
    let v = pc(
        env,
        &[
            "approvals",
            "approve",
            &id,
            "--as",
            "oncall-human",
            "--justification",
            "e2e",
        ],
    )?;
    ensure!(v["approval"]["state"] == "approved", "{v}");
    let o = child.wait_with_output()?;
    ensure!(
        o.status.success(),
        "held delete after approval: {}",
        stderr(&o)
    );
    ensure!(!cm_exists(env, "held-a")?, "configmap still there");
    let hooks = idp(env).webhook_calls();
    ensure!(
        hooks.iter().any(|h| h["approval"]["id"] == id.as_str()
            && h["approveCommand"]
                .as_str()
                .is_some_and(|c| c.contains(&id))),
        "webhook not called for {id}: {hooks:?}"
    );
    let log = std::fs::read_to_string(env.state_dir().join("approvals.jsonl"))?;
    ensure!(
        log.contains("approval.requested") && log.contains("approval.approved"),
        "approvals audit: {log}"
    );
    Ok(())
}

pub fn after_hold(env: &mut Env) -> Result<()> {
    env.admin_ok(&["create", "configmap", "held-b"])?;
    let t = Instant::now();
    let o = env.gate(&["delete", "configmap", "held-b"])?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("is pending"),
        "expected a pending 403: {e}"
    );
    ensure!(
        t.elapsed() >= Duration::from_secs(3),
        "not held: {:?}",
        t.elapsed()
    );
    let id = approval_id_in(&e).context("no approval id in the message")?;
    ensure!(
        e.contains(&format!("portcullis approvals approve {id}")),
        "no approve command: {e}"
    );
    pc(env, &["approvals", "approve", &id, "--as", "oncall-human"])?;
    let granted = Instant::now();
    env.gate_ok(&["delete", "configmap", "held-b"])?;
    // Within the TTL the same request passes again at once.
    env.admin_ok(&["create", "configmap", "held-b"])?;
    let t = Instant::now();
    env.gate_ok(&["delete", "configmap", "held-b"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "grant did not apply: {:?}",
        t.elapsed()
    );
    let grants = pc(env, &["grants", "list", "-o", "json"])?;
    ensure!(
        grants
            .as_array()
            .into_iter()
            .flatten()
            .any(|g| g["approval_id"] == id.as_str() && g["status"] == "active"),
        "{grants}"
    );
    // After the TTL (8 s) it is held again.
    std::thread::sleep(Duration::from_secs(9).saturating_sub(granted.elapsed()));
    env.admin_ok(&["create", "configmap", "held-b"])?;
    let o = env.gate(&["delete", "configmap", "held-b"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("is pending"),
        "after the TTL: {}",
        stderr(&o)
    );
    Ok(())
}

pub fn denied_and_expired(env: &mut Env) -> Result<()> {
    let child = start_held_delete(env, "held-c")?;
    let id = pending_for(env, "held-c", 8)?;
    let e = pc_err(
        env,
        &[
            "approvals",
            "deny",
            &id,
            "--as",
            "oncall-human",
            "--reason",
            "",
        ],
    )?;
    ensure!(e.contains("needs a reason"), "{e}");
    pc(
        env,
        &[
            "approvals",
            "deny",
            &id,
            "--as",
            "oncall-human",
            "--reason",
            "not today",
        ],
    )?;
    let o = child.wait_with_output()?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("denied by oncall-human: not today"),
        "{e}"
    );
    ensure!(cm_exists(env, "held-c")?, "denied delete happened");
    let e = pc_err(env, &["approvals", "approve", &id, "--as", "oncall-human"])?;
    ensure!(e.contains("already denied"), "{e}");
    // Expiry: nobody decides within pending_ttl (10 s).
    let o = env.gate(&["delete", "configmap", "held-c"])?;
    let id2 = approval_id_in(&stderr(&o)).context("no approval id")?;
    let t = Instant::now();
    loop {
        let a = pc(env, &["approvals", "show", &id2])?;
        if a["state"] == "expired" {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "approval {id2} never expired: {a}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let e = pc_err(env, &["approvals", "approve", &id2, "--as", "oncall-human"])?;
    ensure!(e.contains("already expired"), "{e}");
    ensure!(cm_exists(env, "held-c")?, "expired delete happened");
    Ok(())
}

fn admin_https(env: &Env, token: &str, args: &[&str]) -> Result<Output> {
    let f = env
        .dir
        .join(format!("approver-{}.token", portcullis_tests::idp::now()));
    std::fs::write(&f, token)?;
    let (first, rest) = args.split_first().context("args")?;
    Ok(env
        .node
        .command(&portcullis_bin())
        .arg(first)
        .arg(format!("--server=https://{ADMIN_ADDR}"))
        .arg(format!("--token-file={}", f.display()))
        .arg(format!(
            "--ca-file={}",
            env.state_dir().join("ca/ca.crt").display()
        ))
        .args(rest)
        .stdin(Stdio::null())
        .output()?)
}

pub fn self_approval(env: &mut Env) -> Result<()> {
    let alice = oidc(env, "alice", &["devs", "oncall"])?;
    env.admin_ok(&["create", "configmap", "held-e"])?;
    let o = gate_as(env, &alice, &["delete", "configmap", "held-e"])?;
    let id =
        approval_id_in(&stderr(&o)).with_context(|| format!("no approval id: {}", stderr(&o)))?;
    let o = admin_https(env, &alice, &["approvals", "approve", &id])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("no self-approval"),
        "alice approving herself: {}",
        stderr(&o)
    );
    let e = pc_err(env, &["approvals", "approve", &id, "--as", "oidc:alice"])?;
    ensure!(e.contains("no self-approval"), "root acting as alice: {e}");
    let bob = oidc(env, "bob", &["devs"])?;
    let o = admin_https(env, &bob, &["approvals", "approve", &id])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("not an approver"),
        "bob: {}",
        stderr(&o)
    );
    let o = admin_https(env, "not-a-token", &["approvals", "list"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("401"),
        "bad token: {}",
        stderr(&o)
    );
    let carol = oidc(env, "carol", &["oncall"])?;
    let o = admin_https(
        env,
        &carol,
        &["approvals", "approve", &id, "--justification", "reviewed"],
    )?;
    ensure!(o.status.success(), "carol: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    ensure!(
        v["approval"]["state"] == "approved" && v["approval"]["by"] == "oidc:carol",
        "{v}"
    );
    let o = gate_as(env, &alice, &["delete", "configmap", "held-e"])?;
    ensure!(o.status.success(), "alice's retry: {}", stderr(&o));
    Ok(())
}

pub fn restart(env: &mut Env) -> Result<()> {
    env.admin_ok(&["create", "configmap", "held-f"])?;
    let o = env.gate(&["delete", "configmap", "held-f"])?;
    let id = approval_id_in(&stderr(&o)).context("no approval id")?;
    env.switch(true)?;
    let a = pc(env, &["approvals", "show", &id])?;
    ensure!(a["state"] == "pending", "after restart: {a}");
    let v = pc(env, &["approvals", "approve", &id, "--as", "oncall-human"])?;
    env.gate_ok(&["delete", "configmap", "held-f"])?;
    ensure!(!cm_exists(env, "held-f")?, "still there");
    // A revoked grant stops applying at once.
    let grant = v["grant"]["id"].as_str().context("no grant id")?.to_owned();
    let r = pc(env, &["grants", "revoke", &grant, "--as", "oncall-human"])?;
    ensure!(r["grant"]["revoked"]["by"] == "oncall-human", "{r}");
    env.admin_ok(&["create", "configmap", "held-f"])?;
    let o = env.gate(&["delete", "configmap", "held-f"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("is pending"),
        "after revoking the grant: {}",
        stderr(&o)
    );
    Ok(())
}
