//! Masking of everything the API server sends an agent, before the agent sees it.
//!
//! JSON bodies are rewritten by a streaming scanner ([`JsonMasker`]) fed chunk by chunk,
//! so a watch stream is masked event by event and a large list without holding it whole:
//! memory is the current string plus the container stack, whatever the body size.
//! Numbers, keys and structure pass through byte for byte; string values are rewritten
//! when
//! - a path rule covers them (built in: Secret `data` and `stringData`; configurable per
//!   resource), anchored at every place an object appears in a response (the document,
//!   `items[*]` of a list, a watch event's `object`, a Table row's `object`, a watched
//!   Table's rows), replaced by a placeholder that keeps the document valid (valid
//!   base64 where the field is base64);
//! - they are the `kubectl.kubernetes.io/last-applied-configuration` annotation, which
//!   holds a whole applied object: it is parsed and masked with the same rules;
//! - their key names a credential (`password`, `clientSecret`, `token`, ...) or they are
//!   the `value` beside such a `name` (container env), or
//! - a pattern detector finds a credential inside them (PEM private keys, JWTs, cloud
//!   access keys, `password=`/`token:` pairs, card numbers passing the Luhn check).
//!
//! Text bodies (pod logs, `logs -f`) are masked line by line by [`TextMasker`], with a
//! PEM private key spanning lines removed whole.
//!
//! Placeholders never contain or derive from the value, unless a fingerprint key is
//! configured: then they carry a keyed HMAC-SHA256 fingerprint (8 bytes), so equal
//! values can be recognised without being revealed.
mod context;
mod detectors;
mod json;
mod media;
mod names;
mod paths;
mod plan;
mod query;
mod request;
mod search;
#[cfg(test)]
mod testgen;
#[cfg(test)]
mod tests;
mod text;
mod websocket;

pub use detectors::{Detectors, luhn};
pub use json::JsonMasker;
pub use media::{BodyMasker, ForResponse, Unmaskable, json_accept};
pub use names::{is_credential_flag, is_credential_name};
pub use paths::Path;
pub use plan::{MaskConfigError, Masking, Plan, ResourceRule};
pub use request::{Undecodable, decode, find_placeholder, masked_record};
pub use text::TextMasker;
pub use websocket::{MAX_MESSAGE, WsCodec, WsContent, WsMasker, read_messages, server_frame};

pub use crate::config::Encoding;

/// The placeholder text; base64-encoded where the field is base64.
pub const PLACEHOLDER: &str = "portcullis-masked";
/// [`PLACEHOLDER`] as a JSON string, and its base64 (Secret `data`) as one.
pub(crate) const PLACEHOLDER_JSON: &str = "\"portcullis-masked\"";
pub(crate) const PLACEHOLDER_B64_JSON: &str = "\"cG9ydGN1bGxpcy1tYXNrZWQ=\"";
/// The annotation `kubectl apply` stores the whole applied object in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Deepest JSON nesting accepted; the API server's own decoder stops well before this.
pub(crate) const MAX_DEPTH: usize = 512;
/// Longest string value held while deciding how to mask it.
pub(crate) const MAX_STRING: usize = 64 << 20;
/// Longest log line held before it is masked and passed on without its end.
pub(crate) const MAX_LINE: usize = 256 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaskError {
    #[error("response body is not valid JSON at byte {offset}: {why}")]
    Syntax { offset: u64, why: &'static str },
    #[error("response body nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("a string in the response body is longer than {MAX_STRING} bytes")]
    TooLong,
    #[error("path rule {rule:?}: {why}")]
    Rule { rule: String, why: &'static str },
    #[error("the WebSocket stream cannot be masked: {0}")]
    WebSocket(&'static str),
}

/// [`PLACEHOLDER`] in base64 (what Secret `data` values become).
#[cfg(test)]
const B64_PLACEHOLDER: &str = "cG9ydGN1bGxpcy1tYXNrZWQ=";
