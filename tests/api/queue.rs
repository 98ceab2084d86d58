//! Queue economy and safety: claim-time coalescing of events for one resource, batching of
//! Healthie refetches, concurrent workers losing nothing, and per-patient serialization.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use patient_sync::app::build_sources;
use patient_sync::metrics::Metrics;
use patient_sync::model::{PersonFields, RecordStatus, SourceKey, SourceKind, SourceRecord};
use patient_sync::sandbox::webhooks::HealthieEnvelope;
use patient_sync::store::{InboxState, NewInboxItem, Origin, PatientRow, Store};
use patient_sync::sync::apply::{apply_record, IdentitySettings};
use patient_sync::sync::worker::Worker;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::app::{settings_for, spawn_app, TestApp};
use crate::helpers::{database, Db};

/// Ids of active Healthie patients (the fake's `users` lists active ones unless asked).
fn active_ids(app: &TestApp, n: usize) -> Vec<String> {
    let pop = app.sandbox().population().read().unwrap();
    pop.healthie_users()
        .filter(|u| u["active"].as_bool() == Some(true))
        .filter_map(|u| u["id"].as_str().map(str::to_string))
        .take(n)
        .collect()
}

fn graphql_requests(app: &TestApp) -> u64 {
    app.sandbox()
        .healthie_counters()
        .requests
        .load(Ordering::Relaxed)
}

/// Another worker process's worth: its own sources (and limiters) over the app's database.
fn another_worker(app: &TestApp, extra: &[(&str, &str)]) -> Worker {
    let settings = settings_for(&app._db.url, &app.sandbox().healthie_url(), extra);
    let metrics = Arc::new(Metrics::new());
    Worker::new(
        app.store.clone(),
        build_sources(&settings, &metrics),
        settings.worker.clone(),
        Arc::new(settings.identity.to_identity_settings()),
        metrics,
    )
}

async fn state_counts(store: &dyn Store) -> HashMap<InboxState, i64> {
    let mut counts = HashMap::new();
    for c in store.inbox_counts().await.unwrap() {
        *counts.entry(c.state).or_insert(0) += c.count;
    }
    counts
}

/// Sends `copies` webhooks per id (patient and location events), shuffled.
async fn send_bursts(app: &TestApp, ids: &[String], copies: usize, seed: u64) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut envelopes = Vec::new();
    for id in ids {
        for c in 0..copies {
            envelopes.push(match c % 3 {
                0 => HealthieEnvelope::patient("patient.updated", id, vec!["email".into()]),
                1 => HealthieEnvelope::patient("patient.created", id, vec![]),
                _ => HealthieEnvelope::location("location.updated", "777", id),
            });
        }
    }
    envelopes.shuffle(&mut rng);
    let sender = app.sender();
    for e in &envelopes {
        assert_eq!(sender.send(e).await.unwrap(), 202);
    }
    envelopes.len()
}

async fn many_webhooks_for_few_patients_become_one_batched_fetch(db: Db) {
    let app = spawn_app(db, 40).await;
    let ids = active_ids(&app, 20);
    assert_eq!(ids.len(), 20);
    let sent = send_bursts(&app, &ids, 4, 7).await;
    let before = graphql_requests(&app);
    // One batch: 50 claimed, the other items of their patients claimed with them.
    let summary = app.worker.run_once().await.unwrap();
    assert_eq!(
        summary.claimed, sent as u64,
        "every item of the claimed patients"
    );
    assert_eq!(
        (summary.done, summary.dead, summary.retried),
        (sent as u64, 0, 0)
    );
    assert_eq!(
        graphql_requests(&app) - before,
        1,
        "20 patients, 80 events: one users(ids:) request"
    );
    assert_eq!(app.worker.drain().await.unwrap().claimed, 0);
    for id in &ids {
        assert!(app.patient_of(SourceKind::Healthie, id).await.is_some());
    }
    let counts = state_counts(app.store.as_ref()).await;
    assert_eq!(counts.get(&InboxState::Done), Some(&(sent as i64)));
}

