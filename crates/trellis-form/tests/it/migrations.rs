//! Schema evolution: plans, destructive changes, tightening checked against the data, versions.

use crate::common::{count, create, install, t0, zoo_def};
use serde_json::{json, Value};
use trellis_form::apps::{self, ImportOptions};
use trellis_form::plan::StepKind;
use trellis_form::testing;
use trellis_form::FormError;

fn with_thing_fields(mut def: Value, edit: impl FnOnce(&mut Vec<Value>)) -> Value {
    let fields = def["entities"][1]["fields"].as_array_mut().unwrap();
    edit(fields);
    def
}

/// Import `def`, destructive steps allowed.
async fn import_allowing_loss(
    db: &trellis_form::db::Db,
    def: &Value,
    admin: uuid::Uuid,
) -> trellis_form::Result<apps::ImportOutcome> {
    let opts = ImportOptions {
        allow_destructive: true,
        dry_run: false,
    };
    apps::import(db, def, opts, Some(admin), t0()).await
}

fn kinds(p: &trellis_form::plan::Plan) -> Vec<(StepKind, Option<String>, bool)> {
    p.steps
        .iter()
        .map(|s| (s.kind, s.field.clone(), s.destructive))
        .collect()
}

#[tokio::test]
async fn first_import_creates_every_entity_and_unchanged_imports_do_nothing() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        assert_eq!(app.version, 1);
        let v = apps::versions(&t.db, "zoo").await.unwrap();
        assert_eq!(v.len(), 1);
        let steps: Vec<&str> = v[0].plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["kind"].as_str().unwrap())
            .collect();
        assert_eq!(steps, ["create_entity", "create_entity", "create_entity"]);
        let out = apps::import(
            &t.db,
            &zoo_def(),
            ImportOptions::default(),
            Some(admin),
            t0(),
        )
        .await
        .unwrap();
        assert!(!out.applied && out.plan.steps.is_empty() && out.version == 1);
        assert_eq!(apps::versions(&t.db, "zoo").await.unwrap().len(), 1);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn additive_changes_apply_and_are_versioned() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        create(
            &t.db,
            &app,
            "thing",
            json!({"title": "old", "color": "red"}),
            admin,
        )
        .await
        .unwrap();
        let mut def = with_thing_fields(zoo_def(), |fields| {
            fields.push(json!({"key": "size", "type": "integer", "required": true, "default": 7}));
            fields.push(json!({"key": "nick", "type": "text", "indexed": true}));
            // Relax: title no longer required, more options, longer text.
            fields[0] = json!({"key": "title", "type": "text", "max_length": 50});
            fields[11]["options"]
                .as_array_mut()
                .unwrap()
                .push(json!({"key": "green"}));
        });
        def["entities"]
            .as_array_mut()
            .unwrap()
            .push(json!({"key": "extra", "fields": [{"key": "x", "type": "text"}]}));
        let (_, _, plan) = apps::plan_import(&t.db, &def).await.unwrap();
        assert_eq!(
            kinds(&plan),
            [
                (StepKind::UpdateField, Some("title".into()), false),
                (StepKind::UpdateField, Some("color".into()), false),
                (StepKind::AddField, Some("size".into()), false),
                (StepKind::AddField, Some("nick".into()), false),
                (StepKind::CreateEntity, None, false),
            ]
        );
        insta::allow_duplicates! { insta::assert_snapshot!(plan.render(), @r"
        + update_field   update `thing.title` (labels, options, bounds or pipeline settings; existing records are not re-checked)
        + update_field   update `thing.color` (labels, options, bounds or pipeline settings; existing records are not re-checked)
        + add_field      add field `thing.size` (integer)
        + add_field      add field `thing.nick` (text)
        + create_entity  create entity `extra` (1 fields)
        ") };
        let out = apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0())
            .await
            .unwrap();
        assert!(out.applied);
        assert_eq!(out.version, 2);
        let app = apps::load(&t.db, "zoo").await.unwrap().unwrap();
        // The new required field was backfilled with its default.
        let page =
            trellis_form::query::list(&t.db, app.entity("thing").unwrap(), &Default::default())
                .await
                .unwrap();
        assert_eq!(page.records[0].fields["size"], json!(7));
        create(
            &t.db,
            &app,
            "thing",
            json!({"color": "green", "nick": "n"}),
            admin,
        )
        .await
        .unwrap();
        create(&t.db, &app, "extra", json!({"x": "y"}), admin)
            .await
            .unwrap();
        assert_eq!(
            apps::versions(&t.db, "zoo")
                .await
                .unwrap()
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            [2, 1]
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn destructive_changes_need_the_flag() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        create(
            &t.db,
            &app,
            "thing",
            json!({"title": "keep", "notes": "n", "count": 3, "color": "blue"}),
            admin,
        )
        .await
        .unwrap();
        let mut def = with_thing_fields(zoo_def(), |fields| {
            fields.retain(|f| f["key"] != "notes");
            fields[1] = json!({"key": "count", "type": "text"});
            fields.iter_mut().find(|f| f["key"] == "color").unwrap()["options"] =
                json!([{"key": "red"}]);
        });
        def["entities"]
            .as_array_mut()
            .unwrap()
            .retain(|e| e["key"] != "deal");
        let e = apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0())
            .await
            .unwrap_err();
        let FormError::Destructive(ps) = e else {
            panic!("{e:?}")
        };
        let msgs: Vec<&str> = ps.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(ps.len(), 4, "{msgs:?}");
        // Nothing changed.
        assert_eq!(apps::load(&t.db, "zoo").await.unwrap().unwrap().version, 1);
        assert_eq!(count(&t.db, "zoo__deal", "").await, 0);
        let out = apps::import(
            &t.db,
            &def,
            ImportOptions {
                allow_destructive: true,
                dry_run: true,
            },
            Some(admin),
            t0(),
        )
        .await
        .unwrap();
        assert!(!out.applied);
        assert_eq!(apps::load(&t.db, "zoo").await.unwrap().unwrap().version, 1);
        let out = import_allowing_loss(&t.db, &def, admin).await.unwrap();
        assert!(out.applied);
        let kinds: Vec<StepKind> = out.plan.steps.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                StepKind::ChangeType,
                StepKind::RemoveOption,
                StepKind::DropField,
                StepKind::DropEntity
            ]
        );
        let app = apps::load(&t.db, "zoo").await.unwrap().unwrap();
        let r =
            &trellis_form::query::list(&t.db, app.entity("thing").unwrap(), &Default::default())
                .await
                .unwrap()
                .records[0];
        assert_eq!(
            r.fields["count"],
            Value::Null,
            "a changed type drops the old values"
        );
        assert!(!r.fields.contains_key("notes"));
        assert_eq!(r.fields["title"], json!("keep"));
        t.cleanup().await;
    }
}

