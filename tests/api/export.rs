//! `export --format csv|jsonl [--out FILE] [--include-merged] [--as-of T]` through the binary:
//! both formats, quoting, merged rows, paging, and no partial file after a failure.

use std::process::{Command, Output};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use patient_sync::export::{export_to_file, ExportFormat, ExportOptions, COLUMNS};
use patient_sync::model::PatientId;
use patient_sync::store::{PatientRow, Store};

use crate::helpers::{database, Db, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_patient-sync");

fn run(args: &[&str], db_url: &str) -> Output {
    Command::new(BIN)
        .args(args)
        .env("PATIENT_SYNC_DATABASE__URL", db_url)
        .env("PATIENT_SYNC_LOG__LEVEL", "warn")
        .output()
        .expect("run patient-sync")
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).unwrap()
}

fn plain(i: usize) -> PatientRow {
    PatientRow {
        patient_id: PatientId(format!("p{i:05}")),
        given_name: Some(format!("Given{i}")),
        family_name: Some("Plain".into()),
        birth_date: NaiveDate::from_ymd_opt(1980, 1, 1 + (i % 28) as u32),
        status: "active".into(),
        healthie_id: Some(i.to_string()),
        first_seen_at: at(0),
        updated_at: at(10),
        version: 1,
        ..Default::default()
    }
}

/// The awkward row: every character CSV must quote, and non-ASCII text.
fn awkward() -> PatientRow {
    PatientRow {
        patient_id: PatientId("a-awkward".into()),
        given_name: Some("Zoë, \"Zo\"".into()),
        family_name: Some("Line\nBreak".into()),
        address_line1: Some("1 Main St\r\nApt 2".into()),
        status: "active".into(),
        first_seen_at: at(0),
        updated_at: at(10),
        version: 1,
        ..Default::default()
    }
}

fn merged() -> PatientRow {
    PatientRow {
        patient_id: PatientId("m-merged".into()),
        status: "merged".into(),
        merged_into: Some(PatientId("p00001".into())),
        first_seen_at: at(0),
        updated_at: at(10),
        version: 2,
        ..Default::default()
    }
}

const PLAIN_ROWS: usize = 2_100;

async fn seeded() -> TestDb {
    let db = database(Db::Sqlite).await;
    let mut tx = db.store.begin().await.unwrap();
    for i in 0..PLAIN_ROWS {
        tx.save_patient(&plain(i), &[]).await.unwrap();
    }
    tx.save_patient(&awkward(), &[]).await.unwrap();
    tx.save_patient(&merged(), &[]).await.unwrap();
    tx.commit().await.unwrap();
    db
}

