//! UDP (and so QUIC) to a protected endpoint: an unconnected `sendto` skips the connect
//! hooks, so the sendmsg hooks refuse it.
use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use portcullis_common::{EventKind, Hook, SockKey};

use super::connect::read_addr;
use crate::{
    agent::{current_agent, current_origin},
    events::{Report, emit},
    maps::protected,
};

#[cgroup_sock_addr(sendmsg4)]
pub fn pc_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pc_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, true)
}

#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let dst = read_addr(sa, v6);
    if !protected(&dst) {
        return 1;
    }
    let Some(agent) = current_agent() else {
        return 1;
    };
    // SAFETY: plain helper calls and context field reads.
    let (cookie, netns, family, sock_type, protocol) = unsafe {
        (
            bpf_get_socket_cookie(sa.cast()),
            bpf_get_netns_cookie(sa.cast()),
            (*sa).user_family,
            (*sa).type_,
            (*sa).protocol,
        )
    };
    let origin = current_origin(&agent, netns);
    emit(
        &Report {
            kind: EventKind::DatagramRefused,
            hook: if v6 { Hook::Sendmsg6 } else { Hook::Sendmsg4 },
            dst,
            redirected_to: SockKey::default(),
            family,
            sock_type,
            protocol,
            socket_cookie: cookie,
        },
        &origin,
    );
    0
}
