//! Every state change of an approval or grant, written where auditors read it: the
//! approvals log (`approvals.jsonl`, flushed per change) and the audit chain.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tracing::warn;

use super::{Approval, Grant, StoreError};
use crate::{
    audit::{AuditLog, Kind},
    util::{JsonlWriter, unix_secs},
};

#[derive(Serialize)]
struct AuditEvent<'a> {
    time: u64,
    event: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<&'a Approval>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant: Option<&'a Grant>,
}

pub(super) struct Journal {
    log: Mutex<JsonlWriter>,
    /// The tamper-evident chain every state change also goes to.
    chain: Option<Arc<AuditLog>>,
}

impl Journal {
    pub fn open(path: &Path) -> Result<Journal, StoreError> {
        let log = JsonlWriter::open(path).map_err(|source| StoreError::Journal {
            path: path.to_owned(),
            source,
        })?;
        Ok(Journal {
            log: Mutex::new(log),
            chain: None,
        })
    }

    pub fn chain(&mut self, log: Arc<AuditLog>) {
        self.chain = Some(log);
    }

    pub fn record(
        &self,
        event: &str,
        id: &str,
        by: Option<&str>,
        approval: Option<&Approval>,
        grant: Option<&Grant>,
    ) {
        let ev = AuditEvent {
            time: unix_secs(),
            event,
            id,
            by,
            approval,
            grant,
        };
        let mut w = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.append(&ev).and_then(|_| w.flush()) {
            warn!(error = %e, path = %w.path().display(), "writing the approvals audit log");
        }
        if let Some(c) = &self.chain {
            c.record(Kind::Approval, &ev);
        }
    }
}
