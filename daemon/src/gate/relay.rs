//! The API server's body on its way to the agent, masked chunk by chunk, with its
//! outcome recorded when it ends (delivered whole, abandoned by the agent, or failed).
//! Nothing uninspected passes: a masking error ends the stream with an error instead
//! of forwarding the bytes, and trailers are dropped.
use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::exchange::Outcome;
use crate::{
    mask::BodyMasker,
    util::{BoxError, ProxyBody},
};

/// How long the head of an answer sent whole waits for its body's first chunk.
pub const READ_AHEAD: std::time::Duration = std::time::Duration::from_millis(5);

/// Holds `resp`'s head until its body's first chunk (or its end, or an error) is
/// there, at most `bound`, so the head and that chunk leave in one write.
///
/// The API server (Go's HTTP/2 server) writes a response's HEADERS and its DATA as
/// separate frames that arrive in separate reads; passed on as they come, each small
/// answer cost the agent's connection two writes and the agent two wake-ups. Only for
/// answers the API server sends whole (see `forward`): the head of a stream (a watch,
/// `logs -f`) must not wait for its first event.
pub async fn read_ahead(
    resp: http::Response<ProxyBody>,
    bound: std::time::Duration,
) -> http::Response<ProxyBody> {
    use http_body_util::BodyExt;
    let (head, mut body) = resp.into_parts();
    // `frame()` only polls: given up on, it has taken nothing from the body.
    let first = match tokio::time::timeout(bound, body.frame()).await {
        Ok(first) => first,
        Err(_) => return http::Response::from_parts(head, body),
    };
    let ahead = ReadAhead { first, rest: body };
    http::Response::from_parts(head, ahead.boxed())
}

/// A body whose first frame was read ahead.
struct ReadAhead {
    first: Option<Result<Frame<Bytes>, BoxError>>,
    rest: ProxyBody,
}

impl Body for ReadAhead {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.first.take() {
            Some(f) => Poll::Ready(Some(f)),
            None => Pin::new(&mut this.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = match &self.first {
            Some(Ok(f)) => f.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let rest = self.rest.size_hint();
        let mut h = SizeHint::new();
        h.set_lower(rest.lower() + ahead);
        if let Some(u) = rest.upper() {
            h.set_upper(u + ahead);
        }
        h
    }
}

pub struct Relay<B> {
    inner: B,
    masker: Option<BodyMasker>,
    outcome: Option<Outcome>,
    ended: bool,
}

impl<B> Relay<B> {
    pub fn new(inner: B, masker: Option<BodyMasker>, outcome: Option<Outcome>) -> Self {
        Relay {
            inner,
            masker,
            outcome,
            ended: false,
        }
    }

    fn sent(&mut self, b: &[u8]) {
        if let Some(o) = &mut self.outcome {
            o.sent(b);
        }
    }

    /// The masker's last bytes (it held back an incomplete token); a masking error
    /// ends the stream with it.
    fn finish_masking(&mut self) -> Result<Vec<u8>, BoxError> {
        match self.masker.take().map(BodyMasker::finish) {
            None => Ok(Vec::new()),
            Some(Ok(rest)) => Ok(rest),
            Some(Err(e)) => Err(self.masking_failed(e)),
        }
    }

    /// Ends the stream on a masking error: nothing uninspected passes.
    fn masking_failed(&mut self, e: impl std::fmt::Display) -> BoxError {
        tracing::warn!(error = %e, "response cannot be masked: stream cut");
        let msg = format!("masking stopped the response: {e}");
        self.finish(false, Some(msg.clone()));
        msg.into()
    }

