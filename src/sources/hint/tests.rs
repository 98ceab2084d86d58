//! Hint source tests against the fake Hint on a local port.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, TimeZone};
use serde_json::{json, Value};

use super::*;
use crate::config::Secret;
use crate::sandbox::hint::HintSandbox;
use crate::store::{InboxItem, InboxState};

const FULL: &str = include_str!("../../../tests/fixtures/hint/patient_full.json");
const MERGED: &str = include_str!("../../../tests/fixtures/hint/patient_merged.json");
const UPDATED: &str = include_str!("../../../tests/fixtures/hint/event_patient_updated.json");
const DESTROYED: &str = include_str!("../../../tests/fixtures/hint/event_patient_destroyed.json");
const INACTIVE: &str = include_str!("../../../tests/fixtures/hint/event_patient_inactive.json");
const MEMBERSHIP: &str = include_str!("../../../tests/fixtures/hint/event_membership_updated.json");

fn settings(base_url: &str) -> HintSettings {
    HintSettings {
        enabled: true,
        base_url: base_url.into(),
        requests_per_second: 20,
        max_concurrent_requests: 3,
        timeout_ms: 5_000,
        live_reserved_share: 0.0,
        api_key: Secret::new("hint-practice-key"),
        webhook_secret: Secret::default(),
    }
}

fn fast_policy() -> UpstreamPolicy {
    let mut p = UpstreamPolicy::per_second(100_000, 100_000, Duration::from_secs(5));
    p.rate_limit_pause = Duration::from_millis(2);
    p.retry_initial = Duration::from_millis(1);
    p.retry_max = Duration::from_millis(5);
    p.max_retry_elapsed = Duration::from_millis(100);
    p
}

struct Fixture {
    sandbox: HintSandbox,
    source: Hint,
    metrics: Arc<Metrics>,
}

async fn fixture(sandbox: HintSandbox) -> Fixture {
    let base = sandbox.serve_for_test().await;
    let metrics = Arc::new(Metrics::new());
    let source = Hint::with_options(
        &settings(&base),
        metrics.clone(),
        HintOptions {
            policy: Some(fast_policy()),
            ..HintOptions::default()
        },
    );
    Fixture {
        sandbox,
        source,
        metrics,
    }
}

fn t(minute: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::minutes(minute)
}

/// A seed-shaped patient `pat-NNNN` updated at `updated_at`.
fn patient(i: u32, updated_at: DateTime<Utc>) -> Value {
    let mut p: Value = serde_json::from_str(FULL).unwrap();
    p["id"] = json!(format!("pat-{i:04}"));
    p["updated_at"] = json!(updated_at.to_rfc3339_opts(SecondsFormat::Micros, false));
    p
}

/// Patients 1..=n updated one minute apart.
fn patients(n: u32) -> Vec<Value> {
    (1..=n).map(|i| patient(i, t(i as i64))).collect()
}

fn sandbox(patients: Vec<Value>) -> HintSandbox {
    HintSandbox::new("hint-practice-key", patients).with_rate_limit(100_000)
}

/// Polls one whole pass from `cursor`; returns the ids seen, the page count and the cursor.
async fn pass(source: &Hint, mut cursor: Option<String>) -> (Vec<String>, usize, Option<String>) {
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let page = source
            .poll(STREAM_UPDATED, cursor.as_deref())
            .await
            .unwrap();
        pages += 1;
        for item in &page.items {
            match item {
                PollItem::Record { id, .. } => ids.push(id.to_string()),
                other => panic!("unexpected {other:?}"),
            }
        }
        cursor = page.next_cursor.clone();
        if page.complete {
            return (ids, pages, cursor);
        }
        assert!(pages < 50, "the pass does not end");
    }
}

fn cursor_at(start: DateTime<Utc>) -> String {
    serde_json::to_string(&json!({"start": start, "since": start, "skip": 0, "sweep": null}))
        .unwrap()
}

