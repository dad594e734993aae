//! What is masked in which response: a plan per request (paths, detectors,
//! placeholders), built from the configured rules once.
use std::{borrow::Cow, sync::Arc};

use base64::Engine;

use super::{
    Detectors, Encoding, MAX_DEPTH, MaskError, PLACEHOLDER, PLACEHOLDER_B64_JSON, PLACEHOLDER_JSON,
    paths::{Path, ROOTS, Seg},
};
use crate::{config, k8s::RequestInfo};

/// A `proxy.masking` setting that cannot be used (the cause is the source).
#[derive(Debug, thiserror::Error)]
pub enum MaskConfigError {
    #[error("proxy.masking.fingerprint_key_file {}", path.display())]
    FingerprintKey {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("proxy.masking.rules[{index}]")]
    Rule {
        index: usize,
        #[source]
        source: MaskError,
    },
}

/// What the masker applies to one response.
#[derive(Debug, Clone)]
pub struct Plan {
    pub(super) paths: Vec<(Path, Encoding)>,
    pub(super) detectors: Option<std::sync::Arc<Detectors>>,
    pub(super) fingerprint: Option<ring::hmac::Key>,
    /// By the number of open containers (up to `MAX_DEPTH`): bit `r` set where a value
    /// in the innermost one is exactly as deep below [`ROOTS`]`[r]` as some path or the
    /// last-applied annotation (3 deep), so worth looking up there.
    pub(super) depth_roots: Vec<u8>,
}

impl Plan {
    pub fn new(
        paths: Vec<(Path, Encoding)>,
        detectors: Option<std::sync::Arc<Detectors>>,
        fingerprint: Option<ring::hmac::Key>,
    ) -> Self {
        // The deepest a value below a root can be and still be masked by path, and bit
        // n (n < 64) set where some path (or the annotation) is exactly n deep.
        let max_rel_depth = paths
            .iter()
            .map(|(p, _)| p.0.len())
            .max()
            .unwrap_or(0)
            .max(3);
        let rel_depths = paths
            .iter()
            .filter(|(p, _)| p.0.len() < 64)
            .fold(1u64 << 3, |a, (p, _)| a | 1 << p.0.len());
        let depth_roots = (0..=MAX_DEPTH)
            .map(|n| {
                ROOTS.iter().enumerate().fold(0u8, |bits, (r, root)| {
                    let deep = n >= root.len()
                        && n - root.len() <= max_rel_depth
                        && (n - root.len() >= 64 || rel_depths & 1 << (n - root.len()) != 0);
                    if deep { bits | 1 << r } else { bits }
                })
            })
            .collect();
        Plan {
            paths,
            detectors,
            fingerprint,
            depth_roots,
        }
    }

    /// The built-in rule for core/v1 Secrets.
    pub fn secret_paths() -> Vec<(Path, Encoding)> {
        vec![
            (Path(vec![Seg::Key(b"data".to_vec())]), Encoding::Base64),
            (Path(vec![Seg::Key(b"stringData".to_vec())]), Encoding::Text),
        ]
    }

    pub(super) fn placeholder(&self, enc: Encoding, value: &[u8], out: &mut Vec<u8>) {
        if self.fingerprint.is_none() {
            // The common case, without encoding anything per value.
            out.extend_from_slice(match enc {
                Encoding::Text => PLACEHOLDER_JSON.as_bytes(),
                Encoding::Base64 => PLACEHOLDER_B64_JSON.as_bytes(),
            });
            return;
        }
        let text: Cow<str> = match &self.fingerprint {
            None => Cow::Borrowed(PLACEHOLDER),
            Some(k) => {
                let tag = ring::hmac::sign(k, value);
                Cow::Owned(format!("{PLACEHOLDER}:{}", hex::encode(&tag.as_ref()[..8])))
            }
        };
        out.push(b'"');
        match enc {
            Encoding::Text => out.extend_from_slice(text.as_bytes()),
            Encoding::Base64 => out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(text.as_bytes())
                    .as_bytes(),
            ),
        }
        out.push(b'"');
    }
}

