//! The SQL-facing control functions. The original tool's switches map to them: -d start,
//! -s stop (SIGUSR2: after the current batch), -k kill (SIGTERM: at once), -r reload (SIGHUP).

use crate::apply::BatchWriter;
use crate::config::{self, mask_password, ConfigError, Context, JobConfig, Setting};
use crate::event::RawEvent;
use crate::part_time::Placement;
use crate::roles;
use crate::source::Source;
use crate::state;
use crate::tx::SqlError;
use crate::worker;
use pgrx::prelude::*;
use std::borrow::Cow;
use std::time::Duration;
use thiserror::Error;

/// What the control functions refuse, each raised once, at the SQL edge, with a SQLSTATE a
/// client can tell apart.
#[derive(Debug, Error)]
enum ApiError {
    #[error("cube_dispatcher: {0}")]
    BadJobName(ConfigError),
    #[error("cube_dispatcher job {job}: {err}")]
    Config { job: String, err: ConfigError },
    #[error("cube_dispatcher job {0} does not exist")]
    UnknownJob(String),
    #[error("cube_dispatcher: permission denied for job {job}: it belongs to role {owner}")]
    NotOwner { job: String, owner: String },
    #[error("cube_dispatcher job {job} is already running (pid {pid})")]
    Running { job: String, pid: i32 },
    /// `consumer`: "consumer C on queue Q in <masked src_db>"
    #[error("cube_dispatcher job {job}: cannot register {consumer}: {cause}")]
    Register { job: String, consumer: String, cause: Box<SqlError> },
    #[error("cube_dispatcher: {0}")]
    Stored(#[from] state::Unreadable),
    #[error("cube_dispatcher: {0}")]
    Launch(#[from] worker::LaunchError),
    #[error("cube_dispatcher: {0}")]
    Outdated(state::Outdated),
    #[error("cube_dispatcher: import_ini: {0}")]
    Ini(#[from] crate::ini::IniError),
}

impl ApiError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            ApiError::BadJobName(_) => ERRCODE_INVALID_NAME,
            ApiError::Config { .. } | ApiError::Stored(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            ApiError::UnknownJob(_) => ERRCODE_UNDEFINED_OBJECT,
            ApiError::NotOwner { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            ApiError::Running { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            // as dblink or the source reported it: 08001 for an unreachable source
            ApiError::Register { cause, .. } => cause.code,
            ApiError::Launch(e) => e.sqlstate(),
            ApiError::Outdated(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            ApiError::Ini(_) => ERRCODE_CONFIG_FILE_ERROR,
        }
    }

    fn raise(self) -> ! {
        ereport!(ERROR, self.sqlstate(), self.to_string());
    }
}

/// The body of a control function: runs with the pinned search_path (see roles.rs), only on
/// the extension's objects of this library's version; an ApiError becomes the SQL error.
fn edge<R>(f: impl FnOnce() -> Result<R, ApiError>) -> R {
    roles::with_safe_search_path(|| {
        state::check_version().map_err(ApiError::Outdated)?;
        f()
    })
    .unwrap_or_else(|e| e.raise())
}

fn setting(name: &str) -> Option<String> {
    crate::spi::value::<String>("SELECT current_setting($1, true)", &[name.into()])
}

/// Reads the job's settings as this session sees them (job level, then the global default) and
/// validates them; errors name the GUC.
fn read_config(job: &str) -> Result<JobConfig, ApiError> {
    config::validate_job_name(job).map_err(ApiError::BadJobName)?;
    let config_error = |err| ApiError::Config { job: job.to_string(), err };
    config::check_names(job, placeholder_settings().iter().map(String::as_str), &crate::gucs::NAMES)
        .map_err(config_error)?;
    let lookup = |opt: &str| {
        let job_level = config::job_guc(job, opt);
        let global = format!("cube_dispatcher.{opt}");
        match (setting(&job_level), setting(&global)) {
            (Some(text), _) => Setting { text: Some(text), place: job_level },
            (None, Some(text)) => Setting { text: Some(text), place: global },
            (None, None) => Setting { text: None, place: job_level },
        }
    };
    let db = Spi::get_one::<String>("SELECT current_database()::text").ok().flatten().unwrap_or_default();
    let cfg = JobConfig::read(&Context { job, current_db: &db }, &lookup).map_err(config_error)?;
    check_keys(&cfg).map_err(config_error)?;
    Ok(cfg)
}

/// keep_latest finds rows by their key: `fields` or `skip_fields` that leave out a column of the
/// primary key of a parent they name (as the target declares it) are refused now, not at the
/// first event. Tables covered only by a catch-all entry are checked per event.
fn check_keys(cfg: &JobConfig) -> Result<(), ConfigError> {
    if cfg.mode.keeps_every_version() {
        return Ok(());
    }
    let (fields, skip) = (cfg.fields.as_ref(), cfg.skip_fields.as_ref());
    let named: Vec<(&str, &str)> =
        fields.into_iter().flat_map(|f| f.tables()).chain(skip.into_iter().flat_map(|s| s.tables())).collect();
    for (schema, table) in named {
        let rules = cfg.table_rules(crate::decode::TableName { schema: schema.to_string(), table: table.to_string() });
        let Some(reshape) = &rules.reshape else { continue };
        let parent = crate::route::qualified(&rules.dest, &crate::apply::quote_ident);
        let Some((column, option)) = reshape.left_out(&primary_key(&parent)) else { continue };
        // left_out blames an option only where it has an entry for the table
        let text = match option {
            "skip_fields" => &skip.unwrap().text,
            _ => &fields.unwrap().text,
        };
        return Err(ConfigError::Invalid {
            guc: config::job_guc(&cfg.job_name, option),
            value: text.clone(),
            why: format!(
                "it leaves out column {column:?} of the primary key of {parent}, which keep_latest finds rows by"
            ),
        });
    }
    Ok(())
}

/// The primary key columns of a table in this database (none if it has none or does not exist).
fn primary_key(table: &str) -> Vec<String> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT a.attname::text FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = pg_catalog.to_regclass($1) AND i.indisprimary",
            None,
            &[table.into()],
        )?;
        rows.map(|r| r.get::<String>(1).map(Option::unwrap_or_default)).collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_default()
}

/// The names of the settings this session has under `cube_dispatcher.` that no module defined:
/// job options are such placeholders. pg_settings does not show placeholders, so the GUC table
/// is read directly; only those with a non-empty value count (RESET leaves the placeholder).
fn placeholder_settings() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: the GUC table of this backend, read (not changed) between statements; every entry
    // has a NUL-terminated name
    unsafe {
        let vars = pg_sys::get_guc_variables();
        for i in 0..pg_sys::GetNumConfigOptions() as usize {
            let var = &**vars.add(i);
            if var.flags & pg_sys::GUC_CUSTOM_PLACEHOLDER as i32 == 0 {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(var.name);
            let value = pg_sys::GetConfigOption(var.name, true, false);
            if name.to_bytes().starts_with(b"cube_dispatcher.") && !value.is_null() && *value != 0 {
                names.push(name.to_string_lossy().into_owned());
            }
        }
    }
    names
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: plain kill(2); the pid was just checked to be this job's worker in this cluster.
    unsafe { libc::kill(pid, sig) };
}

/// Waits until the process is gone, still answering to query cancel.
fn wait_gone(pid: i32) {
    // SAFETY: kill(2) with signal 0 only checks that the process exists
    while unsafe { libc::kill(pid, 0) } == 0 {
        std::thread::sleep(Duration::from_millis(50));
        pg_sys::check_for_interrupts!();
    }
}

/// Whether the job exists; an error if it does and the caller may not manage it (only its
/// owner, a member of the owner's role, or a superuser may).
fn may_manage(job: &str) -> Result<bool, ApiError> {
    let Some(owner) = state::job_owner(job) else { return Ok(false) };
    if !roles::may_manage(roles::caller(), owner) {
        return Err(ApiError::NotOwner { job: job.to_string(), owner: roles::name(owner) });
    }
    Ok(true)
}

/// The job's definition, if it exists and the caller may manage it.
fn existing_job(job: &str) -> Result<state::JobRow, ApiError> {
    if !may_manage(job)? {
        return Err(ApiError::UnknownJob(job.to_string()));
    }
    state::load_job(job)?.ok_or_else(|| ApiError::UnknownJob(job.to_string()))
}

/// Reads and validates the job's settings, stores them as its definition, starts its worker and
/// returns the worker's pid. The worker starts work when this transaction commits; it reads the
/// source and writes rows with the privileges of the role calling start().
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn start(job: &str) -> i32 {
    edge(|| {
        may_manage(job)?;
        if let Some(pid) = state::live_pid(job) {
            return Err(ApiError::Running { job: job.to_string(), pid });
        }
        let cfg = read_config(job)?;
        let role = roles::caller();
        // Registering here, not only in the worker, makes the contract simple: every event queued
        // after start() returns is delivered. It also proves src_db and the queue are usable.
        crate::tx::catching(|| {
            let mut source = Source::new(role, &cfg.src_db, Duration::from_secs(60));
            source.register(&cfg.pgq_queue_name, &cfg.pgq_consumer_id);
            source.disconnect();
            Ok(())
        })
        .map_err(|cause| ApiError::Register {
            job: job.to_string(),
            consumer: format!(
                "consumer {} on queue {} in {}",
                cfg.pgq_consumer_id,
                cfg.pgq_queue_name,
                mask_password(&cfg.src_db)
            ),
            cause: Box::new(cause),
        })?;
        state::save_job(&cfg, role);
        Ok(worker::launch(job)?)
    })
}

/// Re-reads and validates the settings; the worker applies them before its next batch.
/// Invalid settings fail here and the worker keeps the ones it has.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn reload(job: &str) -> bool {
    edge(|| {
        let old = existing_job(job)?;
        let cfg = read_config(job)?;
        state::save_job(&cfg, old.run_as);
        if !old.enabled {
            state::set_enabled(job, false);
        }
        Ok(match state::live_pid(job) {
            Some(pid) => {
                signal(pid, libc::SIGHUP);
                true
            }
            None => false,
        })
    })
}

fn halt(job: &str, sig: i32) -> Result<bool, ApiError> {
    if !may_manage(job)? {
        return Err(ApiError::UnknownJob(job.to_string()));
    }
    state::set_enabled(job, false);
    let pid = state::live_pid(job);
    if let Some(pid) = pid {
        signal(pid, sig);
        wait_gone(pid);
    }
    // A worker that stops lets its helper go and waits for it; one that is killed does not, and
    // its helper ends at its next step: the job is stopped when both are gone.
    for helper in state::helper_pids(job) {
        signal(helper, libc::SIGTERM);
        wait_gone(helper);
    }
    state::set_stopped(job, None);
    Ok(pid.is_some())
}

/// Stops safely: the batch in progress is completed, then the worker exits. Returns false if the
/// job was not running.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn stop(job: &str) -> bool {
    edge(|| halt(job, libc::SIGUSR2))
}

