//! Writes a batch into the target: decodes and routes each event, creates missing partitions from
//! the template (under a lock, re-checked), then performs the set-based plan. The hot path builds
//! one statement per table and column set per chunk, never one per event.

use crate::config::JobConfig;
use crate::decode::{self, DecodeError, Format, Op, Row, TableName};
use crate::event::{Chunks, RawEvent};
use crate::mode::{ModeError, OnTruncate};
use crate::native;
use crate::part_time::{Placement, TimeOf};
use crate::per_table::TableRules;
use crate::placement::PartMode;
use crate::plan::{self, Change, DeleteGroup, InsertGroup};
use crate::reshape::{Reshape, ReshapeError};
use crate::route::{self, RouteError};
use crate::tx::{catching, in_subtransaction, SqlError, SubError};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;
use std::time::{Duration, Instant};
use thiserror::Error;

mod new_columns;

/// What was wrong with one event (or, for a set-based statement, a run of events).
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("event {ev_id}, table {table}: {cause}")]
    Event { ev_id: i64, table: String, cause: EventError },
    #[error("events {first_ev_id}..{last_ev_id}, table {table}: {cause}")]
    Statement { first_ev_id: i64, last_ev_id: i64, table: String, cause: SqlError },
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Event { cause: EventError::Sql(e) | EventError::Template { cause: e, .. }, .. } => e.transient,
            ApplyError::Statement { cause, .. } => cause.transient,
            ApplyError::Event { .. } => false,
        }
    }
}

#[derive(Debug, Error)]
pub enum EventError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error(transparent)]
    Reshape(#[from] ReshapeError),
    #[error("column {column:?} does not exist in {table}")]
    NoSuchColumn { column: String, table: String },
    #[error("partition {0} does not exist and part_template is empty")]
    NoPartition(String),
    #[error("parent table {0} does not exist")]
    NoParent(String),
    #[error("table {0} is not in the job's tables list")]
    NotAllowed(String),
    #[error("creating partition {table} failed: {step}: {cause}")]
    Template { step: &'static str, table: String, cause: SqlError },
    #[error("parent table {parent} is a partitioned table: {why}")]
    NativeUnsupported { parent: String, why: String },
    #[error("no time to fill the partition key column {0:?} with")]
    NoKeyTime(String),
    #[error("part_field names no column for table {0}")]
    NoPartField(String),
    #[error("part_field column {0:?} is missing from ev_data")]
    PartFieldMissing(String),
    #[error("part_field column {0:?} is NULL")]
    PartFieldNull(String),
    #[error("column {column:?} is not in the source table {table} either (new_columns = add reads its type there)")]
    NoSourceColumn { column: String, table: String },
    #[error("new_columns = add: no source connection to read column types from")]
    NoCatalog,
    #[error("column {column:?} has type {ty} on the source, which this database does not know")]
    NoType { column: String, ty: String },
    #[error("adding column {column:?} to {table} failed: {cause}")]
    AddColumn { column: String, table: String, cause: SqlError },
    #[error("{what} {value:?} is not a time: {cause}")]
    NotATime { what: String, value: String, cause: SqlError },
    #[error("{0}")]
    Sql(SqlError),
}

/// PostgreSQL's own quote_identifier(): quotes only where needed, knows the keyword list.
pub fn quote_ident(name: &str) -> String {
    // decode refuses NUL, and names from the catalog cannot hold one
    let c = CString::new(name).expect("identifier without NUL");
    // SAFETY: quote_identifier returns its argument or a palloc'd, NUL-terminated copy
    unsafe { CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }.to_string_lossy().into_owned()
}

impl Partition {
    /// Whether an index leads with the column; asked once per batch and column.
    fn key_indexed(&self, first_key_column: &str) -> bool {
        if let Some((c, yes)) = &*self.key_index.borrow() {
            if c == first_key_column {
                return *yes;
            }
        }
        let yes = crate::spi::value::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                             WHERE i.indrelid = $1 AND a.attname = $2)",
            &[self.relid.into(), first_key_column.into()],
        )
        .unwrap_or(false);
        *self.key_index.borrow_mut() = Some((first_key_column.to_string(), yes));
        yes
    }
}

struct Partition {
    qualified: String,
    /// the parent, schema-qualified and quoted
    parent: String,
    /// a leaf of a natively partitioned parent
    native_leaf: bool,
    /// the table whose events opened it (its columns' types are read from there)
    source: TableName,
    relid: pg_sys::Oid,
    /// COPY is equivalent to INSERT here (privilege held, no row security): use the fast path.
    copy_ok: bool,
    /// column name -> type to cast the text value to (None: a string type, no cast needed)
    columns: HashMap<String, Option<String>>,
    /// the last key_indexed() answer
    key_index: std::cell::RefCell<Option<(String, bool)>>,
    /// a native parent's partition key that the job fills with the placing time (part_mode
    /// batch_time, event_time, current_time: the column does not come from the events)
    fill_key: Option<String>,
}

/// Sets `column` to `time` in the row: appended, or in place of a value the event carried.
fn fill<'e>(row: &mut Row<'e>, column: &str, time: &'e str) {
    let value = Some(decode::Encoded::literal(time));
    match row.iter_mut().find(|(c, _)| c == column) {
        Some((_, v)) => *v = value,
        None => row.push((Cow::Owned(column.to_string()), value)),
    }
}

/// A table's oid, if it exists.
fn relid(name: &str) -> Result<Option<pg_sys::Oid>, EventError> {
    catching(|| Ok(crate::spi::value::<pg_sys::Oid>("SELECT to_regclass($1)::oid", &[name.into()])))
        .map_err(EventError::Sql)
}

