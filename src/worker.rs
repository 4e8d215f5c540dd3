//! The worker loop: one process per job. Each batch is read from the source and written in one
//! target transaction that also records the batch's tick; the source batch is finished only after
//! that commits. Any error rolls the transaction back and the same batch is tried again.
//!
//! Signals: SIGUSR2 stops after the current batch (the original's -s, which used SIGINT: here
//! SIGINT stays PostgreSQL's query cancel, which lock and statement timeouts rely on), SIGTERM
//! stops at once and rolls back (-k), SIGHUP wakes the loop to pick up reloaded settings (-r).

use crate::batch::{self, BatchError, Pace};
use crate::config::{mask_password, JobConfig, LogLevel, Word};
use crate::feed::Feed;
use crate::retention;
use crate::state;
use crate::tx::in_transaction;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a worker that died waits before the postmaster starts it again.
pub const RESTART_DELAY: Duration = Duration::from_secs(5);
const THROUGHPUT_LOG_EVERY: Duration = Duration::from_secs(60);
/// How often retention_period is checked when no partition was created meanwhile.
const RETENTION_EVERY: Duration = Duration::from_secs(300);

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

struct Worker {
    job: String,
    pid: i32,
    /// The role that started the job: source reads and target writes run as it.
    run_as: pg_sys::Oid,
    config: JobConfig,
    config_version: i64,
    source: Feed,
    /// whether this process has registered the consumer (a no-op when it exists)
    registered: bool,
    pace: Pace,
    backoff: Duration,
    window: (Instant, i64, i64),
    last_lag_update: Option<Instant>,
    recent_eps: f64,
    last_retention: Option<Instant>,
    /// the source's TimeZone as the last batch reported it
    source_time_zone: Option<String>,
}

impl Worker {
    fn log(&self, level: LogLevel, msg: &str) {
        if self.config.log_level >= level {
            log!("cube_dispatcher job {}: {msg}", self.job);
        }
    }

    /// New settings from reload() take effect here, between batches.
    fn pick_up_reload(&mut self) -> Result<(), BatchError> {
        let version = in_transaction(|| state::config_version(&self.job))?;
        if version.is_some_and(|v| v != self.config_version) {
            if let Some(row) = in_transaction(|| state::load_job(&self.job))?? {
                if row.config.helper != self.config.helper {
                    // the other way of reading starts from a settled source
                    let source = &mut self.source;
                    in_transaction(|| {
                        source.settle();
                        source.disconnect();
                    })?;
                    self.source = Feed::new(&row.config, self.run_as);
                }
                self.config = row.config;
                self.config_version = row.config_version;
                self.source.reconfigure(&self.config.src_db, Duration::from_secs_f64(self.config.connection_lifetime));
                in_transaction(|| {
                    set_lock_timeout(&self.config);
                })?;
                self.log(LogLevel::Normal, &format!("reloaded settings (version {})", self.config_version));
            }
        }
        Ok(())
    }

