//! Every CRM metric and every metric type against a hand-computed fixture, on SQLite and
//! PostgreSQL: the same numbers on both.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value as Json};
use std::path::Path;
use trellis_form::apps::{self, ImportOptions};
use trellis_form::db::Db;
use trellis_form::model::App;
use trellis_form::store::{self, WriteCtx};
use trellis_form::testing;
use trellis_form::users::{self, UserInput};
use trellis_form::FormError;
use trellis_report::{engine, DrillQuery, Query, Reports, Visibility};
use uuid::Uuid;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
}

fn crm_def() -> Json {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/crm");
    let mut def = trellis_form::bundle::load(&dir).unwrap().definition;
    // An ordered funnel beside the CRM's `reached` one, and a median, for the metric types.
    let extra = json!({"metrics": {
        "stage_conversion_ordered": {"type": "funnel", "entity": "opportunity", "mode": "ordered"},
        "median_cycle": {"type": "duration", "entity": "opportunity", "from": "created_at", "to": "entered_at('won')", "agg": "median"},
        "amount_p90": {"type": "aggregate", "entity": "opportunity", "agg": "percentile", "p": 0.9, "expr": "amount"},
        "max_amount": {"type": "aggregate", "entity": "opportunity", "agg": "max", "expr": "amount"},
        "regions": {"type": "aggregate", "entity": "opportunity", "agg": "count_distinct", "expr": "region"},
        "won_amount": {"type": "aggregate", "entity": "opportunity", "agg": "sum", "expr": "amount", "filter": "stage.kind == 'won'", "time": "stage__changed_at"},
        "avg_won_derived": {"type": "derived", "expr": "won_amount / won_count"},
        "qualified_rate": {"type": "conversion", "entity": "lead", "converted": {"when": "status == 'qualified'"}},
        "median_time_in_stage": {"type": "time_in_stage", "entity": "opportunity", "agg": "median"},
        "conv_3d": {"type": "conversion", "entity": "lead", "converted": {"entity": "opportunity", "via": "lead", "within_days": 3}},
        "conv_30d_mature": {"type": "conversion", "entity": "lead", "converted": {"entity": "opportunity", "via": "lead", "within_days": 30, "exclude_immature": true}}
    }});
    def["reports"].as_array_mut().unwrap().push(extra);
    def
}

struct Fx {
    app: App,
    reports: Reports,
    rep_a: Uuid,
    ids: std::collections::HashMap<&'static str, Uuid>,
}

fn at(s: &str) -> Json {
    json!(s)
}

async fn fixture(db: &Db) -> Fx {
    let out = apps::import(db, &crm_def(), ImportOptions::default(), None, now())
        .await
        .unwrap();
    let app = apps::load(db, &out.app).await.unwrap().unwrap();
    // Rollups built (empty) and kept by every write below: queries that fit one answer from it.
    let reports = trellis_report::rollup::prepare(&app, db.backend()).unwrap();
    trellis_report::rollup::ensure(db, &app, &reports, now())
        .await
        .unwrap();
    let mut tx = db.begin().await.unwrap();
    let mk = |name: &str, email: &str| UserInput {
        name: Some(name.into()),
        email: Some(email.into()),
        ..Default::default()
    };
    let rep_a = users::create(&mut tx, &mk("Rep A", "a@example.com"), now())
        .await
        .unwrap()
        .id;
    let rep_b = users::create(&mut tx, &mk("Rep B", "b@example.com"), now())
        .await
        .unwrap()
        .id;
    let ctx = WriteCtx {
        actor: None,
        now: now(),
        default_owner: Some(rep_a),
        import: true,
        depth: 0,
    };
    let mut ids = std::collections::HashMap::new();
    let acct = store::create_batch(
        &mut tx,
        &app,
        app.entity("account").unwrap(),
        &[json!({"name": "Acme", "industry": "retail"})],
        &ctx,
    )
    .await
    .unwrap()[0];
    // Leads: L2 at 23:30 on Q1's last day in Shanghai, L3 half an hour into Q2 there, L5 just
    // after Berlin's DST change (a Monday there, still Sunday at the old offset).
    let leads = [
        ("L1", "2026-01-05T02:00:00Z", "qualified"),
        ("L2", "2026-03-31T15:30:00Z", "qualified"),
        ("L3", "2026-03-31T16:30:00Z", "new"),
        ("L4", "2026-11-01T02:00:00Z", "new"),
        ("L5", "2026-03-29T22:30:00Z", "new"),
    ];
    let recs: Vec<Json> = leads
        .iter()
        .map(|(n, c, s)| json!({"name": n, "status": s, "created_at": at(c), "owner": rep_a}))
        .collect();
    for ((n, ..), id) in leads.iter().zip(
        store::create_batch(&mut tx, &app, app.entity("lead").unwrap(), &recs, &ctx)
            .await
            .unwrap(),
    ) {
        ids.insert(*n, id);
    }
    let h = |pairs: &[(&str, &str)]| -> Json {
        json!(pairs
            .iter()
            .map(|(s, t)| json!({"stage": s, "at": t}))
            .collect::<Vec<_>>())
    };
    let opps = [
        (
            "O1",
            json!({"name": "O1", "needs_summary": "n", "region": "north", "amount": 100, "owner": rep_a, "lead": ids["L1"], "account": acct, "quoted_amount": 100, "expected_close_date": "2026-03-01", "stage": "won", "created_at": "2026-01-10T02:00:00Z",
            "stage_history": h(&[("mql", "2026-01-10T02:00:00Z"), ("sql", "2026-01-15T02:00:00Z"), ("proposal", "2026-01-20T02:00:00Z"), ("quoted", "2026-02-01T02:00:00Z"), ("negotiation", "2026-02-10T02:00:00Z"), ("won", "2026-03-01T02:00:00Z")])}),
        ),
        (
            "O2",
            json!({"name": "O2", "needs_summary": "n", "region": "north", "amount": 200, "owner": rep_a, "lead": ids["L1"], "account": acct, "expected_close_date": "2026-03-10", "loss_reason": "price", "stage": "lost", "created_at": "2026-02-01T02:00:00Z",
            "stage_history": h(&[("mql", "2026-02-01T02:00:00Z"), ("sql", "2026-02-05T02:00:00Z"), ("proposal", "2026-02-10T02:00:00Z"), ("lost", "2026-03-10T02:00:00Z")])}),
        ),
        (
            "O3",
            json!({"name": "O3", "needs_summary": "n", "region": "east", "amount": 300, "owner": rep_b, "lead": ids["L2"], "account": acct, "expected_close_date": "2026-12-15", "stage": "proposal", "created_at": "2026-04-01T02:00:00Z",
            "stage_history": h(&[("mql", "2026-04-01T02:00:00Z"), ("proposal", "2026-04-10T02:00:00Z")])}),
        ),
        (
            "O4",
            json!({"name": "O4", "needs_summary": "n", "region": "east", "amount": 400, "owner": rep_b, "account": acct, "expected_close_date": "2026-06-01", "stage": "won", "created_at": "2026-05-01T02:00:00Z",
            "stage_history": h(&[("mql", "2026-05-01T02:00:00Z"), ("sql", "2026-05-03T02:00:00Z"), ("proposal", "2026-05-05T02:00:00Z"), ("sql", "2026-05-07T02:00:00Z"), ("proposal", "2026-05-09T02:00:00Z"), ("won", "2026-06-01T02:00:00Z")])}),
        ),
        (
            "O5",
            json!({"name": "O5", "needs_summary": "n", "amount": 50, "owner": rep_a, "expected_close_date": "2027-01-20", "stage": "mql", "created_at": "2026-10-01T02:00:00Z"}),
        ),
    ];
    let recs: Vec<Json> = opps.iter().map(|(_, r)| r.clone()).collect();
    for ((n, _), id) in opps.iter().zip(
        store::create_batch(
            &mut tx,
            &app,
            app.entity("opportunity").unwrap(),
            &recs,
            &ctx,
        )
        .await
        .unwrap(),
    ) {
        ids.insert(*n, id);
    }
    tx.commit().await.unwrap();
    Fx {
        app,
        reports,
        rep_a,
        ids,
    }
}

async fn ask(db: &Db, fx: &Fx, q: Json) -> engine::Answer {
    ask_as(db, fx, q, &Visibility::default()).await
}

