//! Kernel tier: the real programs in the running kernel, each test in its own lab
//! (network namespaces, veths, cgroups). Every case of shared/notes/bypass-checklist.md
//! is attempted from the agent cgroup; each must be blocked AND reported as a
//! ring-buffer event. Run as root by `cargo xtask test`.
use std::{net::SocketAddr, time::Duration};

use portcullis_tests::{Lab, Probe, wait_for};
use serde_json::Value;

const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;

fn lab(tag: &str) -> Lab {
    let lab = Lab::new(tag).expect("building the lab (needs root)");
    lab.start_daemon().expect("starting the daemon");
    lab
}

fn run(lab: &Lab, args: &[&str]) -> Probe {
    let p = lab.agent(args).expect("running the probe");
    eprintln!(
        "probe {args:?} -> {} ({}) {}",
        p.json,
        p.status,
        p.stderr.trim()
    );
    p
}

/// The stand-in API server saw nothing from the agent network.
fn assert_standin_untouched(lab: &Lab) {
    std::thread::sleep(Duration::from_millis(300));
    let seen: Vec<Value> = lab
        .standin_log()
        .into_iter()
        .filter(|e| {
            let peer = e["peer"].as_str().unwrap_or("");
            peer.contains(&format!("10.{}.1.2", lab.s))
                || peer.contains(&format!("fd00:0:{}:1::2", lab.s))
        })
        .collect();
    assert!(
        seen.is_empty(),
        "the stand-in API server was reached: {seen:?}"
    );
}

fn event_for(lab: &Lab, kind: &str, pid: Option<u64>) -> Value {
    lab.wait_event(5, |e| {
        e["kind"] == kind && pid.is_none_or(|p| e["origin"]["pid"].as_u64() == Some(p))
    })
    .unwrap_or_else(|| {
        panic!(
            "no `{kind}` event for pid {pid:?}; events: {:?}",
            lab.kernel_events()
        )
    })
}

fn assert_redirected(lab: &Lab, p: &Probe, original: SocketAddr) {
    assert!(p.ok(), "connect failed: {}", p.json);
    // getpeername shows the address the agent asked for, not the daemon's.
    let peer = p.json["peer"]
        .as_str()
        .or(p.json["names"]["peer"].as_str())
        .unwrap_or("");
    let want = original.to_string();
    let mapped = format!("[::ffff:{}]:{}", original.ip(), original.port());
    assert!(
        peer == want || peer == mapped,
        "getpeername = {peer}, want {want}"
    );
    // The daemon accepted it and the kernel told it who and where.
    let pid = p.pid().unwrap();
    let conn = lab
        .wait_connection(5, |c| c["kernel"]["origin"]["pid"].as_u64() == Some(pid))
        .unwrap_or_else(|| {
            panic!(
                "daemon has no connection from pid {pid}: {:?}",
                lab.connections()
            )
        });
    let orig = conn["kernel"]["original_dst"].as_str().unwrap();
    assert_eq!(
        orig.parse::<SocketAddr>().unwrap().ip().to_canonical(),
        original.ip().to_canonical()
    );
    assert_eq!(orig.parse::<SocketAddr>().unwrap().port(), original.port());
    assert_eq!(conn["kernel"]["origin"]["comm"], "pc-probe");
    assert_eq!(
        conn["kernel"]["origin"]["cgroup_id"].as_u64(),
        Some(Lab::cgroup_id(&lab.agent_cg)),
        "origin cgroup"
    );
    event_for(lab, "redirected", Some(pid));
}

#[test]
fn redirect_cluster_ip_and_real_ip_with_origin() {
    let lab = lab("redirect");
    for target in [lab.cluster_ip(), lab.api()] {
        let p = run(&lab, &["tcp", &target.to_string()]);
        assert_redirected(&lab, &p, target);
    }
    assert_standin_untouched(&lab);
}

/// A client that connects and closes before the daemon gets to accept() (a busy daemon,
/// a short-lived agent) is still attributed: the daemon's copy of the kernel record
/// outlives the agent's socket.
#[test]
fn a_client_gone_before_the_daemon_accepts_is_still_attributed() {
    let lab = lab("late-accept");
    lab.freeze_daemon(true).unwrap();
    // The handshake completes into the accept queue; the probe looks and exits.
    let p = run(&lab, &["tcp", &lab.cluster_ip().to_string()]);
    lab.freeze_daemon(false).unwrap();
    assert_redirected(&lab, &p, lab.cluster_ip());
}

