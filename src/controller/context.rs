//! What every reconcile shares: the operator's settings, the context (clients, source, index,
//! metrics) and what the controller remembers per identity. Every part of the controller imports
//! from here, never from the orchestrator.

use crate::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::core::PartialObjectMeta;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::api::{MtlsIdentity, REFRESH_ANNOTATION, REFRESH_MIN_INTERVAL, StoredIdentity};
use crate::metrics::Metrics;
use crate::restart::{RestartLimits, Restarter};
use crate::source::SecretSource;
use crate::source::fleet::{Fleet, SweepMode};
use crate::source::policy::SourcePolicy;

use super::budget::FetchBudget;

/// The shortest refresh interval, whatever the spec says.
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(1);
/// `spec.expiry.warnBefore` default: 30 days.
pub(crate) const DEFAULT_WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch only these namespaces (one controller each, RBAC only there); all when empty.
    pub namespaces: Vec<String>,
    pub policy: SourcePolicy,
    /// The region of identities without `spec.source.region` (the operator's own).
    pub default_region: Option<String>,
    /// Caps on rolling restarts: in progress at once, per namespace, and how long one may take.
    pub restart_limits: RestartLimits,
    /// Allow `spec.restart.policy: Annotate`, which patches Pods (RBAC `pods: patch`).
    pub allow_annotate: bool,
    /// Where operator-managed egress proxies' admin port may be reached from (NetworkPolicy peers).
    pub egress_admin_from: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
    /// How far tenants' egress proxies may reach beyond the safe default.
    pub egress_reach: super::egress::reach::EgressReach,
    /// How versions are checked between reads, and how often at most.
    pub sweep_mode: SweepMode,
    pub sweep_interval: Duration,
    /// The change-event queue (EventBridge → SQS), the fast path; none: the sweep alone.
    pub events: Option<crate::source::events::EventQueue>,
    /// Reconciles running at once (per watched scope): bounds the load on the API server and AWS
    /// when thousands of identities are due together.
    pub max_concurrent_reconciles: u16,
    /// Only identities with these labels (a label selector), to shard identities over several
    /// operators or to canary a new version; all when `None`.
    pub identity_selector: Option<String>,
    /// The image of operator-managed egress proxies; `None`: `spec.egress` is not acted on.
    pub egress_image: Option<String>,
    /// The key of the integrity tags on the Secrets the operator writes (`pki::integrity`); `run`
    /// loads it from the operator's namespace (`controller::integrity`). The default is a random
    /// key of this process alone.
    pub integrity_key: crate::pki::integrity::IntegrityKey,
    /// How many `Synced` Events may be published (`--synced-event-rate`, `--synced-event-burst`),
    /// shared by every scope.
    pub synced_events: Arc<super::events::SyncedEventBudget>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            policy: SourcePolicy::new(Vec::new(), None, Vec::new()),
            default_region: None,
            restart_limits: RestartLimits::default(),
            allow_annotate: false,
            egress_admin_from: Vec::new(),
            egress_reach: Default::default(),
            sweep_mode: SweepMode::default(),
            sweep_interval: Duration::from_secs(300),
            events: None,
            max_concurrent_reconciles: 64,
            identity_selector: None,
            egress_image: None,
            integrity_key: crate::pki::integrity::IntegrityKey::random(),
            synced_events: Arc::default(),
        }
    }
}

impl Settings {
    /// Fills what the settings leave open from the AWS configuration: the default region (the
    /// SDK's), the operator's own account (STS GetCallerIdentity) and, when none are allowed yet,
    /// the allowed regions (the default region).
    pub async fn with_aws_defaults(mut self, aws: &aws_config::SdkConfig) -> Self {
        if self.default_region.is_none() {
            self.default_region = aws.region().map(|region| region.to_string());
        }
        let account = match self.policy.own_account() {
            Some(account) => Some(account.to_string()),
            None => crate::source::caller_account(aws).await,
        };
        let regions = if self.policy.allowed_regions().is_empty() {
            self.default_region.iter().cloned().collect()
        } else {
            self.policy.allowed_regions().to_vec()
        };
        self.policy = self.policy.with_account_and_regions(account, regions);
        self
    }
}

