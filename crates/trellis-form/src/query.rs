//! Listing records: filters, sort, keyset (cursor) pagination and an optional total.
//!
//! Filters name fields (or system columns) that are checked against the entity; every value is
//! parsed by the field's type and bound as a parameter. Sorting is by one field (nulls last in
//! both directions) with the id as tie-breaker, so the cursor — the last row's sort value and id —
//! pages stably even while records are added.

use crate::db::{quote, Backend, Db, Sql, Value};
use crate::def::FieldType;
use crate::error::{FormError, Problem, Result};
use crate::model::{ColKind, Entity, Field};
use crate::store::{decode, select_list, Record};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

/// One filter condition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Field key or system column.
    pub field: String,
    /// `eq`, `ne`, `in`, `lt`, `lte`, `gt`, `gte`, `between`, `contains`, `is_null`.
    pub op: String,
    /// The operand: a value, a list for `in`, `[low, high]` for `between`, a boolean for `is_null`.
    #[serde(default)]
    pub value: Json,
}

/// A list request.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Conditions, all of which must hold.
    pub filters: Vec<Filter>,
    /// Sort field; `-field` sorts descending. Default: `id` (creation order).
    pub sort: Option<String>,
    /// Page size (1–1000, default 50).
    pub limit: Option<u32>,
    /// Cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Also count all matching records.
    pub count: bool,
}

/// One page of records.
#[derive(Debug, Clone)]
pub struct Page {
    /// The records.
    pub records: Vec<Record>,
    /// Cursor of the next page, absent on the last page.
    pub next_cursor: Option<String>,
    /// Total matching records, when asked for.
    pub total: Option<i64>,
}

/// Largest page.
pub const MAX_LIMIT: u32 = 1000;

/// A column a query may use: name, kind and the field it belongs to (system columns have none).
struct Col<'a> {
    name: String,
    kind: ColKind,
    field: Option<&'a Field>,
}

fn column<'a>(e: &'a Entity, name: &str) -> Option<Col<'a>> {
    let sys = match name {
        "id" | "created_by" | "owner" => Some(ColKind::Uuid),
        "created_at" | "updated_at" => Some(ColKind::DateTime),
        "version" => Some(ColKind::Int),
        _ => None,
    };
    if let Some(kind) = sys {
        return Some(Col {
            name: name.into(),
            kind,
            field: None,
        });
    }
    if let Some(f) = e.field(name) {
        return Some(Col {
            name: name.into(),
            kind: f.col_kind(),
            field: Some(f),
        });
    }
    // Stage times and money currencies are columns too.
    e.columns()
        .into_iter()
        .find(|c| c.name == name)
        .map(|c| Col {
            name: c.name,
            kind: c.kind,
            field: None,
        })
}

