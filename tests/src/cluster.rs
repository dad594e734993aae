//! A real Kubernetes control plane inside a lab's API namespace: Debian's etcd, the
//! kube-apiserver and kube-controller-manager built by `cargo xtask setup` (see
//! xtask/src/upstream.rs), and the test-only pc-fake-kubelet for exec and logs. PKI,
//! tokens and RBAC are generated per run; every process is stopped on drop.
//!
//! ```text
//!  netns B (API): etcd 127.0.0.1:2379, kube-apiserver 10.S.2.2:6443,
//!                 kube-controller-manager, pc-fake-kubelet 127.0.0.1:10250
//! ```
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::{Lab, bin};

/// Where `cargo xtask setup` put the real parts (passed in by xtask).
pub struct Parts {
    pub kube_bin_dir: PathBuf,
    pub kubectl: PathBuf,
    pub pythonpath: PathBuf,
}

impl Parts {
    pub fn from_env() -> Result<Parts> {
        let var = |n: &str| {
            std::env::var_os(n).map(PathBuf::from).with_context(|| {
                format!("{n} is not set: run the e2e tier through `cargo xtask test`, which builds and installs the real API server and clients")
            })
        };
        let p = Parts {
            kube_bin_dir: var("PORTCULLIS_KUBE_BIN_DIR")?,
            kubectl: var("PORTCULLIS_KUBECTL")?,
            pythonpath: var("PORTCULLIS_PYTHONPATH")?,
        };
        for b in [
            "kube-apiserver",
            "kube-controller-manager",
            "pc-fake-kubelet",
        ] {
            if !p.kube_bin_dir.join(b).exists() {
                bail!(
                    "{} missing: run `cargo xtask setup`",
                    p.kube_bin_dir.join(b).display()
                );
            }
        }
        Ok(p)
    }
}

/// Names and secrets of the generated cluster.
pub const ADMIN_TOKEN_USER: &str = "pc-e2e-admin";
pub const DAEMON_USER: &str = "portcullis-daemon";
pub const AGENT_USER: &str = "portcullis:agent";
pub const AGENT_GROUP: &str = "portcullis:agents";
pub const NAMESPACE: &str = "e2e";
pub const NODE: &str = "pc-node";
pub const POD: &str = "work";

pub struct Cluster {
    pub dir: PathBuf,
    pub ns: String,
    pub api_ip: IpAddr,
    pub parts: Parts,
    pub ca_pem: PathBuf,
    pub admin_token: String,
    pub daemon_token_file: PathBuf,
    pub audit_log: PathBuf,
    pki: Pki,
    children: Vec<(String, Child)>,
}

struct Pki {
    ca_cert: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Result<Pki> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "pc-e2e cluster CA");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(2);
        let cert = p.self_signed(&key)?;
        Ok(Pki {
            ca_cert: cert.pem(),
            issuer: Issuer::new(p, key),
        })
    }

    /// (cert PEM, key PEM) for a server or client.
    fn leaf(&self, cn: &str, names: &[&str], server: bool) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*n).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(2);
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n";

