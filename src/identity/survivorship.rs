//! Survivorship: the canonical patient row recomputed from all its linked source records,
//! field by field, with the record each value came from.
//!
//! Per field: only live records (active, archived) take part, or all records when none is
//! live; a real value beats a placeholder ("Unknown", 1900-01-01, `noemail@…`), which beats
//! nothing; then the source priority for that field; then the newest record (source
//! `updated_at`, then fetch time); then the smallest source key. The address is one unit: all
//! its columns come from the same record. Because the row is a function of the records alone,
//! unlinking a record removes every trace of it at the next recomputation.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::normalize;
use crate::model::{Address, PatientId, SourceKind, SourceRecord};
use crate::store::{FieldSource, PatientRow};

/// Which source wins each canonical field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SurvivorshipConfig {
    /// Per canonical field (`given_name`, ..., `phone`, `address`), sources in order of trust.
    /// Sources missing from a list rank after those in it.
    pub field_priority: BTreeMap<String, Vec<SourceKind>>,
    /// Order used for fields without an entry in `field_priority`.
    pub default_priority: Vec<SourceKind>,
}

impl Default for SurvivorshipConfig {
    /// The EHR (Healthie) first, then membership billing (Hint), then intake forms (IntakeQ).
    fn default() -> Self {
        SurvivorshipConfig {
            field_priority: BTreeMap::new(),
            default_priority: vec![SourceKind::Healthie, SourceKind::Hint, SourceKind::Intakeq],
        }
    }
}

impl SurvivorshipConfig {
    fn rank(&self, field: &str, source: SourceKind) -> usize {
        let order = self
            .field_priority
            .get(field)
            .unwrap_or(&self.default_priority);
        order
            .iter()
            .position(|s| *s == source)
            .unwrap_or(order.len())
    }
}

/// A recomputed canonical row and its provenance.
#[derive(Clone, PartialEq)]
pub struct Golden {
    /// `first_seen_at` and `updated_at` are `now` and `version` is 0: the caller keeps the
    /// stored values when the row already exists.
    pub row: PatientRow,
    /// One entry per non-empty field, in column order; `address` covers all address columns.
    pub provenance: Vec<FieldSource>,
}

impl fmt::Debug for Golden {
    /// Ids, status and provenance only: the row's values are PHI.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Golden")
            .field("patient_id", &self.row.patient_id)
            .field("status", &self.row.status)
            .field("provenance", &self.provenance)
            .finish_non_exhaustive()
    }
}

/// How good a value is: a real value beats a placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Quality {
    Placeholder,
    Real,
}

/// A record's candidate for the canonical phone: its first real phone (primary first), in
/// E.164 when it parses, else as given; a placeholder only when it has no real one.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordPhone {
    pub value: String,
    /// Not a placeholder.
    pub real: bool,
}

impl fmt::Debug for RecordPhone {
    /// The number is PHI.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordPhone")
            .field("real", &self.real)
            .finish_non_exhaustive()
    }
}

/// The phone a record offers survivorship (see [`RecordPhone`]). Parsing phones is costly: a
/// caller that recomputes many rows from the same records may compute this once per record and
/// use [`golden_record_with_phones`].
pub fn record_phone(phones: &[String]) -> Option<RecordPhone> {
    best_phone(phones).map(|(quality, value)| RecordPhone {
        value,
        real: quality == Quality::Real,
    })
}

/// Recomputes the canonical row of `patient_id` from its linked records.
pub fn golden_record(
    patient_id: &PatientId,
    records: &[SourceRecord],
    cfg: &SurvivorshipConfig,
    now: DateTime<Utc>,
) -> Golden {
    let phones: Vec<Option<RecordPhone>> = records
        .iter()
        .map(|r| record_phone(&r.fields.phones))
        .collect();
    golden_record_with_phones(patient_id, records, &phones, cfg, now)
}

