//! Time: grains, ranges, presets and time-zone offsets, all worked out in Rust.
//!
//! Ranges are half-open `[from, to)` in local dates of the query's IANA time zone. Presets
//! resolve against the clock handed to the engine. For SQLite, which knows no time zones, the
//! UTC offsets and the DST transitions inside the queried range are computed here with
//! chrono-tz and emitted as a CASE over the instant (see [`crate::dialect`]).

use chrono::{DateTime, Datelike, Duration, NaiveDate, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// A time bucket size. Weeks carry their first day (0 = Sunday, 1 = Monday, … as SQLite's
/// `weekday N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// One day.
    Day,
    /// One week starting on the given weekday.
    Week(u8),
    /// A calendar month.
    Month,
    /// A calendar quarter.
    Quarter,
    /// A calendar year.
    Year,
}

impl Grain {
    /// Parse `day|week|month|quarter|year`; weeks start on `week_start`.
    pub fn parse(s: &str, week_start: u8) -> Option<Grain> {
        Some(match s {
            "day" => Grain::Day,
            "week" => Grain::Week(week_start),
            "month" => Grain::Month,
            "quarter" => Grain::Quarter,
            "year" => Grain::Year,
            _ => return None,
        })
    }

    /// The first day of the bucket holding `d`.
    pub fn start(self, d: NaiveDate) -> NaiveDate {
        match self {
            Grain::Day => d,
            Grain::Week(first) => {
                let back = (d.weekday().num_days_from_sunday() + 7 - u32::from(first)) % 7;
                d - Duration::days(i64::from(back))
            }
            Grain::Month => d.with_day(1).expect("day 1"),
            Grain::Quarter => {
                NaiveDate::from_ymd_opt(d.year(), (d.month() - 1) / 3 * 3 + 1, 1).expect("quarter")
            }
            Grain::Year => NaiveDate::from_ymd_opt(d.year(), 1, 1).expect("year"),
        }
    }

    /// The first day of the next bucket after the one starting at `start`.
    pub fn next(self, start: NaiveDate) -> NaiveDate {
        match self {
            Grain::Day => start + Duration::days(1),
            Grain::Week(_) => start + Duration::days(7),
            Grain::Month => add_months(start, 1),
            Grain::Quarter => add_months(start, 3),
            Grain::Year => add_months(start, 12),
        }
    }
}

/// Every bucket start in `[from, to)`.
pub fn buckets(grain: Grain, from: NaiveDate, to: NaiveDate) -> Vec<NaiveDate> {
    let mut out = vec![];
    let mut b = grain.start(from);
    while b < to && out.len() < 100_000 {
        out.push(b);
        b = grain.next(b);
    }
    out
}

/// `d` moved by `n` calendar months (the day clamped to the month's length).
pub fn add_months(d: NaiveDate, n: i32) -> NaiveDate {
    let m0 = d.year() * 12 + d.month0() as i32 + n;
    let (y, m) = (m0.div_euclid(12), m0.rem_euclid(12) as u32 + 1);
    let mut day = d.day();
    loop {
        if let Some(x) = NaiveDate::from_ymd_opt(y, m, day) {
            return x;
        }
        day -= 1;
    }
}

/// The presets a query may name, resolved against today's local date.
pub const PRESETS: [&str; 16] = [
    "today",
    "yesterday",
    "this_week",
    "last_week",
    "this_month",
    "last_month",
    "this_quarter",
    "last_quarter",
    "this_year",
    "last_year",
    "last_7_days",
    "last_30_days",
    "last_90_days",
    "last_12_months",
    "next_quarter",
    "next_12_months",
];

/// Resolve a preset to a local `[from, to)`.
pub fn preset(name: &str, today: NaiveDate, week_start: u8) -> Option<(NaiveDate, NaiveDate)> {
    let unit = |g: Grain, back: i32| {
        let mut s = g.start(today);
        for _ in 0..back {
            s = g.start(s - Duration::days(1));
        }
        (s, g.next(s))
    };
    let tomorrow = today + Duration::days(1);
    Some(match name {
        "today" => unit(Grain::Day, 0),
        "yesterday" => unit(Grain::Day, 1),
        "this_week" => unit(Grain::Week(week_start), 0),
        "last_week" => unit(Grain::Week(week_start), 1),
        "this_month" => unit(Grain::Month, 0),
        "last_month" => unit(Grain::Month, 1),
        "this_quarter" => unit(Grain::Quarter, 0),
        "last_quarter" => unit(Grain::Quarter, 1),
        "this_year" => unit(Grain::Year, 0),
        "last_year" => unit(Grain::Year, 1),
        "last_7_days" => (tomorrow - Duration::days(7), tomorrow),
        "last_30_days" => (tomorrow - Duration::days(30), tomorrow),
        "last_90_days" => (tomorrow - Duration::days(90), tomorrow),
        "last_12_months" => (
            add_months(Grain::Month.start(today), -11),
            add_months(Grain::Month.start(today), 1),
        ),
        "next_quarter" => {
            let s = Grain::Quarter.next(Grain::Quarter.start(today));
            (s, Grain::Quarter.next(s))
        }
        "next_12_months" => (
            Grain::Month.start(today),
            add_months(Grain::Month.start(today), 12),
        ),
        _ => return None,
    })
}

