//! Rollups: pre-aggregated tables the form engine keeps fresh inside every write transaction,
//! and the planner step that answers a query from one when it fits.
//!
//! A rollup is declared in the `reports` section:
//!
//! ```json
//! {"rollups": {"opportunity_by_close_month": {
//!   "entity": "opportunity", "dimensions": ["region", "stage"],
//!   "time": "expected_close_date", "grain": "month",
//!   "measures": ["pipeline_value", "weighted_forecast", "stage_conversion"]}}}
//! ```
//!
//! Its table holds one row per combination of dimension values and time bucket (the local date
//! of the bucket's start in the app's time zone) with additive parts per measure: the number of
//! records passing the metric's filter, sums and non-null counts of its value, conversion
//! numerators, funnel stage counts. Averages and ratios are divided after adding the parts up, so
//! the answer is the one the base tables give (tested query by query).
//!
//! Measures must be additive: count, sum, avg (sum and count), conversions, funnels, durations
//! and forecasts with avg or sum, ratios and derived metrics over those. Medians and
//! percentiles, distinct counts, min/max, time in stage (it grows with the clock), conversions
//! that leave out records whose window is still open (the clock again), and anything that reads
//! another record through a relation (it would go stale when that record changes) are refused
//! with the reason. A related conversion (lead → opportunity) is maintained from both sides:
//! writes of the opportunity move the lead it points at.

use crate::dialect;
use crate::engine::{
    anchor_of, bucket_offsets, dimension, funnel_cond, query_conds, related_exists, Out, Plan,
    Unit, Visibility,
};
use crate::expr::Expr;
use crate::lower::Ctx;
use crate::model::{Agg, Kind, Metric, Reports};
use crate::time::Grain;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use trellis_form::db::{quote, Backend, Db, Sql, Value};
use trellis_form::def::Label;
use trellis_form::model::{
    stage_changed_column, stage_days_column, stage_entered_column, App, ColKind,
};
use trellis_form::rollup::Maintain;
use trellis_form::{FormError, Problem, Result};

/// A rollup as written in the definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupDef {
    /// Entity aggregated.
    pub entity: String,
    /// Display name.
    #[serde(default)]
    pub label: Option<Label>,
    /// Fields of the entity to keep apart (no relation paths).
    #[serde(default)]
    pub dimensions: Vec<String>,
    /// Date or date-time field the buckets follow (none: one bucket).
    #[serde(default)]
    pub time: Option<String>,
    /// Bucket size: `day` (default), `week`, `month`, `quarter`, `year`.
    #[serde(default)]
    pub grain: Option<String>,
    /// Metrics it can answer.
    pub measures: Vec<String>,
}

/// What one column of a rollup adds up, per record.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Records that pass the metric's filter.
    N,
    /// The value, where the filter passes.
    Sum,
    /// Records with a value, where the filter passes.
    NonNull,
    /// Converted records, where the filter passes.
    Num,
    /// Records that entered funnel stage `i` (per the funnel's mode).
    Stage(usize),
    /// Time in stage, open stage `i`: records that ever entered it.
    Entered(usize),
    /// … the days of their finished stays in it.
    Done(usize),
    /// … records in it now.
    Current(usize),
    /// … the day number (days since 2000-01-01) their stay under way began.
    Since(usize),
}

/// The instant the `Since` parts count days from (2000-01-01, UTC).
fn epoch() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + chrono::Duration::days(10_957)
}

/// A compiled rollup.
#[derive(Debug, Clone)]
pub struct Rollup {
    /// Name.
    pub name: String,
    /// Entity key.
    pub entity: String,
    /// SQL table.
    pub table: String,
    /// Dimension field keys.
    pub dims: Vec<String>,
    /// Time field.
    pub time: Option<Expr>,
    /// Bucket size.
    pub grain: Grain,
    /// Time zone of the buckets (the app's).
    pub tz: Tz,
    /// Base metrics it answers (derived measures expanded).
    pub measures: Vec<String>,
    /// Other entities whose writes change it: (entity, relation field pointing here).
    pub via: Vec<(String, String)>,
    parts: Vec<(String, Part)>,
}

impl Rollup {
    /// The table's value columns: `__n` (records) then one per part.
    pub fn value_columns(&self) -> Vec<String> {
        let mut v = vec!["__n".to_owned()];
        v.extend((0..self.parts.len()).map(|i| format!("__m{i}")));
        v
    }

    fn col(&self, metric: &str, part: &Part) -> String {
        let i = self
            .parts
            .iter()
            .position(|(m, p)| m == metric && p == part)
            .expect("rollup part");
        format!("t.\"__m{i}\"")
    }
}

/// The rollup table of `name` in `app`.
pub fn table_name(app: &str, name: &str) -> String {
    format!("rollup__{app}__{name}")
}

