//! Append-only JSON-lines files (kernel events, accepted connections). Records are
//! buffered and flushed whenever the daemon's queue runs empty, so a burst costs one
//! write per batch; a crash can cut only the last line, which readers skip.
use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use serde::Serialize;

pub struct JsonlWriter {
    path: PathBuf,
    file: BufWriter<File>,
    /// Bytes in the current file.
    size: u64,
    /// Rotate past this many bytes, keeping `keep` rotated files (`PATH.1` newest).
    rotate: Option<(u64, u32)>,
}

impl JsonlWriter {
    pub fn open(path: &Path) -> std::io::Result<JsonlWriter> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(JsonlWriter {
            path: path.to_owned(),
            file: BufWriter::with_capacity(64 * 1024, file),
            size,
            rotate: None,
        })
    }

    /// A log that never takes more than `max_bytes * (keep + 1)` on disk: past
    /// `max_bytes` the file becomes `PATH.1` (`.1` becomes `.2`, ...; the oldest goes).
    pub fn open_rotating(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<JsonlWriter> {
        let mut w = Self::open(path)?;
        w.rotate = Some((max_bytes.max(4096), keep));
        Ok(w)
    }

    pub fn append<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        if let Some((max, keep)) = self.rotate
            && self.size > 0
            && self.size + line.len() as u64 > max
        {
            self.rotate_now(keep)?;
        }
        self.size += line.len() as u64;
        self.file.write_all(&line)
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate_now(&mut self, keep: u32) -> std::io::Result<()> {
        self.file.flush()?;
        if keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(self.rotated(keep));
            for n in (1..keep).rev() {
                let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.file = BufWriter::with_capacity(64 * 1024, file);
        self.size = 0;
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;

    #[test]
    fn a_rotating_log_stays_within_its_budget() {
        let dir = std::env::temp_dir().join(format!("pc-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let mut w = JsonlWriter::open_rotating(&path, 4096, 2).unwrap();
        for i in 0..10_000u32 {
            w.append(&serde_json::json!({"i": i, "pad": "x".repeat(50)}))
                .unwrap();
        }
        w.flush().unwrap();
        let total: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 4096 * 3, "{total} bytes on disk");
        assert!(dir.join("events.jsonl.2").exists());
        assert!(!dir.join("events.jsonl.3").exists());
        // The newest record is in the current file.
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.contains("\"i\":9999"), "{last}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
