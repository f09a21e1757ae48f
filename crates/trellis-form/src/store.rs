//! Records: create, read, update, delete, batch import — each one SQL transaction that writes the
//! entity row, its field-history rows and one outbox event together.
//!
//! Every path that writes a record goes through [`prepare`], so the API, batch import, file
//! import and workflow actions all see the same validation: the entity's JSON Schema, then the
//! checks JSON Schema cannot express (decimal digits, stage entry criteria, references that must
//! exist, unique values). All problems are collected before anything is written.

use crate::db::{quote, Sql, Tx, Value};
use crate::def::FieldType;
use crate::error::{pointer_segment, FormError, Problem, Result};
use crate::model::{
    stage_changed_column, stage_entered_column, App, ColKind, Entity, SYSTEM_COLUMNS,
};
use crate::{schema, values};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value as Json};
use uuid::Uuid;

/// Who writes, when, and with which privileges.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    /// The acting user (recorded as `created_by` and in history and events).
    pub actor: Option<Uuid>,
    /// The time of the write, from the caller's clock.
    pub now: DateTime<Utc>,
    /// Owner of records created without one (the app's default owner).
    pub default_owner: Option<Uuid>,
    /// Allow historical `created_at` and `stage_history` (admin batch import of old data).
    /// Events of an import are written as already processed: the past starts no automation.
    pub import: bool,
    /// Chain depth: 0 for people and API clients, one more than the run for a workflow's write
    /// (the workflow engine's loop guard).
    pub depth: u32,
}

/// The system part of a stored record.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// Record id (UUID v7).
    pub id: Uuid,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Creator.
    pub created_by: Option<Uuid>,
    /// Owner.
    pub owner: Option<Uuid>,
    /// Optimistic-concurrency version, 1 after create.
    pub version: i64,
}

/// A record as read from its table.
#[derive(Debug, Clone)]
pub struct Record {
    /// System columns.
    pub meta: Meta,
    /// Field values in their JSON form, every field present (null when empty).
    pub fields: Map<String, Json>,
    /// Stage times (`stage__changed_at`, `stage__entered_<key>`), JSON form.
    pub stage_times: Map<String, Json>,
}

impl Record {
    /// The flat JSON form: system fields beside the field values.
    pub fn to_json(&self) -> Json {
        let m = &self.meta;
        let mut out = Map::new();
        out.insert("id".into(), json!(m.id));
        out.insert("created_at".into(), values::datetime_json(&m.created_at));
        out.insert("updated_at".into(), values::datetime_json(&m.updated_at));
        out.insert("created_by".into(), json!(m.created_by));
        out.insert("owner".into(), json!(m.owner));
        out.insert("version".into(), json!(m.version));
        out.extend(self.fields.clone());
        out.extend(self.stage_times.clone());
        Json::Object(out)
    }
}

/// Column list and kinds of a full record select.
pub(crate) fn select_list(e: &Entity) -> (String, Vec<ColKind>) {
    let mut names: Vec<String> = SYSTEM_COLUMNS.iter().map(|c| quote(c)).collect();
    let mut kinds = vec![
        ColKind::Uuid,
        ColKind::DateTime,
        ColKind::DateTime,
        ColKind::Uuid,
        ColKind::Uuid,
        ColKind::Int,
    ];
    for c in e.columns() {
        names.push(quote(&c.name));
        kinds.push(c.kind);
    }
    (names.join(", "), kinds)
}

pub(crate) fn decode(e: &Entity, row: Vec<Value>) -> Record {
    let uuid = |v: &Value| match v {
        Value::Uuid(u) => Some(*u),
        _ => None,
    };
    let time = |v: &Value| match v {
        Value::DateTime(t) => *t,
        _ => DateTime::<Utc>::MIN_UTC,
    };
    let meta = Meta {
        id: uuid(&row[0]).unwrap_or_default(),
        created_at: time(&row[1]),
        updated_at: time(&row[2]),
        created_by: uuid(&row[3]),
        owner: uuid(&row[4]),
        version: match row[5] {
            Value::Int(i) => i,
            _ => 0,
        },
    };
    let mut fields = Map::new();
    let mut stage_times = Map::new();
    let mut i = SYSTEM_COLUMNS.len();
    for f in &e.fields {
        let n = f.columns().len();
        let cols = &row[i..i + n];
        let main = if f.ty == FieldType::Money { 2 } else { 1 };
        fields.insert(f.key.clone(), values::to_json(f, &cols[..main]));
        if f.ty == FieldType::Stage {
            // The change and entry times; the days columns serve reports only.
            for (c, v) in f.columns()[1..]
                .iter()
                .zip(&cols[1..])
                .take(1 + f.stages.len())
            {
                stage_times.insert(c.name.clone(), values::scalar_json(v, 0));
            }
        }
        i += n;
    }
    Record {
        meta,
        fields,
        stage_times,
    }
}

/// Read one record.
pub async fn get(db: &crate::db::Db, e: &Entity, id: Uuid) -> Result<Record> {
    let (sql, kinds) = by_id(e, id);
    let row = db
        .fetch_optional(&sql, &kinds)
        .await?
        .ok_or(FormError::RecordNotFound)?;
    Ok(decode(e, row))
}

/// Read one record inside a transaction (sees the transaction's own writes).
pub async fn get_in(tx: &mut Tx, e: &Entity, id: Uuid) -> Result<Record> {
    let (sql, kinds) = by_id(e, id);
    let row = tx
        .fetch_optional(&sql, &kinds)
        .await?
        .ok_or(FormError::RecordNotFound)?;
    Ok(decode(e, row))
}

/// The query reading one whole record by id.
fn by_id(e: &Entity, id: Uuid) -> (Sql, Vec<ColKind>) {
    let (cols, kinds) = select_list(e);
    let mut sql = Sql::new(format!(
        "SELECT {cols} FROM {} WHERE \"id\" = ",
        quote(&e.table)
    ));
    sql.bind(Value::Uuid(id));
    (sql, kinds)
}

/// A validated write, ready for SQL.
#[derive(Debug, Clone)]
struct Prepared {
    /// Normalized JSON of every field.
    fields: Map<String, Json>,
    /// Column values of every field (stage times excluded).
    columns: Vec<(String, Value)>,
    owner: Option<Uuid>,
    expected_version: Option<i64>,
    created_at: Option<DateTime<Utc>>,
    stage_history: Vec<(String, DateTime<Utc>)>,
    /// The app's default owner, known to exist.
    default_owner: Option<Uuid>,
}

