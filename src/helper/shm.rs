//! The two queues between a writer and its helper, in one dynamic shared memory segment:
//! PostgreSQL's shm_mq, as parallel query uses it. The writer creates the segment and starts the
//! helper with its handle; each end detaches when it is done or dies (PostgreSQL detaches at
//! exit), and the other end's next send or receive then says so instead of waiting forever.

use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::ptr::null_mut;

const MAGIC: u64 = 0x6375_6265_5f64_6973; // "cube_dis"
/// writer → helper: requests, a few hundred bytes each
const ASK_SIZE: usize = 64 << 10;
/// helper → writer: events. Some 25,000 events of read-ahead; the helper waits when it is full.
const EVENTS_SIZE: usize = 8 << 20;
const HEADER_SIZE: usize = 128;
const SEGMENT_SIZE: usize = HEADER_SIZE + ASK_SIZE + EVENTS_SIZE;
/// Events are sent in messages of at most about this size: a message that fits in a quarter of
/// the ring is read in place, a bigger one is copied out first.
pub const MAX_CHUNK_MESSAGE: usize = EVENTS_SIZE / 4;

/// What the helper needs to know before it can connect.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    magic: u64,
    pub db: pg_sys::Oid,
    pub run_as: pg_sys::Oid,
    job: [u8; 64],
}

impl Header {
    pub fn new(db: pg_sys::Oid, run_as: pg_sys::Oid, job: &str) -> Header {
        let mut name = [0u8; 64];
        // job names are at most 40 bytes (config::validate_job_name)
        name[..job.len().min(63)].copy_from_slice(&job.as_bytes()[..job.len().min(63)]);
        Header { magic: MAGIC, db, run_as, job: name }
    }

    pub fn job(&self) -> String {
        let end = self.job.iter().position(|&b| b == 0).unwrap_or(self.job.len());
        String::from_utf8_lossy(&self.job[..end]).into_owned()
    }
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);

/// The other end went away (exited, or detached after an error).
#[derive(Debug)]
pub struct Detached;

/// One end of the pair of queues.
pub struct Ends {
    seg: *mut pg_sys::dsm_segment,
    send: *mut pg_sys::shm_mq_handle,
    receive: *mut pg_sys::shm_mq_handle,
}

/// The writer's side, before the helper is started: the segment with its queues.
pub struct Created {
    seg: *mut pg_sys::dsm_segment,
}

impl Created {
    /// None when no segment can be had (max segments reached).
    pub fn new(header: Header) -> Option<Created> {
        // SAFETY: dsm_create returns a mapped segment of the size asked (or NULL with this flag);
        // pinning its mapping takes it from the transaction's resource owner, so it lives until
        // detached; the header and both queues are laid out inside it at MAXALIGNed offsets, and
        // this process (MyProc, valid in any connected backend) is the asks' sender and the
        // events' receiver
        unsafe {
            let seg = pg_sys::dsm_create(SEGMENT_SIZE, pg_sys::DSM_CREATE_NULL_IF_MAXSEGMENTS as i32);
            if seg.is_null() {
                return None;
            }
            pg_sys::dsm_pin_mapping(seg);
            let base = pg_sys::dsm_segment_address(seg) as *mut u8;
            (base as *mut Header).write(header);
            let ask = pg_sys::shm_mq_create(base.add(HEADER_SIZE).cast(), ASK_SIZE);
            pg_sys::shm_mq_set_sender(ask, pg_sys::MyProc);
            let events = pg_sys::shm_mq_create(base.add(HEADER_SIZE + ASK_SIZE).cast(), EVENTS_SIZE);
            pg_sys::shm_mq_set_receiver(events, pg_sys::MyProc);
            Some(Created { seg })
        }
    }

    /// What the helper is started with: the segment's handle.
    pub fn handle(&self) -> pg_sys::Datum {
        // SAFETY: the segment is attached
        pg_sys::Datum::from(unsafe { pg_sys::dsm_segment_handle(self.seg) })
    }

