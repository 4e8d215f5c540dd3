//! Where in time an event goes: which time picks its partition (`part_mode`, `part_field`) and
//! the period a partition covers (`period`, `dateformat`). Pure Rust: the times themselves are
//! formatted by PostgreSQL's `to_char`, in the source's time zone, as the original did for the
//! batch time.

use crate::config::Word;

/// Which time picks an event's partition (londiste dispatch's `part_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartMode {
    /// The batch's end time, computed on the source: one partition per batch (the original's).
    BatchTime,
    /// Each event's ev_time: when the row changed on the source.
    EventTime,
    /// A date / timestamp / timestamptz column of the row, named by part_field.
    DateField,
    /// When the target writes the batch (the batch transaction's now()).
    CurrentTime,
}

impl Word for PartMode {
    const ALL: &'static [Self] =
        &[PartMode::BatchTime, PartMode::EventTime, PartMode::DateField, PartMode::CurrentTime];
    fn as_str(self) -> &'static str {
        match self {
            PartMode::BatchTime => "batch_time",
            PartMode::EventTime => "event_time",
            PartMode::DateField => "date_field",
            PartMode::CurrentTime => "current_time",
        }
    }
}

impl PartMode {
    /// Whether the events of one batch may go to different partitions.
    pub fn per_event(self) -> bool {
        matches!(self, PartMode::EventTime | PartMode::DateField)
    }

    /// Whether the events are read with their ev_time.
    pub fn reads_event_time(self) -> bool {
        self == PartMode::EventTime
    }
}

/// What one partition covers (londiste dispatch's `period`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Hour,
    Day,
    Month,
    Year,
}

impl Word for Period {
    const ALL: &'static [Self] = &[Period::Hour, Period::Day, Period::Month, Period::Year];
    fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
            Period::Year => "year",
        }
    }
}

impl Period {
    /// The partition suffix format when dateformat is not set.
    pub fn dateformat(self) -> &'static str {
        match self {
            Period::Hour => "YYYY_MM_DD_HH24",
            Period::Day => "YYYY_MM_DD",
            Period::Month => "YYYY_MM",
            Period::Year => "YYYY",
        }
    }

    /// One period, as an SQL interval.
    pub fn interval(self) -> &'static str {
        match self {
            Period::Hour => "1 hour",
            Period::Day => "1 day",
            Period::Month => "1 month",
            Period::Year => "1 year",
        }
    }

    /// The period a dateformat stands for, when it is one of the four above.
    pub fn of_dateformat(format: &str) -> Option<Period> {
        Period::ALL.iter().copied().find(|p| p.dateformat() == format)
    }
}

/// The `dateformat` option: the to_char() format of the partition suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DateFormat {
    /// Not set: the period's format (YYYY_MM_DD for the default, day).
    FromPeriod,
    /// Set to '': no partitions, rows go into the table the event names.
    Off,
    Format(String),
}

/// `part_field`: the column whose time places a row, for every table or per table.
pub type PartField = crate::per_table::PerTable<String>;

/// A positive interval as PostgreSQL reads it, of whole units: one or more `<number> <unit>`
/// (`90 days`, `3 months`, `1 year 6 months`, `30 seconds`): retention_period, pgq_min_interval,
/// pgq_min_lag. Checked here so a typo is an error at start(), not in the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval(pub String);

impl Interval {
    pub fn parse(text: &str) -> Result<Interval, &'static str> {
        const UNITS: &[&str] = &[
            "second", "seconds", "sec", "secs", "s", "minute", "minutes", "min", "mins", "hour", "hours", "h", "day",
            "days", "d", "week", "weeks", "w", "month", "months", "mon", "mons", "year", "years", "y",
        ];
        let words: Vec<&str> = text.split_whitespace().collect();
        let pairs = words.chunks(2);
        let mut any = false;
        for pair in pairs {
            let (Some(n), Some(unit)) = (pair.first(), pair.get(1)) else {
                return Err("expected an interval such as '90 days' or '3 months'");
            };
            let n: u32 = n.parse().map_err(|_| "expected an interval such as '90 days' or '3 months'")?;
            if !UNITS.contains(&unit.to_ascii_lowercase().as_str()) {
                return Err("expected an interval of seconds, minutes, hours, days, weeks, months or years");
            }
            any |= n > 0;
        }
        if !any {
            return Err("expected an interval greater than zero, such as '90 days'");
        }
        Ok(Interval(text.trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_their_formats() {
        for p in Period::ALL {
            assert_eq!(Period::of_dateformat(p.dateformat()), Some(*p));
        }
        assert_eq!(Period::of_dateformat("YYYYMMDD"), None);
        assert!(PartMode::EventTime.per_event() && PartMode::DateField.per_event());
        assert!(!PartMode::BatchTime.per_event() && !PartMode::CurrentTime.per_event());
    }

    #[test]
    fn retention_periods() {
        for ok in ["90 days", "3 months", "1 year 6 months", "12 HOURS", " 2 weeks ", "30 seconds", "1 min 30 s"] {
            assert!(Interval::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "90", "days", "0 days", "-1 day", "1 fortnight", "1 day; drop table x", "1.5 days", "0 s"] {
            assert!(Interval::parse(bad).is_err(), "{bad:?}");
        }
    }
}
