//! `poll_source` against a scripted source and the fake IntakeQ and Hint, on SQLite.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use serde_json::{json, Value};

use super::*;
use crate::config::{HintSettings, IntakeqSettings, Secret};
use crate::model::{RecordStatus, SourceId, SourceRecord};
use crate::sandbox::hint::HintSandbox;
use crate::sandbox::intakeq::IntakeqSandbox;
use crate::sources::hint::{Hint, HintOptions};
use crate::sources::http::{ManualClock, UpstreamPolicy};
use crate::sources::intakeq::{ConvertOptions, Intakeq, IntakeqOptions};
use crate::sources::{ConvertError, Plan, PlanError, PollPage};
use crate::store::{InboxItem, InboxState};

struct Db {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("poll.sqlite").display());
    let store = crate::store::connect(&url, 4).await.unwrap();
    store.migrate().await.unwrap();
    Db { store, _dir: dir }
}

async fn pending(store: &dyn Store, source: SourceKind) -> Vec<InboxItem> {
    store
        .list_inbox(InboxState::Pending, Some(source), None, 10_000)
        .await
        .unwrap()
}

fn fast_policy() -> UpstreamPolicy {
    let mut p = UpstreamPolicy::per_second(100_000, 100_000, Duration::from_secs(5));
    p.rate_limit_pause = Duration::from_millis(2);
    p.retry_initial = Duration::from_millis(1);
    p.retry_max = Duration::from_millis(5);
    p.max_retry_elapsed = Duration::from_millis(50);
    p
}

/// A source whose one stream `a` has two pages; the second fails while `fail` is set.
struct Scripted {
    fail: AtomicBool,
    stuck: bool,
}

#[async_trait]
impl Source for Scripted {
    fn kind(&self) -> SourceKind {
        SourceKind::Hint
    }
    fn plan(&self, _: &InboxItem) -> Result<Plan, PlanError> {
        unreachable!()
    }
    async fn fetch_records(
        &self,
        _: &[SourceId],
    ) -> Vec<(SourceId, Result<Option<SourceRecord>, FetchError>)> {
        unreachable!()
    }
    fn poll_streams(&self) -> &'static [&'static str] {
        &["a"]
    }
    async fn poll(&self, _: &str, cursor: Option<&str>) -> Result<PollPage, FetchError> {
        match cursor {
            None | Some("p1") => Ok(PollPage {
                items: vec![
                    PollItem::Record {
                        id: "r1".into(),
                        updated_at: Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()),
                        body: json!({"id": "r1"}),
                    },
                    PollItem::Changed("r2".into()),
                ],
                next_cursor: Some(if self.stuck { "p1" } else { "p2" }.into()),
                complete: false,
            }),
            Some("p2") if self.fail.load(Ordering::Relaxed) => Err(FetchError::Transient {
                kind: "server_error",
                status: Some(503),
                source: None,
            }),
            Some("p2") => Ok(PollPage {
                items: vec![PollItem::Deleted("r3".into())],
                next_cursor: Some("p1".into()),
                complete: true,
            }),
            Some(other) => panic!("unexpected cursor {other}"),
        }
    }
    fn parse_record(&self, _: &Value, _: DateTime<Utc>) -> Result<SourceRecord, ConvertError> {
        unreachable!()
    }
}

#[tokio::test]
async fn a_failed_page_keeps_the_cursor_of_the_pages_before_it() {
    let db = db().await;
    let metrics = Metrics::new();
    let source = Scripted {
        fail: AtomicBool::new(true),
        stuck: false,
    };
    let err = poll_source(&*db.store, &source, &metrics)
        .await
        .unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(err.to_string(), "polling hint stream a failed");
    let state = db
        .store
        .load_sync_state(SourceKind::Hint, "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.cursor.as_deref(), Some("p2"));
    assert_eq!(state.last_success_at, None);

    source.fail.store(false, Ordering::Relaxed);
    let summary = poll_source(&*db.store, &source, &metrics).await.unwrap();
    assert_eq!(summary.streams[0].pages, 1, "resumed at the second page");
    assert_eq!(summary.streams[0].deleted, 1);
    let state = db
        .store
        .load_sync_state(SourceKind::Hint, "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.cursor.as_deref(), Some("p1"));
    assert!(state.last_success_at.is_some());

    let items = pending(&*db.store, SourceKind::Hint).await;
    let shapes: Vec<(&str, Option<&str>, &str)> = items
        .iter()
        .map(|i| {
            (
                i.event_type.as_str(),
                i.resource_id.as_deref(),
                i.body.as_str(),
            )
        })
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("poll.record", Some("r1"), r#"{"id":"r1"}"#),
            ("poll.changed", Some("r2"), "{}"),
            ("poll.deleted", Some("r3"), r#"{"id":"r3"}"#),
        ]
    );
    assert!(items.iter().all(|i| i.origin == "poll"));
}

#[tokio::test]
async fn a_cursor_that_does_not_move_is_an_error_not_a_loop() {
    let db = db().await;
    let source = Scripted {
        fail: AtomicBool::new(false),
        stuck: true,
    };
    db.store
        .save_sync_state(&SyncState {
            source: SourceKind::Hint,
            stream: "a".into(),
            cursor: Some("p1".into()),
            checkpoint: None,
            last_success_at: None,
            updated_at: Utc::now(),
        })
        .await
        .unwrap();
    let err = poll_source(&*db.store, &source, &Metrics::new())
        .await
        .unwrap_err();
    assert!(matches!(err, PollError::Stuck { .. }), "{err:?}");
}

fn intakeq_client(i: u64, updated: DateTime<Utc>) -> Value {
    let mut c: Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/intakeq/client_full.json"
    ))
    .unwrap();
    c["ClientId"] = json!(i);
    c["LastUpdateDate"] = json!(updated.timestamp_millis());
    c
}

