//! Users and teams as data: who owns records, who manages whom, which team a rule assigns to.
//!
//! Authentication (passwords, sessions, roles) belongs to the server; the engines only need to
//! know that a user exists, who their manager is and which teams they are in.

use crate::db::{Db, Sql, Tx, Value};
use crate::error::{FormError, Problem, Result};
use crate::model::ColKind;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct User {
    /// Id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Email (unique).
    pub email: String,
    /// Direct manager.
    pub manager_id: Option<Uuid>,
    /// Inactive users cannot be assigned new records.
    pub active: bool,
    /// Administrators manage apps.
    pub is_admin: bool,
    /// Out of office: workflows skip this user when assigning records.
    pub out_of_office: bool,
}

/// Fields to create or change a user.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UserInput {
    /// Display name.
    pub name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Direct manager (null to clear).
    #[serde(default, with = "double_option")]
    pub manager_id: Option<Option<Uuid>>,
    /// Active flag.
    pub active: Option<bool>,
    /// Admin flag.
    pub is_admin: Option<bool>,
    /// Out-of-office flag (assignment skips the user).
    pub out_of_office: Option<bool>,
}

mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

const USER_COLS: &str =
    "\"id\", \"name\", \"email\", \"manager_id\", \"active\", \"is_admin\", \"out_of_office\"";
const USER_KINDS: [ColKind; 7] = [
    ColKind::Uuid,
    ColKind::Text,
    ColKind::Text,
    ColKind::Uuid,
    ColKind::Bool,
    ColKind::Bool,
    ColKind::Bool,
];

fn user(r: Vec<Value>) -> User {
    let text = |v: &Value| {
        if let Value::Text(s) = v {
            s.clone()
        } else {
            String::new()
        }
    };
    User {
        id: if let Value::Uuid(u) = r[0] {
            u
        } else {
            Uuid::nil()
        },
        name: text(&r[1]),
        email: text(&r[2]),
        manager_id: if let Value::Uuid(u) = r[3] {
            Some(u)
        } else {
            None
        },
        active: matches!(r[4], Value::Bool(true)),
        is_admin: matches!(r[5], Value::Bool(true)),
        out_of_office: matches!(r[6], Value::Bool(true)),
    }
}

/// Every user, by name.
pub async fn list(db: &Db) -> Result<Vec<User>> {
    let sql = Sql::new(format!(
        "SELECT {USER_COLS} FROM \"users\" ORDER BY \"name\", \"id\""
    ));
    Ok(db
        .fetch_all(&sql, &USER_KINDS)
        .await?
        .into_iter()
        .map(user)
        .collect())
}

/// One user.
pub async fn get(db: &Db, id: Uuid) -> Result<User> {
    let mut sql = Sql::new(format!("SELECT {USER_COLS} FROM \"users\" WHERE \"id\" = "));
    sql.bind(Value::Uuid(id));
    db.fetch_optional(&sql, &USER_KINDS)
        .await?
        .map(user)
        .ok_or(FormError::NotFound("user"))
}

/// A user by email.
pub async fn by_email(db: &Db, email: &str) -> Result<Option<User>> {
    let mut sql = Sql::new(format!(
        "SELECT {USER_COLS} FROM \"users\" WHERE lower(\"email\") = lower("
    ));
    sql.bind(Value::Text(email.into())).push(")");
    Ok(db.fetch_optional(&sql, &USER_KINDS).await?.map(user))
}

async fn get_in(tx: &mut Tx, id: Uuid) -> Result<Option<User>> {
    let mut sql = Sql::new(format!("SELECT {USER_COLS} FROM \"users\" WHERE \"id\" = "));
    sql.bind(Value::Uuid(id));
    Ok(tx.fetch_optional(&sql, &USER_KINDS).await?.map(user))
}

