//! Packet sockets by every route (AF_PACKET, SOCK_PACKET via AF_INET, AF_XDP; native,
//! 32-bit compat and io_uring): refused, or the agent killed where BPF LSM cannot be
//! loaded; always reported; bystanders untouched.
use serde_json::Value;

use super::{EPERM, lab, run};
use portcullis_tests::{Lab, Probe};

const AF_INET: i32 = 2;
const AF_PACKET: i32 = 17;
const AF_XDP: i32 = 44;
const SOCK_DGRAM: i32 = 2;
const SOCK_RAW: i32 = 3;
const SOCK_PACKET: i32 = 10;
const SOCK_NONBLOCK_CLOEXEC: i32 = 0o4000 | 0o2000000;
const ETH_P_ALL: i32 = 0x0003;
const EOPNOTSUPP: i64 = 95;

/// Every route to a packet socket: (route, family, type, protocol as big-endian
/// ETH_P_*, the family the kernel really creates).
const PACKET_ROUTES: &[(&str, i32, i32, Option<i32>, i32)] = &[
    ("native", AF_PACKET, SOCK_RAW, Some(ETH_P_ALL), AF_PACKET),
    ("native", AF_PACKET, SOCK_DGRAM, Some(ETH_P_ALL), AF_PACKET),
    (
        "native",
        AF_PACKET,
        SOCK_RAW | SOCK_NONBLOCK_CLOEXEC,
        Some(ETH_P_ALL),
        AF_PACKET,
    ),
    ("native", AF_PACKET, SOCK_RAW, None, AF_PACKET),
    ("native", AF_INET, SOCK_PACKET, Some(ETH_P_ALL), AF_PACKET),
    ("native", AF_XDP, SOCK_RAW, None, AF_XDP),
    ("pair", AF_PACKET, SOCK_RAW, None, AF_PACKET),
    ("compat", AF_PACKET, SOCK_RAW, Some(ETH_P_ALL), AF_PACKET),
    ("compat", AF_PACKET, SOCK_DGRAM, Some(ETH_P_ALL), AF_PACKET),
    ("compat", AF_INET, SOCK_PACKET, Some(ETH_P_ALL), AF_PACKET),
    ("compat", AF_XDP, SOCK_RAW, None, AF_XDP),
    ("compat-pair", AF_PACKET, SOCK_RAW, None, AF_PACKET),
    (
        "socketcall",
        AF_PACKET,
        SOCK_RAW,
        Some(ETH_P_ALL),
        AF_PACKET,
    ),
    (
        "socketcall",
        AF_INET,
        SOCK_PACKET,
        Some(ETH_P_ALL),
        AF_PACKET,
    ),
    ("socketcall", AF_XDP, SOCK_RAW, None, AF_XDP),
    ("uring", AF_PACKET, SOCK_RAW, Some(ETH_P_ALL), AF_PACKET),
    ("uring", AF_PACKET, SOCK_DGRAM, Some(ETH_P_ALL), AF_PACKET),
    ("uring", AF_INET, SOCK_PACKET, Some(ETH_P_ALL), AF_PACKET),
    ("uring", AF_XDP, SOCK_RAW, None, AF_XDP),
];

fn socket_args(route: &str, family: i32, ty: i32, proto: Option<i32>) -> Vec<String> {
    let mut a = vec![
        "socket".to_string(),
        route.to_string(),
        family.to_string(),
        ty.to_string(),
        proto.unwrap_or(0).to_string(),
    ];
    if proto.is_some() {
        a.push("--protocol-be".into());
    }
    a
}

pub(crate) fn attach_state(lab: &Lab) -> Value {
    serde_json::from_slice(&std::fs::read(lab.state_dir().join("kernel-state.json")).unwrap())
        .unwrap()
}

/// The agent did not get the socket: refused with EPERM where the guard refuses,
/// killed (SIGKILL, nothing printed) where it kills.
fn assert_no_packet_socket(p: &Probe, refuses: bool, what: &str) {
    if refuses {
        assert!(!p.ok(), "{what}: packet socket created: {}", p.json);
        assert_eq!(p.errno(), Some(EPERM), "{what}: {}", p.json);
    } else {
        assert_eq!(
            p.killed_by(),
            Some(9),
            "{what}: the agent was not killed: {} {}",
            p.status,
            p.json
        );
        assert!(
            p.json.is_null(),
            "{what}: the probe printed a result: {}",
            p.json
        );
    }
}

