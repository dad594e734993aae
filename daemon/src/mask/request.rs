//! Request bodies, in every encoding the API server takes: JSON (objects, merge and
//! strategic-merge patches, JSON patches), YAML (server-side apply), CBOR, and
//! protobuf (`kubectl create secret generic` and the other typed creates). Two uses:
//! - a write that carries a masking placeholder is found, with the field it sits in
//!   ([`find_placeholder`]), so the gate can refuse it;
//! - a body is decoded and masked before the audit log keeps it ([`masked_record`]):
//!   never stored raw.
use std::sync::Arc;

use base64::Engine;
use serde_json::Value;

use super::{JsonMasker, PLACEHOLDER, Plan};
use crate::{
    k8s,
    util::{is_json, media_type},
};

/// Text every placeholder and marker the masker writes contains:
/// `portcullis-masked` (and its fingerprinted form `portcullis-masked:…`), and the
/// detectors' `[masked]` / `[masked:kind]`.
const MARKERS: &[&[u8]] = &[PLACEHOLDER.as_bytes(), b"[masked"];

/// Shortest run of base64 characters worth decoding (`[masked` is 7 bytes).
const MIN_B64_RUN: usize = 8;

/// Whether `b` holds a marker, as it is or base64-encoded (Secret `data`, a base64
/// value inside a last-applied annotation).
fn holds_marker(b: &[u8]) -> bool {
    if MARKERS.iter().any(|m| memchr::memmem::find(b, m).is_some()) {
        return true;
    }
    let is_b64 = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'-' | b'_');
    let mut i = 0;
    while i < b.len() {
        if !is_b64(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_b64(b[i]) {
            i += 1;
        }
        let run = &b[start..i];
        if run.len() >= MIN_B64_RUN && decoded_holds_marker(run) {
            return true;
        }
    }
    false
}

/// A run of base64 characters decoded (standard or URL-safe, padded or not) and
/// searched; the encoding of a marker does not depend on what follows it, so a
/// value that starts with one is found even if it goes on.
fn decoded_holds_marker(run: &[u8]) -> bool {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let trimmed: Vec<u8> = run.iter().copied().filter(|&c| c != b'=').collect();
    // A run may start mid-value: try each of the 4 alignments.
    (0..4).any(|skip| {
        if trimmed.len() <= skip {
            return false;
        }
        let mut t = &trimmed[skip..];
        // Drop a dangling last character (no whole byte).
        if t.len() % 4 == 1 {
            t = &t[..t.len() - 1];
        }
        [STANDARD_NO_PAD, URL_SAFE_NO_PAD].iter().any(|e| {
            e.decode(t).is_ok_and(|d| {
                MARKERS
                    .iter()
                    .any(|m| memchr::memmem::find(&d, m).is_some())
            })
        })
    })
}

/// The field of a write body that carries a masking placeholder, if any
/// (`data.password`, `spec.template.spec.containers[0].env[1].value`,
/// `metadata.annotations[kubectl.kubernetes.io/last-applied-configuration]`, a JSON
/// patch operation's `path`); `the request body` when the body holds one but cannot be
/// decoded to say where.
pub fn find_placeholder(body: &[u8], content_type: &str) -> Option<String> {
    let media = media_type(content_type);
    let raw = holds_marker(body);
    if !raw && !may_hide_marker(body, &media) {
        return None;
    }
    let where_ = decode(body, &media).ok().and_then(|v| {
        if media == "application/json-patch+json" {
            patch_field(&v)
        } else {
            let mut path = String::new();
            field_of(&v, &mut path).then_some(path)
        }
    });
    match where_ {
        Some(w) => Some(w),
        None if raw => Some("the request body".to_owned()),
        None => None,
    }
}

/// Whether a marker could sit in `body` without its bytes showing it: the API server
/// stores the decoded text, so a JSON or YAML escape (`portcullis\u002dmasked`) or a
/// CBOR text or byte string sent in chunks writes the placeholder all the same. Such
/// bodies are decoded and searched.
fn may_hide_marker(body: &[u8], media: &str) -> bool {
    memchr::memchr(b'\\', body).is_some() || media == "application/cbor" || media.ends_with("+cbor")
}

