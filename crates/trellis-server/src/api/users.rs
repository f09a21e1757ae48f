//! `/api/v1/users` and `/api/v1/teams`: people and teams as data.

use super::{Body, ProblemDoc};
use crate::auth::Actor;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use trellis_form::users::{self, TeamInput, UserInput};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, update_user))
        .routes(routes!(list_teams, upsert_team))
}

fn admin(actor: &Actor) -> ApiResult<()> {
    if actor.is_admin {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "only administrators can manage users and teams",
        ))
    }
}

/// Split a `password` out of a user body (passwords are hashed by the server, never stored as given).
fn take_password(mut b: Value) -> ApiResult<(Value, Option<String>)> {
    let password = match b.as_object_mut().and_then(|m| m.remove("password")) {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(p),
        Some(_) => {
            return Err(
                ApiError::new("validation_failed", "The password must be text.").with_errors(vec![
                    trellis_form::Problem::new(
                        "/password",
                        "wrong_type",
                        "The password must be text.",
                    ),
                ]),
            )
        }
    };
    Ok((b, password))
}

fn input<T: serde::de::DeserializeOwned>(v: Value) -> ApiResult<T> {
    serde_json::from_value(v)
        .map_err(|e| ApiError::new("invalid_body", format!("The body has the wrong shape: {e}")))
}

/// Every user.
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, description = "`{users: [{id, name, email, manager_id, active, is_admin}]}`", body = Object)))]
async fn list_users(State(state): State<AppState>, _actor: Actor) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "users": users::list(&state.db).await? })))
}

/// Create a user.
#[utoipa::path(post, path = "/api/v1/users", tag = "users",
    request_body(content = Object, description = "`{name, email, manager_id?, active?, is_admin?, password?}`"),
    responses((status = 201, description = "The user", body = Object),
              (status = 422, description = "Invalid", body = ProblemDoc, content_type = "application/problem+json")))]
async fn create_user(
    State(state): State<AppState>,
    actor: Actor,
    Body(b): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    admin(&actor)?;
    let (b, password) = take_password(b)?;
    let mut detail = b.clone();
    let i: UserInput = input(b)?;
    let mut tx = state.db.begin().await?;
    let u = users::create(&mut tx, &i, state.clock.now()).await?;
    detail["password_set"] = json!(password.is_some());
    if let Some(p) = password {
        crate::identity::set_password(&mut tx, u.id, &p).await?;
    }
    trellis_form::audit::record(
        &mut tx,
        state.clock.now(),
        Some(actor.user_id),
        None,
        "user.create",
        &u.id.to_string(),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(json!(u))))
}

/// One user.
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")),
    responses((status = 200, description = "The user", body = Object),
              (status = 404, description = "No such user", body = ProblemDoc, content_type = "application/problem+json")))]
async fn get_user(
    State(state): State<AppState>,
    _actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = uuid::Uuid::parse_str(&id).map_err(|_| ApiError::not_found("user not found"))?;
    Ok(Json(json!(users::get(&state.db, id).await?)))
}

/// Change a user (name, email, manager, active, admin).
#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")),
    request_body(content = Object, description = "Fields to change"),
    responses((status = 200, description = "The user", body = Object),
              (status = 422, description = "Invalid (e.g. a management cycle)", body = ProblemDoc, content_type = "application/problem+json")))]
async fn update_user(
    State(state): State<AppState>,
    actor: Actor,
    Path(id): Path<String>,
    Body(b): Body<Value>,
) -> ApiResult<Json<Value>> {
    admin(&actor)?;
    let id = uuid::Uuid::parse_str(&id).map_err(|_| ApiError::not_found("user not found"))?;
    let (b, password) = take_password(b)?;
    let mut detail = b.clone();
    let i: UserInput = input(b)?;
    let mut tx = state.db.begin().await?;
    let u = users::update(&mut tx, id, &i).await?;
    detail["password_set"] = json!(password.is_some());
    if let Some(p) = password {
        crate::identity::set_password(&mut tx, id, &p).await?;
    }
    trellis_form::audit::record(
        &mut tx,
        state.clock.now(),
        Some(actor.user_id),
        None,
        "user.update",
        &id.to_string(),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(json!(u)))
}

/// Every team with its members.
#[utoipa::path(get, path = "/api/v1/teams", tag = "users",
    responses((status = 200, description = "`{teams: [{id, key, name, lead_id, members}]}`", body = Object)))]
async fn list_teams(State(state): State<AppState>, _actor: Actor) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "teams": users::teams(&state.db).await? })))
}

/// Create or replace a team by key.
#[utoipa::path(post, path = "/api/v1/teams", tag = "users",
    request_body(content = Object, description = "`{key, name?, lead_id?, members?}`"),
    responses((status = 200, description = "`{id}`", body = Object),
              (status = 422, description = "Invalid", body = ProblemDoc, content_type = "application/problem+json")))]
async fn upsert_team(
    State(state): State<AppState>,
    actor: Actor,
    Body(b): Body<Value>,
) -> ApiResult<Json<Value>> {
    admin(&actor)?;
    let detail = b.clone();
    let i: TeamInput = input(b)?;
    let mut tx = state.db.begin().await?;
    let id = users::upsert_team(&mut tx, &i, state.clock.now()).await?;
    trellis_form::audit::record(
        &mut tx,
        state.clock.now(),
        Some(actor.user_id),
        None,
        "team.upsert",
        &id.to_string(),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(json!({ "id": id })))
}
