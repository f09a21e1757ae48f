//! Records: every field type, validation, concurrency, history, events, batch, stages.

use crate::common::{count, create, ctx, install, problems, t0, zoo_def};
use serde_json::{json, Value};
use trellis_form::store::{self, WriteCtx};
use trellis_form::testing;
use trellis_form::FormError;

#[tokio::test]
async fn every_field_type_round_trips_exactly() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let acc = create(&t.db, &app, "account", json!({"name": "Acme"}), admin)
            .await
            .unwrap();
        let input = json!({
            "title": "Widget 标题",
            "notes": "line one\nline two",
            "count": 42,
            "ratio": "0.1234",
            "price": {"amount": "9999999999.99", "currency": "USD"},
            "active": false,
            "due": "2026-12-31",
            "seen_at": "2026-03-02T17:30:00.123456+08:00",
            "email": "a@b.example",
            "phone": "+86 (10) 1234-5678",
            "site": "https://example.com/x?y=1",
            "color": "red",
            "tags": ["c", "a"],
            "who": admin.to_string(),
            "account": acc.meta.id.to_string(),
            "extra": {"n": 3, "deep": [1, {"x": null}]},
            "code": "ABC-123"
        });
        let r = create(&t.db, &app, "thing", input, admin).await.unwrap();
        let read = store::get(&t.db, app.entity("thing").unwrap(), r.meta.id)
            .await
            .unwrap()
            .to_json();
        let expected = json!({
            "title": "Widget 标题",
            "notes": "line one\nline two",
            "count": 42,
            "ratio": "0.1234",
            "price": {"amount": "9999999999.99", "currency": "USD"},
            "active": false,
            "due": "2026-12-31",
            "seen_at": "2026-03-02T09:30:00.123456Z",
            "email": "a@b.example",
            "phone": "+86 (10) 1234-5678",
            "site": "https://example.com/x?y=1",
            "color": "red",
            "tags": ["c", "a"],
            "who": admin.to_string(),
            "account": acc.meta.id.to_string(),
            "extra": {"n": 3, "deep": [1, {"x": null}]},
            "code": "ABC-123"
        });
        for (k, v) in expected.as_object().unwrap() {
            assert_eq!(&read[k], v, "{}: field {k}", t.backend);
        }
        assert_eq!(read["version"], json!(1));
        assert_eq!(read["owner"], json!(admin), "the default owner applies");
        assert_eq!(read["created_by"], json!(admin));
        assert_eq!(read["created_at"], json!("2026-03-02T09:00:00.000000Z"));
        // Decimals given as numbers keep their digits too; money takes the field's currency.
        let r = create(
            &t.db,
            &app,
            "thing",
            json!({"title": "n", "ratio": 2.5, "price": 10}),
            admin,
        )
        .await
        .unwrap();
        let j = r.to_json();
        assert_eq!(j["ratio"], json!("2.5000"));
        assert_eq!(j["price"], json!({"amount": "10.00", "currency": "CNY"}));
        assert_eq!(j["active"], json!(true), "default applied");
        assert_eq!(j["tags"], Value::Null);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn bad_input_reports_every_problem_and_writes_nothing() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let bad = json!({
            "notes": 5,
            "count": 101,
            "ratio": "1.23456",
            "price": {"amount": "-1", "currency": "CNY"},
            "active": "yes",
            "due": "2019-12-31",
            "seen_at": "yesterday",
            "email": "not-an-email",
            "phone": "call me",
            "site": "ftp://x",
            "color": "green",
            "tags": ["a", "z"],
            "who": "00000000-0000-7000-8000-000000000000",
            "account": "nope",
            "extra": {"n": "three"},
            "code": "abc",
            "surprise": 1,
            "version": "x",
            "created_at": "2020-01-01T00:00:00Z"
        });
        let got = problems(create(&t.db, &app, "thing", bad, admin).await.unwrap_err());
        let expected = [
            ("/account", "format"),
            ("/active", "wrong_type"),
            ("/code", "pattern"),
            ("/color", "unknown_option"),
            ("/count", "out_of_range"),
            ("/created_at", "read_only"),
            ("/due", "out_of_range"),
            ("/email", "format"),
            ("/extra/n", "json_schema"),
            ("/notes", "wrong_type"),
            ("/phone", "pattern"),
            ("/price", "out_of_range"),
            ("/ratio", "too_precise"),
            ("/seen_at", "format"),
            ("/site", "pattern"),
            ("/surprise", "unknown_field"),
            ("/tags/1", "unknown_option"),
            ("/title", "required"),
            ("/version", "wrong_type"),
            ("/who", "not_found"),
        ];
        for (p, c) in expected {
            assert!(
                got.contains(&(p.to_owned(), c)),
                "{}: missing {p} {c} in {got:#?}",
                t.backend
            );
        }
        assert_eq!(count(&t.db, "zoo__thing", "").await, 0);
        assert_eq!(
            count(&t.db, "events", "").await,
            0,
            "a failed write leaves no event"
        );
        assert_eq!(count(&t.db, "history", "").await, 0);
        // Not an object at all.
        assert_eq!(
            problems(
                create(&t.db, &app, "thing", json!([1]), admin)
                    .await
                    .unwrap_err()
            ),
            [("".to_owned(), "not_an_object")]
        );
        // Unknown entity.
        assert!(matches!(
            create(&t.db, &app, "nope", json!({}), admin).await,
            Err(FormError::EntityNotFound(_))
        ));
        t.cleanup().await;
    }
}

