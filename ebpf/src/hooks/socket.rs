//! Socket creation: raw IP sockets (cgroup/sock_create) and packet sockets (BPF LSM,
//! because AF_PACKET never reaches the inet sock_create hook) are refused to agents.
use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_socket_cookie, bpf_send_signal},
    },
    macros::{btf_tracepoint, cgroup_sock, lsm},
    programs::{BtfTracePointContext, LsmContext, SockContext},
};
use portcullis_common::{EventKind, Hook, SockKey};

use crate::{
    agent::{current_agent, current_origin},
    events::{Report, emit},
};

const SOCK_RAW: u32 = 3;
const AF_PACKET: i32 = 17;
const AF_XDP: i32 = 44;
const EPERM: i32 = 1;

#[cgroup_sock(sock_create)]
pub fn pc_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: context field reads.
    let (family, sock_type, protocol) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    if sock_type != SOCK_RAW {
        return 1;
    }
    let Some(agent) = current_agent() else {
        return 1;
    };
    // SAFETY: plain helper call on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    emit(
        &Report {
            kind: EventKind::RawSocketRefused,
            hook: Hook::SockCreate,
            dst: SockKey::default(),
            redirected_to: SockKey::default(),
            family,
            sock_type,
            protocol,
            socket_cookie: cookie,
        },
        &current_origin(&agent, 0),
    );
    0
}

// LSM_HOOK(int, 0, socket_create, int family, int type, int protocol, int kern)
#[lsm(hook = "socket_create")]
pub fn pc_lsm_socket_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    let retval: i32 = ctx.arg(4);
    if retval != 0 {
        return retval;
    }
    if kern != 0 || (family != AF_PACKET && family != AF_XDP) {
        return 0;
    }
    let Some(agent) = current_agent() else {
        return 0;
    };
    report_packet_socket(Hook::LsmSocketCreate, family, sock_type, protocol, &agent);
    -EPERM
}

#[inline(always)]
fn report_packet_socket(
    hook: Hook,
    family: i32,
    sock_type: i32,
    protocol: i32,
    agent: &crate::agent::Agent,
) {
    emit(
        &Report {
            kind: EventKind::PacketSocketRefused,
            hook,
            dst: SockKey::default(),
            redirected_to: SockKey::default(),
            family: family as u32,
            // The type argument may carry SOCK_NONBLOCK/SOCK_CLOEXEC; keep the type.
            sock_type: (sock_type & 0xf) as u32,
            protocol: protocol as u32,
            socket_cookie: 0,
        },
        &current_origin(agent, 0),
    );
}

const NR_SOCKET: i64 = 41;
const SIGKILL: u32 = 9;
/// Offsets of the first three syscall arguments (rdi, rsi, rdx) in x86-64's
/// `struct pt_regs`, a fixed layout.
const PT_REGS_DI: usize = 14 * 8;
const PT_REGS_SI: usize = 13 * 8;
const PT_REGS_DX: usize = 12 * 8;

/// Fallback for kernels where BPF LSM programs cannot be loaded (the daemon attaches
/// this only then): an agent calling socket(AF_PACKET|AF_XDP, ...) is killed with
/// SIGKILL before the call returns to user space, so it never holds the socket.
// TP: sys_enter(struct pt_regs *regs, long id)
#[btf_tracepoint(function = "sys_enter")]
pub fn pc_sys_enter_socket(ctx: BtfTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    if id != NR_SOCKET {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    // SAFETY: `regs` is the tracepoint's pt_regs pointer; probe_read tolerates faults.
    let family =
        unsafe { bpf_probe_read_kernel(regs.add(PT_REGS_DI) as *const u64) }.unwrap_or(0) as i32;
    if family != AF_PACKET && family != AF_XDP {
        return 0;
    }
    let Some(agent) = current_agent() else {
        return 0;
    };
    // SAFETY: as above.
    let (sock_type, protocol) = unsafe {
        (
            bpf_probe_read_kernel(regs.add(PT_REGS_SI) as *const u64).unwrap_or(0) as i32,
            bpf_probe_read_kernel(regs.add(PT_REGS_DX) as *const u64).unwrap_or(0) as i32,
        )
    };
    report_packet_socket(Hook::SysEnterSocket, family, sock_type, protocol, &agent);
    // SAFETY: plain helper call; sys_enter runs in the calling task's context.
    unsafe { bpf_send_signal(SIGKILL) };
    0
}
