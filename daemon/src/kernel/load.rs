//! Loading, attaching and pinning the eBPF programs; adopting pinned state on restart;
//! replacing an older object without a gap; unloading (uninstall).
use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkbAttachType, Program,
        links::{FdLink, LinkInfo, PinnedLink},
    },
};
use portcullis_common::MAPS_LAYOUT;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{KernelError, PinnedMaps};

/// How each program attaches.
#[derive(Clone, Copy)]
enum Attach {
    Cgroup,
    CgroupSkbEgress,
    Lsm(&'static str),
    TpBtf(&'static str),
}

/// Every program in the object, in the order they are attached. The global hooks (LSM,
/// tracepoints) go first so sticky marks and packet-socket refusal are in place before
/// the first cgroup hook can redirect anything.
const PROGRAMS: &[(&str, Attach)] = &[
    ("pc_sched_process_fork", Attach::TpBtf("sched_process_fork")),
    ("pc_sched_process_exec", Attach::TpBtf("sched_process_exec")),
    ("pc_sched_process_exit", Attach::TpBtf("sched_process_exit")),
    ("pc_sock_create", Attach::Cgroup),
    ("pc_sock_release", Attach::Cgroup),
    ("pc_getpeername4", Attach::Cgroup),
    ("pc_getpeername6", Attach::Cgroup),
    ("pc_sendmsg4", Attach::Cgroup),
    ("pc_sendmsg6", Attach::Cgroup),
    ("pc_egress", Attach::CgroupSkbEgress),
    ("pc_connect4", Attach::Cgroup),
    ("pc_connect6", Attach::Cgroup),
];

/// One way of keeping agents from packet sockets (AF_PACKET, AF_XDP, and AF_INET +
/// SOCK_PACKET, which the kernel turns into PF_PACKET).
pub struct Guard {
    /// Recorded in [`AttachState::packet_guard`].
    pub name: &'static str,
    /// The call fails with EPERM (true), or the agent is killed (false).
    pub refuses: bool,
    /// Every program, pinned under its own name; `optional` ones may be missing on a
    /// kernel that lacks their hook (their route is then reported as a gap).
    programs: &'static [(&'static str, Attach, bool)],
}

/// Packet-socket guards, best first. BPF LSM refuses the call in
/// `security_socket_create`, which every route reaches with the final family. Where
/// BPF LSM programs cannot be loaded (measured on this CI's 6.18 kernel: LSM, fentry,
/// fexit and fmod_ret programs all answer EPERM before the verifier; kprobes are not
/// built in), the `cap_capable` tracepoint sees the CAP_NET_RAW check that
/// `packet_create` and `xsk_create` make on every route (native, 32-bit compat,
/// socketcall, io_uring) and kills the caller. It runs on capability checks, not on
/// every syscall of the node.
pub const PACKET_GUARDS: &[Guard] = &[
    Guard {
        name: "lsm",
        refuses: true,
        programs: &[("pc_lsm_socket_create", Attach::Lsm("socket_create"), false)],
    },
    Guard {
        name: "tracepoints",
        refuses: false,
        programs: &[("pc_cap_net_raw", Attach::TpBtf("cap_capable"), false)],
    },
];
/// Where the `tracepoints` guard learns the addresses of `packet_create`/`xsk_create`.
const KALLSYMS: &str = "/proc/kallsyms";
/// The load-time constant of the `tracepoints` guard (see ebpf/src/hooks/packet.rs).
const LINK_LAYER_CREATORS: &str = "PC_LINK_LAYER_CREATORS";
/// Pins of earlier builds' programs, removed on replace and unload: the single guard
/// program of layouts before 4, the `sys_enter`/`sys_exit`/io_uring tracepoints the
/// `cap_capable` one replaced, and the sock_ops program whose job the egress program's
/// SYN now does.
const LEGACY_PINS: &[&str] = &[
    "packet_guard",
    "pc_sock_ops",
    "pc_sys_enter_socket",
    "pc_sys_exit_socket",
    "pc_uring_socket",
];

fn guard(name: &str) -> Option<&'static Guard> {
    PACKET_GUARDS.iter().find(|g| g.name == name)
}

