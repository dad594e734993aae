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
    ("pc_sock_ops", Attach::Cgroup),
    ("pc_getpeername4", Attach::Cgroup),
    ("pc_getpeername6", Attach::Cgroup),
    ("pc_sendmsg4", Attach::Cgroup),
    ("pc_sendmsg6", Attach::Cgroup),
    ("pc_egress", Attach::CgroupSkbEgress),
    ("pc_connect4", Attach::Cgroup),
    ("pc_connect6", Attach::Cgroup),
];

/// Packet-socket (AF_PACKET/AF_XDP) guards, best first: the BPF LSM refuses the call;
/// where BPF LSM programs cannot be loaded (measured: EPERM before the verifier on this
/// CI's kernel despite `bpf` in the LSM list), a sys_enter tracepoint kills the caller
/// before the call returns. The one that attaches is pinned as `packet_guard`.
const PACKET_GUARDS: &[(&str, Attach)] = &[
    ("pc_lsm_socket_create", Attach::Lsm("socket_create")),
    ("pc_sys_enter_socket", Attach::TpBtf("sys_enter")),
];
const PACKET_GUARD_PIN: &str = "packet_guard";

fn pin_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS
        .iter()
        .map(|(n, _)| *n)
        .chain(std::iter::once(PACKET_GUARD_PIN))
}

/// What `start` found and did, also written to `kernel-state.json` in the state dir.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachState {
    /// `attached` (nothing was pinned), `adopted` (pinned programs kept as they were) or
    /// `replaced` (new programs attached beside the old, then the old detached).
    pub mode: String,
    pub object_sha256: String,
    pub attach_cgroup: PathBuf,
    /// Which packet-socket guard is attached (`pc_lsm_socket_create` or
    /// `pc_sys_enter_socket`).
    pub packet_guard: String,
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
    fn link(&self, program: &str) -> PathBuf {
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
/// when the first hook fires.
pub fn start(
    object: &[u8],
    attach_cgroup: &Path,
    paths: &Paths,
    state_file: &Path,
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
    let pinned: Vec<bool> = pin_names().map(|name| paths.link(name).exists()).collect();

    let all_pinned = pinned.iter().all(|&p| p);
    let same = previous
        .as_ref()
        .is_some_and(|s| s.object_sha256 == sha && s.attach_cgroup == attach_cgroup);
    if all_pinned && same {
        let mut maps = PinnedMaps::open(&paths.maps())?;
        prepare(&mut maps)?;
        let state = AttachState {
            mode: "adopted".into(),
            maps_layout: MAPS_LAYOUT,
            object_sha256: sha,
            attach_cgroup: attach_cgroup.to_owned(),
            packet_guard: previous.map(|p| p.packet_guard).unwrap_or_default(),
            programs: pinned_ids(paths)?,
        };
        info!(
            programs = state.programs.len(),
            "adopted pinned programs and maps"
        );
        write_state(state_file, &state)?;
        return Ok(state);
    }

    let replacing = pinned.iter().any(|&p| p);
    let btf = Btf::from_sys_fs().map_err(|e| KernelError::Btf(e.to_string()))?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .default_map_pin_directory(paths.maps())
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
    let pin = |link: FdLink, name: &str, program: &str| {
        let target = pin_target(name);
        let _ = std::fs::remove_file(&target);
        link.pin(&target)
            .map(drop)
            .map_err(|e| KernelError::Program {
                program: program.to_string(),
                message: format!("pinning link at {}: {e}", target.display()),
            })
    };
    let mut packet_guard = None;
    for (name, how) in PACKET_GUARDS {
        match attach_one(&mut ebpf, &btf, name, *how, &cgroup) {
            Ok(link) => {
                pin(link, PACKET_GUARD_PIN, name)?;
                packet_guard = Some(name.to_string());
                break;
            }
            Err(e) => warn!(error = %e, "packet-socket guard unavailable, trying the next"),
        }
    }
    let packet_guard = packet_guard.ok_or_else(|| KernelError::Program {
        program: PACKET_GUARD_PIN.into(),
        message: "no packet-socket guard could be attached".into(),
    })?;
    if packet_guard != PACKET_GUARDS[0].0 {
        warn!(guard = %packet_guard, "BPF LSM unavailable: agents opening AF_PACKET/AF_XDP sockets are killed instead of refused");
    }
    for (name, how) in PROGRAMS {
        let link = attach_one(&mut ebpf, &btf, name, *how, &cgroup)?;
        pin(link, name, name)?;
    }
    // Replacing: the new links were pinned beside the old; both are live for a moment,
    // which is harmless (a second redirect sees the daemon's address, not a protected
    // one) and leaves no instant without enforcement. Now the old ones go.
    if replacing {
        for name in pin_names() {
            let old = paths.link(name);
            if old.exists() {
                match PinnedLink::from_pin(&old) {
                    // Unpinning and dropping the last reference detaches the old program.
                    Ok(l) => drop(l.unpin()),
                    Err(e) => warn!(program = name, error = %e, "could not open old pinned link"),
                }
            }
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
        packet_guard,
        programs: pinned_ids(paths)?,
    };
    info!(mode = %state.mode, cgroup = %attach_cgroup.display(), "programs attached and pinned");
    write_state(state_file, &state)?;
    Ok(state)
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
        (Program::SockOps(p), Attach::Cgroup) => cgroup_link!(p, fd, mode),
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
fn pinned_ids(paths: &Paths) -> Result<Vec<(String, u32, u32)>, KernelError> {
    pin_names()
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
    for name in pin_names() {
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
