//! `apply_records` (a page at a time, as resync applies) ends in the same state as
//! `apply_record` one record after another: the same patients, canonical values, link
//! decisions and review proposals, on both backends.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use patient_sync::model::{SourceKey, SourceKind, SourceRecord};
use patient_sync::sandbox::population::{Population, PopulationConfig};
use patient_sync::store::{PatientRow, Store};
use patient_sync::sync::apply::{apply_record, IdentitySettings};
use patient_sync::sync::apply_batch::apply_records;

use crate::helpers::{database, Db};
use crate::on_both_backends;

/// Every record of the population (duplicates, families, twins, archived records and
/// cross-system ids included), source by source in id order, as a resync lists them.
fn listed(pop: &Population) -> Vec<SourceRecord> {
    let sources = crate::identity_flow::sources();
    [SourceKind::Healthie, SourceKind::Intakeq, SourceKind::Hint]
        .into_iter()
        .flat_map(|kind| {
            pop.ground_truth()
                .keys()
                .filter(move |k| k.source == kind)
                .cloned()
                .collect::<Vec<_>>()
        })
        .map(|key| {
            let json = &pop.table(key.source).get(key.id.as_str()).unwrap().json;
            sources[&key.source]
                .parse_record(json, pop.now())
                .expect("population records convert")
        })
        .collect()
}

/// What the store decided, with patient ids replaced by the sorted keys of their records, so
/// two stores that made the same decisions compare equal.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Each live patient: its records and its canonical values (ids, times and version
    /// numbers left out).
    patients: BTreeMap<Vec<SourceKey>, PatientRow>,
    /// Per record: method, rule and score of its link.
    links: BTreeMap<SourceKey, String>,
    /// Open review pairs: the record and the records of the proposed patient.
    reviews: BTreeSet<(SourceKey, Vec<SourceKey>)>,
}

async fn outcome(store: &dyn Store, keys: &[SourceKey]) -> Outcome {
    let mut members: BTreeMap<String, Vec<SourceKey>> = BTreeMap::new();
    let mut links = BTreeMap::new();
    for key in keys {
        let link = store
            .load_link(key)
            .await
            .unwrap()
            .expect("every record is linked");
        members
            .entry(link.patient_id.as_str().to_string())
            .or_default()
            .push(key.clone());
        links.insert(
            key.clone(),
            format!("{:?} {:?} {:?}", link.method, link.rule, link.score),
        );
    }
    for m in members.values_mut() {
        m.sort();
        m.dedup();
    }
    let mut patients = BTreeMap::new();
    for (id, records) in &members {
        let mut row = store
            .load_patient(&patient_sync::model::PatientId(id.clone()))
            .await
            .unwrap()
            .expect("a linked patient has a row");
        row.patient_id = Default::default();
        row.first_seen_at = Default::default();
        row.updated_at = Default::default();
        // Several records of one page joining a patient make one version, not one each.
        row.version = 0;
        patients.insert(records.clone(), row);
    }
    let reviews = store
        .list_reviews(None, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let partner = members
                .get(r.patient_id.as_str())
                .cloned()
                .unwrap_or_default();
            (r.key, partner)
        })
        .collect();
    Outcome {
        patients,
        links,
        reviews,
    }
}

async fn pages_decide_like_one_record_at_a_time(db: Db) {
    let pop = Population::generate(&PopulationConfig {
        people: 150,
        seed: 77,
        ..Default::default()
    });
    let mut records = listed(&pop);
    // A record listed twice (offset paging can do that) and a second full pass.
    records.insert(40, records[39].clone());
    let second_pass = records.clone();
    records.extend(second_pass);
    let keys: Vec<SourceKey> = records.iter().map(|r| r.key.clone()).collect();
    let identity = IdentitySettings::default();
    let now = Utc::now();

    let one_by_one = database(db).await;
    let mut expected = Vec::new();
    for page in records.chunks(25) {
        let mut tx = one_by_one.store.begin().await.unwrap();
        for record in page {
            expected.push(
                apply_record(tx.as_mut(), record, &identity, now)
                    .await
                    .unwrap(),
            );
        }
        tx.commit().await.unwrap();
    }

    let paged = database(db).await;
    let mut got = Vec::new();
    for page in records.chunks(25) {
        let refs: Vec<&SourceRecord> = page.iter().collect();
        let mut tx = paged.store.begin().await.unwrap();
        got.extend(
            apply_records(tx.as_mut(), &refs, &identity, now)
                .await
                .unwrap(),
        );
        tx.commit().await.unwrap();
    }

    let outcomes = |applied: &[patient_sync::sync::apply::Applied]| {
        applied.iter().map(|a| a.outcome).collect::<Vec<_>>()
    };
    assert_eq!(outcomes(&got), outcomes(&expected));
    let a = outcome(one_by_one.store.as_ref(), &keys).await;
    let b = outcome(paged.store.as_ref(), &keys).await;
    assert!(
        a.patients.len() < keys.len() / 2,
        "the population links across systems ({} patients)",
        a.patients.len()
    );
    assert!(!a.reviews.is_empty(), "the population has uncertain pairs");
    assert_eq!(b.links, a.links);
    assert_eq!(b.patients, a.patients);
    assert_eq!(b.reviews, a.reviews);
    // In the second pass every applied record's patient is the one it is linked to.
    let half = records.len() / 2;
    for (record, applied) in records[half..].iter().zip(&got[half..]) {
        let link = paged.store.load_link(&record.key).await.unwrap().unwrap();
        assert_eq!(applied.patient_id.as_ref(), Some(&link.patient_id));
    }
}

on_both_backends!(pages_decide_like_one_record_at_a_time);
