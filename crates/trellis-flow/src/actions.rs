//! The actions that only touch the database, shared by inline and queued runs: they take the
//! transaction they run in, so their writes commit together with the step that records them.

use crate::compile::{tpl_name, Workflow};
use crate::def::{Action, AssignRule, NodeDef, Recipient, Strategy};
use crate::template::is_template;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value as Json};
use trellis_form::db::{Sql, Tx, Value};
use trellis_form::def::{FieldType, StageKind};
use trellis_form::model::{App, ColKind, Entity};
use trellis_form::store::{self, WriteCtx};
use uuid::Uuid;

/// Everything an action needs besides the transaction.
pub struct Env<'a> {
    /// The app.
    pub app: &'a App,
    /// The workflow version being run.
    pub wf: &'a Workflow,
    /// The run.
    pub run_id: Uuid,
    /// The write context of the run's writes (depth one more than the trigger's).
    pub write: WriteCtx,
}

impl Env<'_> {
    /// The time of this step.
    pub fn now(&self) -> DateTime<Utc> {
        self.write.now
    }
}

/// What a node did: the output it leaves by, and what it records in the run log.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Output name (`ok`, `true`, …).
    pub output: String,
    /// Recorded as the step's output and visible to later nodes as `steps.<id>`.
    pub data: Json,
}

impl Outcome {
    fn ok(data: Json) -> Self {
        Outcome {
            output: "ok".into(),
            data,
        }
    }
}

/// Look a dotted path (`record.amount`) up in the context.
fn lookup<'a>(ctx: &'a Json, path: &str) -> Option<&'a Json> {
    let mut cur = ctx;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    Some(cur)
}

/// A template that is exactly one `{{ a.b.c }}` copies the JSON value itself (a money amount
/// with its currency, a list), instead of its text.
fn whole_reference(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    inner
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        .then_some(inner)
}

/// Render a templated string value.
pub fn render_str(wf: &Workflow, name: &str, src: &str, ctx: &Json) -> Result<String, String> {
    if is_template(src) {
        wf.templates.render(name, ctx)
    } else {
        Ok(src.to_owned())
    }
}

/// Render the `values` of an update or create into a record patch, typed by the fields.
pub fn render_values(
    wf: &Workflow,
    base: &str,
    e: &Entity,
    values: &Map<String, Json>,
    ctx: &Json,
) -> Result<Map<String, Json>, String> {
    let mut out = Map::new();
    for (k, v) in values {
        let name = tpl_name(&[base, &trellis_form::error::pointer_segment(k)]);
        let value = match v {
            Json::String(s) if is_template(s) => {
                if let Some(path) = whole_reference(s) {
                    lookup(ctx, path).cloned().unwrap_or(Json::Null)
                } else {
                    let text = wf.templates.render(&name, ctx)?;
                    coerce(e, k, text)
                }
            }
            other => other.clone(),
        };
        out.insert(k.clone(), value);
    }
    Ok(out)
}

fn coerce(e: &Entity, key: &str, text: String) -> Json {
    let t = text.trim();
    if t.is_empty() {
        return Json::Null;
    }
    match e.field(key).map(|f| f.ty) {
        Some(FieldType::Integer) => t.parse::<i64>().map(Json::from).unwrap_or(json!(t)),
        Some(FieldType::Boolean) => match t {
            "true" => json!(true),
            "false" => json!(false),
            _ => json!(t),
        },
        Some(FieldType::Multiselect) => Json::Array(
            t.split(',')
                .map(|x| json!(x.trim()))
                .filter(|x| x != &json!(""))
                .collect(),
        ),
        _ => json!(t),
    }
}

