//! No PHI in logs: a full `sync` of all three sandbox sources with every log level on
//! (`RUST_LOG=trace`, dependencies included) must not print any name, email, phone, date of
//! birth or street address that ends up in the canonical table.

use std::process::Command;

use patient_sync::sandbox::healthie::HealthieConfig;
use patient_sync::sandbox::population::PopulationConfig;
use patient_sync::sandbox::{Sandbox, SandboxConfig, HINT_API_KEY, INTAKEQ_API_KEY};
use patient_sync::store;

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_at_trace_level_logs_no_phi() {
    let sandbox = Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people: 30,
            seed: 21,
            ..Default::default()
        },
        healthie: HealthieConfig {
            rate_limit: None,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("phi.sqlite").display());
    let (healthie, intakeq, hint) = (
        sandbox.healthie_url(),
        sandbox.intakeq_url(),
        sandbox.hint_url(),
    );
    let url = db_url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("sync")
            .env("RUST_LOG", "trace")
            .env("PATIENT_SYNC_LOG__FORMAT", "json")
            .env("PATIENT_SYNC_DATABASE__URL", url)
            .env("PATIENT_SYNC_SOURCES__HEALTHIE__API_URL", healthie)
            .env(
                "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
                HealthieConfig::default().api_key,
            )
            .env("PATIENT_SYNC_SOURCES__HEALTHIE__REQUESTS_PER_SECOND", "500")
            .env("PATIENT_SYNC_SOURCES__INTAKEQ__ENABLED", "true")
            .env("PATIENT_SYNC_SOURCES__INTAKEQ__BASE_URL", intakeq)
            .env("PATIENT_SYNC_SOURCES__INTAKEQ__API_KEY", INTAKEQ_API_KEY)
            .env("PATIENT_SYNC_SOURCES__INTAKEQ__REQUESTS_PER_MINUTE", "6000")
            .env("PATIENT_SYNC_SOURCES__HINT__ENABLED", "true")
            .env("PATIENT_SYNC_SOURCES__HINT__BASE_URL", hint)
            .env("PATIENT_SYNC_SOURCES__HINT__API_KEY", HINT_API_KEY)
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
