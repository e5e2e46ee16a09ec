//! Change detection for the whole fleet: one [`VersionIndex`] of the distinct secrets that watched
//! identities reference, kept current by a sweep that reads versions, never values (DescribeSecret
//! per secret, or ListSecrets pages), and asks exactly the identities of a changed secret to
//! reconcile. A value is read only when its version changed, its Secret needs repair, or the sweep
//! cannot tell (then at the identity's refresh interval, as a plain poller would).

use crate::lock;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tracing::{debug, info, warn};

use super::index::{FAILED_CHECK_MAX_WAIT, IdentityKey, VersionIndex, fair_order};
use super::{DescribedSecret, Scope, SecretRef, SecretSource, SourceError, VersionSelector};

/// How versions are checked between reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SweepMode {
    /// Per region and role, whichever costs fewer calls: a ListSecrets filtered by the due
    /// secrets' name prefixes (`payments/`), or one DescribeSecret per due secret; describe for
    /// good where ListSecrets is refused.
    #[default]
    Auto,
    /// ListSecrets pages of 100 (`SecretVersionsToStages`): the fewest calls; needs
    /// `secretsmanager:ListSecrets` on `*`.
    List,
    /// One DescribeSecret per distinct secret: resource-scoped IAM, no KMS decrypt.
    Describe,
    /// No sweep: each secret's value is read again at its identities' refresh interval.
    Get,
}

impl SweepMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::List => "list",
            Self::Describe => "describe",
            Self::Get => "get",
        }
    }
}

/// One ListSecrets of `auto` mode: at most [`LIST_FILTER_MAX`] name prefixes, and the due secrets
/// under them.
#[derive(Debug, PartialEq, Eq)]
struct ListingGroup {
    prefixes: Vec<String>,
    due: Vec<super::index::Due>,
}

/// Whether `auto` mode lists a scope's due secrets (`Ok`: the listings, each filtered by up to
/// [`LIST_FILTER_MAX`] name prefixes) or describes them (`Err`: all of them, given back). A secret's
/// prefix is its name up to and including the first `/` (the namespace's, under the default source
/// policy), else its whole name. It lists when every due secret's name is known, ListSecrets was
/// not refused, and the listings are expected to cost fewer calls than describing each: the pages
/// the scope's last listings took per prefix, at least one per listing.
fn listing_plan(
    due: Vec<super::index::Due>,
    remembered: Option<Listing>,
) -> Result<Vec<ListingGroup>, Vec<super::index::Due>> {
    if remembered == Some(Listing::Refused) || due.iter().any(|due| due.name.is_none()) {
        return Err(due);
    }
    let count = due.len();
    let mut by_prefix: BTreeMap<String, Vec<super::index::Due>> = BTreeMap::new();
    for due in due {
        let prefix = listing_prefix(due.name.as_deref().unwrap_or_default());
        by_prefix.entry(prefix).or_default().push(due);
    }
    let prefixes = by_prefix.len();
    let mut groups: Vec<ListingGroup> = Vec::new();
    for (prefix, due) in by_prefix {
        match groups.last_mut() {
            Some(group) if group.prefixes.len() < LIST_FILTER_MAX => {
                group.prefixes.push(prefix);
                group.due.extend(due);
            }
            _ => groups.push(ListingGroup {
                prefixes: vec![prefix],
                due,
            }),
        }
    }
    let expected_pages = match remembered {
        Some(Listing::Pages {
            pages,
            prefixes: listed,
        }) => (pages * prefixes).div_ceil(listed.max(1)).max(groups.len()),
        _ => groups.len(),
    };
    if count <= expected_pages {
        return Err(groups.into_iter().flat_map(|group| group.due).collect());
    }
    Ok(groups)
}

/// A listing, looked up as a due secret's id says: an ARN id by ARN only (with or without its
/// `-XXXXXX` suffix), since a secret of the same name in the listed account is another secret; a
/// name by name. Maps, not a scan per secret: a listing of 10,000 checked against 10,000 due.
struct ListedSecrets<'a> {
    by_name: HashMap<&'a str, &'a DescribedSecret>,
    by_arn: HashMap<&'a str, &'a DescribedSecret>,
}

impl<'a> ListedSecrets<'a> {
    fn new(listed: &'a [DescribedSecret]) -> Self {
        let mut by_name = HashMap::with_capacity(listed.len());
        let mut by_arn = HashMap::with_capacity(listed.len() * 2);
        for secret in listed {
            by_name.insert(secret.name.as_str(), secret);
            by_arn.insert(secret.arn.as_str(), secret);
            // Secrets Manager ends every ARN with `-` and six random characters.
            if let Some(cut) = secret.arn.len().checked_sub(7)
                && secret.arn.get(cut..cut + 1) == Some("-")
                && let Some(partial) = secret.arn.get(..cut)
            {
                by_arn.insert(partial, secret);
            }
        }
        Self { by_name, by_arn }
    }

