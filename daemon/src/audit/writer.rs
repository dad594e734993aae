//! Appending to the chain: records in segments of JSON lines, group-committed (one
//! fsync for a batch) and vouched for by the segment's re-signed head. A reopened
//! directory continues its chain; a crashed writer's torn line is cut and its
//! unsigned tail signed late, with a `recovery` record saying so.
use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Serialize;
use tracing::warn;

use super::{
    chain::{
        AuditError, Encoded, GENESIS, Head, Kind, hash_line_into, head_path, io, list_segments,
        seg_path, write_line,
    },
    reopen,
};

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
    /// Bytes of every segment and head in `dir`, and the most they may take.
    disk_bytes: u64,
    max_disk_bytes: u64,
    /// Lines appended but not yet written to `file` (one write per batch instead of
    /// one per record), and the chain state before the first of them, restored if the
    /// write fails so the chain continues from what is in the file.
    pending: Vec<u8>,
    before_pending: Option<Rollback>,
}

struct Rollback {
    seq: u64,
    last_hash: String,
    bytes: u64,
    disk_bytes: u64,
}

/// What `prune` records in the chain.
#[derive(Serialize)]
struct Pruned {
    reason: &'static str,
    deleted_segments: Vec<u64>,
    /// The last record of the deleted segments, and the chain value after it (where
    /// the first remaining segment continues from).
    through_seq: u64,
    chain_hash: String,
    acknowledged_by_sink: u64,
}

impl AuditWriter {
    /// Opens `dir`, continuing the chain of its last segment once it checked it
    /// against its signed head (see `reopen`): a torn last line from a crash is cut, an
    /// unsigned tail that continues the chain is signed late with a `recovery` record,
    /// and damage is left as found, recorded in a `damage` record in a new segment.
    pub fn open(
        dir: &Path,
        key: Ed25519KeyPair,
        max_segment_bytes: u64,
    ) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let segments = list_segments(dir).map_err(io(dir))?;
        let found = match segments.last() {
            None => None,
            Some(&n) => {
                let prev = segments.len().checked_sub(2).map(|i| segments[i]);
                Some(reopen::inspect(dir, n, prev, key.public_key().as_ref())?)
            }
        };
        let damaged = found.as_ref().is_some_and(|f| !f.damage.is_empty());
        let (segment, first_seq, chain_in, seq, last_hash, bytes) = match &found {
            None => (1, 1, GENESIS.to_string(), 0, GENESIS.to_string(), 0),
            // Never re-sign a damaged segment: continue in a new one, from what the
            // damaged one's signed head vouched for (or its last record without one).
            Some(f) if damaged => (
                f.segment + 1,
                f.seq + 1,
                f.last_hash.clone(),
                f.seq,
                f.last_hash.clone(),
                0,
            ),
            Some(f) => {
                if f.torn > 0 {
                    let p = seg_path(dir, f.segment);
                    let file = OpenOptions::new().write(true).open(&p).map_err(io(&p))?;
                    file.set_len(f.complete).map_err(io(&p))?;
                }
                (
                    f.segment,
                    f.first_seq,
                    f.chain_in.clone(),
                    f.seq,
                    f.last_hash.clone(),
                    f.complete,
                )
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
            disk_bytes: 0,
            max_disk_bytes: u64::MAX,
            pending: Vec::new(),
            before_pending: None,
        };
        w.disk_bytes = w.measure();
        match found {
            Some(f) if damaged => {
                warn!(segment = f.segment, findings = ?f.damage, "the audit log was damaged while no writer had it open; recorded, not signed over");
                w.append(
                    Kind::Damage,
                    &serde_json::json!({
                        "reason": "the previous writer's log does not match its signed head(s)",
                        "segment": f.segment,
                        "findings": f.damage,
                        "continues_after_seq": f.seq,
                    }),
                )?;
            }
            Some(f) if f.tail.is_some() || f.torn > 0 => {
                // Signing a crashed writer's tail vouches for it from now on; say so in
                // the chain, so an auditor sees which records were signed late and why.
                w.append(
                    Kind::Recovery,
                    &serde_json::json!({
                        "reason": "the previous writer stopped before committing (crash or kill)",
                        "signed_late": f.tail.map(|(from, to)| serde_json::json!({"from_seq": from, "to_seq": to})),
                        "torn_bytes_cut": f.torn,
                    }),
                )?;
            }
            _ => {}
        }
        w.commit()?;
        Ok(w)
    }

    /// Keeps the directory within `max` bytes: past it, segments the sink acknowledged
    /// are deleted, and records are refused ([`AuditError::DiskBudget`]) while nothing
    /// more may be deleted.
    pub fn with_disk_budget(mut self, max: u64) -> Self {
        self.max_disk_bytes = max;
        self
    }

