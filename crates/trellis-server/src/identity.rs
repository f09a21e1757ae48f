//! Identity: passwords (argon2id), logins with throttling, and tokens with a scope, an expiry
//! and revocation. Tokens are random strings shown once; only their SHA-256 is stored.

use crate::auth::{hash_token, new_token};
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use trellis_form::db::{Db, Sql, Tx, Value};
use trellis_form::model::ColKind;
use trellis_form::{FormError, Problem, Result};
use uuid::Uuid;

/// What a token may do; each scope includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read only (GET and HEAD).
    Read,
    /// Read and write records.
    Write,
    /// Everything the user may do, including administration if the user is an admin.
    Admin,
}

impl Scope {
    /// The stored name.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    /// Parse a stored name (unknown names read as `read`, the least).
    pub fn parse(s: &str) -> Scope {
        match s {
            "admin" => Scope::Admin,
            "write" => Scope::Write,
            _ => Scope::Read,
        }
    }
}

/// Failed logins allowed per email within [`THROTTLE_WINDOW_MINUTES`].
pub const MAX_FAILURES: i64 = 5;
/// The window, and the lock after too many failures, in minutes.
pub const THROTTLE_WINDOW_MINUTES: i64 = 15;
/// How long a login session lasts.
pub const SESSION_HOURS: i64 = 12;

/// Hash a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashes any input")
        .to_string()
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Set (or replace) a user's password. At least 10 characters.
pub async fn set_password(tx: &mut Tx, user: Uuid, password: &str) -> Result<()> {
    if password.chars().count() < 10 {
        return Err(FormError::Invalid(vec![Problem::new(
            "/password",
            "too_short",
            "A password needs at least 10 characters.",
        )]));
    }
    let mut sql = Sql::new("UPDATE \"users\" SET \"password_hash\" = ");
    sql.bind(Value::Text(hash_password(password)))
        .push(" WHERE \"id\" = ")
        .bind(Value::Uuid(user));
    if tx.execute(&sql).await? == 0 {
        return Err(FormError::NotFound("user"));
    }
    Ok(())
}

/// Why a login failed.
#[derive(Debug)]
pub enum LoginError {
    /// Wrong email or password (the two are not told apart).
    Invalid,
    /// Too many failures: try again after this many seconds.
    Throttled(i64),
    /// The database failed.
    Db(FormError),
}

impl From<FormError> for LoginError {
    fn from(e: FormError) -> Self {
        LoginError::Db(e)
    }
}

/// A token as listed (never the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    /// Id (to revoke it).
    pub id: Uuid,
    /// Its owner.
    pub user_id: Uuid,
    /// Its name.
    pub name: String,
    /// `api` or `session`.
    pub kind: String,
    /// Its scope.
    pub scope: Scope,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Store a new token for `user`; returns the token, to be shown once, and its id.