/// A partition, looked up: `parent` (quoted) and `source` (the table whose events opened it)
/// are what new_columns = add needs.
fn describe(qualified: String, parent: String, source: TableName) -> Result<Partition, EventError> {
    let oid = relid(&qualified)?.ok_or_else(|| EventError::NoPartition(qualified.clone()))?;
    let columns = columns_of(oid)?;
    Ok(Partition {
        qualified,
        parent,
        native_leaf: false,
        source,
        relid: oid,
        copy_ok: crate::copy_in::usable(oid),
        columns,
        key_index: Default::default(),
        fill_key: None,
    })
}

/// A table's columns and the types their text is cast to. format_type without typmod: the
/// cast goes to the base type and the column's own typmod is then enforced by the INSERT (a
/// too-long varchar errors instead of truncating).
fn columns_of(oid: pg_sys::Oid) -> Result<HashMap<String, Option<String>>, EventError> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT a.attname::text,
                    CASE WHEN t.typcategory = 'S' AND t.typtype <> 'd' THEN NULL
                         ELSE format_type(a.atttypid, NULL) END
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            None,
            &[oid.into()],
        )?;
        let mut m = HashMap::new();
        for r in rows {
            m.insert(r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?);
        }
        Ok::<_, pgrx::spi::Error>(m)
    })
    .map_err(|e| EventError::Sql(SqlError::internal(e)))
}

/// What a partition about to be looked up or made is: its name, parent, period, and the native
/// parent's key if the parent is partitioned.
struct NewPartition<'n> {
    dest: &'n TableName,
    parent: &'n TableName,
    pkey: &'n [String],
    suffix: Option<&'n str>,
    /// the start of the period (timestamptz text) and the period, when known
    period: Option<(String, &'static str)>,
    native: Option<(pg_sys::Oid, native::NativeKey)>,
    /// part_field's column for the table (named by the table the events come from)
    field: Option<&'n str>,
}

impl NewPartition<'_> {
    /// A leaf of the native parent that covers the period.
    fn covering(&self) -> Result<Option<String>, EventError> {
        match (&self.native, &self.period) {
            (Some((oid, key)), Some((start, _))) => native::covering(*oid, start, key).map_err(EventError::Sql),
            _ => Ok(None),
        }
    }

    /// The template words beyond the table names: the period's bounds and the placing column.
    fn words(&self) -> Result<Vec<(&'static str, String)>, EventError> {
        let mut words = Vec::new();
        if let Some((start, interval)) = &self.period {
            let any = native::NativeKey::timestamptz();
            let key = self.native.as_ref().map(|(_, k)| k).unwrap_or(&any);
            let (lo, hi) = native::bounds(start, interval, key).map_err(EventError::Sql)?;
            words.push(("_PART_START", lo));
            words.push(("_PART_END", hi));
        }
        let field = match &self.native {
            Some((_, key)) => Some(key.column.as_str()),
            None => self.field,
        };
        if let Some(f) = field {
            words.push(("_PART_FIELD", quote_ident(f)));
        }
        Ok(words)
    }
}

/// One batch being applied. Partitions are looked up once per batch.
pub struct BatchWriter<'a> {
    job: &'a JobConfig,
    /// Rows and partitions are written with this role's privileges (the job's owner).
    role: pg_sys::Oid,
    /// which partition suffix each event gets
    placement: Placement,
    partitions: Vec<Partition>,
    by_name: HashMap<TableName, usize>,
    /// Consecutive events mostly repeat the previous one's ev_extra1, suffix and ev_type: reuse
    /// their parsed form instead of parsing and hashing again.
    last_table: Option<(String, Option<String>, usize)>,
    /// ev_extra1 -> what the per-table options say for that table
    last_rules: Option<(String, Rc<Rules>)>,
    rules: HashMap<String, Rc<Rules>>,
    last_type: Option<(String, Op, Rc<Vec<String>>, Format)>,
    /// partitions created, for the log and the job's list of partitions
    pub created: Vec<Created>,
    /// events not written, by reason
    pub skipped: Skipped,
    /// where new_columns = add reads column types
    catalog: Option<crate::source::SourceCatalog>,
    /// partitions past the retention period, found so (ignore_old_events)
    expired: std::collections::HashSet<TableName>,
    /// what a truncate does, asked of the mode once: it depends only on the job and the placement
    on_truncate: Result<OnTruncate, ModeError>,
}

/// Events a batch did not write, by reason; counted in the job's status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Skipped {
    /// for a partition past the retention period (ignore_old_events)
    pub old: i64,
    /// of an operation the job does not apply (event_types, ignore_truncate)
    pub filtered: i64,
    /// not events: column values left out because the target lacks the column
    /// (new_columns = ignore)
    pub values: i64,
}

/// Key column names, shared by the events that carry the same ones.
type Key = Rc<Vec<String>>;

/// A table's rules as the writer keeps them: looked up once per table and batch.
struct Rules {
    table: TableRules,
    /// the last key mapped through reshape: the event's, and the target's (or why not)
    last_key: std::cell::RefCell<Option<(Key, Result<Key, ReshapeError>)>>,
}

impl Rules {
    /// The key columns under their target names. keep_latest needs every one of them; keep_all
    /// only names the key in templates (_PKEY), so a dropped column just leaves it.
    fn key(
        &self,
        reshape: &Reshape,
        pkey: &Rc<Vec<String>>,
        keep_latest: bool,
    ) -> Result<Rc<Vec<String>>, ReshapeError> {
        let mut last = self.last_key.borrow_mut();
        if let Some((from, to)) = &*last {
            if Rc::ptr_eq(from, pkey) {
                return to.clone();
            }
        }
        let to = match reshape.key(pkey) {
            Err(e) if keep_latest => Err(e),
            _ => Ok(Rc::new(reshape.kept_key(pkey))),
        };
        *last = Some((pkey.clone(), to.clone()));
        to
    }
}

