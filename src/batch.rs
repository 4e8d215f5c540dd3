//! One batch, start to finish, in the order it happens: take the next batch from the source,
//! check its position against the tick recorded here, stream its chunks into the writer at the
//! pace the last failure asked for, park what could not be written, record the batch in the same
//! transaction. Its finish on the source commits only after that transaction has (source.rs).

use crate::apply::Created;
use crate::apply::{ApplyError, BatchWriter, Written};
use crate::config::{JobConfig, OnError};
use crate::event::Chunks;
use crate::feed::Feed;
use crate::part_time::Placement;
use crate::source::{BatchInfo, BatchRequest};
use crate::state;
use crate::tx::{try_in_transaction, SqlError};
use pgrx::prelude::*;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BatchError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("lost position: the source hands out batch {batch_id} starting at tick {prev_tick}, but the last tick applied here is {applied}; the consumer was re-registered or moved. Drop and re-create the job (cube_dispatcher.drop) to start from the queue's current position")]
    LostPosition { batch_id: i64, prev_tick: i64, applied: i64 },
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// Not retried: the job stops.
    #[error(transparent)]
    Unreadable(#[from] state::Unreadable),
    #[error("batch {batch_id}: {inner}")]
    InBatch { batch_id: i64, inner: Box<BatchError> },
}

impl BatchError {
    fn in_batch(self, batch_id: Option<i64>) -> BatchError {
        match batch_id {
            Some(batch_id) => BatchError::InBatch { batch_id, inner: Box::new(self) },
            None => self,
        }
    }

    fn apply_error(&self) -> Option<&ApplyError> {
        match self {
            BatchError::Apply(e) => Some(e),
            BatchError::InBatch { inner, .. } => inner.apply_error(),
            _ => None,
        }
    }
}

/// How a batch's events are written. Bulk is the normal way; the others are for retrying a
/// batch that failed because of its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Bulk,
    /// One event per statement, so the error names the event (on_error = retry).
    OneByOne,
    /// One event per subtransaction; failing events go to the dead-letter table (on_error =
    /// dead_letter).
    Isolating,
}

impl Pace {
    fn write(self, writer: &mut BatchWriter, chunks: &mut impl Chunks) -> Result<Written, ApplyError> {
        match self {
            Pace::Bulk => writer.write_bulk(chunks),
            Pace::OneByOne => writer.write_each(chunks, false),
            Pace::Isolating => writer.write_each(chunks, true),
        }
    }

    /// Sets events aside in dead letters, which keep them as stored, their time included.
    fn parks(self) -> bool {
        self == Pace::Isolating
    }

    /// The pace to retry a failed batch at right away, if another pace can get further: an error
    /// about the events (not the moment) is retried event by event, with on_error = dead_letter to
    /// set the bad ones aside, else to name the exact event. None: retry as is, after a backoff.
    pub fn after(self, err: &BatchError, on_error: OnError) -> Option<Pace> {
        let about_events = err.apply_error().filter(|e| !e.is_transient())?;
        match (on_error, self) {
            (OnError::DeadLetter, Pace::Bulk | Pace::OneByOne) => Some(Pace::Isolating),
            (OnError::Retry, Pace::Bulk) if matches!(about_events, ApplyError::Statement { .. }) => {
                Some(Pace::OneByOne)
            }
            _ => None,
        }
    }
}

/// Where a batch's time went, for the verbose log: says whether the source or the target is
/// the bottleneck.
#[derive(Debug, Default, Clone, Copy)]
pub struct Phases {
    /// waiting for the source: the batch and fetches not yet ready
    source: Duration,
    /// decoding and writing into the target
    write: Duration,
    /// the target commit (must reach disk before the source's finish commits)
    commit: Duration,
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "source {:.3} s, writing {:.3} s, commit {:.3} s",
            self.source.as_secs_f64(),
            self.write.as_secs_f64(),
            self.commit.as_secs_f64()
        )
    }
}

/// A batch that was done.
pub struct Done {
    pub batch_id: i64,
    pub events: i64,
    /// events set aside in cube_dispatcher.dead_letter
    pub parked: usize,
    /// partitions created for it
    pub created: Vec<Created>,
    /// it had been written and committed here before, but the source had not heard
    pub already_written: bool,
    pub took: Duration,
    pub phases: Phases,
    /// the source's TimeZone, as the batch reported it
    pub time_zone: Option<String>,
}

