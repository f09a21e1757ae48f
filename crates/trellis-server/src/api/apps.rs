//! `/api/v1/apps`: import, read and version app definitions.

use super::{Body, ProblemDoc, Q};
use crate::auth::Actor;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_form::apps::{self, ImportOptions};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_apps, import_app))
        .routes(routes!(get_app, replace_app))
        .routes(routes!(list_versions))
        .routes(routes!(get_version))
        .routes(routes!(entity_schema))
        .routes(routes!(list_members))
        .routes(routes!(set_member, remove_member))
        .routes(routes!(list_roles))
        .routes(routes!(app_audit))
        .routes(routes!(audit_log))
}

/// Import options in the query string.
#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// Apply destructive steps (drop fields or entities, change types, remove options).
    #[serde(default)]
    allow_destructive: bool,
    /// Only compute and check the plan.
    #[serde(default)]
    dry_run: bool,
}

fn admin(actor: &Actor) -> ApiResult<()> {
    if actor.is_admin {
        Ok(())
    } else {
        Err(ApiError::not_found("only administrators can change apps"))
    }
}

async fn do_import(
    state: &AppState,
    actor: &Actor,
    def: &Value,
    p: &ImportParams,
) -> ApiResult<(StatusCode, Json<Value>)> {
    admin(actor)?;
    let opts = ImportOptions {
        allow_destructive: p.allow_destructive,
        dry_run: p.dry_run,
    };
    let outcome =
        crate::appdef::import(&state.db, def, opts, Some(actor.user_id), state.clock.now()).await?;
    if outcome.applied {
        if let Some(app) = apps::load(&state.db, &outcome.app).await? {
            state.install(app).await?;
        }
    }
    let status = if outcome.applied && outcome.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::to_value(&outcome).map_err(ApiError::internal)?),
    ))
}

/// Every installed app.
#[utoipa::path(get, path = "/api/v1/apps", tag = "apps",
    responses((status = 200, description = "`{apps: [{key, version, label, entities}]}`", body = Object)))]
async fn list_apps(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Value>> {
    let mut visible = vec![];
    for l in state.all_apps() {
        if crate::policy::access(&state, &actor, &l.app.key)
            .await
            .is_ok()
        {
            visible.push(l);
        }
    }
    let apps: Vec<Value> = visible
        .iter()
        .map(|l| {
            json!({
                "key": l.app.key,
                "version": l.app.version,
                "label": l.app.def.label,
                "entities": l.app.entities.iter().map(|e| &e.key).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "apps": apps })))
}

/// Import an app definition (new app or new version). The response holds the migration plan.
#[utoipa::path(post, path = "/api/v1/apps", tag = "apps", params(ImportParams),
    request_body(content = Object, description = "The whole app definition (see docs/reference/app-definition.md)"),
    responses((status = 201, description = "A new app was installed", body = Object),
              (status = 200, description = "A new version was applied, or nothing changed, or a dry run", body = Object),
              (status = 409, description = "Destructive change without allow_destructive, or data that does not fit", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 422, description = "The definition is invalid: every problem with its JSON pointer", body = ProblemDoc, content_type = "application/problem+json")))]
async fn import_app(
    State(state): State<AppState>,
    actor: Actor,
    Q(p): Q<ImportParams>,
    Body(def): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    do_import(&state, &actor, &def, &p).await
}

/// Import a new version of app `{app}` (the definition's key must match).
#[utoipa::path(put, path = "/api/v1/apps/{app}", tag = "apps", params(("app" = String, Path, description = "App key"), ImportParams),
    request_body(content = Object, description = "The whole app definition"),
    responses((status = 201, description = "A new app was installed", body = Object),
              (status = 200, description = "Applied (or dry run, or nothing changed)", body = Object),
              (status = 409, description = "Destructive change without allow_destructive", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 422, description = "The definition is invalid", body = ProblemDoc, content_type = "application/problem+json")))]
async fn replace_app(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
    Q(p): Q<ImportParams>,
    Body(def): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if def.get("key").and_then(Value::as_str) != Some(app.as_str()) {
        return Err(ApiError::new(
            "invalid_definition",
            "The definition's key must match the app in the URL.",
        )
        .with_errors(vec![trellis_form::Problem::new(
            "/key",
            "mismatch",
            format!("Expected the key `{app}`."),
        )]));
    }
    do_import(&state, &actor, &def, &p).await
}

