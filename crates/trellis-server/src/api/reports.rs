//! `/api/v1/apps/{app}/reports` and `/dashboards`: metric queries, drill-down, dashboards.
//!
//! Every number counts only the records the caller may see: the policy's owner set is handed to
//! the report engine as its visibility, so a rep's funnel is the rep's funnel.

use super::{Body, ProblemDoc, Q};
use crate::auth::Actor;
use crate::error::{ApiError, ApiResult};
use crate::policy::{Access, Op};
use crate::state::{AppState, Loaded};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use trellis_report::expr::Expr;
use trellis_report::model::Kind;
use trellis_report::{engine, DrillQuery, Query, Visibility};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_reports))
        .routes(routes!(query_report))
        .routes(routes!(drill_report))
        .routes(routes!(get_dashboard))
        .routes(routes!(list_alerts))
}

/// The caller's visibility (whose records count) and role, and the app.
pub(crate) struct Seen {
    vis: Visibility,
    access: Access,
}

async fn prelude(state: &AppState, actor: &Actor, app: &str) -> ApiResult<(Seen, Loaded)> {
    let (access, loaded) = super::records::scoped(state, actor, app).await?;
    let vis = Visibility {
        owners: access.owners.as_ref().map(|s| {
            let mut v: Vec<_> = s.iter().copied().collect();
            v.sort();
            v
        }),
    };
    Ok((Seen { vis, access }, loaded))
}

/// Every field an expression names, as (entity, field), following one relation hop.
fn expr_fields(
    app: &trellis_form::model::App,
    entity: &str,
    e: &Expr,
    out: &mut Vec<(String, String)>,
) {
    match e {
        Expr::Path(p) => path_fields(app, entity, &p.join("."), out),
        Expr::Call(_, args) => args.iter().for_each(|a| expr_fields(app, entity, a, out)),
        Expr::Unary(_, a) | Expr::IsNull(a, _) => expr_fields(app, entity, a, out),
        Expr::Binary(_, a, b) => {
            expr_fields(app, entity, a, out);
            expr_fields(app, entity, b, out);
        }
        Expr::In(a, list) => {
            expr_fields(app, entity, a, out);
            list.iter().for_each(|x| expr_fields(app, entity, x, out));
        }
        Expr::Num(_) | Expr::Str(_) | Expr::Bool(_) | Expr::Null => {}
    }
}

/// `amount` → (entity, amount); `account.industry` → also (account, industry).
fn path_fields(
    app: &trellis_form::model::App,
    entity: &str,
    path: &str,
    out: &mut Vec<(String, String)>,
) {
    let mut parts = path.split('.');
    let Some(first) = parts.next() else { return };
    out.push((entity.to_owned(), first.to_owned()));
    if let (Some(second), Ok(e)) = (parts.next(), app.entity(entity)) {
        if let Some(target) = e.field(first).and_then(|f| f.def.entity.clone()) {
            out.push((target, second.to_owned()));
        }
    }
}

/// A field a report uses: its entity readable (a dimension through a relation included), the
/// field not hidden.
fn readable(access: &Access, entity: &str, field: &str, path: &str) -> ApiResult<()> {
    access.require(entity, Op::Read)?;
    access.readable_field(entity, field, path)
}

/// A caller who sees only some records may not look through a relation: the related record may
/// be one they cannot open (`account.industry` of an account owned by someone else).
fn no_hop(
    access: &Access,
    metric_entity: &str,
    fields: &[(String, String)],
    path: &str,
) -> ApiResult<()> {
    if access.owners.is_some() {
        if let Some((ent, f)) = fields.iter().find(|(ent, _)| ent != metric_entity) {
            return Err(ApiError::new(
                "forbidden",
                format!("Your role `{}` sees only some records, so reports cannot look into related `{ent}` records (`{f}`).", access.role.key),
            )
            .with_errors(vec![trellis_form::Problem::new(path, "related_scope", format!("`{ent}` records outside your scope could show through this relation."))]));
        }
    }
    Ok(())
}

