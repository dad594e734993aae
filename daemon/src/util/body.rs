//! The body type of every request and response that crosses the proxy.
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body that crosses the proxy, in either direction.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// No body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|n| match n {}).boxed()
}

/// A body of these bytes.
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}
