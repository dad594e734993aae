//! `portcullis run`: the only place every part is wired together. Kernel enforcement
//! first (attached or adopted), then the audit log, the gate (identity, policy,
//! approvals, masking, the upstream) and the admin API, then the listeners, then the
//! event logs until a signal. A stopped daemon leaves enforcement in place.
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use portcullis_common::{Settings, SockKey, settings_flags};
use serde::Serialize;
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{info, warn};

use crate::{
    admin::{self, Admin},
    approvals::{Approvals, Notifier, RedbStore},
    audit::{self, AuditLog},
    config::{self, Config, Log, LogFormat, Mode},
    endpoints, enroll,
    gate::{self, Authorizer, Gate, Gated},
    identity::{Authenticator, JwksCache, Source},
    kernel::{self, BpfOriginLookup, PinnedMaps, PodResolver, bpffs, cgroup, endpoint_key, events},
    loops,
    mask::Masking,
    nodeca,
    policy::PolicyHandle,
    tls::{self, CaPaths, LeafMinter},
    upstream::{ConfigMapAnchor, Impersonation, Upstream},
    util::JsonlWriter,
};

pub fn init_tracing(log: &Log) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    // Colours only for a terminal: in a file or a container log they are noise, and
    // styling every field of the per-request line was a measurable part of its cost.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

#[derive(Serialize)]
struct Ready<'a> {
    pid: u32,
    mode: &'a str,
    listen: Vec<SocketAddr>,
    programs: &'a [(String, u32, u32)],
}

mod handover;

