//! Deciding on what a request does: conditions read the dry run's result and the
//! stored object, the write is made conditional on the checked version (a change in
//! between is a 409, never the forbidden effect), and a grant covers exactly the
//! request that was approved.
use std::time::Duration;

use http::StatusCode;

use super::lab::{From, Lab, Mode, Options, POD_B, alice, req};

const POLICY: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AgentPolicy
metadata: {name: effect}
spec:
  identities:
  - subjects: [{kind: ServiceAccount, namespace: e2e, name: agent}]
    impersonate: {user: "portcullis:agent", groups: ["portcullis:agents"]}
  rules:
  - {name: reads, verbs: [get, list, watch], apiGroups: ["*"], resources: ["*"], action: allow}
  - {name: writes, verbs: [create, update, patch, delete], apiGroups: ["", apps], resources: ["*"], action: allow}
  - name: no-scale-to-zero
    verbs: [update, patch]
    apiGroups: [apps]
    resources: [deployments, deployments/scale]
    conditions:
    - {name: running, expression: "oldObject.spec.replicas > 0"}
    - {name: to-zero, expression: "object.spec.replicas == 0"}
    action: deny
    message: scaling a running workload to zero deletes its pods
  - name: held-edits
    verbs: [patch]
    apiGroups: [apps]
    resources: [deployments]
    resourceNames: ["held-*"]
    action: approve
    message: edits of held-* need a human
    approval: {approvers: [{kind: Group, name: oncall}], holdTime: 20s, grantTTL: 5m}
  - name: quick-deletes
    verbs: [delete]
    apiGroups: [""]
    resources: [configmaps]
    resourceNames: ["quick-*"]
    action: approve
    approval: {approvers: [{kind: Group, name: oncall}], holdTime: 0s, grantTTL: 5m}
"#;

async fn lab() -> Lab {
    let mut o = Options::new(Mode::Gated);
    o.policy = POLICY;
    Lab::start(o).await
}

const WEB: &str = "/apis/apps/v1/namespaces/e2e/deployments/web";
const HELD: &str = "/apis/apps/v1/namespaces/e2e/deployments/held-web";

fn deployment(name: &str, replicas: i64) -> serde_json::Value {
    serde_json::json!({"kind": "Deployment", "apiVersion": "apps/v1",
        "metadata": {"name": name, "namespace": "e2e"}, "spec": {"replicas": replicas}})
}