/// Stops at once: the batch in progress is rolled back and done again on the next start.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn kill(job: &str) -> bool {
    edge(|| halt(job, libc::SIGTERM))
}

/// Stops the job, unregisters its consumer on the source and forgets the job.
#[pg_extern(security_definer, name = "drop")]
#[search_path(pg_catalog, pg_temp)]
fn drop_job(job: &str) -> bool {
    edge(|| {
        let row = existing_job(job)?;
        halt(job, libc::SIGUSR2)?;
        let mut source = Source::new(row.run_as, &row.config.src_db, Duration::from_secs(60));
        source.unregister(&row.config.pgq_queue_name, &row.config.pgq_consumer_id);
        source.disconnect();
        crate::spi::run("DELETE FROM cube_dispatcher.job WHERE job_name = $1", &[job.into()]);
        Ok(true)
    })
}

/// A connection string with any password replaced by ********.
#[pg_extern(name = "mask_password", immutable, parallel_safe, strict)]
pub fn mask_password_sql(conninfo: &str) -> String {
    mask_password(conninfo)
}

/// The job options: what each does, its default and when a change takes effect.
#[pg_extern]
fn options() -> TableIterator<
    'static,
    (name!(option, String), name!(default_value, String), name!(takes_effect, String), name!(description, String)),
