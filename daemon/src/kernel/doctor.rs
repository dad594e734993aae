//! The kernel prerequisites (`portcullis doctor`), each with how to fix it.
use std::path::Path;

use super::{bpffs, btf::VMLINUX_BTF, cgroup};
use crate::config::Config;

/// One prerequisite, checked.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// An advisory check fails as WARN: the daemon works without it, with a weaker
    /// guarantee the detail names.
    pub advisory: bool,
    pub detail: String,
    pub fix: String,
}

/// The check of the running enforcement (`kernel-effect.json`, written by the last
/// daemon), as opposed to the node's prerequisites.
pub const EFFECT_CHECK: &str = "programs in effect";

impl Check {
    /// Met, or only advisory.
    pub fn passes(&self) -> bool {
        self.ok || self.advisory
    }

    /// A prerequisite of `portcullis run`. The programs-in-effect record is not: it
    /// describes the previous daemon's last check, and a starting daemon checks,
    /// repairs and freezes itself — refusing to start over it would leave the node's
    /// agents refused for good.
    pub fn is_prerequisite(&self) -> bool {
        self.name != EFFECT_CHECK
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn cap_eff() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn version_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let ma: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mi: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (ma, mi) >= (major, minor)
}

fn active_lsms() -> Option<String> {
    std::fs::read_to_string("/sys/kernel/security/lsm").ok()
}

/// Every prerequisite; with a config, its paths too.
pub fn checks(cfg: Option<&Config>) -> Vec<Check> {
    let mut checks = Vec::new();

    let release = kernel_release();
    checks.push(Check {
        advisory: false,
        name: "kernel version",
        ok: version_at_least(&release, 5, 10),
        detail: format!("running {release}"),
        fix: "use Linux 5.10 or newer (bpf_link cgroup attach, BPF LSM, ring buffer)".into(),
    });

    let caps = cap_eff();
    let has = |c: u32| caps & (1u64 << c) != 0;
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(c, _)| !has(*c))
    .map(|(_, n)| *n)
    .collect();
    checks.push(Check {
        advisory: false,
        name: "capabilities",
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN present".into()
        } else {
            format!("missing {}", missing.join(", "))
        },
        fix: "run as root, or grant these capabilities in the DaemonSet's securityContext".into(),
    });

    checks.push(Check {
        advisory: false,
        name: "kernel BTF",
        ok: Path::new(VMLINUX_BTF).exists(),
        detail: VMLINUX_BTF.into(),
        fix: "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (LSM and tp_btf programs need it)"
            .into(),
    });

    let cg2 = cgroup::cgroup2_mounts();
    checks.push(Check {
        advisory: false,
        name: "cgroup v2",
        ok: !cg2.is_empty(),
        detail: if cg2.is_empty() {
            "no cgroup2 mount".into()
        } else {
            format!(
                "mounted at {}",
                cg2.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        fix: "mount it: `mount -t cgroup2 none /sys/fs/cgroup` (or boot with systemd.unified_cgroup_hierarchy=1)".into(),
    });

    let lsms = active_lsms();
    checks.push(Check {
        advisory: true,
        name: "BPF LSM",
        ok: lsms
            .as_deref()
            .is_some_and(|l| l.split(',').any(|x| x.trim() == "bpf")),
        detail: match &lsms {
            Some(l) => format!("active LSMs: {}", l.trim()),
            None => "/sys/kernel/security/lsm unreadable (securityfs not mounted?)".into(),
        },
        fix: "mount securityfs (`mount -t securityfs securityfs /sys/kernel/security`) to check; \
              enable with CONFIG_BPF_LSM=y and `lsm=...,bpf` on the kernel command line. \
              Without it an agent opening an AF_PACKET socket is killed instead of refused. \
              Listed is not always loadable: `portcullis run` records the guard it could \
              attach (see `packet-socket guard`)"
            .into(),
    });

    let bpffs_dir = cfg
        .map(|c| c.kernel.bpffs_dir.clone())
        .unwrap_or_else(|| "/sys/fs/bpf/portcullis".into());
    let parent = bpffs_dir.parent().unwrap_or(&bpffs_dir).to_owned();
    checks.push(Check {
        advisory: false,
        name: "bpffs",
        ok: bpffs::is_bpffs(&parent),
        detail: format!("{} (pins for {})", parent.display(), bpffs_dir.display()),
        fix: format!(
            "`mount -t bpf bpf {}` (the daemon does this itself when kernel.mount_bpffs is true)",
            parent.display()
        ),
    });

    if let Some(cfg) = cfg {
        let p = &cfg.kernel.attach_cgroup;
        checks.push(Check {
            advisory: false,
            name: "attach cgroup",
            ok: p.is_dir() && cgroup::is_cgroup2(p),
            detail: p.display().to_string(),
            fix: "set kernel.attach_cgroup to an existing cgroup v2 directory above the agent pods"
                .into(),
        });
    }

    if let Some(cfg) = cfg {
        let state = std::fs::read(cfg.state().kernel_state())
            .ok()
            .and_then(|b| serde_json::from_slice::<super::AttachState>(&b).ok());
        let (ok, detail) = match state.as_ref() {
            Some(s) if s.packet_guard == "lsm" => (
                s.packet_guard_gaps.is_empty(),
                "BPF LSM socket_create: refuses the call on every route".to_string(),
            ),
            Some(s) if s.packet_guard == "tracepoints" => (
                false,
                format!(
                    "tracepoint fallback (cap_capable: the CAP_NET_RAW check of packet_create/xsk_create, every route; {}): BPF LSM programs did not load, the caller is killed{}",
                    if s.packet_guard_scope.is_empty() {
                        "callers: unknown"
                    } else {
                        s.packet_guard_scope.as_str()
                    },
                    if s.packet_guard_gaps.is_empty() {
                        String::new()
                    } else {
                        format!("; uncovered: {}", s.packet_guard_gaps.join("; "))
                    }
                ),
            ),
            Some(s) => (false, format!("unknown guard `{}`", s.packet_guard)),
            None => (
                false,
                "not attached yet (start `portcullis run`)".to_string(),
            ),
        };
        checks.push(Check {
            advisory: true,
            name: "packet guard",
            ok,
            detail,
            fix: "see the BPF LSM check".into(),
        });
        let effect = std::fs::read(cfg.state().kernel_effect())
            .ok()
            .and_then(|b| serde_json::from_slice::<super::Effect>(&b).ok());
        if let Some(e) = effect {
            let mut detail = if e.ok {
                format!(
                    "on all {} enrolled cgroups (checked {})",
                    e.enrolled, e.time
                )
            } else {
                format!("NOT in effect (checked {})", e.time)
            };
            for p in &e.attachment {
                detail.push_str(&format!("; {p}"));
            }
            for u in &e.uncovered {
                detail.push_str(&format!("; cgroup {}: {}", u.cgroup_id, u.why));
            }
            if !e.removed.is_empty() {
                detail.push_str(&format!(
                    "; {} enrolled cgroup(s) no longer exist (dropped by the enroller)",
                    e.removed.len()
                ));
            }
            checks.push(Check {
                advisory: false,
                name: EFFECT_CHECK,
                ok: e.ok,
                detail,
                fix: "see `portcullis status`; the daemon re-attaches detached programs and freezes enrolled cgroups it cannot cover; unenroll removed cgroups".into(),
            });
        }
    }

    checks
}

#[cfg(test)]
mod tests {
    use super::version_at_least;

    #[test]
    fn versions() {
        assert!(version_at_least("6.18.44-fc-v595", 5, 10));
        assert!(version_at_least("5.10.0", 5, 10));
        assert!(!version_at_least("5.4.120", 5, 10));
    }
}
