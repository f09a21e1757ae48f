//! `/api/v1/apps/{app}/workflows`, `/runs`, `/notifications`, `/outbox`, `/documents` and
//! `/approvals`: what the workflow engine did and the decisions it waits for.
//!
//! Everything goes through the same policy as records: a run, a document or an approval of a
//! record the caller cannot see is a 404; notifications are the caller's own; the email outbox and
//! app-wide run lists need a role that sees every record.

use super::{parse_id, Body, ProblemDoc, Q};
use crate::auth::Actor;
use crate::error::{ApiError, ApiResult};
use crate::policy::Access;
use crate::state::{AppState, Loaded};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_form::db::{Sql, Value as DbValue};
use trellis_form::model::ColKind;
use trellis_form::store;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_workflows))
        .routes(routes!(start_run))
        .routes(routes!(dry_run))
        .routes(routes!(list_runs))
        .routes(routes!(get_run))
        .routes(routes!(list_notifications))
        .routes(routes!(read_notification))
        .routes(routes!(list_outbox))
        .routes(routes!(record_documents))
        .routes(routes!(get_document))
        .routes(routes!(list_approvals))
        .routes(routes!(decide))
}

/// Routes that authenticate by signature instead of a token.
pub fn public_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(receive_hook))
}

/// An inbound webhook: starts the workflows whose `webhook` trigger has this name. No bearer
/// token: the call is authenticated by its Standard Webhooks signature (`webhook-id`,
/// `webhook-timestamp` within 5 minutes, `webhook-signature: v1,<base64 HMAC-SHA256>`) with the
/// workflow's secret. A repeated `webhook-id` starts nothing.
#[utoipa::path(post, path = "/api/v1/apps/{app}/hooks/{name}", tag = "workflows", security(()),
    params(("app" = String, Path, description = "App key"), ("name" = String, Path, description = "Hook name")),
    request_body(content = Object, description = "Any JSON; `record_id` attaches the run to that record"),
    responses((status = 202, description = "`{runs: [id…]}` (empty for a repeated delivery)", body = Object),
              (status = 401, description = "Missing, stale or wrong signature", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 404, description = "No such hook (or its secret is not set)", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 422, description = "The body is not JSON or names no such record", body = ProblemDoc, content_type = "application/problem+json")))]