/// The pins a daemon with guard `guard` keeps.
fn pin_names(guard: &Guard) -> impl Iterator<Item = &'static str> + '_ {
    PROGRAMS
        .iter()
        .map(|(n, _)| *n)
        .chain(guard.programs.iter().map(|(n, _, _)| *n))
}

/// Every pin any build may have made (cleanup of whatever is there).
fn all_pin_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS
        .iter()
        .map(|(n, _)| *n)
        .chain(
            PACKET_GUARDS
                .iter()
                .flat_map(|g| g.programs.iter().map(|(n, _, _)| *n)),
        )
        .chain(LEGACY_PINS.iter().copied())
}

/// What `start` found and did, also written to `kernel-state.json` in the state dir.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachState {
    /// `attached` (nothing was pinned), `adopted` (pinned programs kept as they were) or
    /// `replaced` (new programs attached beside the old, then the old detached).
    pub mode: String,
    pub object_sha256: String,
    pub attach_cgroup: PathBuf,
    /// Which packet-socket guard is attached ([`Guard::name`]: `lsm` or `tracepoints`).
    pub packet_guard: String,
    /// Whether that guard refuses the call (EPERM) or kills the caller.
    #[serde(default)]
    pub packet_guard_refuses: bool,
    /// Routes to a packet socket the attached guard does not cover on this kernel.
    #[serde(default)]
    pub packet_guard_gaps: Vec<String>,
    /// How the `tracepoints` guard tells packet-socket creation from other CAP_NET_RAW
    /// checks: `callers located` (the addresses of `packet_create`/`xsk_create` were
    /// read), or why not, in which case every CAP_NET_RAW an agent is granted kills it.
    #[serde(default)]
    pub packet_guard_scope: String,
    /// [`portcullis_common::MAPS_LAYOUT`] of the pinned maps.
    #[serde(default)]
    pub maps_layout: u32,
    /// (pin name, kernel program id, kernel link id)
    pub programs: Vec<(String, u32, u32)>,
}

pub struct Paths {
    pub bpffs_dir: PathBuf,
}

impl Paths {
    pub fn new(bpffs_dir: &Path) -> Paths {
        Paths {
            bpffs_dir: bpffs_dir.to_owned(),
        }
    }
    pub fn maps(&self) -> PathBuf {
        self.bpffs_dir.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.bpffs_dir.join("links")
    }
    pub(super) fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }
    /// bpffs refuses names with a dot ("reserved"), hence the prefix.
    fn staged_link(&self, program: &str) -> PathBuf {
        self.links().join(format!("new-{program}"))
    }
}

/// The eBPF object to load: the configured file, or the one built into the binary.
pub fn object_bytes(path: Option<&Path>) -> Result<Vec<u8>, KernelError> {
    if let Some(p) = path {
        return std::fs::read(p).map_err(|e| KernelError::Load(format!("{}: {e}", p.display())));
    }
    #[cfg(embedded_bpf)]
    {
        Ok(aya::include_bytes_aligned!(env!("PORTCULLIS_BPF_OBJECT_PATH")).to_vec())
    }
    #[cfg(not(embedded_bpf))]
    {
        Err(KernelError::NoObject)
    }
}

