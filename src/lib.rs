//! cube_dispatcher: the Skytools PgQ consumer as a PostgreSQL background worker.
//!
//! An event's trip: source (dblink) -> decode -> route -> plan -> apply -> state (batch done, same
//! transaction) -> source (finish batch). worker drives it; api is what SQL calls.

pub mod config;
pub mod copy_in;
pub mod decode;
pub mod plan;
pub mod route;

pub mod api;
pub mod apply;
pub mod launcher;
pub mod roles;
pub mod source;
pub mod spi;
pub mod state;
pub mod worker;

::pgrx::pg_module_magic!(name, version);

/// Job settings are placeholders (`cube_dispatcher.<job>.<option>`) read by start(), so the
/// `cube_dispatcher` prefix is deliberately not reserved here.
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    launcher::register_gucs();
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        launcher::register_launcher();
    }
}

::pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", requires = [api::mask_password_sql]);
::pgrx::extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

// Only in builds for `cargo pgrx test` (feature pg_test), so plain `cargo test` stays server-free.
#[cfg(feature = "pg_test")]
#[path = "../pgrx-tests/mod.rs"]
mod pgrx_tests;

/// Used by `cargo pgrx test`: its cluster preloads the library as production setups do.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'cube_dispatcher'"]
    }
}
