//! The extension's own tables: job definitions (written by the SQL API) and job state (written by
//! the worker). The batch bookkeeping that makes a batch apply exactly once lives here too.

use crate::apply::Created;
use crate::config::{ConfigError, Context, JobConfig};
use crate::event::RawEvent;
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
#[error("the stored definition of job {job} is unreadable: {err}; call cube_dispatcher.start('{job}') to store valid settings")]
pub struct Unreadable {
    pub job: String,
    pub err: ConfigError,
}

/// The extension's objects in this database are of another version than the library: after the
/// library is replaced, until `ALTER EXTENSION cube_dispatcher UPDATE` runs.
#[derive(Debug, Error)]
#[error("the extension's objects in this database are version {installed}, the library is {}; run ALTER EXTENSION cube_dispatcher UPDATE", env!("CARGO_PKG_VERSION"))]
pub struct Outdated {
    pub installed: String,
}

/// Whether the extension's objects here are this library's version (they are what every
/// statement of this module is written against).
pub fn check_version() -> Result<(), Outdated> {
    let installed: Option<String> =
        crate::spi::value("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'cube_dispatcher'", &[]);
    match installed {
        Some(v) if v != env!("CARGO_PKG_VERSION") => Err(Outdated { installed: v }),
        _ => Ok(()),
    }
}

/// The role that owns the job (started it), if the job exists.
pub fn job_owner(job: &str) -> Option<pg_sys::Oid> {
    crate::spi::value("SELECT run_as FROM cube_dispatcher.job WHERE job_name = $1", &[job.into()])
}

