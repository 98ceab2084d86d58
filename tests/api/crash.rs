//! Crash safety through the real binary: `serve` killed with SIGKILL mid-processing and
//! restarted loses nothing and duplicates nothing; SIGTERM stops it cleanly. These tests wait on
//! another process, so they poll its database with a deadline instead of sleeping for a time.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patient_sync::model::{SourceKey, SourceKind};
use patient_sync::sandbox::healthie::{Faults, HealthieConfig};
use patient_sync::sandbox::webhooks::{HealthieEnvelope, WebhookSender};
use patient_sync::sandbox::SandboxHandle;
use patient_sync::store::{self, InboxState, Store};

use crate::app::{start_sandbox, WEBHOOK_SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(db_url: &str, port: u16, healthie_url: &str) -> Child {
    Command::new(BIN)
        .arg("serve")
        .env("PATIENT_SYNC_DATABASE__URL", db_url)
        .env("PATIENT_SYNC_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__API_URL", healthie_url)
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__API_KEY",
            HealthieConfig::default().api_key,
        )
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__WEBHOOK_SECRET",
            WEBHOOK_SECRET,
        )
        .env(
            "PATIENT_SYNC_SOURCES__HEALTHIE__REQUESTS_PER_SECOND",
            "1000",
        )
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__BURST", "1000")
        .env("PATIENT_SYNC_SOURCES__HEALTHIE__BATCH_SIZE", "5")
        .env("PATIENT_SYNC_WORKER__BATCH_SIZE", "5")
        .env("PATIENT_SYNC_WORKER__LEASE_SECS", "1")
        .env("PATIENT_SYNC_WORKER__IDLE_POLL_MS", "20")
        .env("PATIENT_SYNC_POLL__INTERVAL_SECS", "0")
        .env("PATIENT_SYNC_POLL__HEALTHIE_SWEEP_INTERVAL_SECS", "0")
        .env("PATIENT_SYNC_LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start patient-sync serve")
}

async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !check().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `serve` on `port`, waits until it is ready, and returns it with a webhook sender.
async fn start_serve(db_url: &str, port: u16, sandbox: &SandboxHandle) -> (Child, WebhookSender) {
    let child = serve(db_url, port, &sandbox.healthie_url());
    wait_for("the service to be ready", Duration::from_secs(30), || {
        ready(port)
    })
    .await;
    let sender = WebhookSender::new(
        format!("http://127.0.0.1:{port}/webhooks/healthie")
            .parse()
            .unwrap(),
        WEBHOOK_SECRET.as_bytes().to_vec(),
    );
    (child, sender)
}

async fn count(store: &dyn Store, states: &[InboxState]) -> i64 {
    store
        .inbox_counts()
        .await
        .unwrap()
        .iter()
        .filter(|c| states.contains(&c.state))
        .map(|c| c.count)
        .sum()
}

async fn ready(port: u16) -> bool {
    reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

/// The canonical content per Healthie user, without ids and timestamps.
async fn canonical(store: &dyn Store, ids: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for id in ids {
        let link = store
            .load_link(&SourceKey::new(SourceKind::Healthie, id.as_str()))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("user {id} has no canonical patient"));
        let p = store.load_patient(&link.patient_id).await.unwrap().unwrap();
        out.insert(
            id.clone(),
            format!(
                "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
                p.given_name,
                p.family_name,
                p.birth_date,
                p.email,
                p.phone,
                p.healthie_id,
                p.status
            ),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_mid_processing_and_restarted_loses_and_duplicates_nothing() {
    let sandbox = start_sandbox(
        150,
        5,
        Faults {
            slow_share: 1.0,
            slow_ms: 25,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<String> = {
        let pop = sandbox.population().read().unwrap();
        pop.healthie_users()
            .filter_map(|u| u["id"].as_str().map(str::to_string))
            .take(80)
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("crash.sqlite").display());
    let port = free_port();
    let (mut child, sender) = start_serve(&db_url, port, &sandbox).await;
    let mut sent = 0;
    for round in 0..3 {
        for id in &ids {
            let event = if round == 0 {
                "patient.created"
            } else {
                "patient.updated"
            };
            assert_eq!(
                sender
                    .send(&HealthieEnvelope::patient(event, id, vec![]))
                    .await
                    .unwrap(),
                202
            );
            sent += 1;
        }
    }
    let observer = store::connect(&db_url, 2).await.unwrap();
    wait_for("some items to finish", Duration::from_secs(30), || async {
        count(observer.as_ref(), &[InboxState::Done]).await >= 10
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let done_at_kill = count(observer.as_ref(), &[InboxState::Done]).await;
    assert!(
        done_at_kill < sent,
        "the kill came mid-processing ({done_at_kill} of {sent} done)"
    );

    let mut child = serve(&db_url, port, &sandbox.healthie_url());
    wait_for(
        "the restarted service to drain the inbox",
        Duration::from_secs(60),
        || async {
            count(
                observer.as_ref(),
                &[InboxState::Pending, InboxState::Leased],
            )
            .await
                == 0
        },
    )
    .await;
    // SIGTERM: graceful shutdown exits 0.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");

    assert_eq!(
        count(observer.as_ref(), &[InboxState::Done]).await,
        sent,
        "every delivery took effect"
    );
    assert_eq!(
        count(observer.as_ref(), &[InboxState::Dead, InboxState::Ignored]).await,
        0
    );
    let patients: i64 = observer
        .count_patients()
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert!(
        patients <= ids.len() as i64,
        "no duplicate patients: {patients} for {} users",
        ids.len()
    );
    let after_crash = canonical(observer.as_ref(), &ids).await;

    // The same deliveries into an undisturbed in-process run give the same canonical content.
    let app = crate::app::spawn_app_with(crate::helpers::Db::Sqlite, &sandbox).await;
    let sender = app.sender();
    for round in 0..3 {
        for id in &ids {
            let event = if round == 0 {
                "patient.created"
            } else {
                "patient.updated"
            };
            sender
                .send(&HealthieEnvelope::patient(event, id, vec![]))
                .await
                .unwrap();
        }
    }
    app.worker.drain().await.unwrap();
    assert_eq!(canonical(app.store.as_ref(), &ids).await, after_crash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_exits_zero_and_hands_back_every_lease() {
    let sandbox = start_sandbox(
        40,
        8,
        Faults {
            slow_share: 1.0,
            slow_ms: 2_000,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<String> = {
        let pop = sandbox.population().read().unwrap();
        pop.healthie_users()
            .filter_map(|u| u["id"].as_str().map(str::to_string))
            .take(20)
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("term.sqlite").display());
    let port = free_port();
    let (mut child, sender) = start_serve(&db_url, port, &sandbox).await;
    for id in &ids {
        sender
            .send(&HealthieEnvelope::patient("patient.updated", id, vec![]))
            .await
            .unwrap();
    }
    let observer = store::connect(&db_url, 2).await.unwrap();
    wait_for(
        "a batch to be in flight",
        Duration::from_secs(30),
        || async { count(observer.as_ref(), &[InboxState::Leased]).await > 0 },
    )
    .await;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
    assert_eq!(
        count(observer.as_ref(), &[InboxState::Leased]).await,
        0,
        "no lease left behind"
    );
    let pending = count(observer.as_ref(), &[InboxState::Pending]).await;
    let done = count(observer.as_ref(), &[InboxState::Done]).await;
    assert_eq!(
        pending + done,
        ids.len() as i64,
        "every delivery is still there"
    );
    let item = observer
        .list_inbox(InboxState::Pending, None, None, 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(item.attempts, 0, "an interrupted attempt is not counted");
}
