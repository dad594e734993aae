//! Bounded kernel-event reporting. A flood of refused attempts (200,000 datagrams a
//! second from one agent) must not become 200,000 lines on disk: the programs send each
//! (agent cgroup, kind, hook) one by one only within a per-CPU budget and count the
//! rest in `PC_EVENT_COUNTS`; the daemon adds its own budget over all agents
//! (`event_logs.events_per_second`). What is over either budget is written as one
//! aggregated record per key and second: how many, the first and the last time.
use std::collections::{HashMap, HashSet};

use aya::maps::{MapData, PerCpuHashMap};
use portcullis_common::{EventCount, EventCountKey, EventKind, Hook, maps as names};
use serde::Serialize;

use super::{KernelError, events::BootClock, events::KernelEvent};

/// Keys the daemon aggregates at once; more fold into one key per kind and hook.
const MAX_KEYS: usize = 4096;

/// Many events of one key, written as one record.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Aggregated {
    pub time: String,
    pub kind: &'static str,
    pub hook: &'static str,
    pub origin: AggregatedOrigin,
    pub aggregated: Counts,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AggregatedOrigin {
    pub agent_cgroup_id: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Events of this key not written one by one since the last record.
    pub count: u64,
    /// `kernel` (over the programs' per-CPU budget) or `daemon` (over
    /// `event_logs.events_per_second`).
    pub budget: &'static str,
    pub first: String,
    pub last: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    agent_cgroup: u64,
    kind: &'static str,
    hook: &'static str,
}

struct Pending {
    count: u64,
    first: String,
    last: String,
}

/// The daemon's budget and the aggregation of both budgets.
pub struct Aggregator {
    per_second: u32,
    window: std::time::Instant,
    used: u32,
    pending: HashMap<Key, Pending>,
    /// Suppressed totals per kernel key at the last reading.
    kernel_seen: HashMap<EventCountKey, u64>,
    /// Pending keys with counts from the kernel's budget.
    kernel_marks: HashSet<Key>,
}

impl Aggregator {
    pub fn new(per_second: u32) -> Aggregator {
        Aggregator {
            per_second,
            window: std::time::Instant::now(),
            used: 0,
            pending: HashMap::new(),
            kernel_seen: HashMap::new(),
            kernel_marks: HashSet::new(),
        }
    }

    /// True: write `ev` one by one. False: it was counted into an aggregate.
    pub fn admit(&mut self, ev: &KernelEvent) -> bool {
        if self.window.elapsed() >= std::time::Duration::from_secs(1) {
            self.window = std::time::Instant::now();
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            return true;
        }
        let mut key = Key {
            agent_cgroup: ev.origin.agent_cgroup_id,
            kind: ev.kind,
            hook: ev.hook,
        };
        if !self.pending.contains_key(&key) && self.pending.len() >= MAX_KEYS {
            key.agent_cgroup = 0;
        }
        let p = self.pending.entry(key).or_insert_with(|| Pending {
            count: 0,
            first: ev.time.clone(),
            last: ev.time.clone(),
        });
        p.count += 1;
        p.last.clone_from(&ev.time);
        false
    }

    /// Adds what the programs counted over their budget since the last reading.
    pub fn kernel_counts(&mut self, counts: Vec<(EventCountKey, EventCount)>, clock: &BootClock) {
        for (k, c) in counts {
            let (Some(kind), Some(hook)) = (EventKind::from_u32(k.kind), Hook::from_u32(k.hook))
            else {
                continue;
            };
            let seen = self.kernel_seen.get(&k).copied().unwrap_or(0);
            // A key the LRU evicted and that came back starts from zero again.
            let delta = if c.suppressed >= seen {
                c.suppressed - seen
            } else {
                c.suppressed
            };
            if self.kernel_seen.len() < MAX_KEYS * 2 || self.kernel_seen.contains_key(&k) {
                self.kernel_seen.insert(k, c.suppressed);
            }
            if delta == 0 {
                continue;
            }
            let key = Key {
                agent_cgroup: k.agent_cgroup,
                kind: kind.name(),
                hook: hook.name(),
            };
            let p = self.pending.entry(key).or_insert_with(|| Pending {
                count: 0,
                first: clock.rfc3339(c.first_ns),
                last: clock.rfc3339(c.last_ns),
            });
            p.count += delta;
            p.last = clock.rfc3339(c.last_ns);
            // Kernel-side aggregates say so; daemon-side ones were counted above.
            self.kernel_marks.insert(key);
        }
    }

