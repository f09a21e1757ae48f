//! `trellis bench writes`: the write-speed benchmark, with its own data generator.
//!
//! Each figure is measured beside a baseline in the same run on the same table, because these
//! machines are shared and noisy: single creates over HTTP (N concurrent clients) beside a raw
//! sqlx loop of one-row transactions, and batch and file imports beside a raw sqlx loop inside
//! one transaction. The server runs in this process on a loopback port, so client and server
//! share the machine's cores, as they would on a one-box install.

use crate::state::AppState;
use anyhow::Context;
use serde_json::{json, Value as Json};
use std::sync::Arc;
use std::time::Instant;
use trellis_form::db::{quote, Db, Sql, Value};
use trellis_form::SystemClock;

const SOURCES: [&str; 4] = ["online_ad", "trade_show", "website", "partner"];
const REGIONS: [&str; 6] = ["north", "east", "south", "west", "central", "overseas"];
const SURNAMES: [&str; 8] = [
    "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Zhao", "Huang",
];

/// A deterministic lead: the same `i` always gives the same record.
pub fn lead(run: &str, i: usize) -> Json {
    json!({
        "name": format!("{} {}", SURNAMES[i % SURNAMES.len()], i),
        "company": format!("Company {}", i / 3),
        "phone": format!("+86 138 {:04} {:04}", (i / 10_000) % 10_000, i % 10_000),
        "email": format!("lead{i}.{run}@example.com"),
        "source": SOURCES[i % SOURCES.len()],
        "region": REGIONS[(i / 7) % REGIONS.len()],
        "status": "new",
    })
}

/// One measured figure.
#[derive(Debug, serde::Serialize)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// Records written.
    pub records: usize,
    /// Seconds taken.
    pub seconds: f64,
    /// Records per second.
    pub per_second: f64,
}

fn figure(name: &str, records: usize, started: Instant) -> Figure {
    let seconds = started.elapsed().as_secs_f64();
    let f = Figure {
        name: name.into(),
        records,
        seconds,
        per_second: records as f64 / seconds,
    };
    eprintln!(
        "{:<44} {:>8} records {:>8.2} s {:>10.0} /s",
        f.name, f.records, f.seconds, f.per_second
    );
    f
}

/// Raw inserts of `n` generated leads straight into the lead table: the same columns a create
/// writes to the entity table, no validation, no history, no event.
async fn raw_inserts(
    db: &Db,
    app: &trellis_form::model::App,
    run: &str,
    n: usize,
    one_transaction: bool,
    owner: uuid::Uuid,
) -> anyhow::Result<()> {
    let e = app.entity("lead")?;
    let keys = [
        "name", "company", "phone", "email", "source", "region", "status",
    ];
    let mut tx = if one_transaction {
        Some(db.begin().await?)
    } else {
        None
    };
    for i in 0..n {
        let rec = lead(run, i);
        let now = trellis_form::Clock::now(&SystemClock);
        let mut sql = Sql::new(format!("INSERT INTO {} (\"id\", \"created_at\", \"updated_at\", \"created_by\", \"owner\", \"version\"", quote(&e.table)));
        for k in keys {
            sql.push(", ").ident(k);
        }
        sql.push(") VALUES (");
        sql.bind(Value::Uuid(uuid::Uuid::now_v7())).push(", ");
        sql.bind(Value::DateTime(now)).push(", ");
        sql.bind(Value::DateTime(now)).push(", ");
        sql.bind(Value::Uuid(owner)).push(", ");
        sql.bind(Value::Uuid(owner)).push(", ");
        sql.bind(Value::Int(1));
        for k in keys {
            sql.push(", ")
                .bind(Value::Text(rec[k].as_str().unwrap_or_default().to_owned()));
        }
        sql.push(")");
        match &mut tx {
            Some(tx) => {
                tx.execute(&sql).await?;
            }
            None => {
                let mut t = db.begin().await?;
                t.execute(&sql).await?;
                t.commit().await?;
            }
        }
    }
    if let Some(tx) = tx {
        tx.commit().await?;
    }
    Ok(())
}

