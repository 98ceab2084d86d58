//! `resync --source S`: walks every patient of a source and applies each one through
//! [`apply_record`], the path the worker and `import` use, so links and canonical rows update
//! and it is safe while `serve` runs.
//!
//! - Listing: Healthie `users` cursor pages of full records (`ListUserRecords`,
//!   `CREATED_AT_ASC`), once `active` and once `archived`; IntakeQ `GET /clients` pages of 100
//!   with profiles; Hint `GET /api/provider/patients?filter=all&sort=created_at`, limit/offset.
//!   Every upstream call runs in the bulk lane ([`bulk`]), paced evenly at the configured rate
//!   (no bursts). The next page is fetched while the current one is applied and, on SQLite,
//!   its candidates are read once the current page's transaction has begun (`ReadWindow`).
//! - Resumable: after every page `sync_state` row `(source, "resync:<stream>")` holds the next
//!   page cursor in `checkpoint` (and `{"pass", "done"}` in `cursor`); row `(source, "resync")`
//!   gets `last_success_at` when a whole pass completes. `resync_runs` holds the pass counter
//!   and the lease: one run per source across processes, renewed in the background.
//! - Non-destructive: each applied page marks its records seen by the pass
//!   (`source_records.resync_pass`). When a pass completes, records it did not list (and that
//!   nobody fetched since the pass started) are marked missing; a record missing for more than
//!   `resync.missing_grace_passes` further completed passes is deleted through a tombstone and
//!   [`apply_record`]. An interrupted pass marks and deletes nobody.
//! - `--dry-run` lists and compares with what is stored, writing nothing (no lease either).

use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::identity::MatchConfig;
use crate::metrics::Metrics;
use crate::model::{RecordStatus, SourceId, SourceKind, SourceRecord};
use crate::sources::healthie::operations::{list_user_records, ListUserRecords, RECORD_PAGE_SIZE};
use crate::sources::http::{bulk, BudgetSnapshot, FetchError};
use crate::sources::{healthie::Healthie, hint::Hint, intakeq::Intakeq, ConvertError, Source};
use crate::store::{now_ms, SaveOutcome, Store, StoreError, SyncState, WriteStamp};
use crate::sync::apply::{apply_record, IdentitySettings};
use crate::sync::apply_batch::{apply_page, read_ahead, AheadPrepared, Previous, ReadAhead};

/// `sync_state` stream prefix of a resync stream's checkpoint.
pub const STATE_PREFIX: &str = "resync:";
/// `sync_state` stream whose `last_success_at` says when a whole pass last completed.
pub const STATE_DONE: &str = "resync";

/// Unseen records read per page when a pass completes.
const UNSEEN_PAGE: u32 = 500;

/// A source as the resync lists it.
#[derive(Clone)]
pub enum Lister {
    Healthie(Arc<Healthie>),
    Intakeq(Arc<Intakeq>),
    Hint(Arc<Hint>),
}

/// One listed row: its id (when it has one) and its record, `Ok(None)` for a row that is not
/// a patient, or why it could not be read (a field name, never a value).
#[derive(Debug)]
pub struct Listed {
    pub id: Option<SourceId>,
    pub record: Result<Option<SourceRecord>, String>,
}

/// One page of a resync stream.
#[derive(Debug)]
pub struct ListedPage {
    pub rows: Vec<Listed>,
    /// Where the next page starts (opaque; stored as the checkpoint).
    pub next: Option<String>,
    /// The last page of the stream.
    pub complete: bool,
    /// Rows the stream holds in all, when the upstream says.
    pub total: Option<u64>,
}

impl Lister {
    /// The lister of `kind` built from settings (a fresh upstream and limiter).
    pub fn from_settings(settings: &Settings, kind: SourceKind, metrics: Arc<Metrics>) -> Self {
        match kind {
            SourceKind::Healthie => {
                Lister::Healthie(Arc::new(Healthie::new(&settings.sources.healthie, metrics)))
            }
            SourceKind::Intakeq => {
                Lister::Intakeq(Arc::new(Intakeq::new(&settings.sources.intakeq, metrics)))
            }
            SourceKind::Hint => Lister::Hint(Arc::new(Hint::new(&settings.sources.hint, metrics))),
        }
    }

    pub fn kind(&self) -> SourceKind {
        self.source().kind()
    }

    pub fn source(&self) -> &dyn Source {
        match self {
            Lister::Healthie(s) => s.as_ref(),
            Lister::Intakeq(s) => s.as_ref(),
            Lister::Hint(s) => s.as_ref(),
        }
    }

    /// The streams a pass walks, in order.
    pub fn streams(&self) -> &'static [&'static str] {
        match self {
            Lister::Healthie(_) => &["active", "archived"],
            Lister::Intakeq(_) => &["clients"],
            Lister::Hint(_) => &["patients"],
        }
    }

    /// Rows per full page.
    pub fn page_size(&self) -> u32 {
        match self {
            Lister::Healthie(_) => RECORD_PAGE_SIZE,
            Lister::Intakeq(_) => crate::sources::intakeq::wire::PAGE_SIZE as u32,
            Lister::Hint(_) => crate::sources::hint::wire::MAX_LIMIT,
        }
    }

    /// Requests per second the bulk lane may send: the configured client-side limit less the
    /// share kept for live work (the pacing's rate, the ETA's and the benchmark's bound).
    pub fn allowed_rate(&self, settings: &Settings) -> f64 {
        let s = &settings.sources;
        let (rate, share) = match self {
            Lister::Healthie(_) => (
                f64::from(s.healthie.requests_per_second),
                s.healthie.live_reserved_share,
            ),
            Lister::Intakeq(_) => (
                f64::from(s.intakeq.requests_per_minute) / 60.0,
                s.intakeq.live_reserved_share,
            ),
            Lister::Hint(_) => (
                f64::from(s.hint.requests_per_second),
                s.hint.live_reserved_share,
            ),
        };
        rate * (1.0 - share.clamp(0.0, 0.99))
    }

    fn budget(&self) -> Option<BudgetSnapshot> {
        self.source().budget()
    }

    /// One page of `stream` from `cursor` (None: the first page). Runs in the bulk lane.
    pub async fn page(&self, stream: &str, cursor: Option<&str>) -> Result<ListedPage, FetchError> {
        bulk(async {
            match self {
                Lister::Healthie(s) => healthie_page(s, stream, cursor).await,
                Lister::Intakeq(s) => intakeq_page(s, cursor).await,
                Lister::Hint(s) => hint_page(s, cursor).await,
            }
        })
        .await
    }
}

