//! Where the kubelet (with runc) puts a pod's cgroup v2 below its pod cgroup root, for
//! both cgroup drivers, and which cgroups exist at all (for removing stale entries).
use std::{
    collections::{HashSet, VecDeque},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The pod's cgroup v2 directory below `root` (`kubepods` / `kubepods.slice`), if it
/// exists yet, with its id.
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<(PathBuf, u64)> {
    // The attach point may also be the kubelet's cgroupRoot, one level above.
    [
        root.to_path_buf(),
        root.join("kubepods"),
        root.join("kubepods.slice"),
    ]
    .iter()
    .find_map(|r| pod_cgroup_below(r, uid))
}

fn pod_cgroup_below(root: &Path, uid: &str) -> Option<(PathBuf, u64)> {
    let sd = uid.replace('-', "_");
    let candidates = [
        // cgroupfs driver: guaranteed pods directly below, the others below their QoS.
        root.join(format!("pod{uid}")),
        root.join("burstable").join(format!("pod{uid}")),
        root.join("besteffort").join(format!("pod{uid}")),
        // systemd driver.
        root.join(format!("kubepods-pod{sd}.slice")),
        root.join("kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{sd}.slice")),
        root.join("kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{sd}.slice")),
    ];
    candidates.into_iter().find_map(|p| {
        let m = std::fs::metadata(&p).ok()?;
        (m.is_dir() && p.join("cgroup.procs").exists()).then(|| {
            let ino = m.ino();
            (p, ino)
        })
    })
}

/// The ids of every cgroup at most `depth` levels below `root` (and root's own), or
/// None when `root` cannot be read (then nothing may be judged stale).
pub fn live_ids(root: &Path, depth: usize) -> Option<HashSet<u64>> {
    const MAX: usize = 200_000;
    let mut ids = HashSet::from([std::fs::metadata(root).ok()?.ino()]);
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    while let Some((dir, d)) = queue.pop_front() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Ok(m) = e.metadata() {
                ids.insert(m.ino());
            }
            if d + 1 < depth && ids.len() < MAX {
                queue.push_back((e.path(), d + 1));
            }
        }
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_pods_of_both_drivers_and_lists_ids() {
        let d = std::env::temp_dir().join(format!("pc-enroll-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let uid = "3f2a1c9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b";
        let a = d.join("burstable").join(format!("pod{uid}"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("cgroup.procs"), "").unwrap();
        let (p, id) = pod_cgroup(&d, uid).expect("cgroupfs layout");
        assert_eq!(p, a);
        assert!(live_ids(&d, 4).unwrap().contains(&id));
        assert_eq!(pod_cgroup(&d, "00000000-0000-0000-0000-000000000000"), None);
        let sd = d
            .join("kubepods-besteffort.slice")
            .join("kubepods-besteffort-pod3f2a1c9e_5b7d_4e8f_9a0b_1c2d3e4f5a6b.slice");
        // Created before the old one goes, so no new directory can reuse its inode
        // number (the id) and make the check below fail by chance.
        std::fs::create_dir_all(&sd).unwrap();
        std::fs::write(sd.join("cgroup.procs"), "").unwrap();
        std::fs::remove_dir_all(d.join("burstable")).unwrap();
        assert_eq!(pod_cgroup(&d, uid).map(|x| x.0), Some(sd));
        assert!(!live_ids(&d, 4).unwrap().contains(&id));
        assert_eq!(live_ids(&d.join("missing"), 4), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
