//! Roles per app and record scopes: reps see their own, managers their team's, viewers read
//! everything, and a user without a role does not see the app.

use crate::helpers::{json, with, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn record_scopes_follow_roles_and_the_management_chain() {
    for app in TestApp::each().await {
        let be = app.backend;
        let mut ids = std::collections::HashMap::new();
        let mut tokens = std::collections::HashMap::new();
        for (who, manager, role) in [
            ("boss", None, Some("manager")),
            ("r1", Some("boss"), Some("sales_rep")),
            ("r2", Some("boss"), Some("sales_rep")),
            ("r3", None, Some("sales_rep")),
            ("viewer", None, Some("viewer")),
            ("outsider", None, None),
        ] {
            let mut body = json!({"name": who, "email": format!("{who}@x.example"), "password": "a good long password"});
            if let Some(m) = manager {
                body["manager_id"] = json!(ids[m]);
            }
            let (s, u) = app.call(Method::POST, "/api/v1/users", Some(body)).await;
            assert_eq!(s, StatusCode::CREATED, "{be}: {u}");
            let id = u["id"].as_str().unwrap().to_owned();
            if let Some(role) = role {
                let (s, _) = app
                    .call(
                        Method::PUT,
                        &format!("/api/v1/apps/crm/members/{id}"),
                        Some(json!({"role": role})),
                    )
                    .await;
                assert_eq!(s, StatusCode::OK);
            }
            let r = app.client.post(app.url("/api/v1/auth/login")).json(&json!({"email": format!("{who}@x.example"), "password": "a good long password"})).send().await.unwrap();
            tokens.insert(who, json(r).await.1["token"].as_str().unwrap().to_owned());
            ids.insert(who, id);
        }
        // The admin creates one lead for each rep.
        let records: Vec<Value> = ["r1", "r2", "r3"]
            .iter()
            .map(|r| json!({"name": format!("lead of {r}"), "owner": ids[r]}))
            .collect();
        let (s, made) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/lead/batch",
                Some(json!({"records": records})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {made}");
        let lead_of = |i: usize| made["ids"][i].as_str().unwrap().to_owned();
        let names = |page: &Value| -> Vec<String> {
            let mut v: Vec<String> = page["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect();
            v.sort();
            v
        };
        // A rep sees and counts only their own.
        let (_, page) = with(
            &app,
            &tokens["r1"],
            Method::GET,
            "/api/v1/apps/crm/records/lead?count=true",
            None,
        )
        .await;
        assert_eq!(
            (names(&page), page["total"].clone()),
            (vec!["lead of r1".to_owned()], json!(1)),
            "{be}"
        );
        // Someone else's record is a 404 for reading, changing, deleting and its history.
        let other = format!("/api/v1/apps/crm/records/lead/{}", lead_of(1));
        assert_eq!(
            with(&app, &tokens["r1"], Method::GET, &other, None).await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            with(
                &app,
                &tokens["r1"],
                Method::PATCH,
                &other,
                Some(json!({"name": "mine now"}))
            )
            .await
            .0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            with(&app, &tokens["r1"], Method::DELETE, &other, None)
                .await
                .0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            with(
                &app,
                &tokens["r1"],
                Method::GET,
                &format!("{other}/history"),
                None
            )
            .await
            .0,
            StatusCode::NOT_FOUND
        );
        // A rep's new records are their own, and cannot be handed to someone else.
        let (s, mine) = with(
            &app,
            &tokens["r1"],
            Method::POST,
            "/api/v1/apps/crm/records/lead",
            Some(json!({"name": "new by r1"})),
        )
        .await;
        assert_eq!(
            (s, mine["owner"].clone()),
            (StatusCode::CREATED, json!(ids["r1"]))
        );
        let (s, body) = with(
            &app,
            &tokens["r1"],
            Method::POST,
            "/api/v1/apps/crm/records/lead",
            Some(json!({"name": "x", "owner": ids["r3"]})),
        )
        .await;
        assert_eq!(
            (
                s,
                body["errors"][0]["path"].clone(),
                body["errors"][0]["code"].clone()
            ),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!("/owner"),
                json!("not_allowed")
            )
        );
        let own = format!("/api/v1/apps/crm/records/lead/{}", lead_of(0));
        let (s, body) = with(
            &app,
            &tokens["r1"],
            Method::PATCH,
            &own,
            Some(json!({"owner": ids["r2"]})),
        )
        .await;
        assert_eq!(
            (s, body["errors"][0]["path"].clone()),
            (StatusCode::UNPROCESSABLE_ENTITY, json!("/owner"))
        );
        // The manager sees the team (r1, r2), not r3, and may reassign within it.
        let (_, page) = with(
            &app,
            &tokens["boss"],
            Method::GET,
            "/api/v1/apps/crm/records/lead",
            None,
        )
        .await;
        assert_eq!(
            names(&page),
            ["lead of r1", "lead of r2", "new by r1"],
            "{be}"
        );
        let (s, moved) = with(
            &app,
            &tokens["boss"],
            Method::PATCH,
            &own,
            Some(json!({"owner": ids["r2"]})),
        )
        .await;
        assert_eq!(
            (s, moved["owner"].clone()),
            (StatusCode::OK, json!(ids["r2"]))
        );
        // The viewer reads everything and writes nothing.
        let (_, page) = with(
            &app,
            &tokens["viewer"],
            Method::GET,
            "/api/v1/apps/crm/records/lead?count=true",
            None,
        )
        .await;
        assert_eq!(page["total"], json!(4));
        let (s, body) = with(
            &app,
            &tokens["viewer"],
            Method::POST,
            "/api/v1/apps/crm/records/lead",
            Some(json!({"name": "v"})),
        )
        .await;
        assert_eq!(
            (s, body["code"].clone()),
            (StatusCode::FORBIDDEN, json!("forbidden"))
        );
        // A user without a role does not see the app at all.
        let (_, apps) = with(&app, &tokens["outsider"], Method::GET, "/api/v1/apps", None).await;
        assert_eq!(apps["apps"], json!([]));
        for path in [
            "/api/v1/apps/crm",
            "/api/v1/apps/crm/records/lead",
            "/api/v1/apps/crm/entities/lead/schema",
            "/api/v1/apps/crm/versions",
        ] {
            assert_eq!(
                with(&app, &tokens["outsider"], Method::GET, path, None)
                    .await
                    .0,
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
        // Members are managed by app administrators only; unknown roles are refused.
        assert_eq!(
            with(
                &app,
                &tokens["boss"],
                Method::GET,
                "/api/v1/apps/crm/members",
                None
            )
            .await
            .0,
            StatusCode::NOT_FOUND
        );
        let (s, body) = app
            .call(
                Method::PUT,
                &format!("/api/v1/apps/crm/members/{}", ids["outsider"]),
                Some(json!({"role": "king"})),
            )
            .await;
        assert_eq!(
            (s, body["errors"][0]["path"].clone()),
            (StatusCode::UNPROCESSABLE_ENTITY, json!("/role"))
        );
        let (_, members) = app
            .call(Method::GET, "/api/v1/apps/crm/members", None)
            .await;
        assert_eq!(members["members"].as_array().unwrap().len(), 5);
        app.stop().await;
    }
}
