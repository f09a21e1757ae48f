//! Spreadsheets to records and back: header matching, cell conversion, problems by cell.
//!
//! A sales team's sheet has headers in its own words (`商机来源`, `Source channel`) and values
//! the way people type them (`展会`, `¥1,200.50`, `2026/3/31`, `是`). This module maps such a
//! sheet onto an entity: each header to a field by key or by any of its labels, each cell to the
//! field's JSON form. What it produces then goes through the same validation as the API
//! (`store::draft_batch`), and every problem is reported by row and column.
//! File formats (CSV, XLSX) are read and written by the caller; this module sees cells.

use crate::def::FieldType;
use crate::model::{Entity, Field};
use chrono::{NaiveDate, NaiveDateTime, TimeZone};
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use uuid::Uuid;

/// One cell as a spreadsheet holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Nothing.
    Empty,
    /// Text.
    Text(String),
    /// A number.
    Number(f64),
    /// A boolean.
    Bool(bool),
    /// A date and time (XLSX date cells).
    DateTime(NaiveDateTime),
}

impl Cell {
    /// The cell as text, as a person would read it.
    pub fn text(&self) -> String {
        match self {
            Cell::Empty => String::new(),
            Cell::Text(s) => s.trim().to_owned(),
            Cell::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => format!("{}", *n as i64),
            Cell::Number(n) => n.to_string(),
            Cell::Bool(b) => b.to_string(),
            Cell::DateTime(t) if t.time() == chrono::NaiveTime::MIN => t.date().to_string(),
            Cell::DateTime(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        }
    }

    fn is_empty(&self) -> bool {
        self.text().is_empty()
    }
}

/// A problem with one cell (or a header, row 1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CellProblem {
    /// Spreadsheet row, 1-based; the header is row 1.
    pub row: usize,
    /// Spreadsheet column letter (`C`).
    pub column: String,
    /// The column's header.
    pub header: String,
    /// Stable code.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

/// The column letter of a 0-based index (`0` → `A`, `27` → `AB`).
pub fn column_letter(mut i: usize) -> String {
    let mut s = vec![];
    loop {
        s.push((b'A' + (i % 26) as u8) as char);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.iter().rev().collect()
}

/// What a column holds.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Field(usize),
    Currency(usize),
    Owner,
}

/// Values that cells may name instead of ids: users by email, related records by a unique field.
#[derive(Debug, Default, Clone)]
pub struct Lookups {
    /// Lower-cased email → user id.
    pub users: HashMap<String, Uuid>,
    /// Relation field key → (lower-cased unique value → record id; the nil id marks a name that
    /// several records share in different cases).
    pub relations: HashMap<String, HashMap<String, Uuid>>,
}

/// A sheet mapped onto an entity.
#[derive(Debug)]
pub struct Mapped {
    /// One JSON record per data row (rows whose cells are all empty are skipped).
    pub records: Vec<Json>,
    /// The sheet row of each record.
    pub rows: Vec<usize>,
    /// Problems found while reading cells.
    pub problems: Vec<CellProblem>,
    headers: Vec<String>,
    targets: Vec<Option<Target>>,
}

impl Mapped {
    /// Locate a record problem (`/<field>…` of record `index`) in the sheet.
    pub fn locate(&self, e: &Entity, index: usize, p: &crate::Problem) -> CellProblem {
        let key = p
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        let col = self.targets.iter().position(|t| match t {
            Some(Target::Field(i)) => e.fields[*i].key == key,
            Some(Target::Owner) => key == "owner",
            _ => false,
        });
        CellProblem {
            row: self.rows.get(index).copied().unwrap_or(0),
            column: col.map(column_letter).unwrap_or_default(),
            header: col
                .map(|c| self.headers[c].clone())
                .unwrap_or_else(|| key.to_owned()),
            code: p.code,
            message: p.message.clone(),
        }
    }
}

fn norm(s: &str) -> String {
    s.trim().to_lowercase()
}

fn match_header(e: &Entity, h: &str) -> Option<Target> {
    let n = norm(h);
    if n == "owner" || n == "负责人邮箱" || n == "owner email" {
        return Some(Target::Owner);
    }
    for (i, f) in e.fields.iter().enumerate() {
        let labels = f.def.label.as_ref().map(|l| l.all()).unwrap_or_default();
        if norm(&f.key) == n || labels.iter().any(|l| norm(l) == n) {
            return Some(Target::Field(i));
        }
        if f.ty == FieldType::Money && norm(&crate::model::currency_column(&f.key)) == n {
            return Some(Target::Currency(i));
        }
    }
    None
}

/// Map a sheet (header row + data rows) onto entity `e`; `header_row` is the sheet row number of
/// the header (data rows follow it). Times without an offset are read in `tz` (the app's time
/// zone).
pub fn map(
    e: &Entity,
    headers: &[String],
    rows: &[Vec<Cell>],
    header_row: usize,
    tz: chrono_tz::Tz,
    lookups: &Lookups,
) -> Mapped {
    let mut problems = vec![];
    let mut targets: Vec<Option<Target>> = vec![];
    for (c, h) in headers.iter().enumerate() {
        let t = if h.trim().is_empty() {
            None
        } else {
            match_header(e, h)
        };
        // System columns of an export (id, created_at …) are read-only: skipped, not refused.
        // Formula columns of an export are computed again on import.
        let computed = matches!(t, Some(Target::Field(i)) if matches!(e.fields[i].ty, FieldType::Formula | FieldType::Summary));
        let t = if computed { None } else { t };
        let system = computed || crate::model::SYSTEM_COLUMNS.contains(&norm(h).as_str());
        if t.is_none() && !h.trim().is_empty() && !system {
            problems.push(CellProblem {
                row: header_row,
                column: column_letter(c),
                header: h.clone(),
                code: "unknown_column",
                message: format!("`{h}` is not a field of {} (by key or label).", e.label),
            });
        }
        if let Some(t) = &t {
            if let Some(first) = targets
                .iter()
                .position(|x: &Option<Target>| x.as_ref() == Some(t))
            {
                problems.push(CellProblem {
                    row: header_row,
                    column: column_letter(c),
                    header: h.clone(),
                    code: "duplicate_column",
                    message: format!(
                        "`{h}` names the same field as column {}.",
                        column_letter(first)
                    ),
                });
            }
        }
        targets.push(t);
    }
    let mut records = vec![];
    let mut row_numbers = vec![];
    for (r, row) in rows.iter().enumerate() {
        if row.iter().all(Cell::is_empty) {
            continue;
        }
        let sheet_row = header_row + 1 + r;
        let mut obj = Map::new();
        let mut currencies: Vec<(usize, String)> = vec![];
        for (c, cell) in row.iter().enumerate() {
            let Some(Some(t)) = targets.get(c).cloned() else {
                continue;
            };
            if cell.is_empty() {
                continue;
            }
            let bad = |code: &'static str, message: String| CellProblem {
                row: sheet_row,
                column: column_letter(c),
                header: headers[c].clone(),
                code,
                message,
            };
            match t {
                Target::Owner => match lookups.users.get(&norm(&cell.text())) {
                    Some(id) => {
                        obj.insert("owner".into(), json!(id));
                    }
                    None if Uuid::parse_str(&cell.text()).is_ok() => {
                        obj.insert("owner".into(), json!(cell.text()));
                    }
                    None => problems.push(bad(
                        "not_found",
                        format!("No user has the email `{}`.", cell.text()),
                    )),
                },
                Target::Currency(i) => currencies.push((i, cell.text().to_uppercase())),
                Target::Field(i) => {
                    let f = &e.fields[i];
                    match convert(f, cell, tz, lookups) {
                        Ok(v) => {
                            obj.insert(f.key.clone(), v);
                        }
                        Err(m) => problems.push(bad("bad_cell", format!("{}: {m}", f.label))),
                    }
                }
            }
        }
        for (i, cur) in currencies {
            let key = &e.fields[i].key;
            if let Some(amount) = obj.get(key).cloned() {
                obj.insert(key.clone(), json!({"amount": amount, "currency": cur}));
            }
        }
        records.push(Json::Object(obj));
        row_numbers.push(sheet_row);
    }
    Mapped {
        records,
        rows: row_numbers,
        problems,
        headers: headers.to_vec(),
        targets,
    }
}