/// The UTC instant of local midnight starting `d` in `tz` (the first instant of the day when a
/// DST change skips midnight).
pub fn local_midnight(tz: Tz, d: NaiveDate) -> DateTime<Utc> {
    let mut t = d.and_hms_opt(0, 0, 0).expect("midnight");
    for _ in 0..48 {
        if let Some(x) = tz.from_local_datetime(&t).earliest() {
            return x.with_timezone(&Utc);
        }
        t += Duration::minutes(30);
    }
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// A zone's UTC offsets over a span: the offset at its start and each change after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Offsets {
    /// IANA name (PostgreSQL converts by name).
    pub zone: String,
    /// Offset in seconds at the start of the span.
    pub initial: i32,
    /// `(instant as SQLite text, offset in seconds from then on)`.
    pub transitions: Vec<(String, i32)>,
}

fn offset_at(tz: Tz, t: DateTime<Utc>) -> i32 {
    tz.offset_from_utc_datetime(&t.naive_utc())
        .fix()
        .local_minus_utc()
}

/// No offsets: for date values, which are local already and never shifted.
pub fn no_offsets(tz: Tz) -> Offsets {
    Offsets {
        zone: tz.name().to_owned(),
        initial: 0,
        transitions: vec![],
    }
}

/// The offsets of `tz` between two instants (with a day's margin either side).
pub fn offsets(tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Offsets {
    let from = DateTime::from_timestamp(from.timestamp() - 86_400, 0).expect("in range");
    let to = to + Duration::days(1);
    let initial = offset_at(tz, from);
    let mut transitions = vec![];
    let mut prev = initial;
    let mut t = from;
    // A day's step finds every change (no zone changes its offset twice within a day) with a
    // quarter of the lookups of a six-hour step: 40 years of a zone took 3 ms a query that way.
    let step = Duration::days(1);
    while t < to {
        let next = t + step;
        let off = offset_at(tz, next);
        if off != prev {
            // The first second with the new offset, by bisection over whole seconds.
            let (mut lo, mut hi) = (t.timestamp(), next.timestamp());
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                let at = DateTime::from_timestamp(mid, 0).expect("in range");
                if offset_at(tz, at) == prev {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let hi = DateTime::from_timestamp(hi, 0).expect("in range");
            transitions.push((trellis_form::db::sqlite_datetime(&hi), off));
            prev = off;
        }
        t = next;
    }
    Offsets {
        zone: tz.name().to_owned(),
        initial,
        transitions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn weeks_start_on_the_given_day() {
        // 2024-03-11 is a Monday: the Superset bug moved it back a week.
        assert_eq!(Grain::Week(1).start(d("2024-03-11")), d("2024-03-11"));
        assert_eq!(Grain::Week(0).start(d("2024-03-11")), d("2024-03-10"));
        assert_eq!(Grain::Week(1).start(d("2024-03-17")), d("2024-03-11"));
        assert_eq!(Grain::Quarter.start(d("2024-06-30")), d("2024-04-01"));
    }

    #[test]
    fn presets_resolve_against_today() {
        let today = d("2026-11-27");
        assert_eq!(
            preset("this_quarter", today, 1),
            Some((d("2026-10-01"), d("2027-01-01")))
        );
        assert_eq!(
            preset("last_quarter", today, 1),
            Some((d("2026-07-01"), d("2026-10-01")))
        );
        assert_eq!(
            preset("last_7_days", today, 1),
            Some((d("2026-11-21"), d("2026-11-28")))
        );
        assert_eq!(
            preset("last_12_months", today, 1),
            Some((d("2025-12-01"), d("2026-12-01")))
        );
        assert_eq!(
            preset("this_week", today, 1),
            Some((d("2026-11-23"), d("2026-11-30")))
        );
        assert_eq!(preset("nope", today, 1), None);
        assert_eq!(add_months(d("2024-03-31"), -1), d("2024-02-29"));
    }

    #[test]
    fn berlin_offsets_change_at_dst() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let o = offsets(
            tz,
            local_midnight(tz, d("2024-03-01")),
            local_midnight(tz, d("2024-04-01")),
        );
        assert_eq!(o.initial, 3600);
        assert_eq!(
            o.transitions,
            vec![("2024-03-31T01:00:00.000000Z".to_owned(), 7200)]
        );
        assert_eq!(
            local_midnight(tz, d("2024-03-31")).to_rfc3339(),
            "2024-03-30T23:00:00+00:00"
        );
    }
}
