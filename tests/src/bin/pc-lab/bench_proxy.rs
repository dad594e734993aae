//! `cargo xtask bench proxy`: the same load against the real apiserver directly, through
//! Debian's nginx as a plain TLS-terminating reverse proxy, and through Portcullis, in
//! one run, alternating targets each round. Every client runs in a real pod on the real
//! node: direct and nginx from a pod that is not enrolled, Portcullis from the enrolled
//! agent pod (redirected by the kernel), so all three cross the same veth and bridge.
use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use portcullis_tests::gate::{
    AGENT_GROUP, AGENT_USER, BYSTANDER_POD, DAEMON_ADDR, Gate, GateOptions, NAMESPACE, POD_CA,
};
use serde_json::{Value, json};

/// `portcullis`: the daemon in pass-through mode (TLS, attributes, forwarding);
/// `gated`: the same daemon with identity (pod-bound projected token) + the shipped
/// coding-agents policy, restarted between phases.
const TARGETS: [&str; 4] = ["direct", "nginx", "portcullis", "gated"];

const POLICY: &str = include_str!("../../../../deploy/policy/coding-agents.yaml");

struct Workload {
    name: &'static str,
    args: Vec<String>,
}

fn workloads() -> Vec<Workload> {
    let cms = format!("/api/v1/namespaces/{NAMESPACE}/configmaps");
    let w = |name, v: &[&str]| Workload {
        name,
        args: v.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        w(
            "small GET",
            &[
                "--mode",
                "get",
                "--path",
                &format!("{cms}/small"),
                "--count",
                "3000",
                "--concurrency",
                "16",
            ],
        ),
        w(
            "1 MB list",
            &[
                "--mode",
                "get",
                "--path",
                &cms,
                "--count",
                "150",
                "--concurrency",
                "4",
            ],
        ),
        w(
            "watch fan-out (50 watchers)",
            &[
                "--mode",
                "watch",
                "--path",
                &cms,
                "--count",
                "40",
                "--watchers",
                "50",
            ],
        ),
    ]
}

pub fn run(rounds: u32) -> Result<()> {
    let nginx_bin = std::env::var("PORTCULLIS_NGINX")
        .context("PORTCULLIS_NGINX is not set: run through `cargo xtask bench proxy`")?;
    println!("starting the node, the pods and the daemon ...");
    let gate = Gate::start(
        "bench-proxy",
        GateOptions {
            policy: Some(POLICY),
            ..Default::default()
        },
    )?;
    seed(&gate)?;
    let nginx = Nginx::start(&gate, Path::new(&nginx_bin))?;
    let wl = workloads();
    // results[workload][target] = per-round JSON
    let mut results: Vec<Vec<Vec<Value>>> = vec![vec![Vec::new(); TARGETS.len()]; wl.len()];
    for round in 0..rounds {
        for (gated, targets) in [(false, &[0usize, 1, 2][..]), (true, &[3usize][..])] {
            gate.switch(gated)?;
            for (wi, w) in wl.iter().enumerate() {
                for &ti in targets {
                    let target = TARGETS[ti];
                    let tag = format!("{}{round}{wi}", &target[..1]);
                    let v = load(&gate, &nginx, target, &w.args, &tag)?;
                    println!("  round {round} {:<28} {:<10} {v}", w.name, target);
                    results[wi][ti].push(v);
                }
            }
        }
    }
    drop(nginx);
    report(&wl, &results, rounds)
}

fn seed(gate: &Gate) -> Result<()> {
    // ~1 MB of ConfigMaps for the list, and one small object.
    let big = "x".repeat(10 * 1024);
    let mut yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: small, namespace: {NAMESPACE}}}\ndata: {{k: v}}\n"
    );
    for i in 0..100 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big-{i}, namespace: {NAMESPACE}}}\ndata: {{d: {big}}}\n"
        ));
    }
    gate.node.apply(&yaml)
}

struct Nginx {
    child: Child,
    addr: String,
    ca: PathBuf,
}

