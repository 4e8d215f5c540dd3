//! The receiving helper: a second process per job that owns the job's source connection (the
//! whole `Source`, boundary queries included) and streams each batch's events to the writer
//! through shared memory, so the writer spends its time on COPY, not on receiving through dblink.
//! The writer asks (wire::Ask), the helper answers, one ask at a time; during a batch the helper
//! runs ahead of the writer by as much as the events queue holds.
//!
//! Exactly once, as without a helper: every ask carries how far the writer's commits go, and the
//! helper's Source commits a finish on the source only after that commit is flushed
//! (`Source::set_written_upto`). The writer asks for batch N+1 only after N committed, so the
//! helper never commits a finish the writer has not written. While the writer writes and commits
//! a batch's last events, the helper already takes the next batch and reads its first chunk
//! (`read_early`), committing nothing: the next `Next` is answered at once, and anything else
//! lets that batch go unfinished, so it comes again.
//!
//! Errors: the helper catches each ask's error, sends it once (`Failed`), and exits quietly; the
//! writer raises it in its batch, so it is reported once, with its SQLSTATE, like an error of its
//! own. After any failed batch the writer drops the queues (the helper then exits, and its source
//! session with it, rolling back an uncommitted finish) and starts a new helper for the next try.

pub mod shm;
pub mod wire;

use crate::event::{Chunks, RawEvent};
use crate::source::{BatchInfo, BatchRequest, Source};
use crate::tx::SqlError;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder};
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use shm::{Created, Detached, Ends, Header};
use std::time::Duration;
use thiserror::Error;
use wire::{Ask, Incoming, Reply, ToHelper};

/// Why a job runs without its helper.
#[derive(Debug, Error)]
pub enum NotStarted {
    #[error("no dynamic shared memory segment is free")]
    NoSegment,
    #[error("no background worker slot is free (raise max_worker_processes: a job with a helper takes two)")]
    NoSlot,
    #[error("the helper process ended before it started serving; see the server log")]
    Gone,
    #[error("the helper runs another build ({0}) than this process ({mine})", mine = wire::VERSION)]
    Version(String),
}

/// What went wrong between a writer and its helper; raised in the writer's batch.
#[derive(Debug, Error)]
enum LinkError {
    #[error("cube_dispatcher: the job's receiving helper (pid {0}) ended unexpectedly; see the server log")]
    Lost(i32),
    /// the helper's own error, as PostgreSQL raised it there
    #[error("{message}")]
    Failed { sqlstate: i32, message: String },
    #[error(transparent)]
    Malformed(#[from] wire::Malformed),
    #[error("cube_dispatcher: unexpected message from the receiving helper: {0}")]
    Unexpected(String),
    #[error("cube_dispatcher: the receiving helper sent {received} of the batch's {events} events")]
    Short { received: u64, events: u64 },
}

impl LinkError {
    fn raise(self) -> ! {
        let code = match &self {
            // about the moment (class 08): retried after a backoff, never blamed on the events
            LinkError::Lost(_) => PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            LinkError::Failed { sqlstate, .. } => PgSqlErrorCode::from(*sqlstate),
            _ => PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
        };
        ereport!(ERROR, code, self.to_string());
    }
}

fn unexpected(reply: &Reply) -> ! {
    LinkError::Unexpected(format!("{reply:?}")).raise()
}

/// The backend_type of a job's helper (job names have no spaces, so it is no job's writer).
pub fn process_type(job: &str) -> String {
    format!("cube_dispatcher {job} helper")
}

/// The writer's side: a running helper and its queues.
pub struct Helper {
    ends: Ends,
    worker: *mut pg_sys::BackgroundWorkerHandle,
    pid: i32,
    /// a batch's events are still coming
    reading: bool,
    /// events received of that batch
    received: u64,
}

impl Helper {
    /// Starts a helper for the job and waits until it serves.
    pub fn start(job: &str, run_as: pg_sys::Oid) -> Result<Helper, NotStarted> {
        // SAFETY: backend globals, set once this backend is connected
        let (db, my_pid) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
        let created = Created::new(Header::new(db, run_as, job)).ok_or(NotStarted::NoSegment)?;
        let builder = BackgroundWorkerBuilder::new(&process_type(job))
            .set_type(&process_type(job))
            .set_library("cube_dispatcher")
            .set_function("cube_dispatcher_helper_main")
            .set_argument(Some(created.handle()))
            .enable_spi_access()
            .set_restart_time(None)
            .set_notify_pid(my_pid);
        let mut definition: pg_sys::BackgroundWorker = (&builder).into();
        let mut worker = std::ptr::null_mut();
        // SAFETY: the definition is complete; the handle is allocated in TopMemoryContext, as it
        // is used across transactions (pgrx's load_dynamic would leave it in the current one)
        let registered = unsafe {
            PgMemoryContexts::TopMemoryContext
                .switch_to(|_| pg_sys::RegisterDynamicBackgroundWorker(&mut definition, &mut worker))
        };
        if !registered {
            return Err(NotStarted::NoSlot);
        }
        let mut helper = Helper { ends: created.attach(worker), worker, pid: 0, reading: false, received: 0 };
        match helper.ends.receive().map(wire::decode) {
            Ok(Ok(Incoming::Reply(Reply::Hello { version, pid }))) if version == wire::VERSION => {
                helper.pid = pid;
                Ok(helper)
            }
            Ok(Ok(Incoming::Reply(Reply::Hello { version, .. }))) => {
                helper.abandon();
                Err(NotStarted::Version(version))
            }
            _ => {
                helper.abandon();
                Err(NotStarted::Gone)
            }
        }
    }

