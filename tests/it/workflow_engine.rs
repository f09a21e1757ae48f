//! Engine behaviour beyond the CRM: date triggers, the loop guard, waits and version pinning,
//! on a small app, with a controlled clock, on SQLite and PostgreSQL.

use crate::helpers::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use trellis_form::testing;

fn settings() -> trellis_flow::Settings {
    trellis_flow::Settings {
        scan_every: Duration::from_millis(100),
        ..Default::default()
    }
}

async fn start(db: testing::TestDb, clock: Arc<trellis_form::ManualClock>) -> TestApp {
    TestApp::start_full(db, Default::default(), settings(), clock).await
}

async fn install(app: &TestApp, def: Value) {
    let (s, body) = app.call(Method::POST, "/api/v1/apps", Some(def)).await;
    assert!(s.is_success(), "{}: {body}", app.backend);
}

async fn eventually<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn runs(app: &TestApp, id: &str) -> Vec<Value> {
    let (_, r) = app
        .call(
            Method::GET,
            &format!("/api/v1/apps/t/runs?entity=deal&record_id={id}"),
            None,
        )
        .await;
    r["runs"].as_array().unwrap().clone()
}

fn t0() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2026-11-27T09:00:00Z")
        .unwrap()
        .to_utc()
}

fn entity() -> Value {
    json!({"key": "deal", "fields": [
        {"key": "title", "type": "text"},
        {"key": "close", "type": "date"},
        {"key": "n", "type": "integer"}
    ]})
}

