//! The maskers: JSON streams, text, WebSocket frames, and request bodies decoded for
//! audit and write-back checks.
use std::sync::Arc;

use serde_json::{Value, json};

use super::{chunking, split_seed};
use crate::mask::{
    Detectors, JsonMasker, MaskError, PLACEHOLDER, Plan, TextMasker, WsCodec, WsContent, WsMasker,
    decode, find_placeholder, masked_record, read_messages,
};

/// A Secret value planted in fuzzed objects; it must never come out.
const CANARY: &str = "fuzz-canary-Zq8xW3vR";
/// [`CANARY`] in base64, as it sits in a Secret's `data`.
const CANARY_B64: &str = "ZnV6ei1jYW5hcnktWnE4eFczdlI=";

fn detectors() -> Arc<Detectors> {
    thread_local!(static D: Arc<Detectors> = Arc::new(Detectors::new()));
    D.with(Arc::clone)
}

fn secret_plan() -> Arc<Plan> {
    Arc::new(Plan::new(Plan::secret_paths(), Some(detectors()), None))
}

fn plain_plan() -> Arc<Plan> {
    Arc::new(Plan::new(Vec::new(), Some(detectors()), None))
}

fn mask_json(plan: &Arc<Plan>, body: &[u8], sizes: &[usize]) -> Result<Vec<u8>, MaskError> {
    let mut m = JsonMasker::new(plan.clone());
    let mut out = Vec::new();
    let mut at = 0;
    for n in sizes {
        out.extend(m.feed(&body[at..at + n])?);
        at += n;
    }
    out.extend(m.finish()?);
    Ok(out)
}

fn contains(hay: &[u8], needle: &str) -> bool {
    memchr::memmem::find(hay, needle.as_bytes()).is_some()
}

/// Byte 0: the plan (even: a Secret's); bytes 1-2: the chunking; the rest: the body.
pub fn json(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (seed, body) = split_seed(rest, 2);
    let plan = if which % 2 == 0 {
        secret_plan()
    } else {
        plain_plan()
    };
    let whole = mask_json(&plan, body, &[body.len()]);
    let chunked = mask_json(&plan, body, &chunking(seed, body.len()));
    assert_eq!(
        whole
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        chunked
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        "masked whole and in chunks differ"
    );
    if let (Ok(out), Ok(_)) = (&whole, serde_json::from_slice::<Value>(body)) {
        // A valid document stays one.
        if let Err(e) = serde_json::from_slice::<Value>(out) {
            panic!(
                "masking made invalid JSON ({e}): {}",
                String::from_utf8_lossy(out)
            );
        }
    }
    // The input as an object, with a Secret's value planted in it.
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    obj.insert("kind".into(), json!("Secret"));
    obj.insert("data".into(), json!({"fuzzed": CANARY_B64}));
    obj.insert("stringData".into(), json!({"fuzzed": CANARY}));
    let obj = Value::Object(obj);
    let secrets = secret_plan();
    for form in [
        obj.to_string(),
        json!({"kind": "SecretList", "items": [obj, obj]}).to_string(),
        format!(
            "{}\n{}\n",
            json!({"type": "ADDED", "object": obj}),
            json!({"type": "MODIFIED", "object": obj})
        ),
    ] {
        let b = form.as_bytes();
        let out = match mask_json(&secrets, b, &chunking(seed ^ 0x5eed, b.len())) {
            Ok(o) => o,
            // Too deep to mask: refused, which sends nothing.
            Err(MaskError::TooDeep) => continue,
            Err(e) => panic!("a valid Secret was not masked: {e}: {form}"),
        };
        assert!(
            !contains(&out, CANARY) && !contains(&out, CANARY_B64),
            "the Secret's value survived: {}",
            String::from_utf8_lossy(&out)
        );
    }
}

fn mask_text(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut m = TextMasker::new(detectors());
    let mut out = Vec::new();
    let mut at = 0;
    for n in sizes {
        out.extend(m.feed(&body[at..at + n]));
        at += n;
    }
    out.extend(m.finish());
    out
}

