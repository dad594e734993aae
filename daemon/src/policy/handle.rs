//! The live policy: swapped atomically when the file changes and parses; a bad edit
//! keeps the previous policy and is reported.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tracing::{error, info};

use super::{Policy, PolicyError};

pub struct PolicyHandle {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
    last_error: RwLock<Option<String>>,
}

impl PolicyHandle {
    pub fn load(path: &Path) -> Result<Arc<PolicyHandle>, PolicyError> {
        let p = Policy::load(path)?;
        info!(path = %path.display(), name = %p.name, rules = p.rules.len(), "policy loaded");
        Ok(Arc::new(PolicyHandle {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(p)),
            last_error: RwLock::new(None),
        }))
    }

    pub fn get(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rereads the file; true if a new policy is in force.
    pub fn reload(&self) -> bool {
        match Policy::load(&self.path) {
            Ok(p) => {
                info!(path = %self.path.display(), name = %p.name, rules = p.rules.len(), "policy reloaded");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
                *self.last_error.write().unwrap_or_else(|p| p.into_inner()) = None;
                true
            }
            Err(e) => {
                error!(error = %e, "policy change refused; the previous policy stays in force");
                *self.last_error.write().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                false
            }
        }
    }

    /// Polls the file (content hash through symlinks, as ConfigMap mounts swap them)
    /// and reloads on change.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let fingerprint = |p: &Path| -> Option<(SystemTime, Vec<u8>)> {
            let m = std::fs::metadata(p).ok()?;
            let text = std::fs::read(p).ok()?;
            use sha2::Digest;
            Some((m.modified().ok()?, sha2::Sha256::digest(&text).to_vec()))
        };
        let mut last = fingerprint(&self.path).map(|f| f.1);
        loop {
            tokio::time::sleep(every).await;
            let now = fingerprint(&self.path).map(|f| f.1);
            if now.is_some() && now != last {
                last = now;
                self.reload();
            }
        }
    }
}
