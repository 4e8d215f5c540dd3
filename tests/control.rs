//! Job control and configuration: GUCs, start/stop/kill/reload/drop, status, resume, logging.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::{literal, Cluster};
use std::time::Duration;

const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, txt text)";

fn setup(c: &Cluster, queue: &str) {
    c.create_queue(queue);
    c.source_sql(ORDERS);
    c.add_logutriga("orders", queue);
    c.target_sql(ORDERS);
}

fn pid_alive(c: &Cluster, pid: &str) -> bool {
    c.value("target", &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")).as_deref() == Some("1")
}

/// How many receiving helpers the job has running.
fn helpers(c: &Cluster, job: &str) -> String {
    c.value(
        "target",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cube_dispatcher {job} helper'"),
    )
    .unwrap()
}

#[test]
fn validation_errors_name_the_setting() {
    let c = Cluster::start();
    setup(&c, "q");
    let src = literal(&c.src_conninfo());
    let cases: Vec<(String, &str)> = vec![
        ("SELECT cube_dispatcher.start('v')".into(), "cube_dispatcher.v.src_db is not set"),
        (format!("SET cube_dispatcher.v.src_db = {src}; SELECT cube_dispatcher.start('v')"), "cube_dispatcher.v.pgq_queue_name is not set"),
        (format!("SET cube_dispatcher.v.src_db = {src}; SET cube_dispatcher.v.pgq_queue_name = 'q'; SET cube_dispatcher.v.mode = 'keep_some'; SELECT cube_dispatcher.start('v')"), "invalid value \"keep_some\" for cube_dispatcher.v.mode"),
        (format!("SET cube_dispatcher.v.src_db = {src}; SET cube_dispatcher.v.pgq_queue_name = 'q'; SET cube_dispatcher.v.loop_delay = '-1'; SELECT cube_dispatcher.start('v')"), "for cube_dispatcher.v.loop_delay"),
        (format!("SET cube_dispatcher.v.src_db = {src}; SET cube_dispatcher.v.pgq_queue_name = 'q'; SET cube_dispatcher.v.log_level = 'loud'; SELECT cube_dispatcher.start('v')"), "for cube_dispatcher.v.log_level"),
        (format!("SET cube_dispatcher.v.src_db = {src}; SET cube_dispatcher.v.pgq_queue_name = 'q'; SET cube_dispatcher.v.dst_db = 'dbname=elsewhere'; SELECT cube_dispatcher.start('v')"), "for cube_dispatcher.v.dst_db"),
        (format!("SET cube_dispatcher.v.src_db = {src}; SET cube_dispatcher.v.pgq_queue_name = 'nosuchqueue'; SELECT cube_dispatcher.start('v')"), "nosuchqueue"),
        ("SELECT cube_dispatcher.start('Bad-Name')".into(), "invalid job name"),
        // the original ignored typos; here a misspelt option is an error naming the nearest one
        (format!("SET cube_dispatcher.v.src_db = {src}; SET cube_dispatcher.v.pgq_queue_name = 'q'; SET cube_dispatcher.v.modee = 'keep_all'; SELECT cube_dispatcher.start('v')"), "cube_dispatcher.v.modee is not an option of cube_dispatcher; did you mean cube_dispatcher.v.mode?"),
    ];
    for (sql, want) in cases {
        let err = c.try_exec("target", &sql).expect_err(&sql);
        assert!(err.contains(want), "{sql}\n  -> {err}");
    }
    // dst_db naming this database is accepted
    c.exec("target", &format!("SET cube_dispatcher.v.src_db = {src}; SET cube_dispatcher.v.pgq_queue_name = 'q'; SET cube_dispatcher.v.dst_db = 'dbname=target'; SELECT cube_dispatcher.start('v')"));
    c.wait_status("v", "state", |s| s == Some("running"));
    let again = c.try_exec("target", "SELECT cube_dispatcher.start('v')").unwrap_err();
    assert!(again.contains("job v is already running"), "{again}");
}

#[test]
fn settings_from_set_alter_database_and_global_defaults() {
    let c = Cluster::start();
    setup(&c, "q");
    c.create_queue("q2");
    // a global default for every job, overridden by one job
    c.target_sql("ALTER DATABASE target SET cube_dispatcher.mode = 'keep_all'");
    c.configure("a", &[("src_db", &c.src_conninfo()), ("pgq_queue_name", "q")]);
    c.target_sql("SELECT cube_dispatcher.start('a')");
    c.exec(
        "target",
        &format!(
            "SET cube_dispatcher.b.src_db = {}; SET cube_dispatcher.b.pgq_queue_name = 'q2'; SET cube_dispatcher.b.mode = 'keep_latest'; SET cube_dispatcher.b.pgq_consumer_id = 'bee'; SELECT cube_dispatcher.start('b')",
            literal(&c.src_conninfo())
        ),
    );
    assert_eq!(c.status("a", "mode").as_deref(), Some("keep_all"));
    assert_eq!(c.status("b", "mode").as_deref(), Some("keep_latest"));
    assert_eq!(c.status("a", "consumer").as_deref(), Some("a"), "pgq_consumer_id defaults to the job name");
    assert_eq!(c.status("b", "consumer").as_deref(), Some("bee"));
    // both consumers exist on the source once start() has returned
    assert_eq!(
        c.value("source", "SELECT string_agg(consumer_name, ',' ORDER BY 1) FROM pgq.get_consumer_info()").as_deref(),
        Some("a,bee")
    );
}

#[test]
fn start_status_reload_and_two_jobs_side_by_side() {
    let c = Cluster::start();
    setup(&c, "q");
    c.feed(
        "q2",
        "items",
        "CREATE TABLE items (id int PRIMARY KEY, name text)",
        "CREATE TABLE items (id int PRIMARY KEY, name text)",
    );
    let pid = c.start_job("one", "q", &[("log_level", "verbose")]);
    c.start_job("two", "q2", &[("mode", "keep_all")]);
    assert!(pid_alive(&c, &pid.to_string()));
    assert_eq!(c.status("one", "pid"), Some(pid.to_string()));
    assert_eq!(c.status("one", "state").as_deref(), Some("running"));
    assert!(c.status("one", "started_at").is_some());

    c.source_sql("INSERT INTO orders VALUES (1, 'a'); INSERT INTO items VALUES (1, 'x'), (2, 'y')");
    c.tick("q");
    c.tick("q2");
    c.wait_caught_up("q", "one");
    c.wait_caught_up("q2", "two");
    let day = c.suffix("YYYY_MM_DD");
    assert_eq!(c.count("target", &format!("orders_{day}")), 1);
    assert_eq!(c.count("target", &format!("items_{day}")), 2);
    assert_eq!(c.status("one", "events_done").as_deref(), Some("1"));
    assert!(c.status("one", "last_batch_id").is_some() && c.status("one", "last_batch_end").is_some());
    assert!(c.status("one", "lag").is_some());
    assert!(c.log().contains("cube_dispatcher job one: batch "), "verbose logs each batch");

    // reload: new dateformat and loop_delay apply at the next batch; the pid stays
    c.configure("one", &[("dateformat", "YYYY_MM"), ("loop_delay", "0.5")]);
    assert_eq!(c.value("target", "SELECT cube_dispatcher.reload('one')::text").as_deref(), Some("true"));
    c.wait_until("reload logged", Duration::from_secs(20), || {
        c.log().contains("cube_dispatcher job one: reloaded settings")
    });
    c.source_sql("INSERT INTO orders VALUES (2, 'b')");
    c.tick("q");
    c.wait_caught_up("q", "one");
    assert_eq!(c.count("target", &format!("orders_{}", c.suffix("YYYY_MM"))), 1);
    assert_eq!(c.status("one", "pid"), Some(pid.to_string()));
    assert_eq!(
        c.value("target", "SELECT options->>'loop_delay' FROM cube_dispatcher.job WHERE job_name = 'one'").as_deref(),
        Some("0.5")
    );

    // invalid new settings: reload fails and the worker keeps what it has
    c.configure("one", &[("mode", "keep_nothing")]);
    let err = c.try_exec("target", "SELECT cube_dispatcher.reload('one')").unwrap_err();
    assert!(err.contains("cube_dispatcher.one.mode"), "{err}");
    assert_eq!(c.status("one", "mode").as_deref(), Some("keep_latest"));
}

/// A batch large enough that stop/kill arrive while it is being written.
fn big_batch(c: &Cluster, queue: &str, n: i64) {
    c.source_sql(&format!("INSERT INTO orders SELECT g, repeat('x', 100) FROM generate_series(1, {n}) g"));
    c.tick(queue);
}

fn wait_busy(c: &Cluster, pid: i32) {
    // the worker is inside the batch once it holds the partition-creation lock (held to commit)
    c.wait_until("worker busy with the batch", Duration::from_secs(30), || {
        c.value("target", &format!("SELECT count(*) FROM pg_locks WHERE pid = {pid} AND locktype = 'advisory'"))
            .as_deref()
            == Some("1")
    });
}

#[test]
fn stop_right_after_start_stops_the_worker() {
    let c = Cluster::start();
    setup(&c, "q");
    c.start_job("r", "q", &[]);
    c.wait_status("r", "state", |s| s == Some("running"));
    assert_eq!(c.value("target", "SELECT cube_dispatcher.stop('r')::text").as_deref(), Some("true"));
    let waits_for_a_lock = |condition: &str| {
        c.value(
            "target",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND {condition}"),
        )
        .as_deref()
            == Some("1")
    };
    // A worker started and held before it records itself (behind a lock on its status row,
    // queued while start() had not committed), and a stop() that comes meanwhile. Without the
    // job row lock the worker takes first, this left the worker running 2 times in 3 (the
    // third, it was quicker than the lock here).
    let mut starter = c.connect("target");
    starter.batch_execute("BEGIN").unwrap();
    let pid: i32 = starter.query_one("SELECT cube_dispatcher.start('r')", &[]).unwrap().get(0);
    let mut holder = c.connect("target");
    let hold = std::thread::spawn(move || {
        holder
            .batch_execute("BEGIN; SELECT FROM cube_dispatcher.job_state WHERE job_name = 'r' FOR UPDATE")
            .map(|_| holder)
    });
    c.wait_until("the status row to be asked for", Duration::from_secs(30), || {
        waits_for_a_lock("query LIKE '%FOR UPDATE'")
    });
    starter.batch_execute("COMMIT").unwrap();
    let mut holder = hold.join().unwrap().unwrap();
    // (or, should it have been quicker than the lock, recorded itself)
    c.wait_until("the new worker to wait", Duration::from_secs(30), || {
        waits_for_a_lock(&format!("pid = {pid}")) || c.status("r", "pid") == Some(pid.to_string())
    });
    let mut stopper = c.connect("target");
    let stop = std::thread::spawn(move || {
        stopper.query_one("SELECT cube_dispatcher.stop('r')", &[]).map(|r| r.get::<_, bool>(0))
    });
    c.wait_until("stop() to wait", Duration::from_secs(30), || {
        // (a worker that recorded itself is waited for by stop() outside any lock)
        let recorded = c.status("r", "pid") == Some(pid.to_string());
        recorded || stop.is_finished() || waits_for_a_lock("query LIKE '%cube_dispatcher.stop(%'")
    });
    holder.batch_execute("COMMIT").unwrap();
    stop.join().unwrap().unwrap();
    c.wait_until("the worker to exit", Duration::from_secs(10), || !pid_alive(&c, &pid.to_string()));
    assert_eq!(c.status("r", "state").as_deref(), Some("stopped"));
    // and a start() after it runs one worker, not a second one beside a left-over
    let again = c.start_job("r", "q", &[]);
    c.wait_status("r", "state", |s| s == Some("running"));
    let workers = c.value(
        "target",
        "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE backend_type = 'cube_dispatcher r'",
    );
    assert_eq!(workers, Some(again.to_string()));
}

#[test]
fn stop_during_a_large_batch_completes_it() {
    let c = Cluster::start();
    setup(&c, "q");
    let pid = c.start_job("s", "q", &[("mode", "keep_all"), ("helper", "on")]);
    big_batch(&c, "q", 300_000);
    // and one more behind it, which the helper is asked for while the big one is written
    c.source_sql("INSERT INTO orders SELECT g, 'next' FROM generate_series(300001, 300100) g");
    c.tick("q");
    wait_busy(&c, pid);
    assert_eq!(helpers(&c, "s"), "1");
    assert_eq!(c.value("target", "SELECT cube_dispatcher.stop('s')::text").as_deref(), Some("true"));
    assert!(!pid_alive(&c, &pid.to_string()), "stop() returns after the worker exited");
    assert_eq!(helpers(&c, "s"), "0", "and after its helper exited");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    assert_eq!(c.count("target", &part), 300_000, "the batch in progress was completed, and no other");
    // finished on the source exactly as far as written here: the batch asked for ahead is not
    let finished = c.value("source", "SELECT last_tick::text FROM pgq.get_consumer_info('q', 's')");
    assert_eq!(
        finished,
        c.value("target", "SELECT last_tick_id::text FROM cube_dispatcher.job_state WHERE job_name = 's'")
    );
    assert_eq!(c.status("s", "state").as_deref(), Some("stopped"));
    assert!(c.log().contains("cube_dispatcher job s: stopped"));
    c.target_sql("SELECT cube_dispatcher.start('s')");
    c.wait_caught_up("q", "s");
    assert_eq!(
        c.value("target", &format!("SELECT count(*) || ' ' || count(DISTINCT id) FROM {part}")).as_deref(),
        Some("300100 300100")
    );
}

#[test]
fn kill_during_a_large_batch_loses_and_doubles_nothing() {
    let c = Cluster::start();
    setup(&c, "q");
    let pid = c.start_job("k", "q", &[("mode", "keep_all"), ("helper", "on")]);
    big_batch(&c, "q", 300_000);
    wait_busy(&c, pid);
    assert_eq!(helpers(&c, "k"), "1");
    assert_eq!(c.value("target", "SELECT cube_dispatcher.kill('k')::text").as_deref(), Some("true"));
    assert!(!pid_alive(&c, &pid.to_string()));
    assert_eq!(helpers(&c, "k"), "0", "kill() returns with the helper gone too");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    let written = c.value("target", &format!("SELECT count(*) FROM pg_tables WHERE tablename = '{part}'")).unwrap();
    if written == "1" {
        assert_eq!(c.count("target", &part), 0, "the killed batch was rolled back");
    }
    assert_eq!(c.status("k", "state").as_deref(), Some("stopped"));
    // the postmaster would restart a worker that died; a killed job must stay down
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        c.value("target", "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cube_dispatcher k'").as_deref(),
        Some("0")
    );
    c.target_sql("SELECT cube_dispatcher.start('k')");
    c.wait_caught_up("q", "k");
    assert_eq!(
        c.value("target", &format!("SELECT count(*) || ' ' || count(DISTINCT id) FROM {part}")).as_deref(),
        Some("300000 300000")
    );
}