/// What the source is asked for: the job's queue settings, read the way this pace needs.
fn request(cfg: &JobConfig, pace: Pace) -> BatchRequest {
    BatchRequest {
        queue: cfg.pgq_queue_name.clone(),
        consumer: cfg.pgq_consumer_id.clone(),
        dateformat: cfg.suffix_format().map(str::to_string),
        min_lag: cfg.pgq_min_lag.as_ref().map(|i| i.0.clone()),
        min_count: cfg.pgq_min_count,
        min_interval: cfg.pgq_min_interval.as_ref().map(|i| i.0.clone()),
        ordered: cfg.mode.reads_in_ev_id_order(),
        with_time: pace.parks() || cfg.part_mode.reads_event_time(),
        predecode: !pace.parks(),
    }
}

/// Takes the next batch and does it; None when the queue has no batch ready. The batch's finish
/// on the source is committed after this returns, with the next batch's request (see source.rs).
pub fn run(
    source: &mut Feed,
    cfg: &JobConfig,
    role: pg_sys::Oid,
    pace: Pace,
    recent_eps: f64,
) -> Result<Option<Done>, BatchError> {
    let started = Instant::now();
    let mut batch_id = None;
    let written = try_in_transaction(|| {
        let Some(info) = source.next_batch(&request(cfg, pace)) else {
            return Ok(None);
        };
        batch_id = Some(info.batch_id);
        if already_written(cfg, &info)? {
            // Written by an earlier process, whose commit did not wait for the disk: the finish
            // that follows may only be committed once that commit is durable, and this
            // process's own last commit says nothing about it.
            crate::tx::commit_durable(crate::tx::wal_inserted_end());
            source.done_reading();
            return Ok(Some((info, None)));
        }
        let mut writer = BatchWriter::new(cfg, role, Placement::for_batch(cfg, &info))
            .with_catalog(crate::source::SourceCatalog::new(role, &cfg.src_db));
        let written = pace.write(&mut writer, source)?;
        source.done_reading();
        for (ev, why) in &written.parked {
            let suffix = writer.suffix_of(ev);
            state::dead_letter(&cfg.job_name, info.batch_id, suffix.as_deref(), ev, &why.to_string());
        }
        for p in &writer.created {
            state::record_partition(&cfg.job_name, p);
        }
        state::record_batch(&cfg.job_name, &info, written.events, &writer.skipped, recent_eps);
        // only now: until here the session's setting applies, to the finishes committed on the
        // source meanwhile (they wait for standbys as it says)
        crate::tx::commit_without_waiting();
        Ok(Some((info, Some((written, std::mem::take(&mut writer.created), Instant::now())))))
    })
    .map_err(|e: BatchError| e.in_batch(batch_id))?;
    let Some((info, written)) = written else { return Ok(None) };
    let committed = Instant::now();
    let already_written = written.is_none();
    let (written, created, body_done) = written.unwrap_or_else(|| (Written::default(), Vec::new(), committed));
    let phases = Phases {
        source: body_done.duration_since(started).saturating_sub(written.writing),
        write: written.writing,
        commit: committed.duration_since(body_done),
    };
    Ok(Some(Done {
        batch_id: info.batch_id,
        events: written.events,
        parked: written.parked.len(),
        created,
        already_written,
        took: started.elapsed(),
        phases,
        time_zone: Some(info.time_zone.clone()),
    }))
}

/// The position check that makes a batch apply once: the tick recorded here (in the transaction
/// that wrote the last batch) must be where this batch starts; if it is where this batch ends,
/// the batch was written and committed but the source never heard.
fn already_written(cfg: &JobConfig, info: &BatchInfo) -> Result<bool, BatchError> {
    match state::last_tick(&cfg.job_name) {
        Some(t) if t == info.tick_id => Ok(true),
        Some(t) if t != info.prev_tick_id => {
            Err(BatchError::LostPosition { batch_id: info.batch_id, prev_tick: info.prev_tick_id, applied: t })
        }
        _ => Ok(false),
    }
}
