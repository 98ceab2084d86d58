//! Rate limits shared through the database: two `Upstream`s for one credential (as two
//! processes would hold) sharing one store send, together, no more than the credential's rate
//! and burst; bulk work from both stays within its share while a live caller gets through; a
//! rate-limit answer seen by one pauses the other; a daily allowance is spent once.
//!
//! The upstream is a tiny local server that records when each request arrived. A last test
//! runs the binary: `resync` and `sync` as two processes on one SQLite file against the
//! Healthie fake enforcing the configured limit, which answers none of them rate-limited.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{NaiveTime, TimeZone, Utc};
use governor::Quota;
use patient_sync::metrics::Metrics;
use patient_sync::model::SourceKind;
use patient_sync::sandbox::healthie::{HealthieConfig, RateLimit};
use patient_sync::sandbox::population::PopulationConfig;
use patient_sync::sandbox::{Sandbox, SandboxConfig};
use patient_sync::sources::http::{
    bulk, Clock, DailyBudget, ManualClock, Upstream, UpstreamPolicy,
};
use patient_sync::sources::shared_limit::RateSlots;
use patient_sync::store::StoreRateSlots;

use crate::helpers::{database, Db};
use crate::on_both_backends;

/// Arrivals by path, and whether the next `/limited` request gets a 429.
#[derive(Default)]
struct Counter {
    arrivals: Mutex<Vec<(String, Instant)>>,
    limit_next: AtomicBool,
}

impl Counter {
    fn arrivals(&self, path: &str) -> Vec<Instant> {
        let all = self.arrivals.lock().unwrap();
        all.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, at)| *at)
            .collect()
    }
}

async fn answer(
    State(counter): State<Arc<Counter>>,
    Path(path): Path<String>,
) -> impl IntoResponse {
    counter
        .arrivals
        .lock()
        .unwrap()
        .push((path.clone(), Instant::now()));
    if path == "limited" && counter.limit_next.swap(false, Ordering::SeqCst) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "2")],
            "slow down",
        );
    }
    (StatusCode::OK, [("retry-after", "0")], "ok")
}

/// A counting server on a free port: its base url and its counter.
async fn counting_server() -> (String, Arc<Counter>) {
    let counter = Arc::new(Counter::default());
    let app = axum::Router::new()
        .route("/{path}", axum::routing::get(answer))
        .with_state(counter.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, counter)
}

fn policy(per_second: u32, burst: u32) -> UpstreamPolicy {
    let mut p = UpstreamPolicy::per_second(per_second, burst, Duration::from_secs(5));
    p.quotas = vec![Quota::per_second(NonZeroU32::new(per_second).unwrap())
        .allow_burst(NonZeroU32::new(burst).unwrap())];
    p
}

/// One of two "processes": its own upstream (own in-process limiters), the shared slots.
fn process(policy: UpstreamPolicy, share: f64, slots: &Arc<dyn RateSlots>) -> Arc<Upstream> {
    let upstream =
        Upstream::new(SourceKind::Hint, policy, Arc::new(Metrics::new())).with_live_reserve(share);
    assert!(upstream.share_limits(slots.clone()));
    Arc::new(upstream)
}

async fn get(upstream: &Upstream, url: &str) {
    upstream
        .execute(|c| c.get(url), |_| Ok(()))
        .await
        .expect("the counting server answers");
}

/// Callers on `upstream` sending to `url` until `until`, in the bulk lane or not.
fn hammer(
    upstream: &Arc<Upstream>,
    url: String,
    callers: usize,
    until: Instant,
    in_bulk: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..callers)
        .map(|_| {
            let (upstream, url) = (upstream.clone(), url.clone());
            tokio::spawn(async move {
                let work = async {
                    while Instant::now() < until {
                        get(&upstream, &url).await;
                    }
                };
                if in_bulk {
                    bulk(work).await
                } else {
                    work.await
                }
            })
        })
        .collect()
}

/// Every slot a limit of `rate` with `burst` can grant from `start` to the last arrival.
fn allowed(rate: f64, burst: u32, start: Instant, arrivals: &[Instant]) -> f64 {
    let last = arrivals.iter().max().copied().unwrap_or(start);
    rate * (last - start).as_secs_f64() + f64::from(burst)
}

