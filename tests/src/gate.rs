//! The gate on a real node: what the e2e tier, the demo and the proxy benchmark share.
//! A [`Node`] (real control plane, kubelet, containerd, kube-proxy), the Portcullis
//! daemon started on the node, and agent pods — real pods from the agent image, with
//! their own service account `e2e/agent`, the projected token and `kube-root-ca.crt`
//! the kubelet mounts, in the cgroups the kubelet and runc made — whose pod cgroups are
//! enrolled, so every connection they make to the API server is redirected to the
//! daemon. The agents use in-cluster configuration, unmodified: they trust the gate
//! because the cluster's root CA bundle (`--root-ca-file`) includes the interception CA.
//!
//! ```text
//!  pod e2e/work  (agent, enrolled)  ──┐ kubectl / python / helpers, run by
//!  pod e2e/other (agent, enrolled)  ──┤ `kubectl exec` from the node
//!  pod e2e/target (workload, not enrolled: exec and logs target)
//!        │ connect 10.96.0.1:443 → the kernel rewrites it → 172.31.0.1:15443
//!        ▼
//!  portcullis run (node netns) ── impersonating the scoped identity ──▶ apiserver :6443
//! ```
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    bin,
    node::{self, NODE_IP, Node, write},
};

pub const AGENT_USER: &str = "portcullis:agent";
pub const AGENT_GROUP: &str = "portcullis:agents";
pub const NAMESPACE: &str = "e2e";
/// The agent pod the tests act from.
pub const POD: &str = "work";
/// A second agent pod, for the stolen-token case.
pub const OTHER_POD: &str = "other";
/// A workload pod (not an agent): exec and logs target.
pub const TARGET_POD: &str = "target";
/// A pod from the agent image that is NOT enrolled: the direct path from a pod.
pub const BYSTANDER_POD: &str = "bystander";
pub use node::{DAEMON_USER, SA_ISSUER};

