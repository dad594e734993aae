//! The API server side: TLS connections (HTTP/2 when the API server offers it, held
//! by the lanes themselves (`connection.rs`), another connection when those open have
//! no stream left (`pool.rs`); HTTP/1.1 for upgrades), the daemon's own credential, and
//! the rewrite that removes everything the agent sent to claim an identity and adds the
//! scoped impersonation; the daemon's own calls (policy reads as a scoped identity, the
//! audit anchor).
mod anchor;
mod connection;
mod headers;
mod pool;
mod stream;
mod token;

use std::{path::PathBuf, time::Duration};

use http::{HeaderValue, Uri, Version, header, request};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls::ClientConfig;

pub use anchor::ConfigMapAnchor;
pub use connection::{H2Connection, SendError};
pub use headers::{Impersonation, strip_hop_by_hop};
pub use pool::UpstreamBody;
pub use stream::ResponseBody;

use crate::{
    config::{self, Credential},
    tls::{self, ClientError},
    util::{self, BoxError, ProxyBody, source_chain},
};
use token::TokenFile;

const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "in-cluster credential: KUBERNETES_SERVICE_HOST is not set: not running in a pod? Set proxy.upstream.url"
    )]
    NoServiceHost,
    #[error("in-cluster credential: upstream URL `{url}` does not parse: {source}")]
    BadUrl {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("in-cluster credential: proxy.upstream.ca_file is required to verify the API server")]
    NoCa,
    #[error(transparent)]
    Tls(#[from] ClientError),
    #[error("the daemon's token in {} is not a valid header value", path.display())]
    BadToken { path: PathBuf },
    // ---- the daemon's own requests (the service-account issuer's keys) ----
    #[error("{uri}: {source}")]
    Build {
        uri: String,
        #[source]
        source: http::Error,
    },
    /// hyper's error says little without its causes: the message carries the chain.
    #[error("{}", source_chain(error))]
    Request { error: SendError },
    #[error("reading {uri}: {source}")]
    Body {
        uri: String,
        #[source]
        source: BoxError,
    },
    #[error("{uri} answered {code}: {body}")]
    Status {
        uri: String,
        code: http::StatusCode,
        body: String,
    },
    #[error("{uri}: no answer within 10 s")]
    Timeout { uri: String },
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// A request the daemon makes itself (see [`Upstream::call`]).
pub struct Call<'a> {
    pub method: http::Method,
    /// `/api/...?...`
    pub path_and_query: &'a str,
    pub accept: &'a str,
    pub content_type: Option<&'a str>,
    pub body: bytes::Bytes,
}

pub struct Upstream {
    /// `https://host:port`, what request paths are appended to.
    base: Uri,
    lanes: pool::Lanes,
    upgrade_client: HttpsClient,
    token: Option<TokenFile>,
}