/// Validate `input` (a create if `old` is None, else a partial update of `old`) as far as that
/// is possible without the database. Returns the prepared write and the problems found so far.
fn validate(
    e: &Entity,
    input: &Json,
    old: Option<&Record>,
    ctx: &WriteCtx,
) -> Result<(Prepared, Vec<Problem>)> {
    let Some(obj) = input.as_object() else {
        return Err(FormError::Invalid(vec![Problem::new(
            "",
            "not_an_object",
            "A record must be a JSON object.",
        )]));
    };
    let mut problems = vec![];
    let mut candidate = match old {
        Some(r) => r.fields.clone(),
        None => Map::with_capacity(e.fields.len()),
    };
    // Formula values are computed below, never validated as input; summaries are kept by the
    // related records' writes and never written here.
    let mut summaries = Map::new();
    for f in e.fields.iter().filter(|f| f.ty == FieldType::Formula) {
        candidate.remove(&f.key);
    }
    for f in e.fields.iter().filter(|f| f.ty == FieldType::Summary) {
        summaries.insert(
            f.key.clone(),
            candidate.remove(&f.key).unwrap_or(Json::Null),
        );
    }
    let mut owner = old.and_then(|r| r.meta.owner);
    let mut expected_version = None;
    let mut created_at = None;
    let mut stage_history = vec![];
    for (k, v) in obj {
        // Built only for a problem: most records have none.
        let path = || format!("/{}", pointer_segment(k));
        if e.field(k).is_some_and(|f| f.ty == FieldType::Formula) {
            problems.push(Problem::new(
                path(),
                "read_only",
                format!("`{k}` is computed by its formula and cannot be written."),
            ));
        } else if e.field(k).is_some_and(|f| f.ty == FieldType::Summary) {
            problems.push(Problem::new(
                path(),
                "read_only",
                format!("`{k}` is kept from the related records and cannot be written."),
            ));
        } else if e.field(k).is_some() {
            candidate.insert(k.clone(), v.clone());
        } else if k == "owner" {
            match v {
                Json::Null => owner = None,
                Json::String(s) => match Uuid::parse_str(s) {
                    Ok(u) => owner = Some(u),
                    Err(_) => problems.push(Problem::new(
                        path(),
                        "format",
                        "Owner must be a user id (UUID).",
                    )),
                },
                _ => problems.push(Problem::new(
                    path(),
                    "format",
                    "Owner must be a user id (UUID).",
                )),
            }
        } else if k == "version" {
            match v.as_i64() {
                Some(n) => expected_version = Some(n),
                None => problems.push(Problem::new(
                    path(),
                    "wrong_type",
                    "Version must be a whole number.",
                )),
            }
        } else if ctx.import && old.is_none() && k == "created_at" {
            match values::datetime(v) {
                Some(t) => created_at = Some(t),
                None => problems.push(Problem::new(
                    path(),
                    "format",
                    "created_at must be a date and time such as 2026-03-31T09:30:00Z.",
                )),
            }
        } else if ctx.import && old.is_none() && k == "stage_history" {
            stage_history = parse_stage_history(e, v, &mut problems);
        } else if SYSTEM_COLUMNS.contains(&k.as_str()) || k == "stage_history" || k.contains("__") {
            let why = if k == "created_at" || k == "stage_history" {
                " (only an admin batch import may set it)"
            } else {
                ""
            };
            problems.push(Problem::new(
                path(),
                "read_only",
                format!("`{k}` is set by the system and cannot be written{why}."),
            ));
        } else {
            problems.push(Problem::new(
                path(),
                "unknown_field",
                format!("`{k}` is not a field of {}.", e.label),
            ));
        }
    }
    if old.is_none() {
        for f in &e.fields {
            if !candidate.contains_key(&f.key) {
                if let Some(d) = &f.def.default {
                    candidate.insert(f.key.clone(), d.clone());
                }
            }
        }
        // An imported stage history ends in the record's stage.
        if let (Some(sf), Some((last, _))) = (e.stage(), stage_history.last()) {
            match candidate.get(&sf.key) {
                Some(Json::String(s)) if obj.contains_key(&sf.key) && s != last => {
                    problems.push(Problem::new(
                        format!("/{}", sf.key),
                        "stage_history",
                        format!("{} is `{s}` but stage_history ends in `{last}`.", sf.label),
                    ))
                }
                _ => {
                    candidate.insert(sf.key.clone(), Json::String(last.clone()));
                }
            }
        }
    }
    let candidate = Json::Object(candidate);
    let schema_problems = schema::validate(e, &candidate);
    let bad_fields: Vec<String> = schema_problems
        .iter()
        .filter_map(|p| {
            p.path
                .trim_start_matches('/')
                .split('/')
                .next()
                .map(str::to_owned)
        })
        .collect();
    problems.extend(schema_problems);
    let cand = candidate.as_object().expect("object");
    let mut fields = Map::with_capacity(e.fields.len());
    let mut columns = Vec::with_capacity(e.fields.len() + 2);
    for f in e
        .fields
        .iter()
        .filter(|f| !matches!(f.ty, FieldType::Formula | FieldType::Summary))
    {
        let v = cand.get(&f.key).cloned().unwrap_or(Json::Null);
        let path = format!("/{}", f.key);
        if bad_fields.contains(&f.key) {
            continue;
        }
        match values::to_sql(f, &v, &path) {
            Ok(vals) => {
                if f.ty == FieldType::Json && !v.is_null() {
                    problems.extend(schema::validate_json_field(f, &v, &path));
                }
                fields.insert(f.key.clone(), values::to_json(f, &vals));
                for (c, val) in f.columns().into_iter().zip(vals) {
                    columns.push((c.name, val));
                }
            }
            Err(p) => problems.push(p),
        }
    }
    fields.extend(summaries);
    // Formulas, over the values just checked. A formula may use another formula wherever it is
    // defined: passes repeat (as many as there are formulas, so any chain settles) and only the
    // last pass's values are kept. Old formula values are never inputs.
    let formulas: Vec<&crate::model::Field> = e
        .fields
        .iter()
        .filter(|f| f.ty == FieldType::Formula)
        .collect();
    if problems.is_empty() && !formulas.is_empty() {
        let today = ctx.now.with_timezone(&e.timezone).date_naive().to_string();
        let mut results: Vec<std::result::Result<Vec<Value>, Problem>> = vec![];
        for _pass in 0..formulas.len() {
            results.clear();
            for f in &formulas {
                let path = format!("/{}", f.key);
                let formula = f.formula.as_ref().expect("compiled formula");
                let computed = formula
                    .eval(f, &e.fields, &fields, &today)
                    .map_err(|m| {
                        Problem::new(
                            path.clone(),
                            "formula",
                            format!("{} could not be computed: {m}.", f.label),
                        )
                    })
                    .and_then(|v| values::to_sql(f, &v, &path));
                if let Ok(vals) = &computed {
                    fields.insert(f.key.clone(), values::to_json(f, vals));
                }
                results.push(computed);
            }
        }
        for (f, r) in formulas.iter().zip(results) {
            match r {
                Ok(vals) => columns.extend(f.columns().into_iter().map(|c| c.name).zip(vals)),
                Err(p) => {
                    fields.remove(&f.key);
                    problems.push(p);
                }
            }
        }
    }
    // Stage entry criteria: checked when a record enters a stage (on create, or when it changes).
    if let Some(sf) = e.stage() {
        let new_stage = fields.get(&sf.key).and_then(Json::as_str);
        let old_stage = old
            .and_then(|r| r.fields.get(&sf.key))
            .and_then(Json::as_str);
        if let Some(stage) = new_stage
            .filter(|s| Some(*s) != old_stage)
            .and_then(|s| sf.stage(s))
        {
            let missing: Vec<&str> = stage
                .entry_criteria
                .iter()
                .filter(|c| fields.get(c.as_str()).is_none_or(is_empty))
                .filter(|c| !bad_fields.contains(c))
                .filter_map(|c| e.field(c).map(|f| f.label.as_str()))
                .collect();
            if !missing.is_empty() {
                problems.push(Problem::new(
                    format!("/{}", sf.key),
                    "stage_criteria",
                    format!(
                        "To enter the stage {}, fill in: {}.",
                        stage.label,
                        missing.join(", ")
                    ),
                ));
            }
        }
    }
    if old.is_none() && owner.is_none() {
        owner = ctx.default_owner;
    }
    // "X is required" says it all; drop other complaints about the same missing value.
    let required: Vec<String> = problems
        .iter()
        .filter(|p| p.code == "required")
        .map(|p| p.path.clone())
        .collect();
    problems.retain(|p| p.code == "required" || !required.contains(&p.path));
    let p = Prepared {
        fields,
        columns,
        owner,
        expected_version,
        created_at,
        stage_history,
        default_owner: ctx.default_owner,
    };
    Ok((p, problems))
}

/// What the database checks of a write look at: a [`Prepared`] write, or a create already laid
/// out as its row ([`Laid`]).
struct Checks<'a> {
    fields: &'a Map<String, Json>,
    columns: &'a [(String, Value)],
    owner: Option<Uuid>,
    /// The app's default owner, known to exist.
    default_owner: Option<Uuid>,
}

impl Prepared {
    fn checks(&self) -> Checks<'_> {
        Checks {
            fields: &self.fields,
            columns: &self.columns,
            owner: self.owner,
            default_owner: self.default_owner,
        }
    }
}