/// The record id of the run's context.
pub fn record_id(ctx: &Json) -> Option<Uuid> {
    ctx.pointer("/record/id")
        .and_then(Json::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
}

/// Run a database-only node in `tx`. Errors are messages for the run log.
pub async fn run_db_node(
    tx: &mut Tx,
    env: &Env<'_>,
    idx: usize,
    node: &NodeDef,
    ctx: &mut Json,
) -> Result<Outcome, String> {
    let i = idx.to_string();
    // Schedule runs have no trigger entity; only record-less actions work there.
    let trigger_entity = env.app.entity(env.wf.def.trigger.entity()).ok();
    let entity = || {
        trigger_entity
            .ok_or_else(|| "this run has no record (its trigger has no entity)".to_owned())
    };
    match &node.action {
        Action::Condition { .. } => {
            let c = env
                .wf
                .condition(&crate::compile::cond_name(&["nodes", &i, "condition"]));
            let v = c.eval(ctx)?;
            Ok(Outcome {
                output: v.to_string(),
                data: json!({ "result": v }),
            })
        }
        Action::Switch { cases } => {
            for (j, case) in cases.iter().enumerate() {
                let name =
                    crate::compile::cond_name(&["nodes", &i, "cases", &j.to_string(), "when"]);
                if env.wf.condition(&name).eval(ctx)? {
                    return Ok(Outcome {
                        output: case.output.clone(),
                        data: json!({ "case": case.output }),
                    });
                }
            }
            Ok(Outcome {
                output: "default".into(),
                data: json!({ "case": "default" }),
            })
        }
        Action::UpdateRecord { values } => {
            let id = record_id(ctx).ok_or("the run has no record to update")?;
            let entity = entity()?;
            let patch = render_values(env.wf, &format!("nodes/{i}/values"), entity, values, ctx)?;
            let r = store::update(
                tx,
                env.app,
                entity,
                id,
                &Json::Object(patch.clone()),
                None,
                &env.write,
            )
            .await
            .map_err(describe)?;
            ctx["record"] = r.to_json();
            Ok(Outcome::ok(json!({ "changed": patch })))
        }
        Action::CreateRecord {
            entity: target,
            values,
        } => {
            let te = env.app.entity(target).map_err(|e| e.to_string())?;
            let input = render_values(env.wf, &format!("nodes/{i}/values"), te, values, ctx)?;
            let r = store::create(tx, env.app, te, &Json::Object(input), &env.write)
                .await
                .map_err(describe)?;
            Ok(Outcome::ok(
                json!({ "entity": target, "id": r.meta.id, "record": r.to_json() }),
            ))
        }
        Action::AssignOwner {
            rules,
            fallback,
            notify,
        } => {
            let id = record_id(ctx).ok_or("the run has no record to assign")?;
            let entity = entity()?;
            let mut tried = vec![];
            let mut chosen: Option<(Uuid, String)> = None;
            for (j, r) in rules.iter().enumerate() {
                let rp = format!("nodes/{i}/rules/{j}");
                if let Some(_w) = &r.when {
                    if !env.wf.condition(&format!("{rp}/when")).eval(ctx)? {
                        continue;
                    }
                }
                let label = r.name.clone().unwrap_or_else(|| format!("rule {}", j + 1));
                match pick(tx, env, entity, r).await? {
                    Ok((u, how)) => {
                        chosen = Some((u, format!("{label} matched; {how}")));
                        break;
                    }
                    Err(why) => tried.push(format!("{label} matched but {why}")),
                }
            }
            if chosen.is_none() {
                if let Some(f) = fallback {
                    match pick(tx, env, entity, f).await? {
                        Ok((u, how)) => {
                            let lead = if tried.is_empty() {
                                "no rule matched".to_owned()
                            } else {
                                tried.join("; ")
                            };
                            chosen = Some((u, format!("{lead}; fallback: {how}")))
                        }
                        Err(why) => tried.push(format!("fallback: {why}")),
                    }
                }
            }
            let Some((owner, reason)) = chosen else {
                return Err(format!(
                    "nobody could be assigned: {}",
                    if tried.is_empty() {
                        "no rule matched and there is no fallback".to_owned()
                    } else {
                        tried.join("; ")
                    }
                ));
            };
            let r = store::update(
                tx,
                env.app,
                entity,
                id,
                &json!({ "owner": owner }),
                None,
                &env.write,
            )
            .await
            .map_err(describe)?;
            ctx["record"] = r.to_json();
            if *notify {
                let title = format!("New {} assigned to you", entity.label.to_lowercase());
                let name = r
                    .fields
                    .get("name")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_owned();
                insert_notification(tx, env, owner, &title, &name, Some(&entity.key), Some(id))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(Outcome::ok(json!({ "owner": owner, "reason": reason })))
        }
        Action::Notify {
            to, title, body, ..
        } => {
            let users = recipients(tx, env, to, ctx).await?;
            let t = render_str(env.wf, &format!("nodes/{i}/title"), title, ctx)?;
            let b = render_str(env.wf, &format!("nodes/{i}/body"), body, ctx)?;
            let rid = record_id(ctx);
            for u in &users {
                insert_notification(
                    tx,
                    env,
                    *u,
                    &t,
                    &b,
                    trigger_entity.map(|e| e.key.as_str()),
                    rid,
                )
                .await
                .map_err(|e| e.to_string())?;
            }
            Ok(Outcome::ok(
                json!({ "to": users, "title": t, "in_app": users.len() }),
            ))
        }
        Action::RenderDocument {
            name, content_type, ..
        } => {
            let rid = record_id(ctx).ok_or("the run has no record to attach a document to")?;
            let entity = entity()?;
            let n = render_str(env.wf, &format!("nodes/{i}/name"), name, ctx)?;
            let body = env
                .wf
                .templates
                .render(&format!("nodes/{i}/template"), ctx)?;
            let doc = Uuid::now_v7();
            let ct = content_type
                .clone()
                .unwrap_or_else(|| "text/markdown".into());
            let mut sql = Sql::new("INSERT INTO \"documents\" (\"id\", \"app\", \"entity\", \"record_id\", \"name\", \"content_type\", \"body\", \"run_id\", \"created_at\") VALUES (");
            sql.bind(Value::Uuid(doc)).push(", ");
            sql.bind(Value::Text(env.app.key.clone())).push(", ");
            sql.bind(Value::Text(entity.key.clone())).push(", ");
            sql.bind(Value::Uuid(rid)).push(", ");
            sql.bind(Value::Text(n.clone())).push(", ");
            sql.bind(Value::Text(ct)).push(", ");
            sql.bind(Value::Text(body.clone())).push(", ");
            sql.bind(Value::Uuid(env.run_id)).push(", ");
            sql.bind(Value::DateTime(env.now())).push(")");
            tx.execute(&sql).await.map_err(|e| e.to_string())?;
            Ok(Outcome::ok(
                json!({ "document": doc, "name": n, "bytes": body.len() }),
            ))
        }
        other => Err(format!(
            "the node type `{}` does not run in a database step",
            other.kind()
        )),
    }
}

fn describe(e: trellis_form::FormError) -> String {
    use trellis_form::FormError;
    match &e {
        FormError::Invalid(ps) | FormError::Conflict(ps) => {
            let parts: Vec<String> = ps
                .iter()
                .map(|p| format!("{} ({})", p.message, p.path))
                .collect();
            format!("{e}: {}", parts.join("; "))
        }
        _ => e.to_string(),
    }
}

/// One in-app notification, written in the run's transaction.
pub(crate) async fn insert_notification(
    tx: &mut Tx,
    env: &Env<'_>,
    user: Uuid,
    title: &str,
    body: &str,
    entity: Option<&str>,
    record: Option<Uuid>,
) -> trellis_form::Result<()> {
    let mut sql = Sql::new("INSERT INTO \"notifications\" (\"id\", \"app\", \"user_id\", \"title\", \"body\", \"entity\", \"record_id\", \"run_id\", \"created_at\") VALUES (");
    sql.bind(Value::Uuid(Uuid::now_v7())).push(", ");
    sql.bind(Value::Text(env.app.key.clone())).push(", ");
    sql.bind(Value::Uuid(user)).push(", ");
    sql.bind(Value::Text(title.to_owned())).push(", ");
    sql.bind(Value::Text(body.to_owned())).push(", ");
    sql.bind(
        entity
            .map(|e| Value::Text(e.to_owned()))
            .unwrap_or(Value::Null(ColKind::Text)),
    )
    .push(", ");
    sql.bind(Value::opt_uuid(record)).push(", ");
    sql.bind(Value::Uuid(env.run_id)).push(", ");
    sql.bind(Value::DateTime(env.now())).push(")");
    tx.execute(&sql).await?;
    Ok(())
}

async fn user_by_email(tx: &mut Tx, email: &str) -> Result<Option<(Uuid, bool)>, String> {
    let mut sql = Sql::new(
        "SELECT \"id\", \"active\", \"out_of_office\" FROM \"users\" WHERE lower(\"email\") = lower(",
    );
    sql.bind(Value::Text(email.to_owned())).push(")");
    let row = tx
        .fetch_optional(&sql, &[ColKind::Uuid, ColKind::Bool, ColKind::Bool])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.and_then(|r| match (&r[0], &r[1], &r[2]) {
        (Value::Uuid(u), Value::Bool(active), Value::Bool(ooo)) => Some((*u, *active && !*ooo)),
        _ => None,
    }))
}

/// Members of team `key`: (id, available), ordered by id.
async fn team_members(tx: &mut Tx, key: &str) -> Result<Option<Vec<(Uuid, bool)>>, String> {
    let mut sql = Sql::new("SELECT \"id\" FROM \"teams\" WHERE \"key\" = ");
    sql.bind(Value::Text(key.to_owned()));
    let Some(team) = tx
        .fetch_optional(&sql, &[ColKind::Uuid])
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let mut sql = Sql::new("SELECT u.\"id\", u.\"active\", u.\"out_of_office\" FROM \"team_members\" m JOIN \"users\" u ON u.\"id\" = m.\"user_id\" WHERE m.\"team_id\" = ");
    sql.bind(team[0].clone()).push(" ORDER BY u.\"id\"");
    let rows = tx
        .fetch_all(&sql, &[ColKind::Uuid, ColKind::Bool, ColKind::Bool])
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(
        rows.into_iter()
            .filter_map(|r| match (&r[0], &r[1], &r[2]) {
                (Value::Uuid(u), Value::Bool(a), Value::Bool(o)) => Some((*u, *a && !*o)),
                _ => None,
            })
            .collect(),
    ))
}

