//! Cron schedules (five fields, in the app's time zone), parsed with the `cron` crate.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::str::FromStr;

/// Parse a five-field cron expression (minute hour day-of-month month day-of-week).
pub fn parse(expr: &str) -> Result<cron::Schedule, String> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(format!(
            "`{expr}` has {fields} fields; a schedule has five: minute hour day-of-month month day-of-week (`0 9 * * MON-FRI`)"
        ));
    }
    // The crate wants seconds first.
    cron::Schedule::from_str(&format!("0 {expr}"))
        .map_err(|e| format!("`{expr}` is not a cron schedule: {e}"))
}

/// The first moment of `s` strictly after `after`, in `tz`.
pub fn next_after(s: &cron::Schedule, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    s.after(&after.with_timezone(&tz))
        .next()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weekday_mornings_in_shanghai() {
        let s = parse("0 9 * * MON-FRI").unwrap();
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        // Friday 2026-11-27 10:00 Shanghai → Monday 09:00 Shanghai (01:00 UTC).
        let after = DateTime::parse_from_rfc3339("2026-11-27T02:00:00Z")
            .unwrap()
            .to_utc();
        let next = next_after(&s, tz, after).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-11-30T01:00:00+00:00");
        assert!(parse("0 9 * *").is_err());
        assert!(parse("61 9 * * *").is_err());
    }
}