/// Whether [`verify`] looks a value of `f` up in the database: a reference, a user, a unique
/// value.
fn looked_up(f: &crate::model::Field) -> bool {
    matches!(f.ty, FieldType::Relation | FieldType::User) || f.def.unique
}

impl Checks<'_> {
    /// Whether a new record has anything for [`verify`] to look up: a value of a [`looked_up`]
    /// field, or an owner other than the app's default owner.
    fn need_database(&self, e: &Entity) -> bool {
        let owner = self.owner.is_some() && self.owner != self.default_owner;
        owner
            || e.fields
                .iter()
                .any(|f| looked_up(f) && self.fields.get(&f.key).is_some_and(|v| !v.is_null()))
    }
}

/// The checks that need the database: references exist, unique values are free, the owner is a
/// user. Fails with every problem, including those `validate` found.
async fn verify(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    p: Checks<'_>,
    old: Option<&Record>,
    mut problems: Vec<Problem>,
) -> Result<()> {
    let (fields, columns, owner) = (p.fields, p.columns, p.owner);
    // References must exist; unique values must be free.
    let id = old.map(|r| r.meta.id);
    for f in &e.fields {
        let Some(v) = fields.get(&f.key).filter(|v| !v.is_null()) else {
            continue;
        };
        if !looked_up(f) {
            continue;
        }
        let changed = old.is_none_or(|r| r.fields.get(&f.key) != Some(v));
        if !changed {
            continue;
        }
        let path = format!("/{}", f.key);
        let value = columns
            .iter()
            .find(|(c, _)| c == &f.key)
            .map(|(_, v)| v.clone())
            .expect("column");
        match f.ty {
            FieldType::Relation => {
                let target = app.entity(f.def.entity.as_deref().unwrap_or_default())?;
                if !exists(tx, &target.table, "id", value.clone()).await? {
                    problems.push(Problem::new(
                        path.clone(),
                        "not_found",
                        format!(
                            "{} points to a {} that does not exist.",
                            f.label, target.label
                        ),
                    ));
                }
            }
            FieldType::User if !active_user(tx, value.clone()).await? => {
                problems.push(Problem::new(
                    path.clone(),
                    "not_found",
                    format!(
                        "{} points to a user that does not exist or is inactive.",
                        f.label
                    ),
                ));
            }
            _ => {}
        }
        if f.def.unique {
            let mut sql = Sql::new(format!(
                "SELECT 1 FROM {} WHERE {} = ",
                quote(&e.table),
                quote(&f.key)
            ));
            sql.bind(value);
            if let Some(id) = id {
                sql.push(" AND \"id\" <> ").bind(Value::Uuid(id));
            }
            sql.push(" LIMIT 1");
            if tx.fetch_optional(&sql, &[ColKind::Int]).await?.is_some() {
                problems.push(Problem::new(
                    path,
                    "unique",
                    format!("Another {} already has this {}: {v}.", e.label, f.label),
                ));
            }
        }
    }
    // The app's default owner was resolved from the users table when the app was loaded.
    let default_owner = owner.is_some() && owner == p.default_owner;
    if let Some(o) =
        owner.filter(|o| !default_owner && old.is_none_or(|r| r.meta.owner != Some(*o)))
    {
        if !active_user(tx, Value::Uuid(o)).await? {
            problems.push(Problem::new(
                "/owner",
                "not_found",
                "The owner is not an existing, active user.",
            ));
        }
    }
    if !problems.is_empty() {
        problems.sort_by(|a, b| a.path.cmp(&b.path));
        return Err(FormError::Invalid(problems));
    }
    Ok(())
}

async fn prepare(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    input: &Json,
    old: Option<&Record>,
    ctx: &WriteCtx,
) -> Result<Prepared> {
    let (p, problems) = validate(e, input, old, ctx)?;
    verify(tx, app, e, p.checks(), old, problems).await?;
    Ok(p)
}

/// A create checked as far as possible without the database. Build it before taking the write
/// lock, so the lock is held only for the checks and writes that need it.
#[derive(Debug, Clone)]
pub struct Draft {
    p: Prepared,
    problems: Vec<Problem>,
}

/// Validate a new record without the database (see [`insert`]).
pub fn draft(e: &Entity, input: &Json, ctx: &WriteCtx) -> Result<Draft> {
    let (p, problems) = validate(e, input, None, ctx)?;
    Ok(Draft { p, problems })
}

