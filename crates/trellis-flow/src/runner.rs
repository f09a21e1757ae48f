//! The durable runner: events become runs, runs advance node by node, and every state change is a
//! database write made under the worker's lease.
//!
//! * **Enqueueing is transactional.** Every write stores an event in its own transaction (the
//!   form engine's outbox); [`Runtime::dispatch`] turns committed events into runs and marks the
//!   events processed in one transaction. A run therefore exists if and only if its write
//!   committed, and a crash between the two only delays it.
//! * **Inline** workflows run inside the triggering write's transaction ([`Runtime::inline`]):
//!   exactly once, visible in the API response.
//! * **Leases.** [`Runtime::work`] claims due runs by setting `lease_owner`/`lease_until`
//!   (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite has one writer). Every later change of the run
//!   is an `UPDATE … WHERE lease_owner = me`, so a worker that lost its lease cannot overwrite the
//!   state another worker made. [`Runtime::rescue`] re-queues runs whose lease lapsed and logs why.
//! * **Database steps** commit their writes and their completion together: exactly once.
//!   **Side effects** (email, HTTP, IM) record a `started` step first, then act, then complete; a
//!   crash in between repeats the effect with the same idempotency key (`webhook-id`, email
//!   `Message-ID`), so receivers can drop the repeat.

use crate::actions::{self, record_id, run_db_node, Env, Outcome};
use crate::compile::{self, cond_name, tpl_name, Flows, Workflow};
use crate::def::{Action, ApprovalRule, ImFormat, Mode, NodeDef, Trigger, Vars, WorkflowDef};
use crate::netguard::{self, AllowList};
use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use trellis_form::db::{Backend, Db, Sql, Tx, Value};
use trellis_form::model::{App, ColKind};
use trellis_form::store::{self, WriteCtx};
use trellis_form::Clock;
use uuid::Uuid;

/// SMTP relay settings.
#[derive(Debug, Clone)]
pub struct Smtp {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Sender address.
    pub from: String,
    /// Transport security.
    pub tls: SmtpTls,
    /// User name and password, if the relay wants them.
    pub credentials: Option<(String, String)>,
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP (a local relay or a test sink).
    #[default]
    None,
    /// STARTTLS, required (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// How the runtime behaves; handed in by the host.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This worker's id (lease owner).
    pub worker: String,
    /// Template variables (`vars.X`).
    pub vars: Vars,
    /// Internal addresses outbound requests may reach.
    pub allow: AllowList,
    /// SMTP relay; without it emails stay in the outbox.
    pub smtp: Option<Smtp>,
    /// Longest chain of workflows triggering each other.
    pub max_depth: u32,
    /// Lease length.
    pub lease: Duration,
    /// Runs claimed per round.
    pub batch: usize,
    /// How often the host looks for idle records (inactivity triggers).
    pub scan_every: std::time::Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            worker: format!("worker-{}", Uuid::new_v4().simple()),
            vars: Vars::new(),
            allow: AllowList::default(),
            smtp: None,
            max_depth: 5,
            lease: Duration::seconds(15),
            batch: 256,
            scan_every: std::time::Duration::from_secs(30),
        }
    }
}

/// Errors of the runtime's own bookkeeping (a failing action is not one: it is logged on the run).
pub type Result<T> = std::result::Result<T, trellis_form::FormError>;

struct Installed {
    app: Arc<App>,
    flows: Arc<Flows>,
    default_owner: Option<Uuid>,
}

/// The workflow runtime of one process.
pub struct Runtime {
    mailer: Option<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>,
    db: Db,
    clock: Arc<dyn Clock>,
    settings: Settings,
    apps: RwLock<HashMap<String, Arc<Installed>>>,
    pinned: Mutex<HashMap<(String, String, i64), Arc<Workflow>>>,
    /// Woken after each commit that may have made events (the host calls `notify_one`).
    pub wake: Arc<tokio::sync::Notify>,
    /// Woken when runs became due (dispatch, manual start, a decision).
    pub work_wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("worker", &self.settings.worker)
            .finish()
    }
}

/// An outbox event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event id.
    pub id: i64,
    /// App key.
    pub app: String,
    /// Entity key.
    pub entity: String,
    /// Record id.
    pub record_id: Uuid,
    /// created | updated | deleted.
    pub kind: String,
    /// Changed fields.
    pub changed: Vec<String>,
    /// The record after the write (before, for a delete).
    pub record: Json,
    /// Previous values of changed fields (updates).
    pub old: Json,
    /// Who wrote.
    pub actor: Option<Uuid>,
    /// When.
    pub at: DateTime<Utc>,
    /// Chain depth.
    pub depth: u32,
}

const EVENT_COLS: &str = "\"id\", \"app\", \"entity\", \"record_id\", \"kind\", \"changed\", \"record\", \"actor\", \"at\", \"depth\"";
const EVENT_KINDS: [ColKind; 10] = [
    ColKind::Int,
    ColKind::Text,
    ColKind::Text,
    ColKind::Uuid,
    ColKind::Text,
    ColKind::Json,
    ColKind::Json,
    ColKind::Uuid,
    ColKind::DateTime,
    ColKind::Int,
];

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        _ => String::new(),
    }
}
fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        _ => 0,
    }
}
fn uuid(v: &Value) -> Option<Uuid> {
    match v {
        Value::Uuid(u) => Some(*u),
        _ => None,
    }
}
fn json_of(v: &Value) -> Json {
    match v {
        Value::Json(j) => j.clone(),
        _ => Json::Null,
    }
}
fn time(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::DateTime(t) => Some(*t),
        _ => None,
    }
}

fn event(r: Vec<Value>) -> Event {
    let mut record = json_of(&r[6]);
    let old = record
        .as_object_mut()
        .and_then(|m| m.remove("old"))
        .unwrap_or(Json::Null);
    Event {
        id: int(&r[0]),
        app: text(&r[1]),
        entity: text(&r[2]),
        record_id: uuid(&r[3]).unwrap_or_default(),
        kind: text(&r[4]),
        changed: json_of(&r[5])
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        record,
        old,
        actor: uuid(&r[7]),
        at: time(&r[8]).unwrap_or_default(),
        depth: int(&r[9]) as u32,
    }
}

impl Event {
    /// An event that is not an outbox row (manual start, a scan, a hook, a dry run): nothing
    /// changed, depth 0.
    fn about(
        app: impl Into<String>,
        entity: impl Into<String>,
        record_id: Uuid,
        kind: &str,
        record: Json,
        actor: Option<Uuid>,
        at: DateTime<Utc>,
    ) -> Self {
        Event {
            id: 0,
            app: app.into(),
            entity: entity.into(),
            record_id,
            kind: kind.into(),
            changed: vec![],
            record,
            old: Json::Null,
            actor,
            at,
            depth: 0,
        }
    }
}

/// The context conditions and templates see.
fn context(ev: &Event, vars: &Vars, now: DateTime<Utc>, inst: &Installed) -> Json {
    json!({
        "app": { "key": inst.app.key, "default_owner": inst.default_owner },
        "record": ev.record,
        "old": ev.old,
        "changed": ev.changed,
        "user": { "id": ev.actor },
        "now": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "event": { "id": ev.id, "kind": ev.kind, "at": ev.at },
        "steps": {},
        "vars": vars,
    })
}

/// The event kind a report alert writes to the outbox (entity `report`, record = the firing).
const ALERT_FIRED: &str = "alert.fired";

/// Whether `wf` watches the entity (or, for alerts, the report events) of `ev`.
fn listens(wf: &Workflow, ev: &Event) -> bool {
    match wf.def.trigger {
        Trigger::AlertFired { .. } => ev.entity == "report",
        _ => wf.def.trigger.entity() == ev.entity,
    }
}

/// Whether `wf`'s trigger matches `ev` (its condition included).
fn matches(wf: &Workflow, ev: &Event, ctx: &Json, app: &App) -> std::result::Result<bool, String> {
    if !listens(wf, ev) {
        return Ok(false);
    }
    let hit = match &wf.def.trigger {
        Trigger::AlertFired { alert, .. } => {
            ev.kind == ALERT_FIRED && ev.record.get("alert").and_then(Json::as_str) == Some(alert)
        }
        Trigger::RecordCreated { .. } => ev.kind == "created",
        Trigger::RecordUpdated { fields, .. } => {
            ev.kind == "updated"
                && (fields.is_empty() || fields.iter().any(|f| ev.changed.contains(f)))
        }
        Trigger::StageChanged { from, to, .. } => {
            let Some(sf) = app.entity(&ev.entity).ok().and_then(|e| e.stage()) else {
                return Ok(false);
            };
            let key = &sf.key;
            ev.kind == "updated"
                && ev.changed.contains(key)
                && (from.is_empty()
                    || ev
                        .old
                        .get(key)
                        .and_then(Json::as_str)
                        .is_some_and(|s| from.iter().any(|f| f == s)))
                && (to.is_empty()
                    || ev
                        .record
                        .get(key)
                        .and_then(Json::as_str)
                        .is_some_and(|s| to.iter().any(|t| t == s)))
        }
        Trigger::RecordDeleted { .. } => ev.kind == "deleted",
        Trigger::Inactivity { .. }
        | Trigger::DateRelative { .. }
        | Trigger::Manual { .. }
        | Trigger::Webhook { .. }
        | Trigger::Schedule { .. } => false,
    };
    if !hit {
        return Ok(false);
    }
    match wf.def.trigger.condition() {
        Some(_) => wf
            .condition(&cond_name(&["trigger", "condition"]))
            .eval(ctx),
        None => Ok(true),
    }
}

/// A claimed run.
#[derive(Debug, Clone)]
struct Claimed {
    id: Uuid,
    app: String,
    workflow: String,
    version: i64,
    entity: String,
    context: Json,
    node: Option<String>,
    steps: Json,
    attempt: u32,
    depth: u32,
    /// Number of the last step logged (steps are numbered per run).
    seq: i64,
}

const RUN_COLS: &str = "\"id\", \"app\", \"workflow\", \"version\", \"entity\", \"context\", \"node\", \"steps\", \"attempt\", \"depth\"";
const RUN_KINDS: [ColKind; 11] = [
    ColKind::Uuid,
    ColKind::Text,
    ColKind::Text,
    ColKind::Int,
    ColKind::Text,
    ColKind::Json,
    ColKind::Text,
    ColKind::Json,
    ColKind::Int,
    ColKind::Int,
    ColKind::Int,
];

fn claimed(r: Vec<Value>) -> Claimed {
    Claimed {
        id: uuid(&r[0]).unwrap_or_default(),
        app: text(&r[1]),
        workflow: text(&r[2]),
        version: int(&r[3]),
        entity: text(&r[4]),
        context: json_of(&r[5]),
        node: match &r[6] {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        },
        steps: json_of(&r[7]),
        attempt: int(&r[8]) as u32,
        depth: int(&r[9]) as u32,
        seq: int(&r[10]),
    }
}

/// What a database step did inside a transaction.
enum InTx {
    /// Done: the next node (`None`: the run finished), or the edge condition's error.
    Done(std::result::Result<Option<String>, String>),
    /// The lease is gone: nothing of the step may commit.
    Lost,
    /// The node failed (message, milliseconds): its writes must be rolled back.
    Failed(String, i64),
    /// The node has a side effect to perform: it runs on its own (nothing was written).
    NotHere,
}

/// What happened to a run in one go.
enum Next {
    /// Go on with this node.
    Node(Option<String>),
    /// Sleep until then.
    Sleep(DateTime<Utc>),
    /// The lease is gone; stop touching the run.
    Lost,
}

