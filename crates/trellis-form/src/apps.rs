//! Installed apps: importing a definition (plan, check, apply, new version) and loading them.
//!
//! An import compiles the new definition, computes the plan against the installed version and
//! applies it in one transaction together with the new `apps` / `app_versions` rows, so a failed
//! step leaves both the tables and the definition as they were.

use crate::compile::{compile, parse};
use crate::db::{Db, Sql, Value};
use crate::def::AppDef;
use crate::error::{FormError, Problem, Result};
use crate::model::{App, ColKind};
use crate::plan::{plan, Plan};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value as Json;
use uuid::Uuid;

/// How to import.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportOptions {
    /// Apply destructive steps (drop fields, change types …).
    pub allow_destructive: bool,
    /// Compute and check the plan, but change nothing.
    pub dry_run: bool,
}

/// What an import did.
#[derive(Debug, Serialize)]
pub struct ImportOutcome {
    /// App key.
    pub app: String,
    /// The version now installed (unchanged on a dry run or when nothing changed).
    pub version: i64,
    /// Whether anything was written.
    pub applied: bool,
    /// The migration plan.
    pub plan: Plan,
}

/// Compute the plan for importing `def` (no writes).
pub async fn plan_import(db: &Db, def: &Json) -> Result<(App, Option<App>, Plan)> {
    let def = parse(def)?;
    let current = load(db, &def.key).await?;
    let version = current.as_ref().map(|a| a.version + 1).unwrap_or(1);
    let new = compile(def, version)?;
    let p = plan(db.backend(), current.as_ref(), &new);
    Ok((new, current, p))
}

