//! TCP redirect: connect4/6 rewrite the destination, the connection's SYN (seen by the
//! egress program) indexes the record by the agent's own address (what the daemon sees
//! on accept), getpeername4/6 hide the rewrite from the agent, sock_release drops the
//! getpeername record when the socket goes.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use portcullis_common::{
    ConnRecord, EventKind, Hook, SockKey, protection_flags, settings_flags,
};

use crate::{
    agent::{current_agent, current_origin},
    events::{Report, emit, emit_at},
    maps::{PC_CONN_BY_CLIENT, PC_CONN_BY_COOKIE, is_daemon, protection, settings},
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
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
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let record = ConnRecord {
        original_dst: dst,
        origin,
        socket_cookie: cookie,
        ktime_ns: now,
    };
    let _ = PC_CONN_BY_COOKIE.insert(cookie, record, 0);
    report.kind = if agent.sticky {
        EventKind::StickyAgentSeen
    } else {
        EventKind::Redirected
    };
    report.redirected_to = target;
    emit_at(&report, &origin, now);
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

/// A TCP SYN leaving a socket under the attach point (egress calls this before the
/// packet goes out). Towards the daemon's address it is either a redirected
/// connection, whose record is then indexed by the agent's own address for the daemon
/// (what it sees on accept, `src` being the packet's source), or one that dialled the
/// daemon directly, which must not inherit a record a failed earlier connection from
/// the same address and port left behind: that one goes. Indexing at the SYN puts the
/// record in place before the daemon can see the connection at all; it costs one map
/// lookup per SYN to the daemon, where a sock_ops program cost five runs per TCP
/// connection of every socket under the attach point.
#[inline(always)]
pub fn index_by_client(ctx: &SkBuffContext, src: &SockKey, dst: &SockKey) {
    if !is_daemon(dst) {
        return;
    }
    // SAFETY: plain helper call on the program context (the skb's socket; 0 if none).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Only redirected sockets have a record. The cookie map keeps it for getpeername
    // while the socket lives; the client map gets its own copy for the daemon, which
    // may accept only after the agent has already closed.
    // SAFETY: the value is copied into the other map at once, not held.
    match unsafe { PC_CONN_BY_COOKIE.get(cookie) } {
        Some(rec) => {
            let _ = PC_CONN_BY_CLIENT.insert(src, rec, 0);
        }
        None => {
            let _ = PC_CONN_BY_CLIENT.remove(src);
        }
    }
}

/// The agent's socket is released (its last close): its getpeername record goes. The
/// daemon's copy stays until the daemon takes it on accept, which may come after this
/// (a short-lived client whose connection still waits in the accept queue); the LRU
/// bounds anything left over. Only TCP sockets connected to the daemon's port can have
/// one (a redirected socket's peer is the daemon); others return after two compares.
#[cgroup_sock(sock_release)]
pub fn pc_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: context field reads (dst_port is big-endian, 2 bytes wide).
    let (protocol, dport) = unsafe {
        (
            (*ctx.sock).protocol,
            u16::from_be(read_volatile(addr_of!((*ctx.sock).dst_port))),
        )
    };
    if protocol != IPPROTO_TCP {
        return 1;
    }
    let Some(s) = settings() else {
        return 1;
    };
    let to_daemon = (s.flags & settings_flags::HAVE_DAEMON_V4 != 0 && dport == s.daemon_v4.port)
        || (s.flags & settings_flags::HAVE_DAEMON_V6 != 0 && dport == s.daemon_v6.port);
    if !to_daemon {
        return 1;
    }
    // SAFETY: plain helper call on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let _ = PC_CONN_BY_COOKIE.remove(cookie);
    1
}
