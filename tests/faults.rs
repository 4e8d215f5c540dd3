//! The fault suite: each test breaks something while a job runs and ends by comparing the whole
//! target with an oracle computed from what the test did to the source (never from what the
//! worker wrote): nothing lost, nothing doubled. Every queue carries both event formats
//! (pgq.logutriga and pgq.jsontriga events interleaved), except where a test says otherwise.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::Cluster;
use std::collections::BTreeMap;
use std::time::Duration;

const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, txt text)";
/// keep_all targets hold several versions of a key: no primary key there.
const ORDERS_ALL: &str = "CREATE TABLE orders (id int, txt text)";

/// The source table as the test changed it, and every row version it produced.
#[derive(Default)]
struct Oracle {
    rows: BTreeMap<i64, String>,
    versions: Vec<(i64, String)>,
    next_id: i64,
    round: i64,
}

impl Oracle {
    /// Inserts `n` rows, updates the oldest `upd` live rows and deletes the next `del` (keep_all
    /// workloads pass del = 0), on the source and in the model alike; then closes the batch.
    fn batch(&mut self, c: &Cluster, queue: &str, n: i64, upd: usize, del: usize) {
        self.round += 1;
        let (lo, hi) = (self.next_id + 1, self.next_id + n);
        self.next_id = hi;
        let r = self.round;
        let live: Vec<i64> = self.rows.keys().copied().collect();
        let (u, d) = (&live[..upd.min(live.len())], &live[upd.min(live.len())..(upd + del).min(live.len())]);
        let list = |ids: &[i64]| ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        let mut sql = format!("INSERT INTO orders SELECT g, 'i' || g || 'r{r}' FROM generate_series({lo}, {hi}) g;");
        if !u.is_empty() {
            sql += &format!("UPDATE orders SET txt = 'u' || id || 'r{r}' WHERE id IN ({});", list(u));
        }
        if !d.is_empty() {
            sql += &format!("DELETE FROM orders WHERE id IN ({});", list(d));
        }
        c.source_sql(&sql);
        for id in lo..=hi {
            self.rows.insert(id, format!("i{id}r{r}"));
            self.versions.push((id, format!("i{id}r{r}")));
        }
        for id in u {
            self.rows.insert(*id, format!("u{id}r{r}"));
            self.versions.push((*id, format!("u{id}r{r}")));
        }
        for id in d {
            self.rows.remove(id);
        }
        c.tick(queue);
    }

    fn latest(&self) -> Vec<Vec<Option<String>>> {
        self.rows.iter().map(|(id, t)| vec![Some(id.to_string()), Some(t.clone())]).collect()
    }

    /// keep_all: each version `copies` times (two jobs write one table in one test).
    fn all(&self, copies: usize) -> Vec<Vec<Option<String>>> {
        let mut v: Vec<(i64, String)> = self.versions.clone();
        v.sort();
        v.into_iter().map(|(id, t)| vec![Some(id.to_string()), Some(t), Some(copies.to_string())]).collect()
    }
}

fn setup(c: &Cluster, target_ddl: &str) {
    c.create_queue("q");
    c.source_sql(ORDERS);
    c.add_mixed_triggers("orders", "q", "id");
    c.target_sql(target_ddl);
}

fn assert_latest(c: &Cluster, table: &str, o: &Oracle) {
    assert_eq!(
        c.query("target", &format!("SELECT id, txt FROM {table} ORDER BY id")),
        o.latest(),
        "target differs from the oracle"
    );
}

fn assert_all(c: &Cluster, table: &str, o: &Oracle, copies: usize) {
    let got = c.query("target", &format!("SELECT id, txt, count(*) FROM {table} GROUP BY 1, 2 ORDER BY 1, 2"));
    assert_eq!(got, o.all(copies), "target differs from the oracle");
}

/// Until the worker is inside a batch: it holds a write lock on the target table.
fn wait_writing(c: &Cluster, job: &str) {
    c.wait_until("worker writing a batch", Duration::from_secs(60), || {
        c.value("target", &format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE a.backend_type = 'cube_dispatcher {job}' AND l.relation = 'orders'::regclass AND l.mode = 'RowExclusiveLock'"
        )).as_deref() == Some("1")
    });
}

fn worker_pid(c: &Cluster, job: &str) -> Option<String> {
    c.value("target", &format!("SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'cube_dispatcher {job}'"))
}

fn helper_pid(c: &Cluster, job: &str) -> Option<String> {
    c.value(
        "target",
        &format!("SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'cube_dispatcher {job} helper'"),
    )
}

