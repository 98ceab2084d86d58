//! The webhook receiver (axum): verifies a delivery, writes it to the inbox in one transaction
//! and acknowledges within milliseconds. It never calls an upstream and never touches
//! canonical tables; the worker does the rest from the inbox.
//!
//! Routes: `POST /webhooks/healthie`, `POST /webhooks/hint`, `POST /webhooks/intakeq/{token}`,
//! `GET /healthz`, `GET /readyz`, `GET /metrics`.
//!
//! Every acknowledged (2xx) delivery is in the inbox, pending or ignored with a reason.
//! Responses, logs, spans and metric labels carry ids, sources, event types, statuses and sizes
//! only: never a body or a value from one. Do not wrap this router in a layer that logs request
//! URIs: the IntakeQ route carries its secret token in the path.

mod healthie;
mod hint;
mod inbox_writer;
mod intakeq;
mod verify;
mod wire;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;
use tracing::{instrument, Span};

use inbox_writer::InboxWriter;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::{InboxId, SourceKind};
use crate::store::{now_ms, InboxState, InsertOutcome, NewInboxItem, Store, StoreError};

pub use verify::{VerifiedDelivery, VerifyError};

/// Counter of webhook deliveries by `source` and `outcome`.
pub const WEBHOOKS_RECEIVED: &str = "patient_sync_webhooks_received_total";
/// Histogram of the time from request to acknowledgement, by `source`.
pub const WEBHOOK_ACK_SECONDS: &str = "patient_sync_webhook_ack_seconds";
/// Gauge of inbox items by `source` and `state`, refreshed on every scrape.
pub const INBOX_ITEMS: &str = "patient_sync_inbox_items";
/// Gauge of the age of the oldest pending (or leased) inbox item, 0 when there is none.
pub const INBOX_OLDEST_PENDING_SECONDS: &str = "patient_sync_inbox_oldest_pending_age_seconds";

/// What the receiver needs: the store (inbox only), the configuration, the metrics registry and
/// the inbox writer that group-commits deliveries.
#[derive(Clone)]
pub struct ReceiverState {
    pub store: Arc<dyn Store>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    inbox: InboxWriter,
}

impl ReceiverState {
    /// Starts the inbox writer on the current runtime.
    pub fn new(store: Arc<dyn Store>, settings: Arc<Settings>, metrics: Arc<Metrics>) -> Self {
        Self {
            inbox: InboxWriter::spawn(store.clone()),
            store,
            settings,
            metrics,
        }
    }
}

/// The receiver's routes, with the body limit from `server.body_limit_bytes`.
pub fn router(state: ReceiverState) -> Router {
    let limit = state.settings.server.body_limit_bytes;
    Router::new()
        .route("/webhooks/healthie", post(healthie::receive))
        .route("/webhooks/hint", post(hint::receive))
        .route("/webhooks/intakeq/{token}", post(intakeq::receive))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// How a delivery ended, the `outcome` label of [`WEBHOOKS_RECEIVED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Ignored,
    Duplicate,
    Unauthorized,
    BadRequest,
    UnsupportedMediaType,
    TooLarge,
    /// The source is switched off in the configuration (404).
    Disabled,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Ignored => "ignored",
            Outcome::Duplicate => "duplicate",
            Outcome::Unauthorized => "unauthorized",
            Outcome::BadRequest => "bad_request",
            Outcome::UnsupportedMediaType => "unsupported_media_type",
            Outcome::TooLarge => "too_large",
            Outcome::Disabled => "disabled",
            Outcome::Error => "error",
        }
    }
}

/// A delivery that was put on record.
#[derive(Debug)]
enum Ack {
    /// Stored; `ignored` carries the reason when it was stored as ignored.
    Stored {
        id: InboxId,
        ignored: Option<String>,
    },
    /// Already in the inbox under the same dedupe key; nothing new stored.
    Duplicate,
}

