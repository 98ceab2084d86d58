//! Reading webhook bodies: content type, UTF-8, a JSON object, and typed fields read with serde
//! one at a time so that an error names the field and what it should be, never its value
//! (serde's own messages quote the offending value, which could be PHI).

use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::Rejection;

/// True when `Content-Type` is `application/json`, parameters such as `; charset=utf-8` allowed.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The body as UTF-8 text and as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<(String, Map<String, Value>), Rejection> {
    let text =
        std::str::from_utf8(body).map_err(|_| Rejection::bad_request("body is not UTF-8"))?;
    let value: Value =
        serde_json::from_str(text).map_err(|_| Rejection::bad_request("body is not JSON"))?;
    match value {
        Value::Object(map) => Ok((text.to_string(), map)),
        _ => Err(Rejection::bad_request("body must be a JSON object")),
    }
}

/// Reads `key` as a `T`; absent or `null` is `None`, any other mismatch is a 400 saying
/// "`key` must be `expected`".
pub fn field<T: DeserializeOwned>(
    map: &Map<String, Value>,
    key: &str,
    expected: &str,
) -> Result<Option<T>, Rejection> {
    field_at(map, key, key, expected)
}

/// [`field`] for a nested object: `label` is the field's path in the message (`object.id`).
pub fn field_at<T: DeserializeOwned>(
    map: &Map<String, Value>,
    key: &str,
    label: &str,
    expected: &str,
) -> Result<Option<T>, Rejection> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => T::deserialize(value)
            .map(Some)
            .map_err(|_| Rejection::bad_request(format!("{label} must be {expected}"))),
    }
}

/// Reads `key` as an id sent as a JSON string or an integer; blank strings count as absent.
pub fn id_field(map: &Map<String, Value>, key: &str) -> Result<Option<String>, Rejection> {
    id_at(map, key, key)
}

/// [`id_field`] for a nested object, `label` naming the field's path in the message.
pub fn id_at(
    map: &Map<String, Value>,
    key: &str,
    label: &str,
) -> Result<Option<String>, Rejection> {
    Ok(field_at::<WireId>(map, key, label, "a string or an integer")?.and_then(WireId::into_id))
}

/// An id that one sender writes as a string and another as a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum WireId {
    Text(String),
    Signed(i64),
    Unsigned(u64),
}

impl WireId {
    /// The id as text, or `None` when blank.
    pub fn into_id(self) -> Option<String> {
        let text = match self {
            WireId::Text(s) => s.trim().to_string(),
            WireId::Signed(n) => n.to_string(),
            WireId::Unsigned(n) => n.to_string(),
        };
        (!text.is_empty()).then_some(text)
    }
}

/// Truncates text taken from a payload (event types) before it goes into a log field or an
/// ignore reason, so a strange sender cannot flood either.
pub fn short(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_content_type_allows_parameters_and_case() {
        for (value, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON;charset=UTF-8", true),
            ("text/plain", false),
            ("application/jsonp", false),
            ("application/x-www-form-urlencoded", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_json(&h), ok, "{value}");
        }
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn ids_are_read_from_strings_and_integers_only() {
        let map: Map<String, Value> = serde_json::from_str(
            r#"{"a":"45678","b":45678,"c":" ","d":1.5,"e":{"x":1},"f":null,"g":-3}"#,
        )
        .unwrap();
        assert_eq!(id_field(&map, "a").unwrap().as_deref(), Some("45678"));
        assert_eq!(id_field(&map, "b").unwrap().as_deref(), Some("45678"));
        assert_eq!(id_field(&map, "c").unwrap(), None);
        assert_eq!(id_field(&map, "f").unwrap(), None);
        assert_eq!(id_field(&map, "missing").unwrap(), None);
        assert_eq!(id_field(&map, "g").unwrap().as_deref(), Some("-3"));
        for bad in ["d", "e"] {
            let err = id_field(&map, bad).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{bad} must be a string or an integer")
            );
        }
    }

    #[test]
    fn short_cuts_long_text_on_a_character_boundary() {
        assert_eq!(short("patient.updated"), "patient.updated");
        let long = "é".repeat(100);
        assert_eq!(short(&long).chars().count(), 64);
    }
}