/// [`golden_record`] with each record's [`record_phone`] already computed (`phones[i]` for
/// `records[i]`): the same row, without parsing a phone.
pub fn golden_record_with_phones(
    patient_id: &PatientId,
    records: &[SourceRecord],
    phones: &[Option<RecordPhone>],
    cfg: &SurvivorshipConfig,
    now: DateTime<Utc>,
) -> Golden {
    assert_eq!(records.len(), phones.len(), "one phone choice per record");
    let live: Vec<Member<'_>> = records
        .iter()
        .zip(phones)
        .filter(|(r, _)| r.status.is_live())
        .map(|(record, phone)| Member { record, phone })
        .collect();
    let pool: Vec<Member<'_>> = if live.is_empty() {
        records
            .iter()
            .zip(phones)
            .map(|(record, phone)| Member { record, phone })
            .collect()
    } else {
        live
    };
    let mut provenance = Vec::new();
    let picker = Picker {
        pool: &pool,
        cfg,
        provenance: &mut provenance,
    };
    let mut row = PatientRow {
        patient_id: patient_id.clone(),
        first_seen_at: now,
        updated_at: now,
        version: 0,
        status: status(records).to_string(),
        ..PatientRow::default()
    };
    fill(&mut row, picker);
    for source in SourceKind::ALL {
        let id = newest(
            pool.iter()
                .map(|m| m.record)
                .filter(|r| r.key.source == source),
        )
        .map(|r| r.key.id.to_string());
        match source {
            SourceKind::Healthie => row.healthie_id = id,
            SourceKind::Intakeq => row.intakeq_id = id,
            SourceKind::Hint => row.hint_id = id,
        }
    }
    Golden { row, provenance }
}

fn fill(row: &mut PatientRow, mut p: Picker<'_, '_>) {
    row.given_name = p.pick("given_name", |r| {
        graded(&r.fields.given_name, normalize::is_placeholder_given)
    });
    row.middle_name = p.pick("middle_name", |r| graded(&r.fields.middle_name, |_| false));
    row.family_name = p.pick("family_name", |r| {
        graded(&r.fields.family_name, normalize::is_placeholder_family)
    });
    row.preferred_name = p.pick("preferred_name", |r| {
        graded(&r.fields.preferred_name, normalize::is_placeholder_given)
    });
    row.birth_date = p.pick("birth_date", |r| {
        r.fields.birth_date.map(|d| (date_quality(d), d))
    });
    row.sex = p.pick("sex", |r| {
        let sex = normalize::normalize_sex(r.fields.sex.as_deref()?);
        let quality = if sex == "unknown" {
            Quality::Placeholder
        } else {
            Quality::Real
        };
        Some((quality, sex.to_string()))
    });
    row.gender_identity = p.pick("gender_identity", |r| {
        graded(&r.fields.gender_identity, |_| false)
    });
    row.email = p.pick("email", |r| {
        let raw = r.fields.email.as_deref()?.trim();
        match normalize::normalize_email(raw) {
            Some(e) if !normalize::is_placeholder_email(&e) => Some((Quality::Real, e)),
            Some(e) => Some((Quality::Placeholder, e)),
            None => (!raw.is_empty()).then(|| (Quality::Placeholder, raw.to_lowercase())),
        }
    });
    row.phone = p.pick_member("phone", |m| {
        m.phone.as_ref().map(|p| {
            let quality = if p.real {
                Quality::Real
            } else {
                Quality::Placeholder
            };
            (quality, p.value.clone())
        })
    });
    if let Some(address) = p.pick("address", |r| {
        let a = &r.fields.address;
        if a.is_empty() {
            return None;
        }
        let quality = if a.line1.is_some() || a.postal_code.is_some() {
            Quality::Real
        } else {
            Quality::Placeholder
        };
        Some((quality, a.clone()))
    }) {
        let Address {
            line1,
            line2,
            city,
            state,
            postal_code,
            country,
        } = address;
        row.address_line1 = line1;
        row.address_line2 = line2;
        row.city = city;
        row.state = state;
        row.postal_code = postal_code;
        row.country = country;
    }
}