fn option_key(f: &Field, text: &str) -> Result<String, String> {
    let n = norm(text);
    let mut choices: Vec<(String, Vec<&str>)> = vec![];
    if f.ty == FieldType::Stage {
        for s in &f.def.stages {
            choices.push((
                s.key.clone(),
                s.label.as_ref().map(|l| l.all()).unwrap_or_default(),
            ));
        }
    } else {
        for o in &f.def.options {
            choices.push((
                o.key.clone(),
                o.label.as_ref().map(|l| l.all()).unwrap_or_default(),
            ));
        }
    }
    choices
        .iter()
        .find(|(k, labels)| norm(k) == n || labels.iter().any(|l| norm(l) == n))
        .map(|(k, _)| k.clone())
        .ok_or_else(|| {
            format!(
                "`{text}` is not one of {}.",
                choices
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// A number as a person typed it: currency signs and spaces are dropped, commas are accepted only
/// as thousands separators (`1,200.50`); anything else (`2 to 3`, `5%`, `0,05`) is refused.
fn number_text(s: &str) -> Option<String> {
    static PLAIN: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(r"^-?[0-9]+(\.[0-9]+)?$").unwrap());
    static GROUPED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^-?[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?$").unwrap()
    });
    let t: String = s
        .trim()
        .trim_start_matches(['¥', '￥', '$', '€', '£'])
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let t = t.trim_start_matches(['¥', '￥', '$', '€', '£']);
    if PLAIN.is_match(t) {
        Some(t.to_owned())
    } else if GROUPED.is_match(t) {
        Some(t.replace(',', ""))
    } else {
        None
    }
}

/// Dates as spreadsheets and people write them.
pub fn parse_date(s: &str) -> Option<NaiveDate> {
    let s = s.trim();
    for fmt in [
        "%Y-%m-%d",
        "%Y/%m/%d",
        "%Y.%m.%d",
        "%Y年%m月%d日",
        "%m/%d/%Y",
        "%d.%m.%Y",
        "%Y%m%d",
    ] {
        if let Ok(d) = NaiveDate::parse_from_str(s, fmt) {
            return Some(d);
        }
    }
    // A date with a time part: keep the date.
    parse_naive_datetime(s).map(|t| t.date())
}

fn parse_naive_datetime(s: &str) -> Option<NaiveDateTime> {
    for fmt in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y/%m/%d %H:%M:%S",
        "%Y/%m/%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s.trim(), fmt) {
            return Some(t);
        }
    }
    None
}

