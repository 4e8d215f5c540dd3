//! The data path against real PgQ: logutriga events into partitions, both modes, exactly once.
mod common;
use common::Cluster;

const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, txt text, val numeric)";

fn row(v: &[Option<&str>]) -> Vec<Option<String>> {
    v.iter().map(|x| x.map(str::to_string)).collect()
}

#[test]
fn keep_latest_default_dateformat() {
    let c = Cluster::start();
    c.create_queue("q");
    c.source_sql(ORDERS);
    c.add_logutriga("orders", "q");
    c.target_sql(ORDERS);
    c.start_job("j", "q", &[]);

    c.source_sql("INSERT INTO orders VALUES (1, 'one', 1.5), (2, '', NULL), (3, 'three', 3)");
    c.source_sql("UPDATE orders SET txt = 'uno' WHERE id = 1; DELETE FROM orders WHERE id = 3;");
    c.tick("q");
    c.wait_caught_up("q", "j");
    c.source_sql("UPDATE orders SET val = 2.5 WHERE id = 1; INSERT INTO orders VALUES (4, NULL, 4)");
    c.tick("q");
    c.wait_caught_up("q", "j");

    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    assert_eq!(
        c.rows(&part, "id, txt, val"),
        vec![row(&[Some("1"), Some("uno"), Some("2.5")]), row(&[Some("2"), Some(""), None]), row(&[Some("4"), None, Some("4")])]
    );
    // the default keep_latest template gives the partition a primary key
    assert_eq!(
        c.value("target", &format!("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '{part}'::regclass AND contype = 'p'")).as_deref(),
        Some("PRIMARY KEY (id)")
    );
    assert_eq!(c.status("j", "batches_done").as_deref(), Some("2"));
    assert_eq!(c.status("j", "events_done").as_deref(), Some("7"));
    assert!(c.log().contains(&format!("cube_dispatcher job j: created partition public.{part}")), "{}", c.log_tail());
}

#[test]
fn keep_all_month_partitions_keep_every_version() {
    let c = Cluster::start();
    c.create_queue("q");
    c.source_sql(ORDERS);
    c.add_logutriga("orders", "q");
    c.target_sql(ORDERS);
    c.start_job("ka", "q", &[("mode", "keep_all"), ("dateformat", "YYYY_MM")]);

    c.source_sql("INSERT INTO orders VALUES (1, 'a', 1); UPDATE orders SET txt = 'b' WHERE id = 1; UPDATE orders SET txt = 'c' WHERE id = 1;");
    c.tick("q");
    c.wait_caught_up("q", "ka");
    let part = format!("orders_{}", c.suffix("YYYY_MM"));
    assert_eq!(
        c.rows(&part, "id, txt"),
        vec![row(&[Some("1"), Some("a")]), row(&[Some("1"), Some("b")]), row(&[Some("1"), Some("c")])]
    );
    // keep_all's default template has no primary key: several versions of a key fit
    assert_eq!(c.value("target", &format!("SELECT count(*) FROM pg_constraint WHERE conrelid = '{part}'::regclass")).as_deref(), Some("0"));

    // a delete is refused in keep_all, and the batch is left unfinished
    c.source_sql("INSERT INTO orders VALUES (2, 'x', 2); DELETE FROM orders WHERE id = 1;");
    c.tick("q");
    c.wait_status("ka", "last_error", |e| e.is_some_and(|e| e.contains("delete not supported in keep_all mode")));
    let err = c.status("ka", "last_error").unwrap();
    assert!(err.contains("table public.orders") && err.contains("event "), "{err}");
    assert_eq!(c.count("target", &part), 3, "nothing of the failed batch is written");
    assert_eq!(c.status("ka", "state").as_deref(), Some("retrying"));
}

#[test]
fn empty_dateformat_writes_into_the_table_itself() {
    let c = Cluster::start();
    c.create_queue("q");
    c.source_sql(ORDERS);
    c.add_logutriga("orders", "q");
    c.target_sql(ORDERS);
    c.start_job("np", "q", &[("dateformat", "")]);
    c.source_sql("INSERT INTO orders VALUES (1, 'a', 1), (2, 'b', 2); DELETE FROM orders WHERE id = 2;");
    c.tick("q");
    c.wait_caught_up("q", "np");
    assert_eq!(c.rows("orders", "id, txt"), vec![row(&[Some("1"), Some("a")])]);
    assert_eq!(c.value("target", "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'orders\\_%'").as_deref(), Some("0"));
}

#[test]
fn per_second_dateformat_splits_batches_into_partitions() {
    let c = Cluster::start();
    c.create_queue("q");
    c.source_sql(ORDERS);
    c.add_logutriga("orders", "q");
    c.target_sql(ORDERS);
    c.start_job("ps", "q", &[("dateformat", "YYYY_MM_DD_HH24_MI_SS"), ("mode", "keep_all")]);
    for i in 0..3 {
        c.source_sql(&format!("INSERT INTO orders VALUES ({i}, 'r{i}', {i})"));
        c.tick("q");
        c.wait_caught_up("q", "ps");
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let created: Vec<String> = c
        .query("target", "SELECT tablename FROM pg_tables WHERE tablename ~ '^orders_\\d{4}_\\d\\d_\\d\\d_\\d\\d_\\d\\d_\\d\\d$' ORDER BY 1")
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert_eq!(created.len(), 3, "one partition per batch second: {created:?}");
    for (i, t) in created.iter().enumerate() {
        assert_eq!(c.count("target", t), 1, "{t} holds batch {i}'s row");
    }
}
