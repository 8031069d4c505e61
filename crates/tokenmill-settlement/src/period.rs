//! Calendar arithmetic in UTC: instants as whole Unix seconds, dates,
//! statement months, and the contract's periods.
//!
//! Settlement needs only a little of a calendar (month boundaries, adding
//! months to a date, printing an instant), and needs it to agree exactly
//! between parties, so it is done here with integer day counts of the
//! proleptic Gregorian calendar rather than by a time-zone-aware library.
//! Every boundary is a whole second, so comparing a record's time with a
//! boundary needs only the record's whole seconds (rounded down).

use crate::error::CalendarError;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since 1970-01-01T00:00:00Z, leap seconds not counted.
pub type Instant = i64;

const SECONDS_PER_DAY: i64 = 86_400;

/// Days from 1970-01-01 to the given date (negative before), for any month
/// 1..=12 and day 1..=31 (days past the month's end run into the next).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Count years from March, so the leap day is the last day of a year.
    let (y, m) = if month <= 2 {
        (year - 1, i64::from(month) + 9)
    } else {
        (year, i64::from(month) - 3)
    };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400);
    let day_of_year = (153 * m + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count (inverse of [`days_from_civil`]).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let m = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * m + 2) / 5 + 1) as u32;
    let month = if m < 10 { m + 3 } else { m - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    (days_from_civil(ny, nm, 1) - days_from_civil(year, month, 1)) as u32
}

/// An instant as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_instant(t: Instant) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(SECONDS_PER_DAY));
    let s = t.rem_euclid(SECONDS_PER_DAY);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// A record's time in whole seconds, rounded down (toward the past).
pub fn instant_of(t: SystemTime) -> Instant {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            -whole - i64::from(d.subsec_nanos() > 0)
        }
    }
}

/// A field of ASCII digits as a number. Callers check the field's width
/// (at most 4 digits) first, so the value always fits.
fn digits(s: &str, field: &'static str) -> Result<u32, CalendarError> {
    let not_a_number = || CalendarError::NotANumber {
        field,
        digits: s.to_owned(),
    };
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_number());
    }
    s.parse().map_err(|_| not_a_number())
}

const DATE: &str = "a date YYYY-MM-DD";
const INSTANT: &str = "YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ";
const MONTH: &str = "a month YYYY-MM";

fn shape(text: &str, expected: &'static str) -> CalendarError {
    CalendarError::Shape {
        text: text.to_owned(),
        expected,
    }
}

/// Parses `YYYY-MM-DD` into (year, month, day), checking the day exists.
pub fn parse_date(s: &str) -> Result<(i64, u32, u32), CalendarError> {
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(shape(s, DATE));
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(shape(s, DATE));
    }
    let (year, month, day) = (
        i64::from(digits(y, "year")?),
        digits(m, "month")?,
        digits(d, "day")?,
    );
    if !(1..=12).contains(&month) {
        return Err(CalendarError::NoSuchMonth {
            text: s.to_owned(),
            month,
        });
    }
    if day == 0 || day > days_in_month(year, month) {
        return Err(CalendarError::NoSuchDay {
            text: s.to_owned(),
            day,
        });
    }
    Ok((year, month, day))
}

/// Parses `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_instant(s: &str) -> Result<Instant, CalendarError> {
    let (date, time) = match s.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (s, None),
    };
    let (y, m, d) = parse_date(date)?;
    let mut t = days_from_civil(y, m, d) * SECONDS_PER_DAY;
    if let Some(time) = time {
        let hms = time.strip_suffix('Z').ok_or_else(|| shape(s, INSTANT))?;
        let parts: Vec<&str> = hms.split(':').collect();
        let [h, mi, se] = parts.as_slice() else {
            return Err(shape(s, INSTANT));
        };
        if h.len() != 2 || mi.len() != 2 || se.len() != 2 {
            return Err(shape(s, INSTANT));
        }
        let (h, mi, se) = (
            digits(h, "hour")?,
            digits(mi, "minute")?,
            digits(se, "second")?,
        );
        if h > 23 || mi > 59 || se > 59 {
            return Err(CalendarError::NoSuchTime {
                text: s.to_owned(),
                hour: h,
                minute: mi,
                second: se,
            });
        }
        t += i64::from(h * 3600 + mi * 60 + se);
    }
    Ok(t)
}

