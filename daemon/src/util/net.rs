//! Accepting connections: one loop body for every listener the daemon has (agents,
//! the admin socket, admin HTTPS).
use std::{future::Future, time::Duration};

use tracing::warn;

/// The next connection from `accept`. A failed accept (EMFILE and friends) is logged
/// and retried after a pause, so the connections already open keep being served.
pub async fn next_connection<T, F, Fut>(what: &str, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(c) => return c,
            Err(e) => {
                warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A TCP listener with SO_REUSEPORT: during a rolling upgrade the next daemon binds
/// the same address while this one still serves, and the kernel hands connections
/// that waited in a closing listener's queue to the other (`net.ipv4.tcp_migrate_req`).
pub fn reuseport_listener(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
