//! Hint's wire shapes (reference B2, B4, B5): the patient blueprint (`pat-…` ids, ISO dates,
//! `phones[]`, flat `address_*`, `merged_into`), the webhook envelope
//! `{id, type, practice_id, created_at, object}`, and the patients a membership names.
//! Read leniently from `serde_json::Value`: a field of a surprising type is an error that names
//! the field, never its value.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};

use crate::sources::ConvertError;

/// Largest page Hint serves (`limit` <= 100).
pub const MAX_LIMIT: u32 = 100;

/// A Hint id: a non-empty string (or, leniently, a number).
pub fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            (!s.is_empty()).then(|| s.to_string())
        }
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The id of a patient object.
pub fn patient_id(v: &Value) -> Option<String> {
    v.get("id").and_then(id_text)
}

/// A patient's `updated_at`, if it has a readable one.
pub fn updated_at(v: &Value) -> Option<DateTime<Utc>> {
    v.get("updated_at")
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Whether a value looks like a full patient object (what `GET /patients/{id}` returns).
pub fn is_patient(v: &Value) -> bool {
    v.is_object() && patient_id(v).is_some() && v.get("updated_at").is_some()
}

/// A webhook envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<'a> {
    pub id: Option<String>,
    pub event_type: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub object: Option<&'a Value>,
}

impl<'a> Envelope<'a> {
    pub fn read(body: &'a Value) -> Self {
        Self {
            id: body.get("id").and_then(id_text),
            event_type: body
                .get("type")
                .and_then(Value::as_str)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
            created_at: body
                .get("created_at")
                .and_then(Value::as_str)
                .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
                .map(|t| t.with_timezone(&Utc)),
            object: body.get("object").filter(|o| o.is_object()),
        }
    }
}

/// The patients a membership names, owner first, without repeats: `owner`, `patient`,
/// `membership_patients[].patient`, `patients[]` (the same places the receiver reads).
pub fn membership_patient_ids(object: &Value) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut push = |holder: Option<&Value>| {
        if let Some(id) = holder.and_then(|h| h.get("id")).and_then(id_text) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    };
    push(object.get("owner"));
    push(object.get("patient"));
    if let Some(Value::Array(members)) = object.get("membership_patients") {
        for member in members {
            push(member.get("patient"));
        }
    }
    if let Some(Value::Array(patients)) = object.get("patients") {
        for patient in patients {
            push(Some(patient));
        }
    }
    ids
}

/// One entry of `phones[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phone {
    pub number: String,
    pub kind: Option<String>,
}

/// One entry of `external_records[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRecord {
    pub source: String,
    pub external_id: String,
}

/// A patient, as far as patient-sync reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patient {
    pub id: String,
    pub first_name: Option<String>,
    pub middle_name: Option<String>,
    pub last_name: Option<String>,
    pub name: Option<String>,
    pub chosen_first_name: Option<String>,
    pub dob: Option<NaiveDate>,
    pub email: Option<String>,
    pub phones: Vec<Phone>,
    pub address_line1: Option<String>,
    pub address_line2: Option<String>,
    pub address_city: Option<String>,
    pub address_state: Option<String>,
    pub address_zip: Option<String>,
    pub address_country: Option<String>,
    pub sex: Option<String>,
    /// Deprecated since 2021-03-31; read when `sex` is empty.
    pub gender: Option<String>,
    pub gender_identity: Option<String>,
    pub gender_other: Option<String>,
    pub integration_record_id: Option<String>,
    pub external_records: Vec<ExternalRecord>,
    pub membership_status: Option<String>,
    /// The surviving patient's id when this one was merged away.
    pub merged_into: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl Patient {
    pub fn parse(value: &Value) -> Result<Self, ConvertError> {
        let obj = value
            .as_object()
            .ok_or_else(|| ConvertError::Shape("a Hint patient must be a JSON object".into()))?;
        let id = match obj.get("id") {
            None | Some(Value::Null) => return Err(ConvertError::Missing("id")),
            Some(v) => id_text(v).ok_or(ConvertError::Format("id"))?,
        };
        Ok(Self {
            id,
            first_name: text(obj, "first_name")?,
            middle_name: text(obj, "middle_name")?,
            last_name: text(obj, "last_name")?,
            name: text(obj, "name")?,
            chosen_first_name: text(obj, "chosen_first_name")?,
            dob: date(obj, "dob")?,
            email: text(obj, "email")?,
            phones: phones(obj)?,
            address_line1: text(obj, "address_line1")?,
            address_line2: text(obj, "address_line2")?,
            address_city: text(obj, "address_city")?,
            address_state: text(obj, "address_state")?,
            address_zip: text(obj, "address_zip")?,
            address_country: text(obj, "address_country")?,
            sex: text(obj, "sex")?,
            gender: text(obj, "gender")?,
            gender_identity: text(obj, "gender_identity")?,
            gender_other: text(obj, "gender_other")?,
            integration_record_id: text(obj, "integration_record_id")?,
            external_records: external_records(obj)?,
            membership_status: text(obj, "membership_status")?,
            merged_into: merged_into(obj)?,
            updated_at: timestamp(obj, "updated_at")?,
        })
    }
}