async fn ask_as(db: &Db, fx: &Fx, q: Json, vis: &Visibility) -> engine::Answer {
    let q: Query = serde_json::from_value(q).unwrap();
    let plan = engine::plan(&fx.app, &fx.reports, &q, now(), db.backend()).unwrap();
    engine::run(db, &fx.app, &fx.reports, &plan, vis)
        .await
        .unwrap()
}

fn rows(a: &engine::Answer) -> Json {
    json!(a.rows)
}

async fn problems(db: &Db, fx: &Fx, q: Json) -> Vec<(String, String)> {
    let q: Query = serde_json::from_value(q).unwrap();
    match engine::plan(&fx.app, &fx.reports, &q, now(), db.backend()) {
        Err(FormError::Query(ps)) => ps.into_iter().map(|p| (p.path, p.message)).collect(),
        other => panic!("expected a query error, got {other:?}"),
    }
}

#[tokio::test]
async fn crm_metrics_match_the_hand_computed_fixture() {
    for t in testing::each().await {
        let db = &t.db;
        let fx = fixture(db).await;
        let b = t.backend;
        // Totals of every CRM metric (no range, no grouping).
        let a = ask(db, &fx, json!({"metrics": ["leads", "opportunities", "lead_conversion", "won_count", "closed_count", "win_rate", "avg_deal_size", "pipeline_value", "weighted_forecast", "sales_cycle_days", "median_cycle", "amount_p90", "max_amount", "regions", "avg_won_derived", "qualified_rate"]})).await;
        assert_eq!(
            json!(a.totals),
            json!({"leads": 5, "opportunities": 5, "lead_conversion": 0.4, "won_count": 2, "closed_count": 3,
                   "win_rate": 0.666667, "avg_deal_size": 250.0, "pipeline_value": 350.0, "weighted_forecast": 125.0,
                   "sales_cycle_days": 40.5, "median_cycle": 40.5, "amount_p90": 360.0, "max_amount": 400.0, "regions": 2,
                   "avg_won_derived": 250.0, "qualified_rate": 0.4}),
            "{b}"
        );
        assert_eq!(rows(&a), json!([a.totals]), "{b}: one row without grouping");

        // Funnel, reached mode: a skipped stage (O3 skipped sql) still counts as passed, a
        // re-entered stage (O4 went back to sql) counts once.
        let f = ask(db, &fx, json!({"metric": "stage_conversion"})).await;
        assert_eq!(
            rows(&f),
            json!([
                {"stage": "mql", "entered": 5, "advanced": 4, "step_rate": 0.8, "cumulative_rate": 1.0},
                {"stage": "sql", "entered": 4, "advanced": 4, "step_rate": 1.0, "cumulative_rate": 0.8},
                {"stage": "proposal", "entered": 4, "advanced": 2, "step_rate": 0.5, "cumulative_rate": 0.8},
                {"stage": "quoted", "entered": 2, "advanced": 2, "step_rate": 1.0, "cumulative_rate": 0.4},
                {"stage": "negotiation", "entered": 2, "advanced": 2, "step_rate": 1.0, "cumulative_rate": 0.4},
                {"stage": "won", "entered": 2, "advanced": null, "step_rate": null, "cumulative_rate": 0.4}
            ]),
            "{b}"
        );
        // Ordered mode: a record counts for a stage only if it passed every earlier one in order.
        let f = ask(db, &fx, json!({"metric": "stage_conversion_ordered"})).await;
        let entered: Vec<i64> = f
            .rows
            .iter()
            .map(|r| r["entered"].as_i64().unwrap())
            .collect();
        assert_eq!(entered, vec![5, 3, 3, 1, 1, 1], "{b}");
        // By region, with the null region as its own row (last).
        let f = ask(
            db,
            &fx,
            json!({"metric": "stage_conversion", "group_by": ["region"]}),
        )
        .await;
        let first: Vec<Json> = f
            .rows
            .iter()
            .filter(|r| r["stage"] == "mql")
            .map(|r| json!([r["region"], r["entered"]]))
            .collect();
        assert_eq!(
            json!(first),
            json!([["east", 2], ["north", 2], [null, 1]]),
            "{b}"
        );

        // Time in stage: per record, stays added up (O4 was in sql twice: 2 + 2 days), open
        // stays counted until now, won/lost left out.
        let tis = ask(db, &fx, json!({"metric": "time_in_stage"})).await;
        assert_eq!(
            rows(&tis),
            json!([
                {"stage": "mql", "days": 15.483333},
                {"stage": "sql", "days": 4.666667},
                {"stage": "proposal", "days": 74.104167},
                {"stage": "quoted", "days": 9.0},
                {"stage": "negotiation", "days": 19.0}
            ]),
            "{b}"
        );
        let med = ask(db, &fx, json!({"metric": "median_time_in_stage"})).await;
        assert_eq!(
            json!(med.rows[2]),
            json!({"stage": "proposal", "days": 26.5}),
            "{b}"
        );

        // Quarters in the app's zone (Asia/Shanghai): L3 is created on Q1's last day in UTC but
        // in Q2 locally; gaps are filled (0 for counts, null for rates).
        let q = ask(db, &fx, json!({"metrics": ["leads", "lead_conversion"], "time": {"grain": "quarter", "from": "2026-01-01", "to": "2027-01-01"}})).await;
        assert_eq!(
            rows(&q),
            json!([
                {"period": "2026-01-01", "leads": 3, "lead_conversion": 0.666667},
                {"period": "2026-04-01", "leads": 1, "lead_conversion": 0.0},
                {"period": "2026-07-01", "leads": 0, "lead_conversion": null},
                {"period": "2026-10-01", "leads": 1, "lead_conversion": 0.0}
            ]),
            "{b}"
        );
        assert_eq!(
            q.totals,
            json!({"leads": 5, "lead_conversion": 0.4})
                .as_object()
                .unwrap()
                .clone(),
            "{b}"
        );
        let utc = ask(db, &fx, json!({"metric": "leads", "timezone": "UTC", "time": {"grain": "quarter", "from": "2026-01-01", "to": "2026-07-01"}})).await;
        assert_eq!(
            rows(&utc),
            json!([{"period": "2026-01-01", "leads": 4}, {"period": "2026-04-01", "leads": 0}]),
            "{b}"
        );
        // Weeks across Berlin's DST change: L5 (22:30Z on Sunday 29 March) is Monday 00:30 there.
        let w = ask(db, &fx, json!({"metric": "leads", "timezone": "Europe/Berlin", "time": {"grain": "week", "from": "2026-03-16", "to": "2026-04-06"}})).await;
        assert_eq!(
            rows(&w),
            json!([{"period": "2026-03-16", "leads": 0}, {"period": "2026-03-23", "leads": 0}, {"period": "2026-03-30", "leads": 3}]),
            "{b}"
        );
        let w = ask(db, &fx, json!({"metric": "leads", "timezone": "Europe/Berlin", "week_start": "sunday", "time": {"grain": "week", "from": "2026-03-22", "to": "2026-04-05"}})).await;
        assert_eq!(
            rows(&w),
            json!([{"period": "2026-03-22", "leads": 0}, {"period": "2026-03-29", "leads": 3}]),
            "{b}"
        );

        // Forecast by its own time field (expected close month), open deals only.
        let fc = ask(db, &fx, json!({"metric": "weighted_forecast", "time": {"grain": "month", "from": "2026-12-01", "to": "2027-02-01"}})).await;
        assert_eq!(
            rows(&fc),
            json!([{"period": "2026-12-01", "weighted_forecast": 120.0}, {"period": "2027-01-01", "weighted_forecast": 5.0}]),
            "{b}"
        );

        // Compare with the previous quarter; flag drops of 30% or more.
        let c = ask(db, &fx, json!({"metric": "leads", "time": {"from": "2026-04-01", "to": "2026-07-01"}, "compare": "previous_period", "flag": {"metric": "leads", "change_pct_lte": -30}})).await;
        assert_eq!(
            rows(&c),
            json!([{"leads": 1, "leads_previous": 3, "leads_change": -2, "leads_change_pct": -66.666667, "flag": true}]),
            "{b}"
        );
        assert_eq!(
            c.meta["compared_with"],
            json!({"from": "2026-01-01", "to": "2026-04-01"}),
            "{b}"
        );

        // To date: this quarter so far (to 27 November) against the same days of the last one.
        let c = ask(db, &fx, json!({"metric": "leads", "time": {"preset": "this_quarter"}, "compare": "previous_period", "compare_to_date": true})).await;
        assert_eq!(c.meta["from"], json!("2026-10-01"), "{b}");
        assert_eq!(c.meta["to"], json!("2026-11-28"), "{b}");
        assert_eq!(
            c.meta["compared_with"],
            json!({"from": "2026-07-01", "to": "2026-08-28"}),
            "{b}"
        );
        assert_eq!(
            rows(&c),
            json!([{"leads": 1, "leads_previous": 0, "leads_change": 1, "leads_change_pct": null}]),
            "{b}"
        );
        // Previous year by quarter: each bucket finds its own quarter a year back.
        let c = ask(db, &fx, json!({"metric": "leads", "time": {"grain": "quarter", "from": "2027-01-01", "to": "2027-07-01"}, "compare": "previous_year"})).await;
        assert_eq!(c.rows[0]["leads_previous"], json!(3), "{b}");
        assert_eq!(c.rows[1]["leads_previous"], json!(1), "{b}");
        // Funnels and time in stage compare stage by stage: every column gets the same stage's
        // value over the shifted range (asked for on its own) as `_previous`, and the change.
        for (metric, cols) in [
            (
                "stage_conversion",
                &["entered", "advanced", "step_rate", "cumulative_rate"][..],
            ),
            ("time_in_stage", &["days"][..]),
        ] {
            let range = |from: &str, to: &str| json!({"from": from, "to": to});
            let cur = ask(
                db,
                &fx,
                json!({"metric": metric, "time": range("2026-04-01", "2026-07-01")}),
            )
            .await;
            let old = ask(
                db,
                &fx,
                json!({"metric": metric, "time": range("2026-01-01", "2026-04-01")}),
            )
            .await;
            let c = ask(db, &fx, json!({"metric": metric, "time": range("2026-04-01", "2026-07-01"), "compare": "previous_period"})).await;
            assert_eq!(c.rows.len(), cur.rows.len(), "{b} {metric}");
            let mut compared = 0;
            for (row, now_row) in c.rows.iter().zip(&cur.rows) {
                assert_eq!(row["stage"], now_row["stage"], "{b} {metric}");
                let Some(before) = old.rows.iter().find(|r| r["stage"] == row["stage"]) else {
                    continue;
                };
                for col in cols {
                    assert_eq!(row[*col], now_row[*col], "{b} {metric} {col}");
                    assert_eq!(
                        row[&format!("{col}_previous")],
                        before[*col],
                        "{b} {metric} {col}: {row:?}"
                    );
                    if let (Some(a), Some(p)) = (now_row[*col].as_f64(), before[*col].as_f64()) {
                        let change = row[&format!("{col}_change")].as_f64().unwrap();
                        assert!(
                            (change - (a - p)).abs() < 1e-9,
                            "{b} {metric} {col}: {row:?}"
                        );
                        compared += 1;
                    }
                }
            }
            assert!(
                compared > 0,
                "{b} {metric}: the fixture has both periods: {c:?}"
            );
            let names: Vec<&str> = c.columns.iter().map(|c| c.name.as_str()).collect();
            assert!(
                names.contains(&format!("{}_change_pct", cols[0]).as_str()),
                "{b}: {names:?}"
            );
        }

        // Dimensions one relation away and filters through them.
        let by_industry = ask(
            db,
            &fx,
            json!({"metric": "opportunities", "group_by": ["account.industry"]}),
        )
        .await;
        assert_eq!(
            rows(&by_industry),
            json!([{"account.industry": "retail", "opportunities": 4}, {"account.industry": null, "opportunities": 1}]),
            "{b}"
        );
        let filtered = ask(db, &fx, json!({"metrics": ["pipeline_value", "opportunities"], "filters": [{"field": "region", "op": "in", "value": ["east"]}]})).await;
        assert_eq!(
            json!(filtered.totals),
            json!({"pipeline_value": 300.0, "opportunities": 2}),
            "{b}"
        );
        let sorted = ask(db, &fx, json!({"metric": "opportunities", "group_by": ["region"], "sort": ["-opportunities"], "limit": 1})).await;
        assert_eq!(sorted.rows.len(), 1, "{b}");
        assert_eq!(sorted.rows[0]["opportunities"], json!(2), "{b}");
        // The answer says that `limit` cut rows: north, east and the empty region.
        assert_eq!(
            (&sorted.meta["row_count"], &sorted.meta["truncated"]),
            (&json!(3), &json!(true)),
            "{b}"
        );
        let all = ask(
            db,
            &fx,
            json!({"metric": "opportunities", "group_by": ["region"], "limit": 3}),
        )
        .await;
        assert_eq!(all.rows.len(), 3, "{b}");
        assert_eq!(
            (&all.meta["row_count"], &all.meta["truncated"]),
            (&json!(3), &json!(false)),
            "{b}"
        );

        // A rep sees only their own records in every number.
        let mine = ask_as(
            db,
            &fx,
            json!({"metrics": ["opportunities", "pipeline_value", "win_rate"]}),
            &Visibility {
                owners: Some(vec![fx.rep_a]),
            },
        )
        .await;
        assert_eq!(
            json!(mine.totals),
            json!({"opportunities": 3, "pipeline_value": 50.0, "win_rate": 0.5}),
            "{b}"
        );
        let funnel = ask_as(
            db,
            &fx,
            json!({"metric": "stage_conversion"}),
            &Visibility {
                owners: Some(vec![fx.rep_a]),
            },
        )
        .await;
        assert_eq!(funnel.rows[0]["entered"], json!(3), "{b}");
        let none = ask_as(
            db,
            &fx,
            json!({"metric": "opportunities"}),
            &Visibility {
                owners: Some(vec![]),
            },
        )
        .await;
        assert_eq!(json!(none.totals), json!({"opportunities": 0}), "{b}");

        // Empty range: counts 0, averages null.
        let empty = ask(db, &fx, json!({"metrics": ["opportunities", "avg_deal_size", "win_rate"], "time": {"from": "2020-01-01", "to": "2020-02-01"}})).await;
        assert_eq!(
            json!(empty.totals),
            json!({"opportunities": 0, "avg_deal_size": null, "win_rate": null}),
            "{b}"
        );
        t.cleanup().await;
    }
}

