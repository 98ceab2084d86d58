//! The shared HTTP layer every upstream request goes through: one [`Upstream`] per credential,
//! holding its rate limiters (governor), an optional concurrency cap, timeouts, and short
//! in-request retries with exponential backoff and jitter (backoff). A rate-limit answer pauses
//! the whole upstream, so every caller sharing the credential slows down together.
//!
//! Errors that outlive the in-request retries go back to the worker, which reschedules the
//! inbox item durably (see `sync::worker`).
//!
//! Live work keeps a share of each credential's budget ([`Upstream::with_live_reserve`]):
//! requests made inside [`bulk`] (pollers, resyncs, imports) also pass a second set of limiters
//! at `1 - share` of every quota, may not spend the last `share` of a daily allowance, and
//! leave concurrency slots free where a cap exists; live requests pass the main limiters only.
//!
//! An upstream with a daily allowance (IntakeQ: 500 requests a day) also carries a
//! [`DailyBudget`]: once it is spent, requests wait for the reset instead of failing. Time comes
//! from a [`Clock`], so tests move it by hand instead of sleeping.
//!
//! These limiters hold for one process. [`Upstream::share_limits`] adds a second gate kept in
//! the database ([`super::shared_limit`]), so every process using the credential together
//! stays within its rate, its bulk share, its pauses and its daily allowance.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::ExponentialBackoffBuilder;
use bytes::Bytes;
use chrono::{DateTime, NaiveTime, Utc};
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use tokio::sync::{Mutex, Semaphore};

use super::shared_limit::{RateSlots, SharedLimiter};
use crate::metrics::Metrics;
use crate::model::SourceKind;

/// Which share of an upstream's budget a request draws from. Live work (webhook refetches,
/// the worker) is the default; pollers, resyncs and imports run inside [`bulk`], so a running
/// resync cannot take the share reserved for live work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Live,
    Bulk,
}

tokio::task_local! {
    static LANE: Lane;
}

/// Runs `fut` with every upstream request it makes in the bulk lane.
pub async fn bulk<F: std::future::Future>(fut: F) -> F::Output {
    LANE.scope(Lane::Bulk, fut).await
}

/// The lane of the calling task: [`Lane::Bulk`] inside [`bulk`], else [`Lane::Live`].
pub fn current_lane() -> Lane {
    LANE.try_with(|lane| *lane).unwrap_or(Lane::Live)
}

/// Why an upstream call failed, grouped by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The upstream asked us to slow down (HTTP 429, Healthie `TOO_MANY_REQUESTS`).
    #[error("rate limited by upstream")]
    RateLimited {
        retry_after: Option<Duration>,
        status: Option<u16>,
    },
    /// Worth retrying later: 5xx, timeouts, connection failures.
    #[error("transient upstream failure ({kind})")]
    Transient {
        kind: &'static str,
        status: Option<u16>,
        #[source]
        source: Option<reqwest::Error>,
    },
    /// Credentials refused (401/403): retrying will not help until an admin fixes the key.
    #[error("upstream refused our credentials (http {status})")]
    Auth { status: u16 },
    /// The upstream rejected the request itself (other 4xx, GraphQL complexity or depth).
    #[error("upstream rejected the request ({kind})")]
    Rejected {
        kind: &'static str,
        status: Option<u16>,
    },
    /// The answer could not be understood.
    #[error("undecodable upstream payload ({what})")]
    Decode { what: &'static str },
}

impl FetchError {
    /// Stable, PHI-free error kind for `last_error_kind`, logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::RateLimited { .. } => "rate_limited",
            FetchError::Transient { kind, .. } => kind,
            FetchError::Auth { .. } => "auth",
            FetchError::Rejected { kind, .. } => kind,
            FetchError::Decode { .. } => "decode",
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            FetchError::RateLimited { status, .. }
            | FetchError::Transient { status, .. }
            | FetchError::Rejected { status, .. } => *status,
            FetchError::Auth { status } => Some(*status),
            FetchError::Decode { .. } => None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FetchError::RateLimited { .. } | FetchError::Transient { .. }
        )
    }

    pub fn is_rate_limit(&self) -> bool {
        matches!(self, FetchError::RateLimited { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The same error kind and status, for another caller that shared the failed request
    /// (errors are not `Clone`: the `reqwest` source is dropped).
    pub fn copy_kind(&self) -> FetchError {
        match self {
            FetchError::RateLimited {
                retry_after,
                status,
            } => FetchError::RateLimited {
                retry_after: *retry_after,
                status: *status,
            },
            FetchError::Transient { kind, status, .. } => FetchError::Transient {
                kind,
                status: *status,
                source: None,
            },
            FetchError::Auth { status } => FetchError::Auth { status: *status },
            FetchError::Rejected { kind, status } => FetchError::Rejected {
                kind,
                status: *status,
            },
            FetchError::Decode { what } => FetchError::Decode { what },
        }
    }

    fn from_reqwest(e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connect"
        } else if e.is_body() || e.is_decode() {
            "body"
        } else {
            "network"
        };
        FetchError::Transient {
            kind,
            status: e.status().map(|s| s.as_u16()),
            source: Some(e),
        }
    }
}

/// A response the caller inspects further (GraphQL errors, JSON decoding).
#[derive(Debug)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Limits and retry schedule of one upstream credential.
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    /// Each quota must allow a request before it is sent (e.g. per-second and per-day).
    pub quotas: Vec<Quota>,
    /// At most this many requests in flight at once.
    pub max_concurrent: Option<u32>,
    pub timeout: Duration,
    /// In-request retries stop after this long; the worker's durable retry takes over.
    pub max_retry_elapsed: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Pause after a rate-limit answer that names no delay.
    pub rate_limit_pause: Duration,
}