> {
    TableIterator::new(config::SCHEMA.iter().map(|s| {
        (s.name.to_string(), s.default_text().to_string(), s.effect.describe().to_string(), s.doc.to_string())
    }))
}

/// A job's stored options as the status view shows them: connection strings masked, or null
/// for those who may not see them.
/// The statements that set up, as GUCs, the job a Skytools ini file's `[cube_dispatcher]`
/// section describes: one row each, in the file's order, with comments for what is dropped.
/// Changes nothing itself.
#[pg_extern(strict)]
fn import_ini(ini: &str) -> TableIterator<'static, (name!(statement, String),)> {
    let rows = edge(|| {
        let db = crate::spi::value::<String>("SELECT pg_catalog.current_database()::text", &[]).unwrap_or_default();
        Ok(crate::ini::import(ini, &db)?)
    });
    TableIterator::new(rows.into_iter().map(|row| {
        (match row {
            crate::ini::Imported::Setting { database, guc, value } => {
                // cube_dispatcher.<validated job>.<declared option>; a job may be named like a
                // keyword (all, user): each part quoted where needed
                let guc: Vec<String> = guc.split('.').map(crate::apply::quote_ident).collect();
                let (database, value) = (crate::apply::quote_ident(&database), quote_literal(&value));
                format!("ALTER DATABASE {database} SET {} = {value};", guc.join("."))
            }
            crate::ini::Imported::Comment(text) => format!("-- {text}"),
        },)
    }))
}