async fn receive_hook(
    State(state): State<AppState>,
    Path((app, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let hook = trellis_flow::runner::HookHeaders {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
    };
    use trellis_flow::runner::HookError;
    match state.flows.receive_hook(&app, &name, &hook, &body).await {
        Ok(runs) => Ok((StatusCode::ACCEPTED, Json(json!({ "runs": runs }))).into_response()),
        Err(HookError::NotFound) => Err(ApiError::not_found(format!(
            "app `{app}` has no hook `{name}`"
        ))),
        Err(HookError::Unsigned(m)) => Err(ApiError::new("invalid_signature", m)),
        Err(HookError::Body(m)) => {
            Err(
                trellis_form::FormError::Invalid(vec![trellis_form::Problem::new(
                    "", "invalid", m,
                )])
                .into(),
            )
        }
        Err(HookError::Form(e)) => Err(e.into()),
    }
}

/// A record of `entity` the caller may see, or 404 (the records API's own check).
async fn visible_record(
    state: &AppState,
    access: &Access,
    loaded: &Loaded,
    entity: &str,
    id: Uuid,
) -> ApiResult<store::Record> {
    let e = loaded.app.entity(entity)?;
    access.require(entity, crate::policy::Op::Read)?;
    super::records::visible(state, access, e, id).await
}

/// The values a run carries (its trigger and each step's input and output) may hold any field
/// of its record: a role with hidden fields on that entity sees the run's course, not its data.
fn redact_run(access: &Access, mut run: Value) -> Value {
    // Steps may carry values of other entities too (related records, created records).
    if access.role.reads_everything() {
        return run;
    }
    run["trigger"] = Value::Null;
    if run["error"].is_string() {
        run["error"] = json!("(hidden from your role)");
    }
    if let Some(steps) = run["steps"].as_array_mut() {
        for st in steps {
            st["input"] = Value::Null;
            st["output"] = Value::Null;
            if st["error"].is_string() {
                st["error"] = json!("(hidden from your role)");
            }
        }
    }
    run["redacted"] = json!(true);
    run
}

fn everything(access: &Access, what: &str) -> ApiResult<()> {
    if access.owners.is_some() || !access.role.reads_everything() {
        return Err(ApiError::new(
            "forbidden",
            format!("{what} covers every record of the app; your role sees only some of them."),
        ));
    }
    Ok(())
}

/// The app's workflows.
#[utoipa::path(get, path = "/api/v1/apps/{app}/workflows", tag = "workflows",
    params(("app" = String, Path, description = "App key")),
    responses((status = 200, description = "`{workflows: [{key, version, name, mode, enabled, trigger, nodes, edges}]}`", body = Object),
              (status = 404, description = "No such app", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_workflows(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    super::records::scoped(&state, &actor, &app).await?;
    let flows = state.flows.flows(&app).unwrap_or_default();
    let list: Vec<Value> = flows
        .enabled()
        .iter()
        .map(|w| serde_json::to_value(&w.def).unwrap_or(Value::Null))
        .collect();
    Ok(Json(json!({ "workflows": list })))
}

/// Start a run on a record.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// The record the run is about (of the workflow's trigger entity).
    record_id: Uuid,
}

/// Run a workflow on a record now (the `manual` trigger; works for any workflow).
#[utoipa::path(post, path = "/api/v1/apps/{app}/workflows/{key}/run", tag = "workflows",
    params(("app" = String, Path, description = "App key"), ("key" = String, Path, description = "Workflow key")),
    request_body = StartBody,
    responses((status = 202, description = "`{run_id}`: queued", body = Object),
              (status = 404, description = "No such app, workflow or record", body = ProblemDoc, content_type = "application/problem+json")))]
async fn start_run(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, key)): Path<(String, String)>,
    Body(b): Body<StartBody>,
) -> ApiResult<Response> {
    let (access, loaded) = super::records::scoped(&state, &actor, &app).await?;
    access.require_write()?;
    let flows = state.flows.flows(&app).unwrap_or_default();
    let Some(wf) = flows.workflows.get(&key) else {
        return Err(ApiError::not_found(format!(
            "app `{app}` has no workflow `{key}`"
        )));
    };
    let entity = wf.def.trigger.entity();
    visible_record(&state, &access, &loaded, entity, b.record_id).await?;
    // Starting a workflow acts on its record: the role must be able to change it, and see all
    // of it (the run may copy, send or render any field).
    access.require(entity, crate::policy::Op::Update)?;
    if !access.perm(entity).hidden.is_empty() {
        return Err(ApiError::new(
            "forbidden",
            format!(
                "A workflow may use every field of `{entity}` records; your role `{}` has hidden fields there.",
                access.role.key
            ),
        ));
    }
    let id = state
        .flows
        .start(&app, &key, b.record_id, Some(actor.user_id))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "run_id": id }))).into_response())
}

/// A dry run.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DryRunBody {
    /// An existing record to run against.
    #[serde(default)]
    record_id: Option<Uuid>,
    /// Or a sample record (validated like a create, never stored).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    record: Option<Value>,
    /// A workflow definition to try instead of the installed version (a new version, before
    /// importing it).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    definition: Option<Value>,
    /// Replay a past run's trigger (the record as it was, what changed) against this version;
    /// the answer says whether the trigger would still match.
    #[serde(default)]
    replay_run_id: Option<Uuid>,
}

