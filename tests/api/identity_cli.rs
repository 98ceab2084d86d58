//! Identity through the real binary: one household's records arrive by `patient-sync import`
//! from all three systems, in each of the six orders of the systems. The person present in all
//! three ends as one patient whose field provenance does not depend on the order, while twins
//! and the other household members stay patients of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use patient_sync::model::{PatientId, SourceKey, SourceKind};
use patient_sync::sandbox::population::{Noise, Person, Population, PopulationConfig};
use patient_sync::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

/// A household with twins and a member with exactly one record in each system.
fn household_population() -> (Population, u32, PersonIdSet) {
    for seed in 1..200 {
        let pop = Population::generate(&PopulationConfig {
            people: 40,
            seed,
            noise: Noise::none(),
            family_share: 1.0,
            twin_share: 1.0,
            duplicate_share: 0.0,
            wrong_cross_id_share: 0.0,
            archived_share: 0.0,
            ..Default::default()
        });
        let in_all_three = |p: &Person| {
            let systems: BTreeSet<_> = p.records.iter().map(|k| k.source).collect();
            systems.len() == 3 && p.records.len() == 3
        };
        for person in pop.persons().iter().filter(|p| in_all_three(p)) {
            let Some(household) = person.household else {
                continue;
            };
            let members: Vec<&Person> = pop
                .persons()
                .iter()
                .filter(|p| p.household == Some(household) && !p.records.is_empty())
                .collect();
            let twins = members.iter().any(|p| {
                p.twin_of
                    .is_some_and(|t| members.iter().any(|m| m.id == t && !m.records.is_empty()))
            });
            if twins && members.len() >= 3 {
                let ids = members.iter().map(|p| p.id.0).collect();
                let main = person.id.0;
                return (pop, main, ids);
            }
        }
    }
    panic!("no seed gives a household with twins and a member in all three systems");
}

type PersonIdSet = BTreeSet<u32>;

fn import(db_url: &str, source: SourceKind, file: &std::path::Path) {
    let out = std::process::Command::new(BIN)
        .args([
            "import",
            "--source",
            source.as_str(),
            "--file",
            file.to_str().unwrap(),
            "--json",
        ])
        .env("PATIENT_SYNC_DATABASE__URL", db_url)
        .env("PATIENT_SYNC_LOG__LEVEL", "warn")
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "import {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rejected"], 0, "{summary}");
}

/// What a permutation produced for the person in all three systems: the canonical values and
/// the record each field came from.
#[derive(Debug, PartialEq)]
struct Outcome {
    values: Vec<Option<String>>,
    provenance: BTreeSet<(String, SourceKey)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_person_from_three_systems_in_every_order_is_one_patient_and_relatives_stay_apart() {
    let (pop, main, household) = household_population();
    let person = pop.person(patient_sync::sandbox::PersonId(main)).unwrap();
    let keys: BTreeSet<SourceKey> = household
        .iter()
        .flat_map(|&id| {
            pop.person(patient_sync::sandbox::PersonId(id))
                .unwrap()
                .records
                .clone()
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let mut files = BTreeMap::new();
    for source in SourceKind::ALL {
        let path = dir.path().join(format!("{source}.jsonl"));
        let mut f = std::fs::File::create(&path).unwrap();
        for key in keys.iter().filter(|k| k.source == source) {
            let json = &pop.table(source).get(key.id.as_str()).unwrap().json;
            writeln!(f, "{json}").unwrap();
        }
        files.insert(source, path);
    }

    use SourceKind::{Healthie, Hint, Intakeq};
    let orders = [
        [Healthie, Intakeq, Hint],
        [Healthie, Hint, Intakeq],
        [Intakeq, Healthie, Hint],
        [Intakeq, Hint, Healthie],
        [Hint, Healthie, Intakeq],
        [Hint, Intakeq, Healthie],
    ];
    let mut outcomes = Vec::new();
    for (n, order) in orders.iter().enumerate() {
        let url = format!(
            "sqlite:{}",
            dir.path().join(format!("o{n}.sqlite")).display()
        );
        for source in order {
            import(&url, *source, &files[source]);
        }
        let store = patient_sync::store::connect(&url, 1).await.unwrap();

        // Every patient holds the records of one person, and each person is one patient.
        let mut persons_of: BTreeMap<PatientId, BTreeSet<u32>> = BTreeMap::new();
        let mut patients_of: BTreeMap<u32, BTreeSet<PatientId>> = BTreeMap::new();
        for key in &keys {
            let link = store.load_link(key).await.unwrap().expect("linked");
            let who = pop.person_of(key).unwrap().0;
            persons_of
                .entry(link.patient_id.clone())
                .or_default()
                .insert(who);
            patients_of.entry(who).or_default().insert(link.patient_id);
        }
        for (patient, persons) in &persons_of {
            assert_eq!(
                persons.len(),
                1,
                "order {order:?}: patient {patient} mixes people {persons:?}"
            );
        }
        for (who, patients) in &patients_of {
            assert_eq!(
                patients.len(),
                1,
                "order {order:?}: person {who} is split over {patients:?}"
            );
        }

        let patient = patients_of[&main].iter().next().unwrap().clone();
        outcomes.push(outcome(store.as_ref(), &patient, person, order).await);
    }
    for (n, o) in outcomes.iter().enumerate().skip(1) {
        assert_eq!(
            o, &outcomes[0],
            "order {:?} differs from the first",
            orders[n]
        );
    }
}

async fn outcome(
    store: &dyn Store,
    patient: &PatientId,
    person: &Person,
    order: &[SourceKind; 3],
) -> Outcome {
    let row = store.load_patient(patient).await.unwrap().unwrap();
    assert_eq!(row.status, "active", "order {order:?}");
    let id_of = |s: SourceKind| {
        person
            .records
            .iter()
            .find(|k| k.source == s)
            .map(|k| k.id.to_string())
    };
    assert_eq!(row.healthie_id, id_of(SourceKind::Healthie));
    assert_eq!(row.intakeq_id, id_of(SourceKind::Intakeq));
    assert_eq!(row.hint_id, id_of(SourceKind::Hint));
    assert_eq!(
        row.family_name.as_deref(),
        Some(person.family_name.as_str())
    );
    assert_eq!(row.birth_date, Some(person.birth_date));

    let provenance: BTreeSet<(String, SourceKey)> = store
        .load_field_sources(patient)
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.field, f.key))
        .collect();
    assert!(
        provenance.iter().all(|(_, k)| person.records.contains(k)),
        "order {order:?}: every field comes from one of the person's records"
    );
    // Healthie is first in the default priority and holds every name and the birth date.
    for field in ["given_name", "family_name", "birth_date"] {
        let winner = provenance.iter().find(|(f, _)| f == field);
        assert_eq!(
            winner.map(|(_, k)| k.source),
            Some(SourceKind::Healthie),
            "order {order:?}: {field}"
        );
    }
    Outcome {
        values: vec![
            row.given_name,
            row.family_name,
            row.birth_date.map(|d| d.to_string()),
            row.sex,
            row.email,
            row.phone,
            row.address_line1,
            row.postal_code,
        ],
        provenance,
    }
}