impl UpstreamPolicy {
    /// A policy of `per_second` requests with `burst`, and otherwise the house defaults.
    pub fn per_second(per_second: u32, burst: u32, timeout: Duration) -> Self {
        let rate = NonZeroU32::new(per_second.max(1)).expect("max(1)");
        let burst = NonZeroU32::new(burst.max(1)).expect("max(1)");
        Self {
            quotas: vec![Quota::per_second(rate).allow_burst(burst)],
            max_concurrent: None,
            timeout,
            max_retry_elapsed: Duration::from_secs(20),
            retry_initial: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
            rate_limit_pause: Duration::from_secs(2),
        }
    }
}

/// One upstream credential: client, limiters and pause state, shared by webhook refetches,
/// pollers, resyncs and imports alike.
pub struct Upstream {
    source: SourceKind,
    client: reqwest::Client,
    limiters: Vec<DefaultDirectRateLimiter>,
    concurrency: Option<Semaphore>,
    policy: UpstreamPolicy,
    paused_until: Mutex<Option<Instant>>,
    budget: Option<Arc<DailyBudget>>,
    bulk: Option<BulkLane>,
    metrics: Arc<Metrics>,
    /// The cross-process gate, when the limits are shared through the database.
    shared: std::sync::OnceLock<SharedLimiter>,
}

/// The extra gate bulk requests pass: every quota at `1 - share`, fewer concurrency slots, and
/// the last `share` of a daily allowance kept back.
struct BulkLane {
    share: f64,
    limiters: Vec<DefaultDirectRateLimiter>,
    concurrency: Option<Semaphore>,
}

/// `quota` scaled to `keep` (0 < keep <= 1) of its rate and burst (at least one request).
fn scaled_quota(quota: &Quota, keep: f64) -> Quota {
    let interval = quota.replenish_interval().div_f64(keep);
    let burst = (f64::from(quota.burst_size().get()) * keep)
        .floor()
        .max(1.0) as u32;
    Quota::with_period(interval.max(Duration::from_nanos(1)))
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(burst).expect("max(1)"))
}

/// Concurrency slots bulk requests may hold out of `cap`: at least one is kept for live work
/// when `cap > 1` (more for larger shares), and bulk keeps at least one.
fn bulk_slots(cap: u32, share: f64) -> u32 {
    let cap = cap.max(1);
    if share <= 0.0 || cap == 1 {
        return cap;
    }
    let reserved = ((f64::from(cap) * share).ceil() as u32).clamp(1, cap - 1);
    cap - reserved
}

