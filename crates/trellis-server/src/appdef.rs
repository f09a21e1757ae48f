//! App definitions checked by every engine before anything is written: the form engine's
//! entities, then the report engine's metrics and dashboards (which need the compiled entities).
//! The form engine cannot call the report engine (dependencies point one way), so the server
//! wires the two together here, and every import path (API, CLI, first start) goes through it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use trellis_form::apps::{self, ImportOptions, ImportOutcome};
use trellis_form::db::Db;
use trellis_form::model::App;
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
