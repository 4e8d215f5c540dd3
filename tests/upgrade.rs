//! Upgrading a running installation: each released version (its frozen install script and its
//! own library, built from the commit that released it) runs a job, the library is replaced
//! while events are in flight, `ALTER EXTENSION ... UPDATE` runs, and the job goes on with
//! nothing lost or doubled.
//!
//! This swaps the installed library for a while, so it is the only test of its binary: cargo runs
//! test binaries one after another, never two at once.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::{literal, run, Cluster};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A released version: the commit that released it (its install script is frozen in
/// sql/frozen/), and the SQLSTATE its library gave `stop()` of an unknown job, which tells which
/// library answers.
struct Release {
    version: &'static str,
    commit: &'static str,
    unknown_job: &'static str,
}

const RELEASES: &[Release] = &[
    // 0.1.0 raised every refusal as XX000
    Release { version: "0.1.0", commit: "0d309bf40c013ca1b2e77756cbe1752b0e850e51", unknown_job: "XX000" },
    Release { version: "0.2.0", commit: "7d808281fd28326298469de9a49a14b25b4a5214", unknown_job: "42704" },
    Release { version: "0.3.0", commit: "6ab7b1b9bd030e4d93729f91cc24530dc56c139f", unknown_job: "42704" },
];
const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, txt text)";

/// A release's library, built from its commit (kept under target/, so later runs only check it).
fn library(release: &Release) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = root.join(format!("target/upgrade-{}", release.version));
    let src = base.join("src");
    if !src.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&src).unwrap();
        let mut extract = Command::new("sh");
        extract.arg("-c").arg(format!(
            "git -C {} archive --format=tar {} | tar -x -C {} && echo ok",
            root.display(),
            release.commit,
            src.display()
        ));
        let what =
            format!("extracting {}'s source (commit {}; the clone needs its history)", release.version, release.commit);
        let tar = run(extract, &what);
        assert_eq!(tar, "ok");
    }
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--lib", "--quiet", "--manifest-path"])
        .arg(src.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", base.join("target"));
    run(build, &format!("building {}'s library", release.version));
    base.join("target/debug/libcube_dispatcher.so")
}

fn as_root(cmd: &str) -> Command {
    let mut c = if unsafe { libc::geteuid() } == 0 {
        Command::new("sh")
    } else {
        let mut s = Command::new("sudo");
        s.args(["-n", "sh"]);
        s
    };
    c.args(["-c", cmd]);
    c
}

/// Puts a library in place the way an upgrade does: a new file renamed over the old one, so
/// processes that mapped the old one keep it.
fn install_library(from: &Path, installed: &Path) {
    let tmp = installed.with_extension("so.upgrade-test");
    run(
        as_root(&format!("cp {} {} && mv {} {}", from.display(), tmp.display(), tmp.display(), installed.display())),
        "installing a library",
    );
}

/// Puts the current library back however the test ends.
struct RestoreLibrary {
    saved: PathBuf,
    installed: PathBuf,
}

impl Drop for RestoreLibrary {
    fn drop(&mut self) {
        install_library(&self.saved, &self.installed);
        let _ = std::fs::remove_file(&self.saved);
    }
}

/// One test for all releases: each swaps the installed library, so they must not run at once.
#[test]
fn a_running_job_of_each_release_is_upgraded_with_nothing_lost_or_doubled() {
    for release in RELEASES {
        upgrade_from(release);
    }
}

