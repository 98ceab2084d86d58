//! IntakeQ (PracticeQ): REST client, wire shapes, conversion into source records, inbox
//! planning and incremental polling.
//!
//! IntakeQ sends no client webhook and signs nothing: intake and appointment webhooks only say
//! "client N probably changed" (the receiver puts the `ClientId` in `resource_id`), so the
//! worker refetches. Everything else comes from polling, within 10 requests a minute and 500 a
//! day per API key. One [`Intakeq`] holds that key's limiters and daily budget: build one per
//! process and share it (an `Arc`) between the worker, pollers, resync and import.
//!
//! Poll streams (cursors are JSON, stored in `sync_state` after every page):
//! - `updated`: `GET /clients?includeProfile=true&page=N[&dateUpdatedStart=D]`. The first pass
//!   has no date (a full sweep). Each later pass starts at the day before the UTC day the
//!   previous pass started on, which covers the filter's day granularity and whatever timezone
//!   IntakeQ reads the date in. Rows are full profiles, returned as `PollItem::Record` (no
//!   refetch); a row without a profile becomes `PollItem::Changed`.
//!   Cursor: `{"from": "YYYY-MM-DD"|null, "page": N, "started": "YYYY-MM-DD"|null}`.
//! - `deleted`: `GET /clients?deletedOnly=true&page=N`, every pass from page 1 (deleted clients
//!   stay visible about 10 days, so run it at least daily), as `PollItem::Deleted`.
//!   Cursor: `{"page": N}`.

pub mod client;
pub mod convert;
pub mod wire;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use governor::Quota;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::IntakeqSettings;
use crate::metrics::Metrics;
use crate::model::{SourceId, SourceKind, SourceRecord};
use crate::sources::http::{
    BudgetSnapshot, Clock, DailyBudget, FetchError, SystemClock, Upstream, UpstreamPolicy,
};
use crate::sources::{ConvertError, Plan, PlanError, PollItem, PollPage, Source};
use crate::store::InboxItem;

pub use client::{ClientQuery, IntakeqClient};
pub use convert::ConvertOptions;

/// The stream of changed clients.
pub const STREAM_UPDATED: &str = "updated";
/// The sweep of deleted clients.
pub const STREAM_DELETED: &str = "deleted";

/// Inbox event types written by `sync::poll` that [`Intakeq::plan`] understands.
pub const EVENT_POLL_RECORD: &str = "poll.record";
pub const EVENT_POLL_CHANGED: &str = "poll.changed";
pub const EVENT_POLL_DELETED: &str = "poll.deleted";

/// Knobs beyond the configuration file (tests and deployments that know better).
#[derive(Clone)]
pub struct IntakeqOptions {
    /// Time for the daily budget and poll watermarks.
    pub clock: Arc<dyn Clock>,
    /// When IntakeQ's daily counter resets, as a UTC time of day. The reference does not say;
    /// midnight UTC is assumed.
    pub daily_reset_utc: NaiveTime,
    pub convert: ConvertOptions,
    /// Replaces [`Intakeq::policy`] (tests use short pauses).
    pub policy: Option<UpstreamPolicy>,
}

impl Default for IntakeqOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            daily_reset_utc: NaiveTime::MIN,
            convert: ConvertOptions::default(),
            policy: None,
        }
    }
}

