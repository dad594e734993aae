//! The last stages: the authorized request to the API server as the subject's scoped
//! identity (its record durable first when it changes something), and the answer back
//! to the agent, masked as it streams; or, for an upgrade, the two connections joined
//! into a byte pipe once both sides agreed to switch.
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header, request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{Instrument, debug, info_span, warn};

use super::{Admitted, Authorized, Conn, Gate, Refusal, exchange::Exchange, relay::Relay};
use crate::{
    mask::{self, ForResponse, Plan},
    upstream,
    util::{self, BoxError, ProxyBody},
};

/// Largest mutation body read before it is decided and forwarded (the API server's
/// own limit is 3 MiB).
const MAX_REQUEST_BODY: usize = 3 << 20;

/// A request's body on its way upstream.
pub(super) enum Outgoing {
    /// A mutation's, read whole.
    Whole(Bytes),
    /// Anything else's, streamed.
    Stream(Incoming),
}

/// Reads a mutation's body whole, up to the API server's own limit.
pub(super) async fn read_body(body: Incoming) -> Result<Bytes, Refusal> {
    Ok(http_body_util::Limited::new(body, MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|e| Refusal::BodyUnreadable {
            too_large: e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some(),
            why: e.to_string(),
        })?
        .to_bytes())
}

impl Gate {
    pub(super) async fn forward(
        &self,
        mut parts: request::Parts,
        body: Outgoing,
        conn: &Arc<Conn>,
        ex: &mut Exchange,
        admitted: &Admitted,
        authorized: &Authorized,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let body = match body {
            Outgoing::Whole(bytes) => {
                if ex.wants_body() {
                    // The agent's body as it sent it, masked.
                    ex.record_body(&bytes, admitted.plan.as_ref());
                }
                // The same request made conditional on the checked object, if so.
                let send = authorized.body.clone().unwrap_or(bytes);
                if parts.headers.contains_key(header::CONTENT_LENGTH) || !send.is_empty() {
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(send.len()));
                }
                if authorized.body.is_some() && !parts.headers.contains_key(header::CONTENT_TYPE) {
                    // A DELETE without a body gets DeleteOptions.
                    parts.headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
                util::full(send)
            }
            Outgoing::Stream(incoming) => incoming.map_err(BoxError::from).boxed(),
        };
        ex.record_request().await?;
        self.upstream
            .rewrite(&mut parts, false, &authorized.impersonate)
            .map_err(Refusal::Credential)?;
        if admitted.plan.is_some() {
            // Ask for what can be masked: JSON, uncompressed.
            if let Some(a) = parts.headers.get(header::ACCEPT) {
                let json = mask::json_accept(a);
                parts.headers.insert(header::ACCEPT, json);
            }
            parts.headers.remove(header::ACCEPT_ENCODING);
        }
        let head = parts.method == http::Method::HEAD;
        let resp = self
            .upstream
            .send(Request::from_parts(parts, body), false)
            .await
            .map_err(|e| self.upstream_error(e))?;
        self.relay(resp, admitted.plan.as_ref(), ex, conn, head)
    }

    /// The API server's answer on its way to the agent: masked, and its outcome
    /// recorded when it ends.
    fn relay(
        &self,
        resp: Response<Incoming>,
        plan: Option<&Arc<Plan>>,
        ex: &Exchange,
        conn: &Arc<Conn>,
        head: bool,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let code = resp.status();
        let treatment = self.masking.for_response(plan, code, resp.headers(), head);
        let (mut p, body) = resp.into_parts();
        upstream::strip_hop_by_hop(&mut p.headers);
        let masker = match treatment {
            ForResponse::Pass => None,
            ForResponse::Mask(m) => {
                p.headers.remove(header::CONTENT_LENGTH);
                Some(m)
            }
            ForResponse::Refuse(why) => return Err(Refusal::Unmaskable(why)),
        };
        let abandoned = conn.clone();
        let outcome = ex
            .outcome(code.as_u16())
            .on_abandon(move || abandoned.note_cancel());
        Ok(Response::from_parts(
            p,
            Relay::new(body, masker, Some(outcome)).boxed(),
        ))
    }

    pub(super) async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        conn: &Arc<Conn>,
        ex: &mut Exchange,
        admitted: &Admitted,
        authorized: &Authorized,
    ) -> Result<Response<ProxyBody>, Refusal> {
        // The session's start: durable before the session exists.
        ex.record_request().await?;
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, _body) = req.into_parts();
        self.upstream
            .rewrite(&mut parts, true, &authorized.impersonate)
            .map_err(Refusal::Credential)?;
        // Upgrade requests carry no body (SPDY's POST included).
        let mut resp = self
            .upstream
            .send(Request::from_parts(parts, util::empty()), true)
            .await
            .map_err(|e| self.upstream_error(e))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The API server refused (e.g. no such pod): relay its (masked) answer.
            return self.relay(resp, admitted.plan.as_ref(), ex, conn, false);
        }
        let upstream = hyper::upgrade::on(&mut resp);
        let session = ex.outcome(StatusCode::SWITCHING_PROTOCOLS.as_u16());
        tokio::spawn(
            async move {
                let (d, u) = match tokio::try_join!(downstream, upstream) {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "upgrade did not complete");
                        session.session_failed(format!("upgrade did not complete: {e}"));
                        return;
                    }
                };
                let mut d = TokioIo::new(d);
                let mut u = TokioIo::new(u);
                let (bytes, error) = match tokio::io::copy_bidirectional(&mut d, &mut u).await {
                    Ok((to_up, to_agent)) => {
                        debug!(to_up, to_agent, "upgraded stream closed");
                        ((to_up, to_agent), None)
                    }
                    Err(e) => {
                        debug!(error = %e, "upgraded stream ended with an error");
                        ((0, 0), Some(e.to_string()))
                    }
                };
                // The session's end.
                session.end_session(bytes, error);
            }
            .instrument(info_span!("upgrade", conn = conn.id)),
        );
        let (mut p, _) = resp.into_parts();
        // Keep the switch headers; drop other hop-by-hop ones.
        let upgrade_to = p.headers.get(header::UPGRADE).cloned();
        upstream::strip_hop_by_hop(&mut p.headers);
        p.headers
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Some(u) = upgrade_to {
            p.headers.insert(header::UPGRADE, u);
        }
        Ok(Response::from_parts(p, util::empty()))
    }

    fn upstream_error(&self, error: hyper_util::client::legacy::Error) -> Refusal {
        let base = self.upstream.base().to_string();
        let connect = error.is_connect();
        let error = Box::new(error);
        if connect {
            Refusal::UpstreamUnreachable { base, error }
        } else {
            Refusal::UpstreamFailed { base, error }
        }
    }
}
