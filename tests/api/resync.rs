//! Full resync against the sandbox: creates and updates through the normal apply path, dry
//! runs write nothing, resume and `--restart`, one run per source at a time, missing records
//! deleted only after the grace, and a run killed at random pages and resumed ending like an
//! uninterrupted one without exceeding the sandbox's rate limit.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patient_sync::config::Settings;
use patient_sync::metrics::Metrics;
use patient_sync::model::{RecordStatus, SourceKey, SourceKind};
use patient_sync::sandbox::healthie::{HealthieConfig, RateLimit};
use patient_sync::sandbox::population::PopulationConfig;
use patient_sync::sandbox::{Sandbox, SandboxConfig, SandboxHandle, HINT_API_KEY};
use patient_sync::store::{self, now_ms, Store};
use patient_sync::sync::resync::{
    run_resync, Lister, Progress, ResyncError, ResyncOptions, ResyncOutcome, ResyncSummary,
    EXIT_BUSY,
};
use rand::Rng;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::{settings_for, start_sandbox};
use crate::helpers::{database, Db};
use crate::on_both_backends;

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

fn settings(db_url: &str, sandbox: &SandboxHandle, extra: &[(&str, &str)]) -> Settings {
    let hint_url = sandbox.hint_url();
    let mut env = vec![
        ("PATIENT_SYNC_SOURCES__HINT__ENABLED", "true"),
        ("PATIENT_SYNC_SOURCES__HINT__BASE_URL", hint_url.as_str()),
        ("PATIENT_SYNC_SOURCES__HINT__API_KEY", HINT_API_KEY),
        ("PATIENT_SYNC_RESYNC__LEASE_SECS", "30"),
    ];
    env.extend_from_slice(extra);
    settings_for(db_url, &sandbox.healthie_url(), &env)
}

async fn resync_with(
    store: &dyn Store,
    settings: &Settings,
    kind: SourceKind,
    configure: impl FnOnce(&mut ResyncOptions),
    stop: &CancellationToken,
) -> Result<ResyncSummary, ResyncError> {
    let metrics = Arc::new(Metrics::new());
    let lister = Lister::from_settings(settings, kind, metrics.clone());
    let mut options = ResyncOptions::from_settings(settings, &lister, false, false);
    configure(&mut options);
    run_resync(
        store,
        &lister,
        &settings.identity.to_identity_settings(),
        &options,
        &metrics,
        stop,
        &Progress::quiet(),
    )
    .await
}

async fn resync(store: &dyn Store, settings: &Settings, kind: SourceKind) -> ResyncSummary {
    resync_with(store, settings, kind, |_| {}, &CancellationToken::new())
        .await
        .expect("resync runs")
}

fn healthie_ids(sandbox: &SandboxHandle) -> Vec<String> {
    let pop = sandbox.population().read().unwrap();
    pop.healthie_users()
        .filter_map(|u| u["id"].as_str().map(str::to_string))
        .collect()
}

