//! Working-day calendars: weekends, holidays and make-up working days in a time zone.
//!
//! Adding N working days keeps the local time of day and steps over every day that is not worked:
//! 3 working days from Friday 17:00 is Wednesday 17:00, and a holiday on the Monday moves it to
//! Thursday. The arithmetic happens in local time, so a daylight-saving change in between keeps
//! 17:00 at 17:00.

use crate::def::CalendarDef;
use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use std::collections::HashSet;

/// A compiled calendar.
#[derive(Debug, Clone)]
pub struct Calendar {
    tz: Tz,
    weekdays: [bool; 7],
    holidays: HashSet<NaiveDate>,
    extra: HashSet<NaiveDate>,
}

impl Calendar {
    /// Compile a definition; `app_tz` is used when it names none.
    pub fn new(def: &CalendarDef, app_tz: Tz) -> Result<Self, String> {
        let tz = match &def.timezone {
            Some(t) => t
                .parse::<Tz>()
                .map_err(|_| format!("`{t}` is not an IANA time zone"))?,
            None => app_tz,
        };
        let mut weekdays = [false; 7];
        for d in &def.working_days {
            if !(1..=7).contains(d) {
                return Err(format!(
                    "working day {d} is not a weekday number (1 = Monday … 7 = Sunday)"
                ));
            }
            weekdays[(*d - 1) as usize] = true;
        }
        Ok(Calendar {
            tz,
            weekdays,
            holidays: def.holidays.iter().copied().collect(),
            extra: def.extra_working_days.iter().copied().collect(),
        })
    }

    /// Monday to Friday in `tz`, no holidays.
    pub fn weekdays(tz: Tz) -> Self {
        Calendar {
            tz,
            weekdays: [true, true, true, true, true, false, false],
            holidays: HashSet::new(),
            extra: HashSet::new(),
        }
    }

    /// Whether `d` is worked.
    pub fn is_working_day(&self, d: NaiveDate) -> bool {
        if self.extra.contains(&d) {
            return true;
        }
        if self.holidays.contains(&d) {
            return false;
        }
        self.weekdays[d.weekday().num_days_from_monday() as usize]
    }

    fn local(&self, t: NaiveDateTime) -> DateTime<Utc> {
        match self.tz.from_local_datetime(&t) {
            LocalResult::Single(x) => x.with_timezone(&Utc),
            LocalResult::Ambiguous(a, _) => a.with_timezone(&Utc),
            // In a spring-forward gap: the first instant after it.
            LocalResult::None => self.local(t + Duration::hours(1)),
        }
    }

    /// `n` working days after `from`, at the same local time of day.
    pub fn add_working_days(&self, from: DateTime<Utc>, n: u32) -> DateTime<Utc> {
        let local = from.with_timezone(&self.tz).naive_local();
        let mut day = local.date();
        let mut left = n;
        // A year of holidays at most: a calendar with no working day at all stops there.
        let mut guard = 0;
        while left > 0 && guard < 3660 {
            day = day.succ_opt().expect("date in range");
            guard += 1;
            if self.is_working_day(day) {
                left -= 1;
            }
        }
        self.local(day.and_time(local.time()))
    }

    /// Working days elapsed between `from` and `to` (whole days, the same local time counting as
    /// one day later).
    pub fn working_days_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> u32 {
        let mut n = 0;
        while n < 3660 && self.add_working_days(from, n + 1) <= to {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str, tz: Tz) -> DateTime<Utc> {
        let t = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        tz.from_local_datetime(&t).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn three_working_days_from_friday_evening_is_wednesday() {
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let c = Calendar::weekdays(tz);
        // 2026-11-27 is a Friday.
        let fri = at("2026-11-27 17:00", tz);
        assert_eq!(c.add_working_days(fri, 3), at("2026-12-02 17:00", tz));
        assert_eq!(c.add_working_days(fri, 1), at("2026-11-30 17:00", tz));
        // Saturday counts from Monday.
        assert_eq!(
            c.add_working_days(at("2026-11-28 10:00", tz), 1),
            at("2026-11-30 10:00", tz)
        );
        assert_eq!(c.working_days_between(fri, at("2026-12-02 16:59", tz)), 2);
        assert_eq!(c.working_days_between(fri, at("2026-12-02 17:00", tz)), 3);
    }

    #[test]
    fn holidays_and_make_up_days() {
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let def = CalendarDef {
            key: "default".into(),
            working_days: vec![1, 2, 3, 4, 5],
            holidays: vec![
                NaiveDate::from_ymd_opt(2026, 11, 30).unwrap(),
                NaiveDate::from_ymd_opt(2026, 12, 1).unwrap(),
            ],
            extra_working_days: vec![NaiveDate::from_ymd_opt(2026, 11, 28).unwrap()],
            timezone: None,
        };
        let c = Calendar::new(&def, tz).unwrap();
        let fri = at("2026-11-27 17:00", tz);
        // Saturday is a make-up day, Monday and Tuesday are holidays.
        assert_eq!(c.add_working_days(fri, 1), at("2026-11-28 17:00", tz));
        assert_eq!(c.add_working_days(fri, 3), at("2026-12-03 17:00", tz));
        assert!(Calendar::new(
            &CalendarDef {
                working_days: vec![8],
                ..def.clone()
            },
            tz
        )
        .is_err());
    }

    #[test]
    fn daylight_saving_keeps_the_local_time() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let c = Calendar::weekdays(tz);
        // Clocks go back on Sunday 2026-10-25.
        let fri = at("2026-10-23 17:00", tz);
        let tue = c.add_working_days(fri, 2);
        assert_eq!(tue, at("2026-10-27 17:00", tz));
        assert_eq!((tue - fri).num_hours(), 24 * 4 + 1);
    }
}
