//! Scale-out on Postgres through the real binary: four `serve` processes share one database
//! and thousands of Healthie deliveries plus Hint webhooks for Hint patients (linked across
//! systems); every delivery takes effect exactly once and the
//! canonical table equals a single-worker run. Also the whole-database checks (`snapshot`,
//! `assert_exactly_once`) that `crash` uses.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use patient_sync::model::{PatientId, SourceKey, SourceKind};
use patient_sync::sandbox::healthie::Faults;
use patient_sync::store::{self, InboxState, PatientRow, Store};

use patient_sync::sandbox::hint;

use crate::crash::{
    deliver, deliver_hint, distinct_events, free_port, hint_env, start_serve, storm_config,
    storm_sandbox, test_seed, undisturbed_with_hint, wait_drained, Serve, BIN,
};

/// What a run leaves in the database, without generated ids and timestamps: each source
/// record's stored state, the canonical row each record is linked to, and live patients by
/// status. Rows merged away are history, not state: whether a merged-away Healthie user got a
/// row of its own before the merge depends on which event came first.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub records: BTreeMap<String, String>,
    pub rows: BTreeMap<String, String>,
    pub statuses: Vec<(String, i64)>,
}

/// A canonical row's content: every column but its id, timestamps and version.
fn content(row: &PatientRow) -> String {
    let row = PatientRow {
        patient_id: PatientId::default(),
        merged_into: None,
        first_seen_at: chrono::DateTime::UNIX_EPOCH,
        updated_at: chrono::DateTime::UNIX_EPOCH,
        version: 0,
        ..row.clone()
    };
    format!("{row:?}")
}

