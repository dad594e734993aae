//! Verified claims to an identity, per issuer kind, and the binding of a token to
//! the pod whose cgroup opened the connection.
use std::sync::Arc;

use serde::Deserialize;

use super::{AuthError, Identity};
use crate::{
    config::IssuerConfig,
    k8s::{PodRef, UserInfo},
};

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

/// Turns verified claims into an identity, per the issuer's kind.
pub(super) fn identity_from_claims(
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
            subject: username.clone(),
            user: UserInfo {
                username,
                groups: vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{}", k.namespace),
                    "system:authenticated".into(),
                ],
            },
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
            subject: claims["sub"].as_str().unwrap_or("").to_owned(),
            user: UserInfo {
                username: format!("{}{raw}", cfg.username_prefix),
                groups,
            },
            token_id,
            expires_at,
            token_pod: None,
            kernel_pod: None,
        })
    }
}

/// A token that names a pod is valid only from that pod's cgroup; a token that does
/// not gets the kernel's pod recorded beside it. Checked on every request; the
/// identity is shared, not copied, while it already names this pod.
pub(super) fn bind_to_pod(
    id: Arc<Identity>,
    kernel_pod: Option<&PodRef>,
) -> Result<Arc<Identity>, AuthError> {
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
    if id.kernel_pod.as_ref() == kernel_pod {
        return Ok(id);
    }
    let mut bound = Identity::clone(&id);
    bound.kernel_pod = kernel_pod.cloned();
    Ok(Arc::new(bound))
}
#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::Algorithm;

    fn cfg(kubernetes: bool) -> IssuerConfig {
        IssuerConfig {
            issuer: "https://issuer.test".into(),
            kubernetes,
            token_review: kubernetes,
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
        assert_eq!(id.user.username, "system:serviceaccount:e2e:agent");
        assert!(
            id.user
                .groups
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
        assert_eq!(id.user.username, "oidc:alice@example.com");
        assert_eq!(
            id.user.groups,
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
            subject: "u".into(),
            user: UserInfo {
                username: "u".into(),
                groups: vec![],
            },
            token_id: "t".into(),
            expires_at: 0,
            token_pod: Some(pod("A")),
            kernel_pod: None,
        };
        let a = bind_to_pod(Arc::new(id.clone()), Some(&pod("A"))).unwrap();
        assert_eq!(a.kernel_pod.as_ref().unwrap().uid, "A");
        // Bound already: the same identity, shared; still checked every time.
        assert!(Arc::ptr_eq(
            &a,
            &bind_to_pod(a.clone(), Some(&pod("A"))).unwrap()
        ));
        assert!(matches!(
            bind_to_pod(a.clone(), Some(&pod("B"))),
            Err(AuthError::PodMismatch { .. })
        ));
        assert!(bind_to_pod(a, None).is_err());
        assert!(matches!(
            bind_to_pod(Arc::new(id.clone()), Some(&pod("B"))),
            Err(AuthError::PodMismatch { .. })
        ));
        assert!(bind_to_pod(Arc::new(id.clone()), None).is_err());
        id.token_pod = None;
        let b = bind_to_pod(Arc::new(id), Some(&pod("B"))).unwrap();
        assert_eq!(b.kernel_pod.as_ref().unwrap().uid, "B");
        let c = bind_to_pod(b.clone(), Some(&pod("C"))).unwrap();
        assert_eq!(c.kernel_pod.as_ref().unwrap().uid, "C");
        assert_eq!(b.kernel_pod.as_ref().unwrap().uid, "B");
    }
}
