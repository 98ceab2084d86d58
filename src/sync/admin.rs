//! Admin decisions: accepting or rejecting a review, linking a record to a patient, splitting a
//! record off into its own patient, and the read-only views (`review list`, `patient show`)
//! that admins decide from.
//!
//! Every decision is a link with `decided_by = "admin"` (method `manual`), which automatic
//! matching (apply, rebuild) never moves, plus a review row in `accepted` or `rejected` state so
//! the pair's verdict is remembered: a rejected (record, patient) pair is never proposed or
//! linked automatically again. Each command is one transaction: the link, its `link_events`
//! entry, the canonical rows it touches and the review verdict commit together.
//!
//! Nothing here logs field values; the views carry PHI on purpose, for the admin's terminal.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{PatientId, PersonFields, SourceKey};
use crate::store::{
    FieldSource, Link, LinkEvent, LinkMethod, PatientRow, Review, ReviewState, Store, StoreError,
    StoreTx,
};
use crate::sync::apply::{refresh_patient, IdentitySettings};

/// Who admin decisions are recorded as (`links.decided_by`, `match_reviews.decided_by`).
pub use crate::store::ADMIN;

/// Merged rows are followed at most this far to the surviving patient.
const MAX_MERGE_HOPS: usize = 16;

/// Why an admin command could not be carried out. Messages name ids, never field values.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no review with id {0}")]
    NoReview(i64),
    #[error("review {id} is already {state}")]
    AlreadyDecided { id: i64, state: &'static str },
    #[error("no source record {0}")]
    NoRecord(SourceKey),
    #[error("source record {0} is not linked to any patient")]
    NotLinked(SourceKey),
    #[error("no patient {0}")]
    NoPatient(PatientId),
    #[error("{0} is the only record of its patient; there is nothing to split off")]
    OnlyRecord(SourceKey),
    #[error("store failure")]
    Store(#[from] StoreError),
}

/// What a linking command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkOutcome {
    pub key: SourceKey,
    pub patient_id: PatientId,
    pub previous_patient_id: Option<PatientId>,
    /// The previous patient was left without records and now points at `patient_id`.
    pub previous_merged: bool,
}

