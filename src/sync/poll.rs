//! Incremental polling: walks every poll stream of a source from its stored cursor, page by
//! page, and queues what it finds in the inbox (origin `poll`), so polled data takes the same
//! inbox -> worker -> source record path as webhooks. It never touches canonical tables.
//!
//! Inbox items written (the sources' `plan` reads them back):
//! - `PollItem::Record` -> event `poll.record`, body = the record in the source's own shape,
//!   dedupe key `poll:<id>:<updated_at millis>` (or `poll:<id>:h<sha256 of the body>` when the
//!   record has no update time), so re-polling an unchanged record queues nothing;
//! - `PollItem::Changed` -> event `poll.changed`, body `{}`, no dedupe key (the worker coalesces
//!   refetches of one record);
//! - `PollItem::Deleted` -> event `poll.deleted`, body `{"id": …}`, dedupe key
//!   `poll:<id>:deleted` (IntakeQ lists a deletion for about 10 days).
//!
//! Every upstream request a poll makes runs in the bulk lane ([`bulk`]), so polls cannot take
//! the share of a credential's budget kept for live webhook work.
//!
//! The cursor is saved in `sync_state` after every page, so a poll stopped by an error or a
//! restart resumes where it was; `last_success_at` is set when a stream completes a pass.

use chrono::Utc;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::model::SourceKind;
use crate::sources::http::{bulk, FetchError};
use crate::sources::{PollItem, Source};
use crate::store::{now_ms, InsertOutcome, NewInboxItem, Origin, Store, StoreError, SyncState};

/// Inbox event types of polled items.
pub const EVENT_RECORD: &str = "poll.record";
pub const EVENT_CHANGED: &str = "poll.changed";
pub const EVENT_DELETED: &str = "poll.deleted";

/// A poll run never walks more pages than this per stream (a guard against a source whose
/// cursor never completes); the next run continues from the saved cursor.
pub const MAX_PAGES_PER_STREAM: u64 = 10_000;

/// Why a poll stopped. The cursor of every page before the failure is saved.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("polling {source_kind} stream {stream} failed")]
    Fetch {
        source_kind: SourceKind,
        stream: &'static str,
        #[source]
        source: FetchError,
    },
    #[error("storing polled {source_kind} stream {stream} failed")]
    Store {
        source_kind: SourceKind,
        stream: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("{source_kind} stream {stream} returned the same cursor without completing")]
    Stuck {
        source_kind: SourceKind,
        stream: &'static str,
    },
}

impl PollError {
    /// Worth running again later (rate limits, timeouts, a busy database).
    pub fn is_retryable(&self) -> bool {
        match self {
            PollError::Fetch { source, .. } => source.is_retryable(),
            PollError::Store { source, .. } => source.is_retryable(),
            PollError::Stuck { .. } => false,
        }
    }
}

/// What one stream's poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StreamSummary {
    pub stream: &'static str,
    pub pages: u64,
    pub records: u64,
    pub changed: u64,
    pub deleted: u64,
    /// Items newly put in the inbox.
    pub queued: u64,
    /// Items already in the inbox (same dedupe key).
    pub duplicates: u64,
    /// The stream finished a pass (false when the page guard stopped it).
    pub completed: bool,
}

/// What a poll of one source did, stream by stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PollSummary {
    pub source: SourceKind,
    pub streams: Vec<StreamSummary>,
}

impl PollSummary {
    pub fn queued(&self) -> u64 {
        self.streams.iter().map(|s| s.queued).sum()
    }
}

/// The `resource_type` the receiver uses for each source's patients.
fn resource_type(source: SourceKind) -> &'static str {
    match source {
        SourceKind::Healthie => "User",
        SourceKind::Intakeq => "Client",
        SourceKind::Hint => "patient",
    }
}

/// The inbox item for one polled item.
fn inbox_item(source: SourceKind, item: &PollItem, received_at_ms: i64) -> NewInboxItem {
    let (event_type, id, body, dedupe_key) = match item {
        PollItem::Record {
            id,
            updated_at,
            body,
        } => {
            let version = match updated_at {
                Some(t) => t.timestamp_millis().to_string(),
                None => format!(
                    "h{}",
                    hex::encode(Sha256::digest(body.to_string().as_bytes()))
                ),
            };
            (
                EVENT_RECORD,
                id,
                body.to_string(),
                Some(format!("poll:{id}:{version}")),
            )
        }
        PollItem::Changed(id) => (EVENT_CHANGED, id, "{}".to_string(), None),
        PollItem::Deleted(id) => (
            EVENT_DELETED,
            id,
            serde_json::json!({ "id": id }).to_string(),
            Some(format!("poll:{id}:deleted")),
        ),
    };
    NewInboxItem {
        source,
        origin: Origin::Poll,
        event_type: event_type.to_string(),
        resource_type: Some(resource_type(source).to_string()),
        resource_id: Some(id.to_string()),
        body,
        dedupe_key,
        received_at_ms,
        ignore_reason: None,
    }
}

