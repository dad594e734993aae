//! An issuer's signing keys: fetched by OIDC discovery (or from the API server for the
//! cluster's service-account issuer), cached, refreshed when they go stale and when a
//! token names a key id we do not have (rate-limited, so junk tokens cannot make the
//! daemon hammer the IdP). Rotated keys are picked up without a restart; a failed
//! refresh keeps the last good set.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, Jwk, JwkSet},
};
use tracing::{info, warn};

use crate::{
    tls::{self, HttpClient, HttpError},
    upstream::{Upstream, UpstreamError},
};

/// Why an issuer's keys could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("API server JWKS: {0}")]
    ApiServer(#[source] UpstreamError),
    #[error("OIDC discovery: {0}")]
    Discovery(#[source] HttpError),
    #[error("OIDC discovery document: {0}")]
    DiscoveryDocument(#[source] serde_json::Error),
    #[error("discovery document names issuer {named} instead of {issuer}")]
    IssuerMismatch { named: String, issuer: String },
    #[error("discovery document has no jwks_uri")]
    NoJwksUri,
    #[error("JWKS: {0}")]
    Fetch(#[source] HttpError),
    #[error("JWKS document: {0}")]
    Document(#[source] serde_json::Error),
}

/// Keys older than this are refetched on next use.
const STALE_AFTER: Duration = Duration::from_secs(300);
/// At most one fetch per issuer in this interval (unknown-kid refreshes included).
const MIN_REFETCH: Duration = Duration::from_secs(10);
const MAX_JWKS_BYTES: usize = 1 << 20;

pub enum Source {
    /// The cluster's service-account issuer: `/openid/v1/jwks` on the API server, with
    /// the daemon's credential (the issuer URL itself is often not reachable).
    ApiServer(Arc<Upstream>),
    /// An OIDC provider: `jwks_url`, or discovery at `<issuer>/.well-known/openid-configuration`.
    Oidc {
        client: Box<HttpClient>,
        issuer: String,
        jwks_url: Option<String>,
    },
    /// A key set given as the document an issuer would serve (the fuzz targets and
    /// tests: no fetch, the same parsing).
    #[doc(hidden)]
    Document(bytes::Bytes),
}

pub enum KeyLookup {
    Found(DecodingKey),
    UnknownKid(String),
    Unavailable(String),
}

struct State {
    set: Option<JwkSet>,
    fetched: Option<Instant>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

pub struct JwksCache {
    name: String,
    source: Source,
    state: Mutex<State>,
    /// Serialises fetches so a burst of requests triggers one.
    fetching: tokio::sync::Mutex<()>,
}

impl JwksCache {
    pub fn new(name: &str, source: Source) -> Self {
        JwksCache {
            name: name.into(),
            source,
            state: Mutex::new(State {
                set: None,
                fetched: None,
                last_attempt: None,
                last_error: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key for a token's `kid` and `alg`.
    pub async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> KeyLookup {
        let stale = {
            let s = self.state();
            s.fetched.is_none_or(|t| t.elapsed() > STALE_AFTER)
        };
        if stale {
            self.refresh().await;
        }
        if let Some(k) = self.find(kid, alg) {
            return k;
        }
        // Not found: maybe the issuer rotated keys since the last fetch.
        if self.refresh().await
            && let Some(k) = self.find(kid, alg)
        {
            return k;
        }
        let s = self.state();
        match (&s.set, &s.last_error) {
            (None, Some(e)) => KeyLookup::Unavailable(e.clone()),
            (None, None) => KeyLookup::Unavailable("not fetched yet".into()),
            _ => KeyLookup::UnknownKid(kid.unwrap_or("(none)").into()),
        }
    }

    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<KeyLookup> {
        let s = self.state();
        let set = s.set.as_ref()?;
        let usable: Vec<&Jwk> = set
            .keys
            .iter()
            .filter(|k| match kid {
                Some(kid) => k.common.key_id.as_deref() == Some(kid),
                None => true,
            })
            .filter(|k| fits(k, alg))
            .collect();
        match usable.as_slice() {
            [k] => Some(match DecodingKey::from_jwk(k) {
                Ok(d) => KeyLookup::Found(d),
                Err(e) => KeyLookup::Unavailable(format!("published key is unusable: {e}")),
            }),
            // Without a kid the key must be unambiguous.
            _ => None,
        }
    }

    /// Fetches the key set unless one was fetched within MIN_REFETCH. True if it ran
    /// and succeeded.
    pub async fn refresh(&self) -> bool {
        let _one = self.fetching.lock().await;
        {
            let mut s = self.state();
            if s.last_attempt.is_some_and(|t| t.elapsed() < MIN_REFETCH) {
                return false;
            }
            s.last_attempt = Some(Instant::now());
        }
        let result = self.fetch().await;
        let mut s = self.state();
        match result {
            Ok(set) => {
                info!(issuer = %self.name, keys = set.keys.len(), "issuer keys fetched");
                s.set = Some(set);
                s.fetched = Some(Instant::now());
                s.last_error = None;
                true
            }
            Err(e) => {
                warn!(issuer = %self.name, error = %e, "fetching issuer keys failed; keeping the previous set");
                s.last_error = Some(e.to_string());
                false
            }
        }
    }

    async fn fetch(&self) -> Result<JwkSet, JwksError> {
        let bytes = match &self.source {
            Source::ApiServer(up) => up
                .get_raw("/openid/v1/jwks", MAX_JWKS_BYTES)
                .await
                .map_err(JwksError::ApiServer)?,
            Source::Oidc {
                client,
                issuer,
                jwks_url,
            } => {
                let url = match jwks_url {
                    Some(u) => u.clone(),
                    None => {
                        let disc = format!(
                            "{}/.well-known/openid-configuration",
                            issuer.trim_end_matches('/')
                        );
                        let doc = tls::get(client.as_ref(), &disc, MAX_JWKS_BYTES)
                            .await
                            .map_err(JwksError::Discovery)?;
                        let v: serde_json::Value =
                            serde_json::from_slice(&doc).map_err(JwksError::DiscoveryDocument)?;
                        if v["issuer"].as_str() != Some(issuer.as_str()) {
                            return Err(JwksError::IssuerMismatch {
                                named: v["issuer"].to_string(),
                                issuer: issuer.clone(),
                            });
                        }
                        v["jwks_uri"]
                            .as_str()
                            .ok_or(JwksError::NoJwksUri)?
                            .to_owned()
                    }
                };
                tls::get(client.as_ref(), &url, MAX_JWKS_BYTES)
                    .await
                    .map_err(JwksError::Fetch)?
            }
            Source::Document(d) => d.clone(),
        };
        serde_json::from_slice(&bytes).map_err(JwksError::Document)
    }
}

/// Whether a published key may verify `alg`: the right key type, and the key's own
/// `alg` (when published) equal to the token's. Symmetric keys never verify.
fn fits(k: &Jwk, alg: Algorithm) -> bool {
    if let Some(ka) = &k.common.key_algorithm
        && format!("{ka:?}") != format!("{alg:?}")
    {
        return false;
    }
    matches!(
        (&k.algorithm, alg),
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ) | (
            AlgorithmParameters::EllipticCurve(_),
            Algorithm::ES256 | Algorithm::ES384
        ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
    )
}