impl Cluster {
    /// Starts etcd, the apiserver, the controller manager and the fake kubelet in the
    /// lab's API namespace, then creates the e2e namespace, RBAC, a Node and a Pod.
    pub fn start(lab: &Lab, parts: Parts) -> Result<Cluster> {
        let dir = lab.dir.join("cluster");
        std::fs::create_dir_all(&dir)?;
        let api_ip = lab.api().ip();
        let pki = Pki::new()?;
        let ca_pem = dir.join("ca.crt");
        write(&ca_pem, &pki.ca_cert)?;
        let api_ip_s = api_ip.to_string();
        let (c, k) = pki.leaf(
            "kube-apiserver",
            &[
                &api_ip_s,
                "127.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            true,
        )?;
        write(&dir.join("apiserver.crt"), &c)?;
        write(&dir.join("apiserver.key"), &k)?;
        let (c, k) = pki.leaf(NODE, &["127.0.0.1"], true)?;
        write(&dir.join("kubelet.crt"), &c)?;
        write(&dir.join("kubelet.key"), &k)?;
        let sa = KeyPair::generate()?;
        write(&dir.join("sa.key"), &sa.serialize_pem())?;
        write(&dir.join("sa.pub"), &sa.public_key_pem())?;

        let admin_token = random_token();
        let daemon_token = random_token();
        write(
            &dir.join("tokens.csv"),
            &format!(
                "{admin_token},{ADMIN_TOKEN_USER},uid-admin,\"system:masters\"\n{daemon_token},{DAEMON_USER},uid-daemon\n"
            ),
        )?;
        let daemon_token_file = dir.join("daemon.token");
        write(&daemon_token_file, &daemon_token)?;
        write(&dir.join("audit-policy.yaml"), AUDIT_POLICY)?;
        let audit_log = dir.join("audit.log");

        let mut cl = Cluster {
            dir: dir.clone(),
            ns: lab.ns_api().to_string(),
            api_ip,
            parts,
            ca_pem,
            admin_token,
            daemon_token_file,
            audit_log,
            pki,
            children: Vec::new(),
        };
        cl.spawn(
            "etcd",
            Command::new("etcd").args([
                "--name=pc-e2e",
                &format!("--data-dir={}", dir.join("etcd").display()),
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=pc-e2e=http://127.0.0.1:2380",
                "--log-level=warn",
            ]),
        )?;
        let d = |f: &str| dir.join(f).display().to_string();
        let apiserver = cl.parts.kube_bin_dir.join("kube-apiserver");
        cl.spawn(
            "kube-apiserver",
            Command::new(apiserver).args([
                "--etcd-servers=http://127.0.0.1:2379".to_string(),
                format!("--bind-address={api_ip}"),
                "--secure-port=6443".into(),
                "--insecure-port=0".into(),
                format!("--advertise-address={api_ip}"),
                "--endpoint-reconciler-type=none".into(),
                format!("--cert-dir={}", d("certs")),
                format!("--tls-cert-file={}", d("apiserver.crt")),
                format!("--tls-private-key-file={}", d("apiserver.key")),
                format!("--client-ca-file={}", d("ca.crt")),
                format!("--token-auth-file={}", d("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--audit-policy-file={}", d("audit-policy.yaml")),
                format!("--audit-log-path={}", d("audit.log")),
                "--profiling=false".into(),
                "--v=1".into(),
            ]),
        )?;
        cl.wait_ready()?;
        // The controller manager talks to the apiserver with the admin token.
        let kcm_kubeconfig = dir.join("kcm.kubeconfig");
        write(
            &kcm_kubeconfig,
            &kubeconfig(
                &format!("https://{api_ip}:6443"),
                &cl.ca_pem,
                &cl.admin_token,
                None,
            ),
        )?;
        let kcm = cl.parts.kube_bin_dir.join("kube-controller-manager");
        cl.spawn(
            "kube-controller-manager",
            Command::new(kcm).args([
                format!("--kubeconfig={}", kcm_kubeconfig.display()),
                format!("--service-account-private-key-file={}", d("sa.key")),
                format!("--root-ca-file={}", d("ca.crt")),
                "--controllers=namespace,garbagecollector,serviceaccount,serviceaccount-token,deployment,replicaset,clusterrole-aggregation".into(),
                "--leader-elect=false".into(),
                "--port=0".into(),
                format!("--cert-dir={}", d("kcm-certs")),
                "--v=1".into(),
            ]),
        )?;
        let kubelet = cl.parts.kube_bin_dir.join("pc-fake-kubelet");
        cl.spawn(
            "pc-fake-kubelet",
            Command::new(kubelet).args([
                "--listen=127.0.0.1:10250".to_string(),
                format!("--cert={}", d("kubelet.crt")),
                format!("--key={}", d("kubelet.key")),
            ]),
        )?;
        cl.seed()?;
        Ok(cl)
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for (name, c) in &mut self.children {
                if let Some(st) = c.try_wait()? {
                    bail!("{name} exited ({st}):\n{}", {
                        let t = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                            .unwrap_or_default();
                        t.lines().rev().take(20).collect::<Vec<_>>().join("\n")
                    });
                }
            }
            if let Ok(o) = self.kubectl_admin(&["get", "--raw", "/readyz"])
                && o.status.success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after 60 s:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A server certificate from the cluster CA (for the benchmark's nginx); returns
    /// (cert, key) paths.
    pub fn issue_server_cert(&self, name: &str, names: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let (c, k) = self.pki.leaf(name, names, true)?;
        let (cp, kp) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        write(&cp, &c)?;
        write(&kp, &k)?;
        Ok((cp, kp))
    }

    /// Applies a manifest as the admin.
    pub fn apply_admin(&self, yaml: &str, name: &str) -> Result<()> {
        self.apply(yaml, name)
    }

    /// The cluster's real address, as dialled from the node.
    pub fn url(&self) -> String {
        format!("https://{}:6443", self.api_ip)
    }

    /// Writes a kubeconfig for `server` with `ca` and `token` (and `impersonate`).
    pub fn write_kubeconfig(
        &self,
        name: &str,
        server: &str,
        ca: &Path,
        token: &str,
        impersonate: Option<(&str, &str)>,
    ) -> Result<PathBuf> {
        let p = self.dir.join(format!("{name}.kubeconfig"));
        write(&p, &kubeconfig(server, ca, token, impersonate))?;
        Ok(p)
    }

    /// kubectl with the admin token straight at the apiserver, from the API namespace.
    pub fn kubectl_admin(&self, args: &[&str]) -> Result<Output> {
        let kc = self.dir.join("admin.kubeconfig");
        if !kc.exists() {
            write(
                &kc,
                &kubeconfig(&self.url(), &self.ca_pem, &self.admin_token, None),
            )?;
        }
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(&self.parts.kubectl)
            .arg(format!("--kubeconfig={}", kc.display()))
            .args(args)
            .env("HOME", self.dir.join("home-admin"))
            .stdin(Stdio::null())
            .output()?;
        Ok(out)
    }

    fn admin_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.kubectl_admin(args)?;
        if !o.status.success() {
            bail!(
                "kubectl {args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn apply(&self, yaml: &str, name: &str) -> Result<()> {
        let f = self.dir.join(format!("{name}.yaml"));
        write(&f, yaml)?;
        self.admin_ok(&["apply", "-f", &f.display().to_string()])
            .map(drop)
    }

    /// Namespace, RBAC for the daemon (impersonate) and the scoped agent identity, a
    /// Node pointing at the fake kubelet, and a Pod on it.
    fn seed(&self) -> Result<()> {
        self.apply(&seed_yaml(), "seed")?;
        // Admission needs the namespace's default service account (controller made).
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .admin_ok(&["-n", NAMESPACE, "get", "serviceaccount", "default"])
            .is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "no default service account in {NAMESPACE} after 60 s:\n{}",
                    self.log_tail("kube-controller-manager")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.apply(&pod_yaml(), "pod")
    }

    /// A real projected service-account token for the agent (TokenRequest API), for
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
        let f = self
            .dir
            .join(format!("tokenrequest-{}.json", random_token()));
        write(
            &f,
            &serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
                .to_string(),
        )?;
        let out = self.admin_ok(&[
            "-n",
            NAMESPACE,
            "create",
            "--raw",
            "/api/v1/namespaces/e2e/serviceaccounts/agent/token",
            "-f",
            &f.display().to_string(),
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .context("TokenRequest returned no token")
    }

    /// A pod's UID.
    pub fn pod_uid(&self, name: &str) -> Result<String> {
        let out = self.admin_ok(&[
            "-n",
            NAMESPACE,
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        anyhow::ensure!(out.len() == 36, "pod {name} uid `{out}`");
        Ok(out)
    }

    /// Creates another Pod on the fake node.
    pub fn create_pod(&self, name: &str) -> Result<String> {
        self.apply(
            &pod_yaml().replace(&format!("name: {POD}\n"), &format!("name: {name}\n")),
            &format!("pod-{name}"),
        )?;
        self.pod_uid(name)
    }

    pub fn stop(&mut self, name: &str) {
        for (n, c) in &mut self.children {
            if n == name {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
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
---
apiVersion: v1
kind: Node
metadata:
  name: {NODE}
status:
  addresses:
  - {{type: InternalIP, address: 127.0.0.1}}
  daemonEndpoints:
    kubeletEndpoint: {{Port: 10250}}
  conditions:
  - {{type: Ready, status: "True", reason: KubeletReady, message: "pc-fake-kubelet (test-only)"}}
"#
    )
}

fn pod_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {POD}
  namespace: {NAMESPACE}
spec:
  nodeName: {NODE}
  serviceAccountName: agent
  automountServiceAccountToken: false
  containers:
  - name: main
    image: example.invalid/none:1
  - name: canary
    image: example.invalid/none:1
"#
    )
}

/// The gated daemon's audit settings: request bodies (masked) are recorded.
pub const AUDIT_SECTION: &str = "  audit:\n    level: Request\n";

/// The service-account issuer and API audience of the generated cluster.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The test-only IdP, served in the node namespace (where the daemon runs).
pub const IDP_ADDR: &str = "127.0.0.1:18443";
pub const IDP_AUDIENCE: &str = "portcullis";
/// Remote approvers' HTTPS admin API, in the node namespace.
pub const ADMIN_ADDR: &str = "127.0.0.1:18444";
/// A second pod, for the stolen-token case.
pub const OTHER_POD: &str = "other";

/// A lab with a real control plane and the daemon proxying to it: what the e2e tier,
/// the demo and the proxy benchmark share.
pub struct Gate {
    // Field order is drop order: the cluster's processes stop before the lab's
    // namespaces go away.
    pub cluster: Cluster,
    pub lab: Lab,
    /// The agent's kubeconfig: the Service address, its own projected service-account
    /// token (bound to pod `work`), and Portcullis' CA.
    pub agent_kubeconfig: PathBuf,
    /// Straight at the apiserver, as the same scoped identity the daemon impersonates.
    pub direct_kubeconfig: PathBuf,
    /// The cgroup of pod `work` (named by its UID, as the kubelet does), enrolled.
    pub pod_cg: PathBuf,
    /// The cgroup of pod `other`.
    pub other_cg: PathBuf,
    pub work_uid: String,
    pub other_uid: String,
    pub agent_token: String,
    /// Gated mode: the test IdP.
    pub idp: Option<crate::idp::Idp>,
    base_config: String,
    pass_through: String,
    gated: Option<String>,
}

fn pod_cgroup(parent: &Path, uid: &str) -> Result<PathBuf> {
    let cg = parent.join(format!("kubepods-pod{}.slice", uid.replace('-', "_")));
    std::fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
    Ok(cg)
}

impl Gate {
    /// With `policy`, the daemon starts gated (tokens from the cluster issuer and the
    /// test IdP, this policy, approvals); without, in pass-through mode (every agent
    /// acts as the scoped identity, no token checks: the benchmark's baseline).
    pub fn start(tag: &str, policy: Option<&str>, proxy_extra: &str) -> Result<Gate> {
        let parts = Parts::from_env()?;
        let lab = Lab::without_standin(tag).context("building the lab (needs root)")?;
        let cluster = Cluster::start(&lab, parts).context("starting the control plane")?;
        let work_uid = cluster.pod_uid(POD)?;
        let other_uid = cluster.create_pod(OTHER_POD)?;
        let pod_cg = pod_cgroup(&lab.agent_cg, &work_uid)?;
        let other_cg = pod_cgroup(&lab.agent_cg, &other_uid)?;
        let upstream = format!(
            "proxy:\n  upstream:\n    url: {}\n    ca_file: {}\n    credential:\n      bearer_token_file: {}\n",
            cluster.url(),
            cluster.ca_pem.display(),
            cluster.daemon_token_file.display()
        );
        let mut idp = None;
        let pass_through = format!(
            "{upstream}  impersonate:\n    user: \"{AGENT_USER}\"\n    groups: [\"{AGENT_GROUP}\"]\n{proxy_extra}"
        );
        let gated = match policy {
            None => None,
            Some(policy) => {
                let policy_file = lab.dir.join("policy.yaml");
                write(&policy_file, policy)?;
                let i = crate::idp::Idp::new(&lab.dir.join("idp"), &format!("https://{IDP_ADDR}"))?;
                i.keygen("k1")?;
                i.publish(&["k1"])?;
                let (cert, key) = cluster.issue_server_cert("idp", &["127.0.0.1"])?;
                let child = lab
                    .command_in_ns(lab.ns_node(), &bin("pc-idp"))
                    .arg(format!("--dir={}", i.dir.display()))
                    .arg(format!("--listen={IDP_ADDR}"))
                    .arg(format!("--cert={}", cert.display()))
                    .arg(format!("--key={}", key.display()))
                    .arg(format!("--issuer={}", i.issuer))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting pc-idp")?;
                lab.adopt(child);
                let ca = cluster.ca_pem.display();
                let s = format!(
                    "{upstream}  policy_file: {pf}\n  identity:\n    leeway: 5s\n    issuers:\n    - issuer: {SA_ISSUER}\n      kubernetes: true\n      audiences: [\"{SA_ISSUER}\"]\n      algorithms: [RS256, ES256]\n    - issuer: {iss}\n      ca_file: {ca}\n      audiences: [{IDP_AUDIENCE}]\n      algorithms: [ES256]\n      username_claim: email\n      groups_claim: groups\n  approvals:\n    pending_ttl: 10s\n    webhook:\n      url: {iss}/webhook\n      ca_file: {ca}\n  admin:\n    https:\n      listen: {ADMIN_ADDR}\n      approver_groups: [\"oidc:oncall\", \"oidc:devs\"]\n{AUDIT_SECTION}",
                    pf = policy_file.display(),
                    iss = i.issuer,
                );
                idp = Some(i);
                Some(format!("{s}{proxy_extra}"))
            }
        };
        let base_config = std::fs::read_to_string(&lab.config)?;
        lab.append_config(gated.as_ref().unwrap_or(&pass_through))?;
        let out = lab.portcullis(&["ca", "init"])?;
        if !out.contains("created interception CA") {
            bail!("portcullis ca init said: {out}");
        }
        lab.start_daemon()?;
        let agent_token = cluster.agent_token_for(None, Some((POD, &work_uid)))?;
        let agent_kubeconfig = cluster.write_kubeconfig(
            "agent",
            &format!("https://{}", lab.cluster_ip()),
            &lab.state_dir().join("ca/ca.crt"),
            &agent_token,
            None,
        )?;
        let direct_kubeconfig = cluster.write_kubeconfig(
            "direct",
            &cluster.url(),
            &cluster.ca_pem,
            &cluster.admin_token,
            Some((AGENT_USER, AGENT_GROUP)),
        )?;
        Ok(Gate {
            cluster,
            lab,
            agent_kubeconfig,
            direct_kubeconfig,
            pod_cg,
            other_cg,
            work_uid,
            other_uid,
            agent_token,
            idp,
            base_config,
            pass_through,
            gated,
        })
    }

    /// Restarts the daemon gated or in pass-through mode (pinned programs are adopted,
    /// so enforcement never lapses).
    /// Restarts the gated daemon with `audit` (a `proxy.audit` section, indented as
    /// [`AUDIT_SECTION`]) in place of the default one.
    pub fn restart_with_audit(&self, audit: &str) -> Result<()> {
        let gated = self
            .gated
            .as_ref()
            .context("no policy was given to Gate::start")?
            .replacen(AUDIT_SECTION, audit, 1);
        self.lab.kill_daemon();
        write(&self.lab.config, &format!("{}{gated}", self.base_config))?;
        self.lab.start_daemon().map(|_| ())
    }

    /// An audit section that also ships to the test-only collector in pc-idp
    /// (`POST /audit-sink`, records in `<idp dir>/sink.jsonl`).
    pub fn audit_with_sink(&self) -> String {
        format!(
            "{AUDIT_SECTION}    sink:\n      url: https://{IDP_ADDR}/audit-sink\n      ca_file: {}\n      batch: 50\n",
            self.cluster.ca_pem.display()
        )
    }

    pub fn switch(&self, gated: bool) -> Result<()> {
        let section = if gated {
            self.gated
                .as_ref()
                .context("no policy was given to Gate::start")?
        } else {
            &self.pass_through
        };
        self.lab.kill_daemon();
        write(&self.lab.config, &format!("{}{section}", self.base_config))?;
        self.lab.start_daemon()?;
        Ok(())
    }

    /// kubectl as the agent: in pod `work`'s cgroup and the agent netns, through the gate.
    pub fn gate_cmd(&self, args: &[&str]) -> Command {
        let mut c = self
            .lab
            .command_in_cgroup(&self.pod_cg, &self.cluster.parts.kubectl);
        c.arg(format!("--kubeconfig={}", self.agent_kubeconfig.display()))
            .args(args)
            .env("HOME", self.lab.dir.join("home-agent"));
        c
    }

    /// kubectl straight at the apiserver from the node, as the same scoped identity.
    pub fn direct_cmd(&self, args: &[&str]) -> Command {
        let mut c = self
            .lab
            .command_in_ns(self.lab.ns_node(), &self.cluster.parts.kubectl);
        c.arg(format!("--kubeconfig={}", self.direct_kubeconfig.display()))
            .args(args)
            .env("HOME", self.lab.dir.join("home-direct"));
        c
    }

    /// A test-only helper binary run as the agent (pod `work`).
    pub fn agent_bin(&self, name: &str) -> Command {
        self.lab.command_in_cgroup(&self.pod_cg, &bin(name))
    }

    /// `portcullis` CLI on the node (admin socket), e.g. `approvals list`.
    pub fn portcullis(&self, args: &[&str]) -> Result<Output> {
        let (first, rest) = args.split_first().context("no subcommand")?;
        Ok(self
            .lab
            .command_in_ns(self.lab.ns_node(), &bin("portcullis"))
            .arg(first)
            .arg(format!("--config={}", self.lab.config.display()))
            .args(rest)
            .stdin(Stdio::null())
            .output()?)
    }
}