pub struct Context {
    pub client: kube::Client,
    /// Every identity the controller watches, for finding the siblings that share a workload.
    pub(crate) identities: Store<StoredIdentity>,
    /// Asks the controller to reconcile an identity now.
    pub(crate) trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<StoredIdentity>>,
    pub source: Arc<dyn SecretSource>,
    pub settings: Settings,
    /// Who publishes Events (see `publish` for why there is no long-lived Recorder).
    pub(crate) reporter: Reporter,
    pub(crate) restarter: Arc<Restarter>,
    pub(crate) metrics: Arc<Metrics>,
    /// The version index and its sweep, shared by every scope.
    pub(crate) fleet: Arc<Fleet>,
    /// What the controller remembers per identity of this scope.
    pub(crate) memory: Arc<Memory>,
    /// The operator's own egress objects as the watch sees them (with `--enable-egress`).
    pub(crate) egress_objects: Option<EgressStores>,
}

/// The metadata of the operator's egress Deployments, Services and NetworkPolicies (label-selected
/// watches): what lets a steady reconcile tell that its three objects are as it wrote them without
/// asking the API server.
#[derive(Clone)]
pub struct EgressStores {
    pub deployments: Store<PartialObjectMeta<Deployment>>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub policies: Store<PartialObjectMeta<NetworkPolicy>>,
}

impl EgressStores {
    /// The change tokens (see [`change_token`]) of the NetworkPolicy, Deployment and Service named
    /// `name`, in that order; `None` unless all three are in the stores, owned by `owner_uid` and
    /// not being deleted.
    pub fn tokens(&self, namespace: &str, name: &str, owner_uid: &str) -> Option<[String; 3]> {
        fn token<K: Resource<DynamicType = ()> + Clone>(
            store: &Store<PartialObjectMeta<K>>,
            namespace: &str,
            name: &str,
            owner_uid: &str,
        ) -> Option<String> {
            let seen = store.get(&ObjectRef::new(name).within(namespace))?;
            let meta = &seen.metadata;
            (meta.deletion_timestamp.is_none() && super::secret::is_owned_by(meta, owner_uid))
                .then(|| change_token(meta))
        }
        Some([
            token(&self.policies, namespace, name, owner_uid)?,
            token(&self.deployments, namespace, name, owner_uid)?,
            token(&self.services, namespace, name, owner_uid)?,
        ])
    }
}

/// What changes when someone else changes an object's spec: its generation where it has one (a
/// Deployment's status updates do not count), else its resourceVersion.
pub fn change_token(meta: &kube::api::ObjectMeta) -> String {
    match meta.generation {
        Some(generation) => format!("generation {generation}"),
        None => format!(
            "resourceVersion {}",
            meta.resource_version.as_deref().unwrap_or("")
        ),
    }
}

/// The egress objects as last written: a digest of what was desired and each object's change token
/// in the write's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressApplied {
    pub desired: u64,
    pub tokens: [String; 3],
}