/// The `path` of the first JSON-patch operation whose value holds a marker.
fn patch_field(ops: &Value) -> Option<String> {
    ops.as_array()?.iter().find_map(|op| {
        let mut p = String::new();
        field_of(op.get("value")?, &mut p).then(|| {
            let at = op.get("path").and_then(Value::as_str).unwrap_or("?");
            if p.is_empty() {
                at.to_owned()
            } else {
                format!("{at} (its value's {p})")
            }
        })
    })
}

/// Walks `v` to the first string (or key) holding a marker; `path` is then its field.
fn field_of(v: &Value, path: &mut String) -> bool {
    match v {
        Value::String(s) => holds_marker(s.as_bytes()),
        Value::Array(a) => a.iter().enumerate().any(|(i, x)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = field_of(x, path);
            if !found {
                path.truncate(len);
            }
            found
        }),
        Value::Object(o) => o.iter().any(|(k, x)| {
            let len = path.len();
            if k.contains(['.', '/', '[', ']']) || k.is_empty() {
                path.push_str(&format!("[{k}]"));
            } else {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
            let found = holds_marker(k.as_bytes()) || field_of(x, path);
            if !found {
                path.truncate(len);
            }
            found
        }),
        _ => false,
    }
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum Undecodable {
    #[error("a {media} body cannot be decoded")]
    Unknown { media: String },
    #[error("the {media} body does not parse: {why}")]
    Invalid { media: String, why: String },
}

/// A request body as JSON, from any encoding the API server takes.
pub fn decode(body: &[u8], media: &str) -> Result<Value, Undecodable> {
    let invalid = |why: String| Undecodable::Invalid {
        media: media.to_owned(),
        why,
    };
    if is_json(media) {
        serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))
    } else if media == "application/yaml" || media.ends_with("+yaml") {
        serde_yaml_ng::from_slice(body).map_err(|e| invalid(e.to_string()))
    } else if media == "application/cbor" || media.ends_with("+cbor") {
        let v: ciborium::Value = ciborium::from_reader(body).map_err(|e| invalid(e.to_string()))?;
        cbor_to_json(v).map_err(invalid)
    } else if media == "application/vnd.kubernetes.protobuf" {
        k8s::protobuf_to_json(body).map_err(|e| invalid(e.to_string()))
    } else {
        Err(Undecodable::Unknown {
            media: media.to_owned(),
        })
    }
}

/// CBOR as Kubernetes writes it, as the JSON the same object would be: byte strings
/// become base64 (as `[]byte` fields are in JSON), tags (the self-describing 55799)
/// are unwrapped. A map key that is not text is refused: Kubernetes never writes one,
/// and nested maps as keys would turn into JSON text that grows exponentially with
/// their depth.
fn cbor_to_json(v: ciborium::Value) -> Result<Value, String> {
    use ciborium::Value as C;
    Ok(match v {
        C::Null => Value::Null,
        C::Bool(b) => Value::Bool(b),
        C::Integer(i) => {
            let i = i128::from(i);
            i64::try_from(i)
                .map(Value::from)
                .or_else(|_| u64::try_from(i).map(Value::from))
                .unwrap_or_else(|_| Value::String(i.to_string()))
        }
        C::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        C::Text(s) => Value::String(s),
        C::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        C::Array(a) => Value::Array(a.into_iter().map(cbor_to_json).collect::<Result<_, _>>()?),
        C::Map(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| match k {
                    C::Text(k) => Ok((k, cbor_to_json(v)?)),
                    _ => Err("a map key that is not text".to_string()),
                })
                .collect::<Result<_, _>>()?,
        ),
        C::Tag(_, inner) => cbor_to_json(*inner)?,
        _ => Value::Null,
    })
}

/// A request body as the audit log keeps it: decoded from its encoding, masked like a
/// response of its resource (JSON patch operations as the objects they write), as
/// JSON bytes; or why it could not be (then only its size is kept).
pub fn masked_record(body: &[u8], content_type: &str, plan: &Arc<Plan>) -> Result<Vec<u8>, String> {
    let media = media_type(content_type);
    let mask = |bytes: &[u8]| -> Result<Vec<u8>, String> {
        let mut m = JsonMasker::new(plan.clone());
        let mut out = m.feed(bytes).map_err(|e| e.to_string())?;
        out.extend(m.finish().map_err(|e| e.to_string())?);
        Ok(out)
    };
    if is_json(&media) && media != "application/json-patch+json" {
        // The common case: masked as it is, no re-encoding.
        return mask(body);
    }
    let v = decode(body, &media).map_err(|e| e.to_string())?;
    if media == "application/json-patch+json" {
        return mask_patch(v, plan).map_err(|e| e.to_string());
    }
    let json = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
    mask(&json)
}