pub async fn create_token(
    tx: &mut Tx,
    user: Uuid,
    name: &str,
    kind: &str,
    scope: Scope,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(String, Uuid)> {
    let token = new_token();
    let id = Uuid::now_v7();
    let mut sql = Sql::new("INSERT INTO \"api_tokens\" (\"id\", \"user_id\", \"name\", \"token_hash\", \"created_at\", \"kind\", \"scope\", \"expires_at\") VALUES (");
    sql.bind(Value::Uuid(id)).push(", ");
    sql.bind(Value::Uuid(user)).push(", ");
    sql.bind(Value::Text(name.to_owned())).push(", ");
    sql.bind(Value::Text(hash_token(&token))).push(", ");
    sql.bind(Value::DateTime(now)).push(", ");
    sql.bind(Value::Text(kind.to_owned())).push(", ");
    sql.bind(Value::Text(scope.name().to_owned())).push(", ");
    sql.bind(
        expires_at
            .map(Value::DateTime)
            .unwrap_or(Value::Null(ColKind::DateTime)),
    )
    .push(")");
    tx.execute(&sql).await?;
    Ok((token, id))
}

/// Log in: check the password (with throttling per email) and open a session token.
pub async fn login(
    db: &Db,
    email: &str,
    password: &str,
    now: DateTime<Utc>,
) -> std::result::Result<(String, TokenInfo), LoginError> {
    let key = email.trim().to_lowercase();
    let mut tx = db.begin().await?;
    let mut sql = Sql::new("SELECT \"failures\", \"window_start\", \"locked_until\" FROM \"login_failures\" WHERE \"email\" = ");
    sql.bind(Value::Text(key.clone()));
    let row = tx
        .fetch_optional(&sql, &[ColKind::Int, ColKind::DateTime, ColKind::DateTime])
        .await?;
    let (failures, window_start, locked_until) = match row {
        Some(r) => (
            if let Value::Int(n) = r[0] { n } else { 0 },
            if let Value::DateTime(t) = r[1] {
                t
            } else {
                now
            },
            if let Value::DateTime(t) = r[2] {
                Some(t)
            } else {
                None
            },
        ),
        None => (0, now, None),
    };
    if let Some(until) = locked_until.filter(|u| *u > now) {
        return Err(LoginError::Throttled((until - now).num_seconds().max(1)));
    }
    let user = trellis_form::users::by_email(db, &key).await?;
    let mut sql = Sql::new("SELECT \"password_hash\" FROM \"users\" WHERE lower(\"email\") = ");
    sql.bind(Value::Text(key.clone()));
    let hash = match tx
        .fetch_optional(&sql, &[ColKind::Text])
        .await?
        .map(|r| r[0].clone())
    {
        Some(Value::Text(h)) => Some(h),
        _ => None,
    };
    // Verify even when there is no user or hash, so timing does not tell whether an email exists.
    let ok = verify_password(password, hash.as_deref().unwrap_or("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"))
        && hash.is_some()
        && user.as_ref().is_some_and(|u| u.active);
    if !ok {
        let in_window = now - window_start < Duration::minutes(THROTTLE_WINDOW_MINUTES);
        let (count, start) = if in_window {
            (failures + 1, window_start)
        } else {
            (1, now)
        };
        let lock =
            (count >= MAX_FAILURES).then(|| now + Duration::minutes(THROTTLE_WINDOW_MINUTES));
        // One statement, so concurrent failures for one email cannot collide on its key.
        let mut ins = Sql::new("INSERT INTO \"login_failures\" (\"email\", \"failures\", \"window_start\", \"locked_until\") VALUES (");
        ins.bind(Value::Text(key))
            .push(", ")
            .bind(Value::Int(count))
            .push(", ")
            .bind(Value::DateTime(start))
            .push(", ");
        ins.bind(
            lock.map(Value::DateTime)
                .unwrap_or(Value::Null(ColKind::DateTime)),
        );
        ins.push(") ON CONFLICT (\"email\") DO UPDATE SET \"failures\" = excluded.\"failures\", \"window_start\" = excluded.\"window_start\", \"locked_until\" = excluded.\"locked_until\"");
        tx.execute(&ins).await?;
        // Forget old windows, so the table does not keep every email ever tried.
        let mut old = Sql::new("DELETE FROM \"login_failures\" WHERE \"window_start\" < ");
        old.bind(Value::DateTime(now - Duration::days(1)))
            .push(" AND (\"locked_until\" IS NULL OR \"locked_until\" < ")
            .bind(Value::DateTime(now))
            .push(")");
        tx.execute(&old).await?;
        tx.commit().await?;
        return Err(LoginError::Invalid);
    }
    let user = user.expect("checked");
    let mut del = Sql::new("DELETE FROM \"login_failures\" WHERE \"email\" = ");
    del.bind(Value::Text(key));
    tx.execute(&del).await?;
    let scope = if user.is_admin {
        Scope::Admin
    } else {
        Scope::Write
    };
    let expires = now + Duration::hours(SESSION_HOURS);
    let (token, id) = create_token(
        &mut tx,
        user.id,
        "login session",
        "session",
        scope,
        Some(expires),
        now,
    )
    .await?;
    tx.commit().await?;
    let info = TokenInfo {
        id,
        user_id: user.id,
        name: "login session".into(),
        kind: "session".into(),
        scope,
        created_at: now,
        expires_at: Some(expires),
        revoked_at: None,
    };
    Ok((token, info))
}

const TOKEN_COLS: &str = "\"id\", \"user_id\", \"name\", \"kind\", \"scope\", \"created_at\", \"expires_at\", \"revoked_at\"";
const TOKEN_KINDS: [ColKind; 8] = [
    ColKind::Uuid,
    ColKind::Uuid,
    ColKind::Text,
    ColKind::Text,
    ColKind::Text,
    ColKind::DateTime,
    ColKind::DateTime,
    ColKind::DateTime,
];

fn token_info(r: Vec<Value>) -> TokenInfo {
    let text = |v: &Value| {
        if let Value::Text(s) = v {
            s.clone()
        } else {
            String::new()
        }
    };
    let time = |v: &Value| {
        if let Value::DateTime(t) = v {
            Some(*t)
        } else {
            None
        }
    };
    TokenInfo {
        id: if let Value::Uuid(u) = r[0] {
            u
        } else {
            Uuid::nil()
        },
        user_id: if let Value::Uuid(u) = r[1] {
            u
        } else {
            Uuid::nil()
        },
        name: text(&r[2]),
        kind: text(&r[3]),
        scope: Scope::parse(&text(&r[4])),
        created_at: time(&r[5]).unwrap_or_default(),
        expires_at: time(&r[6]),
        revoked_at: time(&r[7]),
    }
}

/// Tokens of `user` (or of everyone when `user` is None), newest first.
pub async fn list_tokens(db: &Db, user: Option<Uuid>) -> Result<Vec<TokenInfo>> {
    let mut sql = Sql::new(format!("SELECT {TOKEN_COLS} FROM \"api_tokens\""));
    if let Some(u) = user {
        sql.push(" WHERE \"user_id\" = ").bind(Value::Uuid(u));
    }
    sql.push(" ORDER BY \"created_at\" DESC, \"id\" DESC");
    Ok(db
        .fetch_all(&sql, &TOKEN_KINDS)
        .await?
        .into_iter()
        .map(token_info)
        .collect())
}

/// Revoke token `id` if `caller` owns it or is an admin; otherwise it does not exist for them.
pub async fn revoke_token(
    db: &Db,
    id: Uuid,
    caller: Uuid,
    caller_is_admin: bool,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut tx = db.begin().await?;
    let mut sql = Sql::new(format!(
        "SELECT {TOKEN_COLS} FROM \"api_tokens\" WHERE \"id\" = "
    ));
    sql.bind(Value::Uuid(id));
    let Some(t) = tx.fetch_optional(&sql, &TOKEN_KINDS).await?.map(token_info) else {
        return Err(FormError::NotFound("token"));
    };
    if t.user_id != caller && !caller_is_admin {
        return Err(FormError::NotFound("token"));
    }
    let mut sql = Sql::new("UPDATE \"api_tokens\" SET \"revoked_at\" = ");
    sql.bind(Value::DateTime(now))
        .push(" WHERE \"id\" = ")
        .bind(Value::Uuid(id))
        .push(" AND \"revoked_at\" IS NULL");
    if tx.execute(&sql).await? > 0 {
        trellis_form::audit::record(
            &mut tx,
            now,
            Some(caller),
            None,
            "token.revoke",
            &id.to_string(),
            serde_json::json!({"name": t.name, "user_id": t.user_id}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
