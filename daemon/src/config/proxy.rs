//! The `proxy` section: the gate's upstream, identity, approvals, admin API, masking
//! and audit settings.
use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Deserializer, Serialize, de};

/// The proxy section, checked: the gate's settings, its mode decided once.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub upstream: Upstream,
    /// How requests are authorized.
    pub mode: Mode,
    pub approvals: Approvals,
    pub admin: Admin,
    pub masking: Masking,
    pub audit: Audit,
    pub tls_names: Vec<String>,
    pub accept_unredirected: bool,
    pub max_header_bytes: usize,
    pub header_timeout: std::time::Duration,
    pub limits: Limits,
    /// Threads serving agents' connections, each with its own event loop and its own
    /// API server connections.
    pub event_loops: usize,
}

/// Bounds on what agents may hold open, so one agent cannot starve the others or the
/// daemon. An agent is its enrolled cgroup (the pod), or its address for a connection
/// the kernel did not redirect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Open agent connections in total; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections of one agent; more are closed at once.
    #[serde(default = "default_max_connections_per_agent")]
    pub max_connections_per_agent: usize,
    /// Requests one agent may have in flight (watches and exec sessions included),
    /// over all its connections; more get a 429 Status.
    #[serde(default = "default_max_requests_per_agent")]
    pub max_requests_per_agent: usize,
    /// Concurrent HTTP/2 streams one connection may open.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    #[serde(default = "default_idle_timeout", with = "humantime_serde_compat")]
    pub idle_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            max_connections_per_agent: default_max_connections_per_agent(),
            max_requests_per_agent: default_max_requests_per_agent(),
            max_streams_per_connection: default_max_streams_per_connection(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

fn default_max_connections() -> usize {
    8192
}
fn default_max_connections_per_agent() -> usize {
    256
}
fn default_max_requests_per_agent() -> usize {
    1024
}
fn default_max_streams_per_connection() -> u32 {
    1000
}
fn default_idle_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(300)
}

/// How the gate authorizes requests.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Every enrolled agent acts as one scoped identity: no token checks, no policy.
    PassThrough(Impersonate),
    /// The agent's token (bound to its pod) names the subject; the policy decides and
    /// names the subject's upstream identity.
    Gated {
        identity: Identity,
        policy_file: PathBuf,
    },
}

impl Mode {
    /// `identity` when gated (remote approvers authenticate with it too).
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Mode::PassThrough(_) => None,
            Mode::Gated { identity, .. } => Some(identity),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProxySpec {
    pub(super) upstream: Upstream,
    /// Pass-through mode only (no `identity`/`policy_file`): one scoped identity the
    /// daemon impersonates for every request of every enrolled agent. With a policy,
    /// each subject's identity comes from the policy's `identities`.
    #[serde(default)]
    pub(super) impersonate: Option<Impersonate>,
    /// Who the agent is: trusted token issuers.
    #[serde(default)]
    pub(super) identity: Option<Identity>,
    /// The policy document (hot-reloaded on change).
    #[serde(default)]
    pub(super) policy_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) approvals: Approvals,
    #[serde(default)]
    pub(super) admin: Admin,
    /// What is masked in responses (Secrets always).
    #[serde(default)]
    pub(super) masking: Masking,
    /// Audit evidence of every request.
    #[serde(default)]
    pub(super) audit: Audit,
    /// Names for the leaf certificates besides kubernetes, kubernetes.default,
    /// kubernetes.default.svc, kubernetes.default.svc.cluster.local, the SNI the agent
    /// sent and the address it dialled (e.g. the API server's public DNS name).
    #[serde(default)]
    pub(super) tls_names: Vec<String>,
    /// Serve connections the kernel did not redirect (no origin record). Off: such a
    /// connection could come from any pod that dials the daemon's address, and would be
    /// forwarded with the daemon's credential.
    #[serde(default)]
    pub(super) accept_unredirected: bool,
    /// Limit on a request's header block; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub(super) max_header_bytes: usize,
    /// A client must finish sending headers (and the TLS handshake) within this.
    #[serde(default = "default_header_timeout", with = "humantime_serde_compat")]
    pub(super) header_timeout: std::time::Duration,
    /// Connection and request caps per agent and in total, idle timeout.
    #[serde(default)]
    pub(super) limits: Limits,
    /// Threads serving agents' connections (1 to 64), each an event loop owning its
    /// connections and its own API server connections. Default: one per CPU the
    /// daemon may use, at most 8.
    #[serde(default)]
    pub(super) event_loops: Option<usize>,
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

/// A `credential` block that does not name exactly one credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("give both client_cert_file and client_key_file")]
    HalfCertificate,
    #[error(
        "give exactly one of bearer_token_file, client_cert_file + client_key_file, or in_cluster: true"
    )]
    NotOne,
}

impl TryFrom<CredentialSpec> for Credential {
    type Error = CredentialError;

    fn try_from(s: CredentialSpec) -> Result<Self, CredentialError> {
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
                Err(CredentialError::HalfCertificate)
            }
            _ => Err(CredentialError::NotOne),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Clock skew tolerated on exp/nbf.
    #[serde(default = "default_leeway", with = "humantime_serde_compat")]
    pub leeway: std::time::Duration,
    /// How long a TokenReview's answer for a service-account token (by `jti`) is
    /// reused: a deleted pod or service account stops working within this (plus the
    /// API server's own token cache, 10 s).
    #[serde(default = "default_review_ttl", with = "humantime_serde_compat")]
    pub token_review_ttl: std::time::Duration,
    pub issuers: Vec<IssuerConfig>,
}

fn default_review_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(3)
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
    /// Kubernetes issuers: every token is also checked with the API server's
    /// TokenReview (cached by `jti` for `token_review_ttl`), so a token whose pod or
    /// service account was deleted stops working. On by default.
    #[serde(default = "yes")]
    pub token_review: bool,
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
    /// Disk budget of the audit directory. When a record would exceed it, segments the
    /// sink has acknowledged are deleted (oldest first, the deletion itself recorded in
    /// the chain); if that does not make room, mutations get a 503 Status (and reads
    /// too with `fail_closed_reads`) until the sink catches up. Without a sink nothing
    /// is deleted: archive and remove segments yourself.
    #[serde(default = "default_audit_disk_bytes")]
    pub max_disk_bytes: u64,
    /// Ship records to an HTTP collector as well.
    #[serde(default)]
    pub sink: Option<AuditSink>,
    /// Publish each signed head off the node, to a Kubernetes object.
    #[serde(default)]
    pub anchor: Option<AuditAnchor>,
}

/// The ConfigMap the daemon writes its newest signed head and public key to, with its
/// own credential (grant it get/create/update/patch on that ConfigMap).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAnchor {
    pub namespace: String,
    pub name: String,
    /// At most one write per interval (and one when the daemon stops).
    #[serde(default = "default_anchor_every", with = "humantime_serde_compat")]
    pub every: std::time::Duration,
}

fn default_anchor_every() -> std::time::Duration {
    std::time::Duration::from_secs(2)
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            level: AuditLevel::default(),
            max_body_bytes: default_audit_body(),
            fail_closed_reads: true,
            segment_bytes: default_segment_bytes(),
            max_disk_bytes: default_audit_disk_bytes(),
            sink: None,
            anchor: None,
        }
    }
}

fn default_audit_body() -> usize {
    64 << 10
}
fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_audit_disk_bytes() -> u64 {
    4 << 30
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
pub(super) mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, de};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| de::Error::custom(format!("`{s}` is not a duration like 10s: {e}")))
    }
}
