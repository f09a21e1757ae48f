//! Records over HTTP on both backends: the CRM as a user meets it.

use crate::helpers::{problem_paths, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn crm_records_round_trip_over_http() {
    for app in TestApp::each().await {
        let be = app.backend;
        // Create an account and an opportunity.
        let (s, acc) = app.call(Method::POST, "/api/v1/apps/crm/records/account", Some(json!({"name": "Acme 上海", "industry": "manufacturing", "company_size": "200_1000"}))).await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {acc}");
        let r = app
            .req(Method::POST, "/api/v1/apps/crm/records/opportunity")
            .json(&json!({"name": "Acme ERP", "account": acc["id"], "amount": "120000.50", "source": "trade_show", "expected_close_date": "2026-06-30"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["etag"], "\"1\"");
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let opp: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            location,
            format!(
                "/api/v1/apps/crm/records/opportunity/{}",
                opp["id"].as_str().unwrap()
            )
        );
        assert_eq!(opp["stage"], "mql");
        assert_eq!(
            opp["amount"],
            json!({"amount": "120000.50", "currency": "CNY"})
        );
        let path = location.clone();
        // Moving to proposal without its entry criteria is refused, naming the missing field.
        let (s, body) = app
            .call(Method::PATCH, &path, Some(json!({"stage": "proposal"})))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{be}");
        assert_eq!(
            problem_paths(&body),
            [("/stage".to_owned(), "stage_criteria".to_owned())]
        );
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("Needs summary"),
            "{body}"
        );
        // With them, and with the right version, it moves.
        let r = app
            .req(Method::PATCH, &path)
            .header("if-match", "\"1\"")
            .json(&json!({"stage": "proposal", "needs_summary": "ERP for 3 plants"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["etag"], "\"2\"");
        // A stale If-Match is a 409 with the current version, and changes nothing.
        let r = app
            .req(Method::PATCH, &path)
            .header("if-match", "\"1\"")
            .json(&json!({"name": "stale"}))
            .send()
            .await
            .unwrap();
        let (s, body) = crate::helpers::json(r).await;
        assert_eq!(
            (s, body["code"].clone(), body["current_version"].clone()),
            (StatusCode::CONFLICT, json!("version_conflict"), json!(2))
        );
        let (_, now) = app.call(Method::GET, &path, None).await;
        assert_eq!(
            (
                now["name"].clone(),
                now["stage"].clone(),
                now["version"].clone()
            ),
            (json!("Acme ERP"), json!("proposal"), json!(2))
        );
        assert!(now["stage__entered_proposal"].is_string());
        // History.
        let (s, h) = app
            .call(Method::GET, &format!("{path}/history"), None)
            .await;
        assert_eq!(s, StatusCode::OK);
        let stage_moves: Vec<_> = h["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["field"] == "stage")
            .map(|r| (r["old"].clone(), r["new"].clone()))
            .collect();
        assert_eq!(
            stage_moves,
            [
                (json!(null), json!("mql")),
                (json!("mql"), json!("proposal"))
            ]
        );
        // Listing with a filter, GET and POST forms.
        let filter =
            urlencode(&json!([{"field": "stage", "op": "eq", "value": "proposal"}]).to_string());
        let (s, page) = app
            .call(
                Method::GET,
                &format!("/api/v1/apps/crm/records/opportunity?filter={filter}&count=true"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert_eq!(
            (page["total"].clone(), page["records"][0]["id"].clone()),
            (json!(1), opp["id"].clone())
        );
        let (_, page) = app.call(Method::POST, "/api/v1/apps/crm/records/opportunity/query", Some(json!({"filters": [{"field": "amount", "op": "gt", "value": "200000"}], "count": true}))).await;
        assert_eq!(page["total"], 0);
        // The account cannot be deleted while the opportunity points to it; the opportunity can.
        let acc_path = format!(
            "/api/v1/apps/crm/records/account/{}",
            acc["id"].as_str().unwrap()
        );
        let (s, body) = app.call(Method::DELETE, &acc_path, None).await;
        assert_eq!(
            (s, body["code"].clone()),
            (StatusCode::CONFLICT, json!("conflict"))
        );
        let r = app.req(Method::DELETE, &path).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            app.call(Method::GET, &path, None).await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            app.call(Method::DELETE, &acc_path, None).await.0,
            StatusCode::NO_CONTENT
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn bad_records_are_refused_with_every_problem_and_nothing_changes() {
    for app in TestApp::each().await {
        let lead = "/api/v1/apps/crm/records/lead";
        let (s, body) = app
            .call(Method::POST, lead, Some(json!({"name": "", "source": "tv", "email": "nope", "phone": 12, "status": "won", "owner": "not-a-uuid", "bogus": true, "converted_opportunity": "01900000-0000-7000-8000-000000000000"})))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["code"], "validation_failed");
        assert_eq!(
            problem_paths(&body),
            [
                ("/bogus", "unknown_field"),
                ("/converted_opportunity", "not_found"),
                ("/email", "format"),
                ("/name", "required"),
                ("/owner", "format"),
                ("/phone", "wrong_type"),
                ("/source", "unknown_option"),
                ("/status", "unknown_option"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        // Batch: all or nothing, with the record index in each path.
        let (s, body) = app
            .call(Method::POST, &format!("{lead}/batch"), Some(json!({"records": [{"name": "ok"}, {"name": "bad", "source": "radio"}, {"name": "ok too"}]})))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            problem_paths(&body),
            [("/records/1/source".to_owned(), "unknown_option".to_owned())]
        );
        let (_, page) = app
            .call(Method::GET, &format!("{lead}?count=true"), None)
            .await;
        assert_eq!(page["total"], 0, "nothing was written");
        // Dated in the past (an admin's historical import), so the 500 start no automation:
        // this part is about paging, and 500 inline runs would only load the machine.
        let records: Vec<_> = (0..500)
            .map(|i| json!({"name": format!("Lead {i}"), "source": "website", "region": "east", "created_at": "2025-01-15T09:00:00Z"}))
            .collect();
        let (s, body) = app
            .call(
                Method::POST,
                &format!("{lead}/batch"),
                Some(json!({"records": records})),
            )
            .await;
        assert_eq!(
            (s, body["created"].clone()),
            (StatusCode::CREATED, json!(500))
        );
        // Pages of 200 cover all 500.
        let mut seen = 0;
        let mut cursor: Option<String> = None;
        loop {
            let q = match &cursor {
                Some(c) => format!("{lead}?limit=200&sort=-name&cursor={c}"),
                None => format!("{lead}?limit=200&sort=-name"),
            };
            let (s, page) = app.call(Method::GET, &q, None).await;
            assert_eq!(s, StatusCode::OK, "{page}");
            seen += page["records"].as_array().unwrap().len();
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, 500);
        // Batches of more than two chunks are drafted and written side by side: problems in a
        // late chunk still refuse the whole batch, and earlier chunks leave nothing behind.
        let mut big: Vec<_> = (0..2_500)
            .map(|i| json!({"name": format!("Big {i}"), "source": "website", "created_at": "2025-01-15T09:00:00Z"}))
            .collect();
        big[1_100]["owner"] = json!("01900000-0000-7000-8000-000000000000");
        big[2_400]["source"] = json!("radio");
        let (s, body) = app
            .call(
                Method::POST,
                &format!("{lead}/batch"),
                Some(json!({"records": big})),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            problem_paths(&body),
            [
                ("/records/1100/owner", "not_found"),
                ("/records/2400/source", "unknown_option")
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        let (_, page) = app
            .call(Method::GET, &format!("{lead}?count=true&limit=1"), None)
            .await;
        assert_eq!(
            page["total"], 500,
            "nothing of the refused batch was written"
        );
        big[1_100].as_object_mut().unwrap().remove("owner");
        big[2_400]["source"] = json!("partner");
        let (s, body) = app
            .call(
                Method::POST,
                &format!("{lead}/batch"),
                Some(json!({"records": big})),
            )
            .await;
        assert_eq!(
            (s, body["created"].clone()),
            (StatusCode::CREATED, json!(2_500))
        );
        let ids = body["ids"].as_array().unwrap();
        let (s, r) = app
            .call(
                Method::GET,
                &format!("{lead}/{}", ids[2_400].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            (r["name"].clone(), r["source"].clone()),
            (json!("Big 2400"), json!("partner"))
        );
        let (_, page) = app
            .call(Method::GET, &format!("{lead}?count=true&limit=1"), None)
            .await;
        assert_eq!(page["total"], 3_000);
        app.stop().await;
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn concurrent_creates_each_get_their_own_answer() {
    // On SQLite concurrent creates share commits; a duplicate or an invalid record in a group
    // must fail alone. On PostgreSQL the same requests take the direct path.
    for app in TestApp::each().await {
        let url = app.url("/api/v1/apps/crm/records/account");
        let mut tasks = vec![];
        for i in 0..60 {
            // Names repeat in pairs (unique field); every seventh record is invalid.
            let body = if i % 7 == 6 {
                json!({"name": format!("Bad {i}"), "industry": "nope"})
            } else {
                json!({"name": format!("Account {}", i / 2)})
            };
            let (client, url) = (app.client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(crate::helpers::TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (body, crate::helpers::json(r).await)
            }));
        }
        let mut created = std::collections::BTreeMap::new();
        for t in tasks {
            let (body, (status, answer)) = t.await.unwrap();
            let name = body["name"].as_str().unwrap().to_owned();
            match status {
                StatusCode::CREATED => {
                    assert_eq!(answer["name"], body["name"]);
                    *created.entry(name).or_insert(0) += 1;
                }
                StatusCode::UNPROCESSABLE_ENTITY | StatusCode::CONFLICT => {
                    let code = &answer["errors"][0]["code"];
                    assert!(
                        code == "unique" || code == "unknown_option",
                        "{}: {name}: {answer}",
                        app.backend
                    );
                    if code == "unknown_option" {
                        assert!(name.starts_with("Bad"), "{name}");
                    }
                }
                other => panic!("{}: {other} {answer}", app.backend),
            }
        }
        assert!(
            created.values().all(|n| *n == 1),
            "{}: a name was created twice: {created:?}",
            app.backend
        );
        let valid_names: std::collections::BTreeSet<String> = (0..60)
            .filter(|i| i % 7 != 6)
            .map(|i| format!("Account {}", i / 2))
            .collect();
        assert_eq!(
            created
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            valid_names,
            "{}",
            app.backend
        );
        let (_, page) = app
            .call(
                Method::GET,
                "/api/v1/apps/crm/records/account?count=true",
                None,
            )
            .await;
        assert_eq!(page["total"], json!(valid_names.len()));
        app.stop().await;
    }
}

/// An admin's batch runs the inline workflows of every new record, as single creates do; only a
/// record dated in the past (a historical import) runs none. Regression: the stored creation
/// time (whole microseconds) was compared with the request's clock (nanoseconds), so every
/// admin batch looked historical and the CRM's leads got no first-call task.
#[tokio::test]
async fn an_admin_batch_runs_the_inline_workflows_unless_it_is_historical() {
    for app in TestApp::each().await {
        let be = app.backend;
        let tasks = "/api/v1/apps/crm/records/task?count=true";
        let records: Vec<_> = (0..3)
            .map(|i| json!({"name": format!("Batch {i}"), "company": "Acme", "source": "website", "region": "east"}))
            .collect();
        let (s, body) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/lead/batch",
                Some(json!({"records": records})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {body}");
        let (_, page) = app.call(Method::GET, tasks, None).await;
        assert_eq!(page["total"], 3, "{be}: one first-call task per lead");
        let (s, body) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/lead/batch",
                Some(json!({"records": [{"name": "Old", "created_at": "2025-01-15T09:00:00Z"}]})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {body}");
        let (_, page) = app.call(Method::GET, tasks, None).await;
        assert_eq!(page["total"], 3, "{be}: the past starts no automation");
        app.stop().await;
    }
}
