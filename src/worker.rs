//! The worker loop: one process per job. Each batch is read from the source and written in one
//! target transaction that also records the batch's tick; the source batch is finished only after
//! that commits. Any error rolls the transaction back and the same batch is tried again.
//!
//! Signals: SIGUSR2 stops after the current batch (the original's -s, which used SIGINT: here
//! SIGINT stays PostgreSQL's query cancel, which lock and statement timeouts rely on), SIGTERM
//! stops at once and rolls back (-k), SIGHUP wakes the loop to pick up reloaded settings (-r).

use crate::apply::{caught, in_subtransaction, ApplyError, BatchWriter, EventError, OpenCopy};
use crate::config::{mask_password, JobConfig, LogLevel, OnError};
use crate::route::Mode;
use crate::source::{RawEvent, Source};
use crate::state;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a worker that died waits before the postmaster starts it again.
pub const RESTART_DELAY: Duration = Duration::from_secs(5);
const THROUGHPUT_LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
enum StepError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("lost position: the source hands out batch {batch_id} starting at tick {prev_tick}, but the last tick applied here is {applied}; the consumer was re-registered or moved. Drop and re-create the job (cube_dispatcher.drop) to start from the queue's current position")]
    LostPosition { batch_id: i64, prev_tick: i64, applied: i64 },
    #[error("{0}")]
    Server(String),
    /// Not retried: the job stops (see `refuse_to_run`).
    #[error(transparent)]
    Unreadable(#[from] state::Unreadable),
    #[error("batch {batch_id}: {inner}")]
    InBatch { batch_id: i64, inner: Box<StepError> },
}

impl StepError {
    fn apply_error(&self) -> Option<&ApplyError> {
        match self {
            StepError::Apply(e) => Some(e),
            StepError::InBatch { inner, .. } => inner.apply_error(),
            _ => None,
        }
    }
}

/// How a batch's events are written. Bulk is the normal way; the others are for retrying a
/// batch that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    Bulk,
    /// One event per statement, so the error names the event (on_error = retry).
    OneByOne,
    /// One event per subtransaction; failing events go to the dead-letter table (on_error =
    /// dead_letter).
    Isolating,
}

enum Step {
    Idle,
    Done { batch_id: i64, events: i64, created: Vec<String>, took: Duration, phases: Phases },
}

/// Where a batch's time went, for the verbose log: says whether the source or the target is
/// the bottleneck.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    /// waiting for the source: next batch, cursor, fetches not yet ready
    source: Duration,
    /// decoding and writing into the target
    write: Duration,
    /// the target commit (must reach disk before the source hears)
    commit: Duration,
    /// pgq.finish_batch on the source
    finish: Duration,
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "source {:.3} s, writing {:.3} s, commit {:.3} s, finish {:.3} s",
            self.source.as_secs_f64(),
            self.write.as_secs_f64(),
            self.commit.as_secs_f64(),
            self.finish.as_secs_f64()
        )
    }
}

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("could not register a background worker for job {0}; raise max_worker_processes")]
    NoSlot(String),
    #[error("the worker for job {job} did not start: {status}")]
    NotStarted { job: String, status: String },
}

impl LaunchError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            LaunchError::NoSlot(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
            LaunchError::NotStarted { .. } => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        }
    }
}

/// Launches the job's worker in the calling database; returns its pid.
pub fn launch(job: &str) -> Result<i32, LaunchError> {
    // SAFETY: a backend global, set once the backend is connected to its database
    let db = unsafe { pg_sys::MyDatabaseId };
    let worker = BackgroundWorkerBuilder::new(&format!("cube_dispatcher {job}"))
        .set_type(&format!("cube_dispatcher {job}"))
        .set_library("cube_dispatcher")
        .set_function("cube_dispatcher_worker_main")
        .set_argument(Some(pg_sys::Datum::from(db.to_u32())))
        .set_extra(job)
        .enable_spi_access()
        .set_restart_time(Some(RESTART_DELAY))
        // SAFETY: a backend global, set at process start
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .map_err(|_| LaunchError::NoSlot(job.to_string()))?;
    worker
        .wait_for_startup()
        .map_err(|status| LaunchError::NotStarted { job: job.to_string(), status: format!("{status:?}") })
}