/// The installed definition of an app.
#[utoipa::path(get, path = "/api/v1/apps/{app}", tag = "apps", params(("app" = String, Path, description = "App key")),
    responses((status = 200, description = "`{key, version, definition}`", body = Object),
              (status = 404, description = "No such app", body = ProblemDoc, content_type = "application/problem+json")))]
async fn get_app(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    crate::policy::access(&state, &actor, &app).await?;
    let l = state.app(&app)?;
    Ok(Json(
        json!({"key": l.app.key, "version": l.app.version, "definition": l.app.def}),
    ))
}

/// Every version of an app, newest first, with the plan applied for each.
#[utoipa::path(get, path = "/api/v1/apps/{app}/versions", tag = "apps", params(("app" = String, Path, description = "App key")),
    responses((status = 200, description = "`{versions: [{version, created_at, created_by, plan}]}`", body = Object),
              (status = 404, description = "No such app", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_versions(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    crate::policy::access(&state, &actor, &app).await?;
    let v = apps::versions(&state.db, &app).await?;
    Ok(Json(json!({ "versions": v })))
}

/// The definition of one version.
#[utoipa::path(get, path = "/api/v1/apps/{app}/versions/{version}", tag = "apps",
    params(("app" = String, Path, description = "App key"), ("version" = i64, Path, description = "Version number")),
    responses((status = 200, description = "`{version, definition}`", body = Object),
              (status = 404, description = "No such version", body = ProblemDoc, content_type = "application/problem+json")))]
async fn get_version(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, version)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    crate::policy::access(&state, &actor, &app).await?;
    let version: i64 = version
        .parse()
        .map_err(|_| ApiError::not_found(format!("no version `{version}`")))?;
    let def = apps::version_definition(&state.db, &app, version).await?;
    Ok(Json(json!({"version": version, "definition": def})))
}

/// The JSON Schema records of an entity are validated against.
#[utoipa::path(get, path = "/api/v1/apps/{app}/entities/{entity}/schema", tag = "apps",
    params(("app" = String, Path, description = "App key"), ("entity" = String, Path, description = "Entity key")),
    responses((status = 200, description = "A JSON Schema (draft 2020-12)", body = Object),
              (status = 404, description = "No such app or entity", body = ProblemDoc, content_type = "application/problem+json")))]
async fn entity_schema(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, entity)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let access = crate::policy::access(&state, &actor, &app).await?;
    let l = state.app(&app)?;
    let mut schema = l.app.entity(&entity)?.json_schema();
    access.require(&entity, crate::policy::Op::Read)?;
    // The form the caller sees: hidden fields left out, read-only ones marked.
    let perm = access.perm(&entity);
    if let Some(props) = schema["properties"].as_object_mut() {
        props.retain(|k, _| !perm.hidden.contains(k));
        for f in &perm.read_only {
            if let Some(p) = props.get_mut(f) {
                p["readOnly"] = json!(true);
            }
        }
    }
    if let Some(req) = schema["required"].as_array_mut() {
        req.retain(|k| k.as_str().is_none_or(|k| !perm.hidden.contains(k)));
    }
    Ok(Json(schema))
}

