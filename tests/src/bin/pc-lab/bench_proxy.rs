//! `cargo xtask bench proxy`: what the gate costs, against a plain reverse proxy, in
//! one run on the real node.
//!
//! Targets: `direct` (the upstream itself), `nginx` (Debian's nginx as a plain
//! TLS-terminating reverse proxy adding the same credential and impersonation
//! headers), `portcullis` (pass-through: TLS, attributes, impersonation, masking, audit
//! at Metadata level) and `gated` (that + the pod-bound projected token verified, the
//! shipped coding-agents policy decided, audit at Request level). Upstreams: the real
//! kube-apiserver, and `pc-standin`, a test-only stand-in serving canned copies of the
//! same responses fast, which isolates the proxy. Workloads: a small GET, a ~1 MB
//! ConfigMap list, watch events (50 watches, ConfigMaps created at a fixed rate; and
//! one watch, for the latency of an event with no fan-out queue in front of it), a
//! ~1 MB Secret list (masked by the gate).
//!
//! For each: the proxy's CPU time per request (from /proc: user + system of the daemon,
//! or of nginx's master and workers) and the upstream's (kube-apiserver + etcd, or the
//! stand-in), at a fixed request count in a closed loop; then open-loop latency at a
//! fixed rate (half of what direct managed in the closed loop, at most `--rate-cap`),
//! counted from each request's intended send time; for watches, each event's latency
//! from its creation. And the cost of one kubectl invocation as an agent makes it (new
//! process, TLS connection, discovery with an empty cache, the request). Every client
//! runs in a pod (direct and nginx from the non-enrolled `bystander`, Portcullis from
//! the enrolled `work`, redirected by the kernel), so all cross the same veth and bridge.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use portcullis_tests::{
    bin,
    gate::{
        AGENT_GROUP, AGENT_USER, BYSTANDER_POD, DAEMON_ADDR, Gate, GateOptions, NAMESPACE, POD,
        POD_CA,
    },
    node,
};
use serde_json::{Value, json};

use crate::{nginx, procs};

const POLICY: &str = include_str!("../../../../deploy/policy/coding-agents.yaml");

const TARGETS: [&str; 4] = ["direct", "nginx", "portcullis", "gated"];
const PROXIES: [&str; 3] = ["nginx", "portcullis", "gated"];
const WORKLOADS: [&str; 4] = ["small_get", "list_1mb", "watch_event", "secret_list"];
const UPSTREAMS: [&str; 2] = ["apiserver", "standin"];

const STANDIN_ADDR: &str = "172.31.0.1:16443";
const NGINX_API_PORT: u16 = 17443;
const NGINX_STANDIN_PORT: u16 = 17444;
const WATCH_NS: &str = "bench-watch";

/// Bounds of one run (`pc-lab bench-proxy --help`).
#[derive(clap::Args, Clone)]
pub struct Opts {
    /// Rounds; each measures every target on both upstreams. Medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Small GETs per closed-loop measurement.
    #[arg(long, default_value_t = 3000)]
    pub small_count: u32,
    /// 1 MB lists (ConfigMaps, Secrets) per closed-loop measurement.
    #[arg(long, default_value_t = 100)]
    pub list_count: u32,
    /// Watches of the watch workload.
    #[arg(long, default_value_t = 50)]
    pub watchers: usize,
    /// Objects created (events per watch), at `--create-rate` per second.
    #[arg(long, default_value_t = 40)]
    pub events: usize,
    #[arg(long, default_value_t = 20.0)]
    pub create_rate: f64,
    /// Length of each fixed-rate measurement.
    #[arg(long, default_value_t = 5.0)]
    pub rate_secs: f64,
    /// Highest fixed rate (requests/s), so the stand-in's high capacity does not push
    /// the proxies near saturation on this machine.
    #[arg(long, default_value_t = 1000.0)]
    pub rate_cap: f64,
    /// kubectl invocations per target and round (real API server only).
    #[arg(long, default_value_t = 8)]
    pub kubectl_runs: u32,
    /// Only these workloads (and `kubectl`), comma-separated: for a profile or a quick
    /// before/after of one figure. The report's goals need them all.
    #[arg(long, value_delimiter = ',', default_values_t = WORKLOADS.iter().map(|w| w.to_string()).chain(["kubectl".to_string()]))]
    pub workloads: Vec<String>,
    /// Only these upstreams (`apiserver`, `standin`), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = UPSTREAMS.map(String::from))]
    pub upstreams: Vec<String>,
    /// A command attached to the proxy over the closed-loop measurements of the first
    /// round for `--attach-target` (`{pid}` becomes the daemon's or nginx master's pid,
    /// `{tag}` the measurement's name), stopped with SIGINT; e.g. `perf stat -e
    /// probe_libc:malloc -o /tmp/{tag}.txt -p {pid}`. Its CPU is not the proxy's.
    #[arg(long)]
    pub attach: Option<String>,
    /// Of `portcullis`, `gated` and `nginx`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "gated")]
    pub attach_target: Vec<String>,
}

impl Opts {
    fn wants(&self, part: &str) -> bool {
        self.workloads.iter().any(|w| w == part)
    }
}

fn path_of(wl: &str) -> String {
    match wl {
        "small_get" => format!("/api/v1/namespaces/{NAMESPACE}/configmaps/small"),
        "list_1mb" => format!("/api/v1/namespaces/{NAMESPACE}/configmaps"),
        "secret_list" => format!("/api/v1/namespaces/{NAMESPACE}/secrets"),
        _ => format!("/api/v1/namespaces/{WATCH_NS}/configmaps"),
    }
}

