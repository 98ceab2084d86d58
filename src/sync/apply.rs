//! Applying one source record: save the snapshot (monotonic), decide its canonical patient with
//! `identity`, and recompute the golden rows it touches, all inside the caller's transaction.

use chrono::{DateTime, Utc};

use crate::identity::{self, Candidate, LinkTarget, MatchConfig, SurvivorshipConfig};
use crate::model::{PatientId, RecordStatus, SourceKey, SourceRecord};
use crate::store::{Link, LinkEvent, LinkMethod, PatientRow, SaveOutcome, StoreResult, StoreTx};

/// Matching and survivorship settings, shared by every apply.
#[derive(Debug, Clone, Default)]
pub struct IdentitySettings {
    pub matching: MatchConfig,
    pub survivorship: SurvivorshipConfig,
}

/// What applying one record did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub outcome: SaveOutcome,
    /// The canonical patient the record is linked to afterwards.
    pub patient_id: Option<PatientId>,
}

/// Takes the lock [`apply_record`] takes first for each of `keys`, all at once and sorted, so
/// that two transactions applying overlapping sets of records wait for each other instead of
/// deadlocking. Taking one again later in the same transaction is free.
pub async fn lock_records<'a>(
    tx: &mut dyn StoreTx,
    keys: impl IntoIterator<Item = &'a SourceKey>,
) -> StoreResult<()> {
    let held: std::collections::BTreeSet<String> =
        keys.into_iter().map(|k| k.to_string()).collect();
    for key in &held {
        tx.lock(key).await?;
    }
    Ok(())
}

