//! The Kubernetes vocabulary conditions need that CEL's standard library lacks: where
//! an object keeps its pod specs (a Pod, any workload template, a CronJob's job
//! template, a custom resource that embeds one), a pod spec's containers of every
//! kind, the Secrets it reaches, the service account it runs as, and the host access
//! it asks for (the Pod Security "baseline" checks).
//!
//! Every function takes any value and answers for what it finds: a value without pod
//! specs has none, so a condition over `podSpecs(object)` is false for a ConfigMap.
use std::sync::Arc;

use cel::{
    Context, Value,
    objects::{Key, KeyRef, Map},
};

/// How deep the walks go: Kubernetes objects nest far less; a hostile body is cut off.
const MAX_DEPTH: usize = 48;

/// The functions, added to a condition's evaluation context.
pub(super) fn register(ctx: &mut Context<'_, '_>) {
    // The names are ours (no stdlib overload shares them), so adding cannot fail.
    let _ = ctx.add_function("podSpecs", |v: Value| list(pod_specs(&v)));
    let _ = ctx.add_function("containers", |v: Value| list(containers(&v)));
    let _ = ctx.add_function("secretRefs", |v: Value| {
        list(secret_refs(&v).into_iter().map(Value::from).collect())
    });
    let _ = ctx.add_function("serviceAccountOf", |v: Value| {
        Value::from(service_account_of(&v))
    });
    let _ = ctx.add_function("mountsServiceAccountToken", |v: Value| {
        Value::Bool(mounts_token(&v))
    });
    let _ = ctx.add_function("hostAccess", |v: Value| {
        list(host_access(&v).into_iter().map(Value::from).collect())
    });
}

fn list(v: Vec<Value>) -> Value {
    Value::List(Arc::new(v))
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Map(m) => m.get(&KeyRef::String(key)),
        _ => None,
    }
}

fn str_of(v: Option<&Value>) -> Option<&str> {
    match v {
        Some(Value::String(s)) => Some(s.as_str()),
        _ => None,
    }
}

fn truthy(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::Bool(true)))
}

fn items(v: Option<&Value>) -> &[Value] {
    match v {
        Some(Value::List(l)) => l.as_slice(),
        _ => &[],
    }
}

fn entries(m: &Map) -> impl Iterator<Item = (&str, &Value)> {
    m.map.iter().filter_map(|(k, v)| match k {
        Key::String(s) => Some((s.as_str(), v)),
        _ => None,
    })
}

const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

/// A pod spec: a map with a list of containers of any kind.
fn is_pod_spec(v: &Value) -> bool {
    CONTAINER_LISTS
        .iter()
        .any(|k| matches!(get(v, k), Some(Value::List(_))))
}

/// Every pod spec in `v`: the value itself, or anywhere below it (a Pod's `spec`,
/// `spec.template.spec`, a CronJob's `spec.jobTemplate.spec.template.spec`, a custom
/// resource's embedded template). A pod spec's own fields are not searched further.
pub(super) fn pod_specs(v: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    walk_specs(v, 0, &mut out);
    out
}

fn walk_specs(v: &Value, depth: usize, out: &mut Vec<Value>) {
    if depth > MAX_DEPTH {
        return;
    }
    match v {
        Value::Map(m) => {
            if is_pod_spec(v) {
                out.push(v.clone());
                return;
            }
            for (_, child) in entries(m) {
                walk_specs(child, depth + 1, out);
            }
        }
        Value::List(l) => {
            for child in l.iter() {
                walk_specs(child, depth + 1, out);
            }
        }
        _ => {}
    }
}

/// A pod spec's containers, init containers and ephemeral containers.
pub(super) fn containers(spec: &Value) -> Vec<Value> {
    CONTAINER_LISTS
        .iter()
        .flat_map(|k| items(get(spec, k)).iter().cloned())
        .collect()
}

