//! Backstop: whatever path a packet took (a socket connected before enforcement began, a
//! raw socket that slipped through, a relay bound to a protected endpoint), a packet from
//! an agent's socket to a protected endpoint is dropped. Redirected connections go to the
//! daemon's address, which is never protected, so they pass. The first packet (SYN) of a
//! connection to the daemon also indexes the redirect record by the agent's address
//! (`connect::index_by_client`).
use aya_ebpf::{
    EbpfContext, bindings::__sk_buff, helpers::generated::bpf_skb_cgroup_id, macros::cgroup_skb,
    programs::SkBuffContext,
};
use portcullis_common::{AF_INET, AF_INET6, EventKind, Hook, Origin, SockKey};

use super::connect::index_by_client;
use crate::{
    agent::enrolled_ancestor_of_skb,
    events::{Report, emit},
    maps::backstop_protected,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const PASS: i32 = 1;
const DROP: i32 = 0;

/// What the backstop and the redirect bookkeeping read from an outgoing packet.
struct Packet {
    src: SockKey,
    /// Port 0 for protocols other than TCP and UDP (only a whole-address protection
    /// matches them).
    dst: SockKey,
    proto: u8,
    family: u16,
    /// A TCP SYN without ACK: the first packet of a connection.
    syn: bool,
}

#[cgroup_skb(egress)]
pub fn pc_egress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.as_ptr() as *mut __sk_buff;
    // SAFETY: context field read; `protocol` holds the big-endian ethertype.
    let ethertype = u16::from_be(unsafe { (*skb).protocol } as u16);
    let parsed = match ethertype {
        ETH_P_IP => parse_v4(&ctx),
        ETH_P_IPV6 => parse_v6(&ctx),
        _ => None,
    };
    let Some(p) = parsed else {
        return PASS;
    };
    if p.syn {
        index_by_client(&ctx, &p.src, &p.dst);
    }
    let (dst, proto, family) = (p.dst, p.proto, p.family);
    if !backstop_protected(&dst) {
        return PASS;
    }
    let Some(agent_cgroup) = enrolled_ancestor_of_skb(skb) else {
        return PASS;
    };
    let origin = Origin {
        // SAFETY: plain helper call on the context.
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
        agent_cgroup_id: agent_cgroup,
        ..Origin::default()
    };
    emit(
        &Report {
            kind: EventKind::EgressDropped,
            hook: Hook::SkbEgress,
            dst,
            redirected_to: SockKey::default(),
            family: family as u32,
            sock_type: 0,
            protocol: proto as u32,
            socket_cookie: 0,
        },
        &origin,
    );
    DROP
}

/// The packet's bytes at the skb's data pointer (the IP header on cgroup egress), if
/// `len` of them are in the linear area; `None` sends the caller to the copying
/// helper (fragmented headers, short packets).
#[inline(always)]
fn linear(ctx: &SkBuffContext, len: usize) -> Option<usize> {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: context field reads; the verifier turns them into packet pointers.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if data + len > end { None } else { Some(data) }
}

/// The four port bytes and the TCP flags of the transport header at `l4`, through the
/// copying helper (zero where the protocol has none or the packet is too short).
#[inline(always)]
fn transport(ctx: &SkBuffContext, proto: u8, l4: usize) -> ([u8; 4], u8) {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ([0; 4], 0);
    }
    let ports = ctx.load::<[u8; 4]>(l4).unwrap_or([0; 4]);
    let flags = if proto == IPPROTO_TCP {
        ctx.load::<u8>(l4 + 13).unwrap_or(0)
    } else {
        0
    };
    (ports, flags)
}

/// The flags byte of a TCP header at `l4` (0 for other protocols): read in place when
/// linear (a TCP segment's header always is), else copied.
#[inline(always)]
fn tcp_flags(ctx: &SkBuffContext, proto: u8, l4: usize) -> u8 {
    if proto != IPPROTO_TCP {
        return 0;
    }
    match linear(ctx, l4 + 14) {
        // SAFETY: `l4 + 14` bytes from `data` were checked against the packet's end.
        Some(data) => unsafe { *((data + l4 + 13) as *const u8) },
        None => ctx.load::<u8>(l4 + 13).unwrap_or(0),
    }
}

#[inline(always)]
fn packet(src: SockKey, dst: SockKey, proto: u8, family: u16, p: [u8; 4], flags: u8) -> Packet {
    let ported = proto == IPPROTO_TCP || proto == IPPROTO_UDP;
    let (sport, dport) = if ported {
        (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )
    } else {
        (0, 0)
    };
    Packet {
        src: src.with_port(sport),
        dst: dst.with_port(dport),
        proto,
        family,
        syn: proto == IPPROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
    }
}

#[inline(always)]
fn parse_v4(ctx: &SkBuffContext) -> Option<Packet> {
    // Direct reads where a 20-byte header and the ports are linear, which they are for
    // what local sockets send (a UDP payload may sit in page fragments, so no more is
    // asked for); else the copying helper.
    if let Some(data) = linear(ctx, 24) {
        // SAFETY: 24 bytes from `data` were checked against the packet's end above.
        let (vihl, proto, addrs, ports) = unsafe {
            (
                *(data as *const u8),
                *((data + 9) as *const u8),
                *((data + 12) as *const [u8; 8]),
                *((data + 20) as *const [u8; 4]),
            )
        };
        if vihl & 0x0f == 5 {
            return Some(v4_packet(addrs, proto, ports, tcp_flags(ctx, proto, 20)));
        }
    }
    let vihl: u8 = ctx.load(0).ok()?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let proto: u8 = ctx.load(9).ok()?;
    let addrs: [u8; 8] = ctx.load(12).ok()?;
    let (ports, flags) = transport(ctx, proto, ihl);
    Some(v4_packet(addrs, proto, ports, flags))
}

#[inline(always)]
fn v4_packet(a: [u8; 8], proto: u8, ports: [u8; 4], flags: u8) -> Packet {
    packet(
        SockKey::from_v4([a[0], a[1], a[2], a[3]], 0),
        SockKey::from_v4([a[4], a[5], a[6], a[7]], 0),
        proto,
        AF_INET,
        ports,
        flags,
    )
}

#[inline(always)]
fn parse_v6(ctx: &SkBuffContext) -> Option<Packet> {
    // Extension headers are not walked: with them the port reads as 0 and only a
    // whole-address protection matches, which is the conservative direction.
    if let Some(data) = linear(ctx, 44) {
        // SAFETY: 44 bytes from `data` were checked against the packet's end above.
        let (next, src, dst, ports) = unsafe {
            (
                *((data + 6) as *const u8),
                *((data + 8) as *const [u8; 16]),
                *((data + 24) as *const [u8; 16]),
                *((data + 40) as *const [u8; 4]),
            )
        };
        return Some(v6_packet(src, dst, next, ports, tcp_flags(ctx, next, 40)));
    }
    let next: u8 = ctx.load(6).ok()?;
    let src: [u8; 16] = ctx.load(8).ok()?;
    let dst: [u8; 16] = ctx.load(24).ok()?;
    let (ports, flags) = transport(ctx, next, 40);
    Some(v6_packet(src, dst, next, ports, flags))
}

#[inline(always)]
fn v6_packet(src: [u8; 16], dst: [u8; 16], next: u8, ports: [u8; 4], flags: u8) -> Packet {
    packet(
        SockKey::from_v6(src, 0),
        SockKey::from_v6(dst, 0),
        next,
        AF_INET6,
        ports,
        flags,
    )
}