#[tokio::test]
async fn tightening_is_checked_against_existing_data() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        create(
            &t.db,
            &app,
            "thing",
            json!({"title": "a", "phone": "123456"}),
            admin,
        )
        .await
        .unwrap();
        create(
            &t.db,
            &app,
            "thing",
            json!({"title": "b", "phone": "123456"}),
            admin,
        )
        .await
        .unwrap();
        // Unique on a column with duplicates.
        let def = with_thing_fields(zoo_def(), |fields| fields[9]["unique"] = json!(true));
        let e = apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FormError::MigrationConflict(ps) if ps[0].code == "duplicates"),
            "{e:?}"
        );
        // Required without a default, on rows that have no value.
        let def = with_thing_fields(zoo_def(), |fields| fields[2]["required"] = json!(true));
        let e = apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0())
            .await
            .unwrap_err();
        let FormError::MigrationConflict(ps) = e else {
            panic!()
        };
        assert!(ps[0].message.contains("(2 record(s))"), "{}", ps[0].message);
        // A new required field without default on a non-empty table.
        let def = with_thing_fields(zoo_def(), |fields| {
            fields.push(json!({"key": "must", "type": "text", "required": true}))
        });
        assert!(matches!(
            apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0()).await,
            Err(FormError::MigrationConflict(_))
        ));
        assert_eq!(apps::load(&t.db, "zoo").await.unwrap().unwrap().version, 1);
        // Removing a stage still in use is refused even with the flag.
        create(&t.db, &app, "deal", json!({"name": "d"}), admin)
            .await
            .unwrap();
        let mut def = zoo_def();
        def["entities"][2]["fields"][4]["stages"]
            .as_array_mut()
            .unwrap()
            .remove(0);
        def["entities"][2]["fields"][4]["default"] = json!("won");
        let e = import_allowing_loss(&t.db, &def, admin).await.unwrap_err();
        assert!(
            matches!(&e, FormError::MigrationConflict(ps) if ps[0].message.contains("still in stage `new`")),
            "{e:?}"
        );
        // An invalid definition is refused before anything is planned.
        let mut def = zoo_def();
        def["entities"][1]["fields"][0]["type"] = json!("integer");
        def["entities"][1]["fields"][0]["max_length"] = json!(3);
        assert!(matches!(
            apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0()).await,
            Err(FormError::Definition(_))
        ));
        t.cleanup().await;
    }
}

