//! The sandbox: fake Healthie, IntakeQ and Hint servers faithful to the reference, a synthetic
//! population with ground truth, and a sender of correctly signed webhooks. Pointing the
//! service at the real APIs instead is only a change of URLs and keys.
//!
//! Routes on one listener: `POST /graphql` (Healthie), `/intakeq/api/v1/...` (IntakeQ) and
//! `/hint/api/provider/...` (Hint). The Healthie fake reads the shared population live; the
//! IntakeQ and Hint fakes start from the population's records and are changed through their own
//! handles.

pub mod faults;
pub mod graphql;
pub mod healthie;
pub mod hint;
pub mod intakeq;
pub mod population;
pub mod webhooks;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use healthie::{HealthieConfig, HealthieCounters, HealthieCountersSnapshot};
pub use hint::HintSandbox;
pub use intakeq::IntakeqSandbox;

/// The key the IntakeQ fake expects in `X-Auth-Key`.
pub const INTAKEQ_API_KEY: &str = "sandbox-intakeq-key";
/// The practice key the Hint fake expects as `Bearer`.
pub const HINT_API_KEY: &str = "sandbox-hint-key";
pub use population::{PersonId, Population, PopulationConfig};

/// The population the fake servers read and mutations write.
pub type SharedPopulation = Arc<RwLock<Population>>;

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub population: PopulationConfig,
    pub healthie: HealthieConfig,
    /// Where `Sandbox::start` listens; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Faults the IntakeQ and Hint fakes inject (Healthie's are in `healthie.faults`).
    pub intakeq_faults: faults::Faults,
    pub hint_faults: faults::Faults,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            population: PopulationConfig::default(),
            healthie: HealthieConfig::default(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            intakeq_faults: faults::Faults::default(),
            hint_faults: faults::Faults::default(),
        }
    }
}

/// The fake servers behind one router.
pub struct Fakes {
    pub router: Router,
    pub healthie_counters: Arc<HealthieCounters>,
    pub intakeq: IntakeqSandbox,
    pub hint: HintSandbox,
    /// Faults injected by the IntakeQ and Hint fakes (Healthie's are in its counters).
    pub intakeq_faults: Arc<faults::FaultInjector>,
    pub hint_faults: Arc<faults::FaultInjector>,
}

impl SandboxConfig {
    /// Sets every fake's faults at once.
    pub fn with_faults(mut self, all: faults::SourceFaults) -> Self {
        self.healthie.faults = all.healthie;
        self.intakeq_faults = all.intakeq;
        self.hint_faults = all.hint;
        self
    }
}

/// IntakeQ's rate-limit answer: a bare 429.
fn intakeq_rate_limited() -> axum::response::Response {
    use axum::response::IntoResponse;
    axum::http::StatusCode::TOO_MANY_REQUESTS.into_response()
}

/// Hint's rate-limit answer: 429 `Enhance your calm`, no `Retry-After`.
fn hint_rate_limited() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        axum::Json(serde_json::json!({"status": 429, "message": "Enhance your calm"})),
    )
        .into_response()
}

/// The sandbox's routes over an existing population.
pub fn router(population: SharedPopulation, config: &SandboxConfig) -> Fakes {
    let (clients, patients) = {
        let pop = population.read().unwrap_or_else(|e| e.into_inner());
        (
            pop.intakeq_clients().cloned().collect(),
            pop.hint_patients().cloned().collect(),
        )
    };
    let intakeq = IntakeqSandbox::new(INTAKEQ_API_KEY, clients);
    let hint = HintSandbox::new(HINT_API_KEY, patients);
    let (healthie, healthie_counters) = healthie::router(population, config.healthie.clone());
    let intakeq_faults = Arc::new(faults::FaultInjector::new(config.intakeq_faults.clone()));
    let hint_faults = Arc::new(faults::FaultInjector::new(config.hint_faults.clone()));
    let router = Router::new()
        .merge(healthie)
        .nest(
            "/intakeq/api/v1",
            faults::inject(
                intakeq.router(),
                intakeq_faults.clone(),
                intakeq_rate_limited,
            ),
        )
        .nest(
            "/hint",
            faults::inject(hint.router(), hint_faults.clone(), hint_rate_limited),
        );
    Fakes {
        router,
        healthie_counters,
        intakeq,
        hint,
        intakeq_faults,
        hint_faults,
    }
}

