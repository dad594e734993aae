//! A loopback stand-in for the Kubernetes API server: TLS with its own test CA, HTTP/2
//! and HTTP/1.1 (upgrades included), canned answers in every shape the gate masks, and
//! a record of what reached it. For each mutation it notes whether the gate's audit
//! log already held that request's record, committed, when the request arrived: the
//! "audit before act" order seen from the far side. Objects put in its store are
//! served as the API server serves them: GET, merge PATCH, PUT and DELETE with
//! resourceVersion preconditions (409 on a stale one) and `dryRun=All`.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{io::AsyncWriteExt, net::TcpListener, task::JoinHandle};

use super::fake_shapes::Body;

/// One request as it reached the API server.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Mutations: whether the gate's record of this request was in the audit log, and
    /// covered by a signed head, when it arrived.
    pub durable_before: Option<bool>,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    objects: Objects,
    revoked: Revoked,
    /// TLS connections accepted.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Tells the open connections to end (see [`FakeApi::close_connections`]).
    ends: tokio::sync::watch::Sender<Option<End>>,
    task: JoinHandle<()>,
}

/// How the open connections end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// GOAWAY, the requests in flight answered first (the API server stopping, or
    /// closing an idle connection).
    Graceful,
    /// The TCP connection closed with no word (the API server killed, a middlebox's
    /// reset).
    Abrupt,
}

/// Subjects whose tokens TokenReview no longer authenticates (their service account
/// or pod was deleted).
type Revoked = Arc<Mutex<std::collections::HashSet<String>>>;

type Objects = Arc<Mutex<HashMap<String, serde_json::Value>>>;

struct State {
    audit_dir: PathBuf,
    jwks: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    objects: Objects,
    revoked: Revoked,
}

pub const SECRET: &str = r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"s","namespace":"e2e","resourceVersion":"42"},"data":{"k":"Q0FOQVJZ"},"stringData":{"p":"CANARY-TEXT"},"type":"Opaque"}"#;

impl FakeApi {
    /// Serves on 127.0.0.1; the CA that signs its certificate is written to `dir`.
    pub async fn start(dir: &Path, audit_dir: PathBuf, jwks: String) -> FakeApi {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let ca_file = dir.join("api-ca.crt");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![
                    leaf_cert.der().clone(),
                    CertificateDer::from(ca_cert.der().to_vec()),
                ],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let objects: Objects = Arc::default();
        let revoked: Revoked = Arc::default();
        let state = Arc::new(State {
            audit_dir,
            jwks,
            seen: seen.clone(),
            objects: objects.clone(),
            revoked: revoked.clone(),
        });
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let (ends, ended) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, state) = (acceptor.clone(), state.clone());
                let mut ended = ended.clone();
                ended.mark_unchanged();
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = ended.changed() => {}
                    }
                    if *ended.borrow() == Some(End::Graceful) {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                });
            }
        });
        FakeApi {
            addr,
            ca_file,
            seen,
            objects,
            revoked,
            accepted,
            ends,
            task,
        }
    }

    /// Ends every connection open now (`how`); new ones are accepted as before.
    pub fn close_connections(&self, how: End) {
        self.ends.send_replace(Some(how));
    }

    /// Connections the gate has opened to this API server.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// TokenReview stops authenticating `subject`'s tokens (as after deleting its
    /// service account).
    pub fn revoke(&self, subject: &str) {
        self.revoked.lock().unwrap().insert(subject.to_owned());
    }

    /// Stores `object` at `path` (its resourceVersion set to `rv`).
    pub fn put_object(&self, path: &str, mut object: serde_json::Value, rv: u64) {
        object["metadata"]["resourceVersion"] = serde_json::json!(rv.to_string());
        self.objects.lock().unwrap().insert(path.to_owned(), object);
    }

    pub fn object(&self, path: &str) -> Option<serde_json::Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// What reached the API server for `method` on a path starting with `path`.
    pub fn seen_at(&self, method: &str, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == method && s.uri.path().starts_with(path))
            .collect()
    }

    /// Stops answering: new connections are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn reply(code: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_str(ctype).unwrap());
    r
}

