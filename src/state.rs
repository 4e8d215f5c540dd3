//! The extension's own tables: job definitions (written by the SQL API) and job state (written by
//! the worker). The batch bookkeeping that makes a batch apply exactly once lives here too.

use crate::config::{JobConfig, LogLevel, OnError, TableList};
use crate::event::RawEvent;
use crate::mode::Mode;
use crate::source::BatchInfo;
use pgrx::prelude::*;
use thiserror::Error;

/// A stored job definition.
pub struct JobRow {
    pub config: JobConfig,
    pub enabled: bool,
    pub run_as: pg_sys::Oid,
    pub config_version: i64,
}

/// A stored definition that does not read back. The job must not run on a guess: a `tables`
/// list taken for "no list" would allow every table.
#[derive(Debug, Error)]
#[error("the stored definition of job {job} is unreadable: {column} = {value:?}; call cube_dispatcher.start('{job}') to store valid settings")]
pub struct Unreadable {
    pub job: String,
    pub column: &'static str,
    pub value: String,
}

/// The role that owns the job (started it), if the job exists.
pub fn job_owner(job: &str) -> Option<pg_sys::Oid> {
    crate::spi::value("SELECT run_as FROM cube_dispatcher.job WHERE job_name = $1", &[job.into()])
}

/// A job row as stored, before its words are parsed.
struct StoredJob {
    src_db: String,
    queue: String,
    consumer: String,
    mode: String,
    dateformat: String,
    part_template: Option<String>,
    loop_delay: Option<f64>,
    connection_lifetime: Option<f64>,
    lock_timeout: Option<f64>,
    log_level: String,
    on_error: String,
    tables: Option<String>,
    enabled: bool,
    run_as: pg_sys::Oid,
    config_version: i64,
}

impl StoredJob {
    fn parse(self, job: &str) -> Result<JobRow, Unreadable> {
        let unreadable = |column, value: &str| Unreadable { job: job.to_string(), column, value: value.to_string() };
        // a stored value that does not read back is an error, never a default
        fn word<T>(
            value: &str,
            parse: fn(&str) -> Option<T>,
            fail: impl FnOnce() -> Unreadable,
        ) -> Result<T, Unreadable> {
            parse(value).ok_or_else(fail)
        }
        let seconds = |column, v: Option<f64>| v.ok_or_else(|| unreadable(column, "NULL"));
        let tables = match &self.tables {
            None => None,
            Some(t) => Some(word(t, TableList::parse, || unreadable("tables", t))?),
        };
        Ok(JobRow {
            config: JobConfig {
                job_name: job.to_string(),
                src_db: self.src_db,
                pgq_queue_name: self.queue,
                pgq_consumer_id: self.consumer,
                mode: word(&self.mode, Mode::parse, || unreadable("mode", &self.mode))?,
                dateformat: (!self.dateformat.is_empty()).then_some(self.dateformat),
                part_template: self.part_template,
                loop_delay: seconds("loop_delay", self.loop_delay)?,
                connection_lifetime: seconds("connection_lifetime", self.connection_lifetime)?,
                log_level: word(&self.log_level, LogLevel::parse, || unreadable("log_level", &self.log_level))?,
                on_error: word(&self.on_error, OnError::parse, || unreadable("on_error", &self.on_error))?,
                tables,
                lock_timeout: seconds("lock_timeout", self.lock_timeout)?,
            },
            enabled: self.enabled,
            run_as: self.run_as,
            config_version: self.config_version,
        })
    }
}

