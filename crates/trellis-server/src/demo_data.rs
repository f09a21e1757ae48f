//! `trellis demo-data --app crm`: a large, realistic CRM history for reports and benchmarks.
//!
//! Two years of leads with seasonality (a slow February, a busy year end); four channels that
//! convert to opportunities at different rates; opportunities that move through the pipeline
//! stage by stage with fixed odds, win or lose, or are still open; and one story to find with
//! the drill-down: in the last full quarter the `east` region's deals stalled at `proposal`, so
//! its `proposal` → `quoted` conversion fell from about 60% to about 25%.
//!
//! Rows are written straight into the CRM tables in multi-row statements (the stage-entry
//! columns, the stage history and the lead ↔ opportunity links included), bypassing
//! validation; a generator thread makes the rows while the writer writes them. A million
//! opportunities take about a minute on two cores (`docs/benchmarks.md`). Everything is
//! deterministic for a seed and a `now`, and every name says `(sample)`.

use anyhow::Context;
use chrono::{DateTime, Datelike, Duration, Utc};
use rand::{Rng, SeedableRng};
use trellis_form::db::{Db, Sql, Value};
use trellis_form::model::{App, ColKind};
use uuid::Uuid;

const OPEN: [&str; 5] = ["mql", "sql", "proposal", "quoted", "negotiation"];
/// Odds of moving on from each open stage.
const ADVANCE: [f64; 5] = [0.75, 0.7, 0.6, 0.75, 0.7];
/// (channel, share of leads, conversion to an opportunity).
const CHANNELS: [(&str, f64, f64); 4] = [
    ("online_ad", 0.4, 0.25),
    ("trade_show", 0.15, 0.45),
    ("website", 0.3, 0.35),
    ("partner", 0.15, 0.6),
];
const REGIONS: [&str; 6] = ["north", "east", "south", "west", "central", "overseas"];
const PRODUCTS: [&str; 4] = ["crm_suite", "analytics", "integration", "services"];
const INDUSTRIES: [&str; 8] = [
    "manufacturing",
    "retail",
    "finance",
    "technology",
    "healthcare",
    "education",
    "government",
    "other",
];
const LOSS: [&str; 7] = [
    "price",
    "competitor",
    "no_budget",
    "no_decision",
    "timing",
    "product_fit",
    "other",
];
/// Relative lead volume per month (January first).
const SEASON: [f64; 12] = [0.9, 0.6, 1.0, 1.0, 1.0, 1.1, 0.9, 0.9, 1.1, 0.9, 1.2, 1.3];
/// Rows gathered per table before they are written (`Tx::insert_rows`: one prepared statement
/// stepped per row on SQLite, 300-parameter statements on PostgreSQL).
const ROWS_PER_FLUSH: usize = 2_000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct Options {
    /// Opportunities to create (leads follow from the channels' conversion rates).
    pub opportunities: usize,
    /// Seed of the generator.
    pub seed: u64,
    /// The present: data ends here.
    pub now: DateTime<Utc>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What was written.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Accounts.
    pub accounts: usize,
    /// Leads.
    pub leads: usize,
    /// Opportunities.
    pub opportunities: usize,
    /// Stage-history rows.
    pub history: usize,
}

/// What the generator hands the writer.
enum Msg {
    /// Rows for one table.
    Rows {
        table: String,
        cols: Vec<String>,
        rows: Vec<Vec<Value>>,
    },
    /// Commit what was written so far (the write-ahead log stays small).
    Commit,
}

type Out = tokio::sync::mpsc::Sender<Msg>;

/// Rows of one table, handed to the writer in multi-row batches.
struct Table {
    name: String,
    cols: Vec<String>,
    rows: Vec<Vec<Value>>,
}

impl Table {
    fn new(name: &str, cols: &[&str]) -> Self {
        Table {
            name: name.into(),
            cols: cols.iter().map(|c| c.to_string()).collect(),
            rows: vec![],
        }
    }

