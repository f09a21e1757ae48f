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
        out.contains("+ create_entity  create entity `opportunity` (19 fields)"),
        "{out}"
    );
    // The teams the CRM's workflows name are data: an empty database lacks them.
    assert!(
        out.contains("  /workflows/0/nodes/1/rules/1/team [unknown_team] There is no team `east_sales` yet; the step will fail or fall back until it exists."),
        "{out}"
    );
    assert_eq!(out.matches("[unknown_team]").count(), 6, "{out}");
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
    let mut files: Vec<String> = vec![];
    for section in trellis_form::bundle::SECTIONS {
        let Ok(dir) = std::fs::read_dir(manifest(&format!("../../examples/crm/{section}"))) else {
            continue;
        };
        files
            .extend(dir.map(|e| format!("{section}/{}", e.unwrap().file_name().to_string_lossy())));
    }
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

#[test]
fn app_export_then_import_on_an_empty_database_reproduces_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let first = format!("sqlite://{}", dir.path().join("a.db").display());
    let second = format!("sqlite://{}", dir.path().join("b.db").display());
    let crm = manifest("../../examples/crm");
    assert_eq!(
        trellis(&["app", "import", &crm, "--database-url", &first]).0,
        0
    );
    let out = dir.path().join("exported");
    let (code, stdout, err) = trellis(&[
        "app",
        "export",
        "crm",
        out.to_str().unwrap(),
        "--database-url",
        &first,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("Exported app `crm` version 1"), "{stdout}");
    assert_eq!(trellis(&["app", "check", out.to_str().unwrap()]).0, 0);
    assert_eq!(
        trellis(&[
            "app",
            "import",
            out.to_str().unwrap(),
            "--database-url",
            &second
        ])
        .0,
        0
    );
    // Both databases hold the same definition, and importing the original into the copy changes nothing.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let defs: Vec<serde_json::Value> = [&first, &second]
        .iter()
        .map(|url| {
            rt.block_on(async {
                let db = trellis_form::db::Db::connect(url, &Default::default())
                    .await
                    .unwrap();
                let app = trellis_form::apps::load(&db, "crm").await.unwrap().unwrap();
                db.close().await;
                serde_json::to_value(&app.def).unwrap()
            })
        })
        .collect();
    assert_eq!(defs[0], defs[1]);
    let (code, stdout, _) = trellis(&["app", "import", &crm, "--database-url", &second]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Nothing to change"), "{stdout}");
    let names: Vec<String> = std::fs::read_dir(out.join("entities"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 7);
}

#[test]
fn import_and_export_spreadsheets_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    assert_eq!(
        trellis(&[
            "app",
            "import",
            &manifest("../../examples/crm"),
            "--database-url",
            &url
        ])
        .0,
        0
    );
    let csv = dir.path().join("leads.csv");
    std::fs::write(
        &csv,
        "姓名,商机来源,状态
王芳,展会,新建
坏,电视,won
",
    )
    .unwrap();
    let (code, _, err) = trellis(&[
        "import",
        "--app",
        "crm",
        "--entity",
        "lead",
        csv.to_str().unwrap(),
        "--database-url",
        &url,
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            "row 3, column B (商机来源): [bad_cell] Source channel: `电视` is not one of online_ad, trade_show, website, partner.",
            "row 3, column C (状态): [bad_cell] Status: `won` is not one of new, contacted, qualified, disqualified.",
            "2 problem(s); nothing was written.",
        ]
    );
    std::fs::write(
        &csv,
        "姓名,商机来源,状态
王芳,展会,新建
Li Lei,website,contacted
",
    )
    .unwrap();
    let (code, out, _) = trellis(&[
        "import",
        "--app",
        "crm",
        "--entity",
        "lead",
        csv.to_str().unwrap(),
        "--database-url",
        &url,
        "--dry-run",
    ]);
    assert_eq!(
        (code, out.trim()),
        (0, "Dry run: all 2 row(s) are valid; nothing was written.")
    );
    let (code, out, _) = trellis(&[
        "import",
        "--app",
        "crm",
        "--entity",
        "lead",
        csv.to_str().unwrap(),
        "--database-url",
        &url,
    ]);
    assert_eq!(
        (code, out.trim()),
        (0, "Imported 2 record(s) into crm.lead.")
    );
    let (code, out, _) = trellis(&[
        "export",
        "--app",
        "crm",
        "--entity",
        "lead",
        "--database-url",
        &url,
        "--filter",
        r#"[{"field": "source", "op": "eq", "value": "trade_show"}]"#,
    ]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "id,owner,created_at,name,company,phone,email,source,region,product_interest,status,converted_opportunity,first_opportunity_at,notes");
    assert_eq!(lines.len(), 2);
    assert!(
        lines[1].contains(",admin@localhost,")
            && lines[1].contains(",王芳,")
            && lines[1].contains(",trade_show,"),
        "{}",
        lines[1]
    );
    // The import ran the CRM's inline `new_lead` workflow on each lead (the dry run ran it and
    // rolled it back): one first-call task per lead.
    let tasks = || {
        trellis(&[
            "export",
            "--app",
            "crm",
            "--entity",
            "task",
            "--database-url",
            &url,
        ])
    };
    let (code, out, _) = tasks();
    assert_eq!(code, 0);
    let mut titles: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').find(|c| c.starts_with("First call: ")))
        .collect();
    titles.sort();
    assert_eq!(titles, ["First call: Li Lei", "First call: 王芳"], "{out}");
    // `--no-workflows` imports without them: no task for the third lead.
    std::fs::write(&csv, "姓名\n张三\n").unwrap();
    let import = |extra: &'static [&'static str]| {
        let mut a = vec!["import", "--app", "crm", "--entity", "lead"];
        a.push(csv.to_str().unwrap());
        a.extend(["--database-url", &url]);
        a.extend(extra);
        trellis(&a).0
    };
    assert_eq!(import(&["--no-workflows"]), 0);
    let (_, out, _) = tasks();
    assert_eq!(out.lines().count(), 3, "{out}");
    let (code, _, err) = trellis(&[
        "export",
        "--app",
        "crm",
        "--entity",
        "lead",
        "--database-url",
        &url,
        "--filter",
        r#"[{"field": "nope", "op": "eq", "value": 1}]"#,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/filters/0/field [unknown_field]"), "{err}");
}

#[test]
fn app_check_fixtures_match_their_snapshots() {
    // One folder per kind of broken definition; each one's full error list is a snapshot.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5);
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let (code, out, err) = trellis(&["app", "check", dir.to_str().unwrap()]);
        assert_eq!(code, 1, "{name}: {out}");
        insta::assert_snapshot!(format!("check_{name}"), err);
    }
}

#[test]
fn users_and_tokens_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let run = |args: &[&str], password: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_trellis"));
        c.args(args)
            .env_remove("TRELLIS_DATABASE_URL")
            .env_remove("TRELLIS_PASSWORD");
        if let Some(p) = password {
            c.env("TRELLIS_PASSWORD", p);
        }
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(
        &[
            "user",
            "create",
            "--email",
            "boss@x.example",
            "--name",
            "Boss",
            "--database-url",
            &url,
        ],
        Some("a long password"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("Created user Boss <boss@x.example>"),
        "{out}"
    );
    let (code, _, err) = run(
        &[
            "user",
            "create",
            "--email",
            "rep@x.example",
            "--name",
            "Rep",
            "--manager",
            "boss@x.example",
            "--database-url",
            &url,
        ],
        Some("short"),
    );
    assert_eq!(code, 1);
    assert!(err.contains("/password [too_short]"), "{err}");
    let (code, _, err) = run(
        &[
            "user",
            "create",
            "--email",
            "boss@x.example",
            "--name",
            "Again",
            "--database-url",
            &url,
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("/email [unique]"), "{err}");
    let (code, out, err) = run(
        &[
            "token",
            "create",
            "--email",
            "boss@x.example",
            "--name",
            "ci",
            "--scope",
            "read",
            "--database-url",
            &url,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.trim().starts_with("trl_") && out.trim().len() == 68,
        "{out}"
    );
    assert!(err.contains("scope read"), "{err}");
    let (code, _, err) = run(
        &[
            "token",
            "create",
            "--email",
            "ghost@x.example",
            "--name",
            "ci",
            "--database-url",
            &url,
        ],
        None,
    );
    assert_eq!(
        (code, err.trim()),
        (1, "There is no user `ghost@x.example`.")
    );
    // What the command line did is in the audit log, without a user of its own and without
    // the password or the token; the refused attempts left nothing.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let entries = rt.block_on(async {
        let db = trellis_form::db::Db::connect(&url, &Default::default())
            .await
            .unwrap();
        let e = trellis_form::audit::list(&db, None, None, 100)
            .await
            .unwrap();
        db.close().await;
        e
    });
    let actions: Vec<(&str, Option<uuid::Uuid>)> = entries
        .iter()
        .map(|e| (e.action.as_str(), e.actor))
        .collect();
    assert_eq!(actions, [("token.create", None), ("user.create", None)]);
    assert_eq!(entries[0].detail["via"], "cli");
    assert_eq!(entries[0].detail["scope"], "read");
    assert_eq!(entries[1].detail["email"], "boss@x.example");
    assert_eq!(entries[1].detail["password_set"], true);
    let text = serde_json::to_string(&entries).unwrap();
    assert!(
        !text.contains("a long password") && !text.contains(out.trim()),
        "{text}"
    );
}
