//! Identity resolution end to end: records from all three systems, admin decisions, rebuild and
//! import, on both backends; and the real binary for `import` and `patient show`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;

use chrono::{Duration, NaiveDate, TimeZone, Utc};
use patient_sync::config::Settings;
use patient_sync::model::{
    PatientId, PersonFields, RecordStatus, SourceKey, SourceKind, SourceRecord,
};
use patient_sync::sandbox::population::{Noise, Population, PopulationConfig};
use patient_sync::sources::Source;
use patient_sync::store::{LinkMethod, PatientRow, ReviewState, Store};
use patient_sync::sync::admin;
use patient_sync::sync::apply::{apply_record, IdentitySettings};
use patient_sync::sync::import::{import_lines, offline_source};
use patient_sync::sync::rebuild::{rebuild, RebuildOptions, RebuildReport};

use crate::helpers::{database, Db};
use crate::on_both_backends;

fn identity() -> IdentitySettings {
    IdentitySettings::default()
}

/// Every source, built offline (never called), for `parse_record`.
pub(crate) fn sources() -> BTreeMap<SourceKind, Arc<dyn Source>> {
    let settings = Settings::load_from(None, &[]).expect("default settings");
    SourceKind::ALL
        .into_iter()
        .map(|k| (k, offline_source(&settings, k)))
        .collect()
}

fn population(people: usize, seed: u64, noise: Noise) -> Population {
    Population::generate(&PopulationConfig {
        people,
        seed,
        noise,
        duplicate_share: 0.0,
        wrong_cross_id_share: 0.0,
        ..Default::default()
    })
}

/// The record `key` of the population, converted by its source's own `parse_record`.
fn parsed(pop: &Population, key: &SourceKey) -> SourceRecord {
    let json = &pop
        .table(key.source)
        .get(key.id.as_str())
        .expect("record exists")
        .json;
    sources()[&key.source]
        .parse_record(json, pop.now())
        .expect("population records convert")
}

async fn apply_all(store: &dyn Store, records: &[SourceRecord]) {
    for record in records {
        let mut tx = store.begin().await.unwrap();
        apply_record(tx.as_mut(), record, &identity(), Utc::now())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

async fn patient_of(store: &dyn Store, key: &SourceKey) -> PatientId {
    store
        .load_link(key)
        .await
        .unwrap()
        .expect("record is linked")
        .patient_id
}

async fn all_patients(store: &dyn Store) -> Vec<PatientRow> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.load_patients_page(after.as_ref(), 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.patient_id.clone());
        out.extend(page);
    }
    out
}

async fn run_rebuild(store: &dyn Store) -> RebuildReport {
    rebuild(store, &identity(), &RebuildOptions::default(), Utc::now())
        .await
        .unwrap()
}

async fn same_person_from_three_systems_in_any_order_is_one_patient_with_provenance(db: Db) {
    let pop = population(80, 5, Noise::none());
    let people: Vec<_> = pop
        .persons()
        .iter()
        .filter(|p| {
            let systems: BTreeSet<_> = p.records.iter().map(|k| k.source).collect();
            systems.len() == 3 && p.records.len() == 3
        })
        .take(2)
        .collect();
    assert!(
        !people.is_empty(),
        "the population has people in all three systems"
    );
    let orders = [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]];
    for order in orders {
        let db = database(db).await;
        for person in &people {
            let mut keys = person.records.clone();
            keys.sort();
            let records: Vec<_> = order.iter().map(|&i| parsed(&pop, &keys[i])).collect();
            apply_all(db.store.as_ref(), &records).await;
            let patients: BTreeSet<_> = {
                let mut set = BTreeSet::new();
                for k in &keys {
                    set.insert(patient_of(db.store.as_ref(), k).await);
                }
                set
            };
            assert_eq!(patients.len(), 1, "order {order:?}: one patient");
            let id = patients.into_iter().next().unwrap();
            let row = db.store.load_patient(&id).await.unwrap().unwrap();
            assert_eq!(row.status, "active");
            let find = |s: SourceKind| keys.iter().find(|k| k.source == s).unwrap().id.to_string();
            assert_eq!(row.healthie_id, Some(find(SourceKind::Healthie)));
            assert_eq!(row.intakeq_id, Some(find(SourceKind::Intakeq)));
            assert_eq!(row.hint_id, Some(find(SourceKind::Hint)));
            assert_eq!(
                row.family_name.as_deref(),
                Some(person.family_name.as_str())
            );
            assert_eq!(row.birth_date, Some(person.birth_date));
            let provenance = db.store.load_field_sources(&id).await.unwrap();
            let given = provenance.iter().find(|f| f.field == "given_name").unwrap();
            assert_eq!(
                given.key.source,
                SourceKind::Healthie,
                "healthie wins by default"
            );
            assert!(provenance.iter().all(|f| keys.contains(&f.key)));
        }
    }
}

