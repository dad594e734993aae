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
    /// What the failure is about, field by field (kubectl shows the causes of an
    /// `Invalid` Status, e.g. in the header of `kubectl edit`'s re-opened file).
    pub details: Option<StatusDetails>,
}

/// `metav1.StatusDetails`: the object and the fields at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusDetails {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    pub causes: Vec<StatusCause>,
}

/// `metav1.StatusCause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusCause {
    pub reason: String,
    pub message: String,
    pub field: String,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a StatusDetails>,
    code: u16,
}

#[derive(Serialize)]
struct Empty {}

impl Status {
    pub fn failure(code: StatusCode, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: StatusDetails) -> Status {
        self.details = Some(details);
        self
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
            details: self.details.as_ref(),
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
        assert!(v.get("details").is_none());
        let s =
            Status::failure(StatusCode::UNPROCESSABLE_ENTITY, "m").with_details(StatusDetails {
                name: "s".into(),
                group: String::new(),
                kind: "secrets".into(),
                causes: vec![StatusCause {
                    reason: "FieldValueInvalid".into(),
                    message: "m".into(),
                    field: "data.k".into(),
                }],
            });
        let v: serde_json::Value = serde_json::from_slice(&s.body()).unwrap();
        assert_eq!(v["reason"], "Invalid");
        assert_eq!(v["details"]["causes"][0]["field"], "data.k");
        assert_eq!(v["details"]["kind"], "secrets");
    }
}
