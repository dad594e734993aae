//! The daemon's one YAML configuration file, parsed in one place.
//!
//! Unknown fields are refused, and every error names the field (as a path such as
//! `kernel.protected_endpoints[2]`) and the offending value. `deploy/portcullis.yaml`
//! is the documented example.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, de};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where redirected agent connections arrive. The kernel rewrites agents' connects
    /// to these addresses, so they must be concrete (not 0.0.0.0 / ::).
    pub listen: Listen,
    pub kernel: Kernel,
    /// The TLS-terminating API proxy. Without it the daemon only enforces: redirected
    /// connections are recorded and closed, so agents fail closed.
    pub proxy: Option<Proxy>,
    /// Daemon state: CA, event logs, kernel attach state.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub log: Log,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub ipv4: Option<ConcreteAddr>,
    pub ipv6: Option<ConcreteAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// cgroup v2 directory the programs attach to: an ancestor of every agent cgroup
    /// (e.g. the kubepods slice). The programs act only on enrolled cgroups below it.
    pub attach_cgroup: PathBuf,
    /// bpffs directory where programs, links and maps are pinned.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Mount bpffs at the parent of `bpffs_dir` if it is not mounted there yet.
    #[serde(default = "default_true")]
    pub mount_bpffs: bool,
    /// Agent cgroups enrolled at start (more can be enrolled at run time).
    #[serde(default)]
    pub agent_cgroups: Vec<PathBuf>,
    /// Endpoints agents may reach only through the daemon: the API Service ClusterIP,
    /// the API servers' real addresses, ... `IP:PORT`, `[IPv6]:PORT`, or `IP:*` for
    /// every port of an address.
    pub protected_endpoints: Vec<Endpoint>,
    /// An eBPF object to load instead of the one built into the binary.
    pub bpf_object: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    pub upstream: Upstream,
    /// Pass-through mode only (no `identity`/`policy_file`): one scoped identity the
    /// daemon impersonates for every request of every enrolled agent. With a policy,
    /// each subject's identity comes from the policy's `identities`.
    #[serde(default)]
    pub impersonate: Option<Impersonate>,
    /// Who the agent is: trusted token issuers.
    #[serde(default)]
    pub identity: Option<Identity>,
    /// The policy document (hot-reloaded on change).
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    #[serde(default)]
    pub approvals: Approvals,
    #[serde(default)]
    pub admin: Admin,
    /// What is masked in responses (Secrets always).
    #[serde(default)]
    pub masking: Masking,
    /// Audit evidence of every request.
    #[serde(default)]
    pub audit: Audit,
    /// Names for the leaf certificates besides kubernetes, kubernetes.default,
    /// kubernetes.default.svc, kubernetes.default.svc.cluster.local, the SNI the agent
    /// sent and the address it dialled (e.g. the API server's public DNS name).
    #[serde(default)]
    pub tls_names: Vec<String>,
    /// Serve connections the kernel did not redirect (no origin record). Off: such a
    /// connection could come from any pod that dials the daemon's address, and would be
    /// forwarded with the daemon's credential.
    #[serde(default)]
    pub accept_unredirected: bool,
    /// Limit on a request's header block; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// A client must finish sending headers (and the TLS handshake) within this.
    #[serde(default = "default_header_timeout", with = "humantime_serde_compat")]
    pub header_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `https://HOST:PORT` of the API server. Defaults, with `in_cluster`, to
    /// KUBERNETES_SERVICE_HOST/PORT.
    pub url: Option<String>,
    /// CA bundle that signs the API server's certificate (PEM). Defaults, with
    /// `in_cluster`, to the service account's ca.crt.
    pub ca_file: Option<PathBuf>,
    pub credential: Credential,
}

