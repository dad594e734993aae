//! The server side of a TLS handshake, bounded in time: a slow or silent client must
//! not hold a task forever. The leaf is minted for what the client asked for (its
//! SNI) and the address it dialled.
use std::{net::IpAddr, time::Duration};

use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};

use super::{CaError, LeafMinter};

/// A connection past its TLS handshake.
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    /// The server name the client asked for.
    pub sni: Option<String>,
    /// The client and the server agreed on HTTP/2 (ALPN `h2`).
    pub h2: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("reading the TLS client hello: {0}")]
    Hello(#[source] std::io::Error),
    #[error(transparent)]
    Leaf(#[from] CaError),
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
}

/// Completes the handshake on `stream` within `timeout`, serving a leaf for the SNI
/// and `dialled` (the address the client connected to).
pub async fn accept(
    minter: &LeafMinter,
    stream: TcpStream,
    dialled: Option<IpAddr>,
    timeout: Duration,
) -> Result<Accepted, AcceptError> {
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
            .await
            .map_err(AcceptError::Hello)?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        let cfg = minter.server_config(sni.as_deref(), dialled)?;
        let stream = start
            .into_stream(cfg)
            .await
            .map_err(AcceptError::Handshake)?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(Accepted { stream, sni, h2 })
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| AcceptError::Timeout(timeout))?
}
