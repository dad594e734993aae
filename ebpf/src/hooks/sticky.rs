//! Sticky agent marks. A process seen inside an enrolled cgroup (at exec, at fork from
//! an agent, or at any socket hook) keeps being treated as an agent after it writes
//! itself into another cgroup's `cgroup.procs`, and so do the children it forks there.
//! These are global tracepoints (not cgroup-attached); they cost one cgroup walk per
//! fork/exec, and a map delete per exit.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use portcullis_common::settings_flags;

use crate::{
    agent::{current_tgid, enrolled_ancestor_of_current, mark_sticky, sticky_agent},
    maps::{PC_STICKY_TASKS, settings},
};

// TP: sched_process_fork(struct task_struct *parent, struct task_struct *child)
#[btf_tracepoint(function = "sched_process_fork")]
pub fn pc_sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let parent_tgid = current_tgid();
    let agent_cgroup = match enrolled_ancestor_of_current() {
        Some(c) => c,
        None => match sticky_agent(parent_tgid) {
            Some(a) => a.cgroup,
            None => return 0,
        },
    };
    let Some(s) = settings() else { return 0 };
    if s.flags & settings_flags::HAVE_TASK_OFFSETS == 0 {
        return 0;
    }
    let child: *const u8 = ctx.arg(1);
    // SAFETY: `child` is the tracepoint's task_struct pointer; the offset of `tgid` was
    // resolved from this kernel's BTF by the daemon, and probe_read tolerates faults.
    let child_tgid =
        unsafe { bpf_probe_read_kernel(child.add(s.task_tgid_offset as usize) as *const i32) };
    if let Ok(tgid) = child_tgid
        && tgid as u32 != parent_tgid
    {
        mark_sticky(tgid as u32, agent_cgroup);
    }
    0
}

// TP: sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
#[btf_tracepoint(function = "sched_process_exec")]
pub fn pc_sched_process_exec(_ctx: BtfTracePointContext) -> i32 {
    if let Some(cgroup) = enrolled_ancestor_of_current() {
        mark_sticky(current_tgid(), cgroup);
    }
    0
}

// TP: sched_process_exit(struct task_struct *p, ...)
#[btf_tracepoint(function = "sched_process_exit")]
pub fn pc_sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Only the thread-group leader's exit ends the process's mark (pid reuse would
    // otherwise make an unrelated process an agent).
    if pid_tgid as u32 == (pid_tgid >> 32) as u32 {
        let _ = PC_STICKY_TASKS.remove((pid_tgid >> 32) as u32);
    }
    0
}
