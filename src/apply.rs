//! Writes a batch into the target: decodes and routes each event, creates missing partitions from
//! the template (under a lock, re-checked), then performs the set-based plan. The hot path builds
//! one statement per table and column set per chunk, never one per event.

use crate::config::JobConfig;
use crate::decode::{self, DecodeError, Op, TableName};
use crate::plan::{self, Change, DeleteGroup, InsertGroup};
use crate::route::{self, Mode, RouteError};
use crate::source::RawEvent;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::panic::AssertUnwindSafe;
use thiserror::Error;

/// What was wrong with one event (or, for a set-based statement, a run of events).
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("event {ev_id}, table {table}: {cause}")]
    Event { ev_id: i64, table: String, cause: EventError },
    #[error("events {first_ev_id}..{last_ev_id}, table {table}: {cause}")]
    Statement { first_ev_id: i64, last_ev_id: i64, table: String, cause: String },
}

#[derive(Debug, Error)]
pub enum EventError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("delete not supported in keep_all mode")]
    DeleteInKeepAll,
    #[error("keep_latest needs primary key columns, but ev_type lists none")]
    NoPrimaryKey,
    #[error("primary key column {0:?} is missing from ev_data")]
    KeyColumnMissing(String),
    #[error("column {column:?} does not exist in {table}")]
    NoSuchColumn { column: String, table: String },
    #[error("partition {0} does not exist and part_template is empty")]
    NoPartition(String),
    #[error("parent table {0} does not exist")]
    NoParent(String),
    #[error("creating partition {table} failed: {cause}")]
    Template { table: String, cause: String },
    #[error("{0}")]
    Sql(String),
}

/// PostgreSQL's own quote_identifier(): quotes only where needed, knows the keyword list.
pub fn quote_ident(name: &str) -> String {
    // decode refuses NUL, and names from the catalog cannot hold one
    let c = CString::new(name).expect("identifier without NUL");
    unsafe { CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }.to_string_lossy().into_owned()
}

struct Partition {
    qualified: String,
    /// column name -> type to cast the text value to (None: a string type, no cast needed)
    columns: HashMap<String, Option<String>>,
}

/// One batch being applied. Partition lookups are cached for the batch (a batch has one suffix).
pub struct BatchWriter<'a> {
    job: &'a JobConfig,
    suffix: Option<String>,
    partitions: HashMap<TableName, Partition>,
    pub created: Vec<String>,
}

/// Runs one SQL statement; a PostgreSQL error becomes an Err so the caller can say which events
/// and table it was about. The transaction is aborted by the caller right after.
fn run_sql(sql: &str, args: &[DatumWithOid]) -> Result<(), String> {
    PgTryBuilder::new(AssertUnwindSafe(|| Spi::run_with_args(sql, args).map_err(|e| e.to_string())))
        .catch_others(|e| Err(caught_message(&e)))
        .execute()
}

pub fn caught_message(e: &pg_sys::panic::CaughtError) -> String {
    use pg_sys::panic::CaughtError::*;
    match e {
        PostgresError(r) | ErrorReport(r) | RustPanic { ereport: r, .. } => {
            let mut m = r.message().to_string();
            if let Some(d) = r.detail() {
                m.push_str(&format!(" ({d})"));
            }
            m
        }
    }
}

impl<'a> BatchWriter<'a> {
    pub fn new(job: &'a JobConfig, suffix: Option<String>) -> Self {
        BatchWriter { job, suffix, partitions: HashMap::new(), created: Vec::new() }
    }