fn parts_of(app: &App, m: &Metric) -> std::result::Result<Vec<Part>, String> {
    Ok(match &m.kind {
        Kind::Aggregate { agg: Agg::Count, .. } => vec![Part::N],
        Kind::Aggregate {
            agg: Agg::Sum | Agg::Avg,
            ..
        } => vec![Part::N, Part::Sum, Part::NonNull],
        Kind::Aggregate { agg, .. } => {
            return Err(format!(
                "`{}` is a {} ({agg:?}), which cannot be added up from parts; a rollup holds counts, sums, averages, conversions and funnels",
                m.name, m.type_name
            ))
        }
        Kind::Conversion {
            exclude_immature: true,
            ..
        } => {
            return Err(format!(
                "`{}` leaves out records whose window is still open, which changes with the clock, not with writes",
                m.name
            ))
        }
        Kind::Conversion { .. } => vec![Part::N, Part::Num],
        Kind::Funnel { stages, .. } => {
            let mut v = vec![Part::N];
            v.extend((0..stages.len()).map(Part::Stage));
            v
        }
        Kind::TimeInStage { agg: Agg::Avg, .. } => {
            let mut v = vec![Part::N];
            for i in 0..crate::engine::metric_stages(app, m).len() {
                v.extend([
                    Part::Entered(i),
                    Part::Done(i),
                    Part::Current(i),
                    Part::Since(i),
                ]);
            }
            v
        }
        Kind::TimeInStage { .. } => {
            return Err(format!(
                "`{}` is a percentile of days in stage, which cannot be added up from parts (an average can)",
                m.name
            ))
        }
        Kind::Derived { .. } => vec![],
    })
}

