//! One HTTP/2 connection to the API server that a lane opens itself, and opens again
//! when it has closed (the API server's GOAWAY when it stops or after 90 s idle, a reset,
//! a keep-alive ping left unanswered).
//!
//! Once the API server is known to speak HTTP/2 a lane is exactly one connection, so it
//! sends on the `h2` crate's connection handle from the request's own task. hyper's
//! client did the same through its connection task: each request went through a
//! channel to that task, which spawned a task of its own per request to wait for the
//! response (a task allocation, its state moved in, a oneshot back and two wake-ups:
//! ~5k instructions a request, callgrind). Here the request's task opens the stream
//! and waits for the response itself; a request body read whole is handed to h2 from
//! the same task, and one streamed from the agent goes on from a task of its own when
//! it must wait (for the API server's window, or for the agent).
//!
//! A request the connection cannot take (it is closing: a GOAWAY, an error; nothing
//! of it was sent) goes on a new connection; if that one too is closed first, the
//! request fails as "cannot reach" (503, retried by the client). A request the API
//! server drops unprocessed after its stream opened (RFC 9113 §8.7: a stream above a
//! GOAWAY's last stream id — the API server going away, or its `--goaway-chance` — or
//! one reset with `REFUSED_STREAM`) goes again, at most [`RESENDS`] times, as Go's
//! client does for kubectl talking to the API server directly: a copy of its head is
//! kept for that, and of its body when it went whole in one piece (a body streamed from
//! the agent cannot go again; that request fails with 502). A request that failed in
//! any other way is not sent again: the API server may have acted on it.
use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, Uri, header};
use http_body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;
use tracing::debug;

use super::stream::{Pipe, ResponseBody};
use crate::util::BoxError;

/// The TCP connect (5 s, the connector's own limit), TLS handshake and HTTP/2 preface
/// together: an API server that accepts but never answers must not hold requests for
/// good.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Flow-control windows offered to the API server. A stream's window is what the API
/// server may send ahead of the agent's reading: the daemon holds at most that for a
/// stream whose agent has stopped reading. The connection's is the streams' together,
/// so such streams never hold back the others on their lane (other agents' answers):
/// with a smaller connection window, a few agents that stop reading would stall
/// everyone's requests on the connection.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * super::pool::STREAMS_PER_CONNECTION as u32;
/// Largest response head accepted (hyper's client default).
const MAX_HEADER_LIST: u32 = 16 << 10;
/// Times a request the API server refused unprocessed is sent again (each time on the
/// connection open then: a GOAWAY's closes it and the next opens).
const RESENDS: usize = 2;
/// The wait before a second resend (the first goes at once: after a GOAWAY, on a new
/// connection): an API server that refuses a stream twice is busy, and Go's client
/// too waits before trying again.
const RESEND_PAUSE: Duration = Duration::from_millis(100);

/// Why a request did not get an answer from the API server.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (TCP, TLS, HTTP/2 preface): nothing was sent.
    #[error("opening a connection")]
    Connect(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// The request failed on an open HTTP/2 connection.
    #[error(transparent)]
    Http(h2::Error),
    /// The pooled client's error (a lane still negotiating its protocol; upgrades).
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
    /// A method a lane does not carry.
    #[error("{0} requests are not sent on an API server connection's streams")]
    Method(Method),
}