pub async fn run(cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state_dir {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", cfg.state_dir.display()))?;
    let state_paths = cfg.state();
    let ready_file = state_paths.ready();
    let hand = handover::Paths::new(&cfg.state_dir);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if handover::handed_over(&hand) {
        // A restarted container of a pod that already handed this node over: the
        // successor serves; stay out of its way until this pod is deleted.
        info!("this pod handed the node over to its successor; idle until stopped");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return Ok(());
    }

    bpffs::ensure(&cfg.kernel.bpffs_dir, cfg.kernel.mount_bpffs)?;
    // Refuse to start where the kernel lacks what enforcement needs.
    let missing: Vec<String> = kernel::doctor::checks(Some(&cfg))
        .into_iter()
        .filter(|c| c.is_prerequisite() && !c.passes())
        .map(|c| format!("{}: {} (fix: {})", c.name, c.detail, c.fix))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "this node lacks what enforcement needs (`portcullis doctor`):\n  {}",
            missing.join("\n  ")
        );
    }
    if !cgroup::is_cgroup2(&cfg.kernel.attach_cgroup) {
        anyhow::bail!(
            "kernel.attach_cgroup `{}` is not on a cgroup v2 filesystem (see `portcullis doctor`)",
            cfg.kernel.attach_cgroup.display()
        );
    }
    let object = kernel::object_bytes(cfg.kernel.bpf_object.as_deref())?;
    let settings = settings(&cfg, kernel::btf::KernelBtf::load().ok().as_ref());
    let agent_ids: Vec<(std::path::PathBuf, u64)> = cfg
        .kernel
        .agent_cgroups
        .iter()
        .map(|p| cgroup::id_of(p).map(|id| (p.clone(), id)))
        .collect::<Result<_, _>>()?;
    for (path, _) in &agent_ids {
        if !cgroup::is_below(path, &cfg.kernel.attach_cgroup) {
            anyhow::bail!(
                "kernel.agent_cgroups: {} is not below kernel.attach_cgroup {}: the programs attached there never see its sockets, so it would look enforced without being enforced",
                path.display(),
                cfg.kernel.attach_cgroup.display()
            );
        }
    }
    match kernel::raise_nofile_limit() {
        Ok((before, after)) => info!(before, after, "open-file limit raised to the hard limit"),
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
    let paths = kernel::Paths::new(&cfg.kernel.bpffs_dir);
    let state = kernel::start(
        &object,
        &cfg.kernel.attach_cgroup,
        &paths,
        &state_paths.kernel_state(),
        false,
        |maps: &mut PinnedMaps| {
            maps.write_settings(&settings)?;
            for (i, ep) in cfg.kernel.protected_endpoints.iter().enumerate() {
                maps.protect(endpoint_key(ep), i as u32)?;
            }
            for (path, id) in &agent_ids {
                maps.enroll(*id)?;
                info!(cgroup = %path.display(), id, "enrolled agent cgroup");
            }
            Ok(())
        },
    )?;

    // Program diagnostics (aya-log) from the pinned programs, whether loaded or adopted.
    if let Some(id) = kernel::program_id(&state, "pc_connect4") {
        tokio::spawn(events::forward_program_log(id));
    }

    let maps = Arc::new(Mutex::new(PinnedMaps::open(&paths.maps())?));
    if let Some(d) = &cfg.discovery {
        let kcfg = enroll::kube_config(&cfg).context("discovery: the API client")?;
        let task = endpoints::run(
            d.clone(),
            kcfg,
            cfg.kernel.protected_endpoints.clone(),
            maps.clone(),
            state_paths.discovered(),
        );
        tokio::spawn(async move {
            if let Err(e) = task.await {
                warn!(error = %e, "endpoint discovery stopped");
            }
        });
    }
    if let Some(sel) = &cfg.enrollment {
        let kcfg = enroll::kube_config(&cfg).context("enrollment: the API client")?;
        let task = enroll::run(
            sel.clone(),
            kcfg,
            cfg.kernel.attach_cgroup.clone(),
            maps.clone(),
            state_paths.enrollment(),
        );
        tokio::spawn(async move {
            if let Err(e) = task.await {
                warn!(error = %e, "enrollment by selector stopped");
            }
        });
    }
    let lookup = Arc::new(BpfOriginLookup::new(maps.clone()));
    let (ev_tx, mut ev_rx) = mpsc::channel(4096);
    let ring = PinnedMaps::open_events(&paths.maps())?;
    tokio::spawn(async move {
        if let Err(e) = events::pump(ring, ev_tx).await {
            warn!(error = %e, "kernel event reader stopped");
        }
    });

    // The listen addresses are bound now (SO_REUSEPORT): a running predecessor can let
    // go, and connections meanwhile wait in this backlog instead of being refused.
    let mut listeners = Vec::new();
    for addr in [cfg.listen.ipv4, cfg.listen.ipv6].into_iter().flatten() {
        let l = crate::util::reuseport_listener(addr.0)
            .with_context(|| format!("binding listen address {}", addr.0))?;
        listeners.push((addr.0, l));
    }
    handover::take_over(&hand).await;

    // Tamper-evident evidence (hash chain, signed segment heads): kernel events, every
    // request and its outcome, approval state changes.
    let audit_cfg = cfg
        .proxy
        .as_ref()
        .map(|p| p.audit.clone())
        .unwrap_or_default();
    let audit_key = audit::load_or_create_key(&state_paths.audit_key())?;
    let audit_public = {
        use ring::signature::KeyPair;
        hex::encode(audit_key.public_key().as_ref())
    };
    let audit_writer =
        audit::AuditWriter::open(&state_paths.audit_dir(), audit_key, audit_cfg.segment_bytes)?
            .with_disk_budget(audit_cfg.max_disk_bytes);
    let audit = AuditLog::start(audit_writer, &audit_cfg).context("starting the audit writer")?;
    if let Some(sink) = &audit_cfg.sink {
        let shipper =
            audit::Shipper::new(sink, &state_paths.audit_dir()).context("proxy.audit.sink")?;
        tokio::spawn(shipper.run(audit.committed()));
    }

    let mut anchor: Option<Arc<dyn audit::AnchorStore>> = None;
    let gate = match &cfg.proxy {
        Some(pcfg) => {
            let minter = match &cfg.node_ca {
                None => Arc::new(LeafMinter::load(
                    &CaPaths::new(&state_paths.ca_dir()),
                    pcfg.tls_names.clone(),
                )?),
                Some(nc) => {
                    // This node's own intermediate: its key is made here and stays here.
                    let paths = CaPaths::new(&state_paths.node_ca_dir());
                    let client = nodeca::client(
                        enroll::kube_config(&cfg).context("node_ca: the API client")?,
                    )?;
                    nodeca::obtain(
                        &client,
                        &nc.node_name,
                        nc.validity,
                        &paths,
                        std::time::Duration::from_secs(60),
                    )
                    .await
                    .context("node_ca: this node's intermediate CA")?;
                    let m = Arc::new(LeafMinter::load(&paths, pcfg.tls_names.clone())?);
                    tokio::spawn(nodeca::renew(
                        client,
                        nc.node_name.clone(),
                        nc.validity,
                        paths,
                        m.clone(),
                    ));
                    m
                }
            };
            let upstream =
                Arc::new(Upstream::new(pcfg).context("setting up the API server connection")?);
            if let Some(a) = &audit_cfg.anchor {
                let store: Arc<dyn audit::AnchorStore> = Arc::new(ConfigMapAnchor::new(
                    upstream.clone(),
                    &a.namespace,
                    &a.name,
                ));
                tokio::spawn(anchor_task(
                    store.clone(),
                    audit.clone(),
                    state_paths.audit_dir(),
                    audit_public.clone(),
                    a.every,
                ));
                anchor = Some(store);
            }
            let authorizer = authorizer(&cfg, pcfg, &upstream, &minter, &audit).await?;
            let masking = Arc::new(Masking::from_config(&pcfg.masking)?);
            info!(upstream = %upstream.base(), "proxying agents to the API server");
            Some(Arc::new(Gate::new(
                minter,
                upstream,
                authorizer,
                pcfg,
                masking,
                audit.clone(),
            )))
        }
        None => {
            warn!(
                "no `proxy` section: redirected connections are recorded and closed (enforcement only)"
            );
            None
        }
    };

    // The agents' connections are served on event loops of their own (stopped when
    // this returns, before the main runtime).
    let serving = match (&gate, &cfg.proxy) {
        (Some(g), Some(p)) => {
            info!(event_loops = p.event_loops, "serving agents");
            Some((g.clone(), loops::EventLoops::start(p.event_loops)?))
        }
        _ => None,
    };
    // Memory a burst of agents' requests used and freed goes back to the kernel
    // (glibc keeps it resident otherwise: 10,000 watches opened at once left 60 MB).
    tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let t = std::time::Instant::now();
            if let Ok(true) = tokio::task::spawn_blocking(kernel::release_free_heap).await {
                tracing::debug!(
                    took_us = t.elapsed().as_micros() as u64,
                    "free heap pages released"
                );
            }
        }
    });
    let (acc_tx, mut acc_rx) = mpsc::channel(4096);
    let mut listening = Vec::new();
    for (addr, l) in listeners {
        info!(%addr, "listening for redirected agent connections");
        listening.push(addr);
        tokio::spawn(gate::serve(
            l,
            lookup.clone(),
            acc_tx.clone(),
            serving.clone(),
        ));
    }
    drop(acc_tx);

    let budget = &cfg.event_logs;
    let mut kernel_log = JsonlWriter::open_rotating(
        &state_paths.kernel_events(),
        budget.max_file_bytes,
        budget.max_files,
    )?;
    let mut conn_log = JsonlWriter::open_rotating(
        &state_paths.connections(),
        budget.max_file_bytes,
        budget.max_files,
    )?;
    let mut flood = kernel::flood::Aggregator::new(budget.events_per_second);
    let counts = kernel::flood::open_counts(&paths.maps())?;
    let clock = events::BootClock::now();
    let mut aggregate_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    aggregate_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Programs actually in effect, checked now and every verify_interval.
    let (effect_tx, mut effect_rx) = mpsc::channel(16);
    tokio::spawn(
        kernel::watch::Watch {
            object: object.clone(),
            attach_cgroup: cfg.kernel.attach_cgroup.clone(),
            paths: kernel::Paths::new(&cfg.kernel.bpffs_dir),
            state_file: state_paths.kernel_state(),
            effect_file: state_paths.kernel_effect(),
            settings,
            freeze: cfg.kernel.freeze_unenforced,
            interval: cfg.kernel.verify_interval,
        }
        .run(effect_tx),
    );
    let ready = Ready {
        pid: std::process::id(),
        mode: &state.mode,
        listen: listening,
        programs: &state.programs,
    };
    std::fs::write(&ready_file, serde_json::to_vec(&ready)?)?;
    info!(mode = %state.mode, "portcullis ready");
    let (stop_tx, mut stop_rx) = mpsc::channel(1);
    tokio::spawn(handover::serve(hand, stop_tx));

    loop {
        tokio::select! {
            Some(ev) = ev_rx.recv() => {
                tracing::debug!(kind = ev.kind, hook = ev.hook, pid = ev.origin.pid, comm = %ev.origin.comm,
                      dst = %ev.dst, redirected_to = %ev.redirected_to, "kernel event");
                if flood.admit(&ev) {
                    if let Err(e) = kernel_log.append(&ev) {
                        warn!(error = %e, path = %kernel_log.path().display(), "writing kernel event");
                    }
                    audit.record(audit::Kind::KernelEvent, &ev);
                }
                if ev_rx.is_empty() {
                    flush(&mut kernel_log);
                }
            }
            _ = aggregate_tick.tick() => {
                flood.kernel_counts(kernel::flood::read_counts(&counts), &clock);
                let summaries = flood.flush();
                for s in &summaries {
                    if let Err(e) = kernel_log.append(s) {
                        warn!(error = %e, path = %kernel_log.path().display(), "writing aggregated kernel events");
                    }
                    audit.record(audit::Kind::KernelEvent, s);
                }
                if !summaries.is_empty() {
                    flush(&mut kernel_log);
                }
            }
            Some(report) = effect_rx.recv() => {
                if let Err(e) = kernel_log.append(&report) {
                    warn!(error = %e, path = %kernel_log.path().display(), "writing enforcement report");
                }
                flush(&mut kernel_log);
                audit.record(audit::Kind::KernelEvent, &report);
            }
            Some(acc) = acc_rx.recv() => {
                if let Err(e) = conn_log.append(&acc) {
                    warn!(error = %e, path = %conn_log.path().display(), "writing connection record");
                }
                if acc_rx.is_empty() {
                    flush(&mut conn_log);
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            Some(()) = stop_rx.recv() => {
                info!("handed over to the next daemon");
                break;
            }
        }
    }
    flush(&mut kernel_log);
    flush(&mut conn_log);
    if let Some(store) = &anchor {
        // What was written until now leaves the node before the daemon does (the
        // writer commits within its interval).
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            audit::publish_last(store.as_ref(), &state_paths.audit_dir(), &audit_public),
        )
        .await;
    }
    // Programs stay attached and pinned: agents fail closed until the next start adopts.
    // The ready file goes only if it is still this daemon's (after a hand-over it may
    // already be the successor's).
    let ours = std::fs::read_to_string(&ready_file)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["pid"].as_u64() == Some(u64::from(std::process::id())));
    if ours {
        let _ = std::fs::remove_file(&ready_file);
    }
    info!("stopping; kernel enforcement stays in place (pinned)");
    Ok(())
}

