//! Exactly which request an approval is for, so its grant lets that request through
//! and no other: the method and path, the query (every parameter but `pretty`, which
//! changes only the layout of the answer: selectors, `dryRun`, `propagationPolicy`,
//! `gracePeriodSeconds`, `fieldManager`, `force`, ... all change what a request
//! does), the body's media type and SHA-256, and the pod that asked.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct RequestScope {
    pub method: String,
    pub path: String,
    /// The query, parameters sorted (`pretty` left out), form-encoded.
    #[serde(default)]
    pub query: String,
    /// The body's media type, lowercase, without parameters.
    #[serde(default)]
    pub content_type: String,
    /// SHA-256 of the body, hex; empty for no body.
    #[serde(default)]
    pub body_sha256: String,
    /// The UID of the pod the request came from (empty: not from a pod).
    #[serde(default)]
    pub pod_uid: String,
}

/// Query parameters that change only how an answer is laid out.
const LAYOUT_ONLY: &[&str] = &["pretty"];

impl RequestScope {
    pub fn new(
        method: &str,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
        pod_uid: &str,
    ) -> RequestScope {
        let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| !LAYOUT_ONLY.contains(&k.as_ref()))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        pairs.sort();
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        RequestScope {
            method: method.to_ascii_uppercase(),
            path: path.to_owned(),
            query,
            content_type: if body.is_empty() {
                String::new()
            } else {
                content_type
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            },
            body_sha256: if body.is_empty() {
                String::new()
            } else {
                hex::encode(Sha256::digest(body))
            },
            pod_uid: pod_uid.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_changes_meaning_changes_the_scope() {
        let base = RequestScope::new(
            "DELETE",
            "/api/v1/namespaces/e2e/configmaps/a",
            "propagationPolicy=Orphan&dryRun=All",
            "application/json",
            b"{}",
            "pod-a",
        );
        // Parameter order and `pretty` do not.
        assert_eq!(
            base,
            RequestScope::new(
                "delete",
                "/api/v1/namespaces/e2e/configmaps/a",
                "dryRun=All&pretty=true&propagationPolicy=Orphan",
                "application/json; charset=utf-8",
                b"{}",
                "pod-a",
            )
        );
        for other in [
            RequestScope::new(
                "DELETE",
                "/api/v1/namespaces/e2e/configmaps/b",
                "propagationPolicy=Orphan&dryRun=All",
                "application/json",
                b"{}",
                "pod-a",
            ),
            RequestScope::new(
                "DELETE",
                "/api/v1/namespaces/e2e/configmaps/a",
                "propagationPolicy=Background&dryRun=All",
                "application/json",
                b"{}",
                "pod-a",
            ),
            RequestScope::new(
                "DELETE",
                "/api/v1/namespaces/e2e/configmaps/a",
                "propagationPolicy=Orphan",
                "application/json",
                b"{}",
                "pod-a",
            ),
            RequestScope::new(
                "DELETE",
                "/api/v1/namespaces/e2e/configmaps/a",
                "propagationPolicy=Orphan&dryRun=All",
                "application/json",
                b"{ }",
                "pod-a",
            ),
            RequestScope::new(
                "DELETE",
                "/api/v1/namespaces/e2e/configmaps/a",
                "propagationPolicy=Orphan&dryRun=All",
                "application/merge-patch+json",
                b"{}",
                "pod-a",
            ),
            RequestScope::new(
                "DELETE",
                "/api/v1/namespaces/e2e/configmaps/a",
                "propagationPolicy=Orphan&dryRun=All",
                "application/json",
                b"{}",
                "pod-b",
            ),
            RequestScope::new(
                "PATCH",
                "/api/v1/namespaces/e2e/configmaps/a",
                "propagationPolicy=Orphan&dryRun=All",
                "application/json",
                b"{}",
                "pod-a",
            ),
        ] {
            assert_ne!(base, other);
        }
    }
}