/// A partition the writer created.
#[derive(Debug, Clone)]
pub struct Created {
    /// schema-qualified, quoted
    pub parent: String,
    pub partition: String,
    pub suffix: String,
    /// the start of its period (timestamptz text) and the period, when known
    pub period: Option<(String, &'static str)>,
}

/// Runs one SQL statement; a PostgreSQL error becomes an Err so the caller can say which events
/// and table it was about. The transaction is aborted by the caller right after.
fn run_sql(sql: &str, args: &[DatumWithOid]) -> Result<(), SqlError> {
    catching(|| Spi::run_with_args(sql, args).map_err(SqlError::internal))
}

impl<'a> BatchWriter<'a> {
    pub fn new(job: &'a JobConfig, role: pg_sys::Oid, placement: Placement) -> Self {
        let placed_by_row = matches!(placement.time_of(), Some(TimeOf::Field));
        BatchWriter {
            on_truncate: job.mode.on_truncate(job.ignore_truncate, placed_by_row),
            job,
            role,
            placement,
            partitions: Vec::new(),
            by_name: HashMap::new(),
            last_table: None,
            last_rules: None,
            rules: HashMap::new(),
            last_type: None,
            created: Vec::new(),
            skipped: Skipped::default(),
            catalog: None,
            expired: Default::default(),
        }
    }

    /// The source's catalog, for new_columns = add.
    pub fn with_catalog(mut self, catalog: crate::source::SourceCatalog) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// After a rolled-back subtransaction: partitions it created are gone, so look everything up
    /// again.
    fn forget_partitions(&mut self) {
        self.partitions.clear();
        self.by_name.clear();
        self.last_table = None;
    }

    /// The partition index for ev_extra1 and the suffix, opening (or creating) the partition on
    /// first sight.
    /// None: the event is for a partition past the retention period, and skipped.
    fn destination(&mut self, ev: &RawEvent, pkey: &[String], time: Option<&str>) -> Result<Option<usize>, ApplyError> {
        let raw = ev.ev_extra1.as_deref();
        let suffix = self.placement.suffix(time);
        if let (Some((last, last_suffix, i)), Some(raw)) = (&self.last_table, raw) {
            if last == raw && last_suffix.as_deref() == suffix {
                return Ok(Some(*i));
            }
        }
        let suffix = suffix.map(str::to_string);
        let fail = |cause: EventError| ApplyError::Event {
            ev_id: ev.ev_id,
            table: raw.unwrap_or("(null)").to_string(),
            cause,
        };
        // table_map: the parent the events are written into, which the allow-list is about
        let rules = self.rules_of(ev).map_err(fail)?;
        let parent = &rules.table.dest;
        if self.job.tables.as_ref().is_some_and(|t| !t.allows(&parent.schema, &parent.table)) {
            return Err(fail(EventError::NotAllowed(route::qualified(parent, &quote_ident))));
        }
        let dest = route::partition_of(parent, suffix.as_deref()).map_err(|e| fail(e.into()))?;
        let i = match self.by_name.get(&dest) {
            Some(&i) => i,
            None if self.expired.contains(&dest) => return Ok(None),
            None if self.past_retention(suffix.as_deref()) => {
                self.expired.insert(dest);
                return Ok(None);
            }
            None => {
                let field = rules.table.part_field.as_deref();
                let p = self
                    .open_partition(&dest, parent, pkey, suffix.as_deref(), field, &rules.table.source)
                    .map_err(|cause| ApplyError::Event {
                        ev_id: ev.ev_id,
                        table: route::qualified(parent, &quote_ident),
                        cause,
                    })?;
                self.partitions.push(p);
                self.by_name.insert(dest, self.partitions.len() - 1);
                self.partitions.len() - 1
            }
        };
        self.last_table = raw.map(|r| (r.to_string(), suffix, i));
        Ok(Some(i))
    }

    /// Whether ignore_old_events applies to a partition of this suffix: its whole period ended
    /// more than retention_period ago. Asked once per partition and batch.
    fn past_retention(&self, suffix: Option<&str>) -> bool {
        let (true, Some(retention), Some(period), Some(format), Some(suffix)) = (
            self.job.ignore_old_events,
            &self.job.retention_period,
            self.job.period(),
            self.job.suffix_format(),
            suffix,
        ) else {
            return false;
        };
        crate::spi::value::<bool>(
            "SELECT to_timestamp($1, $2) + $3::interval <= now() - $4::interval",
            &[suffix.into(), format.into(), period.interval().into(), retention.0.as_str().into()],
        )
        .unwrap_or(false)
    }

    /// The start of the period a suffix stands for (a timestamptz text, in the transaction's time
    /// zone, the source's) and the period as an interval; None when the period is not known.
    fn period_of(&self, suffix: Option<&str>) -> Option<(String, &'static str)> {
        let (Some(period), Some(format), Some(suffix)) = (self.job.period(), self.job.suffix_format(), suffix) else {
            return None;
        };
        // a dateformat the user declared a period for may still not read back: then no bounds
        let start = in_subtransaction(|| {
            Ok::<_, ()>(crate::spi::value::<String>(
                "SELECT to_timestamp($1, $2)::text",
                &[suffix.into(), format.into()],
            ))
        });
        start.ok().flatten().map(|s| (s, period.interval()))
    }

    /// The partition key of a native parent, checked against how the job places rows: the key
    /// must be the column that places them.
    fn native_parent(
        &self,
        oid: pg_sys::Oid,
        parent: &TableName,
        field: Option<&str>,
    ) -> Result<Option<native::NativeKey>, EventError> {
        let parent_q = route::qualified(parent, &quote_ident);
        let key = match native::key_of(oid).map_err(EventError::Sql)? {
            Ok(None) => return Ok(None),
            Ok(Some(key)) => key,
            Err(native::Unsupported::Key(why)) => return Err(EventError::NativeUnsupported { parent: parent_q, why }),
        };
        if self.job.period().is_none() {
            return Err(EventError::NativeUnsupported {
                parent: parent_q,
                why: "its partitions need bounds: set period (or a dateformat of an hour, day, month or year)".into(),
            });
        }
        match (self.job.part_mode, field) {
            (PartMode::DateField, Some(f)) if f == key.column => Ok(Some(key)),
            (PartMode::DateField, f) => Err(EventError::NativeUnsupported {
                parent: parent_q,
                why: format!(
                    "it is partitioned by column {:?}, but part_field places its rows by {:?}",
                    key.column,
                    f.unwrap_or_default()
                ),
            }),
            // the job fills the key with the time that places the row
            _ => Ok(Some(key)),
        }
    }

