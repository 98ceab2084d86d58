//! `POST /webhooks/healthie`: Healthie's thin envelope (reference §4.1), signed per §4.3.
//! The envelope only says "resource X may have changed"; the worker refetches the patient it
//! names. Envelopes carry no event id, so nothing is deduplicated here (the worker coalesces
//! items for the same resource instead).

use std::collections::BTreeMap;
use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::{field::Empty, instrument, Span};

use super::wire::{self, short};
use super::{read_body, respond, save_inbox_item, Ack, ReceiverState, Rejection, VerifiedDelivery};
use crate::model::SourceKind;
use crate::store::{now_ms, NewInboxItem, Origin};

#[instrument(
    name = "webhook",
    skip_all,
    fields(source = "healthie", event_type = Empty, resource_id = Empty, changed_fields = Empty, body_bytes = Empty, inbox_id = Empty, outcome = Empty, status = Empty)
)]
pub(super) async fn receive(
    State(state): State<ReceiverState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = accept(&state, query.as_deref().unwrap_or(""), &headers, body).await;
    respond(&state, SourceKind::Healthie, started, result)
}

async fn accept(
    state: &ReceiverState,
    raw_query: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Ack, Rejection> {
    let settings = &state.settings.sources.healthie;
    if !settings.enabled {
        return Err(Rejection::Disabled);
    }
    let body = read_body(state, body)?;
    let delivery = VerifiedDelivery::healthie(settings, raw_query, headers, body)
        .map_err(Rejection::Unauthorized)?;
    if !wire::is_json(headers) {
        return Err(Rejection::UnsupportedMediaType);
    }
    let item = inbox_item(&delivery, now_ms())?;
    save_inbox_item(state, &item).await
}

/// Extra keys some events carry (reference §4.1), kept as text whether sent as strings or
/// numbers.
const EXTRA_ID_KEYS: &[&str] = &[
    "user_id",
    "tag_id",
    "destination_user_id",
    "source_user_id",
    "linked_client_id",
    "resource_organization_id",
];

/// A Healthie webhook envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Envelope {
    event_type: String,
    /// Sent as a string or a number; absent or blank is `None`.
    resource_id: Option<String>,
    resource_id_type: Option<String>,
    /// Sent as an array, a string, or not at all.
    changed_fields: Vec<String>,
    /// The [`EXTRA_ID_KEYS`] present, as text.
    extra_ids: BTreeMap<&'static str, String>,
}

/// `changed_fields` as Healthie sends it: usually an array, sometimes a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum WireChangedFields {
    List(Vec<String>),
    One(String),
}

impl WireChangedFields {
    fn into_list(self) -> Vec<String> {
        match self {
            WireChangedFields::List(list) => list,
            WireChangedFields::One(text) => {
                // A JSON array inside a string, or a comma-separated list.
                serde_json::from_str::<Vec<String>>(&text).unwrap_or_else(|_| {
                    text.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
            }
        }
    }
}

impl Envelope {
    fn parse(map: &Map<String, Value>) -> Result<Self, Rejection> {
        let event_type = wire::field::<String>(map, "event_type", "a string")?
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Rejection::bad_request("missing event_type"))?;
        let resource_id = wire::id_field(map, "resource_id")?;
        let resource_id_type = wire::field::<String>(map, "resource_id_type", "a string")?
            .filter(|s| !s.trim().is_empty());
        let changed_fields = wire::field::<WireChangedFields>(
            map,
            "changed_fields",
            "an array of strings or a string",
        )?
        .map(WireChangedFields::into_list)
        .unwrap_or_default();
        let mut extra_ids = BTreeMap::new();
        for key in EXTRA_ID_KEYS {
            if let Some(id) = wire::id_field(map, key)? {
                extra_ids.insert(*key, id);
            }
        }
        Ok(Self {
            event_type,
            resource_id,
            resource_id_type,
            changed_fields,
            extra_ids,
        })
    }

    fn extra(&self, key: &str) -> Option<&str> {
        self.extra_ids.get(key).map(String::as_str)
    }
}

/// Where an envelope goes in the inbox.
#[derive(Debug, PartialEq, Eq)]
struct Route {
    resource_type: Option<String>,
    resource_id: Option<String>,
    ignore_reason: Option<String>,
}

impl Route {
    fn pending(resource_type: impl Into<String>, resource_id: impl Into<String>) -> Self {
        Self {
            resource_type: Some(resource_type.into()),
            resource_id: Some(resource_id.into()),
            ignore_reason: None,
        }
    }

