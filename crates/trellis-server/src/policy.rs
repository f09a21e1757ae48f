//! The one policy function: what a caller may see and do in an app.
//!
//! Built-in roles per app: `admin` (every record, and the app's members), `manager` (records
//! owned by themselves or anyone under them in the management hierarchy, recursively),
//! `sales_rep` (their own records), `viewer` (every record, read only). An administrator user
//! with an admin-scope token may do everything everywhere. A user without a role in an app does
//! not see the app at all (404), and a record outside the caller's scope is a 404 too, so ids
//! do not leak. Custom roles from app definitions and field permissions are not here yet.

use crate::auth::Actor;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use std::collections::{HashMap, HashSet};
use trellis_form::db::{Sql, Value};
use trellis_form::model::ColKind;
use uuid::Uuid;

/// The built-in roles.
pub const ROLES: [&str; 4] = ["admin", "manager", "sales_rep", "viewer"];

/// What the caller may do in one app.
#[derive(Debug, Clone)]
pub struct Access {
    /// The caller.
    pub user: Uuid,
    /// Owners whose records the caller sees; None means every record.
    pub owners: Option<HashSet<Uuid>>,
    /// Whether the caller may create, change and delete (within `owners`).
    pub write: bool,
    /// Whether the caller administers the app (members, definitions).
    pub admin: bool,
}

impl Access {
    /// Whether a record with this owner is visible.
    pub fn sees(&self, owner: Option<Uuid>) -> bool {
        match &self.owners {
            None => true,
            Some(set) => owner.is_some_and(|o| set.contains(&o)),
        }
    }

    /// Refuse writes for read-only roles.
    pub fn require_write(&self) -> ApiResult<()> {
        if self.write {
            Ok(())
        } else {
            Err(ApiError::new(
                "forbidden",
                "Your role in this app may only read.",
            ))
        }
    }
}

/// The caller's role in `app`, if any.
pub async fn role(state: &AppState, app: &str, user: Uuid) -> ApiResult<Option<String>> {
    let mut sql = Sql::new("SELECT \"role\" FROM \"app_members\" WHERE \"app\" = ");
    sql.bind(Value::Text(app.into()))
        .push(" AND \"user_id\" = ")
        .bind(Value::Uuid(user));
    Ok(
        match state
            .db
            .fetch_optional(&sql, &[ColKind::Text])
            .await?
            .map(|r| r[0].clone())
        {
            Some(Value::Text(r)) => Some(r),
            _ => None,
        },
    )
}

/// Decide what `actor` may do in `app`; a caller without a role gets 404 for the app.
pub async fn access(state: &AppState, actor: &Actor, app: &str) -> ApiResult<Access> {
    let everything = Access {
        user: actor.user_id,
        owners: None,
        write: true,
        admin: true,
    };
    if actor.is_admin {
        return Ok(everything);
    }
    let Some(role) = role(state, app, actor.user_id).await? else {
        return Err(ApiError::not_found(format!("app `{app}` does not exist")));
    };
    Ok(match role.as_str() {
        "admin" => everything,
        "viewer" => Access {
            user: actor.user_id,
            owners: None,
            write: false,
            admin: false,
        },
        "manager" => {
            // Everyone under the caller, recursively, through `manager_id`.
            let users = trellis_form::users::list(&state.db).await?;
            let mut reports: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
            for u in &users {
                if let Some(m) = u.manager_id {
                    reports.entry(m).or_default().push(u.id);
                }
            }
            let mut team = HashSet::from([actor.user_id]);
            let mut queue = vec![actor.user_id];
            while let Some(m) = queue.pop() {
                for r in reports.get(&m).into_iter().flatten() {
                    if team.insert(*r) {
                        queue.push(*r);
                    }
                }
            }
            Access {
                user: actor.user_id,
                owners: Some(team),
                write: true,
                admin: false,
            }
        }
        // sales_rep, and any role this server does not know, see only their own records.
        _ => Access {
            user: actor.user_id,
            owners: Some(HashSet::from([actor.user_id])),
            write: role == "sales_rep",
            admin: false,
        },
    })
}
