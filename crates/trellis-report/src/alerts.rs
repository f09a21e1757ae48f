//! Alerts: a stored query with a `compare` and a `flag` rule, evaluated on a schedule.
//!
//! When an evaluation finds flagged rows that differ from the last firing (another period, or
//! other rows), the alert fires: one row in `report_alert_firings` and one `alert.fired` event
//! in the transactional outbox (`events`, entity `report`), which the workflow engine can
//! trigger on. The state (when last checked, what last fired) lives in `report_alerts`, in the
//! same transaction, so a restart neither loses nor repeats a firing.

use crate::engine::{self, Visibility};
use crate::model::Reports;
use chrono::{DateTime, Utc};
use serde_json::{json, Value as Json};
use trellis_form::db::{Db, Sql, Value};
use trellis_form::model::{App, ColKind};
use trellis_form::Result;
use uuid::Uuid;

/// One firing.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct Firing {
    /// Firing id (also the event's record id).
    pub id: Uuid,
    /// Alert name.
    pub alert: String,
    /// When it fired.
    pub fired_at: DateTime<Utc>,
    /// The flagged rows, with the resolved ranges.
    pub rows: Json,
}

/// Evaluate every alert of `app` that is due at `now`; returns the firings.
pub async fn evaluate(
    db: &Db,
    app: &App,
    reports: &Reports,
    now: DateTime<Utc>,
) -> Result<Vec<Firing>> {
    let mut fired = vec![];
    for a in reports.alerts.values() {
        let mut sql = Sql::new(
            "SELECT \"last_checked_at\", \"last_key\" FROM \"report_alerts\" WHERE \"app\" = ",
        );
        sql.bind(Value::Text(app.key.clone()))
            .push(" AND \"alert\" = ")
            .bind(Value::Text(a.name.clone()));
        let state = db
            .fetch_optional(&sql, &[ColKind::DateTime, ColKind::Text])
            .await?;
        let (last_at, last_key) = match &state {
            Some(r) => (
                match r[0] {
                    Value::DateTime(t) => Some(t),
                    _ => None,
                },
                match &r[1] {
                    Value::Text(k) => Some(k.clone()),
                    _ => None,
                },
            ),
            None => (None, None),
        };
        if last_at.is_some_and(|t| now - t < a.every) {
            continue;
        }
        let plan = engine::plan(app, reports, &a.def.query, now, db.backend())?;
        let answer = engine::run(db, app, reports, &plan, &Visibility::default()).await?;
        let flagged: Vec<&serde_json::Map<String, Json>> = answer
            .rows
            .iter()
            .filter(|r| r.get("flag") == Some(&Json::Bool(true)))
            .collect();
        // The same flagged rows over the same period fire once.
        let key = (!flagged.is_empty()).then(|| {
            let dims: Vec<Json> = flagged
                .iter()
                .map(|r| {
                    json!(plan
                        .dims
                        .iter()
                        .map(|d| r.get(d).cloned().unwrap_or(Json::Null))
                        .collect::<Vec<_>>())
                })
                .collect();
            json!({"range": [answer.meta["from"], answer.meta["to"]], "rows": dims}).to_string()
        });
        let mut tx = db.begin().await?;
        let mut up = if state.is_some() {
            let mut u = Sql::new("UPDATE \"report_alerts\" SET \"last_checked_at\" = ");
            u.bind(Value::DateTime(now));
            if let Some(k) = &key {
                u.push(", \"last_key\" = ").bind(Value::Text(k.clone()));
            }
            u.push(" WHERE \"app\" = ")
                .bind(Value::Text(app.key.clone()))
                .push(" AND \"alert\" = ")
                .bind(Value::Text(a.name.clone()));
            u
        } else {
            let mut u = Sql::new("INSERT INTO \"report_alerts\" (\"app\", \"alert\", \"last_checked_at\", \"last_key\") VALUES (");
            u.bind(Value::Text(app.key.clone())).push(", ");
            u.bind(Value::Text(a.name.clone())).push(", ");
            u.bind(Value::DateTime(now)).push(", ");
            u.bind(
                key.clone()
                    .map(Value::Text)
                    .unwrap_or(Value::Null(ColKind::Text)),
            )
            .push(")");
            u
        };
        tx.execute(&up).await?;
        if key.is_some() && key != last_key {
            let id = Uuid::now_v7();
            let rows = json!({
                "alert": a.name,
                "label": a.label,
                "meta": answer.meta,
                "rows": flagged,
            });
            up = Sql::new("INSERT INTO \"report_alert_firings\" (\"id\", \"app\", \"alert\", \"fired_at\", \"rows\") VALUES (");
            up.bind(Value::Uuid(id)).push(", ");
            up.bind(Value::Text(app.key.clone())).push(", ");
            up.bind(Value::Text(a.name.clone())).push(", ");
            up.bind(Value::DateTime(now)).push(", ");
            up.bind(Value::Json(rows.clone())).push(")");
            tx.execute(&up).await?;
            up = Sql::new("INSERT INTO \"events\" (\"app\", \"entity\", \"record_id\", \"kind\", \"changed\", \"record\", \"at\") VALUES (");
            up.bind(Value::Text(app.key.clone())).push(", 'report', ");
            up.bind(Value::Uuid(id)).push(", 'alert.fired', ");
            up.bind(Value::Json(json!([]))).push(", ");
            up.bind(Value::Json(rows.clone())).push(", ");
            up.bind(Value::DateTime(now)).push(")");
            tx.execute(&up).await?;
            fired.push(Firing {
                id,
                alert: a.name.clone(),
                fired_at: now,
                rows,
            });
        }
        tx.commit().await?;
    }
    Ok(fired)
}

/// The latest firings of `app`'s alerts, newest first.
pub async fn firings(db: &Db, app: &str, limit: u32) -> Result<Vec<Firing>> {
    let mut sql = Sql::new("SELECT \"id\", \"alert\", \"fired_at\", \"rows\" FROM \"report_alert_firings\" WHERE \"app\" = ");
    sql.bind(Value::Text(app.into()))
        .push(" ORDER BY \"fired_at\" DESC, \"id\" DESC LIMIT ")
        .bind(Value::Int(i64::from(limit)));
    let kinds = [
        ColKind::Uuid,
        ColKind::Text,
        ColKind::DateTime,
        ColKind::Json,
    ];
    Ok(db
        .fetch_all(&sql, &kinds)
        .await?
        .into_iter()
        .filter_map(|r| match (&r[0], &r[1], &r[2], &r[3]) {
            (Value::Uuid(id), Value::Text(alert), Value::DateTime(at), Value::Json(rows)) => {
                Some(Firing {
                    id: *id,
                    alert: alert.clone(),
                    fired_at: *at,
                    rows: rows.clone(),
                })
            }
            _ => None,
        })
        .collect())
}