/// A body delivered in these chunks (cut anywhere, as on the wire).
fn chunked(ctype: &str, chunks: &[&'static str]) -> Response<Body> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_str(ctype).unwrap());
    r
}

async fn answer(state: &State, mut req: Request<hyper::body::Incoming>) -> Response<Body> {
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let mutation = matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) && !upgrade;
    let durable_before = mutation.then(|| durable_in(&state.audit_dir, method.as_str(), &path));
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    state.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
        durable_before,
    });
    const JSON: &str = "application/json";
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        return token_review(state, &body);
    }
    if let Some(r) = stored(state, &method, &path, &query, &body) {
        return r;
    }
    let script = on_upgrade.is_some().then(|| {
        super::fake_shapes::ws_script(&path, &query, &super::fake_shapes::offered(&parts.headers))
    });
    if let Some(Some(script)) = script
        && let Some(on) = on_upgrade
    {
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let _ = io.write_all(&script.frames).await;
                let _ = io.shutdown().await;
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("accepted"),
        );
        if let Some(p) = script.protocol {
            h.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(&p).unwrap(),
            );
        }
        if let Some(e) = script.extension {
            h.insert(
                header::SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_static(e),
            );
        }
        return r;
    } else if let Some(on) = on_upgrade {
        // Exec and friends: switch, then echo what the agent sends.
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    if mutation {
        let json_in = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let echoed = if body.is_empty() || !json_in {
            Bytes::from_static(br#"{"kind":"Status","apiVersion":"v1","status":"Success"}"#)
        } else {
            body
        };
        return reply(StatusCode::CREATED, JSON, echoed);
    }
    if let Some(r) = super::fake_shapes::answer(&path, &method) {
        return r;
    }
    match path.as_str() {
        "/openid/v1/jwks" => reply(
            StatusCode::OK,
            "application/jwk-set+json",
            state.jwks.clone(),
        ),
        "/api/v1/namespaces/e2e/secrets/s" => reply(StatusCode::OK, JSON, SECRET),
        // A watch that stays open with nothing to say (it holds its stream).
        "/api/v1/namespaces/e2e/events" if query.contains("watch=1") => {
            use futures_util::StreamExt;
            let first: Result<Frame<Bytes>, Infallible> = Ok(Frame::data(Bytes::from_static(
                b"{\"type\":\"BOOKMARK\",\"object\":{\"kind\":\"Event\",\"apiVersion\":\"v1\",\"metadata\":{\"resourceVersion\":\"1\"}}}\n",
            )));
            let s = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(s)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json;stream=watch"),
            );
            r
        }
        "/api/v1/namespaces/e2e/secrets" if query.contains("watch=1") => chunked(
            "application/json;stream=watch",
            &[
                "{\"type\":\"ADDED\",\"object\":{\"kind\":\"Secret\",\"metadata\":{\"name\":\"a\"},\"data\":{\"k\":\"Q0FO",
                "QVJZ\"}}}\n{\"type\":\"MODIFIED\",\"object\":{\"kind\":\"Secret\",\"metadata\":{\"name\":\"b\"},\"data\":{\"k\":\"Q0FOQVJZ\"}}}\n",
            ],
        ),
        "/api/v1/namespaces/e2e/secrets" if accept.contains("as=Table") => reply(
            StatusCode::OK,
            JSON,
            r#"{"kind":"Table","apiVersion":"meta.k8s.io/v1","columnDefinitions":[],"rows":[{"cells":["a","Opaque",1],"object":{"kind":"Secret","metadata":{"name":"a"},"data":{"k":"Q0FOQVJZ"}}}]}"#,
        ),
        "/api/v1/namespaces/e2e/secrets" => reply(
            StatusCode::OK,
            JSON,
            r#"{"kind":"SecretList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[{"metadata":{"name":"a"},"data":{"k":"Q0FOQVJZ"}},{"metadata":{"name":"b"},"stringData":{"k":"CANARY-TEXT"}}]}"#,
        ),
        "/api/v1/namespaces/e2e/pods/p/log" => chunked(
            "text/plain",
            &[
                "starting\nconnecting with pass",
                "word=hunter2 now\nkey AKIAIOSFODNN7EXAMPLE\n",
                "done\n",
            ],
        ),
        "/api/v1/namespaces/e2e/configmaps/dsn" => reply(
            StatusCode::OK,
            JSON,
            r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"dsn"},"data":{"dsn":"pg://u:CANARY@h","mode":"fast"}}"#,
        ),
        "/api/v1/namespaces/e2e/configmaps/proto" => reply(
            StatusCode::OK,
            "application/vnd.kubernetes.protobuf",
            &b"k8s\x00\x0a\x0fCANARY"[..],
        ),
        "/api/v1/namespaces/e2e/configmaps/gzip" => {
            let mut r = reply(StatusCode::OK, JSON, &b"\x1f\x8b\x08\x00CANARY"[..]);
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        }
        _ => reply(
            StatusCode::OK,
            JSON,
            r#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{},"items":[]}"#,
        ),
    }
}

