//! Crash safety through the real binary: `serve` killed with SIGKILL at random moments and
//! restarted loses nothing and duplicates nothing; a Postgres restart mid-run is survived;
//! SIGTERM stops it cleanly. These tests wait on other processes, so they poll the database
//! with a deadline instead of sleeping for a time. The process helpers here are shared with
//! `scale`.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patient_sync::sandbox::healthie::{Faults, HealthieConfig};
use patient_sync::sandbox::population::{Population, PopulationConfig};
use patient_sync::sandbox::webhooks::WebhookSender;
use patient_sync::sandbox::webhooks::{healthie_storm, HealthieEnvelope, StormConfig};
use patient_sync::sandbox::{Sandbox, SandboxConfig, SandboxHandle};
use patient_sync::store::{self, InboxState, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use patient_sync::app::Application;
use patient_sync::sandbox::{hint, HINT_API_KEY};
use tokio_util::sync::CancellationToken;

use crate::app::{settings_for, start_sandbox, WEBHOOK_SECRET};
use crate::scale::{assert_exactly_once, assert_same, snapshot, Snapshot};

pub const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `serve` process, killed when dropped so a failing test leaves none behind.
pub struct Serve {
    child: Child,
    pub port: u16,
}

impl Serve {
    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait for serve")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn sender(&self) -> WebhookSender {
        sender(self.port)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `serve` against the Healthie fake at `healthie_url`; `extra` overrides the defaults.
pub fn serve(db_url: &str, port: u16, healthie_url: &str, extra: &[(&str, &str)]) -> Serve {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env("PATIENT_SYNC_DATABASE__URL", db_url)
        .env("PATIENT_SYNC_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__API_URL", healthie_url)
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
            HealthieConfig::default().api_key,
        )
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET",
            WEBHOOK_SECRET,
        )
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__REQUESTS_PER_SECOND",
            "1000",
        )
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__BURST", "1000")
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__BATCH_SIZE", "5")
        .env("PATIENT_SYNC_WORKER__BATCH_SIZE", "5")
        .env("PATIENT_SYNC_WORKER__LEASE_SECS", "1")
        .env("PATIENT_SYNC_WORKER__IDLE_POLL_MS", "20")
        .env("PATIENT_SYNC_POLL__INTERVAL_SECS", "0")
        .env("PATIENT_SYNC_POLL__HEALTHIE_SWEEP_INTERVAL_SECS", "0")
        .env("PATIENT_SYNC_LOG__LEVEL", "warn");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start patient-sync serve");
    Serve { child, port }
}

pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !check().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `serve` on `port` and waits until it is ready.
pub async fn start_serve(
    db_url: &str,
    port: u16,
    healthie_url: &str,
    extra: &[(&str, &str)],
) -> Serve {
    let serve = serve(db_url, port, healthie_url, extra);
    wait_for("the service to be ready", Duration::from_secs(30), || {
        ready(port)
    })
    .await;
    serve
}

pub fn sender(port: u16) -> WebhookSender {
    WebhookSender::new(
        format!("http://127.0.0.1:{port}/webhooks/healthie")
            .parse()
            .unwrap(),
        WEBHOOK_SECRET.as_bytes().to_vec(),
    )
}

/// Inbox items in any of `states`; an error (the database is down) reads as `None`.
pub async fn try_count(store: &dyn Store, states: &[InboxState]) -> Option<i64> {
    let counts = store.inbox_counts().await.ok()?;
    Some(
        counts
            .iter()
            .filter(|c| states.contains(&c.state))
            .map(|c| c.count)
            .sum(),
    )
}

pub async fn count(store: &dyn Store, states: &[InboxState]) -> i64 {
    try_count(store, states)
        .await
        .expect("the database answers")
}

/// Waits (up to two minutes) until no inbox item is pending or leased; a database that does not
/// answer for a while (a restart) counts as not drained yet.
pub async fn wait_drained(store: &dyn Store, what: &str) {
    wait_for(what, Duration::from_secs(120), || async {
        try_count(store, &[InboxState::Pending, InboxState::Leased]).await == Some(0)
    })
    .await;
}

