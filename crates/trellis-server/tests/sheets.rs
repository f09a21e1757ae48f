//! Spreadsheet import and export on SQLite and PostgreSQL: headers by key or label in any
//! language, options by key or label, all-or-nothing, every bad cell by row and column.

use std::path::Path;
use std::sync::Arc;
use trellis_form::store::WriteCtx;
use trellis_form::testing;
use trellis_server::sheets::{self, Outcome, Run};

const DRY: Run = Run {
    dry_run: true,
    progress: false,
    flows: None,
};
const REAL: Run = Run {
    dry_run: false,
    progress: false,
    flows: None,
};

async fn setup(db: &trellis_form::db::Db) -> (std::sync::Arc<trellis_form::model::App>, WriteCtx) {
    let (_, app, ctx) = setup_state(db).await;
    (app, ctx)
}

/// The server's state over `db` (CRM installed), the CRM and an import's write context.
async fn setup_state(
    db: &trellis_form::db::Db,
) -> (
    trellis_server::state::AppState,
    std::sync::Arc<trellis_form::model::App>,
    WriteCtx,
) {
    let (state, _) = trellis_server::cli::prepare(
        db.clone(),
        Arc::new(trellis_form::SystemClock),
        None,
        Some("t"),
    )
    .await
    .unwrap();
    let loaded = state.app("crm").unwrap();
    let app = loaded.app.clone();
    let ctx = WriteCtx {
        actor: Some(state.admin_user),
        now: trellis_form::Clock::now(&trellis_form::SystemClock),
        default_owner: Some(loaded.default_owner),
        import: true,
        depth: 0,
    };
    (state, app, ctx)
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Each refused cell as (sheet row, column letter, code).
fn cells(ps: &[trellis_form::sheet::CellProblem]) -> Vec<(usize, &str, &'static str)> {
    ps.iter()
        .map(|p| (p.row, p.column.as_str(), p.code))
        .collect()
}

async fn count(db: &trellis_form::db::Db, app: &trellis_form::model::App, entity: &str) -> i64 {
    let q = trellis_form::query::ListQuery {
        count: true,
        limit: Some(1),
        ..Default::default()
    };
    trellis_form::query::list(db, app.entity(entity).unwrap(), &q)
        .await
        .unwrap()
        .total
        .unwrap()
}

#[tokio::test]
async fn csv_import_matches_labels_in_any_language_and_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for t in testing::each().await {
        let (app, ctx) = setup(&t.db).await;
        let lead = app.entity("lead").unwrap();
        let good = write(dir.path(), "good.csv", "\u{feff}姓名,Company,商机来源,区域,电话,状态\n王芳,杭州机器人,展会,华东,+86 571 8888 0000,新建\nLi Lei,Acme,Website inquiry,east,,Contacted\n,,,,,\n");
        let sheet = sheets::read(&good).unwrap();
        match sheets::import(&t.db, &app, lead, &sheet, &ctx, DRY)
            .await
            .unwrap()
        {
            Outcome::Ok {
                records: 2,
                written: false,
            } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            count(&t.db, &app, "lead").await,
            0,
            "a dry run writes nothing"
        );
        assert!(matches!(
            sheets::import(&t.db, &app, lead, &sheet, &ctx, REAL)
                .await
                .unwrap(),
            Outcome::Ok {
                records: 2,
                written: true
            }
        ));
        let (headers, rows) = sheets::table(&t.db, lead, vec![]).await.unwrap();
        let col = |h: &str| headers.iter().position(|x| x == h).unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (
                    r[col("name")].as_str(),
                    r[col("source")].as_str(),
                    r[col("region")].as_str(),
                    r[col("status")].as_str()
                ))
                .collect::<Vec<_>>(),
            [
                ("王芳", "trade_show", "east", "new"),
                ("Li Lei", "website", "east", "contacted")
            ]
        );
        // Bad cells: every one by row and column, and nothing written.
        let bad = write(
            dir.path(),
            "bad.csv",
            "name,source,status,email,owner,fax\nok,website,new,,,\n,tv,won,not-an-email,nobody@x.example,\n",
        );
        let sheet = sheets::read(&bad).unwrap();
        let Outcome::Refused(ps) = sheets::import(&t.db, &app, lead, &sheet, &ctx, REAL)
            .await
            .unwrap()
        else {
            panic!()
        };
        let got = cells(&ps);
        assert_eq!(
            got,
            [
                (1, "F", "unknown_column"),
                (3, "A", "required"),
                (3, "B", "bad_cell"),
                (3, "C", "bad_cell"),
                (3, "D", "format"),
                (3, "E", "not_found")
            ],
            "{}",
            t.backend
        );
        assert_eq!(count(&t.db, &app, "lead").await, 2);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn xlsx_round_trip_with_numbers_dates_relations_and_unique_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    for t in testing::each().await {
        let (app, ctx) = setup(&t.db).await;
        // Accounts: a duplicate name (unique) refuses the whole file.
        let accounts = write(
            dir.path(),
            "accounts.csv",
            "客户名称,行业\nAcme,制造业\nBeta,Finance\nAcme,retail\n",
        );
        let Outcome::Refused(ps) = sheets::import(
            &t.db,
            &app,
            app.entity("account").unwrap(),
            &sheets::read(&accounts).unwrap(),
            &ctx,
            REAL,
        )
        .await
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            ps.iter()
                .map(|p| (p.row, p.column.as_str(), p.code))
                .collect::<Vec<_>>(),
            [(4, "A", "unique")]
        );
        let accounts = write(
            dir.path(),
            "accounts.csv",
            "客户名称,行业\nAcme,制造业\nBeta,Finance\n",
        );
        sheets::import(
            &t.db,
            &app,
            app.entity("account").unwrap(),
            &sheets::read(&accounts).unwrap(),
            &ctx,
            REAL,
        )
        .await
        .unwrap();
        // An XLSX of opportunities: numbers, spreadsheet dates, accounts by name, stages by label.
        let path = dir.path().join("opps.xlsx");
        let mut wb = rust_xlsxwriter::Workbook::new();
        let ws = wb.add_worksheet();
        for (c, h) in [
            "商机名称",
            "客户",
            "金额",
            "预计成交日期",
            "阶段",
            "赢单关键因素",
            "Needs summary",
        ]
        .iter()
        .enumerate()
        {
            ws.write_string(0, c as u16, *h).unwrap();
        }
        ws.write_string(1, 0, "Acme ERP").unwrap();
        ws.write_string(1, 1, "acme").unwrap();
        ws.write_number(1, 2, 120000.5).unwrap();
        ws.write_string(1, 3, "2026/6/30").unwrap();
        ws.write_string(1, 4, "方案").unwrap();
        ws.write_string(1, 5, "价格、服务").unwrap();
        ws.write_string(1, 6, "ERP rollout").unwrap();
        ws.write_string(2, 0, "Beta deal").unwrap();
        ws.write_string(2, 1, "Beta").unwrap();
        ws.write_string(2, 2, "¥8,000").unwrap();
        wb.save(&path).unwrap();
        let opp = app.entity("opportunity").unwrap();
        let out = sheets::import(&t.db, &app, opp, &sheets::read(&path).unwrap(), &ctx, REAL)
            .await
            .unwrap();
        assert!(
            matches!(
                out,
                Outcome::Ok {
                    records: 2,
                    written: true
                }
            ),
            "{}: {out:?}",
            t.backend
        );
        let (headers, rows) = sheets::table(&t.db, opp, vec![]).await.unwrap();
        let col = |h: &str| headers.iter().position(|x| x == h).unwrap();
        assert_eq!(rows[0][col("amount")], "120000.50");
        assert_eq!(rows[0][col("amount__currency")], "CNY");
        assert_eq!(rows[0][col("expected_close_date")], "2026-06-30");
        assert_eq!(rows[0][col("stage")], "proposal");
        assert_eq!(rows[0][col("win_factors")], "price, service");
        assert_eq!(rows[1][col("amount")], "8000.00");
        // The export reads back: XLSX out, dry-run import in.
        let out = dir.path().join("export.xlsx");
        sheets::write_xlsx(&out, &headers, &rows).unwrap();
        let again = sheets::import(&t.db, &app, opp, &sheets::read(&out).unwrap(), &ctx, DRY)
            .await
            .unwrap();
        assert!(
            matches!(
                again,
                Outcome::Ok {
                    records: 2,
                    written: false
                }
            ),
            "{again:?}"
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn a_formula_that_fails_on_a_row_is_reported_at_that_row() {
    let dir = tempfile::tempdir().unwrap();
    for t in testing::each().await {
        let (_, ctx) = setup(&t.db).await;
        let def = serde_json::json!({"key": "shop", "entities": [{"key": "line", "fields": [
            {"key": "item", "type": "text", "required": true, "label": {"en": "Item", "zh-CN": "商品"}},
            {"key": "qty", "type": "integer", "label": {"en": "Quantity", "zh-CN": "数量"}},
            {"key": "unit_share", "type": "formula", "formula": "100 / qty", "result": "decimal"}
        ]}]});
        trellis_form::apps::import(&t.db, &def, Default::default(), ctx.actor, ctx.now)
            .await
            .unwrap();
        let app = Arc::new(
            trellis_form::apps::load(&t.db, "shop")
                .await
                .unwrap()
                .unwrap(),
        );
        let file = write(dir.path(), "lines.csv", "商品,数量\nA,4\nB,0\nC,many\n");
        let Outcome::Refused(ps) = sheets::import(
            &t.db,
            &app,
            app.entity("line").unwrap(),
            &sheets::read(&file).unwrap(),
            &ctx,
            REAL,
        )
        .await
        .unwrap() else {
            panic!()
        };
        let got: Vec<(usize, &str, &str, &str)> = ps
            .iter()
            .map(|p| (p.row, p.column.as_str(), p.header.as_str(), p.code))
            .collect();
        assert_eq!(
            got,
            [
                (3, "", "unit_share", "formula"),
                (4, "B", "数量", "bad_cell")
            ],
            "{}",
            t.backend
        );
        assert!(
            ps[0].message.contains("could not be computed"),
            "{}",
            ps[0].message
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn xlsx_rows_and_columns_are_the_ones_a_person_sees() {
    let dir = tempfile::tempdir().unwrap();
    let t = testing::sqlite().await;
    let (app, ctx) = setup(&t.db).await;
    // The table starts at B3, and a decimal computed in Excel carries float noise.
    let path = dir.path().join("offset.xlsx");
    let mut wb = rust_xlsxwriter::Workbook::new();
    let ws = wb.add_worksheet();
    ws.write_string(2, 1, "商机名称").unwrap();
    ws.write_string(2, 2, "金额").unwrap();
    ws.write_string(2, 3, "阶段").unwrap();
    ws.write_string(3, 1, "Good").unwrap();
    ws.write_number(3, 2, 112.99999999999999).unwrap();
    ws.write_string(4, 1, "Bad").unwrap();
    ws.write_string(4, 3, "nowhere").unwrap();
    wb.save(&path).unwrap();
    let sheet = sheets::read(&path).unwrap();
    assert_eq!(sheet.header_row, 3);
    let opp = app.entity("opportunity").unwrap();
    let Outcome::Refused(ps) = sheets::import(&t.db, &app, opp, &sheet, &ctx, DRY)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(cells(&ps), [(5, "D", "bad_cell")]);
    // Without the bad row the float is read as the 113 Excel shows.
    let mut sheet = sheet;
    sheet.rows.truncate(1);
    assert!(matches!(
        sheets::import(&t.db, &app, opp, &sheet, &ctx, REAL)
            .await
            .unwrap(),
        Outcome::Ok {
            records: 1,
            written: true
        }
    ));
    let (headers, rows) = sheets::table(&t.db, opp, vec![]).await.unwrap();
    assert_eq!(
        rows[0][headers.iter().position(|h| h == "amount").unwrap()],
        "113.00"
    );
    t.cleanup().await;
}

/// Text rows of `sql` (one text column).
async fn texts(db: &trellis_form::db::Db, sql: &str) -> Vec<String> {
    db.fetch_all(
        &trellis_form::db::Sql::new(sql),
        &[trellis_form::model::ColKind::Text],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| match &r[0] {
        trellis_form::db::Value::Text(s) => s.clone(),
        other => panic!("{other:?}"),
    })
    .collect()
}

#[tokio::test]
async fn imported_records_run_the_inline_workflows_like_api_creates() {
    let dir = tempfile::tempdir().unwrap();
    for t in testing::each().await {
        let (state, app, ctx) = setup_state(&t.db).await;
        let now = ctx.now;
        trellis_server::demo::install(&t.db, &app, state.admin_user, now)
            .await
            .unwrap();
        let run = |dry_run| Run {
            dry_run,
            progress: false,
            flows: Some(&*state.flows),
        };
        let tasks = "SELECT \"title\" FROM \"crm__task\" WHERE \"kind\" = 'first_call' AND \"lead\" IN (SELECT \"id\" FROM \"crm__lead\" WHERE \"name\" LIKE 'Import %') ORDER BY \"title\"";
        let before = texts(&t.db, tasks).await;
        let lead = app.entity("lead").unwrap();
        let file = write(
            dir.path(),
            "leads.csv",
            "姓名,公司,区域\nImport East,杭州机器人,华东\nImport South,Acme,south\nImport Overseas,Globex,overseas\n",
        );
        let sheet = sheets::read(&file).unwrap();
        // A dry run runs the workflows too, and rolls them back with the records.
        assert!(matches!(
            sheets::import(&t.db, &app, lead, &sheet, &ctx, run(true))
                .await
                .unwrap(),
            Outcome::Ok {
                records: 3,
                written: false
            }
        ));
        assert_eq!(texts(&t.db, tasks).await, before, "{}", t.backend);
        assert!(matches!(
            sheets::import(&t.db, &app, lead, &sheet, &ctx, run(false))
                .await
                .unwrap(),
            Outcome::Ok {
                records: 3,
                written: true
            }
        ));
        // Each lead went to its region's team (others to inside sales), with its source tagged
        // and a first-call task for its new owner.
        let owners = texts(
            &t.db,
            "SELECT l.\"name\" || ' ' || l.\"source\" || ' ' || tm.\"key\" FROM \"crm__lead\" l JOIN \"team_members\" m ON m.\"user_id\" = l.\"owner\" JOIN \"teams\" tm ON tm.\"id\" = m.\"team_id\" WHERE l.\"name\" LIKE 'Import %' ORDER BY l.\"name\"",
        )
        .await;
        for want in [
            "Import East website east_sales",
            "Import Overseas website inside_sales",
            "Import South website south_sales",
        ] {
            assert!(
                owners.iter().any(|o| o == want),
                "{}: {owners:?}",
                t.backend
            );
        }
        assert_eq!(
            texts(&t.db, tasks).await,
            [
                "First call: Import East (杭州机器人)",
                "First call: Import Overseas (Globex)",
                "First call: Import South (Acme)"
            ],
            "{}",
            t.backend
        );
        let same_owner = texts(&t.db, "SELECT CAST(COUNT(*) AS TEXT) FROM \"crm__task\" k JOIN \"crm__lead\" l ON l.\"id\" = k.\"lead\" WHERE l.\"name\" LIKE 'Import %' AND k.\"assignee\" = l.\"owner\"").await;
        assert_eq!(same_owner, ["3"], "{}", t.backend);

        // A workflow that fails on a row refuses the whole import, naming the row and the workflow.
        let def = serde_json::json!({"key": "t", "entities": [
            {"key": "item", "fields": [{"key": "name", "type": "text", "max_length": 8}]}
        ], "workflows": [
            {"key": "stretch", "mode": "inline", "trigger": {"type": "record_created", "entity": "item", "condition": "record.name == \"grow\""},
             "nodes": [{"id": "grow", "type": "update_record", "values": {"name": "{{ record.name }} and grow"}}]}
        ]});
        trellis_server::appdef::import(
            &t.db,
            &def,
            Default::default(),
            Some(state.admin_user),
            now,
        )
        .await
        .unwrap();
        state.refresh().await.unwrap();
        let tl = state.app("t").unwrap();
        let item = tl.app.entity("item").unwrap();
        let file = write(dir.path(), "items.csv", "name\nok\nfine\ngrow\nok too\n");
        let sheet = sheets::read(&file).unwrap();
        let Outcome::Refused(ps) = sheets::import(&t.db, &tl.app, item, &sheet, &ctx, run(false))
            .await
            .unwrap()
        else {
            panic!("a failing workflow must refuse the import");
        };
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert_eq!(
            (
                ps[0].row,
                ps[0].column.as_str(),
                ps[0].header.as_str(),
                ps[0].code
            ),
            (4, "", "workflow stretch", "workflow_failed"),
            "{}",
            t.backend
        );
        assert!(ps[0].message.contains("`stretch`"), "{}", ps[0].message);
        assert_eq!(
            count(&t.db, &tl.app, "item").await,
            0,
            "nothing was written"
        );
    }
}

/// A sheet of more than one batch goes in chunks, each drafted and written side by side: bad
/// cells in any chunk are found at their own rows, and nothing is kept.
#[tokio::test]
async fn a_large_sheet_reports_bad_cells_at_their_rows_in_every_chunk() {
    const ROWS: usize = trellis_form::store::MAX_BATCH + 300;
    let dir = tempfile::tempdir().unwrap();
    let sheet_text = |bad: bool| {
        let mut text = String::from("name,source,region,email\n");
        for i in 0..ROWS {
            // Sheet row i + 2 (the header is row 1).
            let name = if bad && i == 4_999 {
                String::new()
            } else {
                format!("Lead {i}")
            };
            let source = if bad && i == 7 { "tv" } else { "website" };
            let email = if bad && i == 10_150 {
                "not-an-email".to_owned()
            } else {
                format!("lead{i}@example.com")
            };
            text.push_str(&format!("{name},{source},east,{email}\n"));
        }
        text
    };
    for t in testing::each().await {
        let (app, ctx) = setup(&t.db).await;
        let lead = app.entity("lead").unwrap();
        let bad = write(dir.path(), "bad.csv", &sheet_text(true));
        let sheet = sheets::read(&bad).unwrap();
        let Outcome::Refused(ps) = sheets::import(&t.db, &app, lead, &sheet, &ctx, REAL)
            .await
            .unwrap()
        else {
            panic!("a sheet with bad cells was imported ({})", t.backend)
        };
        let got = cells(&ps);
        assert_eq!(
            got,
            [
                (9, "B", "bad_cell"),
                (5_001, "A", "required"),
                (10_152, "D", "format")
            ],
            "{}",
            t.backend
        );
        assert_eq!(count(&t.db, &app, "lead").await, 0, "{}", t.backend);
        let good = write(dir.path(), "good.csv", &sheet_text(false));
        let sheet = sheets::read(&good).unwrap();
        assert!(matches!(
            sheets::import(&t.db, &app, lead, &sheet, &ctx, REAL)
                .await
                .unwrap(),
            Outcome::Ok {
                records: ROWS,
                written: true
            }
        ));
        assert_eq!(count(&t.db, &app, "lead").await, ROWS as i64);
        let (headers, rows) = sheets::table(&t.db, lead, vec![]).await.unwrap();
        let col = |h: &str| headers.iter().position(|x| x == h).unwrap();
        let mut last: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r[col("name")].as_str(), r[col("email")].as_str()))
            .filter(|(n, _)| *n == "Lead 10150" || *n == "Lead 0")
            .collect();
        last.sort();
        assert_eq!(
            last,
            [
                ("Lead 0", "lead0@example.com"),
                ("Lead 10150", "lead10150@example.com")
            ]
        );
        t.cleanup().await;
    }
}
