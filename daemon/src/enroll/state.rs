//! What is enrolled and why: the pods of this node the daemon knows, the namespaces'
//! labels, and the decisions, independent of where the events come from (the
//! watchers) and where enrollment is written (the pinned map), so both sides can be
//! faked in tests.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::config::Enrollment;

/// The kernel side: finding a pod's cgroup, and the agent map.
pub trait Cgroups {
    /// The pod's cgroup directory and id, once runc has created it.
    fn pod_cgroup(&self, uid: &str) -> Option<(PathBuf, u64)>;
    /// Every cgroup id that exists below the attach point (None: cannot tell).
    fn live_ids(&self) -> Option<HashSet<u64>>;
    /// The id of the cgroup at `path` now (`NotFound`: it was removed).
    fn current_id(&self, path: &Path) -> std::io::Result<u64>;
    fn enroll(&mut self, id: u64) -> Result<(), String>;
    fn unenroll(&mut self, id: u64) -> Result<(), String>;
    fn enrolled(&self) -> Vec<u64>;
}

/// What the enroller needs of a pod.
#[derive(Debug, Clone)]
pub struct PodView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Tracked {
    view: PodView,
    /// Selected once: stays an agent until deleted.
    agent: bool,
    cgroup: Option<(PathBuf, u64)>,
}

pub struct Enroller<C: Cgroups> {
    selector: Enrollment,
    kernel: C,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    pods: HashMap<String, Tracked>,
}

impl<C: Cgroups> Enroller<C> {
    pub fn new(selector: Enrollment, kernel: C) -> Self {
        Enroller {
            selector,
            kernel,
            namespaces: HashMap::new(),
            pods: HashMap::new(),
        }
    }

    fn try_enroll(kernel: &mut C, t: &mut Tracked) {
        if !t.agent || t.cgroup.is_some() {
            return;
        }
        let Some((path, id)) = kernel.pod_cgroup(&t.view.uid) else {
            return;
        };
        match kernel.enroll(id) {
            Ok(()) => {
                info!(pod = %format!("{}/{}", t.view.namespace, t.view.name), uid = %t.view.uid,
                      cgroup = %path.display(), id, "enrolled agent pod");
                t.cgroup = Some((path, id));
            }
            Err(e) => warn!(uid = %t.view.uid, error = %e, "enrolling agent pod"),
        }
    }

    fn selects(&self, v: &PodView) -> bool {
        let empty = BTreeMap::new();
        let ns = self.namespaces.get(&v.namespace).unwrap_or(&empty);
        self.selector.selects(&v.namespace, &v.labels, ns)
    }

    /// A pod on this node was added or changed.
    pub fn pod(&mut self, view: PodView) {
        let selected = self.selects(&view);
        let t = self.pods.entry(view.uid.clone()).or_insert(Tracked {
            view: view.clone(),
            agent: false,
            cgroup: None,
        });
        t.view = view;
        t.agent |= selected;
        Self::try_enroll(&mut self.kernel, t);
    }

    /// A pod is gone from this node.
    pub fn pod_gone(&mut self, uid: &str) {
        if let Some(t) = self.pods.remove(uid)
            && let Some((path, id)) = t.cgroup
        {
            match self.kernel.unenroll(id) {
                Ok(()) => info!(uid, cgroup = %path.display(), id, "unenrolled deleted pod"),
                Err(e) => warn!(uid, error = %e, "unenrolling deleted pod"),
            }
        }
    }