/// Runs a keep_all COPY that goes on with the following chunks while they continue its table,
/// so a big batch is one COPY (one ring of shared buffers), not one a chunk. A chunk that does not
/// continue it ends the COPY and is left in `stash`. Returns the time spent writing, not waiting.
fn run_continued_copy(
    source: &mut Source,
    writer: &mut BatchWriter,
    copy: OpenCopy,
    events: &mut i64,
    stash: &mut Option<Vec<RawEvent<'static>>>,
) -> Result<Duration, StepError> {
    let key = copy.key.clone();
    let copy_started = Instant::now();
    let mut fetching = Duration::ZERO;
    let mut more = |buf: &mut Vec<u8>| -> Option<i64> {
        let fetch_started = Instant::now();
        let mut writing = Duration::ZERO;
        let added = source.next_chunk(|chunk| {
            let write_started = Instant::now();
            *events += chunk.len() as i64;
            let added = writer.continue_copy(&key, chunk, buf);
            if added.is_none() {
                *stash = Some(chunk.iter().map(RawEvent::to_owned_event).collect());
            }
            writing = write_started.elapsed();
            added
        });
        fetching += fetch_started.elapsed().saturating_sub(writing);
        added.flatten().map(|(_, last)| last)
    };
    copy.run(Some(&mut more))?;
    Ok(copy_started.elapsed().saturating_sub(fetching))
}

/// Runs `f` in its own transaction. A PostgreSQL error inside becomes Err and the transaction is
/// rolled back; so does an Err returned by `f`.
fn in_transaction<R>(f: impl FnOnce() -> Result<R, StepError>) -> Result<R, StepError> {
    let result = PgTryBuilder::new(AssertUnwindSafe(|| unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let r = f();
        if r.is_ok() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        r
    }))
    .catch_others(|e| Err(StepError::Server(caught(&e).message)))
    .execute();
    if result.is_err() {
        unsafe { pg_sys::AbortOutOfAnyTransaction() };
    }
    result
}

struct Worker {
    job: String,
    /// The role that started the job: source reads and target writes run as it.
    run_as: pg_sys::Oid,
    config: JobConfig,
    config_version: i64,
    source: Source,
    pace: Pace,
    backoff: Duration,
    window: (Instant, i64, i64),
    last_lag_update: Option<Instant>,
    recent_eps: f64,
}

impl Worker {
    fn log(&self, level: LogLevel, msg: &str) {
        if self.config.log_level >= level {
            log!("cube_dispatcher job {}: {msg}", self.job);
        }
    }

