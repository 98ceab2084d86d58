//! Storage: every SQL statement lives here. One trait ([`Store`], with [`StoreTx`] for write
//! transactions) and two implementations, SQLite (embedded default) and Postgres (scale-out),
//! generated from one body of SQL so the backends cannot drift apart.

mod postgres;
mod rate_slots;
mod sql;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::model::{InboxId, PatientId, SourceKey, SourceKind, SourceRecord};

pub use postgres::PgStore;
pub use rate_slots::StoreRateSlots;
pub use sqlite::SqliteStore;

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Storage failures. Messages never carry row values (they could be PHI): a database error
/// shows its SQLSTATE code and constraint name only.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error{}", describe_db_error(.0))]
    Database(#[source] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored {what} is not valid")]
    Corrupt {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("unsupported database url scheme (expected sqlite: or postgres:)")]
    UnsupportedUrl,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e)
    }
}

impl StoreError {
    /// Connection-level failures (server restarting, pool timeout) are worth retrying.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Database(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Protocol(_)
            )
        ) || matches!(self, StoreError::Database(sqlx::Error::Database(db)) if db.code().is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "40001" || c == "40P01" || c == "5" || c == "517"))
    }

    pub(crate) fn corrupt(
        what: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Corrupt {
            what,
            source: Box::new(source),
        }
    }
}

fn describe_db_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            match db.constraint() {
                Some(constraint) => format!(" (code {code}, constraint {constraint})"),
                None => format!(" (code {code})"),
            }
        }
        sqlx::Error::RowNotFound => ": row not found".into(),
        sqlx::Error::PoolTimedOut => ": connection pool timed out".into(),
        sqlx::Error::PoolClosed => ": connection pool closed".into(),
        sqlx::Error::Io(_) => ": i/o error".into(),
        sqlx::Error::Tls(_) => ": tls error".into(),
        sqlx::Error::Protocol(_) => ": protocol error".into(),
        sqlx::Error::ColumnNotFound(c) => format!(": column {c} not found"),
        sqlx::Error::ColumnDecode { index, .. } => format!(": cannot decode column {index}"),
        sqlx::Error::Configuration(_) => ": bad connection settings".into(),
        _ => String::new(),
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How an inbox item entered the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Webhook,
    Poll,
    Resync,
    Import,
    Manual,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Webhook => "webhook",
            Origin::Poll => "poll",
            Origin::Resync => "resync",
            Origin::Import => "import",
            Origin::Manual => "manual",
        }
    }
}

/// Inbox item states; an item ends `done`, `ignored` (with a reason) or `dead` (with an error kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboxState {
    Pending,
    Leased,
    Done,
    Ignored,
    Dead,
}

impl InboxState {
    pub const ALL: [InboxState; 5] = [
        InboxState::Pending,
        InboxState::Leased,
        InboxState::Done,
        InboxState::Ignored,
        InboxState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InboxState::Pending => "pending",
            InboxState::Leased => "leased",
            InboxState::Done => "done",
            InboxState::Ignored => "ignored",
            InboxState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        InboxState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// An item to put in the inbox. `ignore_reason` stores it as `ignored` straight away
/// (test events, unknown event types), so every acknowledged delivery is on record.
#[derive(Debug, Clone)]
pub struct NewInboxItem {
    pub source: SourceKind,
    pub origin: Origin,
    pub event_type: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub body: String,
    pub dedupe_key: Option<String>,
    pub received_at_ms: i64,
    pub ignore_reason: Option<String>,
}

/// Result of putting an item in the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted(InboxId),
    /// An item with the same `(source, dedupe_key)` is already there.
    Duplicate,
}

/// An inbox item as the worker sees it after claiming it.
#[derive(Debug, Clone)]
pub struct InboxItem {
    pub id: InboxId,
    pub source: SourceKind,
    pub origin: String,
    pub event_type: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub body: String,
    pub state: InboxState,
    pub reason: Option<String>,
    pub attempts: i64,
    pub received_at_ms: i64,
    pub available_at_ms: i64,
    pub last_error_kind: Option<String>,
    pub last_http_status: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

/// How an item that the worker could not finish goes back to the inbox.
#[derive(Debug, Clone)]
pub struct RetryAt {
    pub available_at_ms: i64,
    pub error_kind: String,
    pub http_status: Option<u16>,
    /// False for rate-limit snoozes, which do not use up an attempt.
    pub count_attempt: bool,
}

/// Inbox counts for one source and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboxCount {
    pub source: SourceKind,
    pub state: InboxState,
    pub count: i64,
}

/// Result of saving a source record snapshot under the monotonic rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveOutcome {
    Created,
    Updated,
    /// Same content as stored (only the fetch time may have moved).
    Unchanged,
    /// Older than the stored snapshot: not written.
    Stale,
}

