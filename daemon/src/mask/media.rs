//! Media types and encodings: what the agent asks for (JSON instead of what cannot
//! be masked), and how each response the API server sends is treated — masked as
//! JSON, masked as text, passed (no body, no plan), or refused.
use std::sync::Arc;

use super::{JsonMasker, MaskError, Masking, Plan, TextMasker};
use crate::util::{is_json, media_type};

/// How a response body is treated.
pub enum BodyMasker {
    Json(JsonMasker),
    Text(TextMasker),
}

impl BodyMasker {
    pub fn feed(&mut self, b: &[u8]) -> Result<Vec<u8>, MaskError> {
        match self {
            BodyMasker::Json(m) => m.feed(b),
            BodyMasker::Text(m) => Ok(m.feed(b)),
        }
    }
    pub fn finish(self) -> Result<Vec<u8>, MaskError> {
        match self {
            BodyMasker::Json(m) => m.finish(),
            BodyMasker::Text(m) => Ok(m.finish()),
        }
    }
}

/// The decision for one response.
pub enum ForResponse {
    /// A schema document (no plan): passed as it is.
    Pass,
    /// A response without a body (HEAD, 204, 304, `Content-Length: 0`): whatever
    /// bytes still come are dropped.
    NoBody,
    Mask(BodyMasker),
    /// A body that cannot be inspected: refused, with the reason.
    Refuse(Unmaskable),
}

/// Why a response body cannot be inspected for masking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmaskable {
    /// A content encoding (gzip, ...).
    #[error("the API server sent a {0} encoded body, which Portcullis cannot inspect for masking")]
    Encoded(String),
    /// Neither JSON nor text (protobuf, ...); `no content type` when there is none.
    #[error(
        "the API server answered with {0}, which Portcullis cannot inspect for masking; request application/json"
    )]
    MediaType(String),
    /// A protocol switch the gate cannot mask (an unknown WebSocket subprotocol, an
    /// extension, a 101 to a request that asked for none).
    #[error("the API server switched to {0}, which Portcullis cannot mask")]
    Upgrade(String),
}

impl Masking {
    /// The pattern detectors, if configured.
    pub fn detectors(&self) -> Option<&Arc<super::Detectors>> {
        self.detectors.as_ref()
    }

    /// Response headers whose values are free text from the API server (`Warning`,
    /// from admission webhooks among others) with the detectors applied.
    pub fn mask_headers(&self, h: &mut http::HeaderMap) {
        let Some(d) = &self.detectors else {
            return;
        };
        let warnings: Vec<http::HeaderValue> = h
            .get_all(http::header::WARNING)
            .iter()
            .map(|v| {
                let masked = d.apply(v.as_bytes());
                http::HeaderValue::from_bytes(&masked)
                    .unwrap_or_else(|_| http::HeaderValue::from_static("299 - \"[masked]\""))
            })
            .collect();
        if warnings.is_empty() {
            return;
        }
        h.remove(http::header::WARNING);
        for w in warnings {
            h.append(http::header::WARNING, w);
        }
    }

    /// How to treat a response with these headers under `plan`.
    pub fn for_response(
        &self,
        plan: Option<&Arc<Plan>>,
        status: http::StatusCode,
        headers: &http::HeaderMap,
        head_request: bool,
    ) -> ForResponse {
        if status == http::StatusCode::SWITCHING_PROTOCOLS {
            return ForResponse::Refuse(Unmaskable::Upgrade(
                "another protocol for a request that asked for no switch".into(),
            ));
        }
        let Some(plan) = plan else {
            return ForResponse::Pass;
        };
        let no_body = head_request
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED
            || headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        if no_body {
            return ForResponse::NoBody;
        }
        if let Some(enc) = headers.get(http::header::CONTENT_ENCODING)
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return ForResponse::Refuse(Unmaskable::Encoded(
                String::from_utf8_lossy(enc.as_bytes()).into_owned(),
            ));
        }
        let media = media_type(
            headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        );
        if is_json(&media) {
            ForResponse::Mask(BodyMasker::Json(JsonMasker::new(plan.clone())))
        } else if media == "text/plain" {
            match &self.detectors {
                Some(d) => ForResponse::Mask(BodyMasker::Text(TextMasker::new(d.clone()))),
                None => ForResponse::Pass,
            }
        } else {
            ForResponse::Refuse(Unmaskable::MediaType(if media.is_empty() {
                "no content type".into()
            } else {
                media
            }))
        }
    }
}

/// Words in the media types the daemon cannot mask (protobuf, YAML, CBOR, CBOR
/// sequences), as an Accept header names them.
const UNMASKABLE_WORDS: [&str; 3] = ["protobuf", "yaml", "cbor"];
/// Letters one of which every word of [`UNMASKABLE_WORDS`] holds (and
/// `application/json` none): the quick check before the word search.
const UNMASKABLE_TELL: [u8; 2] = [b'b', b'y'];

