//! TCP redirect: connect4/6 rewrite the destination, sock_ops indexes the record by the
//! agent's own address once its port is chosen (that is what the daemon sees on
//! accept), getpeername4/6 hide the rewrite from the agent.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_SYN_SENT, bpf_sock_addr,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use portcullis_common::{
    AF_INET, AF_INET6, ConnRecord, EventKind, Hook, SockKey, protection_flags, settings_flags,
};

use crate::{
    agent::{current_agent, current_origin},
    events::{Report, emit},
    maps::{PC_CONN_BY_CLIENT, PC_CONN_BY_COOKIE, protection, settings},
};

const SOCK_STREAM: u32 = 1;
/// cgroup/connect*: 1 lets the call proceed (possibly rewritten), 0 fails it with EPERM.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn pc_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn pc_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, true)
}

/// The destination (or peer) address in a sock_addr context, as a key.
#[inline(always)]
pub fn read_addr(sa: *const bpf_sock_addr, v6: bool) -> SockKey {
    // SAFETY: `sa` is the program context; the kernel allows 4-byte reads of
    // user_ip4 (v4 hooks), user_ip6[i] (v6 hooks) and user_port. Volatile keeps LLVM
    // from merging the loads into wider ones the verifier would reject.
    unsafe {
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        if v6 {
            let mut addr = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let w = read_volatile(addr_of!((*sa).user_ip6[i]));
                let b = w.to_ne_bytes();
                addr[i * 4] = b[0];
                addr[i * 4 + 1] = b[1];
                addr[i * 4 + 2] = b[2];
                addr[i * 4 + 3] = b[3];
                i += 1;
            }
            SockKey::from_v6(addr, port)
        } else {
            SockKey::from_v4(read_volatile(addr_of!((*sa).user_ip4)).to_ne_bytes(), port)
        }
    }
}

/// Writes `key` into the context's address; for v6 sockets an IPv4 key becomes its
/// v4-mapped form, which the dual-stack socket connects over IPv4.
#[inline(always)]
pub fn write_addr(sa: *mut bpf_sock_addr, v6: bool, key: &SockKey) {
    // SAFETY: `sa` is the program context; connect/getpeername hooks may write
    // user_ip4 / user_ip6[i] / user_port with 4-byte stores.
    unsafe {
        if v6 {
            let mut i = 0;
            while i < 4 {
                let w = u32::from_ne_bytes([
                    key.addr[i * 4],
                    key.addr[i * 4 + 1],
                    key.addr[i * 4 + 2],
                    key.addr[i * 4 + 3],
                ]);
                write_volatile(addr_of_mut!((*sa).user_ip6[i]), w);
                i += 1;
            }
        } else {
            write_volatile(
                addr_of_mut!((*sa).user_ip4),
                u32::from_ne_bytes(key.v4_octets()),
            );
        }
        write_volatile(addr_of_mut!((*sa).user_port), key.port.to_be() as u32);
    }
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let dst = read_addr(sa, v6);
    let Some(protection) = protection(&dst) else {
        return PROCEED;
    };
    let Some(agent) = current_agent() else {
        return PROCEED;
    };
    let hook = if v6 { Hook::Connect6 } else { Hook::Connect4 };
    // SAFETY: plain helper calls on the program context.
    let (cookie, netns) = unsafe {
        (
            bpf_get_socket_cookie(sa.cast()),
            bpf_get_netns_cookie(sa.cast()),
        )
    };
    let origin = current_origin(&agent, netns);
    // SAFETY: reads of the context's socket type/family/protocol fields.
    let (family, sock_type, protocol) = unsafe { ((*sa).user_family, (*sa).type_, (*sa).protocol) };
    let mut report = Report {
        kind: EventKind::ConnectRefused,
        hook,
        dst,
        redirected_to: SockKey::default(),
        family,
        sock_type,
        protocol,
        socket_cookie: cookie,
    };

    // Refused, not redirected: a second door (the kubelet's port), or a port of the
    // node other than the gate's.
    if protection.flags & protection_flags::REFUSE != 0 {
        emit(&report, &origin);
        return REFUSE;
    }
    // Only TCP can be proxied; a connected UDP socket to the API is refused outright.
    let target = match settings() {
        Some(s) if sock_type == SOCK_STREAM => {
            if dst.is_v4() && s.flags & settings_flags::HAVE_DAEMON_V4 != 0 {
                Some(s.daemon_v4)
            } else if !dst.is_v4() && s.flags & settings_flags::HAVE_DAEMON_V6 != 0 {
                Some(s.daemon_v6)
            } else {
                None
            }
        }
        _ => None,
    };
    let Some(target) = target else {
        // Rare and worth a line in the daemon's log (aya-log), beside the event.
        aya_log_ebpf::warn!(
            ctx,
            "refused connect to a protected endpoint: socket type {} or no daemon address for this family",
            sock_type
        );
        emit(&report, &origin);
        return REFUSE;
    };

    write_addr(sa, v6, &target);
    let record = ConnRecord {
        original_dst: dst,
        origin,
        socket_cookie: cookie,
        // SAFETY: plain helper call.
        ktime_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    let _ = PC_CONN_BY_COOKIE.insert(cookie, record, 0);
    report.kind = if agent.sticky {
        EventKind::StickyAgentSeen
    } else {
        EventKind::Redirected
    };
    report.redirected_to = target;
    emit(&report, &origin);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn pc_getpeername4(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn pc_getpeername6(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, true)
}

#[inline(always)]
fn on_getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: plain helper call on the program context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: the record is copied out before anything else touches the map.
    if let Some(rec) = unsafe { PC_CONN_BY_COOKIE.get(cookie) } {
        let original = rec.original_dst;
        write_addr(sa, v6, &original);
    }
    // getpeername hooks must return 1.
    1
}

#[sock_ops]
pub fn pc_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => index_by_client(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            forget(&ctx, ctx.arg(0) == BPF_TCP_SYN_SENT);
        }
        _ => {}
    }
    1
}

