//! App definitions checked by every engine before anything is written: the form engine's
//! entities, then the report engine's metrics and dashboards (which need the compiled entities).
//! The form engine cannot call the report engine (dependencies point one way), so the server
//! wires the two together here, and every import path (API, CLI, first start) goes through it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use trellis_form::apps::{self, ImportOptions, ImportOutcome};
use trellis_form::db::{Db, Sql, Value as DbValue};
use trellis_form::model::App;
use trellis_form::model::ColKind;
use trellis_form::Problem;
use trellis_form::Result;
use uuid::Uuid;

/// Compile a definition offline with every engine (`trellis app check`).
pub fn check(def: &Value) -> Result<App> {
    let parsed = trellis_form::compile::parse(def)?;
    let app = trellis_form::compile::compile(parsed, 1)?;
    let mut problems = vec![];
    if let Err(trellis_form::FormError::Definition(ps)) = trellis_report::Reports::compile(&app) {
        problems.extend(ps);
    }
    if let Err(ps) = trellis_flow::compile(&app) {
        problems.extend(ps);
    }
    if !problems.is_empty() {
        return Err(trellis_form::FormError::Definition(problems));
    }
    Ok(app)
}

/// Import a definition after every engine has accepted it.
pub async fn import(
    db: &Db,
    def: &Value,
    opts: ImportOptions,
    actor: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<ImportOutcome> {
    // A role that members still hold cannot disappear: they would silently lose the app.
    if let Ok(new) =
        trellis_form::compile::parse(def).and_then(|d| trellis_form::compile::compile(d, 1))
    {
        let mut sql = Sql::new("SELECT DISTINCT \"role\" FROM \"app_members\" WHERE \"app\" = ");
        sql.bind(DbValue::Text(new.key.clone()));
        let held = db.fetch_all(&sql, &[ColKind::Text]).await?;
        let problems: Vec<Problem> = held
            .iter()
            .filter_map(|r| match &r[0] {
                DbValue::Text(role) if new.roles.get(role).is_none() => Some(Problem::new(
                    "/roles",
                    "role_in_use",
                    format!("Members still hold the role `{role}`; give them another role before removing it."),
                )),
                _ => None,
            })
            .collect();
        if !problems.is_empty() {
            return Err(trellis_form::FormError::MigrationConflict(problems));
        }
    }
    apps::import_checked(db, def, opts, actor, now, |app| {
        let mut problems = vec![];
        if let Err(trellis_form::FormError::Definition(ps)) = trellis_report::Reports::compile(app)
        {
            problems.extend(ps);
        }
        if let Err(ps) = trellis_flow::compile(app) {
            problems.extend(ps);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(trellis_form::FormError::Definition(problems))
        }
    })
    .await
}
