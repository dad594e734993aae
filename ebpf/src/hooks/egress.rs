//! Backstop: whatever path a packet took (a socket connected before enforcement began, a
//! raw socket that slipped through, a relay bound to a protected endpoint), a packet from
//! an agent's socket to a protected endpoint is dropped. Redirected connections go to the
//! daemon's address, which is never protected, so they pass.
use aya_ebpf::{
    EbpfContext, bindings::__sk_buff, helpers::generated::bpf_skb_cgroup_id, macros::cgroup_skb,
    programs::SkBuffContext,
};
use portcullis_common::{AF_INET, AF_INET6, EventKind, Hook, Origin, SockKey};

use crate::{
    agent::enrolled_ancestor_of_skb,
    events::{Report, emit},
    maps::backstop_protected,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const PASS: i32 = 1;
const DROP: i32 = 0;

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
    let Some((dst, proto, family)) = parsed else {
        return PASS;
    };
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

/// Destination port of a TCP/UDP header at `l4`, or 0 for other protocols (so only a
/// whole-address protection matches them).
#[inline(always)]
fn dst_port(ctx: &SkBuffContext, proto: u8, l4: usize) -> u16 {
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        ctx.load::<[u8; 2]>(l4 + 2)
            .map(u16::from_be_bytes)
            .unwrap_or(0)
    } else {
        0
    }
}

#[inline(always)]
fn parse_v4(ctx: &SkBuffContext) -> Option<(SockKey, u8, u16)> {
    let vihl: u8 = ctx.load(0).ok()?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let proto: u8 = ctx.load(9).ok()?;
    let dst: [u8; 4] = ctx.load(16).ok()?;
    let port = dst_port(ctx, proto, ihl);
    Some((SockKey::from_v4(dst, port), proto, AF_INET))
}

#[inline(always)]
fn parse_v6(ctx: &SkBuffContext) -> Option<(SockKey, u8, u16)> {
    // Extension headers are not walked: with them the port reads as 0 and only a
    // whole-address protection matches, which is the conservative direction.
    let next: u8 = ctx.load(6).ok()?;
    let dst: [u8; 16] = ctx.load(24).ok()?;
    let port = dst_port(ctx, next, 40);
    Some((SockKey::from_v6(dst, port), next, AF_INET6))
}
