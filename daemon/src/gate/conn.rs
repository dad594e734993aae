//! One agent connection: TLS (a leaf for what the agent asked for), then HTTP/2 or
//! HTTP/1.1 (with upgrades), each request an exchange; and the budget against HTTP/2
//! rapid reset, which closes a connection that cancels too much.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};

use super::{
    Gate,
    admission::{AgentKey, Full},
};
use crate::{k8s::PodRef, kernel::ConnOrigin, tls};

/// Per-connection budgets against HTTP/2 "rapid reset" (CVE-2023-44487), where each
/// stream opened and cancelled at once becomes work upstream, on the API server
/// connection every agent shares. h2's own limit only counts streams reset before the
/// server accepted them, and we accept at once. A busy but honest client cancels
/// rarely (a watch it no longer needs, a timed-out request); request volume alone is
/// not limited here (that is policy's job), only cancellation.
const CANCEL_BUDGET: u32 = 100;
const CANCEL_WINDOW: Duration = Duration::from_secs(10);

/// A count of events in a fixed window.
#[derive(Debug)]
pub(super) struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    pub(super) fn new() -> std::sync::Mutex<Window> {
        std::sync::Mutex::new(Window {
            start: Instant::now(),
            count: 0,
        })
    }
}

/// Adds one to `w`; true exactly when the count first exceeds `budget`.
fn over_budget(w: &std::sync::Mutex<Window>, window: Duration, budget: u32) -> bool {
    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
    if w.start.elapsed() > window {
        w.start = Instant::now();
        w.count = 0;
    }
    w.count += 1;
    w.count == budget + 1
}

/// What is known about a connection before its first request.
#[derive(Debug)]
pub(super) struct Conn {
    pub id: u64,
    pub peer: SocketAddr,
    pub origin: Option<ConnOrigin>,
    /// The pod whose cgroup opened the connection (gated mode).
    pub kernel_pod: Option<PodRef>,
    pub sni: Option<String>,
    pub cancels: std::sync::Mutex<Window>,
    /// Set when a budget is exceeded; the connection is then closed.
    pub abuse: tokio::sync::Notify,
    /// Over budget: requests still arriving before the GOAWAY takes effect are refused
    /// at once, never forwarded (a starved daemon may act on the budget late).
    pub closing: std::sync::atomic::AtomicBool,
    /// Whose share the connection and its requests count against.
    pub agent: AgentKey,
    /// Requests in flight (until their response body ends), and since when none is.
    pub active: std::sync::atomic::AtomicUsize,
    pub idle_since: std::sync::Mutex<Instant>,
    /// The audit records' `origin`, made at the first request and shared by every
    /// record of the connection (it does not change).
    pub audit_origin: std::sync::OnceLock<Arc<crate::audit::Origin>>,
    /// The last caller's identity on the connection and what was made from it once:
    /// its audit subject, and its upstream impersonation under the policy of the
    /// time. A connection's requests almost always carry one token, whose verified
    /// identity the authenticator shares: later requests reuse these.
    pub audit_subject: std::sync::Mutex<Option<super::exchange::SubjectMemo>>,
    pub impersonation: std::sync::Mutex<Option<super::authorize::ImpersonationMemo>>,
}

impl Conn {
    /// A request begins: the connection is not idle until it ends (the guard drops).
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::SeqCst);
        Busy { conn: self.clone() }
    }

    fn idle_for(&self) -> Option<Duration> {
        (self.active.load(Ordering::SeqCst) == 0).then(|| {
            self.idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
        })
    }
}

/// A request in flight on its connection.
pub(super) struct Busy {
    conn: Arc<Conn>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self
            .conn
            .idle_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.conn.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Conn {
    pub fn note_cancel(&self) {
        if over_budget(&self.cancels, CANCEL_WINDOW, CANCEL_BUDGET) {
            warn!(
                budget = CANCEL_BUDGET,
                window_s = CANCEL_WINDOW.as_secs(),
                "too many cancelled requests on one connection (HTTP/2 rapid reset?)"
            );
            self.closing
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.abuse.notify_one();
        }
    }
}

/// Counts a request as cancelled if its handler is dropped before it finishes.
struct CancelGuard<'a> {
    conn: &'a Conn,
    done: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.note_cancel();
        }
    }
}