    fn finish(&mut self, complete: bool, error: Option<String>) {
        self.ended = true;
        if let Some(o) = self.outcome.take() {
            o.end(complete, error);
        }
    }
}

impl<B> Drop for Relay<B> {
    fn drop(&mut self) {
        if !self.ended {
            self.finish(false, None);
        }
    }
}

impl<B> Body for Relay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers (header fields after a chunked body) are the API server's
                    // free text, never needed by Kubernetes clients: dropped.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    // The API server's last chunk (its end came with it): the masker's
                    // tail goes with it and the body ends here, so the agent gets the end
                    // of the stream on this chunk's frame. Otherwise hyper sends it as an
                    // empty frame of its own: a second write and a second wake-up of the
                    // agent for every small response.
                    let last = this.inner.is_end_stream();
                    let out = match &mut this.masker {
                        None => data,
                        Some(m) => {
                            let mut o = match m.feed(&data) {
                                Ok(o) => o,
                                Err(e) => return Poll::Ready(Some(Err(this.masking_failed(e)))),
                            };
                            if last {
                                match this.finish_masking() {
                                    Ok(rest) => o.extend_from_slice(&rest),
                                    Err(e) => return Poll::Ready(Some(Err(e))),
                                }
                            }
                            Bytes::from(o)
                        }
                    };
                    if out.is_empty() {
                        if last {
                            this.finish(true, None);
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    this.sent(&out);
                    if last {
                        this.finish(true, None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    this.finish(false, Some(format!("upstream body: {e}")));
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let rest = match this.finish_masking() {
                        Ok(r) => r,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    };
                    if rest.is_empty() {
                        this.finish(true, None);
                        return Poll::Ready(None);
                    }
                    // The last bytes; the next poll returns the end.
                    this.sent(&rest);
                    this.finish(true, None);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        // Masking changes the length; unmasked bodies keep the server's.
        if self.masker.is_none() && !self.ended {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mask::{Detectors, JsonMasker, Plan};
    use http_body_util::{BodyExt, StreamBody};

    fn plan() -> Arc<Plan> {
        Arc::new(Plan::new(
            Plan::secret_paths(),
            Some(Arc::new(Detectors::new())),
            None,
        ))
    }

    #[tokio::test]
    async fn chunks_are_masked_as_they_pass() {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = [
            "{\"type\":\"ADDED\",\"object\":{\"data\":{\"k\":\"Q0FO",
            "QVJZ\"}}}\n",
            "{\"type\":\"DELETED\",\"object\":{\"data\":{\"k\":\"Q0FOQVJZ\"}}}\n",
        ]
        .into_iter()
        .map(|c| Ok(Frame::data(Bytes::from(c))))
        .collect();
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let relay = Relay::new(body, Some(BodyMasker::Json(JsonMasker::new(plan()))), None);
        let out = relay.collect().await.unwrap().to_bytes();
        let s = String::from_utf8(out.to_vec()).unwrap();
        assert!(!s.contains("Q0FOQVJZ") && s.lines().count() == 2, "{s}");
    }

    #[tokio::test]
    async fn a_body_that_fails_masking_ends_in_an_error() {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = vec![Ok(Frame::data(
            Bytes::from_static(b"{\"data\":{\"k\":\"Q0FOQVJZ\"}}}"),
        ))];
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let relay = Relay::new(body, Some(BodyMasker::Json(JsonMasker::new(plan()))), None);
        assert!(relay.collect().await.is_err());
    }

    /// The API server's whole small answer in one chunk, its end with it: the relay
    /// ends on that chunk (so hyper puts END_STREAM on its frame, not on an empty frame
    /// written and read apart), masked, the masker's held-back tail included.
    #[tokio::test]
    async fn a_last_chunk_carries_the_end_of_the_body() {
        let json = "{\"kind\":\"Secret\",\"data\":{\"k\":\"Q0FOQVJZ\"}}\n  ";
        for masker in [
            None,
            Some(BodyMasker::Json(JsonMasker::new(plan()))),
            Some(BodyMasker::Text(crate::mask::TextMasker::new(Arc::new(
                Detectors::new(),
            )))),
        ] {
            let masked = masker.is_some();
            let json_masker = matches!(masker, Some(BodyMasker::Json(_)));
            let body = http_body_util::Full::new(Bytes::from_static(json.as_bytes()));
            let mut relay = Relay::new(body, masker, None);
            assert!(!relay.is_end_stream(), "nothing read yet");
            let frame = relay
                .frame()
                .await
                .expect("a frame")
                .expect("no error")
                .into_data()
                .expect("data");
            assert!(
                relay.is_end_stream(),
                "the body ends with its last chunk (masked: {masked})"
            );
            let text = String::from_utf8(frame.to_vec()).expect("utf-8");
            if masked {
                // The text masker holds the unfinished last line back until the end.
                assert!(
                    text.ends_with("}\n  "),
                    "the held-back tail came along: {text:?}"
                );
                assert!(!json_masker || !text.contains("Q0FOQVJZ"), "{text}");
            } else {
                assert_eq!(text, json);
            }
            assert!(relay.frame().await.is_none(), "nothing after the end");
        }
    }

    fn delayed(chunks: Vec<(u64, &'static str)>) -> ProxyBody {
        let s = futures_util::StreamExt::then(
            futures_util::stream::iter(chunks),
            |(ms, c)| async move {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes())))
            },
        );
        StreamBody::new(s).boxed()
    }

    /// The head of an answer sent whole waits for its first chunk, which then leaves
    /// with it; a stream's first chunk is not waited for past the bound, and nothing of
    /// either body is lost or reordered.
    #[tokio::test(start_paused = true)]
    async fn a_head_waits_for_its_first_chunk_within_the_bound() {
        let bound = std::time::Duration::from_millis(5);

        let resp = http::Response::new(delayed(vec![(1, "{\"a\":"), (0, "1}")]));
        let t0 = tokio::time::Instant::now();
        let resp = read_ahead(resp, bound).await;
        let waited = t0.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(1),
            "waited for the chunk: {waited:?}"
        );
        assert!(waited < bound, "not for the bound: {waited:?}");
        let mut body = resp.into_body();
        assert_eq!(body.size_hint().lower(), 5, "the chunk read ahead counts");
        let first = body
            .frame()
            .await
            .expect("frame")
            .expect("ok")
            .into_data()
            .expect("data");
        assert_eq!(&first[..], b"{\"a\":");
        let rest = body.collect().await.expect("rest").to_bytes();
        assert_eq!(&rest[..], b"1}");

        // A watch-like body: its first event is an hour away.
        let resp = http::Response::new(delayed(vec![(3_600_000, "{\"type\":\"ADDED\"}")]));
        let t0 = tokio::time::Instant::now();
        let resp = read_ahead(resp, bound).await;
        assert_eq!(t0.elapsed(), bound, "the head goes at the bound");
        let all = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&all[..], b"{\"type\":\"ADDED\"}", "the event still comes");

        // An empty answer (its end is its first frame): the head goes with the end.
        let resp = read_ahead(http::Response::new(crate::util::empty()), bound).await;
        assert!(resp.body().is_end_stream());
    }
}
