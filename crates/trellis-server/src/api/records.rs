//! `/api/v1/apps/{app}/records/{entity}`: records of an entity.

use super::{parse_id, Body, ProblemDoc, Q};
use crate::auth::Actor;
use crate::error::{ApiError, ApiResult};
use crate::policy::{Access, Op};
use crate::state::{AppState, Loaded};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_form::query::{Filter, ListQuery};
use trellis_form::store::{self, Record, WriteCtx};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_records, create_record))
        .routes(routes!(query_records))
        .routes(routes!(get_record, update_record, delete_record))
        .routes(routes!(record_history))
}

/// Routes that take large bodies (batch import).
pub fn bulk_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(batch_create))
}

fn ctx(state: &AppState, loaded: &Loaded, actor: &Actor) -> WriteCtx {
    WriteCtx {
        actor: Some(actor.user_id),
        now: state.clock.now(),
        default_owner: Some(loaded.default_owner),
        import: actor.is_admin,
        depth: 0,
    }
}

/// Refuse bodies that set fields the caller's role hides or makes read-only (403 naming each
/// field, under `path`/<index> for a batch).
fn mass_assignment(access: &Access, entity: &str, inputs: &[Value], path: &str) -> ApiResult<()> {
    let batch = inputs.len() > 1 || path == "/records";
    let problems: Vec<_> = inputs
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            let p = if batch {
                format!("{path}/{i}")
            } else {
                path.to_owned()
            };
            access.unwritable(entity, r, &p)
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::new(
            "forbidden",
            format!(
                "Your role `{}` may not set some of these fields.",
                access.role.key
            ),
        )
        .with_errors(problems))
    }
}

/// Check the owner a caller sends (or give a scoped caller's new records to themselves).
fn owner_rule(access: &Access, input: &mut Value, path: &str) -> Vec<trellis_form::Problem> {
    let Some(owners) = &access.owners else {
        return vec![];
    };
    let Some(obj) = input.as_object_mut() else {
        return vec![];
    };
    match obj.get("owner") {
        None => {
            obj.insert("owner".into(), json!(access.user));
            vec![]
        }
        Some(Value::String(s)) if uuid::Uuid::parse_str(s).is_ok_and(|u| owners.contains(&u)) => vec![],
        Some(_) => vec![trellis_form::Problem::new(
            format!("{path}/owner"),
            "not_allowed",
            "You cannot give records to that user: your role only reaches your own (or your team's) records.",
        )],
    }
}

/// The caller's access to `app` and the compiled app (404 when the app is not theirs).
pub(crate) async fn scoped(
    state: &AppState,
    actor: &Actor,
    app: &str,
) -> ApiResult<(Access, Loaded)> {
    let access = crate::policy::access(state, actor, app).await?;
    Ok((access, state.app(app)?))
}

/// Read a record the caller may see, or 404.
pub(crate) async fn visible(
    state: &AppState,
    access: &Access,
    e: &trellis_form::model::Entity,
    id: uuid::Uuid,
) -> ApiResult<Record> {
    let r = store::get(&state.db, e, id).await?;
    if access.sees(r.meta.owner) {
        Ok(r)
    } else {
        Err(trellis_form::FormError::RecordNotFound.into())
    }
}

fn record_response(
    status: StatusCode,
    access: &Access,
    app: &str,
    entity: &str,
    r: &Record,
) -> Response {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", r.meta.version)) {
        headers.insert(header::ETAG, v);
    }
    if status == StatusCode::CREATED {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "/api/v1/apps/{app}/records/{entity}/{}",
            r.meta.id
        )) {
            headers.insert(header::LOCATION, v);
        }
    }
    (status, headers, Json(access.redact(entity, r.to_json()))).into_response()
}

/// Query-string form of a list request.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// JSON array of `{"field", "op", "value"}` conditions, e.g.
    /// `[{"field":"status","op":"eq","value":"new"}]`.
    filter: Option<String>,
    /// Sort field; prefix with `-` for descending. Default: creation order.
    sort: Option<String>,
    /// Page size, 1–1000 (default 50).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Also return the total number of matching records.
    count: Option<bool>,
}

