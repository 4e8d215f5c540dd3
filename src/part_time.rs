//! Each event's partition suffix at run time: one for the whole batch (batch_time, current_time)
//! or each event's own, from its time (event_time, date_field). Times become suffixes through
//! PostgreSQL's `to_char`, in the source's time zone, which the batch's transaction takes on: so
//! every part_mode names partitions the way batch_time always did (on the source).

use crate::config::JobConfig;
use crate::placement::PartMode;
use crate::source::BatchInfo;
use crate::tx::{in_subtransaction, SqlError, SubError};
use pgrx::prelude::*;
use std::collections::HashMap;

/// How the events of one batch (or one replay) find their suffix.
pub enum Placement {
    /// Every event: this suffix (None: partitioning off), and the time it stands for (the batch
    /// end, or the write's start), in the source's zone, when known.
    Fixed { suffix: Option<String>, time: Option<String> },
    /// Each event by its time: `to_char(time::timestamptz, format)`.
    PerEvent { format: String, time: TimeOf, known: HashMap<String, String> },
}

/// Which time of an event places it.
pub enum TimeOf {
    EventTime,
    /// part_field's column of the event's table
    Field,
}

/// A time that PostgreSQL would not read as one.
pub struct NotATime {
    pub text: String,
    pub cause: SqlError,
}

/// The batch's transaction works in the source's time zone. (Times arrive in ISO style, which
/// PostgreSQL reads the same under any DateStyle.)
pub fn take_on_time_zone(time_zone: &str) {
    crate::spi::run("SELECT set_config('TimeZone', $1, true)", &[time_zone.into()]);
}

impl Placement {
    /// Every event into the partition of `suffix`, at a time not known.
    pub fn fixed(suffix: Option<String>) -> Placement {
        Placement::Fixed { suffix, time: None }
    }

    /// For a batch, in its transaction.
    pub fn for_batch(cfg: &JobConfig, info: &BatchInfo) -> Placement {
        let Some(format) = cfg.suffix_format() else { return Placement::fixed(None) };
        // also for batch_time: templates and the bounds of new partitions see the source's zone
        take_on_time_zone(&info.time_zone);
        match cfg.part_mode {
            PartMode::BatchTime => Placement::Fixed {
                suffix: info.suffix.clone(),
                time: crate::spi::value("SELECT $1::timestamptz::text", &[info.batch_end.as_str().into()]),
            },
            _ => Placement::for_mode(cfg, format.to_string()),
        }
    }

    /// For dead letters written again: the suffix their batch gave them, or, where none was
    /// recorded (the time itself was what failed), each one's own, in `time_zone` (the source's).
    pub fn for_replay(cfg: &JobConfig, suffix: Option<String>, time_zone: impl FnOnce() -> String) -> Placement {
        let Some(format) = cfg.suffix_format() else { return Placement::fixed(None) };
        // as in a batch: templates and the bounds of new partitions see the source's zone
        take_on_time_zone(&time_zone());
        match suffix {
            // the time is not kept with a dead letter: its period's start stands for it
            Some(s) => {
                let time = crate::tx::in_subtransaction(|| {
                    Ok::<_, ()>(crate::spi::value::<String>(
                        "SELECT to_timestamp($1, $2)::text",
                        &[s.as_str().into(), format.into()],
                    ))
                });
                Placement::Fixed { suffix: Some(s), time: time.ok().flatten() }
            }
            None if cfg.part_mode.per_event() => Placement::for_mode(cfg, format.to_string()),
            None => Placement::fixed(None),
        }
    }

    fn for_mode(cfg: &JobConfig, format: String) -> Placement {
        let per_event = |time| Placement::PerEvent { format: format.clone(), time, known: HashMap::new() };
        match cfg.part_mode {
            PartMode::EventTime => per_event(TimeOf::EventTime),
            PartMode::DateField => per_event(TimeOf::Field),
            // the batch transaction's start: every event of the batch in one partition
            PartMode::CurrentTime | PartMode::BatchTime => {
                let (suffix, time) = Spi::get_two_with_args::<String, String>(
                    "SELECT to_char(now(), $1), now()::text",
                    &[format.as_str().into()],
                )
                .unwrap_or_else(|e| crate::spi::fail(e));
                Placement::Fixed { suffix, time }
            }
        }
    }

    /// Formats the times not seen before, in one statement. A time that does not read is
    /// named; the statement runs in a subtransaction so that the batch can say which.
    pub fn learn<'t>(&mut self, times: impl Iterator<Item = &'t str>) -> Result<(), NotATime> {
        let Placement::PerEvent { format, known, .. } = self else { return Ok(()) };
        // event times are mostly distinct: keep memory bounded over a long batch
        if known.len() > 100_000 {
            known.clear();
        }
        let mut new: Vec<String> = times.filter(|t| !known.contains_key(*t)).map(str::to_string).collect();
        new.sort_unstable();
        new.dedup();
        if new.is_empty() {
            return Ok(());
        }
        let format = format.as_str();
        let all = in_subtransaction(|| format_times(&new, format));
        let suffixes = match all {
            Ok(s) => s,
            Err(_) => {
                // find the culprit, one time at a time
                for text in &new {
                    if let Err(e) = in_subtransaction(|| format_times(std::slice::from_ref(text), format)) {
                        let cause = match e {
                            SubError::Returned(e) | SubError::Raised(e) => e,
                        };
                        return Err(NotATime { text: text.clone(), cause });
                    }
                }
                unreachable!("the statement failed for all the times and for none alone")
            }
        };
        known.extend(new.into_iter().zip(suffixes));
        Ok(())
    }

    /// The suffix of an event whose time is `time` (learnt before, if placed per event).
    pub fn suffix(&self, time: Option<&str>) -> Option<&str> {
        match self {
            Placement::Fixed { suffix, .. } => suffix.as_deref(),
            Placement::PerEvent { known, .. } => time.and_then(|t| known.get(t)).map(String::as_str),
        }
    }

    /// The time of the whole batch (its end, or the write's start), when one time places it.
    pub fn batch_time(&self) -> Option<&str> {
        match self {
            Placement::Fixed { time, .. } => time.as_deref(),
            Placement::PerEvent { .. } => None,
        }
    }

    /// Which time of an event places it; None when one suffix serves the whole batch.
    pub fn time_of(&self) -> Option<&TimeOf> {
        match self {
            Placement::Fixed { .. } => None,
            Placement::PerEvent { time, .. } => Some(time),
        }
    }
}

/// to_char of each time, in order; raises when one is not a time.
fn format_times(times: &[String], format: &str) -> Result<Vec<String>, SqlError> {
    let suffixes: Option<Vec<Option<String>>> = crate::spi::value(
        "SELECT array_agg(to_char(t::timestamptz, $2) ORDER BY n) FROM unnest($1::text[]) WITH ORDINALITY u(t, n)",
        &[times.to_vec().into(), format.into()],
    );
    Ok(suffixes.unwrap_or_default().into_iter().map(Option::unwrap_or_default).collect())
}
