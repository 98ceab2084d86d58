//! The application: the store, the sources, the receiver and the workers, wired from settings.
//! `Application::build` binds the listener first (port 0 in tests), so callers know the address
//! before anything runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::SourceKind;
use crate::receiver::{self, ReceiverState};
use crate::sources::{healthie::Healthie, hint::Hint, intakeq::Intakeq, Source};
use crate::store::{self, Store};
use crate::sync::apply::IdentitySettings;
use crate::sync::poll::{poll_source, PollError, PollSummary};
use crate::sync::worker::Worker;

/// Everything `serve` runs, built and ready.
pub struct Application {
    settings: Arc<Settings>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    sources: HashMap<SourceKind, Arc<dyn Source>>,
    identity: Arc<IdentitySettings>,
    listener: TcpListener,
}

/// Opens the store named by `database.url` and applies pending migrations.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    let store = store::connect(&settings.database.url, settings.database.max_connections)
        .await
        .context("cannot open the database named by database.url")?;
    store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    Ok(store)
}

/// The clients of every enabled source, sharing one rate limiter per credential.
pub fn build_sources(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> HashMap<SourceKind, Arc<dyn Source>> {
    let mut sources: HashMap<SourceKind, Arc<dyn Source>> = HashMap::new();
    if settings.sources.healthie.enabled {
        sources.insert(
            SourceKind::Healthie,
            Arc::new(Healthie::new(&settings.sources.healthie, metrics.clone())),
        );
    }
    if settings.sources.intakeq.enabled {
        sources.insert(
            SourceKind::Intakeq,
            Arc::new(Intakeq::new(&settings.sources.intakeq, metrics.clone())),
        );
    }
    if settings.sources.hint.enabled {
        sources.insert(
            SourceKind::Hint,
            Arc::new(Hint::new(&settings.sources.hint, metrics.clone())),
        );
    }
    sources
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let store = open_store(&settings).await?;
        let sources = build_sources(&settings, &metrics);
        share_rate_limits(&settings, &store, sources.values().map(|s| s.as_ref()));
        for kind in sources.keys() {
            metrics.init_source(kind.as_str());
        }
        restore_budgets(store.as_ref(), &sources).await?;
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (server.listen)",
                    settings.server.listen
                )
            })?;
        let identity = Arc::new(settings.identity.to_identity_settings());
        Ok(Self {
            settings: Arc::new(settings),
            store,
            metrics,
            sources,
            identity,
            listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn sources(&self) -> &HashMap<SourceKind, Arc<dyn Source>> {
        &self.sources
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Polls every enabled source once (incremental changes, deletions, Healthie's sweep),
    /// queueing what it finds. A failing source is logged and the others still run.
    pub async fn poll_all(&self) -> Vec<(SourceKind, Result<PollSummary, PollError>)> {
        poll_all(self.store.as_ref(), &self.sources, &self.metrics).await
    }

    /// A worker sharing this application's store, sources and limiters.
    pub fn worker(&self) -> Worker {
        Worker::new(
            self.store.clone(),
            self.sources.clone(),
            self.settings.worker.clone(),
            self.identity.clone(),
            self.metrics.clone(),
        )
    }

    fn router(&self) -> axum::Router {
        receiver::router(ReceiverState::new(
            self.store.clone(),
            self.settings.clone(),
            self.metrics.clone(),
        ))
    }

    /// Serves webhooks, health and metrics only, until `shutdown` fires. Tests use this and
    /// drive the queue themselves with [`Worker::drain`].
    pub async fn run_receiver(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let router = self.router();
        axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .context("http server failed")
    }

    /// Serves webhooks and runs the workers until `shutdown` fires; then stops accepting,
    /// lets workers finish their batch and release leases, and returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let addr = self.local_addr();
        let router = self.router();
        let mut workers = Vec::new();
        for _ in 0..self.settings.worker.concurrency {
            let worker = self.worker();
            let token = shutdown.clone();
            workers.push(tokio::spawn(async move { worker.run(token).await }));
        }
        info!(%addr, workers = workers.len(), sources = self.sources.len(), "Service started.");
        // Two pollers: IntakeQ and Hint every `poll.interval_secs`, Healthie's safety sweep
        // every `poll.healthie_sweep_interval_secs`.
        let (sweep, others): (HashMap<_, _>, HashMap<_, _>) = self
            .sources
            .clone()
            .into_iter()
            .partition(|(kind, _)| *kind == SourceKind::Healthie);
        let pollers: Vec<_> = [
            (others, self.settings.poll.interval_secs),
            (sweep, self.settings.poll.healthie_sweep_interval_secs),
        ]
        .into_iter()
        .filter(|(sources, secs)| !sources.is_empty() && *secs > 0)
        .map(|(sources, secs)| {
            let (store, metrics, token) =
                (self.store.clone(), self.metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_secs(secs));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = ticker.tick() => { poll_all(store.as_ref(), &sources, &metrics).await; }
                    }
                }
            })
        })
        .collect();
        let server_token = shutdown.clone();
        axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { server_token.cancelled().await })
            .await
            .context("http server failed")?;
        for poller in pollers {
            poller.abort();
        }
        let grace = Duration::from_secs(self.settings.worker.shutdown_grace_secs);
        let all = futures::future::join_all(workers);
        if tokio::time::timeout(grace, all).await.is_err() {
            warn!(
                grace_secs = grace.as_secs(),
                "Workers did not stop in time; their leases will expire."
            );
        }
        info!("Service stopped.");
        Ok(())
    }
}