async fn twins_and_family_members_stay_apart(db: Db) {
    let pop = Population::generate(&PopulationConfig {
        people: 60,
        seed: 9,
        noise: Noise::none(),
        family_share: 1.0,
        twin_share: 1.0,
        duplicate_share: 0.0,
        wrong_cross_id_share: 0.0,
        ..Default::default()
    });
    assert!(
        pop.persons().iter().any(|p| p.twin_of.is_some()),
        "twins were generated"
    );
    let db = database(db).await;
    let mut keys: Vec<SourceKey> = pop.ground_truth().keys().cloned().collect();
    keys.sort();
    let records: Vec<_> = keys.iter().map(|k| parsed(&pop, k)).collect();
    apply_all(db.store.as_ref(), &records).await;
    let check = |store: Arc<dyn Store>| {
        let pop = &pop;
        let keys = keys.clone();
        async move {
            let mut person_of_patient: BTreeMap<PatientId, BTreeSet<u32>> = BTreeMap::new();
            for k in &keys {
                let p = patient_of(store.as_ref(), k).await;
                person_of_patient
                    .entry(p)
                    .or_default()
                    .insert(pop.person_of(k).unwrap().0);
            }
            for (patient, persons) in person_of_patient {
                assert_eq!(
                    persons.len(),
                    1,
                    "patient {patient} mixes people {persons:?}"
                );
            }
        }
    };
    check(db.store.clone()).await;
    run_rebuild(db.store.as_ref()).await;
    check(db.store.clone()).await;
}

fn record(
    key: &str,
    given: &str,
    email: &str,
    phone: &str,
    zip: &str,
    updated: i64,
) -> SourceRecord {
    SourceRecord {
        key: key.parse().unwrap(),
        fields: PersonFields {
            given_name: Some(given.into()),
            family_name: Some("Quillfeather".into()),
            birth_date: NaiveDate::from_ymd_opt(1980, 3, 17),
            sex: Some("female".into()),
            email: Some(email.into()),
            phones: vec![phone.into()],
            address: patient_sync::model::Address {
                line1: Some(format!("{zip} Main St")),
                postal_code: Some(zip.into()),
                ..Default::default()
            },
            ..Default::default()
        },
        status: RecordStatus::Active,
        merged_into: None,
        source_updated_at: Some(Utc.timestamp_opt(1_700_000_000 + updated, 0).unwrap()),
        fetched_at: Utc.timestamp_opt(1_700_000_000 + updated, 0).unwrap(),
        raw: serde_json::json!({"id": key}),
    }
}

/// The same name and birth date with every contact field different: a review, not a link.
fn uncertain_pair() -> (SourceRecord, SourceRecord) {
    (
        record(
            "healthie:1",
            "Maribel",
            "mq@example.org",
            "2025550101",
            "10001",
            0,
        ),
        record(
            "intakeq:7",
            "Maribel",
            "other@example.net",
            "3125550199",
            "60601",
            0,
        ),
    )
}