impl SendError {
    /// Whether the API server could not be reached at all, or refused the request
    /// unprocessed every time it was sent (503 and a retry, rather than 502: nothing
    /// was done, so a client may send any request again).
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Http(e) => unprocessed(e),
            SendError::Method(_) => false,
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
    Handshake(#[source] h2::Error),
    #[error("the API server closed two new connections before the request could be sent")]
    ClosedAtOnce,
}

/// An open connection's handle.
struct Handle {
    send: h2::client::SendRequest<Bytes>,
    /// Set when the connection can take no more requests (its task ended, or it
    /// refused one): the next opening replaces it.
    closed: Arc<AtomicBool>,
}

/// HTTP/2 pings, and how long one may go unanswered before the connection is given up
/// (its streams then fail, rather than wait for good on a dead API server).
#[derive(Debug, Clone, Copy)]
struct KeepAlive {
    interval: Duration,
    timeout: Duration,
}

pub struct H2Connection {
    connector: HttpsConnector<HttpConnector>,
    /// `https://host:port` of the API server.
    base: Uri,
    /// The connection's handle; `None` before the first opening. A closed one is
    /// replaced by the next opening.
    handle: Mutex<Option<Handle>>,
    /// One opening at a time; the requests that wait for it then share its result:
    /// the last opening's failure, if it failed.
    opening: tokio::sync::Mutex<Option<Arc<dyn std::error::Error + Send + Sync>>>,
    /// Openings ended so far (counted once each has its result).
    openings: AtomicU64,
    open_timeout: Duration,
    keep_alive: KeepAlive,
}

/// What became of a request offered to the open connection.
enum Offer {
    /// It is on its way: the response to wait for, and the stream for its body.
    Sent(h2::client::ResponseFuture, h2::SendStream<Bytes>),
    /// The connection refused it for what it is (a head HTTP/2 cannot carry).
    Refused(h2::Error),
    /// No open connection: nothing was sent.
    NoConnection,
}

impl H2Connection {
    /// `connector` must offer only HTTP/2 in ALPN.
    pub fn new(connector: HttpsConnector<HttpConnector>, base: Uri) -> Self {
        H2Connection {
            connector,
            base,
            handle: Mutex::new(None),
            opening: tokio::sync::Mutex::new(None),
            openings: AtomicU64::new(0),
            open_timeout: OPEN_TIMEOUT,
            keep_alive: KeepAlive {
                interval: super::KEEP_ALIVE_INTERVAL,
                timeout: super::KEEP_ALIVE_TIMEOUT,
            },
        }
    }

    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<ResponseBody>, SendError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        if req.method() == Method::CONNECT {
            // Tunnels go over HTTP/1.1 upgrades (`upgrade_client`), never on a lane.
            return Err(SendError::Method(Method::CONNECT));
        }
        let (head, body) = req.into_parts();
        let last = body.is_end_stream();
        let mut head = Request::from_parts(head, ());
        let mut body = Some(body);
        // The body as it went, if it went whole in one piece: what a resend sends.
        let mut whole: Option<Bytes> = None;
        let mut resends = 0;
        loop {
            // Kept while a resend is possible: the head goes into h2 and is not given
            // back.
            let copy = (resends < RESENDS).then(|| copy_head(&head));
            let (response, tx) = self.start(head, last).await?;
            // A body still being sent when the request is abandoned (its response, or
            // the wait for it, dropped) is cut off: its stream reset.
            let mut abandon = None;
            if !last {
                if let Some(body) = body.take() {
                    // Sent from here as far as it can be (a body read whole goes at
                    // once: h2 holds its one chunk until the window opens); the rest
                    // from a task.
                    let mut pipe = Pipe::new(body, tx);
                    if poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx)))
                        .await
                        .is_pending()
                    {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        abandon = Some(tx);
                        tokio::spawn(pipe.cancelled_by(rx));
                    } else {
                        whole = pipe.sent_whole();
                    }
                } else if let Some(data) = &whole {
                    // Sent again (only a body that went whole is): h2 holds it until
                    // the window opens, as the first time.
                    let mut tx = tx;
                    let _ = tx.send_data(data.clone(), true);
                }
            }
            let error = match response.await {
                Ok(resp) => {
                    let length = resp
                        .headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    return Ok(resp.map(|recv| ResponseBody::new(recv, length, abandon)));
                }
                Err(e) => e,
            };
            match copy {
                Some(copy) if unprocessed(&error) && (last || whole.is_some()) => {
                    debug!(error = %error, "the API server refused a request unprocessed: sending it again");
                    head = copy;
                    resends += 1;
                    if resends > 1 {
                        tokio::time::sleep(RESEND_PAUSE).await;
                    }
                }
                _ => return Err(SendError::Http(error)),
            }
        }
    }

    /// Opens the request's stream on the open connection, or on a new one if there is
    /// none or it is closing (nothing of the request was sent then).
    async fn start(
        &self,
        head: Request<()>,
        last: bool,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), SendError> {
        let mut head = Some(head);
        // At most two openings for one request: the first connection may close before
        // the request reaches it (a GOAWAY in flight); a second that does too is the
        // API server's doing, and the error says so.
        let mut opened = 0;
        loop {
            match self.offer(&mut head, last) {
                Offer::Sent(response, tx) => return Ok((response, tx)),
                Offer::Refused(e) => return Err(SendError::Http(e)),
                Offer::NoConnection => {}
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

    /// Offers the request's head to the open connection, without waiting.
    fn offer(&self, head: &mut Option<Request<()>>, last: bool) -> Offer {
        let mut handle = self.handle.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(h) = handle.as_mut() else {
            return Offer::NoConnection;
        };
        if h.closed.load(Ordering::Acquire) {
            return Offer::NoConnection;
        }
        // A handle for this request: a shared one would remember a stream still
        // waiting for the API server's stream limit and make the next request wait on
        // it (with nothing to wake it here). A fresh handle is ready unless the
        // connection is closing, so nothing is registered with the no-op waker; a
        // stream beyond the limit waits in h2's queue until one ends.
        let mut send = h.send.clone();
        let closing = match send.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => match head.take().map(|r| send.send_request(r, last)) {
                Some(Ok((response, tx))) => return Offer::Sent(response, tx),
                // Closing between the two checks (another thread's runtime drove the
                // connection): h2 refuses before anything is sent.
                Some(Err(e)) if e.is_go_away() || e.is_io() => e,
                Some(Err(e)) => return Offer::Refused(e),
                None => unreachable!("the head is taken once, when it is sent"),
            },
            Poll::Ready(Err(e)) => e,
            Poll::Pending => unreachable!("a new handle has no stream waiting to open"),
        };
        debug!(error = %closing, "API server connection takes no more requests");
        h.closed.store(true, Ordering::Release);
        Offer::NoConnection
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
            Ok(Ok(handle)) => {
                *self.handle.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
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
        self.handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|h| !h.closed.load(Ordering::Acquire))
    }

    async fn handshake(&self) -> Result<Handle, OpenError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(OpenError::Connect)?;
        let io = connector
            .call(self.base.clone())
            .await
            .map_err(OpenError::Connect)?;
        // The TLS stream itself (tokio's I/O traits, as h2 reads), not hyper's wrapper.
        let tls = match io {
            hyper_rustls::MaybeHttpsStream::Https(tls) => tls.into_inner(),
            hyper_rustls::MaybeHttpsStream::Http(_) => return Err(OpenError::NotHttp2),
        };
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(OpenError::NotHttp2);
        }
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            // Until the API server's SETTINGS say: its default (hyper's, too).
            .initial_max_send_streams(super::pool::STREAMS_PER_CONNECTION)
            // Request body bytes h2 holds per stream for the window (hyper's).
            .max_send_buffer_size(1 << 20)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(OpenError::Handshake)?;
        let closed = Arc::new(AtomicBool::new(false));
        let pings = conn.ping_pong();
        let (keep_alive, ended) = (self.keep_alive, closed.clone());
        // On this thread's runtime: a lane belongs to one event loop.
        tokio::spawn(async move {
            tokio::select! {
                biased;
                r = &mut conn => match r {
                    Ok(()) => debug!("API server connection closed"),
                    Err(e) => debug!(error = %e, "API server connection ended"),
                },
                why = keep_alive.watch(pings) => {
                    debug!(%why, "API server connection given up: a keep-alive ping went unanswered");
                }
            }
            // Dropped (if not done): its streams fail and the API server sees it close.
            drop(conn);
            ended.store(true, Ordering::Release);
        });
        Ok(Handle { send, closed })
    }
}

