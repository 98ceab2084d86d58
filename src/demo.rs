//! `patient-sync demo` and `patient-sync sandbox`: the whole service against the sandbox on a
//! fresh SQLite file. The demo loads all three fake upstreams, sends a storm of signed Healthie
//! webhooks (creates, updates, duplicates, out of order), waits until the inbox is drained and
//! prints what happened, scored against the sandbox's ground truth.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::Application;
use crate::config::{Secret, Settings};
use crate::sandbox::population::{Population, PopulationConfig};
use crate::sandbox::webhooks::{healthie_storm, StormConfig, WebhookSender};
use crate::sandbox::{Sandbox, SandboxConfig, SharedPopulation, HINT_API_KEY, INTAKEQ_API_KEY};
use crate::store::{InboxState, Store};

const DEMO_WEBHOOK_SECRET: &str = "whsec_demo_only";

/// Serves the fake upstreams until `shutdown` fires; with `send_to`, also sends a storm of
/// signed Healthie webhooks (signed with the first configured webhook secret) to that receiver.
pub async fn run_sandbox(
    settings: &Settings,
    listen: SocketAddr,
    people: usize,
    seed: u64,
    send_to: Option<reqwest::Url>,
    faults: crate::sandbox::faults::SourceFaults,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = SandboxConfig {
        population: PopulationConfig {
            people,
            seed,
            ..Default::default()
        },
        listen,
        ..Default::default()
    }
    .with_faults(faults);
    let healthie_key = config.healthie.api_key.clone();
    let sandbox = Sandbox::start(config)
        .await
        .with_context(|| format!("cannot serve the sandbox on {listen}"))?;
    let base = sandbox.base_url();
    println!("sandbox on {base}");
    println!(
        "  PATIENT_SYNC_SOURCES__HEALTHIE__API_URL={}",
        sandbox.healthie_url()
    );
    println!("  PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY={healthie_key}");
    println!(
        "  PATIENT_SYNC_SOURCES__INTAKEQ__BASE_URL={}",
        sandbox.intakeq_url()
    );
    println!("  PATIENT_SYNC_SOURCES__INTAKEQ__API_KEY={INTAKEQ_API_KEY}");
    println!(
        "  PATIENT_SYNC_SOURCES__HINT__BASE_URL={}",
        sandbox.hint_url()
    );
    println!("  PATIENT_SYNC_SOURCES__HINT__API_KEY={HINT_API_KEY}");
    if let Some(url) = send_to {
        let secret = settings.sources.healthie.webhook_secret.first().context(
            "--send-webhooks needs a webhook secret: set PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET",
        )?;
        let envelopes = {
            let mut pop = sandbox
                .population()
                .write()
                .unwrap_or_else(|e| e.into_inner());
            healthie_storm(&mut pop, &StormConfig::default())
        };
        let sender = WebhookSender::new(url.clone(), secret.expose().as_bytes().to_vec());
        let mut by_status = std::collections::BTreeMap::new();
        for envelope in &envelopes {
            let status = sender
                .send(envelope)
                .await
                .with_context(|| format!("cannot reach {url}"))?;
            *by_status.entry(status.as_u16()).or_insert(0usize) += 1;
        }
        println!(
            "sent {} signed Healthie webhooks to {url}: {by_status:?} by HTTP status",
            envelopes.len()
        );
    }
    shutdown.cancelled().await;
    sandbox.shutdown().await.context("sandbox server failed")
}