async fn all_links(store: &dyn Store) -> Vec<patient_sync::store::Link> {
    let mut out = Vec::new();
    loop {
        let page = store
            .load_links_page(
                out.last().map(|l: &patient_sync::store::Link| &l.key),
                1_000,
            )
            .await
            .unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

async fn all_patients(store: &dyn Store) -> BTreeMap<PatientId, PatientRow> {
    let mut out: BTreeMap<PatientId, PatientRow> = BTreeMap::new();
    loop {
        let after = out.keys().next_back().cloned();
        let page = store
            .load_patients_page(after.as_ref(), 1_000)
            .await
            .unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page.into_iter().map(|p| (p.patient_id.clone(), p)));
    }
}

pub async fn snapshot(store: &dyn Store) -> Snapshot {
    let mut records = BTreeMap::new();
    let mut after: Option<SourceKey> = None;
    loop {
        let page = store
            .load_source_records_page(after.as_ref(), 1_000, false)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for r in page {
            records.insert(
                r.key.to_string(),
                format!(
                    "{:?}|{:?}|{:?}|{:?}",
                    r.status, r.merged_into, r.source_updated_at, r.fields
                ),
            );
        }
    }
    let patients = all_patients(store).await;
    let rows = all_links(store)
        .await
        .into_iter()
        .map(|l| (l.key.to_string(), content(&patients[&l.patient_id])))
        .collect();
    Snapshot {
        records,
        rows,
        statuses: store
            .count_patients()
            .await
            .unwrap()
            .into_iter()
            .filter(|(status, _)| status != "merged")
            .collect(),
    }
}

/// Asserts two snapshots are equal, naming the first keys that differ (not whole tables).
pub fn assert_same(expected: &Snapshot, actual: &Snapshot) {
    fn diff(what: &str, a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) {
        let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let differing: Vec<&&String> = keys.iter().filter(|k| a.get(**k) != b.get(**k)).collect();
        assert!(
            differing.is_empty(),
            "{what} differ from the single-worker run for {} keys, first: {:?}\nexpected {:?}\nactual   {:?}",
            differing.len(),
            differing[0],
            a.get(*differing[0]),
            b.get(*differing[0]),
        );
    }
    diff("source records", &expected.records, &actual.records);
    diff("canonical rows", &expected.rows, &actual.rows);
    assert_eq!(
        expected.statuses, actual.statuses,
        "live patients by status"
    );
}

/// Every delivery took effect exactly once: the inbox holds between `min` and `max` items, all
/// finished and none dead; every source record is linked to one live canonical row, whose link
/// history is one unbroken chain ending at that row; no canonical row is a duplicate (every live
/// row has a record and carries the Healthie id linked to it).
pub async fn assert_exactly_once(store: &dyn Store, min: u64, max: u64) {
    let counts = store.inbox_counts().await.unwrap();
    let of = |states: &[InboxState]| -> i64 {
        counts
            .iter()
            .filter(|c| states.contains(&c.state))
            .map(|c| c.count)
            .sum()
    };
    assert_eq!(
        of(&[InboxState::Pending, InboxState::Leased]),
        0,
        "nothing left in flight"
    );
    assert_eq!(of(&[InboxState::Dead]), 0, "nothing dead-lettered");
    let finished = of(&[InboxState::Done, InboxState::Ignored]) as u64;
    assert!(
        (min..=max).contains(&finished),
        "{finished} inbox items finished, expected {min}..={max}"
    );

    let patients = all_patients(store).await;
    let links = all_links(store).await;
    let mut linked: BTreeMap<&PatientId, Vec<&SourceKey>> = BTreeMap::new();
    for link in &links {
        let row = patients
            .get(&link.patient_id)
            .unwrap_or_else(|| panic!("{} is linked to a missing row", link.key));
        assert_ne!(
            row.status, "merged",
            "{} is linked to a merged row",
            link.key
        );
        linked.entry(&link.patient_id).or_default().push(&link.key);
        let events = store.load_link_events(&link.key).await.unwrap();
        assert!(!events.is_empty(), "{} has no link history", link.key);
        assert!(
            events[0].previous_patient_id.is_none(),
            "{}'s history starts with a move",
            link.key
        );
        for pair in events.windows(2) {
            assert_eq!(
                pair[1].previous_patient_id, pair[0].patient_id,
                "{}'s link history is one chain",
                link.key
            );
        }
        assert_eq!(
            events.last().unwrap().patient_id.as_ref(),
            Some(&link.patient_id),
            "{}'s history ends at its link",
            link.key
        );
    }
    let link_keys: BTreeSet<&SourceKey> = links.iter().map(|l| &l.key).collect();
    let mut after: Option<SourceKey> = None;
    loop {
        let page = store
            .load_source_records_page(after.as_ref(), 1_000, false)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for r in &page {
            assert!(
                link_keys.contains(&r.key),
                "source record {} is linked",
                r.key
            );
        }
    }
    for (id, row) in &patients {
        if matches!(row.status.as_str(), "merged" | "deleted") {
            continue;
        }
        let keys = linked
            .get(id)
            .unwrap_or_else(|| panic!("live row {id:?} has no source record"));
        if let Some(healthie_id) = &row.healthie_id {
            assert!(
                keys.iter().any(|k| k.id.as_str() == healthie_id),
                "row {id:?} carries a Healthie id linked to it"
            );
        }
    }
}

/// The sum of `patient_sync_events_processed_total` on one process's `/metrics`.
async fn processed_by(port: u16) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("patient_sync_events_processed_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_serve_processes_on_one_postgres_apply_every_event_exactly_once() {
    let seed = test_seed("scale-out");
    let db_url = crate::pg::fresh_database().await;
    // Migrations run once, before the replicas start.
    let migrate = Command::new(BIN)
        .arg("migrate")
        .env("PATIENT_SYNC_DATABASE__URL", &db_url)
        .env("PATIENT_SYNC_LOG__LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(migrate.success(), "migrate: {migrate:?}");
    let (sandbox, events) = storm_sandbox(
        400,
        seed,
        &storm_config(seed, 4),
        Faults {
            slow_share: 1.0,
            slow_ms: 5,
            ..Default::default()
        },
    )
    .await;
    assert!(
        events.len() >= 3_000,
        "thousands of deliveries ({})",
        events.len()
    );
    // Every Hint patient once, one in five delivered twice (the copy is a duplicate). People
    // with two Hint records, or two Healthie records, are left out: which record of the
    // duplicated system a Hint record joins (two records of one system never link
    // automatically) depends on which arrives first, by design.
    let hint_events: Vec<serde_json::Value> = {
        let pop = sandbox.population().read().unwrap();
        let mut per_person: BTreeMap<_, (usize, usize)> = BTreeMap::new();
        for key in pop.ground_truth().keys() {
            let counts = per_person.entry(pop.person_of(key)).or_default();
            match key.source {
                SourceKind::Hint => counts.0 += 1,
                SourceKind::Healthie => counts.1 += 1,
                _ => {}
            }
        }
        pop.hint_patients()
            .filter(|p| {
                let key = SourceKey::new(SourceKind::Hint, p["id"].as_str().unwrap_or_default());
                per_person
                    .get(&pop.person_of(&key))
                    .is_some_and(|&(hint, healthie)| hint == 1 && healthie <= 1)
            })
            .enumerate()
            .flat_map(|(i, p)| {
                let event = hint::event("patient.updated", p.clone());
                std::iter::repeat_n(event, 1 + usize::from(i % 5 == 0))
            })
            .collect()
    };
    assert!(!hint_events.is_empty(), "the population has Hint patients");
    let total = (events.len() + distinct_events(&hint_events)) as u64;

    let hint = hint_env(&sandbox);
    let mut extra = vec![
        ("PATIENT_SYNC_WORKER__LEASE_SECS", "30"),
        ("PATIENT_SYNC_WORKER__BATCH_SIZE", "10"),
        ("PATIENT_SYNC_SOURCES__HEALTHIE__BATCH_SIZE", "10"),
        ("PATIENT_SYNC_DATABASE__MAX_CONNECTIONS", "6"),
    ];
    extra.extend(hint.iter().map(|(k, v)| (*k, v.as_str())));
    let mut replicas: Vec<Serve> = Vec::new();
    for _ in 0..4 {
        replicas.push(start_serve(&db_url, free_port(), &sandbox.healthie_url(), &extra).await);
    }
    let senders = replicas.iter().map(Serve::sender).collect();
    let healthie = tokio::spawn(deliver(
        senders,
        events.clone(),
        16,
        Duration::from_secs(120),
    ));
    let hint_urls = replicas
        .iter()
        .map(|r| format!("http://127.0.0.1:{}/webhooks/hint", r.port))
        .collect();
    deliver_hint(hint_urls, hint_events.clone(), Duration::from_secs(120)).await;
    let resent = healthie.await.unwrap();
    assert_eq!(
        resent, 0,
        "every replica acknowledged every delivery at once"
    );

    let observer = store::connect(&db_url, 2).await.unwrap();
    wait_drained(observer.as_ref(), "the replicas to drain the inbox").await;
    for replica in &replicas {
        assert!(
            processed_by(replica.port).await > 0.0,
            "every replica took a share of the work"
        );
    }
    for replica in &mut replicas {
        let status = replica.terminate();
        assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
    }

    assert_exactly_once(observer.as_ref(), total, total).await;
    let shared = snapshot(observer.as_ref()).await;
    let expected = undisturbed_with_hint(&sandbox, &events, &hint_events).await;
    assert_same(&expected, &shared);
}
