//! Errors on the wire as kubectl expects them: a `metav1.Status` JSON body with the
//! HTTP code, a machine-readable reason and a message for the human.
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::util::ProxyBody;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status<'a> {
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

/// The metav1.StatusReason the apiserver uses for `code`.
pub fn reason_for(code: StatusCode) -> &'static str {
    match code.as_u16() {
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
        _ if code.is_server_error() => "InternalError",
        _ => "BadRequest",
    }
}

pub fn body(code: StatusCode, message: &str) -> Vec<u8> {
    serde_json::to_vec(&Status {
        kind: "Status",
        api_version: "v1",
        metadata: Empty {},
        status: "Failure",
        message,
        reason: reason_for(code),
        code: code.as_u16(),
    })
    .unwrap_or_default()
}

/// A complete failure response.
pub fn response(code: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(crate::util::full(body(code, message)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if code == StatusCode::SERVICE_UNAVAILABLE || code == StatusCode::TOO_MANY_REQUESTS {
        // client-go retries these after Retry-After seconds.
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_body_is_a_metav1_status() {
        let v: serde_json::Value =
            serde_json::from_slice(&body(StatusCode::SERVICE_UNAVAILABLE, "upstream down"))
                .unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["code"], 503);
        assert_eq!(v["message"], "upstream down");
    }
}