/// The role may read every entity and field the plan touches (403 naming the first that it
/// may not): a rep whose role hides `amount` cannot sum it, group by it or filter on it.
fn guard(access: &Access, loaded: &Loaded, plan: &engine::Plan) -> ApiResult<()> {
    let app = &loaded.app;
    for name in &plan.needed {
        let Some(m) = loaded.reports.metrics.get(name) else {
            continue;
        };
        let Some(entity) = &m.entity else { continue };
        access.require(entity, Op::Read)?;
        let mut fields = vec![];
        for e in [&m.time, &m.filter].into_iter().flatten() {
            expr_fields(app, entity, e, &mut fields);
        }
        match &m.kind {
            Kind::Aggregate { expr: Some(e), .. } => expr_fields(app, entity, e, &mut fields),
            Kind::Conversion { related, when, .. } => {
                // The related records are counted, never shown (see reports.md's known gaps).
                if let Some((rel, via, _)) = related {
                    readable(access, rel, via, &format!("/metrics/{name}"))?;
                }
                if let Some(w) = when {
                    expr_fields(app, entity, w, &mut fields);
                }
            }
            Kind::Funnel { stage_field, .. } | Kind::TimeInStage { stage_field, .. } => {
                fields.push((entity.clone(), stage_field.clone()));
            }
            _ => {}
        }
        if let Some(a) = &plan.anchor {
            expr_fields(app, entity, a, &mut fields);
        }
        for (ent, f) in &fields {
            readable(access, ent, f, &format!("/metrics/{name}"))?;
        }
        no_hop(access, entity, &fields, &format!("/metrics/{name}"))?;
        for (i, d) in plan.query.group_by.iter().enumerate() {
            let mut fs = vec![];
            path_fields(app, entity, d, &mut fs);
            no_hop(access, entity, &fs, &format!("/group_by/{i}"))?;
            for (ent, f) in fs {
                readable(access, &ent, &f, &format!("/group_by/{i}"))?;
            }
        }
        for (i, flt) in plan.query.filters.iter().enumerate() {
            let mut fs = vec![];
            path_fields(app, entity, &flt.field, &mut fs);
            no_hop(access, entity, &fs, &format!("/filters/{i}/field"))?;
            for (ent, f) in fs {
                readable(access, &ent, &f, &format!("/filters/{i}/field"))?;
            }
        }
    }
    Ok(())
}

