//! Bearer-token authentication.
//!
//! Tokens are 256-bit random strings (`trl_` + 64 hex digits) shown once; the database keeps only
//! their SHA-256. Every `/api` route passes through [`require_token`] except the
//! [`PUBLIC_ROUTES`] (`/healthz` and the login). A token acts as its user within its scope
//! (`read` / `write` / `admin`, see `identity`); it stops working when it expires, is revoked, or
//! its user is deactivated. Roles and record permissions arrive with their own issue.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use rand::RngCore;
use sha2::{Digest, Sha256};
use trellis_form::db::{Db, Sql, Value};
use trellis_form::model::ColKind;
use trellis_form::users::UserInput;
use trellis_form::Result;
use uuid::Uuid;

/// Routes reachable without a token. A test checks that every other route answers 401 without one.
pub const PUBLIC_ROUTES: &[&str] = &[
    "/healthz",
    "/api/v1/auth/login",
    // Authenticated by its Standard Webhooks signature instead of a token.
    "/api/v1/apps/{app}/hooks/{name}",
];

/// Email of the bootstrap administrator.
pub const ADMIN_EMAIL: &str = "admin@localhost";

/// The authenticated caller.
#[derive(Debug, Clone, Copy)]
pub struct Actor {
    /// The user the token belongs to.
    pub user_id: Uuid,
    /// Whether the caller may administer: an admin user with an `admin`-scope token.
    pub is_admin: bool,
    /// The token's scope.
    pub scope: crate::identity::Scope,
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Actor>()
            .copied()
            .ok_or_else(|| ApiError::unauthorized("A valid bearer token is required."))
    }
}

/// SHA-256 of a token, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("trl_{}", hex::encode(bytes))
}

/// Middleware: resolve `Authorization: Bearer <token>` to an [`Actor`] or answer 401.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("Send a token in the header Authorization: Bearer <token>.")
        })?;
    let actor = lookup(&state.db, token, state.clock.now())
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::unauthorized("The token is unknown, expired or revoked."))?;
    if let Err(retry) = state.limiter.check(&hash_token(token)) {
        return Err(ApiError::new(
            "too_many_requests",
            format!("This token made too many requests; try again in {retry} second(s)."),
        )
        .retry_after(retry));
    }
    // A read-scope token reads; writing needs `write` (administration is checked by the routes).
    let reading = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    ) || (req.method() == axum::http::Method::POST && is_read_post(req.uri().path()));
    if !reading && actor.scope < crate::identity::Scope::Write {
        return Err(ApiError::new(
            "forbidden",
            "This token may only read (scope `read`).",
        ));
    }
    req.extensions_mut().insert(actor);
    Ok(next.run(req).await)
}

async fn lookup(db: &Db, token: &str, now: chrono::DateTime<chrono::Utc>) -> Result<Option<Actor>> {
    let mut sql = Sql::new(
        "SELECT u.\"id\", u.\"is_admin\", t.\"scope\" FROM \"api_tokens\" t JOIN \"users\" u ON u.\"id\" = t.\"user_id\" \
         WHERE t.\"token_hash\" = ",
    );
    sql.bind(Value::Text(hash_token(token)));
    sql.push(" AND t.\"revoked_at\" IS NULL AND (t.\"expires_at\" IS NULL OR t.\"expires_at\" > ")
        .bind(Value::DateTime(now));
    sql.push(") AND u.\"active\" = ").bind(Value::Bool(true));
    Ok(db
        .fetch_optional(&sql, &[ColKind::Uuid, ColKind::Bool, ColKind::Text])
        .await?
        .map(|r| {
            let scope = match &r[2] {
                Value::Text(s) => crate::identity::Scope::parse(s),
                _ => crate::identity::Scope::Read,
            };
            Actor {
                user_id: if let Value::Uuid(u) = r[0] {
                    u
                } else {
                    Uuid::nil()
                },
                is_admin: matches!(r[1], Value::Bool(true))
                    && scope == crate::identity::Scope::Admin,
                scope,
            }
        }))
}

/// The bootstrap administrator's id, creating the user if needed.
pub async fn ensure_admin(db: &Db, now: chrono::DateTime<chrono::Utc>) -> Result<Uuid> {
    if let Some(u) = trellis_form::users::by_email(db, ADMIN_EMAIL).await? {
        return Ok(u.id);
    }
    let mut tx = db.begin().await?;
    let input = UserInput {
        name: Some("Administrator".into()),
        email: Some(ADMIN_EMAIL.into()),
        is_admin: Some(true),
        ..Default::default()
    };
    let u = trellis_form::users::create(&mut tx, &input, now).await?;
    tx.commit().await?;
    Ok(u.id)
}

/// Ensure the bootstrap admin user and token exist. With `env_token` (from `TRELLIS_ADMIN_TOKEN`)
/// that token is registered; otherwise, if the admin has no token yet, one is generated and
/// returned so the caller can print it once.
pub async fn bootstrap(
    db: &Db,
    now: chrono::DateTime<chrono::Utc>,
    env_token: Option<&str>,
) -> Result<(Uuid, Option<String>)> {
    let admin = ensure_admin(db, now).await?;
    let (token, name, show) = match env_token {
        Some(t) => (t.to_owned(), "admin (TRELLIS_ADMIN_TOKEN)", false),
        None => {
            let mut sql = Sql::new("SELECT COUNT(*) FROM \"api_tokens\" WHERE \"user_id\" = ");
            sql.bind(Value::Uuid(admin))
                .push(
                    " AND \"revoked_at\" IS NULL AND (\"expires_at\" IS NULL OR \"expires_at\" > ",
                )
                .bind(Value::DateTime(now))
                .push(")");
            let n = db
                .fetch_optional(&sql, &[ColKind::Int])
                .await?
                .map(|r| r[0].clone());
            if matches!(n, Some(Value::Int(n)) if n > 0) {
                return Ok((admin, None));
            }
            (new_token(), "admin (generated)", true)
        }
    };
    let hash = hash_token(&token);
    let mut sql = Sql::new("SELECT 1 FROM \"api_tokens\" WHERE \"token_hash\" = ");
    sql.bind(Value::Text(hash.clone()));
    if db.fetch_optional(&sql, &[ColKind::Int]).await?.is_none() {
        let mut tx = db.begin().await?;
        let mut sql = Sql::new("INSERT INTO \"api_tokens\" (\"id\", \"user_id\", \"name\", \"token_hash\", \"created_at\") VALUES (");
        sql.bind(Value::Uuid(Uuid::now_v7())).push(", ");
        sql.bind(Value::Uuid(admin)).push(", ");
        sql.bind(Value::Text(name.into())).push(", ");
        sql.bind(Value::Text(hash)).push(", ");
        sql.bind(Value::DateTime(now)).push(")");
        tx.execute(&sql).await?;
        tx.commit().await?;
    }
    Ok((admin, show.then_some(token)))
}

/// POST routes that only read (a query too large for a URL): a read-scope token may call them.
pub fn is_read_post(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    matches!(
        parts.as_slice(),
        ["", "api", "v1", "apps", _, "reports", "query" | "drill"]
            | ["", "api", "v1", "apps", _, "records", _, "query"]
    )
}