/// How a link was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkMethod {
    /// First record of a new canonical patient.
    New,
    ExplicitId,
    Rule,
    Score,
    Manual,
    /// Followed an upstream merge (Healthie `patient.merged`, Hint `merged_into`).
    SourceMerge,
}

impl LinkMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMethod::New => "new",
            LinkMethod::ExplicitId => "explicit_id",
            LinkMethod::Rule => "rule",
            LinkMethod::Score => "score",
            LinkMethod::Manual => "manual",
            LinkMethod::SourceMerge => "source_merge",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            LinkMethod::New,
            LinkMethod::ExplicitId,
            LinkMethod::Rule,
            LinkMethod::Score,
            LinkMethod::Manual,
            LinkMethod::SourceMerge,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// A source record's link to its canonical patient.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Link {
    pub key: SourceKey,
    pub patient_id: PatientId,
    pub method: LinkMethod,
    pub rule: Option<String>,
    pub score: Option<f64>,
    /// `auto` or `admin`; admin decisions are never undone by automatic matching.
    pub decided_by: String,
    pub decided_at: DateTime<Utc>,
}

/// `decided_by` of a link (and a review decision) an admin made: automatic matching never
/// moves such a link.
pub const ADMIN: &str = "admin";

impl Link {
    pub fn is_manual(&self) -> bool {
        self.decided_by == ADMIN
    }
}

/// One append-only entry of the link history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkEvent {
    pub key: SourceKey,
    /// `link`, `relink` or `unlink`.
    pub action: String,
    pub patient_id: Option<PatientId>,
    pub previous_patient_id: Option<PatientId>,
    pub method: LinkMethod,
    pub rule: Option<String>,
    pub score: Option<f64>,
    pub decided_by: String,
    pub at: DateTime<Utc>,
}

/// A row of the analysts' `patients` table.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct PatientRow {
    pub patient_id: PatientId,
    pub given_name: Option<String>,
    pub middle_name: Option<String>,
    pub family_name: Option<String>,
    pub preferred_name: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<String>,
    pub gender_identity: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub address_line1: Option<String>,
    pub address_line2: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
    pub healthie_id: Option<String>,
    pub intakeq_id: Option<String>,
    pub hint_id: Option<String>,
    /// `active`, `archived`, `deleted` or `merged`.
    pub status: String,
    pub merged_into: Option<PatientId>,
    pub first_seen_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
}

/// One version of a canonical row in `patient_history`: the row as it was from `valid_from`
/// (inclusive) until `valid_to` (exclusive; `None` while it is the current version).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatientVersion {
    #[serde(flatten)]
    pub row: PatientRow,
    pub valid_from: DateTime<Utc>,
    pub valid_to: Option<DateTime<Utc>>,
}

/// Which source record supplied one canonical field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldSource {
    pub field: String,
    pub key: SourceKey,
    pub source_updated_at: Option<DateTime<Utc>>,
}

/// Per source and stream sync progress (poll cursors, resync checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncState {
    pub source: SourceKind,
    pub stream: String,
    pub cursor: Option<String>,
    pub checkpoint: Option<String>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// The state of a review of an uncertain (record, patient) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReviewState {
    Open,
    /// An admin linked the record to the patient.
    Accepted,
    /// An admin said the record is not this patient: never linked or proposed again.
    Rejected,
}

impl ReviewState {
    pub const ALL: [ReviewState; 3] = [
        ReviewState::Open,
        ReviewState::Accepted,
        ReviewState::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReviewState::Open => "open",
            ReviewState::Accepted => "accepted",
            ReviewState::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ReviewState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::str::FromStr for ReviewState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReviewState::parse(s).ok_or_else(|| "expected open, accepted or rejected".to_string())
    }
}

/// A candidate pair in the review queue. `score` is 0 for pairs an admin recorded directly
/// (`link`, `unlink`) without a proposal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Review {
    pub id: i64,
    pub key: SourceKey,
    pub patient_id: PatientId,
    pub score: f64,
    pub state: ReviewState,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_by: Option<String>,
}

