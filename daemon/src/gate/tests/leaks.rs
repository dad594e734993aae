//! Masking on every response path, through the whole gate: every response shape
//! (masked or refused, never passed), every upgrade (a byte pipe only for the
//! interactive subresources; a WebSocket watch or log masked message by message;
//! anything else served without its upgrade), structured credentials in workloads
//! and Tables, placeholders written back (refused, whatever the encoding), and
//! request bodies recorded decoded and masked.
use base64::Engine;
use http::StatusCode;

use super::{
    PLACEHOLDER_B64,
    fake_shapes::{CR_TABLE, DEPLOYMENT},
    lab::{From, Lab, Mode, Options, req},
    pass_through,
};
use crate::mask::read_messages;

const REFUSED: &[&str] = &[
    "protobuf",
    "protobuf-watch",
    "cbor",
    "cbor-seq",
    "yaml",
    "gzip",
    "deflate",
    "br",
    "multipart",
    "octet",
    "html",
    "untyped",
    "json-seq",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_shape_is_masked_or_refused_never_passed() {
    let lab = pass_through().await;
    for h2 in [false, true] {
        for shape in REFUSED {
            let path = format!("/api/v1/namespaces/e2e/configmaps/shape-{shape}");
            let r = lab
                .send(From::PodA, h2, req("GET", &path, None, None))
                .await;
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{shape}: {}", r.body);
            assert!(!r.body.contains("CANARY"), "{shape}: {}", r.body);
            assert!(
                r.message().contains("cannot inspect"),
                "{shape}: {}",
                r.body
            );
        }
        for shape in ["pretty", "error-echo", "plain-error", "warning", "trailers"] {
            let path = format!("/api/v1/namespaces/e2e/configmaps/shape-{shape}");
            let r = lab
                .send(From::PodA, h2, req("GET", &path, None, None))
                .await;
            let all = format!("{:?} {} {:?}", r.headers, r.body, r.trailers);
            assert!(!all.contains("CANARY"), "{shape} h2={h2}: {all}");
            assert!(
                r.status.as_u16() < 500 || shape == "plain-error",
                "{shape}: {all}"
            );
        }
        let r = lab
            .send(
                From::PodA,
                h2,
                req(
                    "GET",
                    "/api/v1/namespaces/e2e/configmaps/shape-pretty",
                    None,
                    None,
                ),
            )
            .await;
        assert_eq!(r.json()["data"]["password"], "portcullis-masked");
        let r = lab
            .send(
                From::PodA,
                h2,
                req(
                    "GET",
                    "/api/v1/namespaces/e2e/configmaps/shape-error-echo",
                    None,
                    None,
                ),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r.json()["reason"], "Invalid");
        // Bodiless answers stay bodiless.
        for (method, shape, code) in [
            ("HEAD", "head", 200),
            ("GET", "not-modified", 304),
            ("GET", "no-content", 204),
        ] {
            let path = format!("/api/v1/namespaces/e2e/configmaps/shape-{shape}");
            let r = lab
                .send(From::PodA, h2, req(method, &path, None, None))
                .await;
            assert_eq!(r.status.as_u16(), code, "{shape}");
            assert!(r.body.is_empty(), "{shape}: {}", r.body);
        }
    }
    // CBOR and YAML are asked for as JSON.
    let mut r = req("GET", "/api/v1/namespaces/e2e/configmaps", None, None);
    r.headers_mut().insert(
        "accept",
        "application/cbor, application/cbor-seq, application/yaml"
            .parse()
            .unwrap(),
    );
    lab.send(From::PodA, true, r).await;
    let seen = lab.api.seen_at("GET", "/api/v1/namespaces/e2e/configmaps");
    assert_eq!(seen.last().unwrap().headers["accept"], "application/json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_credentials_in_workloads_and_table_columns_are_masked() {
    let lab = pass_through().await;
    for h2 in [false, true] {
        let r = lab
            .send(
                From::PodA,
                h2,
                req(
                    "GET",
                    "/apis/apps/v1/namespaces/e2e/deployments/creds",
                    None,
                    None,
                ),
            )
            .await;
        assert!(!r.body.contains("CANARY"), "{}", r.body);
        let v = r.json();
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["args"][1], "portcullis-masked");
        assert_eq!(c["args"][4], "8080");
        assert_eq!(c["env"][0]["value"], "portcullis-masked");
        assert_eq!(c["env"][1]["value"], "mysql://root:[masked]@db/x");
        assert_eq!(c["env"][2]["value"], "fast");
        let r = lab
            .send(
                From::PodA,
                h2,
                req(
                    "GET",
                    "/apis/example.com/v1/namespaces/e2e/things",
                    None,
                    None,
                ),
            )
            .await;
        assert!(!r.body.contains("CANARY"), "{}", r.body);
        assert_eq!(
            r.json()["rows"][0]["cells"],
            serde_json::json!(["x", "portcullis-masked", "5m"])
        );
    }
    assert!(CR_TABLE.contains("CANARY") && DEPLOYMENT.contains("CANARY"));
}

fn ws_headers<'a>(
    protocol: Option<&'a str>,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Origin", "https://kubernetes.default"),
    ];
    if let Some(p) = protocol {
        h.push(("Sec-WebSocket-Protocol", p));
    }
    h.extend_from_slice(extra);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_watch_is_masked_message_by_message() {
    let lab = pass_through().await;
    for protocol in [
        None,
        Some("base64.channel.k8s.io"),
        Some("v5.channel.k8s.io"),
    ] {
        let path = "/api/v1/namespaces/e2e/secrets?watch=1";
        let (head, rest) = lab
            .upgrade(
                From::PodA,
                "GET",
                path,
                &ws_headers(
                    protocol,
                    &[("Sec-WebSocket-Extensions", "permessage-deflate")],
                ),
            )
            .await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let msgs = read_messages(&rest).unwrap();
        let text: Vec<String> = msgs
            .iter()
            .filter(|(op, _)| *op == 1)
            .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
            .collect();
        assert_eq!(text.len(), 2, "{msgs:?}");
        for t in &text {
            assert!(!t.contains("Q0FOQVJZ"), "{t}");
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            assert_eq!(v["object"]["data"]["k"], PLACEHOLDER_B64);
        }
        assert_eq!(msgs.last().unwrap().0, 8, "ends with the server's close");
        // No compression was negotiated upstream.
        let seen = lab.api.seen_at("GET", "/api/v1/namespaces/e2e/secrets");
        let last = seen.last().unwrap();
        assert!(!last.headers.contains_key("sec-websocket-extensions"));
        assert_eq!(last.headers["upgrade"], "websocket");
    }
    let (rec, resp) = lab.records("GET", "/api/v1/namespaces/e2e/secrets").await;
    assert!(rec.upgrade && rec.mutating);
    assert_eq!(resp.code, 101);
    // A server that insists on an extension is not relayed.
    let (head, rest) = lab
        .upgrade(
            From::PodA,
            "GET",
            "/api/v1/namespaces/e2e/secrets?watch=1&deflate=1",
            &ws_headers(None, &[]),
        )
        .await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(!String::from_utf8_lossy(&rest).contains("Q0FOQVJZ"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_log_follow_is_masked_in_each_framing() {
    let lab = pass_through().await;
    for protocol in [None, Some("binary.k8s.io"), Some("base64.binary.k8s.io")] {
        let (head, rest) = lab
            .upgrade(
                From::PodA,
                "GET",
                "/api/v1/namespaces/e2e/pods/p/log?follow=true",
                &ws_headers(protocol, &[]),
            )
            .await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut text = Vec::new();
        for (op, p) in read_messages(&rest).unwrap() {
            match op {
                1 => text.extend(base64::engine::general_purpose::STANDARD.decode(p).unwrap()),
                2 => text.extend(p),
                _ => {}
            }
        }
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "starting\nconnecting with password=[masked] now\nkey [masked:aws-key]\ndone\n",
            "{protocol:?}"
        );
    }
    // A subprotocol the gate cannot read is refused.
    let (head, rest) = lab
        .upgrade(
            From::PodA,
            "GET",
            "/api/v1/namespaces/e2e/pods/weird/log?follow=true",
            &ws_headers(Some("x-weird.example.com"), &[]),
        )
        .await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(!String::from_utf8_lossy(&rest).contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_upgrade_requests_are_served_without_their_upgrade() {
    let lab = pass_through().await;
    let spdy = [
        ("Connection", "Upgrade"),
        ("Upgrade", "SPDY/3.1"),
        ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
    ];
    type Headers<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(&str, &str, Headers)> = vec![
        (
            "GET",
            "/api/v1/namespaces/e2e/secrets/s",
            ws_headers(Some("v5.channel.k8s.io"), &[]),
        ),
        (
            "GET",
            "/api/v1/namespaces/e2e/secrets",
            ws_headers(None, &[]),
        ),
        (
            "GET",
            "/api/v1/namespaces/e2e/secrets?watch=1",
            spdy.to_vec(),
        ),
        ("GET", "/api/v1/namespaces/e2e/pods/p/log", spdy.to_vec()),
        (
            "GET",
            "/api/v1/namespaces/e2e/secrets?watch=1",
            vec![("Connection", "Upgrade"), ("Upgrade", "h2c")],
        ),
    ];
    for (method, path, headers) in cases {
        let (head, rest) = lab.upgrade(From::PodA, method, path, &headers).await;
        let body = String::from_utf8_lossy(&rest);
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(!head.to_lowercase().contains("upgrade"), "{path}: {head}");
        assert!(
            !body.contains("Q0FOQVJZ") && !body.contains("hunter2"),
            "{path}: {body}"
        );
        assert!(
            body.contains("portcullis-masked")
                || body.contains(PLACEHOLDER_B64)
                || body.contains("[masked"),
            "{path}: {body}"
        );
        let (p, _) = path.split_once('?').unwrap_or((path, ""));
        let seen = lab.api.seen_at(method, p);
        let last = seen.last().unwrap();
        assert!(
            !last.headers.contains_key("upgrade")
                && !last.headers.contains_key("sec-websocket-protocol"),
            "{path}: {:?}",
            last.headers
        );
        let (rec, _) = lab.records(method, p).await;
        assert!(rec.upgrade && !rec.mutating, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_byte_streams_only_where_policy_allows_them() {
    // The lab policy denies pods/exec; every read is allowed. An exec upgrade is then
    // refused before anything reaches the API server, in whatever protocol.
    let lab = Lab::start(Options::new(Mode::Gated)).await;
    let token = lab.agent_token();
    let auth = format!("Bearer {token}");
    for (method, upgrade) in [("GET", "websocket"), ("POST", "SPDY/3.1")] {
        let (head, _) = lab
            .upgrade(
                From::PodA,
                method,
                "/api/v1/namespaces/e2e/pods/p/exec?command=sh",
                &[
                    ("Connection", "Upgrade"),
                    ("Upgrade", upgrade),
                    ("Authorization", &auth),
                ],
            )
            .await;
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    }
    assert!(
        lab.api
            .seen_at("GET", "/api/v1/namespaces/e2e/pods/p/exec")
            .is_empty()
    );
    // The refused exec's command line is in the record, masked as argv.
    let (head, _) = lab
        .upgrade(
            From::PodA,
            "GET",
            "/api/v1/namespaces/e2e/pods/q/exec?command=mysql&command=--password&command=CANARY-q&command=-e&command=select",
            &[("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Authorization", &auth)],
        )
        .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (rec, _) = lab
        .records("GET", "/api/v1/namespaces/e2e/pods/q/exec")
        .await;
    assert!(!rec.query.contains("CANARY"), "{}", rec.query);
    assert!(rec.query.contains("command=select"), "{}", rec.query);
    // A watch allowed as a read is masked, not piped.
    let mut h = ws_headers(None, &[]);
    h.push(("Authorization", &auth));
    let (head, rest) = lab
        .upgrade(
            From::PodA,
            "GET",
            "/api/v1/namespaces/e2e/secrets?watch=1",
            &h,
        )
        .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(!String::from_utf8_lossy(&rest).contains("Q0FOQVJZ"));
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_carry_a_placeholder_are_refused_in_every_encoding() {
    let lab = pass_through().await;
    let fingerprinted = b64(b"portcullis-masked:00112233aabbccdd");
    let secret_yaml = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  token: portcullis-masked\n";
    let mut cbor = Vec::new();
    ciborium::into_writer(
        &ciborium::Value::Map(vec![(
            ciborium::Value::Text("data".into()),
            ciborium::Value::Map(vec![(
                ciborium::Value::Text("k".into()),
                ciborium::Value::Bytes(b"portcullis-masked".to_vec()),
            )]),
        )]),
        &mut cbor,
    )
    .unwrap();
    let proto = crate::k8s::protobuf_encode::secret("s", "k", b"portcullis-masked");
    let proto_deploy =
        crate::k8s::protobuf_encode::deployment("d", &["--db-password", "portcullis-masked"], &[]);
    let last_applied = serde_json::json!({"metadata": {"annotations": {
        "kubectl.kubernetes.io/last-applied-configuration":
            serde_json::json!({"data": {"k": PLACEHOLDER_B64}}).to_string()}}})
    .to_string();
    let cases: Vec<(&str, &str, &str, Vec<u8>, &str)> = vec![
        (
            "PUT",
            "/api/v1/namespaces/e2e/secrets/s",
            "application/json",
            super::fake_api::SECRET
                .replace("Q0FOQVJZ", PLACEHOLDER_B64)
                .into_bytes(),
            "data.k",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/e2e/secrets/s",
            "application/merge-patch+json",
            format!(r#"{{"data":{{"k":"{fingerprinted}"}}}}"#).into_bytes(),
            "data.k",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/e2e/secrets/s",
            "application/strategic-merge-patch+json",
            last_applied.into_bytes(),
            "metadata.annotations[kubectl.kubernetes.io/last-applied-configuration]",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/e2e/secrets/s",
            "application/json-patch+json",
            format!(r#"[{{"op":"replace","path":"/data/k","value":"{PLACEHOLDER_B64}"}}]"#)
                .into_bytes(),
            "/data/k",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/e2e/secrets/s?fieldManager=a",
            "application/apply-patch+yaml",
            secret_yaml.as_bytes().to_vec(),
            "stringData.token",
        ),
        (
            "POST",
            "/api/v1/namespaces/e2e/configmaps",
            "application/json",
            br#"{"kind":"ConfigMap","data":{"app.properties":"db.password=[masked]"}}"#.to_vec(),
            "data[app.properties]",
        ),
        (
            "POST",
            "/api/v1/namespaces/e2e/secrets",
            "application/cbor",
            cbor,
            "data.k",
        ),
        (
            "POST",
            "/api/v1/namespaces/e2e/secrets",
            "application/vnd.kubernetes.protobuf",
            proto,
            "data.k",
        ),
        (
            "POST",
            "/apis/apps/v1/namespaces/e2e/deployments",
            "application/vnd.kubernetes.protobuf",
            proto_deploy,
            "spec.template.spec.containers[0].args[1]",
        ),
    ];
    for (method, path, ctype, body, field) in cases {
        let mut r = req(method, path, None, None);
        r.headers_mut()
            .insert("content-type", ctype.parse().unwrap());
        *r.body_mut() = http_body_util::Full::new(bytes::Bytes::from(body));
        let reply = lab.send(From::PodA, false, r).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{ctype}: {}",
            reply.body
        );
        assert_eq!(reply.json()["reason"], "Invalid");
        assert_eq!(reply.json()["details"]["causes"][0]["field"], field);
        let msg = reply.message();
        assert!(
            msg.contains(&format!("masking placeholder at {field}.")),
            "{ctype}: {msg}"
        );
        let (p, _) = path.split_once('?').unwrap_or((path, ""));
        assert!(lab.api.seen_at(method, p).is_empty(), "{ctype}: forwarded");
        let (rec, resp) = lab.records(method, p).await;
        assert_eq!(rec.decision.as_str(), "refused");
        assert_eq!(resp.code, 422);
    }
    // The same writes with real values go through, protobuf included.
    let proto = crate::k8s::protobuf_encode::secret("s", "k", b"real");
    let mut r = req("POST", "/api/v1/namespaces/e2e/secrets", None, None);
    r.headers_mut().insert(
        "content-type",
        "application/vnd.kubernetes.protobuf".parse().unwrap(),
    );
    *r.body_mut() = http_body_util::Full::new(bytes::Bytes::from(proto));
    assert_eq!(
        lab.send(From::PodA, true, r).await.status,
        StatusCode::CREATED
    );
    let r = lab
        .send(
            From::PodA,
            true,
            req(
                "PATCH",
                "/api/v1/namespaces/e2e/configmaps/c",
                None,
                Some((
                    "application/merge-patch+json",
                    r#"{"data":{"password":"hunter2"}}"#,
                )),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_request_bodies_are_decoded_and_masked_never_raw() {
    let lab = pass_through().await;
    let proto = crate::k8s::protobuf_encode::secret("pb", "k", b"CANARY-pb");
    let proto_deploy = crate::k8s::protobuf_encode::deployment(
        "d",
        &["--db-password", "CANARY-pbarg"],
        &[("DB_PASS", "CANARY-pbenv")],
    );
    let mut cbor = Vec::new();
    ciborium::into_writer(
        &ciborium::Value::Map(vec![(
            ciborium::Value::Text("stringData".into()),
            ciborium::Value::Map(vec![(
                ciborium::Value::Text("k".into()),
                ciborium::Value::Text("CANARY-cbor".into()),
            )]),
        )]),
        &mut cbor,
    )
    .unwrap();
    let cases: Vec<(&str, String, &str, Vec<u8>)> = vec![
        (
            "POST",
            "/api/v1/namespaces/r1/secrets".into(),
            "application/vnd.kubernetes.protobuf",
            proto,
        ),
        (
            "POST",
            "/apis/apps/v1/namespaces/r2/deployments".into(),
            "application/vnd.kubernetes.protobuf",
            proto_deploy,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/r3/secrets/s".into(),
            "application/apply-patch+yaml",
            b"kind: Secret\nmetadata:\n  name: s\nstringData:\n  token: CANARY-yaml\n".to_vec(),
        ),
        (
            "PATCH",
            "/api/v1/namespaces/r4/secrets/s".into(),
            "application/json-patch+json",
            format!(
                r#"[{{"op":"add","path":"/data/k","value":"{}"}}]"#,
                b64(b"CANARY-jp")
            )
            .into_bytes(),
        ),
        (
            "POST",
            "/api/v1/namespaces/r5/secrets".into(),
            "application/cbor",
            cbor,
        ),
        (
            "POST",
            "/api/v1/namespaces/r6/configmaps".into(),
            "application/octet-stream",
            b"CANARY-raw".to_vec(),
        ),
    ];
    for (method, path, ctype, body) in cases {
        let mut r = req(method, &path, None, None);
        r.headers_mut()
            .insert("content-type", ctype.parse().unwrap());
        *r.body_mut() = http_body_util::Full::new(bytes::Bytes::from(body));
        lab.send(From::PodA, false, r).await;
        let (rec, _) = lab.records(method, &path).await;
        let recorded = rec.request_body.expect("a body is recorded").to_string();
        assert!(!recorded.contains("CANARY"), "{ctype}: {recorded}");
        assert!(!recorded.contains("Q0FOQVJZ"), "{ctype}: {recorded}");
        if ctype == "application/octet-stream" {
            assert!(recorded.contains("omitted"), "{recorded}");
        } else {
            assert!(
                recorded.contains("portcullis-masked") || recorded.contains(PLACEHOLDER_B64),
                "{ctype}: {recorded}"
            );
        }
    }
    // Whatever the gate records of the protobuf Secret: its identity stays readable.
    let (rec, _) = lab.records("POST", "/api/v1/namespaces/r1/secrets").await;
    let body = rec.request_body.unwrap();
    assert_eq!(body["metadata"]["name"], "pb");
    assert_eq!(body["data"]["k"], PLACEHOLDER_B64);
}
