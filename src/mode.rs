//! The two modes of the original tool and every policy that depends on which one a job runs:
//! what an event must carry, what a truncate does, whether versions collapse, the order events are
//! read in, whether a COPY may go on across chunks, and the default template. Pure Rust.

use crate::decode::{Op, Row};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every insert and update adds a row: a partition holds every version seen that period.
    KeepAll,
    /// A partition holds the last version of each key: writes replace, deletes remove.
    KeepLatest,
}

/// What a mode refuses in an event.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ModeError {
    #[error("delete not supported in keep_all mode")]
    DeleteInKeepAll,
    #[error("truncate not supported in keep_all mode (its partitions keep history); set ignore_truncate = on to skip truncates")]
    TruncateInKeepAll,
    #[error("a truncate carries no row, so part_mode date_field cannot place it: set ignore_truncate = on, or empty the partitions by hand and skip the event")]
    TruncateUnplaced,
    #[error("keep_latest needs primary key columns, but ev_type lists none")]
    NoPrimaryKey,
    #[error("primary key column {0:?} is missing from ev_data")]
    KeyColumnMissing(String),
}

/// What a TRUNCATE event does, when the job takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTruncate {
    /// ignore_truncate: skipped and counted
    Skip,
    /// keep_latest: the partition the event is placed in is emptied (see apply)
    EmptyPartition,
}

impl crate::config::Word for Mode {
    const ALL: &'static [Self] = &[Mode::KeepLatest, Mode::KeepAll];
    fn as_str(self) -> &'static str {
        match self {
            Mode::KeepAll => "keep_all",
            Mode::KeepLatest => "keep_latest",
        }
    }
}

impl Mode {
    /// Checks a row event (insert, update, delete) before it is written: keep_all cannot delete
    /// (as in the original); keep_latest needs the key to find the row it replaces. A truncate has
    /// neither row nor key: `on_truncate` says what becomes of it.
    pub fn check(self, op: Op, pkey: &[String], row: &Row) -> Result<(), ModeError> {
        match self {
            Mode::KeepAll if op == Op::Delete => Err(ModeError::DeleteInKeepAll),
            Mode::KeepAll => Ok(()),
            Mode::KeepLatest if pkey.is_empty() => Err(ModeError::NoPrimaryKey),
            Mode::KeepLatest => match pkey.iter().find(|k| !row.iter().any(|(c, _)| c == *k)) {
                Some(k) => Err(ModeError::KeyColumnMissing(k.clone())),
                None => Ok(()),
            },
        }
    }

    /// What a truncate does. keep_all refuses it: its partitions keep history. keep_latest empties
    /// the partition the truncate is placed in, which a time taken from the row cannot tell
    /// (`placed_by_row`: part_mode date_field), as a truncate has no row. ignore_truncate skips it
    /// whatever the mode.
    pub fn on_truncate(self, ignore_truncate: bool, placed_by_row: bool) -> Result<OnTruncate, ModeError> {
        match self {
            _ if ignore_truncate => Ok(OnTruncate::Skip),
            Mode::KeepAll => Err(ModeError::TruncateInKeepAll),
            Mode::KeepLatest if placed_by_row => Err(ModeError::TruncateUnplaced),
            Mode::KeepLatest => Ok(OnTruncate::EmptyPartition),
        }
    }

    /// keep_all keeps every version; keep_latest collapses a key's versions to the last one.
    pub fn keeps_every_version(self) -> bool {
        self == Mode::KeepAll
    }

    /// keep_latest must see a key's versions in ev_id order; keep_all's result does not depend on
    /// the order, so the source may stream the batch without sorting it first.
    pub fn reads_in_ev_id_order(self) -> bool {
        self == Mode::KeepLatest
    }

    /// keep_all only inserts, so one COPY may go on across the chunks of a batch; in keep_latest
    /// the next chunk's deletes must see this chunk's rows first.
    pub fn may_continue_copy(self) -> bool {
        self == Mode::KeepAll
    }

    /// The original's template; a keep_all partition holds several versions of a key, so it gets
    /// no primary key.
    pub fn default_template(self) -> &'static str {
        match self {
            Mode::KeepLatest => {
                "create table _DEST_TABLE (like _PARENT); alter table only _DEST_TABLE add primary key (_PKEY);"
            }
            Mode::KeepAll => "create table _DEST_TABLE (like _PARENT);",
        }
    }

    /// Under a native partitioned parent: a partition of it with the period's bounds. keep_latest
    /// keys are unique per partition (a primary key on the parent would have to hold the
    /// partition key too).
    pub fn default_native_template(self) -> &'static str {
        match self {
            Mode::KeepLatest => {
                "create table _DEST_TABLE partition of _PARENT for values from (_PART_START) to (_PART_END); create unique index on _DEST_TABLE (_PKEY);"
            }
            Mode::KeepAll => "create table _DEST_TABLE partition of _PARENT for values from (_PART_START) to (_PART_END);",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::parse_row;

    #[test]
    fn each_mode_refuses_what_it_cannot_write() {
        let row = parse_row(crate::decode::Format::Url, Some("id=1&txt=x")).unwrap();
        let id = ["id".to_string()];
        assert_eq!(Mode::KeepAll.check(Op::Delete, &id, &row), Err(ModeError::DeleteInKeepAll));
        assert_eq!(Mode::KeepAll.check(Op::Insert, &[], &row), Ok(()));
        assert_eq!(Mode::KeepLatest.check(Op::Update, &[], &row), Err(ModeError::NoPrimaryKey));
        assert_eq!(
            Mode::KeepLatest.check(Op::Delete, &["line".to_string()], &row),
            Err(ModeError::KeyColumnMissing("line".into()))
        );
        assert_eq!(Mode::KeepLatest.check(Op::Delete, &id, &row), Ok(()));
    }

    #[test]
    fn what_a_truncate_does() {
        for placed_by_row in [false, true] {
            for mode in [Mode::KeepAll, Mode::KeepLatest] {
                assert_eq!(mode.on_truncate(true, placed_by_row), Ok(OnTruncate::Skip));
            }
            assert_eq!(Mode::KeepAll.on_truncate(false, placed_by_row), Err(ModeError::TruncateInKeepAll));
        }
        assert_eq!(Mode::KeepLatest.on_truncate(false, false), Ok(OnTruncate::EmptyPartition));
        assert_eq!(Mode::KeepLatest.on_truncate(false, true), Err(ModeError::TruncateUnplaced));
    }
}
