//! The compiled model checked against the live database when an app loads.
//!
//! Report SQL names columns that the compiled entities say exist. If the database disagrees (a
//! table changed by hand, a failed migration), SQLite would not fail on a double-quoted name it
//! does not know: it reads it as a text literal, and a report would quietly answer with wrong
//! numbers. So every table and column the model expects is looked up in the catalogue first.

use trellis_form::db::Db;
use trellis_form::model::{App, SYSTEM_COLUMNS};
use trellis_form::{FormError, Problem, Result};

/// Every expected table and column of `app` that the database lacks, as problems; `Ok` when
/// the database matches.
pub async fn verify(db: &Db, app: &App) -> Result<()> {
    let mut problems = vec![];
    for e in &app.entities {
        let have = trellis_form::apps::live_columns(db, &e.table).await?;
        if have.is_empty() {
            problems.push(Problem::new(
                format!("/entities/{}", e.key),
                "missing_table",
                format!(
                    "the table {} of {} is missing from the database",
                    e.table, e.label
                ),
            ));
            continue;
        }
        let expected = SYSTEM_COLUMNS
            .iter()
            .map(|c| c.to_string())
            .chain(e.columns().into_iter().map(|c| c.name));
        for c in expected {
            if !have.contains(&c) {
                problems.push(Problem::new(
                    format!("/entities/{}/{c}", e.key),
                    "missing_column",
                    format!("the table {} has no column {c}", e.table),
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(FormError::Definition(problems))
    }
}
