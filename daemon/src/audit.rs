//! Tamper-evident audit evidence: append-only segments of JSON lines, each record
//! carrying the SHA-256 of the previous record's line (across segments), and a signed
//! head per segment (ed25519, the daemon's audit key) naming its first and last record
//! and the chain value it continues from. `verify` detects an edited, deleted,
//! reordered or appended record, a truncated or missing segment and swapped segments,
//! and says where.
//!
//! Layout of an audit directory:
//! ```text
//! seg-000001.jsonl       {"seq":1,"prev":"00…","time":…,"kind":"…","record":{…}}
//! seg-000001.head.json   {"segment":1,"first_seq":1,"last_seq":…,"chain_in":"…","last_hash":"…","sig":"…"}
//! ```
use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
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
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Response => "response",
            Kind::KernelEvent => "kernel-event",
            Kind::Approval => "approval",
            Kind::Recovery => "recovery",
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    prev: String,
    time: u64,
    kind: Kind,
    record: &'a serde_json::value::RawValue,
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
    fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Head {
            sig: String::new(),
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }
}

pub(crate) fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:06}.jsonl"))
}
pub(crate) fn head_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:06}.head.json"))
}

fn hash_line(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
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

/// Appends records; `commit` makes everything appended so far durable (fsync) and
/// re-signs the open segment's head. Callers batch appends before one commit (group
/// commit).
pub struct AuditWriter {
    dir: PathBuf,
    key: Ed25519KeyPair,
    segment: u64,
    file: File,
    first_seq: u64,
    chain_in: String,
    seq: u64,
    last_hash: String,
    bytes: u64,
    max_segment_bytes: u64,
}

impl AuditWriter {
    /// Opens `dir`, continuing the chain of its last segment (a torn last line from a
    /// crash is cut back to the last complete record first).
    pub fn open(
        dir: &Path,
        key: Ed25519KeyPair,
        max_segment_bytes: u64,
    ) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let segments = list_segments(dir).map_err(io(dir))?;
        // What the previous writer left: records past its signed head, bytes of a torn line.
        let mut left = (0u64, 0u64, 0usize);
        let (segment, first_seq, chain_in, seq, last_hash, bytes) = match segments.last() {
            None => (1, 1, GENESIS.to_string(), 0, GENESIS.to_string(), 0),
            Some(&n) => {
                let p = seg_path(dir, n);
                let text = std::fs::read(&p).map_err(io(&p))?;
                let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                if complete < text.len() {
                    let f = OpenOptions::new().write(true).open(&p).map_err(io(&p))?;
                    f.set_len(complete as u64).map_err(io(&p))?;
                }
                let head: Option<Head> = std::fs::read(head_path(dir, n))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                let mut seq = head.as_ref().map_or(0, |h| h.first_seq.saturating_sub(1));
                let mut last = head
                    .as_ref()
                    .map_or(GENESIS.to_string(), |h| h.chain_in.clone());
                let first_seq = seq.saturating_add(1);
                let chain_in = last.clone();
                for l in text[..complete]
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(l) {
                        seq = v["seq"].as_u64().unwrap_or(seq.saturating_add(1));
                    }
                    last = hash_line(l);
                }
                let signed_to = head
                    .as_ref()
                    .map_or(first_seq.saturating_sub(1), |h| h.last_seq);
                if seq > signed_to {
                    left = (signed_to.saturating_add(1), seq, text.len() - complete);
                } else if complete < text.len() {
                    left = (0, 0, text.len() - complete);
                }
                (n, first_seq, chain_in, seq, last, complete as u64)
            }
        };
        let p = seg_path(dir, segment);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io(&p))?;
        let mut w = AuditWriter {
            dir: dir.to_owned(),
            key,
            segment,
            file,
            first_seq,
            chain_in,
            seq,
            last_hash,
            bytes,
            max_segment_bytes,
        };
        if left != (0, 0, 0) {
            // Signing a crashed writer's tail vouches for it from now on; say so in the
            // chain, so an auditor sees which records were signed late and why.
            let (from, to, torn) = left;
            w.append(
                Kind::Recovery,
                &serde_json::json!({
                    "reason": "the previous writer stopped before committing (crash or kill)",
                    "signed_late": if to > 0 { serde_json::json!({"from_seq": from, "to_seq": to}) } else { serde_json::Value::Null },
                    "torn_bytes_cut": torn,
                }),
            )?;
        }
        w.commit()?;
        Ok(w)
    }

    /// Appends one record (not yet durable); returns its sequence number.
    pub fn append<T: Serialize>(&mut self, kind: Kind, record: &T) -> Result<u64, AuditError> {
        if self.bytes >= self.max_segment_bytes && self.seq >= self.first_seq {
            self.rotate()?;
        }
        let raw = serde_json::value::to_raw_value(record)?;
        let line = Line {
            seq: self.seq + 1,
            prev: self.last_hash.clone(),
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            kind,
            record: &raw,
        };
        let mut bytes = serde_json::to_vec(&line)?;
        let h = hash_line(&bytes);
        bytes.push(b'\n');
        let p = seg_path(&self.dir, self.segment);
        self.file.write_all(&bytes).map_err(io(&p))?;
        self.seq += 1;
        self.last_hash = h;
        self.bytes += bytes.len() as u64;
        Ok(self.seq)
    }

    /// Makes every appended record durable and signs the head over them.
    pub fn commit(&mut self) -> Result<(), AuditError> {
        let p = seg_path(&self.dir, self.segment);
        self.file.sync_data().map_err(io(&p))?;
        self.write_head()
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.commit()?;
        self.segment += 1;
        self.first_seq = self.seq + 1;
        self.chain_in = self.last_hash.clone();
        self.bytes = 0;
        let p = seg_path(&self.dir, self.segment);
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io(&p))?;
        self.write_head()
    }

    fn write_head(&mut self) -> Result<(), AuditError> {
        let mut head = Head {
            segment: self.segment,
            first_seq: self.first_seq,
            last_seq: self.seq,
            chain_in: self.chain_in.clone(),
            last_hash: self.last_hash.clone(),
            sig: String::new(),
        };
        head.sig = hex::encode(self.key.sign(&head.signed_bytes()).as_ref());
        let p = head_path(&self.dir, self.segment);
        let tmp = p.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&serde_json::to_vec(&head)?).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

