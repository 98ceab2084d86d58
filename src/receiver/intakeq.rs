//! `POST /webhooks/intakeq/{token}`: IntakeQ signs nothing and has no client webhook
//! (reference A4), so the secret `{token}` in the URL is the proof of origin and the body is
//! only a hint: "client `ClientId` probably changed". Intake, note and invoice payloads carry
//! `ClientId` at the top level, appointment payloads inside `Appointment`. The worker refetches
//! that client.

use std::time::Instant;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Map, Value};
use tracing::{field::Empty, instrument, Span};

use super::wire::{self, short};
use super::{
    read_body, respond, save_inbox_item, Ack, ReceiverState, Rejection, VerifiedDelivery,
    VerifyError,
};
use crate::model::SourceKind;
use crate::store::{now_ms, NewInboxItem, Origin};

#[instrument(
    name = "webhook",
    skip_all,
    fields(source = "intakeq", event_type = Empty, resource_id = Empty, body_bytes = Empty, inbox_id = Empty, outcome = Empty, status = Empty)
)]
pub(super) async fn receive(
    State(state): State<ReceiverState>,
    token: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = accept(&state, token, &headers, body).await;
    respond(&state, SourceKind::Intakeq, started, result)
}

async fn accept(
    state: &ReceiverState,
    token: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Ack, Rejection> {
    let settings = &state.settings.sources.intakeq;
    if !settings.enabled {
        return Err(Rejection::Disabled);
    }
    let Ok(Path(token)) = token else {
        return Err(Rejection::UnknownToken(VerifyError::WrongToken));
    };
    let body = read_body(state, body)?;
    let delivery = VerifiedDelivery::intakeq(&settings.webhook_token, &token, body)
        .map_err(Rejection::UnknownToken)?;
    if !wire::is_json(headers) {
        return Err(Rejection::UnsupportedMediaType);
    }
    let item = inbox_item(&delivery, now_ms())?;
    save_inbox_item(state, &item).await
}

/// Nested objects that carry the client of appointment and invoice webhooks.
const NESTED: &[&str] = &["Appointment", "Invoice"];

/// The event name: `Type` (intakes, notes) or `EventType` (appointments, invoices).
fn event_type(map: &Map<String, Value>) -> String {
    ["Type", "EventType"]
        .iter()
        .find_map(|key| map.get(*key).and_then(Value::as_str))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

/// The `ClientId` the payload names, at the top level or inside a nested object.
fn client_id(map: &Map<String, Value>) -> Result<Option<String>, Rejection> {
    if let Some(id) = wire::id_field(map, "ClientId")? {
        return Ok(Some(id));
    }
    for key in NESTED {
        if let Some(Value::Object(nested)) = map.get(*key) {
            if let Some(id) = wire::id_at(nested, "ClientId", &format!("{key}.ClientId"))? {
                return Ok(Some(id));
            }
        }
    }
    Ok(None)
}

/// The inbox item for a verified delivery: a hint to refetch the client, or ignored without one.
fn inbox_item(delivery: &VerifiedDelivery, received_at_ms: i64) -> Result<NewInboxItem, Rejection> {
    let (body, map) = wire::parse_object(delivery.body())?;
    let event_type = event_type(&map);
    let span = Span::current();
    span.record("event_type", short(&event_type));
    let client_id = client_id(&map)?;
    if let Some(id) = &client_id {
        span.record("resource_id", short(id));
    }
    let ignore_reason = client_id
        .is_none()
        .then(|| "no ClientId in payload".to_string());
    Ok(NewInboxItem {
        source: SourceKind::Intakeq,
        origin: Origin::Webhook,
        event_type,
        resource_type: Some("Client".into()),
        resource_id: client_id,
        body,
        dedupe_key: None,
        received_at_ms,
        ignore_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> (String, Result<Option<String>, String>) {
        let (_, map) = wire::parse_object(json.as_bytes()).unwrap();
        (event_type(&map), client_id(&map).map_err(|e| e.to_string()))
    }

    #[test]
    fn intake_payloads_name_the_client_at_the_top_level() {
        let (et, id) = read(
            r#"{"IntakeId":"abc","Type":"Intake Submitted","ClientId":42,"PracticeId":"p1","ExternalClientId":"x"}"#,
        );
        assert_eq!(et, "Intake Submitted");
        assert_eq!(id.unwrap().as_deref(), Some("42"));
    }

    #[test]
    fn appointment_payloads_name_the_client_inside_the_appointment() {
        let (et, id) = read(
            r#"{"EventType":"AppointmentCreated","ActionPerformedByClient":false,"Appointment":{"Id":"a1","ClientId":"77","ClientEmail":"a@b.c"}}"#,
        );
        assert_eq!(et, "AppointmentCreated");
        assert_eq!(id.unwrap().as_deref(), Some("77"));
    }

    #[test]
    fn a_payload_without_a_client_has_no_id_and_a_bad_one_names_its_field() {
        let (et, id) = read(r#"{"Something":"else"}"#);
        assert_eq!(et, "unknown");
        assert_eq!(id.unwrap(), None);
        let (_, id) = read(r#"{"EventType":"AppointmentCreated","Appointment":{"ClientId":[1]}}"#);
        assert_eq!(
            id.unwrap_err(),
            "Appointment.ClientId must be a string or an integer"
        );
    }
}
