//! App definitions over HTTP: read, import a new version, refuse destructive changes.

use crate::helpers::{problem_paths, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn app_versions_and_destructive_changes() {
    for app in TestApp::each().await {
        let (s, apps) = app.call(Method::GET, "/api/v1/apps", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(apps["apps"][0]["key"], "crm");
        assert_eq!(apps["apps"][0]["version"], 1);
        let (_, crm) = app.call(Method::GET, "/api/v1/apps/crm", None).await;
        let mut def = crm["definition"].clone();
        // Add a field: applied as version 2.
        let lead = def["entities"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|e| e["key"] == "lead")
            .unwrap();
        lead["fields"].as_array_mut().unwrap().push(
            json!({"key": "wechat", "type": "text", "label": {"en": "WeChat", "zh-CN": "微信"}}),
        );
        let (s, out) = app
            .call(
                Method::PUT,
                "/api/v1/apps/crm?dry_run=true",
                Some(def.clone()),
            )
            .await;
        assert_eq!(
            (
                s,
                out["applied"].clone(),
                out["plan"]["steps"][0]["kind"].clone()
            ),
            (StatusCode::OK, json!(false), json!("add_field"))
        );
        let (s, out) = app
            .call(Method::PUT, "/api/v1/apps/crm", Some(def.clone()))
            .await;
        assert_eq!(
            (s, out["applied"].clone(), out["version"].clone()),
            (StatusCode::OK, json!(true), json!(2))
        );
        let (s, _) = app
            .call(
                Method::POST,
                "/api/v1/apps/crm/records/lead",
                Some(json!({"name": "W", "wechat": "w123"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        // Drop it again: refused without the flag, and the field is still there.
        let lead = def["entities"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|e| e["key"] == "lead")
            .unwrap();
        lead["fields"]
            .as_array_mut()
            .unwrap()
            .retain(|f| f["key"] != "wechat");
        let (s, body) = app
            .call(Method::PUT, "/api/v1/apps/crm", Some(def.clone()))
            .await;
        assert_eq!(
            (s, body["code"].clone()),
            (StatusCode::CONFLICT, json!("destructive_change"))
        );
        assert_eq!(
            problem_paths(&body),
            [("/entities/0".to_owned(), "destructive".to_owned())]
        );
        let (_, schema) = app
            .call(Method::GET, "/api/v1/apps/crm/entities/lead/schema", None)
            .await;
        assert!(schema["properties"]["wechat"].is_object());
        let (s, out) = app
            .call(
                Method::PUT,
                "/api/v1/apps/crm?allow_destructive=true",
                Some(def.clone()),
            )
            .await;
        assert_eq!((s, out["version"].clone()), (StatusCode::OK, json!(3)));
        let (_, versions) = app
            .call(Method::GET, "/api/v1/apps/crm/versions", None)
            .await;
        assert_eq!(
            versions["versions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["version"].as_i64().unwrap())
                .collect::<Vec<_>>(),
            [3, 2, 1]
        );
        let (s, v2) = app
            .call(Method::GET, "/api/v1/apps/crm/versions/2", None)
            .await;
        assert_eq!(s, StatusCode::OK);
        assert!(v2["definition"].to_string().contains("wechat"));
        // An invalid definition: every problem with its path; a key mismatch.
        let mut bad = def.clone();
        bad["entities"][0]["fields"][0]["type"] = json!("integer");
        bad["entities"][0]["fields"][0]["max_length"] = json!(5);
        bad["entities"][0]["fields"][4]["options"] = json!([]);
        let (s, body) = app.call(Method::PUT, "/api/v1/apps/crm", Some(bad)).await;
        assert_eq!(
            (s, body["code"].clone()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!("invalid_definition")
            )
        );
        assert_eq!(
            problem_paths(&body),
            [
                (
                    "/entities/0/fields/0/max_length".to_owned(),
                    "not_allowed".to_owned()
                ),
                (
                    "/entities/0/fields/4/options".to_owned(),
                    "required".to_owned()
                )
            ]
        );
        let (s, body) = app.call(Method::PUT, "/api/v1/apps/other", Some(def)).await;
        assert_eq!(
            (s, problem_paths(&body)),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                vec![("/key".to_owned(), "mismatch".to_owned())]
            )
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn a_second_server_on_the_same_database_follows_new_versions() {
    let db = trellis_form::testing::sqlite().await;
    let url = db.url.clone();
    let app = TestApp::start(db).await;
    // A second process on the same database.
    let other_db = trellis_form::db::Db::connect(&url, &Default::default())
        .await
        .unwrap();
    let (other, _) = trellis_server::cli::prepare(
        other_db.clone(),
        std::sync::Arc::new(trellis_form::SystemClock),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(other.app("crm").unwrap().app.version, 1);
    let (_, crm) = app.call(Method::GET, "/api/v1/apps/crm", None).await;
    let mut def = crm["definition"].clone();
    def["entities"][0]["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": "wechat", "type": "text"}));
    let (s, _) = app.call(Method::PUT, "/api/v1/apps/crm", Some(def)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(other.refresh().await.unwrap(), 1);
    assert_eq!(other.app("crm").unwrap().app.version, 2);
    assert!(other
        .app("crm")
        .unwrap()
        .app
        .entity("lead")
        .unwrap()
        .field("wechat")
        .is_some());
    assert_eq!(other.refresh().await.unwrap(), 0);
    other_db.close().await;
    app.stop().await;
}
