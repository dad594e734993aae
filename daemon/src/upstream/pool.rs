//! HTTP/2 connections to the API server, another one opened when those open run out of
//! streams.
//!
//! kube-apiserver allows 100 concurrent streams per HTTP/2 connection by default
//! (`--http2-max-streams-per-connection`), and hyper's client queues a request beyond a
//! connection's limit instead of opening another connection. Every agent on the node
//! shares the daemon's connections, and a watch (or `logs -f`) holds its stream for as
//! long as it runs: with one connection, the 101st long-running request would make
//! every later request wait for good. So each connection (a "lane") counts its open
//! streams, from the request until its response body is dropped, and a request goes to
//! the first lane with room.
//!
//! Each of the agents' event loops (`loops`) has lanes of its own, so a request and
//! its API server connection are served by the same thread; requests made elsewhere
//! (the main runtime: token reviews, discovery) share a set of their own.
//!
//! Until the API server has answered over HTTP/2 a lane is hyper-util's pooled client
//! negotiating the protocol (HTTP/1.1 stays that way); after, a lane is one HTTP/2
//! connection it holds itself (`connection`). A lane idle for 90 s (the API server's
//! own idle timeout) is closed, except each loop's first HTTP/2 lane, whose connection
//! the API server closes when idle and the lane opens again on its next request.
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Version;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;

use super::{
    HttpsClient,
    connection::{H2Connection, SendError},
    stream::ResponseBody,
};
use crate::{
    loops,
    util::{BoxError, ProxyBody},
};

/// A lane idle this long is closed (kube-apiserver closes its side after 90 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Streams per connection: kube-apiserver's default limit.
pub(super) const STREAMS_PER_CONNECTION: usize = 100;

/// How a lane's client speaks to the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// HTTP/2 or HTTP/1.1, whichever ALPN settles on: before the daemon has seen the
    /// API server answer over HTTP/2.
    Negotiated,
    /// HTTP/2 only: once it has. The client then opens one connection however many
    /// requests arrive while it connects.
    Http2,
}

/// How a lane sends.
pub(super) enum LaneClient {
    /// hyper-util's pooled client: [`Protocol::Negotiated`] lanes.
    Pooled(HttpsClient),
    /// One HTTP/2 connection: [`Protocol::Http2`] lanes.
    Direct(H2Connection),
}

impl LaneClient {
    async fn send(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<Received>, SendError> {
        match self {
            // Boxed: the pooled client's future is large and serves only until the API
            // server is known to speak HTTP/2 (or an HTTP/1.1 one); inline it would make
            // every request's future as large.
            LaneClient::Pooled(c) => Ok(Box::pin(c.request(req)).await?.map(Received::Pooled)),
            LaneClient::Direct(c) => Ok(c.send(req).await?.map(Received::Direct)),
        }
    }
}

struct Lane {
    client: LaneClient,
    protocol: Protocol,
    streams: AtomicUsize,
    /// When `streams` last fell to 0: milliseconds since `epoch`.
    idle_since: AtomicU64,
    epoch: Instant,
    /// A negotiating lane's first request is on its way: the others wait for it (see
    /// [`Lanes::request`]).
    opening: AtomicBool,
    /// That first request has its answer (or failed): the lane's connection is known.
    warm: AtomicBool,
    warmed: Notify,
}

pub(super) struct Lanes {
    new_client: Box<dyn Fn(Protocol) -> LaneClient + Send + Sync>,
    /// Per event loop (index [`loops::current`]; 0: off the loops).
    lanes: Box<[Mutex<Vec<Arc<Lane>>>]>,
    per_lane: usize,
    /// The API server has answered over HTTP/2: new lanes are HTTP/2-only.
    h2: AtomicBool,
    idle_timeout: Duration,
    epoch: Instant,
}

impl Lane {
    fn idle_ms(&self, now: Instant) -> u64 {
        let now = u64::try_from(now.duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(self.idle_since.load(Ordering::Relaxed))
    }
}

/// A stream taken on a lane; dropping it gives the stream back.
struct Slot(Arc<Lane>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            let ms = u64::try_from(self.0.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.0.idle_since.store(ms, Ordering::Relaxed);
        }
    }
}

/// Marks a negotiating lane warm when its first request ends, however it ends (also
/// when the agent goes away and the request is dropped), so its waiters never hang.
struct Opening<'a>(&'a Lane);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.warm.store(true, Ordering::Release);
        self.0.warmed.notify_waiters();
    }
}