fn item(source: SourceKind, resource: &str, received_at_ms: i64) -> NewInboxItem {
    NewInboxItem {
        source,
        origin: Origin::Webhook,
        event_type: "patient.updated".into(),
        resource_type: Some("User".into()),
        resource_id: Some(resource.into()),
        body: format!(r#"{{"resource_id":"{resource}","event_type":"patient.updated"}}"#),
        dedupe_key: None,
        received_at_ms,
        ignore_reason: None,
    }
}

async fn claiming_a_resource_takes_its_other_pending_items_only(db: Db) {
    let t = database(db).await;
    let store = t.store.clone();
    let now = 1_700_000_000_000i64;
    let lease = Duration::from_secs(60);
    let insert = |i: NewInboxItem| {
        let store = store.clone();
        async move {
            match store.insert_inbox(&i).await.unwrap() {
                patient_sync::store::InsertOutcome::Inserted(id) => id,
                other => panic!("{other:?}"),
            }
        }
    };
    let a1 = insert(item(SourceKind::Healthie, "1", now - 10)).await;
    let b = insert(item(SourceKind::Healthie, "2", now - 5)).await;
    // Due later (a snoozed retry, say): one fetch now answers it as well.
    let a2 = insert(item(SourceKind::Healthie, "1", now + 60_000)).await;
    let a3 = insert(item(SourceKind::Healthie, "1", now - 1)).await;
    let other_source = insert(item(SourceKind::Hint, "1", now - 1)).await;

    let first = store.claim_inbox("w1", 1, lease, now).await.unwrap();
    assert_eq!(first.iter().map(|i| i.id).collect::<Vec<_>>(), vec![a1]);
    let siblings = store
        .claim_inbox_resources("w1", SourceKind::Healthie, &["1".into()], lease, now)
        .await
        .unwrap();
    let mut got: Vec<_> = siblings.iter().map(|i| i.id).collect();
    got.sort();
    assert_eq!(
        got,
        vec![a2, a3],
        "same source and resource, pending, not a1 again"
    );
    assert!(siblings
        .iter()
        .all(|i| i.state == InboxState::Leased && i.attempts == 1));
    // Another worker finds nothing more for resource 1, and b and the Hint item untouched.
    let none = store
        .claim_inbox_resources("w2", SourceKind::Healthie, &["1".into()], lease, now)
        .await
        .unwrap();
    assert!(none.is_empty());
    for id in [b, other_source] {
        let i = store.load_inbox_item(id).await.unwrap().unwrap();
        assert_eq!(i.state, InboxState::Pending);
    }
    // Expired leases are claimable again.
    let later = now + lease.as_millis() as i64 + 1;
    let rescued = store
        .claim_inbox_resources(
            "w2",
            SourceKind::Healthie,
            &["1".into(), "2".into()],
            lease,
            later,
        )
        .await
        .unwrap();
    assert_eq!(rescued.len(), 4);
    // The first owner lost its leases and cannot finish them.
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        tx.finish_inbox(&[a1, a2, a3], "w1", None, later)
            .await
            .unwrap(),
        0
    );
    drop(tx);
}

async fn concurrent_workers_leave_no_item_lost_or_stuck(db: Db) {
    let app = spawn_app(db, 60).await;
    let ids = active_ids(&app, 40);
    let mut rng = StdRng::seed_from_u64(3);
    let mut sent = 0;
    let mut touched = BTreeSet::new();
    // Three waves with workers draining in between and at the end.
    for wave in 0..3u64 {
        let wave_ids: Vec<String> = ids
            .choose_multiple(&mut rng, 30)
            .cloned()
            .collect::<Vec<_>>();
        touched.extend(wave_ids.iter().cloned());
        let copies = rng.gen_range(2..5);
        sent += send_bursts(&app, &wave_ids, copies, wave).await;
        let workers: Vec<Worker> = (0..4)
            .map(|_| another_worker(&app, &[("PATIENT_SYNC_WORKER__BATCH_SIZE", "7")]))
            .collect();
        let results =
            futures::future::join_all(workers.iter().map(|w| async { w.drain().await })).await;
        for r in results {
            let s = r.unwrap();
            assert_eq!((s.dead, s.retried), (0, 0));
        }
    }
    // A worker that started late sees nothing due.
    assert_eq!(app.worker.drain().await.unwrap().claimed, 0);
    let counts = state_counts(app.store.as_ref()).await;
    assert_eq!(
        counts.get(&InboxState::Done),
        Some(&(sent as i64)),
        "{counts:?}"
    );
    assert_eq!(app.inbox_total().await, sent as i64, "{counts:?}");
    for id in &touched {
        let row = app
            .patient_of(SourceKind::Healthie, id)
            .await
            .expect("a row");
        assert_eq!(row.healthie_id.as_deref(), Some(id.as_str()));
    }
}

/// A snapshot of one of the three records of the same person; `n` changes the field this
/// record wins in the golden row (Healthie: phone; Hint: gender identity; IntakeQ: middle name).
fn snapshot(source: SourceKind, n: u32) -> SourceRecord {
    let mut fields = PersonFields {
        given_name: Some("Serena".into()),
        family_name: Some("Lockwood".into()),
        birth_date: chrono::NaiveDate::from_ymd_opt(1984, 2, 29),
        sex: Some("female".into()),
        email: Some("serena.lockwood@example.test".into()),
        ..Default::default()
    };
    match source {
        SourceKind::Healthie => fields.phones = vec![format!("+1415555{:04}", n)],
        SourceKind::Hint => fields.gender_identity = Some(format!("identity-{n}")),
        SourceKind::Intakeq => fields.middle_name = Some(format!("M{n}")),
    }
    let at =
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(n.into());
    SourceRecord {
        key: SourceKey::new(source, format!("{}-1", source.as_str())),
        fields,
        status: RecordStatus::Active,
        merged_into: None,
        source_updated_at: Some(at),
        fetched_at: at,
        raw: serde_json::json!({}),
    }
}

