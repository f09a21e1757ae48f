//! Formula fields: computed on every write, stored, filterable; sandboxed.

use crate::common::{create, ctx, install, problems};
use serde_json::{json, Value};
use trellis_form::compile::{compile, parse};
use trellis_form::query::{list, Filter, ListQuery};
use trellis_form::{store, testing};

fn def() -> Value {
    json!({"key": "f", "timezone": "Asia/Shanghai", "entities": [{"key": "deal", "fields": [
        {"key": "name", "type": "text", "required": true},
        {"key": "region", "type": "text"},
        {"key": "amount", "type": "money"},
        {"key": "count", "type": "integer"},
        {"key": "close", "type": "date"},
        {"key": "tax", "type": "formula", "formula": "amount * 0.13", "result": "decimal", "scale": 2},
        {"key": "per_unit", "type": "formula", "formula": "amount / count", "result": "decimal", "scale": 4},
        {"key": "days_left", "type": "formula", "formula": "days_between(today, close)", "result": "integer"},
        {"key": "title", "type": "formula", "formula": "name + \" (\" + region + \")\"", "result": "text"},
        {"key": "big", "type": "formula", "formula": "tax > 100", "result": "boolean"},
        {"key": "blowup", "type": "formula", "formula": "if count == 99 { \"x\".pad(1000000, \"y\") } else { \"ok\" }", "result": "text"}
    ]}]})
}

#[tokio::test]
async fn formulas_are_computed_on_every_write_and_stored() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &def()).await;
        let deal = app.entity("deal").unwrap();
        let r = create(&t.db, &app, "deal", json!({"name": "A", "region": "east", "amount": "1000.10", "count": 4, "close": "2026-03-12"}), admin).await.unwrap();
        let j = r.to_json();
        // 1000.10 × 0.13 = 130.013 exactly (no float), stored with scale 2.
        assert_eq!(j["tax"], json!("130.01"), "{}", t.backend);
        assert_eq!(j["per_unit"], json!("250.0250"));
        // The test clock says 2026-03-02 09:00 UTC, which is 17:00 that day in Shanghai.
        assert_eq!(j["days_left"], json!(10));
        assert_eq!(j["title"], json!("A (east)"));
        assert_eq!(j["big"], json!(true));
        // Arithmetic on empty inputs gives an empty result, not an error; comparing an empty
        // value is false (rhai compares values of different types as unequal).
        let r2 = create(&t.db, &app, "deal", json!({"name": "B"}), admin)
            .await
            .unwrap()
            .to_json();
        assert_eq!(
            (
                r2["tax"].clone(),
                r2["days_left"].clone(),
                r2["big"].clone()
            ),
            (Value::Null, Value::Null, json!(false))
        );
        // An update recomputes; formulas are read-only.
        let mut tx = t.db.begin().await.unwrap();
        let u = store::update(
            &mut tx,
            &app,
            deal,
            r.meta.id,
            &json!({"amount": "10"}),
            None,
            &ctx(admin),
        )
        .await
        .unwrap()
        .to_json();
        tx.commit().await.unwrap();
        assert_eq!(
            (u["tax"].clone(), u["big"].clone()),
            (json!("1.30"), json!(false))
        );
        let e = create(&t.db, &app, "deal", json!({"name": "C", "tax": "5"}), admin)
            .await
            .unwrap_err();
        assert_eq!(problems(e), [("/tax".to_owned(), "read_only")]);
        // A formula that fails at run time is a validation error naming the field; nothing is written.
        let e = create(
            &t.db,
            &app,
            "deal",
            json!({"name": "D", "amount": "5", "count": 0}),
            admin,
        )
        .await
        .unwrap_err();
        let ps = problems(e);
        assert_eq!(ps, [("/per_unit".to_owned(), "formula")]);
        // A runaway formula stops at the sandbox's limits.
        let e = create(
            &t.db,
            &app,
            "deal",
            json!({"name": "E", "count": 99}),
            admin,
        )
        .await
        .unwrap_err();
        assert_eq!(problems(e), [("/blowup".to_owned(), "formula")]);
        // Stored in a real column: filters and sorts use it.
        let q = ListQuery {
            filters: vec![Filter {
                field: "tax".into(),
                op: "gt".into(),
                value: json!("1"),
            }],
            ..Default::default()
        };
        let names: Vec<Value> = list(&t.db, deal, &q)
            .await
            .unwrap()
            .records
            .iter()
            .map(|r| r.fields["name"].clone())
            .collect();
        assert_eq!(names, [json!("A")]);
        t.cleanup().await;
    }
}

#[test]
fn formula_definition_errors() {
    let bad = json!({"key": "f", "entities": [{"key": "e", "fields": [
        {"key": "a", "type": "integer"},
        {"key": "syntax", "type": "formula", "formula": "a +* 2"},
        {"key": "unknown", "type": "formula", "formula": "a + ghost"},
        {"key": "missing", "type": "formula"},
        {"key": "misplaced", "type": "integer", "formula": "a + 1"},
        {"key": "required", "type": "formula", "formula": "a", "required": true}
    ]}]});
    let e = parse(&bad).and_then(|d| compile(d, 1)).unwrap_err();
    let got = problems(e);
    for (p, c) in [
        ("/entities/0/fields/1/formula", "bad_formula"),
        ("/entities/0/fields/2/formula", "bad_formula"),
        ("/entities/0/fields/3/formula", "required"),
        ("/entities/0/fields/4/formula", "not_allowed"),
        ("/entities/0/fields/5/required", "not_allowed"),
    ] {
        assert!(
            got.contains(&(p.to_owned(), c)),
            "missing {p} {c} in {got:?}"
        );
    }
}

#[tokio::test]
async fn formulas_may_use_later_formulas_and_never_panic() {
    let def = json!({"key": "g", "entities": [{"key": "e", "fields": [
        {"key": "n", "type": "integer"},
        {"key": "a", "type": "formula", "formula": "b + 1", "result": "integer"},
        {"key": "b", "type": "formula", "formula": "n * 2", "result": "integer"},
        {"key": "d", "type": "formula", "formula": "add_days(\"2026-01-01\", n)", "result": "date"}
    ]}]});
    let t = testing::sqlite().await;
    let (app, admin) = install(&t.db, &def).await;
    let r = create(&t.db, &app, "e", json!({"n": 3}), admin)
        .await
        .unwrap()
        .to_json();
    assert_eq!(
        (r["a"].clone(), r["b"].clone(), r["d"].clone()),
        (json!(7), json!(6), json!("2026-01-04"))
    );
    // A date far out of range is an error naming the field, not a crash.
    let e = create(&t.db, &app, "e", json!({"n": 100_000_000_000i64}), admin)
        .await
        .unwrap_err();
    assert_eq!(problems(e), [("/d".to_owned(), "formula")]);
    t.cleanup().await;
}

#[test]
fn misspelt_functions_are_definition_errors() {
    let def = json!({"key": "f", "entities": [{"key": "e", "fields": [
        {"key": "start", "type": "date"},
        {"key": "x", "type": "formula", "formula": "days_betwen(start, today)", "result": "integer"}
    ]}]});
    let e = parse(&def).and_then(|d| compile(d, 1)).unwrap_err();
    assert_eq!(
        problems(e),
        [("/entities/0/fields/1/formula".to_owned(), "bad_formula")]
    );
}
