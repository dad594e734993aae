//! The daemon's side of the audit evidence: every task hands records to one writer
//! thread (fsync never blocks the runtime), which appends them to the hash chain in
//! batches and makes each batch durable with one fsync (group commit). A caller that
//! must not act before its record is durable (a mutation) awaits the acknowledgement;
//! others only queue. If a batch cannot be written the log reports itself unhealthy,
//! and the proxy refuses what it must not do unrecorded.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{
    AuditError, AuditWriter, Kind,
    chain::{EncodeJson, Encoded},
};
use crate::config::{Audit as AuditCfg, AuditLevel};

const QUEUE: usize = 8192;
const MAX_BATCH: usize = 1024;
/// Records waiting for room beyond the queue (tasks that wait to send). Past this a
/// record nobody waits for is dropped, counted, and the count written into the chain
/// when there is room again; the log reports itself unhealthy meanwhile, so reads are
/// refused with `audit.fail_closed_reads`.
const OVERFLOW: usize = 4096;

/// Buffers of written records kept for the next ones (a record is encoded on an event
/// loop and freed on the writer thread: freed there, its memory never returned to the
/// loop's allocator cache, and every record cost a slow-path `malloc`, ~600
/// instructions, and a `free` ~180). Bounded in count and in each buffer's size.
const SPARES: usize = 512;
const SPARE_MAX_BYTES: usize = 4096;

struct Spares(std::sync::Mutex<Vec<Vec<u8>>>);

impl Spares {
    fn new() -> Spares {
        Spares(std::sync::Mutex::new(Vec::with_capacity(SPARES)))
    }

    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_else(Encoded::buffer)
    }

    /// Keeps what fits of `bufs` and empties it; the rest are freed after the lock is
    /// let go (loops wait on it to encode).
    fn give(&self, bufs: &mut Vec<Vec<u8>>) {
        bufs.retain(|b| b.capacity() <= SPARE_MAX_BYTES);
        {
            let mut spares = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let keep = SPARES.saturating_sub(spares.len()).min(bufs.len());
            let from = bufs.len() - keep;
            spares.extend(bufs.drain(from..));
        }
        bufs.clear();
    }
}

struct Entry {
    kind: Kind,
    record: Encoded,
    ack: Option<oneshot::Sender<Result<u64, Arc<AuditError>>>>,
}

/// Why a record was not made durable.
#[derive(Debug, thiserror::Error)]
pub enum AuditUnavailable {
    /// Appending or committing failed (one failure answers every waiter of a batch).
    #[error("the audit log cannot be written: {0}")]
    Write(#[source] Arc<AuditError>),
    #[error("the audit log cannot be written: the record could not be encoded")]
    Encode,
    #[error("the audit log cannot be written: the audit writer has stopped")]
    Stopped,
}

/// The handle every task holds.
pub struct AuditLog {
    tx: mpsc::Sender<Entry>,
    healthy: Arc<AtomicBool>,
    /// Senders waiting for room, and records dropped past [`OVERFLOW`].
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// Told after each durable batch (the HTTP sink ships from the segments).
    committed: Arc<tokio::sync::Notify>,
    /// The writer thread, woken (unparked) by a record someone waits for, or by any
    /// record while it sleeps until a commit with nothing to write (`writer_idle`).
    writer: std::thread::Thread,
    writer_idle: Arc<AtomicBool>,
    spares: Arc<Spares>,
    pub level: AuditLevel,
    pub max_body_bytes: usize,
    pub fail_closed_reads: bool,
}

impl AuditLog {
    /// Starts the writer thread over `writer`.
    pub fn start(writer: AuditWriter, cfg: &AuditCfg) -> std::io::Result<Arc<AuditLog>> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let committed = Arc::new(tokio::sync::Notify::new());
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer_idle = Arc::new(AtomicBool::new(false));
        let spares = Arc::new(Spares::new());
        let thread = {
            let healthy = healthy.clone();
            let committed = committed.clone();
            let dropped = dropped.clone();
            let idle = writer_idle.clone();
            let spares = spares.clone();
            std::thread::Builder::new()
                .name("audit".into())
                .spawn(move || {
                    write_loop(writer, rx, &healthy, &committed, &dropped, &idle, &spares)
                })?
                .thread()
                .clone()
        };
        Ok(Arc::new(AuditLog {
            tx,
            writer: thread,
            writer_idle,
            spares,
            healthy,
            waiting: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            dropped,
            committed,
            level: cfg.level,
            max_body_bytes: cfg.max_body_bytes,
            fail_closed_reads: cfg.fail_closed_reads,
        }))
    }

