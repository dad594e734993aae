//! The request head rewrite: what describes one hop (RFC 9110 7.6.1) never crosses,
//! and nothing the agent sent to claim an identity reaches the API server; the
//! daemon impersonates the subject's scoped identity instead.
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// Headers that describe one hop and never cross a proxy (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

// Names made once, not parsed from a string for every request.
const IMPERSONATE_USER: HeaderName = HeaderName::from_static("impersonate-user");
const IMPERSONATE_GROUP: HeaderName = HeaderName::from_static("impersonate-group");

/// The upstream identity a request is impersonated as, as header values. Made once
/// per identity and shared: a clone is a reference count, and the values' bytes are
/// shared with every request head they go into.
#[derive(Debug, Clone)]
pub struct Impersonation(Arc<Values>);

#[derive(Debug)]
struct Values {
    user: HeaderValue,
    groups: Vec<HeaderValue>,
}

impl Impersonation {
    pub fn new(user: &str, groups: &[String]) -> Impersonation {
        Impersonation(Arc::new(Values {
            user: header_value(user),
            groups: groups.iter().map(|g| header_value(g)).collect(),
        }))
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| {
        // Non-visible characters cannot be sent; config validation keeps them out.
        HeaderValue::from_static("invalid")
    })
}

/// Removes hop-by-hop headers, including any the Connection header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most requests carry none (HTTP/2 forbids them): one pass over the names present
    // instead of a lookup (a parse and a hash) per name in the list.
    if !h.keys().any(|k| HOP_BY_HOP.contains(&k.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

/// The identity headers: everything the agent sent to claim an identity out; the
/// daemon's own credential (if it uses a token) and the impersonation in.
pub(super) fn impersonate(h: &mut HeaderMap, credential: Option<HeaderValue>, imp: &Impersonation) {
    strip_identity(h);
    if let Some(c) = credential {
        h.insert(header::AUTHORIZATION, c);
    }
    h.insert(IMPERSONATE_USER, imp.0.user.clone());
    // Repeated headers: a comma-joined value would be read as ONE group.
    for g in &imp.0.groups {
        h.append(IMPERSONATE_GROUP, g.clone());
    }
}

/// Removes everything an agent could use to claim an identity upstream.
fn strip_identity(h: &mut HeaderMap) {
    h.remove(header::AUTHORIZATION);
    let imp: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for k in imp {
        h.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer agent"));
        h.insert("impersonate-user", HeaderValue::from_static("system:admin"));
        h.append(
            "impersonate-group",
            HeaderValue::from_static("system:masters"),
        );
        h.insert("impersonate-extra-scopes", HeaderValue::from_static("x"));
        h.insert("impersonate-uid", HeaderValue::from_static("1"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        strip_identity(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"]);
    }

    #[test]
    fn each_hop_by_hop_header_is_removed_alone() {
        for n in HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert("accept", HeaderValue::from_static("application/json"));
            h.insert(*n, HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h);
            let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, vec!["accept"], "{n}");
        }
        // What Connection names goes too, and nothing else.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("X-Hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }
}
