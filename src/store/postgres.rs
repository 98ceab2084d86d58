//! The Postgres store: for scale-out, when several worker processes share one database. Claims
//! lock their rows with `FOR UPDATE SKIP LOCKED` so concurrent workers never wait on each other.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::str::FromStr;

/// A Postgres-backed [`Store`](crate::store::Store).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to the server a `postgres:` url names.
    pub async fn connect(
        url: &str,
        max_connections: u32,
    ) -> Result<Self, crate::store::StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool writes use: the same pool (Postgres has concurrent writers).
    fn writer(&self) -> &PgPool {
        &self.pool
    }

    /// The pool holding the shared rate limits (tables `rate_slots`, `rate_budgets`).
    fn limits(&self) -> &PgPool {
        &self.pool
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/postgres")
    }

    /// Postgres writes on many connections at once: no write stamps.
    fn writer_clock(&self) -> Option<std::sync::Arc<crate::store::WriterClock>> {
        None
    }

    /// Postgres checkpoints on its own: nothing to signal on commit.
    fn commit_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}

async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin().await
}

crate::store::sql::impl_store!(
    store = PgStore,
    tx = PgTx,
    db = Postgres,
    backend = Backend::Postgres,
    claim_lock = " FOR UPDATE SKIP LOCKED",
    advisory_lock = Some("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"),
    begin = begin,
);
