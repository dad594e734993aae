//! The chain's building blocks: record kinds, lines (each carrying the SHA-256 of the
//! previous line), signed segment heads, the file names of a segment, and the
//! daemon's audit key.
use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
};

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit key {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("encoding an audit record: {0}")]
    Encode(#[from] serde_json::Error),
    /// The directory is at `audit.max_disk_bytes` and nothing more may be deleted.
    #[error(
        "the audit directory reached its disk budget (audit.max_disk_bytes = {budget} bytes, {used} used); \
         segments are deleted only after the audit sink acknowledged them (acknowledged through seq {acknowledged}, \
         the oldest segment ends at seq {oldest_last_seq}): wait for the sink, or archive and remove segments"
    )]
    DiskBudget {
        budget: u64,
        used: u64,
        acknowledged: u64,
        oldest_last_seq: u64,
    },
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a chained record is (the `kind` of its line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A request to the gate: who, what, the decision.
    Request,
    /// The outcome of a `request` (same `id`).
    Response,
    /// A redirect or a blocked bypass attempt from the kernel.
    KernelEvent,
    /// A state change of an approval or grant.
    Approval,
    /// A writer signed records a crashed predecessor left unsigned.
    Recovery,
    /// Segments the sink had acknowledged were deleted to stay within the disk budget;
    /// vouches for where the remaining chain begins.
    Prune,
    /// A writer found the log damaged (cut, edited, a head missing or forged) when it
    /// opened it, or its anchors vouched for records the log no longer holds.
    Damage,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Response => "response",
            Kind::KernelEvent => "kernel-event",
            Kind::Approval => "approval",
            Kind::Recovery => "recovery",
            Kind::Prune => "prune",
            Kind::Damage => "damage",
        }
    }
}

/// A record already encoded as JSON, which a line carries verbatim. Encoded where it is
/// made, into a buffer sized for an ordinary record, so neither growing it nor copying
/// it again costs anything.
pub struct Encoded(Vec<u8>);

/// A record that writes its own JSON: the bytes serde_json writes for it (a test holds
/// each one to that), without serde's per-key escaping — for the records every request
/// makes.
pub trait EncodeJson {
    fn encode_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error>;
}

/// A JSON document as a record, as serde_json writes it (records made in tests and
/// tools; the gate's own records write theirs directly).
impl EncodeJson for serde_json::Value {
    fn encode_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        serde_json::to_writer(out, self)
    }
}

impl Encoded {
    /// Room for a typical request record (a response record is smaller).
    const AHEAD: usize = 1024;

    /// Encoded by serde_json.
    pub fn new<T: ?Sized + Serialize>(record: &T) -> Result<Encoded, serde_json::Error> {
        let mut v = Vec::with_capacity(Self::AHEAD);
        serde_json::to_writer(&mut v, record)?;
        Ok(Encoded(v))
    }

    /// Encoded by the record itself.
    pub fn own<T: ?Sized + EncodeJson>(record: &T) -> Result<Encoded, serde_json::Error> {
        Self::own_in(Vec::with_capacity(Self::AHEAD), record)
    }

    /// [`Self::own`] into `buf` (emptied first): a buffer a written record gave back.
    pub fn own_in<T: ?Sized + EncodeJson>(
        mut buf: Vec<u8>,
        record: &T,
    ) -> Result<Encoded, serde_json::Error> {
        buf.clear();
        record.encode_json(&mut buf)?;
        Ok(Encoded(buf))
    }

    /// A buffer for [`Self::own_in`], when none is given back.
    pub fn buffer() -> Vec<u8> {
        Vec::with_capacity(Self::AHEAD)
    }