#[tokio::test]
async fn listing_ends_when_x_total_count_is_reached() {
    let f = fixture(sandbox(patients(200))).await;
    let (ids, pages, cursor) = pass(&f.source, None).await;
    assert_eq!(ids.len(), 200);
    assert_eq!(pages, 2, "no empty third page is asked for");
    assert_eq!(f.sandbox.counters().requests, 2);
    let next: Value = serde_json::from_str(cursor.as_deref().unwrap()).unwrap();
    let start: DateTime<Utc> = serde_json::from_value(next["start"].clone()).unwrap();
    assert_eq!(start, t(200) - chrono::Duration::seconds(60), "overlap");
}

#[tokio::test]
async fn a_later_pass_asks_only_for_recent_changes_and_archived_ones_too() {
    let mut all = patients(30);
    all[29]["membership_status"] = json!("archived");
    let f = fixture(sandbox(all)).await;
    let (ids, pages, _) = pass(&f.source, Some(cursor_at(t(25)))).await;
    assert_eq!(
        ids,
        vec!["pat-0025", "pat-0026", "pat-0027", "pat-0028", "pat-0029", "pat-0030"]
    );
    assert_eq!(pages, 1);
}

#[tokio::test]
async fn a_page_ending_inside_a_run_of_equal_timestamps_loses_nothing() {
    let mut all = patients(30);
    all.extend((31..=150).map(|i| patient(i, t(1000))));
    let f = fixture(sandbox(all)).await;
    let (ids, pages, _) = pass(&f.source, None).await;
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 150);
    assert_eq!(pages, 2);
}

#[tokio::test]
async fn an_ignored_updated_at_filter_falls_back_to_a_full_sweep() {
    let f = fixture(sandbox(patients(150)).ignoring_updated_at_filter()).await;
    let (ids, _, cursor) = pass(&f.source, Some(cursor_at(t(120)))).await;
    let distinct: BTreeSet<String> = ids.into_iter().collect();
    let expected: BTreeSet<String> = (120..=150).map(|i| format!("pat-{i:04}")).collect();
    assert_eq!(distinct, expected);
    assert_eq!(
        f.metrics.counter(
            "patient_sync_poll_fallback_total",
            &[("source", "hint"), ("reason", "filter_ignored")]
        ),
        1
    );
    let next: Value = serde_json::from_str(cursor.as_deref().unwrap()).unwrap();
    assert_eq!(
        next["sweep"],
        Value::Null,
        "the next pass tries the filter again"
    );
}

#[tokio::test]
async fn an_ignored_sort_falls_back_to_a_full_sweep() {
    let mut all = patients(120);
    all.reverse();
    let f = fixture(sandbox(all).ignoring_sort()).await;
    let (ids, _, _) = pass(&f.source, None).await;
    let distinct: BTreeSet<String> = ids.into_iter().collect();
    assert_eq!(distinct.len(), 120);
    assert_eq!(
        f.metrics.counter(
            "patient_sync_poll_fallback_total",
            &[("source", "hint"), ("reason", "sort_ignored")]
        ),
        1
    );
}

#[tokio::test]
async fn enhance_your_calm_is_retried_with_backoff() {
    let f = fixture(sandbox(patients(1))).await;
    f.sandbox.fail_next_with_429(2);
    let out = f.source.fetch_records(&["pat-0001".into()]).await;
    let record = out[0].1.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(record.key.id.as_str(), "pat-0001");
    assert_eq!(f.sandbox.counters().rate_limited, 2);
    assert_eq!(f.sandbox.counters().requests, 3);
    assert_eq!(
        f.metrics.counter(
            "patient_sync_upstream_rate_limited_total",
            &[("source", "hint"), ("status", "429")]
        ),
        2
    );
}