impl Gate {
    /// Serves one accepted connection until the agent or the API server ends it.
    pub async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        origin: Option<ConnOrigin>,
    ) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, %peer, pid = origin.as_ref().map(|o| o.origin.pid));
        self.serve_inner(id, stream, peer, origin)
            .instrument(span)
            .await
    }

    async fn serve_inner(
        self: Arc<Self>,
        id: u64,
        stream: TcpStream,
        peer: SocketAddr,
        origin: Option<ConnOrigin>,
    ) {
        let agent = AgentKey::of(origin.as_ref(), peer.ip());
        // Closed at once past the agent's or the total share (the agent sees a reset and
        // retries; the daemon keeps its descriptors for the others).
        let _share = match self.admission.connection(agent) {
            Ok(p) => p,
            Err(full) => {
                let (scope, cap) = match full {
                    Full::Total(n) => ("all agents", n),
                    Full::Agent(n) => ("this agent", n),
                };
                if self
                    .refused_conns
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(1000)
                {
                    warn!(
                        ?agent,
                        scope,
                        cap,
                        "connection cap reached: closing new connections (logged once per 1000)"
                    );
                }
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let dialled = origin.as_ref().map(|o| o.original_dst.ip());
        let accepted =
            match tls::accept(&self.minter, stream, dialled, self.limits.header_timeout).await {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "TLS failed");
                    return;
                }
            };
        let h2 = accepted.h2;
        let kernel_pod = origin.as_ref().and_then(|o| self.authorizer.pod_of(o));
        let conn = Arc::new(Conn {
            id,
            peer,
            origin,
            kernel_pod,
            sni: accepted.sni,
            cancels: Window::new(),
            abuse: tokio::sync::Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            agent,
            active: std::sync::atomic::AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(Instant::now()),
            audit_origin: std::sync::OnceLock::new(),
            audit_subject: std::sync::Mutex::new(None),
            impersonation: std::sync::Mutex::new(None),
        });
        debug!(h2, sni = ?conn.sni, "TLS established");
        let gate = self.clone();
        let svc_conn = conn.clone();
        let svc = service_fn(move |req| {
            let gate = gate.clone();
            let conn = svc_conn.clone();
            async move {
                let mut guard = CancelGuard {
                    conn: &conn,
                    done: false,
                };
                // Boxed: the exchange's state machine is large and would otherwise
                // stay inline in the connection's stream task for a watch's whole life.
                let resp = Box::pin(gate.exchange(req, &conn)).await;
                guard.done = true;
                Ok::<_, Infallible>(resp)
            }
        });
        let io = TokioIo::new(accepted.stream);
        let limits = self.admission.limits();
        let idle = limits.idle_timeout;
        // Serves until the connection ends; closes it (GOAWAY for HTTP/2) on abuse or
        // once no request has been in flight for `idle_timeout`.
        macro_rules! drive {
            ($serving:expr) => {{
                let serving = $serving;
                tokio::pin!(serving);
                let mut tick = tokio::time::interval(
                    (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)),
                );
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        r = serving.as_mut() => break r,
                        _ = conn.abuse.notified() => {
                            warn!("closing the connection (GOAWAY)");
                            serving.as_mut().graceful_shutdown();
                            break tokio::time::timeout(Duration::from_secs(1), serving)
                                .await
                                .unwrap_or(Ok(()));
                        }
                        _ = tick.tick() => {
                            if conn.idle_for().is_some_and(|d| d >= idle) {
                                debug!(idle_s = idle.as_secs_f64(), "closing an idle connection");
                                serving.as_mut().graceful_shutdown();
                                break tokio::time::timeout(Duration::from_secs(1), serving)
                                    .await
                                    .unwrap_or(Ok(()));
                            }
                        }
                    }
                }
            }};
        }
        let result = if h2 {
            drive!(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(self.limits.max_header_bytes as u32)
                    .max_concurrent_streams(limits.max_streams_per_connection)
                    // Dead peers are found by PING; idle ones by the idle timer above.
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .serve_connection(io, svc)
            )
        } else {
            drive!(
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(self.limits.header_timeout)
                    .max_buf_size(self.limits.max_header_bytes.max(8192))
                    .serve_connection(io, svc)
                    .with_upgrades()
            )
        };
        if let Err(e) = result {
            debug!(error = %e, "connection ended with an error");
        }
    }
}