    /// The buffer, for another record once this one is written.
    pub fn into_buffer(self) -> Vec<u8> {
        self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Writes a chain line, `{"seq":N,"prev":"…","time":T,"kind":"…","record":…}` (without
/// its newline), to `out`: the record through `record`, which writes one JSON value.
/// The same bytes serde_json writes for the struct of those fields in that order (a
/// test holds it to that), without encoding the record a second time.
pub(super) fn write_line(
    out: &mut Vec<u8>,
    seq: u64,
    prev: &str,
    time: u64,
    kind: Kind,
    record: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.extend_from_slice(b",\"prev\":");
    json_str(out, prev);
    out.extend_from_slice(b",\"time\":");
    out.extend_from_slice(itoa::Buffer::new().format(time).as_bytes());
    out.extend_from_slice(b",\"kind\":\"");
    out.extend_from_slice(kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"record\":");
    record(out)?;
    out.push(b'}');
    Ok(())
}

/// Writes `s` as a JSON string, as serde_json writes it: a string with nothing to
/// escape (no control character, quote or backslash: nearly every one a record holds)
/// is copied whole after a check sixteen bytes at a time; any other goes through
/// serde_json.
#[inline]
pub(super) fn json_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing into a Vec cannot fail, and a str is always valid to serde_json.
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Whether serde_json would escape any byte of `s` (below 0x20, a quote or a backslash):
/// sixteen bytes at a time (the compiler checks a block at once), the last block
/// overlapping the one before it rather than a tail byte by byte.
#[inline]
fn needs_escape(s: &[u8]) -> bool {
    fn esc(b: u8) -> bool {
        (b < 0x20) | (b == b'"') | (b == b'\\')
    }
    fn block(b: &[u8; 16]) -> bool {
        b.iter().fold(false, |hit, &x| hit | esc(x))
    }
    if s.len() < 16 {
        // Most strings a record holds (verbs, ids, names) are this short: one block,
        // padded with a byte that needs no escape, instead of a byte-by-byte loop
        // (~5 instructions a byte, callgrind).
        let mut padded = [b'a'; 16];
        padded[..s.len()].copy_from_slice(s);
        return block(&padded);
    }
    let mut blocks = s.as_chunks::<16>().0.iter();
    if blocks.any(block) {
        return true;
    }
    !s.len().is_multiple_of(16) && s.last_chunk::<16>().is_some_and(block)
}

/// Writes `,"key":` (or `{"key":` to open an object with it, `first`): one copy of a
/// literal; `key` is one of the records' own field names, which need no escaping.
macro_rules! json_key {
    (first $out:expr, $key:literal) => {
        $out.extend_from_slice(concat!("{\"", $key, "\":").as_bytes())
    };
    ($out:expr, $key:literal) => {
        $out.extend_from_slice(concat!(",\"", $key, "\":").as_bytes())
    };
}
pub(super) use json_key;

/// Writes an unsigned integer as serde_json does.
#[inline]
pub(super) fn json_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Writes a boolean as serde_json does.
#[inline]
pub(super) fn json_bool(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    pub segment: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The chain value the segment's first record continues from.
    pub chain_in: String,
    pub last_hash: String,
    /// ed25519 over the canonical JSON of the fields above, hex.
    #[serde(default)]
    pub sig: String,
}

impl Head {
    pub(super) fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Head {
            sig: String::new(),
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }
}

pub fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:06}.jsonl"))
}
pub fn head_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:06}.head.json"))
}

pub(super) fn hash_line(line: &[u8]) -> String {
    let mut s = String::with_capacity(64);
    hash_line_into(line, &mut s);
    s
}

/// [`hash_line`] into `out` (replacing what it held, in its buffer): the writer keeps
/// the chain value this way, without an allocation per line.
pub(super) fn hash_line_into(line: &[u8], out: &mut String) {
    // Two records per request go through here: `encode_to_slice` (a table) rather than
    // `hex::encode`, whose char iterator cost 40% as much as the digest in a profile.
    let mut hex = [0u8; 64];
    // A SHA-256 digest is 32 bytes: its hex fills the 64 exactly, this cannot fail.
    let _ = hex::encode_to_slice(Sha256::digest(line), &mut hex);
    out.clear();
    // Lowercase hex digits are ASCII, always valid UTF-8: copied whole, not a char at a
    // time (which cost ~450 instructions a line, callgrind).
    if let Ok(h) = std::str::from_utf8(&hex) {
        out.push_str(h);
    }
}

/// The daemon's audit signing key (PKCS#8, 0600), created on first use; the public key
/// is written beside it for verifiers.
pub fn load_or_create_key(path: &Path) -> Result<Ed25519KeyPair, AuditError> {
    use std::os::unix::fs::OpenOptionsExt;
    let key_err = |why: String| AuditError::Key {
        path: path.to_owned(),
        why,
    };
    let pkcs8 = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| key_err(e.to_string()))?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(path))?;
            f.write_all(doc.as_ref()).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
            doc.as_ref().to_vec()
        }
        Err(e) => return Err(io(path)(e)),
    };
    let kp = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| key_err(e.to_string()))?;
    let pub_path = path.with_extension("pub");
    std::fs::write(&pub_path, hex::encode(kp.public_key().as_ref())).map_err(io(&pub_path))?;
    Ok(kp)
}