async fn accepting_a_review_links_the_record_and_merges_its_empty_patient(db: Db) {
    let db = database(db).await;
    let s = db.store.as_ref();
    let (a, b) = uncertain_pair();
    apply_all(s, &[a.clone(), b.clone()]).await;
    let pa = patient_of(s, &a.key).await;
    let pb = patient_of(s, &b.key).await;
    assert_ne!(pa, pb, "uncertain pairs are not linked automatically");
    let open = s.list_reviews(Some(ReviewState::Open), 10).await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].key.clone(), open[0].patient_id.clone()),
        (b.key.clone(), pa.clone())
    );
    let views = admin::list_reviews(s, Some(ReviewState::Open), 10)
        .await
        .unwrap();
    assert_eq!(
        views[0].record.as_ref().unwrap().given_name.as_deref(),
        Some("Maribel")
    );
    assert!(views[0].patient.is_some());

    let outcome = admin::accept_review(s, open[0].id, &identity(), Utc::now())
        .await
        .unwrap();
    assert_eq!(outcome.patient_id, pa);
    assert!(outcome.previous_merged);
    let link = s.load_link(&b.key).await.unwrap().unwrap();
    assert_eq!(
        (
            link.patient_id.clone(),
            link.method,
            link.decided_by.as_str()
        ),
        (pa.clone(), LinkMethod::Manual, "admin")
    );
    let old = s.load_patient(&pb).await.unwrap().unwrap();
    assert_eq!(
        (old.status.as_str(), old.merged_into.clone()),
        ("merged", Some(pa.clone()))
    );
    let row = s.load_patient(&pa).await.unwrap().unwrap();
    assert_eq!(row.intakeq_id.as_deref(), Some("7"));
    let events = s.load_link_events(&b.key).await.unwrap();
    assert_eq!(events.last().unwrap().decided_by, "admin");
    assert!(matches!(
        admin::accept_review(s, open[0].id, &identity(), Utc::now()).await,
        Err(admin::AdminError::AlreadyDecided { .. })
    ));

    // patient show on the merged-away id shows the survivor.
    let view = admin::show_patient(s, &pb).await.unwrap();
    assert_eq!(view.patient.patient_id, pa);
    assert_eq!(view.merged_path, vec![pa.clone()]);
    assert_eq!(view.records.len(), 2);
    assert!(view.history.iter().any(|e| e.decided_by == "admin"));

    // A newer snapshot and a rebuild leave the admin's link where it is.
    let mut newer = b.clone();
    newer.source_updated_at = Some(newer.source_updated_at.unwrap() + Duration::hours(1));
    newer.fields.email = Some("third@example.com".into());
    apply_all(s, &[newer]).await;
    run_rebuild(s).await;
    assert_eq!(patient_of(s, &b.key).await, pa);
    assert_eq!(
        s.load_link(&b.key).await.unwrap().unwrap().decided_by,
        "admin"
    );
}

async fn a_rejected_pair_is_never_linked_or_proposed_again(db: Db) {
    let db = database(db).await;
    let s = db.store.as_ref();
    let (a, b) = uncertain_pair();
    apply_all(s, &[a.clone(), b.clone()]).await;
    let pa = patient_of(s, &a.key).await;
    let review = s
        .list_reviews(Some(ReviewState::Open), 10)
        .await
        .unwrap()
        .remove(0);
    let rejected = admin::reject_review(s, review.id, &identity(), Utc::now())
        .await
        .unwrap();
    assert_eq!(rejected.state, ReviewState::Rejected);

    // Now a snapshot that would link on its own (same email and phone) arrives.
    let mut convincing = b.clone();
    convincing.source_updated_at = Some(convincing.source_updated_at.unwrap() + Duration::hours(1));
    convincing.fields.email = a.fields.email.clone();
    convincing.fields.phones = a.fields.phones.clone();
    apply_all(s, &[convincing]).await;
    assert_ne!(
        patient_of(s, &b.key).await,
        pa,
        "apply honours the rejection"
    );
    assert!(s
        .list_reviews(Some(ReviewState::Open), 10)
        .await
        .unwrap()
        .is_empty());
    run_rebuild(s).await;
    assert_ne!(
        patient_of(s, &b.key).await,
        pa,
        "rebuild honours the rejection"
    );
    assert!(s
        .list_reviews(Some(ReviewState::Open), 10)
        .await
        .unwrap()
        .is_empty());
}

