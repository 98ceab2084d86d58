//! IntakeQ source tests against the fake IntakeQ on a local port.

use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, NaiveTime, TimeZone, Utc};
use serde_json::{json, Value};

use super::*;
use crate::config::Secret;
use crate::model::RecordStatus;
use crate::sandbox::intakeq::{IntakeqSandbox, ProfileParam};
use crate::sources::http::ManualClock;
use crate::store::{InboxItem, InboxState};

const FULL: &str = include_str!("../../../tests/fixtures/intakeq/client_full.json");
const INTAKE: &str = include_str!("../../../tests/fixtures/intakeq/intake_submitted.json");
const APPOINTMENT: &str = include_str!("../../../tests/fixtures/intakeq/appointment_created.json");

fn settings(base_url: &str, per_day: u32) -> IntakeqSettings {
    IntakeqSettings {
        enabled: true,
        base_url: base_url.into(),
        requests_per_minute: 10,
        requests_per_day: per_day,
        timeout_ms: 5_000,
        live_reserved_share: 0.0,
        api_key: Secret::new("iq-key"),
        webhook_token: Secret::default(),
    }
}

/// No client-side spacing and millisecond pauses, so tests never wait for real.
fn fast_policy() -> UpstreamPolicy {
    let mut p = UpstreamPolicy::per_second(100_000, 100_000, Duration::from_secs(5));
    p.rate_limit_pause = Duration::from_millis(2);
    p.retry_initial = Duration::from_millis(1);
    p.retry_max = Duration::from_millis(5);
    p.max_retry_elapsed = Duration::from_millis(100);
    p
}

fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

struct Fixture {
    sandbox: IntakeqSandbox,
    source: Intakeq,
    clock: Arc<ManualClock>,
    metrics: Arc<Metrics>,
}

async fn fixture_with(sandbox: IntakeqSandbox, per_day: u32, reset: NaiveTime) -> Fixture {
    let base = sandbox.serve_for_test().await;
    let clock = Arc::new(ManualClock::new(at(2026, 3, 2, 10)));
    let metrics = Arc::new(Metrics::new());
    let source = Intakeq::with_options(
        &settings(&base, per_day),
        metrics.clone(),
        IntakeqOptions {
            clock: clock.clone(),
            daily_reset_utc: reset,
            convert: ConvertOptions::default(),
            policy: Some(fast_policy()),
        },
    );
    Fixture {
        sandbox,
        source,
        clock,
        metrics,
    }
}

async fn fixture(clients: Vec<Value>) -> Fixture {
    let sandbox = IntakeqSandbox::new("iq-key", clients).with_limits(100_000, 100_000);
    fixture_with(sandbox, 500, NaiveTime::MIN).await
}

/// `n` clients shaped like the seed fixture, ids 1..=n, updated on 2026-03-01.
fn clients(n: u64) -> Vec<Value> {
    let template: Value = serde_json::from_str(FULL).unwrap();
    (1..=n)
        .map(|i| {
            let mut c = template.clone();
            c["ClientId"] = json!(i);
            c["Name"] = json!(format!("Client Number{i}"));
            c["Email"] = json!(format!("client{i}@example.com"));
            c["LastUpdateDate"] = json!(at(2026, 3, 1, 12).timestamp_millis() + i as i64);
            c
        })
        .collect()
}

fn item(origin: &str, event_type: &str, resource_id: Option<&str>, body: &str) -> InboxItem {
    InboxItem {
        id: crate::model::InboxId(1),
        source: SourceKind::Intakeq,
        origin: origin.into(),
        event_type: event_type.into(),
        resource_type: Some("Client".into()),
        resource_id: resource_id.map(String::from),
        body: body.into(),
        state: InboxState::Leased,
        reason: None,
        attempts: 1,
        received_at_ms: at(2026, 3, 2, 9).timestamp_millis(),
        available_at_ms: 0,
        last_error_kind: None,
        last_http_status: None,
        finished_at_ms: None,
    }
}

