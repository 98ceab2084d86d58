//! Test support: a fresh database per test on either backend.

use std::sync::Arc;

use patient_sync::store::{self, Store};

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A fresh, migrated database; the SQLite file lives as long as this value.
pub struct TestDb {
    #[allow(dead_code)]
    pub url: String,
    pub store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

pub async fn database(db: Db) -> TestDb {
    let (url, dir) = match db {
        Db::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            (
                format!("sqlite:{}", dir.path().join("test.sqlite").display()),
                Some(dir),
            )
        }
        Db::Postgres => (crate::pg::fresh_database().await, None),
    };
    let store = store::connect(&url, 8)
        .await
        .expect("connect to the test database");
    store.migrate().await.expect("migrate the test database");
    TestDb {
        url,
        store,
        _dir: dir,
    }
}

/// Declares one `#[tokio::test]` per backend for an `async fn scenario(db: Db)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn on_sqlite() {
                    super::$scenario($crate::helpers::Db::Sqlite).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn on_postgres() {
                    super::$scenario($crate::helpers::Db::Postgres).await;
                }
            }
        )*
    };
}