/// PostgreSQL's quote_literal(): E'' syntax where backslashes need it.
fn quote_literal(text: &str) -> String {
    // import() never returns NUL: ini text comes from a text argument
    let c = std::ffi::CString::new(text).expect("text without NUL");
    // SAFETY: quote_literal_cstr returns a palloc'd, NUL-terminated copy
    unsafe { std::ffi::CStr::from_ptr(pg_sys::quote_literal_cstr(c.as_ptr())) }.to_string_lossy().into_owned()
}

#[pg_extern(immutable, parallel_safe, strict)]
fn shown_options(options: pgrx::JsonB, connections: bool) -> pgrx::JsonB {
    let mut options = options.0;
    if let Some(map) = options.as_object_mut() {
        config::shown(map, connections);
    }
    pgrx::JsonB(options)
}

/// Writes the job's dead letters again, oldest event first, each in its own subtransaction, into
/// the partition of the batch they came from. Those that succeed are removed; the others keep
/// their row with the new error. Returns how many were written.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn replay_dead_letters(job: &str) -> i64 {
    edge(|| replay(job))
}

fn replay(job: &str) -> Result<i64, ApiError> {
    let row = existing_job(job)?;
    let letters: Vec<(i64, Option<String>, RawEvent<'static>)> = Spi::connect(|c| {
        let rows = c.select(
            "SELECT id, suffix, ev_id, ev_time::text, ev_type, ev_data, ev_extra1
               FROM cube_dispatcher.dead_letter WHERE job_name = $1 ORDER BY ev_id, id",
            None,
            &[job.into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let text = |i| r.get::<String>(i).map(|v| v.map(Cow::Owned));
            let ev = RawEvent {
                ev_id: r.get(3)?.unwrap_or_default(),
                ev_time: text(4)?,
                ev_type: text(5)?,
                ev_data: text(6)?,
                ev_extra1: text(7)?,
                predecoded: false,
            };
            out.push((r.get::<i64>(1)?.unwrap_or_default(), r.get::<String>(2)?, ev));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| crate::spi::fail(e));
    let mut written = 0;
    let mut time_zone = None;
    for (id, suffix, ev) in letters {
        let mut source_time_zone = || {
            time_zone
                .get_or_insert_with(|| {
                    let mut source = Source::new(row.run_as, &row.config.src_db, Duration::from_secs(60));
                    let tz = source.time_zone();
                    source.disconnect();
                    tz
                })
                .clone()
        };
        let placement = Placement::for_replay(&row.config, suffix, &mut source_time_zone);
        let mut writer = BatchWriter::new(&row.config, row.run_as, placement)
            .with_catalog(crate::source::SourceCatalog::new(row.run_as, &row.config.src_db));
        match writer.apply_isolated(&ev) {
            Ok(()) => {
                for p in &writer.created {
                    state::record_partition(job, p);
                }
                crate::spi::run("DELETE FROM cube_dispatcher.dead_letter WHERE id = $1", &[id.into()]);
                written += 1;
            }
            Err(e) => crate::spi::run(
                "UPDATE cube_dispatcher.dead_letter SET error = $2, failed_at = now() WHERE id = $1",
                &[id.into(), e.to_string().into()],
            ),
        }
    }
    Ok(written)
}
