//! Userspace-only impls, behind the `user` feature.
extern crate std;

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    ConnRecord, Enrollment, Event, EventCount, EventCountKey, GuardOffsets, Origin, Protection,
    Settings, SockKey, StickyAgent,
};

// SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
// with explicit padding fields, so every bit pattern is valid and there are no
// uninitialised bytes: the contract `aya::Pod` asks for to copy them through maps.
unsafe impl aya::Pod for SockKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Protection {}
// SAFETY: as above.
unsafe impl aya::Pod for Enrollment {}
// SAFETY: as above.
unsafe impl aya::Pod for StickyAgent {}
// SAFETY: as above.
unsafe impl aya::Pod for Settings {}
// SAFETY: as above.
unsafe impl aya::Pod for Origin {}
// SAFETY: as above.
unsafe impl aya::Pod for ConnRecord {}
// SAFETY: as above.
unsafe impl aya::Pod for Event {}
// SAFETY: as above.
unsafe impl aya::Pod for GuardOffsets {}
// SAFETY: as above.
unsafe impl aya::Pod for EventCountKey {}
// SAFETY: as above.
unsafe impl aya::Pod for EventCount {}

impl SockKey {
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port)
    }

    /// True when nothing was recorded (all zero).
    pub fn is_unset(&self) -> bool {
        self.addr == [0; 16] && self.port == 0
    }
}

impl From<SocketAddr> for SockKey {
    fn from(sa: SocketAddr) -> Self {
        match sa.ip() {
            IpAddr::V4(v4) => SockKey::from_v4(v4.octets(), sa.port()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SockKey::from_v4(v4.octets(), sa.port()),
                None => SockKey::from_v6(v6.octets(), sa.port()),
            },
        }
    }
}

impl From<(Ipv4Addr, u16)> for SockKey {
    fn from((ip, port): (Ipv4Addr, u16)) -> Self {
        SockKey::from_v4(ip.octets(), port)
    }
}

impl fmt::Display for SockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port == 0 {
            write!(f, "{}:*", self.ip())
        } else {
            write!(f, "{}", self.socket_addr())
        }
    }
}

impl Origin {
    /// The process name, up to the first NUL.
    pub fn comm_str(&self) -> std::string::String {
        let end = self
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.comm.len());
        std::string::String::from_utf8_lossy(&self.comm[..end]).into_owned()
    }
}