fn ids(page: &PollPage) -> Vec<String> {
    page.items
        .iter()
        .map(|i| match i {
            PollItem::Record { id, .. } | PollItem::Changed(id) | PollItem::Deleted(id) => {
                id.to_string()
            }
        })
        .collect()
}

#[tokio::test]
async fn listing_stops_on_a_short_page() {
    let f = fixture(clients(250)).await;
    let mut cursor: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let page = f
            .source
            .poll(STREAM_UPDATED, cursor.as_deref())
            .await
            .unwrap();
        pages.push(page.items.len());
        cursor = page.next_cursor.clone();
        if page.complete {
            break;
        }
    }
    assert_eq!(pages, vec![100, 100, 50]);
    assert_eq!(f.sandbox.counters().requests, 3);
    let next: Value = serde_json::from_str(cursor.as_deref().unwrap()).unwrap();
    assert_eq!(
        next,
        json!({"from": "2026-03-01", "page": 1, "started": null}),
        "the next pass re-polls from the day before this pass started"
    );
}

#[tokio::test]
async fn an_exactly_full_last_page_is_followed_by_an_empty_one() {
    let f = fixture(clients(100)).await;
    let first = f.source.poll(STREAM_UPDATED, None).await.unwrap();
    assert!(!first.complete);
    let second = f
        .source
        .poll(STREAM_UPDATED, first.next_cursor.as_deref())
        .await
        .unwrap();
    assert!(second.complete && second.items.is_empty());
}

#[tokio::test]
async fn polled_rows_are_full_records_with_their_update_time() {
    let f = fixture(clients(2)).await;
    let page = f.source.poll(STREAM_UPDATED, None).await.unwrap();
    match &page.items[0] {
        PollItem::Record {
            id,
            updated_at,
            body,
        } => {
            assert_eq!(id.as_str(), "1");
            assert_eq!(
                *updated_at,
                Some(at(2026, 3, 1, 12) + chrono::Duration::milliseconds(1))
            );
            assert_eq!(body["ClientId"], 1);
        }
        other => panic!("expected a record, got {other:?}"),
    }
}

#[tokio::test]
async fn the_next_pass_asks_only_for_recent_updates() {
    let mut c = clients(3);
    c[0]["LastUpdateDate"] = json!(at(2026, 2, 1, 12).timestamp_millis());
    let f = fixture(c).await;
    let first = f.source.poll(STREAM_UPDATED, None).await.unwrap();
    assert_eq!(ids(&first), vec!["1", "2", "3"]);
    f.clock.set(at(2026, 3, 3, 8));
    let second = f
        .source
        .poll(STREAM_UPDATED, first.next_cursor.as_deref())
        .await
        .unwrap();
    assert_eq!(
        ids(&second),
        vec!["2", "3"],
        "client 1 is older than the overlap"
    );
    let next: Value = serde_json::from_str(second.next_cursor.as_deref().unwrap()).unwrap();
    assert_eq!(next["from"], "2026-03-02");
}

#[tokio::test]
async fn lowercase_include_profile_ignored_is_retried_with_the_documented_casing() {
    let sandbox = IntakeqSandbox::new("iq-key", clients(3))
        .with_limits(100_000, 100_000)
        .with_profile_param(ProfileParam::CapitalizedOnly);
    let f = fixture_with(sandbox, 500, NaiveTime::MIN).await;
    let page = f.source.poll(STREAM_UPDATED, None).await.unwrap();
    assert!(page
        .items
        .iter()
        .all(|i| matches!(i, PollItem::Record { .. })));
    assert_eq!(f.sandbox.counters().requests, 2);
    let fetched = f.source.fetch_records(&["2".into()]).await;
    assert!(fetched[0].1.as_ref().unwrap().is_some());
    assert_eq!(
        f.sandbox.counters().requests,
        3,
        "the working spelling is remembered"
    );
}