    fn push(&mut self, out: &Out, row: Vec<Value>) -> anyhow::Result<()> {
        debug_assert_eq!(row.len(), self.cols.len());
        self.rows.push(row);
        if self.rows.len() >= ROWS_PER_FLUSH {
            self.flush(out)?;
        }
        Ok(())
    }

    fn flush(&mut self, out: &Out) -> anyhow::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let msg = Msg::Rows {
            table: self.name.clone(),
            cols: self.cols.clone(),
            rows: std::mem::take(&mut self.rows),
        };
        out.blocking_send(msg)
            .map_err(|_| anyhow::anyhow!("the writer stopped"))
    }
}

fn pick<'a>(rng: &mut impl Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.gen_range(0..xs.len())]
}

fn text(s: impl Into<String>) -> Value {
    Value::Text(s.into())
}

/// Start of the quarter holding `t`'s date, and the one before it.
fn last_full_quarter(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let d = now.date_naive();
    let q0 = chrono::NaiveDate::from_ymd_opt(d.year(), (d.month() - 1) / 3 * 3 + 1, 1)
        .expect("quarter start");
    let prev = months_back(q0, 3);
    (
        prev.and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
        q0.and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
    )
}

fn months_back(d: chrono::NaiveDate, n: u32) -> chrono::NaiveDate {
    d.checked_sub_months(chrono::Months::new(n))
        .expect("in range")
}

/// Fill the CRM `app` with generated history. The owners are the app's sales reps (else the
/// app's default owner `fallback`).
pub async fn generate(
    db: &Db,
    app: &App,
    fallback: Uuid,
    opts: &Options,
) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        app.entity("lead").is_ok() && app.entity("opportunity").is_ok(),
        "demo-data fills the CRM (`examples/crm`); app `{}` has no lead and opportunity entities",
        app.key
    );
    let lead_t = app.entity("lead")?.table.clone();
    let opp_t = app.entity("opportunity")?.table.clone();
    let acct_t = app.entity("account")?.table.clone();
    let mut reps = sales_reps(db, &app.key).await?;
    if reps.is_empty() {
        reps.push(fallback);
    }
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(opts.opportunities as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} opportunities {per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Bulk load: the big tables' plain indexes are built once at the end, not row by row.
    let dropped = drop_plain_indexes(db, &[&lead_t, &opp_t, "history"]).await?;
    let filled = fill(db, app, reps, opts, &bar, (lead_t, opp_t, acct_t)).await;
    // Summary fields (the lead's first opportunity) are kept by the write path, which these
    // rows went around: filled once from them, in a transaction of their own, before their
    // indexes are built (which happens whatever else failed).
    let summarised = match &filled {
        Ok(_) => {
            let mut tx = db.begin().await?;
            match trellis_form::summary::fill_empty(&mut tx, app).await {
                Ok(()) => tx.commit().await,
                Err(e) => Err(e),
            }
        }
        Err(_) => Ok(()),
    };
    let mut tx = db.begin().await?;
    for (name, ddl) in &dropped {
        tx.execute(&Sql::new(ddl.clone()))
            .await
            .with_context(|| format!("cannot rebuild the index {name}"))?;
    }
    tx.commit().await?;
    summarised?;
    let sum = filled?;
    bar.finish_and_clear();
    // The rows went in directly, not through the write path: rollups are computed once from
    // them (when the app's reports compile).
    if let Ok(reports) = trellis_report::Reports::compile(app) {
        trellis_report::rollup::rebuild(db, app, &reports, None, opts.now).await?;
    }
    Ok(sum)
}

