//! Whose rights things run with, and the name resolution that goes with them.
//!
//! The SQL API is SECURITY DEFINER (it keeps the extension's own tables private) and the worker
//! connects as the bootstrap superuser for its bookkeeping; but everything an event can influence
//! — reading the source through dblink and writing rows and partitions — runs as the role that
//! started the job, so an event can only write what that role may write, and dblink applies its
//! password rule to non-superusers.
//!
//! Every SQL text this extension runs with more rights than its caller resolves names through
//! SAFE_SEARCH_PATH and nothing else:
//! - the SECURITY DEFINER functions carry it on their definition (`#[search_path(pg_catalog,
//!   pg_temp)]`; a test checks every such function of the extension has exactly this setting),
//!   and set it themselves too (`with_safe_search_path`), for installations whose definitions
//!   predate the clause;
//! - the worker and resume sessions set it first thing (`pin_search_path`), over whatever the
//!   database or role defaults say;
//! - code run as the job's role goes through `as_role`, which rolls back every setting that code
//!   changed, so a template cannot leave another path behind for the bookkeeping after it.
//!
//! Why: an unqualified name (`now()`, `=`, `format(...)`) is looked up along the search_path, and
//! any role that can create objects in a schema on that path (typically `public`) can plant a
//! better match that then runs with our rights (CVE-2018-1058). `pg_catalog` comes first so no
//! built-in can be shadowed; `pg_temp` is named last, because left out it would be searched
//! first for tables, and it is never searched for functions or operators. Our own objects and
//! dblink's are always named with their schema.

use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::panic::AssertUnwindSafe;

/// See the module comment; keep in sync with the `#[search_path]` of the functions in api.rs.
pub const SAFE_SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// Runs `f` with SAFE_SEARCH_PATH, restored afterwards, the way a function's `SET search_path`
/// clause works (fmgr_security_definer). The control functions carry that clause as well; this
/// keeps them safe where it is missing — a 0.1.0 installation running this library before
/// `ALTER EXTENSION ... UPDATE`. On error the (sub)transaction abort restores the path.
pub fn with_safe_search_path<R>(f: impl FnOnce() -> R) -> R {
    let path = std::ffi::CString::new(SAFE_SEARCH_PATH).expect("no NUL");
    // SAFETY: a GUC nest level opened here and closed below on the normal path (by the abort
    // otherwise); GUC_ACTION_SAVE is what fmgr uses for a function's SET clause
    let nest = unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            path.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        nest
    };
    let r = f();
    // SAFETY: closes the nest level opened above, restoring the caller's path
    unsafe { pg_sys::AtEOXact_GUC(true, nest) };
    r
}

/// For the worker's and the resume worker's sessions: a session setting, so it outlives the
/// transaction; `as_role` keeps code of the job's role from changing it.
pub fn pin_search_path() {
    crate::spi::run(&format!("SET search_path TO {SAFE_SEARCH_PATH}"), &[]);
}

/// The role that called the API function (SET ROLE counts; the function's owner does not).
pub fn caller() -> pg_sys::Oid {
    // SAFETY: reads a backend global that is always set once the session is initialized
    unsafe { pg_sys::GetOuterUserId() }
}

pub fn name(role: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId with noerr = true returns NULL for an unknown role, else a
    // palloc'd C string valid in the current memory context
    unsafe {
        let p = pg_sys::GetUserNameFromId(role, true);
        if p.is_null() {
            format!("role {}", role.to_u32())
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// Superusers manage every job; other roles the jobs of roles they are members of.
pub fn may_manage(role: pg_sys::Oid, job_owner: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups by oid; called inside a transaction
    unsafe { pg_sys::superuser_arg(role) || pg_sys::is_member_of_role(role, job_owner) }
}

/// Runs `f` with `role`'s privileges, the way PostgreSQL runs code of a less trusted user
/// (SwitchToUntrustedUser in PostgreSQL 16, the index and vacuum code in 15): as a
/// security-restricted operation, so it cannot SET ROLE back, create temporary objects or
/// otherwise change the session, and in a GUC nest level of its own whose changes are rolled
/// back afterwards, so a `SET search_path` in a template, a trigger or a function it calls does
/// not outlive it. On error the (sub)transaction abort that follows undoes both.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: saving and switching the current user id is what SECURITY DEFINER calls do; the
    // saved pair is restored on every exit path below (finally), and the nest level is left
    // only by AtEOXact_GUC or by the abort of the transaction it belongs to.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        let restricted = pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION;
        pg_sys::SetUserIdAndSecContext(role, context | restricted as i32);
        pg_sys::NewGUCNestLevel()
    };
    let r = PgTryBuilder::new(AssertUnwindSafe(f))
        // SAFETY: restores the pair saved above
        .finally(|| unsafe { pg_sys::SetUserIdAndSecContext(user, context) })
        .execute();
    // SAFETY: only reached on a normal return; rolls back this nest level and any deeper one
    // that an error caught inside f left open, as PostgreSQL's own callers do
    unsafe { pg_sys::AtEOXact_GUC(false, nest) };
    r
}
