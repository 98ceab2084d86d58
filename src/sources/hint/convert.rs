//! Hint patient -> [`SourceRecord`].
//!
//! Mapping (reference B2, B5, C6):
//! - names: `first_name`/`middle_name`/`last_name` (legal); `chosen_first_name` -> preferred.
//!   When first and last are both blank, `name` is split as for IntakeQ.
//! - birth date: `dob` (`YYYY-MM-DD`).
//! - `sex` (male/female/intersex) -> sex, lowercased; the deprecated `gender` when `sex` is
//!   empty. `gender_identity` -> gender identity (`gender_other` when it says `other`).
//! - email: `email`; phones: every `phones[].number`, in order, without repeats of the same
//!   digits.
//! - address: `address_line1`, `address_line2`, `address_city`, `address_state`, `address_zip`,
//!   `address_country`.
//! - external ids: `integration_record_id` under the configured system (default `healthie`);
//!   `external_records[{source, external_id}]` under the source's name lowercased, with
//!   `healthie`, `intakeq` (also for "PracticeQ") and `hint` recognised.
//! - status: `merged_into` set -> merged (with `merged_into` = the survivor's id);
//!   `membership_status` archived or inactive -> archived; otherwise active. Webhook events can
//!   override it (`patient.destroyed` -> deleted, `patient.inactive` -> archived).
//! - `source_updated_at`: `updated_at`.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::wire::Patient;
use crate::model::{
    Address, ExternalId, PersonFields, RecordStatus, SourceId, SourceKey, SourceKind, SourceRecord,
};
use crate::sources::intakeq::convert::distinct_phones;
use crate::sources::ConvertError;

/// How ids found in Hint records are labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// The system `integration_record_id` values belong to: the id our partner account keeps
    /// on the patient. Deployments that store the Healthie user id there use `healthie` (the
    /// default); one that stores the canonical patient id would say `patient_sync`.
    pub integration_record_system: String,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            integration_record_system: SourceKind::Healthie.as_str().to_string(),
        }
    }
}

/// The system label of an `external_records[].source`.
pub fn external_system(source: &str) -> String {
    let lower = source.trim().to_lowercase();
    match lower.as_str() {
        "healthie" => "healthie".into(),
        "intakeq" | "practiceq" | "intake q" => "intakeq".into(),
        "hint" | "hint health" => "hint".into(),
        _ => lower,
    }
}

fn sex(p: &Patient) -> Option<String> {
    p.sex
        .as_deref()
        .or(p.gender.as_deref())
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| matches!(s.as_str(), "male" | "female" | "intersex"))
}

fn gender_identity(p: &Patient) -> Option<String> {
    match p.gender_identity.as_deref() {
        Some(g) if g.eq_ignore_ascii_case("other") => {
            p.gender_other.clone().or_else(|| Some(g.to_string()))
        }
        Some(g) => Some(g.to_string()),
        None => None,
    }
}

fn names(p: &Patient) -> (Option<String>, Option<String>, Option<String>) {
    if p.first_name.is_some() || p.last_name.is_some() {
        return (
            p.first_name.clone(),
            p.middle_name.clone(),
            p.last_name.clone(),
        );
    }
    let words: Vec<&str> = p
        .name
        .as_deref()
        .map(|n| n.split_whitespace().collect())
        .unwrap_or_default();
    match words.as_slice() {
        [] => (None, p.middle_name.clone(), None),
        [one] => (Some(one.to_string()), None, None),
        [first, middle @ .., last] => (
            Some(first.to_string()),
            (!middle.is_empty())
                .then(|| middle.join(" "))
                .or(p.middle_name.clone()),
            Some(last.to_string()),
        ),
    }
}

