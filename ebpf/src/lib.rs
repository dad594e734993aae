//! Portcullis kernel programs.
//!
//! Attached at a cgroup v2 ancestor of the agent pods, they act only on sockets of
//! enrolled agent cgroups (or of processes that were ever in one, see `sticky`):
//!
//! | hook                      | job                                                           |
//! |---------------------------|---------------------------------------------------------------|
//! | cgroup/connect4, connect6 | TCP to a protected endpoint is rewritten to the daemon        |
//! | cgroup/getpeername4/6     | the agent sees the address it asked for, not the daemon's     |
//! | cgroup/sendmsg4/6         | UDP/QUIC datagrams to a protected endpoint are refused        |
//! | cgroup/sock_create        | raw sockets are refused                                       |
//! | lsm/socket_create         | AF_PACKET / AF_XDP sockets are refused                        |
//! | tp_btf/cap_capable        | fallback without BPF LSM: the agent is killed                 |
//! | cgroup_skb/egress         | backstop: any packet to a protected endpoint is dropped; a    |
//! |                           | redirected SYN indexes the record by the agent's address      |
//! | cgroup/sock_release       | the getpeername record goes with the socket                   |
//! | tp_btf fork/exec/exit     | sticky agent marks, so leaving the cgroup does not escape     |
//!
//! Every redirect and refusal is reported on the `PC_EVENTS` ring buffer.
#![no_std]
#![no_main]
#![allow(static_mut_refs)]

mod agent;
mod events;
mod hooks;
mod maps;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there are no reachable panics; this only satisfies the linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
