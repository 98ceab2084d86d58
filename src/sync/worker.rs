//! The worker: claims inbox items under a lease, coalesces items for the same resource into one
//! fetch, applies the fetched records, and finishes each item `done`, `ignored` or `dead`, or
//! puts it back for a later attempt with exponential backoff and jitter.
//!
//! Coalescing starts at the claim: for every record a claimed item asks to refetch, the worker
//! also claims the other pending items about that resource, so a burst of webhooks for one
//! patient becomes one fetch, applied once, and every item finishes in the same transaction.
//! Batching: while a source that fetches many records per request (Healthie's `users(ids:)`)
//! has fewer distinct records in hand than its batch size, the worker claims again, and when
//! the queue is only trickling, waits once for the source's `batch_window` (never in `drain`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::config::WorkerSettings;
use crate::metrics::Metrics;
use crate::model::{InboxId, RecordStatus, SourceId, SourceKey, SourceKind, SourceRecord};
use crate::sources::http::FetchError;
use crate::sources::{Plan, Source};
use crate::store::{now_ms, InboxItem, RetryAt, Store, StoreError};
use crate::sync::apply::{apply_record, fold_patient, lock_records, IdentitySettings};

/// Totals of one drain, for summaries and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainSummary {
    pub claimed: u64,
    pub done: u64,
    pub ignored: u64,
    pub retried: u64,
    pub dead: u64,
    pub fetched: u64,
}

impl DrainSummary {
    fn add(&mut self, other: &DrainSummary) {
        self.claimed += other.claimed;
        self.done += other.done;
        self.ignored += other.ignored;
        self.retried += other.retried;
        self.dead += other.dead;
        self.fetched += other.fetched;
    }
}

/// Processes inbox items for every configured source.
pub struct Worker {
    store: Arc<dyn Store>,
    sources: HashMap<SourceKind, Arc<dyn Source>>,
    settings: WorkerSettings,
    identity: Arc<IdentitySettings>,
    metrics: Arc<Metrics>,
    owner: String,
}

