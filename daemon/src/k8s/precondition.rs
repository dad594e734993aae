//! Making a write conditional on the object the gate checked: the resourceVersion
//! precondition, stated in the request body in the way each kind of write reads it.
//! The API server refuses a write whose object carries a resourceVersion other than
//! the stored one with 409 Conflict (optimistic concurrency), so a write made
//! conditional on version R does exactly what was checked against R, or nothing.
//!
//! - update (PUT) and merge, strategic-merge and apply patches: `metadata.resourceVersion`
//!   in the object or patch;
//! - JSON patch: a last `replace /metadata/resourceVersion` operation;
//! - delete: `preconditions.resourceVersion` in the DeleteOptions body.
//!
//! A body that already states a resourceVersion keeps it: the client's own
//! precondition is at least as strict.
use bytes::Bytes;
use serde_json::{Value, json};

/// Why a body cannot carry a precondition.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreconditionError {
    #[error(
        "a {0} body cannot be made conditional on the checked object; send the request as JSON"
    )]
    Encoding(String),
    #[error("the body is not valid {kind}: {why}")]
    Invalid { kind: &'static str, why: String },
}

/// The lowercase media type of a Content-Type value.
fn media(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Parses a body the way its media type says (JSON, or YAML for apply patches).
pub fn parse_body(content_type: &str, body: &[u8]) -> Option<Value> {
    let m = media(content_type);
    if m.ends_with("yaml") {
        serde_yaml_ng::from_slice(body).ok()
    } else if m.is_empty() || m.ends_with("json") {
        serde_json::from_slice(body).ok()
    } else {
        None
    }
}

/// `body` (of `content_type`, for `verb`) made conditional on `resource_version`.
pub fn with_resource_version(
    verb: &str,
    content_type: &str,
    body: &[u8],
    resource_version: &str,
) -> Result<Bytes, PreconditionError> {
    let m = media(content_type);
    let invalid = |kind: &'static str, why: String| PreconditionError::Invalid { kind, why };
    if verb == "delete" || verb == "deletecollection" {
        let mut opts: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({"kind": "DeleteOptions", "apiVersion": "v1"})
        } else if m.is_empty() || m.ends_with("json") {
            serde_json::from_slice(body).map_err(|e| invalid("JSON", e.to_string()))?
        } else {
            return Err(PreconditionError::Encoding(m));
        };
        let obj = opts
            .as_object_mut()
            .ok_or_else(|| invalid("DeleteOptions", "not an object".into()))?;
        let pre = obj
            .entry("preconditions")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| invalid("DeleteOptions", "preconditions is not an object".into()))?;
        if pre
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            pre.insert("resourceVersion".into(), json!(resource_version));
        }
        return Ok(Bytes::from(serde_json::to_vec(&opts).unwrap_or_default()));
    }
    if m == "application/json-patch+json" {
        let mut ops: Value =
            serde_json::from_slice(body).map_err(|e| invalid("JSON patch", e.to_string()))?;
        let list = ops
            .as_array_mut()
            .ok_or_else(|| invalid("JSON patch", "not a list of operations".into()))?;
        let touches = list.iter().any(|op| {
            op["path"]
                .as_str()
                .is_some_and(|p| p == "/metadata/resourceVersion" || p == "/metadata")
        });
        if !touches {
            list.push(json!({"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version}));
        }
        return Ok(Bytes::from(serde_json::to_vec(&ops).unwrap_or_default()));
    }
    let kind = match m.as_str() {
        "application/apply-patch+yaml" => "YAML",
        ""
        | "application/json"
        | "application/merge-patch+json"
        | "application/strategic-merge-patch+json" => "JSON",
        other => return Err(PreconditionError::Encoding(other.to_owned())),
    };
    let mut obj = parse_body(&m, body).ok_or_else(|| invalid(kind, "does not parse".into()))?;
    let root = obj
        .as_object_mut()
        .ok_or_else(|| invalid(kind, "not an object".into()))?;
    let meta = root
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| invalid(kind, "metadata is not an object".into()))?;
    if meta
        .get("resourceVersion")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        meta.insert("resourceVersion".into(), json!(resource_version));
    }
    // JSON is YAML too: an apply patch stays an apply patch.
    Ok(Bytes::from(serde_json::to_vec(&obj).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn each_kind_of_write_carries_the_precondition_where_the_api_server_reads_it() {
        let merge = with_resource_version(
            "patch",
            "application/merge-patch+json",
            br#"{"spec":{"replicas":0}}"#,
            "42",
        )
        .unwrap();
        assert_eq!(v(&merge)["metadata"]["resourceVersion"], "42");
        assert_eq!(v(&merge)["spec"]["replicas"], 0);
        let smp = with_resource_version(
            "patch",
            "application/strategic-merge-patch+json; charset=utf-8",
            br#"{"metadata":{"labels":{"a":"b"}}}"#,
            "7",
        )
        .unwrap();
        assert_eq!(v(&smp)["metadata"]["labels"]["a"], "b");
        assert_eq!(v(&smp)["metadata"]["resourceVersion"], "7");
        let apply = with_resource_version(
            "patch",
            "application/apply-patch+yaml",
            b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: b\n",
            "9",
        )
        .unwrap();
        assert_eq!(v(&apply)["metadata"]["resourceVersion"], "9");
        assert_eq!(v(&apply)["data"]["a"], "b");
        let jp = with_resource_version(
            "patch",
            "application/json-patch+json",
            br#"[{"op":"replace","path":"/spec/replicas","value":0}]"#,
            "5",
        )
        .unwrap();
        assert_eq!(v(&jp)[1]["path"], "/metadata/resourceVersion");
        assert_eq!(v(&jp)[1]["value"], "5");
        let put = with_resource_version(
            "update",
            "application/json",
            br#"{"kind":"ConfigMap","metadata":{"name":"x"}}"#,
            "3",
        )
        .unwrap();
        assert_eq!(v(&put)["metadata"]["resourceVersion"], "3");
        let del = with_resource_version("delete", "", b"", "11").unwrap();
        assert_eq!(v(&del)["preconditions"]["resourceVersion"], "11");
        let del = with_resource_version(
            "delete",
            "application/json",
            br#"{"propagationPolicy":"Background"}"#,
            "12",
        )
        .unwrap();
        assert_eq!(v(&del)["preconditions"]["resourceVersion"], "12");
        assert_eq!(v(&del)["propagationPolicy"], "Background");
    }

    #[test]
    fn a_clients_own_precondition_is_kept() {
        let put = with_resource_version(
            "update",
            "application/json",
            br#"{"metadata":{"name":"x","resourceVersion":"1"}}"#,
            "3",
        )
        .unwrap();
        assert_eq!(v(&put)["metadata"]["resourceVersion"], "1");
        let jp = with_resource_version(
            "patch",
            "application/json-patch+json",
            br#"[{"op":"test","path":"/metadata/resourceVersion","value":"1"}]"#,
            "5",
        )
        .unwrap();
        assert_eq!(v(&jp).as_array().unwrap().len(), 1);
    }

    #[test]
    fn bodies_that_cannot_carry_it_are_refused() {
        assert!(matches!(
            with_resource_version(
                "update",
                "application/vnd.kubernetes.protobuf",
                b"k8s\0",
                "1"
            ),
            Err(PreconditionError::Encoding(_))
        ));
        assert!(matches!(
            with_resource_version("patch", "application/apply-patch+cbor", b"\xa1", "1"),
            Err(PreconditionError::Encoding(_))
        ));
        assert!(matches!(
            with_resource_version("patch", "application/merge-patch+json", b"[1]", "1"),
            Err(PreconditionError::Invalid { .. })
        ));
        assert!(matches!(
            with_resource_version("patch", "application/merge-patch+json", b"{", "1"),
            Err(PreconditionError::Invalid { .. })
        ));
    }
}
