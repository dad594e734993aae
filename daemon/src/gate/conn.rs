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

use super::Gate;
use crate::{k8s::PodRef, kernel::ConnOrigin, tls};

/// Most concurrent HTTP/2 streams one agent connection may open (client-go multiplexes
/// every request of a process, watches included, over one connection).
const MAX_CONCURRENT_STREAMS: u32 = 1000;

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
                let resp = gate.exchange(req, &conn).await;
                guard.done = true;
                Ok::<_, Infallible>(resp)
            }
        });
        let io = TokioIo::new(accepted.stream);
        let result = if h2 {
            let serving = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(self.limits.max_header_bytes as u32)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .serve_connection(io, svc);
            tokio::pin!(serving);
            tokio::select! {
                r = serving.as_mut() => r,
                _ = conn.abuse.notified() => {
                    warn!("closing the connection (GOAWAY)");
                    serving.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(1), serving)
                        .await
                        .unwrap_or(Ok(()))
                }
            }
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(self.limits.header_timeout)
                .max_buf_size(self.limits.max_header_bytes.max(8192))
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        };
        if let Err(e) = result {
            debug!(error = %e, "connection ended with an error");
        }
    }
}