fn external_ids(p: &Patient, opts: &ConvertOptions) -> Vec<ExternalId> {
    let mut out: Vec<ExternalId> = Vec::new();
    if let Some(value) = &p.integration_record_id {
        out.push(ExternalId {
            system: opts.integration_record_system.clone(),
            value: value.clone(),
        });
    }
    for record in &p.external_records {
        let id = ExternalId {
            system: external_system(&record.source),
            value: record.external_id.clone(),
        };
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// The status the patient's own fields say.
fn status(p: &Patient) -> RecordStatus {
    if p.merged_into.is_some() {
        return RecordStatus::Merged;
    }
    match p.membership_status.as_deref() {
        Some(s) if s.eq_ignore_ascii_case("archived") || s.eq_ignore_ascii_case("inactive") => {
            RecordStatus::Archived
        }
        _ => RecordStatus::Active,
    }
}

/// Converts a patient object into a source record (`raw` is `value` as received).
pub fn parse_patient(
    value: &Value,
    fetched_at: DateTime<Utc>,
    opts: &ConvertOptions,
) -> Result<SourceRecord, ConvertError> {
    let p = Patient::parse(value)?;
    let (given_name, middle_name, family_name) = names(&p);
    Ok(SourceRecord {
        key: SourceKey::new(SourceKind::Hint, p.id.clone()),
        fields: PersonFields {
            given_name,
            middle_name,
            family_name,
            preferred_name: p.chosen_first_name.clone(),
            birth_date: p.dob,
            sex: sex(&p),
            gender_identity: gender_identity(&p),
            email: p.email.clone(),
            phones: distinct_phones(p.phones.iter().map(|ph| ph.number.as_str())),
            address: Address {
                line1: p.address_line1.clone(),
                line2: p.address_line2.clone(),
                city: p.address_city.clone(),
                state: p.address_state.clone(),
                postal_code: p.address_zip.clone(),
                country: p.address_country.clone(),
            },
            external_ids: external_ids(&p, opts),
        },
        status: status(&p),
        merged_into: p.merged_into.clone().map(SourceId),
        source_updated_at: p.updated_at,
        fetched_at,
        raw: value.clone(),
    })
}

/// A deletion `sync::poll` reported with only an id: status deleted, no fields, stamped with
/// the time it was seen so it outranks earlier snapshots.
pub fn tombstone(id: SourceId, seen_at: DateTime<Utc>, raw: Value) -> SourceRecord {
    crate::sources::tombstone(SourceKey::new(SourceKind::Hint, id), seen_at, raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone};
    use serde_json::json;

    const FULL: &str = include_str!("../../../tests/fixtures/hint/patient_full.json");
    const MERGED: &str = include_str!("../../../tests/fixtures/hint/patient_merged.json");

    #[test]
    fn a_full_seed_patient_converts_field_by_field() {
        let value: Value = serde_json::from_str(FULL).unwrap();
        let fetched = Utc.with_ymd_and_hms(2026, 3, 2, 17, 0, 0).unwrap();
        let r = parse_patient(&value, fetched, &ConvertOptions::default()).unwrap();
        assert_eq!(r.key, SourceKey::new(SourceKind::Hint, "pat-n32hjf4mmu1s"));
        let f = &r.fields;
        assert_eq!(f.given_name.as_deref(), Some("Robert"));
        assert_eq!(f.middle_name.as_deref(), Some("James"));
        assert_eq!(f.family_name.as_deref(), Some("O'Neil"));
        assert_eq!(f.preferred_name.as_deref(), Some("Bobby"));
        assert_eq!(f.birth_date, NaiveDate::from_ymd_opt(1979, 11, 30));
        assert_eq!(f.sex.as_deref(), Some("male"));
        assert_eq!(f.gender_identity.as_deref(), Some("man"));
        assert_eq!(f.email.as_deref(), Some("bobby.oneil@example.com"));
        assert_eq!(f.phones, vec!["+14155550101", "4155550188"]);
        assert_eq!(
            f.address,
            Address {
                line1: Some("500 Market St".into()),
                line2: Some("Suite 210".into()),
                city: Some("San Francisco".into()),
                state: Some("CA".into()),
                postal_code: Some("94105".into()),
                country: Some("United States".into()),
            }
        );
        assert_eq!(
            f.external_ids,
            vec![
                ExternalId {
                    system: "healthie".into(),
                    value: "3204150".into()
                },
                ExternalId {
                    system: "intakeq".into(),
                    value: "1042".into()
                },
                ExternalId {
                    system: "elation".into(),
                    value: "88812".into()
                },
            ]
        );
        assert_eq!(r.status, RecordStatus::Active);
        assert_eq!(r.merged_into, None);
        assert_eq!(
            r.source_updated_at,
            Some(Utc.with_ymd_and_hms(2026, 2, 27, 23, 23, 0).unwrap())
        );
        assert_eq!(r.raw, value);
    }

    #[test]
    fn a_merged_away_patient_points_at_its_survivor() {
        let value: Value = serde_json::from_str(MERGED).unwrap();
        let r = parse_patient(&value, Utc::now(), &ConvertOptions::default()).unwrap();
        assert_eq!(r.status, RecordStatus::Merged);
        assert_eq!(r.merged_into, Some(SourceId::from("pat-n32hjf4mmu1s")));
        assert_eq!(
            r.fields.sex.as_deref(),
            Some("male"),
            "from deprecated gender"
        );
        assert_eq!(r.fields.gender_identity.as_deref(), Some("Two-spirit"));
        assert_eq!(r.fields.given_name.as_deref(), Some("Bob"));
        assert_eq!(r.fields.family_name.as_deref(), Some("ONeil"));
    }

    #[test]
    fn archived_and_inactive_memberships_are_archived() {
        for (membership, expected) in [
            ("archived", RecordStatus::Archived),
            ("inactive", RecordStatus::Archived),
            ("active", RecordStatus::Active),
            ("pending", RecordStatus::Active),
        ] {
            let value = json!({"id": "pat-1", "membership_status": membership});
            let r = parse_patient(&value, Utc::now(), &ConvertOptions::default()).unwrap();
            assert_eq!(r.status, expected, "{membership}");
        }
    }

    #[test]
    fn external_record_sources_map_to_systems() {
        assert_eq!(external_system("Healthie"), "healthie");
        assert_eq!(external_system(" PracticeQ "), "intakeq");
        assert_eq!(external_system("Elation"), "elation");
    }

    #[test]
    fn conversion_errors_never_carry_values() {
        let value =
            json!({"id": "pat-1", "first_name": "Jane", "email": {"a": "jane@example.com"}});
        let err = parse_patient(&value, Utc::now(), &ConvertOptions::default()).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(text.contains("email"));
        assert!(!text.contains("jane@") && !text.contains("Jane"), "{text}");
    }
}
