//! Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`), decoded as
//! far as masking needs: the `k8s\0` magic and the `runtime.Unknown` envelope
//! (apiVersion, kind), every object's metadata (name, generateName, namespace, labels,
//! annotations), and the fields where credentials live — Secret `data`/`stringData`,
//! ConfigMap `data`/`binaryData`, and the containers of a Pod and of every workload's
//! pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob,
//! ReplicationController, PodTemplate): init, regular and ephemeral containers' name,
//! image, command, args and env. The result is the JSON the same object would be, as
//! far as decoded; the other fields are left out and the object says so
//! (`portcullis.dev/decoded`). Field numbers are those of k8s.io/api's
//! generated.proto (v0.37).
use std::collections::BTreeMap;

use base64::Engine;
use prost::Message;
use serde_json::{Map, Value, json};

/// The four bytes every Kubernetes protobuf body starts with.
pub const MAGIC: &[u8] = b"k8s\0";

#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    #[error("no k8s protobuf magic")]
    NoMagic,
    #[error("the envelope does not decode: {0}")]
    Envelope(#[source] prost::DecodeError),
    #[error("the {kind} inside does not decode: {source}")]
    Object {
        kind: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("the object is {0}-encoded inside its envelope")]
    Encoded(String),
}

#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    content_encoding: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ObjectMeta {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    generate_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    namespace: Option<String>,
    #[prost(btree_map = "string, string", tag = "11")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    annotations: BTreeMap<String, String>,
}

/// Any object: its metadata is field 1.
#[derive(Clone, PartialEq, Message)]
struct Object {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
}

