//! Typed access to the pinned maps. Opening by pin path works the same whether this
//! daemon loaded the programs, adopted them, or is a CLI command run beside it.
use std::{net::SocketAddr, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use portcullis_common::{
    ConnRecord, Enrollment, Protection, Settings, SockKey, StickyAgent, maps as names,
};

use super::KernelError;

pub struct PinnedMaps {
    pub agent_cgroups: HashMap<MapData, u64, Enrollment>,
    pub protected: HashMap<MapData, SockKey, Protection>,
    pub settings: Array<MapData, Settings>,
    pub conn_by_client: HashMap<MapData, SockKey, ConnRecord>,
    /// Kept by the kernel (getpeername answers from it); opened so a missing pin is
    /// reported like the others.
    #[allow(dead_code)]
    pub conn_by_cookie: HashMap<MapData, u64, ConnRecord>,
    pub sticky: HashMap<MapData, u32, StickyAgent>,
}

fn open(dir: &Path, name: &str) -> Result<Map, KernelError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| KernelError::Map {
        map: name.into(),
        message: format!(
            "opening pin {}: {e} (is the daemon installed? run `portcullis run` once)",
            path.display()
        ),
    })?;
    Map::from_map_data(data).map_err(|e| KernelError::Map {
        map: name.into(),
        message: e.to_string(),
    })
}

fn merr(name: &str) -> impl Fn(aya::maps::MapError) -> KernelError + '_ {
    move |e| KernelError::Map {
        map: name.into(),
        message: e.to_string(),
    }
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<PinnedMaps, KernelError> {
        Ok(PinnedMaps {
            agent_cgroups: HashMap::try_from(open(dir, names::AGENT_CGROUPS)?)
                .map_err(merr(names::AGENT_CGROUPS))?,
            protected: HashMap::try_from(open(dir, names::PROTECTED)?)
                .map_err(merr(names::PROTECTED))?,
            settings: Array::try_from(open(dir, names::SETTINGS)?)
                .map_err(merr(names::SETTINGS))?,
            conn_by_client: HashMap::try_from(open(dir, names::CONN_BY_CLIENT)?)
                .map_err(merr(names::CONN_BY_CLIENT))?,
            conn_by_cookie: HashMap::try_from(open(dir, names::CONN_BY_COOKIE)?)
                .map_err(merr(names::CONN_BY_COOKIE))?,
            sticky: HashMap::try_from(open(dir, names::STICKY_TASKS)?)
                .map_err(merr(names::STICKY_TASKS))?,
        })
    }

    pub fn open_events(dir: &Path) -> Result<RingBuf<MapData>, KernelError> {
        RingBuf::try_from(open(dir, names::EVENTS)?).map_err(merr(names::EVENTS))
    }

    pub fn write_settings(&mut self, s: &Settings) -> Result<(), KernelError> {
        self.settings.set(0, s, 0).map_err(merr(names::SETTINGS))
    }

    pub fn enroll(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.agent_cgroups
            .insert(cgroup_id, Enrollment { enrolled_at: now }, 0)
            .map_err(merr(names::AGENT_CGROUPS))
    }

    /// Removes the cgroup and the sticky marks of processes first seen in it.
    /// Returns whether it was enrolled.
    pub fn unenroll(&mut self, cgroup_id: u64) -> Result<bool, KernelError> {
        let was = self.agent_cgroups.get(&cgroup_id, 0).is_ok();
        if was {
            self.agent_cgroups
                .remove(&cgroup_id)
                .map_err(merr(names::AGENT_CGROUPS))?;
        }
        let stale: Vec<u32> = self
            .sticky
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.agent_cgroup == cgroup_id)
            .map(|(k, _)| k)
            .collect();
        for tgid in stale {
            let _ = self.sticky.remove(&tgid);
        }
        Ok(was)
    }

    pub fn enrolled(&self) -> Vec<u64> {
        self.agent_cgroups.keys().filter_map(Result::ok).collect()
    }

    pub fn protect(&mut self, key: SockKey, id: u32) -> Result<(), KernelError> {
        self.protect_with(key, id, 0)
    }

    /// With [`portcullis_common::protection_flags`] (e.g. refuse instead of redirect).
    pub fn protect_with(&mut self, key: SockKey, id: u32, flags: u32) -> Result<(), KernelError> {
        self.protected
            .insert(key, Protection { id, flags }, 0)
            .map_err(merr(names::PROTECTED))
    }

    /// Every protected endpoint with its protection.
    pub fn protections(&self) -> Vec<(SockKey, Protection)> {
        self.protected.iter().filter_map(Result::ok).collect()
    }

    pub fn unprotect(&mut self, key: &SockKey) -> Result<bool, KernelError> {
        match self.protected.remove(key) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(merr(names::PROTECTED)(e)),
        }
    }

    /// The kernel's record for a connection accepted from `peer`, taken (removed) from
    /// the client map. The cookie-keyed original stays until the agent's socket closes
    /// (its getpeername needs it).
    pub fn take_conn(&mut self, peer: SocketAddr) -> Result<Option<ConnRecord>, KernelError> {
        let key = SockKey::from(peer);
        // The entry is a copy of the connect-time record, so it is there even when the
        // agent's socket (and with it the cookie-keyed record) is already gone.
        let rec = match self.conn_by_client.get(&key, 0) {
            Ok(r) => r,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(merr(names::CONN_BY_CLIENT)(e)),
        };
        let _ = self.conn_by_client.remove(&key);
        Ok(Some(rec))
    }
}
