//! Every way the gate answers a request itself instead of relaying the API server's
//! answer, as one type: each refusal maps, here and only here, to what the agent sees
//! (a metav1.Status: HTTP code, reason, message) and to what the audit log records
//! (the decision, the deciding rule, the approval).
use http::{HeaderValue, Response, StatusCode, header};

use crate::{
    approvals::StoreError,
    audit::{AuditUnavailable, Decision},
    identity::AuthError,
    k8s::{Attributes, PreconditionError, RequestInfoError, Status, StatusCause, StatusDetails},
    mask::Unmaskable,
    upstream::{SendError, UpstreamError},
    util::{ProxyBody, source_chain},
};

/// Why the gate did not relay a request, with what the agent is told.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    // ---- prechecks ----
    /// The kernel has no record of the connection: someone dialled the daemon.
    #[error(
        "Portcullis serves only connections the kernel redirected from an enrolled agent; this one was made to the daemon's address directly"
    )]
    Unredirected,
    #[error("the request head is {bytes} bytes; the limit is {limit}")]
    HeadTooLarge { bytes: usize, limit: usize },
    /// Both framings at once: the request-smuggling pattern (RFC 9112 6.3).
    #[error("a request may not carry both Content-Length and Transfer-Encoding")]
    BothFramings,
    #[error(transparent)]
    Unresolvable(#[from] RequestInfoError),
    /// The connection went over its cancel budget (HTTP/2 rapid reset) and is being
    /// closed: nothing more on it is forwarded.
    #[error(
        "Portcullis: this connection cancelled too many requests and is being closed; open a new connection"
    )]
    ConnectionClosing,

    // ---- identity and policy ----
    #[error("Portcullis: no bearer token in the request")]
    NoToken,
    #[error("Portcullis: {0}")]
    BadToken(#[source] AuthError),
    #[error("Portcullis policy {policy} maps no upstream identity for {user}")]
    Unmapped { policy: String, user: String },
    #[error("Portcullis policy denies {attrs} for {user}: {message}")]
    Denied {
        attrs: Box<Attributes>,
        user: String,
        message: String,
        /// `None`: no rule matched.
        rule: Option<String>,
    },
    #[error(
        "Portcullis: {attrs} needs approval ({message}); approval {approval} is pending. An approver runs `portcullis approvals approve {approval}`; retry after that."
    )]
    Pending {
        attrs: Box<Attributes>,
        message: String,
        approval: String,
        rule: String,
    },
    #[error("Portcullis: approval {approval} for {attrs} was denied by {by}: {reason}")]
    ApprovalDenied {
        attrs: Box<Attributes>,
        approval: String,
        by: String,
        reason: String,
        rule: String,
    },
    #[error(
        "Portcullis: approval {approval} for {attrs} expired undecided; retry to request a new one"
    )]
    ApprovalExpired {
        attrs: Box<Attributes>,
        approval: String,
        rule: String,
    },
    #[error(
        "Portcullis: {user} already has {pending} approvals waiting; no new one is opened until some are decided or expire"
    )]
    TooManyPending {
        user: String,
        pending: usize,
        rule: String,
    },
    #[error("Portcullis cannot record the approval request: {source}")]
    ApprovalsUnavailable {
        rule: String,
        #[source]
        source: StoreError,
    },
    /// The API server refused the dry run of the request (what the policy's
    /// conditions would have read): the request itself would fare the same.
    #[error(
        "Portcullis decides this request on its effect, and the API server's dry run of it answered {}: {message}",
        code.as_u16()
    )]
    DryRunRefused { code: StatusCode, message: String },
    #[error("Portcullis cannot obtain what this request would change from the API server: {0}")]
    EffectUnavailable(#[source] UpstreamError),
    /// The write must carry the checked version, and its body cannot say it.
    #[error("Portcullis: {0}")]
    NoPrecondition(#[source] PreconditionError),

    /// The agent's share of in-flight requests is used up (`proxy.limits`).
    #[error(
        "Portcullis: this agent already has {cap} requests in flight (proxy.limits.max_requests_per_agent); retry when some have finished"
    )]
    AgentBusy { cap: usize },

    // ---- forwarding ----
    #[error("reading the request body: {why}")]
    BodyUnreadable { too_large: bool, why: String },
    /// A mutation's record could not be made durable.
    #[error("Portcullis cannot record this request in its audit log, so it is not forwarded: {0}")]
    AuditWriteFailed(#[source] AuditUnavailable),
    /// A read while the log is failing (`audit.fail_closed_reads`).
    #[error(
        "Portcullis cannot record this request in its audit log, so it is not forwarded: the last audit write failed (reads are refused too: audit.fail_closed_reads)"
    )]
    AuditUnhealthy,
    #[error("Portcullis cannot present its credential to the API server: {0}")]
    Credential(#[source] UpstreamError),
    #[error(
        "Portcullis cannot reach the Kubernetes API server at {base}: {}",
        source_chain(error.as_ref())
    )]
    UpstreamUnreachable { base: String, error: Box<SendError> },
    #[error(
        "the request to the Kubernetes API server at {base} failed: {}",
        source_chain(error.as_ref())
    )]
    UpstreamFailed { base: String, error: Box<SendError> },
    #[error("Portcullis: {0}")]
    Unmaskable(#[source] Unmaskable),
    /// A write whose body carries a masking placeholder: forwarding it would store the
    /// placeholder over the real value.
    #[error(
        "Portcullis refuses {attrs}: the request body carries a masking placeholder at {field}. Portcullis masked that value when it was read, and writing the placeholder back would replace the real value. Send the real value or leave the field out (apply a manifest rather than the output of `get -o yaml`; `replace` and `edit --save-config` send back what was read, and editing a partly masked string sends its placeholder along)"
    )]
    PlaceholderWriteBack {
        attrs: Box<Attributes>,
        field: String,
    },
    /// A compressed request body: the gate cannot check it (and the API server does
    /// not take one).
    #[error(
        "Portcullis cannot inspect a request body with Content-Encoding {0}; send it uncompressed"
    )]
    EncodedRequestBody(String),
}