    /// Decodes, checks and routes one event. Every failure names the event and its table.
    fn change(&self, ev: &RawEvent) -> Result<(Change, TableName), ApplyError> {
        let raw_table = ev.ev_extra1.clone().unwrap_or_else(|| "(null)".into());
        let fail = |cause: EventError| ApplyError::Event { ev_id: ev.ev_id, table: raw_table.clone(), cause };
        let parent = decode::parse_table(ev.ev_extra1.as_deref()).map_err(|e| fail(e.into()))?;
        let ty = decode::parse_ev_type(ev.ev_type.as_deref().unwrap_or("")).map_err(|e| fail(e.into()))?;
        let row = decode::parse_row(ev.ev_data.as_deref()).map_err(|e| fail(e.into()))?;
        match self.job.mode {
            Mode::KeepAll if ty.op == Op::Delete => return Err(fail(EventError::DeleteInKeepAll)),
            Mode::KeepLatest if ty.pkey.is_empty() => return Err(fail(EventError::NoPrimaryKey)),
            _ => {}
        }
        if let Some(k) = ty.pkey.iter().find(|k| !row.iter().any(|(c, _)| c == *k)) {
            if self.job.mode == Mode::KeepLatest {
                return Err(fail(EventError::KeyColumnMissing(k.clone())));
            }
        }
        let dest = route::partition_of(&parent, self.suffix.as_deref()).map_err(|e| fail(e.into()))?;
        Ok((Change { ev_id: ev.ev_id, op: ty.op, dest, pkey: ty.pkey, row }, parent))
    }

    /// Applies a run of events in order. Callers pass the batch in chunks; chunks are applied one
    /// after the other, so the result equals applying every event in ev_id order.
    pub fn apply(&mut self, events: &[RawEvent]) -> Result<(), ApplyError> {
        let mut changes = Vec::with_capacity(events.len());
        for ev in events {
            let (ch, parent) = self.change(ev)?;
            if !self.partitions.contains_key(&ch.dest) {
                let p = self.open_partition(&ch, &parent).map_err(|cause| ApplyError::Event {
                    ev_id: ch.ev_id,
                    table: route::qualified(&parent, &quote_ident),
                    cause,
                })?;
                self.partitions.insert(ch.dest.clone(), p);
            }
            let part = &self.partitions[&ch.dest];
            if let Some((c, _)) = ch.row.iter().find(|(c, _)| !part.columns.contains_key(c)) {
                return Err(ApplyError::Event {
                    ev_id: ch.ev_id,
                    table: part.qualified.clone(),
                    cause: EventError::NoSuchColumn { column: c.clone(), table: part.qualified.clone() },
                });
            }
            changes.push(ch);
        }
        let plan = plan::plan(&changes, self.job.mode);
        for d in &plan.deletes {
            self.delete(d)?;
        }
        for g in &plan.inserts {
            self.insert(g, &changes)?;
        }
        Ok(())
    }

    /// Finds the partition, creating it from the template when missing. Two jobs may need the same
    /// new partition at once: the creation runs under a transaction-level advisory lock on the
    /// name and re-checks, so the second waits for the first to commit and then finds the table.
    fn open_partition(&mut self, ch: &Change, parent: &TableName) -> Result<Partition, EventError> {
        let qualified = route::qualified(&ch.dest, &quote_ident);
        let exists = |name: &str| -> Result<bool, EventError> {
            Spi::get_one_with_args::<bool>("SELECT to_regclass($1) IS NOT NULL", &[name.into()])
                .map(|b| b.unwrap_or(false))
                .map_err(|e| EventError::Sql(e.to_string()))
        };
        if !exists(&qualified)? {
            let template = match &self.job.part_template {
                Some(t) if t.trim().is_empty() => return Err(EventError::NoPartition(qualified)),
                Some(t) => t.as_str(),
                None => route::default_template(self.job.mode),
            };
            run_sql(
                "SELECT pg_advisory_xact_lock(hashtextextended('cube_dispatcher partition ' || $1, 0))",
                &[qualified.as_str().into()],
            )
            .map_err(EventError::Sql)?;
            if !exists(&qualified)? {
                let parent_q = route::qualified(parent, &quote_ident);
                if !exists(&parent_q)? {
                    return Err(EventError::NoParent(parent_q));
                }
                let ddl = route::render_template(template, &ch.dest, parent, &ch.pkey, &quote_ident);
                run_sql(&ddl, &[]).map_err(|cause| EventError::Template { table: qualified.clone(), cause })?;
                self.created.push(qualified.clone());
            }
        }
        // format_type without typmod: the cast goes to the base type and the column's own
        // typmod is then enforced by the INSERT (a too-long varchar errors instead of truncating).
        let columns = Spi::connect(|c| {
            let rows = c.select(
                "SELECT a.attname::text,
                        CASE WHEN t.typcategory = 'S' AND t.typtype <> 'd' THEN NULL
                             ELSE format_type(a.atttypid, NULL) END
                   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                  WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                None,
                &[qualified.as_str().into()],
            )?;
            let mut m = HashMap::new();
            for r in rows {
                m.insert(r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?);
            }
            Ok::<_, pgrx::spi::Error>(m)
        })
        .map_err(|e| EventError::Sql(e.to_string()))?;
        Ok(Partition { qualified, columns })
    }

