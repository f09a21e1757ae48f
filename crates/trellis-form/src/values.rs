//! Field values between their JSON form (what the API speaks) and their column values.
//!
//! JSON forms: decimals are strings with exactly `scale` digits (`"1200.50"`), so no digit is
//! ever lost to a float; money is `{"amount": "1200.50", "currency": "CNY"}`; dates are
//! `YYYY-MM-DD`; datetimes RFC 3339 in UTC; users and relations UUID strings; multiselects arrays.
//! Input is more forgiving: a decimal may also be a JSON number, money may be a bare amount (the
//! field's currency is used), a datetime may carry any offset.

use crate::db::Value;
use crate::def::FieldType;
use crate::error::Problem;
use crate::model::{ColKind, Field};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value as Json};
use std::str::FromStr;
use uuid::Uuid;

/// Most significant digits a decimal may have: every such value survives SQLite's REAL exactly.
pub const MAX_DECIMAL_DIGITS: u32 = 15;

/// Convert one already schema-checked JSON value into the field's column values (one per
/// column of [`Field::columns`], stage times excluded: the store fills those).
pub fn to_sql(field: &Field, v: &Json, path: &str) -> Result<Vec<Value>, Problem> {
    let kind = field.col_kind();
    if v.is_null() {
        let mut out = vec![Value::Null(kind)];
        if field.ty == FieldType::Money {
            out.push(Value::Null(ColKind::Text));
        }
        return Ok(out);
    }
    let bad = |msg: String| Problem::new(path, "wrong_type", msg);
    let label = &field.label;
    Ok(match field.ty {
        FieldType::Text
        | FieldType::LongText
        | FieldType::Email
        | FieldType::Phone
        | FieldType::Url
        | FieldType::Select
        | FieldType::Stage => {
            let s = v
                .as_str()
                .ok_or_else(|| bad(format!("{label} must be text.")))?;
            // A definition pattern is enforced, anchored, by the entity's JSON Schema.
            vec![Value::Text(s.to_owned())]
        }
        FieldType::Integer => {
            let i = v
                .as_i64()
                .ok_or_else(|| bad(format!("{label} must be a whole number.")))?;
            vec![Value::Int(i)]
        }
        FieldType::Decimal => vec![Value::Decimal(decimal(field, v, path)?)],
        FieldType::Money => {
            let (amount, currency) = match v {
                Json::Object(m) => (
                    m.get("amount").cloned().unwrap_or(Json::Null),
                    m.get("currency")
                        .and_then(Json::as_str)
                        .unwrap_or(&field.currency)
                        .to_owned(),
                ),
                other => (other.clone(), field.currency.clone()),
            };
            vec![
                Value::Decimal(decimal(field, &amount, path)?),
                Value::Text(currency),
            ]
        }
        FieldType::Boolean => {
            vec![Value::Bool(v.as_bool().ok_or_else(|| {
                bad(format!("{label} must be true or false."))
            })?)]
        }
        FieldType::Date => {
            let d = v
                .as_str()
                .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                .ok_or_else(|| {
                    Problem::new(
                        path,
                        "format",
                        format!("{label} must be a date such as 2026-03-31."),
                    )
                })?;
            if field.min_date.is_some_and(|m| d < m) {
                return Err(Problem::new(
                    path,
                    "out_of_range",
                    format!("{label} must be on or after {}.", field.min_date.unwrap()),
                ));
            }
            if field.max_date.is_some_and(|m| d > m) {
                return Err(Problem::new(
                    path,
                    "out_of_range",
                    format!("{label} must be on or before {}.", field.max_date.unwrap()),
                ));
            }
            vec![Value::Date(d)]
        }
        FieldType::Datetime | FieldType::Summary => {
            vec![Value::DateTime(datetime(v).ok_or_else(|| {
                Problem::new(
                    path,
                    "format",
                    format!("{label} must be a date and time such as 2026-03-31T09:30:00Z."),
                )
            })?)]
        }
        FieldType::User | FieldType::Relation => vec![Value::Uuid(
            v.as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| {
                    Problem::new(path, "format", format!("{label} must be an id (UUID)."))
                })?,
        )],
        FieldType::Multiselect | FieldType::Json => vec![Value::Json(v.clone())],
        FieldType::Formula => {
            use crate::formula::ResultType;
            let result = field
                .formula
                .as_ref()
                .map(|f| f.result)
                .unwrap_or(ResultType::Decimal);
            let bad =
                |what: &str| Problem::new(path, "wrong_type", format!("{label} must be {what}."));
            match result {
                ResultType::Decimal => vec![Value::Decimal(decimal(field, v, path)?)],
                ResultType::Integer => {
                    vec![Value::Int(v.as_i64().ok_or_else(|| bad("a whole number"))?)]
                }
                ResultType::Text => vec![Value::Text(
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string()),
                )],
                ResultType::Boolean => vec![Value::Bool(
                    v.as_bool().ok_or_else(|| bad("true or false"))?,
                )],
                ResultType::Date => vec![Value::Date(
                    v.as_str()
                        .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                        .ok_or_else(|| bad("a date"))?,
                )],
            }
        }
    })
}

