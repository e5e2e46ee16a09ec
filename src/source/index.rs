//! The version index: the distinct secrets the watched identities reference (several identities on
//! one secret share one entry) and what is known of each one's current version. Sans-IO: the sweep
//! and the event consumer feed it observations, the controller asks it whether a value must be read.
//!
//! Two facts per secret, kept apart on purpose:
//! - `current`: the version the last *read* (GetSecretValue / BatchGetSecretValue) returned, or,
//!   before any read in this process, the version the identity's Secret already carries (so an
//!   operator restart or a leader change reads nothing). Reads are authoritative.
//! - `listed`: what the last sweep (DescribeSecret / ListSecrets) or event said. A change of it is
//!   what asks for a read; a sweep that lags (ListSecrets is eventually consistent) can only cause one
//!   extra read, never a write of an older version, because what is written comes from the read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AssumedRole, Scope, SecretRef, VersionSelector};

/// One identity, by namespace and name.
pub type IdentityKey = (String, String);

#[derive(Debug, Clone, Default)]
struct Entry {
    /// The identities on this secret, each with its refresh interval. A Vec, not a map: almost
    /// always one identity, and a B-tree node per entry cost ~700 bytes at 10,000 identities.
    identities: Vec<(Arc<IdentityKey>, Duration)>,
    /// The version the last read returned (or the Secret carried when the index was empty).
    current: Option<String>,
    /// What the last sweep or event said.
    listed: Option<String>,
    /// The canonical ARN and name, once a read or a sweep told them (events name secrets so).
    arn: Option<String>,
    name: Option<String>,
    /// When the version was last read, confirmed by a sweep, or seeded from a Secret: how fresh
    /// `current` is.
    checked: Option<Instant>,
    /// When a sweep (or a read) last looked at the version: when the sweep looks again.
    swept: Option<Instant>,
    /// The last version check found the secret deleted or scheduled for deletion.
    gone: bool,
    /// Version checks failed in a row (denied, throttled, unreachable): each one doubles the wait
    /// before the next, so a persistent error never turns into a tight loop of calls.
    check_failures: u8,
}

/// The longest a failing version check waits before it is tried again (the README's retry
/// cadence for failures), unless the secret's own cadence is longer.
pub const FAILED_CHECK_MAX_WAIT: Duration = Duration::from_secs(300);

impl Entry {
    /// Read, seeded from a Secret, or checked once. An entry that is none of these was just
    /// registered by a reconcile that is reading it now: checking its version too would only double
    /// a cold start's calls (the read records what the sweep would have found).
    fn known(&self) -> bool {
        self.current.is_some() || self.checked.is_some()
    }

    /// How long after its last check the secret is checked again: its cadence (the sweep interval
    /// or the shortest refresh interval, whichever is shorter), doubled for each failed check in a
    /// row up to [`FAILED_CHECK_MAX_WAIT`].
    fn check_every(&self, sweep_interval: Duration) -> Duration {
        let cadence = sweep_interval.min(self.refresh());
        if self.check_failures == 0 {
            return cadence;
        }
        let backoff = cadence.saturating_mul(1u32 << self.check_failures.min(16));
        backoff.min(FAILED_CHECK_MAX_WAIT.max(cadence))
    }

    /// The secret's canonical name: told by a read or a check, else the id itself when it is a
    /// name (an ARN id's name is known only once Secrets Manager tells it).
    fn known_name(&self, key: &SecretKey) -> Option<String> {
        self.name
            .clone()
            .or_else(|| (!key.secret_id.starts_with("arn:")).then(|| key.secret_id.clone()))
    }

    /// The identity whose namespace the secret's checks are queued under (its first).
    fn flow(&self) -> Arc<IdentityKey> {
        self.identities
            .first()
            .map(|(identity, _)| identity.clone())
            .unwrap_or_default()
    }

    /// The shortest refresh interval of the identities on this secret: how stale it may get.
    fn refresh(&self) -> Duration {
        self.identities
            .iter()
            .map(|(_, refresh)| *refresh)
            .min()
            .unwrap_or(Duration::MAX)
    }
}

/// A secret the sweep should check now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub secret: SecretRef,
    /// The canonical name, when known (for ListSecrets name filters).
    pub name: Option<String>,
    /// The namespace of its first identity: the flow its check is queued in (see [`fair_order`]).
    pub namespace: Arc<IdentityKey>,
}