impl Lanes {
    pub(super) fn new(
        per_lane: usize,
        new_client: impl Fn(Protocol) -> LaneClient + Send + Sync + 'static,
    ) -> Self {
        Lanes {
            new_client: Box::new(new_client),
            lanes: (0..=loops::MAX_LOOPS)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            per_lane: per_lane.max(1),
            h2: AtomicBool::new(false),
            idle_timeout: IDLE_TIMEOUT,
            epoch: Instant::now(),
        }
    }

    /// A stream on the first lane with room among this loop's; a new lane if none has
    /// any. Once the API server is known to speak HTTP/2, negotiating lanes take no new
    /// streams (they close when idle) and new lanes are HTTP/2-only.
    fn take(&self) -> Slot {
        let h2 = self.h2.load(Ordering::Acquire);
        let here = loops::current().min(loops::MAX_LOOPS);
        let mut lanes = self.lanes[here].lock().unwrap_or_else(|p| p.into_inner());
        if h2 && (lanes.len() > 1 || lanes.first().is_some_and(|l| l.protocol != Protocol::Http2)) {
            // Negotiating lanes nothing uses any more (their pools go with them), and
            // HTTP/2 lanes idle for `idle_timeout` but the first (their connections).
            let mut first = true;
            let mut now = None;
            lanes.retain(|l| {
                if l.streams.load(Ordering::Relaxed) > 0 {
                    first &= l.protocol != Protocol::Http2;
                    return true;
                }
                if l.protocol != Protocol::Http2 {
                    return false;
                }
                if std::mem::take(&mut first) {
                    return true;
                }
                let now = *now.get_or_insert_with(Instant::now);
                u128::from(l.idle_ms(now)) < self.idle_timeout.as_millis()
            });
        }
        for lane in lanes.iter() {
            if h2 && lane.protocol != Protocol::Http2 {
                continue;
            }
            // Under the lock, so the check and the increment cannot race other takers
            // (a drop only ever makes room).
            if lane.streams.load(Ordering::Relaxed) < self.per_lane {
                lane.streams.fetch_add(1, Ordering::Relaxed);
                return Slot(lane.clone());
            }
        }
        let protocol = if h2 {
            Protocol::Http2
        } else {
            Protocol::Negotiated
        };
        let lane = Arc::new(Lane {
            client: (self.new_client)(protocol),
            protocol,
            streams: AtomicUsize::new(1),
            idle_since: AtomicU64::new(0),
            epoch: self.epoch,
            opening: AtomicBool::new(false),
            warm: AtomicBool::new(false),
            warmed: Notify::new(),
        });
        lanes.push(lane.clone());
        Slot(lane)
    }

    /// Sends `req` on a lane with room; the stream is counted until the response
    /// body is dropped.
    ///
    /// A negotiating client cannot know that a connection still in its TLS handshake
    /// will be HTTP/2 and shareable, so it opens one connection per request that
    /// arrives meanwhile: 2,000 watches opened at once made ~1,700 connections to the
    /// API server. On such a lane the first request goes alone; the others wait for
    /// its answer and then share its connection.
    pub(super) async fn request(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        let slot = self.take();
        let lane = &*slot.0;
        let mut opening = None;
        if lane.protocol == Protocol::Negotiated && !lane.warm.load(Ordering::Acquire) {
            if lane.opening.swap(true, Ordering::AcqRel) {
                let warmed = lane.warmed.notified();
                tokio::pin!(warmed);
                warmed.as_mut().enable();
                if !lane.warm.load(Ordering::Acquire) {
                    warmed.await;
                }
            } else {
                opening = Some(Opening(lane));
            }
        }
        let resp = lane.client.send(req).await;
        if let Ok(r) = &resp
            && r.version() == Version::HTTP_2
        {
            self.h2.store(true, Ordering::Release);
        }
        drop(opening);
        Ok(resp?.map(|inner| UpstreamBody {
            inner,
            _slot: Some(slot),
        }))
    }

    /// Lanes open, for tests.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.lock().map(|l| l.len()).unwrap_or(0))
            .sum()
    }
}

/// An API server response body; it holds its HTTP/2 stream's place on its lane.
pub struct UpstreamBody {
    inner: Received,
    _slot: Option<Slot>,
}

