//! Summary fields: a record's first or last related record, kept by the related records'
//! writes in their own transaction; read-only; checked; filled by migrations.

use crate::common::{ctx, install, problems, t0};
use chrono::Duration;
use serde_json::{json, Value};
use trellis_form::apps::{self, ImportOptions};
use trellis_form::compile::{compile, parse};
use trellis_form::model::App;
use trellis_form::plan::StepKind;
use trellis_form::store::{self, WriteCtx};
use trellis_form::testing;
use uuid::Uuid;

fn def(summaries: Value) -> Value {
    let mut lead_fields = vec![json!({"key": "name", "type": "text", "required": true})];
    lead_fields.extend(summaries.as_array().cloned().unwrap_or_default());
    json!({"key": "s", "timezone": "UTC", "entities": [
        {"key": "lead", "fields": lead_fields},
        {"key": "deal", "fields": [
            {"key": "name", "type": "text", "required": true},
            {"key": "lead", "type": "relation", "entity": "lead"},
            {"key": "amount", "type": "integer"}
        ]}
    ]})
}

fn first_and_last() -> Value {
    json!([
        {"key": "first_deal_at", "type": "summary", "summary": {"entity": "deal", "via": "lead", "agg": "min"}},
        {"key": "last_deal_change", "type": "summary", "summary": {"entity": "deal", "via": "lead", "agg": "max", "of": "updated_at"}}
    ])
}

/// A write context at `t0 + minutes`.
fn at(actor: Uuid, minutes: i64) -> WriteCtx {
    WriteCtx {
        now: t0() + Duration::minutes(minutes),
        ..ctx(actor)
    }
}

async fn get(db: &trellis_form::db::Db, app: &App, entity: &str, id: Uuid) -> Value {
    store::get(db, app.entity(entity).unwrap(), id)
        .await
        .unwrap()
        .to_json()
}

/// `t0 + minutes` as the API writes an instant.
fn ts(minutes: i64) -> Value {
    json!(trellis_form::values::datetime_json(
        &(t0() + Duration::minutes(minutes))
    ))
}

#[test]
fn summary_fields_are_checked() {
    let bad = def(json!([
        {"key": "a", "type": "summary"},
        {"key": "b", "type": "summary", "summary": {"entity": "nope", "via": "lead", "agg": "min"}},
        {"key": "c", "type": "summary", "summary": {"entity": "deal", "via": "nope", "agg": "min"}},
        {"key": "d", "type": "summary", "summary": {"entity": "deal", "via": "amount", "agg": "min"}},
        {"key": "e", "type": "summary", "summary": {"entity": "deal", "via": "lead", "agg": "max", "of": "amount"}},
        {"key": "f", "type": "summary", "required": true, "summary": {"entity": "deal", "via": "lead", "agg": "min"}},
        {"key": "g", "type": "datetime", "summary": {"entity": "deal", "via": "lead", "agg": "min"}},
        {"key": "h", "type": "formula", "formula": "if a == () { \"new\" } else { \"old\" }", "result": "text"}
    ]));
    let got = match parse(&bad).and_then(|d| compile(d, 1)) {
        Err(e) => problems(e),
        Ok(_) => panic!("compiled"),
    };
    assert_eq!(
        got,
        [
            ("/entities/0/fields/1/summary".to_owned(), "required"),
            ("/entities/0/fields/6/required".to_owned(), "not_allowed"),
            ("/entities/0/fields/7/summary".to_owned(), "not_allowed"),
            ("/entities/0/fields/8/formula".to_owned(), "not_allowed"),
            (
                "/entities/0/fields/2/summary/entity".to_owned(),
                "unknown_entity"
            ),
            (
                "/entities/0/fields/3/summary/via".to_owned(),
                "unknown_field"
            ),
            (
                "/entities/0/fields/4/summary/via".to_owned(),
                "not_a_relation"
            ),
            ("/entities/0/fields/5/summary/of".to_owned(), "not_allowed"),
        ]
    );
    // An unknown aggregate is a shape error with its path.
    let e = parse(&def(json!([{"key": "x", "type": "summary", "summary": {"entity": "deal", "via": "lead", "agg": "sum"}}]))).unwrap_err();
    assert!(
        problems(e)
            .iter()
            .any(|(p, _)| p.starts_with("/entities/0/fields/1/summary")),
        "the path names the summary"
    );
    compile(parse(&def(first_and_last())).unwrap(), 1).unwrap();
}