/// Compile the declared rollups against the compiled metrics; problems carry JSON paths.
pub(crate) fn compile(
    app: &App,
    metrics: &BTreeMap<String, Metric>,
    defs: &[(String, String, RollupDef)],
) -> (BTreeMap<String, Rollup>, Vec<Problem>) {
    let mut out = BTreeMap::new();
    let mut problems = vec![];
    let tz: Tz = app.def.timezone.parse().unwrap_or(chrono_tz::UTC);
    let err = |p: String, msg: String| Problem::new(p, "invalid_rollup", msg);
    for (name, path, def) in defs {
        let before = problems.len();
        let table = table_name(&app.key, name);
        if table.len() > 63 {
            problems.push(err(
                path.clone(),
                format!(
                    "the rollup's table `{table}` is longer than 63 characters; use a shorter name"
                ),
            ));
        }
        let Ok(e) = app.entity(&def.entity) else {
            problems.push(Problem::new(
                format!("{path}/entity"),
                "unknown_entity",
                format!("`{}` is not an entity of this app", def.entity),
            ));
            continue;
        };
        let d = dialect::of(Backend::Sqlite);
        let mut ctx = Ctx::new(app, e, d);
        // A summary field changes with another entity's writes, which do not reach this
        // rollup: a rollup that read one would go stale.
        let summary_read = |sql: &str| -> Option<String> {
            e.fields
                .iter()
                .filter(|f| f.ty == trellis_form::def::FieldType::Summary)
                .find(|f| sql.contains(&format!("t.{}", quote(&f.key))))
                .map(|f| format!("`{}` is a summary field, kept by the writes of `{}`, which do not reach a rollup of {}; it would go stale", f.key, f.def.summary.as_ref().map(|s| s.entity.as_str()).unwrap_or_default(), e.label))
        };
        for (i, dim) in def.dimensions.iter().enumerate() {
            let p = format!("{path}/dimensions/{i}");
            match dimension(&mut ctx, dim) {
                Ok(t) if summary_read(&t.sql).is_some() => {
                    problems.push(err(p, summary_read(&t.sql).unwrap_or_default()))
                }
                Ok(t) if t.base_column && t.sql == format!("t.{}", quote(dim)) => {}
                Ok(_) => problems.push(err(p, format!("`{dim}` is not a field of {} itself; a rollup keeps its own fields only (a related record's value would go stale when that record changes)", e.label))),
                Err(msg) => problems.push(Problem::new(p, "unknown_field", msg)),
            }
            if def.dimensions[..i].contains(dim) {
                problems.push(Problem::new(
                    format!("{path}/dimensions/{i}"),
                    "duplicate",
                    format!("`{dim}` is listed twice"),
                ));
            }
        }
        let time = match &def.time {
            None => None,
            Some(t) => match crate::expr::parse(t) {
                Ok(x @ (Expr::Path(_) | Expr::Call(..))) => {
                    let mut sql = Sql::default();
                    match ctx.lower(&x, &mut sql) {
                        Ok(l) if summary_read(&l.sql).is_some() => {
                            problems.push(err(
                                format!("{path}/time"),
                                summary_read(&l.sql).unwrap_or_default(),
                            ));
                            None
                        }
                        Ok(l)
                            if l.base_column
                                && matches!(l.kind, ColKind::Date | ColKind::DateTime) =>
                        {
                            Some(x)
                        }
                        Ok(_) => {
                            problems.push(err(
                                format!("{path}/time"),
                                format!("`{t}` is not a date or date-time field of {}", e.label),
                            ));
                            None
                        }
                        Err(msg) => {
                            problems.push(Problem::new(
                                format!("{path}/time"),
                                "unknown_field",
                                msg,
                            ));
                            None
                        }
                    }
                }
                _ => {
                    problems.push(Problem::new(
                        format!("{path}/time"),
                        "unknown_field",
                        format!("`{t}` is not a field name"),
                    ));
                    None
                }
            },
        };
        let grain = match def.grain.as_deref() {
            None => Grain::Day,
            Some(g) => match Grain::parse(g, 1) {
                Some(g) => g,
                None => {
                    problems.push(err(
                        format!("{path}/grain"),
                        format!("`{g}` is not a grain; use day, week, month, quarter or year"),
                    ));
                    Grain::Day
                }
            },
        };
        if def.grain.is_some() && def.time.is_none() {
            problems.push(err(
                format!("{path}/grain"),
                "a grain needs a `time` field".into(),
            ));
        }
        if def.measures.is_empty() {
            problems.push(Problem::new(
                format!("{path}/measures"),
                "required",
                "name at least one metric the rollup answers",
            ));
        }
        let mut measures: Vec<String> = vec![];
        let mut parts: Vec<(String, Part)> = vec![];
        let mut via: Vec<(String, String)> = vec![];
        for (i, mname) in def.measures.iter().enumerate() {
            let p = format!("{path}/measures/{i}");
            let Some(m) = metrics.get(mname) else {
                problems.push(Problem::new(
                    p,
                    "unknown_metric",
                    format!("`{mname}` is not a metric"),
                ));
                continue;
            };
            let mut base = vec![];
            expand(metrics, m, &mut base);
            for b in base {
                let bm = &metrics[&b];
                if bm.entity.as_deref() != Some(def.entity.as_str()) {
                    problems.push(err(
                        p.clone(),
                        format!(
                            "`{b}` counts {} records, the rollup {}",
                            bm.entity.clone().unwrap_or_default(),
                            def.entity
                        ),
                    ));
                    continue;
                }
                match parts_of(app, bm) {
                    Err(msg) => {
                        problems.push(err(p.clone(), msg));
                        continue;
                    }
                    Ok(ps) => {
                        // Everything the metric reads must be the record's own columns.
                        let mut c = Ctx::new(app, e, d);
                        let mut sql = Sql::default();
                        let mut reads = vec![];
                        if let Some(f) = &bm.filter {
                            reads.push(c.lower(f, &mut sql).map(|l| l.sql));
                        }
                        if let Kind::Aggregate { expr: Some(x), .. } = &bm.kind {
                            reads.push(c.lower(x, &mut sql).map(|l| l.sql));
                        }
                        if let Kind::Conversion { when: Some(w), .. } = &bm.kind {
                            reads.push(c.lower(w, &mut sql).map(|l| l.sql));
                        }
                        if let Some(t) = &bm.time {
                            reads.push(c.lower(t, &mut sql).map(|l| l.sql));
                        }
                        if let Some(Err(msg)) = reads.iter().find(|r| r.is_err()) {
                            problems.push(err(p.clone(), msg.clone()));
                            continue;
                        }
                        if let Some(msg) = reads.iter().flatten().find_map(|s| summary_read(s)) {
                            problems.push(err(p.clone(), msg));
                            continue;
                        }
                        if !c.joins.is_empty() {
                            problems.push(err(p.clone(), format!("`{b}` reads a related record through a relation; a rollup would go stale when that record changes")));
                            continue;
                        }
                        if let Kind::Conversion {
                            related: Some((ce, field, _)),
                            ..
                        } = &bm.kind
                        {
                            if !via.contains(&(ce.clone(), field.clone())) {
                                via.push((ce.clone(), field.clone()));
                            }
                        }
                        if !measures.contains(&b) {
                            measures.push(b.clone());
                            parts.extend(ps.into_iter().map(|x| (b.clone(), x)));
                        }
                    }
                }
            }
        }
        if problems.len() == before {
            out.insert(
                name.clone(),
                Rollup {
                    name: name.clone(),
                    entity: def.entity.clone(),
                    table,
                    dims: def.dimensions.clone(),
                    time,
                    grain,
                    tz,
                    measures,
                    via,
                    parts,
                },
            );
        }
    }
    (out, problems)
}

fn expand(metrics: &BTreeMap<String, Metric>, m: &Metric, out: &mut Vec<String>) {
    match &m.kind {
        Kind::Derived { needs, .. } => {
            for n in needs {
                if let Some(x) = metrics.get(n) {
                    expand(metrics, x, out);
                }
            }
        }
        _ => {
            if !out.contains(&m.name) {
                out.push(m.name.clone());
            }
        }
    }
}