    fn find(&self, due: &super::index::Due) -> Option<&'a DescribedSecret> {
        let id = due.secret.secret_id.as_str();
        if id.starts_with("arn:") {
            return self.by_arn.get(id).copied();
        }
        self.by_name
            .get(id)
            .or_else(|| due.name.as_deref().and_then(|name| self.by_name.get(name)))
            .copied()
    }
}

/// A secret name's listing prefix: up to and including the first `/`, else the whole name.
fn listing_prefix(name: &str) -> String {
    match name.split_once('/') {
        Some((namespace, _)) => format!("{namespace}/"),
        None => name.to_string(),
    }
}

/// Asks the controller to reconcile one identity.
pub type Notify = Arc<dyn Fn(&IdentityKey) + Send + Sync>;

pub struct Fleet {
    index: Mutex<VersionIndex>,
    source: Arc<dyn SecretSource>,
    mode: SweepMode,
    interval: Duration,
    notify: Mutex<Vec<Notify>>,
    /// Wakes the sweep when a new secret enters the index.
    wake: tokio::sync::Notify,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// `auto` mode, per scope: ListSecrets was refused (describe from then on), or how many
    /// pages the scope's last filtered listing took (what the next one is expected to cost).
    listing: Mutex<HashMap<Scope, Listing>>,
    /// Until when the events queue counts as healthy (it answered, with messages or an empty
    /// long poll, less than [`EVENTS_HEALTHY_FOR`] before); `None` while it fails or before its
    /// first answer. While healthy, the sweep is a safety net at the identities' refresh intervals.
    events_healthy_until: Mutex<Option<Instant>>,
}

/// How long one answer of the events queue keeps it healthy: a long poll answers within 20 s, so
/// this is three missed answers (a receive that hangs without failing also ends it).
pub const EVENTS_HEALTHY_FOR: Duration = Duration::from_secs(60);

/// What `auto` mode remembers of a scope's listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    Refused,
    /// The last sweep's listings took `pages` pages for `prefixes` prefixes.
    Pages {
        pages: usize,
        prefixes: usize,
    },
}

/// Scopes whose listing costs are remembered at most (regions and roles the policy allows; the
/// memory is only a cost estimate, so it is simply forgotten past this).
const LISTING_MEMORY_MAX: usize = 256;
/// ListSecrets answers at most this many secrets per page.
const LIST_PAGE: usize = 100;

/// ListSecrets accepts at most this many name filter values.
const LIST_FILTER_MAX: usize = 10;
/// DescribeSecret calls in flight at once.
const DESCRIBE_CONCURRENCY: usize = 8;
/// A secret whose version checks fail and that has not been confirmed for this many refresh
/// intervals (and at least [`FAILED_CHECK_MAX_WAIT`]) is read instead, as `get` mode would. Only
/// failing checks: a sweep that is merely behind slows the identity's cadence (and says so in
/// `mtls_sweep_backlog`), it never turns into reads, which would only slow it further.
const STALE_AFTER_INTERVALS: u32 = 2;
/// Version checks a describe sweep sends before it looks again at what is due: a secret falling due
/// (another namespace's) waits for at most one chunk, not for a whole backlog.
const SWEEP_CHUNK: usize = 64;

impl Fleet {
    pub fn new(
        source: Arc<dyn SecretSource>,
        mode: SweepMode,
        interval: Duration,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        Self {
            index: Mutex::new(VersionIndex::default()),
            source,
            mode,
            interval: interval.max(Duration::from_secs(1)),
            notify: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            metrics,
            listing: Mutex::new(HashMap::new()),
            events_healthy_until: Mutex::new(None),
        }
        .with_cadence_reported()
    }

    /// Sets the metrics' sweep cadence to what it is at construction (no events yet).
    fn with_cadence_reported(self) -> Self {
        self.report_cadence(Instant::now());
        self
    }

    /// The events queue answered at `now` (messages, or an empty long poll): until
    /// [`EVENTS_HEALTHY_FOR`] passes without another answer, each secret is swept at its
    /// identities' refresh interval only, a safety net for events lost on the way.
    pub fn events_answered(&self, now: Instant) {
        let was_healthy = self.events_healthy(now);
        *lock(&self.events_healthy_until) = Some(now + EVENTS_HEALTHY_FOR);
        if !was_healthy && self.mode != SweepMode::Get {
            info!(
                "change events arrive: versions are swept at each identity's refresh interval \
                 (a safety net), not every sweep interval, while the queue stays healthy"
            );
        }
        self.report_cadence(now);
    }

    /// Receiving from the events queue failed: the sweep tightens back to its interval at once.
    pub fn events_failed(&self) {
        let now = Instant::now();
        let was_healthy = self.events_healthy(now);
        *lock(&self.events_healthy_until) = None;
        if was_healthy && self.mode != SweepMode::Get {
            info!("change events fail: versions are swept every sweep interval again");
            self.wake.notify_one();
        }
        self.report_cadence(now);
    }