/// Polls every stream of `source` from its stored cursor until each completes a pass.
#[tracing::instrument(skip_all, fields(source = %source.kind()))]
pub async fn poll_source(
    store: &dyn Store,
    source: &dyn Source,
    metrics: &Metrics,
) -> Result<PollSummary, PollError> {
    let kind = source.kind();
    let mut streams = Vec::new();
    for &stream in source.poll_streams() {
        let summary = poll_stream(store, source, metrics, stream).await?;
        tracing::info!(
            stream,
            pages = summary.pages,
            queued = summary.queued,
            duplicates = summary.duplicates,
            completed = summary.completed,
            "poll stream finished"
        );
        streams.push(summary);
    }
    Ok(PollSummary {
        source: kind,
        streams,
    })
}

async fn poll_stream(
    store: &dyn Store,
    source: &dyn Source,
    metrics: &Metrics,
    stream: &'static str,
) -> Result<StreamSummary, PollError> {
    let kind = source.kind();
    let store_err = |source| PollError::Store {
        source_kind: kind,
        stream,
        source,
    };
    let mut state = store
        .load_sync_state(kind, stream)
        .await
        .map_err(store_err)?
        .unwrap_or_else(|| SyncState {
            source: kind,
            stream: stream.to_string(),
            cursor: None,
            checkpoint: None,
            last_success_at: None,
            updated_at: Utc::now(),
        });
    let mut summary = StreamSummary {
        stream,
        ..StreamSummary::default()
    };
    while summary.pages < MAX_PAGES_PER_STREAM {
        // Polls are bulk work: they leave the live share of the budget to webhook refetches.
        let page = bulk(source.poll(stream, state.cursor.as_deref()))
            .await
            .map_err(|e| {
                metrics.inc(
                    "patient_sync_poll_errors_total",
                    "Poll pages that failed, by source, stream and error kind.",
                    &[
                        ("source", kind.as_str()),
                        ("stream", stream),
                        ("kind", e.kind()),
                    ],
                    1,
                );
                PollError::Fetch {
                    source_kind: kind,
                    stream,
                    source: e,
                }
            })?;
        summary.pages += 1;
        let received_at_ms = now_ms();
        for item in &page.items {
            match item {
                PollItem::Record { .. } => summary.records += 1,
                PollItem::Changed(_) => summary.changed += 1,
                PollItem::Deleted(_) => summary.deleted += 1,
            }
            let outcome = store
                .insert_inbox(&inbox_item(kind, item, received_at_ms))
                .await
                .map_err(store_err)?;
            let label = match outcome {
                InsertOutcome::Inserted(_) => {
                    summary.queued += 1;
                    metrics.inc(
                        crate::metrics::EVENTS_RECEIVED,
                        crate::metrics::EVENTS_RECEIVED_HELP,
                        &[("source", kind.as_str()), ("origin", "poll")],
                        1,
                    );
                    "queued"
                }
                InsertOutcome::Duplicate => {
                    summary.duplicates += 1;
                    "duplicate"
                }
            };
            metrics.inc(
                "patient_sync_poll_items_total",
                "Polled items by source, stream and outcome (queued or duplicate).",
                &[
                    ("source", kind.as_str()),
                    ("stream", stream),
                    ("outcome", label),
                ],
                1,
            );
        }
        let stuck = !page.complete && page.next_cursor == state.cursor;
        let now = Utc::now();
        state.cursor = page.next_cursor;
        state.updated_at = now;
        if page.complete {
            state.last_success_at = Some(now);
        }
        store.save_sync_state(&state).await.map_err(store_err)?;
        if page.complete {
            summary.completed = true;
            metrics.set(
                "patient_sync_poll_last_success_timestamp_seconds",
                "When each poll stream last completed a pass (Unix seconds).",
                &[("source", kind.as_str()), ("stream", stream)],
                now.timestamp() as f64,
            );
            break;
        }
        if stuck {
            return Err(PollError::Stuck {
                source_kind: kind,
                stream,
            });
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests;
