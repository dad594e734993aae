//! What a writer finds when it opens a directory its predecessor wrote, checked before
//! it signs anything: the last segment against its signed head (signature, sequence,
//! every chain link, the hash the head vouches for) and against the head of the
//! segment before it. Records a crashed predecessor appended past its head that
//! continue the chain are a tail to sign late (a `recovery` record says so); anything
//! else — records cut or edited, a head missing, forged or swapped — is damage: the
//! writer leaves the damaged segment as it is, starts a new one, and says what it found
//! in a `damage` record, so `audit verify` keeps reporting it.
use std::path::Path;

use ring::signature::{ED25519, UnparsedPublicKey};

use super::chain::{AuditError, GENESIS, Head, hash_line, head_path, io, seg_path};

/// Where the chain continues from, and what the writer must do first.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// The segment to continue in (or after, if damaged).
    pub segment: u64,
    /// Its first record's seq and the chain value it continues from.
    pub first_seq: u64,
    pub chain_in: String,
    /// The last record to continue after: its seq and its line's hash.
    pub seq: u64,
    pub last_hash: String,
    /// Bytes of complete lines (a torn last line is cut to this).
    pub complete: u64,
    pub torn: u64,
    /// A well-formed tail past the signed head (from, to).
    pub tail: Option<(u64, u64)>,
    /// What is wrong; non-empty means: do not re-sign this segment.
    pub damage: Vec<String>,
}

fn verified_head(dir: &Path, n: u64, public_key: &[u8]) -> Result<Head, String> {
    let name = format!("seg-{n:06}.head.json");
    let bytes = std::fs::read(head_path(dir, n)).map_err(|_| format!("{name}: missing"))?;
    let h: Head = serde_json::from_slice(&bytes).map_err(|e| format!("{name}: unreadable: {e}"))?;
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    let ok = hex::decode(&h.sig)
        .ok()
        .is_some_and(|s| key.verify(&h.signed_bytes(), &s).is_ok());
    if !ok {
        return Err(format!("{name}: signature does not verify"));
    }
    if h.segment != n {
        return Err(format!("{name}: names segment {}", h.segment));
    }
    Ok(h)
}

/// Inspects segment `n` (the last) of `dir`; `prev` is the segment before it, if any.
pub(super) fn inspect(
    dir: &Path,
    n: u64,
    prev: Option<u64>,
    public_key: &[u8],
) -> Result<Found, AuditError> {
    let p = seg_path(dir, n);
    let text = std::fs::read(&p).map_err(io(&p))?;
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut f = Found {
        segment: n,
        complete: complete as u64,
        torn: (text.len() - complete) as u64,
        ..Found::default()
    };
    let name = format!("seg-{n:06}");
    if text.is_empty() && !head_path(dir, n).exists() {
        // A segment created and not yet signed (a crash right after a rotation): it
        // continues its predecessor, and holds nothing to vouch for.
        f.first_seq = 1;
        f.chain_in = GENESIS.to_string();
        if let Some(pn) = prev {
            match verified_head(dir, pn, public_key) {
                Ok(ph) => {
                    f.first_seq = ph.last_seq.saturating_add(1);
                    f.chain_in = ph.last_hash;
                }
                Err(e) => f.damage.push(e),
            }
        }
        f.seq = f.first_seq.saturating_sub(1);
        f.last_hash = f.chain_in.clone();
        return Ok(f);
    }
    let head = verified_head(dir, n, public_key)
        .map_err(|e| f.damage.push(e))
        .ok();
    if let Some(pn) = prev {
        match verified_head(dir, pn, public_key) {
            Ok(ph) => {
                if let Some(h) = &head
                    && (h.chain_in != ph.last_hash || h.first_seq != ph.last_seq.saturating_add(1))
                {
                    f.damage.push(format!(
                        "{name}: does not continue seg-{pn:06} (starts at seq {} after {}): a segment was removed or replaced",
                        h.first_seq, ph.last_seq
                    ));
                }
            }
            Err(e) => f.damage.push(e),
        }
    }
    // Walk the records from where the head says the segment starts (or from the first
    // line, without a head).
    let mut expect_seq = head.as_ref().map(|h| h.first_seq);
    let mut chain = head.as_ref().map(|h| h.chain_in.clone());
    let mut seq = 0u64;
    let mut last = String::new();
    let mut first: Option<(u64, String)> = None;
    let mut at_head: Option<String> = None;
    let mut past_head = 0u64;
    for (ln, line) in text[..complete]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let at = format!("{name}.jsonl line {}", ln + 1);
        let v: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(_) => {
                f.damage.push(format!("{at}: not a JSON record"));
                last = hash_line(line);
                continue;
            }
        };
        let s = v["seq"].as_u64().unwrap_or(0);
        let prev_hash = v["prev"].as_str().unwrap_or("").to_owned();
        if first.is_none() {
            first = Some((s, prev_hash.clone()));
        }
        if let Some(e) = expect_seq
            && s != e
        {
            f.damage.push(format!(
                "{at}: seq {s} where {e} was expected: records cut, removed or reordered"
            ));
        }
        if let Some(c) = &chain
            && *c != prev_hash
        {
            f.damage.push(format!("{at} (seq {s}): previous-record hash does not match: a record before it was edited, removed or moved"));
        }
        seq = s;
        last = hash_line(line);
        expect_seq = Some(s.saturating_add(1));
        chain = Some(last.clone());
        if let Some(h) = &head {
            if s == h.last_seq {
                at_head = Some(last.clone());
            } else if s > h.last_seq {
                past_head += 1;
            }
        }
    }
    match &head {
        Some(h) => {
            let empty = h.last_seq + 1 == h.first_seq;
            if !empty && at_head.as_deref() != Some(h.last_hash.as_str()) {
                f.damage.push(if seq < h.last_seq {
                    format!(
                        "{name}: the signed head vouches for records up to seq {} but the file ends at seq {seq}: records were cut",
                        h.last_seq
                    )
                } else {
                    format!(
                        "{name}: the record at seq {} is not the one the signed head vouches for: records were edited or replaced",
                        h.last_seq
                    )
                });
            }
            if f.damage.is_empty() && past_head > 0 {
                f.tail = Some((h.last_seq + 1, seq));
            }
            f.first_seq = h.first_seq;
            f.chain_in = h.chain_in.clone();
            if f.damage.is_empty() {
                f.seq = seq.max(h.last_seq);
                f.last_hash = if past_head > 0 || !empty {
                    last
                } else {
                    h.last_hash.clone()
                };
            } else {
                // Continue from what the signed head vouches for.
                f.seq = h.last_seq;
                f.last_hash = h.last_hash.clone();
            }
        }
        None => {
            // Nothing vouches for this segment: continue from what the file holds.
            let (fs, fc) = first.unwrap_or((1, GENESIS.to_string()));
            f.first_seq = fs;
            f.chain_in = fc;
            f.seq = seq;
            f.last_hash = if last.is_empty() {
                f.chain_in.clone()
            } else {
                last
            };
        }
    }
    Ok(f)
}
