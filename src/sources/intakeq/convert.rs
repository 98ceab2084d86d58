//! IntakeQ client profile -> [`SourceRecord`].
//!
//! Mapping (reference A2, A5, C6):
//! - names: `FirstName`/`MiddleName`/`LastName`; when both first and last are blank, `Name` is
//!   split (first word given, last word family, the rest middle). IntakeQ has no preferred name.
//! - birth date: `DateOfBirth` epoch milliseconds -> the calendar date whose UTC midnight is
//!   nearest (see [`birth_date_from_epoch_ms`]); exports written by other tools may carry
//!   `/Date(ms)/` or an ISO date (`YYYY-MM-DD`, `YYYYMMDD`) instead, read as the same instant
//!   or that date.
//! - `Gender` (free text): female/male/intersex (and f/m/woman/man) -> `sex`; a declined or
//!   unknown answer -> nothing; any other text -> `gender_identity`, as given.
//! - email: `Email`; phones: `Phone`, `MobilePhone`, `HomePhone`, `WorkPhone` in that order,
//!   without repeats of the same digits.
//! - address: `StreetAddress` (or the free-text `Address` when there is no street), `UnitNumber`,
//!   `City`, `StateShort` (or `State`), `PostalCode`, `Country`.
//! - external id: `ExternalClientId` under the configured system (default `healthie`), or
//!   `hint` when the value is a Hint patient id (`pat-…`).
//! - status: `Archived` -> archived, else active; deletions come from the `deletedOnly` sweep
//!   as tombstones ([`tombstone`]).
//! - `source_updated_at`: `LastUpdateDate` when present.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::wire::ClientProfile;
use crate::model::{
    Address, ExternalId, PersonFields, RecordStatus, SourceId, SourceKey, SourceKind, SourceRecord,
};
use crate::sources::ConvertError;

/// How ids found in IntakeQ records are labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// The system `ExternalClientId` values belong to. Practices that link IntakeQ to Healthie
    /// keep the Healthie user id there, hence the default `healthie`.
    pub external_id_system: String,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            external_id_system: SourceKind::Healthie.as_str().to_string(),
        }
    }
}

const HALF_DAY_MS: i64 = 12 * 60 * 60 * 1000;

/// The birth date an IntakeQ `DateOfBirth` stands for.
///
/// IntakeQ stores a date of birth as an instant (epoch milliseconds, decoded as UTC by its own
/// client), and that instant is not a UTC midnight: it is the midnight of whatever timezone
/// the practice or browser used (04:00Z/05:00Z for US Eastern, 23:00Z *the day before* for
/// Central Europe), sometimes with a stray time of day. Taking the UTC calendar date is off by
/// one for every zone east of UTC, so the date is the one whose UTC midnight is nearest:
/// `floor((ms + 12 h) / 24 h)` days after 1970-01-01. This is exact for midnights of every
/// zone from UTC-11:59 to UTC+12:00. An instant at exactly 12:00:00.000Z rounds to the next
/// day. Negative epochs (births before 1970) floor the same way, so -1 ms is 1970-01-01 and
/// -12 h - 1 ms is 1969-12-31. `None` when the value is outside chrono's range.
pub fn birth_date_from_epoch_ms(ms: i64) -> Option<NaiveDate> {
    let shifted = ms.checked_add(HALF_DAY_MS)?;
    DateTime::from_timestamp_millis(shifted).map(|t| t.date_naive())
}