/// Apply one rule: a user, or a member of a team by its strategy. `Ok(Err(why))` when the rule
/// cannot place the record (nobody available).
async fn pick(
    tx: &mut Tx,
    env: &Env<'_>,
    entity: &Entity,
    r: &AssignRule,
) -> Result<Result<(Uuid, String), String>, String> {
    if let Some(email) = &r.user {
        return Ok(match user_by_email(tx, email).await? {
            Some((u, true)) => Ok((u, format!("user {email}"))),
            Some((_, false)) => Err(format!("{email} is out of office or inactive")),
            None => Err(format!("there is no user {email}")),
        });
    }
    let key = r.team.as_deref().unwrap_or_default();
    let Some(members) = team_members(tx, key).await? else {
        return Ok(Err(format!("there is no team `{key}`")));
    };
    let available: Vec<Uuid> = members.iter().filter(|m| m.1).map(|m| m.0).collect();
    let skipped = members.len() - available.len();
    if available.is_empty() {
        return Ok(Err(format!(
            "nobody in team `{key}` is available ({} member(s), all out of office or inactive)",
            members.len()
        )));
    }
    let note = if skipped > 0 {
        format!(", {skipped} unavailable member(s) skipped")
    } else {
        String::new()
    };
    match r.strategy {
        Strategy::RoundRobin => {
            // One counter per team, advanced in the run's transaction: fair across restarts and
            // across instances sharing the database (the row lock orders concurrent turns).
            let mut sql =
                Sql::new("INSERT INTO \"flow_counters\" (\"app\", \"key\", \"value\") VALUES (");
            sql.bind(Value::Text(env.app.key.clone())).push(", ");
            sql.bind(Value::Text(format!("round_robin:{key}")))
                .push(", 1) ON CONFLICT (\"app\", \"key\") DO UPDATE SET \"value\" = \"flow_counters\".\"value\" + 1 RETURNING \"value\"");
            let row = tx
                .fetch_optional(&sql, &[ColKind::Int])
                .await
                .map_err(|e| e.to_string())?;
            let turn = match row.as_ref().map(|r| &r[0]) {
                Some(Value::Int(n)) => *n,
                _ => 1,
            };
            let u = available[((turn - 1).rem_euclid(available.len() as i64)) as usize];
            Ok(Ok((
                u,
                format!("team `{key}` round-robin turn {turn}{note}"),
            )))
        }
        Strategy::LeastOpen => {
            let open: Vec<String> = entity
                .stage()
                .map(|sf| {
                    sf.stages
                        .iter()
                        .filter(|s| s.kind == StageKind::Open)
                        .map(|s| s.key.clone())
                        .collect()
                })
                .unwrap_or_default();
            let mut sql = Sql::new(format!(
                "SELECT \"owner\", COUNT(*) FROM {} WHERE \"owner\" IN (",
                trellis_form::db::quote(&entity.table)
            ));
            for (n, u) in available.iter().enumerate() {
                if n > 0 {
                    sql.push(", ");
                }
                sql.bind(Value::Uuid(*u));
            }
            sql.push(")");
            if let Some(sf) = entity.stage() {
                sql.push(&format!(" AND {} IN (", trellis_form::db::quote(&sf.key)));
                for (n, s) in open.iter().enumerate() {
                    if n > 0 {
                        sql.push(", ");
                    }
                    sql.bind(Value::Text(s.clone()));
                }
                if open.is_empty() {
                    sql.push("NULL");
                }
                sql.push(")");
            }
            sql.push(" GROUP BY \"owner\"");
            let rows = tx
                .fetch_all(&sql, &[ColKind::Uuid, ColKind::Int])
                .await
                .map_err(|e| e.to_string())?;
            let count = |u: &Uuid| {
                rows.iter()
                    .find(|r| r[0] == Value::Uuid(*u))
                    .and_then(|r| match r[1] {
                        Value::Int(n) => Some(n),
                        _ => None,
                    })
                    .unwrap_or(0)
            };
            let u = *available
                .iter()
                .min_by_key(|u| (count(u), **u))
                .expect("not empty");
            Ok(Ok((
                u,
                format!("team `{key}` least open records ({} open){note}", count(&u)),
            )))
        }
    }
}

