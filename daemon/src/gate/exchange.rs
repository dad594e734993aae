//! The gate's audit records, written here and nowhere else: one `request` record per
//! request (durable before a mutation is forwarded) and one `response` record for its
//! outcome — when a refusal is answered, when a relayed body ends (whole, abandoned or
//! failed), or when an upgraded session closes.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use http::{Request, Response, header};
use tracing::debug;

use super::{Admitted, Authorized, Conn, Refusal};
use crate::{
    audit::{AuditLog, Decision, Kind, Origin, RequestRecord, ResponseRecord, Subject, body_value},
    config::AuditLevel,
    identity::Identity,
    k8s::RequestInfo,
    mask::{self, Masking, Plan},
    util::{self, ProxyBody},
};

/// Where exchanges begin: the audit log and the request IDs (a random prefix per
/// daemon start, and a counter); masking, for the recorded query.
pub(super) struct Records {
    audit: Arc<AuditLog>,
    masking: Arc<Masking>,
    id_prefix: String,
    next: AtomicU64,
}

impl Records {
    pub fn new(audit: Arc<AuditLog>, masking: Arc<Masking>) -> Records {
        let mut r = [0u8; 6];
        let _ = getrandom::fill(&mut r);
        Records {
            audit,
            masking,
            id_prefix: format!("req-{}", hex::encode(r)),
            next: AtomicU64::new(1),
        }
    }

    /// A request has arrived: what is known before any check.
    pub fn begin<B>(&self, req: &Request<B>, conn: &Conn) -> Exchange {
        // `req-<12 hex>-<n>`, in a buffer of its final size.
        let mut n = itoa::Buffer::new();
        let n = n.format(self.next.fetch_add(1, Ordering::Relaxed));
        let mut id = String::with_capacity(self.id_prefix.len() + 1 + n.len());
        id.push_str(&self.id_prefix);
        id.push('-');
        id.push_str(n);
        Exchange {
            audit: self.audit.clone(),
            started: Instant::now(),
            written: false,
            rec: RequestRecord {
                id,
                received_ns: util::unix_nanos(),
                conn: conn.id,
                user: None,
                origin: origin_of(conn),
                method: req.method().to_string(),
                path: req.uri().path().to_owned(),
                // An exec's command line is argv: masked like one.
                query: self.masking.mask_query(req.uri().query().unwrap_or("")),
                attributes: RequestInfo::default(),
                upgrade: super::precheck::is_upgrade(req),
                mutating: false,
                // Until a stage says otherwise.
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
                precondition: String::new(),
            },
        }
    }
}

/// A connection's last identity and its audit subject (see `Conn::audit_subject`).
#[derive(Debug)]
pub(super) struct SubjectMemo {
    id: Arc<Identity>,
    subject: Arc<Subject>,
}

/// One request's records, from its arrival to the end of its answer.
pub(super) struct Exchange {
    audit: Arc<AuditLog>,
    rec: RequestRecord,
    started: Instant,
    /// The request record is written (or its durable write was attempted).
    written: bool,
}

impl Exchange {
    pub fn admitted(&mut self, a: &Admitted) {
        self.rec.attributes = a.info.clone();
        self.rec.mutating = a.mutating;
    }

    pub fn identified(&mut self, id: Option<&Arc<Identity>>, conn: &Conn) {
        self.rec.user = id.map(|id| {
            let mut memo = conn.audit_subject.lock().unwrap_or_else(|p| p.into_inner());
            match &*memo {
                Some(m) if Arc::ptr_eq(&m.id, id) => m.subject.clone(),
                _ => {
                    let subject = Arc::new(Subject {
                        username: id.user.username.clone(),
                        groups: id.user.groups.clone(),
                        issuer: id.issuer.clone(),
                        token_id: id.token_id.clone(),
                    });
                    *memo = Some(SubjectMemo {
                        id: id.clone(),
                        subject: subject.clone(),
                    });
                    subject
                }
            }
        });
    }

    pub fn authorized(&mut self, a: &Authorized) {
        self.rec.decision = a.decision.clone();
        self.rec.rule = a.rule.clone().unwrap_or_default();
        self.rec.grant = a.grant.clone().unwrap_or_default();
        self.rec.precondition = a.precondition.clone().unwrap_or_default();
    }

    /// Whether the audit level keeps this request's body (mutations with one).
    pub fn wants_body(&self) -> bool {
        self.rec.mutating
            && self.audit.level >= AuditLevel::Request
            && matches!(
                self.rec.method.as_str(),
                "POST" | "PUT" | "PATCH" | "DELETE"
            )
    }

    /// Keeps the request body in the record, decoded from whatever encoding it came
    /// in (JSON, YAML, CBOR, protobuf) and masked like a response of its resource;
    /// a body that cannot be decoded is noted with its size, never kept raw.
    pub fn record_body(&mut self, bytes: &[u8], plan: Option<&Arc<Plan>>) {
        if bytes.is_empty() {
            return;
        }
        let masked = match plan {
            Some(plan) => mask::masked_record(bytes, &self.rec.content_type, plan),
            None => Err("no masking plan applies".to_owned()),
        };
        let v = match masked {
            Ok(masked) => body_value(&masked, self.audit.max_body_bytes),
            Err(why) => serde_json::json!({
                "omitted": format!("not recorded: {why}"),
                "bytes": bytes.len(),
            }),
        };
        self.rec.request_body = Some(v);
    }

