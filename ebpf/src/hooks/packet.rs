//! Packet sockets (AF_PACKET, AF_XDP, and `socket(AF_INET, SOCK_PACKET, ...)`, which
//! the kernel turns into PF_PACKET) where BPF LSM programs cannot be loaded. Every
//! route to such a socket meets `security_socket_create`, but on kernels without BPF
//! trampolines (LSM, fentry, fmod_ret all answer EPERM) and without kprobes no program
//! can refuse there, so the fallback kills the agent (SIGKILL to its thread group).
//!
//! Where: the capability check every link-layer socket passes inside the kernel. Both
//! `packet_create` (AF_PACKET, and SOCK_PACKET after `__sock_create` rewrote it) and
//! `xsk_create` (AF_XDP) begin with `ns_capable(net->user_ns, CAP_NET_RAW)`, which ends
//! in `cap_capable` and its tracepoint. That point is reached by every route — native
//! and 32-bit `socket`/`socketpair`/`socketcall`, io_uring's `IORING_OP_SOCKET` (inline
//! or from an io-wq worker of the same process) — with the family the kernel really
//! uses, after every argument was copied: nothing a second thread rewrites can change
//! it. The kill is pending before the socket is returned to user space.
//!
//! Cost: the program runs on capability checks, not on every syscall; for anything but
//! a granted CAP_NET_RAW it returns after two compares. Only an agent's granted
//! CAP_NET_RAW check walks the kernel stack to see whether the caller is one of the two
//! functions (raw IP sockets and `SO_MARK` check CAP_NET_RAW too; they are not packet
//! sockets and are left to the other hooks).
use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_stack, bpf_send_signal},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use portcullis_common::{Hook, packet};

use super::socket::report_packet_socket;
use crate::agent::{Agent, current_agent};

const CAP_NET_RAW: i32 = 13;
const SIGKILL: u32 = 9;
/// Kernel frames read: the check sits 4–6 frames below `packet_create`/`xsk_create`
/// (the tracepoint's own frames, `cap_capable`, `security_capable`, `ns_capable*`).
const STACK_DEPTH: usize = 16;

/// `[start, end)` of `packet_create` and of `xsk_create` in this kernel, set by the
/// daemon at load from /proc/kallsyms. `end` 0 for `packet_create` means it could not
/// be resolved (not built in, or addresses hidden): then every granted CAP_NET_RAW
/// check of an agent counts as a packet socket (fail closed; family reported as 0).
#[unsafe(no_mangle)]
static PC_LINK_LAYER_CREATORS: [u64; 4] = [0; 4];

#[inline(always)]
fn kill(agent: &Agent, family: i32) {
    report_packet_socket(Hook::CapNetRaw, family, 0, 0, agent);
    // SAFETY: plain helper call; the tracepoint runs in the calling task's context
    // (an io-wq worker belongs to the submitter's thread group), and SIGKILL goes to
    // its whole thread group before the call returns to user space.
    unsafe { bpf_send_signal(SIGKILL) };
}

/// Which link-layer family the kernel is creating, if the capability check comes from
/// `packet_create` or `xsk_create`; `Some(0)` when that cannot be told (fail closed).
#[inline(always)]
fn link_layer_creator(ctx: &BtfTracePointContext) -> Option<i32> {
    // SAFETY: a read of a load-time constant; volatile so it is not folded to zero.
    let r = unsafe { core::ptr::read_volatile(&PC_LINK_LAYER_CREATORS) };
    if r[1] == 0 {
        return Some(0);
    }
    let mut frames = [0u64; STACK_DEPTH];
    // SAFETY: the helper writes at most `size` bytes into `frames` (kernel stack, no
    // flags) and returns how many it wrote, or a negative error.
    let n = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            frames.as_mut_ptr() as *mut _,
            (STACK_DEPTH * 8) as u32,
            0,
        )
    };
    if n <= 0 {
        return Some(0);
    }
    for (i, &ip) in frames.iter().enumerate() {
        if (i * 8) as i64 >= n {
            break;
        }
        if ip >= r[0] && ip < r[1] {
            return Some(packet::AF_PACKET);
        }
        if ip >= r[2] && ip < r[3] {
            return Some(packet::AF_XDP);
        }
    }
    None
}

// TP: cap_capable(const struct cred *cred, struct user_namespace *target_ns,
//                 const struct user_namespace *capable_ns, int cap, int ret)
#[btf_tracepoint(function = "cap_capable")]
pub fn pc_cap_net_raw(ctx: BtfTracePointContext) -> i32 {
    let cap: i32 = ctx.arg(3);
    let ret: i32 = ctx.arg(4);
    // Refused checks create nothing; other capabilities guard no packet socket.
    if cap != CAP_NET_RAW || ret != 0 {
        return 0;
    }
    let Some(agent) = current_agent() else {
        return 0;
    };
    if let Some(family) = link_layer_creator(&ctx) {
        kill(&agent, family);
    }
    0
}