/// Held while a request is in flight: the concurrency slots it took.
struct Admission<'a> {
    _bulk: Option<tokio::sync::SemaphorePermit<'a>>,
    _main: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Upstream {
    pub fn new(source: SourceKind, policy: UpstreamPolicy, metrics: Arc<Metrics>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("patient-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a client with rustls and these settings always builds");
        Self {
            source,
            client,
            limiters: policy
                .quotas
                .iter()
                .map(|q| RateLimiter::direct(*q))
                .collect(),
            concurrency: policy
                .max_concurrent
                .map(|n| Semaphore::new(n.max(1) as usize)),
            policy,
            paused_until: Mutex::new(None),
            budget: None,
            bulk: None,
            metrics,
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Keeps `share` (0 <= share < 1) of this credential's budget for live work: requests in
    /// the bulk lane ([`bulk`]) get `1 - share` of each quota, cannot spend the last `share` of
    /// a daily allowance, and leave concurrency slots free (see `bulk_slots`). 0 turns the
    /// reserve off.
    pub fn with_live_reserve(mut self, share: f64) -> Self {
        let share = if share.is_finite() {
            share.clamp(0.0, 0.99)
        } else {
            0.0
        };
        self.bulk = (share > 0.0).then(|| BulkLane {
            share,
            limiters: self
                .policy
                .quotas
                .iter()
                .map(|q| RateLimiter::direct(scaled_quota(q, 1.0 - share)))
                .collect(),
            concurrency: self
                .policy
                .max_concurrent
                .map(|n| Semaphore::new(bulk_slots(n, share) as usize)),
        });
        let bulk_quotas = self.bulk_quotas();
        if let Some(shared) = self.shared.get_mut() {
            shared.set_bulk(&bulk_quotas);
        }
        self
    }

    /// The bulk lane's quotas (none without a reserve).
    fn bulk_quotas(&self) -> Vec<Quota> {
        match &self.bulk {
            Some(lane) => self
                .policy
                .quotas
                .iter()
                .map(|q| scaled_quota(q, 1.0 - lane.share))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Shares this credential's limits with every process using `slots` (the database): each
    /// request also reserves a slot there, a rate-limit answer pauses them all, and a daily
    /// allowance is counted there (see [`super::shared_limit`]). The wall clock times it.
    /// Returns false when the limits were shared already.
    pub fn share_limits(&self, slots: Arc<dyn RateSlots>) -> bool {
        self.share_limits_with_clock(slots, Arc::new(SystemClock))
    }

    /// [`Self::share_limits`] timed by `clock`.
    pub fn share_limits_with_clock(
        &self,
        slots: Arc<dyn RateSlots>,
        clock: Arc<dyn Clock>,
    ) -> bool {
        let limiter = SharedLimiter::new(
            self.source,
            &self.policy.quotas,
            &self.bulk_quotas(),
            slots,
            clock,
            self.metrics.clone(),
        );
        self.shared.set(limiter).is_ok()
    }

    /// [`Self::share_limits`], as a builder.
    pub fn with_shared_limits(self, slots: Arc<dyn RateSlots>) -> Self {
        self.share_limits(slots);
        self
    }

    /// Whether the limits are shared across processes.
    pub fn shares_limits(&self) -> bool {
        self.shared.get().is_some()
    }

    /// The share of the budget kept for live work (0 when none is).
    pub fn live_reserved_share(&self) -> f64 {
        self.bulk.as_ref().map_or(0.0, |b| b.share)
    }

    /// Adds a daily allowance every attempt (retries included) draws from; when it is spent,
    /// requests wait for its reset instead of failing.
    pub fn with_daily_budget(mut self, budget: Arc<DailyBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The daily allowance, when this upstream has one.
    pub fn budget(&self) -> Option<BudgetSnapshot> {
        self.budget.as_ref().map(|b| b.snapshot())
    }

    pub fn source(&self) -> SourceKind {
        self.source
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Waits for every quota and any pause of the caller's lane, without sending anything.
    async fn wait_turn(&self) {
        let bulk = match current_lane() {
            Lane::Bulk => self.bulk.as_ref(),
            Lane::Live => None,
        };
        let started = Instant::now();
        loop {
            let pause = *self.paused_until.lock().await;
            match pause {
                Some(until) if until > Instant::now() => {
                    tokio::time::sleep_until(until.into()).await
                }
                _ => break,
            }
        }
        if let Some(budget) = &self.budget {
            let keep = bulk.map_or(0, |b| budget.reserve_for(b.share));
            if self.take_budget(budget, keep).await {
                self.metrics.inc(
                    "patient_sync_upstream_budget_waits_total",
                    "Requests that waited for the daily request budget to reset, by source.",
                    &[("source", self.source.as_str())],
                    1,
                );
            }
            self.metrics.set(
                "patient_sync_upstream_budget_remaining",
                "Requests left in the current daily budget window, by source.",
                &[("source", self.source.as_str())],
                f64::from(budget.snapshot().remaining),
            );
        }
        if let Some(bulk) = bulk {
            for limiter in &bulk.limiters {
                limiter.until_ready().await;
            }
        }
        for limiter in &self.limiters {
            limiter.until_ready().await;
        }
        if let Some(shared) = self.shared.get() {
            shared.wait(bulk.is_some()).await;
        }
        let waited = started.elapsed();
        if waited >= Duration::from_millis(1) {
            self.metrics.observe(
                RATE_LIMIT_WAIT,
                RATE_LIMIT_WAIT_HELP,
                &[("source", self.source.as_str())],
                waited.as_secs_f64(),
            );
        }
    }

    /// Takes one request of the daily allowance, here and (when shared) in the database; a
    /// spent shared allowance waits for the reset like a spent local one. Returns whether it
    /// waited.
    async fn take_budget(&self, budget: &DailyBudget, keep: u32) -> bool {
        let mut waited = budget.take_keeping(keep).await;
        let Some(shared) = self.shared.get() else {
            return waited;
        };
        loop {
            let window_end = budget.snapshot().resets_at;
            match shared.take_daily(window_end, budget.limit, keep).await {
                Some(Some(used)) => {
                    budget.observe_used(window_end, used);
                    return waited;
                }
                Some(None) => {
                    // Other processes spent what this lane may use: count it spent here too
                    // (live requests keep the reserve), wait for the reset, take from both again.
                    budget.observe_used(window_end, budget.limit.saturating_sub(keep));
                    budget.take_keeping(keep).await;
                    waited = true;
                }
                None => return waited,
            }
        }
    }

    /// Waits for the caller's turn and takes its concurrency slots (bulk: the bulk lane's first).
    async fn admit(&self) -> Admission<'_> {
        self.wait_turn().await;
        let bulk = match (current_lane(), &self.bulk) {
            (Lane::Bulk, Some(lane)) => match &lane.concurrency {
                Some(s) => Some(s.acquire().await.expect("semaphore is never closed")),
                None => None,
            },
            _ => None,
        };
        let main = match &self.concurrency {
            Some(s) => Some(s.acquire().await.expect("semaphore is never closed")),
            None => None,
        };
        Admission {
            _bulk: bulk,
            _main: main,
        }
    }

    async fn pause_for(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut paused = self.paused_until.lock().await;
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    /// One attempt: wait for the limiters, send, read the body, classify the status. 2xx and
    /// 404 come back as responses; `check` may turn a 2xx into an error (GraphQL errors).
    async fn attempt<B, C>(&self, build: &B, check: &C) -> Result<RawResponse, FetchError>
    where
        B: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        C: Fn(&RawResponse) -> Result<(), FetchError>,
    {
        let _admission = self.admit().await;
        let started = Instant::now();
        let result = async {
            let response = build(&self.client)
                .send()
                .await
                .map_err(FetchError::from_reqwest)?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(FetchError::from_reqwest)?;
            Ok::<_, FetchError>(RawResponse {
                status,
                headers,
                body,
            })
        }
        .await;
        let status_label = match &result {
            Ok(r) => r.status.as_u16().to_string(),
            Err(e) => e.kind().to_string(),
        };
        self.metrics.inc(
            "patient_sync_upstream_requests_total",
            "Upstream requests by source and HTTP status (or error kind).",
            &[("source", self.source.as_str()), ("status", &status_label)],
            1,
        );
        self.metrics.observe(
            "patient_sync_upstream_request_seconds",
            "Upstream request latency by source.",
            &[("source", self.source.as_str())],
            started.elapsed().as_secs_f64(),
        );
        let response = result?;
        let status = response.status;
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(FetchError::RateLimited {
                retry_after: parse_retry_after(&response.headers),
                status: Some(429),
            });
        }
        if status.is_server_error() {
            return Err(FetchError::Transient {
                kind: "server_error",
                status: Some(status.as_u16()),
                source: None,
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(FetchError::Auth {
                status: status.as_u16(),
            });
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            return Err(FetchError::Transient {
                kind: "timeout",
                status: Some(408),
                source: None,
            });
        }
        if status.is_client_error() && status != StatusCode::NOT_FOUND {
            // A GraphQL error may arrive with a 4xx; let the source classify its body first.
            check(&response)?;
            return Err(FetchError::Rejected {
                kind: "client_error",
                status: Some(status.as_u16()),
            });
        }
        if !status.is_success() && status != StatusCode::NOT_FOUND {
            return Err(FetchError::Rejected {
                kind: "unexpected_status",
                status: Some(status.as_u16()),
            });
        }
        check(&response)?;
        Ok(response)
    }

    /// Sends a request built by `build`, retrying transient failures and rate limits with
    /// exponential backoff and jitter for up to the policy's `max_retry_elapsed`.
    ///
    /// A rate-limit answer pauses the whole upstream for its `Retry-After`, or, when it names no
    /// delay (Hint's `Enhance your calm`, IntakeQ), for `rate_limit_pause` doubled on each
    /// further answer and jittered upwards by up to half. When the next try would fall outside
    /// `max_retry_elapsed`, the rate-limit error goes back to the caller (the upstream stays
    /// paused), so the worker's durable retry takes over.
    pub async fn execute<B, C>(&self, build: B, check: C) -> Result<RawResponse, FetchError>
    where
        B: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        C: Fn(&RawResponse) -> Result<(), FetchError>,
    {
        let schedule = ExponentialBackoffBuilder::new()
            .with_initial_interval(self.policy.retry_initial)
            .with_max_interval(self.policy.retry_max)
            .with_randomization_factor(0.5)
            .with_multiplier(2.0)
            .with_max_elapsed_time(Some(self.policy.max_retry_elapsed))
            .build();
        let started = Instant::now();
        let rate_limited = AtomicU32::new(0);
        backoff::future::retry(schedule, || async {
            match self.attempt(&build, &check).await {
                Ok(r) => Ok(r),
                Err(e) if e.is_rate_limit() => {
                    let answers = rate_limited.fetch_add(1, Ordering::Relaxed);
                    let delay = e
                        .retry_after()
                        .unwrap_or_else(|| self.rate_limit_delay(answers));
                    self.pause_for(delay).await;
                    if let Some(shared) = self.shared.get() {
                        shared.pause_for(delay).await;
                    }
                    let status = e.http_status().map_or("none".to_string(), |s| s.to_string());
                    self.metrics.inc(
                        "patient_sync_upstream_rate_limited_total",
                        "Rate-limit answers received, by source and HTTP status (a GraphQL limit arrives with 200).",
                        &[("source", self.source.as_str()), ("status", &status)],
                        1,
                    );
                    if let (Some(budget), Some(after)) = (&self.budget, e.retry_after()) {
                        if after >= DAILY_CAP_RETRY_AFTER {
                            budget.exhaust();
                        }
                    }
                    if started.elapsed() + delay > self.policy.max_retry_elapsed {
                        return Err(backoff::Error::permanent(e));
                    }
                    // The retry sleeps out the pause itself, so count the wait here.
                    self.metrics.observe(
                        RATE_LIMIT_WAIT,
                        RATE_LIMIT_WAIT_HELP,
                        &[("source", self.source.as_str())],
                        delay.as_secs_f64(),
                    );
                    Err(backoff::Error::retry_after(e, delay))
                }
                Err(e) if e.is_retryable() => Err(backoff::Error::transient(e)),
                Err(e) => Err(backoff::Error::permanent(e)),
            }
        })
        .await
    }

    /// The pause after the `answers`-th (0-based) rate-limit answer that named no delay:
    /// `rate_limit_pause * 2^answers`, capped at `max(retry_max, rate_limit_pause)`, times a
    /// random factor in [1, 1.5) so callers sharing a credential do not retry in step.
    fn rate_limit_delay(&self, answers: u32) -> Duration {
        use rand::Rng;
        let base = self.policy.rate_limit_pause;
        let cap = self.policy.retry_max.max(base);
        let grown = base.saturating_mul(1u32 << answers.min(16)).min(cap);
        grown.mul_f64(rand::thread_rng().gen_range(1.0..1.5))
    }
}

/// A `Retry-After` this long on a rate-limit answer means the daily cap, not the per-minute one.
const DAILY_CAP_RETRY_AFTER: Duration = Duration::from_secs(3600);

const RATE_LIMIT_WAIT: &str = "patient_sync_rate_limit_wait_seconds";
const RATE_LIMIT_WAIT_HELP: &str = "Time requests spent waiting for rate limits (client-side limiter, daily budget, or a pause after a rate-limit answer), by source.";

/// Where time comes from for daily budgets: the wall clock in production, a hand-moved clock
/// in tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    /// Completes once `now()` has reached `at`.
    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Re-read the wall clock at least every minute: it can be stepped while we sleep.
            loop {
                let left = at - Utc::now();
                match left.to_std() {
                    Ok(left) if !left.is_zero() => {
                        tokio::time::sleep(left.min(Duration::from_secs(60))).await
                    }
                    _ => break,
                }
            }
        })
    }
}

/// A clock that only moves when told to. `sleep_until` jumps it forward to the deadline at
/// once (and counts the jump), so code that waits for a reset runs without real waiting.
#[derive(Debug)]
pub struct ManualClock {
    now: std::sync::Mutex<DateTime<Utc>>,
    sleeps: AtomicU64,
}

impl ManualClock {
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            now: std::sync::Mutex::new(now),
            sleeps: AtomicU64::new(0),
        }
    }

    pub fn set(&self, now: DateTime<Utc>) {
        *self.now.lock().expect("clock lock") = now;
    }

    pub fn advance(&self, by: chrono::Duration) {
        *self.now.lock().expect("clock lock") += by;
    }

    /// How many times something waited on this clock.
    pub fn sleeps(&self) -> u64 {
        self.sleeps.load(Ordering::Relaxed)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock lock")
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()> {
        self.sleeps.fetch_add(1, Ordering::Relaxed);
        let mut now = self.now.lock().expect("clock lock");
        if *now < at {
            *now = at;
        }
        Box::pin(std::future::ready(()))
    }
}

/// The state of a daily budget, for `status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BudgetSnapshot {
    /// Requests sent in the current window.
    pub used: u32,
    pub limit: u32,
    pub remaining: u32,
    /// When the current window ends and `used` goes back to 0.
    pub resets_at: DateTime<Utc>,
}

/// A number of requests allowed per day, resetting every day at a fixed UTC time. Shared by
/// everything that uses one credential (it lives in the credential's [`Upstream`]).
///
/// The count is kept in memory for one process; [`DailyBudget::restore`] takes a persisted
/// snapshot back after a restart. With shared limits ([`Upstream::share_limits`]) every request
/// is also counted in the database, and the count here follows the shared one.
pub struct DailyBudget {
    limit: u32,
    reset_at: NaiveTime,
    clock: Arc<dyn Clock>,
    window: std::sync::Mutex<BudgetWindow>,
}

#[derive(Debug, Clone, Copy)]
struct BudgetWindow {
    used: u32,
    resets_at: DateTime<Utc>,
}

impl DailyBudget {
    /// `limit` requests per window; windows end every day at `reset_at` (UTC).
    pub fn new(limit: u32, reset_at: NaiveTime, clock: Arc<dyn Clock>) -> Self {
        let resets_at = next_reset(clock.now(), reset_at);
        Self {
            limit: limit.max(1),
            reset_at,
            clock,
            window: std::sync::Mutex::new(BudgetWindow { used: 0, resets_at }),
        }
    }

    /// The current window, rolled over when its reset has passed.
    fn current(&self) -> std::sync::MutexGuard<'_, BudgetWindow> {
        let now = self.clock.now();
        let mut w = self.window.lock().expect("budget lock");
        if now >= w.resets_at {
            *w = BudgetWindow {
                used: 0,
                resets_at: next_reset(now, self.reset_at),
            };
        }
        w
    }

    /// Takes one request from the budget, waiting for the reset when it is spent. Returns
    /// whether it had to wait.
    pub async fn take(&self) -> bool {
        self.take_keeping(0).await
    }

    /// Requests of the allowance kept back from bulk work for a live share of `share`.
    pub fn reserve_for(&self, share: f64) -> u32 {
        ((f64::from(self.limit) * share).ceil() as u32).min(self.limit.saturating_sub(1))
    }

    /// Like [`Self::take`], but treats the last `keep` requests of the window as spent.
    pub async fn take_keeping(&self, keep: u32) -> bool {
        let mut waited = false;
        loop {
            let until = {
                let mut w = self.current();
                if w.used.saturating_add(keep) < self.limit {
                    w.used += 1;
                    return waited;
                }
                w.resets_at
            };
            tracing::warn!(resets_at = %until, "daily request budget spent; waiting for the reset");
            waited = true;
            self.clock.sleep_until(until).await;
        }
    }

    /// The upstream says the day's allowance is gone (another client shares the key): treat
    /// the current window as spent.
    pub fn exhaust(&self) {
        let mut w = self.current();
        w.used = w.used.max(self.limit);
    }

    /// Takes back a persisted snapshot (after a restart), unless its window has ended.
    pub fn restore(&self, snapshot: &BudgetSnapshot) {
        let mut w = self.current();
        if snapshot.resets_at > self.clock.now() && snapshot.resets_at <= w.resets_at {
            w.used = w.used.max(snapshot.used);
        }
    }

    /// The shared count says `used` requests went out in the window ending `window_end`
    /// (this process's and others'): the count here takes it when it is higher.
    pub fn observe_used(&self, window_end: DateTime<Utc>, used: u32) {
        let mut w = self.current();
        if w.resets_at == window_end {
            w.used = w.used.max(used);
        }
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        let w = self.current();
        BudgetSnapshot {
            used: w.used,
            limit: self.limit,
            remaining: self.limit.saturating_sub(w.used),
            resets_at: w.resets_at,
        }
    }
}