async fn check(tx: &mut Tx, id: Option<Uuid>, input: &UserInput) -> Result<()> {
    let mut problems = vec![];
    if let Some(name) = &input.name {
        if name.trim().is_empty() || name.len() > 200 {
            problems.push(Problem::new(
                "/name",
                "bad_value",
                "A name is 1 to 200 characters long.",
            ));
        }
    }
    if let Some(email) = &input.email {
        let ok = email.len() <= 254
            && email
                .split_once('@')
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('@'));
        if !ok {
            problems.push(Problem::new(
                "/email",
                "format",
                "Email must be an address such as name@example.com.",
            ));
        } else {
            let mut sql = Sql::new("SELECT \"id\" FROM \"users\" WHERE lower(\"email\") = lower(");
            sql.bind(Value::Text(email.clone())).push(")");
            if let Some(Value::Uuid(other)) = tx
                .fetch_optional(&sql, &[ColKind::Uuid])
                .await?
                .map(|r| r[0].clone())
            {
                if Some(other) != id {
                    problems.push(Problem::new(
                        "/email",
                        "unique",
                        "Another user already has this email.",
                    ));
                }
            }
        }
    }
    if let Some(Some(manager)) = input.manager_id {
        // The manager must exist, and the chain above them must not lead back to this user.
        let mut cursor = Some(manager);
        let mut hops = 0;
        while let Some(m) = cursor {
            if Some(m) == id {
                problems.push(Problem::new(
                    "/manager_id",
                    "cycle",
                    "A user cannot (indirectly) manage their own manager.",
                ));
                break;
            }
            match get_in(tx, m).await? {
                Some(u) => cursor = u.manager_id,
                None => {
                    if m == manager {
                        problems.push(Problem::new(
                            "/manager_id",
                            "not_found",
                            "The manager is not an existing user.",
                        ));
                    }
                    break;
                }
            }
            hops += 1;
            if hops > 100 {
                break;
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(FormError::Invalid(problems))
    }
}

/// Create a user.
pub async fn create(tx: &mut Tx, input: &UserInput, now: DateTime<Utc>) -> Result<User> {
    let mut problems = vec![];
    if input.name.is_none() {
        problems.push(Problem::new("/name", "required", "Name is required."));
    }
    if input.email.is_none() {
        problems.push(Problem::new("/email", "required", "Email is required."));
    }
    if !problems.is_empty() {
        return Err(FormError::Invalid(problems));
    }
    check(tx, None, input).await?;
    let id = Uuid::now_v7();
    let mut sql = Sql::new(format!(
        "INSERT INTO \"users\" ({USER_COLS}, \"created_at\") VALUES ("
    ));
    sql.bind(Value::Uuid(id)).push(", ");
    sql.bind(Value::Text(input.name.clone().unwrap_or_default()))
        .push(", ");
    sql.bind(Value::Text(input.email.clone().unwrap_or_default()))
        .push(", ");
    sql.bind(Value::opt_uuid(input.manager_id.flatten()))
        .push(", ");
    sql.bind(Value::Bool(input.active.unwrap_or(true)))
        .push(", ");
    sql.bind(Value::Bool(input.is_admin.unwrap_or(false)))
        .push(", ");
    sql.bind(Value::Bool(input.out_of_office.unwrap_or(false)))
        .push(", ");
    sql.bind(Value::DateTime(now)).push(")");
    tx.execute(&sql).await?;
    Ok(get_in(tx, id).await?.expect("just inserted"))
}

/// Change a user.
pub async fn update(tx: &mut Tx, id: Uuid, input: &UserInput) -> Result<User> {
    if get_in(tx, id).await?.is_none() {
        return Err(FormError::NotFound("user"));
    }
    check(tx, Some(id), input).await?;
    let mut sql = Sql::new("UPDATE \"users\" SET \"id\" = \"id\"");
    if let Some(n) = &input.name {
        sql.push(", \"name\" = ").bind(Value::Text(n.clone()));
    }
    if let Some(e) = &input.email {
        sql.push(", \"email\" = ").bind(Value::Text(e.clone()));
    }
    if let Some(m) = input.manager_id {
        sql.push(", \"manager_id\" = ").bind(Value::opt_uuid(m));
    }
    if let Some(a) = input.active {
        sql.push(", \"active\" = ").bind(Value::Bool(a));
    }
    if let Some(a) = input.is_admin {
        sql.push(", \"is_admin\" = ").bind(Value::Bool(a));
    }
    if let Some(a) = input.out_of_office {
        sql.push(", \"out_of_office\" = ").bind(Value::Bool(a));
    }
    sql.push(" WHERE \"id\" = ").bind(Value::Uuid(id));
    tx.execute(&sql).await?;
    Ok(get_in(tx, id).await?.expect("exists"))
}

/// A team.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Team {
    /// Id.
    pub id: Uuid,
    /// Stable key (`east_sales`).
    pub key: String,
    /// Display name.
    pub name: String,
    /// Team lead.
    pub lead_id: Option<Uuid>,
    /// Members, by id.
    pub members: Vec<Uuid>,
}

/// Fields to create or change a team.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TeamInput {
    /// Stable key.
    pub key: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Team lead.
    #[serde(default, with = "double_option")]
    pub lead_id: Option<Option<Uuid>>,
    /// The full member list (replaces the current one).
    pub members: Option<Vec<Uuid>>,
}

