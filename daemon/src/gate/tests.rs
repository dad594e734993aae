//! The in-process gate tier: the whole data path — TLS, HTTP/1.1 and HTTP/2, prechecks,
//! identity, policy, approvals, masking, audit, the upstream — on loopback, without a
//! kernel and without root. A fake origin lookup replaces the pinned connection map
//! (see `lab`), a loopback fake API server with its own test CA replaces the cluster
//! (see `fake_api`), and a test key signs the agents' tokens.
//!
//! Every authorize outcome, every precheck, masking on each response shape, and the
//! order "the audit record is durable before the mutation is forwarded" are checked
//! here against what the agent sees (status, metav1.Status message), what reached the
//! API server, and what the audit log says.
mod effect;
mod fake_api;
mod fake_shapes;
mod lab;
mod leaks;
mod limits;

use std::time::Duration;

use http::{Request, StatusCode};

use self::lab::{AGENT, From, Lab, Mode, Options, POD_A, POD_B, alice, req};

const PLACEHOLDER_B64: &str = "cG9ydGN1bGxpcy1tYXNrZWQ=";

async fn gated() -> Lab {
    Lab::start(Options::new(Mode::Gated)).await
}

async fn pass_through() -> Lab {
    Lab::start(Options::new(Mode::PassThrough)).await
}