/// Dry run: the path a workflow would take on a record and what each node would do (record
/// changes as a diff), with no side effects: database steps run in a transaction that is rolled
/// back, emails and requests are rendered but not sent.
#[utoipa::path(post, path = "/api/v1/apps/{app}/workflows/{key}/dry-run", tag = "workflows",
    params(("app" = String, Path, description = "App key"), ("key" = String, Path, description = "Workflow key")),
    request_body = DryRunBody,
    responses((status = 200, description = "`{workflow, version, path: [{node, type, output, would, error}], record_changes}`", body = Object),
              (status = 422, description = "The definition or sample record is invalid", body = ProblemDoc, content_type = "application/problem+json")))]
async fn dry_run(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, key)): Path<(String, String)>,
    Body(b): Body<DryRunBody>,
) -> ApiResult<Json<Value>> {
    let (access, loaded) = super::records::scoped(&state, &actor, &app).await?;
    access.require_write()?;
    if b.definition.is_some() && !actor.is_admin {
        return Err(ApiError::new(
            "forbidden",
            "Trying an unimported definition needs an admin token.",
        ));
    }
    if b.replay_run_id.is_some() {
        everything(&access, "Replaying a run")?;
    }
    if b.definition.is_none() {
        let flows = state.flows.flows(&app).unwrap_or_default();
        let Some(wf) = flows.workflows.get(&key) else {
            return Err(ApiError::not_found(format!(
                "app `{app}` has no workflow `{key}`"
            )));
        };
        let entity = wf.def.trigger.entity();
        // A dry run shows the record and every value the workflow would compute from it.
        access.require(entity, crate::policy::Op::Read)?;
        if !access.perm(entity).hidden.is_empty() {
            return Err(ApiError::new(
                "forbidden",
                format!(
                    "A dry run shows every field of `{entity}` records; your role `{}` has hidden fields there.",
                    access.role.key
                ),
            ));
        }
        if let Some(id) = b.record_id {
            visible_record(&state, &access, &loaded, entity, id).await?;
        }
    }
    let out = state
        .flows
        .dry_run(
            &app,
            b.definition.as_ref(),
            &key,
            b.record_id,
            b.record.as_ref(),
            b.replay_run_id,
        )
        .await?;
    Ok(Json(out))
}

/// Filters of the run list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RunFilter {
    /// Only runs of this workflow.
    workflow: Option<String>,
    /// Only runs about this record (needs `entity`).
    record_id: Option<Uuid>,
    /// Entity of `record_id`.
    entity: Option<String>,
    /// At most this many (default 50, at most 500).
    limit: Option<i64>,
}

