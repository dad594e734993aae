//! Fair shares: how many connections and in-flight requests each agent (its enrolled
//! cgroup, i.e. its pod; or its address for a connection the kernel did not redirect)
//! and all agents together may hold (`proxy.limits`). A greedy agent reaches its own
//! cap and is refused there (connections closed, requests answered 429) while the
//! others keep their share; the total cap bounds the daemon's descriptors and memory.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::{
    config::Limits,
    kernel::ConnOrigin,
    util::{BoxError, ProxyBody},
};

/// Who an agent is, for its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum AgentKey {
    Cgroup(u64),
    Addr(IpAddr),
}

impl AgentKey {
    pub(super) fn of(origin: Option<&ConnOrigin>, peer: IpAddr) -> AgentKey {
        match origin {
            Some(o) => AgentKey::Cgroup(o.origin.agent_cgroup_id),
            None => AgentKey::Addr(peer),
        }
    }
}

#[derive(Default)]
struct Counts {
    total_conns: usize,
    conns: HashMap<AgentKey, usize>,
    requests: HashMap<AgentKey, usize>,
}

/// Why a connection or request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    Total(usize),
    Agent(usize),
}

impl Full {
    pub(super) fn cap(self) -> usize {
        match self {
            Full::Total(n) | Full::Agent(n) => n,
        }
    }
}

/// A response body that keeps `guard` until the body ends or is dropped.
struct Held<G> {
    inner: ProxyBody,
    _guard: G,
}

impl<G: Unpin> http_body::Body for Held<G> {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `resp` with `guard` held for as long as its body lives.
pub(super) fn hold<G: Unpin + Send + Sync + 'static>(
    resp: http::Response<ProxyBody>,
    guard: G,
) -> http::Response<ProxyBody> {
    resp.map(|inner| {
        http_body_util::combinators::BoxBody::new(Held {
            inner,
            _guard: guard,
        })
    })
}

pub(super) struct Admission {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

/// Held for a connection's life.
pub(super) struct ConnPermit {
    key: AgentKey,
    counts: Arc<Mutex<Counts>>,
}

/// Held until a request's response body ends (a watch holds it for its whole life).
pub(super) struct RequestPermit {
    key: AgentKey,
    counts: Arc<Mutex<Counts>>,
}

fn lock(c: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

fn release(map: &mut HashMap<AgentKey, usize>, key: &AgentKey) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Admission {
    pub(super) fn new(limits: &Limits) -> Admission {
        Admission {
            limits: limits.clone(),
            counts: Arc::new(Mutex::new(Counts::default())),
        }
    }

    pub(super) fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(super) fn connection(&self, key: AgentKey) -> Result<ConnPermit, Full> {
        let mut c = lock(&self.counts);
        if c.total_conns >= self.limits.max_connections {
            return Err(Full::Total(self.limits.max_connections));
        }
        let n = c.conns.entry(key).or_insert(0);
        if *n >= self.limits.max_connections_per_agent {
            return Err(Full::Agent(self.limits.max_connections_per_agent));
        }
        *n += 1;
        c.total_conns += 1;
        Ok(ConnPermit {
            key,
            counts: self.counts.clone(),
        })
    }

    pub(super) fn request(&self, key: AgentKey) -> Result<RequestPermit, Full> {
        let mut c = lock(&self.counts);
        let n = c.requests.entry(key).or_insert(0);
        if *n >= self.limits.max_requests_per_agent {
            return Err(Full::Agent(self.limits.max_requests_per_agent));
        }
        *n += 1;
        Ok(RequestPermit {
            key,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total_conns = c.total_conns.saturating_sub(1);
        release(&mut c.conns, &self.key);
    }
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        release(&mut lock(&self.counts).requests, &self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 3,
            max_connections_per_agent: 2,
            max_requests_per_agent: 2,
            ..Limits::default()
        }
    }

    #[test]
    fn shares_per_agent_and_in_total() {
        let a = Admission::new(&limits());
        let (x, y, z) = (
            AgentKey::Cgroup(1),
            AgentKey::Cgroup(2),
            AgentKey::Cgroup(3),
        );
        let x1 = a.connection(x).unwrap();
        let _x2 = a.connection(x).unwrap();
        assert_eq!(a.connection(x).err(), Some(Full::Agent(2)));
        let _y1 = a.connection(y).unwrap();
        assert_eq!(a.connection(z).err(), Some(Full::Total(3)));
        drop(x1);
        let _z1 = a.connection(z).unwrap();
        let r1 = a.request(x).unwrap();
        let _r2 = a.request(x).unwrap();
        assert!(a.request(x).is_err());
        assert!(a.request(y).is_ok());
        drop(r1);
        assert!(a.request(x).is_ok());
    }
}
