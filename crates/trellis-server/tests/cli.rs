//! The `trellis` binary: `app check`, `app plan`, `app import` on real folders and databases.

use std::process::Command;

fn trellis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env_remove("TRELLIS_DATABASE_URL")
        .output()
        .expect("run trellis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn manifest(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn app_check_accepts_the_crm() {
    let (code, out, err) = trellis(&["app", "check", &manifest("../../examples/crm")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("OK (7 entities"), "{out}");
}

#[test]
fn app_check_names_every_error_with_its_file_and_path() {
    let (code, _, err) = trellis(&["app", "check", &manifest("tests/fixtures/broken")]);
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "entities/01-customer.json: /entities/0/fields/1/key [duplicate] Field `name` is defined twice.",
            "entities/01-customer.json: /entities/0/fields/2/options [required] A select field needs at least one option.",
            "entities/02-order.json: /entities/1/fields/0/entity [unknown_entity] The relation points to `client`, which is not an entity of this app.",
            "entities/02-order.json: /entities/1/fields/1/currency [format] A currency is a three-letter ISO 4217 code such as CNY or USD.",
            "4 problem(s) found.",
        ]
    );
}

#[test]
fn app_check_reports_unreadable_json_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.json"), "{\"key\": \"x\",}").unwrap();
    let (code, _, err) = trellis(&["app", "check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.starts_with("app.json: not valid JSON"), "{err}");
}

#[test]
fn app_plan_and_import_against_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let crm = manifest("../../examples/crm");
    let (code, out, err) = trellis(&["app", "plan", &crm, "--database-url", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Plan for app `crm` (nothing installed → version 1):"),
        "{out}"
    );
    assert!(
        out.contains("+ create_entity  create entity `opportunity` (18 fields)"),
        "{out}"
    );
    let (code, out, err) = trellis(&["app", "import", &crm, "--database-url", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Applied: app `crm` is now at version 1."),
        "{out}"
    );
    let (code, out, _) = trellis(&["app", "import", &crm, "--database-url", &url]);
    assert_eq!(code, 0);
    assert!(out.contains("Nothing to change"), "{out}");
    // A copy of the CRM without the review entity: destructive, refused, then allowed.
    let copy = dir.path().join("crm");
    std::fs::create_dir_all(copy.join("entities")).unwrap();
    for entry in std::fs::read_dir(format!("{crm}/entities")).unwrap() {
        let p = entry.unwrap().path();
        if !p.ends_with("07-review.json") {
            std::fs::copy(&p, copy.join("entities").join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(format!("{crm}/app.json"), copy.join("app.json")).unwrap();
    let copy = copy.to_str().unwrap();
    let (code, out, _) = trellis(&["app", "plan", copy, "--database-url", &url, "--json"]);
    assert_eq!(code, 0);
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["steps"][0]["kind"], "drop_entity");
    assert_eq!(plan["steps"][0]["destructive"], true);
    let (code, _, err) = trellis(&["app", "import", copy, "--database-url", &url]);
    assert_eq!(code, 1);
    assert!(
        err.contains("[destructive] drop entity `review` and ALL its records"),
        "{err}"
    );
    assert!(err.contains("Nothing was changed."), "{err}");
    let (code, out, _) = trellis(&[
        "app",
        "import",
        copy,
        "--database-url",
        &url,
        "--allow-destructive",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("now at version 2"), "{out}");
}

#[test]
fn the_embedded_crm_is_the_examples_folder() {
    let mut files: Vec<String> = std::fs::read_dir(manifest("../../examples/crm/entities"))
        .unwrap()
        .map(|e| format!("entities/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    files.push("app.json".into());
    files.sort();
    let mut embedded: Vec<String> = trellis_server::crm::FILES
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    embedded.sort();
    assert_eq!(
        embedded, files,
        "list every file of examples/crm in crates/trellis-server/src/crm.rs"
    );
}
