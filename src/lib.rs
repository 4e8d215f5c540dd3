//! cube_dispatcher: the Skytools PgQ consumer as a PostgreSQL background worker.


pub mod config;
pub mod decode;
pub mod plan;
pub mod route;

::pgrx::pg_module_magic!(name, version);