/// The off-node anchor: first the log is checked against the last anchor (records
/// it vouches for that are gone or changed are recorded as damage), then every new
/// signed head is published.
async fn anchor_task(
    store: Arc<dyn audit::AnchorStore>,
    log: Arc<AuditLog>,
    dir: std::path::PathBuf,
    public: String,
    every: std::time::Duration,
) {
    match store.fetch().await {
        Ok(Some(a)) => {
            let key = hex::decode(&public).unwrap_or_default();
            let findings = audit::check_anchor(&dir, &a, &key);
            if findings.is_empty() {
                info!(anchor = %store.describe(), seq = a.head.last_seq, "the audit log holds what its anchor vouches for");
            } else {
                warn!(anchor = %store.describe(), ?findings, "the audit log does not hold what its off-node anchor vouches for");
                log.record(
                    audit::Kind::Damage,
                    &serde_json::json!({
                        "reason": "the off-node anchor vouches for records this log does not hold unchanged",
                        "anchor": store.describe(),
                        "anchored_seq": a.head.last_seq,
                        "anchored_at": a.updated,
                        "findings": findings,
                    }),
                );
            }
        }
        Ok(None) => info!(anchor = %store.describe(), "no audit anchor yet; publishing the first"),
        Err(e) => {
            warn!(anchor = %store.describe(), error = %e, "the audit anchor cannot be read; the log is not checked against it")
        }
    }
    audit::publish_heads(store, dir, public, log.committed(), every).await;
}

