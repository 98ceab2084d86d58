//! `export`: streams the `patients` table (or, with `as_of`, the table as it was at a time, from
//! `patient_history`) page by page as CSV with a header or as JSON Lines. A file is written under
//! a temporary name in its directory and renamed when complete, so a failed export leaves no
//! partial file behind. Logs carry counts only.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::model::PatientId;
use crate::store::{PatientRow, Store, StoreError};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header line; NULL is an empty field.
    Csv,
    /// One JSON object per line; NULL is `null`.
    Jsonl,
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: ExportFormat,
    /// Also write rows with `status = 'merged'`.
    pub include_merged: bool,
    /// The table as it was at this time (from `patient_history`) instead of now.
    pub as_of: Option<DateTime<Utc>>,
    /// Rows read per page.
    pub page_size: u32,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            format: ExportFormat::Csv,
            include_merged: false,
            as_of: None,
            page_size: 1_000,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    pub rows: u64,
    /// Merged rows left out (without `include_merged`).
    pub merged_skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("reading patients failed")]
    Store(#[from] StoreError),
    #[error("writing the export failed")]
    Write(#[source] std::io::Error),
    #[error("cannot write the export file {}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The exported columns, in `patients` table order.
pub const COLUMNS: [&str; 24] = [
    "patient_id",
    "given_name",
    "middle_name",
    "family_name",
    "preferred_name",
    "birth_date",
    "sex",
    "gender_identity",
    "email",
    "phone",
    "address_line1",
    "address_line2",
    "city",
    "state",
    "postal_code",
    "country",
    "healthie_id",
    "intakeq_id",
    "hint_id",
    "status",
    "merged_into",
    "first_seen_at",
    "updated_at",
    "version",
];

fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// One row's values in [`COLUMNS`] order; `None` is NULL.
fn values(row: &PatientRow) -> [Option<String>; 24] {
    let s = |v: &Option<String>| v.clone();
    [
        Some(row.patient_id.0.clone()),
        s(&row.given_name),
        s(&row.middle_name),
        s(&row.family_name),
        s(&row.preferred_name),
        row.birth_date.map(|d| d.format("%Y-%m-%d").to_string()),
        s(&row.sex),
        s(&row.gender_identity),
        s(&row.email),
        s(&row.phone),
        s(&row.address_line1),
        s(&row.address_line2),
        s(&row.city),
        s(&row.state),
        s(&row.postal_code),
        s(&row.country),
        s(&row.healthie_id),
        s(&row.intakeq_id),
        s(&row.hint_id),
        Some(row.status.clone()),
        row.merged_into.as_ref().map(|m| m.0.clone()),
        Some(time(&row.first_seen_at)),
        Some(time(&row.updated_at)),
        Some(row.version.to_string()),
    ]
}

/// Quotes a CSV field when it holds a comma, a quote or a line break (RFC 4180).
pub fn csv_field(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\"")).into()
    } else {
        value.into()
    }
}

fn write_csv_line<W: Write>(out: &mut W, fields: &[Option<String>]) -> std::io::Result<()> {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        if let Some(v) = field {
            out.write_all(csv_field(v).as_bytes())?;
        }
    }
    out.write_all(b"\r\n")
}

fn write_row<W: Write>(out: &mut W, format: ExportFormat, row: &PatientRow) -> std::io::Result<()> {
    match format {
        ExportFormat::Csv => write_csv_line(out, &values(row)),
        ExportFormat::Jsonl => {
            let mut object = serde_json::Map::new();
            for (name, value) in COLUMNS.iter().zip(values(row)) {
                let value = match (*name, value) {
                    (_, None) => serde_json::Value::Null,
                    ("version", Some(_)) => serde_json::Value::from(row.version),
                    (_, Some(v)) => serde_json::Value::String(v),
                };
                object.insert((*name).to_string(), value);
            }
            serde_json::to_writer(&mut *out, &object)?;
            out.write_all(b"\n")
        }
    }
}

/// Streams every row (merged ones only with `include_merged`) to `out`, page by page.
pub async fn export_patients<W: Write>(
    store: &dyn Store,
    options: &ExportOptions,
    out: &mut W,
) -> Result<ExportSummary, ExportError> {
    let mut summary = ExportSummary::default();
    if options.format == ExportFormat::Csv {
        let header: Vec<Option<String>> = COLUMNS.iter().map(|c| Some(c.to_string())).collect();
        write_csv_line(out, &header).map_err(ExportError::Write)?;
    }
    let mut after: Option<PatientId> = None;
    loop {
        let page: Vec<PatientRow> = match options.as_of {
            Some(at) => store
                .load_patients_as_of_page(at, after.as_ref(), options.page_size.max(1))
                .await?
                .into_iter()
                .map(|v| v.row)
                .collect(),
            None => {
                store
                    .load_patients_page(after.as_ref(), options.page_size.max(1))
                    .await?
            }
        };
        let Some(last) = page.last() else { break };
        after = Some(last.patient_id.clone());
        for row in &page {
            if row.status == "merged" && !options.include_merged {
                summary.merged_skipped += 1;
                continue;
            }
            write_row(out, options.format, row).map_err(ExportError::Write)?;
            summary.rows += 1;
        }
    }
    out.flush().map_err(ExportError::Write)?;
    Ok(summary)
}

/// Exports to `path`: written to a temporary file beside it, synced, then renamed over it. On
/// any failure the temporary file is removed and `path` is left as it was.
pub async fn export_to_file(
    store: &dyn Store,
    options: &ExportOptions,
    path: &Path,
) -> Result<ExportSummary, ExportError> {
    let file_err = |source| ExportError::File {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| file_err(std::io::Error::other("not a file name")))?;
    let temp = path.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = async {
        let file = std::fs::File::create(&temp).map_err(file_err)?;
        let mut out = std::io::BufWriter::new(file);
        let summary = export_patients(store, options, &mut out).await?;
        let file = out
            .into_inner()
            .map_err(|e| ExportError::Write(e.into_error()))?;
        file.sync_all().map_err(file_err)?;
        std::fs::rename(&temp, path).map_err(file_err)?;
        Ok(summary)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("cr\r"), "\"cr\r\"");
        assert_eq!(csv_field(""), "");
    }

    #[test]
    fn a_row_has_one_value_per_column_and_nulls_stay_empty() {
        let row = PatientRow {
            patient_id: PatientId("p1".into()),
            given_name: Some("O'Brien, Jr.".into()),
            status: "active".into(),
            version: 3,
            ..Default::default()
        };
        let mut out = Vec::new();
        write_row(&mut out, ExportFormat::Csv, &row).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert!(line.starts_with("p1,\"O'Brien, Jr.\",,"), "{line}");
        assert!(line.ends_with(",3\r\n"), "{line}");
        let mut out = Vec::new();
        write_row(&mut out, ExportFormat::Jsonl, &row).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value.as_object().unwrap().len(), COLUMNS.len());
        assert_eq!(value["version"], 3);
        assert!(value["middle_name"].is_null());
        assert_eq!(value["given_name"], "O'Brien, Jr.");
    }
}
