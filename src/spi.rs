//! Two small SPI helpers: a single value (None for no row or NULL) and a statement. SPI-level
//! failures are programming errors here and are raised as PostgreSQL errors.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

pub fn value<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Option<T> {
    // read-write mode: some callers lock rows or call volatile functions (dblink)
    Spi::connect_mut(|c| {
        let rows = c.update(sql, Some(1), args)?;
        if rows.is_empty() {
            Ok(None)
        } else {
            rows.first().get_one::<T>()
        }
    })
    .unwrap_or_else(|e| fail(e))
}

pub fn run(sql: &str, args: &[DatumWithOid]) {
    Spi::run_with_args(sql, args).unwrap_or_else(|e| fail(e))
}

pub fn fail(e: pgrx::spi::Error) -> ! {
    error!("cube_dispatcher: SPI failed: {e}")
}