async fn drill_ids(db: &Db, fx: &Fx, q: Json) -> Vec<&'static str> {
    let dq: DrillQuery = serde_json::from_value(q).unwrap();
    let page = engine::drill(db, &fx.app, &fx.reports, &dq, now(), &Visibility::default())
        .await
        .unwrap();
    let mut names: Vec<&'static str> = page
        .records
        .iter()
        .map(|r| *fx.ids.iter().find(|(_, id)| **id == r.meta.id).unwrap().0)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn drill_down_returns_the_records_behind_a_number() {
    for t in testing::each().await {
        let db = &t.db;
        let fx = fixture(db).await;
        let b = t.backend;
        assert_eq!(drill_ids(db, &fx, json!({"metric": "win_rate", "group_by": ["region"], "row": {"region": "north"}, "side": "denominator"})).await, vec!["O1", "O2"], "{b}");
        assert_eq!(drill_ids(db, &fx, json!({"metric": "win_rate", "group_by": ["region"], "row": {"region": "north"}, "side": "numerator"})).await, vec!["O1"], "{b}");
        assert_eq!(
            drill_ids(
                db,
                &fx,
                json!({"metric": "opportunities", "group_by": ["region"], "row": {"region": null}})
            )
            .await,
            vec!["O5"],
            "{b}"
        );
        assert_eq!(
            drill_ids(
                db,
                &fx,
                json!({"metric": "stage_conversion", "row": {"stage": "sql"}})
            )
            .await,
            vec!["O1", "O2", "O3", "O4"],
            "{b}"
        );
        assert_eq!(drill_ids(db, &fx, json!({"metric": "stage_conversion", "row": {"stage": "proposal"}, "side": "advanced"})).await, vec!["O1", "O4"], "{b}");
        assert_eq!(
            drill_ids(
                db,
                &fx,
                json!({"metric": "lead_conversion", "row": {}, "side": "numerator"})
            )
            .await,
            vec!["L1", "L2"],
            "{b}"
        );
        assert_eq!(drill_ids(db, &fx, json!({"metric": "leads", "time": {"grain": "quarter", "from": "2026-01-01", "to": "2027-01-01"}, "row": {"period": "2026-04-01"}})).await, vec!["L3"], "{b}");
        assert_eq!(
            drill_ids(
                db,
                &fx,
                json!({"metric": "time_in_stage", "row": {"stage": "quoted"}})
            )
            .await,
            vec!["O1"],
            "{b}"
        );
        // Paging: two pages of two, then one.
        let dq: DrillQuery =
            serde_json::from_value(json!({"metric": "opportunities", "page_size": 2})).unwrap();
        let p1 = engine::drill(db, &fx.app, &fx.reports, &dq, now(), &Visibility::default())
            .await
            .unwrap();
        assert_eq!(p1.records.len(), 2);
        let dq2 = DrillQuery {
            cursor: p1.next_cursor.clone(),
            ..dq.clone()
        };
        let p2 = engine::drill(
            db,
            &fx.app,
            &fx.reports,
            &dq2,
            now(),
            &Visibility::default(),
        )
        .await
        .unwrap();
        assert_eq!(p2.records.len(), 2);
        assert!(
            p2.records
                .iter()
                .all(|r| !p1.records.iter().any(|x| x.meta.id == r.meta.id)),
            "{b}"
        );
        // Bad drills.
        for (q, path) in [
            (json!({"metric": "win_rate"}), "/side"),
            (json!({"metric": "avg_won_derived"}), "/metrics/0"),
            (
                json!({"metric": "stage_conversion", "row": {"stage": "nope"}}),
                "/row/stage",
            ),
            (
                json!({"metric": "opportunities", "group_by": ["region"], "row": {}}),
                "/row/region",
            ),
            (
                json!({"metric": "opportunities", "cursor": "zzz"}),
                "/cursor",
            ),
        ] {
            let dq: DrillQuery = serde_json::from_value(q.clone()).unwrap();
            match engine::drill(db, &fx.app, &fx.reports, &dq, now(), &Visibility::default()).await
            {
                Err(FormError::Query(ps)) => assert_eq!(ps[0].path, path, "{b}: {q}"),
                other => panic!("{q}: {other:?}"),
            }
        }
        t.cleanup().await;
    }
}

