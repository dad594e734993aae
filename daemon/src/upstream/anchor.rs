//! The audit anchor as a Kubernetes object: a ConfigMap (namespace and name from
//! `proxy.audit.anchor`) whose `data` holds the daemon's newest signed head and its
//! public key, written with the daemon's own credential (never an agent's identity),
//! so root on the node cannot take back what was published.
use bytes::Bytes;
use http::{Method, StatusCode};

use super::{Call, Upstream};
use crate::audit::{Anchor, AnchorError, AnchorStore};

const LIMIT: usize = 1 << 20;

pub struct ConfigMapAnchor {
    upstream: std::sync::Arc<Upstream>,
    namespace: String,
    name: String,
}

impl ConfigMapAnchor {
    pub fn new(upstream: std::sync::Arc<Upstream>, namespace: &str, name: &str) -> Self {
        ConfigMapAnchor {
            upstream,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn path(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/configmaps/{}",
            self.namespace, self.name
        )
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), AnchorError> {
        self.upstream
            .call(
                None,
                Call {
                    method,
                    path_and_query: path,
                    accept: "application/json",
                    content_type,
                    body,
                },
                LIMIT,
            )
            .await
            .map_err(|e| AnchorError::Store(e.to_string()))
    }
}

fn failed(what: &str, code: StatusCode, body: &[u8]) -> AnchorError {
    AnchorError::Store(format!(
        "{what} answered {}: {}",
        code.as_u16(),
        String::from_utf8_lossy(&body[..body.len().min(300)])
    ))
}

impl AnchorStore for ConfigMapAnchor {
    fn publish<'a>(
        &'a self,
        anchor: &'a Anchor,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), AnchorError>> + Send + 'a>>
    {
        Box::pin(async move {
            let patch = serde_json::json!({"data": anchor.to_data()});
            let (code, body) = self
                .call(
                    Method::PATCH,
                    &self.path(),
                    Some("application/merge-patch+json"),
                    Bytes::from(patch.to_string()),
                )
                .await?;
            if code.is_success() {
                return Ok(());
            }
            if code != StatusCode::NOT_FOUND {
                return Err(failed("updating the anchor", code, &body));
            }
            let cm = serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/name": "portcullis", "portcullis.dev/role": "audit-anchor"}},
                "data": anchor.to_data(),
            });
            let (code, body) = self
                .call(
                    Method::POST,
                    &format!("/api/v1/namespaces/{}/configmaps", self.namespace),
                    Some("application/json"),
                    Bytes::from(cm.to_string()),
                )
                .await?;
            if code.is_success() {
                Ok(())
            } else {
                Err(failed("creating the anchor", code, &body))
            }
        })
    }

    fn fetch(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<Anchor>, AnchorError>> + Send + '_>,
    > {
        Box::pin(async move {
            let (code, body) = self
                .call(Method::GET, &self.path(), None, Bytes::new())
                .await?;
            match code {
                StatusCode::NOT_FOUND => Ok(None),
                c if c.is_success() => Anchor::parse(&String::from_utf8_lossy(&body)).map(Some),
                c => Err(failed("reading the anchor", c, &body)),
            }
        })
    }

    fn describe(&self) -> String {
        format!("configmap {}/{}", self.namespace, self.name)
    }
}
