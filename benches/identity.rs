//! Identity accuracy benchmark: a synthetic population with ground truth (typos, nicknames,
//! swapped fields, missing values, format differences, twins, families sharing contacts, people
//! who changed surname or email) goes through the real conversion and apply path into SQLite, in
//! a shuffled order, and the resulting links are scored pairwise against the truth.
//!
//! Run: `cargo bench --bench identity -- [--people N] [--seed S] [--explain]
//! [--link-without-dob]`. Prints figures and the machine; `--explain` adds the missed and false
//! pairs grouped by the generator's perturbations and by comparison levels (levels and scores
//! only, the data is synthetic); `--link-without-dob` turns on `identity.link_without_birth_date`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use patient_sync::config::Settings;
use patient_sync::identity::explain;
use patient_sync::metrics::Metrics;
use patient_sync::model::{SourceKey, SourceKind, SourceRecord};
use patient_sync::sandbox::population::{Perturbation, Population, PopulationConfig};
use patient_sync::sources::{healthie::Healthie, hint::Hint, intakeq::Intakeq, Source};
use patient_sync::store::{self, ReviewState};
use patient_sync::sync::apply::{apply_record, IdentitySettings};
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Scores {
    precision: f64,
    recall: f64,
    f1: f64,
    false_pairs: usize,
}

fn score(
    predicted: &BTreeSet<(SourceKey, SourceKey)>,
    truth: &BTreeSet<(SourceKey, SourceKey)>,
) -> Scores {
    let tp = predicted.intersection(truth).count() as f64;
    let precision = if predicted.is_empty() {
        1.0
    } else {
        tp / predicted.len() as f64
    };
    let recall = if truth.is_empty() {
        1.0
    } else {
        tp / truth.len() as f64
    };
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    Scores {
        precision,
        recall,
        f1,
        false_pairs: predicted.difference(truth).count(),
    }
}

