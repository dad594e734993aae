//! One HTTP/2 connection to the API server that a lane opens itself, and opens again
//! when it has closed (the API server's GOAWAY when it stops or after 90 s idle, a reset,
//! a failed keep-alive ping).
//!
//! Once the API server is known to speak HTTP/2 a lane is exactly one connection, so it
//! sends on hyper's connection handle directly. The generic pooled client did the same
//! through a pool keyed by destination (a hashed lookup, a checkout racing a connect, and
//! the futures that carry them): ~4–5k instructions per request, ~4% of a small GET's,
//! for a choice the lane had already made.
//!
//! A request the connection did not take (it was closed by the time the request reached
//! it: nothing of it was sent) goes on a new connection; if that one too closes first,
//! the request fails as "cannot reach" (503, retried by the client). A request that was
//! sent and then failed is not sent again (it may not be idempotent).
use std::{
    future::poll_fn,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{Request, Response, Uri};
use hyper::{body::Incoming, client::conn::http2};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::connect::HttpConnector,
    rt::{TokioExecutor, TokioTimer},
};
use tower_service::Service;
use tracing::debug;

use crate::util::{BoxError, ProxyBody};

/// The TCP connect (5 s, the connector's own limit), TLS handshake and HTTP/2 preface
/// together: an API server that accepts but never answers must not hold requests for
/// good.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request did not get an answer from the API server.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (TCP, TLS, HTTP/2 preface): nothing was sent.
    #[error("opening a connection")]
    Connect(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// The request failed on an open HTTP/2 connection.
    #[error(transparent)]
    Http(hyper::Error),
    /// The pooled client's error (a lane still negotiating its protocol; upgrades).
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

impl SendError {
    /// Whether the API server could not be reached at all (503 and a retry, rather
    /// than 502).
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Http(_) => false,
            SendError::Pooled(e) => e.is_connect(),
        }
    }
}

/// Why opening a connection failed.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Connect(BoxError),
    #[error("the API server did not agree to HTTP/2 (ALPN)")]
    NotHttp2,
    #[error("HTTP/2 handshake")]
    Handshake(#[source] hyper::Error),
    #[error("the API server closed two new connections before the request could be sent")]
    ClosedAtOnce,
}

pub(super) struct H2Connection {
    connector: HttpsConnector<HttpConnector>,
    /// `https://host:port` of the API server.
    base: Uri,
    /// The connection's handle; `None` before the first opening. A closed one is
    /// replaced by the next opening.
    sender: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    /// One opening at a time; the requests that wait for it then share its result:
    /// the last opening's failure, if it failed.
    opening: tokio::sync::Mutex<Option<Arc<dyn std::error::Error + Send + Sync>>>,
    /// Openings ended so far (counted once each has its result).
    openings: AtomicU64,
    open_timeout: Duration,
}

impl H2Connection {
    /// `connector` must offer only HTTP/2 in ALPN.
    pub(super) fn new(connector: HttpsConnector<HttpConnector>, base: Uri) -> Self {
        H2Connection {
            connector,
            base,
            sender: Mutex::new(None),
            opening: tokio::sync::Mutex::new(None),
            openings: AtomicU64::new(0),
            open_timeout: OPEN_TIMEOUT,
        }
    }