#[test]
fn the_receiving_helper_terminated_mid_batch() {
    let c = Cluster::start();
    setup(&c, ORDERS);
    let mut o = Oracle::default();
    c.start_job("f", "q", &[("dateformat", ""), ("helper", "on")]);
    o.batch(&c, "q", 2000, 0, 0);
    c.wait_caught_up("q", "f");
    // far more than the helper's queue holds: it is still sending when it is terminated
    o.batch(&c, "q", 200_000, 1000, 500);
    wait_writing(&c, "f");
    let helper = helper_pid(&c, "f").unwrap();
    c.exec("target", &format!("SELECT pg_terminate_backend({helper})"));
    c.wait_status("f", "last_error", |e| e.is_some_and(|e| e.contains("receiving helper")));
    c.wait_caught_up("q", "f");
    assert_ne!(helper_pid(&c, "f").as_ref(), Some(&helper), "a new helper serves the retry");
    let warned = format!("receiving helper (pid {helper}) ended unexpectedly");
    assert_eq!(c.log().matches(&warned).count(), 1, "one warning:\n{}", c.log_tail());
    o.batch(&c, "q", 100, 50, 10);
    c.wait_caught_up("q", "f");
    assert_latest(&c, "orders", &o);
}

#[test]
fn sigkill_of_the_worker_mid_batch() {
    let c = Cluster::start();
    setup(&c, ORDERS);
    let mut o = Oracle::default();
    c.start_job("f", "q", &[("dateformat", "")]);
    o.batch(&c, "q", 2000, 0, 0);
    c.wait_caught_up("q", "f");
    o.batch(&c, "q", 200_000, 1000, 500);
    wait_writing(&c, "f");
    let pid = worker_pid(&c, "f").unwrap();
    std::process::Command::new("kill").args(["-9", &pid]).status().unwrap();
    // the postmaster restarts every backend; the job's worker comes back by itself
    c.wait_caught_up("q", "f");
    assert_ne!(worker_pid(&c, "f"), Some(pid));
    o.batch(&c, "q", 100, 50, 10);
    c.wait_caught_up("q", "f");
    assert_latest(&c, "orders", &o);
}

#[test]
fn immediate_restart_of_the_server_mid_batch() {
    let c = Cluster::start();
    setup(&c, ORDERS_ALL);
    let mut o = Oracle::default();
    c.start_job("f", "q", &[("dateformat", ""), ("mode", "keep_all")]);
    o.batch(&c, "q", 1000, 100, 0);
    o.batch(&c, "q", 200_000, 500, 0);
    wait_writing(&c, "f");
    c.restart_immediate();
    c.wait_caught_up("q", "f");
    o.batch(&c, "q", 100, 50, 0);
    c.wait_caught_up("q", "f");
    assert_all(&c, "orders", &o, 1);
}

#[test]
fn the_source_unreachable_for_a_while() {
    let c = Cluster::start();
    setup(&c, ORDERS);
    let mut o = Oracle::default();
    c.start_job("f", "q", &[("dateformat", "")]);
    o.batch(&c, "q", 500, 0, 0);
    c.wait_caught_up("q", "f");
    o.batch(&c, "q", 500, 100, 50);
    // connections refused and existing ones terminated
    c.exec("postgres", "ALTER DATABASE source ALLOW_CONNECTIONS false");
    c.exec("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'source'");
    c.wait_status("f", "state", |s| s == Some("retrying"));
    let err = c.status("f", "last_error").unwrap();
    assert!(err.contains("source") || err.contains("connection"), "{err}");
    std::thread::sleep(Duration::from_secs(2));
    c.exec("postgres", "ALTER DATABASE source ALLOW_CONNECTIONS true");
    c.wait_caught_up("q", "f");
    c.wait_status("f", "state", |s| s == Some("running"));
    assert_latest(&c, "orders", &o);
}

#[test]
fn the_source_connection_terminated_mid_fetch() {
    let c = Cluster::start();
    setup(&c, ORDERS);
    let mut o = Oracle::default();
    c.start_job("f", "q", &[("dateformat", "")]);
    o.batch(&c, "q", 200_000, 0, 0);
    wait_writing(&c, "f");
    c.exec("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'source' AND backend_type = 'client backend' AND pid <> pg_backend_pid()");
    c.wait_status("f", "last_error", |e| e.is_some());
    c.wait_caught_up("q", "f");
    o.batch(&c, "q", 100, 100, 100);
    c.wait_caught_up("q", "f");
    assert_latest(&c, "orders", &o);
}

#[test]
fn a_table_locked_longer_than_the_lock_timeout() {
    let c = Cluster::start();
    setup(&c, ORDERS);
    let mut o = Oracle::default();
    c.start_job("f", "q", &[("dateformat", ""), ("lock_timeout", "0.5")]);
    o.batch(&c, "q", 100, 0, 0);
    c.wait_caught_up("q", "f");
    let mut locker = c.connect("target");
    locker.batch_execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").unwrap();
    o.batch(&c, "q", 100, 10, 10);
    c.wait_status("f", "last_error", |e| e.is_some_and(|e| e.contains("lock timeout")));
    assert_eq!(c.status("f", "state").as_deref(), Some("retrying"));
    std::thread::sleep(Duration::from_secs(1));
    locker.batch_execute("COMMIT").unwrap();
    c.wait_caught_up("q", "f");
    assert_latest(&c, "orders", &o);
}

