//! Hint Health: REST client, wire shapes, conversion into source records, inbox planning and
//! incremental polling.
//!
//! Hint webhooks carry the full patient (`{id, type, practice_id, created_at, object}`), so
//! most inbox items apply without a refetch; membership events name patients to refetch. The
//! poll is the backstop for webhooks Hint muted or dropped.
//!
//! Poll stream `updated` (cursor JSON, stored in `sync_state` after every page):
//! `GET /api/provider/patients?filter=all&limit=100&sort=updated_at&updated_at[gte]=T&offset=K`,
//! walked as a keyset: after each page `T` becomes the last row's `updated_at` and `K` the
//! number of rows already taken at exactly `T`. Unlike offset paging over a fixed filter, a
//! patient updated mid-pass cannot shift an unseen one past us, and `gte` with the tie count
//! (rather than `gt`) loses nothing when a page ends inside a run of equal timestamps. A pass
//! ends on a short page or when `K` + rows reaches `x-total-count`; the next pass starts
//! `overlap` (60 s) before the newest `updated_at` seen, never earlier than this pass's start.
//! The first pass has no filter (a full sweep).
//!
//! Hint's derived spec lists only `limit`, `offset` and `filter` for patients, so the filter and
//! sort may be ignored. When a page holds a row older than the filter, or rows out of order,
//! the pass falls back to a plain offset sweep of the whole list from offset 0, keeping rows
//! updated at or after the pass start (metric `patient_sync_poll_fallback_total`).
//! Cursor: `{"start": T0|null, "since": T|null, "skip": K, "sweep": null|{"offset": N, "high": T|null}}`.

pub mod client;
pub mod convert;
pub mod wire;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use governor::Quota;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::HintSettings;
use crate::metrics::Metrics;
use crate::model::{RecordStatus, SourceId, SourceKind, SourceRecord};
use crate::sources::http::{Clock, FetchError, SystemClock, Upstream, UpstreamPolicy};
use crate::sources::{ConvertError, Plan, PlanError, PollItem, PollPage, Source};
use crate::store::InboxItem;

pub use client::{HintClient, PatientPage, PatientQuery};
pub use convert::ConvertOptions;

/// The stream of changed patients.
pub const STREAM_UPDATED: &str = "updated";

/// Inbox event types written by `sync::poll` that [`Hint::plan`] understands.
pub const EVENT_POLL_RECORD: &str = "poll.record";
pub const EVENT_POLL_CHANGED: &str = "poll.changed";
pub const EVENT_POLL_DELETED: &str = "poll.deleted";

/// Knobs beyond the configuration file.
#[derive(Clone)]
pub struct HintOptions {
    pub convert: ConvertOptions,
    /// Replaces [`Hint::policy`] (tests use short pauses).
    pub policy: Option<UpstreamPolicy>,
    /// How far before the newest `updated_at` seen the next poll pass starts.
    pub overlap: chrono::Duration,
    /// Fetch times of refetched records.
    pub clock: Arc<dyn Clock>,
}

impl Default for HintOptions {
    fn default() -> Self {
        Self {
            convert: ConvertOptions::default(),
            policy: None,
            overlap: chrono::Duration::seconds(60),
            clock: Arc::new(SystemClock),
        }
    }
}