async fn resync_creates_then_updates(db: Db) {
    let db = database(db).await;
    let sandbox = start_sandbox(80, 3, Default::default()).await;
    let settings = settings(&db.url, &sandbox, &[]);
    let store = db.store.as_ref();
    let ids = healthie_ids(&sandbox);

    let first = resync(store, &settings, SourceKind::Healthie).await;
    assert_eq!(first.outcome, ResyncOutcome::Completed);
    assert_eq!(first.created, ids.len() as u64, "{first:?}");
    assert_eq!(first.records, ids.len() as u64);
    assert_eq!(first.rejected + first.missing + first.deleted, 0);
    assert_eq!(first.pages, first.requests, "one request per page");
    for id in &ids {
        let link = store
            .load_link(&SourceKey::new(SourceKind::Healthie, id.as_str()))
            .await
            .unwrap()
            .expect("every user is linked");
        assert!(store
            .load_patient(&link.patient_id)
            .await
            .unwrap()
            .is_some());
    }
    let done = store
        .load_sync_state(SourceKind::Healthie, "resync")
        .await
        .unwrap()
        .expect("a completed pass is recorded");
    assert!(done.last_success_at.is_some());

    let hint = resync(store, &settings, SourceKind::Hint).await;
    let hint_total = sandbox.hint().patients().len() as u64;
    assert_eq!((hint.created, hint.records), (hint_total, hint_total));

    // Change two Healthie users and one Hint patient upstream.
    let touched: Vec<String> = ids.iter().take(2).cloned().collect();
    {
        let mut pop = sandbox.population().write().unwrap();
        for id in &touched {
            pop.touch_healthie(id).expect("user exists");
        }
    }
    let mut patient = sandbox.hint().patients()[0].clone();
    patient["phones"] = json!([{"number": "4155550199", "type": "mobile"}]);
    patient["updated_at"] = json!("2031-01-01T00:00:00.000000Z");
    sandbox.hint().upsert_patient(patient.clone());

    let second = resync(store, &settings, SourceKind::Healthie).await;
    assert_eq!(
        (second.created, second.updated, second.unchanged),
        (0, 2, ids.len() as u64 - 2),
        "{second:?}"
    );
    assert_eq!(second.pass, Some(2));
    let hint_second = resync(store, &settings, SourceKind::Hint).await;
    assert_eq!((hint_second.updated, hint_second.created), (1, 0));
    let key = SourceKey::new(SourceKind::Hint, patient["id"].as_str().unwrap());
    let row = store.load_source_record(&key).await.unwrap().unwrap();
    assert_eq!(row.raw["phones"], patient["phones"]);
}

async fn dry_run_writes_nothing(db: Db) {
    let db = database(db).await;
    let sandbox = start_sandbox(40, 4, Default::default()).await;
    let settings = settings(&db.url, &sandbox, &[]);
    let store = db.store.as_ref();
    let ids = healthie_ids(&sandbox);
    let dry = resync_with(
        store,
        &settings,
        SourceKind::Healthie,
        |o| o.dry_run = true,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.created, ids.len() as u64);
    assert_eq!(dry.pass, None);
    assert!(store.count_patients().await.unwrap().is_empty());
    assert!(store
        .load_resync_run(SourceKind::Healthie)
        .await
        .unwrap()
        .is_none());
    for stream in ["resync", "resync:active", "resync:archived"] {
        assert!(store
            .load_sync_state(SourceKind::Healthie, stream)
            .await
            .unwrap()
            .is_none());
    }

    // After a real pass, a dry run sees what would change and what is missing.
    resync(store, &settings, SourceKind::Hint).await;
    let gone = sandbox.hint().patients()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    sandbox.hint().delete_patient(&gone).unwrap();
    let dry = resync_with(
        store,
        &settings,
        SourceKind::Hint,
        |o| o.dry_run = true,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (dry.created, dry.updated, dry.missing),
        (0, 0, 1),
        "{dry:?}"
    );
    let record = store
        .load_source_record(&SourceKey::new(SourceKind::Hint, gone.as_str()))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(record.status, RecordStatus::Deleted);
    let run = store
        .load_resync_run(SourceKind::Hint)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (run.pass, run.completed_pass),
        (1, 1),
        "a dry run starts no pass"
    );
}