#[tokio::test]
async fn bad_queries_are_precise_errors() {
    let t = testing::sqlite().await;
    let db = &t.db;
    let fx = fixture(db).await;
    for (q, path, msg) in [
        (json!({}), "/metrics", "Name at least one metric"),
        (json!({"metric": "revenue"}), "/metrics/0", "not a metric"),
        (
            json!({"metric": "leads", "group_by": ["colour"]}),
            "/group_by/0",
            "`colour` is not a field of Lead",
        ),
        (
            json!({"metric": "leads", "group_by": ["owner.manager.name"]}),
            "/group_by/0",
            "one relation deep",
        ),
        (
            json!({"metric": "leads", "filters": [{"field": "status", "op": "eq", "value": "wonn"}]}),
            "/filters/0/value",
            "not a value of",
        ),
        (
            json!({"metric": "leads", "filters": [{"field": "status", "op": "like", "value": "x"}]}),
            "/filters/0/op",
            "not an operator",
        ),
        (
            json!({"metric": "leads", "filters": [{"field": "name; DROP TABLE x", "op": "eq", "value": "x"}]}),
            "/filters/0/field",
            "not a field name",
        ),
        (
            json!({"metric": "leads", "time": {"grain": "fortnight"}}),
            "/time/grain",
            "not a grain",
        ),
        (
            json!({"metric": "leads", "time": {"preset": "someday"}}),
            "/time/preset",
            "not a preset",
        ),
        (
            json!({"metric": "leads", "time": {"from": "2026-02-01", "to": "2026-01-01"}}),
            "/time/to",
            "after",
        ),
        (
            json!({"metric": "leads", "time": {"from": "2026-02-01"}}),
            "/time/to",
            "both",
        ),
        (
            json!({"metric": "leads", "timezone": "Mars/Olympus"}),
            "/timezone",
            "IANA",
        ),
        (
            json!({"metric": "leads", "compare": "previous_period"}),
            "/compare",
            "needs a time range",
        ),
        (
            json!({"metric": "weighted_forecast", "time": {"field": "created_at", "grain": "month"}}),
            "/time/field",
            "snapshot",
        ),
        (
            json!({"metrics": ["stage_conversion", "leads"]}),
            "/metrics",
            "on its own",
        ),
        (
            json!({"metric": "stage_conversion", "time": {"from": "2026-04-01", "to": "2026-07-01"}, "compare": "previous_period", "flag": {"metric": "stage_conversion", "change_pct_lte": -30}}),
            "/flag",
            "one value per row",
        ),
        (
            json!({"metric": "leads", "sort": ["-revenue"]}),
            "/sort/0",
            "cannot sort",
        ),
        (json!({"metric": "leads", "limit": 0}), "/limit", "between"),
        (
            json!({"metric": "opportunities", "group_by": ["win_factors"]}),
            "/group_by/0",
            "holds a list",
        ),
    ] {
        let ps = problems(db, &fx, q.clone()).await;
        assert!(
            ps.iter().any(|(p, m)| p == path && m.contains(msg)),
            "{q}: expected {path} «{msg}», got {ps:?}"
        );
    }
    t.cleanup().await;
}

#[tokio::test]
async fn broken_metric_definitions_list_every_problem() {
    let t = testing::sqlite().await;
    let mut def = crm_def();
    def["reports"] = json!([{"metrics": {
        "a": {"type": "aggregate", "entity": "deal", "agg": "count"},
        "b": {"type": "aggregate", "entity": "opportunity", "agg": "sum", "expr": "amount +"},
        "c": {"type": "aggregate", "entity": "opportunity", "agg": "count", "filter": "stage == 'wonn'"},
        "d": {"type": "aggregate", "entity": "opportunity", "agg": "sum", "expr": "name"},
        "e": {"type": "derived", "expr": "f + 1"},
        "f": {"type": "derived", "expr": "e * 2"},
        "g": {"type": "ratio", "numerator": "nope", "denominator": "a"},
        "h": {"type": "funnel", "entity": "lead"},
        "i": {"type": "aggregate", "entity": "opportunity", "agg": "mode", "expr": "amount"},
        "j": {"type": "aggregate", "entity": "opportunity", "agg": "count", "time": "name"},
        "k": {"type": "aggregate", "entity": "opportunity", "agg": "sum", "expr": "system('rm')"},
        "l": {"type": "aggregate", "entity": "opportunity", "agg": "count", "filter": "amount > 'x'"}
    }, "alerts": {"no_flag": {"query": {"metric": "a"}}, "bad_every": {"every": "minute", "query": {"metric": "a"}}}, "dashboards": {"d1": {"items": [{"key": "x", "chart": "pie", "query": {"metric": "a"}}]}}}]);
    let out = apps::import(&t.db, &def, ImportOptions::default(), None, now())
        .await
        .unwrap();
    let app = apps::load(&t.db, &out.app).await.unwrap().unwrap();
    let Err(FormError::Definition(ps)) = Reports::compile(&app) else {
        panic!("should fail")
    };
    let got: Vec<String> = ps
        .iter()
        .map(|p| format!("{} {}", p.path, p.message))
        .collect();
    insta::assert_snapshot!(got.join("\n"));
    t.cleanup().await;
}

#[tokio::test]
async fn the_crm_reports_compile_and_every_dashboard_query_plans() {
    let t = testing::sqlite().await;
    let fx = fixture(&t.db).await;
    let d = &fx.reports.dashboards["sales_overview"];
    assert_eq!(d.def.items.len(), 8);
    for name in [
        "lead_conversion",
        "stage_conversion",
        "sales_cycle_days",
        "weighted_forecast",
        "win_rate",
        "avg_deal_size",
        "pipeline_value",
        "time_in_stage",
    ] {
        assert!(
            fx.reports.metrics.contains_key(name),
            "{name} is a contract name"
        );
    }
    for item in &d.def.items {
        let plan = engine::plan(&fx.app, &fx.reports, &item.query, now(), t.db.backend()).unwrap();
        engine::run(&t.db, &fx.app, &fx.reports, &plan, &Visibility::default())
            .await
            .unwrap();
    }
    t.cleanup().await;
}