    fn done(&mut self, d: &batch::Done) {
        for p in &d.created {
            self.log(LogLevel::Normal, &format!("created partition {}", p.partition));
        }
        if d.parked > 0 {
            warning!(
                "cube_dispatcher job {}: batch {}: {} events could not be written and were stored in cube_dispatcher.dead_letter",
                self.job,
                d.batch_id,
                d.parked
            );
        }
        if d.already_written {
            self.log(
                LogLevel::Normal,
                &format!("batch {} was already written here; finishing it on the source", d.batch_id),
            );
        }
        self.log(
            LogLevel::Verbose,
            &format!(
                "batch {}: {} events written in {:.3} s ({})",
                d.batch_id,
                d.events,
                d.took.as_secs_f64(),
                d.phases
            ),
        );
        self.pace = Pace::Bulk;
        self.backoff = Duration::from_secs(1);
        self.count(d.events);
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
            });
            self.last_lag_update = Some(Instant::now());
            self.recent_eps = 0.0;
        }
    }

    /// Drops partitions past retention_period: after a batch that created partitions, and every
    /// few minutes. In a transaction of its own, between batches.
    fn retention(&mut self, created: bool) {
        if self.config.retention_period.is_none() {
            return;
        }
        if !created && self.last_retention.is_some_and(|t| t.elapsed() < RETENTION_EVERY) {
            return;
        }
        self.last_retention = Some(Instant::now());
        let (cfg, role, source, known) = (&self.config, self.run_as, &mut self.source, &self.source_time_zone);
        let pass = in_transaction(|| {
            let time_zone = known.clone().unwrap_or_else(|| source.time_zone());
            retention::run(cfg, role, &time_zone)
        });
        let retention = cfg.retention_period.as_ref().map(|r| r.0.clone()).unwrap_or_default();
        match pass {
            Ok(pass) => {
                for (table, ended) in &pass.dropped {
                    self.log(
                        LogLevel::Normal,
                        &format!("dropped partition {table}: its period ended at {ended}, more than retention_period ({retention}) ago"),
                    );
                }
                for (table, why) in &pass.failed {
                    warning!(
                        "cube_dispatcher job {}: could not drop partition {table}: {why}; trying again later",
                        self.job
                    );
                }
            }
            Err(e) => warning!("cube_dispatcher job {}: retention: {e}; trying again later", self.job),
        }
    }

    fn failed(&mut self, err: BatchError) {
        // the remote side may hold an open cursor or transaction: start over with a new connection
        let _ = in_transaction(|| {
            self.source.disconnect();
        });
        let next_pace = self.pace.after(&err, self.config.on_error);
        // server messages do not carry the connection string, but never risk showing a password
        let msg = err.to_string().replace(&self.config.src_db, &mask_password(&self.config.src_db));
        let _ = in_transaction(|| {
            state::set_error(&self.job, &msg);
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
    // SAFETY: ConfigReloadPending is set by the SIGHUP handler; reading the files between
    // batches, outside any handler, is what PostgreSQL's own processes do
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
    });
}

/// Signals and allocator, before anything else runs in the process (a job's worker or its
/// helper).
pub fn set_up_process() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SAFETY: installing a handler before the process does anything else, as PostgreSQL's own
    // processes do; die() is PostgreSQL's own, async-signal-safe handler
    unsafe {
        // SIGTERM (kill(), server shutdown): PostgreSQL's own die(), so the transaction in
        // progress is aborted at the next interrupt check and nothing half-done is committed.
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die));
    }
    // Every chunk allocates and frees buffers of a few MiB (the fetched events, the COPY text).
    // glibc would map and unmap each one, and the kernel would zero fresh pages for it every
    // time (7 % of a drain here): keep such blocks in the heap and freed memory for reuse.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; this process is single-threaded
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Session settings the worker's guarantees rest on; without them it must not run.
pub fn settle_session(job: &str) {
    let settled = in_transaction(|| {
        // first of all: the database's or role's search_path must not reach the bookkeeping
        crate::roles::pin_search_path();
        // The source batch is finished right after our commit: that commit must be durable
        // whatever the server's default, or a crash could lose a batch the source already forgot.
        crate::spi::run("SET synchronous_commit TO on", &[]);
    });
    if let Err(e) = settled {
        // FATAL, not a return: the postmaster starts the worker again after RESTART_DELAY
        ereport!(FATAL, PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("cube_dispatcher job {job}: {e}"));
    }
}

/// Between replacing the library and `ALTER EXTENSION cube_dispatcher UPDATE`, the extension's
/// tables are the old version's: wait for the update rather than read them wrongly. False: the
/// extension is gone, or a stop was requested.
fn wait_for_update(job: &str) -> bool {
    let mut told = false;
    loop {
        match in_transaction(state::check_version) {
            Ok(Ok(())) => return true,
            Ok(Err(outdated)) if !told => {
                let msg = format!("waiting: {outdated}");
                log!("cube_dispatcher job {job}: {msg}");
                let _ = in_transaction(|| state::set_error(job, &msg));
                told = true;
            }
            Ok(Err(_)) => {}
            Err(e) => {
                log!("cube_dispatcher job {job}: not starting: {e}");
                return false;
            }
        }
        wait(Duration::from_secs(5));
        if stop_requested() {
            return false;
        }
    }
}

