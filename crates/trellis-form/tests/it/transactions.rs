//! Write transactions: all or nothing, and one that is abandoned (dropped, or its future
//! cancelled at any point, as when an HTTP client goes away) never leaves the write connection
//! inside a transaction for the next writer.

use std::time::Duration;
use trellis_form::db::{Db, Sql, Value};
use trellis_form::model::ColKind;
use trellis_form::testing;

async fn count(db: &Db) -> i64 {
    let rows = db
        .fetch_all(&Sql::new("SELECT COUNT(*) FROM tx_t"), &[ColKind::Int])
        .await
        .unwrap();
    match rows[0][0] {
        Value::Int(n) => n,
        ref other => panic!("count: {other:?}"),
    }
}

async fn insert_committed(db: &Db, n: i64) {
    let mut tx = db.begin().await.unwrap();
    let mut sql = Sql::new("INSERT INTO tx_t (n) VALUES (");
    sql.bind(Value::Int(n)).push(")");
    assert_eq!(tx.execute(&sql).await.unwrap(), 1);
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_dropped_or_cancelled_transaction_rolls_back_and_frees_the_connection() {
    for t in testing::each().await {
        let db = &t.db;
        let mut tx = db.begin().await.unwrap();
        tx.execute(&Sql::new("CREATE TABLE tx_t (n BIGINT)"))
            .await
            .unwrap();
        tx.commit().await.unwrap();

        // Dropped after a write: the write is gone, the next transaction starts cleanly.
        let mut tx = db.begin().await.unwrap();
        tx.execute(&Sql::new("INSERT INTO tx_t (n) VALUES (1)"))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(count(db).await, 0, "{}", t.backend);
        insert_committed(db, 2).await;
        assert_eq!(count(db).await, 1, "{}", t.backend);

        // Cancelled while BEGIN, a write or COMMIT is on its way: polled once, then dropped.
        for round in 0..40 {
            let cancelled_begin = tokio::time::timeout(Duration::ZERO, db.begin()).await;
            drop(cancelled_begin);
            let mut tx = db.begin().await.unwrap();
            let write = tokio::time::timeout(
                Duration::ZERO,
                tx.execute(&Sql::new("INSERT INTO tx_t (n) VALUES (3)")),
            )
            .await;
            drop(write);
            drop(tx);
            let mut tx = db.begin().await.unwrap();
            tx.execute(&Sql::new("INSERT INTO tx_t (n) VALUES (4)"))
                .await
                .unwrap();
            // Abandoned after its first poll: the COMMIT may still land or not, but either way
            // the transaction ends and the next writer finds the connection free.
            let committed = tokio::time::timeout(Duration::ZERO, tx.commit()).await;
            drop(committed);
            let before = count(db).await;
            insert_committed(db, 5).await;
            let after = count(db).await;
            assert!(
                (1..=2).contains(&(after - before)),
                "{}: round {round}: {before} → {after}",
                t.backend
            );
        }
        // No rows of the abandoned writes (3) survived.
        let rows = db
            .fetch_all(
                &Sql::new("SELECT COUNT(*) FROM tx_t WHERE n = 3"),
                &[ColKind::Int],
            )
            .await
            .unwrap();
        assert_eq!(rows[0][0], Value::Int(0), "{}", t.backend);
        t.cleanup().await;
    }
}
