//! The store's bulk writers as `rebuild` drives them: more rows than one multi-row statement
//! holds, after `bulk_write_cache`, on SQLite and Postgres alike. History of new rows (one
//! statement per chunk) and of later versions (one by one) must chain the same way.

use chrono::{DateTime, TimeZone, Utc};
use patient_sync::model::{PatientId, SourceKey, SourceKind};
use patient_sync::store::{FieldSource, Link, LinkEvent, LinkMethod, PatientRow, Store};

use crate::helpers::{database, Db};

/// More than one statement's worth on either backend.
const N: usize = 260;

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_790_000_000 + secs, 0).unwrap()
}

fn key(i: usize) -> SourceKey {
    SourceKey::new(SourceKind::Healthie, format!("b{i}"))
}

fn row(i: usize, version: i64, given: &str, updated: DateTime<Utc>) -> PatientRow {
    PatientRow {
        patient_id: PatientId(format!("p{i:04}")),
        given_name: Some(format!("{given}{i}")),
        family_name: Some("Bulk".into()),
        healthie_id: Some(format!("b{i}")),
        status: "active".into(),
        first_seen_at: at(0),
        updated_at: updated,
        version,
        ..Default::default()
    }
}

fn provenance(i: usize, updated: DateTime<Utc>) -> Vec<FieldSource> {
    ["given_name", "family_name"]
        .into_iter()
        .map(|field| FieldSource {
            field: field.into(),
            key: key(i),
            source_updated_at: Some(updated),
        })
        .collect()
}

async fn save_rows(store: &dyn Store, rows: Vec<(PatientRow, Vec<FieldSource>)>) {
    let mut tx = store.begin().await.unwrap();
    tx.bulk_write_cache(16).await.unwrap();
    tx.save_patients(&rows).await.unwrap();
    tx.commit().await.unwrap();
}

async fn bulk_writes_span_statements_and_keep_history_chained(db: Db) {
    let db = database(db).await;
    let s = db.store.as_ref();

    // Every row new: version 1, open from when it was written.
    save_rows(
        s,
        (0..N)
            .map(|i| (row(i, 1, "Ann", at(10)), provenance(i, at(5))))
            .collect(),
    )
    .await;
    // Every other row gets a version 2; the rest are saved again as version 1 (rewritten in
    // place, no new version, the same provenance).
    save_rows(
        s,
        (0..N)
            .map(|i| {
                if i % 2 == 0 {
                    // The new version no longer has a family name from this record.
                    let mut sources = provenance(i, at(15));
                    sources.retain(|f| f.field != "family_name");
                    (row(i, 2, "Anne", at(20)), sources)
                } else {
                    (row(i, 1, "Ann", at(10)), provenance(i, at(5)))
                }
            })
            .collect(),
    )
    .await;

    for i in 0..N {
        let id = PatientId(format!("p{i:04}"));
        let current = s.load_patient(&id).await.unwrap().expect("row saved");
        let history = s.load_patient_history(&id).await.unwrap();
        if i % 2 == 0 {
            assert_eq!(current.version, 2, "{id}");
            assert_eq!(history.len(), 2, "{id}");
            assert_eq!(history[0].valid_from, at(10));
            assert_eq!(history[0].valid_to, Some(at(20)));
            assert_eq!(history[1].valid_from, at(20));
        } else {
            assert_eq!(current.version, 1, "{id}");
            assert_eq!(history.len(), 1, "{id}");
            assert_eq!(history[0].valid_from, at(10));
        }
        assert_eq!(history.last().unwrap().valid_to, None, "{id}");
        assert_eq!(&history.last().unwrap().row, &current, "{id}");
        let sources = s.load_field_sources(&id).await.unwrap();
        let expected = if i % 2 == 0 { 1 } else { 2 };
        assert_eq!(
            sources.len(),
            expected,
            "{id}: provenance replaced, not added"
        );
        assert!(sources.iter().all(|f| f.key == key(i)));
    }

    // Links with their events, and blocking keys, over several statements.
    let links: Vec<(Link, LinkEvent)> = (0..N)
        .map(|i| {
            let patient_id = PatientId(format!("p{i:04}"));
            (
                Link {
                    key: key(i),
                    patient_id: patient_id.clone(),
                    method: LinkMethod::New,
                    rule: Some("rebuild".into()),
                    score: None,
                    decided_by: if i % 7 == 0 { "admin" } else { "auto" }.into(),
                    decided_at: at(30),
                },
                LinkEvent {
                    key: key(i),
                    action: "link".into(),
                    patient_id: Some(patient_id),
                    previous_patient_id: None,
                    method: LinkMethod::New,
                    rule: Some("rebuild".into()),
                    score: None,
                    decided_by: "auto".into(),
                    at: at(30),
                },
            )
        })
        .collect();
    let keys: Vec<(SourceKey, Vec<String>)> = (0..N)
        .map(|i| {
            (
                key(i),
                vec![format!("dob:{i}"), "zip:12345".into(), format!("dob:{i}")],
            )
        })
        .collect();
    let mut tx = s.begin().await.unwrap();
    tx.bulk_write_cache(16).await.unwrap();
    tx.save_links(&links).await.unwrap();
    tx.replace_match_keys_many(&keys).await.unwrap();
    tx.commit().await.unwrap();

    for i in [0, 1, N / 2, N - 1] {
        let link = s.load_link(&key(i)).await.unwrap().expect("linked");
        assert_eq!(link.patient_id, PatientId(format!("p{i:04}")));
        assert_eq!(s.load_link_events(&key(i)).await.unwrap().len(), 1);
    }
    let mut stored = Vec::new();
    let mut after: Option<(SourceKey, String)> = None;
    loop {
        let page = s.load_match_keys_page(after.as_ref(), 100).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.clone());
        stored.extend(page);
    }
    assert_eq!(
        stored.len(),
        2 * N,
        "duplicates dropped, every record's keys kept"
    );
    assert!(stored.contains(&(key(N - 1), format!("dob:{}", N - 1))));

    // The same keys streamed, and every link's record, patient and admin mark.
    let mut streamed = Vec::new();
    s.for_each_match_key(&mut |source, id, k| {
        streamed.push((SourceKey::new(source, id.to_string()), k.to_string()))
    })
    .await
    .unwrap();
    streamed.sort();
    stored.sort();
    assert_eq!(streamed, stored);
    let mut targets = Vec::new();
    s.for_each_link_target(&mut |source, id, patient, manual| {
        targets.push((
            SourceKey::new(source, id.to_string()),
            patient.to_string(),
            manual,
        ))
    })
    .await
    .unwrap();
    targets.sort();
    let mut expected: Vec<(SourceKey, String, bool)> = (0..N)
        .map(|i| (key(i), format!("p{i:04}"), i % 7 == 0))
        .collect();
    expected.sort();
    assert_eq!(targets, expected);
}

crate::on_both_backends!(bulk_writes_span_statements_and_keep_history_chained);
