//! All three sources through the same path: one poll of each (IntakeQ and Hint send full
//! records, Healthie's sweep queues refetches), then a drain; a second poll queues nothing new.

use patient_sync::app::Application;
use patient_sync::config::Secret;
use patient_sync::model::{SourceKey, SourceKind};
use patient_sync::sandbox::healthie::Faults;
use patient_sync::sandbox::{HINT_API_KEY, INTAKEQ_API_KEY};
use patient_sync::store::InboxState;

use crate::app::{settings_for, start_sandbox};
use crate::helpers::{database, Db};

async fn one_sync_pass_brings_every_source_in_and_a_second_changes_nothing(db: Db) {
    let db = database(db).await;
    let sandbox = start_sandbox(60, 3, Faults::default()).await;
    let mut settings = settings_for(&db.url, &sandbox.healthie_url(), &[]);
    settings.sources.intakeq.enabled = true;
    settings.sources.intakeq.base_url = sandbox.intakeq_url();
    settings.sources.intakeq.api_key = Secret::new(INTAKEQ_API_KEY);
    settings.sources.intakeq.requests_per_minute = 6000;
    settings.sources.hint.enabled = true;
    settings.sources.hint.base_url = sandbox.hint_url();
    settings.sources.hint.api_key = Secret::new(HINT_API_KEY);
    let app = Application::build(settings).await.unwrap();

    for (source, result) in app.poll_all().await {
        assert!(result.unwrap().queued() > 0, "{source} queued records");
    }
    let summary = app.worker().drain().await.unwrap();
    assert_eq!(summary.dead, 0);
    let counts = app.store().inbox_counts().await.unwrap();
    assert!(
        counts.iter().all(|c| c.state == InboxState::Done),
        "{counts:?}"
    );

    let store = app.store();
    let (keys, truth) = {
        let pop = sandbox.population().read().unwrap();
        let keys: Vec<SourceKey> = pop
            .ground_truth()
            .keys()
            .filter(|k| {
                pop.table(k.source)
                    .get(k.id.as_str())
                    .is_some_and(|r| r.deleted_at.is_none())
            })
            .cloned()
            .collect();
        (keys, pop.ground_truth().clone())
    };
    for key in &keys {
        let link = store.load_link(key).await.unwrap();
        let link = link.unwrap_or_else(|| panic!("{key} is linked"));
        let row = store.load_patient(&link.patient_id).await.unwrap().unwrap();
        let column = match key.source {
            SourceKind::Healthie => &row.healthie_id,
            SourceKind::Intakeq => &row.intakeq_id,
            SourceKind::Hint => &row.hint_id,
        };
        assert!(
            column.is_some(),
            "{key}: the canonical row names a record of its source"
        );
    }
    // No automatic link joins two different people.
    let mut patient_of = std::collections::BTreeMap::new();
    for key in &keys {
        patient_of.insert(
            key.clone(),
            store.load_link(key).await.unwrap().unwrap().patient_id,
        );
    }
    for a in &keys {
        for b in &keys {
            if a < b && truth[a] != truth[b] {
                assert_ne!(
                    patient_of[a], patient_of[b],
                    "{a} and {b} are different people"
                );
            }
        }
    }
    let versions: Vec<_> = {
        let mut v = Vec::new();
        for key in &keys {
            let link = store.load_link(key).await.unwrap().unwrap();
            v.push(
                store
                    .load_patient(&link.patient_id)
                    .await
                    .unwrap()
                    .unwrap()
                    .version,
            );
        }
        v
    };

    let again: u64 = app
        .poll_all()
        .await
        .into_iter()
        .filter(|(s, _)| *s != SourceKind::Healthie)
        .map(|(_, r)| r.unwrap().queued())
        .sum();
    assert_eq!(
        again, 0,
        "a second poll of unchanged IntakeQ and Hint queues nothing"
    );
    app.worker().drain().await.unwrap();
    for (key, version) in keys.iter().zip(versions) {
        let link = store.load_link(key).await.unwrap().unwrap();
        assert_eq!(
            store
                .load_patient(&link.patient_id)
                .await
                .unwrap()
                .unwrap()
                .version,
            version
        );
    }
}

crate::on_both_backends!(one_sync_pass_brings_every_source_in_and_a_second_changes_nothing);
