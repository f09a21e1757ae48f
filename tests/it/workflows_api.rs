//! The CRM automations end to end: a real server on 127.0.0.1 with the sample organisation, a real
//! SMTP sink and a real HTTP receiver on loopback, on SQLite and PostgreSQL.

use crate::helpers::{json, TestApp};
use crate::sinks::{HttpSink, SmtpSink};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use trellis_form::testing;

const SECRET: &str = "test-erp-secret-key";

fn settings(smtp: Option<&SmtpSink>, http: Option<&HttpSink>) -> trellis_flow::Settings {
    use base64::Engine as _;
    let mut s = trellis_flow::Settings::default();
    if let Some(m) = smtp {
        s.smtp = Some(trellis_flow::Smtp {
            host: "127.0.0.1".into(),
            port: m.port,
            from: "crm@test.example".into(),
            tls: trellis_flow::SmtpTls::None,
            credentials: None,
        });
    }
    s.allow = trellis_flow::netguard::AllowList::parse("127.0.0.1").unwrap();
    if let Some(h) = http {
        s.vars.insert(
            "ERP_WEBHOOK_URL".into(),
            format!("http://127.0.0.1:{}/erp", h.port),
        );
        s.vars.insert(
            "ERP_WEBHOOK_SECRET".into(),
            format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(SECRET)
            ),
        );
    }
    s.scan_every = Duration::from_millis(100);
    s
}

/// Install the sample organisation; returns user ids by the local part of their email.
async fn demo(app: &TestApp) -> HashMap<String, String> {
    use trellis_form::Clock;
    demo_at(app, trellis_form::SystemClock.now()).await
}

