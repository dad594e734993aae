//! "Where was this accepted connection going, and who opened it?" — the lookup the
//! proxy layer asks for each accepted socket. The answer comes from the kernel's record,
//! never from anything the agent sends.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use serde::Serialize;

use super::{KernelError, PinnedMaps, events::OriginView};

/// The original destination of a redirected connection and the kernel-observed origin.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnOrigin {
    /// What the agent connected to (e.g. the API Service ClusterIP:443).
    pub original_dst: SocketAddr,
    pub origin: OriginView,
    pub socket_cookie: u64,
}

/// Swappable so the proxy can be tested without a kernel.
pub trait OriginLookup: Send + Sync {
    /// `peer` is the accepted socket's remote address. `Ok(None)`: no kernel record,
    /// i.e. the connection was not redirected from an agent.
    fn lookup(&self, peer: SocketAddr) -> Result<Option<ConnOrigin>, KernelError>;
}

/// The kernel implementation: the pinned `PC_CONN_BY_CLIENT` map.
pub struct BpfOriginLookup {
    maps: Arc<Mutex<PinnedMaps>>,
}

impl BpfOriginLookup {
    pub fn new(maps: Arc<Mutex<PinnedMaps>>) -> Self {
        BpfOriginLookup { maps }
    }
}

impl OriginLookup for BpfOriginLookup {
    fn lookup(&self, peer: SocketAddr) -> Result<Option<ConnOrigin>, KernelError> {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        Ok(maps.take_conn(peer)?.map(|rec| ConnOrigin {
            original_dst: rec.original_dst.socket_addr(),
            origin: (&rec.origin).into(),
            socket_cookie: rec.socket_cookie,
        }))
    }
}