/// An epoch-milliseconds timestamp as a UTC instant.
pub fn instant_from_epoch_ms(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// `(sex, gender_identity)` from IntakeQ's free-text `Gender`.
pub fn sex_and_gender(gender: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(given) = gender.map(str::trim).filter(|g| !g.is_empty()) else {
        return (None, None);
    };
    match given.to_ascii_lowercase().as_str() {
        "female" | "f" | "woman" => (Some("female".into()), None),
        "male" | "m" | "man" => (Some("male".into()), None),
        "intersex" => (Some("intersex".into()), None),
        "unknown"
        | "not specified"
        | "unspecified"
        | "prefer not to say"
        | "prefer not to answer"
        | "declined"
        | "decline to answer"
        | "choose not to disclose" => (None, None),
        _ => (None, Some(given.to_string())),
    }
}

/// Digits of a phone number for spotting repeats, without a leading US country code.
fn phone_digits(phone: &str) -> String {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    match digits.strip_prefix('1') {
        Some(rest) if digits.len() == 11 => rest.to_string(),
        _ => digits,
    }
}

/// Phones in order, keeping the first spelling of each number.
pub fn distinct_phones<'a>(phones: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for phone in phones {
        let phone = phone.trim();
        if phone.is_empty() {
            continue;
        }
        let digits = phone_digits(phone);
        let key = if digits.is_empty() {
            phone.to_string()
        } else {
            digits
        };
        if !seen.contains(&key) {
            seen.push(key);
            out.push(phone.to_string());
        }
    }
    out
}

