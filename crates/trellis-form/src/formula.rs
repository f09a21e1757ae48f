//! Formula fields: a rhai expression over the record's other fields, computed on every write
//! and stored in its own column, so reports and filters can use it.
//!
//! The engine is sandboxed: no modules, no time functions, no floats (numbers are exact
//! decimals, so `amount * 0.13` keeps its cents), and limits on operations, call depth,
//! expression depth and string, array and map sizes. A runaway formula stops with an error
//! naming the field instead of hanging a write.

use crate::def::FieldType;
use crate::model::{ColKind, Field};
use rhai::{Dynamic, Engine, EvalAltResult, Scope, AST};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json};
use std::sync::Arc;

/// The type a formula's result is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultType {
    /// An exact decimal with the field's `scale` (default 2).
    Decimal,
    /// A whole number.
    Integer,
    /// Text.
    Text,
    /// true / false.
    Boolean,
    /// A date, `YYYY-MM-DD`.
    Date,
}

impl ResultType {
    /// The column kind of the stored result.
    pub fn col_kind(self) -> ColKind {
        match self {
            ResultType::Decimal => ColKind::Decimal,
            ResultType::Integer => ColKind::Int,
            ResultType::Text => ColKind::Text,
            ResultType::Boolean => ColKind::Bool,
            ResultType::Date => ColKind::Date,
        }
    }
}

/// Most operations one formula may take.
pub const MAX_OPERATIONS: u64 = 50_000;

/// A compiled formula.
#[derive(Debug)]
pub struct Formula {
    engine: Arc<Engine>,
    ast: AST,
    /// The stored type.
    pub result: ResultType,
}

/// The limits every rhai engine of Trellis runs under (formulas and workflow conditions):
/// operations, call depth, expression depth, string, array and map sizes, strict variables, and
/// `print`/`debug` going nowhere.
pub fn sandbox(e: &mut Engine) {
    e.set_max_operations(MAX_OPERATIONS)
        .set_max_call_levels(16)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(10_000)
        .set_max_array_size(1_000)
        .set_max_map_size(1_000)
        .set_strict_variables(true);
    e.on_print(|_| {});
    e.on_debug(|_, _, _| {});
    // `eval("am" + "ount")` would read a field no check can see in the text.
    e.disable_symbol("eval");
}

/// The sandboxed engine every formula of an app shares.
pub fn engine() -> Engine {
    let mut e = Engine::new();
    sandbox(&mut e);
    e.register_fn(
        "days_between",
        |a: &str, b: &str| -> Result<rhai::INT, Box<EvalAltResult>> {
            let d = |s: &str| -> Result<chrono::NaiveDate, Box<EvalAltResult>> {
                chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .map_err(|_| format!("`{s}` is not a date").into())
            };
            let (a, b): (chrono::NaiveDate, chrono::NaiveDate) = (d(a)?, d(b)?);
            Ok((b - a).num_days())
        },
    );
    e.register_fn(
        "add_days",
        |a: &str, n: rhai::INT| -> Result<String, Box<EvalAltResult>> {
            let d = chrono::NaiveDate::parse_from_str(a, "%Y-%m-%d")
                .map_err(|_| format!("`{a}` is not a date"))?;
            chrono::Duration::try_days(n)
                .and_then(|days| d.checked_add_signed(days))
                .map(|d| d.to_string())
                .ok_or_else(|| format!("{n} days from {a} is out of range").into())
        },
    );
    e
}

/// Compile `text`. Unknown names are caught here by running the formula once over sample
/// values of every field (`strict_variables`).
pub fn compile(
    engine: &Arc<Engine>,
    text: &str,
    result: ResultType,
    fields: &[(String, FieldType)],
) -> Result<Formula, String> {
    let mut scope = Scope::new();
    for (k, ty) in fields {
        scope.push_dynamic(k.clone(), sample(*ty));
    }
    // Not a constant: a constant in the compile scope would be folded into the AST.
    scope.push("today", "2026-01-01".to_owned());
    let ast = engine
        .compile_expression_with_scope(&scope, text)
        .map_err(|e| e.to_string())?;
    // Every sample value is set, so a missing function here is a misspelt name or arguments of
    // the wrong types, not an empty field.
    match engine.eval_ast_with_scope::<Dynamic>(&mut scope, &ast) {
        Err(e)
            if matches!(
                *e,
                EvalAltResult::ErrorVariableNotFound(..) | EvalAltResult::ErrorFunctionNotFound(..)
            ) =>
        {
            return Err(e.to_string())
        }
        _ => {}
    }
    Ok(Formula {
        engine: engine.clone(),
        ast,
        result,
    })
}

