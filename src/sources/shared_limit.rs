//! Rate limits shared by every process using one database: several `serve` replicas, or a
//! `resync` beside `serve`, each holding an [`Upstream`](super::http::Upstream) for the same
//! credential, together stay within the credential's limits.
//!
//! Each limit is a GCRA ("generic cell rate algorithm") kept in one database row: its
//! theoretical arrival time (TAT). A caller reserves the next slot in one atomic write (the TAT
//! moves to `max(TAT, now) + interval`) and sleeps until its slot starts, `interval` plus the
//! burst allowance before the new TAT. Every caller gets its own slot, in every process.
//!
//! - Keys: `<source>` at the full rate and burst of the credential, for every request;
//!   `<source>:bulk` at `1 - live_reserved_share` of them, for bulk-lane requests too. Across
//!   processes bulk work stays within its share and live work always keeps the rest.
//! - A rate-limit answer seen by one process moves `<source>`'s TAT to the end of the pause,
//!   so every process waits it out.
//! - A daily allowance (IntakeQ) is counted in `<source>:day`, so two processes cannot each
//!   spend it.
//!
//! Times are wall-clock microseconds: hosts sharing a Postgres database must keep their clocks
//! in sync (NTP); with SQLite every process is on one host.
//!
//! The in-process limiters (governor) stay the first gate. When the database cannot be
//! reached (an error, or no answer within [`SHARED_TIMEOUT`]) the request goes ahead on the
//! in-process limiters alone, a warning is logged once (no PHI: the source and the error
//! kind), `patient_sync_shared_rate_limit_errors_total` counts it, and the shared limiter is
//! skipped for [`RETRY_SHARED_AFTER`] before it is tried again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use governor::Quota;

use super::http::Clock;
use crate::metrics::Metrics;
use crate::model::SourceKind;

/// Why the shared state could not be read or written. Carries keys and numbers only.
pub type SlotError = Box<dyn std::error::Error + Send + Sync>;

/// Where shared limits are kept (the store implements it; tests use [`MemorySlots`]).
#[async_trait]
pub trait RateSlots: Send + Sync {
    /// Moves `key`'s TAT to `max(tat, now_us) + interval_us` atomically and returns it (a new
    /// key starts at `now_us`).
    async fn reserve(&self, key: &str, now_us: i64, interval_us: i64) -> Result<i64, SlotError>;
    /// Moves `key`'s TAT to at least `at_us`.
    async fn defer(&self, key: &str, at_us: i64) -> Result<(), SlotError>;
    /// Takes one request of daily allowance `key` in the window ending `window_end_us`, unless
    /// `used + keep >= limit` there (`keep < limit`). Returns the requests used after taking,
    /// `None` when none was left.
    async fn take_daily(
        &self,
        key: &str,
        window_end_us: i64,
        limit: u32,
        keep: u32,
    ) -> Result<Option<u32>, SlotError>;
}

/// How long a reservation may take before the request goes ahead on the in-process limiters.
pub const SHARED_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the shared limiter is skipped after it failed.
pub const RETRY_SHARED_AFTER: Duration = Duration::from_secs(10);

const ERRORS: &str = "patient_sync_shared_rate_limit_errors_total";
const ERRORS_HELP: &str = "Shared (database) rate-limit operations that failed or timed out, by source and operation; the request went ahead on the in-process limiter.";

/// One GCRA limit kept under `key`: a request every `interval_us`, up to `tolerance_us`
/// ahead of that schedule (the burst).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedQuota {
    pub key: String,
    pub interval_us: i64,
    pub tolerance_us: i64,
}

impl SharedQuota {
    /// `quota`'s rate and burst under `key`.
    pub fn new(key: String, quota: &Quota) -> Self {
        let interval_us = i64::try_from(quota.replenish_interval().as_micros())
            .unwrap_or(i64::MAX / 4)
            .max(1);
        let burst = i64::from(quota.burst_size().get());
        Self {
            key,
            interval_us,
            tolerance_us: interval_us.saturating_mul(burst - 1),
        }
    }

    /// When the request whose reservation moved the TAT to `tat_us` may be sent.
    pub fn start_us(&self, tat_us: i64) -> i64 {
        tat_us - self.interval_us - self.tolerance_us
    }

    /// The TAT that makes the first slot after a pause start when the pause ends.
    pub fn paused_tat(&self, until_us: i64) -> i64 {
        until_us + self.tolerance_us
    }
}

/// The shared limits of one credential, as its [`Upstream`](super::http::Upstream) uses them.
pub struct SharedLimiter {
    slots: Arc<dyn RateSlots>,
    clock: Arc<dyn Clock>,
    source: SourceKind,
    main: Vec<SharedQuota>,
    bulk: Vec<SharedQuota>,
    metrics: Arc<Metrics>,
    /// Set after a failure: until then the shared limiter is skipped.
    skip_until: std::sync::Mutex<Option<Instant>>,
}