/// The IntakeQ source for one API key.
pub struct Intakeq {
    client: IntakeqClient,
    budget: Arc<DailyBudget>,
    clock: Arc<dyn Clock>,
    convert: ConvertOptions,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct UpdatedCursor {
    #[serde(default)]
    from: Option<NaiveDate>,
    page: u32,
    #[serde(default)]
    started: Option<NaiveDate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DeletedCursor {
    page: u32,
}

impl Intakeq {
    pub fn new(settings: &IntakeqSettings, metrics: Arc<Metrics>) -> Self {
        Self::with_options(settings, metrics, IntakeqOptions::default())
    }

    pub fn with_options(
        settings: &IntakeqSettings,
        metrics: Arc<Metrics>,
        options: IntakeqOptions,
    ) -> Self {
        let policy = options.policy.unwrap_or_else(|| Self::policy(settings));
        let budget = Arc::new(DailyBudget::new(
            settings.requests_per_day,
            options.daily_reset_utc,
            options.clock.clone(),
        ));
        let upstream = Upstream::new(SourceKind::Intakeq, policy, metrics.clone())
            .with_daily_budget(budget.clone())
            .with_live_reserve(settings.live_reserved_share);
        Self {
            client: IntakeqClient::new(&settings.base_url, settings.api_key.clone(), upstream),
            budget,
            clock: options.clock,
            convert: options.convert,
            metrics,
        }
    }

    /// `requests_per_minute` evenly spaced (no burst: IntakeQ counts per minute, so a burst
    /// followed by a refill would exceed it); a rate-limit answer pauses at least 60 s, since
    /// IntakeQ's per-minute bucket needs that long to empty (reference C1).
    pub fn policy(settings: &IntakeqSettings) -> UpstreamPolicy {
        let per_minute = settings.requests_per_minute.max(1);
        let period = Duration::from_secs(60) / per_minute;
        let quota = Quota::with_period(period.max(Duration::from_micros(1)))
            .expect("period is positive")
            .allow_burst(NonZeroU32::MIN);
        UpstreamPolicy {
            quotas: vec![quota],
            max_concurrent: None,
            timeout: Duration::from_millis(settings.timeout_ms),
            max_retry_elapsed: Duration::from_secs(150),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(120),
            rate_limit_pause: Duration::from_secs(60),
        }
    }

    /// The daily request budget: used, limit, remaining and when it resets.
    pub fn budget(&self) -> BudgetSnapshot {
        self.budget.snapshot()
    }

    /// Takes back a budget snapshot saved before a restart.
    pub fn restore_budget(&self, snapshot: &BudgetSnapshot) {
        self.budget.restore(snapshot)
    }

    pub fn client(&self) -> &IntakeqClient {
        &self.client
    }

    /// Converts a full client profile into a source record.
    pub fn parse_client(
        &self,
        value: &Value,
        fetched_at: DateTime<Utc>,
    ) -> Result<SourceRecord, ConvertError> {
        convert::parse_client(value, fetched_at, &self.convert)
    }

    fn skipped(&self, stream: &str, reason: &str) {
        self.metrics.inc(
            "patient_sync_poll_skipped_rows_total",
            "Rows a poll could not use (no id), by source, stream and reason.",
            &[
                ("source", "intakeq"),
                ("stream", stream),
                ("reason", reason),
            ],
            1,
        );
        tracing::warn!(source = "intakeq", stream, reason, "skipped a polled row");
    }

    async fn poll_updated(&self, cursor: Option<&str>) -> Result<PollPage, FetchError> {
        let mut cursor: UpdatedCursor = parse_cursor(cursor, STREAM_UPDATED).unwrap_or_default();
        cursor.page = cursor.page.max(1);
        if cursor.page == 1 || cursor.started.is_none() {
            cursor.started = Some(self.clock.now().date_naive());
        }
        let rows = self
            .client
            .fetch_clients(&ClientQuery {
                page: cursor.page,
                date_updated_start: cursor.from,
                profile: true,
                ..ClientQuery::default()
            })
            .await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(id) = wire::client_id(row) else {
                self.skipped(STREAM_UPDATED, "no_id");
                continue;
            };
            if wire::has_profile(row) {
                let updated_at = row
                    .get("LastUpdateDate")
                    .and_then(Value::as_i64)
                    .and_then(convert::instant_from_epoch_ms);
                items.push(PollItem::Record {
                    id: SourceId(id),
                    updated_at,
                    body: row.clone(),
                });
            } else {
                items.push(PollItem::Changed(SourceId(id)));
            }
        }
        let complete = rows.len() < wire::PAGE_SIZE;
        let next = if complete {
            let started = cursor.started.expect("set above");
            UpdatedCursor {
                from: started.pred_opt(),
                page: 1,
                started: None,
            }
        } else {
            UpdatedCursor {
                page: cursor.page + 1,
                ..cursor
            }
        };
        Ok(PollPage {
            items,
            next_cursor: Some(serde_json::to_string(&next).expect("cursor serializes")),
            complete,
        })
    }

    async fn poll_deleted(&self, cursor: Option<&str>) -> Result<PollPage, FetchError> {
        let page = parse_cursor::<DeletedCursor>(cursor, STREAM_DELETED)
            .map(|c| c.page.max(1))
            .unwrap_or(1);
        let rows = self
            .client
            .fetch_clients(&ClientQuery {
                page,
                deleted_only: true,
                ..ClientQuery::default()
            })
            .await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            match wire::client_id(row) {
                Some(id) => items.push(PollItem::Deleted(SourceId(id))),
                None => self.skipped(STREAM_DELETED, "no_id"),
            }
        }
        let complete = rows.len() < wire::PAGE_SIZE;
        let next = DeletedCursor {
            page: if complete { 1 } else { page + 1 },
        };
        Ok(PollPage {
            items,
            next_cursor: Some(serde_json::to_string(&next).expect("cursor serializes")),
            complete,
        })
    }
}

/// A stored cursor; an unreadable one starts the stream over (logged, never fatal).
fn parse_cursor<T: for<'de> Deserialize<'de>>(cursor: Option<&str>, stream: &str) -> Option<T> {
    let text = cursor?;
    match serde_json::from_str(text) {
        Ok(c) => Some(c),
        Err(_) => {
            tracing::warn!(
                source = "intakeq",
                stream,
                "unreadable poll cursor; starting the stream over"
            );
            None
        }
    }
}

