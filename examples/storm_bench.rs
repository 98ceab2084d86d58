//! The storm benchmark: 10,000 signed Healthie webhooks for 2,000 distinct patients
//! (duplicates, repeated deliveries, out of order) sent into a running service (`serve`'s
//! receiver and workers) on SQLite against the fake Healthie. Prints the GraphQL requests the
//! service made, the wall time, the inbox outcome and the machine.
//!
//! ```sh
//! cargo run --release --example storm_bench -- [events] [patients] [key=value config ...]
//! ```
//!
//! Extra arguments `section.key=value` are passed as configuration (for example
//! `sources.healthie.batch_size=25` or `worker.concurrency=8`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use patient_sync::app::Application;
use patient_sync::config::Settings;
use patient_sync::sandbox::healthie::HealthieConfig;
use patient_sync::sandbox::population::PopulationConfig;
use patient_sync::sandbox::webhooks::{HealthieEnvelope, WebhookSender};
use patient_sync::sandbox::{Sandbox, SandboxConfig};
use patient_sync::store::InboxState;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "storm-bench-secret";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let events = numbers.first().copied().unwrap_or(10_000);
    let patients = numbers.get(1).copied().unwrap_or(2_000);
    let overrides: Vec<(String, String)> = args
        .iter()
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| {
            let var = format!("PATIENT_SYNC_{}", k.replace('.', "__").to_ascii_uppercase());
            (var, v.to_string())
        })
        .collect();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    // The fake Healthie with enough active patients, its own (default) rate limit included.
    let sandbox = Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people: patients * 3 / 2 + 200,
            seed: 5,
            ..Default::default()
        },
        healthie: HealthieConfig::default(),
        ..Default::default()
    })
    .await?;
    let ids: Vec<String> = {
        let pop = sandbox.population().read().unwrap();
        pop.healthie_users()
            .filter(|u| u["active"].as_bool() == Some(true))
            .filter_map(|u| u["id"].as_str().map(str::to_string))
            .take(patients)
            .collect()
    };
    anyhow::ensure!(
        ids.len() == patients,
        "population has only {} active patients",
        ids.len()
    );

    let dir = tempfile::tempdir()?;
    let mut env: Vec<(String, String)> = vec![
        (
            "PATIENT_SYNC_DATABASE__URL".into(),
            format!("sqlite:{}", dir.path().join("storm.sqlite").display()),
        ),
        ("PATIENT_SYNC_SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_URL".into(),
            sandbox.healthie_url(),
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY".into(),
            HealthieConfig::default().api_key,
        ),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET".into(),
            SECRET.into(),
        ),
        // Only the storm's refetches: no periodic sweep during the run.
        ("PATIENT_SYNC_POLL__INTERVAL_SECS".into(), "0".into()),
        (
            "PATIENT_SYNC_POLL__HEALTHIE_SWEEP_INTERVAL_SECS".into(),
            "0".into(),
        ),
    ];
    env.extend(overrides);
    let settings = Settings::load_from(None, &env)?;
    let shown = format!(
        "worker.concurrency={} worker.batch_size={} healthie.requests_per_second={} burst={} batch_size={} batch_window_ms={}",
        settings.worker.concurrency,
        settings.worker.batch_size,
        settings.sources.healthie.requests_per_second,
        settings.sources.healthie.burst,
        settings.sources.healthie.batch_size,
        settings.sources.healthie.batch_window_ms,
    );
    let app = Application::build(settings).await?;
    let store = app.store();
    let address = app.local_addr();
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    // The storm: every patient at least once, the rest drawn at random (repeat events for
    // busy patients), some deliveries repeated byte for byte, then shuffled.
    let mut rng = StdRng::seed_from_u64(42);
    let mut plan: Vec<&String> = ids.iter().collect();
    while plan.len() < events {
        plan.push(&ids[rng.gen_range(0..ids.len())]);
    }
    let mut envelopes: Vec<HealthieEnvelope> = Vec::with_capacity(events);
    let mut changed = 0usize;
    {
        let mut pop = sandbox.population().write().unwrap();
        for id in plan {
            if envelopes.len() >= events {
                break;
            }
            let envelope = match rng.gen_range(0..10) {
                0..=5 => {
                    let fields = pop.touch_healthie(id).unwrap_or_default();
                    changed += 1;
                    HealthieEnvelope::patient("patient.updated", id, fields)
                }
                6 => HealthieEnvelope::patient("patient.created", id, vec![]),
                7 => HealthieEnvelope::location("location.updated", "5100", id),
                _ => HealthieEnvelope::applied_tag("applied_tag.created", "9100", "77", id),
            };
            // Healthie retries deliveries: one in ten arrives twice.
            if rng.gen_bool(0.1) && envelopes.len() + 1 < events {
                envelopes.push(envelope.clone());
            }
            envelopes.push(envelope);
        }
    }
    envelopes.shuffle(&mut rng);
    let sender = WebhookSender::new(
        format!("http://{address}/webhooks/healthie").parse()?,
        SECRET.as_bytes().to_vec(),
    );
    let deliveries: Vec<_> = envelopes.iter().map(|e| sender.delivery(e)).collect();

    let before = sandbox.healthie_counters().snapshot();
    let started = Instant::now();
    let statuses: Vec<u16> = futures::stream::iter(deliveries.iter())
        .map(|d| {
            let sender = sender.clone();
            async move {
                sender
                    .send_delivery(d)
                    .await
                    .map(|s| s.as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let sent_in = started.elapsed();
    let accepted = statuses.iter().filter(|s| **s == 202).count();

    // Until every accepted item is finished.
    let mut counts: HashMap<InboxState, i64>;
    loop {
        counts = HashMap::new();
        for c in store.inbox_counts().await? {
            *counts.entry(c.state).or_insert(0) += c.count;
        }
        let open = counts.get(&InboxState::Pending).copied().unwrap_or(0)
            + counts.get(&InboxState::Leased).copied().unwrap_or(0);
        let total: i64 = counts.values().sum();
        if open == 0 && total >= accepted as i64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("the inbox did not drain in 30 minutes: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed();
    let after = sandbox.healthie_counters().snapshot();
    shutdown.cancel();
    service.await??;

    let get = |s: InboxState| counts.get(&s).copied().unwrap_or(0);
    println!(
        "machine: {}, SQLite in {}",
        patient_sync::machine::describe(),
        dir.path().display()
    );
    println!("settings: {shown}");
    println!(
        "storm: {} webhooks for {} patients ({changed} real changes), {accepted} accepted (202)",
        deliveries.len(),
        ids.len()
    );
    println!(
        "upstream GraphQL requests: {} (users(ids:) fields {}, user(id:) fields {}, rate-limited {})",
        after.requests - before.requests,
        after.users_fields - before.users_fields,
        after.user_fields - before.user_fields,
        after.rate_limited - before.rate_limited,
    );
    println!(
        "wall time: {:.2}s (sending took {:.2}s)",
        wall.as_secs_f64(),
        sent_in.as_secs_f64()
    );
    println!(
        "items: done {}, dead {}, ignored {}, pending {}, leased {}",
        get(InboxState::Done),
        get(InboxState::Dead),
        get(InboxState::Ignored),
        get(InboxState::Pending),
        get(InboxState::Leased)
    );
    Ok(())
}