/// Polls each source in turn; see [`Application::poll_all`].
async fn poll_all(
    store: &dyn Store,
    sources: &HashMap<SourceKind, Arc<dyn Source>>,
    metrics: &Metrics,
) -> Vec<(SourceKind, Result<PollSummary, PollError>)> {
    let mut kinds: Vec<SourceKind> = sources.keys().copied().collect();
    kinds.sort();
    let mut results = Vec::new();
    for kind in kinds {
        let result = poll_source(store, sources[&kind].as_ref(), metrics).await;
        match &result {
            Ok(summary) => info!(source = %kind, queued = summary.queued(), "Poll finished."),
            Err(e) => {
                warn!(source = %kind, error = %e, "Poll failed; it resumes from its cursor next time.")
            }
        }
        results.push((kind, result));
    }
    if let Err(e) = save_budgets(store, sources).await {
        warn!(error = %e, "Could not save the daily request budgets.");
    }
    results
}

/// The `sync_state` stream holding a source's daily request budget, shared by every process
/// using the credential and read by `status`.
pub const BUDGET_STREAM: &str = "daily_budget";

/// Saves each source's daily budget so the next process and `status` see it.
pub async fn save_budgets(
    store: &dyn Store,
    sources: &HashMap<SourceKind, Arc<dyn Source>>,
) -> Result<(), crate::store::StoreError> {
    for (kind, source) in sources {
        if let Some(budget) = source.budget() {
            let now = chrono::Utc::now();
            store
                .save_sync_state(&crate::store::SyncState {
                    source: *kind,
                    stream: BUDGET_STREAM.into(),
                    cursor: serde_json::to_string(&budget).ok(),
                    checkpoint: None,
                    last_success_at: None,
                    updated_at: now,
                })
                .await?;
        }
    }
    Ok(())
}

async fn restore_budgets(
    store: &dyn Store,
    sources: &HashMap<SourceKind, Arc<dyn Source>>,
) -> anyhow::Result<()> {
    for (kind, source) in sources {
        if source.budget().is_none() {
            continue;
        }
        let saved = store.load_sync_state(*kind, BUDGET_STREAM).await?;
        if let Some(snapshot) = saved
            .and_then(|s| s.cursor)
            .and_then(|c| serde_json::from_str::<crate::sources::http::BudgetSnapshot>(&c).ok())
        {
            source.restore_budget(&snapshot);
        }
    }
    Ok(())
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler succeeds");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("Shutdown requested.");
        cancel.cancel();
    });
    token
}

/// Shares the limits of every source's credential through `store` when `rate_limit.shared` is
/// on (see `sources::shared_limit`), so this process and every other one using the database
/// stay within each credential's limits together.
pub fn share_rate_limits<'a>(
    settings: &Settings,
    store: &Arc<dyn Store>,
    sources: impl IntoIterator<Item = &'a dyn Source>,
) {
    if !settings.rate_limit.shared {
        return;
    }
    let slots: Arc<dyn crate::sources::shared_limit::RateSlots> =
        Arc::new(crate::store::StoreRateSlots(store.clone()));
    for source in sources {
        if let Some(upstream) = source.upstream() {
            upstream.share_limits(slots.clone());
        }
    }
}