fn reason(e: &ConvertError, source: SourceKind) -> String {
    match e {
        ConvertError::Missing(field) => format!("missing required field `{field}`"),
        ConvertError::Format(field) => format!("field `{field}` has an unexpected format"),
        ConvertError::Shape(_) => format!("not a {source} record"),
    }
}

async fn healthie_page(
    source: &Healthie,
    stream: &str,
    cursor: Option<&str>,
) -> Result<ListedPage, FetchError> {
    let status = match stream {
        "active" | "archived" => stream.to_string(),
        _ => {
            return Err(FetchError::Rejected {
                kind: "unknown_stream",
                status: None,
            })
        }
    };
    let (data, raw) = source
        .client()
        .post_with_raw::<ListUserRecords>(list_user_records::Variables {
            first: i64::from(RECORD_PAGE_SIZE),
            after: cursor.map(str::to_string),
            order_by: Some(list_user_records::UserOrderKeys::CREATED_AT_ASC),
            active_status: Some(status),
        })
        .await?;
    let fetched_at = Utc::now();
    let nodes = raw
        .pointer("/users/nodes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let rows = nodes
        .iter()
        .filter(|node| !node.is_null())
        .map(|node| {
            let id = match node.get("id") {
                Some(Value::String(s)) if !s.trim().is_empty() => Some(SourceId(s.clone())),
                Some(Value::Number(n)) => Some(SourceId(n.to_string())),
                _ => None,
            };
            let record = if node.get("is_patient") == Some(&Value::Bool(false)) {
                Ok(None)
            } else {
                crate::sources::healthie::convert::parse_user(node, fetched_at)
                    .map(Some)
                    .map_err(|e| reason(&e, SourceKind::Healthie))
            };
            Listed { id, record }
        })
        .collect();
    let info = &data.users.page_info;
    let complete = !info.has_next_page || info.end_cursor.is_none();
    Ok(ListedPage {
        rows,
        next: if complete {
            None
        } else {
            info.end_cursor.clone()
        },
        complete,
        total: u64::try_from(data.users.total_count).ok(),
    })
}

async fn intakeq_page(source: &Intakeq, cursor: Option<&str>) -> Result<ListedPage, FetchError> {
    use crate::sources::intakeq::{wire, ClientQuery};
    let page = cursor
        .and_then(|c| c.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let rows = source
        .client()
        .fetch_clients(&ClientQuery {
            page,
            profile: true,
            ..ClientQuery::default()
        })
        .await?;
    let fetched_at = Utc::now();
    let mut listed = Vec::with_capacity(rows.len());
    let mut thin = Vec::new();
    for row in &rows {
        let id = wire::client_id(row).map(SourceId);
        if wire::has_profile(row) {
            let record = source
                .parse_client(row, fetched_at)
                .map(Some)
                .map_err(|e| reason(&e, SourceKind::Intakeq));
            listed.push(Listed { id, record });
        } else if let Some(id) = id {
            thin.push(id);
        } else {
            listed.push(Listed {
                id: None,
                record: Err("missing required field `ClientId`".into()),
            });
        }
    }
    // Rows that came back without a profile are read one by one.
    for (id, result) in source.fetch_records(&thin).await {
        let record = match result {
            Ok(r) => Ok(r),
            Err(e) if e.is_retryable() || matches!(e, FetchError::Auth { .. }) => return Err(e),
            Err(e) => Err(format!("refetch failed ({})", e.kind())),
        };
        listed.push(Listed {
            id: Some(id),
            record,
        });
    }
    let complete = rows.len() < wire::PAGE_SIZE;
    Ok(ListedPage {
        rows: listed,
        next: (!complete).then(|| (page + 1).to_string()),
        complete,
        total: None,
    })
}

async fn hint_page(source: &Hint, cursor: Option<&str>) -> Result<ListedPage, FetchError> {
    use crate::sources::hint::{wire, PatientQuery};
    let offset = cursor.and_then(|c| c.parse::<u32>().ok()).unwrap_or(0);
    let page = source
        .client()
        .fetch_patients(&PatientQuery {
            offset,
            limit: wire::MAX_LIMIT,
            sort: Some("created_at"),
            updated_since: None,
        })
        .await?;
    let fetched_at = Utc::now();
    let rows: Vec<Listed> = page
        .rows
        .iter()
        .map(|row| Listed {
            id: wire::patient_id(row).map(SourceId),
            record: source
                .parse_patient(row, fetched_at)
                .map(Some)
                .map_err(|e| reason(&e, SourceKind::Hint)),
        })
        .collect();
    let taken = u64::from(offset) + page.rows.len() as u64;
    let complete = page.rows.len() < wire::MAX_LIMIT as usize
        || page.total.is_some_and(|total| taken >= total);
    Ok(ListedPage {
        rows,
        next: (!complete).then(|| taken.to_string()),
        complete,
        total: page.total,
    })
}

/// How a resync run is asked to behave.
#[derive(Debug, Clone)]
pub struct ResyncOptions {
    pub dry_run: bool,
    /// Abandon an unfinished pass and start a new one from the first page.
    pub restart: bool,
    /// Names this run in the lease (process and random part).
    pub owner: String,
    pub lease: Duration,
    pub missing_grace_passes: u32,
    pub daily_budget_reserve: u32,
    /// Requests per second allowed (the ETA's bound).
    pub allowed_rate: f64,
    pub progress_log_every: Duration,
}

impl ResyncOptions {
    pub fn from_settings(
        settings: &Settings,
        lister: &Lister,
        dry_run: bool,
        restart: bool,
    ) -> Self {
        Self {
            dry_run,
            restart,
            owner: format!(
                "resync-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            lease: Duration::from_secs(settings.resync.lease_secs),
            missing_grace_passes: settings.resync.missing_grace_passes,
            daily_budget_reserve: settings.resync.daily_budget_reserve,
            allowed_rate: lister.allowed_rate(settings),
            progress_log_every: Duration::from_secs(settings.resync.progress_log_secs),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncOutcome {
    /// Every stream was listed to its end (and, unless a dry run, the pass completed).
    Completed,
    /// Stopped by SIGINT/SIGTERM; resumes from the checkpoint.
    Interrupted,
    /// IntakeQ's daily budget is down to the reserve; resumes from the checkpoint.
    BudgetExhausted,
    /// Another run took the lease (this one stalled past it); resumes from the checkpoint.
    LeaseLost,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResyncSummary {
    pub source: SourceKind,
    pub dry_run: bool,
    pub outcome: ResyncOutcome,
    /// The pass this run worked on (none for a dry run).
    pub pass: Option<i64>,
    /// The run continued a pass an earlier run had started.
    pub resumed: bool,
    pub pages: u64,
    /// Rows listed (every row, rejected ones included).
    pub records: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Older than the stored snapshot (changed by a webhook meanwhile): kept as stored.
    pub stale: u64,
    pub rejected: u64,
    /// Records the completed pass did not list, still marked missing (dry run: would be).
    pub missing: u64,
    /// Records deleted because they were missing past the grace (dry run: would be).
    pub deleted: u64,
    /// Upstream requests made (retries included) and those answered rate-limited.
    pub requests: u64,
    pub rate_limited: u64,
    /// Time spent waiting for the client-side rate limits (the upstream's and the pacing).
    pub rate_limit_wait_secs: f64,
    /// Pages whose candidates were read beside the previous page's transaction.
    pub read_ahead_pages: u64,
    pub elapsed_secs: f64,
}

impl ResyncSummary {
    fn new(source: SourceKind, dry_run: bool) -> Self {
        Self {
            source,
            dry_run,
            outcome: ResyncOutcome::Completed,
            pass: None,
            resumed: false,
            pages: 0,
            records: 0,
            created: 0,
            updated: 0,
            unchanged: 0,
            stale: 0,
            rejected: 0,
            missing: 0,
            deleted: 0,
            requests: 0,
            rate_limited: 0,
            rate_limit_wait_secs: 0.0,
            read_ahead_pages: 0,
            elapsed_secs: 0.0,
        }
    }

    pub fn render_text(&self) -> String {
        let would = if self.dry_run {
            " (dry run: would be)"
        } else {
            ""
        };
        let outcome = match self.outcome {
            ResyncOutcome::Completed => "completed",
            ResyncOutcome::Interrupted => "interrupted; run it again to resume",
            ResyncOutcome::BudgetExhausted => {
                "stopped: daily request budget down to the reserve; run it again after the reset"
            }
            ResyncOutcome::LeaseLost => "stopped: another run took the lease",
        };
        let pass = match self.pass {
            Some(p) if self.resumed => format!(" pass {p} (resumed)"),
            Some(p) => format!(" pass {p}"),
            None => String::new(),
        };
        format!(
            "resync {}{pass}: {outcome}\n  {} pages, {} records: {} created, {} updated, {} unchanged, {} stale, {} rejected{would}\n  {} missing, {} deleted{would}\n  {} requests ({} rate-limited), {:.1}s waiting for rate limits, {:.1}s in all\n",
            self.source,
            self.pages,
            self.records,
            self.created,
            self.updated,
            self.unchanged,
            self.stale,
            self.rejected,
            self.missing,
            self.deleted,
            self.requests,
            self.rate_limited,
            self.rate_limit_wait_secs,
            self.elapsed_secs,
        )
    }
}

/// Why a run failed. Pages applied before the failure keep their checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("a resync of {source_kind} is already running (lease held by {owner} until {until})")]
    Busy {
        source_kind: SourceKind,
        owner: String,
        until: String,
    },
    #[error("listing {source_kind} stream {stream} failed; a new run resumes from its checkpoint")]
    Fetch {
        source_kind: SourceKind,
        stream: &'static str,
        #[source]
        source: FetchError,
    },
    #[error("{source_kind} stream {stream} returned the same cursor without completing")]
    Stuck {
        source_kind: SourceKind,
        stream: &'static str,
    },
    #[error("store failure during the resync")]
    Store(#[from] StoreError),
}

/// Per-stream progress kept in `sync_state.cursor` next to the page cursor.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct StreamMark {
    pass: i64,
    done: bool,
}

/// Runs one resync of `lister`'s source. `stop` ends it cleanly between pages (SIGINT/SIGTERM).
pub async fn run_resync(
    store: &dyn Store,
    lister: &Lister,
    identity: &IdentitySettings,
    options: &ResyncOptions,
    metrics: &Metrics,
    stop: &CancellationToken,
    progress: &Progress,
) -> Result<ResyncSummary, ResyncError> {
    let started = Instant::now();
    let kind = lister.kind();
    let requests_before = requests(metrics, kind);
    let wait_label = [("source", kind.as_str())];
    let waited_before = metrics.histogram_sum("patient_sync_rate_limit_wait_seconds", &wait_label);
    let mut summary = ResyncSummary::new(kind, options.dry_run);
    let result = if options.dry_run {
        dry_run(store, lister, options, stop, progress, &mut summary).await
    } else {
        leased_run(
            store,
            lister,
            identity,
            options,
            stop,
            progress,
            &mut summary,
        )
        .await
    };
    let (made, limited) = requests(metrics, kind);
    summary.requests = made - requests_before.0;
    summary.rate_limited = limited - requests_before.1;
    // The upstream limiter's waits plus the resync's own pacing.
    summary.rate_limit_wait_secs +=
        metrics.histogram_sum("patient_sync_rate_limit_wait_seconds", &wait_label) - waited_before;
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    progress.finish(&summary);
    result.map(|()| summary)
}

/// Upstream requests and rate-limited answers so far for `kind` in this process.
fn requests(metrics: &Metrics, kind: SourceKind) -> (u64, u64) {
    (
        metrics.counter_where(
            "patient_sync_upstream_requests_total",
            "source",
            kind.as_str(),
        ),
        metrics.counter(
            "patient_sync_upstream_rate_limited_total",
            &[("source", kind.as_str())],
        ),
    )
}

/// What the listing loop should do with each page.
enum Sink<'a> {
    Apply {
        identity: &'a IdentitySettings,
        pass: i64,
    },
    Compare {
        seen: &'a mut HashSet<SourceId>,
    },
}

/// Why the listing loop stopped before the end.
enum Stopped {
    Finished,
    Early(ResyncOutcome),
}

async fn leased_run(
    store: &dyn Store,
    lister: &Lister,
    identity: &IdentitySettings,
    options: &ResyncOptions,
    stop: &CancellationToken,
    progress: &Progress,
    summary: &mut ResyncSummary,
) -> Result<(), ResyncError> {
    let kind = lister.kind();
    let lease_ms = options.lease.as_millis() as i64;
    let now = now_ms();
    let Some(run) = store
        .claim_resync(kind, &options.owner, now, now + lease_ms)
        .await?
    else {
        let held = store.load_resync_run(kind).await?;
        return Err(ResyncError::Busy {
            source_kind: kind,
            owner: held
                .as_ref()
                .and_then(|r| r.owner.clone())
                .unwrap_or_else(|| "another process".into()),
            until: held
                .and_then(|r| r.leased_until_ms)
                .and_then(DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
        });
    };
    // The lease is renewed in the background; losing it stops the run between pages.
    let lost = Arc::new(AtomicBool::new(false));
    let halt = stop.child_token();
    let heartbeat = {
        let (lost, halt) = (lost.clone(), halt.clone());
        let owner = options.owner.clone();
        let every = (options.lease / 3).max(Duration::from_millis(100));
        async move {
            loop {
                tokio::select! {
                    _ = halt.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                match store.renew_resync(kind, &owner, now_ms() + lease_ms).await {
                    Ok(true) => {}
                    Ok(false) => {
                        lost.store(true, Ordering::SeqCst);
                        halt.cancel();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(source = %kind, error = %e, "Could not renew the resync lease.")
                    }
                }
            }
        }
    };
    let work = async {
        let result = leased_work(
            store, lister, identity, options, &run, &halt, progress, summary,
        )
        .await;
        halt.cancel();
        result
    };
    let (result, ()) = tokio::join!(work, heartbeat);
    if let Err(e) = store.release_resync(kind, &options.owner).await {
        tracing::warn!(source = %kind, error = %e, "Could not release the resync lease; it expires.");
    }
    if lost.load(Ordering::SeqCst) && summary.outcome == ResyncOutcome::Interrupted {
        summary.outcome = ResyncOutcome::LeaseLost;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn leased_work(
    store: &dyn Store,
    lister: &Lister,
    identity: &IdentitySettings,
    options: &ResyncOptions,
    run: &crate::store::ResyncRun,
    stop: &CancellationToken,
    progress: &Progress,
    summary: &mut ResyncSummary,
) -> Result<(), ResyncError> {
    let kind = lister.kind();
    let (pass, pass_started_ms) = if run.in_progress && !options.restart {
        summary.resumed = true;
        (run.pass, run.pass_started_at_ms.unwrap_or_else(now_ms))
    } else {
        let now = now_ms();
        match store.start_resync_pass(kind, &options.owner, now).await? {
            Some(pass) => (pass, now),
            None => {
                summary.outcome = ResyncOutcome::LeaseLost;
                return Ok(());
            }
        }
    };
    summary.pass = Some(pass);
    tracing::info!(source = %kind, pass, resumed = summary.resumed, "Resync started.");
    for &stream in lister.streams() {
        // A stopped run neither walks nor, resuming a pass whose streams are all done,
        // completes it (completing marks records missing).
        if stop.is_cancelled() {
            summary.outcome = ResyncOutcome::Interrupted;
            return Ok(());
        }
        let state_stream = format!("{STATE_PREFIX}{stream}");
        let state = store.load_sync_state(kind, &state_stream).await?;
        let mark: StreamMark = state
            .as_ref()
            .and_then(|s| s.cursor.as_deref())
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or_default();
        let cursor = match (&state, mark.pass == pass) {
            (_, true) if mark.done => continue,
            (Some(s), true) => s.checkpoint.clone(),
            _ => None,
        };
        let mut sink = Sink::Apply { identity, pass };
        match walk(
            store, lister, options, stream, cursor, &mut sink, stop, progress, summary,
        )
        .await?
        {
            Stopped::Finished => {}
            Stopped::Early(outcome) => {
                summary.outcome = outcome;
                return Ok(());
            }
        }
    }
    if stop.is_cancelled() {
        summary.outcome = ResyncOutcome::Interrupted;
        return Ok(());
    }
    finish_pass(
        store,
        kind,
        identity,
        options,
        pass,
        pass_started_ms,
        summary,
    )
    .await?;
    let now = Utc::now();
    if !store
        .complete_resync_pass(kind, &options.owner, pass)
        .await?
    {
        summary.outcome = ResyncOutcome::LeaseLost;
        return Ok(());
    }
    store
        .save_sync_state(&SyncState {
            source: kind,
            stream: STATE_DONE.into(),
            cursor: serde_json::to_string(&serde_json::json!({ "pass": pass })).ok(),
            checkpoint: None,
            last_success_at: Some(now),
            updated_at: now,
        })
        .await?;
    tracing::info!(
        source = %kind,
        pass,
        missing = summary.missing,
        deleted = summary.deleted,
        "Resync pass completed."
    );
    Ok(())
}

async fn dry_run(
    store: &dyn Store,
    lister: &Lister,
    options: &ResyncOptions,
    stop: &CancellationToken,
    progress: &Progress,
    summary: &mut ResyncSummary,
) -> Result<(), ResyncError> {
    let kind = lister.kind();
    let started = Utc::now();
    let mut seen = HashSet::new();
    for &stream in lister.streams() {
        let mut sink = Sink::Compare { seen: &mut seen };
        if let Stopped::Early(outcome) = walk(
            store, lister, options, stream, None, &mut sink, stop, progress, summary,
        )
        .await?
        {
            summary.outcome = outcome;
            return Ok(());
        }
    }
    let mut after: Option<String> = None;
    loop {
        let page = store
            .load_unseen_records(kind, i64::MAX, after.as_deref(), UNSEEN_PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.id.as_str().to_string());
        for r in &page {
            if seen.contains(&r.key.id) || r.fetched_at >= started {
                continue;
            }
            if r.missing_passes + 1 > i64::from(options.missing_grace_passes) {
                summary.deleted += 1;
            } else {
                summary.missing += 1;
            }
        }
    }
    Ok(())
}

/// Walks one stream from `cursor` to its end, fetching the next page while the current one is
/// applied. Returns early (checkpoint saved) when stopped or when the daily budget is low.
#[allow(clippy::too_many_arguments)]
async fn walk(
    store: &dyn Store,
    lister: &Lister,
    options: &ResyncOptions,
    stream: &'static str,
    cursor: Option<String>,
    sink: &mut Sink<'_>,
    stop: &CancellationToken,
    progress: &Progress,
    summary: &mut ResyncSummary,
) -> Result<Stopped, ResyncError> {
    let pace = Arc::new(Pacer::new(options.allowed_rate));
    let result = walk_paced(
        store, lister, options, stream, cursor, sink, stop, progress, summary, &pace,
    )
    .await;
    summary.rate_limit_wait_secs += pace.waited().as_secs_f64();
    result
}

#[allow(clippy::too_many_arguments)]
async fn walk_paced(
    store: &dyn Store,
    lister: &Lister,
    options: &ResyncOptions,
    stream: &'static str,
    mut cursor: Option<String>,
    sink: &mut Sink<'_>,
    stop: &CancellationToken,
    progress: &Progress,
    summary: &mut ResyncSummary,
    pace: &Arc<Pacer>,
) -> Result<Stopped, ResyncError> {
    let kind = lister.kind();
    let fetch_err = |source| ResyncError::Fetch {
        source_kind: kind,
        stream,
        source,
    };
    let budget_low = || {
        lister
            .budget()
            .is_some_and(|b| b.remaining <= options.daily_budget_reserve)
    };
    if budget_low() {
        return Ok(Stopped::Early(ResyncOutcome::BudgetExhausted));
    }
    // Where the next page's candidates are read from, and the matching settings they need.
    let reading: Option<(Arc<dyn Store>, Arc<MatchConfig>)> = match sink {
        Sink::Apply { identity, .. } => Some((store.shared(), Arc::new(identity.matching.clone()))),
        Sink::Compare { .. } => None,
    };
    let mut previous: Option<Previous> = None;
    let mut ahead: Option<ReadAhead> = None;
    let mut next = fetch_or_stop(lister, stream, cursor.as_deref(), stop, pace).await;
    loop {
        let page = match next {
            None => return Ok(Stopped::Early(ResyncOutcome::Interrupted)),
            Some(page) => page.map_err(fetch_err)?,
        };
        summary.pages += 1;
        progress.stream_total(kind, stream, page.total);
        if !page.complete && page.next == cursor {
            return Err(ResyncError::Stuck {
                source_kind: kind,
                stream,
            });
        }
        let prefetch = !page.complete && !stop.is_cancelled() && !budget_low();
        // The next page is fetched and parsed on a task of its own, so on another core when
        // there is one, while this one applies the page in hand; then its candidates are read,
        // once this page's transaction has begun.
        let window = ReadWindow::default();
        let following = prefetch.then(|| {
            let (lister, stop, pace) = (lister.clone(), stop.clone(), Arc::clone(pace));
            let cursor = page.next.clone();
            // Pages of records seen before (a second pass) have no use for a read-ahead: read
            // one only while the last page was new records throughout.
            let reading = reading
                .clone()
                .filter(|_| previous.as_ref().is_none_or(|p| p.changed.is_some()));
            let window = window.beside();
            tokio::spawn(async move {
                let fetched =
                    fetch_or_stop(&lister, stream, cursor.as_deref(), &stop, &pace).await?;
                let ahead = match (&fetched, reading) {
                    (Ok(page), Some((store, cfg))) => {
                        window.read_beside(store.as_ref(), page, &cfg).await
                    }
                    _ => None,
                };
                Some((fetched, ahead))
            })
        });
        let following = async {
            match following {
                Some(task) => Some(
                    task.await
                        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
                ),
                None => None,
            }
        };
        let taken = Taken {
            ahead: ahead.take(),
            previous: &mut previous,
            window: &window,
        };
        let (applied, following) = tokio::join!(
            take_page(store, kind, stream, &page, sink, summary, taken),
            following
        );
        applied?;
        progress.page(summary, options);
        if page.complete {
            return Ok(Stopped::Finished);
        }
        cursor = page.next.clone();
        match following {
            Some(Some((fetched, read))) => {
                next = Some(fetched);
                ahead = read;
            }
            Some(None) => return Ok(Stopped::Early(ResyncOutcome::Interrupted)),
            None if stop.is_cancelled() => return Ok(Stopped::Early(ResyncOutcome::Interrupted)),
            None if budget_low() => return Ok(Stopped::Early(ResyncOutcome::BudgetExhausted)),
            None => next = fetch_or_stop(lister, stream, cursor.as_deref(), stop, pace).await,
        }
    }
}

/// When the next page's candidates can be read beside a page's transaction: once it has begun
/// and taken its stamp. From then until the next page's transaction begins, only this page's
/// transaction can commit without moving the next stamp off [`WriteStamp::follows`], so a read
/// in that time sees the store as this transaction began or as it committed; the next page
/// reads again whatever this one changed, which makes either exact.
#[derive(Default)]
struct ReadWindow {
    state: tokio::sync::watch::Sender<Window>,
}

#[derive(Debug, Clone, Copy, Default)]
enum Window {
    /// The page's transaction has not begun.
    #[default]
    Before,
    /// Begun, with the transaction's stamp.
    Open(WriteStamp),
    /// No read beside it: a backend without stamps, a dry run, or the page failed first.
    Closed,
}

/// The reading side of a [`ReadWindow`]; its wait ends when the window is dropped.
struct Beside {
    state: tokio::sync::watch::Receiver<Window>,
}

impl ReadWindow {
    fn open(&self, stamp: WriteStamp) {
        self.state.send_replace(Window::Open(stamp));
    }

    fn beside(&self) -> Beside {
        Beside {
            state: self.state.subscribe(),
        }
    }
}

impl Beside {
    /// Reads the candidates of `page` once the window opens; `None` when it closed instead or
    /// the read failed (the page then reads them in its own transaction).
    async fn read_beside(
        mut self,
        store: &dyn Store,
        page: &ListedPage,
        cfg: &MatchConfig,
    ) -> Option<ReadAhead> {
        let records: Vec<&SourceRecord> = page
            .rows
            .iter()
            .filter_map(|row| row.record.as_ref().ok().and_then(Option::as_ref))
            .collect();
        let prepared = AheadPrepared::new(&records, cfg);
        let window = *self
            .state
            .wait_for(|w| !matches!(w, Window::Before))
            .await
            .ok()?;
        let Window::Open(stamp) = window else {
            return None;
        };
        match read_ahead(store, prepared, stamp).await {
            Ok(read) => Some(read),
            Err(e) => {
                tracing::debug!(error = %e, "Reading a page's candidates ahead failed; the page reads them itself.");
                None
            }
        }
    }
}

/// Closes a page's read window if the page ends without opening it.
struct Closed<'a>(&'a ReadWindow);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.state.send_if_modified(|w| {
            let before = matches!(w, Window::Before);
            if before {
                *w = Window::Closed;
            }
            before
        });
    }
}

/// What a page brings from, and leaves for, its neighbours.
struct Taken<'a> {
    /// Its candidates, read beside the previous page's transaction.
    ahead: Option<ReadAhead>,
    /// The previous page's transaction; replaced by this page's.
    previous: &'a mut Option<Previous>,
    /// This page's read window, for the next page's read.
    window: &'a ReadWindow,
}

/// Spaces a resync's page requests evenly at the allowed rate, without bursts, so a resync
/// never spends the upstream's burst allowance (live work keeps it) and never outruns a server
/// counting the same rate.
struct Pacer {
    limiter: governor::DefaultDirectRateLimiter,
    waited: std::sync::Mutex<Duration>,
}

impl Pacer {
    fn new(rate: f64) -> Self {
        let period = Duration::from_secs_f64(1.0 / rate.max(1e-6)).max(Duration::from_micros(1));
        let quota = governor::Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(std::num::NonZeroU32::MIN);
        Self {
            limiter: governor::RateLimiter::direct(quota),
            waited: std::sync::Mutex::new(Duration::ZERO),
        }
    }

    async fn until_ready(&self) {
        let started = Instant::now();
        self.limiter.until_ready().await;
        *self.waited.lock().expect("pacer lock") += started.elapsed();
    }

    fn waited(&self) -> Duration {
        *self.waited.lock().expect("pacer lock")
    }
}

/// One page fetch at the pacer's pace, abandoned (None) when `stop` fires first.
async fn fetch_or_stop(
    lister: &Lister,
    stream: &str,
    cursor: Option<&str>,
    stop: &CancellationToken,
    pace: &Pacer,
) -> Option<Result<ListedPage, FetchError>> {
    tokio::select! {
        _ = stop.cancelled() => None,
        page = async {
            pace.until_ready().await;
            lister.page(stream, cursor).await
        } => Some(page),
    }
}

/// Applies (or, in a dry run, compares) one page. Applying is one transaction: every record,
/// then the page's seen marks and the stream's checkpoint.
async fn take_page(
    store: &dyn Store,
    kind: SourceKind,
    stream: &str,
    page: &ListedPage,
    sink: &mut Sink<'_>,
    summary: &mut ResyncSummary,
    taken: Taken<'_>,
) -> Result<(), ResyncError> {
    let Taken {
        ahead,
        previous,
        window,
    } = taken;
    let _closed = Closed(window);
    let before = previous.take();
    summary.records += page.rows.len() as u64;
    let ids: Vec<SourceId> = page.rows.iter().filter_map(|r| r.id.clone()).collect();
    match sink {
        Sink::Apply { identity, pass } => {
            let now = Utc::now();
            let mut records = Vec::with_capacity(page.rows.len());
            for row in &page.rows {
                match &row.record {
                    Ok(Some(record)) => records.push(record),
                    Ok(None) => {}
                    Err(why) => reject(summary, kind, stream, why),
                }
            }
            let mut tx = store.begin().await?;
            let stamp = tx.write_stamp().await?;
            if let Some(stamp) = stamp {
                window.open(stamp);
            }
            let ahead = match (ahead, &before, stamp) {
                (Some(read), Some(before), Some(stamp)) => Some((read, before, stamp)),
                _ => None,
            };
            let paged = apply_page(tx.as_mut(), &records, identity, now, ahead).await?;
            summary.read_ahead_pages += u64::from(paged.read_ahead_used);
            for applied in &paged.applied {
                count(summary, applied.outcome);
            }
            tx.mark_resync_seen(kind, &ids, *pass).await?;
            // The page's checkpoint commits with the page: a resumed pass starts after it.
            tx.save_sync_state(&SyncState {
                source: kind,
                stream: format!("{STATE_PREFIX}{stream}"),
                cursor: serde_json::to_string(&StreamMark {
                    pass: *pass,
                    done: page.complete,
                })
                .ok(),
                checkpoint: page.next.clone(),
                last_success_at: None,
                updated_at: now,
            })
            .await?;
            tx.commit().await?;
            *previous = stamp.map(|stamp| Previous {
                stamp,
                changed: paged.changed,
            });
        }
        Sink::Compare { seen } => {
            for row in &page.rows {
                match &row.record {
                    Ok(Some(record)) => {
                        let stored = store.load_source_record(&record.key).await?;
                        count(summary, compare(stored.as_ref(), record));
                    }
                    Ok(None) => {}
                    Err(why) => reject(summary, kind, stream, why),
                }
            }
            seen.extend(ids);
        }
    }
    Ok(())
}

fn count(summary: &mut ResyncSummary, outcome: SaveOutcome) {
    match outcome {
        SaveOutcome::Created => summary.created += 1,
        SaveOutcome::Updated => summary.updated += 1,
        SaveOutcome::Unchanged => summary.unchanged += 1,
        SaveOutcome::Stale => summary.stale += 1,
    }
}

fn reject(summary: &mut ResyncSummary, kind: SourceKind, stream: &str, why: &str) {
    summary.rejected += 1;
    tracing::warn!(source = %kind, stream, reason = why, "Resync skipped a listed record.");
}

/// What saving `record` would do, by the store's monotonic rule.
fn compare(stored: Option<&SourceRecord>, record: &SourceRecord) -> SaveOutcome {
    match stored {
        None => SaveOutcome::Created,
        Some(old) if old.version_key() > record.version_key() => SaveOutcome::Stale,
        Some(old)
            if old.fields == record.fields
                && old.status == record.status
                && old.merged_into == record.merged_into
                && old.raw == record.raw =>
        {
            SaveOutcome::Unchanged
        }
        Some(_) => SaveOutcome::Updated,
    }
}

/// After every stream of pass `pass` was listed: records it did not list are marked missing
/// (or cleared when someone fetched them since the pass started), and those missing past the
/// grace are deleted. Safe to run twice for one pass.
async fn finish_pass(
    store: &dyn Store,
    kind: SourceKind,
    identity: &IdentitySettings,
    options: &ResyncOptions,
    pass: i64,
    pass_started_ms: i64,
    summary: &mut ResyncSummary,
) -> Result<(), ResyncError> {
    let now = Utc::now();
    let pass_started = DateTime::from_timestamp_millis(pass_started_ms).unwrap_or(now);
    let grace = i64::from(options.missing_grace_passes);
    let mut after: Option<String> = None;
    loop {
        let page = store
            .load_unseen_records(kind, pass, after.as_deref(), UNSEEN_PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.id.as_str().to_string());
        let mut doomed = Vec::new();
        for r in &page {
            if r.fetched_at >= pass_started {
                // Fetched (webhook, poll) after the pass began: it exists upstream.
                if r.missing_passes > 0 {
                    store.mark_resync_missing(&r.key, 0, None, None).await?;
                }
                continue;
            }
            let passes = if r.missing_checked_pass == Some(pass) {
                r.missing_passes
            } else {
                r.missing_passes + 1
            };
            if r.missing_checked_pass != Some(pass) {
                let since = if r.missing_passes == 0 {
                    Some(now)
                } else {
                    r.missing_since.or(Some(now))
                };
                store
                    .mark_resync_missing(&r.key, passes, Some(pass), since)
                    .await?;
            }
            if passes > grace {
                doomed.push(r);
            } else {
                summary.missing += 1;
            }
        }
        if doomed.is_empty() {
            continue;
        }
        let mut tx = store.begin().await?;
        for r in doomed {
            let Some(stored) = store.load_source_record(&r.key).await? else {
                continue;
            };
            let tombstone = SourceRecord {
                key: r.key.clone(),
                fields: Default::default(),
                status: RecordStatus::Deleted,
                merged_into: None,
                source_updated_at: stored.source_updated_at,
                fetched_at: now.max(stored.fetched_at),
                raw: stored.raw,
            };
            // Stale: someone stored a newer snapshot meanwhile, so it exists after all.
            let applied = apply_record(tx.as_mut(), &tombstone, identity, now).await?;
            if applied.outcome != SaveOutcome::Stale {
                summary.deleted += 1;
            }
        }
        tx.commit().await?;
    }
    Ok(())
}

/// `--source` of `resync`: one source or every enabled one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncTarget {
    One(SourceKind),
    All,
}

impl std::str::FromStr for ResyncTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            return Ok(ResyncTarget::All);
        }
        s.parse()
            .map(ResyncTarget::One)
            .map_err(|_| "expected healthie, intakeq, hint or all".to_string())
    }
}

/// Exit code: a resync of the source is already running elsewhere.
pub const EXIT_BUSY: u8 = 4;

/// The `resync` command: runs the target sources concurrently (each has its own limiter and
/// lease), prints one summary per source, and returns the exit code: 0 every run completed;
/// 3 a run stopped early and resumes next time (signal, daily budget, lost lease); 4 a resync
/// of a source is already running; 1 a run failed (it too resumes from its checkpoint); 2 the
/// target source is not enabled.
pub async fn run_command(
    settings: &Settings,
    store: Arc<dyn Store>,
    target: ResyncTarget,
    dry_run: bool,
    restart: bool,
    json: bool,
    stop: CancellationToken,
) -> anyhow::Result<u8> {
    let kinds: Vec<SourceKind> = match target {
        ResyncTarget::One(kind) => vec![kind],
        ResyncTarget::All => SourceKind::ALL
            .into_iter()
            .filter(|k| enabled(settings, *k))
            .collect(),
    };
    for kind in &kinds {
        if !enabled(settings, *kind) {
            eprintln!("error: sources.{kind}.enabled is false; enable the source to resync it");
            return Ok(crate::cli::EXIT_CONFIG);
        }
    }
    let metrics = Arc::new(Metrics::new());
    let identity = settings.identity.to_identity_settings();
    let multi = Progress::multi_if_terminal();
    let runs = kinds.iter().map(|&kind| {
        let lister = Lister::from_settings(settings, kind, metrics.clone());
        crate::app::share_rate_limits(settings, &store, [lister.source()]);
        let options = ResyncOptions::from_settings(settings, &lister, dry_run, restart);
        let progress = Progress::new(kind, multi.as_ref());
        let (store, metrics, identity, stop) = (store.clone(), metrics.clone(), &identity, &stop);
        async move {
            restore_budget(store.as_ref(), &lister).await;
            let result = run_resync(
                store.as_ref(),
                &lister,
                identity,
                &options,
                &metrics,
                stop,
                &progress,
            )
            .await;
            if !dry_run {
                save_budget(store.as_ref(), &lister).await;
            }
            (kind, result)
        }
    });
    let results = futures::future::join_all(runs).await;
    let mut code = 0u8;
    let mut summaries = Vec::new();
    for (kind, result) in results {
        match result {
            Ok(summary) => {
                if summary.outcome != ResyncOutcome::Completed {
                    code = code.max(crate::cli::EXIT_INCOMPLETE);
                }
                if !json {
                    print!("{}", summary.render_text());
                }
                summaries.push(summary);
            }
            Err(e @ ResyncError::Busy { .. }) => {
                eprintln!("error: {e}");
                code = code.max(EXIT_BUSY);
            }
            Err(e) => {
                let mut text = format!("error: resync {kind} failed: {e}");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                eprintln!("{text}");
                code = code.max(crate::cli::EXIT_FAILURE);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    }
    Ok(code)
}

fn enabled(settings: &Settings, kind: SourceKind) -> bool {
    match kind {
        SourceKind::Healthie => settings.sources.healthie.enabled,
        SourceKind::Intakeq => settings.sources.intakeq.enabled,
        SourceKind::Hint => settings.sources.hint.enabled,
    }
}

/// Takes back the daily budget another process saved for this credential.
async fn restore_budget(store: &dyn Store, lister: &Lister) {
    if lister.budget().is_none() {
        return;
    }
    match store
        .load_sync_state(lister.kind(), crate::app::BUDGET_STREAM)
        .await
    {
        Ok(state) => {
            if let Some(snapshot) = state
                .and_then(|s| s.cursor)
                .and_then(|c| serde_json::from_str::<BudgetSnapshot>(&c).ok())
            {
                lister.source().restore_budget(&snapshot);
            }
        }
        Err(e) => {
            tracing::warn!(source = %lister.kind(), error = %e, "Could not read the saved daily budget.")
        }
    }
}

async fn save_budget(store: &dyn Store, lister: &Lister) {
    let Some(budget) = lister.budget() else {
        return;
    };
    let now = Utc::now();
    let state = SyncState {
        source: lister.kind(),
        stream: crate::app::BUDGET_STREAM.into(),
        cursor: serde_json::to_string(&budget).ok(),
        checkpoint: None,
        last_success_at: None,
        updated_at: now,
    };
    if let Err(e) = store.save_sync_state(&state).await {
        tracing::warn!(source = %lister.kind(), error = %e, "Could not save the daily budget.");
    }
}

/// Progress on a terminal (a bar per source) or periodic log lines (counts only, no PHI).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    state: std::sync::Mutex<ProgressState>,
}

#[derive(Default)]
struct ProgressState {
    totals: std::collections::BTreeMap<&'static str, u64>,
    last_log: Option<Instant>,
    started: Option<Instant>,
}

impl Progress {
    /// A bar on `multi` when stderr is a terminal, else log lines.
    pub fn new(kind: SourceKind, multi: Option<&indicatif::MultiProgress>) -> Self {
        let bar = multi.map(|m| {
            let bar = m.add(indicatif::ProgressBar::new(0));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>9} [{bar:30}] {pos}/{len} records {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(kind.as_str());
            bar
        });
        Self {
            bar,
            state: std::sync::Mutex::new(ProgressState {
                started: Some(Instant::now()),
                ..Default::default()
            }),
        }
    }

    /// Log lines only (tests, benchmarks, non-terminals).
    pub fn quiet() -> Self {
        Self::new(SourceKind::Healthie, None)
    }

    /// A terminal progress display when stderr is one.
    pub fn multi_if_terminal() -> Option<indicatif::MultiProgress> {
        std::io::stderr()
            .is_terminal()
            .then(indicatif::MultiProgress::new)
    }

    fn stream_total(&self, _kind: SourceKind, stream: &'static str, total: Option<u64>) {
        let Some(total) = total else { return };
        let mut s = self.state.lock().expect("progress lock");
        s.totals.insert(stream, total);
        if let Some(bar) = &self.bar {
            bar.set_length(s.totals.values().sum());
        }
    }

    fn page(&self, summary: &ResyncSummary, options: &ResyncOptions) {
        let mut s = self.state.lock().expect("progress lock");
        let elapsed = s
            .started
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
            .max(1e-3);
        let total: u64 = s.totals.values().sum();
        let rate = summary.records as f64 / elapsed;
        // Pages still to fetch at the allowed request rate (the rate budget bounds the ETA).
        let eta = (total > summary.records).then(|| {
            let per_page = summary.records.max(1) as f64 / summary.pages.max(1) as f64;
            let pages_left = (total - summary.records) as f64 / per_page.max(1.0);
            pages_left / options.allowed_rate.max(1e-6)
        });
        let eta_text = eta.map_or_else(|| "?".to_string(), |e| format!("{e:.0}s"));
        if let Some(bar) = &self.bar {
            bar.set_position(summary.records);
            bar.set_message(format!(
                "{} pages, {rate:.0}/s, ETA {eta_text}",
                summary.pages
            ));
            return;
        }
        let due = s
            .last_log
            .is_none_or(|t| t.elapsed() >= options.progress_log_every);
        if due {
            s.last_log = Some(Instant::now());
            tracing::info!(
                source = %summary.source,
                pages = summary.pages,
                records = summary.records,
                total,
                records_per_sec = rate,
                eta_secs = eta.unwrap_or(-1.0),
                "Resync progress."
            );
        }
    }

    fn finish(&self, summary: &ResyncSummary) {
        if let Some(bar) = &self.bar {
            bar.finish_with_message(format!("{} pages, {:?}", summary.pages, summary.outcome));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PersonFields, SourceKey};

    fn record(updated: i64, fetched: i64, name: &str) -> SourceRecord {
        SourceRecord {
            key: SourceKey::new(SourceKind::Hint, "1"),
            fields: PersonFields {
                given_name: Some(name.into()),
                ..Default::default()
            },
            status: RecordStatus::Active,
            merged_into: None,
            source_updated_at: DateTime::from_timestamp(updated, 0),
            fetched_at: DateTime::from_timestamp(fetched, 0).unwrap(),
            raw: Value::Null,
        }
    }

    #[test]
    fn a_dry_run_compares_like_the_monotonic_save() {
        let stored = record(10, 20, "A");
        assert_eq!(compare(None, &stored), SaveOutcome::Created);
        assert_eq!(
            compare(Some(&stored), &record(10, 30, "A")),
            SaveOutcome::Unchanged
        );
        assert_eq!(
            compare(Some(&stored), &record(11, 30, "B")),
            SaveOutcome::Updated
        );
        assert_eq!(
            compare(Some(&stored), &record(9, 30, "B")),
            SaveOutcome::Stale
        );
    }

    #[test]
    fn the_summary_names_counts_only() {
        let mut s = ResyncSummary::new(SourceKind::Hint, true);
        s.created = 3;
        s.missing = 2;
        let text = s.render_text();
        assert!(text.contains("3 created"), "{text}");
        assert!(text.contains("2 missing"), "{text}");
        assert!(text.contains("dry run"), "{text}");
    }
}