/// Whether the API server refused the request without processing it (RFC 9113 §8.7),
/// so it may go again whatever its method: its stream was above the last stream id of
/// a GOAWAY the API server sent (h2 fails only those streams with the GOAWAY's error),
/// or the API server reset it with `REFUSED_STREAM`. A stream at or below that id the
/// API server may have acted on: when its connection then closes, h2 fails it with an
/// I/O error, which is never resent. (One path in h2 0.4 marks every open stream with
/// a remote GOAWAY error: a PUSH_PROMISE on a stream a GOAWAY closed, which an API
/// server never sends to a client that disabled push, as the lanes do.)
fn unprocessed(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// The head of a request, again: the headers' values are shared, not copied.
fn copy_head(r: &Request<()>) -> Request<()> {
    let mut copy = Request::new(());
    *copy.method_mut() = r.method().clone();
    *copy.uri_mut() = r.uri().clone();
    *copy.version_mut() = r.version();
    *copy.headers_mut() = r.headers().clone();
    copy
}

impl KeepAlive {
    /// Pings every `interval`; returns when one is not answered within `timeout`.
    async fn watch(self, pings: Option<h2::PingPong>) -> String {
        let Some(mut pings) = pings else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(self.interval).await;
            match tokio::time::timeout(self.timeout, pings.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return format!("no answer within {:?}", self.timeout),
            }
        }
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
        connection_trusting(base, open_timeout, None)
    }

    fn connection_trusting(
        base: Uri,
        open_timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> H2Connection {
        let tls = crate::tls::client_config(ca, None).expect("client config");
        let connector = super::super::connector(
            tls,
            super::super::Flavor::Lane(super::super::pool::Protocol::Http2),
        );
        H2Connection {
            open_timeout,
            ..H2Connection::new(connector, base)
        }
    }

    /// A TLS listener on loopback offering only HTTP/2, with the CA that signed its
    /// certificate (written to `dir`), and the base URL to reach it.
    async fn tls_listener(
        dir: &std::path::Path,
    ) -> (
        tokio::net::TcpListener,
        tokio_rustls::TlsAcceptor,
        std::path::PathBuf,
        Uri,
    ) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names =
            vec![rcgen::SanType::IpAddress("127.0.0.1".parse().expect("ip"))];
        let cert = params.self_signed(&key).expect("cert");
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, cert.pem()).expect("write ca");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        server.alpn_protocols = vec![b"h2".to_vec()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("https://{}", listener.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        (
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            ca,
            base,
        )
    }

    /// An HTTP/2 server (hyper's) answering every request with `answer`.
    async fn serve<F, Fut>(dir: &std::path::Path, answer: F) -> (Uri, std::path::PathBuf)
    where
        F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<crate::util::ProxyBody>> + Send + 'static,
    {
        serve_streams(dir, None, answer).await
    }

    /// [`serve`], allowing at most `max_streams` concurrent streams per connection.
    async fn serve_streams<F, Fut>(
        dir: &std::path::Path,
        max_streams: Option<u32>,
        answer: F,
    ) -> (Uri, std::path::PathBuf)
    where
        F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<crate::util::ProxyBody>> + Send + 'static,
    {
        let (listener, acceptor, ca, base) = tls_listener(dir).await;
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, answer) = (acceptor.clone(), answer.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let answer = answer.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .max_concurrent_streams(max_streams)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
        (base, ca)
    }

    fn get(base: &Uri) -> Request<crate::util::ProxyBody> {
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

    /// A response larger than the stream's and the connection's windows arrives
    /// whole: the window is given back as the body is read (without that, the API
    /// server could send no more than the first 2 MiB).
    #[tokio::test]
    async fn a_response_larger_than_the_windows_arrives_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        const LEN: usize = 12 << 20;
        let (base, ca) = serve(dir.path(), |_req| async {
            let chunks =
                (0..LEN / (64 << 10)).map(|i| {
                    Ok::<_, crate::util::BoxError>(http_body::Frame::data(Bytes::from(
                        vec![(i % 251) as u8; 64 << 10],
                    )))
                });
            Response::new(http_body_util::BodyExt::boxed(
                http_body_util::StreamBody::new(futures_util::stream::iter(chunks)),
            ))
        })
        .await;
        let conn = connection_trusting(base.clone(), OPEN_TIMEOUT, Some(&ca));
        let body = get_whole(&conn, &base, Duration::from_secs(20)).await;
        assert_eq!(body.len(), LEN);
        for (i, chunk) in body.chunks(64 << 10).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i % 251) as u8), "chunk {i}");
        }
    }

    /// A request body larger than the API server's windows is sent whole, in order,
    /// as the windows open (the part that must wait goes on in a task of its own);
    /// one that fails midway resets its stream, so the server never takes what came
    /// before for a whole body.
    #[tokio::test]
    async fn request_bodies_wait_for_window_and_a_failed_one_is_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, ca, mut results) = reading_server(dir.path()).await;
        let conn = connection_trusting(base.clone(), OPEN_TIMEOUT, Some(&ca));
        const CHUNK: usize = 32 << 10;
        const CHUNKS: usize = 128; // 4 MiB: beyond hyper's server windows (1 MiB).
        let req = Request::post(format!("{base}api"))
            .body(streamed(CHUNKS, CHUNK, false))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(20), conn.send(req))
            .await
            .expect("answered within 20 s")
            .expect("response");
        assert_eq!(resp.status(), http::StatusCode::OK);
        let received = tokio::time::timeout(Duration::from_secs(5), results.recv())
            .await
            .expect("the server read the body")
            .expect("one result")
            .expect("a whole body");
        assert_eq!(received.len(), CHUNK * CHUNKS);
        for (i, chunk) in received.chunks(CHUNK).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8), "chunk {i}");
        }

        // The body fails after two chunks: the server sees its stream reset.
        let chunks: Vec<Result<http_body::Frame<Bytes>, crate::util::BoxError>> = vec![
            Ok(http_body::Frame::data(Bytes::from(vec![1u8; CHUNK]))),
            Ok(http_body::Frame::data(Bytes::from(vec![2u8; CHUNK]))),
            Err("the agent went away".into()),
        ];
        let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(chunks),
        ));
        let req = Request::post(format!("{base}api"))
            .body(body)
            .expect("request");
        // Whether the client gets an answer or the reset depends on timing; it must
        // not hang.
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.send(req))
            .await
            .expect("settled within 10 s");
        let outcome = tokio::time::timeout(Duration::from_secs(5), results.recv())
            .await
            .expect("the server's read ended")
            .expect("one result");
        assert!(outcome.is_err(), "taken as whole: {outcome:?}");
    }

    /// An API server that stops answering (its connection open, nothing read): the
    /// keep-alive ping goes unanswered, the connection is given up and the request
    /// on it fails instead of waiting for good; the next request opens a new one.
    #[tokio::test]
    async fn a_connection_whose_pings_go_unanswered_is_given_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, acceptor, ca, base) = tls_listener(dir.path()).await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let Ok(mut h2) = h2::server::handshake(tls).await else {
                    continue;
                };
                if n == 0 {
                    // Takes the first request, then reads nothing more: no pong.
                    if let Some(Ok(req)) = h2.accept().await {
                        held.push((h2, req));
                    }
                    continue;
                }
                tokio::spawn(async move {
                    while let Some(Ok((_req, mut respond))) = h2.accept().await {
                        let _ = respond.send_response(Response::new(()), true);
                    }
                });
            }
        });
        let conn = H2Connection {
            keep_alive: KeepAlive {
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(300),
            },
            ..connection_trusting(base.clone(), OPEN_TIMEOUT, Some(&ca))
        };
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), conn.send(get(&base)))
            .await
            .expect("failed within 5 s, not held")
            .expect_err("no answer");
        assert!(!e.is_connect(), "sent, then lost: {e}");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        assert!(!conn.is_open(), "given up");
        // The next connection with the usual keep-alive: a slow moment of the test
        // machine must not give it up too.
        let mut conn = conn;
        conn.keep_alive = KeepAlive {
            interval: super::super::KEEP_ALIVE_INTERVAL,
            timeout: super::super::KEEP_ALIVE_TIMEOUT,
        };
        let resp = tokio::time::timeout(Duration::from_secs(5), conn.send(get(&base)))
            .await
            .expect("answered within 5 s")
            .expect("a new connection answers");
        assert_eq!(resp.status(), http::StatusCode::OK);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A GET's whole answer, which must arrive `within`.
    async fn get_whole(conn: &H2Connection, base: &Uri, within: Duration) -> Bytes {
        let read = async {
            let resp = conn.send(get(base)).await.expect("response");
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .expect("body")
                .to_bytes()
        };
        tokio::time::timeout(within, read)
            .await
            .unwrap_or_else(|_| panic!("no whole answer within {within:?}"))
    }

    /// What a server read of each request body: the whole body, or why it could not
    /// (a reset stream); it answers `{}` once the body has ended.
    type BodiesRead = tokio::sync::mpsc::UnboundedReceiver<Result<Bytes, String>>;

    /// A server that reads every request body whole and reports it ([`BodiesRead`]).
    async fn reading_server(dir: &std::path::Path) -> (Uri, std::path::PathBuf, BodiesRead) {
        let (got, results) = tokio::sync::mpsc::unbounded_channel();
        let (base, ca) = serve(dir, move |req| {
            let got = got.clone();
            async move {
                let body = http_body_util::BodyExt::collect(req.into_body()).await;
                let _ = got.send(body.map(|b| b.to_bytes()).map_err(|e| e.to_string()));
                Response::new(crate::util::full(Bytes::from_static(b"{}")))
            }
        })
        .await;
        (base, ca, results)
    }

    /// Agents that stop reading hold up their own streams only: with several large
    /// answers left unread on the lane's connection, another request's answer still
    /// arrives (the connection's window is the streams' together).
    #[tokio::test]
    async fn unread_answers_do_not_stall_the_others_on_the_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, ca) = serve(dir.path(), |req| async move {
            let big = req.uri().path() == "/big";
            let chunks = if big { 64 } else { 32 }; // 4 MiB unread, 2 MiB read
            Response::new(streamed(chunks, 64 << 10, false))
        })
        .await;
        let conn = connection_trusting(base.clone(), OPEN_TIMEOUT, Some(&ca));
        let mut unread = Vec::new();
        for _ in 0..6 {
            let req = Request::get(format!("{base}big"))
                .body(crate::util::empty())
                .expect("request");
            unread.push(conn.send(req).await.expect("answer head"));
        }
        // Their windows filled (6 MiB held, beyond hyper's old 5 MiB connection window).
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Answered whole within 10 s beside the unread answers.
        let body = get_whole(&conn, &base, Duration::from_secs(10)).await;
        assert_eq!(body.len(), 32 * (64 << 10));
        drop(unread);
    }

    /// A body streamed in chunks: `chunks` of `len` bytes, each byte its chunk's index,
    /// then, if `open`, no end (the agent still sending).
    fn streamed(chunks: usize, len: usize, open: bool) -> crate::util::ProxyBody {
        use futures_util::StreamExt;
        let data = futures_util::stream::iter((0..chunks).map(move |i| {
            Ok::<_, crate::util::BoxError>(http_body::Frame::data(Bytes::from(vec![i as u8; len])))
        }));
        let tail = if open {
            futures_util::future::Either::Left(futures_util::stream::pending())
        } else {
            futures_util::future::Either::Right(futures_util::stream::empty())
        };
        http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(data.chain(tail)))
    }

    /// An API server that allows one stream at a time: requests beyond it wait for
    /// their stream and their bodies are all sent (a stream waiting to open is not
    /// polled on the request's behalf with nothing to wake it).
    #[tokio::test]
    async fn requests_beyond_the_stream_limit_wait_and_are_all_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, ca) = serve_streams(dir.path(), Some(1), |req| async move {
            let n = http_body_util::BodyExt::collect(req.into_body())
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            Response::new(crate::util::full(Bytes::from(n.to_string())))
        })
        .await;
        let conn = connection_trusting(base.clone(), OPEN_TIMEOUT, Some(&ca));
        // The API server's settings (one stream) known first.
        conn.send(get(&base)).await.expect("first answer");
        const CHUNKS: usize = 48;
        const LEN: usize = 32 << 10; // 1.5 MiB each: beyond the server's 1 MiB window.
        let sends = (0..4).map(|_| async {
            let req = Request::post(format!("{base}api"))
                .body(streamed(CHUNKS, LEN, false))
                .expect("request");
            let resp = conn.send(req).await.expect("response");
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .expect("body")
                .to_bytes()
        });
        let answers = tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::future::join_all(sends),
        )
        .await
        .expect("all four answered within 20 s");
        for a in answers {
            assert_eq!(a, (CHUNKS * LEN).to_string().as_bytes());
        }
    }

    /// A request abandoned while its body is still being sent (the agent still
    /// sending, nobody waiting for the answer any more): its stream is reset, so the
    /// API server stops waiting for the rest.
    #[tokio::test]
    async fn an_abandoned_request_resets_its_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, ca, mut results) = reading_server(dir.path()).await;
        let conn = connection_trusting(base.clone(), OPEN_TIMEOUT, Some(&ca));
        let req = Request::post(format!("{base}api"))
            .body(streamed(2, 16 << 10, true))
            .expect("request");
        let waited = tokio::time::timeout(Duration::from_millis(500), conn.send(req)).await;
        assert!(waited.is_err(), "no answer while the body is unfinished");
        let outcome = tokio::time::timeout(Duration::from_secs(5), results.recv())
            .await
            .expect("the server's read ended: the stream was reset")
            .expect("one result");
        assert!(outcome.is_err(), "taken as whole: {outcome:?}");
    }

    /// What the raw test server does with a whole request on its stream.
    #[derive(Debug, Clone, Copy)]
    enum Fate {
        /// `200`, no body.
        Answer,
        /// `RST_STREAM` with `REFUSED_STREAM`.
        Refuse,
        /// A GOAWAY whose last stream id is below the request's: dropped unprocessed.
        GoAwayBelow,
        /// A GOAWAY whose last stream id is the request's, then the connection closed
        /// without an answer: the API server may have acted on it.
        GoAwayAtThenClose,
    }

    /// The requests a raw test server received: (connection, stream, body).
    type Received = Arc<Mutex<Vec<(usize, u32, Vec<u8>)>>>;

    /// A TEST-ONLY HTTP/2 server writing its frames by hand, for what h2's own server
    /// does not do on demand: a GOAWAY whose last stream id is below a stream it has
    /// received (the race of an API server going away while a request is on its way).
    /// `fate(connection, request)` (both counted from 0) decides each whole request's
    /// fate; every request is recorded.
    async fn raw_server(
        dir: &std::path::Path,
        fate: fn(usize, usize) -> Fate,
    ) -> (Uri, std::path::PathBuf, Received) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
            let len = u32::try_from(payload.len())
                .expect("small frame")
                .to_be_bytes();
            let mut f = vec![len[1], len[2], len[3], kind, flags];
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            f
        }
        let (listener, acceptor, ca, base) = tls_listener(dir).await;
        let received: Received = Arc::default();
        let record = received.clone();
        tokio::spawn(async move {
            let mut conns = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, record, n) = (acceptor.clone(), record.clone(), conns);
                conns += 1;
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut preface = [0u8; 24];
                    if tls.read_exact(&mut preface).await.is_err() {
                        return;
                    }
                    let _ = tls.write_all(&frame(4, 0, 0, &[])).await;
                    let (mut requests, mut bodies) = (0, std::collections::HashMap::new());
                    loop {
                        let mut head = [0u8; 9];
                        if tls.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let (kind, flags) = (head[3], head[4]);
                        let stream =
                            u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & !(1 << 31);
                        let mut payload = vec![0u8; len];
                        if tls.read_exact(&mut payload).await.is_err() {
                            return;
                        }
                        let ended = match kind {
                            // HEADERS (no padding or priority from h2's client).
                            1 => {
                                bodies.insert(stream, Vec::new());
                                flags & 1 != 0
                            }
                            // DATA
                            0 => {
                                if let Some(b) = bodies.get_mut(&stream) {
                                    b.extend_from_slice(&payload);
                                }
                                flags & 1 != 0
                            }
                            // SETTINGS, PING: acknowledged (a PING with its payload).
                            4 | 6 if flags & 1 == 0 => {
                                let echo = if kind == 6 { &payload[..] } else { &[] };
                                let _ = tls.write_all(&frame(kind, 1, 0, echo)).await;
                                false
                            }
                            _ => false,
                        };
                        if !ended {
                            continue;
                        }
                        let body = bodies.remove(&stream).unwrap_or_default();
                        record.lock().expect("record").push((n, stream, body));
                        let reply = match fate(n, requests) {
                            Fate::Answer => frame(1, 0x5, stream, &[0x88]),
                            Fate::Refuse => frame(3, 0, stream, &7u32.to_be_bytes()),
                            Fate::GoAwayBelow | Fate::GoAwayAtThenClose => {
                                let last = match fate(n, requests) {
                                    Fate::GoAwayBelow => stream.saturating_sub(2),
                                    _ => stream,
                                };
                                let mut p = last.to_be_bytes().to_vec();
                                p.extend_from_slice(&0u32.to_be_bytes());
                                frame(7, 0, 0, &p)
                            }
                        };
                        requests += 1;
                        if tls.write_all(&reply).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                        if let Fate::GoAwayAtThenClose = fate(n, requests - 1) {
                            // Read first: a close with the client's frames unread
                            // would be a TCP reset, which could reach the client
                            // before the GOAWAY does.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            let _ = tls.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        (base, ca, received)
    }

    fn post(base: &Uri) -> Request<crate::util::ProxyBody> {
        Request::post(format!("{base}api"))
            .body(crate::util::full(Bytes::from_static(b"{\"kind\":\"Pod\"}")))
            .expect("request")
    }

    /// A request (`make`) to a raw server whose every request meets `fate`: its error
    /// (within 10 s) and what the server received.
    async fn failing(
        fate: fn(usize, usize) -> Fate,
        make: fn(&Uri) -> Request<crate::util::ProxyBody>,
    ) -> (SendError, Received) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, ca, received) = raw_server(dir.path(), fate).await;
        let conn = connection_trusting(base.clone(), OPEN_TIMEOUT, Some(&ca));
        let e = tokio::time::timeout(Duration::from_secs(10), conn.send(make(&base)))
            .await
            .expect("failed within 10 s")
            .expect_err("no answer");
        (e, received)
    }

    /// Requests the API server drops unprocessed go again, whatever their method, as
    /// Go's client sends them again to an API server it talks to directly: one above
    /// a GOAWAY's last stream id (on a new connection, the GOAWAY's closes) and one
    /// reset with `REFUSED_STREAM` (on the same connection), a POST's body whole each
    /// time. A request at or below that id, whose connection then closes unanswered,
    /// the API server may have acted on: it fails and is not sent again.
    #[tokio::test]
    async fn requests_refused_unprocessed_are_sent_again_and_no_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Refused twice, then answered: the GOAWAY's on the first connection, a
        // REFUSED_STREAM on the second.
        let (base, ca, received) = raw_server(dir.path(), |conn, req| match (conn, req) {
            (0, _) => Fate::GoAwayBelow,
            (1, 0) => Fate::Refuse,
            _ => Fate::Answer,
        })
        .await;
        let conn = connection_trusting(base.clone(), OPEN_TIMEOUT, Some(&ca));
        let resp = tokio::time::timeout(Duration::from_secs(10), conn.send(post(&base)))
            .await
            .expect("answered within 10 s")
            .expect("sent again until answered");
        assert_eq!(resp.status(), 200);
        let got = received.lock().expect("received").clone();
        let expected_body = b"{\"kind\":\"Pod\"}".to_vec();
        assert_eq!(
            got,
            vec![
                (0, 1, expected_body.clone()),
                (1, 1, expected_body.clone()),
                (1, 3, expected_body),
            ],
            "the POST went three times, its body whole each time"
        );
        // Refused every time: sent again twice (the second after a pause), then the
        // refusal is the answer.
        let t = std::time::Instant::now();
        let (e, received) = failing(|_, _| Fate::Refuse, get).await;
        assert!(
            t.elapsed() >= RESEND_PAUSE,
            "no pause before the second resend"
        );
        assert!(matches!(&e, SendError::Http(h) if unprocessed(h)), "{e:?}");
        assert!(e.is_connect(), "refused unprocessed: a 503, not a 502");
        assert_eq!(received.lock().expect("received").len(), 1 + RESENDS);
        // Possibly processed: not sent again.
        let (e, received) = failing(|_, _| Fate::GoAwayAtThenClose, post).await;
        assert!(
            matches!(&e, SendError::Http(h) if h.is_io()) && !e.is_connect(),
            "the connection's close, a 502: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            received.lock().expect("received").len(),
            1,
            "a request the API server may have acted on went again"
        );
    }
}