    /// Drops the queues and waits until the helper has exited (with it, its source session and
    /// what was not committed there). Interruptible.
    pub fn abandon(self) {
        let Helper { ends, worker, .. } = self;
        drop(ends);
        // SAFETY: the handle came from RegisterDynamicBackgroundWorker in this process, which
        // is the helper's bgw_notify_pid, as waiting requires; it is not used after the pfree
        unsafe {
            pg_sys::WaitForBackgroundWorkerShutdown(worker);
            pg_sys::pfree(worker.cast());
        }
    }

    fn ask(&mut self, conninfo: &str, lifetime: Duration, ask: Ask) {
        let message = wire::encode(&ToHelper {
            written_upto: crate::tx::last_commit_end(),
            conninfo: conninfo.to_string(),
            lifetime_secs: lifetime.as_secs_f64(),
            ask,
        });
        if self.ends.send(&message).is_err() {
            LinkError::Lost(self.pid).raise()
        }
    }

    /// The next message: a chunk of events, or a reply (an error the helper sent is raised here).
    fn receive(&mut self) -> Incoming<'_> {
        let pid = self.pid;
        let Ok(message) = self.ends.receive() else { LinkError::Lost(pid).raise() };
        match wire::decode(message) {
            Ok(Incoming::Reply(Reply::Failed { sqlstate, message })) => LinkError::Failed { sqlstate, message }.raise(),
            Ok(incoming) => incoming,
            Err(e) => LinkError::from(e).raise(),
        }
    }

    fn reply(&mut self) -> Reply {
        match self.receive() {
            Incoming::Reply(r) => r,
            Incoming::Chunk(_) => LinkError::Unexpected("events where none were due".into()).raise(),
        }
    }

    fn answer(&mut self, conninfo: &str, lifetime: Duration, ask: Ask) -> Option<String> {
        self.ask(conninfo, lifetime, ask);
        match self.reply() {
            Reply::Answer(a) => a,
            other => unexpected(&other),
        }
    }

    /// As `Source::next_batch`; its events follow as chunks.
    pub fn next_batch(&mut self, conninfo: &str, lifetime: Duration, request: &BatchRequest) -> Option<BatchInfo> {
        self.ask(conninfo, lifetime, Ask::Next(request.clone()));
        match self.reply() {
            Reply::Batch(info) => {
                self.reading = info.is_some();
                self.received = 0;
                info
            }
            other => unexpected(&other),
        }
    }

