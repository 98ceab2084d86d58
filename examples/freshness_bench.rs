//! Freshness benchmark: a steady stream of signed Healthie `patient.updated` webhooks (each for a
//! real change in the fake Healthie, which answers every request 50 ms late) into the whole
//! service (receiver, workers, default worker and Healthie settings) on a fresh SQLite file.
//! Freshness is the time from the receiver storing a delivery to the worker committing its
//! effect on the canonical row; both are stamped on the inbox item (`received_at_ms`,
//! `finished_at_ms`) and the canonical row commits in the same transaction as the finish.
//! Prints p50/p95/p99/max and the machine.
//!
//! `cargo run --release --example freshness_bench -- [EVENTS_PER_SEC] [SECONDS]` (defaults 20, 30);
//! `PATIENT_SYNC_*` variables override the settings (e.g. `PATIENT_SYNC_WORKER__CONCURRENCY=1`).

use std::time::{Duration, Instant};

use patient_sync::app::Application;
use patient_sync::config::Settings;
use patient_sync::sandbox::healthie::{Faults, HealthieConfig};
use patient_sync::sandbox::population::PopulationConfig;
use patient_sync::sandbox::webhooks::{HealthieEnvelope, WebhookSender};
use patient_sync::sandbox::{Sandbox, SandboxConfig};
use patient_sync::store::InboxState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_freshness_bench";
const UPSTREAM_LATENCY_MS: u64 = 50;

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rate: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(30);
    anyhow::ensure!(
        rate > 0 && seconds > 0,
        "EVENTS_PER_SEC and SECONDS must be positive"
    );

    let sandbox = Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people: 500,
            seed: 20,
            ..Default::default()
        },
        healthie: HealthieConfig {
            rate_limit: None,
            faults: Faults {
                slow_share: 1.0,
                slow_ms: UPSTREAM_LATENCY_MS,
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let ids: Vec<String> = sandbox
        .population()
        .read()
        .map_err(|_| anyhow::anyhow!("population lock poisoned"))?
        .healthie_users()
        .filter_map(|u| u["id"].as_str().map(str::to_string))
        .collect();

    let dir = tempfile::tempdir()?;
    let env: Vec<(String, String)> = [
        (
            "PATIENT_SYNC_DATABASE__URL",
            format!("sqlite:{}", dir.path().join("fresh.sqlite").display()),
        ),
        ("PATIENT_SYNC_SERVER__LISTEN", "127.0.0.1:0".into()),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_URL",
            sandbox.healthie_url(),
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
            HealthieConfig::default().api_key,
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET",
            SECRET.into(),
        ),
        ("PATIENT_SYNC_POLL__INTERVAL_SECS", "0".into()),
        (
            "PATIENT_SYNC_POLL__HEALTHIE_SWEEP_INTERVAL_SECS",
            "0".into(),
        ),
        ("PATIENT_SYNC_LOG__LEVEL", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    // `PATIENT_SYNC_*` variables in the environment override these, to compare settings.
    .chain(std::env::vars().filter(|(k, _)| k.starts_with("PATIENT_SYNC_")))
    .collect();
    let settings = Settings::load_from(None, &env)?;
    let worker_settings = settings.worker.clone();
    let healthie_rps = settings.sources.healthie.requests_per_second;
    let app = Application::build(settings).await?;
    let store = app.store();
    let url = format!("http://{}/webhooks/healthie", app.local_addr());
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let sender = WebhookSender::new(url.parse()?, SECRET.as_bytes().to_vec());

    // A steady rate: one change upstream and its webhook per tick.
    let mut rng = StdRng::seed_from_u64(20);
    let total = rate * seconds;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let started = Instant::now();
    for _ in 0..total {
        ticker.tick().await;
        let id = &ids[rng.gen_range(0..ids.len())];
        let changed = sandbox
            .population()
            .write()
            .map_err(|_| anyhow::anyhow!("population lock poisoned"))?
            .touch_healthie(id)
            .unwrap_or_default();
        let status = sender
            .send(&HealthieEnvelope::patient("patient.updated", id, changed))
            .await?;
        anyhow::ensure!(status.as_u16() == 202, "delivery answered {status}");
    }
    let sending = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let counts = store.inbox_counts().await?;
        let of = |s: InboxState| -> i64 {
            counts
                .iter()
                .filter(|c| c.state == s)
                .map(|c| c.count)
                .sum()
        };
        if of(InboxState::Pending) + of(InboxState::Leased) == 0 {
            break of(InboxState::Done);
        }
        anyhow::ensure!(Instant::now() < deadline, "the inbox did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let items = store
        .list_inbox(InboxState::Done, None, None, u32::try_from(total)?)
        .await?;
    let mut latencies: Vec<i64> = items
        .iter()
        .filter_map(|i| Some(i.finished_at_ms? - i.received_at_ms))
        .collect();
    latencies.sort_unstable();
    let requests = sandbox.healthie_counters().snapshot().requests;
    shutdown.cancel();
    service.await??;
    anyhow::ensure!(!latencies.is_empty(), "no item finished");

    println!("machine: {}", patient_sync::machine::describe());
    println!(
        "freshness: {total} patient.updated webhooks at {rate}/s over {:.1}s, upstream latency {UPSTREAM_LATENCY_MS} ms, \
         {} workers, idle poll {} ms, worker batch {}, Healthie limit {healthie_rps}/s, SQLite",
        sending.as_secs_f64(),
        worker_settings.concurrency,
        worker_settings.idle_poll_ms,
        worker_settings.batch_size,
    );
    println!("done: {done} of {total}; Healthie requests: {requests}");
    println!(
        "webhook stored -> canonical row committed: p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    Ok(())
}