/// Why a delivery was refused. The display text is the response message: it names fields and
/// limits, never a value from the body.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("not found")]
    Disabled,
    #[error("invalid signature")]
    Unauthorized(#[source] VerifyError),
    /// A wrong IntakeQ URL token looks like any unknown path.
    #[error("not found")]
    UnknownToken(#[source] VerifyError),
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    BadRequest(Cow<'static, str>),
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("inbox unavailable, retry later")]
    Store(#[source] StoreError),
}

impl Rejection {
    fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Rejection::BadRequest(message.into())
    }

    fn status(&self) -> StatusCode {
        match self {
            Rejection::Disabled | Rejection::UnknownToken(_) => StatusCode::NOT_FOUND,
            Rejection::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Rejection::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            Rejection::Disabled => Outcome::Disabled,
            Rejection::Unauthorized(_) | Rejection::UnknownToken(_) => Outcome::Unauthorized,
            Rejection::UnsupportedMediaType => Outcome::UnsupportedMediaType,
            Rejection::BadRequest(_) => Outcome::BadRequest,
            Rejection::TooLarge { .. } => Outcome::TooLarge,
            Rejection::Store(_) => Outcome::Error,
        }
    }
}

/// Reads the buffered body, mapping the body-limit rejection to 413.
fn read_body(
    state: &ReceiverState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, Rejection> {
    match body {
        Ok(bytes) => {
            Span::current().record("body_bytes", bytes.len());
            Ok(bytes)
        }
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(Rejection::TooLarge {
                limit: state.settings.server.body_limit_bytes,
            })
        }
        Err(_) => Err(Rejection::bad_request("cannot read body")),
    }
}

/// Writes one item to the inbox; returns once the transaction holding it has committed.
async fn save_inbox_item(state: &ReceiverState, item: &NewInboxItem) -> Result<Ack, Rejection> {
    match state.inbox.insert(item.clone()).await {
        Ok(InsertOutcome::Inserted(id)) => Ok(Ack::Stored {
            id,
            ignored: item.ignore_reason.clone(),
        }),
        Ok(InsertOutcome::Duplicate) => Ok(Ack::Duplicate),
        Err(e) => Err(Rejection::Store(e)),
    }
}

/// A short, PHI-free name for a store error, for logs.
fn store_error_kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::Database(sqlx::Error::PoolTimedOut) => "pool_timed_out",
        StoreError::Database(sqlx::Error::PoolClosed) => "pool_closed",
        StoreError::Database(sqlx::Error::Io(_)) => "io",
        StoreError::Database(sqlx::Error::Database(_)) => "database",
        StoreError::Database(_) => "driver",
        StoreError::Migrate(_) => "migrate",
        StoreError::Corrupt { .. } => "corrupt",
        StoreError::UnsupportedUrl => "unsupported_url",
    }
}

