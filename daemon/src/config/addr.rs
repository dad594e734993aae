//! Addresses in the config: where the daemon listens, and the endpoints it protects.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, de};

/// A listen address that can be a connect target: a specific IP and a non-zero port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcreteAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ConcreteAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let sa: SocketAddr = s.parse().map_err(|_| {
            de::Error::custom(format!(
                "`{s}` is not an address: expected IP:PORT (IPv6 as [ADDR]:PORT)"
            ))
        })?;
        if sa.ip().is_unspecified() || sa.port() == 0 {
            return Err(de::Error::custom(format!(
                "`{s}` cannot be a redirect target: give a specific IP and a non-zero port"
            )));
        }
        Ok(ConcreteAddr(sa))
    }
}

/// A protected endpoint: an address and a port, or every port (`*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `None` for every port.
    pub port: Option<u16>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (IpAddr::V4(ip), Some(p)) => write!(f, "{ip}:{p}"),
            (IpAddr::V6(ip), Some(p)) => write!(f, "[{ip}]:{p}"),
            (IpAddr::V4(ip), None) => write!(f, "{ip}:*"),
            (IpAddr::V6(ip), None) => write!(f, "[{ip}]:*"),
        }
    }
}

/// A string that is not an endpoint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("`{0}` is not an endpoint: expected IP:PORT, [IPv6]:PORT, IP:* or [IPv6]:*")]
    Form(String),
    #[error("`{0}`: the unspecified address cannot be protected")]
    Unspecified(String),
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EndpointError::Form(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip: IpAddr = host.parse().map_err(|_| bad())?;
        if ip.is_unspecified() {
            return Err(EndpointError::Unspecified(s.to_owned()));
        }
        let port = match port {
            "*" => None,
            p => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad()),
                Ok(p) => Some(p),
            },
        };
        // A mapped IPv6 spelling of an IPv4 address is the IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        Ok(Endpoint { ip, port })
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}
