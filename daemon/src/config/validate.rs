//! What serde cannot check: relations between fields (listen addresses and protected
//! endpoints, the proxy's mode, issuers), each error naming its field.
use std::path::Path;

use super::{Config, ConfigError, ConfigSpec, Credential, Mode, Proxy};

/// Checks what serde cannot (each error naming its field) and builds the config,
/// deciding the proxy's mode once.
pub(super) fn validate(raw: ConfigSpec, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |field: &str, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        field: field.into(),
        message,
    };
    if raw.listen.ipv4.is_none() && raw.listen.ipv6.is_none() {
        return Err(invalid(
            "listen",
            "give at least one of `ipv4` or `ipv6`".into(),
        ));
    }
    if let Some(a) = raw.listen.ipv4
        && !a.0.is_ipv4()
    {
        return Err(invalid(
            "listen.ipv4",
            format!("`{}` is not an IPv4 address", a.0),
        ));
    }
    if let Some(a) = raw.listen.ipv6
        && !a.0.is_ipv6()
    {
        return Err(invalid(
            "listen.ipv6",
            format!("`{}` is not an IPv6 address", a.0),
        ));
    }
    let auto = raw.kernel.attach_auto();
    if !auto && !raw.kernel.attach_cgroup.is_absolute() {
        return Err(invalid(
            "kernel.attach_cgroup",
            format!(
                "`{}` must be an absolute path (or `auto`)",
                raw.kernel.attach_cgroup.display()
            ),
        ));
    }
    for (i, cg) in raw.kernel.agent_cgroups.iter().enumerate() {
        if auto || !cg.starts_with(&raw.kernel.attach_cgroup) {
            return Err(invalid(
                &format!("kernel.agent_cgroups[{i}]"),
                format!(
                    "`{}` is not below kernel.attach_cgroup `{}`, so the programs would never see it (with `auto`, enroll at run time)",
                    cg.display(),
                    raw.kernel.attach_cgroup.display()
                ),
            ));
        }
    }
    if raw.kernel.protected_endpoints.is_empty() && raw.discovery.is_none() {
        return Err(invalid(
            "kernel.protected_endpoints",
            "list at least one endpoint (the API Service ClusterIP:443, the API servers), or configure `discovery`".into(),
        ));
    }
    for (i, ep) in raw.kernel.protected_endpoints.iter().enumerate() {
        let hits_daemon = [raw.listen.ipv4, raw.listen.ipv6]
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
    let proxy = match &raw.proxy {
        None => None,
        Some(p) => {
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
            let mode = match (&p.impersonate, &p.identity, &p.policy_file) {
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
                    Mode::PassThrough(imp.clone())
                }
                (None, Some(id), Some(policy_file)) => {
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
                    Mode::Gated {
                        identity: id.clone(),
                        policy_file: policy_file.clone(),
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
            };
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
            let event_loops = match p.event_loops {
                None => crate::loops::default_count(),
                Some(n) if (1..=crate::loops::MAX_LOOPS).contains(&n) => n,
                Some(n) => {
                    return Err(invalid(
                        "proxy.event_loops",
                        format!(
                            "{n}: give 1 to {} (or leave it out: one per CPU, at most {})",
                            crate::loops::MAX_LOOPS,
                            crate::loops::DEFAULT_MAX_LOOPS
                        ),
                    ));
                }
            };
            Some(Proxy {
                upstream: p.upstream.clone(),
                mode,
                approvals: p.approvals.clone(),
                admin: p.admin.clone(),
                masking: p.masking.clone(),
                audit: p.audit.clone(),
                tls_names: p.tls_names.clone(),
                accept_unredirected: p.accept_unredirected,
                max_header_bytes: p.max_header_bytes,
                header_timeout: p.header_timeout,
                limits: p.limits.clone(),
                event_loops,
            })
        }
    };
    if let Some(e) = &raw.enrollment {
        if e.node_name.trim().is_empty() {
            return Err(invalid(
                "enrollment.node_name",
                "give this node's name (e.g. `${NODE_NAME}`)".into(),
            ));
        }
        if e.namespace_labels.is_empty() && e.pod_labels.is_empty() {
            return Err(invalid(
                "enrollment",
                "give `namespace_labels`, `pod_labels` or both: an empty selector would enroll nothing".into(),
            ));
        }
    }
    Ok(Config {
        listen: raw.listen,
        kernel: raw.kernel,
        proxy,
        state_dir: raw.state_dir,
        log: raw.log,
        event_logs: raw.event_logs,
        enrollment: raw.enrollment,
        discovery: raw.discovery,
        node_ca: raw.node_ca,
    })
}