pub async fn ready(port: u16) -> bool {
    reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

/// A sandbox whose population has already gone through `storm`, and the storm's deliveries
/// (duplicated and out of order). The fake Healthie answers with the final state throughout.
pub async fn storm_sandbox(
    people: usize,
    seed: u64,
    storm: &StormConfig,
    faults: Faults,
) -> (SandboxHandle, Vec<HealthieEnvelope>) {
    let config = PopulationConfig {
        people,
        seed,
        ..Default::default()
    };
    let storm = storm.clone();
    let (population, events) = tokio::task::spawn_blocking(move || {
        let mut population = Population::generate(&config);
        let events = healthie_storm(&mut population, &storm);
        (population, events)
    })
    .await
    .unwrap();
    let sandbox = Sandbox::start_with_population(
        SandboxConfig {
            healthie: HealthieConfig {
                rate_limit: None,
                faults,
                ..Default::default()
            },
            ..Default::default()
        },
        population,
    )
    .await
    .expect("sandbox starts");
    (sandbox, events)
}

/// Delivers every event, `concurrency` at a time, spread over `senders`. A delivery that is not
/// acknowledged (the service is down, restarting or its database is) is sent again, as Healthie
/// does, until `deadline`. Returns how many deliveries were sent more than once.
pub async fn deliver(
    senders: Vec<WebhookSender>,
    events: Vec<HealthieEnvelope>,
    concurrency: usize,
    deadline: Duration,
) -> u64 {
    use futures::StreamExt;
    let until = Instant::now() + deadline;
    let senders = Arc::new(senders);
    let resent = futures::stream::iter(events.into_iter().enumerate())
        .map(|(i, event)| {
            let senders = senders.clone();
            async move {
                let mut tries = 0usize;
                loop {
                    let sender = &senders[(i + tries) % senders.len()];
                    match sender.send(&event).await {
                        Ok(status) if status.is_success() => return u64::from(tries > 0),
                        Ok(status) => assert!(
                            status.is_server_error(),
                            "a delivery was refused with {status}"
                        ),
                        Err(_) => {}
                    }
                    tries += 1;
                    assert!(
                        Instant::now() < until,
                        "a delivery was not acknowledged in time"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
        .buffer_unordered(concurrency)
        .fold(0u64, |acc, n| async move { acc + n })
        .await;
    resent
}

/// The same deliveries into an undisturbed in-process run with one worker on SQLite.
pub async fn undisturbed(sandbox: &SandboxHandle, events: &[HealthieEnvelope]) -> Snapshot {
    let app = crate::app::spawn_app_with(crate::helpers::Db::Sqlite, sandbox).await;
    deliver(
        vec![app.sender()],
        events.to_vec(),
        8,
        Duration::from_secs(120),
    )
    .await;
    let summary = app.worker.drain().await.unwrap();
    assert_eq!(summary.dead, 0, "the undisturbed run dead-letters nothing");
    assert_exactly_once(app.store.as_ref(), events.len() as u64, events.len() as u64).await;
    snapshot(app.store.as_ref()).await
}

/// Environment enabling the Hint source against `sandbox`, with its webhook secret.
pub fn hint_env(sandbox: &SandboxHandle) -> Vec<(&'static str, String)> {
    vec![
        ("PATIENT_SYNC_SOURCES__HINT__ENABLED", "true".into()),
        ("PATIENT_SYNC_SOURCES__HINT__BASE_URL", sandbox.hint_url()),
        ("PATIENT_SYNC_SOURCES__HINT__API_KEY", HINT_API_KEY.into()),
        (
            "PATIENT_SYNC_SOURCES__HINT__WEBHOOK_SECRET",
            HINT_SECRET.into(),
        ),
    ]
}

/// How many distinct Hint events (by event id) are among `events`.
pub fn distinct_events(events: &[serde_json::Value]) -> usize {
    events
        .iter()
        .map(|e| e["id"].to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// The Hint webhook secret the tests sign with.
pub const HINT_SECRET: &str = "hint-test-signing-key";

/// Delivers Hint webhook events like [`deliver`]: each until acknowledged (a duplicate is an
/// acknowledgement too), spread over the receivers at `urls`.
pub async fn deliver_hint(urls: Vec<String>, events: Vec<serde_json::Value>, deadline: Duration) {
    use futures::StreamExt;
    let until = Instant::now() + deadline;
    let http = reqwest::Client::new();
    futures::stream::iter(events.into_iter().enumerate())
        .for_each_concurrent(8, |(i, event)| {
            let (http, urls) = (http.clone(), &urls);
            async move {
                let mut tries = 0;
                loop {
                    let url = &urls[(i + tries) % urls.len()];
                    match hint::send_webhook(&http, url, HINT_SECRET, &event).await {
                        Ok(status) if status.is_success() => return,
                        Ok(status) => assert!(status.is_server_error(), "refused with {status}"),
                        Err(_) => {}
                    }
                    tries += 1;
                    assert!(
                        Instant::now() < until,
                        "a Hint delivery was not acknowledged in time"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
        .await;
}

/// The same Healthie and Hint deliveries into an undisturbed in-process run with one worker on
/// SQLite, Hint enabled.
pub async fn undisturbed_with_hint(
    sandbox: &SandboxHandle,
    events: &[HealthieEnvelope],
    hint_events: &[serde_json::Value],
) -> Snapshot {
    let db = crate::helpers::database(crate::helpers::Db::Sqlite).await;
    let extra = hint_env(sandbox);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = Application::build(settings_for(&db.url, &sandbox.healthie_url(), &extra))
        .await
        .expect("application builds");
    let base = format!("http://{}", app.local_addr());
    let (store, worker) = (app.store(), app.worker());
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_receiver(shutdown.clone()));
    let _stop = shutdown.drop_guard();
    let healthie = tokio::spawn(deliver(
        vec![WebhookSender::new(
            format!("{base}/webhooks/healthie").parse().unwrap(),
            WEBHOOK_SECRET.as_bytes().to_vec(),
        )],
        events.to_vec(),
        8,
        Duration::from_secs(120),
    ));
    deliver_hint(
        vec![format!("{base}/webhooks/hint")],
        hint_events.to_vec(),
        Duration::from_secs(120),
    )
    .await;
    healthie.await.unwrap();
    let summary = worker.drain().await.unwrap();
    assert_eq!(summary.dead, 0, "the undisturbed run dead-letters nothing");
    let stored = (events.len() + distinct_events(hint_events)) as u64;
    assert_exactly_once(store.as_ref(), stored, stored).await;
    snapshot(store.as_ref()).await
}

/// A storm of about 800 deliveries per unit of `scale`: creates, updates (some delivered twice),
/// archivals, address and tag changes and merges, out of order.
pub fn storm_config(seed: u64, scale: usize) -> StormConfig {
    StormConfig {
        seed,
        creates: 60 * scale,
        create_deliveries: (1, 3),
        updates: 500 * scale,
        update_duplicate_share: 0.2,
        archives: 12 * scale,
        location_changes: 60 * scale,
        tag_changes: 30 * scale,
        merges: 4 * scale,
        reorder_window: 16,
        ..Default::default()
    }
}

/// The seed of a randomized test: `PSYNC_TEST_SEED` when set, else a fresh one. Printed, so a
/// failure can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = std::env::var("PSYNC_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("{test}: seed {seed} (replay with PSYNC_TEST_SEED={seed})");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_at_random_moments_and_restarted_ends_like_an_undisturbed_run() {
    let seed = test_seed("sigkill");
    let mut rng = StdRng::seed_from_u64(seed);
    let (sandbox, events) = storm_sandbox(
        300,
        seed,
        &storm_config(seed, 3),
        Faults {
            slow_share: 1.0,
            slow_ms: 10,
            ..Default::default()
        },
    )
    .await;
    let total = events.len() as u64;
    assert!(total >= 2_000, "thousands of deliveries ({total})");
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("crash.sqlite").display());
    let port = free_port();
    let healthie = sandbox.healthie_url();
    let extra = [("PATIENT_SYNC_WORKER__LEASE_SECS", "2")];
    let mut serve = start_serve(&db_url, port, &healthie, &extra).await;
    let observer = store::connect(&db_url, 2).await.unwrap();
    let concurrency = 8;
    let delivery = tokio::spawn(deliver(
        vec![sender(port)],
        events.clone(),
        concurrency,
        Duration::from_secs(120),
    ));

    let kills = 4;
    let mut mid_processing = 0;
    for _ in 0..kills {
        let done_before = count(observer.as_ref(), &[InboxState::Done]).await;
        // Let it make some progress, then kill it at a random moment.
        wait_for(
            "progress before a kill",
            Duration::from_secs(60),
            || async { count(observer.as_ref(), &[InboxState::Done]).await > done_before },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1_500))).await;
        serve.kill();
        let unfinished = count(
            observer.as_ref(),
            &[InboxState::Pending, InboxState::Leased],
        )
        .await;
        if unfinished > 0 || !delivery.is_finished() {
            mid_processing += 1;
        }
        serve = start_serve(&db_url, port, &healthie, &extra).await;
    }
    assert!(mid_processing > 0, "at least one kill came mid-run");
    let resent = delivery.await.unwrap();
    wait_drained(
        observer.as_ref(),
        "the restarted service to drain the inbox",
    )
    .await;
    let status = serve.terminate();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");

    // A delivery stored just before a kill but never acknowledged is sent again (Healthie has
    // no event ids to deduplicate); it is one more refetch of the same state.
    assert_exactly_once(observer.as_ref(), total, total + resent).await;
    let after_crashes = snapshot(observer.as_ref()).await;
    let expected = undisturbed(&sandbox, &events).await;
    assert_same(&expected, &after_crashes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_survives_a_postgres_restart_mid_run() {
    let seed = test_seed("postgres restart");
    let server = Arc::new(crate::pg::PgServer::init().expect("start a Postgres server"));
    let db_url = server.fresh_database().await;
    let (sandbox, events) = storm_sandbox(
        200,
        seed,
        &storm_config(seed, 2),
        Faults {
            slow_share: 1.0,
            slow_ms: 10,
            ..Default::default()
        },
    )
    .await;
    let total = events.len() as u64;
    let port = free_port();
    let healthie = sandbox.healthie_url();
    let extra = [
        ("PATIENT_SYNC_WORKER__LEASE_SECS", "5"),
        ("PATIENT_SYNC_DATABASE__MAX_CONNECTIONS", "8"),
    ];
    let mut serve = start_serve(&db_url, port, &healthie, &extra).await;
    let observer = store::connect(&db_url, 2).await.unwrap();
    let delivery = tokio::spawn(deliver(
        vec![sender(port)],
        events.clone(),
        8,
        Duration::from_secs(120),
    ));
    wait_for("some items to finish", Duration::from_secs(60), || async {
        try_count(observer.as_ref(), &[InboxState::Done])
            .await
            .is_some_and(|n| n >= 50)
    })
    .await;

    let stopping = server.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap();
    wait_for(
        "readiness to report the outage",
        Duration::from_secs(30),
        || async { !ready(port).await },
    )
    .await;
    let asked = Instant::now();
    assert!(!ready(port).await, "not ready while the database is down");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "readiness answers promptly during the outage ({:?})",
        asked.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let starting = server.clone();
    tokio::task::spawn_blocking(move || starting.start())
        .await
        .unwrap()
        .expect("Postgres starts again");

    wait_for(
        "readiness after the restart",
        Duration::from_secs(60),
        || ready(port),
    )
    .await;
    let resent = delivery.await.unwrap();
    wait_drained(observer.as_ref(), "the service to drain the inbox").await;
    assert!(serve.alive(), "serve kept running through the restart");
    let status = serve.terminate();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");

    // A transient outage dead-letters nothing: every delivery ends done.
    assert_exactly_once(observer.as_ref(), total, total + resent).await;
    let after_restart = snapshot(observer.as_ref()).await;
    let expected = undisturbed(&sandbox, &events).await;
    assert_same(&expected, &after_restart);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_exits_zero_and_hands_back_every_lease() {
    let sandbox = start_sandbox(
        40,
        8,
        Faults {
            slow_share: 1.0,
            slow_ms: 2_000,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<String> = {
        let pop = sandbox.population().read().unwrap();
        pop.healthie_users()
            .filter_map(|u| u["id"].as_str().map(str::to_string))
            .take(20)
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("term.sqlite").display());
    let port = free_port();
    let mut serve = start_serve(&db_url, port, &sandbox.healthie_url(), &[]).await;
    let sender = serve.sender();
    for id in &ids {
        sender
            .send(&HealthieEnvelope::patient("patient.updated", id, vec![]))
            .await
            .unwrap();
    }
    let observer = store::connect(&db_url, 2).await.unwrap();
    wait_for(
        "a batch to be in flight",
        Duration::from_secs(30),
        || async { count(observer.as_ref(), &[InboxState::Leased]).await > 0 },
    )
    .await;
    let status = serve.terminate();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
    assert_eq!(
        count(observer.as_ref(), &[InboxState::Leased]).await,
        0,
        "no lease left behind"
    );
    let pending = count(observer.as_ref(), &[InboxState::Pending]).await;
    let done = count(observer.as_ref(), &[InboxState::Done]).await;
    assert_eq!(
        pending + done,
        ids.len() as i64,
        "every delivery is still there"
    );
    let item = observer
        .list_inbox(InboxState::Pending, None, None, 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(item.attempts, 0, "an interrupted attempt is not counted");
}
