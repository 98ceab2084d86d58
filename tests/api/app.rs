//! A running application for tests: the fake Healthie sandbox, the receiver on port 0, and a
//! worker the test drives with `drain` (no background workers, no sleeps).

use std::sync::Arc;

use patient_sync::app::Application;
use patient_sync::config::Settings;
use patient_sync::model::{SourceKey, SourceKind};
use patient_sync::sandbox::healthie::{Faults, HealthieConfig};
use patient_sync::sandbox::population::PopulationConfig;
use patient_sync::sandbox::webhooks::WebhookSender;
use patient_sync::sandbox::{Sandbox, SandboxConfig, SandboxHandle, HINT_API_KEY, INTAKEQ_API_KEY};
use patient_sync::store::{PatientRow, Store};
use patient_sync::sync::worker::Worker;
use tokio_util::sync::CancellationToken;

use crate::helpers::{database, Db, TestDb};

pub const WEBHOOK_SECRET: &str = "whsec_test_secret";

pub struct TestApp {
    pub address: String,
    pub store: Arc<dyn Store>,
    pub worker: Worker,
    pub sandbox: Option<SandboxHandle>,
    /// Keeps the database (a SQLite file) alive as long as the app.
    pub _db: TestDb,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Settings for a test: everything local, secrets in the given environment.
pub fn settings_for(db_url: &str, healthie_url: &str, extra: &[(&str, &str)]) -> Settings {
    let mut env: Vec<(String, String)> = vec![
        ("PATIENT_SYNC_DATABASE__URL".into(), db_url.into()),
        ("PATIENT_SYNC_SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_URL".into(),
            healthie_url.into(),
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY".into(),
            HealthieConfig::default().api_key,
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET".into(),
            WEBHOOK_SECRET.into(),
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__REQUESTS_PER_SECOND".into(),
            "1000".into(),
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__BURST".into(),
            "1000".into(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Settings::load_from(None, &env).expect("test settings are valid")
}

/// A sandbox with `people` synthetic people, no Healthie rate limit, and the given faults.
pub async fn start_sandbox(people: usize, seed: u64, faults: Faults) -> SandboxHandle {
    Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people,
            seed,
            ..Default::default()
        },
        healthie: HealthieConfig {
            rate_limit: None,
            faults,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .expect("sandbox starts")
}

/// Environment for the binary with all three sources pointed at `sandbox`.
pub fn three_source_env(sandbox: &SandboxHandle, db_url: &str) -> Vec<(String, String)> {
    [
        ("PATIENT_SYNC_DATABASE__URL", db_url.to_string()),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_URL",
            sandbox.healthie_url(),
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
            HealthieConfig::default().api_key,
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__REQUESTS_PER_SECOND",
            "500".into(),
        ),
        ("PATIENT_SYNC_SOURCES__INTAKEQ__ENABLED", "true".into()),
        (
            "PATIENT_SYNC_SOURCES__INTAKEQ__BASE_URL",
            sandbox.intakeq_url(),
        ),
        (
            "PATIENT_SYNC_SOURCES__INTAKEQ__API_KEY",
            INTAKEQ_API_KEY.into(),
        ),
        (
            "PATIENT_SYNC_SOURCES__INTAKEQ__REQUESTS_PER_MINUTE",
            "6000".into(),
        ),
        ("PATIENT_SYNC_SOURCES__HINT__ENABLED", "true".into()),
        ("PATIENT_SYNC_SOURCES__HINT__BASE_URL", sandbox.hint_url()),
        ("PATIENT_SYNC_SOURCES__HINT__API_KEY", HINT_API_KEY.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

pub async fn spawn_app(db: Db, people: usize) -> TestApp {
    let db = database(db).await;
    let sandbox = start_sandbox(people, 11, Faults::default()).await;
    let mut app = spawn_app_on(db, &sandbox.healthie_url()).await;
    app.sandbox = Some(sandbox);
    app
}

/// An app against an already running sandbox (owned by the caller).
pub async fn spawn_app_with(db: Db, sandbox: &SandboxHandle) -> TestApp {
    spawn_app_on(database(db).await, &sandbox.healthie_url()).await
}

async fn spawn_app_on(db: TestDb, healthie_url: &str) -> TestApp {
    let settings = settings_for(&db.url, healthie_url, &[]);
    let app = Application::build(settings)
        .await
        .expect("application builds");
    let address = format!("http://{}", app.local_addr());
    let store = app.store();
    let worker = app.worker();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_receiver(shutdown.clone()));
    TestApp {
        address,
        store,
        worker,
        sandbox: None,
        _db: db,
        shutdown,
    }
}

impl TestApp {
    pub fn sandbox(&self) -> &SandboxHandle {
        self.sandbox.as_ref().expect("this app owns its sandbox")
    }

    pub fn sender(&self) -> WebhookSender {
        WebhookSender::new(
            format!("{}/webhooks/healthie", self.address)
                .parse()
                .unwrap(),
            WEBHOOK_SECRET.as_bytes().to_vec(),
        )
    }

    /// Some Healthie user ids of the sandbox population.
    pub async fn healthie_ids(&self, n: usize) -> Vec<String> {
        let pop = self.sandbox().population().read().unwrap();
        pop.healthie_users()
            .filter_map(|u| u.get("id").and_then(|v| v.as_str()).map(str::to_string))
            .take(n)
            .collect()
    }

    pub async fn healthie_user(&self, id: &str) -> serde_json::Value {
        self.sandbox()
            .population()
            .read()
            .unwrap()
            .healthie_user(id)
            .cloned()
            .expect("user exists")
    }

    pub async fn patient_of(&self, source: SourceKind, id: &str) -> Option<PatientRow> {
        let link = self
            .store
            .load_link(&SourceKey::new(source, id))
            .await
            .unwrap()?;
        self.store.load_patient(&link.patient_id).await.unwrap()
    }

    pub async fn inbox_total(&self) -> i64 {
        self.store
            .inbox_counts()
            .await
            .unwrap()
            .iter()
            .map(|c| c.count)
            .sum()
    }
}