fn is_empty(v: &Json) -> bool {
    match v {
        Json::Null => true,
        Json::String(s) => s.trim().is_empty(),
        Json::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn parse_stage_history(
    e: &Entity,
    v: &Json,
    problems: &mut Vec<Problem>,
) -> Vec<(String, DateTime<Utc>)> {
    let Some(sf) = e.stage() else {
        problems.push(Problem::new(
            "/stage_history",
            "not_allowed",
            format!("{} has no stage field.", e.label),
        ));
        return vec![];
    };
    let Some(items) = v.as_array() else {
        problems.push(Problem::new(
            "/stage_history",
            "wrong_type",
            "stage_history must be a list of {\"stage\", \"at\"} objects.",
        ));
        return vec![];
    };
    let mut out: Vec<(String, DateTime<Utc>)> = vec![];
    for (i, item) in items.iter().enumerate() {
        let path = format!("/stage_history/{i}");
        let stage = item.get("stage").and_then(Json::as_str);
        let at = item.get("at").and_then(values::datetime);
        match (stage, at) {
            (Some(s), Some(t)) if sf.stage(s).is_some() => {
                if out.last().is_some_and(|(_, prev)| *prev > t) {
                    problems.push(Problem::new(
                        format!("{path}/at"),
                        "out_of_order",
                        "stage_history must be in time order.",
                    ));
                }
                out.push((s.to_owned(), t));
            }
            (Some(s), Some(_)) => problems.push(Problem::new(
                format!("{path}/stage"),
                "unknown_stage",
                format!("`{s}` is not a stage of {}.", sf.label),
            )),
            _ => problems.push(Problem::new(
                path,
                "wrong_type",
                "Each entry needs a \"stage\" key and an \"at\" date and time.",
            )),
        }
    }
    out
}

async fn active_user(tx: &mut Tx, id: Value) -> Result<bool> {
    let mut sql = Sql::new("SELECT 1 FROM \"users\" WHERE \"id\" = ");
    sql.bind(id)
        .push(" AND \"active\" = ")
        .bind(Value::Bool(true));
    Ok(tx.fetch_optional(&sql, &[ColKind::Int]).await?.is_some())
}

async fn exists(tx: &mut Tx, table: &str, col: &str, v: Value) -> Result<bool> {
    let mut sql = Sql::new(format!(
        "SELECT 1 FROM {} WHERE {} = ",
        quote(table),
        quote(col)
    ));
    sql.bind(v).push(" LIMIT 1");
    Ok(tx.fetch_optional(&sql, &[ColKind::Int]).await?.is_some())
}

/// Days as a decimal column value (NULL for none).
pub(crate) fn days_value(days: Option<f64>) -> Value {
    use rust_decimal::prelude::FromPrimitive;
    match days.and_then(rust_decimal::Decimal::from_f64) {
        Some(d) => Value::Decimal(d.round_dp(9)),
        None => Value::Null(ColKind::Decimal),
    }
}

/// Create a record; returns it as stored.
pub async fn create(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    input: &Json,
    ctx: &WriteCtx,
) -> Result<Record> {
    insert(tx, app, e, draft(e, input, ctx)?, ctx).await
}

/// Finish a [`draft`]: the database checks, then the row, its history and its event.
pub async fn insert(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    d: Draft,
    ctx: &WriteCtx,
) -> Result<Record> {
    verify(tx, app, e, d.p.checks(), None, d.problems).await?;
    let row = new_row(e, d.p, ctx);
    write_rows(tx, app, e, std::slice::from_ref(&row), ctx).await?;
    Ok(row.record)
}

/// A record ready to be written: its columns, history rows and event (see [`prepare_row`]).
pub struct NewRow {
    cols: Vec<(String, Value)>,
    history: Vec<HistoryEntry>,
    changed: Vec<String>,
    record: Record,
    /// The JSON columns of its history rows and event, when serialised ahead of the write.
    json: Option<RowJson>,
}

/// A new row's JSON column values, serialised away from the write connection (see
/// [`create_batch_pipelined`]): `(old_value, new_value)` of each history row, the event's
/// `changed` and `record`.
struct RowJson {
    history: Vec<(Value, Value)>,
    changed: Value,
    record: Value,
}

impl NewRow {
    /// Serialise the JSON columns now, for `backend`, so the write only binds them.
    fn serialise(&mut self, backend: crate::db::Backend) {
        self.json = Some(RowJson {
            history: self
                .history
                .iter()
                .map(|h| (json_value(backend, &h.old), json_value(backend, &h.new)))
                .collect(),
            changed: json_value(backend, &self.changed),
            record: json_value(backend, &RecordJson(&self.record)),
        });
    }
}

/// Lay out a validated create as columns, history rows and the stored record (no database).
fn new_row(e: &Entity, mut p: Prepared, ctx: &WriteCtx) -> NewRow {
    let id = Uuid::now_v7();
    let created_at = p.created_at.unwrap_or(ctx.now);
    let meta = Meta {
        id,
        created_at,
        updated_at: ctx.now,
        created_by: ctx.actor,
        owner: p.owner,
        version: 1,
    };
    let mut cols: Vec<(String, Value)> = vec![
        ("id".into(), Value::Uuid(id)),
        ("created_at".into(), Value::DateTime(created_at)),
        ("updated_at".into(), Value::DateTime(ctx.now)),
        ("created_by".into(), Value::opt_uuid(ctx.actor)),
        ("owner".into(), Value::opt_uuid(p.owner)),
        ("version".into(), Value::Int(1)),
    ];
    cols.extend(std::mem::take(&mut p.columns));
    // Stage times: from the imported history, else "entered now".
    let mut stage_rows: Vec<(Json, Json, DateTime<Utc>)> = vec![];
    let mut stage_times = Map::new();
    if let Some(sf) = e.stage() {
        let mut entered: Vec<(String, DateTime<Utc>)> = vec![];
        let mut finished: Vec<(String, f64)> = vec![];
        let mut changed_at = None;
        if let Some(stage) = p.fields.get(&sf.key).and_then(Json::as_str) {
            let mut history = p.stage_history.clone();
            if history.is_empty() {
                history.push((stage.to_owned(), created_at));
            }
            let mut prev = Json::Null;
            for (s, at) in &history {
                if !entered.iter().any(|(k, _)| k == s) {
                    entered.push((s.clone(), *at));
                }
                stage_rows.push((prev.clone(), json!(s), *at));
                prev = json!(s);
            }
            changed_at = history.last().map(|(_, t)| *t);
            finished = crate::model::finished_stays(&history);
        }
        // Every stage column, NULL where not entered, so rows of any stage share one statement.
        cols.push((
            stage_changed_column(&sf.key),
            changed_at
                .map(Value::DateTime)
                .unwrap_or(Value::Null(ColKind::DateTime)),
        ));
        stage_times.insert(
            stage_changed_column(&sf.key),
            changed_at
                .map(|t| values::datetime_json(&t))
                .unwrap_or(Json::Null),
        );
        for s in &sf.stages {
            let t = entered.iter().find(|(k, _)| *k == s.key).map(|(_, t)| *t);
            cols.push((
                stage_entered_column(&sf.key, &s.key),
                t.map(Value::DateTime)
                    .unwrap_or(Value::Null(ColKind::DateTime)),
            ));
            stage_times.insert(
                stage_entered_column(&sf.key, &s.key),
                t.map(|t| values::datetime_json(&t)).unwrap_or(Json::Null),
            );
        }
        for s in &sf.stages {
            let days = finished.iter().find(|(k, _)| *k == s.key).map(|(_, d)| *d);
            cols.push((
                crate::model::stage_days_column(&sf.key, &s.key),
                days_value(days),
            ));
        }
    }
    // History: every tracked field that got a value, in one row (see [`CREATED`]); the stage's
    // whole imported path in rows of its own, which reports read.
    let stage_key = e.stage().map(|f| f.key.as_str());
    let mut changed = vec![];
    let mut initial: Vec<Json> = vec![];
    let mut stage_history: Vec<HistoryEntry> = vec![];
    for f in &e.fields {
        let v = &p.fields[&f.key];
        if v.is_null() {
            continue;
        }
        changed.push(f.key.clone());
        if Some(f.key.as_str()) == stage_key {
            for (old, new, at) in &stage_rows {
                stage_history.push(HistoryEntry {
                    field: f.key.clone(),
                    old: old.clone(),
                    new: new.clone(),
                    at: *at,
                });
            }
            // Where the stage rows go when the row is read back.
            initial.push(json!([f.key, Json::Null, stage_history.len()]));
        } else if e.tracks(&f.key) {
            initial.push(json!([f.key, v]));
        }
    }
    if p.owner.is_some() {
        initial.push(json!(["owner", p.owner]));
    }
    let mut rows: Vec<HistoryEntry> = vec![];
    if initial.iter().any(|i| i.get(2).is_none()) {
        rows.push(HistoryEntry {
            field: CREATED.into(),
            old: Json::Null,
            new: Json::Array(initial),
            at: created_at,
        });
    }
    rows.extend(stage_history);
    let record = Record {
        meta,
        fields: p.fields,
        stage_times,
    };
    NewRow {
        cols,
        history: rows,
        changed,
        record,
        json: None,
    }
}

/// Write new rows with multi-row statements: the entity rows (grouped by column set), their
/// history rows and their events.
/// Run the database checks of a draft and lay it out as a row, without writing it: for callers
/// that group several creates into one commit (see [`write_new_rows`]).
pub async fn prepare_row(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    d: Draft,
    ctx: &WriteCtx,
) -> Result<NewRow> {
    verify(tx, app, e, d.p.checks(), None, d.problems).await?;
    Ok(new_row(e, d.p, ctx))
}

impl NewRow {
    /// The record as it will be stored.
    pub fn record(&self) -> &Record {
        &self.record
    }
}

/// Write rows made by [`prepare_row`] with multi-row statements. Unique values shared by two
/// of the rows fail the statement (the caller retries them one by one).
pub async fn write_new_rows(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    rows: Vec<NewRow>,
    ctx: &WriteCtx,
) -> Result<()> {
    write_rows(tx, app, e, &rows, ctx).await
}

async fn write_rows(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    rows: &[NewRow],
    ctx: &WriteCtx,
) -> Result<()> {
    // Rollups: records the new rows point at lose their old contribution first.
    let maintained = crate::rollup::affects(app, e)?;
    if maintained {
        let touched: Vec<crate::rollup::Touched> = rows
            .iter()
            .map(|r| (r.record.meta.id, &r.record.fields))
            .collect();
        crate::rollup::apply(tx, app, e, -1, &touched, false).await?;
    }
    // Entity rows: consecutive rows with the same columns go in one insert.
    let mut i = 0;
    while i < rows.len() {
        let names: Vec<&str> = rows[i].cols.iter().map(|(c, _)| c.as_str()).collect();
        let mut j = i;
        while j < rows.len()
            && rows[j]
                .cols
                .iter()
                .map(|(c, _)| c.as_str())
                .eq(names.iter().copied())
        {
            j += 1;
        }
        let result = tx
            .insert_with(&e.table, &names, &rows[i..j], |r: &NewRow, cell| {
                r.cols.iter().for_each(|(_, v)| cell(v))
            })
            .await;
        unique_conflict(e, result)?;
        i = j;
    }
    let history: Vec<HistoryRef> = rows
        .iter()
        .flat_map(|r| {
            r.history.iter().enumerate().map(move |(k, h)| {
                let json = r.json.as_ref().map(|j| &j.history[k]);
                (r.record.meta.id, h, json)
            })
        })
        .collect();
    write_history_rows(tx, &app.key, e, &history, ctx.actor).await?;
    let events: Vec<NewEvent> = rows
        .iter()
        .map(|r| NewEvent {
            id: r.record.meta.id,
            changed: &r.changed,
            record: match &r.json {
                Some(j) => EventRecord::Serialised(&j.changed, &j.record),
                None => EventRecord::New(&r.record),
            },
            at: r.record.meta.updated_at,
            historical: ctx.import && r.record.meta.created_at < ctx.now,
        })
        .collect();
    write_events(tx, &app.key, e, "created", &events, ctx).await?;
    // Summaries first: a rollup's contribution is added back from the records as they now are.
    if maintained || crate::summary::fed_by(app, e) {
        let touched: Vec<crate::rollup::Touched> = rows
            .iter()
            .map(|r| (r.record.meta.id, &r.record.fields))
            .collect();
        crate::summary::refresh(tx, app, e, &touched).await?;
        if maintained {
            crate::rollup::apply(tx, app, e, 1, &touched, true).await?;
        }
    }
    Ok(())
}

/// Apply a partial update. `expected_version` (from `If-Match` or the body's `version`) must
/// match the stored version when given.
pub async fn update(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    id: Uuid,
    patch: &Json,
    expected_version: Option<i64>,
    ctx: &WriteCtx,
) -> Result<Record> {
    let old = get_in(tx, e, id).await?;
    // A stale write is refused before its values are looked at.
    let body_version = patch.get("version").and_then(Json::as_i64);
    if let Some(expected) = expected_version.or(body_version) {
        if expected != old.meta.version {
            return Err(FormError::VersionConflict {
                expected,
                current: old.meta.version,
            });
        }
    }
    let p = prepare(tx, app, e, patch, Some(&old), ctx).await?;
    if let Some(expected) = expected_version.or(p.expected_version) {
        if expected != old.meta.version {
            return Err(FormError::VersionConflict {
                expected,
                current: old.meta.version,
            });
        }
    }
    let changed: Vec<&crate::model::Field> = e
        .fields
        .iter()
        .filter(|f| old.fields.get(&f.key) != p.fields.get(&f.key))
        .collect();
    let owner_changed = old.meta.owner != p.owner;
    if changed.is_empty() && !owner_changed {
        return Ok(old);
    }
    let mut sql = Sql::new(format!(
        "UPDATE {} SET \"version\" = \"version\" + 1, \"updated_at\" = ",
        quote(&e.table)
    ));
    sql.bind(Value::DateTime(ctx.now));
    if owner_changed {
        sql.push(", \"owner\" = ").bind(Value::opt_uuid(p.owner));
    }
    for f in &changed {
        for (c, v) in p
            .columns
            .iter()
            .filter(|(c, _)| *c == f.key || *c == crate::model::currency_column(&f.key))
        {
            sql.push(", ").ident(c).push(" = ").bind(v.clone());
        }
        if f.ty == FieldType::Stage {
            // The stay that ends now adds its days to the stage it leaves.
            let left = old.fields.get(&f.key).and_then(Json::as_str);
            let since = old
                .stage_times
                .get(&stage_changed_column(&f.key))
                .and_then(Json::as_str)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
            if let (Some(left), Some(since)) = (left, since) {
                let col = crate::model::stage_days_column(&f.key, left);
                let days =
                    crate::model::finished_stays(&[("", since.with_timezone(&Utc)), ("", ctx.now)]);
                let d = sql.param(days_value(days.first().map(|x| x.1)));
                sql.push(&format!(
                    ", {} = COALESCE({}, 0) + {d}",
                    quote(&col),
                    quote(&col)
                ));
            }
            sql.push(", ")
                .ident(&stage_changed_column(&f.key))
                .push(" = ")
                .bind(Value::DateTime(ctx.now));
            if let Some(s) = p.fields[&f.key].as_str() {
                let col = stage_entered_column(&f.key, s);
                let now = sql.param(Value::DateTime(ctx.now));
                sql.push(&format!(
                    ", {} = COALESCE({}, {now})",
                    quote(&col),
                    quote(&col)
                ));
            }
        }
    }
    sql.push(" WHERE \"id\" = ").bind(Value::Uuid(id));
    sql.push(" AND \"version\" = ")
        .bind(Value::Int(old.meta.version));
    // Rollups: the record (and what it points at, before and after) leaves its buckets and
    // comes back in the new ones.
    let maintained = crate::rollup::affects(app, e)?;
    let touched: Vec<crate::rollup::Touched> = if maintained || crate::summary::fed_by(app, e) {
        vec![(id, &old.fields), (id, &p.fields)]
    } else {
        vec![]
    };
    if maintained {
        crate::rollup::apply(tx, app, e, -1, &touched, true).await?;
    }
    if execute_write(tx, e, &sql).await? == 0 {
        let current = get_in(tx, e, id).await?.meta.version;
        return Err(FormError::VersionConflict {
            expected: old.meta.version,
            current,
        });
    }
    let mut names = vec![];
    let mut rows = vec![];
    for f in &changed {
        names.push(f.key.clone());
        if e.tracks(&f.key) {
            rows.push(HistoryEntry {
                field: f.key.clone(),
                old: old.fields[&f.key].clone(),
                new: p.fields[&f.key].clone(),
                at: ctx.now,
            });
        }
    }
    if owner_changed {
        names.push("owner".into());
        rows.push(HistoryEntry {
            field: "owner".into(),
            old: json!(old.meta.owner),
            new: json!(p.owner),
            at: ctx.now,
        });
    }
    // Summaries of what the relation pointed at, before and after; then the rollups.
    crate::summary::refresh(tx, app, e, &touched).await?;
    if maintained {
        crate::rollup::apply(tx, app, e, 1, &touched, true).await?;
    }
    write_history(tx, &app.key, e, id, &rows, ctx.actor).await?;
    let record = get_in(tx, e, id).await?;
    let mut event = record.to_json();
    event["old"] = Json::Object(
        changed
            .iter()
            .map(|f| (f.key.clone(), old.fields[&f.key].clone()))
            .collect(),
    );
    write_event(tx, &app.key, e, id, "updated", &names, &event, ctx).await?;
    Ok(record)
}

/// Delete a record. Refused while records of other entities point to it.
pub async fn delete(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    id: Uuid,
    expected_version: Option<i64>,
    ctx: &WriteCtx,
) -> Result<()> {
    let old = get_in(tx, e, id).await?;
    if let Some(expected) = expected_version {
        if expected != old.meta.version {
            return Err(FormError::VersionConflict {
                expected,
                current: old.meta.version,
            });
        }
    }
    let mut problems = vec![];
    for other in &app.entities {
        for f in other.fields.iter().filter(|f| {
            f.ty == FieldType::Relation && f.def.entity.as_deref() == Some(e.key.as_str())
        }) {
            if exists(tx, &other.table, &f.key, Value::Uuid(id)).await? {
                problems.push(Problem::new(
                    "",
                    "referenced",
                    format!("This {} is still referenced by {} records (field {}); change or delete those records first.", e.label, other.label, f.label),
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(FormError::Conflict(problems));
    }
    let maintained = crate::rollup::affects(app, e)?;
    let touched: Vec<crate::rollup::Touched> = vec![(id, &old.fields)];
    if maintained {
        crate::rollup::apply(tx, app, e, -1, &touched, true).await?;
    }
    let mut sql = Sql::new(format!("DELETE FROM {} WHERE \"id\" = ", quote(&e.table)));
    sql.bind(Value::Uuid(id));
    tx.execute(&sql).await?;
    crate::summary::refresh(tx, app, e, &touched).await?;
    if maintained {
        crate::rollup::apply(tx, app, e, 1, &touched, false).await?;
    }
    write_event(tx, &app.key, e, id, "deleted", &[], &old.to_json(), ctx).await?;
    Ok(())
}

/// Most records one batch may hold.
pub const MAX_BATCH: usize = 10_000;

/// Create many records, all or nothing. Problems carry `/records/<index>` in their paths.
pub async fn create_batch(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    records: &[Json],
    ctx: &WriteCtx,
) -> Result<Vec<Uuid>> {
    let drafts = draft_batch(e, records, ctx)?;
    insert_batch(tx, app, e, drafts, ctx).await
}

/// [`draft`] of every record, in order. Drafting is pure CPU work (JSON Schema, formulas, option
/// and format checks), so a large set is split across the machine's cores with scoped threads:
/// the database is not involved, and the caller's task is blocked no longer than one thread's
/// share would block it.
pub fn draft_all(e: &Entity, records: &[Json], ctx: &WriteCtx) -> Vec<Result<Draft>> {
    const PER_THREAD: usize = 1_000;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(records.len() / PER_THREAD)
        .max(1);
    if threads == 1 {
        return records.iter().map(|r| draft(e, r, ctx)).collect();
    }
    let share = records.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut parts = records.chunks(share);
        // The calling thread drafts the first share itself.
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|part| scope.spawn(move || part.iter().map(|r| draft(e, r, ctx)).collect()))
            .collect();
        let mut out: Vec<Result<Draft>> = first.iter().map(|r| draft(e, r, ctx)).collect();
        for h in others {
            let part: Vec<Result<Draft>> = h.join().expect("a drafting thread panicked");
            out.extend(part);
        }
        out
    })
}

/// The problems of a batch's `i`-th record, under `/records/<i>`.
fn at_record(i: usize, ps: Vec<Problem>) -> impl Iterator<Item = Problem> {
    let prefix = format!("/records/{i}");
    ps.into_iter().map(move |p| p.prefixed(&prefix))
}

/// A batch of more than [`MAX_BATCH`] records is refused whole.
fn too_many(n: usize) -> Result<()> {
    if n > MAX_BATCH {
        return Err(FormError::Invalid(vec![Problem::new(
            "/records",
            "too_many",
            format!("A batch holds at most {MAX_BATCH} records; this one has {n}."),
        )]));
    }
    Ok(())
}

/// Validate a batch without the database (see [`draft`]).
pub fn draft_batch(e: &Entity, records: &[Json], ctx: &WriteCtx) -> Result<Vec<Draft>> {
    too_many(records.len())?;
    let mut drafts = Vec::with_capacity(records.len());
    let mut problems = vec![];
    for (i, d) in draft_all(e, records, ctx).into_iter().enumerate() {
        match d {
            Ok(d) => drafts.push(d),
            Err(FormError::Invalid(ps)) => problems.extend(at_record(i, ps)),
            Err(other) => return Err(other),
        }
    }
    if !problems.is_empty() {
        return Err(FormError::Invalid(problems));
    }
    Ok(drafts)
}

/// Insert drafted records in one transaction; every problem of every record is reported.
pub async fn insert_batch(
    tx: &mut Tx,
    app: &App,
    e: &Entity,
    drafts: Vec<Draft>,
    ctx: &WriteCtx,
) -> Result<Vec<Uuid>> {
    let mut checks = BatchChecks::new(e);
    let mut rows = Vec::with_capacity(drafts.len());
    for (i, d) in drafts.into_iter().enumerate() {
        if let Some(row) = checks.check(tx, app, i, lay_out(e, d, ctx)).await? {
            rows.push(row);
        }
        if checks.full() {
            break;
        }
    }
    if !checks.problems.is_empty() {
        return Err(FormError::Invalid(checks.problems));
    }
    let ids = rows.iter().map(|r| r.record.meta.id).collect();
    write_rows(tx, app, e, &rows, ctx).await?;
    Ok(ids)
}

/// A drafted create laid out as its row (id, columns, history, event) before the database
/// checks, so that the work can be done away from the write connection. A draft with problems
/// is not laid out (its values may be incomplete); it still goes through the checks, so that
/// every problem is reported.
struct Laid {
    layout: Layout,
    problems: Vec<Problem>,
}

// Nearly every record is a `Row`: boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Layout {
    /// The row and the app's default owner.
    Row(NewRow, Option<Uuid>),
    Invalid(Prepared),
}

impl Laid {
    fn checks(&self) -> Checks<'_> {
        match &self.layout {
            Layout::Row(row, default_owner) => Checks {
                fields: &row.record.fields,
                columns: &row.cols,
                owner: row.record.meta.owner,
                default_owner: *default_owner,
            },
            Layout::Invalid(p) => p.checks(),
        }
    }
}

/// Lay out a draft as its row (no database; see [`Laid`]).
fn lay_out(e: &Entity, d: Draft, ctx: &WriteCtx) -> Laid {
    let layout = if d.problems.is_empty() {
        let default_owner = d.p.default_owner;
        Layout::Row(new_row(e, d.p, ctx), default_owner)
    } else {
        Layout::Invalid(d.p)
    };
    Laid {
        layout,
        problems: d.problems,
    }
}

/// The write side of a batch: unique values repeated inside the batch (the database has not
/// seen them yet), then the database checks of each record; every problem is kept.
struct BatchChecks<'e> {
    e: &'e Entity,
    seen: std::collections::HashMap<&'e str, std::collections::HashSet<String>>,
    problems: Vec<Problem>,
}