    pub(super) async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        // At most two openings for one request: the first connection may close before
        // the request reaches it (a GOAWAY in flight); a second that does too is the
        // API server's doing, and the error says so.
        let mut opened = 0;
        loop {
            let attempt = {
                let mut sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
                match sender.as_mut() {
                    Some(s) if !s.is_closed() => Ok(s.try_send_request(req)),
                    // None yet, or closed: `open` replaces it.
                    _ => Err(req),
                }
            };
            match attempt {
                Err(back) => req = back,
                Ok(sent) => match sent.await {
                    Ok(resp) => return Ok(resp),
                    Err(mut e) => match e.take_message() {
                        // Not sent: the connection closed first.
                        Some(back) => req = back,
                        None => return Err(SendError::Http(e.into_error())),
                    },
                },
            }
            if opened == 2 {
                return Err(SendError::Connect(Arc::new(OpenError::ClosedAtOnce)));
            }
            // Boxed: opening (TCP, TLS, the HTTP/2 handshake) is a large future, and
            // held inline it would make every request's future as large — moved and
            // copied as the request goes (+12k instructions per small GET, callgrind).
            Box::pin(self.open()).await?;
            opened += 1;
        }
    }

    /// Opens a connection unless another request has opened one meanwhile; a request
    /// that waited on an opening that failed fails with its error (a hundred requests
    /// arriving while the API server is down get one connect timeout, not a hundred in
    /// turn).
    async fn open(&self) -> Result<(), SendError> {
        let before = self.openings.load(Ordering::Acquire);
        let mut failed = self.opening.lock().await;
        if self.is_open() {
            return Ok(());
        }
        if self.openings.load(Ordering::Acquire) != before
            && let Some(e) = &*failed
        {
            return Err(SendError::Connect(e.clone()));
        }
        let result = match tokio::time::timeout(self.open_timeout, self.handshake()).await {
            Ok(Ok(sender)) => {
                *self.sender.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
                *failed = None;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(OpenError::Timeout(self.open_timeout)),
        };
        self.openings.fetch_add(1, Ordering::Release);
        result.map_err(|e| {
            let e: Arc<dyn std::error::Error + Send + Sync> = Arc::new(e);
            *failed = Some(e.clone());
            SendError::Connect(e)
        })
    }

    fn is_open(&self) -> bool {
        self.sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|s| !s.is_closed())
    }

    async fn handshake(&self) -> Result<http2::SendRequest<ProxyBody>, OpenError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(OpenError::Connect)?;
        let io = connector
            .call(self.base.clone())
            .await
            .map_err(OpenError::Connect)?;
        let h2 = match &io {
            hyper_rustls::MaybeHttpsStream::Https(tls) => {
                tls.inner().get_ref().1.alpn_protocol() == Some(b"h2")
            }
            hyper_rustls::MaybeHttpsStream::Http(_) => false,
        };
        if !h2 {
            return Err(OpenError::NotHttp2);
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(super::KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(super::KEEP_ALIVE_TIMEOUT)
            .handshake(io)
            .await
            .map_err(OpenError::Handshake)?;
        // On this thread's runtime: a lane belongs to one event loop.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "API server connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// An API server that accepts TCP connections and never answers (counting them).
    async fn silent() -> (Uri, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let uri = format!("https://{}", listener.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(tcp);
            }
        });
        (uri, accepted)
    }

    fn connection(base: Uri, open_timeout: Duration) -> H2Connection {
        let tls = crate::tls::client_config(None, None).expect("client config");
        let connector = super::super::connector(
            tls,
            super::super::Flavor::Lane(super::super::pool::Protocol::Http2),
        );
        H2Connection {
            open_timeout,
            ..H2Connection::new(connector, base)
        }
    }

    fn get(base: &Uri) -> Request<ProxyBody> {
        Request::get(format!("{base}api"))
            .body(crate::util::full(bytes::Bytes::new()))
            .expect("request")
    }

    /// Requests that arrive while the connection is being opened wait for that one
    /// opening and share its failure: twenty requests to an API server that accepts
    /// and never answers cost one connection and one timeout, not twenty in turn. The
    /// next request after that tries again.
    #[tokio::test]
    async fn requests_waiting_on_a_failed_opening_share_its_failure() {
        let (base, accepted) = silent().await;
        let conn = connection(base.clone(), Duration::from_millis(300));
        let started = std::time::Instant::now();
        let results = futures_util::future::join_all((0..20).map(|_| conn.send(get(&base)))).await;
        let took = started.elapsed();
        for r in &results {
            let e = r.as_ref().expect_err("no answer");
            assert!(e.is_connect(), "{e}");
            let chain = crate::util::source_chain(e);
            assert!(chain.contains("no connection within 300ms"), "{chain}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one opening for all");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let again = conn.send(get(&base)).await.expect_err("no answer");
        assert!(again.is_connect(), "{again}");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "a later request tries again"
        );
    }

    /// Nothing listening: a connect error, which the gate answers with a 503.
    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base: Uri = format!("https://{}", listener.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        drop(listener);
        let conn = connection(base.clone(), OPEN_TIMEOUT);
        let e = conn.send(get(&base)).await.expect_err("refused");
        assert!(e.is_connect(), "{e}");
        let chain = crate::util::source_chain(&e);
        assert!(chain.starts_with("opening a connection: "), "{chain}");
        // Each cause once: the chain is not the same words twice.
        let causes: Vec<&str> = chain.split(": ").collect();
        for pair in causes.windows(2) {
            assert!(!pair[1].contains(pair[0]), "{chain}");
        }
    }
}