/// Per record, the SQL of one part (over the entity table `t`).
fn part_sql(app: &App, ctx: &mut Ctx, sql: &mut Sql, m: &Metric, part: &Part) -> Result<String> {
    let internal = |msg: String| FormError::Internal(format!("rollup part of `{}`: {msg}", m.name));
    let d = ctx.d;
    let filter = match &m.filter {
        Some(f) => Some(ctx.lower(f, sql).map_err(internal)?.sql),
        None => None,
    };
    let when = |c: String| match &filter {
        Some(f) => format!("CASE WHEN ({f}) AND ({c}) THEN 1 ELSE 0 END"),
        None => format!("CASE WHEN {c} THEN 1 ELSE 0 END"),
    };
    Ok(match part {
        Part::N => match &filter {
            Some(f) => format!("CASE WHEN {f} THEN 1 ELSE 0 END"),
            None => "1".into(),
        },
        Part::Sum | Part::NonNull => {
            let Kind::Aggregate { expr, .. } = &m.kind else {
                return Err(internal("not an aggregate".into()));
            };
            let x = match expr {
                Some(x) => ctx.lower(x, sql).map_err(internal)?.sql,
                None => "1".into(),
            };
            if *part == Part::NonNull {
                when(format!("{x} IS NOT NULL"))
            } else {
                match &filter {
                    Some(f) => format!("CASE WHEN {f} THEN {x} END"),
                    None => x,
                }
            }
        }
        Part::Num => {
            let Kind::Conversion {
                related, when: w, ..
            } = &m.kind
            else {
                return Err(internal("not a conversion".into()));
            };
            match (related, w) {
                (Some((ce, via, within)), _) => {
                    // As the base statement: related records created at or after the base
                    // record's time anchor (the metric's own; a query that moves the anchor is
                    // answered from the base tables).
                    let base_time = match &m.time {
                        Some(x) => ctx.lower(x, sql).map_err(internal)?.sql,
                        None => "t.\"created_at\"".into(),
                    };
                    when(related_exists(app, d, sql, ce, via, *within, &base_time)?)
                }
                (None, Some(w)) => when(ctx.lower(w, sql).map_err(internal)?.sql),
                (None, None) => "0".into(),
            }
        }
        Part::Entered(i) | Part::Done(i) | Part::Current(i) | Part::Since(i) => {
            let Kind::TimeInStage { stage_field, .. } = &m.kind else {
                return Err(internal("not time in stage".into()));
            };
            let st = &crate::engine::metric_stages(app, m)[*i];
            let e_col = format!("t.{}", quote(&stage_entered_column(stage_field, st)));
            let d_col = format!("t.{}", quote(&stage_days_column(stage_field, st)));
            let changed = format!("t.{}", quote(&stage_changed_column(stage_field)));
            let sp = sql.param(Value::Text(st.clone()));
            let now_here = format!("t.{} = {sp}", quote(stage_field));
            let f = filter
                .clone()
                .unwrap_or_else(|| d.bool_lit(true).to_owned());
            match part {
                Part::Entered(_) => when(format!("{e_col} IS NOT NULL")),
                Part::Done(_) => format!(
                    "CASE WHEN ({f}) AND {e_col} IS NOT NULL THEN {} ELSE 0 END",
                    d.real(&format!("COALESCE({d_col}, 0)"))
                ),
                Part::Current(_) => when(format!("{now_here} AND {e_col} IS NOT NULL")),
                _ => {
                    let epoch = sql.param(Value::DateTime(epoch()));
                    format!(
                        "CASE WHEN ({f}) AND {now_here} AND {e_col} IS NOT NULL THEN {} ELSE 0 END",
                        d.days_between(&epoch, &changed)
                    )
                }
            }
        }
        Part::Stage(i) => {
            let Kind::Funnel {
                stage_field,
                stages,
                ordered,
            } = &m.kind
            else {
                return Err(internal("not a funnel".into()));
            };
            when(funnel_cond(stage_field, stages, *ordered, *i))
        }
    })
}