/// JSON form of a list request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListBody {
    /// Conditions, all of which must hold.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    filters: Vec<Filter>,
    /// Sort field; prefix with `-` for descending.
    sort: Option<String>,
    /// Page size, 1–1000 (default 50).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Also return the total.
    #[serde(default)]
    count: bool,
}

async fn run_list(
    state: &AppState,
    actor: &Actor,
    app: &str,
    entity: &str,
    mut q: ListQuery,
) -> ApiResult<Json<Value>> {
    let (access, loaded) = scoped(state, actor, app).await?;
    let e = loaded.app.entity(entity)?;
    access.require(entity, Op::Read)?;
    // Hidden fields cannot be filtered or sorted on (the answer would reveal them).
    for (i, f) in q.filters.iter().enumerate() {
        access.readable_field(entity, &f.field, &format!("/filters/{i}/field"))?;
    }
    if let Some(sort) = &q.sort {
        access.readable_field(entity, sort.trim_start_matches('-'), "/sort")?;
    }
    // A scoped caller lists (and counts) only the records they may see.
    if let Some(owners) = &access.owners {
        q.filters.push(Filter {
            field: "owner".into(),
            op: "in".into(),
            value: json!(owners.iter().collect::<Vec<_>>()),
        });
    }
    let page = trellis_form::query::list(&state.db, e, &q).await?;
    let mut body = json!({
        "records": page.records.iter().map(|r| access.redact(entity, r.to_json())).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor,
    });
    if let Some(t) = page.total {
        body["total"] = json!(t);
    }
    Ok(Json(body))
}

/// List records with filters, sort and cursor pagination.
#[utoipa::path(get, path = "/api/v1/apps/{app}/records/{entity}", tag = "records",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key"), ListParams),
    responses((status = 200, description = "`{records, next_cursor, total?}`", body = Object),
              (status = 400, description = "Bad filter, sort or cursor", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 404, description = "No such app or entity", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_records(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity)): Path<(String, String)>,
    Q(p): Q<ListParams>,
) -> ApiResult<Json<Value>> {
    let filters = match &p.filter {
        None => vec![],
        Some(f) => serde_json::from_str::<Vec<Filter>>(f).map_err(|e| {
            ApiError::new("invalid_query", "The filter parameter must be a JSON list of {\"field\", \"op\", \"value\"} objects.")
                .with_errors(vec![trellis_form::Problem::new("/filter", "malformed", e.to_string())])
        })?,
    };
    let q = ListQuery {
        filters,
        sort: p.sort,
        limit: p.limit,
        cursor: p.cursor,
        count: p.count.unwrap_or(false),
    };
    run_list(&state, &actor, &app, &entity, q).await
}

/// List records with the query in a JSON body (same semantics as the GET form).
#[utoipa::path(post, path = "/api/v1/apps/{app}/records/{entity}/query", tag = "records",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key")),
    request_body = ListBody,
    responses((status = 200, description = "`{records, next_cursor, total?}`", body = Object),
              (status = 400, description = "Bad filter, sort or cursor", body = ProblemDoc, content_type = "application/problem+json")))]
async fn query_records(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity)): Path<(String, String)>,
    Body(b): Body<ListBody>,
) -> ApiResult<Json<Value>> {
    let q = ListQuery {
        filters: b.filters,
        sort: b.sort,
        limit: b.limit,
        cursor: b.cursor,
        count: b.count,
    };
    run_list(&state, &actor, &app, &entity, q).await
}

/// Create a record.
#[utoipa::path(post, path = "/api/v1/apps/{app}/records/{entity}", tag = "records",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key")),
    request_body(content = Object, description = "A flat record: `{\"field\": value, …}`, optionally `owner`"),
    responses((status = 201, description = "The stored record", body = Object),
              (status = 422, description = "Validation failed: every problem with its JSON pointer", body = ProblemDoc, content_type = "application/problem+json")))]