/// Drop the indexes of `tables` that enforce nothing (not unique, not keys) and return their
/// names and definitions, to be built again after a bulk load.
async fn drop_plain_indexes(db: &Db, tables: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = vec![];
    for t in tables {
        let mut sql = match db.backend() {
            trellis_form::db::Backend::Sqlite => Sql::new(
                "SELECT \"name\", \"sql\" FROM \"sqlite_master\" WHERE \"type\" = 'index' AND \"sql\" IS NOT NULL AND \"tbl_name\" = ",
            ),
            trellis_form::db::Backend::Postgres => Sql::new(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = ",
            ),
        };
        sql.bind(text(*t));
        for r in db.fetch_all(&sql, &[ColKind::Text, ColKind::Text]).await? {
            if let (Value::Text(name), Value::Text(ddl)) = (&r[0], &r[1]) {
                if !ddl.to_uppercase().contains("UNIQUE") {
                    out.push((name.clone(), ddl.clone()));
                }
            }
        }
    }
    let mut tx = db.begin().await?;
    for (name, _) in &out {
        tx.execute(&Sql::new(format!(
            "DROP INDEX {}",
            trellis_form::db::quote(name)
        )))
        .await?;
    }
    tx.commit().await?;
    Ok(out)
}

/// Generate the records (see [`generate`]): the generator runs on a thread of its own and
/// hands batches of rows to this task, which writes them, so making rows and writing them
/// overlap on two cores.
async fn fill(
    db: &Db,
    app: &App,
    reps: Vec<Uuid>,
    opts: &Options,
    bar: &indicatif::ProgressBar,
    tables: (String, String, String),
) -> anyhow::Result<Summary> {
    let (out, mut rx) = tokio::sync::mpsc::channel(4);
    let gen = {
        let (key, opts, bar) = (app.key.clone(), opts.clone(), bar.clone());
        tokio::task::spawn_blocking(move || rows(&key, &reps, &opts, &bar, tables, &out))
    };
    let written = async {
        let mut tx = db.begin().await?;
        if db.backend() == trellis_form::db::Backend::Sqlite {
            // A big page cache for this (write) connection: with SQLite's 2 MB default, dirty
            // index pages spill to the log mid-transaction and each page is written many times.
            tx.execute(&Sql::new("PRAGMA cache_size = -262144")).await?;
        }
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Rows { table, cols, rows } => {
                    let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
                    tx.insert_rows(&table, &cols, &rows).await?;
                }
                Msg::Commit => {
                    tx.commit().await?;
                    tx = db.begin().await?;
                }
            }
        }
        tx.commit().await?;
        anyhow::Ok(())
    }
    .await;
    // A failed write drops the receiver, which stops the generator.
    drop(rx);
    let made = gen.await.context("the generator panicked")?;
    written?;
    made
}