fn pairs(clusters: &BTreeMap<String, Vec<SourceKey>>) -> BTreeSet<(SourceKey, SourceKey)> {
    let mut out = BTreeSet::new();
    for keys in clusters.values() {
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                let (a, b) = (keys[i].clone(), keys[j].clone());
                out.insert(if a < b { (a, b) } else { (b, a) });
            }
        }
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let people = arg("--people", 3000) as usize;
    let seed = arg("--seed", 42);
    println!("identity benchmark: {people} people, seed {seed}");
    println!("machine: {}", patient_sync::machine::describe());

    let started = Instant::now();
    let population = Population::generate(&PopulationConfig {
        people,
        seed,
        ..Default::default()
    });
    println!(
        "population generated in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let settings = Settings::load_from(None, &[])?;
    let metrics = Arc::new(Metrics::new());
    let sources: BTreeMap<SourceKind, Box<dyn Source>> = BTreeMap::from([
        (
            SourceKind::Healthie,
            Box::new(Healthie::new(&settings.sources.healthie, metrics.clone())) as Box<dyn Source>,
        ),
        (
            SourceKind::Intakeq,
            Box::new(Intakeq::new(&settings.sources.intakeq, metrics.clone())),
        ),
        (
            SourceKind::Hint,
            Box::new(Hint::new(&settings.sources.hint, metrics.clone())),
        ),
    ]);
    let now = Utc::now();
    let mut records = Vec::new();
    for source in SourceKind::ALL {
        for stored in population
            .table(source)
            .all()
            .iter()
            .filter(|r| r.deleted_at.is_none())
        {
            records.push(sources[&source].parse_record(&stored.json, now)?);
        }
    }
    records.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));

    let dir = tempfile::tempdir()?;
    let store = store::connect(
        &format!("sqlite:{}", dir.path().join("bench.sqlite").display()),
        4,
    )
    .await?;
    store.migrate().await?;
    let mut identity = IdentitySettings::default();
    identity.matching.link_without_birth_date = std::env::args().any(|a| a == "--link-without-dob");
    println!(
        "identity.link_without_birth_date = {}",
        identity.matching.link_without_birth_date
    );
    let applying = Instant::now();
    for chunk in records.chunks(500) {
        let mut tx = store.begin().await?;
        for record in chunk {
            apply_record(tx.as_mut(), record, &identity, now).await?;
        }
        tx.commit().await?;
    }
    let apply_secs = applying.elapsed().as_secs_f64();

    let mut clusters: BTreeMap<String, Vec<SourceKey>> = BTreeMap::new();
    for record in &records {
        if let Some(link) = store.load_link(&record.key).await? {
            clusters
                .entry(link.patient_id.0)
                .or_default()
                .push(record.key.clone());
        }
    }
    let seen: BTreeSet<&SourceKey> = records.iter().map(|r| &r.key).collect();
    let truth: BTreeSet<(SourceKey, SourceKey)> = population
        .ground_truth_pairs()
        .into_iter()
        .filter(|(a, b)| seen.contains(a) && seen.contains(b))
        .collect();
    let auto_pairs = pairs(&clusters);
    let auto = score(&auto_pairs, &truth);

    // Auto-links plus what accepting every open review would add: the record with each record
    // of the proposed patient (followed to its survivor when it was merged away).
    let mut with_review = auto_pairs.clone();
    let reviews = store
        .list_reviews(Some(ReviewState::Open), u32::MAX)
        .await?;
    for review in &reviews {
        let mut patient = review.patient_id.clone();
        for _ in 0..8 {
            match store.load_patient(&patient).await? {
                Some(row) if row.merged_into.is_some() => patient = row.merged_into.unwrap(),
                _ => break,
            }
        }
        for other in clusters.get(&patient.0).into_iter().flatten() {
            if *other != review.key {
                let (a, b) = (review.key.clone(), other.clone());
                with_review.insert(if a < b { (a, b) } else { (b, a) });
            }
        }
    }
    let reviewed = score(&with_review, &truth);
    // Two records of one person in the same system never link automatically (only through the
    // source's own merge or an admin), so recall is also shown for people without such a pair.
    let duplicated: BTreeSet<_> = population
        .persons()
        .iter()
        .filter(|p| {
            let systems: BTreeSet<_> = p.records.iter().map(|k| k.source).collect();
            systems.len() < p.records.len()
        })
        .map(|p| p.id)
        .collect();
    let truth_single: BTreeSet<(SourceKey, SourceKey)> = truth
        .iter()
        .filter(|(a, _)| {
            population
                .person_of(a)
                .is_some_and(|p| !duplicated.contains(&p))
        })
        .cloned()
        .collect();
    let auto_single = score(
        &auto_pairs
            .iter()
            .filter(|(a, b)| truth_single.contains(&(a.clone(), b.clone())))
            .cloned()
            .collect(),
        &truth_single,
    );
    // What the guards allow at best: a patient holds one record per system, so a person with
    // records in k systems contributes at most k(k-1)/2 linked pairs; and a record without a
    // usable birth date (missing or a placeholder) links automatically only through a trusted
    // id, or through `name_email_contact` when `--link-without-dob` allows it.
    let mut by_person: BTreeMap<_, BTreeSet<SourceKind>> = BTreeMap::new();
    for (a, b) in &truth {
        if let Some(p) = population.person_of(a) {
            by_person.entry(p).or_default().extend([a.source, b.source]);
        }
    }
    let per_system: usize = by_person
        .values()
        .map(|s| s.len() * (s.len() - 1) / 2)
        .sum();
    let undated = |k: &SourceKey| {
        population.perturbations(k).iter().any(|p| {
            matches!(
                p,
                Perturbation::MissingBirthDate | Perturbation::PlaceholderBirthDate
            )
        })
    };
    let undated_pairs: Vec<_> = truth
        .iter()
        .filter(|(a, b)| undated(a) || undated(b))
        .collect();
    let undated_linked = undated_pairs
        .iter()
        .filter(|p| auto_pairs.contains(p))
        .count();
    let false_merges = clusters
        .values()
        .filter(|keys| {
            keys.iter()
                .filter_map(|k| population.person_of(k))
                .collect::<BTreeSet<_>>()
                .len()
                > 1
        })
        .count();
    let patients: i64 = store.count_patients().await?.iter().map(|(_, n)| n).sum();

    println!();
    println!(
        "records applied        {} in {:.2} s ({:.0} records/s)",
        records.len(),
        apply_secs,
        records.len() as f64 / apply_secs
    );
    println!(
        "people / patients      {} / {}",
        population.persons().len(),
        patients
    );
    println!("true same-person pairs {}", truth.len());
    let key_count: usize = records
        .iter()
        .map(|r| patient_sync::identity::record_blocking_keys(r, &identity.matching).len())
        .sum();
    println!(
        "blocking keys          {:.2} per record",
        key_count as f64 / records.len().max(1) as f64
    );
    println!(
        "auto-links             precision {:.4}  recall {:.4}  F1 {:.4}  false pairs {}",
        auto.precision, auto.recall, auto.f1, auto.false_pairs
    );
    println!(
        "auto-links + review    precision {:.4}  recall {:.4}  F1 {:.4}  false pairs {}  ({} open reviews)",
        reviewed.precision,
        reviewed.recall,
        reviewed.f1,
        reviewed.false_pairs,
        reviews.len()
    );
    println!(
        "auto-links, people without a same-system duplicate ({} pairs): recall {:.4}",
        truth_single.len(),
        auto_single.recall
    );
    println!(
        "auto-link ceiling      {:.4} (one record per system per patient); {} true pairs hold a record without a usable birth date, {} of them linked",
        per_system as f64 / truth.len().max(1) as f64,
        undated_pairs.len(),
        undated_linked
    );
    println!("false merges           {false_merges} patients hold records of two or more people");

    if std::env::args().any(|a| a == "--explain") {
        let by_key: BTreeMap<&SourceKey, &SourceRecord> =
            records.iter().map(|r| (&r.key, r)).collect();
        let cfg = &identity.matching;
        let describe = |label: &str, set: Vec<&(SourceKey, SourceKey)>| {
            let mut tags: BTreeMap<String, usize> = BTreeMap::new();
            let mut shapes: BTreeMap<String, usize> = BTreeMap::new();
            for (a, b) in &set {
                let mut t: BTreeSet<&str> = population
                    .perturbations(a)
                    .iter()
                    .chain(population.perturbations(b))
                    .map(|p| p.as_str())
                    .collect();
                if a.source == b.source {
                    t.insert("same_source");
                }
                if t.is_empty() {
                    t.insert("none");
                }
                for tag in t {
                    *tags.entry(tag.to_string()).or_default() += 1;
                }
                let s = explain(&by_key[a].fields, &by_key[b].fields, cfg);
                let shape = s
                    .contributions
                    .iter()
                    .map(|c| format!("{}={}", c.field, c.level))
                    .collect::<Vec<_>>()
                    .join(" ");
                *shapes
                    .entry(format!("{:>6.1} {shape}", s.total))
                    .or_default() += 1;
            }
            println!();
            println!(
                "{label}: {} pairs; by perturbation (either record):",
                set.len()
            );
            let mut tags: Vec<_> = tags.into_iter().collect();
            tags.sort_by_key(|x| std::cmp::Reverse(x.1));
            for (tag, n) in tags {
                println!("  {n:>5}  {tag}");
            }
            let mut shapes: Vec<_> = shapes.into_iter().collect();
            shapes.sort_by_key(|x| std::cmp::Reverse(x.1));
            println!("  most common comparisons (score, levels):");
            for (shape, n) in shapes.into_iter().take(25) {
                println!("  {n:>5}  {shape}");
            }
        };
        describe(
            "missed by auto-links",
            truth.difference(&auto_pairs).collect(),
        );
        describe(
            "missed by auto-links, people without a same-system duplicate",
            truth_single.difference(&auto_pairs).collect(),
        );
        describe(
            "false pairs of auto-links",
            auto_pairs.difference(&truth).collect(),
        );
        describe(
            "missed even with review",
            truth.difference(&with_review).collect(),
        );
        describe(
            "false pairs with review",
            with_review.difference(&truth).collect(),
        );
    }
    Ok(())
}
