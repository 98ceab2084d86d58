//! Match latency benchmark: a SQLite store of N source records (the rebuild benchmark's
//! synthetic people, linked by one `rebuild`), then M incoming records applied one at a time,
//! each in its own transaction, through the real `apply_record` path (save, blocking-key lookup,
//! `decide`, link, golden row). Half the incoming records are a known person arriving from
//! another system, half are new people. Prints median and p99 latency and the machine.
//!
//! `cargo run --release --example match_bench -- 1000000 [incoming=1000]`

#[path = "rebuild_bench.rs"]
#[allow(dead_code)]
mod rebuild_bench;

use std::time::Instant;

use chrono::Utc;
use patient_sync::model::{SourceKey, SourceKind};
use patient_sync::store;
use patient_sync::sync::apply::{apply_record, IdentitySettings};
use patient_sync::sync::rebuild::{rebuild, RebuildOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let m: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1_000);
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite:{}", dir.path().join("match.sqlite").display());
    let store = store::connect(&url, 4).await?;
    store.migrate().await?;

    let t = Instant::now();
    let (written, people) = rebuild_bench::fill(store.as_ref(), n).await?;
    let fill_secs = t.elapsed().as_secs_f64();
    let settings = IdentitySettings::default();
    let t = Instant::now();
    let report = rebuild(
        store.as_ref(),
        &settings,
        &RebuildOptions::default(),
        Utc::now(),
    )
    .await?;
    let rebuild_secs = t.elapsed().as_secs_f64();

    let mut rng = StdRng::seed_from_u64(7);
    let mut latencies = Vec::with_capacity(m);
    let mut linked = 0usize;
    for j in 0..m {
        // Even: a known person arriving from Hint; odd: someone new.
        let (p, known) = if j % 2 == 0 {
            // Someone without a Hint record yet (one live record per source per patient).
            let p = loop {
                let p = rng.gen_range(0..people);
                let hint = SourceKey::new(SourceKind::Hint, format!("pat-{p}"));
                if store.load_link(&hint).await?.is_none() {
                    break p;
                }
            };
            (p, true)
        } else {
            (people + j as u64, false)
        };
        let key = SourceKey::new(SourceKind::Hint, format!("incoming-{j}"));
        let record = rebuild_bench::record(key, p, &mut rng);
        let now = Utc::now();
        let t = Instant::now();
        let mut tx = store.begin().await?;
        let applied = apply_record(tx.as_mut(), &record, &settings, now).await?;
        tx.commit().await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if known {
            let existing = store
                .load_link(&SourceKey::new(SourceKind::Healthie, p.to_string()))
                .await?;
            if existing.map(|l| l.patient_id) == applied.patient_id {
                linked += 1;
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];

    println!("machine: {}", patient_sync::machine::describe());
    println!(
        "store: {written} source records ({people} people) written in {fill_secs:.1}s, linked by rebuild in {rebuild_secs:.1}s ({} patients)",
        report.patients
    );
    println!(
        "apply one incoming record ({m}, one transaction each): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    );
    println!(
        "known people linked to their patient: {linked} of {}",
        m.div_ceil(2)
    );
    println!("peak RSS: {:.0} MiB", rebuild_bench::peak_rss_mib());
    Ok(())
}