impl Refusal {
    /// The HTTP status the agent gets (and the Status `code` and `reason`).
    pub fn code(&self) -> StatusCode {
        use Refusal::*;
        match self {
            Unredirected | Unmapped { .. } | Denied { .. } | Pending { .. } => {
                StatusCode::FORBIDDEN
            }
            ApprovalDenied { .. } | ApprovalExpired { .. } => StatusCode::FORBIDDEN,
            HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BothFramings | Unresolvable(_) => StatusCode::BAD_REQUEST,
            // The token could not be checked: an outage, not the agent's fault.
            BadToken(AuthError::ReviewUnavailable(_) | AuthError::ReviewUnreachable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            NoToken | BadToken(_) => StatusCode::UNAUTHORIZED,
            TooManyPending { .. } | ConnectionClosing | AgentBusy { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApprovalsUnavailable { .. }
            | AuditWriteFailed(_)
            | AuditUnhealthy
            | EffectUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            DryRunRefused { code, .. } => *code,
            NoPrecondition(PreconditionError::Encoding(_)) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            NoPrecondition(PreconditionError::Invalid { .. }) => StatusCode::BAD_REQUEST,
            BodyUnreadable { too_large, .. } => {
                if *too_large {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                }
            }
            Credential(_) => StatusCode::INTERNAL_SERVER_ERROR,
            PlaceholderWriteBack { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            EncodedRequestBody(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            UpstreamUnreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamFailed { .. } | Unmaskable(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The decision recorded for a request refused before it was authorized; `None`
    /// for refusals after authorization (the recorded decision stays what it was).
    pub fn decision(&self) -> Option<Decision> {
        use Refusal::*;
        Some(match self {
            Unredirected
            | HeadTooLarge { .. }
            | BothFramings
            | Unresolvable(_)
            | ConnectionClosing
            | AgentBusy { .. } => Decision::Refused,
            NoToken | BadToken(_) => Decision::Unauthenticated,
            Unmapped { .. } => Decision::Unmapped,
            Denied { .. } => Decision::Deny,
            Pending { .. } => Decision::Held,
            ApprovalDenied { .. } => Decision::Denied,
            ApprovalExpired { .. } => Decision::Expired,
            TooManyPending { .. } => Decision::TooManyPending,
            ApprovalsUnavailable { .. }
            | DryRunRefused { .. }
            | EffectUnavailable(_)
            | NoPrecondition(_) => Decision::Refused,
            // The gate stopped what policy allowed: not forwarded, never replayed.
            PlaceholderWriteBack { .. } | EncodedRequestBody(_) => Decision::Refused,
            BodyUnreadable { .. }
            | AuditWriteFailed(_)
            | AuditUnhealthy
            | Credential(_)
            | UpstreamUnreachable { .. }
            | UpstreamFailed { .. }
            | Unmaskable(_) => return None,
        })
    }

    /// The policy rule that decided, for the record.
    pub fn rule(&self) -> Option<&str> {
        use Refusal::*;
        match self {
            Denied { rule, .. } => rule.as_deref(),
            Pending { rule, .. }
            | ApprovalDenied { rule, .. }
            | ApprovalExpired { rule, .. }
            | TooManyPending { rule, .. }
            | ApprovalsUnavailable { rule, .. } => Some(rule),
            _ => None,
        }
    }

    /// The approval the request waits or waited for, for the record.
    pub fn approval(&self) -> Option<&str> {
        use Refusal::*;
        match self {
            Pending { approval, .. }
            | ApprovalDenied { approval, .. }
            | ApprovalExpired { approval, .. } => Some(approval),
            _ => None,
        }
    }

    /// The error the response record carries: set when the API server's answer
    /// was withheld.
    pub fn record_error(&self) -> Option<String> {
        match self {
            Refusal::Unmaskable(why) => Some(why.to_string()),
            Refusal::PlaceholderWriteBack { field, .. } => {
                Some(format!("masking placeholder written back at {field}"))
            }
            _ => None,
        }
    }

    /// The agent's connection is closed after this answer (the framing of whatever
    /// follows cannot be trusted).
    fn closes(&self) -> bool {
        matches!(self, Refusal::HeadTooLarge { .. } | Refusal::BothFramings)
    }

    /// The warning the daemon logs for a refusal worth an operator's attention (an
    /// attack, a misconfiguration, an outage); `None` for the everyday ones, which the
    /// request's own log line shows.
    pub fn warning(&self) -> Option<&'static str> {
        use Refusal::*;
        Some(match self {
            Unredirected => "refused: connection was not redirected by the kernel",
            AgentBusy { .. } => "refused: agent over its share of in-flight requests",
            HeadTooLarge { .. } => "refused: request head too large",
            BothFramings => "refused: both Content-Length and Transfer-Encoding",
            NoToken | BadToken(_) => "refused: agent identity",
            ApprovalsUnavailable { .. } => "approval store unavailable",
            EffectUnavailable(_) => "the request's effect could not be obtained",
            AuditWriteFailed(_) | AuditUnhealthy => "refused: the audit log cannot be written",
            Credential(_) => "daemon credential unavailable",
            UpstreamUnreachable { .. } => "API server unreachable",
            UpstreamFailed { .. } => "API server request failed",
            Unmaskable(_) => "refused: response cannot be masked",
            PlaceholderWriteBack { .. } => "refused: a masking placeholder written back",
            EncodedRequestBody(_) => "refused: compressed request body",
            Unresolvable(_)
            | ConnectionClosing
            | Unmapped { .. }
            | Denied { .. }
            | Pending { .. }
            | ApprovalDenied { .. }
            | ApprovalExpired { .. }
            | TooManyPending { .. }
            | DryRunRefused { .. }
            | NoPrecondition(_)
            | BodyUnreadable { .. } => return None,
        })
    }

    /// The fields at fault, for a Status kubectl shows field by field.
    fn details(&self) -> Option<StatusDetails> {
        match self {
            Refusal::PlaceholderWriteBack { attrs, field } => Some(StatusDetails {
                name: attrs.name.clone(),
                group: attrs.api_group.clone(),
                kind: attrs.resource.clone(),
                causes: vec![StatusCause {
                    reason: "FieldValueInvalid".into(),
                    message: self.to_string(),
                    field: field.clone(),
                }],
            }),
            _ => None,
        }
    }

    /// The answer: a metav1.Status.
    pub fn response(&self) -> Response<ProxyBody> {
        let mut status = Status::failure(self.code(), self.to_string());
        if let Some(d) = self.details() {
            status = status.with_details(d);
        }
        let mut r = status.response();
        if self.closes() {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> Attributes {
        Attributes {
            verb: "delete".into(),
            api_group: "apps".into(),
            resource: "deployments".into(),
            subresource: String::new(),
            namespace: "prod".into(),
            name: "web".into(),
            path: String::new(),
        }
    }

    /// The texts agents, users and the e2e tier read, unchanged.
    #[test]
    fn messages_codes_and_decisions() {
        let cases: Vec<(Refusal, u16, &str, &str)> = vec![
            (
                Refusal::Pending {
                    attrs: Box::new(attrs()),
                    message: "m".into(),
                    approval: "apr-1".into(),
                    rule: "r".into(),
                },
                403,
                "held",
                "Portcullis: delete deployments.apps web in prod needs approval (m); approval apr-1 is pending. An approver runs `portcullis approvals approve apr-1`; retry after that.",
            ),
            (
                Refusal::ApprovalDenied {
                    attrs: Box::new(attrs()),
                    approval: "apr-1".into(),
                    by: "bob".into(),
                    reason: "no".into(),
                    rule: "r".into(),
                },
                403,
                "denied",
                "Portcullis: approval apr-1 for delete deployments.apps web in prod was denied by bob: no",
            ),
            (
                Refusal::TooManyPending {
                    user: "u".into(),
                    pending: 20,
                    rule: "r".into(),
                },
                429,
                "too-many-pending",
                "Portcullis: u already has 20 approvals waiting; no new one is opened until some are decided or expire",
            ),
            (
                Refusal::HeadTooLarge {
                    bytes: 9000,
                    limit: 8192,
                },
                431,
                "refused",
                "the request head is 9000 bytes; the limit is 8192",
            ),
            (
                Refusal::AuditUnhealthy,
                503,
                "",
                "Portcullis cannot record this request in its audit log, so it is not forwarded: the last audit write failed (reads are refused too: audit.fail_closed_reads)",
            ),
        ];
        for (r, code, decision, message) in cases {
            assert_eq!(r.code().as_u16(), code, "{r:?}");
            assert_eq!(
                r.decision().map(|d| d.to_string()).unwrap_or_default(),
                decision
            );
            assert_eq!(r.to_string(), message);
        }
        let r = Refusal::BothFramings.response();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["connection"], "close");
        assert!(
            !Refusal::NoToken
                .response()
                .headers()
                .contains_key("connection")
        );
    }
}