async fn missing_records_are_deleted_only_after_the_grace(db: Db) {
    let db = database(db).await;
    let sandbox = start_sandbox(60, 6, Default::default()).await;
    let settings = settings(&db.url, &sandbox, &[]);
    let store = db.store.as_ref();
    resync(store, &settings, SourceKind::Hint).await;
    let patients = sandbox.hint().patients();
    let gone = patients[0]["id"].as_str().unwrap().to_string();
    let back = patients[1].clone();
    let back_id = back["id"].as_str().unwrap().to_string();
    let key = SourceKey::new(SourceKind::Hint, gone.as_str());
    let patient_id = store.load_link(&key).await.unwrap().unwrap().patient_id;
    let version = store
        .load_patient(&patient_id)
        .await
        .unwrap()
        .unwrap()
        .version;
    sandbox.hint().delete_patient(&gone).unwrap();
    sandbox.hint().delete_patient(&back_id).unwrap();

    // An interrupted pass marks nobody.
    let stop = CancellationToken::new();
    stop.cancel();
    let cut = resync_with(store, &settings, SourceKind::Hint, |_| {}, &stop)
        .await
        .unwrap();
    assert_eq!(cut.outcome, ResyncOutcome::Interrupted);
    assert_eq!((cut.missing, cut.deleted), (0, 0));

    let first = resync(store, &settings, SourceKind::Hint).await;
    assert_eq!((first.missing, first.deleted), (2, 0), "{first:?}");
    let record = store.load_source_record(&key).await.unwrap().unwrap();
    assert_ne!(record.status, RecordStatus::Deleted, "marked, not deleted");

    // One comes back: it is un-marked.
    sandbox.hint().upsert_patient(back);
    let second = resync(store, &settings, SourceKind::Hint).await;
    assert_eq!((second.missing, second.deleted), (0, 1), "{second:?}");
    let record = store.load_source_record(&key).await.unwrap().unwrap();
    assert_eq!(record.status, RecordStatus::Deleted);
    let row = store.load_patient(&patient_id).await.unwrap().unwrap();
    assert!(row.version > version, "the canonical row was recomputed");
    assert!(
        row.status == "deleted" || row.hint_id.as_deref() != Some(gone.as_str()),
        "the deleted record no longer stands for the patient"
    );
    // Removed again: a fresh count starts, so it is only marked.
    let again = sandbox.hint().delete_patient(&back_id);
    assert!(again.is_some());
    let third = resync(store, &settings, SourceKind::Hint).await;
    assert_eq!((third.missing, third.deleted), (1, 0), "{third:?}");
}