/// A calendar month in UTC: the unit a statement covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    year: i64,
    month: u32,
}

impl Month {
    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Result<Month, CalendarError> {
        let Some((y, m)) = s.split_once('-') else {
            return Err(shape(s, MONTH));
        };
        if y.len() != 4 || m.len() != 2 {
            return Err(shape(s, MONTH));
        }
        let month = digits(m, "month")?;
        if !(1..=12).contains(&month) {
            return Err(CalendarError::NoSuchMonth {
                text: s.to_owned(),
                month,
            });
        }
        Ok(Month {
            year: i64::from(digits(y, "year")?),
            month,
        })
    }

    /// The month holding instant `t`.
    pub fn of(t: Instant) -> Month {
        let (year, month, _) = civil_from_days(t.div_euclid(SECONDS_PER_DAY));
        Month { year, month }
    }

    /// Its first second.
    pub fn start(self) -> Instant {
        days_from_civil(self.year, self.month, 1) * SECONDS_PER_DAY
    }

    /// The first second of the next month.
    pub fn end(self) -> Instant {
        self.next().start()
    }

    /// The month after.
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// Whether `t` falls in it.
    pub fn contains(self, t: Instant) -> bool {
        self.start() <= t && t < self.end()
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Midnight UTC of `date` plus `months` calendar months. The day of the
/// month is kept; callers keep it at most 28 so that it exists in every
/// month.
pub fn add_months(date: (i64, u32, u32), months: u32) -> Instant {
    let (y, m, d) = date;
    let index = y * 12 + i64::from(m - 1) + i64::from(months);
    let (year, month) = (index.div_euclid(12), index.rem_euclid(12) as u32 + 1);
    days_from_civil(year, month, d) * SECONDS_PER_DAY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!(parse_instant("1970-01-02"), Ok(86_400));
        assert_eq!(
            format_instant(parse_instant("2024-02-29T23:59:59Z").expect("valid")),
            "2024-02-29T23:59:59Z"
        );
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-1-01",
            "2024-01-01T24:00:00Z",
            "2024-01-01T10:00:00",
            "2024-01-01 10:00:00Z",
            "x",
        ] {
            assert!(parse_instant(bad).is_err(), "{bad}");
        }
        assert_eq!(format_instant(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let text = |s: &str| s.to_owned();
        assert_eq!(
            parse_date("2023-02-29"),
            Err(CalendarError::NoSuchDay {
                text: text("2023-02-29"),
                day: 29
            })
        );
        assert_eq!(
            parse_instant("2024-01-01T24:00:00Z"),
            Err(CalendarError::NoSuchTime {
                text: text("2024-01-01T24:00:00Z"),
                hour: 24,
                minute: 0,
                second: 0
            })
        );
        assert_eq!(
            parse_instant("2024-01-01T10:00:00"),
            Err(CalendarError::Shape {
                text: text("2024-01-01T10:00:00"),
                expected: INSTANT
            })
        );
        assert_eq!(
            parse_date("2024-0x-01"),
            Err(CalendarError::NotANumber {
                field: "month",
                digits: text("0x")
            })
        );
        assert_eq!(
            Month::parse("2024-13").map_err(|e| e.to_string()),
            Err("\"2024-13\": month 13 is not 1 to 12".to_owned())
        );
    }

    #[test]
    fn months() {
        let m = Month::parse("2024-12").expect("valid");
        assert_eq!(m.to_string(), "2024-12");
        assert_eq!(m.next().to_string(), "2025-01");
        assert_eq!(format_instant(m.end()), "2025-01-01T00:00:00Z");
        assert_eq!(Month::of(m.end() - 1), m);
        assert!(Month::parse("2024-00").is_err());
        assert!(Month::parse("202412").is_err());
        assert_eq!(
            format_instant(add_months((2025, 11, 15), 3)),
            "2026-02-15T00:00:00Z"
        );
    }

    #[test]
    fn record_times_round_down() {
        use std::time::Duration;
        assert_eq!(instant_of(UNIX_EPOCH + Duration::new(5, 999_999_999)), 5);
        assert_eq!(instant_of(UNIX_EPOCH - Duration::new(0, 1)), -1);
        assert_eq!(instant_of(UNIX_EPOCH - Duration::new(2, 0)), -2);
    }
}
