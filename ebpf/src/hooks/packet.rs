//! Packet sockets (AF_PACKET, AF_XDP, and `socket(AF_INET, SOCK_PACKET, ...)`, which
//! the kernel turns into PF_PACKET) where BPF LSM programs cannot be loaded. Every
//! route to such a socket meets `security_socket_create`, but on kernels without BPF
//! trampolines (LSM, fentry, fmod_ret all answer EPERM) no program can refuse there,
//! so the fallback kills the agent (SIGKILL to its thread group) at the points the
//! kernel does let a program see:
//!
//! - `sys_enter`: the arguments of `socket`/`socketpair`, native and 32-bit compat
//!   (`int 0x80`: `socket`, `socketpair`, `socketcall`), BEFORE the socket exists, so
//!   the kill is already pending for every thread when it is created;
//! - `sys_exit`: after a successful `socket`/compat `socket`/`socketcall(SYS_SOCKET)`,
//!   the socket the call really made, read through the task's fd table: its final
//!   family, immune to a second thread rewriting `socketcall`'s argument block between
//!   the check and the kernel's copy. An fd that no longer holds that socket by then
//!   (another thread closed or replaced it) fails closed too;
//! - `io_uring_submit_req`: `IORING_OP_SOCKET` with its prepared (kernel-side copied)
//!   arguments, before the request is issued.
//!
//! Offsets into kernel structures come from the daemon (BTF) in the settings map.
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task, bpf_send_signal},
    },
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};
use portcullis_common::{GuardOffsets, Hook, Settings, packet, settings_flags};

use super::socket::report_packet_socket;
use crate::{
    agent::{Agent, current_agent},
    maps::settings,
};

const NR_SOCKET: i64 = 41;
const NR_SOCKETPAIR: i64 = 53;
/// i386 numbers (a 32-bit syscall from an x86-64 kernel's compat entry).
const NR32_SOCKETCALL: i64 = 102;
const NR32_SOCKET: i64 = 359;
const NR32_SOCKETPAIR: i64 = 360;
/// `socketcall` sub-calls that create sockets.
const SYS_SOCKET: u64 = 1;
const SYS_SOCKETPAIR: u64 = 8;
/// x86 `thread_info.status` bit of a task inside a 32-bit syscall.
const TS_COMPAT: u32 = 0x0002;
const SIGKILL: u32 = 9;

/// Offsets of registers in x86-64's `struct pt_regs` (a fixed layout).
const PT_REGS_BX: usize = 5 * 8;
const PT_REGS_CX: usize = 11 * 8;
const PT_REGS_DX: usize = 12 * 8;
const PT_REGS_SI: usize = 13 * 8;
const PT_REGS_DI: usize = 14 * 8;
const PT_REGS_ORIG_AX: usize = 15 * 8;

/// Threads killed at sys_enter, so their sys_exit does not report the same attempt
/// twice. Not pinned: it only matters between one syscall's entry and exit.
#[map]
static PC_GUARD_KILLED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(1024, 0);

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: probe_read copies from any kernel address and fails cleanly on a fault.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
fn reg(regs: u64, off: usize) -> u64 {
    read::<u64>(regs + off as u64).unwrap_or(0)
}

#[inline(always)]
fn offsets() -> Option<&'static Settings> {
    settings().filter(|s| s.flags & settings_flags::HAVE_SOCKET_OFFSETS != 0)
}

/// Is the current task inside a 32-bit (compat) syscall?
#[inline(always)]
fn in_compat_syscall(o: &GuardOffsets) -> bool {
    // SAFETY: plain helper call; the pointer is only used for probe reads.
    let task = unsafe { bpf_get_current_task() };
    read::<u32>(task + o.thread_status as u64).is_some_and(|s| s & TS_COMPAT != 0)
}

/// (family, type, protocol) a socket-creating syscall was asked for, if `id` is one.
#[inline(always)]
fn socket_args(regs: u64, id: i64, o: &GuardOffsets) -> Option<(i32, i32, i32)> {
    let compat = in_compat_syscall(o);
    let (a, b, c) = match (id, compat) {
        (NR_SOCKET | NR_SOCKETPAIR, false) => (
            reg(regs, PT_REGS_DI),
            reg(regs, PT_REGS_SI),
            reg(regs, PT_REGS_DX),
        ),
        (NR32_SOCKET | NR32_SOCKETPAIR, true) => (
            reg(regs, PT_REGS_BX),
            reg(regs, PT_REGS_CX),
            reg(regs, PT_REGS_DX),
        ),
        (NR32_SOCKETCALL, true) => {
            let call = reg(regs, PT_REGS_BX) & 0xffff_ffff;
            if call != SYS_SOCKET && call != SYS_SOCKETPAIR {
                return None;
            }
            // The argument block is in user memory (compat_ulong_t each). Another
            // thread may rewrite it after this read: sys_exit checks the result.
            let args = (reg(regs, PT_REGS_CX) & 0xffff_ffff) as *const [u32; 3];
            // SAFETY: probe_read_user copies from the task's memory, failing cleanly.
            let [f, t, p] = unsafe { bpf_probe_read_user(args) }.ok()?;
            (f as u64, t as u64, p as u64)
        }
        _ => return None,
    };
    // The syscalls take `int`s: only the low 32 bits count.
    Some((a as i32, b as i32, c as i32))
}

