//! `GET /metrics` on a running app after a poll, a storm of webhooks and a drain: every family
//! the operator needs is there with figures that agree with what happened, and no label carries
//! PHI.

use std::collections::BTreeMap;

use patient_sync::app::Application;
use patient_sync::model::SourceKind;
use patient_sync::sandbox::healthie::{HealthieConfig, RateLimit};
use patient_sync::sandbox::population::PopulationConfig;
use patient_sync::sandbox::webhooks::{HealthieEnvelope, WebhookSender};
use patient_sync::sandbox::{Sandbox, SandboxConfig};
use patient_sync::store::{InboxState, NewInboxItem, Origin};
use tokio_util::sync::CancellationToken;

use crate::app::{settings_for, WEBHOOK_SECRET};
use crate::helpers::{database, Db};

/// `series -> value` from the Prometheus text format.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (series.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} is missing from /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_events_upstream_requests_rate_limits_queue_and_latency() {
    // A Healthie that allows one request a second, answering 429 beyond it.
    let sandbox = Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people: 30,
            seed: 5,
            ..Default::default()
        },
        healthie: HealthieConfig {
            rate_limit: Some(RateLimit {
                requests_per_second: 1.0,
                burst: 1,
            }),
            rate_limited_status: 429,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let db = database(Db::Sqlite).await;
    let app = Application::build(settings_for(&db.url, &sandbox.healthie_url(), &[]))
        .await
        .unwrap();
    let address = format!("http://{}", app.local_addr());
    let store = app.store();
    let worker = app.worker();
    let polled = app.poll_all().await;
    let poll_queued: u64 = polled
        .iter()
        .map(|(_, r)| r.as_ref().expect("the poll succeeds").queued())
        .sum();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_receiver(shutdown.clone()));

    let ids: Vec<String> = {
        let pop = sandbox.population().read().unwrap();
        pop.healthie_users()
            .filter_map(|u| u.get("id").and_then(|v| v.as_str()).map(str::to_string))
            .take(10)
            .collect()
    };
    let sender = WebhookSender::new(
        format!("{address}/webhooks/healthie").parse().unwrap(),
        WEBHOOK_SECRET.as_bytes().to_vec(),
    );
    for id in &ids {
        let status = sender
            .send(&HealthieEnvelope::patient(
                "patient.updated",
                id,
                vec!["email".into()],
            ))
            .await
            .unwrap();
        assert_eq!(status, 202);
    }
    assert_eq!(
        sender
            .send(&HealthieEnvelope::test_created("wh-1"))
            .await
            .unwrap(),
        202
    );
    // An item no worker can plan: it goes straight to the dead letters.
    store
        .insert_inbox(&NewInboxItem {
            source: SourceKind::Healthie,
            origin: Origin::Webhook,
            event_type: "patient.merged".into(),
            resource_type: Some("User".into()),
            resource_id: None,
            body: "{}".into(),
            dedupe_key: None,
            received_at_ms: patient_sync::store::now_ms(),
            ignore_reason: None,
        })
        .await
        .unwrap();
    let drained = worker.drain().await.unwrap();
    assert_eq!(drained.dead, 1);
    assert_eq!(drained.retried, 0);

    let response = reqwest::get(format!("{address}/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    let m = parse(&text);

    // Events received, processed and dead, by source.
    assert_eq!(
        get(
            &m,
            r#"patient_sync_events_received_total{source="healthie",origin="webhook"}"#
        ),
        11.0,
        "ten patient events and one test event stored"
    );
    assert_eq!(
        get(
            &m,
            r#"patient_sync_events_received_total{source="healthie",origin="poll"}"#
        ),
        poll_queued as f64
    );
    let webhooks: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with(r#"patient_sync_webhooks_received_total{source="healthie""#))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(webhooks, 11.0);
    let processed = |outcome: &str| {
        get(
            &m,
            &format!(
                r#"patient_sync_events_processed_total{{source="healthie",outcome="{outcome}"}}"#
            ),
        )
    };
    assert_eq!(processed("done"), drained.done as f64);
    assert_eq!(processed("ignored"), drained.ignored as f64);
    assert_eq!(processed("dead"), 1.0);
    assert_eq!(processed("retried"), 0.0, "zero-valued series exist too");

    // Upstream requests and rate limits, by source and status.
    assert!(
        get(
            &m,
            r#"patient_sync_upstream_requests_total{source="healthie",status="200"}"#
        ) >= 2.0
    );
    let limited = get(
        &m,
        r#"patient_sync_upstream_requests_total{source="healthie",status="429"}"#,
    );
    assert!(
        limited >= 1.0,
        "the second request within a second is refused"
    );
    assert_eq!(
        get(
            &m,
            r#"patient_sync_upstream_rate_limited_total{source="healthie",status="429"}"#
        ),
        limited
    );
    assert_eq!(
        limited,
        sandbox
            .healthie_counters()
            .rate_limited
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
        "every refusal the server sent is counted"
    );
    assert!(
        get(
            &m,
            r#"patient_sync_rate_limit_wait_seconds_count{source="healthie"}"#
        ) >= 1.0
    );
    assert!(
        get(
            &m,
            r#"patient_sync_rate_limit_wait_seconds_sum{source="healthie"}"#
        ) >= 1.0
    );

    // Queue depth by state and the oldest pending age agree with the store.
    let counts = store.inbox_counts().await.unwrap();
    for state in InboxState::ALL {
        let expected = counts
            .iter()
            .filter(|c| c.source == SourceKind::Healthie && c.state == state)
            .map(|c| c.count)
            .sum::<i64>();
        assert_eq!(
            get(
                &m,
                &format!(
                    r#"patient_sync_inbox_items{{source="healthie",state="{}"}}"#,
                    state.as_str()
                )
            ),
            expected as f64,
            "{state:?}"
        );
    }
    assert_eq!(
        get(
            &m,
            r#"patient_sync_inbox_items{source="healthie",state="pending"}"#
        ),
        0.0
    );
    assert_eq!(
        get(&m, "patient_sync_inbox_oldest_pending_age_seconds"),
        0.0
    );

    // Processing latency: one observation per finished item, cumulative buckets.
    let count = get(
        &m,
        r#"patient_sync_event_latency_seconds_count{source="healthie"}"#,
    );
    assert_eq!(count, drained.done as f64);
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with(r#"patient_sync_event_latency_seconds_bucket{source="healthie""#)
        })
        .map(|(_, v)| *v)
        .collect();
    assert!(buckets.len() > 5);
    assert_eq!(
        get(
            &m,
            r#"patient_sync_event_latency_seconds_bucket{source="healthie",le="+Inf"}"#
        ),
        count
    );
    assert!(buckets.iter().all(|b| *b <= count));
    assert!(text.contains("# TYPE patient_sync_event_latency_seconds histogram"));
    assert!(text.contains("# TYPE patient_sync_events_received_total counter"));
    assert!(text.contains("# TYPE patient_sync_inbox_items gauge"));

    // No PHI in labels: every label value is a short token, and no person's data appears.
    for series in m.keys() {
        if let Some((_, labels)) = series.split_once('{') {
            for pair in labels.trim_end_matches('}').split(',') {
                let (_, value) = pair.split_once('=').unwrap();
                let value = value.trim_matches('"');
                assert!(
                    value.len() <= 24
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c)),
                    "label value {value:?} in {series}"
                );
            }
        }
    }
    let pop = sandbox.population().read().unwrap();
    for id in &ids {
        let user = pop.healthie_user(id).unwrap();
        for field in ["first_name", "last_name", "email", "phone_number", "dob"] {
            if let Some(v) = user.get(field).and_then(|v| v.as_str()) {
                if v.len() >= 4 {
                    assert!(!text.contains(v), "{field} of a patient is in /metrics");
                }
            }
        }
    }
    drop(pop);
    shutdown.cancel();
}