/// What the controller remembers about one identity between reconciles. One value per identity in
/// one map ([`Memory`]), so forgetting an identity is one removal that cannot miss a field.
#[derive(Debug, Default)]
pub struct IdentityMemory {
    /// Consecutive source failures, for backoff; reset on success.
    pub source_failures: u32,
    /// Consecutive Kubernetes API errors, for the error policy's backoff.
    pub api_errors: u32,
    /// Secrets Manager reads, rate-limited; `None` until the first read (a full bucket).
    pub budget: Option<FetchBudget>,
    /// The source version last read and refused (bad material): not read again until it changes.
    pub known_bad: Option<Box<str>>,
    /// A rotation waiting for sibling identities that share a workload: its fingerprint and since
    /// when (see `rotation`). Rare, so boxed: the memory of every identity stays small.
    pub coalescing: Option<Box<(String, Instant)>>,
    /// The resourceVersion our last status write gave the identity, until the watch delivers it:
    /// a reconcile of an older copy (our own Secret write can trigger one at once) would judge
    /// against a status we already replaced, and write it and its Events twice.
    pub written: Option<u64>,
    /// The resourceVersion our last write gave the target Secret: the watch event that brings it
    /// back is our own write and reconciles nothing (see [`Memory::is_own_secret_write`]).
    pub secret_written: Option<std::num::NonZeroU64>,
    /// A write of the target Secret is in flight: its watch event may come before its answer.
    pub secret_writing: bool,
    /// The uid and generation last let through to a reconcile (see `spec_or_refresh_changed`).
    pub seen: Option<(Box<str>, i64)>,
    /// A digest of the refresh request annotation last let through (0: none).
    pub refresh_seen: u64,
    /// When a refresh request was last honoured: the next waits [`REFRESH_MIN_INTERVAL`].
    pub refresh_honoured: Option<Instant>,
    /// The egress proxy's objects as last written (`spec.egress`; rare, so boxed).
    pub egress: Option<Box<EgressApplied>>,
    /// A digest of the restart warnings last published (0: none), so a rotation whose restarts
    /// stay pending does not publish the same warnings on every reconcile.
    pub restart_warnings: u64,
}

/// How long a Secret's watch event waits for the answer of our write in flight before it is taken
/// as someone else's change: a write's answer and its watch event leave the API server together.
pub const OWN_WRITE_WAIT: Duration = Duration::from_secs(1);

/// A write of an identity's target Secret in flight (see [`Memory::secret_write`]).
pub struct SecretWrite<'a> {
    memory: &'a Memory,
    key: &'a ObjectRef<MtlsIdentity>,
}

impl SecretWrite<'_> {
    /// The write made the Secret as the API server answered (`resource_version`).
    pub fn made(self, resource_version: Option<&str>) {
        self.memory.secret_write_ended(self.key, resource_version);
        std::mem::forget(self);
    }
}

impl Drop for SecretWrite<'_> {
    fn drop(&mut self) {
        self.memory.secret_write_ended(self.key, None);
    }
}

/// Every identity's [`IdentityMemory`], bounded by the identities the watch's store holds: an entry
/// is made only for an identity in the store, removed on its watch `Delete`, and everything the
/// store no longer holds is pruned on every re-list (`prune`), since kube-runtime does not emit a
/// `Delete` for an object deleted while its watch was disconnected.
pub struct Memory {
    entries: Mutex<HashMap<ObjectRef<MtlsIdentity>, IdentityMemory>>,
    /// The scope's store; `None` (unit tests): every identity is taken as present.
    store: Option<Store<StoredIdentity>>,
    /// `mtls_identities_remembered`, shared by every scope's memory.
    remembered: Option<prometheus_client::metrics::gauge::Gauge>,
    /// Woken whenever a Secret write ends (see [`Memory::is_own_secret_write`]).
    secret_writes: tokio::sync::Notify,
}