impl Upstream {
    pub fn new(cfg: &config::Proxy) -> Result<Self, UpstreamError> {
        let up = &cfg.upstream;
        let in_cluster = matches!(up.credential, Credential::InCluster);
        let url = match &up.url {
            Some(u) => u.clone(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST")
                    .map_err(|_| UpstreamError::NoServiceHost)?;
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
        let base: Uri = url
            .parse()
            .map_err(|source| UpstreamError::BadUrl { url, source })?;
        let in_cluster_dir = std::path::Path::new(IN_CLUSTER_DIR);
        // Never the public web roots for the API server.
        let ca_file = match (&up.ca_file, in_cluster) {
            (Some(p), _) => p.clone(),
            (None, true) => in_cluster_dir.join("ca.crt"),
            (None, false) => return Err(UpstreamError::NoCa),
        };
        let (tls, token) = match &up.credential {
            Credential::BearerTokenFile(path) => (
                tls::client_config(Some(&ca_file), None)?,
                Some(TokenFile::new(path)?),
            ),
            Credential::InCluster => (
                tls::client_config(Some(&ca_file), None)?,
                Some(TokenFile::new(&in_cluster_dir.join("token"))?),
            ),
            Credential::ClientCertificate {
                cert_file,
                key_file,
            } => (
                tls::client_config(Some(&ca_file), Some((cert_file, key_file)))?,
                None,
            ),
        };
        let (h2_tls, h2_base) = (tls.clone(), base.clone());
        Ok(Upstream {
            base,
            lanes: pool::Lanes::new(pool::STREAMS_PER_CONNECTION, move |p| {
                lane_client(h2_tls.clone(), &h2_base, p)
            }),
            upgrade_client: build_client(tls, Flavor::Upgrade),
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
        // The path and query as hyper parsed them (shared, not parsed again), on the
        // upstream's scheme and authority.
        let mut uri = http::uri::Parts::default();
        uri.scheme = self.base.scheme().cloned();
        uri.authority = self.base.authority().cloned();
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        if let Ok(u) = Uri::from_parts(uri) {
            parts.uri = u;
        }
        parts.version = Version::HTTP_11;
        let upgrade_proto = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        if upgrade && let Some(proto) = upgrade_proto {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
        }
        let credential = self.token.as_ref().map(TokenFile::bearer).transpose()?;
        headers::impersonate(&mut parts.headers, credential, imp);
        Ok(())
    }

    /// GET `path` from the API server with the daemon's own credential (no
    /// impersonation): the service-account issuer's keys.
    pub async fn get_raw(&self, path: &str, limit: usize) -> Result<bytes::Bytes, UpstreamError> {
        // The apiserver serves its JWKS only as application/jwk-set+json (406 otherwise).
        let (code, body) = self
            .call(
                None,
                Call {
                    method: http::Method::GET,
                    path_and_query: path,
                    accept: "application/jwk-set+json, application/json",
                    content_type: None,
                    body: bytes::Bytes::new(),
                },
                limit,
            )
            .await?;
        if !code.is_success() {
            return Err(UpstreamError::Status {
                uri: path.to_owned(),
                code,
                body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            });
        }
        Ok(body)
    }

    /// One request of the daemon's own, answered whole (up to `limit` bytes) within
    /// 10 s: as the daemon (`imp` None: its TokenReviews, its audit anchor) or as a
    /// subject's scoped identity (the objects a policy decision reads). Any status is
    /// returned; the caller decides what it means.
    pub async fn call(
        &self,
        imp: Option<&Impersonation>,
        call: Call<'_>,
        limit: usize,
    ) -> Result<(http::StatusCode, bytes::Bytes), UpstreamError> {
        let uri = format!(
            "{}{}",
            self.base.to_string().trim_end_matches('/'),
            call.path_and_query
        );
        let mut b = http::Request::builder()
            .method(call.method)
            .uri(&uri)
            .header(header::ACCEPT, call.accept);
        if let Some(ct) = call.content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        let mut req = b
            .body(util::full(call.body))
            .map_err(|source| UpstreamError::Build {
                uri: uri.clone(),
                source,
            })?;
        let credential = self.token.as_ref().map(TokenFile::bearer).transpose()?;
        match imp {
            Some(imp) => headers::impersonate(req.headers_mut(), credential, imp),
            None => {
                if let Some(c) = credential {
                    req.headers_mut().insert(header::AUTHORIZATION, c);
                }
            }
        }
        let fetch = async {
            let resp = self
                .lanes
                .request(req)
                .await
                .map_err(|error| UpstreamError::Request { error })?;
            let code = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|source| UpstreamError::Body {
                    uri: uri.clone(),
                    source,
                })?
                .to_bytes();
            Ok((code, body))
        };
        tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .map_err(|_| UpstreamError::Timeout { uri: uri.clone() })?
    }

    pub async fn send(
        &self,
        req: http::Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        if upgrade {
            // Boxed: rare, and large (see `pool::LaneClient::send`).
            Ok(Box::pin(self.upgrade_client.request(req))
                .await?
                .map(UpstreamBody::unpooled))
        } else {
            self.lanes.request(req).await
        }
    }
}

/// HTTP/2 pings on a connection with streams open, and how long one may go
/// unanswered: they detect a dead API server connection under long watches. The same
/// for the pooled client and a lane's own connection (`connection`).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// What a client is for.
#[derive(Debug, Clone, Copy)]
enum Flavor {
    /// A lane of the HTTP/2 pool (see `pool`).
    Lane(pool::Protocol),
    /// HTTP/1.1 for upgrades (exec, attach, port-forward).
    Upgrade,
}

/// A lane's client: the pooled client while the protocol is negotiated, one HTTP/2
/// connection of its own once the API server is known to speak it.
fn lane_client(tls: ClientConfig, base: &Uri, protocol: pool::Protocol) -> pool::LaneClient {
    match protocol {
        pool::Protocol::Negotiated => {
            pool::LaneClient::Pooled(build_client(tls, Flavor::Lane(protocol)))
        }
        pool::Protocol::Http2 => pool::LaneClient::Direct(connection::H2Connection::new(
            connector(tls, Flavor::Lane(protocol)),
            base.clone(),
        )),
    }
}

/// TCP (5 s connect timeout, no Nagle) and TLS offering the protocols `flavor` speaks.
fn connector(tls: ClientConfig, flavor: Flavor) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    match flavor {
        Flavor::Lane(pool::Protocol::Negotiated) => b.enable_all_versions().wrap_connector(http),
        Flavor::Lane(pool::Protocol::Http2) => b.enable_http2().wrap_connector(http),
        Flavor::Upgrade => b.enable_http1().wrap_connector(http),
    }
}

fn build_client(tls: ClientConfig, flavor: Flavor) -> HttpsClient {
    let connector = connector(tls, flavor);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .http2_keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .build(connector)
}