impl<'e> BatchChecks<'e> {
    fn new(e: &'e Entity) -> Self {
        BatchChecks {
            e,
            seen: Default::default(),
            problems: vec![],
        }
    }

    /// Check the `i`-th record of the batch: its row if it passed, else `None` with its problems
    /// kept under `/records/<i>`.
    async fn check(
        &mut self,
        tx: &mut Tx,
        app: &App,
        i: usize,
        mut l: Laid,
    ) -> Result<Option<NewRow>> {
        let e = self.e;
        if l.problems.is_empty() && !l.checks().need_database(e) {
            if let Layout::Row(row, _) = l.layout {
                return Ok(Some(row));
            }
        }
        let mut ps = std::mem::take(&mut l.problems);
        let checks = l.checks();
        for f in e.fields.iter().filter(|f| f.def.unique) {
            if let Some(v) = checks.fields.get(&f.key).filter(|v| !v.is_null()) {
                if !self
                    .seen
                    .entry(f.key.as_str())
                    .or_default()
                    .insert(v.to_string())
                {
                    ps.push(Problem::new(
                        format!("/{}", f.key),
                        "unique",
                        format!(
                            "Another {} in this batch already has this {}: {v}.",
                            e.label, f.label
                        ),
                    ));
                }
            }
        }
        match verify(tx, app, e, checks, None, ps).await {
            Ok(()) => match l.layout {
                Layout::Row(row, _) => Ok(Some(row)),
                Layout::Invalid(_) => Err(FormError::Internal(
                    "a draft with problems passed its checks".into(),
                )),
            },
            Err(FormError::Invalid(ps)) => {
                self.problems.extend(at_record(i, ps));
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }

    /// Enough problems to report: stop checking.
    fn full(&self) -> bool {
        self.problems.len() > 1000
    }
}

/// Records a drafting thread hands to the writer at a time in [`create_batch_pipelined`]. Of
/// 100, 250, 500 and 1,000, 250 wrote the most records per second in `trellis bench writes`
/// (see docs/benchmarks.md): small enough for a chunk to be still in cache when the writer
/// takes it, large enough to keep the hand-offs few.
pub const PIPELINE_CHUNK: usize = 250;

/// [`create_batch`] with drafting and writing overlapped: a thread of its own drafts and lays out
/// the records a chunk of [`PIPELINE_CHUNK`] at a time, while the caller checks and writes the
/// chunks it has already received, so the two halves of the work run on two cores. All or
/// nothing, with the same problems as [`create_batch`]: once a record is invalid nothing more is
/// written, and every problem of every record is returned (only the records that are not JSON
/// objects, if there are any).
///
/// Chunks written before a problem was found are in `tx`: on `Err` the caller must roll the
/// transaction back (drop it), as it would after any failed write. On PostgreSQL, and for
/// batches of fewer than two chunks, this is [`create_batch`].
pub async fn create_batch_pipelined(
    tx: &mut Tx,
    app: std::sync::Arc<App>,
    entity: &str,
    records: Vec<Json>,
    ctx: &WriteCtx,
) -> Result<Vec<Uuid>> {
    let e = app.entity(entity)?;
    too_many(records.len())?;
    // On PostgreSQL the server does the heavy part of the write in its own processes, and
    // chunks cost round trips: the plain path measured faster there (docs/benchmarks.md).
    if records.len() < 2 * PIPELINE_CHUNK || tx.backend() == crate::db::Backend::Postgres {
        return create_batch(tx, &app, e, &records, ctx).await;
    }
    let total = records.len();
    // Two chunks in flight: the drafting thread stays at most that far ahead of the writer.
    let (send, mut recv) = tokio::sync::mpsc::channel::<Vec<Result<Laid>>>(2);
    let (drafting_app, key, drafting_ctx) = (app.clone(), e.key.clone(), ctx.clone());
    let backend = tx.backend();
    // Written rows go back to the drafting thread to be freed: memory is cheapest to free on
    // the thread that allocated it, and the writer is the busier of the two.
    let (trash, written) = std::sync::mpsc::channel::<Vec<NewRow>>();
    std::thread::Builder::new()
        .name("trellis-draft".into())
        .spawn(move || {
            let Ok(e) = drafting_app.entity(&key) else {
                return;
            };
            // A small first chunk, so the writer starts early.
            let first = PIPELINE_CHUNK / 4;
            let chunks =
                std::iter::once(&records[..first]).chain(records[first..].chunks(PIPELINE_CHUNK));
            for chunk in chunks {
                let laid = chunk
                    .iter()
                    .map(|r| {
                        let mut l = lay_out(e, draft(e, r, &drafting_ctx)?, &drafting_ctx);
                        if let Layout::Row(row, _) = &mut l.layout {
                            row.serialise(backend);
                        }
                        Ok(l)
                    })
                    .collect();
                // The writer stopped (a database error): nothing more to do.
                if send.blocking_send(laid).is_err() {
                    return;
                }
                while let Ok(rows) = written.try_recv() {
                    drop(rows);
                }
            }
            drop(send);
            // Until the writer is done.
            for rows in written {
                drop(rows);
            }
        })
        .map_err(|err| FormError::Internal(format!("cannot start a drafting thread: {err}")))?;
    let mut checks = BatchChecks::new(e);
    let mut draft_problems = vec![];
    let mut ids = Vec::with_capacity(total);
    let mut i = 0;
    while let Some(chunk) = recv.recv().await {
        let mut rows = Vec::with_capacity(chunk.len());
        for laid in chunk {
            match laid {
                Ok(l) => {
                    // After a draft problem only draft problems are collected, as create_batch
                    // reports them before any check that needs the database.
                    if draft_problems.is_empty() && !checks.full() {
                        if let Some(row) = checks.check(tx, app.as_ref(), i, l).await? {
                            rows.push(row);
                        }
                    }
                }
                Err(FormError::Invalid(ps)) => draft_problems.extend(at_record(i, ps)),
                Err(other) => return Err(other),
            }
            i += 1;
        }
        if draft_problems.is_empty() && checks.problems.is_empty() {
            ids.extend(rows.iter().map(|r| r.record.meta.id));
            write_rows(tx, &app, e, &rows, ctx).await?;
            // The drafting thread is gone only if it panicked; then the rows are freed here.
            let _ = trash.send(rows);
        }
    }
    if i != total {
        return Err(FormError::Internal(format!(
            "the drafting thread stopped after {i} of {total} records"
        )));
    }
    if !draft_problems.is_empty() {
        return Err(FormError::Invalid(draft_problems));
    }
    if !checks.problems.is_empty() {
        return Err(FormError::Invalid(checks.problems));
    }
    Ok(ids)
}

async fn execute_write(tx: &mut Tx, e: &Entity, sql: &Sql) -> Result<u64> {
    let result = tx.execute(sql).await;
    unique_conflict(e, result)
}

/// A unique violation (a concurrent writer took the value between our check and our write) as
/// the conflict that names the field.
fn unique_conflict(e: &Entity, result: Result<u64>) -> Result<u64> {
    match result {
        Err(FormError::Database(sqlx::Error::Database(db))) if db.is_unique_violation() => {
            // A concurrent writer took the value between our check and our write.
            let field = e.fields.iter().find(|f| {
                f.def.unique
                    && (db.constraint()
                        == Some(crate::plan::index_name(&e.table, &f.key, true).as_str())
                        || db.message().contains(&format!("{}.{}", e.table, f.key)))
            });
            let (path, label) = field
                .map(|f| (format!("/{}", f.key), f.label.clone()))
                .unwrap_or_default();
            Err(FormError::Conflict(vec![Problem::new(
                path,
                "unique",
                format!("Another {} already has this {label}.", e.label),
            )]))
        }
        other => other,
    }
}

/// One history row to write.
#[derive(Debug, Clone)]
struct HistoryEntry {
    field: String,
    old: Json,
    new: Json,
    at: DateTime<Utc>,
}

/// Write history rows in one statement.
async fn write_history(
    tx: &mut Tx,
    app: &str,
    e: &Entity,
    id: Uuid,
    rows: &[HistoryEntry],
    actor: Option<Uuid>,
) -> Result<()> {
    let rows: Vec<HistoryRef> = rows.iter().map(|h| (id, h, None)).collect();
    write_history_rows(tx, app, e, &rows, actor).await
}

/// A history row to write: the record, the entry, and its `(old, new)` values if serialised
/// ahead ([`RowJson`]).
type HistoryRef<'a> = (Uuid, &'a HistoryEntry, Option<&'a (Value, Value)>);

/// History rows of any records, in one insert.
async fn write_history_rows(
    tx: &mut Tx,
    app: &str,
    e: &Entity,
    rows: &[HistoryRef<'_>],
    actor: Option<Uuid>,
) -> Result<()> {
    let backend = tx.backend();
    let fixed = std::sync::Arc::new([
        Value::Text(app.into()),
        Value::Text(e.key.clone()),
        Value::opt_uuid(actor),
    ]);
    tx.insert_with(
        "history",
        &[
            "app",
            "entity",
            "record_id",
            "field",
            "old_value",
            "new_value",
            "at",
            "actor",
        ],
        rows,
        move |(id, r, json): &HistoryRef<'_>, cell| {
            cell(&fixed[0]);
            cell(&fixed[1]);
            cell(&Value::Uuid(*id));
            cell(&Value::Text(r.field.clone()));
            match json {
                Some((old, new)) => {
                    cell(old);
                    cell(new);
                }
                None => {
                    cell(&json_value(backend, &r.old));
                    cell(&json_value(backend, &r.new));
                }
            }
            cell(&Value::DateTime(r.at));
            cell(&fixed[2]);
        },
    )
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn write_event(
    tx: &mut Tx,
    app: &str,
    e: &Entity,
    id: Uuid,
    kind: &str,
    changed: &[String],
    record: &Json,
    ctx: &WriteCtx,
) -> Result<()> {
    let events = [NewEvent {
        id,
        changed,
        record: EventRecord::Json(record),
        at: ctx.now,
        historical: false,
    }];
    write_events(tx, app, e, kind, &events, ctx).await
}

/// A JSON column's value: on SQLite its text, serialised straight from `v` (SQLite stores JSON
/// as text, and binding `Value::Json` would copy `v` first); on PostgreSQL a JSON value.
fn json_value(backend: crate::db::Backend, v: &(impl serde::Serialize + ?Sized)) -> Value {
    match backend {
        crate::db::Backend::Sqlite => {
            Value::Text(serde_json::to_string(v).expect("JSON serialises"))
        }
        crate::db::Backend::Postgres => {
            Value::Json(serde_json::to_value(v).expect("JSON serialises"))
        }
    }
}

/// One outbox event to write.
struct NewEvent<'a> {
    id: Uuid,
    changed: &'a [String],
    record: EventRecord<'a>,
    /// Each event carries its own write's time (a group commit mixes several).
    at: DateTime<Utc>,
    /// A historical import describes the past: its events start no automation.
    historical: bool,
}

/// The record an event carries.
#[derive(Clone, Copy)]
enum EventRecord<'a> {
    /// Already in its JSON form.
    Json(&'a Json),
    /// A new record, laid out when its statement is built.
    New(&'a Record),
    /// `changed` and the record, already serialised ([`RowJson`]).
    Serialised(&'a Value, &'a Value),
}

/// The flat JSON form of a record ([`Record::to_json`]) serialised straight from the record,
/// without building the JSON value first.
struct RecordJson<'a>(&'a Record);

impl serde::Serialize for RecordJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (r, m) = (self.0, &self.0.meta);
        let mut out = s.serialize_map(None)?;
        out.serialize_entry("id", &m.id)?;
        out.serialize_entry("created_at", &values::datetime_json(&m.created_at))?;
        out.serialize_entry("updated_at", &values::datetime_json(&m.updated_at))?;
        out.serialize_entry("created_by", &m.created_by)?;
        out.serialize_entry("owner", &m.owner)?;
        out.serialize_entry("version", &m.version)?;
        for (k, v) in r.fields.iter().chain(r.stage_times.iter()) {
            out.serialize_entry(k, v)?;
        }
        out.end()
    }
}