/// A small RFC 4180 reader, independent of the writer under test.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        !quoted && field.is_empty() && row.is_empty(),
        "ends with a line break"
    );
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_export_quotes_fields_pages_through_the_table_and_leaves_out_merged_rows() {
    let db = seeded().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("patients.csv");
    let url = db.url.clone();
    let path = out.clone();
    let result = tokio::task::spawn_blocking(move || {
        run(
            &["export", "--format", "csv", "--out", path.to_str().unwrap()],
            &url,
        )
    })
    .await
    .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(String::from_utf8_lossy(&result.stderr).contains("exported 2101 patients"));
    let rows = parse_csv(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(rows[0], COLUMNS, "a header line");
    assert_eq!(
        rows.len(),
        1 + PLAIN_ROWS + 1,
        "every row but the merged one"
    );
    assert!(rows.iter().all(|r| r.len() == COLUMNS.len()));
    let col = |name: &str| COLUMNS.iter().position(|c| *c == name).unwrap();
    let awkward_row = rows.iter().find(|r| r[0] == "a-awkward").unwrap();
    assert_eq!(awkward_row[col("given_name")], "Zoë, \"Zo\"");
    assert_eq!(awkward_row[col("family_name")], "Line\nBreak");
    assert_eq!(awkward_row[col("address_line1")], "1 Main St\r\nApt 2");
    assert_eq!(
        awkward_row[col("middle_name")],
        "",
        "NULL is an empty field"
    );
    let first = rows.iter().find(|r| r[0] == "p00003").unwrap();
    assert_eq!(first[col("birth_date")], "1980-01-04");
    assert_eq!(first[col("updated_at")], "2026-05-28T20:26:50Z");
    assert_eq!(first[col("version")], "1");
    let ids: Vec<&String> = rows[1..].iter().map(|r| &r[0]).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "no row twice across pages");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "only the export itself: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_export_to_stdout_includes_merged_rows_on_request() {
    let db = seeded().await;
    let url = db.url.clone();
    let (plain_out, with_merged) = tokio::task::spawn_blocking(move || {
        (
            run(&["export", "--format", "jsonl"], &url),
            run(&["export", "--format", "jsonl", "--include-merged"], &url),
        )
    })
    .await
    .unwrap();
    assert!(plain_out.status.success() && with_merged.status.success());
    let parse = |out: &Output| -> Vec<serde_json::Value> {
        String::from_utf8(out.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rows = parse(&plain_out);
    assert_eq!(rows.len(), PLAIN_ROWS + 1);
    assert!(rows.iter().all(|r| r["status"] != "merged"));
    assert!(rows
        .iter()
        .all(|r| r.as_object().unwrap().len() == COLUMNS.len()));
    let awkward_row = rows
        .iter()
        .find(|r| r["patient_id"] == "a-awkward")
        .unwrap();
    assert_eq!(awkward_row["family_name"], "Line\nBreak");
    assert!(awkward_row["birth_date"].is_null());
    assert_eq!(awkward_row["version"], 1);

    let all = parse(&with_merged);
    assert_eq!(all.len(), PLAIN_ROWS + 2);
    let m = all.iter().find(|r| r["patient_id"] == "m-merged").unwrap();
    assert_eq!(m["status"], "merged");
    assert_eq!(m["merged_into"], "p00001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_exports_the_table_as_it_was() {
    let db = database(Db::Sqlite).await;
    let mut first = plain(1);
    let mut tx = db.store.begin().await.unwrap();
    tx.save_patient(&first, &[]).await.unwrap();
    tx.commit().await.unwrap();
    first.given_name = Some("Renamed".into());
    first.updated_at = at(1_000);
    first.version = 2;
    let mut tx = db.store.begin().await.unwrap();
    tx.save_patient(&first, &[]).await.unwrap();
    tx.save_patient(&plain(2), &[]).await.unwrap();
    tx.commit().await.unwrap();
    let url = db.url.clone();
    let (before, now) = tokio::task::spawn_blocking(move || {
        (
            run(
                &[
                    "export",
                    "--format",
                    "jsonl",
                    "--as-of",
                    "2026-05-28T20:30:00Z",
                ],
                &url,
            ),
            run(&["export", "--format", "jsonl"], &url),
        )
    })
    .await
    .unwrap();
    let lines = |o: &Output| String::from_utf8(o.stdout.clone()).unwrap();
    let before = lines(&before);
    assert_eq!(before.lines().count(), 2, "{before}");
    assert!(before.contains("\"Given1\"") && !before.contains("Renamed"));
    assert!(lines(&now).contains("Renamed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_leaves_no_partial_file() {
    let db = seeded().await;
    let dir = tempfile::tempdir().unwrap();
    // The target is a directory: everything is written, then the rename fails.
    let target = dir.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    let options = ExportOptions {
        format: ExportFormat::Csv,
        ..Default::default()
    };
    let store: &dyn Store = db.store.as_ref();
    assert!(export_to_file(store, &options, &target).await.is_err());
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(entries, ["taken"], "the temporary file is gone");
    assert!(target.is_dir());

    let url = db.url.clone();
    let missing = dir.path().join("no-such-dir").join("out.csv");
    let out = tokio::task::spawn_blocking(move || {
        run(
            &[
                "export",
                "--format",
                "csv",
                "--out",
                missing.to_str().unwrap(),
            ],
            &url,
        )
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-dir"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_early_is_not_a_failure() {
    use std::io::BufRead;
    let db = seeded().await;
    let url = db.url.clone();
    let status = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(BIN)
            .args(["export", "--format", "jsonl"])
            .env("PATIENT_SYNC_DATABASE__URL", &url)
            .env("PATIENT_SYNC_LOG__LEVEL", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Like `| head -1`: read one line, then close the pipe (the export is larger than the
        // pipe's buffer, so the writer sees the closed pipe).
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.starts_with('{'));
        child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
}
