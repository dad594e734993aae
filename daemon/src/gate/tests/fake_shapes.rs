//! The fake API server's answers in every response shape the gate must mask or
//! refuse, and its WebSocket side: a watch framed as the apiserver's watch handler
//! frames it, a log as wsstream.Reader does.
use std::convert::Infallible;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;

use crate::mask::server_frame;

pub type Body = BoxBody<Bytes, Infallible>;

/// A Secret in JSON, with the canary `Q0FOQVJZ` ("CANARY") in its data.
pub const SECRET_EVENT: &str = r#"{"type":"ADDED","object":{"kind":"Secret","apiVersion":"v1","metadata":{"name":"a","annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{\"data\":{\"k\":\"Q0FOQVJZ\"}}"}},"data":{"k":"Q0FOQVJZ"}}}"#;

/// A Deployment whose pod template carries credentials in every structured place.
pub const DEPLOYMENT: &str = r#"{"kind":"Deployment","apiVersion":"apps/v1","metadata":{"name":"creds","annotations":{"example.com/dsn":"postgres://app:CANARY-ann@db/app","example.com/api-token":"CANARY-ann2"}},"spec":{"replicas":1,"template":{"metadata":{"labels":{"app":"creds"}},"spec":{"initContainers":[{"name":"init","image":"i","command":["sh","-c","PASSWORD=CANARY-init exec init --api-key CANARY-init2"]}],"containers":[{"name":"app","image":"a","args":["--db-password","CANARY-arg","--db-pass=CANARY-arg2","--port","8080"],"env":[{"value":"CANARY-env","name":"STRIPE_KEY"},{"name":"DATABASE_URL","value":"mysql://root:CANARY-url@db/x"},{"name":"MODE","value":"fast"}]}]}}}}"#;

/// A Table of a custom resource whose printer column shows a credential.
pub const CR_TABLE: &str = r#"{"kind":"Table","apiVersion":"meta.k8s.io/v1","metadata":{},"columnDefinitions":[{"name":"Name","type":"string","format":"name","description":"Name must be unique","priority":0},{"name":"Token","type":"string","format":"","description":"Custom resource definition column (in JSONPath format): .spec.auth.apiToken","priority":0},{"name":"Age","type":"date","format":"","description":"","priority":0}],"rows":[{"cells":["x","CANARY-cell","5m"],"object":{"kind":"PartialObjectMetadata"}}]}"#;

fn reply(code: StatusCode, ctype: Option<&str>, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = code;
    if let Some(c) = ctype {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_str(c).unwrap());
    }
    r
}

