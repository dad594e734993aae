//! Verifying an agent's bearer token against the configured issuers (signature from
//! the issuer's keys, issuer, audience, expiry, not-before, algorithm), with a cache
//! of tokens already verified. A service-account token is also put to the API
//! server's TokenReview (answers cached by `jti` for `token_review_ttl`): a signature
//! stays valid after its pod or service account is deleted, the review does not.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use jsonwebtoken::{Validation, errors::ErrorKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    AuthError, Identity,
    claims::{bind_to_pod, identity_from_claims},
    jwks::{JwksCache, KeyLookup},
};
use crate::{
    config::{self, IssuerConfig},
    k8s::PodRef,
    upstream::{Call, Upstream},
    util::unix_secs as now,
};

/// Claims read before the signature is checked, only to pick the issuer.
#[derive(Deserialize)]
struct Peek {
    iss: Option<String>,
}

struct Issuer {
    cfg: IssuerConfig,
    keys: Arc<JwksCache>,
}

pub struct Authenticator {
    issuers: HashMap<String, Issuer>,
    leeway: Duration,
    /// Token digest → its verified identity (valid until `expires_at`), as last bound
    /// to a pod: requests from that pod share it.
    cache: Mutex<HashMap<[u8; 32], Arc<Identity>>>,
    /// Where TokenReviews go (the API server, with the daemon's credential).
    reviewer: Option<Arc<Upstream>>,
    review_ttl: Duration,
    /// Issuer → jti → when the API server last confirmed the token (by issuer first, so
    /// a request's lookup borrows its identity's strings instead of copying them).
    reviewed: Mutex<HashMap<String, HashMap<String, std::time::Instant>>>,
}

const CACHE_MAX: usize = 4096;

impl Authenticator {
    pub fn new(cfg: &config::Identity, keys: Vec<Arc<JwksCache>>) -> Self {
        let issuers = cfg
            .issuers
            .iter()
            .cloned()
            .zip(keys)
            .map(|(cfg, keys)| (cfg.issuer.clone(), Issuer { cfg, keys }))
            .collect();
        Authenticator {
            issuers,
            leeway: cfg.leeway,
            cache: Mutex::new(HashMap::new()),
            reviewer: None,
            review_ttl: cfg.token_review_ttl,
            reviewed: Mutex::new(HashMap::new()),
        }
    }

    /// Checks the tokens of issuers with `token_review` against this API server.
    pub fn with_reviews(mut self, upstream: Arc<Upstream>) -> Self {
        self.reviewer = Some(upstream);
        self
    }

