//! The job options: each declared once (name, type, what unset means, when it takes effect, a
//! line of documentation), and everything else derived from that declaration: the `JobConfig`
//! fields, reading and validating settings, the stored JSON form and reading it back, the list
//! `cube_dispatcher.options()` shows. Settings are read as GUCs `cube_dispatcher.<job>.<option>`
//! with `cube_dispatcher.<option>` as the default for every job; this module only sees the
//! resulting strings, so it is tested without a server.

use crate::decode::TableName;
use crate::mode::Mode;
use crate::per_table::{Columns, EventTypes, Fields, PerTable};
use crate::placement::{DateFormat, Interval, PartField, PartMode, Period};
use std::collections::BTreeMap;
use thiserror::Error;

/// What an unset option means.
#[derive(Debug, Clone, Copy)]
pub enum Unset {
    /// The job cannot run without it.
    Required,
    /// The value this setting text gives.
    Value(&'static str),
    /// A meaning of its own, described for people.
    Means(&'static str),
}

/// When a changed option takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// at start() and reload(); the worker applies it before its next batch
    Reload,
    /// as Reload; the partition of the next batch follows it
    NextBatch,
    /// as Reload; the source connection is opened again
    Reconnect,
    /// only checked, at start()
    Start,
}

impl Effect {
    pub fn describe(self) -> &'static str {
        match self {
            Effect::Reload => "start, reload",
            Effect::NextBatch => "start, reload (next batch)",
            Effect::Reconnect => "start, reload (reconnects)",
            Effect::Start => "start",
        }
    }
}

/// One option as users see it: in the README's table and in `cube_dispatcher.options()`.
#[derive(Debug)]
pub struct OptionSpec {
    pub name: &'static str,
    pub unset: Unset,
    pub effect: Effect,
    pub doc: &'static str,
    /// a connection string: shown with its password masked, and only to the job's owner
    pub connection: bool,
}

impl OptionSpec {
    /// The default as people read it.
    pub fn default_text(&self) -> &'static str {
        match self.unset {
            Unset::Required => "required",
            Unset::Value(v) | Unset::Means(v) => v,
        }
    }
}

/// A stored definition as the status view shows it: connection strings masked, and hidden
/// (null) from those who may not see them.
pub fn shown(options: &mut serde_json::Map<String, serde_json::Value>, connections: bool) {
    for spec in SCHEMA.iter().filter(|s| s.connection) {
        if let Some(v) = options.get_mut(spec.name) {
            *v = match v.as_str() {
                Some(text) if connections => mask_password(text).into(),
                _ => serde_json::Value::Null,
            };
        }
    }
}

/// What an option's value depends on besides its setting.
pub struct Context<'a> {
    pub job: &'a str,
    /// the database the job writes into (where start() runs)
    pub current_db: &'a str,
}

/// How a setting's text becomes an option's value, and the text that gives the value back.
trait Kind<T> {
    /// `text`: None when unset.
    fn parse(text: Option<&str>, ctx: &Context) -> Result<T, String>;
    /// The setting that gives `value` again; None: unset.
    fn text(value: &T) -> Option<String>;
    /// A connection string, which may hold a password.
    const CONNECTION: bool = false;
    /// How a set text may be shown.
    fn shown(text: &str) -> String {
        if Self::CONNECTION {
            mask_password(text)
        } else {
            text.to_string()
        }
    }
}

/// An option whose value is one of a few words.
pub trait Word: Copy + PartialEq + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
}

/// Any text, as set.
struct Text;
impl Kind<String> for Text {
    fn parse(text: Option<&str>, _: &Context) -> Result<String, String> {
        Ok(text.unwrap_or_default().to_string())
    }
    fn text(value: &String) -> Option<String> {
        Some(value.clone())
    }
}

/// A libpq connection string: shown with its password masked.
struct ConnInfo;
impl Kind<String> for ConnInfo {
    fn parse(text: Option<&str>, ctx: &Context) -> Result<String, String> {
        Text::parse(text, ctx)
    }
    fn text(value: &String) -> Option<String> {
        Some(value.clone())
    }
    const CONNECTION: bool = true;
}

/// dst_db: the job writes where start() runs, so a set dst_db must name that database.
struct ThisDatabase;
impl Kind<Option<String>> for ThisDatabase {
    fn parse(text: Option<&str>, ctx: &Context) -> Result<Option<String>, String> {
        match text {
            Some(v) if !v.trim().is_empty() => match dst_db_name(v) {
                Some(db) if db == ctx.current_db => Ok(Some(v.to_string())),
                _ => Err("the job writes into the database where start() is called; dst_db must name that database or be unset".into()),
            },
            _ => Ok(None),
        }
    }
    fn text(value: &Option<String>) -> Option<String> {
        value.clone()
    }
    const CONNECTION: bool = true;
}

/// A name that defaults to the job's own.
struct JobNamed;
impl Kind<String> for JobNamed {
    fn parse(text: Option<&str>, ctx: &Context) -> Result<String, String> {
        Ok(text.filter(|v| !v.is_empty()).unwrap_or(ctx.job).to_string())
    }
    fn text(value: &String) -> Option<String> {
        Some(value.clone())
    }
}

/// dateformat: unset follows the period, the empty string turns partitioning off.
struct DateFormats;
impl Kind<DateFormat> for DateFormats {
    fn parse(text: Option<&str>, _: &Context) -> Result<DateFormat, String> {
        Ok(match text {
            None => DateFormat::FromPeriod,
            Some("") => DateFormat::Off,
            Some(f) => DateFormat::Format(f.to_string()),
        })
    }
    fn text(value: &DateFormat) -> Option<String> {
        match value {
            DateFormat::FromPeriod => None,
            DateFormat::Off => Some(String::new()),
            DateFormat::Format(f) => Some(f.clone()),
        }
    }
}

