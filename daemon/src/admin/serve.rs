//! The admin API's listeners: the node socket (mode 0600 in the 0700 state
//! directory, each peer's uid checked) and HTTPS for remote approvers (a leaf from the
//! interception CA).
use std::{
    convert::Infallible, os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration,
};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tracing::{debug, info, warn};

use super::{Admin, Caller};
use crate::{kernel, tls, tls::LeafMinter, util};

/// How long a caller has to finish TLS, and then its request head.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves the node socket: mode 0600 in the 0700 state directory, and each peer's uid
/// checked (root or the daemon's own user).
pub async fn serve_unix(admin: Arc<Admin>, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "admin API listening");
    let me = kernel::effective_uid();
    loop {
        let (stream, _) = util::next_connection("admin socket", || listener.accept()).await;
        let uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                warn!(error = %e, "admin peer credentials unavailable; refused");
                continue;
            }
        };
        if uid != 0 && uid != me {
            warn!(uid, "admin socket: refused a non-root caller");
            continue;
        }
        tokio::spawn(serve_connection(
            admin.clone(),
            stream,
            Caller::Local { uid },
        ));
    }
}

/// Serves remote approvers over HTTPS, with a leaf from the interception CA.
pub async fn serve_https(admin: Arc<Admin>, listener: TcpListener, minter: Arc<LeafMinter>) {
    loop {
        let (stream, peer) = util::next_connection("admin HTTPS", || listener.accept()).await;
        let (admin, minter) = (admin.clone(), minter.clone());
        // The leaf names the address dialled too (approvers may use an IP).
        let local_ip = stream.local_addr().ok().map(|a| a.ip());
        tokio::spawn(async move {
            match tls::accept(&minter, stream, local_ip, HANDSHAKE).await {
                Ok(a) => serve_connection(admin, a.stream, Caller::Remote { peer }).await,
                Err(e) => debug!(%peer, error = %e, "admin TLS handshake failed"),
            }
        });
    }
}

/// HTTP/1.1 on one accepted connection, each request answered for `caller`.
async fn serve_connection<S>(admin: Arc<Admin>, stream: S, caller: Caller)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let (admin, caller) = (admin.clone(), caller.clone());
        async move { Ok::<_, Infallible>(admin.handle(caller, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE)
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        debug!(error = %e, "admin connection ended");
    }
}