    fn measure(&self) -> u64 {
        list_segments(&self.dir)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|n| [seg_path(&self.dir, n), head_path(&self.dir, n)])
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// The last seq the audit sink acknowledged (0: none, or no sink).
    fn acknowledged(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("sink.cursor"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Deletes closed segments, oldest first, whose every record the sink acknowledged;
    /// records the deletion in the chain. Returns whether any was deleted.
    fn prune(&mut self) -> Result<bool, AuditError> {
        let acked = self.acknowledged();
        let mut deleted = Vec::new();
        let mut through = None;
        for n in list_segments(&self.dir).map_err(io(&self.dir))? {
            if n >= self.segment {
                break;
            }
            let head: Option<Head> = std::fs::read(head_path(&self.dir, n))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let Some(head) = head else { break };
            if head.last_seq > acked {
                break;
            }
            for p in [seg_path(&self.dir, n), head_path(&self.dir, n)] {
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&p).map_err(io(&p))?;
                self.disk_bytes = self.disk_bytes.saturating_sub(len);
            }
            deleted.push(n);
            through = Some((head.last_seq, head.last_hash));
        }
        let Some((through_seq, chain_hash)) = through else {
            return Ok(false);
        };
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        let pruned = Pruned {
            reason: "audit.max_disk_bytes reached; these segments were acknowledged by the audit sink",
            deleted_segments: deleted,
            through_seq,
            chain_hash,
            acknowledged_by_sink: acked,
        };
        self.append_unchecked(Kind::Prune, |out| serde_json::to_writer(out, &pruned))?;
        Ok(true)
    }

    /// Appends one record and writes it to the segment (not yet durable); returns its
    /// sequence number.
    pub fn append<T: Serialize>(&mut self, kind: Kind, record: &T) -> Result<u64, AuditError> {
        let seq = self.append_buffered(kind, record)?;
        self.flush()?;
        Ok(seq)
    }

    /// Appends one record to the chain without writing it yet: [`Self::flush`] (or
    /// `commit`) writes every buffered line with one write. The writer thread appends
    /// a whole batch this way, then flushes once.
    pub fn append_buffered<T: Serialize>(
        &mut self,
        kind: Kind,
        record: &T,
    ) -> Result<u64, AuditError> {
        self.append_buffered_with(kind, |out| serde_json::to_writer(out, record))
    }

    /// [`Self::append_buffered`] for a record encoded already (the gate's, encoded
    /// where they are made): its bytes go into the line as they are.
    pub fn append_encoded(&mut self, kind: Kind, record: &Encoded) -> Result<u64, AuditError> {
        self.append_buffered_with(kind, |out| {
            out.extend_from_slice(record.as_bytes());
            Ok(())
        })
    }

    fn append_buffered_with(
        &mut self,
        kind: Kind,
        record: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
    ) -> Result<u64, AuditError> {
        // Room for this record and a rotation's head: else make room, or refuse.
        const SLACK: u64 = 4096;
        if self.disk_bytes.saturating_add(SLACK) > self.max_disk_bytes
            && !(self.prune()? && self.disk_bytes.saturating_add(SLACK) <= self.max_disk_bytes)
        {
            let oldest_last_seq = list_segments(&self.dir)
                .ok()
                .and_then(|s| s.first().copied())
                .and_then(|n| std::fs::read(head_path(&self.dir, n)).ok())
                .and_then(|b| serde_json::from_slice::<Head>(&b).ok())
                .map_or(0, |h| h.last_seq);
            return Err(AuditError::DiskBudget {
                budget: self.max_disk_bytes,
                used: self.disk_bytes,
                acknowledged: self.acknowledged(),
                oldest_last_seq,
            });
        }
        self.append_unchecked(kind, record)
    }

    fn append_unchecked(
        &mut self,
        kind: Kind,
        record: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
    ) -> Result<u64, AuditError> {
        if self.bytes >= self.max_segment_bytes && self.seq >= self.first_seq {
            self.rotate()?;
        }
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let start = self.pending.len();
        let seq = self.seq + 1;
        if let Err(e) = write_line(&mut self.pending, seq, &self.last_hash, time, kind, record) {
            self.pending.truncate(start);
            return Err(e.into());
        }
        let len = (self.pending.len() - start + 1) as u64;
        if self.before_pending.is_none() {
            self.before_pending = Some(Rollback {
                seq: self.seq,
                last_hash: self.last_hash.clone(),
                bytes: self.bytes,
                disk_bytes: self.disk_bytes,
            });
        }
        hash_line_into(&self.pending[start..], &mut self.last_hash);
        self.pending.push(b'\n');
        self.seq += 1;
        self.bytes += len;
        self.disk_bytes += len;
        Ok(self.seq)
    }

    /// Writes the buffered lines to the segment. If that fails, the chain continues
    /// from the last line written before them (as if they had never been appended).
    pub fn flush(&mut self) -> Result<(), AuditError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self.file.write_all(&self.pending);
        self.pending.clear();
        let before = self.before_pending.take();
        if let Err(e) = r {
            if let Some(b) = before {
                self.seq = b.seq;
                self.last_hash = b.last_hash;
                self.bytes = b.bytes;
                self.disk_bytes = b.disk_bytes;
            }
            return Err(io(&seg_path(&self.dir, self.segment))(e));
        }
        Ok(())
    }

    /// Makes every appended record durable and signs the head over them.
    pub fn commit(&mut self) -> Result<(), AuditError> {
        self.flush()?;
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
        let old = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        let new = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
        self.disk_bytes = (self.disk_bytes + new).saturating_sub(old);
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}