/// One of a few words, or unset.
struct MaybeWords;
impl<T: Word> Kind<Option<T>> for MaybeWords {
    fn parse(text: Option<&str>, ctx: &Context) -> Result<Option<T>, String> {
        match text {
            Some(t) if !t.trim().is_empty() => <Words as Kind<T>>::parse(Some(t), ctx).map(Some),
            _ => Ok(None),
        }
    }
    fn text(value: &Option<T>) -> Option<String> {
        value.map(|w| w.as_str().to_string())
    }
}

/// A boolean, in PostgreSQL's spellings (and londiste's 0/1).
struct Bool;
impl Kind<bool> for Bool {
    fn parse(text: Option<&str>, _: &Context) -> Result<bool, String> {
        match text.unwrap_or_default().trim().to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" | "1" => Ok(true),
            "off" | "false" | "no" | "0" => Ok(false),
            _ => Err("expected on or off".into()),
        }
    }
    fn text(value: &bool) -> Option<String> {
        Some(if *value { "on" } else { "off" }.into())
    }
}

/// Text where unset and empty differ (part_template: the mode's default, or none at all).
struct Optional;
impl Kind<Option<String>> for Optional {
    fn parse(text: Option<&str>, _: &Context) -> Result<Option<String>, String> {
        Ok(text.map(str::to_string))
    }
    fn text(value: &Option<String>) -> Option<String> {
        value.clone()
    }
}

/// Seconds, fractions allowed, at most a day; 0 only where `ZERO` (loop_delay: ask again at once,
/// as the original accepted).
struct Seconds<const ZERO: bool>;
impl<const ZERO: bool> Kind<f64> for Seconds<ZERO> {
    fn parse(text: Option<&str>, _: &Context) -> Result<f64, String> {
        match text.unwrap_or_default().trim().parse::<f64>() {
            Ok(x) if x.is_finite() && (x > 0.0 || (ZERO && x == 0.0)) && x <= 86_400.0 => Ok(x),
            _ if ZERO => Err("expected a number of seconds from 0 to 86400".into()),
            _ => Err("expected a number of seconds greater than 0 and at most 86400".into()),
        }
    }
    fn text(value: &f64) -> Option<String> {
        Some(value.to_string())
    }
}

/// A count of events for PgQ (int4), greater than zero; none when unset or empty.
struct Count;
impl Kind<Option<i32>> for Count {
    fn parse(text: Option<&str>, _: &Context) -> Result<Option<i32>, String> {
        match text.map(str::trim) {
            None | Some("") => Ok(None),
            Some(t) => match t.parse::<i32>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err("expected a whole number of events greater than 0".into()),
            },
        }
    }
    fn text(value: &Option<i32>) -> Option<String> {
        value.map(|n| n.to_string())
    }
}

struct Words;
impl<T: Word> Kind<T> for Words {
    fn parse(text: Option<&str>, _: &Context) -> Result<T, String> {
        let text = text.unwrap_or_default().trim();
        T::ALL.iter().copied().find(|w| w.as_str() == text).ok_or_else(|| {
            let words: Vec<&str> = T::ALL.iter().map(|w| w.as_str()).collect();
            match words.split_last() {
                Some((last, [])) => format!("expected {last}"),
                Some((last, rest)) => format!("expected {} or {last}", rest.join(", ")),
                None => "no value is valid".into(),
            }
        })
    }
    fn text(value: &T) -> Option<String> {
        Some(value.as_str().to_string())
    }
}

/// A value read from its text that keeps that text: an allow-list, a column list, an interval.
trait TextValue: Sized {
    fn from_text(text: &str) -> Result<Self, String>;
    fn text(&self) -> &str;
}

/// Such a value, or none when unset or empty.
struct Parsed;
impl<T: TextValue> Kind<Option<T>> for Parsed {
    fn parse(text: Option<&str>, _: &Context) -> Result<Option<T>, String> {
        match text {
            Some(t) if !t.trim().is_empty() => T::from_text(t).map(Some),
            _ => Ok(None),
        }
    }
    fn text(value: &Option<T>) -> Option<String> {
        value.as_ref().map(|v| v.text().to_string())
    }
}

impl TextValue for TableList {
    fn from_text(text: &str) -> Result<Self, String> {
        TableList::parse(text).ok_or_else(|| "expected a comma-separated list of schema.table or schema.*".into())
    }
    fn text(&self) -> &str {
        &self.text
    }
}

