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

/// The zone's offset at the instant `col` (stored UTC text) as a `datetime()` modifier
/// (`'3600 seconds'`). With transitions it is a balanced tree of comparisons, so a row costs
/// log2(n) of them rather than n: a linear `CASE` over the 80 transitions of Europe/Berlin in
/// 2000–2040 took a monthly grouping of 1M rows 4.4–5.0 s against 2.3 s for the tree and for a
/// fixed offset (docs/benchmarks.md).
pub(crate) fn offset_modifier(col: &str, tz: &Offsets) -> String {
    // offsets[i] holds before transitions[i], offsets[n] after the last one.
    let offsets: Vec<i32> = std::iter::once(tz.initial)
        .chain(tz.transitions.iter().map(|(_, o)| *o))
        .collect();
    fn node(col: &str, offsets: &[i32], at: &[(String, i32)], lo: usize, hi: usize) -> String {
        if lo == hi {
            return format!("'{} seconds'", offsets[lo]);
        }
        // Before transition `mid` the offset is one of offsets[lo..=mid], else of the rest.
        let mid = lo + (hi - lo) / 2;
        format!(
            "CASE WHEN {col} < '{}' THEN {} ELSE {} END",
            at[mid].0,
            node(col, offsets, at, lo, mid),
            node(col, offsets, at, mid + 1, hi)
        )
    }
    node(col, &offsets, &tz.transitions, 0, offsets.len() - 1)
}