#[tokio::test]
async fn unique_values_and_references_are_enforced() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        create(
            &t.db,
            &app,
            "thing",
            json!({"title": "a", "email": "x@y.example"}),
            admin,
        )
        .await
        .unwrap();
        let e = create(
            &t.db,
            &app,
            "thing",
            json!({"title": "b", "email": "x@y.example"}),
            admin,
        )
        .await
        .unwrap_err();
        assert_eq!(problems(e), [("/email".to_owned(), "unique")]);
        let e = create(
            &t.db,
            &app,
            "thing",
            json!({"title": "b", "account": uuid::Uuid::now_v7().to_string()}),
            admin,
        )
        .await
        .unwrap_err();
        assert_eq!(problems(e), [("/account".to_owned(), "not_found")]);
        // A referenced record cannot be deleted.
        let acc = create(&t.db, &app, "account", json!({"name": "Acme"}), admin)
            .await
            .unwrap();
        create(
            &t.db,
            &app,
            "thing",
            json!({"title": "c", "account": acc.meta.id.to_string()}),
            admin,
        )
        .await
        .unwrap();
        let mut tx = t.db.begin().await.unwrap();
        let e = store::delete(
            &mut tx,
            &app,
            app.entity("account").unwrap(),
            acc.meta.id,
            None,
            &ctx(admin),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, FormError::Conflict(ps) if ps[0].code == "referenced"),
            "{e:?}"
        );
        drop(tx);
        assert_eq!(count(&t.db, "zoo__account", "").await, 1);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn updates_use_optimistic_concurrency_and_write_history_and_events() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let deal = app.entity("deal").unwrap();
        let r = create(
            &t.db,
            &app,
            "deal",
            json!({"name": "D1", "reason": "r0"}),
            admin,
        )
        .await
        .unwrap();
        assert_eq!(r.to_json()["stage"], json!("new"));
        let later = WriteCtx {
            now: t0() + chrono::Duration::hours(1),
            ..ctx(admin)
        };
        let mut tx = t.db.begin().await.unwrap();
        let r2 = store::update(
            &mut tx,
            &app,
            deal,
            r.meta.id,
            &json!({"name": "D2", "amount": "100", "reason": "r1"}),
            Some(1),
            &later,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(r2.meta.version, 2);
        assert_eq!(
            r2.to_json()["amount"],
            json!({"amount": "100.00", "currency": "CNY"})
        );
        // A stale version is refused and changes nothing.
        let mut tx = t.db.begin().await.unwrap();
        let e = store::update(
            &mut tx,
            &app,
            deal,
            r.meta.id,
            &json!({"name": "D3"}),
            Some(1),
            &later,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                e,
                FormError::VersionConflict {
                    expected: 1,
                    current: 2
                }
            ),
            "{e:?}"
        );
        drop(tx);
        // The version in the body works the same way.
        let mut tx = t.db.begin().await.unwrap();
        let e = store::update(
            &mut tx,
            &app,
            deal,
            r.meta.id,
            &json!({"name": "D3", "version": 1}),
            None,
            &later,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, FormError::VersionConflict { .. }));
        drop(tx);
        let now = store::get(&t.db, deal, r.meta.id).await.unwrap();
        assert_eq!(
            (now.meta.version, now.to_json()["name"].clone()),
            (2, json!("D2"))
        );
        // History: tracked fields only (name, amount) plus the always-kept stage; reason is not tracked.
        let h = store::history(&t.db, &app, deal, r.meta.id).await.unwrap();
        let rows: Vec<(String, Value, Value)> = h
            .iter()
            .map(|r| (r.field.clone(), r.old.clone(), r.new.clone()))
            .collect();
        assert_eq!(
            rows,
            [
                ("name".into(), Value::Null, json!("D1")),
                ("stage".into(), Value::Null, json!("new")),
                ("owner".into(), Value::Null, json!(admin)),
                ("name".into(), json!("D1"), json!("D2")),
                (
                    "amount".into(),
                    Value::Null,
                    json!({"amount": "100.00", "currency": "CNY"})
                ),
            ]
        );
        assert_eq!(h[3].at, json!("2026-03-02T10:00:00.000000Z"));
        // Events: one per write, with the changed fields.
        let sql = trellis_form::db::Sql::new(
            "SELECT \"kind\", \"changed\" FROM \"events\" ORDER BY \"id\"",
        );
        let ev =
            t.db.fetch_all(
                &sql,
                &[
                    trellis_form::model::ColKind::Text,
                    trellis_form::model::ColKind::Json,
                ],
            )
            .await
            .unwrap();
        let ev: Vec<(String, Value)> = ev
            .into_iter()
            .map(|r| match (&r[0], &r[1]) {
                (trellis_form::db::Value::Text(k), trellis_form::db::Value::Json(c)) => {
                    (k.clone(), c.clone())
                }
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            ev,
            [
                ("created".into(), json!(["name", "reason", "stage"])),
                ("updated".into(), json!(["name", "amount", "reason"]))
            ]
        );
        // A write whose transaction is rolled back leaves neither row nor event.
        let mut tx = t.db.begin().await.unwrap();
        store::create(&mut tx, &app, deal, &json!({"name": "ghost"}), &ctx(admin))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(count(&t.db, "zoo__deal", "").await, 1);
        assert_eq!(count(&t.db, "events", "").await, 2);
        // Retention: non-stage history older than 30 days goes, stage history stays.
        let removed = store::purge_history(&t.db, &app, t0() + chrono::Duration::days(31))
            .await
            .unwrap();
        // Stored rows: the create's initial values (name, owner) are one row, then the two
        // updates of `name` and `amount`.
        assert_eq!(removed, 3);
        let left: Vec<String> = store::history(&t.db, &app, deal, r.meta.id)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.field)
            .collect();
        assert_eq!(left, ["stage"]);
        // Delete writes an event.
        let mut tx = t.db.begin().await.unwrap();
        store::delete(&mut tx, &app, deal, r.meta.id, Some(2), &later)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert!(matches!(
            store::get(&t.db, deal, r.meta.id).await,
            Err(FormError::RecordNotFound)
        ));
        assert_eq!(
            count(&t.db, "events", "WHERE \"kind\" = 'deleted'").await,
            1
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn stages_check_entry_criteria_and_keep_entry_times() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let deal = app.entity("deal").unwrap();
        let acc = create(&t.db, &app, "account", json!({"name": "Acme"}), admin)
            .await
            .unwrap();
        // Entering "proposal" directly needs account and amount.
        let e = create(
            &t.db,
            &app,
            "deal",
            json!({"name": "x", "stage": "proposal"}),
            admin,
        )
        .await
        .unwrap_err();
        match e {
            FormError::Invalid(ps) => {
                assert_eq!(ps.len(), 1);
                assert_eq!(
                    (ps[0].path.as_str(), ps[0].code),
                    ("/stage", "stage_criteria")
                );
                assert_eq!(
                    ps[0].message,
                    "To enter the stage Proposal, fill in: account, amount."
                );
            }
            other => panic!("{other:?}"),
        }
        let r = create(&t.db, &app, "deal", json!({"name": "x"}), admin)
            .await
            .unwrap();
        let j = r.to_json();
        assert_eq!(
            j["stage__entered_new"],
            json!("2026-03-02T09:00:00.000000Z")
        );
        assert_eq!(j["stage__changed_at"], json!("2026-03-02T09:00:00.000000Z"));
        assert_eq!(j["stage__entered_qualified"], Value::Null);
        let step = |h: i64, patch: Value| {
            let db = t.db.clone();
            let app = &app;
            async move {
                let mut tx = db.begin().await.unwrap();
                let c = WriteCtx {
                    now: t0() + chrono::Duration::hours(h),
                    ..ctx(admin)
                };
                let out = store::update(&mut tx, app, deal, r.meta.id, &patch, None, &c).await;
                if out.is_ok() {
                    tx.commit().await.unwrap();
                }
                out
            }
        };
        let e = step(1, json!({"stage": "qualified"})).await.unwrap_err();
        assert_eq!(problems(e), [("/stage".to_owned(), "stage_criteria")]);
        step(
            2,
            json!({"stage": "qualified", "account": acc.meta.id.to_string()}),
        )
        .await
        .unwrap();
        step(3, json!({"stage": "new"})).await.unwrap();
        let j = step(4, json!({"stage": "qualified"}))
            .await
            .unwrap()
            .to_json();
        // Re-entering keeps the first entry time; the last change moves.
        assert_eq!(
            j["stage__entered_qualified"],
            json!("2026-03-02T11:00:00.000000Z")
        );
        assert_eq!(j["stage__changed_at"], json!("2026-03-02T13:00:00.000000Z"));
        let stages: Vec<Value> = store::history(&t.db, &app, deal, r.meta.id)
            .await
            .unwrap()
            .into_iter()
            .filter(|h| h.field == "stage")
            .map(|h| h.new)
            .collect();
        assert_eq!(
            stages,
            [
                json!("new"),
                json!("qualified"),
                json!("new"),
                json!("qualified")
            ]
        );
        // Days of the finished stays per stage (for time-in-stage reports): new 0–2 h and
        // 3–4 h, qualified 2–3 h; the stay under way (qualified since 4 h) is not in them.
        let days = |db: trellis_form::db::Db, table: String| async move {
            let sql = trellis_form::db::Sql::new(format!(
                "SELECT \"stage__days_new\", \"stage__days_qualified\", \"stage__days_won\" FROM \"{table}\""
            ));
            let k = trellis_form::model::ColKind::Decimal;
            db.fetch_all(&sql, &[k, k, k]).await.unwrap()[0]
                .iter()
                .map(|v| match v {
                    trellis_form::db::Value::Decimal(d) => {
                        json!((d.to_string().parse::<f64>().unwrap() * 1e6).round() / 1e6)
                    }
                    other => json!(format!("{other:?}")),
                })
                .collect::<Vec<_>>()
        };
        let want = vec![json!(0.125), json!(0.041667), json!("Null(Decimal)")];
        assert_eq!(
            days(t.db.clone(), deal.table.clone()).await,
            want,
            "{}",
            t.backend
        );
        // A table made before these columns existed gets them, filled from the history.
        let mut tx = t.db.begin().await.unwrap();
        for c in ["new", "qualified", "proposal", "won", "lost"] {
            tx.execute(&trellis_form::db::Sql::new(format!(
                "ALTER TABLE \"{}\" DROP COLUMN \"stage__days_{c}\"",
                deal.table
            )))
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        assert_eq!(trellis_form::apps::upgrade(&t.db, &app).await.unwrap(), 5);
        assert_eq!(
            days(t.db.clone(), deal.table.clone()).await,
            want,
            "{}",
            t.backend
        );
        assert_eq!(trellis_form::apps::upgrade(&t.db, &app).await.unwrap(), 0);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn batches_are_all_or_nothing_and_can_import_funnel_history() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let deal = app.entity("deal").unwrap();
        let imp = WriteCtx {
            import: true,
            depth: 0,
            ..ctx(admin)
        };
        let batch = [
            json!({"name": "ok"}),
            json!({"name": 5, "stage": "nope"}),
            json!({"name": "ok2"}),
            json!({"stage": "won"}),
        ];
        let mut tx = t.db.begin().await.unwrap();
        let e = store::create_batch(&mut tx, &app, deal, &batch, &imp)
            .await
            .unwrap_err();
        drop(tx);
        assert_eq!(
            problems(e),
            [
                ("/records/1/name".to_owned(), "wrong_type"),
                ("/records/1/stage".to_owned(), "unknown_stage"),
                ("/records/3/name".to_owned(), "required")
            ]
        );
        assert_eq!(
            count(&t.db, "zoo__deal", "").await,
            0,
            "nothing was written"
        );
        assert_eq!(count(&t.db, "events", "").await, 0);
        // Historical data keeps its funnel: created_at and stage_history.
        let acc = create(&t.db, &app, "account", json!({"name": "Acme"}), admin)
            .await
            .unwrap();
        let rec = json!({
            "name": "old deal", "account": acc.meta.id.to_string(), "amount": "5000",
            "created_at": "2025-01-10T08:00:00Z",
            "stage_history": [
                {"stage": "new", "at": "2025-01-10T08:00:00Z"},
                {"stage": "qualified", "at": "2025-01-20T08:00:00Z"},
                {"stage": "won", "at": "2025-02-01T08:00:00Z"}
            ]
        });
        let mut tx = t.db.begin().await.unwrap();
        let ids = store::create_batch(&mut tx, &app, deal, std::slice::from_ref(&rec), &imp)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let j = store::get(&t.db, deal, ids[0]).await.unwrap().to_json();
        assert_eq!(j["stage"], json!("won"));
        assert_eq!(j["created_at"], json!("2025-01-10T08:00:00.000000Z"));
        assert_eq!(
            j["stage__entered_qualified"],
            json!("2025-01-20T08:00:00.000000Z")
        );
        assert_eq!(
            j["stage__entered_won"],
            json!("2025-02-01T08:00:00.000000Z")
        );
        assert_eq!(j["stage__changed_at"], json!("2025-02-01T08:00:00.000000Z"));
        assert_eq!(j["stage__entered_proposal"], Value::Null);
        let h: Vec<(Value, Value, Value)> = store::history(&t.db, &app, deal, ids[0])
            .await
            .unwrap()
            .into_iter()
            .filter(|h| h.field == "stage")
            .map(|h| (h.old, h.new, h.at))
            .collect();
        assert_eq!(
            h[2],
            (
                json!("qualified"),
                json!("won"),
                json!("2025-02-01T08:00:00.000000Z")
            )
        );
        // Without the import privilege, created_at and stage_history are read-only.
        let mut tx = t.db.begin().await.unwrap();
        let e = store::create_batch(&mut tx, &app, deal, &[rec], &ctx(admin))
            .await
            .unwrap_err();
        assert_eq!(
            problems(e),
            [
                ("/records/0/created_at".to_owned(), "read_only"),
                ("/records/0/stage_history".to_owned(), "read_only")
            ]
        );
        drop(tx);
        // Out-of-order or unknown stages in a history are refused.
        let bad = json!({"name": "x", "stage_history": [{"stage": "won", "at": "2025-02-01T00:00:00Z"}, {"stage": "new", "at": "2025-01-01T00:00:00Z"}, {"stage": "zzz", "at": "2025-03-01T00:00:00Z"}]});
        let mut tx = t.db.begin().await.unwrap();
        let e = store::create_batch(&mut tx, &app, deal, &[bad], &imp)
            .await
            .unwrap_err();
        let got = problems(e);
        assert!(
            got.contains(&("/records/0/stage_history/1/at".to_owned(), "out_of_order")),
            "{got:?}"
        );
        assert!(
            got.contains(&(
                "/records/0/stage_history/2/stage".to_owned(),
                "unknown_stage"
            )),
            "{got:?}"
        );
        drop(tx);
        // Too many records.
        let many = vec![json!({"name": "n"}); store::MAX_BATCH + 1];
        let mut tx = t.db.begin().await.unwrap();
        let e = store::create_batch(&mut tx, &app, deal, &many, &imp)
            .await
            .unwrap_err();
        assert_eq!(problems(e), [("/records".to_owned(), "too_many")]);
        drop(tx);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn concurrent_writers_never_fail_with_database_is_locked() {
    // Two pools on one SQLite file behave like two processes: each has its own write connection,
    // and BEGIN IMMEDIATE plus the busy timeout make them queue instead of failing.
    let t = testing::sqlite().await;
    let (app, admin) = install(&t.db, &zoo_def()).await;
    let second = trellis_form::db::Db::connect(&t.url, &Default::default())
        .await
        .unwrap();
    let app = std::sync::Arc::new(app);
    let mut tasks = vec![];
    for w in 0..8 {
        let db = if w % 2 == 0 {
            t.db.clone()
        } else {
            second.clone()
        };
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let mut tx = db.begin().await?;
                store::create(
                    &mut tx,
                    &app,
                    app.entity("deal")?,
                    &json!({"name": format!("w{w}-{i}")}),
                    &ctx(admin),
                )
                .await?;
                tx.commit().await?;
            }
            Ok::<_, FormError>(())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(count(&t.db, "zoo__deal", "").await, 200);
    assert_eq!(count(&t.db, "events", "").await, 200);
    second.close().await;
    t.cleanup().await;
}

/// `(changed, record)` of every `created` event of `entity`, and the `new_value` of every
/// history row, in write order, with the values that differ between two runs of the same input
/// (ids, times, and the two fields each run makes unique) taken out.
async fn written(db: &trellis_form::db::Db, entity: &str) -> (Vec<(Value, Value)>, Vec<Value>) {
    use trellis_form::db::{Sql, Value as V};
    use trellis_form::model::ColKind;
    let json = |v: &V| match v {
        V::Json(j) => j.clone(),
        other => panic!("expected JSON, got {other:?}"),
    };
    let strip = |mut r: Value| {
        for k in ["id", "created_at", "updated_at", "title", "email"] {
            r.as_object_mut().unwrap().remove(k);
        }
        r
    };
    let ev = db
        .fetch_all(
            &Sql::new(format!(
                "SELECT \"changed\", \"record\" FROM \"events\" WHERE \"entity\" = '{entity}' \
                 AND \"kind\" = 'created' ORDER BY \"id\""
            )),
            &[ColKind::Json, ColKind::Json],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (json(&r[0]), strip(json(&r[1]))))
        .collect();
    let hist = db
        .fetch_all(
            &Sql::new(format!(
                "SELECT \"new_value\" FROM \"history\" WHERE \"entity\" = '{entity}' ORDER BY \"id\""
            )),
            &[ColKind::Json],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let mut v = json(&r[0]);
            // `[[field, value], …]`: drop the per-run fields.
            if let Some(a) = v.as_array_mut() {
                a.retain(|p| p[0] != "title" && p[0] != "email");
            }
            v
        })
        .collect();
    (ev, hist)
}

#[tokio::test]
async fn pipelined_batches_write_what_plain_batches_write_and_refuse_whole() {
    use std::sync::Arc;
    // Ten chunks and more: problems below land in the first, middle and last ones.
    const N: usize = 2_500;
    const { assert!(N >= 10 * store::PIPELINE_CHUNK) };
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let app = Arc::new(app);
        let thing = app.entity("thing").unwrap();
        let acc = create(&t.db, &app, "account", json!({"name": "Acme"}), admin)
            .await
            .unwrap();
        let taken = create(
            &t.db,
            &app,
            "thing",
            json!({"title": "first", "email": "taken@x.example"}),
            admin,
        )
        .await
        .unwrap();
        let rec = |run: &str, i: usize| {
            json!({
                "title": format!("{run}{i}"),
                "email": format!("{run}{i}@x.example"),
                "count": i % 100,
                "color": if i % 2 == 0 { "red" } else { "blue" },
                "tags": ["a", "c"],
                "who": admin.to_string(),
                "account": if i % 3 == 0 { Value::String(acc.meta.id.to_string()) } else { Value::Null },
            })
        };
        // The same records through both paths store the same rows, history and events.
        let plain: Vec<Value> = (0..N).map(|i| rec("p", i)).collect();
        let mut tx = t.db.begin().await.unwrap();
        let plain_ids = store::create_batch(&mut tx, &app, thing, &plain, &ctx(admin))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let before = written(&t.db, "thing").await;
        let piped: Vec<Value> = (0..N).map(|i| rec("q", i)).collect();
        let mut tx = t.db.begin().await.unwrap();
        let piped_ids =
            store::create_batch_pipelined(&mut tx, app.clone(), "thing", piped, &ctx(admin))
                .await
                .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(piped_ids.len(), N, "{}", t.backend);
        assert!(
            piped_ids.windows(2).all(|w| w[0] < w[1]),
            "ids in input order"
        );
        assert_eq!(count(&t.db, "zoo__thing", "").await, 1 + 2 * N as i64);
        let after = written(&t.db, "thing").await;
        assert_eq!(after.0.len(), 1 + 2 * N);
        assert_eq!(after.1.len(), 1 + 2 * N);
        assert_eq!(after.0[1..=N], after.0[N + 1..], "events, {}", t.backend);
        assert_eq!(after.1[1..=N], after.1[N + 1..], "history, {}", t.backend);
        assert_eq!(before.0[..], after.0[..=N]);
        let one = store::get(&t.db, thing, piped_ids[1500])
            .await
            .unwrap()
            .to_json();
        let same = store::get(&t.db, thing, plain_ids[1500])
            .await
            .unwrap()
            .to_json();
        assert_eq!(one["title"], json!("q1500"));
        assert_eq!(one["account"], json!(acc.meta.id.to_string()));
        for k in [
            "count", "color", "tags", "who", "account", "owner", "version",
        ] {
            assert_eq!(one[k], same[k], "{k}");
        }

        // Every kind of problem, in the first and in later chunks: the same answer as the plain
        // path, and nothing written.
        let rows = count(&t.db, "zoo__thing", "").await;
        let events = count(&t.db, "events", "").await;
        let history = count(&t.db, "history", "").await;
        let missing = uuid::Uuid::now_v7().to_string();
        let mut checked: Vec<Value> = (0..N).map(|i| rec("r", i)).collect();
        checked[10]["account"] = json!(missing);
        checked[1200]["email"] = json!("taken@x.example");
        checked[2300]["email"] = json!("r5@x.example");
        let checked_want = [
            ("/records/10/account".to_owned(), "not_found"),
            ("/records/1200/email".to_owned(), "unique"),
            ("/records/2300/email".to_owned(), "unique"),
        ];
        // Problems found without the database come with the others, record by record.
        let mut drafted = checked.clone();
        drafted[1999]["count"] = json!("many");
        drafted[2001]["color"] = json!("green");
        drafted[2001]["account"] = json!(missing);
        let drafted_want = [
            ("/records/10/account".to_owned(), "not_found"),
            ("/records/1200/email".to_owned(), "unique"),
            ("/records/1999/count".to_owned(), "wrong_type"),
            ("/records/2001/account".to_owned(), "not_found"),
            ("/records/2001/color".to_owned(), "unknown_option"),
            ("/records/2300/email".to_owned(), "unique"),
        ];
        // A record that is not an object fails the batch alone.
        let mut shapeless = drafted.clone();
        shapeless[2100] = json!(5);
        let shapeless_want = [("/records/2100".to_owned(), "not_an_object")];
        for (batch, want) in [
            (drafted, &drafted_want[..]),
            (checked, &checked_want[..]),
            (shapeless, &shapeless_want[..]),
        ] {
            let mut tx = t.db.begin().await.unwrap();
            let e = store::create_batch(&mut tx, &app, thing, &batch, &ctx(admin))
                .await
                .unwrap_err();
            drop(tx);
            assert_eq!(problems(e), want, "plain, {}", t.backend);
            let mut tx = t.db.begin().await.unwrap();
            let e =
                store::create_batch_pipelined(&mut tx, app.clone(), "thing", batch, &ctx(admin))
                    .await
                    .unwrap_err();
            drop(tx);
            assert_eq!(problems(e), want, "pipelined, {}", t.backend);
            assert_eq!(count(&t.db, "zoo__thing", "").await, rows, "{}", t.backend);
            assert_eq!(count(&t.db, "events", "").await, events);
            assert_eq!(count(&t.db, "history", "").await, history);
        }
        assert_eq!(taken.meta.version, 1);
        // Too many records: refused before anything is drafted.
        let many = vec![json!({"title": "n"}); store::MAX_BATCH + 1];
        let mut tx = t.db.begin().await.unwrap();
        let e = store::create_batch_pipelined(&mut tx, app.clone(), "thing", many, &ctx(admin))
            .await
            .unwrap_err();
        drop(tx);
        assert_eq!(problems(e), [("/records".to_owned(), "too_many")]);
        t.cleanup().await;
    }
}