/// How the daemon authenticates to the API server: exactly one of
/// `bearer_token_file`, `client_cert_file` + `client_key_file`, or `in_cluster: true`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "CredentialSpec")]
pub enum Credential {
    /// A bearer token file, re-read when it changes (projected tokens rotate).
    BearerTokenFile(PathBuf),
    /// A client certificate and key (PEM).
    ClientCertificate {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    /// The pod's service account (/var/run/secrets/kubernetes.io/serviceaccount).
    InCluster,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialSpec {
    bearer_token_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    #[serde(default)]
    in_cluster: bool,
}

impl TryFrom<CredentialSpec> for Credential {
    type Error = String;

    fn try_from(s: CredentialSpec) -> Result<Self, String> {
        match (
            s.bearer_token_file,
            s.client_cert_file,
            s.client_key_file,
            s.in_cluster,
        ) {
            (Some(t), None, None, false) => Ok(Credential::BearerTokenFile(t)),
            (None, Some(c), Some(k), false) => Ok(Credential::ClientCertificate {
                cert_file: c,
                key_file: k,
            }),
            (None, None, None, true) => Ok(Credential::InCluster),
            (None, Some(_), None, false) | (None, None, Some(_), false) => {
                Err("give both client_cert_file and client_key_file".into())
            }
            _ => Err(
                "give exactly one of bearer_token_file, client_cert_file + client_key_file, \
                 or in_cluster: true"
                    .into(),
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Clock skew tolerated on exp/nbf.
    #[serde(default = "default_leeway", with = "humantime_serde_compat")]
    pub leeway: std::time::Duration,
    pub issuers: Vec<IssuerConfig>,
}

fn default_leeway() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

/// One trusted token issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` claim.
    pub issuer: String,
    /// The cluster's service-account issuer: keys come from the API server's
    /// /openid/v1/jwks (with the daemon's credential); identities are
    /// `system:serviceaccount:NS:NAME` and projected tokens are bound to their pod.
    #[serde(default)]
    pub kubernetes: bool,
    /// OIDC: the JWKS URL (default: from `<issuer>/.well-known/openid-configuration`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// OIDC: CA bundle for the IdP (default: public web roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Accepted `aud` values (at least one).
    pub audiences: Vec<String>,
    /// Accepted signature algorithms; asymmetric only.
    #[serde(default = "default_algorithms", deserialize_with = "de_algorithms")]
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// OIDC: the claim holding the user name.
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// OIDC: prepended to user names, so an IdP user cannot pose as a service account.
    #[serde(default = "default_oidc_prefix")]
    pub username_prefix: String,
    /// OIDC: the claim holding the group list.
    #[serde(default)]
    pub groups_claim: Option<String>,
    #[serde(default = "default_oidc_prefix")]
    pub groups_prefix: String,
}

fn default_algorithms() -> Vec<jsonwebtoken::Algorithm> {
    vec![jsonwebtoken::Algorithm::RS256]
}
fn default_username_claim() -> String {
    "sub".into()
}
fn default_oidc_prefix() -> String {
    "oidc:".into()
}
/// Why an issuer's algorithm is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AlgorithmError {
    #[error("`{0}` is not a JWS algorithm")]
    Unknown(String),
    #[error(
        "`{0}` is a shared-secret algorithm: issuers must sign with a private key (RS*, PS*, ES*, EdDSA)"
    )]
    SharedSecret(String),
}

/// Algorithms an issuer may be configured with: asymmetric only (a token cannot pick
/// HS256 and have the issuer's public key used as its secret).
pub fn parse_algorithm(s: &str) -> Result<jsonwebtoken::Algorithm, AlgorithmError> {
    use jsonwebtoken::Algorithm;
    let alg: Algorithm = s
        .parse()
        .map_err(|_| AlgorithmError::Unknown(s.to_owned()))?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Err(AlgorithmError::SharedSecret(s.to_owned()))
        }
        a => Ok(a),
    }
}

fn de_algorithms<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<jsonwebtoken::Algorithm>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| parse_algorithm(s).map_err(de::Error::custom))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approvals {
    /// An undecided approval expires after this.
    #[serde(default = "default_pending_ttl", with = "humantime_serde_compat")]
    pub pending_ttl: std::time::Duration,
    #[serde(default)]
    pub webhook: Option<Webhook>,
}

impl Default for Approvals {
    fn default() -> Self {
        Approvals {
            pending_ttl: default_pending_ttl(),
            webhook: None,
        }
    }
}