/// Every team.
pub async fn teams(db: &Db) -> Result<Vec<Team>> {
    let sql =
        Sql::new("SELECT \"id\", \"key\", \"name\", \"lead_id\" FROM \"teams\" ORDER BY \"key\"");
    let rows = db
        .fetch_all(
            &sql,
            &[ColKind::Uuid, ColKind::Text, ColKind::Text, ColKind::Uuid],
        )
        .await?;
    let members =
        Sql::new("SELECT \"team_id\", \"user_id\" FROM \"team_members\" ORDER BY \"user_id\"");
    let members = db
        .fetch_all(&members, &[ColKind::Uuid, ColKind::Uuid])
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let id = if let Value::Uuid(u) = r[0] {
                u
            } else {
                Uuid::nil()
            };
            Team {
                id,
                key: if let Value::Text(s) = &r[1] {
                    s.clone()
                } else {
                    String::new()
                },
                name: if let Value::Text(s) = &r[2] {
                    s.clone()
                } else {
                    String::new()
                },
                lead_id: if let Value::Uuid(u) = r[3] {
                    Some(u)
                } else {
                    None
                },
                members: members
                    .iter()
                    .filter(|m| m[0] == Value::Uuid(id))
                    .filter_map(|m| {
                        if let Value::Uuid(u) = m[1] {
                            Some(u)
                        } else {
                            None
                        }
                    })
                    .collect(),
            }
        })
        .collect())
}

/// Create or replace a team by key (members replaced as a whole).
pub async fn upsert_team(tx: &mut Tx, input: &TeamInput, now: DateTime<Utc>) -> Result<Uuid> {
    let mut problems = vec![];
    let key = input.key.clone().unwrap_or_default();
    if key.is_empty()
        || key.len() > 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        problems.push(Problem::new(
            "/key",
            "bad_key",
            "A team key is 1 to 64 characters of a-z, 0-9 and _.",
        ));
    }
    let name = input.name.clone();
    let mut users = input.members.clone().unwrap_or_default();
    if let Some(Some(l)) = input.lead_id {
        users.push(l);
    }
    for (i, u) in users.iter().enumerate() {
        if get_in(tx, *u).await?.is_none() {
            let path = if i < input.members.as_ref().map_or(0, Vec::len) {
                format!("/members/{i}")
            } else {
                "/lead_id".into()
            };
            problems.push(Problem::new(
                path,
                "not_found",
                format!("User {u} does not exist."),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(FormError::Invalid(problems));
    }
    let mut sql = Sql::new("SELECT \"id\" FROM \"teams\" WHERE \"key\" = ");
    sql.bind(Value::Text(key.clone()));
    let existing = tx.fetch_optional(&sql, &[ColKind::Uuid]).await?;
    let id = match existing.map(|r| r[0].clone()) {
        Some(Value::Uuid(id)) => {
            // Only what was sent changes.
            let mut sql = Sql::new("UPDATE \"teams\" SET \"key\" = \"key\"");
            if let Some(n) = name {
                sql.push(", \"name\" = ").bind(Value::Text(n));
            }
            if let Some(l) = input.lead_id {
                sql.push(", \"lead_id\" = ").bind(Value::opt_uuid(l));
            }
            sql.push(" WHERE \"id\" = ").bind(Value::Uuid(id));
            tx.execute(&sql).await?;
            id
        }
        _ => {
            let id = Uuid::now_v7();
            let mut sql = Sql::new("INSERT INTO \"teams\" (\"id\", \"key\", \"name\", \"lead_id\", \"created_at\") VALUES (");
            sql.bind(Value::Uuid(id)).push(", ");
            sql.bind(Value::Text(key.clone())).push(", ");
            sql.bind(Value::Text(name.unwrap_or(key))).push(", ");
            sql.bind(Value::opt_uuid(input.lead_id.flatten()))
                .push(", ");
            sql.bind(Value::DateTime(now)).push(")");
            tx.execute(&sql).await?;
            id
        }
    };
    if let Some(members) = &input.members {
        let mut sql = Sql::new("DELETE FROM \"team_members\" WHERE \"team_id\" = ");
        sql.bind(Value::Uuid(id));
        tx.execute(&sql).await?;
        let mut seen = std::collections::HashSet::new();
        for m in members.iter().filter(|m| seen.insert(**m)) {
            let mut sql =
                Sql::new("INSERT INTO \"team_members\" (\"team_id\", \"user_id\") VALUES (");
            sql.bind(Value::Uuid(id))
                .push(", ")
                .bind(Value::Uuid(*m))
                .push(")");
            tx.execute(&sql).await?;
        }
    }
    Ok(id)
}