impl Nginx {
    fn start(gate: &Gate, nginx: &Path) -> Result<Nginx> {
        let dir = gate.dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp"))?;
        let ip = DAEMON_ADDR
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        let addr = format!("{ip}:17443");
        let (cert, key) = gate.node.issue_server_cert("nginx", &[&ip])?;
        let token = std::fs::read_to_string(&gate.node.daemon_token_file)?;
        let api = gate.api_url().trim_start_matches("https://").to_string();
        let conf = format!(
            r#"daemon off;
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  upstream api {{ server {api}; keepalive 64; }}
  server {{
    listen {addr} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    client_max_body_size 10m;
    location / {{
      proxy_pass https://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_set_header Impersonate-User "{AGENT_USER}";
      proxy_set_header Impersonate-Group "{AGENT_GROUP}";
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_name kubernetes;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
      proxy_buffering off;
      proxy_read_timeout 1h;
    }}
  }}
}}
"#,
            d = dir.display(),
            cert = cert.display(),
            key = key.display(),
            token = token.trim(),
            ca = gate.node.ca_pem.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = gate
            .node
            .command(nginx)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx")?;
        std::thread::sleep(Duration::from_millis(500));
        let mut n = Nginx {
            child,
            addr,
            ca: gate.node.ca_pem.clone(),
        };
        if let Some(st) = n.child.try_wait()? {
            bail!(
                "nginx exited ({st}): {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too (SIGKILL would orphan them).
        let _ = portcullis_tests::signal(self.child.id(), libc::SIGTERM);
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(gate: &Gate, nginx: &Nginx, target: &str, args: &[String], tag: &str) -> Result<Value> {
    let _ = &nginx.ca;
    let mut argv: Vec<String> = vec!["pc-load".into(), format!("--ca={POD_CA}")];
    let pod = match target {
        "portcullis" | "gated" => {
            argv.push(format!("--url=https://{}", gate.cluster_ip()));
            argv.push(format!("--token={}", gate.agent_token.trim()));
            portcullis_tests::gate::POD
        }
        "nginx" => {
            argv.push(format!("--url=https://{}", nginx.addr));
            BYSTANDER_POD
        }
        _ => {
            argv.push(format!("--url={}", gate.api_url()));
            argv.push(format!("--token={}", gate.node.admin_token));
            argv.push(format!("--header=Impersonate-User:{AGENT_USER}"));
            argv.push(format!("--header=Impersonate-Group:{AGENT_GROUP}"));
            BYSTANDER_POD
        }
    };
    argv.extend(args.iter().cloned());
    argv.push(format!("--tag={tag}"));
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = gate.in_pod(pod, &refs).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "pc-load against {target} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let errors = v["errors"].as_u64().unwrap_or(0) + v["missing"].as_u64().unwrap_or(0);
    if errors > 0 {
        bail!("{target}: {errors} failed requests or missing events: {v}");
    }
    Ok(v)
}

/// The median over rounds of field `k`.
fn stat(rounds: &[Value], k: &str) -> f64 {
    median(
        rounds
            .iter()
            .map(|v| v[k].as_f64().unwrap_or(0.0))
            .collect(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(wl: &[Workload], results: &[Vec<Vec<Value>>], rounds: u32) -> Result<()> {
    println!(
        "\n{:<28} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} | {:>16} {:>14}",
        "workload (median of rounds)",
        "direct p50",
        "nginx p50",
        "pc p50",
        "direct p99",
        "nginx p99",
        "pc p99",
        "added p50 pc/ngx",
        "rps pc/nginx"
    );
    let mut rows = Vec::new();
    for (wi, w) in wl.iter().enumerate() {
        let m = |ti: usize, k: &str| stat(&results[wi][ti], k);
        let (d50, n50, p50) = (m(0, "p50_us"), m(1, "p50_us"), m(2, "p50_us"));
        let (d99, n99, p99) = (m(0, "p99_us"), m(1, "p99_us"), m(2, "p99_us"));
        let (drps, nrps, prps) = (m(0, "rps"), m(1, "rps"), m(2, "rps"));
        let (g50, g99, grps) = (m(3, "p50_us"), m(3, "p99_us"), m(3, "rps"));
        let added_ratio = (p50 - d50) / (n50 - d50);
        let rps_ratio = prps / nrps;
        println!(
            "{:<28} {:>8.0}µs {:>8.0}µs {:>8.0}µs {:>8.0}µs {:>8.0}µs {:>8.0}µs | {:>16.2} {:>14.2}",
            w.name, d50, n50, p50, d99, n99, p99, added_ratio, rps_ratio
        );
        rows.push(json!({
            "workload": w.name,
            "p50_us": {"direct": d50, "nginx": n50, "portcullis": p50, "portcullis_identity_policy": g50},
            "p99_us": {"direct": d99, "nginx": n99, "portcullis": p99, "portcullis_identity_policy": g99},
            "rps": {"direct": drps, "nginx": nrps, "portcullis": prps, "portcullis_identity_policy": grps},
            "identity_policy_added_p50_us": g50 - p50,
            "identity_policy_rps_ratio": grps / prps,
            "added_p50_ratio_portcullis_over_nginx": added_ratio,
            "rps_ratio_portcullis_over_nginx": rps_ratio,
            "goal_added_p50_ratio_le_1_3": added_ratio <= 1.3,
            "goal_rps_ratio_ge_1": rps_ratio >= 1.0,
        }));
    }
    println!(
        "\nidentity + policy (pod-bound token verified, shipped policy decided), against pass-through:"
    );
    for (wi, w) in wl.iter().enumerate() {
        let m = |ti: usize, k: &str| stat(&results[wi][ti], k);
        println!(
            "{:<28} p50 {:>8.0}µs -> {:>8.0}µs ({:+.0}µs), rps ratio {:.2}",
            w.name,
            m(2, "p50_us"),
            m(3, "p50_us"),
            m(3, "p50_us") - m(2, "p50_us"),
            m(3, "rps") / m(2, "rps")
        );
    }
    println!(
        "\ngoals: added p50 (Portcullis - direct) <= 1.3 x (nginx - direct); Portcullis rps >= nginx rps"
    );
    let out = PathBuf::from(
        std::env::var("PORTCULLIS_BIN_DIR").unwrap_or_else(|_| "target/release".into()),
    )
    .join("../bench/proxy.json");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&json!({"rounds": rounds, "results": rows}))?,
    )?;
    println!("written to {}", out.display());
    Ok(())
}
