//! `cargo xtask bench audit`: durable audit records per second. Concurrent requests
//! each wait until their record is fsynced; the writer batches what arrives meanwhile
//! into one fsync (group commit). Baseline in the same run: one request at a time (an
//! fsync per record). Records are realistic `request` records (~700 bytes). Bounded in
//! count and time. Results: stdout and target/bench/audit.json.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use portcullis::{
    audit::{AuditLog, AuditWriter, Decision, Origin, RequestRecord, Subject, load_or_create_key},
    config::Audit,
    k8s::RequestInfo,
};

fn record(i: u64) -> RequestRecord {
    RequestRecord {
        id: format!("req-bench-{i}"),
        received_ns: 1_795_000_000_000_000_000 + i,
        conn: i % 16,
        user: Some(std::sync::Arc::new(Subject {
            username: "system:serviceaccount:agents:coder".into(),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:agents".into(),
                "system:authenticated".into(),
            ],
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            token_id: "3f2a9c1d0b7e6a55".into(),
        })),
        origin: std::sync::Arc::new(Origin {
            peer: "10.0.1.2:51234".into(),
            original_dst: "10.96.0.1:443".into(),
            pid: 4242,
            comm: "kubectl".into(),
            cgroup_id: 12345,
            pod_uid: "6f1c2a7e-1111-4000-8000-000000000001".into(),
        }),
        method: "DELETE".into(),
        path: format!("/api/v1/namespaces/agents/configmaps/cm-{i}"),
        query: String::new(),
        attributes: RequestInfo {
            is_resource_request: true,
            path: format!("/api/v1/namespaces/agents/configmaps/cm-{i}"),
            verb: "delete".into(),
            api_prefix: "api".into(),
            api_version: "v1".into(),
            namespace: "agents".into(),
            resource: "configmaps".into(),
            name: format!("cm-{i}").into(),
            ..RequestInfo::default()
        },
        upgrade: false,
        mutating: true,
        decision: Decision::Allow,
        rule: "agent-writes".into(),
        approval: String::new(),
        grant: String::new(),
        content_type: String::new(),
        request_body: None,
        precondition: String::new(),
    }
}

/// `total` records from `concurrency` tasks, each awaiting durability: records/s.
async fn run(dir: &std::path::Path, concurrency: usize, total: u64, limit: Duration) -> (f64, u64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("bench dir");
    let key = load_or_create_key(&dir.join("audit.key")).expect("key");
    let w = AuditWriter::open(&dir.join("audit"), key, 64 << 20).expect("writer");
    let log = AuditLog::start(w, &Audit::default()).expect("start");
    let t0 = Instant::now();
    let per = total / concurrency as u64;
    let mut tasks = Vec::new();
    for c in 0..concurrency as u64 {
        let log: Arc<AuditLog> = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            for i in 0..per {
                if t0.elapsed() > limit {
                    break;
                }
                log.durable(portcullis::audit::Kind::Request, &record(c * per + i))
                    .await
                    .expect("durable");
                done += 1;
            }
            done
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.expect("task");
    }
    (n as f64 / t0.elapsed().as_secs_f64(), n)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/audit-run");
    let limit = Duration::from_secs(20);
    let (one, n1) = rt.block_on(run(&dir, 1, 2_000, limit));
    println!("one at a time (fsync per record):   {one:>9.0} durable records/s ({n1} records)");
    let mut rows = vec![serde_json::json!({"concurrency": 1, "records_per_s": one, "records": n1})];
    for c in [16, 64, 256] {
        let (r, n) = rt.block_on(run(&dir, c, 50_000, limit));
        println!(
            "{c:>3} concurrent (group commit):       {r:>9.0} durable records/s ({n} records), {:.1}x the baseline",
            r / one
        );
        rows.push(serde_json::json!({"concurrency": c, "records_per_s": r, "records": n, "over_baseline": r / one}));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.parent().expect("parent").join("audit.json");
    let _ = std::fs::write(out, serde_json::to_vec_pretty(&rows).unwrap_or_default());
}