#[test]
fn without_a_free_worker_slot_for_its_helper_a_job_reads_the_source_itself() {
    // one slot, taken by the job's worker once the launcher has looked around at start-up
    let c = Cluster::start_with(&["max_worker_processes = 1", "max_logical_replication_workers = 0"]);
    setup(&c, "q");
    c.wait_until("the launcher's slot free", Duration::from_secs(30), || {
        c.value("target", "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'cube_dispatcher%'").as_deref()
            == Some("0")
    });
    c.start_job("one", "q", &[("helper", "on")]);
    c.source_sql("INSERT INTO orders SELECT g, 'r' || g FROM generate_series(1, 100) g");
    c.tick("q");
    c.wait_caught_up("q", "one");
    assert_eq!(c.count("target", &format!("orders_{}", c.suffix("YYYY_MM_DD"))), 100);
    let said = "cube_dispatcher job one: reading the source in this process: no background worker slot is free";
    assert_eq!(c.log().matches(said).count(), 1, "said once:\n{}", c.log_tail());
    assert_eq!(helpers(&c, "one"), "0");
}

#[test]
fn drop_unregisters_the_consumer_and_forgets_the_job() {
    let c = Cluster::start();
    setup(&c, "q");
    c.start_job("d", "q", &[]);
    assert_eq!(c.value("source", "SELECT count(*) FROM pgq.get_consumer_info('q')").as_deref(), Some("1"));
    c.target_sql("SELECT cube_dispatcher.drop('d')");
    assert_eq!(c.value("source", "SELECT count(*) FROM pgq.get_consumer_info('q')").as_deref(), Some("0"));
    assert_eq!(c.value("target", "SELECT count(*) FROM cube_dispatcher.status").as_deref(), Some("0"));
    assert_eq!(c.value("target", "SELECT count(*) FROM cube_dispatcher.job_state").as_deref(), Some("0"));
}