/// The key of quota `index` of `source` (the first is the source's name).
fn key(source: SourceKind, index: usize) -> String {
    match index {
        0 => source.as_str().to_string(),
        i => format!("{}#{i}", source.as_str()),
    }
}

impl SharedLimiter {
    /// `quotas` under `<source>`, and `bulk` (the bulk lane's scaled quotas, empty when no
    /// share is reserved) under `<source>:bulk`.
    pub fn new(
        source: SourceKind,
        quotas: &[Quota],
        bulk: &[Quota],
        slots: Arc<dyn RateSlots>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut limiter = Self {
            slots,
            clock,
            source,
            main: quotas
                .iter()
                .enumerate()
                .map(|(i, q)| SharedQuota::new(key(source, i), q))
                .collect(),
            bulk: Vec::new(),
            metrics,
            skip_until: std::sync::Mutex::new(None),
        };
        limiter.set_bulk(bulk);
        limiter
    }

    /// Replaces the bulk lane's quotas.
    pub fn set_bulk(&mut self, bulk: &[Quota]) {
        self.bulk = bulk
            .iter()
            .enumerate()
            .map(|(i, q)| SharedQuota::new(format!("{}:bulk", key(self.source, i)), q))
            .collect();
    }

    pub fn quotas(&self) -> (&[SharedQuota], &[SharedQuota]) {
        (&self.main, &self.bulk)
    }

    fn now_us(&self) -> i64 {
        self.clock.now().timestamp_micros()
    }

    fn skipping(&self) -> bool {
        let mut skip = self.skip_until.lock().expect("skip lock");
        match *skip {
            Some(until) if until > Instant::now() => true,
            Some(_) => {
                *skip = None;
                tracing::info!(
                    source = self.source.as_str(),
                    "retrying the shared rate limiter"
                );
                false
            }
            None => false,
        }
    }

    /// Counts a failure, warns when the limiter was working, and skips it for a while.
    fn failed(&self, op: &'static str, error: &str) {
        self.metrics.inc(
            ERRORS,
            ERRORS_HELP,
            &[("source", self.source.as_str()), ("op", op)],
            1,
        );
        let mut skip = self.skip_until.lock().expect("skip lock");
        if skip.is_none() {
            tracing::warn!(
                source = self.source.as_str(),
                op,
                error,
                retry_secs = RETRY_SHARED_AFTER.as_secs(),
                "shared rate limiter unavailable; using this process's limiter alone"
            );
        }
        *skip = Some(Instant::now() + RETRY_SHARED_AFTER);
    }

    /// Runs one shared operation with the timeout; `None` when it failed (already counted).
    async fn call<T, F>(&self, op: &'static str, fut: F) -> Option<T>
    where
        F: std::future::Future<Output = Result<T, SlotError>>,
    {
        match tokio::time::timeout(SHARED_TIMEOUT, fut).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.failed(op, &e.to_string());
                None
            }
            Err(_) => {
                self.failed(op, "timed out");
                None
            }
        }
    }

    /// Waits for a slot of every shared quota of the lane: the bulk lane's first, then the
    /// credential's.
    pub async fn wait(&self, bulk: bool) {
        let lane: &[SharedQuota] = if bulk { &self.bulk } else { &[] };
        for quota in lane.iter().chain(&self.main) {
            if self.skipping() {
                return;
            }
            let now = self.now_us();
            let Some(tat) = self
                .call(
                    "reserve",
                    self.slots.reserve(&quota.key, now, quota.interval_us),
                )
                .await
            else {
                return;
            };
            let start = quota.start_us(tat);
            if start > now {
                if let Some(at) = DateTime::<Utc>::from_timestamp_micros(start) {
                    self.clock.sleep_until(at).await;
                }
            }
        }
    }

    /// Makes every process wait `delay` from now before its next request of this credential.
    pub async fn pause_for(&self, delay: Duration) {
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::days(366));
        self.pause_until(self.clock.now() + delay).await
    }

    /// Makes every process wait until `until` before its next request of this credential.
    pub async fn pause_until(&self, until: DateTime<Utc>) {
        if self.skipping() {
            return;
        }
        for quota in &self.main {
            let at = quota.paused_tat(until.timestamp_micros());
            if self
                .call("pause", self.slots.defer(&quota.key, at))
                .await
                .is_none()
            {
                return;
            }
        }
    }

    /// Takes one request of the daily allowance shared under `<source>:day` in the window
    /// ending `window_end`: `Some(Some(used))` taken, `Some(None)` spent, `None` unavailable.
    pub async fn take_daily(
        &self,
        window_end: DateTime<Utc>,
        limit: u32,
        keep: u32,
    ) -> Option<Option<u32>> {
        if self.skipping() {
            return None;
        }
        let key = daily_key(self.source);
        let keep = keep.min(limit.saturating_sub(1));
        self.call(
            "daily_budget",
            self.slots
                .take_daily(&key, window_end.timestamp_micros(), limit, keep),
        )
        .await
    }
}