/// One measurement's result (pc-load's JSON plus CPU time), by key.
#[derive(Default)]
struct Results(BTreeMap<(String, String, String, String), Vec<Value>>);

impl Results {
    fn push(&mut self, up: &str, wl: &str, target: &str, phase: &str, v: Value) {
        self.0
            .entry((up.into(), wl.into(), target.into(), phase.into()))
            .or_default()
            .push(v);
    }
    fn values(&self, up: &str, wl: &str, target: &str, phase: &str, k: &str) -> Vec<f64> {
        self.0
            .get(&(up.into(), wl.into(), target.into(), phase.into()))
            .map(|v| v.iter().filter_map(|x| x[k].as_f64()).collect())
            .unwrap_or_default()
    }
    /// Median over rounds.
    fn med(&self, up: &str, wl: &str, target: &str, phase: &str, k: &str) -> f64 {
        median(self.values(up, wl, target, phase, k))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

struct Bench<'a> {
    gate: &'a Gate,
    nginx: Nginx,
    standin: Standin,
    opts: Opts,
    logs: PathBuf,
}

pub fn run(opts: Opts) -> Result<()> {
    let nginx_bin = std::env::var("PORTCULLIS_NGINX")
        .context("PORTCULLIS_NGINX is not set: run through `cargo xtask bench proxy`")?;
    for w in &opts.workloads {
        ensure!(
            WORKLOADS.contains(&w.as_str()) || w == "kubectl",
            "unknown workload {w:?} (known: {WORKLOADS:?}, kubectl)"
        );
    }
    for u in &opts.upstreams {
        ensure!(
            UPSTREAMS.contains(&u.as_str()),
            "unknown upstream {u:?} (known: {UPSTREAMS:?})"
        );
    }
    let load_before = loadavg();
    println!("starting the node, the pods and the daemon ...");
    let gate = Gate::start(
        "bench-proxy",
        GateOptions {
            policy: Some(POLICY),
            // The shipped level: no line per request.
            log_level: Some("info"),
            ..Default::default()
        },
    )?;
    seed(&gate)?;
    let standin = Standin::start(&gate)?;
    let nginx = Nginx::start(&gate, Path::new(&nginx_bin))?;
    let logs = gate.dir.join("bench-logs");
    std::fs::create_dir_all(&logs)?;
    let b = Bench {
        gate: &gate,
        nginx,
        standin,
        opts,
        logs,
    };
    b.kubeconfigs()?;
    let mut res = Results::default();
    // A failed part is reported and the rest still measured and written; the command
    // fails at the end.
    let mut failures = Vec::new();
    for round in 0..b.opts.rounds {
        for up in UPSTREAMS {
            if !b.opts.upstreams.iter().any(|u| u == up) {
                continue;
            }
            if let Err(e) = b.round(round, up, &mut res) {
                eprintln!("round {round} on {up} failed: {e:#}");
                failures.push(format!("round {round} on {up}: {e:#}"));
            }
        }
        // Keep etcd small: the watch workload's objects go.
        let _ = gate
            .node
            .kubectl(&["delete", "configmaps", "--all", "-n", WATCH_NS]);
    }
    let mut report = b.report(&res, load_before)?;
    report["failures"] = json!(failures);
    let out = PathBuf::from(
        std::env::var("PORTCULLIS_BIN_DIR").unwrap_or_else(|_| "target/release".into()),
    )
    .join("../bench/proxy.json");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
    println!("written to {}", out.display());
    if !failures.is_empty() {
        bail!(
            "{} part(s) of the run failed (their figures are null in the report):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Deterministic filler (the content does not matter, only that it is not trivially
/// compressible or a pattern the detectors look for).
pub(crate) fn filler(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn seed(gate: &Gate) -> Result<()> {
    // ~1 MB of ConfigMaps (100 x 10 KB) for the list, one small object, ~1 MB of
    // Secrets (100 x 3 keys x 2.5 KB); created, not applied, so no last-applied
    // annotation doubles them.
    let big = "x".repeat(10 * 1024);
    let mut yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: small, namespace: {NAMESPACE}}}\ndata: {{k: v}}\n"
    );
    for i in 0..100 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big-{i}, namespace: {NAMESPACE}}}\ndata: {{d: {big}}}\n"
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for i in 0..100u64 {
        let k = |j: u64| b64.encode(filler(i * 3 + j, 2560));
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: bench-{i}, namespace: {NAMESPACE}}}\ntype: Opaque\ndata: {{username: {}, password: {}, tls.key: {}}}\n",
            k(0),
            k(1),
            k(2)
        ));
    }
    yaml.push_str(&format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {WATCH_NS}}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: agents-view, namespace: {WATCH_NS}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}\nsubjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: \"{AGENT_GROUP}\"}}\n"
    ));
    let mut c = gate.node.kubectl_cmd(&["create", "-f", "-"]);
    let o = node::run_with_stdin(&mut c, &yaml)?;
    ensure!(
        o.status.success(),
        "seeding: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// The stand-in API server on the node, serving copies of the real responses.
struct Standin {
    child: Child,
}

impl Standin {
    fn start(gate: &Gate) -> Result<Standin> {
        let dir = gate.dir.join("standin");
        std::fs::create_dir_all(&dir)?;
        let mut index = serde_json::Map::new();
        let mut capture = |path: &str, ct: &str| -> Result<()> {
            let body = gate.node.kubectl_ok(&["get", "--raw", path])?;
            let file = format!("{}.json", index.len());
            std::fs::write(dir.join(&file), body.trim_end())?;
            index.insert(path.into(), json!({"file": file, "content_type": ct}));
            Ok(())
        };
        for wl in ["small_get", "list_1mb", "secret_list"] {
            capture(&path_of(wl), "application/json")?;
        }
        // The service-account issuer's keys, for the gated daemon's token checks.
        capture("/openid/v1/jwks", "application/jwk-set+json")?;
        // The API server's TokenReview of the agent's token (the gated daemon reviews
        // each token once, then caches the answer): the real answer, served canned.
        let review_path = "/apis/authentication.k8s.io/v1/tokenreviews";
        let review = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": gate.agent_token.trim()}});
        let mut c = gate
            .node
            .kubectl_cmd(&["create", "--raw", review_path, "-f", "-"]);
        let o = node::run_with_stdin(&mut c, &review.to_string())?;
        ensure!(
            o.status.success(),
            "TokenReview of the agent's token: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let answer: Value = serde_json::from_slice(&o.stdout)?;
        ensure!(
            answer["status"]["authenticated"] == true,
            "the API server does not authenticate the agent's token: {answer}"
        );
        let file = format!("{}.json", index.len());
        std::fs::write(dir.join(&file), answer.to_string())?;
        index.insert(
            review_path.into(),
            json!({"file": file, "content_type": "application/json"}),
        );
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&Value::Object(index))?,
        )?;
        let ip = STANDIN_ADDR.split(':').next().unwrap_or_default();
        let (cert, key) = gate
            .node
            .issue_server_cert("standin", &[ip, "kubernetes"])?;
        let mut child = gate
            .node
            .command(&bin("pc-standin"))
            .arg(format!("--listen={STANDIN_ADDR}"))
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--key={}", key.display()))
            .arg(format!("--canned={}", dir.join("index.json").display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting pc-standin")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("pc-standin did not start");
        }
        Ok(Standin { child })
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx on the node in front of both upstreams (one port each).
struct Nginx {
    nginx: nginx::Nginx,
    ip: String,
}

impl Nginx {
    fn start(gate: &Gate, nginx: &Path) -> Result<Nginx> {
        let ip = DAEMON_ADDR
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        let (cert, key) = gate.node.issue_server_cert("nginx", &[&ip])?;
        let token = std::fs::read_to_string(&gate.node.daemon_token_file)?;
        let api = gate.api_url().trim_start_matches("https://").to_string();
        let server = |port: u16, upstream: &str| nginx::Server {
            listen: format!("{ip}:{port}"),
            upstream: upstream.to_string(),
            cert: cert.clone(),
            key: key.clone(),
        };
        let nginx = nginx::Nginx::start(
            gate.node.command(nginx),
            &gate.dir.join("nginx"),
            &[
                server(NGINX_API_PORT, &api),
                server(NGINX_STANDIN_PORT, STANDIN_ADDR),
            ],
            &nginx::Upstream {
                token: &token,
                user: AGENT_USER,
                group: AGENT_GROUP,
                ca: &gate.node.ca_pem,
            },
        )?;
        Ok(Nginx { nginx, ip })
    }

    fn url(&self, up: &str) -> String {
        let port = if up == "standin" {
            NGINX_STANDIN_PORT
        } else {
            NGINX_API_PORT
        };
        format!("https://{}:{port}", self.ip)
    }
}

/// A pc-load run driven through `--go`: CPU read around exactly the measured part.
pub(crate) struct Driven {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    what: String,
    stderr: PathBuf,
}

impl Driven {
    pub(crate) fn spawn(
        mut cmd: std::process::Command,
        what: String,
        stderr: PathBuf,
    ) -> Result<Driven> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Driven {
            child,
            stdin,
            stdout,
            what,
            stderr,
        })
    }

    pub(crate) fn line(&mut self) -> Result<Value> {
        let mut l = String::new();
        self.stdout.read_line(&mut l)?;
        serde_json::from_str(l.trim()).with_context(|| {
            format!(
                "{}: no result (`{}`); stderr: {}",
                self.what,
                l.trim(),
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            )
        })
    }

    pub(crate) fn go(&mut self) -> Result<()> {
        let s = self.stdin.as_mut().context("stdin")?;
        s.write_all(b"go\n")?;
        s.flush()?;
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let st = self.child.wait()?;
        ensure!(
            st.success(),
            "{} exited with {st}: {}",
            self.what,
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
        Ok(())
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Bench<'_> {
    /// The kubeconfigs the bystander pod's kubectl uses (the agent's is in-cluster).
    fn kubeconfigs(&self) -> Result<()> {
        let g = self.gate;
        let ca = Path::new(POD_CA);
        let direct = portcullis_tests::gate::kubeconfig(
            &g.api_url(),
            ca,
            &g.node.admin_token,
            Some((AGENT_USER, AGENT_GROUP)),
        );
        // nginx adds the credential and impersonation itself.
        let nginx =
            portcullis_tests::gate::kubeconfig(&self.nginx.url("apiserver"), ca, "unused", None);
        for (name, text) in [("direct", direct), ("nginx", nginx)] {
            g.node.copy_into(
                NAMESPACE,
                BYSTANDER_POD,
                "main",
                &format!("/work/{name}.kubeconfig"),
                &text,
            )?;
        }
        Ok(())
    }

    fn upstream_url(&self, up: &str) -> String {
        if up == "standin" {
            format!("https://{STANDIN_ADDR}")
        } else {
            self.gate.api_url()
        }
    }

    /// pc-load's connection arguments and pod for `target`.
    fn client(&self, target: &str, up: &str) -> (&'static str, Vec<String>) {
        let g = self.gate;
        let mut a = vec![format!("--ca={POD_CA}")];
        let pod = match target {
            "portcullis" | "gated" => {
                a.push(format!("--url=https://{}", g.cluster_ip()));
                a.push(format!("--token={}", g.agent_token.trim()));
                POD
            }
            "nginx" => {
                a.push(format!("--url={}", self.nginx.url(up)));
                BYSTANDER_POD
            }
            _ => {
                a.push(format!("--url={}", self.upstream_url(up)));
                a.push(format!("--token={}", g.node.admin_token));
                a.push(format!("--header=Impersonate-User:{AGENT_USER}"));
                a.push(format!("--header=Impersonate-Group:{AGENT_GROUP}"));
                BYSTANDER_POD
            }
        };
        (pod, a)
    }

    fn proxy_pids(&self, target: &str) -> Vec<u32> {
        match target {
            "nginx" => procs::tree(self.nginx.nginx.child.id()),
            "portcullis" | "gated" => self.gate.daemon.pid().into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn upstream_pids(&self, up: &str) -> Vec<u32> {
        if up == "standin" {
            return vec![self.standin.child.id()];
        }
        let ns = Path::new("/run/netns").join(node::NETNS);
        let mut p = procs::find_in_netns("kube-apiserver", &ns);
        p.extend(procs::find_in_netns("etcd", &ns));
        p
    }

    /// Runs pc-load (`mode_args`) for `target` with `--go`; `during` runs between go
    /// and the result (the watch workload's creator). Returns pc-load's result with
    /// the proxy's and the upstream's CPU time over the measured part.
    fn measure(
        &self,
        target: &str,
        up: &str,
        tag: &str,
        mode_args: &[String],
        during: Option<&dyn Fn() -> Result<Value>>,
    ) -> Result<Value> {
        let (pod, mut argv) = self.client(target, up);
        argv.insert(0, "pc-load".into());
        argv.push("--go".into());
        argv.push("--max-secs=80".into());
        argv.extend(mode_args.iter().cloned());
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let what = format!("pc-load {tag} ({target} on {up})");
        let mut d = Driven::spawn(
            self.gate.in_pod(pod, &refs),
            what.clone(),
            self.logs.join(format!("{tag}.stderr")),
        )?;
        let ready = d.line()?;
        ensure!(ready["ready"] == true, "{what}: not ready: {ready}");
        let (pp, up_p) = (self.proxy_pids(target), self.upstream_pids(up));
        let attached = match &self.opts.attach {
            Some(cmd)
                if self.opts.attach_target.iter().any(|t| t == target)
                    && tag.starts_with("r0-")
                    && tag.ends_with("-cpu")
                    && !pp.is_empty() =>
            {
                Some(procs::attach(cmd, pp[0], tag)?)
            }
            _ => None,
        };
        let (p0, u0) = (procs::sample(&pp), procs::sample(&up_p));
        d.go()?;
        let side = during.map(|f| f()).transpose()?;
        let mut v = d.line()?;
        let (p1, u1) = (procs::sample(&pp), procs::sample(&up_p));
        if let Some(c) = attached {
            procs::detach(c);
        }
        d.finish()?;
        v["proxy_cpu_ns"] = json!(procs::cpu_ns(&p0, &p1));
        v["upstream_cpu_ns"] = json!(procs::cpu_ns(&u0, &u1));
        v["ready"] = ready;
        if let Some(s) = side {
            v["creator"] = s;
        }
        let errors = v["errors"].as_u64().unwrap_or(0) + v["missing"].as_u64().unwrap_or(0);
        if errors > 0 {
            bail!("{what}: {errors} failed requests or missing events: {v}");
        }
        // Per request (or event): the unit every figure below is in.
        let n = v["requests"]
            .as_f64()
            .or(v["events"].as_f64())
            .or(v["runs"].as_f64())
            .unwrap_or(0.0);
        if n > 0.0 {
            v["proxy_cpu_us"] = json!(v["proxy_cpu_ns"].as_f64().unwrap_or(0.0) / n / 1e3);
            v["upstream_cpu_us"] = json!(v["upstream_cpu_ns"].as_f64().unwrap_or(0.0) / n / 1e3);
        }
        Ok(v)
    }

    /// The creator of the watch workload's events: on the node (not through any proxy,
    /// not through `kubectl exec`), straight at the upstream.
    fn create(&self, up: &str, tag: &str) -> Result<Value> {
        let g = self.gate;
        let mut c = g.node.command(&bin("pc-load"));
        c.arg(format!("--url={}", self.upstream_url(up)))
            .arg(format!("--ca={}", g.node.ca_pem.display()))
            .arg(format!("--token={}", g.node.admin_token))
            .arg("--max-secs=60")
            .args(["create", "--path", &path_of("watch_event")])
            .arg(format!("--count={}", self.opts.events))
            .arg(format!("--rate={}", self.opts.create_rate))
            .arg(format!("--tag={tag}"))
            .stdin(Stdio::null());
        let o = c.output()?;
        ensure!(
            o.status.success(),
            "creator: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout)?;
        ensure!(v["errors"] == 0, "creator: {v}");
        Ok(v)
    }

    fn round(&self, round: u32, up: &str, res: &mut Results) -> Result<()> {
        // direct first (its capacity sets the fixed rate); nginx and pass-through in
        // alternating order so drift does not favour one; gated needs a restart.
        let mut pass = vec!["direct", "nginx", "portcullis"];
        if round % 2 == 1 {
            pass.swap(1, 2);
        }
        for (gated, targets) in [(false, pass), (true, vec!["gated"])] {
            if up == "standin" {
                self.gate
                    .switch_upstream(gated, &self.upstream_url("standin"))?;
            } else {
                self.gate.switch(gated)?;
            }
            for target in targets {
                for wl in WORKLOADS {
                    if self.opts.wants(wl) {
                        self.workload(round, up, wl, target, res)?;
                    }
                }
                if up == "apiserver" && self.opts.wants("kubectl") {
                    let tag = format!("r{round}-{up}-kubectl-{target}");
                    let v = self.kubectl(target, &tag)?;
                    println!(
                        "  round {round} {up:<9} {:<12} {target:<10} wall p50 {:>6.0} ms, proxy CPU {:>6.2} ms, upstream CPU {:>6.1} ms per invocation",
                        "kubectl",
                        v["p50_us"].as_f64().unwrap_or(0.0) / 1e3,
                        v["proxy_cpu_us"].as_f64().unwrap_or(0.0) / 1e3,
                        v["upstream_cpu_us"].as_f64().unwrap_or(0.0) / 1e3,
                    );
                    res.push(up, "kubectl", target, "invoke", v);
                }
            }
        }
        Ok(())
    }

    fn workload(
        &self,
        round: u32,
        up: &str,
        wl: &str,
        target: &str,
        res: &mut Results,
    ) -> Result<()> {
        let path = path_of(wl);
        let tag = format!("r{round}-{up}-{wl}-{target}");
        if wl == "watch_event" {
            let wtag = format!("r{round}{}{}", &up[..1], &target[..2]);
            let args: Vec<String> = vec![
                "watch".into(),
                format!("--path={path}"),
                format!("--watchers={}", self.opts.watchers),
                format!("--events={}", self.opts.events),
                format!("--tag={wtag}"),
            ];
            let creator = || self.create(up, &wtag);
            let v = self.measure(target, up, &tag, &args, Some(&creator))?;
            println!(
                "  round {round} {up:<9} {wl:<12} {target:<10} proxy CPU {:>7.1} µs/event, upstream {:>7.1} µs/event, latency p50 {:>6} µs p99 {:>6} µs ({} events)",
                v["proxy_cpu_us"].as_f64().unwrap_or(0.0),
                v["upstream_cpu_us"].as_f64().unwrap_or(0.0),
                v["p50_us"],
                v["p99_us"],
                v["events"]
            );
            res.push(up, wl, target, "watch", v);
            // One watch: the latency of an event with no fan-out in front of it.
            let args: Vec<String> = vec![
                "watch".into(),
                format!("--path={path}"),
                "--watchers=1".into(),
                format!("--events={}", self.opts.events),
                format!("--tag={wtag}s"),
            ];
            let tag1 = format!("{wtag}s");
            let creator = || self.create(up, &tag1);
            let v = self.measure(target, up, &format!("{tag}-single"), &args, Some(&creator))?;
            println!(
                "  round {round} {up:<9} {:<12} {target:<10} latency p50 {:>6} µs p99 {:>6} µs ({} events)",
                "watch_single", v["p50_us"], v["p99_us"], v["events"]
            );
            res.push(up, wl, target, "watch1", v);
            return Ok(());
        }
        let (count, conc) = if wl == "small_get" {
            (self.opts.small_count, 4)
        } else {
            (self.opts.list_count, 2)
        };
        let args: Vec<String> = vec![
            "get".into(),
            format!("--path={path}"),
            format!("--count={count}"),
            format!("--concurrency={conc}"),
        ];
        let v = self.measure(target, up, &format!("{tag}-cpu"), &args, None)?;
        println!(
            "  round {round} {up:<9} {wl:<12} {target:<10} closed loop: proxy CPU {:>7.1} µs/req, upstream {:>7.1} µs/req, {:>6.0} req/s, {} B",
            v["proxy_cpu_us"].as_f64().unwrap_or(0.0),
            v["upstream_cpu_us"].as_f64().unwrap_or(0.0),
            v["rps"].as_f64().unwrap_or(0.0),
            v["bytes_per_response"]
        );
        res.push(up, wl, target, "cpu", v);
        // The fixed rate: half of direct's closed-loop rate in this round.
        let capacity = res
            .values(up, wl, "direct", "cpu", "rps")
            .get(round as usize)
            .copied()
            .context("direct runs first")?;
        let rate = (capacity * 0.5).min(self.opts.rate_cap).max(1.0);
        let n = ((rate * self.opts.rate_secs) as u32).clamp(50, 5000);
        let args: Vec<String> = vec![
            "rate".into(),
            format!("--path={path}"),
            format!("--count={n}"),
            format!("--rate={rate:.1}"),
        ];
        let v = self.measure(target, up, &format!("{tag}-rate"), &args, None)?;
        println!(
            "  round {round} {up:<9} {wl:<12} {target:<10} at {rate:>6.0}/s: p50 {:>6} µs p99 {:>6} µs, proxy CPU {:>7.1} µs/req",
            v["p50_us"],
            v["p99_us"],
            v["proxy_cpu_us"].as_f64().unwrap_or(0.0)
        );
        res.push(up, wl, target, "rate", v);
        Ok(())
    }

    /// kubectl as an agent runs it: a new process, TLS connection, discovery (an empty
    /// cache each time), the request.
    fn kubectl(&self, target: &str, tag: &str) -> Result<Value> {
        let mut argv: Vec<String> = vec![
            "invoke".into(),
            format!("--count={}", self.opts.kubectl_runs),
            "--".into(),
            "kubectl".into(),
        ];
        match target {
            "direct" => argv.push("--kubeconfig=/work/direct.kubeconfig".into()),
            "nginx" => argv.push("--kubeconfig=/work/nginx.kubeconfig".into()),
            _ => {}
        }
        argv.extend(
            [
                "get",
                "configmap",
                "small",
                "-n",
                NAMESPACE,
                "-o",
                "name",
                &format!("--cache-dir=/tmp/kc-{tag}-{{i}}"),
            ]
            .map(String::from),
        );
        // The agent pod runs kubectl as agents do; the bystander holds the kubeconfigs.
        self.measure(target, "apiserver", tag, &argv, None)
    }

    fn report(&self, res: &Results, load_before: String) -> Result<Value> {
        let o = &self.opts;
        let mut out = serde_json::Map::new();
        out.insert("rounds".into(), json!(o.rounds));
        out.insert(
            "loadavg".into(),
            json!({"start": load_before, "end": loadavg()}),
        );
        out.insert(
            "settings".into(),
            json!({"small_count": o.small_count, "list_count": o.list_count,
                "small_concurrency": 4, "list_concurrency": 2, "watchers": o.watchers,
                "events": o.events, "create_rate": o.create_rate, "rate_secs": o.rate_secs,
                "rate": "0.5 x direct's closed-loop req/s in the same round, at most rate_cap",
                "rate_cap": o.rate_cap, "kubectl_runs": o.kubectl_runs}),
        );
        let mut goals = Vec::new();
        for up in UPSTREAMS {
            let section = self.upstream_report(res, up, &mut goals);
            if up == "apiserver" {
                for (k, v) in section.as_object().into_iter().flatten() {
                    out.insert(k.clone(), v.clone());
                }
            } else {
                out.insert("standin".into(), section);
            }
        }
        // kubectl, real API server.
        let k = |t: &str, key: &str| res.med("apiserver", "kubectl", t, "invoke", key);
        let mut kc = serde_json::Map::new();
        for (name, key, scale) in [
            ("wall_p50_ms", "p50_us", 1e-3),
            ("proxy_cpu_ms", "proxy_cpu_us", 1e-3),
            ("upstream_cpu_ms", "upstream_cpu_us", 1e-3),
        ] {
            let m: serde_json::Map<String, Value> = TARGETS
                .iter()
                .map(|t| (t.to_string(), json!(round3(k(t, key) * scale))))
                .collect();
            kc.insert(name.into(), Value::Object(m));
        }
        let added: serde_json::Map<String, Value> = PROXIES
            .iter()
            .map(|t| {
                (
                    t.to_string(),
                    json!(round3((k(t, "p50_us") - k("direct", "p50_us")) / 1e3)),
                )
            })
            .collect();
        kc.insert("added_wall_p50_ms".into(), Value::Object(added));
        println!(
            "\nkubectl invocation (new process, TLS, discovery with an empty cache, one GET), real API server, median of rounds:"
        );
        for t in TARGETS {
            println!(
                "  {t:<10} wall p50 {:>7.1} ms ({:>+6.1} ms vs direct), proxy CPU {:>6.2} ms, upstream CPU {:>6.1} ms",
                k(t, "p50_us") / 1e3,
                (k(t, "p50_us") - k("direct", "p50_us")) / 1e3,
                k(t, "proxy_cpu_us") / 1e3,
                k(t, "upstream_cpu_us") / 1e3
            );
        }
        out.insert("kubectl_invocation".into(), Value::Object(kc));
        println!(
            "\ngoals (ratios in this run; medians over {} rounds):",
            o.rounds
        );
        for g in &mut goals {
            // A part left out of this run (`--workloads`, `--upstreams`) has no figures:
            // neither met nor missed.
            let measured = !g["text"].as_str().unwrap_or_default().contains("NaN");
            if !measured {
                g["met"] = Value::Null;
            }
            println!(
                "  {:<7} {}",
                match (measured, g["met"] == true) {
                    (false, _) => "NOT RUN",
                    (true, true) => "MET",
                    (true, false) => "MISSED",
                },
                g["text"].as_str().unwrap_or_default()
            );
        }
        out.insert("goals".into(), json!(goals));
        Ok(Value::Object(out))
    }

    fn upstream_report(&self, res: &Results, up: &str, goals: &mut Vec<Value>) -> Value {
        // The unit of each workload's figures: `cpu` phase for CPU, `rate` for latency;
        // the watch workload has one phase for both.
        let cpu_phase = |wl: &str| if wl == "watch_event" { "watch" } else { "cpu" };
        let lat_phase = |wl: &str| if wl == "watch_event" { "watch" } else { "rate" };
        let m = |wl: &str, t: &str, phase: &str, k: &str| res.med(up, wl, t, phase, k);
        let mut cpu = serde_json::Map::new();
        let mut cpu_spread = serde_json::Map::new();
        let mut up_cpu = serde_json::Map::new();
        let mut p50 = serde_json::Map::new();
        let mut p99 = serde_json::Map::new();
        let mut added50 = serde_json::Map::new();
        let mut added99 = serde_json::Map::new();
        let mut direct = serde_json::Map::new();
        let mut bytes = serde_json::Map::new();
        let mut cpu_at_rate = serde_json::Map::new();
        let mut single = Value::Null;
        println!(
            "\nupstream: {up} (median of {} rounds; CPU in µs per request or per watch event; spread = min..max over rounds)",
            self.opts.rounds
        );
        println!(
            "  {:<12} {:>22} {:>22} {:>22} | {:>9} {:>9} | {:>8} | {:>17} {:>17} {:>17}",
            "workload",
            "nginx CPU",
            "portcullis CPU",
            "gated CPU",
            "pc/nginx",
            "gated/ngx",
            "rate/s",
            "added p50/p99 ngx",
            "pc",
            "gated"
        );
        for wl in WORKLOADS {
            let (cp, lp) = (cpu_phase(wl), lat_phase(wl));
            let mut c = serde_json::Map::new();
            let mut cs = serde_json::Map::new();
            for t in PROXIES {
                c.insert(t.into(), json!(round1(m(wl, t, cp, "proxy_cpu_us"))));
                let (lo, hi) = spread(&res.values(up, wl, t, cp, "proxy_cpu_us"));
                cs.insert(t.into(), json!([round1(lo), round1(hi)]));
            }
            cpu.insert(wl.into(), Value::Object(c));
            cpu_spread.insert(wl.into(), Value::Object(cs));
            let per = |f: &dyn Fn(&str) -> f64| -> Value {
                Value::Object(
                    TARGETS
                        .iter()
                        .map(|t| (t.to_string(), json!(round1(f(t)))))
                        .collect(),
                )
            };
            up_cpu.insert(wl.into(), per(&|t| m(wl, t, cp, "upstream_cpu_us")));
            p50.insert(wl.into(), per(&|t| m(wl, t, lp, "p50_us")));
            p99.insert(wl.into(), per(&|t| m(wl, t, lp, "p99_us")));
            bytes.insert(wl.into(), per(&|t| m(wl, t, cp, "bytes_per_response")));
            if wl != "watch_event" {
                cpu_at_rate.insert(wl.into(), per(&|t| m(wl, t, "rate", "proxy_cpu_us")));
            }
            // Added latency: per round against that round's direct, then the median.
            let added = |t: &str, k: &str| {
                let d = res.values(up, wl, "direct", lp, k);
                let x = res.values(up, wl, t, lp, k);
                median(x.iter().zip(&d).map(|(a, b)| a - b).collect())
            };
            let a50: serde_json::Map<String, Value> = PROXIES
                .iter()
                .map(|t| (t.to_string(), json!(round1(added(t, "p50_us")))))
                .collect();
            let a99: serde_json::Map<String, Value> = PROXIES
                .iter()
                .map(|t| (t.to_string(), json!(round1(added(t, "p99_us")))))
                .collect();
            let rate = m(wl, "direct", lp, "rate");
            let mut d = json!({
                "p50_us": m(wl, "direct", lp, "p50_us"),
                "p99_us": m(wl, "direct", lp, "p99_us"),
                "upstream_cpu_us_per_request": round1(m(wl, "direct", cp, "upstream_cpu_us")),
                "bytes_per_response": m(wl, "direct", cp, "bytes_per_response"),
            });
            if wl == "watch_event" {
                d["create_rate"] = json!(self.opts.create_rate);
                d["watchers"] = json!(self.opts.watchers);
            } else {
                d["closed_loop_rps"] = json!(round1(m(wl, "direct", "cpu", "rps")));
                d["fixed_rate_rps"] = json!(round1(rate));
            }
            direct.insert(wl.into(), d);
            let cpuv = |t: &str| m(wl, t, cp, "proxy_cpu_us");
            println!(
                "  {:<12} {:>22} {:>22} {:>22} | {:>9.2} {:>9.2} | {:>8} | {:>17} {:>17} {:>17}",
                wl,
                fmt_spread(
                    cpuv("nginx"),
                    spread(&res.values(up, wl, "nginx", cp, "proxy_cpu_us"))
                ),
                fmt_spread(
                    cpuv("portcullis"),
                    spread(&res.values(up, wl, "portcullis", cp, "proxy_cpu_us"))
                ),
                fmt_spread(
                    cpuv("gated"),
                    spread(&res.values(up, wl, "gated", cp, "proxy_cpu_us"))
                ),
                cpuv("portcullis") / cpuv("nginx"),
                cpuv("gated") / cpuv("nginx"),
                if wl == "watch_event" {
                    format!("{:.0}c", self.opts.create_rate)
                } else {
                    format!("{rate:.0}")
                },
                format!(
                    "{:.0}/{:.0}",
                    added("nginx", "p50_us"),
                    added("nginx", "p99_us")
                ),
                format!(
                    "{:.0}/{:.0}",
                    added("portcullis", "p50_us"),
                    added("portcullis", "p99_us")
                ),
                format!(
                    "{:.0}/{:.0}",
                    added("gated", "p50_us"),
                    added("gated", "p99_us")
                ),
            );
            added50.insert(wl.into(), Value::Object(a50));
            added99.insert(wl.into(), Value::Object(a99));

            // Goals.
            let goal = |goals: &mut Vec<Value>, text: String, value: f64, limit: f64| {
                goals.push(json!({"upstream": up, "workload": wl, "text": text,
                    "value": round3(value), "limit": round3(limit), "met": value <= limit}));
            };
            let ngx = cpuv("nginx");
            match wl {
                "small_get" | "watch_event" => {
                    goal(
                        goals,
                        format!(
                            "[{up}] {wl}: pass-through CPU {:.1} µs <= 1.2 x nginx {ngx:.1} µs (ratio {:.2})",
                            cpuv("portcullis"),
                            cpuv("portcullis") / ngx
                        ),
                        cpuv("portcullis") / ngx,
                        1.2,
                    );
                    goal(
                        goals,
                        format!(
                            "[{up}] {wl}: gated CPU {:.1} µs <= 1.5 x nginx {ngx:.1} µs (ratio {:.2})",
                            cpuv("gated"),
                            cpuv("gated") / ngx
                        ),
                        cpuv("gated") / ngx,
                        1.5,
                    );
                }
                _ => {
                    // The body at 1 GB/s: bytes / 1000 µs per MB.
                    let body = m(wl, "direct", cp, "bytes_per_response");
                    let limit = ngx + body / 1e3;
                    for t in ["portcullis", "gated"] {
                        goal(
                            goals,
                            format!(
                                "[{up}] {wl}: {t} CPU {:.0} µs <= nginx {ngx:.0} µs + {:.0} KB at 1 GB/s = {limit:.0} µs",
                                cpuv(t),
                                body / 1e3
                            ),
                            cpuv(t),
                            limit,
                        );
                    }
                }
            }
            if wl == "small_get" {
                let (n1, n2) = spread(&res.values(up, wl, "direct", lp, "p99_us"));
                for t in ["portcullis", "gated"] {
                    let v = added(t, "p99_us");
                    goal(
                        goals,
                        format!(
                            "[{up}] small_get: {t} added p99 at {rate:.0}/s {v:.0} µs <= 1000 µs (nginx {:.0} µs; direct p99 over rounds {n1:.0}..{n2:.0} µs)",
                            added("nginx", "p99_us")
                        ),
                        v,
                        1000.0,
                    );
                }
            }
            if wl == "watch_event" {
                let added1 = |t: &str, k: &str| {
                    let d = res.values(up, wl, "direct", "watch1", k);
                    let x = res.values(up, wl, t, "watch1", k);
                    median(x.iter().zip(&d).map(|(a, b)| a - b).collect())
                };
                let (n1, n2) = spread(&res.values(up, wl, "direct", "watch1", "p50_us"));
                for t in ["portcullis", "gated"] {
                    let v = added1(t, "p50_us");
                    goal(
                        goals,
                        format!(
                            "[{up}] watch_event (one watch): {t} added p50 {v:.0} µs <= 500 µs (direct p50 over rounds {n1:.0}..{n2:.0} µs)"
                        ),
                        v,
                        500.0,
                    );
                }
                let (n1, n2) = spread(&res.values(up, wl, "direct", lp, "p50_us"));
                for t in ["portcullis", "gated"] {
                    let v = added(t, "p50_us");
                    goal(
                        goals,
                        format!(
                            "[{up}] watch_event ({} watches): {t} added p50 {v:.0} µs <= 500 µs (nginx {:.0} µs; direct p50 over rounds {n1:.0}..{n2:.0} µs)",
                            self.opts.watchers,
                            added("nginx", "p50_us")
                        ),
                        v,
                        500.0,
                    );
                }
                let per1 = |k: &str| -> Value {
                    Value::Object(
                        TARGETS
                            .iter()
                            .map(|t| (t.to_string(), json!(m(wl, t, "watch1", k))))
                            .collect(),
                    )
                };
                let add1 = |k: &str| -> Value {
                    Value::Object(
                        PROXIES
                            .iter()
                            .map(|t| (t.to_string(), json!(round1(added1(t, k)))))
                            .collect(),
                    )
                };
                single = json!({"p50_us": per1("p50_us"), "p99_us": per1("p99_us"),
                    "added_p50_us": add1("p50_us"), "added_p99_us": add1("p99_us")});
            }
        }
        json!({
            "cpu_us_per_request": cpu,
            "fixed_rate_added_p99_us": added99,
            "fixed_rate_added_p50_us": added50,
            "cpu_us_per_request_spread": cpu_spread,
            "upstream_cpu_us_per_request": up_cpu,
            "fixed_rate_p50_us": p50,
            "fixed_rate_p99_us": p99,
            "cpu_us_per_request_at_fixed_rate": cpu_at_rate,
            "bytes_per_response": bytes,
            "direct": direct,
            "watch_event_single": single,
        })
    }
}

fn fmt_spread(med: f64, (lo, hi): (f64, f64)) -> String {
    format!("{med:.1} ({lo:.0}..{hi:.0})")
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
