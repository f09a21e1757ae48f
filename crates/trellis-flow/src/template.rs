//! Templates: minijinja over the same context as conditions.
//!
//! Every template of a workflow version is parsed once, when the workflow compiles, into one
//! environment keyed by its JSON path. Rendering runs with fuel (an instruction budget), a
//! recursion limit and an output cap, so a template that loops or blows up in size ends with an
//! error instead of a stuck worker. Record values are only ever data passed to a template, never
//! parsed as one.

use chrono::{DateTime, Duration, Utc};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};
use serde_json::Value as Json;
use std::io::Write;

/// Fuel (instructions) one render may use.
pub const FUEL: u64 = 50_000;
/// Nesting of includes, macros and calls.
pub const RECURSION: usize = 32;
/// Largest output of one render, in bytes.
pub const MAX_OUTPUT: usize = 256 * 1024;

/// A set of parsed templates.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a string holds template syntax at all (plain strings are used as they are).
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, Error> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
        })
        .map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("`{s}` is not a date or time"),
            )
        })
}

fn shift(s: &str, d: Option<Duration>) -> Result<String, Error> {
    let t = parse_time(s)?;
    d.and_then(|d| t.checked_add_signed(d))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "the time is out of range"))
}

impl Templates {
    /// An empty set with the limits and helpers installed.
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION);
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        // Plain text output: emails, documents and JSON values are not HTML.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.add_filter("add_hours", |s: String, n: i64| {
            shift(&s, Duration::try_hours(n))
        });
        env.add_filter("add_days", |s: String, n: i64| {
            shift(&s, Duration::try_days(n))
        });
        env.add_filter("date", |s: String| -> Result<String, Error> {
            Ok(parse_time(&s)?.format("%Y-%m-%d").to_string())
        });
        Templates { env }
    }

    /// Parse `source` under `name` (a JSON path); the error says what is wrong where.
    pub fn add(&mut self, name: &str, source: &str) -> Result<(), String> {
        self.env
            .add_template_owned(name.to_owned(), source.to_owned())
            .map_err(|e| describe(&e))
    }

    /// Render the template `name` over `ctx`.
    pub fn render(&self, name: &str, ctx: &Json) -> Result<String, String> {
        let t = self.env.get_template(name).map_err(|e| describe(&e))?;
        let mut out = Capped(Vec::new());
        match t.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WriteFailure => {
                return Err(format!(
                    "the template `{name}` produced more than {MAX_OUTPUT} bytes and was stopped"
                ))
            }
            Err(e) => return Err(describe(&e)),
        }
        String::from_utf8(out.0).map_err(|e| e.to_string())
    }
}

fn describe(e: &Error) -> String {
    match e.kind() {
        ErrorKind::OutOfFuel => format!(
            "the template ran out of its budget of {FUEL} instructions and was stopped (a loop too long?)"
        ),
        _ => {
            let mut s = e.to_string();
            if let Some(d) = e.detail() {
                if !s.contains(d) {
                    s = format!("{s}: {d}");
                }
            }
            s
        }
    }
}

struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other("output too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, ctx: Json) -> Result<String, String> {
        let mut t = Templates::new();
        t.add("t", src)?;
        t.render("t", &ctx)
    }

    #[test]
    fn renders_record_values_as_data() {
        let ctx = json!({"record": {"name": "{{ 7 * 7 }}", "amount": "10.50"}, "now": "2026-11-27T09:00:00Z"});
        assert_eq!(
            render("Hello {{ record.name }}: {{ record.amount }}", ctx.clone()).unwrap(),
            "Hello {{ 7 * 7 }}: 10.50"
        );
        assert_eq!(
            render("{{ now | add_hours(24) }}", ctx.clone()).unwrap(),
            "2026-11-28T09:00:00Z"
        );
        assert_eq!(
            render("{{ now | date }}", ctx.clone()).unwrap(),
            "2026-11-27"
        );
        // Missing values render empty, also through a missing parent.
        assert_eq!(render("[{{ record.account.name }}]", ctx).unwrap(), "[]");
    }

    #[test]
    fn runaway_templates_stop() {
        let err = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            json!({}),
        )
        .unwrap_err();
        assert!(err.contains("budget") || err.contains("bytes"), "{err}");
        let err = render(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            json!({}),
        )
        .unwrap_err();
        assert!(!err.is_empty());
        let err = render("{{ 'x' * 10000000 }}", json!({})).unwrap_err();
        assert!(!err.is_empty());
        let mut t = Templates::new();
        assert!(t.add("bad", "{% if %}").unwrap_err().contains("syntax"));
    }
}
