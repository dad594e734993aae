//! Keeping the programs in effect: every `kernel.verify_interval` (and once at start)
//! the attachment and every enrolled cgroup are checked (`effect.rs`). A broken
//! attachment (a link detached by someone, the attach cgroup re-created) is repaired by
//! attaching a fresh set beside the old one (no gap), then checked again; an enrolled
//! cgroup still without the programs in effect is frozen (`kernel.freeze_unenforced`)
//! until they are, and thawed once they are. Every change is reported: the daemon log,
//! `kernel-effect.json` (read by `status` and `doctor`), and a record for the event log
//! and the audit chain.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use portcullis_common::Settings;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{AttachState, Effect, KernelError, Paths, PinnedMaps, effect, load};

/// What the watcher tells the event log and the audit chain.
#[derive(Debug, Clone, Serialize)]
pub struct EffectReport {
    pub time: String,
    /// `enforcement_gap`, `enforcement_repaired` or `enforcement_restored`.
    pub kind: &'static str,
    pub attachment: Vec<String>,
    pub uncovered: Vec<effect::Uncovered>,
    /// What the daemon did: re-attached, froze or thawed cgroups.
    pub actions: Vec<String>,
}

pub struct Watch {
    pub object: Vec<u8>,
    pub attach_cgroup: PathBuf,
    pub paths: Paths,
    pub state_file: PathBuf,
    pub effect_file: PathBuf,
    pub settings: Settings,
    pub freeze: bool,
    pub interval: Duration,
}

impl Watch {
    fn enrolled(&self) -> Result<Vec<u64>, KernelError> {
        Ok(PinnedMaps::open(&self.paths.maps())?.enrolled())
    }

    fn state(&self) -> Option<AttachState> {
        std::fs::read(&self.state_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// One check, with repair and freezing; the report if anything is or was wrong.
    pub fn once(&self, frozen: &mut BTreeSet<PathBuf>) -> (Effect, Option<EffectReport>) {
        let enrolled = self.enrolled().unwrap_or_default();
        let Some(state) = self.state() else {
            let e = Effect {
                attachment: vec!["no kernel-state.json".into()],
                ..Effect::default()
            };
            return (e, None);
        };
        let mut e = effect::check(&self.attach_cgroup, &self.paths, &state, &enrolled);
        let mut actions = Vec::new();
        let mut kind = "enforcement_gap";
        let first = e.clone();
        if !e.attachment.is_empty() {
            error!(problems = ?e.attachment, "kernel programs are not in effect: re-attaching");
            let settings = self.settings;
            match load::start(
                &self.object,
                &self.attach_cgroup,
                &self.paths,
                &self.state_file,
                true,
                |maps| maps.write_settings(&settings),
            ) {
                Ok(new) => {
                    actions.push(format!(
                        "re-attached every program ({} links)",
                        new.programs.len()
                    ));
                    e = effect::check(&self.attach_cgroup, &self.paths, &new, &enrolled);
                    if e.attachment.is_empty() {
                        kind = "enforcement_repaired";
                    }
                }
                Err(err) => actions.push(format!("re-attaching failed: {err}")),
            }
        }
        // Fail closed: freeze what the programs do not cover; thaw what they cover again.
        let uncovered: BTreeSet<PathBuf> =
            e.uncovered.iter().filter_map(|u| u.path.clone()).collect();
        if self.freeze {
            for p in &uncovered {
                if !frozen.contains(p) {
                    match freeze(p, true) {
                        Ok(()) => {
                            actions.push(format!("froze {}", p.display()));
                            frozen.insert(p.clone());
                        }
                        Err(err) => actions.push(format!("freezing {}: {err}", p.display())),
                    }
                }
            }
        }
        let thaw: Vec<PathBuf> = frozen.difference(&uncovered).cloned().collect();
        for p in thaw {
            if freeze(&p, false).is_ok() {
                actions.push(format!("thawed {}", p.display()));
            }
            frozen.remove(&p);
        }
        let _ = write_effect(&self.effect_file, &e);
        let report = (!first.ok || !actions.is_empty()).then(|| {
            if first.ok && e.ok {
                kind = "enforcement_restored";
            }
            EffectReport {
                time: e.time.clone(),
                kind,
                attachment: first.attachment.clone(),
                uncovered: e.uncovered.clone(),
                actions,
            }
        });
        (e, report)
    }

    /// Checks every interval until the receiver goes away; reports each change.
    pub async fn run(self, tx: mpsc::Sender<EffectReport>) {
        let watch = std::sync::Arc::new(self);
        let mut frozen = BTreeSet::new();
        let mut last: Option<(Vec<String>, Vec<effect::Uncovered>)> = None;
        loop {
            let w = watch.clone();
            let mut f = std::mem::take(&mut frozen);
            let Ok((e, report, f)) = tokio::task::spawn_blocking(move || {
                let (e, r) = w.once(&mut f);
                (e, r, f)
            })
            .await
            else {
                return;
            };
            frozen = f;
            let now = (e.attachment.clone(), e.uncovered.clone());
            if let Some(r) = report {
                // A gap that stays as it was is reported once, not every interval.
                let unchanged = r.actions.is_empty() && last.as_ref() == Some(&now);
                if !unchanged {
                    if e.ok {
                        info!(kind = r.kind, actions = ?r.actions, "kernel programs in effect again");
                    } else {
                        warn!(kind = r.kind, attachment = ?e.attachment, uncovered = ?e.uncovered, actions = ?r.actions,
                              "kernel programs are not in effect on every enrolled cgroup");
                    }
                    if tx.send(r).await.is_err() {
                        return;
                    }
                }
            }
            last = Some(now);
            tokio::time::sleep(watch.interval).await;
        }
    }
}

fn freeze(cgroup: &Path, frozen: bool) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.freeze"), if frozen { "1" } else { "0" })
}

fn write_effect(path: &Path, e: &Effect) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(e)?)?;
    std::fs::rename(&tmp, path)
}
