//! Resync benchmark: a sandbox where every one of N people (default 20,000) is a patient in
//! Healthie, IntakeQ and Hint, and a full resync of each source in turn into a fresh SQLite file
//! through the real clients with the configured rate limits. The sandbox enforces the same limit
//! as the client (Healthie: `requests_per_second` with `burst`; Hint: 20 a second; IntakeQ: the
//! per-minute limit given below) and counts the requests it answered rate-limited.
//!
//! For each source, a first pass into an empty store and a second pass over it (nothing
//! changed), it prints wall time, pages, requests, the lower bound (pages / allowed rate),
//! their ratio (target <= 1.10), the rate-limited answers (target 0) and the CPU time the
//! process used (the sandbox's included), then the machine.
//!
//! `cargo run --release --example resync_bench -- [people] [intakeq_requests_per_minute] [sources]`
//!
//! `sources` is a comma-separated subset run in that order (default `healthie,intakeq,hint`).
//! `RESYNC_BENCH_DB=PATH` keeps the SQLite store in PATH instead of a temporary directory.
//!
//! IntakeQ's real limit is 10 requests a minute (20,000 patients: 200 pages, 20 minutes); the
//! default here is 600 a minute so the run takes seconds; the bound scales with it.

use std::sync::Arc;
use std::time::Instant;

