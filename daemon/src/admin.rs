//! The admin API for approvals and grants: a unix socket on the node (root only, by
//! peer credentials) and, optionally, HTTPS for remote approvers who present an OIDC
//! token from a configured issuer and belong to an approver group.
//!
//! ```text
//! GET  /v1/approvals            GET  /v1/approvals/{id}
//! POST /v1/approvals/{id}/approve {"justification": "...", "as": "name"}
//! POST /v1/approvals/{id}/deny    {"reason": "...", "as": "name"}
//! GET  /v1/grants               POST /v1/grants/{id}/revoke {"as": "name"}
//! GET  /v1/policy
//! ```
use std::{
    convert::Infallible, net::SocketAddr, os::unix::fs::PermissionsExt, path::Path, sync::Arc,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, info, warn};

use crate::{
    approvals::{Approvals, Approver, DecideError},
    ca::LeafMinter,
    identity::Authenticator,
    policy::PolicyHandle,
};

type Body = Full<Bytes>;

pub struct Admin {
    pub approvals: Arc<Approvals>,
    pub policy: Arc<PolicyHandle>,
    pub authenticator: Arc<Authenticator>,
    pub approver_groups: Vec<String>,
}

/// Who is calling, before any request is read.
#[derive(Clone)]
enum Caller {
    /// A local process; `uid` from SO_PEERCRED.
    Local {
        uid: u32,
    },
    Remote {
        peer: SocketAddr,
    },
}

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

fn reply(code: StatusCode, v: serde_json::Value) -> Response<Body> {
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
    async fn handle(&self, caller: Caller, req: Request<Incoming>) -> Response<Body> {
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
        info!(%method, %path, %from, approver = %approver.username, code = resp.status().as_u16(), "admin request");
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
                username: as_name.unwrap_or_else(|| format!("node-admin:uid-{uid}")),
                groups: Vec::new(),
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
                if !id.groups.iter().any(|g| self.approver_groups.contains(g)) {
                    return Err(error(
                        StatusCode::FORBIDDEN,
                        format!(
                            "{} is not in an approver group ({:?})",
                            id.username, self.approver_groups
                        ),
                    ));
                }
                if as_name.as_ref().is_some_and(|n| *n != id.username) {
                    return Err(error(
                        StatusCode::FORBIDDEN,
                        "remote callers act as themselves (`as` is for the node socket)",
                    ));
                }
                Ok(Approver {
                    username: id.username,
                    groups: id.groups,
                    node_admin: false,
                })
            }
        }
    }
}

/// Serves the node socket: mode 0600 in the 0700 state directory, and each peer's uid
/// checked (root or the daemon's own user).
pub async fn serve_unix(admin: Arc<Admin>, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "admin API listening");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                warn!(error = %e, "admin peer credentials unavailable; refused");
                continue;
            }
        };
        if uid != 0 && uid != me {
            warn!(uid, "admin socket: refused a non-root caller");
            continue;
        }
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(Caller::Local { uid }, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
}

/// Serves remote approvers over HTTPS, with a leaf from the interception CA.
pub async fn serve_https(admin: Arc<Admin>, listener: TcpListener, minter: Arc<LeafMinter>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (admin, minter) = (admin.clone(), minter.clone());
        // The leaf names the address dialled too (approvers may use an IP).
        let local_ip = stream.local_addr().ok().map(|a| a.ip());
        tokio::spawn(async move {
            let tls = async {
                let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                    .await
                    .ok()?;
                let sni = start.client_hello().server_name().map(str::to_owned);
                let cfg = minter.server_config(sni.as_deref(), local_ip).ok()?;
                start.into_stream(cfg).await.ok()
            };
            let Ok(Some(tls)) = tokio::time::timeout(std::time::Duration::from_secs(10), tls).await
            else {
                debug!(%peer, "admin TLS handshake failed");
                return;
            };
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(Caller::Remote { peer }, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
}
