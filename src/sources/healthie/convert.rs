//! Conversion of a Healthie `User` (the `PatientFields` selection) into a [`SourceRecord`].
//!
//! Users arrive two ways: as the generated response types of `GetUser`/`GetUsers`, or as raw
//! JSON in the same shape (`import` files, stored payloads). Both become a [`HealthieUser`]
//! first, then one function applies the rules. The record's `raw` is always the user's JSON
//! object exactly as received. Errors name fields, never their values.
//!
//! Rules:
//! - `given_name` is `legal_name` when present, else `first_name` (Healthie's `first_name` is
//!   the preferred name); `preferred_name` is `first_name` when `legal_name` is present and
//!   differs from it (ignoring case); `family_name` is `last_name`. Healthie has no middle name.
//! - `birth_date` from `dob` (`YYYY-MM-DD`; a datetime is tolerated and its date part taken).
//! - `sex` as given; `gender_identity`, falling back to `gender`.
//! - `email` unless `skipped_email` is true (Healthie then holds a placeholder address).
//! - phones: `phone_number`, then `additional_phone_number`, without repeats.
//! - address: `location`, else the first non-empty entry of `locations`.
//! - external ids: `record_identifier` and `additional_record_identifier`.
//! - status: `active == false` is archived, anything else active.
//! - `source_updated_at` from `updated_at`: RFC 3339, or Healthie's legacy
//!   `YYYY-MM-DD HH:MM:SS -0500` (also with a `UTC` suffix).

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::operations::{get_user, get_users};
use crate::model::{
    Address, ExternalId, PersonFields, RecordStatus, SourceKey, SourceKind, SourceRecord,
};
use crate::sources::ConvertError;

/// `ExternalId::system` of a user's `record_identifier`.
pub const RECORD_IDENTIFIER_SYSTEM: &str = "healthie_record_identifier";
/// `ExternalId::system` of a user's `additional_record_identifier`.
pub const ADDITIONAL_RECORD_IDENTIFIER_SYSTEM: &str = "healthie_additional_record_identifier";

/// A Healthie user as our operations select it, whichever way it arrived.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthieUser {
    pub id: String,
    pub active: Option<bool>,
    pub is_patient: Option<bool>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub legal_name: Option<String>,
    pub dob: Option<String>,
    pub sex: Option<String>,
    pub gender: Option<String>,
    pub gender_identity: Option<String>,
    pub email: Option<String>,
    pub skipped_email: Option<bool>,
    pub phone_number: Option<String>,
    pub additional_phone_number: Option<String>,
    pub record_identifier: Option<String>,
    pub additional_record_identifier: Option<String>,
    pub updated_at: Option<String>,
    pub location: Option<HealthieLocation>,
    pub locations: Vec<HealthieLocation>,
}

/// A Healthie `Location` (address).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthieLocation {
    pub line1: Option<String>,
    pub line2: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub zip: Option<String>,
    pub country: Option<String>,
}

macro_rules! from_generated {
    ($module:ident) => {
        impl From<&$module::PatientFieldsLocation> for HealthieLocation {
            fn from(l: &$module::PatientFieldsLocation) -> Self {
                Self {
                    line1: l.line1.clone(),
                    line2: l.line2.clone(),
                    city: l.city.clone(),
                    state: l.state.clone(),
                    zip: l.zip.clone(),
                    country: l.country.clone(),
                }
            }
        }

        impl From<&$module::PatientFieldsLocations> for HealthieLocation {
            fn from(l: &$module::PatientFieldsLocations) -> Self {
                Self {
                    line1: l.line1.clone(),
                    line2: l.line2.clone(),
                    city: l.city.clone(),
                    state: l.state.clone(),
                    zip: l.zip.clone(),
                    country: l.country.clone(),
                }
            }
        }

        impl From<&$module::PatientFields> for HealthieUser {
            fn from(u: &$module::PatientFields) -> Self {
                Self {
                    id: u.id.clone(),
                    active: Some(u.active),
                    is_patient: u.is_patient,
                    first_name: u.first_name.clone(),
                    last_name: u.last_name.clone(),
                    legal_name: u.legal_name.clone(),
                    dob: u.dob.clone(),
                    sex: u.sex.clone(),
                    gender: u.gender.clone(),
                    gender_identity: u.gender_identity.clone(),
                    email: u.email.clone(),
                    skipped_email: u.skipped_email,
                    phone_number: u.phone_number.clone(),
                    additional_phone_number: u.additional_phone_number.clone(),
                    record_identifier: u.record_identifier.clone(),
                    additional_record_identifier: u.additional_record_identifier.clone(),
                    updated_at: u.updated_at.clone(),
                    location: u.location.as_ref().map(HealthieLocation::from),
                    locations: u
                        .locations
                        .iter()
                        .flatten()
                        .map(HealthieLocation::from)
                        .collect(),
                }
            }
        }
    };
}