#[test]
fn restart_resumes_running_jobs_but_not_stopped_ones() {
    let c = Cluster::start();
    setup(&c, "q");
    c.create_queue("q2");
    c.start_job("run", "q", &[]);
    c.start_job("rest", "q2", &[]);
    c.target_sql("SELECT cube_dispatcher.stop('rest')");
    c.restart_immediate();
    c.wait_status("run", "state", |s| s == Some("running"));
    c.wait_until("resumed worker", Duration::from_secs(30), || {
        c.value("target", "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cube_dispatcher run'").as_deref()
            == Some("1")
    });
    assert!(c.log().contains("cube_dispatcher: resumed job run"));
    assert!(!c.log().contains("resumed job rest"));
    assert_eq!(c.status("rest", "state").as_deref(), Some("stopped"));
    c.source_sql("INSERT INTO orders VALUES (1, 'after restart')");
    c.tick("q");
    c.wait_caught_up("q", "run");
    assert_eq!(c.count("target", &format!("orders_{}", c.suffix("YYYY_MM_DD"))), 1);
}

#[test]
fn passwords_never_reach_the_log_or_status() {
    let c = Cluster::start();
    setup(&c, "q");
    // trust authentication ignores the password, so the job works and still carries one
    let with_pw = format!("{} password=Secr3tPw", c.src_conninfo());
    c.start_job("pw", "q", &[("src_db", &with_pw)]);
    assert!(c.status("pw", "src_db").unwrap().contains("password=********"));
    // and a job whose source is unreachable fails to start, with a password in its settings
    let unreachable = format!("host={} port=1 dbname=source password=Secr3tPw", c.dir.display());
    c.configure("bad", &[("src_db", &unreachable), ("pgq_queue_name", "q")]);
    let err = c.try_exec("target", "SELECT cube_dispatcher.start('bad')").unwrap_err();
    assert!(err.contains("cannot register consumer bad on queue q") && err.contains("password=********"), "{err}");
    assert!(!err.contains("Secr3tPw"), "{err}");
    // the running job loses its source for a moment: errors are logged
    c.configure("pw", &[("src_db", &format!("{unreachable} user=postgres")), ("loop_delay", "0.2")]);
    c.target_sql("SELECT cube_dispatcher.reload('pw')");
    c.wait_status("pw", "last_error", |e| e.is_some());
    let log = c.log();
    assert!(log.contains("cube_dispatcher job pw"), "the job logged");
    assert!(!log.contains("Secr3tPw"), "password in the server log");
    assert!(!c.status("pw", "last_error").unwrap().contains("Secr3tPw"));
}
