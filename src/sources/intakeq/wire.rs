//! IntakeQ's wire shapes (reference A2): the full client profile (`includeProfile=true`), the
//! thin list row (`ClientNumber` instead of `ClientId`), and the webhook payloads that name a
//! client. Read leniently from `serde_json::Value`: a field of a surprising type is an error
//! that names the field, never its value (serde's own messages quote values, which may be PHI).

use serde_json::{Map, Value};

use crate::sources::ConvertError;

/// Clients per list page; a shorter page is the last one (there is no total count).
pub const PAGE_SIZE: usize = 100;

/// The client id of a list row or profile: `ClientId`, or `ClientNumber` on thin rows. An
/// integer or a string of digits; anything else is no id.
pub fn client_id(row: &Value) -> Option<String> {
    ["ClientId", "ClientNumber"]
        .iter()
        .find_map(|field| row.get(*field).and_then(id_text))
}

/// Whether a list row carries the profile (`includeProfile` honoured): profiles have
/// `ClientId`, thin rows `ClientNumber`.
pub fn has_profile(row: &Value) -> bool {
    row.get("ClientId").is_some_and(|v| id_text(v).is_some())
}

/// The `ClientId` a webhook payload names: at the top level (intakes, notes) or inside
/// `Appointment` / `Invoice`.
pub fn webhook_client_id(body: &Value) -> Option<String> {
    body.get("ClientId").and_then(id_text).or_else(|| {
        ["Appointment", "Invoice"].iter().find_map(|k| {
            body.get(*k)
                .and_then(|o| o.get("ClientId"))
                .and_then(id_text)
        })
    })
}

/// An IntakeQ id: a non-negative integer, or a string of digits.
pub fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        Value::String(s) => {
            let s = s.trim();
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.to_string())
        }
        _ => None,
    }
}

/// A full client profile, as far as patient-sync reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientProfile {
    pub client_id: String,
    pub name: Option<String>,
    pub first_name: Option<String>,
    pub middle_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub mobile_phone: Option<String>,
    pub home_phone: Option<String>,
    pub work_phone: Option<String>,
    /// Epoch milliseconds of an instant on (or near) the birth date; see `convert`.
    pub date_of_birth_ms: Option<i64>,
    pub gender: Option<String>,
    pub archived: bool,
    /// Free-text address, alongside the structured parts below.
    pub address: Option<String>,
    pub unit_number: Option<String>,
    pub street_address: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub state_short: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
    pub external_client_id: Option<String>,
    pub date_created_ms: Option<i64>,
    /// `LastUpdateDate`: not in the 2022 official model, present in newer payloads.
    pub last_update_ms: Option<i64>,
}

impl ClientProfile {
    /// Reads a profile. The id is required (`ClientId`, or `ClientNumber` on a thin row).
    pub fn parse(value: &Value) -> Result<Self, ConvertError> {
        let obj = value
            .as_object()
            .ok_or_else(|| ConvertError::Shape("an IntakeQ client must be a JSON object".into()))?;
        let client_id = match obj.get("ClientId").or_else(|| obj.get("ClientNumber")) {
            None | Some(Value::Null) => return Err(ConvertError::Missing("ClientId")),
            Some(v) => id_text(v).ok_or(ConvertError::Format("ClientId"))?,
        };
        Ok(Self {
            client_id,
            name: text(obj, "Name")?,
            first_name: text(obj, "FirstName")?,
            middle_name: text(obj, "MiddleName")?,
            last_name: text(obj, "LastName")?,
            email: text(obj, "Email")?,
            phone: text(obj, "Phone")?,
            mobile_phone: text(obj, "MobilePhone")?,
            home_phone: text(obj, "HomePhone")?,
            work_phone: text(obj, "WorkPhone")?,
            date_of_birth_ms: birth_epoch_ms(obj, "DateOfBirth")?,
            gender: text(obj, "Gender")?,
            archived: flag(obj, "Archived")?,
            address: text(obj, "Address")?,
            unit_number: text(obj, "UnitNumber")?,
            street_address: text(obj, "StreetAddress")?,
            city: text(obj, "City")?,
            state: text(obj, "State")?,
            state_short: text(obj, "StateShort")?,
            postal_code: text(obj, "PostalCode")?,
            country: text(obj, "Country")?,
            external_client_id: text(obj, "ExternalClientId")?,
            date_created_ms: epoch_ms(obj, "DateCreated")?,
            last_update_ms: epoch_ms(obj, "LastUpdateDate")?,
        })
    }
}

/// A text field: missing, null and blank are `None`; numbers are accepted as text (phones,
/// postal codes and external ids sometimes arrive as numbers).
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

/// Epoch milliseconds: an integer, a float (truncated towards negative infinity) or a string of
/// an integer. Missing and null are `None`.
fn epoch_ms(obj: &Map<String, Value>, field: &'static str) -> Result<Option<i64>, ConvertError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(ms) => Ok(Some(ms)),
            None => n
                .as_f64()
                .filter(|f| f.is_finite() && f.abs() < 1e17)
                .map(|f| Some(f.floor() as i64))
                .ok_or(ConvertError::Format(field)),
        },
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ConvertError::Format(field)),
        Some(_) => Err(ConvertError::Format(field)),
    }
}

