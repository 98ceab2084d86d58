//! The Healthie path end to end: signed webhook -> inbox -> GraphQL refetch -> patients.

use std::collections::BTreeSet;

use patient_sync::model::SourceKind;
use patient_sync::sandbox::webhooks::{healthie_storm, HealthieEnvelope, StormConfig};
use patient_sync::store::InboxState;

use crate::app::spawn_app;
use crate::helpers::Db;

fn text(v: &serde_json::Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

async fn a_signed_webhook_lands_in_patients_with_the_fetched_fields(db: Db) {
    let app = spawn_app(db, 40).await;
    let id = app.healthie_ids(1).await.remove(0);
    let status = app
        .sender()
        .send(&HealthieEnvelope::patient("patient.created", &id, vec![]))
        .await
        .unwrap();
    assert_eq!(status, 202);
    let summary = app.worker.drain().await.unwrap();
    assert_eq!((summary.done, summary.dead), (1, 0));

    let user = app.healthie_user(&id).await;
    let row = app
        .patient_of(SourceKind::Healthie, &id)
        .await
        .expect("a canonical patient");
    let expected_given = text(&user, "legal_name").or_else(|| text(&user, "first_name"));
    assert_eq!(row.given_name, expected_given);
    assert_eq!(row.family_name, text(&user, "last_name"));
    assert_eq!(
        row.birth_date.map(|d| d.to_string()),
        text(&user, "dob").map(|d| d[..10].to_string())
    );
    assert_eq!(row.email, text(&user, "email").map(|e| e.to_lowercase()));
    assert_eq!(row.healthie_id.as_deref(), Some(id.as_str()));
    let expected_status = if user["active"].as_bool() == Some(false) {
        "archived"
    } else {
        "active"
    };
    assert_eq!(row.status, expected_status);
    let provenance = app.store.load_field_sources(&row.patient_id).await.unwrap();
    assert!(provenance
        .iter()
        .all(|f| f.key.source == SourceKind::Healthie && f.key.id.as_str() == id));
    assert!(provenance.iter().any(|f| f.field == "family_name"));
    assert_eq!(
        app.sandbox
            .healthie_counters()
            .user_fields_clear_notifs_false
            .load(std::sync::atomic::Ordering::Relaxed),
        app.sandbox
            .healthie_counters()
            .user_fields
            .load(std::sync::atomic::Ordering::Relaxed),
        "every user(id:) passes clear_notifs: false"
    );
}

async fn a_one_byte_change_to_body_digest_or_path_is_rejected_and_stores_nothing(db: Db) {
    let app = spawn_app(db, 10).await;
    let id = app.healthie_ids(1).await.remove(0);
    let sender = app.sender();
    let envelope = HealthieEnvelope::patient("patient.updated", &id, vec!["email".into()]);

    let mut body_changed = sender.delivery(&envelope);
    let last = body_changed.body.len() - 2;
    body_changed.body[last] ^= 0x01;
    assert_eq!(sender.send_delivery(&body_changed).await.unwrap(), 401);

    let mut digest_changed = sender.delivery(&envelope);
    let mut digest = digest_changed.content_digest.into_bytes();
    digest[10] = if digest[10] == b'A' { b'B' } else { b'A' };
    digest_changed.content_digest = String::from_utf8(digest).unwrap();
    assert_eq!(sender.send_delivery(&digest_changed).await.unwrap(), 401);

    let path_changed = app.sender().with_public_path("/webhooks/healthiE");
    assert_eq!(path_changed.send(&envelope).await.unwrap(), 401);

    assert_eq!(app.inbox_total().await, 0, "nothing stored");
    assert_eq!(
        sender.send(&envelope).await.unwrap(),
        202,
        "the untouched delivery passes"
    );
    assert_eq!(app.inbox_total().await, 1);
}

async fn duplicates_and_reordering_make_one_patient_per_user_and_coalesce_fetches(db: Db) {
    let app = spawn_app(db, 60).await;
    let envelopes = {
        let mut pop = app.sandbox.population().write().unwrap();
        healthie_storm(
            &mut pop,
            &StormConfig {
                creates: 15,
                updates: 40,
                merges: 0,
                ..Default::default()
            },
        )
    };
    let sender = app.sender();
    let mut users = BTreeSet::new();
    for e in &envelopes {
        let status = sender.send(e).await.unwrap();
        assert!(status == 202, "status {status}");
        if let Some(u) = e.user_id() {
            users.insert(u);
        }
    }
    let summary = app.worker.drain().await.unwrap();
    assert_eq!(summary.dead, 0);
    let counts = app.store.inbox_counts().await.unwrap();
    assert!(counts
        .iter()
        .all(|c| matches!(c.state, InboxState::Done | InboxState::Ignored)));
    for u in &users {
        let row = app.patient_of(SourceKind::Healthie, u).await;
        assert!(row.is_some(), "every touched user has a canonical patient");
    }
    let requests = app
        .sandbox
        .healthie_counters()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (requests as usize) < envelopes.len(),
        "{requests} GraphQL requests for {} events",
        envelopes.len()
    );
    // Re-delivering everything changes nothing.
    let before: Vec<_> = {
        let mut v = Vec::new();
        for u in &users {
            v.push(app.patient_of(SourceKind::Healthie, u).await.unwrap());
        }
        v
    };
    for e in &envelopes {
        sender.send(e).await.unwrap();
    }
    app.worker.drain().await.unwrap();
    for (u, old) in users.iter().zip(before) {
        let now = app.patient_of(SourceKind::Healthie, u).await.unwrap();
        assert_eq!(now.version, old.version, "redelivery is harmless");
        assert_eq!(now, old);
    }
}

async fn test_and_unknown_events_are_recorded_as_ignored(db: Db) {
    let app = spawn_app(db, 5).await;
    let sender = app.sender();
    assert_eq!(
        sender
            .send(&HealthieEnvelope::test_created("1"))
            .await
            .unwrap(),
        202
    );
    let unknown = HealthieEnvelope::patient("appointment.created", "77", vec![]);
    assert_eq!(sender.send(&unknown).await.unwrap(), 202);
    let counts = app.store.inbox_counts().await.unwrap();
    assert_eq!(counts.len(), 1);
    assert_eq!((counts[0].state, counts[0].count), (InboxState::Ignored, 2));
}

crate::on_both_backends!(
    a_signed_webhook_lands_in_patients_with_the_fetched_fields,
    a_one_byte_change_to_body_digest_or_path_is_rejected_and_stores_nothing,
    duplicates_and_reordering_make_one_patient_per_user_and_coalesce_fetches,
    test_and_unknown_events_are_recorded_as_ignored,
);
