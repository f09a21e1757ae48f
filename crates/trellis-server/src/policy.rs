//! The one policy function: what a caller may see and do in an app.
//!
//! A caller's role in an app (`app_members`) names one of the app's compiled roles
//! ([`trellis_form::roles`]): the built-ins `admin` (every record, and the app's members),
//! `manager` (records owned by themselves or anyone under them in the management hierarchy,
//! recursively), `sales_rep` (their own records), `viewer` (every record, read only), as shipped
//! or as the app redefines them, and the app's own roles with per-entity create/read/update/delete
//! and per-field hidden / read-only. An administrator user with an admin-scope token acts as the
//! app's `admin` role. A user without a role (or with a role the app no longer defines) does not
//! see the app at all (404), and a record outside the caller's scope is a 404 too, so ids do not
//! leak.

use crate::auth::Actor;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use serde_json::{json, Value as Json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use trellis_form::db::{Sql, Value};
use trellis_form::model::ColKind;
use trellis_form::roles::{EntityPerm, Role, Scope};
use trellis_form::Problem;
use uuid::Uuid;

/// What the caller wants to do with records of an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Create records.
    Create,
    /// List, read, report on.
    Read,
    /// Change records.
    Update,
    /// Delete records.
    Delete,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Read => "read",
            Op::Update => "change",
            Op::Delete => "delete",
        }
    }
}

/// What the caller may do in one app.
#[derive(Debug, Clone)]
pub struct Access {
    /// The caller.
    pub user: Uuid,
    /// The caller's role.
    pub role: Arc<Role>,
    /// Owners whose records the caller sees; None means every record.
    pub owners: Option<HashSet<Uuid>>,
    /// Whether the caller may create, change or delete anything at all.
    pub write: bool,
    /// Whether the caller administers the app (members, audit log).
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

    /// Refuse callers whose role writes nothing.
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

    /// The role's permissions on `entity`.
    pub fn perm(&self, entity: &str) -> &EntityPerm {
        self.role.entity(entity)
    }

    /// Refuse `op` on `entity` unless the role grants it (403 naming role, verb and entity).
    pub fn require(&self, entity: &str, op: Op) -> ApiResult<()> {
        let p = self.perm(entity);
        let ok = match op {
            Op::Create => p.create,
            Op::Read => p.read,
            Op::Update => p.update,
            Op::Delete => p.delete,
        };
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                "forbidden",
                format!(
                    "Your role `{}` may not {} `{entity}` records.",
                    self.role.key,
                    op.verb()
                ),
            ))
        }
    }

    /// Mass assignment: the fields of `input` (a record body, under `path`) the caller may not
    /// write, each a problem naming the field.
    pub fn unwritable(&self, entity: &str, input: &Json, path: &str) -> Vec<Problem> {
        let p = self.perm(entity);
        let Some(obj) = input.as_object() else {
            return vec![];
        };
        obj.keys()
            .filter(|k| !p.writes(k))
            .map(|k| {
                let (code, why) = if p.hidden.contains(k) {
                    ("hidden_field", "is hidden from")
                } else {
                    ("read_only_field", "is read-only for")
                };
                Problem::new(
                    format!("{path}/{}", trellis_form::error::pointer_segment(k)),
                    code,
                    format!("`{k}` {why} your role `{}`; leave it out.", self.role.key),
                )
            })
            .collect()
    }

    /// Drop the fields hidden from the caller out of a record's JSON form.
    pub fn redact(&self, entity: &str, mut record: Json) -> Json {
        let hidden = &self.perm(entity).hidden;
        if !hidden.is_empty() {
            if let Some(obj) = record.as_object_mut() {
                obj.retain(|k, _| !hidden.contains(base_field(k)));
            }
        }
        record
    }

    /// Refuse a field (of a filter, sort, dimension or metric) hidden from the caller.
    pub fn readable_field(&self, entity: &str, field: &str, path: &str) -> ApiResult<()> {
        if self.perm(entity).hidden.contains(base_field(field)) {
            Err(forbidden_field(&self.role.key, entity, field, path))
        } else {
            Ok(())
        }
    }
}

/// The field a column belongs to: `stage__changed_at`, `stage__entered_won` and
/// `amount__currency` belong to `stage` and `amount` (field keys never contain `__`).
fn base_field(key: &str) -> &str {
    key.split("__").next().unwrap_or(key)
}

/// A 403 naming a hidden field and where the request used it.
pub fn forbidden_field(role: &str, entity: &str, field: &str, path: &str) -> ApiError {
    ApiError::new(
        "forbidden",
        format!("`{entity}.{field}` is hidden from your role `{role}`."),
    )
    .with_errors(vec![Problem::new(
        path,
        "hidden_field",
        format!("`{field}` is hidden from your role `{role}`."),
    )])
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
    let loaded = state.app(app)?;
    let roles = &loaded.app.roles;
    let key = if actor.is_admin {
        "admin".to_owned()
    } else {
        match role(state, app, actor.user_id).await? {
            Some(r) => r,
            None => return Err(ApiError::not_found(format!("app `{app}` does not exist"))),
        }
    };
    let Some(role) = roles.get(&key).cloned() else {
        // A role the app no longer defines grants nothing.
        return Err(ApiError::not_found(format!("app `{app}` does not exist")));
    };
    let owners = match role.scope {
        Scope::All => None,
        Scope::Own => Some(HashSet::from([actor.user_id])),
        Scope::Team => {
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
            Some(team)
        }
    };
    Ok(Access {
        user: actor.user_id,
        write: role.writes_anything(),
        admin: role.admin || actor.is_admin,
        owners,
        role,
    })
}

/// The roles of an app in their JSON form.
pub fn roles_json(roles: &trellis_form::roles::Roles) -> Json {
    json!(roles
        .by_key
        .values()
        .map(|r| r.to_json())
        .collect::<Vec<_>>())
}
