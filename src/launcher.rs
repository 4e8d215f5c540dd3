//! Resuming jobs after a server start. Only when the library is in shared_preload_libraries: a
//! launcher worker lists the databases (cube_dispatcher.databases, default all that accept
//! connections) and starts, in each, a short-lived worker that launches the workers of the jobs
//! that were running (enabled) and exits.

use crate::state;
use crate::worker;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;

/// Called from _PG_init when preloaded.
pub fn register_launcher() {
    BackgroundWorkerBuilder::new("cube_dispatcher launcher")
        .set_type("cube_dispatcher launcher")
        .set_library("cube_dispatcher")
        .set_function("cube_dispatcher_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load();
}

/// Without a database connection SQL cannot run, so pg_database is scanned directly, as
/// PostgreSQL's autovacuum launcher does.
fn database_list() -> Vec<(pg_sys::Oid, String)> {
    let mut out = Vec::new();
    // SAFETY: a catalog scan as the autovacuum launcher does it, inside the transaction the
    // caller opened; the tuple's struct is read before the next heap_getnext
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            let db = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tup);
            if db.datallowconn && !db.datistemplate {
                let name = std::ffi::CStr::from_ptr(db.datname.data.as_ptr()).to_string_lossy().into_owned();
                out.push((db.oid, name));
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    out
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cube_dispatcher_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: only the shared catalogs (pg_database) are readable.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let wanted: Option<Vec<String>> = crate::gucs::DATABASES
        .get()
        .and_then(|s| s.to_str().ok().map(str::to_string))
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.split(',').map(|d| d.trim().to_string()).collect());
    let dbs = BackgroundWorker::transaction(database_list);
    for (oid, name) in dbs {
        if wanted.as_ref().is_some_and(|w| !w.contains(&name)) {
            continue;
        }
        let started = BackgroundWorkerBuilder::new(&format!("cube_dispatcher resume {name}"))
            .set_type("cube_dispatcher resume")
            .set_library("cube_dispatcher")
            .set_function("cube_dispatcher_resume_main")
            .set_argument(Some(pg_sys::Datum::from(oid.to_u32())))
            .enable_spi_access()
            .set_restart_time(None)
            // SAFETY: a backend global, set at process start
            .set_notify_pid(unsafe { pg_sys::MyProcPid })
            .load_dynamic();
        // one database at a time, so a cluster with many databases does not exhaust worker slots
        if let Ok(w) = started {
            let _ = w.wait_for_shutdown();
        } else {
            warning!("cube_dispatcher: no background worker slot to resume jobs in database {name}");
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cube_dispatcher_resume_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(arg.value() as u32)), None);
    let jobs: Vec<String> = BackgroundWorker::transaction(|| {
        // this session runs as a superuser: the database's search_path must not reach it
        crate::roles::pin_search_path();
        let installed: Option<bool> =
            crate::spi::value("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'cube_dispatcher')", &[]);
        if installed != Some(true) {
            return Vec::new();
        }
        Spi::connect(|c| {
            let rows =
                c.select("SELECT job_name FROM cube_dispatcher.job WHERE enabled ORDER BY job_name", None, &[])?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r.get::<String>(1)?.unwrap_or_default());
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .unwrap_or_default()
    });
    for job in jobs {
        let running = BackgroundWorker::transaction(|| state::live_pid(&job));
        if running.is_none() {
            match BackgroundWorker::transaction(|| worker::launch(&job)) {
                Ok(pid) => log!("cube_dispatcher: resumed job {job} (pid {pid})"),
                Err(e) => warning!("cube_dispatcher: cannot resume job {job}: {e}"),
            }
        }
    }
}
