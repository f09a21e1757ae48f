//! Checking and compiling definitions (no database needed).

use crate::common::zoo_def;
use serde_json::json;
use trellis_form::compile::{compile, parse};
use trellis_form::FormError;

fn errors(def: serde_json::Value) -> Vec<trellis_form::Problem> {
    match parse(&def).and_then(|d| compile(d, 1)) {
        Err(FormError::Definition(ps)) => ps,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("the definition compiled but should not have"),
    }
}

#[test]
fn the_zoo_and_the_crm_compile() {
    let app = compile(parse(&zoo_def()).unwrap(), 1).unwrap();
    assert_eq!(app.entities.len(), 3);
    let thing = app.entity("thing").unwrap();
    assert_eq!(thing.table, "zoo__thing");
    let cols: Vec<String> = thing.columns().into_iter().map(|c| c.name).collect();
    assert!(cols.contains(&"price__currency".to_owned()));
    let deal = app.entity("deal").unwrap();
    let cols: Vec<String> = deal.columns().into_iter().map(|c| c.name).collect();
    assert!(
        cols.contains(&"stage__entered_proposal".to_owned())
            && cols.contains(&"stage__changed_at".to_owned())
    );
    // Stage history is always kept, even when the entity tracks only some fields.
    assert!(deal.tracks("stage") && deal.tracks("amount") && !deal.tracks("reason"));

    let crm = trellis_form::bundle::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/crm"),
    )
    .unwrap();
    let crm = compile(parse(&crm.definition).unwrap(), 1).unwrap();
    let keys: Vec<&str> = crm.entities.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "lead",
            "account",
            "contact",
            "opportunity",
            "activity",
            "task",
            "review"
        ]
    );
    let stages: Vec<(&str, f64)> = crm
        .entity("opportunity")
        .unwrap()
        .stage()
        .unwrap()
        .stages
        .iter()
        .map(|s| (s.key.as_str(), s.probability))
        .collect();
    assert_eq!(
        stages,
        [
            ("mql", 0.1),
            ("sql", 0.2),
            ("proposal", 0.4),
            ("quoted", 0.6),
            ("negotiation", 0.8),
            ("won", 1.0),
            ("lost", 0.0)
        ]
    );
}

#[test]
fn every_definition_error_is_reported_with_its_path() {
    let def = json!({
        "key": "Bad App",
        "entities": [
            {"key": "lead", "fields": [
                {"key": "id", "type": "text"},
                {"key": "name", "type": "text"},
                {"key": "name", "type": "integer"},
                {"key": "source", "type": "select"},
                {"key": "owner_ref", "type": "relation", "entity": "nowhere"},
                {"key": "amount", "type": "money", "currency": "yuan", "min": "lots"},
                {"key": "pattern", "type": "text", "pattern": "(unclosed"},
                {"key": "n", "type": "integer", "min": 10, "max": 1, "default": "x"},
                {"key": "pipe", "type": "stage", "stages": [
                    {"key": "a", "probability": 1.5, "entry_criteria": ["ghost"]},
                    {"key": "a", "probability": 0.5}
                ]},
                {"key": "more", "type": "stage", "stages": [{"key": "x", "probability": 0.1}]},
                {"key": "flag", "type": "boolean", "unique": true, "options": [{"key": "y"}]}
            ], "history": {"track": ["nope"]}},
            {"key": "lead", "fields": []}
        ]
    });
    let problems: Vec<(String, &str)> = errors(def).into_iter().map(|p| (p.path, p.code)).collect();
    let expected = [
        ("/key", "bad_key"),
        ("/entities/0/fields/0/key", "reserved"),
        ("/entities/0/fields/2/key", "duplicate"),
        ("/entities/0/fields/3/options", "required"),
        ("/entities/0/fields/4/entity", "unknown_entity"),
        ("/entities/0/fields/5/currency", "format"),
        ("/entities/0/fields/5/min", "wrong_type"),
        ("/entities/0/fields/6/pattern", "bad_pattern"),
        ("/entities/0/fields/7/min", "out_of_range"),
        ("/entities/0/fields/8/stages/0/probability", "out_of_range"),
        (
            "/entities/0/fields/8/stages/0/entry_criteria/0",
            "unknown_field",
        ),
        ("/entities/0/fields/8/stages/1/key", "duplicate"),
        ("/entities/0/fields/9/type", "duplicate_stage"),
        ("/entities/0/fields/10/options", "not_allowed"),
        ("/entities/0/fields/10/unique", "not_allowed"),
        ("/entities/0/history/track/0", "unknown_field"),
        ("/entities/1/key", "duplicate"),
    ];
    for (path, code) in expected {
        assert!(
            problems.contains(&(path.to_owned(), code)),
            "missing {path} {code} in {problems:#?}"
        );
    }
}

#[test]
fn definition_messages_snapshot() {
    let def = json!({"key": "x", "entities": [{"key": "e", "fields": [
        {"key": "s", "type": "select", "options": [{"key": "a"}, {"key": "a"}]},
        {"key": "d", "type": "date", "min": "yesterday"},
        {"key": "n", "type": "integer", "default": 1.5}
    ]}]});
    insta::assert_json_snapshot!(errors(def));
}

