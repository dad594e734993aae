//! Are the programs actually in effect? A pinned link says nothing about whether its
//! program still runs: someone may have detached it (`bpftool link detach`), the attach
//! cgroup may have been removed and re-created (the links stay on the dead one), an
//! enrolled cgroup may have been removed (its id stays in the map) or never have been
//! below the attach point. So the kernel is asked, for every enrolled cgroup, which
//! programs are in effect there (`BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE`, which
//! includes what ancestors pass down), and every pinned link what it is attached to.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use portcullis_common::MAX_CGROUP_DEPTH;
use serde::{Deserialize, Serialize};

use super::{AttachState, Paths, cgroup, sys};

/// An enrolled cgroup the programs do not cover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uncovered {
    pub cgroup_id: u64,
    /// Where it is, if it is below the attach point at all.
    pub path: Option<PathBuf>,
    pub why: String,
}

/// One verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    pub time: String,
    /// Nothing is wrong.
    pub ok: bool,
    /// Problems with the attachment itself (fixed by attaching again).
    pub attachment: Vec<String>,
    /// Enrolled cgroups without the programs in effect.
    pub uncovered: Vec<Uncovered>,
    pub enrolled: usize,
    /// Enrolled ids whose cgroup no longer exists anywhere in the cgroup v2 tree (a
    /// completed or deleted pod): nothing runs there, so no gap; the enroller drops them.
    #[serde(default)]
    pub removed: Vec<u64>,
}

/// A pinned cgroup link: its attach type and program.
struct CgroupLink {
    name: String,
    attach_type: u32,
    prog_id: u32,
}

/// Checks every pinned link of `state` and every enrolled cgroup id.
pub fn check(attach_cgroup: &Path, paths: &Paths, state: &AttachState, enrolled: &[u64]) -> Effect {
    let mut e = Effect {
        time: crate::util::rfc3339_micros(std::time::SystemTime::now()),
        enrolled: enrolled.len(),
        ..Effect::default()
    };
    let (links, problems) = links_of(paths, state, attach_cgroup);
    e.attachment = problems;
    match std::fs::File::open(attach_cgroup) {
        Ok(root) => e
            .attachment
            .extend(missing(&root, &links, "the attach cgroup")),
        Err(err) => e
            .attachment
            .push(format!("attach cgroup {}: {err}", attach_cgroup.display())),
    }
    let below = index_below(attach_cgroup);
    // Only when some id is not below the attach point: the whole hierarchy.
    let mut everywhere: Option<HashMap<u64, PathBuf>> = None;
    for &id in enrolled {
        let Some(path) = below.get(&id) else {
            let all = everywhere.get_or_insert_with(|| index_below(&mount_root(attach_cgroup)));
            if !all.contains_key(&id) && all.len() < MAX_INDEXED {
                e.removed.push(id);
                continue;
            }
            e.uncovered.push(Uncovered {
                cgroup_id: id,
                path: None,
                why: format!(
                    "not below the attach point {} (removed, or enrolled outside it): no program sees its sockets",
                    attach_cgroup.display()
                ),
            });
            continue;
        };
        if let Err(why) = covered(path, &links) {
            e.uncovered.push(Uncovered {
                cgroup_id: id,
                path: Some(path.clone()),
                why,
            });
        }
    }
    e.ok = e.attachment.is_empty() && e.uncovered.is_empty();
    e
}

/// Whether the programs of `state` are in effect on `path` (enrollment time).
pub fn check_one(
    path: &Path,
    attach_cgroup: &Path,
    paths: &Paths,
    state: &AttachState,
) -> Result<(), String> {
    let root = std::fs::canonicalize(attach_cgroup)
        .map_err(|e| format!("attach cgroup {}: {e}", attach_cgroup.display()))?;
    let p = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !p.starts_with(&root) {
        return Err(format!(
            "{} is not below kernel.attach_cgroup {}: the programs attached there never see its sockets, so enrolling it would look enforced without being enforced",
            p.display(),
            root.display()
        ));
    }
    let (links, problems) = links_of(paths, state, attach_cgroup);
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    covered(&p, &links)
}

fn links_of(
    paths: &Paths,
    state: &AttachState,
    attach_cgroup: &Path,
) -> (Vec<CgroupLink>, Vec<String>) {
    let root_id = cgroup::id_of(attach_cgroup).ok();
    let mut links = Vec::new();
    let mut problems = Vec::new();
    for (name, _, _) in &state.programs {
        let facts = match sys::pinned_link_facts(&paths.link(name)) {
            Ok(f) => f,
            Err(e) => {
                problems.push(format!("{name}: pinned link unreadable or gone: {e}"));
                continue;
            }
        };
        if facts.prog_id == 0 {
            problems.push(format!("{name}: link {} was detached", facts.id));
            continue;
        }
        if facts.link_type != sys::BPF_LINK_TYPE_CGROUP {
            continue;
        }
        if facts.cgroup_id == 0 {
            problems.push(format!("{name}: link {} was detached", facts.id));
            continue;
        }
        if Some(facts.cgroup_id) != root_id {
            problems.push(format!(
                "{name}: attached to cgroup {} but the attach point {} is cgroup {} (removed and re-created?)",
                facts.cgroup_id,
                attach_cgroup.display(),
                root_id.map_or("(missing)".to_string(), |i| i.to_string())
            ));
        }
        links.push(CgroupLink {
            name: name.clone(),
            attach_type: facts.attach_type,
            prog_id: facts.prog_id,
        });
    }
    (links, problems)
}

/// The cgroup links whose program is not in effect on the cgroup open as `dir`.
fn missing(dir: &std::fs::File, links: &[CgroupLink], what: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in links {
        match sys::effective_prog_ids(dir, l.attach_type) {
            Ok(ids) if ids.contains(&l.prog_id) => {}
            Ok(_) => out.push(format!(
                "{}: program {} is not in effect on {what}",
                l.name, l.prog_id
            )),
            Err(e) => out.push(format!("{}: querying {what}: {e}", l.name)),
        }
    }
    out
}

fn covered(path: &Path, links: &[CgroupLink]) -> Result<(), String> {
    let dir = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let gaps = missing(&dir, links, &path.display().to_string());
    if gaps.is_empty() {
        Ok(())
    } else {
        Err(gaps.join("; "))
    }
}

/// Most cgroups indexed below the attach point per verification (a bound on the walk).
const MAX_INDEXED: usize = 200_000;

/// cgroup id -> path of every cgroup below (and including) `root`.
/// The root of the cgroup filesystem `path` is on: the highest ancestor on the same
/// device.
fn mount_root(path: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let Ok(dev) = std::fs::metadata(path).map(|m| m.dev()) else {
        return path.to_path_buf();
    };
    let mut root = path.to_path_buf();
    while let Some(parent) = root.parent() {
        if std::fs::metadata(parent).map(|m| m.dev()).ok() != Some(dev) {
            break;
        }
        root = parent.to_path_buf();
    }
    root
}

fn index_below(root: &Path) -> HashMap<u64, PathBuf> {
    let mut out = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), 0u32)];
    while let Some((dir, depth)) = stack.pop() {
        if let Ok(id) = cgroup::id_of(&dir) {
            out.insert(id, dir.clone());
        }
        if depth >= MAX_CGROUP_DEPTH || out.len() >= MAX_INDEXED {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for ent in rd.flatten() {
            if ent.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((ent.path(), depth + 1));
            }
        }
    }
    out
}