fn sample(ty: FieldType) -> Dynamic {
    match ty {
        FieldType::Integer => Dynamic::from(1 as rhai::INT),
        FieldType::Decimal | FieldType::Money | FieldType::Formula => Dynamic::from(Decimal::ONE),
        FieldType::Boolean => Dynamic::from(true),
        FieldType::Date => Dynamic::from("2026-01-01".to_owned()),
        FieldType::Multiselect => Dynamic::from(rhai::Array::new()),
        _ => Dynamic::from(String::new()),
    }
}

fn to_dynamic(f: &Field, v: &Json) -> Dynamic {
    match (f.ty, v) {
        (_, Json::Null) => Dynamic::UNIT,
        (FieldType::Money, Json::Object(m)) => to_dynamic_decimal(m.get("amount")),
        (FieldType::Decimal, v) => to_dynamic_decimal(Some(v)),
        (FieldType::Formula, v)
            if f.formula
                .as_ref()
                .is_some_and(|x| x.result == ResultType::Decimal) =>
        {
            to_dynamic_decimal(Some(v))
        }
        (_, Json::Bool(b)) => Dynamic::from(*b),
        (_, Json::Number(n)) => n.as_i64().map(Dynamic::from).unwrap_or(Dynamic::UNIT),
        (_, Json::String(s)) => Dynamic::from(s.clone()),
        (_, Json::Array(a)) => Dynamic::from(
            a.iter()
                .map(|x| Dynamic::from(x.as_str().unwrap_or_default().to_owned()))
                .collect::<rhai::Array>(),
        ),
        (_, other) => Dynamic::from(other.to_string()),
    }
}

fn to_dynamic_decimal(v: Option<&Json>) -> Dynamic {
    v.and_then(Json::as_str)
        .and_then(|s| s.parse::<Decimal>().ok())
        .map(Dynamic::from)
        .unwrap_or(Dynamic::UNIT)
}

impl Formula {
    /// Evaluate over the record's normalized field values; `today` is the date of the write in
    /// the app's time zone. An empty input field makes arithmetic on it give an empty result.
    pub fn eval(
        &self,
        field: &Field,
        fields: &[Field],
        values: &Map<String, Json>,
        today: &str,
    ) -> Result<Json, String> {
        let mut scope = Scope::new();
        for f in fields {
            if f.key != field.key {
                scope.push_dynamic(
                    f.key.clone(),
                    to_dynamic(f, values.get(&f.key).unwrap_or(&Json::Null)),
                );
            }
        }
        scope.push_constant("today", today.to_owned());
        let out = match self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut scope, &self.ast)
        {
            Ok(v) => v,
            // Arithmetic on an empty field: the result is empty, not an error.
            Err(e) if matches!(&*e, EvalAltResult::ErrorFunctionNotFound(sig, _) if sig.contains("()")) => {
                return Ok(Json::Null)
            }
            Err(e) if matches!(*e, EvalAltResult::ErrorTooManyOperations(_)) => {
                return Err(format!("it took more than {MAX_OPERATIONS} operations"))
            }
            Err(e) => return Err(e.to_string()),
        };
        if out.is_unit() {
            return Ok(Json::Null);
        }
        let wrong = |what: &str| format!("it gave {} where {what} was expected", out.type_name());
        Ok(match self.result {
            ResultType::Decimal => {
                let d = if let Some(d) = out.clone().try_cast::<Decimal>() {
                    d
                } else if let Ok(i) = out.as_int() {
                    Decimal::from(i)
                } else {
                    return Err(wrong("a number"));
                };
                crate::values::decimal_json(d, field.scale)
            }
            ResultType::Integer => {
                if let Ok(i) = out.as_int() {
                    json!(i)
                } else if let Some(d) = out.clone().try_cast::<Decimal>() {
                    json!(rust_decimal::prelude::ToPrimitive::to_i64(&d.round())
                        .ok_or_else(|| wrong("a whole number"))?)
                } else {
                    return Err(wrong("a whole number"));
                }
            }
            ResultType::Boolean => json!(out.as_bool().map_err(|_| wrong("true or false"))?),
            ResultType::Text => json!(out.to_string()),
            ResultType::Date => {
                let s = out.to_string();
                chrono::NaiveDate::parse_from_str(&s, "%Y-%m-%d").map_err(|_| wrong("a date"))?;
                json!(s)
            }
        })
    }
}
