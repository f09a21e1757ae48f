//! Throwaway databases for tests, on both backends: used by this crate's tests and by the
//! end-to-end tests. Every call makes a fresh database, so tests never share state.
//!
//! PostgreSQL is reached at `TRELLIS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); each test creates its own database
//! `trellis_t_<uuid>` there and drops it when the guard goes. When PostgreSQL cannot be reached
//! the PostgreSQL half of a test is skipped with a message on stderr — unless
//! `TRELLIS_REQUIRE_POSTGRES=1` (set by CI), in which case it fails.

use crate::db::{Db, SqliteSettings};
use sqlx::Connection;

/// Default admin URL of the test PostgreSQL.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh database and whatever must live as long as it.
#[derive(Debug)]
pub struct TestDb {
    /// The migrated database.
    pub db: Db,
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// The URL it was opened with (to open it again, e.g. from a server under test).
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_drop: Option<(String, String)>,
}

impl TestDb {
    /// Drop the database (PostgreSQL) or remove the directory (SQLite).
    pub async fn cleanup(self) {
        self.db.close().await;
        if let Some((admin_url, name)) = &self.pg_drop {
            if let Ok(mut c) = sqlx::PgConnection::connect(admin_url).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
            }
        }
    }
}

/// A fresh, migrated SQLite database in a temporary directory.
pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let db = Db::connect(&url, &SqliteSettings::default())
        .await
        .expect("open sqlite");
    db.migrate().await.expect("migrate sqlite");
    TestDb {
        db,
        backend: "sqlite",
        url,
        _dir: Some(dir),
        pg_drop: None,
    }
}

/// A fresh, migrated PostgreSQL database, or None (with a message) when PostgreSQL is not
/// reachable and not required.
pub async fn postgres() -> Option<TestDb> {
    let admin_url =
        std::env::var("TRELLIS_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into());
    let required = std::env::var("TRELLIS_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    let mut conn = match sqlx::PgConnection::connect(&admin_url).await {
        Ok(c) => c,
        Err(e) if !required => {
            // Written to stderr directly, not with eprintln!, so the test harness does not
            // swallow it: a skipped backend must be visible in the test output.
            use std::io::Write;
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "SKIPPED: the PostgreSQL halves of these tests: cannot reach {admin_url} ({e}). Set TRELLIS_REQUIRE_POSTGRES=1 to make this an error."
                );
            });
            return None;
        }
        Err(e) => panic!("PostgreSQL is required (TRELLIS_REQUIRE_POSTGRES=1) but {admin_url} is not reachable: {e}"),
    };
    let name = format!("trellis_t_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let _ = conn.close().await;
    let url = match admin_url.rfind('/') {
        Some(i) => format!("{}/{name}", &admin_url[..i]),
        None => panic!("bad TRELLIS_TEST_POSTGRES_URL"),
    };
    let db = Db::connect(&url, &SqliteSettings::default())
        .await
        .expect("open postgres");
    db.migrate().await.expect("migrate postgres");
    Some(TestDb {
        db,
        backend: "postgres",
        url,
        _dir: None,
        pg_drop: Some((admin_url, name)),
    })
}

/// Both backends: SQLite always, PostgreSQL when reachable.
pub async fn each() -> Vec<TestDb> {
    let mut v = vec![sqlite().await];
    v.extend(postgres().await);
    v
}
