//! Transactions and the errors that come out of them: the one place that turns a PostgreSQL error
//! raised inside Rust code into a value (keeping its SQLSTATE), and that starts, commits and rolls
//! back (sub)transactions. Everything else returns typed errors; the SQL edge (api.rs) raises them.

use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::panic::AssertUnwindSafe;

/// A PostgreSQL error caught in our code, with its SQLSTATE. `transient` errors (lost
/// connections, lock timeouts, deadlocks, shutdown, resource shortages) are about the moment, not
/// the data: they fail a batch, never an event.
#[derive(Debug, Clone)]
pub struct SqlError {
    pub message: String,
    pub code: PgSqlErrorCode,
    pub transient: bool,
}

impl SqlError {
    /// An SPI-level failure (not a PostgreSQL error): a bug here, never the data's fault.
    pub fn internal(e: pgrx::spi::Error) -> SqlError {
        SqlError { message: e.to_string(), code: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, transient: false }
    }

    fn caught(e: &pg_sys::panic::CaughtError) -> SqlError {
        use pg_sys::panic::CaughtError::*;
        match e {
            PostgresError(r) | ErrorReport(r) => {
                let mut message = r.message().to_string();
                if let Some(d) = r.detail() {
                    message.push_str(&format!(" ({d})"));
                }
                let code = r.sql_error_code();
                SqlError { message, code, transient: transient_class(code) }
            }
            RustPanic { ereport: r, .. } => SqlError {
                message: r.message().to_string(),
                code: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                transient: false,
            },
        }
    }
}

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SqlError {}

/// SQLSTATE classes of errors that are about the moment, not the data.
fn transient_class(code: PgSqlErrorCode) -> bool {
    let code = code as i32;
    let class = [((code & 0x3F) as u8 + b'0') as char, (((code >> 6) & 0x3F) as u8 + b'0') as char];
    matches!(class, ['0', '8'] | ['4', '0'] | ['5', '3'] | ['5', '5'] | ['5', '7'] | ['5', '8'] | ['X', 'X'])
}

/// Runs `f`; a PostgreSQL error raised inside becomes Err. Only for code whose (sub)transaction
/// is rolled back, or whose error is raised again, right after an error.
pub fn catching<R>(f: impl FnOnce() -> Result<R, SqlError>) -> Result<R, SqlError> {
    PgTryBuilder::new(AssertUnwindSafe(f)).catch_others(|e| Err(SqlError::caught(&e))).execute()
}

/// Runs `f` in its own transaction, committed when it returns. A PostgreSQL error raised inside
/// rolls it back and comes back as Err. For background workers, which have no transaction
/// around them.
pub fn in_transaction<R>(f: impl FnOnce() -> R) -> Result<R, SqlError> {
    try_in_transaction(|| Ok::<R, SqlError>(f()))
}

/// Like `in_transaction`, for work with errors of its own: an Err returned rolls the transaction
/// back too, and a PostgreSQL error comes back as `E::from(SqlError)`.
pub fn try_in_transaction<R, E: From<SqlError>>(f: impl FnOnce() -> Result<R, E>) -> Result<R, E> {
    // SAFETY: the worker is between transactions here (this is its only way in); an active
    // snapshot is pushed for the statements inside and popped before the commit.
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
    .catch_others(|e| Err(E::from(SqlError::caught(&e))))
    .execute();
    if result.is_err() {
        // SAFETY: rolls back whatever is open, as PostgreSQL's own error recovery does
        unsafe { pg_sys::AbortOutOfAnyTransaction() };
    }
    result
}

/// Why a subtransaction was rolled back.
#[derive(Debug)]
pub enum SubError<E> {
    /// `f` returned this error
    Returned(E),
    /// PostgreSQL raised this inside `f`
    Raised(SqlError),
}

/// Runs `f` in a subtransaction: on any error (raised or returned) only its work is rolled back.
/// The slow path for isolating failing events; never used on the bulk path.
pub fn in_subtransaction<R, E>(f: impl FnOnce() -> Result<R, E>) -> Result<R, SubError<E>> {
    // SAFETY: the subtransaction is begun and ended here on every path; the caller's memory
    // context and resource owner are restored afterwards, as PL/pgSQL's exception blocks do.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let r = PgTryBuilder::new(AssertUnwindSafe(|| f().map_err(SubError::Returned)))
            .catch_others(|e| Err(SubError::Raised(SqlError::caught(&e))))
            .execute();
        if r.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        r
    }
}

/// This transaction's commit does not wait for its WAL to reach disk (synchronous_commit off, for
/// this transaction only): a batch's commit would otherwise keep the worker idle for a disk
/// flush every batch. What depends on the commit being durable (the source's finish of the
/// batch) waits for it with `commit_durable` instead, by which time the WAL writer has
/// usually flushed it.
pub fn commit_without_waiting() {
    crate::spi::run("SELECT pg_catalog.set_config('synchronous_commit', 'off', true)", &[]);
}

/// The WAL end of this process's last commit that wrote any (0: none yet).
pub fn last_commit_end() -> u64 {
    // SAFETY: this backend's own global, set by its commits
    unsafe { pg_sys::XactLastCommitEnd }
}

/// Where WAL inserted so far by any process ends: past every commit made so far, also those of
/// processes gone since.
pub fn wal_inserted_end() -> u64 {
    // SAFETY: reads the insert position under its spinlock; legal in any backend at any time
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// Waits until the WAL up to `lsn` (a commit's end, of this process or of another) is on disk,
/// and at synchronous standbys as the session's synchronous_commit asks: what a synchronous
/// commit would have waited for.
pub fn commit_durable(lsn: u64) {
    // SAFETY: XLogFlush and SyncRepWaitForLSN are what commit itself calls with its own LSN,
    // legal at any time in a normal backend, for any LSN already written (a commit's end is),
    // and both return at once when there is nothing to wait for
    unsafe {
        if lsn != 0 {
            pg_sys::XLogFlush(lsn);
            pg_sys::SyncRepWaitForLSN(lsn, true);
        }
    }
}