#[tokio::test]
async fn polling_intakeq_queues_records_and_deletions_once() {
    let db = db().await;
    let updated = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    let sandbox = IntakeqSandbox::new(
        "iq",
        (1..=120).map(|i| intakeq_client(i, updated)).collect(),
    )
    .with_limits(100_000, 100_000);
    sandbox.delete_client(7, Utc::now());
    sandbox.delete_client(8, Utc::now());
    let base = crate::sandbox::serve_for_test(
        axum::Router::new().nest("/intakeq/api/v1", sandbox.router()),
    )
    .await;
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap(),
    ));
    let metrics = Arc::new(Metrics::new());
    let source = Intakeq::with_options(
        &IntakeqSettings {
            enabled: true,
            base_url: format!("{base}/intakeq/api/v1"),
            requests_per_minute: 10,
            requests_per_day: 500,
            timeout_ms: 5_000,
            live_reserved_share: 0.0,
            api_key: Secret::new("iq"),
            webhook_token: Secret::default(),
        },
        metrics.clone(),
        IntakeqOptions {
            clock: clock.clone(),
            daily_reset_utc: NaiveTime::MIN,
            convert: ConvertOptions::default(),
            policy: Some(fast_policy()),
        },
    );

    let first = poll_source(&*db.store, &source, &metrics).await.unwrap();
    assert_eq!(first.source, SourceKind::Intakeq);
    let (updated_stream, deleted_stream) = (&first.streams[0], &first.streams[1]);
    assert_eq!(
        (
            updated_stream.stream,
            updated_stream.pages,
            updated_stream.queued
        ),
        ("updated", 2, 118)
    );
    assert_eq!(
        (deleted_stream.stream, deleted_stream.queued),
        ("deleted", 2)
    );
    for stream in ["updated", "deleted"] {
        let state = db
            .store
            .load_sync_state(SourceKind::Intakeq, stream)
            .await
            .unwrap()
            .unwrap();
        assert!(
            state.cursor.is_some() && state.last_success_at.is_some(),
            "{stream}"
        );
    }
    assert_eq!(source.budget().used, 3);

    let items = pending(&*db.store, SourceKind::Intakeq).await;
    assert_eq!(items.len(), 120);
    for item in &items {
        match (item.event_type.as_str(), source.plan(item).unwrap()) {
            ("poll.record", Plan::Apply(r)) => assert_eq!(r.status, RecordStatus::Active),
            ("poll.deleted", Plan::Apply(r)) => assert_eq!(r.status, RecordStatus::Deleted),
            (t, p) => panic!("{t} planned as {p:?}"),
        }
    }

    clock.set(Utc.with_ymd_and_hms(2026, 3, 2, 11, 0, 0).unwrap());
    let second = poll_source(&*db.store, &source, &metrics).await.unwrap();
    assert_eq!(second.queued(), 0, "nothing new");
    assert_eq!(
        second.streams[0].duplicates, 118,
        "re-polled from the day before"
    );

    sandbox.upsert_client(intakeq_client(
        5,
        Utc.with_ymd_and_hms(2026, 3, 2, 10, 30, 0).unwrap(),
    ));
    let third = poll_source(&*db.store, &source, &metrics).await.unwrap();
    assert_eq!(third.queued(), 1, "only the changed client");
}

#[tokio::test]
async fn polling_hint_queues_each_version_once() {
    let db = db().await;
    let full: Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/hint/patient_full.json"
    ))
    .unwrap();
    let at =
        |i: i64| Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::minutes(i);
    let patient = |i: i64, t: DateTime<Utc>| {
        let mut p = full.clone();
        p["id"] = json!(format!("pat-{i:04}"));
        p["updated_at"] = json!(t.to_rfc3339());
        p
    };
    let sandbox = HintSandbox::new("hk", (1..=150).map(|i| patient(i, at(i))).collect())
        .with_rate_limit(100_000);
    let base =
        crate::sandbox::serve_for_test(axum::Router::new().nest("/hint", sandbox.router())).await;
    let metrics = Arc::new(Metrics::new());
    let source = Hint::with_options(
        &HintSettings {
            enabled: true,
            base_url: format!("{base}/hint"),
            requests_per_second: 20,
            max_concurrent_requests: 3,
            timeout_ms: 5_000,
            live_reserved_share: 0.0,
            api_key: Secret::new("hk"),
            webhook_secret: Secret::default(),
        },
        metrics.clone(),
        HintOptions {
            policy: Some(fast_policy()),
            ..HintOptions::default()
        },
    );
    let first = poll_source(&*db.store, &source, &metrics).await.unwrap();
    assert_eq!(first.streams[0].queued, 150);
    let second = poll_source(&*db.store, &source, &metrics).await.unwrap();
    assert_eq!(second.queued(), 0);
    assert_eq!(
        second.streams[0].duplicates, 2,
        "the 60 s overlap re-reads the last minute, bounds included"
    );

    sandbox.upsert_patient(patient(3, at(500)));
    let third = poll_source(&*db.store, &source, &metrics).await.unwrap();
    assert_eq!(third.queued(), 1);
    let items = pending(&*db.store, SourceKind::Hint).await;
    assert_eq!(items.len(), 151);
    let last = items.last().unwrap();
    assert_eq!(last.resource_id.as_deref(), Some("pat-0003"));
    match source.plan(last).unwrap() {
        Plan::Apply(r) => assert_eq!(r.source_updated_at, Some(at(500))),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        metrics.counter(
            "patient_sync_poll_items_total",
            &[
                ("source", "hint"),
                ("stream", "updated"),
                ("outcome", "queued")
            ]
        ),
        151
    );
}
