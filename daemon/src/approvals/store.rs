//! Durable state for approvals and grants. A trait, so a cluster-wide store (e.g. a
//! CRD or a database) can replace the embedded one; the embedded store is redb, a
//! crash-safe single-file database in the state directory (every write is one fsynced
//! transaction).
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Approval, Grant};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("approval store: {}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("approval store: {0}")]
    Db(#[from] redb::Error),
    #[error("approval store: record {key}: {source}")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("approval store: {0}")]
    Encode(#[source] serde_json::Error),
    /// The blocking thread that writes the store did not finish (runtime shutting down).
    #[error("approval store: the write did not finish: {0}")]
    Interrupted(String),
    /// The approvals log beside the store.
    #[error("approval store: {}: {source}", path.display())]
    Journal {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

pub trait Store: Send + Sync {
    fn put_approval(&self, a: &Approval) -> Result<(), StoreError>;
    fn put_grant(&self, g: &Grant) -> Result<(), StoreError>;
    /// Writes both in one transaction (an approval and the grant it created).
    fn put_both(&self, a: &Approval, g: &Grant) -> Result<(), StoreError>;
    fn approvals(&self) -> Result<Vec<Approval>, StoreError>;
    fn grants(&self) -> Result<Vec<Grant>, StoreError>;
}

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");

pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(APPROVALS).map_err(err)?;
        tx.open_table(GRANTS).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(RedbStore { db })
    }

    fn write(&self, items: &[(Table, &str, Vec<u8>)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        for (table, key, value) in items {
            let mut t = tx.open_table(*table).map_err(err)?;
            t.insert(*key, value.as_slice()).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    fn all<T: serde::de::DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(table).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            out.push(
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Record {
                    key: k.value().to_owned(),
                    source,
                })?,
            );
        }
        Ok(out)
    }
}

impl Store for RedbStore {
    fn put_approval(&self, a: &Approval) -> Result<(), StoreError> {
        self.write(&[(
            APPROVALS,
            &a.id,
            serde_json::to_vec(a).map_err(StoreError::Encode)?,
        )])
    }
    fn put_grant(&self, g: &Grant) -> Result<(), StoreError> {
        self.write(&[(
            GRANTS,
            &g.id,
            serde_json::to_vec(g).map_err(StoreError::Encode)?,
        )])
    }
    fn put_both(&self, a: &Approval, g: &Grant) -> Result<(), StoreError> {
        self.write(&[
            (
                APPROVALS,
                &a.id,
                serde_json::to_vec(a).map_err(StoreError::Encode)?,
            ),
            (
                GRANTS,
                &g.id,
                serde_json::to_vec(g).map_err(StoreError::Encode)?,
            ),
        ])
    }
    fn approvals(&self) -> Result<Vec<Approval>, StoreError> {
        self.all(APPROVALS)
    }
    fn grants(&self) -> Result<Vec<Grant>, StoreError> {
        self.all(GRANTS)
    }
}