/// Create a record of `entity` at `t0 + minutes` in its own transaction.
async fn create_at(
    db: &trellis_form::db::Db,
    app: &App,
    entity: &str,
    v: Value,
    actor: Uuid,
    minutes: i64,
) -> Uuid {
    let mut tx = db.begin().await.unwrap();
    let id = store::create(
        &mut tx,
        app,
        app.entity(entity).unwrap(),
        &v,
        &at(actor, minutes),
    )
    .await
    .unwrap()
    .meta
    .id;
    tx.commit().await.unwrap();
    id
}

/// Update a record of `entity` at `t0 + minutes` in its own transaction.
async fn update_at(
    db: &trellis_form::db::Db,
    app: &App,
    entity: &str,
    id: Uuid,
    v: Value,
    actor: Uuid,
    minutes: i64,
) -> Value {
    let mut tx = db.begin().await.unwrap();
    let r = store::update(
        &mut tx,
        app,
        app.entity(entity).unwrap(),
        id,
        &v,
        None,
        &at(actor, minutes),
    )
    .await
    .unwrap()
    .to_json();
    tx.commit().await.unwrap();
    r
}

/// A lead's two summaries: `(first_deal_at, last_deal_change)`.
async fn summaries(db: &trellis_form::db::Db, app: &App, lead: Uuid) -> (Value, Value) {
    let j = get(db, app, "lead", lead).await;
    (j["first_deal_at"].clone(), j["last_deal_change"].clone())
}

#[tokio::test]
async fn summary_fields_follow_the_related_records() {
    for t in testing::each().await {
        let (b, db) = (t.backend, &t.db);
        let (app, admin) = install(db, &def(first_and_last())).await;
        let (lead, deal) = (app.entity("lead").unwrap(), app.entity("deal").unwrap());
        let a = create_at(db, &app, "lead", json!({"name": "A"}), admin, 0).await;
        let bl = create_at(db, &app, "lead", json!({"name": "B"}), admin, 0).await;
        assert_eq!(summaries(db, &app, a).await.0, Value::Null, "{b}");
        // Two deals of A, at minutes 10 and 20 (a batch of one, a single create).
        let mut tx = db.begin().await.unwrap();
        let d1 = store::create_batch(
            &mut tx,
            &app,
            deal,
            &[json!({"name": "D1", "lead": a})],
            &at(admin, 10),
        )
        .await
        .unwrap()
        .remove(0);
        tx.commit().await.unwrap();
        let d2 = create_at(
            db,
            &app,
            "deal",
            json!({"name": "D2", "lead": a}),
            admin,
            20,
        )
        .await;
        assert_eq!(summaries(db, &app, a).await, (ts(10), ts(20)), "{b}");
        // The lead's own version is not bumped by its summaries.
        assert_eq!(get(db, &app, "lead", a).await["version"], json!(1), "{b}");
        // D1 moves to B at minute 30: both leads are computed again.
        update_at(db, &app, "deal", d1, json!({"lead": bl}), admin, 30).await;
        assert_eq!(
            (
                summaries(db, &app, a).await.0,
                summaries(db, &app, bl).await
            ),
            (ts(20), (ts(10), ts(30))),
            "{b}"
        );
        // An update that leaves the relation alone still counts for `updated_at`.
        update_at(db, &app, "deal", d2, json!({"amount": 5}), admin, 40).await;
        assert_eq!(summaries(db, &app, a).await.1, ts(40), "{b}");
        // Deleting A's last deal empties its summaries.
        let mut tx = db.begin().await.unwrap();
        store::delete(&mut tx, &app, deal, d2, None, &at(admin, 50))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            summaries(db, &app, a).await,
            (Value::Null, Value::Null),
            "{b}"
        );
        // A rolled-back write leaves them as they were.
        let mut tx = db.begin().await.unwrap();
        store::create(
            &mut tx,
            &app,
            deal,
            &json!({"name": "D3", "lead": a}),
            &at(admin, 60),
        )
        .await
        .unwrap();
        drop(tx);
        assert_eq!(summaries(db, &app, a).await.0, Value::Null, "{b}");
        // Summaries are read-only: a create or update naming one is refused and writes nothing.
        let mut tx = db.begin().await.unwrap();
        let e = store::create(
            &mut tx,
            &app,
            lead,
            &json!({"name": "C", "first_deal_at": "2026-01-01T00:00:00Z"}),
            &at(admin, 70),
        )
        .await
        .unwrap_err();
        assert_eq!(
            problems(e),
            [("/first_deal_at".to_owned(), "read_only")],
            "{b}"
        );
        let e = store::update(
            &mut tx,
            &app,
            lead,
            bl,
            &json!({"last_deal_change": null}),
            None,
            &at(admin, 70),
        )
        .await
        .unwrap_err();
        assert_eq!(
            problems(e),
            [("/last_deal_change".to_owned(), "read_only")],
            "{b}"
        );
        drop(tx);
        let jb = get(db, &app, "lead", bl).await;
        assert_eq!(
            (jb["last_deal_change"].clone(), jb["version"].clone()),
            (ts(30), json!(1)),
            "{b}"
        );
        // Updating the lead itself keeps its summaries.
        let u = update_at(db, &app, "lead", bl, json!({"name": "B2"}), admin, 80).await;
        assert_eq!(u["first_deal_at"], ts(10), "{b}");
        assert_eq!(summaries(db, &app, bl).await.0, ts(10), "{b}");
        t.cleanup().await;
    }
}

