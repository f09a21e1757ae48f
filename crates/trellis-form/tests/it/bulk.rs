//! Bulk inserts (`Tx::insert_rows` / `Tx::insert_with`): on SQLite they bypass sqlx and bind
//! through SQLite's C API, so they must store exactly what a bound parameter stores, and be all
//! or nothing like one statement.

use trellis_form::db::{Backend, Sql, Value};
use trellis_form::model::ColKind;
use trellis_form::testing;
use trellis_form::FormError;

const KINDS: [ColKind; 9] = [
    ColKind::Text,
    ColKind::Bool,
    ColKind::Int,
    ColKind::Decimal,
    ColKind::Text,
    ColKind::Uuid,
    ColKind::Date,
    ColKind::DateTime,
    ColKind::Json,
];

fn values(tag: i64) -> Vec<Value> {
    vec![
        Value::Null(ColKind::Text),
        Value::Bool(true),
        Value::Int(-5 - tag),
        Value::Decimal("12.345".parse().unwrap()),
        Value::Text("王 \"quoted\"\n\u{1} and 🎉".into()),
        Value::Uuid(uuid::Uuid::parse_str("01a21fc0-0d24-7357-bf69-36597fd5cf0d").unwrap()),
        Value::Date(chrono::NaiveDate::from_ymd_opt(2026, 2, 28).unwrap()),
        Value::DateTime(chrono::DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap()),
        Value::Json(serde_json::json!({"a": [1, "x", null], "b": {"c": true}})),
    ]
}

#[tokio::test]
async fn bulk_rows_store_exactly_what_bound_parameters_store() {
    for t in testing::each().await {
        let mut tx = t.db.begin().await.unwrap();
        let backend = tx.backend();
        let cols: Vec<String> = (0..KINDS.len()).map(|i| format!("c{i}")).collect();
        let mut ddl = String::from("CREATE TABLE bulk_t (tag BIGINT");
        for (c, k) in cols.iter().zip(KINDS) {
            ddl.push_str(&format!(", {c} {}", backend.column_type(k)));
        }
        ddl.push(')');
        tx.execute(&Sql::new(ddl)).await.unwrap();
        // Row 1 through an ordinary bound statement, rows 2 and 3 through the bulk path.
        let mut one = Sql::new(format!(
            "INSERT INTO bulk_t (tag, {}) VALUES (",
            cols.join(", ")
        ));
        one.bind(Value::Int(1));
        for v in values(0) {
            one.push(", ").bind(v);
        }
        one.push(")");
        tx.execute(&one).await.unwrap();
        let rows: Vec<Vec<Value>> = [2, 3]
            .into_iter()
            .map(|tag| {
                let mut r = vec![Value::Int(tag)];
                r.extend(values(0));
                r
            })
            .collect();
        let mut names = vec!["tag"];
        names.extend(cols.iter().map(String::as_str));
        assert_eq!(tx.insert_rows("bulk_t", &names, &rows).await.unwrap(), 2);
        let mut kinds = vec![ColKind::Int];
        kinds.extend(KINDS);
        let read = tx
            .fetch_all(
                &Sql::new(format!(
                    "SELECT tag, {} FROM bulk_t ORDER BY tag",
                    cols.join(", ")
                )),
                &kinds,
            )
            .await
            .unwrap();
        assert_eq!(read.len(), 3, "{}", t.backend);
        for r in &read {
            assert_eq!(&r[1..], &values(0)[..], "{}", t.backend);
        }
        if backend == Backend::Sqlite {
            // The same storage classes and the same text, column by column.
            let mut select = String::from("SELECT tag");
            for c in &cols {
                select.push_str(&format!(", typeof({c}), CAST({c} AS TEXT)"));
            }
            select.push_str(" FROM bulk_t ORDER BY tag");
            let text = tx
                .fetch_all(
                    &Sql::new(select),
                    &std::iter::once(ColKind::Int)
                        .chain(std::iter::repeat_n(ColKind::Text, cols.len() * 2))
                        .collect::<Vec<_>>(),
                )
                .await
                .unwrap();
            assert_eq!(text[0][1..], text[1][1..]);
            assert_eq!(text[0][1..], text[2][1..]);
            assert_eq!(text[0][3], Value::Text("integer".into()), "bool as integer");
            assert_eq!(text[0][7], Value::Text("real".into()), "decimal as real");
            assert_eq!(
                text[0][16],
                Value::Text("2023-11-14T22:13:20.123456Z".into()),
                "instants as fixed-width UTC text"
            );
        }
        drop(tx);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn a_bulk_insert_that_fails_leaves_none_of_its_rows() {
    for t in testing::each().await {
        let mut tx = t.db.begin().await.unwrap();
        tx.execute(&Sql::new(
            "CREATE TABLE bulk_u (k TEXT NOT NULL UNIQUE, n BIGINT)",
        ))
        .await
        .unwrap();
        let rows = vec![
            vec![Value::Text("a".into()), Value::Int(1)],
            vec![Value::Text("b".into()), Value::Int(2)],
            vec![Value::Text("a".into()), Value::Int(3)],
        ];
        let err = tx
            .insert_rows("bulk_u", &["k", "n"], &rows)
            .await
            .unwrap_err();
        match &err {
            FormError::Database(sqlx::Error::Database(db)) => {
                assert!(db.is_unique_violation(), "{}: {err}", t.backend);
                assert!(db.message().contains("bulk_u.k") || db.constraint().is_some());
            }
            other => panic!("{}: {other:?}", t.backend),
        }
        if tx.backend() == Backend::Sqlite {
            // Like one failed statement: none of the three rows, and the transaction goes on.
            let n = tx
                .fetch_all(&Sql::new("SELECT COUNT(*) FROM bulk_u"), &[ColKind::Int])
                .await
                .unwrap();
            assert_eq!(n[0][0], Value::Int(0));
            let ok = vec![vec![Value::Text("c".into()), Value::Int(4)]];
            assert_eq!(tx.insert_rows("bulk_u", &["k", "n"], &ok).await.unwrap(), 1);
            tx.commit().await.unwrap();
            let n =
                t.db.fetch_all(&Sql::new("SELECT k FROM bulk_u"), &[ColKind::Text])
                    .await
                    .unwrap();
            assert_eq!(n, vec![vec![Value::Text("c".into())]]);
        } else {
            // PostgreSQL aborts the transaction; rolling it back leaves nothing.
            drop(tx);
        }
        t.cleanup().await;
    }
}
