//! Rollups kept fresh by the write path: the hook the form engine calls inside every write
//! transaction.
//!
//! A rollup is declared in the app's reports and compiled by the report engine, which this crate
//! cannot call; the report engine hands its statements in ([`App::attach_rollups`]). Each
//! statement adds (sign `+1`) or removes (`-1`) the contribution of a set of records to the
//! rollup's buckets. Around a write the store removes the contribution of every record the write
//! can change, before it writes, and adds it back afterwards: a stage change moves a record from
//! one bucket to another, a delete only removes, a create only adds.
//!
//! An app that declares rollups refuses writes until its statements are attached, so no path
//! can write around them and leave a rollup stale.

use crate::db::{Sql, Tx, Value};
use crate::error::{FormError, Result};
use crate::model::{App, Entity};
use serde_json::{Map, Value as Json};
use uuid::Uuid;

/// One maintenance statement: writes to `entity` change the rollup `rollup`.
#[derive(Debug, Clone)]
pub struct Maintain {
    /// Rollup name.
    pub rollup: String,
    /// The entity whose writes change the rollup.
    pub entity: String,
    /// The table of the records the rollup aggregates (locked before their contribution is
    /// removed, so concurrent writers on PostgreSQL see each other's result).
    pub table: String,
    /// `None`: the rollup aggregates the written records themselves. `Some(field)`: a relation
    /// field of the written entity pointing at the records the rollup aggregates (a conversion
    /// counts a lead once an opportunity points at it).
    pub via: Option<String>,
    /// The statement: `$1` is the sign (integer), `$2` the ids (a JSON array of text).
    pub sql: Sql,
}

/// The rollup names an app's definition declares (from its `reports` section), without
/// compiling them.
pub fn declared(app: &App) -> Vec<String> {
    app.def
        .reports
        .iter()
        .filter_map(|r| r.get("rollups").and_then(Json::as_object))
        .flat_map(|m| m.keys().cloned())
        .collect()
}

impl App {
    /// Hand in the compiled maintenance statements of the app's rollups (once).
    pub fn attach_rollups(&self, statements: Vec<Maintain>) {
        let _ = self.rollups.set(statements);
    }

    /// The maintenance statements; an error when the app declares rollups that were never
    /// attached (a writer that skipped the report engine would leave them stale).
    pub fn maintenance(&self) -> Result<&[Maintain]> {
        match self.rollups.get() {
            Some(m) => Ok(m),
            None if declared(self).is_empty() => Ok(&[]),
            None => Err(FormError::Internal(format!(
                "app `{}` declares rollups, but this writer has not compiled them; refusing to write around them",
                self.key
            ))),
        }
    }
}

/// A record as a write sees it: its id and field values.
pub type Touched<'a> = (Uuid, &'a Map<String, Json>);

/// Whether writes to `e` change any rollup (so the store can skip the work).
pub fn affects(app: &App, e: &Entity) -> Result<bool> {
    Ok(app.maintenance()?.iter().any(|m| m.entity == e.key))
}

/// Add (`sign` 1) or remove (`sign` -1) the contribution of the records a write touches, for
/// every rollup writes to `e` change. `creating`: the touched records do not exist yet (before
/// the write) or no longer matter, so only statements `via` another entity run.
pub async fn apply(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    sign: i64,
    touched: &[Touched<'_>],
    own_rows: bool,
) -> Result<()> {
    // Per rollup, every record the write reaches (itself, what it points at), once.
    let mut per_rollup: Vec<(&Maintain, Vec<String>)> = vec![];
    for m in app.maintenance()?.iter().filter(|m| m.entity == e.key) {
        let ids: Vec<String> = match &m.via {
            None if !own_rows => continue,
            None => touched.iter().map(|(id, _)| id.to_string()).collect(),
            Some(f) => touched
                .iter()
                .filter_map(|(_, fields)| fields.get(f).and_then(Json::as_str))
                .map(str::to_owned)
                .collect(),
        };
        match per_rollup.iter_mut().find(|(x, _)| x.rollup == m.rollup) {
            Some((_, v)) => v.extend(ids),
            None => per_rollup.push((m, ids)),
        }
    }
    for (m, mut ids) in per_rollup {
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            continue;
        }
        let list = Json::from(ids).to_string();
        if sign < 0 && tx.backend() == crate::db::Backend::Postgres {
            // Another transaction changing these records (or what they count) waits here, and
            // the removal below reads its committed result.
            let mut lock = Sql::new(format!(
                "SELECT 1 FROM {} WHERE \"id\" IN (SELECT CAST(\"value\" AS UUID) FROM jsonb_array_elements_text(CAST(",
                crate::db::quote(&m.table)
            ));
            lock.bind(Value::Text(list.clone()))
                .push(" AS JSONB))) ORDER BY \"id\" FOR UPDATE");
            tx.execute(&lock).await?;
        }
        let mut sql = m.sql.clone();
        sql.params[0] = Value::Int(sign);
        sql.params[1] = Value::Text(list);
        tx.execute(&sql).await?;
    }
    Ok(())
}
