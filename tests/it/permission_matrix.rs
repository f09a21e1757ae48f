//! The permission matrix over HTTP: every CRM role × every record endpoint × a record that is
//! the caller's own, their team's, or someone else's; the reports a role sees; field
//! permissions (hidden, read-only) and mass assignment; the fields that feed access rules; the
//! audit log. On SQLite and PostgreSQL.

use crate::helpers::{json, problem_paths, with, TestApp, TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;

const PASSWORD: &str = "a good long password";

/// The people of the matrix: (name, manager, role in the CRM).
const PEOPLE: [(&str, Option<&str>, Option<&str>); 8] = [
    ("boss", None, Some("manager")),
    ("r1", Some("boss"), Some("sales_rep")),
    ("r2", Some("boss"), Some("sales_rep")),
    ("sdr", Some("boss"), Some("sdr")),
    ("r3", None, Some("sales_rep")),
    ("viewer", None, Some("viewer")),
    ("appadmin", None, Some("admin")),
    ("outsider", None, None),
];

struct World {
    ids: HashMap<&'static str, String>,
    tokens: HashMap<&'static str, String>,
}

async fn world(app: &TestApp) -> World {
    let mut ids: HashMap<&'static str, String> = HashMap::new();
    let mut tokens = HashMap::new();
    for (who, manager, role) in PEOPLE {
        let mut body =
            json!({"name": who, "email": format!("{who}@x.example"), "password": PASSWORD});
        if let Some(m) = manager {
            body["manager_id"] = json!(ids[m]);
        }
        let (s, u) = app.call(Method::POST, "/api/v1/users", Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{u}");
        let id = u["id"].as_str().unwrap().to_owned();
        if let Some(role) = role {
            let (s, b) = app
                .call(
                    Method::PUT,
                    &format!("/api/v1/apps/crm/members/{id}"),
                    Some(json!({"role": role})),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{b}");
        }
        let r = app
            .client
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"email": format!("{who}@x.example"), "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        let (s, b) = json(r).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        tokens.insert(who, b["token"].as_str().unwrap().to_owned());
        ids.insert(who, id);
    }
    tokens.insert("admin", TOKEN.to_owned());
    World { ids, tokens }
}

/// An opportunity owned by `owner`, made by the admin.
async fn opportunity(app: &TestApp, w: &World, owner: &str, name: &str) -> String {
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/apps/crm/records/opportunity",
            Some(json!({"name": name, "owner": w.ids[owner], "amount": "1000.00", "budget": "900.00", "region": "east"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    b["id"].as_str().unwrap().to_owned()
}

/// Whose record is "own", "team" (a report's, or a peer's for a rep) and "other" for each
/// caller.
fn owners(caller: &str) -> [(&'static str, &'static str); 3] {
    match caller {
        "boss" => [("own", "boss"), ("team", "r1"), ("other", "r3")],
        "sdr" => [("own", "sdr"), ("team", "r1"), ("other", "r3")],
        _ => [("own", "r1"), ("team", "r2"), ("other", "r3")],
    }
}

/// What each role may do, as the CRM defines it: (sees own/team/other, update, delete).
fn expected(caller: &str, rel: &str, endpoint: &str) -> StatusCode {
    let sees = match caller {
        "admin" | "appadmin" | "viewer" => true,
        "boss" => rel != "other",
        "r1" | "sdr" => rel == "own",
        _ => false,
    };
    if !sees {
        return StatusCode::NOT_FOUND;
    }
    let (update, delete) = match caller {
        "admin" | "appadmin" | "boss" => (true, true),
        "r1" => (true, false),
        _ => (false, false),
    };
    match endpoint {
        "read" | "history" | "documents" | "runs" => StatusCode::OK,
        "update" if update => StatusCode::OK,
        "delete" if delete => StatusCode::NO_CONTENT,
        _ => StatusCode::FORBIDDEN,
    }
}

#[tokio::test]
async fn every_role_every_endpoint_own_team_other() {
    for app in TestApp::each().await {
        let be = app.backend;
        let w = world(&app).await;
        let mut records: HashMap<&str, String> = HashMap::new();
        for owner in ["boss", "r1", "r2", "r3", "sdr"] {
            records.insert(
                owner,
                opportunity(&app, &w, owner, &format!("deal of {owner}")).await,
            );
        }
        let mut failures = vec![];
        let mut cells = 0;
        for caller in [
            "admin", "appadmin", "boss", "r1", "sdr", "viewer", "outsider",
        ] {
            let token = &w.tokens[caller];
            for (rel, owner) in owners(caller) {
                let base = format!("/api/v1/apps/crm/records/opportunity/{}", records[owner]);
                let calls: Vec<(&str, Method, String, Option<Value>)> = vec![
                    ("read", Method::GET, base.clone(), None),
                    ("history", Method::GET, format!("{base}/history"), None),
                    ("documents", Method::GET, format!("{base}/documents"), None),
                    (
                        "runs",
                        Method::GET,
                        format!(
                            "/api/v1/apps/crm/runs?entity=opportunity&record_id={}",
                            records[owner]
                        ),
                        None,
                    ),
                    (
                        "update",
                        Method::PATCH,
                        base.clone(),
                        Some(json!({"needs_summary": format!("{caller} was here")})),
                    ),
                ];
                for (endpoint, method, path, body) in calls {
                    let mut want = expected(caller, rel, endpoint);
                    if caller == "outsider" {
                        want = StatusCode::NOT_FOUND;
                    }
                    let (got, b) = with(&app, token, method, &path, body).await;
                    cells += 1;
                    if got != want {
                        failures.push(format!(
                            "{caller} {endpoint} {rel}: {got} (want {want}) {b}"
                        ));
                    }
                }
                // Deletes get a record of their own, so the matrix can go on.
                let victim = opportunity(&app, &w, owner, &format!("{caller} deletes {rel}")).await;
                let want = if caller == "outsider" {
                    StatusCode::NOT_FOUND
                } else {
                    expected(caller, rel, "delete")
                };
                let (got, b) = with(
                    &app,
                    token,
                    Method::DELETE,
                    &format!("/api/v1/apps/crm/records/opportunity/{victim}"),
                    None,
                )
                .await;
                cells += 1;
                if got != want {
                    failures.push(format!("{caller} delete {rel}: {got} (want {want}) {b}"));
                }
                // Refused or not, the record is still there unless the delete was allowed.
                let (s, _) = app
                    .call(
                        Method::GET,
                        &format!("/api/v1/apps/crm/records/opportunity/{victim}"),
                        None,
                    )
                    .await;
                let gone = want == StatusCode::NO_CONTENT;
                assert_eq!(
                    s == StatusCode::NOT_FOUND,
                    gone,
                    "{be} {caller} delete {rel}"
                );
                if !gone {
                    let (s, _) = app
                        .call(
                            Method::DELETE,
                            &format!("/api/v1/apps/crm/records/opportunity/{victim}"),
                            None,
                        )
                        .await;
                    assert_eq!(s, StatusCode::NO_CONTENT, "{be}");
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{be}: {} of {cells} cells wrong:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert_eq!(cells, 7 * 3 * 6, "{be}");
        // Only the updates that were allowed changed anything: who wrote on r1's deal.
        let (_, r1deal) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/crm/records/opportunity/{}", records["r1"]),
                None,
            )
            .await;
        let (_, hist) = app
            .call(
                Method::GET,
                &format!(
                    "/api/v1/apps/crm/records/opportunity/{}/history",
                    records["r1"]
                ),
                None,
            )
            .await;
        let writers: Vec<String> = hist["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["field"] == "needs_summary")
            .map(|h| h["new"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            writers,
            [
                "admin was here",
                "appadmin was here",
                "boss was here",
                "r1 was here"
            ],
            "{be}: {r1deal}"
        );

        // Lists, creates and reports, per role: how many of the 5 deals each one counts.
        for (caller, visible, can_create) in [
            ("admin", 5, true),
            ("appadmin", 5, true),
            ("boss", 4, true),
            ("r1", 1, true),
            ("sdr", 1, false),
            ("viewer", 5, false),
        ] {
            let token = &w.tokens[caller];
            let (s, page) = with(
                &app,
                token,
                Method::GET,
                "/api/v1/apps/crm/records/opportunity?count=true",
                None,
            )
            .await;
            assert_eq!(
                (s, page["total"].clone()),
                (StatusCode::OK, json!(visible)),
                "{be} {caller} list"
            );
            let (s, q) = with(
                &app,
                token,
                Method::POST,
                "/api/v1/apps/crm/reports/query",
                Some(json!({"metric": "opportunities"})),
            )
            .await;
            assert_eq!(
                (s, q["rows"][0]["opportunities"].clone()),
                (StatusCode::OK, json!(visible)),
                "{be} {caller} report {q}"
            );
            // A rep's funnel counts only the rep's opportunities.
            let (s, f) = with(
                &app,
                token,
                Method::POST,
                "/api/v1/apps/crm/reports/query",
                Some(json!({"metric": "stage_conversion"})),
            )
            .await;
            assert_eq!(
                (s, f["rows"][0]["entered"].clone()),
                (StatusCode::OK, json!(visible)),
                "{be} {caller} funnel {f}"
            );
            let (s, d) = with(
                &app,
                token,
                Method::POST,
                "/api/v1/apps/crm/reports/drill",
                Some(json!({"metric": "opportunities", "group_by": ["region"], "row": {"region": "east"}})),
            )
            .await;
            assert_eq!(
                (s, d["records"].as_array().map(Vec::len)),
                (StatusCode::OK, Some(visible)),
                "{be} {caller} drill {d}"
            );
            let (s, b) = with(
                &app,
                token,
                Method::POST,
                "/api/v1/apps/crm/records/opportunity",
                Some(json!({"name": format!("new deal of {caller}")})),
            )
            .await;
            let want = if can_create {
                StatusCode::CREATED
            } else {
                StatusCode::FORBIDDEN
            };
            assert_eq!(s, want, "{be} {caller} create {b}");
            if can_create {
                // New records of a scoped caller are their own.
                let owner = b["owner"].as_str().unwrap();
                let mine = w.ids.get(caller).map(String::as_str);
                if caller != "admin" && caller != "appadmin" {
                    assert_eq!(Some(owner), mine, "{be} {caller}");
                }
                let (s, _) = app
                    .call(
                        Method::DELETE,
                        &format!(
                            "/api/v1/apps/crm/records/opportunity/{}",
                            b["id"].as_str().unwrap()
                        ),
                        None,
                    )
                    .await;
                assert_eq!(s, StatusCode::NO_CONTENT);
            }
        }
        // Someone without a role sees no app at all.
        for path in [
            "/api/v1/apps/crm",
            "/api/v1/apps/crm/records/opportunity",
            "/api/v1/apps/crm/roles",
            "/api/v1/apps/crm/dashboards/sales",
        ] {
            let (s, _) = with(&app, &w.tokens["outsider"], Method::GET, path, None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{be} outsider {path}");
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn hidden_and_read_only_fields_and_mass_assignment() {
    for app in TestApp::each().await {
        let be = app.backend;
        let w = world(&app).await;
        let sdr_deal = opportunity(&app, &w, "sdr", "sourced by sdr").await;
        let r1_deal = opportunity(&app, &w, "r1", "deal of r1").await;
        let sdr = &w.tokens["sdr"];
        let r1 = &w.tokens["r1"];

        // The SDR role hides the deal's value: not in reads, lists, history or drill-downs.
        let (s, rec) = with(
            &app,
            sdr,
            Method::GET,
            &format!("/api/v1/apps/crm/records/opportunity/{sdr_deal}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}");
        assert_eq!(rec["name"], "sourced by sdr");
        for f in ["amount", "budget", "quoted_amount"] {
            assert!(rec.get(f).is_none(), "{be}: {f} shown: {rec}");
        }
        // Nor the columns that belong to them (`amount__currency`).
        let keys: Vec<&String> = rec.as_object().unwrap().keys().collect();
        assert!(
            !keys.iter().any(|k| k.starts_with("amount")
                || k.starts_with("budget")
                || k.starts_with("quoted_amount")),
            "{be}: {keys:?}"
        );
        let (_, page) = with(
            &app,
            sdr,
            Method::GET,
            "/api/v1/apps/crm/records/opportunity",
            None,
        )
        .await;
        assert!(page["records"][0].get("amount").is_none(), "{be}: {page}");
        assert_eq!(page["records"][0]["region"], "east");
        let (_, hist) = with(
            &app,
            sdr,
            Method::GET,
            &format!("/api/v1/apps/crm/records/opportunity/{sdr_deal}/history"),
            None,
        )
        .await;
        let fields: Vec<&str> = hist["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["field"].as_str().unwrap())
            .collect();
        assert!(
            fields.contains(&"name") && !fields.contains(&"amount") && !fields.contains(&"budget"),
            "{be}: {fields:?}"
        );
        // … nor usable to filter, sort, group or aggregate (which would reveal it).
        let (s, b) = with(&app, sdr, Method::GET, "/api/v1/apps/crm/records/opportunity?filter=%5B%7B%22field%22%3A%22amount%22%2C%22op%22%3A%22gt%22%2C%22value%22%3A500%7D%5D", None).await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::FORBIDDEN,
                vec![("/filters/0/field".to_owned(), "hidden_field".to_owned())]
            ),
            "{be}"
        );
        let (s, b) = with(
            &app,
            sdr,
            Method::GET,
            "/api/v1/apps/crm/records/opportunity?sort=-amount",
            None,
        )
        .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::FORBIDDEN,
                vec![("/sort".to_owned(), "hidden_field".to_owned())]
            ),
            "{be}"
        );
        let (s, b) = with(
            &app,
            sdr,
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(json!({"metric": "pipeline_value"})),
        )
        .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::FORBIDDEN,
                vec![(
                    "/metrics/pipeline_value".to_owned(),
                    "hidden_field".to_owned()
                )]
            ),
            "{be}: {b}"
        );
        let (s, b) = with(&app, sdr, Method::POST, "/api/v1/apps/crm/reports/query", Some(json!({"metric": "opportunities", "filters": [{"field": "budget", "op": "gt", "value": 100}]}))).await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::FORBIDDEN,
                vec![("/filters/0/field".to_owned(), "hidden_field".to_owned())]
            ),
            "{be}: {b}"
        );
        // The dashboard answers the panels the role may see and says why it leaves out the others.
        let (s, d) = with(
            &app,
            sdr,
            Method::GET,
            "/api/v1/apps/crm/dashboards/sales_overview",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}: {d}");
        let items = d["items"].as_array().unwrap();
        let refused: Vec<&str> = items
            .iter()
            .filter(|i| i["answer"]["error"]["status"] == 403)
            .map(|i| i["key"].as_str().unwrap())
            .collect();
        let funnel = items
            .iter()
            .find(|i| i["query"]["metric"] == "stage_conversion")
            .unwrap();
        assert_eq!(
            funnel["answer"]["rows"][0]["entered"],
            json!(1),
            "{be}: {funnel}"
        );
        assert!(
            !refused.is_empty() && refused.len() < items.len(),
            "{be}: {refused:?}"
        );
        for i in items.iter().filter(|i| i["answer"]["error"].is_object()) {
            assert_eq!(
                i["answer"]["error"]["errors"][0]["code"], "hidden_field",
                "{be}: {i}"
            );
        }
        // Counting deals reveals no value: allowed.
        let (s, b) = with(
            &app,
            sdr,
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(json!({"metric": "opportunities"})),
        )
        .await;
        assert_eq!(
            (s, b["rows"][0]["opportunities"].clone()),
            (StatusCode::OK, json!(1)),
            "{be}"
        );
        // A dry run would show the record and what the workflow computes from it.
        let (s, b) = with(
            &app,
            sdr,
            Method::POST,
            "/api/v1/apps/crm/workflows/quoted_approval/dry-run",
            Some(json!({"record_id": sdr_deal})),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{be}: {b}");
        // Starting a workflow by hand acts on the record: not for a role that cannot change it.
        let (s, b) = with(
            &app,
            sdr,
            Method::POST,
            "/api/v1/apps/crm/workflows/quoted_approval/run",
            Some(json!({"record_id": sdr_deal})),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{be}: {b}");
        // The form the SDR gets has no hidden fields, and marks nothing it cannot see.
        let (s, schema) = with(
            &app,
            sdr,
            Method::GET,
            "/api/v1/apps/crm/entities/opportunity/schema",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}");
        assert!(
            schema["properties"].get("amount").is_none()
                && schema["properties"].get("name").is_some(),
            "{be}: {schema}"
        );
        let (_, schema) = with(
            &app,
            r1,
            Method::GET,
            "/api/v1/apps/crm/entities/opportunity/schema",
            None,
        )
        .await;
        assert_eq!(
            schema["properties"]["quoted_amount"]["readOnly"],
            json!(true),
            "{be}"
        );
        // Reports of a scoped role cannot look into related records it may not open.
        let (s, b) = with(
            &app,
            r1,
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(json!({"metric": "opportunities", "group_by": ["account.industry"]})),
        )
        .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::FORBIDDEN,
                vec![("/group_by/0".to_owned(), "related_scope".to_owned())]
            ),
            "{be}: {b}"
        );
        let (s, _) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/reports/query",
                Some(json!({"metric": "opportunities", "group_by": ["account.industry"]})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}");
        let (s, b) = with(
            &app,
            r1,
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(json!({"metric": "opportunities", "group_by": ["owner"]})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}: {b}");
        // Runs show their course, not the record's data.
        let (s, runs) = with(
            &app,
            sdr,
            Method::GET,
            &format!("/api/v1/apps/crm/runs?entity=opportunity&record_id={sdr_deal}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}: {runs}");

        // Read-only: a rep cannot set the quoted amount (the approval workflow does), on create
        // or on update; the attempt names the field and changes nothing.
        let (_, before) = with(
            &app,
            r1,
            Method::GET,
            &format!("/api/v1/apps/crm/records/opportunity/{r1_deal}"),
            None,
        )
        .await;
        assert_eq!(before["quoted_amount"], Value::Null, "{be}: shown, as null");
        let (s, b) = with(
            &app,
            r1,
            Method::PATCH,
            &format!("/api/v1/apps/crm/records/opportunity/{r1_deal}"),
            Some(json!({"quoted_amount": "1.00", "name": "renamed"})),
        )
        .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::FORBIDDEN,
                vec![("/quoted_amount".to_owned(), "read_only_field".to_owned())]
            ),
            "{be}: {b}"
        );
        let (_, after) = with(
            &app,
            r1,
            Method::GET,
            &format!("/api/v1/apps/crm/records/opportunity/{r1_deal}"),
            None,
        )
        .await;
        assert_eq!(
            (after["name"].clone(), after["version"].clone()),
            (before["name"].clone(), before["version"].clone()),
            "{be}"
        );
        let (s, b) = with(
            &app,
            r1,
            Method::POST,
            "/api/v1/apps/crm/records/opportunity/batch",
            Some(json!({"records": [{"name": "ok"}, {"name": "sneaky", "quoted_amount": "5.00"}]})),
        )
        .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::FORBIDDEN,
                vec![(
                    "/records/1/quoted_amount".to_owned(),
                    "read_only_field".to_owned()
                )]
            ),
            "{be}: {b}"
        );
        // System columns and someone else as owner are refused too, naming the field.
        let (s, b) = with(
            &app,
            r1,
            Method::POST,
            "/api/v1/apps/crm/records/opportunity",
            Some(json!({"name": "x", "created_by": w.ids["boss"]})),
        )
        .await;
        assert_eq!(
            (s, problem_paths(&b)[0].0.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "/created_by"),
            "{be}: {b}"
        );
        let (s, b) = with(
            &app,
            r1,
            Method::PATCH,
            &format!("/api/v1/apps/crm/records/opportunity/{r1_deal}"),
            Some(json!({"owner": w.ids["r2"]})),
        )
        .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                vec![("/owner".to_owned(), "not_allowed".to_owned())]
            ),
            "{be}: {b}"
        );
        let (_, page) = app
            .call(
                Method::GET,
                "/api/v1/apps/crm/records/opportunity?count=true",
                None,
            )
            .await;
        assert_eq!(page["total"], json!(2), "{be}: nothing was created");
        // The SDR cannot write a hidden field either (nor update deals at all).
        let (s, b) = with(
            &app,
            sdr,
            Method::POST,
            "/api/v1/apps/crm/records/lead",
            Some(json!({"name": "inbound", "company": "ACME"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {b}");

        // Fields that feed access rules cannot be changed by the people they protect.
        let me = format!("/api/v1/users/{}", w.ids["r1"]);
        let (s, _) = with(
            &app,
            r1,
            Method::PATCH,
            &me,
            Some(json!({"manager_id": null})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{be}: manager");
        let (s, _) = with(
            &app,
            r1,
            Method::PATCH,
            &me,
            Some(json!({"is_admin": true})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{be}: admin flag");
        let (s, _) = with(
            &app,
            r1,
            Method::PUT,
            &format!("/api/v1/apps/crm/members/{}", w.ids["r1"]),
            Some(json!({"role": "admin"})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{be}: own role");
        let (s, _) = with(
            &app,
            r1,
            Method::POST,
            "/api/v1/teams",
            Some(json!({"key": "east_sales", "members": [w.ids["r1"]]})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{be}: team");
        let (s, _) = with(
            &app,
            &w.tokens["boss"],
            Method::PUT,
            &format!("/api/v1/apps/crm/members/{}", w.ids["r3"]),
            Some(json!({"role": "sales_rep"})),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::NOT_FOUND,
            "{be}: a manager does not manage members"
        );
        let (_, u) = app.call(Method::GET, &me, None).await;
        assert_eq!(
            (u["manager_id"].clone(), u["is_admin"].clone()),
            (json!(w.ids["boss"]), json!(false)),
            "{be}"
        );
        let (_, roles) = with(&app, r1, Method::GET, "/api/v1/apps/crm/roles", None).await;
        assert_eq!(roles["me"], "sales_rep", "{be}");
        let rep = roles["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == "sales_rep")
            .unwrap();
        assert_eq!(
            rep["entities"]["opportunity"],
            json!({"can": "cru", "fields": {"quoted_amount": "read_only"}}),
            "{be}"
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn admin_changes_are_in_the_audit_log() {
    for app in TestApp::each().await {
        let be = app.backend;
        let w = world(&app).await;
        // A token made and revoked, a role changed, a definition imported.
        let (s, t) = with(
            &app,
            &w.tokens["r1"],
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "laptop", "scope": "read"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        let tid = t["id"].as_str().unwrap().to_owned();
        let (s, _) = with(
            &app,
            &w.tokens["r1"],
            Method::DELETE,
            &format!("/api/v1/tokens/{tid}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, _) = with(
            &app,
            &w.tokens["appadmin"],
            Method::PUT,
            &format!("/api/v1/apps/crm/members/{}", w.ids["r3"]),
            Some(json!({"role": "viewer"})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}: an app admin manages members");
        let (s, b) = with(
            &app,
            &w.tokens["appadmin"],
            Method::PUT,
            &format!("/api/v1/apps/crm/members/{}", w.ids["r3"]),
            Some(json!({"role": "wizard"})),
        )
        .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                vec![("/role".to_owned(), "unknown_option".to_owned())]
            ),
            "{be}"
        );
        let mut def = app.call(Method::GET, "/api/v1/apps/crm", None).await.1["definition"].clone();
        def["roles"].as_array_mut().unwrap().push(json!({"key": "finance", "scope": "all", "entities": {"opportunity": "r", "account": "r"}}));
        def["roles"].as_array_mut().unwrap().push(
            json!({"key": "office_admin", "scope": "own", "admin": true, "entities": {"*": "r"}}),
        );
        let (s, b) = app.call(Method::PUT, "/api/v1/apps/crm", Some(def)).await;
        assert_eq!(s, StatusCode::OK, "{be}: {b}");

        let (s, log) = app.call(Method::GET, "/api/v1/audit?limit=500", None).await;
        assert_eq!(s, StatusCode::OK, "{be}: {log}");
        let entries = log["entries"].as_array().unwrap();
        let of = |action: &str| -> Vec<&Value> {
            entries.iter().filter(|e| e["action"] == action).collect()
        };
        assert_eq!(of("user.create").len(), PEOPLE.len(), "{be}");
        assert_eq!(of("member.set").len(), PEOPLE.len() - 1 + 1, "{be}");
        let role_change = of("member.set")[0];
        assert_eq!(
            (
                role_change["actor"].clone(),
                role_change["target"].clone(),
                role_change["detail"].clone()
            ),
            (
                json!(w.ids["appadmin"]),
                json!(w.ids["r3"]),
                json!({"role": "viewer", "previous_role": "sales_rep"})
            ),
            "{be}: newest first"
        );
        let created = of("token.create");
        assert_eq!(created[0]["detail"]["name"], "laptop");
        assert!(
            !log.to_string().contains(t["token"].as_str().unwrap()),
            "{be}: a token is never logged"
        );
        assert!(
            !log.to_string().contains(PASSWORD),
            "{be}: a password is never logged"
        );
        assert_eq!(of("token.revoke")[0]["target"], json!(tid));
        let import = of("app.import");
        assert_eq!(import[0]["app"], "crm");
        assert!(
            import[0]["detail"]["roles"]
                .as_array()
                .unwrap()
                .contains(&json!("finance")),
            "{be}: {}",
            import[0]
        );
        // The new role exists at once.
        let (s, _) = with(
            &app,
            &w.tokens["appadmin"],
            Method::PUT,
            &format!("/api/v1/apps/crm/members/{}", w.ids["viewer"]),
            Some(json!({"role": "finance"})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}");
        let (s, b) = with(
            &app,
            &w.tokens["viewer"],
            Method::GET,
            "/api/v1/apps/crm/records/lead",
            None,
        )
        .await;
        assert_eq!(
            s,
            StatusCode::FORBIDDEN,
            "{be}: finance reads no leads: {b}"
        );
        // An app administrator of a narrower role grants only roles within their own, and
        // cannot touch members whose role reaches further.
        let (s, _) = app
            .call(
                Method::PUT,
                &format!("/api/v1/apps/crm/members/{}", w.ids["r2"]),
                Some(json!({"role": "office_admin"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}");
        let office = &w.tokens["r2"];
        for role in ["admin", "finance", "viewer", "sdr"] {
            let (s, b) = with(
                &app,
                office,
                Method::PUT,
                &format!("/api/v1/apps/crm/members/{}", w.ids["r2"]),
                Some(json!({"role": role})),
            )
            .await;
            assert_eq!(
                s,
                StatusCode::FORBIDDEN,
                "{be}: office_admin grants {role}: {b}"
            );
        }
        let (s, _) = with(
            &app,
            office,
            Method::DELETE,
            &format!("/api/v1/apps/crm/members/{}", w.ids["appadmin"]),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{be}");
        let (_, roles) = with(&app, office, Method::GET, "/api/v1/apps/crm/roles", None).await;
        assert_eq!(roles["me"], "office_admin", "{be}");
        let (s, b) = with(
            &app,
            &w.tokens["appadmin"],
            Method::PUT,
            &format!("/api/v1/apps/crm/members/{}", w.ids["r2"]),
            Some(json!({"role": "sales_rep"})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}: the full admin role may: {b}");
        // A role members hold cannot be removed from the definition.
        let mut without =
            app.call(Method::GET, "/api/v1/apps/crm", None).await.1["definition"].clone();
        without["roles"]
            .as_array_mut()
            .unwrap()
            .retain(|r| r["key"] != "finance");
        let (s, b) = app
            .call(Method::PUT, "/api/v1/apps/crm", Some(without))
            .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::CONFLICT,
                vec![("/roles".to_owned(), "role_in_use".to_owned())]
            ),
            "{be}: {b}"
        );
        let (_, roles) = with(
            &app,
            &w.tokens["viewer"],
            Method::GET,
            "/api/v1/apps/crm/roles",
            None,
        )
        .await;
        assert_eq!(roles["me"], "finance", "{be}");
        // Scope `all` is not enough for app-wide views of runs: they touch every entity.
        let (s, b) = with(
            &app,
            &w.tokens["viewer"],
            Method::GET,
            "/api/v1/apps/crm/runs",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{be}: {b}");
        let (s, b) = with(
            &app,
            &w.tokens["viewer"],
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(json!({"metric": "leads"})),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{be}: {b}");
        let (s, b) = with(
            &app,
            &w.tokens["viewer"],
            Method::POST,
            "/api/v1/apps/crm/reports/query",
            Some(json!({"metric": "opportunities"})),
        )
        .await;
        assert_eq!(
            (s, b["rows"][0]["opportunities"].clone()),
            (StatusCode::OK, json!(0)),
            "{be}: {b}"
        );
        // Paging.
        let (_, p1) = app.call(Method::GET, "/api/v1/audit?limit=2", None).await;
        let (_, p2) = app
            .call(
                Method::GET,
                &format!(
                    "/api/v1/audit?limit=2&cursor={}",
                    p1["next_cursor"].as_str().unwrap()
                ),
                None,
            )
            .await;
        let (_, all) = app.call(Method::GET, "/api/v1/audit?limit=3", None).await;
        assert_eq!(
            (
                p1["entries"][1]["id"].clone(),
                p2["entries"][0]["id"].clone()
            ),
            (
                all["entries"][1]["id"].clone(),
                all["entries"][2]["id"].clone()
            ),
            "{be}"
        );
        // Who may read it: administrators; an app's admins its own entries; nobody else.
        let (s, _) = with(&app, &w.tokens["r1"], Method::GET, "/api/v1/audit", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{be}");
        let (s, _) = with(
            &app,
            &w.tokens["boss"],
            Method::GET,
            "/api/v1/apps/crm/audit",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{be}");
        let (s, mine) = with(
            &app,
            &w.tokens["appadmin"],
            Method::GET,
            "/api/v1/apps/crm/audit?limit=1000",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{be}");
        assert!(
            mine["entries"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["app"] == "crm"),
            "{be}"
        );
        assert!(
            mine["entries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == "app.import"),
            "{be}"
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn apps_are_isolated_from_each_other() {
    for app in TestApp::each().await {
        let be = app.backend;
        let w = world(&app).await;
        // A second app, whose own roles do not exist in the CRM.
        let hr = json!({"key": "hr", "entities": [{"key": "employee", "fields": [
            {"key": "name", "type": "text", "required": true},
            {"key": "salary", "type": "money"}]}],
            "roles": [{"key": "recruiter", "scope": "all", "entities": {"employee": {"can": "cru", "fields": {"salary": "hidden"}}}}]});
        let (s, b) = app.call(Method::POST, "/api/v1/apps", Some(hr)).await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {b}");
        let (s, b) = app
            .call(
                Method::POST,
                "/api/v1/apps/hr/records/employee",
                Some(json!({"name": "Wu Fei", "salary": "30000.00"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {b}");
        let emp = b["id"].as_str().unwrap().to_owned();
        // The CRM's app admin is nobody in HR: no app, no records, no members, no audit.
        let crm_admin = &w.tokens["appadmin"];
        let (_, apps) = with(&app, crm_admin, Method::GET, "/api/v1/apps", None).await;
        let keys: Vec<&str> = apps["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["crm"], "{be}");
        for path in [
            "/api/v1/apps/hr".to_owned(),
            "/api/v1/apps/hr/records/employee".to_owned(),
            format!("/api/v1/apps/hr/records/employee/{emp}"),
            "/api/v1/apps/hr/members".to_owned(),
            "/api/v1/apps/hr/audit".to_owned(),
            "/api/v1/apps/hr/roles".to_owned(),
        ] {
            let (s, _) = with(&app, crm_admin, Method::GET, &path, None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{be}: {path}");
        }
        let (s, _) = with(
            &app,
            crm_admin,
            Method::PUT,
            &format!("/api/v1/apps/hr/members/{}", w.ids["appadmin"]),
            Some(json!({"role": "recruiter"})),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::NOT_FOUND,
            "{be}: cannot give themselves a role elsewhere"
        );
        // A CRM role is not an HR role, and an HR role is not a CRM role.
        let (s, b) = app
            .call(
                Method::PUT,
                &format!("/api/v1/apps/hr/members/{}", w.ids["r1"]),
                Some(json!({"role": "sdr"})),
            )
            .await;
        assert_eq!(
            (s, problem_paths(&b)),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                vec![("/role".to_owned(), "unknown_option".to_owned())]
            ),
            "{be}"
        );
        let (s, _) = app
            .call(
                Method::PUT,
                &format!("/api/v1/apps/hr/members/{}", w.ids["r1"]),
                Some(json!({"role": "recruiter"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}");
        let (_, rec) = with(
            &app,
            &w.tokens["r1"],
            Method::GET,
            &format!("/api/v1/apps/hr/records/employee/{emp}"),
            None,
        )
        .await;
        assert_eq!(
            (rec["name"].clone(), rec.get("salary")),
            (json!("Wu Fei"), None),
            "{be}: {rec}"
        );
        // r1 is still only a rep in the CRM.
        let (_, roles) = with(
            &app,
            &w.tokens["r1"],
            Method::GET,
            "/api/v1/apps/crm/roles",
            None,
        )
        .await;
        assert_eq!(roles["me"], "sales_rep", "{be}");
        // The same id under another app's path is no record of that app.
        let (s, _) = with(
            &app,
            crm_admin,
            Method::GET,
            &format!("/api/v1/apps/crm/records/opportunity/{emp}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{be}");
        app.stop().await;
    }
}
