//! Who the request is from, then what it may do: in gated mode the agent's token
//! (bound to the pod whose cgroup opened the connection), the subject's upstream
//! identity, the policy's decision and, where the policy asks for one, a human's
//! approval; in pass-through mode every enrolled agent acts as one identity.
use std::{sync::Arc, time::Duration};

use http::{Request, header};

use super::{Admitted, Conn, Refusal};
use crate::{
    approvals::{Approvals, Held},
    audit::Decision,
    identity::{Authenticator, Identity},
    k8s::Attributes,
    kernel::ConnOrigin,
    policy::{Action, ApprovalSpec, PolicyHandle},
    upstream::Impersonation,
    {k8s::PodRef, kernel::PodResolver},
};

/// How requests are authorized.
pub enum Authorizer {
    /// Every enrolled agent acts as one scoped identity (no token checks, no policy).
    PassThrough(Impersonation),
    /// Each request: the agent's token, bound to its pod; the policy's decision; the
    /// subject's scoped identity upstream.
    Gated(Gated),
}

/// What gated mode decides with.
pub struct Gated {
    pub authn: Arc<Authenticator>,
    pub policy: Arc<PolicyHandle>,
    pub approvals: Arc<Approvals>,
    pub pods: Arc<PodResolver>,
}

/// Who a request is from, as far as the mode asks.
pub enum Caller<'a> {
    /// Pass-through: any enrolled agent, as the configured identity.
    Agent(&'a Impersonation),
    /// Gated: the identity of a verified token.
    Identified { id: Box<Identity>, gated: &'a Gated },
}

/// A request the gate lets through, and why.
pub struct Authorized {
    /// The upstream identity it is sent as.
    pub impersonate: Impersonation,
    /// `pass-through`, `allow` or `approved`.
    pub decision: Decision,
    /// The policy rule that allowed it.
    pub rule: Option<String>,
    /// The grant an approval created, when it passed on one.
    pub grant: Option<String>,
}

impl Authorizer {
    /// The pod whose cgroup opened a connection (gated mode binds tokens to it).
    pub(super) fn pod_of(&self, origin: &ConnOrigin) -> Option<PodRef> {
        match self {
            Authorizer::PassThrough(_) => None,
            Authorizer::Gated(g) => g.pods.resolve(origin.origin.cgroup_id),
        }
    }

    pub(super) async fn authenticate<B>(
        &self,
        req: &Request<B>,
        conn: &Conn,
    ) -> Result<Caller<'_>, Refusal> {
        let gated = match self {
            Authorizer::PassThrough(imp) => return Ok(Caller::Agent(imp)),
            Authorizer::Gated(g) => g,
        };
        let token = bearer(req).ok_or(Refusal::NoToken)?;
        let id = gated
            .authn
            .authenticate(token, conn.kernel_pod.as_ref())
            .await
            .map_err(Refusal::BadToken)?;
        Ok(Caller::Identified {
            id: Box::new(id),
            gated,
        })
    }
}

impl Caller<'_> {
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::Agent(_) => None,
            Caller::Identified { id, .. } => Some(id),
        }
    }

    pub(super) async fn authorize(self, admitted: &Admitted) -> Result<Authorized, Refusal> {
        let (id, gated) = match self {
            Caller::Agent(imp) => {
                return Ok(Authorized {
                    impersonate: imp.clone(),
                    decision: Decision::PassThrough,
                    rule: None,
                    grant: None,
                });
            }
            Caller::Identified { id, gated } => (*id, gated),
        };
        let policy = gated.policy.get();
        // Before any decision: a subject with no upstream identity can never proceed,
        // so nobody is asked to approve its requests.
        let Some(scoped) = policy.scoped_identity(&id.user) else {
            return Err(Refusal::Unmapped {
                policy: policy.name.clone(),
                user: id.user.username,
            });
        };
        let impersonate = Impersonation::new(&scoped.user, &scoped.groups);
        let d = policy.decide_plain(&id.user, &admitted.info);
        let attrs = Box::new(Attributes::from(&admitted.info));
        let rule = match (d.action, d.rule) {
            (Action::Deny, rule) => {
                return Err(Refusal::Denied {
                    attrs,
                    user: id.user.username,
                    message: d.message,
                    rule,
                });
            }
            (Action::Allow, rule) => {
                return Ok(Authorized {
                    impersonate,
                    decision: Decision::Allow,
                    rule,
                    grant: None,
                });
            }
            (Action::Approve, rule) => rule.unwrap_or_default(),
        };
        let spec = d.approval.unwrap_or_else(|| ApprovalSpec {
            approvers: Vec::new(),
            hold: Duration::ZERO,
            grant_ttl: Duration::from_secs(60),
        });
        let held = gated
            .approvals
            .hold(&id, &attrs, &rule, &d.message, &spec)
            .await;
        match held {
            Ok(Held::Granted { grant_id }) => Ok(Authorized {
                impersonate,
                decision: Decision::Approved,
                rule: Some(rule),
                grant: Some(grant_id),
            }),
            Ok(Held::Pending { approval_id }) => Err(Refusal::Pending {
                attrs,
                message: d.message,
                approval: approval_id,
                rule,
            }),
            Ok(Held::Denied {
                approval_id,
                by,
                reason,
            }) => Err(Refusal::ApprovalDenied {
                attrs,
                approval: approval_id,
                by,
                reason,
                rule,
            }),
            Ok(Held::Expired { approval_id }) => Err(Refusal::ApprovalExpired {
                attrs,
                approval: approval_id,
                rule,
            }),
            Ok(Held::TooMany { pending }) => Err(Refusal::TooManyPending {
                user: id.user.username,
                pending,
                rule,
            }),
            Err(source) => Err(Refusal::ApprovalsUnavailable { rule, source }),
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