    fn events_healthy(&self, now: Instant) -> bool {
        lock(&self.events_healthy_until).is_some_and(|until| now < until)
    }

    /// The sweep interval in effect at `now`: none while the events queue is healthy (each secret
    /// is then checked at its identities' refresh interval), else `--sweep-interval`; `None` in
    /// `get` mode, which has no sweep.
    pub fn sweep_interval(&self, now: Instant) -> Option<Duration> {
        (self.mode != SweepMode::Get && !self.events_healthy(now)).then_some(self.interval)
    }

    fn report_cadence(&self, now: Instant) {
        if let Some(metrics) = &self.metrics {
            metrics.set_sweep_interval(self.sweep_interval(now), self.events_healthy(now));
        }
    }

    pub fn mode(&self) -> SweepMode {
        self.mode
    }

    /// Adds a receiver of reconcile requests (one per controller scope).
    pub fn subscribe(&self, notify: Notify) {
        lock(&self.notify).push(notify);
    }

    /// Records the secrets an identity reads (after the source policy allowed them).
    pub fn register(&self, identity: &IdentityKey, secrets: &[SecretRef], refresh: Duration) {
        let sooner = {
            let mut index = lock(&self.index);
            let sooner = index.register(identity, secrets, refresh);
            self.record_size(index.len());
            sooner
        };
        // A new secret, or a shorter refresh interval: the sweep may be asleep until later.
        if sooner {
            self.wake.notify_one();
        }
    }

    pub fn unregister(&self, identity: &IdentityKey) {
        let mut index = lock(&self.index);
        index.unregister(identity);
        self.record_size(index.len());
    }

    /// Unregisters every identity `keep` rejects (deleted while the watch was disconnected);
    /// returns how many.
    pub fn retain_identities(&self, keep: impl Fn(&IdentityKey) -> bool) -> usize {
        let mut index = lock(&self.index);
        let gone: Vec<IdentityKey> = index
            .identities()
            .filter(|identity| !keep(identity))
            .cloned()
            .collect();
        for identity in &gone {
            index.unregister(identity);
        }
        self.record_size(index.len());
        gone.len()
    }

    fn record_size(&self, size: usize) {
        if let Some(metrics) = &self.metrics {
            metrics
                .index_size
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
    }

    /// Seeds `secret`'s entry from the version an intact Secret carries (see
    /// [`VersionIndex::seed`]).
    pub fn seed(&self, secret: &SecretRef, carried: &str, now: Instant) {
        if lock(&self.index).seed(secret, carried, now) {
            // Due for its first check at once: the sweep may be asleep until its interval.
            self.wake.notify_one();
        }
    }

    /// What the index knows about `secret` at `now`, read only.
    pub fn view(&self, secret: &SecretRef, now: Instant) -> IndexView {
        let index = lock(&self.index);
        IndexView {
            expected: index.current(secret).map(str::to_string),
            age: index
                .checked_at(secret)
                .map(|checked| now.saturating_duration_since(checked)),
            gone: index.is_gone(secret),
            checks_failing: index.checks_failing(secret),
        }
    }

    /// Whether the last version check found the secret deleted or scheduled for deletion: it is
    /// then reported as not found without reading (a read may still return the old value).
    pub fn is_gone(&self, secret: &SecretRef) -> bool {
        lock(&self.index).is_gone(secret)
    }

    /// A read returned this version.
    pub fn record_read(&self, secret: &SecretRef, version_id: &str, arn: &str, name: &str) {
        let newly_known =
            lock(&self.index).record_read(secret, version_id, arn, name, Instant::now());
        if newly_known {
            // The sweep may be asleep until its interval (nothing was sweepable when it looked):
            // this secret's first check is due one cadence from now, maybe much sooner.
            self.wake.notify_one();
        }
    }

    /// An event says `name_or_arn` changed: check its version now (the event's own version id is
    /// not trusted: events arrive duplicated and out of order; DescribeSecret tells the truth).
    pub async fn changed(&self, name_or_arn: &str) -> usize {
        let secrets = lock(&self.index).matching(name_or_arn);
        for secret in &secrets {
            self.check(secret).await;
        }
        secrets.len()
    }

    /// Checks `secret`'s version now (DescribeSecret), as a sweep would: the identities on it are
    /// notified if it changed.
    pub async fn check(&self, secret: &SecretRef) {
        let described = self.source.describe(secret).await;
        self.apply(secret, described.map(Some));
    }

    /// Asks the sweep to check these secrets' versions next, at once (a rotation waiting for its
    /// siblings); nothing in `get` mode, which has no sweep.
    pub fn sweep_soon<'a>(&self, secrets: impl IntoIterator<Item = &'a SecretRef>) {
        if self.mode == SweepMode::Get {
            return;
        }
        {
            let mut index = lock(&self.index);
            for secret in secrets {
                index.sweep_soon(secret);
            }
        }
        self.wake.notify_one();
    }

