//! Ships the audit chain to an HTTP collector. The segments on disk are the spool: the
//! shipper reads records after its cursor (the last sequence number the collector
//! acknowledged, kept in `sink.cursor`), posts them in batches (a JSON array of the
//! chained lines, so the collector can check the chain itself), and moves the cursor
//! only on a 2xx. While the collector is down nothing is dropped: records wait in the
//! segments and go out, in order, when it answers again. Only committed (durable)
//! records are shipped: a segment's signed head bounds what is read, and each batch
//! ends with that head (`{"head": {...}}`), so the collector holds signed anchors
//! the node cannot take back (see `anchor`).
use std::{
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tracing::{info, warn};

use super::{Head, head_path, list_segments, seg_path};
use crate::{
    config::AuditSink,
    tls::{self, HttpClient},
};

pub struct Shipper {
    client: HttpClient,
    url: String,
    dir: PathBuf,
    batch: usize,
    /// Where the next unread line starts: (segment, byte offset, its seq).
    pos: Option<(u64, u64)>,
}

impl Shipper {
    pub fn new(cfg: &AuditSink, dir: &Path) -> Result<Shipper, tls::HttpError> {
        Ok(Shipper {
            client: tls::https_client(cfg.ca_file.as_deref(), true)?,
            url: cfg.url.clone(),
            dir: dir.to_owned(),
            batch: cfg.batch.max(1),
            pos: None,
        })
    }

    fn cursor_path(&self) -> PathBuf {
        self.dir.join("sink.cursor")
    }

    fn cursor(&self) -> u64 {
        std::fs::read_to_string(self.cursor_path())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn save_cursor(&self, seq: u64) -> std::io::Result<()> {
        let p = self.cursor_path();
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, seq.to_string())?;
        std::fs::rename(&tmp, &p)
    }

    /// Committed lines with seq > `after`, at most `self.batch`, then the signed head
    /// that covers them: (last seq, lines).
    fn read_after(&mut self, after: u64) -> std::io::Result<Option<(u64, Vec<String>)>> {
        let batch = self.read_records(after)?;
        Ok(batch.map(|(last, mut lines, head)| {
            if let Ok(h) = serde_json::to_string(&head) {
                lines.push(format!("{{\"head\":{h}}}"));
            }
            (last, lines)
        }))
    }

    fn read_records(&mut self, after: u64) -> std::io::Result<Option<(u64, Vec<String>, Head)>> {
        let mut lines = Vec::new();
        let mut last = after;
        let mut covering: Option<Head> = None;
        for n in list_segments(&self.dir)? {
            let head: Head = match std::fs::read(head_path(&self.dir, n))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(h) => h,
                None => continue,
            };
            if head.last_seq <= last {
                continue;
            }
            let mut f = std::fs::File::open(seg_path(&self.dir, n))?;
            let start = match self.pos {
                Some((seg, off)) if seg == n => off,
                _ => 0,
            };
            f.seek(SeekFrom::Start(start))?;
            let mut r = BufReader::new(f);
            let mut off = start;
            let mut line = String::new();
            loop {
                line.clear();
                let k = r.read_line(&mut line)?;
                if k == 0 || !line.ends_with('\n') {
                    break;
                }
                let seq = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["seq"].as_u64())
                    .unwrap_or(0);
                if seq > head.last_seq {
                    break; // appended but not yet committed
                }
                off += k as u64;
                if seq > last {
                    lines.push(line.trim_end().to_owned());
                    last = seq;
                    self.pos = Some((n, off));
                    covering = Some(head.clone());
                    if lines.len() >= self.batch {
                        return Ok(Some((last, lines, head)));
                    }
                }
            }
        }
        Ok(covering
            .filter(|_| !lines.is_empty())
            .map(|h| (last, lines, h)))
    }

    pub async fn run(mut self, committed: Arc<tokio::sync::Notify>) {
        let mut cursor = self.cursor();
        let mut backoff = Duration::from_secs(1);
        info!(url = %self.url, cursor, "shipping audit records");
        loop {
            let batch = match self.read_after(cursor) {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "reading audit segments for the sink");
                    None
                }
            };
            let Some((last, lines)) = batch else {
                tokio::select! {
                    _ = committed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                continue;
            };
            let mut body = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 2);
            body.push(b'[');
            for (i, l) in lines.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(l.as_bytes());
            }
            body.push(b']');
            match tls::post_json(&self.client, &self.url, body).await {
                Ok(_) => {
                    cursor = last;
                    if let Err(e) = self.save_cursor(cursor) {
                        warn!(error = %e, "saving the audit sink cursor");
                    }
                    backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    warn!(error = %e, records = lines.len(), retry_in_s = backoff.as_secs(),
                          "audit sink unavailable; records stay in the segments");
                    // Re-read from the cursor next time.
                    self.pos = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}
