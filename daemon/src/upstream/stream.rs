//! One HTTP/2 stream on a lane's own connection (`connection`): the request body piped
//! into it as the API server's flow control lets it through, and the response body
//! read from it, its flow-control credit given back as each chunk is taken. The
//! window refills only as fast as the agent reads, so an agent that stops reading
//! holds up its own stream only (the connection's window is all the streams' together,
//! `connection::CONNECTION_WINDOW`) and the daemon holds no more than one stream window
//! for it.
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tracing::debug;

use crate::util::BoxError;

/// A response body, read from its HTTP/2 stream.
#[derive(Debug)]
pub struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
    /// What the Content-Length header says is still to come, if it said.
    remaining: Option<u64>,
    /// The request body's task, if it was still sending: dropped with the response,
    /// it resets the stream ([`Pipe::cancelled_by`]).
    _abandon: Option<oneshot::Sender<()>>,
}

impl ResponseBody {
    pub(super) fn new(
        recv: RecvStream,
        content_length: Option<u64>,
        abandon: Option<oneshot::Sender<()>>,
    ) -> Self {
        ResponseBody {
            recv,
            data_done: false,
            remaining: content_length,
            _abandon: abandon,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Cannot fail: no more is released than was received.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut this.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // A reset with NO_ERROR after the response: the server needs no more
                // of the request (RFC 9113 8.1); the response is whole.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(t) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A request body on its way into its stream: a chunk is sent once the stream has
/// window for it (h2 would buffer without bound otherwise), and nothing more is read
/// from the body meanwhile; the last chunk (a body read whole is one) is handed to h2
/// at once, which holds it until the window opens: it is in memory already. Ends when
/// the body has been sent, or when the stream is reset (the API server answered
/// without needing the rest, or gave up); a body that fails resets the stream, so the
/// API server never takes a cut-off body for a whole one, and so does a request
/// abandoned while its body is still being sent ([`Pipe::cancelled_by`]).
pub(super) struct Pipe<B> {
    body: B,
    tx: SendStream<Bytes>,
    /// A chunk read from the body, waiting for window; whether it is the last.
    held: Option<(Bytes, bool)>,
    /// Ends when the request is abandoned (its sender dropped).
    abandoned: Option<oneshot::Receiver<()>>,
    /// Some data of the body went into the stream.
    sent: bool,
    /// The body, when it went in one piece: all of it was one chunk, handed to h2 with
    /// the end of the stream (a copy shares the bytes).
    whole: Option<Bytes>,
}

impl<B> Pipe<B> {
    pub(super) fn new(body: B, tx: SendStream<Bytes>) -> Self {
        Pipe {
            body,
            tx,
            held: None,
            abandoned: None,
            sent: false,
            whole: None,
        }
    }

    /// The body, if the pipe has handed all of it to h2 in one piece: what sending the
    /// request again sends.
    pub(super) fn sent_whole(self) -> Option<Bytes> {
        self.whole
    }

    /// The same pipe, resetting its stream when `abandoned`'s sender is dropped (the
    /// request's response, or the wait for it, dropped). Without it the pipe would
    /// keep the stream open — waiting for an agent's body or for window — after nobody
    /// wants the answer.
    pub(super) fn cancelled_by(self, abandoned: oneshot::Receiver<()>) -> Self {
        Pipe {
            abandoned: Some(abandoned),
            ..self
        }
    }
}

impl<B> Future for Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(a) = &mut this.abandoned
            && Pin::new(a).poll(cx).is_ready()
        {
            debug!("request abandoned while its body was being sent: the stream is reset");
            this.tx.send_reset(Reason::CANCEL);
            return Poll::Ready(());
        }
        loop {
            // Registered whatever else waits: a reset wakes this task.
            if let Poll::Ready(r) = this.tx.poll_reset(cx) {
                debug!(reason = ?r, "the API server reset a request stream before its body was sent");
                return Poll::Ready(());
            }
            if let Some((data, last)) = this.held.take() {
                while this.tx.capacity() == 0 {
                    match this.tx.poll_capacity(cx) {
                        Poll::Pending => {
                            this.held = Some((data, last));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => {
                            debug!(error = %e, "request stream closed while its body waited");
                            return Poll::Ready(());
                        }
                        Poll::Ready(None) => return Poll::Ready(()),
                    }
                }
                this.sent = true;
                if let Err(e) = this.tx.send_data(data, last) {
                    debug!(error = %e, "request body chunk not sent");
                    return Poll::Ready(());
                }
                if last {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let last = this.body.is_end_stream();
                        if data.is_empty() || last {
                            if last && !this.sent {
                                this.whole = Some(data.clone());
                            }
                            this.sent |= !data.is_empty();
                            if this.tx.send_data(data, last).is_err() || last {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        // One byte asked for, not the chunk: claiming a chunk's worth
                        // of the connection's window while waiting would hold it from
                        // other streams (h2 asks for the rest as it sends).
                        this.tx.reserve_capacity(1);
                        this.held = Some((data, last));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.tx.reserve_capacity(0);
                            let _ = this.tx.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    debug!(error = %e, "request body failed: the stream is reset");
                    this.tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    if !this.sent {
                        this.whole = Some(Bytes::new());
                    }
                    let _ = this.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}