from_generated!(get_user);
from_generated!(get_users);

impl HealthieUser {
    /// Reads a user from JSON in the `PatientFields` shape. Tolerant where exports differ from
    /// the API: ids and other text fields may be numbers, absent fields are `None`.
    pub fn from_json(value: &Value) -> Result<Self, ConvertError> {
        let obj = value
            .as_object()
            .ok_or_else(|| ConvertError::Shape("a healthie user must be a JSON object".into()))?;
        let id = text(obj, "id")?.ok_or(ConvertError::Missing("id"))?;
        Ok(Self {
            id,
            active: flag(obj, "active")?,
            is_patient: flag(obj, "is_patient")?,
            first_name: text(obj, "first_name")?,
            last_name: text(obj, "last_name")?,
            legal_name: text(obj, "legal_name")?,
            dob: text(obj, "dob")?,
            sex: text(obj, "sex")?,
            gender: text(obj, "gender")?,
            gender_identity: text(obj, "gender_identity")?,
            email: text(obj, "email")?,
            skipped_email: flag(obj, "skipped_email")?,
            phone_number: text(obj, "phone_number")?,
            additional_phone_number: text(obj, "additional_phone_number")?,
            record_identifier: text(obj, "record_identifier")?,
            additional_record_identifier: text(obj, "additional_record_identifier")?,
            updated_at: text(obj, "updated_at")?,
            location: match obj.get("location") {
                None | Some(Value::Null) => None,
                Some(v) => Some(location(v, "location")?),
            },
            locations: match obj.get("locations") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .filter(|v| !v.is_null())
                    .map(|v| location(v, "locations"))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(ConvertError::Format("locations")),
            },
        })
    }
}

/// A text field: a string, or a number written out; absent or null is `None`.
fn text(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, ConvertError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(ConvertError::Format(field)),
    }
}

/// A boolean field; absent or null is `None`.
fn flag(obj: &Map<String, Value>, field: &'static str) -> Result<Option<bool>, ConvertError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ConvertError::Format(field)),
    }
}

fn location(value: &Value, field: &'static str) -> Result<HealthieLocation, ConvertError> {
    let obj = value.as_object().ok_or(ConvertError::Format(field))?;
    let part = |name: &'static str| text(obj, name).map_err(|_| ConvertError::Format(field));
    Ok(HealthieLocation {
        line1: part("line1")?,
        line2: part("line2")?,
        city: part("city")?,
        state: part("state")?,
        zip: part("zip")?,
        country: part("country")?,
    })
}

/// Converts raw user JSON (as `import` reads it, or as the API returned it) into a source
/// record whose `raw` is that JSON.
pub fn parse_user(value: &Value, fetched_at: DateTime<Utc>) -> Result<SourceRecord, ConvertError> {
    let user = HealthieUser::from_json(value)?;
    user_to_record(&user, value.clone(), fetched_at)
}

