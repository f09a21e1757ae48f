//! Reports over HTTP: queries, CSV/XLSX, drill-down, dashboards, record visibility, and bad
//! queries and definitions, on SQLite and PostgreSQL.

use crate::helpers::{json, problem_paths, with, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn rep(app: &TestApp, who: &str) -> (String, String) {
    let (s, u) = app
        .call(Method::POST, "/api/v1/users", Some(json!({"name": who, "email": format!("{who}@x.example"), "password": "a good long password"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    let id = u["id"].as_str().unwrap().to_owned();
    let (s, _) = app
        .call(
            Method::PUT,
            &format!("/api/v1/apps/crm/members/{id}"),
            Some(json!({"role": "sales_rep"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let r = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": format!("{who}@x.example"), "password": "a good long password"}))
        .send()
        .await
        .unwrap();
    (id, json(r).await.1["token"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn reports_count_what_the_caller_may_see() {
    for app in TestApp::each().await {
        let be = app.backend;
        let (r1, t1) = rep(&app, "r1").await;
        let (r2, _t2) = rep(&app, "r2").await;
        let records = json!([
            {"name": "A", "amount": 100, "region": "north", "owner": r1},
            {"name": "B", "amount": 200, "region": "east", "owner": r1},
            {"name": "C", "amount": 400, "region": "east", "owner": r2}
        ]);
        let (s, made) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/opportunity/batch",
                Some(json!({"records": records})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {made}");

        let q = json!({"metrics": ["opportunities", "pipeline_value"], "group_by": ["region"]});
        let (s, a) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/reports/query",
                Some(q.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}: {a}");
        assert_eq!(
            a["rows"],
            json!([
                {"region": "east", "opportunities": 2, "pipeline_value": 600.0},
                {"region": "north", "opportunities": 1, "pipeline_value": 100.0}
            ]),
            "{be}"
        );
        assert_eq!(
            a["totals"],
            json!({"opportunities": 3, "pipeline_value": 700.0}),
            "{be}"
        );
        assert_eq!(
            a["columns"][0],
            json!({"name": "region", "role": "dimension", "label": "region"})
        );
        // A rep's numbers, funnel included, count only the rep's own records.
        let (s, mine) = with(
            &app,
            &t1,
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(q),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            mine["totals"],
            json!({"opportunities": 2, "pipeline_value": 300.0}),
            "{be}"
        );
        let (_, funnel) = with(
            &app,
            &t1,
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(json!({"metric": "stage_conversion"})),
        )
        .await;
        assert_eq!(funnel["rows"][0]["entered"], json!(2), "{be}");
        let (_, funnel) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/reports/query",
                Some(json!({"metric": "stage_conversion"})),
            )
            .await;
        assert_eq!(funnel["rows"][0]["entered"], json!(3), "{be}");
        // Drill-down: the records behind east's count, only the rep's for the rep.
        let dq =
            json!({"metric": "opportunities", "group_by": ["region"], "row": {"region": "east"}});
        let (s, d) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/reports/drill",
                Some(dq.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}: {d}");
        let mut names: Vec<&str> = d["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["B", "C"], "{be}");
        let (_, d) = with(
            &app,
            &t1,
            Method::POST,
            "/api/v1/apps/crm/reports/drill",
            Some(dq),
        )
        .await;
        assert_eq!(d["records"].as_array().unwrap().len(), 1, "{be}");
        assert_eq!(d["records"][0]["name"], "B");
        // A read-scope token may query (a POST that only reads) but not write.
        let (s, tok) = with(
            &app,
            &t1,
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "bi", "scope": "read"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{tok}");
        let read = tok["token"].as_str().unwrap();
        let (s, _) = with(
            &app,
            read,
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(json!({"metric": "opportunities"})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}");
        let (s, _) = with(
            &app,
            read,
            Method::POST,
            "/api/v1/apps/crm/records/lead",
            Some(json!({"name": "x", "status": "new"})),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{be}");
        // CSV and XLSX.
        let r = app
            .req(Method::POST, "/api/v1/apps/crm/reports/query?format=csv")
            .json(&json!({"metric": "opportunities", "group_by": ["region"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv"));
        assert_eq!(r.headers()["trellis-row-count"], "2");
        assert_eq!(r.headers()["trellis-truncated"], "false");
        assert_eq!(
            r.text().await.unwrap(),
            "region,opportunities\neast,2\nnorth,1\n"
        );
        // A file cut by `limit` says so in its headers, the JSON answer in `meta`.
        let r = app
            .req(Method::POST, "/api/v1/apps/crm/reports/query?format=csv")
            .json(&json!({"metric": "opportunities", "group_by": ["region"], "limit": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["trellis-row-count"], "2");
        assert_eq!(r.headers()["trellis-truncated"], "true");
        assert_eq!(r.text().await.unwrap(), "region,opportunities\neast,2\n");
        let (s, cut) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/reports/query",
                Some(json!({"metric": "opportunities", "group_by": ["region"], "limit": 1})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}: {cut}");
        assert_eq!(
            (&cut["meta"]["row_count"], &cut["meta"]["truncated"]),
            (&json!(2), &json!(true)),
            "{be}: {cut}"
        );
        let r = app
            .req(Method::POST, "/api/v1/apps/crm/reports/query?format=xlsx")
            .json(&json!({"metric": "opportunities"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            &r.bytes().await.unwrap()[..2],
            b"PK",
            "an xlsx file is a zip"
        );
        // The dashboard answers every panel in one request.
        let (s, dash) = app
            .call(
                Method::GET,
                "/api/v1/apps/crm/dashboards/sales_overview",
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}: {dash}");
        let items = dash["items"].as_array().unwrap();
        assert_eq!(items.len(), 8);
        assert!(
            items.iter().all(|i| i["answer"]["rows"].is_array()),
            "{be}: {dash}"
        );
        assert_eq!(
            items[0]["answer"]["totals"]["pipeline_value"],
            json!(700.0),
            "{be}"
        );
        let (_, dash) = with(
            &app,
            &t1,
            Method::GET,
            "/api/v1/apps/crm/dashboards/sales_overview",
            None,
        )
        .await;
        assert_eq!(
            dash["items"][0]["answer"]["totals"]["pipeline_value"],
            json!(300.0),
            "{be}"
        );
        // Alerts: listed for those who see every record, refused to a rep.
        let (s, alerts) = app.call(Method::GET, "/api/v1/apps/crm/alerts", None).await;
        assert_eq!(s, StatusCode::OK, "{be}: {alerts}");
        assert_eq!(alerts["alerts"][0]["name"], "funnel_drop_by_product_line");
        assert_eq!(alerts["firings"], json!([]));
        let (s, _) = with(&app, &t1, Method::GET, "/api/v1/apps/crm/alerts", None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{be}");
        let (s, list) = app
            .call(Method::GET, "/api/v1/apps/crm/reports", None)
            .await;
        assert_eq!(s, StatusCode::OK);
        let names: Vec<&str> = list["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        for contract in [
            "lead_conversion",
            "stage_conversion",
            "sales_cycle_days",
            "weighted_forecast",
            "win_rate",
            "avg_deal_size",
            "pipeline_value",
            "time_in_stage",
        ] {
            assert!(names.contains(&contract), "{contract}");
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn bad_report_requests_are_problem_json() {
    let app = TestApp::start(trellis_form::testing::sqlite().await).await;
    for (q, path) in [
        (json!({"metric": "revenue"}), "/metrics/0"),
        (json!({"metrics": 5}), "/metrics"),
        (json!({"metric": "leads", "bogus": 1}), "/bogus"),
        (
            json!({"metric": "leads", "filters": [{"field": "region", "op": "eq", "value": "mars"}]}),
            "/filters/0/value",
        ),
        (
            json!({"metric": "leads", "time": {"grain": "month", "preset": "this_quarter"}, "timezone": "Nowhere/City"}),
            "/timezone",
        ),
    ] {
        let (s, p) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/reports/query",
                Some(q.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {p}");
        assert_eq!(p["code"], "invalid_query");
        assert!(
            problem_paths(&p).iter().any(|(pp, _)| pp == path),
            "{q}: {p}"
        );
    }
    let (s, p) = app
        .call(
            Method::POST,
            "/api/v1/apps/crm/reports/query?format=pdf",
            Some(json!({"metric": "leads"})),
        )
        .await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query"))
    );
    // The format is checked before the query is planned or run: with an unknown metric too,
    // the answer is about the format.
    let (s, p) = app
        .call(
            Method::POST,
            "/api/v1/apps/crm/reports/query?format=pdf",
            Some(json!({"metric": "no_such_metric"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("`pdf` is not a format"),
        "{p}"
    );
    let (s, _) = app
        .call(Method::GET, "/api/v1/apps/crm/dashboards/nope", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/apps/nope/reports/query",
            Some(json!({"metric": "leads"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A definition whose report is broken is refused whole, with the path, and changes nothing.
    let (_, before) = app.call(Method::GET, "/api/v1/apps/crm", None).await;
    let mut def = before["definition"].clone();
    def["reports"][0]["metrics"]["broken"] = json!({"type": "aggregate", "entity": "opportunity", "agg": "sum", "expr": "amount", "filter": "stage == 'wonn'"});
    let (s, p) = app.call(Method::PUT, "/api/v1/apps/crm", Some(def)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["code"], "invalid_definition");
    assert_eq!(
        problem_paths(&p)[0].0,
        "/reports/0/metrics/broken/filter",
        "{p}"
    );
    let (_, after) = app.call(Method::GET, "/api/v1/apps/crm", None).await;
    assert_eq!(after["version"], before["version"]);
    app.stop().await;
}