#[test]
fn bypass_ipv6_is_redirected() {
    let lab = lab("ipv6");
    let p = run(&lab, &["tcp", &lab.api_v6().to_string()]);
    assert_redirected(&lab, &p, lab.api_v6());
    assert_standin_untouched(&lab);
}

#[test]
fn bypass_v4_mapped_ipv6_is_unwrapped_and_redirected() {
    let lab = lab("mapped");
    let p = run(&lab, &["tcp-mapped", &lab.api().to_string()]);
    assert_redirected(&lab, &p, lab.api());
    let ev = event_for(&lab, "redirected", p.pid());
    assert_eq!(ev["hook"], "cgroup/connect6");
    assert_standin_untouched(&lab);
}

#[test]
fn bypass_udp_and_quic_are_refused() {
    let lab = lab("udp");
    for target in [lab.api(), lab.cluster_ip(), lab.api_v6()] {
        let p = run(&lab, &["udp", &target.to_string()]);
        assert!(!p.ok(), "UDP to {target} was sent: {}", p.json);
        assert_eq!(p.errno(), Some(EPERM));
        let ev = event_for(&lab, "datagram_refused", p.pid());
        assert_eq!(
            ev["dst"].as_str().unwrap().parse::<SocketAddr>().unwrap(),
            target
        );
    }
    assert_standin_untouched(&lab);
}

