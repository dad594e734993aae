//! Holding a request for a human, deciding (approve, deny, revoke), expiring.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    Approval, Approver, DecideError, Grant, Held, MAX_PENDING_PER_SUBJECT, Revocation, State,
    Store, StoreError, journal::Journal, notify::Notifier,
};
use crate::{
    audit::AuditLog,
    identity::Identity,
    k8s::{Attributes, RequestScope},
    policy::{ApprovalSpec, Policy},
    util::{random_id as new_id, unix_secs as now},
};

struct Inner {
    approvals: HashMap<String, Approval>,
    grants: HashMap<String, Grant>,
    waiters: HashMap<String, watch::Sender<State>>,
}

/// What [`Approvals::open_or_reuse`] found or made.
enum Opened {
    TooMany {
        pending: usize,
    },
    Waiting {
        approval_id: String,
        rx: watch::Receiver<State>,
        /// Made by this call (to be announced).
        created: Option<Box<Approval>>,
    },
}

pub struct Approvals {
    store: Arc<dyn Store>,
    inner: Mutex<Inner>,
    journal: Journal,
    notifier: Option<Notifier>,
    pending_ttl: Duration,
}

impl Approvals {
    pub fn open(
        store: Arc<dyn Store>,
        audit_path: &Path,
        notifier: Option<Notifier>,
        pending_ttl: Duration,
    ) -> Result<Approvals, StoreError> {
        let approvals = store
            .approvals()?
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect::<HashMap<_, _>>();
        let grants = store
            .grants()?
            .into_iter()
            .map(|g| (g.id.clone(), g))
            .collect::<HashMap<_, _>>();
        info!(
            approvals = approvals.len(),
            pending = approvals
                .values()
                .filter(|a| a.state == State::Pending)
                .count(),
            grants = grants.len(),
            "approval store loaded"
        );
        let journal = Journal::open(audit_path)?;
        Ok(Approvals {
            store,
            inner: Mutex::new(Inner {
                approvals,
                grants,
                waiters: HashMap::new(),
            }),
            journal,
            notifier,
            pending_ttl,
        })
    }