impl<T: crate::per_table::EntryValue> TextValue for crate::per_table::PerTable<T> {
    fn from_text(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
    fn text(&self) -> &str {
        &self.text
    }
}

impl TextValue for Interval {
    fn from_text(text: &str) -> Result<Self, String> {
        Interval::parse(text).map_err(str::to_string)
    }
    fn text(&self) -> &str {
        &self.0
    }
}

/// Declares the options: the `JobConfig` fields, `SCHEMA`, reading a job's settings and the
/// texts it is stored as all come from this one list.
macro_rules! options {
    ($($name:ident: $ty:ty, $kind:ty, $unset:expr, $effect:ident, $doc:literal;)*) => {
        /// A job's validated options.
        #[derive(Debug, Clone, PartialEq)]
        pub struct JobConfig {
            pub job_name: String,
            $(pub $name: $ty,)*
        }

        /// Every job option, in the order they are read and shown.
        pub const SCHEMA: &[OptionSpec] = &[$(OptionSpec {
            name: stringify!($name),
            unset: $unset,
            effect: Effect::$effect,
            doc: $doc,
            connection: <$kind as Kind<$ty>>::CONNECTION,
        },)*];

        impl JobConfig {
            fn read_options(ctx: &Context, lookup: &dyn Fn(&str) -> Setting) -> Result<JobConfig, ConfigError> {
                Ok(JobConfig {
                    job_name: ctx.job.to_string(),
                    $($name: read::<$kind, $ty>(stringify!($name), $unset, ctx, lookup)?,)*
                })
            }

            /// Every option with the setting text that gives its value again (None: unset).
            pub fn texts(&self) -> Vec<(&'static str, Option<String>)> {
                vec![$((stringify!($name), <$kind as Kind<$ty>>::text(&self.$name)),)*]
            }
        }
    };
}

// Names are the original's ini keys. The README's option table lists the same, with the same
// defaults (tested below); `doc` is what cube_dispatcher.options() shows.
options! {
    src_db: String, ConnInfo, Unset::Required, Reconnect,
        "libpq connection string of the source database (where the queue is)";
    pgq_queue_name: String, Text, Unset::Required, Reload,
        "the PgQ queue to consume";
    pgq_consumer_id: String, JobNamed, Unset::Means("the job name"), Reload,
        "the PgQ consumer name to register";
    mode: Mode, Words, Unset::Value("keep_latest"), NextBatch,
        "keep_latest (a partition holds the last version of each row) or keep_all (every version)";
    dateformat: DateFormat, DateFormats, Unset::Means("the period's: `YYYY_MM_DD` for `day`"), NextBatch,
        "to_char() format of the partition suffix; empty: no partitions";
    period: Option<Period>, MaybeWords, Unset::Means("from `dateformat`, else `day`"), NextBatch,
        "what one partition covers: hour, day, month or year";
    part_mode: PartMode, Words, Unset::Value("batch_time"), NextBatch,
        "which time places a row: batch_time, event_time, date_field or current_time";
    part_field: Option<PartField>, Parsed, Unset::Means("unset"), NextBatch,
        "date_field: the column whose time places a row, or per table: schema.table:column;...";
    retention_period: Option<Interval>, Parsed, Unset::Means("unset: keep everything"), NextBatch,
        "how long a partition is kept after its period ended, e.g. 90 days; older ones are dropped";
    ignore_old_events: bool, Bool, Unset::Value("off"), NextBatch,
        "skip (and count) events for partitions already past retention_period";
    part_template: Option<String>, Optional, Unset::Means("see below"), NextBatch,
        "SQL that creates a missing partition; empty: a missing partition is an error";
    pre_part: Option<String>, Optional, Unset::Means("unset"), NextBatch,
        "SQL run just before a partition is created (same words as part_template)";
    post_part: Option<String>, Optional, Unset::Means("unset"), NextBatch,
        "SQL run just after a partition is created (same words as part_template)";
    loop_delay: f64, Seconds<true>, Unset::Value("1"), Reload,
        "seconds to wait when there is no batch";
    connection_lifetime: f64, Seconds<false>, Unset::Value("1200"), Reload,
        "seconds after which the source connection is opened again";
    dst_db: Option<String>, ThisDatabase, Unset::Means("unset"), Start,
        "kept for ini files: if set, it must name the database where start() runs";
    log_level: LogLevel, Words, Unset::Value("normal"), Reload,
        "quiet, normal or verbose (a line per batch)";
    on_error: OnError, Words, Unset::Value("retry"), Reload,
        "retry: a failing batch is retried until fixed; dead_letter: failing events are parked";
    tables: Option<TableList>, Parsed, Unset::Means("unset: any table the job's role may write"), Reload,
        "allow-list of parent tables: schema.table or schema.*, comma-separated";
    lock_timeout: f64, Seconds<false>, Unset::Value("60"), Reload,
        "seconds a write waits for a lock on a target table before the batch is retried";
    event_types: Option<PerTable<EventTypes>>, Parsed, Unset::Means("all: I, U and D"), NextBatch,
        "operations applied: I, U, D separated by ',', or per table schema.table:I,U;...; others are skipped";
    ignore_truncate: bool, Bool, Unset::Value("off"), NextBatch,
        "on: TRUNCATE events are skipped; off: keep_latest empties the event's partition, keep_all refuses";
    fields: Option<PerTable<Fields>>, Parsed, Unset::Means("every column"), NextBatch,
        "columns kept, src or src:dst to rename, separated by ','; or per table schema.table:a,b:c;...";
    skip_fields: Option<PerTable<Columns>>, Parsed, Unset::Means("unset"), NextBatch,
        "columns dropped, separated by ','; or per table schema.table:a,b;...";
    table_map: Option<PerTable<TableName>>, Parsed, Unset::Means("unset: each table's own name"), NextBatch,
        "the parent a table's events are written into: schema.table:schema.parent;...";
    pgq_min_count: Option<i32>, Count, Unset::Means("unset: one tick per batch"), NextBatch,
        "merge ticks until a batch holds at least this many events (pgq.next_batch_custom)";
    pgq_min_interval: Option<Interval>, Parsed, Unset::Means("unset"), NextBatch,
        "merge ticks until a batch covers at least this long, e.g. 1 minute";
    pgq_min_lag: Option<Interval>, Parsed, Unset::Means("unset"), NextBatch,
        "take a batch only once its last tick is at least this old, e.g. 5 minutes";
    new_columns: NewColumns, Words, Unset::Value("error"), NextBatch,
        "a column the target lacks: error (retried until added), ignore (value dropped, counted) or add (with the source's type)";
    helper: HelperUse, Words, Unset::Value("auto"), Reconnect,
        "read the source in a second process while this one writes: auto (with 2 or more CPUs), on or off";
}

/// A setting as found: its text if set, and where it is (or would be) set, for errors.
pub struct Setting {
    pub text: Option<String>,
    pub place: String,
}

fn read<K: Kind<T>, T>(
    name: &str,
    unset: Unset,
    ctx: &Context,
    lookup: &dyn Fn(&str) -> Setting,
) -> Result<T, ConfigError> {
    let Setting { text, place } = lookup(name);
    let text = match (text, unset) {
        (Some(t), Unset::Required) if t.trim().is_empty() => return Err(ConfigError::Missing { guc: place }),
        (None, Unset::Required) => return Err(ConfigError::Missing { guc: place }),
        (None, Unset::Value(v)) => Some(v.to_string()),
        (text, _) => text,
    };
    K::parse(text.as_deref(), ctx).map_err(|why| ConfigError::Invalid {
        guc: place,
        value: K::shown(text.as_deref().unwrap_or_default()),
        why,
    })
}

/// What a batch that fails because of its events does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The original's way: roll back, wait, try the same batch again until the cause is fixed.
    Retry,
    /// Write the good events, park the failing ones in cube_dispatcher.dead_letter, finish.
    DeadLetter,
}

