//! `patient_history`: every version of a canonical row with its validity range, written with the
//! row by every write path (apply, admin, rebuild), on SQLite and Postgres alike.

use chrono::{DateTime, Duration, TimeZone, Utc};
use patient_sync::config::Settings;
use patient_sync::model::{PatientId, PersonFields, SourceKey, SourceKind};
use patient_sync::sandbox::webhooks::HealthieEnvelope;
use patient_sync::store::{PatientRow, PatientVersion, Store};
use patient_sync::sync::rebuild::{rebuild, RebuildOptions};

use crate::app::spawn_app;
use crate::helpers::{database, Db};

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).unwrap()
}

fn row(id: &str, version: i64, given: &str, updated: DateTime<Utc>) -> PatientRow {
    PatientRow {
        patient_id: PatientId(id.into()),
        given_name: Some(given.into()),
        status: "active".into(),
        first_seen_at: at(0),
        updated_at: updated,
        version,
        ..Default::default()
    }
}

async fn save(store: &dyn Store, row: &PatientRow) {
    let mut tx = store.begin().await.unwrap();
    tx.save_patient(row, &[]).await.unwrap();
    tx.commit().await.unwrap();
}

async fn as_of(store: &dyn Store, t: DateTime<Utc>) -> Vec<(String, i64, Option<String>)> {
    let mut out = Vec::new();
    let mut after: Option<PatientId> = None;
    loop {
        // Pages of one, so paging itself is exercised.
        let page = store
            .load_patients_as_of_page(t, after.as_ref(), 1)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.row.patient_id.clone());
        out.extend(page.into_iter().map(|v| {
            (
                v.row.patient_id.0.clone(),
                v.row.version,
                v.row.given_name.clone(),
            )
        }));
    }
    out
}

/// Versions 1..=n, each ending where the next begins, only the last one open, and the open one
/// equal to the `patients` row.
fn assert_chained(history: &[PatientVersion], current: &PatientRow) {
    assert!(!history.is_empty(), "{} has history", current.patient_id);
    for (i, v) in history.iter().enumerate() {
        assert_eq!(v.row.version, i as i64 + 1, "versions 1..=n without holes");
        match history.get(i + 1) {
            Some(next) => {
                assert_eq!(v.valid_to, Some(next.valid_from), "no gap, no overlap");
                assert!(v.valid_from <= next.valid_from, "ranges move forward");
            }
            None => assert_eq!(v.valid_to, None, "the last version is the current one"),
        }
    }
    assert_eq!(&history.last().unwrap().row, current);
}

async fn versions_accumulate_and_chain_and_answer_as_of_queries(db: Db) {
    let db = database(db).await;
    let s = db.store.as_ref();
    save(s, &row("a", 1, "Ann", at(10))).await;
    save(s, &row("a", 2, "Anne", at(20))).await;
    save(s, &row("b", 1, "Bo", at(20))).await;
    save(s, &row("a", 3, "Annie", at(30))).await;
    // A clock that went backwards: the new version still starts after the one it replaces.
    save(s, &row("b", 2, "Bob", at(15))).await;
    // Saving the same version again rewrites it in place, no new version.
    save(s, &row("a", 3, "Annie", at(30))).await;

    let a = s
        .load_patient_history(&PatientId("a".into()))
        .await
        .unwrap();
    let names: Vec<_> = a
        .iter()
        .map(|v| v.row.given_name.clone().unwrap())
        .collect();
    assert_eq!(names, ["Ann", "Anne", "Annie"]);
    assert_eq!(a[0].valid_from, at(10));
    assert_eq!(a[1].valid_from, at(20));
    assert_eq!(a[2].valid_from, at(30));
    let current_a = s
        .load_patient(&PatientId("a".into()))
        .await
        .unwrap()
        .unwrap();
    assert_chained(&a, &current_a);
    let b = s
        .load_patient_history(&PatientId("b".into()))
        .await
        .unwrap();
    assert_eq!(
        b[1].valid_from,
        at(20),
        "never before the version it replaces"
    );
    let current_b = s
        .load_patient(&PatientId("b".into()))
        .await
        .unwrap()
        .unwrap();
    assert_chained(&b, &current_b);

    assert!(as_of(s, at(5)).await.is_empty(), "nothing existed yet");
    assert_eq!(
        as_of(s, at(10)).await,
        [("a".into(), 1, Some("Ann".into()))]
    );
    assert_eq!(
        as_of(s, at(25)).await,
        [
            ("a".into(), 2, Some("Anne".into())),
            ("b".into(), 2, Some("Bob".into()))
        ],
        "b's first version was replaced at the instant it began"
    );
    assert_eq!(
        as_of(s, at(30)).await,
        [
            ("a".into(), 3, Some("Annie".into())),
            ("b".into(), 2, Some("Bob".into()))
        ],
        "valid_from is inclusive, valid_to exclusive"
    );
}