/// Runs, newest first: per workflow and/or per record.
#[utoipa::path(get, path = "/api/v1/apps/{app}/runs", tag = "workflows",
    params(("app" = String, Path, description = "App key"), RunFilter),
    responses((status = 200, description = "`{runs: [{id, workflow, version, mode, status, node, error, created_at, finished_at, …}]}`", body = Object),
              (status = 403, description = "App-wide lists need a role that sees every record; give record_id", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_runs(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
    Q(f): Q<RunFilter>,
) -> ApiResult<Json<Value>> {
    let (access, loaded) = super::records::scoped(&state, &actor, &app).await?;
    match (f.record_id, &f.entity) {
        (Some(id), Some(e)) => {
            visible_record(&state, &access, &loaded, e, id).await?;
        }
        (Some(_), None) => {
            return Err(ApiError::new(
                "invalid_query",
                "Give `entity` together with `record_id`.",
            ))
        }
        _ => everything(&access, "The run list")?,
    }
    let runs = state
        .flows
        .runs(
            &app,
            f.workflow.as_deref(),
            f.record_id,
            f.limit.unwrap_or(50),
        )
        .await?;
    Ok(Json(json!({ "runs": runs })))
}

/// One run with every step: input, output, duration, error.
#[utoipa::path(get, path = "/api/v1/apps/{app}/runs/{id}", tag = "workflows",
    params(("app" = String, Path, description = "App key"), ("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "The run and its `steps`", body = Object),
              (status = 404, description = "No such run (or not visible)", body = ProblemDoc, content_type = "application/problem+json")))]
async fn get_run(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (access, loaded) = super::records::scoped(&state, &actor, &app).await?;
    let id = parse_id(&id)?;
    let Some(run) = state.flows.run(&app, id).await? else {
        return Err(ApiError::not_found("no such run"));
    };
    if let Some(e) = run["entity"].as_str() {
        access.require(e, crate::policy::Op::Read)?;
    }
    if access.owners.is_some() {
        let rid = run["record_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok());
        let entity = run["entity"].as_str().unwrap_or_default().to_owned();
        match rid {
            Some(r) => {
                visible_record(&state, &access, &loaded, &entity, r)
                    .await
                    .map_err(|_| ApiError::not_found("no such run"))?;
            }
            None => return Err(ApiError::not_found("no such run")),
        }
    }
    Ok(Json(redact_run(&access, run)))
}

fn text(v: &DbValue) -> Value {
    match v {
        DbValue::Text(s) => json!(s),
        DbValue::Uuid(u) => json!(u),
        DbValue::DateTime(t) => json!(t),
        DbValue::Int(i) => json!(i),
        DbValue::Bool(b) => json!(b),
        DbValue::Json(j) => j.clone(),
        _ => Value::Null,
    }
}

/// Notification list filter.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct NotificationFilter {
    /// Only unread ones.
    unread: Option<bool>,
    /// At most this many (default 50, at most 500).
    limit: Option<i64>,
}

/// The caller's in-app notifications, newest first.
#[utoipa::path(get, path = "/api/v1/apps/{app}/notifications", tag = "workflows",
    params(("app" = String, Path, description = "App key"), NotificationFilter),
    responses((status = 200, description = "`{notifications: [{id, title, body, entity, record_id, run_id, created_at, read_at}]}`", body = Object)))]
async fn list_notifications(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
    Q(f): Q<NotificationFilter>,
) -> ApiResult<Json<Value>> {
    super::records::scoped(&state, &actor, &app).await?;
    let mut sql = Sql::new("SELECT \"id\", \"title\", \"body\", \"entity\", \"record_id\", \"run_id\", \"created_at\", \"read_at\" FROM \"notifications\" WHERE \"app\" = ");
    sql.bind(DbValue::Text(app.clone()))
        .push(" AND \"user_id\" = ")
        .bind(DbValue::Uuid(actor.user_id));
    if f.unread == Some(true) {
        sql.push(" AND \"read_at\" IS NULL");
    }
    sql.push(&format!(
        " ORDER BY \"created_at\" DESC, \"id\" DESC LIMIT {}",
        f.limit.unwrap_or(50).clamp(1, 500)
    ));
    let kinds = [
        ColKind::Uuid,
        ColKind::Text,
        ColKind::Text,
        ColKind::Text,
        ColKind::Uuid,
        ColKind::Uuid,
        ColKind::DateTime,
        ColKind::DateTime,
    ];
    let rows: Vec<Value> = state
        .db
        .fetch_all(&sql, &kinds)
        .await?
        .into_iter()
        .map(|r| {
            json!({"id": text(&r[0]), "title": text(&r[1]), "body": text(&r[2]), "entity": text(&r[3]),
                   "record_id": text(&r[4]), "run_id": text(&r[5]), "created_at": text(&r[6]), "read_at": text(&r[7])})
        })
        .collect();
    Ok(Json(json!({ "notifications": rows })))
}

/// Mark one of the caller's notifications read.
#[utoipa::path(post, path = "/api/v1/apps/{app}/notifications/{id}/read", tag = "workflows",
    params(("app" = String, Path, description = "App key"), ("id" = String, Path, description = "Notification id")),
    responses((status = 204, description = "Marked read"),
              (status = 404, description = "Not the caller's notification", body = ProblemDoc, content_type = "application/problem+json")))]
