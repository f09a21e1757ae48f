//! The `trellis` command line: `serve`, `app check|plan|import|export`, `import`, `export`,
//! `user create`, `token create`, `bench writes`.

use crate::state::AppState;
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use trellis_form::apps::{self, ImportOptions};
use trellis_form::db::{Db, SqliteSettings};
use trellis_form::{Clock, FormError, SystemClock};

/// Trellis: a self-hosted no-code app builder engine.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TRELLIS_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the API server (installs the CRM app on an empty database).
    Serve(ServeArgs),
    /// Work with app definitions.
    #[command(subcommand)]
    App(AppCommand),
    /// Import a spreadsheet (CSV or XLSX) into an entity, all or nothing.
    Import(ImportArgs),
    /// Export an entity's records as CSV or XLSX.
    Export(ExportArgs),
    /// Fill a database with a large generated CRM history (sample data) for reports.
    DemoData {
        /// The app to fill (only the CRM, `crm`, is supported).
        #[arg(long, default_value = "crm")]
        app: String,
        /// Opportunities to generate (leads follow from the channels' conversion rates).
        #[arg(long, default_value_t = 100_000)]
        opportunities: usize,
        /// Seed of the generator: the same seed gives the same data.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Benchmarks with their own data generators and same-run baselines.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Rollups (pre-aggregated report tables the write path keeps fresh).
    #[command(subcommand)]
    Rollup(RollupCommand),
}

#[derive(Debug, Subcommand)]
enum RollupCommand {
    /// Recompute rollups from the base tables (all of the app's, or one).
    Rebuild {
        /// The app.
        #[arg(long)]
        app: String,
        /// Only this rollup.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a user. The password (at least 10 characters) is read from TRELLIS_PASSWORD.
    Create {
        /// Email (the login).
        #[arg(long)]
        email: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Email of the user's manager.
        #[arg(long)]
        manager: Option<String>,
        /// Make the user an administrator.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create an API token for a user and print it (once).
    Create {
        /// The user's email.
        #[arg(long)]
        email: String,
        /// A name to recognise the token by.
        #[arg(long)]
        name: String,
        /// What it may do.
        #[arg(long, value_enum, default_value = "write")]
        scope: crate::identity::Scope,
        /// Days until it expires (default: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Write speed: HTTP single creates, batch import and CSV import, each beside raw inserts.
    Writes {
        /// An EMPTY database to use (default: a temporary SQLite file).
        #[arg(long)]
        database_url: Option<String>,
        /// Single creates to make; batch and file imports write four times as many.
        #[arg(long, default_value_t = 5000)]
        records: usize,
        /// Concurrent HTTP clients for single creates.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Print the figures as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Workflow engine: inline assignment cost beside creates without it, async first-action
    /// latency at a steady rate, async runs per second, one rhai condition beside native code.
    Flows {
        /// An EMPTY database to use (default: a temporary SQLite file).
        #[arg(long)]
        database_url: Option<String>,
        /// Single creates with and without the inline workflow (each).
        #[arg(long, default_value_t = 300)]
        singles: usize,
        /// Steady rate of lead creates, per second.
        #[arg(long, default_value_t = 200)]
        rate: usize,
        /// Seconds of steady load.
        #[arg(long, default_value_t = 10)]
        seconds: usize,
        /// Leads of the throughput burst.
        #[arg(long, default_value_t = 5000)]
        burst: usize,
        /// Print the figures as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Report speed: each CRM metric and the sales_overview dashboard over generated data,
    /// each beside hand-written SQL for the same answer (SQLite).
    Reports {
        /// An EMPTY database to use (default: a temporary SQLite file).
        #[arg(long)]
        database_url: Option<String>,
        /// Opportunities to generate (and half as many leads).
        #[arg(long, default_value_t = 100_000)]
        opportunities: usize,
        /// Seed of the data generator.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Runs per query (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Time the data already in `--database-url` (made by `trellis demo-data`) instead of
        /// generating it: the database then need not be empty.
        #[arg(long)]
        reuse: bool,
        /// Print the figures as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `trellis import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// App key.
    #[arg(long)]
    pub app: String,
    /// Entity key.
    #[arg(long)]
    pub entity: String,
    /// The file: `.csv` (UTF-8, header row first) or `.xlsx` (first sheet).
    pub file: PathBuf,
    /// Check every cell and list every problem, but write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run no inline workflows on the imported records (a migration of records that already
    /// have their owners and tasks); their events still reach the async workflows.
    #[arg(long)]
    pub no_workflows: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

/// Options of `trellis export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// App key.
    #[arg(long)]
    pub app: String,
    /// Entity key.
    #[arg(long)]
    pub entity: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: crate::sheets::Format,
    /// Only records matching these conditions: a JSON list of {"field", "op", "value"}.
    #[arg(long)]
    pub filter: Option<String>,
    /// Write to this file (required for xlsx; CSV goes to standard output without it).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArgs,
}

/// Where the database is.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// `sqlite://PATH` (default `./trellis.db`) or `postgres://…`.
    #[arg(
        long,
        env = "TRELLIS_DATABASE_URL",
        default_value = "sqlite://trellis.db"
    )]
    pub database_url: String,
    /// SQLite `synchronous` level: `normal` survives a killed process; `full` also survives a
    /// power loss, at some write cost.
    #[arg(
        long,
        env = "TRELLIS_SQLITE_SYNCHRONOUS",
        value_enum,
        default_value = "normal"
    )]
    pub sqlite_synchronous: Synchronous,
    /// MiB of the SQLite file each read connection maps into memory (`PRAGMA mmap_size`); 0
    /// turns memory-mapped reads off. SQLite caps it at 2048.
    #[arg(
        long,
        env = "TRELLIS_SQLITE_MMAP_MB",
        default_value_t = SqliteSettings::MAX_READER_MMAP_MIB,
        value_parser = clap::value_parser!(u32).range(0..=i64::from(SqliteSettings::MAX_READER_MMAP_MIB))
    )]
    pub sqlite_mmap_mb: u32,
}

