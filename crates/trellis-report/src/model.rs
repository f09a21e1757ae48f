//! Report definitions (the `reports` section of an app) and their compiled, checked form.
//!
//! Each item of `reports` may hold `metrics` and `dashboards`, keyed by name; names are unique
//! across items. Every expression is parsed and type-checked against the app's entities once,
//! when the app is checked or loaded, and every dashboard query is checked against the metrics,
//! so a definition that loads can only fail at query time on the query the caller sends.

use crate::dialect;
use crate::expr::{self, BinOp, Expr};
use crate::lower::{Ctx, Ty};
use crate::query::Query;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use trellis_form::db::{Backend, Sql};
use trellis_form::def::{FieldType, Label, StageKind};
use trellis_form::model::App;
use trellis_form::{FormError, Problem, Result};

/// One item of the `reports` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsDef {
    /// Metrics by name.
    #[serde(default)]
    pub metrics: BTreeMap<String, MetricDef>,
    /// Dashboards by name.
    #[serde(default)]
    pub dashboards: BTreeMap<String, DashboardDef>,
    /// Alerts by name.
    #[serde(default)]
    pub alerts: BTreeMap<String, AlertDef>,
    /// Rollups by name.
    #[serde(default)]
    pub rollups: BTreeMap<String, crate::rollup::RollupDef>,
}

/// An alert: a query with a `flag` rule, evaluated on a schedule; flagged rows fire it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertDef {
    /// Display name.
    #[serde(default)]
    pub label: Option<Label>,
    /// The query; it needs `compare` and `flag`.
    pub query: Query,
    /// How often it is evaluated: `hour`, `day` (default) or `week`.
    #[serde(default = "day")]
    pub every: String,
}

fn day() -> String {
    "day".into()
}

/// A compiled alert.
#[derive(Debug, Clone)]
pub struct Alert {
    /// Name.
    pub name: String,
    /// Display label.
    pub label: String,
    /// The definition.
    pub def: AlertDef,
    /// Time between evaluations.
    pub every: chrono::Duration,
}

/// A metric as written in the definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum MetricDef {
    /// `agg` over the records of `entity`: count, count_distinct, sum, avg, min, max, median,
    /// percentile (with `p`).
    Aggregate {
        /// Entity key.
        entity: String,
        /// Aggregation.
        agg: String,
        /// The value aggregated (not for count).
        #[serde(default)]
        expr: Option<String>,
        /// Percentile, 0–1 (for `percentile`).
        #[serde(default)]
        p: Option<f64>,
        /// Only records where this holds.
        #[serde(default)]
        filter: Option<String>,
        /// The time field the metric is anchored on (default `created_at`).
        #[serde(default)]
        time: Option<String>,
        /// Display name.
        #[serde(default)]
        label: Option<Label>,
    },
    /// One metric over another, each aggregated on its own, then divided.
    Ratio {
        /// Numerator metric.
        numerator: String,
        /// Denominator metric.
        denominator: String,
        /// Display name.
        #[serde(default)]
        label: Option<Label>,
    },
    /// Arithmetic over other metrics.
    Derived {
        /// Expression over metric names.
        expr: String,
        /// Display name.
        #[serde(default)]
        label: Option<Label>,
    },
    /// Share of the records of `entity` that converted: produced a related record of another
    /// entity (within a window), or reached a state.
    Conversion {
        /// The base entity.
        entity: String,
        /// What counts as converted.
        converted: ConvertedDef,
        /// Only base records where this holds.
        #[serde(default)]
        filter: Option<String>,
        /// Time anchor of the base records (default `created_at`).
        #[serde(default)]
        time: Option<String>,
        /// Display name.
        #[serde(default)]
        label: Option<Label>,
    },
    /// Per stage of a pipeline: records that entered, went on, step and cumulative rates.
    Funnel {
        /// Entity key.
        entity: String,
        /// `ordered` or `reached`.
        #[serde(default = "ordered")]
        mode: String,
        /// Stage keys, in order (default: every open and won stage).
        #[serde(default)]
        stages: Option<Vec<String>>,
        /// Only records where this holds.
        #[serde(default)]
        filter: Option<String>,
        /// Time anchor (default `created_at`).
        #[serde(default)]
        time: Option<String>,
        /// Display name.
        #[serde(default)]
        label: Option<Label>,
    },
    /// Days spent in each stage (from the stage history), averaged or median.
    TimeInStage {
        /// Entity key.
        entity: String,
        /// `avg` or `median`.
        #[serde(default = "avg")]
        agg: String,
        /// Only records where this holds.
        #[serde(default)]
        filter: Option<String>,
        /// Time anchor (default `created_at`).
        #[serde(default)]
        time: Option<String>,
        /// Display name.
        #[serde(default)]
        label: Option<Label>,
    },
    /// Days between two instants of a record: `avg`, `median` or `p90`.
    Duration {
        /// Entity key.
        entity: String,
        /// Start (an expression: `created_at`).
        from: String,
        /// End (`entered_at('won')`).
        to: String,
        /// `avg`, `median` or `p90`.
        #[serde(default = "avg")]
        agg: String,
        /// Only records where this holds.
        #[serde(default)]
        filter: Option<String>,
        /// Time anchor (default: `to`).
        #[serde(default)]
        time: Option<String>,
        /// Display name.
        #[serde(default)]
        label: Option<Label>,
    },
    /// Σ amount × the current stage's win probability over open records: a snapshot, bucketed
    /// only by its own time field.
    Forecast {
        /// Entity key.
        entity: String,
        /// The amount expression.
        amount: String,
        /// The time field (e.g. `expected_close_date`).
        time: String,
        /// Only records where this holds.
        #[serde(default)]
        filter: Option<String>,
        /// Display name.
        #[serde(default)]
        label: Option<Label>,
    },
}

