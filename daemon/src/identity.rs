//! Who is making this request: the agent's bearer token validated against a configured
//! issuer (signature from the issuer's JWKS, issuer, audience, expiry, not-before,
//! algorithm), mapped to a Kubernetes-style user and groups, and bound to the pod whose
//! cgroup opened the connection.
//!
//! Two issuer kinds: the cluster's own service-account issuer (projected tokens, whose
//! `kubernetes.io` claim names the namespace, service account and pod) and external
//! OIDC identity providers (configurable username and groups claims).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use jsonwebtoken::{Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    config::{self, IssuerConfig},
    jwks::{JwksCache, KeyLookup},
    pod::PodRef,
};

/// A verified agent identity. Never holds the token itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Identity {
    pub issuer: String,
    /// `system:serviceaccount:NS:NAME` for projected tokens; prefix + claim for OIDC.
    pub username: String,
    pub groups: Vec<String>,
    /// `jti` when the token has one, else the first 16 hex digits of its SHA-256: enough
    /// to correlate records, useless to replay.
    pub token_id: String,
    pub expires_at: u64,
    /// The pod the token is bound to (projected tokens), if any.
    pub token_pod: Option<PodRef>,
    /// The pod whose cgroup opened the connection (from the kernel), if it is a pod's.
    pub kernel_pod: Option<PodRef>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the bearer token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("token issuer `{0}` is not trusted")]
    UnknownIssuer(String),
    #[error("token algorithm {alg} is not allowed for issuer {issuer}")]
    Algorithm { alg: String, issuer: String },
    #[error("token key id `{kid}` is not among issuer {issuer}'s published keys")]
    UnknownKey { kid: String, issuer: String },
    #[error("issuer {issuer}'s keys are unavailable: {why}")]
    KeysUnavailable { issuer: String, why: String },
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token audience is not one of {0:?}")]
    Audience(Vec<String>),
    #[error("token claims are invalid: {0}")]
    Claims(String),
    #[error(
        "token is bound to pod {token_pod} but the connection comes from {kernel}: a token is only valid from its own pod"
    )]
    PodMismatch { token_pod: String, kernel: String },
}

/// Claims read before the signature is checked, only to pick the issuer.
#[derive(Deserialize)]
struct Peek {
    iss: Option<String>,
}

#[derive(Debug, Deserialize)]
struct K8sClaim {
    namespace: String,
    serviceaccount: NameUid,
    pod: Option<NameUid>,
}

#[derive(Debug, Deserialize)]
struct NameUid {
    name: String,
    uid: String,
}

struct Issuer {
    cfg: IssuerConfig,
    keys: Arc<JwksCache>,
}

/// A token already verified: its identity stays valid until `expires_at`.
struct Cached {
    identity: Identity,
}

pub struct Authenticator {
    issuers: HashMap<String, Issuer>,
    leeway: Duration,
    cache: Mutex<HashMap<[u8; 32], Arc<Cached>>>,
}

const CACHE_MAX: usize = 4096;

use crate::util::unix_secs as now;

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
        }
    }

    /// Verifies `token` and binds it to `kernel_pod`, the pod whose cgroup opened the
    /// connection (None: not a pod's cgroup).
    pub async fn authenticate(
        &self,
        token: &str,
        kernel_pod: Option<&PodRef>,
    ) -> Result<Identity, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            .cloned();
        let mut identity = match cached {
            Some(c) => {
                if now() > c.identity.expires_at.saturating_add(self.leeway.as_secs()) {
                    self.cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&digest);
                    return Err(AuthError::Expired);
                }
                c.identity.clone()
            }
            None => {
                let id = self.verify(token, &digest).await?;
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_MAX {
                    let t = now();
                    cache.retain(|_, c| c.identity.expires_at > t);
                    if cache.len() >= CACHE_MAX {
                        cache.clear();
                    }
                }
                cache.insert(
                    digest,
                    Arc::new(Cached {
                        identity: id.clone(),
                    }),
                );
                id
            }
        };
        bind_to_pod(&mut identity, kernel_pod)?;
        Ok(identity)
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

/// Turns verified claims into an identity, per the issuer's kind.
fn identity_from_claims(
    cfg: &IssuerConfig,
    claims: &serde_json::Value,
    digest: &[u8; 32],
) -> Result<Identity, AuthError> {
    let token_id = claims["jti"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| hex::encode(&digest[..8]));
    let expires_at = claims["exp"]
        .as_u64()
        .ok_or_else(|| AuthError::Claims("`exp` is not a number".into()))?;
    if cfg.kubernetes {
        let k: K8sClaim = serde_json::from_value(claims["kubernetes.io"].clone()).map_err(|e| {
            AuthError::Claims(format!(
                "a service-account token needs the `kubernetes.io` claim: {e}"
            ))
        })?;
        let username = format!(
            "system:serviceaccount:{}:{}",
            k.namespace, k.serviceaccount.name
        );
        if claims["sub"].as_str() != Some(username.as_str()) {
            return Err(AuthError::Claims(format!(
                "`sub` does not name the service account {username}"
            )));
        }
        Ok(Identity {
            issuer: cfg.issuer.clone(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", k.namespace),
                "system:authenticated".into(),
            ],
            username,
            token_id,
            expires_at,
            token_pod: k.pod.map(|p| PodRef {
                namespace: Some(k.namespace.clone()),
                name: Some(p.name),
                uid: p.uid,
            }),
            kernel_pod: None,
        })
    } else {
        let raw = claims[cfg.username_claim.as_str()]
            .as_str()
            .ok_or_else(|| {
                AuthError::Claims(format!(
                    "username claim `{}` is missing or not a string",
                    cfg.username_claim
                ))
            })?;
        if raw.is_empty() {
            return Err(AuthError::Claims(format!(
                "username claim `{}` is empty",
                cfg.username_claim
            )));
        }
        let mut groups: Vec<String> = match &cfg.groups_claim {
            Some(c) => match &claims[c.as_str()] {
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|g| g.as_str())
                    .map(|g| format!("{}{g}", cfg.groups_prefix))
                    .collect(),
                serde_json::Value::String(g) => vec![format!("{}{g}", cfg.groups_prefix)],
                serde_json::Value::Null => Vec::new(),
                _ => {
                    return Err(AuthError::Claims(format!(
                        "groups claim `{c}` is neither a string nor a list"
                    )));
                }
            },
            None => Vec::new(),
        };
        groups.push("system:authenticated".into());
        Ok(Identity {
            issuer: cfg.issuer.clone(),
            username: format!("{}{raw}", cfg.username_prefix),
            groups,
            token_id,
            expires_at,
            token_pod: None,
            kernel_pod: None,
        })
    }
}

