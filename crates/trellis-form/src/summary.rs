//! Summary fields: the first or last creation (or update) time of the records of another
//! entity that point at a record (a lead's first opportunity), kept by every write of those
//! records inside its own transaction, like the rollups ([`crate::rollup`]).
//!
//! After a write of a record of entity `E`, every summary fed by `E` is computed again for the
//! records the write's relation pointed at, before and after (a relation moved from one lead to
//! another changes both). A summary is a plain column: reports read it (a conversion counts the
//! leads whose first opportunity came after them from it, without a probe per opportunity),
//! lists sort and filter on it, and an index can hold it.

use crate::db::{quote, Backend, Sql, Tx, Value};
use crate::def::{FieldType, SummaryAgg};
use crate::error::Result;
use crate::model::{App, Entity, Field};
use crate::rollup::Touched;
use serde_json::Value as Json;

/// One summary field: the entity holding it, the field, and its source entity.
pub struct Source<'a> {
    /// The entity the summary field belongs to (the lead).
    pub target: &'a Entity,
    /// The summary field.
    pub field: &'a Field,
    /// The entity whose records it summarises (the opportunity).
    pub source: &'a Entity,
    /// The source's relation field pointing at `target`.
    pub via: &'a str,
}

/// Every summary field of `app`.
pub fn all(app: &App) -> Vec<Source<'_>> {
    let mut out = vec![];
    for target in &app.entities {
        for field in target.fields.iter().filter(|f| f.ty == FieldType::Summary) {
            let Some(s) = &field.def.summary else {
                continue;
            };
            if let Ok(source) = app.entity(&s.entity) {
                out.push(Source {
                    target,
                    field,
                    source,
                    via: &s.via,
                });
            }
        }
    }
    out
}

fn agg_sql(agg: SummaryAgg) -> &'static str {
    match agg {
        SummaryAgg::Min => "MIN",
        SummaryAgg::Max => "MAX",
    }
}

/// The value of `src`'s summary for the target record `t` (correlated subquery).
fn value_sql(src: &Source) -> String {
    let s = src.field.def.summary.as_ref().expect("a summary field");
    let agg = agg_sql(s.agg);
    format!(
        "(SELECT {agg}(c.{}) FROM {} c WHERE c.{} = {}.\"id\")",
        quote(&s.of),
        quote(&src.source.table),
        quote(src.via),
        quote(&src.target.table)
    )
}

/// The statement computing `src`'s summary again for every record of its entity (a new
/// summary field, a changed one, rows loaded around the write path).
pub fn fill_sql(src: &Source) -> Sql {
    // Only the records that have a related record or a value to clear are written (a third
    // of the CRM's demo leads have an opportunity).
    let col = quote(&src.field.key);
    Sql::new(format!(
        "UPDATE {} SET {col} = {} WHERE {col} IS NOT NULL OR \"id\" IN (SELECT c.{} FROM {} c)",
        quote(&src.target.table),
        value_sql(src),
        quote(src.via),
        quote(&src.source.table)
    ))
}

/// The statement filling `src`'s summary while it is empty for every record (a new column,
/// freshly loaded rows): one pass over the related records, grouped, with no index needed on
/// their relation.
pub fn fill_empty_sql(src: &Source) -> Sql {
    let s = src.field.def.summary.as_ref().expect("a summary field");
    let agg = agg_sql(s.agg);
    let target = quote(&src.target.table);
    Sql::new(format!(
        "UPDATE {target} SET {} = g.\"v\" FROM (SELECT c.{via} AS \"k\", {agg}(c.{}) AS \"v\" FROM {} c WHERE c.{via} IS NOT NULL GROUP BY c.{via}) AS g WHERE {target}.\"id\" = g.\"k\"",
        quote(&src.field.key),
        quote(&s.of),
        quote(&src.source.table),
        via = quote(src.via),
    ))
}

/// Fill every summary of `app` while they are empty (rows loaded around the write path).
pub async fn fill_empty(tx: &mut Tx, app: &App) -> Result<()> {
    for src in all(app) {
        tx.execute(&fill_empty_sql(&src)).await?;
    }
    Ok(())
}

/// After a write of records of `e` (`touched`: their fields before and after), compute again
/// the summaries they feed, for the records their relations point at (nothing when `e` feeds
/// none).
pub async fn refresh(tx: &mut Tx, app: &App, e: &Entity, touched: &[Touched<'_>]) -> Result<()> {
    for src in all(app).iter().filter(|s| s.source.key == e.key) {
        let mut ids: Vec<&str> = touched
            .iter()
            .filter_map(|(_, fields)| fields.get(src.via).and_then(Json::as_str))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            continue;
        }
        let list = Json::from(ids).to_string();
        let table = quote(&src.target.table);
        let mut sql = match tx.backend() {
            Backend::Postgres => {
                // Lock the records first: a concurrent write to the same record waits here,
                // and the statement below (a new snapshot) reads its committed result.
                let mut lock = Sql::new(format!(
                    "SELECT 1 FROM {table} WHERE \"id\" IN (SELECT CAST(\"value\" AS UUID) FROM jsonb_array_elements_text(CAST("
                ));
                lock.bind(Value::Text(list.clone()))
                    .push(" AS JSONB))) ORDER BY \"id\" FOR UPDATE");
                tx.execute(&lock).await?;
                Sql::new(format!(
                    "UPDATE {table} SET {} = {} WHERE \"id\" IN (SELECT CAST(\"value\" AS UUID) FROM jsonb_array_elements_text(CAST(",
                    quote(&src.field.key),
                    value_sql(src)
                ))
            }
            Backend::Sqlite => Sql::new(format!(
                "UPDATE {table} SET {} = {} WHERE \"id\" IN (SELECT \"value\" FROM json_each(",
                quote(&src.field.key),
                value_sql(src)
            )),
        };
        sql.bind(Value::Text(list));
        sql.push(match tx.backend() {
            Backend::Postgres => " AS JSONB)))",
            Backend::Sqlite => "))",
        });
        tx.execute(&sql).await?;
    }
    Ok(())
}

/// Whether writes to `e` feed any summary (so the store can skip the work).
pub fn fed_by(app: &App, e: &Entity) -> bool {
    all(app).iter().any(|s| s.source.key == e.key)
}
