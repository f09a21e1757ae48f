//! Conditions: rhai expressions over `record`, `old`, `changed`, `user` and `now`.
//!
//! The engine is built from nothing (`Engine::new_raw`) with a reviewed list of packages
//! (arithmetic, logic, strings, arrays, maps) and a few date helpers; the full list of callable
//! functions is a snapshot test, so a rhai upgrade that adds one shows up in review. Every
//! evaluation runs under operation, call-depth, expression-depth, string, array and map limits: a
//! script that loops forever ends with an error after [`MAX_OPERATIONS`] operations, which takes
//! a few milliseconds.

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicMapPackage, BasicStringPackage, LogicPackage,
    MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, Scope, AST};
use rust_decimal::Decimal;
use serde_json::Value as Json;
use std::sync::Arc;

/// Operations one evaluation may take (the form engine's sandbox sets it).
pub use trellis_form::formula::MAX_OPERATIONS;

/// The sandboxed engine every condition shares.
pub fn engine() -> Engine {
    let mut e = Engine::new_raw();
    // No LanguageCorePackage: it brings `sleep` (a blocked worker) and `exit`.
    ArithmeticPackage::new().register_into_engine(&mut e);
    LogicPackage::new().register_into_engine(&mut e);
    BasicStringPackage::new().register_into_engine(&mut e);
    MoreStringPackage::new().register_into_engine(&mut e);
    BasicArrayPackage::new().register_into_engine(&mut e);
    BasicMapPackage::new().register_into_engine(&mut e);
    trellis_form::formula::sandbox(&mut e);
    // `eval` compiles text at run time: a way around compile-time checks. Off.
    e.disable_symbol("eval");
    e.register_fn(
        "decimal",
        |s: &str| -> Result<Decimal, Box<EvalAltResult>> {
            s.parse::<Decimal>()
                .map_err(|_| format!("`{s}` is not a number").into())
        },
    );
    e.register_fn("decimal", |i: rhai::INT| Decimal::from(i));
    e.register_fn("decimal", |d: Decimal| d);
    e.register_fn(
        "days_between",
        |a: &str, b: &str| -> Result<rhai::INT, Box<EvalAltResult>> {
            let (a, b) = (date(a)?, date(b)?);
            Ok((b - a).num_days())
        },
    );
    e
}

fn date(s: &str) -> Result<chrono::NaiveDate, Box<EvalAltResult>> {
    let head = s.get(..10).unwrap_or(s);
    chrono::NaiveDate::parse_from_str(head, "%Y-%m-%d")
        .map_err(|_| format!("`{s}` is not a date").into())
}

/// The variables every condition sees.
pub const VARIABLES: [&str; 9] = [
    "record", "old", "changed", "user", "now", "steps", "app", "related", "payload",
];

/// A compiled condition.
#[derive(Debug, Clone)]
pub struct Condition {
    engine: Arc<Engine>,
    ast: AST,
    /// The source text.
    pub text: String,
}

/// Compile `text` over [`VARIABLES`]: an expression, or statements whose last value is the
/// result (`let big = record.amount > decimal("100000"); big && record.region == "east"`).
pub fn compile(engine: &Arc<Engine>, text: &str) -> Result<Condition, String> {
    let mut scope = Scope::new();
    for v in VARIABLES {
        scope.push_dynamic(v, Dynamic::UNIT);
    }
    let ast = engine
        .compile_with_scope(&scope, text)
        .map_err(|e| e.to_string())?;
    Ok(Condition {
        engine: engine.clone(),
        ast,
        text: text.to_owned(),
    })
}

