//! Which pod a cgroup belongs to. The kernel tells the daemon the cgroup id of the
//! process that opened a connection; the kubelet names pod cgroups after the pod UID
//! (`kubepods-besteffort-pod<uid>.slice` with the systemd driver, `pod<uid>` with
//! cgroupfs), so the id → path → UID mapping needs no API call and cannot be forged
//! from inside the pod.
use std::{
    collections::{HashMap, VecDeque},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::k8s::PodRef;

/// Maps cgroup ids below the attach point to pods, caching answers.
pub struct PodResolver {
    root: PathBuf,
    cache: Mutex<HashMap<u64, Option<PodRef>>>,
}

const MAX_DEPTH: usize = 12;
const CACHE_MAX: usize = 16384;

impl PodResolver {
    pub fn new(root: &Path) -> Self {
        PodResolver {
            root: root.to_owned(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The pod of cgroup `id`, or None when the cgroup is not (below) a pod's.
    pub fn resolve(&self, id: u64) -> Option<PodRef> {
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return hit.clone();
        }
        let found = find_cgroup(&self.root, id).and_then(|p| pod_of_path(&p));
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(id, found.clone());
        found
    }
}

/// Breadth-first search for the cgroup directory whose inode is `id`.
fn find_cgroup(root: &Path, id: u64) -> Option<PathBuf> {
    let mut queue = VecDeque::from([(root.to_owned(), 0usize)]);
    while let Some((dir, depth)) = queue.pop_front() {
        match std::fs::metadata(&dir) {
            Ok(m) if m.ino() == id => return Some(dir),
            Ok(_) => {}
            Err(_) => continue,
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                queue.push_back((e.path(), depth + 1));
            }
        }
    }
    None
}

/// The pod UID named by any component of a cgroup path.
pub fn pod_of_path(path: &Path) -> Option<PodRef> {
    path.components().rev().find_map(|c| {
        let s = c.as_os_str().to_str()?;
        let s = s.strip_suffix(".slice").unwrap_or(s);
        let at = s.rfind("pod")?;
        let uid = s[at + 3..].replace('_', "-");
        is_uid(&uid).then_some(PodRef {
            namespace: None,
            name: None,
            uid,
        })
    })
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f2a1c9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b";

    #[test]
    fn systemd_and_cgroupfs_names_give_the_pod_uid() {
        for p in [
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3f2a1c9e_5b7d_4e8f_9a0b_1c2d3e4f5a6b.slice/cri-containerd-abc.scope",
            "/sys/fs/cgroup/kubepods.slice/kubepods-pod3f2a1c9e_5b7d_4e8f_9a0b_1c2d3e4f5a6b.slice",
            "/sys/fs/cgroup/kubepods/burstable/pod3f2a1c9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b/0123abcd",
        ] {
            assert_eq!(
                pod_of_path(Path::new(p)).map(|p| p.uid).as_deref(),
                Some(UID),
                "{p}"
            );
        }
    }

    #[test]
    fn other_cgroups_are_not_pods() {
        for p in [
            "/sys/fs/cgroup/system.slice/sshd.service",
            "/sys/fs/cgroup/kubepods.slice/kubepods-podnotauid.slice",
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice",
        ] {
            assert_eq!(pod_of_path(Path::new(p)), None, "{p}");
        }
    }

    #[test]
    fn finds_a_directory_by_inode() {
        let d = std::env::temp_dir().join(format!("pc-pod-test-{}", std::process::id()));
        let leaf = d.join(format!("a/kubepods-pod{}.slice/c", UID.replace('-', "_")));
        std::fs::create_dir_all(&leaf).unwrap();
        let id = std::fs::metadata(&leaf).unwrap().ino();
        let r = PodResolver::new(&d);
        assert_eq!(r.resolve(id).map(|p| p.uid).as_deref(), Some(UID));
        assert_eq!(r.resolve(u64::MAX), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