pub fn load_job(job: &str) -> Result<Option<JobRow>, Unreadable> {
    let stored = Spi::connect(|c| {
        let rows = c.select(
            "SELECT src_db, pgq_queue_name, pgq_consumer_id, mode, dateformat, part_template,
                    loop_delay, connection_lifetime, log_level, enabled, run_as, config_version, on_error, tables, lock_timeout
               FROM cube_dispatcher.job WHERE job_name = $1",
            Some(1),
            &[job.into()],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        let r = rows.first();
        let text = |i| r.get::<String>(i).map(Option::unwrap_or_default);
        Ok::<_, pgrx::spi::Error>(Some(StoredJob {
            src_db: text(1)?,
            queue: text(2)?,
            consumer: text(3)?,
            mode: text(4)?,
            dateformat: text(5)?,
            part_template: r.get(6)?,
            loop_delay: r.get(7)?,
            connection_lifetime: r.get(8)?,
            log_level: text(9)?,
            enabled: r.get(10)?.unwrap_or(false),
            run_as: r.get(11)?.unwrap_or(pg_sys::InvalidOid),
            config_version: r.get(12)?.unwrap_or(0),
            on_error: text(13)?,
            tables: r.get(14)?,
            lock_timeout: r.get(15)?,
        }))
    })
    .unwrap_or_else(|e| crate::spi::fail(e));
    stored.map(|s| s.parse(job)).transpose()
}

pub fn config_version(job: &str) -> Option<i64> {
    crate::spi::value("SELECT config_version FROM cube_dispatcher.job WHERE job_name = $1", &[job.into()])
}

/// Stores a validated definition. The position (last tick) is kept across restarts of the same
/// consumer and forgotten when the queue or consumer changes, since it would not match.
pub fn save_job(c: &JobConfig, run_as: pg_sys::Oid) {
    crate::spi::run(
        "WITH old AS (SELECT pgq_queue_name, pgq_consumer_id FROM cube_dispatcher.job WHERE job_name = $1),
              upsert AS (
                INSERT INTO cube_dispatcher.job AS j (job_name, src_db, pgq_queue_name, pgq_consumer_id, mode,
                       dateformat, part_template, loop_delay, connection_lifetime, log_level, run_as, on_error, tables, lock_timeout, enabled)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, true)
                ON CONFLICT (job_name) DO UPDATE SET
                       src_db = excluded.src_db, pgq_queue_name = excluded.pgq_queue_name,
                       pgq_consumer_id = excluded.pgq_consumer_id, mode = excluded.mode,
                       dateformat = excluded.dateformat, part_template = excluded.part_template,
                       loop_delay = excluded.loop_delay, connection_lifetime = excluded.connection_lifetime,
                       log_level = excluded.log_level, run_as = excluded.run_as, on_error = excluded.on_error, tables = excluded.tables, lock_timeout = excluded.lock_timeout, enabled = true,
                       config_version = j.config_version + 1, defined_at = now()
                RETURNING 1)
         INSERT INTO cube_dispatcher.job_state AS s (job_name) SELECT $1 FROM upsert
         ON CONFLICT (job_name) DO UPDATE SET last_tick_id = CASE WHEN EXISTS (
                SELECT 1 FROM old WHERE (old.pgq_queue_name, old.pgq_consumer_id) = ($3, $4))
              THEN s.last_tick_id END",
        &[
            c.job_name.as_str().into(),
            c.src_db.as_str().into(),
            c.pgq_queue_name.as_str().into(),
            c.pgq_consumer_id.as_str().into(),
            c.mode.as_str().into(),
            c.dateformat.clone().unwrap_or_default().into(),
            c.part_template.clone().into(),
            c.loop_delay.into(),
            c.connection_lifetime.into(),
            c.log_level.as_str().into(),
            run_as.into(),
            c.on_error.as_str().into(),
            c.tables.as_ref().map(|t| t.text.clone()).into(),
            c.lock_timeout.into(),
        ],
    )
}

pub fn set_enabled(job: &str, enabled: bool) {
    crate::spi::run("UPDATE cube_dispatcher.job SET enabled = $2 WHERE job_name = $1", &[job.into(), enabled.into()])
}

