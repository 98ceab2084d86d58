//! `apply_records` (a page at a time, as resync applies) ends in the same state as
//! `apply_record` one record after another: the same patients, canonical values, link
//! decisions and review proposals, on both backends; and so do pages whose candidates were
//! read ahead of their transaction, unless something else committed meanwhile.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use patient_sync::model::{SourceKey, SourceKind, SourceRecord};
use patient_sync::sandbox::population::{Population, PopulationConfig};
use patient_sync::store::{PatientRow, Store};
use patient_sync::sync::apply::{apply_record, IdentitySettings};
use patient_sync::sync::apply_batch::{
    apply_page, apply_records, read_ahead, AheadPrepared, Previous, ReadAhead,
};

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

/// Pages whose candidates were read ahead, once the previous page's transaction had begun
/// (before its commit for some pages, after it for others), decide exactly like pages that
/// read them in their own transaction. On SQLite the read-ahead serves every page of new
/// records; Postgres has no write stamps and reads in the transaction.
async fn pages_read_ahead_decide_like_pages_read_inside(db: Db) {
    let pop = Population::generate(&PopulationConfig {
        people: 150,
        seed: 78,
        ..Default::default()
    });
    let mut records = listed(&pop);
    let second_pass = records.clone();
    records.extend(second_pass);
    let keys: Vec<SourceKey> = records.iter().map(|r| r.key.clone()).collect();
    let identity = IdentitySettings::default();
    let now = Utc::now();
    let pages: Vec<Vec<&SourceRecord>> = records.chunks(25).map(|p| p.iter().collect()).collect();

    let inside = database(db).await;
    for page in &pages {
        let mut tx = inside.store.begin().await.unwrap();
        apply_records(tx.as_mut(), page, &identity, now)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    let ahead = database(db).await;
    let store = ahead.store.as_ref();
    let mut previous: Option<Previous> = None;
    let mut read: Option<ReadAhead> = None;
    let mut used = 0;
    // Pages of new records throughout whose previous page was one too: those a read-ahead
    // serves.
    let mut servable = 0;
    for (i, page) in pages.iter().enumerate() {
        let mut tx = store.begin().await.unwrap();
        let stamp = tx.write_stamp().await.unwrap();
        assert_eq!(stamp.is_some(), db == Db::Sqlite);
        let mut next = pages
            .get(i + 1)
            .map(|p| AheadPrepared::new(p, &identity.matching));
        let given = match (read.take(), previous.as_ref(), stamp) {
            (Some(r), Some(p), Some(s)) => Some((r, p, s)),
            _ => None,
        };
        let paged = apply_page(tx.as_mut(), page, &identity, now, given)
            .await
            .unwrap();
        used += usize::from(paged.read_ahead_used);
        let tracked = |p: &Option<Previous>| p.as_ref().is_some_and(|p| p.changed.is_some());
        servable += usize::from(paged.changed.is_some() && tracked(&previous));
        // Even pages: the next page is read while this transaction is open; odd pages: after
        // it committed.
        if i % 2 == 0 {
            if let (Some(n), Some(s)) = (next.take(), stamp) {
                read = Some(read_ahead(store, n, s).await.unwrap());
            }
        }
        tx.commit().await.unwrap();
        if let (Some(next), Some(stamp)) = (next, stamp) {
            read = Some(read_ahead(store, next, stamp).await.unwrap());
        }
        previous = stamp.map(|stamp| Previous {
            stamp,
            changed: paged.changed,
        });
    }

    let a = outcome(inside.store.as_ref(), &keys).await;
    let b = outcome(ahead.store.as_ref(), &keys).await;
    assert!(
        a.patients.len() < keys.len() / 2,
        "the population links across systems ({} patients)",
        a.patients.len()
    );
    assert_eq!(b.links, a.links);
    assert_eq!(b.patients, a.patients);
    assert_eq!(b.reviews, a.reviews);
    if db == Db::Sqlite {
        // Most of the first pass (the second holds records seen before).
        assert!(used > pages.len() / 4, "{used} of {} pages", pages.len());
        assert_eq!(used, servable);
    } else {
        assert_eq!(used, 0);
    }
}

on_both_backends!(pages_read_ahead_decide_like_pages_read_inside);

/// A population of 60 people (`seed`), its records as listed, and a store that applied them
/// one at a time in that order: the decisions the tests below compare with.
async fn applied_one_at_a_time(
    seed: u64,
) -> (Population, Vec<SourceRecord>, crate::helpers::TestDb) {
    let pop = Population::generate(&PopulationConfig {
        people: 60,
        seed,
        ..Default::default()
    });
    let records = listed(&pop);
    let identity = IdentitySettings::default();
    let now = Utc::now();
    let reference = database(Db::Sqlite).await;
    for record in &records {
        let mut tx = reference.store.begin().await.unwrap();
        apply_record(tx.as_mut(), record, &identity, now)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    (pop, records, reference)
}

/// Applies `record` as a page of its own (default settings), reading the page of `next` ahead
/// while its transaction is open: the read-ahead and the page, as the next page is given them.
async fn page_reading_the_next(
    store: &dyn Store,
    record: &SourceRecord,
    next: &SourceRecord,
    now: chrono::DateTime<Utc>,
) -> (ReadAhead, Previous) {
    let identity = IdentitySettings::default();
    let mut tx = store.begin().await.unwrap();
    let stamp = tx.write_stamp().await.unwrap().unwrap();
    let read = read_ahead(
        store,
        AheadPrepared::new(&[next], &identity.matching),
        stamp,
    )
    .await
    .unwrap();
    let paged = apply_page(tx.as_mut(), &[record], &identity, now, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let previous = Previous {
        stamp,
        changed: paged.changed,
    };
    (read, previous)
}

/// A read-ahead is not used when anything but the previous page's transaction committed
/// after it was read: a statement of this process on the writer, or another process. The
/// page then reads in its transaction and sees that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_ahead_is_dropped_when_another_write_came_between() {
    let (pop, records, reference) = applied_one_at_a_time(79).await;
    let identity = IdentitySettings::default();
    let now = Utc::now();
    // A Healthie record and an IntakeQ record of one person that link automatically when the
    // IntakeQ record comes second.
    let mut pair = None;
    for r in records
        .iter()
        .filter(|r| r.key.source == SourceKind::Intakeq)
    {
        let link = reference.store.load_link(&r.key).await.unwrap().unwrap();
        if link.method == patient_sync::store::LinkMethod::New {
            continue;
        }
        let partners = reference
            .store
            .load_patient_links(&link.patient_id)
            .await
            .unwrap();
        if let [only] = partners
            .iter()
            .filter(|l| l.key != r.key)
            .collect::<Vec<_>>()[..]
        {
            if only.key.source == SourceKind::Healthie {
                pair = Some((only.key.clone(), r.clone()));
                break;
            }
        }
    }
    let (healthie_key, intakeq) = pair.expect("the population has a linked pair");
    let healthie = records.iter().find(|r| r.key == healthie_key).unwrap();
    let truth = pop.ground_truth();
    let unrelated: &SourceRecord = records
        .iter()
        .find(|r| r.key.source == SourceKind::Hint && truth[&r.key] != truth[&intakeq.key])
        .unwrap();

    enum Between {
        Nothing,
        ThisProcess,
        OtherProcess,
    }
    for between in [
        Between::Nothing,
        Between::ThisProcess,
        Between::OtherProcess,
    ] {
        let db = database(Db::Sqlite).await;
        let store = db.store.as_ref();
        // Page one: an unrelated record; the page after it (the IntakeQ record) is read
        // while page one's transaction is open.
        let (read, previous) = page_reading_the_next(store, unrelated, &intakeq, now).await;
        let stamp = previous.stamp;
        match between {
            Between::Nothing => {}
            Between::ThisProcess => {
                // The Healthie record through this process's writer.
                let mut tx = store.begin().await.unwrap();
                apply_record(tx.as_mut(), healthie, &identity, now)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
            Between::OtherProcess => {
                let other = patient_sync::store::connect(&db.url, 2).await.unwrap();
                let mut tx = other.begin().await.unwrap();
                apply_record(tx.as_mut(), healthie, &identity, now)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }
        let mut tx = store.begin().await.unwrap();
        let now_stamp = tx.write_stamp().await.unwrap().unwrap();
        let paged = apply_page(
            tx.as_mut(),
            &[&intakeq],
            &identity,
            now,
            Some((read, &previous, now_stamp)),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let link = store.load_link(&intakeq.key).await.unwrap().unwrap();
        match between {
            Between::Nothing => {
                assert!(now_stamp.follows(&stamp));
                assert!(paged.read_ahead_used);
                assert_eq!(link.method, patient_sync::store::LinkMethod::New);
            }
            Between::ThisProcess | Between::OtherProcess => {
                assert!(!now_stamp.follows(&stamp));
                assert!(!paged.read_ahead_used);
                let healthie_link = store.load_link(&healthie.key).await.unwrap().unwrap();
                assert_eq!(link.patient_id, healthie_link.patient_id);
            }
        }
    }
}

/// A statement committed on the writer outside any transaction (this process) moves the next
/// write stamp off `follows` as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_on_the_writer_between_two_transactions_is_counted() {
    let db = database(Db::Sqlite).await;
    let store = db.store.as_ref();
    let mut tx = store.begin().await.unwrap();
    let first = tx.write_stamp().await.unwrap().unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    let second = tx.write_stamp().await.unwrap().unwrap();
    tx.commit().await.unwrap();
    assert!(second.follows(&first));
    store
        .save_sync_state(&patient_sync::store::SyncState {
            source: SourceKind::Hint,
            stream: "patients".into(),
            cursor: None,
            checkpoint: None,
            last_success_at: None,
            updated_at: Utc::now(),
        })
        .await
        .unwrap();
    let mut tx = store.begin().await.unwrap();
    let third = tx.write_stamp().await.unwrap().unwrap();
    assert!(!third.follows(&second));
}

/// A page's read-ahead, taken before the previous page linked a record to one of its
/// candidates, is brought up to date: the candidate's records are read again, so the page
/// decides against them and its canonical row holds all three systems' records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_ahead_reads_again_the_patients_the_previous_page_joined() {
    let (_, records, reference) = applied_one_at_a_time(80).await;
    let identity = IdentitySettings::default();
    let now = Utc::now();
    // A patient of exactly one record from each system.
    let mut trio = None;
    for r in records.iter().filter(|r| r.key.source == SourceKind::Hint) {
        let link = reference.store.load_link(&r.key).await.unwrap().unwrap();
        let mut keys: Vec<SourceKey> = reference
            .store
            .load_patient_links(&link.patient_id)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        keys.sort();
        if let [h, q, _] = &keys[..] {
            if h.source == SourceKind::Healthie && q.source == SourceKind::Intakeq {
                trio = Some(keys);
                break;
            }
        }
    }
    let trio = trio.expect("the population has a patient in all three systems");
    let record = |k: &SourceKey| records.iter().find(|r| &r.key == k).unwrap();
    let (healthie, intakeq, hint) = (record(&trio[0]), record(&trio[1]), record(&trio[2]));

    let db = database(Db::Sqlite).await;
    let store = db.store.as_ref();
    let mut tx = store.begin().await.unwrap();
    apply_record(tx.as_mut(), healthie, &identity, now)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Page one joins the IntakeQ record to the Healthie record's patient; page two (the Hint
    // record) was read before that commit.
    let (read, previous) = page_reading_the_next(store, intakeq, hint, now).await;
    let mut tx = store.begin().await.unwrap();
    let next = tx.write_stamp().await.unwrap().unwrap();
    let paged = apply_page(
        tx.as_mut(),
        &[hint],
        &identity,
        now,
        Some((read, &previous, next)),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(paged.read_ahead_used);
    let expected = outcome(reference.store.as_ref(), &trio).await;
    let got = outcome(store, &trio).await;
    assert_eq!(got.patients, expected.patients);
    assert_eq!(got.links, expected.links);
}