async fn two_processes_together_keep_to_the_rate(db: Db) {
    let db = database(db).await;
    let slots: Arc<dyn RateSlots> = Arc::new(StoreRateSlots(db.store.clone()));
    let (url, counter) = counting_server().await;
    let (rate, burst) = (10, 2);
    let a = process(policy(rate, burst), 0.0, &slots);
    let b = process(policy(rate, burst), 0.0, &slots);
    let start = Instant::now();
    let until = start + Duration::from_secs(3);
    let url = format!("{url}/live");
    let mut tasks = hammer(&a, url.clone(), 3, until, false);
    tasks.extend(hammer(&b, url, 3, until, false));
    for t in tasks {
        t.await.unwrap();
    }
    let arrivals = counter.arrivals("live");
    let bound = allowed(f64::from(rate), burst, start, &arrivals);
    // Each process alone would send its full rate: about twice the bound together.
    assert!(
        (arrivals.len() as f64) <= bound + 1.0,
        "{} requests arrived, the shared limit allows {bound:.1}",
        arrivals.len()
    );
    assert!(
        arrivals.len() >= 20,
        "the limit lets requests through: {}",
        arrivals.len()
    );
}

async fn bulk_work_of_two_processes_keeps_to_its_share_and_live_work_gets_through(db: Db) {
    let db = database(db).await;
    let slots: Arc<dyn RateSlots> = Arc::new(StoreRateSlots(db.store.clone()));
    let (url, counter) = counting_server().await;
    // 8 a second with a burst of 2; bulk gets half: 4 a second, a burst of 1.
    let a = process(policy(8, 2), 0.5, &slots);
    let b = process(policy(8, 2), 0.5, &slots);
    let start = Instant::now();
    let until = start + Duration::from_secs(4);
    let mut tasks = hammer(&a, format!("{url}/bulk"), 3, until, true);
    tasks.extend(hammer(&b, format!("{url}/bulk"), 3, until, true));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..4 {
        let asked = Instant::now();
        get(&a, &format!("{url}/live")).await;
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let arrivals = counter.arrivals("bulk");
    // Each process's own bulk lane allows 4 a second: 8 together without the shared key.
    let bound = allowed(4.0, 1, start, &arrivals);
    assert!(
        (arrivals.len() as f64) <= bound + 1.0,
        "{} bulk requests arrived, their share allows {bound:.1}",
        arrivals.len()
    );
    assert!(arrivals.len() >= 8, "bulk work ran: {}", arrivals.len());
    assert_eq!(counter.arrivals("live").len(), 4);
    assert!(
        slowest < Duration::from_secs(2),
        "a live request waited {slowest:?} behind bulk work"
    );
}

async fn a_rate_limit_answer_seen_by_one_process_pauses_the_other(db: Db) {
    let db = database(db).await;
    let slots: Arc<dyn RateSlots> = Arc::new(StoreRateSlots(db.store.clone()));
    let (url, counter) = counting_server().await;
    let a = process(policy(100, 10), 0.0, &slots);
    let b = process(policy(100, 10), 0.0, &slots);
    counter.limit_next.store(true, Ordering::SeqCst);
    let limited = {
        let (a, url) = (a.clone(), format!("{url}/limited"));
        tokio::spawn(async move { get(&a, &url).await })
    };
    // Once the 429 (Retry-After: 2) went out, `b` asks.
    let answered = loop {
        if let Some(at) = counter.arrivals("limited").first().copied() {
            break at;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    get(&b, &format!("{url}/other")).await;
    limited.await.unwrap();
    let other = counter.arrivals("other")[0];
    assert!(
        other - answered >= Duration::from_millis(1900),
        "the other process sent {:?} after the 429",
        other - answered
    );
    assert_eq!(counter.arrivals("limited").len(), 2, "a's retry");
}

async fn two_processes_spend_a_daily_allowance_once(db: Db) {
    let db = database(db).await;
    let slots: Arc<dyn RateSlots> = Arc::new(StoreRateSlots(db.store.clone()));
    let (url, counter) = counting_server().await;
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap(),
    ));
    let process = |budget: &Arc<DailyBudget>| {
        let upstream = Upstream::new(
            SourceKind::Intakeq,
            policy(1000, 1000),
            Arc::new(Metrics::new()),
        )
        .with_daily_budget(budget.clone());
        assert!(upstream.share_limits_with_clock(slots.clone(), clock.clone()));
        upstream
    };
    let budget_a = Arc::new(DailyBudget::new(6, NaiveTime::MIN, clock.clone()));
    let budget_b = Arc::new(DailyBudget::new(6, NaiveTime::MIN, clock.clone()));
    let (a, b) = (process(&budget_a), process(&budget_b));
    let url = format!("{url}/day");
    for _ in 0..4 {
        get(&a, &url).await;
    }
    for _ in 0..2 {
        get(&b, &url).await;
    }
    assert_eq!(clock.sleeps(), 0);
    assert_eq!(budget_b.snapshot().used, 6, "b counts a's requests too");
    // The seventh request of the day waits for the reset, though `b` itself sent only two.
    get(&b, &url).await;
    assert_eq!(clock.sleeps(), 1);
    assert_eq!(
        clock.now(),
        Utc.with_ymd_and_hms(2026, 3, 3, 0, 0, 0).unwrap()
    );
    assert_eq!(budget_b.snapshot().used, 1);
    assert_eq!(counter.arrivals("day").len(), 7);
}

/// The binary with Healthie at `healthie_url` configured to 4 requests a second with a burst of 2.
/// Its log (warnings and errors) goes to `log`.
fn patient_sync(
    args: &[&str],
    db_url: &str,
    healthie_url: &str,
    log: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new(crate::crash::BIN)
        .args(args)
        .env("PATIENT_SYNC_DATABASE__URL", db_url)
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__API_URL", healthie_url)
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
            HealthieConfig::default().api_key,
        )
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__REQUESTS_PER_SECOND", "4")
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__BURST", "2")
        .env("PATIENT_SYNC_LOG__LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("a log file"))
        .spawn()
        .expect("start patient-sync")
}

/// Waits for `child` to exit (killing it after `deadline`) and returns its exit code.
async fn exit_code(mut child: std::process::Child, deadline: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for patient-sync") {
            return status.code();
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("patient-sync did not finish within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `resync` (bulk lane) and `sync` (a full sweep in the bulk lane, then refetches in the live
/// lane) at once: each alone may send 4 a second, together they would send up to twice that
/// with limits of their own.
async fn resync_and_sync_processes_together_get_no_rate_limited_answer(db: Db) {
    let sandbox = Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people: 2000,
            seed: 66,
            ..Default::default()
        },
        // The configured rate; two more in a burst than configured, for requests sent a little
        // after their slot (a busy debug build), which then arrive close to the next one.
        healthie: HealthieConfig {
            rate_limit: Some(RateLimit {
                requests_per_second: 4.0,
                burst: 4,
            }),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .expect("sandbox starts");
    let db = database(db).await;
    let db_url = db.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let url = sandbox.healthie_url();
    let log = |name: &str| dir.path().join(name);
    let migrate = patient_sync(&["migrate"], &db_url, &url, &log("migrate.log"));
    assert_eq!(exit_code(migrate, Duration::from_secs(60)).await, Some(0));
    let resync = patient_sync(
        &["resync", "--source", "healthie"],
        &db_url,
        &url,
        &log("resync.log"),
    );
    let sync = patient_sync(&["sync"], &db_url, &url, &log("sync.log"));
    let (resync, sync) = tokio::join!(
        exit_code(resync, Duration::from_secs(240)),
        exit_code(sync, Duration::from_secs(240))
    );
    let logs = ["resync.log", "sync.log"]
        .map(|name| std::fs::read_to_string(log(name)).unwrap_or_default())
        .join("\n");
    assert_eq!(resync, Some(0), "the resync completed\n{logs}");
    assert!(sync.is_some(), "sync exited by itself");
    let counters = sandbox.healthie_counters().snapshot();
    assert!(counters.requests >= 60, "{counters:?}");
    assert_eq!(counters.rate_limited, 0, "{counters:?}\n{logs}");
}

on_both_backends!(
    two_processes_together_keep_to_the_rate,
    bulk_work_of_two_processes_keeps_to_its_share_and_live_work_gets_through,
    a_rate_limit_answer_seen_by_one_process_pauses_the_other,
    two_processes_spend_a_daily_allowance_once,
    resync_and_sync_processes_together_get_no_rate_limited_answer,
);