    /// Whether `secret`'s version was read or checked at or after `since`; always in `get` mode,
    /// where nothing but a read checks it.
    pub fn confirmed_since(&self, secret: &SecretRef, since: Instant) -> bool {
        self.mode == SweepMode::Get
            || lock(&self.index)
                .checked_at(secret)
                .is_some_and(|checked| checked >= since)
    }

    /// The version `secret`'s identities should hold now, as far as the index knows.
    pub fn expected_version(&self, secret: &SecretRef) -> Option<String> {
        lock(&self.index).current(secret).map(str::to_string)
    }

    /// Runs the sweep until `shutdown`; nothing to do in `get` mode.
    pub async fn run_sweep(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        if self.mode == SweepMode::Get {
            return shutdown.await;
        }
        tokio::pin!(shutdown);
        loop {
            let now = Instant::now();
            self.report_cadence(now);
            let interval = self.sweep_interval(now).unwrap_or(Duration::MAX);
            let next = lock(&self.index)
                .next_due(now, interval)
                .unwrap_or_else(|| now.checked_add(self.interval).unwrap_or(now));
            // Healthy events end unannounced when a receive hangs: look again when they lapse.
            let lapse = (*lock(&self.events_healthy_until)).filter(|until| *until > now);
            let next = lapse.map_or(next, |lapse| next.min(lapse));
            let wait = next
                .saturating_duration_since(now)
                .max(Duration::from_millis(200));
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {},
                _ = self.wake.notified() => {
                    // Let a burst of new identities register before sweeping them together.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                },
            }
            self.sweep_once().await;
        }
    }