// ---- prechecks ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_kernel_did_not_redirect_is_refused() {
    let lab = pass_through().await;
    let r = lab
        .call(
            From::Unredirected,
            None,
            "GET",
            "/api/v1/namespaces/e2e/configmaps",
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.message().contains("redirected"), "{}", r.body);
    assert!(
        r.message()
            .contains("this one was made to the daemon's address directly"),
        "{}",
        r.body
    );
    assert_eq!(r.json()["reason"], "Forbidden");
    assert!(lab.api.seen_at("GET", "/api/v1/namespaces").is_empty());
    let (rec, resp) = lab
        .records("GET", "/api/v1/namespaces/e2e/configmaps")
        .await;
    assert_eq!(rec.decision.as_str(), "refused");
    assert_eq!(resp.code, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_is_refused_and_closed() {
    let lab = pass_through().await;
    // On the wire, hyper's own buffer limit answers first (bare 431, closed).
    let (text, closed) = lab
        .raw(
            From::PodA,
            format!(
                "GET /api/v1/namespaces/e2e/configmaps HTTP/1.1\r\nHost: k\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            )
            .as_bytes(),
        )
        .await;
    // The answer can be lost to the reset that closing on unread bytes sends; when it
    // arrives it is the 431.
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    assert!(closed);
    assert!(lab.api.seen().is_empty());
    // A head hyper let through (one read larger than its buffer) meets the gate's own
    // check: a Status, and the connection closed.
    let big = Request::builder()
        .uri("/api/v1/namespaces/e2e/configmaps")
        .header("x-big", "a".repeat(9000))
        .body(())
        .unwrap();
    let conn = lab.conn(From::PodA);
    let refusal = lab.gate.precheck(&big, &conn).unwrap_err().response();
    assert_eq!(
        refusal.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(refusal.headers()["connection"], "close");
    let body = http_body_util::BodyExt::collect(refusal.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .ends_with("bytes; the limit is 8192"),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("the request head is 90"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_never_smuggles_a_request() {
    let lab = gated().await;
    let token = lab.agent_token();
    let path = "/api/v1/namespaces/e2e/configmaps";
    // On the wire hyper drops the Content-Length, reads the chunked body (empty) and
    // closes after the answer: the DELETE hidden behind it is never read.
    let (text, closed) = lab
        .raw(
            From::PodA,
            format!(
                "POST {path} HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nDELETE {path}/x HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(closed, "{text}");
    assert!(lab.api.seen_at("DELETE", path).is_empty());
    let posted = lab.api.seen_at("POST", path);
    assert_eq!(posted.len(), 1);
    assert!(posted[0].body.is_empty());
    // Where both framings do reach the gate, it refuses them and closes.
    let both = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-length", "4")
        .header("transfer-encoding", "chunked")
        .body(())
        .unwrap();
    let refusal = lab
        .gate
        .precheck(&both, &lab.conn(From::PodA))
        .unwrap_err()
        .response();
    assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
    assert_eq!(refusal.headers()["connection"], "close");
    let body = http_body_util::BodyExt::collect(refusal.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["message"],
        "a request may not carry both Content-Length and Transfer-Encoding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_its_cancel_budget_forwards_nothing_more() {
    let lab = pass_through().await;
    let conn = lab.conn(From::PodA);
    let get = Request::builder()
        .method("GET")
        .uri("/api/v1/namespaces/e2e/configmaps")
        .body(())
        .unwrap();
    assert!(lab.gate.precheck(&get, &conn).is_ok());
    // The budget is 100 cancels per window; the 101st closes the connection.
    for _ in 0..101 {
        conn.note_cancel();
    }
    let refusal = lab.gate.precheck(&get, &conn).unwrap_err();
    assert_eq!(refusal.code(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refusal
            .decision()
            .map(|d| d.as_str().to_string())
            .as_deref(),
        Some("refused")
    );
    assert!(refusal.to_string().contains("cancelled too many requests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_the_resolver_cannot_place_is_refused() {
    let lab = pass_through().await;
    let r = lab.call(From::PodA, None, "GET", "/api/v1/watch").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.message(),
        "unable to determine kind and namespace from url /api/v1/watch"
    );
    let (rec, _) = lab.records("GET", "/api/v1/watch").await;
    assert_eq!(rec.decision.as_str(), "refused");
}

// ---- authorize outcomes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_forwards_as_the_configured_identity_with_the_daemons_credential() {
    let lab = pass_through().await;
    let mut r = req(
        "GET",
        "/api/v1/namespaces/e2e/configmaps?labelSelector=app%3Dweb%2Ctier&limit=5",
        Some("agent-secret-token"),
        None,
    );
    r.headers_mut()
        .insert("impersonate-user", "system:admin".parse().unwrap());
    r.headers_mut()
        .insert("impersonate-group", "system:masters".parse().unwrap());
    let reply = lab.send(From::PodA, false, r).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let seen = lab.api.seen_at("GET", "/api/v1/namespaces/e2e/configmaps");
    assert_eq!(seen.len(), 1);
    // The path and query arrive as the agent sent them, escapes included.
    assert_eq!(
        seen[0].uri.query(),
        Some("labelSelector=app%3Dweb%2Ctier&limit=5")
    );
    let h = &seen[0].headers;
    assert_eq!(h["authorization"], "Bearer daemon-token");
    assert_eq!(h["impersonate-user"], "portcullis:agent");
    let groups: Vec<_> = h.get_all("impersonate-group").iter().collect();
    assert_eq!(groups, ["portcullis:agents", "second"]);
    let (rec, resp) = lab
        .records("GET", "/api/v1/namespaces/e2e/configmaps")
        .await;
    assert_eq!(rec.decision.as_str(), "pass-through");
    assert!(rec.user.is_none());
    assert_eq!(rec.attributes.verb, "list");
    assert_eq!(rec.origin.comm, "kubectl");
    assert_eq!(rec.origin.original_dst, "10.96.0.1:443");
    assert_eq!(resp.code, 200);
    assert!(resp.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_are_refused_with_the_reason() {
    let lab = gated().await;
    let path = "/api/v1/namespaces/e2e/configmaps";
    let r = lab.call(From::PodA, None, "GET", path).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.message(), "Portcullis: no bearer token in the request");
    assert_eq!(r.json()["reason"], "Unauthorized");
    let (rec, resp) = lab.records("GET", path).await;
    assert_eq!(rec.decision.as_str(), "unauthenticated");
    assert_eq!(resp.code, 401);

    let r = lab.call(From::PodA, Some("not-a-jwt"), "GET", path).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.message()
            .starts_with("Portcullis: the bearer token is not a well-formed JWT"),
        "{}",
        r.body
    );

    // A token bound to pod A, used from pod B: refused whether or not its identity is
    // cached (verified and bound to pod A by an earlier request) — the binding is
    // checked on every request.
    let r = lab
        .call(From::PodB, Some(&lab.agent_token()), "GET", path)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.message(),
        format!(
            "Portcullis: token is bound to pod e2e/agent-pod (uid {POD_A}) but the connection comes from pod uid {POD_B}: a token is only valid from its own pod"
        )
    );
    assert!(lab.api.seen_at("GET", path).is_empty());
    let from_a = lab
        .call(From::PodA, Some(&lab.agent_token()), "GET", path)
        .await;
    assert_ne!(from_a.status, StatusCode::UNAUTHORIZED, "{}", from_a.body);
    let r = lab
        .call(From::PodB, Some(&lab.agent_token()), "GET", path)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.message()
            .contains("a token is only valid from its own pod")
    );
    assert_eq!(
        lab.api.seen_at("GET", path).len(),
        1,
        "only pod A's request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_without_an_upstream_identity_is_refused() {
    let lab = gated().await;
    let token = lab.token("other", POD_A);
    let path = "/api/v1/namespaces/e2e/configmaps";
    let r = lab.call(From::PodA, Some(&token), "GET", path).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.message(),
        "Portcullis policy lab maps no upstream identity for system:serviceaccount:e2e:other"
    );
    let (rec, _) = lab.records("GET", path).await;
    assert_eq!(rec.decision.as_str(), "unmapped");
    assert_eq!(
        rec.user.map(|u| u.username.clone()).as_deref(),
        Some("system:serviceaccount:e2e:other")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denials_name_the_request_the_subject_and_the_rule_message() {
    let lab = gated().await;
    let token = lab.agent_token();
    let path = "/api/v1/namespaces/e2e/pods/p/exec";
    let r = lab.call(From::PodA, Some(&token), "POST", path).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.message(),
        format!(
            "Portcullis policy denies create pods/exec p in e2e for {AGENT}: interactive access is not for agents"
        )
    );
    let (rec, _) = lab.records("POST", path).await;
    assert_eq!(rec.decision.as_str(), "deny");
    assert_eq!(rec.rule, "exec");
    assert!(rec.mutating);
    // Nothing matches: denied too.
    let r = lab.call(From::PodA, Some(&token), "GET", "/metrics").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.message(),
        format!(
            "Portcullis policy denies get /metrics for {AGENT}: no policy rule allows this request"
        )
    );
    let (rec, _) = lab.records("GET", "/metrics").await;
    assert_eq!((rec.decision.as_str(), rec.rule.as_str()), ("deny", ""));
    assert!(lab.api.seen_at("POST", path).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_requests_go_upstream_as_the_subjects_scoped_identity() {
    let lab = gated().await;
    let token = lab.agent_token();
    let path = "/api/v1/namespaces/e2e/configmaps";
    for h2 in [false, true] {
        let r = lab
            .send(From::PodA, h2, req("GET", path, Some(&token), None))
            .await;
        assert_eq!(r.status, StatusCode::OK, "h2 {h2}: {}", r.body);
    }
    let seen = lab.api.seen_at("GET", path);
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.headers["authorization"], "Bearer daemon-token");
        assert_eq!(s.headers["impersonate-user"], "portcullis:agent");
        assert!(!format!("{:?}", s.headers).contains(&token));
    }
    let (rec, resp) = lab.records("GET", path).await;
    assert_eq!(
        (rec.decision.as_str(), rec.rule.as_str()),
        ("allow", "reads")
    );
    let user = rec.user.unwrap();
    assert_eq!(user.username, AGENT);
    assert_eq!(user.issuer, "https://kubernetes.default.svc");
    assert_eq!(rec.origin.pod_uid, POD_A);
    assert_eq!(resp.code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_names_its_approval_and_passes_once_approved() {
    let lab = gated().await;
    let token = lab.agent_token();
    let path = "/api/v1/namespaces/e2e/configmaps/quick-1";
    let r = lab.call(From::PodA, Some(&token), "DELETE", path).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let a = lab.pending("quick-1").await;
    assert_eq!(
        r.message(),
        format!(
            "Portcullis: delete configmaps quick-1 in e2e needs approval (deletes need a human); approval {id} is pending. An approver runs `portcullis approvals approve {id}`; retry after that.",
            id = a.id
        )
    );
    let (rec, _) = lab.records("DELETE", path).await;
    assert_eq!(rec.decision.as_str(), "held");
    assert_eq!(rec.approval, a.id);
    assert_eq!(rec.rule, "quick-deletes");
    assert!(lab.api.seen_at("DELETE", path).is_empty());
    // Approved: the retry passes on the grant.
    let (_, grant) = lab.approvals().approve(&a.id, &alice(), None).unwrap();
    let r = lab.call(From::PodA, Some(&token), "DELETE", path).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(lab.api.seen_at("DELETE", path).len(), 1);
    let entries = lab.entries();
    let approved = entries
        .iter()
        .filter(|e| e.kind == "request")
        .find(|e| e.record["decision"] == "approved")
        .expect("an approved request record");
    assert_eq!(approved.record["grant"], grant.id.as_str());
    assert_eq!(approved.record["rule"], "quick-deletes");
    assert!(
        entries
            .iter()
            .any(|e| e.kind == "approval" && e.record["event"] == "approval.approved")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_approved_while_held_proceeds() {
    let lab = gated().await;
    let token = lab.agent_token();
    let path = "/api/v1/namespaces/e2e/configmaps/slow-ok";
    let held = {
        let (lab, token) = (&lab, token.clone());
        async move { lab.call(From::PodA, Some(&token), "DELETE", path).await }
    };
    let decide = async {
        let a = lab.pending("slow-ok").await;
        lab.approvals()
            .approve(&a.id, &alice(), Some("fine".into()))
            .unwrap();
    };
    let (r, ()) = tokio::join!(held, decide);
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let (rec, _) = lab.records("DELETE", path).await;
    assert_eq!(rec.decision.as_str(), "approved");
    assert!(!rec.grant.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_denied_while_held_is_refused_with_the_reason() {
    let lab = gated().await;
    let token = lab.agent_token();
    let path = "/api/v1/namespaces/e2e/configmaps/slow-no";
    let held = lab.call(From::PodA, Some(&token), "DELETE", path);
    let decide = async {
        let a = lab.pending("slow-no").await;
        lab.approvals()
            .deny(&a.id, &alice(), "not today".into())
            .unwrap();
        a.id
    };
    let (r, id) = tokio::join!(held, decide);
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.message(),
        format!(
            "Portcullis: approval {id} for delete configmaps slow-no in e2e was denied by alice: not today"
        )
    );
    let (rec, _) = lab.records("DELETE", path).await;
    assert_eq!(rec.decision.as_str(), "denied");
    assert_eq!(rec.approval, id);
    assert!(lab.api.seen_at("DELETE", path).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_approval_expires_while_held_is_refused() {
    let lab = Lab::start(Options {
        pending_ttl: "1s",
        ..Options::new(Mode::Gated)
    })
    .await;
    let token = lab.agent_token();
    let path = "/api/v1/namespaces/e2e/configmaps/slow-late";
    let held = lab.call(From::PodA, Some(&token), "DELETE", path);
    let expire = async {
        // In any state: on a loaded machine the first look may come after the second
        // it stays pending.
        let a = lab.approval("slow-late").await;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        lab.approvals().expire_due();
        a.id
    };
    let (r, id) = tokio::join!(held, expire);
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.message(),
        format!(
            "Portcullis: approval {id} for delete configmaps slow-late in e2e expired undecided; retry to request a new one"
        )
    );
    let (rec, _) = lab.records("DELETE", path).await;
    assert_eq!(rec.decision.as_str(), "expired");
    assert_eq!(rec.approval, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_with_too_many_pending_approvals_gets_429_and_pages_nobody() {
    let lab = gated().await;
    let token = lab.agent_token();
    for i in 0..crate::approvals::MAX_PENDING_PER_SUBJECT {
        let r = lab
            .call(
                From::PodA,
                Some(&token),
                "DELETE",
                &format!("/api/v1/namespaces/e2e/configmaps/quick-{i}"),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    }
    let path = "/api/v1/namespaces/e2e/configmaps/quick-more";
    let r = lab.call(From::PodA, Some(&token), "DELETE", path).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.json()["reason"], "TooManyRequests");
    assert_eq!(
        r.message(),
        format!(
            "Portcullis: {AGENT} already has 20 approvals waiting; no new one is opened until some are decided or expire"
        )
    );
    let (rec, _) = lab.records("DELETE", path).await;
    assert_eq!(rec.decision.as_str(), "too-many-pending");
    assert_eq!(
        lab.approvals().list().len(),
        crate::approvals::MAX_PENDING_PER_SUBJECT
    );
}

// ---- masking, per response shape ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_as_objects_lists_watches_and_tables() {
    let lab = pass_through().await;
    for h2 in [false, true] {
        // An object.
        let r = lab
            .send(
                From::PodA,
                h2,
                req("GET", "/api/v1/namespaces/e2e/secrets/s", None, None),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let v = r.json();
        assert_eq!(v["data"]["k"], PLACEHOLDER_B64);
        assert_eq!(v["stringData"]["p"], "portcullis-masked");
        assert_eq!(v["metadata"]["resourceVersion"], "42");
        // A list.
        let r = lab
            .send(
                From::PodA,
                h2,
                req("GET", "/api/v1/namespaces/e2e/secrets", None, None),
            )
            .await;
        let v = r.json();
        assert_eq!(v["items"][0]["data"]["k"], PLACEHOLDER_B64);
        assert_eq!(v["items"][1]["stringData"]["k"], "portcullis-masked");
        // A watch, event by event.
        let r = lab
            .send(
                From::PodA,
                h2,
                req("GET", "/api/v1/namespaces/e2e/secrets?watch=1", None, None),
            )
            .await;
        assert!(!r.body.contains("Q0FOQVJZ"), "{}", r.body);
        let events: Vec<serde_json::Value> = r
            .body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events.len(), 2, "{}", r.body);
        assert_eq!(events[1]["object"]["data"]["k"], PLACEHOLDER_B64);
        // A Table, as kubectl asks for it.
        let mut t = req("GET", "/api/v1/namespaces/e2e/secrets", None, None);
        t.headers_mut().insert(
            "accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
                .parse()
                .unwrap(),
        );
        let r = lab.send(From::PodA, h2, t).await;
        let v = r.json();
        assert_eq!(v["kind"], "Table");
        assert_eq!(v["rows"][0]["object"]["data"]["k"], PLACEHOLDER_B64);
        assert_eq!(v["rows"][0]["cells"], serde_json::json!(["a", "Opaque", 1]));
    }
    let (_, resp) = lab.records("GET", "/api/v1/namespaces/e2e/secrets/s").await;
    assert!(resp.complete && resp.code == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_configured_paths_are_masked_and_json_is_asked_for() {
    let lab = pass_through().await;
    let r = lab
        .call(From::PodA, None, "GET", "/api/v1/namespaces/e2e/pods/p/log")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body,
        "starting\nconnecting with password=[masked] now\nkey [masked:aws-key]\ndone\n"
    );
    let r = lab
        .call(
            From::PodA,
            None,
            "GET",
            "/api/v1/namespaces/e2e/configmaps/dsn",
        )
        .await;
    let v = r.json();
    assert_eq!(v["data"]["dsn"], "portcullis-masked");
    assert_eq!(v["data"]["mode"], "fast");
    // Protobuf is asked for as JSON, uncompressed; parameters stay.
    let mut p = req("GET", "/api/v1/namespaces/e2e/configmaps", None, None);
    p.headers_mut().insert(
        "accept",
        "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io"
            .parse()
            .unwrap(),
    );
    p.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let r = lab.send(From::PodA, true, p).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = lab.api.seen_at("GET", "/api/v1/namespaces/e2e/configmaps");
    let last = seen.last().unwrap();
    assert_eq!(
        last.headers["accept"],
        "application/json;as=Table;v=v1;g=meta.k8s.io"
    );
    assert!(!last.headers.contains_key("accept-encoding"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_cannot_be_masked_is_refused() {
    let lab = pass_through().await;
    let path = "/api/v1/namespaces/e2e/configmaps/proto";
    let r = lab.call(From::PodA, None, "GET", path).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(!r.body.contains("CANARY"));
    assert_eq!(
        r.message(),
        "Portcullis: the API server answered with application/vnd.kubernetes.protobuf, which Portcullis cannot inspect for masking; request application/json"
    );
    let (_, resp) = lab.records("GET", path).await;
    assert_eq!(resp.code, 502);
    assert!(!resp.complete);
    assert!(
        resp.error
            .as_deref()
            .is_some_and(|e| e.contains("cannot inspect"))
    );
    let r = lab
        .call(
            From::PodA,
            None,
            "GET",
            "/api/v1/namespaces/e2e/configmaps/gzip",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.message(),
        "Portcullis: the API server sent a gzip encoded body, which Portcullis cannot inspect for masking"
    );
}

// ---- audit before act ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_is_durable_in_the_audit_log_before_it_is_forwarded() {
    for mode in [Mode::PassThrough, Mode::Gated] {
        let lab = Lab::start(Options::new(mode)).await;
        let token = lab.agent_token();
        for h2 in [false, true] {
            // One path per request: the API server's check finds exactly its record.
            let path = &format!("/api/v1/namespaces/ns-{h2}/configmaps");
            let body = r#"{"kind":"ConfigMap","metadata":{"name":"c"},"data":{"password":"hunter2","mode":"fast"}}"#;
            let r = lab
                .send(
                    From::PodA,
                    h2,
                    req("POST", path, Some(&token), Some(("application/json", body))),
                )
                .await;
            assert_eq!(
                r.status,
                StatusCode::CREATED,
                "{mode:?} h2 {h2}: {}",
                r.body
            );
            let seen = lab.api.seen_at("POST", path);
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].durable_before, Some(true), "{mode:?} h2 {h2}");
            // The API server gets the body as sent; only the record is masked.
            assert!(String::from_utf8_lossy(&seen[0].body).contains("hunter2"));
            let (rec, _) = lab.records("POST", path).await;
            assert!(rec.mutating);
            let body = rec.request_body.unwrap();
            assert_eq!(body["data"]["password"], "portcullis-masked");
            assert_eq!(body["data"]["mode"], "fast");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_cannot_be_decoded_is_forwarded_but_not_recorded() {
    let lab = pass_through().await;
    let path = "/api/v1/namespaces/e2e/configmaps";
    let r = lab
        .send(
            From::PodA,
            false,
            req(
                "POST",
                path,
                None,
                Some(("application/vnd.kubernetes.protobuf", "k8s\0CANARY")),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let (rec, _) = lab.records("POST", path).await;
    let body = rec.request_body.unwrap();
    assert_eq!(
        body["omitted"],
        "not recorded: the application/vnd.kubernetes.protobuf body does not parse: the envelope does not decode: failed to decode Protobuf message: buffer underflow"
    );
    assert!(!body.to_string().contains("CANARY"));
    assert_eq!(body["bytes"], 10);
    assert_eq!(lab.api.seen_at("POST", path)[0].durable_before, Some(true));
}

// ---- the upstream ----

/// The answer to a request the gate could not take to the API server: a 503 the
/// client retries, saying so.
fn assert_unreachable(lab: &Lab, r: &lab::Reply) {
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        r.message().starts_with(&format!(
            "Portcullis cannot reach the Kubernetes API server at {}",
            lab.api.url()
        )),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_is_a_503_the_client_retries() {
    let lab = pass_through().await;
    lab.api.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let path = "/api/v1/namespaces/e2e/configmaps";
    let r = lab.call(From::PodA, None, "GET", path).await;
    assert_unreachable(&lab, &r);
    let (rec, resp) = lab.records("GET", path).await;
    assert_eq!(rec.decision.as_str(), "pass-through");
    assert_eq!(resp.code, 503);
}

/// Once the API server is known to speak HTTP/2, each lane holds its connection
/// itself: a connection the API server ends — with a GOAWAY (stopping, or idle for
/// 90 s) or with no word (killed, reset) — is opened again for the next request, and
/// the requests go on being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_connection_that_ends_is_opened_again() {
    use self::fake_api::End;
    for how in [End::Graceful, End::Abrupt] {
        let lab = pass_through().await;
        let path = "/api/v1/namespaces/e2e/configmaps";
        // The first answer shows HTTP/2; the next requests go on HTTP/2 lanes.
        for _ in 0..3 {
            let r = lab.call(From::PodA, None, "GET", path).await;
            assert_eq!(r.status, StatusCode::OK, "{how:?}: {}", r.body);
        }
        for round in 0..3 {
            let before = lab.api.connections();
            lab.api.close_connections(how);
            // The lanes see their connections end (a closed socket, a GOAWAY).
            tokio::time::sleep(Duration::from_millis(200)).await;
            for i in 0..4 {
                let r = lab.call(From::PodA, None, "GET", path).await;
                assert_eq!(
                    r.status,
                    StatusCode::OK,
                    "{how:?}, round {round}, request {i}: {}",
                    r.body
                );
            }
            let after = lab.api.connections();
            // One new connection per event loop that served a request (the lab runs
            // two), none per request.
            assert!(
                (before + 1..=before + 2).contains(&after),
                "{how:?}, round {round}: {before} connections, then {after}"
            );
        }
        assert_eq!(lab.api.seen_at("GET", path).len(), 3 + 3 * 4, "{how:?}");
    }
}

/// An API server that goes away after the lanes went HTTP/2 is a 503 the client
/// retries (the lane cannot open a connection), as before it was ever reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_gone_after_its_connections_opened_is_a_503() {
    let lab = pass_through().await;
    let path = "/api/v1/namespaces/e2e/configmaps";
    for _ in 0..3 {
        let r = lab.call(From::PodA, None, "GET", path).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    lab.api.stop();
    lab.api.close_connections(fake_api::End::Graceful);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..2 {
        let r = lab.call(From::PodA, None, "GET", path).await;
        assert_unreachable(&lab, &r);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_share_api_server_connections() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let lab = pass_through().await;
    // 150 requests at once on one agent HTTP/2 connection, before the gate has ever
    // connected to the API server: a negotiating client would open one connection per
    // request while the first is in its TLS handshake.
    let tls = lab.dial(From::PodA, b"h2").await;
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let path = "/api/v1/namespaces/e2e/configmaps";
    let calls = (0..150).map(|_| {
        let mut send = send.clone();
        async move {
            let req = Request::get(format!("https://kubernetes.default{path}"))
                .body(Empty::new())
                .unwrap();
            let r = send.send_request(req).await.unwrap();
            let status = r.status();
            r.into_body().collect().await.unwrap();
            status
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(lab.api.seen_at("GET", path).len(), 150);
    // 100 streams per connection: two lanes, one connection each (a third when the
    // second lane opens after the first answer showed HTTP/2, see below).
    let n = lab.api.connections();
    assert!(
        (1..=3).contains(&n),
        "{n} API server connections for 150 requests"
    );
    // Once the API server is known to speak HTTP/2, new requests go to an
    // HTTP/2-only lane (one more connection per event loop — the lab runs two — whose
    // client never races itself again; the negotiating lanes close when idle) and keep
    // using it. Which loop a new agent connection lands on depends on whether the last
    // one has closed yet (the least-loaded loop), so the second loop's lane may open in
    // any batch: the bound is one lane per loop, however many requests follow.
    let mut counts = Vec::new();
    for _ in 0..4 {
        for _ in 0..5 {
            let r = lab.call(From::PodA, None, "GET", path).await;
            assert_eq!(r.status, StatusCode::OK);
        }
        counts.push(lab.api.connections());
    }
    assert!(
        counts.iter().all(|c| *c <= n + 2),
        "{n} then {counts:?} (at most one HTTP/2-only lane per event loop)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_becomes_a_byte_pipe_and_its_end_is_recorded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lab = pass_through().await;
    let path = "/api/v1/namespaces/e2e/pods/p/exec";
    let mut tls = lab.dial(From::PodA, b"http/1.1").await;
    tls.write_all(
        format!(
            "GET {path}?command=sh HTTP/1.1\r\nHost: k\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    tls.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    // Our side ends; the gate then ends the session on both sides.
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    drop(tls);
    let (rec, resp) = lab.records("GET", path).await;
    assert!(rec.upgrade && rec.mutating);
    assert_eq!(rec.decision.as_str(), "pass-through");
    assert_eq!(resp.code, 101);
    assert_eq!(resp.session_bytes, Some((4, 4)));
    let seen = lab.api.seen_at("GET", path);
    assert_eq!(seen[0].headers["upgrade"], "websocket");
    assert_eq!(seen[0].headers["authorization"], "Bearer daemon-token");
}

/// The impersonation a connection remembers is the current policy's: a policy reload
/// that maps the subject elsewhere (or nowhere) applies to the next request on a
/// connection opened before it, and another identity on the connection gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_impersonation_follows_the_policy_and_the_identity() {
    use crate::{identity::Identity, k8s::UserInfo, policy::Policy};
    use std::sync::Arc;
    let lab = gated().await;
    let conn = lab.conn(From::PodA);
    let parse = |text: &str| Arc::new(Policy::parse(text, std::path::Path::new("p.yaml")).unwrap());
    let first = parse(lab::POLICY);
    let second = parse(&lab::POLICY.replace("\"portcullis:agent\"", "\"portcullis:narrower\""));
    let unmapped = parse(&lab::POLICY.replace("name: agent}", "name: someone-else}"));
    let id = |user: &str| {
        Arc::new(Identity {
            user: UserInfo {
                username: user.into(),
                groups: vec![],
            },
            issuer: "https://kubernetes.default.svc".into(),
            subject: user.into(),
            token_id: "t".into(),
            expires_at: u64::MAX,
            token_pod: None,
            kernel_pod: None,
        })
    };
    let agent = id(AGENT);
    let shown = |i: Option<crate::upstream::Impersonation>| format!("{i:?}");
    let a = shown(super::authorize::impersonation(&conn, &agent, &first));
    assert!(a.contains("portcullis:agent"), "{a}");
    assert_eq!(
        a,
        shown(super::authorize::impersonation(&conn, &agent, &first))
    );
    let b = shown(super::authorize::impersonation(&conn, &agent, &second));
    assert!(
        b.contains("portcullis:narrower") && !b.contains("portcullis:agent\""),
        "{b}"
    );
    assert!(super::authorize::impersonation(&conn, &agent, &unmapped).is_none());
    let other = id("system:serviceaccount:e2e:other");
    assert!(super::authorize::impersonation(&conn, &other, &first).is_none());
    let again = shown(super::authorize::impersonation(&conn, &agent, &first));
    assert_eq!(again, a);
}
