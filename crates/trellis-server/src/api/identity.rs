//! `/api/v1/auth/login` (public) and `/api/v1/tokens`: logging in, and personal API tokens.

use super::{Body, ProblemDoc, Q};
use crate::auth::Actor;
use crate::error::{ApiError, ApiResult};
use crate::identity::{self, LoginError, Scope};
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Routes that need no token.
pub fn public_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(login))
}

/// Token management (behind the token check).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
}

/// A login.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    /// The user's email.
    email: String,
    /// The password.
    password: String,
}

/// Log in with email and password; answers a session token (valid 12 hours). After 5 failures
/// for one email within 15 minutes, logins for it are refused for 15 minutes (429).
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "identity", request_body = LoginBody, security(()),
    responses((status = 200, description = "`{id, token, expires_at, user_id, scope}` (revoke `id` to log out)", body = Object),
              (status = 401, description = "Wrong email or password", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 429, description = "Too many failures; see Retry-After", body = ProblemDoc, content_type = "application/problem+json")))]
async fn login(State(state): State<AppState>, Body(b): Body<LoginBody>) -> ApiResult<Json<Value>> {
    match identity::login(&state.db, &b.email, &b.password, state.clock.now()).await {
        Ok((token, info)) => Ok(Json(json!({
            "id": info.id,
            "token": token,
            "expires_at": info.expires_at.map(|t| trellis_form::values::datetime_json(&t)),
            "user_id": info.user_id,
            "scope": info.scope,
        }))),
        Err(LoginError::Invalid) => Err(ApiError::unauthorized(
            "The email or the password is wrong.",
        )),
        Err(LoginError::Throttled(s)) => Err(ApiError::new(
            "too_many_requests",
            format!("Too many failed logins for this email; try again in {s} seconds."),
        )
        .retry_after(s as u32)),
        Err(LoginError::Db(e)) => Err(e.into()),
    }
}

/// Whose tokens to list.
#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Every user's tokens (administrators only).
    #[serde(default)]
    all: bool,
}

/// The caller's tokens (never the token strings).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "identity", params(ListParams),
    responses((status = 200, description = "`{tokens: [{id, user_id, name, kind, scope, created_at, expires_at, revoked_at}]}`", body = Object)))]
async fn list_tokens(
    State(state): State<AppState>,
    actor: Actor,
    Q(p): Q<ListParams>,
) -> ApiResult<Json<Value>> {
    let user = if p.all && actor.is_admin {
        None
    } else {
        Some(actor.user_id)
    };
    Ok(Json(
        json!({ "tokens": identity::list_tokens(&state.db, user).await? }),
    ))
}

/// A new personal token.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// A name to recognise it by.
    name: String,
    /// `read`, `write` or `admin` (default `write`); never more than the caller's own.
    #[schema(value_type = Option<String>)]
    scope: Option<Scope>,
    /// Days until it expires (default: never).
    expires_in_days: Option<u32>,
}

/// Create a personal API token for the caller. The token is in the answer, once.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "identity", request_body = TokenBody,
    responses((status = 201, description = "`{id, token, scope, expires_at}`", body = Object),
              (status = 422, description = "A scope above the caller's, or a bad name", body = ProblemDoc, content_type = "application/problem+json")))]
async fn create_token(
    State(state): State<AppState>,
    actor: Actor,
    Body(b): Body<TokenBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let scope = b.scope.unwrap_or(Scope::Write);
    let mut problems = vec![];
    if b.name.trim().is_empty() || b.name.chars().count() > 100 {
        problems.push(trellis_form::Problem::new(
            "/name",
            "bad_value",
            "A token name is 1 to 100 characters long.",
        ));
    }
    let ceiling = if actor.is_admin {
        Scope::Admin
    } else {
        actor.scope.min(Scope::Write)
    };
    if scope > ceiling {
        problems.push(trellis_form::Problem::new(
            "/scope",
            "not_allowed",
            format!(
                "Your own access allows at most the scope `{}`.",
                ceiling.name()
            ),
        ));
    }
    if !problems.is_empty() {
        return Err(
            ApiError::new("validation_failed", "The token request is invalid.")
                .with_errors(problems),
        );
    }
    let now = state.clock.now();
    let expires = b
        .expires_in_days
        .map(|d| now + chrono::Duration::days(i64::from(d.clamp(1, 3650))));
    let mut tx = state.db.begin().await?;
    let (token, id) = identity::create_token(
        &mut tx,
        actor.user_id,
        b.name.trim(),
        "api",
        scope,
        expires,
        now,
    )
    .await?;
    trellis_form::audit::record(
        &mut tx,
        now,
        Some(actor.user_id),
        None,
        "token.create",
        &id.to_string(),
        json!({"name": b.name.trim(), "scope": scope, "expires_at": expires.map(|t| trellis_form::values::datetime_json(&t)), "user_id": actor.user_id}),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"id": id, "token": token, "scope": scope, "expires_at": expires.map(|t| trellis_form::values::datetime_json(&t))}),
        ),
    ))
}

/// Revoke a token: the caller's own, or anyone's for an administrator. It stops working at once.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "identity", params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked"),
              (status = 404, description = "No such token (or not yours)", body = ProblemDoc, content_type = "application/problem+json")))]
async fn revoke_token(
    State(state): State<AppState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = uuid::Uuid::parse_str(&id).map_err(|_| ApiError::not_found("token not found"))?;
    identity::revoke_token(
        &state.db,
        id,
        actor.user_id,
        actor.is_admin,
        state.clock.now(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
