//! "Is this an agent?" — enrolled cgroup membership (the cgroup or any ancestor), plus
//! sticky marks for processes that were ever seen in an enrolled cgroup.
use aya_ebpf::bindings::__sk_buff;
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_uid_gid,
    generated::{bpf_get_current_ancestor_cgroup_id, bpf_skb_ancestor_cgroup_id},
};
use portcullis_common::{MAX_CGROUP_DEPTH, Origin, StickyAgent};

use crate::maps::{PC_AGENT_CGROUPS, PC_STICKY_TASKS};

/// Why a task counts as an agent.
#[derive(Clone, Copy)]
pub struct Agent {
    /// The enrolled cgroup (the current cgroup or an ancestor, or the sticky record's).
    pub cgroup: u64,
    /// True when the task is no longer inside an enrolled cgroup but was once.
    pub sticky: bool,
}

/// The enrolled ancestor (or self) of the current task's cgroup v2, if any.
#[inline(always)]
pub fn enrolled_ancestor_of_current() -> Option<u64> {
    let mut level: i32 = 0;
    while level < MAX_CGROUP_DEPTH as i32 {
        // SAFETY: plain helper call; returns 0 past the task's own depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: presence test only.
        if unsafe { PC_AGENT_CGROUPS.get(id) }.is_some() {
            return Some(id);
        }
        level += 1;
    }
    None
}

/// Same walk for the socket that owns an skb (egress backstop).
#[inline(always)]
pub fn enrolled_ancestor_of_skb(skb: *mut __sk_buff) -> Option<u64> {
    let mut level: i32 = 0;
    while level < MAX_CGROUP_DEPTH as i32 {
        // SAFETY: `skb` is the program's context pointer; the helper reads the owning
        // socket's cgroup and returns 0 past its depth or when there is no socket.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(skb, level) };
        if id == 0 {
            break;
        }
        // SAFETY: presence test only.
        if unsafe { PC_AGENT_CGROUPS.get(id) }.is_some() {
            return Some(id);
        }
        level += 1;
    }
    None
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Classifies the current task, marking it sticky when it is inside an enrolled cgroup.
#[inline(always)]
pub fn current_agent() -> Option<Agent> {
    let tgid = current_tgid();
    if let Some(cgroup) = enrolled_ancestor_of_current() {
        mark_sticky(tgid, cgroup);
        return Some(Agent {
            cgroup,
            sticky: false,
        });
    }
    sticky_agent(tgid)
}

/// A sticky mark counts only while its cgroup is still enrolled, so unenrolling a
/// cgroup releases the processes that left it too.
#[inline(always)]
pub fn sticky_agent(tgid: u32) -> Option<Agent> {
    // SAFETY: the value is copied out immediately.
    let cgroup = unsafe { PC_STICKY_TASKS.get(tgid) }?.agent_cgroup;
    // SAFETY: presence test only.
    unsafe { PC_AGENT_CGROUPS.get(cgroup) }?;
    Some(Agent {
        cgroup,
        sticky: true,
    })
}

#[inline(always)]
pub fn mark_sticky(tgid: u32, cgroup: u64) {
    // SAFETY: presence test only.
    if unsafe { PC_STICKY_TASKS.get(tgid) }.is_none() {
        let _ = PC_STICKY_TASKS.insert(
            tgid,
            StickyAgent {
                agent_cgroup: cgroup,
            },
            0,
        );
    }
}

/// Who is calling, from the kernel's own view of the current task.
#[inline(always)]
pub fn current_origin(agent: &Agent, netns_cookie: u64) -> Origin {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    Origin {
        // SAFETY: plain helper call.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        agent_cgroup_id: agent.cgroup,
        netns_cookie,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}