async fn one_resync_per_source_at_a_time(db: Db) {
    let db = database(db).await;
    let sandbox = start_sandbox(20, 7, Default::default()).await;
    let settings = settings(&db.url, &sandbox, &[]);
    let store = db.store.as_ref();
    let now = now_ms();
    let held = store
        .claim_resync(SourceKind::Healthie, "other-process", now, now + 60_000)
        .await
        .unwrap();
    assert!(held.is_some());
    let refused = resync_with(
        store,
        &settings,
        SourceKind::Healthie,
        |_| {},
        &CancellationToken::new(),
    )
    .await;
    match refused {
        Err(e @ ResyncError::Busy { .. }) => {
            assert!(e.to_string().contains("already running"), "{e}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another source is not blocked.
    assert_eq!(
        resync(store, &settings, SourceKind::Hint).await.outcome,
        ResyncOutcome::Completed
    );
    // A crashed run's lease expires.
    let later = now + 61_000;
    assert!(store
        .claim_resync(SourceKind::Healthie, "third", later, later + 1_000)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .claim_resync(SourceKind::Healthie, "fourth", later, later + 1_000)
        .await
        .unwrap()
        .is_none());
    store
        .release_resync(SourceKind::Healthie, "third")
        .await
        .unwrap();
    let done = resync(store, &settings, SourceKind::Healthie).await;
    assert_eq!(done.outcome, ResyncOutcome::Completed);
    let run = store
        .load_resync_run(SourceKind::Healthie)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.owner, None, "the lease is handed back");
}

on_both_backends!(
    resync_creates_then_updates,
    dry_run_writes_nothing,
    missing_records_are_deleted_only_after_the_grace,
    one_resync_per_source_at_a_time,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_pass_resumes_and_restart_starts_a_new_one() {
    let db = database(Db::Sqlite).await;
    let sandbox = start_sandbox(30, 8, Default::default()).await;
    let settings = settings(&db.url, &sandbox, &[]);
    let store = db.store.as_ref();
    let stop = CancellationToken::new();
    stop.cancel();
    let cut = resync_with(store, &settings, SourceKind::Healthie, |_| {}, &stop)
        .await
        .unwrap();
    assert_eq!(
        (cut.outcome, cut.pass),
        (ResyncOutcome::Interrupted, Some(1))
    );
    let run = store
        .load_resync_run(SourceKind::Healthie)
        .await
        .unwrap()
        .unwrap();
    assert!(run.in_progress && run.owner.is_none());

    let resumed = resync(store, &settings, SourceKind::Healthie).await;
    assert!(resumed.resumed);
    assert_eq!(resumed.pass, Some(1));
    assert_eq!(resumed.outcome, ResyncOutcome::Completed);

    let cut = resync_with(store, &settings, SourceKind::Healthie, |_| {}, &stop)
        .await
        .unwrap();
    assert_eq!(cut.pass, Some(2));
    let restarted = resync_with(
        store,
        &settings,
        SourceKind::Healthie,
        |o| o.restart = true,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(!restarted.resumed);
    assert_eq!(restarted.pass, Some(3));
    assert_eq!(restarted.unchanged, healthie_ids(&sandbox).len() as u64);
}

/// A sandbox whose Healthie fake allows `per_second` requests with a burst of `per_second`.
async fn limited_sandbox(people: usize, per_second: u32) -> SandboxHandle {
    Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people,
            seed: 9,
            ..Default::default()
        },
        healthie: HealthieConfig {
            rate_limit: Some(RateLimit {
                requests_per_second: f64::from(per_second),
                burst: per_second,
            }),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .expect("sandbox starts")
}

fn resync_command(db_url: &str, sandbox: &SandboxHandle, per_second: u32) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["resync", "--source", "healthie"])
        .env("PATIENT_SYNC_DATABASE__URL", db_url)
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_URL",
            sandbox.healthie_url(),
        )
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
            HealthieConfig::default().api_key,
        )
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__REQUESTS_PER_SECOND",
            per_second.to_string(),
        )
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__BURST", "1")
        .env("PATIENT_SYNC_RESYNC__LEASE_SECS", "1")
        .env("PATIENT_SYNC_LOG__LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Canonical content per Healthie user, without ids and timestamps.
async fn table(store: &dyn Store, ids: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for id in ids {
        let link = store
            .load_link(&SourceKey::new(SourceKind::Healthie, id.as_str()))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("user {id} has no canonical patient"));
        let p = store.load_patient(&link.patient_id).await.unwrap().unwrap();
        let linked: Vec<String> = store
            .load_patient_links(&link.patient_id)
            .await
            .unwrap()
            .iter()
            .map(|l| l.key.to_string())
            .collect();
        out.insert(
            id.clone(),
            format!(
                "{:?}|{:?}|{:?}|{:?}|{:?}|{}|{}|{}",
                p.given_name,
                p.family_name,
                p.birth_date,
                p.email,
                p.phone,
                p.status,
                p.version,
                linked.join(",")
            ),
        );
    }
    out
}

