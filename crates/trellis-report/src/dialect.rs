//! The SQL that differs between SQLite and PostgreSQL, behind one trait.
//!
//! Everything else the compiler emits is the portable core both engines share (CASE, COUNT with
//! CASE instead of FILTER, NULLIF, window functions). Identifiers reach SQL only through
//! [`trellis_form::db::quote`]; values only as bound parameters.

use crate::time::{Grain, Offsets};
use trellis_form::db::{Backend, Sql, Value};
use trellis_form::model::ColKind;

/// What a backend spells its own way.
pub trait Dialect: Sync {
    /// The backend.
    fn backend(&self) -> Backend;
    /// `x` as a floating-point number, so `/` never divides integers.
    fn real(&self, x: &str) -> String;
    /// An aggregate result as the type the engine decodes numbers with.
    fn number(&self, x: &str) -> String;
    /// Days (fractional) from instant or date `a` to `b`.
    fn days_between(&self, a: &str, b: &str) -> String;
    /// SQL that is true when instant `later` is less than `days` days after `earlier` (days
    /// bound as an integer parameter).
    fn within(&self, later: &str, earlier: &str, days: &str) -> String;
    /// The local start date (`YYYY-MM-DD` text) of the bucket of `col` in the query's time zone.
    fn bucket(&self, sql: &mut Sql, col: &str, kind: ColKind, grain: Grain, tz: &Offsets)
        -> String;
    /// The text value of a JSON history value column (a stage key).
    fn json_text(&self, col: &str) -> String;
    /// Whether percentiles are a native ordered-set aggregate.
    fn native_percentile(&self) -> bool;
    /// A literal boolean.
    fn bool_lit(&self, b: bool) -> &'static str;
    /// The number of rows for which `cond` is true (0 over no rows).
    fn count_if(&self, cond: &str) -> String;
    /// `col IN (the ids of the JSON array of text in parameter p)`.
    fn ids_in(&self, col: &str, p: &str) -> String;
    /// A text key of values (equal values give equal keys, NULL included).
    fn json_key(&self, items: &[String]) -> String;
    /// The number of rows for which the correlated `EXISTS (…)` `exists` is true.
    fn count_exists(&self, exists: &str) -> String {
        self.count_if(exists)
    }
}

/// SQLite.
pub struct Sqlite;
/// PostgreSQL.
pub struct Postgres;

/// The dialect of a backend.
pub fn of(backend: Backend) -> &'static dyn Dialect {
    match backend {
        Backend::Sqlite => &Sqlite,
        Backend::Postgres => &Postgres,
    }
}

impl Dialect for Sqlite {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }
    fn real(&self, x: &str) -> String {
        format!("CAST({x} AS REAL)")
    }
    fn number(&self, x: &str) -> String {
        x.to_owned()
    }
    fn days_between(&self, a: &str, b: &str) -> String {
        format!("(julianday({b}) - julianday({a}))")
    }
    fn within(&self, later: &str, earlier: &str, days: &str) -> String {
        // Compared as Julian days: stored instants are fixed-width text, and a computed
        // `strftime` text would not share their format.
        format!("julianday({later}) < julianday({earlier}) + {days}")
    }
    fn bucket(
        &self,
        _sql: &mut Sql,
        col: &str,
        kind: ColKind,
        grain: Grain,
        tz: &Offsets,
    ) -> String {
        // Local time: the UTC text shifted by the zone's offset at that instant. The offsets
        // change at DST transitions, which the compiler worked out for the query's range.
        let local = if kind == ColKind::Date {
            col.to_owned()
        } else {
            match tz.transitions.as_slice() {
                [] => format!("datetime({col}, '{} seconds')", tz.initial),
                ts => {
                    let mut case = String::from("CASE");
                    let mut prev = tz.initial;
                    for (at, off) in ts {
                        case.push_str(&format!(" WHEN {col} < '{at}' THEN '{prev} seconds'"));
                        prev = *off;
                    }
                    case.push_str(&format!(" ELSE '{prev} seconds' END"));
                    format!("datetime({col}, {case})")
                }
            }
        };
        // `local` is `YYYY-MM-DD` text (a date column, a rollup's day bucket) or `datetime()`'s
        // `YYYY-MM-DD HH:MM:SS`, so day, month, quarter and year are cut from the text: parsing
        // it again with `date()` cost a day-bucketed rollup 85 of 103 ms over 35k rows
        // (docs/benchmarks.md). A quarter's first month is looked up from the month number.
        match grain {
            Grain::Day => format!("substr({local}, 1, 10)"),
            Grain::Week(start) => format!("date({local}, '-6 days', 'weekday {start}')"),
            Grain::Month => format!("substr({local}, 1, 7) || '-01'"),
            Grain::Quarter => format!(
                "substr({local}, 1, 5) || substr('010101040404070707101010', CAST(substr({local}, 6, 2) AS INTEGER) * 2 - 1, 2) || '-01'"
            ),
            Grain::Year => format!("substr({local}, 1, 4) || '-01-01'"),
        }
    }
    fn json_text(&self, col: &str) -> String {
        format!("json_extract({col}, '$')")
    }
    fn ids_in(&self, col: &str, p: &str) -> String {
        format!("{col} IN (SELECT \"value\" FROM json_each({p}))")
    }
    fn json_key(&self, items: &[String]) -> String {
        format!("json_array({})", items.join(", "))
    }
    fn native_percentile(&self) -> bool {
        false
    }
    fn bool_lit(&self, b: bool) -> &'static str {
        if b {
            "1"
        } else {
            "0"
        }
    }
    fn count_if(&self, cond: &str) -> String {
        format!("COUNT(CASE WHEN {cond} THEN 1 END)")
    }
    fn count_exists(&self, exists: &str) -> String {
        // EXISTS is 0 or 1 here, so a sum counts it; measured 6x faster than COUNT(CASE WHEN
        // EXISTS …) over 2.8 million leads (docs/benchmarks.md), while for plain conditions
        // COUNT(CASE …) is the faster form.
        format!("COALESCE(SUM({exists}), 0)")
    }
}