/// The names of the indexes on `table` that cover several columns, with their columns.
async fn compound_indexes(db: &trellis_form::db::Db, table: &str) -> Vec<(String, String)> {
    use trellis_form::db::{Backend, Sql, Value};
    use trellis_form::model::ColKind;
    let mut sql = Sql::new(match db.backend() {
        Backend::Sqlite => {
            "SELECT m.\"name\", group_concat(i.\"name\", ',') FROM sqlite_master m, \
             pragma_index_info(m.\"name\") i WHERE m.\"type\" = 'index' AND m.\"tbl_name\" = "
        }
        Backend::Postgres => {
            "SELECT c.relname, string_agg(a.attname, ',' ORDER BY k.n) FROM pg_index x \
             JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
             CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum WHERE t.relname = "
        }
    });
    sql.bind(Value::Text(table.to_owned()));
    sql.push(" GROUP BY 1 HAVING COUNT(*) > 1 ORDER BY 2");
    db.fetch_all(&sql, &[ColKind::Text, ColKind::Text])
        .await
        .unwrap()
        .into_iter()
        .map(|r| match (&r[0], &r[1]) {
            (Value::Text(n), Value::Text(c)) => (n.clone(), c.clone()),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn indexes_over_several_columns_are_created_rebuilt_and_dropped() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        create(
            &t.db,
            &app,
            "thing",
            json!({"title": "a", "count": 3, "color": "red"}),
            admin,
        )
        .await
        .unwrap();
        let mut def = zoo_def();
        def["entities"][1]["indexes"] =
            json!([{"columns": ["color", "count"]}, {"columns": ["created_at", "title"]}]);
        let out = apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0())
            .await
            .unwrap();
        assert_eq!(
            kinds(&out.plan),
            [
                (StepKind::AddIndex, None, false),
                (StepKind::AddIndex, None, false)
            ]
        );
        assert_eq!(out.plan.steps[0].path, "/entities/1");
        let ix = trellis_form::plan::index_name("zoo__thing", "color,count", false);
        assert_eq!(
            compound_indexes(&t.db, "zoo__thing").await,
            [
                (ix.clone(), "color,count".to_owned()),
                (
                    trellis_form::plan::index_name("zoo__thing", "created_at,title", false),
                    "created_at,title".to_owned()
                ),
            ]
        );
        // `count` becomes text: its column is dropped and re-created, so the index over it
        // is dropped first and made again last; the other index stays.
        let mut changed = with_thing_fields(def.clone(), |fields| {
            fields[2] = json!({"key": "count", "type": "text"});
        });
        changed["entities"][1]["indexes"] = def["entities"][1]["indexes"].clone();
        let out = import_allowing_loss(&t.db, &changed, admin).await.unwrap();
        assert_eq!(
            kinds(&out.plan),
            [
                (StepKind::DropIndex, None, false),
                (StepKind::ChangeType, Some("count".into()), true),
                (StepKind::AddIndex, None, false),
            ]
        );
        assert_eq!(
            out.plan.render(),
            "+ drop_index     drop the index of `thing` on (color, count)\n\
             ! change_type    change `thing.count` from integer to text: its current values are DROPPED\n\
             + add_index      index `thing` on (color, count)\n"
        );
        assert_eq!(compound_indexes(&t.db, "zoo__thing").await.len(), 2);
        // Indexes removed from the definition are dropped; the records stay.
        changed["entities"][1]
            .as_object_mut()
            .unwrap()
            .remove("indexes");
        let out = apps::import(&t.db, &changed, ImportOptions::default(), Some(admin), t0())
            .await
            .unwrap();
        assert_eq!(
            kinds(&out.plan),
            [
                (StepKind::DropIndex, None, false),
                (StepKind::DropIndex, None, false)
            ]
        );
        assert!(compound_indexes(&t.db, "zoo__thing").await.is_empty());
        assert_eq!(count(&t.db, "zoo__thing", "").await, 1);
        t.cleanup().await;
    }
}

/// A relation pointed at another entity has its column re-created, so an index over it is
/// dropped first and made again last; a type change that keeps the values (email to text)
/// leaves the index alone.
#[tokio::test]
async fn indexes_over_several_columns_follow_retargeted_relations_and_survive_kept_values() {
    for t in testing::each().await {
        let (_, admin) = install(&t.db, &zoo_def()).await;
        let mut def = zoo_def();
        def["entities"][1]["indexes"] =
            json!([{"columns": ["account", "title"]}, {"columns": ["email", "title"]}]);
        apps::import(&t.db, &def, ImportOptions::default(), Some(admin), t0())
            .await
            .unwrap();
        let mut changed = with_thing_fields(def.clone(), |fields| {
            let i = fields.iter().position(|f| f["key"] == "account").unwrap();
            fields[i] = json!({"key": "account", "type": "relation", "entity": "deal"});
            let i = fields.iter().position(|f| f["key"] == "email").unwrap();
            fields[i] = json!({"key": "email", "type": "text", "unique": true});
        });
        changed["entities"][1]["indexes"] = def["entities"][1]["indexes"].clone();
        let out = import_allowing_loss(&t.db, &changed, admin).await.unwrap();
        assert_eq!(
            kinds(&out.plan),
            [
                (StepKind::DropIndex, None, false),
                (StepKind::UpdateField, Some("email".into()), false),
                (StepKind::ChangeType, Some("account".into()), true),
                (StepKind::AddIndex, None, false),
            ]
        );
        assert_eq!(
            out.plan.steps[0].description,
            "drop the index of `thing` on (account, title)"
        );
        assert_eq!(
            compound_indexes(&t.db, "zoo__thing").await,
            [
                (
                    trellis_form::plan::index_name("zoo__thing", "account,title", false),
                    "account,title".to_owned()
                ),
                (
                    trellis_form::plan::index_name("zoo__thing", "email,title", false),
                    "email,title".to_owned()
                ),
            ]
        );
        t.cleanup().await;
    }
}