/// Loads a job's definition; its options are validated as start() validated the settings.
pub fn load_job(job: &str) -> Result<Option<JobRow>, Unreadable> {
    let stored = Spi::connect(|c| {
        let rows = c.select(
            "SELECT options::text, enabled, run_as, config_version, current_database()::text
               FROM cube_dispatcher.job WHERE job_name = $1",
            Some(1),
            &[job.into()],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        let r = rows.first();
        Ok::<_, pgrx::spi::Error>(Some((
            r.get::<String>(1)?.unwrap_or_default(),
            r.get::<bool>(2)?.unwrap_or(false),
            r.get::<pg_sys::Oid>(3)?.unwrap_or(pg_sys::InvalidOid),
            r.get::<i64>(4)?.unwrap_or(0),
            r.get::<String>(5)?.unwrap_or_default(),
        )))
    })
    .unwrap_or_else(|e| crate::spi::fail(e));
    let Some((options, enabled, run_as, config_version, db)) = stored else { return Ok(None) };
    let config = JobConfig::from_json(&Context { job, current_db: &db }, &options)
        .map_err(|err| Unreadable { job: job.to_string(), err })?;
    Ok(Some(JobRow { config, enabled, run_as, config_version }))
}

pub fn config_version(job: &str) -> Option<i64> {
    crate::spi::value("SELECT config_version FROM cube_dispatcher.job WHERE job_name = $1", &[job.into()])
}

/// Stores a validated definition. The position (last tick) is kept across restarts of the same
/// consumer and forgotten when the queue or consumer changes, since it would not match.
pub fn save_job(c: &JobConfig, run_as: pg_sys::Oid) {
    crate::spi::run(
        "WITH old AS (SELECT options FROM cube_dispatcher.job WHERE job_name = $1),
              upsert AS (
                INSERT INTO cube_dispatcher.job AS j (job_name, options, run_as, enabled)
                VALUES ($1, $2::jsonb, $3, true)
                ON CONFLICT (job_name) DO UPDATE SET
                       options = excluded.options, run_as = excluded.run_as, enabled = true,
                       config_version = j.config_version + 1, defined_at = now()
                RETURNING 1)
         INSERT INTO cube_dispatcher.job_state AS s (job_name) SELECT $1 FROM upsert
         ON CONFLICT (job_name) DO UPDATE SET last_tick_id = CASE WHEN EXISTS (
                SELECT 1 FROM old WHERE (old.options->>'pgq_queue_name', old.options->>'pgq_consumer_id') = ($4, $5))
              THEN s.last_tick_id END",
        &[
            c.job_name.as_str().into(),
            c.to_json().into(),
            run_as.into(),
            c.pgq_queue_name.as_str().into(),
            c.pgq_consumer_id.as_str().into(),
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
pub fn record_batch(job: &str, info: &BatchInfo, events: i64, skipped: &crate::apply::Skipped, recent_eps: f64) {
    crate::spi::run(
        "UPDATE cube_dispatcher.job_state SET last_tick_id = $2, last_batch_id = $3, last_batch_end = $4::timestamptz,
                batches_done = batches_done + 1, events_done = events_done + $5, lag = $6::interval,
                recent_eps = $7, state = 'running', last_batch_at = clock_timestamp(), updated_at = now(),
                old_events_skipped = old_events_skipped + $8, events_skipped = events_skipped + $9,
                values_ignored = values_ignored + $10
          WHERE job_name = $1",
        &[
            job.into(),
            info.tick_id.into(),
            info.batch_id.into(),
            info.batch_end.as_str().into(),
            events.into(),
            info.lag.clone().into(),
            recent_eps.into(),
            skipped.old.into(),
            skipped.filtered.into(),
            skipped.values.into(),
        ],
    )
}

/// Adds a partition the job created to its list, with its period, in the transaction that
/// created it.
pub fn record_partition(job: &str, p: &Created) {
    let (start, period) = p.period.clone().unzip();
    crate::spi::run(
        "INSERT INTO cube_dispatcher.partition (job_name, parent, partition, suffix, period_start, period_end)
         VALUES ($1, $2, $3, $4, $5::timestamptz, $5::timestamptz + $6::interval)
         ON CONFLICT (job_name, partition) DO NOTHING",
        &[
            job.into(),
            p.parent.as_str().into(),
            p.partition.as_str().into(),
            p.suffix.as_str().into(),
            start.into(),
            period.into(),
        ],
    )
}

pub fn record_lag(job: &str, lag: Option<String>) {
    crate::spi::run(
        "UPDATE cube_dispatcher.job_state SET lag = $2::interval, updated_at = now() WHERE job_name = $1",
        &[job.into(), lag.into()],
    )
}

/// Taken by a starting worker before it announces itself, held to its commit: a stop() that
/// disabled the job first (an update of this row) has committed by then, and the worker reads
/// enabled = false; one that comes later waits for the worker's commit and finds its pid. Without
/// it a stop() right after start() could find no pid yet, and the worker, reading enabled before
/// that stop() committed, would run on unstopped (a second start() then started another).
pub fn lock_job(job: &str) {
    crate::spi::run("SELECT FROM cube_dispatcher.job WHERE job_name = $1 FOR SHARE", &[job.into()])
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

/// The pids of the job's receiving helpers in this database (one at most, but one that lost its
/// writer may linger until its current source call returns), as of now.
pub fn helper_pids(job: &str) -> Vec<i32> {
    // The activity a transaction reads is a snapshot taken at its first read: stop() and
    // kill() read it before their worker ended, and a helper gone since may have left its pid
    // to an unrelated process, which must not be signalled.
    crate::spi::run("SELECT pg_catalog.pg_stat_clear_snapshot()", &[]);
    Spi::connect(|c| {
        c.select(
            "SELECT pid FROM pg_catalog.pg_stat_get_activity(NULL)
              WHERE backend_type = $1 AND datid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())",
            None,
            &[crate::helper::process_type(job).as_str().into()],
        )?
        .map(|row| row.get::<i32>(1))
        .filter_map(Result::transpose)
        .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| crate::spi::fail(e))
}

/// Parks an event that cannot be written, in the batch's transaction.
pub fn dead_letter(job: &str, batch_id: i64, suffix: Option<&str>, ev: &RawEvent, error: &str) {
    // a pace that parks asks for events as stored (BatchRequest::predecode)
    assert!(!ev.predecoded, "event {} of batch {batch_id} is not as stored", ev.ev_id);
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