/// What is masked in which responses: built once from `proxy.masking`.
pub struct Masking {
    pub(super) detectors: Option<Arc<Detectors>>,
    fingerprint: Option<ring::hmac::Key>,
    rules: Vec<ResourceRule>,
    /// Shared plans for the common cases (no configured rule applies).
    secrets: Arc<Plan>,
    pub(super) others: Arc<Plan>,
}

/// Configured paths for some resources.
#[derive(Debug, Clone)]
pub struct ResourceRule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub paths: Vec<(Path, Encoding)>,
}

impl ResourceRule {
    fn matches(&self, group: &str, resource: &str) -> bool {
        let any = |v: &[String], x: &str| v.iter().any(|s| s == "*" || s == x);
        any(&self.api_groups, group) && any(&self.resources, resource)
    }
}

impl Masking {
    /// Masking as `proxy.masking` configures it.
    pub fn from_config(m: &config::Masking) -> Result<Masking, MaskConfigError> {
        let fingerprint = match &m.fingerprint_key_file {
            Some(p) => {
                let k = std::fs::read(p).map_err(|source| MaskConfigError::FingerprintKey {
                    path: p.clone(),
                    source,
                })?;
                Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k))
            }
            None => None,
        };
        let mut rules = Vec::new();
        for (index, r) in m.rules.iter().enumerate() {
            let paths = r
                .paths
                .iter()
                .map(|p| p.parse().map(|p| (p, r.encoding)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| MaskConfigError::Rule { index, source })?;
            rules.push(ResourceRule {
                api_groups: r.api_groups.clone(),
                resources: r.resources.clone(),
                paths,
            });
        }
        Ok(Masking::new(m.detectors, fingerprint, rules))
    }

    pub fn new(
        detectors: bool,
        fingerprint: Option<ring::hmac::Key>,
        rules: Vec<ResourceRule>,
    ) -> Self {
        let detectors = detectors.then(|| Arc::new(Detectors::new()));
        Masking {
            secrets: Arc::new(Plan::new(
                Plan::secret_paths(),
                detectors.clone(),
                fingerprint.clone(),
            )),
            others: Arc::new(Plan::new(
                Vec::new(),
                detectors.clone(),
                fingerprint.clone(),
            )),
            detectors,
            fingerprint,
            rules,
        }
    }

    /// The plan for a request's response; `None` for the server's schema documents
    /// (OpenAPI), which describe types and carry no object data, and are served as the
    /// client asked (often protobuf).
    pub fn plan(&self, info: &RequestInfo) -> Option<Arc<Plan>> {
        if !info.is_resource_request
            && (info.path == "/openapi/v2" || info.path.starts_with("/openapi/v3"))
        {
            return None;
        }
        let secret = info.api_group.is_empty() && info.resource == "secrets";
        let extra: Vec<&ResourceRule> = if info.is_resource_request {
            self.rules
                .iter()
                .filter(|r| r.matches(&info.api_group, &info.resource))
                .collect()
        } else {
            Vec::new()
        };
        if extra.is_empty() {
            return Some(if secret {
                self.secrets.clone()
            } else {
                self.others.clone()
            });
        }
        let mut paths = if secret {
            Plan::secret_paths()
        } else {
            Vec::new()
        };
        paths.extend(extra.into_iter().flat_map(|r| r.paths.iter().cloned()));
        Some(Arc::new(Plan::new(
            paths,
            self.detectors.clone(),
            self.fingerprint.clone(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::B64_PLACEHOLDER;

    #[test]
    fn placeholder_constants_are_the_placeholder() {
        use base64::Engine;
        assert_eq!(PLACEHOLDER_JSON, format!("\"{PLACEHOLDER}\""));
        let b64 = base64::engine::general_purpose::STANDARD.encode(PLACEHOLDER);
        assert_eq!(PLACEHOLDER_B64_JSON, format!("\"{b64}\""));
        assert_eq!(B64_PLACEHOLDER, b64);
    }
}
