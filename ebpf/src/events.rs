//! Ring-buffer reporting, within a budget. Each (enrolled cgroup, kind, hook) may send
//! `EVENT_BUDGET_PER_WINDOW` events per window and CPU one by one; past that the
//! events are only counted (with the first and last time) in `PC_EVENT_COUNTS`, which
//! the daemon reads into aggregated records, so a flood of refused attempts costs a
//! bounded amount of ring buffer, disk and memory. A full ring buffer drops the event,
//! never the enforcement decision.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP},
    helpers::generated::bpf_ktime_get_boot_ns,
};
use portcullis_common::{
    EVENT_BUDGET_PER_WINDOW, EVENT_WINDOW_NS, Event, EventCount, EventCountKey, EventKind, Hook,
    Origin, SockKey,
};

use crate::maps::{PC_EVENT_COUNTS, PC_EVENTS};

/// Unread bytes in the ring buffer above which the reader is woken at once.
const WAKE_AFTER_BYTES: u64 = 64 * 1024;

pub struct Report {
    pub kind: EventKind,
    pub hook: Hook,
    pub dst: SockKey,
    pub redirected_to: SockKey,
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    pub socket_cookie: u64,
}

/// Counts one event of this CPU's budget; true when it may be sent one by one.
#[inline(always)]
fn account(c: &mut EventCount, now: u64) -> bool {
    if c.window_start_ns == 0 || now.wrapping_sub(c.window_start_ns) >= EVENT_WINDOW_NS {
        c.window_start_ns = now;
        c.in_window = 0;
    }
    if c.first_ns == 0 {
        c.first_ns = now;
    }
    c.last_ns = now;
    c.in_window = c.in_window.saturating_add(1);
    if c.in_window > EVENT_BUDGET_PER_WINDOW {
        c.suppressed += 1;
        false
    } else {
        c.emitted += 1;
        true
    }
}

/// Within the budget of this event's key?
#[inline(always)]
fn within_budget(report: &Report, origin: &Origin, now: u64) -> bool {
    let key = EventCountKey {
        agent_cgroup: origin.agent_cgroup_id,
        kind: report.kind as u32,
        hook: report.hook as u32,
    };
    match PC_EVENT_COUNTS.get_ptr_mut(key) {
        // SAFETY: a per-CPU value: only this CPU writes it, and the program runs with
        // preemption (migration) disabled.
        Some(c) => account(unsafe { &mut *c }, now),
        None => {
            let mut c = EventCount::default();
            let ok = account(&mut c, now);
            let _ = PC_EVENT_COUNTS.insert(key, c, 0);
            ok
        }
    }
}

#[inline(always)]
pub fn emit(report: &Report, origin: &Origin) {
    // SAFETY: plain helper call.
    emit_at(report, origin, unsafe { bpf_ktime_get_boot_ns() });
}

/// [`emit`] with the time already read (boot clock, ns).
#[inline(always)]
pub fn emit_at(report: &Report, origin: &Origin, now: u64) {
    if !within_budget(report, origin, now) {
        return;
    }
    if let Some(mut entry) = PC_EVENTS.reserve::<Event>(0) {
        entry.write(Event {
            kind: report.kind as u32,
            hook: report.hook as u32,
            origin: *origin,
            dst: report.dst,
            redirected_to: report.redirected_to,
            family: report.family,
            sock_type: report.sock_type,
            protocol: report.protocol,
            _pad: 0,
            socket_cookie: report.socket_cookie,
            ktime_ns: now,
        });
        // The reader sleeps on the ring while it is empty, and between two drains it
        // waits a few milliseconds (the daemon's `kernel::events::pump`). Flags 0 is the
        // kernel's adaptive notification: the commit wakes the reader only when it has
        // caught up with this very record (the ring was empty), checked after the commit,
        // so no event can be left unannounced; the rest of a batch costs no wake-up
        // (an irq_work inside the agent's connect). A ring filling fast wakes it at once.
        let flags = if PC_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKE_AFTER_BYTES {
            BPF_RB_FORCE_WAKEUP
        } else {
            0
        };
        entry.submit(flags as u64);
    }
}
