//! The `portcullis` command line: its arguments, and every line it prints. The work
//! is done by the library (the daemon in `app`, the kernel maps, `policy test`,
//! `audit verify`, sessions, export and replay in `audit`, the admin API client in
//! `admin`); each verb here calls it and presents the result, and says with the exit
//! code whether all was well.
mod admin;
mod audit;
mod barrier;
mod kernel;
mod policy;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config;

/// Where the daemon and the CLI read their configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/portcullis/portcullis.yaml";
const DEFAULT_AUDIT_DIR: &str = "/var/lib/portcullis/audit";

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "The gate between AI agents and the Kubernetes API"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node daemon: attach (or adopt) the kernel programs and serve agents.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Prepare the node for the DaemonSet (its init container, hostPID + privileged):
    /// enter the host's mount namespace, mount bpffs there and make it shared so pins
    /// outlive the pod, then check the kernel prerequisites; non-zero exit if any
    /// required one is missing.
    NodeSetup {
        /// Where bpffs is mounted on the host.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Whose mount namespace is the host's.
        #[arg(long, value_enum, default_value_t = HostNs::Auto)]
        host_mount_namespace: HostNs,
    },
    /// Wait until this pod's connections to the API server are answered by the gate
    /// (the agent pods' first init container); exit 1 after --timeout.
    Barrier {
        /// The interception CA (PEM), as the webhook injects it.
        #[arg(long, env = "PORTCULLIS_CA_PEM", hide_env_values = true)]
        ca_pem: Option<String>,
        /// The interception CA as a file.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// HOST:PORT of the API server (default: KUBERNETES_SERVICE_HOST/PORT).
        #[arg(long)]
        server: Option<String>,
        /// The name to ask for (SNI).
        #[arg(long, default_value = "kubernetes.default.svc")]
        name: String,
        #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Serve the admission webhook (a Deployment): agent pods get the barrier, CA trust
    /// and the guard; agents' workloads keep the agent label. Sets up the interception
    /// CA and the webhook's own certificate in the cluster first (once).
    Webhook {
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        #[arg(long, env = "POD_NAMESPACE", default_value = "portcullis-system")]
        namespace: String,
        #[arg(long, default_value = "portcullis-webhook")]
        service: String,
        /// The MutatingWebhookConfiguration and ValidatingWebhookConfiguration.
        #[arg(long, default_value = "portcullis")]
        configuration: String,
        #[arg(long, default_value = "portcullis-ca")]
        ca_secret: String,
        #[arg(long, default_value = "portcullis-webhook-tls")]
        tls_secret: String,
        /// The image of the barrier init container (default: this pod's own image).
        #[arg(long, env = "PORTCULLIS_IMAGE")]
        barrier_image: Option<String>,
        /// RuntimeClasses agent pods may use (runc-based; the hooks see their cgroups).
        #[arg(long = "runtime-class")]
        runtime_classes: Vec<String>,
        /// More DNS names the API server is reached by (the CA may certify them).
        #[arg(long = "api-name")]
        extra_names: Vec<String>,
        /// More API server addresses (public/load-balancer endpoints).
        #[arg(long = "api-ip")]
        extra_ips: Vec<std::net::IpAddr>,
        #[arg(
            long,
            default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
        )]
        cluster_ca: PathBuf,
        /// The node daemons' service account in --namespace (requests intermediates).
        #[arg(long, default_value = "portcullis-daemon")]
        daemon_service_account: String,
        /// Lifetime of a node's intermediate CA (renewed at half of it).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        intermediate_validity: std::time::Duration,
    },
    /// Exit 0 when the daemon of this config is serving (the DaemonSet's readiness).
    Ready {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check the kernel prerequisites and say how to fix each one that is missing.
    Doctor {
        /// Also check the paths in this config (attach cgroup, bpffs directory).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Enroll agent cgroups (they and their descendants go through the gate).
    Enroll {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        cgroups: Vec<PathBuf>,
    },
    /// Unenroll agent cgroups (their processes reach endpoints normally again).
    Unenroll {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        cgroups: Vec<PathBuf>,
    },
    /// Protect endpoints at run time (IP:PORT, [IPv6]:PORT, IP:*).
    Protect {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        endpoints: Vec<config::Endpoint>,
    },
    /// Stop protecting endpoints.
    Unprotect {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        endpoints: Vec<config::Endpoint>,
    },
    /// Show enrolled cgroups, protected endpoints and attached programs.
    Status {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// The interception CA agents trust for the API server's names.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Check a policy document against a table of expected decisions.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Requests waiting for a human (through the admin API).
    Approvals {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::ApprovalsCmd,
    },
    /// Just-in-time grants created by approvals.
    Grants {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        cmd: admin::GrantsCmd,
    },
    /// Tamper-evident audit evidence.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Re-issue a recorded session against a (sandbox) cluster and report where the
    /// outcomes differ from the recording; exits 1 if any do.
    Replay {
        /// A session ID from `portcullis audit sessions`.
        session: String,
        /// The audit directory.
        #[arg(long, default_value = DEFAULT_AUDIT_DIR)]
        dir: PathBuf,
        /// The API server to replay against, e.g. https://sandbox:6443.
        #[arg(long)]
        server: String,
        /// A bearer token for --server.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The CA of --server (PEM).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Really apply mutations (default: each carries dryRun=All).
        #[arg(long)]
        apply: bool,
        /// The idle gap that ends a session.
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach every program and remove the pins (uninstall). Agents then reach the API
    /// server directly: this is the only way enforcement ends.
    Unload {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the CA in the state directory (kept if it exists) and print its path.
    Init {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check every segment's hash chain and signed head, and the log against its
    /// off-node anchor; non-zero exit on any problem.
    Verify {
        /// The audit directory (segments and heads).
        dir: PathBuf,
        /// The daemon's audit public key (hex), from somewhere other than the node;
        /// default: the anchor's, else DIR/../audit.pub (which proves little: whoever
        /// can edit the log can replace it).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The anchor the daemon published off the node: its ConfigMap as
        /// `kubectl get configmap NAME -o json|yaml` prints it (or its `data`).
        #[arg(long)]
        anchor: Option<PathBuf>,
    },
    /// List agent sessions: one subject from one pod until idle for --idle.
    Sessions {
        #[arg(default_value = DEFAULT_AUDIT_DIR)]
        dir: PathBuf,
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Write the records as JSON lines: `k8s` (audit.k8s.io/v1 Events, one per request)
    /// or `raw` (the chained records as stored).
    Export {
        #[arg(default_value = DEFAULT_AUDIT_DIR)]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = audit::ExportFormat::K8s)]
        format: audit::ExportFormat,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Print Kubernetes RBAC generated from a policy: each scoped identity's rules,
    /// and the daemon's impersonation of exactly those identities.
    Rbac {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long, default_value = "portcullis-system")]
        namespace: String,
        #[arg(long, default_value = "portcullis-daemon")]
        service_account: String,
        /// Classic `impersonate` on the names instead of constrained impersonation
        /// (API servers before 1.36, or with ConstrainedImpersonation off).
        #[arg(long)]
        legacy: bool,
    },
    /// Run table-driven decision cases; exits non-zero on any mismatch.
    Test {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        cases: PathBuf,
    },
}

/// Whose mount namespace `node-setup` takes for the host's.
#[derive(Clone, Copy, clap::ValueEnum)]
enum HostNs {
    /// PID 1's; where it cannot be opened (a sandboxed init), the kubelet's.
    Auto,
    Pid1,
    Kubelet,
}

/// How a listing is printed.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// `0` when `ok`, else `1`.
fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs the command; an error is printed by the caller (anyhow's chain, once).
pub fn run(cli: Cli) -> Result<ExitCode> {
    let load = |p: &PathBuf| config::Config::load(p);
    match cli.cmd {
        Cmd::Run { config } => kernel::run(load(&config)?),
        Cmd::NodeSetup {
            bpffs,
            host_mount_namespace,
        } => kernel::node_setup(
            &bpffs,
            match host_mount_namespace {
                HostNs::Auto => crate::kernel::node::HostNamespace::Auto,
                HostNs::Pid1 => crate::kernel::node::HostNamespace::Pid1,
                HostNs::Kubelet => crate::kernel::node::HostNamespace::Kubelet,
            },
        ),
        Cmd::Ready { config } => kernel::ready(&load(&config)?),
        Cmd::Webhook {
            listen,
            namespace,
            service,
            configuration,
            ca_secret,
            tls_secret,
            barrier_image,
            runtime_classes,
            extra_names,
            extra_ips,
            cluster_ca,
            daemon_service_account,
            intermediate_validity,
        } => kernel::webhook(crate::admission::Options {
            listen,
            namespace,
            service,
            configuration,
            ca_secret,
            tls_secret,
            barrier_image,
            runtime_classes,
            extra_names,
            extra_ips,
            cluster_ca,
            daemon_service_account,
            intermediate_validity,
        }),
        Cmd::Barrier {
            ca_pem,
            ca_file,
            server,
            name,
            timeout,
        } => barrier::run(barrier::Args {
            ca_pem,
            ca_file,
            server,
            name,
            timeout,
        }),
        Cmd::Doctor { config } => Ok(kernel::doctor(
            config
                .map(|p| load(&p))
                .transpose()?
                .map(kernel::resolve)
                .transpose()?,
        )),
        Cmd::Enroll { config, cgroups } => kernel::enroll(&load(&config)?, &cgroups),
        Cmd::Unenroll { config, cgroups } => kernel::unenroll(&load(&config)?, &cgroups),
        Cmd::Protect { config, endpoints } => kernel::protect(&load(&config)?, &endpoints),
        Cmd::Unprotect { config, endpoints } => kernel::unprotect(&load(&config)?, &endpoints),
        Cmd::Status { config } => kernel::status(&load(&config)?),
        Cmd::Unload { config } => kernel::unload(&load(&config)?),
        Cmd::Ca {
            cmd: CaCmd::Init { config },
        } => kernel::ca_init(&load(&config)?),
        Cmd::Policy {
            cmd: PolicyCmd::Test { policy, cases },
        } => policy::test(&policy, &cases),
        Cmd::Policy {
            cmd:
                PolicyCmd::Rbac {
                    policy,
                    namespace,
                    service_account,
                    legacy,
                },
        } => policy::rbac(&policy, namespace, service_account, legacy),
        Cmd::Approvals { conn, cmd } => admin::approvals(&conn, cmd),
        Cmd::Grants { conn, cmd } => admin::grants(&conn, cmd),
        Cmd::Audit {
            cmd: AuditCmd::Verify { dir, key, anchor },
        } => audit::verify(&dir, key, anchor),
        Cmd::Audit {
            cmd: AuditCmd::Sessions { dir, idle, output },
        } => audit::sessions(&dir, idle, output),
        Cmd::Audit {
            cmd: AuditCmd::Export { dir, format },
        } => audit::export(&dir, format),
        Cmd::Replay {
            session,
            dir,
            server,
            token_file,
            ca_file,
            apply,
            idle,
            output,
        } => audit::replay(
            &session,
            &dir,
            crate::audit::Target {
                server,
                token_file,
                ca_file,
                apply,
            },
            idle,
            output,
        ),
    }
}