/// Bytes 0-1: the chunking; the rest: a log.
pub fn text(data: &[u8]) {
    let (seed, body) = split_seed(data, 2);
    let whole = mask_text(body, &[body.len()]);
    let chunked = mask_text(body, &chunking(seed, body.len()));
    assert_eq!(
        String::from_utf8_lossy(&whole),
        String::from_utf8_lossy(&chunked),
        "masked whole and in chunks differ"
    );
    // A credential on a line of its own, after whatever the log held.
    let mut log = body.to_vec();
    log.extend_from_slice(format!("\npassword={CANARY}\n").as_bytes());
    let out = mask_text(&log, &chunking(seed ^ 0x5eed, log.len()));
    assert!(
        !contains(&out, CANARY),
        "a password line survived: {}",
        String::from_utf8_lossy(&out)
    );
}

/// Byte 0: codec and content; bytes 1-2: the chunking; the rest: the server's bytes.
pub fn websocket(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (seed, body) = split_seed(rest, 2);
    let codec = match which & 3 {
        0 => WsCodec::Raw,
        1 => WsCodec::Base64,
        2 => WsCodec::Channel,
        _ => WsCodec::Base64Channel,
    };
    let content = if which & 4 == 0 {
        WsContent::Json
    } else {
        WsContent::Text
    };
    let run = |sizes: &[usize]| -> Result<Vec<u8>, MaskError> {
        let mut m = WsMasker::new(content, codec, secret_plan(), Some(detectors()));
        let mut out = Vec::new();
        let mut at = 0;
        for n in sizes {
            out.extend(m.feed(&body[at..at + n])?);
            at += n;
        }
        out.extend(m.finish()?);
        Ok(out)
    };
    let whole = run(&[body.len()]);
    let chunked = run(&chunking(seed, body.len()));
    assert_eq!(whole, chunked, "masked whole and in chunks differ");
    if let Ok(out) = whole {
        // What the agent gets is frames it can read.
        if let Err(e) = read_messages(&out) {
            panic!("the masker sent malformed frames: {e}");
        }
    }
    let _ = WsCodec::from_protocol(&String::from_utf8_lossy(body));
}

const MEDIA: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/apply-patch+yaml",
    "application/cbor",
    "application/vnd.kubernetes.protobuf",
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "text/plain",
    "application/apply-patch+cbor",
];

/// Whether any string in `v` (key or value) holds the placeholder.
fn holds_placeholder(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains(PLACEHOLDER),
        Value::Array(a) => a.iter().any(holds_placeholder),
        Value::Object(o) => o
            .iter()
            .any(|(k, v)| k.contains(PLACEHOLDER) || holds_placeholder(v)),
        _ => false,
    }
}

/// Byte 0: the media type; the rest: a request body.
pub fn body(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let media = MEDIA[usize::from(which) % MEDIA.len()];
    let decoded = decode(body, media);
    let found = find_placeholder(body, media);
    if let Ok(v) = &decoded
        && holds_placeholder(v)
    {
        assert!(
            found.is_some(),
            "a {media} body carrying a placeholder was not caught: {v}"
        );
    }
    if let Ok(out) = masked_record(body, media, &secret_plan())
        && decoded.is_ok()
        && let Err(e) = serde_json::from_slice::<Value>(&out)
    {
        // Nested deeper than serde_json reads (128 levels; CBOR decodes deeper): the
        // audit record keeps such a body as a string, so the record stays readable.
        let kept = crate::audit::body_value(&out, usize::MAX);
        assert!(
            e.to_string().starts_with("recursion limit exceeded")
                && kept.is_string()
                && serde_json::to_vec(&kept)
                    .is_ok_and(|b| serde_json::from_slice::<Value>(&b).is_ok()),
            "a {media} body's record is not JSON ({e}): {}",
            String::from_utf8_lossy(&out)
        );
    }
}
