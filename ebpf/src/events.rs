//! Ring-buffer reporting. A full ring buffer drops the event (and the daemon sees the
//! gap in its lost-event counter), never the enforcement decision.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::bpf_ktime_get_boot_ns,
};
use portcullis_common::{Event, EventKind, Hook, Origin, SockKey};

use crate::maps::PC_EVENTS;

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

#[inline(always)]
pub fn emit(report: &Report, origin: &Origin) {
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
            // SAFETY: plain helper call.
            ktime_ns: unsafe { bpf_ktime_get_boot_ns() },
        });
        // Waking the reader on every event costs an irq_work and a wake-up inside the
        // agent's connect(); the daemon also polls every few milliseconds, so wake it
        // only once a batch has built up.
        let flags = if PC_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKE_AFTER_BYTES {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        entry.submit(flags as u64);
    }
}