async fn read_notification(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    super::records::scoped(&state, &actor, &app).await?;
    let id = parse_id(&id)?;
    let mut sql = Sql::new("UPDATE \"notifications\" SET \"read_at\" = ");
    sql.bind(DbValue::DateTime(state.clock.now()))
        .push(" WHERE \"id\" = ")
        .bind(DbValue::Uuid(id))
        .push(" AND \"app\" = ")
        .bind(DbValue::Text(app))
        .push(" AND \"user_id\" = ")
        .bind(DbValue::Uuid(actor.user_id));
    let mut tx = state.db.begin().await?;
    let n = tx.execute(&sql).await?;
    tx.commit().await?;
    if n == 0 {
        return Err(ApiError::not_found("no such notification"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Emails the workflows sent (`sent`) or kept because no SMTP relay is configured (`kept`).
#[utoipa::path(get, path = "/api/v1/apps/{app}/outbox", tag = "workflows",
    params(("app" = String, Path, description = "App key")),
    responses((status = 200, description = "`{emails: [{id, message_id, to, subject, body, status, entity, record_id, run_id, created_at, sent_at}]}`", body = Object),
              (status = 403, description = "The caller's role sees only some records", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_outbox(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    let (access, _) = super::records::scoped(&state, &actor, &app).await?;
    everything(&access, "The email outbox")?;
    let mut sql = Sql::new("SELECT \"id\", \"message_id\", \"to_addr\", \"subject\", \"body\", \"status\", \"entity\", \"record_id\", \"run_id\", \"created_at\", \"sent_at\" FROM \"email_outbox\" WHERE \"app\" = ");
    sql.bind(DbValue::Text(app))
        .push(" ORDER BY \"created_at\" DESC, \"id\" DESC LIMIT 200");
    let kinds = [
        ColKind::Uuid,
        ColKind::Text,
        ColKind::Text,
        ColKind::Text,
        ColKind::Text,
        ColKind::Text,
        ColKind::Text,
        ColKind::Uuid,
        ColKind::Uuid,
        ColKind::DateTime,
        ColKind::DateTime,
    ];
    let rows: Vec<Value> = state
        .db
        .fetch_all(&sql, &kinds)
        .await?
        .into_iter()
        .map(|r| {
            json!({"id": text(&r[0]), "message_id": text(&r[1]), "to": text(&r[2]), "subject": text(&r[3]), "body": text(&r[4]),
                   "status": text(&r[5]), "entity": text(&r[6]), "record_id": text(&r[7]), "run_id": text(&r[8]),
                   "created_at": text(&r[9]), "sent_at": text(&r[10])})
        })
        .collect();
    Ok(Json(json!({ "emails": rows })))
}

/// Documents attached to a record.
#[utoipa::path(get, path = "/api/v1/apps/{app}/records/{entity}/{id}/documents", tag = "workflows",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key"), ("id" = String, Path, description = "Record id")),
    responses((status = 200, description = "`{documents: [{id, name, content_type, bytes, run_id, created_at, url}]}`", body = Object),
              (status = 404, description = "No such record (or not visible)", body = ProblemDoc, content_type = "application/problem+json")))]
async fn record_documents(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity, id)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (access, loaded) = super::records::scoped(&state, &actor, &app).await?;
    let id = parse_id(&id)?;
    visible_record(&state, &access, &loaded, &entity, id).await?;
    let mut sql = Sql::new("SELECT \"id\", \"name\", \"content_type\", \"body\", \"run_id\", \"created_at\" FROM \"documents\" WHERE \"app\" = ");
    sql.bind(DbValue::Text(app.clone()))
        .push(" AND \"entity\" = ")
        .bind(DbValue::Text(entity))
        .push(" AND \"record_id\" = ")
        .bind(DbValue::Uuid(id))
        .push(" ORDER BY \"created_at\", \"id\"");
    let kinds = [
        ColKind::Uuid,
        ColKind::Text,
        ColKind::Text,
        ColKind::Text,
        ColKind::Uuid,
        ColKind::DateTime,
    ];
    let rows: Vec<Value> = state
        .db
        .fetch_all(&sql, &kinds)
        .await?
        .into_iter()
        .map(|r| {
            let bytes = match &r[3] {
                DbValue::Text(s) => s.len(),
                _ => 0,
            };
            let doc = text(&r[0]);
            json!({"id": doc, "name": text(&r[1]), "content_type": text(&r[2]), "bytes": bytes,
                   "run_id": text(&r[4]), "created_at": text(&r[5]),
                   "url": format!("/api/v1/apps/{app}/documents/{}", doc.as_str().unwrap_or_default())})
        })
        .collect();
    Ok(Json(json!({ "documents": rows })))
}

/// Download a document.
#[utoipa::path(get, path = "/api/v1/apps/{app}/documents/{id}", tag = "workflows",
    params(("app" = String, Path, description = "App key"), ("id" = String, Path, description = "Document id")),
    responses((status = 200, description = "The document, with its content type and file name"),
              (status = 404, description = "No such document (or its record is not visible)", body = ProblemDoc, content_type = "application/problem+json")))]
async fn get_document(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (access, loaded) = super::records::scoped(&state, &actor, &app).await?;
    let id = parse_id(&id)?;
    let mut sql = Sql::new("SELECT \"entity\", \"record_id\", \"name\", \"content_type\", \"body\" FROM \"documents\" WHERE \"app\" = ");
    sql.bind(DbValue::Text(app.clone()))
        .push(" AND \"id\" = ")
        .bind(DbValue::Uuid(id));
    let kinds = [
        ColKind::Text,
        ColKind::Uuid,
        ColKind::Text,
        ColKind::Text,
        ColKind::Text,
    ];
    let Some(r) = state.db.fetch_optional(&sql, &kinds).await? else {
        return Err(ApiError::not_found("no such document"));
    };
    let (
        DbValue::Text(entity),
        DbValue::Uuid(record),
        DbValue::Text(name),
        DbValue::Text(ct),
        DbValue::Text(body),
    ) = (&r[0], &r[1], &r[2], &r[3], &r[4])
    else {
        return Err(ApiError::not_found("no such document"));
    };
    visible_record(&state, &access, &loaded, entity, *record)
        .await
        .map_err(|_| ApiError::not_found("no such document"))?;
    // A rendered document may show any field of its record.
    if !access.perm(entity).hidden.is_empty() {
        return Err(ApiError::new(
            "forbidden",
            format!(
                "Documents of `{entity}` records may show fields your role `{}` cannot see.",
                access.role.key
            ),
        ));
    }
    let mut resp = body.clone().into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("{ct}; charset=utf-8")) {
        h.insert(header::CONTENT_TYPE, v);
    }
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_. ".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Approval list filter.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ApprovalFilter {
    /// pending (default), approved, rejected, timeout or all.
    status: Option<String>,
}