/// A token that names a pod is valid only from that pod's cgroup; a token that does
/// not gets the kernel's pod recorded beside it.
fn bind_to_pod(id: &mut Identity, kernel_pod: Option<&PodRef>) -> Result<(), AuthError> {
    if let Some(tp) = &id.token_pod {
        match kernel_pod {
            Some(kp) if kp.uid == tp.uid => {}
            Some(kp) => {
                return Err(AuthError::PodMismatch {
                    token_pod: tp.to_string(),
                    kernel: format!("pod uid {}", kp.uid),
                });
            }
            None => {
                return Err(AuthError::PodMismatch {
                    token_pod: tp.to_string(),
                    kernel: "a cgroup that is not a pod's".into(),
                });
            }
        }
    }
    id.kernel_pod = kernel_pod.cloned();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::Algorithm;

    fn cfg(kubernetes: bool) -> IssuerConfig {
        IssuerConfig {
            issuer: "https://issuer.test".into(),
            kubernetes,
            jwks_url: None,
            ca_file: None,
            audiences: vec!["aud".into()],
            algorithms: vec![Algorithm::RS256],
            username_claim: "email".into(),
            username_prefix: "oidc:".into(),
            groups_claim: Some("groups".into()),
            groups_prefix: "oidc:".into(),
        }
    }

    #[test]
    fn projected_token_claims_become_a_service_account_identity() {
        let claims = serde_json::json!({
            "iss": "https://issuer.test", "aud": ["aud"], "exp": 2_000_000_000u64,
            "sub": "system:serviceaccount:e2e:agent",
            "kubernetes.io": {"namespace": "e2e", "serviceaccount": {"name": "agent", "uid": "u1"},
                              "pod": {"name": "work", "uid": "p1"}}
        });
        let id = identity_from_claims(&cfg(true), &claims, &[7; 32]).unwrap();
        assert_eq!(id.username, "system:serviceaccount:e2e:agent");
        assert!(
            id.groups
                .contains(&"system:serviceaccounts:e2e".to_string())
        );
        assert_eq!(id.token_pod.as_ref().unwrap().uid, "p1");
        assert_eq!(id.token_id, "0707070707070707");
    }

    #[test]
    fn sub_must_name_the_service_account() {
        let claims = serde_json::json!({
            "iss": "https://issuer.test", "aud": ["aud"], "exp": 2_000_000_000u64,
            "sub": "system:serviceaccount:e2e:admin",
            "kubernetes.io": {"namespace": "e2e", "serviceaccount": {"name": "agent", "uid": "u1"}}
        });
        assert!(matches!(
            identity_from_claims(&cfg(true), &claims, &[0; 32]),
            Err(AuthError::Claims(_))
        ));
    }

    #[test]
    fn oidc_claims_use_the_configured_username_and_groups() {
        let claims = serde_json::json!({"email": "alice@example.com", "groups": ["devs", "ops"],
                                        "exp": 2_000_000_000u64, "jti": "j-1"});
        let id = identity_from_claims(&cfg(false), &claims, &[0; 32]).unwrap();
        assert_eq!(id.username, "oidc:alice@example.com");
        assert_eq!(
            id.groups,
            vec!["oidc:devs", "oidc:ops", "system:authenticated"]
        );
        assert_eq!(id.token_id, "j-1");
        let no_user = serde_json::json!({"sub": "x", "exp": 2_000_000_000u64});
        assert!(identity_from_claims(&cfg(false), &no_user, &[0; 32]).is_err());
    }

    #[test]
    fn a_pod_bound_token_only_works_from_its_pod() {
        let pod = |uid: &str| PodRef {
            namespace: None,
            name: None,
            uid: uid.into(),
        };
        let mut id = Identity {
            issuer: "i".into(),
            username: "u".into(),
            groups: vec![],
            token_id: "t".into(),
            expires_at: 0,
            token_pod: Some(pod("A")),
            kernel_pod: None,
        };
        assert!(bind_to_pod(&mut id.clone(), Some(&pod("A"))).is_ok());
        assert!(matches!(
            bind_to_pod(&mut id.clone(), Some(&pod("B"))),
            Err(AuthError::PodMismatch { .. })
        ));
        assert!(bind_to_pod(&mut id.clone(), None).is_err());
        id.token_pod = None;
        bind_to_pod(&mut id, Some(&pod("B"))).unwrap();
        assert_eq!(id.kernel_pod.unwrap().uid, "B");
    }
}