#[tokio::test]
async fn a_429_that_does_not_end_goes_back_to_the_worker_as_rate_limited() {
    let f = fixture(sandbox(patients(1))).await;
    f.sandbox.fail_next_with_429(u32::MAX);
    let out = f.source.fetch_records(&["pat-0001".into()]).await;
    let err = out[0].1.as_ref().unwrap_err();
    assert!(err.is_rate_limit(), "{err:?}");
    assert_eq!(err.retry_after(), None);
    assert_eq!(err.http_status(), Some(429));
}

#[tokio::test]
async fn detail_fetches_stay_within_the_concurrency_cap_and_keep_their_order() {
    let sb = sandbox(patients(9)).with_detail_limit(3, Duration::from_millis(15));
    let f = fixture(sb).await;
    let ids: Vec<SourceId> = (1..=9)
        .rev()
        .map(|i| format!("pat-{i:04}").into())
        .collect();
    let out = f.source.fetch_records(&ids).await;
    assert_eq!(f.sandbox.counters().rate_limited, 0);
    assert!(f.sandbox.counters().max_detail_in_flight <= 3);
    for ((asked, (id, result)), expected) in ids.iter().zip(&out).zip((1..=9).rev()) {
        assert_eq!(asked, id);
        let record = result.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(record.key.id.as_str(), format!("pat-{expected:04}"));
    }
}

#[tokio::test]
async fn an_unknown_patient_is_none() {
    let f = fixture(sandbox(patients(1))).await;
    let out = f.source.fetch_records(&["pat-missing".into()]).await;
    assert!(matches!(out[0].1, Ok(None)));
}

fn item(origin: &str, event_type: &str, resource_id: Option<&str>, body: &str) -> InboxItem {
    InboxItem {
        id: crate::model::InboxId(1),
        source: SourceKind::Hint,
        origin: origin.into(),
        event_type: event_type.into(),
        resource_type: Some("patient".into()),
        resource_id: resource_id.map(String::from),
        body: body.into(),
        state: InboxState::Leased,
        reason: None,
        attempts: 1,
        received_at_ms: Utc
            .with_ymd_and_hms(2026, 2, 28, 0, 0, 6)
            .unwrap()
            .timestamp_millis(),
        available_at_ms: 0,
        last_error_kind: None,
        last_http_status: None,
        finished_at_ms: None,
    }
}

fn source() -> Hint {
    Hint::new(&settings("http://127.0.0.1:9"), Arc::new(Metrics::new()))
}

fn applied(plan: Plan) -> SourceRecord {
    match plan {
        Plan::Apply(r) => *r,
        other => panic!("expected Apply, got {other:?}"),
    }
}

#[test]
fn patient_created_and_updated_events_apply_the_object() {
    let s = source();
    for event_type in ["patient.created", "patient.updated"] {
        let body = UPDATED.replace("patient.updated", event_type);
        let r = applied(
            s.plan(&item(
                "webhook",
                event_type,
                Some("pat-n32hjf4mmu1s"),
                &body,
            ))
            .unwrap(),
        );
        assert_eq!(r.key.id.as_str(), "pat-n32hjf4mmu1s");
        assert_eq!(r.status, RecordStatus::Active);
        let envelope: Value = serde_json::from_str(UPDATED).unwrap();
        assert_eq!(r.raw, envelope["object"]);
    }
}

#[test]
fn patient_destroyed_applies_a_deleted_record_newer_than_the_object() {
    let r = applied(
        source()
            .plan(&item("webhook", "patient.destroyed", None, DESTROYED))
            .unwrap(),
    );
    assert_eq!(r.status, RecordStatus::Deleted);
    assert_eq!(
        r.fields.family_name.as_deref(),
        Some("O'Neil"),
        "last known fields kept"
    );
    assert_eq!(
        r.source_updated_at,
        Some(Utc.with_ymd_and_hms(2026, 2, 28, 0, 0, 5).unwrap()),
        "the event time, later than the object's updated_at"
    );
}