impl Dialect for Postgres {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }
    fn real(&self, x: &str) -> String {
        format!("CAST({x} AS NUMERIC)")
    }
    fn number(&self, x: &str) -> String {
        format!("CAST({x} AS NUMERIC)")
    }
    fn days_between(&self, a: &str, b: &str) -> String {
        format!(
            "(EXTRACT(EPOCH FROM (CAST({b} AS TIMESTAMPTZ) - CAST({a} AS TIMESTAMPTZ))) / 86400.0)"
        )
    }
    fn within(&self, later: &str, earlier: &str, days: &str) -> String {
        format!("{later} < {earlier} + {days} * INTERVAL '1 day'")
    }
    fn bucket(
        &self,
        sql: &mut Sql,
        col: &str,
        kind: ColKind,
        grain: Grain,
        tz: &Offsets,
    ) -> String {
        let local = if kind == ColKind::Date {
            format!("CAST({col} AS TIMESTAMP)")
        } else {
            let zone = sql.param(Value::Text(tz.zone.clone()));
            format!("({col} AT TIME ZONE CAST({zone} AS TEXT))")
        };
        let trunc = match grain {
            Grain::Day => format!("date_trunc('day', {local})"),
            // date_trunc weeks start on Monday; a Sunday week is the Monday week of the next day,
            // moved back one day.
            Grain::Week(1) => format!("date_trunc('week', {local})"),
            Grain::Week(d) => format!(
                "(date_trunc('week', {local} + INTERVAL '{} day') - INTERVAL '{} day')",
                (8 - d) % 7,
                (8 - d) % 7
            ),
            Grain::Month => format!("date_trunc('month', {local})"),
            Grain::Quarter => format!("date_trunc('quarter', {local})"),
            Grain::Year => format!("date_trunc('year', {local})"),
        };
        format!("to_char({trunc}, 'YYYY-MM-DD')")
    }
    fn json_text(&self, col: &str) -> String {
        format!("({col} #>> '{{}}')")
    }
    fn ids_in(&self, col: &str, p: &str) -> String {
        format!("{col} IN (SELECT CAST(\"value\" AS UUID) FROM jsonb_array_elements_text(CAST({p} AS JSONB)))")
    }
    fn json_key(&self, items: &[String]) -> String {
        format!("CAST(jsonb_build_array({}) AS TEXT)", items.join(", "))
    }
    fn native_percentile(&self) -> bool {
        true
    }
    fn bool_lit(&self, b: bool) -> &'static str {
        if b {
            "TRUE"
        } else {
            "FALSE"
        }
    }
    fn count_if(&self, cond: &str) -> String {
        format!("COUNT(*) FILTER (WHERE {cond})")
    }
}
