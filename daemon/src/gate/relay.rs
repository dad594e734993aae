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
use crate::{mask::BodyMasker, util::BoxError};

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
                    let out = match &mut this.masker {
                        None => data,
                        Some(m) => match m.feed(&data) {
                            Ok(o) => Bytes::from(o),
                            Err(e) => {
                                let msg = format!("masking stopped the response: {e}");
                                tracing::warn!(error = %e, "response cannot be masked: stream cut");
                                this.finish(false, Some(msg.clone()));
                                return Poll::Ready(Some(Err(msg.into())));
                            }
                        },
                    };
                    if out.is_empty() {
                        continue;
                    }
                    this.sent(&out);
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    this.finish(false, Some(format!("upstream body: {e}")));
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let rest = match this.masker.take().map(BodyMasker::finish) {
                        None => Vec::new(),
                        Some(Ok(r)) => r,
                        Some(Err(e)) => {
                            let msg = format!("masking stopped the response: {e}");
                            this.finish(false, Some(msg.clone()));
                            return Poll::Ready(Some(Err(msg.into())));
                        }
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
}
