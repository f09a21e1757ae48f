//! The HTTP surface as a whole: authentication on every route, the OpenAPI document, problem
//! JSON for malformed requests.

use crate::helpers::{json, TestApp, TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Every route the API must have, as (method, path template).
const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/apps"),
    ("post", "/api/v1/apps"),
    ("get", "/api/v1/apps/{app}"),
    ("put", "/api/v1/apps/{app}"),
    ("get", "/api/v1/apps/{app}/versions"),
    ("get", "/api/v1/apps/{app}/versions/{version}"),
    ("get", "/api/v1/apps/{app}/entities/{entity}/schema"),
    ("get", "/api/v1/apps/{app}/members"),
    ("put", "/api/v1/apps/{app}/members/{id}"),
    ("delete", "/api/v1/apps/{app}/members/{id}"),
    ("get", "/api/v1/apps/{app}/roles"),
    ("get", "/api/v1/apps/{app}/audit"),
    ("get", "/api/v1/audit"),
    ("get", "/api/v1/apps/{app}/records/{entity}"),
    ("post", "/api/v1/apps/{app}/records/{entity}"),
    ("post", "/api/v1/apps/{app}/records/{entity}/query"),
    ("post", "/api/v1/apps/{app}/records/{entity}/batch"),
    ("get", "/api/v1/apps/{app}/records/{entity}/{id}"),
    ("patch", "/api/v1/apps/{app}/records/{entity}/{id}"),
    ("delete", "/api/v1/apps/{app}/records/{entity}/{id}"),
    ("get", "/api/v1/apps/{app}/records/{entity}/{id}/history"),
    ("get", "/api/v1/apps/{app}/reports"),
    ("post", "/api/v1/apps/{app}/reports/query"),
    ("post", "/api/v1/apps/{app}/reports/drill"),
    ("get", "/api/v1/apps/{app}/dashboards/{name}"),
    ("get", "/api/v1/apps/{app}/alerts"),
    ("get", "/api/v1/apps/{app}/workflows"),
    ("post", "/api/v1/apps/{app}/workflows/{key}/run"),
    ("post", "/api/v1/apps/{app}/workflows/{key}/dry-run"),
    ("get", "/api/v1/apps/{app}/runs"),
    ("get", "/api/v1/apps/{app}/runs/{id}"),
    ("get", "/api/v1/apps/{app}/notifications"),
    ("post", "/api/v1/apps/{app}/notifications/{id}/read"),
    ("get", "/api/v1/apps/{app}/outbox"),
    ("get", "/api/v1/apps/{app}/records/{entity}/{id}/documents"),
    ("get", "/api/v1/apps/{app}/documents/{id}"),
    ("get", "/api/v1/apps/{app}/approvals"),
    ("post", "/api/v1/apps/{app}/approvals/{id}/decision"),
    ("post", "/api/v1/apps/{app}/hooks/{name}"),
    ("get", "/api/v1/users"),
    ("post", "/api/v1/users"),
    ("get", "/api/v1/users/{id}"),
    ("patch", "/api/v1/users/{id}"),
    ("get", "/api/v1/teams"),
    ("post", "/api/v1/teams"),
    ("post", "/api/v1/auth/login"),
    ("get", "/api/v1/tokens"),
    ("post", "/api/v1/tokens"),
    ("delete", "/api/v1/tokens/{id}"),
];

fn concrete(path: &str) -> String {
    path.replace("{app}", "crm")
        .replace("{entity}", "lead")
        .replace("{id}", "01900000-0000-7000-8000-000000000000")
        .replace("{version}", "1")
        .replace("{name}", "sales_overview")
}

