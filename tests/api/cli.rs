//! The binary as an operator uses it: `sync` from cron, `status --json`, `check-config`,
//! `dead-letters`, and configuration errors that name their key.

use std::process::{Command, Output};

use patient_sync::sandbox::healthie::Faults;

use crate::app::{start_sandbox, three_source_env};

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

fn run(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("PATIENT_SYNC_LOG__LEVEL", "warn")
        .output()
        .expect("run patient-sync")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_from_cron_twice_is_idempotent_and_status_reports_it() {
    let sandbox = start_sandbox(40, 9, Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("cron.sqlite").display());
    let env = three_source_env(&sandbox, &db_url);

    let env2 = env.clone();
    let first = tokio::task::spawn_blocking(move || run(&["sync"], &env2))
        .await
        .unwrap();
    assert!(
        first.status.success(),
        "first sync: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    let status = |env: Vec<(String, String)>| async move {
        let out = tokio::task::spawn_blocking(move || run(&["status", "--json"], &env))
            .await
            .unwrap();
        assert!(out.status.success());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let after_first = status(env.clone()).await;
    let env2 = env.clone();
    let second = tokio::task::spawn_blocking(move || run(&["sync"], &env2))
        .await
        .unwrap();
    assert!(
        second.status.success(),
        "second sync: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    let after_second = status(env.clone()).await;

    assert_eq!(
        after_first["patients"], after_second["patients"],
        "the second run changes no patient counts"
    );
    assert_eq!(after_second["dead_letters"], 0);
    assert!(after_second["oldest_pending_age_secs"].is_null());
    let budgets = after_second["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 1);
    assert_eq!(budgets[0][0], "intakeq");
    assert!(budgets[0][1]["used"].as_u64().unwrap() >= 2, "{budgets:?}");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        stdout.contains("poll intakeq: 0 new items queued"),
        "{stdout}"
    );
}

#[test]
fn check_config_redacts_secrets_and_bad_values_name_their_key() {
    let env = vec![(
        "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY".to_string(),
        "very-secret-key".to_string(),
    )];
    let out = run(&["check-config"], &env);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[redacted]") && !text.contains("very-secret-key"));

    let bad = vec![(
        "PATIENT_SYNC_WORKER__LEASE_SECS".to_string(),
        "0".to_string(),
    )];
    let out = run(&["check-config"], &bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker.lease_secs"));
}

#[test]
fn dead_letters_can_be_listed_and_retried_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![(
        "PATIENT_SYNC_DATABASE__URL".to_string(),
        format!("sqlite:{}", dir.path().join("dl.sqlite").display()),
    )];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = patient_sync::store::connect(&env[0].1, 2).await.unwrap();
        store.migrate().await.unwrap();
        store
            .insert_inbox(&patient_sync::store::NewInboxItem {
                source: patient_sync::model::SourceKind::Healthie,
                origin: patient_sync::store::Origin::Webhook,
                event_type: "patient.updated".into(),
                resource_type: Some("User".into()),
                resource_id: Some("42".into()),
                body: r#"{"first_name":"Secret"}"#.into(),
                dedupe_key: None,
                received_at_ms: 1,
                ignore_reason: None,
            })
            .await
            .unwrap();
        let item = store
            .claim_inbox("t", 1, std::time::Duration::from_secs(60), 2)
            .await
            .unwrap();
        store
            .dead_inbox(item[0].id, "t", "auth", Some(401), 3)
            .await
            .unwrap();
    });
    let out = run(&["dead-letters", "list", "--json"], &env);
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["error_kind"], "auth");
    assert_eq!(listed[0]["http_status"], 401);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Secret"),
        "no payloads in the listing"
    );
    let out = run(&["dead-letters", "retry", "--all"], &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("requeued 1"));
    let out = run(&["dead-letters", "list", "--json"], &env);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
}
