//! The audit log: administrative changes (app definitions, app members and their roles, users,
//! teams, tokens), written in the same transaction as the change so that neither exists without
//! the other. Rows are only ever added. Secrets (passwords, tokens) are never in `detail`.

use crate::db::{Db, Sql, Tx, Value};
use crate::model::ColKind;
use crate::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value as Json;
use uuid::Uuid;

/// One change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// UUIDv7: id order is time order.
    pub id: Uuid,
    /// When.
    #[serde(serialize_with = "ser_at")]
    pub at: DateTime<Utc>,
    /// Who (None: the command line or the server itself).
    pub actor: Option<Uuid>,
    /// The app concerned, if any.
    pub app: Option<String>,
    /// What: `app.import`, `member.set`, `member.remove`, `user.create`, `user.update`,
    /// `team.upsert`, `token.create`, `token.revoke`.
    pub action: String,
    /// The thing changed (an app key, a user or token id, a team key).
    pub target: String,
    /// The change itself (never a secret).
    pub detail: Json,
}

fn ser_at<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> std::result::Result<S::Ok, S::Error> {
    crate::values::datetime_json(t).serialize(s)
}

/// Add an entry inside the change's transaction.
pub async fn record(
    tx: &mut Tx,
    now: DateTime<Utc>,
    actor: Option<Uuid>,
    app: Option<&str>,
    action: &str,
    target: &str,
    detail: Json,
) -> Result<()> {
    let mut sql = Sql::new("INSERT INTO \"audit_log\" (\"id\", \"at\", \"actor\", \"app\", \"action\", \"target\", \"detail\") VALUES (");
    sql.bind(Value::Uuid(Uuid::now_v7())).push(", ");
    sql.bind(Value::DateTime(now)).push(", ");
    sql.bind(Value::opt_uuid(actor)).push(", ");
    sql.bind(match app {
        Some(a) => Value::Text(a.to_owned()),
        None => Value::Null(ColKind::Text),
    })
    .push(", ");
    sql.bind(Value::Text(action.to_owned())).push(", ");
    sql.bind(Value::Text(target.to_owned())).push(", ");
    sql.bind(Value::Json(detail)).push(")");
    tx.execute(&sql).await?;
    Ok(())
}

/// Entries newest first, optionally of one app, older than `before` (an entry id), at most
/// `limit`.
pub async fn list(
    db: &Db,
    app: Option<&str>,
    before: Option<Uuid>,
    limit: u32,
) -> Result<Vec<Entry>> {
    let mut sql = Sql::new("SELECT \"id\", \"at\", \"actor\", \"app\", \"action\", \"target\", \"detail\" FROM \"audit_log\" WHERE 1 = 1");
    if let Some(a) = app {
        sql.push(" AND \"app\" = ").bind(Value::Text(a.to_owned()));
    }
    if let Some(b) = before {
        sql.push(" AND \"id\" < ").bind(Value::Uuid(b));
    }
    sql.push(&format!(
        " ORDER BY \"id\" DESC LIMIT {}",
        limit.clamp(1, 1000)
    ));
    let rows = db
        .fetch_all(
            &sql,
            &[
                ColKind::Uuid,
                ColKind::DateTime,
                ColKind::Uuid,
                ColKind::Text,
                ColKind::Text,
                ColKind::Text,
                ColKind::Json,
            ],
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let text = |v: &Value| match v {
                Value::Text(s) => Some(s.clone()),
                _ => None,
            };
            Some(Entry {
                id: match r[0] {
                    Value::Uuid(u) => u,
                    _ => return None,
                },
                at: match r[1] {
                    Value::DateTime(t) => t,
                    _ => return None,
                },
                actor: match r[2] {
                    Value::Uuid(u) => Some(u),
                    _ => None,
                },
                app: text(&r[3]),
                action: text(&r[4])?,
                target: text(&r[5])?,
                detail: match &r[6] {
                    Value::Json(j) => j.clone(),
                    _ => Json::Null,
                },
            })
        })
        .collect())
}
