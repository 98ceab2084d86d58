//! Rebuild benchmark: fills a fresh SQLite file with N synthetic source records (people spread
//! over the three systems, about 1.5 records each), then runs `rebuild` from the bare records
//! (every link and row is new) and again (nothing to change). Prints the figures and the machine:
//! wall time and resident memory per phase (load, cluster, write), the memory sampled every 20 ms,
//! and the size of the WAL after each. With `REBUILD_BENCH_CHECKPOINT` set, the WAL is
//! checkpointed and truncated between the two rebuilds; `REBUILD_BENCH_CACHE_MIB` sets the
//! writing connection's page cache (`RebuildOptions::cache_mib`).
//!
//! `cargo run --release --example rebuild_bench -- 1000000`

use std::time::Instant;

use chrono::{NaiveDate, TimeZone, Utc};
use patient_sync::model::{
    Address, PersonFields, RecordStatus, SourceKey, SourceKind, SourceRecord,
};
use patient_sync::store::{self, Store};
use patient_sync::sync::apply::IdentitySettings;
use patient_sync::sync::rebuild::{rebuild, RebuildOptions, RebuildReport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GIVEN: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Maria",
    "Wei",
    "Aisha",
    "Mohammed",
    "Sofia",
    "Lucas",
    "Yuki",
    "Priya",
];
const FAMILY: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
];

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ren", "sa", "to", "vin", "del", "mar", "ost", "ben", "ric", "ell", "an",
    "quist", "berg", "son", "ova", "ez", "ley", "ton", "ski", "ford", "well",
];

fn name(stems: &[&str], rng: &mut StdRng, rare: f64) -> String {
    let stem = stems[rng.gen_range(0..stems.len())];
    if rng.gen_bool(rare) {
        let a = SYLLABLES[rng.gen_range(0..SYLLABLES.len())];
        let b = SYLLABLES[rng.gen_range(0..SYLLABLES.len())];
        format!("{stem}{a}{b}")
    } else {
        stem.to_string()
    }
}

fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Samples resident memory every 20 ms until dropped; `(ms since start, MiB)`.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<(u64, f64)>>>,
}

impl RssSampler {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let t = Instant::now();
            let mut samples = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push((t.elapsed().as_millis() as u64, status_mib("VmRSS:")));
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            samples
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<(u64, f64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().expect("sampler"))
            .unwrap_or_default()
    }
}

/// One line per phase of a rebuild: wall time and peak resident memory.
fn phases(report: &RebuildReport, samples: &[(u64, f64)]) -> String {
    let peak = |from: u64, to: u64| {
        samples
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, m)| *m)
            .fold(0.0f64, f64::max)
    };
    let (l, c, e) = (report.loaded_ms, report.clustered_ms, report.elapsed_ms);
    format!(
        "load {:.1}s (peak {:.0} MiB), cluster {:.1}s (peak {:.0} MiB), write {:.1}s (peak {:.0} MiB)",
        l as f64 / 1000.0,
        peak(0, l),
        (c - l) as f64 / 1000.0,
        peak(l, c),
        (e - c) as f64 / 1000.0,
        peak(c, e + 20),
    )
}

pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The record of synthetic person `p` under `key` (the same person gives the same fields).
pub fn record(key: SourceKey, p: u64, rng: &mut StdRng) -> SourceRecord {
    let mut person = StdRng::seed_from_u64(p);
    // Name diversity close to a real population: a common stem plus a rare suffix for most.
    let given = name(GIVEN, &mut person, 0.5);
    let family = name(FAMILY, &mut person, 0.9);
    let (given, family) = (given.as_str(), family.as_str());
    let dob = NaiveDate::from_ymd_opt(1940, 1, 1).unwrap()
        + chrono::Duration::days(person.gen_range(0..29_000));
    let phone = format!(
        "{}{:07}",
        person.gen_range(201..990),
        person.gen_range(0..10_000_000)
    );
    let zip = format!("{:05}", person.gen_range(1_000..99_999));
    let email = format!(
        "{}.{}{p}@example.com",
        given.to_lowercase(),
        family.to_lowercase()
    );
    let updated = Utc
        .timestamp_opt(1_700_000_000 + rng.gen_range(0..50_000_000), 0)
        .unwrap();
    SourceRecord {
        fields: PersonFields {
            given_name: Some(given.into()),
            family_name: Some(family.into()),
            birth_date: Some(dob),
            sex: Some(if p % 2 == 0 { "female" } else { "male" }.into()),
            email: Some(email.clone()),
            phones: vec![phone.clone()],
            address: Address {
                line1: Some(format!("{} Main St", p % 9000 + 1)),
                city: Some("Springfield".into()),
                state: Some("IL".into()),
                postal_code: Some(zip.clone()),
                ..Default::default()
            },
            ..Default::default()
        },
        raw: serde_json::json!({
            "id": key.id.as_str(), "first_name": given, "last_name": family, "dob": dob.to_string(),
            "email": email, "phone_number": phone, "zip": zip,
        }),
        key,
        status: RecordStatus::Active,
        merged_into: None,
        source_updated_at: Some(updated),
        fetched_at: updated,
    }
}