fn default_pending_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(3600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    #[default]
    Generic,
    Slack,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Default: `<state_dir>/admin.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub https: Option<AdminHttps>,
}

/// Response masking. Secret `data`/`stringData` are always masked; these settings add
/// to that.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Masking {
    /// Pattern detectors (private keys, JWTs, cloud keys, `password=` pairs, card
    /// numbers) over every string in JSON responses and every log line.
    #[serde(default = "yes")]
    pub detectors: bool,
    /// A key file (any bytes, 32+ recommended): placeholders then carry a keyed
    /// fingerprint so equal values are recognisable. Without it they are constant.
    #[serde(default)]
    pub fingerprint_key_file: Option<PathBuf>,
    #[serde(default)]
    pub rules: Vec<MaskRule>,
}

impl Default for Masking {
    fn default() -> Self {
        Masking {
            detectors: true,
            fingerprint_key_file: None,
            rules: Vec::new(),
        }
    }
}

/// Paths masked in the objects of some resources.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRule {
    /// `""` is the core group; `*` any.
    pub api_groups: Vec<String>,
    /// Plural resource names; `*` any.
    pub resources: Vec<String>,
    /// Paths below each object: `data.*`, `spec.password`,
    /// `metadata.annotations[example.com/dsn]`; the whole value below a path is masked.
    pub paths: Vec<String>,
    /// `text` (default) or `base64` (placeholders stay valid base64).
    #[serde(default = "text_encoding")]
    pub encoding: Encoding,
}

/// How a masked value is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The field holds base64 (Secret `data`): the placeholder is valid base64.
    Base64,
    /// Plain text.
    Text,
}

fn text_encoding() -> Encoding {
    Encoding::Text
}

fn yes() -> bool {
    true
}

/// How much of each request goes into the audit evidence (as Kubernetes audit levels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub enum AuditLevel {
    /// Who, what, decision, outcome; no bodies.
    #[default]
    Metadata,
    /// Plus the (masked) request body.
    Request,
    /// Plus the (masked) response body.
    RequestResponse,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    #[serde(default)]
    pub level: AuditLevel,
    /// Bodies longer than this are cut in the record (and marked so).
    #[serde(default = "default_audit_body")]
    pub max_body_bytes: usize,
    /// Refuse reads too while the audit log cannot be written (mutations always are).
    #[serde(default = "yes")]
    pub fail_closed_reads: bool,
    /// Segment size before rotation.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Ship records to an HTTP collector as well.
    #[serde(default)]
    pub sink: Option<AuditSink>,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            level: AuditLevel::default(),
            max_body_bytes: default_audit_body(),
            fail_closed_reads: true,
            segment_bytes: default_segment_bytes(),
            sink: None,
        }
    }
}

fn default_audit_body() -> usize {
    64 << 10
}
fn default_segment_bytes() -> u64 {
    64 << 20
}

/// An HTTP collector receiving batches of records (JSON array, POST), with retries;
/// what it has not acknowledged stays on disk and is sent when it is back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSink {
    pub url: String,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_sink_batch")]
    pub batch: usize,
}

fn default_sink_batch() -> usize {
    500
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminHttps {
    pub listen: SocketAddr,
    /// Callers must present a token from a configured issuer and be in one of these.
    pub approver_groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impersonate {
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_header_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

/// `10s`, `1m30s`, ... via humantime.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, de};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| de::Error::custom(format!("`{s}` is not a duration like 10s: {e}")))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `portcullis=debug`.
    #[serde(default = "default_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/portcullis")
}
fn default_bpffs_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/portcullis")
}
fn default_true() -> bool {
    true
}
fn default_level() -> String {
    "info".into()
}

/// A listen address that can be a connect target: a specific IP and a non-zero port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcreteAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ConcreteAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let sa: SocketAddr = s.parse().map_err(|_| {
            de::Error::custom(format!(
                "`{s}` is not an address: expected IP:PORT (IPv6 as [ADDR]:PORT)"
            ))
        })?;
        if sa.ip().is_unspecified() || sa.port() == 0 {
            return Err(de::Error::custom(format!(
                "`{s}` cannot be a redirect target: give a specific IP and a non-zero port"
            )));
        }
        Ok(ConcreteAddr(sa))
    }
}

/// A protected endpoint: an address and a port, or every port (`*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `None` for every port.
    pub port: Option<u16>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (IpAddr::V4(ip), Some(p)) => write!(f, "{ip}:{p}"),
            (IpAddr::V6(ip), Some(p)) => write!(f, "[{ip}]:{p}"),
            (IpAddr::V4(ip), None) => write!(f, "{ip}:*"),
            (IpAddr::V6(ip), None) => write!(f, "[{ip}]:*"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("`{s}` is not an endpoint: expected IP:PORT, [IPv6]:PORT, IP:* or [IPv6]:*");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip: IpAddr = host.parse().map_err(|_| bad())?;
        if ip.is_unspecified() {
            return Err(format!(
                "`{s}`: the unspecified address cannot be protected"
            ));
        }
        let port = match port {
            "*" => None,
            p => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad()),
                Ok(p) => Some(p),
            },
        };
        // A mapped IPv6 spelling of an IPv4 address is the IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        Ok(Endpoint { ip, port })
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// What the daemon keeps in `state_dir`, by name (one place for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatePaths {
    pub dir: PathBuf,
}

