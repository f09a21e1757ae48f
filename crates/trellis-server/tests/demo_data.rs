//! `trellis demo-data`: deterministic, consistent generated CRM history with the drill-down
//! story in it, on SQLite and PostgreSQL.

use chrono::{TimeZone, Utc};
use trellis_form::apps::{self, ImportOptions};
use trellis_form::db::{Db, Sql, Value};
use trellis_form::model::ColKind;
use trellis_report::{engine, Query, Reports, Visibility};
use trellis_server::demo_data::{self, Options};
use uuid::Uuid;

async fn count(db: &Db, sql: &str) -> i64 {
    match db.fetch_all(&Sql::new(sql), &[ColKind::Int]).await.unwrap()[0][0] {
        Value::Int(n) => n,
        ref other => panic!("{other:?}"),
    }
}

async fn total(db: &Db, app: &trellis_form::model::App, q: serde_json::Value) -> serde_json::Value {
    let reports = Reports::compile(app).unwrap();
    let q: Query = serde_json::from_value(q).unwrap();
    let now = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    let plan = engine::plan(app, &reports, &q, now, db.backend()).unwrap();
    serde_json::json!(
        engine::run(db, app, &reports, &plan, &Visibility::default())
            .await
            .unwrap()
    )
}

#[tokio::test]
async fn demo_data_is_deterministic_consistent_and_tells_the_east_story() {
    let now = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    for t in trellis_form::testing::each().await {
        let db = &t.db;
        let b = t.backend;
        apps::import(
            db,
            &trellis_server::crm::definition(),
            ImportOptions::default(),
            None,
            now,
        )
        .await
        .unwrap();
        let app = apps::load(db, "crm").await.unwrap().unwrap();
        let opts = Options {
            opportunities: 8000,
            seed: 7,
            now,
            progress: false,
        };
        // (Rollup tables, built after the load, have their own keys.)
        let indexes = if db.backend() == trellis_form::db::Backend::Sqlite {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name NOT LIKE 'rollup%'"
        } else {
            "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() AND tablename NOT LIKE 'rollup%'"
        };
        let before = count(db, indexes).await;
        let sum = demo_data::generate(db, &app, Uuid::nil(), &opts)
            .await
            .unwrap();
        // The plain indexes dropped for the bulk load are all back.
        assert_eq!(count(db, indexes).await, before, "{b}");
        assert!(before > 20, "{b}: {before}");
        assert_eq!(sum.opportunities, 8000, "{b}");
        assert_eq!(
            count(db, "SELECT COUNT(*) FROM \"crm__opportunity\"").await,
            8000,
            "{b}"
        );
        assert_eq!(
            count(db, "SELECT COUNT(*) FROM \"crm__lead\"").await,
            sum.leads as i64,
            "{b}"
        );
        assert_eq!(
            count(
                db,
                "SELECT COUNT(*) FROM \"history\" WHERE \"entity\" = 'opportunity'"
            )
            .await,
            sum.history as i64,
            "{b}"
        );
        // Every opportunity and its lead point at each other; every deal entered mql first.
        assert_eq!(count(db, "SELECT COUNT(*) FROM \"crm__opportunity\" o JOIN \"crm__lead\" l ON l.\"id\" = o.\"lead\" WHERE l.\"converted_opportunity\" = o.\"id\" AND l.\"created_at\" <= o.\"created_at\"").await, 8000, "{b}");
        assert_eq!(count(db, "SELECT COUNT(*) FROM \"crm__opportunity\" WHERE \"stage__entered_mql\" = \"created_at\"").await, 8000, "{b}");
        assert_eq!(count(db, "SELECT COUNT(*) FROM \"crm__opportunity\" WHERE \"stage\" = 'lost' AND \"loss_reason\" IS NULL").await, 0, "{b}");
        // The same seed gives the same data (totals of a fresh run on the same numbers).
        let a = total(
            db,
            &app,
            serde_json::json!({"metrics": ["opportunities", "pipeline_value", "lead_conversion"]}),
        )
        .await;
        assert_eq!(a["totals"]["opportunities"], serde_json::json!(8000), "{b}");
        // The story: east's proposal → quoted conversion fell last quarter, the others did not.
        let story = total(db, &app, serde_json::json!({"metric": "proposal_to_quoted", "group_by": ["region"], "time": {"preset": "last_quarter"}, "compare": "previous_period", "flag": {"metric": "proposal_to_quoted", "change_pct_lte": -30}})).await;
        let rows = story["rows"].as_array().unwrap();
        let flagged: Vec<&str> = rows
            .iter()
            .filter(|r| r["flag"] == true)
            .map(|r| r["region"].as_str().unwrap())
            .collect();
        assert_eq!(flagged, vec!["east"], "{b}: {story}");
        // The CRM's alert fires on it, and its workflow (`funnel_alert`) tells the managers.
        let mut tx = db.begin().await.unwrap();
        let boss = trellis_form::users::create(
            &mut tx,
            &trellis_form::users::UserInput {
                name: Some("Boss".into()),
                email: Some("boss@demo.example".into()),
                ..Default::default()
            },
            now,
        )
        .await
        .unwrap();
        let mut member = Sql::new(
            "INSERT INTO \"app_members\" (\"app\", \"user_id\", \"role\") VALUES ('crm', ",
        );
        member.bind(Value::Uuid(boss.id)).push(", 'manager')");
        tx.execute(&member).await.unwrap();
        tx.commit().await.unwrap();
        let reports = Reports::compile(&app).unwrap();
        let fired = trellis_report::alerts::evaluate(db, &app, &reports, now)
            .await
            .unwrap();
        assert!(
            fired.iter().any(|f| f.alert == "funnel_drop_by_region"),
            "{b}: {fired:?}"
        );
        let flows = trellis_flow::Runtime::new(
            db.clone(),
            std::sync::Arc::new(trellis_form::ManualClock::new(now)),
            trellis_flow::Settings::default(),
        );
        flows
            .install(
                std::sync::Arc::new(apps::load(db, "crm").await.unwrap().unwrap()),
                None,
            )
            .await
            .unwrap();
        flows.dispatch(1000).await.unwrap();
        while flows.work().await.unwrap() > 0 {}
        let mut told =
            Sql::new("SELECT \"title\", \"body\" FROM \"notifications\" WHERE \"user_id\" = ");
        told.bind(Value::Uuid(boss.id));
        let told = db
            .fetch_all(&told, &[ColKind::Text, ColKind::Text])
            .await
            .unwrap();
        assert_eq!(told.len(), 1, "{b}");
        assert_eq!(
            told[0][0],
            Value::Text("Proposal → quoted dropped in a region".into()),
            "{b}"
        );
        let Value::Text(body) = &told[0][1] else {
            panic!("{b}: no body")
        };
        assert!(
            body.starts_with("east: ") && body.contains("% last quarter, was "),
            "{b}: {body}"
        );
        t.cleanup().await;
    }
    // Determinism across databases: two fresh SQLite databases, one seed.
    let mut totals = vec![];
    for _ in 0..2 {
        let t = trellis_form::testing::sqlite().await;
        apps::import(
            &t.db,
            &trellis_server::crm::definition(),
            ImportOptions::default(),
            None,
            now,
        )
        .await
        .unwrap();
        let app = apps::load(&t.db, "crm").await.unwrap().unwrap();
        let opts = Options {
            opportunities: 500,
            seed: 11,
            now,
            progress: false,
        };
        demo_data::generate(&t.db, &app, Uuid::nil(), &opts)
            .await
            .unwrap();
        totals.push(
            total(
                &t.db,
                &app,
                serde_json::json!({"metrics": ["pipeline_value", "win_rate", "leads"]}),
            )
            .await["totals"]
                .clone(),
        );
        t.cleanup().await;
    }
    assert_eq!(totals[0], totals[1]);
}