async fn create_record(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity)): Path<(String, String)>,
    Body(mut input): Body<Value>,
) -> ApiResult<Response> {
    let (access, loaded) = scoped(&state, &actor, &app).await?;
    let e = loaded.app.entity(&entity)?;
    access.require(&entity, Op::Create)?;
    mass_assignment(&access, &entity, std::slice::from_ref(&input), "")?;
    let problems = owner_rule(&access, &mut input, "");
    if !problems.is_empty() {
        return Err(trellis_form::FormError::Invalid(problems).into());
    }
    let mut c = ctx(&state, &loaded, &actor);
    c.import = false;
    // Validate before taking the write lock; only the database checks and writes hold it.
    let draft = store::draft(e, &input, &c)?;
    let r = match &state.writer {
        // SQLite: concurrent creates share commits.
        Some(w) => w.create(loaded.app.clone(), &entity, draft, c).await?,
        None => {
            let mut tx = state.db.begin().await?;
            let r = store::insert(&mut tx, &loaded.app, e, draft, &c).await?;
            let r = crate::writer::inline(&state.flows, &mut tx, &loaded.app, &entity, r).await?;
            tx.commit().await?;
            state.flows.wake.notify_one();
            r
        }
    };
    Ok(record_response(
        StatusCode::CREATED,
        &access,
        &app,
        &entity,
        &r,
    ))
}

/// A batch of records to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// Up to 10,000 records. Admins may add `created_at` and `stage_history` to each.
    #[schema(value_type = Vec<Object>)]
    records: Vec<Value>,
}

/// Create up to 10,000 records, all or nothing.
#[utoipa::path(post, path = "/api/v1/apps/{app}/records/{entity}/batch", tag = "records",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key")),
    request_body = BatchBody,
    responses((status = 201, description = "`{created, ids}`", body = Object),
              (status = 422, description = "Nothing was written; problems carry /records/<index>", body = ProblemDoc, content_type = "application/problem+json")))]
async fn batch_create(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity)): Path<(String, String)>,
    Body(mut b): Body<BatchBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (access, loaded) = scoped(&state, &actor, &app).await?;
    let e = loaded.app.entity(&entity)?;
    access.require(&entity, Op::Create)?;
    mass_assignment(&access, &entity, &b.records, "/records")?;
    let problems: Vec<_> = b
        .records
        .iter_mut()
        .enumerate()
        .flat_map(|(i, r)| owner_rule(&access, r, &format!("/records/{i}")))
        .collect();
    if !problems.is_empty() {
        return Err(trellis_form::FormError::Invalid(problems).into());
    }
    let c = ctx(&state, &loaded, &actor);
    let mut tx = state.db.begin().await?;
    // Drafting overlaps writing; on a problem `tx` is dropped, so nothing is kept.
    let records = std::mem::take(&mut b.records);
    let ids =
        store::create_batch_pipelined(&mut tx, loaded.app.clone(), &entity, records, &c).await?;
    let has_inline = crate::writer::has_inline(&state.flows, &app, &entity);
    for (i, id) in ids.iter().enumerate().filter(|_| has_inline) {
        let r = store::get_in(&mut tx, e, *id).await?;
        // A historical import describes the past: no automation, inline or async. The stored
        // time has whole microseconds; the clock may have nanoseconds.
        if c.import && r.meta.created_at < chrono::SubsecRound::trunc_subsecs(c.now, 6) {
            continue;
        }
        if let Err(err) = state
            .flows
            .inline_created(&mut tx, &loaded.app.key, &entity, &r, c.actor)
            .await
        {
            return Err(crate::writer::workflow_failed(format!("/records/{i}"), &err).into());
        }
    }
    tx.commit().await?;
    state.flows.wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(json!({"created": ids.len(), "ids": ids})),
    ))
}

/// Read one record.
#[utoipa::path(get, path = "/api/v1/apps/{app}/records/{entity}/{id}", tag = "records",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key"), ("id" = String, Path, description = "Record id")),
    responses((status = 200, description = "The record; `ETag` holds its version", body = Object),
              (status = 404, description = "No such record", body = ProblemDoc, content_type = "application/problem+json")))]
async fn get_record(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity, id)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let (access, loaded) = scoped(&state, &actor, &app).await?;
    let e = loaded.app.entity(&entity)?;
    access.require(&entity, Op::Read)?;
    let r = visible(&state, &access, e, parse_id(&id)?).await?;
    Ok(record_response(StatusCode::OK, &access, &app, &entity, &r))
}

fn if_match(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .unwrap_or_default()
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"');
    s.parse::<i64>().map(Some).map_err(|_| {
        ApiError::new(
            "invalid_header",
            "If-Match must hold the record's version, as in If-Match: \"3\".",
        )
    })
}

