//! The store scenario suite, run against SQLite and Postgres alike.

use std::time::Duration;

use chrono::{NaiveDate, TimeZone, Utc};
use patient_sync::model::{
    PatientId, PersonFields, RecordStatus, SourceKey, SourceKind, SourceRecord,
};
use patient_sync::store::{
    FieldSource, InboxState, InsertOutcome, NewInboxItem, Origin, PatientRow, RetryAt, SaveOutcome,
};

use crate::helpers::{database, Db};

fn item(resource: &str, dedupe: Option<&str>) -> NewInboxItem {
    NewInboxItem {
        source: SourceKind::Healthie,
        origin: Origin::Webhook,
        event_type: "patient.updated".into(),
        resource_type: Some("User".into()),
        resource_id: Some(resource.into()),
        body: "{}".into(),
        dedupe_key: dedupe.map(str::to_string),
        received_at_ms: 1_000,
        ignore_reason: None,
    }
}

fn record(id: &str, updated_secs: i64, given: &str) -> SourceRecord {
    SourceRecord {
        key: SourceKey::new(SourceKind::Healthie, id),
        fields: PersonFields {
            given_name: Some(given.into()),
            birth_date: NaiveDate::from_ymd_opt(1980, 2, 29),
            ..Default::default()
        },
        status: RecordStatus::Active,
        merged_into: None,
        source_updated_at: Some(Utc.timestamp_opt(updated_secs, 0).unwrap()),
        fetched_at: Utc.timestamp_opt(updated_secs + 5, 0).unwrap(),
        raw: serde_json::json!({"id": id}),
    }
}

async fn claimed_items_are_leased_and_finished_once(db: Db) {
    let db = database(db).await;
    let s = &db.store;
    let InsertOutcome::Inserted(id) = s.insert_inbox(&item("1", None)).await.unwrap() else {
        panic!("inserted")
    };
    let claimed = s
        .claim_inbox("a", 10, Duration::from_secs(60), 2_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempts, 1);
    assert!(s
        .claim_inbox("b", 10, Duration::from_secs(60), 2_000)
        .await
        .unwrap()
        .is_empty());
    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        tx.finish_inbox(&[id], "b", None, 3_000).await.unwrap(),
        0,
        "b holds no lease"
    );
    assert_eq!(tx.finish_inbox(&[id], "a", None, 3_000).await.unwrap(), 1);
    tx.commit().await.unwrap();
    assert_eq!(
        s.load_inbox_item(id).await.unwrap().unwrap().state,
        InboxState::Done
    );
}

async fn an_expired_lease_is_claimed_again_and_the_old_owner_cannot_finish(db: Db) {
    let db = database(db).await;
    let s = &db.store;
    s.insert_inbox(&item("1", None)).await.unwrap();
    let first = s
        .claim_inbox("crashed", 10, Duration::from_secs(1), 2_000)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    let again = s
        .claim_inbox("rescuer", 10, Duration::from_secs(60), 3_001)
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the lease expired at 3000");
    assert_eq!(again[0].attempts, 2);
    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        tx.finish_inbox(&[first[0].id], "crashed", None, 3_002)
            .await
            .unwrap(),
        0
    );
    drop(tx);
    assert!(!s
        .dead_inbox(first[0].id, "crashed", "x", None, 3_003)
        .await
        .unwrap());
}

async fn a_dedupe_key_is_stored_once(db: Db) {
    let db = database(db).await;
    let s = &db.store;
    assert!(matches!(
        s.insert_inbox(&item("1", Some("evt-1"))).await.unwrap(),
        InsertOutcome::Inserted(_)
    ));
    assert_eq!(
        s.insert_inbox(&item("1", Some("evt-1"))).await.unwrap(),
        InsertOutcome::Duplicate
    );
    assert!(matches!(
        s.insert_inbox(&item("1", None)).await.unwrap(),
        InsertOutcome::Inserted(_)
    ));
    assert!(matches!(
        s.insert_inbox(&item("1", None)).await.unwrap(),
        InsertOutcome::Inserted(_)
    ));
    let total: i64 = s
        .inbox_counts()
        .await
        .unwrap()
        .iter()
        .map(|c| c.count)
        .sum();
    assert_eq!(total, 3);
}