    /// The rest of the batch's events are not wanted (it was written here before): they are
    /// read and dropped, so the helper reaches the batch's end and owes its finish.
    pub fn done_reading(&mut self) {
        while self.next_chunk(|_| ()).is_some() {}
    }

    pub fn register(&mut self, conninfo: &str, lifetime: Duration, queue: &str, consumer: &str) {
        self.answer(conninfo, lifetime, Ask::Register { queue: queue.into(), consumer: consumer.into() });
    }

    pub fn consumer_lag(&mut self, conninfo: &str, lifetime: Duration, queue: &str, consumer: &str) -> Option<String> {
        self.answer(conninfo, lifetime, Ask::Lag { queue: queue.into(), consumer: consumer.into() })
    }

    pub fn time_zone(&mut self, conninfo: &str, lifetime: Duration) -> String {
        self.answer(conninfo, lifetime, Ask::TimeZone).unwrap_or_default()
    }

    pub fn settle(&mut self, conninfo: &str, lifetime: Duration) {
        self.answer(conninfo, lifetime, Ask::Settle);
    }
}

impl Chunks for Helper {
    fn next_chunk<R>(&mut self, f: impl FnOnce(&[RawEvent]) -> R) -> Option<R> {
        if !self.reading {
            return None;
        }
        let received = self.received;
        match self.receive() {
            Incoming::Chunk(events) => {
                let n = events.len() as u64;
                let r = f(&events);
                self.received += n;
                Some(r)
            }
            Incoming::Reply(Reply::End { events }) if events == received => {
                self.reading = false;
                None
            }
            Incoming::Reply(Reply::End { events }) => LinkError::Short { received, events }.raise(),
            Incoming::Reply(other) => unexpected(&other),
        }
    }
}

/// Why the helper stops serving.
enum Stop {
    /// the writer is gone
    Detached,
    /// an ask failed
    Failed(SqlError),
}

impl From<SqlError> for Stop {
    fn from(e: SqlError) -> Stop {
        Stop::Failed(e)
    }
}

impl From<Detached> for Stop {
    fn from(_: Detached) -> Stop {
        Stop::Detached
    }
}

fn send(ends: &mut Ends, reply: &Reply) -> Result<(), Detached> {
    ends.send(&wire::encode(reply))
}

/// The next batch and its first chunk, read and encoded while the writer still wrote the last
/// one, for the writer's next ask if that asks for it (Source::read_early).
struct Early {
    request: BatchRequest,
    info: BatchInfo,
    messages: Vec<Vec<u8>>,
    events: u64,
}

/// One ask, answered; true when it was a batch sent to its end. `early`: what was read ahead
/// after the last batch, for this ask if it is the `Next` it was read for.
fn serve(source: &mut Source, ends: &mut Ends, ask: Ask, early: Option<Early>) -> Result<bool, Stop> {
    let answer = match ask {
        Ask::Next(request) => {
            let mut events = 0u64;
            match early {
                Some(e) if e.request == request => {
                    // the writer committed the last batch: its finish may be committed now
                    source.release_boundary();
                    send(ends, &Reply::Batch(Some(e.info)))?;
                    for m in &e.messages {
                        ends.send(m)?;
                    }
                    events = e.events;
                }
                // none, or read for other settings (a reload): next_batch lets it go
                _ => {
                    let info = source.next_batch(&request);
                    let batch = info.is_some();
                    send(ends, &Reply::Batch(info))?;
                    if !batch {
                        return Ok(false);
                    }
                }
            }
            let mut buf = Vec::new();
            while let Some(sent) = source.next_chunk(|chunk| {
                events += chunk.len() as u64;
                wire::encode_chunks(chunk, request.predecode, shm::MAX_CHUNK_MESSAGE, &mut buf, |m| ends.send(m))
            }) {
                sent?;
            }
            send(ends, &Reply::End { events })?;
            return Ok(true);
        }
        Ask::Register { queue, consumer } => {
            source.register(&queue, &consumer);
            None
        }
        Ask::Lag { queue, consumer } => source.consumer_lag(&queue, &consumer),
        Ask::TimeZone => Some(source.time_zone()),
        Ask::Settle => {
            source.settle();
            None
        }
    };
    send(ends, &Reply::Answer(answer))?;
    Ok(false)
}