impl Word for OnError {
    const ALL: &'static [Self] = &[OnError::Retry, OnError::DeadLetter];
    fn as_str(self) -> &'static str {
        match self {
            OnError::Retry => "retry",
            OnError::DeadLetter => "dead_letter",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Quiet,
    Normal,
    Verbose,
}

impl Word for LogLevel {
    const ALL: &'static [Self] = &[LogLevel::Quiet, LogLevel::Normal, LogLevel::Verbose];
    fn as_str(self) -> &'static str {
        match self {
            LogLevel::Quiet => "quiet",
            LogLevel::Normal => "normal",
            LogLevel::Verbose => "verbose",
        }
    }
}

/// What a row's column that the target table lacks gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewColumns {
    /// the batch fails (and is retried) until a DBA adds the column: the original's behaviour
    Error,
    /// the value is dropped, logged once per table and column, counted
    Ignore,
    /// the job adds the column, with the source's type, to the parent and the partition
    Add,
}

impl Word for NewColumns {
    const ALL: &'static [Self] = &[NewColumns::Error, NewColumns::Ignore, NewColumns::Add];
    fn as_str(self) -> &'static str {
        match self {
            NewColumns::Error => "error",
            NewColumns::Ignore => "ignore",
            NewColumns::Add => "add",
        }
    }
}

/// Whether a job reads its source in a second process (helper.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelperUse {
    /// with two CPUs or more, where it clearly pays (README, Performance; on one CPU the
    /// measurements disagree); without a worker slot or shared memory, quietly without (LOG)
    Auto,
    /// always, and running without one is a WARNING
    On,
    Off,
}

impl Word for HelperUse {
    const ALL: &'static [Self] = &[HelperUse::Auto, HelperUse::On, HelperUse::Off];
    fn as_str(self) -> &'static str {
        match self {
            HelperUse::Auto => "auto",
            HelperUse::On => "on",
            HelperUse::Off => "off",
        }
    }
}

impl HelperUse {
    pub fn wanted(self) -> bool {
        match self {
            // honours CPU affinity and cgroup quotas, as a container's limit should count
            HelperUse::Auto => std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
            HelperUse::On => true,
            HelperUse::Off => false,
        }
    }
}

/// An allow-list of `schema.table` and `schema.*` entries, names as logutriga writes them
/// (unquoted, exact case); an entry without a schema means `public`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableList {
    pub text: String,
    entries: Vec<(String, Option<String>)>,
}

impl TableList {
    pub fn parse(text: &str) -> Option<TableList> {
        let mut entries = Vec::new();
        for item in text.split(',').map(str::trim) {
            let (schema, table) = item.split_once('.').unwrap_or(("public", item));
            if schema.is_empty() || table.is_empty() {
                return None;
            }
            entries.push((schema.to_string(), (table != "*").then(|| table.to_string())));
        }
        Some(TableList { text: text.to_string(), entries })
    }

    pub fn allows(&self, schema: &str, table: &str) -> bool {
        self.entries.iter().any(|(s, t)| s == schema && t.as_deref().is_none_or(|t| t == table))
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid job name {0:?}: use lower-case letters, digits and '_', at most 40 bytes, not starting with a digit"
    )]
    BadJobName(String),
    #[error("{guc} is not set (required)")]
    Missing { guc: String },
    #[error("{guc} is not set: {why}")]
    Needed { guc: String, why: &'static str },
    #[error("invalid value {value:?} for {guc}: {why}")]
    Invalid { guc: String, value: String, why: String },
    #[error("{guc} is not an option of cube_dispatcher{}", match .nearest { Some(n) => format!("; did you mean {n}?"), None => String::new() })]
    Unknown { guc: String, nearest: Option<String> },
}