/// The statement that adds the contribution of records to the rollup: of the records whose
/// ids are in `$2` (with sign `$1`) when `filtered`, else of every record (a rebuild).
fn contribution(
    app: &App,
    reports: &Reports,
    r: &Rollup,
    backend: Backend,
    filtered: bool,
) -> Result<Sql> {
    let d = dialect::of(backend);
    let e = app.entity(&r.entity)?;
    let mut sql = Sql::default();
    let sign = sql.param(Value::Int(1));
    let ids = filtered.then(|| sql.param(Value::Text("[]".into())));
    let mut ctx = Ctx::new(app, e, d);
    let mut inner: Vec<String> = vec![];
    let mut keys: Vec<String> = vec![];
    for dim in &r.dims {
        let t = dimension(&mut ctx, dim).map_err(FormError::Internal)?;
        inner.push(format!("{} AS {}", t.sql, quote(dim)));
        keys.push(format!("x.{}", quote(dim)));
    }
    if let Some(time) = &r.time {
        let a = ctx.lower(time, &mut sql).map_err(FormError::Internal)?;
        let offs = bucket_offsets(a.kind, r.tz, None);
        let b = d.bucket(&mut sql, &a.sql, a.kind, r.grain, &offs);
        inner.push(format!("{b} AS \"__bucket\""));
        keys.push("x.\"__bucket\"".into());
    }
    inner.push("1 AS \"__n\"".into());
    let mut sums = vec![format!("CAST({sign} AS BIGINT) * COUNT(*)")];
    for (i, (mname, part)) in r.parts.iter().enumerate() {
        let m = &reports.metrics[mname];
        let s = part_sql(app, &mut ctx, &mut sql, m, part)?;
        inner.push(format!("{s} AS \"__m{i}\""));
        sums.push(format!(
            "CAST({sign} AS BIGINT) * COALESCE(SUM(x.\"__m{i}\"), 0)"
        ));
    }
    let where_ids = match &ids {
        Some(p) => format!(" WHERE {}", d.ids_in("t.\"id\"", p)),
        None => String::new(),
    };
    let key = d.json_key(&keys);
    let mut cols: Vec<String> = vec!["\"__key\"".into()];
    cols.extend(r.dims.iter().map(|x| quote(x)));
    if r.time.is_some() {
        cols.push("\"__bucket\"".into());
    }
    cols.push("\"__n\"".into());
    cols.extend((0..r.parts.len()).map(|i| format!("\"__m{i}\"")));
    let mut select = vec![key];
    select.extend(keys.iter().cloned());
    select.extend(sums);
    let group = if keys.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {}", keys.join(", "))
    };
    let table = quote(&r.table);
    sql.text = format!(
        "INSERT INTO {table} ({}) SELECT {} FROM (SELECT {} FROM {}{where_ids}) x WHERE 1 = 1{group}",
        cols.join(", "),
        select.join(", "),
        inner.join(", "),
        ctx.from_clause(),
    );
    if filtered {
        let upd: Vec<String> = cols[1 + r.dims.len() + usize::from(r.time.is_some())..]
            .iter()
            .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
            .collect();
        sql.text.push_str(&format!(
            " ON CONFLICT (\"__key\") DO UPDATE SET {}",
            upd.join(", ")
        ));
    }
    Ok(sql)
}

/// The table's DDL: dimension columns typed as the entity's, the bucket as a local date text.
fn ddl(app: &App, r: &Rollup, backend: Backend) -> Result<Vec<String>> {
    let e = app.entity(&r.entity)?;
    let mut ctx = Ctx::new(app, e, dialect::of(backend));
    let mut cols = vec!["\"__key\" TEXT PRIMARY KEY".to_owned()];
    for dim in &r.dims {
        let t = dimension(&mut ctx, dim).map_err(FormError::Internal)?;
        cols.push(format!("{} {}", quote(dim), backend.column_type(t.kind)));
    }
    if r.time.is_some() {
        cols.push("\"__bucket\" TEXT".into());
    }
    cols.push("\"__n\" NUMERIC NOT NULL".into());
    for i in 0..r.parts.len() {
        cols.push(format!("\"__m{i}\" NUMERIC NOT NULL"));
    }
    Ok(vec![
        format!("DROP TABLE IF EXISTS {}", quote(&r.table)),
        format!("CREATE TABLE {} ({})", quote(&r.table), cols.join(", ")),
    ])
}

/// The maintenance statements of every rollup of the app, for the form engine's write path.
pub fn maintenance(app: &App, reports: &Reports, backend: Backend) -> Result<Vec<Maintain>> {
    let mut out = vec![];
    for r in reports.rollups.values() {
        let sql = contribution(app, reports, r, backend, true)?;
        let table = app.entity(&r.entity)?.table.clone();
        out.push(Maintain {
            rollup: r.name.clone(),
            entity: r.entity.clone(),
            table: table.clone(),
            via: None,
            sql: sql.clone(),
        });
        for (other, field) in &r.via {
            out.push(Maintain {
                rollup: r.name.clone(),
                entity: other.clone(),
                table: table.clone(),
                via: Some(field.clone()),
                sql: sql.clone(),
            });
        }
    }
    Ok(out)
}

/// Compile the app's reports and hand the rollups' statements to the form engine, so writes
/// keep them fresh. Every writer calls this (or [`prepare`]) before it writes.
pub fn attach(app: &App, reports: &Reports, backend: Backend) -> Result<()> {
    app.attach_rollups(maintenance(app, reports, backend)?);
    Ok(())
}

/// What a rebuild did.
#[derive(Debug, Clone, Serialize)]
pub struct Rebuilt {
    /// Rollup name.
    pub rollup: String,
    /// Rows (buckets) it holds now.
    pub rows: i64,
    /// Records it counts.
    pub records: i64,
}

