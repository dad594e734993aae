//! The API server side: pooled TLS connections (HTTP/2 when the API server offers it,
//! HTTP/1.1 for upgrades), the daemon's own credential, and the rewrite that removes
//! everything the agent sent to claim an identity and adds the scoped impersonation.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderMap, HeaderName, HeaderValue, Uri, Version, header, request};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{
    config::{self, Credential},
    util::ProxyBody,
};

const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How often a token file is checked for rotation.
const TOKEN_RECHECK: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("in-cluster credential: {0}")]
    InCluster(String),
    #[error("TLS setup for the upstream: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the daemon's token in {path} is not a valid header value")]
    BadToken { path: PathBuf },
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// Headers that describe one hop and never cross a proxy (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub struct Upstream {
    /// `https://host:port`, what request paths are appended to.
    base: Uri,
    client: HttpsClient,
    upgrade_client: HttpsClient,
    token: Option<TokenFile>,
}

/// The upstream identity a request is impersonated as, as header values.
#[derive(Debug, Clone)]
pub struct Impersonation {
    user: HeaderValue,
    groups: Vec<HeaderValue>,
}

impl Impersonation {
    pub fn new(user: &str, groups: &[String]) -> Impersonation {
        Impersonation {
            user: header_value(user),
            groups: groups.iter().map(|g| header_value(g)).collect(),
        }
    }
}

impl Upstream {
    pub fn new(cfg: &config::Proxy) -> Result<Self, UpstreamError> {
        let up = &cfg.upstream;
        let in_cluster = matches!(up.credential, Credential::InCluster);
        let url = match (&up.url, in_cluster) {
            (Some(u), _) => u.clone(),
            (None, _) => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    UpstreamError::InCluster(
                        "KUBERNETES_SERVICE_HOST is not set: not running in a pod? Set proxy.upstream.url"
                            .into(),
                    )
                })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("https://{host}:{port}")
            }
        };
        let base: Uri = url.parse().map_err(|e| {
            UpstreamError::InCluster(format!("upstream URL `{url}` does not parse: {e}"))
        })?;
        let ca_file = match (&up.ca_file, in_cluster) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => Some(Path::new(IN_CLUSTER_DIR).join("ca.crt")),
            (None, false) => None,
        };
        let mut roots = rustls::RootCertStore::empty();
        match &ca_file {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots.add(cert).map_err(|e| UpstreamError::Pem {
                        path: path.clone(),
                        what: format!("not a usable CA certificate: {e}"),
                    })?;
                }
            }
            None => {
                return Err(UpstreamError::InCluster(
                    "proxy.upstream.ca_file is required to verify the API server".into(),
                ));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let (tls, token) = match &up.credential {
            Credential::BearerTokenFile(path) => {
                (builder.with_no_client_auth(), Some(TokenFile::new(path)?))
            }
            Credential::InCluster => (
                builder.with_no_client_auth(),
                Some(TokenFile::new(&Path::new(IN_CLUSTER_DIR).join("token"))?),
            ),
            Credential::ClientCertificate {
                cert_file,
                key_file,
            } => {
                let chain = read_certs(cert_file)?;
                let key =
                    PrivateKeyDer::from_pem_file(key_file).map_err(|e| UpstreamError::Pem {
                        path: key_file.clone(),
                        what: format!("no usable private key: {e}"),
                    })?;
                (builder.with_client_auth_cert(chain, key)?, None)
            }
        };

        let client = build_client(tls.clone(), true);
        let upgrade_client = build_client(tls, false);
        Ok(Upstream {
            base,
            client,
            upgrade_client,
            token,
        })
    }

    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// Rewrites an agent's request head for the API server: the target, the hop-by-hop
    /// headers, and the identity (agent credentials and impersonation out, ours in).
    pub fn rewrite(
        &self,
        parts: &mut request::Parts,
        upgrade: bool,
        imp: &Impersonation,
    ) -> Result<(), UpstreamError> {
        let pq = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let mut b = Uri::builder();
        if let Some(s) = self.base.scheme() {
            b = b.scheme(s.clone());
        }
        if let Some(a) = self.base.authority() {
            b = b.authority(a.clone());
        }
        // The path came from a request hyper already parsed, so it is a valid URI part.
        if let Ok(uri) = b.path_and_query(pq).build() {
            parts.uri = uri;
        }
        parts.version = Version::HTTP_11;
        let upgrade_proto = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        strip_identity(&mut parts.headers);
        if upgrade && let Some(proto) = upgrade_proto {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
        }
        if let Some(t) = &self.token {
            parts.headers.insert(header::AUTHORIZATION, t.bearer()?);
        }
        parts.headers.insert("impersonate-user", imp.user.clone());
        // Repeated headers: a comma-joined value would be read as ONE group.
        for g in &imp.groups {
            parts.headers.append("impersonate-group", g.clone());
        }
        Ok(())
    }

    /// GET `path` from the API server with the daemon's own credential (no
    /// impersonation): the service-account issuer's keys.
    pub async fn get_raw(&self, path: &str, limit: usize) -> Result<bytes::Bytes, String> {
        use http_body_util::BodyExt;
        let uri = format!("{}{}", self.base.to_string().trim_end_matches('/'), path);
        // The apiserver serves its JWKS only as application/jwk-set+json (406 otherwise).
        let mut b = http::Request::get(&uri)
            .header(header::ACCEPT, "application/jwk-set+json, application/json");
        if let Some(t) = &self.token {
            b = b.header(
                header::AUTHORIZATION,
                t.bearer().map_err(|e| e.to_string())?,
            );
        }
        let req = b.body(crate::util::empty()).map_err(|e| e.to_string())?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| crate::util::source_chain(&e))?;
            let code = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| format!("reading {uri}: {e}"))?
                .to_bytes();
            if !code.is_success() {
                return Err(format!(
                    "{uri} answered {code}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ));
            }
            Ok(body)
        };
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .map_err(|_| format!("{uri}: no answer within 10 s"))?
    }

    pub async fn send(
        &self,
        req: http::Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        if upgrade {
            self.upgrade_client.request(req).await
        } else {
            self.client.request(req).await
        }
    }
}

