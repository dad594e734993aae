//! Evidence off the node. Root on the node holds the audit key, so whoever can edit
//! the log can re-sign it; what they cannot edit is what already left the node. The
//! daemon publishes each signed head of its open segment (at most every few seconds,
//! and once more when it stops) with its public key to an anchor outside the node —
//! a Kubernetes object written with the daemon's credential — and ships heads with
//! every batch to the audit sink. A head commits to every record before it (the chain
//! hashes), so `audit verify --anchor` checks a log against the newest anchor: records
//! cut, edited or replaced while the daemon was stopped no longer hash to it.
use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::chain::{Head, hash_line, head_path, list_segments, seg_path};

/// What an anchor holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Anchor {
    /// The newest signed head the daemon published.
    pub head: Head,
    /// The daemon's audit public key, hex (so a verifier need not take the key from
    /// beside the log).
    pub public_key: String,
    /// When it was published (RFC 3339).
    #[serde(default)]
    pub updated: String,
}

/// Why an anchor could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("not an anchor (a ConfigMap with data `head` and `publicKey`, or their JSON): {0}")]
    Format(String),
    #[error("the anchor store: {0}")]
    Store(String),
}

type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, AnchorError>> + Send + 'a>>;

/// Where anchors are kept (the Kubernetes object lives in `upstream`).
pub trait AnchorStore: Send + Sync {
    fn publish<'a>(&'a self, anchor: &'a Anchor) -> Fut<'a, ()>;
    fn fetch(&self) -> Fut<'_, Option<Anchor>>;
    /// Where, for messages.
    fn describe(&self) -> String;
}

impl Anchor {
    /// The fields of the ConfigMap's `data`.
    pub fn to_data(&self) -> serde_json::Value {
        serde_json::json!({
            "head": serde_json::to_string(&self.head).unwrap_or_default(),
            "publicKey": self.public_key,
            "updated": self.updated,
        })
    }

    /// From a ConfigMap (JSON or YAML, as `kubectl get -o json|yaml` prints it), its
    /// `data`, or an anchor's own JSON.
    pub fn parse(text: &str) -> Result<Anchor, AnchorError> {
        let v: serde_json::Value =
            serde_yaml_ng::from_str(text).map_err(|e| AnchorError::Format(e.to_string()))?;
        if let Ok(a) = serde_json::from_value::<Anchor>(v.clone()) {
            return Ok(a);
        }
        let data = if v.get("data").is_some() {
            &v["data"]
        } else {
            &v
        };
        let head = data["head"]
            .as_str()
            .ok_or_else(|| AnchorError::Format("no `head`".into()))?;
        Ok(Anchor {
            head: serde_json::from_str(head).map_err(|e| AnchorError::Format(e.to_string()))?,
            public_key: data["publicKey"]
                .as_str()
                .ok_or_else(|| AnchorError::Format("no `publicKey`".into()))?
                .to_owned(),
            updated: data["updated"].as_str().unwrap_or("").to_owned(),
        })
    }
}

/// The head of the newest segment in `dir`.
pub fn latest_head(dir: &Path) -> Option<Head> {
    let n = *list_segments(dir).ok()?.last()?;
    serde_json::from_slice(&std::fs::read(head_path(dir, n)).ok()?).ok()
}

/// What is wrong with the log in `dir` measured against `anchor`, verified with
/// `public_key` (32 bytes): the anchor's own signature, and whether the log still
/// holds the record the anchor vouches for, unchanged.
pub fn check(dir: &Path, anchor: &Anchor, public_key: &[u8]) -> Vec<String> {
    let mut problems = Vec::new();
    let h = &anchor.head;
    if hex::decode(&anchor.public_key).ok().as_deref() != Some(public_key) {
        problems.push(
            "the anchor carries another public key than the one verifying the log: the log is signed by a different key than the one published".into(),
        );
    }
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    let sig_ok = hex::decode(&h.sig)
        .ok()
        .is_some_and(|s| key.verify(&h.signed_bytes(), &s).is_ok());
    if !sig_ok {
        problems.push("the anchored head's signature does not verify with the key".into());
    }
    if h.last_seq < h.first_seq {
        // An empty segment's head vouches for its chain_in only.
        return problems;
    }
    match hash_at(dir, h.segment, h.last_seq) {
        Some(hash) if hash == h.last_hash => {}
        Some(_) => problems.push(format!(
            "the record at seq {} is not the one the anchor (published {}) vouches for: records were edited or replaced after they left the node",
            h.last_seq, anchor.updated
        )),
        None => problems.push(format!(
            "the log no longer holds seq {} that the anchor (published {}) vouches for: records were cut",
            h.last_seq, anchor.updated
        )),
    }
    problems
}

