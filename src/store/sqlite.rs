//! The SQLite store: the embedded default. WAL journal, a busy timeout, foreign keys on, temporary
//! storage in memory, and
//! `BEGIN IMMEDIATE` for write transactions so read-then-write never fails on a lock upgrade.

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};

/// A SQLite-backed [`Store`](crate::store::Store).
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

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
            // Checkpoint the WAL at about 40 MiB instead of 4 MiB: a page of records rewrites the
            // same index pages, and fewer checkpoints copy each of them fewer times.
            .pragma("wal_autocheckpoint", "10000");
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/sqlite")
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