    /// The per-table options for the event's table (ev_extra1 parsed once per table and batch).
    fn rules_of(&mut self, ev: &RawEvent) -> Result<Rc<Rules>, EventError> {
        let raw = ev.ev_extra1.as_deref().unwrap_or_default();
        if let Some((last, rules)) = &self.last_rules {
            if last == raw {
                return Ok(rules.clone());
            }
        }
        let rules = match self.rules.get(raw) {
            Some(r) => r.clone(),
            None => {
                let table = self.job.table_rules(decode::parse_table(ev.ev_extra1.as_deref())?);
                let rules = Rc::new(Rules { table, last_key: Default::default() });
                self.rules.insert(raw.to_string(), rules.clone());
                rules
            }
        };
        self.last_rules = Some((raw.to_string(), rules.clone()));
        Ok(rules)
    }

    /// The part_field column for the event's table.
    fn part_field_of(&mut self, ev: &RawEvent) -> Result<Option<String>, EventError> {
        let Some(TimeOf::Field) = self.placement.time_of() else { return Ok(None) };
        let rules = self.rules_of(ev)?;
        match &rules.table.part_field {
            None => Err(EventError::NoPartField(route::qualified(&rules.table.source, &quote_ident))),
            column => Ok(column.clone()),
        }
    }

    /// The time that places the event, where each event has its own.
    fn time_of<'e>(&mut self, ev: &'e RawEvent, row: &Row<'e>) -> Result<Option<Cow<'e, str>>, EventError> {
        match self.placement.time_of() {
            None => Ok(None),
            Some(TimeOf::EventTime) => Ok(ev.ev_time.as_deref().map(Cow::Borrowed)),
            Some(TimeOf::Field) => {
                let column = self.part_field_of(ev)?.unwrap_or_default();
                match row.iter().find(|(c, _)| *c == column) {
                    None => Err(EventError::PartFieldMissing(column)),
                    Some((_, None)) => Err(EventError::PartFieldNull(column)),
                    Some((_, Some(v))) => Ok(Some(v.decoded())),
                }
            }
        }
    }

    fn event_type(&mut self, ev: &RawEvent) -> Result<(Op, Rc<Vec<String>>, Format), EventError> {
        let raw = ev.ev_type.as_deref().unwrap_or("");
        if let Some((last, op, pkey, format)) = &self.last_type {
            if last == raw {
                return Ok((*op, pkey.clone(), *format));
            }
        }
        let ty = decode::parse_ev_type(raw)?;
        let pkey = Rc::new(ty.pkey);
        self.last_type = Some((raw.to_string(), ty.op, pkey.clone(), ty.format));
        Ok((ty.op, pkey, ty.format))
    }

    /// Whether the job applies events of `op` to the event's table (event_types,
    /// ignore_truncate); what it does not apply is skipped and counted.
    fn applies(&mut self, ev: &RawEvent, op: Op) -> Result<bool, EventError> {
        if op == Op::Truncate && self.on_truncate == Ok(OnTruncate::Skip) {
            return Ok(false);
        }
        if self.job.event_types.is_none() {
            return Ok(true);
        }
        Ok(self.rules_of(ev)?.table.event_types.is_none_or(|t| t.applies(op)))
    }