/// How one inbox item ends after a batch.
enum Finish {
    Ignored(String),
    Failed(FetchError),
    Dead(&'static str),
}

impl Finish {
    /// The same outcome for another item that shared the fetch.
    fn copy(&self) -> Finish {
        match self {
            Finish::Ignored(reason) => Finish::Ignored(reason.clone()),
            Finish::Failed(e) => Finish::Failed(e.copy_kind()),
            Finish::Dead(kind) => Finish::Dead(kind),
        }
    }
}

/// Aborts its task when dropped (also when the future holding it is cancelled).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One claim holds at most this many times `worker.batch_size` items.
const MAX_CLAIM_ROUNDS: usize = 8;

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        sources: HashMap<SourceKind, Arc<dyn Source>>,
        settings: WorkerSettings,
        identity: Arc<IdentitySettings>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let owner = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
        Self {
            store,
            sources,
            settings,
            identity,
            metrics,
            owner,
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Claims and processes one batch. Returns what happened (zero claimed: nothing was due).
    pub async fn run_once(&self) -> Result<DrainSummary, StoreError> {
        self.run_batch(false).await
    }

    /// One batch; with `wait_for_batches` a short claim may wait for the sources' batch windows.
    #[instrument(skip_all, fields(owner = %self.owner))]
    async fn run_batch(&self, wait_for_batches: bool) -> Result<DrainSummary, StoreError> {
        let mut items = self.claim(wait_for_batches).await?;
        // Batching sources: one worker of the process at a time claims and fetches their
        // batches. When another worker holds the turn, this one hands its items back (the claim's
        // attempt is undone) and idles: the turn holder's next claim takes them into one
        // request instead of a small one each queueing at the rate limiter. The turn is held
        // until the batch is applied.
        let mut turns = Vec::new();
        if wait_for_batches {
            let kinds: BTreeSet<SourceKind> = items
                .iter()
                .filter(|i| !self.fetch_ids(i).is_empty())
                .map(|i| i.source)
                .collect();
            for kind in kinds {
                if let Some(turn) = self.sources.get(&kind).and_then(|s| s.fetch_turn()) {
                    match turn.try_lock_owned() {
                        Ok(guard) => turns.push(guard),
                        Err(_) => {
                            self.store.release_leases(&self.owner).await?;
                            return Ok(DrainSummary::default());
                        }
                    }
                }
            }
            if !turns.is_empty() {
                let held: HashSet<InboxId> = items.iter().map(|i| i.id).collect();
                let more = self.claim(false).await?;
                items.extend(more.into_iter().filter(|i| !held.contains(&i.id)));
                items.sort_by_key(|i| i.id);
            }
        }
        let mut summary = DrainSummary {
            claimed: items.len() as u64,
            ..Default::default()
        };
        if items.is_empty() {
            return Ok(summary);
        }
        let _renewal = self.renew_leases_while_working();
        let mut by_source: BTreeMap<SourceKind, Vec<InboxItem>> = BTreeMap::new();
        for item in items {
            by_source.entry(item.source).or_default().push(item);
        }
        for (source, items) in by_source {
            let part = self.process_source(source, items).await?;
            summary.add(&part);
        }
        drop(turns);
        Ok(summary)
    }

    /// Claims a batch: `worker.batch_size` due items, plus every other pending item about a
    /// resource they refetch; then more while a batching source is short of a full request
    /// and the queue has more, waiting once for its batch window when the queue trickles.
    async fn claim(&self, wait_for_batches: bool) -> Result<Vec<InboxItem>, StoreError> {
        let lease = Duration::from_secs(self.settings.lease_secs);
        let limit = self.settings.batch_size;
        let cap = (limit as usize).saturating_mul(MAX_CLAIM_ROUNDS);
        let mut items: Vec<InboxItem> = Vec::new();
        let mut held: HashSet<InboxId> = HashSet::new();
        let mut asked: HashSet<(SourceKind, SourceId)> = HashSet::new();
        let mut waited = false;
        loop {
            let claimed = self
                .store
                .claim_inbox(&self.owner, limit, lease, now_ms())
                .await?;
            let full = claimed.len() >= limit as usize;
            let mut fresh: Vec<InboxItem> =
                claimed.into_iter().filter(|i| held.insert(i.id)).collect();
            // Claim-time coalescing: the other pending items about the same resources.
            let mut wanted: BTreeMap<SourceKind, Vec<String>> = BTreeMap::new();
            for item in &fresh {
                for id in self.fetch_ids(item) {
                    if asked.insert((item.source, id.clone())) {
                        wanted.entry(item.source).or_default().push(id.0);
                    }
                }
            }
            for (source, ids) in wanted {
                let siblings = self
                    .store
                    .claim_inbox_resources(&self.owner, source, &ids, lease, now_ms())
                    .await?;
                fresh.extend(siblings.into_iter().filter(|i| held.insert(i.id)));
            }
            items.extend(fresh.iter().cloned());
            let Some((window, short)) = self.short_window(&items) else {
                break;
            };
            if items.len() >= cap {
                break;
            }
            // Claim again at once only while the queue keeps yielding items of a short source.
            if full && fresh.iter().any(|i| short.contains(&i.source)) {
                continue;
            }
            if !wait_for_batches || waited || window.is_zero() {
                break;
            }
            waited = true;
            tokio::time::sleep(window).await;
        }
        items.sort_by_key(|i| i.id);
        Ok(items)
    }

    /// Extends this worker's leases every third of a lease until the returned guard is
    /// dropped, so a batch slower than one lease (a rate-limited source) is not claimed again
    /// by another worker mid-way. A crashed process stops renewing and its leases expire.
    fn renew_leases_while_working(&self) -> AbortOnDrop {
        let store = self.store.clone();
        let owner = self.owner.clone();
        let lease = Duration::from_secs(self.settings.lease_secs.max(1));
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                let until = now_ms() + lease.as_millis() as i64;
                if let Err(e) = store.renew_leases(&owner, until).await {
                    warn!(error = %e, "Worker could not renew its leases.");
                }
            }
        }))
    }

    /// The ids an item asks to refetch (none when it cannot be planned or needs no fetch).
    fn fetch_ids(&self, item: &InboxItem) -> Vec<SourceId> {
        let Some(source) = self.sources.get(&item.source) else {
            return Vec::new();
        };
        match source.plan(item) {
            Ok(Plan::Fetch(ids)) => ids,
            Ok(Plan::Merge { from, into }) => vec![from, into],
            _ => Vec::new(),
        }
    }

    /// When a batching source has some but fewer distinct records to fetch than one request
    /// carries: the longest batch window among such sources, and those sources. `None` when
    /// every batch is full.
    fn short_window(&self, items: &[InboxItem]) -> Option<(Duration, Vec<SourceKind>)> {
        let mut distinct: BTreeMap<SourceKind, BTreeSet<SourceId>> = BTreeMap::new();
        for item in items {
            distinct
                .entry(item.source)
                .or_default()
                .extend(self.fetch_ids(item));
        }
        let short: Vec<(SourceKind, Duration)> = distinct
            .into_iter()
            .filter_map(|(kind, ids)| {
                let source = self.sources.get(&kind)?;
                let size = source.fetch_batch_size();
                (size > 1 && !ids.is_empty() && ids.len() < size)
                    .then(|| (kind, source.batch_window()))
            })
            .collect();
        let window = short.iter().map(|(_, w)| *w).max()?;
        Some((window, short.into_iter().map(|(k, _)| k).collect()))
    }

    /// Processes batches until nothing is due. Tests, `sync` and the demo drive the queue with
    /// this, so they never sleep.
    pub async fn drain(&self) -> Result<DrainSummary, StoreError> {
        let mut total = DrainSummary::default();
        loop {
            let part = self.run_once().await?;
            if part.claimed == 0 {
                return Ok(total);
            }
            total.add(&part);
        }
    }

    /// Runs until `shutdown` fires: then abandons the batch in hand (its uncommitted
    /// transaction rolls back; every item commits with its effect or not at all) and returns
    /// the items it still leases to `pending`, so another worker takes them at once.
    pub async fn run(&self, shutdown: CancellationToken) {
        let idle = Duration::from_millis(self.settings.idle_poll_ms);
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.run_batch(true) => r,
            };
            match result {
                Ok(s) if s.claimed > 0 => failures = 0,
                Ok(_) => {
                    failures = 0;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(idle) => {}
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = Duration::from_millis(200u64 << failures.min(7));
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Worker could not reach the store.");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        match self.store.release_leases(&self.owner).await {
            Ok(n) if n > 0 => info!(released = n, "Worker released its leases."),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "Worker could not release its leases; they expire on their own.")
            }
        }
    }

    async fn process_source(
        &self,
        source: SourceKind,
        items: Vec<InboxItem>,
    ) -> Result<DrainSummary, StoreError> {
        let mut summary = DrainSummary::default();
        let Some(client) = self.sources.get(&source).cloned() else {
            for item in &items {
                self.finish(
                    item,
                    Finish::Ignored(format!("source {source} is not enabled")),
                    &mut summary,
                )
                .await?;
            }
            return Ok(summary);
        };
        // Coalesce: one fetch per distinct id, shared by every item that asked for it.
        let mut wanted: BTreeMap<SourceId, Vec<usize>> = BTreeMap::new();
        let mut plans = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let plan = client.plan(item);
            match &plan {
                Ok(Plan::Fetch(ids)) => {
                    for id in ids {
                        wanted.entry(id.clone()).or_default().push(i);
                    }
                }
                Ok(Plan::Merge { from, into }) => {
                    wanted.entry(from.clone()).or_default().push(i);
                    wanted.entry(into.clone()).or_default().push(i);
                }
                _ => {}
            }
            plans.push(plan);
        }
        let ids: Vec<SourceId> = wanted.keys().cloned().collect();
        let fetched: HashMap<SourceId, Result<Option<SourceRecord>, FetchError>> = if ids.is_empty()
        {
            HashMap::new()
        } else {
            summary.fetched += ids.len() as u64;
            client.fetch_records(&ids).await.into_iter().collect()
        };

        // Items asking for the same records are applied once and finish together, in the
        // position of the first of them.
        let mut groups: HashMap<Vec<SourceId>, Vec<usize>> = HashMap::new();
        for (i, plan) in plans.iter().enumerate() {
            if let Ok(Plan::Fetch(ids)) = plan {
                groups.entry(ids.clone()).or_default().push(i);
            }
        }
        for (i, plan) in plans.into_iter().enumerate() {
            let item = &items[i];
            let finish = match plan {
                Err(e) => {
                    debug!(inbox_id = %item.id, what = e.what, "Inbox item cannot be planned.");
                    Finish::Dead("undecodable_item")
                }
                Ok(Plan::Ignore(reason)) => Finish::Ignored(reason),
                Ok(Plan::Apply(record)) => {
                    self.apply_and_finish(&[item], &[*record], None).await?;
                    summary.done += 1;
                    self.observe(item);
                    continue;
                }
                Ok(Plan::Fetch(ids)) => {
                    let Some(members) = groups.remove(&ids) else {
                        continue; // finished with the first item of its group
                    };
                    let members: Vec<&InboxItem> = members.iter().map(|&m| &items[m]).collect();
                    match collect(&fetched, &ids, source) {
                        Ok(records) => {
                            self.apply_and_finish(&members, &records, None).await?;
                            for member in &members {
                                summary.done += 1;
                                self.observe(member);
                            }
                        }
                        Err(e) => {
                            for member in &members {
                                self.finish(member, e.copy(), &mut summary).await?;
                            }
                        }
                    }
                    continue;
                }
                Ok(Plan::Merge { from, into }) => {
                    match collect(&fetched, &[from.clone(), into.clone()], source) {
                        Ok(mut records) => {
                            for r in records.iter_mut().filter(|r| r.key.id == from) {
                                r.status = RecordStatus::Merged;
                                r.merged_into = Some(into.clone());
                            }
                            let merge =
                                (SourceKey::new(source, from), SourceKey::new(source, into));
                            self.apply_and_finish(&[item], &records, Some(merge))
                                .await?;
                            summary.done += 1;
                            self.observe(item);
                            continue;
                        }
                        Err(e) => e,
                    }
                }
            };
            self.finish(item, finish, &mut summary).await?;
        }
        Ok(summary)
    }

    fn observe(&self, item: &InboxItem) {
        let age = (now_ms() - item.received_at_ms).max(0) as f64 / 1000.0;
        self.metrics.observe(
            "patient_sync_event_latency_seconds",
            "Time from receiving an inbox item to its effect on the canonical table, by source.",
            &[("source", item.source.as_str())],
            age,
        );
        self.metrics.inc(
            crate::metrics::EVENTS_PROCESSED,
            crate::metrics::EVENTS_PROCESSED_HELP,
            &[("source", item.source.as_str()), ("outcome", "done")],
            1,
        );
    }

    /// Applies records and finishes the items in one transaction. A lost lease on any of them
    /// rolls it all back (the items still held are claimed again when their lease expires).
    async fn apply_and_finish(
        &self,
        items: &[&InboxItem],
        records: &[SourceRecord],
        merge: Option<(SourceKey, SourceKey)>,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        let mut tx = self.store.begin().await?;
        lock_records(tx.as_mut(), records.iter().map(|r| &r.key)).await?;
        let mut patients = Vec::new();
        for record in records {
            let applied = apply_record(tx.as_mut(), record, &self.identity, now).await?;
            patients.push((record.key.clone(), applied.patient_id));
        }
        if let Some((from, into)) = merge {
            let find = |key: &SourceKey| {
                patients
                    .iter()
                    .find(|(k, _)| k == key)
                    .and_then(|(_, p)| p.clone())
            };
            if let (Some(from_patient), Some(into_patient)) = (find(&from), find(&into)) {
                fold_patient(
                    tx.as_mut(),
                    &from_patient,
                    &into_patient,
                    &self.identity,
                    now,
                )
                .await?;
            }
        }
        let ids: Vec<InboxId> = items.iter().map(|i| i.id).collect();
        let finished = tx.finish_inbox(&ids, &self.owner, None, now_ms()).await?;
        if finished == ids.len() as u64 {
            tx.commit().await?;
        } else {
            warn!(inbox_id = %ids[0], items = ids.len(), "Lease was lost before the items finished; their work is left to the new owner.");
        }
        Ok(())
    }

    async fn finish(
        &self,
        item: &InboxItem,
        finish: Finish,
        summary: &mut DrainSummary,
    ) -> Result<(), StoreError> {
        let source = item.source.as_str();
        match finish {
            Finish::Ignored(reason) => {
                let mut tx = self.store.begin().await?;
                tx.finish_inbox(&[item.id], &self.owner, Some(&reason), now_ms())
                    .await?;
                tx.commit().await?;
                summary.ignored += 1;
                self.count(source, "ignored");
            }
            Finish::Dead(kind) => {
                self.store
                    .dead_inbox(item.id, &self.owner, kind, None, now_ms())
                    .await?;
                summary.dead += 1;
                self.count(source, "dead");
            }
            Finish::Failed(error) => {
                let attempts = item.attempts.max(0) as u32;
                if !error.is_retryable()
                    || (!error.is_rate_limit() && attempts >= self.settings.max_attempts)
                {
                    warn!(inbox_id = %item.id, source, error_kind = error.kind(), http_status = ?error.http_status(), attempts, "Inbox item dead-lettered.");
                    self.store
                        .dead_inbox(
                            item.id,
                            &self.owner,
                            error.kind(),
                            error.http_status(),
                            now_ms(),
                        )
                        .await?;
                    summary.dead += 1;
                    self.count(source, "dead");
                } else {
                    let delay = match error.retry_after() {
                        Some(d) => d,
                        None if error.is_rate_limit() => {
                            Duration::from_millis(self.settings.retry_initial_ms)
                        }
                        None => retry_delay(&self.settings, attempts),
                    };
                    let retry = RetryAt {
                        available_at_ms: now_ms() + delay.as_millis() as i64,
                        error_kind: error.kind().to_string(),
                        http_status: error.http_status(),
                        count_attempt: !error.is_rate_limit(),
                    };
                    debug!(inbox_id = %item.id, source, error_kind = error.kind(), retry_in_ms = delay.as_millis() as u64, "Inbox item will be retried.");
                    self.store.retry_inbox(item.id, &self.owner, &retry).await?;
                    summary.retried += 1;
                    self.count(source, "retried");
                }
            }
        }
        Ok(())
    }

    fn count(&self, source: &str, outcome: &str) {
        self.metrics.inc(
            crate::metrics::EVENTS_PROCESSED,
            crate::metrics::EVENTS_PROCESSED_HELP,
            &[("source", source), ("outcome", outcome)],
            1,
        );
    }
}