#[test]
fn a_partition_dropped_while_the_job_runs() {
    let c = Cluster::start();
    setup(&c, ORDERS);
    let mut o = Oracle::default();
    c.start_job("f", "q", &[]);
    o.batch(&c, "q", 300, 0, 0);
    c.wait_caught_up("q", "f");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    c.target_sql(&format!("DROP TABLE {part}"));
    // what was in it is gone by the DBA's hand: from here the oracle starts afresh
    let mut after = Oracle { next_id: o.next_id, round: o.round, ..Default::default() };
    after.batch(&c, "q", 200, 0, 0);
    c.wait_caught_up("q", "f");
    assert_latest(&c, &part, &after);
    assert_eq!(c.log().matches(&format!("created partition public.{part}")).count(), 2);
}

#[test]
fn two_jobs_create_the_same_new_partitions_at_once() {
    let c = Cluster::start();
    c.create_queue("q1");
    c.create_queue("q2");
    c.source_sql(ORDERS);
    c.add_mixed_triggers("orders", "q1", "id");
    c.exec("source", "CREATE TRIGGER cube_replica2 AFTER INSERT OR UPDATE ON orders FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('q2')");
    c.target_sql(ORDERS_ALL);
    let opts = [("mode", "keep_all")];
    c.start_job("one", "q1", &opts);
    c.start_job("two", "q2", &opts);
    let mut o = Oracle::default();
    // the first batch of each queue needs the day's partition: both jobs create it at once
    for _ in 0..3 {
        o.batch(&c, "q1", 5000, 100, 0);
        c.tick("q2");
    }
    c.wait_caught_up("q1", "one");
    c.wait_caught_up("q2", "two");
    for job in ["one", "two"] {
        assert_eq!(c.status(job, "state").as_deref(), Some("running"), "{job}: {:?}", c.status(job, "last_error"));
    }
    assert_all(&c, &format!("orders_{}", c.suffix("YYYY_MM_DD")), &o, 2);
}

/// Exactly once when one batch spans many partitions (part_mode = date_field): the worker is
/// killed while writing it, and every row is in the partition of its own day once.
#[test]
fn sigkill_mid_batch_that_spans_many_partitions() {
    let c = Cluster::start();
    c.create_queue("q");
    c.source_sql("CREATE TABLE orders (id int PRIMARY KEY, txt text, day date)");
    c.add_mixed_triggers("orders", "q", "id");
    c.target_sql("CREATE TABLE orders (id int PRIMARY KEY, txt text, day date)");
    c.start_job("f", "q", &[("part_mode", "date_field"), ("part_field", "day")]);
    // one statement, one tick: the batch exists only once it is all there
    let batch = |lo: i32, hi: i32| {
        c.source_sql(&format!(
            "INSERT INTO orders SELECT g, 't' || g, date '2020-01-01' + g % 40 FROM generate_series({lo}, {hi}) g;
             UPDATE orders SET txt = 'u' || id WHERE id % 3 = 0 AND id BETWEEN {lo} AND {hi} - 1000;"
        ));
        c.tick("q");
    };
    batch(1, 1000);
    c.wait_caught_up("q", "f");
    batch(1001, 200_000);
    c.wait_until("worker writing a batch", Duration::from_secs(60), || {
        c.value(
            "target",
            "SELECT (count(*) > 0)::text FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE a.backend_type = 'cube_dispatcher f' AND l.mode = 'RowExclusiveLock'
                AND l.relation::regclass::text LIKE 'orders\\_%'",
        )
        .as_deref()
            == Some("true")
    });
    let pid = worker_pid(&c, "f").unwrap();
    std::process::Command::new("kill").args(["-9", &pid]).status().unwrap();
    c.wait_caught_up("q", "f");
    assert_ne!(worker_pid(&c, "f"), Some(pid));
    let source = c.query("source", "SELECT 'orders_' || to_char(day, 'YYYY_MM_DD'), id, txt FROM orders ORDER BY 2");
    let union: String = (0..40)
        .map(|d| {
            let day = c.value("source", &format!("SELECT to_char(date '2020-01-01' + {d}, 'YYYY_MM_DD')")).unwrap();
            format!("SELECT 'orders_{day}', id, txt FROM orders_{day}")
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    assert_eq!(
        c.query("target", &format!("SELECT * FROM ({union}) u ORDER BY 2")),
        source,
        "every row once, in its partition"
    );
}