/// The bucket of instant `col` (stored UTC text) found among a range's buckets by comparing it
/// with their starts, in a balanced tree: `starts` holds each bucket's label (its local start
/// date) and the UTC instant it starts at. Only for a column the query already restricts to
/// `[first start, end)`: the first bucket takes whatever lies before the second. It replaces
/// shifting every row with `datetime()` and cutting the text, so a quarterly grouping of 545k
/// rows took 0.36 s instead of 1.0 s (docs/benchmarks.md); daylight saving time needs nothing
/// more, since each start is the instant of that local midnight.
pub(crate) fn bucket_tree(col: &str, starts: &[(String, String)]) -> String {
    fn node(col: &str, starts: &[(String, String)], lo: usize, hi: usize) -> String {
        if lo == hi {
            return format!("'{}'", starts[lo].0);
        }
        // Before bucket `mid + 1` starts, the bucket is one of lo..=mid, else of the rest.
        let mid = lo + (hi - lo) / 2;
        format!(
            "CASE WHEN {col} < '{}' THEN {} ELSE {} END",
            starts[mid + 1].1,
            node(col, starts, lo, mid),
            node(col, starts, mid + 1, hi)
        )
    }
    match starts.len() {
        0 => "NULL".to_owned(),
        n => node(col, starts, 0, n - 1),
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
            format!("datetime({col}, {})", offset_modifier(col, tz))
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Datelike, Duration, Offset, TimeZone, Utc};
    use chrono_tz::Tz;
    use trellis_form::db::sqlite_datetime;

    /// Zones with northern, southern, abolished and no daylight saving time.
    const ZONES: [&str; 5] = [
        "Europe/Berlin",
        "America/New_York",
        "Australia/Sydney",
        "America/Sao_Paulo",
        "Asia/Shanghai",
    ];
    /// Zones whose clocks change at midnight (a local midnight that does not exist, or happens
    /// twice).
    const MIDNIGHT_ZONES: [&str; 3] = ["America/Santiago", "America/Havana", "Africa/Cairo"];

    /// The tree for no, one and three transitions, written out.
    #[test]
    fn the_offset_tree_for_few_transitions() {
        let offs = |ts: &[(&str, i32)]| Offsets {
            zone: "X".into(),
            initial: 3600,
            transitions: ts.iter().map(|(a, o)| ((*a).to_owned(), *o)).collect(),
        };
        assert_eq!(offset_modifier("x", &offs(&[])), "'3600 seconds'");
        assert_eq!(
            offset_modifier("x", &offs(&[("a", 7200)])),
            "CASE WHEN x < 'a' THEN '3600 seconds' ELSE '7200 seconds' END"
        );
        assert_eq!(
            offset_modifier("x", &offs(&[("a", 7200), ("b", 3600), ("c", 0)])),
            "CASE WHEN x < 'b' THEN CASE WHEN x < 'a' THEN '3600 seconds' ELSE '7200 seconds' END \
             ELSE CASE WHEN x < 'c' THEN '3600 seconds' ELSE '0 seconds' END END"
        );
    }

    /// The bucket tree written out for one, two and three buckets.
    #[test]
    fn the_bucket_tree_for_few_buckets() {
        let starts = |n: usize| -> Vec<(String, String)> {
            ["a", "b", "c"][..n]
                .iter()
                .map(|l| (format!("{l}-day"), format!("{l}-utc")))
                .collect()
        };
        assert_eq!(bucket_tree("x", &[]), "NULL");
        assert_eq!(bucket_tree("x", &starts(1)), "'a-day'");
        assert_eq!(
            bucket_tree("x", &starts(2)),
            "CASE WHEN x < 'b-utc' THEN 'a-day' ELSE 'b-day' END"
        );
        assert_eq!(
            bucket_tree("x", &starts(3)),
            "CASE WHEN x < 'c-utc' THEN CASE WHEN x < 'b-utc' THEN 'a-day' ELSE 'b-day' END \
             ELSE 'c-day' END"
        );
    }

    /// Within a range, the bucket tree puts every instant in the bucket that shifting it into
    /// local time with `datetime()` gives: a second before and at each bucket's start and each
    /// transition of 2025–2026, and every seven hours, for every grain, in zones with
    /// northern, southern and no daylight saving time, and zones whose clocks change at
    /// midnight (a local midnight that does not exist, or happens twice).
    #[tokio::test]
    async fn the_bucket_tree_agrees_with_local_time() {
        use crate::time::Grain;
        let t = trellis_form::testing::sqlite().await;
        let (f, to) = (
            chrono::NaiveDate::from_ymd_opt(2025, 1, 1).unwrap(),
            chrono::NaiveDate::from_ymd_opt(2026, 12, 30).unwrap(),
        );
        for zone in ZONES.into_iter().chain(MIDNIGHT_ZONES) {
            let tz: Tz = zone.parse().unwrap();
            let (lo, hi) = (
                crate::time::local_midnight(tz, f),
                crate::time::local_midnight(tz, to),
            );
            let offs = crate::engine::bucket_offsets(ColKind::DateTime, tz, Some((f, to)));
            for grain in [
                Grain::Day,
                Grain::Week(1),
                Grain::Week(0),
                Grain::Month,
                Grain::Quarter,
                Grain::Year,
            ] {
                let mut instants: Vec<DateTime<Utc>> = vec![];
                let mut edges: Vec<DateTime<Utc>> = offs
                    .transitions
                    .iter()
                    .map(|(at, _)| DateTime::parse_from_rfc3339(at).unwrap().to_utc())
                    .collect();
                edges.extend(
                    crate::time::buckets(grain, f, to)
                        .into_iter()
                        .map(|d| crate::time::local_midnight(tz, d)),
                );
                for e in edges {
                    instants.extend([e - Duration::seconds(1), e]);
                }
                let mut x = lo;
                while x < hi {
                    instants.push(x);
                    x += Duration::hours(7);
                }
                instants.retain(|i| *i >= lo && *i < hi);
                let texts: Vec<String> = instants.iter().map(sqlite_datetime).collect();
                let mut sql = Sql::default();
                let p = sql.param(Value::Text(serde_json::to_string(&texts).unwrap()));
                let col = "j.\"value\"";
                let tree = crate::engine::bucket(
                    &Sqlite,
                    &mut sql,
                    col,
                    ColKind::DateTime,
                    grain,
                    tz,
                    Some((f, to)),
                );
                assert!(!tree.contains("datetime("), "{zone} {grain:?}: {tree}");
                let shifted = Sqlite.bucket(&mut sql, col, ColKind::DateTime, grain, &offs);
                sql.text =
                    format!("SELECT {tree}, {shifted} FROM json_each({p}) j ORDER BY j.\"key\"");
                let got =
                    t.db.fetch_all(&sql, &[ColKind::Text, ColKind::Text])
                        .await
                        .unwrap();
                assert_eq!(got.len(), instants.len(), "{zone} {grain:?}");
                for (i, row) in instants.iter().zip(got) {
                    assert_eq!(row[0], row[1], "{zone} {grain:?} at {i}");
                }
            }
        }
        t.cleanup().await;
    }

    /// SQLite's local time through the offset tree, against the zone database, one second
    /// before and at every transition of 2000–2040 and every ten days in between, for zones
    /// with northern, southern, abolished and no daylight saving time.
    #[tokio::test]
    async fn the_offset_tree_gives_the_zone_databases_local_time() {
        let t = trellis_form::testing::sqlite().await;
        for zone in ZONES {
            let tz: Tz = zone.parse().unwrap();
            let offs = crate::engine::bucket_offsets(ColKind::DateTime, tz, None);
            let mut instants: Vec<DateTime<Utc>> = vec![];
            for (at, _) in &offs.transitions {
                let at = DateTime::parse_from_rfc3339(at)
                    .unwrap()
                    .with_timezone(&Utc);
                instants.extend([at - Duration::seconds(1), at]);
            }
            let mut x = Utc.with_ymd_and_hms(2000, 1, 3, 12, 34, 56).unwrap();
            while x.year() < 2040 {
                instants.push(x);
                x += Duration::days(10);
            }
            let texts: Vec<String> = instants.iter().map(sqlite_datetime).collect();
            let mut sql = Sql::default();
            let p = sql.param(Value::Text(serde_json::to_string(&texts).unwrap()));
            let m = offset_modifier("j.\"value\"", &offs);
            sql.text = format!(
                "SELECT datetime(j.\"value\", {m}) FROM json_each({p}) j ORDER BY j.\"key\""
            );
            let got = t.db.fetch_all(&sql, &[ColKind::Text]).await.unwrap();
            assert_eq!(got.len(), instants.len(), "{zone}");
            for (i, row) in instants.iter().zip(got) {
                let off = tz.offset_from_utc_datetime(&i.naive_utc()).fix();
                let want = (*i + Duration::seconds(i64::from(off.local_minus_utc())))
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string();
                assert_eq!(row[0], Value::Text(want), "{zone} at {i}");
            }
            if zone == "Asia/Shanghai" {
                assert_eq!(m, "'28800 seconds'", "no transitions, no CASE");
            } else {
                let n = offs.transitions.len();
                assert!(n > 30, "{zone}: {n}");
                // One comparison per transition, nested no deeper than a balanced tree.
                assert_eq!(m.matches("CASE WHEN").count(), n, "{zone}");
                let (mut depth, mut deepest) = (0, 0);
                for w in m.split(' ') {
                    match w {
                        "CASE" => {
                            depth += 1;
                            deepest = deepest.max(depth);
                        }
                        "END" => depth -= 1,
                        _ => {}
                    }
                }
                let bound = (n as f64 + 1.0).log2().ceil() as i32;
                assert!(
                    deepest <= bound,
                    "{zone}: depth {deepest} over {n} transitions"
                );
            }
        }
        t.cleanup().await;
    }
}
