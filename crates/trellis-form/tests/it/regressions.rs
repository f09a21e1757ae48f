//! Regression tests for defects found in review.

use crate::common::{create, ctx, install, problems, t0, zoo_def};
use serde_json::json;
use trellis_form::apps::{self, ImportOptions};
use trellis_form::compile::{compile, parse};
use trellis_form::plan::StepKind;
use trellis_form::query::{list, Filter, ListQuery};
use trellis_form::store;
use trellis_form::testing;
use trellis_form::FormError;

fn small() -> serde_json::Value {
    json!({"key": "r", "entities": [
        {"key": "acc", "fields": [{"key": "name", "type": "text"}]},
        {"key": "item", "fields": [
            {"key": "payload", "type": "json", "required": true},
            {"key": "acc", "type": "relation", "entity": "acc", "unique": true},
            {"key": "mail", "type": "email", "max_length": 10},
            {"key": "kind", "type": "select", "required": true, "options": [{"key": "a"}, {"key": "b"}]}
        ]}
    ]})
}

#[tokio::test]
async fn required_json_unique_relations_and_email_lengths() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &small()).await;
        let e = create(
            &t.db,
            &app,
            "item",
            json!({"mail": "abcdefghijk@x.example", "payload": null}),
            admin,
        )
        .await
        .unwrap_err();
        // One problem per missing value: a null required select is "required", not also "unknown option".
        assert_eq!(
            problems(e),
            [
                ("/kind".to_owned(), "required"),
                ("/mail".to_owned(), "too_long"),
                ("/payload".to_owned(), "required")
            ]
        );
        let acc = create(&t.db, &app, "acc", json!({"name": "A"}), admin)
            .await
            .unwrap();
        create(
            &t.db,
            &app,
            "item",
            json!({"payload": {}, "kind": "a", "acc": acc.meta.id.to_string()}),
            admin,
        )
        .await
        .unwrap();
        let e = create(
            &t.db,
            &app,
            "item",
            json!({"payload": [], "kind": "b", "acc": acc.meta.id.to_string()}),
            admin,
        )
        .await
        .unwrap_err();
        assert_eq!(problems(e), [("/acc".to_owned(), "unique")]);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn inactive_users_cannot_own_records_and_stale_writes_are_409_first() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let mut tx = t.db.begin().await.unwrap();
        let gone = trellis_form::users::create(
            &mut tx,
            &trellis_form::users::UserInput {
                name: Some("Gone".into()),
                email: Some("gone@x.example".into()),
                active: Some(false),
                ..Default::default()
            },
            t0(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let e = create(
            &t.db,
            &app,
            "deal",
            json!({"name": "d", "owner": gone.id.to_string()}),
            admin,
        )
        .await
        .unwrap_err();
        assert_eq!(problems(e), [("/owner".to_owned(), "not_found")]);
        let r = create(&t.db, &app, "deal", json!({"name": "d"}), admin)
            .await
            .unwrap();
        let mut tx = t.db.begin().await.unwrap();
        let e = store::update(
            &mut tx,
            &app,
            app.entity("deal").unwrap(),
            r.meta.id,
            &json!({"name": 5}),
            Some(7),
            &ctx(admin),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                e,
                FormError::VersionConflict {
                    expected: 7,
                    current: 1
                }
            ),
            "{e:?}"
        );
        drop(tx);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn filters_are_read_by_type_but_not_held_to_write_rules() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        create(
            &t.db,
            &app,
            "thing",
            json!({"title": "a", "price": "5", "tags": ["a"]}),
            admin,
        )
        .await
        .unwrap();
        let thing = app.entity("thing").unwrap();
        let q = |field: &str, op: &str, value: serde_json::Value| ListQuery {
            filters: vec![Filter {
                field: field.into(),
                op: op.into(),
                value,
            }],
            ..Default::default()
        };
        // price has min 0 and scale 2; a filter may still ask about -1.005.
        assert_eq!(
            list(&t.db, thing, &q("price", "gte", json!("-1.005")))
                .await
                .unwrap()
                .records
                .len(),
            1
        );
        assert_eq!(
            list(&t.db, thing, &q("price", "gt", json!({"amount": "5"})))
                .await
                .unwrap()
                .records
                .len(),
            0
        );
        let e = list(&t.db, thing, &q("title", "eq", json!(null)))
            .await
            .unwrap_err();
        assert_eq!(problems(e), [("/filters/0/value".to_owned(), "bad_value")]);
        let e = list(&t.db, thing, &q("tags", "contains", json!("zzz")))
            .await
            .unwrap_err();
        assert_eq!(problems(e), [("/filters/0/value".to_owned(), "bad_value")]);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn select_to_text_keeps_values_without_a_destructive_step() {
    for t in testing::each().await {
        let (_, admin) = install(&t.db, &zoo_def()).await;
        let mut def = zoo_def();
        def["entities"][1]["fields"][11] = json!({"key": "color", "type": "text"});
        let (_, _, plan) = apps::plan_import(&t.db, &def).await.unwrap();
        let steps: Vec<(StepKind, bool, String)> = plan
            .steps
            .iter()
            .map(|s| (s.kind, s.destructive, s.path.clone()))
            .collect();
        assert_eq!(
            steps,
            [(
                StepKind::UpdateField,
                false,
                "/entities/1/fields/11".to_owned()
            )]
        );
        assert!(
            apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0())
                .await
                .unwrap()
                .applied
        );
        t.cleanup().await;
    }
}

#[test]
fn long_stage_column_names_and_malformed_paths_are_definition_errors() {
    let field = "a_rather_long_pipeline_field_key_abcdefg"; // 40 characters
    let def = json!({"key": "x", "entities": [{"key": "e", "fields": [
        {"key": field, "type": "stage", "stages": [{"key": "negotiation_phase_a", "probability": 0.5}]}
    ]}]});
    let e = parse(&def).and_then(|d| compile(d, 1)).unwrap_err();
    assert_eq!(
        problems(e),
        [("/entities/0/fields/0/stages/0/key".to_owned(), "too_long")]
    );
    let def = json!({"key": "x", "entities": [{"key": "e", "fields": [{"key": "a", "type": "text"}, {"key": "b", "type": "colour"}]}]});
    let e = parse(&def).unwrap_err();
    assert_eq!(
        problems(e),
        [("/entities/0/fields/1/type".to_owned(), "malformed")]
    );
}

#[tokio::test]
async fn a_team_upsert_changes_only_what_was_sent() {
    let t = testing::sqlite().await;
    let mut tx = t.db.begin().await.unwrap();
    let input = trellis_form::users::TeamInput {
        key: Some("east".into()),
        name: Some("East region".into()),
        ..Default::default()
    };
    trellis_form::users::upsert_team(&mut tx, &input, t0())
        .await
        .unwrap();
    trellis_form::users::upsert_team(
        &mut tx,
        &trellis_form::users::TeamInput {
            key: Some("east".into()),
            ..Default::default()
        },
        t0(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        trellis_form::users::teams(&t.db).await.unwrap()[0].name,
        "East region"
    );
    t.cleanup().await;
}
