//! The daemon's one YAML configuration file, parsed in one place.
//!
//! Unknown fields are refused, and every error names the field (as a path such as
//! `kernel.protected_endpoints[2]`) and the offending value. `deploy/portcullis.yaml`
//! is the documented example.//!
//! By section: this file (the top level, the state directory's layout), `proxy` (the
//! gate's settings), `addr` (listen addresses, protected endpoints), `validate` (what
//! serde cannot check, and the proxy's mode, decided once).
mod addr;
mod discovery;
mod enrollment;
pub(crate) mod env;
mod proxy;
mod validate;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use addr::{ConcreteAddr, Endpoint, EndpointError};
pub use discovery::{Discovery, NodeCa};
pub use enrollment::Enrollment;
pub use env::EnvError;
use proxy::ProxySpec;
pub use proxy::{
    Admin, AdminHttps, AlgorithmError, Approvals, Audit, AuditAnchor, AuditLevel, AuditSink,
    Credential, CredentialError, Encoding, Identity, Impersonate, IssuerConfig, Limits, MaskRule,
    Masking, Mode, Proxy, Upstream, Webhook, WebhookFormat, parse_algorithm,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Env { path: PathBuf, source: EnvError },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The configuration, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where redirected agent connections arrive (concrete addresses: the kernel
    /// rewrites agents' connects to them).
    pub listen: Listen,
    pub kernel: Kernel,
    /// The TLS-terminating API proxy. Without it the daemon only enforces: redirected
    /// connections are recorded and closed, so agents fail closed.
    pub proxy: Option<Proxy>,
    /// Daemon state: CA, event logs, kernel attach state (see [`StatePaths`]).
    pub state_dir: PathBuf,
    pub log: Log,
    pub event_logs: EventLogs,
    /// Agent pods on this node enrolled by label (needs the API server).
    pub enrollment: Option<Enrollment>,
    /// Protected endpoints found in the cluster (needs the API server).
    pub discovery: Option<Discovery>,
    /// Serve from this node's own intermediate CA (needs the API server).
    pub node_ca: Option<NodeCa>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// The file as written (serde's view, checked by `validate`).
struct ConfigSpec {
    /// Where redirected agent connections arrive. The kernel rewrites agents' connects
    /// to these addresses, so they must be concrete (not 0.0.0.0 / ::).
    pub listen: Listen,
    pub kernel: Kernel,
    /// The TLS-terminating API proxy. Without it the daemon only enforces: redirected
    /// connections are recorded and closed, so agents fail closed.
    pub proxy: Option<ProxySpec>,
    /// Daemon state: CA, event logs, kernel attach state.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub event_logs: EventLogs,
    pub enrollment: Option<Enrollment>,
    pub discovery: Option<Discovery>,
    pub node_ca: Option<NodeCa>,
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
    /// `auto`: the kubelet's pod cgroup root (`kubepods` / `kubepods.slice`), found
    /// from the daemon's own pod (`POD_UID` in the environment) at start.
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
    /// How often the daemon checks that its programs are in effect on every enrolled
    /// cgroup (and re-attaches them if someone detached them).
    #[serde(
        default = "default_verify_interval",
        with = "proxy::humantime_serde_compat"
    )]
    pub verify_interval: std::time::Duration,
    /// Freeze (cgroup.freeze) an enrolled cgroup the programs cannot be put in effect
    /// on, until they are: fail closed instead of only reporting it.
    #[serde(default = "default_true")]
    pub freeze_unenforced: bool,
}

/// Disk budget of the daemon's JSON-lines logs (`kernel-events.jsonl`,
/// `connections.jsonl`): each rotates at `max_file_bytes` and keeps `max_files`
/// rotated files (`.1` newest), so one log never takes more than
/// `max_file_bytes * (max_files + 1)`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLogs {
    #[serde(default = "default_log_file_bytes")]
    pub max_file_bytes: u64,
    #[serde(default = "default_log_files")]
    pub max_files: u32,
    /// Kernel events written one by one per second (over all agents); the rest are
    /// counted into aggregated records (count, first and last time per agent, kind
    /// and hook). The kernel programs already send at most 20 per second, CPU, agent
    /// cgroup, kind and hook.
    #[serde(default = "default_events_per_second")]
    pub events_per_second: u32,
}

impl Default for EventLogs {
    fn default() -> Self {
        EventLogs {
            max_file_bytes: default_log_file_bytes(),
            max_files: default_log_files(),
            events_per_second: default_events_per_second(),
        }
    }
}

fn default_log_file_bytes() -> u64 {
    16 << 20
}
fn default_log_files() -> u32 {
    3
}
fn default_events_per_second() -> u32 {
    200
}
fn default_verify_interval() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `portcullis=debug`.
    #[serde(default = "default_level")]
    pub level: String,
}

/// A configuration without a `log` section logs as one with an empty one (a derived
/// default once gave an empty filter: errors only).
impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
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
    /// The last check that the programs are in effect on every enrolled cgroup.
    pub fn kernel_effect(&self) -> PathBuf {
        self.dir.join("kernel-effect.json")
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
    /// The agent pods the daemon enrolled by selector (JSON: [[pod, enrolled]]).
    pub fn enrollment(&self) -> PathBuf {
        self.dir.join("enrollment.json")
    }
    /// The endpoints discovery protects (JSON).
    pub fn discovered(&self) -> PathBuf {
        self.dir.join("protected.json")
    }
    /// This node's intermediate CA and its key (with `node_ca`).
    pub fn node_ca_dir(&self) -> PathBuf {
        self.dir.join("node-ca")
    }
    /// The interception CA.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }
}

impl Kernel {
    /// `attach_cgroup: auto` (resolved at start, see the field).
    pub fn attach_auto(&self) -> bool {
        self.attach_cgroup == Path::new(AUTO)
    }
}

/// The `attach_cgroup` value that asks for discovery.
pub const AUTO: &str = "auto";

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
        let text =
            env::expand(&text, |n| std::env::var(n).ok()).map_err(|source| ConfigError::Env {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: ConfigSpec = serde_path_to_error::deserialize(de).map_err(|e| {
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
        validate::validate(raw, path)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

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
        // No `log` section logs as an empty one does.
        let empty = parse(&format!("{GOOD}log: {{}}\n")).expect("an empty log section");
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.level, empty.log.level);
        assert_eq!(c.log.format, empty.log.format);
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
    fn event_loops_default_to_the_cpus_and_are_bounded() {
        let p = parse(&format!("{GOOD}{PROXY}"))
            .expect("proxy parses")
            .proxy
            .expect("proxy present");
        assert_eq!(p.event_loops, crate::loops::default_count());
        assert!((1..=crate::loops::DEFAULT_MAX_LOOPS).contains(&p.event_loops));
        let with = |n: &str| format!("{GOOD}{PROXY}  event_loops: {n}\n");
        let p = parse(&with("3")).expect("3 loops").proxy.expect("proxy");
        assert_eq!(p.event_loops, 3);
        for bad in ["0", "65"] {
            let e = err(&with(bad));
            assert!(e.contains("proxy.event_loops") && e.contains(bad), "{e}");
        }
    }

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
        let id = c.proxy.unwrap().mode.identity().cloned().unwrap();
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