/// Run the write benchmark on `db` (which must hold no app yet) and print the figures.
pub async fn writes(db: Db, records: usize, clients: usize) -> anyhow::Result<Vec<Figure>> {
    let token = crate::auth::new_token();
    let (state, _): (AppState, _) =
        crate::cli::prepare(db.clone(), Arc::new(SystemClock), None, Some(&token)).await?;
    // The benchmark measures throughput, not the per-token rate limit.
    let state = state.with_http(crate::limits::HttpSettings {
        rate_per_second: 0.0,
        ..Default::default()
    });
    // The form engine's write speed: the CRM without its automations (`trellis bench flows`
    // measures those).
    let mut def = crate::crm::definition();
    if let Some(m) = def.as_object_mut() {
        m.remove("workflows");
    }
    crate::appdef::import(
        &db,
        &def,
        Default::default(),
        Some(state.admin_user),
        trellis_form::Clock::now(&SystemClock),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    state.refresh().await?;
    let loaded = state.app("crm").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let app = loaded.app.clone();
    let owner = state.admin_user;
    let flows = state.flows.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(crate::serve_until(listener, state, std::future::pending()));
    let base = format!("http://{addr}/api/v1/apps/crm/records/lead");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let mut figures = vec![];

    // 1. Single creates over HTTP, `clients` at a time, beside one-row raw transactions.
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = vec![];
    for _ in 0..clients {
        let (client, base, token, next) =
            (client.clone(), base.clone(), token.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= records {
                    return Ok::<_, anyhow::Error>(());
                }
                let r = client
                    .post(&base)
                    .bearer_auth(&token)
                    .json(&lead("http", i))
                    .send()
                    .await?;
                anyhow::ensure!(
                    r.status() == reqwest::StatusCode::CREATED,
                    "create failed: {}",
                    r.text().await.unwrap_or_default()
                );
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    figures.push(figure(
        &format!("HTTP single creates ({clients} clients)"),
        records,
        started,
    ));
    let started = Instant::now();
    raw_inserts(&db, &app, "raw1", records, false, owner).await?;
    figures.push(figure(
        "baseline: raw sqlx insert, one per transaction",
        records,
        started,
    ));

    // 2. Batch import over HTTP (10,000 per request) beside raw inserts in one transaction.
    let batch_records = records * 4;
    // The request bodies are generated and serialised before the clock starts, as a load
    // generator replays prepared requests: the figure is the server's, not the generator's.
    let bodies: Vec<Vec<u8>> = (0..batch_records)
        .collect::<Vec<_>>()
        .chunks(trellis_form::store::MAX_BATCH)
        .map(|chunk| {
            let body =
                json!({"records": chunk.iter().map(|i| lead("batch", *i)).collect::<Vec<_>>()});
            serde_json::to_vec(&body)
        })
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    for body in bodies {
        let r = client
            .post(format!("{base}/batch"))
            .bearer_auth(&token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(
            r.status() == reqwest::StatusCode::CREATED,
            "batch failed: {}",
            r.text().await.unwrap_or_default()
        );
    }
    figures.push(figure(
        "HTTP batch import (10,000 per request)",
        batch_records,
        started,
    ));
    let started = Instant::now();
    raw_inserts(&db, &app, "raw2", batch_records, true, owner).await?;
    figures.push(figure(
        "baseline: raw sqlx insert, one transaction",
        batch_records,
        started,
    ));

    // 3. File import: a generated CSV through the spreadsheet path.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("leads.csv");
    {
        let mut w = csv::Writer::from_path(&path)?;
        w.write_record(["姓名", "公司", "电话", "邮箱", "商机来源", "区域", "状态"])?;
        for i in 0..batch_records {
            let l = lead("file", i);
            w.write_record(
                [
                    "name", "company", "phone", "email", "source", "region", "status",
                ]
                .map(|k| l[k].as_str().unwrap_or_default().to_owned()),
            )?;
        }
        w.flush()?;
    }
    let started = Instant::now();
    let sheet = crate::sheets::read(&path)?;
    let e = app.entity("lead")?;
    let ctx = trellis_form::store::WriteCtx {
        actor: Some(owner),
        now: trellis_form::Clock::now(&SystemClock),
        default_owner: Some(owner),
        import: true,
        depth: 0,
    };
    match crate::sheets::import(
        &db,
        &app,
        e,
        &sheet,
        &ctx,
        crate::sheets::Run {
            flows: Some(&*flows),
            ..Default::default()
        },
    )
    .await?
    {
        crate::sheets::Outcome::Ok { .. } => {}
        crate::sheets::Outcome::Refused(p) => anyhow::bail!("file import refused: {:?}", p.first()),
    }
    figures.push(figure(
        "CSV file import (trellis import)",
        batch_records,
        started,
    ));
    server.abort();
    Ok(figures)
}

/// Open a fresh database for the benchmark: the given URL, or a temporary SQLite file.
pub async fn open(url: Option<&str>) -> anyhow::Result<(Db, Option<tempfile::TempDir>)> {
    open_with(url, false).await
}

/// [`open`], or with `reuse` a database that already holds apps (`trellis bench reports --reuse`).
pub async fn open_with(
    url: Option<&str>,
    reuse: bool,
) -> anyhow::Result<(Db, Option<tempfile::TempDir>)> {
    let (url, dir) = match url {
        Some(u) => (u.to_owned(), None),
        None => {
            let d = tempfile::tempdir()?;
            (
                format!("sqlite://{}", d.path().join("bench.db").display()),
                Some(d),
            )
        }
    };
    let db = Db::connect(&url, &Default::default())
        .await
        .context("cannot open the benchmark database")?;
    db.migrate().await?;
    anyhow::ensure!(
        reuse || trellis_form::apps::load_all(&db).await?.is_empty(),
        "the benchmark needs an empty database"
    );
    Ok((db, dir))
}
