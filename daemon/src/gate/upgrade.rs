//! HTTP/1.1 upgrades. Only the interactive subresources become byte pipes: exec,
//! attach and port-forward of pods, and the pods, services and nodes proxies, whose
//! bytes are an interactive session or another server's protocol (outside masking;
//! the request was authorized like any other, so policy decides whether they happen
//! at all). Every other request that arrives as an upgrade never gets a raw 101:
//! - a watch or a pod log sent as a WebSocket upgrade is negotiated end to end and
//!   then masked message by message ([`WsMasker`]): the server's frames are parsed,
//!   each message masked like the plain response would be, and sent on as new frames;
//! - anything else (a plain GET, a SPDY watch, an unknown protocol) loses its upgrade
//!   headers and is served as the plain, masked request it also is (the API server
//!   answers such requests normally; a client that insisted on switching fails its
//!   handshake instead of reading anything).
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{Instrument, debug, info_span, warn};

use super::{Admitted, Authorized, Conn, Gate, Refusal, exchange::Exchange};
use crate::{
    k8s::RequestInfo,
    mask::{self, Unmaskable, WsCodec, WsContent, WsMasker},
    upstream,
    util::{self, ProxyBody},
};

/// What an upgrade request becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// An interactive subresource: a byte pipe once both sides switched.
    Interactive,
    /// A WebSocket watch (JSON events) or pod log (text): masked message by message.
    Masked(WsContent),
    /// Anything else: served without its upgrade, as a plain request.
    Stripped,
}

impl Upgrade {
    /// The treatment of a request, if it asks for an upgrade (`req` is one by
    /// [`super::precheck::is_upgrade`]); `info` are its attributes as resolved.
    pub fn of<B>(req: &Request<B>, info: &RequestInfo) -> Upgrade {
        if is_interactive(info) {
            return Upgrade::Interactive;
        }
        let websocket = req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if !websocket || !info.is_resource_request {
            return Upgrade::Stripped;
        }
        if info.verb == "watch" {
            Upgrade::Masked(WsContent::Json)
        } else if info.api_group.is_empty()
            && info.resource == "pods"
            && info.subresource == "log"
            && info.verb == "get"
        {
            Upgrade::Masked(WsContent::Text)
        } else {
            Upgrade::Stripped
        }
    }

    /// Whether the upgrade happens (a pipe or a masked stream): the request changes
    /// something or opens a session, and its record is durable first.
    pub fn switches(self) -> bool {
        !matches!(self, Upgrade::Stripped)
    }
}

/// exec, attach and port-forward of pods; the pods, services and nodes proxies.
fn is_interactive(info: &RequestInfo) -> bool {
    if !info.is_resource_request || !info.api_group.is_empty() {
        return false;
    }
    match info.resource.as_str() {
        "pods" => {
            matches!(
                info.subresource.as_str(),
                "exec" | "attach" | "portforward" | "proxy"
            ) || info.verb == "proxy"
        }
        "services" | "nodes" => info.subresource == "proxy" || info.verb == "proxy",
        _ => false,
    }
}

/// The headers an upgrade request carries that a plain one must not.
pub fn strip<B>(req: &mut Request<B>) {
    let h = req.headers_mut();
    upstream::strip_hop_by_hop(h);
    let ws: Vec<_> = h
        .keys()
        .filter(|k| k.as_str().starts_with("sec-websocket-"))
        .cloned()
        .collect();
    for k in ws {
        h.remove(k);
    }
}