pub(crate) fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
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

/// What `verify` found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub segments: u64,
    pub records: u64,
    /// Each problem with its location; empty means the evidence is intact.
    pub problems: Vec<String>,
    /// Records at the end of the open (last) segment that correctly continue its
    /// signed head but are not covered by it yet. A live daemon signs them within its
    /// commit interval (100 ms), and on restart after a crash; a tail that stays
    /// unsigned was appended by someone without the key. Not in `problems`: the caller
    /// decides whether to look again.
    pub unsigned_tail: u64,
}

/// Checks every segment of `dir` against `public_key` (32 bytes).
pub fn verify(dir: &Path, public_key: &[u8]) -> Result<Report, AuditError> {
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    let segments = list_segments(dir).map_err(io(dir))?;
    let mut r = Report::default();
    let mut chain = GENESIS.to_string();
    let mut next_seq = 1u64;
    for (i, &n) in segments.iter().enumerate() {
        r.segments += 1;
        let name = format!("seg-{n:06}");
        if n != i as u64 + 1 {
            r.problems.push(format!(
                "{name}: expected segment {} here: a segment is missing or renamed",
                i + 1
            ));
        }
        let head: Option<Head> = match std::fs::read(head_path(dir, n)) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(h) => Some(h),
                Err(e) => {
                    r.problems
                        .push(format!("{name}.head.json: unreadable: {e}"));
                    None
                }
            },
            Err(_) => {
                r.problems.push(format!("{name}.head.json: missing"));
                None
            }
        };
        if let Some(h) = &head {
            let sig_ok = hex::decode(&h.sig)
                .ok()
                .is_some_and(|s| key.verify(&h.signed_bytes(), &s).is_ok());
            if !sig_ok {
                r.problems
                    .push(format!("{name}.head.json: signature does not verify"));
            }
            if h.segment != n {
                r.problems
                    .push(format!("{name}.head.json: names segment {}", h.segment));
            }
            if h.chain_in != chain || h.first_seq != next_seq {
                r.problems.push(format!(
                    "{name}: does not continue the previous segment (starts at seq {} after {}): segments swapped, removed or replaced",
                    h.first_seq,
                    next_seq.saturating_sub(1)
                ));
            }
        }
        let p = seg_path(dir, n);
        let f = File::open(&p).map_err(io(&p))?;
        let mut last_seq = next_seq.saturating_sub(1);
        // The chain hash at the record the head ends on, to tell an unsigned but
        // well-formed tail from an edit.
        let mut at_head: Option<String> = None;
        let mut after_head = 0u64;
        let head_last = head.as_ref().map(|h| h.last_seq);
        for (ln, line) in BufReader::new(f).split(b'\n').enumerate() {
            let line = line.map_err(io(&p))?;
            if line.is_empty() {
                continue;
            }
            let at = format!("{name}.jsonl line {}", ln + 1);
            let v: serde_json::Value = match serde_json::from_slice(&line) {
                Ok(v) => v,
                Err(e) => {
                    r.problems.push(format!("{at}: not a JSON record: {e}"));
                    chain = hash_line(&line);
                    continue;
                }
            };
            r.records += 1;
            let seq = v["seq"].as_u64().unwrap_or(0);
            if seq != next_seq {
                r.problems.push(format!(
                    "{at}: seq {seq} where {next_seq} was expected: records deleted or reordered"
                ));
            }
            if v["prev"].as_str() != Some(chain.as_str()) {
                r.problems.push(format!(
                    "{at} (seq {seq}): previous-record hash does not match: the record before it was edited, removed or moved"
                ));
            }
            chain = hash_line(&line);
            last_seq = seq;
            next_seq = seq.saturating_add(1);
            match head_last {
                Some(l) if seq == l => at_head = Some(chain.clone()),
                Some(l) if seq > l => after_head += 1,
                _ => {}
            }
        }
        let open_segment = i + 1 == segments.len();
        if let Some(h) = &head {
            let clean_tail = open_segment
                && last_seq > h.last_seq
                && after_head == last_seq - h.last_seq
                && at_head.as_deref() == Some(h.last_hash.as_str());
            if clean_tail {
                r.unsigned_tail = after_head;
            } else if h.last_seq != last_seq || h.last_hash != chain {
                r.problems.push(format!(
                    "{name}: the signed head ends at seq {} but the file ends at seq {last_seq}: records truncated, appended or the last one edited",
                    h.last_seq
                ));
            }
            // Continue from what the head vouches for, so one bad segment is not
            // reported again for every later one.
            chain = h.last_hash.clone();
            next_seq = h.last_seq.saturating_add(1);
        }
    }
    Ok(r)
}

