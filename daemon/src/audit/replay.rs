//! `portcullis replay SESSION`: re-issues a recorded session's requests, in order,
//! against a sandbox cluster and reports where the outcome (status code) differs from
//! the recording. Mutations carry `dryRun=All` unless `--apply` is given, so a replay
//! changes nothing by default. What cannot be re-issued is listed with the reason:
//! upgraded sessions (exec/attach/port-forward), watches (long-running), requests the
//! gate refused (they never reached a cluster), and mutations whose body was not
//! recorded (audit level Metadata, or a protobuf body that cannot be masked).
use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use super::Exchange;
use crate::tls;

/// Why a replay could not run (each is the context; the cause is its source).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("building the client for --server")]
    Client(#[source] tls::HttpError),
    #[error("reading {}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recorded method")]
    Method(#[source] http::method::InvalidMethod),
    #[error("building the request")]
    Request(#[source] http::Error),
    #[error("encoding the recorded body")]
    Body(#[source] serde_json::Error),
}

pub struct Target {
    pub server: String,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Mutations really applied (no dryRun).
    pub apply: bool,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub seq: u64,
    pub method: String,
    pub uri: String,
    pub recorded: Option<u16>,
    pub replayed: Option<u16>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Why an exchange cannot be re-issued, if it cannot.
/// How a step compares with its recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Replayed; the same status code as recorded.
    Same,
    /// Replayed; another status code.
    Differs,
    /// Not re-issued (see the note).
    Skipped,
    /// Re-issued, no answer.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Same => "same",
            Outcome::Differs => "differs",
            Outcome::Skipped => "skipped",
            Outcome::Error => "error",
        }
    }

    /// The replay disagrees with the recording.
    pub fn differs(self) -> bool {
        matches!(self, Outcome::Differs | Outcome::Error)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Padding applies (the table aligns outcomes).
        f.pad(self.as_str())
    }
}

fn unreplayable(ex: &Exchange) -> Option<String> {
    let r = &ex.request;
    if !r.decision.forwarded() {
        return Some(format!(
            "refused by the gate when recorded ({})",
            r.decision
        ));
    }
    if r.upgrade {
        return Some("an upgraded session (exec/attach/port-forward) is not replayed".into());
    }
    if r.attributes.verb == "watch" {
        return Some("a watch is long-running; not replayed".into());
    }
    if matches!(r.method.as_str(), "POST" | "PUT" | "PATCH") {
        match &r.request_body {
            None => return Some("the body was not recorded (audit level Metadata)".into()),
            Some(b) if b.get("omitted").is_some() || b.get("truncated").is_some() => {
                return Some(format!(
                    "the body was not recorded whole: {}",
                    b.get("omitted")
                        .and_then(|v| v.as_str())
                        .unwrap_or("truncated")
                ));
            }
            // Decoded from protobuf for the record: only the fields that can carry
            // credentials, so not the request as sent.
            Some(b) if b.get("portcullis.dev/decoded").is_some() => {
                return Some(format!(
                    "the body was not recorded whole: {}",
                    b["portcullis.dev/decoded"]
                        .as_str()
                        .unwrap_or("partly decoded")
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// Re-issues `exchanges` in order against `t`; one step per exchange.
pub async fn replay(exchanges: &[Exchange], t: &Target) -> Result<Vec<Step>, ReplayError> {
    let client = tls::https_client(t.ca_file.as_deref(), false).map_err(ReplayError::Client)?;
    let token = match &t.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|source| ReplayError::Token {
                    path: p.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let base = t.server.trim_end_matches('/');
    let mut steps = Vec::new();
    for ex in exchanges {
        let r = &ex.request;
        let mut query = r.query.clone();
        if r.mutating && !t.apply {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str("dryRun=All");
        }
        let uri = if query.is_empty() {
            r.path.clone()
        } else {
            format!("{}?{query}", r.path)
        };
        let mut step = Step {
            seq: ex.seq,
            method: r.method.clone(),
            uri: uri.clone(),
            recorded: ex.response.as_ref().map(|s| s.code),
            replayed: None,
            outcome: Outcome::Skipped,
            note: String::new(),
        };
        if let Some(why) = unreplayable(ex) {
            step.note = why;
            steps.push(step);
            continue;
        }
        let body = match &r.request_body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(ReplayError::Body)?),
            None => Bytes::new(),
        };
        let method = Method::from_bytes(r.method.as_bytes()).map_err(ReplayError::Method)?;
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{base}{uri}"))
            .header(header::ACCEPT, "application/json");
        if !body.is_empty() {
            let ct = if r.content_type.is_empty() {
                "application/json"
            } else {
                r.content_type.as_str()
            };
            b = b.header(header::CONTENT_TYPE, ct);
        }
        if let Some(tok) = &token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {tok}"));
        }
        let req = b.body(Full::new(body)).map_err(ReplayError::Request)?;
        let sent = tokio::time::timeout(Duration::from_secs(30), client.request(req)).await;
        match sent {
            Ok(Ok(resp)) => {
                let code = resp.status().as_u16();
                // Drain the body so the connection is reused.
                let _ = resp.into_body().collect().await;
                step.replayed = Some(code);
                step.outcome = if step.recorded == Some(code) {
                    Outcome::Same
                } else {
                    Outcome::Differs
                };
                if step.recorded.is_none() {
                    step.note = "no outcome was recorded (the daemon stopped mid-request?)".into();
                }
            }
            Ok(Err(e)) => {
                step.outcome = Outcome::Error;
                step.note = crate::util::source_chain(&e);
            }
            Err(_) => {
                step.outcome = Outcome::Error;
                step.note = "no answer within 30 s".into();
            }
        }
        steps.push(step);
    }
    Ok(steps)
}
