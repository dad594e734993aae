//! The admission guard for agent pods: what would let a process of the pod escape
//! the cgroup hooks, or reach the node's kernel state, is refused, each refusal
//! naming the field. Applied to pods and to the pod templates of workloads.
use serde_json::Value;

/// Capabilities an agent container may not add: raw and packet sockets, network
/// configuration, namespaces and mounts, BPF, and tracing other processes.
pub const FORBIDDEN_CAPS: &[&str] = &[
    "ALL",
    "NET_RAW",
    "NET_ADMIN",
    "SYS_ADMIN",
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "SYS_MODULE",
];

/// One refused field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field, as a path in the object (`spec.containers[0].securityContext.privileged`).
    pub field: String,
    pub message: String,
}

fn v(field: String, message: &str) -> Violation {
    Violation {
        field,
        message: message.into(),
    }
}

/// Every violation in a pod spec at `at` (e.g. `spec`, or
/// `spec.template.spec` of a Deployment). `runtime_classes`: the RuntimeClasses whose
/// sandbox the cgroup hooks see (runc-based).
pub fn check_pod_spec(spec: &Value, at: &str, runtime_classes: &[String]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (field, what) in [
        (
            "hostNetwork",
            "shares the node's network: the daemon's listeners and every node address without the pod's cgroup hooks in the way",
        ),
        (
            "hostPID",
            "shares the node's processes (their cgroups, /proc/PID/root of other pods)",
        ),
        ("hostIPC", "shares the node's IPC namespace"),
    ] {
        if spec[field] == Value::Bool(true) {
            out.push(v(
                format!("{at}.{field}"),
                &format!("agent pods may not set {field}: it {what}"),
            ));
        }
    }
    if let Some(rc) = spec["runtimeClassName"].as_str()
        && !runtime_classes.iter().any(|r| r == rc)
    {
        out.push(v(
            format!("{at}.runtimeClassName"),
            &format!(
                "runtime class `{rc}` is not one whose sandbox the cgroup hooks see (allowed: {})",
                if runtime_classes.is_empty() {
                    "none".to_string()
                } else {
                    runtime_classes.join(", ")
                }
            ),
        ));
    }
    if let Some(vols) = spec["volumes"].as_array() {
        for (i, vol) in vols.iter().enumerate() {
            if let Some(p) = vol["hostPath"]["path"].as_str() {
                out.push(v(
                    format!("{at}.volumes[{i}].hostPath"),
                    &format!(
                        "agent pods may not mount host paths (`{p}`: the node's bpffs, cgroupfs, the daemon's state and runtime sockets are all on the host)"
                    ),
                ));
            }
        }
    }
    for kind in ["initContainers", "containers", "ephemeralContainers"] {
        let Some(cs) = spec[kind].as_array() else {
            continue;
        };
        for (i, c) in cs.iter().enumerate() {
            let base = format!("{at}.{kind}[{i}].securityContext");
            let sc = &c["securityContext"];
            if sc["privileged"] == Value::Bool(true) {
                out.push(v(
                    format!("{base}.privileged"),
                    "agent containers may not be privileged (every device, every capability, writable cgroupfs and sysfs)",
                ));
            }
            if let Some(add) = sc["capabilities"]["add"].as_array() {
                for (j, cap) in add.iter().enumerate() {
                    let name = cap.as_str().unwrap_or_default();
                    let bare = name.trim_start_matches("CAP_").to_ascii_uppercase();
                    if FORBIDDEN_CAPS.contains(&bare.as_str()) {
                        out.push(v(
                            format!("{base}.capabilities.add[{j}]"),
                            &format!(
                                "agent containers may not add {name} (raw/packet sockets, network or mount configuration, BPF, tracing)"
                            ),
                        ));
                    }
                }
            }
            if sc["procMount"].as_str() == Some("Unmasked") {
                out.push(v(
                    format!("{base}.procMount"),
                    "agent containers may not unmask /proc",
                ));
            }
        }
    }
    out
}

/// The message of a refusal: every violation, one per line.
pub fn message(kind: &str, name: &str, violations: &[Violation]) -> String {
    let lines: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.message))
        .collect();
    format!(
        "portcullis: {kind} {name} is an agent workload and is refused: {}",
        lines.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(spec: Value) -> Vec<String> {
        check_pod_spec(&spec, "spec", &["runc".into()])
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn a_plain_pod_passes() {
        assert!(
            fields(json!({"containers": [{"name": "a", "image": "x",
            "securityContext": {"capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "w", "emptyDir": {}}], "runtimeClassName": "runc"}))
            .is_empty()
        );
    }

    #[test]
    fn each_escape_is_refused_by_field() {
        let f = fields(json!({
            "hostNetwork": true, "hostPID": true, "hostIPC": true,
            "runtimeClassName": "kata",
            "volumes": [{"name": "e", "emptyDir": {}}, {"name": "b", "hostPath": {"path": "/sys/fs/bpf"}}],
            "initContainers": [{"name": "i", "securityContext": {"privileged": true}}],
            "containers": [{"name": "a", "securityContext": {"capabilities": {"add": ["NET_ADMIN", "CAP_BPF", "chown", "sys_ptrace"]}}}],
            "ephemeralContainers": [{"name": "d", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}, "procMount": "Unmasked"}}]
        }));
        assert_eq!(
            f,
            vec![
                "spec.hostNetwork",
                "spec.hostPID",
                "spec.hostIPC",
                "spec.runtimeClassName",
                "spec.volumes[1].hostPath",
                "spec.initContainers[0].securityContext.privileged",
                "spec.containers[0].securityContext.capabilities.add[0]",
                "spec.containers[0].securityContext.capabilities.add[1]",
                "spec.containers[0].securityContext.capabilities.add[3]",
                "spec.ephemeralContainers[0].securityContext.capabilities.add[0]",
                "spec.ephemeralContainers[0].securityContext.procMount",
            ]
        );
        let m = message(
            "Pod",
            "x",
            &check_pod_spec(&json!({"hostPID": true}), "spec", &[]),
        );
        assert!(m.contains("spec.hostPID") && m.contains("Pod x"), "{m}");
    }
}