    /// An event's row as the trigger sent it. A truncate has none; one the mode refuses is
    /// refused here, after `applies` has read the table as for any event.
    fn row_of<'e>(&self, ev: &'e RawEvent, op: Op, format: Format) -> Result<Row<'e>, EventError> {
        if op == Op::Truncate {
            self.on_truncate.clone()?;
            return Ok(Vec::new());
        }
        if ev.predecoded {
            return Ok(decode::predecoded::parse(ev.ev_data.as_deref().unwrap_or_default())?);
        }
        Ok(decode::parse_row(format, ev.ev_data.as_deref())?)
    }

    /// The row and key as the target gets them (fields, skip_fields), checked against the mode.
    fn reshaped<'e>(
        &mut self,
        ev: &RawEvent,
        op: Op,
        pkey: Rc<Vec<String>>,
        row: Row<'e>,
    ) -> Result<(Rc<Vec<String>>, Row<'e>), EventError> {
        if op == Op::Truncate {
            // no row, nor a key to find one by: row_of has asked the mode about it
            return Ok((pkey, row));
        }
        let (pkey, row) = match (&self.job.fields, &self.job.skip_fields) {
            (None, None) => (pkey, row),
            _ => {
                let rules = self.rules_of(ev)?;
                match &rules.table.reshape {
                    None => (pkey, row),
                    Some(r) => (rules.key(r, &pkey, !self.job.mode.keeps_every_version())?, r.row(row)),
                }
            }
        };
        self.job.mode.check(op, &pkey, &row)?;
        Ok((pkey, row))
    }

    /// Decodes, checks, places and routes a run of events. Every failure names the event and its
    /// table.
    /// `batch_time`: the time of the whole batch, when one time places it (see fill_key).
    fn changes<'e>(
        &mut self,
        events: &'e [RawEvent<'_>],
        batch_time: Option<&'e str>,
    ) -> Result<Vec<Change<'e>>, ApplyError> {
        let fail = |ev: &RawEvent, cause: EventError| ApplyError::Event {
            ev_id: ev.ev_id,
            table: ev.ev_extra1.as_deref().unwrap_or("(null)").to_string(),
            cause,
        };
        let mut decoded = Vec::with_capacity(events.len());
        let mut times = Vec::new();
        for ev in events {
            let (op, pkey, format) = self.event_type(ev).map_err(|e| fail(ev, e))?;
            if !self.applies(ev, op).map_err(|e| fail(ev, e))? {
                self.skipped.filtered += 1;
                continue;
            }
            let row = self.row_of(ev, op, format).map_err(|e| fail(ev, e))?;
            // part_field names the column as the event carries it
            if self.placement.time_of().is_some() {
                times.push(self.time_of(ev, &row).map_err(|e| fail(ev, e))?);
            }
            let (pkey, row) = self.reshaped(ev, op, pkey, row).map_err(|e| fail(ev, e))?;
            decoded.push((ev, op, pkey, row));
        }
        if let Err(bad) = self.placement.learn(times.iter().flatten().map(|t| t.as_ref())) {
            let i = times.iter().position(|t| t.as_deref() == Some(bad.text.as_str())).unwrap_or_default();
            let ev = decoded[i].0;
            let what = match self.part_field_of(ev) {
                Ok(Some(column)) => format!("part_field column {column:?}"),
                _ => "ev_time".to_string(),
            };
            return Err(fail(ev, EventError::NotATime { what, value: bad.text, cause: bad.cause }));
        }
        let mut changes = Vec::with_capacity(decoded.len());
        for (i, (ev, op, pkey, mut row)) in decoded.into_iter().enumerate() {
            let time = times.get(i).and_then(|t| t.as_deref());
            let Some(dest) = self.destination(ev, &pkey, time)? else {
                self.skipped.old += 1;
                continue;
            };
            if let (Some(key), false) = (&self.partitions[dest].fill_key, op == Op::Truncate) {
                let time = batch_time.or(ev.ev_time.as_deref());
                let time = time.ok_or_else(|| fail(ev, EventError::NoKeyTime(key.clone())))?;
                fill(&mut row, key, time);
            }
            changes.push(Change { ev_id: ev.ev_id, op, dest, pkey, row });
        }
        Ok(changes)
    }

    /// The suffix an event was given, if it got that far (dead letters keep it for the replay).
    pub fn suffix_of(&mut self, ev: &RawEvent) -> Option<String> {
        let (op, _, format) = self.event_type(ev).ok()?;
        let row = self.row_of(ev, op, format).ok()?;
        let time = self.time_of(ev, &row).ok()?;
        self.placement.suffix(time.as_deref()).map(str::to_string)
    }

    /// Writes one event in a subtransaction of its own, so that a failure rolls back that event
    /// only; the error then names the event, whether we returned it or PostgreSQL raised it.
    pub fn apply_isolated(&mut self, ev: &RawEvent) -> Result<(), ApplyError> {
        let created = self.created.len();
        let Err(e) = in_subtransaction(|| self.apply(std::slice::from_ref(ev))) else { return Ok(()) };
        // partitions the subtransaction created are gone with it: look everything up again
        self.forget_partitions();
        self.created.truncate(created);
        Err(match e {
            SubError::Returned(e) => e,
            SubError::Raised(cause) => ApplyError::Event {
                ev_id: ev.ev_id,
                table: ev.ev_extra1.as_deref().unwrap_or("(null)").to_string(),
                cause: EventError::Sql(cause),
            },
        })
    }

    /// Writes every chunk `chunks` hands out, set-based. In keep_all a COPY goes on across the
    /// chunks that continue its partition and columns, so a big batch is one COPY (one ring of
    /// shared buffers), not one a chunk; a chunk that does not continue it ends the COPY and is
    /// written next the ordinary way, which also reports its errors.
    pub fn write_bulk(&mut self, chunks: &mut impl Chunks) -> Result<Written, ApplyError> {
        let mut done = Written::default();
        // a chunk fetched while a COPY ran that did not continue it
        let mut stash: Option<Vec<RawEvent<'static>>> = None;
        loop {
            let open = match stash.take() {
                Some(chunk) => done.timed(|_| self.apply_leaving_copy_open(&chunk))?,
                None => match chunks.next_chunk(|chunk| {
                    done.events += chunk.len() as i64;
                    done.timed(|_| self.apply_leaving_copy_open(chunk))
                }) {
                    None => return Ok(done),
                    Some(open) => open?,
                },
            };
            if let Some(copy) = open {
                stash = self.continue_copy(copy, chunks, &mut done)?;
            }
        }
    }

    /// Runs `copy`, refilling its buffer from the next chunks while they continue it. Returns the
    /// chunk that ended it, if one did.
    fn continue_copy(
        &mut self,
        copy: OpenCopy,
        chunks: &mut impl Chunks,
        done: &mut Written,
    ) -> Result<Option<Vec<RawEvent<'static>>>, ApplyError> {
        let key = copy.key.clone();
        let mut stash = None;
        let copy_started = Instant::now();
        let mut fetching = Duration::ZERO;
        let mut more = |buf: &mut Vec<u8>| -> Option<i64> {
            let fetch_started = Instant::now();
            let mut writing = Duration::ZERO;
            let added = chunks.next_chunk(|chunk| {
                let write_started = Instant::now();
                done.events += chunk.len() as i64;
                let added = self.copy_text_continuing(&key, chunk, buf);
                if added.is_none() {
                    stash = Some(chunk.iter().map(RawEvent::to_owned_event).collect());
                }
                writing = write_started.elapsed();
                added
            });
            fetching += fetch_started.elapsed().saturating_sub(writing);
            added.flatten().map(|(_, last)| last)
        };
        copy.run(Some(&mut more))?;
        done.writing += copy_started.elapsed().saturating_sub(fetching);
        Ok(stash)
    }

    /// Writes every chunk one event at a time, to find the events that fail. `isolate`: each in
    /// a subtransaction of its own, and those that fail for their own reasons are set aside
    /// (returned in `parked`); otherwise the first failure ends the batch, naming its event.
    pub fn write_each(&mut self, chunks: &mut impl Chunks, isolate: bool) -> Result<Written, ApplyError> {
        let mut done = Written::default();
        loop {
            let wrote = chunks.next_chunk(|chunk| {
                done.events += chunk.len() as i64;
                done.timed(|done| {
                    for ev in chunk {
                        if !isolate {
                            self.apply(std::slice::from_ref(ev))?;
                            continue;
                        }
                        match self.apply_isolated(ev) {
                            Err(e) if !e.is_transient() => done.parked.push((ev.to_owned_event(), e)),
                            r => r?,
                        }
                    }
                    Ok(())
                })
            });
            match wrote {
                None => return Ok(done),
                Some(r) => r?,
            }
        }
    }

    /// Applies a run of events in order. Callers pass the batch in chunks; chunks are applied one
    /// after the other, so the result equals applying every event in ev_id order.
    pub fn apply(&mut self, events: &[RawEvent]) -> Result<(), ApplyError> {
        crate::roles::as_role(self.role, || self.apply_as_owner(events, false)).map(|_| ())
    }

    /// Like apply, except that in keep_all a chunk that goes to one partition with one column
    /// set is not copied yet: its COPY is returned for `run_copy`, which later chunks of the same
    /// table can join (`continue_copy`).
    fn apply_leaving_copy_open(&mut self, events: &[RawEvent]) -> Result<Option<OpenCopy>, ApplyError> {
        crate::roles::as_role(self.role, || self.apply_as_owner(events, self.job.mode.may_continue_copy()))
    }

    fn apply_as_owner(&mut self, events: &[RawEvent], leave_open: bool) -> Result<Option<OpenCopy>, ApplyError> {
        let batch_time = self.placement.batch_time().map(str::to_string);
        let changes = self.changes(events, batch_time.as_deref())?;
        if changes.iter().any(|c| c.op == Op::Truncate) {
            // a truncate is a barrier: what came before it is written, then emptied
            for run in changes.split_inclusive(|c| c.op == Op::Truncate) {
                match run.split_last() {
                    Some((t, before)) if t.op == Op::Truncate => {
                        self.write_planned(before, false)?;
                        self.empty(t)?;
                    }
                    _ => {
                        self.write_planned(run, false)?;
                    }
                }
            }
            return Ok(None);
        }
        // the raw table name is what later chunks are compared with
        let table = events.first().and_then(|e| e.ev_extra1.as_deref()).unwrap_or_default();
        let leave_open = leave_open && events.iter().all(|e| e.ev_extra1.as_deref() == Some(table));
        Ok(self.write_planned(&changes, leave_open)?.map(|mut o| {
            o.key.table = table.to_string();
            o
        }))
    }

    /// Writes a run of changes set-based: keep_latest's deletes, then the inserts.
    fn write_planned(&mut self, changes: &[Change], leave_open: bool) -> Result<Option<OpenCopy>, ApplyError> {
        let plan = plan::plan(changes, self.job.mode);
        for d in &plan.deletes {
            self.delete(d)?;
        }
        let leave_open = leave_open && plan.deletes.is_empty() && plan.inserts.len() == 1;
        let mut open = None;
        for g in &plan.inserts {
            open = self.insert(g, changes, leave_open)?;
        }
        Ok(open)
    }

    /// A truncate in keep_latest: the partition it is placed in no longer holds any row of the
    /// table's latest versions. DELETE, not TRUNCATE: it needs only the privilege keep_latest
    /// needs anyway, takes no ACCESS EXCLUSIVE lock, and is undone with the batch.
    fn empty(&self, t: &Change) -> Result<(), ApplyError> {
        let part = &self.partitions[t.dest];
        run_sql(&format!("DELETE FROM {}", part.qualified), &[])
            .map_err(|cause| self.statement_error(t.ev_id, t.ev_id, part, cause))?;
        pgrx::log!("cube_dispatcher {}: event {} (TRUNCATE) emptied {}", self.job.job_name, t.ev_id, part.qualified);
        Ok(())
    }

    /// Writes the COPY text of `events` into `out` when every one of them continues `open`: same
    /// table as sent by the trigger, same columns, valid. Returns their first and last ev_id.
    /// Anything else (another table, other columns, a bad event) returns None and writes
    /// nothing: the chunk then goes the ordinary way, which also reports its errors.
    fn copy_text_continuing(&mut self, open: &CopyKey, events: &[RawEvent], out: &mut Vec<u8>) -> Option<(i64, i64)> {
        if events.is_empty() || events.iter().any(|e| e.ev_extra1.as_deref() != Some(open.table.as_str())) {
            return None;
        }
        let skipped_before = self.skipped;
        let batch_time = self.placement.batch_time().map(str::to_string);
        let Ok(changes) = self.changes(events, batch_time.as_deref()) else {
            self.skipped = skipped_before;
            return None;
        };
        let same = |ch: &Change| {
            ch.dest == open.dest
                && ch.row.len() == open.columns.len()
                && ch.row.iter().zip(&open.columns).all(|((c, _), o)| c == o)
        };
        if !changes.iter().all(same) {
            // the chunk goes the ordinary way, and is counted there
            self.skipped = skipped_before;
            return None;
        }
        push_rows(out, changes.iter().map(|c| &c.row));
        Some((events[0].ev_id, events[events.len() - 1].ev_id))
    }

    /// The first column (in event order) that the partition lacks, named in the error.
    fn check_columns<'c>(
        &self,
        dest: usize,
        ev_id: i64,
        columns: impl Iterator<Item = &'c str>,
    ) -> Result<(), ApplyError> {
        let part = &self.partitions[dest];
        for c in columns {
            if !part.columns.contains_key(c) {
                return Err(ApplyError::Event {
                    ev_id,
                    table: part.qualified.clone(),
                    cause: EventError::NoSuchColumn { column: c.to_string(), table: part.qualified.clone() },
                });
            }
        }
        Ok(())
    }

    /// Finds the partition, creating it when missing. Under a native partitioned parent, the
    /// partition is whichever leaf covers the period, whoever made it.
    fn open_partition(
        &mut self,
        dest: &TableName,
        parent: &TableName,
        pkey: &[String],
        suffix: Option<&str>,
        field: Option<&str>,
        source: &TableName,
    ) -> Result<Partition, EventError> {
        let parent_q = route::qualified(parent, &quote_ident);
        let native = match relid(&parent_q)? {
            Some(oid) => self.native_parent(oid, parent, field)?.map(|key| (oid, key)),
            None => None,
        };
        let new = NewPartition { dest, parent, pkey, suffix, period: self.period_of(suffix), native, field };
        let qualified = match new.covering()? {
            Some(leaf) => leaf,
            None if relid(&route::qualified(dest, &quote_ident))?.is_some() => route::qualified(dest, &quote_ident),
            None => self.create_partition(&new)?,
        };
        let mut partition = describe(qualified, parent_q, source.clone())?;
        partition.native_leaf = new.native.is_some();
        if self.job.part_mode != PartMode::DateField {
            partition.fill_key = new.native.map(|(_, key)| key.column);
        }
        Ok(partition)
    }

    /// Creates a partition from the template, between pre_part and post_part, as the job's role.
    /// Two jobs may need the same new partition at once: the creation runs under a
    /// transaction-level advisory lock on the name and re-checks, so the second waits for the
    /// first to commit and then finds the table. Returns the partition's name.
    fn create_partition(&mut self, new: &NewPartition) -> Result<String, EventError> {
        let mut qualified = route::qualified(new.dest, &quote_ident);
        let template = match (&self.job.part_template, &new.native) {
            (Some(t), _) if t.trim().is_empty() => return Err(EventError::NoPartition(qualified)),
            (Some(t), _) => t.as_str(),
            (None, Some(_)) => self.job.mode.default_native_template(),
            (None, None) => self.job.mode.default_template(),
        };
        run_sql(
            "SELECT pg_advisory_xact_lock(hashtextextended('cube_dispatcher partition ' || $1, 0))",
            &[qualified.as_str().into()],
        )
        .map_err(EventError::Sql)?;
        if let Some(leaf) = new.covering()? {
            qualified = leaf;
        }
        if relid(&qualified)?.is_some() {
            return Ok(qualified);
        }
        let parent_q = route::qualified(new.parent, &quote_ident);
        if relid(&parent_q)?.is_none() {
            return Err(EventError::NoParent(parent_q));
        }
        let words = new.words()?;
        // each in a nest of its own: whatever one SETs ends with it (see roles::as_role)
        let steps = [
            ("pre_part", self.job.pre_part.as_deref()),
            ("part_template", Some(template)),
            ("post_part", self.job.post_part.as_deref()),
        ];
        for (step, sql) in steps {
            let Some(sql) = sql else { continue };
            let sql = route::render_template(sql, new.dest, new.parent, new.pkey, &quote_ident, &words);
            crate::roles::as_role(self.role, || run_sql(&sql, &[])).map_err(|cause| EventError::Template {
                step,
                table: qualified.clone(),
                cause,
            })?;
        }
        self.created.push(Created {
            parent: parent_q,
            partition: qualified.clone(),
            suffix: new.suffix.unwrap_or_default().to_string(),
            period: new.period.clone(),
        });
        Ok(qualified)
    }

    fn cast(&self, dest: usize, column: &str, value: &str) -> String {
        match &self.partitions[dest].columns[column] {
            Some(ty) => format!("{value}::{ty}"),
            None => value.to_string(),
        }
    }

    fn insert(
        &mut self,
        g: &InsertGroup,
        changes: &[Change],
        leave_open: bool,
    ) -> Result<Option<OpenCopy>, ApplyError> {
        let head = &changes[g.rows[0]];
        if let Some(keep) = self.fit_columns(g.dest, head, g.rows.len())? {
            // new_columns = ignore: the group without the columns the partition lacks
            let trimmed = new_columns::keep_only(changes, &g.rows, &keep);
            let group = InsertGroup { dest: g.dest, rows: (0..trimmed.len()).collect() };
            return self.insert(&group, &trimmed, false);
        }
        let part = &self.partitions[g.dest];
        let columns: Vec<&str> = head.row.iter().map(|(c, _)| c.as_ref()).collect();
        let (first, last) = (head.ev_id, changes[*g.rows.last().unwrap()].ev_id);
        let fail = |cause| self.statement_error(first, last, part, cause);
        let n = columns.len();
        if n == 0 {
            // events without columns: a row of defaults each
            let sql = format!("INSERT INTO {} SELECT FROM generate_series(1, $1)", part.qualified);
            return run_sql(&sql, &[(g.rows.len() as i64).into()]).map(|_| None).map_err(fail);
        }
        if part.copy_ok {
            let mut buf = Vec::with_capacity(g.rows.len() * 32 * n);
            push_rows(&mut buf, g.rows.iter().map(|&i| &changes[i].row));
            let open = OpenCopy {
                key: CopyKey {
                    table: String::new(),
                    dest: g.dest,
                    columns: columns.iter().map(|c| c.to_string()).collect(),
                },
                role: self.role,
                relid: part.relid,
                qualified: part.qualified.clone(),
                buf,
                first_ev_id: first,
                last_ev_id: last,
            };
            if leave_open {
                return Ok(Some(open));
            }
            return open.run(None).map(|_| None);
        }
        // INSERT checks privileges and row security itself, and says why it refuses
        let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let exprs: Vec<String> = (0..n).map(|i| self.cast(g.dest, columns[i], &format!("u.c{i}"))).collect();
        let sql = format!(
            "INSERT INTO {} ({}) SELECT {} FROM {}",
            part.qualified,
            cols.join(", "),
            exprs.join(", "),
            unnest_from("u", n)
        );
        let rows =
            g.rows.iter().map(|&i| changes[i].row.iter().map(|(_, v)| v.map(|e| e.decoded())).collect::<Vec<_>>());
        run_sql(&sql, &column_arrays(n, rows)).map(|_| None).map_err(fail)
    }

    fn delete(&self, d: &DeleteGroup) -> Result<(), ApplyError> {
        self.check_columns(d.dest, d.ev_ids[0], d.key_columns.iter().map(String::as_str))?;
        let part = &self.partitions[d.dest];
        let (first, last) = (*d.ev_ids.iter().min().unwrap(), *d.ev_ids.iter().max().unwrap());
        let fail = |cause| self.statement_error(first, last, part, cause);
        // A partition being filled by this very batch has no statistics yet, so the planner takes
        // it for small and would scan or hash all of it for every chunk's delete: quadratic. When
        // an index leads with the key, probing it per key is always right; pin that plan.
        let pinned = if part.key_indexed(&d.key_columns[0]) { "off" } else { "on" };
        run_sql(
            "SELECT set_config('enable_seqscan', $1, true), set_config('enable_hashjoin', $1, true),
                    set_config('enable_mergejoin', $1, true)",
            &[pinned.into()],
        )
        .map_err(fail)?;
        let n = d.key_columns.len();
        let keys = d.keys.iter().map(|k| k.to_vec());
        let sql = if n == 1 {
            // one key column: a single index scan over all the keys, no join per key
            let column = &d.key_columns[0];
            let keys = match &part.columns[column.as_str()] {
                Some(ty) => format!("$1::text[]::{ty}[]"),
                None => "$1::text[]".to_string(),
            };
            format!("DELETE FROM {} t WHERE t.{} = ANY ({keys})", part.qualified, quote_ident(column))
        } else {
            let conds: Vec<String> = (0..n)
                .map(|i| {
                    format!(
                        "t.{} = {}",
                        quote_ident(&d.key_columns[i]),
                        self.cast(d.dest, &d.key_columns[i], &format!("k.c{i}"))
                    )
                })
                .collect();
            format!("DELETE FROM {} t USING {} WHERE {}", part.qualified, unnest_from("k", n), conds.join(" AND "))
        };
        run_sql(&sql, &column_arrays(n, keys)).map_err(fail)
    }

    fn statement_error(&self, first: i64, last: i64, part: &Partition, cause: SqlError) -> ApplyError {
        statement_error(first, last, &part.qualified, cause)
    }
}

