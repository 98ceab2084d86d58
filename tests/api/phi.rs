//! No PHI in logs: a full `sync` of all three sandbox sources with every log level on
//! (`RUST_LOG=trace`, dependencies included) must not print any name, email, phone, date of
//! birth or street address that ends up in the canonical table.

use std::process::Command;

use patient_sync::sandbox::healthie::Faults;
use patient_sync::store;

use crate::app::{start_sandbox, three_source_env};

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_at_trace_level_logs_no_phi() {
    let sandbox = start_sandbox(30, 21, Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("phi.sqlite").display());
    let env = three_source_env(&sandbox, &db_url);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("sync")
            .envs(env)
            .env("RUST_LOG", "trace")
            .env("PATIENT_SYNC_LOG__FORMAT", "json")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "sync failed");
    let logs = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(logs.lines().count() > 100, "trace logging was on");

    let store = store::connect(&db_url, 2).await.unwrap();
    let counts = store.count_patients().await.unwrap();
    assert!(counts.iter().map(|(_, n)| n).sum::<i64>() > 10);
    let mut checked = 0;
    let pop_values: Vec<String> = {
        let pop = sandbox.population().read().unwrap();
        pop.healthie_users()
            .flat_map(|u| {
                ["last_name", "email", "dob", "phone_number"]
                    .iter()
                    .filter_map(|k| u.get(*k).and_then(|v| v.as_str()).map(str::to_string))
                    .chain(u["location"]["line1"].as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .chain(pop.hint_patients().flat_map(|p| {
                ["last_name", "email", "dob", "address_line1"]
                    .iter()
                    .filter_map(|k| p.get(*k).and_then(|v| v.as_str()).map(str::to_string))
                    .collect::<Vec<_>>()
            }))
            .chain(pop.intakeq_clients().flat_map(|c| {
                ["LastName", "Email", "StreetAddress", "Phone"]
                    .iter()
                    .filter_map(|k| c.get(*k).and_then(|v| v.as_str()).map(str::to_string))
                    .collect::<Vec<_>>()
            }))
            .filter(|v| v.trim().len() >= 5)
            .collect()
    };
    for value in &pop_values {
        checked += 1;
        assert!(
            !logs.contains(value.as_str()),
            "a log line carries PHI ({} chars)",
            value.len()
        );
    }
    assert!(checked > 50, "checked {checked} values");
}