fn text(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, ConvertError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let s = s.trim();
            Ok((!s.is_empty()).then(|| s.to_string()))
        }
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(ConvertError::Format(field)),
    }
}

/// `YYYY-MM-DD`; a full timestamp is read for its date part ([`crate::sources::parse_birth_date`]).
fn date(obj: &Map<String, Value>, field: &'static str) -> Result<Option<NaiveDate>, ConvertError> {
    let Some(s) = text(obj, field)? else {
        return Ok(None);
    };
    crate::sources::parse_birth_date(&s)
        .map(Some)
        .ok_or(ConvertError::Format(field))
}

/// ISO 8601 with an offset, e.g. `2017-02-05T06:23:00.000000-08:00`.
fn timestamp(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<DateTime<Utc>>, ConvertError> {
    let Some(s) = text(obj, field)? else {
        return Ok(None);
    };
    DateTime::parse_from_rfc3339(&s)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| ConvertError::Format(field))
}

fn phones(obj: &Map<String, Value>) -> Result<Vec<Phone>, ConvertError> {
    let list = match obj.get("phones") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ConvertError::Format("phones")),
    };
    let mut out = Vec::new();
    for entry in list {
        match entry {
            Value::Object(phone) => {
                if let Some(number) = text(phone, "number")? {
                    out.push(Phone {
                        number,
                        kind: text(phone, "type")?,
                    });
                }
            }
            Value::String(s) if !s.trim().is_empty() => out.push(Phone {
                number: s.trim().to_string(),
                kind: None,
            }),
            Value::Null | Value::String(_) => {}
            _ => return Err(ConvertError::Format("phones")),
        }
    }
    Ok(out)
}

fn external_records(obj: &Map<String, Value>) -> Result<Vec<ExternalRecord>, ConvertError> {
    let list = match obj.get("external_records") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ConvertError::Format("external_records")),
    };
    let mut out = Vec::new();
    for entry in list {
        let Value::Object(record) = entry else {
            return Err(ConvertError::Format("external_records"));
        };
        if let (Some(source), Some(external_id)) =
            (text(record, "source")?, text(record, "external_id")?)
        {
            out.push(ExternalRecord {
                source,
                external_id,
            });
        }
    }
    Ok(out)
}

/// `merged_into`: `{id, name}`, or leniently a bare id.
fn merged_into(obj: &Map<String, Value>) -> Result<Option<String>, ConvertError> {
    match obj.get("merged_into") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(target)) => match target.get("id") {
            Some(v) => id_text(v)
                .map(Some)
                .ok_or(ConvertError::Format("merged_into.id")),
            None => Err(ConvertError::Missing("merged_into.id")),
        },
        Some(v @ Value::String(_)) => Ok(id_text(v)),
        Some(_) => Err(ConvertError::Format("merged_into")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn memberships_name_their_patients_owner_first() {
        let object = json!({
            "id": "mem-1",
            "owner": {"id": "pat-1"},
            "membership_patients": [{"patient": {"id": "pat-2"}}, {"patient": {"id": "pat-1"}}],
            "patients": [{"id": "pat-3"}],
        });
        assert_eq!(
            membership_patient_ids(&object),
            vec!["pat-1", "pat-2", "pat-3"]
        );
        assert!(membership_patient_ids(&json!({"id": "mem-2"})).is_empty());
    }

    #[test]
    fn envelopes_are_read_leniently() {
        let body = json!({"id": "evt-1", "type": " patient.updated ", "created_at": "2026-01-02T03:04:05Z", "object": {"id": "pat-1"}});
        let e = Envelope::read(&body);
        assert_eq!(e.id.as_deref(), Some("evt-1"));
        assert_eq!(e.event_type.as_deref(), Some("patient.updated"));
        assert!(e.created_at.is_some() && e.object.is_some());
        assert_eq!(Envelope::read(&json!({"object": 3})).object, None);
    }

    #[test]
    fn a_bad_field_is_named_without_its_value() {
        let err = Patient::parse(&json!({"id": "pat-1", "dob": "Jane's birthday"})).unwrap_err();
        assert_eq!(err.to_string(), "field `dob` has an unexpected format");
        let err = Patient::parse(&json!({"id": "pat-1", "phones": "+1 415 555 0100"})).unwrap_err();
        assert!(!err.to_string().contains("415"));
        let err =
            Patient::parse(&json!({"id": "pat-1", "merged_into": {"name": "Jane"}})).unwrap_err();
        assert_eq!(err.to_string(), "missing required field `merged_into.id`");
    }
}