/// Recompute rollups from the base tables, each in its own transaction (all of the app's when
/// `only` is None).
pub async fn rebuild(
    db: &Db,
    app: &App,
    reports: &Reports,
    only: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<Rebuilt>> {
    if let Some(n) = only {
        if !reports.rollups.contains_key(n) {
            return Err(FormError::Query(vec![Problem::new(
                "/rollup",
                "unknown_rollup",
                format!(
                    "`{n}` is not a rollup of app `{}`; it has: {}.",
                    app.key,
                    reports
                        .rollups
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )]));
        }
    }
    let mut out = vec![];
    for r in reports.rollups.values() {
        if only.is_some_and(|n| n != r.name) {
            continue;
        }
        let mut tx = db.begin().await?;
        for s in ddl(app, r, db.backend())? {
            tx.execute(&Sql::new(s)).await?;
        }
        tx.execute(&contribution(app, reports, r, db.backend(), false)?)
            .await?;
        let signature = signature(app, reports, r, db.backend())?;
        let mut del = Sql::new("DELETE FROM \"rollups\" WHERE \"app\" = ");
        del.bind(Value::Text(app.key.clone()))
            .push(" AND \"name\" = ")
            .bind(Value::Text(r.name.clone()));
        tx.execute(&del).await?;
        let mut ins = Sql::new(
            "INSERT INTO \"rollups\" (\"app\", \"name\", \"signature\", \"built_at\") VALUES (",
        );
        ins.bind(Value::Text(app.key.clone()))
            .push(", ")
            .bind(Value::Text(r.name.clone()))
            .push(", ")
            .bind(Value::Text(signature))
            .push(", ")
            .bind(Value::DateTime(now))
            .push(")");
        tx.execute(&ins).await?;
        let count = Sql::new(format!(
            "SELECT COUNT(*), CAST(COALESCE(SUM(\"__n\"), 0) AS BIGINT) FROM {}",
            quote(&r.table)
        ));
        let row = tx
            .fetch_all(&count, &[ColKind::Int, ColKind::Int])
            .await?
            .pop()
            .unwrap_or_default();
        tx.commit().await?;
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(i)) => *i,
            _ => 0,
        };
        out.push(Rebuilt {
            rollup: r.name.clone(),
            rows: int(row.first()),
            records: int(row.get(1)),
        });
    }
    Ok(out)
}

fn signature(app: &App, reports: &Reports, r: &Rollup, backend: Backend) -> Result<String> {
    // The app version too: a migration's data steps (a default filled into a field made
    // required) change rows without the write path, so a new version rebuilds.
    let mut s = format!("-- version {}\n", app.version);
    s.push_str(&ddl(app, r, backend)?.join(";\n"));
    let c = contribution(app, reports, r, backend, false)?;
    s.push_str(";\n");
    s.push_str(&c.text);
    s.push_str(&format!("\n{:?}", c.params));
    Ok(s)
}

/// Make the database match the declared rollups: build the new or changed ones (their
/// definition differs from the one they were built with), drop the ones no longer declared.
/// Returns the rollups it built.
pub async fn ensure(
    db: &Db,
    app: &App,
    reports: &Reports,
    now: DateTime<Utc>,
) -> Result<Vec<Rebuilt>> {
    let mut q = Sql::new("SELECT \"name\", \"signature\" FROM \"rollups\" WHERE \"app\" = ");
    q.bind(Value::Text(app.key.clone()));
    let built: BTreeMap<String, String> = db
        .fetch_all(&q, &[ColKind::Text, ColKind::Text])
        .await?
        .into_iter()
        .filter_map(|r| match (&r[0], &r[1]) {
            (Value::Text(n), Value::Text(s)) => Some((n.clone(), s.clone())),
            _ => None,
        })
        .collect();
    let mut out = vec![];
    for r in reports.rollups.values() {
        if built.get(&r.name) != Some(&signature(app, reports, r, db.backend())?) {
            out.extend(rebuild(db, app, reports, Some(&r.name), now).await?);
        }
    }
    for name in built.keys().filter(|n| !reports.rollups.contains_key(*n)) {
        let mut tx = db.begin().await?;
        tx.execute(&Sql::new(format!(
            "DROP TABLE IF EXISTS {}",
            quote(&table_name(&app.key, name))
        )))
        .await?;
        let mut del = Sql::new("DELETE FROM \"rollups\" WHERE \"app\" = ");
        del.bind(Value::Text(app.key.clone()))
            .push(" AND \"name\" = ")
            .bind(Value::Text(name.clone()));
        tx.execute(&del).await?;
        tx.commit().await?;
    }
    Ok(out)
}

/// Whether a rollup grain's buckets tile a query grain's buckets.
fn tiles(rollup: Grain, query: Grain) -> bool {
    match (rollup, query) {
        (Grain::Day, _) => true,
        (Grain::Week(a), Grain::Week(b)) => a == b,
        (Grain::Month, Grain::Month | Grain::Quarter | Grain::Year) => true,
        (Grain::Quarter, Grain::Quarter | Grain::Year) => true,
        (Grain::Year, Grain::Year) => true,
        _ => false,
    }
}

