//! Socket creation: raw IP sockets (cgroup/sock_create) and packet sockets (BPF LSM,
//! because AF_PACKET never reaches the inet sock_create hook) are refused to agents.
//! Where BPF LSM programs cannot be loaded, `packet.rs` is the fallback.
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock, lsm},
    programs::{LsmContext, SockContext},
};
use portcullis_common::{EventKind, Hook, SockKey, packet};

use crate::{
    agent::{current_agent, current_origin},
    events::{Report, emit},
};

const SOCK_RAW: u32 = 3;
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
// Every route to a socket (socket, socketpair, compat socketcall, io_uring) meets this
// hook, with the family already final (AF_INET + SOCK_PACKET arrives as PF_PACKET).
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
    if kern != 0 || !packet::creates_packet_socket(family, sock_type) {
        return 0;
    }
    let Some(agent) = current_agent() else {
        return 0;
    };
    report_packet_socket(Hook::LsmSocketCreate, family, sock_type, protocol, &agent);
    -EPERM
}

#[inline(always)]
pub(super) fn report_packet_socket(
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