/// Make the rows, in order, and send them to `out` (see [`fill`]).
fn rows(
    app_key: &str,
    reps: &[Uuid],
    opts: &Options,
    bar: &indicatif::ProgressBar,
    (lead_t, opp_t, acct_t): (String, String, String),
    out: &Out,
) -> anyhow::Result<Summary> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let now = opts.now;
    let start = now - Duration::days(730);
    let (drop_from, drop_to) = last_full_quarter(now);
    let mut sum = Summary::default();
    // Accounts: one per twenty opportunities.
    let mut accounts = Table::new(
        &acct_t,
        &[
            "id",
            "created_at",
            "updated_at",
            "owner",
            "version",
            "name",
            "industry",
            "region",
        ],
    );
    let n_accounts = (opts.opportunities / 20).max(1);
    let mut account_ids = Vec::with_capacity(n_accounts);
    for i in 0..n_accounts {
        let id = Uuid::from_u128((opts.seed as u128) << 64 | 0x1_0000_0000 | i as u128);
        account_ids.push(id);
        let row = vec![
            Value::Uuid(id),
            Value::DateTime(start),
            Value::DateTime(start),
            Value::Uuid(reps[i % reps.len()]),
            Value::Int(1),
            text(format!("Account {i} (sample)")),
            text(pick(&mut rng, &INDUSTRIES)),
            text(pick(&mut rng, &REGIONS)),
        ];
        accounts.push(out, row)?;
    }
    accounts.flush(out)?;
    sum.accounts = n_accounts;
    let mut leads = Table::new(
        &lead_t,
        &[
            "id",
            "created_at",
            "updated_at",
            "owner",
            "version",
            "name",
            "source",
            "region",
            "product_interest",
            "status",
            "converted_opportunity",
        ],
    );
    let mut opp_cols = vec![
        "id",
        "created_at",
        "updated_at",
        "owner",
        "version",
        "name",
        "account",
        "lead",
        "source",
        "region",
        "product_line",
        "industry",
        "amount",
        "amount__currency",
        "quoted_amount",
        "quoted_amount__currency",
        "expected_close_date",
        "needs_summary",
        "loss_reason",
        "stage",
        "stage__changed_at",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    let all_stages: Vec<&str> = OPEN.iter().copied().chain(["won", "lost"]).collect();
    for s in &all_stages {
        opp_cols.push(format!("stage__entered_{s}"));
    }
    for s in &all_stages {
        opp_cols.push(format!("stage__days_{s}"));
    }
    let opp_cols_ref: Vec<&str> = opp_cols.iter().map(String::as_str).collect();
    let mut opps = Table::new(&opp_t, &opp_cols_ref);
    let mut hist = Table::new(
        "history",
        &[
            "app",
            "entity",
            "record_id",
            "field",
            "old_value",
            "new_value",
            "at",
        ],
    );
    let mut i = 0usize;
    while sum.opportunities < opts.opportunities {
        // A lead: when (with the season), from where, and whether it converts.
        let created = loop {
            let t = start + Duration::seconds(rng.gen_range(0..730 * 86_400));
            if rng.gen_bool(SEASON[t.month0() as usize] / 1.3) {
                break t;
            }
        };
        let r: f64 = rng.gen();
        let mut acc = 0.0;
        let (source, _, rate) = *CHANNELS
            .iter()
            .find(|(_, share, _)| {
                acc += share;
                r < acc
            })
            .unwrap_or(&CHANNELS[0]);
        let region = pick(&mut rng, &REGIONS);
        let product = pick(&mut rng, &PRODUCTS);
        let owner = reps[i % reps.len()];
        let lead_id = Uuid::from_u128((opts.seed as u128) << 64 | 0x2_0000_0000 | i as u128);
        let opp_at = created + Duration::hours(rng.gen_range(2..24 * 14));
        let converts = rng.gen_bool(rate) && opp_at < now;
        let opp_id = Uuid::from_u128((opts.seed as u128) << 64 | 0x3_0000_0000 | i as u128);
        i += 1;
        let status = if converts {
            "qualified"
        } else {
            pick(&mut rng, &["new", "contacted", "disqualified"])
        };
        let lead_row = vec![
            Value::Uuid(lead_id),
            Value::DateTime(created),
            Value::DateTime(if converts { opp_at } else { created }),
            Value::Uuid(owner),
            Value::Int(1),
            text(format!("Lead {i} (sample)")),
            text(source),
            text(region),
            text(product),
            text(status),
            if converts {
                Value::Uuid(opp_id)
            } else {
                Value::Null(ColKind::Uuid)
            },
        ];
        leads.push(out, lead_row)?;
        sum.leads += 1;
        if !converts {
            continue;
        }
        // The opportunity's path through the pipeline.
        let mut entered: Vec<(&str, DateTime<Utc>)> = vec![("mql", opp_at)];
        let mut t = opp_at;
        let mut k = 0;
        loop {
            t += Duration::hours(rng.gen_range(12..24 * 20));
            if t > now {
                break;
            }
            let mut odds = ADVANCE[k] + if source == "partner" { 0.1 } else { 0.0 };
            // Deals that entered proposal in the east last quarter stalled there.
            let since = entered.last().map(|e| e.1).unwrap_or(t);
            if OPEN[k] == "proposal" && region == "east" && since >= drop_from && since < drop_to {
                odds = 0.25;
            }
            if k == OPEN.len() - 1 {
                entered.push((if rng.gen_bool(0.55) { "won" } else { "lost" }, t));
                break;
            }
            if rng.gen_bool(odds.min(0.95)) {
                k += 1;
                entered.push((OPEN[k], t));
            } else {
                // Not moving on: lost now, or still waiting.
                if rng.gen_bool(0.7) {
                    entered.push(("lost", t));
                }
                break;
            }
        }
        let (stage, changed) = *entered.last().expect("mql");
        let amount = Value::Decimal(rust_decimal::Decimal::from(rng.gen_range(5..500) * 1000));
        let reached = |s: &str| entered.iter().any(|(x, _)| *x == s);
        let mut row = vec![
            Value::Uuid(opp_id),
            Value::DateTime(opp_at),
            Value::DateTime(changed),
            Value::Uuid(owner),
            Value::Int(1),
            text(format!("Deal {i} (sample)")),
            Value::Uuid(account_ids[rng.gen_range(0..account_ids.len())]),
            Value::Uuid(lead_id),
            text(source),
            text(region),
            text(product),
            text(pick(&mut rng, &INDUSTRIES)),
            amount.clone(),
            text("CNY"),
            if reached("quoted") {
                amount.clone()
            } else {
                Value::Null(ColKind::Decimal)
            },
            if reached("quoted") {
                text("CNY")
            } else {
                Value::Null(ColKind::Text)
            },
            Value::Date((opp_at + Duration::days(rng.gen_range(30..180))).date_naive()),
            if reached("proposal") {
                text("Needs summary (sample)")
            } else {
                Value::Null(ColKind::Text)
            },
            if stage == "lost" {
                text(pick(&mut rng, &LOSS))
            } else {
                Value::Null(ColKind::Text)
            },
            text(stage),
            Value::DateTime(changed),
        ];
        for s in &all_stages {
            row.push(match entered.iter().find(|(x, _)| x == s) {
                Some((_, at)) => Value::DateTime(*at),
                None => Value::Null(ColKind::DateTime),
            });
        }
        let finished = trellis_form::model::finished_stays(&entered);
        for s in &all_stages {
            row.push(match finished.iter().find(|(x, _)| x == s) {
                Some((_, d)) => Value::Decimal(
                    rust_decimal::Decimal::from_f64_retain(*d)
                        .unwrap_or_default()
                        .round_dp(9),
                ),
                None => Value::Null(ColKind::Decimal),
            });
        }
        opps.push(out, row)?;
        let mut prev = serde_json::Value::Null;
        for (s, at) in &entered {
            let row = vec![
                text(app_key),
                text("opportunity"),
                Value::Uuid(opp_id),
                text("stage"),
                Value::Json(prev),
                Value::Json(serde_json::json!(s)),
                Value::DateTime(*at),
            ];
            hist.push(out, row)?;
            prev = serde_json::json!(s);
            sum.history += 1;
        }
        sum.opportunities += 1;
        if sum.opportunities % 10_000 == 0 {
            bar.set_position(sum.opportunities as u64);
            // Commit in slices, so the write-ahead log stays small.
            for t in [&mut leads, &mut opps, &mut hist] {
                t.flush(out)?;
            }
            out.blocking_send(Msg::Commit)
                .map_err(|_| anyhow::anyhow!("the writer stopped"))?;
        }
    }
    for t in [&mut leads, &mut opps, &mut hist] {
        t.flush(out)?;
    }
    Ok(sum)
}

/// The users with the `sales_rep` role in `app`, in a stable order.
async fn sales_reps(db: &Db, app: &str) -> anyhow::Result<Vec<Uuid>> {
    let mut sql = Sql::new("SELECT \"user_id\" FROM \"app_members\" WHERE \"app\" = ");
    sql.bind(text(app))
        .push(" AND \"role\" = 'sales_rep' ORDER BY \"user_id\"");
    let rows = db
        .fetch_all(&sql, &[ColKind::Uuid])
        .await
        .context("cannot read the app's members")?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match r[0] {
            Value::Uuid(u) => Some(u),
            _ => None,
        })
        .collect())
}