#[tokio::test]
async fn a_date_trigger_fires_once_at_its_moment_in_the_app_time_zone() {
    for db in testing::each().await {
        let clock = Arc::new(trellis_form::ManualClock::new(t0()));
        let app = start(db, clock.clone()).await;
        let be = app.backend;
        install(&app, json!({"key": "t", "timezone": "Asia/Shanghai", "entities": [entity()], "workflows": [
            {"key": "week_before", "trigger": {"type": "date_relative", "entity": "deal", "field": "close", "offset_days": -7, "hour": 9},
             "nodes": [{"id": "mark", "type": "update_record", "values": {"title": "closing in a week"}}]}
        ]})).await;
        // Closes 2026-12-10: the moment is 2026-12-03 09:00 Shanghai = 01:00 UTC.
        let (s, d) = app
            .call(
                Method::POST,
                "/api/v1/apps/t/records/deal",
                Some(json!({"title": "x", "close": "2026-12-10"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let id = d["id"].as_str().unwrap().to_owned();
        clock.advance(
            chrono::Duration::days(5) + chrono::Duration::hours(15) + chrono::Duration::minutes(59),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            runs(&app, &id).await.is_empty(),
            "{be}: 2026-12-03 00:59 UTC is a minute early"
        );
        clock.advance(chrono::Duration::minutes(2));
        eventually("the date run", || async {
            runs(&app, &id)
                .await
                .first()
                .is_some_and(|r| r["status"] == "succeeded")
        })
        .await;
        let (_, d) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/t/records/deal/{id}"),
                None,
            )
            .await;
        assert_eq!(d["title"], "closing in a week", "{be}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(runs(&app, &id).await.len(), 1, "{be}: once per value");
        app.stop().await;
    }
}

#[tokio::test]
async fn a_workflow_that_triggers_itself_stops_at_the_loop_guard() {
    for db in testing::each().await {
        let app = start(db, Arc::new(trellis_form::ManualClock::new(t0()))).await;
        let be = app.backend;
        install(&app, json!({"key": "t", "entities": [entity()], "workflows": [
            {"key": "bump", "trigger": {"type": "record_updated", "entity": "deal", "fields": ["n"]},
             "nodes": [{"id": "inc", "type": "update_record", "values": {"n": "{{ record.n + 1 }}"}}]}
        ]})).await;
        let (_, d) = app
            .call(
                Method::POST,
                "/api/v1/apps/t/records/deal",
                Some(json!({"n": 0})),
            )
            .await;
        let id = d["id"].as_str().unwrap().to_owned();
        app.call(
            Method::PATCH,
            &format!("/api/v1/apps/t/records/deal/{id}"),
            Some(json!({"n": 1})),
        )
        .await;
        eventually("the guard", || async {
            runs(&app, &id)
                .await
                .iter()
                .any(|r| r["status"] == "failed")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let all = runs(&app, &id).await;
        let ok = all.iter().filter(|r| r["status"] == "succeeded").count();
        let failed: Vec<&Value> = all.iter().filter(|r| r["status"] == "failed").collect();
        // The person's update starts depth 0; runs at depths 0..4 succeed; depth 5 is refused.
        assert_eq!(ok, 5, "{be}: {all:?}");
        assert_eq!(failed.len(), 1, "{be}");
        assert!(
            failed[0]["error"]
                .as_str()
                .unwrap()
                .starts_with("loop guard"),
            "{be}: {}",
            failed[0]
        );
        let (_, d) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/t/records/deal/{id}"),
                None,
            )
            .await;
        assert_eq!(d["n"], 6, "{be}");
        app.stop().await;
    }
}

#[tokio::test]
async fn waiting_runs_keep_the_version_they_started_with() {
    for db in testing::each().await {
        let clock = Arc::new(trellis_form::ManualClock::new(t0()));
        let app = start(db, clock.clone()).await;
        let be = app.backend;
        let def = |version: i64, title: &str| {
            json!({"key": "t", "entities": [entity()], "workflows": [
                {"key": "later", "version": version, "trigger": {"type": "record_created", "entity": "deal"},
                 "nodes": [{"id": "pause", "type": "wait", "minutes": 10},
                           {"id": "stamp", "type": "update_record", "values": {"title": title}}],
                 "edges": [{"from": "pause", "to": "stamp"}]}
            ]})
        };
        install(&app, def(1, "v1")).await;
        let (_, a) = app
            .call(
                Method::POST,
                "/api/v1/apps/t/records/deal",
                Some(json!({"title": "a"})),
            )
            .await;
        let a = a["id"].as_str().unwrap().to_owned();
        eventually("the first run to wait", || async {
            runs(&app, &a)
                .await
                .first()
                .is_some_and(|r| r["status"] == "waiting")
        })
        .await;
        install(&app, def(2, "v2")).await;
        let (_, b) = app
            .call(
                Method::POST,
                "/api/v1/apps/t/records/deal",
                Some(json!({"title": "b"})),
            )
            .await;
        let b = b["id"].as_str().unwrap().to_owned();
        eventually("the second run to wait", || async {
            runs(&app, &b)
                .await
                .first()
                .is_some_and(|r| r["status"] == "waiting")
        })
        .await;
        // Nine minutes: nobody wakes early.
        clock.advance(chrono::Duration::minutes(9));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(runs(&app, &a).await[0]["status"], "waiting", "{be}");
        clock.advance(chrono::Duration::minutes(2));
        for id in [&a, &b] {
            eventually("the run to finish", || async {
                runs(&app, id)
                    .await
                    .first()
                    .is_some_and(|r| r["status"] == "succeeded")
            })
            .await;
        }
        let title = |id: String| {
            let app = &app;
            async move {
                app.call(
                    Method::GET,
                    &format!("/api/v1/apps/t/records/deal/{id}"),
                    None,
                )
                .await
                .1["title"]
                    .clone()
            }
        };
        assert_eq!(
            title(a.clone()).await,
            "v1",
            "{be}: the old run kept version 1"
        );
        assert_eq!(
            title(b.clone()).await,
            "v2",
            "{be}: the new run uses version 2"
        );
        assert_eq!(runs(&app, &a).await[0]["version"], 1);
        assert_eq!(runs(&app, &b).await[0]["version"], 2);
        app.stop().await;
    }
}

#[tokio::test]
async fn a_schedule_fires_each_moment_once_in_the_app_time_zone() {
    for db in testing::each().await {
        // Friday 2026-11-27 17:00 in Shanghai.
        let clock = Arc::new(trellis_form::ManualClock::new(t0()));
        let app = start(db, clock.clone()).await;
        let be = app.backend;
        let (s, body) = app
            .call(Method::POST, "/api/v1/apps", Some(json!({"key": "t", "timezone": "Asia/Shanghai", "entities": [entity()], "workflows": [
                {"key": "bad", "trigger": {"type": "schedule", "cron": "0 9 * *"},
                 "nodes": [{"id": "u", "type": "update_record", "values": {"title": "x"}}]}
            ]})))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{be}: {body}");
        let mut paths = crate::helpers::problem_paths(&body);
        paths.sort();
        assert_eq!(
            paths,
            [
                (
                    "/workflows/0/nodes/0/type".to_owned(),
                    "needs_record".to_owned()
                ),
                (
                    "/workflows/0/trigger/cron".to_owned(),
                    "invalid_cron".to_owned()
                ),
            ]
        );
        install(&app, json!({"key": "t", "timezone": "Asia/Shanghai", "entities": [entity()], "workflows": [
            {"key": "morning", "trigger": {"type": "schedule", "cron": "0 9 * * MON-FRI"},
             "nodes": [{"id": "make", "type": "create_record", "entity": "deal", "values": {"title": "morning {{ now }}"}}]}
        ]})).await;
        let made = || async {
            let (_, r) = app
                .call(Method::GET, "/api/v1/apps/t/records/deal?limit=100", None)
                .await;
            r["records"].as_array().unwrap().len()
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(made().await, 0, "{be}: no firing for the past");
        // Monday 2026-11-30 08:59 Shanghai.
        clock.advance(
            chrono::Duration::days(2) + chrono::Duration::hours(15) + chrono::Duration::minutes(59),
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(made().await, 0, "{be}: not a minute early");
        clock.advance(chrono::Duration::minutes(2));
        eventually("the Monday run", || async { made().await == 1 }).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(made().await, 1, "{be}: once per moment");
        clock.advance(chrono::Duration::days(1));
        eventually("the Tuesday run", || async { made().await == 2 }).await;
        app.stop().await;
    }
}

#[tokio::test]
async fn inbound_webhooks_need_a_valid_signature_and_start_their_run_once() {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    for db in testing::each().await {
        let clock = Arc::new(trellis_form::ManualClock::new(t0()));
        let app = start(db, clock.clone()).await;
        let be = app.backend;
        let secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode("hook-secret")
        );
        install(&app, json!({"key": "t", "entities": [entity()], "workflows": [
            {"key": "paid", "trigger": {"type": "webhook", "name": "payment", "entity": "deal", "secret": secret},
             "nodes": [{"id": "mark", "type": "update_record", "values": {"title": "paid {{ payload.amount }}"}}]}
        ]})).await;
        let (_, d) = app
            .call(
                Method::POST,
                "/api/v1/apps/t/records/deal",
                Some(json!({"title": "open"})),
            )
            .await;
        let id = d["id"].as_str().unwrap().to_owned();
        let body = json!({"record_id": id, "amount": "1200.00"}).to_string();
        let sign = |msg_id: &str, ts: i64, body: &str| {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret").unwrap();
            mac.update(format!("{msg_id}.{ts}.{body}").as_bytes());
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            )
        };
        let ts = t0().timestamp();
        let send = |msg_id: &'static str,
                    ts: i64,
                    sig: Option<String>,
                    body: String,
                    hook: &'static str| {
            let mut r = app
                .client
                .post(app.url(&format!("/api/v1/apps/t/hooks/{hook}")))
                .header("content-type", "application/json")
                .body(body);
            r = r
                .header("webhook-id", msg_id)
                .header("webhook-timestamp", ts.to_string());
            if let Some(s) = sig {
                r = r.header("webhook-signature", s);
            }
            async move { crate::helpers::json(r.send().await.unwrap()).await }
        };
        let (s, e) = send("m1", ts, None, body.clone(), "payment").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{be}: {e}");
        let (s, _) = send(
            "m1",
            ts,
            Some(sign("m1", ts, "{}")),
            body.clone(),
            "payment",
        )
        .await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{be}: a signature of another body"
        );
        let (s, e) = send(
            "m1",
            ts - 600,
            Some(sign("m1", ts - 600, &body)),
            body.clone(),
            "payment",
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{be}: stale");
        assert_eq!(e["code"], "invalid_signature");
        let (s, _) = send("m1", ts, Some(sign("m1", ts, &body)), body.clone(), "nope").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let bad = json!({"record_id": uuid::Uuid::nil()}).to_string();
        let (s, _) = send("m0", ts, Some(sign("m0", ts, &bad)), bad.clone(), "payment").await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{be}: no such record");
        let (s, r) = send(
            "m1",
            ts,
            Some(format!("v1,AAAA {}", sign("m1", ts, &body))),
            body.clone(),
            "payment",
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{be}: {r}");
        assert_eq!(r["runs"].as_array().unwrap().len(), 1);
        let (s, r) = send(
            "m1",
            ts,
            Some(sign("m1", ts, &body)),
            body.clone(),
            "payment",
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        assert_eq!(
            r["runs"],
            json!([]),
            "{be}: a repeated delivery starts nothing"
        );
        eventually("the hook run", || async {
            runs(&app, &id)
                .await
                .first()
                .is_some_and(|r| r["status"] == "succeeded")
        })
        .await;
        let (_, d) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/t/records/deal/{id}"),
                None,
            )
            .await;
        assert_eq!(d["title"], "paid 1200.00", "{be}");
        app.stop().await;
    }
}

#[tokio::test]
async fn least_open_assignment_and_the_rate_limit_hold_back_a_storm_without_losing_it() {
    for db in testing::each().await {
        let clock = Arc::new(trellis_form::ManualClock::new(t0()));
        let app = start(db, clock.clone()).await;
        let be = app.backend;
        let mut ids = vec![];
        for who in ["ann", "bob"] {
            let (s, u) = app
                .call(
                    Method::POST,
                    "/api/v1/users",
                    Some(json!({"name": who, "email": format!("{who}@t.example")})),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED, "{u}");
            ids.push(u["id"].as_str().unwrap().to_owned());
        }
        let (s, _) = app
            .call(
                Method::POST,
                "/api/v1/teams",
                Some(json!({"key": "crew", "name": "Crew", "members": ids})),
            )
            .await;
        assert!(s.is_success());
        install(&app, json!({"key": "t", "entities": [entity()], "workflows": [
            {"key": "route", "mode": "inline", "trigger": {"type": "record_created", "entity": "deal", "condition": "record.title == \"new\""},
             "nodes": [{"id": "a", "type": "assign_owner", "rules": [{"team": "crew", "strategy": "least_open"}], "notify": false}]},
            {"key": "slow", "rate_limit_per_minute": 2, "trigger": {"type": "record_created", "entity": "deal", "condition": "record.title == \"storm\""},
             "nodes": [{"id": "n", "type": "update_record", "values": {"n": 1}}]}
        ]})).await;
        // Ann already has two open deals: the next two go to Bob.
        for _ in 0..2 {
            app.call(
                Method::POST,
                "/api/v1/apps/t/records/deal",
                Some(json!({"title": "old", "owner": ids[0]})),
            )
            .await;
        }
        for _ in 0..2 {
            let (_, d) = app
                .call(
                    Method::POST,
                    "/api/v1/apps/t/records/deal",
                    Some(json!({"title": "new"})),
                )
                .await;
            assert_eq!(d["owner"], json!(ids[1]), "{be}: {d}");
        }
        // A storm of five creates: two runs now, two a minute later, one after two minutes.
        let mut storm = vec![];
        for _ in 0..5 {
            let (_, d) = app
                .call(
                    Method::POST,
                    "/api/v1/apps/t/records/deal",
                    Some(json!({"title": "storm"})),
                )
                .await;
            storm.push(d["id"].as_str().unwrap().to_owned());
        }
        let done = || async {
            let (_, r) = app
                .call(
                    Method::GET,
                    "/api/v1/apps/t/runs?workflow=slow&limit=50",
                    None,
                )
                .await;
            let runs = r["runs"].as_array().unwrap().clone();
            (
                runs.len(),
                runs.iter().filter(|r| r["status"] == "succeeded").count(),
            )
        };
        eventually("two runs", || async { done().await == (5, 2) }).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            done().await,
            (5, 2),
            "{be}: the others wait, none is dropped"
        );
        clock.advance(chrono::Duration::seconds(61));
        eventually("four runs", || async { done().await == (5, 4) }).await;
        clock.advance(chrono::Duration::seconds(60));
        eventually("all five", || async { done().await == (5, 5) }).await;
        app.stop().await;
    }
}

#[tokio::test]
async fn approvals_escalate_once_then_time_out_and_all_approvers_must_agree_before_the_im_post() {
    for db in testing::each().await {
        let im = crate::sinks::HttpSink::start().await;
        let clock = Arc::new(trellis_form::ManualClock::new(t0()));
        let mut s = settings();
        s.allow = trellis_flow::netguard::AllowList::parse("127.0.0.1").unwrap();
        s.vars
            .insert("IM".into(), format!("http://127.0.0.1:{}/robot", im.port));
        let app = TestApp::start_full(db, Default::default(), s, clock.clone()).await;
        let be = app.backend;
        install(&app, json!({"key": "t", "entities": [entity()], "workflows": [
            {"key": "sign_off", "trigger": {"type": "record_created", "entity": "deal"},
             "nodes": [
                {"id": "ok", "type": "approval", "steps": [{"name": "boss", "approvers": {"user": "boss@t.example"}, "rule": "all", "timeout_hours": 1}]},
                {"id": "tell", "type": "notify", "to": "owner", "title": "Approved: {{ record.title }}", "im_webhook": "{{ vars.IM }}", "im_format": "dingtalk"},
                {"id": "late", "type": "update_record", "values": {"title": "timed out"}}
             ],
             "edges": [{"from": "ok", "to": "tell", "output": "approved"}, {"from": "ok", "to": "late", "output": "timeout"}]}
        ]})).await;
        let mut tokens = std::collections::HashMap::new();
        let mut ids = std::collections::HashMap::new();
        for (who, manager) in [("big", None), ("boss", Some("big"))] {
            let mut body = json!({"name": who, "email": format!("{who}@t.example"), "password": "a good long password"});
            if let Some(m) = manager {
                body["manager_id"] = json!(ids[m]);
            }
            let (_, u) = app.call(Method::POST, "/api/v1/users", Some(body)).await;
            let id = u["id"].as_str().unwrap().to_owned();
            app.call(
                Method::PUT,
                &format!("/api/v1/apps/t/members/{id}"),
                Some(json!({"role": "viewer"})),
            )
            .await;
            let r = app.client.post(app.url("/api/v1/auth/login")).json(&json!({"email": format!("{who}@t.example"), "password": "a good long password"})).send().await.unwrap();
            tokens.insert(
                who,
                crate::helpers::json(r).await.1["token"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            ids.insert(who, id);
        }
        let pending = |title: &'static str| {
            let app = &app;
            async move {
                let (_, a) = app
                    .call(Method::GET, "/api/v1/apps/t/approvals", None)
                    .await;
                let (_, d) = app
                    .call(
                        Method::POST,
                        "/api/v1/apps/t/records/deal/query",
                        Some(json!({"filters": [{"field": "title", "op": "eq", "value": title}]})),
                    )
                    .await;
                let id = d["records"][0]["id"].clone();
                a["approvals"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["record_id"] == id)
                    .cloned()
            }
        };
        app.call(
            Method::POST,
            "/api/v1/apps/t/records/deal",
            Some(json!({"title": "A"})),
        )
        .await;
        eventually("the approval", || async { pending("A").await.is_some() }).await;
        assert_eq!(
            pending("A").await.unwrap()["approvers"],
            json!([ids["boss"]]),
            "{be}"
        );
        // An hour without a decision: escalated once to the boss's manager.
        clock.advance(chrono::Duration::minutes(61));
        eventually("the escalation", || async {
            pending("A").await.unwrap()["approvers"]
                .as_array()
                .unwrap()
                .len()
                == 2
        })
        .await;
        let a = pending("A").await.unwrap();
        let decide = |who: &'static str, id: String| {
            let app = &app;
            let token = tokens[who].clone();
            async move {
                crate::helpers::with(
                    app,
                    &token,
                    Method::POST,
                    &format!("/api/v1/apps/t/approvals/{id}/decision"),
                    Some(json!({"decision": "approve"})),
                )
                .await
            }
        };
        // Rule `all`: the boss's approval alone leaves it pending; the manager's completes it.
        let (s, r) = decide("boss", a["id"].as_str().unwrap().to_owned()).await;
        assert_eq!(s, StatusCode::OK, "{be}: {r}");
        assert_eq!(r["status"], "pending", "{be}");
        let (_, r) = decide("big", a["id"].as_str().unwrap().to_owned()).await;
        assert_eq!(r["status"], "approved", "{be}");
        eventually("the IM post", || async { !im.hits().is_empty() }).await;
        let hit = &im.hits()[0];
        assert_eq!(hit.path, "/robot");
        let body: Value = serde_json::from_str(&hit.body).unwrap();
        assert_eq!(body["msgtype"], "text", "{be}: {body}");
        assert_eq!(body["text"]["content"], "Approved: A");
        // Another deal: nobody decides, even after the escalation: the timeout branch.
        app.call(
            Method::POST,
            "/api/v1/apps/t/records/deal",
            Some(json!({"title": "B"})),
        )
        .await;
        eventually("the second approval", || async {
            pending("B").await.is_some()
        })
        .await;
        clock.advance(chrono::Duration::minutes(61));
        eventually("its escalation", || async {
            pending("B").await.unwrap()["approvers"]
                .as_array()
                .unwrap()
                .len()
                == 2
        })
        .await;
        clock.advance(chrono::Duration::minutes(61));
        eventually("the timeout", || async {
            let (_, d) = app
                .call(
                    Method::POST,
                    "/api/v1/apps/t/records/deal/query",
                    Some(
                        json!({"filters": [{"field": "title", "op": "eq", "value": "timed out"}]}),
                    ),
                )
                .await;
            d["records"].as_array().unwrap().len() == 1
        })
        .await;
        app.stop().await;
    }
}

#[tokio::test]
async fn a_firing_report_alert_starts_its_workflow() {
    for db in testing::each().await {
        let clock = Arc::new(trellis_form::ManualClock::new(t0()));
        let app = start(db, clock.clone()).await;
        let be = app.backend;
        let alert = json!({"deal_drop": {"label": "Deals dropped", "every": "day",
            "query": {"metric": "deals", "time": {"from": "2026-07-01", "to": "2026-10-01"},
                      "compare": "previous_period", "flag": {"metric": "deals", "change_pct_lte": -30}}}});
        let mut def = json!({"key": "t", "timezone": "Asia/Shanghai", "entities": [entity()],
            "reports": [{"metrics": {"deals": {"type": "aggregate", "entity": "deal", "agg": "count"}}, "alerts": alert}],
            "workflows": [{"key": "on_drop", "trigger": {"type": "alert_fired", "alert": "deal_dropp"},
                "nodes": [{"id": "tell", "type": "notify", "to": {"role": "manager"},
                           "title": "{{ record.label }}", "body": "{{ record.rows[0].deals }} deals, was {{ record.rows[0].deals_previous }}"}]}]});
        // A misspelt alert is a definition error naming the alerts there are.
        let (s, b) = app
            .call(Method::POST, "/api/v1/apps", Some(def.clone()))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{be}: {b}");
        assert_eq!(
            b["errors"][0]["path"], "/workflows/0/trigger/alert",
            "{be}: {b}"
        );
        assert_eq!(b["errors"][0]["code"], "unknown_alert", "{be}: {b}");
        def["workflows"][0]["trigger"]["alert"] = json!("deal_drop");
        install(&app, def).await;
        // A manager of the app, to be told.
        let (_, u) = app
            .call(
                Method::POST,
                "/api/v1/users",
                Some(json!({"name": "Boss", "email": "boss@t.example"})),
            )
            .await;
        let boss = u["id"].as_str().unwrap().to_owned();
        let (s, _) = app
            .call(
                Method::PUT,
                &format!("/api/v1/apps/t/members/{boss}"),
                Some(json!({"role": "manager"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        // Three deals last quarter but one, one this quarter: down 67%.
        let at = |d: &str| format!("{d}T10:00:00Z");
        let records: Vec<Value> = ["2026-04-10", "2026-05-10", "2026-06-10", "2026-08-10"]
            .iter()
            .map(|d| json!({"title": "d", "created_at": at(d)}))
            .collect();
        let (s, b) = app
            .call(
                Method::POST,
                "/api/v1/apps/t/records/deal/batch",
                Some(json!({"records": records})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {b}");
        let loaded = trellis_form::apps::load(&app.db.db, "t")
            .await
            .unwrap()
            .unwrap();
        let reports = trellis_report::Reports::compile(&loaded).unwrap();
        let fired = trellis_report::alerts::evaluate(&app.db.db, &loaded, &reports, t0())
            .await
            .unwrap();
        assert_eq!(fired.len(), 1, "{be}");
        let sql = trellis_form::db::Sql::new(
            "SELECT \"user_id\", \"title\", \"body\" FROM \"notifications\" WHERE \"app\" = 't'",
        );
        let kinds = [
            trellis_form::model::ColKind::Uuid,
            trellis_form::model::ColKind::Text,
            trellis_form::model::ColKind::Text,
        ];
        let db = app.db.db.clone();
        eventually("the manager's notification", || {
            let (db, sql) = (db.clone(), sql.clone());
            async move { db.fetch_all(&sql, &kinds).await.unwrap().len() == 1 }
        })
        .await;
        let rows = app.db.db.fetch_all(&sql, &kinds).await.unwrap();
        let got: Vec<String> = rows[0]
            .iter()
            .map(|v| {
                trellis_form::values::scalar_json(v, 0)
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            got,
            [boss.as_str(), "Deals dropped", "1 deals, was 3"],
            "{be}"
        );
        // The run: no record, the alert's workflow, succeeded.
        let (_, list) = app
            .call(Method::GET, "/api/v1/apps/t/runs?workflow=on_drop", None)
            .await;
        let run = &list["runs"][0];
        assert_eq!(
            (run["status"].clone(), run["record_id"].clone()),
            (json!("succeeded"), Value::Null),
            "{be}: {list}"
        );
        app.stop().await;
    }
}
