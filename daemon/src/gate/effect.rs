//! What a request would do, for policy conditions that read it: the object as stored
//! (`oldObject`: a GET) and the object as the request would leave it (`object`: the
//! API server's dry run of the very same request, `dryRun=All`), both fetched as the
//! subject's scoped identity, so RBAC and admission see what the real request would.
//! Deciding on the dry run's result rather than on the body means a patch is judged by
//! what it makes of the stored object, whatever its encoding (JSON, merge, strategic,
//! apply, protobuf creates).
//!
//! The decision holds for the version of the object it was made on: the write is then
//! sent with that resourceVersion as a precondition (see `k8s::with_resource_version`),
//! so a change by someone else between the check and the write makes the API server
//! answer 409 Conflict instead of applying the checked request to an unchecked object.
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

use super::Refusal;
use crate::{
    k8s::{self, RequestInfo},
    policy::Needs,
    upstream::{Call, Impersonation, Upstream},
};

/// Largest object read back (the API server's request limit; etcd's is lower).
const MAX_OBJECT: usize = 4 << 20;

/// The request as it arrived.
pub(super) struct Wire<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub content_type: &'a str,
    pub body: &'a Bytes,
}

/// What the gate obtained for the conditions.
#[derive(Debug, Default)]
pub(super) struct Effect {
    pub object: Option<Value>,
    pub old_object: Option<Value>,
    /// Why something the conditions read could not be obtained.
    pub missing: Option<String>,
    /// The version of the object the decision was made on, for the write's
    /// precondition (updates, patches and deletes of an existing object).
    pub resource_version: Option<String>,
}

/// Subresources created on an object (sessions and actions on it): their
/// `oldObject` is the object itself.
const ON_OBJECT: &[&str] = &[
    "exec",
    "attach",
    "portforward",
    "proxy",
    "eviction",
    "binding",
    "token",
];

fn object_path(info: &RequestInfo, with_subresource: bool) -> String {
    let mut p = format!("/{}", info.api_prefix);
    if !info.api_group.is_empty() {
        p.push('/');
        p.push_str(&info.api_group);
    }
    p.push('/');
    p.push_str(&info.api_version);
    if !info.namespace.is_empty() && info.resource != "namespaces" {
        p.push_str("/namespaces/");
        p.push_str(&info.namespace);
    }
    p.push('/');
    p.push_str(&info.resource);
    p.push('/');
    p.push_str(&info.name);
    if with_subresource && !info.subresource.is_empty() {
        p.push('/');
        p.push_str(&info.subresource);
    }
    p
}

/// Where `oldObject` is read from, if the request acts on an existing object.
fn old_object_path(info: &RequestInfo) -> Option<String> {
    if !info.is_resource_request || info.name.is_empty() {
        return None;
    }
    if ON_OBJECT.contains(&info.subresource.as_str()) {
        return Some(object_path(info, false));
    }
    matches!(info.verb.as_str(), "update" | "patch" | "delete").then(|| object_path(info, true))
}

fn dry_runnable(info: &RequestInfo) -> bool {
    matches!(info.verb.as_str(), "create" | "update" | "patch")
        && !ON_OBJECT.contains(&info.subresource.as_str())
}

/// Whether the write is made conditional on the checked version.
fn conditional(info: &RequestInfo) -> bool {
    matches!(info.verb.as_str(), "update" | "patch" | "delete")
        && !info.name.is_empty()
        && !ON_OBJECT.contains(&info.subresource.as_str())
}

/// A metav1.Status message from an answer's body, or the body's start.
fn status_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
}

