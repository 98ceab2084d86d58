//! Fault injection: with each fake answering rate limits, 5xx, timeouts, slow, truncated or
//! misshapen bodies and HTML pages, a run of a few hundred refetches ends with every item
//! `done` or `dead` (none lost, none left pending or leased), dead items carry an error kind
//! and nothing else, and the client's classification shows in how they ended.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patient_sync::config::WorkerSettings;
use patient_sync::metrics::Metrics;
use patient_sync::model::SourceKind;
use patient_sync::sandbox::faults::Faults;
use patient_sync::sandbox::healthie::HealthieConfig;
use patient_sync::sandbox::population::PopulationConfig;
use patient_sync::sandbox::{Sandbox, SandboxConfig, SandboxHandle};
use patient_sync::sources::healthie::Healthie;
use patient_sync::sources::hint::{Hint, HintOptions};
use patient_sync::sources::http::{Upstream, UpstreamPolicy};
use patient_sync::sources::intakeq::{Intakeq, IntakeqOptions};
use patient_sync::sources::Source;
use patient_sync::store::{InboxState, NewInboxItem, Origin, Store};
use patient_sync::sync::worker::Worker;

use crate::app::three_source_env;
use crate::helpers::{database, Db};

/// Every fault on, about a third of requests in all.
fn faults(seed: u64) -> Faults {
    Faults {
        error_500_share: 0.08,
        slow_share: 0.05,
        slow_ms: 20,
        malformed_share: 0.03,
        rate_limit_share: 0.08,
        timeout_share: 0.03,
        timeout_ms: 1_000,
        wrong_shape_share: 0.03,
        wrong_content_type_share: 0.03,
        seed,
        ..Faults::default()
    }
}

/// Millisecond backoff, a 400 ms timeout, and in-request retries that give up after 300 ms,
/// so failures also reach the worker's durable retries.
fn fast_policy() -> UpstreamPolicy {
    let mut p = UpstreamPolicy::per_second(100_000, 100_000, Duration::from_millis(400));
    p.max_retry_elapsed = Duration::from_millis(300);
    p.retry_initial = Duration::from_millis(5);
    p.retry_max = Duration::from_millis(50);
    p.rate_limit_pause = Duration::from_millis(20);
    p
}

async fn sandbox(source: SourceKind) -> SandboxHandle {
    let on = |s: SourceKind| {
        if s == source {
            faults(17)
        } else {
            Faults::default()
        }
    };
    let sandbox = Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people: 400,
            seed: 23,
            ..Default::default()
        },
        healthie: HealthieConfig {
            rate_limit: None,
            faults: on(SourceKind::Healthie),
            ..Default::default()
        },
        intakeq_faults: on(SourceKind::Intakeq),
        hint_faults: on(SourceKind::Hint),
        ..Default::default()
    })
    .await
    .expect("sandbox starts");
    let _ = sandbox.intakeq().clone().with_limits(1_000_000, 1_000_000);
    let _ = sandbox.hint().clone().with_rate_limit(1_000_000);
    sandbox
}

fn worker(store: Arc<dyn Store>, sandbox: &SandboxHandle, db_url: &str) -> Worker {
    let mut env = three_source_env(sandbox, db_url);
    // Small Healthie batches: more requests, so more of them meet a fault.
    env.push((
        "PATIENT_SYNC_SOURCES__HEALTHIE__BATCH_SIZE".into(),
        "5".into(),
    ));
    let settings = patient_sync::config::Settings::load_from(None, &env).expect("settings");
    let metrics = Arc::new(Metrics::new());
    let mut sources: HashMap<SourceKind, Arc<dyn Source>> = HashMap::new();
    let healthie_upstream = Arc::new(
        Upstream::new(SourceKind::Healthie, fast_policy(), metrics.clone()).with_live_reserve(0.2),
    );
    sources.insert(
        SourceKind::Healthie,
        Arc::new(Healthie::with_upstream(
            &settings.sources.healthie,
            healthie_upstream,
        )),
    );
    sources.insert(
        SourceKind::Intakeq,
        Arc::new(Intakeq::with_options(
            &settings.sources.intakeq,
            metrics.clone(),
            IntakeqOptions {
                policy: Some(fast_policy()),
                ..Default::default()
            },
        )),
    );
    sources.insert(
        SourceKind::Hint,
        Arc::new(Hint::with_options(
            &settings.sources.hint,
            metrics.clone(),
            HintOptions {
                policy: Some(fast_policy()),
                ..Default::default()
            },
        )),
    );
    let worker_settings = WorkerSettings {
        concurrency: 1,
        batch_size: 50,
        lease_secs: 30,
        idle_poll_ms: 10,
        max_attempts: 3,
        retry_initial_ms: 5,
        retry_max_ms: 50,
        shutdown_grace_secs: 1,
    };
    Worker::new(
        store,
        sources,
        worker_settings,
        Arc::new(settings.identity.to_identity_settings()),
        metrics,
    )
}