/// While the writer writes the end of the batch just sent (up to the queue's size of events)
/// and commits it: the next batch's info and first chunk, so that its next `Next` is answered
/// at once instead of after a round trip to the source. Nothing is committed or finished here
/// (see Source::read_early).
fn read_early(source: &mut Source) -> Option<Early> {
    let (request, info) = source.read_early()?;
    let (mut messages, mut events, mut buf) = (Vec::new(), 0, Vec::new());
    source.next_chunk(|chunk| {
        events = chunk.len() as u64;
        wire::encode_chunks(chunk, request.predecode, shm::MAX_CHUNK_MESSAGE, &mut buf, |m| {
            messages.push(m.to_vec());
            Ok::<_, std::convert::Infallible>(())
        })
    });
    Some(Early { request, info, messages, events })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cube_dispatcher_helper_main(arg: pg_sys::Datum) {
    crate::worker::set_up_process();
    let Some((header, mut ends)) = Ends::attach_helper(arg) else { return };
    BackgroundWorker::connect_worker_to_spi_by_oid(
        Some(header.db),
        Some(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID)),
    );
    let job = header.job();
    crate::worker::settle_session(&job);
    // it never writes here: make sure of it
    let _ = crate::tx::in_transaction(|| {
        crate::spi::run("SELECT pg_catalog.set_config('default_transaction_read_only', 'on', false)", &[])
    });
    // SAFETY: a backend global, set at process start
    let pid = unsafe { pg_sys::MyProcPid };
    if send(&mut ends, &Reply::Hello { version: wire::VERSION.into(), pid }).is_err() {
        return;
    }
    let mut source: Option<Source> = None;
    // what was read early; an error there is the answer to the writer's next ask, which is
    // when the writer listens (it may be committing the last batch meanwhile)
    let mut early: Option<Result<Early, SqlError>> = None;
    while let Ok(message) = ends.receive() {
        let stop = match (wire::decode_request(message), early.take()) {
            (Ok(_), Some(Err(e))) => Some(Stop::Failed(e)),
            (Ok(asked), early_read) => {
                let lifetime = Duration::from_secs_f64(asked.lifetime_secs);
                let source = source.get_or_insert_with(|| Source::new(header.run_as, &asked.conninfo, lifetime));
                source.reconfigure(&asked.conninfo, lifetime);
                source.set_written_upto(asked.written_upto);
                // any ask but the Next it was read for lets the early batch go
                let early_read = early_read.and_then(Result::ok);
                match crate::tx::try_in_transaction(|| serve(source, &mut ends, asked.ask, early_read)) {
                    Ok(true) => {
                        early = crate::tx::try_in_transaction(|| Ok::<_, SqlError>(read_early(source))).transpose();
                        None
                    }
                    Ok(false) => None,
                    Err(stop) => Some(stop),
                }
            }
            (Err(e), _) => Some(Stop::Failed(SqlError {
                message: e.to_string(),
                code: PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
                transient: false,
            })),
        };
        match stop {
            None => continue,
            Some(Stop::Detached) => break,
            Some(Stop::Failed(e)) => {
                let _ = send(&mut ends, &Reply::Failed { sqlstate: e.code as i32, message: e.message });
                break;
            }
        }
    }
    // closing the connection rolls back a finish not committed yet: its batch comes again
    if let Some(mut source) = source {
        let _ = crate::tx::in_transaction(|| source.disconnect());
    }
}
