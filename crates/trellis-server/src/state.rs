//! Shared server state: the database, the clock and the compiled apps.
//!
//! Compiled apps are cached per process and replaced whenever this process imports a new
//! version. Handlers get the state through axum's `State`, never through globals.

use crate::error::{ApiError, ApiResult};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use trellis_form::db::Db;
use trellis_form::model::App;
use trellis_form::{Clock, Result};
use uuid::Uuid;

/// A compiled app and the user who owns its otherwise unowned records.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The compiled app.
    pub app: Arc<App>,
    /// Owner of records created without one.
    pub default_owner: Uuid,
    /// The app's compiled metrics and dashboards.
    pub reports: Arc<trellis_report::Reports>,
}

/// Everything a handler needs.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The database.
    pub db: Db,
    /// The clock every write takes its time from.
    pub clock: Arc<dyn Clock>,
    /// The bootstrap administrator.
    pub admin_user: Uuid,
    /// Group commit for single creates (SQLite only).
    pub writer: Option<crate::writer::Writer>,
    /// HTTP settings (rate limit, CORS, timeout).
    pub http: crate::limits::HttpSettings,
    /// Per-token rate limiter.
    pub limiter: Arc<crate::limits::RateLimiter>,
    /// The workflow runtime (inline runs, the durable queue, approvals).
    pub flows: Arc<trellis_flow::Runtime>,
    apps: Arc<RwLock<HashMap<String, Loaded>>>,
}

impl AppState {
    /// State over a migrated database; loads every installed app.
    pub async fn new(db: Db, clock: Arc<dyn Clock>, admin_user: Uuid) -> Result<Self> {
        Self::new_with(db, clock, admin_user, trellis_flow::Settings::default()).await
    }

    /// State with the workflow runtime's settings (SMTP relay, outbound allow-list, variables).
    pub async fn new_with(
        db: Db,
        clock: Arc<dyn Clock>,
        admin_user: Uuid,
        flow: trellis_flow::Settings,
    ) -> Result<Self> {
        let flows = Arc::new(trellis_flow::Runtime::new(db.clone(), clock.clone(), flow));
        let writer = (db.backend() == trellis_form::db::Backend::Sqlite)
            .then(|| crate::writer::Writer::spawn(db.clone(), flows.clone()));
        let http = crate::limits::HttpSettings::default();
        let limiter = Arc::new(crate::limits::RateLimiter::new(
            http.rate_per_second,
            http.burst,
        ));
        let state = AppState {
            db,
            clock,
            admin_user,
            writer,
            http,
            limiter,
            flows,
            apps: Arc::default(),
        };
        for app in trellis_form::apps::load_all(&state.db).await? {
            state.install(app).await?;
        }
        Ok(state)
    }

    /// The same state with other HTTP settings (a new rate limiter with them).
    pub fn with_http(mut self, http: crate::limits::HttpSettings) -> Self {
        self.limiter = Arc::new(crate::limits::RateLimiter::new(
            http.rate_per_second,
            http.burst,
        ));
        self.http = http;
        self
    }

    /// Put a compiled app into the cache.
    pub async fn install(&self, app: App) -> Result<()> {
        let owner = match &app.def.default_owner {
            Some(email) => trellis_form::users::by_email(&self.db, email)
                .await?
                .map(|u| u.id),
            None => None,
        };
        // An installed definition passed the report checks on import; one stored by an older
        // version that no longer passes keeps its records working, without reports.
        // Reports also need the tables to be what the model says (see trellis_report::verify).
        // Tables made by an earlier version get the columns this one reads.
        let upgraded = trellis_form::apps::upgrade(&self.db, &app).await?;
        if upgraded > 0 {
            tracing::info!(app = %app.key, columns = upgraded, "added and filled the stage days columns");
        }
        let reports = match trellis_report::Reports::compile(&app) {
            Ok(r) => match trellis_report::verify(&self.db, &app).await {
                Ok(()) => r,
                Err(trellis_form::FormError::Definition(ps)) => {
                    for p in &ps {
                        tracing::error!(app = %app.key, problem = %p.message, "reports are off for this app");
                    }
                    trellis_report::Reports::default()
                }
                Err(e) => return Err(e),
            },
            Err(e) => {
                tracing::warn!(app = %app.key, error = %e, "reports of this app do not compile");
                trellis_report::Reports::default()
            }
        };
        // Rollups: built (or rebuilt, when their definition changed) before the app takes
        // writes, then kept fresh by every write. Without reports none is kept, and none is
        // trusted when reports come back (they are rebuilt).
        let built =
            trellis_report::rollup::ensure(&self.db, &app, &reports, self.clock.now()).await?;
        for b in &built {
            tracing::info!(app = %app.key, rollup = %b.rollup, rows = b.rows, records = b.records, "rollup built");
        }
        trellis_report::rollup::attach(&app, &reports, self.db.backend())?;
        let app = Arc::new(app);
        let default_owner = owner.unwrap_or(self.admin_user);
        // Same for workflows: a stored definition that no longer compiles runs no automation.
        if let Err(e) = self.flows.install(app.clone(), Some(default_owner)).await {
            tracing::error!(app = %app.key, error = %e, "workflows are off for this app");
        }
        let loaded = Loaded {
            reports: Arc::new(reports),
            app,
            default_owner,
        };
        self.apps
            .write()
            .expect("apps lock")
            .insert(loaded.app.key.clone(), loaded);
        Ok(())
    }

    /// Reload every app whose installed version differs from the cached one (another process
    /// may have imported a new version into a shared PostgreSQL database).
    pub async fn refresh(&self) -> Result<usize> {
        let sql = trellis_form::db::Sql::new("SELECT \"key\", \"version\" FROM \"apps\"");
        let kinds = [
            trellis_form::model::ColKind::Text,
            trellis_form::model::ColKind::Int,
        ];
        let mut reloaded = 0;
        for row in self.db.fetch_all(&sql, &kinds).await? {
            let (trellis_form::db::Value::Text(key), trellis_form::db::Value::Int(version)) =
                (&row[0], &row[1])
            else {
                continue;
            };
            let cached = self
                .apps
                .read()
                .expect("apps lock")
                .get(key)
                .map(|l| l.app.version);
            if cached != Some(*version) {
                if let Some(app) = trellis_form::apps::load(&self.db, key).await? {
                    self.install(app).await?;
                    reloaded += 1;
                }
            }
        }
        Ok(reloaded)
    }

    /// The app `key`, or 404.
    pub fn app(&self, key: &str) -> ApiResult<Loaded> {
        self.apps
            .read()
            .expect("apps lock")
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("app `{key}` does not exist")))
    }

    /// Every installed app, by key.
    pub fn all_apps(&self) -> Vec<Loaded> {
        let mut v: Vec<Loaded> = self
            .apps
            .read()
            .expect("apps lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.app.key.cmp(&b.app.key));
        v
    }
}