/// `due` in fair order: one secret per namespace in turn, so a namespace with thousands of secrets
/// due delays another's first check by at most one check per namespace ahead of it.
pub fn fair_order(due: Vec<Due>) -> Vec<Due> {
    let mut queue = crate::fair::FairQueue::default();
    for due in due {
        queue.push(due.namespace.0.clone(), due);
    }
    std::iter::from_fn(|| queue.pop().map(|(_, due)| due)).collect()
}

/// Keys are shared (`Arc`) between the two maps and the entries' identity lists: one copy of each
/// name per index, not three.
#[derive(Debug, Default)]
pub struct VersionIndex {
    entries: BTreeMap<Arc<SecretKey>, Entry>,
    /// Each identity's secrets (one or two: the certificate's and the CA's), sorted.
    by_identity: BTreeMap<Arc<IdentityKey>, Vec<Arc<SecretKey>>>,
}

/// `SecretRef` as an ordered key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SecretKey {
    region: String,
    role: Option<AssumedRole>,
    secret_id: String,
    /// `S:<stage>` or `I:<id>`.
    selector: String,
}

impl From<&SecretRef> for SecretKey {
    fn from(secret: &SecretRef) -> Self {
        Self {
            region: secret.region.clone(),
            role: secret.role.clone(),
            secret_id: secret.secret_id.clone(),
            selector: match &secret.version {
                VersionSelector::Stage(stage) => format!("S:{stage}"),
                VersionSelector::Id(id) => format!("I:{id}"),
            },
        }
    }
}

impl SecretKey {
    fn secret_ref(&self) -> SecretRef {
        let version = match self.selector.split_once(':') {
            Some(("I", id)) => VersionSelector::Id(id.to_string()),
            Some((_, stage)) => VersionSelector::Stage(stage.to_string()),
            None => VersionSelector::Stage(self.selector.clone()),
        };
        SecretRef {
            secret_id: self.secret_id.clone(),
            region: self.region.clone(),
            role: self.role.clone(),
            version,
        }
    }
}

impl VersionIndex {
    /// Records that `identity` reads exactly `secrets` (checked by the source policy first), with
    /// `refresh` as its staleness bound. Entries no identity references any more are dropped.
    /// Returns whether any of the secrets may now fall due sooner than before (a new identity on
    /// it, or a shorter refresh interval), so a sleeping sweep should look again.
    pub fn register(
        &mut self,
        identity: &IdentityKey,
        secrets: &[SecretRef],
        refresh: Duration,
    ) -> bool {
        let mut wanted: Vec<SecretKey> = secrets.iter().map(SecretKey::from).collect();
        wanted.sort();
        wanted.dedup();
        let (identity, before) = self
            .by_identity
            .remove_entry(identity)
            .unwrap_or_else(|| (Arc::new(identity.clone()), Vec::new()));
        for key in before
            .iter()
            .filter(|key| !wanted.iter().any(|wanted| wanted == key.as_ref()))
        {
            self.detach(&identity, key);
        }
        let mut shared = Vec::with_capacity(wanted.len());
        let mut sooner = false;
        for key in wanted {
            let key = match self.entries.get_key_value(&key) {
                Some((known, _)) => known.clone(),
                None => Arc::new(key),
            };
            let entry = self.entries.entry(key.clone()).or_default();
            match entry
                .identities
                .iter_mut()
                .find(|(known, _)| *known == identity)
            {
                Some((_, known_refresh)) => {
                    sooner |= refresh < *known_refresh;
                    *known_refresh = refresh;
                }
                None => {
                    sooner = true;
                    entry.identities.push((identity.clone(), refresh));
                }
            }
            shared.push(key);
        }
        self.by_identity.insert(identity, shared);
        sooner
    }

    /// Every registered identity.
    pub fn identities(&self) -> impl Iterator<Item = &IdentityKey> {
        self.by_identity.keys().map(|identity| identity.as_ref())
    }

    /// Forgets a deleted identity (and the secrets only it referenced).
    pub fn unregister(&mut self, identity: &IdentityKey) {
        for key in self.by_identity.remove(identity).unwrap_or_default() {
            self.detach(identity, &key);
        }
    }

