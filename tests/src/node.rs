//! A real single-node Kubernetes cluster for the e2e tier, the demo and the proxy
//! benchmark: etcd → kube-apiserver (Node,RBAC; NodeRestriction; service-account issuer
//! and keys; privileged pods allowed) → kube-controller-manager (its default
//! controllers) → kube-scheduler → containerd 2 (+ runc, CNI bridge) → kubelet →
//! kube-proxy (nftables), every one of them the real program, built by
//! `cargo xtask setup` (xtask/src/node.rs) from its Go modules.
//!
//! ```text
//!  netns portcullis-node (no route out of the machine)
//!    lo: 127.0.0.1 (etcd), 172.31.0.1 (node IP: apiserver :6443, kubelet :10250,
//!        the daemon's listener)
//!    cni0 10.244.0.1/24 ── veth ── pod netns (10.244.0.x, default route via cni0)
//!    Services 10.96.0.0/16 (kubernetes = 10.96.0.1:443 → 172.31.0.1:6443 by kube-proxy)
//!  cgroups: <every hierarchy>/portcullis-node/kubepods/<qos>/pod<UID>/<container>
//! ```
//! The namespace has no interface that leaves it (the node IP is on `lo`, pods hang off
//! the bridge), so no packet can reach the machine's network. Only one node runs at a
//! time (a lock file says who holds it); everything it changed on the host is undone
//! on drop and, after a killed run, at the start of the next (see `host`).
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

pub mod host;
pub mod image;
pub mod pki;

use image::Image;

pub const NETNS: &str = "portcullis-node";
/// The kubelet's cgroupRoot, in every hierarchy.
pub const CGROUP_ROOT: &str = "portcullis-node";
pub const NODE_NAME: &str = "pc-node";
pub const NODE_IP: &str = "172.31.0.1";
pub const POD_SUBNET: &str = "10.244.0.0/24";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service.
pub const API_CLUSTER_IP: &str = "10.96.0.1:443";
pub const API_PORT: u16 = 6443;
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const ADMIN_TOKEN_USER: &str = "pc-e2e-admin";
pub const DAEMON_USER: &str = "portcullis-daemon";

pub const AGENT_IMAGE: &str = "portcullis.local/agent:e2e";
pub const WORKLOAD_IMAGE: &str = "portcullis.local/workload:e2e";
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";

pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Where `cargo xtask setup` put the node's parts (passed in by xtask).
#[derive(Clone)]
pub struct Parts {
    pub bin_dir: PathBuf,
    pub cni_dir: PathBuf,
    pub pythonpath: PathBuf,
    pub python: PathBuf,
    pub k8s_version: String,
}

impl Parts {
    pub fn from_env() -> Result<Parts> {
        let var = |n: &str| {
            std::env::var_os(n).map(PathBuf::from).with_context(|| {
                format!("{n} is not set: run through `cargo xtask test|demo|bench`, which builds the node's parts first")
            })
        };
        let p = Parts {
            bin_dir: var("PORTCULLIS_NODE_BIN_DIR")?,
            cni_dir: var("PORTCULLIS_CNI_BIN_DIR")?,
            pythonpath: var("PORTCULLIS_PYTHONPATH")?,
            python: var("PORTCULLIS_PYTHON")?,
            k8s_version: var("PORTCULLIS_K8S_VERSION")?.display().to_string(),
        };
        for b in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kube-proxy",
            "kubelet",
            "kubectl",
            "containerd",
            "containerd-shim-runc-v2",
            "ctr",
            "runc",
            "pause",
        ] {
            ensure!(
                p.bin_dir.join(b).exists(),
                "{} missing: run `cargo xtask setup`",
                p.bin_dir.join(b).display()
            );
        }
        Ok(p)
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// What the caller wants of the node.
#[derive(Default)]
pub struct Options {
    /// More CAs for the cluster's root CA bundle (what `kube-root-ca.crt`, and so every
    /// pod's `ca.crt`, holds): e.g. the gate's interception CA, which is how unmodified
    /// agents come to trust it on a cluster whose operator controls `--root-ca-file`.
    pub extra_trusted_cas: Vec<PathBuf>,
    /// Extra apiserver flags (feature gates).
    pub apiserver_flags: Vec<String>,
    /// Test binaries to put into the agent image at /usr/local/bin.
    pub agent_bins: Vec<PathBuf>,
    /// More images to import (e.g. the Portcullis image for the DaemonSet).
    pub images: Vec<Image>,
}

/// Timings of the start, for the run's report.
pub struct Timings(pub Vec<(&'static str, Duration)>);

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64()))
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}

