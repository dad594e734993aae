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
