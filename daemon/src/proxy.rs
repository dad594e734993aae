//! The data path for one redirected agent connection:
//! accept → TLS (leaf for what the agent asked for) → HTTP/2 or HTTP/1.1 → one
//! exchange per request, in [`Proxy::exchange`]:
//!
//! precheck (→ [`Admitted`]: attributes and masking plan) → authenticate →
//! authorize (→ [`Authorized`] or a [`Refusal`]) → forward or upgrade (the request
//! record durable first for mutations) → relay (masked, its outcome recorded when it
//! ends). A refusal at any stage becomes its metav1.Status in one place
//! (`refusal.rs`), and every audit record is written by `exchange.rs`.
//!
//! Bodies are streamed frame by frame in both directions (watches, `logs -f` and
//! chunked lists are never buffered), long-running requests have no idle timeout, and
//! upgrades (exec/attach/port-forward over WebSocket or SPDY) become byte pipes once
//! both sides agreed to switch protocols.
mod authorize;
mod exchange;
mod forward;
mod precheck;
mod refusal;
mod relay;

#[cfg(test)]
mod gate_tests;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Request, Response, header};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::{Instrument, debug, info_span, warn};

pub use authorize::{Authorized, Authorizer, Gated};
pub use precheck::Admitted;
pub use refusal::Refusal;

use crate::{
    audit_log::AuditLog, ca::LeafMinter, config, mask::Masking, origin::ConnOrigin, pod::PodRef,
    upstream::Upstream, util::ProxyBody,
};
use exchange::{Exchange, Records};

/// Most concurrent HTTP/2 streams one agent connection may open (client-go multiplexes
/// every request of a process, watches included, over one connection).
const MAX_CONCURRENT_STREAMS: u32 = 1000;

pub struct Proxy {
    minter: Arc<LeafMinter>,
    upstream: Arc<Upstream>,
    authorizer: Authorizer,
    limits: Limits,
    masking: Arc<Masking>,
    records: Records,
    next_conn: AtomicU64,
}

/// What the configuration bounds about agents' connections and requests.
struct Limits {
    accept_unredirected: bool,
    header_timeout: Duration,
    max_header_bytes: usize,
}

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
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    fn new() -> std::sync::Mutex<Window> {
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
struct Conn {
    id: u64,
    peer: SocketAddr,
    origin: Option<ConnOrigin>,
    /// The pod whose cgroup opened the connection (gated mode).
    kernel_pod: Option<PodRef>,
    sni: Option<String>,
    cancels: std::sync::Mutex<Window>,
    /// Set when a budget is exceeded; the connection is then closed.
    abuse: tokio::sync::Notify,
}

impl Conn {
    fn note_cancel(&self) {
        if over_budget(&self.cancels, CANCEL_WINDOW, CANCEL_BUDGET) {
            warn!(
                budget = CANCEL_BUDGET,
                window_s = CANCEL_WINDOW.as_secs(),
                "too many cancelled requests on one connection (HTTP/2 rapid reset?)"
            );
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

impl Proxy {
    pub fn new(
        minter: Arc<LeafMinter>,
        upstream: Arc<Upstream>,
        authorizer: Authorizer,
        cfg: &config::Proxy,
        masking: Arc<Masking>,
        audit: Arc<AuditLog>,
    ) -> Self {
        Proxy {
            minter,
            upstream,
            authorizer,
            limits: Limits {
                accept_unredirected: cfg.accept_unredirected,
                header_timeout: cfg.header_timeout,
                max_header_bytes: cfg.max_header_bytes,
            },
            masking,
            records: Records::new(audit),
            next_conn: AtomicU64::new(1),
        }
    }

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
        let dst_ip = origin.as_ref().map(|o| o.original_dst.ip());
        // A slow or silent client must not hold a task forever before TLS is done.
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await
                .map_err(|e| format!("reading the TLS client hello: {e}"))?;
            let sni = start.client_hello().server_name().map(str::to_owned);
            let cfg = self
                .minter
                .server_config(sni.as_deref(), dst_ip)
                .map_err(|e| e.to_string())?;
            let tls = start
                .into_stream(cfg)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok::<_, String>((tls, sni))
        };
        let (tls, sni) = match tokio::time::timeout(self.limits.header_timeout, handshake).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                debug!(error = %e, "TLS failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let kernel_pod = origin.as_ref().and_then(|o| self.authorizer.pod_of(o));
        let conn = Arc::new(Conn {
            id,
            peer,
            origin,
            kernel_pod,
            sni,
            cancels: Window::new(),
            abuse: tokio::sync::Notify::new(),
        });
        debug!(h2, sni = ?conn.sni, "TLS established");
        let proxy = self.clone();
        let svc_conn = conn.clone();
        let svc = service_fn(move |req| {
            let proxy = proxy.clone();
            let conn = svc_conn.clone();
            async move {
                let mut guard = CancelGuard {
                    conn: &conn,
                    done: false,
                };
                let resp = proxy.exchange(req, &conn).await;
                guard.done = true;
                Ok::<_, Infallible>(resp)
            }
        });
        let io = TokioIo::new(tls);
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

    /// One request, top to bottom: its answer, and its records.
    async fn exchange(&self, req: Request<Incoming>, conn: &Arc<Conn>) -> Response<ProxyBody> {
        let mut ex = self.records.begin(&req, conn);
        let resp = match self.pass(req, conn, &mut ex).await {
            Ok(resp) => resp,
            Err(refusal) => ex.refuse(refusal),
        };
        ex.log(&resp);
        resp
    }

    /// The stages a request passes, each giving the next what it needs; the first
    /// refusal ends it.
    async fn pass(
        &self,
        req: Request<Incoming>,
        conn: &Arc<Conn>,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let admitted = self.precheck(&req, conn)?;
        ex.admitted(&admitted);
        let caller = self.authorizer.authenticate(&req, conn).await?;
        ex.identified(caller.identity());
        let authorized = caller.authorize(&admitted).await?;
        ex.authorized(&authorized);
        if admitted.upgrade {
            self.upgrade(req, conn, ex, &admitted, &authorized).await
        } else {
            self.forward(req, conn, ex, &admitted, &authorized).await
        }
    }
}

/// An HTTP/1.1 upgrade request: `Connection: upgrade` plus an `Upgrade` protocol.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_is_recognised_case_insensitively_among_tokens() {
        let req = |conn: &str, up: Option<&str>| {
            let mut b = Request::builder().header("connection", conn);
            if let Some(u) = up {
                b = b.header("upgrade", u);
            }
            b.body(()).unwrap()
        };
        assert!(is_upgrade(&req("Upgrade", Some("websocket"))));
        assert!(is_upgrade(&req("keep-alive, UPGRADE", Some("SPDY/3.1"))));
        assert!(!is_upgrade(&req("keep-alive", Some("websocket"))));
        assert!(!is_upgrade(&req("upgrade", None)));
    }
}