fn build_client(tls: ClientConfig, h2: bool) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        b.enable_all_versions().wrap_connector(http)
    } else {
        b.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_adaptive_window(true)
        // Detects a dead API server connection under long watches.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(15))
        .build(connector)
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| {
        // Non-visible characters cannot be sent; config validation keeps them out.
        HeaderValue::from_static("invalid")
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| UpstreamError::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| UpstreamError::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(UpstreamError::Pem {
            path: path.to_owned(),
            what: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// Removes hop-by-hop headers, including any the Connection header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

/// Removes everything an agent could use to claim an identity upstream.
fn strip_identity(h: &mut HeaderMap) {
    h.remove(header::AUTHORIZATION);
    let imp: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for k in imp {
        h.remove(k);
    }
}

/// A bearer token file, re-read when its modification time changes.
struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenState>,
}

struct TokenState {
    value: HeaderValue,
    mtime: Option<SystemTime>,
    checked: Instant,
}

impl TokenFile {
    fn new(path: &Path) -> Result<Self, UpstreamError> {
        let (value, mtime) = Self::read(path)?;
        Ok(TokenFile {
            path: path.to_owned(),
            state: Mutex::new(TokenState {
                value,
                mtime,
                checked: Instant::now(),
            }),
        })
    }

    fn read(path: &Path) -> Result<(HeaderValue, Option<SystemTime>), UpstreamError> {
        let rerr = |source| UpstreamError::Read {
            what: "token file",
            path: path.to_owned(),
            source,
        };
        let mtime = std::fs::metadata(path).map_err(rerr)?.modified().ok();
        let text = std::fs::read_to_string(path).map_err(rerr)?;
        let mut v = HeaderValue::from_str(&format!("Bearer {}", text.trim())).map_err(|_| {
            UpstreamError::BadToken {
                path: path.to_owned(),
            }
        })?;
        v.set_sensitive(true);
        Ok((v, mtime))
    }

    fn bearer(&self) -> Result<HeaderValue, UpstreamError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.checked.elapsed() >= TOKEN_RECHECK {
            st.checked = Instant::now();
            let mtime = std::fs::metadata(&self.path)
                .ok()
                .and_then(|m| m.modified().ok());
            if mtime != st.mtime {
                // A rotation in progress may leave the file briefly unreadable: keep the
                // old token and try again at the next check.
                if let Ok((v, m)) = Self::read(&self.path) {
                    st.value = v;
                    st.mtime = m;
                }
            }
        }
        Ok(st.value.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer agent"));
        h.insert("impersonate-user", HeaderValue::from_static("system:admin"));
        h.append(
            "impersonate-group",
            HeaderValue::from_static("system:masters"),
        );
        h.insert("impersonate-extra-scopes", HeaderValue::from_static("x"));
        h.insert("impersonate-uid", HeaderValue::from_static("1"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        strip_identity(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"]);
    }
}