fn ordered() -> String {
    "ordered".into()
}
fn avg() -> String {
    "avg".into()
}

/// What a conversion counts as converted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertedDef {
    /// The entity whose records mark a conversion (`opportunity`).
    #[serde(default)]
    pub entity: Option<String>,
    /// Its relation field pointing back at the base record (`lead`).
    #[serde(default)]
    pub via: Option<String>,
    /// Only related records created within this many days of the base record.
    #[serde(default)]
    pub within_days: Option<u32>,
    /// Leave out base records whose window has not closed yet.
    #[serde(default)]
    pub exclude_immature: bool,
    /// Or: a condition on the base record (`status == 'qualified'`).
    #[serde(default)]
    pub when: Option<String>,
}

/// A dashboard: named queries with a chart hint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardDef {
    /// Display name.
    #[serde(default)]
    pub label: Option<Label>,
    /// The panels, in order.
    pub items: Vec<DashboardItem>,
}

/// One dashboard panel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardItem {
    /// Stable key within the dashboard.
    pub key: String,
    /// Title.
    #[serde(default)]
    pub title: Option<Label>,
    /// `number`, `bar`, `line`, `funnel` or `table`.
    pub chart: String,
    /// The query.
    pub query: Query,
}

/// Chart hints a dashboard item may give.
pub const CHARTS: [&str; 5] = ["number", "bar", "line", "funnel", "table"];

/// How a metric is computed.
#[derive(Debug, Clone)]
pub enum Kind {
    /// One aggregate over one entity.
    Aggregate {
        /// The aggregation.
        agg: Agg,
        /// Value aggregated (None for count).
        expr: Option<Expr>,
    },
    /// Arithmetic over other metrics, computed per row after gaps are filled.
    Derived {
        /// The expression (paths are metric names).
        expr: Expr,
        /// Metrics it needs.
        needs: Vec<String>,
    },
    /// Converted base records / base records.
    Conversion {
        /// `(entity, via field, within days)` for related-record conversions.
        related: Option<(String, String, Option<u32>)>,
        /// Condition on the base record for state conversions.
        when: Option<Expr>,
        /// Leave out base records whose window is still open.
        exclude_immature: bool,
    },
    /// A stage funnel.
    Funnel {
        /// Stage field key.
        stage_field: String,
        /// Stage keys in order.
        stages: Vec<String>,
        /// `ordered` (true) or `reached`.
        ordered: bool,
    },
    /// Days in stage.
    TimeInStage {
        /// Stage field key.
        stage_field: String,
        /// Avg or median.
        agg: Agg,
    },
}

/// An aggregation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Agg {
    /// Number of records.
    Count,
    /// Number of distinct values.
    CountDistinct,
    /// Sum (0 when empty).
    Sum,
    /// Mean (null when empty).
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Continuous percentile (0.5 = median).
    Percentile(f64),
}

