//! Intake benchmark: signed Healthie webhooks POSTed over loopback by many concurrent clients to
//! the receiver on a fresh SQLite file. Every delivery is verified and committed to the inbox
//! before its 202. Prints accepted deliveries per second, acknowledgement latency p50/p99 (as
//! the clients see it) and the machine. No workers run, so the inbox only grows.
//!
//! `cargo run --release --example intake_bench -- [REQUESTS] [CLIENTS]` (defaults 20000, 64).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patient_sync::app::Application;
use patient_sync::config::Settings;
use patient_sync::sandbox::webhooks::{Delivery, HealthieEnvelope, WebhookSender};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_intake_bench";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sends `deliveries` with `clients` concurrent senders; returns (accepted, latencies, wall time).
async fn run(
    sender: &WebhookSender,
    deliveries: Arc<Vec<Delivery>>,
    clients: usize,
) -> (usize, Vec<Duration>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (sender, deliveries, next) = (sender.clone(), deliveries.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut accepted = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(delivery) = deliveries.get(i) else {
                    break;
                };
                let t = Instant::now();
                let status = sender.send_delivery(delivery).await.expect("request");
                latencies.push(t.elapsed());
                if status.as_u16() == 202 {
                    accepted += 1;
                }
            }
            (accepted, latencies)
        }));
    }
    let mut accepted = 0;
    let mut latencies = Vec::new();
    for task in tasks {
        let (a, l) = task.await.expect("client task");
        accepted += a;
        latencies.extend(l);
    }
    let wall = started.elapsed();
    latencies.sort();
    (accepted, latencies, wall)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let requests: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let clients: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);

    let dir = tempfile::tempdir()?;
    let db = dir.path().join("intake.sqlite");
    let env: Vec<(String, String)> = [
        (
            "PATIENT_SYNC_DATABASE__URL",
            format!("sqlite:{}", db.display()),
        ),
        ("PATIENT_SYNC_SERVER__LISTEN", "127.0.0.1:0".into()),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_URL",
            "http://127.0.0.1:9/graphql".into(),
        ),
        ("PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY", "unused".into()),
        (
            "PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET",
            SECRET.into(),
        ),
        ("PATIENT_SYNC_LOG__LEVEL", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_from(None, &env)?;
    let app = Application::build(settings).await?;
    let store = app.store();
    let url = format!("http://{}/webhooks/healthie", app.local_addr());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_receiver(shutdown.clone()));

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let sender = WebhookSender::new(url.parse()?, SECRET.as_bytes().to_vec()).with_client(client);
    // Signed up front so the clients spend their time on the receiver, not on HMACs.
    let sign = |n: usize, offset: usize| -> Arc<Vec<Delivery>> {
        Arc::new(
            (0..n)
                .map(|i| {
                    let id = (1_000_000 + (offset + i) % 5_000).to_string();
                    let fields = vec!["first_name".to_string()];
                    sender.delivery(&HealthieEnvelope::patient("patient.updated", &id, fields))
                })
                .collect(),
        )
    };
    let warmup = (requests / 10).max(clients);
    run(&sender, sign(warmup, 0), clients).await;
    let (accepted, latencies, wall) = run(&sender, sign(requests, warmup), clients).await;

    let stored: i64 = store.inbox_counts().await?.iter().map(|c| c.count).sum();
    shutdown.cancel();
    server.await??;

    println!("machine: {}", patient_sync::machine::describe());
    println!(
        "intake: {requests} signed Healthie webhooks, {clients} concurrent clients over loopback, SQLite at {}",
        dir.path().display()
    );
    println!(
        "accepted: {accepted} in {:.2}s = {:.0}/s",
        wall.as_secs_f64(),
        accepted as f64 / wall.as_secs_f64()
    );
    println!(
        "ack latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!("inbox rows after the run: {stored} (warm-up {warmup} + measured {requests})");
    anyhow::ensure!(
        stored as usize == warmup + accepted,
        "every accepted delivery is in the inbox"
    );
    Ok(())
}
