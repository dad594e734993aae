//! Checking evidence: every segment's hash chain and signed head, with each problem
//! located; an unsigned but well-formed tail of the open segment is told apart from
//! damage (a live daemon signs it within its commit interval).
use std::{fs::File, io::BufRead, io::BufReader, path::Path};

use ring::signature::{ED25519, UnparsedPublicKey};
use serde::Serialize;

use super::chain::{AuditError, GENESIS, Head, hash_line, head_path, io, list_segments, seg_path};

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
    // Leading segments deleted within the disk budget: the chain starts where the
    // first remaining one says, and a `prune` record in the chain must vouch for it.
    let first = segments.first().copied().unwrap_or(1);
    let mut pruned_through: Option<(u64, String)> = None;
    if first > 1
        && let Some(h) = std::fs::read(head_path(dir, first))
            .ok()
            .and_then(|b| serde_json::from_slice::<Head>(&b).ok())
    {
        chain = h.chain_in.clone();
        next_seq = h.first_seq;
        pruned_through = Some((h.first_seq.saturating_sub(1), h.chain_in));
    }
    let mut prunes: Vec<(u64, String)> = Vec::new();
    for (i, &n) in segments.iter().enumerate() {
        r.segments += 1;
        let name = format!("seg-{n:06}");
        if n != i as u64 + first {
            r.problems.push(format!(
                "{name}: expected segment {} here: a segment is missing or renamed",
                i as u64 + first
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
            if v["kind"] == "prune"
                && let (Some(t), Some(h)) = (
                    v["record"]["through_seq"].as_u64(),
                    v["record"]["chain_hash"].as_str(),
                )
            {
                prunes.push((t, h.to_owned()));
            }
            let seq = v["seq"].as_u64().unwrap_or(0);
            if v["kind"] == "damage" {
                r.problems.push(format!(
                    "{at} (seq {seq}): the daemon recorded damage it found: {}",
                    v["record"]["findings"]
                ));
            }
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
    if first > 1 {
        let vouched = pruned_through
            .as_ref()
            .is_some_and(|p| prunes.iter().any(|q| q == p));
        if !vouched {
            r.problems.push(format!(
                "segments 1 to {} are missing and no prune record in the chain vouches for their deletion: segments removed",
                first - 1
            ));
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
mod budget_tests {
    use ring::signature::KeyPair;

    use super::*;
    use crate::audit::{AuditWriter, Kind, load_or_create_key};

    /// Past the budget, records are refused until the sink acknowledges segments; then
    /// those are deleted, the deletion is chained, and the rest still verifies. Deleting
    /// the first segment by hand does not verify.
    #[test]
    fn the_disk_budget_deletes_only_acknowledged_segments_and_stays_verifiable() {
        let tmp = tempfile::Builder::new()
            .prefix("pc-audit-budget-")
            .tempdir()
            .unwrap();
        let d = tmp.path();
        let key = load_or_create_key(&d.join("audit.key")).unwrap();
        let public = key.public_key().as_ref().to_vec();
        let dir = d.join("audit");
        let mut w = AuditWriter::open(&dir, key, 2048)
            .unwrap()
            .with_disk_budget(16 * 1024);
        let rec = serde_json::json!({"verb": "delete", "pad": "x".repeat(200)});
        let mut written = 0u64;
        let err = loop {
            match w.append(Kind::Request, &rec) {
                Ok(seq) => written = seq,
                Err(e) => break e,
            }
            w.commit().unwrap();
            assert!(written < 10_000, "the budget never applied");
        };
        assert!(matches!(err, AuditError::DiskBudget { .. }), "{err}");
        assert!(err.to_string().contains("audit.max_disk_bytes"), "{err}");
        let used: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(used <= 16 * 1024, "{used}");
        // Nothing was lost: every record written is still there.
        let r = verify(&dir, &public).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.records, written);
        // The sink acknowledges half: room again, and the chain still verifies.
        std::fs::write(dir.join("sink.cursor"), (written / 2).to_string()).unwrap();
        let seq = w
            .append(Kind::Request, &rec)
            .expect("room after the sink acknowledged");
        w.commit().unwrap();
        assert!(seq > written);
        assert!(!dir.join("seg-000001.jsonl").exists());
        let r = verify(&dir, &public).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        // Unacknowledged segments stay.
        let first = list_segments(&dir).unwrap()[0];
        let h: Head =
            serde_json::from_slice(&std::fs::read(head_path(&dir, first)).unwrap()).unwrap();
        assert!(
            h.first_seq <= written / 2 + 1,
            "deleted unacknowledged records: {h:?}"
        );
        // Removing a segment by hand is found.
        std::fs::remove_file(seg_path(&dir, first)).unwrap();
        std::fs::remove_file(head_path(&dir, first)).unwrap();
        let r = verify(&dir, &public).unwrap();
        assert!(!r.problems.is_empty(), "a removed segment verified");
    }
}

#[cfg(test)]
mod tests {
    use std::{fs::OpenOptions, io::Write, path::PathBuf};

    use ring::signature::KeyPair;

    use super::*;
    use crate::audit::{AuditWriter, Kind, load_or_create_key};

    /// Three segments of records, committed; returns (the directory, removed when
    /// dropped; the audit dir in it; the public key).
    fn fixture(tag: &str) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("pc-audit-{tag}-"))
            .tempdir()
            .unwrap();
        let d = tmp.path();
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
        (tmp, dir, public)
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
        let (_tmp, dir, key) = fixture("intact");
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
        let (_tmp, dir, key) = fixture("tail");
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
        let (_tmp, dir, key) = fixture("tail-closed");
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
        let (_tmp, dir, key) = fixture("settled");
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
        let (_tmp, dir, key) = fixture("flip");
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
        let (_tmp, dir, key) = fixture("del");
        let p = seg_path(&dir, 1);
        let mut l = lines(&p);
        l.remove(1);
        write_lines(&p, &l);
        assert!(
            problems(&dir, &key)
                .iter()
                .any(|p| p.contains("deleted or reordered"))
        );

        let (_tmp, dir, key) = fixture("reorder");
        let p = seg_path(&dir, 2);
        let mut l = lines(&p);
        l.swap(0, 1);
        write_lines(&p, &l);
        assert!(
            problems(&dir, &key)
                .iter()
                .any(|p| p.contains("seg-000002"))
        );

        let (_tmp, dir, key) = fixture("trunc");
        let p = seg_path(&dir, 3);
        let mut l = lines(&p);
        l.pop();
        write_lines(&p, &l);
        assert!(problems(&dir, &key).iter().any(|p| p.contains("truncated")));
    }

    #[test]
    fn swapped_or_missing_segments_and_forged_heads_are_found() {
        let (_tmp, dir, key) = fixture("swap");
        for ext in ["jsonl", "head.json"] {
            let a = dir.join(format!("seg-000001.{ext}"));
            let b = dir.join(format!("seg-000002.{ext}"));
            let t = dir.join("t");
            std::fs::rename(&a, &t).unwrap();
            std::fs::rename(&b, &a).unwrap();
            std::fs::rename(&t, &b).unwrap();
        }
        assert!(!problems(&dir, &key).is_empty());

        let (_tmp, dir, key) = fixture("missing");
        std::fs::remove_file(seg_path(&dir, 2)).unwrap();
        std::fs::remove_file(head_path(&dir, 2)).unwrap();
        assert!(problems(&dir, &key).iter().any(|p| p.contains("missing")));

        // Rewriting a head to cover an edit needs the key.
        let (_tmp, dir, key) = fixture("forge");
        let hp = head_path(&dir, 1);
        let mut h: Head = serde_json::from_slice(&std::fs::read(&hp).unwrap()).unwrap();
        h.last_seq += 1;
        std::fs::write(&hp, serde_json::to_vec(&h).unwrap()).unwrap();
        assert!(problems(&dir, &key).iter().any(|p| p.contains("signature")));
    }

    #[test]
    fn hostile_sequence_numbers_are_reported_not_panicked_on() {
        let (_tmp, dir, key) = fixture("hostile");
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

    /// Records cut from the last segment while no daemon ran: the next writer must
    /// not sign over the gap.
    #[test]
    fn records_cut_or_edited_while_stopped_are_recorded_as_damage_not_absorbed() {
        for tamper in ["cut", "edit", "head"] {
            let (_tmp, dir, key) = fixture(&format!("stopped-{tamper}"));
            let last = *list_segments(&dir).unwrap().last().unwrap();
            let p = seg_path(&dir, last);
            let mut l = lines(&p);
            match tamper {
                "cut" => {
                    l.pop();
                }
                "edit" => {
                    let n = l.len() - 1;
                    l[n] = l[n].replace("\"get\"", "\"put\"");
                }
                _ => std::fs::remove_file(head_path(&dir, last)).unwrap(),
            }
            write_lines(&p, &l);
            let k = load_or_create_key(&dir.parent().unwrap().join("audit.key")).unwrap();
            let mut w = AuditWriter::open(&dir, k, 1 << 20).unwrap();
            w.append(Kind::Request, &serde_json::json!({"after": "restart"}))
                .unwrap();
            w.commit().unwrap();
            let r = verify(&dir, &key).unwrap();
            assert!(!r.problems.is_empty(), "{tamper}: absorbed: {r:?}");
            assert!(
                r.problems
                    .iter()
                    .any(|p| p.contains("the daemon recorded damage")),
                "{tamper}: {:?}",
                r.problems
            );
            // The damaged segment keeps its head; the writer went on in a new one,
            // which continues the chain (no problem is reported for it).
            let segs = list_segments(&dir).unwrap();
            assert_eq!(*segs.last().unwrap(), last + 1, "{tamper}");
            assert!(
                !r.problems
                    .iter()
                    .any(|p| p.contains(&format!("seg-{:06}: does not continue", last + 1))),
                "{tamper}: {:?}",
                r.problems
            );
            // A second restart does not make the damage go away.
            let k = load_or_create_key(&dir.parent().unwrap().join("audit.key")).unwrap();
            drop(AuditWriter::open(&dir, k, 1 << 20).unwrap());
            let again = verify(&dir, &key).unwrap();
            assert!(!again.problems.is_empty(), "{tamper}: {again:?}");
        }
    }

    #[test]
    fn a_torn_last_line_is_cut_back_on_open() {
        let (_tmp, dir, key) = fixture("torn");
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
