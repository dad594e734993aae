//! The fuzz targets' bodies (`fuzz/fuzz_targets/<target>.rs` calls [`run`]), here so
//! that the committed seed corpus (`fuzz/corpus/<target>/`) also runs as ordinary
//! unit tests on stable (`fuzzing::tests`), and so the targets reach the private
//! parsers without widening the crate's API.
//!
//! Every target takes any bytes and must never panic; beyond that each asserts what
//! its parser promises (a failed assertion is a crash to libFuzzer):
//! - `request_info`: method, path and query resolved to RequestInfo, field selectors,
//!   the audit's query masking; resolving is deterministic and round-trips.
//! - `json_mask`: the streaming JSON masker gives the same output (or error) in any
//!   chunking as whole; a Secret's value never survives, in a document, a list or a
//!   watch stream; a valid document stays valid JSON.
//! - `text_mask`: log masking gives the same output in any chunking; a credential
//!   line never survives.
//! - `body_decode`: request bodies (JSON, YAML, CBOR, protobuf, patches) decoded for
//!   audit and write-back checks; a decoded body holding a placeholder is caught.
//! - `protobuf`: the Kubernetes protobuf envelope and objects to JSON.
//! - `websocket`: the WebSocket frame masker, every codec: same output in any
//!   chunking, and what it sends is well-formed frames.
//! - `config`: the YAML config parsed and validated, `${VAR}` expansion, masking rules.
//! - `audit_verify`: a signed audit log, edited by the input; `verify` never calls an
//!   edited segment intact.
//! - `jwt`: a bearer token (and optionally the issuer's JWKS document) through the
//!   real authenticator; an accepted token with one signature byte changed is refused.
//! - `policy_document`, `cel_condition`: see [`crate::policy::fuzz`].
mod audit;
mod config;
mod identity;
mod k8s;
mod mask;
#[cfg(test)]
mod tests;

/// Every target, by the name of its directory under `fuzz/corpus/`.
pub const TARGETS: &[&str] = &[
    "policy_document",
    "cel_condition",
    "request_info",
    "json_mask",
    "text_mask",
    "body_decode",
    "protobuf",
    "websocket",
    "config",
    "audit_verify",
    "jwt",
];

/// Runs `target` on `data`; false for a target that does not exist.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "policy_document" => crate::policy::fuzz::document(data),
        "cel_condition" => crate::policy::fuzz::condition(data),
        "request_info" => k8s::request_info(data),
        "json_mask" => mask::json(data),
        "text_mask" => mask::text(data),
        "body_decode" => mask::body(data),
        "protobuf" => k8s::protobuf(data),
        "websocket" => mask::websocket(data),
        "config" => config::config(data),
        "audit_verify" => audit::verify(data),
        "jwt" => identity::jwt(data),
        _ => return false,
    }
    true
}

/// Chunk lengths for a body of `len` bytes, drawn from `seed` (xorshift): mostly
/// small, so split tokens, escapes and UTF-8 sequences are common.
fn chunking(seed: u64, len: usize) -> Vec<usize> {
    let mut s = seed | 1;
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let n = match s % 4 {
            0 => 1,
            1 => (s >> 8) as usize % 4 + 1,
            2 => (s >> 8) as usize % 17 + 1,
            _ => (s >> 8) as usize % 257 + 1,
        }
        .min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// The first `n` bytes of `data` as a seed, and the rest.
fn split_seed(data: &[u8], n: usize) -> (u64, &[u8]) {
    let n = n.min(data.len());
    let seed = data[..n]
        .iter()
        .fold(0u64, |a, b| a.wrapping_mul(257).wrapping_add(u64::from(*b)));
    (seed, &data[n..])
}
