//! The response stage: the API server's body on its way to the agent, masked chunk by
//! chunk, with its outcome written to the audit log when it ends (delivered whole,
//! abandoned by the agent, or failed). Nothing uninspected passes: a masking error
//! ends the stream with an error instead of forwarding the bytes.
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::{
    audit_log::{AuditLog, ResponseRecord, body_value},
    mask::BodyMasker,
    util::BoxError,
};

/// Writes the `response` record once, when the body ends or is dropped.
pub struct Outcome {
    pub audit: Arc<AuditLog>,
    pub id: String,
    pub code: u16,
    pub started: Instant,
    /// Keeps up to this many bytes of what the agent received (RequestResponse level).
    pub capture: Option<usize>,
    /// Called when the agent abandons the body before its end.
    pub on_abandon: Option<Box<dyn FnOnce() + Send + Sync>>,
}

pub struct Relay<B> {
    inner: B,
    masker: Option<BodyMasker>,
    outcome: Option<Outcome>,
    captured: Vec<u8>,
    bytes: u64,
    ended: bool,
}

impl<B> Relay<B> {
    pub fn new(inner: B, masker: Option<BodyMasker>, outcome: Option<Outcome>) -> Self {
        Relay {
            inner,
            masker,
            outcome,
            captured: Vec::new(),
            bytes: 0,
            ended: false,
        }
    }

    fn sent(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        if let Some(max) = self.outcome.as_ref().and_then(|o| o.capture)
            && self.captured.len() <= max
        {
            let room = (max + 1).saturating_sub(self.captured.len());
            self.captured.extend_from_slice(&b[..b.len().min(room)]);
        }
    }

    fn finish(&mut self, complete: bool, error: Option<String>) {
        self.ended = true;
        let Some(mut o) = self.outcome.take() else {
            return;
        };
        if !complete
            && error.is_none()
            && let Some(f) = o.on_abandon.take()
        {
            f();
        }
        let response_body = o.capture.map(|max| body_value(&self.captured, max));
        o.audit.record(
            crate::audit::Kind::Response,
            &ResponseRecord {
                id: o.id,
                code: o.code,
                latency_ms: o.started.elapsed().as_secs_f64() * 1000.0,
                bytes: self.bytes,
                complete,
                error,
                response_body,
                session_bytes: None,
            },
        );
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
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
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