/// Change some fields of a record. Send `If-Match: "<version>"` (or `version` in the body) to
/// refuse the write if someone changed the record since you read it.
#[utoipa::path(patch, path = "/api/v1/apps/{app}/records/{entity}/{id}", tag = "records",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key"), ("id" = String, Path, description = "Record id"),
           ("If-Match" = Option<String>, Header, description = "Expected version")),
    request_body(content = Object, description = "The fields to change"),
    responses((status = 200, description = "The stored record", body = Object),
              (status = 409, description = "Stale version", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 422, description = "Validation failed", body = ProblemDoc, content_type = "application/problem+json")))]
async fn update_record(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    Body(patch): Body<Value>,
) -> ApiResult<Response> {
    let (access, loaded) = scoped(&state, &actor, &app).await?;
    let e = loaded.app.entity(&entity)?;
    let id = parse_id(&id)?;
    access.require(&entity, Op::Read)?;
    visible(&state, &access, e, id).await?;
    access.require(&entity, Op::Update)?;
    mass_assignment(&access, &entity, std::slice::from_ref(&patch), "")?;
    if patch.get("owner").is_some() {
        let problems = owner_rule(&access, &mut patch.clone(), "");
        if !problems.is_empty() {
            return Err(trellis_form::FormError::Invalid(problems).into());
        }
    }
    let expected = if_match(&headers)?;
    let mut c = ctx(&state, &loaded, &actor);
    c.import = false;
    let mut tx = state.db.begin().await?;
    let r = store::update(&mut tx, &loaded.app, e, id, &patch, expected, &c).await?;
    let r = crate::writer::inline_written(&state.flows, &mut tx, &loaded.app, &entity, id, c.now)
        .await?
        .unwrap_or(r);
    tx.commit().await?;
    state.flows.wake.notify_one();
    Ok(record_response(StatusCode::OK, &access, &app, &entity, &r))
}

/// Delete a record (refused while other records point to it).
#[utoipa::path(delete, path = "/api/v1/apps/{app}/records/{entity}/{id}", tag = "records",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key"), ("id" = String, Path, description = "Record id"),
           ("If-Match" = Option<String>, Header, description = "Expected version")),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "No such record", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 409, description = "Stale version or still referenced", body = ProblemDoc, content_type = "application/problem+json")))]
async fn delete_record(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let (access, loaded) = scoped(&state, &actor, &app).await?;
    let e = loaded.app.entity(&entity)?;
    let id = parse_id(&id)?;
    access.require(&entity, Op::Read)?;
    visible(&state, &access, e, id).await?;
    access.require(&entity, Op::Delete)?;
    let expected = if_match(&headers)?;
    let c = ctx(&state, &loaded, &actor);
    let mut tx = state.db.begin().await?;
    store::delete(&mut tx, &loaded.app, e, id, expected, &c).await?;
    crate::writer::inline_written(&state.flows, &mut tx, &loaded.app, &entity, id, c.now).await?;
    tx.commit().await?;
    state.flows.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// The field history of a record, oldest first.
#[utoipa::path(get, path = "/api/v1/apps/{app}/records/{entity}/{id}/history", tag = "records",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key"), ("id" = String, Path, description = "Record id")),
    responses((status = 200, description = "`{history: [{field, old, new, at, actor}]}`", body = Object),
              (status = 404, description = "No such record", body = ProblemDoc, content_type = "application/problem+json")))]
async fn record_history(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity, id)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (access, loaded) = scoped(&state, &actor, &app).await?;
    let e = loaded.app.entity(&entity)?;
    access.require(&entity, Op::Read)?;
    let id = parse_id(&id)?;
    // History of a record the caller cannot see (or that was deleted) is not theirs to read,
    // except for those who see every record.
    if access.owners.is_some() {
        visible(&state, &access, e, id).await?;
    }
    let hidden = &access.perm(&entity).hidden;
    let rows: Vec<_> = store::history(&state.db, &loaded.app, e, id)
        .await?
        .into_iter()
        .filter(|h| !hidden.contains(&h.field))
        .collect();
    Ok(Json(json!({ "history": rows })))
}