impl Agg {
    fn parse(s: &str, p: Option<f64>) -> std::result::Result<Agg, String> {
        Ok(match s {
            "count" => Agg::Count,
            "count_distinct" => Agg::CountDistinct,
            "sum" => Agg::Sum,
            "avg" => Agg::Avg,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "median" => Agg::Percentile(0.5),
            "p90" => Agg::Percentile(0.9),
            "percentile" => match p {
                Some(p) if (0.0..=1.0).contains(&p) => Agg::Percentile(p),
                _ => return Err("a percentile needs `p` between 0 and 1".into()),
            },
            other => {
                return Err(format!(
                    "`{other}` is not an aggregation; use count, count_distinct, sum, avg, min, max, median, p90 or percentile"
                ))
            }
        })
    }

    /// Whether an empty bucket is 0 (counts and sums) rather than null.
    pub fn zero_when_empty(self) -> bool {
        matches!(self, Agg::Count | Agg::CountDistinct | Agg::Sum)
    }
}

/// A compiled metric.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Name.
    pub name: String,
    /// Display label (English or first).
    pub label: String,
    /// Entity (None for derived metrics).
    pub entity: Option<String>,
    /// Time anchor expression (a column of the entity).
    pub time: Option<Expr>,
    /// Record filter.
    pub filter: Option<Expr>,
    /// How it is computed.
    pub kind: Kind,
    /// A snapshot (forecast): refuses to be bucketed by another time field.
    pub snapshot: bool,
    /// A ratio (numerator, denominator), for drill-down sides.
    pub ratio: Option<(String, String)>,
    /// The metric's type name as defined.
    pub type_name: &'static str,
}

impl Metric {
    /// Whether the metric answers per stage (funnel, time in stage).
    pub fn per_stage(&self) -> bool {
        matches!(self.kind, Kind::Funnel { .. } | Kind::TimeInStage { .. })
    }

    /// Whether the value counts records (rendered as an integer).
    pub fn integral(&self) -> bool {
        matches!(
            self.kind,
            Kind::Aggregate {
                agg: Agg::Count | Agg::CountDistinct,
                ..
            }
        )
    }
}

/// A compiled dashboard.
#[derive(Debug, Clone)]
pub struct Dashboard {
    /// Name.
    pub name: String,
    /// The definition.
    pub def: DashboardDef,
}

/// The compiled reports of an app.
#[derive(Debug, Clone, Default)]
pub struct Reports {
    /// Metrics by name.
    pub metrics: BTreeMap<String, Metric>,
    /// Dashboards by name.
    pub dashboards: BTreeMap<String, Dashboard>,
    /// Alerts by name.
    pub alerts: BTreeMap<String, Alert>,
    /// Rollups by name.
    pub rollups: BTreeMap<String, crate::rollup::Rollup>,
}

