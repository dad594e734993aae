//! The listener for redirected agent connections. Each connection is accepted, its
//! kernel origin looked up and recorded, then handed to the gate on one of the agents'
//! event loops (`loops`), which owns it from then on; without a gate (no `proxy`
//! section) it is closed, so the agent fails closed.
use std::{net::SocketAddr, sync::Arc};

use serde::Serialize;
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{info, warn};

use super::Gate;
use crate::{
    kernel::{ConnOrigin, OriginLookup},
    loops::EventLoops,
    util,
};

/// One accepted connection, as written to `connections.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub time: String,
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    /// `None` when the kernel has no record: the connection was not redirected from an
    /// agent (someone dialled the daemon's address directly).
    pub kernel: Option<ConnOrigin>,
}

pub async fn serve(
    listener: TcpListener,
    lookup: Arc<dyn OriginLookup>,
    tx: mpsc::Sender<Accepted>,
    gate: Option<(Arc<Gate>, Arc<EventLoops>)>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    loop {
        let (stream, peer) = util::next_connection("agents", || listener.accept()).await;
        let kernel = match lookup.lookup(peer) {
            Ok(k) => k,
            Err(e) => {
                warn!(%peer, error = %e, "origin lookup failed");
                None
            }
        };
        match &kernel {
            Some(k) => info!(
                %peer,
                original_dst = %k.original_dst,
                pid = k.origin.pid,
                comm = %k.origin.comm,
                cgroup_id = k.origin.cgroup_id,
                "accepted redirected agent connection"
            ),
            None => warn!(%peer, "accepted a connection the kernel did not redirect"),
        }
        let rec = Accepted {
            time: crate::util::rfc3339_micros(std::time::SystemTime::now()),
            listen: local,
            peer,
            kernel: kernel.clone(),
        };
        match &gate {
            // The socket leaves this runtime's reactor and joins the loop's.
            Some((g, loops)) => match stream.into_std() {
                Ok(stream) => {
                    let g = g.clone();
                    loops.spawn(move || async move {
                        match tokio::net::TcpStream::from_std(stream) {
                            Ok(stream) => g.serve(stream, peer, kernel).await,
                            Err(e) => warn!(%peer, error = %e, "an accepted connection could not join its event loop"),
                        }
                    });
                }
                Err(e) => {
                    warn!(%peer, error = %e, "an accepted connection could not leave the listener's runtime")
                }
            },
            None => drop(stream),
        }
        if tx.send(rec).await.is_err() {
            return Ok(());
        }
    }
}