/// The first `reset_at` (UTC time of day) strictly after `now`.
fn next_reset(now: DateTime<Utc>, reset_at: NaiveTime) -> DateTime<Utc> {
    let today = now.date_naive().and_time(reset_at).and_utc();
    if today > now {
        today
    } else {
        today + chrono::Duration::days(1)
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    delta.to_std().ok().or(Some(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }

    #[tokio::test]
    async fn lane_is_live_unless_inside_bulk() {
        assert_eq!(current_lane(), Lane::Live);
        assert_eq!(bulk(async { current_lane() }).await, Lane::Bulk);
        assert_eq!(current_lane(), Lane::Live);
    }

    /// An upstream whose only quota refills once an hour: what a burst lets through is all
    /// that gets through during a test.
    fn hourly(burst: u32, max_concurrent: Option<u32>, share: f64) -> Upstream {
        let mut policy = UpstreamPolicy::per_second(1, 1, Duration::from_secs(1));
        policy.quotas = vec![Quota::per_hour(NonZeroU32::new(burst).unwrap())];
        policy.max_concurrent = max_concurrent;
        Upstream::new(SourceKind::Healthie, policy, Arc::new(Metrics::new()))
            .with_live_reserve(share)
    }

    /// Whether a turn is granted. A denied one would take an hour, so a short wait tells them
    /// apart; asserting a grant allows a generous one, for a loaded machine.
    async fn granted(upstream: &Upstream, lane: Lane) -> bool {
        within(upstream, lane, Duration::from_secs(5)).await
    }

    async fn denied(upstream: &Upstream, lane: Lane) -> bool {
        !within(upstream, lane, Duration::from_millis(200)).await
    }

    async fn within(upstream: &Upstream, lane: Lane, wait: Duration) -> bool {
        let turn = upstream.wait_turn();
        match lane {
            Lane::Live => tokio::time::timeout(wait, turn).await.is_ok(),
            Lane::Bulk => tokio::time::timeout(wait, bulk(turn)).await.is_ok(),
        }
    }

    #[tokio::test]
    async fn a_saturating_bulk_caller_leaves_the_reserved_share_to_live_work() {
        let upstream = Arc::new(hourly(10, None, 0.3));
        // A bulk caller that never stops asking.
        let saturating = {
            let upstream = upstream.clone();
            tokio::spawn(bulk(async move {
                loop {
                    upstream.wait_turn().await;
                }
            }))
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        for i in 0..3 {
            assert!(granted(&upstream, Lane::Live).await, "live request {i}");
        }
        assert!(
            denied(&upstream, Lane::Live).await,
            "the quota is spent now"
        );
        assert!(denied(&upstream, Lane::Bulk).await);
        saturating.abort();
    }

    #[tokio::test]
    async fn without_a_reserve_bulk_work_can_take_the_whole_quota() {
        let upstream = hourly(10, None, 0.0);
        for _ in 0..10 {
            assert!(granted(&upstream, Lane::Bulk).await);
        }
        assert!(
            denied(&upstream, Lane::Live).await,
            "nothing left for live work"
        );
    }

    #[tokio::test]
    async fn live_work_may_use_the_whole_quota() {
        let upstream = hourly(10, None, 0.3);
        for i in 0..10 {
            assert!(granted(&upstream, Lane::Live).await, "live request {i}");
        }
    }

    #[tokio::test]
    async fn bulk_work_leaves_concurrency_slots_free() {
        assert_eq!(bulk_slots(3, 0.2), 2);
        assert_eq!(bulk_slots(10, 0.25), 7);
        assert_eq!(bulk_slots(1, 0.5), 1);
        assert_eq!(bulk_slots(4, 0.0), 4);
        assert_eq!(bulk_slots(2, 0.99), 1);
        let upstream = Arc::new(hourly(1000, Some(3), 0.2));
        let (held_tx, mut held_rx) = tokio::sync::mpsc::channel(8);
        let release = Arc::new(tokio::sync::Notify::new());
        for _ in 0..4 {
            let (upstream, held_tx, release) = (upstream.clone(), held_tx.clone(), release.clone());
            tokio::spawn(bulk(async move {
                let _admission = upstream.admit().await;
                held_tx.send(()).await.unwrap();
                release.notified().await;
            }));
        }
        for _ in 0..2 {
            held_rx.recv().await.unwrap();
        }
        let third = tokio::time::timeout(Duration::from_millis(200), held_rx.recv()).await;
        assert!(third.is_err(), "only two bulk requests in flight");
        let live = tokio::time::timeout(Duration::from_secs(5), upstream.admit()).await;
        assert!(live.is_ok(), "a live request gets the reserved slot");
    }

    #[tokio::test]
    async fn bulk_work_cannot_spend_the_reserved_end_of_a_daily_budget() {
        let clock = Arc::new(ManualClock::new(utc(2026, 3, 2, 9)));
        let budget = Arc::new(DailyBudget::new(10, NaiveTime::MIN, clock.clone()));
        let mut policy = UpstreamPolicy::per_second(1000, 1000, Duration::from_secs(1));
        policy.max_concurrent = None;
        let upstream = Upstream::new(SourceKind::Intakeq, policy, Arc::new(Metrics::new()))
            .with_daily_budget(budget.clone())
            .with_live_reserve(0.2);
        for _ in 0..8 {
            bulk(upstream.wait_turn()).await;
        }
        assert_eq!(clock.sleeps(), 0);
        assert_eq!(budget.snapshot().used, 8);
        // The last two are the live share: live work still gets them today...
        upstream.wait_turn().await;
        upstream.wait_turn().await;
        assert_eq!(clock.sleeps(), 0, "live requests did not wait");
        assert_eq!(budget.snapshot().remaining, 0);
        // ...while a bulk request had to wait for the next window.
        let clock2 = Arc::new(ManualClock::new(utc(2026, 3, 2, 9)));
        let budget2 = Arc::new(DailyBudget::new(10, NaiveTime::MIN, clock2.clone()));
        let upstream2 = Upstream::new(
            SourceKind::Intakeq,
            UpstreamPolicy::per_second(1000, 1000, Duration::from_secs(1)),
            Arc::new(Metrics::new()),
        )
        .with_daily_budget(budget2.clone())
        .with_live_reserve(0.2);
        for _ in 0..9 {
            bulk(upstream2.wait_turn()).await;
        }
        assert_eq!(
            clock2.sleeps(),
            1,
            "the ninth bulk request waited for the reset"
        );
        assert_eq!(clock2.now(), utc(2026, 3, 3, 0));
    }

    #[tokio::test]
    async fn a_shared_daily_budget_spent_by_bulk_work_elsewhere_still_serves_live_work_here() {
        use crate::sources::shared_limit::MemorySlots;
        let clock = Arc::new(ManualClock::new(utc(2026, 3, 2, 9)));
        let slots: Arc<dyn RateSlots> = Arc::new(MemorySlots::default());
        let process = || {
            let budget = Arc::new(DailyBudget::new(10, NaiveTime::MIN, clock.clone()));
            let upstream = Upstream::new(
                SourceKind::Intakeq,
                UpstreamPolicy::per_second(1000, 1000, Duration::from_secs(1)),
                Arc::new(Metrics::new()),
            )
            .with_daily_budget(budget.clone())
            .with_live_reserve(0.2);
            assert!(upstream.share_limits_with_clock(slots.clone(), clock.clone()));
            (upstream, budget)
        };
        let (a, _) = process();
        let (b, budget_b) = process();
        for _ in 0..8 {
            bulk(a.wait_turn()).await;
        }
        // `b` itself sent nothing, yet the bulk share of the day is gone; its live work may
        // still use the reserve.
        b.wait_turn().await;
        assert_eq!(clock.sleeps(), 0, "the live request did not wait");
        assert_eq!(budget_b.snapshot().used, 9);
        bulk(b.wait_turn()).await;
        assert_eq!(clock.sleeps(), 1, "the bulk request waited for the reset");
        assert_eq!(clock.now(), utc(2026, 3, 3, 0));
        assert_eq!(budget_b.snapshot().used, 1);
    }

    fn utc(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    #[tokio::test]
    async fn a_daily_budget_rolls_over_at_its_reset_time() {
        let clock = Arc::new(ManualClock::new(utc(2026, 3, 2, 22)));
        let budget = DailyBudget::new(2, NaiveTime::MIN, clock.clone());
        assert!(!budget.take().await);
        assert!(!budget.take().await);
        assert_eq!(budget.snapshot().remaining, 0);
        clock.set(utc(2026, 3, 3, 0));
        assert_eq!(budget.snapshot().used, 0, "a new window at midnight UTC");
        assert_eq!(budget.snapshot().resets_at, utc(2026, 3, 4, 0));
        assert_eq!(clock.sleeps(), 0);
    }

    #[tokio::test]
    async fn an_exhausted_budget_waits_for_the_reset() {
        let clock = Arc::new(ManualClock::new(utc(2026, 3, 2, 9)));
        let budget = DailyBudget::new(500, NaiveTime::MIN, clock.clone());
        budget.exhaust();
        assert_eq!(budget.snapshot().remaining, 0);
        assert!(budget.take().await, "waited");
        assert_eq!(clock.now(), utc(2026, 3, 3, 0));
        assert_eq!(budget.snapshot().used, 1);
    }

    #[test]
    fn a_restored_snapshot_counts_only_within_its_window() {
        let clock = Arc::new(ManualClock::new(utc(2026, 3, 2, 9)));
        let budget = DailyBudget::new(500, NaiveTime::MIN, clock.clone());
        let stale = BudgetSnapshot {
            used: 400,
            limit: 500,
            remaining: 100,
            resets_at: utc(2026, 3, 2, 0),
        };
        budget.restore(&stale);
        assert_eq!(budget.snapshot().used, 0);
        budget.restore(&BudgetSnapshot {
            resets_at: utc(2026, 3, 3, 0),
            ..stale
        });
        assert_eq!(budget.snapshot().used, 400);
    }

    #[test]
    fn rate_limit_pauses_without_retry_after_grow_with_jitter() {
        let mut policy = UpstreamPolicy::per_second(1, 1, Duration::from_secs(1));
        policy.rate_limit_pause = Duration::from_secs(1);
        policy.retry_max = Duration::from_secs(10);
        let upstream = Upstream::new(SourceKind::Hint, policy, Arc::new(Metrics::new()));
        for (answers, base) in [(0u32, 1u64), (1, 2), (2, 4), (3, 8), (4, 10), (30, 10)] {
            let base = Duration::from_secs(base);
            for _ in 0..20 {
                let d = upstream.rate_limit_delay(answers);
                assert!(d >= base && d < base.mul_f64(1.5), "{answers}: {d:?}");
            }
        }
    }

    #[test]
    fn error_kinds_are_stable_and_classified() {
        let e = FetchError::Auth { status: 401 };
        assert_eq!(e.kind(), "auth");
        assert!(!e.is_retryable());
        let e = FetchError::RateLimited {
            retry_after: None,
            status: None,
        };
        assert!(e.is_retryable() && e.is_rate_limit());
    }
}