    /// Checks the due secrets: in `list` mode all of them (a listing covers a whole scope), in
    /// `describe` mode the first [`SWEEP_CHUNK`] in fair order across namespaces (the sweep comes
    /// back at once for the rest, after looking again at what fell due meanwhile).
    pub async fn sweep_once(&self) {
        let started = Instant::now();
        let interval = self.sweep_interval(started).unwrap_or(Duration::MAX);
        let due = lock(&self.index).due(started, interval);
        if let Some(metrics) = &self.metrics {
            metrics
                .sweep_backlog
                .set(i64::try_from(due.len()).unwrap_or(i64::MAX));
        }
        if due.is_empty() {
            return;
        }
        debug!(due = due.len(), "sweeping");
        match self.mode {
            SweepMode::Get => {}
            SweepMode::Describe => self.describe_due(due).await,
            SweepMode::Auto => {
                let mut by_scope: BTreeMap<Scope, Vec<super::index::Due>> = BTreeMap::new();
                for due in due {
                    by_scope.entry(due.secret.scope()).or_default().push(due);
                }
                let mut to_describe = Vec::new();
                for (scope, due) in by_scope {
                    let remembered = lock(&self.listing).get(&scope).copied();
                    match listing_plan(due, remembered) {
                        Ok(groups) => to_describe.extend(self.sweep_listings(&scope, groups).await),
                        Err(due) => to_describe.extend(due),
                    }
                }
                self.describe_due(to_describe).await;
            }
            SweepMode::List => {
                let mut by_scope: BTreeMap<Scope, Vec<super::index::Due>> = BTreeMap::new();
                for due in due {
                    by_scope.entry(due.secret.scope()).or_default().push(due);
                }
                for (scope, due) in by_scope {
                    self.sweep_list(&scope, due).await;
                }
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics
                .sweep_duration
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// DescribeSecret for the first [`SWEEP_CHUNK`] of `due` in fair order across namespaces.
    async fn describe_due(&self, due: Vec<super::index::Due>) {
        let mut due = fair_order(due);
        due.truncate(SWEEP_CHUNK);
        futures::stream::iter(due)
            .for_each_concurrent(DESCRIBE_CONCURRENCY, |due| async move {
                let described = self.source.describe(&due.secret).await;
                self.apply(&due.secret, described.map(Some));
            })
            .await;
    }

    /// `auto` mode's listings for one scope, one after another; remembers the pages they took.
    /// Returns what is left to describe: what the listings did not show, and every group from the
    /// first failed listing on (a refused one is remembered: describe for good, said once).
    async fn sweep_listings(
        &self,
        scope: &Scope,
        groups: Vec<ListingGroup>,
    ) -> Vec<super::index::Due> {
        let mut left = Vec::new();
        let (mut pages, mut prefixes) = (0, 0);
        let mut groups = groups.into_iter();
        for group in groups.by_ref() {
            prefixes += group.prefixes.len();
            match self.sweep_prefixes(scope, group).await {
                Ok((unlisted, listed_pages)) => {
                    left.extend(unlisted);
                    pages += listed_pages;
                }
                Err(due) => {
                    left.extend(due);
                    break;
                }
            }
        }
        left.extend(groups.flat_map(|group| group.due));
        if pages > 0 && lock(&self.listing).get(scope) != Some(&Listing::Refused) {
            self.remember_listing(scope, Listing::Pages { pages, prefixes });
        }
        left
    }

    /// One listing: ListSecrets filtered by the group's prefixes, each due secret confirmed from it
    /// (or left to describe, if the listing does not show it yet), and the pages it took; `Err`
    /// gives every due secret back when ListSecrets was refused or failed.
    async fn sweep_prefixes(
        &self,
        scope: &Scope,
        group: ListingGroup,
    ) -> Result<(Vec<super::index::Due>, usize), Vec<super::index::Due>> {
        let ListingGroup { prefixes, due } = group;
        let listed = match self.source.list(scope, &prefixes).await {
            Ok(listed) => listed,
            Err(error) => {
                if matches!(error, SourceError::AccessDenied { .. }) {
                    warn!(
                        region = scope.region,
                        role = scope.role.as_ref().map(|role| role.arn.as_str()),
                        detail = error.detail(),
                        "ListSecrets refused; versions are checked with DescribeSecret from now \
                         on (grant secretsmanager:ListSecrets to check them with fewer calls)"
                    );
                    self.remember_listing(scope, Listing::Refused);
                } else {
                    debug!(
                        region = scope.region,
                        reason = error.reason().as_str(),
                        "ListSecrets failed; describing the due secrets instead"
                    );
                }
                return Err(due);
            }
        };
        let pages = listed.len().div_ceil(LIST_PAGE).max(1);
        let lookup = ListedSecrets::new(&listed);
        let mut unlisted = Vec::new();
        let mut confirmed = std::collections::HashSet::with_capacity(due.len());
        for due in due {
            match lookup.find(&due) {
                Some(found) => {
                    self.apply(&due.secret, Ok(Some(found.clone())));
                    confirmed.insert(due.secret);
                }
                // Not listed: gone, or not visible yet (eventual consistency); DescribeSecret tells.
                None => unlisted.push(due),
            }
        }
        // The listing shows the scope's other secrets under these prefixes too, not yet due:
        // confirming them now keeps the scope's checks aligned, one listing per interval rather
        // than one each time a few more fall due.
        let others = lock(&self.index).in_scope(scope);
        for other in others {
            if confirmed.contains(&other.secret) {
                continue;
            }
            if let Some(found) = lookup.find(&other) {
                self.apply(&other.secret, Ok(Some(found.clone())));
            }
        }
        Ok((unlisted, pages))
    }

    fn remember_listing(&self, scope: &Scope, listing: Listing) {
        let mut remembered = lock(&self.listing);
        if remembered.len() >= LISTING_MEMORY_MAX && !remembered.contains_key(scope) {
            remembered.clear();
        }
        remembered.insert(scope.clone(), listing);
    }

    /// One ListSecrets walk for a scope (a region, as the operator or a role): filtered by name when
    /// few secrets are due and all their names are known, else every page.
    async fn sweep_list(&self, scope: &Scope, due: Vec<super::index::Due>) {
        let names: Vec<String> = due.iter().filter_map(|d| d.name.clone()).collect();
        let filters = if names.len() == due.len() && names.len() <= LIST_FILTER_MAX {
            names
        } else {
            Vec::new()
        };
        // A full listing tells every secret of the scope: confirm them all, not only the due.
        let due = if filters.is_empty() {
            lock(&self.index).in_scope(scope)
        } else {
            due
        };
        match self.source.list(scope, &filters).await {
            Ok(listed) => {
                let lookup = ListedSecrets::new(&listed);
                for due in &due {
                    let found = lookup.find(due);
                    // Absent from the list: gone, or not yet visible (eventual consistency);
                    // DescribeSecret tells which.
                    let described = match found {
                        Some(found) => Ok(Some(found.clone())),
                        None => self.source.describe(&due.secret).await.map(Some),
                    };
                    self.apply(&due.secret, described);
                }
            }
            Err(error) => {
                // Every secret the listing was for backs off, as a failed describe does.
                {
                    let mut index = lock(&self.index);
                    let now = Instant::now();
                    for due in &due {
                        index.check_failed(&due.secret, now);
                    }
                }
                warn!(
                    region = scope.region,
                    role = scope.role.as_ref().map(|role| role.arn.as_str()),
                    reason = error.reason().as_str(),
                    detail = error.detail(),
                    "ListSecrets failed; versions are checked again at the next sweep, and \
                     identities read their values at their refresh interval meanwhile"
                );
            }
        }
    }

    /// Feeds one secret's sweep result into the index and notifies the identities whose secret
    /// changed (or disappeared).
    fn apply(&self, secret: &SecretRef, described: Result<Option<DescribedSecret>, SourceError>) {
        let changed_at = described
            .as_ref()
            .ok()
            .and_then(|d| d.as_ref())
            .and_then(|d| d.last_changed_unix);
        let gone = matches!(described, Err(SourceError::NotFound { .. }));
        if let Ok(Some(described)) = &described {
            // After a restart nothing was read yet: the check tells the names listings match by.
            lock(&self.index).identify(secret, &described.arn, &described.name);
        }
        let observed = match (&secret.version, described) {
            (VersionSelector::Stage(stage), Ok(Some(described))) => {
                Some(described.version_with_stage(stage).map(str::to_string))
            }
            (VersionSelector::Id(id), Ok(Some(_))) => Some(Some(id.clone())),
            (_, Ok(None)) | (_, Err(SourceError::NotFound { .. })) => Some(None),
            (_, Err(error)) => {
                // Not checked: tried again after a backed-off cadence (never at once: a denial is
                // not damped by the adaptive rate as throttling is).
                let failures = lock(&self.index).check_failed(secret, Instant::now());
                debug!(
                    secret = %secret.secret_id,
                    reason = error.reason().as_str(),
                    detail = error.detail(),
                    failures,
                    "version check failed"
                );
                None
            }
        };
        let Some(version) = observed else { return };
        let changed = {
            let mut index = lock(&self.index);
            index.set_gone(secret, gone);
            index.observe(secret, version.as_deref(), Instant::now())
        };
        if changed.is_empty() {
            return;
        }
        debug!(secret = %secret.secret_id, identities = changed.len(), "version changed");
        if let Some(metrics) = &self.metrics {
            metrics.changes_detected.inc();
            // From the secret's last change (as Secrets Manager dates it) to its detection here.
            if let Some(changed_at) = changed_at {
                let lag = chrono::Utc::now().timestamp() - changed_at;
                metrics.detection_lag.observe(lag.max(0) as f64);
            }
        }
        let notify = lock(&self.notify).clone();
        for identity in &changed {
            for notify in &notify {
                notify(identity);
            }
        }
    }

    /// Distinct secrets in the index.
    pub fn len(&self) -> usize {
        lock(&self.index).len()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.index).is_empty()
    }
}

/// What the index knows about one secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexView {
    /// The version its identities should hold.
    pub expected: Option<String>,
    /// Since the version was last read or confirmed.
    pub age: Option<Duration>,
    /// The last check found it deleted or scheduled for deletion.
    pub gone: bool,
    /// The last version check failed (denied, throttled, unreachable).
    pub checks_failing: bool,
}

/// What decides whether a value must be read.
#[derive(Debug, Clone, Copy)]
pub struct Freshness<'a> {
    pub mode: SweepMode,
    /// The version the identity's intact Secret carries (`None`: absent, foreign, edited, or the
    /// spec changed since it was written).
    pub carried: Option<&'a str>,
    /// The version the index expects.
    pub expected: Option<&'a str>,
    /// A version this identity already read and refused (bad material): not read again until it
    /// changes or the refresh interval passes.
    pub known_bad: Option<&'a str>,
    /// Since the version was last read or confirmed.
    pub age: Option<Duration>,
    /// The last version check failed: the version is read once it is old enough.
    pub checks_failing: bool,
    pub refresh: Duration,
}

