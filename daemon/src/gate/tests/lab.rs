//! One gate on loopback, wired as `portcullis run` wires it minus the kernel: a fake
//! origin lookup stands in for the pinned connection map, a directory tree of pod
//! cgroups for the kubelet's, a test IdP key for the cluster's service-account issuer
//! (its JWKS served by the fake API server), and agents are TLS clients trusting the
//! interception CA.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket},
};

use super::fake_api::FakeApi;
use crate::{
    approvals::{Approval, Approvals, Approver, RedbStore, State},
    audit::{
        AuditLog, AuditWriter, Entry, RequestRecord, ResponseRecord, load_or_create_key, read_all,
    },
    config::{self, Config},
    gate::{Authorizer, Gate, Gated},
    identity::{Authenticator, JwksCache, Source},
    kernel::{ConnOrigin, KernelError, OriginLookup, PodResolver, events::OriginView},
    mask::Masking,
    policy::PolicyHandle,
    tls::{CaPaths, LeafMinter},
    upstream::{Impersonation, Upstream},
};

pub const POLICY: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: lab}
spec:
  identities:
  - subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}]
    impersonate: {user: "portcullis:agent", groups: ["portcullis:agents", "second"]}
  rules:
  - name: reads
    verbs: [get, list, watch]
    apiGroups: ["*"]
    resources: ["*"]
    action: allow
  - name: cm-writes
    verbs: [create, update, patch]
    apiGroups: [""]
    resources: [configmaps]
    action: allow
  - name: exec
    verbs: ["*"]
    apiGroups: [""]
    resources: ["pods/exec"]
    action: deny
    message: interactive access is not for agents
  - name: quick-deletes
    verbs: [delete]
    apiGroups: [""]
    resources: [configmaps]
    resourceNames: ["quick-*"]
    action: approve
    message: deletes need a human
    approval: {approvers: [{kind: Group, name: oncall}], holdTime: 0s, grantTTL: 5m}
  - name: slow-deletes
    verbs: [delete]
    apiGroups: [""]
    resources: [configmaps]
    resourceNames: ["slow-*"]
    action: approve
    message: deletes need a human
    approval: {approvers: [{kind: Group, name: oncall}], holdTime: 20s, grantTTL: 5m}
"#;

/// Where an agent's connection comes from, as the (fake) kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// A process in pod A's cgroup (the pod the agent's tokens are bound to).
    PodA,
    /// A process in pod B's cgroup.
    PodB,
    /// Dialled the daemon directly: no kernel record.
    Unredirected,
}

pub const POD_A: &str = "3f2a1c9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b";
pub const POD_B: &str = "8c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f";
pub const AGENT: &str = "system:serviceaccount:e2e:agent";
const ISSUER: &str = "https://kubernetes.default.svc";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    PassThrough,
    Gated,
}

pub struct Options {
    pub mode: Mode,
    pub pending_ttl: &'static str,
    /// `proxy.limits` as a YAML flow mapping (e.g. `{max_requests_per_agent: 4}`).
    pub limits: &'static str,
    /// `proxy.audit` as a YAML flow mapping.
    pub audit: &'static str,
    /// The policy document (default [`POLICY`]).
    pub policy: &'static str,
}

impl Options {
    pub fn new(mode: Mode) -> Options {
        Options {
            mode,
            pending_ttl: "1h",
            limits: "{}",
            audit: "{level: Request}",
            policy: POLICY,
        }
    }
}

/// The fake kernel: the origin of each connection, by the agent's local address.
#[derive(Default)]
struct FakeLookup {
    by_peer: Mutex<HashMap<SocketAddr, ConnOrigin>>,
}

impl OriginLookup for FakeLookup {
    fn lookup(&self, peer: SocketAddr) -> Result<Option<ConnOrigin>, KernelError> {
        Ok(self.by_peer.lock().unwrap().remove(&peer))
    }
}