const SOURCES: [SourceKind; 3] = [SourceKind::Healthie, SourceKind::Hint, SourceKind::Intakeq];

/// Applies one snapshot in its own transaction; returns the patient's version it committed.
async fn apply_one(store: &dyn Store, record: &SourceRecord, identity: &IdentitySettings) -> i64 {
    loop {
        let mut tx = store.begin().await.unwrap();
        let applied = match apply_record(tx.as_mut(), record, identity, Utc::now()).await {
            Ok(a) => a,
            Err(e) if e.is_retryable() => continue,
            Err(e) => panic!("{e}"),
        };
        let patient = applied.patient_id.expect("linked");
        let version = tx.load_patient(&patient).await.unwrap().unwrap().version;
        match tx.commit().await {
            Ok(()) => return version,
            Err(e) if e.is_retryable() => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

/// The golden row with its identity and bookkeeping columns blanked, for comparing runs.
fn values(row: &PatientRow) -> PatientRow {
    PatientRow {
        patient_id: Default::default(),
        first_seen_at: Default::default(),
        updated_at: Default::default(),
        version: 0,
        ..row.clone()
    }
}

async fn concurrent_updates_of_one_patient_are_serialized(db: Db) {
    const ROUNDS: u32 = 12;
    let identity = IdentitySettings::default();
    let run = |concurrent: bool| {
        let identity = identity.clone();
        async move {
            let t = database(db).await;
            // Link the three records to one patient first.
            for source in SOURCES {
                apply_one(t.store.as_ref(), &snapshot(source, 0), &identity).await;
            }
            let key = |s: SourceKind| SourceKey::new(s, format!("{}-1", s.as_str()));
            let patient = t
                .store
                .load_link(&key(SourceKind::Healthie))
                .await
                .unwrap()
                .unwrap()
                .patient_id;
            for s in SOURCES {
                let link = t.store.load_link(&key(s)).await.unwrap().unwrap();
                assert_eq!(link.patient_id, patient, "{s}");
            }
            let start = t
                .store
                .load_patient(&patient)
                .await
                .unwrap()
                .unwrap()
                .version;
            let mut versions: Vec<i64> = Vec::new();
            if concurrent {
                let tasks = SOURCES.map(|source| {
                    let (store, identity) = (t.store.clone(), identity.clone());
                    tokio::spawn(async move {
                        let mut seen = Vec::new();
                        for n in 1..=ROUNDS {
                            seen.push(
                                apply_one(store.as_ref(), &snapshot(source, n), &identity).await,
                            );
                        }
                        seen
                    })
                });
                for task in tasks {
                    versions.extend(task.await.unwrap());
                }
            } else {
                for n in 1..=ROUNDS {
                    for source in SOURCES {
                        versions.push(
                            apply_one(t.store.as_ref(), &snapshot(source, n), &identity).await,
                        );
                    }
                }
            }
            let row = t.store.load_patient(&patient).await.unwrap().unwrap();
            (start, versions, row, t)
        }
    };
    let (_, _, serial_row, _serial_db) = run(false).await;
    let (start, mut versions, row, _db) = run(true).await;
    versions.sort();
    let expected: Vec<i64> = (start + 1..=start + i64::from(ROUNDS) * 3).collect();
    assert_eq!(versions, expected, "every change got its own next version");
    assert_eq!(row.version, start + i64::from(ROUNDS) * 3);
    assert_eq!(
        values(&row),
        values(&serial_row),
        "same row as a serial run"
    );
}

async fn filling_a_batch_stops_when_the_queue_yields_other_sources_only(db: Db) {
    let app = spawn_app(db, 10).await;
    let id = active_ids(&app, 1).remove(0);
    let now = patient_sync::store::now_ms();
    app.store
        .insert_inbox(&item(SourceKind::Healthie, &id, now - 1_000))
        .await
        .unwrap();
    for i in 0..400 {
        app.store
            .insert_inbox(&item(SourceKind::Intakeq, &i.to_string(), now - 500))
            .await
            .unwrap();
    }
    // Claim 1: the Healthie item and 49 others; claim 2 finds no Healthie item, so it stops
    // there rather than claiming everything in search of a fuller batch.
    let summary = app.worker.run_once().await.unwrap();
    assert_eq!(summary.claimed, 100);
    assert_eq!(summary.done, 1);
    let total = app.worker.drain().await.unwrap();
    assert_eq!(total.claimed, 301);
}

crate::on_both_backends!(
    filling_a_batch_stops_when_the_queue_yields_other_sources_only,
    many_webhooks_for_few_patients_become_one_batched_fetch,
    claiming_a_resource_takes_its_other_pending_items_only,
    concurrent_workers_leave_no_item_lost_or_stuck,
    concurrent_updates_of_one_patient_are_serialized,
);
