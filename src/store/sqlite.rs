//! The SQLite store: the embedded default. WAL journal, a busy timeout, foreign keys on, temporary
//! storage in memory, `BEGIN IMMEDIATE` for write transactions so read-then-write never fails on
//! a lock upgrade, and WAL checkpoints on a background task rather than in a writer's commit.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};

/// A SQLite-backed [`Store`](crate::store::Store).
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Stops the background checkpointer when the last clone of the store is dropped.
    _checkpointer: Arc<tokio_util::sync::DropGuard>,
}

/// How often the background task checkpoints the WAL.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Page cache per connection, in KiB: 32 MiB (SQLite's default is 2 MiB), taken as used.
pub(crate) const CACHE_KIB: i64 = 32_768;

impl SqliteStore {
    /// Opens (creating if missing) the database file a `sqlite:` url names.
    pub async fn connect(
        url: &str,
        max_connections: u32,
    ) -> Result<Self, crate::store::StoreError> {
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
            .pragma("wal_autocheckpoint", "10000");
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await?;
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(checkpoint_in_background(pool.clone(), stop.clone()));
        Ok(Self {
            pool,
            _checkpointer: Arc::new(stop.drop_guard()),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/sqlite")
    }
}

/// Copies committed WAL pages into the database file every [`CHECKPOINT_EVERY`] with a passive
/// checkpoint (it waits for no one and blocks no writer), so the commits of a busy writer seldom
/// reach `wal_autocheckpoint` and do the copying and syncing themselves. Skips a round when
/// every connection is busy.
async fn checkpoint_in_background(pool: SqlitePool, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
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
