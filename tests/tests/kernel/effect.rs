//! Programs actually in effect (a detached link, a cgroup outside the attach point or
//! removed) and bounded floods.
use std::time::Duration;

use serde_json::Value;

use super::{assert_redirected, assert_standin_untouched, lab, run};
use crate::packet::attach_state;
use portcullis_tests::{Lab, wait_for};

fn effect(lab: &Lab) -> Value {
    std::fs::read(lab.state_dir().join("kernel-effect.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Someone with CAP_BPF detaches a link (`bpftool link detach`): the pin stays, so a
/// daemon that only looks at its pins would think it still enforces. The daemon asks
/// the kernel what is in effect, re-attaches, and says so.
#[test]
fn a_link_detached_behind_the_daemons_back_is_detected_and_reattached() {
    let lab = lab("detach");
    let p = run(&lab, &["tcp", &lab.api().to_string()]);
    assert_redirected(&lab, &p, lab.api());
    wait_for(5, || (effect(&lab)["ok"] == true).then_some(()))
        .unwrap_or_else(|| panic!("programs never verified in effect: {}", effect(&lab)));

    let link = lab.bpffs_dir.join("links/pc_connect4");
    portcullis_tests::detach_pinned_link(&link).unwrap();
    let report = lab
        .wait_event(10, |e| e["kind"] == "enforcement_repaired")
        .unwrap_or_else(|| {
            panic!(
                "no enforcement_repaired record; effect {}; log:\n{}",
                effect(&lab),
                lab.daemon_log()
            )
        });
    eprintln!("{report}");
    assert!(
        report["attachment"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains("pc_connect4")),
        "{report}"
    );
    assert_eq!(attach_state(&lab)["mode"], "replaced");
    wait_for(5, || (effect(&lab)["ok"] == true).then_some(()))
        .unwrap_or_else(|| panic!("not in effect after the repair: {}", effect(&lab)));
    // Enforcement is back.
    let p = run(&lab, &["tcp", &lab.api().to_string()]);
    assert_redirected(&lab, &p, lab.api());
    // The audit chain has it too.
    let audit = std::fs::read_dir(lab.state_dir().join("audit"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        audit.contains("enforcement_repaired"),
        "not in the audit chain"
    );
    let status = lab.portcullis(&["status"]).unwrap();
    assert!(status.contains("programs in effect: yes"), "{status}");
}

/// A cgroup outside the attach point would be enrolled in the map but never seen by
/// the programs: refused. An enrolled cgroup that is removed (its id stays in the map)
/// is listed as removed (nothing can run there), never shown as enforced.
#[test]
fn enrolling_outside_the_attach_point_is_refused_and_a_removed_cgroup_is_not_shown_enforced() {
    let lab = lab("outside");
    let outside = portcullis_tests::cgroup2_root()
        .unwrap()
        .join(format!("portcullis-outside-{}", std::process::id()));
    std::fs::create_dir_all(&outside).unwrap();
    let (ok, out) = lab
        .portcullis_status(&["enroll", outside.to_str().unwrap()])
        .unwrap();
    let _ = std::fs::remove_dir(&outside);
    assert!(!ok, "enrolled a cgroup outside the attach point: {out}");
    assert!(out.contains("not below kernel.attach_cgroup"), "{out}");

    let gone = lab.cg_root.join("gone");
    std::fs::create_dir_all(&gone).unwrap();
    let (ok, out) = lab
        .portcullis_status(&["enroll", gone.to_str().unwrap()])
        .unwrap();
    assert!(ok, "{out}");
    let id = Lab::cgroup_id(&gone);
    std::fs::remove_dir(&gone).unwrap();
    // Removed: nothing can run there, so it is no gap — but it is never shown as
    // enforced either: it is listed as removed (and dropped by the enroller).
    let e = wait_for(5, || {
        let e = effect(&lab);
        e["removed"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r.as_u64() == Some(id)))
            .then_some(e)
    })
    .unwrap_or_else(|| panic!("removed cgroup not reported: {}", effect(&lab)));
    assert!(
        !e["uncovered"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["cgroup_id"].as_u64() == Some(id))),
        "{e}"
    );
    let (_, doctor) = lab.portcullis_status(&["doctor"]).unwrap();
    assert!(
        doctor.contains("no longer exist"),
        "the doctor does not name the removed cgroup: {doctor}"
    );
    lab.portcullis(&["unenroll", &lab.cg_root.join("gone").to_string_lossy()])
        .ok();
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn vm_hwm_kib(pid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// 200,000 refused datagrams (bounded: 20 s): a bounded number of lines and bytes on
/// disk, bounded daemon memory, and counts that add up exactly.
#[test]
fn a_flood_of_refused_datagrams_is_aggregated_within_budget() {
    let lab = lab("flood");
    let ready: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.state_dir().join("ready")).unwrap())
            .unwrap();
    let daemon = ready["pid"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = dir_bytes(&lab.state_dir());
    let hwm_before = vm_hwm_kib(daemon);
    let t = std::time::Instant::now();
    let p = run(
        &lab,
        &[
            "bench-events",
            &lab.api().to_string(),
            "--count",
            "200000",
            "--max-secs",
            "20",
        ],
    );
    let secs = t.elapsed().as_secs() + 1;
    let refused = p.json["refused"].as_u64().unwrap();
    assert!(
        refused >= 100_000,
        "the flood was too small to mean anything: {}",
        p.json
    );
    let agent = Lab::cgroup_id(&lab.agent_cg);
    let tally = || {
        let (mut single, mut aggregated, mut lines) = (0u64, 0u64, 0u64);
        for e in lab.kernel_events() {
            if e["kind"] != "datagram_refused" {
                continue;
            }
            lines += 1;
            if e["origin"]["agent_cgroup_id"].as_u64() != Some(agent) {
                continue;
            }
            match e["aggregated"]["count"].as_u64() {
                Some(n) => aggregated += n,
                None => single += 1,
            }
        }
        (single, aggregated, lines)
    };
    let counted = wait_for(10, || {
        let (s, a, l) = tally();
        (s + a == refused).then_some((s, a, l))
    });
    let (single, aggregated, lines) =
        counted.unwrap_or_else(|| panic!("counts never added up to {refused}: {:?}", tally()));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let grew = dir_bytes(&lab.state_dir()).saturating_sub(before);
    let hwm = vm_hwm_kib(daemon);
    eprintln!(
        "{refused} refused in {secs} s: {single} written one by one, {aggregated} aggregated in {} lines; state grew {grew} bytes; daemon VmHWM {hwm_before} -> {hwm} kB",
        lines - single
    );
    // The kernel sends at most 20 per second, CPU and key; the aggregates are one line
    // per key and second.
    assert!(
        single <= 20 * cpus * (secs + 1),
        "{single} events written one by one"
    );
    assert!(lines <= single + 2 * (secs + 12), "{lines} lines");
    assert!(
        grew < 2 << 20,
        "state grew {grew} bytes for {refused} refused datagrams"
    );
    assert!(
        hwm.saturating_sub(hwm_before) < 64 << 10,
        "daemon memory grew from {hwm_before} to {hwm} kB"
    );
    assert_standin_untouched(&lab);
}