use patient_sync::config::Settings;
use patient_sync::metrics::Metrics;
use patient_sync::model::SourceKind;
use patient_sync::sandbox::healthie::{HealthieConfig, RateLimit};
use patient_sync::sandbox::population::{Membership, PopulationConfig};
use patient_sync::sandbox::{Sandbox, SandboxConfig, HINT_API_KEY, INTAKEQ_API_KEY};
use patient_sync::store;
use patient_sync::sync::resync::{run_resync, Lister, Progress, ResyncOptions, ResyncOutcome};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let people: usize = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let intakeq_per_minute: u32 = args.next().map_or(Ok(600), |a| a.parse())?;
    let sources: Vec<SourceKind> = args
        .next()
        .unwrap_or_else(|| "healthie,intakeq,hint".into())
        .split(',')
        .map(|s| s.parse::<SourceKind>())
        .collect::<Result<_, _>>()?;

    let defaults = Settings::load_from(None, &[])?;
    let healthie_rate = defaults.sources.healthie.requests_per_second;
    let healthie_burst = defaults.sources.healthie.burst;
    let generated = Instant::now();
    let sandbox = Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people,
            seed: 2026,
            membership: Membership {
                healthie_only: 0.0,
                intakeq_only: 0.0,
                hint_only: 0.0,
                healthie_intakeq: 0.0,
                healthie_hint: 0.0,
                intakeq_hint: 0.0,
                all_three: 1.0,
            },
            ..Default::default()
        },
        healthie: HealthieConfig {
            rate_limit: Some(RateLimit {
                requests_per_second: f64::from(healthie_rate),
                burst: healthie_burst,
            }),
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    sandbox
        .intakeq()
        .clone()
        .with_limits(intakeq_per_minute, 1_000_000);
    let (healthie_users, intakeq_clients, hint_patients) = {
        let pop = sandbox.population().read().unwrap();
        (
            pop.healthie_users().count(),
            pop.intakeq_clients().count(),
            sandbox.hint().patients().len(),
        )
    };
    println!(
        "sandbox: {people} people: {healthie_users} Healthie users, {intakeq_clients} IntakeQ clients, {hint_patients} Hint patients (generated in {:.1}s)",
        generated.elapsed().as_secs_f64()
    );

    // `RESYNC_BENCH_DB=PATH` keeps the store in PATH (kept afterwards), so a later run can
    // start from it (for example Hint's pass into a copy of a store holding the other two).
    let dir = tempfile::tempdir()?;
    let db_path = std::env::var("RESYNC_BENCH_DB")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("resync.sqlite"));
    let db_url = format!("sqlite:{}", db_path.display());
    let env: Vec<(String, String)> = [
        ("PATIENT_SYNC_DATABASE__URL", db_url.clone()),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_URL",
            sandbox.healthie_url(),
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
            HealthieConfig::default().api_key,
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
            intakeq_per_minute.to_string(),
        ),
        (
            "PATIENT_SYNC_SOURCES__INTAKEQ__REQUESTS_PER_DAY",
            "1000000".into(),
        ),
        ("PATIENT_SYNC_SOURCES__HINT__ENABLED", "true".into()),
        ("PATIENT_SYNC_SOURCES__HINT__BASE_URL", sandbox.hint_url()),
        ("PATIENT_SYNC_SOURCES__HINT__API_KEY", HINT_API_KEY.into()),
        ("PATIENT_SYNC_LOG__LEVEL", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    // `PATIENT_SYNC_RATE_LIMIT__SHARED=false` measures without the shared (database) limiter.
    .chain(
        std::env::var("PATIENT_SYNC_RATE_LIMIT__SHARED")
            .ok()
            .map(|v| ("PATIENT_SYNC_RATE_LIMIT__SHARED".to_string(), v)),
    )
    .collect();
    let settings = Settings::load_from(None, &env)?;
    println!("shared rate limiter: {}", settings.rate_limit.shared);
    let store = store::connect(&db_url, settings.database.max_connections).await?;
    store.migrate().await?;
    let identity = settings.identity.to_identity_settings();

    println!(
        "{:<9} {:<6} {:>8} {:>6} {:>8} {:>9} {:>8} {:>9} {:>7} {:>12} {:>9} {:>7} {:>10}",
        "source",
        "pass",
        "records",
        "pages",
        "requests",
        "rate/s",
        "wall s",
        "bound s",
        "ratio",
        "rate-limited",
        "waited s",
        "cpu s",
        "read ahead"
    );
    // Per source: a first pass into the empty store (every record created), then a second pass
    // (every record unchanged), the steady state of a periodic resync.
    let runs = sources
        .into_iter()
        .flat_map(|kind| [(kind, "first"), (kind, "second")]);
    for (kind, pass) in runs {
        let metrics = Arc::new(Metrics::new());
        let lister = Lister::from_settings(&settings, kind, metrics.clone());
        // As `patient-sync resync` does: the limits shared through the database when configured.
        patient_sync::app::share_rate_limits(&settings, &store, [lister.source()]);
        let options = ResyncOptions::from_settings(&settings, &lister, false, false);
        let limited_before = sandbox_rate_limited(&sandbox, kind);
        let started = Instant::now();
        let cpu_before = patient_sync::machine::cpu_seconds();
        let summary = run_resync(
            store.as_ref(),
            &lister,
            &identity,
            &options,
            &metrics,
            &CancellationToken::new(),
            &Progress::quiet(),
        )
        .await?;
        let wall = started.elapsed().as_secs_f64();
        let cpu = match (cpu_before, patient_sync::machine::cpu_seconds()) {
            (Some(a), Some(b)) => format!("{:.1}", b - a),
            _ => "n/a".to_string(),
        };
        assert_eq!(summary.outcome, ResyncOutcome::Completed);
        let rate = options.allowed_rate;
        // The lower bound: every page is one request, sent at the allowed rate.
        let bound = summary.pages as f64 / rate;
        println!(
            "{:<9} {:<6} {:>8} {:>6} {:>8} {:>9.2} {:>8.1} {:>9.1} {:>7.3} {:>12} {:>9.1} {:>7} {:>10}",
            kind.as_str(),
            pass,
            summary.records,
            summary.pages,
            summary.requests,
            rate,
            wall,
            bound,
            wall / bound,
            sandbox_rate_limited(&sandbox, kind) - limited_before,
            summary.rate_limit_wait_secs,
            cpu,
            summary.read_ahead_pages
        );
        assert_eq!(
            summary.created + summary.updated + summary.unchanged + summary.stale,
            summary.records - summary.rejected
        );
    }
    let patients: i64 = store.count_patients().await?.iter().map(|(_, n)| n).sum();
    println!("patients: {patients} canonical rows");
    println!("machine: {}", patient_sync::machine::describe());
    Ok(())
}

fn sandbox_rate_limited(sandbox: &patient_sync::sandbox::SandboxHandle, kind: SourceKind) -> u64 {
    match kind {
        SourceKind::Healthie => sandbox.healthie_counters().snapshot().rate_limited,
        SourceKind::Intakeq => sandbox.intakeq().counters().rate_limited,
        SourceKind::Hint => sandbox.hint().counters().rate_limited,
    }
}
