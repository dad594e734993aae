//! `audit verify` over a damaged or edited log: a signed log written once per
//! process, edited by the input, checked.
use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::audit::{AuditWriter, Kind, verify as verify_log};

/// The untouched log: its files (name, bytes) and the public key.
struct Template {
    files: Vec<(String, Vec<u8>)>,
    public: Vec<u8>,
}

/// A scratch directory of this process and thread (memory-backed where there is one).
fn scratch(what: &str) -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!(
        "portcullis-fuzz-{what}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ))
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let dir = scratch("audit-template");
        let _ = std::fs::remove_dir_all(&dir);
        let key = Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).expect("a fixed seed");
        let public = key.public_key().as_ref().to_vec();
        // Small segments, so the log has several and the chain crosses them.
        let mut w = AuditWriter::open(&dir, key, 700).expect("a fresh audit log");
        for i in 0..9u32 {
            let kind = if i % 2 == 0 {
                Kind::Request
            } else {
                Kind::Response
            };
            w.append(
                kind,
                &serde_json::json!({"i": i, "verb": "delete", "ns": "prod-a"}),
            )
            .expect("append");
            if i % 2 == 1 {
                w.commit().expect("commit");
            }
        }
        w.commit().expect("commit");
        drop(w);
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .expect("the log directory")
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("a log file"),
                )
            })
            .collect();
        files.sort();
        let _ = std::fs::remove_dir_all(&dir);
        Template { files, public }
    })
}

/// The number of a segment file (`seg-000003.jsonl` → 3).
fn segment(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// The line of `b` around `pos`: its start and end (after its newline).
fn line_at(b: &[u8], pos: usize) -> (usize, usize) {
    let pos = pos.min(b.len());
    let start = b[..pos]
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |i| i + 1);
    let end = b[pos..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |i| pos + i + 1);
    (start, end)
}

/// Edits of 5 bytes each: operation, file, position (2 bytes), value.
pub fn verify(data: &[u8]) {
    let t = template();
    let mut files: Vec<Option<Vec<u8>>> = t.files.iter().map(|(_, b)| Some(b.clone())).collect();
    let n = files.len();
    for e in data.chunks_exact(5).take(16) {
        let f = usize::from(e[1]) % n;
        let Some(b) = files[f].as_mut() else {
            continue;
        };
        let pos = usize::from(u16::from_be_bytes([e[2], e[3]])) % (b.len() + 1);
        match e[0] % 8 {
            0 if pos < b.len() => b[pos] = e[4],
            1 => b.insert(pos, e[4]),
            2 if pos < b.len() => {
                b.remove(pos);
            }
            3 => b.truncate(pos),
            4 => files[f] = None,
            5 => files.swap(f, (f + 1) % n),
            6 => {
                let (s, end) = line_at(b, pos);
                let line = b[s..end].to_vec();
                b.splice(end..end, line);
            }
            7 => {
                let (s, end) = line_at(b, pos);
                b.drain(s..end);
            }
            _ => {}
        }
    }
    // Intact may be said only when every segment left is as written and they are the
    // first k (a log cut at a segment boundary needs an anchor to be caught).
    let mut kept = Vec::new();
    let mut untouched = true;
    for ((name, orig), now) in t.files.iter().zip(&files) {
        if let Some(s) = segment(name)
            && let Some(b) = now
        {
            kept.push(s);
            // The records, not the bytes: a blank line or the last newline removed or
            // added changes no record (the reader skips blank lines).
            let records = |x: &[u8]| -> Vec<Vec<u8>> {
                x.split(|&c| c == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect()
            };
            untouched &= records(b) == records(orig);
        }
    }
    let prefix = kept.iter().enumerate().all(|(i, s)| *s == i as u64 + 1);
    let may_be_intact = untouched && prefix;

    let dir = scratch("audit");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    for ((name, _), now) in t.files.iter().zip(&files) {
        if let Some(b) = now {
            std::fs::write(dir.join(name), b).expect("writing a log file");
        }
    }
    let report = verify_log(&dir, &t.public);
    let _ = std::fs::remove_dir_all(&dir);
    if let Ok(r) = report
        && !may_be_intact
    {
        assert!(
            !r.problems.is_empty() || r.unsigned_tail > 0,
            "an edited log verified intact ({} segments, {} records)",
            r.segments,
            r.records
        );
    }
}
