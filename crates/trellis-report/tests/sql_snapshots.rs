//! The SQL the compiler emits for every metric type, in both dialects: a reviewed snapshot, so a
//! change in generated SQL is always seen in review. Every value is a bound parameter (listed
//! after the text); identifiers are quoted.

use chrono::{TimeZone, Utc};
use serde_json::json;
use std::path::Path;
use trellis_form::db::Backend;
use trellis_report::{engine, Query, Reports, Visibility};

#[test]
fn generated_sql_per_metric_type_and_dialect() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/crm");
    let mut def = trellis_form::bundle::load(&dir).unwrap().definition;
    def["reports"].as_array_mut().unwrap().push(json!({"metrics": {
        "amount_p90": {"type": "aggregate", "entity": "opportunity", "agg": "percentile", "p": 0.9, "expr": "amount"},
        "stage_conversion_ordered": {"type": "funnel", "entity": "opportunity", "mode": "ordered", "stages": ["mql", "sql", "won"]},
        "lead_conversion_30d": {"type": "conversion", "entity": "lead", "converted": {"entity": "opportunity", "via": "lead", "within_days": 30, "exclude_immature": true}}
    }}));
    let app =
        trellis_form::compile::compile(trellis_form::compile::parse(&def).unwrap(), 1).unwrap();
    let reports = Reports::compile(&app).unwrap();
    let now = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    let vis = Visibility {
        owners: Some(vec![uuid::Uuid::nil()]),
    };
    let mut out = String::new();
    for metric in [
        "pipeline_value",
        "win_rate",
        "weighted_forecast",
        "sales_cycle_days",
        "amount_p90",
        "lead_conversion_30d",
        // Over the whole history a conversion is counted from the related records' side.
        "lead_conversion_30d/all_time",
        "stage_conversion_ordered",
        "time_in_stage",
        // A zone with daylight saving time: with a range, SQLite compares the instant with the
        // UTC starts of the range's buckets (22:00 or 23:00 the day before, by the season).
        "won_count/berlin",
    ] {
        let (metric, variant) = match metric.split_once('/') {
            Some((m, v)) => (m, v),
            None => (metric, ""),
        };
        let all_time = variant == "all_time";
        let time = if metric == "weighted_forecast" {
            json!({"grain": "month", "from": "2026-12-01", "to": "2027-03-01"})
        } else if all_time {
            json!({"grain": "quarter"})
        } else {
            json!({"grain": "quarter", "from": "2026-01-01", "to": "2027-01-01"})
        };
        let mut q = json!({
            "metric": metric,
            "group_by": ["region"],
            "filters": [{"field": "region", "op": "ne", "value": "overseas"}],
            "time": time,
        });
        if variant == "berlin" {
            q["timezone"] = json!("Europe/Berlin");
        }
        let q: Query = serde_json::from_value(q).unwrap();
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let plan = engine::plan(&app, &reports, &q, now, backend).unwrap();
            for sql in engine::statements(&app, &reports, &plan, &vis).unwrap() {
                out.push_str(&format!(
                    "-- {metric}{} ({backend:?})\n{}\n-- params: {:?}\n\n",
                    match variant {
                        "all_time" => ", all time",
                        "berlin" => ", Europe/Berlin",
                        _ => "",
                    },
                    sql.text,
                    sql.params
                ));
            }
        }
    }
    insta::assert_snapshot!(out);
}
