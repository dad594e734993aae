//! `cargo xtask bench mask`: masking throughput and memory on a 10,000-Secret list and
//! a pod log stream, fed in 64 KiB chunks as bodies arrive from the API server, with
//! two baselines measured in the same run: a plain copy of the chunks (the floor) and
//! a serde_json parse + re-serialise of the whole body (what masking through a DOM
//! would cost). Goal (issue 14): >= 1 GB/s, peak memory < 2x the body.
//! Results: stdout and target/bench/mask.json.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use portcullis::mask::{BodyMasker, Detectors, JsonMasker, Plan, TextMasker};

/// Counts live heap bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only adds accounting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

const CHUNK: usize = 64 << 10;
const ROUNDS: usize = 5;

fn secret_list(n: usize) -> Vec<u8> {
    use serde_json::json;
    let b64 = |len: usize, seed: usize| {
        use base64::Engine;
        let raw: Vec<u8> = (0..len).map(|i| (i * 31 + seed * 7) as u8).collect();
        base64::engine::general_purpose::STANDARD.encode(raw)
    };
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let data = json!({
                "username": b64(16, i),
                "password": b64(32, i + 1),
                "tls.key": b64(1200, i + 2),
            });
            let mut annotations = json!({ "team": "bench" });
            if i.is_multiple_of(10) {
                let applied = json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": format!("secret-{i}"), "namespace": "bench"}, "data": data});
                annotations["kubectl.kubernetes.io/last-applied-configuration"] =
                    json!(applied.to_string());
            }
            json!({
                "metadata": {
                    "name": format!("secret-{i}"), "namespace": "bench",
                    "uid": format!("6f1c2a7e-0000-4000-8000-{i:012}"),
                    "resourceVersion": format!("{}", 100000 + i),
                    "creationTimestamp": "2026-11-22T10:00:00Z",
                    "labels": {"app": "bench", "tier": "backend"},
                    "annotations": annotations,
                    "managedFields": [{"manager": "kubectl-create", "operation": "Update",
                        "apiVersion": "v1", "time": "2026-11-22T10:00:00Z", "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:data": {".": {}, "f:password": {}, "f:tls.key": {}, "f:username": {}}, "f:type": {}}}]
                },
                "data": data,
                "type": "Opaque"
            })
        })
        .collect();
    serde_json::to_vec(&json!({"kind": "SecretList", "apiVersion": "v1",
        "metadata": {"resourceVersion": "987654"}, "items": items}))
    .expect("encode")
}

fn log_stream(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 256);
    let mut i = 0usize;
    while out.len() < bytes {
        let line = if i.is_multiple_of(50) {
            format!(
                "2026-11-22T10:00:{:02}Z WARN retrying db connection password=hunter{i} attempt={}\n",
                i % 60,
                i % 7
            )
        } else {
            format!(
                "2026-11-22T10:00:{:02}Z INFO handled GET /api/v1/namespaces/bench/pods/p-{i} status=200 duration={}ms user=alice\n",
                i % 60,
                i % 97
            )
        };
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out
}

struct Run {
    secs: f64,
    out_bytes: usize,
    /// Peak heap while running, beyond what was live before (the body itself).
    extra_peak: usize,
}

fn measure(body: &[u8], f: impl FnOnce(&[u8]) -> usize) -> Run {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t = Instant::now();
    let out_bytes = f(body);
    let secs = t.elapsed().as_secs_f64();
    Run {
        secs,
        out_bytes,
        extra_peak: PEAK.load(Ordering::Relaxed).saturating_sub(base),
    }
}

fn median(mut v: Vec<Run>) -> Run {
    v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    v.swap_remove(v.len() / 2)
}

/// A small GET's answer, shaped like the API server's (the proxy benchmark's).
fn small_object() -> Vec<u8> {
    serde_json::json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {
        "name": "small", "namespace": "e2e", "uid": "6f1c2b1e-0000-4000-8000-000000000000",
        "resourceVersion": "1000", "creationTimestamp": "2026-12-01T10:00:00Z",
        "managedFields": [{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
            "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:data": {".": {}, "f:d": {}}}}]},
        "data": {"k": "v"}})
    .to_string()
    .into_bytes()
}

#[inline(never)]
fn mask_small(plan: &Arc<Plan>, body: &[u8]) -> usize {
    mask_stream(BodyMasker::Json(JsonMasker::new(plan.clone())), body)
}

fn mask_stream(mut m: BodyMasker, body: &[u8]) -> usize {
    let mut n = 0;
    for c in body.chunks(CHUNK) {
        // Each masked chunk is sent on and dropped, as the proxy does.
        n += m.feed(c).expect("mask").len();
    }
    n + m.finish().expect("finish").len()
}