/// The app's metrics and dashboards.
#[utoipa::path(get, path = "/api/v1/apps/{app}/reports", tag = "reports",
    params(("app" = String, Path, description = "App key")),
    responses((status = 200, description = "`{metrics: [{name, type, label, entity}], dashboards: [{name, label, items}]}`", body = Object),
              (status = 404, description = "No such app", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_reports(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    let (_, loaded) = prelude(&state, &actor, &app).await?;
    let metrics: Vec<Value> = loaded
        .reports
        .metrics
        .values()
        .map(|m| json!({"name": m.name, "type": m.type_name, "label": m.label, "entity": m.entity}))
        .collect();
    let dashboards: Vec<Value> = loaded
        .reports
        .dashboards
        .values()
        .map(|d| {
            json!({
                "name": d.name,
                "label": d.def.label.as_ref().map(|l| l.get("en", &d.name).to_owned()).unwrap_or_else(|| d.name.clone()),
                "items": d.def.items.iter().map(|i| json!({"key": i.key, "chart": i.chart})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({"metrics": metrics, "dashboards": dashboards})))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct FormatParams {
    /// `json` (default), `csv` or `xlsx`.
    format: Option<String>,
}

/// Answer a metric query: `{columns, rows, totals, meta}`, or the rows as CSV / XLSX.
#[utoipa::path(post, path = "/api/v1/apps/{app}/reports/query", tag = "reports",
    params(("app" = String, Path, description = "App key"), FormatParams),
    request_body(content = Object, description = "`{metrics, group_by, filters, time, timezone, week_start, compare, compare_to_date, flag, sort, limit}` (see docs/reference/reports.md)"),
    responses((status = 200, description = "`{columns, rows, totals, meta}`; `meta.row_count` and `meta.truncated` say whether `limit` cut rows", body = Object,
               headers(("trellis-row-count" = u64, description = "Rows before `limit`"),
                       ("trellis-truncated" = bool, description = "Whether `limit` cut rows"))),
              (status = 400, description = "The query is invalid: every problem with its JSON pointer", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 404, description = "No such app", body = ProblemDoc, content_type = "application/problem+json")))]
async fn query_report(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
    Q(p): Q<FormatParams>,
    Body(body): Body<Value>,
) -> ApiResult<Response> {
    let (seen, loaded) = prelude(&state, &actor, &app).await?;
    let q = parse_query(body)?;
    let format = p.format.as_deref().unwrap_or("json");
    if !matches!(format, "json" | "csv" | "xlsx") {
        return Err(ApiError::new(
            "invalid_query",
            format!("`{format}` is not a format; use json, csv or xlsx."),
        ));
    }
    let answer = answer(&state, &loaded, &q, &seen).await?;
    let table = || {
        let headers: Vec<String> = answer.columns.iter().map(|c| c.name.clone()).collect();
        let rows: Vec<Vec<String>> = answer
            .rows
            .iter()
            .map(|r| {
                headers
                    .iter()
                    .map(|h| match r.get(h) {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                    })
                    .collect()
            })
            .collect();
        (headers, rows)
    };
    let file = |ct: &'static str, ext: &str, bytes: Vec<u8>| {
        let mut resp = bytes.into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        if let Ok(v) =
            HeaderValue::from_str(&format!("attachment; filename=\"{app}-report.{ext}\""))
        {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
        resp
    };
    // A file has no `meta`: these headers say when `limit` cut rows (the JSON answer says it
    // in `meta` as well).
    let counted = |mut resp: Response| {
        let h = resp.headers_mut();
        if let Some(n) = answer.meta["row_count"].as_u64() {
            h.insert("trellis-row-count", HeaderValue::from(n));
        }
        let cut = answer.meta["truncated"].as_bool().unwrap_or(false);
        h.insert(
            "trellis-truncated",
            HeaderValue::from_static(if cut { "true" } else { "false" }),
        );
        resp
    };
    let resp = match format {
        "json" => Ok(Json(json!(answer)).into_response()),
        "csv" => {
            let (h, r) = table();
            let mut buf = vec![];
            crate::sheets::write_csv(&mut buf, &h, &r)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(file("text/csv; charset=utf-8", "csv", buf))
        }
        "xlsx" => {
            let (h, r) = table();
            let buf =
                crate::sheets::xlsx_bytes(&h, &r).map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(file(
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                "xlsx",
                buf,
            ))
        }
        other => Err(ApiError::internal(format!("format `{other}` was checked"))),
    };
    resp.map(counted)
}

fn parse_query(body: Value) -> ApiResult<Query> {
    serde_path_to_error::deserialize::<_, Query>(body).map_err(|e| {
        let path = e.path().to_string();
        let ptr = if path == "." {
            String::new()
        } else {
            format!("/{}", path.replace('.', "/"))
        };
        ApiError::new("invalid_query", "The query has the wrong shape.").with_errors(vec![
            trellis_form::Problem::new(ptr, "invalid", e.inner().to_string()),
        ])
    })
}

async fn answer(
    state: &AppState,
    loaded: &Loaded,
    q: &Query,
    seen: &Seen,
) -> ApiResult<engine::Answer> {
    let now = state.clock.now();
    let plan = engine::plan(&loaded.app, &loaded.reports, q, now, state.db.backend())?;
    guard(&seen.access, loaded, &plan)?;
    Ok(engine::run(&state.db, &loaded.app, &loaded.reports, &plan, &seen.vis).await?)
}

/// The records behind one number: the same query, one row of its answer, and for a ratio or
/// conversion the side to open.
#[utoipa::path(post, path = "/api/v1/apps/{app}/reports/drill", tag = "reports",
    params(("app" = String, Path, description = "App key")),
    request_body(content = Object, description = "A query plus `row`, `side`, `page_size`, `cursor`"),
    responses((status = 200, description = "`{entity, records, next_cursor}`", body = Object),
              (status = 400, description = "The drill is invalid", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 404, description = "No such app", body = ProblemDoc, content_type = "application/problem+json")))]
async fn drill_report(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    let (seen, loaded) = prelude(&state, &actor, &app).await?;
    let dq: DrillQuery = serde_path_to_error::deserialize(body).map_err(|e| {
        ApiError::new("invalid_query", "The drill request has the wrong shape.").with_errors(vec![
            trellis_form::Problem::new(
                format!("/{}", e.path().to_string().replace('.', "/")),
                "invalid",
                e.inner().to_string(),
            ),
        ])
    })?;
    let plan = engine::plan(
        &loaded.app,
        &loaded.reports,
        &dq.query,
        state.clock.now(),
        state.db.backend(),
    )?;
    guard(&seen.access, &loaded, &plan)?;
    let page = engine::drill(
        &state.db,
        &loaded.app,
        &loaded.reports,
        &dq,
        state.clock.now(),
        &seen.vis,
    )
    .await?;
    seen.access.require(&page.entity, Op::Read)?;
    Ok(Json(json!({
        "entity": page.entity,
        "records": page.records.iter().map(|r| seen.access.redact(&page.entity, r.to_json())).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor,
    })))
}

/// Every panel of a dashboard, answered in one request (the queries run concurrently).
#[utoipa::path(get, path = "/api/v1/apps/{app}/dashboards/{name}", tag = "reports",
    params(("app" = String, Path, description = "App key"), ("name" = String, Path, description = "Dashboard name")),
    responses((status = 200, description = "`{name, label, items: [{key, title, chart, query, answer}]}`; a panel the caller's role may not see answers `{error}`", body = Object),
              (status = 404, description = "No such app or dashboard", body = ProblemDoc, content_type = "application/problem+json")))]
