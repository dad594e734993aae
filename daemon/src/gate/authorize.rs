//! Who the request is from, then what it may do: in gated mode the agent's token
//! (bound to the pod whose cgroup opened the connection), the subject's upstream
//! identity, the policy's decision and, where the policy asks for one, a human's
//! approval; in pass-through mode every enrolled agent acts as one identity.
use std::{sync::Arc, time::Duration};

use http::{Request, header};

use bytes::Bytes;

use super::{
    Admitted, Conn, Refusal,
    effect::{self, Wire},
};
use crate::{
    approvals::{Approvals, Held},
    audit::Decision,
    identity::{Authenticator, Identity},
    k8s::{self, Attributes, RequestScope},
    kernel::ConnOrigin,
    policy::{self, Action, ApprovalSpec, PolicyHandle},
    upstream::{Impersonation, Upstream},
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
    /// Gated: the identity of a verified token, on its connection.
    Identified {
        id: Arc<Identity>,
        gated: &'a Gated,
        conn: &'a Conn,
    },
}

/// A connection's last identity, the policy it was mapped under, and the upstream
/// impersonation that made (see `Conn::impersonation`).
#[derive(Debug)]
pub(super) struct ImpersonationMemo {
    id: Arc<Identity>,
    policy: Arc<policy::Policy>,
    impersonate: Impersonation,
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
    /// The body to forward instead of the agent's: the same request, conditional on
    /// the version of the object the decision read.
    pub body: Option<Bytes>,
    /// That version (the write's resourceVersion precondition).
    pub precondition: Option<String>,
}

impl Authorizer {
    /// The pod whose cgroup opened a connection (gated mode binds tokens to it).
    pub(super) fn pod_of(&self, origin: &ConnOrigin) -> Option<PodRef> {
        match self {
            Authorizer::PassThrough(_) => None,
            Authorizer::Gated(g) => g.pods.resolve(origin.origin.cgroup_id),
        }
    }

    pub(super) async fn authenticate<'a, B>(
        &'a self,
        req: &Request<B>,
        conn: &'a Conn,
    ) -> Result<Caller<'a>, Refusal> {
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
        Ok(Caller::Identified { id, gated, conn })
    }
}

impl Caller<'_> {
    pub fn identity(&self) -> Option<&Arc<Identity>> {
        match self {
            Caller::Agent(_) => None,
            Caller::Identified { id, .. } => Some(id),
        }
    }

    pub(super) async fn authorize(
        self,
        admitted: &Admitted,
        wire: &Wire<'_>,
        upstream: &Upstream,
    ) -> Result<Authorized, Refusal> {
        let (id, gated, conn) = match self {
            Caller::Agent(imp) => {
                return Ok(Authorized {
                    impersonate: imp.clone(),
                    decision: Decision::PassThrough,
                    rule: None,
                    grant: None,
                    body: None,
                    precondition: None,
                });
            }
            Caller::Identified { id, gated, conn } => (id, gated, conn),
        };
        let policy = gated.policy.get();
        // Before any decision: a subject with no upstream identity can never proceed,
        // so nobody is asked to approve its requests.
        let impersonate = impersonation(conn, &id, &policy).ok_or_else(|| Refusal::Unmapped {
            policy: policy.name.clone(),
            user: id.user.username.clone(),
        })?;
        let info = &admitted.info;
        let pod = id.kernel_pod.as_ref().or(id.token_pod.as_ref());
        let request = policy::Request {
            user: &id.user,
            info,
            query: wire.query,
            create_name: (info.verb == "create" && info.subresource.is_empty())
                .then(|| k8s::parse_body(wire.content_type, wire.body))
                .flatten()
                .and_then(|v| v["metadata"]["name"].as_str().map(str::to_owned)),
            pod,
        };
        // Only what a rule that could decide reads is fetched (most requests: nothing).
        let needs = policy.needs(&request);
        let effect = if needs.any() {
            // Boxed: rare, and large (see `Gate::pass`).
            Box::pin(effect::obtain(upstream, &impersonate, wire, info, needs)).await?
        } else {
            effect::Effect::default()
        };
        let d = policy.decide(
            &request,
            &request.inputs(
                effect.object.as_ref(),
                effect.old_object.as_ref(),
                effect.missing.clone(),
            ),
        );
        let body = effect::conditional_body(wire, info, &effect)?;
        let precondition = body.as_ref().and(effect.resource_version.clone());
        let rule = match (d.action, d.rule) {
            (Action::Deny, rule) => {
                return Err(Refusal::Denied {
                    attrs: Box::new(Attributes::from(info)),
                    user: id.user.username.clone(),
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
                    body,
                    precondition,
                });
            }
            (Action::Approve, rule) => rule.unwrap_or_default(),
        };
        let attrs = Box::new(Attributes::from(info));
        let spec = d.approval.unwrap_or_else(|| ApprovalSpec {
            approvers: Vec::new(),
            hold: Duration::ZERO,
            grant_ttl: Duration::from_secs(60),
        });
        // The grant covers exactly this request: method, path, query, body, pod.
        let scope = RequestScope::new(
            wire.method.as_str(),
            wire.path,
            wire.query,
            wire.content_type,
            wire.body,
            pod.map(|p| p.uid.as_str()).unwrap_or(""),
        );
        let held = gated
            .approvals
            .hold(&id, &attrs, &scope, &rule, &d.message, &spec)
            .await;
        match held {
            Ok(Held::Granted { grant_id }) => Ok(Authorized {
                impersonate,
                decision: Decision::Approved,
                rule: Some(rule),
                grant: Some(grant_id),
                body,
                precondition,
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
                user: id.user.username.clone(),
                pending,
                rule,
            }),
            Err(source) => Err(Refusal::ApprovalsUnavailable { rule, source }),
        }
    }
}

/// The upstream identity `id` is impersonated as under `policy` (None: the policy maps
/// it to none), made once per connection, identity and policy.
pub(super) fn impersonation(
    conn: &Conn,
    id: &Arc<Identity>,
    policy: &Arc<policy::Policy>,
) -> Option<Impersonation> {
    let mut memo = conn.impersonation.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = &*memo
        && Arc::ptr_eq(&m.id, id)
        && Arc::ptr_eq(&m.policy, policy)
    {
        return Some(m.impersonate.clone());
    }
    let scoped = policy.scoped_identity(&id.user)?;
    let impersonate = Impersonation::new(&scoped.user, &scoped.groups);
    *memo = Some(ImpersonationMemo {
        id: id.clone(),
        policy: policy.clone(),
        impersonate: impersonate.clone(),
    });
    Some(impersonate)
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