/// A date of birth as epoch milliseconds. The API sends a number; exports made by other tools
/// also carry the .NET form `/Date(ms)/`, or a date (`YYYY-MM-DD`, possibly with a time, or
/// `YYYYMMDD`, as text or as an 8-digit number), which stands for that date's UTC midnight. No
/// timezone's midnight on 1970-01-01 or 02 reads as a valid `YYYYMMDD` (their last five digits
/// are zeros), so an 8-digit instant is never taken for a date.
fn birth_epoch_ms(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<i64>, ConvertError> {
    let midnight = |d: chrono::NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
    };
    let compact = |ms: i64| {
        (10_000_000..=99_999_999)
            .contains(&ms)
            .then(|| crate::sources::parse_birth_date(&ms.to_string()))
            .flatten()
    };
    let Some(Value::String(s)) = obj.get(field) else {
        let ms = epoch_ms(obj, field)?;
        return Ok(match ms.and_then(compact) {
            Some(date) => midnight(date),
            None => ms,
        });
    };
    let s = s.trim();
    if let Some(ms) = s
        .strip_prefix("/Date(")
        .and_then(|rest| rest.strip_suffix(")/"))
    {
        // The .NET form may carry an offset after the number (`/Date(ms+0100)/`); the number
        // is the instant either way.
        let end = ms
            .get(1..)
            .and_then(|rest| rest.find(['+', '-']))
            .map_or(ms.len(), |i| i + 1);
        return ms[..end]
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ConvertError::Format(field));
    }
    if let Some(date) = crate::sources::parse_birth_date(s) {
        return Ok(midnight(date));
    }
    epoch_ms(obj, field)
}

/// A boolean; missing and null are false.
fn flag(obj: &Map<String, Value>, field: &'static str) -> Result<bool, ConvertError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(_) => Err(ConvertError::Format(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_read_from_client_id_or_client_number() {
        assert_eq!(client_id(&json!({"ClientId": 42})).as_deref(), Some("42"));
        assert_eq!(
            client_id(&json!({"ClientNumber": "43"})).as_deref(),
            Some("43")
        );
        assert_eq!(client_id(&json!({"ClientNumber": "x1"})), None);
        assert!(has_profile(&json!({"ClientId": 1})));
        assert!(!has_profile(&json!({"ClientNumber": 1, "Name": "A"})));
    }

    #[test]
    fn webhook_payloads_name_their_client_at_the_top_or_nested() {
        let intake = json!({"IntakeId": "i", "Type": "Intake Submitted", "ClientId": 7});
        let appointment =
            json!({"EventType": "AppointmentCreated", "Appointment": {"ClientId": "8"}});
        assert_eq!(webhook_client_id(&intake).as_deref(), Some("7"));
        assert_eq!(webhook_client_id(&appointment).as_deref(), Some("8"));
        assert_eq!(webhook_client_id(&json!({"Type": "x"})), None);
    }

    #[test]
    fn a_birth_date_is_read_from_epoch_ms_the_dotnet_form_or_an_iso_date() {
        let ms = |v: Value| {
            ClientProfile::parse(&json!({"ClientId": 1, "DateOfBirth": v}))
                .map(|p| p.date_of_birth_ms)
                .map_err(|e| e.to_string())
        };
        // 1980-01-02T00:00:00Z and 1969-12-31T05:00:00Z (a US Eastern midnight).
        let day = 315_619_200_000;
        assert_eq!(ms(json!(day)), Ok(Some(day)));
        assert_eq!(ms(json!(day.to_string())), Ok(Some(day)));
        assert_eq!(ms(json!("1980-01-02")), Ok(Some(day)));
        assert_eq!(ms(json!(" 1980-01-02T00:00:00Z ")), Ok(Some(day)));
        assert_eq!(ms(json!("1980-01-02 00:00:00")), Ok(Some(day)));
        assert_eq!(ms(json!(format!("/Date({day})/"))), Ok(Some(day)));
        assert_eq!(ms(json!(format!("/Date({day}-0500)/"))), Ok(Some(day)));
        assert_eq!(ms(json!("/Date(-68400000)/")), Ok(Some(-68_400_000)));
        // `YYYYMMDD`, as text or number; 8-digit instants (US midnights of 1970-01-01) stay.
        assert_eq!(ms(json!("19800102")), Ok(Some(day)));
        assert_eq!(ms(json!(19_800_102)), Ok(Some(day)));
        assert_eq!(ms(json!(18_000_000)), Ok(Some(18_000_000)));
        assert_eq!(ms(json!("28800000")), Ok(Some(28_800_000)));
        assert_eq!(ms(json!("")), Ok(None));
        assert_eq!(ms(Value::Null), Ok(None));
        for bad in [
            "01/02/1980",
            "1980-13-02",
            "1980-01-02x",
            "/Date(x)/",
            "/Date()/",
            "Jane",
        ] {
            assert_eq!(
                ms(json!(bad)),
                Err("field `DateOfBirth` has an unexpected format".to_string()),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_field_of_the_wrong_type_names_the_field_and_not_the_value() {
        let err = ClientProfile::parse(&json!({"ClientId": 1, "DateOfBirth": {"when": "Jane"}}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `DateOfBirth` has an unexpected format"
        );
        let err = ClientProfile::parse(&json!({"ClientId": "Jane Doe"})).unwrap_err();
        assert!(!err.to_string().contains("Jane"), "{err}");
        let err = ClientProfile::parse(&json!({"Name": "Jane Doe"})).unwrap_err();
        assert_eq!(err.to_string(), "missing required field `ClientId`");
    }
}
