//! `trellis bench reports`: each CRM metric and the `sales_overview` dashboard over generated
//! opportunities, each beside a hand-written SQL query for the same answer in the same run.
//!
//! The generator writes rows straight into the CRM tables (leads, opportunities with their
//! stage-entry times, and the stage history), deterministic for a seed: every opportunity
//! starts in `mql` and moves on stage by stage with fixed odds, so funnels, cycle times and
//! time in stage have realistic shapes. SQLite only for now.

use anyhow::Context;
use chrono::{DateTime, Duration, TimeZone, Utc};
use rand::{Rng, SeedableRng};
use std::time::Instant;
use trellis_form::db::{quote, Db, Sql, Value};
use trellis_form::model::{App, ColKind};
use trellis_report::{engine, Query, Reports, Visibility};
use uuid::Uuid;

const OPEN: [&str; 5] = ["mql", "sql", "proposal", "quoted", "negotiation"];
const REGIONS: [&str; 6] = ["north", "east", "south", "west", "central", "overseas"];
/// Odds of moving on from each open stage.
const ADVANCE: [f64; 5] = [0.75, 0.7, 0.6, 0.75, 0.7];

fn rows_sql(table: &str, cols: &[&str], rows: &[Vec<Value>]) -> Sql {
    let mut sql = Sql::new(format!(
        "INSERT INTO {} ({}) VALUES ",
        quote(table),
        cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ")
    ));
    for (i, r) in rows.iter().enumerate() {
        sql.push(if i == 0 { "(" } else { ", (" });
        for (j, v) in r.iter().enumerate() {
            if j > 0 {
                sql.push(", ");
            }
            sql.bind(v.clone());
        }
        sql.push(")");
    }
    sql
}