    /// The aggregated records since the last call.
    pub fn flush(&mut self) -> Vec<Aggregated> {
        let time = crate::util::rfc3339_micros(std::time::SystemTime::now());
        let marks = std::mem::take(&mut self.kernel_marks);
        self.pending
            .drain()
            .map(|(k, p)| Aggregated {
                time: time.clone(),
                kind: k.kind,
                hook: k.hook,
                origin: AggregatedOrigin {
                    agent_cgroup_id: k.agent_cgroup,
                },
                aggregated: Counts {
                    count: p.count,
                    budget: if marks.contains(&k) {
                        "kernel"
                    } else {
                        "daemon"
                    },
                    first: p.first,
                    last: p.last,
                },
            })
            .collect()
    }
}

/// The programs' counts, summed over CPUs: (key, suppressed, first, last).
pub fn read_counts(
    map: &PerCpuHashMap<MapData, EventCountKey, EventCount>,
) -> Vec<(EventCountKey, EventCount)> {
    map.iter()
        .filter_map(Result::ok)
        .map(|(k, per_cpu)| {
            let mut sum = EventCount::default();
            for c in per_cpu.iter() {
                sum.emitted += c.emitted;
                sum.suppressed += c.suppressed;
                if c.first_ns != 0 && (sum.first_ns == 0 || c.first_ns < sum.first_ns) {
                    sum.first_ns = c.first_ns;
                }
                sum.last_ns = sum.last_ns.max(c.last_ns);
            }
            (k, sum)
        })
        .collect()
}

pub fn open_counts(
    dir: &std::path::Path,
) -> Result<PerCpuHashMap<MapData, EventCountKey, EventCount>, KernelError> {
    let path = dir.join(names::EVENT_COUNTS);
    let data = MapData::from_pin(&path).map_err(|e| KernelError::Map {
        map: names::EVENT_COUNTS.into(),
        message: format!("opening pin {}: {e}", path.display()),
    })?;
    let map = aya::maps::Map::from_map_data(data).map_err(|e| KernelError::Map {
        map: names::EVENT_COUNTS.into(),
        message: e.to_string(),
    })?;
    PerCpuHashMap::try_from(map).map_err(|e| KernelError::Map {
        map: names::EVENT_COUNTS.into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::OriginView;

    fn ev(cg: u64, t: &str) -> KernelEvent {
        KernelEvent {
            time: t.into(),
            kind: "datagram_refused",
            hook: "cgroup/sendmsg4",
            origin: OriginView {
                cgroup_id: cg,
                agent_cgroup_id: cg,
                netns_cookie: 0,
                pid: 1,
                tid: 1,
                uid: 0,
                gid: 0,
                comm: "x".into(),
            },
            dst: String::new(),
            redirected_to: String::new(),
            family: 2,
            sock_type: 2,
            protocol: 17,
            socket_cookie: 0,
        }
    }

    #[test]
    fn over_the_budget_events_are_counted_not_written() {
        let mut a = Aggregator::new(10);
        let admitted = (0..1000)
            .filter(|i| a.admit(&ev(7, &format!("t{i}"))))
            .count();
        assert_eq!(admitted, 10);
        let out = a.flush();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].aggregated.count, 990);
        assert_eq!(out[0].aggregated.first, "t10");
        assert_eq!(out[0].aggregated.last, "t999");
        assert_eq!(out[0].aggregated.budget, "daemon");
        assert!(a.flush().is_empty());
    }

    #[test]
    fn kernel_counts_become_deltas() {
        let mut a = Aggregator::new(10);
        let clock = BootClock::now();
        let k = EventCountKey {
            agent_cgroup: 9,
            kind: EventKind::DatagramRefused as u32,
            hook: Hook::Sendmsg4 as u32,
        };
        let c = |s| EventCount {
            suppressed: s,
            first_ns: 1,
            last_ns: 2,
            ..EventCount::default()
        };
        a.kernel_counts(vec![(k, c(500))], &clock);
        let out = a.flush();
        assert_eq!(out[0].aggregated.count, 500);
        assert_eq!(out[0].aggregated.budget, "kernel");
        a.kernel_counts(vec![(k, c(700))], &clock);
        assert_eq!(a.flush()[0].aggregated.count, 200);
        a.kernel_counts(vec![(k, c(700))], &clock);
        assert!(a.flush().is_empty());
    }
}