#[test]
fn patient_inactive_applies_an_archived_record() {
    let r = applied(
        source()
            .plan(&item("webhook", "patient.inactive", None, INACTIVE))
            .unwrap(),
    );
    assert_eq!(r.status, RecordStatus::Archived);
}

#[test]
fn a_merged_away_patient_is_merged_whatever_the_event() {
    let merged: Value = serde_json::from_str(MERGED).unwrap();
    for event_type in ["patient.updated", "patient.destroyed", "patient.inactive"] {
        let body = json!({"id": "evt-m", "type": event_type, "practice_id": "pra-1",
                          "created_at": "2026-02-28T16:00:00Z", "object": merged});
        let r = applied(
            source()
                .plan(&item("webhook", event_type, None, &body.to_string()))
                .unwrap(),
        );
        assert_eq!(r.status, RecordStatus::Merged, "{event_type}");
        assert_eq!(
            r.merged_into.as_ref().map(|m| m.as_str()),
            Some("pat-n32hjf4mmu1s")
        );
    }
}

#[test]
fn membership_events_refetch_the_patients_they_name() {
    let plan = source()
        .plan(&item(
            "webhook",
            "membership.updated",
            Some("pat-n32hjf4mmu1s"),
            MEMBERSHIP,
        ))
        .unwrap();
    assert_eq!(
        plan,
        Plan::Fetch(vec!["pat-n32hjf4mmu1s".into(), "pat-77ab2cd9ef01".into()])
    );
    let empty = r#"{"id":"evt-1","type":"membership.destroyed","object":{"id":"mem-1"}}"#;
    assert!(matches!(
        source()
            .plan(&item("webhook", "membership.destroyed", None, empty))
            .unwrap(),
        Plan::Ignore(_)
    ));
}

#[test]
fn unknown_event_types_are_ignored() {
    let body = r#"{"id":"evt-u1","type":"signup_attempt.created","practice_id":"pra-1","object":{"id":"sa-1"}}"#;
    assert_eq!(
        source()
            .plan(&item("webhook", "signup_attempt.created", None, body))
            .unwrap(),
        Plan::Ignore("hint event type signup_attempt.created not handled".into())
    );
}

#[test]
fn poll_items_apply_refetch_or_tombstone() {
    let s = source();
    let r = applied(
        s.plan(&item(
            "poll",
            EVENT_POLL_RECORD,
            Some("pat-n32hjf4mmu1s"),
            FULL,
        ))
        .unwrap(),
    );
    assert_eq!(r.status, RecordStatus::Active);
    assert_eq!(
        s.plan(&item("poll", EVENT_POLL_CHANGED, Some("pat-1"), "{}"))
            .unwrap(),
        Plan::Fetch(vec!["pat-1".into()])
    );
    let r = applied(
        s.plan(&item(
            "poll",
            EVENT_POLL_DELETED,
            Some("pat-1"),
            r#"{"id":"pat-1"}"#,
        ))
        .unwrap(),
    );
    assert_eq!(r.status, RecordStatus::Deleted);
    assert_eq!(r.key.id.as_str(), "pat-1");
    assert!(matches!(
        s.plan(&item("import", "import.record", None, FULL))
            .unwrap(),
        Plan::Apply(_)
    ));
    assert_eq!(
        s.plan(&item("resync", "resync.changed", Some("pat-2"), "{}"))
            .unwrap(),
        Plan::Fetch(vec!["pat-2".into()])
    );
}

#[test]
fn a_malformed_webhook_object_is_a_plan_error_without_phi() {
    let body = r#"{"id":"evt-1","type":"patient.updated","object":{"id":"pat-1","first_name":"Jane","dob":"Jane's day"}}"#;
    let err = source()
        .plan(&item("webhook", "patient.updated", None, body))
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("Jane"), "{text}");
    let err = source()
        .plan(&item("webhook", "patient.updated", None, "not json"))
        .unwrap_err();
    assert!(err.to_string().contains("not JSON"));
}