/// Saves `record` and brings links and canonical rows up to date. Stale snapshots change
/// nothing; unchanged ones only make sure the record is linked.
pub async fn apply_record(
    tx: &mut dyn StoreTx,
    record: &SourceRecord,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> StoreResult<Applied> {
    tx.lock(&record.key.to_string()).await?;
    // A merge the source reported (Healthie `patient.merged`) and a plain snapshot of the same
    // state of the merged-away record (same source `updated_at`) end merged, whichever is
    // applied or was fetched first; only a newer snapshot undoes the merge.
    let same_state;
    let record = match tx.load_source_record(&record.key).await? {
        Some(old)
            if (old.status == RecordStatus::Merged) != (record.status == RecordStatus::Merged)
                && record.source_updated_at.is_some()
                && record.source_updated_at == old.source_updated_at =>
        {
            let merged = if old.status == RecordStatus::Merged {
                &old
            } else {
                record
            };
            same_state = SourceRecord {
                status: RecordStatus::Merged,
                merged_into: merged.merged_into.clone(),
                fetched_at: old.fetched_at.max(record.fetched_at),
                ..record.clone()
            };
            &same_state
        }
        _ => record,
    };
    let outcome = tx.save_source_record(record).await?;
    let existing = tx.load_link(&record.key).await?;
    if outcome == SaveOutcome::Stale || (outcome == SaveOutcome::Unchanged && existing.is_some()) {
        return Ok(Applied {
            outcome,
            patient_id: existing.map(|l| l.patient_id),
        });
    }
    let keys = identity::record_blocking_keys(record, &settings.matching);
    // Two records of one person applied at once by two workers (Postgres) would each miss the
    // other's uncommitted keys and start two patients. Records that can match share a blocking
    // key, so holding every key (in one order) until commit makes the second see the first.
    let mut held: Vec<&String> = keys.iter().collect();
    held.sort();
    held.dedup();
    for key in held {
        tx.lock(&format!("match_key:{key}")).await?;
    }
    tx.replace_match_keys(&record.key, &keys).await?;

    // An admin's decision sticks, and so does an automatic link to a patient that other records
    // share: moving it would need evidence against the rest of that patient, which is rebuild's job.
    let patient_id = match existing {
        Some(link) if link.is_manual() || !is_singleton(tx, &link.patient_id).await? => {
            link.patient_id
        }
        existing => {
            let decided = decide_for(tx, record, &keys, settings, now).await?;
            match (existing, decided) {
                (Some(link), None) => link.patient_id,
                (Some(link), Some(target)) if target.patient_id == link.patient_id => {
                    link.patient_id
                }
                (previous, Some(target)) => {
                    save_link(tx, record.key.clone(), &target, previous.as_ref(), now).await?;
                    if let Some(previous) = previous {
                        fold_patient(tx, &previous.patient_id, &target.patient_id, settings, now)
                            .await?;
                    }
                    target.patient_id
                }
                (None, None) => {
                    let target = Target::new_patient();
                    save_link(tx, record.key.clone(), &target, None, now).await?;
                    target.patient_id
                }
            }
        }
    };
    // Work on one canonical patient is serialized: another record of the same patient applied
    // concurrently (another worker or process) waits here until this transaction ends, so the
    // row below is recomputed from committed records and versions never repeat.
    tx.lock(patient_id.as_str()).await?;
    // Merged away upstream (Hint `merged_into`, Healthie `patient.merged`): the source says
    // both records are one person, so this record's patient folds into the survivor's.
    if record.status == RecordStatus::Merged {
        if let Some(into) = &record.merged_into {
            let survivor = SourceKey::new(record.key.source, into.clone());
            if let Some(link) = tx.load_link(&survivor).await? {
                if link.patient_id != patient_id {
                    fold_patient(tx, &patient_id, &link.patient_id, settings, now).await?;
                    return Ok(Applied {
                        outcome,
                        patient_id: Some(link.patient_id),
                    });
                }
            }
        }
    }
    refresh_patient(tx, &patient_id, settings, now).await?;
    Ok(Applied {
        outcome,
        patient_id: Some(patient_id),
    })
}

/// A decided link target.
struct Target {
    patient_id: PatientId,
    method: LinkMethod,
    rule: Option<String>,
    score: Option<f64>,
}

impl Target {
    fn new_patient() -> Self {
        Self {
            patient_id: PatientId::generate(),
            method: LinkMethod::New,
            rule: None,
            score: None,
        }
    }
}

async fn is_singleton(tx: &mut dyn StoreTx, patient_id: &PatientId) -> StoreResult<bool> {
    Ok(tx.load_patient_links(patient_id).await?.len() <= 1)
}

/// Runs the evidence ladder against the candidates the blocking keys find; opens reviews for
/// uncertain pairs. `None` means no existing patient qualifies.
async fn decide_for(
    tx: &mut dyn StoreTx,
    record: &SourceRecord,
    keys: &[String],
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> StoreResult<Option<Target>> {
    let rejected = tx.load_rejected_patients(&record.key).await?;
    let mut candidates = Vec::new();
    for patient_id in tx.find_candidate_patients(keys, &record.key).await? {
        tx.lock(patient_id.as_str()).await?;
        let records = tx.load_linked_records(&patient_id).await?;
        candidates.push(Candidate {
            rejected: rejected.contains(&patient_id),
            patient_id,
            records,
        });
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    let decision = identity::decide(record, &candidates, &settings.matching);
    for review in &decision.reviews {
        tx.open_review(&record.key, &review.patient_id, review.score, now)
            .await?;
    }
    Ok(match decision.target {
        LinkTarget::NewPatient => None,
        LinkTarget::Existing {
            patient_id,
            method,
            rule,
            score,
        } => Some(Target {
            patient_id,
            method,
            rule,
            score,
        }),
    })
}

async fn save_link(
    tx: &mut dyn StoreTx,
    key: SourceKey,
    target: &Target,
    previous: Option<&Link>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let link = Link {
        key: key.clone(),
        patient_id: target.patient_id.clone(),
        method: target.method,
        rule: target.rule.clone(),
        score: target.score,
        decided_by: "auto".into(),
        decided_at: now,
    };
    let event = LinkEvent {
        key,
        action: if previous.is_some() { "relink" } else { "link" }.into(),
        patient_id: Some(target.patient_id.clone()),
        previous_patient_id: previous.map(|p| p.patient_id.clone()),
        method: target.method,
        rule: target.rule.clone(),
        score: target.score,
        decided_by: "auto".into(),
        at: now,
    };
    tx.save_link(&link, &event).await
}

/// Moves every link of `from` to `into` and leaves `from` as a `merged` row pointing at `into`,
/// so analysts' queries on either id still resolve.
pub async fn fold_patient(
    tx: &mut dyn StoreTx,
    from: &PatientId,
    into: &PatientId,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    if from == into {
        return Ok(());
    }
    tx.lock(from.as_str()).await?;
    tx.lock(into.as_str()).await?;
    for link in tx.load_patient_links(from).await? {
        let moved = Link {
            patient_id: into.clone(),
            decided_at: now,
            ..link.clone()
        };
        let event = LinkEvent {
            key: link.key.clone(),
            action: "relink".into(),
            patient_id: Some(into.clone()),
            previous_patient_id: Some(from.clone()),
            method: LinkMethod::SourceMerge,
            rule: Some("patient_folded".into()),
            score: None,
            decided_by: link.decided_by.clone(),
            at: now,
        };
        tx.save_link(&moved, &event).await?;
    }
    if let Some(mut row) = tx.load_patient(from).await? {
        row.status = "merged".into();
        row.merged_into = Some(into.clone());
        row.updated_at = now;
        row.version += 1;
        tx.save_patient(&row, &[]).await?;
    }
    refresh_patient(tx, into, settings, now).await
}

/// Recomputes a canonical row from every record linked to it and saves it when it changed.
pub async fn refresh_patient(
    tx: &mut dyn StoreTx,
    patient_id: &PatientId,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let records = tx.load_linked_records(patient_id).await?;
    let previous = tx.load_patient(patient_id).await?;
    if records.is_empty() {
        // Every record left (unlinked or folded away): keep the row, marked deleted.
        if let Some(mut row) = previous {
            if row.status != "merged" && row.status != "deleted" {
                row.status = "deleted".into();
                row.updated_at = now;
                row.version += 1;
                tx.save_patient(&row, &[]).await?;
            }
        }
        return Ok(());
    }
    let golden = identity::golden_record(patient_id, &records, &settings.survivorship, now);
    match next_row(golden.row, previous.as_ref(), now) {
        Some(row) => tx.save_patient(&row, &golden.provenance).await,
        // Same values: no new version, even if an equal value now comes from another record.
        None => Ok(()),
    }
}

/// The row to save for a recomputed golden row, or `None` when the stored values are the same
/// (then no new version): the stored row keeps its `first_seen_at` and the version goes up.
pub(crate) fn next_row(
    mut row: PatientRow,
    previous: Option<&PatientRow>,
    now: DateTime<Utc>,
) -> Option<PatientRow> {
    match previous {
        Some(old) => {
            let mut comparable = row.clone();
            comparable.first_seen_at = old.first_seen_at;
            comparable.updated_at = old.updated_at;
            comparable.version = old.version;
            comparable.merged_into = old.merged_into.clone();
            if comparable == *old {
                return None;
            }
            row.first_seen_at = old.first_seen_at;
            row.version = old.version + 1;
        }
        None => {
            row.first_seen_at = now;
            row.version = 1;
        }
    }
    row.updated_at = now;
    row.merged_into = None;
    Some(row)
}