/// Outbox events of one kind, in one insert.
async fn write_events(
    tx: &mut Tx,
    app: &str,
    e: &Entity,
    kind: &str,
    events: &[NewEvent<'_>],
    ctx: &WriteCtx,
) -> Result<()> {
    let backend = tx.backend();
    let fixed = std::sync::Arc::new([
        Value::Text(app.into()),
        Value::Text(e.key.clone()),
        Value::Text(kind.into()),
        Value::opt_uuid(ctx.actor),
        Value::Int(ctx.depth as i64),
        Value::DateTime(ctx.now),
        Value::Null(ColKind::DateTime),
    ]);
    tx.insert_with(
        "events",
        &[
            "app",
            "entity",
            "record_id",
            "kind",
            "changed",
            "record",
            "actor",
            "at",
            "depth",
            "processed_at",
        ],
        events,
        move |ev: &NewEvent<'_>, cell| {
            cell(&fixed[0]);
            cell(&fixed[1]);
            cell(&Value::Uuid(ev.id));
            cell(&fixed[2]);
            match ev.record {
                EventRecord::Serialised(changed, record) => {
                    cell(changed);
                    cell(record);
                }
                EventRecord::Json(j) => {
                    cell(&json_value(backend, ev.changed));
                    cell(&json_value(backend, j));
                }
                EventRecord::New(r) => {
                    cell(&json_value(backend, ev.changed));
                    cell(&json_value(backend, &RecordJson(r)));
                }
            }
            cell(&fixed[3]);
            cell(&Value::DateTime(ev.at));
            cell(&fixed[4]);
            cell(&fixed[if ev.historical { 5 } else { 6 }]);
        },
    )
    .await?;
    Ok(())
}

