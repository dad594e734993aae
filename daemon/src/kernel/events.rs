//! Kernel events: the ring buffer read through tokio's AsyncFd, decoded into
//! [`KernelEvent`], and handed to the daemon over a channel.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::maps::{MapData, RingBuf};
use portcullis_common::{Event, EventKind, Hook};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

use super::{KernelError, sys};

/// A decoded ring-buffer record, as written to the event log.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KernelEvent {
    /// RFC 3339 wall-clock time (from the kernel's boot-time clock).
    pub time: String,
    pub kind: &'static str,
    pub hook: &'static str,
    pub origin: OriginView,
    /// The destination the agent attempted, `IP:PORT` (empty for socket creation).
    pub dst: String,
    /// Where the connection went instead (redirects only).
    pub redirected_to: String,
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    pub socket_cookie: u64,
}

/// The kernel-observed origin of a socket operation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OriginView {
    pub cgroup_id: u64,
    pub agent_cgroup_id: u64,
    pub netns_cookie: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
}

impl From<&portcullis_common::Origin> for OriginView {
    fn from(o: &portcullis_common::Origin) -> Self {
        OriginView {
            cgroup_id: o.cgroup_id,
            agent_cgroup_id: o.agent_cgroup_id,
            netns_cookie: o.netns_cookie,
            pid: o.tgid,
            tid: o.pid,
            uid: o.uid,
            gid: o.gid,
            comm: o.comm_str(),
        }
    }
}

/// Decodes one ring-buffer record; `None` for a record of the wrong size or kind.
pub fn decode(bytes: &[u8], clock: &BootClock) -> Option<KernelEvent> {
    let ev: Event = sys::event_from_bytes(bytes)?;
    let kind = EventKind::from_u32(ev.kind)?;
    let hook = Hook::from_u32(ev.hook)?;
    let addr = |k: &portcullis_common::SockKey| {
        if k.is_unset() {
            String::new()
        } else {
            k.to_string()
        }
    };
    Some(KernelEvent {
        time: clock.rfc3339(ev.ktime_ns),
        kind: kind.name(),
        hook: hook.name(),
        origin: (&ev.origin).into(),
        dst: addr(&ev.dst),
        redirected_to: addr(&ev.redirected_to),
        family: ev.family,
        sock_type: ev.sock_type,
        protocol: ev.protocol,
        socket_cookie: ev.socket_cookie,
    })
}

/// Converts `bpf_ktime_get_boot_ns` readings to wall-clock time.
pub struct BootClock {
    wall_minus_boot_ns: i128,
}

impl BootClock {
    pub fn now() -> BootClock {
        let boot = sys::boottime_ns();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        BootClock {
            wall_minus_boot_ns: wall - boot,
        }
    }

    pub fn rfc3339(&self, boot_ns: u64) -> String {
        let ns = (boot_ns as i128 + self.wall_minus_boot_ns).max(0) as u128;
        let t = UNIX_EPOCH + Duration::from_nanos(ns as u64);
        crate::util::rfc3339_micros(t)
    }
}

/// Least time between two drains of the ring while events come. The programs wake
/// the reader only for an event that lands in a ring it has emptied (the kernel's
/// adaptive notification) or once a batch has built up, so a lone event is read at
/// once, a burst costs a wake-up per this gap, and an idle node none at all.
pub const DRAIN_GAP: Duration = Duration::from_millis(20);

/// A poll of a ring that sent no wake-up for this long: a backstop only (every event
/// landing in an emptied ring wakes the reader).
pub const BACKSTOP_POLL: Duration = Duration::from_secs(5);

/// Reads the ring buffer until the receiver goes away.
pub async fn pump(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<KernelEvent>,
) -> Result<(), KernelError> {
    let mut afd = sys::readable_ring(ring).map_err(|e| KernelError::Map {
        map: portcullis_common::maps::EVENTS.into(),
        message: format!("registering with the reactor: {e}"),
    })?;
    let clock = BootClock::now();
    // The last drain stopped at its bound: the records left behind send no wake-up.
    let mut left_behind = false;
    loop {
        if !left_behind {
            tokio::select! {
                g = afd.readable_mut() => {
                    // Cleared before the drain: a record committed after it finds the
                    // ring emptied and wakes us again (at worst a drain finds nothing).
                    g.map_err(|e| KernelError::Map {
                        map: portcullis_common::maps::EVENTS.into(),
                        message: e.to_string(),
                    })?
                    .clear_ready();
                }
                _ = tokio::time::sleep(BACKSTOP_POLL) => {}
            }
        }
        let batch = drain(afd.get_mut(), &clock);
        left_behind = batch.len() >= MAX_DRAIN;
        for ev in batch {
            if tx.send(ev).await.is_err() {
                return Ok(());
            }
        }
        if !left_behind {
            tokio::time::sleep(DRAIN_GAP).await;
        }
    }
}

/// Passes the programs' own diagnostics (aya-log) to the daemon's log, from the
/// pinned program `program_id`, whether this daemon loaded it or adopted it.
pub async fn forward_program_log(program_id: u32) {
    let logger = match sys::ProgramLogger::init_from_id(program_id) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "eBPF program logs unavailable");
            return;
        }
    };
    let Ok(mut afd) = sys::readable_logger(logger) else {
        return;
    };
    loop {
        let Ok(mut guard) = afd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Most records taken from the ring per wake-up or tick (the rest wait in the ring for
/// the next one), so the reader's memory stays bounded whatever the programs send.
const MAX_DRAIN: usize = 4096;

fn drain(ring: &mut RingBuf<MapData>, clock: &BootClock) -> Vec<KernelEvent> {
    let mut out = Vec::new();
    while out.len() < MAX_DRAIN
        && let Some(item) = ring.next()
    {
        match decode(&item, clock) {
            Some(ev) => out.push(ev),
            None => warn!(len = item.len(), "undecodable kernel event"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_common::{Origin, SockKey};

    #[test]
    fn decodes_a_redirect() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let ev = Event {
            kind: EventKind::Redirected as u32,
            hook: Hook::Connect4 as u32,
            origin: Origin {
                cgroup_id: 7,
                agent_cgroup_id: 5,
                netns_cookie: 9,
                tgid: 100,
                pid: 101,
                uid: 0,
                gid: 0,
                comm,
            },
            dst: SockKey::from_v4([10, 96, 0, 1], 443),
            redirected_to: SockKey::from_v4([10, 0, 0, 1], 15443),
            family: 2,
            sock_type: 1,
            protocol: 6,
            _pad: 0,
            socket_cookie: 42,
            ktime_ns: 0,
        };
        let bytes = sys::event_bytes(&ev);
        let k = decode(&bytes, &BootClock::now()).expect("a well-formed redirect record decodes");
        assert_eq!(k.kind, "redirected");
        assert_eq!(k.hook, "cgroup/connect4");
        assert_eq!(k.dst, "10.96.0.1:443");
        assert_eq!(k.redirected_to, "10.0.0.1:15443");
        assert_eq!(k.origin.comm, "curl");
        assert_eq!(k.origin.pid, 100);
        assert!(decode(&bytes[..10], &BootClock::now()).is_none());
    }
}