/// A failed statement over events first..=last: about one event when it covered only one.
fn statement_error(first: i64, last: i64, table: &str, cause: SqlError) -> ApplyError {
    if first == last {
        ApplyError::Event { ev_id: first, table: table.to_string(), cause: EventError::Sql(cause) }
    } else {
        ApplyError::Statement { first_ev_id: first, last_ev_id: last, table: table.to_string(), cause }
    }
}

/// What writing a batch's chunks did.
#[derive(Default)]
pub struct Written {
    /// events read from the source
    pub events: i64,
    /// time spent decoding and writing, not waiting for the source
    pub writing: Duration,
    /// events set aside, with the reason (isolating pace only)
    pub parked: Vec<(RawEvent<'static>, ApplyError)>,
}

impl Written {
    fn timed<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let started = Instant::now();
        let r = f(self);
        self.writing += started.elapsed();
        r
    }
}

/// What rows must share to join an open COPY.
#[derive(Debug, Clone)]
struct CopyKey {
    /// ev_extra1 as the trigger sent it
    table: String,
    dest: usize,
    columns: Vec<String>,
}

/// A COPY into one partition, built but not run yet: later chunks of the batch may join it.
struct OpenCopy {
    key: CopyKey,
    role: pg_sys::Oid,
    relid: pg_sys::Oid,
    qualified: String,
    buf: Vec<u8>,
    first_ev_id: i64,
    last_ev_id: i64,
}