/// Parse a filter operand into a column value.
fn operand(col: &Col, v: &Json, path: &str) -> std::result::Result<Value, Problem> {
    if v.is_null() {
        return Err(Problem::new(
            path,
            "bad_value",
            format!(
                "Compare `{}` with null using the is_null operator.",
                col.name
            ),
        ));
    }
    if let Some(f) = col.field {
        // Option and stage values must exist, so a typo is an error rather than an empty list.
        let allowed: Vec<&String> = match f.ty {
            FieldType::Select | FieldType::Multiselect => f.options.iter().collect(),
            FieldType::Stage => f.stages.iter().map(|s| &s.key).collect(),
            _ => vec![],
        };
        if !allowed.is_empty() {
            return match v.as_str() {
                Some(s) if allowed.iter().any(|a| *a == s) => Ok(Value::Text(s.to_owned())),
                _ => Err(Problem::new(
                    path,
                    "bad_value",
                    format!(
                        "`{v}` is not an option of {}; use one of: {}.",
                        f.label,
                        allowed
                            .iter()
                            .map(|a| a.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            };
        }
        // A filter value is read by the field's type but not held to its write constraints
        // (bounds, scale, pattern): `amount gte -1` is a fine question on a field with min 0.
        let bad = || {
            Problem::new(
                path,
                "bad_value",
                format!("`{v}` is not a valid value for {}.", f.label),
            )
        };
        match f.ty {
            FieldType::Integer => return v.as_i64().map(Value::Int).ok_or_else(bad),
            FieldType::Decimal | FieldType::Money => {
                let v = v.get("amount").unwrap_or(v);
                let text = match v {
                    Json::String(s) => s.clone(),
                    Json::Number(n) => n.to_string(),
                    _ => return Err(bad()),
                };
                return text
                    .parse::<rust_decimal::Decimal>()
                    .map(Value::Decimal)
                    .map_err(|_| bad());
            }
            FieldType::Date => {
                return v
                    .as_str()
                    .and_then(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                    .map(Value::Date)
                    .ok_or_else(bad)
            }
            FieldType::Text | FieldType::LongText => {
                return v
                    .as_str()
                    .map(|s| Value::Text(s.to_owned()))
                    .ok_or_else(bad)
            }
            _ => {}
        }
        return crate::values::to_sql(f, v, path)
            .map(|mut vals| vals.remove(0))
            .map_err(|mut p| {
                p.code = "bad_value";
                p
            });
    }
    let bad = || {
        Problem::new(
            path,
            "bad_value",
            format!("`{v}` is not a valid value for `{}`.", col.name),
        )
    };
    Ok(match col.kind {
        ColKind::Uuid => Value::Uuid(
            v.as_str()
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
                .ok_or_else(bad)?,
        ),
        ColKind::DateTime => Value::DateTime(crate::values::datetime(v).ok_or_else(bad)?),
        ColKind::Int => Value::Int(v.as_i64().ok_or_else(bad)?),
        ColKind::Text => Value::Text(v.as_str().ok_or_else(bad)?.to_owned()),
        _ => return Err(bad()),
    })
}

fn ordered(kind: ColKind) -> bool {
    matches!(
        kind,
        ColKind::Int
            | ColKind::Decimal
            | ColKind::Date
            | ColKind::DateTime
            | ColKind::Text
            | ColKind::Uuid
    )
}

/// Append the WHERE clause of `filters` to `sql`; problems carry `/filters/<i>` paths.
fn where_clause(
    backend: Backend,
    e: &Entity,
    filters: &[Filter],
    sql: &mut Sql,
    problems: &mut Vec<Problem>,
) {
    let mut first = true;
    for (i, f) in filters.iter().enumerate() {
        let path = format!("/filters/{i}");
        let Some(col) = column(e, &f.field) else {
            problems.push(Problem::new(
                format!("{path}/field"),
                "unknown_field",
                format!("`{}` is not a field of {}.", f.field, e.label),
            ));
            continue;
        };
        let c = quote(&col.name);
        let is_json = col.kind == ColKind::Json;
        let vpath = format!("{path}/value");
        let cond = match f.op.as_str() {
            "is_null" => match f.value {
                Json::Bool(true) | Json::Null => format!("{c} IS NULL"),
                Json::Bool(false) => format!("{c} IS NOT NULL"),
                _ => {
                    problems.push(Problem::new(
                        vpath,
                        "bad_value",
                        "is_null takes true or false.",
                    ));
                    continue;
                }
            },
            "eq" | "ne" | "lt" | "lte" | "gt" | "gte" => {
                if is_json {
                    problems.push(Problem::new(
                        format!("{path}/op"),
                        "bad_op",
                        format!(
                            "`{}` holds a list or JSON and cannot be compared with {}; use contains (multiselect) or is_null.",
                            f.field, f.op
                        ),
                    ));
                    continue;
                }
                if !matches!(f.op.as_str(), "eq" | "ne") && !ordered(col.kind) {
                    problems.push(Problem::new(
                        format!("{path}/op"),
                        "bad_op",
                        format!("`{}` has no order; use eq or ne.", f.field),
                    ));
                    continue;
                }
                let v = match operand(&col, &f.value, &vpath) {
                    Ok(v) => v,
                    Err(p) => {
                        problems.push(p);
                        continue;
                    }
                };
                let p = sql_param(sql, v);
                match f.op.as_str() {
                    "eq" => format!("{c} = {p}"),
                    "ne" => format!("{c} IS DISTINCT FROM {p}"),
                    "lt" => format!("{c} < {p}"),
                    "lte" => format!("{c} <= {p}"),
                    "gt" => format!("{c} > {p}"),
                    _ => format!("{c} >= {p}"),
                }
            }
            "in" => {
                let Some(items) = f
                    .value
                    .as_array()
                    .filter(|a| !a.is_empty() && a.len() <= 1000)
                else {
                    problems.push(Problem::new(
                        vpath,
                        "bad_value",
                        "in takes a list of 1 to 1000 values.",
                    ));
                    continue;
                };
                if is_json {
                    problems.push(Problem::new(
                        format!("{path}/op"),
                        "bad_op",
                        format!("`{}` holds a list or JSON and cannot be used with in; use contains (multiselect) or is_null.", f.field),
                    ));
                    continue;
                }
                let mut ps = vec![];
                for (j, item) in items.iter().enumerate() {
                    match operand(&col, item, &format!("{vpath}/{j}")) {
                        Ok(v) => ps.push(sql_param(sql, v)),
                        Err(p) => problems.push(p),
                    }
                }
                format!("{c} IN ({})", ps.join(", "))
            }
            "between" => {
                let Some([lo, hi]) = f
                    .value
                    .as_array()
                    .and_then(|a| <&[Json; 2]>::try_from(a.as_slice()).ok())
                else {
                    problems.push(Problem::new(
                        vpath,
                        "bad_value",
                        "between takes [low, high].",
                    ));
                    continue;
                };
                if !ordered(col.kind) || is_json {
                    problems.push(Problem::new(
                        format!("{path}/op"),
                        "bad_op",
                        format!("`{}` has no order.", f.field),
                    ));
                    continue;
                }
                match (
                    operand(&col, lo, &format!("{vpath}/0")),
                    operand(&col, hi, &format!("{vpath}/1")),
                ) {
                    (Ok(a), Ok(b)) => {
                        let (a, b) = (sql_param(sql, a), sql_param(sql, b));
                        format!("{c} BETWEEN {a} AND {b}")
                    }
                    (a, b) => {
                        problems.extend(a.err());
                        problems.extend(b.err());
                        continue;
                    }
                }
            }
            "contains" => match (col.field.map(|f| f.ty), &f.value) {
                (Some(FieldType::Multiselect), Json::String(_)) => {
                    let v = match operand(&col, &f.value, &vpath) {
                        Ok(v) => v,
                        Err(p) => {
                            problems.push(p);
                            continue;
                        }
                    };
                    let p = sql_param(sql, v);
                    backend.json_array_contains(&c, &p)
                }
                (_, Json::String(s)) if col.kind == ColKind::Text => {
                    let escaped = s
                        .replace('\\', "\\\\")
                        .replace('%', "\\%")
                        .replace('_', "\\_");
                    let p = sql_param(sql, Value::Text(format!("%{escaped}%")));
                    format!("{c} {} {p} ESCAPE '\\'", backend.ilike())
                }
                _ => {
                    problems.push(Problem::new(format!("{path}/op"), "bad_op", format!("contains works on text and multiselect fields with a text value, not on `{}`.", f.field)));
                    continue;
                }
            },
            other => {
                problems.push(Problem::new(
                    format!("{path}/op"),
                    "bad_op",
                    format!("`{other}` is not an operator; use eq, ne, in, lt, lte, gt, gte, between, contains or is_null."),
                ));
                continue;
            }
        };
        sql.push(if first { " WHERE " } else { " AND " });
        sql.push(&cond);
        first = false;
    }
}

fn sql_param(sql: &mut Sql, v: Value) -> String {
    sql.param(v)
}

/// List one page of records.
pub async fn list(db: &Db, e: &Entity, q: &ListQuery) -> Result<Page> {
    let backend = db.backend();
    let mut problems = vec![];
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIMIT {
        problems.push(Problem::new(
            "/limit",
            "out_of_range",
            format!("limit must be between 1 and {MAX_LIMIT}."),
        ));
    }
    let (sort_name, desc) = match q.sort.as_deref() {
        Some(s) if s.starts_with('-') => (&s[1..], true),
        Some(s) => (s, false),
        None => ("id", false),
    };
    let sort = column(e, sort_name).filter(|c| ordered(c.kind) || c.kind == ColKind::Bool);
    if sort.is_none() {
        problems.push(Problem::new(
            "/sort",
            "unknown_field",
            format!(
                "Cannot sort by `{sort_name}`: not a sortable field of {}.",
                e.label
            ),
        ));
    }
    let (cols, kinds) = select_list(e);
    let mut sql = Sql::new(format!("SELECT {cols} FROM {}", quote(&e.table)));
    where_clause(backend, e, &q.filters, &mut sql, &mut problems);
    let mut count_sql = sql.clone();
    count_sql.text = count_sql.text.replacen(&cols, "COUNT(*)", 1);
    // The cursor: the last row's sort value and id.
    let after = match &q.cursor {
        None => None,
        Some(c) => match decode_cursor(c) {
            Some(v) => Some(v),
            None => {
                problems.push(Problem::new(
                    "/cursor",
                    "bad_cursor",
                    "The cursor is not one this server gave out.",
                ));
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(FormError::Query(problems));
    }
    let sort = sort.expect("checked");
    let sc = quote(&sort.name);
    let (cmp, dir) = if desc { ("<", "DESC") } else { (">", "ASC") };
    if let Some((last, id)) = after {
        let kw = if sql.text.contains(" WHERE ") {
            " AND "
        } else {
            " WHERE "
        };
        let id = Value::Uuid(id);
        let cond = if sort.name == "id" {
            let p = sql.param(id);
            format!("\"id\" {cmp} {p}")
        } else if last.is_null() {
            let p = sql.param(id);
            format!("({sc} IS NULL AND \"id\" {cmp} {p})")
        } else {
            let v = operand(&sort, &last, "/cursor")
                .or_else(|_| {
                    if sort.kind == ColKind::Bool {
                        last.as_bool().map(Value::Bool).ok_or(())
                    } else {
                        Err(())
                    }
                })
                .map_err(|_| {
                    FormError::Query(vec![Problem::new(
                        "/cursor",
                        "bad_cursor",
                        "The cursor does not fit this sort.",
                    )])
                })?;
            let (a, b) = (sql.param(v.clone()), sql.param(v));
            let p = sql.param(id);
            format!("({sc} {cmp} {a} OR ({sc} = {b} AND \"id\" {cmp} {p}) OR {sc} IS NULL)")
        };
        sql.push(kw).push(&cond);
    }
    if sort.name == "id" {
        sql.push(&format!(" ORDER BY \"id\" {dir}"));
    } else {
        sql.push(&format!(
            " ORDER BY CASE WHEN {sc} IS NULL THEN 1 ELSE 0 END, {sc} {dir}, \"id\" {dir}"
        ));
    }
    sql.push(&format!(" LIMIT {}", limit + 1));
    let mut rows = db.fetch_all(&sql, &kinds).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let records: Vec<Record> = rows.into_iter().map(|r| decode(e, r)).collect();
    let next_cursor = match (more, records.last()) {
        (true, Some(r)) => {
            let j = r.to_json();
            let v = match (sort.field.map(|f| f.ty), j.get(&sort.name)) {
                (Some(FieldType::Money), Some(m)) => m.get("amount").cloned().unwrap_or(Json::Null),
                (_, v) => v.cloned().unwrap_or(Json::Null),
            };
            Some(encode_cursor(&v, r.meta.id))
        }
        _ => None,
    };
    let total = if q.count {
        let rows = db.fetch_all(&count_sql, &[ColKind::Int]).await?;
        match rows.first().map(|r| &r[0]) {
            Some(Value::Int(n)) => Some(*n),
            _ => Some(0),
        }
    } else {
        None
    };
    Ok(Page {
        records,
        next_cursor,
        total,
    })
}

fn encode_cursor(v: &Json, id: uuid::Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!([v, id]).to_string())
}

fn decode_cursor(c: &str) -> Option<(Json, uuid::Uuid)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    let v: Json = serde_json::from_slice(&bytes).ok()?;
    let arr = v.as_array()?;
    let id = uuid::Uuid::parse_str(arr.get(1)?.as_str()?).ok()?;
    Some((arr.first()?.clone(), id))
}