/// Approval steps: the caller's (as an approver), or every one for a role that sees all records.
#[utoipa::path(get, path = "/api/v1/apps/{app}/approvals", tag = "workflows",
    params(("app" = String, Path, description = "App key"), ApprovalFilter),
    responses((status = 200, description = "`{approvals: [{id, name, step, entity, record_id, run_id, approvers, rule, votes, status, due_at, comment, created_at, decided_at}]}`", body = Object)))]
async fn list_approvals(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
    Q(f): Q<ApprovalFilter>,
) -> ApiResult<Json<Value>> {
    let (access, _) = super::records::scoped(&state, &actor, &app).await?;
    let status = f.status.unwrap_or_else(|| "pending".into());
    if !["pending", "approved", "rejected", "timeout", "all"].contains(&status.as_str()) {
        return Err(ApiError::new(
            "invalid_query",
            format!("`{status}` is not a status (pending, approved, rejected, timeout, all)."),
        ));
    }
    let mut sql = Sql::new("SELECT \"id\", \"name\", \"step\", \"entity\", \"record_id\", \"run_id\", \"approvers\", \"rule\", \"votes\", \"status\", \"due_at\", \"comment\", \"created_at\", \"decided_at\" FROM \"approvals\" WHERE \"app\" = ");
    sql.bind(DbValue::Text(app));
    if status != "all" {
        sql.push(" AND \"status\" = ").bind(DbValue::Text(status));
    }
    sql.push(" ORDER BY \"created_at\" DESC LIMIT 500");
    let kinds = [
        ColKind::Uuid,
        ColKind::Text,
        ColKind::Int,
        ColKind::Text,
        ColKind::Uuid,
        ColKind::Uuid,
        ColKind::Json,
        ColKind::Text,
        ColKind::Json,
        ColKind::Text,
        ColKind::DateTime,
        ColKind::Text,
        ColKind::DateTime,
        ColKind::DateTime,
    ];
    let me = json!(actor.user_id);
    let rows: Vec<Value> = state
        .db
        .fetch_all(&sql, &kinds)
        .await?
        .into_iter()
        .map(|r| {
            json!({"id": text(&r[0]), "name": text(&r[1]), "step": text(&r[2]), "entity": text(&r[3]), "record_id": text(&r[4]),
                   "run_id": text(&r[5]), "approvers": text(&r[6]), "rule": text(&r[7]), "votes": text(&r[8]), "status": text(&r[9]),
                   "due_at": text(&r[10]), "comment": text(&r[11]), "created_at": text(&r[12]), "decided_at": text(&r[13])})
        })
        .filter(|a| {
            let approver = a["approvers"]
                .as_array()
                .is_some_and(|x| x.contains(&me));
            let readable = a["entity"]
                .as_str()
                .is_some_and(|e| access.perm(e).read);
            approver || (access.owners.is_none() && readable)
        })
        .collect();
    Ok(Json(json!({ "approvals": rows })))
}

