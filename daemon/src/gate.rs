//! The gate: the data path for redirected agent connections.
//!
//! accept (`accept.rs`: the kernel's record of where the connection was going and who
//! opened it) → connection (`conn.rs`: TLS with a leaf for what the agent asked for,
//! HTTP/2 or HTTP/1.1, the rapid-reset budget) → one exchange per request, in
//! [`Gate::exchange`]:
//!
//! precheck (`precheck.rs` → [`Admitted`]: attributes and masking plan) →
//! authenticate → authorize (`authorize.rs` → [`Authorized`] or a [`Refusal`]) →
//! forward or upgrade (`forward.rs`: the request record durable first for mutations)
//! → relay (`relay.rs`: masked as it streams, its outcome recorded when it ends). A
//! refusal at any stage becomes its metav1.Status in one place (`refusal.rs`), and
//! every audit record of the gate is written by `exchange.rs`.
//!
//! Bodies are streamed frame by frame in both directions (watches, `logs -f` and
//! chunked lists are never buffered), long-running requests have no idle timeout.
//! Upgrades (`upgrade.rs`): exec/attach/port-forward and the proxies (over WebSocket
//! or SPDY) become byte pipes once both sides agreed to switch protocols; a watch or
//! log sent as a WebSocket is masked message by message; any other upgrade request is
//! served as a plain one.
mod accept;
mod admission;
mod authorize;
mod conn;
mod effect;
mod exchange;
mod forward;
mod precheck;
mod refusal;
mod relay;
mod upgrade;

#[cfg(test)]
mod tests;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use http::{Request, Response};
use hyper::body::Incoming;

pub use accept::serve;
pub use authorize::{Authorized, Authorizer, Gated};
pub use precheck::Admitted;
pub use refusal::Refusal;

use crate::{
    audit::AuditLog, config, mask::Masking, tls::LeafMinter, upstream::Upstream, util::ProxyBody,
};
use conn::Conn;
use exchange::{Exchange, Records};
use upgrade::Upgrade;

/// Serves redirected agents: everything a request passes through, built once.
pub struct Gate {
    minter: Arc<LeafMinter>,
    upstream: Arc<Upstream>,
    authorizer: Authorizer,
    limits: Limits,
    masking: Arc<Masking>,
    records: Records,
    next_conn: AtomicU64,
    /// Each agent's share of connections and requests (`proxy.limits`).
    admission: admission::Admission,
    /// Connections closed over a cap (for rate-limited logging).
    refused_conns: AtomicU64,
}

/// What the configuration bounds about agents' connections and requests.
struct Limits {
    accept_unredirected: bool,
    header_timeout: Duration,
    max_header_bytes: usize,
}

impl Gate {
    pub fn new(
        minter: Arc<LeafMinter>,
        upstream: Arc<Upstream>,
        authorizer: Authorizer,
        cfg: &config::Proxy,
        masking: Arc<Masking>,
        audit: Arc<AuditLog>,
    ) -> Self {
        Gate {
            minter,
            upstream,
            authorizer,
            limits: Limits {
                accept_unredirected: cfg.accept_unredirected,
                header_timeout: cfg.header_timeout,
                max_header_bytes: cfg.max_header_bytes,
            },
            records: Records::new(audit, masking.clone()),
            masking,
            next_conn: AtomicU64::new(1),
            admission: admission::Admission::new(&cfg.limits),
            refused_conns: AtomicU64::new(0),
        }
    }

    /// One request, top to bottom: its answer, and its records.
    async fn exchange(&self, req: Request<Incoming>, conn: &Arc<Conn>) -> Response<ProxyBody> {
        let mut ex = self.records.begin(&req, conn);
        let busy = conn.busy();
        let resp = match self.admission.request(conn.agent) {
            Err(full) => ex.refuse(Refusal::AgentBusy { cap: full.cap() }),
            Ok(permit) => match self.pass(req, conn, &mut ex).await {
                // The agent's share and the connection's activity last as long as the
                // response body (a watch holds them until it ends).
                Ok(resp) => admission::hold(resp, (permit, busy)),
                Err(refusal) => ex.refuse(refusal),
            },
        };
        ex.log(&resp);
        resp
    }

    /// The stages a request passes, each giving the next what it needs; the first
    /// refusal ends it.
    async fn pass(
        &self,
        req: Request<Incoming>,
        conn: &Arc<Conn>,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let admitted = self.precheck(&req, conn)?;
        ex.admitted(&admitted);
        let caller = self.authorizer.authenticate(&req, conn).await?;
        ex.identified(caller.identity(), conn);
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut req = req;
        let content = match admitted.upgrade {
            Some(Upgrade::Interactive) => Some(None),
            Some(Upgrade::Masked(content)) => Some(Some(content)),
            Some(Upgrade::Stripped) => {
                upgrade::strip(&mut req);
                None
            }
            None => None,
        };
        if let Some(content) = content {
            // Upgrade requests carry no body (SPDY's POST included).
            let none = bytes::Bytes::new();
            let wire = effect::Wire {
                method: req.method(),
                path: req.uri().path(),
                query: req.uri().query().unwrap_or(""),
                content_type: &content_type,
                body: &none,
            };
            let authorized = caller.authorize(&admitted, &wire, &self.upstream).await?;
            ex.authorized(&authorized);
            // Boxed: upgrades are rare, and a large future held inline makes every
            // request's as large (the exchange is boxed per request: its whole size
            // copied).
            return Box::pin(self.upgrade(req, conn, ex, &admitted, &authorized, content)).await;
        }
        let (parts, body) = req.into_parts();
        // A mutation's body is read whole before anything is decided: a grant covers
        // its digest, conditions may need its dry run, the audit keeps it.
        let body = if admitted.mutating || ex.wants_body() {
            forward::Outgoing::Whole(forward::read_body(&parts.headers, body).await?)
        } else {
            forward::Outgoing::Stream(body)
        };
        let none = bytes::Bytes::new();
        let wire = effect::Wire {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            content_type: &content_type,
            body: match &body {
                forward::Outgoing::Whole(b) => b,
                forward::Outgoing::Stream(_) => &none,
            },
        };
        let authorized = caller.authorize(&admitted, &wire, &self.upstream).await?;
        ex.authorized(&authorized);
        self.forward(parts, body, conn, ex, &admitted, &authorized)
            .await
    }
}