/// The members of an app and their roles (app administrators only).
#[utoipa::path(get, path = "/api/v1/apps/{app}/members", tag = "apps", params(("app" = String, Path, description = "App key")),
    responses((status = 200, description = "`{members: [{user_id, role}]}`", body = Object),
              (status = 404, description = "No such app (or not yours to manage)", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_members(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    manage(&state, &actor, &app).await?;
    let mut sql = trellis_form::db::Sql::new(
        "SELECT \"user_id\", \"role\" FROM \"app_members\" WHERE \"app\" = ",
    );
    sql.bind(trellis_form::db::Value::Text(app))
        .push(" ORDER BY \"user_id\"");
    let rows = state
        .db
        .fetch_all(
            &sql,
            &[
                trellis_form::model::ColKind::Uuid,
                trellis_form::model::ColKind::Text,
            ],
        )
        .await?;
    let members: Vec<Value> = rows.iter().map(|r| json!({"user_id": trellis_form::values::scalar_json(&r[0], 0), "role": trellis_form::values::scalar_json(&r[1], 0)})).collect();
    Ok(Json(json!({ "members": members })))
}

/// An app administrator grants only roles within their own, to members whose current role is
/// within their own too; administrators grant anything.
async fn grantable(
    state: &AppState,
    access: &crate::policy::Access,
    actor: &Actor,
    app: &str,
    user: uuid::Uuid,
    role: &trellis_form::roles::Role,
) -> ApiResult<()> {
    if actor.is_admin {
        return Ok(());
    }
    if !role.within(&access.role) {
        return Err(ApiError::new(
            "forbidden",
            format!(
                "The role `{}` reaches further than your own role `{}`; only an administrator can grant it.",
                role.key, access.role.key
            ),
        ));
    }
    reachable(state, access, actor, app, user).await
}

/// The member's current role is within the caller's (administrators reach every member).
async fn reachable(
    state: &AppState,
    access: &crate::policy::Access,
    actor: &Actor,
    app: &str,
    user: uuid::Uuid,
) -> ApiResult<()> {
    if actor.is_admin {
        return Ok(());
    }
    if let Some(held) = crate::policy::role(state, app, user).await? {
        if let Some(current) = state.app(app)?.app.roles.get(&held) {
            if !current.within(&access.role) {
                return Err(ApiError::new(
                    "forbidden",
                    format!("The member's role `{held}` reaches further than yours; only an administrator can change it."),
                ));
            }
        }
    }
    Ok(())
}

async fn manage(state: &AppState, actor: &Actor, app: &str) -> ApiResult<crate::policy::Access> {
    let access = crate::policy::access(state, actor, app).await?;
    state.app(app)?;
    if access.admin {
        Ok(access)
    } else {
        Err(ApiError::not_found(format!(
            "app `{app}` has no members you can manage"
        )))
    }
}

/// A member's role.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    /// A role of the app: `admin`, `manager`, `sales_rep`, `viewer` or one the app defines.
    role: String,
}

/// Give a user a role in an app (replacing any role they had there).
#[utoipa::path(put, path = "/api/v1/apps/{app}/members/{id}", tag = "apps",
    params(("app" = String, Path, description = "App key"), ("id" = String, Path, description = "User id")),
    request_body = MemberBody,
    responses((status = 200, description = "`{user_id, role}`", body = Object),
              (status = 422, description = "Unknown role", body = ProblemDoc, content_type = "application/problem+json")))]
async fn set_member(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, user)): Path<(String, String)>,
    Body(b): Body<MemberBody>,
) -> ApiResult<Json<Value>> {
    let access = manage(&state, &actor, &app).await?;
    let user = uuid::Uuid::parse_str(&user).map_err(|_| ApiError::not_found("user not found"))?;
    trellis_form::users::get(&state.db, user).await?;
    let loaded = state.app(&app)?;
    if let Some(role) = loaded.app.roles.get(&b.role) {
        grantable(&state, &access, &actor, &app, user, role).await?;
    } else {
        return Err(
            ApiError::new("validation_failed", "Unknown role.").with_errors(vec![
                trellis_form::Problem::new(
                    "/role",
                    "unknown_option",
                    format!(
                        "`{}` is not a role of this app; use one of {}.",
                        b.role,
                        loaded.app.roles.keys().join(", ")
                    ),
                ),
            ]),
        );
    }
    let mut tx = state.db.begin().await?;
    let mut old =
        trellis_form::db::Sql::new("SELECT \"role\" FROM \"app_members\" WHERE \"app\" = ");
    old.bind(trellis_form::db::Value::Text(app.clone()))
        .push(" AND \"user_id\" = ")
        .bind(trellis_form::db::Value::Uuid(user));
    let previous = match tx
        .fetch_all(&old, &[trellis_form::model::ColKind::Text])
        .await?
        .first()
        .map(|r| r[0].clone())
    {
        Some(trellis_form::db::Value::Text(r)) => Some(r),
        _ => None,
    };
    trellis_form::audit::record(
        &mut tx,
        state.clock.now(),
        Some(actor.user_id),
        Some(&app),
        "member.set",
        &user.to_string(),
        json!({"role": b.role, "previous_role": previous}),
    )
    .await?;
    let mut del = trellis_form::db::Sql::new("DELETE FROM \"app_members\" WHERE \"app\" = ");
    del.bind(trellis_form::db::Value::Text(app.clone()))
        .push(" AND \"user_id\" = ")
        .bind(trellis_form::db::Value::Uuid(user));
    tx.execute(&del).await?;
    let mut ins = trellis_form::db::Sql::new(
        "INSERT INTO \"app_members\" (\"app\", \"user_id\", \"role\") VALUES (",
    );
    ins.bind(trellis_form::db::Value::Text(app))
        .push(", ")
        .bind(trellis_form::db::Value::Uuid(user))
        .push(", ")
        .bind(trellis_form::db::Value::Text(b.role.clone()))
        .push(")");
    tx.execute(&ins).await?;
    tx.commit().await?;
    Ok(Json(json!({"user_id": user, "role": b.role})))
}

