//! Logs as an operator sees them: JSON lines when stderr is not a terminal, human-readable on a
//! terminal (a pseudo-terminal here), and `RUST_LOG` filtering over `log.level`.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};

use patient_sync::sandbox::healthie::Faults;

use crate::app::{start_sandbox, three_source_env};

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

fn command(env: &[(String, String)], rust_log: Option<&str>) -> Command {
    let mut c = Command::new(BIN);
    c.arg("sync")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("PATIENT_SYNC_LOG__LEVEL", "info")
        .env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        c.env("RUST_LOG", filter);
    }
    c
}

async fn run(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().expect("run patient-sync"))
        .await
        .unwrap()
}

fn json_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_off_a_terminal_and_rust_log_filters_them() {
    let sandbox = start_sandbox(10, 31, Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("logs.sqlite").display());
    let env = three_source_env(&sandbox, &db_url);

    let out = run(command(&env, None)).await;
    assert!(out.status.success());
    let lines = json_lines(&out.stderr);
    let polls: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "Poll finished.")
        .collect();
    assert_eq!(polls.len(), 3, "one per source at info: {lines:?}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string() && l["target"].is_string());
    }
    assert!(polls
        .iter()
        .all(|l| l["level"] == "INFO" && l["source"].is_string()));

    // RUST_LOG wins over log.level: warnings only, so nothing from a clean run.
    let quiet = run(command(&env, Some("warn"))).await;
    assert!(quiet.status.success());
    assert!(json_lines(&quiet.stderr).is_empty(), "{:?}", quiet.stderr);

    // Per-target directives: debug for the poller, nothing else.
    let targeted = run(command(&env, Some("warn,patient_sync::sync::poll=debug"))).await;
    let lines = json_lines(&targeted.stderr);
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|l| l["target"]
            .as_str()
            .unwrap()
            .starts_with("patient_sync::sync::poll")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_human_readable_on_a_terminal() {
    let sandbox = start_sandbox(10, 32, Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("tty.sqlite").display());
    let env = three_source_env(&sandbox, &db_url);

    let (mut master, slave) = {
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two new descriptors, which we own from here on.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty");
        unsafe {
            (
                std::fs::File::from(OwnedFd::from_raw_fd(m)),
                OwnedFd::from_raw_fd(s),
            )
        }
    };
    let mut c = command(&env, None);
    c.stdout(Stdio::null()).stderr(Stdio::from(slave));
    let mut child = c.spawn().unwrap();
    // The child holds the only other copy of the terminal's slave end once `c` is dropped.
    drop(c);
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        // Reading the master ends with EIO once the slave is closed.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&text).to_string()
    });
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let text = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    let poll_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Poll finished."))
        .collect();
    assert_eq!(poll_lines.len(), 3, "{text}");
    for l in poll_lines {
        assert!(
            !l.trim_start().starts_with('{'),
            "not JSON on a terminal: {l}"
        );
        assert!(l.contains("INFO"), "{l}");
    }
}