/// The agent's Accept header with every encoding the daemon cannot mask (protobuf,
/// YAML, CBOR) asked for as JSON instead, parameters kept
/// (`as=Table;g=meta.k8s.io;v=v1`).
pub fn json_accept(v: &http::HeaderValue) -> http::HeaderValue {
    let Ok(s) = v.to_str() else {
        return http::HeaderValue::from_static("application/json");
    };
    // Most agents ask for JSON only (kubectl's gets and lists: `application/json`, or
    // Table as JSON): nothing to rewrite, no allocation. Each of the words holds one of
    // the [`UNMASKABLE_TELL`] letters (a test holds every word to it): a value with none
    // (`application/json`) is passed on after one look at each byte instead of a
    // search for each word.
    if !s
        .bytes()
        .any(|c| UNMASKABLE_TELL.contains(&c.to_ascii_lowercase()))
    {
        return v.clone();
    }
    let asks_other = UNMASKABLE_WORDS.iter().any(|w| {
        s.as_bytes()
            .windows(w.len())
            .any(|win| win.eq_ignore_ascii_case(w.as_bytes()))
    });
    if !asks_other {
        return v.clone();
    }
    let mut out = Vec::new();
    for entry in s.split(',') {
        let entry = entry.trim();
        let (media, params) = entry.split_once(';').unwrap_or((entry, ""));
        let media = media.trim().to_ascii_lowercase();
        let json = match media.as_str() {
            "application/vnd.kubernetes.protobuf"
            | "application/yaml"
            | "application/cbor"
            | "application/cbor-seq" => "application/json",
            _ => {
                if !out.iter().any(|e| e == entry) {
                    out.push(entry.to_owned());
                }
                continue;
            }
        };
        let e = if params.is_empty() {
            json.to_owned()
        } else {
            format!("{json};{params}")
        };
        if !out.contains(&e) {
            out.push(e);
        }
    }
    http::HeaderValue::from_str(&out.join(","))
        .unwrap_or_else(|_| http::HeaderValue::from_static("application/json"))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_asks_json_instead_of_protobuf_keeping_parameters() {
        let v = http::HeaderValue::from_static(
            "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        );
        assert_eq!(
            json_accept(&v),
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        );
        let v = http::HeaderValue::from_static("application/vnd.kubernetes.protobuf");
        assert_eq!(json_accept(&v), "application/json");
        // The quick path: nothing to rewrite is passed as it came; any case of a
        // media type the daemon cannot mask still goes through the rewrite.
        let v = http::HeaderValue::from_static("application/json, */*");
        assert_eq!(json_accept(&v), "application/json, */*");
        let v = http::HeaderValue::from_static("Application/YAML;q=0.9, application/json");
        assert_eq!(json_accept(&v), "application/json;q=0.9,application/json");
        let v = http::HeaderValue::from_static("application/CBOR");
        assert_eq!(json_accept(&v), "application/json");
    }

    #[test]
    fn the_quick_accept_check_cannot_miss_an_unmaskable_word() {
        // A word added to the list without one of the tell letters would pass the
        // quick check unrewritten: this fails first.
        for w in UNMASKABLE_WORDS {
            assert!(
                w.bytes().any(|c| UNMASKABLE_TELL.contains(&c)),
                "{w} holds none of the quick check's letters"
            );
        }
        assert!(
            !"application/json"
                .bytes()
                .any(|c| UNMASKABLE_TELL.contains(&c)),
            "the quick check no longer passes plain JSON"
        );
    }

    #[test]
    fn responses_that_cannot_be_inspected_are_refused() {
        let m = Masking::new(true, None, Vec::new());
        let plan = m.others.clone();
        let ok = http::StatusCode::OK;
        let h = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let kind = |r: ForResponse| match r {
            ForResponse::Pass => "pass",
            ForResponse::NoBody => "none",
            ForResponse::Mask(BodyMasker::Json(_)) => "json",
            ForResponse::Mask(BodyMasker::Text(_)) => "text",
            ForResponse::Refuse(_) => "refuse",
        };
        let json = h(&[("content-type", "application/json;stream=watch")]);
        assert_eq!(kind(m.for_response(Some(&plan), ok, &json, false)), "json");
        let pb = h(&[("content-type", "application/vnd.kubernetes.protobuf")]);
        assert_eq!(kind(m.for_response(Some(&plan), ok, &pb, false)), "refuse");
        let gz = h(&[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ]);
        assert_eq!(kind(m.for_response(Some(&plan), ok, &gz, false)), "refuse");
        let text = h(&[("content-type", "text/plain; charset=utf-8")]);
        assert_eq!(kind(m.for_response(Some(&plan), ok, &text, false)), "text");
        assert_eq!(kind(m.for_response(None, ok, &pb, false)), "pass");
        assert_eq!(kind(m.for_response(Some(&plan), ok, &pb, true)), "none");
    }
}
