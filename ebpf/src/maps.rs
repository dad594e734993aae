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
    Settings, SockKey, StickyAgent,
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

/// Is `key` (or its address with any port) a protected endpoint?
#[inline(always)]
pub fn protected(key: &SockKey) -> bool {
    // SAFETY: the value is only tested for presence, never held across a map update.
    unsafe { PC_PROTECTED.get(key).is_some() || PC_PROTECTED.get(key.with_port(0)).is_some() }
}