/// The `field` of the one history row a create writes for the initial values of its tracked
/// fields (and owner): `new_value` holds `[[field, value], …]` in definition order, where the
/// stage field appears as `[stage, null, n]`: the n stage rows that follow the row. Reading the
/// history expands it into one row per field, as if each had been written alone: a record with
/// eight initial values costs one history row instead of eight (see docs/benchmarks.md).
pub const CREATED: &str = "*created";

/// One history row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryRow {
    /// Field key (or `owner`).
    pub field: String,
    /// Value before.
    pub old: Json,
    /// Value after.
    pub new: Json,
    /// When.
    pub at: Json,
    /// Who.
    pub actor: Option<Uuid>,
}

/// The history of one record, oldest first.
pub async fn history(
    db: &crate::db::Db,
    app: &App,
    e: &Entity,
    id: Uuid,
) -> Result<Vec<HistoryRow>> {
    let mut sql = Sql::new("SELECT \"field\", \"old_value\", \"new_value\", \"at\", \"actor\" FROM \"history\" WHERE \"app\" = ");
    sql.bind(Value::Text(app.key.clone()));
    sql.push(" AND \"entity\" = ")
        .bind(Value::Text(e.key.clone()));
    sql.push(" AND \"record_id\" = ").bind(Value::Uuid(id));
    sql.push(" ORDER BY \"id\"");
    let rows = db
        .fetch_all(
            &sql,
            &[
                ColKind::Text,
                ColKind::Json,
                ColKind::Json,
                ColKind::DateTime,
                ColKind::Uuid,
            ],
        )
        .await?;
    if rows.is_empty() {
        get(db, e, id).await?;
    }
    let mut out: Vec<HistoryRow> = Vec::with_capacity(rows.len());
    let mut rows = rows.into_iter().map(|r| HistoryRow {
        field: match &r[0] {
            Value::Text(s) => s.clone(),
            _ => String::new(),
        },
        old: values::scalar_json(&r[1], 0),
        new: values::scalar_json(&r[2], 0),
        at: values::scalar_json(&r[3], 0),
        actor: match r[4] {
            Value::Uuid(u) => Some(u),
            _ => None,
        },
    });
    while let Some(row) = rows.next() {
        if row.field != CREATED {
            out.push(row);
            continue;
        }
        for item in row.new.as_array().into_iter().flatten() {
            let field = item[0].as_str().unwrap_or_default().to_owned();
            match item.get(2).and_then(Json::as_u64) {
                // The create's stage rows, which follow this one.
                Some(n) => out.extend(rows.by_ref().take(n as usize)),
                None => out.push(HistoryRow {
                    field,
                    old: Json::Null,
                    new: item[1].clone(),
                    at: row.at.clone(),
                    actor: row.actor,
                }),
            }
        }
    }
    Ok(out)
}