/// Loads and attaches (or adopts) the programs. `prepare` runs after the maps exist and
/// before any program is attached, so settings, endpoints and enrollments are in place
/// when the first hook fires. `force_replace` attaches a fresh set even when the pins
/// look adoptable (repair after verification found a program out of effect).
pub fn start(
    object: &[u8],
    attach_cgroup: &Path,
    paths: &Paths,
    state_file: &Path,
    force_replace: bool,
    prepare: impl FnOnce(&mut PinnedMaps) -> Result<(), KernelError>,
) -> Result<AttachState, KernelError> {
    let sha = hex::encode(Sha256::digest(object));
    for dir in [paths.maps(), paths.links()] {
        std::fs::create_dir_all(&dir).map_err(|e| KernelError::Bpffs {
            path: dir.clone(),
            message: e.to_string(),
        })?;
    }
    let previous: Option<AttachState> = std::fs::read(state_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    check_maps_layout(paths, previous.as_ref())?;
    let previous_guard = previous.as_ref().and_then(|p| guard(&p.packet_guard));
    // An optional guard program that did not attach has no pin: not a reason to reload.
    let all_pinned = previous_guard.is_some_and(|g| {
        PROGRAMS
            .iter()
            .map(|(n, _)| *n)
            .chain(
                g.programs
                    .iter()
                    .filter(|(_, _, optional)| !optional)
                    .map(|(n, _, _)| *n),
            )
            .all(|name| paths.link(name).exists())
    });
    let same = previous
        .as_ref()
        .is_some_and(|s| s.object_sha256 == sha && s.attach_cgroup == attach_cgroup);
    if let (Some(prev), true, true, false) = (&previous, all_pinned, same, force_replace) {
        let mut maps = PinnedMaps::open(&paths.maps())?;
        prepare(&mut maps)?;
        let state = AttachState {
            mode: "adopted".into(),
            maps_layout: MAPS_LAYOUT,
            object_sha256: sha,
            attach_cgroup: attach_cgroup.to_owned(),
            packet_guard: prev.packet_guard.clone(),
            packet_guard_refuses: prev.packet_guard_refuses,
            packet_guard_gaps: prev.packet_guard_gaps.clone(),
            packet_guard_scope: prev.packet_guard_scope.clone(),
            programs: pinned_ids(paths, previous_guard.unwrap_or(&PACKET_GUARDS[0]))?,
        };
        info!(
            programs = state.programs.len(),
            "adopted pinned programs and maps"
        );
        write_state(state_file, &state)?;
        return Ok(state);
    }

    let replacing = all_pin_names().any(|name| paths.link(name).exists());
    let btf = Btf::from_sys_fs().map_err(|e| KernelError::Btf(e.to_string()))?;
    let (creators, scope) = match super::kallsyms::link_layer_creators(Path::new(KALLSYMS)) {
        Ok(c) => (c, "callers located".to_string()),
        Err(e) => {
            warn!(error = %e, "packet-socket fallback guard: packet_create not located; where BPF LSM is unavailable, \
                any CAP_NET_RAW an agent is granted (raw IP sockets, SO_MARK too) gets it killed");
            (
                [0; 4],
                format!(
                    "callers not located ({e}): every CAP_NET_RAW an agent is granted kills it"
                ),
            )
        }
    };
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .default_map_pin_directory(paths.maps())
        .override_global(LINK_LAYER_CREATORS, &creators, true)
        .load(object)
        .map_err(|e| KernelError::Load(e.to_string()))?;
    // The maps are pinned (reused if they already were): fill them before attaching.
    {
        let mut maps = PinnedMaps::open(&paths.maps())?;
        prepare(&mut maps)?;
    }
    let cgroup = std::fs::File::open(attach_cgroup).map_err(|e| KernelError::Cgroup {
        path: attach_cgroup.to_owned(),
        message: e.to_string(),
    })?;
    let pin_target = |name: &str| {
        if replacing {
            paths.staged_link(name)
        } else {
            paths.link(name)
        }
    };
    let pin = |link: FdLink, name: &str| {
        let target = pin_target(name);
        let _ = std::fs::remove_file(&target);
        link.pin(&target)
            .map(drop)
            .map_err(|e| KernelError::Program {
                program: name.to_string(),
                message: format!("pinning link at {}: {e}", target.display()),
            })
    };
    let (chosen, links, gaps) = attach_packet_guard(&mut ebpf, &btf, &cgroup)?;
    for (name, link) in links {
        pin(link, name)?;
    }
    for (name, how) in PROGRAMS {
        let link = attach_one(&mut ebpf, &btf, name, *how, &cgroup)?;
        pin(link, name)?;
    }
    // Replacing: the new links were pinned beside the old; both are live for a moment,
    // which is harmless (a second redirect sees the daemon's address, not a protected
    // one) and leaves no instant without enforcement. Now the old ones go.
    if replacing {
        for name in all_pin_names() {
            let old = paths.link(name);
            if old.exists() {
                match PinnedLink::from_pin(&old) {
                    // Unpinning and dropping the last reference detaches the old program.
                    Ok(l) => drop(l.unpin()),
                    Err(e) => {
                        warn!(program = name, error = %e, "could not open old pinned link");
                        let _ = std::fs::remove_file(&old);
                    }
                }
            }
        }
        for name in pin_names(chosen).filter(|n| paths.staged_link(n).exists()) {
            let old = paths.link(name);
            std::fs::rename(paths.staged_link(name), &old).map_err(|e| KernelError::State {
                path: old.clone(),
                message: format!("renaming staged link: {e}"),
            })?;
        }
    }
    let state = AttachState {
        mode: if replacing { "replaced" } else { "attached" }.into(),
        maps_layout: MAPS_LAYOUT,
        object_sha256: sha,
        attach_cgroup: attach_cgroup.to_owned(),
        packet_guard: chosen.name.into(),
        packet_guard_refuses: chosen.refuses,
        packet_guard_gaps: gaps,
        packet_guard_scope: if chosen.refuses { String::new() } else { scope },
        programs: pinned_ids(paths, chosen)?,
    };
    info!(mode = %state.mode, cgroup = %attach_cgroup.display(), "programs attached and pinned");
    write_state(state_file, &state)?;
    Ok(state)
}

/// Attaches the best packet-socket guard this kernel allows: its links (not yet
/// pinned) and the routes it leaves uncovered.
#[allow(clippy::type_complexity)]
fn attach_packet_guard(
    ebpf: &mut Ebpf,
    btf: &Btf,
    cgroup: &std::fs::File,
) -> Result<(&'static Guard, Vec<(&'static str, FdLink)>, Vec<String>), KernelError> {
    let mut tried = Vec::new();
    'guards: for g in PACKET_GUARDS {
        let mut links = Vec::new();
        let mut gaps = Vec::new();
        for (name, how, optional) in g.programs {
            match attach_one(ebpf, btf, name, *how, cgroup) {
                Ok(link) => links.push((*name, link)),
                Err(e) if *optional => {
                    warn!(error = %e, "packet-socket guard: a route stays uncovered");
                    gaps.push(format!("{name}: {e}"));
                }
                Err(e) => {
                    warn!(guard = g.name, error = %e, "packet-socket guard unavailable, trying the next");
                    tried.push(format!("{}: {e}", g.name));
                    // Dropping the links attached so far detaches them.
                    continue 'guards;
                }
            }
        }
        if !g.refuses {
            warn!(
                guard = g.name,
                "BPF LSM unavailable: agents opening packet sockets (AF_PACKET, AF_XDP, SOCK_PACKET) are killed instead of refused"
            );
        }
        return Ok((g, links, gaps));
    }
    Err(KernelError::Program {
        program: "packet-socket guard".into(),
        message: format!("none could be attached: {}", tried.join("; ")),
    })
}