async fn ignored_items_are_recorded_with_their_reason(db: Db) {
    let db = database(db).await;
    let s = &db.store;
    let mut it = item("1", None);
    it.ignore_reason = Some("test event".into());
    let InsertOutcome::Inserted(id) = s.insert_inbox(&it).await.unwrap() else {
        panic!()
    };
    let stored = s.load_inbox_item(id).await.unwrap().unwrap();
    assert_eq!(stored.state, InboxState::Ignored);
    assert_eq!(stored.reason.as_deref(), Some("test event"));
    assert!(s
        .claim_inbox("a", 10, Duration::from_secs(60), 5_000)
        .await
        .unwrap()
        .is_empty());
}

async fn retries_snoozes_dead_letters_and_requeue(db: Db) {
    let db = database(db).await;
    let s = &db.store;
    s.insert_inbox(&item("1", None)).await.unwrap();
    let c = s
        .claim_inbox("a", 1, Duration::from_secs(60), 2_000)
        .await
        .unwrap();
    let snooze = RetryAt {
        available_at_ms: 10_000,
        error_kind: "rate_limited".into(),
        http_status: None,
        count_attempt: false,
    };
    assert!(s.retry_inbox(c[0].id, "a", &snooze).await.unwrap());
    let after = s.load_inbox_item(c[0].id).await.unwrap().unwrap();
    assert_eq!(
        (after.state, after.attempts),
        (InboxState::Pending, 0),
        "a snooze uses no attempt"
    );
    assert!(
        s.claim_inbox("a", 1, Duration::from_secs(60), 9_999)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    let c = s
        .claim_inbox("a", 1, Duration::from_secs(60), 10_000)
        .await
        .unwrap();
    assert!(s
        .dead_inbox(c[0].id, "a", "auth", Some(401), 11_000)
        .await
        .unwrap());
    let dead = s
        .list_inbox(InboxState::Dead, Some(SourceKind::Healthie), None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error_kind.as_deref(), Some("auth"));
    assert_eq!(dead[0].last_http_status, Some(401));
    assert!(s
        .list_inbox(InboxState::Dead, Some(SourceKind::Hint), None, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.requeue_dead(None, None, None, 12_000).await.unwrap(), 1);
    assert_eq!(
        s.claim_inbox("a", 1, Duration::from_secs(60), 12_000)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn older_snapshot_never_overwrites_newer(db: Db) {
    let db = database(db).await;
    let mut tx = db.store.begin().await.unwrap();
    assert_eq!(
        tx.save_source_record(&record("7", 200, "New"))
            .await
            .unwrap(),
        SaveOutcome::Created
    );
    assert_eq!(
        tx.save_source_record(&record("7", 100, "Old"))
            .await
            .unwrap(),
        SaveOutcome::Stale
    );
    assert_eq!(
        tx.save_source_record(&record("7", 200, "New"))
            .await
            .unwrap(),
        SaveOutcome::Unchanged
    );
    assert_eq!(
        tx.save_source_record(&record("7", 300, "Newer"))
            .await
            .unwrap(),
        SaveOutcome::Updated
    );
    tx.commit().await.unwrap();
    let stored = db
        .store
        .load_source_record(&SourceKey::new(SourceKind::Healthie, "7"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.fields.given_name.as_deref(), Some("Newer"));
    assert_eq!(
        stored.fields.birth_date,
        NaiveDate::from_ymd_opt(1980, 2, 29)
    );
    assert_eq!(
        stored.source_updated_at,
        Some(Utc.timestamp_opt(300, 0).unwrap())
    );
}

async fn patient_rows_round_trip_with_typed_columns(db: Db) {
    let db = database(db).await;
    let now = Utc.timestamp_millis_opt(1_700_000_000_123).unwrap();
    let row = PatientRow {
        patient_id: PatientId::generate(),
        given_name: Some("Zoë".into()),
        family_name: Some("O'Brien-Nuñez".into()),
        birth_date: NaiveDate::from_ymd_opt(1990, 12, 31),
        phone: Some("+14155550100".into()),
        healthie_id: Some("42".into()),
        status: "active".into(),
        first_seen_at: now,
        updated_at: now,
        version: 1,
        ..Default::default()
    };
    let provenance = vec![FieldSource {
        field: "given_name".into(),
        key: SourceKey::new(SourceKind::Healthie, "42"),
        source_updated_at: Some(now),
    }];
    let mut tx = db.store.begin().await.unwrap();
    tx.save_patient(&row, &provenance).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        db.store
            .load_patient(&row.patient_id)
            .await
            .unwrap()
            .unwrap(),
        row
    );
    assert_eq!(
        db.store.load_field_sources(&row.patient_id).await.unwrap(),
        provenance
    );
    assert_eq!(
        db.store.count_patients().await.unwrap(),
        vec![("active".to_string(), 1)]
    );
}

async fn a_dropped_transaction_rolls_back(db: Db) {
    let db = database(db).await;
    let mut tx = db.store.begin().await.unwrap();
    tx.save_source_record(&record("9", 1, "A")).await.unwrap();
    drop(tx);
    assert!(db
        .store
        .load_source_record(&SourceKey::new(SourceKind::Healthie, "9"))
        .await
        .unwrap()
        .is_none());
}

async fn a_renewed_lease_is_not_claimed_again_and_only_its_owner_renews(db: Db) {
    let db = database(db).await;
    let s = &db.store;
    s.insert_inbox(&item("1", None)).await.unwrap();
    s.insert_inbox(&item("2", None)).await.unwrap();
    let mine = s
        .claim_inbox("slow", 1, Duration::from_secs(1), 2_000)
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    let other = s
        .claim_inbox("other", 1, Duration::from_secs(1), 2_000)
        .await
        .unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(
        s.renew_leases("slow", 60_000).await.unwrap(),
        1,
        "its own lease only"
    );
    let rescued = s
        .claim_inbox("rescuer", 10, Duration::from_secs(60), 3_001)
        .await
        .unwrap();
    assert_eq!(
        rescued.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![other[0].id],
        "the renewed lease holds past its first expiry; the other expired"
    );
    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        tx.finish_inbox(&[mine[0].id], "slow", None, 3_002)
            .await
            .unwrap(),
        1
    );
    tx.commit().await.unwrap();
    assert_eq!(
        s.renew_leases("slow", 90_000).await.unwrap(),
        0,
        "nothing left to renew"
    );
}

crate::on_both_backends!(
    claimed_items_are_leased_and_finished_once,
    a_renewed_lease_is_not_claimed_again_and_only_its_owner_renews,
    an_expired_lease_is_claimed_again_and_the_old_owner_cannot_finish,
    a_dedupe_key_is_stored_once,
    ignored_items_are_recorded_with_their_reason,
    retries_snoozes_dead_letters_and_requeue,
    older_snapshot_never_overwrites_newer,
    patient_rows_round_trip_with_typed_columns,
    a_dropped_transaction_rolls_back,
);

#[test]
fn migration_file_names_are_identical_on_both_backends() {
    let names = |dir: &str| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let sqlite = names("migrations/sqlite");
    assert!(!sqlite.is_empty());
    assert_eq!(sqlite, names("migrations/postgres"));
}

async fn a_record_merged_upstream_folds_its_patient_into_the_survivors(db: Db) {
    use patient_sync::sync::apply::{apply_record, IdentitySettings};
    let db = database(db).await;
    let settings = IdentitySettings::default();
    let hint = |id: &str, given: &str, secs: i64| {
        let mut r = record(id, secs, given);
        r.key = SourceKey::new(SourceKind::Hint, id);
        r.fields.family_name = Some(format!("{given}son"));
        r
    };
    let now = Utc::now();
    let mut tx = db.store.begin().await.unwrap();
    let a = apply_record(tx.as_mut(), &hint("pat-a", "Ann", 10), &settings, now)
        .await
        .unwrap();
    let b = apply_record(tx.as_mut(), &hint("pat-b", "Bea", 10), &settings, now)
        .await
        .unwrap();
    assert_ne!(a.patient_id, b.patient_id);
    let mut merged = hint("pat-a", "Ann", 20);
    merged.status = RecordStatus::Merged;
    merged.merged_into = Some("pat-b".into());
    let after = apply_record(tx.as_mut(), &merged, &settings, now)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(after.patient_id, b.patient_id);
    let link = db
        .store
        .load_link(&SourceKey::new(SourceKind::Hint, "pat-a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(link.patient_id), b.patient_id);
    let old = db
        .store
        .load_patient(a.patient_id.as_ref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.status, "merged");
    assert_eq!(old.merged_into, b.patient_id);
}

crate::on_both_backends!(a_record_merged_upstream_folds_its_patient_into_the_survivors);