async fn checkpoint(store: &dyn Store) -> Option<String> {
    let state = store
        .load_sync_state(SourceKind::Healthie, "resync:active")
        .await
        .ok()??;
    Some(format!("{:?}{:?}", state.checkpoint, state.cursor))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_killed_at_random_pages_ends_like_an_uninterrupted_one() {
    const RATE: u32 = 20;
    let sandbox = limited_sandbox(700, RATE).await;
    let ids = healthie_ids(&sandbox);
    assert!(ids.len() > 400, "several pages ({})", ids.len());

    // The reference: one uninterrupted run.
    let reference_db = database(Db::Sqlite).await;
    let out = resync_command(&reference_db.url, &sandbox, RATE)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let expected = table(reference_db.store.as_ref(), &ids).await;

    // Killed with SIGKILL after a random number of pages, again and again, then resumed.
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("killed.sqlite").display());
    let observer = store::connect(&db_url, 2).await.unwrap();
    observer.migrate().await.unwrap();
    let mut kills = 0;
    let mut rng = rand::thread_rng();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(Instant::now() < deadline, "resync never completed");
        let mut child = resync_command(&db_url, &sandbox, RATE).spawn().unwrap();
        let pages_before_kill = rng.gen_range(1..=3);
        let mut seen = checkpoint(observer.as_ref()).await;
        let mut pages = 0;
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            let now = checkpoint(observer.as_ref()).await;
            if now != seen {
                seen = now;
                pages += 1;
                if pages >= pages_before_kill && kills < 4 {
                    break None;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        match finished {
            Some(status) => match status.code() {
                Some(0) => break,
                // A killed run's lease is still held: wait for it to expire.
                Some(code) if code == i32::from(EXIT_BUSY) => {
                    tokio::time::sleep(Duration::from_millis(300)).await
                }
                other => panic!("resync exited with {other:?}"),
            },
            None => {
                child.kill().expect("SIGKILL");
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    assert!(kills >= 1, "at least one run was killed mid-pass");
    let got = table(observer.as_ref(), &ids).await;
    assert_eq!(got, expected, "same table as the uninterrupted run");
    let deleted = observer
        .count_patients()
        .await
        .unwrap()
        .into_iter()
        .find(|(status, _)| status == "deleted");
    assert_eq!(deleted, None, "an interrupted resync deletes nobody");
    let run = observer
        .load_resync_run(SourceKind::Healthie)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((run.pass, run.completed_pass), (1, 1), "one pass, resumed");
    assert_eq!(
        sandbox.healthie_counters().snapshot().rate_limited,
        0,
        "no request over the sandbox's limit"
    );

    // While a run holds the lease, a second one is refused at once with code 4.
    let now = now_ms();
    observer
        .claim_resync(SourceKind::Healthie, "elsewhere", now, now + 60_000)
        .await
        .unwrap()
        .unwrap();
    let out = resync_command(&db_url, &sandbox, RATE).output().unwrap();
    assert_eq!(out.status.code(), Some(i32::from(EXIT_BUSY)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_intakeq_budget_stops_the_resync_and_the_next_run_resumes() {
    let db = database(Db::Sqlite).await;
    let sandbox = start_sandbox(300, 10, Default::default()).await;
    let clients = sandbox.intakeq().clients().len() as u64;
    assert!(clients > 100, "two pages at least ({clients})");
    let intakeq_url = sandbox.intakeq_url();
    let intakeq = |per_day: &'static str| {
        settings(
            &db.url,
            &sandbox,
            &[
                ("PATIENT_SYNC_SOURCES__INTAKEQ__ENABLED", "true"),
                (
                    "PATIENT_SYNC_SOURCES__INTAKEQ__BASE_URL",
                    intakeq_url.as_str(),
                ),
                (
                    "PATIENT_SYNC_SOURCES__INTAKEQ__API_KEY",
                    patient_sync::sandbox::INTAKEQ_API_KEY,
                ),
                ("PATIENT_SYNC_SOURCES__INTAKEQ__REQUESTS_PER_MINUTE", "6000"),
                ("PATIENT_SYNC_SOURCES__INTAKEQ__REQUESTS_PER_DAY", per_day),
                ("PATIENT_SYNC_RESYNC__DAILY_BUDGET_RESERVE", "50"),
            ],
        )
    };
    let store = db.store.as_ref();
    // 51 a day with 50 kept in reserve: one page, then the resync stops.
    let first = resync(store, &intakeq("51"), SourceKind::Intakeq).await;
    assert_eq!(first.outcome, ResyncOutcome::BudgetExhausted, "{first:?}");
    assert_eq!((first.pages, first.created), (1, 100));
    let state = store
        .load_sync_state(SourceKind::Intakeq, "resync:clients")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.checkpoint.as_deref(), Some("2"));

    // With budget again (the next day), it resumes at page 2.
    let second = resync(store, &intakeq("500"), SourceKind::Intakeq).await;
    assert_eq!(second.outcome, ResyncOutcome::Completed, "{second:?}");
    assert!(second.resumed);
    assert_eq!(second.created, clients - 100);
    assert_eq!(second.missing, 0);
    assert_eq!(sandbox.intakeq().counters().rate_limited, 0);
}