async fn every_write_path_records_history(db: Db) {
    let app = spawn_app(db, 30).await;
    let store = app.store.as_ref();
    let identity = Settings::load_from(None, &[])
        .unwrap()
        .identity
        .to_identity_settings();

    // Worker path.
    let ids = app.healthie_ids(8).await;
    let sender = app.sender();
    for id in &ids {
        let status = sender
            .send(&HealthieEnvelope::patient("patient.created", id, vec![]))
            .await
            .unwrap();
        assert_eq!(status, 202);
    }
    let summary = app.worker.drain().await.unwrap();
    assert_eq!(summary.dead, 0);

    // Admin path: move one record onto another patient; its old patient becomes merged.
    let moved = SourceKey::new(SourceKind::Healthie, ids[0].as_str());
    let before = app.patient_of(SourceKind::Healthie, &ids[0]).await.unwrap();
    let target = app.patient_of(SourceKind::Healthie, &ids[2]).await.unwrap();
    assert_ne!(before.patient_id, target.patient_id);
    patient_sync::sync::admin::link_record(
        store,
        &moved,
        &target.patient_id,
        &identity,
        Utc::now(),
    )
    .await
    .unwrap();
    let old = store
        .load_patient(&before.patient_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.status, "merged");
    assert_eq!(
        old.version,
        before.version + 1,
        "the old patient has a new version"
    );

    // Rebuild path: a newer snapshot stored without applying it; rebuild recomputes the row.
    let key = SourceKey::new(SourceKind::Healthie, ids[1].as_str());
    let mut record = store.load_source_record(&key).await.unwrap().unwrap();
    record.fields = PersonFields {
        given_name: Some("Rebuilt".into()),
        ..record.fields.clone()
    };
    record.source_updated_at = Some(Utc::now() + Duration::seconds(1));
    record.fetched_at = Utc::now();
    let mut tx = store.begin().await.unwrap();
    tx.save_source_record(&record).await.unwrap();
    tx.commit().await.unwrap();
    let patient = app.patient_of(SourceKind::Healthie, &ids[1]).await.unwrap();
    let report = rebuild(store, &identity, &RebuildOptions::default(), Utc::now())
        .await
        .unwrap();
    assert!(report.patients_updated >= 1, "{report:?}");
    let rebuilt = store
        .load_patient(&patient.patient_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rebuilt.given_name.as_deref(), Some("Rebuilt"));
    assert_eq!(rebuilt.version, patient.version + 1);
    let history = store
        .load_patient_history(&patient.patient_id)
        .await
        .unwrap();
    assert_ne!(
        history[history.len() - 2].row.given_name.as_deref(),
        Some("Rebuilt"),
        "the version before the rebuild keeps its old value"
    );

    // Every canonical row has a full, chained history.
    let mut after_id: Option<PatientId> = None;
    let mut seen = 0;
    loop {
        let page = store
            .load_patients_page(after_id.as_ref(), 100)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after_id = Some(last.patient_id.clone());
        for p in &page {
            let history = store.load_patient_history(&p.patient_id).await.unwrap();
            assert_chained(&history, p);
            seen += 1;
        }
    }
    assert!(seen >= 8, "{seen} patients");
}

crate::on_both_backends!(
    versions_accumulate_and_chain_and_answer_as_of_queries,
    every_write_path_records_history,
);