impl StatePaths {
    pub fn new(dir: &Path) -> StatePaths {
        StatePaths {
            dir: dir.to_owned(),
        }
    }
    /// Written once the daemon serves; removed when it stops.
    pub fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }
    /// What `kernel::start` found and did.
    pub fn kernel_state(&self) -> PathBuf {
        self.dir.join("kernel-state.json")
    }
    pub fn kernel_events(&self) -> PathBuf {
        self.dir.join("kernel-events.jsonl")
    }
    pub fn connections(&self) -> PathBuf {
        self.dir.join("connections.jsonl")
    }
    /// The audit signing key (its public half beside it, `audit.pub`).
    pub fn audit_key(&self) -> PathBuf {
        self.dir.join("audit.key")
    }
    /// Audit segments and their signed heads.
    pub fn audit_dir(&self) -> PathBuf {
        self.dir.join("audit")
    }
    pub fn approvals_db(&self) -> PathBuf {
        self.dir.join("approvals.redb")
    }
    pub fn approvals_log(&self) -> PathBuf {
        self.dir.join("approvals.jsonl")
    }
    /// The admin socket unless `proxy.admin.socket` says otherwise.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }
    /// The interception CA.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }
}

impl Config {
    pub fn state(&self) -> StatePaths {
        StatePaths::new(&self.state_dir)
    }

