//! A test-only OIDC identity provider (named so: it stands in for Okta/Azure AD/Google,
//! which cannot exist here). Keys are P-256 (ES256) made with rcgen; the published
//! JWKS is a file the server rereads on every request, so a test can rotate keys
//! while the daemon runs. The same server receives approval webhooks.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use serde_json::{Value, json};

pub struct Idp {
    pub dir: PathBuf,
    pub issuer: String,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How to sign a token.
pub enum Sign<'a> {
    /// ES256 with key `kid`.
    Key(&'a str),
    /// The algorithm-confusion attack: HS256 keyed with `kid`'s PUBLIC key PEM.
    HmacWithPublicKey(&'a str),
    /// `alg: none`, no signature.
    None,
}

impl Idp {
    pub fn new(dir: &Path, issuer: &str) -> Result<Idp> {
        std::fs::create_dir_all(dir.join("keys"))?;
        Ok(Idp {
            dir: dir.to_owned(),
            issuer: issuer.into(),
        })
    }

    fn key_path(&self, kid: &str) -> PathBuf {
        self.dir.join("keys").join(format!("{kid}.pem"))
    }

    pub fn keygen(&self, kid: &str) -> Result<()> {
        let k = KeyPair::generate()?;
        std::fs::write(self.key_path(kid), k.serialize_pem())?;
        Ok(())
    }

    fn key(&self, kid: &str) -> Result<KeyPair> {
        let pem =
            std::fs::read_to_string(self.key_path(kid)).with_context(|| format!("no key {kid}"))?;
        Ok(KeyPair::from_pem(&pem)?)
    }

    /// Publishes exactly these keys in the JWKS.
    pub fn publish(&self, kids: &[&str]) -> Result<()> {
        let mut keys = Vec::new();
        for kid in kids {
            let raw = self.key(kid)?.public_key_raw().to_vec();
            anyhow::ensure!(raw.len() == 65 && raw[0] == 4, "unexpected P-256 point");
            keys.push(
                json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                             "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}),
            );
        }
        std::fs::write(
            self.dir.join("jwks.json"),
            json!({ "keys": keys }).to_string(),
        )?;
        Ok(())
    }

    /// Standard claims for `sub`, valid from now for `ttl` seconds, plus `extra`.
    pub fn claims(&self, sub: &str, aud: &str, ttl: i64, extra: Value) -> Value {
        let t = now();
        let mut c = json!({"iss": self.issuer, "sub": sub, "aud": aud, "iat": t, "nbf": t - 5,
                           "exp": t + ttl, "email": sub, "jti": format!("jti-{sub}-{t}-{ttl}")});
        if let (Some(m), Value::Object(e)) = (c.as_object_mut(), extra) {
            m.extend(e);
        }
        c
    }

    pub fn mint(&self, claims: &Value, sign: Sign) -> Result<String> {
        Ok(match sign {
            Sign::Key(kid) => {
                let mut h = Header::new(Algorithm::ES256);
                h.kid = Some(kid.into());
                let pem = std::fs::read(self.key_path(kid))?;
                jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_pem(&pem)?)?
            }
            Sign::HmacWithPublicKey(kid) => {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some(kid.into());
                let public_pem = self.key(kid)?.public_key_pem();
                jsonwebtoken::encode(&h, claims, &EncodingKey::from_secret(public_pem.as_bytes()))?
            }
            Sign::None => format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(claims.to_string().as_bytes())
            ),
        })
    }

    /// A validly signed token whose payload was then changed (signature kept).
    pub fn tampered(&self, claims: &Value, kid: &str, change: &Value) -> Result<String> {
        let t = self.mint(claims, Sign::Key(kid))?;
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims.clone();
        if let (Some(m), Value::Object(e)) = (c.as_object_mut(), change.clone()) {
            m.extend(e);
        }
        Ok(format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        ))
    }

    pub fn webhook_calls(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("webhook.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
