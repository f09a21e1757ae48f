//! `trellis bench reports`: each CRM metric and the `sales_overview` dashboard over generated
//! opportunities, each beside a hand-written SQL query for the same answer in the same run.
//!
//! The data comes from [`crate::demo_data`] (the `trellis demo-data` generator), deterministic
//! for a seed. The hand-written baselines are written per backend (SQLite and PostgreSQL).

use anyhow::Context;
use chrono::{TimeZone, Utc};
use std::time::Instant;
use trellis_form::db::{Backend, Db, Sql};
use trellis_form::model::App;
use trellis_report::{engine, Query, Reports, Visibility};
use uuid::Uuid;

/// The hand-written SQL for each CRM metric on `backend`, the baseline of the benchmark.
pub fn baselines(backend: Backend) -> Vec<(&'static str, &'static str)> {
    match backend {
        Backend::Sqlite => sqlite_baselines(),
        Backend::Postgres => postgres_baselines(),
    }
}

fn postgres_baselines() -> Vec<(&'static str, &'static str)> {
    vec![
        ("pipeline_value", "SELECT SUM(\"amount\") FROM \"crm__opportunity\" WHERE \"stage\" IN ('mql','sql','proposal','quoted','negotiation')"),
        ("weighted_forecast", "SELECT SUM(\"amount\" * CASE \"stage\" WHEN 'mql' THEN 0.1 WHEN 'sql' THEN 0.2 WHEN 'proposal' THEN 0.4 WHEN 'quoted' THEN 0.6 WHEN 'negotiation' THEN 0.8 END) FROM \"crm__opportunity\" WHERE \"stage\" IN ('mql','sql','proposal','quoted','negotiation')"),
        ("win_rate", "SELECT COUNT(*) FILTER (WHERE \"stage\" = 'won')::numeric / NULLIF(COUNT(*) FILTER (WHERE \"stage\" IN ('won','lost')), 0) FROM \"crm__opportunity\""),
        ("avg_deal_size", "SELECT AVG(\"amount\") FROM \"crm__opportunity\" WHERE \"stage\" = 'won'"),
        ("sales_cycle_days", "SELECT AVG(EXTRACT(EPOCH FROM \"stage__entered_won\" - \"created_at\") / 86400.0) FROM \"crm__opportunity\" WHERE \"stage__entered_won\" IS NOT NULL"),
        // From the lead's `first_opportunity_at` summary, as a hand-writer with that column would:
        // a probe only for a lead whose first opportunity came before it (docs/benchmarks.md).
        ("lead_conversion", "SELECT COUNT(*)::numeric / (SELECT COUNT(*) FROM \"crm__lead\") FROM \"crm__lead\" l WHERE l.\"first_opportunity_at\" IS NOT NULL AND (l.\"first_opportunity_at\" >= l.\"created_at\" OR EXISTS (SELECT 1 FROM \"crm__opportunity\" o WHERE o.\"lead\" = l.\"id\" AND o.\"created_at\" >= l.\"created_at\"))"),
        ("stage_conversion", "SELECT COUNT(*) FILTER (WHERE \"stage__entered_mql\" IS NOT NULL OR \"stage__entered_sql\" IS NOT NULL OR \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL), COUNT(*) FILTER (WHERE \"stage__entered_sql\" IS NOT NULL OR \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL), COUNT(*) FILTER (WHERE \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL), COUNT(*) FILTER (WHERE \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL), COUNT(*) FILTER (WHERE \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL), COUNT(\"stage__entered_won\") FROM \"crm__opportunity\""),
        ("time_in_stage", "SELECT AVG(CASE WHEN \"stage__entered_mql\" IS NOT NULL THEN COALESCE(\"stage__days_mql\", 0) + CASE WHEN \"stage\" = 'mql' THEN EXTRACT(EPOCH FROM TIMESTAMPTZ '2026-11-27T12:00:00Z' - \"stage__changed_at\") / 86400.0 ELSE 0 END END), AVG(CASE WHEN \"stage__entered_sql\" IS NOT NULL THEN COALESCE(\"stage__days_sql\", 0) + CASE WHEN \"stage\" = 'sql' THEN EXTRACT(EPOCH FROM TIMESTAMPTZ '2026-11-27T12:00:00Z' - \"stage__changed_at\") / 86400.0 ELSE 0 END END), AVG(CASE WHEN \"stage__entered_proposal\" IS NOT NULL THEN COALESCE(\"stage__days_proposal\", 0) + CASE WHEN \"stage\" = 'proposal' THEN EXTRACT(EPOCH FROM TIMESTAMPTZ '2026-11-27T12:00:00Z' - \"stage__changed_at\") / 86400.0 ELSE 0 END END), AVG(CASE WHEN \"stage__entered_quoted\" IS NOT NULL THEN COALESCE(\"stage__days_quoted\", 0) + CASE WHEN \"stage\" = 'quoted' THEN EXTRACT(EPOCH FROM TIMESTAMPTZ '2026-11-27T12:00:00Z' - \"stage__changed_at\") / 86400.0 ELSE 0 END END), AVG(CASE WHEN \"stage__entered_negotiation\" IS NOT NULL THEN COALESCE(\"stage__days_negotiation\", 0) + CASE WHEN \"stage\" = 'negotiation' THEN EXTRACT(EPOCH FROM TIMESTAMPTZ '2026-11-27T12:00:00Z' - \"stage__changed_at\") / 86400.0 ELSE 0 END END) FROM \"crm__opportunity\""),
    ]
}