#[tokio::test]
async fn the_model_is_checked_against_the_live_tables() {
    for t in testing::each().await {
        let db = &t.db;
        let fx = fixture(db).await;
        trellis_report::verify(db, &fx.app).await.unwrap();
        // A column renamed behind the engine's back: SQLite would read "region" as a text
        // literal, so the load check must catch it.
        let mut tx = db.begin().await.unwrap();
        let rename = "ALTER TABLE \"crm__opportunity\" RENAME COLUMN \"region\" TO \"region_x\"";
        tx.execute(&trellis_form::db::Sql::new(rename))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        match trellis_report::verify(db, &fx.app).await {
            Err(FormError::Definition(ps)) => {
                assert_eq!(ps.len(), 1, "{}: {ps:?}", t.backend);
                assert_eq!(ps[0].path, "/entities/opportunity/region");
                assert_eq!(
                    ps[0].message,
                    "the table crm__opportunity has no column region"
                );
            }
            other => panic!("{}: {other:?}", t.backend),
        }
        t.cleanup().await;
    }
}

/// The plans of the main KPIs use the indexes they depend on: the conversion's correlated
/// lookup goes through the relation's index (a scan there would be quadratic), the stage
/// filters can use the stage index, and every statement of the dashboard explains on both
/// backends.
#[tokio::test]
async fn main_kpis_explain_with_their_indexes() {
    for t in testing::each().await {
        let db = &t.db;
        let fx = fixture(db).await;
        let d = &fx.reports.dashboards["sales_overview"];
        let mut summary_read = false;
        for item in &d.def.items {
            let plan =
                engine::plan(&fx.app, &fx.reports, &item.query, now(), db.backend()).unwrap();
            for mut sql in
                engine::statements(&fx.app, &fx.reports, &plan, &Visibility::default()).unwrap()
            {
                let (prefix, kinds) = match db.backend() {
                    trellis_form::db::Backend::Sqlite => (
                        "EXPLAIN QUERY PLAN ",
                        vec![
                            trellis_form::model::ColKind::Int,
                            trellis_form::model::ColKind::Int,
                            trellis_form::model::ColKind::Int,
                            trellis_form::model::ColKind::Text,
                        ],
                    ),
                    trellis_form::db::Backend::Postgres => {
                        ("EXPLAIN ", vec![trellis_form::model::ColKind::Text])
                    }
                };
                sql.text = format!("{prefix}{}", sql.text);
                let plan_text: Vec<String> = db
                    .fetch_all(&sql, &kinds)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| format!("{:?}", r.last().unwrap()))
                    .collect();
                let text = plan_text.join("\n");
                if db.backend() == trellis_form::db::Backend::Sqlite {
                    // The CRM declares indexes over several columns for its dashboard: every
                    // panel (the days in stage through twelve columns) reads an index, never
                    // the table, and the funnel by region reads it in region order, unsorted.
                    assert!(
                        text.contains("USING COVERING INDEX") && !text.contains("\"SCAN t\""),
                        "{}: {text}",
                        item.key
                    );
                    if item.key == "win_rate_by_quarter" {
                        // One statement per quarter, each reading its part of the index: no
                        // sort of the range's rows by bucket.
                        assert!(sql.text.contains(" UNION ALL "), "{}", sql.text);
                        assert!(!text.contains("TEMP B-TREE"), "{text}");
                    }
                    if item.key == "funnel_by_region" {
                        assert!(!text.contains("TEMP B-TREE"), "{text}");
                    }
                }
                if item.key == "kpis"
                    && db.backend() == trellis_form::db::Backend::Sqlite
                    && sql.text.contains("\"first_opportunity_at\"")
                {
                    // Lead conversion from the lead's summary field: the index over it reads
                    // only the leads that have an opportunity, and no opportunity is scanned
                    // (only a lead whose first opportunity came before it is probed).
                    summary_read = true;
                    let ix = trellis_form::plan::index_name(
                        "crm__lead",
                        "first_opportunity_at,created_at,id",
                        false,
                    );
                    assert!(
                        text.contains(&format!(
                            "SEARCH t USING COVERING INDEX {ix} (first_opportunity_at>?)"
                        )),
                        "{text}"
                    );
                    assert!(
                        !text.contains("\"SCAN c\"") && !text.contains("\"SCAN c "),
                        "{text}"
                    );
                }
            }
        }
        assert_eq!(
            summary_read,
            db.backend() == trellis_form::db::Backend::Sqlite,
            "lead conversion reads the lead's first_opportunity_at"
        );
        if db.backend() == trellis_form::db::Backend::Sqlite {
            let q: Query = serde_json::from_value(json!({"metric": "pipeline_value"})).unwrap();
            let plan = engine::plan(&fx.app, &fx.reports, &q, now(), db.backend()).unwrap();
            let mut sql = engine::statements(&fx.app, &fx.reports, &plan, &Visibility::default())
                .unwrap()
                .remove(0);
            assert!(sql.text.contains("t.\"stage\" IN ("), "{}", sql.text);
            sql.text = format!("EXPLAIN QUERY PLAN {}", sql.text);
            let kinds = [
                trellis_form::model::ColKind::Int,
                trellis_form::model::ColKind::Int,
                trellis_form::model::ColKind::Int,
                trellis_form::model::ColKind::Text,
            ];
            let text = format!("{:?}", db.fetch_all(&sql, &kinds).await.unwrap());
            assert!(
                text.contains("SEARCH t USING COVERING INDEX") && text.contains("(stage=?)"),
                "the stage filter can use an index that starts with the stage: {text}"
            );
        }
        t.cleanup().await;
    }
}