/// The time an inbox item was received, as the fetch time of what it carries.
fn received_at(item: &InboxItem) -> Result<DateTime<Utc>, PlanError> {
    DateTime::from_timestamp_millis(item.received_at_ms).ok_or(PlanError {
        what: "received_at_ms out of range",
    })
}

/// A client id as the inbox item names it: `resource_id`, else the body's id.
fn named_client(item: &InboxItem, body: Option<&Value>) -> Option<String> {
    item.resource_id
        .as_deref()
        .and_then(|id| wire::id_text(&Value::String(id.to_string())))
        .or_else(|| {
            let body = body?;
            wire::webhook_client_id(body)
                .or_else(|| wire::client_id(body))
                .or_else(|| body.get("id").and_then(wire::id_text))
        })
}

#[async_trait]
impl Source for Intakeq {
    fn budget(&self) -> Option<BudgetSnapshot> {
        Some(Intakeq::budget(self))
    }

    fn restore_budget(&self, snapshot: &BudgetSnapshot) {
        Intakeq::restore_budget(self, snapshot)
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Intakeq
    }

    /// - webhook (intake, appointment, note, invoice): `Fetch` of the `ClientId` (the body
    ///   only hints that the client changed); without one, `Ignore`.
    /// - `poll.record`: `Apply` of the full profile in the body.
    /// - `poll.changed`: `Fetch`.
    /// - `poll.deleted`: `Apply` of a deleted tombstone ([`convert::tombstone`]).
    /// - anything else (import, resync, manual): `Apply` when the body is a full profile,
    ///   else `Fetch` of the client it names, else `Ignore`.
    fn plan(&self, item: &InboxItem) -> Result<Plan, PlanError> {
        let body: Option<Value> = serde_json::from_str(&item.body).ok();
        if item.origin == "webhook" {
            return Ok(match named_client(item, body.as_ref()) {
                Some(id) => Plan::Fetch(vec![SourceId(id)]),
                None => Plan::Ignore("intakeq webhook names no ClientId".into()),
            });
        }
        match item.event_type.as_str() {
            EVENT_POLL_RECORD => {
                let body = body.ok_or(PlanError {
                    what: "intakeq poll.record body is not JSON",
                })?;
                let record =
                    self.parse_client(&body, received_at(item)?)
                        .map_err(|_| PlanError {
                            what: "intakeq poll.record body is not a client profile",
                        })?;
                Ok(Plan::Apply(Box::new(record)))
            }
            EVENT_POLL_CHANGED => match named_client(item, body.as_ref()) {
                Some(id) => Ok(Plan::Fetch(vec![SourceId(id)])),
                None => Err(PlanError {
                    what: "intakeq poll.changed names no client",
                }),
            },
            EVENT_POLL_DELETED => {
                let id = named_client(item, body.as_ref()).ok_or(PlanError {
                    what: "intakeq poll.deleted names no client",
                })?;
                let raw = body.unwrap_or_else(|| serde_json::json!({ "id": id }));
                Ok(Plan::Apply(Box::new(convert::tombstone(
                    SourceId(id),
                    received_at(item)?,
                    raw,
                ))))
            }
            _ => {
                if let Some(b) = body.as_ref().filter(|b| wire::has_profile(b)) {
                    if let Ok(record) = self.parse_client(b, received_at(item)?) {
                        return Ok(Plan::Apply(Box::new(record)));
                    }
                }
                Ok(match named_client(item, body.as_ref()) {
                    Some(id) => Plan::Fetch(vec![SourceId(id)]),
                    None => Plan::Ignore("intakeq item names no client".into()),
                })
            }
        }
    }

    /// One `search` request per id (IntakeQ has no batch read), in order.
    async fn fetch_records(
        &self,
        ids: &[SourceId],
    ) -> Vec<(SourceId, Result<Option<SourceRecord>, FetchError>)> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let result = match wire::id_text(&Value::String(id.0.clone())) {
                None => Err(FetchError::Rejected {
                    kind: "invalid_client_id",
                    status: None,
                }),
                Some(numeric) => match self.client.fetch_client(&numeric).await {
                    Ok(Some(value)) => self
                        .parse_client(&value, self.clock.now())
                        .map(Some)
                        .map_err(|e: ConvertError| e.into_fetch_error("intakeq client")),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                },
            };
            out.push((id.clone(), result));
        }
        out
    }

    fn poll_streams(&self) -> &'static [&'static str] {
        &[STREAM_UPDATED, STREAM_DELETED]
    }

    async fn poll(&self, stream: &str, cursor: Option<&str>) -> Result<PollPage, FetchError> {
        match stream {
            STREAM_UPDATED => self.poll_updated(cursor).await,
            STREAM_DELETED => self.poll_deleted(cursor).await,
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
        self.parse_client(value, fetched_at)
    }

    fn upstream(&self) -> Option<&crate::sources::http::Upstream> {
        Some(self.client.upstream())
    }
}

#[cfg(test)]
mod tests;
