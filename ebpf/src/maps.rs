//! The LRU maps keep per-CPU LRU lists (BPF_F_NO_COMMON_LRU): no global lock on the
//! connect path.
//!
//! Every map is pinned by name under the daemon's bpffs directory, so enrollment,
//! connection records and undelivered events survive a daemon restart.
use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, RingBuf},
};
use portcullis_common::{
    AGENT_CGROUP_ENTRIES, CONN_MAP_ENTRIES, ConnRecord, EVENT_COUNT_ENTRIES, EVENTS_RING_BYTES,
    Enrollment, EventCount, EventCountKey, PROTECTED_ENTRIES, Protection, STICKY_TASK_ENTRIES,
    Settings, SockKey, StickyAgent, protection_flags, settings_flags,
};

#[map]
pub static PC_AGENT_CGROUPS: HashMap<u64, Enrollment> = HashMap::pinned(AGENT_CGROUP_ENTRIES, 0);

#[map]
pub static PC_PROTECTED: HashMap<SockKey, Protection> = HashMap::pinned(PROTECTED_ENTRIES, 0);

#[map]
pub static PC_SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map]
pub static PC_CONN_BY_COOKIE: LruHashMap<u64, ConnRecord> =
    LruHashMap::pinned(CONN_MAP_ENTRIES, BPF_F_NO_COMMON_LRU);

#[map]
pub static PC_CONN_BY_CLIENT: LruHashMap<SockKey, ConnRecord> =
    LruHashMap::pinned(CONN_MAP_ENTRIES, BPF_F_NO_COMMON_LRU);

#[map]
pub static PC_STICKY_TASKS: LruHashMap<u32, StickyAgent> =
    LruHashMap::pinned(STICKY_TASK_ENTRIES, BPF_F_NO_COMMON_LRU);

#[map]
pub static PC_EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// Per-CPU: no lock and no atomics on the event path; the daemon sums the CPUs.
#[map]
pub static PC_EVENT_COUNTS: LruPerCpuHashMap<EventCountKey, EventCount> =
    LruPerCpuHashMap::pinned(EVENT_COUNT_ENTRIES, 0);

#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    PC_SETTINGS.get(0)
}

/// The protection of `key`: its own entry, else its address's every-port entry. The
/// daemon's own listen addresses are never protected (a node-wide refusal must leave
/// the gate's port reachable, and redirected connections go there).
#[inline(always)]
pub fn protection(key: &SockKey) -> Option<Protection> {
    if is_daemon(key) {
        return None;
    }
    // SAFETY: the value is copied out at once, never held across a map update.
    unsafe {
        PC_PROTECTED
            .get(key)
            .or_else(|| PC_PROTECTED.get(&key.with_port(0)))
            .copied()
    }
}

/// Is `key` one of the daemon's listen addresses (where redirected connections go)?
#[inline(always)]
pub fn is_daemon(key: &SockKey) -> bool {
    settings().is_some_and(|s| {
        (s.flags & settings_flags::HAVE_DAEMON_V4 != 0 && *key == s.daemon_v4)
            || (s.flags & settings_flags::HAVE_DAEMON_V6 != 0 && *key == s.daemon_v6)
    })
}

/// Is `key` (or its address with any port) a protected endpoint?
#[inline(always)]
pub fn protected(key: &SockKey) -> bool {
    protection(key).is_some()
}

/// What the egress backstop drops: every protected endpoint except an address-wide
/// refusal (a node's every port). That one is enforced at connect and sendmsg; on
/// packets it would also drop the pod's replies to connections the node opened to it
/// (the kubelet's probes), whose destination is a node address and port.
#[inline(always)]
pub fn backstop_protected(key: &SockKey) -> bool {
    match protection(key) {
        None => false,
        Some(p) if p.flags & protection_flags::REFUSE == 0 => true,
        // SAFETY: presence test only.
        Some(_) => unsafe { PC_PROTECTED.get(key).is_some() },
    }
}