    /// The set of pods after a (re)list: anything not in it is gone.
    pub fn pods_listed(&mut self, uids: &HashSet<String>) {
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !uids.contains(*u))
            .cloned()
            .collect();
        for u in gone {
            self.pod_gone(&u);
        }
    }

    /// A namespace's labels (new or changed): its pods are judged again.
    pub fn namespace(&mut self, name: &str, labels: BTreeMap<String, String>) {
        self.namespaces.insert(name.to_string(), labels);
        let uids: Vec<String> = self
            .pods
            .values()
            .filter(|t| t.view.namespace == name)
            .map(|t| t.view.uid.clone())
            .collect();
        for u in uids {
            if let Some(view) = self.pods.get(&u).map(|t| t.view.clone()) {
                self.pod(view);
            }
        }
    }

    /// Agent pods whose cgroup did not exist yet are looked up again; an enrolled pod
    /// cgroup that was removed (the pod completed) or replaced (a new sandbox, whose
    /// init containers — the barrier first — run again) is unenrolled, and a
    /// replacement enrolled.
    pub fn tick(&mut self) {
        for t in self.pods.values_mut() {
            Self::refresh(&mut self.kernel, t);
            Self::try_enroll(&mut self.kernel, t);
        }
    }

    fn refresh(kernel: &mut C, t: &mut Tracked) {
        let Some((path, id)) = &t.cgroup else {
            return;
        };
        let why = match kernel.current_id(path) {
            Ok(now) if now == *id => return,
            Ok(_) => "replaced",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "removed",
            // Cannot tell: keep the entry (a wrong removal would open a gap).
            Err(_) => return,
        };
        // Nothing runs in a removed cgroup: dropping its entry opens no gap.
        match kernel.unenroll(*id) {
            Ok(()) => {
                info!(uid = %t.view.uid, cgroup = %path.display(), id, why, "unenrolled pod cgroup");
                t.cgroup = None;
            }
            Err(e) => warn!(uid = %t.view.uid, id, error = %e, "unenrolling a {why} pod cgroup"),
        }
    }

    /// Map entries whose cgroup no longer exists are removed (the map stays bounded
    /// by the cgroups alive on the node). Returns how many.
    pub fn collect_garbage(&mut self) -> usize {
        let Some(live) = self.kernel.live_ids() else {
            return 0;
        };
        let owned: HashSet<u64> = self
            .pods
            .values()
            .filter_map(|t| t.cgroup.as_ref().map(|c| c.1))
            .collect();
        let stale: Vec<u64> = self
            .kernel
            .enrolled()
            .into_iter()
            .filter(|id| !live.contains(id) && !owned.contains(id))
            .collect();
        for id in &stale {
            if let Err(e) = self.kernel.unenroll(*id) {
                warn!(id, error = %e, "removing a stale enrollment");
            }
        }
        if !stale.is_empty() {
            info!(
                count = stale.len(),
                "removed enrollments of cgroups that no longer exist"
            );
        }
        stale.len()
    }

    /// (namespace/name, enrolled) of the agent pods known, for status.
    pub fn agents(&self) -> Vec<(String, bool)> {
        let mut v: Vec<(String, bool)> = self
            .pods
            .values()
            .filter(|t| t.agent)
            .map(|t| {
                (
                    format!("{}/{}", t.view.namespace, t.view.name),
                    t.cgroup.is_some(),
                )
            })
            .collect();
        v.sort();
        v
    }
}

/// The real kernel side: the pinned map and the cgroup tree below the attach point.
pub struct PinnedCgroups {
    pub root: PathBuf,
    pub maps: std::sync::Arc<std::sync::Mutex<crate::kernel::PinnedMaps>>,
}

impl Cgroups for PinnedCgroups {
    fn pod_cgroup(&self, uid: &str) -> Option<(PathBuf, u64)> {
        super::cgroups::pod_cgroup(&self.root, uid)
    }
    fn live_ids(&self) -> Option<HashSet<u64>> {
        super::cgroups::live_ids(&self.root, 6)
    }
    fn current_id(&self, path: &Path) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        // A cgroup v2 directory's inode number is its cgroup id.
        std::fs::metadata(path).map(|m| m.ino())
    }
    fn enroll(&mut self, id: u64) -> Result<(), String> {
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enroll(id)
            .map_err(|e| e.to_string())
    }
    fn unenroll(&mut self, id: u64) -> Result<(), String> {
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unenroll(id)
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn enrolled(&self) -> Vec<u64> {
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enrolled()
    }
}

