//! Upstream systems: one module per source with the same shape (client, wire types, conversion,
//! webhook parsing), and the shared HTTP layer every upstream request goes through.
//!
//! The worker sees every source through [`Source`]: `plan` reads an inbox item (no IO) and says
//! what it asks for; `fetch_records` fetches current snapshots, batched where the API allows.

pub mod healthie;
pub mod hint;
pub mod http;
pub mod intakeq;
pub mod shared_limit;

use async_trait::async_trait;

use crate::model::{SourceId, SourceKind, SourceRecord};
use crate::store::InboxItem;
use http::FetchError;

/// What an inbox item asks the worker to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Refetch these records from the source (thin webhooks, id hints, polls).
    Fetch(Vec<SourceId>),
    /// The item carries the full record already (Hint webhooks, imports): apply it as is.
    Apply(Box<SourceRecord>),
    /// `from` was merged into `into` upstream: retire `from`, fold its patient into `into`'s,
    /// and refetch both.
    Merge { from: SourceId, into: SourceId },
    /// Nothing to do; the reason is stored on the item (no PHI).
    Ignore(String),
}

/// Why an inbox item could not be planned (a malformed stored body). Dead-lettered, not retried.
#[derive(Debug, thiserror::Error)]
#[error("cannot plan inbox item: {what}")]
pub struct PlanError {
    pub what: &'static str,
}

/// Why a payload could not be converted into a source record. Names the field, never its value.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("payload is not valid JSON for this source ({0})")]
    Shape(String),
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    #[error("field `{0}` has an unexpected format")]
    Format(&'static str),
}

/// One page of an incremental poll or a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct PollPage {
    pub items: Vec<PollItem>,
    /// Where the next call continues (opaque to callers; stored in `sync_state` after every
    /// page, so a poll resumes where it stopped).
    pub next_cursor: Option<String>,
    /// True when this stream has nothing more for now; `next_cursor` then starts the next pass.
    pub complete: bool,
}

/// What a poll found.
#[derive(Debug, Clone, PartialEq)]
pub enum PollItem {
    /// A full record in the source's own API shape (applied without a refetch).
    Record {
        id: SourceId,
        updated_at: Option<chrono::DateTime<chrono::Utc>>,
        body: serde_json::Value,
    },
    /// Only an id: the worker refetches it.
    Changed(SourceId),
    /// The source reports this record deleted.
    Deleted(SourceId),
}

impl ConvertError {
    /// The same failure as a fetch error: the field at fault, or `record` when the whole
    /// payload has the wrong shape. Carries no value.
    pub fn into_fetch_error(self, record: &'static str) -> FetchError {
        FetchError::Decode {
            what: match self {
                ConvertError::Missing(field) | ConvertError::Format(field) => field,
                ConvertError::Shape(_) => record,
            },
        }
    }
}

/// A birth date written as text: `YYYY-MM-DD`, a timestamp whose date part is taken as is
/// (`YYYY-MM-DDT...` or `YYYY-MM-DD ...`), or the ISO 8601 basic form `YYYYMMDD`. Any other
/// form (`01/02/1980` could be either of two dates) is `None`.
pub fn parse_birth_date(text: &str) -> Option<chrono::NaiveDate> {
    let text = text.trim();
    if text.len() == 8 && text.bytes().all(|b| b.is_ascii_digit()) {
        return chrono::NaiveDate::parse_from_str(text, "%Y%m%d").ok();
    }
    let date = text.get(..10)?;
    let rest = &text[10..];
    if !(rest.is_empty() || rest.starts_with('T') || rest.starts_with(' ')) {
        return None;
    }
    chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()
}

/// A record the source reports deleted, with no fields: its last known values stay in the
/// stored snapshot history only through `raw`.
pub fn tombstone(
    key: crate::model::SourceKey,
    seen_at: chrono::DateTime<chrono::Utc>,
    raw: serde_json::Value,
) -> SourceRecord {
    SourceRecord {
        key,
        fields: crate::model::PersonFields::default(),
        status: crate::model::RecordStatus::Deleted,
        merged_into: None,
        source_updated_at: Some(seen_at),
        fetched_at: seen_at,
        raw,
    }
}

/// One upstream, as the worker uses it.
#[async_trait]
pub trait Source: Send + Sync {
    fn kind(&self) -> SourceKind;

    /// Reads a stored inbox item and decides what it asks for. Pure: no IO.
    fn plan(&self, item: &InboxItem) -> Result<Plan, PlanError>;

    /// Fetches the current snapshot of each id; `Ok(None)` means the source does not know it
    /// (or no longer shows it). Batched where the API allows; one result per id, in order.
    async fn fetch_records(
        &self,
        ids: &[SourceId],
    ) -> Vec<(SourceId, Result<Option<SourceRecord>, FetchError>)>;

    /// Poll streams this source has (e.g. `updated`, `deleted`), polled in this order.
    fn poll_streams(&self) -> &'static [&'static str];

    /// Fetches one page of `stream` from `cursor` (None: the source's own starting point).
    async fn poll(&self, stream: &str, cursor: Option<&str>) -> Result<PollPage, FetchError>;

    /// The credential's daily request budget, for sources that have one (IntakeQ).
    fn budget(&self) -> Option<http::BudgetSnapshot> {
        None
    }

    /// Takes back a budget saved by an earlier process sharing the credential.
    fn restore_budget(&self, _snapshot: &http::BudgetSnapshot) {}

    /// Converts one record in this source's own API shape (as `import` reads them) into a
    /// source record.
    fn parse_record(
        &self,
        value: &serde_json::Value,
        fetched_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<SourceRecord, ConvertError>;

    /// How many distinct records one fetch request can carry (Healthie's `users(ids:)`); the
    /// worker gathers up to this many before fetching. 1: no batching.
    fn fetch_batch_size(&self) -> usize {
        1
    }

    /// How long a worker may wait for more refetches when it has fewer than
    /// [`Self::fetch_batch_size`] in hand (zero: never).
    fn batch_window(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// For a batching source: the turn the process's workers take one at a time to claim and
    /// fetch a batch, so a trickle of events becomes one full request rather than one small
    /// request per worker queueing at the rate limiter. `None`: no turns.
    fn fetch_turn(&self) -> Option<std::sync::Arc<tokio::sync::Mutex<()>>> {
        None
    }

    /// The credential's upstream (its limiters), for sharing them across processes.
    fn upstream(&self) -> Option<&http::Upstream> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::parse_birth_date;
    use chrono::NaiveDate;

    #[test]
    fn birth_dates_are_read_in_iso_forms_only() {
        let date = NaiveDate::from_ymd_opt(1984, 7, 19);
        let cases = [
            (" 1984-07-19 ", date),
            ("1984-07-19T23:59:59+09:00", date),
            ("1984-07-19 00:00:00 UTC", date),
            ("19840719", date),
            ("07/19/1984", None),
            ("19/07/1984", None),
            ("1984-07-19x", None),
            ("1984-13-19", None),
            ("19841319", None),
            ("1984719", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_birth_date(text), want, "{text}");
        }
    }
}
