//! Planning and running a query: check it, group its metrics into SQL statements (one per entity
//! and time anchor), run them, stitch the rows by dimension values, fill empty buckets, then
//! compute ratios and derived metrics, totals and comparisons.
//!
//! Metrics over different entities are never joined fact to fact: each statement aggregates one
//! entity (with many-to-one joins only) and the rows are merged here by their dimension values.

use crate::dialect;
use crate::expr::{BinOp, Expr, UnOp};
use crate::lower::{Ctx, Ty, Typed};
use crate::model::{Agg, Kind, Metric, Reports};
use crate::query::{DrillQuery, Query};
use crate::time::{self, Grain, Offsets};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::{json, Map, Value as Json};
use std::cmp::Ordering;
use std::collections::HashMap;
use trellis_form::db::{quote, Backend, Db, Sql, Value};
use trellis_form::model::{
    stage_changed_column, stage_days_column, stage_entered_column, App, ColKind,
};
use trellis_form::query::Filter;
use trellis_form::{FormError, Problem, Result};
use uuid::Uuid;

/// Which records the caller may count: `None` is every record, else only records owned by
/// one of these users (the server's policy decides the set).
#[derive(Debug, Clone, Default)]
pub struct Visibility {
    /// Owners whose records count; None means all.
    pub owners: Option<Vec<Uuid>>,
}

/// Largest answer.
pub const MAX_ROWS: u32 = 50_000;

/// A checked query, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Requested metrics, in order.
    pub metrics: Vec<String>,
    /// Every metric needed (requested and their parts).
    pub needed: Vec<String>,
    /// Dimensions.
    pub dims: Vec<String>,
    /// Bucket size.
    pub grain: Option<Grain>,
    /// Local `[from, to)`.
    pub range: Option<(NaiveDate, NaiveDate)>,
    /// Time zone.
    pub tz: Tz,
    /// Anchor override.
    pub anchor: Option<Expr>,
    /// The per-stage metric, when the query is one.
    pub per_stage: Option<String>,
    /// The query.
    pub query: Query,
    /// Engine's now.
    pub now: DateTime<Utc>,
    /// Comparison: how to shift the range back.
    pub compare: Option<Shift>,
    /// Row limit.
    pub limit: usize,
    pub(crate) backend: Backend,
}

/// How a compared period is shifted back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shift {
    /// By calendar months.
    Months(i32),
    /// By days.
    Days(i64),
}

impl Shift {
    fn back(self, d: NaiveDate) -> NaiveDate {
        match self {
            Shift::Months(m) => time::add_months(d, -m),
            Shift::Days(n) => d - Duration::days(n),
        }
    }
}

/// A column of an answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Column {
    /// Name (the row key).
    pub name: String,
    /// `dimension`, `time`, `stage` or `metric`.
    pub role: &'static str,
    /// Display label.
    pub label: String,
}

/// The answer to a query.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    /// Columns, in order.
    pub columns: Vec<Column>,
    /// Rows: column name → value.
    pub rows: Vec<Map<String, Json>>,
    /// Every metric over all rows (computed from the records, never by adding rows up).
    pub totals: Map<String, Json>,
    /// The resolved range, time zone and the engine's now.
    pub meta: Json,
}

fn qerr(path: impl Into<String>, code: &'static str, msg: impl Into<String>) -> FormError {
    FormError::Query(vec![Problem::new(path, code, msg)])
}