/// Serves `router` on an ephemeral loopback port for a unit test; returns
/// `http://127.0.0.1:PORT`.
#[cfg(test)]
pub(crate) async fn serve_for_test(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

async fn generate(config: &PopulationConfig) -> io::Result<Population> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || Population::generate(&config))
        .await
        .map_err(io::Error::other)
}

pub struct Sandbox;

impl Sandbox {
    /// Generates the population, binds `config.listen` and serves until shut down.
    pub async fn start(config: SandboxConfig) -> io::Result<SandboxHandle> {
        let population = generate(&config.population).await?;
        Self::start_with_population(config, population).await
    }

    /// Serves an already generated (or mutated) population; `config.population` is unused.
    pub async fn start_with_population(
        config: SandboxConfig,
        population: Population,
    ) -> io::Result<SandboxHandle> {
        let population: SharedPopulation = Arc::new(RwLock::new(population));
        let Fakes {
            router: app,
            healthie_counters,
            intakeq,
            hint,
            intakeq_faults,
            hint_faults,
        } = router(population.clone(), &config);
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    rx.await.ok();
                })
                .await
        });
        Ok(SandboxHandle {
            addr,
            population,
            healthie_counters,
            intakeq,
            hint,
            intakeq_faults,
            hint_faults,
            shutdown: Some(tx),
            task: Some(task),
        })
    }
}

/// A running sandbox. Dropping it asks the server to stop; `shutdown` also waits for it.
pub struct SandboxHandle {
    addr: SocketAddr,
    population: SharedPopulation,
    healthie_counters: Arc<HealthieCounters>,
    intakeq: IntakeqSandbox,
    hint: HintSandbox,
    intakeq_faults: Arc<faults::FaultInjector>,
    hint_faults: Arc<faults::FaultInjector>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl SandboxHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The value for `sources.healthie.api_url`.
    pub fn healthie_url(&self) -> String {
        format!("{}/graphql", self.base_url())
    }

    /// The value for `sources.intakeq.base_url`.
    pub fn intakeq_url(&self) -> String {
        format!("{}/intakeq/api/v1", self.base_url())
    }

    /// The value for `sources.hint.base_url`.
    pub fn hint_url(&self) -> String {
        format!("{}/hint", self.base_url())
    }

    pub fn intakeq(&self) -> &IntakeqSandbox {
        &self.intakeq
    }

    pub fn hint(&self) -> &HintSandbox {
        &self.hint
    }

    pub fn population(&self) -> &SharedPopulation {
        &self.population
    }

    pub fn healthie_counters(&self) -> &Arc<HealthieCounters> {
        &self.healthie_counters
    }

    /// Faults injected so far by one fake.
    pub fn faults_injected(&self, source: crate::model::SourceKind) -> u64 {
        use crate::model::SourceKind;
        match source {
            SourceKind::Healthie => self.healthie_counters.snapshot().faults_injected,
            SourceKind::Intakeq => self.intakeq_faults.injected(),
            SourceKind::Hint => self.hint_faults.injected(),
        }
    }

    /// Stops accepting connections, lets in-flight requests finish, and waits.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves the sandbox on `listen` (not `config.listen`) until `shutdown` completes: the
/// `patient-sync sandbox` subcommand.
pub async fn run(
    config: SandboxConfig,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let population = generate(&config.population).await?;
    let population: SharedPopulation = Arc::new(RwLock::new(population));
    let app = router(population, &config).router;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "sandbox listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sandbox_binds_a_free_port_and_shuts_down_gracefully() {
        let sb = Sandbox::start(SandboxConfig {
            population: PopulationConfig {
                people: 20,
                ..PopulationConfig::default()
            },
            ..SandboxConfig::default()
        })
        .await
        .unwrap();
        assert_ne!(sb.addr().port(), 0);
        assert!(sb.healthie_url().ends_with("/graphql"));
        assert_eq!(sb.population().read().unwrap().persons().len(), 20);
        let url = sb.healthie_url();
        sb.shutdown().await.unwrap();
        assert!(reqwest::Client::new().post(&url).send().await.is_err());
    }
}