/// Applies the conversion rules (see the module docs) to a user; `raw` is stored as is.
pub fn user_to_record(
    user: &HealthieUser,
    raw: Value,
    fetched_at: DateTime<Utc>,
) -> Result<SourceRecord, ConvertError> {
    let id = clean(Some(&user.id)).ok_or(ConvertError::Missing("id"))?;
    let first = clean(user.first_name.as_deref());
    let (given_name, preferred_name) = match clean(user.legal_name.as_deref()) {
        Some(legal) => {
            let preferred = first.filter(|f| f.to_lowercase() != legal.to_lowercase());
            (Some(legal), preferred)
        }
        None => (first, None),
    };
    let birth_date = clean(user.dob.as_deref())
        .map(|dob| crate::sources::parse_birth_date(&dob).ok_or(ConvertError::Format("dob")))
        .transpose()?;
    let email = if user.skipped_email == Some(true) {
        None
    } else {
        clean(user.email.as_deref())
    };
    let mut phones: Vec<String> = Vec::new();
    for phone in [&user.phone_number, &user.additional_phone_number] {
        if let Some(phone) = clean(phone.as_deref()) {
            if !phones.contains(&phone) {
                phones.push(phone);
            }
        }
    }
    let address = user
        .location
        .iter()
        .chain(user.locations.iter())
        .map(address)
        .find(|a| !a.is_empty())
        .unwrap_or_default();
    let mut external_ids = Vec::new();
    for (system, value) in [
        (RECORD_IDENTIFIER_SYSTEM, &user.record_identifier),
        (
            ADDITIONAL_RECORD_IDENTIFIER_SYSTEM,
            &user.additional_record_identifier,
        ),
    ] {
        if let Some(value) = clean(value.as_deref()) {
            external_ids.push(ExternalId {
                system: system.to_string(),
                value,
            });
        }
    }
    let source_updated_at = clean(user.updated_at.as_deref())
        .map(|t| parse_updated_at(&t).ok_or(ConvertError::Format("updated_at")))
        .transpose()?;
    Ok(SourceRecord {
        key: SourceKey::new(SourceKind::Healthie, id),
        fields: PersonFields {
            given_name,
            middle_name: None,
            family_name: clean(user.last_name.as_deref()),
            preferred_name,
            birth_date,
            sex: clean(user.sex.as_deref()),
            gender_identity: clean(user.gender_identity.as_deref())
                .or_else(|| clean(user.gender.as_deref())),
            email,
            phones,
            address,
            external_ids,
        },
        status: if user.active == Some(false) {
            RecordStatus::Archived
        } else {
            RecordStatus::Active
        },
        merged_into: None,
        source_updated_at,
        fetched_at,
        raw,
    })
}

fn address(l: &HealthieLocation) -> Address {
    Address {
        line1: clean(l.line1.as_deref()),
        line2: clean(l.line2.as_deref()),
        city: clean(l.city.as_deref()),
        state: clean(l.state.as_deref()),
        postal_code: clean(l.zip.as_deref()),
        country: clean(l.country.as_deref()),
    }
}

