//! The first stage: checks before anything else (redirected by the kernel, a head
//! within limits, no smuggling, a path the resolver can place), and what every later
//! stage needs about the request, computed once.
use std::sync::Arc;

use http::{Request, header};

use super::{Conn, Proxy, Refusal, is_upgrade};
use crate::{
    mask::Plan,
    request_info::{self, RequestInfo},
};

/// A request past the prechecks.
#[derive(Debug)]
pub struct Admitted {
    /// Its Kubernetes attributes (verb, resource, namespace, name, ...).
    pub info: RequestInfo,
    /// An HTTP/1.1 upgrade (exec, attach, port-forward).
    pub upgrade: bool,
    /// It may change something (every verb but get, list and watch; every upgrade).
    pub mutating: bool,
    /// How its response (and its recorded body) is masked; `None` for the schema
    /// documents, which carry no object data.
    pub plan: Option<Arc<Plan>>,
}

impl Proxy {
    pub(super) fn precheck<B>(&self, req: &Request<B>, conn: &Conn) -> Result<Admitted, Refusal> {
        if conn.origin.is_none() && !self.limits.accept_unredirected {
            return Err(Refusal::Unredirected);
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
        let info =
            request_info::resolve(req.method().as_str(), req.uri().path(), req.uri().query())?;
        let upgrade = is_upgrade(req);
        Ok(Admitted {
            upgrade,
            mutating: upgrade || !matches!(info.verb.as_str(), "get" | "list" | "watch"),
            plan: self.masking.plan(&info),
            info,
        })
    }
}