/// How the gate authorizes: pass-through, or identity, policy and approvals (with
/// the admin API approvers use).
async fn authorizer(
    cfg: &Config,
    pcfg: &config::Proxy,
    upstream: &Arc<Upstream>,
    minter: &Arc<LeafMinter>,
    audit: &Arc<AuditLog>,
) -> Result<Authorizer> {
    let (idc, policy_file) = match &pcfg.mode {
        Mode::PassThrough(imp) => {
            warn!(user = %imp.user, "pass-through mode: no token checks and no policy; every enrolled agent acts as this identity");
            return Ok(Authorizer::PassThrough(Impersonation::new(
                &imp.user,
                &imp.groups,
            )));
        }
        Mode::Gated {
            identity,
            policy_file,
        } => (identity, policy_file),
    };
    let mut keys = Vec::new();
    for i in &idc.issuers {
        let source = if i.kubernetes {
            Source::ApiServer(upstream.clone())
        } else {
            Source::Oidc {
                client: Box::new(
                    tls::https_client(i.ca_file.as_deref(), false)
                        .with_context(|| format!("issuer {}", i.issuer))?,
                ),
                issuer: i.issuer.clone(),
                jwks_url: i.jwks_url.clone(),
            }
        };
        let k = Arc::new(JwksCache::new(&i.issuer, source));
        // Warm the key cache; a failure is retried on first use.
        let warm = k.clone();
        tokio::spawn(async move {
            warm.refresh().await;
        });
        keys.push(k);
    }
    let authn = Arc::new(Authenticator::new(idc, keys).with_reviews(upstream.clone()));
    let policy = PolicyHandle::load(policy_file)?;
    tokio::spawn(policy.clone().watch(std::time::Duration::from_secs(1)));
    let store = Arc::new(RedbStore::open(&cfg.state().approvals_db())?);
    let notifier = pcfg
        .approvals
        .webhook
        .as_ref()
        .map(Notifier::new)
        .transpose()
        .context("proxy.approvals.webhook")?;
    let approvals = Arc::new(
        Approvals::open(
            store,
            &cfg.state().approvals_log(),
            notifier,
            pcfg.approvals.pending_ttl,
        )?
        .chained(audit.clone()),
    );
    tokio::spawn(approvals.clone().sweep(std::time::Duration::from_secs(2)));
    let admin = Arc::new(Admin {
        approvals: approvals.clone(),
        policy: policy.clone(),
        authenticator: authn.clone(),
        approver_groups: pcfg
            .admin
            .https
            .as_ref()
            .map(|h| h.approver_groups.clone())
            .unwrap_or_default(),
    });
    let socket = cfg.admin_socket();
    {
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(e) = admin::serve_unix(admin, &socket).await {
                warn!(error = %e, socket = %socket.display(), "admin socket unavailable");
            }
        });
    }
    if let Some(h) = &pcfg.admin.https {
        let l = TcpListener::bind(h.listen)
            .await
            .with_context(|| format!("binding proxy.admin.https.listen {}", h.listen))?;
        info!(addr = %h.listen, "admin API listening (HTTPS)");
        tokio::spawn(admin::serve_https(admin, l, minter.clone()));
    }
    Ok(Authorizer::Gated(Gated {
        authn,
        policy,
        approvals,
        pods: Arc::new(PodResolver::new(&cfg.kernel.attach_cgroup)),
    }))
}