async fn link_and_unlink_are_admin_decisions_that_survive_rebuild(db: Db) {
    let db = database(db).await;
    let s = db.store.as_ref();
    let (a, b) = uncertain_pair();
    // A third record that links to `a` automatically (same email, phone and address).
    let c = record(
        "hint:pat-3",
        "Maribel",
        "mq@example.org",
        "2025550101",
        "10001",
        0,
    );
    apply_all(s, &[a.clone(), b.clone(), c.clone()]).await;
    let pa = patient_of(s, &a.key).await;
    assert_eq!(patient_of(s, &c.key).await, pa, "c links automatically");

    // link: b joins a's patient by hand.
    let linked = admin::link_record(s, &b.key, &pa, &identity(), Utc::now())
        .await
        .unwrap();
    assert_eq!(linked.patient_id, pa);
    assert_eq!(
        s.list_reviews(Some(ReviewState::Accepted), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // unlink: c is split off; the old patient loses c's influence.
    let split = admin::unlink_record(s, &c.key, &identity(), Utc::now())
        .await
        .unwrap();
    let pc = split.patient_id.clone();
    assert_ne!(pc, pa);
    let row = s.load_patient(&pa).await.unwrap().unwrap();
    assert_eq!(
        row.hint_id, None,
        "the split record no longer feeds the old patient"
    );
    let new_row = s.load_patient(&pc).await.unwrap().unwrap();
    assert_eq!(new_row.hint_id.as_deref(), Some("pat-3"));
    let rejected = s
        .list_reviews(Some(ReviewState::Rejected), 10)
        .await
        .unwrap();
    assert_eq!(
        (rejected[0].key.clone(), rejected[0].patient_id.clone()),
        (c.key.clone(), pa.clone())
    );
    assert!(matches!(
        admin::unlink_record(s, &c.key, &identity(), Utc::now()).await,
        Err(admin::AdminError::OnlyRecord(_))
    ));

    // Neither a newer snapshot nor two rebuilds undo the decisions.
    let mut newer = c.clone();
    newer.source_updated_at = Some(newer.source_updated_at.unwrap() + Duration::hours(2));
    apply_all(s, &[newer]).await;
    for _ in 0..2 {
        run_rebuild(s).await;
        assert_eq!(patient_of(s, &a.key).await, pa);
        assert_eq!(patient_of(s, &b.key).await, pa);
        assert_eq!(patient_of(s, &c.key).await, pc);
    }
    let second = run_rebuild(s).await;
    assert_eq!(second.changes(), 0, "{second:?}");
}

async fn rebuild_twice_changes_nothing(db: Db) {
    let pop = population(120, 21, Noise::default());
    let db = database(db).await;
    let s = db.store.as_ref();
    let mut keys: Vec<SourceKey> = pop.ground_truth().keys().cloned().collect();
    // Arrival order unlike key order, so the first rebuild has something to reconsider.
    keys.sort_by_key(|k| (k.id.to_string(), k.source));
    let records: Vec<_> = keys.iter().map(|k| parsed(&pop, k)).collect();
    apply_all(s, &records).await;

    let first = run_rebuild(s).await;
    assert_eq!(first.records as usize, keys.len());
    let rows = all_patients(s).await;
    let links: Vec<_> = {
        let mut v = Vec::new();
        for k in &keys {
            v.push(s.load_link(k).await.unwrap().unwrap());
        }
        v
    };
    let mut events = 0;
    for k in &keys {
        events += s.load_link_events(k).await.unwrap().len();
    }

    let dry = rebuild(
        s,
        &identity(),
        &RebuildOptions {
            dry_run: true,
            ..Default::default()
        },
        Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(dry.changes(), 0, "{dry:?}");
    let second = run_rebuild(s).await;
    assert_eq!(second.changes(), 0, "{second:?}");
    assert_eq!(all_patients(s).await, rows, "no new versions");
    for (k, before) in keys.iter().zip(&links) {
        assert_eq!(&s.load_link(k).await.unwrap().unwrap(), before);
    }
    let mut after = 0;
    for k in &keys {
        after += s.load_link_events(k).await.unwrap().len();
    }
    assert_eq!(after, events, "no new link events");

    // Precision stays high: few patients mix people.
    let mut persons: BTreeMap<PatientId, BTreeSet<u32>> = BTreeMap::new();
    for (k, l) in keys.iter().zip(&links) {
        persons
            .entry(l.patient_id.clone())
            .or_default()
            .insert(pop.person_of(k).unwrap().0);
    }
    let mixed = persons.values().filter(|p| p.len() > 1).count();
    assert!(
        mixed * 50 <= persons.len(),
        "{mixed} of {} patients mix people",
        persons.len()
    );
}

async fn rebuild_from_bare_source_records_links_everything_and_dry_run_writes_nothing(db: Db) {
    let pop = population(40, 3, Noise::none());
    let db = database(db).await;
    let s = db.store.as_ref();
    let mut tx = s.begin().await.unwrap();
    let mut keys: Vec<SourceKey> = pop.ground_truth().keys().cloned().collect();
    keys.sort();
    for k in &keys {
        tx.save_source_record(&parsed(&pop, k)).await.unwrap();
    }
    tx.commit().await.unwrap();

    let dry = rebuild(
        s,
        &identity(),
        &RebuildOptions {
            dry_run: true,
            ..Default::default()
        },
        Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(dry.links_created as usize, keys.len());
    assert!(all_patients(s).await.is_empty(), "a dry run writes nothing");

    let real = run_rebuild(s).await;
    assert_eq!(real.links_created, dry.links_created);
    assert_eq!(real.patients_created, dry.patients_created);
    for k in &keys {
        assert!(s.load_link(k).await.unwrap().is_some());
    }
    assert_eq!(run_rebuild(s).await.changes(), 0);
}

fn jsonl(lines: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        writeln!(out, "{l}").unwrap();
    }
    out
}

async fn import_counts_created_updated_unchanged_and_rejected_lines(db: Db) {
    let pop = population(30, 4, Noise::none());
    let db = database(db).await;
    let s = db.store.as_ref();
    let users: Vec<serde_json::Value> = pop.healthie_users().take(3).cloned().collect();
    let source = sources()[&SourceKind::Healthie].clone();
    let mut lines: Vec<String> = users.iter().map(|u| u.to_string()).collect();
    // A byte order mark before the first line and Windows line ends, as spreadsheet tools
    // write them, are not errors.
    lines[0] = format!("\u{feff}{}", lines[0]);
    lines[2].push('\r');
    lines.insert(1, "{not json".into());
    lines.push(r#"{"first_name": "Nobody"}"#.into());
    lines.push(String::new());

    let first = import_lines(
        s,
        source.as_ref(),
        jsonl(&lines).as_slice(),
        &identity(),
        Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            first.created,
            first.updated,
            first.unchanged,
            first.rejected
        ),
        (3, 0, 0, 2)
    );
    let bad: Vec<u64> = first.rejected_lines.iter().map(|r| r.line).collect();
    assert_eq!(bad, vec![2, 5]);
    assert!(
        !first.render_text().contains("Nobody"),
        "no values in the report"
    );

    let mut changed = users[2].clone();
    changed["email"] = serde_json::json!("changed.address@example.com");
    changed["updated_at"] = serde_json::json!("2030-01-01 00:00:00 -0500");
    let again = vec![
        users[0].to_string(),
        users[1].to_string(),
        changed.to_string(),
    ];
    let second = import_lines(
        s,
        source.as_ref(),
        jsonl(&again).as_slice(),
        &identity(),
        Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            second.created,
            second.updated,
            second.unchanged,
            second.rejected
        ),
        (0, 1, 2, 0)
    );
    let id = users[2]["id"].as_str().unwrap();
    let patient = patient_of(s, &SourceKey::new(SourceKind::Healthie, id)).await;
    let row = s.load_patient(&patient).await.unwrap().unwrap();
    assert_eq!(row.email.as_deref(), Some("changed.address@example.com"));
}

on_both_backends!(
    same_person_from_three_systems_in_any_order_is_one_patient_with_provenance,
    twins_and_family_members_stay_apart,
    accepting_a_review_links_the_record_and_merges_its_empty_patient,
    a_rejected_pair_is_never_linked_or_proposed_again,
    link_and_unlink_are_admin_decisions_that_survive_rebuild,
    rebuild_twice_changes_nothing,
    rebuild_from_bare_source_records_links_everything_and_dry_run_writes_nothing,
    import_counts_created_updated_unchanged_and_rejected_lines,
);

#[test]
fn the_binary_imports_a_file_and_shows_the_patient() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cli.sqlite");
    let url = format!("sqlite:{}", db.display());
    let pop = population(20, 8, Noise::none());
    let users: Vec<serde_json::Value> = pop.healthie_users().take(2).cloned().collect();
    let file = dir.path().join("healthie.jsonl");
    let lines = vec![
        users[0].to_string(),
        "garbage".to_string(),
        users[1].to_string(),
    ];
    std::fs::write(&file, jsonl(&lines)).unwrap();

    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_patient-sync"))
            .args(args)
            .env("PATIENT_SYNC_DATABASE__URL", &url)
            .env("PATIENT_SYNC_LOG__FORMAT", "json")
            .env_remove("RUST_LOG")
            .output()
            .expect("the binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{args:?}: {stdout}\n{stderr}");
        (stdout, stderr)
    };
    let (stdout, stderr) = run(&[
        "import",
        "--source",
        "healthie",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(stdout.contains("line 2: rejected"), "{stdout}");
    assert!(stdout.contains("2 created"), "{stdout}");
    assert!(stdout.contains("1 rejected"), "{stdout}");
    let family = users[0]["last_name"].as_str().unwrap();
    assert!(!stderr.contains(family), "no PHI in logs: {stderr}");

    let (json, _) = run(&[
        "import",
        "--source",
        "healthie",
        "--file",
        file.to_str().unwrap(),
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(summary["unchanged"], 2);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let patient = rt.block_on(async {
        let store = patient_sync::store::connect(&url, 1).await.unwrap();
        let id = users[0]["id"].as_str().unwrap();
        patient_of(store.as_ref(), &SourceKey::new(SourceKind::Healthie, id)).await
    });
    let (shown, stderr) = run(&["patient", "show", patient.as_str()]);
    assert!(shown.contains(&format!("patient {patient}")), "{shown}");
    assert!(shown.contains(family), "the admin sees the fields: {shown}");
    assert!(shown.contains(&format!("healthie:{}", users[0]["id"].as_str().unwrap())));
    assert!(shown.contains("history:"));
    assert!(!stderr.contains(family), "no PHI in logs: {stderr}");

    let (rebuilt, _) = run(&["rebuild", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&rebuilt).unwrap();
    assert_eq!(report["records"], 2);
    assert_eq!(report["links_moved"], 0);
    let (reviews, _) = run(&["review", "list", "--json"]);
    assert!(serde_json::from_str::<serde_json::Value>(&reviews)
        .unwrap()
        .is_array());
}