/// Names of the Secrets `v` references, wherever they sit below it: volumes
/// (`secret`, projected `secret` sources, and the `secretRef`/`secretName` of the
/// volume plugins that take one: CSI `nodePublishSecretRef`, azureFile, cephfs, rbd,
/// iscsi, flexVolume, scaleIO, storageos), env `valueFrom.secretKeyRef`, `envFrom`
/// `secretRef`, `imagePullSecrets`. A reference without a name is `""`.
pub(super) fn secret_refs(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_secrets(v, 0, &mut out);
    out
}

/// Keys whose value names a Secret: `{name: ...}` maps (or lists of them), or the name.
const SECRET_KEYS: &[&str] = &[
    "secretRef",
    "secretKeyRef",
    "nodePublishSecretRef",
    "nodeStageSecretRef",
    "nodeExpandSecretRef",
    "controllerPublishSecretRef",
    "controllerExpandSecretRef",
    "imagePullSecrets",
];

fn walk_secrets(v: &Value, depth: usize, out: &mut Vec<String>) {
    if depth > MAX_DEPTH {
        return;
    }
    match v {
        Value::Map(m) => {
            for (k, child) in entries(m) {
                if SECRET_KEYS.contains(&k) {
                    match child {
                        Value::List(l) => out.extend(l.iter().map(ref_name)),
                        Value::Null => {}
                        other => out.push(ref_name(other)),
                    }
                } else if k == "secretName" {
                    if let Value::String(s) = child {
                        out.push(s.to_string());
                    }
                } else if k == "secret"
                    && let Value::Map(_) = child
                {
                    // A secret volume (`secretName`) or projection (`name`).
                    out.push(
                        str_of(get(child, "secretName"))
                            .or(str_of(get(child, "name")))
                            .unwrap_or("")
                            .to_owned(),
                    );
                    continue;
                }
                walk_secrets(child, depth + 1, out);
            }
        }
        Value::List(l) => {
            for child in l.iter() {
                walk_secrets(child, depth + 1, out);
            }
        }
        _ => {}
    }
}

fn ref_name(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string(),
        other => str_of(get(other, "name")).unwrap_or("").to_owned(),
    }
}

/// The service account a pod spec runs as (`default` when it names none).
pub(super) fn service_account_of(spec: &Value) -> String {
    str_of(get(spec, "serviceAccountName"))
        .filter(|s| !s.is_empty())
        .or(str_of(get(spec, "serviceAccount")).filter(|s| !s.is_empty()))
        .unwrap_or("default")
        .to_owned()
}

/// Whether a pod spec's containers get a token for its service account: the default
/// automount (unless turned off), or a projected `serviceAccountToken` source.
pub(super) fn mounts_token(spec: &Value) -> bool {
    let automount = !matches!(
        get(spec, "automountServiceAccountToken"),
        Some(Value::Bool(false))
    );
    let projected = items(get(spec, "volumes")).iter().any(|vol| {
        items(get(
            get(vol, "projected").unwrap_or(&Value::Null),
            "sources",
        ))
        .iter()
        .any(|s| get(s, "serviceAccountToken").is_some())
    });
    automount || projected
}