#[test]
fn bypass_connected_udp_is_refused_and_logged() {
    let lab = lab("udpconnect");
    let p = run(&lab, &["udp-connect", &lab.api().to_string()]);
    assert!(!p.ok(), "connected UDP socket to the API: {}", p.json);
    assert_eq!(p.errno(), Some(EPERM));
    let ev = event_for(&lab, "connect_refused", p.pid());
    assert_eq!(ev["hook"], "cgroup/connect4");
    // The program's own diagnostic arrives through aya-log in the daemon's log.
    let logged = wait_for(5, || {
        lab.daemon_log()
            .contains("refused connect to a protected endpoint: socket type 2")
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "no aya-log line in the daemon log:\n{}",
        lab.daemon_log()
    );
}

#[test]
fn bypass_tcp_fast_open_goes_through_the_connect_hook() {
    let lab = lab("tfo");
    let p = run(&lab, &["tfo", &lab.api().to_string()]);
    // sendto(MSG_FASTOPEN) connects as a side effect: it must land on the daemon.
    assert!(p.ok(), "{}", p.json);
    event_for(&lab, "redirected", p.pid());
    lab.wait_connection(5, |c| c["kernel"]["origin"]["pid"].as_u64() == p.pid())
        .expect("daemon saw the TFO connection");
    assert_standin_untouched(&lab);
}

#[test]
fn bypass_io_uring_connect_goes_through_the_connect_hook() {
    let lab = lab("uring");
    let p = run(&lab, &["uring", &lab.api().to_string()]);
    assert_redirected(&lab, &p, lab.api());
    assert_standin_untouched(&lab);
}

#[test]
fn bypass_raw_socket_is_refused() {
    let lab = lab("raw");
    for target in [lab.api(), lab.api_v6()] {
        let p = run(&lab, &["raw", &target.to_string()]);
        assert!(!p.ok(), "raw socket created: {}", p.json);
        assert_eq!(p.errno(), Some(EPERM));
        event_for(&lab, "raw_socket_refused", p.pid());
    }
    assert_standin_untouched(&lab);
}

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

fn attach_state(lab: &Lab) -> Value {
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
    let refuses = state["packet_guard_refuses"].as_bool().unwrap();
    eprintln!(
        "packet guard {} (refuses: {refuses}), gaps {}",
        state["packet_guard"], state["packet_guard_gaps"]
    );
    assert!(
        state["packet_guard_gaps"].as_array().unwrap().is_empty(),
        "a route is uncovered: {}",
        state["packet_guard_gaps"]
    );
    for &(route, family, ty, proto, final_family) in PACKET_ROUTES {
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
        .unwrap();
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

#[test]
fn bypass_leaving_the_cgroup_does_not_escape() {
    let lab = lab("leave");
    let procs = lab.bystander_cg.join("cgroup.procs");
    let p = run(
        &lab,
        &["leave", procs.to_str().unwrap(), &lab.api().to_string()],
    );
    assert!(p.ok(), "{}", p.json);
    let byst = format!(
        "{}",
        lab.bystander_cg.file_name().unwrap().to_string_lossy()
    );
    assert!(
        p.json["cgroup_after_move"]
            .as_str()
            .unwrap()
            .ends_with(&byst),
        "the move itself happened (we are root, no cgroup namespace): {}",
        p.json
    );
    // ...but the process and the child it forked afterwards stay agents.
    assert_eq!(p.json["parent"]["ok"], true, "{}", p.json);
    assert_eq!(p.json["parent"]["names"]["peer"], lab.api().to_string());
    assert_eq!(p.json["child"]["ok"], true, "{}", p.json);
    assert_eq!(p.json["child"]["peer"], lab.api().to_string());
    let parent = event_for(&lab, "sticky_agent_seen", p.pid());
    assert_eq!(
        parent["origin"]["cgroup_id"].as_u64(),
        Some(Lab::cgroup_id(&lab.bystander_cg))
    );
    assert_eq!(
        parent["origin"]["agent_cgroup_id"].as_u64(),
        Some(Lab::cgroup_id(&lab.agent_cg))
    );
    let child_pid = p.json["child"]["pid"].as_u64();
    event_for(&lab, "sticky_agent_seen", child_pid);
    assert_standin_untouched(&lab);
}

/// Starts the daemon again while an agent keeps connecting to the API server (bounded:
/// at most 200 attempts / 20 s, stopping at the first success). Returns the ready
/// record and each attempt's (ok, errno).
fn restart_while_an_agent_retries(lab: &Lab) -> (Value, Vec<(bool, Option<i64>)>) {
    std::thread::scope(|scope| {
        let h = scope.spawn(|| {
            let mut outcomes = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            for _ in 0..200 {
                if std::time::Instant::now() > deadline {
                    break;
                }
                let p = lab.agent(&["tcp", &lab.api().to_string()]).unwrap();
                let ok = p.ok();
                outcomes.push((ok, p.errno()));
                if ok {
                    break;
                }
            }
            outcomes
        });
        std::thread::sleep(Duration::from_millis(200));
        let ready = lab.start_daemon().expect("restart");
        (ready, h.join().unwrap())
    })
}

#[test]
fn daemon_down_fails_closed_and_restart_adopts_without_gap() {
    let lab = lab("restart");
    let before: Value =
        serde_json::from_slice(&std::fs::read(lab.state_dir().join("kernel-state.json")).unwrap())
            .unwrap();
    lab.kill_daemon();

    // Down: the kernel still redirects to the daemon's address, where nothing listens.
    let p = run(&lab, &["tcp", &lab.api().to_string()]);
    assert!(!p.ok());
    assert_eq!(p.errno(), Some(ECONNREFUSED), "{}", p.json);
    let down_pid = p.pid();
    assert_standin_untouched(&lab);

    let (ready, outcomes) = restart_while_an_agent_retries(&lab);
    assert_eq!(ready["mode"], "adopted", "{ready}");
    // Same kernel programs and links as before the restart: adopted, not reloaded.
    assert_eq!(ready["programs"], before["programs"]);
    // Every attempt either failed closed or reached the daemon; none reached the API.
    for (ok, errno) in &outcomes {
        assert!(*ok || *errno == Some(ECONNREFUSED), "{outcomes:?}");
    }
    assert_standin_untouched(&lab);
    let p = run(&lab, &["tcp", &lab.api().to_string()]);
    assert_redirected(&lab, &p, lab.api());
    // The event of the attempt made while the daemon was down was kept in the pinned
    // ring buffer and delivered after the restart.
    event_for(&lab, "redirected", down_pid);
}

#[test]
fn outside_agent_cgroups_nothing_changes() {
    let lab = lab("bystander");
    let p = lab.bystander(&["tcp", &lab.api().to_string()]).unwrap();
    assert!(p.ok(), "{}", p.json);
    assert_eq!(p.json["peer"], lab.api().to_string());
    let standin = wait_for(5, || {
        lab.standin_log()
            .into_iter()
            .find(|e| e["event"] == "accept")
    });
    assert!(
        standin.is_some(),
        "the bystander did not reach the API server directly"
    );
    let udp = lab.bystander(&["udp", &lab.api().to_string()]).unwrap();
    assert!(udp.ok(), "{}", udp.json);
    assert!(
        lab.kernel_events()
            .iter()
            .all(|e| e["origin"]["pid"].as_u64() != p.pid())
    );
}

#[test]
fn unenroll_restores_and_reenroll_enforces() {
    let lab = lab("unenroll");
    let cg = lab.agent_cg.to_str().unwrap().to_string();
    lab.portcullis(&["unenroll", &cg]).unwrap();
    let p = run(&lab, &["tcp", &lab.api().to_string()]);
    assert!(p.ok());
    wait_for(5, || {
        lab.standin_log()
            .into_iter()
            .find(|e| e["event"] == "accept")
    })
    .expect("unenrolled agent reaches the API server directly");
    lab.portcullis(&["enroll", &cg]).unwrap();
    let p = run(&lab, &["tcp", &lab.api().to_string()]);
    assert_redirected(&lab, &p, lab.api());
}

#[test]
fn egress_backstop_drops_a_socket_opened_before_enrollment() {
    let lab = lab("backstop");
    let cg = lab.agent_cg.to_str().unwrap().to_string();
    lab.portcullis(&["unenroll", &cg]).unwrap();
    // Connected directly while not enrolled (a socket from before enforcement began).
    let (mut child, mut stdin, mut out, first) = lab.hold(&lab.agent_cg, lab.api()).unwrap();
    assert_eq!(first["ok"], true, "{first}");
    wait_for(5, || {
        lab.standin_log()
            .into_iter()
            .find(|e| e["event"] == "accept")
    })
    .expect("direct connection");
    lab.portcullis(&["enroll", &cg]).unwrap();
    Lab::write_stdin(&mut stdin, "send").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let ev = event_for(&lab, "egress_dropped", None);
    assert_eq!(ev["dst"], lab.api().to_string());
    std::thread::sleep(Duration::from_millis(500));
    let data: Vec<Value> = lab
        .standin_log()
        .into_iter()
        .filter(|e| e["event"] == "data")
        .collect();
    assert!(
        data.is_empty(),
        "data reached the API server after enrollment: {data:?}"
    );
    let _ = Lab::write_stdin(&mut stdin, "quit");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn cli_refuses_bad_config_naming_field_and_value() {
    let dir = std::env::temp_dir().join(format!("pc-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.yaml");
    std::fs::write(
        &cfg,
        "listen: { ipv4: \"10.0.0.1:15443\" }\nkernel:\n  attach_cgroup: /sys/fs/cgroup\n  protected_endpoints: [\"10.96.0.1\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(portcullis_tests::bin("portcullis"))
        .args(["status", "--config"])
        .arg(&cfg)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel.protected_endpoints[0]") && err.contains("`10.96.0.1`"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The stand-in API server accepted a connection from the agent network on `listen`.
fn standin_accepted(lab: &Lab, listen: SocketAddr, from_pid_probe: &Probe) -> bool {
    let local = from_pid_probe.json["local"]
        .as_str()
        .unwrap_or("")
        .to_string();
    wait_for(5, || {
        lab.standin_log().into_iter().find(|e| {
            e["event"] == "accept" && e["listen"] == listen.to_string() && e["peer"] == local
        })
    })
    .is_some()
}

#[test]
fn protect_and_unprotect_at_run_time() {
    let lab = lab("protect");
    let alt = lab.api_alt().to_string();
    // Not protected by the config: the agent reaches it directly.
    let p = run(&lab, &["tcp", &alt]);
    assert!(p.ok(), "{}", p.json);
    assert!(
        standin_accepted(&lab, lab.api_alt(), &p),
        "direct connection to {alt}"
    );

    lab.portcullis(&["protect", &alt]).unwrap();
    let status = lab.portcullis(&["status"]).unwrap();
    assert!(
        status.contains(&alt),
        "status does not list {alt}: {status}"
    );
    let p = run(&lab, &["tcp", &alt]);
    assert_redirected(&lab, &p, lab.api_alt());

    lab.portcullis(&["unprotect", &alt]).unwrap();
    let status = lab.portcullis(&["status"]).unwrap();
    assert!(!status.contains(&alt), "status still lists {alt}: {status}");
    let p = run(&lab, &["tcp", &alt]);
    assert!(p.ok(), "{}", p.json);
    assert!(
        standin_accepted(&lab, lab.api_alt(), &p),
        "direct again after unprotect"
    );

    // The CLI writes the pinned maps: it works while the daemon is down, and the
    // restarted daemon keeps what was set.
    lab.kill_daemon();
    lab.portcullis(&["protect", &alt]).unwrap();
    let ready = lab.start_daemon().unwrap();
    assert_eq!(ready["mode"], "adopted");
    let p = run(&lab, &["tcp", &alt]);
    assert_redirected(&lab, &p, lab.api_alt());
}

#[test]
fn a_new_object_replaces_the_pinned_programs_without_gap() {
    let lab = lab("replace");
    let state_path = lab.state_dir().join("kernel-state.json");
    let before: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    lab.kill_daemon();
    // Pretend the pinned programs came from another build.
    let mut other = before.clone();
    other["object_sha256"] = Value::from("0".repeat(64));
    std::fs::write(&state_path, serde_json::to_vec(&other).unwrap()).unwrap();

    let (ready, outcomes) = restart_while_an_agent_retries(&lab);
    assert_eq!(ready["mode"], "replaced", "{ready}");
    for (ok, errno) in &outcomes {
        assert!(*ok || *errno == Some(ECONNREFUSED), "{outcomes:?}");
    }
    assert_standin_untouched(&lab);
    // New programs are in place and the old ones are gone from the kernel.
    let old_ids: Vec<u64> = before["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap())
        .collect();
    let new_ids: Vec<u64> = ready["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap())
        .collect();
    assert!(
        new_ids.iter().all(|id| !old_ids.contains(id)),
        "{old_ids:?} {new_ids:?}"
    );
    let loaded: Vec<u64> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id() as u64)
        .collect();
    let lingering: Vec<&u64> = old_ids.iter().filter(|id| loaded.contains(id)).collect();
    assert!(
        lingering.is_empty(),
        "old programs still loaded: {lingering:?}"
    );
    let p = run(&lab, &["tcp", &lab.api().to_string()]);
    assert_redirected(&lab, &p, lab.api());
}

#[test]
fn doctor_passes_and_names_the_packet_guard() {
    let lab = lab("doctor");
    let (ok, out) = lab.portcullis_status(&["doctor"]).unwrap();
    eprintln!("{out}");
    assert!(ok, "doctor failed:\n{out}");
    assert!(out.contains("[ok  ] bpffs"), "{out}");
    assert!(out.contains("[ok  ] attach cgroup"), "{out}");
    assert!(out.contains("packet guard"), "{out}");
    assert!(out.contains("all required prerequisites met"), "{out}");
}

#[test]
fn a_lab_leaves_nothing_behind() {
    let (ns, cg, bpffs) = {
        let lab = lab("cleanup");
        let p = run(&lab, &["tcp", &lab.api().to_string()]);
        assert!(p.ok());
        (
            [
                lab.ns_node().to_string(),
                lab.ns_agent().to_string(),
                lab.ns_api().to_string(),
            ],
            lab.cg_root.clone(),
            lab.bpffs_dir.clone(),
        )
    };
    let netns = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for n in &ns {
        assert!(
            !netns
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n)),
            "netns {n} left: {netns}"
        );
    }
    assert!(!cg.exists(), "cgroup {} left", cg.display());
    assert!(!bpffs.exists(), "pins {} left", bpffs.display());
}

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
/// is reported as not enforced, not shown as enforced.
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
    let e = wait_for(5, || {
        let e = effect(&lab);
        e["uncovered"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["cgroup_id"].as_u64() == Some(id)))
            .then_some(e)
    })
    .unwrap_or_else(|| panic!("removed cgroup not reported: {}", effect(&lab)));
    assert_eq!(e["ok"], false, "{e}");
    let status = lab.portcullis(&["status"]).unwrap();
    assert!(
        status.contains("NOT ENFORCED") && status.contains(&id.to_string()),
        "{status}"
    );
    let (ok, doctor) = lab.portcullis_status(&["doctor"]).unwrap();
    assert!(
        !ok && doctor.contains("[FAIL] programs in effect"),
        "{doctor}"
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
