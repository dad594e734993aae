//! Bearer tokens through the real authenticator: issuer lookup, algorithm, key from
//! the issuer's JWKS document, signature, claims, the identity they map to.
use std::sync::Arc;

use base64::Engine;

use crate::{
    config,
    identity::{Authenticator, JwksCache, Source},
    k8s::PodRef,
};

const K8S_ISSUER: &str = "https://fuzz.example/k8s";
const OIDC_ISSUER: &str = "https://fuzz.example/oidc";
/// Public keys only (P-256, `fuzz-1` and `fuzz-2`): the seeds under
/// `fuzz/corpus/jwt/` were signed with their private halves, which were thrown away.
const JWKS: &str = r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "fuzz-1", "alg": "ES256", "use": "sig", "x": "obkDZU0UFn4kxJ8hKJWfRL_FdnQ6FWJAIn0JTqYsUFw", "y": "Xkh_huiDN8GfRTTkK49U8cy3MDeyYK7qgyNyc3g86cc"}, {"kty": "EC", "crv": "P-256", "kid": "fuzz-2", "x": "fp75S_UgbMkXCtSivvdA-6s_1HBq_ArpHi7iL1xP_48", "y": "oci0vLl2sV9BCOJqSudyrIq0pt2myeLB-T4W-pjFSmg"}]}"#;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

fn identity_config() -> config::Identity {
    let algorithms = ["ES256", "RS256", "PS256", "EdDSA"];
    serde_json::from_value(serde_json::json!({
        "issuers": [
            {"issuer": K8S_ISSUER, "kubernetes": true, "token_review": false,
             "audiences": ["api"], "algorithms": algorithms},
            {"issuer": OIDC_ISSUER, "audiences": ["api"], "algorithms": algorithms,
             "groups_claim": "groups"},
        ],
    }))
    .expect("the fuzz identity config parses")
}

/// A fresh authenticator (no cache of verified tokens) whose issuers serve `jwks`.
fn authenticator(jwks: &[u8]) -> Authenticator {
    let cfg = identity_config();
    let keys = cfg
        .issuers
        .iter()
        .map(|i| {
            Arc::new(JwksCache::new(
                &i.issuer,
                Source::Document(bytes::Bytes::copy_from_slice(jwks)),
            ))
        })
        .collect();
    Authenticator::new(&cfg, keys)
}

/// A token, then optionally a newline and the JWKS document both issuers serve.
pub fn jwt(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (token, jwks) = match text.split_once('\n') {
        Some((t, j)) => (t, j.as_bytes()),
        None => (&*text, JWKS.as_bytes()),
    };
    // The connection comes from this pod (the seeds' projected token names it).
    let pod = PodRef {
        namespace: Some("prod-a".into()),
        name: Some("agent-0".into()),
        uid: "pod-uid".into(),
    };
    let rt = runtime();
    let Ok(id) = rt.block_on(authenticator(jwks).authenticate(token, Some(&pod))) else {
        return;
    };
    if let Some(tp) = &id.token_pod {
        assert_eq!(tp.uid, pod.uid, "accepted a token bound to another pod");
    }
    assert!(
        id.issuer == K8S_ISSUER || id.issuer == OIDC_ISSUER,
        "accepted from issuer {:?}",
        id.issuer
    );
    let header = jsonwebtoken::decode_header(token).expect("an accepted token has a header");
    assert!(
        !matches!(
            header.alg,
            jsonwebtoken::Algorithm::HS256
                | jsonwebtoken::Algorithm::HS384
                | jsonwebtoken::Algorithm::HS512
        ),
        "accepted a shared-secret algorithm"
    );
    // The same token with one byte of its signature changed is refused.
    let (signed, sig) = token
        .rsplit_once('.')
        .expect("an accepted token has 3 parts");
    let Ok(mut raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else {
        return;
    };
    if raw.is_empty() {
        panic!("accepted a token without a signature");
    }
    let mid = raw.len() / 2;
    raw[mid] ^= 0x01;
    let forged = format!(
        "{signed}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw)
    );
    assert!(
        rt.block_on(authenticator(jwks).authenticate(&forged, Some(&pod)))
            .is_err(),
        "a token with a changed signature was accepted"
    );
}
