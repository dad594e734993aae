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
}

impl JsonlWriter {
    pub fn open(path: &Path) -> std::io::Result<JsonlWriter> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(JsonlWriter {
            path: path.to_owned(),
            file: BufWriter::with_capacity(64 * 1024, file),
        })
    }

    pub fn append<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