    /// New settings from reload() take effect here, between batches.
    fn pick_up_reload(&mut self) -> Result<(), StepError> {
        let version = in_transaction(|| Ok(state::config_version(&self.job)))?;
        if version.is_some_and(|v| v != self.config_version) {
            if let Some(row) = in_transaction(|| Ok(state::load_job(&self.job)?))? {
                self.config = row.config;
                self.config_version = row.config_version;
                self.source.reconfigure(&self.config.src_db, Duration::from_secs_f64(self.config.connection_lifetime));
                in_transaction(|| {
                    set_lock_timeout(&self.config);
                    Ok(())
                })?;
                self.log(LogLevel::Normal, &format!("reloaded settings (version {})", self.config_version));
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Step, StepError> {
        let started = Instant::now();
        let cfg = self.config.clone();
        let pace = self.pace;
        let run_as = self.run_as;
        let source = &mut self.source;
        let eps = self.recent_eps;
        let current = std::cell::Cell::new(None);
        let mut write_time = Duration::ZERO;
        let mut body_done = started;
        let in_batch = |e: StepError| match current.get() {
            Some(batch_id) => StepError::InBatch { batch_id, inner: Box::new(e) },
            None => e,
        };
        let outcome = in_transaction(|| {
            let Some(info) = source.next_batch(&cfg.pgq_queue_name, &cfg.pgq_consumer_id, cfg.dateformat.as_deref())
            else {
                return Ok(None);
            };
            let batch_id = info.batch_id;
            current.set(Some(batch_id));
            match state::last_tick(&cfg.job_name) {
                // written and committed here, but the source never heard: only finish it
                Some(t) if t == info.tick_id => return Ok(Some((info, 0, Vec::new(), 0, true))),
                Some(t) if t != info.prev_tick_id => {
                    return Err(StepError::LostPosition { batch_id, prev_tick: info.prev_tick_id, applied: t })
                }
                _ => {}
            }
            let mut writer = BatchWriter::new(&cfg, run_as, info.suffix.clone());
            let mut events = 0i64;
            let mut dead = 0i64;
            source.open_events(&info, cfg.mode == Mode::KeepLatest, pace == Pace::Isolating);
            // a chunk fetched while a COPY ran that did not continue it: written next
            let mut stash: Option<Vec<RawEvent<'static>>> = None;
            loop {
                let mut open = None;
                if let Some(chunk) = stash.take() {
                    let write_started = Instant::now();
                    open = writer.apply_leaving_copy_open(&chunk)?;
                    write_time += write_started.elapsed();
                } else {
                    let written = source.next_chunk(|chunk| -> Result<(), StepError> {
                        let write_started = Instant::now();
                        events += chunk.len() as i64;
                        match pace {
                            Pace::Bulk => open = writer.apply_leaving_copy_open(chunk)?,
                            Pace::OneByOne => {
                                for ev in chunk {
                                    writer.apply(std::slice::from_ref(ev))?;
                                }
                            }
                            Pace::Isolating => {
                                for ev in chunk {
                                    let created = writer.created.len();
                                    let Err(e) = in_subtransaction(|| writer.apply(std::slice::from_ref(ev))) else {
                                        continue;
                                    };
                                    if e.is_transient() {
                                        return Err(e.into());
                                    }
                                    writer.forget_partitions();
                                    writer.created.truncate(created);
                                    let text = match e {
                                        // raised inside the subtransaction: say which event
                                        ApplyError::Event { ev_id: 0, cause: EventError::Sql(c), .. } => format!(
                                            "event {}, table {}: {c}",
                                            ev.ev_id,
                                            ev.ev_extra1.as_deref().unwrap_or("(null)")
                                        ),
                                        e => e.to_string(),
                                    };
                                    state::dead_letter(&cfg.job_name, batch_id, info.suffix.as_deref(), ev, &text);
                                    dead += 1;
                                }
                            }
                        }
                        write_time += write_started.elapsed();
                        Ok(())
                    });
                    match written {
                        None => break,
                        Some(r) => r?,
                    }
                }
                if let Some(copy) = open {
                    write_time += run_continued_copy(source, &mut writer, copy, &mut events, &mut stash)?;
                }
            }
            source.close_events();
            state::record_batch(&cfg.job_name, &info, events, eps);
            body_done = Instant::now();
            Ok(Some((info, events, std::mem::take(&mut writer.created), dead, false)))
        })
        .map_err(in_batch)?;
        let Some((info, events, created, dead, already_done)) = outcome else {
            return Ok(Step::Idle);
        };
        let committed = Instant::now();
        let mut phases = Phases {
            source: body_done.duration_since(started).saturating_sub(write_time),
            write: write_time,
            commit: committed.duration_since(body_done),
            finish: Duration::ZERO,
        };
        if dead > 0 {
            warning!("cube_dispatcher job {}: batch {}: {dead} events could not be written and were stored in cube_dispatcher.dead_letter", self.job, info.batch_id);
        }
        if already_done {
            self.log(
                LogLevel::Normal,
                &format!("batch {} was already written here; finishing it on the source", info.batch_id),
            );
        }
        in_transaction(|| {
            self.source.finish_batch(info.batch_id);
            Ok(())
        })
        .map_err(|e| StepError::InBatch { batch_id: info.batch_id, inner: Box::new(e) })?;
        phases.finish = committed.elapsed();
        Ok(Step::Done { batch_id: info.batch_id, events, created, took: started.elapsed(), phases })
    }

    fn count(&mut self, events: i64) {
        let (since, batches, evs) = &mut self.window;
        *batches += 1;
        *evs += events;
        let elapsed = since.elapsed();
        if elapsed >= Duration::from_secs(5) {
            self.recent_eps = *evs as f64 / elapsed.as_secs_f64();
        }
        if elapsed >= THROUGHPUT_LOG_EVERY {
            let msg = format!(
                "{} events in {} batches in the last {:.0} s ({:.0} events/s)",
                evs,
                batches,
                elapsed.as_secs_f64(),
                self.recent_eps
            );
            self.window = (Instant::now(), 0, 0);
            self.log(LogLevel::Normal, &msg);
        }
    }

    fn idle(&mut self) {
        let due = self.last_lag_update.is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if due {
            let (q, c, job) =
                (self.config.pgq_queue_name.clone(), self.config.pgq_consumer_id.clone(), self.job.clone());
            let source = &mut self.source;
            let _ = in_transaction(|| {
                let lag = source.consumer_lag(&q, &c);
                state::record_lag(&job, lag);
                Ok(())
            });
            self.last_lag_update = Some(Instant::now());
            self.recent_eps = 0.0;
        }
    }

    fn failed(&mut self, err: StepError) {
        // the remote side may hold an open cursor or transaction: start over with a new connection
        let _ = in_transaction(|| {
            self.source.disconnect();
            Ok(())
        });
        // an error about the events (not the moment) is retried at once, event by event: with
        // on_error = dead_letter to set the bad ones aside, else to name the exact event
        let about_events = err.apply_error().is_some_and(|e| !e.is_transient());
        let next_pace = match (about_events, self.config.on_error, self.pace) {
            (true, OnError::DeadLetter, Pace::Bulk | Pace::OneByOne) => Some(Pace::Isolating),
            (true, OnError::Retry, Pace::Bulk) if matches!(err.apply_error(), Some(ApplyError::Statement { .. })) => {
                Some(Pace::OneByOne)
            }
            _ => None,
        };
        // server messages do not carry the connection string, but never risk showing a password
        let msg = err.to_string().replace(&self.config.src_db, &mask_password(&self.config.src_db));
        let _ = in_transaction(|| {
            state::set_error(&self.job, &msg);
            Ok(())
        });
        if let Some(pace) = next_pace {
            self.log(LogLevel::Verbose, &format!("{msg}; retrying the batch one event at a time ({pace:?})"));
            self.pace = pace;
            return;
        }
        warning!(
            "cube_dispatcher job {}: {msg}; batch rolled back, retrying in {} s",
            self.job,
            self.backoff.as_secs()
        );
        wait(self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// SIGUSR2. Like every PostgreSQL signal handler it keeps errno, which SetLatch may change, for
/// the code it interrupted.
unsafe extern "C-unwind" fn request_stop(_signal: std::ffi::c_int) {
    // SAFETY: errno is thread-local and always valid; SetLatch is async-signal-safe (PostgreSQL's
    // own handlers call it) and MyLatch is set before signals are unblocked
    unsafe {
        let saved = *libc::__errno_location();
        STOP_REQUESTED.store(true, Ordering::SeqCst);
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// A session setting: it outlives the transaction it is set in.
fn set_lock_timeout(cfg: &JobConfig) {
    let ms = format!("{}ms", (cfg.lock_timeout * 1000.0).round() as i64);
    crate::spi::run("SELECT set_config('lock_timeout', $1, false)", &[ms.as_str().into()]);
}

/// Sleeps on the latch; stop and reload requests wake it early, SIGTERM exits through die().
fn wait(d: Duration) {
    let deadline = Instant::now() + d;
    while !stop_requested() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let woke = BackgroundWorker::wait_latch(Some(left.min(Duration::from_secs(3600))));
        pg_sys::check_for_interrupts!();
        if !woke || BackgroundWorker::sighup_received() {
            break;
        }
    }
    process_config_reload();
}

fn process_config_reload() {
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

unsafe extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends (tcop/postgres.c). pgrx's `pg_sys::die` is a
    /// Rust wrapper around it, which a signal handler slot cannot take.
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

/// A stored definition that does not read back stops the job, visibly: running on defaults could
/// write where the definition forbids it.
fn refuse_to_run(job: &str, pid: i32, e: state::Unreadable) {
    let msg = format!("stopped: {e}");
    warning!("cube_dispatcher job {job}: {msg}");
    let _ = in_transaction(|| {
        state::set_error(job, &msg);
        state::set_enabled(job, false);
        state::set_stopped(job, Some(pid));
        Ok(())
    });
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cube_dispatcher_worker_main(arg: pg_sys::Datum) {
    let job = BackgroundWorker::get_extra().to_string();
    let db = pg_sys::Oid::from(arg.value() as u32);

    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SAFETY: installing handlers before the process does anything else, as PostgreSQL's own
    // processes do; both handlers are async-signal-safe.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGUSR2 as i32, Some(request_stop));
        // SIGTERM (kill(), server shutdown): PostgreSQL's own die(), so the transaction in
        // progress is aborted at the next interrupt check and nothing half-done is committed.
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die));
    }
    // Bookkeeping in the extension's private tables runs as the bootstrap superuser; everything
    // an event can influence runs as the job's role (see roles.rs).
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), Some(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID)));

    // Every chunk allocates and frees buffers of a few MiB (the fetched events, the COPY text).
    // glibc would map and unmap each one, and the kernel would zero fresh pages for it every
    // time (7 % of a drain here): keep such blocks in the heap and freed memory for reuse.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
    let pid = unsafe { pg_sys::MyProcPid };
    let settled = in_transaction(|| {
        // first of all: the database's or role's search_path must not reach the bookkeeping
        crate::roles::pin_search_path();
        // The source batch is finished right after our commit: that commit must be durable
        // whatever the server's default, or a crash could lose a batch the source already forgot.
        crate::spi::run("SET synchronous_commit TO on", &[]);
        Ok(())
    });
    if let Err(e) = settled {
        // FATAL, not a return: the postmaster starts the worker again after RESTART_DELAY
        ereport!(FATAL, PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("cube_dispatcher job {job}: {e}"));
    }
    // Waits for start()'s transaction when it has not committed yet; fails if it rolled back.
    let row = in_transaction(|| {
        state::worker_started(&job, pid);
        Ok(state::load_job(&job))
    });
    let row = match row {
        Ok(Ok(Some(r))) if r.enabled => r,
        Ok(Err(e)) => return refuse_to_run(&job, pid, e),
        Ok(Ok(_)) => {
            in_transaction(|| {
                state::set_stopped(&job, Some(pid));
                Ok(())
            })
            .ok();
            return; // stopped or dropped meanwhile: exit 0, so the postmaster does not restart us
        }
        Err(e) => {
            log!("cube_dispatcher job {job}: not starting: {e}");
            return;
        }
    };
    let mut w = Worker {
        run_as: row.run_as,
        source: Source::new(row.run_as, &row.config.src_db, Duration::from_secs_f64(row.config.connection_lifetime)),
        job: job.clone(),
        config: row.config,
        config_version: row.config_version,
        pace: Pace::Bulk,
        backoff: Duration::from_secs(1),
        window: (Instant::now(), 0, 0),
        last_lag_update: None,
        recent_eps: 0.0,
    };
    let _ = in_transaction(|| {
        set_lock_timeout(&w.config);
        Ok(())
    });
    w.log(
        LogLevel::Normal,
        &format!(
            "started (pid {pid}): queue {}, consumer {}, mode {}, source {}",
            w.config.pgq_queue_name,
            w.config.pgq_consumer_id,
            w.config.mode.as_str(),
            mask_password(&w.config.src_db)
        ),
    );

    let mut registered = false;
    while !stop_requested() {
        match w.pick_up_reload() {
            Ok(()) => {}
            Err(StepError::Unreadable(e)) => return refuse_to_run(&job, pid, e),
            Err(e) => {
                w.failed(e);
                continue;
            }
        }
        if !registered {
            let (q, c) = (w.config.pgq_queue_name.clone(), w.config.pgq_consumer_id.clone());
            let source = &mut w.source;
            match in_transaction(|| {
                source.register(&q, &c);
                Ok(())
            }) {
                Ok(()) => registered = true,
                Err(e) => {
                    w.failed(e);
                    continue;
                }
            }
        }
        match w.step() {
            Ok(Step::Idle) => {
                w.idle();
                wait(Duration::from_secs_f64(w.config.loop_delay));
            }
            Ok(Step::Done { batch_id, events, created, took, phases }) => {
                for t in &created {
                    w.log(LogLevel::Normal, &format!("created partition {t}"));
                }
                w.log(
                    LogLevel::Verbose,
                    &format!("batch {batch_id}: {events} events written in {:.3} s ({phases})", took.as_secs_f64()),
                );
                w.pace = Pace::Bulk;
                w.backoff = Duration::from_secs(1);
                w.count(events);
                pg_sys::check_for_interrupts!();
                process_config_reload();
            }
            Err(e) => w.failed(e),
        }
    }
    let _ = in_transaction(|| {
        w.source.disconnect();
        state::set_stopped(&job, Some(pid));
        Ok(())
    });
    w.log(LogLevel::Normal, "stopped");
}