/// The users a recipient names, for the run's record.
pub async fn recipients(
    tx: &mut Tx,
    env: &Env<'_>,
    to: &Recipient,
    ctx: &Json,
) -> Result<Vec<Uuid>, String> {
    let owner = ctx
        .pointer("/record/owner")
        .and_then(Json::as_str)
        .and_then(|s| Uuid::parse_str(s).ok());
    Ok(match to {
        Recipient::Owner => owner.into_iter().collect(),
        Recipient::OwnerManager => match owner {
            Some(o) => {
                let mut sql = Sql::new("SELECT \"manager_id\" FROM \"users\" WHERE \"id\" = ");
                sql.bind(Value::Uuid(o));
                match tx
                    .fetch_optional(&sql, &[ColKind::Uuid])
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|r| r[0].clone())
                {
                    Some(Value::Uuid(m)) => vec![m],
                    _ => return Err("the record's owner has no manager".into()),
                }
            }
            None => return Err("the record has no owner".into()),
        },
        Recipient::User(email) => match user_by_email(tx, email).await? {
            Some((u, _)) => vec![u],
            None => return Err(format!("there is no user {email}")),
        },
        Recipient::Team(key) => match team_members(tx, key).await? {
            Some(m) => m.into_iter().map(|x| x.0).collect(),
            None => return Err(format!("there is no team `{key}`")),
        },
        Recipient::Role(role) => {
            let mut sql = Sql::new("SELECT \"user_id\" FROM \"app_members\" WHERE \"app\" = ");
            sql.bind(Value::Text(env.app.key.clone()))
                .push(" AND \"role\" = ")
                .bind(Value::Text(role.clone()))
                .push(" ORDER BY \"user_id\"");
            tx.fetch_all(&sql, &[ColKind::Uuid])
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter_map(|r| match r[0] {
                    Value::Uuid(u) => Some(u),
                    _ => None,
                })
                .collect()
        }
    })
}
