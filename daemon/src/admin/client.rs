//! The admin API from the other side, as a library: a call over the node socket or
//! over HTTPS to a remote daemon with an OIDC token, answering the JSON the API sent.
//! (`portcullis approvals`/`grants` present it; a kubectl plugin can reuse it.)
use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::tls;

/// Where the admin API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The node socket (root, or the daemon's own user).
    Socket(PathBuf),
    /// A remote daemon's admin HTTPS address, with the caller's OIDC token.
    Https {
        server: String,
        token: String,
        ca_file: Option<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "connecting to the admin socket {} (is the daemon running, and are you root?)",
        path.display()
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Client(#[from] tls::HttpError),
    #[error(transparent)]
    Request(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    Build(#[from] http::Error),
    #[error(transparent)]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Runtime(#[from] std::io::Error),
    #[error("admin API answered {code}: {body}")]
    NotJson {
        code: StatusCode,
        body: String,
        #[source]
        source: serde_json::Error,
    },
    /// The API refused the call and said why.
    #[error("{message} ({code})")]
    Refused { message: String, code: StatusCode },
}

pub struct AdminClient {
    endpoint: Endpoint,
}

impl AdminClient {
    pub fn new(endpoint: Endpoint) -> AdminClient {
        AdminClient { endpoint }
    }

    /// `method path` with an optional JSON body; the API's JSON answer.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, AdminError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(self.call_async(method, path, body))
    }

    async fn call_async(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, AdminError> {
        let body = Full::new(Bytes::from(
            body.map(|b| serde_json::to_vec(&b))
                .transpose()?
                .unwrap_or_default(),
        ));
        let resp = match &self.endpoint {
            Endpoint::Socket(sock) => {
                let stream = tokio::net::UnixStream::connect(sock)
                    .await
                    .map_err(|source| AdminError::Connect {
                        path: sock.clone(),
                        source,
                    })?;
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                let req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header(header::HOST, "portcullis")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body)?;
                send.send_request(req).await?.map(|b| b.boxed())
            }
            Endpoint::Https {
                server,
                token,
                ca_file,
            } => {
                let client = tls::https_client(ca_file.as_deref(), false)?;
                let req = Request::builder()
                    .method(method)
                    .uri(format!("{}{path}", server.trim_end_matches('/')))
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body)?;
                client.request(req).await?.map(|b| b.boxed())
            }
        };
        let code = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|source| AdminError::NotJson {
            code,
            body: String::from_utf8_lossy(&bytes).into_owned(),
            source,
        })?;
        if !code.is_success() {
            return Err(AdminError::Refused {
                message: v["error"].as_str().unwrap_or("admin API error").to_owned(),
                code,
            });
        }
        Ok(v)
    }
}