fn row(name: &str, body: &[u8], r: &Run) -> serde_json::Value {
    let mbs = body.len() as f64 / r.secs / 1e6;
    let peak_ratio = (body.len() + r.extra_peak) as f64 / body.len() as f64;
    println!(
        "{name:<34} {:>9.1} MB/s   peak {:>6.2}x body (extra {:>8} KiB)   out {:>9} B",
        mbs,
        peak_ratio,
        r.extra_peak >> 10,
        r.out_bytes
    );
    serde_json::json!({"name": name, "mb_per_s": mbs, "peak_over_body": peak_ratio,
        "extra_peak_bytes": r.extra_peak, "body_bytes": body.len(), "out_bytes": r.out_bytes, "secs": r.secs})
}

fn main() {
    // `cargo bench` passes --bench; nothing else is configurable.
    let detectors = Arc::new(Detectors::new());
    let plan = Arc::new(Plan::new(
        Plan::secret_paths(),
        Some(detectors.clone()),
        None,
    ));
    let list = secret_list(10_000);
    let logs = log_stream(64 << 20);
    println!(
        "bodies: 10,000-Secret list {:.1} MB, log stream {:.1} MB; {CHUNK} B chunks; median of {ROUNDS}",
        list.len() as f64 / 1e6,
        logs.len() as f64 / 1e6
    );
    // MASK_BENCH_PROFILE=list|logs: only mask that body, 20 times (MASK_BENCH_ROUNDS),
    // for a profiler. `small`: a ~400-byte ConfigMap (the proxy benchmark's small GET)
    // through a new masker each round, as every answer gets one: the fixed cost per
    // answer (callgrind: `--toggle-collect=*mask_small*`).
    if let Ok(which) = std::env::var("MASK_BENCH_PROFILE") {
        let rounds: u32 = std::env::var("MASK_BENCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(20);
        if which == "small" {
            let body = small_object();
            let t = Instant::now();
            let mut out = 0;
            for _ in 0..rounds {
                out += std::hint::black_box(mask_small(&plan, &body));
            }
            let per = t.elapsed().as_secs_f64() / f64::from(rounds) * 1e9;
            println!(
                "small ({} B, out {}): {per:.0} ns per answer over {rounds} rounds",
                body.len(),
                out / rounds.max(1) as usize
            );
            return;
        }
        let body = if which == "logs" { &logs } else { &list };
        let t = Instant::now();
        for _ in 0..rounds {
            let m = if which == "logs" {
                BodyMasker::Text(TextMasker::new(detectors.clone()))
            } else {
                BodyMasker::Json(JsonMasker::new(plan.clone()))
            };
            std::hint::black_box(mask_stream(m, body));
        }
        let mbs = f64::from(rounds) * body.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
        println!("{which}: {mbs:.0} MB/s over {rounds} rounds");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for (name, body) in [("secret list", &list), ("log stream", &logs)] {
        let copy = median(
            (0..ROUNDS)
                .map(|_| {
                    measure(body, |b| {
                        b.chunks(CHUNK)
                            .map(|c| std::hint::black_box(c.to_vec()).len())
                            .sum()
                    })
                })
                .collect(),
        );
        let masked = median(
            (0..ROUNDS)
                .take_while(|_| Instant::now() < deadline)
                .map(|_| {
                    let m = if name == "log stream" {
                        BodyMasker::Text(TextMasker::new(detectors.clone()))
                    } else {
                        BodyMasker::Json(JsonMasker::new(plan.clone()))
                    };
                    measure(body, |b| mask_stream(m, b))
                })
                .collect(),
        );
        rows.push(row(&format!("{name}: copy (floor)"), body, &copy));
        let mrow = row(&format!("{name}: Portcullis masker"), body, &masked);
        if name == "secret list" {
            let dom = median(
                (0..ROUNDS)
                    .take_while(|_| Instant::now() < deadline)
                    .map(|_| {
                        measure(body, |b| {
                            let v: serde_json::Value = serde_json::from_slice(b).expect("json");
                            serde_json::to_vec(&v).expect("encode").len()
                        })
                    })
                    .collect(),
            );
            let drow = row(&format!("{name}: serde_json DOM round trip"), body, &dom);
            println!(
                "  masker vs DOM round trip: {:.2}x the throughput, {:.2}x the peak memory",
                dom.secs / masked.secs,
                (body.len() + masked.extra_peak) as f64 / (body.len() + dom.extra_peak) as f64
            );
            rows.push(drow);
        }
        let mbs = body.len() as f64 / masked.secs / 1e6;
        let peak = (body.len() + masked.extra_peak) as f64 / body.len() as f64;
        println!(
            "  {name}: {mbs:.0} MB/s (goal >= 1000: {}), peak {peak:.2}x body (goal < 2: {}), {:.2}x slower than a copy",
            if mbs >= 1000.0 { "met" } else { "MISSED" },
            if peak < 2.0 { "met" } else { "MISSED" },
            masked.secs / copy.secs
        );
        results.push(
            serde_json::json!({"body": name, "mb_per_s": mbs, "peak_over_body": peak,
            "goal_throughput_met": mbs >= 1000.0, "goal_memory_met": peak < 2.0}),
        );
        rows.push(mrow);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let out = serde_json::json!({"rows": rows, "results": results});
    let _ = std::fs::write(
        dir.join("mask.json"),
        serde_json::to_vec_pretty(&out).unwrap_or_default(),
    );
}