#[test]
fn a_malformed_definition_is_one_clear_error() {
    let problems = errors(
        json!({"key": "x", "entities": [{"key": "e", "fields": [{"key": "a", "type": "colour"}]}]}),
    );
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].code, "malformed");
    assert!(
        problems[0].message.contains("colour"),
        "{}",
        problems[0].message
    );
}

#[test]
fn json_schemas_never_fetch_remote_or_file_refs() {
    for r in [
        "https://example.com/schema.json",
        "file:///etc/passwd",
        "http://127.0.0.1:1/x.json",
    ] {
        let def = json!({"key": "x", "entities": [{"key": "e", "fields": [
            {"key": "j", "type": "json", "schema": {"$ref": r}}
        ]}]});
        let ps = errors(def);
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert_eq!(
            (ps[0].path.as_str(), ps[0].code),
            ("/entities/0/fields/0/schema", "bad_schema")
        );
        assert!(ps[0].message.contains("not allowed"), "{}", ps[0].message);
    }
    // Local references work.
    let def = json!({"key": "x", "entities": [{"key": "e", "fields": [
        {"key": "j", "type": "json", "schema": {"$defs": {"n": {"type": "integer"}}, "type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}}
    ]}]});
    compile(parse(&def).unwrap(), 1).unwrap();
}

#[test]
fn every_example_in_the_definition_references_compiles() {
    for doc in ["app-definition.md", "formulas.md"] {
        examples_compile(doc);
    }
}

#[track_caller]
fn examples_compile(doc: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/reference")
        .join(doc);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut blocks = vec![];
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```json") => current = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    assert!(!blocks.is_empty(), "the reference has no ```json examples");
    for (i, b) in blocks.iter().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(b)
            .unwrap_or_else(|e| panic!("{doc}: example {i} is not JSON: {e}\n{b}"));
        // A role example is checked as a role of the CRM.
        if v.get("scope").is_some() {
            let crm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/crm");
            let mut def = trellis_form::bundle::load(&crm).unwrap().definition;
            def["roles"] = json!([v]);
            v = def;
        }
        if let Err(e) = parse(&v).and_then(|d| compile(d, 1)) {
            panic!("{doc}: example {i} does not compile: {e:?}\n{b}");
        }
    }
}

/// Indexes over several columns: each problem with its path, and a valid one compiled with
/// its column names (a field, a system column, a stage column).
#[test]
fn indexes_over_several_columns_are_checked() {
    let mut def = zoo_def();
    def["entities"][2]["indexes"] = json!([
        {"columns": ["stage", "stage__entered_won", "amount", "created_at"]},
        {"columns": ["stage"]},
        {"columns": ["stage", "nope"]},
        {"columns": ["name", "name"]},
        {"columns": ["stage", "stage__entered_won", "amount", "created_at"]},
        {"columns": ["stage", "stage__days_lost"]},
        {"columns": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]}
    ]);
    def["entities"][1]["indexes"] = json!([{"columns": ["title", "notes", "extra", "tags"]}]);
    let problems: Vec<(String, &str)> = errors(def.clone())
        .into_iter()
        .map(|p| (p.path, p.code))
        .collect();
    assert_eq!(
        problems,
        [
            ("/entities/1/indexes/0/columns/1".to_owned(), "bad_index"),
            ("/entities/1/indexes/0/columns/2".to_owned(), "bad_index"),
            ("/entities/1/indexes/0/columns/3".to_owned(), "bad_index"),
            ("/entities/2/indexes/1/columns".to_owned(), "bad_index"),
            (
                "/entities/2/indexes/2/columns/1".to_owned(),
                "unknown_column"
            ),
            ("/entities/2/indexes/3/columns/1".to_owned(), "duplicate"),
            ("/entities/2/indexes/4".to_owned(), "duplicate"),
            ("/entities/2/indexes/6/columns".to_owned(), "bad_index"),
        ]
        .into_iter()
        .chain((0..17).map(|k| (
            format!("/entities/2/indexes/6/columns/{k}"),
            "unknown_column"
        )))
        .collect::<Vec<_>>()
    );
    def["entities"][1]
        .as_object_mut()
        .unwrap()
        .remove("indexes");
    def["entities"][2]["indexes"] = json!([
        {"columns": ["stage", "stage__entered_won", "amount", "created_at"]},
        {"columns": ["stage", "stage__days_lost"]}
    ]);
    // A field with a problem of its own is reported once, not again by the index naming it.
    let mut broken = def.clone();
    broken["entities"][2]["fields"][3] = json!({"key": "reason", "type": "select"});
    broken["entities"][2]["indexes"] = json!([{"columns": ["reason", "stage"]}]);
    let problems: Vec<(String, &str)> = errors(broken)
        .into_iter()
        .map(|p| (p.path, p.code))
        .collect();
    assert_eq!(
        problems,
        [("/entities/2/fields/3/options".to_owned(), "required")]
    );
    let app = compile(parse(&def).unwrap(), 1).unwrap();
    assert_eq!(
        app.entity("deal").unwrap().indexes,
        [
            vec!["stage", "stage__entered_won", "amount", "created_at"],
            vec!["stage", "stage__days_lost"]
        ]
    );
    // An unknown key in an index is refused when the definition is read.
    def["entities"][2]["indexes"] = json!([{"columns": ["stage", "amount"], "unique": true}]);
    assert!(parse(&def).is_err());
}