/// Settings under `cube_dispatcher.` that this job would read but that name no option: a typo
/// the original tool silently ignored. `names` are the settings the session has; a job's own
/// (`cube_dispatcher.<job>.<x>`) and the defaults for every job (`cube_dispatcher.<x>`) are
/// checked, other jobs' settings are theirs. `server` lists the extension's own GUCs.
pub fn check_names<'n>(job: &str, names: impl Iterator<Item = &'n str>, server: &[&str]) -> Result<(), ConfigError> {
    for guc in names {
        let lower = guc.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("cube_dispatcher.") else { continue };
        let (prefix, option) = match rest.split_once('.') {
            Some((j, o)) if j == job => (format!("cube_dispatcher.{job}."), o),
            Some(_) => continue,
            None if server.contains(&rest) => continue,
            None => ("cube_dispatcher.".to_string(), rest),
        };
        if !SCHEMA.iter().any(|s| s.name == option) {
            let nearest = nearest_option(option).map(|n| format!("{prefix}{n}"));
            return Err(ConfigError::Unknown { guc: guc.to_string(), nearest });
        }
    }
    Ok(())
}

/// The option `name` is closest to, at most two edits away (Levenshtein).
pub(crate) fn nearest_option(name: &str) -> Option<&'static str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let next = (row[j + 1] + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
                diagonal = row[j + 1];
                row[j + 1] = next;
            }
        }
        row[b.len()]
    };
    SCHEMA.iter().map(|o| (distance(name, o.name), o.name)).filter(|(d, _)| *d <= 2).min().map(|(_, o)| o)
}

/// GUC names are case-folded identifiers joined by dots, so a job name must be one.
pub fn validate_job_name(job: &str) -> Result<(), ConfigError> {
    let ok = !job.is_empty()
        && job.len() <= 40
        && !job.as_bytes()[0].is_ascii_digit()
        && job.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadJobName(job.to_string()))
    }
}

pub fn job_guc(job: &str, option: &str) -> String {
    format!("cube_dispatcher.{job}.{option}")
}

impl JobConfig {
    /// Reads a job's options; `lookup(option)` finds its setting. Settings and stored
    /// definitions go through this same validation.
    pub fn read(ctx: &Context, lookup: &dyn Fn(&str) -> Setting) -> Result<JobConfig, ConfigError> {
        validate_job_name(ctx.job)?;
        let mut cfg = Self::read_options(ctx, lookup)?;
        cfg.settle(lookup)?;
        Ok(cfg)
    }

    /// What options say together: date_field needs its column; a dateformat of one period under
    /// another period is a contradiction; an unset dateformat is the period's (and stored so).
    fn settle(&mut self, lookup: &dyn Fn(&str) -> Setting) -> Result<(), ConfigError> {
        if self.part_mode == PartMode::DateField && self.part_field.is_none() {
            return Err(ConfigError::Needed {
                guc: lookup("part_field").place,
                why: "part_mode = date_field places each row by the time in this column",
            });
        }
        if let (Some(period), DateFormat::Format(f)) = (self.period, &self.dateformat) {
            if let Some(other) = Period::of_dateformat(f).filter(|p| *p != period) {
                return Err(ConfigError::Invalid {
                    guc: lookup("dateformat").place,
                    value: f.clone(),
                    why: format!("this is the format of period {}, but period is {}", other.as_str(), period.as_str()),
                });
            }
        }
        if self.dateformat == DateFormat::FromPeriod {
            self.dateformat = DateFormat::Format(self.period.unwrap_or(Period::Day).dateformat().to_string());
        }
        if let Some(r) = &self.retention_period {
            if self.period().is_none() {
                return Err(ConfigError::Invalid {
                    guc: lookup("retention_period").place,
                    value: r.0.clone(),
                    why: "retention needs to know what a partition covers: set period (or a dateformat of an hour, day, month or year)".into(),
                });
            }
        }
        if self.ignore_old_events && self.retention_period.is_none() {
            return Err(ConfigError::Needed {
                guc: lookup("retention_period").place,
                why: "ignore_old_events skips events older than the retention period",
            });
        }
        Ok(())
    }

    /// What one partition covers, when known: set, or told by a dateformat of the four periods;
    /// None also when partitioning is off.
    pub fn period(&self) -> Option<Period> {
        let format = self.suffix_format()?;
        self.period.or_else(|| Period::of_dateformat(format))
    }

    /// The to_char() format of partition suffixes; None: partitioning is off.
    pub fn suffix_format(&self) -> Option<&str> {
        match &self.dateformat {
            DateFormat::Format(f) => Some(f),
            DateFormat::Off => None,
            DateFormat::FromPeriod => Some(self.period.unwrap_or(Period::Day).dateformat()),
        }
    }

    /// The stored form: a JSON object of each option's setting text (null: unset).
    pub fn to_json(&self) -> String {
        let texts: BTreeMap<&str, Option<String>> = self.texts().into_iter().collect();
        serde_json::to_string(&texts).expect("a map of strings serializes")
    }

    /// Reads a stored definition back. An entry that is not an option, or does not read back, is
    /// an error naming it: the job must not run on a guess. An option the definition lacks (one
    /// added by a later version) is unset.
    pub fn from_json(ctx: &Context, json: &str) -> Result<JobConfig, ConfigError> {
        let texts: BTreeMap<String, Option<String>> = serde_json::from_str(json).map_err(|e| ConfigError::Invalid {
            guc: "options".into(),
            value: json.chars().take(200).collect(),
            why: format!("expected a JSON object of option texts ({e})"),
        })?;
        if let Some(name) = texts.keys().find(|k| !SCHEMA.iter().any(|s| s.name == k.as_str())) {
            return Err(ConfigError::Unknown { guc: name.clone(), nearest: nearest_option(name).map(str::to_string) });
        }
        Self::read(ctx, &|name| Setting { text: texts.get(name).cloned().flatten(), place: name.to_string() })
    }
}

