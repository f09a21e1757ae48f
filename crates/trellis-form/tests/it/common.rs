//! Shared fixtures: a test app with every field type, and helpers.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};
use trellis_form::apps::{self, ImportOptions};
use trellis_form::db::{Db, Sql};
use trellis_form::model::{App, ColKind};
use trellis_form::store::WriteCtx;
use uuid::Uuid;

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap()
}

/// A definition exercising every field type and constraint.
pub fn zoo_def() -> Value {
    json!({
        "key": "zoo",
        "label": {"en": "Zoo", "zh-CN": "动物园"},
        "entities": [
            {"key": "account", "label": "Account", "fields": [
                {"key": "name", "type": "text", "required": true, "unique": true}
            ]},
            {"key": "thing", "label": "Thing", "fields": [
                {"key": "title", "type": "text", "label": {"en": "Title", "zh-CN": "标题"}, "required": true, "max_length": 20},
                {"key": "notes", "type": "long_text"},
                {"key": "count", "type": "integer", "min": 0, "max": 100},
                {"key": "ratio", "type": "decimal", "scale": 4},
                {"key": "price", "type": "money", "currency": "CNY", "min": 0},
                {"key": "active", "type": "boolean", "default": true},
                {"key": "due", "type": "date", "min": "2020-01-01"},
                {"key": "seen_at", "type": "datetime"},
                {"key": "email", "type": "email", "unique": true},
                {"key": "phone", "type": "phone"},
                {"key": "site", "type": "url"},
                {"key": "color", "type": "select", "options": [{"key": "red", "label": {"en": "Red", "zh-CN": "红"}}, {"key": "blue"}]},
                {"key": "tags", "type": "multiselect", "options": [{"key": "a"}, {"key": "b"}, {"key": "c"}]},
                {"key": "who", "type": "user"},
                {"key": "account", "type": "relation", "entity": "account"},
                {"key": "extra", "type": "json", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}}},
                {"key": "code", "type": "text", "pattern": "[A-Z]{3}-[0-9]+"}
            ]},
            {"key": "deal", "label": "Deal", "fields": [
                {"key": "name", "type": "text", "required": true},
                {"key": "account", "type": "relation", "entity": "account"},
                {"key": "amount", "type": "money"},
                {"key": "reason", "type": "text"},
                {"key": "stage", "type": "stage", "required": true, "default": "new", "stages": [
                    {"key": "new", "probability": 0.1},
                    {"key": "qualified", "probability": 0.3, "entry_criteria": ["account"]},
                    {"key": "proposal", "label": "Proposal", "probability": 0.5, "entry_criteria": ["account", "amount"]},
                    {"key": "won", "probability": 1.0, "kind": "won"},
                    {"key": "lost", "probability": 0.0, "kind": "lost", "entry_criteria": ["reason"]}
                ]}
            ], "history": {"track": ["name", "amount"], "retention_days": 30}}
        ]
    })
}

/// Install `def` and return the compiled app and the admin user id.
pub async fn install(db: &Db, def: &Value) -> (App, Uuid) {
    let mut tx = db.begin().await.unwrap();
    let admin = trellis_form::users::create(
        &mut tx,
        &trellis_form::users::UserInput {
            name: Some("Admin".into()),
            email: Some("admin@example.com".into()),
            is_admin: Some(true),
            ..Default::default()
        },
        t0(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    apps::import(db, def, ImportOptions::default(), Some(admin.id), t0())
        .await
        .unwrap();
    (
        apps::load(db, def["key"].as_str().unwrap())
            .await
            .unwrap()
            .unwrap(),
        admin.id,
    )
}

pub fn ctx(actor: Uuid) -> WriteCtx {
    WriteCtx {
        actor: Some(actor),
        now: t0(),
        default_owner: Some(actor),
        import: false,
        depth: 0,
    }
}

/// Count rows of a table (optionally with a raw, constant WHERE clause written by the test).
pub async fn count(db: &Db, table: &str, filter: &str) -> i64 {
    let sql = Sql::new(format!("SELECT COUNT(*) FROM \"{table}\" {filter}"));
    match db
        .fetch_optional(&sql, &[ColKind::Int])
        .await
        .unwrap()
        .unwrap()[0]
    {
        trellis_form::db::Value::Int(n) => n,
        _ => unreachable!(),
    }
}

/// Create a record in its own transaction.
pub async fn create(
    db: &Db,
    app: &App,
    entity: &str,
    v: Value,
    actor: Uuid,
) -> trellis_form::Result<trellis_form::store::Record> {
    let mut tx = db.begin().await?;
    let r = trellis_form::store::create(&mut tx, app, app.entity(entity)?, &v, &ctx(actor)).await?;
    tx.commit().await?;
    Ok(r)
}

/// The problems of an `Invalid` error, as (path, code) pairs.
#[track_caller]
pub fn problems(e: trellis_form::FormError) -> Vec<(String, &'static str)> {
    match e {
        trellis_form::FormError::Invalid(ps)
        | trellis_form::FormError::Definition(ps)
        | trellis_form::FormError::Query(ps) => ps.into_iter().map(|p| (p.path, p.code)).collect(),
        other => panic!("expected a list of problems, got {other:?}"),
    }
}
