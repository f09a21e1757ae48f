//! How SQLite is built and set up: each connection keeps a page cache of its own, and the read
//! connections map as much of the file as configured. SQLite only: PostgreSQL has neither.

use trellis_form::db::{Db, Sql, SqliteSettings, Value};
use trellis_form::model::ColKind;
use trellis_form::testing;

/// libsqlite3-sys builds SQLite with `SQLITE_ENABLE_MEMORY_MANAGEMENT`, which puts every
/// connection's pages in one shared group; a reader opened after another had filled its cache
/// then read 14M pages instead of 250k for one 1M-row query (docs/benchmarks.md). The workspace's
/// `.cargo/config.toml` undefines it; this fails if a build loses that.
#[tokio::test]
async fn sqlite_is_built_with_a_page_cache_per_connection() {
    let t = testing::sqlite().await;
    let rows =
        t.db.fetch_all(
            &Sql::new(
                "SELECT sqlite_compileoption_used('ENABLE_MEMORY_MANAGEMENT'), \
                 sqlite_compileoption_used('THREADSAFE=1')",
            ),
            &[ColKind::Int, ColKind::Int],
        )
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![Value::Int(0), Value::Int(1)]]);
    t.cleanup().await;
}

#[tokio::test]
async fn readers_map_as_much_of_the_file_as_configured() {
    // SQLite caps the mapping at SQLITE_MAX_MMAP_SIZE, 0x7fff0000 bytes, just under 2 GiB.
    for (mib, want) in [(0, 0), (16, 16 << 20), (2048, 0x7fff_0000)] {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("m.db").display());
        let settings = SqliteSettings {
            reader_mmap_mib: mib,
            ..Default::default()
        };
        let db = Db::connect(&url, &settings).await.unwrap();
        let rows = db
            .fetch_all(&Sql::new("PRAGMA mmap_size"), &[ColKind::Int])
            .await
            .unwrap();
        assert_eq!(rows, vec![vec![Value::Int(want)]], "{mib} MiB");
        db.close().await;
    }
}

/// The write connection keeps 64 MiB of pages, so a 10,000-record batch is not spilled to the
/// WAL before its commit; readers keep SQLite's default (they map the file instead).
#[tokio::test]
async fn the_writer_keeps_a_larger_page_cache_than_the_readers() {
    let t = testing::sqlite().await;
    let mut tx = t.db.begin().await.unwrap();
    let writer = tx
        .fetch_optional(&Sql::new("PRAGMA cache_size"), &[ColKind::Int])
        .await
        .unwrap();
    drop(tx);
    assert_eq!(writer, Some(vec![Value::Int(-64 * 1024)]));
    let reader =
        t.db.fetch_all(&Sql::new("PRAGMA cache_size"), &[ColKind::Int])
            .await
            .unwrap();
    assert_eq!(reader, vec![vec![Value::Int(-2000)]]);
    t.cleanup().await;
}