#[derive(Clone, PartialEq, Message)]
struct Secret {
    #[prost(btree_map = "string, bytes", tag = "2")]
    data: BTreeMap<String, Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    r#type: Option<String>,
    #[prost(btree_map = "string, string", tag = "4")]
    string_data: BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
struct ConfigMap {
    #[prost(btree_map = "string, string", tag = "2")]
    data: BTreeMap<String, String>,
    #[prost(btree_map = "string, bytes", tag = "3")]
    binary_data: BTreeMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct EnvVar {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
    #[prost(bytes = "vec", optional, tag = "3")]
    value_from: Option<Vec<u8>>,
}

/// A Container, and an EphemeralContainer's common part (same field numbers).
#[derive(Clone, PartialEq, Message)]
struct Container {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    image: Option<String>,
    #[prost(string, repeated, tag = "3")]
    command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    args: Vec<String>,
    #[prost(message, repeated, tag = "7")]
    env: Vec<EnvVar>,
}

#[derive(Clone, PartialEq, Message)]
struct EphemeralContainer {
    #[prost(message, optional, tag = "1")]
    common: Option<Container>,
}

#[derive(Clone, PartialEq, Message)]
struct PodSpec {
    #[prost(message, repeated, tag = "2")]
    containers: Vec<Container>,
    #[prost(message, repeated, tag = "20")]
    init_containers: Vec<Container>,
    #[prost(message, repeated, tag = "34")]
    ephemeral_containers: Vec<EphemeralContainer>,
}

#[derive(Clone, PartialEq, Message)]
struct PodTemplateSpec {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<PodSpec>,
}

/// Pod (spec = 2).
#[derive(Clone, PartialEq, Message)]
struct Pod {
    #[prost(message, optional, tag = "2")]
    spec: Option<PodSpec>,
}

/// PodTemplate (template = 2).
#[derive(Clone, PartialEq, Message)]
struct PodTemplate {
    #[prost(message, optional, tag = "2")]
    template: Option<PodTemplateSpec>,
}

/// A workload: its spec is field 2, holding the pod template at `template_tag`.
#[derive(Clone, PartialEq, Message)]
struct Workload {
    #[prost(bytes = "vec", optional, tag = "2")]
    spec: Option<Vec<u8>>,
}

/// A spec with the pod template at field 3 (Deployment, ReplicaSet, StatefulSet,
/// ReplicationController).
#[derive(Clone, PartialEq, Message)]
struct Template3 {
    #[prost(message, optional, tag = "3")]
    template: Option<PodTemplateSpec>,
}

/// DaemonSetSpec (template = 2).
#[derive(Clone, PartialEq, Message)]
struct Template2 {
    #[prost(message, optional, tag = "2")]
    template: Option<PodTemplateSpec>,
}

/// JobSpec (template = 6).
#[derive(Clone, PartialEq, Message)]
struct JobSpec {
    #[prost(message, optional, tag = "6")]
    template: Option<PodTemplateSpec>,
}

/// CronJobSpec (schedule = 1, jobTemplate = 5 {metadata = 1, spec = 2}).
#[derive(Clone, PartialEq, Message)]
struct CronJobSpec {
    #[prost(string, optional, tag = "1")]
    schedule: Option<String>,
    #[prost(message, optional, tag = "5")]
    job_template: Option<JobTemplateSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct JobTemplateSpec {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<JobSpec>,
}

const CONTAINER_FIELDS: &str = "metadata (name, generateName, namespace, labels, annotations); containers, initContainers, ephemeralContainers (name, image, command, args, env)";

/// A protobuf request body as the JSON of the fields decoded (see the module
/// documentation).
pub fn protobuf_to_json(body: &[u8]) -> Result<Value, ProtobufError> {
    let rest = body.strip_prefix(MAGIC).ok_or(ProtobufError::NoMagic)?;
    let u = Unknown::decode(rest).map_err(ProtobufError::Envelope)?;
    if let Some(e) = u.content_encoding.filter(|e| !e.is_empty()) {
        return Err(ProtobufError::Encoded(e));
    }
    let tm = u.type_meta.unwrap_or_default();
    let (api_version, kind) = (
        tm.api_version.unwrap_or_default(),
        tm.kind.unwrap_or_default(),
    );
    let raw = u.raw.unwrap_or_default();
    let bad = |source| ProtobufError::Object {
        kind: kind.clone(),
        source,
    };
    let meta = Object::decode(raw.as_slice()).map_err(bad)?.metadata;
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!(kind));
    out.insert("metadata".into(), meta_json(meta));
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let decoded = match (group, kind.as_str()) {
        ("", "Secret") => {
            let s = Secret::decode(raw.as_slice()).map_err(bad)?;
            out.insert("data".into(), bytes_map(&s.data));
            out.insert("stringData".into(), json!(s.string_data));
            if let Some(t) = s.r#type {
                out.insert("type".into(), json!(t));
            }
            "metadata, data, stringData, type"
        }
        ("", "ConfigMap") => {
            let c = ConfigMap::decode(raw.as_slice()).map_err(bad)?;
            out.insert("data".into(), json!(c.data));
            out.insert("binaryData".into(), bytes_map(&c.binary_data));
            "metadata, data, binaryData"
        }
        ("", "Pod") => {
            let p = Pod::decode(raw.as_slice()).map_err(bad)?;
            out.insert("spec".into(), spec_json(p.spec));
            CONTAINER_FIELDS
        }
        ("", "PodTemplate") => {
            let p = PodTemplate::decode(raw.as_slice()).map_err(bad)?;
            out.insert("template".into(), template_json(p.template));
            CONTAINER_FIELDS
        }
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet") | ("", "ReplicationController") => {
            let spec = Workload::decode(raw.as_slice())
                .map_err(bad)?
                .spec
                .unwrap_or_default();
            let t = Template3::decode(spec.as_slice()).map_err(bad)?;
            out.insert(
                "spec".into(),
                json!({"template": template_json(t.template)}),
            );
            CONTAINER_FIELDS
        }
        ("apps", "DaemonSet") => {
            let spec = Workload::decode(raw.as_slice())
                .map_err(bad)?
                .spec
                .unwrap_or_default();
            let t = Template2::decode(spec.as_slice()).map_err(bad)?;
            out.insert(
                "spec".into(),
                json!({"template": template_json(t.template)}),
            );
            CONTAINER_FIELDS
        }
        ("batch", "Job") => {
            let spec = Workload::decode(raw.as_slice())
                .map_err(bad)?
                .spec
                .unwrap_or_default();
            let t = JobSpec::decode(spec.as_slice()).map_err(bad)?;
            out.insert(
                "spec".into(),
                json!({"template": template_json(t.template)}),
            );
            CONTAINER_FIELDS
        }
        ("batch", "CronJob") => {
            let spec = Workload::decode(raw.as_slice())
                .map_err(bad)?
                .spec
                .unwrap_or_default();
            let c = CronJobSpec::decode(spec.as_slice()).map_err(bad)?;
            let jt = c.job_template.unwrap_or_default();
            out.insert(
                "spec".into(),
                json!({
                    "schedule": c.schedule,
                    "jobTemplate": {
                        "metadata": meta_json(jt.metadata),
                        "spec": {"template": template_json(jt.spec.and_then(|s| s.template))},
                    },
                }),
            );
            CONTAINER_FIELDS
        }
        _ => "metadata",
    };
    out.insert(
        "portcullis.dev/decoded".into(),
        json!(format!(
            "decoded from protobuf: {decoded}; other fields are not decoded"
        )),
    );
    Ok(Value::Object(out))
}

fn bytes_map(m: &BTreeMap<String, Vec<u8>>) -> Value {
    Value::Object(
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!(base64::engine::general_purpose::STANDARD.encode(v)),
                )
            })
            .collect(),
    )
}