/// Import a definition: plan, refuse destructive steps unless allowed, apply, record a version.
pub async fn import(
    db: &Db,
    def: &Json,
    opts: ImportOptions,
    actor: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<ImportOutcome> {
    import_checked(db, def, opts, actor, now, |_| Ok(())).await
}

/// [`import`], with one more check of the compiled app before anything is written: the server
/// hands in the engines that build on the form engine (reports), which this crate cannot call.
pub async fn import_checked(
    db: &Db,
    def: &Json,
    opts: ImportOptions,
    actor: Option<Uuid>,
    now: DateTime<Utc>,
    check: impl FnOnce(&App) -> Result<()>,
) -> Result<ImportOutcome> {
    let (new, current, p) = plan_import(db, def).await?;
    check(&new)?;
    if p.is_destructive() && !opts.allow_destructive {
        let problems = p
            .steps
            .iter()
            .filter(|s| s.destructive)
            .map(|s| Problem::new(s.path.clone(), "destructive", s.description.clone()))
            .collect();
        return Err(FormError::Destructive(problems));
    }
    let unchanged = current.as_ref().is_some_and(|c| c.def == new.def);
    if opts.dry_run || unchanged {
        let version = current.as_ref().map(|c| c.version).unwrap_or(0);
        // A dry run still checks tightening steps against the data.
        if opts.dry_run {
            let mut tx = db.begin().await?;
            run_checks(&mut tx, &p).await?;
        }
        return Ok(ImportOutcome {
            app: new.key.clone(),
            version,
            applied: false,
            plan: p,
        });
    }
    let mut tx = db.begin().await?;
    run_checks(&mut tx, &p).await?;
    for step in &p.steps {
        for sql in &step.sql {
            match tx.execute(sql).await {
                Err(FormError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                    return Err(FormError::MigrationConflict(vec![Problem::new(
                        step.path.clone(),
                        "duplicates",
                        format!(
                            "cannot {}: existing records share a value",
                            step.description
                        ),
                    )]));
                }
                other => {
                    other?;
                }
            }
        }
    }
    let def_json = serde_json::to_value(&new.def).expect("definition serializes");
    let plan_json = serde_json::to_value(&p).expect("plan serializes");
    let mut sql = if current.is_some() {
        let mut s = Sql::new("UPDATE \"apps\" SET \"version\" = ");
        s.bind(Value::Int(new.version));
        s.push(", \"definition\" = ")
            .bind(Value::Json(def_json.clone()));
        s.push(", \"updated_at\" = ").bind(Value::DateTime(now));
        s.push(" WHERE \"key\" = ")
            .bind(Value::Text(new.key.clone()));
        s
    } else {
        let mut s = Sql::new(
            "INSERT INTO \"apps\" (\"key\", \"version\", \"definition\", \"updated_at\") VALUES (",
        );
        s.bind(Value::Text(new.key.clone())).push(", ");
        s.bind(Value::Int(new.version)).push(", ");
        s.bind(Value::Json(def_json.clone())).push(", ");
        s.bind(Value::DateTime(now)).push(")");
        s
    };
    tx.execute(&sql).await?;
    sql = Sql::new("INSERT INTO \"app_versions\" (\"app\", \"version\", \"definition\", \"plan\", \"created_at\", \"created_by\") VALUES (");
    sql.bind(Value::Text(new.key.clone())).push(", ");
    sql.bind(Value::Int(new.version)).push(", ");
    sql.bind(Value::Json(def_json)).push(", ");
    sql.bind(Value::Json(plan_json)).push(", ");
    sql.bind(Value::DateTime(now)).push(", ");
    sql.bind(Value::opt_uuid(actor)).push(")");
    tx.execute(&sql).await?;
    crate::audit::record(
        &mut tx,
        now,
        actor,
        Some(&new.key),
        "app.import",
        &new.key,
        serde_json::json!({
            "version": new.version,
            "previous_version": current.as_ref().map(|c| c.version),
            "changes": p.steps.iter().map(|s| s.description.clone()).collect::<Vec<_>>(),
            "roles": new.roles.keys(),
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(ImportOutcome {
        app: new.key.clone(),
        version: new.version,
        applied: true,
        plan: p,
    })
}

async fn run_checks(tx: &mut crate::db::Tx, p: &Plan) -> Result<()> {
    let mut problems = vec![];
    for step in &p.steps {
        for (sql, msg) in &step.checks {
            let n = match tx
                .fetch_optional(sql, &[ColKind::Int])
                .await?
                .map(|r| r[0].clone())
            {
                Some(Value::Int(n)) => n,
                _ => 0,
            };
            if n > 0 {
                problems.push(Problem::new(
                    step.path.clone(),
                    "data_conflict",
                    format!("{msg} ({n} record(s))"),
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(FormError::MigrationConflict(problems))
    }
}

/// Load the installed version of app `key`.
pub async fn load(db: &Db, key: &str) -> Result<Option<App>> {
    let mut sql = Sql::new("SELECT \"version\", \"definition\" FROM \"apps\" WHERE \"key\" = ");
    sql.bind(Value::Text(key.into()));
    match db
        .fetch_optional(&sql, &[ColKind::Int, ColKind::Json])
        .await?
    {
        None => Ok(None),
        Some(row) => Ok(Some(from_row(row)?)),
    }
}

/// Load every installed app.
pub async fn load_all(db: &Db) -> Result<Vec<App>> {
    let sql = Sql::new("SELECT \"version\", \"definition\" FROM \"apps\" ORDER BY \"key\"");
    db.fetch_all(&sql, &[ColKind::Int, ColKind::Json])
        .await?
        .into_iter()
        .map(from_row)
        .collect()
}

fn from_row(row: Vec<Value>) -> Result<App> {
    let (Value::Int(version), Value::Json(def)) = (&row[0], &row[1]) else {
        return Err(FormError::Database(sqlx::Error::Decode(
            "bad apps row".into(),
        )));
    };
    let def: AppDef = serde_json::from_value(def.clone())
        .map_err(|e| FormError::Database(sqlx::Error::Decode(e.into())))?;
    compile(def, *version)
}

/// One stored version of an app.
#[derive(Debug, Serialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: i64,
    /// When it was imported.
    pub created_at: Json,
    /// By whom.
    pub created_by: Option<Uuid>,
    /// The plan that was applied.
    pub plan: Json,
}

/// Every version of an app, newest first.
pub async fn versions(db: &Db, key: &str) -> Result<Vec<VersionInfo>> {
    let mut sql = Sql::new("SELECT \"version\", \"created_at\", \"created_by\", \"plan\" FROM \"app_versions\" WHERE \"app\" = ");
    sql.bind(Value::Text(key.into()))
        .push(" ORDER BY \"version\" DESC");
    let rows = db
        .fetch_all(
            &sql,
            &[
                ColKind::Int,
                ColKind::DateTime,
                ColKind::Uuid,
                ColKind::Json,
            ],
        )
        .await?;
    if rows.is_empty() {
        return Err(FormError::AppNotFound(key.into()));
    }
    Ok(rows
        .into_iter()
        .map(|r| VersionInfo {
            version: if let Value::Int(v) = r[0] { v } else { 0 },
            created_at: crate::values::scalar_json(&r[1], 0),
            created_by: if let Value::Uuid(u) = r[2] {
                Some(u)
            } else {
                None
            },
            plan: crate::values::scalar_json(&r[3], 0),
        })
        .collect())
}

/// The definition of one stored version.
pub async fn version_definition(db: &Db, key: &str, version: i64) -> Result<Json> {
    let mut sql = Sql::new("SELECT \"definition\" FROM \"app_versions\" WHERE \"app\" = ");
    sql.bind(Value::Text(key.into()))
        .push(" AND \"version\" = ")
        .bind(Value::Int(version));
    match db.fetch_optional(&sql, &[ColKind::Json]).await? {
        Some(r) => Ok(crate::values::scalar_json(&r[0], 0)),
        None => Err(FormError::NotFound("app version")),
    }
}

/// The columns the database has for `table` (none when the table is missing).
pub async fn live_columns(db: &Db, table: &str) -> Result<Vec<String>> {
    let mut sql = match db.backend() {
        crate::db::Backend::Sqlite => Sql::new("SELECT \"name\" FROM pragma_table_info("),
        crate::db::Backend::Postgres => Sql::new(
            "SELECT CAST(\"column_name\" AS TEXT) FROM \"information_schema\".\"columns\" WHERE \"table_schema\" = current_schema() AND \"table_name\" = (",
        ),
    };
    sql.bind(Value::Text(table.to_owned())).push(")");
    Ok(db
        .fetch_all(&sql, &[ColKind::Text])
        .await?
        .into_iter()
        .filter_map(|r| match &r[0] {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        })
        .collect())
}

/// Bring tables made by an earlier Trellis up to the current layout: stage fields gained
/// per-stage days columns (the finished stays, for time-in-stage reports). Missing ones are
/// added and filled from the stage history, in one transaction per entity. Returns the number
/// of columns added.
pub async fn upgrade(db: &Db, app: &App) -> Result<usize> {
    let mut added = 0;
    for e in &app.entities {
        let Some(sf) = e.stage() else { continue };
        let have = live_columns(db, &e.table).await?;
        if have.is_empty() {
            continue;
        }
        let missing: Vec<String> = sf
            .stages
            .iter()
            .map(|s| crate::model::stage_days_column(&sf.key, &s.key))
            .filter(|c| !have.contains(c))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let mut tx = db.begin().await?;
        for c in &missing {
            tx.execute(&Sql::new(format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                crate::db::quote(&e.table),
                crate::db::quote(c),
                db.backend().column_type(ColKind::Decimal)
            )))
            .await?;
        }
        // Every record's stage path, in order; the finished stays per stage.
        let mut q = Sql::new(
            "SELECT \"record_id\", \"new_value\", \"at\" FROM \"history\" WHERE \"app\" = ",
        );
        q.bind(Value::Text(app.key.clone()))
            .push(" AND \"entity\" = ")
            .bind(Value::Text(e.key.clone()))
            .push(" AND \"field\" = ")
            .bind(Value::Text(sf.key.clone()))
            .push(" ORDER BY \"record_id\", \"at\", \"id\"");
        let rows = tx
            .fetch_all(&q, &[ColKind::Uuid, ColKind::Json, ColKind::DateTime])
            .await?;
        let mut i = 0;
        while i < rows.len() {
            let id = rows[i][0].clone();
            let mut path: Vec<(String, chrono::DateTime<chrono::Utc>)> = vec![];
            while i < rows.len() && rows[i][0] == id {
                if let (Value::Json(v), Value::DateTime(at)) = (&rows[i][1], &rows[i][2]) {
                    path.push((v.as_str().unwrap_or_default().to_owned(), *at));
                }
                i += 1;
            }
            let finished = crate::model::finished_stays(&path);
            let finished: Vec<_> = finished
                .into_iter()
                .filter(|(s, _)| missing.contains(&crate::model::stage_days_column(&sf.key, s)))
                .collect();
            if finished.is_empty() {
                continue;
            }
            let mut u = Sql::new(format!("UPDATE {} SET ", crate::db::quote(&e.table)));
            for (k, (s, d)) in finished.iter().enumerate() {
                if k > 0 {
                    u.push(", ");
                }
                u.ident(&crate::model::stage_days_column(&sf.key, s))
                    .push(" = ")
                    .bind(crate::store::days_value(Some(*d)));
            }
            u.push(" WHERE \"id\" = ").bind(id);
            tx.execute(&u).await?;
        }
        tx.commit().await?;
        added += missing.len();
    }
    Ok(added)
}
