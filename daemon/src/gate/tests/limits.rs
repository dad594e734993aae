//! Fair shares and idle connections (`proxy.limits`): a greedy agent holds its share and
//! is refused past it while another agent is still served at once; connections past an
//! agent's cap are closed; idle connections are closed.
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;

use super::lab::{From, Lab, Mode, Options, req};

const WATCH: &str = "/api/v1/namespaces/e2e/events?watch=1";

/// An HTTP/2 connection from `from` (the handshake driven in the background).
async fn h2(
    lab: &Lab,
    from: From,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tls = lab.dial(from, b"h2").await;
    let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = c.await;
    });
    (s, task)
}

fn get(path: &str) -> http::Request<Full<Bytes>> {
    let mut r = req("GET", path, None, None);
    *r.uri_mut() = format!("https://kubernetes.default{path}").parse().unwrap();
    r
}

#[tokio::test]
async fn a_greedy_agent_holds_its_share_and_another_agent_is_still_served_at_once() {
    let mut opts = Options::new(Mode::PassThrough);
    opts.limits = "{max_requests_per_agent: 4}";
    let lab = Lab::start(opts).await;
    let (mut a, _ta) = h2(&lab, From::PodA).await;
    // Four watches that never end: agent A's whole share.
    let mut held = Vec::new();
    for _ in 0..4 {
        let resp = a.send_request(get(WATCH)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(resp);
    }
    // A fifth request from A: refused with a Status naming the cap.
    let resp = a
        .send_request(get("/api/v1/namespaces/e2e/secrets/s"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["kind"], "Status");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("max_requests_per_agent"),
        "{v}"
    );
    // Agent B is served at once.
    let t = Instant::now();
    let r = lab
        .call(From::PodB, None, "GET", "/api/v1/namespaces/e2e/secrets/s")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // When one of A's watches ends, A has room again.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        let resp = a
            .send_request(get("/api/v1/namespaces/e2e/secrets/s"))
            .await
            .unwrap();
        if resp.status() == StatusCode::OK {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a finished watch did not give its share back");
}

#[tokio::test]
async fn connections_past_an_agents_cap_are_closed_while_others_connect() {
    let mut opts = Options::new(Mode::PassThrough);
    opts.limits = "{max_connections_per_agent: 2}";
    let lab = Lab::start(opts).await;
    let (_a1, _t1) = h2(&lab, From::PodA).await;
    let (_a2, _t2) = h2(&lab, From::PodA).await;
    // The third is closed before TLS: the handshake fails.
    let third = lab.dial_result(From::PodA).await;
    assert!(third.is_err(), "a third connection from agent A was served");
    // Agent B still connects and is served.
    let r = lab
        .call(From::PodB, None, "GET", "/api/v1/namespaces/e2e/secrets/s")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let mut opts = Options::new(Mode::PassThrough);
    opts.limits = "{idle_timeout: 300ms}";
    let lab = Lab::start(opts).await;
    // Busy: a watch in flight for longer than the idle timeout keeps its connection.
    let (mut busy, busy_task) = h2(&lab, From::PodB).await;
    let watch = busy.send_request(get(WATCH)).await.unwrap();
    assert_eq!(watch.status(), StatusCode::OK);
    // Idle: one request, then nothing.
    let (mut idle, idle_task) = h2(&lab, From::PodA).await;
    let r = idle
        .send_request(get("/api/v1/namespaces/e2e/secrets/s"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    let closed = tokio::time::timeout(Duration::from_secs(5), idle_task).await;
    assert!(closed.is_ok(), "the idle HTTP/2 connection was not closed");
    assert!(
        !busy_task.is_finished(),
        "a connection with a watch in flight was closed"
    );
    drop(watch);
    // HTTP/1.1 keep-alive, idle: closed too.
    let mut tls = lab.dial(From::PodA, b"http/1.1").await;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "the idle HTTP/1.1 connection was not closed: {n:?}"
    );
}

/// The audit directory at its disk budget with nothing acknowledged: mutations get a
/// 503 Status saying so (never forwarded unrecorded), reads too (fail_closed_reads);
/// once the sink acknowledges, old segments go and requests flow again.
#[tokio::test]
async fn the_audit_disk_budget_refuses_mutations_until_the_sink_acknowledges() {
    let mut opts = Options::new(Mode::PassThrough);
    opts.audit = "{level: Request, segment_bytes: 4096, max_disk_bytes: 32768}";
    let lab = Lab::start(opts).await;
    let body = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"k":"v"}}"#;
    let path = "/api/v1/namespaces/e2e/configmaps";
    let mut refused = None;
    for i in 0..500 {
        let r = lab
            .send(
                From::PodA,
                false,
                req("POST", path, None, Some(("application/json", body))),
            )
            .await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some((i, r));
            break;
        }
        assert!(r.status.is_success(), "{}: {}", r.status, r.body);
    }
    let (n, r) = refused.expect("the disk budget never applied");
    assert!(n > 3, "refused too early ({n})");
    let msg = r.message();
    assert!(
        msg.contains("disk budget") && msg.contains("audit.max_disk_bytes"),
        "{msg}"
    );
    // Nothing was forwarded without its durable record.
    let seen = lab.api.seen_at("POST", path);
    assert_eq!(seen.len(), n, "a refused mutation reached the API server");
    assert!(seen.iter().all(|s| s.durable_before == Some(true)));
    // Reads are refused too while the log cannot be written.
    let r = lab
        .call(From::PodB, None, "GET", "/api/v1/namespaces/e2e/secrets/s")
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    // The sink acknowledges everything written so far: room again.
    let last = lab.entries().last().map(|e| e.seq).unwrap();
    std::fs::write(lab.audit_dir().join("sink.cursor"), last.to_string()).unwrap();
    let r = lab
        .send(
            From::PodA,
            false,
            req("POST", path, None, Some(("application/json", body))),
        )
        .await;
    assert!(r.status.is_success(), "{}: {}", r.status, r.body);
    assert!(!lab.audit_dir().join("seg-000001.jsonl").exists());
    let used: u64 = std::fs::read_dir(lab.audit_dir())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(used <= 32768 + 4096, "{used} bytes");
    let key = std::fs::read_to_string(lab.dir.join("state/audit.pub")).unwrap();
    let report = crate::audit::verify(&lab.audit_dir(), &hex::decode(key.trim()).unwrap()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