/// Read when the Secret needs (re)writing, when the expected version differs from the carried one
/// (and is not one already refused), when nothing ever told the version, or when the version is
/// older than the refresh interval allows: in `get` mode one interval; with a sweep only while its
/// checks fail, after two intervals and at least [`FAILED_CHECK_MAX_WAIT`] (a sweep that is only
/// behind never causes reads).
pub fn needs_read(freshness: &Freshness<'_>) -> bool {
    let Freshness {
        mode,
        carried,
        expected,
        known_bad,
        age,
        checks_failing,
        refresh,
    } = *freshness;
    let limit = match mode {
        SweepMode::Get => Some(refresh),
        SweepMode::Auto | SweepMode::List | SweepMode::Describe if checks_failing => Some(
            refresh
                .saturating_mul(STALE_AFTER_INTERVALS)
                .max(FAILED_CHECK_MAX_WAIT),
        ),
        SweepMode::Auto | SweepMode::List | SweepMode::Describe => None,
    };
    match age {
        None => return true,
        Some(age) if limit.is_some_and(|limit| age >= limit) => return true,
        Some(_) => {}
    }
    match (carried, expected) {
        (None, _) => known_bad.is_none() || expected != known_bad,
        (Some(_), None) => true,
        (Some(carried), Some(expected)) => carried != expected && Some(expected) != known_bad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const HOUR: Duration = Duration::from_secs(3600);

    /// Secrets Manager in memory that only counts DescribeSecret calls (reads are not its test).
    #[derive(Default)]
    struct CountingDescribes(AtomicUsize);

    impl SecretSource for CountingDescribes {
        fn fetch<'a>(
            &'a self,
            secret: &'a SecretRef,
            _flow: &'a str,
        ) -> BoxFuture<'a, Result<super::super::FetchedSecret, SourceError>> {
            Box::pin(async move {
                Err(SourceError::Unavailable {
                    secret_id: secret.secret_id.clone(),
                    detail: "not read in this test".into(),
                })
            })
        }

        fn describe<'a>(
            &'a self,
            _secret: &'a SecretRef,
        ) -> BoxFuture<'a, Result<DescribedSecret, SourceError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                Ok(DescribedSecret {
                    versions: vec![("v1".into(), vec!["AWSCURRENT".into()])],
                    ..DescribedSecret::default()
                })
            })
        }
    }

    #[tokio::test]
    async fn a_secret_first_read_after_the_sweep_fell_asleep_is_checked_at_its_cadence() {
        let source = Arc::new(CountingDescribes::default());
        // A five-minute sweep, an identity refreshing every second.
        let fleet = Arc::new(Fleet::new(
            source.clone(),
            SweepMode::Describe,
            Duration::from_secs(300),
            None,
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sweep = tokio::spawn(fleet.clone().run_sweep(async {
            let _ = stopped.await;
        }));
        let secret = SecretRef {
            secret_id: "team/client".into(),
            region: "eu-west-1".into(),
            role: None,
            version: VersionSelector::Stage("AWSCURRENT".into()),
        };
        let identity = ("team".to_string(), "client".to_string());
        fleet.register(
            &identity,
            std::slice::from_ref(&secret),
            Duration::from_secs(1),
        );
        // The sweep wakes for the new entry, finds nothing it may check yet (the reconcile is
        // reading it), and would sleep its whole interval: the read must wake it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        fleet.record_read(&secret, "v1", "arn", "team/client");
        let checked = tokio::time::timeout(Duration::from_secs(20), async {
            while source.0.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let _ = stop.send(());
        let _ = sweep.await;
        assert!(
            checked.is_ok(),
            "no version check within 20 s of the first read: the sweep slept through it"
        );
    }

    fn fresh<'a>(carried: Option<&'a str>, expected: Option<&'a str>) -> Freshness<'a> {
        Freshness {
            mode: SweepMode::Describe,
            carried,
            expected,
            known_bad: None,
            age: Some(Duration::from_secs(1)),
            checks_failing: false,
            refresh: HOUR,
        }
    }

    #[test]
    fn reads_only_what_changed_or_needs_repair() {
        assert!(!needs_read(&fresh(Some("v1"), Some("v1"))), "up to date");
        assert!(needs_read(&fresh(Some("v1"), Some("v2"))), "a new version");
        assert!(needs_read(&fresh(None, Some("v1"))), "no intact Secret");
        let refused = Freshness {
            known_bad: Some("v2"),
            ..fresh(Some("v1"), Some("v2"))
        };
        assert!(!needs_read(&refused), "v2 was already refused");
        let behind = Freshness {
            age: Some(10 * HOUR),
            ..fresh(Some("v1"), Some("v1"))
        };
        assert!(
            !needs_read(&behind),
            "a sweep that is behind never turns into reads"
        );
        let failing = Freshness {
            age: Some(2 * HOUR),
            checks_failing: true,
            ..fresh(Some("v1"), Some("v1"))
        };
        assert!(
            needs_read(&failing),
            "checks have failed and nobody confirmed it for two intervals"
        );
        let failing_fast = Freshness {
            age: Some(Duration::from_secs(10)),
            checks_failing: true,
            refresh: Duration::from_secs(1),
            ..fresh(Some("v1"), Some("v1"))
        };
        assert!(
            !needs_read(&failing_fast),
            "failing checks are read for no sooner than the failure cadence, whatever the refresh"
        );
        let polled = Freshness {
            mode: SweepMode::Get,
            age: Some(HOUR),
            ..fresh(Some("v1"), Some("v1"))
        };
        assert!(needs_read(&polled), "get mode reads every interval");
        let unknown = Freshness {
            age: None,
            ..fresh(Some("v1"), Some("v1"))
        };
        assert!(needs_read(&unknown));
    }

    fn due(id: &str, name: Option<&str>) -> crate::source::index::Due {
        crate::source::index::Due {
            secret: SecretRef {
                secret_id: id.to_string(),
                region: "eu-west-1".into(),
                role: None,
                version: VersionSelector::Stage("AWSCURRENT".into()),
            },
            name: name.map(str::to_string),
            namespace: Arc::new(("ns".to_string(), "identity".to_string())),
        }
    }

    #[test]
    fn auto_lists_by_prefix_only_when_a_listing_costs_less_than_describing() {
        let fleet: Vec<_> = (0..30)
            .map(|n| {
                let name = format!("payments/client-{n}");
                due(&name, Some(&name))
            })
            .collect();
        let prefixes = |plan: Result<Vec<ListingGroup>, Vec<crate::source::index::Due>>| {
            plan.map(|groups| groups.into_iter().map(|g| g.prefixes).collect::<Vec<_>>())
                .map_err(|due| due.len())
        };
        assert_eq!(
            prefixes(listing_plan(fleet.clone(), None)),
            Ok(vec![vec!["payments/".to_string()]]),
            "one prefix covers a namespace's secrets"
        );
        assert_eq!(
            prefixes(listing_plan(fleet[..1].to_vec(), None)),
            Err(1),
            "one due secret: one DescribeSecret is no dearer than a listing"
        );
        let forty_pages = Listing::Pages {
            pages: 40,
            prefixes: 1,
        };
        assert_eq!(
            prefixes(listing_plan(fleet.clone(), Some(forty_pages))),
            Err(30),
            "the last listing took 40 pages: 30 describes are cheaper"
        );
        assert_eq!(
            prefixes(listing_plan(fleet.clone(), Some(Listing::Refused))),
            Err(30)
        );
        let mut unnamed = fleet.clone();
        unnamed.push(due(
            "arn:aws:secretsmanager:eu-west-1:111111111111:secret:x",
            None,
        ));
        assert_eq!(
            prefixes(listing_plan(unnamed, None)),
            Err(31),
            "a secret whose name is not known yet cannot be found in a listing"
        );
        // 25 namespaces of 4 due secrets each: 3 listings (10, 10 and 5 prefixes), not 100
        // describes.
        let many: Vec<_> = (0..25)
            .flat_map(|n| {
                (0..4).map(move |m| {
                    let name = format!("team-{n:02}/client-{m}");
                    due(&name, Some(&name))
                })
            })
            .collect();
        let groups = listing_plan(many.clone(), None).expect("lists");
        assert_eq!(
            groups.iter().map(|g| g.prefixes.len()).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        assert!(
            groups.iter().all(|g| g.due.iter().all(|d| g
                .prefixes
                .contains(&listing_prefix(d.name.as_deref().unwrap_or_default())))),
            "each listing carries exactly the secrets under its prefixes"
        );
        assert_eq!(groups.iter().map(|g| g.due.len()).sum::<usize>(), 100);
        // Remembered: 50 pages for those 25 prefixes; 5 of them due now: 10 pages expected
        // against 20 describes.
        let two_per_prefix = Listing::Pages {
            pages: 50,
            prefixes: 25,
        };
        assert!(listing_plan(many[..20].to_vec(), Some(two_per_prefix)).is_ok());
        let four_per_prefix = Listing::Pages {
            pages: 100,
            prefixes: 25,
        };
        assert_eq!(
            prefixes(listing_plan(many[..8].to_vec(), Some(four_per_prefix))),
            Err(8),
            "2 prefixes at 4 pages each: 8 describes cost no more"
        );
        assert_eq!(listing_prefix("flat-name"), "flat-name");
    }

    #[test]
    fn healthy_events_lift_the_sweep_interval_until_they_lapse_or_fail() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let fleet = Fleet::new(
            Arc::new(CountingDescribes::default()),
            SweepMode::Auto,
            Duration::from_secs(300),
            Some(metrics.clone()),
        );
        let now = Instant::now();
        let five_minutes = Some(Duration::from_secs(300));
        assert_eq!(fleet.sweep_interval(now), five_minutes, "no answer yet");
        fleet.events_answered(now);
        assert_eq!(
            fleet.sweep_interval(now),
            None,
            "each secret at its refresh"
        );
        assert!(metrics.encode().contains("mtls_source_events_healthy 1"));
        assert_eq!(
            fleet.sweep_interval(now + EVENTS_HEALTHY_FOR),
            five_minutes,
            "no answer for a minute: a receive that hangs ends it too"
        );
        fleet.events_failed();
        assert_eq!(
            fleet.sweep_interval(now),
            five_minutes,
            "a failure ends it at once"
        );
        assert!(metrics.encode().contains("mtls_source_events_healthy 0"));
        let polling = Fleet::new(
            Arc::new(CountingDescribes::default()),
            SweepMode::Get,
            Duration::from_secs(300),
            None,
        );
        polling.events_answered(now);
        assert_eq!(polling.sweep_interval(now), None, "get mode never sweeps");
    }

    #[test]
    fn an_arn_id_is_found_in_a_listing_by_its_arn_only() {
        let arn = "arn:aws:secretsmanager:eu-west-1:111111111111:secret:payments/client";
        let other_account = DescribedSecret {
            arn: "arn:aws:secretsmanager:eu-west-1:222222222222:secret:payments/client-AbCdEf"
                .into(),
            name: "payments/client".into(),
            ..Default::default()
        };
        let wanted = due(arn, Some("payments/client"));
        let listed = [other_account.clone()];
        assert!(
            ListedSecrets::new(&listed).find(&wanted).is_none(),
            "same name, another account"
        );
        let same = DescribedSecret {
            arn: format!("{arn}-AbCdEf"),
            ..other_account
        };
        let listed = [same.clone()];
        let lookup = ListedSecrets::new(&listed);
        assert_eq!(
            lookup.find(&wanted),
            Some(&same),
            "the ARN without its suffix"
        );
        assert_eq!(
            lookup.find(&due(&same.arn, None)),
            Some(&same),
            "the full ARN"
        );
        assert_eq!(
            lookup.find(&due("payments/client", None)),
            Some(&same),
            "a name id by name"
        );
    }
}
