//! Healthie: GraphQL client, wire types, conversion into source records, webhook envelope and
//! signature.
//!
//! [`Healthie`] is the [`Source`] the worker uses. Healthie webhooks are thin envelopes, so
//! every webhook (and every poll, resync or manual item) becomes a refetch of the patient;
//! only `import` items carry a full user.

pub mod client;
pub mod convert;
pub mod operations;
pub mod signature;
pub mod sweep;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::config::HealthieSettings;
use crate::metrics::Metrics;
use crate::model::{SourceId, SourceKind, SourceRecord};
use crate::sources::http::{FetchError, Upstream, UpstreamPolicy};
use crate::sources::{ConvertError, Plan, PlanError, PollPage, Source};
use crate::store::InboxItem;

pub use client::{ActiveStatus, HealthieClient, UserOrder, UserPage, UserSummary};

/// The Healthie source.
#[derive(Debug, Clone)]
pub struct Healthie {
    client: HealthieClient,
    batch_window: Duration,
    /// Shared by every worker of the process (see `Source::fetch_turn`).
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Healthie {
    /// A source with its own [`Upstream`] for this API key (see [`upstream_for`]).
    pub fn new(settings: &HealthieSettings, metrics: Arc<Metrics>) -> Self {
        Self::with_upstream(settings, upstream_for(settings, metrics))
    }

    /// A source sending through `upstream`, so one limiter is shared by everything that uses
    /// the key (worker, poller, resync).
    pub fn with_upstream(settings: &HealthieSettings, upstream: Arc<Upstream>) -> Self {
        Self {
            client: HealthieClient::new(upstream, settings),
            batch_window: Duration::from_millis(settings.batch_window_ms),
            turn: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The client, for pollers and resyncs that list users.
    pub fn client(&self) -> &HealthieClient {
        &self.client
    }
}

/// The [`Upstream`] for the configured key: `requests_per_second` with `burst`, `timeout_ms`,
/// `live_reserved_share` kept for live work.
pub fn upstream_for(settings: &HealthieSettings, metrics: Arc<Metrics>) -> Arc<Upstream> {
    let policy = UpstreamPolicy::per_second(
        settings.requests_per_second,
        settings.burst,
        Duration::from_millis(settings.timeout_ms),
    );
    Arc::new(
        Upstream::new(SourceKind::Healthie, policy, metrics)
            .with_live_reserve(settings.live_reserved_share),
    )
}

#[async_trait]
impl Source for Healthie {
    fn kind(&self) -> SourceKind {
        SourceKind::Healthie
    }

    fn plan(&self, item: &InboxItem) -> Result<Plan, PlanError> {
        plan_item(item)
    }

    async fn fetch_records(
        &self,
        ids: &[SourceId],
    ) -> Vec<(SourceId, Result<Option<SourceRecord>, FetchError>)> {
        self.client.fetch_users(ids).await
    }

    fn poll_streams(&self) -> &'static [&'static str] {
        &["active", "archived"]
    }

    async fn poll(&self, stream: &str, cursor: Option<&str>) -> Result<PollPage, FetchError> {
        let status = sweep::stream_status(stream).ok_or(FetchError::Rejected {
            kind: "unknown_stream",
            status: None,
        })?;
        let cursor = sweep::parse_cursor(cursor);
        let page = self
            .client
            .fetch_user_page(
                cursor.after.clone(),
                sweep::SWEEP_PAGE_SIZE,
                Some(status),
                sweep::order(),
            )
            .await?;
        Ok(sweep::next_page(cursor, page))
    }

    fn parse_record(
        &self,
        value: &Value,
        fetched_at: DateTime<Utc>,
    ) -> Result<SourceRecord, ConvertError> {
        convert::parse_user(value, fetched_at)
    }

    fn fetch_batch_size(&self) -> usize {
        self.client.batch_size()
    }

    fn batch_window(&self) -> Duration {
        self.batch_window
    }

    fn fetch_turn(&self) -> Option<Arc<tokio::sync::Mutex<()>>> {
        Some(self.turn.clone())
    }

    fn upstream(&self) -> Option<&crate::sources::http::Upstream> {
        Some(self.client.upstream().as_ref())
    }
}

/// What an inbox item asks for. Pure.
///
/// - webhook `patient.merged`: merge `source_user_id` into `destination_user_id` (from the
///   body; `resource_id` matches neither in Healthie's example);
/// - webhook `patient.*` (created, updated, and any future patient event): refetch
///   `resource_id`;
/// - webhook `location.*`, `applied_tag.*`, `notification_contact.*`: refetch the patient,
///   `user_id` from the body, else the item's `resource_id` (where the receiver puts it);
///   ignored when neither is there (e.g. an organisation's location);
/// - `poll`, `resync`, `manual` items about a `User`: refetch `resource_id`;
/// - `import`: apply the user in the body;
/// - anything else: ignored with a reason. A body that is not JSON cannot be planned.
pub fn plan_item(item: &InboxItem) -> Result<Plan, PlanError> {
    let body = parse_body(&item.body)?;
    match item.origin.as_str() {
        "webhook" => plan_webhook(item, &body),
        "poll" | "resync" | "manual" => {
            let is_user = item
                .resource_type
                .as_deref()
                .is_none_or(|t| t.eq_ignore_ascii_case("user"));
            if !is_user {
                return Ok(Plan::Ignore(
                    "healthie item is about a resource other than a user".into(),
                ));
            }
            let id = resource_id(item, &body).ok_or(PlanError {
                what: "healthie item has no resource_id",
            })?;
            Ok(Plan::Fetch(vec![id]))
        }
        "import" => {
            let fetched_at =
                DateTime::from_timestamp_millis(item.received_at_ms).unwrap_or_else(Utc::now);
            let record = convert::parse_user(&body, fetched_at).map_err(import_error)?;
            Ok(Plan::Apply(Box::new(record)))
        }
        _ => Ok(Plan::Ignore("unknown origin for a healthie item".into())),
    }
}

fn plan_webhook(item: &InboxItem, body: &Value) -> Result<Plan, PlanError> {
    let event = match item.event_type.trim() {
        "" => body.get("event_type").and_then(Value::as_str).unwrap_or(""),
        e => e,
    };
    if event == "patient.merged" {
        let from = id_at(body, "source_user_id").ok_or(PlanError {
            what: "patient.merged without source_user_id",
        })?;
        let into = id_at(body, "destination_user_id").ok_or(PlanError {
            what: "patient.merged without destination_user_id",
        })?;
        if from == into {
            return Ok(Plan::Fetch(vec![into]));
        }
        return Ok(Plan::Merge { from, into });
    }
    if event.starts_with("patient.") {
        let id = resource_id(item, body).ok_or(PlanError {
            what: "patient webhook without resource_id",
        })?;
        return Ok(Plan::Fetch(vec![id]));
    }
    let about_a_patient = ["location.", "applied_tag.", "notification_contact."]
        .iter()
        .any(|prefix| event.starts_with(prefix));
    if about_a_patient {
        let id = id_at(body, "user_id").or_else(|| item_resource_id(item));
        return Ok(match id {
            Some(id) => Plan::Fetch(vec![id]),
            None => Plan::Ignore(format!("{} without user_id", event_label(event))),
        });
    }
    Ok(Plan::Ignore(format!(
        "healthie event {} is not synced",
        event_label(event)
    )))
}

/// An empty body is `null` (poll items may carry none); anything else must be JSON.
fn parse_body(body: &str) -> Result<Value, PlanError> {
    if body.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(body).map_err(|_| PlanError {
        what: "healthie item body is not JSON",
    })
}

/// The item's `resource_id`, else the body's.
fn resource_id(item: &InboxItem, body: &Value) -> Option<SourceId> {
    item_resource_id(item).or_else(|| id_at(body, "resource_id"))
}

fn item_resource_id(item: &InboxItem) -> Option<SourceId> {
    let id = item.resource_id.as_deref()?.trim();
    (!id.is_empty()).then(|| SourceId(id.to_string()))
}

/// An id in the body that may be a string or a number.
fn id_at(body: &Value, key: &str) -> Option<SourceId> {
    match body.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(SourceId(s.trim().to_string())),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(SourceId(n.to_string())),
        _ => None,
    }
}

/// The event type for a reason string, if it looks like one (`word.word`), so nothing else
/// from the payload can reach the inbox's reason column.
fn event_label(event: &str) -> &str {
    let looks_like_event = !event.is_empty()
        && event.len() <= 64
        && event
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.');
    if looks_like_event {
        event
    } else {
        "(unrecognised)"
    }
}

fn import_error(e: ConvertError) -> PlanError {
    let what = match e {
        ConvertError::Shape(_) => "import body is not a healthie user object",
        ConvertError::Missing(_) => "import record has no id",
        ConvertError::Format("dob") => "import record has a malformed dob",
        ConvertError::Format("updated_at") => "import record has a malformed updated_at",
        ConvertError::Format("location" | "locations") => "import record has a malformed location",
        ConvertError::Format(_) => "import record has a field of the wrong type",
    };
    PlanError { what }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::InboxId;
    use crate::store::InboxState;

    fn item(
        origin: &str,
        event_type: &str,
        resource_type: Option<&str>,
        resource_id: Option<&str>,
        body: &str,
    ) -> InboxItem {
        InboxItem {
            id: InboxId(1),
            source: SourceKind::Healthie,
            origin: origin.into(),
            event_type: event_type.into(),
            resource_type: resource_type.map(Into::into),
            resource_id: resource_id.map(Into::into),
            body: body.into(),
            state: InboxState::Leased,
            reason: None,
            attempts: 1,
            received_at_ms: 1_760_000_000_000,
            available_at_ms: 1_760_000_000_000,
            last_error_kind: None,
            last_http_status: None,
            finished_at_ms: None,
        }
    }

    fn webhook(event_type: &str, resource_id: Option<&str>, body: Value) -> InboxItem {
        item(
            "webhook",
            event_type,
            Some("User"),
            resource_id,
            &body.to_string(),
        )
    }

    fn fetch(id: &str) -> Plan {
        Plan::Fetch(vec![SourceId::from(id)])
    }

    #[test]
    fn patient_events_refetch_the_patient() {
        for event in ["patient.created", "patient.updated"] {
            let body = json!({ "resource_id": "45678", "resource_id_type": "User",
                               "event_type": event, "changed_fields": ["first_name"] });
            assert_eq!(
                plan_item(&webhook(event, Some("45678"), body)).unwrap(),
                fetch("45678")
            );
        }
        // A numeric resource_id in the body, and none on the item.
        let body = json!({ "resource_id": 45678, "resource_id_type": "User",
                           "event_type": "patient.updated", "changed_fields": "active" });
        assert_eq!(
            plan_item(&webhook("patient.updated", None, body)).unwrap(),
            fetch("45678")
        );
    }

    #[test]
    fn patient_merged_merges_source_into_destination() {
        let body = json!({ "resource_id": "45678", "resource_id_type": "User",
                           "event_type": "patient.merged", "changed_fields": [],
                           "destination_user_id": "1234", "source_user_id": 5678 });
        assert_eq!(
            plan_item(&webhook("patient.merged", Some("45678"), body)).unwrap(),
            Plan::Merge {
                from: "5678".into(),
                into: "1234".into()
            }
        );
        let body = json!({ "event_type": "patient.merged", "destination_user_id": "1234" });
        assert!(plan_item(&webhook("patient.merged", Some("45678"), body)).is_err());
    }

    #[test]
    fn address_tag_and_contact_events_refetch_the_patient() {
        let cases = [
            (
                "location.updated",
                json!({ "resource_id": "900", "resource_id_type": "Location",
                                         "user_id": "321" }),
                Some("321"),
            ),
            (
                "location.created",
                json!({ "resource_id": "900", "user_id": 321 }),
                Some("900"),
            ),
            (
                "applied_tag.created",
                json!({ "resource_id": "5", "tag_id": "8", "user_id": "321" }),
                Some("321"),
            ),
            (
                "notification_contact.deleted",
                json!({ "resource_id": "6", "linked_client_id": "77",
                                                     "user_id": "321" }),
                Some("321"),
            ),
        ];
        for (event, body, item_id) in cases {
            let plan = plan_item(&item(
                "webhook",
                event,
                Some("User"),
                item_id,
                &body.to_string(),
            ));
            assert_eq!(plan.unwrap(), fetch("321"), "{event}");
        }
        let orphan = item(
            "webhook",
            "location.deleted",
            Some("Location"),
            None,
            r#"{"resource_id":"900"}"#,
        );
        assert!(matches!(plan_item(&orphan).unwrap(), Plan::Ignore(_)));
    }

    #[test]
    fn other_events_are_ignored_with_a_reason() {
        let plan = plan_item(&webhook(
            "appointment.created",
            Some("1"),
            json!({ "resource_id": "1" }),
        ));
        assert_eq!(
            plan.unwrap(),
            Plan::Ignore("healthie event appointment.created is not synced".into())
        );
        let plan = plan_item(&webhook("Ada Lovelace", Some("1"), json!({})));
        let Plan::Ignore(reason) = plan.unwrap() else {
            panic!("ignored")
        };
        assert!(!reason.contains("Lovelace"), "{reason}");
    }

    #[test]
    fn poll_resync_and_manual_items_refetch_users() {
        for origin in ["poll", "resync", "manual"] {
            let plan = plan_item(&item(origin, "sweep", Some("User"), Some("42"), "")).unwrap();
            assert_eq!(plan, fetch("42"), "{origin}");
            let plan = plan_item(&item(origin, "sweep", None, Some("42"), "{}")).unwrap();
            assert_eq!(plan, fetch("42"), "{origin}");
            let plan =
                plan_item(&item(origin, "sweep", Some("Appointment"), Some("42"), "")).unwrap();
            assert!(matches!(plan, Plan::Ignore(_)), "{origin}");
            assert!(plan_item(&item(origin, "sweep", Some("User"), None, "")).is_err());
        }
    }

    #[test]
    fn import_items_apply_the_user_they_carry() {
        let user = json!({ "id": 99, "active": true, "first_name": "Grace", "last_name": "Hopper",
                           "dob": "1906-12-09", "updated_at": "2025-01-01 10:00:00 -0500" });
        let plan = plan_item(&item(
            "import",
            "import",
            Some("User"),
            None,
            &user.to_string(),
        ))
        .unwrap();
        let Plan::Apply(record) = plan else {
            panic!("applied")
        };
        assert_eq!(record.key.id.as_str(), "99");
        assert_eq!(record.raw, user);
        assert_eq!(record.fetched_at.timestamp_millis(), 1_760_000_000_000);
        let bad = json!({ "id": 99, "dob": "ninth of December Hopper" });
        let e = plan_item(&item("import", "import", None, None, &bad.to_string())).unwrap_err();
        assert!(
            e.to_string().contains("dob") && !e.to_string().contains("Hopper"),
            "{e}"
        );
    }

    #[test]
    fn a_body_that_is_not_json_cannot_be_planned() {
        for origin in ["webhook", "poll", "import"] {
            let e = plan_item(&item(
                origin,
                "patient.updated",
                Some("User"),
                Some("1"),
                "Ada Lovelace",
            ))
            .unwrap_err();
            assert!(!e.to_string().contains("Lovelace"));
        }
    }

    #[test]
    fn unknown_origins_are_ignored() {
        let plan = plan_item(&item(
            "carrier-pigeon",
            "patient.updated",
            Some("User"),
            Some("1"),
            "{}",
        ));
        assert!(matches!(plan.unwrap(), Plan::Ignore(_)));
    }

    #[test]
    fn source_reports_its_kind_and_parses_records() {
        let source = Healthie::new(
            &crate::config::Settings::load_from(None, &[])
                .unwrap()
                .sources
                .healthie,
            Arc::new(Metrics::new()),
        );
        assert_eq!(source.kind(), SourceKind::Healthie);
        let record = source
            .parse_record(&json!({ "id": "3", "active": false }), Utc::now())
            .unwrap();
        assert_eq!(record.status, crate::model::RecordStatus::Archived);
    }
}