    /// Also records every state change in the audit chain.
    pub fn chained(mut self, log: Arc<AuditLog>) -> Self {
        self.journal.chain(log);
        self
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(
        &self,
        event: &str,
        id: &str,
        by: Option<&str>,
        a: Option<&Approval>,
        g: Option<&Grant>,
    ) {
        self.journal.record(event, id, by, a, g);
    }

    /// An active grant for this identity and exactly this request.
    pub fn active_grant(&self, id: &Identity, scope: &RequestScope) -> Option<String> {
        let t = now();
        self.inner()
            .grants
            .values()
            .find(|g| {
                g.username == id.user.username
                    && g.issuer == id.issuer
                    && g.subject == id.subject
                    && &g.scope == scope
                    && g.active(t)
            })
            .map(|g| g.id.clone())
    }

    /// Holds a request that needs approval: reuses a pending approval for the same
    /// subject and attributes (an agent's retry does not page anyone again), or opens
    /// and announces a new one, then waits up to the rule's hold time. Opening one
    /// writes it durably (an fsynced transaction): that runs on a blocking thread, so
    /// the event loop serving this request goes on serving its other connections.
    pub async fn hold(
        self: &Arc<Self>,
        id: &Identity,
        attrs: &Attributes,
        scope: &RequestScope,
        rule: &str,
        message: &str,
        spec: &ApprovalSpec,
    ) -> Result<Held, StoreError> {
        if let Some(grant_id) = self.active_grant(id, scope) {
            return Ok(Held::Granted { grant_id });
        }
        let opened = {
            let (this, id, attrs, scope) = (self.clone(), id.clone(), attrs.clone(), scope.clone());
            let (rule, message, spec) = (rule.to_owned(), message.to_owned(), spec.clone());
            tokio::task::spawn_blocking(move || {
                this.open_or_reuse(&id, &attrs, &scope, &rule, &message, &spec)
            })
            .await
            .map_err(|e| {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
                StoreError::Interrupted(e.to_string())
            })??
        };
        let (approval_id, mut rx) = match opened {
            Opened::TooMany { pending } => return Ok(Held::TooMany { pending }),
            Opened::Waiting {
                approval_id,
                rx,
                created,
            } => {
                if let Some(a) = created {
                    info!(approval = %a.id, subject = %a.subject.username, request = %a.request, rule, "approval requested");
                    self.record("approval.requested", &a.id, None, Some(&a), None);
                    if let Some(n) = &self.notifier {
                        n.announce(&a);
                    }
                }
                (approval_id, rx)
            }
        };
        let decided = tokio::time::timeout(spec.hold, rx.wait_for(|s| *s != State::Pending)).await;
        let state = match decided {
            Ok(Ok(s)) => s.clone(),
            _ => {
                // Timed out (or the waiter went away): look at the record itself.
                match self.inner().approvals.get(&approval_id) {
                    Some(a) => a.state.clone(),
                    None => State::Pending,
                }
            }
        };
        Ok(match state {
            State::Pending => Held::Pending { approval_id },
            State::Approved { .. } => match self.active_grant(id, scope) {
                Some(grant_id) => Held::Granted { grant_id },
                // Approved but the grant is already gone (revoked at once).
                None => Held::Pending { approval_id },
            },
            State::Denied { by, reason, .. } => Held::Denied {
                approval_id,
                by,
                reason,
            },
            State::Expired { .. } => Held::Expired { approval_id },
        })
    }

    /// The pending approval this request waits on: an existing one for the same
    /// subject and scope, or a new one, durable before anyone can see it (under the
    /// lock, so an approval is never decided before its own first write). Blocking.
    fn open_or_reuse(
        &self,
        id: &Identity,
        attrs: &Attributes,
        scope: &RequestScope,
        rule: &str,
        message: &str,
        spec: &ApprovalSpec,
    ) -> Result<Opened, StoreError> {
        let mut inner = self.inner();
        let existing = inner
            .approvals
            .values()
            .find(|a| {
                a.state == State::Pending
                    && a.subject.username == id.user.username
                    && a.subject.issuer == id.issuer
                    && &a.scope == scope
                    && a.expires_at > now()
            })
            .map(|a| a.id.clone());
        let (aid, created) = match existing {
            Some(aid) => (aid, None),
            None => {
                let t = now();
                let pending = inner
                    .approvals
                    .values()
                    .filter(|a| {
                        a.state == State::Pending
                            && a.subject.username == id.user.username
                            && a.expires_at > t
                    })
                    .count();
                if pending >= MAX_PENDING_PER_SUBJECT {
                    return Ok(Opened::TooMany { pending });
                }
                let a = Approval {
                    id: new_id("apr"),
                    created_at: t,
                    expires_at: t.saturating_add(self.pending_ttl.as_secs()),
                    subject: id.into(),
                    request: attrs.clone(),
                    scope: scope.clone(),
                    rule: rule.into(),
                    message: message.into(),
                    approvers: spec.approvers.clone(),
                    grant_ttl_secs: spec.grant_ttl.as_secs(),
                    state: State::Pending,
                    grant_id: None,
                };
                self.store.put_approval(&a)?;
                inner.approvals.insert(a.id.clone(), a.clone());
                (a.id.clone(), Some(Box::new(a)))
            }
        };
        let rx = inner
            .waiters
            .entry(aid.clone())
            .or_insert_with(|| watch::channel(State::Pending).0)
            .subscribe();
        Ok(Opened::Waiting {
            approval_id: aid,
            rx,
            created,
        })
    }

    pub fn list(&self) -> Vec<Approval> {
        self.expire_due();
        let mut v: Vec<Approval> = self.inner().approvals.values().cloned().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Option<Approval> {
        self.expire_due();
        self.inner().approvals.get(id).cloned()
    }

    pub fn grants(&self) -> Vec<Grant> {
        let mut v: Vec<Grant> = self.inner().grants.values().cloned().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    fn check_decider(&self, a: &Approval, who: &Approver) -> Result<(), DecideError> {
        if who.is(&a.subject) {
            return Err(DecideError::SelfApproval {
                who: who.user.username.clone(),
                id: a.id.clone(),
            });
        }
        if !who.node_admin && !Policy::is_listed_approver(&a.approvers, &who.user) {
            return Err(DecideError::NotApprover {
                who: who.user.username.clone(),
                rule: a.rule.clone(),
            });
        }
        Ok(())
    }

    fn pending(&self, id: &str) -> Result<Approval, DecideError> {
        self.expire_due();
        let a = self
            .inner()
            .approvals
            .get(id)
            .cloned()
            .ok_or_else(|| DecideError::NotFound(id.into()))?;
        if a.state != State::Pending {
            return Err(DecideError::NotPending {
                id: id.into(),
                state: a.state.name(),
            });
        }
        Ok(a)
    }

    pub fn approve(
        &self,
        id: &str,
        who: &Approver,
        justification: Option<String>,
    ) -> Result<(Approval, Grant), DecideError> {
        let mut a = self.pending(id)?;
        self.check_decider(&a, who)?;
        let t = now();
        let g = Grant {
            id: new_id("grt"),
            approval_id: a.id.clone(),
            username: a.subject.username.clone(),
            issuer: a.subject.issuer.clone(),
            subject: a.subject.subject.clone(),
            request: a.request.clone(),
            scope: a.scope.clone(),
            approved_by: who.user.username.clone(),
            created_at: t,
            expires_at: t.saturating_add(a.grant_ttl_secs),
            revoked: None,
            expiry_recorded: false,
        };
        a.state = State::Approved {
            by: who.user.username.clone(),
            at: t,
            justification,
        };
        a.grant_id = Some(g.id.clone());
        self.store.put_both(&a, &g)?;
        {
            let mut inner = self.inner();
            inner.approvals.insert(a.id.clone(), a.clone());
            inner.grants.insert(g.id.clone(), g.clone());
            if let Some(tx) = inner.waiters.remove(&a.id) {
                let _ = tx.send(a.state.clone());
            }
        }
        info!(approval = %a.id, grant = %g.id, by = %who.user.username, ttl_s = a.grant_ttl_secs, "approved");
        self.record(
            "approval.approved",
            &a.id,
            Some(&who.user.username),
            Some(&a),
            Some(&g),
        );
        Ok((a, g))
    }

    pub fn deny(&self, id: &str, who: &Approver, reason: String) -> Result<Approval, DecideError> {
        let mut a = self.pending(id)?;
        self.check_decider(&a, who)?;
        a.state = State::Denied {
            by: who.user.username.clone(),
            at: now(),
            reason,
        };
        self.store.put_approval(&a)?;
        {
            let mut inner = self.inner();
            inner.approvals.insert(a.id.clone(), a.clone());
            if let Some(tx) = inner.waiters.remove(&a.id) {
                let _ = tx.send(a.state.clone());
            }
        }
        info!(approval = %a.id, by = %who.user.username, "denied");
        self.record(
            "approval.denied",
            &a.id,
            Some(&who.user.username),
            Some(&a),
            None,
        );
        Ok(a)
    }

    pub fn revoke(&self, grant_id: &str, who: &Approver) -> Result<Grant, DecideError> {
        let mut g = self
            .inner()
            .grants
            .get(grant_id)
            .cloned()
            .ok_or_else(|| DecideError::NotFound(grant_id.into()))?;
        if g.revoked.is_some() {
            return Err(DecideError::NotPending {
                id: grant_id.into(),
                state: "revoked",
            });
        }
        g.revoked = Some(Revocation {
            by: who.user.username.clone(),
            at: now(),
        });
        self.store.put_grant(&g)?;
        self.inner().grants.insert(g.id.clone(), g.clone());
        info!(grant = %g.id, by = %who.user.username, "grant revoked");
        self.record(
            "grant.revoked",
            &g.id,
            Some(&who.user.username),
            None,
            Some(&g),
        );
        Ok(g)
    }

    /// Marks pending approvals past their expiry as expired and records grant expiries.
    pub fn expire_due(&self) {
        let t = now();
        let (approvals, grants) = {
            let inner = self.inner();
            (
                inner
                    .approvals
                    .values()
                    .filter(|a| a.state == State::Pending && t >= a.expires_at)
                    .cloned()
                    .collect::<Vec<_>>(),
                inner
                    .grants
                    .values()
                    .filter(|g| g.revoked.is_none() && t >= g.expires_at && !g.expiry_recorded)
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        };
        for mut a in approvals {
            a.state = State::Expired { at: t };
            if let Err(e) = self.store.put_approval(&a) {
                warn!(error = %e, approval = %a.id, "recording an expiry");
                continue;
            }
            {
                let mut inner = self.inner();
                inner.approvals.insert(a.id.clone(), a.clone());
                if let Some(tx) = inner.waiters.remove(&a.id) {
                    let _ = tx.send(a.state.clone());
                }
            }
            info!(approval = %a.id, "approval expired undecided");
            self.record("approval.expired", &a.id, None, Some(&a), None);
        }
        for mut g in grants {
            g.expiry_recorded = true;
            if let Err(e) = self.store.put_grant(&g) {
                warn!(error = %e, grant = %g.id, "recording an expiry");
                continue;
            }
            self.inner().grants.insert(g.id.clone(), g.clone());
            info!(grant = %g.id, "grant expired");
            self.record("grant.expired", &g.id, None, None, Some(&g));
        }
    }

    pub async fn sweep(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.expire_due();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SubjectSpec;
    use crate::{approvals::RedbStore, k8s::UserInfo};

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pc-approvals-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn agent() -> Identity {
        Identity {
            issuer: "k8s".into(),
            subject: "system:serviceaccount:e2e:agent".into(),
            user: UserInfo {
                username: "system:serviceaccount:e2e:agent".into(),
                groups: vec![],
            },
            token_id: "t".into(),
            expires_at: u64::MAX,
            token_pod: None,
            kernel_pod: None,
        }
    }

    fn attrs(name: &str) -> Attributes {
        Attributes {
            verb: "delete".into(),
            api_group: String::new(),
            resource: "configmaps".into(),
            subresource: String::new(),
            namespace: "e2e".into(),
            name: name.into(),
            path: String::new(),
        }
    }

    fn scope(name: &str) -> RequestScope {
        RequestScope::new(
            "DELETE",
            &format!("/api/v1/namespaces/e2e/configmaps/{name}"),
            "",
            "",
            b"",
            "pod-a",
        )
    }

    fn spec(hold_ms: u64, ttl_s: u64) -> ApprovalSpec {
        ApprovalSpec {
            approvers: vec![SubjectSpec {
                kind: crate::policy::SubjectKind::Group,
                name: "oncall".into(),
                namespace: None,
            }],
            hold: Duration::from_millis(hold_ms),
            grant_ttl: Duration::from_secs(ttl_s),
        }
    }

    fn redb(d: &Path) -> RedbStore {
        RedbStore::open(&d.join("approvals.redb")).expect("a fresh redb store in the test's dir")
    }

    fn open_with(d: &Path, store: Arc<dyn Store>) -> Arc<Approvals> {
        Arc::new(
            Approvals::open(
                store,
                &d.join("approvals.jsonl"),
                None,
                Duration::from_secs(3600),
            )
            .expect("approvals open over a fresh store"),
        )
    }

    fn open(d: &Path) -> Arc<Approvals> {
        open_with(d, Arc::new(redb(d)))
    }

    fn root() -> Approver {
        Approver {
            user: UserInfo {
                username: "alice".into(),
                groups: vec![],
            },
            issuer: String::new(),
            subject: String::new(),
            node_admin: true,
        }
    }

    /// A store whose approval writes take `delay` (an fsync on a slow disk).
    struct SlowStore {
        inner: RedbStore,
        delay: Duration,
    }

    impl Store for SlowStore {
        fn put_approval(&self, a: &Approval) -> Result<(), StoreError> {
            std::thread::sleep(self.delay);
            self.inner.put_approval(a)
        }
        fn put_grant(&self, g: &Grant) -> Result<(), StoreError> {
            self.inner.put_grant(g)
        }
        fn put_both(&self, a: &Approval, g: &Grant) -> Result<(), StoreError> {
            self.inner.put_both(a, g)
        }
        fn approvals(&self) -> Result<Vec<Approval>, StoreError> {
            self.inner.approvals()
        }
        fn grants(&self) -> Result<Vec<Grant>, StoreError> {
            self.inner.grants()
        }
    }

    /// The request is served on a single-threaded event loop (as `#[tokio::test]`'s
    /// runtime is): while a new approval's durable write takes its time, that loop's
    /// other tasks keep running.
    #[tokio::test]
    async fn opening_an_approval_does_not_stall_the_event_loop() {
        let d = tmp("slow");
        let ap = open_with(
            &d,
            Arc::new(SlowStore {
                inner: redb(&d),
                delay: Duration::from_millis(400),
            }),
        );
        let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let started = std::time::Instant::now();
        let h = ap
            .hold(&agent(), &attrs("a"), &scope("a"), "r", "m", &spec(20, 60))
            .await
            .expect("the slow store's write succeeds");
        let took = started.elapsed();
        ticker.abort();
        assert!(matches!(h, Held::Pending { .. }), "{h:?}");
        assert!(took >= Duration::from_millis(400), "{took:?}");
        // ~40 ticks while the write ran; a blocked loop gets only the ~2 of the hold.
        let n = ticks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n >= 15, "the loop was stalled: {n} ticks in {took:?}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn approved_while_held_proceeds_and_the_grant_is_scoped() {
        let d = tmp("held");
        let ap = open(&d);
        let ap2 = ap.clone();
        let approver = tokio::spawn(async move {
            loop {
                if let Some(a) = ap2.list().into_iter().find(|a| a.state == State::Pending) {
                    return ap2.approve(&a.id, &root(), Some("ok".into())).unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let held = ap
            .hold(
                &agent(),
                &attrs("a"),
                &scope("a"),
                "r",
                "m",
                &spec(5000, 60),
            )
            .await
            .unwrap();
        let (_, g) = approver.await.unwrap();
        assert!(
            matches!(held, Held::Granted { ref grant_id } if *grant_id == g.id),
            "{held:?}"
        );
        // Scoped: the same subject and attributes only.
        assert!(ap.active_grant(&agent(), &scope("a")).is_some());
        assert!(ap.active_grant(&agent(), &scope("b")).is_none());
        let mut someone_else = agent();
        someone_else.subject = "system:serviceaccount:e2e:other".into();
        someone_else.user.username = someone_else.subject.clone();
        assert!(ap.active_grant(&someone_else, &scope("a")).is_none());
        // The same request from another pod, or with another body, is not covered.
        let mut other_pod = scope("a");
        other_pod.pod_uid = "pod-b".into();
        assert!(ap.active_grant(&agent(), &other_pod).is_none());
        let other_body = RequestScope::new(
            "DELETE",
            "/api/v1/namespaces/e2e/configmaps/a",
            "",
            "application/json",
            br#"{"propagationPolicy":"Orphan"}"#,
            "pod-a",
        );
        assert!(ap.active_grant(&agent(), &other_body).is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn undecided_stays_pending_survives_a_restart_and_retries_reuse_it() {
        let d = tmp("restart");
        let ap = open(&d);
        let h = ap
            .hold(&agent(), &attrs("a"), &scope("a"), "r", "m", &spec(50, 60))
            .await
            .unwrap();
        let Held::Pending { approval_id } = h else {
            panic!("{h:?}")
        };
        let h2 = ap
            .hold(&agent(), &attrs("a"), &scope("a"), "r", "m", &spec(50, 60))
            .await
            .unwrap();
        assert!(matches!(h2, Held::Pending { approval_id: ref b } if *b == approval_id));
        drop(ap);
        let ap = open(&d);
        assert_eq!(ap.get(&approval_id).unwrap().state, State::Pending);
        ap.approve(&approval_id, &root(), None).unwrap();
        drop(ap);
        let ap = open(&d);
        let h3 = ap
            .hold(&agent(), &attrs("a"), &scope("a"), "r", "m", &spec(50, 60))
            .await
            .unwrap();
        assert!(matches!(h3, Held::Granted { .. }), "{h3:?}");
        let log = std::fs::read_to_string(d.join("approvals.jsonl")).unwrap();
        assert_eq!(log.matches("approval.requested").count(), 1);
        assert_eq!(log.matches("approval.approved").count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn self_approval_non_approvers_and_double_decisions_are_refused() {
        let d = tmp("rules");
        let ap = open(&d);
        let Held::Pending { approval_id } = ap
            .hold(&agent(), &attrs("a"), &scope("a"), "r", "m", &spec(10, 60))
            .await
            .unwrap()
        else {
            panic!()
        };
        let me = Approver {
            user: UserInfo {
                username: agent().user.username,
                groups: vec!["oncall".into()],
            },
            issuer: String::new(),
            subject: String::new(),
            node_admin: true,
        };
        assert!(matches!(
            ap.approve(&approval_id, &me, None),
            Err(DecideError::SelfApproval { .. })
        ));
        let outsider = Approver {
            user: UserInfo {
                username: "bob".into(),
                groups: vec!["devs".into()],
            },
            issuer: String::new(),
            subject: String::new(),
            node_admin: false,
        };
        assert!(matches!(
            ap.approve(&approval_id, &outsider, None),
            Err(DecideError::NotApprover { .. })
        ));
        let oncall = Approver {
            user: UserInfo {
                username: "carol".into(),
                groups: vec!["oncall".into()],
            },
            issuer: String::new(),
            subject: String::new(),
            node_admin: false,
        };
        ap.deny(&approval_id, &oncall, "no".into()).unwrap();
        assert!(matches!(
            ap.approve(&approval_id, &oncall, None),
            Err(DecideError::NotPending { .. })
        ));
        let h = ap
            .hold(&agent(), &attrs("a"), &scope("a"), "r", "m", &spec(10, 60))
            .await
            .unwrap();
        // A denial is final for that approval; a new request opens a new one.
        assert!(
            matches!(h, Held::Pending { approval_id: ref n } if *n != approval_id),
            "{h:?}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The requester is recognised by issuer and `sub`, not by the user name the
    /// policy maps a token to (which an IdP claim such as an email can change).
    #[tokio::test]
    async fn self_approval_is_refused_by_identity_not_by_name() {
        let d = tmp("identity");
        let ap = open(&d);
        let mut alice = agent();
        alice.issuer = "https://idp.test".into();
        alice.subject = "u-1234".into();
        alice.user.username = "oidc:alice@old.example".into();
        let Held::Pending { approval_id } = ap
            .hold(&alice, &attrs("a"), &scope("a"), "r", "m", &spec(10, 60))
            .await
            .unwrap()
        else {
            panic!()
        };
        // The same person, now named by another email, in an approver group.
        let same = Approver {
            user: UserInfo {
                username: "oidc:alice@new.example".into(),
                groups: vec!["oncall".into()],
            },
            issuer: "https://idp.test".into(),
            subject: "u-1234".into(),
            node_admin: false,
        };
        assert!(matches!(
            ap.approve(&approval_id, &same, None),
            Err(DecideError::SelfApproval { .. })
        ));
        // Another subject of the same issuer may.
        let bob = Approver {
            user: UserInfo {
                username: "oidc:bob@example".into(),
                groups: vec!["oncall".into()],
            },
            issuer: "https://idp.test".into(),
            subject: "u-9".into(),
            node_admin: false,
        };
        ap.approve(&approval_id, &bob, None).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn one_subject_cannot_open_unbounded_approvals() {
        let d = tmp("cap");
        let ap = open(&d);
        for i in 0..MAX_PENDING_PER_SUBJECT {
            let h = ap
                .hold(
                    &agent(),
                    &attrs(&format!("n{i}")),
                    &scope(&format!("n{i}")),
                    "r",
                    "m",
                    &spec(1, 60),
                )
                .await
                .unwrap();
            assert!(matches!(h, Held::Pending { .. }), "{h:?}");
        }
        let h = ap
            .hold(
                &agent(),
                &attrs("one-more"),
                &scope("one-more"),
                "r",
                "m",
                &spec(1, 60),
            )
            .await
            .unwrap();
        assert!(
            matches!(h, Held::TooMany { pending } if pending == MAX_PENDING_PER_SUBJECT),
            "{h:?}"
        );
        assert_eq!(ap.list().len(), MAX_PENDING_PER_SUBJECT);
        // A retry of an existing one still reuses it.
        let h = ap
            .hold(&agent(), &attrs("n0"), &scope("n0"), "r", "m", &spec(1, 60))
            .await
            .unwrap();
        assert!(matches!(h, Held::Pending { .. }), "{h:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn grants_expire_and_can_be_revoked() {
        let d = tmp("ttl");
        let ap = open(&d);
        let Held::Pending { approval_id } = ap
            .hold(&agent(), &attrs("a"), &scope("a"), "r", "m", &spec(10, 1))
            .await
            .unwrap()
        else {
            panic!()
        };
        let (_, g) = ap.approve(&approval_id, &root(), None).unwrap();
        assert!(ap.active_grant(&agent(), &scope("a")).is_some());
        ap.revoke(&g.id, &root()).unwrap();
        assert!(ap.active_grant(&agent(), &scope("a")).is_none());
        let Held::Pending { approval_id } = ap
            .hold(&agent(), &attrs("b"), &scope("b"), "r", "m", &spec(10, 1))
            .await
            .unwrap()
        else {
            panic!()
        };
        ap.approve(&approval_id, &root(), None).unwrap();
        assert!(ap.active_grant(&agent(), &scope("b")).is_some());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(ap.active_grant(&agent(), &scope("b")).is_none());
        ap.expire_due();
        let log = std::fs::read_to_string(d.join("approvals.jsonl")).unwrap();
        assert!(log.contains("grant.expired") && log.contains("grant.revoked"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
