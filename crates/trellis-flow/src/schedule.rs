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
    // The crate wants seconds first, and numbers its weekdays 1 = Sunday … 7 = Saturday;
    // classic cron numbers them 0 (or 7) = Sunday, 1 = Monday … 6 = Saturday.
    let mut parts: Vec<String> = expr.split_whitespace().map(str::to_owned).collect();
    parts[4] = weekday_numbers(&parts[4]);
    cron::Schedule::from_str(&format!("0 {}", parts.join(" ")))
        .map_err(|e| format!("`{expr}` is not a cron schedule: {e}"))
}

/// Classic cron weekday numbers (0/7 = Sunday, 1 = Monday) as the crate's (1 = Sunday).
fn weekday_numbers(field: &str) -> String {
    let mut out = String::new();
    let mut num = String::new();
    let flush = |num: &mut String, out: &mut String| {
        if !num.is_empty() {
            match num.parse::<u32>() {
                Ok(n) if n <= 7 => out.push_str(&((n % 7) + 1).to_string()),
                _ => out.push_str(num),
            }
            num.clear();
        }
    };
    let mut after_slash = false;
    for ch in field.chars() {
        if ch.is_ascii_digit() && !after_slash {
            num.push(ch);
        } else {
            flush(&mut num, &mut out);
            if ch != '/' && !ch.is_ascii_digit() {
                after_slash = false;
            }
            if ch == '/' {
                after_slash = true;
            }
            out.push(ch);
        }
    }
    flush(&mut num, &mut out);
    out
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
        // Classic numbers: 1-5 is Monday to Friday, 0 and 7 are Sunday.
        let numeric = parse("0 9 * * 1-5").unwrap();
        assert_eq!(next_after(&numeric, tz, after), Some(next));
        let sunday = parse("0 9 * * 0").unwrap();
        assert_eq!(
            next_after(&sunday, tz, after).unwrap().to_rfc3339(),
            "2026-11-29T01:00:00+00:00"
        );
        assert_eq!(weekday_numbers("7"), "1");
        assert_eq!(weekday_numbers("*/2"), "*/2");
        assert!(parse("0 9 * *").is_err());
        assert!(parse("61 9 * * *").is_err());
    }
}