fn patch(path: &str, token: &str, body: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    req(
        "PATCH",
        path,
        Some(token),
        Some(("application/merge-patch+json", body)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_is_decided_on_what_it_makes_of_the_stored_object() {
    let lab = lab().await;
    lab.api.put_object(WEB, deployment("web", 3), 10);
    let t = lab.agent_token();
    let r = lab
        .send(
            From::PodA,
            false,
            patch(WEB, &t, r#"{"spec":{"replicas":0}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(
        r.message().contains("scaling a running workload to zero"),
        "{}",
        r.body
    );
    // The API server saw the read and the dry run, never the write.
    let seen = lab.api.seen_at("PATCH", WEB);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].uri.query().unwrap_or("").contains("dryRun=All"));
    assert_eq!(seen[0].headers["impersonate-user"], "portcullis:agent");
    assert_eq!(lab.api.seen_at("GET", WEB).len(), 1);
    assert_eq!(lab.api.object(WEB).unwrap()["spec"]["replicas"], 3);
    // An allowed edit goes through, conditional on the version that was checked.
    let r = lab
        .send(
            From::PodA,
            false,
            patch(WEB, &t, r#"{"spec":{"replicas":2}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let real: Vec<_> = lab
        .api
        .seen_at("PATCH", WEB)
        .into_iter()
        .filter(|s| !s.uri.query().unwrap_or("").contains("dryRun"))
        .collect();
    assert_eq!(real.len(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&real[0].body).unwrap();
    assert_eq!(sent["metadata"]["resourceVersion"], "10", "{sent}");
    assert_eq!(sent["spec"]["replicas"], 2);
    assert_eq!(lab.api.object(WEB).unwrap()["spec"]["replicas"], 2);
    let (rec, _) = lab.records("PATCH", WEB).await;
    assert_eq!(rec.precondition, "10");
    assert_eq!(rec.decision.as_str(), "allow");
    // A patch that keeps zero at zero is no scale-down: allowed.
    lab.api.put_object(WEB, deployment("web", 0), 20);
    let r = lab
        .send(
            From::PodA,
            false,
            patch(WEB, &t, r#"{"spec":{"replicas":0}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_between_check_and_write_is_a_conflict_not_the_forbidden_effect() {
    let lab = lab().await;
    lab.api.put_object(HELD, deployment("held-web", 0), 5);
    let t = lab.agent_token();
    // At zero, setting zero is allowed; it waits for a human (held-*).
    let held = {
        let t = t.clone();
        let lab_addr = &lab;
        async move {
            lab_addr
                .send(
                    From::PodA,
                    false,
                    patch(HELD, &t, r#"{"spec":{"replicas":0}}"#),
                )
                .await
        }
    };
    let approver = async {
        let a = lab.pending("held-web").await;
        // While it waits, someone else scales the deployment up.
        lab.api.put_object(HELD, deployment("held-web", 3), 6);
        tokio::time::sleep(Duration::from_millis(50)).await;
        lab.approvals().approve(&a.id, &alice(), None).unwrap();
    };
    let (r, ()) = tokio::join!(held, approver);
    // The checked request would now scale a running deployment to zero: the write was
    // conditional on version 5, so the API server refused it.
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(lab.api.object(HELD).unwrap()["spec"]["replicas"], 3);
    for s in lab.api.seen_at("PATCH", HELD) {
        let b: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(
            b["metadata"]["resourceVersion"], "5",
            "unconditional write: {b}"
        );
    }
    // The retry is decided on the new state: denied.
    let r = lab
        .send(
            From::PodA,
            false,
            patch(HELD, &t, r#"{"spec":{"replicas":0}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(
        r.message().contains("scaling a running workload to zero"),
        "{}",
        r.body
    );
    assert_eq!(lab.api.object(HELD).unwrap()["spec"]["replicas"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_covers_only_the_request_that_was_approved() {
    let lab = lab().await;
    let path = "/api/v1/namespaces/e2e/configmaps/quick-g";
    let t = lab.agent_token();
    let del = |q: &str, body: Option<&str>| {
        let p = format!("{path}{q}");
        let mut r = req(
            "DELETE",
            &p,
            Some(&t),
            body.map(|b| ("application/json", b)),
        );
        *r.uri_mut() = p.parse().unwrap();
        r
    };
    let body = r#"{"propagationPolicy":"Background"}"#;
    let r = lab.send(From::PodA, false, del("", Some(body))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let a = lab.pending("quick-g").await;
    lab.approvals().approve(&a.id, &alice(), None).unwrap();
    let r = lab.send(From::PodA, false, del("", Some(body))).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "the approved request: {}",
        r.body
    );
    // The same attributes, but another body, query or pod: not covered.
    let orphan = r#"{"propagationPolicy":"Orphan"}"#;
    let pod_b = lab.token("agent", POD_B);
    let others = [
        (From::PodA, del("", Some(orphan))),
        (From::PodA, del("?dryRun=All", Some(body))),
        (From::PodA, del("?gracePeriodSeconds=0", Some(body))),
        (
            From::PodB,
            req(
                "DELETE",
                path,
                Some(&pod_b),
                Some(("application/json", body)),
            ),
        ),
    ];
    for (from, r) in others {
        let what = format!("{} {:?}", r.uri(), from);
        let r = lab.send(from, false, r).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}: {}", r.body);
        assert!(r.message().contains("is pending"), "{what}: {}", r.body);
    }
    let pending = lab
        .approvals()
        .list()
        .into_iter()
        .filter(|a| a.state == crate::approvals::State::Pending)
        .count();
    assert_eq!(pending, 4);
}

/// A service-account token keeps its signature after its service account or pod is
/// deleted; TokenReview tells, and the gate asks it (answers reused for a short TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_api_server_no_longer_authenticates_is_refused() {
    let lab = lab().await;
    let t = lab.agent_token();
    let path = "/api/v1/namespaces/e2e/configmaps";
    let r = lab.call(From::PodA, Some(&t), "GET", path).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let reviews = lab
        .api
        .seen_at("POST", "/apis/authentication.k8s.io/v1/tokenreviews");
    assert_eq!(reviews.len(), 1);
    assert!(!reviews[0].headers.contains_key("impersonate-user"));
    // Within the TTL the answer is reused.
    let r = lab.call(From::PodA, Some(&t), "GET", path).await;
    assert_eq!(r.status, StatusCode::OK);
    lab.api.revoke(super::lab::AGENT);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = lab.call(From::PodA, Some(&t), "GET", path).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert!(r.message().contains("no longer valid"), "{}", r.body);
    assert!(r.message().contains("invalidated"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_cannot_carry_the_precondition_is_refused() {
    let lab = lab().await;
    lab.api.put_object(WEB, deployment("web", 3), 10);
    let t = lab.agent_token();
    let r = lab
        .send(
            From::PodA,
            false,
            req(
                "PUT",
                WEB,
                Some(&t),
                Some(("application/vnd.kubernetes.protobuf", "k8s\u{0}x")),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", r.body);
    assert!(
        r.message().contains("send the request as JSON"),
        "{}",
        r.body
    );
    assert!(
        lab.api
            .seen_at("PUT", WEB)
            .iter()
            .all(|s| s.uri.query().unwrap_or("").contains("dryRun"))
    );
    assert_eq!(lab.api.object(WEB).unwrap()["spec"]["replicas"], 3);
}
