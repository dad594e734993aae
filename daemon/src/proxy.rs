//! The data path for one redirected agent connection:
//! accept → TLS (leaf for what the agent asked for) → HTTP/2 or HTTP/1.1 →
//! request attributes → identity → decision (→ approval) → audit record (durable
//! first for mutations) → upstream → masked response (→ outcome record) → client.
//!
//! Bodies are streamed frame by frame in both directions (watches, `logs -f` and
//! chunked lists are never buffered), long-running requests have no idle timeout, and
//! upgrades (exec/attach/port-forward over WebSocket or SPDY) become byte pipes once
//! both sides agreed to switch protocols.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

mod refusal;

pub use refusal::Refusal;

use crate::{
    approvals::{Approvals, Attributes, Held},
    audit_log::{
        AuditLog, Decision, Kind, Origin, RequestRecord, ResponseRecord, Subject, body_value,
    },
    ca::LeafMinter,
    config,
    config::AuditLevel,
    identity::Authenticator,
    mask::{self, ForResponse, Masking},
    origin::ConnOrigin,
    pod::{PodRef, PodResolver},
    policy::{Action, PolicyHandle},
    request_info::{self, RequestInfo},
    response::{Outcome, Relay},
    upstream::{self, Impersonation, Upstream},
    util::{self, BoxError, ProxyBody},
};

/// How requests are authorised.
pub enum Gate {
    /// Every enrolled agent acts as one scoped identity (no token checks, no policy).
    PassThrough(Impersonation),
    /// Each request: the agent's token, bound to its pod; the policy's decision; the
    /// subject's scoped identity upstream.
    Gated {
        authn: Arc<Authenticator>,
        policy: Arc<PolicyHandle>,
        approvals: Arc<Approvals>,
        pods: Arc<PodResolver>,
    },
}

/// What authorization learned about one request besides its outcome (for the
/// request log and the audit).
#[derive(Default)]
struct Verdict {
    subject: String,
    user: Option<Subject>,
    rule: String,
    approval: String,
    grant: String,
}

/// Largest request body buffered to record it before a mutation is forwarded (the API
/// server's own limit is 3 MiB).
const MAX_RECORDED_REQUEST: usize = 3 << 20;

/// Most concurrent HTTP/2 streams one agent connection may open (client-go multiplexes
/// every request of a process, watches included, over one connection).
const MAX_CONCURRENT_STREAMS: u32 = 1000;

pub struct Proxy {
    minter: Arc<LeafMinter>,
    upstream: Arc<Upstream>,
    gate: Gate,
    accept_unredirected: bool,
    header_timeout: Duration,
    max_header_bytes: usize,
    next_conn: AtomicU64,
    masking: Arc<Masking>,
    audit: Arc<AuditLog>,
    /// Request IDs: a random prefix per daemon start and a counter.
    id_prefix: String,
    next_request: AtomicU64,
}

/// Per-connection budgets against HTTP/2 "rapid reset" (CVE-2023-44487), where each
/// stream opened and cancelled at once becomes work upstream, on the API server
/// connection every agent shares. h2's own limit only counts streams reset before the
/// server accepted them, and we accept at once. A busy but honest client cancels
/// rarely (a watch it no longer needs, a timed-out request); request volume alone is
/// not limited here (that is policy's job), only cancellation.
const CANCEL_BUDGET: u32 = 100;
const CANCEL_WINDOW: Duration = Duration::from_secs(10);

/// A count of events in a fixed window.
#[derive(Debug)]
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    fn new() -> std::sync::Mutex<Window> {
        std::sync::Mutex::new(Window {
            start: Instant::now(),
            count: 0,
        })
    }
}

/// Adds one to `w`; true exactly when the count first exceeds `budget`.
fn over_budget(w: &std::sync::Mutex<Window>, window: Duration, budget: u32) -> bool {
    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
    if w.start.elapsed() > window {
        w.start = Instant::now();
        w.count = 0;
    }
    w.count += 1;
    w.count == budget + 1
}