async fn demo_at(app: &TestApp, now: chrono::DateTime<chrono::Utc>) -> HashMap<String, String> {
    let db = &app.db.db;
    let crm = trellis_form::apps::load(db, "crm").await.unwrap().unwrap();
    // Written outside the server: the rollups' statements go with the app.
    trellis_report::rollup::prepare(&crm, db.backend()).unwrap();
    let admin = trellis_form::users::list(db)
        .await
        .unwrap()
        .into_iter()
        .find(|u| u.is_admin)
        .unwrap()
        .id;
    trellis_server::demo::install(db, &crm, admin, now)
        .await
        .unwrap();
    let (_, users) = app.call(Method::GET, "/api/v1/users", None).await;
    users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let email = u["email"].as_str().unwrap();
            (
                email.split('@').next().unwrap().to_owned(),
                u["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Poll `f` until it gives a value (at most 20 s).
async fn wait_for<F, Fut>(what: &str, f: F) -> Value
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<Value>>,
{
    for _ in 0..400 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn query(app: &TestApp, entity: &str, field: &str, value: &str) -> Vec<Value> {
    let (s, body) = app
        .call(
            Method::POST,
            &format!("/api/v1/apps/crm/records/{entity}/query"),
            Some(json!({"filters": [{"field": field, "op": "eq", "value": value}], "limit": 1000})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["records"].as_array().unwrap().clone()
}

async fn count(app: &TestApp, sql: &str, binds: &[&str]) -> i64 {
    use trellis_form::db::{Sql, Value as V};
    let mut q = Sql::new("");
    let parts: Vec<&str> = sql.split('?').collect();
    for (i, p) in parts.iter().enumerate() {
        q.push(p);
        if i + 1 < parts.len() {
            let b = binds[i];
            match uuid::Uuid::parse_str(b) {
                Ok(u) => q.bind(V::Uuid(u)),
                Err(_) => q.bind(V::Text(b.to_owned())),
            };
        }
    }
    match app
        .db
        .db
        .fetch_optional(&q, &[trellis_form::model::ColKind::Int])
        .await
        .unwrap()
        .unwrap()[0]
    {
        V::Int(n) => n,
        _ => 0,
    }
}

async fn runs_of(app: &TestApp, entity: &str, id: &str) -> Vec<Value> {
    let (s, body) = app
        .call(
            Method::GET,
            &format!("/api/v1/apps/crm/runs?entity={entity}&record_id={id}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["runs"].as_array().unwrap().clone()
}

#[tokio::test]
async fn new_leads_are_tagged_assigned_by_region_notified_and_tasked_in_the_create() {
    for db in testing::each().await {
        let app = TestApp::start_full(
            db,
            Default::default(),
            settings(None, None),
            Arc::new(trellis_form::SystemClock),
        )
        .await;
        let be = app.backend;
        let users = demo(&app).await;
        let east = [users["lin.tao"].clone(), users["xu.ying"].clone()];
        let mut owners: HashMap<String, usize> = HashMap::new();
        for i in 0..4 {
            let (s, lead) = app
                .call(
                    Method::POST,
                    "/api/v1/apps/crm/records/lead",
                    Some(json!({"name": format!("East lead {i}"), "company": "Acme", "region": "east"})),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED, "{be}: {lead}");
            // Already assigned and tagged in the create's own response.
            let owner = lead["owner"].as_str().unwrap().to_owned();
            assert!(east.contains(&owner), "{be}: {owner} is not an east rep");
            assert_eq!(lead["source"], "website", "{be}");
            *owners.entry(owner.clone()).or_default() += 1;
            let id = lead["id"].as_str().unwrap();
            let tasks = query(&app, "task", "lead", id).await;
            assert_eq!(tasks.len(), 1, "{be}: one first-call task");
            assert_eq!(tasks[0]["kind"], "first_call");
            assert_eq!(tasks[0]["assignee"], json!(owner));
            assert_eq!(tasks[0]["owner"], json!(owner));
            assert_eq!(
                tasks[0]["title"],
                json!(format!("First call: East lead {i} (Acme)"))
            );
            let created =
                chrono::DateTime::parse_from_rfc3339(lead["created_at"].as_str().unwrap()).unwrap();
            let due =
                chrono::DateTime::parse_from_rfc3339(tasks[0]["due_at"].as_str().unwrap()).unwrap();
            let hours = (due - created).num_seconds();
            assert!(
                (24 * 3600 - 1..=24 * 3600 + 1).contains(&hours),
                "{be}: due {hours}s later"
            );
            assert_eq!(
                count(&app, "SELECT COUNT(*) FROM \"notifications\" WHERE \"user_id\" = ? AND \"record_id\" = ?", &[&owner, id]).await,
                1,
                "{be}: the owner is notified once"
            );
            let runs = runs_of(&app, "lead", id).await;
            assert_eq!(runs.len(), 1, "{be}");
            assert_eq!(runs[0]["status"], "succeeded");
            assert_eq!(runs[0]["mode"], "inline");
            let (_, run) = app
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/crm/runs/{}", runs[0]["id"].as_str().unwrap()),
                    None,
                )
                .await;
            let steps = run["steps"].as_array().unwrap();
            let nodes: Vec<&str> = steps.iter().map(|s| s["node"].as_str().unwrap()).collect();
            assert_eq!(nodes, ["tag_source", "assign", "first_call"], "{be}");
            // Each step logs its input: the node as defined and the record it saw.
            assert_eq!(
                steps[1]["input"]["node"]["type"], "assign_owner",
                "{be}: {run}"
            );
            assert_eq!(steps[1]["input"]["record"]["id"], json!(id));
            let reason = steps[1]["output"]["reason"].as_str().unwrap();
            assert!(
                reason.starts_with("east region matched; team `east_sales` round-robin turn"),
                "{be}: {reason}"
            );
        }
        // An update that changes nothing (or changes a field) runs no create workflow again.
        let (_, some) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/lead/query",
                Some(json!({"filters": [{"field": "name", "op": "eq", "value": "East lead 0"}]})),
            )
            .await;
        let first = some["records"][0]["id"].as_str().unwrap().to_owned();
        for patch in [json!({"company": "Acme"}), json!({"company": "Acme Group"})] {
            let (s, _) = app
                .call(
                    Method::PATCH,
                    &format!("/api/v1/apps/crm/records/lead/{first}"),
                    Some(patch),
                )
                .await;
            assert_eq!(s, StatusCode::OK);
        }
        assert_eq!(query(&app, "task", "lead", &first).await.len(), 1, "{be}");
        assert_eq!(runs_of(&app, "lead", &first).await.len(), 1, "{be}");
        // Round-robin is fair: two each.
        assert_eq!(
            owners.values().copied().collect::<Vec<_>>(),
            [2, 2],
            "{be}: {owners:?}"
        );

        // A source given is kept; a region no rule covers goes to the inside-sales fallback.
        let (_, lead) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/lead",
                Some(json!({"name": "Overseas", "region": "overseas", "source": "partner"})),
            )
            .await;
        assert_eq!(lead["source"], "partner");
        let reps: Vec<&String> = [
            "ma.jun", "he.yan", "lin.tao", "xu.ying", "guo.fei", "luo.na",
        ]
        .iter()
        .map(|r| &users[*r])
        .collect();
        assert!(
            reps.contains(&&lead["owner"].as_str().unwrap().to_owned()),
            "{be}: {lead}"
        );
        let runs = runs_of(&app, "lead", lead["id"].as_str().unwrap()).await;
        let (_, run) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/crm/runs/{}", runs[0]["id"].as_str().unwrap()),
                None,
            )
            .await;
        let reason = run["steps"][1]["output"]["reason"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            reason.starts_with("no rule matched; fallback: team `inside_sales` round-robin"),
            "{be}: {reason}"
        );

        // Out of office: Lin Tao is skipped, Xu Ying gets every east lead.
        let (s, _) = app
            .call(
                Method::PATCH,
                &format!("/api/v1/users/{}", users["lin.tao"]),
                Some(json!({"out_of_office": true})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        for i in 0..3 {
            let (_, lead) = app
                .call(
                    Method::POST,
                    "/api/v1/apps/crm/records/lead",
                    Some(json!({"name": format!("OOO {i}"), "region": "east"})),
                )
                .await;
            assert_eq!(lead["owner"], json!(users["xu.ying"]), "{be}: {lead}");
        }

        // A lead created with an explicit owner keeps it: the workflow's condition is false.
        let (_, lead) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/lead",
                Some(json!({"name": "Mine", "region": "east", "owner": users["he.yan"]})),
            )
            .await;
        assert_eq!(lead["owner"], json!(users["he.yan"]), "{be}");
        assert_eq!(lead["source"], Value::Null);
        assert!(runs_of(&app, "lead", lead["id"].as_str().unwrap())
            .await
            .is_empty());
        assert!(query(&app, "task", "lead", lead["id"].as_str().unwrap())
            .await
            .is_empty());
        app.stop().await;
    }
}

/// Create an account, a contact and an opportunity owned by `owner` in stage `sql`.
async fn opportunity(app: &TestApp, owner: &str, name: &str, amount: &str) -> String {
    let (s, acc) = app
        .call(
            Method::POST,
            "/api/v1/apps/crm/records/account",
            Some(json!({"name": format!("{name} Ltd")})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{acc}");
    let (s, contact) = app
        .call(
            Method::POST,
            "/api/v1/apps/crm/records/contact",
            Some(json!({"name": "Wang Fang", "email": "buyer@customer.example", "account": acc["id"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{contact}");
    let (s, opp) = app
        .call(
            Method::POST,
            "/api/v1/apps/crm/records/opportunity",
            Some(json!({
                "name": name, "account": acc["id"], "contact": contact["id"], "owner": owner,
                "stage": "sql", "amount": amount, "expected_close_date": "2027-03-31",
                "needs_summary": "Needs a field-service module for 40 engineers."
            })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{opp}");
    opp["id"].as_str().unwrap().to_owned()
}

async fn set_stage(app: &TestApp, id: &str, patch: Value) -> Value {
    let (s, r) = app
        .call(
            Method::PATCH,
            &format!("/api/v1/apps/crm/records/opportunity/{id}"),
            Some(patch),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    r
}

async fn run_status(app: &TestApp, id: &str, workflow: &str) -> Option<Value> {
    runs_of(app, "opportunity", id)
        .await
        .into_iter()
        .find(|r| r["workflow"] == workflow)
}

#[tokio::test]
async fn stage_changes_send_the_email_render_the_document_run_the_approval_and_post_to_the_erp() {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    for db in testing::each().await {
        let smtp = SmtpSink::start().await;
        let erp = HttpSink::start().await;
        let app = TestApp::start_full(
            db,
            Default::default(),
            settings(Some(&smtp), Some(&erp)),
            Arc::new(trellis_form::SystemClock),
        )
        .await;
        let be = app.backend;
        let users = demo(&app).await;
        let owner = users["lin.tao"].clone();
        let big = opportunity(&app, &owner, "Hangzhou Robotics", "800000").await;

        // 3. Stage → proposal: email to the contact, proposal document, technical review task.
        set_stage(&app, &big, json!({"stage": "proposal"})).await;
        let mail = wait_for("the proposal email", || async {
            smtp.mails().into_iter().next().map(|m| json!({"to": m.to, "subject": m.header("subject"), "id": m.header("message-id"), "data": m.data}))
        })
        .await;
        assert_eq!(mail["to"], json!(["buyer@customer.example"]), "{be}");
        assert_eq!(
            mail["subject"], "Our proposal for Hangzhou Robotics Ltd",
            "{be}"
        );
        assert!(
            mail["data"].as_str().unwrap().contains("Dear Wang Fang"),
            "{be}"
        );
        let run = wait_for("the proposal run", || async {
            run_status(&app, &big, "proposal_stage")
                .await
                .filter(|r| r["status"] == "succeeded")
        })
        .await;
        let message_id = mail["id"].as_str().unwrap();
        assert_eq!(
            message_id,
            format!("<{}.email_contact@trellis>", run["id"].as_str().unwrap()),
            "{be}"
        );
        let (_, outbox) = app.call(Method::GET, "/api/v1/apps/crm/outbox", None).await;
        assert_eq!(outbox["emails"].as_array().unwrap().len(), 1, "{be}");
        assert_eq!(outbox["emails"][0]["status"], "sent");
        assert_eq!(outbox["emails"][0]["message_id"], json!(message_id));
        let (_, docs) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/crm/records/opportunity/{big}/documents"),
                None,
            )
            .await;
        let docs = docs["documents"].as_array().unwrap().clone();
        assert_eq!(docs.len(), 1, "{be}");
        assert_eq!(docs[0]["name"], "proposal-Hangzhou Robotics.md");
        let body = app
            .req(Method::GET, docs[0]["url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(
            body.headers()["content-type"],
            "text/markdown; charset=utf-8"
        );
        let text = body.text().await.unwrap();
        assert!(text.starts_with("# Proposal: Hangzhou Robotics\n\nCustomer: Hangzhou Robotics Ltd\nContact: Wang Fang"), "{be}: {text}");
        assert!(text.contains("Needs a field-service module for 40 engineers."));
        let tasks = query(&app, "task", "opportunity", &big).await;
        assert_eq!(tasks.len(), 1, "{be}");
        assert_eq!(tasks[0]["kind"], "technical_review");
        assert_eq!(
            count(&app, "SELECT COUNT(*) FROM \"notifications\" n JOIN \"team_members\" m ON m.\"user_id\" = n.\"user_id\" JOIN \"teams\" t ON t.\"id\" = m.\"team_id\" WHERE t.\"key\" = 'solutions' AND n.\"record_id\" = ?", &[&big]).await,
            2,
            "{be}: both solutions members are told"
        );

        // 4. Stage → quoted: amount copied, legal approves, management (over 500,000) rejects.
        set_stage(&app, &big, json!({"stage": "quoted"})).await;
        let legal = wait_for("the legal approval", || async {
            let (_, a) = app
                .call(Method::GET, "/api/v1/apps/crm/approvals", None)
                .await;
            a["approvals"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["record_id"] == json!(big))
                .cloned()
        })
        .await;
        assert_eq!(legal["name"], "legal", "{be}");
        assert_eq!(
            legal["approvers"].as_array().unwrap().len(),
            2,
            "{be}: both legal members"
        );
        let (_, opp) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/crm/records/opportunity/{big}"),
                None,
            )
            .await;
        assert_eq!(opp["quoted_amount"], opp["amount"], "{be}");
        let (s, bad) = app
            .call(
                Method::POST,
                &format!(
                    "/api/v1/apps/crm/approvals/{}/decision",
                    legal["id"].as_str().unwrap()
                ),
                Some(json!({"decision": "maybe"})),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let (s, d) = app
            .call(
                Method::POST,
                &format!(
                    "/api/v1/apps/crm/approvals/{}/decision",
                    legal["id"].as_str().unwrap()
                ),
                Some(json!({"decision": "approve", "comment": "ok"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{d}");
        assert_eq!(d["status"], "approved");
        let (s, _) = app
            .call(
                Method::POST,
                &format!(
                    "/api/v1/apps/crm/approvals/{}/decision",
                    legal["id"].as_str().unwrap()
                ),
                Some(json!({"decision": "reject"})),
            )
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{be}: decided once");
        let mgmt = wait_for("the management approval", || async {
            let (_, a) = app
                .call(Method::GET, "/api/v1/apps/crm/approvals", None)
                .await;
            a["approvals"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["record_id"] == json!(big) && x["name"] == "management")
                .cloned()
        })
        .await;
        assert_eq!(
            mgmt["approvers"],
            json!([users["wu.hua"]]),
            "{be}: the owner's manager"
        );
        app.call(
            Method::POST,
            &format!(
                "/api/v1/apps/crm/approvals/{}/decision",
                mgmt["id"].as_str().unwrap()
            ),
            Some(json!({"decision": "reject", "comment": "discount too deep"})),
        )
        .await;
        wait_for("the approval run to finish", || async {
            run_status(&app, &big, "quoted_approval")
                .await
                .filter(|r| r["status"] == "succeeded")
        })
        .await;
        let (_, opp) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/crm/records/opportunity/{big}"),
                None,
            )
            .await;
        assert_eq!(opp["stage"], "proposal", "{be}: back to proposal");
        assert_eq!(
            count(&app, "SELECT COUNT(*) FROM \"notifications\" WHERE \"user_id\" = ? AND \"record_id\" = ? AND \"body\" LIKE '%discount too deep%'", &[&owner, &big]).await,
            1,
            "{be}: the owner learns why"
        );
        // Moving back from quoted does not send the proposal email again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(smtp.mails().len(), 1, "{be}");

        // A small deal needs legal only.
        let small = opportunity(&app, &owner, "Suzhou Foods", "100000").await;
        set_stage(&app, &small, json!({"stage": "proposal"})).await;
        set_stage(&app, &small, json!({"stage": "quoted"})).await;
        let legal = wait_for("the small deal's approval", || async {
            let (_, a) = app
                .call(Method::GET, "/api/v1/apps/crm/approvals", None)
                .await;
            a["approvals"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["record_id"] == json!(small))
                .cloned()
        })
        .await;
        app.call(
            Method::POST,
            &format!(
                "/api/v1/apps/crm/approvals/{}/decision",
                legal["id"].as_str().unwrap()
            ),
            Some(json!({"decision": "approve"})),
        )
        .await;
        wait_for("the small deal's approval run", || async {
            run_status(&app, &small, "quoted_approval")
                .await
                .filter(|r| r["status"] == "succeeded")
        })
        .await;
        assert_eq!(
            count(&app, "SELECT COUNT(*) FROM \"notifications\" WHERE \"user_id\" = ? AND \"record_id\" = ? AND \"title\" LIKE 'Contract approved%'", &[&owner, &small]).await,
            1,
            "{be}"
        );
        assert_eq!(
            count(
                &app,
                "SELECT COUNT(*) FROM \"approvals\" WHERE \"record_id\" = ?",
                &[&small]
            )
            .await,
            1,
            "{be}: no management step under the threshold"
        );

        // 5. Won: the review and its task exist in the PATCH's own transaction.
        set_stage(&app, &small, json!({"stage": "won"})).await;
        let reviews = query(&app, "review", "opportunity", &small).await;
        assert_eq!(reviews.len(), 1, "{be}");
        assert_eq!(reviews[0]["outcome"], "won");
        assert_eq!(reviews[0]["reviewer"], json!(owner));
        let tasks = query(&app, "task", "opportunity", &small).await;
        let review_task = tasks
            .iter()
            .find(|t| t["kind"] == "win_loss_review")
            .unwrap();
        assert_eq!(review_task["assignee"], json!(owner));
        assert_eq!(
            review_task["title"],
            "Why did we win Suzhou Foods? Fill in the review."
        );

        // 6. Won: the deal goes to the ERP, signed per Standard Webhooks.
        let hit = wait_for("the ERP webhook", || async {
            erp.hits().into_iter().next().map(|h| json!({"id": h.header("webhook-id"), "ts": h.header("webhook-timestamp"), "sig": h.header("webhook-signature"), "body": h.body, "path": h.path}))
        })
        .await;
        assert_eq!(hit["path"], "/erp");
        let (id, ts, body) = (
            hit["id"].as_str().unwrap(),
            hit["ts"].as_str().unwrap(),
            hit["body"].as_str().unwrap(),
        );
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{id}.{ts}.{body}").as_bytes());
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(
            hit["sig"].as_str().unwrap(),
            expected,
            "{be}: signature verifies"
        );
        let deal: Value = serde_json::from_str(body).unwrap();
        assert_eq!(deal["type"], "deal.won");
        assert_eq!(deal["opportunity_id"], json!(small));
        assert_eq!(deal["account"], "Suzhou Foods Ltd");
        assert!(
            deal["amount"].as_str().unwrap().starts_with("100000"),
            "{deal}"
        );

        // Lost: a review with outcome lost.
        set_stage(&app, &big, json!({"stage": "lost", "loss_reason": "price"})).await;
        let reviews = query(&app, "review", "opportunity", &big).await;
        assert_eq!(reviews.len(), 1, "{be}");
        assert_eq!(reviews[0]["outcome"], "lost");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(erp.hits().len(), 1, "{be}: a lost deal is not posted");
        app.stop().await;
    }
}

#[tokio::test]
async fn idle_opportunities_escalate_to_the_managers_once_per_idle_period() {
    for db in testing::each().await {
        // Friday 2026-11-27 17:00 in Shanghai (the CRM's time zone).
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-27T09:00:00Z")
            .unwrap()
            .to_utc();
        let clock = Arc::new(trellis_form::ManualClock::new(t0));
        let app =
            TestApp::start_full(db, Default::default(), settings(None, None), clock.clone()).await;
        let be = app.backend;
        let users = demo(&app).await;
        let owner = users["lin.tao"].clone();
        let manager = users["wu.hua"].clone();
        let opp = opportunity(&app, &owner, "Idle deal", "50000").await;
        let escalations = || async {
            count(&app, "SELECT COUNT(*) FROM \"notifications\" WHERE \"user_id\" = ? AND \"record_id\" = ? AND \"title\" LIKE 'Idle opportunity%'", &[&manager, &opp]).await
        };
        // Wednesday 16:59: only 2 working days and 23:59 have passed.
        clock.advance(chrono::Duration::days(5) - chrono::Duration::minutes(1));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(escalations().await, 0, "{be}: not before 3 working days");
        // A note is not a follow-up with the customer (activity_kinds): it does not reset the period.
        let (s, a) = app
            .call(Method::POST, "/api/v1/apps/crm/records/activity", Some(json!({"kind": "note", "opportunity": opp, "notes": "internal", "at": clock_now(&clock)})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{a}");
        // Wednesday 17:01.
        clock.advance(chrono::Duration::minutes(2));
        wait_for("the escalation", || async {
            (escalations().await == 1).then_some(Value::Null)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(escalations().await, 1, "{be}: once per idle period");
        // A new activity starts a new period: 3 working days later, a second escalation.
        clock.advance(chrono::Duration::minutes(1));
        let (s, a) = app
            .call(Method::POST, "/api/v1/apps/crm/records/activity", Some(json!({"kind": "call", "opportunity": opp, "notes": "called", "at": clock_now(&clock)})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{a}");
        clock.advance(chrono::Duration::days(2));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(escalations().await, 1, "{be}: the activity reset the clock");
        clock.advance(chrono::Duration::days(4));
        wait_for("the second escalation", || async {
            (escalations().await == 2).then_some(Value::Null)
        })
        .await;
        app.stop().await;
    }
}

#[tokio::test]
async fn broken_workflows_are_refused_and_runaway_scripts_and_internal_urls_fail_their_run_only() {
    for db in testing::each().await {
        let app = TestApp::start_full(
            db,
            Default::default(),
            trellis_flow::Settings {
                scan_every: Duration::from_millis(100),
                ..Default::default()
            },
            Arc::new(trellis_form::SystemClock),
        )
        .await;
        let be = app.backend;
        let entity = json!({"key": "ticket", "fields": [{"key": "title", "type": "text", "required": true}]});
        let broken = json!({"key": "loopy", "entities": [entity], "workflows": [
            {"key": "bad", "trigger": {"type": "record_created", "entity": "tickets"}, "nodes": [
                {"id": "a", "type": "update_record", "values": {"titel": "x"}},
                {"id": "b", "type": "condition", "condition": "record.title ==="},
                {"id": "c", "type": "send_email", "to": "{{ x", "subject": "s", "body": "b"}
            ], "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a", "output": "true"}, {"from": "b", "to": "zz", "output": "maybe"}]},
            {"key": "inline_mail", "mode": "inline", "trigger": {"type": "record_created", "entity": "ticket"}, "nodes": [
                {"id": "m", "type": "send_email", "to": "a@b.example", "subject": "s", "body": "b"}
            ]}
        ]});
        let (s, body) = app.call(Method::POST, "/api/v1/apps", Some(broken)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{be}: {body}");
        let mut paths: Vec<(String, String)> = crate::helpers::problem_paths(&body);
        paths.sort();
        assert_eq!(
            paths,
            [
                ("/workflows/0/edges".into(), "cycle".into()),
                (
                    "/workflows/0/edges/2/output".into(),
                    "unknown_output".into()
                ),
                ("/workflows/0/edges/2/to".into(), "unknown_node".into()),
                ("/workflows/0/nodes/1/condition".into(), "script".into()),
                ("/workflows/0/nodes/2/to".into(), "template".into()),
                (
                    "/workflows/0/trigger/entity".into(),
                    "unknown_entity".into()
                ),
                (
                    "/workflows/1/nodes/0/type".into(),
                    "inline_side_effect".into()
                ),
            ],
            "{be}: {body}"
        );
        let (s, _) = app.call(Method::GET, "/api/v1/apps/loopy", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{be}: nothing was installed");

        // A condition that loops forever and a webhook aimed at an internal address fail their
        // own runs with a clear error; the record is written and the rest of the app works.
        let ok = json!({"key": "loopy", "entities": [entity], "workflows": [
            {"key": "spin", "trigger": {"type": "record_created", "entity": "ticket", "condition": "let n = 0; loop { n += 1; } n > 0"},
             "nodes": [{"id": "x", "type": "update_record", "values": {"title": "never"}}]},
            {"key": "metadata", "trigger": {"type": "record_created", "entity": "ticket"},
             "nodes": [{"id": "post", "type": "http_request", "url": "http://169.254.169.254/latest/meta-data/", "body": {"t": "{{ record.title }}"}, "retry": {"max_attempts": 1}}]}
        ]});
        let (s, body) = app.call(Method::POST, "/api/v1/apps", Some(ok)).await;
        assert!(s.is_success(), "{be}: {body}");
        let started = std::time::Instant::now();
        let (s, t) = app
            .call(
                Method::POST,
                "/api/v1/apps/loopy/records/ticket",
                Some(json!({"title": "hello"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {t}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let id = t["id"].as_str().unwrap().to_owned();
        let runs = wait_for("both runs to fail", || async {
            let (_, r) = app
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/loopy/runs?entity=ticket&record_id={id}"),
                    None,
                )
                .await;
            let runs = r["runs"].as_array().unwrap().clone();
            (runs.len() == 2 && runs.iter().all(|r| r["status"] == "failed")).then_some(json!(runs))
        })
        .await;
        let by = |k: &str| {
            runs.as_array()
                .unwrap()
                .iter()
                .find(|r| r["workflow"] == k)
                .unwrap()["error"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(
            by("spin").contains("operations and was stopped"),
            "{be}: {}",
            by("spin")
        );
        assert!(
            by("metadata").contains("169.254.169.254") && by("metadata").contains("refused"),
            "{be}: {}",
            by("metadata")
        );
        let (s, t) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/loopy/records/ticket/{id}"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(t["title"], "hello");
        app.stop().await;
    }
}

#[tokio::test]
async fn failing_webhooks_retry_with_backoff_and_the_same_id_then_fail_the_run_visibly() {
    for db in testing::each().await {
        let sink = HttpSink::start().await;
        *sink.status.lock().unwrap() = 500;
        let app = TestApp::start_full(
            db,
            Default::default(),
            settings(None, Some(&sink)),
            Arc::new(trellis_form::SystemClock),
        )
        .await;
        let be = app.backend;
        let def = json!({"key": "hooks", "entities": [{"key": "ticket", "fields": [{"key": "title", "type": "text"}]}], "workflows": [
            {"key": "notify_erp", "trigger": {"type": "record_created", "entity": "ticket"},
             "nodes": [{"id": "post", "type": "http_request", "url": "{{ vars.ERP_WEBHOOK_URL }}", "body": {"title": "{{ record.title }}"},
                        "retry": {"max_attempts": 3, "backoff_seconds": 1, "max_backoff_seconds": 1}}]}
        ]});
        let (s, body) = app.call(Method::POST, "/api/v1/apps", Some(def)).await;
        assert!(s.is_success(), "{be}: {body}");
        let (_, t) = app
            .call(
                Method::POST,
                "/api/v1/apps/hooks/records/ticket",
                Some(json!({"title": "t1"})),
            )
            .await;
        let id = t["id"].as_str().unwrap().to_owned();
        let run = wait_for("the run to fail", || async {
            let (_, r) = app
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/hooks/runs?entity=ticket&record_id={id}"),
                    None,
                )
                .await;
            r["runs"]
                .as_array()
                .unwrap()
                .first()
                .filter(|r| r["status"] == "failed")
                .cloned()
        })
        .await;
        let hits = sink.hits();
        assert_eq!(hits.len(), 3, "{be}: three attempts");
        let ids: std::collections::HashSet<&str> = hits
            .iter()
            .map(|h| h.header("webhook-id").unwrap())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "{be}: every attempt carries the same webhook-id"
        );
        assert!(
            run["error"].as_str().unwrap().contains("failed 3 time(s)"),
            "{be}: {run}"
        );
        assert!(
            run["error"].as_str().unwrap().contains("HTTP 500"),
            "{be}: {run}"
        );
        let (_, detail) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/hooks/runs/{}", run["id"].as_str().unwrap()),
                None,
            )
            .await;
        let failed = detail["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "failed")
            .count();
        assert_eq!(failed, 3, "{be}: {detail}");
        app.stop().await;
    }
}

#[tokio::test]
async fn dry_run_shows_the_path_and_the_diff_without_side_effects() {
    for db in testing::each().await {
        let app = TestApp::start(db).await;
        let be = app.backend;
        let users = demo(&app).await;
        let assigned = "SELECT COUNT(*) FROM \"notifications\" WHERE \"title\" LIKE 'New lead%'";
        let before = count(&app, assigned, &[]).await;
        let (s, out) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/workflows/new_lead/dry-run",
                Some(json!({"record": {"name": "Sample", "region": "south"}})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}: {out}");
        let path: Vec<&str> = out["path"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node"].as_str().unwrap())
            .collect();
        assert_eq!(path, ["tag_source", "assign", "first_call"]);
        let owner = out["record_changes"]["owner"]["to"].as_str().unwrap();
        assert!(
            [&users["guo.fei"], &users["luo.na"]].contains(&&owner.to_owned()),
            "{be}: {out}"
        );
        assert_eq!(out["record_changes"]["source"]["to"], "website");
        // Nothing happened.
        assert_eq!(
            count(&app, "SELECT COUNT(*) FROM \"notifications\"", &[]).await,
            before
        );
        assert_eq!(
            count(
                &app,
                "SELECT COUNT(*) FROM \"crm__lead\" WHERE \"name\" = 'Sample'",
                &[]
            )
            .await,
            0
        );
        assert_eq!(
            count(
                &app,
                "SELECT COUNT(*) FROM \"flow_runs\" WHERE \"workflow\" = 'new_lead'",
                &[]
            )
            .await,
            0
        );
        // Replay a real run against a new version that routes the south to Ma Jun: the trigger
        // still matches, the owner would now be Ma Jun.
        let (_, lead) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/lead",
                Some(json!({"name": "Real", "region": "south"})),
            )
            .await;
        let run = runs_of(&app, "lead", lead["id"].as_str().unwrap()).await[0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut v2: Value = serde_json::from_str(include_str!(
            "../../examples/crm/workflows/01-new-lead.json"
        ))
        .unwrap();
        v2["version"] = json!(2);
        v2["nodes"][1]["rules"][2] = json!({"name": "south to Ma Jun", "when": "record.region == \"south\"", "user": "ma.jun@sample.trellis.invalid"});
        let (s, out) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/workflows/new_lead/dry-run",
                Some(json!({"replay_run_id": run, "definition": v2})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{be}: {out}");
        assert_eq!(out["version"], 2);
        assert_eq!(out["trigger_matches"], true, "{be}: {out}");
        assert_eq!(
            out["path"][1]["would"]["owner"],
            json!(users["ma.jun"]),
            "{be}: {out}"
        );
        assert_eq!(
            out["path"][1]["would"]["reason"],
            "south to Ma Jun matched; user ma.jun@sample.trellis.invalid"
        );
        let (s, _) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/workflows/nope/dry-run",
                Some(json!({"record": {}})),
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        app.stop().await;
    }
}

fn clock_now(c: &trellis_form::ManualClock) -> String {
    use trellis_form::Clock;
    c.now().to_rfc3339()
}

#[allow(dead_code)]
async fn body_of(r: reqwest::Response) -> Value {
    json(r).await.1
}

#[tokio::test]
async fn two_servers_on_one_postgres_share_the_queue_without_running_a_step_twice() {
    let Some(db) = testing::postgres().await else {
        return;
    };
    let url = db.url.clone();
    let mut sa = settings(None, None);
    sa.worker = "server-a".into();
    let a = TestApp::start_full(
        db,
        Default::default(),
        sa,
        Arc::new(trellis_form::SystemClock),
    )
    .await;
    let db2 = trellis_form::db::Db::connect(&url, &Default::default())
        .await
        .unwrap();
    let mut sb = settings(None, None);
    sb.worker = "server-b".into();
    let (state_b, _) = trellis_server::cli::prepare_with(
        db2.clone(),
        Arc::new(trellis_form::SystemClock),
        None,
        Some(crate::helpers::TOKEN),
        sb,
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let server_b = tokio::spawn(async move {
        trellis_server::serve_until(listener, state_b, async {
            let _ = stopped_b.await;
        })
        .await
        .unwrap();
    });
    let users = demo(&a).await;
    let mut tasks = vec![];
    for i in 0..200 {
        let base = if i % 2 == 0 {
            a.base.clone()
        } else {
            b_base.clone()
        };
        let client = a.client.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{base}/api/v1/apps/crm/records/lead"))
                .bearer_auth(crate::helpers::TOKEN)
                .json(&json!({"name": format!("Shared {i}"), "email": format!("s{i}@shared.example"), "region": "east"}))
                .send()
                .await
                .unwrap();
            json(r).await
        }));
    }
    let mut owners: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let (s, lead) = t.await.unwrap();
        assert_eq!(s, StatusCode::CREATED, "{lead}");
        *owners
            .entry(lead["owner"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        owners.get(&users["lin.tao"]),
        Some(&100),
        "round-robin across two servers: {owners:?}"
    );
    assert_eq!(owners.get(&users["xu.ying"]), Some(&100), "{owners:?}");
    wait_for("every welcome run", || async {
        (count(&a, "SELECT COUNT(*) FROM \"flow_runs\" WHERE \"workflow\" = 'lead_welcome' AND \"status\" = 'succeeded'", &[]).await == 200).then_some(Value::Null)
    })
    .await;
    assert_eq!(
        count(&a, "SELECT COUNT(*) FROM (SELECT \"run_id\", \"node\" FROM \"flow_steps\" GROUP BY \"run_id\", \"node\" HAVING COUNT(*) > 1) x", &[]).await,
        0,
        "no step ran twice"
    );
    assert_eq!(
        count(
            &a,
            "SELECT COUNT(*) FROM \"email_outbox\" WHERE \"to_addr\" LIKE '%@shared.example'",
            &[]
        )
        .await,
        200
    );
    let workers = count(&a, "SELECT COUNT(DISTINCT \"worker\") FROM \"flow_steps\" WHERE \"worker\" IN ('server-a', 'server-b')", &[]).await;
    assert_eq!(workers, 2, "both servers worked the queue");
    let _ = stop_b.send(());
    server_b.await.unwrap();
    db2.close().await;
    a.stop().await;
}