#[tokio::test]
async fn openapi_lists_every_route_and_every_route_needs_a_token() {
    let app = TestApp::start(trellis_form::testing::sqlite().await).await;
    let (status, doc) = app.call(Method::GET, "/api/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let mut documented: Vec<(String, String)> = vec![];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
        {
            documented.push((method.clone(), path.clone()));
        }
    }
    documented.sort();
    let mut expected: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    expected.sort();
    assert_eq!(
        documented, expected,
        "the OpenAPI document and the route list differ"
    );
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    for (method, path) in &documented {
        if trellis_server::auth::PUBLIC_ROUTES.contains(&path.as_str()) {
            continue;
        }
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let url = app.url(&concrete(path));
        // Without a token: 401 problem JSON.
        let r = app.client.request(m.clone(), &url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        // With a wrong token: 401 too.
        let r = app
            .client
            .request(m.clone(), &url)
            .bearer_auth("nope")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        // With the token the route exists (whatever it answers, it is not the router's fallback).
        let r = app
            .client
            .request(m, &url)
            .bearer_auth(TOKEN)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let (status, body) = json(r).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !body["detail"]
                .as_str()
                .unwrap_or("")
                .contains("no such route"),
            "{method} {path} is not routed"
        );
    }
    // The only public routes answer without a token.
    assert_eq!(
        trellis_server::auth::PUBLIC_ROUTES,
        [
            "/healthz",
            "/api/v1/auth/login",
            "/api/v1/apps/{app}/hooks/{name}"
        ]
    );
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": "x@y.example", "password": "nope-nope-nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        json(r).await.1["code"],
        "unauthorized",
        "a login answers for itself"
    );
    app.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_problem_json() {
    let app = TestApp::start(trellis_form::testing::sqlite().await).await;
    let lead = "/api/v1/apps/crm/records/lead";
    // Malformed JSON.
    let r = app
        .req(Method::POST, lead)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "malformed_json");
    assert_eq!(body["type"], "urn:trellis:problem:malformed_json");
    assert_eq!(body["status"], 400);
    // No content type.
    let r = app.req(Method::POST, lead).body("{}").send().await.unwrap();
    assert_eq!(json(r).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Oversized body (over 2 MiB on a single-record route).
    let big = json!({"name": "x".repeat(3 * 1024 * 1024)});
    let r = app.req(Method::POST, lead).json(&big).send().await.unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload_too_large");
    // Unknown route, unknown app, unknown entity, malformed id.
    for (path, code) in [
        ("/api/v1/nothing", 404),
        ("/api/v1/apps/nope/records/lead", 404),
        ("/api/v1/apps/crm/records/nope", 404),
        ("/api/v1/apps/crm/records/lead/not-a-uuid", 404),
    ] {
        let (status, body) = app.call(Method::GET, path, None).await;
        assert_eq!(status.as_u16(), code, "{path}");
        assert_eq!(body["code"], "not_found", "{path}");
    }
    // Wrong method.
    let (status, body) = app.call(Method::PUT, lead, Some(json!({}))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["code"], "method_not_allowed");
    // A bad query string.
    let (status, body) = app
        .call(Method::GET, &format!("{lead}?limit=many"), None)
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_query"))
    );
    let (status, body) = app
        .call(Method::GET, &format!("{lead}?filter=notjson"), None)
        .await;
    assert_eq!(
        (status, body["errors"][0]["path"].clone()),
        (StatusCode::BAD_REQUEST, json!("/filter"))
    );
    // Nothing was written by any of it.
    let (_, page) = app
        .call(Method::GET, &format!("{lead}?count=true"), None)
        .await;
    assert_eq!(page["total"], 0);
    // Health.
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(json(r).await, (StatusCode::OK, json!({"status": "ok"})));
    let _ = Value::Null;
    app.stop().await;
}

#[tokio::test]
async fn answers_carry_security_headers_and_cors_is_off_by_default() {
    let app = TestApp::start(trellis_form::testing::sqlite().await).await;
    let r = app.req(Method::GET, "/api/v1/apps").send().await.unwrap();
    for (h, v) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ),
    ] {
        assert_eq!(r.headers()[h], v, "{h}");
    }
    let pre = app
        .client
        .request(Method::OPTIONS, app.url("/api/v1/apps"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(pre.headers().get("access-control-allow-origin").is_none());
    app.stop().await;
}

#[tokio::test]
async fn configured_cors_and_per_token_rate_limits() {
    let http = trellis_server::limits::HttpSettings {
        rate_per_second: 1.0,
        burst: 3.0,
        cors_origins: vec!["https://crm.example.com".into()],
        timeout_seconds: 30,
    };
    let app = TestApp::start_with(trellis_form::testing::sqlite().await, http).await;
    let pre = app
        .client
        .request(Method::OPTIONS, app.url("/api/v1/apps"))
        .header("origin", "https://crm.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "https://crm.example.com"
    );
    // A page on that origin may read the headers it needs, a report's row count among them
    // (asked without a token, so the burst below is untouched).
    let r = app
        .client
        .get(app.url("/api/v1/apps"))
        .header("origin", "https://crm.example.com")
        .send()
        .await
        .unwrap();
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for h in [
        "etag",
        "location",
        "retry-after",
        "trellis-row-count",
        "trellis-truncated",
    ] {
        assert!(exposed.contains(h), "{h} in {exposed}");
    }
    // A burst of 3, then 429 with Retry-After, for this token only.
    for _ in 0..3 {
        assert_eq!(
            app.call(Method::GET, "/api/v1/apps", None).await.0,
            StatusCode::OK
        );
    }
    let r = app.req(Method::GET, "/api/v1/apps").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(json(r).await.1["code"], "too_many_requests");
    app.stop().await;
}