/// Runs the end-to-end demo and prints a summary.
pub async fn run_demo(base: Settings, dir: Option<PathBuf>, people: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            d
        }
        None => {
            let d = std::env::temp_dir().join(format!(
                "patient-sync-demo-{}",
                chrono::Utc::now().format("%Y%m%d-%H%M%S")
            ));
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            d
        }
    };
    let db_path = dir.join("demo.sqlite");
    for suffix in ["", "-wal", "-shm", ".limits", ".limits-wal", ".limits-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db_path.display()));
    }

    let sandbox = Sandbox::start(SandboxConfig {
        population: PopulationConfig {
            people,
            seed: 2026,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .context("cannot start the sandbox")?;

    let mut settings = base;
    settings.database.url = format!("sqlite:{}", db_path.display());
    settings.server.listen = "127.0.0.1:0".parse().expect("valid address");
    settings.poll.interval_secs = 0;
    settings.poll.healthie_sweep_interval_secs = 0;
    settings.worker.idle_poll_ms = 50;
    let h = &mut settings.sources.healthie;
    h.enabled = true;
    h.api_url = sandbox.healthie_url();
    h.api_key = Secret::new(crate::sandbox::HealthieConfig::default().api_key);
    h.webhook_secret = vec![Secret::new(DEMO_WEBHOOK_SECRET)];
    h.requests_per_second = 50;
    h.burst = 50;
    let i = &mut settings.sources.intakeq;
    i.enabled = true;
    i.base_url = sandbox.intakeq_url();
    i.api_key = Secret::new(INTAKEQ_API_KEY);
    let n = &mut settings.sources.hint;
    n.enabled = true;
    n.base_url = sandbox.hint_url();
    n.api_key = Secret::new(HINT_API_KEY);

    println!("patient-sync demo: {people} synthetic people across Healthie, IntakeQ and Hint (sandbox at {})", sandbox.base_url());
    let app = Application::build(settings).await?;
    let store = app.store();
    let receiver = format!("http://{}/webhooks/healthie", app.local_addr());

    // Initial load: one incremental poll of every source (a first poll is a full sweep).
    for (source, result) in app.poll_all().await {
        let queued = result.map(|s| s.queued()).context("initial poll failed")?;
        println!("  polled {source:<8} {queued:>5} records queued");
    }
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    // Live traffic: a storm of signed Healthie webhooks with duplicates and reordering.
    let envelopes = {
        let mut pop = sandbox
            .population()
            .write()
            .unwrap_or_else(|e| e.into_inner());
        healthie_storm(
            &mut pop,
            &StormConfig {
                creates: 40,
                updates: 150,
                ..Default::default()
            },
        )
    };
    let sender = WebhookSender::new(receiver.parse()?, DEMO_WEBHOOK_SECRET.as_bytes().to_vec());
    let (mut accepted, mut other) = (0usize, 0usize);
    for envelope in &envelopes {
        match sender.send(envelope).await?.as_u16() {
            202 => accepted += 1,
            _ => other += 1,
        }
    }
    println!(
        "  sent     {:>5} signed Healthie webhooks ({accepted} accepted, {other} refused)",
        envelopes.len()
    );

    let drained = wait_until_drained(store.as_ref(), Duration::from_secs(120)).await?;
    shutdown.cancel();
    service.await.context("service task failed")??;
    if !drained {
        println!("  warning: the inbox was not drained within 120 s");
    }

    let counts = store.inbox_counts().await?;
    let by_state = |state: InboxState| -> i64 {
        counts
            .iter()
            .filter(|c| c.state == state)
            .map(|c| c.count)
            .sum()
    };
    println!(
        "  inbox    {:>5} done, {} ignored, {} dead, {} pending",
        by_state(InboxState::Done),
        by_state(InboxState::Ignored),
        by_state(InboxState::Dead),
        by_state(InboxState::Pending) + by_state(InboxState::Leased)
    );
    println!(
        "  fetched  Healthie {} GraphQL requests, IntakeQ {} requests, Hint {} requests",
        sandbox.healthie_counters().requests.load(Ordering::Relaxed),
        sandbox.intakeq().counters().requests,
        sandbox.hint().counters().requests
    );
    let patients: i64 = store.count_patients().await?.iter().map(|(_, n)| n).sum();
    let (people_now, scores) = score(store.as_ref(), sandbox.population()).await?;
    println!(
        "  patients {:>5} canonical rows for {} people; same-person pairs: precision {:.3}, recall {:.3}",
        patients, people_now, scores.0, scores.1
    );
    println!("  database {}", db_path.display());
    println!("  finished in {:.1} s", started.elapsed().as_secs_f64());
    println!();
    println!("Try:");
    println!(
        "  sqlite3 {} \"SELECT patient_id, given_name, family_name, birth_date, healthie_id, intakeq_id, hint_id FROM patients WHERE healthie_id IS NOT NULL AND intakeq_id IS NOT NULL AND hint_id IS NOT NULL LIMIT 5;\"",
        db_path.display()
    );
    println!(
        "  PATIENT_SYNC_DATABASE__URL=sqlite:{} patient-sync status",
        db_path.display()
    );
    Ok(())
}

/// Waits (checking every 100 ms) until nothing is pending or leased, or the deadline passes.
async fn wait_until_drained(store: &dyn Store, deadline: Duration) -> anyhow::Result<bool> {
    let until = Instant::now() + deadline;
    loop {
        let busy: i64 = store
            .inbox_counts()
            .await?
            .iter()
            .filter(|c| matches!(c.state, InboxState::Pending | InboxState::Leased))
            .map(|c| c.count)
            .sum();
        if busy == 0 {
            return Ok(true);
        }
        if Instant::now() > until {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// People in the population, and the pairwise precision and recall of the links against its
/// ground truth, over the records the service has seen (people created during the storm exist
/// in the population's IntakeQ and Hint tables but were never served to the service).
async fn score(
    store: &dyn Store,
    population: &SharedPopulation,
) -> anyhow::Result<(usize, (f64, f64))> {
    let keys: Vec<_> = {
        let pop = population.read().unwrap_or_else(|e| e.into_inner());
        pop.ground_truth().keys().cloned().collect()
    };
    let mut assignments = Vec::new();
    for key in keys {
        if let Some(link) = store.load_link(&key).await? {
            assignments.push((key, link.patient_id.0));
        }
    }
    let seen: std::collections::BTreeSet<_> = assignments.iter().map(|(k, _)| k.clone()).collect();
    let predicted: std::collections::BTreeSet<_> = Population::pairs_from_clusters(assignments)
        .into_iter()
        .map(|(a, b)| if a < b { (a, b) } else { (b, a) })
        .collect();
    let pop = population.read().unwrap_or_else(|e| e.into_inner());
    let truth: std::collections::BTreeSet<_> = pop
        .ground_truth_pairs()
        .into_iter()
        .filter(|(a, b)| seen.contains(a) && seen.contains(b))
        .collect();
    let true_pairs = predicted.intersection(&truth).count() as f64;
    let precision = if predicted.is_empty() {
        1.0
    } else {
        true_pairs / predicted.len() as f64
    };
    let recall = if truth.is_empty() {
        1.0
    } else {
        true_pairs / truth.len() as f64
    };
    Ok((pop.persons().len(), (precision, recall)))
}
