//! Bulk insert through PostgreSQL's own COPY FROM machinery, fed from memory by a callback, the way
//! logical replication's initial table sync feeds it. COPY does the type input and batches heap
//! inserts; it runs BEFORE/AFTER triggers and routes into declarative partitions like COPY does.
//! It skips COPY's permission and row-security checks, so the caller checks (see `usable`).

use crate::decode::Encoded;
use pgrx::prelude::*;
use std::ffi::{c_int, c_void, CString};

/// COPY text format of one value, decoded straight from its url encoding: NULL is \N;
/// backslash, newline, CR and tab are escaped.
pub fn push_value(buf: &mut Vec<u8>, v: Option<Encoded>) {
    match v {
        None => buf.extend_from_slice(b"\\N"),
        Some(e) => match e.copy_plain() {
            // the common case, copied in one go
            Some(p) => buf.extend_from_slice(p.as_bytes()),
            None if e.copy_safe() => e.decode_into(buf),
            None => e.decode_each(|b| match b {
                b'\\' => buf.extend_from_slice(b"\\\\"),
                b'\n' => buf.extend_from_slice(b"\\n"),
                b'\r' => buf.extend_from_slice(b"\\r"),
                b'\t' => buf.extend_from_slice(b"\\t"),
                _ => buf.push(b),
            }),
        },
    }
}

/// Refills the COPY text buffer (handed over empty) once it is used up; false: nothing more.
pub type More<'m> = &'m mut Refill<'m>;
pub type Refill<'m> = dyn FnMut(&mut Vec<u8>) -> bool + 'm;

/// The data being fed to the COPY in progress. The callback has no argument for it, so it is a
/// process global; a backend runs one COPY at a time. It points into `copy_rows`' stack frame,
/// which `FeedGuard` empties it before leaving, however it leaves.
struct Feed {
    data: *mut Vec<u8>,
    pos: usize,
    more: Option<*mut Refill<'static>>,
}
const NO_FEED: Feed = Feed { data: std::ptr::null_mut(), pos: 0, more: None };
static mut FEED: Feed = NO_FEED;

struct FeedGuard;

impl Drop for FeedGuard {
    fn drop(&mut self) {
        // SAFETY: a backend is single-threaded; nothing reads FEED outside CopyFrom
        unsafe { FEED = NO_FEED };
    }
}

// pg_guard: `more` reads the next chunk from the source, which may raise a PostgreSQL error;
// it must leave through PostgreSQL's error path, not unwind through CopyFrom.
#[pg_guard]
unsafe extern "C-unwind" fn read_feed(outbuf: *mut c_void, _minread: c_int, maxread: c_int) -> c_int {
    // SAFETY: only CopyFrom calls this, during copy_rows, while FEED points at that call's live
    // buffer and refill closure; CopyFrom hands an `outbuf` of at least `maxread` bytes.
    unsafe {
        // through a raw pointer: a plain `&mut FEED` is a reference to a static mut
        #[allow(clippy::deref_addrof)]
        let feed = &mut *(&raw mut FEED);
        let data = &mut *feed.data;
        while feed.pos == data.len() {
            let Some(more) = feed.more else { return 0 };
            data.clear();
            feed.pos = 0;
            if !(*more)(data) {
                return 0;
            }
        }
        let n = (data.len() - feed.pos).min(maxread as usize);
        std::ptr::copy_nonoverlapping(data.as_ptr().add(feed.pos), outbuf as *mut u8, n);
        feed.pos += n;
        n as c_int
    }
}

/// True when this role may INSERT into the table and row security does not apply to it: then the
/// COPY path is equivalent to INSERT. Otherwise callers use a plain INSERT, which checks both.
pub fn usable(relid: pg_sys::Oid) -> bool {
    // SAFETY: ACL and row-security checks by oid, inside the caller's transaction
    unsafe {
        let user = pg_sys::GetUserId();
        pg_sys::pg_class_aclcheck(relid, user, pg_sys::ACL_INSERT as pg_sys::AclMode) == pg_sys::AclResult::ACLCHECK_OK
            && pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, true)
                != pg_sys::CheckEnableRlsResult::RLS_ENABLED as c_int
    }
}

/// Copies `data` (COPY text format, UTF-8, one line per row, `columns` in order) into the table,
/// then whatever `more` refills it with. One COPY for many chunks matters: each COPY starts a new
/// 16 MB ring of shared buffers, so COPYs of one chunk each would leave every page written behind
/// in the worker's memory map. Errors are raised as PostgreSQL errors, like COPY's own.
pub fn copy_rows(relid: pg_sys::Oid, columns: &[&str], mut data: Vec<u8>, more: Option<More>) -> u64 {
    // SAFETY: the relation is opened and locked before COPY runs on it and closed (lock kept to
    // the end of the transaction, as COPY does) after; the parse state and lists are palloc'd in
    // the current memory context; FEED is set for CopyFrom only and cleared by the guard.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(relid, lock);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        pg_sys::addRangeTableEntryForRelation(pstate, rel, lock, std::ptr::null_mut(), false, false);
        let mut attnames: *mut pg_sys::List = std::ptr::null_mut();
        for c in columns {
            let name = CString::new(*c).expect("column name without NUL");
            attnames = pg_sys::lappend(attnames, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        }
        let encoding = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"encoding".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(c"UTF8".as_ptr())).cast(),
            -1,
        );
        let options = pg_sys::lappend(std::ptr::null_mut(), encoding.cast());
        // the 'static is a lie FEED needs; the guard ends it before `more` goes out of scope
        let more = more.map(|m| std::mem::transmute::<*mut Refill<'_>, *mut Refill<'static>>(m));
        FEED = Feed { data: &mut data, pos: 0, more };
        let _clear = FeedGuard;
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            rel,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(read_feed),
            attnames,
            options,
        );
        let n = pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        pg_sys::free_parsestate(pstate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::push_value;
    use crate::decode::parse_row;

    /// The COPY text of each value of ev_data, each followed by '|'.
    fn copy_text(ev_data: &str) -> String {
        let mut buf = Vec::new();
        for (_, v) in &parse_row(crate::decode::Format::Url, Some(ev_data)).unwrap() {
            push_value(&mut buf, *v);
            buf.push(b'|');
        }
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn values_become_copy_text() {
        assert_eq!(copy_text("a=x%09y%0az%5c&b&c=&d=%e2%82%ac+1"), "x\\ty\\nz\\\\|\\N||€ 1|");
    }

    #[test]
    fn raw_special_bytes_are_escaped_too() {
        // hand-made events may carry bytes logutriga would have escaped; plain ones go as they are
        assert_eq!(copy_text("a=x\ty&b=c\\d&c=plain&d=%c3%a4"), "x\\ty|c\\\\d|plain|ä|");
    }
}