/// The agent's own address as the daemon will see it on accept.
#[inline(always)]
fn client_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let port = ctx.local_port() as u16;
    match ctx.family() {
        f if f == AF_INET as u32 => Some(SockKey::from_v4(ctx.local_ip4().to_ne_bytes(), port)),
        f if f == AF_INET6 as u32 => {
            let ops = ctx.ops;
            let mut addr = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                // SAFETY: 4-byte reads of the context's local_ip6 words, the only width
                // the verifier accepts; volatile stops LLVM from splitting them.
                let w = unsafe { read_volatile(addr_of!((*ops).local_ip6[i])) };
                let b = w.to_ne_bytes();
                addr[i * 4] = b[0];
                addr[i * 4 + 1] = b[1];
                addr[i * 4 + 2] = b[2];
                addr[i * 4 + 3] = b[3];
                i += 1;
            }
            Some(SockKey::from_v6(addr, port))
        }
        _ => None,
    }
}

#[inline(always)]
fn index_by_client(ctx: &SockOpsContext) {
    // SAFETY: plain helper call on the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // Only redirected sockets have a record. The cookie map keeps it for getpeername
    // while the socket lives; the client map gets its own copy for the daemon, which
    // may accept only after the agent has already closed.
    // SAFETY: the value is copied into the other map at once, not held.
    let Some(rec) = (unsafe { PC_CONN_BY_COOKIE.get(cookie) }) else {
        return;
    };
    let Some(key) = client_key(ctx) else {
        return;
    };
    let _ = PC_CONN_BY_CLIENT.insert(key, rec, 0);
    // Ask for state callbacks so the records go when the socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The agent's socket closed. Its getpeername record goes. The daemon's copy goes too
/// when the handshake never completed (nothing will be accepted); otherwise the daemon
/// takes it on accept, which may come after this close (a short-lived client whose
/// connection still waits in the accept queue). The LRU bounds anything left over.
#[inline(always)]
fn forget(ctx: &SockOpsContext, never_established: bool) {
    // SAFETY: plain helper call on the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let _ = PC_CONN_BY_COOKIE.remove(cookie);
    if never_established && let Some(key) = client_key(ctx) {
        let _ = PC_CONN_BY_CLIENT.remove(key);
    }
}
