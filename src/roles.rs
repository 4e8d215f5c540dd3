//! Whose rights things run with. The SQL API is SECURITY DEFINER (it keeps the extension's own
//! tables private) and the worker connects as the bootstrap superuser for its bookkeeping; but
//! everything an event can influence — reading the source through dblink and writing rows and
//! partitions — runs as the role that started the job, so an event can only write what that
//! role may write, and dblink applies its password rule to non-superusers.

use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::panic::AssertUnwindSafe;

/// The role that called the API function (SET ROLE counts; the function's owner does not).
pub fn caller() -> pg_sys::Oid {
    unsafe { pg_sys::GetOuterUserId() }
}

pub fn name(role: pg_sys::Oid) -> String {
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
    unsafe { pg_sys::superuser_arg(role) || pg_sys::is_member_of_role(role, job_owner) }
}

/// Runs `f` with `role`'s privileges, restoring the previous user afterwards, also on error.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    PgTryBuilder::new(AssertUnwindSafe(f))
        .finally(|| unsafe { pg_sys::SetUserIdAndSecContext(user, context) })
        .execute()
}