/// Sysctls the Pod Security baseline allows (namespaced, safe).
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// What a pod spec asks of the node beyond an ordinary container: host namespaces,
/// host paths and ports, privileged or escalating containers, added capabilities
/// (any, even those the baseline tolerates), unmasked /proc, unconfined seccomp or AppArmor, custom SELinux
/// types, unsafe sysctls, Windows host processes. Each finding names its place.
pub(super) fn host_access(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for ns in ["hostNetwork", "hostPID", "hostIPC"] {
        if truthy(get(spec, ns)) {
            out.push(ns.to_owned());
        }
    }
    for vol in items(get(spec, "volumes")) {
        if get(vol, "hostPath").is_some_and(|h| !matches!(h, Value::Null)) {
            out.push(format!(
                "volume {} is a hostPath",
                str_of(get(vol, "name")).unwrap_or("")
            ));
        }
    }
    security_context(get(spec, "securityContext"), "pod", &mut out);
    for sysctl in items(get(
        get(spec, "securityContext").unwrap_or(&Value::Null),
        "sysctls",
    )) {
        let name = str_of(get(sysctl, "name")).unwrap_or("");
        if !SAFE_SYSCTLS.contains(&name) {
            out.push(format!("sysctl {name}"));
        }
    }
    for c in containers(spec) {
        let name = str_of(get(&c, "name")).unwrap_or("").to_owned();
        let at = format!("container {name}");
        for p in items(get(&c, "ports")) {
            match get(p, "hostPort") {
                Some(Value::Int(0)) | Some(Value::UInt(0)) | None | Some(Value::Null) => {}
                Some(_) => out.push(format!("{at}: hostPort")),
            }
        }
        let sc = get(&c, "securityContext");
        if truthy(sc.and_then(|s| get(s, "privileged"))) {
            out.push(format!("{at}: privileged"));
        }
        if truthy(sc.and_then(|s| get(s, "allowPrivilegeEscalation"))) {
            out.push(format!("{at}: allowPrivilegeEscalation"));
        }
        let caps = sc.and_then(|s| get(s, "capabilities"));
        for cap in items(caps.and_then(|c| get(c, "add"))) {
            let cap = str_of(Some(cap)).unwrap_or("");
            out.push(format!("{at}: adds capability {cap}"));
        }
        if str_of(sc.and_then(|s| get(s, "procMount"))).is_some_and(|p| p != "Default") {
            out.push(format!("{at}: procMount"));
        }
        security_context(sc, &at, &mut out);
    }
    out
}

fn security_context(sc: Option<&Value>, at: &str, out: &mut Vec<String>) {
    let Some(sc) = sc else {
        return;
    };
    for profile in ["seccompProfile", "appArmorProfile"] {
        if str_of(get(sc, profile).and_then(|p| get(p, "type"))) == Some("Unconfined") {
            out.push(format!("{at}: {profile} Unconfined"));
        }
    }
    if let Some(se) = get(sc, "seLinuxOptions") {
        let ty = str_of(get(se, "type")).unwrap_or("");
        if !matches!(
            ty,
            "" | "container_t" | "container_init_t" | "container_kvm_t" | "container_engine_t"
        ) || str_of(get(se, "user")).is_some_and(|u| !u.is_empty())
            || str_of(get(se, "role")).is_some_and(|r| !r.is_empty())
        {
            out.push(format!("{at}: seLinuxOptions"));
        }
    }
    if truthy(get(sc, "windowsOptions").and_then(|w| get(w, "hostProcess"))) {
        out.push(format!("{at}: windows hostProcess"));
    }
}

/// A JSON value as CEL sees it: integers are `int` (Kubernetes' CEL does the same),
/// objects are maps with string keys.
pub fn from_json(v: &serde_json::Value) -> Value {
    from_json_at(v, 0)
}