/// A response body as the client that received it reads it.
enum Received {
    /// hyper's: the pooled client (a negotiating lane, an HTTP/1.1 API server) and
    /// upgrades.
    Pooled(Incoming),
    /// A lane's own HTTP/2 connection's.
    Direct(ResponseBody),
}

impl UpstreamBody {
    /// A body that holds no lane's stream (HTTP/1.1 upgrade connections).
    pub(super) fn unpooled(inner: Incoming) -> Self {
        UpstreamBody {
            inner: Received::Pooled(inner),
            _slot: None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Received::Pooled(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Received::Direct(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Received::Pooled(b) => b.is_end_stream(),
            Received::Direct(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Received::Pooled(b) => b.size_hint(),
            Received::Direct(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(per: usize) -> Lanes {
        Lanes::new(per, |p| {
            let tls = crate::tls::client_config(None, None).expect("client config");
            let base = http::Uri::from_static("https://127.0.0.1:1");
            super::super::lane_client(tls, &base, p)
        })
    }

    #[test]
    fn each_event_loop_has_lanes_of_its_own() {
        let l = Arc::new(lanes(100));
        let event_loops = crate::loops::EventLoops::start(2).expect("loops start");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut holds = Vec::new();
        for _ in 0..2 {
            let (hold, held) = tokio::sync::oneshot::channel::<()>();
            holds.push(hold);
            let (l, tx) = (l.clone(), tx.clone());
            // Each task stays live, so the next one goes to the other loop.
            event_loops.spawn(move || async move {
                let a = l.take();
                let b = l.take();
                tx.send((
                    crate::loops::current(),
                    Arc::as_ptr(&a.0) as usize,
                    Arc::as_ptr(&b.0) as usize,
                ))
                .expect("send");
                let _ = held.await;
            });
        }
        let one = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("one");
        let two = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("two");
        assert_ne!(one.0, two.0, "the two tasks ran on different loops");
        assert_eq!(one.1, one.2, "one loop's requests share its lane");
        assert_eq!(two.1, two.2, "one loop's requests share its lane");
        assert_ne!(one.1, two.1, "each loop has its own lane (connection)");
        let off_loop = l.take();
        assert_ne!(Arc::as_ptr(&off_loop.0) as usize, one.1);
        assert_ne!(Arc::as_ptr(&off_loop.0) as usize, two.1);
        assert_eq!(l.count(), 3);
        drop(holds);
    }

    #[test]
    fn a_full_lane_opens_another_and_a_freed_stream_is_reused() {
        let l = lanes(2);
        let a = l.take();
        let b = l.take();
        assert_eq!(l.count(), 1);
        let c = l.take();
        assert_eq!(l.count(), 2, "the third stream needs a second connection");
        assert!(!Arc::ptr_eq(&a.0, &c.0));
        drop(b);
        let d = l.take();
        assert!(
            Arc::ptr_eq(&a.0, &d.0),
            "room on the first lane is used first"
        );
        assert_eq!(l.count(), 2);
        drop((a, c, d));
        let e = l.take();
        assert_eq!(e.0.streams.load(Ordering::Relaxed), 1);
        assert_eq!(
            l.count(),
            2,
            "lanes are kept (their idle connections time out)"
        );
    }

    #[test]
    fn idle_http2_lanes_close_but_the_first() {
        let mut l = lanes(1);
        l.h2.store(true, Ordering::Release);
        let (a, b, c) = (l.take(), l.take(), l.take());
        assert_eq!(l.count(), 3);
        let (first, second) = (a.0.clone(), b.0.clone());
        drop((a, c));
        // Idle, not for long enough.
        let d = l.take();
        assert!(Arc::ptr_eq(&d.0, &first));
        assert_eq!(l.count(), 3);
        drop(d);
        l.idle_timeout = Duration::ZERO;
        // The idle third lane closes; the first is kept although idle, the second
        // because it has a stream open.
        let e = l.take();
        assert!(Arc::ptr_eq(&e.0, &first), "the first lane is kept");
        assert_eq!(l.count(), 2);
        drop((b, e));
        let f = l.take();
        assert!(Arc::ptr_eq(&f.0, &first));
        assert_eq!(l.count(), 1, "the second closes once idle");
        assert!(!Arc::ptr_eq(&f.0, &second));
    }
}