/// Where a store's writer stood inside a write transaction ([`StoreTx::write_stamp`]): which
/// writer connection, how many commits it had made, and SQLite's `data_version` (which moves
/// when any other connection, of this process or another, has committed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStamp {
    connection: u64,
    commits: u64,
    data_version: i64,
}

impl WriteStamp {
    /// Whether this stamp's transaction began right after `earlier`'s committed: one commit
    /// between them (that transaction's) and none by anyone else.
    pub fn follows(&self, earlier: &WriteStamp) -> bool {
        self.connection == earlier.connection
            && self.commits == earlier.commits + 1
            && self.data_version == earlier.data_version
    }
}

/// Counts the commits of a store's writer connection (a commit hook bumps `commits`, every
/// statement's commit included) and the connections it has opened, for [`WriteStamp`]s.
#[derive(Debug, Default)]
pub struct WriterClock {
    connection: std::sync::atomic::AtomicU64,
    commits: std::sync::atomic::AtomicU64,
}

impl WriterClock {
    /// A new writer connection: stamps taken on an earlier one no longer compare.
    pub fn connected(&self) {
        self.connection
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// A commit on the writer connection.
    pub fn committed(&self) {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The stamp of a transaction holding the writer, given its connection's `data_version`.
    pub fn stamp(&self, data_version: i64) -> WriteStamp {
        WriteStamp {
            connection: self.connection.load(std::sync::atomic::Ordering::SeqCst),
            commits: self.commits.load(std::sync::atomic::Ordering::SeqCst),
            data_version,
        }
    }
}

/// What [`Store::read_candidates`] found: `(blocking key, patient)` pairs and every record
/// linked to those patients, as one snapshot of the store.
pub type CandidateRead = (Vec<(String, PatientId)>, Vec<(PatientId, SourceRecord)>);

/// Read and queue operations, each its own short transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> Backend;
    /// Another handle on this store, for a task of its own.
    fn shared(&self) -> std::sync::Arc<dyn Store>;
    /// SQLite: the writer's sorts and temporary tables go to temporary files (`on`) or stay
    /// in memory (off, the usual setting: statement journals in memory). Call it with no
    /// write transaction open. Other backends do nothing.
    async fn sort_in_files(&self, on: bool) -> StoreResult<()>;
    /// [`StoreTx::find_patients_by_keys`] and [`StoreTx::load_linked_records_many`] for the
    /// patients found, in one read transaction outside any write transaction.
    async fn read_candidates(&self, keys: &[String]) -> StoreResult<CandidateRead>;
    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;
    /// Opens a write transaction (SQLite: `BEGIN IMMEDIATE`).
    async fn begin(&self) -> StoreResult<Box<dyn StoreTx>>;

    /// Stores one inbox item in its own transaction.
    async fn insert_inbox(&self, item: &NewInboxItem) -> StoreResult<InsertOutcome>;
    /// Leases up to `limit` claimable items (pending and due, or leased with an expired lease)
    /// to `owner` until `now_ms + lease`, counting an attempt for each.
    async fn claim_inbox(
        &self,
        owner: &str,
        limit: u32,
        lease: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<InboxItem>>;
    /// Puts a leased item back for a later attempt. False when `owner` no longer holds the lease.
    async fn retry_inbox(&self, id: InboxId, owner: &str, retry: &RetryAt) -> StoreResult<bool>;
    /// Dead-letters a leased item with its error kind. False when `owner` no longer holds the lease.
    async fn dead_inbox(
        &self,
        id: InboxId,
        owner: &str,
        error_kind: &str,
        http_status: Option<u16>,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Returns every item leased by `owner` to `pending` without counting the attempt.
    async fn release_leases(&self, owner: &str) -> StoreResult<u64>;
    /// Extends every lease `owner` still holds to `until_ms` (a batch outlasting one lease,
    /// e.g. at IntakeQ's 10 requests a minute). Items another owner took are not touched.
    async fn renew_leases(&self, owner: &str, until_ms: i64) -> StoreResult<u64>;
    async fn load_inbox_item(&self, id: InboxId) -> StoreResult<Option<InboxItem>>;
    /// Items in `state`, optionally of one source and received at or after `since_ms`, oldest first.
    async fn list_inbox(
        &self,
        state: InboxState,
        source: Option<SourceKind>,
        since_ms: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<InboxItem>>;
    /// Puts dead items back to `pending` with a fresh attempt budget: one item, or every dead
    /// item (optionally of one source, received at or after `since_ms`). Returns how many.
    async fn requeue_dead(
        &self,
        id: Option<InboxId>,
        source: Option<SourceKind>,
        since_ms: Option<i64>,
        now_ms: i64,
    ) -> StoreResult<u64>;
    async fn inbox_counts(&self) -> StoreResult<Vec<InboxCount>>;
    /// Receive time of the oldest pending item, if any.
    async fn oldest_pending_ms(&self) -> StoreResult<Option<i64>>;

    async fn load_source_record(&self, key: &SourceKey) -> StoreResult<Option<SourceRecord>>;
    async fn load_patient(&self, id: &PatientId) -> StoreResult<Option<PatientRow>>;
    async fn load_field_sources(&self, id: &PatientId) -> StoreResult<Vec<FieldSource>>;
    async fn load_link(&self, key: &SourceKey) -> StoreResult<Option<Link>>;
    async fn load_link_events(&self, key: &SourceKey) -> StoreResult<Vec<LinkEvent>>;
    /// Patient counts by status.
    async fn count_patients(&self) -> StoreResult<Vec<(String, i64)>>;
    async fn load_sync_state(
        &self,
        source: SourceKind,
        stream: &str,
    ) -> StoreResult<Option<SyncState>>;
    async fn save_sync_state(&self, state: &SyncState) -> StoreResult<()>;

    /// Reviews in `state` (all states when `None`), oldest first.
    async fn list_reviews(
        &self,
        state: Option<ReviewState>,
        limit: u32,
    ) -> StoreResult<Vec<Review>>;
    /// Every link of a patient, by record key.
    async fn load_patient_links(&self, patient_id: &PatientId) -> StoreResult<Vec<Link>>;
    /// Link history naming a patient (as the new or the previous patient), oldest first.
    async fn load_patient_link_events(&self, patient_id: &PatientId)
        -> StoreResult<Vec<LinkEvent>>;
    /// One page of source records in key order `(source, source_id)`, strictly after `after`.
    /// Without `with_raw` the payload is left out (`raw` is JSON null), which is what matching
    /// and survivorship need and keeps a full scan light.
    async fn load_source_records_page(
        &self,
        after: Option<&SourceKey>,
        limit: u32,
        with_raw: bool,
    ) -> StoreResult<Vec<SourceRecord>>;
    /// One page of links in key order, strictly after `after`.
    async fn load_links_page(
        &self,
        after: Option<&SourceKey>,
        limit: u32,
    ) -> StoreResult<Vec<Link>>;
    /// One page of canonical rows in `patient_id` order, strictly after `after`.
    async fn load_patients_page(
        &self,
        after: Option<&PatientId>,
        limit: u32,
    ) -> StoreResult<Vec<PatientRow>>;
    /// One page of blocking keys in `(key, source, source_id)` order (the primary key's),
    /// strictly after `after`.
    async fn load_match_keys_page(
        &self,
        after: Option<&(SourceKey, String)>,
        limit: u32,
    ) -> StoreResult<Vec<(SourceKey, String)>>;
    /// Calls `f` with `(source, source id, blocking key)` for every stored blocking key, in no
    /// particular order, from one streamed query (no page restarts, no owned strings).
    async fn for_each_match_key(
        &self,
        f: &mut (dyn for<'k> FnMut(SourceKind, &'k str, &'k str) + Send),
    ) -> StoreResult<()>;
    /// Calls `f` with `(source, source id, patient id, decided by an admin)` for every link, in
    /// no particular order, from one streamed query.
    async fn for_each_link_target(
        &self,
        f: &mut (dyn for<'k> FnMut(SourceKind, &'k str, &'k str, bool) + Send),
    ) -> StoreResult<()>;
    /// Every version of a canonical row, oldest first.
    async fn load_patient_history(&self, id: &PatientId) -> StoreResult<Vec<PatientVersion>>;
    /// One page, in `patient_id` order strictly after `after`, of the versions that were
    /// current at `at` (`valid_from <= at < valid_to`): the table as it was then.
    async fn load_patients_as_of_page(
        &self,
        at: DateTime<Utc>,
        after: Option<&PatientId>,
        limit: u32,
    ) -> StoreResult<Vec<PatientVersion>>;
    /// Review counts by state.
    async fn count_reviews(&self) -> StoreResult<Vec<(ReviewState, i64)>>;
    /// Every `sync_state` row (poll cursors, resync checkpoints, budgets), by source and stream.
    async fn list_sync_states(&self) -> StoreResult<Vec<SyncState>>;
    /// Leases to `owner` every other item of `source` about one of `resource_ids` that is
    /// pending (due or not: one fetch now answers it too) or whose lease expired, counting an
    /// attempt for each, so many events for one resource become one fetch and finish together.
    async fn claim_inbox_resources(
        &self,
        owner: &str,
        source: SourceKind,
        resource_ids: &[String],
        lease: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<InboxItem>>;

    /// Takes the resync lease of `source` for `owner` until `until_ms` when it is free, expired
    /// (before `now_ms`) or already `owner`'s; `None` when another owner holds it.
    async fn claim_resync(
        &self,
        source: SourceKind,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Option<ResyncRun>>;
    /// Extends `owner`'s lease; false when `owner` no longer holds it.
    async fn renew_resync(
        &self,
        source: SourceKind,
        owner: &str,
        until_ms: i64,
    ) -> StoreResult<bool>;
    /// Gives the lease back (a no-op when `owner` does not hold it).
    async fn release_resync(&self, source: SourceKind, owner: &str) -> StoreResult<()>;
    /// Starts the next pass (in progress, started at `now_ms`) and returns its number; `None`
    /// when `owner` does not hold the lease.
    async fn start_resync_pass(
        &self,
        source: SourceKind,
        owner: &str,
        now_ms: i64,
    ) -> StoreResult<Option<i64>>;
    /// Marks pass `pass` completed; false when `owner` does not hold the lease.
    async fn complete_resync_pass(
        &self,
        source: SourceKind,
        owner: &str,
        pass: i64,
    ) -> StoreResult<bool>;
    async fn load_resync_run(&self, source: SourceKind) -> StoreResult<Option<ResyncRun>>;
    /// One page, in id order after `after`, of `source`'s records that are not deleted and that
    /// no pass numbered `pass` or later has listed (`i64::MAX`: every record not deleted).
    async fn load_unseen_records(
        &self,
        source: SourceKind,
        pass: i64,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<UnseenRecord>>;
    /// Sets a record's missing mark: completed passes in a row without it, the pass that last
    /// counted, and since when (all cleared with 0, `None`, `None`).
    async fn mark_resync_missing(
        &self,
        key: &SourceKey,
        missing_passes: i64,
        checked_pass: Option<i64>,
        since: Option<DateTime<Utc>>,
    ) -> StoreResult<()>;
    /// Stores several inbox items in one transaction, with the outcome of each in order (a
    /// repeated dedupe key within the batch is a duplicate, as across batches). All or none
    /// commit. The default stores them one by one.
    async fn insert_inbox_batch(&self, items: &[NewInboxItem]) -> StoreResult<Vec<InsertOutcome>> {
        let mut outcomes = Vec::with_capacity(items.len());
        for item in items {
            outcomes.push(self.insert_inbox(item).await?);
        }
        Ok(outcomes)
    }
    /// Reserves the next slot of the shared rate limiter `key` (table `rate_slots`): its
    /// theoretical arrival time becomes `max(tat, now_us) + interval_us` in one atomic write,
    /// and the new value is returned. A key seen for the first time starts at `now_us`.
    async fn reserve_rate_slot(&self, key: &str, now_us: i64, interval_us: i64)
        -> StoreResult<i64>;
    /// Moves `key`'s theoretical arrival time to at least `at_us`, so no later reservation
    /// gets a slot before it (a pause every process honours).
    async fn defer_rate_slots(&self, key: &str, at_us: i64) -> StoreResult<()>;
    /// The shared daily allowance `key` as stored: the end of its window (microseconds since
    /// the epoch) and the requests used in it. `None` before any request was counted.
    async fn read_rate_budget(&self, key: &str) -> StoreResult<Option<(i64, i64)>>;
    /// Takes one request of the shared daily allowance `key` (table `rate_budgets`) in the
    /// window ending at `window_end_us`, unless `used + keep >= limit` in that window. Returns
    /// the requests used after taking, or `None` when none was left. A later window starts
    /// the count again; a caller still in an earlier window counts in the stored one.
    async fn take_rate_budget(
        &self,
        key: &str,
        window_end_us: i64,
        limit: i64,
        keep: i64,
    ) -> StoreResult<Option<i64>>;
}

/// Writes that must commit together: a source record, its link and the canonical row it
/// changes, and the inbox items that asked for them. Dropped without `commit`, it rolls back.
#[async_trait]
pub trait StoreTx: Send {
    async fn load_source_record(&mut self, key: &SourceKey) -> StoreResult<Option<SourceRecord>>;
    /// Saves a snapshot unless the stored one is newer (source `updated_at`, then fetch time).
    async fn save_source_record(&mut self, record: &SourceRecord) -> StoreResult<SaveOutcome>;
    async fn load_link(&mut self, key: &SourceKey) -> StoreResult<Option<Link>>;
    /// Writes (or replaces) a link and appends its event to `link_events`.
    async fn save_link(&mut self, link: &Link, event: &LinkEvent) -> StoreResult<()>;
    /// Removes a link and appends its event to `link_events`.
    async fn delete_link(&mut self, key: &SourceKey, event: &LinkEvent) -> StoreResult<()>;
    /// Every source record linked to a patient.
    async fn load_linked_records(
        &mut self,
        patient_id: &PatientId,
    ) -> StoreResult<Vec<SourceRecord>>;
    async fn load_patient(&mut self, id: &PatientId) -> StoreResult<Option<PatientRow>>;
    /// Upserts a canonical row and replaces its field provenance. A row at version 1 (or 0) is
    /// a patient's first write: provenance rows it does not name are only removed from later
    /// versions.
    async fn save_patient(
        &mut self,
        row: &PatientRow,
        provenance: &[FieldSource],
    ) -> StoreResult<()>;
    /// Marks leased items finished: `done`, or `ignored` when a reason is given. Returns how
    /// many were still leased by `owner`; fewer than asked means a lease was lost.
    async fn finish_inbox(
        &mut self,
        ids: &[InboxId],
        owner: &str,
        ignore_reason: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<u64>;
    /// Serializes work on one name (a patient or record) until the transaction ends: a
    /// transaction-scoped advisory lock on Postgres; SQLite's write lock already serializes.
    async fn lock(&mut self, name: &str) -> StoreResult<()>;
    /// Replaces the blocking keys of a record.
    async fn replace_match_keys(&mut self, key: &SourceKey, keys: &[String]) -> StoreResult<()>;
    /// Patients linked to any record (other than `exclude`) sharing one of `keys`, sorted.
    async fn find_candidate_patients(
        &mut self,
        keys: &[String],
        exclude: &SourceKey,
    ) -> StoreResult<Vec<PatientId>>;
    /// Every link of a patient.
    async fn load_patient_links(&mut self, patient_id: &PatientId) -> StoreResult<Vec<Link>>;
    /// Patients an admin refused to pair with this record.
    async fn load_rejected_patients(&mut self, key: &SourceKey) -> StoreResult<Vec<PatientId>>;
    /// Opens a review of (record, patient) unless that pair was already reviewed or proposed.
    async fn open_review(
        &mut self,
        key: &SourceKey,
        patient_id: &PatientId,
        score: f64,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;
    async fn load_review(&mut self, id: i64) -> StoreResult<Option<Review>>;
    /// Records an admin's verdict on the pair (record, patient): updates its review, or adds one
    /// (score 0) when the pair was never proposed.
    async fn save_review_decision(
        &mut self,
        key: &SourceKey,
        patient_id: &PatientId,
        state: ReviewState,
        decided_by: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;
    async fn commit(self: Box<Self>) -> StoreResult<()>;
    /// Where the writer stands (SQLite; `None` elsewhere): a later transaction whose stamp
    /// [`follows`](WriteStamp::follows) this one's knows that this one's commit was the only
    /// one between them, so a read taken outside both, after this one began, missed at most
    /// this one's writes.
    async fn write_stamp(&mut self) -> StoreResult<Option<WriteStamp>>;
    /// [`Store::save_sync_state`] inside this transaction.
    async fn save_sync_state(&mut self, state: &SyncState) -> StoreResult<()>;
    /// Records that resync pass `pass` listed these records of `source`, clearing any missing
    /// mark. Ids with no stored record are skipped.
    async fn mark_resync_seen(
        &mut self,
        source: SourceKind,
        ids: &[crate::model::SourceId],
        pass: i64,
    ) -> StoreResult<()>;
    /// [`StoreTx::save_link`] for many links in few statements (multi-row inserts). Keys must
    /// be distinct.
    async fn save_links(&mut self, links: &[(Link, LinkEvent)]) -> StoreResult<()>;
    /// [`StoreTx::save_patient`] for many rows in few statements. Patient ids must be distinct.
    async fn save_patients(&mut self, rows: &[(PatientRow, Vec<FieldSource>)]) -> StoreResult<()>;
    /// [`StoreTx::replace_match_keys`] for many records in few statements. Keys must be
    /// distinct.
    async fn replace_match_keys_many(
        &mut self,
        items: &[(SourceKey, Vec<String>)],
    ) -> StoreResult<()>;
    /// Deletes every blocking key (before a bulk load that writes all records' keys again).
    async fn delete_all_match_keys(&mut self) -> StoreResult<()>;
    /// Inserts blocking keys `(key, record)` for records that have none stored (plain inserts,
    /// no delete). Pairs must be distinct.
    async fn insert_match_keys(&mut self, rows: &[(&str, &SourceKey)]) -> StoreResult<()>;
    /// Brackets a bulk load of blocking keys (`start` true before the inserts, false after), in
    /// one transaction: SQLite drops both indexes of `match_keys` and builds them again at the
    /// end, so the rows go in in any order and neither index is filled at random places; other
    /// backends do nothing. Build them with [`Store::sort_in_files`] on: at a million records
    /// each index's sort is some 400 MiB.
    async fn match_keys_bulk_load(&mut self, start: bool) -> StoreResult<()>;
    /// The ids among `ids` of `source` that have a stored record or a link.
    async fn known_source_ids(
        &mut self,
        source: SourceKind,
        ids: &[crate::model::SourceId],
    ) -> StoreResult<std::collections::HashSet<crate::model::SourceId>>;
    /// Inserts records known to be new (see [`StoreTx::known_source_ids`]) in few statements.
    async fn insert_new_source_records(&mut self, records: &[&SourceRecord]) -> StoreResult<()>;
    /// `(blocking key, patient)` for every linked record holding one of `keys`.
    async fn find_patients_by_keys(
        &mut self,
        keys: &[String],
    ) -> StoreResult<Vec<(String, PatientId)>>;
    /// Every record linked to one of `patient_ids`, with its patient, without the raw payload
    /// (`raw` is JSON null): what matching and survivorship read.
    async fn load_linked_records_many(
        &mut self,
        patient_ids: &[PatientId],
    ) -> StoreResult<Vec<(PatientId, SourceRecord)>>;
    /// The canonical rows of `ids` that exist.
    async fn load_patients_many(&mut self, ids: &[PatientId]) -> StoreResult<Vec<PatientRow>>;
    /// `(record id, patient)` pairs an admin rejected, for records of `source` among `ids`.
    async fn load_rejected_many(
        &mut self,
        source: SourceKind,
        ids: &[crate::model::SourceId],
    ) -> StoreResult<Vec<(crate::model::SourceId, PatientId)>>;
    /// Lets this transaction's connection cache up to `mib` MiB of pages, for a bulk writer
    /// whose index inserts land all over large tables (SQLite; nothing elsewhere); `0` sets
    /// the default back. The setting stays with the pooled connection until set back.
    async fn bulk_write_cache(&mut self, mib: u32) -> StoreResult<()>;
}

/// A source's resync lease and pass counter (`resync_runs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResyncRun {
    pub source: SourceKind,
    pub owner: Option<String>,
    pub leased_until_ms: Option<i64>,
    /// The current (or last) pass.
    pub pass: i64,
    /// `pass` started and has not completed.
    pub in_progress: bool,
    pub pass_started_at_ms: Option<i64>,
    /// The last pass that completed (0: none yet).
    pub completed_pass: i64,
}

/// A stored record a resync pass has not listed, with its missing mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnseenRecord {
    pub key: SourceKey,
    pub fetched_at: DateTime<Utc>,
    pub source_updated_at: Option<DateTime<Utc>>,
    pub missing_passes: i64,
    pub missing_checked_pass: Option<i64>,
    pub missing_since: Option<DateTime<Utc>>,
}

/// Opens the store a `database.url` names (`sqlite:` or `postgres:`/`postgresql:`).
pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, max_connections).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(PgStore::connect(url, max_connections).await?))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

/// Milliseconds since the Unix epoch, the unit of every queue time.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}
