//! The agents' event loops: a few threads, each running a single-threaded tokio
//! runtime that owns the connections it is given — the agent's TLS session and HTTP/2
//! or HTTP/1.1 connection, every request's task on it, and the loop's own connections
//! to the API server (`upstream::pool` keeps a set of lanes per loop, found with
//! [`current`]). A request is then served start to end on one thread, as an nginx
//! worker serves its own, instead of being handed between the workers of a
//! work-stealing runtime, which cost a wake-up (futex) and a context switch or two per
//! request: daemon CPU per small GET, `pc-lab lab-load`, 56.6 → 40.8 µs. Everything
//! else (kernel events, policy, approvals, admin, audit shipping) stays on the main
//! runtime.
//!
//! A new connection goes to the loop with the fewest connections live, so long watches
//! spread over the loops as they open.
use std::{
    cell::Cell,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::warn;

/// Loops a daemon may run (`proxy.event_loops`); each has its own API server
/// connections.
pub const MAX_LOOPS: usize = 64;

/// Loops when the configuration does not say: one per CPU the daemon may use (its
/// cgroup's quota counts), at most this many.
pub const DEFAULT_MAX_LOOPS: usize = 8;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The loop this thread runs: `1..=n` on a loop's thread, 0 anywhere else.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// How many loops to run when the configuration gives no number.
pub fn default_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, DEFAULT_MAX_LOOPS)
}

/// The running loops; dropping this stops them (their tasks are dropped on their own
/// threads, as a runtime's are when it shuts down).
pub struct EventLoops {
    loops: Vec<Loop>,
}

struct Loop {
    handle: tokio::runtime::Handle,
    /// Connections given to this loop and not yet finished.
    live: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Counts a connection live on its loop until its task ends or is dropped.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EventLoops {
    /// Starts `n` loops (1..=[`MAX_LOOPS`]), threads named `agents-1`, `agents-2`, ...
    pub fn start(n: usize) -> std::io::Result<Arc<EventLoops>> {
        let n = n.clamp(1, MAX_LOOPS);
        let mut loops = Vec::with_capacity(n);
        for i in 1..=n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("agents-{i}-blocking"))
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("agents-{i}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(i));
                    rt.block_on(async {
                        // A dropped sender (the loops gone) stops the loop as well.
                        let _ = stopped.await;
                    });
                    // Dropping the runtime here drops its tasks on this thread.
                    drop(rt);
                })?;
            loops.push(Loop {
                handle,
                live: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Arc::new(EventLoops { loops }))
    }

    /// Connections live on each loop, in loop order.
    #[cfg(test)]
    fn load(&self) -> Vec<usize> {
        self.loops
            .iter()
            .map(|l| l.live.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs `start()`'s future as a task of the loop with the fewest live connections.
    /// `start` itself runs on that loop's thread, so what it registers (a socket taken
    /// with `from_std`, timers) belongs to that loop.
    pub fn spawn<F, Fut>(&self, start: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(l) = self
            .loops
            .iter()
            .min_by_key(|l| l.live.load(Ordering::Relaxed))
        else {
            return;
        };
        l.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(l.live.clone());
        l.handle.spawn(async move {
            let _live = live;
            start().await;
        });
    }
}

impl Drop for EventLoops {
    fn drop(&mut self) {
        for l in &mut self.loops {
            if let Some(stop) = l.stop.take() {
                let _ = stop.send(());
            }
        }
        // Each loop drops its connections; one stuck in a drop does not hold the
        // daemon's exit for long.
        let deadline = Instant::now() + Duration::from_secs(2);
        for l in &mut self.loops {
            let Some(t) = l.thread.take() else { continue };
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!(
                    thread = t.thread().name().unwrap_or("?"),
                    "an event loop did not stop in time"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_least_loaded_loop_thread() {
        let loops = EventLoops::start(2).expect("loops start");
        assert_eq!(loops.load().len(), 2);
        assert_eq!(current(), 0, "the test thread is not a loop");
        let (tx, rx) = std::sync::mpsc::channel();
        let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
        // The first connection stays live: the next goes to the other loop.
        let tx1 = tx.clone();
        loops.spawn(move || async move {
            tx1.send((current(), std::thread::current().name().map(str::to_owned)))
                .expect("send");
            let _ = hold_rx.await;
        });
        let (first, name) = rx.recv_timeout(Duration::from_secs(5)).expect("first");
        assert!((1..=2).contains(&first));
        assert_eq!(name, Some(format!("agents-{first}")));
        assert_eq!(loops.load().iter().sum::<usize>(), 1);
        let tx2 = tx.clone();
        loops.spawn(move || async move {
            tx2.send((current(), None)).expect("send");
        });
        let (second, _) = rx.recv_timeout(Duration::from_secs(5)).expect("second");
        assert_ne!(first, second, "the busy loop is not chosen");
        drop(hold_tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        while loops.load().iter().sum::<usize>() != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            loops.load(),
            vec![0, 0],
            "finished connections are not live"
        );
    }

    #[test]
    fn stopping_drops_the_loops_tasks() {
        let loops = EventLoops::start(1).expect("loops start");
        let (dropped_tx, dropped_rx) = std::sync::mpsc::channel::<()>();
        struct OnDrop(std::sync::mpsc::Sender<()>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        loops.spawn(move || async move {
            let _guard = OnDrop(dropped_tx);
            started_tx.send(()).expect("send");
            std::future::pending::<()>().await;
        });
        started_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("started");
        drop(loops);
        dropped_rx
            .recv_timeout(Duration::from_secs(1))
            .expect("the pending task was dropped when the loops stopped");
    }
}