impl PinnedCgroups {
    pub fn new(
        root: &Path,
        maps: std::sync::Arc<std::sync::Mutex<crate::kernel::PinnedMaps>>,
    ) -> Self {
        PinnedCgroups {
            root: root.to_owned(),
            maps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        cgroups: HashMap<String, u64>,
        live: HashSet<u64>,
        map: HashSet<u64>,
    }

    impl Cgroups for Fake {
        fn pod_cgroup(&self, uid: &str) -> Option<(PathBuf, u64)> {
            self.cgroups
                .get(uid)
                .map(|id| (PathBuf::from(format!("/cg/pod{uid}")), *id))
        }
        fn live_ids(&self) -> Option<HashSet<u64>> {
            Some(self.live.clone())
        }
        fn current_id(&self, path: &Path) -> std::io::Result<u64> {
            let uid = path
                .to_str()
                .and_then(|p| p.strip_prefix("/cg/pod"))
                .unwrap_or_default();
            self.cgroups
                .get(uid)
                .copied()
                .ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn enroll(&mut self, id: u64) -> Result<(), String> {
            self.map.insert(id);
            Ok(())
        }
        fn unenroll(&mut self, id: u64) -> Result<(), String> {
            self.map.remove(&id);
            Ok(())
        }
        fn enrolled(&self) -> Vec<u64> {
            self.map.iter().copied().collect()
        }
    }

    fn sel() -> Enrollment {
        Enrollment {
            node_name: "n".into(),
            namespace_labels: [("agents".to_string(), "on".to_string())].into(),
            pod_labels: [("agent".to_string(), "true".to_string())].into(),
            exempt_namespaces: vec!["portcullis-system".into()],
        }
    }

    fn pod(uid: &str, ns: &str, labels: &[(&str, &str)]) -> PodView {
        PodView {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("p-{uid}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn selected_pods_are_enrolled_once_their_cgroup_exists_and_removed_when_gone() {
        let mut e = Enroller::new(sel(), Fake::default());
        e.pod(pod("a", "x", &[("agent", "true")]));
        assert!(e.kernel.map.is_empty(), "no cgroup yet");
        e.kernel.cgroups.insert("a".into(), 11);
        e.tick();
        assert_eq!(e.kernel.enrolled(), vec![11]);
        // Removing the label later does not release it.
        e.pod(pod("a", "x", &[]));
        assert_eq!(e.kernel.enrolled(), vec![11]);
        e.pod_gone("a");
        assert!(e.kernel.map.is_empty());
    }

    #[test]
    fn removed_or_replaced_pod_cgroups_are_unenrolled_and_replacements_enrolled() {
        let mut e = Enroller::new(sel(), Fake::default());
        e.kernel.cgroups.insert("a".into(), 11);
        e.kernel.cgroups.insert("b".into(), 21);
        e.pod(pod("a", "x", &[("agent", "true")]));
        e.pod(pod("b", "x", &[("agent", "true")]));
        let mut got = e.kernel.enrolled();
        got.sort();
        assert_eq!(got, vec![11, 21]);
        // a completed (its cgroup removed, the pod object still there); b's sandbox
        // was re-created (a new cgroup, a new id).
        e.kernel.cgroups.remove("a");
        e.kernel.cgroups.insert("b".into(), 22);
        e.tick();
        assert_eq!(e.kernel.enrolled(), vec![22]);
        assert_eq!(
            e.agents(),
            vec![("x/p-a".to_string(), false), ("x/p-b".to_string(), true)]
        );
    }

    #[test]
    fn namespace_labels_select_and_others_are_untouched() {
        let mut f = Fake::default();
        f.cgroups.insert("a".into(), 1);
        f.cgroups.insert("b".into(), 2);
        f.cgroups.insert("c".into(), 3);
        let mut e = Enroller::new(sel(), f);
        e.pod(pod("a", "agents-ns", &[]));
        e.pod(pod("b", "plain", &[]));
        e.pod(pod("c", "portcullis-system", &[("agent", "true")]));
        assert!(e.kernel.map.is_empty());
        e.namespace(
            "agents-ns",
            [("agents".to_string(), "on".to_string())].into(),
        );
        assert_eq!(e.kernel.enrolled(), vec![1]);
        assert_eq!(e.agents(), vec![("agents-ns/p-a".to_string(), true)]);
    }

    #[test]
    fn relist_and_garbage_collection_keep_the_map_bounded() {
        let mut f = Fake::default();
        f.cgroups.insert("a".into(), 1);
        f.cgroups.insert("b".into(), 2);
        // 7: enrolled by an earlier daemon for a pod deleted while it was down.
        f.map.insert(7);
        // 8: enrolled by hand, cgroup still there.
        f.map.insert(8);
        f.live = [1, 2, 8].into();
        let mut e = Enroller::new(sel(), f);
        e.pod(pod("a", "x", &[("agent", "true")]));
        e.pod(pod("b", "x", &[("agent", "true")]));
        assert_eq!(e.collect_garbage(), 1);
        let mut m = e.kernel.enrolled();
        m.sort();
        assert_eq!(m, vec![1, 2, 8]);
        e.pods_listed(&["a".to_string()].into());
        let mut m = e.kernel.enrolled();
        m.sort();
        assert_eq!(m, vec![1, 8]);
    }
}