/// Take a user's role in an app away (they no longer see the app).
#[utoipa::path(delete, path = "/api/v1/apps/{app}/members/{id}", tag = "apps",
    params(("app" = String, Path, description = "App key"), ("id" = String, Path, description = "User id")),
    responses((status = 204, description = "Removed")))]
async fn remove_member(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, user)): Path<(String, String)>,
) -> ApiResult<axum::http::StatusCode> {
    let access = manage(&state, &actor, &app).await?;
    let user = uuid::Uuid::parse_str(&user).map_err(|_| ApiError::not_found("user not found"))?;
    reachable(&state, &access, &actor, &app, user).await?;
    let mut del = trellis_form::db::Sql::new("DELETE FROM \"app_members\" WHERE \"app\" = ");
    del.bind(trellis_form::db::Value::Text(app.clone()))
        .push(" AND \"user_id\" = ")
        .bind(trellis_form::db::Value::Uuid(user));
    let mut tx = state.db.begin().await?;
    if tx.execute(&del).await? > 0 {
        trellis_form::audit::record(
            &mut tx,
            state.clock.now(),
            Some(actor.user_id),
            Some(&app),
            "member.remove",
            &user.to_string(),
            json!({}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// The app's roles (built-in and defined): scope, admin, and per entity what they may do and
/// which fields are hidden or read-only. Any member may read them; `me` is the caller's.
#[utoipa::path(get, path = "/api/v1/apps/{app}/roles", tag = "apps", params(("app" = String, Path, description = "App key")),
    responses((status = 200, description = "`{me, roles: [{key, label, scope, admin, built_in, entities: {entity: {can, fields}}}]}`", body = Object),
              (status = 404, description = "No such app", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_roles(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    let access = crate::policy::access(&state, &actor, &app).await?;
    let loaded = state.app(&app)?;
    Ok(Json(
        json!({"me": access.role.key, "roles": crate::policy::roles_json(&loaded.app.roles)}),
    ))
}

/// Paging of the audit log.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Entries per page, 1–1000 (default 100).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Only this app's entries (`/api/v1/audit` only).
    app: Option<String>,
}

async fn audit_page(
    state: &AppState,
    app: Option<&str>,
    p: &AuditParams,
) -> ApiResult<Json<Value>> {
    let before = match &p.cursor {
        None => None,
        Some(c) => Some(uuid::Uuid::parse_str(c).map_err(|_| {
            ApiError::new(
                "invalid_query",
                "The cursor is not one this server gave out.",
            )
            .with_errors(vec![trellis_form::Problem::new(
                "/cursor",
                "malformed",
                "Use the `next_cursor` of the previous page.",
            )])
        })?),
    };
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    let entries = trellis_form::audit::list(&state.db, app, before, limit).await?;
    let next = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id.to_string()))
        .flatten();
    Ok(Json(json!({"entries": entries, "next_cursor": next})))
}

/// The app's audit log, newest first: definition imports and member changes (app administrators).
#[utoipa::path(get, path = "/api/v1/apps/{app}/audit", tag = "apps", params(("app" = String, Path, description = "App key"), AuditParams),
    responses((status = 200, description = "`{entries: [{id, at, actor, app, action, target, detail}], next_cursor}`", body = Object),
              (status = 404, description = "No such app (or not yours to administer)", body = ProblemDoc, content_type = "application/problem+json")))]
async fn app_audit(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
    Q(p): Q<AuditParams>,
) -> ApiResult<Json<Value>> {
    manage(&state, &actor, &app).await?;
    audit_page(&state, Some(&app), &p).await
}

/// The whole audit log, newest first: app definitions, members and roles, users, teams and
/// tokens (administrators only).
#[utoipa::path(get, path = "/api/v1/audit", tag = "identity", params(AuditParams),
    responses((status = 200, description = "`{entries: [{id, at, actor, app, action, target, detail}], next_cursor}`", body = Object),
              (status = 404, description = "Not an administrator", body = ProblemDoc, content_type = "application/problem+json")))]
async fn audit_log(
    State(state): State<AppState>,
    actor: Actor,
    Q(p): Q<AuditParams>,
) -> ApiResult<Json<Value>> {
    if !actor.is_admin {
        return Err(ApiError::not_found(
            "only administrators read the audit log",
        ));
    }
    audit_page(&state, p.app.as_deref(), &p).await
}