    fn cast(&self, dest: &TableName, column: &str, value: &str) -> String {
        match &self.partitions[dest].columns[column] {
            Some(ty) => format!("{value}::{ty}"),
            None => value.to_string(),
        }
    }

    fn insert(&self, g: &InsertGroup, changes: &[Change]) -> Result<(), ApplyError> {
        let part = &self.partitions[&g.dest];
        let n = g.columns.len();
        let cols: Vec<String> = g.columns.iter().map(|c| quote_ident(c)).collect();
        let exprs: Vec<String> = (0..n).map(|i| self.cast(&g.dest, &g.columns[i], &format!("u.c{i}"))).collect();
        let arrays: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
        let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        let sql = format!(
            "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({})",
            part.qualified,
            cols.join(", "),
            exprs.join(", "),
            arrays.join(", "),
            aliases.join(", ")
        );
        let mut values: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(g.rows.len()); n];
        for &i in &g.rows {
            for (col, (_, v)) in changes[i].row.iter().enumerate() {
                values[col].push(v.clone());
            }
        }
        let (first, last) = (changes[g.rows[0]].ev_id, changes[*g.rows.last().unwrap()].ev_id);
        if n == 0 {
            // an event with no columns: a row of defaults for each
            let sql = format!("INSERT INTO {} SELECT FROM generate_series(1, $1)", part.qualified);
            return run_sql(&sql, &[(g.rows.len() as i64).into()])
                .map_err(|cause| self.statement_error(first, last, part, cause));
        }
        let args: Vec<DatumWithOid> = values.into_iter().map(DatumWithOid::from).collect();
        run_sql(&sql, &args).map_err(|cause| self.statement_error(first, last, part, cause))
    }

    fn delete(&self, d: &DeleteGroup) -> Result<(), ApplyError> {
        let part = &self.partitions[&d.dest];
        if let Some(k) = d.key_columns.iter().find(|k| !part.columns.contains_key(*k)) {
            return Err(ApplyError::Event {
                ev_id: d.ev_ids[0],
                table: part.qualified.clone(),
                cause: EventError::NoSuchColumn { column: k.clone(), table: part.qualified.clone() },
            });
        }
        let n = d.key_columns.len();
        let conds: Vec<String> = (0..n)
            .map(|i| format!("t.{} = {}", quote_ident(&d.key_columns[i]), self.cast(&d.dest, &d.key_columns[i], &format!("k.c{i}"))))
            .collect();
        let arrays: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
        let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        let sql = format!(
            "DELETE FROM {} t USING unnest({}) AS k({}) WHERE {}",
            part.qualified,
            arrays.join(", "),
            aliases.join(", "),
            conds.join(" AND ")
        );
        let mut values: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(d.keys.len()); n];
        for key in &d.keys {
            for (i, v) in key.iter().enumerate() {
                values[i].push(v.clone());
            }
        }
        let args: Vec<DatumWithOid> = values.into_iter().map(DatumWithOid::from).collect();
        let (first, last) = (*d.ev_ids.iter().min().unwrap(), *d.ev_ids.iter().max().unwrap());
        run_sql(&sql, &args).map_err(|cause| self.statement_error(first, last, part, cause))
    }

    fn statement_error(&self, first: i64, last: i64, part: &Partition, cause: String) -> ApplyError {
        if first == last {
            ApplyError::Event { ev_id: first, table: part.qualified.clone(), cause: EventError::Sql(cause) }
        } else {
            ApplyError::Statement { first_ev_id: first, last_ev_id: last, table: part.qualified.clone(), cause }
        }
    }
}
