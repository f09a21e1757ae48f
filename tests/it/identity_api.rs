//! Logins, sessions, personal tokens with scopes, expiry and revocation, throttling.

use crate::helpers::{json, with, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn login(app: &TestApp, email: &str, password: &str) -> (StatusCode, Value) {
    let r = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    json(r).await
}

#[tokio::test]
async fn users_log_in_and_tokens_obey_scope_expiry_and_revocation() {
    for app in TestApp::each().await {
        let be = app.backend;
        // The admin creates a rep with a password; short passwords are refused.
        let (s, body) = app
            .call(
                Method::POST,
                "/api/v1/users",
                Some(json!({"name": "Rep", "email": "rep@x.example", "password": "short"})),
            )
            .await;
        assert_eq!(
            (s, body["errors"][0]["path"].clone()),
            (StatusCode::UNPROCESSABLE_ENTITY, json!("/password")),
            "{be}"
        );
        let (s, rep) = app.call(Method::POST, "/api/v1/users", Some(json!({"name": "Rep", "email": "rep@x.example", "password": "correct horse battery"}))).await;
        assert_eq!(s, StatusCode::CREATED, "{be}: {rep}");
        let (s, _) = app
            .call(
                Method::PUT,
                &format!("/api/v1/apps/crm/members/{}", rep["id"].as_str().unwrap()),
                Some(json!({"role": "sales_rep"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        // Wrong password, unknown email: the same 401.
        assert_eq!(
            login(&app, "rep@x.example", "wrong password!").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            login(&app, "nobody@x.example", "correct horse battery")
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        let (s, session) = login(&app, "REP@x.example", "correct horse battery").await;
        assert_eq!(
            (s, session["scope"].clone()),
            (StatusCode::OK, json!("write")),
            "{be}: {session}"
        );
        let rep_token = session["token"].as_str().unwrap().to_owned();
        // The session reads and writes records, but cannot administer.
        assert_eq!(
            with(
                &app,
                &rep_token,
                Method::GET,
                "/api/v1/apps/crm/records/lead",
                None
            )
            .await
            .0,
            StatusCode::OK
        );
        assert_eq!(
            with(
                &app,
                &rep_token,
                Method::POST,
                "/api/v1/apps/crm/records/lead",
                Some(json!({"name": "L"}))
            )
            .await
            .0,
            StatusCode::CREATED
        );
        assert_eq!(
            with(
                &app,
                &rep_token,
                Method::POST,
                "/api/v1/users",
                Some(json!({"name": "X", "email": "x@x.example"}))
            )
            .await
            .0,
            StatusCode::NOT_FOUND
        );
        // A personal read token: reads, cannot write; a rep cannot mint an admin token.
        let (s, body) = with(
            &app,
            &rep_token,
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "ci", "scope": "admin"})),
        )
        .await;
        assert_eq!(
            (s, body["errors"][0]["path"].clone()),
            (StatusCode::UNPROCESSABLE_ENTITY, json!("/scope"))
        );
        let (s, read) = with(
            &app,
            &rep_token,
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "reporting", "scope": "read", "expires_in_days": 30})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{read}");
        let read_token = read["token"].as_str().unwrap().to_owned();
        assert_eq!(
            with(
                &app,
                &read_token,
                Method::GET,
                "/api/v1/apps/crm/records/lead",
                None
            )
            .await
            .0,
            StatusCode::OK
        );
        let (s, body) = with(
            &app,
            &read_token,
            Method::POST,
            "/api/v1/apps/crm/records/lead",
            Some(json!({"name": "L2"})),
        )
        .await;
        assert_eq!(
            (s, body["code"].clone()),
            (StatusCode::FORBIDDEN, json!("forbidden"))
        );
        // Tokens are listed without their secret; the rep sees only their own.
        let (_, list) = with(
            &app,
            &rep_token,
            Method::GET,
            "/api/v1/tokens?all=true",
            None,
        )
        .await;
        let tokens = list["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 2, "{be}: {list}");
        assert!(tokens
            .iter()
            .all(|t| t["user_id"] == rep["id"] && t.get("token").is_none()));
        // Someone else's token is not there for the rep; the admin's is revocable only by the admin.
        let (_, all) = app.call(Method::GET, "/api/v1/tokens?all=true", None).await;
        let admin_token_id = all["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["user_id"] != rep["id"])
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            with(
                &app,
                &rep_token,
                Method::DELETE,
                &format!("/api/v1/tokens/{admin_token_id}"),
                None
            )
            .await
            .0,
            StatusCode::NOT_FOUND
        );
        // Revocation takes effect on the next request.
        assert_eq!(
            with(
                &app,
                &rep_token,
                Method::DELETE,
                &format!("/api/v1/tokens/{}", read["id"].as_str().unwrap()),
                None
            )
            .await
            .0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            with(
                &app,
                &read_token,
                Method::GET,
                "/api/v1/apps/crm/records/lead",
                None
            )
            .await
            .0,
            StatusCode::UNAUTHORIZED
        );
        // An expired token no longer works.
        let rep_id = uuid::Uuid::parse_str(rep["id"].as_str().unwrap()).unwrap();
        let past =
            trellis_form::Clock::now(&trellis_form::SystemClock) - chrono::Duration::hours(1);
        let mut tx = app.db.db.begin().await.unwrap();
        let (expired, _) = trellis_server::identity::create_token(
            &mut tx,
            rep_id,
            "old",
            "api",
            trellis_server::identity::Scope::Write,
            Some(past),
            past - chrono::Duration::days(1),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            with(
                &app,
                &expired,
                Method::GET,
                "/api/v1/apps/crm/records/lead",
                None
            )
            .await
            .0,
            StatusCode::UNAUTHORIZED
        );
        // A deactivated user's session stops at once.
        let (s, _) = app
            .call(
                Method::PATCH,
                &format!("/api/v1/users/{rep_id}"),
                Some(json!({"active": false})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            with(
                &app,
                &rep_token,
                Method::GET,
                "/api/v1/apps/crm/records/lead",
                None
            )
            .await
            .0,
            StatusCode::UNAUTHORIZED
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn repeated_failed_logins_are_throttled() {
    let app = TestApp::start(trellis_form::testing::sqlite().await).await;
    app.call(
        Method::POST,
        "/api/v1/users",
        Some(json!({"name": "T", "email": "t@x.example", "password": "the right password"})),
    )
    .await;
    for _ in 0..trellis_server::identity::MAX_FAILURES {
        assert_eq!(
            login(&app, "t@x.example", "not the password").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let r = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": "t@x.example", "password": "the right password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0 && retry <= 15 * 60, "{retry}");
    assert_eq!(json(r).await.1["code"], "too_many_requests");
    // Another email is not affected.
    app.call(
        Method::POST,
        "/api/v1/users",
        Some(json!({"name": "U", "email": "u@x.example", "password": "another good one"})),
    )
    .await;
    assert_eq!(
        login(&app, "u@x.example", "another good one").await.0,
        StatusCode::OK
    );
    app.stop().await;
}