pub struct Lab {
    pub dir: PathBuf,
    pub api: FakeApi,
    pub addr: SocketAddr,
    pub approvals: Option<Arc<Approvals>>,
    pub gate: Arc<Gate>,
    lookup: Arc<FakeLookup>,
    idp_key: rcgen::KeyPair,
    cgroups: HashMap<&'static str, u64>,
    agent_ca: CertificateDer<'static>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.api.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An answer as the agent saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    /// Trailers after the body, if any reached the agent.
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// The metav1.Status message of a refusal.
    pub fn message(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not a Status ({e}): {}", self.body));
        assert_eq!(v["kind"], "Status", "{}", self.body);
        v["message"].as_str().unwrap_or_default().to_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn unique_dir() -> PathBuf {
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).unwrap();
    let d = std::env::temp_dir().join(format!("pc-gate-{}-{}", std::process::id(), hex::encode(r)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Lab {
    pub async fn start(opts: Options) -> Lab {
        let dir = unique_dir();
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        // Pod cgroups as the kubelet names them (systemd driver).
        let cgroup_root = dir.join("cgroup");
        let mut cgroups = HashMap::new();
        for (name, uid) in [("a", POD_A), ("b", POD_B)] {
            let p = cgroup_root.join(format!(
                "kubepods.slice/kubepods-pod{}.slice",
                uid.replace('-', "_")
            ));
            std::fs::create_dir_all(&p).unwrap();
            cgroups.insert(name, std::fs::metadata(&p).unwrap().ino());
        }
        // The service-account issuer's key, published by the API server.
        let idp_key = rcgen::KeyPair::generate().unwrap();
        let raw = idp_key.public_key_raw().to_vec();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "use": "sig", "alg": "ES256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]})
        .to_string();
        let api = FakeApi::start(&dir, state.join("audit"), jwks).await;
        std::fs::write(dir.join("daemon-token"), "daemon-token\n").unwrap();
        std::fs::write(dir.join("policy.yaml"), opts.policy).unwrap();
        let mode = match opts.mode {
            Mode::PassThrough => {
                "  impersonate: {user: \"portcullis:agent\", groups: [\"portcullis:agents\", \"second\"]}\n".to_string()
            }
            Mode::Gated => format!(
                "  identity:\n    token_review_ttl: 300ms\n    issuers:\n    - {{issuer: \"{ISSUER}\", kubernetes: true, audiences: [api], algorithms: [ES256]}}\n  policy_file: {}\n",
                dir.join("policy.yaml").display()
            ),
        };
        let yaml = format!(
            r#"listen: {{ipv4: "127.0.0.1:15443"}}
kernel:
  attach_cgroup: {cg}
  protected_endpoints: ["10.96.0.1:443"]
state_dir: {state}
proxy:
  upstream:
    url: {url}
    ca_file: {ca}
    credential: {{bearer_token_file: {token}}}
{mode}  approvals: {{pending_ttl: {ttl}}}
  masking:
    rules: [{{api_groups: [""], resources: [configmaps], paths: [data.dsn]}}]
  audit: {audit}
  max_header_bytes: 8192
  limits: {limits}
"#,
            cg = cgroup_root.display(),
            state = state.display(),
            url = api.url(),
            ca = api.ca_file.display(),
            token = dir.join("daemon-token").display(),
            ttl = opts.pending_ttl,
            limits = opts.limits,
            audit = opts.audit,
        );
        let cfg = Config::parse(&yaml, Path::new("lab.yaml")).unwrap();
        let pcfg = cfg.proxy.clone().unwrap();

        // Wired as daemon::run wires it.
        let ca_paths = CaPaths::new(&cfg.state().ca_dir());
        crate::tls::init(&ca_paths).unwrap();
        let minter = Arc::new(LeafMinter::load(&ca_paths, pcfg.tls_names.clone()).unwrap());
        let upstream = Arc::new(Upstream::new(&pcfg).unwrap());
        let key = load_or_create_key(&state.join("audit.key")).unwrap();
        let writer = AuditWriter::open(&state.join("audit"), key, pcfg.audit.segment_bytes)
            .unwrap()
            .with_disk_budget(pcfg.audit.max_disk_bytes);
        let audit = AuditLog::start(writer, &pcfg.audit).unwrap();
        let mut approvals = None;
        let authorizer = match &pcfg.mode {
            config::Mode::PassThrough(imp) => {
                Authorizer::PassThrough(Impersonation::new(&imp.user, &imp.groups))
            }
            config::Mode::Gated {
                identity,
                policy_file,
            } => {
                let keys = vec![Arc::new(JwksCache::new(
                    ISSUER,
                    Source::ApiServer(upstream.clone()),
                ))];
                let authn =
                    Arc::new(Authenticator::new(identity, keys).with_reviews(upstream.clone()));
                let policy = PolicyHandle::load(policy_file).unwrap();
                let store = Arc::new(RedbStore::open(&cfg.state().approvals_db()).unwrap());
                let a = Arc::new(
                    Approvals::open(
                        store,
                        &cfg.state().approvals_log(),
                        None,
                        pcfg.approvals.pending_ttl,
                    )
                    .unwrap()
                    .chained(audit.clone()),
                );
                approvals = Some(a.clone());
                Authorizer::Gated(Gated {
                    authn,
                    policy,
                    approvals: a,
                    pods: Arc::new(PodResolver::new(&cfg.kernel.attach_cgroup)),
                })
            }
        };
        let masking = Arc::new(Masking::from_config(&pcfg.masking).unwrap());
        let gate = Arc::new(Gate::new(
            minter,
            upstream,
            authorizer,
            &pcfg,
            masking,
            audit.clone(),
        ));
        let lookup = Arc::new(FakeLookup::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        // Two loops, as on a two-core node: requests and their API server connections
        // are served across threads as in the daemon.
        let loops = crate::loops::EventLoops::start(2).expect("two event loops start");
        tokio::spawn(crate::gate::serve(
            listener,
            lookup.clone(),
            tx,
            Some((gate.clone(), loops)),
        ));
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let agent_ca = CertificateDer::from_pem_file(ca_paths.cert()).unwrap();
        Lab {
            dir,
            api,
            addr,
            approvals,
            gate,
            lookup,
            idp_key,
            cgroups,
            agent_ca,
        }
    }

    /// A projected service-account token for `sa` in e2e, bound to `pod`.
    pub fn token(&self, sa: &str, pod: &str) -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": ["api"], "sub": format!("system:serviceaccount:e2e:{sa}"),
            "iat": t, "nbf": t - 5, "exp": t + 600,
            "kubernetes.io": {"namespace": "e2e",
                "serviceaccount": {"name": sa, "uid": "sa-uid"},
                "pod": {"name": "agent-pod", "uid": pod}},
        });
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.idp_key.serialize_pem().as_bytes())
            .unwrap();
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    }

    /// The agent's token: the `agent` service account, bound to pod A.
    pub fn agent_token(&self) -> String {
        self.token("agent", POD_A)
    }

    fn origin(&self, from: From) -> Option<ConnOrigin> {
        let cgroup_id = match from {
            From::PodA => self.cgroups["a"],
            From::PodB => self.cgroups["b"],
            From::Unredirected => return None,
        };
        Some(ConnOrigin {
            original_dst: "10.96.0.1:443".parse().unwrap(),
            origin: OriginView {
                cgroup_id,
                agent_cgroup_id: cgroup_id,
                netns_cookie: 1,
                pid: 4242,
                tid: 4242,
                uid: 1000,
                gid: 1000,
                comm: "kubectl".into(),
            },
            socket_cookie: 7,
        })
    }

    /// What the proxy knows about a connection from `from` before its first request.
    pub fn conn(&self, from: From) -> crate::gate::conn::Conn {
        crate::gate::conn::Conn {
            id: 1,
            peer: "127.0.0.1:40000".parse().unwrap(),
            origin: self.origin(from),
            kernel_pod: None,
            sni: None,
            cancels: crate::gate::conn::Window::new(),
            abuse: tokio::sync::Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            agent: crate::gate::admission::AgentKey::Addr([127, 0, 0, 1].into()),
            active: std::sync::atomic::AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(std::time::Instant::now()),
            audit_origin: std::sync::OnceLock::new(),
            audit_subject: std::sync::Mutex::new(None),
            impersonation: std::sync::Mutex::new(None),
        }
    }

    /// A TLS connection to the gate from `from`, offering `alpn`.
    pub async fn dial(
        &self,
        from: From,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        if let Some(o) = self.origin(from) {
            self.lookup
                .by_peer
                .lock()
                .unwrap()
                .insert(sock.local_addr().unwrap(), o);
        }
        let tcp = sock.connect(self.addr).await.unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.agent_ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("kubernetes.default").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// A TLS connection attempt from `from` that may fail (the gate closed it).
    pub async fn dial_result(&self, from: From) -> std::io::Result<()> {
        let sock = TcpSocket::new_v4()?;
        sock.bind("127.0.0.1:0".parse().unwrap())?;
        if let Some(o) = self.origin(from) {
            self.lookup
                .by_peer
                .lock()
                .unwrap()
                .insert(sock.local_addr()?, o);
        }
        let tcp = sock.connect(self.addr).await?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.agent_ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("kubernetes.default").unwrap(), tcp)
            .await
            .map(drop)
    }

    /// Sends one request on a new connection (HTTP/2 or HTTP/1.1) and reads the whole
    /// answer.
    pub async fn send(&self, from: From, h2: bool, mut req: Request<Full<Bytes>>) -> Reply {
        let tls = self.dial(from, if h2 { b"h2" } else { b"http/1.1" }).await;
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let uri = format!("https://kubernetes.default{}", req.uri());
            *req.uri_mut() = uri.parse().unwrap();
            let (mut s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(c);
            s.send_request(req).await.unwrap()
        } else {
            req.headers_mut()
                .insert(http::header::HOST, "kubernetes.default".parse().unwrap());
            let (mut s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(c);
            s.send_request(req).await.unwrap()
        };
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            trailers,
        }
    }

    /// An HTTP/1.1 request with upgrade headers (and `headers`), written raw: the
    /// response head as text, and every byte after it until the gate closes.
    pub async fn upgrade(
        &self,
        from: From,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (String, Vec<u8>) {
        let mut tls = self.dial(from, b"http/1.1").await;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: kubernetes.default\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
                Err(_) => panic!(
                    "the gate kept the connection open: {}",
                    String::from_utf8_lossy(&all)
                ),
            }
            // A plain answer with its whole body: done (keep-alive would not close).
            if let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&all[..end]).to_lowercase();
                if !head.starts_with("http/1.1 101")
                    && (head.contains("content-length") || all.ends_with(b"0\r\n\r\n"))
                {
                    let cl: Option<usize> = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok());
                    if cl.is_none_or(|cl| all.len() >= end + 4 + cl) {
                        break;
                    }
                }
            }
        }
        let end = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(all.len(), |e| e + 4);
        (
            String::from_utf8_lossy(&all[..end]).into_owned(),
            all[end..].to_vec(),
        )
    }

    /// `method path` with the agent's token (if any) over HTTP/1.1.
    pub async fn call(&self, from: From, token: Option<&str>, method: &str, path: &str) -> Reply {
        self.send(from, false, req(method, path, token, None)).await
    }

    /// Raw bytes over HTTP/1.1; what came back, and whether the gate closed the
    /// connection. (The gate may answer and close before all is written: a write
    /// error is not a failure, what was read so far is the answer.)
    pub async fn raw(&self, from: From, bytes: &[u8]) -> (String, bool) {
        let mut tls = self.dial(from, b"http/1.1").await;
        let _ = tls.write_all(bytes).await;
        let _ = tls.flush().await;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        (String::from_utf8_lossy(&out).into_owned(), closed)
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.dir.join("state/audit")
    }

    pub fn entries(&self) -> Vec<Entry> {
        read_all(&self.audit_dir()).unwrap()
    }

    /// The `request` record for `method` on `path`, and its `response` record, once
    /// both are written.
    pub async fn records(&self, method: &str, path: &str) -> (RequestRecord, ResponseRecord) {
        for _ in 0..100 {
            let entries = self.entries();
            let req = entries
                .iter()
                .filter(|e| e.kind == "request")
                .filter_map(|e| serde_json::from_value::<RequestRecord>(e.record.clone()).ok())
                .rfind(|r| r.method == method && r.path == path);
            if let Some(req) = req {
                let resp = entries
                    .iter()
                    .filter(|e| e.kind == "response")
                    .filter_map(|e| serde_json::from_value::<ResponseRecord>(e.record.clone()).ok())
                    .find(|r| r.id == req.id);
                if let Some(resp) = resp {
                    return (req, resp);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no request and response records for {method} {path}");
    }

    pub fn approvals(&self) -> &Arc<Approvals> {
        self.approvals.as_ref().expect("a gated lab")
    }

    /// The pending approval for the request on `name`, once there is one.
    pub async fn pending(&self, name: &str) -> Approval {
        self.approval_where(name, |a| a.state == State::Pending)
            .await
    }

    /// The approval for the request on `name`, in whatever state, once there is one
    /// (looking expires what is due: on a loaded machine a short-lived one may be
    /// expired by the first look).
    pub async fn approval(&self, name: &str) -> Approval {
        self.approval_where(name, |_| true).await
    }

    async fn approval_where(&self, name: &str, pick: impl Fn(&Approval) -> bool) -> Approval {
        for _ in 0..200 {
            if let Some(a) = self
                .approvals()
                .list()
                .into_iter()
                .find(|a| a.request.name == name && pick(a))
            {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no approval as asked for {name}");
    }
}

/// A root approver on the node socket.
pub fn alice() -> Approver {
    Approver {
        user: crate::k8s::UserInfo {
            username: "alice".into(),
            groups: vec!["oncall".into()],
        },
        issuer: String::new(),
        subject: String::new(),
        node_admin: true,
    }
}

/// A request for `path` (with its query), carrying `token` and `body` if given.
pub fn req(
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some((ctype, b2)) => {
            b = b.header(http::header::CONTENT_TYPE, ctype);
            Bytes::from(b2.to_owned())
        }
        None => Bytes::new(),
    };
    b.body(Full::new(body)).unwrap()
}