/// The API server's TokenReview: authenticated unless the token's subject was revoked
/// (the signature was checked by the gate already).
fn token_review(state: &State, body: &Bytes) -> Response<Body> {
    use base64::Engine;
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let token = v["spec"]["token"].as_str().unwrap_or("");
    let claims: serde_json::Value = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let sub = claims["sub"].as_str().unwrap_or("").to_owned();
    let status = if state.revoked.lock().unwrap().contains(&sub) {
        serde_json::json!({"authenticated": false, "error": "service account token has been invalidated"})
    } else {
        serde_json::json!({"authenticated": true, "user": {"username": sub}, "audiences": v["spec"]["audiences"]})
    };
    reply(
        StatusCode::CREATED,
        "application/json",
        serde_json::to_vec(&serde_json::json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "status": status})).unwrap(),
    )
}

/// RFC 7386 merge patch.
fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn rv_of(v: &serde_json::Value) -> Option<&str> {
    v["metadata"]["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())
}

/// Requests on a stored object, answered as the API server would.
fn stored(
    state: &State,
    method: &Method,
    path: &str,
    query: &str,
    body: &Bytes,
) -> Option<Response<Body>> {
    let mut objects = state.objects.lock().unwrap();
    let current = objects.get(path)?.clone();
    let json = |code: StatusCode, v: &serde_json::Value| {
        reply(code, "application/json", serde_json::to_vec(v).unwrap())
    };
    let conflict = || {
        json(
            StatusCode::CONFLICT,
            &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Conflict", "code": 409,
                "message": "the object has been modified; please apply your changes to the latest version and try again"}),
        )
    };
    let dry = query.contains("dryRun=All");
    let cur_rv: u64 = rv_of(&current).and_then(|r| r.parse().ok()).unwrap_or(0);
    let parsed: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    Some(match *method {
        Method::GET => json(StatusCode::OK, &current),
        Method::PATCH | Method::PUT => {
            let mut next = if *method == Method::PUT {
                parsed.clone()
            } else {
                let mut n = current.clone();
                merge(&mut n, &parsed);
                n
            };
            if rv_of(&next).is_some_and(|r| r != cur_rv.to_string()) {
                return Some(conflict());
            }
            next["metadata"]["resourceVersion"] = serde_json::json!(cur_rv.to_string());
            if !dry {
                next["metadata"]["resourceVersion"] = serde_json::json!((cur_rv + 1).to_string());
                objects.insert(path.to_owned(), next.clone());
            }
            json(StatusCode::OK, &next)
        }
        Method::DELETE => {
            if parsed["preconditions"]["resourceVersion"]
                .as_str()
                .is_some_and(|r| r != cur_rv.to_string())
            {
                return Some(conflict());
            }
            if !dry {
                objects.remove(path);
            }
            json(StatusCode::OK, &current)
        }
        _ => return None,
    })
}

/// Whether `dir` holds a committed `request` record for `method` on `path`: in a
/// segment, at or below the sequence number its signed head covers.
fn durable_in(dir: &Path, method: &str, path: &str) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut segments: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    segments.sort();
    segments.iter().any(|seg| {
        let head: serde_json::Value = std::fs::read(seg.with_extension("head.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let signed_to = head["last_seq"].as_u64().unwrap_or(0);
        std::fs::read_to_string(seg)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| {
                v["kind"] == "request"
                    && v["record"]["method"] == method
                    && v["record"]["path"] == path
                    && v["seq"].as_u64().is_some_and(|s| s <= signed_to)
            })
    })
}
