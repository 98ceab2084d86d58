//! `POST /webhooks/hint`: Hint's envelope `{id, type, practice_id, created_at, object}`
//! (reference B4), where `object` is the full, unexpanded resource, signed with
//! `X-Hint-Signature: sha256=<hex>` over the raw body. The event id (`evt-…`) is the dedupe key,
//! so a redelivery stores nothing new.

use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::{field::Empty, instrument, Span};

use super::wire::{self, short, WireId};
use super::{read_body, respond, save_inbox_item, Ack, ReceiverState, Rejection, VerifiedDelivery};
use crate::model::SourceKind;
use crate::store::{now_ms, NewInboxItem, Origin};

#[instrument(
    name = "webhook",
    skip_all,
    fields(source = "hint", event_type = Empty, resource_id = Empty, event_id = Empty, body_bytes = Empty, inbox_id = Empty, outcome = Empty, status = Empty)
)]
pub(super) async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = accept(&state, &headers, body).await;
    respond(&state, SourceKind::Hint, started, result)
}

async fn accept(
    state: &ReceiverState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Ack, Rejection> {
    let settings = &state.settings.sources.hint;
    if !settings.enabled {
        return Err(Rejection::Disabled);
    }
    let body = read_body(state, body)?;
    let delivery = VerifiedDelivery::hint(&settings.webhook_secret, headers, body)
        .map_err(Rejection::Unauthorized)?;
    if !wire::is_json(headers) {
        return Err(Rejection::UnsupportedMediaType);
    }
    let item = inbox_item(&delivery, now_ms())?;
    save_inbox_item(state, &item).await
}

/// Where an event goes in the inbox.
#[derive(Debug, PartialEq, Eq)]
struct Route {
    resource_type: String,
    resource_id: Option<String>,
    ignore_reason: Option<String>,
}

/// The event's object, required for the events we handle.
fn object(map: &Map<String, Value>) -> Result<&Map<String, Value>, Rejection> {
    match map.get("object") {
        Some(Value::Object(object)) => Ok(object),
        None | Some(Value::Null) => Err(Rejection::bad_request("missing object")),
        Some(_) => Err(Rejection::bad_request("object must be a JSON object")),
    }
}

/// An id read leniently (a string or an integer, anything else is no id).
fn id_of(value: Option<&Value>) -> Option<String> {
    value
        .and_then(|v| WireId::deserialize(v).ok())
        .and_then(WireId::into_id)
}

/// The patients a membership names, owner first, without repeats. Hint's membership shape
/// has `owner` and `membership_patients[].patient`; `patient` and `patients[]` are read too.
fn membership_patient_ids(object: &Map<String, Value>) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut push = |holder: Option<&Value>| {
        if let Some(id) = id_of(holder.and_then(|h| h.get("id"))) {
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

/// Decides what the worker should apply. Hint adds event types without notice, so unknown
/// types are stored as ignored, never refused.
fn route(event_type: &str, map: &Map<String, Value>) -> Result<Route, Rejection> {
    let (kind, _action) = event_type.split_once('.').unwrap_or((event_type, ""));
    match kind {
        "patient" => {
            let object = object(map)?;
            let id = wire::id_at(object, "id", "object.id")?
                .ok_or_else(|| Rejection::bad_request("missing object.id"))?;
            Ok(Route {
                resource_type: "patient".into(),
                resource_id: Some(id),
                ignore_reason: None,
            })
        }
        "membership" => {
            let object = object(map)?;
            let ids = membership_patient_ids(object);
            Ok(match ids.into_iter().next() {
                Some(patient_id) => Route {
                    resource_type: "membership".into(),
                    resource_id: Some(patient_id),
                    ignore_reason: None,
                },
                None => Route {
                    resource_type: "membership".into(),
                    resource_id: id_of(object.get("id")),
                    ignore_reason: Some(format!(
                        "event type {} without patient id not handled",
                        short(event_type)
                    )),
                },
            })
        }
        _ => Ok(Route {
            resource_type: kind.to_string(),
            resource_id: id_of(map.get("object").and_then(|o| o.get("id"))),
            ignore_reason: Some(format!("event type {} not handled", short(event_type))),
        }),
    }
}

/// The inbox item for a verified delivery, deduplicated on the event id.
fn inbox_item(delivery: &VerifiedDelivery, received_at_ms: i64) -> Result<NewInboxItem, Rejection> {
    let (body, map) = wire::parse_object(delivery.body())?;
    let event_id =
        wire::id_field(&map, "id")?.ok_or_else(|| Rejection::bad_request("missing id"))?;
    let event_type = wire::field::<String>(&map, "type", "a string")?
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Rejection::bad_request("missing type"))?;
    let span = Span::current();
    span.record("event_id", short(&event_id));
    span.record("event_type", short(&event_type));
    let route = route(&event_type, &map)?;
    if let Some(id) = &route.resource_id {
        span.record("resource_id", short(id));
    }
    Ok(NewInboxItem {
        source: SourceKind::Hint,
        origin: Origin::Webhook,
        event_type,
        resource_type: Some(route.resource_type),
        resource_id: route.resource_id,
        body,
        dedupe_key: Some(event_id),
        received_at_ms,
        ignore_reason: route.ignore_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(json: &str) -> Result<Route, String> {
        let (_, map) = wire::parse_object(json.as_bytes()).map_err(|e| e.to_string())?;
        let event_type = map["type"].as_str().unwrap().to_string();
        route(&event_type, &map).map_err(|e| e.to_string())
    }

    #[test]
    fn patient_events_route_to_the_object_id() {
        for et in [
            "patient.created",
            "patient.updated",
            "patient.destroyed",
            "patient.inactive",
        ] {
            let r = routed(&format!(
                r#"{{"id":"evt-1","type":"{et}","object":{{"id":"pat-9","first_name":"X"}}}}"#
            ))
            .unwrap();
            assert_eq!(r.resource_type, "patient");
            assert_eq!(r.resource_id.as_deref(), Some("pat-9"));
            assert_eq!(r.ignore_reason, None);
        }
    }

    #[test]
    fn membership_events_route_to_the_first_patient_they_name() {
        let r = routed(
            r#"{"id":"evt-2","type":"membership.updated","object":{"id":"mem-1","owner":{"id":"pat-1"},
                "membership_patients":[{"id":"mp-1","patient":{"id":"pat-1"}},{"id":"mp-2","patient":{"id":"pat-2"}}]}}"#,
        )
        .unwrap();
        assert_eq!(r.resource_type, "membership");
        assert_eq!(r.resource_id.as_deref(), Some("pat-1"));
        let (_, map) = wire::parse_object(
            br#"{"membership_patients":[{"patient":{"id":"pat-2"}}],"patients":[{"id":"pat-3"}]}"#,
        )
        .unwrap();
        assert_eq!(membership_patient_ids(&map), vec!["pat-2", "pat-3"]);
        let r = routed(r#"{"id":"evt-3","type":"membership.created","object":{"id":"mem-1"}}"#)
            .unwrap();
        assert_eq!(r.resource_id.as_deref(), Some("mem-1"));
        assert_eq!(
            r.ignore_reason.as_deref(),
            Some("event type membership.created without patient id not handled")
        );
    }

    #[test]
    fn unknown_event_types_are_ignored_with_a_reason() {
        let r = routed(r#"{"id":"evt-4","type":"invoice.paid","object":{"id":"inv-1"}}"#).unwrap();
        assert_eq!(r.resource_type, "invoice");
        assert_eq!(
            r.ignore_reason.as_deref(),
            Some("event type invoice.paid not handled")
        );
    }

    #[test]
    fn malformed_patient_events_name_the_field_at_fault() {
        assert_eq!(
            routed(r#"{"id":"evt-5","type":"patient.updated"}"#).unwrap_err(),
            "missing object"
        );
        assert_eq!(
            routed(r#"{"id":"evt-5","type":"patient.updated","object":[]}"#).unwrap_err(),
            "object must be a JSON object"
        );
        assert_eq!(
            routed(r#"{"id":"evt-5","type":"patient.updated","object":{"name":"X"}}"#).unwrap_err(),
            "missing object.id"
        );
        assert_eq!(
            routed(r#"{"id":"evt-5","type":"patient.updated","object":{"id":[1]}}"#).unwrap_err(),
            "object.id must be a string or an integer"
        );
    }
}