/// Fill an installed CRM with `n` opportunities (and `n / 2` leads), deterministic for `seed`.
pub async fn generate(db: &Db, n: usize, seed: u64, now: DateTime<Utc>) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let owner = Uuid::from_u128(1);
    let start = now - Duration::days(730);
    let mut tx = db.begin().await?;
    let lead_cols = [
        "id",
        "created_at",
        "updated_at",
        "owner",
        "version",
        "name",
        "status",
        "region",
    ];
    let mut leads: Vec<(Uuid, DateTime<Utc>)> = Vec::with_capacity(n / 2);
    let mut batch = vec![];
    for i in 0..n / 2 {
        let at = start + Duration::seconds(rng.gen_range(0..730 * 86_400));
        let id = Uuid::from_u128(0x1000_0000_0000 + i as u128);
        leads.push((id, at));
        batch.push(vec![
            Value::Uuid(id),
            Value::DateTime(at),
            Value::DateTime(at),
            Value::Uuid(owner),
            Value::Int(1),
            Value::Text(format!("Lead {i}")),
            Value::Text("new".into()),
            Value::Text(REGIONS[i % 6].into()),
        ]);
        if batch.len() * lead_cols.len() >= 900 {
            tx.execute(&rows_sql("crm__lead", &lead_cols, &batch))
                .await?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        tx.execute(&rows_sql("crm__lead", &lead_cols, &batch))
            .await?;
    }
    let mut opp_cols: Vec<String> = [
        "id",
        "created_at",
        "updated_at",
        "owner",
        "version",
        "name",
        "region",
        "amount",
        "amount__currency",
        "stage",
        "stage__changed_at",
        "expected_close_date",
        "lead",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in OPEN.iter().chain(["won", "lost"].iter()) {
        opp_cols.push(format!("stage__entered_{s}"));
    }
    let opp_cols_ref: Vec<&str> = opp_cols.iter().map(String::as_str).collect();
    let hist_cols = [
        "app",
        "entity",
        "record_id",
        "field",
        "old_value",
        "new_value",
        "at",
    ];
    let mut batch = vec![];
    let mut hist = vec![];
    for i in 0..n {
        let id = Uuid::from_u128(0x2000_0000_0000 + i as u128);
        let created = start + Duration::seconds(rng.gen_range(0..730 * 86_400));
        let region = REGIONS[rng.gen_range(0..6)];
        let amount = rng.gen_range(1_000..200_000) as i64;
        let mut entered: Vec<(String, DateTime<Utc>)> = vec![("mql".into(), created)];
        let mut t = created;
        let mut k = 0;
        loop {
            t += Duration::hours(rng.gen_range(12..24 * 20));
            if t > now {
                break;
            }
            if k == OPEN.len() - 1 || rng.gen_bool(0.08) {
                let won = rng.gen_bool(if region == "east" { 0.4 } else { 0.55 });
                if won || k == OPEN.len() - 1 {
                    entered.push((if won { "won" } else { "lost" }.into(), t));
                }
                break;
            }
            if !rng.gen_bool(ADVANCE[k]) {
                break;
            }
            k += 1;
            entered.push((OPEN[k].into(), t));
        }
        let stage = entered.last().map(|e| e.0.clone()).unwrap_or_default();
        let mut row = vec![
            Value::Uuid(id),
            Value::DateTime(created),
            Value::DateTime(entered.last().map(|e| e.1).unwrap_or(created)),
            Value::Uuid(owner),
            Value::Int(1),
            Value::Text(format!("Deal {i}")),
            Value::Text(region.into()),
            Value::Decimal(amount.into()),
            Value::Text("CNY".into()),
            Value::Text(stage.clone()),
            Value::DateTime(entered.last().map(|e| e.1).unwrap_or(created)),
            Value::Date((created + Duration::days(rng.gen_range(30..200))).date_naive()),
            if rng.gen_bool(0.6) && !leads.is_empty() {
                let (lid, lat) = leads[rng.gen_range(0..leads.len())];
                if lat <= created {
                    Value::Uuid(lid)
                } else {
                    Value::Null(ColKind::Uuid)
                }
            } else {
                Value::Null(ColKind::Uuid)
            },
        ];
        for s in OPEN.iter().chain(["won", "lost"].iter()) {
            row.push(match entered.iter().find(|e| e.0 == *s) {
                Some(e) => Value::DateTime(e.1),
                None => Value::Null(ColKind::DateTime),
            });
        }
        batch.push(row);
        let mut prev = serde_json::Value::Null;
        for (s, at) in &entered {
            hist.push(vec![
                Value::Text("crm".into()),
                Value::Text("opportunity".into()),
                Value::Uuid(id),
                Value::Text("stage".into()),
                Value::Json(prev.clone()),
                Value::Json(serde_json::json!(s)),
                Value::DateTime(*at),
            ]);
            prev = serde_json::json!(s);
        }
        if batch.len() * opp_cols.len() >= 900 {
            tx.execute(&rows_sql("crm__opportunity", &opp_cols_ref, &batch))
                .await?;
            batch.clear();
        }
        if hist.len() * hist_cols.len() >= 900 {
            tx.execute(&rows_sql("history", &hist_cols, &hist)).await?;
            hist.clear();
        }
    }
    if !batch.is_empty() {
        tx.execute(&rows_sql("crm__opportunity", &opp_cols_ref, &batch))
            .await?;
    }
    if !hist.is_empty() {
        tx.execute(&rows_sql("history", &hist_cols, &hist)).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The hand-written SQL for each CRM metric (SQLite), the baseline of the benchmark.
pub fn baselines() -> Vec<(&'static str, &'static str)> {
    vec![
        ("pipeline_value", "SELECT SUM(\"amount\") FROM \"crm__opportunity\" WHERE \"stage\" IN ('mql','sql','proposal','quoted','negotiation')"),
        ("weighted_forecast", "SELECT SUM(\"amount\" * CASE \"stage\" WHEN 'mql' THEN 0.1 WHEN 'sql' THEN 0.2 WHEN 'proposal' THEN 0.4 WHEN 'quoted' THEN 0.6 WHEN 'negotiation' THEN 0.8 END) FROM \"crm__opportunity\" WHERE \"stage\" IN ('mql','sql','proposal','quoted','negotiation')"),
        ("win_rate", "SELECT CAST(SUM(\"stage\" = 'won') AS REAL) / NULLIF(SUM(\"stage\" IN ('won','lost')), 0) FROM \"crm__opportunity\""),
        ("avg_deal_size", "SELECT AVG(\"amount\") FROM \"crm__opportunity\" WHERE \"stage\" = 'won'"),
        ("sales_cycle_days", "SELECT AVG(julianday(\"stage__entered_won\") - julianday(\"created_at\")) FROM \"crm__opportunity\" WHERE \"stage__entered_won\" IS NOT NULL"),
        ("lead_conversion", "SELECT CAST(SUM(EXISTS (SELECT 1 FROM \"crm__opportunity\" o WHERE o.\"lead\" = l.\"id\" AND o.\"created_at\" >= l.\"created_at\")) AS REAL) / COUNT(*) FROM \"crm__lead\" l"),
        ("stage_conversion", "SELECT COUNT(CASE WHEN \"stage__entered_mql\" IS NOT NULL OR \"stage__entered_sql\" IS NOT NULL OR \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(CASE WHEN \"stage__entered_sql\" IS NOT NULL OR \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(CASE WHEN \"stage__entered_proposal\" IS NOT NULL OR \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(CASE WHEN \"stage__entered_quoted\" IS NOT NULL OR \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(CASE WHEN \"stage__entered_negotiation\" IS NOT NULL OR \"stage__entered_won\" IS NOT NULL THEN 1 END), COUNT(\"stage__entered_won\") FROM \"crm__opportunity\""),
        ("time_in_stage", "SELECT stage, AVG(v) FROM (SELECT record_id, stage, SUM(julianday(COALESCE(left_at, '2026-11-27T12:00:00.000000Z')) - julianday(at)) AS v FROM (SELECT record_id, json_extract(new_value, '$') AS stage, at, LEAD(at) OVER (PARTITION BY record_id ORDER BY at, id) AS left_at FROM history WHERE app = 'crm' AND entity = 'opportunity' AND field = 'stage') WHERE stage IN ('mql','sql','proposal','quoted','negotiation') GROUP BY record_id, stage) GROUP BY stage"),
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
}

/// Generate data, then time every CRM metric and the dashboard against the baselines.
pub async fn run(db: Db, app: &App, n: usize, seed: u64, runs: usize) -> anyhow::Result<Vec<Line>> {
    anyhow::ensure!(
        db.backend() == trellis_form::db::Backend::Sqlite,
        "the report benchmark runs on SQLite only for now"
    );
    let now = Utc
        .with_ymd_and_hms(2026, 11, 27, 12, 0, 0)
        .single()
        .context("date")?;
    let t = Instant::now();
    generate(&db, n, seed, now).await?;
    eprintln!(
        "generated {n} opportunities and {} leads in {:.1} s",
        n / 2,
        t.elapsed().as_secs_f64()
    );
    let reports = Reports::compile(app)?;
    let vis = Visibility::default();
    let mut out = vec![];
    for (name, hand) in baselines() {
        let q = Query {
            metric: Some(name.into()),
            ..Default::default()
        };
        let plan = engine::plan(app, &reports, &q, now, db.backend())?;
        let (mut g, mut h) = (vec![], vec![]);
        for _ in 0..runs {
            let t = Instant::now();
            engine::run(&db, app, &reports, &plan, &vis).await?;
            g.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            db.fetch_all(&Sql::new(hand), &[]).await?;
            h.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let (g, h) = (p50(g), p50(h));
        eprintln!(
            "{name:<20} generated {g:>9.1} ms   hand-written {h:>9.1} ms   {:>5.2}x",
            g / h
        );
        out.push(Line {
            name: name.into(),
            generated_ms: g,
            hand_ms: Some(h),
            ratio: Some(g / h),
        });
    }
    let d = reports
        .dashboards
        .get("sales_overview")
        .context("the CRM has a sales_overview dashboard")?;
    let shared = std::sync::Arc::new(trellis_form::apps::load(&db, "crm").await?.context("crm")?);
    let mut times = vec![];
    for _ in 0..runs {
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for item in &d.def.items {
            let (db, q) = (db.clone(), item.query.clone());
            let (app2, reports2) = (shared.clone(), reports.clone());
            set.spawn(async move {
                let plan = engine::plan(&app2, &reports2, &q, now, db.backend())?;
                engine::run(&db, &app2, &reports2, &plan, &Visibility::default()).await
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let dash = p50(times);
    eprintln!(
        "{:<20} generated {dash:>9.1} ms (7 panels, concurrently)",
        "sales_overview"
    );
    out.push(Line {
        name: "sales_overview".into(),
        generated_ms: dash,
        hand_ms: None,
        ratio: None,
    });
    Ok(out)
}