/// A JSON patch: each operation's `value` masked as what it writes, an object with
/// the value at the operation's path (`/data/k` masked as Secret data; an env
/// `value` at `/…/env/N/value` always, as the name beside it is not in the patch).
fn mask_patch(ops: Value, plan: &Arc<Plan>) -> Result<Vec<u8>, serde_json::Error> {
    let Value::Array(ops) = ops else {
        return serde_json::to_vec(
            &serde_json::json!({"omitted": "a JSON patch that is not a list"}),
        );
    };
    let masked: Vec<Value> = ops
        .into_iter()
        .map(|mut op| {
            let path = op
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if let Some(v) = op.get_mut("value") {
                *v = mask_at(&path, v.take(), plan);
            }
            op
        })
        .collect();
    serde_json::to_vec(&masked)
}

fn mask_at(pointer: &str, value: Value, plan: &Arc<Plan>) -> Value {
    let segs: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    let n = segs.len();
    if n >= 3 && segs[n - 1] == "value" && segs[n - 3] == "env" {
        return Value::String(PLACEHOLDER.to_owned());
    }
    let mut doc = value;
    for s in segs.iter().rev() {
        doc = Value::Object([(s.clone(), doc)].into_iter().collect());
    }
    let masked = serde_json::to_vec(&doc).ok().and_then(|b| {
        let mut m = JsonMasker::new(plan.clone());
        let mut out = m.feed(&b).ok()?;
        out.extend(m.finish().ok()?);
        serde_json::from_slice::<Value>(&out).ok()
    });
    let Some(mut v) = masked else {
        return Value::String(PLACEHOLDER.to_owned());
    };
    for s in &segs {
        v = match v {
            Value::Object(mut o) => o.remove(s).unwrap_or(Value::Null),
            _ => return Value::String(PLACEHOLDER.to_owned()),
        };
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::Detectors;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn placeholders_are_found_in_every_form_and_named() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                serde_json::json!({"kind": "Secret", "data": {"password": b64("portcullis-masked")}}).to_string(),
                "application/json",
                "data.password",
            ),
            (
                serde_json::json!({"data": {"k": b64("portcullis-masked:0123456789abcdef")}}).to_string(),
                "application/merge-patch+json",
                "data.k",
            ),
            (
                serde_json::json!({"spec": {"template": {"spec": {"containers": [{"env": [{"name": "A", "value": "x"}, {"name": "DB_PASSWORD", "value": "portcullis-masked"}]}]}}}}).to_string(),
                "application/strategic-merge-patch+json",
                "spec.template.spec.containers[0].env[1].value",
            ),
            (
                serde_json::json!({"metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": serde_json::json!({"data": {"k": b64("portcullis-masked")}}).to_string()}}}).to_string(),
                "application/strategic-merge-patch+json",
                "metadata.annotations[kubectl.kubernetes.io/last-applied-configuration]",
            ),
            (
                serde_json::json!({"data": {"app.properties": "db.password=[masked]\nx=y"}}).to_string(),
                "application/json",
                "data[app.properties]",
            ),
            (
                r#"[{"op":"replace","path":"/data/k","value":"cG9ydGN1bGxpcy1tYXNrZWQ="}]"#.to_owned(),
                "application/json-patch+json",
                "/data/k",
            ),
            (
                "apiVersion: v1\nkind: Secret\nstringData:\n  token: portcullis-masked\n".to_owned(),
                "application/apply-patch+yaml",
                "stringData.token",
            ),
            (
                "garbage {{ portcullis-masked".to_owned(),
                "application/json",
                "the request body",
            ),
        ];
        for (body, ctype, want) in cases {
            assert_eq!(
                find_placeholder(body.as_bytes(), ctype).as_deref(),
                Some(want),
                "{body}"
            );
        }
        // CBOR, with the Secret value as a byte string.
        let cbor = ciborium::Value::Map(vec![(
            ciborium::Value::Text("data".into()),
            ciborium::Value::Map(vec![(
                ciborium::Value::Text("k".into()),
                ciborium::Value::Bytes(b"portcullis-masked".to_vec()),
            )]),
        )]);
        let mut bytes = Vec::new();
        ciborium::into_writer(&ciborium::Value::Tag(55799, Box::new(cbor)), &mut bytes).unwrap();
        assert_eq!(
            find_placeholder(&bytes, "application/cbor").as_deref(),
            Some("data.k")
        );
        // Protobuf that cannot be decoded still cannot hide the raw text.
        assert_eq!(
            find_placeholder(
                b"k8s\0\x0a\x00portcullis-masked",
                "application/vnd.kubernetes.protobuf"
            )
            .as_deref(),
            Some("the request body")
        );
        // Encodings whose bytes do not show the marker but whose decoded text does
        // (found by the `body_decode` fuzz target's seeds): JSON and YAML escapes, and
        // CBOR strings sent in chunks.
        let mut chunked = vec![0xa1, 0x61, b'p', 0x7f, 0x6b];
        chunked.extend_from_slice(b"portcullis-");
        chunked.push(0x66);
        chunked.extend_from_slice(b"masked");
        chunked.push(0xff);
        for (body, ctype, want) in [
            (
                br#"{"data":{"p":"portcullis\u002dmasked"}}"#.to_vec(),
                "application/merge-patch+json",
                "data.p",
            ),
            (
                br#"{"data":{"k":"cG9ydGN1bGxp\u0063y1tYXNrZWQ="}}"#.to_vec(),
                "application/json",
                "data.k",
            ),
            (
                b"stringData:\n  token: \"portcullis\\x2dmasked\"\n".to_vec(),
                "application/apply-patch+yaml",
                "stringData.token",
            ),
            (chunked, "application/apply-patch+cbor", "p"),
        ] {
            assert_eq!(
                find_placeholder(&body, ctype).as_deref(),
                Some(want),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
        // Real values pass.
        for (body, ctype) in [
            (serde_json::json!({"data": {"k": b64("hunter2"), "tls.crt": b64(&"x".repeat(3000))}}).to_string(), "application/json"),
            ("stringData:\n  token: real\n".to_owned(), "application/apply-patch+yaml"),
            (serde_json::json!({"note": "masked values are fine to mention"}).to_string(), "application/json"),
            (r#"{"note": "a \"quoted\" value, \u00e9"}"#.to_owned(), "application/json"),
        ] {
            assert_eq!(find_placeholder(body.as_bytes(), ctype), None, "{body}");
        }
    }

    #[test]
    fn bodies_are_decoded_and_masked_for_the_record() {
        let plan = Arc::new(Plan::new(
            Plan::secret_paths(),
            Some(Arc::new(Detectors::new())),
            None,
        ));
        let rec = |b: &[u8], ct: &str| -> Value {
            serde_json::from_slice(&masked_record(b, ct, &plan).unwrap()).unwrap()
        };
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  token: canary-1\ndata:\n  k: Y2FuYXJ5LTI=\n";
        let v = rec(yaml.as_bytes(), "application/apply-patch+yaml");
        assert_eq!(v["stringData"]["token"], "portcullis-masked");
        assert_eq!(v["metadata"]["name"], "s");
        let patch = r#"[{"op":"add","path":"/data/k","value":"Y2FuYXJ5LTI="},{"op":"replace","path":"/spec/template/spec/containers/0/env/3/value","value":"canary-3"},{"op":"add","path":"/metadata/labels/app","value":"web"},{"op":"remove","path":"/x"}]"#;
        let v = rec(patch.as_bytes(), "application/json-patch+json");
        let s = v.to_string();
        assert!(!s.contains("Y2FuYXJ5") && !s.contains("canary-3"), "{s}");
        assert_eq!(v[2]["value"], "web");
        assert_eq!(v[3]["op"], "remove");
        let mut cbor = Vec::new();
        ciborium::into_writer(
            &ciborium::Value::Map(vec![(
                ciborium::Value::Text("data".into()),
                ciborium::Value::Map(vec![(
                    ciborium::Value::Text("k".into()),
                    ciborium::Value::Bytes(b"canary-4".to_vec()),
                )]),
            )]),
            &mut cbor,
        )
        .unwrap();
        let v = rec(&cbor, "application/cbor");
        assert_eq!(v["data"]["k"], "cG9ydGN1bGxpcy1tYXNrZWQ=");
        assert!(masked_record(b"\x00\x01", "application/octet-stream", &plan).is_err());
        assert!(masked_record(b"{", "application/json", &plan).is_err());
    }
}