fn convert(f: &Field, cell: &Cell, tz: chrono_tz::Tz, lookups: &Lookups) -> Result<Json, String> {
    let text = cell.text();
    Ok(match f.ty {
        FieldType::Text
        | FieldType::LongText
        | FieldType::Email
        | FieldType::Phone
        | FieldType::Url => json!(text),
        FieldType::Integer => match cell {
            Cell::Number(n) if n.fract() == 0.0 => json!(*n as i64),
            _ => json!(number_text(&text)
                .and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| format!("`{text}` is not a whole number."))?),
        },
        FieldType::Decimal | FieldType::Money => match cell {
            // Spreadsheet numbers are binary floats; their shortest text is what the user saw.
            // Excel keeps 15 significant digits; past them a float is noise (112.99999999999999).
            Cell::Number(n) => json!(rust_decimal::Decimal::try_from(*n)
                .map(|d| d.round_sf(15).unwrap_or(d).normalize().to_string())
                .unwrap_or_else(|_| n.to_string())),
            _ => {
                json!(number_text(&text).ok_or_else(|| format!(
                    "`{text}` is not a number such as 1200.50 or ¥1,200.50."
                ))?)
            }
        },
        FieldType::Boolean => match cell {
            Cell::Bool(b) => json!(b),
            _ => match norm(&text).as_str() {
                "true" | "yes" | "y" | "1" | "是" | "对" | "√" => json!(true),
                "false" | "no" | "n" | "0" | "否" | "不" | "×" => json!(false),
                _ => return Err(format!("`{text}` is not yes or no.")),
            },
        },
        FieldType::Date => match cell {
            Cell::DateTime(t) => json!(t.date().to_string()),
            _ => json!(parse_date(&text)
                .ok_or_else(|| format!(
                    "`{text}` is not a date (such as 2026-03-31 or 2026/3/31)."
                ))?
                .to_string()),
        },
        FieldType::Datetime => {
            let naive = match cell {
                Cell::DateTime(t) => Some(*t),
                _ => parse_naive_datetime(&text),
            };
            match naive {
                Some(t) => {
                    let local = tz
                        .from_local_datetime(&t)
                        .earliest()
                        .ok_or_else(|| format!("`{text}` does not exist in {tz}."))?;
                    crate::values::datetime_json(&local.with_timezone(&chrono::Utc))
                }
                None => match chrono::DateTime::parse_from_rfc3339(&text) {
                    Ok(t) => crate::values::datetime_json(&t.with_timezone(&chrono::Utc)),
                    Err(_) => {
                        return Err(format!(
                            "`{text}` is not a date and time (such as 2026-03-31 14:30)."
                        ))
                    }
                },
            }
        }
        FieldType::Select | FieldType::Stage => json!(option_key(f, &text)?),
        FieldType::Multiselect => {
            let parts: Vec<&str> = text
                .split([',', ';', '、', '，', '；'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            json!(parts
                .iter()
                .map(|p| option_key(f, p))
                .collect::<Result<Vec<_>, _>>()?)
        }
        FieldType::User => match lookups.users.get(&norm(&text)) {
            Some(id) => json!(id),
            None if Uuid::parse_str(&text).is_ok() => json!(text),
            None => return Err(format!("no user has the email `{text}`.")),
        },
        FieldType::Relation => match lookups
            .relations
            .get(&f.key)
            .and_then(|m| m.get(&norm(&text)))
        {
            Some(id) if id.is_nil() => {
                return Err(format!(
                    "more than one record is called `{text}` (in different cases); use its id."
                ))
            }
            Some(id) => json!(id),
            None if Uuid::parse_str(&text).is_ok() => json!(text),
            None => {
                return Err(format!(
                    "no {} is called `{text}`.",
                    f.def.entity.as_deref().unwrap_or("record")
                ))
            }
        },
        FieldType::Json => {
            serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))?
        }
        FieldType::Formula => {
            return Err("is computed by its formula; leave the column out.".into())
        }
        FieldType::Summary => {
            return Err("is kept from the related records; leave the column out.".into())
        }
    })
}

/// The text of a field value for a spreadsheet cell (the inverse of reading it).
pub fn cell_text(f: &Field, v: &Json) -> String {
    match (f.ty, v) {
        (_, Json::Null) => String::new(),
        (FieldType::Money, Json::Object(m)) => m
            .get("amount")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned(),
        (FieldType::Multiselect, Json::Array(a)) => a
            .iter()
            .filter_map(Json::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        (FieldType::Json, v) => v.to_string(),
        (_, Json::String(s)) => s.clone(),
        (_, v) => v.to_string(),
    }
}