/// Pinned maps are reused across restarts and upgrades; maps pinned by a build with
/// another layout would be misread by these programs, so refuse them with the way out.
fn check_maps_layout(paths: &Paths, previous: Option<&AttachState>) -> Result<(), KernelError> {
    let has_maps = std::fs::read_dir(paths.maps())
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    // No state file: a first start, or one of this build that failed before writing it.
    let Some(layout) = previous.map(|p| p.maps_layout) else {
        return Ok(());
    };
    if has_maps && layout != MAPS_LAYOUT {
        return Err(KernelError::State {
            path: paths.maps(),
            message: format!(
                "pinned maps have layout {layout} (0: a build from before layouts were recorded), this build needs {MAPS_LAYOUT}; \
                 run `portcullis unload` (enforcement stops until the next start) and start again"
            ),
        });
    }
    Ok(())
}

fn attach_one(
    ebpf: &mut Ebpf,
    btf: &Btf,
    name: &str,
    how: Attach,
    cgroup: &std::fs::File,
) -> Result<FdLink, KernelError> {
    let perr = |m: String| KernelError::Program {
        program: name.to_string(),
        message: m,
    };
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| perr("not in the eBPF object".into()))?;
    // bpf_link attachments (kernel >= 5.7, which aya uses) always coexist with other
    // programs on the cgroup and the kernel refuses any flag on them: `Single` sends 0.
    let mode = CgroupAttachMode::Single;
    let fd = cgroup.as_fd();
    // The cgroup program types differ in type but not in shape: load, attach to the
    // cgroup, take the link as an FdLink so it can be pinned.
    macro_rules! cgroup_link {
        ($p:expr, $($attach_args:expr),+) => {{
            $p.load().map_err(|e| perr(format!("load: {e:?}")))?;
            let id = $p
                .attach($($attach_args),+)
                .map_err(|e| perr(format!("attach: {e:?}")))?;
            $p.take_link(id)
                .map_err(|e| perr(e.to_string()))?
                .try_into()
                .map_err(|e| perr(format!("{e}")))?
        }};
    }
    let link: FdLink = match (prog, how) {
        (Program::CgroupSockAddr(p), Attach::Cgroup) => cgroup_link!(p, fd, mode),
        (Program::CgroupSock(p), Attach::Cgroup) => cgroup_link!(p, fd, mode),
        (Program::CgroupSkb(p), Attach::CgroupSkbEgress) => {
            cgroup_link!(p, fd, CgroupSkbAttachType::Egress, mode)
        }
        (Program::Lsm(p), Attach::Lsm(hook)) => {
            p.load(hook, btf).map_err(|e| {
                perr(format!(
                    "load: {e:?} (is BPF LSM active? see `portcullis doctor`)"
                ))
            })?;
            let id = p.attach().map_err(|e| perr(format!("attach: {e:?}")))?;
            p.take_link(id).map_err(|e| perr(e.to_string()))?.into()
        }
        (Program::BtfTracePoint(p), Attach::TpBtf(tp)) => {
            p.load(tp, btf).map_err(|e| perr(format!("load: {e:?}")))?;
            let id = p.attach().map_err(|e| perr(format!("attach: {e:?}")))?;
            p.take_link(id).map_err(|e| perr(e.to_string()))?.into()
        }
        _ => return Err(perr("unexpected program type in the object".into())),
    };
    Ok(link)
}