    /// Audit before act: a mutation's record is durable before it is forwarded (or an
    /// upgraded session starts); a read is refused while the log cannot be written
    /// (if so configured).
    pub async fn record_request(&mut self) -> Result<(), Refusal> {
        self.written = true;
        if self.rec.mutating {
            return self
                .audit
                .durable(Kind::Request, &self.rec)
                .await
                .map(|_| ())
                .map_err(Refusal::AuditWriteFailed);
        }
        self.audit.record_own(Kind::Request, &self.rec);
        if !self.audit.healthy() && self.audit.fail_closed_reads {
            return Err(Refusal::AuditUnhealthy);
        }
        Ok(())
    }

    /// The gate answers itself: the refusal's Status, and the records (the request's
    /// too if it was not written yet, with the refusal's decision).
    pub fn refuse(&mut self, refusal: Refusal) -> Response<ProxyBody> {
        if let Some(w) = refusal.warning() {
            tracing::warn!(id = %self.rec.id, method = %self.rec.method, path = %self.rec.path,
                           reason = %refusal, "{w}");
        }
        if !self.written {
            if let Some(d) = refusal.decision() {
                self.rec.decision = d;
            }
            if let Some(r) = refusal.rule() {
                self.rec.rule = r.to_owned();
            }
            if let Some(a) = refusal.approval() {
                self.rec.approval = a.to_owned();
            }
            self.audit.record_own(Kind::Request, &self.rec);
            self.written = true;
        }
        let resp = refusal.response();
        self.outcome(resp.status().as_u16())
            .answered(refusal.record_error());
        resp
    }

    /// The response record to write when the answer ends.
    pub fn outcome(&self, code: u16) -> Outcome {
        Outcome {
            audit: self.audit.clone(),
            id: self.rec.id.clone(),
            code,
            started: self.started,
            capture: (self.audit.level == AuditLevel::RequestResponse)
                .then_some(self.audit.max_body_bytes),
            captured: Vec::new(),
            bytes: 0,
            on_abandon: None,
        }
    }

    /// The request's line in the daemon log, under the `portcullis::requests` target
    /// at debug level: the audit log is the record of every request, so the daemon log
    /// carries a line per request only when asked (`log.level:
    /// info,portcullis::requests=debug`). Writing it cost ~10% of the daemon's CPU per
    /// small GET (a formatted line and a `write(2)` each).
    pub fn log(&self, resp: &Response<ProxyBody>) {
        let r = &self.rec;
        let a = &r.attributes;
        debug!(
            target: "portcullis::requests",
            conn = r.conn,
            subject = r.user.as_ref().map(|u| u.username.as_str()).unwrap_or(""),
            pod_uid = %r.origin.pod_uid,
            decision = %r.decision,
            rule = %r.rule,
            approval = %r.approval,
            grant = %r.grant,
            verb = %a.verb,
            api_group = %a.api_group,
            resource = %a.resource,
            subresource = %a.subresource,
            namespace = %a.namespace,
            name = %a.name,
            path = %r.path,
            id = %r.id,
            upgrade = r.upgrade,
            code = resp.status().as_u16(),
            // Time to the response head; streamed bodies continue after this.
            head_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// The connection's origin as recorded: what the kernel saw, never what the agent said.
fn origin_of(conn: &Conn) -> Arc<Origin> {
    conn.audit_origin
        .get_or_init(|| Arc::new(make_origin(conn)))
        .clone()
}

fn make_origin(conn: &Conn) -> Origin {
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

/// An exchange's `response` record, written once when its answer ends.
pub(super) struct Outcome {
    audit: Arc<AuditLog>,
    id: String,
    code: u16,
    started: Instant,
    /// Keeps up to this many bytes of what the agent received (RequestResponse level).
    capture: Option<usize>,
    captured: Vec<u8>,
    bytes: u64,
    /// Called when the agent abandons the body before its end.
    on_abandon: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Outcome {
    pub fn on_abandon(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_abandon = Some(Box::new(f));
        self
    }

    /// Bytes on their way to the agent.
    pub fn sent(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        if let Some(max) = self.capture
            && self.captured.len() <= max
        {
            let room = (max + 1).saturating_sub(self.captured.len());
            self.captured.extend_from_slice(&b[..b.len().min(room)]);
        }
    }

    /// The body ended: delivered whole, failed (`error`), or abandoned by the agent.
    pub fn end(mut self, complete: bool, error: Option<String>) {
        if !complete
            && error.is_none()
            && let Some(f) = self.on_abandon.take()
        {
            f();
        }
        let response_body = self.capture.map(|max| body_value(&self.captured, max));
        self.write(complete, error, response_body, None);
    }

    /// The gate's own answer (no body worth keeping) was sent; `error` says what was
    /// withheld, if anything.
    pub fn answered(self, error: Option<String>) {
        self.write(error.is_none(), error, None, None);
    }

    /// The upgrade was agreed but the connections could not be switched.
    pub fn session_failed(self, error: String) {
        self.write(false, Some(error), None, None);
    }

    /// An upgraded session closed, after these bytes agent→server and server→agent.
    pub fn end_session(self, bytes: (u64, u64), error: Option<String>) {
        let mut o = self;
        o.bytes = bytes.0 + bytes.1;
        o.write(error.is_none(), error, None, Some(bytes));
    }

    fn write(
        self,
        complete: bool,
        error: Option<String>,
        response_body: Option<serde_json::Value>,
        session_bytes: Option<(u64, u64)>,
    ) {
        self.audit.record_own(
            Kind::Response,
            &ResponseRecord {
                id: self.id,
                code: self.code,
                latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
                bytes: self.bytes,
                complete,
                error,
                response_body,
                session_bytes,
            },
        );
    }
}