/// The hash of the line with `seq` (looked for in `segment` first, then everywhere).
fn hash_at(dir: &Path, segment: u64, seq: u64) -> Option<String> {
    let mut order = vec![segment];
    order.extend(
        list_segments(dir)
            .ok()?
            .into_iter()
            .filter(|n| *n != segment),
    );
    for n in order {
        let Ok(text) = std::fs::read(seg_path(dir, n)) else {
            continue;
        };
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let s = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["seq"].as_u64());
            if s == Some(seq) {
                return Some(hash_line(line));
            }
        }
    }
    None
}

fn now_rfc3339() -> String {
    let ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    crate::util::rfc3339_nanos(ns)
}

/// Publishes the newest signed head of `dir` whenever it changed, at most once per
/// `every`.
pub async fn publish_heads(
    store: Arc<dyn AnchorStore>,
    dir: std::path::PathBuf,
    public_key: String,
    committed: Arc<tokio::sync::Notify>,
    every: Duration,
) {
    let mut last: Option<Head> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = committed.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
        let Some(head) = latest_head(&dir) else {
            continue;
        };
        if last.as_ref() == Some(&head) {
            continue;
        }
        let anchor = Anchor {
            head: head.clone(),
            public_key: public_key.clone(),
            updated: now_rfc3339(),
        };
        match store.publish(&anchor).await {
            Ok(()) => {
                if failing {
                    info!(anchor = %store.describe(), "audit anchor published again");
                }
                failing = false;
                last = Some(head);
            }
            Err(e) => {
                if !failing {
                    warn!(anchor = %store.describe(), error = %e, "audit anchor cannot be published; retrying");
                }
                failing = true;
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Publishes the newest head once (when the daemon stops).
pub async fn publish_last(store: &dyn AnchorStore, dir: &Path, public_key: &str) {
    if let Some(head) = latest_head(dir) {
        let anchor = Anchor {
            head,
            public_key: public_key.to_owned(),
            updated: now_rfc3339(),
        };
        if let Err(e) = store.publish(&anchor).await {
            warn!(anchor = %store.describe(), error = %e, "the final audit anchor was not published");
        }
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::KeyPair;

    use super::*;
    use crate::audit::{AuditWriter, Kind, load_or_create_key};

    fn tmp(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("pc-anchor-{tag}-"))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn records_cut_and_re_signed_on_the_node_are_caught_against_the_anchor() {
        let tmp = tmp("cut");
        let d = tmp.path();
        let key = load_or_create_key(&d.join("audit.key")).unwrap();
        let public = key.public_key().as_ref().to_vec();
        let dir = d.join("audit");
        let mut w = AuditWriter::open(&dir, key, 1 << 20).unwrap();
        for i in 0..10 {
            w.append(Kind::Request, &serde_json::json!({"i": i}))
                .unwrap();
        }
        w.commit().unwrap();
        drop(w);
        let anchor = Anchor {
            head: latest_head(&dir).unwrap(),
            public_key: hex::encode(&public),
            updated: "t".into(),
        };
        // Round trip through the ConfigMap form.
        let cm =
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "data": anchor.to_data()});
        assert_eq!(Anchor::parse(&cm.to_string()).unwrap(), anchor);
        assert!(check(&dir, &anchor, &public).is_empty());
        // Root on the node cuts the last three records and re-signs the head with the
        // node's key: the log verifies on its own, not against the anchor.
        let p = seg_path(&dir, 1);
        let text = std::fs::read_to_string(&p).unwrap();
        let kept: Vec<&str> = text.lines().take(7).collect();
        std::fs::write(&p, format!("{}\n", kept.join("\n"))).unwrap();
        let mut h = anchor.head.clone();
        h.last_seq = 7;
        h.last_hash = hash_line(kept[6].as_bytes());
        let k2 = load_or_create_key(&d.join("audit.key")).unwrap();
        h.sig = hex::encode(k2.sign(&h.signed_bytes()).as_ref());
        std::fs::write(head_path(&dir, 1), serde_json::to_vec(&h).unwrap()).unwrap();
        assert!(
            crate::audit::verify(&dir, &public)
                .unwrap()
                .problems
                .is_empty()
        );
        let p = check(&dir, &anchor, &public);
        assert!(
            p.iter().any(|x| x.contains("no longer holds seq 10")),
            "{p:?}"
        );
        // Records appended to reach the anchored seq again do not hash to it.
        let mut w = AuditWriter::open(&dir, k2, 1 << 20).unwrap();
        for i in 0..5 {
            w.append(Kind::Request, &serde_json::json!({"forged": i}))
                .unwrap();
        }
        w.commit().unwrap();
        let p = check(&dir, &anchor, &public);
        assert!(
            p.iter().any(|x| x.contains("is not the one the anchor")),
            "{p:?}"
        );
        // Another key than the anchored one.
        let other = ring::signature::Ed25519KeyPair::from_pkcs8(
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .unwrap()
                .as_ref(),
        )
        .unwrap();
        let p = check(&dir, &anchor, other.public_key().as_ref());
        assert!(p.iter().any(|x| x.contains("another public key")), "{p:?}");
        assert!(Anchor::parse("kind: ConfigMap\ndata: {}\n").is_err());
    }
}