#[tokio::test]
async fn a_new_summary_field_is_filled_from_the_existing_records() {
    for t in testing::each().await {
        let b = t.backend;
        let (app, admin) = install(&t.db, &def(json!([]))).await;
        let db = &t.db;
        let a = create_at(db, &app, "lead", json!({"name": "A"}), admin, 0).await;
        let none = create_at(db, &app, "lead", json!({"name": "N"}), admin, 0).await;
        for m in [15, 5] {
            create_at(db, &app, "deal", json!({"name": "D", "lead": a}), admin, m).await;
        }
        let out = apps::import(
            &t.db,
            &def(first_and_last()),
            ImportOptions::default(),
            Some(admin),
            t0(),
        )
        .await
        .unwrap();
        let steps: Vec<(StepKind, Option<String>)> = out
            .plan
            .steps
            .iter()
            .map(|s| (s.kind, s.field.clone()))
            .collect();
        assert_eq!(
            steps,
            [
                (StepKind::AddField, Some("first_deal_at".to_owned())),
                (StepKind::AddField, Some("last_deal_change".to_owned())),
                (StepKind::FillSummary, Some("first_deal_at".to_owned())),
                (StepKind::FillSummary, Some("last_deal_change".to_owned())),
            ],
            "{b}"
        );
        assert!(
            out.plan.render().contains(
                "+ fill_summary   compute `lead.first_deal_at` from `deal` for every record"
            ),
            "{}",
            out.plan.render()
        );
        let app = apps::load(&t.db, "s").await.unwrap().unwrap();
        assert_eq!(
            (
                summaries(db, &app, a).await,
                summaries(db, &app, none).await.0
            ),
            ((ts(5), ts(15)), Value::Null),
            "{b}"
        );
        // Unchanged, the next import fills nothing; from min to max, it fills again.
        let out = apps::import(
            &t.db,
            &def(first_and_last()),
            ImportOptions::default(),
            Some(admin),
            t0(),
        )
        .await
        .unwrap();
        assert!(out.plan.steps.is_empty(), "{b}");
        let mut changed = first_and_last();
        changed[0]["summary"]["agg"] = json!("max");
        let out = apps::import(
            &t.db,
            &def(changed),
            ImportOptions::default(),
            Some(admin),
            t0(),
        )
        .await
        .unwrap();
        assert_eq!(
            out.plan.steps.iter().map(|s| s.kind).collect::<Vec<_>>(),
            [StepKind::UpdateField, StepKind::FillSummary],
            "{b}"
        );
        let app = apps::load(&t.db, "s").await.unwrap().unwrap();
        assert_eq!(summaries(db, &app, a).await.0, ts(15), "{b}");
        t.cleanup().await;
    }
}
