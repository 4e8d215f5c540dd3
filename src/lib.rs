//! cube_dispatcher: the Skytools PgQ consumer as a PostgreSQL background worker.
//!
//! An event's trip: source (dblink) -> decode -> route -> plan -> apply -> state (batch done, same
//! transaction) -> source (finish batch). worker drives it; api is what SQL calls.

mod config;
mod copy_in;
mod decode;
mod event;
mod ini;
mod mode;
mod per_table;
mod placement;
mod plan;
mod reshape;
mod route;

mod api;
mod apply;
mod batch;
mod feed;
mod gucs;
mod helper;
mod launcher;
mod native;
mod part_time;
mod retention;
mod roles;
mod source;
mod spi;
mod state;
mod tx;
mod worker;

::pgrx::pg_module_magic!(name, version);

#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::register();
    // SAFETY: a postmaster global, set while shared_preload_libraries are loaded
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        launcher::register_launcher();
    }
}

::pgrx::extension_sql_file!(
    "../sql/schema.sql",
    name = "schema",
    requires = [api::mask_password_sql, api::shown_options]
);
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
