//! Listing: every filter operator, sorting, keyset pagination, totals, bad queries.

use crate::common::{create, install, problems, zoo_def};
use serde_json::{json, Value};
use trellis_form::query::{list, Filter, ListQuery};
use trellis_form::testing;

fn f(field: &str, op: &str, value: Value) -> Filter {
    Filter {
        field: field.into(),
        op: op.into(),
        value,
    }
}

#[tokio::test]
async fn every_filter_operator() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let thing = app.entity("thing").unwrap();
        let rows = [
            json!({"title": "Alpha", "count": 1, "ratio": "0.5", "price": "10", "due": "2026-01-01", "color": "red", "tags": ["a"], "active": true, "seen_at": "2026-01-01T00:00:00Z"}),
            json!({"title": "beta 50%", "count": 5, "ratio": "1.25", "price": "20.5", "due": "2026-02-01", "color": "blue", "tags": ["a", "b"], "active": false}),
            json!({"title": "Gamma_x", "count": 10, "ratio": "2", "price": "30", "due": "2026-03-01", "tags": ["c"]}),
            json!({"title": "delta"}),
        ];
        for r in rows {
            create(&t.db, &app, "thing", r, admin).await.unwrap();
        }
        let cases: Vec<(Filter, Vec<&str>)> = vec![
            (f("color", "eq", json!("red")), vec!["Alpha"]),
            (
                f("color", "ne", json!("red")),
                vec!["beta 50%", "Gamma_x", "delta"],
            ),
            (
                f("color", "in", json!(["red", "blue"])),
                vec!["Alpha", "beta 50%"],
            ),
            (f("count", "lt", json!(5)), vec!["Alpha"]),
            (f("count", "lte", json!(5)), vec!["Alpha", "beta 50%"]),
            (f("count", "gt", json!(5)), vec!["Gamma_x"]),
            (f("count", "gte", json!(5)), vec!["beta 50%", "Gamma_x"]),
            (
                f("count", "between", json!([2, 10])),
                vec!["beta 50%", "Gamma_x"],
            ),
            (f("ratio", "gt", json!("1.2")), vec!["beta 50%", "Gamma_x"]),
            (
                f("price", "gte", json!("20.5")),
                vec!["beta 50%", "Gamma_x"],
            ),
            (
                f("due", "between", json!(["2026-01-15", "2026-03-01"])),
                vec!["beta 50%", "Gamma_x"],
            ),
            (
                f("seen_at", "lt", json!("2026-01-01T00:00:01Z")),
                vec!["Alpha"],
            ),
            (f("title", "contains", json!("ALPH")), vec!["Alpha"]),
            (f("title", "contains", json!("50%")), vec!["beta 50%"]),
            (f("title", "contains", json!("a_x")), vec!["Gamma_x"]),
            (f("tags", "contains", json!("a")), vec!["Alpha", "beta 50%"]),
            (f("active", "eq", json!(false)), vec!["beta 50%"]),
            (f("color", "is_null", json!(true)), vec!["Gamma_x", "delta"]),
            (
                f("count", "is_null", json!(false)),
                vec!["Alpha", "beta 50%", "Gamma_x"],
            ),
            (
                f("owner", "eq", json!(admin)),
                vec!["Alpha", "beta 50%", "Gamma_x", "delta"],
            ),
            (
                f("created_at", "gte", json!("2026-03-02T09:00:00Z")),
                vec!["Alpha", "beta 50%", "Gamma_x", "delta"],
            ),
        ];
        for (filter, want) in cases {
            let q = ListQuery {
                filters: vec![filter.clone()],
                count: true,
                ..Default::default()
            };
            let page = list(&t.db, thing, &q).await.unwrap();
            let got: Vec<String> = page
                .records
                .iter()
                .map(|r| r.fields["title"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(got, want, "{}: {filter:?}", t.backend);
            assert_eq!(page.total, Some(want.len() as i64));
        }
        // Two filters combine with AND.
        let q = ListQuery {
            filters: vec![
                f("count", "gte", json!(1)),
                f("tags", "contains", json!("a")),
            ],
            ..Default::default()
        };
        assert_eq!(list(&t.db, thing, &q).await.unwrap().records.len(), 2);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn bad_queries_name_their_problem() {
    for t in testing::each().await {
        let (app, _) = install(&t.db, &zoo_def()).await;
        let thing = app.entity("thing").unwrap();
        let q = ListQuery {
            filters: vec![
                f("ghost", "eq", json!(1)),
                f("count", "like", json!(1)),
                f("count", "eq", json!("many")),
                f("color", "eq", json!("green")),
                f("tags", "lt", json!("a")),
                f("count", "in", json!([])),
                f("count", "between", json!([1])),
                f("active", "gt", json!(true)),
            ],
            sort: Some("nope".into()),
            limit: Some(5000),
            cursor: Some("garbage!".into()),
            count: false,
        };
        let got = problems(list(&t.db, thing, &q).await.unwrap_err());
        let want = [
            ("/filters/0/field", "unknown_field"),
            ("/filters/1/op", "bad_op"),
            ("/filters/2/value", "bad_value"),
            ("/filters/3/value", "bad_value"),
            ("/filters/4/op", "bad_op"),
            ("/filters/5/value", "bad_value"),
            ("/filters/6/value", "bad_value"),
            ("/filters/7/op", "bad_op"),
            ("/sort", "unknown_field"),
            ("/limit", "out_of_range"),
            ("/cursor", "bad_cursor"),
        ];
        for (p, c) in want {
            assert!(
                got.contains(&(p.to_owned(), c)),
                "{}: missing {p} {c} in {got:?}",
                t.backend
            );
        }
        t.cleanup().await;
    }
}

#[tokio::test]
async fn keyset_pagination_visits_every_record_once_in_order() {
    for t in testing::each().await {
        let (app, admin) = install(&t.db, &zoo_def()).await;
        let thing = app.entity("thing").unwrap();
        // 23 records; counts repeat and some are null, to test ties and nulls.
        for i in 0..23 {
            let count = if i % 5 == 0 {
                Value::Null
            } else {
                json!(i % 4)
            };
            create(
                &t.db,
                &app,
                "thing",
                json!({"title": format!("t{i:02}"), "count": count}),
                admin,
            )
            .await
            .unwrap();
        }
        for sort in ["count", "-count", "title", "-title", "created_at", "id"] {
            let mut seen = vec![];
            let mut cursor = None;
            let mut pages = 0;
            loop {
                let q = ListQuery {
                    sort: Some(sort.into()),
                    limit: Some(5),
                    cursor: cursor.clone(),
                    count: pages == 0,
                    ..Default::default()
                };
                let page = list(&t.db, thing, &q).await.unwrap();
                if pages == 0 {
                    assert_eq!(page.total, Some(23));
                }
                pages += 1;
                seen.extend(page.records.iter().map(|r| {
                    (
                        r.fields["count"].clone(),
                        r.fields["title"].as_str().unwrap().to_owned(),
                        r.meta.id,
                    )
                }));
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
                assert!(pages < 10, "pagination does not end");
            }
            assert_eq!(pages, 5, "{sort}");
            assert_eq!(
                seen.len(),
                23,
                "{}: {sort}: every record exactly once",
                t.backend
            );
            let mut ids: Vec<_> = seen.iter().map(|s| s.2).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 23);
            // Order: nulls last; ties broken by id in the sort's direction.
            let desc = sort.starts_with('-');
            let key = |s: &(Value, String, uuid::Uuid)| match sort.trim_start_matches('-') {
                "count" => (s.0.is_null(), s.0.as_i64().unwrap_or(0).to_string(), s.2),
                "title" => (false, s.1.clone(), s.2),
                _ => (false, String::new(), s.2),
            };
            for w in seen.windows(2) {
                let (a, b) = (key(&w[0]), key(&w[1]));
                let ok = if a.0 != b.0 {
                    !a.0 && b.0
                } else if desc {
                    (a.1.clone(), a.2) > (b.1.clone(), b.2)
                } else {
                    (a.1.clone(), a.2) < (b.1.clone(), b.2)
                };
                assert!(ok, "{}: {sort}: {w:?} out of order", t.backend);
            }
        }
        t.cleanup().await;
    }
}