    /// Asks the API server whether `token` is still valid (its pod, service account,
    /// secret or node still exist), unless it said so within `review_ttl`.
    async fn review(&self, token: &str, id: &Identity) -> Result<(), AuthError> {
        let Some(issuer) = self.issuers.get(&id.issuer) else {
            return Ok(());
        };
        if !(issuer.cfg.kubernetes && issuer.cfg.token_review) {
            return Ok(());
        }
        let Some(up) = &self.reviewer else {
            return Err(AuthError::ReviewUnavailable(
                "no API server to send TokenReviews to".into(),
            ));
        };
        {
            let mut seen = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(by_jti) = seen.get_mut(id.issuer.as_str())
                && let Some(t) = by_jti.get(id.token_id.as_str())
            {
                if t.elapsed() < self.review_ttl {
                    return Ok(());
                }
                by_jti.remove(id.token_id.as_str());
            }
        }
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": issuer.cfg.audiences},
        });
        // Boxed: a review is rare (once per token and `review_ttl`), and its large
        // future held inline would make every request's future as large.
        let (code, answer) = Box::pin(up.call(
            None,
            Call {
                method: http::Method::POST,
                path_and_query: "/apis/authentication.k8s.io/v1/tokenreviews",
                accept: "application/json",
                content_type: Some("application/json"),
                body: bytes::Bytes::from(body.to_string()),
            },
            1 << 20,
        ))
        .await
        .map_err(|e| match e {
            crate::upstream::UpstreamError::Request { .. }
            | crate::upstream::UpstreamError::Timeout { .. } => {
                AuthError::ReviewUnreachable(e.to_string())
            }
            e => AuthError::ReviewUnavailable(e.to_string()),
        })?;
        if !code.is_success() {
            return Err(AuthError::ReviewUnavailable(format!(
                "TokenReview answered {}",
                code.as_u16()
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&answer)
            .map_err(|e| AuthError::ReviewUnavailable(format!("TokenReview answer: {e}")))?;
        let status = &v["status"];
        if status["authenticated"] != true {
            return Err(AuthError::Revoked(
                status["error"]
                    .as_str()
                    .unwrap_or("the API server does not authenticate it")
                    .to_owned(),
            ));
        }
        if status["user"]["username"].as_str() != Some(id.user.username.as_str()) {
            return Err(AuthError::Revoked(format!(
                "the API server knows it as {}, not {}",
                status["user"]["username"], id.user.username
            )));
        }
        let mut seen = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
        if seen.values().map(HashMap::len).sum::<usize>() >= CACHE_MAX {
            let ttl = self.review_ttl;
            for by_jti in seen.values_mut() {
                by_jti.retain(|_, t| t.elapsed() < ttl);
            }
            seen.retain(|_, by_jti| !by_jti.is_empty());
        }
        seen.entry(id.issuer.clone())
            .or_default()
            .insert(id.token_id.clone(), std::time::Instant::now());
        Ok(())
    }

    /// Verifies `token` and binds it to `kernel_pod`, the pod whose cgroup opened the
    /// connection (None: not a pod's cgroup).
    pub async fn authenticate(
        &self,
        token: &str,
        kernel_pod: Option<&PodRef>,
    ) -> Result<Arc<Identity>, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            .cloned();
        let identity = match cached {
            Some(id) => {
                if now() > id.expires_at.saturating_add(self.leeway.as_secs()) {
                    self.cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&digest);
                    return Err(AuthError::Expired);
                }
                id
            }
            None => {
                // Boxed: a cache miss (signature, TokenReview) is rare, and its large
                // future held inline would make every request's future as large.
                let id = Arc::new(Box::pin(self.verify(token, &digest)).await?);
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_MAX {
                    let t = now();
                    cache.retain(|_, c| c.expires_at > t);
                    if cache.len() >= CACHE_MAX {
                        cache.clear();
                    }
                }
                cache.insert(digest, id.clone());
                id
            }
        };
        let bound = bind_to_pod(identity.clone(), kernel_pod)?;
        if !Arc::ptr_eq(&bound, &identity) {
            // Bound to another pod than last time (a token that names none): the next
            // request from this pod shares this one.
            self.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(digest, bound.clone());
        }
        self.review(token, &bound).await?;
        Ok(bound)
    }

    async fn verify(&self, token: &str, digest: &[u8; 32]) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let iss = peek_issuer(token)?;
        let issuer = self
            .issuers
            .get(&iss)
            .ok_or_else(|| AuthError::UnknownIssuer(iss.clone()))?;
        // Only the issuer's configured asymmetric algorithms: a token cannot pick HS256
        // and have the public key used as its HMAC secret.
        if !issuer.cfg.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm {
                alg: format!("{:?}", header.alg),
                issuer: iss,
            });
        }
        let key = match issuer.keys.key_for(header.kid.as_deref(), header.alg).await {
            KeyLookup::Found(k) => k,
            KeyLookup::UnknownKid(kid) => {
                return Err(AuthError::UnknownKey { kid, issuer: iss });
            }
            KeyLookup::Unavailable(why) => {
                return Err(AuthError::KeysUnavailable { issuer: iss, why });
            }
        };
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.set_issuer(&[&issuer.cfg.issuer]);
        v.set_audience(&issuer.cfg.audiences);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidAudience => AuthError::Audience(issuer.cfg.audiences.clone()),
                    ErrorKind::InvalidIssuer => AuthError::UnknownIssuer(iss.clone()),
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidAlgorithm => AuthError::Algorithm {
                        alg: format!("{:?}", header.alg),
                        issuer: iss.clone(),
                    },
                    ErrorKind::MissingRequiredClaim(c) => {
                        AuthError::Claims(format!("required claim `{c}` is missing"))
                    }
                    _ => AuthError::Malformed(e.to_string()),
                }
            })?;
        identity_from_claims(&issuer.cfg, &data.claims, digest)
    }
}

fn peek_issuer(token: &str) -> Result<String, AuthError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| AuthError::Malformed("no payload segment".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| AuthError::Malformed(format!("payload is not base64url: {e}")))?;
    let p: Peek = serde_json::from_slice(&bytes)
        .map_err(|e| AuthError::Malformed(format!("payload is not a JSON object: {e}")))?;
    p.iss
        .ok_or_else(|| AuthError::Claims("required claim `iss` is missing".into()))
}