impl Memory {
    pub fn new(
        store: Option<Store<StoredIdentity>>,
        remembered: Option<prometheus_client::metrics::gauge::Gauge>,
    ) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            store,
            remembered,
            secret_writes: tokio::sync::Notify::new(),
        }
    }

    fn in_store(&self, key: &ObjectRef<MtlsIdentity>) -> bool {
        self.store.as_ref().is_none_or(|store| {
            let mut stored = ObjectRef::<StoredIdentity>::new(&key.name);
            stored.namespace = key.namespace.clone();
            store.get(&stored).is_some()
        })
    }

    /// Runs `change` on the identity's memory, made empty first if there is none. An identity the
    /// store does not hold (deleted while this reconcile ran) gets a scratch value that is dropped,
    /// so a late reconcile cannot bring a deleted identity's memory back.
    pub fn update<R>(
        &self,
        key: &ObjectRef<MtlsIdentity>,
        change: impl FnOnce(&mut IdentityMemory) -> R,
    ) -> R {
        let mut entries = lock(&self.entries);
        if let Some(memory) = entries.get_mut(key) {
            return change(memory);
        }
        // Checked under the lock: the store drops an identity before its `Delete` reaches `forget`.
        let mut memory = IdentityMemory::default();
        let result = change(&mut memory);
        if self.in_store(key) {
            entries.insert(key.clone(), memory);
            if let Some(gauge) = &self.remembered {
                gauge.inc();
            }
        }
        result
    }

    /// Reads the identity's memory (the empty memory when there is none).
    pub fn read<R>(
        &self,
        key: &ObjectRef<MtlsIdentity>,
        look: impl FnOnce(&IdentityMemory) -> R,
    ) -> R {
        match lock(&self.entries).get(key) {
            Some(memory) => look(memory),
            None => look(&IdentityMemory::default()),
        }
    }

    /// Runs `record` only while the identity is in the store, under the memory's lock: what it
    /// records elsewhere per identity (the index, the metric series) cannot outlive a `forget` or a
    /// `prune` that runs after it, and is never recorded for an identity already gone (a reconcile
    /// still in flight when its identity was deleted).
    pub fn if_present<R>(
        &self,
        key: &ObjectRef<MtlsIdentity>,
        record: impl FnOnce() -> R,
    ) -> Option<R> {
        let _entries = lock(&self.entries);
        self.in_store(key).then(record)
    }

    /// Forgets one identity (its watch `Delete`), and with `also` what is kept of it elsewhere,
    /// under the memory's lock (see [`Memory::if_present`]).
    pub fn forget(&self, key: &ObjectRef<MtlsIdentity>, also: impl FnOnce()) {
        let mut entries = lock(&self.entries);
        if entries.remove(key).is_some()
            && let Some(gauge) = &self.remembered
        {
            gauge.dec();
        }
        also();
    }

    /// Forgets every identity the store no longer holds (after a re-list), and with `also` what
    /// is kept of them elsewhere, under the memory's lock; returns how many memories went.
    pub fn prune(&self, also: impl FnOnce()) -> usize {
        let mut entries = lock(&self.entries);
        let before = entries.len();
        entries.retain(|key, _| self.in_store(key));
        let pruned = before - entries.len();
        if let Some(gauge) = &self.remembered {
            gauge.dec_by(i64::try_from(pruned).unwrap_or(i64::MAX));
        }
        also();
        pruned
    }

    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.entries).is_empty()
    }

    /// Whether `seen` (the resourceVersion of the copy about to be reconciled) is older than our last
    /// status write; forgets the write once the watch has caught up with it. resourceVersions are
    /// etcd revisions, compared only when both are numbers.
    pub fn is_stale(&self, key: &ObjectRef<MtlsIdentity>, seen: Option<&str>) -> bool {
        let seen = seen.and_then(|seen| seen.parse::<u64>().ok());
        let mut entries = lock(&self.entries);
        let Some(memory) = entries.get_mut(key) else {
            return false;
        };
        match (memory.written, seen) {
            (None, _) => false,
            (Some(ours), Some(seen)) if seen < ours => true,
            _ => {
                memory.written = None;
                false
            }
        }
    }

    pub fn record_written(&self, key: &ObjectRef<MtlsIdentity>, resource_version: Option<&str>) {
        if let Some(version) = resource_version.and_then(|version| version.parse::<u64>().ok()) {
            self.update(key, |memory| memory.written = Some(version));
        }
    }

    /// Marks a write of the identity's target Secret as in flight until the returned guard records
    /// what it made ([`SecretWrite::made`]) or is dropped (no write, or a failed one).
    pub fn secret_write<'a>(&'a self, key: &'a ObjectRef<MtlsIdentity>) -> SecretWrite<'a> {
        self.update(key, |memory| memory.secret_writing = true);
        SecretWrite { memory: self, key }
    }

    fn secret_write_ended(&self, key: &ObjectRef<MtlsIdentity>, made: Option<&str>) {
        let version = made.and_then(|version| version.parse().ok());
        self.update(key, |memory| {
            memory.secret_writing = false;
            memory.secret_written = version;
        });
        self.secret_writes.notify_waiters();
    }

    /// Whether the identity's target Secret at `resource_version` (from its watch) is exactly what
    /// our last write made: the reconcile that wrote it already acted on it, and another would only
    /// read the Secret back (two GETs per identity on a cold start). Any later change (an edit, a
    /// deletion: each has a new resourceVersion) still reconciles. The watch event of a write can
    /// come before the write's answer: while one is in flight this waits for it, at most
    /// [`OWN_WRITE_WAIT`] (then the event reconciles, as any other would).
    pub async fn is_own_secret_write(
        &self,
        key: &ObjectRef<MtlsIdentity>,
        resource_version: Option<&str>,
    ) -> bool {
        let Some(seen) = resource_version.and_then(|version| version.parse().ok()) else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + OWN_WRITE_WAIT;
        loop {
            // Registered before the check, so an end between the two is not missed.
            let ended = self.secret_writes.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let (writing, written) =
                self.read(key, |memory| (memory.secret_writing, memory.secret_written));
            if !writing {
                return written == Some(seen);
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return false;
            }
        }
    }

    /// Whether `identity` comes with a generation (a spec) or a refresh request not seen before:
    /// our own status writes must not trigger a sync, or every status write would cost another
    /// Secrets Manager call. Like kube's `predicates::generation` filter, which keeps three strings
    /// per identity for it; this keeps the uid and a digest of the refresh request. A new uid (the
    /// identity deleted and created again) is a change; an object without generation always passes.
    pub fn spec_or_refresh_changed(&self, identity: &StoredIdentity) -> bool {
        let (Some(uid), Some(generation)) = (
            identity.metadata.uid.as_deref(),
            identity.metadata.generation,
        ) else {
            return true;
        };
        let refresh = identity
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(REFRESH_ANNOTATION))
            .map_or(0, |value| {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                value.hash(&mut hasher);
                hasher.finish().max(1)
            });
        self.update(&identity_key(identity), |memory| {
            let changed = memory
                .seen
                .as_ref()
                .is_none_or(|(seen_uid, seen)| seen_uid.as_ref() != uid || *seen != generation);
            if changed {
                memory.seen = Some((uid.into(), generation));
            }
            let refresh_changed = refresh != 0 && refresh != memory.refresh_seen;
            memory.refresh_seen = refresh;
            changed || refresh_changed
        })
    }

    /// A pending refresh request may be honoured now (`None`), or must wait this long: one per
    /// identity per [`REFRESH_MIN_INTERVAL`], so setting the annotation in a loop costs nothing more.
    pub fn refresh_wait(&self, key: &ObjectRef<MtlsIdentity>, now: Instant) -> Option<Duration> {
        self.read(key, |memory| memory.refresh_honoured)
            .map(|honoured| (honoured + REFRESH_MIN_INTERVAL).saturating_duration_since(now))
            .filter(|wait| !wait.is_zero())
    }

    /// A refresh request was honoured at `now`.
    pub fn refresh_honoured(&self, key: &ObjectRef<MtlsIdentity>, now: Instant) {
        self.update(key, |memory| memory.refresh_honoured = Some(now));
    }

    /// Takes one Secrets Manager read from the identity's budget; `Some(wait)` when it has none.
    pub fn take_fetch(
        &self,
        key: &ObjectRef<MtlsIdentity>,
        refresh: Duration,
        now: Instant,
    ) -> Option<Duration> {
        self.update(key, |memory| {
            memory
                .budget
                .get_or_insert_with(|| FetchBudget::full(now))
                .take(refresh, now)
        })
    }

    /// Counts a source failure (`failed`) or forgets the count (success); returns the count.
    pub fn count_source_failure(&self, key: &ObjectRef<MtlsIdentity>, failed: bool) -> u32 {
        self.update(key, |memory| {
            memory.source_failures = if failed {
                memory.source_failures.saturating_add(1)
            } else {
                0
            };
            memory.source_failures
        })
    }
}

