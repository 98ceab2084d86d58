//! `import --source S --file F`: JSON Lines, one record per line in the source's own API shape
//! (a Healthie `User`, an IntakeQ client profile, a Hint patient).
//!
//! Each line is parsed with the source's `parse_record` and applied with
//! [`apply_records`], the path a resync page takes and decided as
//! [`apply_record`](crate::sync::apply::apply_record) decides each fetched snapshot
//! (monotonic save, matching, golden rows). Lines are applied straight away rather than queued
//! in the inbox so the summary can say what each line did (created, updated, unchanged) and no
//! worker, network access or API key is needed: the source is constructed but never called.
//! Lines commit in batches of [`BATCH_LINES`]; a line that does not parse is reported by its
//! number with the reason (a field name, never a value) and skipped.

use std::io::BufRead;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, instrument};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::{SourceKind, SourceRecord};
use crate::sources::{healthie::Healthie, hint::Hint, intakeq::Intakeq, ConvertError, Source};
use crate::store::{SaveOutcome, Store, StoreError};
use crate::sync::apply::IdentitySettings;
use crate::sync::apply_batch::apply_records;

/// Lines applied per transaction.
pub const BATCH_LINES: usize = 500;

/// A line that was not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedLine {
    /// 1-based line number in the file.
    pub line: u64,
    /// Why, without any value from the line.
    pub reason: String,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    /// Non-empty lines read.
    pub lines: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Older than the stored snapshot of the same record: not written.
    pub stale: u64,
    pub rejected: u64,
    pub rejected_lines: Vec<RejectedLine>,
}

impl ImportSummary {
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for r in &self.rejected_lines {
            out.push_str(&format!("line {}: rejected: {}\n", r.line, r.reason));
        }
        out.push_str(&format!(
            "import: {} lines: {} created, {} updated, {} unchanged, {} stale, {} rejected\n",
            self.lines, self.created, self.updated, self.unchanged, self.stale, self.rejected
        ));
        out
    }
}

/// Why an import stopped (a bad line does not stop it).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the import file")]
    Read(#[source] std::io::Error),
    #[error("store failure")]
    Store(#[from] StoreError),
}

/// A source able to parse records, built from settings without calling its upstream (enabled
/// or not, with or without an API key).
pub fn offline_source(settings: &Settings, kind: SourceKind) -> Arc<dyn Source> {
    let metrics = Arc::new(Metrics::new());
    match kind {
        SourceKind::Healthie => Arc::new(Healthie::new(&settings.sources.healthie, metrics)),
        SourceKind::Intakeq => Arc::new(Intakeq::new(&settings.sources.intakeq, metrics)),
        SourceKind::Hint => Arc::new(Hint::new(&settings.sources.hint, metrics)),
    }
}

/// Imports every line of `reader` as a record of `source`.
#[instrument(skip_all, fields(source = %source.kind()))]
pub async fn import_lines<R: BufRead + Send>(
    store: &dyn Store,
    source: &dyn Source,
    reader: R,
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> Result<ImportSummary, ImportError> {
    let mut summary = ImportSummary::default();
    let mut batch: Vec<SourceRecord> = Vec::with_capacity(BATCH_LINES);
    for (index, line) in reader.split(b'\n').enumerate() {
        let number = index as u64 + 1;
        let bytes = line.map_err(ImportError::Read)?;
        let Ok(text) = std::str::from_utf8(&bytes) else {
            summary.lines += 1;
            reject(&mut summary, number, "not valid UTF-8".into());
            continue;
        };
        // A byte order mark before the first line (spreadsheet tools write one) is not data.
        let text = if index == 0 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        summary.lines += 1;
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                reject(
                    &mut summary,
                    number,
                    format!("not valid JSON (column {})", e.column()),
                );
                continue;
            }
        };
        let record = match source.parse_record(&value, now) {
            Ok(r) => r,
            Err(e) => {
                reject(&mut summary, number, describe(&e, source.kind()));
                continue;
            }
        };
        batch.push(record);
        if batch.len() >= BATCH_LINES {
            apply_batch(store, &batch, settings, now, &mut summary).await?;
            batch.clear();
        }
    }
    apply_batch(store, &batch, settings, now, &mut summary).await?;
    info!(
        lines = summary.lines,
        created = summary.created,
        updated = summary.updated,
        unchanged = summary.unchanged,
        stale = summary.stale,
        rejected = summary.rejected,
        "Import finished."
    );
    Ok(summary)
}

/// Applies one batch of parsed lines in one transaction and counts what each did.
async fn apply_batch(
    store: &dyn Store,
    batch: &[SourceRecord],
    settings: &IdentitySettings,
    now: DateTime<Utc>,
    summary: &mut ImportSummary,
) -> Result<(), ImportError> {
    if batch.is_empty() {
        return Ok(());
    }
    let records: Vec<&SourceRecord> = batch.iter().collect();
    let mut tx = store.begin().await?;
    for applied in apply_records(tx.as_mut(), &records, settings, now).await? {
        match applied.outcome {
            SaveOutcome::Created => summary.created += 1,
            SaveOutcome::Updated => summary.updated += 1,
            SaveOutcome::Unchanged => summary.unchanged += 1,
            SaveOutcome::Stale => summary.stale += 1,
        }
    }
    tx.commit().await?;
    Ok(())
}

fn reject(summary: &mut ImportSummary, line: u64, reason: String) {
    summary.rejected += 1;
    summary.rejected_lines.push(RejectedLine { line, reason });
}

/// A conversion error without any value: the field it failed on, or the shape.
fn describe(e: &ConvertError, source: SourceKind) -> String {
    match e {
        ConvertError::Missing(field) => format!("missing required field `{field}`"),
        ConvertError::Format(field) => format!("field `{field}` has an unexpected format"),
        ConvertError::Shape(_) => format!("not a {source} record"),
    }
}