/// SQLite durability level.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Synchronous {
    /// WAL + NORMAL.
    Normal,
    /// WAL + FULL.
    Full,
}

/// Options of `trellis serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Address to listen on.
    #[arg(long, env = "TRELLIS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// App folder to install when the database has no app yet (default: the bundled CRM).
    #[arg(long, env = "TRELLIS_APP_DIR")]
    pub app_dir: Option<PathBuf>,
    /// Add the sample sales organisation (users, teams, CRM records; all marked as sample data)
    /// if it is not there yet.
    #[arg(long, env = "TRELLIS_DEMO")]
    pub demo: bool,
    /// Requests per second each token may make, sustained (0: no limit).
    #[arg(long, env = "TRELLIS_RATE_LIMIT", default_value_t = 200.0)]
    pub rate_limit: f64,
    /// Requests a token may make at once before the sustained rate applies.
    #[arg(long, env = "TRELLIS_RATE_BURST", default_value_t = 400.0)]
    pub rate_burst: f64,
    /// Browser origins allowed to call the API (comma-separated); CORS is off without them.
    #[arg(long, env = "TRELLIS_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Seconds a request may take before it is answered with 408.
    #[arg(long, env = "TRELLIS_REQUEST_TIMEOUT", default_value_t = 60)]
    pub request_timeout: u64,
}