/// What is known about a connection before its first request.
#[derive(Debug)]
struct Conn {
    id: u64,
    peer: SocketAddr,
    origin: Option<ConnOrigin>,
    /// The pod whose cgroup opened the connection (gated mode).
    kernel_pod: Option<PodRef>,
    sni: Option<String>,
    cancels: std::sync::Mutex<Window>,
    /// Set when a budget is exceeded; the connection is then closed.
    abuse: tokio::sync::Notify,
}

impl Conn {
    fn note_cancel(&self) {
        if over_budget(&self.cancels, CANCEL_WINDOW, CANCEL_BUDGET) {
            warn!(
                budget = CANCEL_BUDGET,
                window_s = CANCEL_WINDOW.as_secs(),
                "too many cancelled requests on one connection (HTTP/2 rapid reset?)"
            );
            self.abuse.notify_one();
        }
    }
}

/// Counts a request as cancelled if its handler is dropped before it finishes.
struct CancelGuard<'a> {
    conn: &'a Conn,
    done: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.note_cancel();
        }
    }
}

impl Proxy {
    pub fn new(
        minter: Arc<LeafMinter>,
        upstream: Arc<Upstream>,
        gate: Gate,
        cfg: &config::Proxy,
        masking: Arc<Masking>,
        audit: Arc<AuditLog>,
    ) -> Self {
        let mut r = [0u8; 6];
        let _ = getrandom::fill(&mut r);
        Proxy {
            masking,
            audit,
            id_prefix: format!("req-{}", hex::encode(r)),
            next_request: AtomicU64::new(1),
            minter,
            upstream,
            gate,
            accept_unredirected: cfg.accept_unredirected,
            header_timeout: cfg.header_timeout,
            max_header_bytes: cfg.max_header_bytes,
            next_conn: AtomicU64::new(1),
        }
    }

