//! The SQLite store: the embedded default. WAL journal, a busy timeout, foreign keys on, temporary
//! storage in memory, `BEGIN IMMEDIATE` for write transactions so read-then-write never fails on
//! a lock upgrade, and WAL checkpoints on a background task rather than in a writer's commit.
//! Writes go through one connection, whose commits a commit hook counts (for write stamps,
//! [`WriteStamp`](crate::store::WriteStamp)); the shared rate limits live in a file of their own
//! beside the database (`<database file>.limits`), so reserving a request slot never waits
//! behind a long write transaction.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};

/// A SQLite-backed [`Store`](crate::store::Store).
#[derive(Clone)]
pub struct SqliteStore {
    /// Reads.
    pool: SqlitePool,
    /// Writes: one connection. SQLite admits one writer at a time anyway; with one connection a
    /// writer waits in the pool's queue instead of the busy handler's sleeps, and its page cache
    /// stays valid from one transaction to the next (a connection drops its cache whenever
    /// another connection has written since its last transaction).
    writer: SqlitePool,
    /// The shared rate limits, in their own file: see [`LIMITS_SCHEMA`].
    limits: SqlitePool,
    /// Stops the background checkpointer when the last clone of the store is dropped.
    _checkpointer: Arc<tokio_util::sync::DropGuard>,
    /// Wakes the background checkpointer after a write transaction commits.
    committed: Arc<tokio::sync::Notify>,
    /// Counts the writer connection's commits (a commit hook) for write stamps.
    clock: Arc<crate::store::WriterClock>,
}

/// How often the background task checkpoints the WAL.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Tables of the rate-limit file (`<database file>.limits`): the limits every process using the
/// database shares (see `sources::shared_limit`). A file of its own has its own write lock, so
/// a reservation, taken before every upstream request, never waits for the database's writer
/// (a page of a resync holds it for tens of milliseconds), and it never invalidates the
/// writer's page cache. Times are wall-clock microseconds since the Unix epoch.
///
/// - `rate_slots`: one row per limiter key (`healthie`, `healthie:bulk`, ...), holding the
///   GCRA "theoretical arrival time"; a reservation moves it on by one interval, a rate-limit
///   answer pushes it to the end of the pause.
/// - `rate_budgets`: requests used of a daily allowance (IntakeQ's), per key, in the window
///   ending at `window_end_us`.
pub const LIMITS_SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS rate_slots (
    key    TEXT PRIMARY KEY,
    tat_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_budgets (
    key           TEXT PRIMARY KEY,
    window_end_us BIGINT NOT NULL,
    used          BIGINT NOT NULL
);
";

/// The rate-limit file of the database file `db`.
pub fn limits_file(db: &std::path::Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".limits");
    name.into()
}

/// Page cache per connection, in KiB: 32 MiB (SQLite's default is 2 MiB), taken as used.
pub(crate) const CACHE_KIB: i64 = 32_768;

/// Rows a query's database thread hands over before it waits for the reader.
const ROW_BUFFER: usize = 1024;

impl SqliteStore {
    /// Opens (creating if missing) the database file a `sqlite:` url names.
    pub async fn connect(
        url: &str,
        max_connections: u32,
    ) -> Result<Self, crate::store::StoreError> {
        if !crate::alloc::sqlite_uses_mimalloc() {
            tracing::debug!(
                "SQLite had started before the store: it keeps the C library's allocator."
            );
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(30))
            .foreign_keys(true)
            // 32 MiB of page cache per connection (the default is 2 MiB), taken as used: a
            // page of matched records touches index pages all over the file, and a cache that
            // spills reads them back and checkpoints more often.
            .pragma("cache_size", format!("-{CACHE_KIB}"))
            // Statement journals and temporary tables in memory, not in temporary files.
            .pragma("temp_store", "memory")
            // A commit checkpoints the WAL itself only past about 40 MiB (the default is 4 MiB):
            // the background task below normally does it first, off the writer's path.
            .pragma("wal_autocheckpoint", "10000")
            // Rows a statement's thread may run ahead of the reader by (sqlx's default is 50): a
            // page of candidates is a few thousand rows, handed over in fewer, larger turns.
            .row_buffer_size(ROW_BUFFER);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options.clone())
            .await?;
        let limits_options = options
            .clone()
            .filename(limits_file(options.get_filename()))
            .pragma("cache_size", "-2048");
        let clock = Arc::new(crate::store::WriterClock::default());
        let hooked = clock.clone();
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .after_connect(move |conn, _| {
                let clock = hooked.clone();
                Box::pin(async move {
                    clock.connected();
                    let counted = clock.clone();
                    conn.lock_handle().await?.set_commit_hook(move || {
                        counted.committed();
                        true
                    });
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let limits = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(limits_options)
            .await?;
        sqlx::raw_sql(LIMITS_SCHEMA).execute(&limits).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let committed = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(checkpoint_in_background(
            pool.clone(),
            committed.clone(),
            stop.clone(),
        ));
        Ok(Self {
            pool,
            writer,
            limits,
            _checkpointer: Arc::new(stop.drop_guard()),
            committed,
            clock,
        })
    }

    /// What a write transaction signals when it commits (the background checkpointer).
    fn commit_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.committed.clone())
    }

    /// The writer's commit count, for write stamps.
    fn writer_clock(&self) -> Option<Arc<crate::store::WriterClock>> {
        Some(self.clock.clone())
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The pool write transactions and writing statements use.
    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// The pool of the rate-limit file.
    fn limits(&self) -> &SqlitePool {
        &self.limits
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/sqlite")
    }
}

/// Copies committed WAL pages into the database file with a passive checkpoint (it waits for
/// no one and blocks no writer) as soon as a write transaction of this store commits, and at
/// least every [`CHECKPOINT_EVERY`]. A checkpoint that has copied everything before the next
/// write transaction begins lets that transaction start the WAL over. Under back-to-back
/// transactions (a resync) that is not always so, and the WAL can still reach
/// `wal_autocheckpoint`, where the committing writer checkpoints itself, but then with most
/// pages already copied. Skips a round when every connection is busy.
async fn checkpoint_in_background(
    pool: SqlitePool,
    committed: Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = committed.notified() => {}
            _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
        }
        if pool.is_closed() {
            return;
        }
        if let Some(mut conn) = pool.try_acquire() {
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut *conn)
                .await
            {
                tracing::debug!(error = %crate::store::StoreError::from(e), "background WAL checkpoint failed");
            }
        }
    }
}

async fn begin_immediate(
    pool: &SqlitePool,
) -> Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

crate::store::sql::impl_store!(
    store = SqliteStore,
    tx = SqliteTx,
    db = Sqlite,
    backend = Backend::Sqlite,
    claim_lock = "",
    advisory_lock = None,
    begin = begin_immediate,
);

#[cfg(test)]
mod tests {
    use crate::store::Store;

    #[tokio::test]
    async fn the_writer_sorts_in_files_only_while_asked() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
        let store = super::SqliteStore::connect(&url, 1).await.unwrap();
        store.migrate().await.unwrap();
        let temp_store = || async {
            let (mode,): (i64,) = sqlx::query_as("PRAGMA temp_store")
                .fetch_one(store.writer())
                .await
                .unwrap();
            mode
        };
        assert_eq!(temp_store().await, 2, "memory, as the store opens it");
        store.sort_in_files(true).await.unwrap();
        assert_eq!(temp_store().await, 1, "files");
        store.sort_in_files(false).await.unwrap();
        assert_eq!(temp_store().await, 2, "memory again");
    }
}