#[derive(Debug, Subcommand)]
enum AppCommand {
    /// Check a definition offline; every error with its file and JSON path. Exit code 1 on errors.
    Check {
        /// App folder (app.json + entities/…) or a single JSON file.
        dir: PathBuf,
    },
    /// Show the migration plan of a definition against the database.
    Plan {
        /// App folder or JSON file.
        dir: PathBuf,
        #[command(flatten)]
        db: DbArgs,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write an installed app's definition as a folder (app.json + entities/…).
    Export {
        /// App key.
        app: String,
        /// Folder to write (created if missing; existing files of the same names are replaced).
        dir: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Apply a definition (with its migration plan) to the database.
    Import {
        /// App folder or JSON file.
        dir: PathBuf,
        #[command(flatten)]
        db: DbArgs,
        /// Apply destructive steps (drop fields or entities, change types, remove options).
        #[arg(long)]
        allow_destructive: bool,
        /// Only print the plan.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Parse arguments and run; the process exit code.
pub async fn main() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(args).await.map(|_| 0),
        Command::App(AppCommand::Check { dir }) => Ok(check(&dir)),
        Command::App(AppCommand::Plan { dir, db, json }) => plan(&dir, &db, json).await,
        Command::App(AppCommand::Export { app, dir, db }) => export_app(&app, &dir, &db).await,
        Command::Import(args) => import_sheet(&args).await,
        Command::User(UserCommand::Create {
            email,
            name,
            manager,
            admin,
            db,
        }) => user_create(&email, &name, manager.as_deref(), admin, &db).await,
        Command::Token(TokenCommand::Create {
            email,
            name,
            scope,
            expires_in_days,
            db,
        }) => token_create(&email, &name, scope, expires_in_days, &db).await,
        Command::Bench(BenchCommand::Writes {
            database_url,
            records,
            clients,
            json,
        }) => {
            let (db, _dir) = crate::bench::open(database_url.as_deref()).await?;
            eprintln!("Write benchmark on {} ({records} single creates, {} batch/file records, {clients} clients)", db.backend_name(), records * 4);
            let figures = crate::bench::writes(db, records, clients).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            }
            Ok(0)
        }
        Command::Bench(BenchCommand::Flows {
            database_url,
            singles,
            rate,
            seconds,
            burst,
            json,
        }) => {
            let (db, _dir) = crate::bench::open(database_url.as_deref()).await?;
            eprintln!(
                "Workflow benchmark on {} ({singles} single creates each way, {rate} leads/s for {seconds} s, a burst of {burst})",
                db.backend_name()
            );
            let lines = crate::bench_flows::run(db, singles, rate, seconds, burst).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            }
            Ok(0)
        }
        Command::Bench(BenchCommand::Reports {
            database_url,
            opportunities,
            seed,
            runs,
            reuse,
            json,
        }) => {
            if reuse && database_url.is_none() {
                anyhow::bail!("--reuse needs the --database-url that `trellis demo-data` filled");
            }
            let (db, _dir) = crate::bench::open_with(database_url.as_deref(), reuse).await?;
            let admin = crate::auth::ensure_admin(&db, SystemClock.now()).await?;
            if !reuse {
                crate::appdef::import(
                    &db,
                    &crate::crm::definition(),
                    ImportOptions::default(),
                    Some(admin),
                    SystemClock.now(),
                )
                .await
                .map_err(describe)?;
            }
            let app = apps::load(&db, "crm").await?.context(
                "the database has no crm app (--reuse needs one that `trellis demo-data` filled)",
            )?;
            let data = if reuse {
                "the data already there".to_owned()
            } else {
                format!("{opportunities} opportunities")
            };
            eprintln!(
                "Report benchmark on {} ({data}, median of {runs} runs)",
                db.backend_name()
            );
            let lines = crate::bench_reports::run(
                db,
                &app,
                admin,
                (!reuse).then_some(opportunities),
                seed,
                runs,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            }
            Ok(0)
        }
        Command::DemoData {
            app,
            opportunities,
            seed,
            db,
        } => demo_data(&app, opportunities, seed, &db).await,
        Command::Export(args) => export_sheet(&args).await,
        Command::Rollup(RollupCommand::Rebuild { app, name, db }) => {
            rollup_rebuild(&app, name.as_deref(), &db).await
        }
        Command::App(AppCommand::Import {
            dir,
            db,
            allow_destructive,
            dry_run,
        }) => {
            import(
                &dir,
                &db,
                ImportOptions {
                    allow_destructive,
                    dry_run,
                },
            )
            .await
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| "info,sqlx=warn,tower_http=info".into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Connect, migrate the system tables.
pub async fn open_db(args: &DbArgs) -> anyhow::Result<Db> {
    let settings = SqliteSettings {
        synchronous_full: args.sqlite_synchronous == Synchronous::Full,
        reader_mmap_mib: args.sqlite_mmap_mb,
        ..Default::default()
    };
    let db = Db::connect(&args.database_url, &settings)
        .await
        .with_context(|| format!("cannot open the database {}", redact(&args.database_url)))?;
    db.migrate()
        .await
        .context("cannot migrate the system tables")?;
    Ok(db)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Prepare a database for serving: admin user and token, the default app when none is installed.
/// Returns the state and, on first start, the generated admin token.
pub async fn prepare(
    db: Db,
    clock: Arc<dyn Clock>,
    app_dir: Option<&Path>,
    env_token: Option<&str>,
) -> anyhow::Result<(AppState, Option<String>)> {
    prepare_with(
        db,
        clock,
        app_dir,
        env_token,
        trellis_flow::Settings::default(),
    )
    .await
}

/// [`prepare`] with the workflow runtime's settings.
pub async fn prepare_with(
    db: Db,
    clock: Arc<dyn Clock>,
    app_dir: Option<&Path>,
    env_token: Option<&str>,
    flow: trellis_flow::Settings,
) -> anyhow::Result<(AppState, Option<String>)> {
    let (admin, token) = crate::auth::bootstrap(&db, clock.now(), env_token).await?;
    if apps::load_all(&db).await?.is_empty() {
        let def = match app_dir {
            Some(dir) => trellis_form::bundle::load(dir)?.definition,
            None => crate::crm::definition(),
        };
        let outcome = crate::appdef::import(
            &db,
            &def,
            ImportOptions::default(),
            Some(admin),
            clock.now(),
        )
        .await
        .map_err(describe)?;
        tracing::info!(app = %outcome.app, version = outcome.version, "installed app");
    }
    let state = AppState::new_with(db, clock, admin, flow).await?;
    Ok((state, token))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let db = open_db(&args.db).await?;
    let env_token = std::env::var("TRELLIS_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let (state, token) = prepare_with(
        db.clone(),
        Arc::new(SystemClock),
        args.app_dir.as_deref(),
        env_token.as_deref(),
        crate::workflows::settings_from_env()?,
    )
    .await?;
    if let Some(t) = token {
        println!("Admin token (shown once, store it now): {t}");
    }
    if args.demo {
        match state.app("crm") {
            Ok(loaded) => {
                let s = crate::demo::install(
                    &state.db,
                    &loaded.app,
                    state.admin_user,
                    state.clock.now(),
                )
                .await?;
                if s.users > 0 {
                    println!(
                        "Added the sample sales organisation: {} users, {} teams, records {:?}.",
                        s.users, s.teams, s.records
                    );
                }
            }
            Err(_) => eprintln!("--demo needs the CRM app (`crm`); it is not installed."),
        }
    }
    let state = state.with_http(crate::limits::HttpSettings {
        rate_per_second: args.rate_limit,
        burst: args.rate_burst,
        cors_origins: args.cors_origins.clone(),
        timeout_seconds: args.request_timeout,
    });
    // Users and teams are data: say which ones the workflows name but the database lacks.
    for loaded in state.all_apps() {
        for m in trellis_flow::compile::missing_references(&state.db, &loaded.app).await? {
            tracing::warn!(app = %loaded.app.key, path = %m.path, "{}", m.message);
        }
    }
    tokio::spawn(purge_history_hourly(state.clone()));
    tokio::spawn(follow_app_versions(state.clone()));
    tokio::spawn(evaluate_alerts(state.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("Trellis is listening on http://{addr}");
    tracing::info!(%addr, database = %redact(&args.db.database_url), "listening");
    crate::serve_until(listener, state, shutdown_signal()).await?;
    db.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Pick up app versions imported by other processes sharing the database.
async fn follow_app_versions(state: AppState) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        every.tick().await;
        match state.refresh().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(apps = n, "reloaded app definitions imported elsewhere"),
            Err(e) => tracing::warn!(error = %e, "cannot check app versions"),
        }
    }
}

/// Evaluate the apps' report alerts that are due, once a minute (each alert has its own
/// schedule; firings go to the events outbox).
async fn evaluate_alerts(state: AppState) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        every.tick().await;
        for loaded in state.all_apps() {
            let now = state.clock.now();
            match trellis_report::alerts::evaluate(&state.db, &loaded.app, &loaded.reports, now)
                .await
            {
                Ok(fired) => {
                    for f in fired {
                        tracing::info!(app = %loaded.app.key, alert = %f.alert, "alert fired")
                    }
                }
                Err(e) => {
                    tracing::warn!(app = %loaded.app.key, error = %e, "alert evaluation failed")
                }
            }
        }
    }
}

/// Apply each entity's history retention once an hour.
async fn purge_history_hourly(state: AppState) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        every.tick().await;
        for loaded in state.all_apps() {
            match trellis_form::store::purge_history(&state.db, &loaded.app, state.clock.now())
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(app = %loaded.app.key, rows = n, "purged history past its retention")
                }
                Err(e) => tracing::warn!(app = %loaded.app.key, error = %e, "history purge failed"),
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// Print every problem of a definition error, with its file.
fn print_problems(
    bundle: Option<&trellis_form::bundle::Bundle>,
    problems: &[trellis_form::Problem],
) {
    for p in problems {
        let file = bundle.map(|b| b.file_of(&p.path)).unwrap_or("app.json");
        eprintln!(
            "{file}: {} [{}] {}",
            if p.path.is_empty() { "/" } else { &p.path },
            p.code,
            p.message
        );
    }
}

fn describe(e: FormError) -> anyhow::Error {
    match &e {
        FormError::Definition(ps)
        | FormError::Destructive(ps)
        | FormError::MigrationConflict(ps) => {
            print_problems(None, ps);
            anyhow::anyhow!("{e}")
        }
        _ => anyhow::anyhow!(e),
    }
}

fn check(dir: &Path) -> i32 {
    let bundle = match trellis_form::bundle::load(dir) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let result = crate::appdef::check(&bundle.definition);
    match result {
        Ok(app) => {
            let fields: usize = app.entities.iter().map(|e| e.fields.len()).sum();
            println!(
                "{}: OK ({} entities, {fields} fields)",
                dir.display(),
                app.entities.len()
            );
            0
        }
        Err(FormError::Definition(ps)) => {
            print_problems(Some(&bundle), &ps);
            eprintln!("{} problem(s) found.", ps.len());
            1
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

async fn plan(dir: &Path, db: &DbArgs, json: bool) -> anyhow::Result<i32> {
    let bundle = trellis_form::bundle::load(dir)?;
    let db = open_db(db).await?;
    match apps::plan_import(&db, &bundle.definition).await {
        Ok((new, current, p)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                let from = current
                    .map(|c| format!("version {}", c.version))
                    .unwrap_or_else(|| "nothing installed".into());
                println!(
                    "Plan for app `{}` ({from} → version {}):",
                    new.key, new.version
                );
                print!("{}", p.render());
                if p.is_destructive() {
                    println!("Steps marked ! destroy data; import with --allow-destructive to apply them.");
                }
                // Users and teams are data: only a database can say whether workflows find them.
                let missing = trellis_flow::compile::missing_references(&db, &new).await?;
                if !missing.is_empty() {
                    println!("Warnings (users and teams the workflows name):");
                    for m in &missing {
                        println!("  {} [{}] {}", m.path, m.code, m.message);
                    }
                }
            }
            Ok(0)
        }
        Err(FormError::Definition(ps)) => {
            print_problems(Some(&bundle), &ps);
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

async fn import(dir: &Path, db: &DbArgs, opts: ImportOptions) -> anyhow::Result<i32> {
    let bundle = trellis_form::bundle::load(dir)?;
    let db = open_db(db).await?;
    let admin = crate::auth::ensure_admin(&db, SystemClock.now()).await?;
    match crate::appdef::import(
        &db,
        &bundle.definition,
        opts,
        Some(admin),
        SystemClock.now(),
    )
    .await
    {
        Ok(o) => {
            print!("{}", o.plan.render());
            if o.applied {
                println!("Applied: app `{}` is now at version {}.", o.app, o.version);
            } else if opts.dry_run {
                println!("Dry run: nothing was changed.");
            } else {
                println!(
                    "Nothing to change: app `{}` stays at version {}.",
                    o.app, o.version
                );
            }
            Ok(0)
        }
        Err(
            FormError::Definition(ps)
            | FormError::Destructive(ps)
            | FormError::MigrationConflict(ps),
        ) => {
            print_problems(Some(&bundle), &ps);
            eprintln!("Nothing was changed.");
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

async fn export_app(key: &str, dir: &Path, db: &DbArgs) -> anyhow::Result<i32> {
    let db = open_db(db).await?;
    let Some(app) = apps::load(&db, key).await? else {
        eprintln!("There is no app `{key}`.");
        return Ok(1);
    };
    let def = serde_json::to_value(&app.def)?;
    for (name, text) in trellis_form::bundle::to_files(&def) {
        let path = dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "Exported app `{key}` version {} to {}.",
        app.version,
        dir.display()
    );
    Ok(0)
}

/// The app's default owner: its `default_owner` user, else the administrator.
async fn default_owner(
    db: &Db,
    app: &trellis_form::model::App,
    admin: uuid::Uuid,
) -> anyhow::Result<uuid::Uuid> {
    Ok(match &app.def.default_owner {
        Some(email) => trellis_form::users::by_email(db, email)
            .await?
            .map(|u| u.id)
            .unwrap_or(admin),
        None => admin,
    })
}

/// Load an app for writing: its reports compiled and its rollups built and attached, so the
/// writes keep them fresh.
async fn load_writable(
    db: &trellis_form::db::Db,
    key: &str,
) -> anyhow::Result<Option<(trellis_form::model::App, trellis_report::Reports)>> {
    let Some(app) = apps::load(db, key).await? else {
        return Ok(None);
    };
    apps::upgrade(db, &app).await?;
    let reports = trellis_report::rollup::prepare(&app, db.backend()).map_err(describe)?;
    trellis_report::rollup::ensure(db, &app, &reports, SystemClock.now()).await?;
    Ok(Some((app, reports)))
}

async fn rollup_rebuild(app: &str, name: Option<&str>, db: &DbArgs) -> anyhow::Result<i32> {
    let db = open_db(db).await?;
    let Some(loaded) = apps::load(&db, app).await? else {
        eprintln!("There is no app `{app}`.");
        return Ok(1);
    };
    let reports = trellis_report::Reports::compile(&loaded).map_err(describe)?;
    if reports.rollups.is_empty() {
        eprintln!("App `{app}` declares no rollups.");
        return Ok(1);
    }
    let started = std::time::Instant::now();
    match trellis_report::rollup::rebuild(&db, &loaded, &reports, name, SystemClock.now()).await {
        Ok(done) => {
            for r in done {
                println!(
                    "Rebuilt {}: {} rows from {} records.",
                    r.rollup, r.rows, r.records
                );
            }
            println!("Done in {:.1} s.", started.elapsed().as_secs_f64());
            Ok(0)
        }
        Err(trellis_form::FormError::Query(ps)) => {
            for p in ps {
                eprintln!("{}", p.message);
            }
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

async fn import_sheet(args: &ImportArgs) -> anyhow::Result<i32> {
    let sheet = crate::sheets::read(&args.file)?;
    let db = open_db(&args.db).await?;
    let Some((app, _)) = load_writable(&db, &args.app).await? else {
        eprintln!("There is no app `{}`.", args.app);
        return Ok(1);
    };
    let app = Arc::new(app);
    let e = app.entity(&args.entity)?;
    let admin = crate::auth::ensure_admin(&db, SystemClock.now()).await?;
    let ctx = trellis_form::store::WriteCtx {
        actor: Some(admin),
        now: SystemClock.now(),
        default_owner: Some(default_owner(&db, &app, admin).await?),
        import: true,
        depth: 0,
    };
    // The app's inline workflows run on every imported record, as on a create through the API
    // (the CRM assigns each lead and gives its owner a first-call task); the async ones pick up
    // the records' events when `trellis serve` runs.
    let flows = if args.no_workflows {
        None
    } else {
        let flows = trellis_flow::Runtime::new(
            db.clone(),
            Arc::new(SystemClock),
            crate::workflows::settings_from_env()?,
        );
        match flows.install(app.clone(), ctx.default_owner).await {
            Ok(()) => Some(flows),
            // A stored definition that no longer compiles: `trellis serve` runs no automation
            // for it either.
            Err(FormError::Definition(ps)) => {
                eprintln!(
                    "warning: the workflows of `{}` do not compile ({}); importing without them.",
                    args.app,
                    ps.first().map(|p| p.message.as_str()).unwrap_or_default()
                );
                None
            }
            Err(e) => return Err(e.into()),
        }
    };
    use std::io::IsTerminal;
    let run = crate::sheets::Run {
        dry_run: args.dry_run,
        progress: std::io::stderr().is_terminal(),
        flows: flows.as_ref(),
    };
    match crate::sheets::import(&db, &app, e, &sheet, &ctx, run).await? {
        crate::sheets::Outcome::Ok {
            records,
            written: true,
        } => {
            println!(
                "Imported {records} record(s) into {}.{}.",
                args.app, args.entity
            );
            Ok(0)
        }
        crate::sheets::Outcome::Ok {
            records,
            written: false,
        } => {
            println!("Dry run: all {records} row(s) are valid; nothing was written.");
            Ok(0)
        }
        crate::sheets::Outcome::Refused(problems) => {
            for p in &problems {
                eprintln!(
                    "row {}, column {} ({}): [{}] {}",
                    p.row, p.column, p.header, p.code, p.message
                );
            }
            eprintln!("{} problem(s); nothing was written.", problems.len());
            Ok(1)
        }
    }
}

async fn export_sheet(args: &ExportArgs) -> anyhow::Result<i32> {
    let db = open_db(&args.db).await?;
    let Some(app) = apps::load(&db, &args.app).await? else {
        eprintln!("There is no app `{}`.", args.app);
        return Ok(1);
    };
    let e = app.entity(&args.entity)?;
    let filters: Vec<trellis_form::query::Filter> = match &args.filter {
        Some(f) => serde_json::from_str(f)
            .context("--filter must be a JSON list of {\"field\", \"op\", \"value\"} objects")?,
        None => vec![],
    };
    let (headers, rows) = match crate::sheets::table(&db, e, filters).await {
        Ok(t) => t,
        Err(err) => match err.downcast::<FormError>() {
            Ok(FormError::Query(ps)) => {
                for p in &ps {
                    eprintln!("--filter: {} [{}] {}", p.path, p.code, p.message);
                }
                return Ok(1);
            }
            Ok(other) => return Err(other.into()),
            Err(err) => return Err(err),
        },
    };
    match (args.format, &args.output) {
        (crate::sheets::Format::Csv, None) => {
            crate::sheets::write_csv(std::io::stdout().lock(), &headers, &rows)?
        }
        (crate::sheets::Format::Csv, Some(p)) => {
            use std::io::Write;
            let mut file = std::fs::File::create(p)
                .with_context(|| format!("cannot create {}", p.display()))?;
            // A byte order mark, so that Excel reads the UTF-8 (Chinese text) correctly.
            file.write_all("\u{feff}".as_bytes())?;
            crate::sheets::write_csv(file, &headers, &rows)?
        }
        (crate::sheets::Format::Xlsx, Some(p)) => crate::sheets::write_xlsx(p, &headers, &rows)?,
        (crate::sheets::Format::Xlsx, None) => {
            eprintln!("An XLSX export needs --output FILE.");
            return Ok(1);
        }
    }
    if let Some(p) = &args.output {
        eprintln!("Exported {} record(s) to {}.", rows.len(), p.display());
    }
    Ok(0)
}

async fn user_create(
    email: &str,
    name: &str,
    manager: Option<&str>,
    admin: bool,
    db: &DbArgs,
) -> anyhow::Result<i32> {
    let db = open_db(db).await?;
    let manager_id = match manager {
        Some(m) => match trellis_form::users::by_email(&db, m).await? {
            Some(u) => Some(u.id),
            None => {
                eprintln!("There is no user `{m}` to be the manager.");
                return Ok(1);
            }
        },
        None => None,
    };
    let input = trellis_form::users::UserInput {
        name: Some(name.to_owned()),
        email: Some(email.to_owned()),
        manager_id: Some(manager_id),
        is_admin: Some(admin),
        ..Default::default()
    };
    let mut tx = db.begin().await?;
    let result = async {
        let u = trellis_form::users::create(&mut tx, &input, SystemClock.now()).await?;
        let password = std::env::var("TRELLIS_PASSWORD").ok();
        if let Some(p) = &password {
            crate::identity::set_password(&mut tx, u.id, p).await?;
        }
        trellis_form::audit::record(
            &mut tx,
            SystemClock.now(),
            None,
            None,
            "user.create",
            &u.id.to_string(),
            serde_json::json!({"via": "cli", "name": u.name, "email": u.email, "is_admin": admin, "password_set": password.is_some()}),
        )
        .await?;
        Ok::<_, FormError>(u)
    }
    .await;
    match result {
        Ok(u) => {
            tx.commit().await?;
            println!("Created user {} <{}> ({}).", u.name, u.email, u.id);
            if std::env::var("TRELLIS_PASSWORD").is_err() {
                println!("No password set (TRELLIS_PASSWORD is not set): the user cannot log in until one is set.");
            }
            Ok(0)
        }
        Err(FormError::Invalid(ps)) => {
            for p in ps {
                eprintln!("{} [{}] {}", p.path, p.code, p.message);
            }
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

async fn token_create(
    email: &str,
    name: &str,
    scope: crate::identity::Scope,
    expires_in_days: Option<u32>,
    db: &DbArgs,
) -> anyhow::Result<i32> {
    let db = open_db(db).await?;
    let Some(user) = trellis_form::users::by_email(&db, email).await? else {
        eprintln!("There is no user `{email}`.");
        return Ok(1);
    };
    if name.trim().is_empty() || name.chars().count() > 100 {
        eprintln!("A token name is 1 to 100 characters long.");
        return Ok(1);
    }
    let now = SystemClock.now();
    // The same bounds as the API: 1 day to 10 years.
    let expires =
        expires_in_days.map(|d| now + chrono::Duration::days(i64::from(d.clamp(1, 3650))));
    let mut tx = db.begin().await?;
    let (token, id) =
        crate::identity::create_token(&mut tx, user.id, name, "api", scope, expires, now).await?;
    trellis_form::audit::record(
        &mut tx,
        now,
        None,
        None,
        "token.create",
        &id.to_string(),
        serde_json::json!({"via": "cli", "name": name, "scope": scope, "expires_at": expires.map(|t| trellis_form::values::datetime_json(&t)), "user_id": user.id}),
    )
    .await?;
    tx.commit().await?;
    eprintln!(
        "Token {id} for {} (scope {}), shown once:",
        user.email,
        scope.name()
    );
    println!("{token}");
    Ok(0)
}

async fn demo_data(app: &str, opportunities: usize, seed: u64, db: &DbArgs) -> anyhow::Result<i32> {
    let db = open_db(db).await?;
    let now = SystemClock.now();
    let admin = crate::auth::ensure_admin(&db, now).await?;
    if apps::load(&db, app).await?.is_none() && app == "crm" {
        crate::appdef::import(
            &db,
            &crate::crm::definition(),
            ImportOptions::default(),
            Some(admin),
            now,
        )
        .await
        .map_err(describe)?;
        eprintln!("Installed the CRM app.");
    }
    let Some((loaded, _)) = load_writable(&db, app).await? else {
        eprintln!("There is no app `{app}` in this database.");
        return Ok(1);
    };
    let opts = crate::demo_data::Options {
        opportunities,
        seed,
        now,
        progress: true,
    };
    let started = std::time::Instant::now();
    let sum = crate::demo_data::generate(&db, &loaded, admin, &opts).await?;
    println!(
        "Generated sample data in {:.1} s: {} accounts, {} leads, {} opportunities, {} stage-history rows.",
        started.elapsed().as_secs_f64(),
        sum.accounts,
        sum.leads,
        sum.opportunities,
        sum.history
    );
    Ok(0)
}