/// Records for every id, or the first failure. An id the source does not know is skipped.
fn collect(
    fetched: &HashMap<SourceId, Result<Option<SourceRecord>, FetchError>>,
    ids: &[SourceId],
    source: SourceKind,
) -> Result<Vec<SourceRecord>, Finish> {
    let mut records = Vec::new();
    for id in ids {
        match fetched.get(id) {
            Some(Ok(Some(record))) => records.push(record.clone()),
            Some(Ok(None)) => {}
            Some(Err(e)) => return Err(Finish::Failed(e.copy_kind())),
            None => {
                debug!(source = %source, "Fetch answered no result for a requested id.");
                return Err(Finish::Failed(FetchError::Decode {
                    what: "missing result",
                }));
            }
        }
    }
    if records.is_empty() {
        return Err(Finish::Ignored("resource not found upstream".into()));
    }
    Ok(records)
}

/// Exponential backoff with full jitter: a random delay up to `initial * 2^(attempt-1)`, capped.
pub fn retry_delay(settings: &WorkerSettings, attempt: u32) -> Duration {
    let exp = settings
        .retry_initial_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(settings.retry_max_ms);
    let jittered = rand::thread_rng().gen_range(exp / 2..=exp.max(1));
    Duration::from_millis(jittered)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let settings = WorkerSettings {
            concurrency: 1,
            batch_size: 1,
            lease_secs: 1,
            idle_poll_ms: 1,
            max_attempts: 5,
            retry_initial_ms: 1000,
            retry_max_ms: 8000,
            shutdown_grace_secs: 1,
        };
        for _ in 0..50 {
            let first = retry_delay(&settings, 1).as_millis();
            assert!((500..=1000).contains(&first), "{first}");
            let late = retry_delay(&settings, 20).as_millis();
            assert!((4000..=8000).contains(&late), "{late}");
        }
    }
}
