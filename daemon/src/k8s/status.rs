//! Errors on the wire as kubectl expects them: a `metav1.Status` JSON body with the
//! HTTP code, a machine-readable reason and a message for the human.
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::util::{self, ProxyBody};

/// A failure `metav1.Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: StatusCode,
    pub message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    kind: &'static str,
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    message: &'a str,
    reason: &'a str,
    code: u16,
}

#[derive(Serialize)]
struct Empty {}

impl Status {
    pub fn failure(code: StatusCode, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    /// The metav1.StatusReason the apiserver uses for the code.
    pub fn reason(&self) -> &'static str {
        match self.code.as_u16() {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            406 => "NotAcceptable",
            409 => "Conflict",
            413 => "RequestEntityTooLarge",
            415 => "UnsupportedMediaType",
            422 => "Invalid",
            429 => "TooManyRequests",
            504 => "Timeout",
            503 => "ServiceUnavailable",
            _ if self.code.is_server_error() => "InternalError",
            _ => "BadRequest",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&Wire {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Failure",
            message: &self.message,
            reason: self.reason(),
            code: self.code.as_u16(),
        })
        .unwrap_or_default()
    }

    /// The complete response. 503 and 429 carry `Retry-After: 1`, which client-go
    /// honours.
    pub fn response(&self) -> Response<ProxyBody> {
        let mut resp = Response::new(util::full(self.body()));
        *resp.status_mut() = self.code;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.code == StatusCode::SERVICE_UNAVAILABLE
            || self.code == StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_body_is_a_metav1_status() {
        let s = Status::failure(StatusCode::SERVICE_UNAVAILABLE, "upstream down");
        let v: serde_json::Value = serde_json::from_slice(&s.body()).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["code"], 503);
        assert_eq!(v["message"], "upstream down");
        assert_eq!(s.response().headers()["retry-after"], "1");
    }
}