impl Runtime {
    /// A runtime over `db` with `clock`.
    pub fn new(db: Db, clock: Arc<dyn Clock>, settings: Settings) -> Self {
        // One pooled SMTP transport: connections are reused across emails.
        let mailer = settings.smtp.as_ref().and_then(|smtp| {
            type T = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;
            let builder = match smtp.tls {
                SmtpTls::None => Ok(T::builder_dangerous(&smtp.host)),
                SmtpTls::StartTls => T::starttls_relay(&smtp.host),
                SmtpTls::Tls => T::relay(&smtp.host),
            };
            let mut builder = match builder {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(host = %smtp.host, error = %e, "cannot set up the SMTP relay; emails stay in the outbox");
                    return None;
                }
            };
            if let Some((user, password)) = &smtp.credentials {
                builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
                    user.clone(),
                    password.clone(),
                ));
            }
            Some(
                builder
                    .port(smtp.port)
                    .timeout(Some(std::time::Duration::from_secs(10)))
                    .build(),
            )
        });
        Runtime {
            mailer,
            db,
            clock,
            settings,
            apps: RwLock::default(),
            pinned: Mutex::default(),
            wake: Arc::new(tokio::sync::Notify::new()),
            work_wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Compile and install the workflows of `app`; keeps every version runs may need.
    /// `default_owner` owns records nobody was assigned to (`app.default_owner` in conditions).
    pub async fn install(&self, app: Arc<App>, default_owner: Option<Uuid>) -> Result<()> {
        let flows = compile::compile(&app).map_err(trellis_form::FormError::Definition)?;
        let now = self.clock.now();
        for wf in flows.workflows.values() {
            let mut sql = Sql::new("INSERT INTO \"flow_versions\" (\"app\", \"workflow\", \"version\", \"definition\", \"created_at\") VALUES (");
            sql.bind(Value::Text(app.key.clone())).push(", ");
            sql.bind(Value::Text(wf.def.key.clone())).push(", ");
            sql.bind(Value::Int(wf.def.version)).push(", ");
            sql.bind(Value::Json(
                serde_json::to_value(&wf.def).expect("serializable"),
            ))
            .push(", ");
            sql.bind(Value::DateTime(now)).push(
                ") ON CONFLICT (\"app\", \"workflow\", \"version\") DO UPDATE SET \"definition\" = excluded.\"definition\"",
            );
            let mut tx = self.db.begin().await?;
            tx.execute(&sql).await?;
            tx.commit().await?;
            self.pinned.lock().expect("pinned").insert(
                (app.key.clone(), wf.def.key.clone(), wf.def.version),
                wf.clone(),
            );
        }
        self.apps.write().expect("apps").insert(
            app.key.clone(),
            Arc::new(Installed {
                app,
                flows: Arc::new(flows),
                default_owner,
            }),
        );
        Ok(())
    }

    fn all_installed(&self) -> Vec<Arc<Installed>> {
        self.apps.read().expect("apps").values().cloned().collect()
    }

    fn installed(&self, app: &str) -> Option<Arc<Installed>> {
        self.apps.read().expect("apps").get(app).cloned()
    }

    /// The compiled workflows of an installed app.
    pub fn flows(&self, app: &str) -> Option<Arc<Flows>> {
        self.installed(app).map(|i| i.flows.clone())
    }

    /// The workflow version a run pinned.
    async fn pinned(&self, inst: &Installed, key: &str, version: i64) -> Result<Arc<Workflow>> {
        let k = (inst.app.key.clone(), key.to_owned(), version);
        if let Some(w) = self.pinned.lock().expect("pinned").get(&k) {
            return Ok(w.clone());
        }
        let mut sql = Sql::new("SELECT \"definition\" FROM \"flow_versions\" WHERE \"app\" = ");
        sql.bind(Value::Text(k.0.clone()))
            .push(" AND \"workflow\" = ")
            .bind(Value::Text(k.1.clone()))
            .push(" AND \"version\" = ")
            .bind(Value::Int(version));
        let row = self
            .db
            .fetch_optional(&sql, &[ColKind::Json])
            .await?
            .ok_or(trellis_form::FormError::NotFound("workflow version"))?;
        let def: WorkflowDef = serde_json::from_value(json_of(&row[0])).map_err(|e| {
            trellis_form::FormError::Definition(vec![trellis_form::error::Problem::new(
                "",
                "invalid",
                format!("the stored version {version} of workflow `{key}` does not parse: {e}"),
            )])
        })?;
        // Compile the pinned version against the current app (its entities may have grown).
        let mut app_def = inst.app.def.clone();
        app_def.workflows = vec![serde_json::to_value(&def).expect("serializable")];
        let app = trellis_form::compile::compile(
            trellis_form::compile::parse(&serde_json::to_value(&app_def).expect("ser"))?,
            inst.app.version,
        )?;
        let flows = compile::compile(&app).map_err(trellis_form::FormError::Definition)?;
        let wf = flows
            .workflows
            .get(key)
            .cloned()
            .ok_or(trellis_form::FormError::NotFound("workflow"))?;
        self.pinned.lock().expect("pinned").insert(k, wf.clone());
        Ok(wf)
    }

    // ----- inline --------------------------------------------------------------------------

    /// Run the inline workflows triggered by the event the caller's write (at `at`, in `tx`)
    /// made for `record`. Returns the record as the workflows left it, if they changed it.
    /// An inline workflow that fails fails the write: it runs exactly once or not at all.
    pub async fn inline(
        &self,
        tx: &mut Tx,
        app: &str,
        entity: &str,
        record: Uuid,
        at: DateTime<Utc>,
    ) -> std::result::Result<Option<store::Record>, InlineError> {
        let Some(inst) = self.installed(app) else {
            return Ok(None);
        };
        let wfs: Vec<Arc<Workflow>> = inst
            .flows
            .enabled()
            .into_iter()
            .filter(|w| w.def.mode == Mode::Inline && w.def.trigger.entity() == entity)
            .cloned()
            .collect();
        if wfs.is_empty() {
            return Ok(None);
        }
        let mut sql = Sql::new(format!(
            "SELECT {EVENT_COLS} FROM \"events\" WHERE \"app\" = "
        ));
        sql.bind(Value::Text(app.into()))
            .push(" AND \"entity\" = ")
            .bind(Value::Text(entity.into()))
            .push(" AND \"record_id\" = ")
            .bind(Value::Uuid(record))
            // This write's own event: written at `at` (a write that changed nothing wrote none).
            // Pending events only: the partial index `events_pending` finds it without scanning
            // the outbox.
            .push(" AND \"at\" = ")
            .bind(Value::DateTime(at))
            .push(" AND \"processed_at\" IS NULL ORDER BY \"id\" DESC LIMIT 1");
        let Some(row) = tx.fetch_optional(&sql, &EVENT_KINDS).await? else {
            return Ok(None);
        };
        self.inline_event(tx, app, entity, record, event(row)).await
    }

    /// [`Runtime::inline`] for a record just created by `actor` in `tx`: its event is known
    /// without reading the outbox (what a bulk import needs).
    pub async fn inline_created(
        &self,
        tx: &mut Tx,
        app: &str,
        entity: &str,
        record: &store::Record,
        actor: Option<Uuid>,
    ) -> std::result::Result<Option<store::Record>, InlineError> {
        let Some(inst) = self.installed(app) else {
            return Ok(None);
        };
        if !inst.flows.enabled().iter().any(|w| {
            w.def.mode == Mode::Inline
                && w.def.trigger.entity() == entity
                && matches!(w.def.trigger, Trigger::RecordCreated { .. })
        }) {
            return Ok(None);
        }
        let ev = Event {
            id: 0,
            app: app.into(),
            entity: entity.into(),
            record_id: record.meta.id,
            kind: "created".into(),
            changed: record
                .fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k.clone())
                .collect(),
            record: record.to_json(),
            old: Json::Null,
            actor,
            at: record.meta.updated_at,
            depth: 0,
        };
        self.inline_event(tx, app, entity, record.meta.id, ev).await
    }

    async fn inline_event(
        &self,
        tx: &mut Tx,
        app: &str,
        entity: &str,
        record: Uuid,
        ev: Event,
    ) -> std::result::Result<Option<store::Record>, InlineError> {
        let Some(inst) = self.installed(app) else {
            return Ok(None);
        };
        let wfs: Vec<Arc<Workflow>> = inst
            .flows
            .enabled()
            .into_iter()
            .filter(|w| w.def.mode == Mode::Inline && w.def.trigger.entity() == entity)
            .cloned()
            .collect();
        if ev.depth > 0 {
            // Writes of workflows trigger async workflows only.
            return Ok(None);
        }
        let now = self.clock.now();
        let mut changed = false;
        for wf in wfs {
            let mut ctx = context(&ev, &self.settings.vars, now, &inst);
            // The run keeps its trigger as it was (replays start from it), not as the nodes left it.
            let trigger_ctx = ctx.clone();
            match matches(&wf, &ev, &ctx, &inst.app) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(m) => {
                    return Err(InlineError {
                        workflow: wf.def.key.clone(),
                        node: None,
                        message: m,
                    })
                }
            }
            let run_id = Uuid::now_v7();
            let env = Env {
                app: &inst.app,
                wf: &wf,
                run_id,
                write: WriteCtx {
                    actor: None,
                    now,
                    default_owner: inst.default_owner,
                    import: false,
                    depth: ev.depth + 1,
                },
            };
            let mut node = Some(wf.entry.clone());
            let mut steps = Map::new();
            let mut log = vec![];
            while let Some(id) = node.take() {
                let idx = wf.nodes[&id];
                let n = &wf.def.nodes[idx];
                ctx["steps"] = Json::Object(steps.clone());
                let input = step_input(n, &ctx);
                let started = std::time::Instant::now();
                match run_db_node(tx, &env, idx, n, &mut ctx).await {
                    Ok(out) => {
                        log.push((
                            id.clone(),
                            n.action.kind(),
                            "succeeded",
                            out.data.clone(),
                            None::<String>,
                            started.elapsed(),
                            input,
                        ));
                        steps.insert(id.clone(), out.data.clone());
                        ctx["steps"] = Json::Object(steps.clone());
                        node = next_node(&wf, &id, &out.output, &ctx).map_err(|m| InlineError {
                            workflow: wf.def.key.clone(),
                            node: Some(id.clone()),
                            message: m,
                        })?;
                        changed = true;
                    }
                    Err(m) => {
                        // An `error` edge handles it; otherwise the write fails.
                        let has_error_edge = wf.edges_from(&id).any(|(_, e)| e.output == "error");
                        if has_error_edge {
                            log.push((
                                id.clone(),
                                n.action.kind(),
                                "failed",
                                Json::Null,
                                Some(m.clone()),
                                started.elapsed(),
                                input,
                            ));
                            steps.insert(id.clone(), json!({ "error": m }));
                            ctx["steps"] = Json::Object(steps.clone());
                            node = next_node(&wf, &id, "error", &ctx).map_err(|m| InlineError {
                                workflow: wf.def.key.clone(),
                                node: Some(id.clone()),
                                message: m,
                            })?;
                        } else {
                            return Err(InlineError {
                                workflow: wf.def.key.clone(),
                                node: Some(id),
                                message: m,
                            });
                        }
                    }
                }
            }
            // The run and its steps are recorded in the same transaction.
            insert_run(
                tx,
                &NewRun {
                    id: run_id,
                    app,
                    wf: &wf.def,
                    entity,
                    record: Some(record),
                    event: (ev.id > 0).then_some(ev.id),
                    context: &trigger_ctx,
                    status: "succeeded",
                    node: None,
                    steps: &Json::Object(steps),
                    depth: ev.depth,
                    wake_at: now,
                    error: None,
                    now,
                },
            )
            .await?;
            // The whole log in one statement: the inline path is on the create's latency.
            if !log.is_empty() {
                let mut sql = Sql::new("INSERT INTO \"flow_steps\" (\"run_id\", \"seq\", \"node\", \"kind\", \"status\", \"attempt\", \"idempotency_key\", \"output\", \"error\", \"started_at\", \"finished_at\", \"duration_ms\", \"input\") VALUES ");
                let run_p = sql.param(Value::Uuid(run_id));
                let now_p = sql.param(Value::DateTime(now));
                for (seq, (node, kind, status, out, err, took, input)) in
                    log.into_iter().enumerate()
                {
                    sql.push(if seq == 0 { "(" } else { ", (" });
                    sql.push(&format!("{run_p}, "));
                    sql.bind(Value::Int(seq as i64 + 1)).push(", ");
                    sql.bind(Value::Text(node.clone())).push(", ");
                    sql.bind(Value::Text(kind.into())).push(", ");
                    sql.bind(Value::Text(status.into())).push(", 1, ");
                    sql.bind(Value::Text(format!("{run_id}.{node}"))).push(", ");
                    sql.bind(Value::Json(out)).push(", ");
                    sql.bind(err.map(Value::Text).unwrap_or(Value::Null(ColKind::Text)))
                        .push(&format!(", {now_p}, {now_p}, "));
                    sql.bind(Value::Int(took.as_millis() as i64)).push(", ");
                    sql.bind(Value::Json(input)).push(")");
                }
                tx.execute(&sql).await?;
            }
        }
        if !changed {
            return Ok(None);
        }
        let e = inst.app.entity(entity)?;
        match store::get_in(tx, e, record).await {
            Ok(r) => Ok(Some(r)),
            Err(trellis_form::FormError::RecordNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    // ----- dispatch ------------------------------------------------------------------------

    /// Turn committed events into runs of the async workflows they trigger; returns the number
    /// of events processed.
    pub async fn dispatch(&self, limit: usize) -> Result<usize> {
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        let mut sql = Sql::new(format!(
            "SELECT {EVENT_COLS} FROM \"events\" WHERE \"processed_at\" IS NULL ORDER BY \"id\" LIMIT {limit}"
        ));
        if tx.backend() == Backend::Postgres {
            sql.push(" FOR UPDATE SKIP LOCKED");
        }
        let events: Vec<Event> = tx
            .fetch_all(&sql, &EVENT_KINDS)
            .await?
            .into_iter()
            .map(event)
            .collect();
        if events.is_empty() {
            return Ok(0);
        }
        let mut recent: HashMap<(String, String), i64> = HashMap::new();
        for ev in &events {
            let Some(inst) = self.installed(&ev.app) else {
                continue;
            };
            for wf in inst.flows.enabled() {
                if wf.def.mode != Mode::Async || !listens(wf, ev) {
                    continue;
                }
                // A firing is no record: the run, like a scheduled one, has none to reload.
                let alert = matches!(wf.def.trigger, Trigger::AlertFired { .. });
                let ctx = context(ev, &self.settings.vars, now, &inst);
                let (status, error) = match matches(wf, ev, &ctx, &inst.app) {
                    Ok(false) => continue,
                    Ok(true) if ev.depth >= self.settings.max_depth => (
                        "failed",
                        Some(format!(
                            "loop guard: this event was made by a chain of {} workflow runs (the limit is {}); the run was not started",
                            ev.depth, self.settings.max_depth
                        )),
                    ),
                    Ok(true) => ("queued", None),
                    Err(m) => ("failed", Some(format!("trigger condition: {m}"))),
                };
                let wake_at = match wf.def.rate_limit_per_minute {
                    Some(limit) if status == "queued" && limit > 0 => {
                        let key = (ev.app.clone(), wf.def.key.clone());
                        let n = match recent.get(&key) {
                            Some(n) => *n,
                            None => count_recent(&mut tx, &ev.app, &wf.def.key, now).await?,
                        };
                        recent.insert(key, n + 1);
                        // Over the limit: start later, one minute per `limit` runs; none dropped.
                        now + Duration::seconds(60 * (n / limit as i64))
                    }
                    _ => now,
                };
                insert_run(
                    &mut tx,
                    &NewRun {
                        id: Uuid::now_v7(),
                        app: &ev.app,
                        wf: &wf.def,
                        entity: if alert { "" } else { &ev.entity },
                        record: (!alert).then_some(ev.record_id),
                        event: Some(ev.id),
                        context: &ctx,
                        status,
                        node: Some(&wf.entry),
                        steps: &json!({}),
                        depth: ev.depth,
                        wake_at,
                        error: error.as_deref(),
                        now,
                    },
                )
                .await?;
            }
        }
        let mut sql = Sql::new("UPDATE \"events\" SET \"processed_at\" = ");
        sql.bind(Value::DateTime(now)).push(" WHERE \"id\" IN (");
        for (i, ev) in events.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(Value::Int(ev.id));
        }
        sql.push(")");
        tx.execute(&sql).await?;
        tx.commit().await?;
        self.work_wake.notify_one();
        Ok(events.len())
    }

    /// Start a workflow by hand on a record (manual trigger, or any trigger for testing).
    pub async fn start(
        &self,
        app: &str,
        workflow: &str,
        record: Uuid,
        actor: Option<Uuid>,
    ) -> Result<Uuid> {
        let inst = self
            .installed(app)
            .ok_or_else(|| trellis_form::FormError::AppNotFound(app.into()))?;
        let wf = inst
            .flows
            .workflows
            .get(workflow)
            .cloned()
            .ok_or(trellis_form::FormError::NotFound("workflow"))?;
        let e = inst.app.entity(wf.def.trigger.entity())?;
        let r = store::get(&self.db, e, record).await?;
        let now = self.clock.now();
        let ev = Event::about(
            app,
            e.key.clone(),
            record,
            "manual",
            r.to_json(),
            actor,
            now,
        );
        let ctx = context(&ev, &self.settings.vars, now, &inst);
        let id = Uuid::now_v7();
        let mut tx = self.db.begin().await?;
        insert_run(
            &mut tx,
            &NewRun {
                id,
                app,
                wf: &wf.def,
                entity: &e.key,
                record: Some(record),
                event: None,
                context: &ctx,
                status: "queued",
                node: Some(&wf.entry),
                steps: &json!({}),
                depth: 0,
                wake_at: now,
                error: None,
                now,
            },
        )
        .await?;
        tx.commit().await?;
        self.work_wake.notify_one();
        Ok(id)
    }

    // ----- work ----------------------------------------------------------------------------

    /// Re-queue runs whose lease lapsed (a crashed or stalled worker), saying so in their log.
    pub async fn rescue(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        let mut sql = Sql::new(
            "SELECT \"id\", \"lease_owner\" FROM \"flow_runs\" WHERE \"status\" = 'running' AND \"lease_until\" < ",
        );
        sql.bind(Value::DateTime(now)).push(" LIMIT 500");
        if tx.backend() == Backend::Postgres {
            sql.push(" FOR UPDATE SKIP LOCKED");
        }
        let rows = tx.fetch_all(&sql, &[ColKind::Uuid, ColKind::Text]).await?;
        for r in &rows {
            let id = uuid(&r[0]).unwrap_or_default();
            let mut up = Sql::new("UPDATE \"flow_runs\" SET \"status\" = 'queued', \"lease_owner\" = NULL, \"lease_until\" = NULL, \"wake_at\" = ");
            up.bind(Value::DateTime(now))
                .push(", \"updated_at\" = ")
                .bind(Value::DateTime(now))
                .push(" WHERE \"id\" = ")
                .bind(Value::Uuid(id))
                .push(" AND \"status\" = 'running'");
            tx.execute(&up).await?;
            let seq = next_seq(&mut tx, id).await?;
            insert_step(
                &mut tx,
                id,
                seq,
                "-",
                "rescue",
                "succeeded",
                &format!("{id}.rescue.{seq}"),
                &json!({ "previous_worker": text(&r[1]) }),
                Some(&format!(
                    "the worker `{}` stopped renewing its lease (crashed or stalled); the run was handed to another worker",
                    text(&r[1])
                )),
                now,
                None, Some(&self.settings.worker), None)
            .await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Claim due runs and advance each as far as it goes; returns the number advanced.
    pub async fn work(&self) -> Result<usize> {
        let now = self.clock.now();
        let until = now + self.settings.lease;
        let mut tx = self.db.begin().await?;
        // Due timers and waits first (they are few and have a deadline), then queued runs in
        // order: a backlog of new runs does not make timers late.
        let mut runs: Vec<Claimed> = vec![];
        for status in ["waiting", "queued"] {
            let room = self.settings.batch - runs.len();
            if room == 0 {
                break;
            }
            let mut sql =
                Sql::new("UPDATE \"flow_runs\" SET \"status\" = 'running', \"lease_owner\" = ");
            sql.bind(Value::Text(self.settings.worker.clone()))
                .push(", \"lease_until\" = ")
                .bind(Value::DateTime(until))
                .push(", \"updated_at\" = ")
                .bind(Value::DateTime(now))
                .push(&format!(" WHERE \"id\" IN (SELECT \"id\" FROM \"flow_runs\" WHERE \"status\" = '{status}' AND \"wake_at\" <= "))
                .bind(Value::DateTime(now))
                .push(&format!(" ORDER BY \"wake_at\" LIMIT {room}"));
            if tx.backend() == Backend::Postgres {
                sql.push(" FOR UPDATE SKIP LOCKED");
            }
            sql.push(&format!(") RETURNING {RUN_COLS}, (SELECT COALESCE(MAX(s.\"seq\"), 0) FROM \"flow_steps\" s WHERE s.\"run_id\" = \"flow_runs\".\"id\")"));
            runs.extend(
                tx.fetch_all(&sql, &RUN_KINDS)
                    .await?
                    .into_iter()
                    .map(claimed),
            );
        }
        tx.commit().await?;
        let n = runs.len();
        // Rounds: the next database step of every run that has one, in one transaction (a
        // savepoint per run), until each run ends, sleeps or reaches a step of another kind.
        let mut batch = runs;
        let mut runs = vec![];
        while !batch.is_empty() {
            let mut round = vec![];
            for run in batch.drain(..) {
                let Some(inst) = self.installed(&run.app) else {
                    runs.push(run);
                    continue;
                };
                match self.pinned(&inst, &run.workflow, run.version).await {
                    Ok(wf) if self.batchable(&run, &wf) => round.push((run, inst, wf)),
                    _ => runs.push(run),
                }
            }
            if round.is_empty() {
                break;
            }
            if self.db.backend() == Backend::Postgres && round.len() > 8 {
                // PostgreSQL has concurrent writers: four transactions at a time.
                let size = round.len().div_ceil(4);
                let mut parts = vec![];
                let mut rest = round;
                while !rest.is_empty() {
                    let tail = rest.split_off(size.min(rest.len()));
                    parts.push(std::mem::replace(&mut rest, tail));
                }
                let done =
                    futures_util::future::join_all(parts.into_iter().map(|p| self.db_round(p)))
                        .await;
                for d in done {
                    batch.extend(d?);
                }
            } else {
                batch = self.db_round(round).await?;
            }
        }
        // The rest advance concurrently: their side effects (SMTP, HTTP) overlap; their
        // database writes are short transactions.
        use futures_util::stream::StreamExt;
        futures_util::stream::iter(runs)
            .for_each_concurrent(16, |run| async move {
                let id = run.id;
                if let Err(e) = self.advance(run).await {
                    tracing::warn!(run = %id, error = %e, "run could not advance; it will be rescued when its lease lapses");
                }
            })
            .await;
        Ok(n)
    }

    /// Advance one claimed run until it ends, sleeps or loses its lease.
    async fn advance(&self, mut run: Claimed) -> Result<()> {
        let Some(inst) = self.installed(&run.app) else {
            return self
                .finish(
                    &run,
                    "failed",
                    Some(&format!("the app `{}` is not installed", run.app)),
                )
                .await
                .map(drop);
        };
        let wf = match self.pinned(&inst, &run.workflow, run.version).await {
            Ok(w) => w,
            Err(e) => {
                return self
                    .finish(
                        &run,
                        "failed",
                        Some(&format!("workflow version {} cannot run: {e}", run.version)),
                    )
                    .await
                    .map(drop)
            }
        };
        loop {
            let Some(id) = run.node.clone() else {
                self.finish(&run, "succeeded", None).await?;
                return Ok(());
            };
            let Some(&idx) = wf.nodes.get(&id) else {
                self.finish(
                    &run,
                    "failed",
                    Some(&format!("the node `{id}` does not exist in this version")),
                )
                .await?;
                return Ok(());
            };
            let node = &wf.def.nodes[idx];
            let now = self.clock.now();
            // Nodes see the record as it is now, not as it was when the run started.
            self.refresh(&mut run, &inst).await;
            let next = match &node.action {
                Action::Wait { .. } => self.wait_node(&mut run, &wf, idx, node, now).await?,
                Action::Approval { .. } => {
                    self.approval_node(&mut run, &wf, &inst, idx, node, now)
                        .await?
                }
                a if a.database_only() || !self.external(&wf, idx, node, &run.context) => {
                    self.db_step(&mut run, &wf, &inst, idx, node).await?
                }
                _ => self.effect_step(&mut run, &wf, &inst, idx, node).await?,
            };
            match next {
                Next::Node(n) => run.node = n,
                Next::Sleep(at) => {
                    self.sleep(&run, at).await?;
                    return Ok(());
                }
                Next::Lost => return Ok(()),
            }
        }
    }

    /// The records the run's record points to (one level of relations), as `related.<field>`.
    async fn related(&self, app: &App, entity: &trellis_form::model::Entity, ctx: &Json) -> Json {
        let mut out = Map::new();
        for f in entity
            .fields
            .iter()
            .filter(|f| f.ty == trellis_form::def::FieldType::Relation)
        {
            let (Some(target), Some(id)) = (
                f.def.entity.as_deref().and_then(|t| app.entity(t).ok()),
                ctx.pointer(&format!("/record/{}", f.key))
                    .and_then(Json::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok()),
            ) else {
                continue;
            };
            if let Ok(r) = store::get(&self.db, target, id).await {
                out.insert(f.key.clone(), r.to_json());
            }
        }
        Json::Object(out)
    }

    fn env<'a>(&self, inst: &'a Installed, wf: &'a Workflow, run: &Claimed) -> Env<'a> {
        Env {
            app: &inst.app,
            wf,
            run_id: run.id,
            write: WriteCtx {
                actor: None,
                now: self.clock.now(),
                default_owner: inst.default_owner,
                import: false,
                depth: run.depth + 1,
            },
        }
    }

    /// A database-only node: its writes, its step and the run's progress in one transaction.
    async fn db_step(
        &self,
        run: &mut Claimed,
        wf: &Workflow,
        inst: &Installed,
        idx: usize,
        node: &NodeDef,
    ) -> Result<Next> {
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        match self.db_step_in(&mut tx, run, wf, inst, idx, node).await? {
            InTx::Done(next) => {
                tx.commit().await?;
                match next {
                    Ok(None) => Ok(Next::Lost),
                    Ok(n) => Ok(Next::Node(n)),
                    Err(m) => {
                        self.finish(run, "failed", Some(&m)).await?;
                        Ok(Next::Lost)
                    }
                }
            }
            InTx::Lost => Ok(Next::Lost),
            InTx::NotHere => {
                drop(tx);
                self.effect_step(run, wf, inst, idx, node).await
            }
            InTx::Failed(m, took) => {
                // Roll the node's writes back; record the failure in a fresh transaction.
                drop(tx);
                self.failed_step(run, wf, node, &m, now, Some(took), false)
                    .await
            }
        }
    }

    /// The body of a database step inside `tx`: the node's writes, its log row and the run's
    /// progress (checked against the lease). On `Failed` and `Lost` the caller rolls back.
    async fn db_step_in(
        &self,
        tx: &mut Tx,
        run: &mut Claimed,
        wf: &Workflow,
        inst: &Installed,
        idx: usize,
        node: &NodeDef,
    ) -> Result<InTx> {
        let env = self.env(inst, wf, run);
        let now = env.now();
        let started = std::time::Instant::now();
        let mut ctx = run.context.clone();
        if !node.action.database_only() && self.external(wf, idx, node, &ctx) {
            // Something to send outside after all (the fresh record changed a URL): not here.
            return Ok(InTx::NotHere);
        }
        let result = if node.action.database_only() {
            run_db_node(tx, &env, idx, node, &mut ctx).await
        } else {
            // An effect with nothing to send outside (no SMTP relay: the email is kept in the
            // outbox; no URL: the request is skipped): done in this one transaction.
            match self
                .effect(&env, idx, node, &ctx, &format!("{}.{}", run.id, node.id))
                .await
            {
                Ok(out) => {
                    let mut r = Ok(out.clone());
                    if let Action::Notify { .. } = &node.action {
                        r = run_db_node(tx, &env, idx, node, &mut ctx)
                            .await
                            .map(|_| out.clone());
                    }
                    if let (Action::SendEmail { .. }, Ok(_)) = (&node.action, &r) {
                        record_email(tx, &env, run, &out.data, now).await?;
                    }
                    r
                }
                Err(m) => Err(m),
            }
        };
        let took = started.elapsed().as_millis() as i64;
        let out = match result {
            Ok(out) => out,
            Err(m) => return Ok(InTx::Failed(m, took)),
        };
        let seq = run.seq + 1;
        insert_step(
            tx,
            run.id,
            seq,
            &node.id,
            node.action.kind(),
            "succeeded",
            &format!("{}.{}", run.id, node.id),
            &out.data,
            None,
            now,
            Some(took),
            Some(&self.settings.worker),
            Some(step_input(node, &run.context)),
        )
        .await?;
        run.seq = seq;
        run.steps[&node.id] = out.data.clone();
        ctx["steps"] = run.steps.clone();
        run.context = ctx;
        let next = next_node(wf, &node.id, &out.output, &run.context);
        match &next {
            // The progress update checks the lease: without it, nothing of this step commits.
            // Without a next node it also finishes the run.
            Ok(n) => {
                if !self.progress_or_finish(tx, run, n.clone(), now).await? {
                    return Ok(InTx::Lost);
                }
            }
            // A failing edge condition: the step stands, the run fails after the commit.
            Err(_) => self.progress(tx, run, None, now).await?,
        }
        Ok(InTx::Done(next))
    }

    /// Whether the run's next node is a plain database step (no wait, no approval, nothing to
    /// send outside), so it can share a transaction with other runs' steps.
    fn batchable(&self, run: &Claimed, wf: &Workflow) -> bool {
        let Some(id) = &run.node else { return false };
        let Some(&idx) = wf.nodes.get(id) else {
            return false;
        };
        let node = &wf.def.nodes[idx];
        match &node.action {
            Action::Wait { .. } | Action::Approval { .. } => false,
            a if a.database_only() => true,
            _ => {
                let mut ctx = run.context.clone();
                ctx["vars"] = json!(self.settings.vars);
                !self.external(wf, idx, node, &ctx)
            }
        }
    }

    /// The context a node sees: the record as it is now, its related records, the variables.
    async fn refresh(&self, run: &mut Claimed, inst: &Installed) {
        run.context["vars"] = json!(self.settings.vars);
        if let Ok(entity) = inst.app.entity(&run.entity) {
            if let Some(rid) = record_id(&run.context) {
                if let Ok(r) = store::get(&self.db, entity, rid).await {
                    run.context["record"] = r.to_json();
                }
                run.context["related"] = self.related(&inst.app, entity, &run.context).await;
            }
        }
        run.context["now"] = json!(self
            .clock
            .now()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        run.context["steps"] = run.steps.clone();
    }

    /// One database step of each run in `round`, all in one transaction with a savepoint per
    /// run: one failing step rolls back only its own writes. Returns the runs that go on.
    async fn db_round(
        &self,
        round: Vec<(Claimed, Arc<Installed>, Arc<Workflow>)>,
    ) -> Result<Vec<Claimed>> {
        // The reads first, concurrently, outside the write transaction.
        let items: Vec<(Claimed, Arc<Installed>, Arc<Workflow>)> = futures_util::future::join_all(
            round.into_iter().map(|(mut run, inst, wf)| async move {
                self.refresh(&mut run, &inst).await;
                (run, inst, wf)
            }),
        )
        .await;
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        let sp = |q: &str| Sql::new(q);
        let mut outcomes = Vec::with_capacity(items.len());
        for (mut run, inst, wf) in items {
            let Some(idx) = run.node.as_ref().and_then(|n| wf.nodes.get(n)).copied() else {
                continue;
            };
            let node = &wf.def.nodes[idx];
            tx.execute(&sp("SAVEPOINT trellis_step")).await?;
            match self
                .db_step_in(&mut tx, &mut run, &wf, &inst, idx, node)
                .await
            {
                Ok(InTx::Done(next)) => {
                    tx.execute(&sp("RELEASE SAVEPOINT trellis_step")).await?;
                    outcomes.push((run, wf, idx, Ok(next)));
                }
                Ok(InTx::Failed(m, took)) => {
                    tx.execute(&sp("ROLLBACK TO SAVEPOINT trellis_step"))
                        .await?;
                    tx.execute(&sp("RELEASE SAVEPOINT trellis_step")).await?;
                    outcomes.push((run, wf, idx, Err((m, took))));
                }
                // Goes on by itself (its next round sees it is not a database step).
                Ok(InTx::NotHere) => {
                    tx.execute(&sp("RELEASE SAVEPOINT trellis_step")).await?;
                    outcomes.push((run, wf, idx, Ok(Err(String::new()))));
                }
                // Lost lease, or a storage error: leave the run alone (a lapsed lease rescues it).
                Ok(InTx::Lost) | Err(_) => {
                    tx.execute(&sp("ROLLBACK TO SAVEPOINT trellis_step"))
                        .await?;
                    tx.execute(&sp("RELEASE SAVEPOINT trellis_step")).await?;
                }
            }
        }
        tx.commit().await?;
        let mut go_on = vec![];
        for (mut run, wf, idx, outcome) in outcomes {
            match outcome {
                Ok(Ok(Some(n))) => {
                    run.node = Some(n);
                    go_on.push(run);
                }
                Ok(Ok(None)) => {}
                // Not a database step after all: back to this batch unchanged.
                Ok(Err(m)) if m.is_empty() => go_on.push(run),
                Ok(Err(m)) => {
                    self.finish(&run, "failed", Some(&m)).await?;
                }
                Err((m, took)) => {
                    let node = &wf.def.nodes[idx];
                    match self
                        .failed_step(&mut run, &wf, node, &m, now, Some(took), false)
                        .await?
                    {
                        Next::Node(n) => {
                            run.node = n;
                            go_on.push(run);
                        }
                        Next::Sleep(at) => self.sleep(&run, at).await?,
                        Next::Lost => {}
                    }
                }
            }
        }
        Ok(go_on)
    }

    /// Whether a side-effect node has something to send outside right now.
    fn external(&self, wf: &Workflow, idx: usize, node: &NodeDef, ctx: &Json) -> bool {
        let i = idx.to_string();
        let url = |part: &str, src: &str| {
            actions::render_str(wf, &tpl_name(&["nodes", &i, part]), src, ctx)
                .map(|u| !u.trim().is_empty())
                // A template error is reported by the effect itself.
                .unwrap_or(true)
        };
        match &node.action {
            Action::SendEmail { .. } => self.mailer.is_some(),
            Action::HttpRequest { url: u, .. } => url("url", u),
            Action::Notify {
                im_webhook: Some(u),
                ..
            } => url("im_webhook", u),
            _ => false,
        }
    }

    /// Record progress; when the run has no next node, finish it in the same transaction.
    /// False when this worker no longer holds the lease.
    async fn progress_or_finish(
        &self,
        tx: &mut Tx,
        run: &Claimed,
        next: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut sql = Sql::new("UPDATE \"flow_runs\" SET \"node\" = ");
        sql.bind(
            next.clone()
                .map(Value::Text)
                .unwrap_or(Value::Null(ColKind::Text)),
        )
        .push(", \"steps\" = ")
        .bind(Value::Json(run.steps.clone()))
        .push(", \"attempt\" = 0, \"error\" = NULL, \"updated_at\" = ")
        .bind(Value::DateTime(now));
        if next.is_none() {
            sql.push(", \"status\" = 'succeeded', \"lease_owner\" = NULL, \"lease_until\" = NULL, \"finished_at\" = ")
                .bind(Value::DateTime(now));
        } else {
            sql.push(", \"lease_until\" = ")
                .bind(Value::DateTime(now + self.settings.lease));
        }
        self.lease_where(&mut sql, run.id);
        Ok(tx.execute(&sql).await? == 1)
    }

    /// A node with an external side effect: `started` first, then the effect, then completion.
    async fn effect_step(
        &self,
        run: &mut Claimed,
        wf: &Workflow,
        inst: &Installed,
        idx: usize,
        node: &NodeDef,
    ) -> Result<Next> {
        let now = self.clock.now();
        let key = format!("{}.{}", run.id, node.id);
        let mut tx = self.db.begin().await?;
        if !self.hold(&mut tx, run.id, now).await? {
            return Ok(Next::Lost);
        }
        let seq = {
            run.seq += 1;
            run.seq
        };
        insert_step(
            &mut tx,
            run.id,
            seq,
            &node.id,
            node.action.kind(),
            "started",
            &key,
            &Json::Null,
            None,
            now,
            None,
            Some(&self.settings.worker),
            Some(step_input(node, &run.context)),
        )
        .await?;
        tx.commit().await?;
        let started = std::time::Instant::now();
        let env = self.env(inst, wf, run);
        // The effect may take a while (timeouts up to 30 s): renew the lease meanwhile (the
        // heartbeat), so a lapsed lease always means a dead or stalled worker.
        let beat = (self.settings.lease / 3)
            .to_std()
            .unwrap_or(std::time::Duration::from_secs(5));
        let result = {
            let ctx = run.context.clone();
            let effect = self.effect(&env, idx, node, &ctx, &key);
            tokio::pin!(effect);
            loop {
                tokio::select! {
                    r = &mut effect => break r,
                    _ = tokio::time::sleep(beat) => {
                        let mut tx = self.db.begin().await?;
                        self.hold(&mut tx, run.id, self.clock.now()).await?;
                        tx.commit().await?;
                    }
                }
            }
        };
        let took = started.elapsed().as_millis() as i64;
        let now = self.clock.now();
        match result {
            Ok(out) => {
                let mut tx = self.db.begin().await?;
                if !self.hold(&mut tx, run.id, now).await? {
                    return Ok(Next::Lost);
                }
                // In-app part of a notification and the outbox row commit with the completion.
                let mut ctx = run.context.clone();
                if let Action::Notify { .. } = &node.action {
                    if let Err(m) = run_db_node(&mut tx, &env, idx, node, &mut ctx).await {
                        drop(tx);
                        return self
                            .failed_step(run, wf, node, &m, now, Some(took), true)
                            .await;
                    }
                }
                if let Action::SendEmail { .. } = &node.action {
                    record_email(&mut tx, &env, run, &out.data, now).await?;
                }
                finish_step(
                    &mut tx,
                    run.id,
                    seq,
                    "succeeded",
                    &out.data,
                    None,
                    now,
                    took,
                )
                .await?;
                run.steps[&node.id] = out.data.clone();
                run.context["steps"] = run.steps.clone();
                let next = next_node(wf, &node.id, &out.output, &run.context);
                self.progress(&mut tx, run, next.as_ref().ok().cloned().flatten(), now)
                    .await?;
                tx.commit().await?;
                match next {
                    Ok(n) => Ok(Next::Node(n)),
                    Err(m) => {
                        self.finish(run, "failed", Some(&m)).await?;
                        Ok(Next::Lost)
                    }
                }
            }
            Err(m) => {
                let mut tx = self.db.begin().await?;
                finish_step(
                    &mut tx,
                    run.id,
                    seq,
                    "failed",
                    &Json::Null,
                    Some(&m),
                    now,
                    took,
                )
                .await?;
                tx.commit().await?;
                self.failed_step(run, wf, node, &m, now, Some(took), true)
                    .await
            }
        }
    }

    /// A node failed: retry later, take its `error` edge, or fail the run.
    #[allow(clippy::too_many_arguments)]
    async fn failed_step(
        &self,
        run: &mut Claimed,
        wf: &Workflow,
        node: &NodeDef,
        message: &str,
        now: DateTime<Utc>,
        took: Option<i64>,
        logged: bool,
    ) -> Result<Next> {
        let retry = node.retry.unwrap_or_default();
        let retriable = !node.action.database_only();
        let mut tx = self.db.begin().await?;
        if !self.hold(&mut tx, run.id, now).await? {
            return Ok(Next::Lost);
        }
        if !logged {
            let seq = {
                run.seq += 1;
                run.seq
            };
            insert_step(
                &mut tx,
                run.id,
                seq,
                &node.id,
                node.action.kind(),
                "failed",
                &format!("{}.{}", run.id, node.id),
                &Json::Null,
                Some(message),
                now,
                took,
                Some(&self.settings.worker),
                Some(step_input(node, &run.context)),
            )
            .await?;
        }
        if retriable && run.attempt + 1 < retry.max_attempts {
            run.attempt += 1;
            let at = now
                + Duration::from_std(retry.delay(run.attempt + 1)).unwrap_or(Duration::seconds(1));
            let mut sql = Sql::new("UPDATE \"flow_runs\" SET \"attempt\" = ");
            sql.bind(Value::Int(run.attempt as i64));
            sql.push(", \"error\" = ").bind(Value::Text(format!(
                "attempt {} of {} failed: {message}; retrying at {}",
                run.attempt,
                retry.max_attempts,
                at.to_rfc3339()
            )));
            self.lease_where(&mut sql, run.id);
            tx.execute(&sql).await?;
            tx.commit().await?;
            return Ok(Next::Sleep(at));
        }
        if wf.edges_from(&node.id).any(|(_, e)| e.output == "error") {
            run.steps[&node.id] = json!({ "error": message });
            run.context["steps"] = run.steps.clone();
            return self.follow(tx, run, wf, &node.id, "error", now).await;
        }
        tx.commit().await?;
        let why = if retriable {
            format!(
                "the node `{}` failed {} time(s): {message}",
                node.id,
                run.attempt + 1
            )
        } else {
            format!("the node `{}` failed: {message}", node.id)
        };
        self.finish(run, "failed", Some(&why)).await?;
        Ok(Next::Lost)
    }

    /// Perform a node's external effect. Nothing here touches the database.
    async fn effect(
        &self,
        env: &Env<'_>,
        idx: usize,
        node: &NodeDef,
        ctx: &Json,
        key: &str,
    ) -> std::result::Result<Outcome, String> {
        let i = idx.to_string();
        let timeout =
            std::time::Duration::from_secs(node.timeout_seconds.unwrap_or(10).clamp(1, 30) as u64);
        match &node.action {
            Action::SendEmail { .. } => {
                let to = env
                    .wf
                    .templates
                    .render(&tpl_name(&["nodes", &i, "to"]), ctx)?;
                let subject = env
                    .wf
                    .templates
                    .render(&tpl_name(&["nodes", &i, "subject"]), ctx)?;
                let body = env
                    .wf
                    .templates
                    .render(&tpl_name(&["nodes", &i, "body"]), ctx)?;
                let to = to.trim().to_owned();
                if to.is_empty() {
                    return Err(
                        "the email has no recipient (the `to` template rendered empty)".into(),
                    );
                }
                let message_id = format!("<{key}@trellis>");
                let sent = match (&self.settings.smtp, &self.mailer) {
                    (Some(smtp), Some(mailer)) => {
                        send_smtp(mailer, smtp, &to, &subject, &body, &message_id, timeout).await?;
                        true
                    }
                    _ => false,
                };
                Ok(Outcome {
                    output: "ok".into(),
                    data: json!({ "to": to, "subject": subject, "body": body, "message_id": message_id, "sent": sent }),
                })
            }
            Action::HttpRequest { url, body, secret } => {
                let url = actions::render_str(env.wf, &tpl_name(&["nodes", &i, "url"]), url, ctx)?;
                let url = url.trim();
                if url.is_empty() {
                    return Ok(Outcome {
                        output: "ok".into(),
                        data: json!({ "skipped": "no URL is configured (the url template rendered empty)" }),
                    });
                }
                let payload = render_json(env.wf, &format!("nodes/{i}/body"), body, ctx)?;
                let secret = match secret {
                    Some(s) => Some(actions::render_str(
                        env.wf,
                        &tpl_name(&["nodes", &i, "secret"]),
                        s,
                        ctx,
                    )?),
                    None => None,
                };
                let status = post_signed(
                    &self.settings.allow,
                    url,
                    &payload,
                    secret.as_deref(),
                    key,
                    self.clock.now(),
                    timeout,
                )
                .await?;
                Ok(Outcome {
                    output: "ok".into(),
                    data: json!({ "url": url, "status": status, "webhook_id": key }),
                })
            }
            Action::Notify {
                im_webhook: Some(hook),
                im_format,
                title,
                body,
                ..
            } => {
                let url = env
                    .wf
                    .templates
                    .render(&tpl_name(&["nodes", &i, "im_webhook"]), ctx)?;
                let t =
                    actions::render_str(env.wf, &tpl_name(&["nodes", &i, "title"]), title, ctx)?;
                let b = actions::render_str(env.wf, &tpl_name(&["nodes", &i, "body"]), body, ctx)?;
                let _ = hook;
                let url = url.trim();
                if url.is_empty() {
                    return Ok(Outcome::ok_data(json!({ "im": "skipped: no robot URL" })));
                }
                let text = if b.is_empty() { t } else { format!("{t}\n{b}") };
                let payload = match im_format.unwrap_or(ImFormat::Slack) {
                    ImFormat::Slack => json!({ "text": text }),
                    ImFormat::Dingtalk | ImFormat::Wecom => {
                        json!({ "msgtype": "text", "text": { "content": text } })
                    }
                };
                let status = post_signed(
                    &self.settings.allow,
                    url,
                    &payload,
                    None,
                    key,
                    self.clock.now(),
                    timeout,
                )
                .await?;
                Ok(Outcome::ok_data(json!({ "im": status })))
            }
            other => Err(format!(
                "the node type `{}` has no external effect",
                other.kind()
            )),
        }
    }

    async fn wait_node(
        &self,
        run: &mut Claimed,
        wf: &Workflow,
        idx: usize,
        node: &NodeDef,
        now: DateTime<Utc>,
    ) -> Result<Next> {
        let Action::Wait {
            seconds,
            minutes,
            hours,
            working_days,
            until_field,
            offset_days,
            until,
            timeout_hours,
        } = &node.action
        else {
            unreachable!("wait node")
        };
        let state = run.steps.get(&node.id).cloned();
        let started = state
            .as_ref()
            .and_then(|s| s.get("since"))
            .and_then(Json::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc));
        let since = started.unwrap_or(now);
        let calendar = self
            .flows(&run.app)
            .map(|f| f.calendar())
            .unwrap_or_else(|| crate::calendar::Calendar::weekdays(chrono_tz::UTC));
        let (due, output): (Option<DateTime<Utc>>, Option<&str>) = if until.is_some() {
            let c = wf.condition(&cond_name(&["nodes", &idx.to_string(), "until"]));
            match c.eval(&run.context) {
                Ok(true) => (None, Some("ok")),
                Ok(false) => {
                    let limit = timeout_hours.map(|h| since + Duration::hours(h as i64));
                    if limit.is_some_and(|l| now >= l) {
                        (None, Some("timeout"))
                    } else {
                        let next = now + Duration::minutes(1);
                        (Some(limit.map_or(next, |l| l.min(next))), None)
                    }
                }
                Err(m) => {
                    return self.failed_step(run, wf, node, &m, now, None, false).await;
                }
            }
        } else {
            let at = if let Some(n) = working_days {
                calendar.add_working_days(since, *n)
            } else if let Some(f) = until_field {
                let v = run
                    .context
                    .pointer(&format!("/record/{f}"))
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let base = DateTime::parse_from_rfc3339(&v)
                    .map(|t| t.with_timezone(&Utc))
                    .or_else(|_| {
                        chrono::NaiveDate::parse_from_str(&v, "%Y-%m-%d")
                            .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
                    });
                match base {
                    Ok(b) => b + Duration::days(offset_days.unwrap_or(0) as i64),
                    // An empty date: nothing to wait for.
                    Err(_) => now,
                }
            } else {
                since
                    + Duration::seconds(seconds.unwrap_or(0) as i64)
                    + Duration::minutes(minutes.unwrap_or(0) as i64)
                    + Duration::hours(hours.unwrap_or(0) as i64)
            };
            if now >= at {
                (None, Some("ok"))
            } else {
                (Some(at), None)
            }
        };
        let mut tx = self.db.begin().await?;
        if !self.hold(&mut tx, run.id, now).await? {
            return Ok(Next::Lost);
        }
        match (due, output) {
            (_, Some(out)) => {
                let seq = {
                    run.seq += 1;
                    run.seq
                };
                let data = json!({ "since": since, "ended": now, "output": out });
                insert_step(
                    &mut tx,
                    run.id,
                    seq,
                    &node.id,
                    "wait",
                    "succeeded",
                    &format!("{}.{}", run.id, node.id),
                    &data,
                    None,
                    now,
                    None,
                    Some(&self.settings.worker),
                    None,
                )
                .await?;
                run.steps[&node.id] = data;
                run.context["steps"] = run.steps.clone();
                self.follow(tx, run, wf, &node.id, out, now).await
            }
            (Some(at), None) => {
                run.steps[&node.id] = json!({ "since": since, "until": at });
                let mut sql = Sql::new("UPDATE \"flow_runs\" SET \"steps\" = ");
                sql.bind(Value::Json(run.steps.clone()));
                self.lease_where(&mut sql, run.id);
                tx.execute(&sql).await?;
                tx.commit().await?;
                Ok(Next::Sleep(at))
            }
            (None, None) => unreachable!("a wait either ends or sleeps"),
        }
    }

    async fn approval_node(
        &self,
        run: &mut Claimed,
        wf: &Workflow,
        inst: &Installed,
        idx: usize,
        node: &NodeDef,
        now: DateTime<Utc>,
    ) -> Result<Next> {
        let Action::Approval { steps } = &node.action else {
            unreachable!("approval node")
        };
        let env = self.env(inst, wf, run);
        let mut tx = self.db.begin().await?;
        if !self.hold(&mut tx, run.id, now).await? {
            return Ok(Next::Lost);
        }
        let mut sql = Sql::new("SELECT \"id\", \"step\", \"status\", \"due_at\", \"escalated\", \"approvers\", \"comment\", \"name\" FROM \"approvals\" WHERE \"run_id\" = ");
        sql.bind(Value::Uuid(run.id))
            .push(" AND \"node\" = ")
            .bind(Value::Text(node.id.clone()))
            .push(" ORDER BY \"step\" DESC LIMIT 1");
        let last = tx
            .fetch_optional(
                &sql,
                &[
                    ColKind::Uuid,
                    ColKind::Int,
                    ColKind::Text,
                    ColKind::DateTime,
                    ColKind::Bool,
                    ColKind::Json,
                    ColKind::Text,
                    ColKind::Text,
                ],
            )
            .await?;
        let mut from_step = 0usize;
        if let Some(r) = &last {
            let step = int(&r[1]) as usize;
            let status = text(&r[2]);
            let comment = match &r[6] {
                Value::Text(s) => json!(s),
                _ => Json::Null,
            };
            match status.as_str() {
                "pending" => {
                    let due = time(&r[3]);
                    if due.is_some_and(|d| now >= d) {
                        if !matches!(r[4], Value::Bool(true)) {
                            // Escalate once: the approvers' managers join, the clock restarts.
                            let mut approvers: Vec<Uuid> =
                                serde_json::from_value(json_of(&r[5])).unwrap_or_default();
                            let managers = managers_of(&mut tx, &approvers).await?;
                            for m in &managers {
                                if !approvers.contains(m) {
                                    approvers.push(*m);
                                }
                            }
                            let hours = steps[step].timeout_hours.unwrap_or(24) as i64;
                            let new_due = now + Duration::hours(hours);
                            let mut up = Sql::new("UPDATE \"approvals\" SET \"escalated\" = ");
                            up.bind(Value::Bool(true))
                                .push(", \"approvers\" = ")
                                .bind(Value::Json(json!(approvers)))
                                .push(", \"due_at\" = ")
                                .bind(Value::DateTime(new_due))
                                .push(" WHERE \"id\" = ")
                                .bind(r[0].clone());
                            tx.execute(&up).await?;
                            for m in &managers {
                                actions::insert_notification(
                                    &mut tx,
                                    &env,
                                    *m,
                                    &format!("Escalated approval: {}", steps[step].name),
                                    "An approval waits for a decision past its deadline.",
                                    Some(&run.entity),
                                    record_id(&run.context),
                                )
                                .await?;
                            }
                            let seq = {
                                run.seq += 1;
                                run.seq
                            };
                            insert_step(
                                &mut tx,
                                run.id,
                                seq,
                                &node.id,
                                "approval",
                                "succeeded",
                                &format!("{}.{}.escalate.{step}", run.id, node.id),
                                &json!({ "escalated_to": managers, "step": steps[step].name }),
                                None,
                                now,
                                None,
                                Some(&self.settings.worker),
                                None,
                            )
                            .await?;
                            tx.commit().await?;
                            return Ok(Next::Sleep(new_due));
                        }
                        let mut up = Sql::new(
                            "UPDATE \"approvals\" SET \"status\" = 'timeout', \"decided_at\" = ",
                        );
                        up.bind(Value::DateTime(now))
                            .push(" WHERE \"id\" = ")
                            .bind(r[0].clone());
                        tx.execute(&up).await?;
                        return self
                            .approval_done(
                                tx,
                                run,
                                wf,
                                node,
                                "timeout",
                                json!({ "step": steps[step].name }),
                                now,
                            )
                            .await;
                    }
                    tx.commit().await?;
                    return Ok(Next::Sleep(due.unwrap_or(now + Duration::days(3650))));
                }
                "approved" => from_step = step + 1,
                "rejected" => {
                    return self
                        .approval_done(
                            tx,
                            run,
                            wf,
                            node,
                            "rejected",
                            json!({ "step": steps[step].name, "comment": comment }),
                            now,
                        )
                        .await;
                }
                _ => {
                    return self
                        .approval_done(
                            tx,
                            run,
                            wf,
                            node,
                            "timeout",
                            json!({ "step": steps[step].name }),
                            now,
                        )
                        .await
                }
            }
        }
        // Open the next step whose condition holds.
        let mut j = from_step;
        while j < steps.len() {
            let s = &steps[j];
            let applies = match &s.when {
                Some(_) => wf
                    .condition(&format!("nodes/{idx}/steps/{j}/when"))
                    .eval(&run.context)
                    .unwrap_or(false),
                None => true,
            };
            if applies {
                break;
            }
            j += 1;
        }
        if j >= steps.len() {
            return self
                .approval_done(
                    tx,
                    run,
                    wf,
                    node,
                    "approved",
                    json!({ "steps": steps.len() }),
                    now,
                )
                .await;
        }
        let s = &steps[j];
        let approvers = match actions::recipients(&mut tx, &env, &s.approvers, &run.context).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                drop(tx);
                return self
                    .failed_step(
                        run,
                        wf,
                        node,
                        &format!("the approval step `{}` has no approvers", s.name),
                        now,
                        None,
                        false,
                    )
                    .await;
            }
            Err(m) => {
                drop(tx);
                return self
                    .failed_step(
                        run,
                        wf,
                        node,
                        &format!("approval step `{}`: {m}", s.name),
                        now,
                        None,
                        false,
                    )
                    .await;
            }
        };
        let due = s.timeout_hours.map(|h| now + Duration::hours(h as i64));
        let approval = Uuid::now_v7();
        let mut ins = Sql::new("INSERT INTO \"approvals\" (\"id\", \"app\", \"run_id\", \"node\", \"step\", \"name\", \"entity\", \"record_id\", \"approvers\", \"rule\", \"votes\", \"status\", \"due_at\", \"escalated\", \"created_at\") VALUES (");
        ins.bind(Value::Uuid(approval)).push(", ");
        ins.bind(Value::Text(run.app.clone())).push(", ");
        ins.bind(Value::Uuid(run.id)).push(", ");
        ins.bind(Value::Text(node.id.clone())).push(", ");
        ins.bind(Value::Int(j as i64)).push(", ");
        ins.bind(Value::Text(s.name.clone())).push(", ");
        ins.bind(Value::Text(run.entity.clone())).push(", ");
        ins.bind(Value::opt_uuid(record_id(&run.context)))
            .push(", ");
        ins.bind(Value::Json(json!(approvers))).push(", ");
        ins.bind(Value::Text(match s.rule {
            ApprovalRule::Any => "any".into(),
            ApprovalRule::All => "all".into(),
        }))
        .push(", ");
        ins.bind(Value::Json(json!({}))).push(", 'pending', ");
        ins.bind(
            due.map(Value::DateTime)
                .unwrap_or(Value::Null(ColKind::DateTime)),
        )
        .push(", ");
        ins.bind(Value::Bool(false)).push(", ");
        ins.bind(Value::DateTime(now)).push(")");
        tx.execute(&ins).await?;
        let name = run
            .context
            .pointer("/record/name")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned();
        for a in &approvers {
            actions::insert_notification(
                &mut tx,
                &env,
                *a,
                &format!("Approval requested: {}", s.name),
                &name,
                Some(&run.entity),
                record_id(&run.context),
            )
            .await?;
        }
        let seq = {
            run.seq += 1;
            run.seq
        };
        insert_step(
            &mut tx,
            run.id,
            seq,
            &node.id,
            "approval",
            "succeeded",
            &format!("{}.{}.open.{j}", run.id, node.id),
            &json!({ "approval": approval, "step": s.name, "approvers": approvers }),
            None,
            now,
            None,
            Some(&self.settings.worker),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(Next::Sleep(due.unwrap_or(now + Duration::days(3650))))
    }

    #[allow(clippy::too_many_arguments)]
    async fn approval_done(
        &self,
        mut tx: Tx,
        run: &mut Claimed,
        wf: &Workflow,
        node: &NodeDef,
        outcome: &str,
        data: Json,
        now: DateTime<Utc>,
    ) -> Result<Next> {
        let mut data = data;
        data["outcome"] = json!(outcome);
        let seq = {
            run.seq += 1;
            run.seq
        };
        insert_step(
            &mut tx,
            run.id,
            seq,
            &node.id,
            "approval",
            "succeeded",
            &format!("{}.{}", run.id, node.id),
            &data,
            None,
            now,
            None,
            Some(&self.settings.worker),
            None,
        )
        .await?;
        run.steps[&node.id] = data;
        run.context["steps"] = run.steps.clone();
        self.follow(tx, run, wf, &node.id, outcome, now).await
    }

    // ----- run bookkeeping -----------------------------------------------------------------

    fn lease_where(&self, sql: &mut Sql, run: Uuid) {
        sql.push(" WHERE \"id\" = ")
            .bind(Value::Uuid(run))
            .push(" AND \"status\" = 'running' AND \"lease_owner\" = ")
            .bind(Value::Text(self.settings.worker.clone()));
    }

    /// Leave `from` by `output` and commit; an edge condition that fails fails the run.
    async fn follow(
        &self,
        mut tx: Tx,
        run: &mut Claimed,
        wf: &Workflow,
        from: &str,
        output: &str,
        now: DateTime<Utc>,
    ) -> Result<Next> {
        match next_node(wf, from, output, &run.context) {
            Ok(next) => {
                self.progress(&mut tx, run, next.clone(), now).await?;
                tx.commit().await?;
                Ok(Next::Node(next))
            }
            Err(m) => {
                self.progress(&mut tx, run, None, now).await?;
                tx.commit().await?;
                self.finish(run, "failed", Some(&m)).await?;
                Ok(Next::Lost)
            }
        }
    }

    /// Check that this worker still holds the run's lease, and extend it (the heartbeat).
    async fn hold(&self, tx: &mut Tx, run: Uuid, now: DateTime<Utc>) -> Result<bool> {
        let mut sql = Sql::new("UPDATE \"flow_runs\" SET \"lease_until\" = ");
        sql.bind(Value::DateTime(now + self.settings.lease));
        self.lease_where(&mut sql, run);
        Ok(tx.execute(&sql).await? == 1)
    }

    async fn progress(
        &self,
        tx: &mut Tx,
        run: &Claimed,
        next: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut sql = Sql::new("UPDATE \"flow_runs\" SET \"node\" = ");
        sql.bind(next.map(Value::Text).unwrap_or(Value::Null(ColKind::Text)))
            .push(", \"steps\" = ")
            .bind(Value::Json(run.steps.clone()))
            .push(", \"attempt\" = 0, \"error\" = NULL, \"updated_at\" = ")
            .bind(Value::DateTime(now));
        self.lease_where(&mut sql, run.id);
        tx.execute(&sql).await?;
        Ok(())
    }

    async fn sleep(&self, run: &Claimed, at: DateTime<Utc>) -> Result<()> {
        let mut tx = self.db.begin().await?;
        let mut sql = Sql::new("UPDATE \"flow_runs\" SET \"status\" = 'waiting', \"lease_owner\" = NULL, \"lease_until\" = NULL, \"wake_at\" = ");
        sql.bind(Value::DateTime(at))
            .push(", \"updated_at\" = ")
            .bind(Value::DateTime(self.clock.now()));
        self.lease_where(&mut sql, run.id);
        tx.execute(&sql).await?;
        tx.commit().await
    }

    async fn finish(&self, run: &Claimed, status: &str, error: Option<&str>) -> Result<bool> {
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        let mut sql = Sql::new("UPDATE \"flow_runs\" SET \"status\" = ");
        sql.bind(Value::Text(status.into()))
            .push(", \"node\" = NULL, \"lease_owner\" = NULL, \"lease_until\" = NULL, \"error\" = ")
            .bind(
                error
                    .map(|e| Value::Text(e.into()))
                    .unwrap_or(Value::Null(ColKind::Text)),
            )
            .push(", \"finished_at\" = ")
            .bind(Value::DateTime(now))
            .push(", \"updated_at\" = ")
            .bind(Value::DateTime(now));
        self.lease_where(&mut sql, run.id);
        let n = tx.execute(&sql).await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    // ----- approvals -----------------------------------------------------------------------

    /// Record a decision on an approval step by `user`; wakes the run when the step is decided.
    pub async fn decide(
        &self,
        app: &str,
        approval: Uuid,
        user: Uuid,
        admin: bool,
        approve: bool,
        comment: Option<&str>,
    ) -> std::result::Result<Json, DecideError> {
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        let mut sql = Sql::new("SELECT \"approvers\", \"rule\", \"votes\", \"status\", \"run_id\" FROM \"approvals\" WHERE \"id\" = ");
        sql.bind(Value::Uuid(approval))
            .push(" AND \"app\" = ")
            .bind(Value::Text(app.into()));
        if tx.backend() == Backend::Postgres {
            sql.push(" FOR UPDATE");
        }
        let Some(r) = tx
            .fetch_optional(
                &sql,
                &[
                    ColKind::Json,
                    ColKind::Text,
                    ColKind::Json,
                    ColKind::Text,
                    ColKind::Uuid,
                ],
            )
            .await?
        else {
            return Err(DecideError::NotFound);
        };
        let approvers: Vec<Uuid> = serde_json::from_value(json_of(&r[0])).unwrap_or_default();
        if !approvers.contains(&user) && !admin {
            return Err(DecideError::NotFound);
        }
        if text(&r[3]) != "pending" {
            return Err(DecideError::Decided(text(&r[3])));
        }
        let mut votes = json_of(&r[2]);
        votes[user.to_string()] = json!({ "approve": approve, "comment": comment, "at": now });
        let approvals = approvers
            .iter()
            .filter(|a| {
                votes
                    .get(a.to_string())
                    .and_then(|v| v.get("approve"))
                    .and_then(Json::as_bool)
                    == Some(true)
            })
            .count();
        let status = if !approve {
            "rejected"
        } else if text(&r[1]) == "any" || admin || approvals >= approvers.len() {
            "approved"
        } else {
            "pending"
        };
        let mut up = Sql::new("UPDATE \"approvals\" SET \"votes\" = ");
        up.bind(Value::Json(votes.clone()))
            .push(", \"status\" = ")
            .bind(Value::Text(status.into()));
        if status != "pending" {
            up.push(", \"decided_at\" = ").bind(Value::DateTime(now));
            up.push(", \"comment\" = ").bind(
                comment
                    .map(|c| Value::Text(c.into()))
                    .unwrap_or(Value::Null(ColKind::Text)),
            );
        }
        up.push(" WHERE \"id\" = ").bind(Value::Uuid(approval));
        tx.execute(&up).await?;
        if status != "pending" {
            let mut wake = Sql::new("UPDATE \"flow_runs\" SET \"wake_at\" = ");
            wake.bind(Value::DateTime(now))
                .push(" WHERE \"id\" = ")
                .bind(r[4].clone())
                .push(" AND \"status\" = 'waiting'");
            tx.execute(&wake).await?;
        }
        tx.commit().await?;
        self.work_wake.notify_one();
        Ok(json!({ "id": approval, "status": status, "votes": votes }))
    }

    // ----- inactivity ----------------------------------------------------------------------

    /// Queue a run of `wf` unless `mark` was used before for this workflow and record (the
    /// trigger's "once per …" rule, kept in `flow_marks`); the mark and the run commit together.
    #[allow(clippy::too_many_arguments)]
    async fn start_once(
        &self,
        inst: &Installed,
        wf: &Workflow,
        entity: &str,
        record: Option<Uuid>,
        mark: &str,
        ctx: &Json,
        now: DateTime<Utc>,
    ) -> Result<Option<Uuid>> {
        let mut tx = self.db.begin().await?;
        let mut sql = Sql::new("INSERT INTO \"flow_marks\" (\"app\", \"workflow\", \"record_id\", \"mark\", \"created_at\") VALUES (");
        sql.bind(Value::Text(inst.app.key.clone()))
            .push(", ")
            .bind(Value::Text(wf.def.key.clone()))
            .push(", ")
            .bind(Value::Uuid(record.unwrap_or_default()))
            .push(", ")
            .bind(Value::Text(mark.to_owned()))
            .push(", ")
            .bind(Value::DateTime(now))
            .push(") ON CONFLICT DO NOTHING");
        if tx.execute(&sql).await? != 1 {
            return Ok(None);
        }
        let id = Uuid::now_v7();
        insert_run(
            &mut tx,
            &NewRun {
                id,
                app: &inst.app.key,
                wf: &wf.def,
                entity,
                record,
                event: None,
                context: ctx,
                status: "queued",
                node: Some(&wf.entry),
                steps: &json!({}),
                depth: 0,
                wake_at: now,
                error: None,
                now,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Some(id))
    }

    /// Start inactivity workflows for records idle past their limit, once per idle period.
    pub async fn scan_inactivity(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut started = 0;
        let apps = self.all_installed();
        for inst in apps {
            for wf in inst.flows.enabled() {
                let Trigger::Inactivity {
                    entity,
                    hours,
                    working_days,
                    activity_entity,
                    activity_kinds,
                    ..
                } = &wf.def.trigger
                else {
                    continue;
                };
                let e = inst.app.entity(entity)?;
                // Last activity: the later of the last stage change (or creation) and the newest
                // related activity record. Candidates are records idle for at least the calendar
                // length of the limit (a necessary condition) with no mark since their last
                // activity; the exact due time is computed below on the calendar.
                let stage = e.stage();
                let changed = match stage {
                    Some(sf) => format!(
                        "COALESCE(t.{}, t.\"created_at\")",
                        trellis_form::db::quote(&trellis_form::model::stage_changed_column(
                            &sf.key
                        ))
                    ),
                    None => "t.\"created_at\"".to_owned(),
                };
                let rel = activity_entity
                    .as_ref()
                    .and_then(|a| inst.app.entity(a).ok())
                    .and_then(|ae| {
                        ae.fields
                            .iter()
                            .find(|f| {
                                f.ty == trellis_form::def::FieldType::Relation
                                    && f.def.entity.as_deref() == Some(entity.as_str())
                            })
                            .map(|f| (ae.table.clone(), f.key.clone()))
                    });
                // The statement starts empty so that the kinds' parameters come first, in order.
                let mut sql = Sql::new("");
                let kinds = if activity_kinds.is_empty() {
                    String::new()
                } else {
                    let ps: Vec<String> = activity_kinds
                        .iter()
                        .map(|k| sql.param(Value::Text(k.clone())))
                        .collect();
                    format!(" AND a.\"kind\" IN ({})", ps.join(", "))
                };
                let activity = match &rel {
                    Some((table, col)) => format!(
                        "COALESCE((SELECT MAX(a.\"created_at\") FROM {} a WHERE a.{} = t.\"id\"{kinds}), t.\"created_at\")",
                        trellis_form::db::quote(table),
                        trellis_form::db::quote(col)
                    ),
                    None => "t.\"created_at\"".to_owned(),
                };
                let greatest = if self.db.backend() == Backend::Postgres {
                    "GREATEST"
                } else {
                    "MAX"
                };
                sql.push(&format!(
                    "SELECT x.\"id\", x.\"last\" FROM (SELECT t.\"id\" AS \"id\", {greatest}({changed}, {activity}) AS \"last\" FROM {} t",
                    trellis_form::db::quote(&e.table)
                ));
                if let Some(sf) = stage {
                    let open: Vec<&str> = sf
                        .stages
                        .iter()
                        .filter(|s| s.kind == trellis_form::def::StageKind::Open)
                        .map(|s| s.key.as_str())
                        .collect();
                    sql.push(&format!(
                        " WHERE t.{} IN (",
                        trellis_form::db::quote(&sf.key)
                    ));
                    for (n, s) in open.iter().enumerate() {
                        if n > 0 {
                            sql.push(", ");
                        }
                        sql.bind(Value::Text((*s).to_owned()));
                    }
                    if open.is_empty() {
                        sql.push("NULL");
                    }
                    sql.push(")");
                }
                let span = match (hours, working_days) {
                    (Some(h), _) => Duration::hours(*h as i64),
                    (_, Some(d)) => Duration::days(*d as i64),
                    _ => continue,
                };
                sql.push(") x WHERE x.\"last\" <= ")
                    .bind(Value::DateTime(now - span))
                    .push(" AND NOT EXISTS (SELECT 1 FROM \"flow_marks\" m WHERE m.\"app\" = ")
                    .bind(Value::Text(inst.app.key.clone()))
                    .push(" AND m.\"workflow\" = ")
                    .bind(Value::Text(wf.def.key.clone()))
                    .push(" AND m.\"record_id\" = x.\"id\" AND m.\"created_at\" >= x.\"last\") ORDER BY x.\"last\" LIMIT 500");
                let rows = self
                    .db
                    .fetch_all(&sql, &[ColKind::Uuid, ColKind::DateTime])
                    .await?;
                for r in rows {
                    let Some(id) = uuid(&r[0]) else { continue };
                    let Some(last) = time(&r[1]) else { continue };
                    let due = match (hours, working_days) {
                        (Some(h), _) => last + Duration::hours(*h as i64),
                        (_, Some(d)) => inst.flows.calendar().add_working_days(last, *d),
                        _ => continue,
                    };
                    if now < due {
                        continue;
                    }
                    let Ok(rec) = store::get(&self.db, e, id).await else {
                        continue;
                    };
                    let ev = Event::about(
                        inst.app.key.clone(),
                        entity.clone(),
                        id,
                        "inactivity",
                        rec.to_json(),
                        None,
                        now,
                    );
                    let mut ctx = context(&ev, &self.settings.vars, now, &inst);
                    ctx["idle_since"] = json!(last);
                    if !wf.trigger_holds(&ctx) {
                        continue;
                    }
                    if self
                        .start_once(&inst, wf, entity, Some(id), &last.to_rfc3339(), &ctx, now)
                        .await?
                        .is_some()
                    {
                        started += 1;
                    }
                }
            }
        }
        if started > 0 {
            self.work_wake.notify_one();
        }
        Ok(started)
    }

    /// Start date-relative workflows whose moment has come, once per record and field value.
    /// Moments up to 7 days past are caught up (a server that was down that long).
    pub async fn scan_dates(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut started = 0;
        let apps = self.all_installed();
        for inst in apps {
            for wf in inst.flows.enabled() {
                let Trigger::DateRelative {
                    entity,
                    field,
                    offset_days,
                    hour,
                    ..
                } = &wf.def.trigger
                else {
                    continue;
                };
                let e = inst.app.entity(entity)?;
                let Some(f) = e.field(field) else { continue };
                let is_date = f.ty == trellis_form::def::FieldType::Date;
                let offset = Duration::days(*offset_days as i64);
                let catch_up = Duration::days(7);
                let (lo, hi) = if is_date {
                    (
                        Value::Date((now - catch_up - offset - Duration::days(1)).date_naive()),
                        Value::Date((now - offset + Duration::days(1)).date_naive()),
                    )
                } else {
                    (
                        Value::DateTime(now - catch_up - offset),
                        Value::DateTime(now - offset),
                    )
                };
                let mut sql = Sql::new(format!(
                    "SELECT \"id\" FROM {} WHERE {c} >= ",
                    trellis_form::db::quote(&e.table),
                    c = trellis_form::db::quote(field)
                ));
                sql.bind(lo)
                    .push(&format!(" AND {} <= ", trellis_form::db::quote(field)))
                    .bind(hi)
                    .push(" LIMIT 2000");
                let tz = e.timezone;
                for r in self.db.fetch_all(&sql, &[ColKind::Uuid]).await? {
                    let Some(id) = uuid(&r[0]) else { continue };
                    let Ok(rec) = store::get(&self.db, e, id).await else {
                        continue;
                    };
                    let value = rec
                        .fields
                        .get(field)
                        .and_then(Json::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let moment = if is_date {
                        let Ok(d) = chrono::NaiveDate::parse_from_str(&value, "%Y-%m-%d") else {
                            continue;
                        };
                        let local = d.and_hms_opt(hour.unwrap_or(9), 0, 0).expect("valid hour");
                        match chrono::TimeZone::from_local_datetime(&tz, &local).earliest() {
                            Some(t) => t.with_timezone(&Utc) + offset,
                            None => continue,
                        }
                    } else {
                        match DateTime::parse_from_rfc3339(&value) {
                            Ok(t) => t.with_timezone(&Utc) + offset,
                            Err(_) => continue,
                        }
                    };
                    if now < moment || now - moment > catch_up {
                        continue;
                    }
                    let ev = Event::about(
                        inst.app.key.clone(),
                        entity.clone(),
                        id,
                        "date_reached",
                        rec.to_json(),
                        None,
                        now,
                    );
                    let ctx = context(&ev, &self.settings.vars, now, &inst);
                    if !wf.trigger_holds(&ctx) {
                        continue;
                    }
                    if self
                        .start_once(
                            &inst,
                            wf,
                            entity,
                            Some(id),
                            &format!("{field}={value}"),
                            &ctx,
                            now,
                        )
                        .await?
                        .is_some()
                    {
                        started += 1;
                    }
                }
            }
        }
        if started > 0 {
            self.work_wake.notify_one();
        }
        Ok(started)
    }

    /// Start scheduled workflows whose next moment has come. The last moment fired is kept in
    /// the database and advanced with a compare-and-set, so several instances fire each moment
    /// once; moments missed while no server ran are fired once, not one by one.
    pub async fn scan_schedules(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut started = 0;
        let apps = self.all_installed();
        for inst in apps {
            let tz = inst
                .app
                .entities
                .first()
                .map(|e| e.timezone)
                .unwrap_or(chrono_tz::UTC);
            for wf in inst.flows.enabled() {
                let Trigger::Schedule { cron } = &wf.def.trigger else {
                    continue;
                };
                let Ok(schedule) = crate::schedule::parse(cron) else {
                    continue;
                };
                let key = format!("schedule:{}", wf.def.key);
                let mut tx = self.db.begin().await?;
                // First sight: start counting from now (no firing for the past).
                let mut init = Sql::new(
                    "INSERT INTO \"flow_counters\" (\"app\", \"key\", \"value\") VALUES (",
                );
                init.bind(Value::Text(inst.app.key.clone()))
                    .push(", ")
                    .bind(Value::Text(key.clone()))
                    .push(", ")
                    .bind(Value::Int(now.timestamp()))
                    .push(") ON CONFLICT (\"app\", \"key\") DO NOTHING");
                tx.execute(&init).await?;
                let mut get = Sql::new("SELECT \"value\" FROM \"flow_counters\" WHERE \"app\" = ");
                get.bind(Value::Text(inst.app.key.clone()))
                    .push(" AND \"key\" = ")
                    .bind(Value::Text(key.clone()));
                let last = tx
                    .fetch_optional(&get, &[ColKind::Int])
                    .await?
                    .map(|r| int(&r[0]))
                    .unwrap_or(now.timestamp());
                let Some(last_at) = DateTime::from_timestamp(last, 0) else {
                    continue;
                };
                let Some(mut due) = crate::schedule::next_after(&schedule, tz, last_at) else {
                    continue;
                };
                if due > now {
                    tx.commit().await?;
                    continue;
                }
                // The latest moment not after now.
                while let Some(n) = crate::schedule::next_after(&schedule, tz, due) {
                    if n > now {
                        break;
                    }
                    due = n;
                }
                let mut cas = Sql::new("UPDATE \"flow_counters\" SET \"value\" = ");
                cas.bind(Value::Int(due.timestamp()))
                    .push(" WHERE \"app\" = ")
                    .bind(Value::Text(inst.app.key.clone()))
                    .push(" AND \"key\" = ")
                    .bind(Value::Text(key))
                    .push(" AND \"value\" = ")
                    .bind(Value::Int(last));
                if tx.execute(&cas).await? == 1 {
                    let ctx = json!({
                        "app": { "key": inst.app.key, "default_owner": inst.default_owner },
                        "record": {}, "old": null, "changed": [], "user": { "id": null },
                        "now": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        "event": { "kind": "schedule", "at": due },
                        "steps": {}, "vars": self.settings.vars,
                    });
                    insert_run(
                        &mut tx,
                        &NewRun {
                            id: Uuid::now_v7(),
                            app: &inst.app.key,
                            wf: &wf.def,
                            entity: "",
                            record: None,
                            event: None,
                            context: &ctx,
                            status: "queued",
                            node: Some(&wf.entry),
                            steps: &json!({}),
                            depth: 0,
                            wake_at: now,
                            error: None,
                            now,
                        },
                    )
                    .await?;
                    started += 1;
                }
                tx.commit().await?;
            }
        }
        if started > 0 {
            self.work_wake.notify_one();
        }
        Ok(started)
    }

    /// An inbound webhook call: verify its Standard Webhooks signature against each workflow
    /// listening on `name`, drop a repeated `webhook-id`, and queue the runs. Returns the run ids.
    pub async fn receive_hook(
        &self,
        app: &str,
        name: &str,
        headers: &HookHeaders,
        body: &[u8],
    ) -> std::result::Result<Vec<Uuid>, HookError> {
        use base64::Engine as _;
        use hmac::{Hmac, Mac};
        let inst = self.installed(app).ok_or(HookError::NotFound)?;
        let now = self.clock.now();
        let mut listening = vec![];
        for wf in inst.flows.enabled() {
            let Trigger::Webhook {
                name: n, secret, ..
            } = &wf.def.trigger
            else {
                continue;
            };
            if n != name {
                continue;
            }
            let vars = json!({ "vars": self.settings.vars });
            let secret = actions::render_str(wf, "trigger/secret", secret, &vars)
                .map_err(|_| HookError::NotFound)?;
            if secret.trim().is_empty() {
                continue;
            }
            listening.push((wf.clone(), secret.trim().to_owned()));
        }
        if listening.is_empty() {
            return Err(HookError::NotFound);
        }
        let (Some(id), Some(ts), Some(sigs)) =
            (&headers.id, &headers.timestamp, &headers.signature)
        else {
            return Err(HookError::Unsigned(
                "the webhook-id, webhook-timestamp and webhook-signature headers are required"
                    .into(),
            ));
        };
        let ts_n: i64 = ts
            .parse()
            .map_err(|_| HookError::Unsigned("webhook-timestamp is not a number".into()))?;
        if (now.timestamp() - ts_n).abs() > 300 {
            return Err(HookError::Unsigned(
                "webhook-timestamp is more than 5 minutes from now (replay?)".into(),
            ));
        }
        let payload: Json = serde_json::from_slice(body)
            .map_err(|e| HookError::Body(format!("the body is not JSON: {e}")))?;
        // Every listener whose secret verifies the signature runs; none verifying is a 401.
        let mut verified = vec![];
        for (wf, secret) in listening {
            let key = match secret.strip_prefix("whsec_") {
                Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(k) => k,
                    Err(_) => {
                        tracing::warn!(workflow = %wf.def.key, "the hook secret after `whsec_` is not base64; the hook is off");
                        continue;
                    }
                },
                None => secret.as_bytes().to_vec(),
            };
            let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&key) else {
                continue;
            };
            mac.update(format!("{id}.{ts}.").as_bytes());
            mac.update(body);
            let expected =
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            // Several signatures may be sent (secret rotation): any valid one will do.
            if sigs.split_whitespace().any(|s| {
                s.strip_prefix("v1,")
                    .is_some_and(|x| constant_eq(x.as_bytes(), expected.as_bytes()))
            }) {
                verified.push(wf);
            }
        }
        if verified.is_empty() {
            return Err(HookError::Unsigned("the signature does not match".into()));
        }
        let mut runs = vec![];
        for wf in verified {
            let e = inst
                .app
                .entity(wf.def.trigger.entity())
                .map_err(|e| HookError::Body(e.to_string()))?;
            let record = match payload.get("record_id").and_then(Json::as_str) {
                Some(r) => {
                    let rid = Uuid::parse_str(r)
                        .map_err(|_| HookError::Body(format!("record_id `{r}` is not an id")))?;
                    Some(store::get(&self.db, e, rid).await.map_err(|_| {
                        HookError::Body(format!("there is no {} with the id {rid}", e.key))
                    })?)
                }
                None => None,
            };
            let ev = Event::about(
                app,
                e.key.clone(),
                record.as_ref().map(|r| r.meta.id).unwrap_or_default(),
                "webhook",
                record.as_ref().map(|r| r.to_json()).unwrap_or(json!({})),
                None,
                now,
            );
            let mut ctx = context(&ev, &self.settings.vars, now, &inst);
            ctx["payload"] = payload.clone();
            if !wf.trigger_holds(&ctx) {
                continue;
            }
            if let Some(run) = self
                .start_once(
                    &inst,
                    &wf,
                    &e.key,
                    record.as_ref().map(|r| r.meta.id),
                    &format!("webhook-id={id}"),
                    &ctx,
                    now,
                )
                .await?
            {
                runs.push(run);
            }
        }
        self.work_wake.notify_one();
        Ok(runs)
    }

    // ----- dry run -------------------------------------------------------------------------

    /// Run a workflow against a record with no side effects: every database step runs in a
    /// transaction that is rolled back, external steps are described instead of performed.
    /// Returns the path taken and what each node would do (record changes as a diff).
    pub async fn dry_run(
        &self,
        app: &str,
        def: Option<&Json>,
        workflow: &str,
        record: Option<Uuid>,
        sample: Option<&Json>,
        replay: Option<Uuid>,
    ) -> Result<Json> {
        let inst = self
            .installed(app)
            .ok_or_else(|| trellis_form::FormError::AppNotFound(app.into()))?;
        // Replaying a past run: its trigger (the record as it was, what changed) against this
        // version; writes go to the record as it is now, in a transaction rolled back.
        let mut replayed: Option<Json> = None;
        let mut record = record;
        if let Some(run) = replay {
            let mut sql =
                Sql::new("SELECT \"context\", \"record_id\" FROM \"flow_runs\" WHERE \"app\" = ");
            sql.bind(Value::Text(app.into()))
                .push(" AND \"id\" = ")
                .bind(Value::Uuid(run));
            let row = self
                .db
                .fetch_optional(&sql, &[ColKind::Json, ColKind::Uuid])
                .await?
                .ok_or(trellis_form::FormError::NotFound("run"))?;
            record = uuid(&row[1]);
            if record.is_none() {
                return Err(trellis_form::FormError::Invalid(vec![
                    trellis_form::error::Problem::new(
                        "/replay_run_id",
                        "no_record",
                        "That run has no record to replay against.",
                    ),
                ]));
            }
            replayed = Some(json_of(&row[0]));
        }
        let wf: Arc<Workflow> = match def {
            Some(d) => {
                let mut app_def = inst.app.def.clone();
                app_def.workflows = vec![d.clone()];
                let a = trellis_form::compile::compile(
                    trellis_form::compile::parse(&serde_json::to_value(&app_def).expect("ser"))?,
                    inst.app.version,
                )?;
                let flows = compile::compile(&a).map_err(trellis_form::FormError::Definition)?;
                flows
                    .workflows
                    .values()
                    .next()
                    .cloned()
                    .ok_or(trellis_form::FormError::NotFound("workflow"))?
            }
            None => inst
                .flows
                .workflows
                .get(workflow)
                .cloned()
                .ok_or(trellis_form::FormError::NotFound("workflow"))?,
        };
        let e = inst.app.entity(wf.def.trigger.entity())?;
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        let rec = match (record, sample) {
            (Some(id), _) => store::get_in(&mut tx, e, id).await?,
            (None, Some(s)) => {
                store::create(
                    &mut tx,
                    &inst.app,
                    e,
                    s,
                    &WriteCtx {
                        actor: None,
                        now,
                        default_owner: None,
                        import: false,
                        depth: 0,
                    },
                )
                .await?
            }
            (None, None) => {
                return Err(trellis_form::FormError::Invalid(vec![
                    trellis_form::error::Problem::new(
                        "/record_id",
                        "required",
                        "Give a record_id or a sample record.",
                    ),
                ]))
            }
        };
        let before = rec.to_json();
        let mut ev = Event::about(
            app,
            e.key.clone(),
            rec.meta.id,
            "dry_run",
            before.clone(),
            None,
            now,
        );
        let mut trigger_matches = Json::Null;
        if let Some(old_ctx) = &replayed {
            ev.kind = old_ctx
                .pointer("/event/kind")
                .and_then(Json::as_str)
                .unwrap_or("replay")
                .to_owned();
            ev.record = old_ctx.get("record").cloned().unwrap_or(Json::Null);
            ev.old = old_ctx.get("old").cloned().unwrap_or(Json::Null);
            ev.changed = old_ctx
                .get("changed")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let c = context(&ev, &self.settings.vars, now, &inst);
            trigger_matches = match matches(&wf, &ev, &c, &inst.app) {
                Ok(b) => json!(b),
                Err(m) => json!({ "error": m }),
            };
        }
        let mut ctx = context(&ev, &self.settings.vars, now, &inst);
        let env = Env {
            app: &inst.app,
            wf: &wf,
            run_id: Uuid::nil(),
            write: WriteCtx {
                actor: None,
                now,
                default_owner: None,
                import: false,
                depth: 1,
            },
        };
        let mut path = vec![];
        let mut node = Some(wf.entry.clone());
        let mut steps = Map::new();
        while let Some(id) = node.take() {
            let idx = wf.nodes[&id];
            let n = &wf.def.nodes[idx];
            ctx["steps"] = Json::Object(steps.clone());
            let (output, data, error) = if n.action.database_only() {
                match run_db_node(&mut tx, &env, idx, n, &mut ctx).await {
                    Ok(o) => (o.output, o.data, None),
                    Err(m) => ("error".into(), Json::Null, Some(m)),
                }
            } else {
                (
                    n.action.outputs()[0].clone(),
                    describe_effect(&wf, idx, n, &ctx),
                    None,
                )
            };
            path.push(json!({ "node": id, "type": n.action.kind(), "output": output, "would": data, "error": error }));
            if error.is_some() && !wf.edges_from(&id).any(|(_, e)| e.output == "error") {
                break;
            }
            steps.insert(id.clone(), data);
            ctx["steps"] = Json::Object(steps.clone());
            node = next_node(&wf, &id, &output, &ctx).unwrap_or(None);
        }
        let after = store::get_in(&mut tx, e, rec.meta.id)
            .await
            .map(|r| r.to_json())
            .unwrap_or(Json::Null);
        drop(tx); // rolled back: nothing happened
        let mut diff = Map::new();
        if let (Some(b), Some(a)) = (before.as_object(), after.as_object()) {
            for (k, v) in a {
                if matches!(k.as_str(), "version" | "updated_at") {
                    continue;
                }
                if b.get(k) != Some(v) {
                    diff.insert(k.clone(), json!({ "from": b.get(k), "to": v }));
                }
            }
        }
        Ok(
            json!({ "workflow": wf.def.key, "version": wf.def.version, "trigger_matches": trigger_matches, "path": path, "record_changes": diff }),
        )
    }

    // ----- reading -------------------------------------------------------------------------

    /// Runs of an app, newest first, filtered by workflow and/or record.
    pub async fn runs(
        &self,
        app: &str,
        workflow: Option<&str>,
        record: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Json>> {
        let mut sql = Sql::new(format!(
            "SELECT {RUN_SUMMARY} FROM \"flow_runs\" WHERE \"app\" = "
        ));
        sql.bind(Value::Text(app.into()));
        if let Some(w) = workflow {
            sql.push(" AND \"workflow\" = ").bind(Value::Text(w.into()));
        }
        if let Some(r) = record {
            sql.push(" AND \"record_id\" = ").bind(Value::Uuid(r));
        }
        sql.push(&format!(
            " ORDER BY \"created_at\" DESC, \"id\" DESC LIMIT {}",
            limit.clamp(1, 500)
        ));
        Ok(self
            .db
            .fetch_all(&sql, &RUN_SUMMARY_KINDS)
            .await?
            .iter()
            .map(|r| run_summary(r))
            .collect())
    }

    /// One run with its steps.
    pub async fn run(&self, app: &str, id: Uuid) -> Result<Option<Json>> {
        let mut sql = Sql::new(format!(
            "SELECT {RUN_SUMMARY}, \"context\" FROM \"flow_runs\" WHERE \"app\" = "
        ));
        sql.bind(Value::Text(app.into()))
            .push(" AND \"id\" = ")
            .bind(Value::Uuid(id));
        let mut kinds = RUN_SUMMARY_KINDS.to_vec();
        kinds.push(ColKind::Json);
        let Some(r) = self.db.fetch_optional(&sql, &kinds).await? else {
            return Ok(None);
        };
        let mut s = Sql::new("SELECT \"seq\", \"node\", \"kind\", \"status\", \"attempt\", \"idempotency_key\", \"output\", \"error\", \"started_at\", \"finished_at\", \"duration_ms\", \"input\" FROM \"flow_steps\" WHERE \"run_id\" = ");
        s.bind(Value::Uuid(id)).push(" ORDER BY \"seq\"");
        let sk = [
            ColKind::Int,
            ColKind::Text,
            ColKind::Text,
            ColKind::Text,
            ColKind::Int,
            ColKind::Text,
            ColKind::Json,
            ColKind::Text,
            ColKind::DateTime,
            ColKind::DateTime,
            ColKind::Int,
            ColKind::Json,
        ];
        let steps: Vec<Json> = self.db.fetch_all(&s, &sk).await?.into_iter().map(|x| json!({
            "seq": int(&x[0]), "node": text(&x[1]), "type": text(&x[2]), "status": text(&x[3]), "attempt": int(&x[4]),
            "idempotency_key": text(&x[5]), "output": json_of(&x[6]),
            "error": opt_text(&x[7]),
            "started_at": time(&x[8]), "finished_at": time(&x[9]),
            "duration_ms": match x[10] { Value::Int(i) => json!(i), _ => Json::Null },
            "input": json_of(&x[11]),
        })).collect();
        let ctx = json_of(&r[RUN_SUMMARY_KINDS.len()]);
        let mut out = run_summary(&r);
        out["trigger"] = json!({ "event": ctx.get("event"), "changed": ctx.get("changed"), "old": ctx.get("old") });
        out["steps"] = json!(steps);
        Ok(Some(out))
    }
}

/// The columns of a run's summary (lists and the head of one run).
const RUN_SUMMARY: &str = "\"id\", \"workflow\", \"version\", \"mode\", \"entity\", \"record_id\", \"status\", \"node\", \"attempt\", \"depth\", \"wake_at\", \"error\", \"created_at\", \"finished_at\"";
const RUN_SUMMARY_KINDS: [ColKind; 14] = [
    ColKind::Uuid,
    ColKind::Text,
    ColKind::Int,
    ColKind::Text,
    ColKind::Text,
    ColKind::Uuid,
    ColKind::Text,
    ColKind::Text,
    ColKind::Int,
    ColKind::Int,
    ColKind::DateTime,
    ColKind::Text,
    ColKind::DateTime,
    ColKind::DateTime,
];

fn opt_text(v: &Value) -> Json {
    match v {
        Value::Text(s) => json!(s),
        _ => Json::Null,
    }
}

fn run_summary(r: &[Value]) -> Json {
    json!({
        "id": uuid(&r[0]), "workflow": text(&r[1]), "version": int(&r[2]), "mode": text(&r[3]),
        "entity": text(&r[4]), "record_id": uuid(&r[5]), "status": text(&r[6]),
        "node": opt_text(&r[7]), "attempt": int(&r[8]), "depth": int(&r[9]), "wake_at": time(&r[10]),
        "error": opt_text(&r[11]), "created_at": time(&r[12]), "finished_at": time(&r[13]),
    })
}

impl Outcome {
    fn ok_data(data: Json) -> Self {
        Outcome {
            output: "ok".into(),
            data,
        }
    }
}

/// An inline workflow failed; the write is refused.
#[derive(Debug, thiserror::Error)]
#[error("the workflow `{workflow}` failed{}: {message}", node.as_ref().map(|n| format!(" at node `{n}`")).unwrap_or_default())]
pub struct InlineError {
    /// Workflow key.
    pub workflow: String,
    /// Node id.
    pub node: Option<String>,
    /// What went wrong.
    pub message: String,
}

impl From<trellis_form::FormError> for InlineError {
    fn from(e: trellis_form::FormError) -> Self {
        InlineError {
            workflow: String::new(),
            node: None,
            message: e.to_string(),
        }
    }
}

/// The signature headers of an inbound webhook.
#[derive(Debug, Clone, Default)]
pub struct HookHeaders {
    /// `webhook-id`.
    pub id: Option<String>,
    /// `webhook-timestamp` (Unix seconds).
    pub timestamp: Option<String>,
    /// `webhook-signature` (`v1,<base64>`, several separated by spaces).
    pub signature: Option<String>,
}

/// Why an inbound webhook was refused.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// No enabled workflow listens on this name (or its secret is not set).
    #[error("no such hook")]
    NotFound,
    /// Missing, stale or wrong signature.
    #[error("{0}")]
    Unsigned(String),
    /// The body is not what the hook needs.
    #[error("{0}")]
    Body(String),
    /// Storage.
    #[error(transparent)]
    Form(#[from] trellis_form::FormError),
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a decision was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No such pending approval for this user (404: ids do not leak).
    #[error("approval not found")]
    NotFound,
    /// Already decided.
    #[error("the approval was already decided ({0})")]
    Decided(String),
    /// Storage.
    #[error(transparent)]
    Form(#[from] trellis_form::FormError),
}

/// The next node after `id` left by `output`: the first edge with that output whose condition
/// holds. `None` ends the run.
fn next_node(
    wf: &Workflow,
    id: &str,
    output: &str,
    ctx: &Json,
) -> std::result::Result<Option<String>, String> {
    for (j, e) in wf.edges_from(id) {
        if e.output != output {
            continue;
        }
        if e.condition.is_some() && !wf.condition(&format!("edges/{j}/condition")).eval(ctx)? {
            continue;
        }
        return Ok(Some(e.to.clone()));
    }
    Ok(None)
}

fn render_json(
    wf: &Workflow,
    base: &str,
    v: &Json,
    ctx: &Json,
) -> std::result::Result<Json, String> {
    Ok(match v {
        Json::String(s) if crate::template::is_template(s) => {
            json!(wf.templates.render(base, ctx)?)
        }
        Json::Array(a) => Json::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| render_json(wf, &format!("{base}/{i}"), x, ctx))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Json::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                out.insert(
                    k.clone(),
                    render_json(
                        wf,
                        &format!("{base}/{}", trellis_form::error::pointer_segment(k)),
                        x,
                        ctx,
                    )?,
                );
            }
            Json::Object(out)
        }
        other => other.clone(),
    })
}

fn describe_effect(wf: &Workflow, idx: usize, n: &NodeDef, ctx: &Json) -> Json {
    let i = idx.to_string();
    let r = |part: &str| {
        wf.templates
            .render(&tpl_name(&["nodes", &i, part]), ctx)
            .unwrap_or_else(|e| format!("(template error: {e})"))
    };
    match &n.action {
        Action::SendEmail { .. } => {
            json!({ "email": { "to": r("to"), "subject": r("subject"), "body": r("body") } })
        }
        Action::HttpRequest { url, body, .. } => {
            json!({ "http": { "url": actions::render_str(wf, &tpl_name(&["nodes", &i, "url"]), url, ctx).unwrap_or_default(), "body": render_json(wf, &format!("nodes/{i}/body"), body, ctx).unwrap_or(Json::Null) } })
        }
        Action::Wait { .. } => json!({ "wait": "the run would sleep here" }),
        Action::Approval { steps } => {
            json!({ "approval": steps.iter().map(|s| &s.name).collect::<Vec<_>>() })
        }
        Action::Notify { .. } => json!({ "notify": { "title": r("title") } }),
        _ => Json::Null,
    }
}

async fn managers_of(tx: &mut Tx, users: &[Uuid]) -> Result<Vec<Uuid>> {
    let mut out = vec![];
    for u in users {
        let mut sql = Sql::new("SELECT \"manager_id\" FROM \"users\" WHERE \"id\" = ");
        sql.bind(Value::Uuid(*u));
        if let Some(r) = tx.fetch_optional(&sql, &[ColKind::Uuid]).await? {
            if let Some(m) = uuid(&r[0]) {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
    }
    Ok(out)
}

async fn record_email(
    tx: &mut Tx,
    env: &Env<'_>,
    run: &Claimed,
    data: &Json,
    now: DateTime<Utc>,
) -> Result<()> {
    let s = |k: &str| {
        data.get(k)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let sent = data.get("sent").and_then(Json::as_bool) == Some(true);
    let mut sql = Sql::new("INSERT INTO \"email_outbox\" (\"id\", \"app\", \"run_id\", \"message_id\", \"to_addr\", \"subject\", \"body\", \"status\", \"entity\", \"record_id\", \"created_at\", \"sent_at\") VALUES (");
    sql.bind(Value::Uuid(Uuid::now_v7())).push(", ");
    sql.bind(Value::Text(env.app.key.clone())).push(", ");
    sql.bind(Value::Uuid(run.id)).push(", ");
    sql.bind(Value::Text(s("message_id"))).push(", ");
    sql.bind(Value::Text(s("to"))).push(", ");
    sql.bind(Value::Text(s("subject"))).push(", ");
    sql.bind(Value::Text(s("body"))).push(", ");
    sql.bind(Value::Text(if sent {
        "sent".into()
    } else {
        "kept".into()
    }))
    .push(", ");
    sql.bind(Value::Text(run.entity.clone())).push(", ");
    sql.bind(Value::opt_uuid(record_id(&run.context)))
        .push(", ");
    sql.bind(Value::DateTime(now)).push(", ");
    sql.bind(if sent {
        Value::DateTime(now)
    } else {
        Value::Null(ColKind::DateTime)
    })
    .push(") ON CONFLICT (\"message_id\") DO NOTHING");
    tx.execute(&sql).await?;
    Ok(())
}

struct NewRun<'a> {
    id: Uuid,
    app: &'a str,
    wf: &'a WorkflowDef,
    entity: &'a str,
    record: Option<Uuid>,
    event: Option<i64>,
    context: &'a Json,
    status: &'a str,
    node: Option<&'a str>,
    steps: &'a Json,
    depth: u32,
    wake_at: DateTime<Utc>,
    error: Option<&'a str>,
    now: DateTime<Utc>,
}

async fn insert_run(tx: &mut Tx, r: &NewRun<'_>) -> Result<()> {
    let finished = matches!(r.status, "succeeded" | "failed");
    let mut sql = Sql::new("INSERT INTO \"flow_runs\" (\"id\", \"app\", \"workflow\", \"version\", \"mode\", \"entity\", \"record_id\", \"event_id\", \"context\", \"status\", \"node\", \"steps\", \"attempt\", \"depth\", \"wake_at\", \"error\", \"created_at\", \"updated_at\", \"finished_at\") VALUES (");
    sql.bind(Value::Uuid(r.id)).push(", ");
    sql.bind(Value::Text(r.app.into())).push(", ");
    sql.bind(Value::Text(r.wf.key.clone())).push(", ");
    sql.bind(Value::Int(r.wf.version)).push(", ");
    sql.bind(Value::Text(match r.wf.mode {
        Mode::Inline => "inline".into(),
        Mode::Async => "async".into(),
    }))
    .push(", ");
    sql.bind(Value::Text(r.entity.into())).push(", ");
    sql.bind(Value::opt_uuid(r.record)).push(", ");
    sql.bind(r.event.map(Value::Int).unwrap_or(Value::Null(ColKind::Int)))
        .push(", ");
    // Template variables may hold secrets (`TRELLIS_VAR_*`): never stored, added back when the
    // run advances.
    let mut context = r.context.clone();
    if let Some(m) = context.as_object_mut() {
        m.remove("vars");
    }
    sql.bind(Value::Json(context)).push(", ");
    sql.bind(Value::Text(r.status.into())).push(", ");
    sql.bind(
        r.node
            .map(|n| Value::Text(n.into()))
            .unwrap_or(Value::Null(ColKind::Text)),
    )
    .push(", ");
    sql.bind(Value::Json(r.steps.clone())).push(", 0, ");
    sql.bind(Value::Int(r.depth as i64)).push(", ");
    sql.bind(Value::DateTime(r.wake_at)).push(", ");
    sql.bind(
        r.error
            .map(|e| Value::Text(e.into()))
            .unwrap_or(Value::Null(ColKind::Text)),
    )
    .push(", ");
    sql.bind(Value::DateTime(r.now)).push(", ");
    sql.bind(Value::DateTime(r.now)).push(", ");
    sql.bind(if finished {
        Value::DateTime(r.now)
    } else {
        Value::Null(ColKind::DateTime)
    })
    .push(")");
    tx.execute(&sql).await?;
    Ok(())
}

async fn count_recent(tx: &mut Tx, app: &str, wf: &str, now: DateTime<Utc>) -> Result<i64> {
    let mut sql = Sql::new("SELECT COUNT(*) FROM \"flow_runs\" WHERE \"app\" = ");
    sql.bind(Value::Text(app.into()))
        .push(" AND \"workflow\" = ")
        .bind(Value::Text(wf.into()))
        .push(" AND \"wake_at\" > ")
        .bind(Value::DateTime(now - Duration::seconds(60)));
    Ok(tx
        .fetch_optional(&sql, &[ColKind::Int])
        .await?
        .map(|r| int(&r[0]))
        .unwrap_or(0))
}

async fn next_seq(tx: &mut Tx, run: Uuid) -> Result<i64> {
    let mut sql =
        Sql::new("SELECT COALESCE(MAX(\"seq\"), 0) + 1 FROM \"flow_steps\" WHERE \"run_id\" = ");
    sql.bind(Value::Uuid(run));
    Ok(tx
        .fetch_optional(&sql, &[ColKind::Int])
        .await?
        .map(|r| int(&r[0]))
        .unwrap_or(1))
}

#[allow(clippy::too_many_arguments)]
async fn insert_step(
    tx: &mut Tx,
    run: Uuid,
    seq: i64,
    node: &str,
    kind: &str,
    status: &str,
    key: &str,
    output: &Json,
    error: Option<&str>,
    now: DateTime<Utc>,
    took: Option<i64>,
    worker: Option<&str>,
    input: Option<Json>,
) -> Result<()> {
    let done = status != "started";
    let mut sql = Sql::new("INSERT INTO \"flow_steps\" (\"run_id\", \"seq\", \"node\", \"kind\", \"status\", \"attempt\", \"idempotency_key\", \"output\", \"error\", \"started_at\", \"finished_at\", \"duration_ms\", \"worker\", \"input\") VALUES (");
    sql.bind(Value::Uuid(run)).push(", ");
    sql.bind(Value::Int(seq)).push(", ");
    sql.bind(Value::Text(node.into())).push(", ");
    sql.bind(Value::Text(kind.into())).push(", ");
    sql.bind(Value::Text(status.into())).push(", 1, ");
    sql.bind(Value::Text(key.into())).push(", ");
    sql.bind(Value::Json(output.clone())).push(", ");
    sql.bind(
        error
            .map(|e| Value::Text(e.into()))
            .unwrap_or(Value::Null(ColKind::Text)),
    )
    .push(", ");
    sql.bind(Value::DateTime(now)).push(", ");
    sql.bind(if done {
        Value::DateTime(now)
    } else {
        Value::Null(ColKind::DateTime)
    })
    .push(", ");
    sql.bind(took.map(Value::Int).unwrap_or(Value::Null(ColKind::Int)))
        .push(", ");
    sql.bind(
        worker
            .map(|w| Value::Text(w.into()))
            .unwrap_or(Value::Null(ColKind::Text)),
    )
    .push(", ");
    sql.bind(input.map(Value::Json).unwrap_or(Value::Null(ColKind::Json)))
        .push(")");
    tx.execute(&sql).await?;
    Ok(())
}

/// What a step was given: the node as defined and the record as the step saw it.
fn step_input(node: &NodeDef, ctx: &Json) -> Json {
    json!({
        "node": serde_json::to_value(node).unwrap_or(Json::Null),
        "record": { "id": ctx.pointer("/record/id"), "version": ctx.pointer("/record/version") },
    })
}

#[allow(clippy::too_many_arguments)]
async fn finish_step(
    tx: &mut Tx,
    run: Uuid,
    seq: i64,
    status: &str,
    output: &Json,
    error: Option<&str>,
    now: DateTime<Utc>,
    took: i64,
) -> Result<()> {
    let mut sql = Sql::new("UPDATE \"flow_steps\" SET \"status\" = ");
    sql.bind(Value::Text(status.into()))
        .push(", \"output\" = ")
        .bind(Value::Json(output.clone()))
        .push(", \"error\" = ")
        .bind(
            error
                .map(|e| Value::Text(e.into()))
                .unwrap_or(Value::Null(ColKind::Text)),
        )
        .push(", \"finished_at\" = ")
        .bind(Value::DateTime(now))
        .push(", \"duration_ms\" = ")
        .bind(Value::Int(took))
        .push(" WHERE \"run_id\" = ")
        .bind(Value::Uuid(run))
        .push(" AND \"seq\" = ")
        .bind(Value::Int(seq));
    tx.execute(&sql).await?;
    Ok(())
}

/// Send one email through the pooled SMTP transport (plain SMTP, as to a local relay or a sink).
async fn send_smtp(
    mailer: &lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    smtp: &Smtp,
    to: &str,
    subject: &str,
    body: &str,
    message_id: &str,
    timeout: std::time::Duration,
) -> std::result::Result<(), String> {
    use lettre::{AsyncTransport, Message};
    let msg = Message::builder()
        .from(
            smtp.from
                .parse()
                .map_err(|e| format!("the sender `{}` is not an address: {e}", smtp.from))?,
        )
        .to(to
            .parse()
            .map_err(|e| format!("`{to}` is not an email address: {e}"))?)
        .subject(subject)
        .message_id(Some(message_id.to_owned()))
        .body(body.to_owned())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, mailer.send(msg)).await {
        Ok(r) => r.map(drop).map_err(|e| format!("SMTP: {e}")),
        Err(_) => Err(format!("SMTP: no answer within {} s", timeout.as_secs())),
    }
}

/// POST `payload` signed per Standard Webhooks: `webhook-id`, `webhook-timestamp` and
/// `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
pub async fn post_signed(
    allow: &AllowList,
    url: &str,
    payload: &Json,
    secret: Option<&str>,
    id: &str,
    now: DateTime<Utc>,
    timeout: std::time::Duration,
) -> std::result::Result<u16, String> {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    let checked = netguard::check(url, allow).await?;
    let client = netguard::client(&checked, timeout)?;
    let body = serde_json::to_string(payload).map_err(|e| e.to_string())?;
    let ts = now.timestamp().to_string();
    let mut req = client
        .post(checked.url.clone())
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", &ts);
    if let Some(secret) = secret.filter(|s| !s.trim().is_empty()) {
        let key = match secret.trim().strip_prefix("whsec_") {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| "the webhook secret after `whsec_` is not base64".to_owned())?,
            None => secret.trim().as_bytes().to_vec(),
        };
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
        mac.update(format!("{id}.{ts}.{body}").as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        req = req.header("webhook-signature", format!("v1,{sig}"));
    }
    let resp = req
        .body(body)
        .send()
        .await
        .map_err(|e| format!("the request to {} failed: {e}", checked.host))?;
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(format!("{} answered HTTP {status}", checked.host))
    }
}