/// Parse an RFC 3339 instant into UTC.
pub fn datetime(v: &Json) -> Option<DateTime<Utc>> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// The JSON form of an instant: RFC 3339, UTC, microseconds.
pub fn datetime_json(t: &DateTime<Utc>) -> Json {
    Json::String(t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn decimal(field: &Field, v: &Json, path: &str) -> Result<Decimal, Problem> {
    let label = &field.label;
    let text = match v {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        _ => {
            return Err(Problem::new(
                path,
                "wrong_type",
                format!("{label} must be a decimal number such as \"1200.50\"."),
            ))
        }
    };
    let d = Decimal::from_str(&text).map_err(|_| {
        Problem::new(
            path,
            "wrong_type",
            format!("{label} must be a decimal number such as \"1200.50\"."),
        )
    })?;
    let d = d.normalize();
    if d.scale() > field.scale {
        return Err(Problem::new(
            path,
            "too_precise",
            format!(
                "{label} allows at most {} digit(s) after the decimal point.",
                field.scale
            ),
        ));
    }
    let int_digits = d.trunc().abs().to_string().trim_start_matches('0').len() as u32;
    if int_digits + field.scale > MAX_DECIMAL_DIGITS {
        return Err(Problem::new(
            path,
            "out_of_range",
            format!(
                "{label} is too large: at most {} digits before the decimal point.",
                MAX_DECIMAL_DIGITS - field.scale
            ),
        ));
    }
    if field.min_num.is_some_and(|m| d < m) {
        return Err(Problem::new(
            path,
            "out_of_range",
            format!("{label} must be at least {}.", field.min_num.unwrap()),
        ));
    }
    if field.max_num.is_some_and(|m| d > m) {
        return Err(Problem::new(
            path,
            "out_of_range",
            format!("{label} must be at most {}.", field.max_num.unwrap()),
        ));
    }
    Ok(d)
}

/// A decimal in its JSON form: a string with exactly `scale` digits after the point.
pub fn decimal_json(d: Decimal, scale: u32) -> Json {
    let mut d = d.round_dp(scale);
    d.rescale(scale);
    Json::String(d.to_string())
}

/// The JSON form of a field from its column values (in [`Field::columns`] order).
pub fn to_json(field: &Field, cols: &[Value]) -> Json {
    match (&cols[0], field.ty) {
        (Value::Null(_), _) => Json::Null,
        (Value::Decimal(d), FieldType::Money) => {
            let currency = match cols.get(1) {
                Some(Value::Text(c)) => c.clone(),
                _ => field.currency.clone(),
            };
            json!({"amount": decimal_json(*d, field.scale), "currency": currency})
        }
        (v, _) => scalar_json(v, field.scale),
    }
}

/// The JSON form of one column value.
pub fn scalar_json(v: &Value, scale: u32) -> Json {
    match v {
        Value::Null(_) => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => json!(i),
        Value::Decimal(d) => decimal_json(*d, scale),
        Value::Text(s) => Json::String(s.clone()),
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::Date(d) => Json::String(d.format("%Y-%m-%d").to_string()),
        Value::DateTime(t) => datetime_json(t),
        Value::Json(j) => j.clone(),
    }
}