fn from_json_at(v: &serde_json::Value, depth: usize) -> Value {
    use serde_json::Value as J;
    if depth > MAX_DEPTH * 2 {
        return Value::Null;
    }
    match v {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => list(a.iter().map(|x| from_json_at(x, depth + 1)).collect()),
        J::Object(o) => {
            let m: std::collections::HashMap<Key, Value> = o
                .iter()
                .map(|(k, x)| (Key::from(k.as_str()), from_json_at(x, depth + 1)))
                .collect();
            Value::Map(Map { map: Arc::new(m) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(j: serde_json::Value) -> Value {
        from_json(&j)
    }

    const DEPLOYMENT: &str = r#"{"kind": "Deployment", "spec": {"replicas": 2, "template": {"metadata": {"labels": {"a": "b"}},
        "spec": {"serviceAccountName": "agent", "containers": [{"name": "app", "image": "x",
            "envFrom": [{"secretRef": {"name": "db"}}],
            "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "k"}}}]}],
          "initContainers": [{"name": "init", "image": "y", "securityContext": {"privileged": true}}],
          "volumes": [{"name": "v", "secret": {"secretName": "certs"}},
                      {"name": "p", "projected": {"sources": [{"secret": {"name": "proj"}}, {"serviceAccountToken": {"path": "t"}}]}},
                      {"name": "c", "csi": {"driver": "d", "nodePublishSecretRef": {"name": "csi"}}},
                      {"name": "h", "hostPath": {"path": "/"}}],
          "imagePullSecrets": [{"name": "pull"}]}}}}"#;

    #[test]
    fn pod_specs_are_found_in_every_kind_of_object() {
        let d = v(serde_json::from_str(DEPLOYMENT).unwrap());
        assert_eq!(pod_specs(&d).len(), 1);
        let cron = v(
            serde_json::json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "a"}]}}}}}}),
        );
        assert_eq!(pod_specs(&cron).len(), 1);
        let crd = v(
            serde_json::json!({"kind": "Workflow", "spec": {"stages": [{"pod": {"initContainers": [{"name": "a"}]}}, {"pod": {"containers": []}}]}}),
        );
        assert_eq!(pod_specs(&crd).len(), 2);
        let cm = v(serde_json::json!({"kind": "ConfigMap", "data": {"containers": "not a list"}}));
        assert!(pod_specs(&cm).is_empty());
        assert!(pod_specs(&Value::Null).is_empty());
    }

    #[test]
    fn every_secret_reference_is_named() {
        let d = v(serde_json::from_str(DEPLOYMENT).unwrap());
        let spec = &pod_specs(&d)[0];
        let mut refs = secret_refs(spec);
        refs.sort();
        assert_eq!(refs, ["certs", "csi", "db", "proj", "pull", "tok"]);
        assert_eq!(containers(spec).len(), 2);
        assert_eq!(service_account_of(spec), "agent");
        assert!(mounts_token(spec));
        let found = host_access(spec);
        assert!(found.iter().any(|f| f.contains("hostPath")), "{found:?}");
        assert!(
            found.iter().any(|f| f == "container init: privileged"),
            "{found:?}"
        );
    }

    #[test]
    fn host_access_covers_the_baseline() {
        let spec = v(serde_json::json!({
            "hostNetwork": true, "hostPID": true, "hostIPC": true,
            "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}, {"name": "net.ipv4.tcp_syncookies", "value": "1"}],
                                "seccompProfile": {"type": "Unconfined"}},
            "ephemeralContainers": [{"name": "e", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}, "allowPrivilegeEscalation": true,
                                     "procMount": "Unmasked", "windowsOptions": {"hostProcess": true}}}],
            "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}],
                            "securityContext": {"seLinuxOptions": {"type": "spc_t"}, "appArmorProfile": {"type": "Unconfined"}}}]
        }));
        let f = host_access(&spec);
        for want in [
            "hostNetwork",
            "hostPID",
            "hostIPC",
            "sysctl kernel.msgmax",
            "pod: seccompProfile Unconfined",
            "container e: adds capability SYS_ADMIN",
            "container e: allowPrivilegeEscalation",
            "container e: procMount",
            "container e: windows hostProcess",
            "container c: hostPort",
            "container c: seLinuxOptions",
            "container c: appArmorProfile Unconfined",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        assert!(!f.iter().any(|x| x.contains("tcp_syncookies")));
        let plain = v(
            serde_json::json!({"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80}],
            "securityContext": {"allowPrivilegeEscalation": false, "runAsNonRoot": true}}]}),
        );
        assert!(host_access(&plain).is_empty(), "{:?}", host_access(&plain));
        assert!(!mounts_token(&v(
            serde_json::json!({"automountServiceAccountToken": false, "containers": []})
        )));
        assert_eq!(service_account_of(&plain), "default");
    }

    #[test]
    fn json_numbers_are_ints() {
        assert_eq!(v(serde_json::json!(3)), Value::Int(3));
        assert_eq!(v(serde_json::json!(u64::MAX)), Value::UInt(u64::MAX));
        assert_eq!(v(serde_json::json!(1.5)), Value::Float(1.5));
    }
}