/// A unit's statement over a rollup: the SQL, its column kinds, its output and the rollup.
pub(crate) type Served = (Sql, Vec<ColKind>, Out, String);

/// The rollup that can answer a unit of a plan exactly, and the statement over it, or None
/// (the base tables answer).
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve(
    app: &App,
    reports: &Reports,
    plan: &Plan,
    unit: &Unit,
    range: Option<(NaiveDate, NaiveDate)>,
    grouped: bool,
    vis: &Visibility,
) -> Result<Option<Served>> {
    // A rollup is trusted only where this app's writes keep it (see [`attach`]).
    let kept = app.rollups.get().is_some_and(|m| !m.is_empty());
    if !kept || !plan.query.use_rollups.unwrap_or(true) || reports.rollups.is_empty() {
        return Ok(None);
    }
    let (entity, time, metrics): (String, Option<Expr>, Vec<String>) = match unit {
        Unit::Aggs {
            entity,
            time,
            metrics,
        } => (entity.clone(), time.clone(), metrics.clone()),
        Unit::Conversion { metric } | Unit::Funnel { metric } => {
            let m = &reports.metrics[metric];
            if matches!(
                m.kind,
                Kind::Conversion {
                    related: Some(_),
                    ..
                }
            ) && anchor_of(plan, m) != m.time
            {
                // The related records are compared with the anchor, which the rollup fixed.
                return Ok(None);
            }
            (
                m.entity.clone().unwrap_or_default(),
                anchor_of(plan, m),
                vec![metric.clone()],
            )
        }
        Unit::TimeInStage { metric } => {
            let m = &reports.metrics[metric];
            if !matches!(m.kind, Kind::TimeInStage { agg: Agg::Avg, .. }) {
                return Ok(None);
            }
            (
                m.entity.clone().unwrap_or_default(),
                anchor_of(plan, m),
                vec![metric.clone()],
            )
        }
        Unit::Window { .. } => return Ok(None),
    };
    let e = app.entity(&entity)?;
    let d = dialect::of(plan.backend);
    let needs_time = range.is_some() || (grouped && plan.grain.is_some());
    // The smallest rollup that fits: without a time range, the coarsest buckets first; then
    // the fewest dimensions.
    let fineness = |r: &Rollup| match (needs_time, &r.time, r.grain) {
        (true, ..) | (false, None, _) => 0,
        (false, Some(_), Grain::Year) => 1,
        (false, Some(_), Grain::Quarter) => 2,
        (false, Some(_), Grain::Month) => 3,
        (false, Some(_), Grain::Week(_)) => 4,
        (false, Some(_), Grain::Day) => 5,
    };
    let mut candidates: Vec<&Rollup> = reports.rollups.values().collect();
    candidates.sort_by_key(|r| (fineness(r), r.dims.len(), r.name.clone()));
    let fits = |r: &Rollup| -> bool {
        if r.entity != entity || !metrics.iter().all(|m| r.measures.contains(m)) {
            return false;
        }
        if needs_time {
            if r.time.is_none() || r.time != time {
                return false;
            }
            if let (true, Some(g)) = (grouped, plan.grain) {
                if !tiles(r.grain, g) {
                    return false;
                }
            }
            if let Some((f, t)) = range {
                if r.grain.start(f) != f || r.grain.start(t) != t {
                    return false;
                }
            }
            let mut c = Ctx::new(app, e, d);
            let kind = time
                .as_ref()
                .and_then(|x| c.lower(x, &mut Sql::default()).ok())
                .map(|t| t.kind);
            if kind != Some(ColKind::Date) && plan.tz != r.tz {
                return false;
            }
        }
        if grouped && !plan.dims.iter().all(|x| r.dims.contains(x)) {
            return false;
        }
        if !plan.query.filters.iter().all(|f| r.dims.contains(&f.field)) {
            return false;
        }
        vis.owners.is_none() || r.dims.iter().any(|x| x == "owner")
    };
    let Some(r) = candidates.into_iter().find(|r| fits(r)) else {
        return Ok(None);
    };
    // The same shape the base-table statement answers with.
    let internal = |m: String| FormError::Internal(m);
    let mut ctx = Ctx::new(app, e, d);
    let mut sql = Sql::default();
    let mut kinds = vec![];
    let mut select: Vec<String> = vec![];
    let mut conds: Vec<String> = vec![];
    if grouped {
        for dname in &plan.dims {
            let t = dimension(&mut ctx, dname).map_err(internal)?;
            kinds.push(t.kind);
            select.push(t.sql);
        }
        if let Some(g) = plan.grain {
            let b = d.bucket(
                &mut sql,
                "t.\"__bucket\"",
                ColKind::Date,
                g,
                // The bucket column holds local dates: no offsets to work out.
                &bucket_offsets(ColKind::Date, r.tz, None),
            );
            kinds.push(ColKind::Text);
            select.push(b);
        }
    }
    let group_n = select.len();
    if let Some((f, t)) = range {
        let lo = sql.param(Value::Text(f.format("%Y-%m-%d").to_string()));
        let hi = sql.param(Value::Text(t.format("%Y-%m-%d").to_string()));
        conds.push(format!("t.\"__bucket\" >= {lo} AND t.\"__bucket\" < {hi}"));
    }
    query_conds(&mut ctx, plan, vis, &mut sql, &mut conds)?;
    if !ctx.joins.is_empty() {
        return Ok(None);
    }
    let sum = |c: String| format!("COALESCE(SUM({c}), 0)");
    let out;
    // Which records make a group appear: the base statement's WHERE.
    let having_col;
    match unit {
        Unit::Aggs { .. } => {
            let shared = matches!(
                metrics.first().map(|n| &reports.metrics[n].filter),
                Some(Some(f)) if metrics.iter().all(|n| reports.metrics[n].filter.as_ref() == Some(f))
            );
            having_col = if shared {
                format!("SUM({})", r.col(&metrics[0], &Part::N))
            } else {
                "SUM(t.\"__n\")".into()
            };
            for name in &metrics {
                let m = &reports.metrics[name];
                let Kind::Aggregate { agg, .. } = &m.kind else {
                    return Ok(None);
                };
                let v = match agg {
                    Agg::Count => sum(r.col(name, &Part::N)),
                    Agg::Sum => format!(
                        "CASE WHEN SUM({}) > 0 THEN SUM({}) END",
                        r.col(name, &Part::NonNull),
                        r.col(name, &Part::Sum)
                    ),
                    Agg::Avg => format!(
                        "{} / NULLIF(SUM({}), 0)",
                        d.real(&format!("SUM({})", r.col(name, &Part::Sum))),
                        r.col(name, &Part::NonNull)
                    ),
                    _ => return Ok(None),
                };
                select.push(d.number(&v));
                kinds.push(ColKind::Decimal);
            }
            out = Out::Values(metrics.clone());
        }
        Unit::Conversion { metric } => {
            having_col = format!("SUM({})", r.col(metric, &Part::N));
            select.push(d.number(&sum(r.col(metric, &Part::Num))));
            select.push(d.number(&sum(r.col(metric, &Part::N))));
            kinds.push(ColKind::Decimal);
            kinds.push(ColKind::Decimal);
            out = Out::Values(vec![format!("{metric}#num"), format!("{metric}#den")]);
        }
        Unit::Funnel { metric } => {
            let Kind::Funnel { stages, .. } = &reports.metrics[metric].kind else {
                return Ok(None);
            };
            having_col = format!("SUM({})", r.col(metric, &Part::N));
            for i in 0..stages.len() {
                select.push(d.number(&sum(r.col(metric, &Part::Stage(i)))));
                kinds.push(ColKind::Decimal);
            }
            out = Out::Stages(stages.clone());
        }
        Unit::TimeInStage { metric } => {
            let m = &reports.metrics[metric];
            let open = crate::engine::metric_stages(app, m);
            // Exact: microseconds since the epoch over the microseconds of a day.
            let micros = (plan.now - epoch()).num_microseconds().unwrap_or_default();
            let now = sql.param(Value::Decimal(
                rust_decimal::Decimal::from(micros)
                    / rust_decimal::Decimal::from(86_400_000_000i64),
            ));
            let mut entered = vec![];
            for i in 0..open.len() {
                let c = |p: Part| r.col(metric, &p);
                select.push(d.number(&format!(
                    "({} + {} * {now} - {}) / NULLIF({}, 0)",
                    d.real(&sum(c(Part::Done(i)))),
                    sum(c(Part::Current(i))),
                    sum(c(Part::Since(i))),
                    sum(c(Part::Entered(i)))
                )));
                kinds.push(ColKind::Decimal);
                entered.push(sum(c(Part::Entered(i))));
            }
            having_col = format!("({})", entered.join(" + "));
            out = Out::StageDays(open);
        }
        Unit::Window { .. } => return Ok(None),
    }
    let (group, having) = if group_n == 0 {
        (String::new(), String::new())
    } else {
        let pos: Vec<String> = (1..=group_n).map(|i| i.to_string()).collect();
        (
            format!(" GROUP BY {}", pos.join(", ")),
            format!(" HAVING {having_col} > 0"),
        )
    };
    let wh = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    sql.text = format!(
        "SELECT {} FROM {} t{wh}{group}{having}",
        select.join(", "),
        quote(&r.table)
    );
    Ok(Some((sql, kinds, out, r.name.clone())))
}

/// Compile the reports and attach the rollups, for a writer outside the server (the CLI).
pub fn prepare(app: &App, backend: Backend) -> Result<Reports> {
    let reports = Reports::compile(app)?;
    attach(app, &reports, backend)?;
    Ok(reports)
}