/// Record ids of `source` in the sandbox.
fn ids(sandbox: &SandboxHandle, source: SourceKind, n: usize) -> Vec<String> {
    let pop = sandbox.population().read().unwrap();
    let values: Vec<serde_json::Value> = match source {
        SourceKind::Healthie => pop.healthie_users().map(|u| u["id"].clone()).collect(),
        SourceKind::Intakeq => pop
            .intakeq_clients()
            .map(|c| c["ClientId"].clone())
            .collect(),
        SourceKind::Hint => pop.hint_patients().map(|p| p["id"].clone()).collect(),
    };
    values
        .into_iter()
        .filter_map(|v| match v {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .take(n)
        .collect()
}

async fn every_item_ends_done_or_dead_with_faults_on(source: SourceKind) {
    let db = database(Db::Sqlite).await;
    let sandbox = sandbox(source).await;
    let worker = worker(db.store.clone(), &sandbox, &db.url);
    let ids = ids(&sandbox, source, 100);
    assert_eq!(ids.len(), 100);
    let resource_type = match source {
        SourceKind::Healthie => "User",
        SourceKind::Intakeq => "Client",
        SourceKind::Hint => "patient",
    };
    // 300 refetch events: each record three times, interleaved.
    let mut inserted = 0i64;
    for round in 0..3 {
        for id in &ids {
            db.store
                .insert_inbox(&NewInboxItem {
                    source,
                    origin: Origin::Poll,
                    event_type: "poll.changed".into(),
                    resource_type: Some(resource_type.into()),
                    resource_id: Some(id.clone()),
                    body: "{}".into(),
                    dedupe_key: Some(format!("faults:{id}:{round}")),
                    received_at_ms: patient_sync::store::now_ms(),
                    ignore_reason: None,
                })
                .await
                .unwrap();
            inserted += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let counts = loop {
        worker.drain().await.unwrap();
        let mut counts: HashMap<InboxState, i64> = HashMap::new();
        for c in db.store.inbox_counts().await.unwrap() {
            *counts.entry(c.state).or_insert(0) += c.count;
        }
        let open = counts.get(&InboxState::Pending).copied().unwrap_or(0)
            + counts.get(&InboxState::Leased).copied().unwrap_or(0);
        if open == 0 {
            break counts;
        }
        assert!(Instant::now() < deadline, "items still open: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let get = |s| counts.get(&s).copied().unwrap_or(0);
    assert_eq!(
        get(InboxState::Done) + get(InboxState::Dead),
        inserted,
        "{source}: {counts:?}"
    );
    assert!(get(InboxState::Done) > 0, "{source}: {counts:?}");
    assert!(
        sandbox.faults_injected(source) >= 5,
        "{source}: only {} faults injected",
        sandbox.faults_injected(source)
    );

    let dead = db
        .store
        .list_inbox(InboxState::Dead, Some(source), None, 1_000)
        .await
        .unwrap();
    for item in &dead {
        let kind = item.last_error_kind.as_deref().expect("an error kind");
        assert!(
            !kind.is_empty() && kind.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{kind}"
        );
        assert_eq!(item.reason, None, "dead items carry a kind, no text");
        // Rate limits snooze without using attempts: they never dead-letter an item.
        assert_ne!(kind, "rate_limited");
        match kind {
            // Retried until the attempts ran out.
            "server_error" | "timeout" | "network" | "body" | "connect" => {
                assert!(
                    item.attempts >= 3,
                    "{kind} after {} attempts",
                    item.attempts
                )
            }
            // Undecodable answers are not retried.
            "decode" => {}
            other => panic!("{source}: unexpected dead-letter kind {other}"),
        }
        if let Some(status) = item.last_http_status {
            assert!((100..600).contains(&status));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthie_faults_leave_no_item_lost_or_stuck() {
    every_item_ends_done_or_dead_with_faults_on(SourceKind::Healthie).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intakeq_faults_leave_no_item_lost_or_stuck() {
    every_item_ends_done_or_dead_with_faults_on(SourceKind::Intakeq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hint_faults_leave_no_item_lost_or_stuck() {
    every_item_ends_done_or_dead_with_faults_on(SourceKind::Hint).await;
}

#[test]
fn the_sandbox_command_refuses_a_bad_faults_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faults.toml");
    std::fs::write(&path, "[hint]\nerror_500_share = 2.0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patient-sync"))
        .args(["sandbox", "--listen", "127.0.0.1:0", "--faults"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hint.error_500_share"), "{stderr}");
}