    fn ignored(envelope: &Envelope, reason: String) -> Self {
        Self {
            resource_type: envelope.resource_id_type.clone(),
            resource_id: envelope.resource_id.clone(),
            ignore_reason: Some(reason),
        }
    }
}

/// Events about a patient's related records that name the patient in `user_id`.
const USER_SCOPED_PREFIXES: &[&str] = &["location", "applied_tag", "notification_contact"];

/// Decides what the worker should refetch. Unknown events are stored as ignored, not refused:
/// Healthie would retry a refusal for days and then disable the webhook.
fn route(envelope: &Envelope) -> Result<Route, Rejection> {
    let event_type = envelope.event_type.as_str();
    match event_type {
        "patient.created" | "patient.updated" => {
            let id = envelope
                .resource_id
                .as_deref()
                .ok_or_else(|| Rejection::bad_request("missing resource_id"))?;
            Ok(Route::pending("User", id))
        }
        "patient.merged" => {
            // The docs' example has a resource_id matching neither user; the survivor is
            // destination_user_id. The worker reads source_user_id from the stored body.
            let id = envelope
                .extra("destination_user_id")
                .or(envelope.resource_id.as_deref())
                .ok_or_else(|| Rejection::bad_request("missing destination_user_id"))?;
            Ok(Route::pending("User", id))
        }
        "test.created" => Ok(Route::ignored(envelope, "test event".into())),
        _ => {
            let prefix = event_type.split_once('.').map_or(event_type, |(p, _)| p);
            if !USER_SCOPED_PREFIXES.contains(&prefix) {
                return Ok(Route::ignored(
                    envelope,
                    format!("event type {} not handled", short(event_type)),
                ));
            }
            match envelope.extra("user_id") {
                Some(user_id) => {
                    let resource_type = envelope.resource_id_type.as_deref().unwrap_or(prefix);
                    Ok(Route::pending(resource_type, user_id))
                }
                None => Ok(Route::ignored(
                    envelope,
                    format!(
                        "event type {} without user_id not handled",
                        short(event_type)
                    ),
                )),
            }
        }
    }
}

/// The inbox item for a verified delivery: the raw body as text, no dedupe key.
fn inbox_item(delivery: &VerifiedDelivery, received_at_ms: i64) -> Result<NewInboxItem, Rejection> {
    let (body, map) = wire::parse_object(delivery.body())?;
    let envelope = Envelope::parse(&map)?;
    let span = Span::current();
    span.record("event_type", short(&envelope.event_type));
    span.record("changed_fields", envelope.changed_fields.len());
    let route = route(&envelope)?;
    if let Some(id) = &route.resource_id {
        span.record("resource_id", short(id));
    }
    Ok(NewInboxItem {
        source: SourceKind::Healthie,
        origin: Origin::Webhook,
        event_type: envelope.event_type,
        resource_type: route.resource_type,
        resource_id: route.resource_id,
        body,
        dedupe_key: None,
        received_at_ms,
        ignore_reason: route.ignore_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(json: &str) -> Result<Envelope, Rejection> {
        let (_, map) = wire::parse_object(json.as_bytes())?;
        Envelope::parse(&map)
    }

    fn routed(json: &str) -> Route {
        route(&envelope(json).unwrap()).unwrap()
    }

    fn message(json: &str) -> String {
        match envelope(json).and_then(|e| route(&e)) {
            Err(e) => e.to_string(),
            Ok(r) => panic!("expected a rejection, got {r:?}"),
        }
    }

    #[test]
    fn resource_id_is_read_from_a_string_or_a_number() {
        let a = envelope(r#"{"resource_id":"45678","event_type":"patient.updated"}"#).unwrap();
        let b = envelope(r#"{"resource_id":45678,"event_type":"patient.updated"}"#).unwrap();
        assert_eq!(a.resource_id.as_deref(), Some("45678"));
        assert_eq!(a, b);
    }

    #[test]
    fn changed_fields_may_be_an_array_a_string_or_missing() {
        for (json, want) in [
            (
                r#""changed_fields":["first_name","email"]"#,
                vec!["first_name", "email"],
            ),
            (
                r#""changed_fields":"first_name, email""#,
                vec!["first_name", "email"],
            ),
            (r#""changed_fields":"[\"first_name\"]""#, vec!["first_name"]),
            (r#""changed_fields":null"#, vec![]),
            (r#""x":1"#, vec![]),
        ] {
            let e = envelope(&format!(
                r#"{{"resource_id":"1","event_type":"patient.updated",{json}}}"#
            ))
            .unwrap();
            assert_eq!(e.changed_fields, want, "{json}");
        }
    }

    #[test]
    fn extra_ids_are_kept_as_text() {
        let e = envelope(
            r#"{"resource_id":"1","event_type":"patient.merged","destination_user_id":1234,"source_user_id":"5678","tag_id":9}"#,
        )
        .unwrap();
        assert_eq!(e.extra("destination_user_id"), Some("1234"));
        assert_eq!(e.extra("source_user_id"), Some("5678"));
        assert_eq!(e.extra("tag_id"), Some("9"));
    }

    #[test]
    fn patient_events_route_to_the_user() {
        assert_eq!(
            routed(
                r#"{"resource_id":"45678","resource_id_type":"User","event_type":"patient.created","changed_fields":[]}"#
            ),
            Route::pending("User", "45678")
        );
    }

    #[test]
    fn a_merge_routes_to_the_destination_user() {
        assert_eq!(
            routed(
                r#"{"resource_id":"45678","resource_id_type":"User","event_type":"patient.merged","changed_fields":[],"destination_user_id":"1234","source_user_id":"5678"}"#
            ),
            Route::pending("User", "1234")
        );
        assert_eq!(
            routed(r#"{"resource_id":"45678","event_type":"patient.merged"}"#),
            Route::pending("User", "45678")
        );
    }

    #[test]
    fn related_record_events_route_to_their_user_id() {
        for et in [
            "location.updated",
            "applied_tag.created",
            "notification_contact.deleted",
        ] {
            let r = routed(&format!(
                r#"{{"resource_id":"77","resource_id_type":"Thing","event_type":"{et}","user_id":4321}}"#
            ));
            assert_eq!(r, Route::pending("Thing", "4321"), "{et}");
        }
        let r = routed(r#"{"resource_id":"77","event_type":"location.created"}"#);
        assert_eq!(
            r.ignore_reason.as_deref(),
            Some("event type location.created without user_id not handled")
        );
    }

    #[test]
    fn test_and_unknown_events_are_ignored_with_a_reason() {
        let r = routed(r#"{"resource_id":"1","event_type":"test.created"}"#);
        assert_eq!(r.ignore_reason.as_deref(), Some("test event"));
        let r = routed(r#"{"resource_id":"1","event_type":"appointment.created"}"#);
        assert_eq!(
            r.ignore_reason.as_deref(),
            Some("event type appointment.created not handled")
        );
        assert_eq!(r.resource_id.as_deref(), Some("1"));
    }

    #[test]
    fn malformed_envelopes_name_the_field_at_fault() {
        for (json, want) in [
            (r#"{"resource_id":"1"}"#, "missing event_type"),
            (
                r#"{"resource_id":"1","event_type":7}"#,
                "event_type must be a string",
            ),
            (r#"{"event_type":"patient.updated"}"#, "missing resource_id"),
            (
                r#"{"resource_id":{"a":1},"event_type":"patient.updated"}"#,
                "resource_id must be a string or an integer",
            ),
            (
                r#"{"resource_id":"1","event_type":"patient.updated","changed_fields":5}"#,
                "changed_fields must be an array of strings or a string",
            ),
            (
                r#"{"resource_id":"1","event_type":"location.created","user_id":true}"#,
                "user_id must be a string or an integer",
            ),
            (
                r#"{"event_type":"patient.merged"}"#,
                "missing destination_user_id",
            ),
            (r#"["patient.updated"]"#, "body must be a JSON object"),
            (r#"{"resource_id":"1","#, "body is not JSON"),
        ] {
            assert_eq!(message(json), want, "{json}");
        }
    }
}