/// The last tick whose batch was written here, read under a row lock so two workers of one job
/// (which start() prevents) could still never apply one batch twice.
pub fn last_tick(job: &str) -> Option<i64> {
    crate::spi::value(
        "SELECT last_tick_id FROM cube_dispatcher.job_state WHERE job_name = $1 FOR UPDATE",
        &[job.into()],
    )
}

/// Runs in the batch's own transaction: the batch is done exactly when its rows are committed.
pub fn record_batch(job: &str, info: &BatchInfo, events: i64, recent_eps: f64) {
    crate::spi::run(
        "UPDATE cube_dispatcher.job_state SET last_tick_id = $2, last_batch_id = $3, last_batch_end = $4::timestamptz,
                batches_done = batches_done + 1, events_done = events_done + $5, lag = $6::interval,
                recent_eps = $7, state = 'running', last_batch_at = clock_timestamp(), updated_at = now()
          WHERE job_name = $1",
        &[
            job.into(),
            info.tick_id.into(),
            info.batch_id.into(),
            info.batch_end.as_str().into(),
            events.into(),
            info.lag.clone().into(),
            recent_eps.into(),
        ],
    )
}

pub fn record_lag(job: &str, lag: Option<String>) {
    crate::spi::run(
        "UPDATE cube_dispatcher.job_state SET lag = $2::interval, updated_at = now() WHERE job_name = $1",
        &[job.into(), lag.into()],
    )
}

/// The worker announces itself. When start() has not committed yet, this waits on its row.
pub fn worker_started(job: &str, pid: i32) {
    crate::spi::run(
        "INSERT INTO cube_dispatcher.job_state AS s (job_name, state, pid, started_at, updated_at)
         VALUES ($1, 'running', $2, now(), now())
         ON CONFLICT (job_name) DO UPDATE SET state = 'running', pid = $2, started_at = now(), updated_at = now()",
        &[job.into(), pid.into()],
    )
}

pub fn set_error(job: &str, error: &str) {
    crate::spi::run(
        "UPDATE cube_dispatcher.job_state SET state = 'retrying', last_error = $2, last_error_at = now(), updated_at = now()
          WHERE job_name = $1",
        &[job.into(), error.into()],
    )
}

/// Marks the job stopped, but only if `pid` (the worker that stops) is still the one recorded.
pub fn set_stopped(job: &str, pid: Option<i32>) {
    crate::spi::run(
        "UPDATE cube_dispatcher.job_state SET state = 'stopped', pid = NULL, updated_at = now()
          WHERE job_name = $1 AND ($2::int IS NULL OR pid = $2)",
        &[job.into(), pid.into()],
    )
}

/// The pid of the job's worker if that process is alive and is our worker for this job in this
/// database (a recorded pid may be stale after a crash).
pub fn live_pid(job: &str) -> Option<i32> {
    crate::spi::value(
        "SELECT s.pid FROM cube_dispatcher.job_state s
          WHERE s.job_name = $1 AND s.pid IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_stat_get_activity(s.pid) a
                         WHERE a.backend_type = 'cube_dispatcher ' || $1 AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        &[job.into()],
    )
}

/// Parks an event that cannot be written, in the batch's transaction.
pub fn dead_letter(job: &str, batch_id: i64, suffix: Option<&str>, ev: &RawEvent, error: &str) {
    crate::spi::run(
        "INSERT INTO cube_dispatcher.dead_letter (job_name, batch_id, suffix, ev_id, ev_time, ev_type, ev_data, ev_extra1, error)
         VALUES ($1, $2, $3, $4, $5::timestamptz, $6, $7, $8, $9)",
        &[
            job.into(),
            batch_id.into(),
            suffix.into(),
            ev.ev_id.into(),
            ev.ev_time.as_deref().into(),
            ev.ev_type.as_deref().into(),
            ev.ev_data.as_deref().into(),
            ev.ev_extra1.as_deref().into(),
            error.into(),
        ],
    )
}
