//! Outbound HTTPS for the daemon's side calls (OIDC discovery and JWKS, approval
//! webhooks, the audit sink) and the CLI's (replay, the remote admin API): the one
//! client configuration, bounded bodies, timeouts on every call.
use std::{path::Path, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use super::{ClientError, client_config};
use crate::util::{BoxError, source_chain};

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Tls(#[from] ClientError),
    #[error("`{0}` is not a valid URL")]
    Url(String),
    /// The request could not be built (a header value the URL or caller gave).
    #[error("{url}: {source}")]
    Build {
        url: String,
        #[source]
        source: http::Error,
    },
    /// No answer: hyper's error says little without its causes, so the message
    /// carries the whole chain (the error itself is kept too).
    #[error("{url}: {}", source_chain(error))]
    Request {
        url: String,
        error: hyper_util::client::legacy::Error,
    },
    #[error("{url}: reading the body: {source}")]
    Body {
        url: String,
        #[source]
        source: BoxError,
    },
    #[error("{url}: answered {code}")]
    Status { url: String, code: StatusCode },
    #[error("{url}: no answer within {secs} s")]
    Timeout { url: String, secs: u64 },
}

/// A client trusting `ca_file` (PEM bundle) or, without it, the public web roots.
/// `allow_http`: plain http:// too (webhooks inside the cluster network).
pub fn client(ca_file: Option<&Path>, allow_http: bool) -> Result<HttpClient, HttpError> {
    let tls = client_config(ca_file, None)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let b = if allow_http {
        b.https_or_http()
    } else {
        b.https_only()
    };
    Ok(Client::builder(TokioExecutor::new()).build(b.enable_http1().wrap_connector(http)))
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// GET `url`, expecting 2xx, body at most `limit` bytes.
pub async fn get(c: &HttpClient, url: &str, limit: usize) -> Result<Bytes, HttpError> {
    let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.into()))?;
    let req = Request::get(uri)
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|source| HttpError::Build {
            url: url.into(),
            source,
        })?;
    send(c, url, req, limit).await
}

/// POST a JSON body to `url`, expecting 2xx.
pub async fn post_json(c: &HttpClient, url: &str, body: Vec<u8>) -> Result<Bytes, HttpError> {
    let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.into()))?;
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|source| HttpError::Build {
            url: url.into(),
            source,
        })?;
    send(c, url, req, 64 * 1024).await
}

async fn send(
    c: &HttpClient,
    url: &str,
    req: Request<Full<Bytes>>,
    limit: usize,
) -> Result<Bytes, HttpError> {
    let call = async {
        let resp = c.request(req).await.map_err(|error| HttpError::Request {
            url: url.into(),
            error,
        })?;
        let code = resp.status();
        if !code.is_success() {
            return Err(HttpError::Status {
                url: url.into(),
                code,
            });
        }
        Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|source| HttpError::Body {
                url: url.into(),
                source,
            })
    };
    tokio::time::timeout(TIMEOUT, call)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.into(),
            secs: TIMEOUT.as_secs(),
        })?
}
