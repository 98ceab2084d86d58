//! Fault injection shared by the three fakes, off by default: each request draws at most one
//! fault from a seeded generator, with a share per kind. Rate-limit answers take the faked
//! source's own shape (Healthie's `TOO_MANY_REQUESTS` GraphQL error, IntakeQ's bare 429,
//! Hint's `Enhance your calm`); the other faults are the same everywhere.
//!
//! Configured in code ([`Faults`], [`SourceFaults`]), or for `patient-sync sandbox --faults
//! FILE` from a TOML file with one table per source:
//!
//! ```toml
//! [healthie]
//! error_500_share = 0.05
//! timeout_share = 0.02
//! [intakeq]
//! rate_limit_share = 0.1
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// Shares of requests answered with each fault (each in 0..=1, together at most 1).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer HTTP 500 with an HTML body.
    pub error_500_share: f64,
    /// Answer after `slow_ms`, normally otherwise.
    pub slow_share: f64,
    pub slow_ms: u64,
    /// Answer 200 with a truncated JSON body.
    pub malformed_share: f64,
    /// Answer with the source's own rate-limit answer.
    pub rate_limit_share: f64,
    /// `Retry-After` seconds on injected rate-limit answers (none: the source's own, which
    /// for IntakeQ and Hint names no delay).
    pub rate_limit_retry_after_secs: Option<u64>,
    /// Hold the request for `timeout_ms` before answering, past a client's timeout.
    pub timeout_share: f64,
    pub timeout_ms: u64,
    /// Answer 200 with valid JSON of another shape.
    pub wrong_shape_share: f64,
    /// Answer 200 with an HTML page (`text/html`), as a proxy or maintenance page would.
    pub wrong_content_type_share: f64,
    pub seed: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_500_share: 0.0,
            slow_share: 0.0,
            slow_ms: 5_000,
            malformed_share: 0.0,
            rate_limit_share: 0.0,
            rate_limit_retry_after_secs: None,
            timeout_share: 0.0,
            timeout_ms: 60_000,
            wrong_shape_share: 0.0,
            wrong_content_type_share: 0.0,
            seed: 0,
        }
    }
}

impl Faults {
    /// Every kind at `share` (a quick way to turn everything on in tests).
    pub fn all(share: f64, seed: u64) -> Self {
        Self {
            error_500_share: share,
            slow_share: share,
            malformed_share: share,
            rate_limit_share: share,
            timeout_share: share,
            wrong_shape_share: share,
            wrong_content_type_share: share,
            seed,
            ..Self::default()
        }
    }

    fn shares(&self) -> [(&'static str, f64); 7] {
        [
            ("error_500_share", self.error_500_share),
            ("slow_share", self.slow_share),
            ("malformed_share", self.malformed_share),
            ("rate_limit_share", self.rate_limit_share),
            ("timeout_share", self.timeout_share),
            ("wrong_shape_share", self.wrong_shape_share),
            ("wrong_content_type_share", self.wrong_content_type_share),
        ]
    }

    /// Checks every share is in 0..=1 and that they add up to at most 1; names the key at fault.
    pub fn validate(&self, table: &str) -> Result<(), String> {
        for (key, share) in self.shares() {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!(
                    "invalid value for `{table}.{key}`: must be between 0 and 1"
                ));
            }
        }
        let total: f64 = self.shares().iter().map(|(_, s)| s).sum();
        if total > 1.0 + 1e-9 {
            return Err(format!(
                "invalid faults for `{table}`: the shares add up to {total:.3}, more than 1"
            ));
        }
        Ok(())
    }

    fn is_off(&self) -> bool {
        self.shares().iter().all(|(_, s)| *s <= 0.0)
    }
}

/// Faults per fake.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceFaults {
    pub healthie: Faults,
    pub intakeq: Faults,
    pub hint: Faults,
}

impl SourceFaults {
    /// Parses and validates a faults file; errors name the file and the key or line.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let faults: SourceFaults = toml::from_str(text).map_err(|e| e.to_string())?;
        faults.healthie.validate("healthie")?;
        faults.intakeq.validate("intakeq")?;
        faults.hint.validate("hint")?;
        Ok(faults)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read faults file {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("faults file {}: {e}", path.display()))
    }
}

/// One drawn fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    ServerError(StatusCode),
    Slow,
    Malformed,
    RateLimited,
    Timeout,
    WrongShape,
    WrongContentType,
}

/// Draws faults for one fake and counts them.
#[derive(Debug)]
pub struct FaultInjector {
    faults: Faults,
    rng: Mutex<StdRng>,
    injected: AtomicU64,
}