/// The database a libpq connection string names: `dbname=x` or the path of a URI.
pub fn dst_db_name(conninfo: &str) -> Option<String> {
    let s = conninfo.trim();
    if let Some(rest) = s.strip_prefix("postgresql://").or_else(|| s.strip_prefix("postgres://")) {
        let after_host = rest.split_once('/').map(|(_, p)| p)?;
        let db = after_host.split('?').next().unwrap_or("");
        return (!db.is_empty()).then(|| db.to_string());
    }
    if !s.contains('=') {
        return (!s.is_empty()).then(|| s.to_string());
    }
    conninfo_pairs(s).into_iter().find(|(k, _)| k == "dbname").map(|(_, v)| v)
}

/// key=value pairs of a libpq connection string, values unquoted ('...' with \' and \\).
pub(crate) fn conninfo_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    value.extend(chars.next());
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

/// Connection strings are shown (status view, logs, errors) with any password replaced.
pub fn mask_password(conninfo: &str) -> String {
    const MASK: &str = "********";
    let s = conninfo.trim();
    if let Some(scheme_end) = s.find("://").filter(|_| s.starts_with("postgres")) {
        let (scheme, rest) = s.split_at(scheme_end + 3);
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{MASK}@{host}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let q: Vec<String> = query
                    .split('&')
                    .map(|kv| if kv.starts_with("password=") { format!("password={MASK}") } else { kv.to_string() })
                    .collect();
                format!("{path}?{}", q.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}{authority}{tail}");
    }
    let pairs = conninfo_pairs(s);
    if pairs.is_empty() {
        return conninfo.to_string();
    }
    pairs
        .into_iter()
        .map(|(k, v)| {
            if k == "password" {
                format!("password={MASK}")
            } else if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\') {
                format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A job "sales" with these settings (other modules' tests build their JobConfig so too).
    pub(crate) fn cfg(settings: &[(&str, &str)]) -> Result<JobConfig, ConfigError> {
        let map: HashMap<String, String> = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let ctx = Context { job: "sales", current_db: "target" };
        JobConfig::read(&ctx, &|opt| Setting { text: map.get(opt).cloned(), place: job_guc("sales", opt) })
    }

    const BASE: &[(&str, &str)] = &[("src_db", "dbname=src"), ("pgq_queue_name", "q")];

    pub(crate) fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        BASE.iter().copied().chain(extra.iter().copied()).collect()
    }

    #[test]
    fn defaults() {
        let c = cfg(BASE).unwrap();
        assert_eq!(c.pgq_consumer_id, "sales");
        assert_eq!(c.mode, Mode::KeepLatest);
        assert_eq!(c.suffix_format(), Some("YYYY_MM_DD"));
        assert_eq!((c.period, c.part_mode, c.part_field.as_ref()), (None, PartMode::BatchTime, None));
        assert_eq!(c.part_template, None);
        assert_eq!((c.loop_delay, c.connection_lifetime), (1.0, 1200.0));
        assert_eq!(c.log_level, LogLevel::Normal);
        assert_eq!(c.on_error, OnError::Retry);
    }

    #[test]
    fn period_dateformat_and_part_mode_settle_together() {
        let c = cfg(&with(&[("period", "hour")])).unwrap();
        assert_eq!(c.suffix_format(), Some("YYYY_MM_DD_HH24"));
        assert!(c.to_json().contains(r#""dateformat":"YYYY_MM_DD_HH24""#), "the resolved format is stored");
        for period in ["day", "month", "year"] {
            let c = cfg(&with(&[("period", period)])).unwrap();
            assert_eq!(c.suffix_format().and_then(Period::of_dateformat).map(Period::as_str), Some(period));
        }
        let c = cfg(&with(&[("dateformat", "YYYYMMDD"), ("period", "day")])).unwrap();
        assert_eq!((c.suffix_format(), c.period), (Some("YYYYMMDD"), Some(Period::Day)));
        assert_eq!(
            cfg(&with(&[("dateformat", "YYYY_MM_DD"), ("period", "hour")])).unwrap_err().to_string(),
            "invalid value \"YYYY_MM_DD\" for cube_dispatcher.sales.dateformat: this is the format of period day, but period is hour"
        );
        assert_eq!(
            cfg(&with(&[("part_mode", "date_field")])).unwrap_err().to_string(),
            "cube_dispatcher.sales.part_field is not set: part_mode = date_field places each row by the time in this column"
        );
        let c = cfg(&with(&[("part_mode", "date_field"), ("part_field", "orders:ordered_at; created")])).unwrap();
        assert_eq!(c.part_field.as_ref().and_then(|f| f.column_for("public", "orders")), Some("ordered_at"));
        assert_eq!(
            cfg(&with(&[("dateformat", "YYYYMMDD"), ("retention_period", "90 days")])).unwrap_err().to_string(),
            "invalid value \"90 days\" for cube_dispatcher.sales.retention_period: retention needs to know what a partition covers: set period (or a dateformat of an hour, day, month or year)"
        );
        assert!(cfg(&with(&[("dateformat", "YYYYMMDD"), ("period", "day"), ("retention_period", "90 days")])).is_ok());
        assert_eq!(
            cfg(&with(&[("ignore_old_events", "1")])).unwrap_err().to_string(),
            "cube_dispatcher.sales.retention_period is not set: ignore_old_events skips events older than the retention period"
        );
        let c =
            cfg(&with(&[("ignore_old_events", "on"), ("retention_period", "3 months"), ("period", "month")])).unwrap();
        assert_eq!((c.ignore_old_events, c.retention_period.map(|r| r.0)), (true, Some("3 months".to_string())));
        for (opt, bad) in [
            ("period", "week"),
            ("part_mode", "event"),
            ("part_field", "t:"),
            ("retention_period", "soon"),
            ("ignore_old_events", "maybe"),
        ] {
            let err = cfg(&with(&[(opt, bad)])).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid value \"{bad}\" for cube_dispatcher.sales.{opt}: ")), "{err}");
        }
    }

    #[test]
    fn explicit_values() {
        let c = cfg(&with(&[
            ("mode", "keep_all"),
            ("dateformat", ""),
            ("part_template", ""),
            ("loop_delay", "0.25"),
            ("pgq_consumer_id", "c1"),
            ("log_level", "verbose"),
            ("dst_db", "host=/tmp dbname=target"),
            ("on_error", "dead_letter"),
        ]))
        .unwrap();
        assert_eq!(c.on_error, OnError::DeadLetter);
        assert_eq!((c.mode, c.suffix_format(), c.part_template.as_deref()), (Mode::KeepAll, None, Some("")));
        assert_eq!((c.loop_delay, c.pgq_consumer_id.as_str(), c.log_level), (0.25, "c1", LogLevel::Verbose));
        assert_eq!(cfg(&with(&[("loop_delay", "0")])).unwrap().loop_delay, 0.0, "the original accepted 0");
    }

    #[test]
    fn errors_name_the_guc() {
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![("pgq_queue_name", "q")], "cube_dispatcher.sales.src_db is not set"),
            (vec![("src_db", "dbname=x")], "cube_dispatcher.sales.pgq_queue_name is not set"),
            (vec![("src_db", " "), ("pgq_queue_name", "q")], "cube_dispatcher.sales.src_db is not set"),
            (with(&[("mode", "keep_some")]), "invalid value \"keep_some\" for cube_dispatcher.sales.mode"),
            (with(&[("loop_delay", "-1")]), "for cube_dispatcher.sales.loop_delay"),
            (with(&[("connection_lifetime", "0")]), "for cube_dispatcher.sales.connection_lifetime"),
            (with(&[("loop_delay", "soon")]), "for cube_dispatcher.sales.loop_delay"),
            (with(&[("connection_lifetime", "-5")]), "for cube_dispatcher.sales.connection_lifetime"),
            (with(&[("log_level", "loud")]), "for cube_dispatcher.sales.log_level"),
            (with(&[("on_error", "skip")]), "invalid value \"skip\" for cube_dispatcher.sales.on_error"),
            (with(&[("dst_db", "dbname=other password=hunter2")]), "for cube_dispatcher.sales.dst_db"),
        ];
        for (settings, want) in cases {
            let err = cfg(&settings).unwrap_err().to_string();
            assert!(err.contains(want), "{settings:?}: {err}");
            assert!(!err.contains("hunter2"), "password leaked: {err}");
        }
        for bad in ["", "Sales", "1job", "a-b", "a.b", &"x".repeat(41)] {
            let ctx = Context { job: bad, current_db: "t" };
            let err = JobConfig::read(&ctx, &|_| Setting { text: Some("x".into()), place: String::new() });
            assert!(matches!(err, Err(ConfigError::BadJobName(_))), "{bad:?}");
        }
    }

    #[test]
    fn table_allow_list() {
        let t = TableList::parse("public.orders, Sales.*, items").unwrap();
        let cases = [
            ("public", "orders", true),
            ("public", "items", true),
            ("Sales", "Order Lines", true),
            ("sales", "x", false),
            ("public", "orders_2026", false),
            ("pg_catalog", "pg_authid", false),
            ("cube_dispatcher", "job", false),
        ];
        for (schema, table, want) in cases {
            assert_eq!(t.allows(schema, table), want, "{schema}.{table}");
        }
        assert!(TableList::parse("a.,b").is_none());
        assert!(cfg(&with(&[("tables", "x..")])).is_ok_and(|c| c.tables.unwrap().allows("x", ".")));
        assert!(cfg(&with(&[("tables", ",")])).unwrap_err().to_string().contains("cube_dispatcher.sales.tables"));
    }

    #[test]
    fn dst_db_names() {
        let cases = [
            ("dbname=target", Some("target")),
            ("host=/tmp port=5432 dbname='my db'", Some("my db")),
            ("postgresql://u:p@h:5/target?sslmode=disable", Some("target")),
            ("postgresql://h", None),
            ("target", Some("target")),
            ("host=/tmp", None),
        ];
        for (conn, want) in cases {
            assert_eq!(dst_db_name(conn).as_deref(), want, "{conn}");
        }
    }

    #[test]
    fn passwords_are_masked() {
        let cases = [
            ("host=/tmp dbname=src password=hunter2", "host=/tmp dbname=src password=********"),
            ("password='hun ter2' dbname=src", "password=******** dbname=src"),
            ("dbname = src password = hunter2", "dbname=src password=********"),
            ("postgresql://alice:hunter2@db.example:5432/src", "postgresql://alice:********@db.example:5432/src"),
            (
                "postgres://alice@h/src?password=hunter2&sslmode=require",
                "postgres://alice@h/src?password=********&sslmode=require",
            ),
            ("dbname=src", "dbname=src"),
        ];
        for (conn, want) in cases {
            assert_eq!(mask_password(conn), want, "{conn}");
        }
    }

    #[test]
    fn misspelt_settings_are_named_with_the_nearest_option() {
        let check = |names: &[&str]| check_names("sales", names.iter().copied(), &["databases"]);
        assert_eq!(
            check(&["cube_dispatcher.sales.mode", "cube_dispatcher.loop_delay", "cube_dispatcher.databases"]),
            Ok(())
        );
        // another job's settings are not this job's business
        assert_eq!(check(&["cube_dispatcher.other.modee"]), Ok(()));
        assert_eq!(
            check(&["cube_dispatcher.sales.modee"]).unwrap_err().to_string(),
            "cube_dispatcher.sales.modee is not an option of cube_dispatcher; did you mean cube_dispatcher.sales.mode?"
        );
        assert_eq!(
            check(&["cube_dispatcher.pgq_queue"]).unwrap_err().to_string(),
            "cube_dispatcher.pgq_queue is not an option of cube_dispatcher"
        );
        assert_eq!(
            check(&["cube_dispatcher.Sales.Dateformt"]),
            Err(ConfigError::Unknown {
                guc: "cube_dispatcher.Sales.Dateformt".into(),
                nearest: Some("cube_dispatcher.sales.dateformat".into())
            })
        );
    }

    #[test]
    fn a_stored_definition_reads_back_as_it_was_stored() {
        let ctx = Context { job: "sales", current_db: "target" };
        let configs = [
            cfg(BASE).unwrap(),
            cfg(&with(&[
                ("mode", "keep_all"),
                ("dateformat", ""),
                ("part_template", ""),
                ("loop_delay", "0"),
                ("connection_lifetime", "0.125"),
                ("dst_db", "dbname=target password=x"),
                ("tables", "public.orders, s.*"),
                ("on_error", "dead_letter"),
            ]))
            .unwrap(),
        ];
        for c in configs {
            let json = c.to_json();
            assert_eq!(JobConfig::from_json(&ctx, &json).as_ref(), Ok(&c), "{json}");
        }
        let json = cfg(BASE).unwrap().to_json();
        assert!(json.contains(r#""part_template":null"#) && json.contains(r#""dateformat":"YYYY_MM_DD""#), "{json}");
    }

    #[test]
    fn a_stored_definition_that_does_not_read_back_is_an_error_naming_the_entry() {
        let ctx = Context { job: "sales", current_db: "target" };
        let stored = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(&cfg(BASE).unwrap().to_json()).unwrap();
            edit(&mut v);
            JobConfig::from_json(&ctx, &v.to_string()).unwrap_err().to_string()
        };
        assert_eq!(
            stored(&|v| v["tables"] = "public.".into()),
            r#"invalid value "public." for tables: expected a comma-separated list of schema.table or schema.*"#
        );
        assert_eq!(
            stored(&|v| v["mode"] = "keep_some".into()).split(':').next(),
            Some(r#"invalid value "keep_some" for mode"#)
        );
        assert_eq!(stored(&|v| v["src_db"] = serde_json::Value::Null), "src_db is not set (required)");
        assert!(stored(&|v| v["loop_delay"] = 1.into()).contains("expected a JSON object of option texts"));
        assert_eq!(
            stored(&|v| v["modee"] = "keep_all".into()),
            "modee is not an option of cube_dispatcher; did you mean mode?"
        );
        assert!(JobConfig::from_json(&ctx, "[]").is_err());
        // an option a later version adds is unset in older definitions
        let mut v: serde_json::Value = serde_json::from_str(&cfg(BASE).unwrap().to_json()).unwrap();
        v.as_object_mut().unwrap().remove("lock_timeout");
        assert_eq!(JobConfig::from_json(&ctx, &v.to_string()).unwrap().lock_timeout, 60.0);
    }

    fn default_cell(s: &OptionSpec) -> String {
        match s.unset {
            Unset::Value(v) => format!("`{v}`"),
            _ => s.default_text().to_string(),
        }
    }

    #[test]
    fn connection_strings_are_masked_or_hidden_when_shown() {
        let json = cfg(&with(&[("src_db", "dbname=src password=hunter2"), ("dst_db", "dbname=target password=x")]))
            .unwrap()
            .to_json();
        let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&json).unwrap();
        shown(&mut v, true);
        assert_eq!(
            (v["src_db"].as_str(), v["dst_db"].as_str()),
            (Some("dbname=src password=********"), Some("dbname=target password=********"))
        );
        assert_eq!(v["mode"].as_str(), Some("keep_latest"));
        shown(&mut v, false);
        assert!(v["src_db"].is_null() && v["dst_db"].is_null());
    }

    /// The README's option table lists the options of the schema, in its order, with the same
    /// defaults and the same "takes effect".
    #[test]
    fn the_readme_option_table_is_the_schema() {
        let readme = include_str!("../README.md");
        let start = readme.find("| option | meaning | default | takes effect |").expect("the option table");
        let rows: Vec<Vec<&str>> = readme[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
            .collect();
        let readme_rows: Vec<(String, String, String)> =
            rows.iter().map(|r| (r[0].trim_matches('`').to_string(), r[2].to_string(), r[3].to_string())).collect();
        let schema_rows: Vec<(String, String, String)> =
            SCHEMA.iter().map(|s| (s.name.to_string(), default_cell(s), s.effect.describe().to_string())).collect();
        assert_eq!(readme_rows, schema_rows);
    }
}
