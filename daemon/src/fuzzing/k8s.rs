//! Request attributes from the wire, and protobuf bodies.
use crate::{k8s, mask::Masking};

/// The envelope's magic bytes (`k8s/protobuf.rs`).
const MAGIC: &[u8] = b"k8s\0";

/// `METHOD PATH[?QUERY]` (the first space splits the method off).
pub fn request_info(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (method, target) = text.split_once(' ').unwrap_or(("GET", &text));
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let first = k8s::resolve(method, path, query);
    let again = k8s::resolve(method, path, query);
    match (&first, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "resolving is deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("resolving {method} {target} once failed and once did not"),
    }
    if let Ok(info) = first {
        if info.is_resource_request && info.verb.is_empty() {
            // Only a method the API serves no resource with (the gate refuses those).
            assert!(
                !matches!(method, "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE"),
                "a resource request without a verb"
            );
        }
        // What the audit log records reads back as the same attributes.
        let json = serde_json::to_string(&info).expect("RequestInfo serializes");
        let back: k8s::RequestInfo = serde_json::from_str(&json).expect("and reads back");
        assert_eq!(back, info);
        let _ = info.upgraded();
    }
    if let Some(q) = query {
        for field in ["metadata.name", "metadata.namespace", "spec.nodeName"] {
            let _ = k8s::field_selector_value(q, field);
        }
        thread_local!(static M: Masking = Masking::new(true, None, Vec::new()));
        let masked = M.with(|m| m.mask_query(q));
        // Masking only ever replaces values: parsing the masked query again gives the
        // same keys in the same order.
        let keys = |s: &str| -> Vec<String> {
            form_urlencoded::parse(s.as_bytes())
                .map(|(k, _)| k.into_owned())
                .collect()
        };
        if masked != q {
            assert_eq!(keys(&masked), keys(q), "{q:?} masked as {masked:?}");
        }
    }
}

/// A protobuf body, with the `k8s\0` envelope magic added when it is missing.
pub fn protobuf(data: &[u8]) {
    let with_magic;
    let body = if data.starts_with(MAGIC) {
        data
    } else {
        with_magic = [MAGIC, data].concat();
        &with_magic
    };
    if let Ok(v) = k8s::protobuf_to_json(body) {
        serde_json::to_vec(&v).expect("decoded protobuf serializes as JSON");
    }
    let _ = k8s::protobuf_to_json(data);
}