#[tokio::test]
async fn one_client_is_the_exact_client_id_match_of_a_search() {
    let f = fixture(clients(30)).await;
    // `search=3` also matches "Client Number13", "client23@…" and so on.
    let out = f
        .source
        .fetch_records(&["3".into(), "404".into(), "Jane".into()])
        .await;
    let record = out[0].1.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(record.key.id.as_str(), "3");
    assert_eq!(record.fields.email.as_deref(), Some("client3@example.com"));
    assert_eq!(record.fetched_at, f.clock.now());
    assert!(matches!(out[1].1, Ok(None)));
    assert_eq!(out[2].1.as_ref().unwrap_err().kind(), "invalid_client_id");
    assert_eq!(
        f.sandbox.counters().requests,
        2,
        "a bad id costs no request"
    );
}

#[tokio::test]
async fn the_deleted_sweep_reports_deleted_ids_from_thin_rows() {
    let sandbox = IntakeqSandbox::new("iq-key", clients(5)).with_limits(100_000, 100_000);
    sandbox.delete_client(2, Utc::now());
    sandbox.delete_client(4, Utc::now());
    let f = fixture_with(sandbox, 500, NaiveTime::MIN).await;
    let page = f.source.poll(STREAM_DELETED, None).await.unwrap();
    assert!(page.complete);
    assert_eq!(
        page.items,
        vec![PollItem::Deleted("2".into()), PollItem::Deleted("4".into())]
    );
    assert_eq!(page.next_cursor.as_deref(), Some(r#"{"page":1}"#));
}

#[tokio::test]
async fn a_spent_daily_budget_waits_for_the_reset_instead_of_failing() {
    let sandbox = IntakeqSandbox::new("iq-key", clients(3)).with_limits(100_000, 100_000);
    let f = fixture_with(sandbox, 2, NaiveTime::MIN).await;
    assert_eq!(
        f.source.budget(),
        BudgetSnapshot {
            used: 0,
            limit: 2,
            remaining: 2,
            resets_at: at(2026, 3, 3, 0)
        }
    );
    let out = f
        .source
        .fetch_records(&["1".into(), "2".into(), "3".into()])
        .await;
    assert!(out.iter().all(|(_, r)| matches!(r, Ok(Some(_)))));
    assert_eq!(f.clock.sleeps(), 1, "the third request waited once");
    assert_eq!(f.clock.now(), at(2026, 3, 3, 0), "until midnight UTC");
    assert_eq!(
        f.source.budget(),
        BudgetSnapshot {
            used: 1,
            limit: 2,
            remaining: 1,
            resets_at: at(2026, 3, 4, 0)
        }
    );
    assert_eq!(f.sandbox.counters().requests, 3);
    assert_eq!(
        f.metrics.counter(
            "patient_sync_upstream_budget_waits_total",
            &[("source", "intakeq")]
        ),
        1
    );
}

#[tokio::test]
async fn the_daily_reset_time_is_configurable() {
    let sandbox = IntakeqSandbox::new("iq-key", clients(1)).with_limits(100_000, 100_000);
    let seven = NaiveTime::from_hms_opt(7, 0, 0).unwrap();
    let f = fixture_with(sandbox, 1, seven).await;
    assert_eq!(f.source.budget().resets_at, at(2026, 3, 3, 7));
    f.source.fetch_records(&["1".into()]).await;
    f.source.fetch_records(&["1".into()]).await;
    assert_eq!(f.clock.now(), at(2026, 3, 3, 7));
    f.source.restore_budget(&BudgetSnapshot {
        used: 1,
        limit: 1,
        remaining: 0,
        resets_at: at(2026, 3, 4, 7),
    });
    assert_eq!(f.source.budget().remaining, 0, "a restored snapshot counts");
}

#[tokio::test]
async fn over_the_per_minute_limit_the_worker_gets_a_rate_limit_error() {
    let sandbox = IntakeqSandbox::new("iq-key", clients(2)).with_limits(1, 500);
    let f = fixture_with(sandbox, 500, NaiveTime::MIN).await;
    let out = f.source.fetch_records(&["1".into(), "2".into()]).await;
    assert!(matches!(out[0].1, Ok(Some(_))));
    let err = out[1].1.as_ref().unwrap_err();
    assert!(err.is_rate_limit() && err.is_retryable(), "{err:?}");
    assert_eq!(err.http_status(), Some(429));
    assert!(f.sandbox.counters().rate_limited >= 1);
}

#[test]
fn plan_refetches_the_client_a_webhook_names() {
    let f = Intakeq::new(
        &settings("http://127.0.0.1:9", 500),
        Arc::new(Metrics::new()),
    );
    let intake = item("webhook", "Intake Submitted", Some("1042"), INTAKE);
    assert_eq!(f.plan(&intake).unwrap(), Plan::Fetch(vec!["1042".into()]));
    let appointment = item("webhook", "AppointmentCreated", None, APPOINTMENT);
    assert_eq!(
        f.plan(&appointment).unwrap(),
        Plan::Fetch(vec!["1042".into()])
    );
    let nothing = item("webhook", "Other", None, r#"{"Type":"Other"}"#);
    assert!(matches!(f.plan(&nothing).unwrap(), Plan::Ignore(_)));
}

#[test]
fn plan_applies_polled_records_and_tombstones_deletions() {
    let f = Intakeq::new(
        &settings("http://127.0.0.1:9", 500),
        Arc::new(Metrics::new()),
    );
    let received = at(2026, 3, 2, 9);
    match f
        .plan(&item("poll", EVENT_POLL_RECORD, Some("1042"), FULL))
        .unwrap()
    {
        Plan::Apply(r) => {
            assert_eq!(r.key.id.as_str(), "1042");
            assert_eq!(r.status, RecordStatus::Active);
            assert_eq!(r.fetched_at, received);
            assert_eq!(r.fields.birth_date, NaiveDate::from_ymd_opt(2016, 3, 21));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.plan(&item("poll", EVENT_POLL_CHANGED, Some("8"), "{}"))
            .unwrap(),
        Plan::Fetch(vec!["8".into()])
    );
    match f
        .plan(&item(
            "poll",
            EVENT_POLL_DELETED,
            Some("8"),
            r#"{"id":"8"}"#,
        ))
        .unwrap()
    {
        Plan::Apply(r) => {
            assert_eq!(r.key.id.as_str(), "8");
            assert_eq!(r.status, RecordStatus::Deleted);
            assert_eq!(r.source_updated_at, Some(received));
            assert_eq!(r.raw, json!({"id": "8"}));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn plan_applies_imported_profiles_and_refetches_bare_ids() {
    let f = Intakeq::new(
        &settings("http://127.0.0.1:9", 500),
        Arc::new(Metrics::new()),
    );
    assert!(matches!(
        f.plan(&item("import", "import.record", None, FULL))
            .unwrap(),
        Plan::Apply(_)
    ));
    assert_eq!(
        f.plan(&item("resync", "resync.changed", None, r#"{"id": 77}"#))
            .unwrap(),
        Plan::Fetch(vec!["77".into()])
    );
    assert!(matches!(
        f.plan(&item("manual", "x", None, "not json")).unwrap(),
        Plan::Ignore(_)
    ));
}

#[test]
fn a_malformed_polled_record_is_a_plan_error_without_phi() {
    let f = Intakeq::new(
        &settings("http://127.0.0.1:9", 500),
        Arc::new(Metrics::new()),
    );
    let body = r#"{"ClientId": 5, "FirstName": "Jane", "Email": {"x": "jane@example.com"}}"#;
    let err = f
        .plan(&item("poll", EVENT_POLL_RECORD, Some("5"), body))
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("Jane") && !text.contains("jane@"), "{text}");
}