    /// The admin socket: configured, or in the state directory.
    pub fn admin_socket(&self) -> PathBuf {
        self.proxy
            .as_ref()
            .and_then(|p| p.admin.socket.clone())
            .unwrap_or_else(|| self.state().admin_socket())
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Invalid {
                path: path.to_owned(),
                field: if field == "." {
                    "(top level)".into()
                } else {
                    field
                },
                message: e.into_inner().to_string(),
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.into(),
            message,
        };
        if self.listen.ipv4.is_none() && self.listen.ipv6.is_none() {
            return Err(invalid(
                "listen",
                "give at least one of `ipv4` or `ipv6`".into(),
            ));
        }
        if let Some(a) = self.listen.ipv4
            && !a.0.is_ipv4()
        {
            return Err(invalid(
                "listen.ipv4",
                format!("`{}` is not an IPv4 address", a.0),
            ));
        }
        if let Some(a) = self.listen.ipv6
            && !a.0.is_ipv6()
        {
            return Err(invalid(
                "listen.ipv6",
                format!("`{}` is not an IPv6 address", a.0),
            ));
        }
        if !self.kernel.attach_cgroup.is_absolute() {
            return Err(invalid(
                "kernel.attach_cgroup",
                format!(
                    "`{}` must be an absolute path",
                    self.kernel.attach_cgroup.display()
                ),
            ));
        }
        for (i, cg) in self.kernel.agent_cgroups.iter().enumerate() {
            if !cg.starts_with(&self.kernel.attach_cgroup) {
                return Err(invalid(
                    &format!("kernel.agent_cgroups[{i}]"),
                    format!(
                        "`{}` is not below kernel.attach_cgroup `{}`, so the programs would never see it",
                        cg.display(),
                        self.kernel.attach_cgroup.display()
                    ),
                ));
            }
        }
        if self.kernel.protected_endpoints.is_empty() {
            return Err(invalid(
                "kernel.protected_endpoints",
                "list at least one endpoint (the API Service ClusterIP:443, the API servers)"
                    .into(),
            ));
        }
        for (i, ep) in self.kernel.protected_endpoints.iter().enumerate() {
            let hits_daemon = [self.listen.ipv4, self.listen.ipv6]
                .into_iter()
                .flatten()
                .any(|l| l.0.ip() == ep.ip && ep.port.is_none_or(|p| p == l.0.port()));
            if hits_daemon {
                return Err(invalid(
                    &format!("kernel.protected_endpoints[{i}]"),
                    format!("`{ep}` covers the daemon's own listen address"),
                ));
            }
        }
        if let Some(p) = &self.proxy {
            let up = &p.upstream;
            let in_cluster = matches!(up.credential, Credential::InCluster);
            match &up.url {
                None if !in_cluster => {
                    return Err(invalid(
                        "proxy.upstream.url",
                        "give the API server's https:// URL (only `credential: in_cluster` may omit it)"
                            .into(),
                    ));
                }
                Some(u) => {
                    let ok = u
                        .parse::<http::Uri>()
                        .ok()
                        .filter(|uri| uri.scheme_str() == Some("https") && uri.host().is_some())
                        .filter(|uri| uri.path_and_query().is_none_or(|pq| pq.as_str() == "/"));
                    if ok.is_none() {
                        return Err(invalid(
                            "proxy.upstream.url",
                            format!("`{u}` is not an https://HOST[:PORT] URL without a path"),
                        ));
                    }
                }
                None => {}
            }
            match (&p.impersonate, &p.identity, &p.policy_file) {
                (Some(imp), None, None) => {
                    if imp.user.trim().is_empty() {
                        return Err(invalid(
                            "proxy.impersonate.user",
                            "give the scoped user the daemon impersonates".into(),
                        ));
                    }
                    if let Some(i) = imp.groups.iter().position(|g| g.contains(',')) {
                        return Err(invalid(
                            &format!("proxy.impersonate.groups[{i}]"),
                            format!("`{}`: a group name cannot contain a comma", imp.groups[i]),
                        ));
                    }
                }
                (None, Some(id), Some(_)) => {
                    if id.issuers.is_empty() {
                        return Err(invalid(
                            "proxy.identity.issuers",
                            "trust at least one issuer".into(),
                        ));
                    }
                    let mut seen = std::collections::HashSet::new();
                    for (i, iss) in id.issuers.iter().enumerate() {
                        let at = |f: &str| format!("proxy.identity.issuers[{i}].{f}");
                        if !seen.insert(iss.issuer.clone()) {
                            return Err(invalid(
                                &at("issuer"),
                                format!("`{}` is listed twice", iss.issuer),
                            ));
                        }
                        if iss.audiences.is_empty() {
                            return Err(invalid(
                                &at("audiences"),
                                "accept at least one audience".into(),
                            ));
                        }
                        if iss.algorithms.is_empty() {
                            return Err(invalid(
                                &at("algorithms"),
                                "allow at least one algorithm".into(),
                            ));
                        }
                        if iss.kubernetes {
                            if iss.jwks_url.is_some() || iss.ca_file.is_some() {
                                return Err(invalid(
                                    &at("jwks_url"),
                                    "a kubernetes issuer's keys come from the upstream API server"
                                        .into(),
                                ));
                            }
                        } else {
                            if !iss.issuer.starts_with("https://") {
                                return Err(invalid(
                                    &at("issuer"),
                                    format!("`{}`: an OIDC issuer is an https:// URL", iss.issuer),
                                ));
                            }
                            if iss.username_prefix.starts_with("system:")
                                || iss.groups_prefix.starts_with("system:")
                            {
                                return Err(invalid(&at("username_prefix"), "OIDC names may not be prefixed into the reserved `system:` space".into()));
                            }
                            if iss.username_prefix.is_empty() {
                                return Err(invalid(&at("username_prefix"), "give a prefix (e.g. `oidc:`) so IdP users cannot pose as cluster identities".into()));
                            }
                        }
                    }
                }
                (Some(_), _, _) => {
                    return Err(invalid(
                        "proxy.impersonate",
                        "with identity and policy_file, each subject's upstream identity comes from the policy's `identities`; remove `impersonate`".into(),
                    ));
                }
                (None, Some(_), None) => {
                    return Err(invalid(
                        "proxy.policy_file",
                        "identity needs a policy".into(),
                    ));
                }
                (None, None, Some(_)) => {
                    return Err(invalid(
                        "proxy.identity",
                        "a policy needs identity (trusted issuers)".into(),
                    ));
                }
                (None, None, None) => {
                    return Err(invalid(
                        "proxy",
                        "give identity + policy_file (gated), or impersonate (pass-through: every enrolled agent acts as one scoped identity)".into(),
                    ));
                }
            }
            if let Some(h) = &p.admin.https {
                if p.identity.is_none() {
                    return Err(invalid(
                        "proxy.admin.https",
                        "remote approvers authenticate with a token: configure identity".into(),
                    ));
                }
                if h.approver_groups.is_empty() {
                    return Err(invalid(
                        "proxy.admin.https.approver_groups",
                        "name at least one approver group".into(),
                    ));
                }
            }
            if p.max_header_bytes < 8 * 1024 {
                return Err(invalid(
                    "proxy.max_header_bytes",
                    format!(
                        "{} is too small for kubectl's headers; use at least 8192",
                        p.max_header_bytes
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen:
  ipv4: 10.0.0.1:15443
  ipv6: "[fd00::1]:15443"
kernel:
  attach_cgroup: /sys/fs/cgroup/kubepods
  agent_cgroups: [/sys/fs/cgroup/kubepods/agent-a]
  protected_endpoints: ["10.96.0.1:443", "[fd00::5]:6443", "192.168.1.10:*", "[::ffff:10.0.0.9]:6443"]
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.yaml"))
    }

    #[test]
    fn parses_the_documented_shape() {
        let c = parse(GOOD).expect("the documented shape parses");
        assert_eq!(c.kernel.protected_endpoints.len(), 4);
        assert_eq!(c.kernel.protected_endpoints[2].port, None);
        // v4-mapped spelling is unwrapped to IPv4.
        assert_eq!(
            c.kernel.protected_endpoints[3].ip,
            IpAddr::from([10, 0, 0, 9])
        );
        assert_eq!(c.kernel.bpffs_dir, PathBuf::from("/sys/fs/bpf/portcullis"));
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../deploy/portcullis.yaml");
        if let Err(e) = parse(text) {
            panic!("deploy/portcullis.yaml does not parse: {e}");
        }
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn bad_endpoint_names_field_and_value() {
        let e = err(&GOOD.replace("\"10.96.0.1:443\"", "\"10.96.0.1\""));
        assert!(e.contains("kernel.protected_endpoints[0]"), "{e}");
        assert!(e.contains("`10.96.0.1`"), "{e}");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err(&GOOD.replace("attach_cgroup", "atach_cgroup"));
        assert!(e.contains("atach_cgroup"), "{e}");
    }

    #[test]
    fn unspecified_listen_is_refused() {
        let e = err(&GOOD.replace("10.0.0.1:15443", "0.0.0.0:15443"));
        assert!(e.contains("listen.ipv4"), "{e}");
        assert!(e.contains("0.0.0.0:15443"), "{e}");
    }

    #[test]
    fn agent_cgroup_outside_attach_point_is_refused() {
        let e = err(&GOOD.replace("/kubepods/agent-a", "/other/agent-a"));
        assert!(e.contains("kernel.agent_cgroups[0]"), "{e}");
    }

    #[test]
    fn protecting_the_daemon_itself_is_refused() {
        let e = err(&GOOD.replace("\"192.168.1.10:*\"", "\"10.0.0.1:*\""));
        assert!(e.contains("kernel.protected_endpoints[2]"), "{e}");
    }

    const PROXY: &str = r#"
proxy:
  upstream:
    url: https://192.168.10.5:6443
    ca_file: /etc/portcullis/apiserver-ca.crt
    credential:
      bearer_token_file: /etc/portcullis/token
  impersonate:
    user: portcullis:agent
    groups: [portcullis:agents]
"#;

    #[test]
    fn proxy_section_parses_and_is_checked() {
        let c = parse(&format!("{GOOD}{PROXY}")).expect("proxy parses");
        let p = c.proxy.expect("proxy present");
        assert!(matches!(
            p.upstream.credential,
            Credential::BearerTokenFile(_)
        ));
        assert_eq!(p.header_timeout, std::time::Duration::from_secs(10));
        let e = err(&format!("{GOOD}{}", PROXY.replace("https://", "http://")));
        assert!(
            e.contains("proxy.upstream.url") && e.contains("http://192"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}{}",
            PROXY.replace("bearer_token_file", "bearer_tokn_file")
        ));
        assert!(
            e.contains("proxy.upstream.credential") && e.contains("bearer_tokn_file"),
            "{e}"
        );
        let both = PROXY.replace(
            "bearer_token_file: /etc/portcullis/token",
            "bearer_token_file: /t\n      in_cluster: true",
        );
        let e = err(&format!("{GOOD}{both}"));
        assert!(e.contains("exactly one of"), "{e}");
        let e = err(&format!(
            "{GOOD}{}",
            PROXY.replace("[portcullis:agents]", "[\"a,b\"]")
        ));
        assert!(e.contains("proxy.impersonate.groups[0]"), "{e}");
        let in_cluster = "proxy:\n  upstream:\n    credential: {in_cluster: true}\n  impersonate:\n    user: u\n";
        parse(&format!("{GOOD}{in_cluster}")).expect("in_cluster needs no url");
    }

    const GATED: &str = "proxy:\n  upstream:\n    credential: {in_cluster: true}\n  policy_file: /p.yaml\n  identity:\n    issuers:\n    - issuer: https://kubernetes.default.svc\n      kubernetes: true\n      audiences: [api]\n    - issuer: https://idp.example.com\n      audiences: [portcullis]\n      algorithms: [RS256, ES256]\n      username_claim: email\n      groups_claim: groups\n";

    #[test]
    fn gated_mode_parses_and_is_checked() {
        let c = parse(&format!("{GOOD}{GATED}")).expect("gated parses");
        let id = c.proxy.unwrap().identity.unwrap();
        assert_eq!(id.issuers.len(), 2);
        assert_eq!(id.issuers[1].algorithms.len(), 2);
        assert_eq!(id.leeway, std::time::Duration::from_secs(30));
        let e = err(&format!(
            "{GOOD}{}",
            GATED.replace("[RS256, ES256]", "[HS256]")
        ));
        assert!(
            e.contains("algorithms") && e.contains("shared-secret"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}{}",
            GATED.replace("  policy_file: /p.yaml\n", "")
        ));
        assert!(e.contains("proxy.policy_file"), "{e}");
        let e = err(&format!("{GOOD}{GATED}  impersonate: {{user: u}}\n"));
        assert!(e.contains("proxy.impersonate"), "{e}");
        let e = err(&format!(
            "{GOOD}{}",
            GATED.replace("https://idp", "http://idp")
        ));
        assert!(e.contains("issuers[1].issuer"), "{e}");
    }

    #[test]
    fn shared_secret_algorithms_are_refused() {
        assert!(parse_algorithm("HS256").is_err());
        assert!(parse_algorithm("none").is_err());
        assert_eq!(
            parse_algorithm("ES256").unwrap(),
            jsonwebtoken::Algorithm::ES256
        );
    }

    #[test]
    fn bad_port_is_refused() {
        for p in [
            "10.96.0.1:0",
            "10.96.0.1:65536",
            "10.96.0.1:http",
            "[fd00::5:6443",
        ] {
            assert!(p.parse::<Endpoint>().is_err(), "{p}");
        }
    }
}