impl Condition {
    /// Evaluate over a context (`{"record": …, "old": …, …}`); must give a boolean. Reading a
    /// field that is empty gives `()`; comparing `()` with a value is false, not an error.
    pub fn eval(&self, ctx: &Json) -> Result<bool, String> {
        let mut scope = Scope::new();
        for v in VARIABLES {
            scope.push_dynamic(v, to_dynamic(ctx.get(v).unwrap_or(&Json::Null)));
        }
        match self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut scope, &self.ast)
        {
            Ok(d) => d.as_bool().map_err(|t| {
                format!("the condition `{}` gave a {t}, not true or false", self.text)
            }),
            // `record.region == "east"` where region is empty: () == "east" has no function.
            Err(e) if matches!(&*e, EvalAltResult::ErrorFunctionNotFound(sig, _) if sig.contains("()")) => {
                Ok(false)
            }
            Err(e) => Err(match *e {
                EvalAltResult::ErrorTooManyOperations(_) => format!(
                    "the condition `{}` ran for more than {MAX_OPERATIONS} operations and was stopped",
                    self.text
                ),
                other => format!("the condition `{}` failed: {other}", self.text),
            }),
        }
    }
}

/// JSON into rhai: integers stay integers, other numbers become decimals, numeric strings stay
/// strings (use `decimal(x)`), money objects become their amount as a decimal.
pub fn to_dynamic(v: &Json) -> Dynamic {
    match v {
        Json::Null => Dynamic::UNIT,
        Json::Bool(b) => Dynamic::from(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from(i),
            None => n
                .to_string()
                .parse::<Decimal>()
                .map(Dynamic::from)
                .unwrap_or(Dynamic::UNIT),
        },
        Json::String(s) => Dynamic::from(s.clone()),
        Json::Array(a) => Dynamic::from(a.iter().map(to_dynamic).collect::<rhai::Array>()),
        Json::Object(m) => {
            if let (Some(Json::String(amount)), Some(_), 2) =
                (m.get("amount"), m.get("currency"), m.len())
            {
                if let Ok(d) = amount.parse::<Decimal>() {
                    return Dynamic::from(d);
                }
            }
            let mut out = rhai::Map::new();
            for (k, v) in m {
                out.insert(k.as_str().into(), to_dynamic(v));
            }
            Dynamic::from(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(text: &str, ctx: Json) -> Result<bool, String> {
        let e = Arc::new(engine());
        compile(&e, text)?.eval(&ctx)
    }

    #[test]
    fn conditions_see_the_record() {
        let ctx = json!({"record": {"region": "east", "amount": {"amount": "120000.00", "currency": "CNY"}, "n": 3}, "changed": ["stage"]});
        assert_eq!(eval(r#"record.region == "east""#, ctx.clone()), Ok(true));
        assert_eq!(
            eval(r#"record.amount > decimal("100000")"#, ctx.clone()),
            Ok(true)
        );
        assert_eq!(eval(r#""stage" in changed"#, ctx.clone()), Ok(true));
        assert_eq!(eval("record.n + 1 == 4", ctx.clone()), Ok(true));
        // An empty field compares false instead of failing the run.
        assert_eq!(eval(r#"record.missing == "x""#, ctx.clone()), Ok(false));
        assert!(eval("record.n", ctx)
            .unwrap_err()
            .contains("not true or false"));
    }

    #[test]
    fn runaway_scripts_stop_quickly() {
        let started = std::time::Instant::now();
        let err = eval(
            "{ let x = 0; loop { x += 1; } x == 1 }",
            json!({"record": {}}),
        )
        .unwrap_err();
        assert!(err.contains("was stopped"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        // Unknown variables are refused at compile time.
        let e = Arc::new(engine());
        assert!(compile(&e, "recrod.x == 1").is_err());
        // No eval, sleep or exit: the functions do not exist.
        assert!(eval(r#"eval("1 == 1")"#, json!({})).is_err());
        assert!(
            compile(&e, "sleep(10); true").is_err() || eval("sleep(10); true", json!({})).is_err()
        );
    }

    #[test]
    fn function_list_is_reviewed() {
        let e = engine();
        let mut names: Vec<String> = e
            .gen_fn_signatures(true)
            .into_iter()
            .map(|s| s.split('(').next().unwrap_or_default().to_owned())
            .collect();
        names.sort();
        names.dedup();
        insta::assert_snapshot!(names.join("\n"));
    }
}