/// `review accept ID`: links the review's record to its candidate patient as an admin decision.
pub async fn accept_review(
    store: &dyn Store,
    id: i64,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> Result<LinkOutcome, AdminError> {
    let mut tx = store.begin().await?;
    let review = open_review(tx.as_mut(), id).await?;
    let outcome = manual_link(
        tx.as_mut(),
        &review.key,
        &review.patient_id,
        "review_accepted",
        settings,
        now,
    )
    .await?;
    tx.save_review_decision(
        &review.key,
        &review.patient_id,
        ReviewState::Accepted,
        ADMIN,
        now,
    )
    .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// `review reject ID`: the record is not this patient. Should the record have ended up linked
/// to that patient automatically in the meantime, it is split off into a patient of its own.
pub async fn reject_review(
    store: &dyn Store,
    id: i64,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> Result<Review, AdminError> {
    let mut tx = store.begin().await?;
    let review = open_review(tx.as_mut(), id).await?;
    tx.save_review_decision(
        &review.key,
        &review.patient_id,
        ReviewState::Rejected,
        ADMIN,
        now,
    )
    .await?;
    if let Some(link) = tx.load_link(&review.key).await? {
        if link.patient_id == review.patient_id && !link.is_manual() {
            split(tx.as_mut(), &link, "review_rejected", settings, now).await?;
        }
    }
    tx.commit().await?;
    Ok(Review {
        state: ReviewState::Rejected,
        decided_at: Some(now),
        decided_by: Some(ADMIN.into()),
        ..review
    })
}

/// `link SOURCE:ID PATIENT_ID`: links a record to a patient (the surviving one, when the id was
/// merged away) as an admin decision, and records the pair as accepted.
pub async fn link_record(
    store: &dyn Store,
    key: &SourceKey,
    patient_id: &PatientId,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> Result<LinkOutcome, AdminError> {
    let mut tx = store.begin().await?;
    let outcome = manual_link(tx.as_mut(), key, patient_id, "admin_link", settings, now).await?;
    tx.save_review_decision(key, &outcome.patient_id, ReviewState::Accepted, ADMIN, now)
        .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// `unlink SOURCE:ID`: splits a record off into a new patient of its own (an admin decision)
/// and records its old patient as rejected for it, so automatic matching never puts it back.
pub async fn unlink_record(
    store: &dyn Store,
    key: &SourceKey,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> Result<LinkOutcome, AdminError> {
    let mut tx = store.begin().await?;
    tx.lock(&key.to_string()).await?;
    let link = tx
        .load_link(key)
        .await?
        .ok_or_else(|| AdminError::NotLinked(key.clone()))?;
    tx.lock(link.patient_id.as_str()).await?;
    if tx.load_patient_links(&link.patient_id).await?.len() <= 1 {
        return Err(AdminError::OnlyRecord(key.clone()));
    }
    let outcome = split(tx.as_mut(), &link, "admin_unlink", settings, now).await?;
    tx.commit().await?;
    Ok(outcome)
}

async fn open_review(tx: &mut dyn StoreTx, id: i64) -> Result<Review, AdminError> {
    let review = tx.load_review(id).await?.ok_or(AdminError::NoReview(id))?;
    if review.state != ReviewState::Open {
        return Err(AdminError::AlreadyDecided {
            id,
            state: review.state.as_str(),
        });
    }
    Ok(review)
}

/// The patient a (possibly merged-away) id now lives on.
async fn surviving(tx: &mut dyn StoreTx, id: &PatientId) -> Result<PatientId, AdminError> {
    let mut current = id.clone();
    for _ in 0..MAX_MERGE_HOPS {
        let row = tx
            .load_patient(&current)
            .await?
            .ok_or_else(|| AdminError::NoPatient(current.clone()))?;
        match row.merged_into {
            Some(next) if row.status == "merged" && next != current => current = next,
            _ => return Ok(current),
        }
    }
    Ok(current)
}

/// Moves (or confirms) `key`'s link to `target` as an admin decision. A previous patient left
/// without records becomes `merged` into the target; otherwise its row is recomputed without
/// the record.
async fn manual_link(
    tx: &mut dyn StoreTx,
    key: &SourceKey,
    target: &PatientId,
    rule: &str,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> Result<LinkOutcome, AdminError> {
    tx.lock(&key.to_string()).await?;
    if tx.load_source_record(key).await?.is_none() {
        return Err(AdminError::NoRecord(key.clone()));
    }
    let target = surviving(tx, target).await?;
    tx.lock(target.as_str()).await?;
    let previous = tx.load_link(key).await?.map(|l| l.patient_id);
    if let Some(prev) = &previous {
        tx.lock(prev.as_str()).await?;
    }
    let link = Link {
        key: key.clone(),
        patient_id: target.clone(),
        method: LinkMethod::Manual,
        rule: Some(rule.into()),
        score: None,
        decided_by: ADMIN.into(),
        decided_at: now,
    };
    let event = LinkEvent {
        key: key.clone(),
        action: if previous.is_some() { "relink" } else { "link" }.into(),
        patient_id: Some(target.clone()),
        previous_patient_id: previous.clone(),
        method: LinkMethod::Manual,
        rule: Some(rule.into()),
        score: None,
        decided_by: ADMIN.into(),
        at: now,
    };
    tx.save_link(&link, &event).await?;
    let mut previous_merged = false;
    if let Some(prev) = previous.as_ref().filter(|p| **p != target) {
        if tx.load_patient_links(prev).await?.is_empty() {
            if let Some(mut row) = tx.load_patient(prev).await? {
                row.status = "merged".into();
                row.merged_into = Some(target.clone());
                row.updated_at = now;
                row.version += 1;
                tx.save_patient(&row, &[]).await?;
                previous_merged = true;
            }
        } else {
            refresh_patient(tx, prev, settings, now).await?;
        }
    }
    refresh_patient(tx, &target, settings, now).await?;
    Ok(LinkOutcome {
        key: key.clone(),
        patient_id: target,
        previous_patient_id: previous,
        previous_merged,
    })
}

/// Moves a record to a new patient of its own (admin decision) and rejects the old pair.
async fn split(
    tx: &mut dyn StoreTx,
    link: &Link,
    rule: &str,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> Result<LinkOutcome, AdminError> {
    let new_patient = PatientId::generate();
    let moved = Link {
        key: link.key.clone(),
        patient_id: new_patient.clone(),
        method: LinkMethod::Manual,
        rule: Some(rule.into()),
        score: None,
        decided_by: ADMIN.into(),
        decided_at: now,
    };
    let event = LinkEvent {
        key: link.key.clone(),
        action: "unlink".into(),
        patient_id: Some(new_patient.clone()),
        previous_patient_id: Some(link.patient_id.clone()),
        method: LinkMethod::Manual,
        rule: Some(rule.into()),
        score: None,
        decided_by: ADMIN.into(),
        at: now,
    };
    tx.save_link(&moved, &event).await?;
    tx.save_review_decision(
        &link.key,
        &link.patient_id,
        ReviewState::Rejected,
        ADMIN,
        now,
    )
    .await?;
    refresh_patient(tx, &link.patient_id, settings, now).await?;
    refresh_patient(tx, &new_patient, settings, now).await?;
    Ok(LinkOutcome {
        key: link.key.clone(),
        patient_id: new_patient,
        previous_patient_id: Some(link.patient_id.clone()),
        previous_merged: false,
    })
}

/// The fields an admin compares side by side, from a record or a canonical row.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KeyFields {
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub birth_date: Option<String>,
    pub sex: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub postal_code: Option<String>,
    /// `system:value` pairs (record side) or the linked source ids (patient side).
    pub ids: Vec<String>,
}

impl KeyFields {
    fn of_record(key: &SourceKey, f: &PersonFields) -> Self {
        let mut ids = vec![key.to_string()];
        ids.extend(
            f.external_ids
                .iter()
                .map(|x| format!("{}:{}", x.system, x.value)),
        );
        KeyFields {
            given_name: f.given_name.clone(),
            family_name: f.family_name.clone(),
            birth_date: f.birth_date.map(|d| d.to_string()),
            sex: f.sex.clone(),
            email: f.email.clone(),
            phone: f.phones.first().cloned(),
            postal_code: f.address.postal_code.clone(),
            ids,
        }
    }

    fn of_patient(p: &PatientRow) -> Self {
        let ids = [
            ("healthie", &p.healthie_id),
            ("intakeq", &p.intakeq_id),
            ("hint", &p.hint_id),
        ]
        .into_iter()
        .filter_map(|(s, id)| id.as_ref().map(|id| format!("{s}:{id}")))
        .collect();
        KeyFields {
            given_name: p.given_name.clone(),
            family_name: p.family_name.clone(),
            birth_date: p.birth_date.map(|d| d.to_string()),
            sex: p.sex.clone(),
            email: p.email.clone(),
            phone: p.phone.clone(),
            postal_code: p.postal_code.clone(),
            ids,
        }
    }

    fn rows(&self) -> [(&'static str, String); 8] {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        [
            ("given_name", o(&self.given_name)),
            ("family_name", o(&self.family_name)),
            ("birth_date", o(&self.birth_date)),
            ("sex", o(&self.sex)),
            ("email", o(&self.email)),
            ("phone", o(&self.phone)),
            ("postal_code", o(&self.postal_code)),
            ("ids", self.ids.join(" ")),
        ]
    }
}

/// One line of `review list`, with both sides for open items.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewView {
    #[serde(flatten)]
    pub review: Review,
    /// The record's side (open reviews only).
    pub record: Option<KeyFields>,
    /// The candidate patient's canonical side (open reviews only).
    pub patient: Option<KeyFields>,
}

/// Reviews for `review list`; open ones carry both sides' key fields.
pub async fn list_reviews(
    store: &dyn Store,
    state: Option<ReviewState>,
    limit: u32,
) -> Result<Vec<ReviewView>, AdminError> {
    let mut out = Vec::new();
    for review in store.list_reviews(state, limit).await? {
        let (record, patient) = if review.state == ReviewState::Open {
            let record = store
                .load_source_record(&review.key)
                .await?
                .map(|r| KeyFields::of_record(&r.key, &r.fields));
            let patient = store
                .load_patient(&review.patient_id)
                .await?
                .map(|p| KeyFields::of_patient(&p));
            (record, patient)
        } else {
            (None, None)
        };
        out.push(ReviewView {
            review,
            record,
            patient,
        });
    }
    Ok(out)
}

/// Human-readable `review list`.
pub fn render_reviews(reviews: &[ReviewView]) -> String {
    let mut out = String::new();
    if reviews.is_empty() {
        out.push_str("no reviews\n");
        return out;
    }
    for v in reviews {
        let r = &v.review;
        let _ = writeln!(
            out,
            "review {}  {}  record {}  candidate {}  score {:.1}  created {}{}",
            r.id,
            r.state.as_str(),
            r.key,
            r.patient_id,
            r.score,
            r.created_at.to_rfc3339(),
            r.decided_by
                .as_ref()
                .map(|by| format!(
                    "  decided by {by} at {}",
                    r.decided_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                ))
                .unwrap_or_default()
        );
        if r.state == ReviewState::Open {
            let left = v.record.clone().unwrap_or_default();
            let right = v.patient.clone().unwrap_or_default();
            let _ = writeln!(out, "    {:<12} {:<36} patient", "", "record");
            for ((name, a), (_, b)) in left.rows().into_iter().zip(right.rows()) {
                let mark = if a == b || a.is_empty() || b.is_empty() {
                    " "
                } else {
                    "≠"
                };
                let _ = writeln!(out, "  {mark} {name:<12} {a:<36} {b}");
            }
        }
    }
    out
}

/// A linked record as `patient show` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkedRecord {
    pub key: SourceKey,
    /// The record's status in its source (`active`, `archived`, ...).
    pub status: Option<String>,
    pub method: LinkMethod,
    pub rule: Option<String>,
    pub score: Option<f64>,
    pub decided_by: String,
    pub decided_at: DateTime<Utc>,
}

/// Everything `patient show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PatientView {
    /// The id asked for.
    pub requested: PatientId,
    /// Ids followed from `requested` to the surviving patient, when it was merged away.
    pub merged_path: Vec<PatientId>,
    pub patient: PatientRow,
    pub field_sources: Vec<FieldSource>,
    pub records: Vec<LinkedRecord>,
    pub history: Vec<LinkEvent>,
}

/// Loads the canonical row (following merges), its provenance, linked records and history.
pub async fn show_patient(store: &dyn Store, id: &PatientId) -> Result<PatientView, AdminError> {
    let mut row = store
        .load_patient(id)
        .await?
        .ok_or_else(|| AdminError::NoPatient(id.clone()))?;
    let mut merged_path = Vec::new();
    while row.status == "merged" && merged_path.len() < MAX_MERGE_HOPS {
        let Some(next) = row.merged_into.clone() else {
            break;
        };
        let Some(next_row) = store.load_patient(&next).await? else {
            break;
        };
        merged_path.push(next);
        row = next_row;
    }
    let mut records = Vec::new();
    for link in store.load_patient_links(&row.patient_id).await? {
        let status = store
            .load_source_record(&link.key)
            .await?
            .map(|r| r.status.as_str().to_string());
        records.push(LinkedRecord {
            key: link.key,
            status,
            method: link.method,
            rule: link.rule,
            score: link.score,
            decided_by: link.decided_by,
            decided_at: link.decided_at,
        });
    }
    Ok(PatientView {
        requested: id.clone(),
        merged_path,
        field_sources: store.load_field_sources(&row.patient_id).await?,
        history: store.load_patient_link_events(&row.patient_id).await?,
        records,
        patient: row,
    })
}

/// Human-readable `patient show`.
pub fn render_patient(v: &PatientView) -> String {
    let mut out = String::new();
    if let Some(last) = v.merged_path.last() {
        let _ = writeln!(
            out,
            "patient {} was merged into {}; showing the surviving patient",
            v.requested, last
        );
    }
    let p = &v.patient;
    let _ = writeln!(
        out,
        "patient {}  status {}  version {}  first seen {}  updated {}",
        p.patient_id,
        p.status,
        p.version,
        p.first_seen_at.to_rfc3339(),
        p.updated_at.to_rfc3339()
    );
    let source_of = |field: &str| {
        v.field_sources
            .iter()
            .find(|f| f.field == field)
            .map(|f| f.key.to_string())
            .unwrap_or_default()
    };
    let o = |x: &Option<String>| x.clone().unwrap_or_default();
    let address = [
        &p.address_line1,
        &p.address_line2,
        &p.city,
        &p.state,
        &p.postal_code,
        &p.country,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect::<Vec<_>>()
    .join(", ");
    let fields = [
        ("given_name", o(&p.given_name)),
        ("middle_name", o(&p.middle_name)),
        ("family_name", o(&p.family_name)),
        ("preferred_name", o(&p.preferred_name)),
        (
            "birth_date",
            p.birth_date.map(|d| d.to_string()).unwrap_or_default(),
        ),
        ("sex", o(&p.sex)),
        ("gender_identity", o(&p.gender_identity)),
        ("email", o(&p.email)),
        ("phone", o(&p.phone)),
        ("address", address),
    ];
    let _ = writeln!(out, "fields:");
    for (name, value) in fields {
        if !value.is_empty() {
            let _ = writeln!(out, "  {name:<16} {value:<40} from {}", source_of(name));
        }
    }
    let _ = writeln!(out, "records:");
    if v.records.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for r in &v.records {
        let _ = writeln!(
            out,
            "  {:<24} {:<9} {:<12} {:<22} decided by {} at {}",
            r.key.to_string(),
            r.status.as_deref().unwrap_or("?"),
            r.method.as_str(),
            r.rule.as_deref().unwrap_or(""),
            r.decided_by,
            r.decided_at.to_rfc3339()
        );
    }
    let _ = writeln!(out, "history:");
    if v.history.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for e in &v.history {
        let _ = writeln!(
            out,
            "  {}  {:<7} {:<24} {} -> {}  {} {}  by {}",
            e.at.to_rfc3339(),
            e.action,
            e.key.to_string(),
            e.previous_patient_id
                .as_ref()
                .map(|p| p.as_str())
                .unwrap_or("-"),
            e.patient_id.as_ref().map(|p| p.as_str()).unwrap_or("-"),
            e.method.as_str(),
            e.rule.as_deref().unwrap_or(""),
            e.decided_by
        );
    }
    out
}
