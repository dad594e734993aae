//! Plumbing every layer shares and that knows nothing of Portcullis: the body type
//! that crosses the proxy, error chains, clocks and timestamps, media types, random
//! identifiers, append-only JSON-lines files, the accept loop's retry, text made safe
//! to show a human.
mod body;
mod display;
mod error;
mod jsonl;
mod media;
mod net;
mod time;

pub use body::{BoxError, ProxyBody, empty, full};
pub use display::{escape_json, escape_text, slack_code};
pub use error::source_chain;
pub use jsonl::JsonlWriter;
pub use media::{is_json, media_type};
pub use net::{next_connection, reuseport_listener};
pub use time::{rfc3339_micros, rfc3339_nanos, unix_nanos, unix_secs};

/// `prefix-` and 16 random hex digits (8 bytes): identifiers, not secrets. If the
/// system's random source fails the clock stands in: unique enough.
pub fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        b = unix_nanos().to_be_bytes();
    }
    format!("{prefix}-{}", hex::encode(b))
}
