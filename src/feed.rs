//! Where a writer's batches come from: its own source connection, or a receiving helper process
//! that holds that connection (helper.rs). The writer sees the same calls either way; a job that
//! wants a helper but cannot have one (no worker slot, no shared memory) runs without, and says
//! so once.

use crate::config::{HelperUse, JobConfig};
use crate::event::{Chunks, RawEvent};
use crate::helper::Helper;
use crate::source::{BatchInfo, BatchRequest, Source};
use pgrx::prelude::*;
use std::time::Duration;

pub enum Feed {
    /// this process reads the source
    Here(Box<Source>),
    /// a helper reads it; started when first needed, and again after a failed batch
    Helper(Remote),
}

pub struct Remote {
    job: String,
    role: pg_sys::Oid,
    conninfo: String,
    lifetime: Duration,
    wanted: HelperUse,
    running: Option<Helper>,
}

impl Feed {
    pub fn new(cfg: &JobConfig, role: pg_sys::Oid) -> Feed {
        let lifetime = Duration::from_secs_f64(cfg.connection_lifetime);
        if cfg.helper.wanted() {
            Feed::Helper(Remote {
                job: cfg.job_name.clone(),
                role,
                conninfo: cfg.src_db.clone(),
                lifetime,
                wanted: cfg.helper,
                running: None,
            })
        } else {
            Feed::Here(Box::new(Source::new(role, &cfg.src_db, lifetime)))
        }
    }

    pub fn reconfigure(&mut self, conninfo: &str, lifetime: Duration) {
        match self {
            Feed::Here(source) => source.reconfigure(conninfo, lifetime),
            Feed::Helper(r) => {
                r.conninfo = conninfo.to_string();
                r.lifetime = lifetime;
            }
        }
    }

    /// The running helper, started if need be; None: this process reads the source (from now
    /// on, if the helper could not be started).
    fn helper(&mut self) -> Option<(&mut Helper, &str, Duration)> {
        let Feed::Helper(r) = self else { return None };
        if r.running.is_none() {
            match Helper::start(&r.job, r.role) {
                Ok(h) => r.running = Some(h),
                Err(why) => {
                    let msg = format!("cube_dispatcher job {}: reading the source in this process: {why}", r.job);
                    if r.wanted == HelperUse::On {
                        warning!("{msg}");
                    } else {
                        log!("{msg}");
                    }
                    *self = Feed::Here(Box::new(Source::new(r.role, &r.conninfo, r.lifetime)));
                    return None;
                }
            }
        }
        let Feed::Helper(r) = self else { unreachable!() };
        Some((r.running.as_mut().expect("started above"), &r.conninfo, r.lifetime))
    }

    fn source(&mut self) -> &mut Source {
        match self {
            Feed::Here(source) => source,
            Feed::Helper(_) => unreachable!("a feed with a helper has no source here"),
        }
    }

    pub fn next_batch(&mut self, request: &BatchRequest) -> Option<BatchInfo> {
        match self.helper() {
            Some((h, conninfo, lifetime)) => h.next_batch(conninfo, lifetime, request),
            None => self.source().next_batch(request),
        }
    }

    pub fn done_reading(&mut self) {
        match self {
            Feed::Here(source) => source.done_reading(),
            Feed::Helper(r) => r.running.iter_mut().for_each(Helper::done_reading),
        }
    }

    pub fn register(&mut self, queue: &str, consumer: &str) {
        match self.helper() {
            Some((h, conninfo, lifetime)) => h.register(conninfo, lifetime, queue, consumer),
            None => self.source().register(queue, consumer),
        }
    }

    pub fn consumer_lag(&mut self, queue: &str, consumer: &str) -> Option<String> {
        match self.helper() {
            Some((h, conninfo, lifetime)) => h.consumer_lag(conninfo, lifetime, queue, consumer),
            None => self.source().consumer_lag(queue, consumer),
        }
    }

    pub fn time_zone(&mut self) -> String {
        match self.helper() {
            Some((h, conninfo, lifetime)) => h.time_zone(conninfo, lifetime),
            None => self.source().time_zone(),
        }
    }

    /// As `Source::settle`: between batches, after the target's commit.
    pub fn settle(&mut self) {
        match self {
            Feed::Here(source) => source.settle(),
            Feed::Helper(Remote { running: Some(h), conninfo, lifetime, .. }) => h.settle(conninfo, *lifetime),
            Feed::Helper(_) => {}
        }
    }

    /// As `Source::disconnect`: what was not committed on the source is undone. A helper is
    /// let go and waited for.
    pub fn disconnect(&mut self) {
        match self {
            Feed::Here(source) => source.disconnect(),
            Feed::Helper(r) => {
                if let Some(h) = r.running.take() {
                    h.abandon();
                }
            }
        }
    }
}

impl Chunks for Feed {
    fn next_chunk<R>(&mut self, f: impl FnOnce(&[RawEvent]) -> R) -> Option<R> {
        match self {
            Feed::Here(source) => source.next_chunk(f),
            Feed::Helper(r) => r.running.as_mut()?.next_chunk(f),
        }
    }
}