/// Refills an open COPY's buffer; says the last ev_id it added, or None to end the COPY.
type MoreRows<'m> = dyn FnMut(&mut Vec<u8>) -> Option<i64> + 'm;

impl OpenCopy {
    /// Runs the COPY; `more` refills its buffer with the next rows and says the last ev_id it
    /// added, or None when the COPY is to end.
    fn run(self, mut more: Option<&mut MoreRows>) -> Result<(), ApplyError> {
        let columns: Vec<&str> = self.key.columns.iter().map(String::as_str).collect();
        let mut last = self.last_ev_id;
        let mut refill = |buf: &mut Vec<u8>| match more.as_mut().and_then(|m| m(buf)) {
            Some(ev_id) => {
                last = ev_id;
                true
            }
            None => false,
        };
        let copied = crate::roles::as_role(self.role, || {
            catching(|| Ok(crate::copy_in::copy_rows(self.relid, &columns, self.buf, Some(&mut refill))))
        });
        copied.map(|_| ()).map_err(|cause| statement_error(self.first_ev_id, last, &self.qualified, cause))
    }
}

/// Appends each row as a line of COPY text.
fn push_rows<'r, 'v: 'r>(buf: &mut Vec<u8>, rows: impl Iterator<Item = &'r crate::decode::Row<'v>>) {
    for row in rows {
        for (col, (_, v)) in row.iter().enumerate() {
            if col > 0 {
                buf.push(b'\t');
            }
            crate::copy_in::push_value(buf, *v);
        }
        buf.push(b'\n');
    }
}

/// `unnest($1::text[], .., $n::text[]) AS alias(c0, .., c{n-1})`: n parallel arrays as rows.
fn unnest_from(alias: &str, n: usize) -> String {
    let arrays: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    format!("unnest({}) AS {alias}({})", arrays.join(", "), names.join(", "))
}

/// Rows of n values turned into n text[] parameters, one per column.
fn column_arrays<'a, 'v>(n: usize, rows: impl Iterator<Item = Vec<Option<Cow<'v, str>>>>) -> Vec<DatumWithOid<'a>> {
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::new(); n];
    for row in rows {
        for (i, v) in row.into_iter().enumerate() {
            columns[i].push(v.map(Cow::into_owned));
        }
    }
    columns.into_iter().map(DatumWithOid::from).collect()
}