pub struct Node {
    pub dir: PathBuf,
    pub parts: Parts,
    pub pki: pki::Pki,
    pub ca_pem: PathBuf,
    pub admin_token: String,
    pub daemon_token_file: PathBuf,
    pub audit_log: PathBuf,
    pub admin_kubeconfig: PathBuf,
    pub timings: Timings,
    children: Vec<(String, Child)>,
    _lock: std::fs::File,
}

/// The node's fixed directory (one node at a time), outside the repository.
pub fn node_dir() -> PathBuf {
    std::env::temp_dir().join("portcullis-node")
}

pub fn bpffs_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/portcullis-node")
}

fn sysctl_save() -> PathBuf {
    std::env::temp_dir().join("portcullis-node.sysctls.json")
}

fn bpffs_save() -> PathBuf {
    std::env::temp_dir().join("portcullis-node.bpffs.json")
}

/// Takes the one-node lock (a second harness would fight over the netns, the cgroup
/// root and the ports): waits up to 30 minutes for a running one to finish, saying so.
fn lock() -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join("portcullis-node.lock");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    let mut said = false;
    loop {
        // SAFETY: flock(2) on a descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            break;
        }
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        if Instant::now() > deadline {
            bail!(
                "another node harness (pid {}) held {} for 30 minutes; only one node runs at a time",
                holder.trim(),
                path.display()
            );
        }
        if !said {
            eprintln!(
                "node: waiting for another node harness (pid {}) to finish",
                holder.trim()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    f.set_len(0)?;
    write!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Cleans what a killed run left (processes, mounts, netns, cgroups, pins, sysctls).
pub fn clean_leftovers() -> Result<Vec<String>> {
    host::clean(&node_dir(), &bpffs_dir(), &sysctl_save(), &bpffs_save())
}

impl Node {
    pub fn start(opts: Options) -> Result<Node> {
        let parts = Parts::from_env()?;
        let lock = lock()?;
        let mut timings = Vec::new();
        let t = Instant::now();
        let found = clean_leftovers()?;
        let cleanup = t.elapsed();
        if !found.is_empty() {
            eprintln!(
                "node: cleaned leftovers of an earlier run: {}",
                found.join("; ")
            );
        }
        let dir = node_dir();
        std::fs::create_dir_all(dir.join("logs"))?;
        let t = Instant::now();
        let node = Self::start_inner(dir, parts, opts, lock, &mut timings);
        match node {
            Ok(mut n) => {
                n.timings.0.insert(0, ("cleanup", cleanup));
                n.timings.0.push(("total", t.elapsed()));
                Ok(n)
            }
            Err(e) => {
                // Keep the logs for the error message, then undo everything.
                let logs = tail_logs(&node_dir().join("logs"));
                let _ = clean_leftovers();
                Err(e.context(logs))
            }
        }
    }

    fn start_inner(
        dir: PathBuf,
        parts: Parts,
        opts: Options,
        lock: std::fs::File,
        timings: &mut Vec<(&'static str, Duration)>,
    ) -> Result<Node> {
        let step = |timings: &mut Vec<(&'static str, Duration)>, name, t: Instant| {
            timings.push((name, t.elapsed()));
        };
        let t = Instant::now();
        ip(&["netns", "add", NETNS])?;
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            NETNS,
            "addr",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            "lo",
        ])?;
        // The Service range needs a route for connections made on the node (the
        // apiserver calling a webhook, a host-network pod using the ClusterIP): kube-
        // proxy's rules rewrite them to pod addresses once routed. `lo`, so nothing can
        // leave (nodes elsewhere route it by their default route).
        ip(&["-n", NETNS, "route", "add", SERVICE_CIDR, "dev", "lo"])?;
        host::make_cgroup_root()?;
        host::save_sysctls(&sysctl_save())?;
        host::save_bpffs(&bpffs_save())?;

        // PKI, tokens, kubeconfigs.
        let pki = pki::Pki::new()?;
        let p = dir.join("pki");
        std::fs::create_dir_all(&p)?;
        let ca_pem = p.join("ca.crt");
        write(&ca_pem, &pki.ca_cert)?;
        let mut bundle = pki.ca_cert.clone();
        for extra in &opts.extra_trusted_cas {
            bundle.push_str(
                &std::fs::read_to_string(extra)
                    .with_context(|| format!("reading {}", extra.display()))?,
            );
        }
        write(&p.join("root-ca-bundle.crt"), &bundle)?;
        pki.server(
            "kube-apiserver",
            &[
                NODE_IP,
                "10.96.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )?
        .write(&p, "apiserver")?;
        pki.server(NODE_NAME, &[NODE_IP, NODE_NAME])?
            .write(&p, "kubelet-serving")?;
        pki.client("kube-apiserver-kubelet-client", Some("system:masters"))?
            .write(&p, "apiserver-kubelet-client")?;
        for (name, user, group) in [
            ("kubelet", "system:node:pc-node", Some("system:nodes")),
            ("kcm", "system:kube-controller-manager", None),
            ("scheduler", "system:kube-scheduler", None),
            ("kube-proxy", "system:kube-proxy", None),
            ("admin", "pc-e2e-admin-cert", Some("system:masters")),
        ] {
            pki.client(user, group)?.write(&p, name)?;
            write(
                &p.join(format!("{name}.kubeconfig")),
                &cert_kubeconfig(
                    &ca_pem,
                    &p.join(format!("{name}.crt")),
                    &p.join(format!("{name}.key")),
                ),
            )?;
        }
        let sa = rcgen::KeyPair::generate()?;
        write(&p.join("sa.key"), &sa.serialize_pem())?;
        write(&p.join("sa.pub"), &sa.public_key_pem())?;
        let admin_token = random_token();
        // Shaped as an installed daemon's own (the benchmarks' proxies send it).
        let daemon_token = service_account_shaped_token("portcullis-system", "portcullis");
        write(
            &p.join("tokens.csv"),
            &format!(
                "{admin_token},{ADMIN_TOKEN_USER},uid-admin,\"system:masters\"\n{daemon_token},{DAEMON_USER},uid-daemon\n"
            ),
        )?;
        let daemon_token_file = p.join("daemon.token");
        write(&daemon_token_file, &daemon_token)?;
        write(
            &dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n",
        )?;
        step(timings, "pki", t);

        let mut node = Node {
            audit_log: dir.join("logs/apiserver-audit.log"),
            admin_kubeconfig: p.join("admin.kubeconfig"),
            dir,
            parts,
            pki,
            ca_pem,
            admin_token,
            daemon_token_file,
            timings: Timings(Vec::new()),
            children: Vec::new(),
            _lock: lock,
        };
        let t = Instant::now();
        node.start_control_plane(&opts)?;
        step(timings, "control plane", t);
        let t = Instant::now();
        node.start_containerd()?;
        step(timings, "containerd", t);
        let t = Instant::now();
        node.import_images(&opts)?;
        step(timings, "images", t);
        let t = Instant::now();
        node.start_kubelet_and_proxy()?;
        node.wait_node_ready()?;
        step(timings, "node ready", t);
        node.timings = Timings(std::mem::take(timings));
        Ok(node)
    }

    fn d(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("logs/{name}.log")))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{NETNS}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Fails with the component's log if any started component has exited.
    fn check_alive(&mut self) -> Result<()> {
        for (name, c) in &mut self.children {
            if let Some(st) = c.try_wait()? {
                let log = std::fs::read_to_string(self.dir.join(format!("logs/{name}.log")))
                    .unwrap_or_default();
                bail!("{name} exited ({st}):\n{}", last_lines(&log, 25));
            }
        }
        Ok(())
    }

    fn wait(&mut self, what: &str, secs: u64, mut ok: impl FnMut(&Node) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if ok(self) {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("{what}: not ready after {secs} s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn start_control_plane(&mut self, opts: &Options) -> Result<()> {
        let b = |n: &str| self.parts.bin(n);
        let (etcd, apiserver, kcm, scheduler) = (
            b("etcd"),
            b("kube-apiserver"),
            b("kube-controller-manager"),
            b("kube-scheduler"),
        );
        let args = |v: &[String]| v.to_vec();
        self.spawn(
            "etcd",
            &etcd,
            &args(&[
                "--name=pc-node".into(),
                format!("--data-dir={}", self.d("etcd")),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=pc-node=http://127.0.0.1:2380".into(),
                "--log-level=warn".into(),
            ]),
            &[],
        )?;
        let mut a: Vec<String> = vec![
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--bind-address={NODE_IP}"),
            format!("--secure-port={API_PORT}"),
            format!("--advertise-address={NODE_IP}"),
            format!("--tls-cert-file={}", self.d("pki/apiserver.crt")),
            format!("--tls-private-key-file={}", self.d("pki/apiserver.key")),
            format!("--client-ca-file={}", self.d("pki/ca.crt")),
            format!("--token-auth-file={}", self.d("pki/tokens.csv")),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            format!("--service-account-issuer={SA_ISSUER}"),
            format!("--service-account-key-file={}", self.d("pki/sa.pub")),
            format!(
                "--service-account-signing-key-file={}",
                self.d("pki/sa.key")
            ),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!(
                "--kubelet-client-certificate={}",
                self.d("pki/apiserver-kubelet-client.crt")
            ),
            format!(
                "--kubelet-client-key={}",
                self.d("pki/apiserver-kubelet-client.key")
            ),
            format!("--kubelet-certificate-authority={}", self.d("pki/ca.crt")),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--audit-policy-file={}", self.d("audit-policy.yaml")),
            format!("--audit-log-path={}", self.audit_log.display()),
            format!("--cert-dir={}", self.d("apiserver-certs")),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        a.extend(opts.apiserver_flags.iter().cloned());
        self.spawn("kube-apiserver", &apiserver, &a, &[])?;
        self.wait("kube-apiserver /readyz", 90, |n| {
            n.kubectl(&["get", "--raw", "/readyz"])
                .map(|o| o.status.success())
                .unwrap_or(false)
        })?;
        let kc = self.d("pki/kcm.kubeconfig");
        self.spawn(
            "kube-controller-manager",
            &kcm,
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                format!(
                    "--service-account-private-key-file={}",
                    self.d("pki/sa.key")
                ),
                format!("--root-ca-file={}", self.d("pki/root-ca-bundle.crt")),
                "--use-service-account-credentials=true".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--cert-dir={}", self.d("kcm-certs")),
                "--v=1".into(),
            ],
            &[],
        )?;
        let kc = self.d("pki/scheduler.kubeconfig");
        self.spawn(
            "kube-scheduler",
            &scheduler,
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--v=1".into(),
            ],
            &[],
        )?;
        Ok(())
    }

    fn start_containerd(&mut self) -> Result<()> {
        let cni_conf = self.dir.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf)?;
        write(
            &cni_conf.join("10-portcullis.conflist"),
            &serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "portcullis-node",
                "plugins": [
                    {
                        "type": "bridge", "bridge": "cni0", "isGateway": true,
                        "ipMasq": false, "hairpinMode": true,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_SUBNET}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": self.d("cni/ipam"),
                        }
                    },
                    {"type": "portmap", "capabilities": {"portMappings": true}}
                ]
            })
            .to_string(),
        )?;
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{PAUSE_IMAGE}'
[plugins.'io.containerd.cri.v1.runtime']
  # runc cannot set oom_score_adj below the parent's without CAP_SYS_RESOURCE, which
  # no process on these machines has (see shared/notes/real-node.md).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = '{runc}'
      Root = '{runc_root}'
      SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{cni_bin}']
    conf_dir = '{cni_conf}'
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
"#,
            root = self.d("containerd/root"),
            state = self.d("containerd/state"),
            sock = self.containerd_sock().display(),
            runc = self.parts.bin("runc").display(),
            runc_root = self.d("runc"),
            cni_bin = self.parts.cni_dir.display(),
            cni_conf = cni_conf.display(),
        );
        write(&self.dir.join("containerd.toml"), &config)?;
        let path = format!(
            "{}:{}",
            self.parts.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let containerd = self.parts.bin("containerd");
        let cfg = self.d("containerd.toml");
        self.spawn(
            "containerd",
            &containerd,
            &[format!("--config={cfg}")],
            &[("PATH", path)],
        )?;
        let sock = self.containerd_sock();
        self.wait("containerd", 30, |_| sock.exists())
    }

    pub fn containerd_sock(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// `ctr` against the node's containerd, namespace k8s.io.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        sh(Command::new(self.parts.bin("ctr"))
            .arg("-a")
            .arg(self.containerd_sock())
            .args(["-n", "k8s.io"])
            .args(args))
    }

    fn import_images(&self, opts: &Options) -> Result<()> {
        let dir = self.dir.join("images");
        std::fs::create_dir_all(&dir)?;
        let mut pause = Image::new(PAUSE_IMAGE, &["/pause"]);
        pause.file(self.parts.bin("pause"), "/pause")?;
        let mut workload = Image::new(WORKLOAD_IMAGE, &["/bin/sh"]);
        workload.busybox()?;
        let agent = self.agent_image(opts)?;
        let mut all = vec![
            ("pause", &pause),
            ("workload", &workload),
            ("agent", &agent),
        ];
        all.extend(opts.images.iter().map(|i| ("extra", i)));
        for (name, img) in all {
            let tar = dir.join(format!("{name}.tar"));
            img.write(&tar)
                .with_context(|| format!("writing image {}", img.tag))?;
            self.ctr(&["images", "import", "--local", &tar.display().to_string()])
                .with_context(|| format!("importing {}", img.tag))?;
            std::fs::remove_file(&tar)?;
        }
        Ok(())
    }

    /// The agent's image: unmodified kubectl of the cluster's version, the Python
    /// runtime of this machine with the `kubernetes` client, busybox (sh, tar for
    /// `kubectl cp`), the test helpers, and the libraries they load.
    fn agent_image(&self, opts: &Options) -> Result<Image> {
        let mut img = Image::new(AGENT_IMAGE, &["/bin/sh"]);
        img.busybox()?
            .file(self.parts.bin("kubectl"), "/usr/local/bin/kubectl")?;
        for b in &opts.agent_bins {
            let name = b.file_name().context("agent binary without a name")?;
            img.file(b, Path::new("/usr/local/bin").join(name))?;
        }
        // Python at the same absolute paths as here, so it finds its prefix as it does
        // on this machine.
        let py = &self.parts.python;
        let info = sh(Command::new(py).args([
            "-c",
            "import sys, sysconfig; print(sys.base_prefix); print(sysconfig.get_paths()['stdlib']); \
             print(sysconfig.get_config_var('LIBDIR') or '')",
        ]))?;
        let mut lines = info.lines();
        let (_prefix, stdlib, libdir) = (
            lines.next().unwrap_or_default(),
            lines.next().unwrap_or_default().to_string(),
            lines.next().unwrap_or_default().to_string(),
        );
        img.same_path(py)?;
        img.symlink("/usr/local/bin/python3", py);
        img.tree(
            Path::new(&stdlib),
            Path::new(&stdlib),
            &[
                "test",
                "tests",
                "idlelib",
                "tkinter",
                "turtledemo",
                "ensurepip",
                "lib2to3",
                "site-packages",
                "dist-packages",
                "__pycache__",
                "config-3.11-x86_64-linux-gnu",
            ],
        )?;
        if !libdir.is_empty()
            && let Ok(rd) = std::fs::read_dir(&libdir)
        {
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("libpython") && name.contains(".so") {
                    img.file(e.path(), e.path())?;
                }
            }
        }
        img.tree(
            &self.parts.pythonpath,
            Path::new("/opt/python-kubernetes"),
            &["__pycache__"],
        )?;
        img.env("PYTHONPATH=/opt/python-kubernetes");
        img.env("HOME=/work/home");
        img.with_libraries()?;
        Ok(img)
    }

    fn start_kubelet_and_proxy(&mut self) -> Result<()> {
        write(&self.dir.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let kubelet_cfg = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
cgroupRoot: /{CGROUP_ROOT}
# This machine mounts cgroup v1 controllers (hybrid); 1.35+ kubelets refuse v1 unless told.
failCgroupV1: false
containerRuntimeEndpoint: unix://{sock}
tlsCertFile: {dir}/pki/kubelet-serving.crt
tlsPrivateKeyFile: {dir}/pki/kubelet-serving.key
resolvConf: {dir}/resolv.conf
podLogsDir: {dir}/pod-logs
volumePluginDir: {dir}/kubelet-plugins
failSwapOn: false
# No eviction and no image GC: the images cannot be pulled again.
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDomain: cluster.local
"#,
            ca = self.d("pki/ca.crt"),
            sock = self.containerd_sock().display(),
            dir = self.dir.display(),
        );
        write(&self.dir.join("kubelet.yaml"), &kubelet_cfg)?;
        let kubelet = self.parts.bin("kubelet");
        let args = vec![
            format!("--config={}", self.d("kubelet.yaml")),
            format!("--kubeconfig={}", self.d("pki/kubelet.kubeconfig")),
            format!("--root-dir={}", self.d("kubelet")),
            format!("--node-ip={NODE_IP}"),
            format!("--hostname-override={NODE_NAME}"),
            "--v=1".into(),
        ];
        self.spawn("kubelet", &kubelet, &args, &[])?;
        let proxy_cfg = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {{kubeconfig: {kc}}}
hostnameOverride: {NODE_NAME}
clusterCIDR: 10.244.0.0/16
# Leave the conntrack sysctls alone (some are global).
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
"#,
            kc = self.d("pki/kube-proxy.kubeconfig"),
        );
        write(&self.dir.join("kube-proxy.yaml"), &proxy_cfg)?;
        let proxy = self.parts.bin("kube-proxy");
        let a = vec![format!("--config={}", self.d("kube-proxy.yaml"))];
        self.spawn("kube-proxy", &proxy, &a, &[])
    }

    fn wait_node_ready(&mut self) -> Result<()> {
        self.wait("node Ready", 120, |n| {
            n.kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])
            .map(|o| o.stdout == b"True")
            .unwrap_or(false)
        })?;
        // kube-proxy has programmed the kubernetes Service once its rules exist.
        self.wait("kube-proxy rules for the kubernetes Service", 60, |_| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    NETNS,
                    "nft",
                    "list",
                    "table",
                    "ip",
                    "kube-proxy",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("10.96.0.1"))
                .unwrap_or(false)
        })
    }

    /// kubectl as the cluster admin (client certificate), from the node.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{NETNS}"))
            .arg(self.parts.bin("kubectl"))
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .args(args)
            .env("HOME", self.dir.join("home-admin"));
        c
    }

    /// kubectl as the admin; fails with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.kubectl(args)?;
        if !o.status.success() {
            bail!(
                "kubectl {args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Applies a manifest as the admin.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let mut c = self.kubectl_cmd(&["apply", "-f", "-"]);
        let o = run_with_stdin(&mut c, yaml)?;
        ensure!(
            o.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        Ok(())
    }

    /// Waits for a namespace's default service account (admission needs it for pods).
    pub fn wait_service_account(&mut self, ns: &str, name: &str) -> Result<()> {
        self.wait(&format!("service account {ns}/{name}"), 60, |n| {
            n.kubectl(&["-n", ns, "get", "serviceaccount", name])
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
    }

    /// Waits until a pod is Ready; returns its UID.
    pub fn wait_pod_ready(&mut self, ns: &str, pod: &str) -> Result<String> {
        let r = self.wait(&format!("pod {ns}/{pod}"), 90, |n| {
            n.kubectl(&[
                "-n",
                ns,
                "get",
                "pod",
                pod,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])
            .map(|o| o.stdout == b"True")
            .unwrap_or(false)
        });
        if let Err(e) = r {
            let desc = self
                .kubectl(&["-n", ns, "describe", "pod", pod])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            return Err(e.context(last_lines(&desc, 30)));
        }
        self.pod_uid(ns, pod)
    }

    pub fn pod_uid(&self, ns: &str, pod: &str) -> Result<String> {
        let uid = self.kubectl_ok(&[
            "-n",
            ns,
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        ensure!(uid.len() == 36, "pod {ns}/{pod} uid `{uid}`");
        Ok(uid)
    }

    /// The pod's cgroup v2 directory (runc creates it when the sandbox starts, under
    /// the kubelet's `<cgroupRoot>/kubepods[/<qos>]/pod<UID>`).
    pub fn pod_cgroup(&self, uid: &str) -> Result<PathBuf> {
        let kubepods = host::cgroup2_mount()
            .context("no cgroup2 mount")?
            .join(CGROUP_ROOT)
            .join("kubepods");
        let name = format!("pod{uid}");
        for qos in ["", "burstable", "besteffort"] {
            let p = kubepods.join(qos).join(&name);
            if p.is_dir() {
                return Ok(p);
            }
        }
        bail!("no cgroup v2 directory {name} under {}", kubepods.display())
    }

    /// A command run inside a pod's container, by `kubectl exec` through the API
    /// server and the kubelet (as the admin, from the node).
    pub fn exec_cmd(&self, ns: &str, pod: &str, container: &str, argv: &[&str]) -> Command {
        let mut args = vec!["exec", "-i", "-n", ns, pod, "-c", container, "--"];
        args.extend_from_slice(argv);
        self.kubectl_cmd(&args)
    }

    /// Writes `text` to `path` inside a pod's container.
    pub fn copy_into(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        path: &str,
        text: &str,
    ) -> Result<()> {
        let script =
            format!("mkdir -p \"$(dirname '{path}')\" && cat > '{path}' && wc -c < '{path}'");
        let mut c = self.exec_cmd(ns, pod, container, &["sh", "-c", &script]);
        let o = run_with_stdin(&mut c, text)?;
        ensure!(
            o.status.success(),
            "writing {path} into {ns}/{pod}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let written = String::from_utf8_lossy(&o.stdout).trim().to_string();
        ensure!(
            written == text.len().to_string(),
            "writing {path} into {ns}/{pod}: {written} of {} bytes arrived",
            text.len()
        );
        Ok(())
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("logs/{name}.log"))).unwrap_or_default()
    }

    /// Stops one component (e.g. the apiserver, for the outage case).
    pub fn stop(&mut self, name: &str) {
        for (n, c) in &mut self.children {
            if n == name {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// A server certificate from the cluster CA (for the benchmark's nginx, the IdP);
    /// returns (cert, key) paths.
    pub fn issue_server_cert(&self, name: &str, names: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let pair = self.pki.server(name, names)?;
        let p = self.dir.join("pki");
        pair.write(&p, name)?;
        Ok((p.join(format!("{name}.crt")), p.join(format!("{name}.key"))))
    }

    /// A command in the node's network namespace (not in any pod).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{NETNS}")).arg(program);
        c
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Components first, in reverse order (kubelet before containerd before the
        // apiserver), then whatever they left.
        for (_, c) in self.children.iter_mut().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(3);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("PORTCULLIS_KEEP_NODE").is_some() {
            eprintln!(
                "node: PORTCULLIS_KEEP_NODE set; logs kept in {}",
                self.dir.display()
            );
            let keep = std::env::temp_dir().join("portcullis-node-logs");
            let _ = std::fs::remove_dir_all(&keep);
            let _ = Command::new("cp")
                .arg("-r")
                .arg(self.dir.join("logs"))
                .arg(&keep)
                .status();
        }
        match clean_leftovers() {
            Ok(_) => {}
            Err(e) => eprintln!("node: cleanup failed: {e:#}"),
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args)).map(drop)
}

pub fn sh(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a command")?;
    let mut si = child.stdin.take().context("stdin")?;
    let input = input.to_string();
    let writer = std::thread::spawn(move || {
        let _ = si.write_all(input.as_bytes());
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out)
}

fn last_lines(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// The last lines of every component log (for a start that failed).
fn tail_logs(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        for p in names {
            if p.extension().is_some_and(|e| e == "log") && !p.ends_with("apiserver-audit.log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                out.push_str(&format!(
                    "--- {} (last lines)\n{}\n",
                    p.display(),
                    last_lines(&text, 8)
                ));
            }
        }
    }
    out
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b
}

pub fn random_token() -> String {
    random_bytes::<24>()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A bearer token of the size and shape of an installed daemon's projected
/// service-account token (a JWT of ~1.2 KB: RS256 as kubeadm's clusters sign them,
/// the claims a pod-bound token carries), with a random id and signature. Only its
/// shape is real: the test node's API server knows it from its static token file.
/// The proxies measured by the benchmarks send it upstream on every request, and its
/// size is a cost (HTTP/2's HPACK never indexes `Authorization`).
pub fn service_account_shaped_token(namespace: &str, account: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let uid = || {
        let h = hex(&random_bytes::<16>());
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    };
    let header = serde_json::json!({"alg": "RS256", "kid": b64.encode(random_bytes::<32>())});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = serde_json::json!({
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        // A year, as the API server extends a projected token by default
        // (`--service-account-extend-token-expiration`), warning after the 3,607 s
        // the kubelet asked for (`warnafter`).
        "exp": now + 365 * 86_400, "iat": now, "nbf": now,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "jti": uid(),
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": NODE_NAME, "uid": uid()},
            "pod": {"name": format!("{account}-7x2kq"), "uid": uid()},
            "serviceaccount": {"name": account, "uid": uid()},
            "warnafter": now + 3607
        },
        "sub": format!("system:serviceaccount:{namespace}:{account}")
    });
    format!(
        "{}.{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string()),
        b64.encode(random_bytes::<256>())
    )
}

fn cert_kubeconfig(ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{NODE_IP}:{API_PORT}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
        ca.display(),
        cert.display(),
        key.display()
    )
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    /// The shape the benchmarks' figures rest on: an installed daemon's token size, a
    /// JWT's three base64url parts, nothing a static token file's CSV line or an
    /// `Authorization` header would break on.
    #[test]
    fn the_daemon_token_is_shaped_like_a_projected_one() {
        let t = super::service_account_shaped_token("portcullis-system", "portcullis");
        assert!((1_000..=1_400).contains(&t.len()), "{} bytes", t.len());
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).expect("base64url")).expect("JSON");
        assert_eq!(
            claims["sub"],
            "system:serviceaccount:portcullis-system:portcullis"
        );
        assert!(claims["exp"].as_u64() > claims["iat"].as_u64());
        assert_eq!(b64.decode(parts[2]).expect("base64url").len(), 256);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        );
        assert_ne!(
            t,
            super::service_account_shaped_token("portcullis-system", "portcullis")
        );
    }
}