impl FaultInjector {
    pub fn new(faults: Faults) -> Self {
        let rng = StdRng::seed_from_u64(faults.seed);
        Self {
            faults,
            rng: Mutex::new(rng),
            injected: AtomicU64::new(0),
        }
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The fault for the next request, if any.
    pub fn draw(&self) -> Option<Fault> {
        if self.faults.is_off() {
            return None;
        }
        let x: f64 = self.rng.lock().expect("fault rng").gen();
        let f = &self.faults;
        let mut edge = 0.0;
        let kinds = [
            (
                f.error_500_share,
                Fault::ServerError(StatusCode::INTERNAL_SERVER_ERROR),
            ),
            (f.slow_share, Fault::Slow),
            (f.malformed_share, Fault::Malformed),
            (f.rate_limit_share, Fault::RateLimited),
            (f.timeout_share, Fault::Timeout),
            (f.wrong_shape_share, Fault::WrongShape),
            (f.wrong_content_type_share, Fault::WrongContentType),
        ];
        for (share, fault) in kinds {
            edge += share;
            if x < edge {
                self.injected.fetch_add(1, Ordering::Relaxed);
                return Some(fault);
            }
        }
        None
    }

    /// Acts on a drawn fault: `Some(answer)` to send instead of the real one, `None` to answer
    /// normally (after any delay). `rate_limited` is the source's own rate-limit answer.
    pub async fn act(
        &self,
        fault: Fault,
        rate_limited: impl FnOnce() -> Response,
    ) -> Option<Response> {
        match fault {
            Fault::ServerError(status) => Some(
                (
                    status,
                    [(header::CONTENT_TYPE, "text/html")],
                    "<html><body><h1>We're sorry, but something went wrong.</h1></body></html>",
                )
                    .into_response(),
            ),
            Fault::Slow => {
                tokio::time::sleep(Duration::from_millis(self.faults.slow_ms)).await;
                None
            }
            Fault::Timeout => {
                tokio::time::sleep(Duration::from_millis(self.faults.timeout_ms)).await;
                None
            }
            Fault::Malformed => Some(
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                    r#"{"data":{"user":{"id":"#,
                )
                    .into_response(),
            ),
            Fault::WrongShape => Some(
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                    r#"{"unexpected":[1,2,3],"ClientId":"not a number","data":7}"#,
                )
                    .into_response(),
            ),
            Fault::WrongContentType => Some(
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    "<!DOCTYPE html><html><body>Scheduled maintenance</body></html>",
                )
                    .into_response(),
            ),
            Fault::RateLimited => {
                let mut answer = rate_limited();
                if let Some(secs) = self.faults.rate_limit_retry_after_secs {
                    answer
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                Some(answer)
            }
        }
    }
}

/// The middleware's state: the injector and the source's rate-limit answer.
type InjectState = (Arc<FaultInjector>, fn() -> Response);

/// Wraps a fake's router so every request may draw a fault first.
pub fn inject(
    router: Router,
    injector: Arc<FaultInjector>,
    rate_limited: fn() -> Response,
) -> Router {
    router.layer(axum::middleware::from_fn_with_state(
        (injector, rate_limited),
        middleware,
    ))
}

async fn middleware(
    State((injector, rate_limited)): State<InjectState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(fault) = injector.draw() {
        if let Some(answer) = injector.act(fault, rate_limited).await {
            return answer;
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_drawn_in_proportion_and_counted() {
        let injector = FaultInjector::new(Faults {
            error_500_share: 0.2,
            rate_limit_share: 0.3,
            seed: 9,
            ..Faults::default()
        });
        let draws: Vec<Option<Fault>> = (0..2000).map(|_| injector.draw()).collect();
        let errors = draws
            .iter()
            .filter(|f| matches!(f, Some(Fault::ServerError(_))))
            .count();
        let limited = draws
            .iter()
            .filter(|f| **f == Some(Fault::RateLimited))
            .count();
        assert!((300..500).contains(&errors), "{errors}");
        assert!((500..700).contains(&limited), "{limited}");
        assert_eq!(injector.injected(), (errors + limited) as u64);
        assert!(FaultInjector::new(Faults::default()).draw().is_none());
    }

    #[test]
    fn a_faults_file_is_validated_and_names_the_key_at_fault() {
        let ok = SourceFaults::from_toml(
            "[healthie]\nerror_500_share = 0.1\n[hint]\nrate_limit_share = 0.5\nrate_limit_retry_after_secs = 0\n",
        )
        .unwrap();
        assert_eq!(ok.healthie.error_500_share, 0.1);
        assert_eq!(ok.hint.rate_limit_retry_after_secs, Some(0));
        assert_eq!(ok.intakeq, Faults::default());
        let err = SourceFaults::from_toml("[intakeq]\ntimeout_share = 1.5\n").unwrap_err();
        assert!(err.contains("intakeq.timeout_share"), "{err}");
        let err = SourceFaults::from_toml("[hint]\nslow = 0.1\n").unwrap_err();
        assert!(err.contains("slow"), "{err}");
        let err = SourceFaults::from_toml("[healthie]\nslow_share = 0.6\nmalformed_share = 0.6\n")
            .unwrap_err();
        assert!(err.contains("healthie"), "{err}");
    }
}