impl Worker {
    /// Records this process as the job's worker and loads the job. Waits for start()'s
    /// transaction when it has not committed yet. None: the job is not to run (stopped, dropped,
    /// start() rolled back, or its definition is unreadable); the process then exits with 0, so
    /// the postmaster does not start it again.
    fn announce(job: &str, pid: i32) -> Option<Worker> {
        if !wait_for_update(job) {
            return None;
        }
        let row = match in_transaction(|| {
            state::lock_job(job);
            state::worker_started(job, pid);
            state::load_job(job)
        }) {
            Ok(Ok(Some(r))) if r.enabled => r,
            Ok(Err(e)) => {
                refuse_to_run(job, pid, e);
                return None;
            }
            Ok(Ok(_)) => {
                let _ = in_transaction(|| state::set_stopped(job, Some(pid)));
                return None;
            }
            Err(e) => {
                log!("cube_dispatcher job {job}: not starting: {e}");
                return None;
            }
        };
        let w = Worker {
            run_as: row.run_as,
            source: Feed::new(&row.config, row.run_as),
            job: job.to_string(),
            pid,
            config: row.config,
            config_version: row.config_version,
            registered: false,
            pace: Pace::Bulk,
            backoff: Duration::from_secs(1),
            window: (Instant::now(), 0, 0),
            last_lag_update: None,
            recent_eps: 0.0,
            last_retention: None,
            source_time_zone: None,
        };
        let _ = in_transaction(|| set_lock_timeout(&w.config));
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
        Some(w)
    }

    /// start() registers the consumer; a worker does it once more (a no-op when it exists), so a
    /// job resumed after a restart finds its consumer even if the queue was re-created.
    fn register(&mut self) -> Result<(), BatchError> {
        if !self.registered {
            let (q, c, source) = (&self.config.pgq_queue_name, &self.config.pgq_consumer_id, &mut self.source);
            in_transaction(|| source.register(q, c))?;
            self.registered = true;
        }
        Ok(())
    }

    /// Batches until a stop is requested; SIGTERM leaves through die() instead.
    fn run(&mut self) {
        while !stop_requested() {
            let ready = self.pick_up_reload().and_then(|()| self.register());
            if let Err(e) = ready {
                match e {
                    BatchError::Unreadable(e) => return refuse_to_run(&self.job, self.pid, e),
                    e => self.failed(e),
                }
                continue;
            }
            match batch::run(&mut self.source, &self.config, self.run_as, self.pace, self.recent_eps) {
                Ok(None) => {
                    self.idle();
                    self.retention(false);
                    wait(Duration::from_secs_f64(self.config.loop_delay));
                }
                Ok(Some(done)) => {
                    self.done(&done);
                    self.source_time_zone = done.time_zone.clone();
                    self.retention(!done.created.is_empty());
                    pg_sys::check_for_interrupts!();
                    process_config_reload();
                }
                Err(e) => self.failed(e),
            }
        }
        // the last batch's finish is committed on the source now, not left for the next start
        let _ = in_transaction(|| self.source.settle());
        let _ = in_transaction(|| {
            self.source.disconnect();
            state::set_stopped(&self.job, Some(self.pid));
        });
        self.log(LogLevel::Normal, "stopped");
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cube_dispatcher_worker_main(arg: pg_sys::Datum) {
    let job = BackgroundWorker::get_extra().to_string();
    set_up_process();
    // SAFETY: as in set_up_process; the handler is async-signal-safe
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGUSR2 as i32, Some(request_stop));
    }
    // Bookkeeping in the extension's private tables runs as the bootstrap superuser; everything
    // an event can influence runs as the job's role (see roles.rs).
    let db = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), Some(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID)));
    settle_session(&job);
    // SAFETY: a backend global, set at process start
    let pid = unsafe { pg_sys::MyProcPid };
    if let Some(mut w) = Worker::announce(&job, pid) {
        w.run();
    }
}