/// The Hint source for one practice key.
pub struct Hint {
    client: HintClient,
    convert: ConvertOptions,
    overlap: chrono::Duration,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PollCursor {
    /// Rows updated at or after this belong to the pass (None: everything).
    #[serde(default)]
    start: Option<DateTime<Utc>>,
    /// Keyset position.
    #[serde(default)]
    since: Option<DateTime<Utc>>,
    /// Rows at exactly `since` already taken.
    #[serde(default)]
    skip: u32,
    /// Set when the server ignored the filter or the sort.
    #[serde(default)]
    sweep: Option<Sweep>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Sweep {
    offset: u32,
    #[serde(default)]
    high: Option<DateTime<Utc>>,
}

impl Hint {
    pub fn new(settings: &HintSettings, metrics: Arc<Metrics>) -> Self {
        Self::with_options(settings, metrics, HintOptions::default())
    }

    pub fn with_options(
        settings: &HintSettings,
        metrics: Arc<Metrics>,
        options: HintOptions,
    ) -> Self {
        let mut policy = options.policy.unwrap_or_else(|| Self::policy(settings));
        // The detail-fetch cap is the upstream's too, so bulk work leaves slots for live work.
        policy.max_concurrent = Some(settings.max_concurrent_requests.max(1));
        let upstream = Upstream::new(SourceKind::Hint, policy, metrics.clone())
            .with_live_reserve(settings.live_reserved_share);
        Self {
            client: HintClient::new(
                &settings.base_url,
                settings.api_key.clone(),
                settings.max_concurrent_requests,
                upstream,
            ),
            convert: options.convert,
            overlap: options.overlap,
            clock: options.clock,
            metrics,
        }
    }

    /// `requests_per_second` evenly spaced (a burst and a refill would exceed Hint's 20 in a
    /// second); a 429 (`Enhance your calm`, no `Retry-After`) pauses 1 s, doubling, jittered.
    pub fn policy(settings: &HintSettings) -> UpstreamPolicy {
        let per_second = NonZeroU32::new(settings.requests_per_second.max(1)).expect("max(1)");
        UpstreamPolicy {
            quotas: vec![Quota::per_second(per_second).allow_burst(NonZeroU32::MIN)],
            max_concurrent: None,
            timeout: Duration::from_millis(settings.timeout_ms),
            max_retry_elapsed: Duration::from_secs(20),
            retry_initial: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
            rate_limit_pause: Duration::from_secs(1),
        }
    }

    pub fn client(&self) -> &HintClient {
        &self.client
    }

    /// Converts a patient object into a source record.
    pub fn parse_patient(
        &self,
        value: &Value,
        fetched_at: DateTime<Utc>,
    ) -> Result<SourceRecord, ConvertError> {
        convert::parse_patient(value, fetched_at, &self.convert)
    }

    fn record_item(&self, row: &Value) -> Option<PollItem> {
        match wire::patient_id(row) {
            Some(id) => Some(PollItem::Record {
                id: SourceId(id),
                updated_at: wire::updated_at(row),
                body: row.clone(),
            }),
            None => {
                self.metrics.inc(
                    "patient_sync_poll_skipped_rows_total",
                    "Rows a poll could not use (no id), by source, stream and reason.",
                    &[
                        ("source", "hint"),
                        ("stream", STREAM_UPDATED),
                        ("reason", "no_id"),
                    ],
                    1,
                );
                tracing::warn!(
                    source = "hint",
                    stream = STREAM_UPDATED,
                    "skipped a polled row without an id"
                );
                None
            }
        }
    }

    /// Where the next pass starts once this one has reached `reached`.
    fn next_start(
        &self,
        start: Option<DateTime<Utc>>,
        reached: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        let candidate = reached.map(|r| r - self.overlap);
        match (start, candidate) {
            (Some(s), Some(c)) => Some(s.max(c)),
            (s, c) => c.or(s),
        }
    }

    fn fallback(&self, reason: &'static str) {
        self.metrics.inc(
            "patient_sync_poll_fallback_total",
            "Poll passes that fell back to a full sweep, by source and reason.",
            &[("source", "hint"), ("reason", reason)],
            1,
        );
        tracing::warn!(
            source = "hint",
            reason,
            "patient filter not honoured; falling back to a full sweep"
        );
    }

    async fn poll_updated(&self, cursor: Option<&str>) -> Result<PollPage, FetchError> {
        let c: PollCursor = match cursor.map(serde_json::from_str) {
            None => PollCursor::default(),
            Some(Ok(c)) => c,
            Some(Err(_)) => {
                tracing::warn!(
                    source = "hint",
                    "unreadable poll cursor; starting the stream over"
                );
                PollCursor::default()
            }
        };
        let limit = wire::MAX_LIMIT;
        let finished = |start: Option<DateTime<Utc>>| PollCursor {
            start,
            since: start,
            skip: 0,
            sweep: None,
        };
        if let Some(sweep) = &c.sweep {
            let page = self
                .client
                .fetch_patients(&PatientQuery {
                    offset: sweep.offset,
                    limit,
                    sort: Some("updated_at"),
                    updated_since: c.start,
                })
                .await?;
            let kept: Vec<&Value> = page
                .rows
                .iter()
                .filter(|row| match (c.start, wire::updated_at(row)) {
                    (Some(start), Some(t)) => t >= start,
                    _ => true,
                })
                .collect();
            let high = kept
                .iter()
                .filter_map(|row| wire::updated_at(row))
                .chain(sweep.high)
                .max();
            let taken = sweep.offset as u64 + page.rows.len() as u64;
            let complete =
                page.rows.len() < limit as usize || page.total.is_some_and(|total| taken >= total);
            let next = if complete {
                finished(self.next_start(c.start, high))
            } else {
                PollCursor {
                    sweep: Some(Sweep {
                        offset: sweep.offset + page.rows.len() as u32,
                        high,
                    }),
                    ..c.clone()
                }
            };
            return Ok(PollPage {
                items: kept
                    .into_iter()
                    .filter_map(|r| self.record_item(r))
                    .collect(),
                next_cursor: Some(serde_json::to_string(&next).expect("cursor serializes")),
                complete,
            });
        }

        let page = self
            .client
            .fetch_patients(&PatientQuery {
                offset: c.skip,
                limit,
                sort: Some("updated_at"),
                updated_since: c.since,
            })
            .await?;
        let times: Vec<Option<DateTime<Utc>>> = page.rows.iter().map(wire::updated_at).collect();
        let older_than_filter = c
            .since
            .is_some_and(|since| times.iter().any(|t| t.is_some_and(|t| t < since)));
        let out_of_order =
            times.iter().any(Option::is_none) || times.windows(2).any(|w| w[0] > w[1]);
        if older_than_filter || out_of_order {
            self.fallback(if older_than_filter {
                "filter_ignored"
            } else {
                "sort_ignored"
            });
            let items = page
                .rows
                .iter()
                .zip(&times)
                .filter(|(_, t)| match (c.start, t) {
                    (Some(start), Some(t)) => *t >= start,
                    _ => true,
                })
                .filter_map(|(row, _)| self.record_item(row))
                .collect();
            let next = PollCursor {
                start: c.start,
                since: c.start,
                skip: 0,
                sweep: Some(Sweep::default()),
            };
            return Ok(PollPage {
                items,
                next_cursor: Some(serde_json::to_string(&next).expect("cursor serializes")),
                complete: false,
            });
        }

        let items: Vec<PollItem> = page
            .rows
            .iter()
            .filter_map(|r| self.record_item(r))
            .collect();
        let (since, skip) = match times.last().copied().flatten() {
            None => (c.since, c.skip),
            Some(last) => {
                let ties = times.iter().filter(|t| **t == Some(last)).count() as u32;
                if Some(last) == c.since {
                    (Some(last), c.skip + ties)
                } else {
                    (Some(last), ties)
                }
            }
        };
        let complete = page.rows.len() < limit as usize
            || page
                .total
                .is_some_and(|total| c.skip as u64 + page.rows.len() as u64 >= total);
        let next = if complete {
            finished(self.next_start(c.start, since))
        } else {
            PollCursor {
                start: c.start,
                since,
                skip,
                sweep: None,
            }
        };
        Ok(PollPage {
            items,
            next_cursor: Some(serde_json::to_string(&next).expect("cursor serializes")),
            complete,
        })
    }

    /// The record a patient webhook carries, with the status its event implies.
    fn plan_patient_event(
        &self,
        event_type: &str,
        envelope: &wire::Envelope<'_>,
        received: DateTime<Utc>,
    ) -> Result<Plan, PlanError> {
        let object = envelope.object.ok_or(PlanError {
            what: "hint patient event without an object",
        })?;
        let mut record = self
            .parse_patient(object, received)
            .map_err(|_| PlanError {
                what: "hint patient event object is not a patient",
            })?;
        let merged = record.status == RecordStatus::Merged;
        match event_type {
            "patient.destroyed" if !merged => {
                record.status = RecordStatus::Deleted;
                // The deletion is newer than the last state the object shows.
                record.source_updated_at = record
                    .source_updated_at
                    .into_iter()
                    .chain(envelope.created_at)
                    .max()
                    .or(Some(received));
            }
            "patient.inactive" if !merged => record.status = RecordStatus::Archived,
            _ => {}
        }
        Ok(Plan::Apply(Box::new(record)))
    }
}

fn received_at(item: &InboxItem) -> Result<DateTime<Utc>, PlanError> {
    DateTime::from_timestamp_millis(item.received_at_ms).ok_or(PlanError {
        what: "received_at_ms out of range",
    })
}

/// A patient id as the inbox item names it: `resource_id`, else the body's `id`.
fn named_patient(item: &InboxItem, body: Option<&Value>) -> Option<String> {
    item.resource_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .or_else(|| body.and_then(wire::patient_id))
}

#[async_trait]
impl Source for Hint {
    fn kind(&self) -> SourceKind {
        SourceKind::Hint
    }

    /// - webhook `patient.created|updated`: `Apply` of the object (merged when `merged_into`).
    /// - webhook `patient.destroyed`: `Apply` with status deleted (merged stays merged).
    /// - webhook `patient.inactive`: `Apply` with status archived.
    /// - webhook `membership.*`: `Fetch` of the patients the membership names.
    /// - other webhook types: `Ignore` (Hint adds types without notice).
    /// - `poll.record`: `Apply`; `poll.changed`: `Fetch`; `poll.deleted`: `Apply` of a tombstone.
    /// - anything else (import, resync, manual): `Apply` of a patient body, else `Fetch` of the
    ///   id it names, else `Ignore`.
    fn plan(&self, item: &InboxItem) -> Result<Plan, PlanError> {
        let body: Option<Value> = serde_json::from_str(&item.body).ok();
        let received = received_at(item)?;
        if item.origin == "webhook" {
            let body = body.ok_or(PlanError {
                what: "hint webhook body is not JSON",
            })?;
            let envelope = wire::Envelope::read(&body);
            let event_type = envelope
                .event_type
                .clone()
                .unwrap_or_else(|| item.event_type.clone());
            return match event_type.as_str() {
                "patient.created" | "patient.updated" | "patient.destroyed"
                | "patient.inactive" => self.plan_patient_event(&event_type, &envelope, received),
                t if t.starts_with("membership.") => {
                    let ids = envelope
                        .object
                        .map(wire::membership_patient_ids)
                        .unwrap_or_default();
                    Ok(if ids.is_empty() {
                        Plan::Ignore("hint membership event names no patient".into())
                    } else {
                        Plan::Fetch(ids.into_iter().map(SourceId).collect())
                    })
                }
                t => Ok(Plan::Ignore(format!(
                    "hint event type {} not handled",
                    t.chars().take(64).collect::<String>()
                ))),
            };
        }
        match item.event_type.as_str() {
            EVENT_POLL_RECORD => {
                let body = body.ok_or(PlanError {
                    what: "hint poll.record body is not JSON",
                })?;
                let record = self.parse_patient(&body, received).map_err(|_| PlanError {
                    what: "hint poll.record body is not a patient",
                })?;
                Ok(Plan::Apply(Box::new(record)))
            }
            EVENT_POLL_CHANGED => named_patient(item, body.as_ref())
                .map(|id| Plan::Fetch(vec![SourceId(id)]))
                .ok_or(PlanError {
                    what: "hint poll.changed names no patient",
                }),
            EVENT_POLL_DELETED => {
                let id = named_patient(item, body.as_ref()).ok_or(PlanError {
                    what: "hint poll.deleted names no patient",
                })?;
                let raw = body.unwrap_or_else(|| serde_json::json!({ "id": id }));
                Ok(Plan::Apply(Box::new(convert::tombstone(
                    SourceId(id),
                    received,
                    raw,
                ))))
            }
            _ => {
                if let Some(b) = body.as_ref().filter(|b| wire::is_patient(b)) {
                    if let Ok(record) = self.parse_patient(b, received) {
                        return Ok(Plan::Apply(Box::new(record)));
                    }
                }
                Ok(match named_patient(item, body.as_ref()) {
                    Some(id) => Plan::Fetch(vec![SourceId(id)]),
                    None => Plan::Ignore("hint item names no patient".into()),
                })
            }
        }
    }

    /// Detail fetches, at most `max_concurrent_requests` in flight, results in input order.
    async fn fetch_records(
        &self,
        ids: &[SourceId],
    ) -> Vec<(SourceId, Result<Option<SourceRecord>, FetchError>)> {
        stream::iter(ids.iter().cloned())
            .map(|id| async move {
                let result = match self.client.fetch_patient(id.as_str()).await {
                    Ok(Some(value)) => self
                        .parse_patient(&value, self.clock.now())
                        .map(Some)
                        .map_err(|e: ConvertError| e.into_fetch_error("hint patient")),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                (id, result)
            })
            .buffered(self.client.max_concurrent())
            .collect()
            .await
    }

    fn poll_streams(&self) -> &'static [&'static str] {
        &[STREAM_UPDATED]
    }

    async fn poll(&self, stream: &str, cursor: Option<&str>) -> Result<PollPage, FetchError> {
        match stream {
            STREAM_UPDATED => self.poll_updated(cursor).await,
            _ => Err(FetchError::Rejected {
                kind: "unknown_stream",
                status: None,
            }),
        }
    }

    fn parse_record(
        &self,
        value: &Value,
        fetched_at: DateTime<Utc>,
    ) -> Result<SourceRecord, ConvertError> {
        self.parse_patient(value, fetched_at)
    }

    fn upstream(&self) -> Option<&crate::sources::http::Upstream> {
        Some(self.client.upstream())
    }
}

#[cfg(test)]
mod tests;