#[test]
fn bypass_packet_sockets_by_every_route_are_refused_or_the_caller_killed() {
    let lab = lab("packet");
    let state = attach_state(&lab);
    // (A daemon from before this field kills: the field is then missing.)
    let refuses = state["packet_guard_refuses"].as_bool().unwrap_or(false);
    eprintln!(
        "packet guard {} (refuses: {refuses}), gaps {}",
        state["packet_guard"], state["packet_guard_gaps"]
    );
    assert!(
        state["packet_guard_gaps"]
            .as_array()
            .is_none_or(|g| g.is_empty()),
        "a route is uncovered: {}",
        state["packet_guard_gaps"]
    );
    for (i, &(route, family, ty, proto, final_family)) in PACKET_ROUTES.iter().enumerate() {
        // Each CPU reports at most EVENT_BUDGET_PER_WINDOW (20) refusals of one kind and
        // hook per cgroup and window one by one; the rest are only counted (aggregated
        // records). The 19 routes make 21 refusals (a socketpair creates two sockets,
        // each refused), so probed back to back within a window on one CPU the last
        // route's refusal was only counted (seen once in a full run). Half the budget
        // per window keeps every route's own event.
        if i > 0 && i % (portcullis_common::EVENT_BUDGET_PER_WINDOW as usize / 2) == 0 {
            std::thread::sleep(std::time::Duration::from_nanos(
                portcullis_common::EVENT_WINDOW_NS + 100_000_000,
            ));
        }
        let what = format!("{route} socket({family}, {ty}, {proto:?})");
        let args = socket_args(route, family, ty, proto);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = run(&lab, &args);
        assert_no_packet_socket(&p, refuses, &what);
        let pid = p.process as u64;
        let ev = lab
            .wait_event(5, |e| {
                e["kind"] == "packet_socket_refused" && e["origin"]["pid"].as_u64() == Some(pid)
            })
            .unwrap_or_else(|| panic!("{what}: no packet_socket_refused event for pid {pid}"));
        assert_eq!(
            ev["family"].as_i64(),
            Some(final_family as i64),
            "{what}: {ev}"
        );
        assert_eq!(
            ev["origin"]["agent_cgroup_id"].as_u64(),
            Some(Lab::cgroup_id(&lab.agent_cg)),
            "{what}: {ev}"
        );

        // The same call from a bystander cgroup is untouched.
        let b = lab.bystander(&args).unwrap();
        assert_eq!(
            b.killed_by(),
            None,
            "{what}: bystander killed: {}",
            b.status
        );
        let pair = route.ends_with("pair");
        assert!(
            b.ok() || (pair && b.errno() == Some(EOPNOTSUPP)),
            "{what}: bystander refused: {}",
            b.json
        );
        let bpid = b.process as u64;
        assert!(
            lab.kernel_events()
                .iter()
                .all(|e| e["origin"]["pid"].as_u64() != Some(bpid)),
            "{what}: the bystander was reported"
        );
    }
    // Ordinary sockets stay allowed to agents by every route.
    for route in ["native", "compat", "socketcall", "uring"] {
        let p = run(&lab, &["socket", route, "2", "2", "0"]);
        assert!(
            p.ok(),
            "{route}: an agent's UDP socket was refused: {} {}",
            p.status,
            p.json
        );
    }
}

/// A second thread rewrites socketcall's argument block in user memory while the
/// first calls it: a guard that checks the arguments before the kernel copies them can
/// be raced; one that checks the socket the kernel created cannot.
#[test]
fn bypass_racing_socketcall_arguments_gets_no_packet_socket() {
    let lab = lab("scrace");
    let refuses = attach_state(&lab)["packet_guard_refuses"]
        .as_bool()
        .unwrap_or(false);
    let p = run(&lab, &["socketcall-race"]);
    if refuses || p.killed_by().is_none() {
        assert!(p.ok(), "{} {}", p.status, p.json);
        assert_eq!(
            p.json["packet_sockets"], 0,
            "the race won a packet socket: {}",
            p.json
        );
        assert!(p.json["calls"].as_u64().unwrap() > 0);
    }
    if p.killed_by().is_some() {
        assert_eq!(p.killed_by(), Some(9));
        let pid = p.process as u64;
        lab.wait_event(5, |e| {
            e["kind"] == "packet_socket_refused" && e["origin"]["pid"].as_u64() == Some(pid)
        })
        .expect("the kill is reported");
    }
    // The bystander running the same race gets its packet sockets.
    let b = lab
        .bystander(&["socketcall-race", "--count", "5000"])
        .unwrap();
    assert!(b.ok(), "{} {}", b.status, b.json);
    assert!(b.json["packet_sockets"].as_u64().unwrap() > 0, "{}", b.json);
}