/// Writes `n` source records of synthetic people (about 1.5 records each) into `store`, with
/// no links: what a rebuild starts from. Returns the record and people counts.
pub async fn fill(store: &dyn Store, n: usize) -> anyhow::Result<(usize, u64)> {
    let mut rng = StdRng::seed_from_u64(1);
    let mut written = 0usize;
    let mut p = 0u64;
    let mut tx = store.begin().await?;
    while written < n {
        let mut systems = vec![SourceKind::Healthie];
        if rng.gen_bool(0.35) {
            systems.push(SourceKind::Intakeq);
        }
        if rng.gen_bool(0.2) {
            systems.push(SourceKind::Hint);
        }
        for s in systems {
            let id = match s {
                SourceKind::Healthie => p.to_string(),
                SourceKind::Intakeq => (10_000_000 + p).to_string(),
                SourceKind::Hint => format!("pat-{p}"),
            };
            tx.save_source_record(&record(SourceKey::new(s, id), p, &mut rng))
                .await?;
            written += 1;
            if written % 20_000 == 0 {
                tx.commit().await?;
                tx = store.begin().await?;
            }
        }
        p += 1;
    }
    tx.commit().await?;
    Ok((written, p))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    // `REBUILD_BENCH_DB=PATH` keeps the store in PATH (a new file; kept afterwards), so that
    // `patient-sync rebuild` can be measured on it in a process of its own.
    let dir = tempfile::tempdir()?;
    let file = match std::env::var_os("REBUILD_BENCH_DB") {
        Some(path) if std::path::Path::new(&path).exists() => {
            anyhow::bail!("REBUILD_BENCH_DB names a file that exists; give a new path")
        }
        Some(path) => std::path::PathBuf::from(path),
        None => dir.path().join("bench.sqlite"),
    };
    let url = format!("sqlite:{}", file.display());
    let wal_mib = || {
        let mut wal = file.clone().into_os_string();
        wal.push("-wal");
        std::fs::metadata(wal).map_or(0.0, |m| m.len() as f64 / (1024.0 * 1024.0))
    };
    let store = store::connect(&url, 4).await?;
    store.migrate().await?;

    let started = Instant::now();
    let (written, p) = fill(store.as_ref(), n).await?;
    let fill = started.elapsed();

    let settings = IdentitySettings::default();
    let mut options = RebuildOptions::default();
    if let Some(mib) = std::env::var("REBUILD_BENCH_CACHE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.cache_mib = mib;
    }
    let rss_before = status_mib("VmRSS:");
    let t = Instant::now();
    let sampler = RssSampler::start();
    let first = rebuild(store.as_ref(), &settings, &options, Utc::now()).await?;
    let first_phases = phases(&first, &sampler.finish());
    let first_secs = t.elapsed().as_secs_f64();
    let rss_first = peak_rss_mib();
    let wal_first = wal_mib();
    if std::env::var_os("REBUILD_BENCH_CHECKPOINT").is_some() {
        // Diagnosis: the second rebuild from a checkpointed, empty WAL.
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&url).await?;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await?;
        conn.close().await?;
    }
    let t = Instant::now();
    let sampler = RssSampler::start();
    let second = rebuild(store.as_ref(), &settings, &options, Utc::now()).await?;
    let second_phases = phases(&second, &sampler.finish());
    let second_secs = t.elapsed().as_secs_f64();

    println!("machine: {}", patient_sync::machine::describe());
    println!(
        "records: {written} ({p} people) written in {:.1}s",
        fill.as_secs_f64()
    );
    println!("resident before the first rebuild: {rss_before:.0} MiB");
    println!(
        "rebuild from bare records: {first_secs:.1}s ({} patients, {} links created)",
        first.patients, first.links_created
    );
    println!("  {first_phases}");
    println!("  WAL after it: {wal_first:.0} MiB");
    println!(
        "rebuild again: {second_secs:.1}s ({} changes)",
        second.changes()
    );
    println!("  {second_phases}");
    println!("  WAL after it: {:.0} MiB", wal_mib());
    println!(
        "peak RSS: {:.0} MiB (after first rebuild {rss_first:.0} MiB)",
        peak_rss_mib()
    );
    Ok(())
}