fn upgrade_from(release: &Release) {
    let old = library(release);
    let mut pg_config = Command::new(format!("{}/pg_config", common::BIN));
    pg_config.arg("--pkglibdir");
    let pkglibdir = run(pg_config, "pg_config");
    let installed = Path::new(&pkglibdir).join("cube_dispatcher.so");
    let saved = std::env::temp_dir().join(format!("cube_dispatcher-current-{}.so", std::process::id()));
    std::fs::copy(&installed, &saved).unwrap();
    let _restore = RestoreLibrary { saved: saved.clone(), installed: installed.clone() };
    install_library(&old, &installed);

    // declared after the guard, so the cluster is gone before the library is put back
    let c = Cluster::start_bare(&[]);
    c.exec("source", "CREATE EXTENSION pgq");
    c.exec("target", &format!("CREATE EXTENSION cube_dispatcher VERSION '{}' CASCADE", release.version));
    let unknown_job = || c.try_exec_state("target", "SELECT cube_dispatcher.stop('nosuch')").unwrap_err();
    assert_eq!(unknown_job().0, release.unknown_job, "{}'s library is the one loaded", release.version);
    c.feed("q", "orders", ORDERS, ORDERS);
    c.start_job("up", "q", &[("on_error", "dead_letter")]);
    let batch = |from: i32, to: i32| {
        c.source_sql(&format!(
            "INSERT INTO orders SELECT g, 'v' || g FROM generate_series({from}, {to}) g;
             UPDATE orders SET txt = 'u' || id WHERE id % 7 = 0 AND id BETWEEN {from} AND {to};
             DELETE FROM orders WHERE id % 11 = 0 AND id BETWEEN {from} AND {to};
             SELECT pgq.insert_event('q', 'I:id', 'id={from}', 'public.no_such_table', NULL, NULL, NULL);"
        ));
        c.tick("q");
    };
    batch(1, 1000);
    c.wait_caught_up("q", "up");
    // events in flight: queued and ticked, the 0.1.0 worker busy with them or about to be
    batch(1001, 30000);
    install_library(&saved, &installed);
    c.restart_immediate();
    // the launcher resumes the job with the new library on the old objects: the job waits, the
    // control functions refuse, both saying what to do
    let (code, msg) = unknown_job();
    assert_eq!(code, "55000", "the new library is the one loaded and refuses: {msg}");
    assert!(msg.contains(&format!("objects in this database are version {}", release.version)), "{msg}");
    assert!(msg.contains("run ALTER EXTENSION cube_dispatcher UPDATE"), "{msg}");
    c.wait_status("up", "last_error", |e| e.is_some_and(|e| e.contains("waiting: the extension's objects")));
    c.exec("target", "ALTER EXTENSION cube_dispatcher UPDATE");
    assert_eq!(unknown_job().0, "42704", "after the update");
    assert_eq!(
        c.value("target", "SELECT extversion FROM pg_extension WHERE extname = 'cube_dispatcher'").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    batch(30001, 31000);
    c.wait_caught_up("q", "up");

    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    let source_rows = c.query("source", "SELECT id, txt FROM orders ORDER BY id");
    assert_eq!(source_rows.len(), 31000 - 31000 / 11, "source rows");
    assert_eq!(c.query("target", &format!("SELECT id, txt FROM {part} ORDER BY id")), source_rows, "every row once");
    assert_eq!(c.count("target", "cube_dispatcher.dead_letter"), 3, "dead letters of both versions kept");
    assert_eq!(
        c.value(
            "target",
            "SELECT (last_tick_id IS NOT NULL AND batches_done > 0)::text FROM cube_dispatcher.job_state"
        )
        .as_deref(),
        Some("true"),
        "position and counters carried over"
    );

    // the definition carried over reads back as the same settings stored afresh: equal, or
    // absent from it where the fresh one holds the option's default (options added since)
    let stored = || c.value("target", "SELECT options::text FROM cube_dispatcher.job WHERE job_name = 'up'").unwrap();
    let carried = stored();
    c.exec("target", "SELECT cube_dispatcher.reload('up')");
    let fresh = stored();
    let differing = c.query(
        "target",
        &format!(
            "SELECT k, c.options -> k, f.options -> k
               FROM (SELECT {}::jsonb AS options) c, (SELECT {}::jsonb AS options) f,
                    LATERAL (SELECT jsonb_object_keys(c.options) UNION SELECT jsonb_object_keys(f.options)) keys(k)
               LEFT JOIN cube_dispatcher.options() o ON o.option = k
              WHERE (c.options -> k) IS DISTINCT FROM (f.options -> k)
                AND NOT (NOT c.options ? k AND (f.options -> k = 'null' OR f.options ->> k = o.default_value))",
            literal(&carried),
            literal(&fresh)
        ),
    );
    assert_eq!(differing, Vec::<Vec<Option<String>>>::new(), "options carried over\n{carried}\n{fresh}");

    // what later versions changed is there, the same as in a fresh installation
    let catalog = |db: &str| {
        c.query(
            db,
            "SELECT 'constraint ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
              WHERE connamespace = 'cube_dispatcher'::regnamespace
             UNION ALL
             SELECT 'function ' || oid::regprocedure || ' ' || coalesce(array_to_string(proconfig, ','), '') || ' ' || prosecdef
               FROM pg_proc WHERE pronamespace = 'cube_dispatcher'::regnamespace
             UNION ALL
             SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' ' || coalesce(column_default, '')
               FROM information_schema.columns WHERE table_schema = 'cube_dispatcher'
             UNION ALL
             SELECT 'view ' || viewname || ' ' || definition FROM pg_views WHERE schemaname = 'cube_dispatcher'
             UNION ALL
             SELECT 'acl ' || c.oid::regclass || ' ' || coalesce(c.relacl::text, '') FROM pg_class c
              WHERE relnamespace = 'cube_dispatcher'::regnamespace
             UNION ALL
             SELECT 'acl ' || p.oid::regprocedure || ' ' || coalesce(p.proacl::text, '') FROM pg_proc p
              WHERE pronamespace = 'cube_dispatcher'::regnamespace
             ORDER BY 1",
        )
    };
    c.exec("postgres", "CREATE DATABASE fresh");
    c.exec("fresh", "CREATE EXTENSION cube_dispatcher CASCADE");
    assert_eq!(catalog("target"), catalog("fresh"), "upgraded and fresh installations differ");
    // loop_delay = 0, which 0.1.0's table refused
    c.exec(
        "target",
        &format!(
            "SET cube_dispatcher.up.src_db = {}; SET cube_dispatcher.up.pgq_queue_name = 'q';
             SET cube_dispatcher.up.on_error = 'dead_letter'; SET cube_dispatcher.up.loop_delay = '0';
             SELECT cube_dispatcher.reload('up')",
            literal(&c.src_conninfo())
        ),
    );
}
