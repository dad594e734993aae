//! The admin API's calls, and who may make them: every call needs an authenticated
//! approver (root on the node socket, or a remote caller with a token from a
//! configured issuer in an approver group).
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use super::{Admin, Caller};
use crate::{
    approvals::{Approver, DecideError},
    k8s::UserInfo,
};

pub(super) type Body = Full<Bytes>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(default)]
    justification: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    /// Local callers: the human on whose behalf root acts (recorded).
    #[serde(default, rename = "as")]
    as_name: Option<String>,
}

/// Answers are read by people (the CLI prints them, consoles show them): every string
/// in them is escaped for display.
fn reply(code: StatusCode, mut v: serde_json::Value) -> Response<Body> {
    crate::util::escape_json(&mut v);
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&v).unwrap_or_default(),
    )));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(code: StatusCode, msg: impl std::fmt::Display) -> Response<Body> {
    reply(
        code,
        json!({"error": msg.to_string(), "code": code.as_u16()}),
    )
}

fn decide_error(e: DecideError) -> Response<Body> {
    let code = match &e {
        DecideError::NotFound(_) => StatusCode::NOT_FOUND,
        DecideError::NotPending { .. } => StatusCode::CONFLICT,
        DecideError::SelfApproval { .. } | DecideError::NotApprover { .. } => StatusCode::FORBIDDEN,
        DecideError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, e)
}

impl Admin {
    pub(super) async fn handle(&self, caller: Caller, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (head, body) = req.into_parts();
        let body = match Limited::new(body, 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
        };
        let decide: DecideBody = if body.is_empty() {
            DecideBody::default()
        } else {
            match serde_json::from_slice(&body) {
                Ok(b) => b,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
            }
        };
        // Every call, reads included, needs an authenticated approver.
        let approver = match self
            .approver_head(&caller, &head.headers, decide.as_name.clone())
            .await
        {
            Ok(a) => a,
            Err(r) => return r,
        };
        let resp = match (&method, parts.as_slice()) {
            (&Method::GET, ["v1", "approvals"]) => {
                reply(StatusCode::OK, json!(self.approvals.list()))
            }
            (&Method::GET, ["v1", "approvals", id]) => match self.approvals.get(id) {
                Some(a) => reply(StatusCode::OK, json!(a)),
                None => error(StatusCode::NOT_FOUND, format!("no approval {id}")),
            },
            (&Method::POST, ["v1", "approvals", id, "approve"]) => {
                match self.approvals.approve(id, &approver, decide.justification) {
                    Ok((a, g)) => reply(StatusCode::OK, json!({"approval": a, "grant": g})),
                    Err(e) => decide_error(e),
                }
            }
            (&Method::POST, ["v1", "approvals", id, "deny"]) => {
                let reason = decide.reason.unwrap_or_default();
                if reason.trim().is_empty() {
                    return error(StatusCode::BAD_REQUEST, "a denial needs a reason");
                }
                match self.approvals.deny(id, &approver, reason) {
                    Ok(a) => reply(StatusCode::OK, json!({"approval": a})),
                    Err(e) => decide_error(e),
                }
            }
            (&Method::GET, ["v1", "grants"]) => {
                let t = crate::util::unix_secs();
                let v: Vec<serde_json::Value> = self
                    .approvals
                    .grants()
                    .into_iter()
                    .map(|g| {
                        let mut v = json!(g);
                        v["status"] = json!(g.status(t));
                        v
                    })
                    .collect();
                reply(StatusCode::OK, json!(v))
            }
            (&Method::POST, ["v1", "grants", id, "revoke"]) => {
                match self.approvals.revoke(id, &approver) {
                    Ok(g) => reply(StatusCode::OK, json!({"grant": g})),
                    Err(e) => decide_error(e),
                }
            }
            (&Method::GET, ["v1", "policy"]) => reply(
                StatusCode::OK,
                json!({"name": self.policy.get().name, "lastError": self.policy.last_error()}),
            ),
            _ => error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
        };
        let from = match &caller {
            Caller::Local { uid } => format!("socket uid {uid}"),
            Caller::Remote { peer } => peer.to_string(),
        };
        info!(%method, %path, %from, approver = %approver.user.username, code = resp.status().as_u16(), "admin request");
        resp
    }

    async fn approver_head(
        &self,
        caller: &Caller,
        headers: &http::HeaderMap,
        as_name: Option<String>,
    ) -> Result<Approver, Response<Body>> {
        match caller {
            Caller::Local { uid } => Ok(Approver {
                user: UserInfo {
                    username: as_name.unwrap_or_else(|| format!("node-admin:uid-{uid}")),
                    groups: Vec::new(),
                },
                issuer: String::new(),
                subject: String::new(),
                node_admin: true,
            }),
            Caller::Remote { .. } => {
                let token = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "a bearer token is required"))?;
                let id = self
                    .authenticator
                    .authenticate(token.trim(), None)
                    .await
                    .map_err(|e| error(StatusCode::UNAUTHORIZED, e))?;
                if !id
                    .user
                    .groups
                    .iter()
                    .any(|g| self.approver_groups.contains(g))
                {
                    return Err(error(
                        StatusCode::FORBIDDEN,
                        format!(
                            "{} is not in an approver group ({:?})",
                            id.user.username, self.approver_groups
                        ),
                    ));
                }
                if as_name.as_ref().is_some_and(|n| *n != id.user.username) {
                    return Err(error(
                        StatusCode::FORBIDDEN,
                        "remote callers act as themselves (`as` is for the node socket)",
                    ));
                }
                Ok(Approver {
                    user: id.user.clone(),
                    issuer: id.issuer.clone(),
                    subject: id.subject.clone(),
                    node_admin: false,
                })
            }
        }
    }
}