/// (name, program id, link id) of every pinned link.
fn pinned_ids(paths: &Paths, guard: &Guard) -> Result<Vec<(String, u32, u32)>, KernelError> {
    pin_names(guard)
        .filter(|name| paths.link(name).exists())
        .map(|name| {
            let link: FdLink = PinnedLink::from_pin(paths.link(name))
                .map_err(|e| KernelError::Program {
                    program: name.to_string(),
                    message: format!("opening pinned link: {e}"),
                })?
                .into();
            let info: LinkInfo = link.info().map_err(|e| KernelError::Program {
                program: name.to_string(),
                message: format!("link info: {e}"),
            })?;
            let ids = (name.to_string(), info.program_id(), info.id());
            // Dropping the FdLink closes our fd only; the pin keeps the link.
            drop(link);
            Ok(ids)
        })
        .collect()
}

fn write_state(path: &Path, state: &AttachState) -> Result<(), KernelError> {
    let serr = |m: String| KernelError::State {
        path: path.to_owned(),
        message: m,
    };
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(state).map_err(|e| serr(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| serr(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| serr(e.to_string()))
}

/// Detaches everything and removes the pins: agents then reach endpoints directly.
/// Used by `portcullis unload` (uninstall) and test cleanup, never on a daemon stop.
pub fn unload(paths: &Paths) -> Result<usize, KernelError> {
    let mut n = 0;
    for name in all_pin_names() {
        for p in [paths.link(name), paths.staged_link(name)] {
            if p.exists() {
                if let Ok(l) = PinnedLink::from_pin(&p) {
                    drop(l.unpin());
                } else {
                    let _ = std::fs::remove_file(&p);
                }
                n += 1;
            }
        }
    }
    let _ = std::fs::remove_dir_all(paths.maps());
    let _ = std::fs::remove_dir(paths.links());
    let _ = std::fs::remove_dir(&paths.bpffs_dir);
    Ok(n)
}

/// Id of one attached program, for attaching the aya-log reader to it.
pub fn program_id(state: &AttachState, name: &str) -> Option<u32> {
    state
        .programs
        .iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, id, _)| *id)
}