/// Check a query against the app's metrics; every problem at once.
pub fn plan(
    app: &App,
    reports: &Reports,
    q: &Query,
    now: DateTime<Utc>,
    backend: Backend,
) -> Result<Plan> {
    let mut problems = vec![];
    let mut metrics = q.metrics.clone();
    if let Some(m) = &q.metric {
        metrics.insert(0, m.clone());
    }
    if metrics.is_empty() {
        problems.push(Problem::new(
            "/metrics",
            "required",
            format!(
                "Name at least one metric; this app has: {}.",
                reports
                    .metrics
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    for (i, m) in metrics.iter().enumerate() {
        if !reports.metrics.contains_key(m) {
            problems.push(Problem::new(
                format!("/metrics/{i}"),
                "unknown_metric",
                format!(
                    "`{m}` is not a metric of this app; use one of: {}.",
                    reports
                        .metrics
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(FormError::Query(problems));
    }
    let mut needed: Vec<String> = vec![];
    fn need(reports: &Reports, name: &str, out: &mut Vec<String>) {
        if out.iter().any(|n| n == name) {
            return;
        }
        out.push(name.to_owned());
        if let Some(Metric {
            kind: Kind::Derived { needs, .. },
            ..
        }) = reports.metrics.get(name)
        {
            for n in needs {
                need(reports, n, out);
            }
        }
    }
    for m in &metrics {
        need(reports, m, &mut needed);
    }
    let per_stage: Vec<&String> = metrics
        .iter()
        .filter(|m| reports.metrics[*m].per_stage())
        .collect();
    let per_stage = match per_stage.as_slice() {
        [] => None,
        [one] if metrics.len() == 1 => Some((*one).clone()),
        _ => {
            problems.push(Problem::new(
                "/metrics",
                "invalid_query",
                "A funnel or time-in-stage metric answers one row per stage; query it on its own.",
            ));
            None
        }
    };
    let tz_name = q
        .timezone
        .clone()
        .unwrap_or_else(|| app.def.timezone.clone());
    let tz: Tz = match tz_name.parse() {
        Ok(t) => t,
        Err(_) => {
            problems.push(Problem::new(
                "/timezone",
                "bad_value",
                format!("`{tz_name}` is not an IANA time zone (like Europe/Berlin)."),
            ));
            chrono_tz::UTC
        }
    };
    let week_start = match q.week_start.as_deref() {
        None | Some("monday") => 1,
        Some("sunday") => 0,
        Some(other) => {
            problems.push(Problem::new(
                "/week_start",
                "bad_value",
                format!("`{other}` is not a week start; use monday or sunday."),
            ));
            1
        }
    };
    let mut grain = None;
    let mut range = None;
    let mut anchor = None;
    if let Some(t) = &q.time {
        if let Some(g) = &t.grain {
            grain = Grain::parse(g, week_start);
            if grain.is_none() {
                problems.push(Problem::new(
                    "/time/grain",
                    "bad_value",
                    format!("`{g}` is not a grain; use day, week, month, quarter or year."),
                ));
            }
        }
        let date = |s: &Option<String>, p: &str, problems: &mut Vec<Problem>| {
            s.as_ref().and_then(|s| {
                let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok();
                if d.is_none() {
                    problems.push(Problem::new(
                        p,
                        "bad_value",
                        format!("`{s}` is not a date (YYYY-MM-DD)."),
                    ));
                }
                d
            })
        };
        let from = date(&t.from, "/time/from", &mut problems);
        let to = date(&t.to, "/time/to", &mut problems);
        match (&t.preset, from, to) {
            (Some(p), None, None) if t.from.is_none() && t.to.is_none() => {
                let today = now.with_timezone(&tz).date_naive();
                range = time::preset(p, today, week_start);
                if range.is_none() {
                    problems.push(Problem::new(
                        "/time/preset",
                        "bad_value",
                        format!(
                            "`{p}` is not a preset; use one of: {}.",
                            time::PRESETS.join(", ")
                        ),
                    ));
                }
            }
            (Some(_), ..) => problems.push(Problem::new(
                "/time/preset",
                "invalid_query",
                "Give either a preset or from/to, not both.",
            )),
            (None, Some(f), Some(t)) if f < t => range = Some((f, t)),
            (None, Some(_), Some(_)) => problems.push(Problem::new(
                "/time/to",
                "bad_value",
                "`to` must be after `from` (the range is [from, to)).",
            )),
            (None, None, None) => {}
            (None, ..) if t.from.is_some() != t.to.is_some() => problems.push(Problem::new(
                if t.from.is_none() {
                    "/time/from"
                } else {
                    "/time/to"
                },
                "required",
                "A range needs both `from` and `to`.",
            )),
            _ => {}
        }
        if let Some(f) = &t.field {
            match crate::expr::parse(f) {
                Ok(e @ Expr::Path(_)) | Ok(e @ Expr::Call(..)) => anchor = Some(e),
                _ => problems.push(Problem::new(
                    "/time/field",
                    "unknown_field",
                    format!("`{f}` is not a field name."),
                )),
            }
        }
    }
    if let Some((f, t)) = range {
        if (t - f).num_days() > 366 * 30 {
            problems.push(Problem::new(
                "/time",
                "bad_value",
                "The range spans more than 30 years.",
            ));
        }
        if let Some(g) = grain {
            if time::buckets(g, f, t).len() > 10_000 {
                problems.push(Problem::new(
                    "/time/grain",
                    "bad_value",
                    "The range has more than 10,000 buckets of this grain; use a coarser grain.",
                ));
            }
        }
    }
    let compare = match q.compare.as_deref() {
        None => None,
        Some(c @ ("previous_period" | "previous_year")) => match range {
            None => {
                problems.push(Problem::new(
                    "/compare",
                    "invalid_query",
                    "A comparison needs a time range (from/to or a preset).",
                ));
                None
            }
            Some((f, t)) => Some(if c == "previous_year" {
                Shift::Months(12)
            } else {
                let months = months_between(f, t);
                match months {
                    Some(m) => Shift::Months(m),
                    None => Shift::Days((t - f).num_days()),
                }
            }),
        },
        Some(other) => {
            problems.push(Problem::new(
                "/compare",
                "bad_value",
                format!("`{other}` is not a comparison; use previous_period or previous_year."),
            ));
            None
        }
    };
    if let Some(f) = &q.flag {
        if per_stage.is_some() {
            problems.push(Problem::new(
                "/flag",
                "invalid_query",
                "A flag rule needs a metric with one value per row; a funnel or time in stage is compared column by column (`entered_change_pct`, …) without a flag.",
            ));
        }
        if compare.is_none() {
            problems.push(Problem::new(
                "/flag",
                "invalid_query",
                "A flag rule needs `compare`.",
            ));
        }
        if !metrics.contains(&f.metric) {
            problems.push(Problem::new(
                "/flag/metric",
                "unknown_metric",
                format!("`{}` is not one of the queried metrics.", f.metric),
            ));
        }
    }
    let limit = q.limit.unwrap_or(10_000);
    if limit == 0 || limit > MAX_ROWS {
        problems.push(Problem::new(
            "/limit",
            "out_of_range",
            format!("limit must be between 1 and {MAX_ROWS}."),
        ));
    }
    let plan = Plan {
        metrics: metrics.clone(),
        needed: needed.clone(),
        dims: q.group_by.clone(),
        grain,
        range,
        tz,
        anchor,
        per_stage,
        query: q.clone(),
        now,
        compare,
        limit: limit as usize,
        backend,
    };
    // Every dimension, filter and anchor must resolve in every base metric's entity.
    for name in &needed {
        let m = &reports.metrics[name];
        let Some(ent) = &m.entity else { continue };
        let e = app.entity(ent)?;
        let mut ctx = Ctx::new(app, e, dialect::of(backend));
        let mut sql = Sql::default();
        for (i, d) in q.group_by.iter().enumerate() {
            if let Err(msg) = dimension(&mut ctx, d) {
                problems.push(Problem::new(
                    format!("/group_by/{i}"),
                    "unknown_field",
                    format!("{msg} (metric `{name}`)."),
                ));
            }
        }
        if let Some(a) = &plan.anchor {
            match ctx.lower(a, &mut sql) {
                Ok(t) if t.base_column && matches!(t.ty, Ty::Date | Ty::DateTime) => {
                    if m.snapshot && Some(a) != m.time.as_ref() {
                        problems.push(Problem::new(
                            "/time/field",
                            "invalid_query",
                            format!("`{name}` is a snapshot over its own time field and cannot be bucketed by another one; leave out time.field."),
                        ));
                    }
                }
                Ok(_) => problems.push(Problem::new(
                    "/time/field",
                    "unknown_field",
                    format!(
                        "the time field must be a date or date-time field of {} (metric `{name}`).",
                        e.label
                    ),
                )),
                Err(msg) => problems.push(Problem::new(
                    "/time/field",
                    "unknown_field",
                    format!("{msg} (metric `{name}`)."),
                )),
            }
        }
        for (i, f) in q.filters.iter().enumerate() {
            if let Err(p) = filter_sql(&mut ctx, f, &mut sql, &format!("/filters/{i}")) {
                let mut p = p;
                p.message = format!("{} (metric `{name}`)", p.message);
                problems.push(p);
            }
        }
    }
    let cols = plan_columns(reports, &plan);
    for (i, s) in q.sort.iter().enumerate() {
        let n = s.strip_prefix('-').unwrap_or(s);
        if !cols.iter().any(|c| c.name == n) {
            problems.push(Problem::new(
                format!("/sort/{i}"),
                "unknown_field",
                format!(
                    "cannot sort by `{n}`; sort by one of: {}.",
                    cols.iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    problems.dedup();
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(FormError::Query(problems))
    }
}

fn months_between(f: NaiveDate, t: NaiveDate) -> Option<i32> {
    use chrono::Datelike;
    if f.day() != 1 || t.day() != 1 {
        return None;
    }
    Some((t.year() * 12 + t.month() as i32) - (f.year() * 12 + f.month() as i32))
}

pub(crate) fn dimension(ctx: &mut Ctx, d: &str) -> std::result::Result<Typed, String> {
    match crate::expr::parse(d) {
        Ok(Expr::Path(p)) => {
            let t = ctx.path(&p)?;
            if t.ty == Ty::Json {
                return Err(format!("`{d}` holds a list and cannot be a dimension"));
            }
            Ok(t)
        }
        _ => Err(format!("`{d}` is not a field name")),
    }
}

/// One filter of a query as SQL; values bound, options checked, LIKE escaped.
pub(crate) fn filter_sql(
    ctx: &mut Ctx,
    f: &Filter,
    sql: &mut Sql,
    path: &str,
) -> std::result::Result<String, Problem> {
    let col = match crate::expr::parse(&f.field) {
        Ok(Expr::Path(p)) => ctx
            .path(&p)
            .map_err(|m| Problem::new(format!("{path}/field"), "unknown_field", m))?,
        _ => {
            return Err(Problem::new(
                format!("{path}/field"),
                "unknown_field",
                format!("`{}` is not a field name", f.field),
            ))
        }
    };
    let vpath = format!("{path}/value");
    let c = col.sql.clone();
    let operand = |v: &Json, p: &str, sql: &mut Sql| -> std::result::Result<String, Problem> {
        to_value(&col, v)
            .map(|v| sql.param(v))
            .map_err(|m| Problem::new(p, "bad_value", m))
    };
    Ok(match f.op.as_str() {
        "is_null" => match f.value {
            Json::Bool(true) | Json::Null => format!("{c} IS NULL"),
            Json::Bool(false) => format!("{c} IS NOT NULL"),
            _ => return Err(Problem::new(vpath, "bad_value", "is_null takes true or false")),
        },
        "eq" | "ne" | "lt" | "lte" | "gt" | "gte" => {
            if col.ty == Ty::Json {
                return Err(Problem::new(format!("{path}/op"), "bad_op", format!("`{}` holds a list; use contains or is_null", f.field)));
            }
            let p = operand(&f.value, &vpath, sql)?;
            let op = match f.op.as_str() {
                "eq" => "=",
                "ne" => "IS DISTINCT FROM",
                "lt" => "<",
                "lte" => "<=",
                "gt" => ">",
                _ => ">=",
            };
            format!("{c} {op} {p}")
        }
        "in" => {
            let items = f
                .value
                .as_array()
                .filter(|a| !a.is_empty() && a.len() <= 1000)
                .ok_or_else(|| Problem::new(&vpath, "bad_value", "in takes a list of 1 to 1000 values"))?;
            let mut ps = vec![];
            for (j, item) in items.iter().enumerate() {
                ps.push(operand(item, &format!("{vpath}/{j}"), sql)?);
            }
            format!("{c} IN ({})", ps.join(", "))
        }
        "between" => {
            let [lo, hi] = f
                .value
                .as_array()
                .and_then(|a| <&[Json; 2]>::try_from(a.as_slice()).ok())
                .ok_or_else(|| Problem::new(&vpath, "bad_value", "between takes [low, high]"))?;
            let a = operand(lo, &format!("{vpath}/0"), sql)?;
            let b = operand(hi, &format!("{vpath}/1"), sql)?;
            format!("{c} BETWEEN {a} AND {b}")
        }
        "contains" => match (&f.value, col.ty) {
            (Json::String(s), Ty::Text) => {
                let escaped = s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
                let p = sql.param(Value::Text(format!("%{escaped}%")));
                format!("{c} {} {p} ESCAPE '\\'", ctx.d.backend().ilike())
            }
            (Json::String(s), Ty::Json) => {
                let p = sql.param(Value::Text(s.clone()));
                ctx.d.backend().json_array_contains(&c, &p)
            }
            _ => return Err(Problem::new(format!("{path}/op"), "bad_op", "contains takes text and works on text and multiselect fields")),
        },
        other => {
            return Err(Problem::new(
                format!("{path}/op"),
                "bad_op",
                format!("`{other}` is not an operator; use eq, ne, in, lt, lte, gt, gte, between, contains or is_null"),
            ))
        }
    })
}

/// A JSON value as a bound value of a column's kind.
fn to_value(col: &Typed, v: &Json) -> std::result::Result<Value, String> {
    let bad = || format!("`{v}` is not a valid value here");
    if v.is_null() {
        return Err("compare with null using the is_null operator".into());
    }
    if let (Some((label, allowed)), Some(s)) = (&col.options, v.as_str()) {
        if !allowed.iter().any(|a| a == s) {
            return Err(format!(
                "`{s}` is not a value of {label}; use one of: {}",
                allowed.join(", ")
            ));
        }
    }
    Ok(match col.kind {
        ColKind::Text => Value::Text(v.as_str().ok_or_else(bad)?.to_owned()),
        ColKind::Int => Value::Int(v.as_i64().ok_or_else(bad)?),
        ColKind::Decimal => {
            let text = match v {
                Json::Number(n) => n.to_string(),
                Json::String(s) => s.clone(),
                _ => return Err(bad()),
            };
            Value::Decimal(text.parse().map_err(|_| bad())?)
        }
        ColKind::Bool => Value::Bool(v.as_bool().ok_or_else(bad)?),
        ColKind::Uuid => Value::Uuid(
            v.as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(bad)?,
        ),
        ColKind::Date => Value::Date(
            v.as_str()
                .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                .ok_or_else(bad)?,
        ),
        ColKind::DateTime => Value::DateTime(trellis_form::values::datetime(v).ok_or_else(bad)?),
        ColKind::Json => return Err(bad()),
    })
}

/// The columns an answer will have.
fn plan_columns(reports: &Reports, plan: &Plan) -> Vec<Column> {
    let mut cols: Vec<Column> = plan
        .dims
        .iter()
        .map(|d| Column {
            name: d.clone(),
            role: "dimension",
            label: d.clone(),
        })
        .collect();
    if plan.grain.is_some() {
        cols.push(Column {
            name: "period".into(),
            role: "time",
            label: "period".into(),
        });
    }
    if let Some(ps) = &plan.per_stage {
        cols.push(Column {
            name: "stage".into(),
            role: "stage",
            label: "stage".into(),
        });
        let m = &reports.metrics[ps];
        let names: &[&str] = match m.kind {
            Kind::Funnel { .. } => &["entered", "advanced", "step_rate", "cumulative_rate"],
            _ => &["days"],
        };
        for n in names {
            metric_columns(&mut cols, plan, n, &format!("{} {n}", m.label));
        }
        return cols;
    }
    for m in &plan.metrics {
        metric_columns(&mut cols, plan, m, &reports.metrics[m].label);
    }
    if plan.query.flag.is_some() {
        cols.push(Column {
            name: "flag".into(),
            role: "metric",
            label: "flag".into(),
        });
    }
    cols
}

/// A metric column and, with `compare`, its `_previous`, `_change` and `_change_pct` columns.
fn metric_columns(cols: &mut Vec<Column>, plan: &Plan, name: &str, label: &str) {
    cols.push(Column {
        name: name.into(),
        role: "metric",
        label: label.into(),
    });
    if plan.compare.is_some() {
        for (suffix, what) in [
            ("previous", "previous"),
            ("change", "change"),
            ("change_pct", "change %"),
        ] {
            cols.push(Column {
                name: format!("{name}_{suffix}"),
                role: "metric",
                label: format!("{label} ({what})"),
            });
        }
    }
}

/// The change from `previous` to `current`, and in percent of |previous| (null when previous
/// is 0 or either is empty).
fn change(current: Option<f64>, previous: Option<f64>) -> (Option<f64>, Option<f64>) {
    let c = current.zip(previous).map(|(a, b)| a - b);
    let pct = match (c, previous) {
        (Some(c), Some(b)) if b != 0.0 => Some(c / b.abs() * 100.0),
        _ => None,
    };
    (c, pct)
}

/// A key of merged rows: the dimension values, the period, the stage.
type Key = Vec<Json>;

/// Values of one merged row, by internal column name.
type Vals = HashMap<String, Option<f64>>;

struct Rows {
    order: Vec<Key>,
    map: HashMap<String, (Key, Vals)>,
}

impl Rows {
    fn new() -> Self {
        Rows {
            order: vec![],
            map: HashMap::new(),
        }
    }
    fn entry(&mut self, key: Key) -> &mut Vals {
        let k = serde_json::to_string(&key).expect("json");
        if !self.map.contains_key(&k) {
            self.order.push(key.clone());
        }
        &mut self.map.entry(k).or_insert_with(|| (key, HashMap::new())).1
    }
    fn get(&self, key: &Key) -> Option<&Vals> {
        self.map
            .get(&serde_json::to_string(key).expect("json"))
            .map(|(_, v)| v)
    }
}

/// The SQL statements of a plan, for tests and `explain`.
pub fn statements(app: &App, reports: &Reports, plan: &Plan, vis: &Visibility) -> Result<Vec<Sql>> {
    let range = plan.range;
    let units = units(reports, plan);
    let mut out = vec![];
    for u in &units {
        out.push(unit_sql(app, reports, plan, u, range, true, vis, None)?.0);
    }
    Ok(out)
}

/// Run a checked query.
pub async fn run(
    db: &Db,
    app: &App,
    reports: &Reports,
    plan: &Plan,
    vis: &Visibility,
) -> Result<Answer> {
    // Compared "to date": a period still under way is cut at today, and the previous period at
    // the same elapsed length.
    let mut range = plan.range;
    if let (true, Some((f, t))) = (plan.query.compare_to_date && plan.compare.is_some(), range) {
        let tomorrow = plan.now.with_timezone(&plan.tz).date_naive() + Duration::days(1);
        if tomorrow > f && tomorrow < t {
            range = Some((f, tomorrow));
        }
    }
    // The rows, the totals (a statement without grouping) and the compared period are
    // independent queries: they run at once, as a query's units do (a grouped query with
    // `compare` made three passes over the table one after the other).
    let cur_range = range;
    let one_row = plan.dims.is_empty() && plan.grain.is_none();
    let prev_range = match (plan.compare, cur_range) {
        (Some(shift), Some((f, t))) => {
            let pf = shift.back(f);
            let pt = if plan.query.compare_to_date {
                pf + (t - f)
            } else {
                shift.back(t)
            };
            Some((pf, pt))
        }
        _ => None,
    };
    // Counts, sums and conversions (each base record is in one row) add up across rows: their
    // totals are the rows' sum, without a statement of their own.
    let summed = plan.needed.iter().all(|n| match &reports.metrics[n].kind {
        Kind::Aggregate { agg, .. } => matches!(agg, Agg::Count | Agg::Sum),
        Kind::Conversion { .. } | Kind::Derived { .. } => true,
        Kind::Funnel { .. } | Kind::TimeInStage { .. } => false,
    });
    let (mut used, mut used_totals, mut used_prev) = (vec![], vec![], vec![]);
    let (rows, totals, prev) = futures_util::future::try_join3(
        rows_for(db, app, reports, plan, cur_range, true, vis, &mut used),
        async {
            if plan.per_stage.is_some() || one_row || summed {
                return Ok(None);
            }
            let rows = rows_for(
                db,
                app,
                reports,
                plan,
                cur_range,
                false,
                vis,
                &mut used_totals,
            );
            Ok(Some(rows.await?.0))
        },
        async {
            match prev_range {
                Some(r) => Ok(Some(
                    rows_for(db, app, reports, plan, Some(r), true, vis, &mut used_prev)
                        .await?
                        .0,
                )),
                None => Ok(None),
            }
        },
    )
    .await?;
    let rows = rows.0;
    for name in used_totals.into_iter().chain(used_prev) {
        if !used.contains(&name) {
            used.push(name);
        }
    }
    let totals_rows = if plan.per_stage.is_some() {
        None
    } else if one_row {
        // One row without grouping is the total already.
        let mut t = Rows::new();
        if let Some(k) = rows.order.first().cloned() {
            let v = rows.get(&k).cloned().unwrap_or_default();
            t.entry(vec![]).extend(v);
        }
        Some(t)
    } else if summed {
        // Compensated (Neumaier) sums: the rows' values are already floats, and a plain sum of
        // many large amounts would lose digits the answer shows.
        let mut sum: HashMap<String, Option<(f64, f64)>> = HashMap::new();
        for k in &rows.order {
            for (n, v) in rows.get(k).into_iter().flatten() {
                let acc = sum.entry(n.clone()).or_insert(None);
                if let Some(v) = v {
                    *acc = Some(add_compensated(acc.unwrap_or((0.0, 0.0)), *v));
                }
            }
        }
        let mut t = Rows::new();
        if !sum.is_empty() {
            t.entry(vec![])
                .extend(sum.into_iter().map(|(n, a)| (n, a.map(|(s, c)| s + c))));
        }
        Some(t)
    } else {
        totals
    };
    // Final rows.
    let cols = plan_columns(reports, plan);
    let mut out: Vec<(Key, Map<String, Json>)> = vec![];
    for key in rows.order.clone() {
        let vals = rows.get(&key).cloned().unwrap_or_default();
        let mut row = Map::new();
        for (i, d) in plan.dims.iter().enumerate() {
            row.insert(d.clone(), key[i].clone());
        }
        let mut k = plan.dims.len();
        if plan.grain.is_some() {
            row.insert("period".into(), key[k].clone());
            k += 1;
        }
        // The same row of the compared period: the same dimensions (and stage), the period
        // shifted back.
        let prev_key = |shift: Shift| {
            let mut pk = key.clone();
            if let Some(g) = plan.grain {
                let i = plan.dims.len();
                if let Some(d) = key[i]
                    .as_str()
                    .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                {
                    pk[i] = json!(g.start(shift.back(d)).format("%Y-%m-%d").to_string());
                }
            }
            pk
        };
        if let Some(ps) = &plan.per_stage {
            row.insert("stage".into(), key[k].clone());
            stage_values(reports, ps, &key, &rows, &mut row);
            if let (Some(prev), Some(shift)) = (&prev, plan.compare) {
                let mut before = Map::new();
                stage_values(reports, ps, &prev_key(shift), prev, &mut before);
                for (n, pv) in before {
                    let (v, p) = (row.get(&n).and_then(Json::as_f64), pv.as_f64());
                    let whole = matches!(&pv, Json::Number(x) if x.is_i64());
                    let (c, pct) = change(v, p);
                    // Counts stay whole numbers; rates and days stay as they are.
                    let c = match c {
                        Some(c) if whole => json!(c as i64),
                        c => float(c),
                    };
                    row.insert(format!("{n}_previous"), pv);
                    row.insert(format!("{n}_change"), c);
                    row.insert(format!("{n}_change_pct"), float(pct));
                }
            }
        } else {
            for m in &plan.metrics {
                let v = value(reports, m, &vals);
                row.insert(m.clone(), num(reports, m, v));
                if let (Some(prev), Some(shift)) = (&prev, plan.compare) {
                    let pk = prev_key(shift);
                    let pv = prev
                        .get(&pk)
                        .map(|pvals| value(reports, m, pvals))
                        .unwrap_or_else(|| empty_value(reports, m));
                    let (c, pct) = change(v, pv);
                    row.insert(format!("{m}_previous"), num(reports, m, pv));
                    row.insert(format!("{m}_change"), num(reports, m, c));
                    row.insert(format!("{m}_change_pct"), float(pct));
                    if let Some(f) = plan.query.flag.as_ref().filter(|f| f.metric == *m) {
                        let flagged = pct.is_some_and(|p| {
                            f.change_pct_lte.is_some_and(|t| p <= t)
                                || f.change_pct_gte.is_some_and(|t| p >= t)
                        });
                        row.insert("flag".into(), json!(flagged));
                    }
                }
            }
        }
        out.push((key, row));
    }
    // Sort: by the query's columns, else by dimensions, period and stage order.
    let stage_pos = |v: &Json| -> usize {
        plan.per_stage
            .as_ref()
            .and_then(|ps| match &reports.metrics[ps].kind {
                Kind::Funnel { stages, .. } => {
                    stages.iter().position(|s| Some(s.as_str()) == v.as_str())
                }
                _ => stage_order(app, reports, ps)
                    .iter()
                    .position(|s| Some(s.as_str()) == v.as_str()),
            })
            .unwrap_or(usize::MAX)
    };
    out.sort_by(|(ka, ra), (kb, rb)| {
        for s in &plan.query.sort {
            let (n, desc) = match s.strip_prefix('-') {
                Some(n) => (n, true),
                None => (s.as_str(), false),
            };
            let o = cmp_json(
                ra.get(n).unwrap_or(&Json::Null),
                rb.get(n).unwrap_or(&Json::Null),
            );
            let o = if desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        for (i, (a, b)) in ka.iter().zip(kb.iter()).enumerate() {
            let o = if plan.per_stage.is_some() && i == ka.len() - 1 {
                stage_pos(a).cmp(&stage_pos(b))
            } else {
                cmp_json(a, b)
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
    // The answer says when `limit` cut rows, and how many there were.
    let row_count = out.len();
    let rows_out: Vec<Map<String, Json>> =
        out.into_iter().take(plan.limit).map(|(_, r)| r).collect();
    let mut totals = Map::new();
    if let Some(t) = totals_rows {
        let vals = t
            .order
            .first()
            .and_then(|k| t.get(k))
            .cloned()
            .unwrap_or_default();
        for m in &plan.metrics {
            let v = if vals.is_empty() {
                empty_value(reports, m)
            } else {
                value(reports, m, &vals)
            };
            totals.insert(m.clone(), num(reports, m, v));
        }
    }
    let meta = json!({
        "timezone": plan.tz.name(),
        "from": cur_range.map(|r| r.0.to_string()),
        "to": cur_range.map(|r| r.1.to_string()),
        "grain": plan.query.time.as_ref().and_then(|t| t.grain.clone()),
        "now": trellis_form::values::datetime_json(&plan.now),
        "rollups": used,
        "row_count": row_count,
        "truncated": row_count > plan.limit,
        "compared_with": prev_range
            .map(|(f, t)| json!({"from": f.to_string(), "to": t.to_string()}))
            .unwrap_or(Json::Null),
    });
    Ok(Answer {
        columns: cols,
        rows: rows_out,
        totals,
        meta,
    })
}

/// One step of Neumaier's compensated sum: `(sum, compensation)` plus `v`; the total is
/// `sum + compensation`.
fn add_compensated((s, c): (f64, f64), v: f64) -> (f64, f64) {
    let t = s + v;
    let c = if s.abs() >= v.abs() {
        c + ((s - t) + v)
    } else {
        c + ((v - t) + s)
    };
    (t, c)
}

fn float(v: Option<f64>) -> Json {
    match v {
        Some(x) if x.is_finite() => json!(round6(x)),
        _ => Json::Null,
    }
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn num(reports: &Reports, m: &str, v: Option<f64>) -> Json {
    match v {
        Some(x) if reports.metrics[m].integral() => json!(x.round() as i64),
        other => float(other),
    }
}

fn cmp_json(a: &Json, b: &Json) -> Ordering {
    match (a, b) {
        (Json::Null, Json::Null) => Ordering::Equal,
        (Json::Null, _) => Ordering::Greater,
        (_, Json::Null) => Ordering::Less,
        (Json::Number(x), Json::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Ordering::Equal),
        (Json::String(x), Json::String(y)) => x.cmp(y),
        (Json::Bool(x), Json::Bool(y)) => x.cmp(y),
        _ => a.to_string().cmp(&b.to_string()),
    }
}

/// The value of metric `m` in one row.
fn value(reports: &Reports, m: &str, vals: &Vals) -> Option<f64> {
    let metric = &reports.metrics[m];
    match &metric.kind {
        Kind::Aggregate { agg, .. } => match vals.get(m) {
            Some(v) => v.or(if agg.zero_when_empty() {
                Some(0.0)
            } else {
                None
            }),
            None => empty_value(reports, m),
        },
        Kind::Conversion { .. } => {
            let n = vals
                .get(&format!("{m}#num"))
                .copied()
                .flatten()
                .unwrap_or(0.0);
            let d = vals
                .get(&format!("{m}#den"))
                .copied()
                .flatten()
                .unwrap_or(0.0);
            (d != 0.0).then(|| n / d)
        }
        Kind::Derived { expr, .. } => eval(reports, expr, vals),
        Kind::Funnel { .. } | Kind::TimeInStage { .. } => None,
    }
}

fn empty_value(reports: &Reports, m: &str) -> Option<f64> {
    match &reports.metrics[m].kind {
        Kind::Aggregate { agg, .. } if agg.zero_when_empty() => Some(0.0),
        Kind::Derived { expr, .. } => eval(reports, expr, &Vals::new()),
        _ => None,
    }
}

fn eval(reports: &Reports, e: &Expr, vals: &Vals) -> Option<f64> {
    match e {
        Expr::Num(n) => n.to_string().parse().ok(),
        Expr::Path(p) => value(reports, &p[0], vals),
        Expr::Unary(UnOp::Neg, a) => eval(reports, a, vals).map(|x| -x),
        Expr::Binary(op, a, b) => {
            let (a, b) = (eval(reports, a, vals)?, eval(reports, b, vals)?);
            match op {
                BinOp::Add => Some(a + b),
                BinOp::Sub => Some(a - b),
                BinOp::Mul => Some(a * b),
                BinOp::Div => (b != 0.0).then(|| a / b),
                _ => None,
            }
        }
        _ => None,
    }
}

pub(crate) fn stage_order(app: &App, reports: &Reports, m: &str) -> Vec<String> {
    metric_stages(app, &reports.metrics[m])
}

/// The stages a per-stage metric answers for: a funnel's, or the open stages of a time in
/// stage's field (won and lost are where deals end, not where they wait).
pub(crate) fn metric_stages(app: &App, metric: &Metric) -> Vec<String> {
    match &metric.kind {
        Kind::Funnel { stages, .. } => stages.clone(),
        Kind::TimeInStage { stage_field, .. } => metric
            .entity
            .as_ref()
            .and_then(|e| app.entity(e).ok())
            .and_then(|e| e.field(stage_field))
            .map(|f| {
                f.stages
                    .iter()
                    .filter(|s| s.kind == trellis_form::def::StageKind::Open)
                    .map(|s| s.key.clone())
                    .collect()
            })
            .unwrap_or_default(),
        _ => vec![],
    }
}

fn stage_values(reports: &Reports, ps: &str, key: &Key, rows: &Rows, row: &mut Map<String, Json>) {
    let m = &reports.metrics[ps];
    let vals = rows.get(key).cloned().unwrap_or_default();
    match &m.kind {
        Kind::Funnel { stages, .. } => {
            let stage = key.last().and_then(|s| s.as_str()).unwrap_or("");
            let i = stages.iter().position(|s| s == stage).unwrap_or(0);
            let entered = vals.get("entered").copied().flatten().unwrap_or(0.0);
            let mut other = key.clone();
            let next = stages.get(i + 1).map(|n| {
                *other.last_mut().expect("stage") = json!(n);
                rows.get(&other)
                    .and_then(|v| v.get("entered").copied().flatten())
                    .unwrap_or(0.0)
            });
            *other.last_mut().expect("stage") = json!(stages[0]);
            let first = rows
                .get(&other)
                .and_then(|v| v.get("entered").copied().flatten())
                .unwrap_or(0.0);
            row.insert("entered".into(), json!(entered as i64));
            row.insert(
                "advanced".into(),
                next.map(|n| json!(n as i64)).unwrap_or(Json::Null),
            );
            row.insert(
                "step_rate".into(),
                float(next.and_then(|n| (entered != 0.0).then(|| n / entered))),
            );
            row.insert(
                "cumulative_rate".into(),
                float((first != 0.0).then(|| entered / first)),
            );
        }
        _ => {
            row.insert("days".into(), float(vals.get("days").copied().flatten()));
        }
    }
}

/// A unit of SQL work.
#[derive(Debug, Clone)]
pub(crate) enum Unit {
    /// Aggregates over one entity with one anchor.
    Aggs {
        entity: String,
        time: Option<Expr>,
        metrics: Vec<String>,
    },
    /// A percentile computed with window functions (SQLite).
    Window { metric: String },
    /// A conversion.
    Conversion { metric: String },
    /// A funnel.
    Funnel { metric: String },
    /// Time in stage.
    TimeInStage { metric: String },
}

pub(crate) fn anchor_of(plan: &Plan, m: &Metric) -> Option<Expr> {
    plan.anchor.clone().or_else(|| m.time.clone())
}

fn units(reports: &Reports, plan: &Plan) -> Vec<Unit> {
    let mut out: Vec<Unit> = vec![];
    for name in &plan.needed {
        let m = &reports.metrics[name];
        match &m.kind {
            Kind::Aggregate {
                agg: Agg::Percentile(_),
                ..
            } if plan.backend == Backend::Sqlite => out.push(Unit::Window {
                metric: name.clone(),
            }),
            Kind::Aggregate { .. } => {
                let entity = m.entity.clone().unwrap_or_default();
                let time = anchor_of(plan, m);
                match out.iter_mut().find(|u| matches!(u, Unit::Aggs { entity: e, time: t, .. } if *e == entity && *t == time)) {
                    Some(Unit::Aggs { metrics, .. }) => metrics.push(name.clone()),
                    _ => out.push(Unit::Aggs { entity, time, metrics: vec![name.clone()] }),
                }
            }
            Kind::Conversion { .. } => out.push(Unit::Conversion {
                metric: name.clone(),
            }),
            Kind::Funnel { .. } => out.push(Unit::Funnel {
                metric: name.clone(),
            }),
            Kind::TimeInStage { .. } => out.push(Unit::TimeInStage {
                metric: name.clone(),
            }),
            Kind::Derived { .. } => {}
        }
    }
    out
}

/// What a unit's statement returns after the key columns.
pub(crate) enum Out {
    /// Named value columns.
    Values(Vec<String>),
    /// Per stage, one column per stage key (funnel): value `entered`.
    Stages(Vec<String>),
    /// A stage key column, then the `days` value (time in stage).
    StageColumn,
    /// Per stage, one column per stage key: value `days` (time in stage).
    StageDays(Vec<String>),
}

struct Drill<'a> {
    row: &'a Map<String, Json>,
    metric: &'a str,
    side: Option<&'a str>,
    after: Option<Uuid>,
    limit: u32,
}

#[allow(clippy::too_many_arguments)]
fn unit_sql(
    app: &App,
    reports: &Reports,
    plan: &Plan,
    unit: &Unit,
    range: Option<(NaiveDate, NaiveDate)>,
    grouped: bool,
    vis: &Visibility,
    drill: Option<&Drill>,
) -> Result<(Sql, Vec<ColKind>, Out)> {
    let d = dialect::of(plan.backend);
    let internal = |m: String| FormError::Query(vec![Problem::new("", "invalid_query", m)]);
    let (entity, time_expr): (String, Option<Expr>) = match unit {
        Unit::Aggs { entity, time, .. } => (entity.clone(), time.clone()),
        Unit::Window { metric }
        | Unit::Conversion { metric }
        | Unit::Funnel { metric }
        | Unit::TimeInStage { metric } => {
            let m = &reports.metrics[metric];
            (m.entity.clone().unwrap_or_default(), anchor_of(plan, m))
        }
    };
    let e = app.entity(&entity)?;
    let mut ctx = Ctx::new(app, e, d);
    let mut sql = Sql::default();
    let mut kinds = vec![];
    let mut select: Vec<String> = vec![];
    let mut group_n = 0;
    let mut dim_sql = vec![];
    if grouped {
        for dname in &plan.dims {
            let t = dimension(&mut ctx, dname).map_err(internal)?;
            kinds.push(t.kind);
            dim_sql.push(t.sql.clone());
            select.push(t.sql);
            group_n += 1;
        }
    }
    // The anchor and the range.
    let anchor = match &time_expr {
        Some(x) => Some(ctx.lower(x, &mut sql).map_err(internal)?),
        None => None,
    };
    let mut conds: Vec<String> = vec![];
    let mut bucket_sql = None;
    // On SQLite a range of few buckets over an anchor an index starts with runs as one
    // statement per bucket: each reads its part of the index, and nothing is sorted (a GROUP BY
    // on the bucket sorts every row of the range).
    let split = match (&anchor, range, plan.grain) {
        (Some(a), Some((f, t)), Some(g))
            if grouped
                && drill.is_none()
                && d.backend() == Backend::Sqlite
                && matches!(
                    unit,
                    Unit::Aggs { .. } | Unit::Funnel { .. } | Unit::Conversion { .. }
                )
                && matches!(a.kind, ColKind::DateTime | ColKind::Date)
                && leads_an_index(e, &a.sql) =>
        {
            let starts = time::buckets(g, f, t);
            (starts.len() <= MAX_SPLIT_BUCKETS)
                .then(|| split_ranges(a.kind, plan.tz, g, &starts, f, t))
        }
        _ => None,
    };
    if let (Some(a), Some((f, t)), None) = (&anchor, range, &split) {
        let (lo, hi) = bounds(a.kind, plan.tz, f, t);
        let lo = sql.param(lo);
        let hi = sql.param(hi);
        conds.push(format!("{} >= {lo} AND {} < {hi}", a.sql, a.sql));
    }
    if grouped {
        if let (Some(g), Some(a)) = (plan.grain, &anchor) {
            let b = bucket(d, &mut sql, &a.sql, a.kind, g, plan.tz, range);
            kinds.push(ColKind::Text);
            select.push(b.clone());
            bucket_sql = Some(b);
            group_n += 1;
        }
    }
    query_conds(&mut ctx, plan, vis, &mut sql, &mut conds)?;
    let lower_opt = |ctx: &mut Ctx, sql: &mut Sql, x: &Option<Expr>| -> Result<Option<String>> {
        match x {
            Some(x) => Ok(Some(ctx.lower(x, sql).map_err(internal)?.sql)),
            None => Ok(None),
        }
    };
    // Drill: the row's dimension values and bucket.
    if let Some(dr) = drill {
        for (i, dname) in plan.dims.iter().enumerate() {
            let v = dr.row.get(dname).ok_or_else(|| {
                qerr(
                    format!("/row/{}", trellis_form::error::pointer_segment(dname)),
                    "required",
                    format!("Give the row's value of `{dname}` (null for an empty one)."),
                )
            })?;
            if v.is_null() {
                conds.push(format!("{} IS NULL", dim_sql[i]));
            } else {
                let t = dimension(&mut ctx, dname).map_err(internal)?;
                let val =
                    to_value(&t, v).map_err(|m| qerr(format!("/row/{dname}"), "bad_value", m))?;
                let p = sql.param(val);
                conds.push(format!("{} = {p}", dim_sql[i]));
            }
        }
        if let Some(b) = &bucket_sql {
            let v = dr
                .row
                .get("period")
                .and_then(|p| p.as_str())
                .ok_or_else(|| qerr("/row/period", "required", "Give the row's `period`."))?;
            let p = sql.param(Value::Text(v.to_owned()));
            conds.push(format!("{b} = {p}"));
        }
        if let Some(after) = dr.after {
            let p = sql.param(Value::Uuid(after));
            conds.push(format!("t.\"id\" > {p}"));
        }
    }
    let mut from = String::new();
    let out;
    match unit {
        Unit::Aggs { metrics, .. } => {
            if let Some(dr) = drill {
                let m = &reports.metrics[dr.metric];
                if let Some(f) = lower_opt(&mut ctx, &mut sql, &m.filter)? {
                    conds.push(f);
                }
                // A sum or an average is made of the records that have a value.
                if let Kind::Aggregate { expr: Some(x), .. } = &m.kind {
                    let x = ctx.lower(x, &mut sql).map_err(internal)?;
                    conds.push(format!("{} IS NOT NULL", x.sql));
                }
                out = Out::Values(vec![]);
            } else {
                let mut names = vec![];
                // One metric alone (or several with the same filter): the filter goes to WHERE,
                // so indexes can serve it and fewer rows are aggregated.
                let shared_filter = match metrics.first().map(|n| &reports.metrics[n].filter) {
                    Some(Some(f))
                        if metrics
                            .iter()
                            .all(|n| reports.metrics[n].filter.as_ref() == Some(f)) =>
                    {
                        Some(f.clone())
                    }
                    _ => None,
                };
                if let Some(f) = &shared_filter {
                    conds.push(ctx.lower(f, &mut sql).map_err(internal)?.sql);
                }
                for name in metrics {
                    let m = &reports.metrics[name];
                    let Kind::Aggregate { agg, expr } = &m.kind else {
                        continue;
                    };
                    let filter = if shared_filter.is_some() {
                        None
                    } else {
                        lower_opt(&mut ctx, &mut sql, &m.filter)?
                    };
                    let x = lower_opt(&mut ctx, &mut sql, expr)?;
                    let val = |x: &str| match &filter {
                        Some(f) => format!("CASE WHEN {f} THEN {x} END"),
                        None => x.to_owned(),
                    };
                    let s = match agg {
                        Agg::Count => match &filter {
                            Some(f) => d.count_if(f),
                            None => "COUNT(*)".into(),
                        },
                        Agg::CountDistinct => {
                            format!("COUNT(DISTINCT {})", val(x.as_deref().unwrap_or("1")))
                        }
                        Agg::Sum => format!("SUM({})", val(x.as_deref().unwrap_or("1"))),
                        Agg::Avg => format!("AVG({})", val(&d.real(x.as_deref().unwrap_or("1")))),
                        Agg::Min => format!("MIN({})", val(x.as_deref().unwrap_or("1"))),
                        Agg::Max => format!("MAX({})", val(x.as_deref().unwrap_or("1"))),
                        Agg::Percentile(p) => format!(
                            "percentile_cont({p}) WITHIN GROUP (ORDER BY {})",
                            val(x.as_deref().unwrap_or("1"))
                        ),
                    };
                    select.push(d.number(&s));
                    kinds.push(ColKind::Decimal);
                    names.push(name.clone());
                }
                out = Out::Values(names);
            }
        }
        Unit::Window { metric } => {
            let m = &reports.metrics[metric];
            let Kind::Aggregate {
                agg: Agg::Percentile(p),
                expr,
            } = &m.kind
            else {
                return Err(internal("not a percentile".into()));
            };
            let filter = lower_opt(&mut ctx, &mut sql, &m.filter)?;
            if drill.is_some() {
                conds.extend(filter);
                if let Some(x) = expr {
                    let x = ctx.lower(x, &mut sql).map_err(internal)?;
                    conds.push(format!("{} IS NOT NULL", x.sql));
                }
                out = Out::Values(vec![]);
            } else {
                let x = lower_opt(&mut ctx, &mut sql, expr)?.unwrap_or_else(|| "1".into());
                let v = match &filter {
                    Some(f) => format!("CASE WHEN {f} THEN {x} END"),
                    None => x,
                };
                let (cols, keys) = keyed(&select, d.real(&v));
                let inner = format!(
                    "SELECT {cols} FROM {}{}",
                    ctx.from_clause(),
                    where_sql(&conds)
                );
                sql.text = percentile_sql(&inner, &keys, *p);
                kinds.push(ColKind::Decimal);
                return Ok((sql, kinds, Out::Values(vec![metric.clone()])));
            }
        }
        Unit::Conversion { metric } => {
            let m = &reports.metrics[metric];
            let Kind::Conversion {
                related,
                when,
                exclude_immature,
            } = &m.kind
            else {
                return Err(internal("not a conversion".into()));
            };
            if let Some(f) = lower_opt(&mut ctx, &mut sql, &m.filter)? {
                conds.push(f);
            }
            let base_time = anchor
                .as_ref()
                .map(|a| a.sql.clone())
                .unwrap_or_else(|| "t.\"created_at\"".into());
            // Over the whole history (no range) the conversion is counted from the related
            // records' side: one probe per related record instead of an EXISTS per base record
            // (1M opportunities against 2.8M leads in the CRM's demo data; docs/benchmarks.md).
            // A range keeps the EXISTS, whose probes are only the range's base records.
            let by_join = drill.is_none() && related.is_some() && range.is_none();
            // A summary field holding the base record's first related record's creation time
            // answers without a probe per record (docs/reference/reports.md).
            let first = related
                .as_ref()
                .and_then(|(ce, via, _)| first_related(e, ce, via));
            let hit = match (related, when) {
                (Some((ce, via, within)), _) => {
                    // A base record converts when any related record was created at or after it
                    // (and within the window): EXISTS counts each base record at most once.
                    let hit = if by_join {
                        String::new()
                    } else {
                        let exists =
                            related_exists(app, d, &mut sql, ce, via, *within, &base_time)?;
                        match &first {
                            Some(col) => {
                                summary_hit(d, &mut sql, col, *within, &base_time, &exists, false)
                            }
                            None => exists,
                        }
                    };
                    if let (Some(w), true) = (within, *exclude_immature) {
                        let now = sql.param(Value::DateTime(plan.now));
                        let wp2 = sql.param(Value::Int(i64::from(*w)));
                        conds.push(format!("NOT ({})", d.within(&now, &base_time, &wp2)));
                    }
                    hit
                }
                (None, Some(w)) => ctx.lower(w, &mut sql).map_err(internal)?.sql,
                (None, None) => d.bool_lit(false).to_owned(),
            };
            if let (true, Some((ce, via, within))) = (by_join, related) {
                // Over the whole history the converted base records are counted on their own,
                // beside all base records (UNION ALL), and the two are merged per group.
                let keyed: Vec<String> = select
                    .iter()
                    .enumerate()
                    .map(|(i, s)| format!("{s} AS \"k{i}\""))
                    .collect();
                let cols = |counts: &str| {
                    let mut c = keyed.clone();
                    c.push(counts.to_owned());
                    c.join(", ")
                };
                let (from, wh) = (ctx.from_clause(), where_sql(&conds));
                let group = group_by(&positions(group_n));
                let hits = match &first {
                    // From the summary: the base records with a first related record (an
                    // index on the summary column reads only them).
                    Some(col) => {
                        let exists =
                            related_exists(app, d, &mut sql, ce, via, *within, &base_time)?;
                        let mut hit_conds = vec![summary_hit(
                            d, &mut sql, col, *within, &base_time, &exists, true,
                        )];
                        hit_conds.extend(conds.iter().cloned());
                        format!(
                            "SELECT {} FROM {from}{}{group}",
                            cols("COUNT(*) AS \"n\", 0 AS \"d\""),
                            where_sql(&hit_conds)
                        )
                    }
                    // Each related record finds its base record (CROSS JOIN keeps the related
                    // table the outer loop on SQLite, whose planner, without statistics,
                    // otherwise scans the base table and probes per base record; PostgreSQL
                    // plans it as any join), and the base records are counted distinctly: the
                    // same answer as counting EXISTS per base record.
                    None => {
                        let mut hit_conds =
                            vec![related_cond(d, &mut sql, via, *within, &base_time)];
                        hit_conds.extend(conds.iter().cloned());
                        format!(
                            "SELECT {} FROM {} c CROSS JOIN {from}{}{group}",
                            cols("COUNT(DISTINCT t.\"id\") AS \"n\", 0 AS \"d\""),
                            quote(&app.entity(ce)?.table),
                            where_sql(&hit_conds)
                        )
                    }
                };
                // Every base record: a plain count when nothing groups or filters them (SQLite
                // counts the smallest index's entries without reading them).
                let all = if group_n == 0 && conds.is_empty() {
                    format!("SELECT 0 AS \"n\", (SELECT COUNT(*) FROM {from}) AS \"d\"")
                } else {
                    format!(
                        "SELECT {} FROM {from}{wh}{group}",
                        cols("0 AS \"n\", COUNT(*) AS \"d\"")
                    )
                };
                let keys: Vec<String> = (0..group_n).map(|i| format!("x.\"k{i}\"")).collect();
                let mut outer = keys.clone();
                outer.push(d.number("SUM(x.\"n\")"));
                outer.push(d.number("SUM(x.\"d\")"));
                let outer_group = group_by(&keys.join(", "));
                sql.text = format!(
                    "SELECT {} FROM ({hits} UNION ALL {all}) x{outer_group}",
                    outer.join(", ")
                );
                kinds.push(ColKind::Decimal);
                kinds.push(ColKind::Decimal);
                return Ok((
                    sql,
                    kinds,
                    Out::Values(vec![format!("{metric}#num"), format!("{metric}#den")]),
                ));
            }
            if let Some(dr) = drill {
                match dr.side {
                    Some("numerator") => conds.push(hit),
                    Some("denominator") => {}
                    _ => return Err(qerr("/side", "required", format!("`{}` is a rate: open its `numerator` (converted) or `denominator` (all) records.", dr.metric))),
                }
                out = Out::Values(vec![]);
            } else {
                select.push(d.number(&if related.is_some() {
                    d.count_exists(&hit)
                } else {
                    d.count_if(&hit)
                }));
                select.push(d.number("COUNT(*)"));
                kinds.push(ColKind::Decimal);
                kinds.push(ColKind::Decimal);
                out = Out::Values(vec![format!("{metric}#num"), format!("{metric}#den")]);
            }
        }
        Unit::Funnel { metric } => {
            let m = &reports.metrics[metric];
            let Kind::Funnel {
                stage_field,
                stages,
                ordered,
            } = &m.kind
            else {
                return Err(internal("not a funnel".into()));
            };
            if let Some(f) = lower_opt(&mut ctx, &mut sql, &m.filter)? {
                conds.push(f);
            }
            let cond = |i: usize| funnel_cond(stage_field, stages, *ordered, i);
            if let Some(dr) = drill {
                let stage = dr
                    .row
                    .get("stage")
                    .and_then(|s| s.as_str())
                    .ok_or_else(|| qerr("/row/stage", "required", "Give the row's `stage`."))?;
                let i = stages.iter().position(|s| s == stage).ok_or_else(|| {
                    qerr(
                        "/row/stage",
                        "bad_value",
                        format!(
                            "`{stage}` is not a stage of this funnel; use one of: {}.",
                            stages.join(", ")
                        ),
                    )
                })?;
                let i = match dr.side {
                    None | Some("entered") => i,
                    Some("advanced") if i + 1 < stages.len() => i + 1,
                    Some("advanced") => {
                        return Err(qerr(
                            "/side",
                            "bad_value",
                            "The last stage has no next stage.",
                        ))
                    }
                    Some(other) => {
                        return Err(qerr(
                            "/side",
                            "bad_value",
                            format!(
                                "`{other}` is not a side of a funnel row; use entered or advanced."
                            ),
                        ))
                    }
                };
                conds.push(cond(i));
                out = Out::Values(vec![]);
            } else {
                for i in 0..stages.len() {
                    select.push(d.number(&d.count_if(&cond(i))));
                    kinds.push(ColKind::Decimal);
                }
                out = Out::Stages(stages.clone());
            }
        }
        Unit::TimeInStage { metric } => {
            let m = &reports.metrics[metric];
            let Kind::TimeInStage { stage_field, agg } = &m.kind else {
                return Err(internal("not time in stage".into()));
            };
            if let Some(f) = lower_opt(&mut ctx, &mut sql, &m.filter)? {
                conds.push(f);
            }
            if drill.is_none() && matches!(agg, Agg::Avg) {
                // The average from the record's own columns, in one pass: the finished stays
                // (kept by the form engine) plus the stay under way, counted until now, over
                // the records that ever entered the stage.
                let open = stage_order(app, reports, metric);
                let now = sql.param(Value::DateTime(plan.now));
                let changed = format!("t.{}", quote(&stage_changed_column(stage_field)));
                let mut entered = vec![];
                for st in &open {
                    let e_col = format!("t.{}", quote(&stage_entered_column(stage_field, st)));
                    let d_col = format!("t.{}", quote(&stage_days_column(stage_field, st)));
                    let sp = sql.param(Value::Text(st.clone()));
                    let current = d.days_between(&changed, &now);
                    select.push(d.number(&format!(
                        "AVG(CASE WHEN {e_col} IS NOT NULL THEN {} + CASE WHEN t.{} = {sp} THEN {current} ELSE 0 END END)",
                        d.real(&format!("COALESCE({d_col}, 0)")),
                        quote(stage_field)
                    )));
                    kinds.push(ColKind::Decimal);
                    entered.push(format!("COUNT({e_col})"));
                }
                let having = if group_n == 0 {
                    String::new()
                } else {
                    // A group shows when one of its records ever waited in a stage.
                    format!(" HAVING {} > 0", entered.join(" + "))
                };
                let group = group_by(&positions(group_n));
                sql.text = format!(
                    "SELECT {} FROM {}{}{group}{having}",
                    select.join(", "),
                    ctx.from_clause(),
                    where_sql(&conds)
                );
                return Ok((sql, kinds, Out::StageDays(open)));
            }
            let (app_p, ent_p, field_p) = (
                sql.param(Value::Text(app.key.clone())),
                sql.param(Value::Text(e.key.clone())),
                sql.param(Value::Text(stage_field.clone())),
            );
            let now = sql.param(Value::DateTime(plan.now));
            from = format!(
                " JOIN (SELECT h.\"record_id\" AS \"rid\", {st} AS \"stage\", h.\"at\" AS \"entered\", LEAD(h.\"at\") OVER (PARTITION BY h.\"record_id\" ORDER BY h.\"at\", h.\"id\") AS \"left_at\" FROM \"history\" h WHERE h.\"app\" = {app_p} AND h.\"entity\" = {ent_p} AND h.\"field\" = {field_p}) s ON s.\"rid\" = t.\"id\"",
                st = d.json_text("h.\"new_value\""),
            );
            // Won and lost are where deals end, not where they wait.
            let open: Vec<String> = stage_order(app, reports, metric)
                .iter()
                .map(|s| sql.param(Value::Text(s.clone())))
                .collect();
            conds.push(format!("s.\"stage\" IN ({})", open.join(", ")));
            if let Some(dr) = drill {
                let stage = dr
                    .row
                    .get("stage")
                    .and_then(|s| s.as_str())
                    .ok_or_else(|| qerr("/row/stage", "required", "Give the row's `stage`."))?;
                let p = sql.param(Value::Text(stage.to_owned()));
                conds.push(format!("s.\"stage\" = {p}"));
                // A record that stayed twice is listed once.
                return Ok(drill_ids(sql, &ctx, &from, &conds, dr.limit, true));
            }
            // Per record and stage, the days of every stay added up; then across records.
            select.push("s.\"stage\"".into());
            kinds.push(ColKind::Text);
            let days = d.days_between("s.\"entered\"", &format!("COALESCE(s.\"left_at\", {now})"));
            let (cols, keys) = keyed(&select, format!("SUM({days})"));
            let inner = format!(
                "SELECT t.\"id\", {cols} FROM {}{from}{} GROUP BY {}",
                ctx.from_clause(),
                where_sql(&conds),
                positions(select.len() + 1)
            );
            let value = match agg {
                Agg::Percentile(p) if !d.native_percentile() => {
                    sql.text = percentile_sql(&inner, &keys, *p);
                    kinds.push(ColKind::Decimal);
                    return Ok((sql, kinds, Out::StageColumn));
                }
                Agg::Percentile(p) => format!("percentile_cont({p}) WITHIN GROUP (ORDER BY \"v\")"),
                _ => "AVG(\"v\")".to_owned(),
            };
            sql.text = format!(
                "SELECT {}, {} FROM ({inner}) x GROUP BY {}",
                keys.join(", "),
                d.number(&value),
                keys.join(", ")
            );
            kinds.push(ColKind::Decimal);
            return Ok((sql, kinds, Out::StageColumn));
        }
    }
    if let Some(dr) = drill {
        return Ok(drill_ids(sql, &ctx, &from, &conds, dr.limit, false));
    }
    if let (Some(parts), Some(a)) = (&split, &anchor) {
        // The bucket is the column after the dimensions: a constant in each statement, left
        // out of its GROUP BY (a GROUP BY on a constant still sorts).
        let nd = group_n - 1;
        let group = group_by(&positions(nd));
        let branches: Vec<String> = parts
            .iter()
            .map(|(label, lo, hi)| {
                let mut sel = select.clone();
                sel[nd] = format!("'{label}'");
                let mut c = conds.clone();
                c.push(format!("{} >= '{lo}' AND {} < '{hi}'", a.sql, a.sql));
                format!(
                    "SELECT {} FROM {}{from}{}{group}",
                    sel.join(", "),
                    ctx.from_clause(),
                    where_sql(&c)
                )
            })
            .collect();
        sql.text = branches.join(" UNION ALL ");
        return Ok((sql, kinds, out));
    }
    let group = group_by(&positions(group_n));
    sql.text = format!(
        "SELECT {} FROM {}{from}{}{group}",
        select.join(", "),
        ctx.from_clause(),
        where_sql(&conds)
    );
    Ok((sql, kinds, out))
}

/// Whether `anchor` (lowered SQL) is a column of `e` that an index starts with: the system
/// columns `created_at` and `owner`, an indexed field, or the first column of an index over
/// several columns.
fn leads_an_index(e: &trellis_form::model::Entity, anchor: &str) -> bool {
    let is = |c: &str| anchor == format!("t.{}", quote(c));
    ["created_at", "owner"].iter().any(|c| is(c))
        || e.fields
            .iter()
            .any(|f| (f.def.unique || f.wants_index()) && is(&f.key))
        || e.indexes
            .iter()
            .any(|cols| cols.first().is_some_and(|c| is(c)))
}

/// Most buckets a query runs as one statement each (SQLite allows 500 in a compound SELECT).
const MAX_SPLIT_BUCKETS: usize = 64;

/// Per bucket of `starts` (within `[f, t)`): its label and the stored text of its first and
/// past-the-end values (UTC instants of local midnights for a date-time, dates for a date).
fn split_ranges(
    kind: ColKind,
    tz: Tz,
    g: Grain,
    starts: &[NaiveDate],
    f: NaiveDate,
    t: NaiveDate,
) -> Vec<(String, String, String)> {
    let text = |day: NaiveDate| match kind {
        ColKind::Date => day.format("%Y-%m-%d").to_string(),
        _ => trellis_form::db::sqlite_datetime(&time::local_midnight(tz, day)),
    };
    starts
        .iter()
        .map(|s| {
            let lo = (*s).max(f);
            let hi = g.next(*s).min(t);
            (s.format("%Y-%m-%d").to_string(), text(lo), text(hi))
        })
        .collect()
}

/// The query's filters and the caller's visibility as conditions on `t`.
pub(crate) fn query_conds(
    ctx: &mut Ctx,
    plan: &Plan,
    vis: &Visibility,
    sql: &mut Sql,
    conds: &mut Vec<String>,
) -> Result<()> {
    for (i, f) in plan.query.filters.iter().enumerate() {
        conds.push(
            filter_sql(ctx, f, sql, &format!("/filters/{i}"))
                .map_err(|p| FormError::Query(vec![p]))?,
        );
    }
    match &vis.owners {
        None => {}
        Some(list) if list.is_empty() => conds.push("1 = 0".into()),
        Some(list) => {
            let ps: Vec<String> = list.iter().map(|u| sql.param(Value::Uuid(*u))).collect();
            conds.push(format!("t.\"owner\" IN ({})", ps.join(", ")));
        }
    }
    Ok(())
}

/// The summary field of `e` holding the earliest creation time of the `entity` records that
/// point at it through `via` (`{"agg": "min", "of": "created_at"}`), if it has one.
fn first_related(e: &trellis_form::model::Entity, entity: &str, via: &str) -> Option<String> {
    e.fields
        .iter()
        .find(|f| {
            f.def.summary.as_ref().is_some_and(|s| {
                s.entity == entity
                    && s.via == via
                    && s.agg == trellis_form::def::SummaryAgg::Min
                    && s.of == "created_at"
            })
        })
        .map(|f| f.key.clone())
}

/// A conversion's hit from the base record's first related record `t.col`: none converts
/// without one; when it came at or after `base_time`, it is the earliest candidate and decides
/// alone (within the window, if any); when it came before (a relation set after the fact), the
/// `exists` probe decides. As a value counted per row (`in_where` false) a `CASE`, so the
/// probe runs only where it decides; as a WHERE condition, `OR`, which a WHERE clause stops
/// evaluating once it is decided, with the summary's `IS NOT NULL` first (an index on it reads
/// only the base records that have one).
fn summary_hit(
    d: &dyn dialect::Dialect,
    sql: &mut Sql,
    col: &str,
    within: Option<u32>,
    base_time: &str,
    exists: &str,
    in_where: bool,
) -> String {
    let s = format!("t.{}", quote(col));
    let inside = within.map(|w| {
        let wp = sql.param(Value::Int(i64::from(w)));
        d.within(&s, base_time, &wp)
    });
    if in_where {
        let first = match inside {
            Some(x) => format!("({s} >= {base_time} AND {x})"),
            None => format!("{s} >= {base_time}"),
        };
        format!("{s} IS NOT NULL AND ({first} OR ({s} < {base_time} AND {exists}))")
    } else {
        let inside = inside.unwrap_or_else(|| d.bool_lit(true).to_owned());
        format!(
            "({s} IS NOT NULL AND CASE WHEN {s} >= {base_time} THEN {inside} ELSE {exists} END)"
        )
    }
}

/// `EXISTS` a record of `entity` pointing at the base record `t` through `via`, created at or
/// after `base_time` (and within `within` days of it).
pub(crate) fn related_exists(
    app: &App,
    d: &dyn dialect::Dialect,
    sql: &mut Sql,
    entity: &str,
    via: &str,
    within: Option<u32>,
    base_time: &str,
) -> Result<String> {
    let target = app.entity(entity)?;
    Ok(format!(
        "EXISTS (SELECT 1 FROM {} c WHERE {})",
        quote(&target.table),
        related_cond(d, sql, via, within, base_time)
    ))
}

/// The condition of a related record `c` counting for the base record `t`: it points at `t`
/// through `via` and was created at or after `base_time` (and within `within` days of it).
fn related_cond(
    d: &dyn dialect::Dialect,
    sql: &mut Sql,
    via: &str,
    within: Option<u32>,
    base_time: &str,
) -> String {
    let mut cond = format!(
        "c.{} = t.\"id\" AND c.\"created_at\" >= {base_time}",
        quote(via)
    );
    if let Some(w) = within {
        let wp = sql.param(Value::Int(i64::from(w)));
        cond.push_str(&format!(
            " AND {}",
            d.within("c.\"created_at\"", base_time, &wp)
        ));
    }
    cond
}

/// The condition of a record counting as having entered funnel stage `i`: in `ordered` mode it
/// passed every earlier stage in order; in `reached` mode it entered this stage or a later one.
pub(crate) fn funnel_cond(stage_field: &str, stages: &[String], ordered: bool, i: usize) -> String {
    let col = |s: &str| format!("t.{}", quote(&stage_entered_column(stage_field, s)));
    if ordered {
        let mut parts: Vec<String> = (0..=i)
            .map(|k| format!("{} IS NOT NULL", col(&stages[k])))
            .collect();
        for k in 0..i {
            parts.push(format!("{} <= {}", col(&stages[k]), col(&stages[k + 1])));
        }
        format!("({})", parts.join(" AND "))
    } else {
        let parts: Vec<String> = (i..stages.len())
            .map(|k| format!("{} IS NOT NULL", col(&stages[k])))
            .collect();
        format!("({})", parts.join(" OR "))
    }
}

/// ` WHERE a AND b`, or nothing.
fn where_sql(conds: &[String]) -> String {
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

/// ` GROUP BY items`, or nothing when `items` is empty.
fn group_by(items: &str) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {items}")
    }
}

/// `1, 2, …, n` (GROUP BY positions).
fn positions(n: usize) -> String {
    (1..=n)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The select list renamed `k0, k1, …` with `value` as `v`, and the key names.
fn keyed(select: &[String], value: String) -> (String, Vec<String>) {
    let mut cols: Vec<String> = select
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{s} AS \"k{i}\""))
        .collect();
    cols.push(format!("{value} AS \"v\""));
    let keys = (0..select.len()).map(|i| format!("\"k{i}\"")).collect();
    (cols.join(", "), keys)
}

/// The ids behind a drilled number, one page (plus one row to know whether more follow).
fn drill_ids(
    mut sql: Sql,
    ctx: &Ctx,
    from: &str,
    conds: &[String],
    limit: u32,
    distinct: bool,
) -> (Sql, Vec<ColKind>, Out) {
    let limit = sql.param(Value::Int(i64::from(limit)));
    sql.text = format!(
        "SELECT {}t.\"id\" FROM {}{from}{} ORDER BY t.\"id\" LIMIT {limit}",
        if distinct { "DISTINCT " } else { "" },
        ctx.from_clause(),
        where_sql(conds)
    );
    (sql, vec![ColKind::Uuid], Out::Values(vec![]))
}

/// A continuous percentile per group, with window functions only (SQLite has no
/// `percentile_cont`): rank the values, then interpolate between the two around `p·(n−1)`.
fn percentile_sql(inner: &str, keys: &[String], p: f64) -> String {
    let part = if keys.is_empty() {
        String::new()
    } else {
        format!("PARTITION BY {} ", keys.join(", "))
    };
    let pos = format!("({p} * (\"n\" - 1))");
    let lo = format!("CAST({pos} AS INTEGER)");
    let frac = format!("({pos} - {lo})");
    let keys_sel = keys.join(", ");
    let sel = if keys.is_empty() {
        String::new()
    } else {
        format!("{keys_sel}, ")
    };
    let group = group_by(&keys_sel);
    format!(
        "SELECT {sel}SUM(CASE WHEN \"rn\" = {lo} THEN \"v\" * (1 - {frac}) WHEN \"rn\" = {lo} + 1 THEN \"v\" * {frac} ELSE 0 END) FROM (SELECT {sel}\"v\", ROW_NUMBER() OVER ({part}ORDER BY \"v\") - 1 AS \"rn\", COUNT(*) OVER ({part}) AS \"n\" FROM ({inner}) x WHERE \"v\" IS NOT NULL) w{group}"
    )
}

/// The bound range of a time anchor: local dates for date fields, instants for date-times.
fn bounds(kind: ColKind, tz: Tz, f: NaiveDate, t: NaiveDate) -> (Value, Value) {
    if kind == ColKind::Date {
        (Value::Date(f), Value::Date(t))
    } else {
        (
            Value::DateTime(time::local_midnight(tz, f)),
            Value::DateTime(time::local_midnight(tz, t)),
        )
    }
}

/// Most buckets a range's instants are sorted into by comparisons on SQLite (a tree of this
/// many is 10 deep).
const MAX_TREE_BUCKETS: usize = 1024;

/// The local start date (`YYYY-MM-DD` text) of the bucket of `col`, a `kind` value the query
/// restricts to `range` when it has one. On SQLite a date-time with a range is compared with
/// the UTC starts of the range's buckets ([`dialect::bucket_tree`]); otherwise the dialect
/// shifts it into local time and cuts the text.
pub(crate) fn bucket(
    d: &dyn dialect::Dialect,
    sql: &mut Sql,
    col: &str,
    kind: ColKind,
    grain: Grain,
    tz: Tz,
    range: Option<(NaiveDate, NaiveDate)>,
) -> String {
    if let (Backend::Sqlite, ColKind::DateTime, Some((f, t))) = (d.backend(), kind, range) {
        let starts = time::buckets(grain, f, t);
        if starts.len() <= MAX_TREE_BUCKETS {
            let starts: Vec<(String, String)> = starts
                .iter()
                .map(|s| {
                    (
                        s.format("%Y-%m-%d").to_string(),
                        trellis_form::db::sqlite_datetime(&time::local_midnight(tz, *s)),
                    )
                })
                .collect();
            return dialect::bucket_tree(col, &starts);
        }
    }
    d.bucket(sql, col, kind, grain, &bucket_offsets(kind, tz, range))
}

/// The UTC offsets a bucket of a `kind` value needs in `tz`: none for dates (they are local
/// already, and working the offsets out costs up to a millisecond), those of the local range
/// `[from, to)`, or without a range those of every year a CRM holds data for (2000–2040).
pub(crate) fn bucket_offsets(
    kind: ColKind,
    tz: Tz,
    range: Option<(NaiveDate, NaiveDate)>,
) -> Offsets {
    if kind == ColKind::Date {
        return time::no_offsets(tz);
    }
    let (f, t) = range.unwrap_or((
        NaiveDate::from_ymd_opt(2000, 1, 1).expect("date"),
        NaiveDate::from_ymd_opt(2040, 1, 1).expect("date"),
    ));
    time::offsets(tz, time::local_midnight(tz, f), time::local_midnight(tz, t))
}

/// Run every unit for one range and merge the rows (grouped, gap-filled) or the single total;
/// `used` collects the rollups that answered.
#[allow(clippy::too_many_arguments)]
async fn rows_for(
    db: &Db,
    app: &App,
    reports: &Reports,
    plan: &Plan,
    range: Option<(NaiveDate, NaiveDate)>,
    grouped: bool,
    vis: &Visibility,
    used: &mut Vec<String>,
) -> Result<(Rows, Option<(NaiveDate, NaiveDate)>)> {
    let mut rows = Rows::new();
    let mut stage_list: Option<Vec<String>> = None;
    let mut statements = vec![];
    for u in units(reports, plan) {
        statements.push(
            match crate::rollup::serve(app, reports, plan, &u, range, grouped, vis)? {
                Some((sql, kinds, out, name)) => {
                    if !used.contains(&name) {
                        used.push(name);
                    }
                    (sql, kinds, out)
                }
                None => unit_sql(app, reports, plan, &u, range, grouped, vis, None)?,
            },
        );
    }
    // The units are independent queries (one per entity and kind): they run at once, each on a
    // read connection of its own, and are merged in order below.
    let results = futures_util::future::try_join_all(
        statements
            .iter()
            .map(|(sql, kinds, _)| db.fetch_all(sql, kinds)),
    )
    .await?;
    for ((_, kinds, out), result) in statements.into_iter().zip(results) {
        let nkeys = match &out {
            Out::Values(v) => kinds.len() - v.len(),
            Out::Stages(s) => kinds.len() - s.len(),
            Out::StageColumn => kinds.len() - 1,
            Out::StageDays(s) => kinds.len() - s.len(),
        };
        for r in result {
            let key: Key = r[..nkeys].iter().map(to_json).collect();
            let nums: Vec<Option<f64>> = r[nkeys..].iter().map(to_f64).collect();
            match &out {
                Out::Values(names) => {
                    let vals = rows.entry(key);
                    for (n, v) in names.iter().zip(nums) {
                        vals.insert(n.clone(), v);
                    }
                }
                Out::Stages(stages) => {
                    for (s, v) in stages.iter().zip(nums) {
                        let mut k = key.clone();
                        k.push(json!(s));
                        rows.entry(k).insert("entered".into(), v);
                    }
                }
                Out::StageColumn => {
                    rows.entry(key).insert("days".into(), nums[0]);
                }
                Out::StageDays(stages) => {
                    for (s, v) in stages.iter().zip(nums) {
                        let mut k = key.clone();
                        k.push(json!(s));
                        rows.entry(k).insert("days".into(), v);
                    }
                }
            }
        }
        if let Out::Stages(s) = &out {
            stage_list = Some(s.clone());
        }
        if matches!(out, Out::StageColumn | Out::StageDays(_)) {
            stage_list = plan
                .per_stage
                .as_ref()
                .map(|ps| stage_order(app, reports, ps));
        }
    }
    // Fill: every combination of seen dimension values × every bucket × every stage.
    if grouped {
        let nd = plan.dims.len();
        let mut combos: Vec<Key> = vec![];
        for k in &rows.order {
            let c = k[..nd].to_vec();
            if !combos.contains(&c) {
                combos.push(c);
            }
        }
        if combos.is_empty() && nd == 0 {
            combos.push(vec![]);
        }
        let buckets: Vec<Option<Json>> = match (plan.grain, range) {
            (Some(g), Some((f, t))) => time::buckets(g, f, t)
                .into_iter()
                .map(|b| Some(json!(b.format("%Y-%m-%d").to_string())))
                .collect(),
            (Some(_), None) => {
                let mut seen: Vec<Json> = vec![];
                for k in &rows.order {
                    if !seen.contains(&k[nd]) {
                        seen.push(k[nd].clone());
                    }
                }
                seen.into_iter().map(Some).collect()
            }
            (None, _) => vec![None],
        };
        let stages: Vec<Option<Json>> = match &stage_list {
            Some(s) => s.iter().map(|x| Some(json!(x))).collect(),
            None => vec![None],
        };
        for c in &combos {
            for b in &buckets {
                for s in &stages {
                    let mut k = c.clone();
                    k.extend(b.clone());
                    k.extend(s.clone());
                    rows.entry(k);
                }
            }
        }
        // Bucketed rows outside the range (no range given) keep their own order.
    } else if rows.order.is_empty() {
        rows.entry(vec![]);
    }
    Ok((rows, range))
}

/// A key value as JSON: numbers as numbers (a computed dimension has no field scale).
fn to_json(v: &Value) -> Json {
    match v {
        Value::Decimal(d) => d
            .to_string()
            .parse::<f64>()
            .map(|f| json!(f))
            .unwrap_or(Json::Null),
        other => trellis_form::values::scalar_json(other, 0),
    }
}

fn to_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Decimal(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

/// One page of the records behind a number.
#[derive(Debug, Clone)]
pub struct DrillPage {
    /// The records.
    pub records: Vec<trellis_form::store::Record>,
    /// Cursor of the next page.
    pub next_cursor: Option<String>,
    /// The entity the records belong to.
    pub entity: String,
}

/// The records behind one number of an answer.
pub async fn drill(
    db: &Db,
    app: &App,
    reports: &Reports,
    dq: &DrillQuery,
    now: DateTime<Utc>,
    vis: &Visibility,
) -> Result<DrillPage> {
    let plan = plan(app, reports, &dq.query, now, db.backend())?;
    if plan.metrics.len() != 1 {
        return Err(qerr(
            "/metrics",
            "invalid_query",
            "Drill into one metric at a time.",
        ));
    }
    let name = plan.metrics[0].clone();
    let m = &reports.metrics[&name];
    // A ratio opens one of its parts.
    let (target, side) = match (&m.ratio, &m.kind) {
        (Some((n, d)), _) => match dq.side.as_deref() {
            Some("numerator") => (n.clone(), None),
            Some("denominator") => (d.clone(), None),
            _ => return Err(qerr("/side", "required", format!("`{name}` is a ratio: open its `numerator` ({n}) or `denominator` ({d}) records."))),
        },
        (None, Kind::Derived { needs, .. }) => {
            return Err(qerr("/metrics/0", "invalid_query", format!("`{name}` is computed from other metrics; drill into one of: {}.", needs.join(", "))))
        }
        _ => (name.clone(), dq.side.as_deref()),
    };
    let limit = dq.page_size.unwrap_or(50);
    if limit == 0 || limit > 1000 {
        return Err(qerr(
            "/page_size",
            "out_of_range",
            "page_size must be between 1 and 1000.",
        ));
    }
    let after = match &dq.cursor {
        None => None,
        Some(c) => Some(Uuid::parse_str(c).map_err(|_| {
            qerr(
                "/cursor",
                "bad_cursor",
                "The cursor is not one this server gave out.",
            )
        })?),
    };
    let tm = &reports.metrics[&target];
    let unit = match &tm.kind {
        Kind::Aggregate {
            agg: Agg::Percentile(_),
            ..
        } if db.backend() == Backend::Sqlite => Unit::Window {
            metric: target.clone(),
        },
        Kind::Aggregate { .. } => Unit::Aggs {
            entity: tm.entity.clone().unwrap_or_default(),
            time: anchor_of(&plan, tm),
            metrics: vec![target.clone()],
        },
        Kind::Conversion { .. } => Unit::Conversion {
            metric: target.clone(),
        },
        Kind::Funnel { .. } => Unit::Funnel {
            metric: target.clone(),
        },
        Kind::TimeInStage { .. } => Unit::TimeInStage {
            metric: target.clone(),
        },
        Kind::Derived { .. } => {
            return Err(qerr(
                "/metrics/0",
                "invalid_query",
                "Drill into a metric that counts records.",
            ))
        }
    };
    let drill = Drill {
        row: &dq.row,
        metric: &target,
        side,
        after,
        limit: limit + 1,
    };
    let (sql, kinds, _) = unit_sql(
        app,
        reports,
        &plan,
        &unit,
        plan.range,
        true,
        vis,
        Some(&drill),
    )?;
    let ids: Vec<Uuid> = db
        .fetch_all(&sql, &kinds)
        .await?
        .into_iter()
        .filter_map(|r| match r[0] {
            Value::Uuid(u) => Some(u),
            _ => None,
        })
        .collect();
    let more = ids.len() > limit as usize;
    let ids: Vec<Uuid> = ids.into_iter().take(limit as usize).collect();
    let entity = tm.entity.clone().unwrap_or_default();
    let e = app.entity(&entity)?;
    let records = if ids.is_empty() {
        vec![]
    } else {
        let q = trellis_form::query::ListQuery {
            filters: vec![Filter {
                field: "id".into(),
                op: "in".into(),
                value: json!(ids),
            }],
            sort: None,
            limit: Some(1000),
            cursor: None,
            count: false,
        };
        trellis_form::query::list(db, e, &q).await?.records
    };
    let next_cursor = if more {
        ids.last().map(|u| u.to_string())
    } else {
        None
    };
    Ok(DrillPage {
        records,
        next_cursor,
        entity,
    })
}

#[cfg(test)]
mod tests {
    use super::add_compensated;

    #[test]
    fn totals_summed_from_rows_keep_the_digits_of_large_amounts() {
        // 1,000 rows of 123,456,789.01: the exact total is 123,456,789,010.00. A plain float
        // sum drifts in the digits a total shows; the compensated one is the nearest float.
        let rows = vec![123_456_789.01_f64; 1000];
        let plain: f64 = rows.iter().sum();
        let (s, c) = rows
            .iter()
            .fold((0.0, 0.0), |acc, v| add_compensated(acc, *v));
        assert_eq!(s + c, 123_456_789_010.0);
        assert_ne!(plain, 123_456_789_010.0, "the plain sum drifts here");
    }
}