/// Conversions to related records, on both backends and in both forms (over the whole history
/// counted from the related records' side, over a range with an `EXISTS` per base record):
/// each base record at most once, only related records created at or after it and within the
/// window, immature ones left out.
#[tokio::test]
async fn conversions_count_each_base_record_once_within_its_window() {
    for t in testing::each().await {
        let db = &t.db;
        let fx = fixture(db).await;
        let b = t.backend;
        // The base tables, not the rollup that serves `lead_conversion`.
        let all = json!({"metrics": ["leads", "lead_conversion", "conv_3d", "conv_30d_mature"], "use_rollups": false});
        // L1 converted twice (O1 five days after it, O2 27 days), L2 once (O3 ten and a half
        // hours after it); L3, L4 and L5 not. Within 3 days: L2 only. Within 30 days and
        // mature (created 30 days or more before now): L4 (1 November) is left out.
        let a = ask(db, &fx, all.clone()).await;
        assert_eq!(
            json!(a.totals),
            json!({"leads": 5, "lead_conversion": 0.4, "conv_3d": 0.2, "conv_30d_mature": 0.5}),
            "{b}"
        );
        // Grouped by a user's name (a join beside the related records') and by quarter.
        let a = ask(db, &fx, json!({"metrics": ["leads", "lead_conversion", "conv_3d"], "group_by": ["owner.name"], "use_rollups": false})).await;
        assert_eq!(
            rows(&a),
            json!([{"owner.name": "Rep A", "leads": 5, "lead_conversion": 0.4, "conv_3d": 0.2}]),
            "{b}"
        );
        let a = ask(db, &fx, json!({"metrics": ["conv_3d", "conv_30d_mature"], "time": {"grain": "quarter", "from": "2026-01-01", "to": "2027-01-01"}, "use_rollups": false})).await;
        assert_eq!(
            rows(&a),
            json!([
                {"period": "2026-01-01", "conv_3d": 0.333333, "conv_30d_mature": 0.666667},
                {"period": "2026-04-01", "conv_3d": 0.0, "conv_30d_mature": 0.0},
                {"period": "2026-07-01", "conv_3d": null, "conv_30d_mature": null},
                {"period": "2026-10-01", "conv_3d": 0.0, "conv_30d_mature": null}
            ]),
            "{b}"
        );
        // An opportunity created before its lead does not convert it; one created after does.
        let ctx = WriteCtx {
            actor: None,
            now: now(),
            default_owner: Some(fx.rep_a),
            import: true,
            depth: 0,
        };
        let opp = fx.app.entity("opportunity").unwrap();
        let mut tx = db.begin().await.unwrap();
        store::create_batch(&mut tx, &fx.app, opp, &[json!({"name": "O9", "needs_summary": "n", "amount": 10, "lead": fx.ids["L4"], "expected_close_date": "2027-02-01", "stage": "mql", "created_at": "2026-10-15T00:00:00Z"})], &ctx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let a = ask(db, &fx, all.clone()).await;
        assert_eq!(a.totals["lead_conversion"], json!(0.4), "{b}");
        let mut tx = db.begin().await.unwrap();
        store::create_batch(&mut tx, &fx.app, opp, &[json!({"name": "O10", "needs_summary": "n", "amount": 10, "lead": fx.ids["L4"], "expected_close_date": "2027-02-01", "stage": "mql", "created_at": "2026-11-03T00:00:00Z"})], &ctx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let a = ask(db, &fx, all).await;
        assert_eq!(
            json!(a.totals),
            json!({"leads": 5, "lead_conversion": 0.6, "conv_3d": 0.4, "conv_30d_mature": 0.5}),
            "{b}"
        );
        // The drill-down (an EXISTS per lead on both backends) lists the same leads.
        assert_eq!(
            drill_ids(
                db,
                &fx,
                json!({"metric": "lead_conversion", "row": {}, "side": "numerator"})
            )
            .await,
            vec!["L1", "L2", "L4"],
            "{b}"
        );
        assert_eq!(
            drill_ids(
                db,
                &fx,
                json!({"metric": "conv_3d", "row": {}, "side": "numerator"})
            )
            .await,
            vec!["L2", "L4"],
            "{b}"
        );
        t.cleanup().await;
    }
}

/// Hostile names and values, many of them: each is a precise query error or an answer that
/// matches a simple in-memory model, and the data is intact afterwards.
#[tokio::test]
async fn hostile_names_and_values_never_reach_sql() {
    use rand::{Rng, SeedableRng};
    for t in testing::each().await {
        let db = &t.db;
        let b = t.backend;
        let fx = fixture(db).await;
        let hostile = [
            "50% off",
            "a_b",
            "back\\slash",
            "O'Brien",
            "\"quoted\"",
            "x'); DROP TABLE \"crm__lead\"; --",
            "Ünïcode",
            "plain",
        ];
        let ctx = WriteCtx {
            actor: None,
            now: now(),
            default_owner: Some(fx.rep_a),
            import: false,
            depth: 0,
        };
        let recs: Vec<Json> = hostile
            .iter()
            .map(|n| json!({"name": n, "status": "new"}))
            .collect();
        let mut tx = db.begin().await.unwrap();
        store::create_batch(
            &mut tx,
            &fx.app,
            fx.app.entity("lead").unwrap(),
            &recs,
            &ctx,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let mut names: Vec<String> = ["L1", "L2", "L3", "L4", "L5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        names.extend(hostile.iter().map(|s| s.to_string()));
        let alphabet: Vec<char> = "ab%_\\'\";-() */DROPxO".chars().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
        let total = |a: &engine::Answer| a.totals["leads"].as_i64().unwrap();
        for _ in 0..150 {
            let len = rng.gen_range(0..6);
            let s: String = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            // Values: `contains` is a case-insensitive substring test, `eq` an exact one.
            let a = ask(db, &fx, json!({"metric": "leads", "filters": [{"field": "name", "op": "contains", "value": s}]})).await;
            let want = names
                .iter()
                .filter(|n| n.to_ascii_lowercase().contains(&s.to_ascii_lowercase()))
                .count() as i64;
            assert_eq!(total(&a), want, "{b}: contains {s:?}");
            let a = ask(
                db,
                &fx,
                json!({"metric": "leads", "filters": [{"field": "name", "op": "eq", "value": s}]}),
            )
            .await;
            assert_eq!(
                total(&a),
                names.iter().filter(|n| **n == s).count() as i64,
                "{b}: eq {s:?}"
            );
            // Names: never resolved unless they are real.
            for q in [
                json!({"metric": "leads", "group_by": [s]}),
                json!({"metric": "leads", "filters": [{"field": s, "op": "eq", "value": "x"}]}),
                json!({"metric": s}),
                json!({"metric": "leads", "time": {"grain": s}}),
                json!({"metric": "leads", "filters": [{"field": "name", "op": s, "value": "x"}]}),
                json!({"metric": "leads", "timezone": s}),
            ] {
                let ps = problems(db, &fx, q.clone()).await;
                assert!(!ps.is_empty(), "{b}: {q}");
            }
        }
        // Every drill value is bound too.
        for s in hostile {
            let dq: DrillQuery = serde_json::from_value(
                json!({"metric": "leads", "group_by": ["name"], "row": {"name": s}}),
            )
            .unwrap();
            let page = engine::drill(db, &fx.app, &fx.reports, &dq, now(), &Visibility::default())
                .await
                .unwrap();
            assert_eq!(page.records.len(), 1, "{b}: {s}");
            assert_eq!(page.records[0].fields["name"], json!(s));
        }
        let a = ask(db, &fx, json!({"metrics": ["leads", "opportunities"]})).await;
        assert_eq!(
            json!(a.totals),
            json!({"leads": 13, "opportunities": 5}),
            "{b}: the data is intact"
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn alerts_fire_once_per_finding_and_leave_an_event() {
    for t in testing::each().await {
        let db = &t.db;
        let b = t.backend;
        let mut def = crm_def();
        def["reports"].as_array_mut().unwrap().push(json!({"alerts": {"lead_drop": {
            "every": "day",
            "query": {"metric": "leads", "time": {"from": "2026-04-01", "to": "2026-07-01"},
                      "compare": "previous_period", "flag": {"metric": "leads", "change_pct_lte": -30}}
        }}}));
        // The fixture's data, under a definition with one more alert.
        let _data = fixture(db).await;
        let out = apps::import(db, &def, ImportOptions::default(), None, now())
            .await
            .unwrap();
        let app = apps::load(db, &out.app).await.unwrap().unwrap();
        let reports = Reports::compile(&app).unwrap();
        let fired = trellis_report::alerts::evaluate(db, &app, &reports, now())
            .await
            .unwrap();
        // The CRM's own alerts find nothing in this small fixture; ours fires.
        assert_eq!(
            fired.iter().map(|f| f.alert.as_str()).collect::<Vec<_>>(),
            vec!["lead_drop"],
            "{b}"
        );
        assert_eq!(fired[0].rows["rows"][0]["leads"], json!(1), "{b}");
        assert_eq!(fired[0].rows["rows"][0]["leads_previous"], json!(3), "{b}");
        let events = db
            .fetch_all(
                &trellis_form::db::Sql::new(
                    "SELECT \"record\" FROM \"events\" WHERE \"kind\" = 'alert.fired'",
                ),
                &[trellis_form::model::ColKind::Json],
            )
            .await
            .unwrap();
        assert_eq!(events.len(), 1, "{b}");
        // Not due again within the day; due the next day, but the same finding does not fire twice.
        assert!(
            trellis_report::alerts::evaluate(
                db,
                &app,
                &reports,
                now() + chrono::Duration::hours(2)
            )
            .await
            .unwrap()
            .is_empty(),
            "{b}"
        );
        assert!(
            trellis_report::alerts::evaluate(db, &app, &reports, now() + chrono::Duration::days(2))
                .await
                .unwrap()
                .is_empty(),
            "{b}"
        );
        let listed = trellis_report::alerts::firings(db, "crm", 10)
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "{b}");
        assert_eq!(listed[0].id, fired[0].id, "{b}");
        t.cleanup().await;
    }
}

/// Every value row of every rollup table, by key (rows whose counts all went back to zero
/// left out: an incremental table keeps them, a rebuilt one never has them).
async fn rollup_tables(db: &Db, fx: &Fx) -> Vec<(String, Vec<Json>)> {
    use trellis_form::db::{quote, Sql, Value};
    use trellis_form::model::ColKind;
    let mut out = vec![];
    for r in fx.reports.rollups.values() {
        let cols = r.value_columns();
        let sel: Vec<String> = cols.iter().map(|c| quote(c)).collect();
        let sql = Sql::new(format!(
            "SELECT \"__key\", {} FROM {} ORDER BY \"__key\"",
            sel.join(", "),
            quote(&r.table)
        ));
        let mut kinds = vec![ColKind::Text];
        kinds.extend(cols.iter().map(|_| ColKind::Decimal));
        for row in db.fetch_all(&sql, &kinds).await.unwrap() {
            let vals: Vec<Json> = row[1..]
                .iter()
                .map(|v| match v {
                    Value::Decimal(d) => json!(d.to_string().parse::<f64>().unwrap()),
                    Value::Int(i) => json!(*i as f64),
                    other => panic!("{other:?}"),
                })
                .collect();
            if vals.iter().all(|v| v.as_f64() == Some(0.0)) {
                continue;
            }
            // A bucket without records holds nothing else either.
            assert_ne!(vals[0].as_f64(), Some(0.0), "{}: {row:?}", r.name);
            let Value::Text(k) = &row[0] else { panic!() };
            out.push((format!("{}:{k}", r.name), vals));
        }
    }
    out
}

/// The queries the rollups must answer exactly as the base tables do, and whether one should
/// serve each.
fn rollup_queries() -> Vec<(Json, bool)> {
    vec![
        (json!({"metric": "stage_conversion"}), true),
        (json!({"metric": "time_in_stage"}), true),
        (
            json!({"metric": "stage_conversion", "group_by": ["owner"]}),
            true,
        ),
        (
            json!({"metric": "time_in_stage", "group_by": ["region"]}),
            true,
        ),
        (
            json!({"metric": "time_in_stage", "group_by": ["product_line"], "filters": [{"field": "region", "op": "in", "value": ["east", "north"]}]}),
            true,
        ),
        (json!({"metric": "median_time_in_stage"}), false),
        // A conversion whose anchor the query moves compares the opportunities with that
        // anchor: base tables.
        (
            json!({"metric": "lead_conversion", "time": {"field": "updated_at"}}),
            false,
        ),
        (
            json!({"metric": "stage_conversion", "group_by": ["region"]}),
            true,
        ),
        (
            json!({"metric": "stage_conversion", "group_by": ["region"], "time": {"field": "expected_close_date", "grain": "quarter", "from": "2026-01-01", "to": "2027-04-01"}}),
            true,
        ),
        (
            json!({"metrics": ["pipeline_value", "win_rate", "avg_deal_size", "sales_cycle_days", "lead_conversion"]}),
            true,
        ),
        (json!({"metric": "weighted_forecast"}), true),
        (
            json!({"metric": "weighted_forecast", "group_by": ["stage"]}),
            true,
        ),
        (
            json!({"metric": "weighted_forecast", "time": {"grain": "month", "from": "2026-01-01", "to": "2027-03-01"}}),
            true,
        ),
        (
            json!({"metrics": ["win_rate", "won_count"], "time": {"grain": "quarter", "from": "2026-01-01", "to": "2027-01-01"}}),
            true,
        ),
        (
            json!({"metrics": ["win_rate", "avg_deal_size"], "group_by": ["region"], "time": {"grain": "week", "from": "2026-01-05", "to": "2026-07-06"}}),
            true,
        ),
        (
            json!({"metric": "proposal_to_quoted", "group_by": ["region"], "time": {"from": "2026-04-01", "to": "2026-07-01"}, "compare": "previous_period", "flag": {"metric": "proposal_to_quoted", "change_pct_lte": -30}}),
            true,
        ),
        (
            json!({"metrics": ["leads", "lead_conversion"], "group_by": ["source"], "time": {"grain": "month", "from": "2026-01-01", "to": "2026-12-01"}}),
            true,
        ),
        (
            json!({"metrics": ["leads", "lead_conversion"], "time": {"grain": "quarter", "from": "2026-01-01", "to": "2027-01-01"}}),
            true,
        ),
        (
            json!({"metric": "pipeline_value", "filters": [{"field": "region", "op": "eq", "value": "east"}]}),
            true,
        ),
        (
            json!({"metric": "pipeline_value", "filters": [{"field": "region", "op": "is_null", "value": true}]}),
            true,
        ),
        // Not served: another time zone, a filter or a dimension outside the rollup, a
        // percentile, a range that cuts a month bucket.
        (
            json!({"metrics": ["leads", "lead_conversion"], "timezone": "Europe/Berlin", "time": {"grain": "week", "from": "2026-03-23", "to": "2026-04-06"}}),
            false,
        ),
        (
            json!({"metric": "pipeline_value", "filters": [{"field": "industry", "op": "eq", "value": "retail"}]}),
            false,
        ),
        (
            json!({"metric": "stage_conversion", "group_by": ["industry"]}),
            false,
        ),
        (
            json!({"metric": "weighted_forecast", "time": {"grain": "day", "from": "2026-03-01", "to": "2026-03-15"}}),
            false,
        ),
        (json!({"metric": "median_cycle"}), false),
    ]
}

async fn same_either_way(db: &Db, fx: &Fx, b: &str, when: &str) {
    for (q, served) in rollup_queries() {
        let fast = ask(db, fx, q.clone()).await;
        let mut base_q = q.clone();
        base_q["use_rollups"] = json!(false);
        let base = ask(db, fx, base_q).await;
        assert_eq!(base.meta["rollups"], json!([]), "{b} {when}: {q}");
        assert_eq!(
            fast.meta["rollups"] != json!([]),
            served,
            "{b} {when}: {q} was {}served: {}",
            if served { "not " } else { "" },
            fast.meta["rollups"]
        );
        assert_eq!(rows(&fast), rows(&base), "{b} {when}: {q}");
        assert_eq!(json!(fast.totals), json!(base.totals), "{b} {when}: {q}");
    }
}

#[tokio::test]
async fn rollups_answer_exactly_what_the_base_tables_answer_and_stay_fresh() {
    for t in testing::each().await {
        let db = &t.db;
        let fx = fixture(db).await;
        let b = t.backend;
        same_either_way(db, &fx, b, "after the fixture").await;
        // The dashboard panels too.
        let before = rollup_tables(db, &fx).await;
        assert!(before.len() > 10, "{b}: {before:?}");

        // Writes through every path: a stage change (O3 proposal → quoted moves it between
        // buckets of every rollup), a region change, a new opportunity that converts lead L3
        // (the lead's rollup moves from another entity's write), a batch of leads, a delete.
        let ctx = WriteCtx {
            actor: None,
            now: now(),
            default_owner: Some(fx.rep_a),
            import: false,
            depth: 0,
        };
        let opp = fx.app.entity("opportunity").unwrap();
        let lead = fx.app.entity("lead").unwrap();
        let mut tx = db.begin().await.unwrap();
        store::update(
            &mut tx,
            &fx.app,
            opp,
            fx.ids["O3"],
            &json!({"stage": "quoted", "quoted_amount": 280}),
            None,
            &ctx,
        )
        .await
        .unwrap();
        store::update(
            &mut tx,
            &fx.app,
            opp,
            fx.ids["O5"],
            &json!({"region": "south", "amount": 75}),
            None,
            &ctx,
        )
        .await
        .unwrap();
        let o6 = store::create(&mut tx, &fx.app, opp, &json!({"name": "O6", "needs_summary": "n", "region": "east", "amount": 120, "lead": fx.ids["L3"], "expected_close_date": "2027-02-01", "stage": "mql"}), &ctx)
            .await
            .unwrap()
            .meta
            .id;
        store::create_batch(
            &mut tx,
            &fx.app,
            lead,
            &[
                json!({"name": "L6", "status": "new", "source": "website"}),
                json!({"name": "L7", "status": "new", "region": "east"}),
            ],
            &ctx,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        // The new opportunity moves the lead it converts: L3 is now converted, as the base
        // tables say.
        let conv = ask(db, &fx, json!({"metric": "lead_conversion"})).await;
        assert_eq!(conv.meta["rollups"], json!(["leads_by_month"]), "{b}");
        assert_eq!(
            conv.totals["lead_conversion"],
            json!(3.0 / 7.0 * 1e6_f64)
                .as_f64()
                .map(|x| json!((x.round()) / 1e6))
                .unwrap(),
            "{b}"
        );
        // Repointing and deleting the opportunity moves the lead back.
        let mut tx = db.begin().await.unwrap();
        store::update(
            &mut tx,
            &fx.app,
            opp,
            o6,
            &json!({"lead": fx.ids["L4"]}),
            None,
            &ctx,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        same_either_way(db, &fx, b, "after the writes").await;
        let mut tx = db.begin().await.unwrap();
        store::delete(&mut tx, &fx.app, opp, o6, None, &ctx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        same_either_way(db, &fx, b, "after a delete").await;
        let conv = ask(db, &fx, json!({"metric": "lead_conversion"})).await;
        assert_eq!(
            conv.totals["lead_conversion"],
            json!(0.285714),
            "{b}: 2 of 7 leads"
        );

        // Two writers converting the same lead at once (L5): the second waits for the first
        // and counts the lead once.
        let first = async {
            let mut tx = db.begin().await.unwrap();
            store::create(&mut tx, &fx.app, opp, &json!({"name": "O7", "needs_summary": "n", "amount": 10, "lead": fx.ids["L5"], "expected_close_date": "2027-02-01", "stage": "mql"}), &ctx)
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            tx.commit().await.unwrap();
        };
        let second = async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let mut tx = db.begin().await.unwrap();
            store::create(&mut tx, &fx.app, opp, &json!({"name": "O8", "needs_summary": "n", "amount": 20, "lead": fx.ids["L5"], "expected_close_date": "2027-02-01", "stage": "mql"}), &ctx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        };
        tokio::join!(first, second);
        same_either_way(db, &fx, b, "after concurrent writers").await;
        let conv = ask(db, &fx, json!({"metric": "lead_conversion"})).await;
        assert_eq!(
            conv.totals["lead_conversion"],
            json!(0.428571),
            "{b}: 3 of 7 leads"
        );

        // A rebuild from the base tables gives the same tables the writes kept.
        let kept = rollup_tables(db, &fx).await;
        assert_ne!(kept, before, "{b}: the writes changed the rollups");
        let done = trellis_report::rollup::rebuild(db, &fx.app, &fx.reports, None, now())
            .await
            .unwrap();
        assert_eq!(done.len(), fx.reports.rollups.len(), "{b}");
        let leads_rebuilt = done.iter().find(|r| r.rollup == "leads_by_month").unwrap();
        assert_eq!(leads_rebuilt.records, 7, "{b}");
        assert_eq!(rollup_tables(db, &fx).await, kept, "{b}");
        same_either_way(db, &fx, b, "after a rebuild").await;
        // One rollup by name; an unknown one is a precise error.
        assert_eq!(
            trellis_report::rollup::rebuild(
                db,
                &fx.app,
                &fx.reports,
                Some("proposals_by_day"),
                now()
            )
            .await
            .unwrap()
            .len(),
            1
        );
        match trellis_report::rollup::rebuild(db, &fx.app, &fx.reports, Some("nope"), now()).await {
            Err(FormError::Query(ps)) => assert_eq!(ps[0].code, "unknown_rollup", "{b}"),
            other => panic!("{b}: {other:?}"),
        }
        // A scoped caller (own records) is answered from a rollup that keeps owners apart
        // (`opportunity_totals`), counting only the caller's records.
        let mine = ask_as(
            db,
            &fx,
            json!({"metric": "stage_conversion"}),
            &Visibility {
                owners: Some(vec![fx.rep_a]),
            },
        )
        .await;
        assert_eq!(mine.meta["rollups"], json!(["opportunity_totals"]), "{b}");
        let mut base_q = json!({"metric": "stage_conversion", "use_rollups": false});
        let base = ask_as(
            db,
            &fx,
            base_q.take(),
            &Visibility {
                owners: Some(vec![fx.rep_a]),
            },
        )
        .await;
        assert_eq!(rows(&mine), rows(&base), "{b}");
        // A grouping the owner-keeping rollup lacks falls back for the scoped caller.
        let by_month = ask_as(db, &fx, json!({"metric": "weighted_forecast", "time": {"grain": "month", "from": "2026-01-01", "to": "2027-03-01"}}), &Visibility { owners: Some(vec![fx.rep_a]) }).await;
        assert_eq!(by_month.meta["rollups"], json!([]), "{b}");
        assert_eq!(
            mine.rows[0]["entered"],
            json!(5),
            "{b}: O1, O2, O5, O7, O8 are rep A's"
        );
    }
}

#[tokio::test]
async fn writes_refuse_to_run_around_declared_rollups() {
    for t in testing::each().await {
        let db = &t.db;
        let out = apps::import(db, &crm_def(), ImportOptions::default(), None, now())
            .await
            .unwrap();
        // Loaded without the report engine: the form engine cannot keep the rollups.
        let app = apps::load(db, &out.app).await.unwrap().unwrap();
        let ctx = WriteCtx {
            actor: None,
            now: now(),
            default_owner: None,
            import: false,
            depth: 0,
        };
        let mut tx = db.begin().await.unwrap();
        let err = store::create(
            &mut tx,
            &app,
            app.entity("lead").unwrap(),
            &json!({"name": "x", "status": "new"}),
            &ctx,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, FormError::Internal(ref m) if m.contains("declares rollups")),
            "{}: {err}",
            t.backend
        );
        drop(tx);
        let n = db
            .fetch_all(
                &trellis_form::db::Sql::new("SELECT COUNT(*) FROM \"crm__lead\""),
                &[trellis_form::model::ColKind::Int],
            )
            .await
            .unwrap();
        assert_eq!(n[0][0], trellis_form::db::Value::Int(0), "{}", t.backend);
    }
}

#[tokio::test]
async fn bad_rollup_definitions_list_every_problem() {
    let t = testing::sqlite().await;
    let db = &t.db;
    let mut def = crm_def();
    def["reports"].as_array_mut().unwrap().push(json!({"rollups": {
        "bad": {"entity": "opportunity", "dimensions": ["account.industry", "nope", "region", "region"],
                "time": "name", "grain": "fortnight",
                "measures": ["median_cycle", "median_time_in_stage", "leads", "missing"]},
        "no_entity": {"entity": "ghost", "measures": ["leads"]},
        "Bad-Name": {"entity": "lead", "measures": ["leads"]},
        "empty": {"entity": "lead", "measures": []},
        "summaries": {"entity": "lead", "dimensions": ["region", "first_opportunity_at"],
                      "time": "first_opportunity_at", "measures": ["leads", "leads_with_deal"]}
    }, "metrics": {
        "leads_with_deal": {"type": "aggregate", "entity": "lead", "agg": "count",
                            "filter": "first_opportunity_at is not null"}
    }}));
    let out = apps::import(db, &def, ImportOptions::default(), None, now())
        .await
        .unwrap();
    let app = apps::load(db, &out.app).await.unwrap().unwrap();
    let Err(FormError::Definition(ps)) = Reports::compile(&app) else {
        panic!("expected definition errors")
    };
    let got: Vec<(String, String)> = ps
        .iter()
        .map(|p| (p.path.clone(), p.code.to_string()))
        .collect();
    let i = def["reports"].as_array().unwrap().len() - 1;
    let at = |s: &str| format!("/reports/{i}/rollups/{s}");
    for (path, code) in [
        (at("Bad-Name"), "invalid_name"),
        (at("bad/dimensions/0"), "invalid_rollup"),
        (at("bad/dimensions/1"), "unknown_field"),
        (at("bad/dimensions/3"), "duplicate"),
        (at("bad/time"), "invalid_rollup"),
        (at("bad/grain"), "invalid_rollup"),
        (at("bad/measures/0"), "invalid_rollup"),
        (at("bad/measures/1"), "invalid_rollup"),
        (at("bad/measures/2"), "invalid_rollup"),
        (at("bad/measures/3"), "unknown_metric"),
        (at("no_entity/entity"), "unknown_entity"),
        (at("empty/measures"), "required"),
        // A lead's summary changes with opportunity writes, which do not reach a lead rollup.
        (at("summaries/dimensions/1"), "invalid_rollup"),
        (at("summaries/time"), "invalid_rollup"),
        (at("summaries/measures/1"), "invalid_rollup"),
    ] {
        assert!(
            got.contains(&(path.clone(), code.to_owned())),
            "{path} {code} not in {got:#?}"
        );
    }
    let msg = |p: &str| ps.iter().find(|x| x.path == p).unwrap().message.clone();
    assert!(
        msg(&at("bad/measures/0")).contains("cannot be added up"),
        "{}",
        msg(&at("bad/measures/0"))
    );
    assert!(
        msg(&at("bad/measures/1")).contains("an average can"),
        "{}",
        msg(&at("bad/measures/1"))
    );
    assert!(
        msg(&at("bad/dimensions/0")).contains("go stale"),
        "{}",
        msg(&at("bad/dimensions/0"))
    );
    for p in [
        "summaries/dimensions/1",
        "summaries/time",
        "summaries/measures/1",
    ] {
        assert!(
            msg(&at(p)).contains("`first_opportunity_at` is a summary field"),
            "{}",
            msg(&at(p))
        );
    }
    assert!(
        !got.iter().any(|(p, _)| p == &at("summaries/measures/0")),
        "{got:#?}"
    );
    t.cleanup().await;
}
