//! HTTP/2 connections to the API server, another one opened when those open run out of
//! streams.
//!
//! kube-apiserver allows 100 concurrent streams per HTTP/2 connection by default
//! (`--http2-max-streams-per-connection`), and hyper's client queues a request beyond a
//! connection's limit instead of opening another connection. Every agent on the node
//! shares the daemon's connections, and a watch (or `logs -f`) holds its stream for as
//! long as it runs: with one connection, the 101st long-running request would make
//! every later request wait for good. So each connection (a "lane": a client with a
//! pool of its own, hence its own connection) counts its open streams, from the
//! request until its response body is dropped, and a request goes to the first lane
//! with room.
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::HttpsClient;
use crate::util::ProxyBody;

/// Streams per connection: kube-apiserver's default limit.
pub(super) const STREAMS_PER_CONNECTION: usize = 100;

struct Lane {
    client: HttpsClient,
    streams: AtomicUsize,
}

pub(super) struct Lanes {
    new_client: Box<dyn Fn() -> HttpsClient + Send + Sync>,
    lanes: Mutex<Vec<Arc<Lane>>>,
    per_lane: usize,
}

/// A stream taken on a lane; dropping it gives the stream back.
struct Slot(Arc<Lane>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lanes {
    pub(super) fn new(
        per_lane: usize,
        new_client: impl Fn() -> HttpsClient + Send + Sync + 'static,
    ) -> Self {
        Lanes {
            new_client: Box::new(new_client),
            lanes: Mutex::new(Vec::new()),
            per_lane: per_lane.max(1),
        }
    }

    /// A stream on the first lane with room; a new lane if none has any.
    fn take(&self) -> Slot {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        for lane in lanes.iter() {
            // Under the lock, so the check and the increment cannot race other takers
            // (a drop only ever makes room).
            if lane.streams.load(Ordering::Relaxed) < self.per_lane {
                lane.streams.fetch_add(1, Ordering::Relaxed);
                return Slot(lane.clone());
            }
        }
        let lane = Arc::new(Lane {
            client: (self.new_client)(),
            streams: AtomicUsize::new(1),
        });
        lanes.push(lane.clone());
        Slot(lane)
    }

    /// Sends `req` on a lane with room; the stream is counted until the response
    /// body is dropped.
    pub(super) async fn request(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<UpstreamBody>, hyper_util::client::legacy::Error> {
        let slot = self.take();
        let resp = slot.0.client.request(req).await?;
        Ok(resp.map(|inner| UpstreamBody {
            inner,
            _slot: Some(slot),
        }))
    }

    /// Lanes open, for tests.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.lanes.lock().map(|l| l.len()).unwrap_or(0)
    }
}

/// An API server response body; it holds its HTTP/2 stream's place on its lane.
pub struct UpstreamBody {
    inner: Incoming,
    _slot: Option<Slot>,
}

impl UpstreamBody {
    /// A body that holds no lane's stream (HTTP/1.1 upgrade connections).
    pub(super) fn unpooled(inner: Incoming) -> Self {
        UpstreamBody { inner, _slot: None }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(per: usize) -> Lanes {
        Lanes::new(per, || {
            let tls = crate::tls::client_config(None, None).expect("client config");
            super::super::build_client(tls, true)
        })
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
}