impl Reports {
    /// Compile and check the `reports` section of `app`; every problem at once, with JSON paths
    /// into the definition (`/reports/0/metrics/win_rate/filter`).
    pub fn compile(app: &App) -> Result<Reports> {
        let mut problems = vec![];
        let mut out = Reports::default();
        let mut defs: Vec<(String, String, MetricDef)> = vec![];
        let mut rollups: Vec<(String, String, crate::rollup::RollupDef)> = vec![];
        for (i, item) in app.def.reports.iter().enumerate() {
            let base = format!("/reports/{i}");
            let parsed: ReportsDef = match serde_path_to_error::deserialize(item) {
                Ok(d) => d,
                Err(e) => {
                    let p = e.path().to_string();
                    let ptr = if p == "." {
                        base.clone()
                    } else {
                        format!("{base}/{}", p.replace('.', "/"))
                    };
                    problems.push(Problem::new(ptr, "invalid", e.inner().to_string()));
                    continue;
                }
            };
            for (name, m) in parsed.metrics {
                let path = format!("{base}/metrics/{name}");
                if defs.iter().any(|(n, ..)| *n == name) {
                    problems.push(Problem::new(
                        &path,
                        "duplicate",
                        format!("the metric `{name}` is defined twice"),
                    ));
                    continue;
                }
                if !valid_name(&name) {
                    problems.push(Problem::new(&path, "invalid_name", format!("`{name}` is not a valid metric name: use lowercase letters, digits and _ (at most 63)")));
                    continue;
                }
                defs.push((name, path, m));
            }
            for (name, r) in parsed.rollups {
                let path = format!("{base}/rollups/{name}");
                if rollups.iter().any(|(n, ..)| *n == name) || !valid_name(&name) {
                    problems.push(Problem::new(&path, "invalid_name", format!("`{name}` is defined twice or is not a valid rollup name (lowercase letters, digits and _)")));
                    continue;
                }
                rollups.push((name, path, r));
            }
            for (name, a) in parsed.alerts {
                let path = format!("{base}/alerts/{name}");
                if out.alerts.contains_key(&name) || !valid_name(&name) {
                    problems.push(Problem::new(&path, "invalid_name", format!("`{name}` is defined twice or is not a valid alert name (lowercase letters, digits and _)")));
                    continue;
                }
                let every = match a.every.as_str() {
                    "hour" => chrono::Duration::hours(1),
                    "day" => chrono::Duration::days(1),
                    "week" => chrono::Duration::weeks(1),
                    other => {
                        problems.push(Problem::new(
                            format!("{path}/every"),
                            "invalid",
                            format!("`{other}` is not a schedule; use hour, day or week"),
                        ));
                        continue;
                    }
                };
                if a.query.flag.is_none() {
                    problems.push(Problem::new(format!("{path}/query/flag"), "required", "an alert fires on flagged rows: give the query a `compare` and a `flag` rule"));
                    continue;
                }
                let label = a
                    .label
                    .as_ref()
                    .map(|l| l.get("en", &name).to_owned())
                    .unwrap_or_else(|| name.clone());
                out.alerts.insert(
                    name.clone(),
                    Alert {
                        name,
                        label,
                        def: a,
                        every,
                    },
                );
            }
            for (name, d) in parsed.dashboards {
                let path = format!("{base}/dashboards/{name}");
                if out.dashboards.contains_key(&name) {
                    problems.push(Problem::new(
                        &path,
                        "duplicate",
                        format!("the dashboard `{name}` is defined twice"),
                    ));
                    continue;
                }
                if !valid_name(&name) {
                    problems.push(Problem::new(
                        &path,
                        "invalid_name",
                        format!("`{name}` is not a valid dashboard name: use lowercase letters, digits and _ (at most 63)"),
                    ));
                    continue;
                }
                out.dashboards
                    .insert(name.clone(), Dashboard { name, def: d });
            }
        }
        for (name, path, def) in &defs {
            match compile_metric(app, name, def) {
                Ok(m) => {
                    out.metrics.insert(name.clone(), m);
                }
                Err(ps) => {
                    problems.extend(ps.into_iter().map(|(sub, msg)| {
                        Problem::new(format!("{path}{sub}"), "invalid_metric", msg)
                    }))
                }
            }
        }
        // References between metrics: they exist, have the right kind, and form no cycle.
        for (name, path, _) in &defs {
            let Some(m) = out.metrics.get(name) else {
                continue;
            };
            if let Some((n, d)) = &m.ratio {
                for (side, r) in [("numerator", n), ("denominator", d)] {
                    match out.metrics.get(r) {
                        None if !defs.iter().any(|(x, ..)| x == r) => problems.push(Problem::new(
                            format!("{path}/{side}"),
                            "unknown_metric",
                            format!("`{r}` is not a metric"),
                        )),
                        Some(x) if !matches!(x.kind, Kind::Aggregate { .. }) => {
                            problems.push(Problem::new(
                                format!("{path}/{side}"),
                                "invalid_metric",
                                format!(
                                    "a ratio divides aggregate metrics; `{r}` is a {}",
                                    x.type_name
                                ),
                            ))
                        }
                        _ => {}
                    }
                }
            } else if let Kind::Derived { needs, .. } = &m.kind {
                for n in needs {
                    match out.metrics.get(n) {
                        None if !defs.iter().any(|(x, ..)| x == n) => problems.push(Problem::new(
                            format!("{path}/expr"),
                            "unknown_metric",
                            format!("`{n}` is not a metric"),
                        )),
                        Some(x) if x.per_stage() => problems.push(Problem::new(
                            format!("{path}/expr"),
                            "invalid_metric",
                            format!("`{n}` answers per stage and cannot be used in arithmetic"),
                        )),
                        _ => {}
                    }
                }
                if cycle(&out.metrics, name, &mut vec![]) {
                    problems.push(Problem::new(
                        format!("{path}/expr"),
                        "cycle",
                        format!("`{name}` depends on itself"),
                    ));
                }
            }
        }
        let (compiled, ps) = crate::rollup::compile(app, &out.metrics, &rollups);
        out.rollups = compiled;
        problems.extend(ps);
        if problems.is_empty() {
            for (name, d) in &out.dashboards {
                let base = section_path(app, "dashboards", name);
                for (j, item) in d.def.items.iter().enumerate() {
                    let p = format!("{base}/items/{j}");
                    if !CHARTS.contains(&item.chart.as_str()) {
                        problems.push(Problem::new(
                            format!("{p}/chart"),
                            "invalid",
                            format!(
                                "`{}` is not a chart; use one of: {}",
                                item.chart,
                                CHARTS.join(", ")
                            ),
                        ));
                    }
                    if d.def.items[..j].iter().any(|x| x.key == item.key) {
                        problems.push(Problem::new(
                            format!("{p}/key"),
                            "duplicate",
                            format!("the item `{}` appears twice", item.key),
                        ));
                    }
                    check_query(app, &out, &item.query, &format!("{p}/query"), &mut problems);
                }
            }
            for name in out.alerts.keys() {
                let path = format!("{}/query", section_path(app, "alerts", name));
                check_query(app, &out, &out.alerts[name].def.query, &path, &mut problems);
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            problems.dedup();
            Err(FormError::Definition(problems))
        }
    }
}

/// The JSON pointer of a dashboard or alert in the definition.
fn section_path(app: &App, section: &str, name: &str) -> String {
    for (i, item) in app.def.reports.iter().enumerate() {
        if item.get(section).and_then(|d| d.get(name)).is_some() {
            return format!("/reports/{i}/{section}/{name}");
        }
    }
    format!("/reports/{section}/{name}")
}

/// A stored query (dashboard panel, alert) must plan on both backends.
fn check_query(app: &App, reports: &Reports, q: &Query, path: &str, problems: &mut Vec<Problem>) {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if let Err(FormError::Query(ps)) =
            crate::engine::plan(app, reports, q, chrono::DateTime::UNIX_EPOCH, backend)
        {
            problems.extend(ps.into_iter().map(|x| x.prefixed(path)));
            return;
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn cycle(ms: &BTreeMap<String, Metric>, name: &str, stack: &mut Vec<String>) -> bool {
    if stack.iter().any(|s| s == name) {
        return true;
    }
    let Some(m) = ms.get(name) else { return false };
    let needs: Vec<String> = match (&m.kind, &m.ratio) {
        (_, Some((a, b))) => vec![a.clone(), b.clone()],
        (Kind::Derived { needs, .. }, _) => needs.clone(),
        _ => return false,
    };
    stack.push(name.to_owned());
    let found = needs.iter().any(|n| cycle(ms, n, stack));
    stack.pop();
    found
}

type Errs = Vec<(String, String)>;

/// Parse and type-check an expression over `entity`; `want` is the type it must have.
fn check_expr(
    app: &App,
    entity: &str,
    src: &str,
    want: Option<Ty>,
    at: &str,
    errs: &mut Errs,
) -> Option<Expr> {
    let e = match expr::parse(src) {
        Ok(e) => e,
        Err(m) => {
            errs.push((at.into(), format!("`{src}` {m}")));
            return None;
        }
    };
    let Ok(ent) = app.entity(entity) else {
        return None;
    };
    let mut ctx = Ctx::new(app, ent, dialect::of(Backend::Sqlite));
    match ctx.lower(&e, &mut Sql::default()) {
        Ok(t) => match want {
            Some(w) if t.ty != w && !(w == Ty::Num && t.ty == Ty::Null) => {
                let what = match w {
                    Ty::Bool => "a condition (true or false)",
                    Ty::Num => "a number",
                    _ => "a date",
                };
                errs.push((at.into(), format!("`{src}` must be {what}")));
                None
            }
            _ => Some(e),
        },
        Err(m) => {
            errs.push((at.into(), format!("`{src}`: {m}")));
            None
        }
    }
}

/// A time anchor: a date or datetime column of the entity itself.
fn check_time(app: &App, entity: &str, src: &str, at: &str, errs: &mut Errs) -> Option<Expr> {
    let e = check_expr(app, entity, src, None, at, errs)?;
    let ent = app.entity(entity).ok()?;
    let mut ctx = Ctx::new(app, ent, dialect::of(Backend::Sqlite));
    let t = ctx.lower(&e, &mut Sql::default()).ok()?;
    if !t.base_column || !matches!(t.ty, Ty::Date | Ty::DateTime) {
        errs.push((
            at.into(),
            format!("`{src}` must be a date or date-time field of {}", ent.label),
        ));
        return None;
    }
    Some(e)
}

fn compile_metric(app: &App, name: &str, def: &MetricDef) -> std::result::Result<Metric, Errs> {
    let mut errs: Errs = vec![];
    let entity_ok = |key: &str, errs: &mut Errs| -> bool {
        if app.entity(key).is_ok() {
            true
        } else {
            errs.push((
                "/entity".into(),
                format!(
                    "`{key}` is not an entity of this app; use one of: {}",
                    app.entities
                        .iter()
                        .map(|e| e.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            false
        }
    };
    let label_of = |l: &Option<Label>| {
        l.as_ref()
            .map(|l| l.get("en", name).to_owned())
            .unwrap_or_else(|| name.to_owned())
    };
    let mut m = Metric {
        name: name.into(),
        label: name.into(),
        entity: None,
        time: None,
        filter: None,
        kind: Kind::Aggregate {
            agg: Agg::Count,
            expr: None,
        },
        snapshot: false,
        ratio: None,
        type_name: "aggregate",
    };
    let common = |m: &mut Metric,
                  entity: &str,
                  filter: &Option<String>,
                  time: Option<&str>,
                  errs: &mut Errs| {
        m.entity = Some(entity.into());
        m.filter = filter
            .as_ref()
            .and_then(|f| check_expr(app, entity, f, Some(Ty::Bool), "/filter", errs));
        m.time = check_time(app, entity, time.unwrap_or("created_at"), "/time", errs);
    };
    match def {
        MetricDef::Aggregate {
            entity,
            agg,
            expr,
            p,
            filter,
            time,
            label,
        } => {
            m.label = label_of(label);
            if entity_ok(entity, &mut errs) {
                common(&mut m, entity, filter, time.as_deref(), &mut errs);
                match Agg::parse(agg, *p) {
                    Err(msg) => errs.push(("/agg".into(), msg)),
                    Ok(agg) => {
                        let want = match agg {
                            Agg::Count => None,
                            Agg::CountDistinct => Some(None),
                            _ => Some(Some(Ty::Num)),
                        };
                        let expr = match (want, expr) {
                            (None, Some(_)) => {
                                errs.push(("/expr".into(), "count counts records and takes no `expr`; use count_distinct to count values".into()));
                                None
                            }
                            (None, None) => None,
                            (Some(_), None) => {
                                errs.push((
                                    "/expr".into(),
                                    format!("`{agg:?}` needs an `expr`").to_lowercase(),
                                ));
                                None
                            }
                            (Some(w), Some(src)) => {
                                check_expr(app, entity, src, w, "/expr", &mut errs)
                            }
                        };
                        m.kind = Kind::Aggregate { agg, expr };
                    }
                }
            }
        }
        MetricDef::Duration {
            entity,
            from,
            to,
            agg,
            filter,
            time,
            label,
        } => {
            m.label = label_of(label);
            m.type_name = "duration";
            if entity_ok(entity, &mut errs) {
                common(
                    &mut m,
                    entity,
                    filter,
                    Some(time.as_deref().unwrap_or(to)),
                    &mut errs,
                );
                let a = check_time(app, entity, from, "/from", &mut errs);
                let b = check_time(app, entity, to, "/to", &mut errs);
                let agg = match agg.as_str() {
                    "avg" => Some(Agg::Avg),
                    "median" => Some(Agg::Percentile(0.5)),
                    "p90" => Some(Agg::Percentile(0.9)),
                    other => {
                        errs.push((
                            "/agg".into(),
                            format!(
                                "`{other}` is not a duration aggregation; use avg, median or p90"
                            ),
                        ));
                        None
                    }
                };
                if let (Some(a), Some(b), Some(agg)) = (a, b, agg) {
                    let both = Expr::Binary(
                        BinOp::And,
                        Box::new(Expr::IsNull(Box::new(a.clone()), true)),
                        Box::new(Expr::IsNull(Box::new(b.clone()), true)),
                    );
                    m.filter = Some(match m.filter.take() {
                        Some(f) => Expr::Binary(BinOp::And, Box::new(f), Box::new(both)),
                        None => both,
                    });
                    m.kind = Kind::Aggregate {
                        agg,
                        expr: Some(Expr::Call("days_between".into(), vec![a, b])),
                    };
                }
            }
        }
        MetricDef::Forecast {
            entity,
            amount,
            time,
            filter,
            label,
        } => {
            m.label = label_of(label);
            m.type_name = "forecast";
            m.snapshot = true;
            if entity_ok(entity, &mut errs) {
                common(&mut m, entity, filter, Some(time), &mut errs);
                let e = app.entity(entity).expect("checked");
                match e.stage() {
                    None => errs.push(("/entity".into(), format!("a forecast weighs amounts by stage probability, and {} has no stage field", e.label))),
                    Some(sf) => {
                        let amount = check_expr(app, entity, amount, Some(Ty::Num), "/amount", &mut errs);
                        let open = Expr::Binary(
                            BinOp::Eq,
                            Box::new(Expr::Path(vec![sf.key.clone(), "kind".into()])),
                            Box::new(Expr::Str("open".into())),
                        );
                        m.filter = Some(match m.filter.take() {
                            Some(f) => Expr::Binary(BinOp::And, Box::new(f), Box::new(open)),
                            None => open,
                        });
                        if let Some(a) = amount {
                            m.kind = Kind::Aggregate {
                                agg: Agg::Sum,
                                expr: Some(Expr::Binary(
                                    BinOp::Mul,
                                    Box::new(a),
                                    Box::new(Expr::Path(vec![sf.key.clone(), "probability".into()])),
                                )),
                            };
                        }
                    }
                }
            }
        }
        MetricDef::Ratio {
            numerator,
            denominator,
            label,
        } => {
            m.label = label_of(label);
            m.type_name = "ratio";
            m.ratio = Some((numerator.clone(), denominator.clone()));
            m.kind = Kind::Derived {
                expr: Expr::Binary(
                    BinOp::Div,
                    Box::new(Expr::Path(vec![numerator.clone()])),
                    Box::new(Expr::Path(vec![denominator.clone()])),
                ),
                needs: vec![numerator.clone(), denominator.clone()],
            };
        }
        MetricDef::Derived { expr: src, label } => {
            m.label = label_of(label);
            m.type_name = "derived";
            match expr::parse(src) {
                Err(msg) => errs.push(("/expr".into(), format!("`{src}` {msg}"))),
                Ok(e) => {
                    if let Err(msg) = arithmetic_only(&e) {
                        errs.push(("/expr".into(), msg));
                    }
                    let mut needs = vec![];
                    expr::names(&e, &mut needs);
                    needs.dedup();
                    m.kind = Kind::Derived { expr: e, needs };
                }
            }
        }
        MetricDef::Conversion {
            entity,
            converted,
            filter,
            time,
            label,
        } => {
            m.label = label_of(label);
            m.type_name = "conversion";
            if entity_ok(entity, &mut errs) {
                common(&mut m, entity, filter, time.as_deref(), &mut errs);
                let related = match (&converted.entity, &converted.via) {
                    (Some(ce), Some(via)) => match app.entity(ce) {
                        Err(_) => {
                            errs.push((
                                "/converted/entity".into(),
                                format!("`{ce}` is not an entity of this app"),
                            ));
                            None
                        }
                        Ok(target) => match target.field(via) {
                            Some(f)
                                if f.ty == FieldType::Relation
                                    && f.def.entity.as_deref() == Some(entity.as_str()) =>
                            {
                                Some((ce.clone(), via.clone(), converted.within_days))
                            }
                            _ => {
                                errs.push(("/converted/via".into(), format!("`{via}` must be a relation field of {} pointing to {entity}", target.label)));
                                None
                            }
                        },
                    },
                    (None, None) => None,
                    _ => {
                        errs.push(("/converted".into(), "name both `entity` and `via` (a related record converts), or use `when`".into()));
                        None
                    }
                };
                let when = converted.when.as_ref().and_then(|w| {
                    check_expr(app, entity, w, Some(Ty::Bool), "/converted/when", &mut errs)
                });
                match (&related, &converted.when) {
                    (None, None) if errs.is_empty() => errs.push((
                        "/converted".into(),
                        "say what converts: `entity` + `via`, or `when`".into(),
                    )),
                    (Some(_), Some(_)) => errs.push((
                        "/converted".into(),
                        "use either `entity` + `via` or `when`, not both".into(),
                    )),
                    _ => {}
                }
                if related.is_none() && converted.when.is_some() && converted.within_days.is_some()
                {
                    errs.push((
                        "/converted/within_days".into(),
                        "a window applies to related records (`entity` + `via`), not to `when`"
                            .into(),
                    ));
                }
                if converted.exclude_immature && converted.within_days.is_none() {
                    errs.push((
                        "/converted/exclude_immature".into(),
                        "only a conversion with `within_days` has a window that can still be open"
                            .into(),
                    ));
                }
                m.kind = Kind::Conversion {
                    related,
                    when,
                    exclude_immature: converted.exclude_immature,
                };
            }
        }
        MetricDef::Funnel {
            entity,
            mode,
            stages,
            filter,
            time,
            label,
        } => {
            m.label = label_of(label);
            m.type_name = "funnel";
            if entity_ok(entity, &mut errs) {
                common(&mut m, entity, filter, time.as_deref(), &mut errs);
                let e = app.entity(entity).expect("checked");
                let ordered = match mode.as_str() {
                    "ordered" => true,
                    "reached" => false,
                    other => {
                        errs.push((
                            "/mode".into(),
                            format!("`{other}` is not a funnel mode; use ordered or reached"),
                        ));
                        true
                    }
                };
                match e.stage() {
                    None => errs.push((
                        "/entity".into(),
                        format!("a funnel runs over a stage field, and {} has none", e.label),
                    )),
                    Some(sf) => {
                        let keys = match stages {
                            Some(list) => {
                                for (i, s) in list.iter().enumerate() {
                                    if sf.stage(s).is_none() {
                                        errs.push((
                                            format!("/stages/{i}"),
                                            format!("'{s}' is not a stage of {}", sf.label),
                                        ));
                                    }
                                }
                                if list.len() < 2 {
                                    errs.push((
                                        "/stages".into(),
                                        "a funnel needs at least two stages".into(),
                                    ));
                                }
                                list.clone()
                            }
                            None => sf
                                .stages
                                .iter()
                                .filter(|s| s.kind != StageKind::Lost)
                                .map(|s| s.key.clone())
                                .collect(),
                        };
                        m.kind = Kind::Funnel {
                            stage_field: sf.key.clone(),
                            stages: keys,
                            ordered,
                        };
                    }
                }
            }
        }
        MetricDef::TimeInStage {
            entity,
            agg,
            filter,
            time,
            label,
        } => {
            m.label = label_of(label);
            m.type_name = "time_in_stage";
            if entity_ok(entity, &mut errs) {
                common(&mut m, entity, filter, time.as_deref(), &mut errs);
                let e = app.entity(entity).expect("checked");
                let agg = match agg.as_str() {
                    "avg" => Agg::Avg,
                    "median" => Agg::Percentile(0.5),
                    other => {
                        errs.push((
                            "/agg".into(),
                            format!("`{other}` is not allowed here; use avg or median"),
                        ));
                        Agg::Avg
                    }
                };
                match e.stage() {
                    None => errs.push((
                        "/entity".into(),
                        format!(
                            "time in stage needs a stage field, and {} has none",
                            e.label
                        ),
                    )),
                    Some(sf) => {
                        m.kind = Kind::TimeInStage {
                            stage_field: sf.key.clone(),
                            agg,
                        }
                    }
                }
            }
        }
    }
    if errs.is_empty() {
        Ok(m)
    } else {
        Err(errs)
    }
}

fn arithmetic_only(e: &Expr) -> std::result::Result<(), String> {
    match e {
        Expr::Num(_) | Expr::Path(_) => Ok(()),
        Expr::Unary(crate::expr::UnOp::Neg, a) => arithmetic_only(a),
        Expr::Binary(BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div, a, b) => {
            arithmetic_only(a)?;
            arithmetic_only(b)
        }
        _ => Err("a derived metric is arithmetic (+ - * /) over metric names and numbers".into()),
    }
}