/// `/api/v1/namespaces/e2e/configmaps/shape-NAME`: one response shape each; and the
/// Deployment and Table above.
pub fn answer(path: &str, method: &http::Method) -> Option<Response<Body>> {
    const JSON: &str = "application/json";
    if path == "/apis/apps/v1/namespaces/e2e/deployments/creds" {
        return Some(reply(StatusCode::OK, Some(JSON), DEPLOYMENT));
    }
    if path == "/apis/example.com/v1/namespaces/e2e/things" {
        return Some(reply(StatusCode::OK, Some(JSON), CR_TABLE));
    }
    let shape = path.strip_prefix("/api/v1/namespaces/e2e/configmaps/shape-")?;
    let secret = r#"{"kind":"ConfigMap","data":{"password":"CANARY"}}"#;
    let encoded = |enc: &'static str| {
        let mut r = reply(StatusCode::OK, Some(JSON), &b"\x1f\x8b\x08\x00CANARY"[..]);
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static(enc));
        r
    };
    Some(match shape {
        "protobuf" => reply(
            StatusCode::OK,
            Some("application/vnd.kubernetes.protobuf"),
            &b"k8s\x00\x0a\x0fCANARY"[..],
        ),
        "protobuf-watch" => reply(
            StatusCode::OK,
            Some("application/vnd.kubernetes.protobuf;stream=watch"),
            &b"\x00\x00\x00\x10k8s\x00CANARY"[..],
        ),
        "cbor" => reply(
            StatusCode::OK,
            Some("application/cbor"),
            &b"\xd9\xd9\xf7\xa1dkeyfCANARY"[..],
        ),
        "cbor-seq" => reply(
            StatusCode::OK,
            Some("application/cbor-seq"),
            &b"\xa1dkeyfCANARY"[..],
        ),
        "yaml" => reply(
            StatusCode::OK,
            Some("application/yaml"),
            "data:\n  password: CANARY\n",
        ),
        "gzip" => encoded("gzip"),
        "deflate" => encoded("deflate"),
        "br" => encoded("br"),
        "multipart" => reply(
            StatusCode::OK,
            Some("multipart/mixed; boundary=x"),
            "--x\r\nContent-Type: application/json\r\n\r\n{\"password\":\"CANARY\"}\r\n--x--\r\n",
        ),
        "octet" => reply(StatusCode::OK, Some("application/octet-stream"), "CANARY"),
        "html" => reply(StatusCode::OK, Some("text/html"), "<p>password=CANARY</p>"),
        "untyped" => reply(StatusCode::OK, None, "password=CANARY"),
        "json-seq" => reply(StatusCode::OK, Some("application/json-seq"), secret),
        // Masked, not refused:
        "pretty" => reply(
            StatusCode::OK,
            Some(JSON),
            "{\n  \"kind\": \"ConfigMap\",\n  \"data\": {\n    \"password\": \"CANARY\"\n  }\n}\n",
        ),
        "error-echo" => reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(JSON),
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Invalid","code":422,"message":"Deployment \"d\" is invalid: spec.template.spec.containers[0].args: Invalid value: \"--db-password CANARY\"; env DB_PASS=CANARY-2; url postgres://u:CANARY-3@h","details":{"causes":[{"field":"data.password","message":"Invalid value: \"password=CANARY-4\""}]}}"#,
        ),
        "plain-error" => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("text/plain; charset=utf-8"),
            "internal error: token: CANARY\n",
        ),
        "warning" => {
            let mut r = reply(StatusCode::OK, Some(JSON), "{}");
            r.headers_mut().insert(
                header::WARNING,
                HeaderValue::from_static("299 - \"webhook saw password=CANARY\""),
            );
            r
        }
        "trailers" => {
            let mut t = HeaderMap::new();
            t.insert("x-secret", HeaderValue::from_static("token=CANARY"));
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                Ok(Frame::data(Bytes::from_static(b"{\"kind\":\"ConfigMap\"}"))),
                Ok(Frame::trailers(t)),
            ];
            let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
            r
        }
        "not-modified" => reply(StatusCode::NOT_MODIFIED, Some(JSON), Bytes::new()),
        "no-content" => reply(StatusCode::NO_CONTENT, None, Bytes::new()),
        "head" if method == http::Method::HEAD => {
            let mut r = reply(StatusCode::OK, Some(JSON), Bytes::new());
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("37"));
            r
        }
        "head" => reply(StatusCode::OK, Some(JSON), secret),
        _ => return None,
    })
}

/// What the fake API does with a WebSocket upgrade it accepts: the subprotocol it
/// answers with, an extension it claims, and the frames it sends before it closes;
/// `None` for upgrades it treats as a session (exec: echo).
pub struct WsScript {
    pub protocol: Option<String>,
    pub extension: Option<&'static str>,
    pub frames: Vec<u8>,
}

pub fn ws_script(path: &str, query: &str, offered: &[String]) -> Option<WsScript> {
    let close = server_frame(8, true, &1000u16.to_be_bytes());
    if path == "/api/v1/namespaces/e2e/secrets" && query.contains("watch") {
        // As the apiserver's watch handler: the one offered protocol is echoed, each
        // event is one text message. Here one is fragmented, with a ping between.
        let mut frames = server_frame(1, true, format!("{SECRET_EVENT}\n").as_bytes());
        let ev = SECRET_EVENT.replace("\"a\"", "\"b\"");
        let (x, y) = ev.as_bytes().split_at(30);
        frames.extend(server_frame(1, false, x));
        frames.extend(server_frame(9, true, b""));
        frames.extend(server_frame(0, true, y));
        frames.extend(close);
        return Some(WsScript {
            protocol: offered.first().cloned(),
            extension: query.contains("deflate").then_some("permessage-deflate"),
            frames,
        });
    }
    let log = b"starting\nconnecting with password=hunter2 now\nkey AKIAIOSFODNN7EXAMPLE\ndone\n";
    if path == "/api/v1/namespaces/e2e/pods/p/log" {
        // As wsstream.Reader: base64 if asked, else binary; an empty first message.
        let b64 = offered.iter().any(|p| p == "base64.binary.k8s.io");
        let mut frames = Vec::new();
        for part in [&log[..0], &log[..15], &log[15..40], &log[40..]] {
            frames.extend(if b64 {
                server_frame(
                    1,
                    true,
                    base64::engine::general_purpose::STANDARD
                        .encode(part)
                        .as_bytes(),
                )
            } else {
                server_frame(2, true, part)
            });
        }
        frames.extend(close);
        return Some(WsScript {
            protocol: b64.then(|| "base64.binary.k8s.io".to_owned()),
            extension: None,
            frames,
        });
    }
    if path == "/api/v1/namespaces/e2e/pods/weird/log" {
        return Some(WsScript {
            protocol: Some("x-weird.example.com".into()),
            extension: None,
            frames: server_frame(2, true, log),
        });
    }
    None
}

/// The protocols a WebSocket request offers.
pub fn offered(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}
