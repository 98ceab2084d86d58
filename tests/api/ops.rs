//! The operator's view through the binary: `sync` from cron twice on an empty database, and
//! every figure of `status --json`.

use std::process::{Command, Output};

use chrono::{Duration, Utc};
use patient_sync::model::{PatientId, SourceKey, SourceKind};
use patient_sync::sandbox::healthie::Faults;
use patient_sync::store::{NewInboxItem, Origin, PatientRow, Store, SyncState};

use crate::app::{start_sandbox, three_source_env};

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

async fn run(args: &[&str], env: &[(String, String)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env = env.to_vec();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PATIENT_SYNC_LOG__LEVEL", "warn")
            .output()
            .expect("run patient-sync")
    })
    .await
    .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

async fn all_patients(store: &dyn Store) -> Vec<PatientRow> {
    let mut rows = Vec::new();
    let mut after: Option<PatientId> = None;
    loop {
        let page = store.load_patients_page(after.as_ref(), 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.patient_id.clone());
        rows.extend(page);
    }
    rows
}

async fn history_versions(store: &dyn Store, rows: &[PatientRow]) -> usize {
    let mut n = 0;
    for r in rows {
        n += store
            .load_patient_history(&r.patient_id)
            .await
            .unwrap()
            .len();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_twice_from_an_empty_database_queues_and_changes_nothing_the_second_time() {
    let sandbox = start_sandbox(40, 21, Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("cron.sqlite").display());
    let env = three_source_env(&sandbox, &db_url);

    let first = run(&["sync"], &env).await;
    assert_eq!(first.status.code(), Some(0), "{}", stdout(&first));
    let store = patient_sync::store::connect(&db_url, 2).await.unwrap();
    let inbox_after_first = store.inbox_counts().await.unwrap();
    let patients_after_first = all_patients(store.as_ref()).await;
    assert!(
        patients_after_first.len() >= 40,
        "the first run filled the table"
    );
    let versions_after_first = history_versions(store.as_ref(), &patients_after_first).await;

    let second = run(&["sync"], &env).await;
    assert_eq!(second.status.code(), Some(0), "{}", stdout(&second));
    let out = stdout(&second);
    for source in ["healthie", "hint", "intakeq"] {
        assert!(
            out.contains(&format!("poll {source}: 0 new items queued")),
            "{out}"
        );
    }
    assert!(out.contains("sync: claimed 0 items"), "{out}");
    assert_eq!(
        store.inbox_counts().await.unwrap(),
        inbox_after_first,
        "nothing new in the inbox"
    );
    let patients_after_second = all_patients(store.as_ref()).await;
    assert_eq!(
        patients_after_second, patients_after_first,
        "no row changed, not even its version or updated_at"
    );
    assert_eq!(
        history_versions(store.as_ref(), &patients_after_second).await,
        versions_after_first,
        "no new history versions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_inbox_reviews_sources_budgets_and_patients() {
    let sandbox = start_sandbox(30, 23, Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("status.sqlite").display());
    let env = three_source_env(&sandbox, &db_url);
    let synced = run(&["sync"], &env).await;
    assert_eq!(synced.status.code(), Some(0), "{}", stdout(&synced));

    // What a sync alone does not produce: an open review, a dead letter, an old pending item,
    // a completed resync and a resync checkpoint.
    let store = patient_sync::store::connect(&db_url, 2).await.unwrap();
    let some_patient = all_patients(store.as_ref()).await.remove(0).patient_id;
    let open_before = store
        .count_reviews()
        .await
        .unwrap()
        .iter()
        .find(|(state, _)| state.as_str() == "open")
        .map_or(0, |(_, n)| *n);
    let mut tx = store.begin().await.unwrap();
    tx.open_review(
        &SourceKey::new(SourceKind::Hint, "pat-review"),
        &some_patient,
        7.5,
        Utc::now(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let item = |id: &str, received_at_ms: i64| NewInboxItem {
        source: SourceKind::Hint,
        origin: Origin::Webhook,
        event_type: "patients.updated".into(),
        resource_type: Some("patient".into()),
        resource_id: Some(id.into()),
        body: "{}".into(),
        dedupe_key: None,
        received_at_ms,
        ignore_reason: None,
    };
    let now_ms = Utc::now().timestamp_millis();
    store.insert_inbox(&item("dead-one", now_ms)).await.unwrap();
    let claimed = store
        .claim_inbox("t", 1, std::time::Duration::from_secs(60), now_ms + 1)
        .await
        .unwrap();
    store
        .dead_inbox(claimed[0].id, "t", "auth", Some(401), now_ms + 2)
        .await
        .unwrap();
    store
        .insert_inbox(&item("waiting", now_ms - 90_000))
        .await
        .unwrap();
    let resync_done = Utc::now() - Duration::hours(3);
    for (stream, last_success_at) in [("resync", Some(resync_done)), ("resync_page", None)] {
        store
            .save_sync_state(&SyncState {
                source: SourceKind::Healthie,
                stream: stream.into(),
                cursor: Some("c".into()),
                checkpoint: None,
                last_success_at,
                updated_at: Utc::now(),
            })
            .await
            .unwrap();
    }

    // Another process sharing the key spends three more of IntakeQ's daily allowance (a
    // window end before the stored one counts in the stored window).
    let day_key = patient_sync::sources::shared_limit::daily_key(SourceKind::Intakeq);
    let (_, used_by_sync) = store.read_rate_budget(&day_key).await.unwrap().unwrap();
    let mut shared_used = 0;
    for _ in 0..3 {
        shared_used = store
            .take_rate_budget(&day_key, Utc::now().timestamp_micros(), 1_000_000, 0)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(shared_used, used_by_sync + 3);

    let out = run(&["status", "--json"], &env).await;
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let by_state = &s["inbox_by_state"];
    assert_eq!(by_state["pending"], 1);
    assert_eq!(by_state["dead"], 1);
    assert_eq!(by_state["leased"], 0);
    assert!(by_state["done"].as_i64().unwrap() >= 30, "{by_state}");
    let hint_dead = s["inbox"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["source"] == "hint" && c["state"] == "dead")
        .expect("counts by source and state");
    assert_eq!(hint_dead["count"], 1);
    assert_eq!(s["dead_letters"], 1);
    let age = s["oldest_pending_age_secs"].as_f64().unwrap();
    assert!((90.0..3_600.0).contains(&age), "{age}");
    assert_eq!(s["review_queue"], open_before + 1);
    assert_eq!(s["reviews"]["open"], open_before + 1);
    assert_eq!(s["reviews"]["rejected"], 0);

    let total: i64 = s["patients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_i64().unwrap())
        .sum();
    assert_eq!(s["patients_total"], total);
    assert!(total >= 30);

    let source = |name: &str| {
        s["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["source"] == name)
            .unwrap()
            .clone()
    };
    let healthie = source("healthie");
    assert_eq!(healthie["enabled"], true);
    assert!(healthie["last_poll_at"].is_string());
    let streams: Vec<&str> = healthie["poll_streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["stream"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["active", "archived"], "resync rows are not polls");
    let resync_at: chrono::DateTime<Utc> = healthie["last_resync_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((resync_at - resync_done).num_milliseconds().abs() < 1_000);
    assert_eq!(healthie["rate"]["requests_per_second"], 500);
    assert!(healthie["rate"]["daily_left"].is_null());

    let intakeq = source("intakeq");
    assert!(intakeq["last_poll_at"].is_string());
    assert!(intakeq["last_resync_at"].is_null());
    assert_eq!(intakeq["rate"]["requests_per_minute"], 6000);
    let budget = &s["budgets"][0];
    assert_eq!(budget[0], "intakeq");
    let used = budget[1]["used"].as_u64().unwrap();
    assert!(used >= 2);
    assert_eq!(used, shared_used as u64, "the count every process shares");
    assert_eq!(
        intakeq["rate"]["daily_left"].as_u64().unwrap(),
        intakeq["rate"]["requests_per_day"].as_u64().unwrap() - used
    );
    let hint = source("hint");
    assert!(hint["last_poll_at"].is_string());
    assert!(hint["rate"]["requests_per_second"].as_u64().unwrap() > 0);

    let text = stdout(&run(&["status"], &env).await);
    assert!(
        text.contains(&format!("review queue: {} open", open_before + 1)),
        "{text}"
    );
    assert!(text.contains("dead letters: 1"), "{text}");
    assert!(text.contains("left today"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_the_healthie_safety_sweep_on_its_own_interval() {
    use patient_sync::sandbox::INTAKEQ_API_KEY;
    let sandbox = start_sandbox(10, 25, Faults::default()).await;
    let db = crate::helpers::database(crate::helpers::Db::Sqlite).await;
    let intakeq_url = sandbox.intakeq_url();
    let settings = crate::app::settings_for(
        &db.url,
        &sandbox.healthie_url(),
        &[
            ("PATIENT_SYNC_POLL__INTERVAL_SECS", "0"),
            ("PATIENT_SYNC_POLL__HEALTHIE_SWEEP_INTERVAL_SECS", "1"),
            ("PATIENT_SYNC_SOURCES__INTAKEQ__ENABLED", "true"),
            ("PATIENT_SYNC_SOURCES__INTAKEQ__BASE_URL", &intakeq_url),
            ("PATIENT_SYNC_SOURCES__INTAKEQ__API_KEY", INTAKEQ_API_KEY),
        ],
    );
    let app = patient_sync::app::Application::build(settings)
        .await
        .unwrap();
    let store = app.store();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    // Two completed sweeps (a second one shows it repeats), within a generous deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut first_pass = None;
    loop {
        let states = store.list_sync_states().await.unwrap();
        let active = states
            .iter()
            .find(|s| s.source == SourceKind::Healthie && s.stream == "active")
            .and_then(|s| s.last_success_at);
        match (first_pass, active) {
            (None, Some(t)) => first_pass = Some(t),
            (Some(first), Some(t)) if t > first => break,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no repeated Healthie sweep"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let states = store.list_sync_states().await.unwrap();
    assert!(
        states.iter().all(
            |s| s.source != SourceKind::Intakeq || s.stream == patient_sync::app::BUDGET_STREAM
        ),
        "IntakeQ is not polled with poll.interval_secs = 0: {states:?}"
    );
    shutdown.cancel();
    serving.await.unwrap().unwrap();
}