impl Gate {
    /// An upgrade that switches: a byte pipe, or a WebSocket masked message by message.
    pub(super) async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        conn: &Arc<Conn>,
        ex: &mut Exchange,
        admitted: &Admitted,
        authorized: &Authorized,
        masked: Option<WsContent>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        // The session's start: durable before the session exists.
        ex.record_request().await?;
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, _body) = req.into_parts();
        self.upstream
            .rewrite(&mut parts, true, &authorized.impersonate)
            .map_err(Refusal::Credential)?;
        if masked.is_some() {
            // Frames must stay readable (no permessage-deflate), and the content JSON.
            parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
            if let Some(a) = parts.headers.get(header::ACCEPT) {
                let json = mask::json_accept(a);
                parts.headers.insert(header::ACCEPT, json);
            }
            parts.headers.remove(header::ACCEPT_ENCODING);
        }
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
        let masker = match masked {
            None => None,
            Some(content) => Some(self.ws_masker(&resp, content, admitted)?),
        };
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
                let (bytes, error) = match masker {
                    None => pipe(TokioIo::new(d), TokioIo::new(u)).await,
                    Some(m) => masked_stream(TokioIo::new(d), TokioIo::new(u), m).await,
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

    /// The masker for a switched WebSocket: by what the server agreed to (a
    /// subprotocol this build can read, no extension).
    fn ws_masker(
        &self,
        resp: &Response<upstream::UpstreamBody>,
        content: WsContent,
        admitted: &Admitted,
    ) -> Result<WsMasker, Refusal> {
        let refuse = |what: String| Refusal::Unmaskable(Unmaskable::Upgrade(what));
        if let Some(e) = resp.headers().get(header::SEC_WEBSOCKET_EXTENSIONS) {
            return Err(refuse(format!(
                "the WebSocket extension {}",
                String::from_utf8_lossy(e.as_bytes())
            )));
        }
        let protocol = resp
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let codec = match content {
            // The apiserver's watch echoes whatever single subprotocol was offered and
            // sends each event as one message, undecorated
            // (k8s.io/apiserver/pkg/endpoints/handlers/watch.go, HandleWS).
            WsContent::Json => WsCodec::Raw,
            // Logs go through wsstream.Reader, which frames as the protocol says.
            WsContent::Text => WsCodec::from_protocol(&protocol)
                .ok_or_else(|| refuse(format!("the WebSocket subprotocol {protocol:?}")))?,
        };
        let plan = admitted
            .plan
            .clone()
            .ok_or_else(|| refuse("a stream without a masking plan".into()))?;
        Ok(WsMasker::new(
            content,
            codec,
            plan,
            self.masking.detectors().cloned(),
        ))
    }
}

/// Both ways as bytes, until both sides are done: (agent→server, server→agent).
async fn pipe<D, U>(mut d: D, mut u: U) -> ((u64, u64), Option<String>)
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut d, &mut u).await {
        Ok((to_up, to_agent)) => {
            debug!(to_up, to_agent, "upgraded stream closed");
            ((to_up, to_agent), None)
        }
        Err(e) => {
            debug!(error = %e, "upgraded stream ended with an error");
            ((0, 0), Some(e.to_string()))
        }
    }
}

