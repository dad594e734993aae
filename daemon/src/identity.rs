//! Who is making this request: the agent's bearer token validated against a configured
//! issuer (signature from the issuer's JWKS, issuer, audience, expiry, not-before,
//! algorithm), mapped to a Kubernetes-style user and groups, and bound to the pod whose
//! cgroup opened the connection.
//!
//! Two issuer kinds: the cluster's own service-account issuer (projected tokens, whose
//! `kubernetes.io` claim names the namespace, service account and pod) and external
//! OIDC identity providers (configurable username and groups claims).
//!
//! By job: `authn` (verifying a token: issuer, algorithm, key, claims; a cache of
//! verified tokens; TokenReview for service-account tokens, so revocation by deleting
//! the pod or service account takes effect), `claims` (claims to an identity, per issuer kind; the pod
//! binding), `jwks` (issuers' keys: discovery, cache, refresh on rotation).
mod authn;
mod claims;
mod jwks;

pub use authn::Authenticator;
pub use jwks::{JwksCache, Source};

use crate::k8s::{PodRef, UserInfo};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `system:serviceaccount:NS:NAME` for projected tokens (with the service-account
    /// groups); prefix + claim for OIDC (with the prefixed groups claim).
    pub user: UserInfo,
    pub issuer: String,
    /// The token's `sub` claim: with `issuer`, who this is, whatever user name the
    /// issuer's claims map to.
    pub subject: String,
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
    #[error("token is no longer valid (TokenReview): {0}")]
    Revoked(String),
    #[error("token cannot be checked with the API server's TokenReview: {0}")]
    ReviewUnavailable(String),
    #[error("cannot reach the Kubernetes API server to check the token (TokenReview): {0}")]
    ReviewUnreachable(String),
}