    /// Serves one accepted connection until the agent or the API server ends it.
    pub async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        origin: Option<ConnOrigin>,
    ) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, %peer, pid = origin.as_ref().map(|o| o.origin.pid));
        self.serve_inner(id, stream, peer, origin)
            .instrument(span)
            .await
    }

    async fn serve_inner(
        self: Arc<Self>,
        id: u64,
        stream: TcpStream,
        peer: SocketAddr,
        origin: Option<ConnOrigin>,
    ) {
        let _ = stream.set_nodelay(true);
        let dst_ip = origin.as_ref().map(|o| o.original_dst.ip());
        // A slow or silent client must not hold a task forever before TLS is done.
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await
                .map_err(|e| format!("reading the TLS client hello: {e}"))?;
            let sni = start.client_hello().server_name().map(str::to_owned);
            let cfg = self
                .minter
                .server_config(sni.as_deref(), dst_ip)
                .map_err(|e| e.to_string())?;
            let tls = start
                .into_stream(cfg)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok::<_, String>((tls, sni))
        };
        let (tls, sni) = match tokio::time::timeout(self.header_timeout, handshake).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                debug!(error = %e, "TLS failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let kernel_pod = match (&self.gate, &origin) {
            (Gate::Gated { pods, .. }, Some(o)) => pods.resolve(o.origin.cgroup_id),
            _ => None,
        };
        let conn = Arc::new(Conn {
            id,
            peer,
            origin,
            kernel_pod,
            sni,
            cancels: Window::new(),
            abuse: tokio::sync::Notify::new(),
        });
        debug!(h2, sni = ?conn.sni, "TLS established");
        let proxy = self.clone();
        let svc_conn = conn.clone();
        let svc = service_fn(move |req| {
            let proxy = proxy.clone();
            let conn = svc_conn.clone();
            async move {
                let mut guard = CancelGuard {
                    conn: &conn,
                    done: false,
                };
                let resp = proxy.handle(req, &conn).await;
                guard.done = true;
                Ok::<_, Infallible>(resp)
            }
        });
        let io = TokioIo::new(tls);
        let result = if h2 {
            let serving = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(self.max_header_bytes as u32)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .serve_connection(io, svc);
            tokio::pin!(serving);
            tokio::select! {
                r = serving.as_mut() => r,
                _ = conn.abuse.notified() => {
                    warn!("closing the connection (GOAWAY)");
                    serving.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(1), serving)
                        .await
                        .unwrap_or(Ok(()))
                }
            }
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(self.header_timeout)
                .max_buf_size(self.max_header_bytes.max(8192))
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        };
        if let Err(e) = result {
            debug!(error = %e, "connection ended with an error");
        }
    }

    async fn handle(&self, req: Request<Incoming>, conn: &Arc<Conn>) -> Response<ProxyBody> {
        let started = Instant::now();
        let upgrade = is_upgrade(&req);
        let mut rec = RequestRecord {
            id: format!(
                "{}-{}",
                self.id_prefix,
                self.next_request.fetch_add(1, Ordering::Relaxed)
            ),
            received_ns: util::unix_nanos(),
            conn: conn.id,
            user: None,
            origin: origin_of(conn),
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().unwrap_or("").to_owned(),
            attributes: RequestInfo::default(),
            upgrade,
            mutating: false,
            decision: Decision::Refused,
            rule: String::new(),
            approval: String::new(),
            grant: String::new(),
            content_type: req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            request_body: None,
        };
        let mut verdict = Verdict::default();
        let resp = match self.precheck(&req, conn) {
            Err(refusal) => self.refused(&rec, refusal, started),
            Ok(info) => {
                rec.mutating = upgrade || !matches!(info.verb.as_str(), "get" | "list" | "watch");
                let authorized = self.authorize(&req, conn, &info, &mut verdict).await;
                rec.user = verdict.user.take();
                rec.rule = verdict.rule.clone();
                rec.approval = verdict.approval.clone();
                rec.grant = verdict.grant.clone();
                rec.attributes = info;
                match authorized {
                    Err(refusal) => {
                        if let Some(d) = refusal.decision() {
                            rec.decision = d;
                        }
                        self.refused(&rec, refusal, started)
                    }
                    Ok((imp, decision)) => {
                        rec.decision = decision;
                        if upgrade {
                            self.forward_upgrade(req, conn, &rec, &imp, started).await
                        } else {
                            self.forward(req, conn, &mut rec, &imp, started).await
                        }
                    }
                }
            }
        };
        info!(
            conn = conn.id,
            subject = %verdict.subject,
            pod_uid = conn.kernel_pod.as_ref().map(|p| p.uid.as_str()).unwrap_or(""),
            decision = %rec.decision,
            rule = %rec.rule,
            approval = %rec.approval,
            grant = %rec.grant,
            verb = %rec.attributes.verb,
            api_group = %rec.attributes.api_group,
            resource = %rec.attributes.resource,
            subresource = %rec.attributes.subresource,
            namespace = %rec.attributes.namespace,
            name = %rec.attributes.name,
            path = %rec.path,
            id = %rec.id,
            upgrade,
            code = resp.status().as_u16(),
            // Time to the response head; streamed bodies continue after this.
            head_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        resp
    }

    /// Checks before anything else: redirected by the kernel, a head within limits, no
    /// smuggling, resolvable attributes.
    fn precheck<B>(&self, req: &Request<B>, conn: &Conn) -> Result<RequestInfo, Refusal> {
        if conn.origin.is_none() && !self.accept_unredirected {
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
        if head_bytes > self.max_header_bytes {
            return Err(Refusal::HeadTooLarge {
                bytes: head_bytes,
                limit: self.max_header_bytes,
            });
        }
        // Both framings at once is the request-smuggling pattern (RFC 9112 6.3): refuse
        // it and close, rather than guess which framing the agent meant.
        if req.headers().contains_key(header::TRANSFER_ENCODING)
            && req.headers().contains_key(header::CONTENT_LENGTH)
        {
            return Err(Refusal::BothFramings);
        }
        Ok(request_info::resolve(
            req.method().as_str(),
            req.uri().path(),
            req.uri().query(),
        )?)
    }

    /// A request answered by the daemon itself: both records, queued.
    fn refused(
        &self,
        rec: &RequestRecord,
        refusal: Refusal,
        started: Instant,
    ) -> Response<ProxyBody> {
        if let Some(w) = refusal.warning() {
            warn!(id = %rec.id, method = %rec.method, path = %rec.path, reason = %refusal, "{w}");
        }
        let resp = refusal.response();
        self.audit.record(Kind::Request, rec);
        self.record_answer(rec.id.clone(), &resp, started, None);
        resp
    }

    /// An answer after the request record was written: the response record only.
    fn answered(&self, id: String, refusal: Refusal, started: Instant) -> Response<ProxyBody> {
        if let Some(w) = refusal.warning() {
            warn!(%id, reason = %refusal, "{w}");
        }
        let resp = refusal.response();
        self.record_answer(id, &resp, started, refusal.record_error());
        resp
    }

    /// Audit before act: a mutation's record is durable before it is forwarded; a read
    /// is refused while the log cannot be written (if so configured).
    async fn record_request(&self, rec: &RequestRecord) -> Result<(), Refusal> {
        if rec.mutating {
            return self
                .audit
                .durable(Kind::Request, rec)
                .await
                .map(|_| ())
                .map_err(Refusal::AuditWriteFailed);
        }
        self.audit.record(Kind::Request, rec);
        if !self.audit.healthy() && self.audit.fail_closed_reads {
            return Err(Refusal::AuditUnhealthy);
        }
        Ok(())
    }

    /// A response record for an answer that has no body worth relaying.
    fn record_answer(
        &self,
        id: String,
        resp: &Response<ProxyBody>,
        started: Instant,
        error: Option<String>,
    ) {
        self.audit.record(
            Kind::Response,
            &ResponseRecord {
                id,
                code: resp.status().as_u16(),
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                bytes: 0,
                complete: error.is_none(),
                error,
                response_body: None,
                session_bytes: None,
            },
        );
    }

    /// The masked request body for the record, and the body to forward.
    async fn take_request_body(
        &self,
        body: Incoming,
        rec: &mut RequestRecord,
    ) -> Result<ProxyBody, Refusal> {
        let wanted = rec.mutating
            && self.audit.level >= AuditLevel::Request
            && matches!(rec.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE");
        if !wanted {
            return Ok(body.map_err(BoxError::from).boxed());
        }
        let bytes = match http_body_util::Limited::new(body, MAX_RECORDED_REQUEST)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                return Err(Refusal::BodyUnreadable {
                    too_large: e
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some(),
                    why: e.to_string(),
                });
            }
        };
        if !bytes.is_empty() {
            rec.request_body = Some(self.masked_request_body(&bytes, rec));
        }
        Ok(util::full(bytes))
    }

    /// A request body as recorded: JSON masked like a response of its resource; other
    /// encodings (protobuf) cannot be masked and are not recorded.
    fn masked_request_body(&self, bytes: &[u8], rec: &RequestRecord) -> serde_json::Value {
        let media = util::media_type(&rec.content_type);
        let json = util::is_json(&media);
        let plan = self.masking.plan(&rec.attributes);
        match (json, plan) {
            (true, Some(plan)) => {
                let mut m = mask::JsonMasker::new(plan);
                match m.feed(bytes).and_then(|mut o| {
                    o.extend(m.finish()?);
                    Ok(o)
                }) {
                    Ok(masked) => body_value(&masked, self.audit.max_body_bytes),
                    Err(e) => {
                        serde_json::json!({ "omitted": format!("not valid JSON: {e}"), "bytes": bytes.len() })
                    }
                }
            }
            _ => serde_json::json!({
                "omitted": format!("a {media} body cannot be masked, so it is not recorded"),
                "bytes": bytes.len(),
            }),
        }
    }

    /// Identity, then decision: the upstream identity to impersonate and the decision
    /// that let the request through, or the refusal.
    async fn authorize(
        &self,
        req: &Request<Incoming>,
        conn: &Conn,
        info: &RequestInfo,
        v: &mut Verdict,
    ) -> Result<(Impersonation, Decision), Refusal> {
        let (authn, policy, approvals) = match &self.gate {
            Gate::PassThrough(imp) => return Ok((imp.clone(), Decision::PassThrough)),
            Gate::Gated {
                authn,
                policy,
                approvals,
                ..
            } => (authn, policy, approvals),
        };
        let token = bearer(req).ok_or(Refusal::NoToken)?;
        let id = authn
            .authenticate(token, conn.kernel_pod.as_ref())
            .await
            .map_err(Refusal::BadToken)?;
        v.subject = id.username.clone();
        v.user = Some(Subject {
            username: id.username.clone(),
            groups: id.groups.clone(),
            issuer: id.issuer.clone(),
            token_id: id.token_id.clone(),
        });
        let policy = policy.get();
        // Before any decision: a subject with no upstream identity can never proceed,
        // so nobody is asked to approve its requests.
        let Some(scoped) = policy.scoped_identity(&id) else {
            return Err(Refusal::Unmapped {
                policy: policy.name.clone(),
                user: id.username.clone(),
            });
        };
        let d = policy.decide(&id, info);
        v.rule = d.rule.clone().unwrap_or_default();
        let attrs = Box::new(Attributes::from(info));
        let decision = match d.action {
            Action::Deny => {
                return Err(Refusal::Denied {
                    attrs,
                    user: id.username.clone(),
                    message: d.message,
                });
            }
            Action::Allow => Decision::Allow,
            Action::Approve => {
                let spec = d
                    .approval
                    .clone()
                    .unwrap_or_else(|| crate::policy::ApprovalSpec {
                        approvers: Vec::new(),
                        hold: Duration::ZERO,
                        grant_ttl: Duration::from_secs(60),
                    });
                let held = approvals
                    .hold(&id, &attrs, &v.rule, &d.message, &spec)
                    .await
                    .map_err(Refusal::ApprovalsUnavailable)?;
                match held {
                    Held::Granted { grant_id } => {
                        v.grant = grant_id;
                        Decision::Approved
                    }
                    Held::Pending { approval_id } => {
                        v.approval = approval_id.clone();
                        return Err(Refusal::Pending {
                            attrs,
                            message: d.message,
                            approval: approval_id,
                        });
                    }
                    Held::Denied {
                        approval_id,
                        by,
                        reason,
                    } => {
                        v.approval = approval_id.clone();
                        return Err(Refusal::ApprovalDenied {
                            attrs,
                            approval: approval_id,
                            by,
                            reason,
                        });
                    }
                    Held::TooMany { pending } => {
                        return Err(Refusal::TooManyPending {
                            user: id.username.clone(),
                            pending,
                        });
                    }
                    Held::Expired { approval_id } => {
                        v.approval = approval_id.clone();
                        return Err(Refusal::ApprovalExpired {
                            attrs,
                            approval: approval_id,
                        });
                    }
                }
            }
        };
        Ok((Impersonation::new(&scoped.user, &scoped.groups), decision))
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: &Arc<Conn>,
        rec: &mut RequestRecord,
        imp: &Impersonation,
        started: Instant,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let body = match self.take_request_body(body, rec).await {
            Ok(b) => b,
            Err(refusal) => return self.refused(rec, refusal, started),
        };
        if let Err(refusal) = self.record_request(rec).await {
            return self.answered(rec.id.clone(), refusal, started);
        }
        if let Err(e) = self.upstream.rewrite(&mut parts, false, imp) {
            return self.answered(rec.id.clone(), Refusal::Credential(e), started);
        }
        let plan = self.masking.plan(&rec.attributes);
        if plan.is_some() {
            // Ask for what can be masked: JSON, uncompressed.
            if let Some(a) = parts.headers.get(header::ACCEPT) {
                let json = mask::json_accept(a);
                parts.headers.insert(header::ACCEPT, json);
            }
            parts.headers.remove(header::ACCEPT_ENCODING);
        }
        let head = parts.method == http::Method::HEAD;
        let up_req = Request::from_parts(parts, body);
        match self.upstream.send(up_req, false).await {
            Ok(resp) => self.relay(resp, plan, rec.id.clone(), conn, started, head),
            Err(e) => self.answered(rec.id.clone(), self.upstream_error(e), started),
        }
    }

    /// The API server's answer on its way to the agent: masked, and its outcome
    /// recorded when it ends.
    fn relay(
        &self,
        resp: Response<Incoming>,
        plan: Option<Arc<mask::Plan>>,
        id: String,
        conn: &Arc<Conn>,
        started: Instant,
        head: bool,
    ) -> Response<ProxyBody> {
        let code = resp.status();
        let treatment = self
            .masking
            .for_response(plan.as_ref(), code, resp.headers(), head);
        let (mut p, body) = resp.into_parts();
        upstream::strip_hop_by_hop(&mut p.headers);
        let masker = match treatment {
            ForResponse::Pass => None,
            ForResponse::Mask(m) => {
                p.headers.remove(header::CONTENT_LENGTH);
                Some(m)
            }
            ForResponse::Refuse(why) => {
                return self.answered(id, Refusal::Unmaskable(why), started);
            }
        };
        let abandoned = conn.clone();
        let outcome = Outcome {
            audit: self.audit.clone(),
            id,
            code: code.as_u16(),
            started,
            capture: (self.audit.level == AuditLevel::RequestResponse)
                .then_some(self.audit.max_body_bytes),
            on_abandon: Some(Box::new(move || abandoned.note_cancel())),
        };
        Response::from_parts(p, Relay::new(body, masker, Some(outcome)).boxed())
    }

    async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
        conn: &Arc<Conn>,
        rec: &RequestRecord,
        imp: &Impersonation,
        started: Instant,
    ) -> Response<ProxyBody> {
        // The session's start: durable before the session exists.
        if let Err(refusal) = self.record_request(rec).await {
            return self.answered(rec.id.clone(), refusal, started);
        }
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, _body) = req.into_parts();
        if let Err(e) = self.upstream.rewrite(&mut parts, true, imp) {
            return self.answered(rec.id.clone(), Refusal::Credential(e), started);
        }
        // Upgrade requests carry no body (SPDY's POST included).
        let up_req = Request::from_parts(parts, util::empty());
        let mut resp = match self.upstream.send(up_req, true).await {
            Ok(r) => r,
            Err(e) => return self.answered(rec.id.clone(), self.upstream_error(e), started),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The API server refused (e.g. no such pod): relay its (masked) answer.
            let plan = self.masking.plan(&rec.attributes);
            return self.relay(resp, plan, rec.id.clone(), conn, started, false);
        }
        let upstream = hyper::upgrade::on(&mut resp);
        let conn_id = conn.id;
        let audit = self.audit.clone();
        let id = rec.id.clone();
        tokio::spawn(
            async move {
                let (d, u) = match tokio::try_join!(downstream, upstream) {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "upgrade did not complete");
                        audit.record(
                            Kind::Response,
                            &ResponseRecord {
                                id,
                                code: 101,
                                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                                bytes: 0,
                                complete: false,
                                error: Some(format!("upgrade did not complete: {e}")),
                                response_body: None,
                                session_bytes: None,
                            },
                        );
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
                audit.record(
                    Kind::Response,
                    &ResponseRecord {
                        id,
                        code: 101,
                        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                        bytes: bytes.0 + bytes.1,
                        complete: error.is_none(),
                        error,
                        response_body: None,
                        session_bytes: Some(bytes),
                    },
                );
            }
            .instrument(info_span!("upgrade", conn = conn_id)),
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
        Response::from_parts(p, util::empty())
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

/// The agent's bearer token (`Authorization: Bearer ...`).
fn bearer<B>(req: &Request<B>) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The connection's origin as recorded: what the kernel saw, never what the agent said.
fn origin_of(conn: &Conn) -> Origin {
    let mut o = Origin {
        peer: conn.peer.to_string(),
        ..Origin::default()
    };
    if let Some(c) = &conn.origin {
        o.original_dst = c.original_dst.to_string();
        o.pid = c.origin.pid;
        o.comm = c.origin.comm.clone();
        o.cgroup_id = c.origin.cgroup_id;
    }
    if let Some(p) = &conn.kernel_pod {
        o.pod_uid = p.uid.clone();
    }
    o
}

/// An HTTP/1.1 upgrade request: `Connection: upgrade` plus an `Upgrade` protocol.
fn is_upgrade<B>(req: &Request<B>) -> bool {
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
mod gate_tests;

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