/// The daemon's listener on the node (where the kernel sends agents).
pub const DAEMON_ADDR: &str = "172.31.0.1:15443";
/// The test-only IdP, served in the node namespace (where the daemon runs).
pub const IDP_ADDR: &str = "127.0.0.1:18443";
pub const IDP_AUDIENCE: &str = "portcullis";
/// Remote approvers' HTTPS admin API, in the node namespace.
pub const ADMIN_ADDR: &str = "127.0.0.1:18444";
/// The CA bundle every pod's service-account volume carries.
pub const POD_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
pub const POD_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Where the daemon anchors its signed heads off the node (a ConfigMap it writes with
/// its own credential).
pub const ANCHOR_NAMESPACE: &str = "portcullis-system";
pub const ANCHOR_NAME: &str = "portcullis-audit-e2e";

/// The gated daemon's audit settings: request bodies (masked) are recorded, signed
/// heads are anchored in a ConfigMap.
pub const AUDIT_SECTION: &str = "  audit:\n    level: Request\n    anchor: {namespace: portcullis-system, name: portcullis-audit-e2e, every: 1s}\n";

/// The daemon, run on the node (in its network namespace).
pub struct Daemon {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    log: PathBuf,
    child: std::sync::Mutex<Option<Child>>,
    /// Run by the DaemonSet (`crate::install`), not by this harness: its config is
    /// `pod_config` (the same but `attach_cgroup: auto`), its pid the ready file's.
    pub installed: bool,
    pub pod_config: PathBuf,
    last_pid: std::sync::Mutex<Option<u32>>,
}

impl Daemon {
    fn new(dir: &Path, installed: bool) -> Daemon {
        Daemon {
            config: dir.join("portcullis.yaml"),
            state_dir: dir.join("state"),
            log: dir.join("daemon.log"),
            child: std::sync::Mutex::new(None),
            installed,
            pod_config: dir.join("portcullis-pod.yaml"),
            last_pid: std::sync::Mutex::new(None),
        }
    }

    /// Writes the config (and, installed, the pod's variant of it).
    fn write_config(&self, text: &str) -> Result<()> {
        write(&self.config, text)?;
        if self.installed {
            let attach = text
                .lines()
                .find(|l| l.trim_start().starts_with("attach_cgroup:"))
                .context("no attach_cgroup line")?;
            write(
                &self.pod_config,
                &text.replacen(attach, "  attach_cgroup: auto", 1),
            )?;
        }
        Ok(())
    }

    /// Starts `portcullis run` and waits until it is ready. Installed: waits for the
    /// pod's daemon (a new one, if one was running before).
    pub fn start(&self) -> Result<Value> {
        if self.installed {
            let not = *self.last_pid.lock().unwrap_or_else(|p| p.into_inner());
            let v = crate::install::wait_ready_file(&self.state_dir.join("ready"), not, 90)
                .map_err(|e| e.context(self.log()))?;
            *self.last_pid.lock().unwrap_or_else(|p| p.into_inner()) =
                v["pid"].as_u64().map(|p| p as u32);
            return Ok(v);
        }
        let ready_file = self.state_dir.join("ready");
        let _ = std::fs::remove_file(&ready_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node::NETNS))
            .arg(bin("portcullis"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting portcullis run")?;
        let pid = child.id();
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && v["pid"].as_u64() == Some(u64::from(pid))
            {
                return Ok(v);
            }
            let exited = match self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(st) = exited {
                bail!("portcullis run exited ({st}) before ready:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("portcullis run not ready after 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and waits for the daemon to exit (it publishes its last anchor).
    pub fn stop(&self) -> Result<()> {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            crate::signal(c.id(), libc::SIGTERM)?;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if c.try_wait()?.is_some() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("portcullis run did not stop within 15 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// SIGKILL: no chance to clean up, as in a crash or OOM kill.
    /// SIGKILL: no chance to clean up, as in a crash or OOM kill. Installed, the
    /// kubelet then restarts the container.
    pub fn kill(&self) {
        if self.installed {
            if let Some(pid) = self.pid() {
                let _ = crate::signal(pid, libc::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            return;
        }
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        if self.installed {
            return std::fs::read_to_string(self.state_dir.join("ready"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["pid"].as_u64())
                .map(|p| p as u32);
        }
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// The portcullis CLI with this daemon's config (on the node, as root).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", node::NETNS))
            .arg(bin("portcullis"));
        if let Some((first, rest)) = args.split_first() {
            c.arg(first)
                .arg(format!("--config={}", self.config.display()))
                .args(rest);
        }
        c.env("RUST_BACKTRACE", "0").stdin(Stdio::null());
        c
    }

    fn jsonl(&self, name: &str) -> Vec<Value> {
        std::fs::read_to_string(self.state_dir.join(name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn kernel_events(&self) -> Vec<Value> {
        self.jsonl("kernel-events.jsonl")
    }

    pub fn connections(&self) -> Vec<Value> {
        self.jsonl("connections.jsonl")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.installed {
            // The node goes next and takes the pod with it; the pins go here.
            let _ = Command::new(bin("portcullis"))
                .args(["unload", "--config"])
                .arg(&self.config)
                .output();
            return;
        }
        self.kill();
        // Detach the programs and remove the pins (the node's cleanup would too).
        let _ = Command::new(bin("portcullis"))
            .args(["unload", "--config"])
            .arg(&self.config)
            .output();
    }
}

/// The gate on a real node.
pub struct Gate {
    // Field order is drop order: the daemon and the IdP stop before the node goes.
    pub daemon: Daemon,
    idp_child: Option<Child>,
    pub node: Node,
    /// Test files, configs and the daemon's state (outside the node's directory).
    pub dir: PathBuf,
    pub work_uid: String,
    pub other_uid: String,
    /// The enrolled pod cgroups (cgroup v2).
    pub work_cg: PathBuf,
    pub other_cg: PathBuf,
    /// The projected service-account token the kubelet mounted in pod `work`.
    pub agent_token: String,
    /// Straight at the apiserver, as the same scoped identity the daemon impersonates.
    pub direct_kubeconfig: PathBuf,
    /// (pod, containerd id of its `main` container), noted at start.
    container_ids: Vec<(String, String)>,
    /// Gated mode: the test IdP.
    pub idp: Option<crate::idp::Idp>,
    base_config: String,
    pass_through: String,
    gated: Option<String>,
}

/// Options for [`Gate::start`].
#[derive(Default)]
pub struct GateOptions<'a> {
    /// With a policy the daemon starts gated (tokens from the cluster issuer and the
    /// test IdP, this policy, approvals); without, pass-through (every agent acts as
    /// the scoped identity, no token checks: the benchmark's baseline).
    pub policy: Option<&'a str>,
    /// Extra lines for the daemon's `proxy:` section (indented two spaces).
    pub proxy_extra: &'a str,
    /// Extra apiserver flags (feature gates).
    pub apiserver_flags: Vec<String>,
    /// The daemon as a cluster runs it: the DaemonSet of `deploy/` (through the test
    /// overlay), not a process this harness starts.
    pub install: bool,
    /// The daemon's `log.level`; by default the shipped `info` plus a line per request
    /// (`portcullis::requests`), which the demo shows and failing tests print.
    pub log_level: Option<&'a str>,
}

impl Gate {
    pub fn start(tag: &str, opts: GateOptions) -> Result<Gate> {
        // Per process: another harness may be waiting for (or holding) the node.
        clean_old_gate_dirs();
        let dir =
            std::env::temp_dir().join(format!("portcullis-gate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let daemon = Daemon::new(&dir, opts.install);
        // The interception CA first: the cluster's root CA bundle carries it.
        let base_config = format!(
            "listen:\n  ipv4: \"{DAEMON_ADDR}\"\nkernel:\n  attach_cgroup: {attach}\n  bpffs_dir: {bpffs}\n  agent_cgroups: []\n  protected_endpoints: [\"{svc}\", \"{NODE_IP}:{port}\"]\nstate_dir: {state}\nlog:\n  level: \"{log_level}\"\n",
            attach = node::host::cgroup2_mount()
                .context("no cgroup2 mount")?
                .join(node::CGROUP_ROOT)
                .display(),
            bpffs = node::bpffs_dir().display(),
            log_level = opts.log_level.unwrap_or("info,portcullis::requests=debug"),
            svc = node::API_CLUSTER_IP,
            port = node::API_PORT,
            state = daemon.state_dir.display(),
        );
        // Installed, the daemon also enrolls agent pods by label (as deploy/ does).
        let base_config = if opts.install {
            format!(
                "{base_config}enrollment:\n  node_name: {n}\n  pod_labels: {{portcullis.dev/agent: \"true\"}}\n  namespace_labels: {{portcullis.dev/agents: enabled}}\ndiscovery:\n  node_name: {n}\n",
                n = node::NODE_NAME
            )
        } else {
            base_config
        };
        write(&daemon.config, &base_config)?;
        let o = Command::new(bin("portcullis"))
            .args(["ca", "init", "--config"])
            .arg(&daemon.config)
            .output()?;
        ensure!(
            o.status.success(),
            "portcullis ca init: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let interception_ca = daemon.state_dir.join("ca/ca.crt");
        let mut node = Node::start(node::Options {
            // Installed, agents trust the gate through the webhook's CA bundle, not
            // through the cluster's root CA (`--root-ca-file`).
            extra_trusted_cas: if opts.install {
                Vec::new()
            } else {
                vec![interception_ca.clone()]
            },
            apiserver_flags: opts.apiserver_flags,
            agent_bins: vec![
                bin("pc-abuse"),
                bin("pc-probe"),
                bin("pc-load"),
                node::Parts::from_env()?.bin("pc-informer"),
            ],
            images: if opts.install {
                vec![crate::install::image()?]
            } else {
                Vec::new()
            },
        })
        .context("starting the node")?;
        eprintln!("node ready: {}", node.timings);
        let t = Instant::now();
        node.apply(&seed_yaml())?;
        node.wait_service_account(NAMESPACE, "agent")?;
        node.wait_service_account(NAMESPACE, "default")?;
        // Installed, the pods come after the DaemonSet and the webhook (they are
        // admitted by it, and enrolled by label); else now.
        let mut pods = None;
        if !opts.install {
            pods = Some(start_pods(&mut node, false)?);
            eprintln!("pods ready in {:.1} s", t.elapsed().as_secs_f64());
        }

        let upstream = format!(
            "proxy:\n  upstream:\n    url: https://{NODE_IP}:{port}\n    ca_file: {ca}\n    credential:\n      bearer_token_file: {tok}\n",
            port = node::API_PORT,
            ca = node.ca_pem.display(),
            tok = node.daemon_token_file.display()
        );
        let pass_through = format!(
            "{upstream}  impersonate:\n    user: \"{AGENT_USER}\"\n    groups: [\"{AGENT_GROUP}\"]\n{}",
            opts.proxy_extra
        );
        let mut idp = None;
        let mut idp_child = None;
        let gated = match opts.policy {
            None => None,
            Some(policy) => {
                let policy_file = dir.join("policy.yaml");
                write(&policy_file, policy)?;
                let i = crate::idp::Idp::new(&dir.join("idp"), &format!("https://{IDP_ADDR}"))?;
                i.keygen("k1")?;
                i.publish(&["k1"])?;
                let (cert, key) = node.issue_server_cert("idp", &["127.0.0.1"])?;
                let child = node
                    .command(&bin("pc-idp"))
                    .arg(format!("--dir={}", i.dir.display()))
                    .arg(format!("--listen={IDP_ADDR}"))
                    .arg(format!("--cert={}", cert.display()))
                    .arg(format!("--key={}", key.display()))
                    .arg(format!("--issuer={}", i.issuer))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting pc-idp")?;
                idp_child = Some(child);
                let ca = node.ca_pem.display();
                let s = format!(
                    "{upstream}  policy_file: {pf}\n  identity:\n    leeway: 5s\n    issuers:\n    - issuer: {SA_ISSUER}\n      kubernetes: true\n      audiences: [\"{SA_ISSUER}\"]\n      algorithms: [RS256, ES256]\n    - issuer: {iss}\n      ca_file: {ca}\n      audiences: [{IDP_AUDIENCE}]\n      algorithms: [ES256]\n      username_claim: email\n      groups_claim: groups\n  approvals:\n    pending_ttl: 10s\n    webhook:\n      url: {iss}/webhook\n      ca_file: {ca}\n  admin:\n    https:\n      listen: {ADMIN_ADDR}\n      approver_groups: [\"oidc:oncall\", \"oidc:devs\"]\n{AUDIT_SECTION}",
                    pf = policy_file.display(),
                    iss = i.issuer,
                );
                idp = Some(i);
                Some(format!("{s}{}", opts.proxy_extra))
            }
        };
        daemon.write_config(&format!(
            "{base_config}{}",
            gated.as_ref().unwrap_or(&pass_through)
        ))?;
        if opts.install {
            let overlay =
                crate::install::harness_overlay(&dir, &daemon.pod_config, &node.dir.join("pki"))?;
            // The interception CA this harness made (the webhook keeps an existing one).
            crate::install::preset_ca(&node, &daemon.state_dir.join("ca"))?;
            crate::install::apply_k(&node, &overlay)?;
            if let Err(e) = daemon.start() {
                return Err(e.context(crate::install::describe_daemon(&node)));
            }
            crate::install::wait_webhook(&node, 90)?;
        } else {
            daemon.start()?;
        }
        let t = Instant::now();
        let (work_uid, other_uid, work_cg, other_cg) = match pods {
            Some(p) => p,
            None => {
                let p = start_pods(&mut node, true)
                    .map_err(|e| e.context(crate::install::describe_daemon(&node)))?;
                eprintln!("pods ready in {:.1} s", t.elapsed().as_secs_f64());
                p
            }
        };
        for cg in [&work_cg, &other_cg] {
            if opts.install {
                // Enrolled by label, by the daemon.
                break;
            }
            let o = daemon
                .cli(&["enroll", &cg.display().to_string()])
                .output()?;
            ensure!(
                o.status.success(),
                "enrolling {}: {}",
                cg.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let agent_token = node.kubectl_ok(&[
            "exec", "-n", NAMESPACE, POD, "-c", "main", "--", "cat", POD_TOKEN,
        ])?;
        let mut container_ids = Vec::new();
        for pod in [POD, OTHER_POD] {
            let id = node.kubectl_ok(&[
                "-n",
                NAMESPACE,
                "get",
                "pod",
                pod,
                "-o",
                "jsonpath={.status.containerStatuses[?(@.name==\"main\")].containerID}",
            ])?;
            container_ids.push((pod.to_string(), id));
        }
        let direct_kubeconfig = dir.join("direct.kubeconfig");
        write(
            &direct_kubeconfig,
            &kubeconfig(
                &format!("https://{NODE_IP}:{}", node::API_PORT),
                &node.ca_pem,
                &node.admin_token,
                Some((AGENT_USER, AGENT_GROUP)),
            ),
        )?;
        Ok(Gate {
            daemon,
            idp_child,
            node,
            dir,
            work_uid,
            other_uid,
            work_cg,
            other_cg,
            agent_token,
            direct_kubeconfig,
            container_ids,
            idp,
            base_config,
            pass_through,
            gated,
        })
    }

    pub fn daemon_log(&self) -> String {
        if self.daemon.installed {
            return crate::install::describe_daemon(&self.node);
        }
        self.daemon.log()
    }

    pub fn state_dir(&self) -> &Path {
        &self.daemon.state_dir
    }

    /// The API server as agents dial it: the `kubernetes` Service.
    pub fn cluster_ip(&self) -> &'static str {
        node::API_CLUSTER_IP
    }

    pub fn api_url(&self) -> String {
        format!("https://{NODE_IP}:{}", node::API_PORT)
    }

    fn restart(&self, section: &str) -> Result<()> {
        if self.daemon.installed {
            // A new pod (no crash-loop backoff); it reads the rewritten config.
            self.daemon
                .write_config(&format!("{}{section}", self.base_config))?;
            crate::install::delete_daemon_pods(&self.node)?;
            return self.daemon.start().map(drop);
        }
        self.daemon.kill();
        write(
            &self.daemon.config,
            &format!("{}{section}", self.base_config),
        )?;
        self.daemon.start().map(drop)
    }

    /// Restarts the gated daemon with `audit` (a `proxy.audit` section, indented as
    /// [`AUDIT_SECTION`]) in place of the default one. Pins (and enrollments) are
    /// adopted, so enforcement never lapses.
    pub fn restart_with_audit(&self, audit: &str) -> Result<()> {
        let gated = self
            .gated
            .as_ref()
            .context("no policy was given to Gate::start")?
            .replacen(AUDIT_SECTION, audit, 1);
        self.restart(&gated)
    }

    /// An audit section that also ships to the test-only collector in pc-idp
    /// (`POST /audit-sink`, records in `<idp dir>/sink.jsonl`).
    pub fn audit_with_sink(&self) -> String {
        format!(
            "{AUDIT_SECTION}    sink:\n      url: https://{IDP_ADDR}/audit-sink\n      ca_file: {}\n      batch: 50\n",
            self.node.ca_pem.display()
        )
    }

    /// Restarts the daemon gated or in pass-through mode.
    pub fn switch(&self, gated: bool) -> Result<()> {
        let section = if gated {
            self.gated
                .clone()
                .context("no policy was given to Gate::start")?
        } else {
            self.pass_through.clone()
        };
        self.restart(&section)
    }

    /// Restarts the daemon gated or in pass-through mode, forwarding to `url` instead of
    /// the API server (the benchmark's stand-in; its certificate from the node's CA).
    pub fn switch_upstream(&self, gated: bool, url: &str) -> Result<()> {
        let section = if gated {
            self.gated
                .clone()
                .context("no policy was given to Gate::start")?
        } else {
            self.pass_through.clone()
        };
        let from = format!("url: {}\n", self.api_url());
        ensure!(
            section.contains(&from),
            "no upstream url in the daemon's config"
        );
        self.restart(&section.replacen(&from, &format!("url: {url}\n"), 1))
    }

    /// A command inside an agent pod (`kubectl exec` from the node). Bounded inside the
    /// pod too (`timeout`), so nothing the test abandons keeps running there.
    pub fn in_pod(&self, pod: &str, argv: &[&str]) -> Command {
        let mut full = vec!["timeout", "-s", "KILL", "100"];
        full.extend_from_slice(argv);
        self.node.exec_cmd(NAMESPACE, pod, "main", &full)
    }

    /// A command inside an agent pod's `main` container started through containerd
    /// (`ctr tasks exec`), for when the API server is down and `kubectl exec` cannot work.
    pub fn in_pod_via_runtime(&self, pod: &str, argv: &[&str]) -> Result<Command> {
        let id = self.node.kubectl_ok(&[
            "-n",
            NAMESPACE,
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.containerStatuses[?(@.name==\"main\")].containerID}",
        ]);
        let id = match id {
            Ok(id) => id,
            // The API server may be the thing that is down: the IDs were noted at start.
            Err(_) => self
                .container_ids
                .iter()
                .find(|(p, _)| p == pod)
                .map(|(_, id)| id.clone())
                .context("no container id noted for the pod")?,
        };
        let id = id.trim_start_matches("containerd://").to_string();
        let mut c = Command::new(self.node.parts.bin("ctr"));
        c.arg("-a")
            .arg(self.node.containerd_sock())
            .args(["-n", "k8s.io", "tasks", "exec", "--exec-id"])
            .arg(format!("pc-{}", node::random_token()))
            .arg(&id)
            .args(["timeout", "-s", "KILL", "100"])
            .args(argv);
        Ok(c)
    }

    /// kubectl as the agent, from pod `work`, with its in-cluster configuration.
    pub fn gate_cmd(&self, args: &[&str]) -> Command {
        let mut argv = vec!["kubectl"];
        argv.extend_from_slice(args);
        self.in_pod(POD, &argv)
    }

    /// As [`Self::gate_cmd`] with environment variables set for kubectl in the pod.
    pub fn gate_cmd_env(&self, envs: &[(&str, &str)], args: &[&str]) -> Command {
        let kv: Vec<String> = envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut argv = vec!["env"];
        argv.extend(kv.iter().map(String::as_str));
        argv.push("kubectl");
        argv.extend_from_slice(args);
        self.in_pod(POD, &argv)
    }

    /// kubectl straight at the apiserver from the node, as the same scoped identity.
    pub fn direct_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.node.command(&self.node.parts.bin("kubectl"));
        c.arg(format!("--kubeconfig={}", self.direct_kubeconfig.display()))
            .args(args)
            .env("HOME", self.dir.join("home-direct"));
        c
    }

    /// A test helper binary (in the agent image) run in pod `work`.
    pub fn agent_bin(&self, name: &str, args: &[&str]) -> Command {
        let mut argv = vec![name];
        argv.extend_from_slice(args);
        self.in_pod(POD, &argv)
    }

    /// Writes a file on the node (returned path) and the same content at
    /// `/work/NAME` in both agent pods; returns the path inside the pods.
    pub fn file(&self, name: &str, text: &str) -> Result<String> {
        write(&self.dir.join(name), text)?;
        let inside = format!("/work/{name}");
        for pod in [POD, OTHER_POD] {
            self.node.copy_into(NAMESPACE, pod, "main", &inside, text)?;
        }
        Ok(inside)
    }

    /// The node-side copy of a file written by [`Self::file`].
    pub fn host_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `portcullis` CLI on the node (admin socket), e.g. `approvals list`.
    pub fn portcullis(&self, args: &[&str]) -> Result<Output> {
        Ok(self.daemon.cli(args).output()?)
    }

    /// The portcullis CLI without the config flag (audit verify/sessions/export/replay).
    pub fn portcullis_plain(&self, args: &[&str]) -> Result<Output> {
        Ok(self
            .node
            .command(&bin("portcullis"))
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// A real projected service-account token for `e2e/agent` (TokenRequest API), for
    /// `audiences` (default: the API's) and bound to `pod` (name, uid) if given.
    pub fn agent_token_for(
        &self,
        audiences: Option<&[&str]>,
        pod: Option<(&str, &str)>,
    ) -> Result<String> {
        let mut spec = serde_json::json!({"expirationSeconds": 3600});
        if let Some(a) = audiences {
            spec["audiences"] = serde_json::json!(a);
        }
        if let Some((name, uid)) = pod {
            spec["boundObjectRef"] =
                serde_json::json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid});
        }
        let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
            .to_string();
        let mut c = self.node.kubectl_cmd(&[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/{NAMESPACE}/serviceaccounts/agent/token"),
            "-f",
            "-",
        ]);
        let o = node::run_with_stdin(&mut c, &body)?;
        ensure!(
            o.status.success(),
            "TokenRequest: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout)?;
        v["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .context("TokenRequest returned no token")
    }

    /// The apiserver's own audit log (what reached the API server, and as whom).
    pub fn apiserver_audit(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.node.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Makes a container of the target pod start writing (its script waits for this
    /// trigger file): `go` for `main`'s numbered lines, `canary-N` for the canary
    /// container's Nth round.
    pub fn trigger(&self, container: &str, file: &str) -> Result<()> {
        self.node
            .kubectl_ok(&[
                "exec",
                "-n",
                NAMESPACE,
                TARGET_POD,
                "-c",
                container,
                "--",
                "touch",
                &format!("/tmp/{file}"),
            ])
            .map(drop)
    }

    /// Lines a streaming command prints, with when each arrived, until `stop` says so or
    /// `secs` pass; the command is then killed.
    pub fn stream_lines(
        mut cmd: Command,
        secs: u64,
        mut stop: impl FnMut(&[(Duration, String)]) -> bool,
        mut after_start: impl FnMut() -> Result<()>,
    ) -> Result<Vec<(Duration, String)>> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let t0 = Instant::now();
        let mut got: Vec<(Duration, String)> = Vec::new();
        let mut started = false;
        let result = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok((at, line)) => got.push((at - t0, line)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            }
            if !started && !got.is_empty() {
                started = true;
                if let Err(e) = after_start() {
                    break Err(e);
                }
            }
            if stop(&got) || t0.elapsed() > Duration::from_secs(secs) {
                break Ok(());
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        result.map(|_| got)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(mut c) = self.idp_child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The e2e pods, ready: (work uid, other uid, work cgroup, other cgroup). `agents`:
/// `work` and `other` carry the agent label (the installed daemon enrolls them).
fn start_pods(node: &mut Node, agents: bool) -> Result<(String, String, PathBuf, PathBuf)> {
    node.apply(&pods_yaml(agents))?;
    let work_uid = node.wait_pod_ready(NAMESPACE, POD)?;
    let other_uid = node.wait_pod_ready(NAMESPACE, OTHER_POD)?;
    node.wait_pod_ready(NAMESPACE, TARGET_POD)?;
    node.wait_pod_ready(NAMESPACE, BYSTANDER_POD)?;
    let work_cg = node.pod_cgroup(&work_uid)?;
    let other_cg = node.pod_cgroup(&other_uid)?;
    Ok((work_uid, other_uid, work_cg, other_cg))
}

/// Removes the directories of gates whose process is gone.
fn clean_old_gate_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("portcullis-gate-") else {
            continue;
        };
        let alive = rest
            .rsplit_once('-')
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub fn kubeconfig(
    server: &str,
    ca: &Path,
    token: &str,
    impersonate: Option<(&str, &str)>,
) -> String {
    let imp = match impersonate {
        Some((u, g)) => format!("    as: \"{u}\"\n    as-groups: [\"{g}\"]\n"),
        None => String::new(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\n{imp}contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n    namespace: {NAMESPACE}\ncurrent-context: x\n",
        ca.display()
    )
}

fn seed_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: portcullis-impersonator
rules:
- apiGroups: [""]
  resources: ["users", "groups"]
  verbs: ["impersonate"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: portcullis-impersonator
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: portcullis-impersonator}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {DAEMON_USER}}}
---
# The daemon reads the service-account issuer's keys.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: portcullis-issuer-keys
rules:
- nonResourceURLs: ["/.well-known/openid-configuration", "/openid/v1/jwks"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: portcullis-issuer-keys
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: portcullis-issuer-keys}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {DAEMON_USER}}}
---
# The daemon watches the pods of its node and the namespaces (enrollment by label).
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: portcullis-node-reader
rules:
- apiGroups: [""]
  resources: ["pods", "namespaces", "nodes", "services"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: portcullis-node-reader
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: portcullis-node-reader}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {DAEMON_USER}}}
---
# The daemon checks agents' service-account tokens with TokenReview (a deleted pod or
# service account stops working).
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: portcullis-token-review
rules:
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: portcullis-token-review
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: portcullis-token-review}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {DAEMON_USER}}}
---
# The daemon anchors its signed audit heads off the node, in its own namespace.
apiVersion: v1
kind: Namespace
metadata:
  name: {ANCHOR_NAMESPACE}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: portcullis-audit-anchor
  namespace: {ANCHOR_NAMESPACE}
rules:
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["configmaps"]
  resourceNames: ["{ANCHOR_NAME}"]
  verbs: ["get", "update", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: portcullis-audit-anchor
  namespace: {ANCHOR_NAMESPACE}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: portcullis-audit-anchor}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {DAEMON_USER}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: agents-edit
  namespace: {NAMESPACE}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "{AGENT_GROUP}"}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: agents-discovery
rules:
- apiGroups: [""]
  resources: ["namespaces", "nodes"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: agents-discovery
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agents-discovery}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "{AGENT_GROUP}"}}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: agent
  namespace: {NAMESPACE}
"#
    )
}

/// The target pod's containers: `main` writes three numbered lines, then (once
/// `/tmp/go` exists) one every 400 ms; `canary` writes credentials into its log, one
/// line every 300 ms, each time `/tmp/canary-N` appears.
const TARGET_MAIN: &str = r#"echo log line 1; echo log line 2; echo log line 3
while [ ! -e /tmp/go ]; do sleep 0.1; done
i=4; while [ $i -le 300 ]; do echo "log line $i"; i=$((i+1)); sleep 0.4; done
exec sleep 86400"#;

const TARGET_CANARY: &str = r#"n=1
while true; do
  while [ ! -e /tmp/canary-$n ]; do sleep 0.1; done
  for l in "starting" "connecting with password=pc-log-canary-1 to db" "-----BEGIN PRIVATE KEY-----" "PCLOGCANARYKEY2" "-----END PRIVATE KEY-----" "aws key AKIAPCLOGCANARY34567 loaded" "bearer eyJwY2xvZ2NhbmFyeSI6NH0.eyJzdWIiOiJwYy1sb2ctY2FuYXJ5LTQifQ.cGMtbG9nLWNhbmFyeS00LXNpZw" "done"; do
    echo "$l"; sleep 0.3
  done
  n=$((n+1))
done"#;

fn yaml_block(script: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    script.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn pods_yaml(agents: bool) -> String {
    let agent = |name: &str| {
        let label = if agents && name != BYSTANDER_POD {
            ", portcullis.dev/agent: \"true\""
        } else {
            ""
        };
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels: {{app: agent{label}}}
spec:
  serviceAccountName: agent
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {img}
    imagePullPolicy: Never
    command: [sleep, "86400"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  volumes: [{{name: work, emptyDir: {{}}}}]
"#,
            img = node::AGENT_IMAGE
        )
    };
    format!(
        r#"{}---
{}---
{}---
apiVersion: v1
kind: Pod
metadata:
  name: {TARGET_POD}
  namespace: {NAMESPACE}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {img}
    imagePullPolicy: Never
    command:
    - sh
    - -c
    - |
{main}  - name: canary
    image: {img}
    imagePullPolicy: Never
    command:
    - sh
    - -c
    - |
{canary}  - name: echo
    image: {img}
    imagePullPolicy: Never
    command: [cat]
    stdin: true
"#,
        agent(POD),
        agent(OTHER_POD),
        agent(BYSTANDER_POD),
        img = node::WORKLOAD_IMAGE,
        main = yaml_block(TARGET_MAIN, 6),
        canary = yaml_block(TARGET_CANARY, 6),
    )
}
