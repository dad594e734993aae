//! The README's install section, run as written on the test node: install, label a
//! namespace, an agent pod gated, verify, upgrade, uninstall. The blocks are taken from
//! README.md (the ```sh block after each `<!-- install-test:NAME -->` marker) and run
//! with `sh -e` from the repository root, `kubectl` being the node's, as the admin.
use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use portcullis_tests::{install, node};

use crate::Env;

/// The ```sh block after `<!-- install-test:NAME -->` in README.md.
pub fn block(readme: &str, name: &str) -> Result<String> {
    let marker = format!("<!-- install-test:{name} -->");
    let after = readme
        .split_once(&marker)
        .with_context(|| format!("README.md has no {marker}"))?
        .1;
    let body = after
        .split_once("```sh\n")
        .and_then(|(_, b)| b.split_once("\n```"))
        .with_context(|| format!("no ```sh block after {marker}"))?
        .0;
    Ok(body.to_string())
}

/// Runs a README block in the node's network namespace; fails with its output.
pub fn run_block(env: &Env, name: &str) -> Result<String> {
    let repo = install::repo();
    let readme = std::fs::read_to_string(repo.join("README.md"))?;
    let script = block(&readme, name)?;
    let path = format!(
        "{}:{}",
        env.node.parts.bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", node::NETNS))
        .args(["sh", "-e", "-c", &script])
        .current_dir(&repo)
        .env("PATH", path)
        .env("KUBECONFIG", &env.node.admin_kubeconfig)
        .env("HOME", env.dir.join("home-readme"));
    let o = crate::run(c)?;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        o.status.success(),
        "README block `{name}` failed:\n{script}\n---\n{out}"
    );
    Ok(out)
}

/// openssl on the node (its network), `input` on stdin.
fn openssl(env: &Env, args: &[&str], input: &str) -> Result<String> {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", node::NETNS))
        .arg("openssl")
        .args(args);
    let o = node::run_with_stdin(&mut c, input)?;
    let _ = &env.dir;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    ))
}

fn wait_gone(what: &str, secs: u64, mut gone: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !gone() {
        if Instant::now() > deadline {
            bail!("{what} still there after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

pub fn readme_install_block(env: &mut Env) -> Result<()> {
    // The harness's own install goes first (its pins with it), as an operator would
    // start from a cluster without Portcullis.
    let o = env.portcullis(&["unload"])?;
    ensure!(o.status.success(), "unloading the harness's pins");
    run_block(env, "uninstall")?;
    wait_gone("namespace portcullis-system", 120, || {
        env.node
            .kubectl(&["get", "namespace", install::NAMESPACE])
            .map(|o| !o.status.success())
            .unwrap_or(false)
    })?;
    // The base's state directory on the host: marked so cleanup may remove it.
    let state = Path::new(node::host::INSTALLED_STATE);
    if !state.exists() {
        std::fs::create_dir_all(state)?;
        std::fs::write(state.join(node::host::STATE_MARKER), "")?;
    }

    let t = Instant::now();
    run_block(env, "install")?;
    println!(
        "  README install: ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    run_block(env, "label")?;
    env.node.wait_service_account("agents", "default")?;
    env.node.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: agent, namespace: agents}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {}\n    imagePullPolicy: Never\n    command: [sleep, '86400']\n",
        node::AGENT_IMAGE
    ))?;
    let uid = env.node.wait_pod_ready("agents", "agent")?;
    let verify = run_block(env, "verify")?;
    ensure!(
        verify.contains("portcullis-barrier") && verify.contains("enforced:"),
        "{verify}"
    );
    // The agent's unmodified kubectl goes through the gate.
    let o = crate::run(env.node.exec_cmd(
        "agents",
        "agent",
        "main",
        &["kubectl", "get", "--raw", "/api"],
    ))?;
    ensure!(
        o.status.success(),
        "agent kubectl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let id = std::fs::metadata(env.node.pod_cgroup(&uid)?)?.ino();
    let conns = std::fs::read_to_string(state.join("connections.jsonl")).unwrap_or_default();
    ensure!(
        conns
            .lines()
            .any(|l| l.contains(&format!("\"agent_cgroup_id\":{id}"))),
        "the installed daemon saw no connection from the agent pod (cgroup {id})"
    );
    let ip = env.node.kubectl_ok(&[
        "-n",
        "agents",
        "get",
        "pod",
        "agent",
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    let direct = env.apiserver_audit().iter().any(|e| {
        e["user"]["username"] == "system:serviceaccount:agents:default"
            && e["sourceIPs"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i == ip.as_str()))
    });
    ensure!(!direct, "the agent pod reached the API server directly");

    // The gate serves from this node's own short-lived intermediate, under an
    // interception CA constrained to the API server's names and addresses.
    let chain = openssl(
        env,
        &[
            "s_client",
            "-connect",
            &format!("{}:15443", node::NODE_IP),
            "-servername",
            "kubernetes.default.svc",
            "-showcerts",
        ],
        "",
    )?;
    ensure!(
        chain.contains(&format!("Portcullis node {}", node::NODE_NAME)),
        "the gate's chain has no intermediate of this node:\n{chain}"
    );
    let root = env.node.kubectl_ok(&[
        "-n",
        install::NAMESPACE,
        "get",
        "secret",
        "portcullis-ca",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ])?;
    use base64::Engine;
    let root = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(root.trim())?)?;
    let text = openssl(env, &["x509", "-noout", "-text"], &root)?;
    ensure!(
        text.contains("Name Constraints")
            && text.contains("IP:10.96.0.1")
            && text.contains("DNS:kubernetes.default.svc"),
        "the interception CA is not name-constrained to the API server:\n{text}"
    );

    run_block(env, "upgrade")?;
    let o = crate::run(env.node.exec_cmd(
        "agents",
        "agent",
        "main",
        &["kubectl", "get", "--raw", "/api"],
    ))?;
    ensure!(o.status.success(), "agent kubectl after the upgrade");

    run_block(env, "uninstall")?;
    wait_gone("namespace portcullis-system", 120, || {
        env.node
            .kubectl(&["get", "namespace", install::NAMESPACE])
            .map(|o| !o.status.success())
            .unwrap_or(false)
    })?;
    ensure!(
        !Path::new(node::host::INSTALLED_PINS).exists(),
        "pins left in {}",
        node::host::INSTALLED_PINS
    );
    for kind in [
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        let o = env.node.kubectl(&["get", kind, "portcullis"])?;
        ensure!(!o.status.success(), "{kind} portcullis left");
    }
    // Enforcement ended cleanly: the agent now reaches the API server directly.
    let o = crate::run(env.node.exec_cmd(
        "agents",
        "agent",
        "main",
        &["kubectl", "get", "--raw", "/api"],
    ))?;
    ensure!(
        o.status.success(),
        "agent kubectl after uninstall: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let direct = env.apiserver_audit().iter().any(|e| {
        e["user"]["username"] == "system:serviceaccount:agents:default"
            && e["sourceIPs"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i == ip.as_str()))
    });
    ensure!(
        direct,
        "after uninstall the agent's request did not reach the API server directly"
    );
    Ok(())
}