fn flush(w: &mut JsonlWriter) {
    if let Err(e) = w.flush() {
        warn!(error = %e, path = %w.path().display(), "flushing event log");
    }
}

/// The settings map: the daemon's addresses, and the kernel offsets the programs need
/// (each group only where this kernel's BTF had it).
fn settings(cfg: &Config, btf: Option<&kernel::btf::KernelBtf>) -> Settings {
    let mut s = Settings::default();
    if let Some(a) = cfg.listen.ipv4 {
        s.daemon_v4 = SockKey::from(a.0);
        s.flags |= settings_flags::HAVE_DAEMON_V4;
    }
    if let Some(a) = cfg.listen.ipv6 {
        s.daemon_v6 = SockKey::from(a.0);
        s.flags |= settings_flags::HAVE_DAEMON_V6;
    }
    let Some(btf) = btf else {
        warn!("no kernel BTF: fork tracking is disabled");
        return s;
    };
    match btf.task_tgid_offset() {
        Ok(off) => {
            s.task_tgid_offset = off;
            s.flags |= settings_flags::HAVE_TASK_OFFSETS;
        }
        Err(e) => {
            warn!(error = %e, "fork tracking disabled: processes that leave an agent cgroup and then fork are not followed")
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Under the filter the daemon builds from `level` (no `RUST_LOG`): whether the
    /// per-request line and an info line of the daemon would be written.
    fn request_line_and_info(level: &str) -> (bool, bool) {
        let subscriber =
            tracing_subscriber::registry().with(tracing_subscriber::EnvFilter::new(level));
        tracing::subscriber::with_default(subscriber, || {
            (
                tracing::enabled!(target: "portcullis::requests", Level::DEBUG),
                tracing::enabled!(target: "portcullis::app", Level::INFO),
            )
        })
    }

    #[test]
    fn the_default_log_level_leaves_out_the_request_line() {
        // The audit log holds every request; the line costs ~10% of the CPU per request.
        assert_eq!(request_line_and_info(&Log::default().level), (false, true));
        // The documented way to bring it back.
        assert_eq!(
            request_line_and_info("info,portcullis::requests=debug"),
            (true, true)
        );
        assert_eq!(request_line_and_info("warn"), (false, false));
    }
}
