//! The last stages: the authorized request to the API server as the subject's scoped
//! identity (its record durable first when it changes something; a write carrying a
//! masking placeholder refused), and the answer back to the agent, masked as it
//! streams. Upgrades that switch are `upgrade.rs`.
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header, request};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{
    Admitted, Authorized, Conn, Gate, Refusal,
    exchange::Exchange,
    relay::{self, Relay},
};
use crate::{
    k8s::{Attributes, RequestInfo},
    mask::{self, ForResponse, Plan},
    upstream::{self, UpstreamBody},
    util::{self, BoxError, ProxyBody},
};

/// Largest request body read whole (to decide, check and record it) before it is
/// forwarded: the API server's own limit, 3 MiB.
const MAX_REQUEST_BODY: usize = 3 << 20;

/// A request's body on its way upstream.
pub(super) enum Outgoing {
    /// A mutation's (or any body the audit keeps), read whole.
    Whole(Bytes),
    /// Anything else's, streamed.
    Stream(Incoming),
}

/// Reads a body whole, up to the API server's own limit. An encoded one (gzip...) is
/// refused: what is decided, checked for placeholders and recorded must be what the
/// API server stores.
pub(super) async fn read_body(headers: &http::HeaderMap, body: Incoming) -> Result<Bytes, Refusal> {
    if let Some(enc) = headers.get(header::CONTENT_ENCODING)
        && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(Refusal::EncodedRequestBody(
            String::from_utf8_lossy(enc.as_bytes()).into_owned(),
        ));
    }
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

/// Whether the API server sends this request's answer whole, right after its head: a
/// read that is not long-running (a get or list of a resource, a non-resource GET:
/// discovery, OpenAPI, version). Such an answer's head waits for its first chunk
/// ([`relay::read_ahead`]); a stream's head never does.
fn sent_whole(info: &RequestInfo) -> bool {
    matches!(info.verb.as_str(), "get" | "list") && !info.is_long_running()
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
                if matches!(
                    parts.method,
                    http::Method::POST | http::Method::PUT | http::Method::PATCH
                ) {
                    // A write carrying a masking placeholder where a value would be
                    // stored is refused (whatever its encoding: the placeholder text is
                    // found in JSON, YAML, CBOR and protobuf alike, also base64-encoded),
                    // so masking never overwrites a real value.
                    let ctype = parts
                        .headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if let Some(field) = mask::find_placeholder(&bytes, ctype) {
                        return Err(Refusal::PlaceholderWriteBack {
                            attrs: Box::new(Attributes::from(&admitted.info)),
                            field,
                        });
                    }
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
        let resp = self.relay(resp, admitted.plan.as_ref(), ex, conn, head)?;
        if sent_whole(&admitted.info) {
            Ok(relay::read_ahead(resp, relay::READ_AHEAD).await)
        } else {
            Ok(resp)
        }
    }

    /// The API server's answer on its way to the agent: masked, and its outcome
    /// recorded when it ends.
    pub(super) fn relay(
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
        let abandoned = conn.clone();
        let outcome = ex
            .outcome(code.as_u16())
            .on_abandon(move || abandoned.note_cancel());
        let body = match treatment {
            ForResponse::Pass => {
                Relay::new(body.map_err(BoxError::from).boxed(), None, Some(outcome))
            }
            ForResponse::NoBody => Relay::new(util::empty(), None, Some(outcome)),
            ForResponse::Mask(m) => {
                p.headers.remove(header::CONTENT_LENGTH);
                self.masking.mask_headers(&mut p.headers);
                Relay::new(body.map_err(BoxError::from).boxed(), Some(m), Some(outcome))
            }
            ForResponse::Refuse(why) => {
                drop(outcome);
                return Err(Refusal::Unmaskable(why));
            }
        };
        Ok(Response::from_parts(p, body.boxed()))
    }

    pub(super) fn upstream_error(&self, error: crate::upstream::SendError) -> Refusal {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(method: &str, path: &str, query: Option<&str>) -> bool {
        sent_whole(&crate::k8s::resolve(method, path, query).expect("resolves"))
    }

    #[test]
    fn only_answers_sent_whole_wait_for_their_first_chunk() {
        // Sent whole: reads of objects and lists, discovery.
        assert!(whole("GET", "/api/v1/namespaces/a/configmaps/x", None));
        assert!(whole(
            "GET",
            "/api/v1/namespaces/a/secrets",
            Some("limit=500")
        ));
        assert!(whole(
            "GET",
            "/apis/apps/v1/namespaces/a/deployments/d/scale",
            None
        ));
        assert!(whole("GET", "/api", None));
        assert!(whole("GET", "/openapi/v3", None));
        // Streams: their head goes at once.
        for (path, query) in [
            ("/api/v1/namespaces/a/configmaps", Some("watch=true")),
            (
                "/api/v1/namespaces/a/configmaps",
                Some("watch=1&resourceVersion=5"),
            ),
            ("/api/v1/watch/namespaces/a/configmaps", None),
            ("/api/v1/namespaces/a/pods/p/log", Some("follow=true")),
            ("/api/v1/namespaces/a/pods/p/log", None),
            ("/api/v1/namespaces/a/services/s/proxy/metrics", None),
            ("/api/v1/namespaces/a/pods/p/proxy/x", None),
            ("/api/v1/proxy/namespaces/a/pods/p", None),
            ("/api/v1/namespaces/a/pods/p/exec", Some("command=ls")),
            ("/api/v1/namespaces/a/pods/p/attach", None),
            ("/api/v1/namespaces/a/pods/p/portforward", None),
        ] {
            assert!(!whole("GET", path, query), "{path}?{query:?}");
        }
        // Writes answer whole too, but are not held (their answer is one write anyway
        // when small, and a slow admission webhook must not meet a timer).
        assert!(!whole("POST", "/api/v1/namespaces/a/configmaps", None));
        assert!(!whole("DELETE", "/api/v1/namespaces/a/configmaps/x", None));
    }
}