/// `(given, middle, family)` from the structured names, or split from `Name`.
fn names(p: &ClientProfile) -> (Option<String>, Option<String>, Option<String>) {
    if p.first_name.is_some() || p.last_name.is_some() {
        return (
            p.first_name.clone(),
            p.middle_name.clone(),
            p.last_name.clone(),
        );
    }
    let Some(full) = &p.name else {
        return (None, p.middle_name.clone(), None);
    };
    let words: Vec<&str> = full.split_whitespace().collect();
    match words.as_slice() {
        [] => (None, None, None),
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

fn address(p: &ClientProfile) -> Address {
    Address {
        line1: p.street_address.clone().or_else(|| p.address.clone()),
        line2: p.unit_number.clone(),
        city: p.city.clone(),
        state: p.state_short.clone().or_else(|| p.state.clone()),
        postal_code: p.postal_code.clone(),
        country: p.country.clone(),
    }
}

fn external_ids(p: &ClientProfile, opts: &ConvertOptions) -> Vec<ExternalId> {
    p.external_client_id
        .iter()
        .map(|value| ExternalId {
            system: if value.starts_with("pat-") {
                SourceKind::Hint.as_str().to_string()
            } else {
                opts.external_id_system.clone()
            },
            value: value.clone(),
        })
        .collect()
}

/// Converts a full client profile into a source record (`raw` is `value` as received).
pub fn parse_client(
    value: &Value,
    fetched_at: DateTime<Utc>,
    opts: &ConvertOptions,
) -> Result<SourceRecord, ConvertError> {
    let p = ClientProfile::parse(value)?;
    let (given_name, middle_name, family_name) = names(&p);
    let birth_date = p
        .date_of_birth_ms
        .map(|ms| birth_date_from_epoch_ms(ms).ok_or(ConvertError::Format("DateOfBirth")))
        .transpose()?;
    let (sex, gender_identity) = sex_and_gender(p.gender.as_deref());
    let source_updated_at = p
        .last_update_ms
        .map(|ms| instant_from_epoch_ms(ms).ok_or(ConvertError::Format("LastUpdateDate")))
        .transpose()?;
    let phones = distinct_phones(
        [&p.phone, &p.mobile_phone, &p.home_phone, &p.work_phone]
            .into_iter()
            .filter_map(|p| p.as_deref()),
    );
    Ok(SourceRecord {
        key: SourceKey::new(SourceKind::Intakeq, p.client_id.clone()),
        fields: PersonFields {
            given_name,
            middle_name,
            family_name,
            preferred_name: None,
            birth_date,
            sex,
            gender_identity,
            email: p.email.clone(),
            phones,
            address: address(&p),
            external_ids: external_ids(&p, opts),
        },
        status: if p.archived {
            RecordStatus::Archived
        } else {
            RecordStatus::Active
        },
        merged_into: None,
        source_updated_at,
        fetched_at,
        raw: value.clone(),
    })
}

/// The record of a client the `deletedOnly` sweep reported: status deleted, no fields (a
/// deleted record no longer feeds the canonical row), `source_updated_at` = when the deletion
/// was seen, so it outranks every earlier snapshot; `raw` is the inbox body that said so.
pub fn tombstone(id: SourceId, seen_at: DateTime<Utc>, raw: Value) -> SourceRecord {
    crate::sources::tombstone(SourceKey::new(SourceKind::Intakeq, id), seen_at, raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    const FULL: &str = include_str!("../../../tests/fixtures/intakeq/client_full.json");
    const SPARSE: &str = include_str!("../../../tests/fixtures/intakeq/client_sparse.json");

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, milli: i64) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp_millis()
            + milli
    }

    #[test]
    fn the_seed_date_of_birth_with_a_time_of_day_is_its_calendar_date() {
        // 2016-03-21T04:48:00.368Z
        assert_eq!(ms(2016, 3, 21, 4, 48, 0, 368), 1_458_535_680_368);
        assert_eq!(
            birth_date_from_epoch_ms(1_458_535_680_368),
            Some(date(2016, 3, 21))
        );
    }

    #[test]
    fn dates_of_birth_round_to_the_nearest_utc_midnight() {
        let cases = [
            // US Eastern midnight (EST, EDT) and other US zones: same UTC day.
            (ms(1985, 1, 14, 5, 0, 0, 0), date(1985, 1, 14)),
            (ms(1985, 7, 14, 4, 0, 0, 0), date(1985, 7, 14)),
            (ms(1985, 7, 14, 10, 0, 0, 0), date(1985, 7, 14)),
            // UTC midnight itself, and the last millisecond before noon.
            (ms(1990, 2, 28, 0, 0, 0, 0), date(1990, 2, 28)),
            (ms(1990, 2, 28, 11, 59, 59, 999), date(1990, 2, 28)),
            // Noon exactly rounds forward.
            (ms(1990, 2, 28, 12, 0, 0, 0), date(1990, 3, 1)),
            // Midnight east of UTC is the previous UTC evening: the next day is meant.
            (ms(2000, 2, 28, 23, 0, 0, 0), date(2000, 2, 29)),
            (ms(2000, 12, 31, 23, 59, 59, 999), date(2001, 1, 1)),
            (ms(2000, 2, 28, 12, 0, 0, 0), date(2000, 2, 29)),
            // Before 1970: negative epochs floor, never truncate towards zero.
            (-1, date(1970, 1, 1)),
            (-HALF_DAY_MS, date(1970, 1, 1)),
            (-HALF_DAY_MS - 1, date(1969, 12, 31)),
            (ms(1969, 12, 31, 5, 0, 0, 0), date(1969, 12, 31)),
            (ms(1955, 11, 5, 23, 0, 0, 0), date(1955, 11, 6)),
            (ms(1955, 11, 5, 5, 0, 0, 0), date(1955, 11, 5)),
            (ms(1904, 2, 29, 5, 0, 0, 0), date(1904, 2, 29)),
        ];
        for (epoch_ms, expected) in cases {
            assert_eq!(
                birth_date_from_epoch_ms(epoch_ms),
                Some(expected),
                "{epoch_ms}"
            );
        }
        assert_eq!(birth_date_from_epoch_ms(i64::MAX), None);
    }

    #[test]
    fn a_full_seed_client_converts_field_by_field() {
        let value: Value = serde_json::from_str(FULL).unwrap();
        let at = Utc.with_ymd_and_hms(2026, 3, 2, 17, 0, 0).unwrap();
        let r = parse_client(&value, at, &ConvertOptions::default()).unwrap();
        assert_eq!(r.key, SourceKey::new(SourceKind::Intakeq, "1042"));
        let f = &r.fields;
        assert_eq!(f.given_name.as_deref(), Some("María"));
        assert_eq!(f.middle_name.as_deref(), Some("Elena"));
        assert_eq!(f.family_name.as_deref(), Some("García-López"));
        assert_eq!(f.preferred_name, None);
        assert_eq!(f.birth_date, Some(date(2016, 3, 21)));
        assert_eq!(f.sex.as_deref(), Some("female"));
        assert_eq!(f.gender_identity, None);
        assert_eq!(f.email.as_deref(), Some("maria.garcia@example.com"));
        assert_eq!(f.phones, vec!["(617) 555-0142", "617-555-0199"]);
        assert_eq!(
            f.address,
            Address {
                line1: Some("12 Beacon St".into()),
                line2: Some("Apt 4".into()),
                city: Some("Boston".into()),
                state: Some("MA".into()),
                postal_code: Some("02108".into()),
                country: Some("USA".into()),
            }
        );
        assert_eq!(
            f.external_ids,
            vec![ExternalId {
                system: "healthie".into(),
                value: "3204119".into()
            }]
        );
        assert_eq!(r.status, RecordStatus::Active);
        assert_eq!(
            r.source_updated_at,
            Some(Utc.with_ymd_and_hms(2026, 2, 27, 15, 30, 0).unwrap())
        );
        assert_eq!(r.fetched_at, at);
        assert_eq!(r.raw, value);
    }

    #[test]
    fn a_sparse_archived_client_uses_its_fallbacks() {
        let value: Value = serde_json::from_str(SPARSE).unwrap();
        let r = parse_client(&value, Utc::now(), &ConvertOptions::default()).unwrap();
        assert_eq!(r.key.id.as_str(), "7");
        assert_eq!(r.status, RecordStatus::Archived);
        let f = &r.fields;
        assert_eq!(f.given_name.as_deref(), Some("Sam"));
        assert_eq!(f.middle_name.as_deref(), Some("J"));
        assert_eq!(f.family_name.as_deref(), Some("Okafor"));
        assert_eq!(f.birth_date, Some(date(1961, 8, 4)));
        assert_eq!(f.sex, None);
        assert_eq!(f.gender_identity.as_deref(), Some("Non-binary"));
        assert_eq!(f.phones, vec!["5085550123"]);
        assert_eq!(f.address.line1.as_deref(), Some("PO Box 9, Worcester MA"));
        assert_eq!(f.address.city, None);
        assert_eq!(
            f.external_ids,
            vec![ExternalId {
                system: "hint".into(),
                value: "pat-abc123".into()
            }]
        );
        assert_eq!(r.source_updated_at, None);
    }

    #[test]
    fn gender_text_maps_to_sex_or_gender_identity() {
        assert_eq!(
            sex_and_gender(Some(" Female ")),
            (Some("female".into()), None)
        );
        assert_eq!(sex_and_gender(Some("M")), (Some("male".into()), None));
        assert_eq!(sex_and_gender(Some("Prefer not to say")), (None, None));
        assert_eq!(sex_and_gender(Some("")), (None, None));
        assert_eq!(
            sex_and_gender(Some("Transgender woman")),
            (None, Some("Transgender woman".into()))
        );
    }

    #[test]
    fn the_external_id_system_is_configurable() {
        let value = json!({"ClientId": 5, "ExternalClientId": 99});
        let opts = ConvertOptions {
            external_id_system: "emr".into(),
        };
        let r = parse_client(&value, Utc::now(), &opts).unwrap();
        assert_eq!(r.fields.external_ids[0].system, "emr");
        assert_eq!(r.fields.external_ids[0].value, "99");
    }

    #[test]
    fn a_tombstone_is_deleted_and_outranks_earlier_snapshots() {
        let seen = Utc.with_ymd_and_hms(2026, 3, 3, 0, 0, 0).unwrap();
        let t = tombstone("5".into(), seen, json!({"id": "5"}));
        assert_eq!(t.status, RecordStatus::Deleted);
        assert_eq!(t.source_updated_at, Some(seen));
        assert_eq!(t.fields, PersonFields::default());
    }

    #[test]
    fn conversion_errors_never_carry_values() {
        let value = json!({"ClientId": 5, "Email": ["jane@example.com"], "Name": "Jane Roe"});
        let err = parse_client(&value, Utc::now(), &ConvertOptions::default()).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(text.contains("Email"));
        assert!(!text.contains("jane@example.com") && !text.contains("Jane"));
    }
}
