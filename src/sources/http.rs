//! The shared HTTP layer every upstream request goes through: one [`Upstream`] per credential,
//! holding its rate limiters (governor), an optional concurrency cap, timeouts, and short
//! in-request retries with exponential backoff and jitter (backoff). A rate-limit answer pauses
//! the whole upstream, so every caller sharing the credential slows down together.
//!
//! Errors that outlive the in-request retries go back to the worker, which reschedules the
//! inbox item durably (see `sync::worker`).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::ExponentialBackoffBuilder;
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use tokio::sync::{Mutex, Semaphore};

use crate::metrics::Metrics;
use crate::model::SourceKind;

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
    metrics: Arc<Metrics>,
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
            metrics,
        }
    }

    pub fn source(&self) -> SourceKind {
        self.source
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Waits for every quota and any pause, without sending anything.
    async fn wait_turn(&self) {
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
        for limiter in &self.limiters {
            limiter.until_ready().await;
        }
        let waited = started.elapsed();
        if waited >= Duration::from_millis(1) {
            self.metrics.observe(
                "patient_sync_rate_limit_wait_seconds",
                "Time spent waiting for the client-side rate limiter, by source.",
                &[("source", self.source.as_str())],
                waited.as_secs_f64(),
            );
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
        self.wait_turn().await;
        let _permit = match &self.concurrency {
            Some(s) => Some(s.acquire().await.expect("semaphore is never closed")),
            None => None,
        };
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
        backoff::future::retry(schedule, || async {
            match self.attempt(&build, &check).await {
                Ok(r) => Ok(r),
                Err(e) if e.is_rate_limit() => {
                    let delay = e.retry_after().unwrap_or(self.policy.rate_limit_pause);
                    self.pause_for(delay).await;
                    self.metrics.inc(
                        "patient_sync_upstream_rate_limited_total",
                        "Rate-limit answers received, by source.",
                        &[("source", self.source.as_str())],
                        1,
                    );
                    Err(backoff::Error::retry_after(e, delay))
                }
                Err(e) if e.is_retryable() => Err(backoff::Error::transient(e)),
                Err(e) => Err(backoff::Error::permanent(e)),
            }
        })
        .await
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