pub fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_owned();
            n.strip_prefix("seg-")?.strip_suffix(".jsonl")?.parse().ok()
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_line_hash_is_the_lowercase_hex_sha256() {
        // FIPS 180-2's "abc" example.
        assert_eq!(
            super::hash_line(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(super::hash_line(b"").len(), 64);
        let mut kept = "something longer than a hash, to be replaced".repeat(3);
        super::hash_line_into(b"abc", &mut kept);
        assert_eq!(kept, super::hash_line(b"abc"));
    }

    /// The line as serde_json writes the struct of its fields: what `write_line` must
    /// give, byte for byte (verifiers hash the stored bytes; readers parse them).
    #[derive(serde::Serialize)]
    struct Line<'a, T: ?Sized + serde::Serialize> {
        seq: u64,
        prev: &'a str,
        time: u64,
        kind: super::Kind,
        record: &'a T,
    }

    /// The escape check itself, apart from what serde_json writes (a string wrongly
    /// said to need escapes would still come out right, through serde_json): no byte
    /// that needs none makes it say yes, and each one that does, at every position of
    /// strings up to 49 bytes (the short ones checked as one padded block), makes it.
    #[test]
    fn the_escape_check_says_yes_exactly_for_the_bytes_that_need_one() {
        let clean: Vec<u8> = (0x20u8..0x7f)
            .filter(|&b| b != b'"' && b != b'\\')
            .collect();
        for len in 0..50 {
            for fill in &clean {
                assert!(!super::needs_escape(&vec![*fill; len]), "{len} × {fill}");
            }
            let s: Vec<u8> = (0..len).map(|i| clean[i % clean.len()]).collect();
            assert!(!super::needs_escape(&s), "{len}");
            for at in 0..len {
                for bad in [0u8, 0x1f, b'"', b'\\'] {
                    let mut t = s.clone();
                    t[at] = bad;
                    assert!(super::needs_escape(&t), "{len} {at} {bad}");
                }
            }
        }
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        // Every ASCII byte and a few non-ASCII characters, at every place in strings of
        // every length up to three blocks and a tail.
        let mut chars: Vec<char> = (0u8..=127).map(char::from).collect();
        chars.extend(['é', '☃', '𝄞', '\u{80}', '\u{2028}']);
        for len in 0..50 {
            for at in 0..len.max(1) {
                for &c in &chars {
                    let s: String = (0..len).map(|i| if i == at { c } else { 'a' }).collect();
                    let mut got = b"kept".to_vec();
                    super::json_str(&mut got, &s);
                    assert_eq!(
                        String::from_utf8_lossy(&got[4..]),
                        serde_json::to_string(&s).unwrap(),
                        "{s:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_line_is_what_serde_json_writes_for_its_fields() {
        use super::{Encoded, GENESIS, Kind, write_line};
        let records = [
            serde_json::json!({"id": "req-1", "path": "/api/v1/namespaces/a/configmaps/b", "n": 7}),
            serde_json::json!({"odd": "quote \" backslash \\ newline \n tab \t nul \u{0} é ☃"}),
            serde_json::json!([1, 2.5, null, true, {"x": []}]),
            serde_json::json!("just a string"),
        ];
        let kinds = [
            Kind::Request,
            Kind::Response,
            Kind::KernelEvent,
            Kind::Approval,
            Kind::Recovery,
            Kind::Prune,
            Kind::Damage,
        ];
        let prev = super::hash_line(b"previous");
        for (i, rec) in records.iter().enumerate() {
            for (k, kind) in kinds.into_iter().enumerate() {
                for (seq, prev, time) in [
                    (1, GENESIS, 0),
                    (u64::MAX, prev.as_str(), 1_795_000_000 + i as u64),
                    (k as u64 * 1000 + 9, "odd \"prev\"", u64::MAX),
                ] {
                    let want = serde_json::to_vec(&Line {
                        seq,
                        prev,
                        time,
                        kind,
                        record: rec,
                    })
                    .unwrap();
                    let enc = Encoded::new(rec).unwrap();
                    let mut got = b"kept".to_vec();
                    write_line(&mut got, seq, prev, time, kind, |out| {
                        out.extend_from_slice(enc.as_bytes());
                        Ok(())
                    })
                    .unwrap();
                    assert_eq!(&got[..4], b"kept", "what was in the buffer stays");
                    assert_eq!(
                        String::from_utf8_lossy(&got[4..]),
                        String::from_utf8_lossy(&want)
                    );
                }
            }
        }
    }
}