/// [`verify`] for a directory a daemon may be writing to: a live daemon signs what it
/// appended within its commit interval (100 ms), so an unsigned tail is looked at again
/// until `wait` has passed. One that stays unsigned becomes a problem: appended without
/// the key, or its daemon is stopped (a restarted one signs it, with a `recovery`
/// record).
pub fn verify_settled(
    dir: &Path,
    public_key: &[u8],
    wait: std::time::Duration,
) -> Result<Report, AuditError> {
    let until = std::time::Instant::now() + wait;
    let mut r = verify(dir, public_key)?;
    while r.unsigned_tail > 0 && r.problems.is_empty() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(100));
        r = verify(dir, public_key)?;
    }
    if r.unsigned_tail > 0 {
        r.problems.push(format!(
            "the last {} records continue the chain but no signed head covers them after {:?}: \
             appended without the key, or the daemon that wrote them is stopped (it signs them when it starts)",
            r.unsigned_tail, wait
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pc-audit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Three segments of records, committed; returns (audit dir, public key).
    fn fixture(tag: &str) -> (PathBuf, Vec<u8>) {
        let d = tmp(tag);
        let key = load_or_create_key(&d.join("audit.key")).unwrap();
        let public = key.public_key().as_ref().to_vec();
        let dir = d.join("audit");
        let mut w = AuditWriter::open(&dir, key, 400).unwrap();
        for i in 0..12 {
            w.append(Kind::Request, &serde_json::json!({"i": i, "verb": "get"}))
                .unwrap();
            if i % 3 == 2 {
                w.commit().unwrap();
            }
        }
        w.commit().unwrap();
        (dir, public)
    }

    fn problems(dir: &Path, key: &[u8]) -> Vec<String> {
        verify(dir, key).unwrap().problems
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(p: &Path, l: &[String]) {
        std::fs::write(p, l.iter().map(|s| format!("{s}\n")).collect::<String>()).unwrap();
    }

    #[test]
    fn kinds_are_written_as_before() {
        for (k, s) in [
            (Kind::Request, "request"),
            (Kind::Response, "response"),
            (Kind::KernelEvent, "kernel-event"),
            (Kind::Approval, "approval"),
            (Kind::Recovery, "recovery"),
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), s);
            assert_eq!(k.as_str(), s);
        }
    }

    #[test]
    fn intact_evidence_verifies_across_segments_and_reopen() {
        let (dir, key) = fixture("intact");
        let r = verify(&dir, &key).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.records, 12);
        assert!(r.segments >= 3, "{}", r.segments);
        // Reopening continues the chain.
        let k = load_or_create_key(&dir.parent().unwrap().join("audit.key")).unwrap();
        let mut w = AuditWriter::open(&dir, k, 400).unwrap();
        w.append(Kind::Request, &serde_json::json!({"after": "restart"}))
            .unwrap();
        w.commit().unwrap();
        assert!(problems(&dir, &key).is_empty());
    }

    #[test]
    fn an_uncommitted_tail_is_reported_apart_and_signed_by_commit_or_reopen() {
        let (dir, key) = fixture("tail");
        let k = || load_or_create_key(&dir.parent().unwrap().join("audit.key")).unwrap();
        let mut w = AuditWriter::open(&dir, k(), 1 << 20).unwrap();
        for i in 0..3 {
            w.append(Kind::Request, &serde_json::json!({"pending": i}))
                .unwrap();
        }
        // Appended, not committed: well-formed, not yet vouched for.
        let r = verify(&dir, &key).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.unsigned_tail, 3);
        w.commit().unwrap();
        assert_eq!(verify(&dir, &key).unwrap().unsigned_tail, 0);
        // A crash leaves a tail; the next writer signs it on open.
        w.append(Kind::Request, &serde_json::json!({"crash": 1}))
            .unwrap();
        drop(w);
        assert_eq!(verify(&dir, &key).unwrap().unsigned_tail, 1);
        drop(AuditWriter::open(&dir, k(), 1 << 20).unwrap());
        let r = verify(&dir, &key).unwrap();
        assert!(r.problems.is_empty() && r.unsigned_tail == 0, "{r:?}");
        // ... and says so in the chain.
        let last = lines(&seg_path(&dir, r.segments)).pop().unwrap();
        let v: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["kind"], "recovery", "{last}");
        assert_eq!(
            v["record"]["signed_late"]["from_seq"],
            v["seq"].as_u64().unwrap() - 1
        );
        // An unsigned tail in a closed segment is a problem, not a pending commit.
        let (dir, key) = fixture("tail-closed");
        let p = seg_path(&dir, 1);
        let mut l = lines(&p);
        l.push(l.last().unwrap().clone());
        write_lines(&p, &l);
        let r = verify(&dir, &key).unwrap();
        assert_eq!(r.unsigned_tail, 0);
        assert!(!r.problems.is_empty());
    }

    #[test]
    fn a_tail_is_waited_for_then_reported_if_it_stays_unsigned() {
        let (dir, key) = fixture("settled");
        let k = load_or_create_key(&dir.parent().unwrap().join("audit.key")).unwrap();
        let mut w = AuditWriter::open(&dir, k, 1 << 20).unwrap();
        w.append(Kind::Request, &serde_json::json!({"late": 1}))
            .unwrap();
        // Nobody commits: after the wait it is a problem.
        let wait = std::time::Duration::from_millis(300);
        let r = verify_settled(&dir, &key, wait).unwrap();
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains("no signed head covers them")),
            "{r:?}"
        );
        // Committed while the verifier waits: intact.
        let committer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            w.commit().unwrap();
        });
        let r = verify_settled(&dir, &key, std::time::Duration::from_secs(5)).unwrap();
        committer.join().unwrap();
        assert!(r.problems.is_empty() && r.unsigned_tail == 0, "{r:?}");
    }

    #[test]
    fn a_flipped_byte_is_found() {
        let (dir, key) = fixture("flip");
        let p = seg_path(&dir, 1);
        let mut l = lines(&p);
        l[1] = l[1].replace("\"get\"", "\"gex\"");
        write_lines(&p, &l);
        let pr = problems(&dir, &key);
        assert!(
            pr.iter().any(|p| p.contains("seg-000001.jsonl line 3")),
            "{pr:?}"
        );
    }

    #[test]
    fn deletion_reordering_and_truncation_are_found() {
        let (dir, key) = fixture("del");
        let p = seg_path(&dir, 1);
        let mut l = lines(&p);
        l.remove(1);
        write_lines(&p, &l);
        assert!(
            problems(&dir, &key)
                .iter()
                .any(|p| p.contains("deleted or reordered"))
        );

        let (dir, key) = fixture("reorder");
        let p = seg_path(&dir, 2);
        let mut l = lines(&p);
        l.swap(0, 1);
        write_lines(&p, &l);
        assert!(
            problems(&dir, &key)
                .iter()
                .any(|p| p.contains("seg-000002"))
        );

        let (dir, key) = fixture("trunc");
        let p = seg_path(&dir, 3);
        let mut l = lines(&p);
        l.pop();
        write_lines(&p, &l);
        assert!(problems(&dir, &key).iter().any(|p| p.contains("truncated")));
    }

    #[test]
    fn swapped_or_missing_segments_and_forged_heads_are_found() {
        let (dir, key) = fixture("swap");
        for ext in ["jsonl", "head.json"] {
            let a = dir.join(format!("seg-000001.{ext}"));
            let b = dir.join(format!("seg-000002.{ext}"));
            let t = dir.join("t");
            std::fs::rename(&a, &t).unwrap();
            std::fs::rename(&b, &a).unwrap();
            std::fs::rename(&t, &b).unwrap();
        }
        assert!(!problems(&dir, &key).is_empty());

        let (dir, key) = fixture("missing");
        std::fs::remove_file(seg_path(&dir, 2)).unwrap();
        std::fs::remove_file(head_path(&dir, 2)).unwrap();
        assert!(problems(&dir, &key).iter().any(|p| p.contains("missing")));

        // Rewriting a head to cover an edit needs the key.
        let (dir, key) = fixture("forge");
        let hp = head_path(&dir, 1);
        let mut h: Head = serde_json::from_slice(&std::fs::read(&hp).unwrap()).unwrap();
        h.last_seq += 1;
        std::fs::write(&hp, serde_json::to_vec(&h).unwrap()).unwrap();
        assert!(problems(&dir, &key).iter().any(|p| p.contains("signature")));
    }

    #[test]
    fn hostile_sequence_numbers_are_reported_not_panicked_on() {
        let (dir, key) = fixture("hostile");
        let p = seg_path(&dir, 1);
        let mut l = lines(&p);
        l[0] = l[0].replacen("\"seq\":1", &format!("\"seq\":{}", u64::MAX), 1);
        write_lines(&p, &l);
        let hp = head_path(&dir, 2);
        let mut h: Head = serde_json::from_slice(&std::fs::read(&hp).unwrap()).unwrap();
        h.first_seq = 0;
        h.last_seq = u64::MAX;
        std::fs::write(&hp, serde_json::to_vec(&h).unwrap()).unwrap();
        assert!(!problems(&dir, &key).is_empty());
    }

    #[test]
    fn a_torn_last_line_is_cut_back_on_open() {
        let (dir, key) = fixture("torn");
        let last = *list_segments(&dir).unwrap().last().unwrap();
        let p = seg_path(&dir, last);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"seq\":99,\"prev\":\"ab").unwrap();
        drop(f);
        let k = load_or_create_key(&dir.parent().unwrap().join("audit.key")).unwrap();
        let mut w = AuditWriter::open(&dir, k, 1 << 20).unwrap();
        w.append(Kind::Request, &serde_json::json!({"x": 1}))
            .unwrap();
        w.commit().unwrap();
        assert!(
            problems(&dir, &key).is_empty(),
            "{:?}",
            problems(&dir, &key)
        );
    }
}