    fn detach(&mut self, identity: &IdentityKey, key: &SecretKey) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry
                .identities
                .retain(|(known, _)| known.as_ref() != identity);
            if entry.identities.is_empty() {
                self.entries.remove(key);
            }
        }
    }

    /// Seeds an entry no read or check has told anything yet (an empty index after a restart) with
    /// the version the identity's intact Secret carries: trusted until the first sweep, which is
    /// due at once. An explicit write, apart from the queries.
    /// Returns whether it seeded (the entry became sweepable).
    pub fn seed(&mut self, secret: &SecretRef, carried: &str, now: Instant) -> bool {
        if let Some(entry) = self.entries.get_mut(&SecretKey::from(secret))
            && entry.current.is_none()
            && entry.checked.is_none()
        {
            entry.current = Some(carried.to_string());
            entry.checked = Some(now);
            return true;
        }
        false
    }

    /// A read returned `version_id` (with the canonical ARN and name) at `now`. Returns whether
    /// that made the secret known (sweepable) for the first time.
    pub fn record_read(
        &mut self,
        secret: &SecretRef,
        version_id: &str,
        arn: &str,
        name: &str,
        now: Instant,
    ) -> bool {
        let Some(entry) = self.entries.get_mut(&SecretKey::from(secret)) else {
            return false;
        };
        let newly_known = !entry.known();
        {
            entry.current = Some(version_id.to_string());
            entry.arn = Some(arn.to_string());
            entry.name = Some(name.to_string());
            entry.checked = Some(now);
            entry.swept = Some(now);
            // Not `check_failures`: a read that works says nothing of whether checks do.
        }
        newly_known
    }

    /// A version check of `secret` failed at `now` (anything but "not found"): it is checked again
    /// only after its backed-off cadence, not at the next sweep. Returns the failures in a row.
    pub fn check_failed(&mut self, secret: &SecretRef, now: Instant) -> u8 {
        let Some(entry) = self.entries.get_mut(&SecretKey::from(secret)) else {
            return 0;
        };
        entry.swept = Some(now);
        entry.check_failures = entry.check_failures.saturating_add(1);
        entry.check_failures
    }

    /// Whether the last version check of `secret` failed (denied, throttled, unreachable).
    pub fn checks_failing(&self, secret: &SecretRef) -> bool {
        self.entries
            .get(&SecretKey::from(secret))
            .is_some_and(|entry| entry.check_failures > 0)
    }

    /// Records whether the last version check found `secret` deleted (or scheduled for deletion).
    pub fn set_gone(&mut self, secret: &SecretRef, gone: bool) {
        if let Some(entry) = self.entries.get_mut(&SecretKey::from(secret)) {
            entry.gone = gone;
        }
    }

    pub fn is_gone(&self, secret: &SecretRef) -> bool {
        self.entries
            .get(&SecretKey::from(secret))
            .is_some_and(|entry| entry.gone)
    }

    /// The version expected for `secret` now (read, seeded, or what the last check listed).
    pub fn current(&self, secret: &SecretRef) -> Option<&str> {
        self.entries
            .get(&SecretKey::from(secret))?
            .current
            .as_deref()
    }

    /// A version check told `secret`'s canonical ARN and name (kept for listings and events).
    pub fn identify(&mut self, secret: &SecretRef, arn: &str, name: &str) {
        if let Some(entry) = self.entries.get_mut(&SecretKey::from(secret)) {
            if !arn.is_empty() {
                entry.arn = Some(arn.to_string());
            }
            if !name.is_empty() {
                entry.name = Some(name.to_string());
            }
        }
    }

    /// Makes `secret` due for the sweep now (if the sweep checks it at all).
    pub fn sweep_soon(&mut self, secret: &SecretRef) {
        if let Some(entry) = self.entries.get_mut(&SecretKey::from(secret)) {
            entry.swept = None;
        }
    }

    /// When `secret` was last read or checked.
    pub fn checked_at(&self, secret: &SecretRef) -> Option<Instant> {
        self.entries.get(&SecretKey::from(secret))?.checked
    }

    /// A sweep or event says `secret`'s selected version is `version_id` (None: the stage is on no
    /// version, or the secret is gone). Returns the identities to reconcile: those of an entry whose
    /// listed version changed to one that differs from what was read.
    pub fn observe(
        &mut self,
        secret: &SecretRef,
        version_id: Option<&str>,
        now: Instant,
    ) -> Vec<IdentityKey> {
        let Some(entry) = self.entries.get_mut(&SecretKey::from(secret)) else {
            return Vec::new();
        };
        entry.checked = Some(now);
        entry.swept = Some(now);
        entry.check_failures = 0;
        let listed = version_id.map(str::to_string);
        if entry.listed == listed {
            return Vec::new();
        }
        entry.listed = listed.clone();
        if listed.is_some() && listed == entry.current {
            return Vec::new();
        }
        // A different version (or none): the next reconcile of each identity reads it.
        entry.current = listed;
        let mut identities: Vec<IdentityKey> = entry
            .identities
            .iter()
            .map(|(key, _)| IdentityKey::clone(key))
            .collect();
        identities.sort();
        identities
    }

    /// The secrets whose version should be checked at `now`: not checked for `sweep_interval` or
    /// for their identities' refresh interval, whichever is shorter. Pinned version ids never
    /// change, so they are never due.
    pub fn due(&self, now: Instant, sweep_interval: Duration) -> Vec<Due> {
        self.sweepable()
            .filter(|(_, entry)| {
                let every = entry.check_every(sweep_interval);
                entry
                    .swept
                    .is_none_or(|swept| now.saturating_duration_since(swept) >= every)
            })
            .map(|(key, entry)| Due {
                secret: key.secret_ref(),
                name: entry.known_name(key),
                namespace: entry.flow(),
            })
            .collect()
    }

    /// Every sweepable secret in `scope` (a listing confirms all it shows at once, which keeps their
    /// checks aligned: one listing per sweep interval, not one per secret falling due). Not those
    /// being read for the first time: their read tells.
    pub fn in_scope(&self, scope: &Scope) -> Vec<Due> {
        self.sweepable()
            .filter(|(key, _)| key.region == scope.region && key.role == scope.role)
            .map(|(key, entry)| Due {
                secret: key.secret_ref(),
                name: entry.known_name(key),
                namespace: entry.flow(),
            })
            .collect()
    }

    /// The entries the sweep checks: stage-selected (a pinned version id never changes) and known.
    fn sweepable(&self) -> impl Iterator<Item = (&SecretKey, &Entry)> {
        self.entries
            .iter()
            .filter(|(key, entry)| key.selector.starts_with("S:") && entry.known())
            .map(|(key, entry)| (key.as_ref(), entry))
    }

    /// When the next secret falls due (None: nothing to sweep).
    pub fn next_due(&self, now: Instant, sweep_interval: Duration) -> Option<Instant> {
        self.sweepable()
            // Checked (not `+`): an unbounded interval (healthy events) with a refresh interval far
            // beyond the clock's range is simply never due.
            .filter_map(|(_, entry)| match entry.swept {
                Some(swept) => swept.checked_add(entry.check_every(sweep_interval)),
                None => Some(now),
            })
            .min()
    }

    /// The entries an event about `name_or_arn` concerns: matched by the id as written, the
    /// canonical name or the canonical ARN.
    pub fn matching(&self, name_or_arn: &str) -> Vec<SecretRef> {
        self.entries
            .iter()
            .filter(|(key, entry)| {
                key.secret_id == name_or_arn
                    || entry.name.as_deref() == Some(name_or_arn)
                    || entry.arn.as_deref() == Some(name_or_arn)
            })
            .map(|(key, _)| key.secret_ref())
            .collect()
    }

    /// Distinct secrets referenced.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(id: &str) -> SecretRef {
        SecretRef {
            secret_id: id.into(),
            region: "eu-west-1".into(),
            role: None,
            version: VersionSelector::Stage("AWSCURRENT".into()),
        }
    }

    fn who(name: &str) -> IdentityKey {
        ("ns".into(), name.into())
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// A rotation waiting for its siblings asks for their secrets to be swept at once: a secret
    /// swept a moment ago is due again, and only once.
    #[test]
    fn sweep_soon_makes_a_freshly_swept_secret_due() {
        let mut index = VersionIndex::default();
        let now = Instant::now();
        index.register(&who("a"), &[secret("s")], HOUR);
        index.observe(&secret("s"), Some("v1"), now);
        let interval = Duration::from_secs(300);
        assert!(index.due(now, interval).is_empty(), "just swept");
        index.sweep_soon(&secret("s"));
        index.sweep_soon(&secret("not-registered"));
        assert_eq!(index.due(now, interval).len(), 1);
        assert_eq!(index.next_due(now, interval), Some(now));
        index.observe(&secret("s"), Some("v1"), now);
        assert!(index.due(now, interval).is_empty(), "swept again");
    }

    /// Identities deleted while the watch was disconnected are dropped with the secrets only they
    /// referenced.
    #[test]
    fn identities_lists_every_registered_identity_for_pruning() {
        let mut index = VersionIndex::default();
        index.register(&who("a"), &[secret("shared"), secret("a")], HOUR);
        index.register(&who("b"), &[secret("shared")], HOUR);
        let gone: Vec<IdentityKey> = index
            .identities()
            .filter(|key| key.1 == "a")
            .cloned()
            .collect();
        for identity in &gone {
            index.unregister(identity);
        }
        assert_eq!(
            index.identities().cloned().collect::<Vec<_>>(),
            vec![who("b")]
        );
        assert_eq!(
            index.len(),
            1,
            "the secret only a read is gone, the shared one stays"
        );
    }

    #[test]
    fn identities_on_one_secret_share_one_entry() {
        let mut index = VersionIndex::default();
        for name in ["a", "b", "c"] {
            index.register(&who(name), &[secret("ns/x")], HOUR);
        }
        assert_eq!(index.len(), 1);
        index.register(&who("c"), &[secret("ns/y")], HOUR);
        assert_eq!(index.len(), 2);
        index.unregister(&who("a"));
        index.unregister(&who("b"));
        assert_eq!(index.len(), 1, "ns/x went with its last identity");
    }

    #[test]
    fn a_restart_reads_nothing_and_a_change_asks_for_a_read() {
        let now = Instant::now();
        let mut index = VersionIndex::default();
        index.register(&who("a"), &[secret("ns/x")], HOUR);
        // Empty index: the Secret's version is taken as current, no read.
        index.seed(&secret("ns/x"), "v1", now);
        assert_eq!(index.current(&secret("ns/x")), Some("v1"));
        assert_eq!(
            index.due(now, HOUR).len(),
            1,
            "the first sweep confirms it at once"
        );
        // The first sweep confirms it: nothing to do.
        assert!(index.observe(&secret("ns/x"), Some("v1"), now).is_empty());
        // A new version: the identity is asked to reconcile, and then expects v2.
        assert_eq!(
            index.observe(&secret("ns/x"), Some("v2"), now),
            vec![who("a")]
        );
        // A seed never overrides what the index was told.
        index.seed(&secret("ns/x"), "v1", now);
        assert_eq!(index.current(&secret("ns/x")), Some("v2"));
        index.record_read(&secret("ns/x"), "v2", "arn", "ns/x", now);
        // The same observation again (a duplicate event): nothing.
        assert!(index.observe(&secret("ns/x"), Some("v2"), now).is_empty());
    }

    #[test]
    fn a_lagging_sweep_never_overrides_a_newer_read_twice() {
        let now = Instant::now();
        let mut index = VersionIndex::default();
        index.register(&who("a"), &[secret("ns/x")], HOUR);
        index.record_read(&secret("ns/x"), "v2", "arn", "ns/x", now);
        // ListSecrets still says v1: one reconcile, which reads (and gets v2 again).
        assert_eq!(
            index.observe(&secret("ns/x"), Some("v1"), now),
            vec![who("a")]
        );
        index.record_read(&secret("ns/x"), "v2", "arn", "ns/x", now);
        // It keeps saying v1: no more reads.
        assert!(index.observe(&secret("ns/x"), Some("v1"), now).is_empty());
        // It catches up: v2 is what was read: nothing.
        assert!(index.observe(&secret("ns/x"), Some("v2"), now).is_empty());
    }

    #[test]
    fn registering_says_when_a_secret_may_fall_due_sooner() {
        let mut index = VersionIndex::default();
        assert!(
            index.register(&who("a"), &[secret("ns/x")], HOUR),
            "a new secret"
        );
        assert!(
            !index.register(&who("a"), &[secret("ns/x")], HOUR),
            "nothing changed"
        );
        assert!(
            index.register(&who("b"), &[secret("ns/x")], HOUR),
            "another identity on it"
        );
        assert!(
            index.register(&who("a"), &[secret("ns/x")], Duration::from_secs(30)),
            "a shorter refresh interval"
        );
        assert!(
            !index.register(&who("a"), &[secret("ns/x")], HOUR),
            "a longer one makes nothing due sooner"
        );
    }

    #[test]
    fn due_respects_the_shortest_refresh_and_skips_pinned_versions() {
        let now = Instant::now();
        let mut index = VersionIndex::default();
        let sweep = Duration::from_secs(300);
        index.register(&who("a"), &[secret("ns/x")], HOUR);
        index.register(&who("b"), &[secret("ns/x")], Duration::from_secs(30));
        let pinned = SecretRef {
            version: VersionSelector::Id("v".repeat(32)),
            ..secret("ns/p")
        };
        index.register(&who("c"), &[pinned], HOUR);
        assert!(
            index.due(now, sweep).is_empty(),
            "just registered: its identity is reading it"
        );
        assert_eq!(index.next_due(now, sweep), None);
        index.record_read(&secret("ns/x"), "v1", "arn", "ns/x", now);
        assert!(index.due(now + Duration::from_secs(29), sweep).is_empty());
        assert_eq!(index.due(now + Duration::from_secs(30), sweep).len(), 1);
        assert_eq!(
            index.next_due(now, sweep),
            Some(now + Duration::from_secs(30))
        );
        // The 30 s identity goes: the secret is checked at the sweep interval again.
        index.unregister(&who("b"));
        assert!(index.due(now + Duration::from_secs(30), sweep).is_empty());
    }

    /// A check that keeps failing (denied, throttled, unreachable) is tried at its cadence, then
    /// at twice it, four times, ... up to five minutes: never again at once, and the first success
    /// brings the cadence back.
    #[test]
    fn failed_checks_back_off_to_five_minutes_and_a_success_resets() {
        let mut now = Instant::now();
        let mut index = VersionIndex::default();
        let sweep = Duration::from_secs(300);
        let ten = Duration::from_secs(10);
        index.register(&who("a"), &[secret("ns/x")], ten);
        index.record_read(&secret("ns/x"), "v1", "arn", "ns/x", now);
        let mut waits = Vec::new();
        for _ in 0..8 {
            let next = index.next_due(now, sweep).expect("sweepable");
            let wait = next - now;
            assert!(index.due(next - Duration::from_millis(1), sweep).is_empty());
            assert_eq!(index.due(next, sweep).len(), 1);
            waits.push(wait.as_secs());
            now = next;
            index.check_failed(&secret("ns/x"), now);
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert!(index.due(now, sweep).is_empty(), "never due again at once");
        index.observe(&secret("ns/x"), Some("v1"), now);
        assert_eq!(
            index.next_due(now, sweep),
            Some(now + ten),
            "back to its cadence"
        );
    }

    /// After a restart nothing was read: a listing must still find the secrets, by the name id
    /// itself, or by the name a check told (an ARN id's).
    #[test]
    fn a_seeded_secret_is_listable_by_its_name_id_or_once_a_check_named_it() {
        let mut index = VersionIndex::default();
        let by_name = secret("payments/client");
        let arn = "arn:aws:secretsmanager:eu-west-1:111111111111:secret:payments/other-AbCdEf";
        let by_arn = secret(arn);
        index.register(&who("a"), std::slice::from_ref(&by_name), HOUR);
        index.register(&who("b"), std::slice::from_ref(&by_arn), HOUR);
        let now = Instant::now();
        index.seed(&by_name, "v1", now);
        index.seed(&by_arn, "v1", now);
        let names = |index: &VersionIndex| {
            let mut names: Vec<Option<String>> = index
                .due(now, HOUR)
                .into_iter()
                .map(|due| due.name)
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(&index), vec![None, Some("payments/client".into())]);
        index.identify(&by_arn, arn, "payments/other");
        assert_eq!(
            names(&index),
            vec![
                Some("payments/client".into()),
                Some("payments/other".into())
            ]
        );
        assert_eq!(
            index.matching(arn),
            vec![by_arn],
            "events name it by ARN too"
        );
    }

    #[test]
    fn events_match_by_id_name_or_arn() {
        let now = Instant::now();
        let mut index = VersionIndex::default();
        index.register(&who("a"), &[secret("ns/x")], HOUR);
        index.record_read(&secret("ns/x"), "v1", "arn:x-AbCdEf", "ns/x", now);
        assert_eq!(index.matching("ns/x"), vec![secret("ns/x")]);
        assert_eq!(index.matching("arn:x-AbCdEf"), vec![secret("ns/x")]);
        assert!(index.matching("ns/other").is_empty());
    }
}