/// Trimmed, with empty meaning absent.
fn clean(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// `updated_at`: RFC 3339 (`2024-05-01T10:00:00-04:00`), or Healthie's legacy
/// `2024-05-01 10:00:00 -0400` (also `... UTC`), with optional fractional seconds.
pub fn parse_updated_at(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f %z", "%Y-%m-%dT%H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(text, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    let naive = text.strip_suffix(" UTC")?;
    NaiveDateTime::parse_from_str(naive, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};
    use serde_json::json;

    use super::*;

    fn fetched_at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 2, 1, 12, 0, 0).unwrap()
    }

    /// A user as `GetUser` returns it (seed-shaped: every selected field present).
    fn seed_user() -> Value {
        json!({
            "id": "4411",
            "active": true,
            "is_patient": true,
            "first_name": "Kate",
            "last_name": "Okafor",
            "legal_name": "Katherine",
            "dob": "1984-07-19",
            "sex": "Female",
            "gender": "Female",
            "gender_identity": null,
            "email": "kate.okafor@example.org",
            "skipped_email": false,
            "phone_number": "(555) 201-3344",
            "additional_phone_number": "",
            "record_identifier": "MRN-0042",
            "additional_record_identifier": null,
            "archived_at": null,
            "created_at": "2023-03-02T09:15:00-05:00",
            "updated_at": "2026-01-20T08:30:00-05:00",
            "location": {
                "id": "91", "line1": "12 Elm St", "line2": "Apt 3", "city": "Dayton",
                "state": "OH", "zip": "45402", "country": "US"
            },
            "locations": []
        })
    }

    fn with(changes: Value) -> Value {
        let mut user = seed_user();
        for (k, v) in changes.as_object().unwrap() {
            user[k] = v.clone();
        }
        user
    }

    fn convert(user: &Value) -> SourceRecord {
        parse_user(user, fetched_at()).expect("converts")
    }

    #[test]
    fn seed_user_converts_field_by_field() {
        let user = seed_user();
        let r = convert(&user);
        assert_eq!(r.key, SourceKey::new(SourceKind::Healthie, "4411"));
        assert_eq!(r.fields.given_name.as_deref(), Some("Katherine"));
        assert_eq!(r.fields.preferred_name.as_deref(), Some("Kate"));
        assert_eq!(r.fields.family_name.as_deref(), Some("Okafor"));
        assert_eq!(r.fields.middle_name, None);
        assert_eq!(r.fields.birth_date, NaiveDate::from_ymd_opt(1984, 7, 19));
        assert_eq!(r.fields.sex.as_deref(), Some("Female"));
        assert_eq!(r.fields.gender_identity.as_deref(), Some("Female"));
        assert_eq!(r.fields.email.as_deref(), Some("kate.okafor@example.org"));
        assert_eq!(r.fields.phones, vec!["(555) 201-3344".to_string()]);
        assert_eq!(
            r.fields.address,
            Address {
                line1: Some("12 Elm St".into()),
                line2: Some("Apt 3".into()),
                city: Some("Dayton".into()),
                state: Some("OH".into()),
                postal_code: Some("45402".into()),
                country: Some("US".into()),
            }
        );
        assert_eq!(
            r.fields.external_ids,
            vec![ExternalId {
                system: RECORD_IDENTIFIER_SYSTEM.into(),
                value: "MRN-0042".into()
            }]
        );
        assert_eq!(r.status, RecordStatus::Active);
        assert_eq!(r.merged_into, None);
        assert_eq!(
            r.source_updated_at,
            Some(Utc.with_ymd_and_hms(2026, 1, 20, 13, 30, 0).unwrap())
        );
        assert_eq!(r.fetched_at, fetched_at());
        assert_eq!(r.raw, user, "raw is the user object exactly as received");
    }

    #[test]
    fn names_follow_legal_and_preferred_rules() {
        // (legal_name, first_name) -> (given_name, preferred_name)
        let cases: &[(Value, Value, Option<&str>, Option<&str>)] = &[
            (
                json!("Katherine"),
                json!("Kate"),
                Some("Katherine"),
                Some("Kate"),
            ),
            (
                json!("Katherine"),
                json!("katherine "),
                Some("Katherine"),
                None,
            ),
            (json!(null), json!("Kate"), Some("Kate"), None),
            (json!("  "), json!("Kate"), Some("Kate"), None),
            (json!("Katherine"), json!(null), Some("Katherine"), None),
            (json!(null), json!(null), None, None),
        ];
        for (legal, first, given, preferred) in cases {
            let r = convert(&with(json!({ "legal_name": legal, "first_name": first })));
            assert_eq!(r.fields.given_name.as_deref(), *given, "{legal} / {first}");
            assert_eq!(
                r.fields.preferred_name.as_deref(),
                *preferred,
                "{legal} / {first}"
            );
        }
    }

    #[test]
    fn skipped_email_means_no_email() {
        let cases = [
            (json!(true), None),
            (json!(false), Some("kate.okafor@example.org")),
            (json!(null), Some("kate.okafor@example.org")),
        ];
        for (skipped, email) in cases {
            let r = convert(&with(json!({ "skipped_email": skipped })));
            assert_eq!(r.fields.email.as_deref(), email, "skipped_email {skipped}");
        }
    }

    #[test]
    fn inactive_user_is_archived() {
        let cases = [
            (json!(false), RecordStatus::Archived),
            (json!(true), RecordStatus::Active),
            (json!(null), RecordStatus::Active),
        ];
        for (active, status) in cases {
            let r = convert(&with(
                json!({ "active": active, "archived_at": "2025-11-02T10:00:00Z" }),
            ));
            assert_eq!(r.status, status, "active {active}");
        }
    }

    #[test]
    fn updated_at_accepts_rfc3339_and_the_legacy_format() {
        let instant = Utc.with_ymd_and_hms(2024, 5, 1, 14, 0, 0).unwrap();
        let cases = [
            "2024-05-01T10:00:00-04:00",
            "2024-05-01T14:00:00Z",
            "2024-05-01T14:00:00.000Z",
            "2024-05-01 10:00:00 -0400",
            "2024-05-01 09:00:00 -0500",
            "2024-05-01 14:00:00 +0000",
            "2024-05-01 14:00:00 UTC",
        ];
        for text in cases {
            let r = convert(&with(json!({ "updated_at": text })));
            assert_eq!(r.source_updated_at, Some(instant), "{text}");
        }
        assert_eq!(
            parse_updated_at("2024-05-01 10:00:00.250 -0400"),
            Some(instant + chrono::Duration::milliseconds(250))
        );
        let r = convert(&with(json!({ "updated_at": null })));
        assert_eq!(r.source_updated_at, None);
    }

    #[test]
    fn dob_tolerates_a_datetime() {
        let date = NaiveDate::from_ymd_opt(1984, 7, 19);
        for text in [
            "1984-07-19",
            "1984-07-19T00:00:00-05:00",
            "1984-07-19 00:00:00 -0500",
        ] {
            let r = convert(&with(json!({ "dob": text })));
            assert_eq!(r.fields.birth_date, date, "{text}");
        }
        assert_eq!(convert(&with(json!({ "dob": "" }))).fields.birth_date, None);
    }

    #[test]
    fn address_comes_from_location_else_the_first_of_locations() {
        let home = json!({ "id": "1", "line1": "1 Main St", "line2": null, "city": "Austin",
                           "state": "TX", "zip": "73301", "country": "US" });
        let work = json!({ "id": "2", "line1": "9 Oak Ave", "line2": null, "city": "Reno",
                           "state": "NV", "zip": "89501", "country": "US" });
        let blank = json!({ "id": "3", "line1": "", "line2": null, "city": null,
                            "state": null, "zip": null, "country": null });
        let cases = [
            (
                json!({ "location": home, "locations": [work] }),
                Some("1 Main St"),
            ),
            (
                json!({ "location": null, "locations": [work, home] }),
                Some("9 Oak Ave"),
            ),
            (
                json!({ "location": blank, "locations": [blank, home] }),
                Some("1 Main St"),
            ),
            (json!({ "location": null, "locations": null }), None),
            (json!({ "location": null, "locations": [] }), None),
        ];
        for (changes, line1) in cases {
            let r = convert(&with(changes.clone()));
            assert_eq!(r.fields.address.line1.as_deref(), line1, "{changes}");
        }
    }

    #[test]
    fn numeric_ids_and_identifiers_are_read_as_text() {
        let r = convert(&with(json!({ "id": 4411, "record_identifier": 42,
                                      "additional_record_identifier": "B-7" })));
        assert_eq!(r.key.id.as_str(), "4411");
        assert_eq!(
            r.fields.external_ids,
            vec![
                ExternalId {
                    system: RECORD_IDENTIFIER_SYSTEM.into(),
                    value: "42".into()
                },
                ExternalId {
                    system: ADDITIONAL_RECORD_IDENTIFIER_SYSTEM.into(),
                    value: "B-7".into()
                },
            ]
        );
    }

    #[test]
    fn gender_identity_falls_back_to_gender_and_phones_do_not_repeat() {
        let r = convert(&with(
            json!({ "gender_identity": "Non-binary", "gender": "Other",
                                      "additional_phone_number": "(555) 201-3344" }),
        ));
        assert_eq!(r.fields.gender_identity.as_deref(), Some("Non-binary"));
        assert_eq!(r.fields.phones, vec!["(555) 201-3344".to_string()]);
        let r = convert(&with(json!({ "gender_identity": "", "gender": "Male",
                                      "additional_phone_number": "555-0100" })));
        assert_eq!(r.fields.gender_identity.as_deref(), Some("Male"));
        assert_eq!(
            r.fields.phones,
            vec!["(555) 201-3344".to_string(), "555-0100".into()]
        );
    }

    #[test]
    fn generated_types_and_raw_json_convert_the_same() {
        for user in [
            seed_user(),
            with(json!({ "active": false, "location": null,
            "locations": [{ "id": "5", "line1": "3 Pine Rd", "line2": null, "city": "Provo",
                            "state": "UT", "zip": "84601", "country": "US" }] })),
        ] {
            let single: get_user::PatientFields = serde_json::from_value(user.clone()).unwrap();
            let batch: get_users::PatientFields = serde_json::from_value(user.clone()).unwrap();
            let from_json = convert(&user);
            for typed in [HealthieUser::from(&single), HealthieUser::from(&batch)] {
                assert_eq!(typed, HealthieUser::from_json(&user).unwrap());
                let r = user_to_record(&typed, user.clone(), fetched_at()).unwrap();
                assert_eq!(r, from_json);
            }
        }
    }

    #[test]
    fn conversion_errors_name_the_field_never_the_value() {
        let cases = [
            (with(json!({ "dob": "19/07/1984 Kate" })), "dob"),
            (
                with(json!({ "updated_at": "last tuesday Okafor" })),
                "updated_at",
            ),
            (
                with(json!({ "first_name": { "secret": "Okafor" } })),
                "first_name",
            ),
            (with(json!({ "active": "Okafor" })), "active"),
            (with(json!({ "location": "12 Elm St Okafor" })), "location"),
            (
                with(json!({ "locations": { "line1": "12 Elm St Okafor" } })),
                "locations",
            ),
            (with(json!({ "id": null })), "id"),
            (json!(["Okafor"]), "JSON object"),
        ];
        for (user, field) in cases {
            let e = parse_user(&user, fetched_at()).expect_err(field);
            let shown = format!("{e} {e:?}");
            assert!(shown.contains(field), "{shown}");
            for value in ["Okafor", "Kate", "1984", "Elm", "tuesday"] {
                assert!(!shown.contains(value), "{shown}");
            }
        }
    }
}