fn sqlite_baselines() -> Vec<(&'static str, &'static str)> {
    vec![
        ("pipeline_value", "SELECT SUM(\"amount\") FROM \"crm__opportunity\" WHERE \"stage\" IN ('mql','sql','proposal','quoted','negotiation')"),
        ("weighted_forecast", "SELECT SUM(\"amount\" * CASE \"stage\" WHEN 'mql' THEN 0.1 WHEN 'sql' THEN 0.2 WHEN 'proposal' THEN 0.4 WHEN 'quoted' THEN 0.6 WHEN 'negotiation' THEN 0.8 END) FROM \"crm__opportunity\" WHERE \"stage\" IN ('mql','sql','proposal','quoted','negotiation')"),
        ("win_rate", "SELECT CAST(SUM(\"stage\" = 'won') AS REAL) / NULLIF(SUM(\"stage\" IN ('won','lost')), 0) FROM \"crm__opportunity\""),
        ("avg_deal_size", "SELECT AVG(\"amount\") FROM \"crm__opportunity\" WHERE \"stage\" = 'won'"),
        ("sales_cycle_days", "SELECT AVG(julianday(\"stage__entered_won\") - julianday(\"created_at\")) FROM \"crm__opportunity\" WHERE \"stage__entered_won\" IS NOT NULL"),
        // From the lead's `first_opportunity_at` summary, as a hand-writer with that column would:
        // a probe only for a lead whose first opportunity came before it (docs/benchmarks.md).
        ("lead_conversion", "SELECT CAST(COUNT(*) AS REAL) / (SELECT COUNT(*) FROM \"crm__lead\") FROM \"crm__lead\" l WHERE l.\"first_opportunity_at\" IS NOT NULL AND (l.\"first_opportunity_at\" >= l.\"created_at\" OR EXISTS (SELECT 1 FROM \"crm__opportunity\" o WHERE o.\"lead\" = l.\"id\" AND o.\"created_at\" >= l.\"created_at\"))"),
        ("stage_conversion", "SELECT COUNT(CASE WHEN \"stage__entered_mql\" IS NOT NULL OR \"stage__entered_sql\" IS NOT NULL OR \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(CASE WHEN \"stage__entered_sql\" IS NOT NULL OR \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(CASE WHEN \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(CASE WHEN \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(CASE WHEN \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(\"stage__entered_won\") FROM \"crm__opportunity\""),
        ("time_in_stage", "SELECT AVG(CASE WHEN \"stage__entered_mql\" IS NOT NULL THEN COALESCE(\"stage__days_mql\", 0) + CASE WHEN \"stage\" = 'mql' THEN julianday('2026-11-27T12:00:00.000000Z') - julianday(\"stage__changed_at\") ELSE 0 END END), AVG(CASE WHEN \"stage__entered_sql\" IS NOT NULL THEN COALESCE(\"stage__days_sql\", 0) + CASE WHEN \"stage\" = 'sql' THEN julianday('2026-11-27T12:00:00.000000Z') - julianday(\"stage__changed_at\") ELSE 0 END END), AVG(CASE WHEN \"stage__entered_proposal\" IS NOT NULL THEN COALESCE(\"stage__days_proposal\", 0) + CASE WHEN \"stage\" = 'proposal' THEN julianday('2026-11-27T12:00:00.000000Z') - julianday(\"stage__changed_at\") ELSE 0 END END), AVG(CASE WHEN \"stage__entered_quoted\" IS NOT NULL THEN COALESCE(\"stage__days_quoted\", 0) + CASE WHEN \"stage\" = 'quoted' THEN julianday('2026-11-27T12:00:00.000000Z') - julianday(\"stage__changed_at\") ELSE 0 END END), AVG(CASE WHEN \"stage__entered_negotiation\" IS NOT NULL THEN COALESCE(\"stage__days_negotiation\", 0) + CASE WHEN \"stage\" = 'negotiation' THEN julianday('2026-11-27T12:00:00.000000Z') - julianday(\"stage__changed_at\") ELSE 0 END END) FROM \"crm__opportunity\""),
    ]
}