/// A record taking part in survivorship, with its phone choice.
#[derive(Clone, Copy)]
struct Member<'r> {
    record: &'r SourceRecord,
    phone: &'r Option<RecordPhone>,
}

/// Chooses each field's value among the pool and records where it came from.
struct Picker<'p, 'r> {
    pool: &'p [Member<'r>],
    cfg: &'p SurvivorshipConfig,
    provenance: &'p mut Vec<FieldSource>,
}

impl<'r> Picker<'_, 'r> {
    fn pick<T>(
        &mut self,
        field: &str,
        value: impl Fn(&'r SourceRecord) -> Option<(Quality, T)>,
    ) -> Option<T> {
        self.pick_member(field, |m| value(m.record))
    }

    fn pick_member<T>(
        &mut self,
        field: &str,
        value: impl Fn(&Member<'r>) -> Option<(Quality, T)>,
    ) -> Option<T> {
        let mut best: Option<(&SourceRecord, Quality, T)> = None;
        for member in self.pool {
            let record = member.record;
            let Some((quality, v)) = value(member) else {
                continue;
            };
            let better = match &best {
                None => true,
                Some((b, bq, _)) => {
                    let ord = quality
                        .cmp(bq)
                        // Lower rank is more trusted.
                        .then_with(|| {
                            self.cfg
                                .rank(field, b.key.source)
                                .cmp(&self.cfg.rank(field, record.key.source))
                        })
                        .then_with(|| record.version_key().cmp(&b.version_key()))
                        .then_with(|| b.key.cmp(&record.key));
                    ord.is_gt()
                }
            };
            if better {
                best = Some((record, quality, v));
            }
        }
        let (record, _, v) = best?;
        self.provenance.push(FieldSource {
            field: field.to_string(),
            key: record.key.clone(),
            source_updated_at: record.source_updated_at,
        });
        Some(v)
    }
}

fn graded(v: &Option<String>, placeholder: fn(&str) -> bool) -> Option<(Quality, String)> {
    let v = v.as_deref()?.trim();
    if v.is_empty() {
        return None;
    }
    let quality = if placeholder(v) {
        Quality::Placeholder
    } else {
        Quality::Real
    };
    Some((quality, v.to_string()))
}

fn date_quality(d: NaiveDate) -> Quality {
    if normalize::is_placeholder_birth_date(d) {
        Quality::Placeholder
    } else {
        Quality::Real
    }
}

/// The record's first real phone (primary first), in E.164 when it parses, else as given.
fn best_phone(phones: &[String]) -> Option<(Quality, String)> {
    let mut fallback = None;
    for raw in phones.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let value = normalize::phone_e164(raw, normalize::DEFAULT_REGION)
            .unwrap_or_else(|| raw.to_string());
        if normalize::is_placeholder_phone(&value) {
            fallback.get_or_insert((Quality::Placeholder, value));
        } else {
            return Some((Quality::Real, value));
        }
    }
    fallback
}

/// The most recent record (source `updated_at`, then fetch time; smallest key on a tie).
fn newest<'r>(records: impl Iterator<Item = &'r SourceRecord>) -> Option<&'r SourceRecord> {
    records.max_by(|a, b| {
        a.version_key()
            .cmp(&b.version_key())
            .then_with(|| b.key.cmp(&a.key))
    })
}

/// `active` if any record is active, `archived` if live records are all archived, else
/// `deleted`.
fn status(records: &[SourceRecord]) -> &'static str {
    use crate::model::RecordStatus;
    if records.iter().any(|r| r.status == RecordStatus::Active) {
        "active"
    } else if records.iter().any(|r| r.status == RecordStatus::Archived) {
        "archived"
    } else {
        "deleted"
    }
}
