//! The last stages: the authorized request to the API server as the subject's scoped
//! identity (its record durable first when it changes something), and the answer back
//! to the agent, masked as it streams; or, for an upgrade, the two connections joined
//! into a byte pipe once both sides agreed to switch.
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{Instrument, debug, info_span, warn};

use super::{Admitted, Authorized, Conn, Gate, Refusal, exchange::Exchange, relay::Relay};
use crate::{
    mask::{self, ForResponse, Plan},
    upstream::{self, UpstreamBody},
    util::{self, BoxError, ProxyBody},
};

/// Largest request body buffered to record it before a mutation is forwarded (the API
/// server's own limit is 3 MiB).
const MAX_RECORDED_REQUEST: usize = 3 << 20;

impl Gate {
    pub(super) async fn forward(
        &self,
        req: Request<Incoming>,
        conn: &Arc<Conn>,
        ex: &mut Exchange,
        admitted: &Admitted,
        authorized: &Authorized,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let (mut parts, body) = req.into_parts();
        let body = self.recorded_body(body, ex, admitted).await?;
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

    /// The body to forward; if the audit level keeps request bodies, read whole (up
    /// to the API server's own limit) and kept in the record, masked.
    async fn recorded_body(
        &self,
        body: Incoming,
        ex: &mut Exchange,
        admitted: &Admitted,
    ) -> Result<ProxyBody, Refusal> {
        if !ex.wants_body() {
            return Ok(body.map_err(BoxError::from).boxed());
        }
        let bytes = http_body_util::Limited::new(body, MAX_RECORDED_REQUEST)
            .collect()
            .await
            .map_err(|e| Refusal::BodyUnreadable {
                too_large: e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some(),
                why: e.to_string(),
            })?
            .to_bytes();
        ex.record_body(&bytes, admitted.plan.as_ref());
        Ok(util::full(bytes))
    }

    /// The API server's answer on its way to the agent: masked, and its outcome
    /// recorded when it ends.
    fn relay(
        &self,
        resp: Response<UpstreamBody>,
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