#[inline(always)]
fn kill(agent: &Agent, hook: Hook, family: i32, sock_type: i32, protocol: i32) {
    report_packet_socket(hook, family, sock_type, protocol, agent);
    // SAFETY: plain helper call; these tracepoints run in the calling task's context,
    // and SIGKILL goes to its whole thread group before the call returns to user space.
    unsafe { bpf_send_signal(SIGKILL) };
}

// TP: sys_enter(struct pt_regs *regs, long id)
#[btf_tracepoint(function = "sys_enter")]
pub fn pc_sys_enter_socket(ctx: BtfTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    if id != NR_SOCKET
        && id != NR_SOCKETPAIR
        && id != NR32_SOCKETCALL
        && id != NR32_SOCKET
        && id != NR32_SOCKETPAIR
    {
        return 0;
    }
    let Some(s) = offsets() else { return 0 };
    let regs: u64 = ctx.arg(0);
    let Some((family, sock_type, protocol)) = socket_args(regs, id, &s.offsets) else {
        return 0;
    };
    if !packet::creates_packet_socket(family, sock_type) {
        return 0;
    }
    let Some(agent) = current_agent() else {
        return 0;
    };
    kill(
        &agent,
        Hook::SysEnterSocket,
        packet::final_family(family, sock_type),
        sock_type,
        protocol,
    );
    let _ = PC_GUARD_KILLED.insert(bpf_get_current_pid_tgid(), 1, 0);
    0
}

/// What a task's fd holds, if it is a socket: (family, type).
#[inline(always)]
fn socket_of_fd(o: &GuardOffsets, fd: u64) -> Option<(i32, i32)> {
    // SAFETY: plain helper call; the pointer is only used for probe reads.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task + o.task_files as u64)?;
    let fdt: u64 = read(files + o.files_fdt as u64)?;
    let max: u32 = read(fdt + o.fdt_max_fds as u64)?;
    if fd >= max as u64 {
        return None;
    }
    let fds: u64 = read(fdt + o.fdt_fd as u64)?;
    let file: u64 = read(fds + fd * 8)?;
    if file == 0 {
        return None;
    }
    let sock: u64 = read(file + o.file_private_data as u64)?;
    // A socket's file points back at it; any other file's private data does not.
    let back: u64 = read(sock + o.socket_file as u64)?;
    if back != file {
        return None;
    }
    let sk: u64 = read(sock + o.socket_sk as u64)?;
    let family: u16 = read(sk + o.sk_family as u64)?;
    let sock_type: i16 = read(sock + o.socket_type as u64)?;
    Some((family as i32, sock_type as i32))
}

// TP: sys_exit(struct pt_regs *regs, long ret)
#[btf_tracepoint(function = "sys_exit")]
pub fn pc_sys_exit_socket(ctx: BtfTracePointContext) -> i32 {
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let id = reg(regs, PT_REGS_ORIG_AX) as i64;
    if id != NR_SOCKET && id != NR32_SOCKET && id != NR32_SOCKETCALL {
        return 0;
    }
    let Some(s) = offsets() else { return 0 };
    let o = &s.offsets;
    let creates = match (id, in_compat_syscall(o)) {
        (NR_SOCKET, false) | (NR32_SOCKET, true) => true,
        (NR32_SOCKETCALL, true) => reg(regs, PT_REGS_BX) & 0xffff_ffff == SYS_SOCKET,
        _ => false,
    };
    if !creates {
        return 0;
    }
    let Some(agent) = current_agent() else {
        return 0;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: presence test only.
    if unsafe { PC_GUARD_KILLED.get(pid_tgid) }.is_some() {
        let _ = PC_GUARD_KILLED.remove(pid_tgid);
        return 0;
    }
    match socket_of_fd(o, ret as u64) {
        Some((family, _)) if !packet::is_link_layer(family) => {}
        Some((family, sock_type)) => kill(&agent, Hook::SysExitSocket, family, sock_type, 0),
        // The fd no longer holds the socket this call returned: another thread closed
        // or replaced it in the meantime, which hides what was created. Fail closed.
        None => kill(&agent, Hook::SysExitSocket, 0, 0, 0),
    }
    0
}

// TP: io_uring_submit_req(struct io_kiocb *req)
#[btf_tracepoint(function = "io_uring_submit_req")]
pub fn pc_uring_socket(ctx: BtfTracePointContext) -> i32 {
    let Some(s) = settings() else { return 0 };
    if s.flags & settings_flags::HAVE_URING_OFFSETS == 0 {
        return 0;
    }
    let o = &s.offsets;
    let req: u64 = ctx.arg(0);
    let Some(opcode) = read::<u8>(req + o.uring_opcode as u64) else {
        return 0;
    };
    if opcode as u32 != o.uring_op_socket {
        return 0;
    }
    let Some(agent) = current_agent() else {
        return 0;
    };
    // Prepared at submission: the kernel's own copy of the SQE's fields.
    let cmd = req + o.uring_cmd as u64;
    let family = read::<i32>(cmd + o.uring_sock_domain as u64).unwrap_or(0);
    let sock_type = read::<i32>(cmd + o.uring_sock_type as u64).unwrap_or(0);
    let protocol = read::<i32>(cmd + o.uring_sock_protocol as u64).unwrap_or(0);
    if packet::creates_packet_socket(family, sock_type) {
        kill(
            &agent,
            Hook::IoUringSocket,
            packet::final_family(family, sock_type),
            sock_type,
            protocol,
        );
    }
    0
}