    fn entry(kind: Kind, encoded: Result<Encoded, serde_json::Error>) -> Option<Entry> {
        match encoded {
            Ok(record) => Some(Entry {
                kind,
                record,
                ack: None,
            }),
            Err(e) => {
                warn!(error = %e, kind = kind.as_str(), "an audit record could not be encoded");
                None
            }
        }
    }

    /// Queues a record without waiting. A full queue makes a task wait for room
    /// rather than drop the record.
    pub fn record<T: Serialize>(&self, kind: Kind, rec: &T) {
        self.queue(Self::entry(kind, Encoded::new(rec)));
    }

    /// [`Self::record`] for a record that writes its own JSON (the gate's per-request
    /// records).
    pub fn record_own<T: EncodeJson>(&self, kind: Kind, rec: &T) {
        self.queue(Self::entry(kind, Encoded::own_in(self.spares.take(), rec)));
    }

    fn queue(&self, entry: Option<Entry>) {
        let Some(e) = entry else {
            return;
        };
        match self.tx.try_send(e) {
            Ok(()) => {
                // The writer takes queued records every FLUSH_EVERY; past half the
                // queue it is woken rather than let the queue fill; and while it sleeps
                // until a commit with nothing to write, the first record wakes it (the
                // fence pairs with the writer's: it sees this record or we see it idle).
                std::sync::atomic::fence(Ordering::SeqCst);
                if self.tx.capacity() < QUEUE / 2
                    || (self.writer_idle.load(Ordering::Relaxed)
                        && self.writer_idle.swap(false, Ordering::SeqCst))
                {
                    self.writer.unpark();
                }
            }
            Err(mpsc::error::TrySendError::Full(e)) => {
                let tx = self.tx.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        if self.waiting.fetch_add(1, Ordering::SeqCst) >= OVERFLOW {
                            self.waiting.fetch_sub(1, Ordering::SeqCst);
                            self.dropped.fetch_add(1, Ordering::SeqCst);
                            self.healthy.store(false, Ordering::SeqCst);
                            return;
                        }
                        let waiting = self.waiting.clone();
                        h.spawn(async move {
                            if tx.send(e).await.is_err() {
                                warn!("audit writer stopped: a record is lost");
                            }
                            waiting.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    // Outside the runtime (shutdown): wait for room on this thread.
                    Err(_) => {
                        if tx.blocking_send(e).is_err() {
                            warn!("audit writer stopped: a record is lost");
                        }
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.healthy.store(false, Ordering::SeqCst);
                warn!("audit writer stopped: a record is lost");
            }
        }
    }

    /// Queues a record and returns once it is durable (its sequence number). Only the
    /// gate waits for a record (a mutation's, before it is forwarded), so only records
    /// that write their own JSON are taken.
    pub async fn durable<T: EncodeJson>(
        &self,
        kind: Kind,
        rec: &T,
    ) -> Result<u64, AuditUnavailable> {
        let mut e = Self::entry(kind, Encoded::own_in(self.spares.take(), rec))
            .ok_or(AuditUnavailable::Encode)?;
        let (ack, done) = oneshot::channel();
        e.ack = Some(ack);
        self.tx
            .send(e)
            .await
            .map_err(|_| AuditUnavailable::Stopped)?;
        // Someone waits: the writer takes it now, not at its next round.
        self.writer.unpark();
        match done.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(why)) => Err(AuditUnavailable::Write(why)),
            Err(_) => Err(AuditUnavailable::Stopped),
        }
    }

    /// False after a batch failed to be written, until one succeeds.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub fn committed(&self) -> Arc<tokio::sync::Notify> {
        self.committed.clone()
    }
}

/// Records nobody waits for are written to the file (a daemon crash keeps them) within
/// [`FLUSH_EVERY`], and made durable and signed within this; a batch with a waiter is
/// committed at once. Under a read-heavy load this keeps fsyncs to a few per second
/// instead of one round (data, head, directory) per batch.
const COMMIT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// While records are uncommitted, the writer takes what is queued this often; a
/// record someone waits for (a mutation's) wakes it at once. The first record after
/// a quiet spell wakes it too (it sleeps on the queue then). Each round is a wake-up
/// and a write: at 2 ms, a read-heavy agent cost the daemon ~500 of each per second.
/// A round that finds nothing ends the rounds: the writer then sleeps until the commit
/// is due, and the next record (if one comes first) wakes it — a lone request costs
/// three wake-ups (its records, one round, the commit), not a round every 10 ms.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