fn meta_json(m: Option<ObjectMeta>) -> Value {
    let m = m.unwrap_or_default();
    let mut o = Map::new();
    for (k, v) in [
        ("name", m.name),
        ("generateName", m.generate_name),
        ("namespace", m.namespace),
    ] {
        if let Some(v) = v {
            o.insert(k.into(), json!(v));
        }
    }
    if !m.labels.is_empty() {
        o.insert("labels".into(), json!(m.labels));
    }
    if !m.annotations.is_empty() {
        o.insert("annotations".into(), json!(m.annotations));
    }
    Value::Object(o)
}

fn template_json(t: Option<PodTemplateSpec>) -> Value {
    let t = t.unwrap_or_default();
    json!({"metadata": meta_json(t.metadata), "spec": spec_json(t.spec)})
}

fn spec_json(s: Option<PodSpec>) -> Value {
    let s = s.unwrap_or_default();
    let list = |cs: Vec<Container>| Value::Array(cs.into_iter().map(container_json).collect());
    json!({
        "initContainers": list(s.init_containers),
        "containers": list(s.containers),
        "ephemeralContainers": list(
            s.ephemeral_containers.into_iter().filter_map(|e| e.common).collect()
        ),
    })
}

fn container_json(c: Container) -> Value {
    let env: Vec<Value> = c
        .env
        .into_iter()
        .map(|e| {
            let mut o = Map::new();
            o.insert("name".into(), json!(e.name.unwrap_or_default()));
            if let Some(v) = e.value {
                o.insert("value".into(), json!(v));
            }
            if e.value_from.is_some() {
                o.insert("valueFrom".into(), json!({}));
            }
            Value::Object(o)
        })
        .collect();
    json!({
        "name": c.name.unwrap_or_default(),
        "image": c.image.unwrap_or_default(),
        "command": c.command,
        "args": c.args,
        "env": env,
    })
}

/// Encodings for tests: an object as `kubectl` would send it.
#[cfg(test)]
pub(crate) mod encode {
    use super::*;

    pub fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("e2e".into()),
            ..Default::default()
        }
    }

    /// A Secret (`kubectl create secret generic NAME --from-literal=k=v`).
    pub fn secret(name: &str, k: &str, v: &[u8]) -> Vec<u8> {
        let mut raw = Object {
            metadata: Some(meta(name)),
        }
        .encode_to_vec();
        raw.extend(
            Secret {
                data: [(k.to_owned(), v.to_vec())].into_iter().collect(),
                r#type: Some("Opaque".into()),
                string_data: BTreeMap::new(),
            }
            .encode_to_vec(),
        );
        envelope("v1", "Secret", raw)
    }

    /// A Deployment whose one container has these args and env.
    pub fn deployment(name: &str, args: &[&str], env: &[(&str, &str)]) -> Vec<u8> {
        let c = Container {
            name: Some("app".into()),
            image: Some("app:1".into()),
            command: vec![],
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(n, v)| EnvVar {
                    name: Some(n.to_string()),
                    value: Some(v.to_string()),
                    value_from: None,
                })
                .collect(),
        };
        let spec = Template3 {
            template: Some(PodTemplateSpec {
                metadata: None,
                spec: Some(PodSpec {
                    containers: vec![c],
                    init_containers: vec![],
                    ephemeral_containers: vec![],
                }),
            }),
        };
        let mut raw = Object {
            metadata: Some(meta(name)),
        }
        .encode_to_vec();
        raw.extend(
            Workload {
                spec: Some(spec.encode_to_vec()),
            }
            .encode_to_vec(),
        );
        envelope("apps/v1", "Deployment", raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_workloads_decode_as_their_json() {
        let v = protobuf_to_json(&encode::secret("s", "k", b"canary")).unwrap();
        assert_eq!(v["kind"], "Secret");
        assert_eq!(v["metadata"]["name"], "s");
        assert_eq!(v["metadata"]["namespace"], "e2e");
        assert_eq!(v["data"]["k"], "Y2FuYXJ5");
        assert_eq!(v["type"], "Opaque");
        let v = protobuf_to_json(&encode::deployment(
            "d",
            &["--db-password", "canary"],
            &[("DB_PASS", "canary2")],
        ))
        .unwrap();
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["args"][1], "canary");
        assert_eq!(c["env"][0]["name"], "DB_PASS");
        assert_eq!(c["env"][0]["value"], "canary2");
        assert!(
            v["portcullis.dev/decoded"]
                .as_str()
                .unwrap()
                .contains("containers")
        );
        // Another kind: its metadata.
        let v = protobuf_to_json(&encode::envelope(
            "v1",
            "Namespace",
            Object {
                metadata: Some(ObjectMeta {
                    name: Some("ns".into()),
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
        ))
        .unwrap();
        assert_eq!(v["metadata"]["name"], "ns");
        assert!(protobuf_to_json(b"{}").is_err());
        assert!(protobuf_to_json(b"k8s\0\xff\xff").is_err());
    }
}