/// A decision.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// `approve` or `reject`.
    decision: String,
    /// Why (shown to the owner; on a rejection it travels with the workflow).
    #[serde(default)]
    comment: Option<String>,
}

/// Approve or reject an approval step (an approver, or an admin).
#[utoipa::path(post, path = "/api/v1/apps/{app}/approvals/{id}/decision", tag = "workflows",
    params(("app" = String, Path, description = "App key"), ("id" = String, Path, description = "Approval id")),
    request_body = DecisionBody,
    responses((status = 200, description = "`{id, status, votes}`", body = Object),
              (status = 404, description = "No such approval for this caller", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 409, description = "Already decided", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 422, description = "`decision` is not approve or reject", body = ProblemDoc, content_type = "application/problem+json")))]
async fn decide(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, id)): Path<(String, String)>,
    Body(b): Body<DecisionBody>,
) -> ApiResult<Json<Value>> {
    // Approvers decide whatever their role on records (legal may only read opportunities);
    // the runtime checks that the caller is an approver of this step (or an admin). A read-only
    // token changes nothing.
    super::records::scoped(&state, &actor, &app).await?;
    if actor.scope == crate::identity::Scope::Read {
        return Err(ApiError::new(
            "forbidden",
            "A read-only token cannot decide approvals.",
        ));
    }
    let id = parse_id(&id)?;
    let approve = match b.decision.as_str() {
        "approve" => true,
        "reject" => false,
        other => {
            return Err(
                trellis_form::FormError::Invalid(vec![trellis_form::Problem::new(
                    "/decision",
                    "invalid",
                    format!("`{other}` is not a decision: use approve or reject."),
                )])
                .into(),
            )
        }
    };
    match state
        .flows
        .decide(
            &app,
            id,
            actor.user_id,
            actor.is_admin,
            approve,
            b.comment.as_deref(),
        )
        .await
    {
        Ok(v) => Ok(Json(v)),
        Err(trellis_flow::runner::DecideError::NotFound) => {
            Err(ApiError::not_found("no such approval"))
        }
        Err(e @ trellis_flow::runner::DecideError::Decided(_)) => {
            Err(ApiError::new("conflict", e.to_string()))
        }
        Err(trellis_flow::runner::DecideError::Form(e)) => Err(e.into()),
    }
}