/// Turns the result of a delivery into a response, counting it, timing it and logging it
/// (fields only: ids, outcome, status).
fn respond(
    state: &ReceiverState,
    source: SourceKind,
    started: Instant,
    result: Result<Ack, Rejection>,
) -> Response {
    let span = Span::current();
    let (outcome, status, body) = match &result {
        Ok(Ack::Stored { id, ignored: None }) => (
            Outcome::Accepted,
            StatusCode::ACCEPTED,
            json!({"status": "accepted", "inbox_id": id.0}),
        ),
        Ok(Ack::Stored {
            id,
            ignored: Some(reason),
        }) => (
            Outcome::Ignored,
            StatusCode::ACCEPTED,
            json!({"status": "ignored", "inbox_id": id.0, "reason": reason}),
        ),
        Ok(Ack::Duplicate) => (
            Outcome::Duplicate,
            StatusCode::OK,
            json!({"status": "duplicate"}),
        ),
        Err(rejection) => (
            rejection.outcome(),
            rejection.status(),
            json!({"error": rejection.to_string()}),
        ),
    };
    span.record("outcome", outcome.as_str());
    span.record("status", status.as_u16());
    match &result {
        Ok(Ack::Stored { id, ignored }) => {
            span.record("inbox_id", id.0);
            state.metrics.inc(
                crate::metrics::EVENTS_RECEIVED,
                crate::metrics::EVENTS_RECEIVED_HELP,
                &[("source", source.as_str()), ("origin", "webhook")],
                1,
            );
            match ignored {
                None => tracing::debug!(inbox_id = id.0, "stored webhook delivery as pending"),
                Some(reason) => tracing::debug!(
                    inbox_id = id.0,
                    reason = reason.as_str(),
                    "stored webhook delivery as ignored"
                ),
            }
        }
        Ok(Ack::Duplicate) => tracing::debug!("webhook delivery already in the inbox"),
        Err(Rejection::Store(e)) => tracing::error!(
            error_kind = store_error_kind(e),
            retryable = e.is_retryable(),
            "could not store webhook delivery"
        ),
        Err(Rejection::Unauthorized(e) | Rejection::UnknownToken(e)) => {
            tracing::warn!(reason = e.kind(), "rejected unverified webhook delivery")
        }
        // The message names a field or a limit, never a value from the body.
        Err(rejection) => tracing::warn!(reason = %rejection, "rejected webhook delivery"),
    }
    let labels = [("source", source.as_str()), ("outcome", outcome.as_str())];
    state.metrics.inc(
        WEBHOOKS_RECEIVED,
        "Webhook deliveries received, by source and outcome.",
        &labels,
        1,
    );
    state.metrics.observe(
        WEBHOOK_ACK_SECONDS,
        "Time from receiving a webhook delivery to answering it, in seconds.",
        &[("source", source.as_str())],
        started.elapsed().as_secs_f64(),
    );
    (status, Json(body)).into_response()
}

/// The process is alive.
async fn healthz() -> &'static str {
    "ok"
}

/// How long readiness waits for the database. While the database is down the pool keeps trying
/// to connect for much longer; a health check needs its answer sooner.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ready when the database answers a cheap query within [`READY_TIMEOUT`].
#[instrument(skip_all)]
async fn readyz(State(state): State<ReceiverState>) -> Response {
    let unavailable = || (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response();
    match tokio::time::timeout(READY_TIMEOUT, state.store.oldest_pending_ms()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(
                error_kind = store_error_kind(&e),
                "database did not answer the readiness query"
            );
            unavailable()
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = READY_TIMEOUT.as_millis() as u64,
                "database did not answer the readiness query in time"
            );
            unavailable()
        }
    }
}

/// Prometheus text: the registry, after refreshing the inbox gauges. A failing database
/// leaves the gauges at their last values; the scrape still succeeds.
#[instrument(skip_all)]
async fn metrics(State(state): State<ReceiverState>) -> Response {
    if let Err(e) = refresh_inbox_gauges(&state).await {
        tracing::warn!(
            error_kind = store_error_kind(&e),
            "could not refresh inbox gauges"
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn refresh_inbox_gauges(state: &ReceiverState) -> Result<(), StoreError> {
    let counts = state.store.inbox_counts().await?;
    let oldest = state.store.oldest_pending_ms().await?;
    for source in SourceKind::ALL {
        for st in InboxState::ALL {
            let n = counts
                .iter()
                .find(|c| c.source == source && c.state == st)
                .map_or(0, |c| c.count);
            state.metrics.set(
                INBOX_ITEMS,
                "Inbox items by source and state.",
                &[("source", source.as_str()), ("state", st.as_str())],
                n as f64,
            );
        }
    }
    let age_secs = oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
    state.metrics.set(
        INBOX_OLDEST_PENDING_SECONDS,
        "Age of the oldest pending or leased inbox item, in seconds (0 when none).",
        &[],
        age_secs,
    );
    Ok(())
}