    /// The writer's ends, once the helper is registered: waits on them end when it stops.
    pub fn attach(self, helper: *mut pg_sys::BackgroundWorkerHandle) -> Ends {
        let seg = self.seg;
        std::mem::forget(self);
        // SAFETY: the queues were created in this segment by `new`; the handles are allocated
        // in TopMemoryContext, as they outlive the transaction
        unsafe { Ends::attach(seg, helper, true) }
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        // SAFETY: attached in `new`, and not handed on (attach forgets self)
        unsafe { pg_sys::dsm_detach(self.seg) }
    }
}

impl Ends {
    /// SAFETY: `seg` is attached and holds the queues at their offsets, with this process set
    /// as the sender of the one it sends on.
    unsafe fn attach(seg: *mut pg_sys::dsm_segment, peer: *mut pg_sys::BackgroundWorkerHandle, writer: bool) -> Ends {
        unsafe {
            let base = pg_sys::dsm_segment_address(seg) as *mut u8;
            let ask = base.add(HEADER_SIZE) as *mut pg_sys::shm_mq;
            let events = base.add(HEADER_SIZE + ASK_SIZE) as *mut pg_sys::shm_mq;
            let (send, receive) = if writer { (ask, events) } else { (events, ask) };
            PgMemoryContexts::TopMemoryContext.switch_to(|_| Ends {
                seg,
                send: pg_sys::shm_mq_attach(send, seg, peer),
                receive: pg_sys::shm_mq_attach(receive, seg, peer),
            })
        }
    }

    /// The helper's ends; None when the writer is already gone or the segment is not ours.
    pub fn attach_helper(handle: pg_sys::Datum) -> Option<(Header, Ends)> {
        // SAFETY: a segment's handle as the writer passed it; dsm_attach returns NULL if it no
        // longer exists; the magic number checks it is our layout before anything else is read
        unsafe {
            let seg = pg_sys::dsm_attach(handle.value() as u32);
            if seg.is_null() {
                return None;
            }
            pg_sys::dsm_pin_mapping(seg);
            let base = pg_sys::dsm_segment_address(seg) as *mut u8;
            let header = (base as *const Header).read();
            if header.magic != MAGIC {
                pg_sys::dsm_detach(seg);
                return None;
            }
            pg_sys::shm_mq_set_receiver(base.add(HEADER_SIZE).cast(), pg_sys::MyProc);
            pg_sys::shm_mq_set_sender(base.add(HEADER_SIZE + ASK_SIZE).cast(), pg_sys::MyProc);
            // no handle for the writer: its exit detaches the segment, which ends our waits
            Some((header, Ends::attach(seg, null_mut(), false)))
        }
    }

    /// Sends one message, waiting for room; it is visible to the other end at once.
    pub fn send(&mut self, message: &[u8]) -> Result<(), Detached> {
        // SAFETY: the handle is attached; shm_mq_send copies the bytes and waits on our latch
        // with interrupts checked (SIGTERM ends the process there, postmaster death too)
        let r = unsafe { pg_sys::shm_mq_send(self.send, message.len(), message.as_ptr().cast(), false, true) };
        match r {
            pg_sys::shm_mq_result::SHM_MQ_SUCCESS => Ok(()),
            _ => Err(Detached),
        }
    }

    /// Waits for the next message. It stays valid until the next receive: the borrow of self
    /// keeps it so.
    pub fn receive(&mut self) -> Result<&[u8], Detached> {
        let mut len = 0usize;
        let mut data: *mut std::ffi::c_void = null_mut();
        // SAFETY: as send; the message is in the ring or the handle's buffer until the next
        // receive on this handle
        let r = unsafe { pg_sys::shm_mq_receive(self.receive, &mut len, &mut data, false) };
        match r {
            // SAFETY: shm_mq_receive returned a message of `len` bytes at `data`
            pg_sys::shm_mq_result::SHM_MQ_SUCCESS => Ok(unsafe { std::slice::from_raw_parts(data as *const u8, len) }),
            _ => Err(Detached),
        }
    }
}

impl Drop for Ends {
    fn drop(&mut self) {
        // SAFETY: the handles point into the segment, so they go first; each is detached once.
        // Detaching tells the other end (its waits end with SHM_MQ_DETACHED).
        unsafe {
            pg_sys::shm_mq_detach(self.send);
            pg_sys::shm_mq_detach(self.receive);
            pg_sys::dsm_detach(self.seg);
        }
    }
}