fn write_loop(
    mut w: AuditWriter,
    mut rx: mpsc::Receiver<Entry>,
    healthy: &AtomicBool,
    committed: &tokio::sync::Notify,
    dropped: &std::sync::atomic::AtomicU64,
    idle: &AtomicBool,
    spares: &Spares,
) {
    let mut batch: Vec<Entry> = Vec::with_capacity(MAX_BATCH);
    // The batch's buffers on their way back to `spares`.
    let mut back: Vec<Vec<u8>> = Vec::with_capacity(MAX_BATCH);
    // Appended but not yet committed since this instant.
    let mut dirty: Option<std::time::Instant> = None;
    loop {
        let first = match dirty {
            None => match rx.blocking_recv() {
                Some(e) => Some(e),
                None => return,
            },
            Some(since) => {
                // The last round found nothing.
                let mut quiet = false;
                loop {
                    match rx.try_recv() {
                        Ok(e) => break Some(e),
                        Err(mpsc::error::TryRecvError::Empty) if since.elapsed() < COMMIT_EVERY => {
                            let due = COMMIT_EVERY.saturating_sub(since.elapsed());
                            if !quiet {
                                // Woken early by a waiter (or a filling queue); an unpark
                                // that came while this thread was busy makes this return
                                // at once.
                                std::thread::park_timeout(FLUSH_EVERY.min(due));
                                quiet = true;
                                continue;
                            }
                            // Until the commit, unless a record comes first: its sender
                            // sees `idle` (the fences pair: either it sees the flag or
                            // this look at the queue sees its record).
                            idle.store(true, Ordering::SeqCst);
                            std::sync::atomic::fence(Ordering::SeqCst);
                            if let Ok(e) = rx.try_recv() {
                                idle.store(false, Ordering::SeqCst);
                                break Some(e);
                            }
                            std::thread::park_timeout(due);
                            idle.store(false, Ordering::SeqCst);
                        }
                        Err(_) => break None,
                    }
                }
            }
        };
        if let Some(first) = first {
            batch.push(first);
            while batch.len() < MAX_BATCH
                && let Ok(e) = rx.try_recv()
            {
                batch.push(e);
            }
        }
        let lost = dropped.swap(0, Ordering::SeqCst);
        if lost > 0 {
            warn!(
                records = lost,
                "the audit queue overflowed: records were dropped"
            );
            if w
                .append(
                    Kind::Recovery,
                    &serde_json::json!({"reason": "the audit queue overflowed (records nobody waited for)", "dropped_records": lost}),
                )
                .is_err()
            {
                dropped.fetch_add(lost, Ordering::SeqCst);
            }
        }
        // The batch's lines in one write; were it to fail, none of them is in the chain.
        let mut appended: Vec<Result<u64, Arc<AuditError>>> = batch
            .iter()
            .map(|e| w.append_encoded(e.kind, &e.record).map_err(Arc::new))
            .collect();
        if let Err(e) = w.flush() {
            let e = Arc::new(e);
            for r in &mut appended {
                if r.is_ok() {
                    *r = Err(e.clone());
                }
            }
        }
        let appended_ok = appended.iter().all(Result::is_ok);
        let since = *dirty.get_or_insert_with(std::time::Instant::now);
        let waiter = batch.iter().any(|e| e.ack.is_some());
        if !(waiter || !appended_ok || since.elapsed() >= COMMIT_EVERY || batch.is_empty()) {
            back.extend(batch.drain(..).map(|e| e.record.into_buffer()));
            spares.give(&mut back);
            continue;
        }
        let commit = w.commit().map_err(Arc::new);
        dirty = None;
        let ok = commit.is_ok() && appended_ok;
        if !ok {
            warn!(error = ?commit.as_ref().err().or(appended.iter().find_map(|r| r.as_ref().err())),
                  "audit records could not be made durable");
        }
        healthy.store(ok, Ordering::SeqCst);
        for (e, r) in batch.drain(..).zip(appended) {
            if let Some(ack) = e.ack {
                let _ = ack.send(match (&commit, r) {
                    (Err(c), _) => Err(c.clone()),
                    (Ok(()), r) => r,
                });
            }
            back.push(e.record.into_buffer());
        }
        spares.give(&mut back);
        committed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &std::path::Path) -> Arc<AuditLog> {
        let key = crate::audit::load_or_create_key(&dir.join("k")).unwrap();
        let w = AuditWriter::open(&dir.join("audit"), key, 1 << 20).unwrap();
        AuditLog::start(w, &AuditCfg::default()).unwrap()
    }

    #[tokio::test]
    async fn durable_records_are_on_disk_when_acknowledged() {
        let tmp = tempdir();
        let dir = tmp.path();
        let log = log(dir);
        let mut seqs = Vec::new();
        for i in 0..20 {
            seqs.push(
                log.durable(Kind::Request, &serde_json::json!({ "i": i }))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        let text = std::fs::read_to_string(dir.join("audit/seg-000001.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 20);
        assert!(log.healthy());
    }

    /// Written records' buffers come back for the next records, a bounded number of
    /// them and none too large, and a reused buffer carries nothing of its last record.
    #[tokio::test]
    async fn written_records_give_their_buffers_back_and_carry_nothing_over() {
        let tmp = tempdir();
        let dir = tmp.path();
        let log = log(dir);
        let pad = |i: usize| "x".repeat((i * 37) % 6000);
        for round in 0..4 {
            for i in round * 500..(round + 1) * 500 {
                log.record_own(Kind::Request, &serde_json::json!({"i": i, "pad": pad(i)}));
            }
            // The writer takes the queue within a round and gives the buffers back.
            tokio::time::sleep(FLUSH_EVERY * 5).await;
        }
        log.durable(
            Kind::Request,
            &serde_json::json!({"i": 2000, "pad": pad(2000)}),
        )
        .await
        .unwrap();
        // The buffers come back after the acknowledgement.
        let mut kept = 0;
        for _ in 0..100 {
            kept = log.spares.0.lock().unwrap().len();
            if kept > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(kept > 0 && kept <= SPARES, "{kept}");
        let big = log
            .spares
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.capacity() > SPARE_MAX_BYTES);
        assert!(!big, "a buffer over {SPARE_MAX_BYTES} bytes was kept");
        // Read by the audit reader, which skips a line that is not JSON: a reused
        // buffer's leftovers would show as a missing record, or a record not as written.
        let entries = crate::audit::read::read_all(&dir.join("audit")).unwrap();
        assert_eq!(entries.len(), 2001);
        for (e, i) in entries.iter().zip(0..) {
            assert_eq!(e.record["i"], i, "{:?}", e.record);
            assert_eq!(e.record["pad"], pad(i).as_str(), "record {i}");
        }
    }

    /// Records are encoded into a buffer given back, not a new one: one buffer,
    /// marked by its size, goes round and is all the spares there are afterwards.
    #[tokio::test]
    async fn records_are_encoded_into_the_buffers_given_back() {
        let tmp = tempdir();
        let log = log(tmp.path());
        log.spares.give(&mut vec![Vec::with_capacity(3000)]);
        // Until the last record's buffer is back (after its acknowledgement, or the
        // writer's next round).
        let back = || async {
            for _ in 0..200 {
                if !log.spares.0.lock().unwrap().is_empty() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            panic!("no buffer came back");
        };
        for i in 0..3 {
            log.durable(Kind::Request, &serde_json::json!({ "i": i }))
                .await
                .unwrap();
            back().await;
            log.record_own(Kind::Request, &serde_json::json!({ "j": i }));
            back().await;
        }
        let caps: Vec<usize> = log
            .spares
            .0
            .lock()
            .unwrap()
            .iter()
            .map(Vec::capacity)
            .collect();
        assert_eq!(caps, [3000], "a buffer was made where one was given back");
    }

    /// At most SPARES buffers are kept, none larger than SPARE_MAX_BYTES.
    #[test]
    fn spares_are_bounded() {
        let spares = Spares::new();
        let mut bufs: Vec<Vec<u8>> = (0..SPARES + 100)
            .map(|i| Vec::with_capacity(if i % 2 == 0 { 64 } else { SPARE_MAX_BYTES + 1 }))
            .collect();
        spares.give(&mut bufs);
        assert!(bufs.is_empty());
        assert_eq!(spares.0.lock().unwrap().len(), (SPARES + 100) / 2);
        let mut more: Vec<Vec<u8>> = (0..SPARES).map(|_| Vec::with_capacity(64)).collect();
        spares.give(&mut more);
        assert!(more.is_empty());
        let kept = spares.0.lock().unwrap();
        assert_eq!(kept.len(), SPARES);
        assert!(kept.iter().all(|b| b.capacity() <= SPARE_MAX_BYTES));
    }

    #[tokio::test]
    async fn queued_records_are_committed_within_the_interval() {
        let tmp = tempdir();
        let dir = tmp.path();
        let log = log(dir);
        for i in 0..5 {
            log.record(Kind::Request, &i);
        }
        tokio::time::sleep(COMMIT_EVERY * 3).await;
        let key = std::fs::read_to_string(dir.join("k.pub")).unwrap();
        let r =
            crate::audit::verify(&dir.join("audit"), &hex::decode(key.trim()).unwrap()).unwrap();
        assert!(
            r.problems.is_empty() && r.unsigned_tail == 0 && r.records == 5,
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn an_unwritable_log_fails_durable_records_and_reports_unhealthy() {
        let tmp = tempdir();
        let dir = tmp.path();
        let log = log(dir);
        log.durable(Kind::Request, &serde_json::json!(1))
            .await
            .unwrap();
        // The directory goes away under the writer: the head cannot be rewritten.
        std::fs::remove_dir_all(dir.join("audit")).unwrap();
        let r = log.durable(Kind::Request, &serde_json::json!(2)).await;
        assert!(r.is_err(), "{r:?}");
        assert!(!log.healthy());
    }

    /// While records are pending, the writer takes the queue only every FLUSH_EVERY;
    /// a record someone waits for (a mutation's) must not wait for that round. On
    /// tmpfs (fsync costs nothing there), so the figure is the writer's own delay.
    #[tokio::test]
    async fn a_waited_record_wakes_the_writer_between_rounds() {
        let tmp = shm_dir();
        let dir = tmp.path();
        let log = log(dir);
        let mut lat = Vec::new();
        for i in 0..20 {
            // A record nobody waits for: the writer takes it and then sleeps out its
            // round with it uncommitted.
            log.record(Kind::Request, &i);
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let t0 = std::time::Instant::now();
            log.durable(Kind::Request, &serde_json::json!(i))
                .await
                .expect("durable");
            lat.push(t0.elapsed());
        }
        lat.sort();
        assert!(
            lat[lat.len() / 2] < FLUSH_EVERY / 2,
            "median acknowledgement {:?} (round {FLUSH_EVERY:?}); all: {lat:?}",
            lat[lat.len() / 2]
        );
    }

    /// A record nobody waits for reaches the file within a round (FLUSH_EVERY), not
    /// only at the commit (COMMIT_EVERY): a daemon crash keeps what was written.
    #[tokio::test]
    async fn a_queued_record_is_written_within_a_round() {
        let tmp = shm_dir();
        let dir = tmp.path();
        let log = log(dir);
        let lines = || segment_lines(dir);
        // The first record wakes the writer from its sleep on the queue; it is then
        // between rounds, with that record uncommitted.
        log.record(Kind::Request, &0);
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        let t0 = std::time::Instant::now();
        log.record(Kind::Request, &1);
        while lines() < 2 && t0.elapsed() < COMMIT_EVERY {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let took = t0.elapsed();
        assert!(
            took < COMMIT_EVERY / 2,
            "written after {took:?} (round {FLUSH_EVERY:?}, commit {COMMIT_EVERY:?})"
        );
    }

    /// A record queued while the writer sleeps towards a commit with nothing to write
    /// (a round found nothing) wakes it: it reaches the file within a round, not at
    /// the commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_after_a_quiet_round_wakes_the_writer() {
        let tmp = shm_dir();
        let dir = tmp.path();
        let log = log(dir);
        let lines = || segment_lines(dir);
        let mut took = Vec::new();
        for i in 0..3 {
            // A record, then quiet past a round: the writer sleeps until its commit.
            let before = lines();
            log.record(Kind::Request, &(i * 2));
            tokio::time::sleep(FLUSH_EVERY * 3).await;
            assert_eq!(lines(), before + 1);
            let t0 = std::time::Instant::now();
            log.record(Kind::Request, &(i * 2 + 1));
            while lines() < before + 2 && t0.elapsed() < COMMIT_EVERY * 2 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            took.push(t0.elapsed());
            // Past the commit: the next round starts from a sleep on the queue.
            tokio::time::sleep(COMMIT_EVERY * 2).await;
        }
        took.sort();
        // The median of three: one slow wake-up on a busy host is not the behaviour.
        assert!(
            took[1] < FLUSH_EVERY * 2,
            "written after {took:?} (round {FLUSH_EVERY:?}, commit {COMMIT_EVERY:?})"
        );
    }

    /// Lines in the log's first segment so far (none before the writer creates it).
    fn segment_lines(dir: &std::path::Path) -> usize {
        std::fs::read_to_string(dir.join("audit/seg-000001.jsonl")).map_or(0, |t| t.lines().count())
    }

    fn shm_dir() -> tempfile::TempDir {
        let shm = std::path::Path::new("/dev/shm");
        assert!(
            shm.is_dir(),
            "this test needs /dev/shm (tmpfs) to time the writer without disk syncs"
        );
        tempfile::Builder::new()
            .prefix("pc-auditlog-")
            .tempdir_in(shm)
            .expect("shm dir")
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("pc-auditlog-")
            .tempdir()
            .unwrap()
    }
}
