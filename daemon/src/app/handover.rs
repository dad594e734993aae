//! Rolling upgrades without a gap: the next daemon on a node (the DaemonSet's surge
//! pod) binds the same listen addresses first (SO_REUSEPORT), then asks the running
//! daemon, over `state_dir/handover.sock`, to let go. The old daemon closes its
//! listeners by exiting; connections still waiting in its accept queue move to the
//! new listener (`net.ipv4.tcp_migrate_req`, set by node setup), and new connections
//! queue in the new listener's backlog while the new daemon opens the audit log and
//! the approvals store the old one held. The kernel programs and pins never change
//! hands, so there is no instant an agent could reach the API server directly; the
//! cost is connections the old daemon was serving at that moment (clients reconnect).
//!
//! A container of the old pod that the kubelet restarts afterwards finds its pod in
//! `handed-over/` and stays idle (not ready) until its pod is deleted, instead of
//! taking the node back.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tracing::{info, warn};

const ASK: &str = "HANDOVER";
const DONE: &str = "RELEASED";

pub struct Paths {
    pub socket: PathBuf,
    pub ready: PathBuf,
    pub marks: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Self {
        Paths {
            socket: state_dir.join("handover.sock"),
            ready: state_dir.join("ready"),
            marks: state_dir.join("handed-over"),
        }
    }
}

/// This daemon's pod (the DaemonSet passes POD_UID), if it runs in one.
pub fn pod_uid() -> Option<String> {
    std::env::var("POD_UID").ok().filter(|u| !u.is_empty())
}

/// Did this pod already hand the node over (a restarted container of an old pod)?
pub fn handed_over(p: &Paths) -> bool {
    pod_uid().is_some_and(|u| p.marks.join(u).exists())
}

fn live_daemon(ready: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(ready).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pid = u32::try_from(v["pid"].as_u64()?).ok()?;
    (pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Asks a running daemon on this state directory to let go, and waits (bounded)
/// until its process is gone. Returns whether there was one.
pub async fn take_over(p: &Paths) -> bool {
    let Some(pid) = live_daemon(&p.ready) else {
        return false;
    };
    info!(
        pid,
        "another daemon serves this node: asking it to hand over"
    );
    let asked = async {
        let mut s = UnixStream::connect(&p.socket).await?;
        s.write_all(format!("{ASK} {}\n", pod_uid().unwrap_or_default()).as_bytes())
            .await?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line.trim() == DONE)
    };
    match tokio::time::timeout(Duration::from_secs(10), asked).await {
        Ok(Ok(true)) => {}
        other => warn!(
            pid,
            ?other,
            "the running daemon did not confirm the hand-over"
        ),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!(pid, "hand-over done");
    true
}

/// Serves hand-over requests: on the first, marks this pod as handed over, answers,
/// and tells the daemon to stop (`stop`).
pub async fn serve(p: Paths, stop: mpsc::Sender<()>) {
    let _ = std::fs::remove_file(&p.socket);
    let l = match UnixListener::bind(&p.socket) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, socket = %p.socket.display(), "hand-over socket unavailable: upgrades will wait for this daemon to stop");
            return;
        }
    };
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
        if !matches!(read, Ok(Ok(_))) || !line.starts_with(ASK) {
            continue;
        }
        info!(successor = %line.trim().trim_start_matches(ASK).trim(), "handing this node over");
        if let Some(uid) = pod_uid() {
            let _ = std::fs::create_dir_all(&p.marks);
            let _ = std::fs::write(p.marks.join(uid), b"");
        }
        let _ = std::fs::remove_file(&p.ready);
        let mut s = r.into_inner();
        let _ = s.write_all(format!("{DONE}\n").as_bytes()).await;
        let _ = stop.send(()).await;
        return;
    }
}
