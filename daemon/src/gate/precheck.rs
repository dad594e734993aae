//! The first stage: checks before anything else (redirected by the kernel, a head
//! within limits, no smuggling, a path the resolver can place), and what every later
//! stage needs about the request, computed once.
use std::sync::Arc;

use http::{Request, header};

use super::{Conn, Gate, Refusal, upgrade::Upgrade};
use crate::{
    k8s::{self, RequestInfo},
    mask::Plan,
};

/// A request past the prechecks.
#[derive(Debug)]
pub struct Admitted {
    /// Its Kubernetes attributes (verb, resource, namespace, name, ...).
    pub info: RequestInfo,
    /// An HTTP/1.1 upgrade request, and what it becomes.
    pub upgrade: Option<Upgrade>,
    /// It may change something (every verb but get, list and watch; every upgrade
    /// that switches).
    pub mutating: bool,
    /// How its response (and its recorded body) is masked; `None` for the schema
    /// documents, which carry no object data.
    pub plan: Option<Arc<Plan>>,
}

impl Gate {
    pub(super) fn precheck<B>(&self, req: &Request<B>, conn: &Conn) -> Result<Admitted, Refusal> {
        if conn.origin.is_none() && !self.limits.accept_unredirected {
            return Err(Refusal::Unredirected);
        }
        if conn.closing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Refusal::ConnectionClosing);
        }
        // hyper's HTTP/1.1 buffer limit is not a strict bound on the head (a head that
        // arrives in one read can exceed it), so the configured limit is checked here.
        let head_bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if head_bytes > self.limits.max_header_bytes {
            return Err(Refusal::HeadTooLarge {
                bytes: head_bytes,
                limit: self.limits.max_header_bytes,
            });
        }
        // Both framings at once is the request-smuggling pattern (RFC 9112 6.3): refuse
        // it and close, rather than guess which framing the agent meant. (hyper 1.12
        // already drops the Content-Length and closes after such an HTTP/1.1 request;
        // this stays for whatever transport lets both through.)
        if req.headers().contains_key(header::TRANSFER_ENCODING)
            && req.headers().contains_key(header::CONTENT_LENGTH)
        {
            return Err(Refusal::BothFramings);
        }
        let info = k8s::resolve(req.method().as_str(), req.uri().path(), req.uri().query())?;
        if info.is_resource_request && info.verb.is_empty() {
            // Nothing to decide on: policy rules name verbs.
            return Err(k8s::RequestInfoError::UnsupportedMethod(req.method().to_string()).into());
        }
        let upgrade = is_upgrade(req).then(|| Upgrade::of(req, &info));
        let info = if upgrade == Some(Upgrade::Interactive) {
            info.upgraded()
        } else {
            info
        };
        Ok(Admitted {
            upgrade,
            mutating: upgrade.is_some_and(Upgrade::switches)
                || !matches!(info.verb.as_str(), "get" | "list" | "watch"),
            plan: self.masking.plan(&info),
            info,
        })
    }
}

/// An HTTP/1.1 upgrade request: `Connection: upgrade` plus an `Upgrade` protocol.
pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_is_recognised_case_insensitively_among_tokens() {
        let req = |conn: &str, up: Option<&str>| {
            let mut b = Request::builder().header("connection", conn);
            if let Some(u) = up {
                b = b.header("upgrade", u);
            }
            b.body(()).unwrap()
        };
        assert!(is_upgrade(&req("Upgrade", Some("websocket"))));
        assert!(is_upgrade(&req("keep-alive, UPGRADE", Some("SPDY/3.1"))));
        assert!(!is_upgrade(&req("keep-alive", Some("websocket"))));
        assert!(!is_upgrade(&req("upgrade", None)));
    }
}