/// The key of `source`'s shared daily allowance (table `rate_budgets`).
pub fn daily_key(source: SourceKind) -> String {
    format!("{}:day", source.as_str())
}

/// Shared limits in memory: one process's stand-in for the database, for tests.
#[derive(Default)]
pub struct MemorySlots {
    tats: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    days: std::sync::Mutex<std::collections::HashMap<String, (i64, u32)>>,
}

#[async_trait]
impl RateSlots for MemorySlots {
    async fn reserve(&self, key: &str, now_us: i64, interval_us: i64) -> Result<i64, SlotError> {
        let mut tats = self.tats.lock().expect("slots lock");
        let tat = tats.entry(key.to_string()).or_insert(now_us);
        *tat = (*tat).max(now_us) + interval_us;
        Ok(*tat)
    }

    async fn defer(&self, key: &str, at_us: i64) -> Result<(), SlotError> {
        let mut tats = self.tats.lock().expect("slots lock");
        let tat = tats.entry(key.to_string()).or_insert(at_us);
        *tat = (*tat).max(at_us);
        Ok(())
    }

    async fn take_daily(
        &self,
        key: &str,
        window_end_us: i64,
        limit: u32,
        keep: u32,
    ) -> Result<Option<u32>, SlotError> {
        let mut days = self.days.lock().expect("slots lock");
        let day = days.entry(key.to_string()).or_insert((window_end_us, 0));
        if day.0 < window_end_us {
            *day = (window_end_us, 0);
        }
        if day.1.saturating_add(keep) >= limit {
            return Ok(None);
        }
        day.1 += 1;
        Ok(Some(day.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::http::ManualClock;
    use std::num::NonZeroU32;

    fn at(us: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(1_800_000_000_000_000 + us).unwrap()
    }

    fn since_start(clock: &ManualClock) -> i64 {
        clock.now().timestamp_micros() - 1_800_000_000_000_000
    }

    fn limiter(
        quota: Quota,
        bulk: &[Quota],
        slots: Arc<dyn RateSlots>,
        clock: Arc<ManualClock>,
    ) -> SharedLimiter {
        SharedLimiter::new(
            SourceKind::Healthie,
            &[quota],
            bulk,
            slots,
            clock,
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn a_quota_becomes_an_interval_and_a_burst_allowance() {
        let q = SharedQuota::new(
            "k".into(),
            &Quota::per_second(NonZeroU32::new(5).unwrap())
                .allow_burst(NonZeroU32::new(5).unwrap()),
        );
        assert_eq!((q.interval_us, q.tolerance_us), (200_000, 800_000));
        // The fifth reservation on an idle key still starts at once; the sixth one interval on.
        assert_eq!(q.start_us(1_000_000), 0);
        assert_eq!(q.start_us(1_200_000), 200_000);
        assert_eq!(q.paused_tat(5_000_000), 5_800_000);
    }

    #[tokio::test]
    async fn callers_of_two_limiters_sharing_slots_get_distinct_slots_at_the_rate() {
        let clock = Arc::new(ManualClock::new(at(0)));
        let slots: Arc<dyn RateSlots> = Arc::new(MemorySlots::default());
        let quota =
            Quota::per_second(NonZeroU32::new(5).unwrap()).allow_burst(NonZeroU32::new(3).unwrap());
        let a = limiter(quota, &[], slots.clone(), clock.clone());
        let b = limiter(quota, &[], slots.clone(), clock.clone());
        let mut starts = Vec::new();
        for i in 0..13 {
            let l = if i % 2 == 0 { &a } else { &b };
            l.wait(false).await;
            starts.push(since_start(&clock));
        }
        // A burst of 3, then one every 200 ms, whichever limiter asks: 13 requests by 2 s.
        assert_eq!(&starts[..4], &[0, 0, 0, 200_000]);
        assert_eq!(*starts.last().unwrap(), 2_000_000);
        // A limiter of its own would have let `b`'s requests through at once.
        let alone = limiter(quota, &[], Arc::new(MemorySlots::default()), clock.clone());
        let before = since_start(&clock);
        alone.wait(false).await;
        assert_eq!(since_start(&clock), before);
    }

    #[tokio::test]
    async fn bulk_requests_pass_the_bulk_key_at_their_share_of_the_rate() {
        let clock = Arc::new(ManualClock::new(at(0)));
        let slots: Arc<dyn RateSlots> = Arc::new(MemorySlots::default());
        let quota = Quota::per_second(NonZeroU32::new(10).unwrap());
        let bulk = Quota::per_second(NonZeroU32::new(5).unwrap()).allow_burst(NonZeroU32::MIN);
        let a = limiter(quota, &[bulk], slots.clone(), clock.clone());
        assert_eq!(a.quotas().1[0].key, "healthie:bulk");
        for _ in 0..11 {
            a.wait(true).await;
        }
        // 5 a second with no burst: the eleventh bulk request starts at 2 s.
        assert_eq!(since_start(&clock), 2_000_000);
        // A live request meanwhile takes only the full-rate key, one interval after the last.
        let b = limiter(quota, &[bulk], slots.clone(), clock.clone());
        b.wait(false).await;
        assert_eq!(since_start(&clock), 2_000_000);
    }

    #[tokio::test]
    async fn a_pause_makes_every_limiter_wait_until_it_ends() {
        let clock = Arc::new(ManualClock::new(at(0)));
        let slots: Arc<dyn RateSlots> = Arc::new(MemorySlots::default());
        let quota =
            Quota::per_second(NonZeroU32::new(5).unwrap()).allow_burst(NonZeroU32::new(5).unwrap());
        let a = limiter(quota, &[], slots.clone(), clock.clone());
        let b = limiter(quota, &[], slots.clone(), clock.clone());
        a.wait(false).await;
        a.pause_until(at(3_000_000)).await;
        b.wait(false).await;
        assert_eq!(since_start(&clock), 3_000_000, "the pause ends at 3 s");
        for _ in 0..4 {
            b.wait(false).await;
        }
        assert_eq!(
            since_start(&clock),
            3_800_000,
            "then evenly, no burst right after a pause"
        );
    }

    #[tokio::test]
    async fn a_daily_allowance_is_shared_and_keeps_the_live_reserve() {
        let clock = Arc::new(ManualClock::new(at(0)));
        let slots: Arc<dyn RateSlots> = Arc::new(MemorySlots::default());
        let quota = Quota::per_second(NonZeroU32::new(5).unwrap());
        let a = limiter(quota, &[], slots.clone(), clock.clone());
        let b = limiter(quota, &[], slots.clone(), clock.clone());
        let end = at(86_400_000_000);
        for used in 1..=3 {
            assert_eq!(a.take_daily(end, 5, 2).await, Some(Some(used)));
        }
        assert_eq!(b.take_daily(end, 5, 2).await, Some(None), "bulk keeps 2");
        assert_eq!(b.take_daily(end, 5, 0).await, Some(Some(4)));
        assert_eq!(a.take_daily(end, 5, 0).await, Some(Some(5)));
        assert_eq!(a.take_daily(end, 5, 0).await, Some(None));
        let next = at(2 * 86_400_000_000);
        assert_eq!(b.take_daily(next, 5, 2).await, Some(Some(1)), "a new day");
    }

    struct Broken;

    #[async_trait]
    impl RateSlots for Broken {
        async fn reserve(&self, _: &str, _: i64, _: i64) -> Result<i64, SlotError> {
            Err("database is locked".into())
        }
        async fn defer(&self, _: &str, _: i64) -> Result<(), SlotError> {
            Err("database is locked".into())
        }
        async fn take_daily(
            &self,
            _: &str,
            _: i64,
            _: u32,
            _: u32,
        ) -> Result<Option<u32>, SlotError> {
            Err("database is locked".into())
        }
    }

    #[tokio::test]
    async fn an_unavailable_database_lets_requests_through_and_is_counted() {
        let clock = Arc::new(ManualClock::new(at(0)));
        let metrics = Arc::new(Metrics::new());
        let l = SharedLimiter::new(
            SourceKind::Hint,
            &[Quota::per_second(NonZeroU32::new(1).unwrap())],
            &[],
            Arc::new(Broken),
            clock.clone(),
            metrics.clone(),
        );
        for _ in 0..3 {
            l.wait(false).await;
        }
        assert_eq!(since_start(&clock), 0, "nobody waited");
        assert_eq!(l.take_daily(at(1), 10, 0).await, None);
        // The first failure is counted; the limiter is then skipped for a while.
        let labels = [("source", "hint"), ("op", "reserve")];
        assert_eq!(metrics.counter(ERRORS, &labels), 1);
        assert_eq!(
            metrics.counter(ERRORS, &[("source", "hint"), ("op", "daily_budget")]),
            0
        );
    }
}