fn resource_version(v: &Value) -> Option<String> {
    v["metadata"]["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Fetches what `needs` asks for.
pub(super) async fn obtain(
    upstream: &Upstream,
    imp: &Impersonation,
    wire: &Wire<'_>,
    info: &RequestInfo,
    needs: Needs,
) -> Result<Effect, Refusal> {
    let mut effect = Effect::default();
    let cond = conditional(info);
    let want_old = needs.old_object || (needs.object && cond);
    if want_old && let Some(path) = old_object_path(info) {
        let (code, body) = upstream
            .call(
                Some(imp),
                Call {
                    method: Method::GET,
                    path_and_query: &path,
                    accept: "application/json",
                    content_type: None,
                    body: Bytes::new(),
                },
                MAX_OBJECT,
            )
            .await
            .map_err(Refusal::EffectUnavailable)?;
        match code {
            c if c.is_success() => match serde_json::from_slice::<Value>(&body) {
                Ok(v) => {
                    if cond {
                        effect.resource_version = resource_version(&v);
                    }
                    effect.old_object = Some(v);
                }
                Err(e) => effect.missing = Some(format!("the stored object is not JSON: {e}")),
            },
            StatusCode::NOT_FOUND => {}
            c => {
                effect.missing = Some(format!(
                    "reading the stored object answered {}: {}",
                    c.as_u16(),
                    status_message(&body)
                ))
            }
        }
    }
    if needs.object && dry_runnable(info) {
        let body = match &effect.resource_version {
            Some(rv) if cond => {
                k8s::with_resource_version(&info.verb, wire.content_type, wire.body, rv)
                    .map_err(Refusal::NoPrecondition)?
            }
            _ => wire.body.clone(),
        };
        let mut query: Vec<(String, String)> = form_urlencoded::parse(wire.query.as_bytes())
            .filter(|(k, _)| k != "dryRun")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        query.push(("dryRun".into(), "All".into()));
        let pq = format!(
            "{}?{}",
            wire.path,
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish()
        );
        let (code, answer) = upstream
            .call(
                Some(imp),
                Call {
                    method: wire.method.clone(),
                    path_and_query: &pq,
                    accept: "application/json",
                    content_type: (!wire.content_type.is_empty()).then_some(wire.content_type),
                    body,
                },
                MAX_OBJECT,
            )
            .await
            .map_err(Refusal::EffectUnavailable)?;
        if !code.is_success() {
            // The real request would be answered the same way: say so, with the API
            // server's own code (a 409 stays a conflict the client retries).
            return Err(Refusal::DryRunRefused {
                code,
                message: status_message(&answer),
            });
        }
        match serde_json::from_slice::<Value>(&answer) {
            Ok(v) => {
                if cond && effect.resource_version.is_none() {
                    effect.resource_version = resource_version(&v);
                }
                effect.object = Some(v);
            }
            Err(e) => effect.missing = Some(format!("the dry run's result is not JSON: {e}")),
        }
    }
    Ok(effect)
}

/// The body to forward: the agent's, made conditional on the checked version when
/// the decision read the object (`None`: forward the agent's body as it is).
pub(super) fn conditional_body(
    wire: &Wire<'_>,
    info: &RequestInfo,
    effect: &Effect,
) -> Result<Option<Bytes>, Refusal> {
    match &effect.resource_version {
        Some(rv) if conditional(info) => {
            k8s::with_resource_version(&info.verb, wire.content_type, wire.body, rv)
                .map(Some)
                .map_err(Refusal::NoPrecondition)
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(method: &str, path: &str) -> RequestInfo {
        k8s::resolve(method, path, None).unwrap()
    }

    #[test]
    fn old_objects_are_read_where_they_live() {
        let cases = [
            (
                "PATCH",
                "/apis/apps/v1/namespaces/a/deployments/web",
                Some("/apis/apps/v1/namespaces/a/deployments/web"),
            ),
            (
                "PUT",
                "/apis/apps/v1/namespaces/a/deployments/web/scale",
                Some("/apis/apps/v1/namespaces/a/deployments/web/scale"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/a/configmaps/c",
                Some("/api/v1/namespaces/a/configmaps/c"),
            ),
            (
                "POST",
                "/api/v1/namespaces/a/pods/p/exec",
                Some("/api/v1/namespaces/a/pods/p"),
            ),
            (
                "POST",
                "/api/v1/namespaces/a/pods/p/eviction",
                Some("/api/v1/namespaces/a/pods/p"),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/services/s/proxy/admin",
                Some("/api/v1/namespaces/a/services/s"),
            ),
            (
                "PATCH",
                "/api/v1/namespaces/a",
                Some("/api/v1/namespaces/a"),
            ),
            ("POST", "/api/v1/namespaces/a/pods", None),
            ("DELETE", "/api/v1/namespaces/a/pods", None),
            ("GET", "/api/v1/namespaces/a/pods/p", None),
        ];
        for (m, p, want) in cases {
            assert_eq!(old_object_path(&info(m, p)).as_deref(), want, "{m} {p}");
        }
        assert!(conditional(&info(
            "PATCH",
            "/apis/apps/v1/namespaces/a/deployments/web/scale"
        )));
        assert!(!conditional(&info(
            "POST",
            "/api/v1/namespaces/a/pods/p/exec"
        )));
        assert!(!dry_runnable(&info(
            "POST",
            "/api/v1/namespaces/a/pods/p/exec"
        )));
        assert!(dry_runnable(&info("POST", "/api/v1/namespaces/a/pods")));
    }
}