async fn get_dashboard(
    State(state): State<AppState>,
    actor: Actor,
    Path((app, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (seen, loaded) = prelude(&state, &actor, &app).await?;
    let Some(d) = loaded.reports.dashboards.get(&name).cloned() else {
        return Err(ApiError::not_found(format!(
            "app `{app}` has no dashboard `{name}`"
        )));
    };
    let seen = Arc::new(seen);
    let mut set = tokio::task::JoinSet::new();
    for (i, item) in d.def.items.iter().enumerate() {
        let (state, loaded, seen, q) = (
            state.clone(),
            loaded.clone(),
            seen.clone(),
            item.query.clone(),
        );
        set.spawn(async move { (i, answer(&state, &loaded, &q, &seen).await) });
    }
    let mut answers: Vec<Option<Value>> = vec![None; d.def.items.len()];
    while let Some(r) = set.join_next().await {
        let (i, a) = r.map_err(|e| ApiError::internal(e.to_string()))?;
        answers[i] = Some(match a {
            Ok(a) => json!(a),
            // A panel the caller's role may not see (a hidden field, an entity it cannot read)
            // is left out with the reason; the other panels still answer.
            Err(e) if e.status() == axum::http::StatusCode::FORBIDDEN => {
                json!({"error": e.to_json()})
            }
            Err(e) => return Err(e),
        });
    }
    let items: Vec<Value> = d
        .def
        .items
        .iter()
        .zip(answers)
        .map(|(item, a)| {
            json!({
                "key": item.key,
                "title": item.title.as_ref().map(|l| l.get("en", &item.key).to_owned()),
                "chart": item.chart,
                "query": item.query,
                "answer": a,
            })
        })
        .collect();
    Ok(Json(json!({
        "name": d.name,
        "label": d.def.label.as_ref().map(|l| l.get("en", &d.name).to_owned()).unwrap_or_else(|| d.name.clone()),
        "items": items,
    })))
}

/// The app's alerts and their latest firings (callers who see every record only: an alert
/// looks at all of them).
#[utoipa::path(get, path = "/api/v1/apps/{app}/alerts", tag = "reports",
    params(("app" = String, Path, description = "App key")),
    responses((status = 200, description = "`{alerts: [{name, label, every, query}], firings: [{id, alert, fired_at, rows}]}`", body = Object),
              (status = 403, description = "The caller's role sees only some records", body = ProblemDoc, content_type = "application/problem+json"),
              (status = 404, description = "No such app", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_alerts(
    State(state): State<AppState>,
    actor: Actor,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    let (seen, loaded) = prelude(&state, &actor, &app).await?;
    if seen.vis.owners.is_some() || !seen.access.role.reads_everything() {
        return Err(ApiError::new(
            "forbidden",
            "Alerts look at every record and field of the app; your role sees only some of them.",
        ));
    }
    let alerts: Vec<Value> = loaded
        .reports
        .alerts
        .values()
        .map(|a| json!({"name": a.name, "label": a.label, "every": a.def.every, "query": a.def.query}))
        .collect();
    let firings = trellis_report::alerts::firings(&state.db, &app, 100).await?;
    Ok(Json(json!({"alerts": alerts, "firings": firings})))
}