/// Delete history rows past each entity's retention (stage history is always kept).
/// Returns the number of rows removed.
pub async fn purge_history(db: &crate::db::Db, app: &App, now: DateTime<Utc>) -> Result<u64> {
    let mut removed = 0;
    let mut tx = db.begin().await?;
    for e in &app.entities {
        let Some(days) = e.retention_days else {
            continue;
        };
        let mut sql = Sql::new("DELETE FROM \"history\" WHERE \"app\" = ");
        sql.bind(Value::Text(app.key.clone()));
        sql.push(" AND \"entity\" = ")
            .bind(Value::Text(e.key.clone()));
        sql.push(" AND \"at\" < ").bind(Value::DateTime(
            now - chrono::Duration::days(i64::from(days)),
        ));
        if let Some(sf) = e.stage() {
            sql.push(" AND \"field\" <> ")
                .bind(Value::Text(sf.key.clone()));
        }
        removed += tx.execute(&sql).await?;
    }
    tx.commit().await?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_record_serialises_as_its_json_form() {
        let now = DateTime::from_timestamp(1_700_000_000, 123_456_000).expect("time");
        let mut fields = Map::new();
        fields.insert("name".into(), json!("王 \"quoted\"\n"));
        fields.insert("amount".into(), json!("1200.50"));
        fields.insert("tags".into(), json!(["a", "b"]));
        fields.insert("closed".into(), Json::Null);
        let mut stage_times = Map::new();
        stage_times.insert("stage__changed_at".into(), json!("2023-11-14T22:13:20Z"));
        let r = Record {
            meta: Meta {
                id: Uuid::now_v7(),
                created_at: now,
                updated_at: now,
                created_by: None,
                owner: Some(Uuid::now_v7()),
                version: 1,
            },
            fields,
            stage_times,
        };
        let text = serde_json::to_string(&RecordJson(&r)).expect("serialises");
        assert_eq!(text, r.to_json().to_string());
    }
}