fn p50(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    xs[xs.len() / 2]
}

/// One line of the report benchmark.
#[derive(Debug, serde::Serialize)]
pub struct Line {
    /// Metric or dashboard.
    pub name: String,
    /// Median milliseconds of the generated query.
    pub generated_ms: f64,
    /// Median milliseconds of the hand-written query (None for the dashboard).
    pub hand_ms: Option<f64>,
    /// generated / hand.
    pub ratio: Option<f64>,
    /// Median milliseconds answered from a rollup (None where none fits).
    pub rollup_ms: Option<f64>,
}

/// Generate `n` opportunities' data (or, with `None`, use what the database holds), then time
/// every CRM metric and the dashboard against the baselines.
pub async fn run(
    db: Db,
    app: &App,
    owner: Uuid,
    n: Option<usize>,
    seed: u64,
    runs: usize,
) -> anyhow::Result<Vec<Line>> {
    let now = Utc
        .with_ymd_and_hms(2026, 11, 27, 12, 0, 0)
        .single()
        .context("date")?;
    if let Some(n) = n {
        let t = Instant::now();
        let opts = crate::demo_data::Options {
            opportunities: n,
            seed,
            now,
            progress: false,
        };
        let sum = crate::demo_data::generate(&db, app, owner, &opts).await?;
        eprintln!(
            "generated {} opportunities, {} leads, {} history rows in {:.1} s",
            sum.opportunities,
            sum.leads,
            sum.history,
            t.elapsed().as_secs_f64()
        );
    }
    // The generator rebuilt the rollups; attached, the planner may answer from them.
    let reports = Reports::compile(app)?;
    trellis_report::rollup::attach(app, &reports, db.backend())?;
    let vis = Visibility::default();
    let mut out = vec![];
    for (name, hand) in baselines(db.backend()) {
        let query = |rollups: bool| Query {
            metric: Some(name.into()),
            use_rollups: Some(rollups),
            ..Default::default()
        };
        let base = engine::plan(app, &reports, &query(false), now, db.backend())?;
        let fast = engine::plan(app, &reports, &query(true), now, db.backend())?;
        let (mut g, mut h, mut r) = (vec![], vec![], vec![]);
        let mut answers = None;
        // One untimed run of each first: the timed runs then read pages both have read. Without
        // it, whichever query ran first in a round paid for reading the tables from disk, and
        // with an odd number of runs the median charged that to one side (lead_conversion
        // measured 6.6–7.1× at 1M that way, with the same statement equal in the shell).
        db.fetch_all(&Sql::new(hand), &[]).await?;
        engine::run(&db, app, &reports, &base, &vis).await?;
        for i in 0..runs {
            // Generated and hand-written take turns going first (ABBA), so neither always runs
            // on the caches the other warmed.
            let hand_first = i % 2 == 1;
            if hand_first {
                let t = Instant::now();
                db.fetch_all(&Sql::new(hand), &[]).await?;
                h.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let t = Instant::now();
            let a = engine::run(&db, app, &reports, &base, &vis).await?;
            g.push(t.elapsed().as_secs_f64() * 1000.0);
            if !hand_first {
                let t = Instant::now();
                db.fetch_all(&Sql::new(hand), &[]).await?;
                h.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let t = Instant::now();
            let b = engine::run(&db, app, &reports, &fast, &vis).await?;
            r.push(t.elapsed().as_secs_f64() * 1000.0);
            answers = Some((a, b));
        }
        let (a, b) = answers.context("at least one run")?;
        let served = b.meta["rollups"] != serde_json::json!([]);
        // A rollup must give the base tables' answer.
        anyhow::ensure!(
            !served || (a.rows == b.rows && a.totals == b.totals),
            "{name}: the rollup answered {:?}, the base tables {:?}",
            b.rows,
            a.rows
        );
        let (g, h) = (p50(g), p50(h));
        let r = served.then(|| p50(r));
        eprintln!(
            "{name:<20} generated {g:>9.1} ms   hand-written {h:>9.1} ms   {:>5.2}x   rollup {}",
            g / h,
            r.map(|r| format!("{r:>7.1} ms"))
                .unwrap_or_else(|| "—".into())
        );
        out.push(Line {
            name: name.into(),
            generated_ms: g,
            hand_ms: Some(h),
            ratio: Some(g / h),
            rollup_ms: r,
        });
    }
    let d = reports
        .dashboards
        .get("sales_overview")
        .context("the CRM has a sales_overview dashboard")?;
    let shared = std::sync::Arc::new(trellis_form::apps::load(&db, "crm").await?.context("crm")?);
    trellis_report::rollup::attach(&shared, &reports, db.backend())?;
    let mut times = (vec![], vec![]);
    // Each panel's own time (from its start to its answer, sharing the cores with the others).
    let mut panels: std::collections::BTreeMap<String, (Vec<f64>, Vec<f64>)> = Default::default();
    // Round 0 warms the caches and is not counted.
    for round in 0..=runs {
        for rollups in [false, true] {
            let t = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for item in &d.def.items {
                let (db, mut q) = (db.clone(), item.query.clone());
                q.use_rollups = Some(rollups);
                let (app2, reports2) = (shared.clone(), reports.clone());
                let key = item.key.clone();
                set.spawn(async move {
                    let t = Instant::now();
                    let plan = engine::plan(&app2, &reports2, &q, now, db.backend())?;
                    engine::run(&db, &app2, &reports2, &plan, &Visibility::default()).await?;
                    anyhow::Ok((key, t.elapsed().as_secs_f64() * 1000.0))
                });
            }
            let mut took = vec![];
            while let Some(r) = set.join_next().await {
                took.push(r??);
            }
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if round == 0 {
                continue;
            }
            for (key, ms) in took {
                let e = panels.entry(key).or_default();
                if rollups {
                    e.1.push(ms)
                } else {
                    e.0.push(ms)
                }
            }
            if rollups {
                times.1.push(ms);
            } else {
                times.0.push(ms);
            }
        }
    }
    for (key, (base, fast)) in panels {
        eprintln!(
            "  panel {key:<28} base tables {:>9.1} ms   rollups {:>7.1} ms",
            p50(base),
            p50(fast)
        );
    }
    let (dash, fast) = (p50(times.0), p50(times.1));
    eprintln!(
        "{:<20} generated {dash:>9.1} ms ({} panels, concurrently)   rollups {fast:>7.1} ms",
        "sales_overview",
        d.def.items.len()
    );
    out.push(Line {
        name: "sales_overview".into(),
        generated_ms: dash,
        hand_ms: None,
        ratio: None,
        rollup_ms: Some(fast),
    });
    Ok(out)
}