/// One reading of the clock, for the whole reconcile: every decision in it sees the same time.
#[derive(Debug, Clone)]
pub struct Now {
    pub instant: Instant,
    pub unix: i64,
    pub unix_ms: u64,
    /// RFC 3339, seconds: the form status uses.
    pub text: String,
}

impl Now {
    pub fn read() -> Self {
        let wall = chrono::Utc::now();
        Self {
            instant: Instant::now(),
            unix: wall.timestamp(),
            unix_ms: u64::try_from(wall.timestamp_millis()).unwrap_or(0),
            text: wall.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    /// The clock at `unix` seconds (tests).
    pub fn at(unix: i64) -> Self {
        let wall = chrono::DateTime::from_timestamp(unix, 0).unwrap_or_default();
        Self {
            instant: Instant::now(),
            unix,
            unix_ms: u64::try_from(unix.saturating_mul(1000)).unwrap_or(0),
            text: wall.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }
}

/// An identity as one reconcile sees it, parsed once.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub key: ObjectRef<MtlsIdentity>,
    pub namespace: String,
    pub name: String,
    /// Required: owner references and ownership checks are by uid.
    pub uid: String,
    pub target: String,
    /// `spec.refreshInterval`, with the 1 s floor; `None` when it does not parse (`InvalidSpec`).
    pub refresh: Option<Duration>,
    pub warn_before: Duration,
    pub generation: Option<i64>,
    pub on_password_change: bool,
}

impl Parsed {
    pub fn new(identity: &MtlsIdentity) -> Result<Self, super::error::ReconcileError> {
        use super::error::ReconcileError;
        let namespace = identity.namespace().ok_or(ReconcileError::NoNamespace)?;
        let uid = identity.uid().ok_or(ReconcileError::NoUid)?;
        let refresh = crate::api::parse_duration(&identity.spec.refresh_interval)
            // The CRD's 1s floor, enforced here too (an identity written before the rule).
            .map(|refresh| refresh.max(MIN_REFRESH));
        let warn_before = identity
            .spec
            .expiry
            .as_ref()
            .and_then(|expiry| expiry.warn_before.as_deref())
            .and_then(crate::api::parse_duration)
            .unwrap_or(DEFAULT_WARN_BEFORE);
        Ok(Self {
            key: identity_key(identity),
            name: identity.name_any(),
            target: identity.target_secret_name(),
            refresh,
            warn_before,
            generation: identity.metadata.generation,
            on_password_change: identity
                .spec
                .restart
                .as_ref()
                .is_some_and(|restart| restart.on_password_change),
            namespace,
            uid,
        })
    }

    /// The refresh interval to schedule by: the spec's, or an hour while it does not parse.
    pub fn refresh_or_default(&self) -> Duration {
        self.refresh.unwrap_or(Duration::from_secs(3600))
    }
}

/// The key of the per-identity state: namespace and name. (An `ObjectRef` made from an object
/// also carries its uid and resourceVersion: two more strings in every map, for every identity.)
pub(crate) fn identity_key(identity: &impl Resource) -> ObjectRef<MtlsIdentity> {
    let key = ObjectRef::new(&identity.name_any());
    match identity.namespace() {
        Some(namespace) => key.within(&namespace),
        None => key,
    }
}