/// The agent's frames to the server as they are; the server's masked. Ends when the
/// server's side does (or masking fails: the agent then gets a close frame saying
/// so, and both connections are closed).
async fn masked_stream<D, U>(d: D, u: U, mut masker: WsMasker) -> ((u64, u64), Option<String>)
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut dr, mut dw) = tokio::io::split(d);
    let (mut ur, mut uw) = tokio::io::split(u);
    let mut to_up = 0u64;
    let up = async {
        let n = tokio::io::copy(&mut dr, &mut uw).await.unwrap_or(0);
        let _ = uw.shutdown().await;
        n
    };
    let down = async {
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return (sent, Some(format!("reading the API server: {e}"))),
            };
            let out = match masker.feed(&buf[..n]) {
                Ok(out) => out,
                Err(e) => {
                    warn!(error = %e, "WebSocket stream cannot be masked: closed");
                    let _ = dw
                        .write_all(&WsMasker::error_close(
                            "Portcullis stopped this stream: it cannot be masked",
                        ))
                        .await;
                    let _ = dw.shutdown().await;
                    return (sent, Some(format!("masking stopped the stream: {e}")));
                }
            };
            if dw.write_all(&out).await.is_err() {
                return (sent, None);
            }
            sent += out.len() as u64;
        }
        let error = match masker.finish() {
            Ok(rest) => {
                if dw.write_all(&rest).await.is_ok() {
                    sent += rest.len() as u64;
                }
                None
            }
            Err(e) => Some(format!("masking stopped the stream: {e}")),
        };
        let _ = dw.shutdown().await;
        (sent, error)
    };
    tokio::pin!(up, down);
    let (to_agent, error) = tokio::select! {
        r = &mut down => r,
        n = &mut up => {
            to_up = n;
            (&mut down).await
        }
    };
    ((to_up, to_agent), error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(upgrade: &str) -> Request<()> {
        Request::builder()
            .header("connection", "Upgrade")
            .header("upgrade", upgrade)
            .body(())
            .unwrap()
    }

    fn info(method: &str, path: &str) -> RequestInfo {
        let (p, q) = path.split_once('?').unwrap_or((path, ""));
        crate::k8s::resolve(method, p, Some(q)).unwrap().upgraded()
    }

    #[test]
    fn only_interactive_subresources_become_pipes() {
        use Upgrade::*;
        let ws = req("websocket");
        let spdy = req("SPDY/3.1");
        for (r, method, path, want) in [
            (
                &ws,
                "GET",
                "/api/v1/namespaces/n/pods/p/exec?command=sh",
                Interactive,
            ),
            (
                &spdy,
                "POST",
                "/api/v1/namespaces/n/pods/p/exec?command=sh",
                Interactive,
            ),
            (
                &ws,
                "GET",
                "/api/v1/namespaces/n/pods/p/attach",
                Interactive,
            ),
            (
                &ws,
                "GET",
                "/api/v1/namespaces/n/pods/p/portforward",
                Interactive,
            ),
            (
                &ws,
                "GET",
                "/api/v1/namespaces/n/pods/p/proxy/x",
                Interactive,
            ),
            (
                &ws,
                "GET",
                "/api/v1/namespaces/n/services/s:80/proxy/",
                Interactive,
            ),
            (&ws, "GET", "/api/v1/nodes/n/proxy/exec/a/b/c", Interactive),
            (&ws, "GET", "/api/v1/proxy/namespaces/n/pods/p", Interactive),
            (
                &ws,
                "GET",
                "/api/v1/namespaces/n/secrets?watch=1",
                Masked(WsContent::Json),
            ),
            (
                &ws,
                "GET",
                "/api/v1/watch/namespaces/n/secrets",
                Masked(WsContent::Json),
            ),
            (
                &ws,
                "GET",
                "/apis/apps/v1/deployments?watch=true",
                Masked(WsContent::Json),
            ),
            (
                &ws,
                "GET",
                "/api/v1/namespaces/n/pods/p/log?follow=true",
                Masked(WsContent::Text),
            ),
            (
                &spdy,
                "GET",
                "/api/v1/namespaces/n/secrets?watch=1",
                Stripped,
            ),
            (&spdy, "GET", "/api/v1/namespaces/n/pods/p/log", Stripped),
            (&ws, "GET", "/api/v1/namespaces/n/secrets/s", Stripped),
            (&ws, "GET", "/api/v1/namespaces/n/secrets", Stripped),
            (&ws, "POST", "/api/v1/namespaces/n/configmaps", Stripped),
            (
                &ws,
                "GET",
                "/apis/example.com/v1/namespaces/n/things/t/exec",
                Stripped,
            ),
            (&ws, "GET", "/version", Stripped),
            (
                &req("h2c"),
                "GET",
                "/api/v1/namespaces/n/secrets?watch=1",
                Stripped,
            ),
        ] {
            assert_eq!(Upgrade::of(r, &info(method, path)), want, "{method} {path}");
        }
    }

    #[test]
    fn stripping_removes_every_upgrade_header() {
        let mut r = Request::builder()
            .header("connection", "Upgrade, x-hop")
            .header("upgrade", "websocket")
            .header("x-hop", "1")
            .header("sec-websocket-key", "k")
            .header("sec-websocket-protocol", "v5.channel.k8s.io")
            .header("accept", "application/json")
            .body(())
            .unwrap();
        strip(&mut r);
        let names: Vec<&str> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);
    }
}
