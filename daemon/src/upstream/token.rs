//! The daemon's own bearer token, re-read when the file changes (projected
//! service-account tokens rotate).
use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use http::HeaderValue;

use super::UpstreamError;

/// How often a token file is checked for rotation.
const TOKEN_RECHECK: Duration = Duration::from_secs(30);

/// A bearer token file, re-read when its modification time changes.
pub(super) struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenState>,
}

struct TokenState {
    value: HeaderValue,
    mtime: Option<SystemTime>,
    checked: Instant,
}

impl TokenFile {
    pub(super) fn new(path: &Path) -> Result<Self, UpstreamError> {
        let (value, mtime) = Self::read(path)?;
        Ok(TokenFile {
            path: path.to_owned(),
            state: Mutex::new(TokenState {
                value,
                mtime,
                checked: Instant::now(),
            }),
        })
    }

    fn read(path: &Path) -> Result<(HeaderValue, Option<SystemTime>), UpstreamError> {
        let rerr = |source| UpstreamError::Read {
            what: "token file",
            path: path.to_owned(),
            source,
        };
        let mtime = std::fs::metadata(path).map_err(rerr)?.modified().ok();
        let text = std::fs::read_to_string(path).map_err(rerr)?;
        let mut v = HeaderValue::from_str(&format!("Bearer {}", text.trim())).map_err(|_| {
            UpstreamError::BadToken {
                path: path.to_owned(),
            }
        })?;
        v.set_sensitive(true);
        Ok((v, mtime))
    }

    pub(super) fn bearer(&self) -> Result<HeaderValue, UpstreamError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.checked.elapsed() >= TOKEN_RECHECK {
            st.checked = Instant::now();
            let mtime = std::fs::metadata(&self.path)
                .ok()
                .and_then(|m| m.modified().ok());
            if mtime != st.mtime {
                // A rotation in progress may leave the file briefly unreadable: keep the
                // old token and try again at the next check.
                if let Ok((v, m)) = Self::read(&self.path) {
                    st.value = v;
                    st.mtime = m;
                }
            }
        }
        Ok(st.value.clone())
    }
}
