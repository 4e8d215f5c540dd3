//! part_mode, part_field and period: which partition each row goes to. The expected partition of
//! a row is computed by the test with PostgreSQL's to_char on the source (the documented rule:
//! the source's time zone), never from what the worker wrote.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::Cluster;
use std::collections::BTreeMap;

/// Partition -> its rows (id, `column`), for every table of the target named `<parent>_...`.
fn partitions_by(c: &Cluster, parent: &str, column: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let names = c.query(
        "target",
        &format!(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE '{parent}\\_%' ORDER BY 1"
        ),
    );
    let mut out = BTreeMap::new();
    for n in names {
        let name = n[0].clone().unwrap();
        let rows = c
            .query("target", &format!("SELECT id::text, {column}::text FROM {name} ORDER BY id"))
            .into_iter()
            .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap_or_default()))
            .collect();
        out.insert(name, rows);
    }
    out
}

/// The first column of a query on the target, as text.
fn column(c: &Cluster, sql: &str) -> Vec<String> {
    c.query("target", sql).into_iter().map(|r| r[0].clone().unwrap_or_default()).collect()
}

/// The query's plan scans one partition, this one: the parent prunes.
fn assert_scans_only(c: &Cluster, query: &str, leaf: &str) {
    let plan = column(c, &format!("EXPLAIN (COSTS OFF) {query}"));
    let scans: Vec<&String> = plan.iter().filter(|l| l.contains("Scan on")).collect();
    assert_eq!(scans.len(), 1, "{plan:#?}");
    assert!(scans[0].contains(leaf), "{plan:#?}");
}

fn partitions(c: &Cluster, parent: &str) -> BTreeMap<String, Vec<(String, String)>> {
    partitions_by(c, parent, "txt")
}

/// The partition of `time` (an SQL expression) under `fmt`, by the rule: to_char on the source.
fn on_source(c: &Cluster, parent: &str, time: &str, fmt: &str) -> String {
    format!("{parent}_{}", c.value("source", &format!("SELECT to_char({time}, '{fmt}')")).unwrap())
}

fn expect(list: &[(String, &str, &str)]) -> BTreeMap<String, Vec<(String, String)>> {
    let mut m: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (part, id, txt) in list {
        m.entry(part.clone()).or_default().push((id.to_string(), txt.to_string()));
    }
    for rows in m.values_mut() {
        rows.sort_by_key(|(id, _)| id.parse::<i64>().unwrap());
    }
    m
}

/// date_field, daily by a date column and hourly by a timestamptz column, rows years apart; the
/// source's time zone (Asia/Kolkata, +05:30) decides, not the target's.
#[test]
fn date_field_places_rows_by_their_own_time_in_the_source_time_zone() {
    let c = Cluster::start();
    c.exec("postgres", "ALTER DATABASE source SET TimeZone = 'Asia/Kolkata'");
    c.exec("postgres", "ALTER DATABASE target SET TimeZone = 'America/New_York'");
    c.feed(
        "q",
        "orders",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text, d timestamptz, day date)",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text, d timestamptz, day date)",
    );
    c.start_job("daily", "q", &[("part_mode", "date_field"), ("part_field", "day")]);
    c.start_job("hourly", "q", &[("part_mode", "date_field"), ("part_field", "public.orders:d"), ("period", "hour")]);
    let rows = [
        (1, "2019-03-05 20:00:00+00", "2019-03-05"),
        (2, "2023-07-01 00:10:00+00", "2023-07-01"),
        (3, "2026-12-01 23:59:00+00", "2026-12-01"),
        (4, "2026-12-01 18:29:59+00", "2026-12-01"),
    ];
    for (id, d, day) in rows {
        c.source_sql(&format!("INSERT INTO orders VALUES ({id}, 'v{id}', '{d}', '{day}')"));
    }
    // keep_latest: an update that moves a row to another partition, a delete
    c.source_sql("UPDATE orders SET txt = 'moved', d = '2024-01-01 12:00:00+00', day = '2024-01-01' WHERE id = 1");
    c.source_sql("DELETE FROM orders WHERE id = 2");
    c.tick("q");
    c.wait_caught_up("q", "daily");
    c.wait_caught_up("q", "hourly");

    let hourly = |id: &'static str, d: &str, txt: &'static str| {
        (on_source(&c, "orders", &format!("timestamptz '{d}'"), "YYYY_MM_DD_HH24"), id, txt)
    };
    let daily = |id: &'static str, day: &str, txt: &'static str| (format!("orders_{}", day.replace('-', "_")), id, txt);
    let ids = ["1", "2", "3", "4"];
    let mut want = vec![
        // the update's new version goes to the new partition; the old one stays where it was
        hourly(ids[0], rows[0].1, "v1"),
        hourly(ids[0], "2024-01-01 12:00:00+00", "moved"),
        hourly(ids[2], rows[2].1, "v3"),
        hourly(ids[3], rows[3].1, "v4"),
        daily(ids[0], rows[0].2, "v1"),
        daily(ids[0], "2024-01-01", "moved"),
        daily(ids[2], rows[2].2, "v3"),
        daily(ids[3], rows[3].2, "v4"),
    ];
    // the delete emptied row 2's partitions (created by its insert in the same batch)
    want.push(hourly(ids[1], rows[1].1, "gone"));
    want.push(daily(ids[1], rows[1].2, "gone"));
    let mut want = expect(&want);
    for rows in want.values_mut() {
        rows.retain(|(_, txt)| txt != "gone");
    }
    assert_eq!(partitions(&c, "orders"), want);
    // spelled out: 20:00 UTC is 01:30 the next day in Kolkata; 18:29:59 UTC is 23:59:59 there
    assert!(want.contains_key("orders_2019_03_06_01") && want.contains_key("orders_2026_12_01_23"), "{want:?}");
    assert!(want.contains_key("orders_2026_12_02_05"), "{want:?}");
}

/// event_time places each event by its ev_time (here set years apart with pgq.insert_event_raw);
/// current_time by when the target writes it.
#[test]
fn event_time_and_current_time() {
    let c = Cluster::start();
    c.feed("q", "orders", "CREATE TABLE orders (id int, txt text)", "CREATE TABLE orders (id int, txt text)");
    c.start_job("by_event", "q", &[("mode", "keep_all"), ("part_mode", "event_time"), ("period", "month")]);
    c.start_job("by_event_h", "q", &[("mode", "keep_all"), ("part_mode", "event_time"), ("period", "hour")]);
    c.start_job("now", "q", &[("mode", "keep_all"), ("part_mode", "current_time"), ("period", "year")]);
    c.start_job("by_batch_h", "q", &[("mode", "keep_all"), ("dateformat", "YYYY_MM_DD_HH24\"b\"")]);
    c.start_job("by_event_d", "q", &[("mode", "keep_all"), ("part_mode", "event_time")]);
    c.start_job(
        "now_d",
        "q",
        &[("mode", "keep_all"), ("part_mode", "current_time"), ("dateformat", "YYYY_MM_DD\"w\"")],
    );
    let times = ["2001-02-03 04:05:06+00", "2015-06-30 23:00:00+00", "2015-06-01 00:00:00+00"];
    for (i, t) in times.iter().enumerate() {
        c.source_sql(&format!(
            "SELECT pgq.insert_event_raw('q', NULL, '{t}', NULL, NULL, 'I:id', 'id={i}&txt=old{i}', 'public.orders', NULL, NULL, NULL)"
        ));
    }
    c.source_sql("INSERT INTO orders VALUES (9, 'today')");
    c.tick("q");
    for job in ["by_event", "by_event_h", "now", "by_batch_h", "by_event_d", "now_d"] {
        c.wait_caught_up("q", job);
    }
    let month = |t: &str| on_source(&c, "orders", &format!("timestamptz '{t}'"), "YYYY_MM");
    let hour = |t: &str| on_source(&c, "orders", &format!("timestamptz '{t}'"), "YYYY_MM_DD_HH24");
    let this_year = on_source(&c, "orders", "now()", "YYYY");
    let this_month = on_source(&c, "orders", "now()", "YYYY_MM");
    // ev_time of the trigger's row, and the batch's end (its tick), as the source has them
    let row_time =
        c.value("source", "SELECT ev_time::text FROM pgq.event_template WHERE ev_data LIKE 'id=9&%'").unwrap();
    let last_tick = c
        .value("source", "SELECT max(t.tick_time)::text FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue WHERE q.queue_name = 'q'")
        .unwrap();
    let batch_hour = on_source(&c, "orders", &format!("timestamptz '{last_tick}'"), "YYYY_MM_DD_HH24\"b\"");
    let row_hour = hour(&row_time);
    let day = |t: &str| on_source(&c, "orders", &format!("timestamptz '{t}'"), "YYYY_MM_DD");
    let today_w = on_source(&c, "orders", "now()", "YYYY_MM_DD\"w\"");
    let want = expect(&[
        (month(times[0]), "0", "old0"),
        (month(times[1]), "1", "old1"),
        (month(times[2]), "2", "old2"),
        (this_month, "9", "today"),
        (hour(times[0]), "0", "old0"),
        (hour(times[1]), "1", "old1"),
        (hour(times[2]), "2", "old2"),
        (row_hour, "9", "today"),
        (this_year.clone(), "0", "old0"),
        (this_year.clone(), "1", "old1"),
        (this_year.clone(), "2", "old2"),
        (this_year, "9", "today"),
        // batch_time: every event of the batch in the hour of its end, whatever its ev_time
        (batch_hour.clone(), "0", "old0"),
        (batch_hour.clone(), "1", "old1"),
        (batch_hour.clone(), "2", "old2"),
        (batch_hour, "9", "today"),
        (day(times[0]), "0", "old0"),
        (day(times[1]), "1", "old1"),
        (day(times[2]), "2", "old2"),
        (day(&row_time), "9", "today"),
        // current_time daily: the day the target wrote them
        (today_w.clone(), "0", "old0"),
        (today_w.clone(), "1", "old1"),
        (today_w.clone(), "2", "old2"),
        (today_w, "9", "today"),
    ]);
    assert_eq!(partitions(&c, "orders"), want);
}

/// A row that part_field cannot place: retried with an error that names job, batch, event, table
/// and column (nothing of the batch written), then, with on_error = dead_letter, parked with its
/// reason while the rest is written; a parked event keeps its partition for the replay.
#[test]
fn a_row_part_field_cannot_place_is_a_clear_error_or_a_dead_letter() {
    let c = Cluster::start();
    c.feed(
        "q",
        "orders",
        "CREATE TABLE orders (id int PRIMARY KEY, d text)",
        "CREATE TABLE orders (id int PRIMARY KEY, d text)",
    );
    c.source_sql("CREATE TABLE items (id int PRIMARY KEY, d text)");
    c.add_logutriga("items", "q");
    c.target_sql("CREATE TABLE items (id int PRIMARY KEY, d text)");
    let opts = [("part_mode", "date_field"), ("part_field", "public.orders:d")];
    c.start_job("pf", "q", &opts);
    c.source_sql("INSERT INTO orders VALUES (1, '2020-01-01'), (2, NULL)");
    c.tick("q");
    c.wait_status("pf", "last_error", |e| e.is_some_and(|e| e.contains("is NULL")));
    let err = c.status("pf", "last_error").unwrap();
    assert!(err.contains("batch ") && err.contains("table public.orders: part_field column \"d\" is NULL"), "{err}");
    assert!(err.contains("event "), "{err}");
    assert!(c.log().contains("cube_dispatcher job pf: batch "), "the log line names the job");
    assert_eq!(partitions_by(&c, "orders", "d"), BTreeMap::new(), "nothing of the failing batch is written");

    // dead letters: the good row goes on, the others are parked with their reason
    c.configure("pf", &[("on_error", "dead_letter"), ("part_template", "")]);
    c.target_sql("CREATE TABLE orders_2020_01_01 (LIKE orders)");
    c.exec("target", "SELECT cube_dispatcher.reload('pf')");
    c.source_sql("INSERT INTO orders VALUES (3, 'soon'); INSERT INTO items VALUES (1, '2020-01-01');");
    c.source_sql("INSERT INTO orders VALUES (4, '2021-05-05 10:00')");
    c.tick("q");
    c.wait_caught_up("q", "pf");
    assert_eq!(partitions_by(&c, "orders", "d"), expect(&[("orders_2020_01_01".into(), "1", "2020-01-01")]));
    let letters = c.query("target", "SELECT ev_data, suffix, error FROM cube_dispatcher.dead_letter ORDER BY ev_id");
    let errors: Vec<(String, Option<String>, String)> =
        letters.into_iter().map(|r| (r[0].clone().unwrap(), r[1].clone(), r[2].clone().unwrap())).collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[0].2.contains("part_field column \"d\" is NULL") && errors[0].1.is_none(), "{errors:?}");
    assert!(
        errors[1].2.contains(
            "part_field column \"d\" \"soon\" is not a time: invalid input syntax for type timestamp with time zone"
        ),
        "{errors:?}"
    );
    assert!(
        errors[2].2.contains("table public.items: part_field names no column for table public.items"),
        "{errors:?}"
    );
    assert!(errors[3].2.contains("orders_2021_05_05 does not exist and part_template is empty"), "{errors:?}");
    assert_eq!(errors[3].1.as_deref(), Some("2021_05_05"), "a parked event keeps the partition it was given");

    // the DBA makes the partition; the replay writes the row there
    c.target_sql("CREATE TABLE orders_2021_05_05 (LIKE orders)");
    assert_eq!(c.value("target", "SELECT cube_dispatcher.replay_dead_letters('pf')").as_deref(), Some("1"));
    assert_eq!(c.query("target", "SELECT id::text FROM orders_2021_05_05"), vec![vec![Some("4".to_string())]]);
    assert_eq!(c.count("target", "cube_dispatcher.dead_letter"), 3);
}

/// pre_part and post_part run around the creation of each new partition, in its transaction,
/// with the template's words; a failing one leaves no partition and the batch is retried.
#[test]
fn pre_part_and_post_part_run_around_each_new_partition() {
    let c = Cluster::start();
    c.feed(
        "q",
        "orders",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text)",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text)",
    );
    c.target_sql("CREATE TABLE part_log (n serial, step text, tbl text, parent text)");
    c.start_job(
        "h",
        "q",
        &[
            ("part_mode", "event_time"),
            ("pre_part", "INSERT INTO public.part_log (step, tbl, parent) VALUES ('pre', '_DEST_TABLE', '_PARENT')"),
            (
                "post_part",
                "INSERT INTO public.part_log (step, tbl, parent) VALUES ('post', '_DEST_TABLE', '_PARENT');
                 CREATE INDEX _SCHEMA_TABLE_txt ON _DEST_TABLE (txt)",
            ),
        ],
    );
    for (i, t) in ["2001-02-03 12:00:00+00", "2001-02-03 13:00:00+00", "2002-02-03 12:00:00+00"].iter().enumerate() {
        c.source_sql(&format!(
            "SELECT pgq.insert_event_raw('q', NULL, '{t}', NULL, NULL, 'I:id', 'id={i}&txt=t{i}', 'public.orders', NULL, NULL, NULL)"
        ));
    }
    c.tick("q");
    c.wait_caught_up("q", "h");
    let day = |t: &str| on_source(&c, "public.orders", &format!("timestamptz '{t}'"), "YYYY_MM_DD");
    let (a, b) = (day("2001-02-03 12:00:00+00"), day("2002-02-03 12:00:00+00"));
    let log = c.query("target", "SELECT step, tbl, parent FROM part_log ORDER BY n");
    let row = |s: &str, t: &str| vec![Some(s.to_string()), Some(t.to_string()), Some("public.orders".to_string())];
    assert_eq!(
        log,
        vec![row("pre", &a), row("post", &a), row("pre", &b), row("post", &b)],
        "once per new partition, in order"
    );
    for p in [&a, &b] {
        let index = p.replace('.', "_") + "_txt";
        assert_eq!(
            c.value(
                "target",
                &format!(
                    "SELECT indrelid::regclass::text FROM pg_index WHERE indexrelid = to_regclass('public.{index}')"
                )
            )
            .as_deref(),
            Some(p.trim_start_matches("public."))
        );
    }

    // a hook that fails: no partition, the batch is retried with the step named
    c.configure("h", &[("post_part", "SELECT 1/0")]);
    c.exec("target", "SELECT cube_dispatcher.reload('h')");
    c.source_sql(
        "SELECT pgq.insert_event_raw('q', NULL, '2003-01-01 12:00:00+00', NULL, NULL, 'I:id', 'id=9&txt=x', 'public.orders', NULL, NULL, NULL)",
    );
    c.tick("q");
    c.wait_status("h", "last_error", |e| e.is_some_and(|e| e.contains("post_part")));
    let err = c.status("h", "last_error").unwrap();
    let new = day("2003-01-01 12:00:00+00");
    assert!(err.contains(&format!("creating partition {new} failed: post_part: division by zero")), "{err}");
    assert_eq!(c.value("target", &format!("SELECT to_regclass('{new}')::text")), None, "the partition is rolled back");
    assert_eq!(c.count("target", "part_log"), 4, "the pre_part of the failed attempt is rolled back too");
}

/// retention_period drops exactly the expired partitions of the job: those it made and the
/// Python tool's of the same names; never the parent, a table whose suffix does not read back,
/// or another parent's table. ignore_old_events then skips (and counts) rows for them.
#[test]
fn retention_drops_exactly_the_expired_partitions_and_old_events_are_skipped() {
    let c = Cluster::start();
    let ddl = "CREATE TABLE orders (id int PRIMARY KEY, txt text, day date)";
    c.feed("q", "orders", ddl, ddl);
    let today = c.value("source", "SELECT to_char(current_date, 'YYYY_MM_DD')").unwrap();
    // what was there before: the Python tool's partitions (one expired, one current) and decoys
    for t in [
        "orders_2019_01_01".to_string(),
        format!("orders_{today}"),
        "orders_2019_01_01_old".into(),
        "orders_backup".into(),
        "orders_items".into(),
        "orders_items_2019_01_01".into(),
        "orders_2019_13_01".into(),
    ] {
        c.target_sql(&format!("CREATE TABLE {t} (LIKE orders)"));
    }
    c.start_job("r", "q", &[("part_mode", "date_field"), ("part_field", "day"), ("retention_period", "30 days")]);
    c.source_sql(
        "INSERT INTO orders VALUES (1, 'old', '2019-06-01'), (2, 'older', '2020-02-02'), (3, 'now', current_date),
                                   (4, 'recent', current_date - 10)",
    );
    c.tick("q");
    c.wait_caught_up("q", "r");
    let recent = c.value("source", "SELECT to_char(current_date - 10, 'YYYY_MM_DD')").unwrap();
    let tables = || {
        column(
            &c,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'orders%' ORDER BY 1",
        )
    };
    let mut want: Vec<String> = vec![
        "orders".into(),
        "orders_2019_01_01_old".into(),
        "orders_2019_13_01".into(),
        format!("orders_{recent}"),
        format!("orders_{today}"),
        "orders_backup".into(),
        "orders_items".into(),
        "orders_items_2019_01_01".into(),
    ];
    want.sort();
    c.wait_until("the expired partitions dropped", std::time::Duration::from_secs(30), || tables() == want);
    let log = c.log();
    for dropped in ["public.orders_2019_06_01", "public.orders_2020_02_02", "public.orders_2019_01_01"] {
        assert!(
            log.contains(&format!("cube_dispatcher job r: dropped partition {dropped}: its period ended at ")),
            "{dropped}"
        );
    }
    assert_eq!(
        c.query("target", "SELECT partition, present::text FROM cube_dispatcher.partitions ORDER BY 1"),
        vec![vec![Some(format!("public.orders_{recent}")), Some("true".into())]],
        "the job's list: what it made and still has (today's partition was there before)"
    );
    let bounds = c.value(
        "target",
        &format!("SELECT (period_end - period_start)::text FROM cube_dispatcher.partitions WHERE partition = 'public.orders_{recent}'"),
    );
    assert_eq!(bounds.as_deref(), Some("1 day"));

    // without ignore_old_events an old row makes its partition again; with it, it is skipped
    c.configure("r", &[("ignore_old_events", "on")]);
    c.exec("target", "SELECT cube_dispatcher.reload('r')");
    c.source_sql("INSERT INTO orders VALUES (5, 'late', '2019-06-01'), (6, 'now too', current_date)");
    c.tick("q");
    c.wait_caught_up("q", "r");
    assert_eq!(c.value("target", "SELECT to_regclass('orders_2019_06_01')::text"), None, "not made again");
    assert_eq!(c.status("r", "old_events_skipped").as_deref(), Some("1"));
    assert_eq!(c.count("target", &format!("orders_{today}")), 2);
}

/// A native partitioned parent: rows go into the leaf that covers their period, whoever made it
/// (here a DBA's partition for all of 2019); a missing one is made as PARTITION OF the parent
/// with the period's bounds, so queries on the parent prune; the DEFAULT partition gets nothing.
#[test]
fn native_partitions_take_rows_into_the_leaf_of_their_period() {
    let c = Cluster::start();
    c.feed(
        "q",
        "orders",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text, day date)",
        "CREATE TABLE orders (id int NOT NULL, txt text, day date NOT NULL) PARTITION BY RANGE (day);
         CREATE TABLE orders_default PARTITION OF orders DEFAULT;
         CREATE TABLE orders_y2019 PARTITION OF orders FOR VALUES FROM ('2019-01-01') TO ('2020-01-01');",
    );
    c.start_job("n", "q", &[("part_mode", "date_field"), ("part_field", "day")]);
    c.source_sql(
        "INSERT INTO orders VALUES (1, 'a', '2019-06-01'), (2, 'b', '2023-07-01'), (3, 'c', '2023-07-01'), (4, 'd', '2023-07-02');
         UPDATE orders SET txt = 'c2' WHERE id = 3;
         DELETE FROM orders WHERE id = 4;",
    );
    c.tick("q");
    c.wait_caught_up("q", "n");
    let rows = c.query("target", "SELECT tableoid::regclass::text, id::text, txt FROM orders ORDER BY id");
    let row = |t: &str, id: &str, txt: &str| vec![Some(t.to_string()), Some(id.to_string()), Some(txt.to_string())];
    assert_eq!(
        rows,
        vec![row("orders_y2019", "1", "a"), row("orders_2023_07_01", "2", "b"), row("orders_2023_07_01", "3", "c2")]
    );
    let bound = |t: &str| {
        c.value("target", &format!("SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = '{t}'"))
    };
    assert_eq!(bound("orders_2023_07_01").as_deref(), Some("FOR VALUES FROM ('2023-07-01') TO ('2023-07-02')"));
    assert_eq!(bound("orders_2023_07_02").as_deref(), Some("FOR VALUES FROM ('2023-07-02') TO ('2023-07-03')"));
    assert_eq!(c.count("target", "orders_default"), 0);
    assert_eq!(
        c.value("target", "SELECT to_regclass('orders_2019_06_01')::text"),
        None,
        "nothing made where a leaf covers"
    );
    // keep_latest: a unique key per partition
    assert_eq!(
        c.value("target", "SELECT indisunique::text FROM pg_index WHERE indrelid = 'orders_2023_07_01'::regclass")
            .as_deref(),
        Some("true")
    );
    assert_scans_only(&c, "SELECT * FROM orders WHERE day >= '2023-07-01' AND day < '2023-07-02'", "orders_2023_07_01");
}

/// With batch_time, event_time and current_time the job fills a native parent's partition key
/// (a column the source table does not have) with the time that placed the row.
#[test]
fn native_partitions_keyed_by_the_time_the_job_fills_in() {
    let c = Cluster::start();
    c.feed(
        "qa",
        "a",
        "CREATE TABLE a (id int PRIMARY KEY, txt text)",
        "CREATE TABLE a (id int, txt text, at timestamptz) PARTITION BY RANGE (at)",
    );
    c.feed(
        "qb",
        "b",
        "CREATE TABLE b (id int PRIMARY KEY, txt text)",
        "CREATE TABLE b (id int, txt text, d date) PARTITION BY RANGE (d)",
    );
    c.feed(
        "qc",
        "c",
        "CREATE TABLE c (id int PRIMARY KEY, txt text)",
        "CREATE TABLE c (id int, txt text, w timestamp) PARTITION BY RANGE (w)",
    );
    c.start_job("bt", "qa", &[]);
    c.start_job("et", "qb", &[("mode", "keep_all"), ("part_mode", "event_time")]);
    c.start_job("ct", "qc", &[("part_mode", "current_time"), ("period", "hour")]);
    c.source_sql("INSERT INTO a VALUES (1, 'x'); INSERT INTO c VALUES (1, 'x');");
    for (i, t) in ["2001-02-03 04:05:06+00", "2001-02-04 23:59:59+00"].iter().enumerate() {
        c.source_sql(&format!(
            "SELECT pgq.insert_event_raw('qb', NULL, '{t}', NULL, NULL, 'I:id', 'id={i}&txt=old', 'public.b', NULL, NULL, NULL)"
        ));
    }
    for q in ["qa", "qb", "qc"] {
        c.tick(q);
    }
    c.wait_caught_up("qa", "bt");
    c.wait_caught_up("qb", "et");
    c.wait_caught_up("qc", "ct");
    let today = c.value("source", "SELECT to_char(now(), 'YYYY_MM_DD')").unwrap();
    assert_eq!(
        c.query("target", "SELECT tableoid::regclass::text, ('a_' || to_char(at, 'YYYY_MM_DD'))::text FROM a"),
        vec![vec![Some(format!("a_{today}")), Some(format!("a_{today}"))]],
        "the key holds the batch's end, which names the leaf"
    );
    assert_eq!(
        c.query("target", "SELECT tableoid::regclass::text, d::text FROM b ORDER BY id"),
        vec![
            vec![Some("b_2001_02_03".into()), Some("2001-02-03".into())],
            vec![Some("b_2001_02_04".into()), Some("2001-02-04".into())],
        ]
    );
    // the key holds the write's time, and that time names the leaf
    assert_eq!(
        c.query(
            "target",
            "SELECT (tableoid::regclass::text = 'c_' || to_char(w, 'YYYY_MM_DD_HH24'))::text,
                    (w BETWEEN localtimestamp - interval '5 minutes' AND localtimestamp)::text FROM c"
        ),
        vec![vec![Some("true".into()), Some("true".into())]]
    );
    assert_scans_only(&c, "SELECT * FROM b WHERE d = '2001-02-03'", "b_2001_02_03");
}

/// What a native parent cannot take is a clear error naming it, and nothing is written.
#[test]
fn a_native_parent_the_job_cannot_fill_is_a_clear_error() {
    let c = Cluster::start();
    c.feed(
        "q",
        "orders",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text, day date, shipped date)",
        "CREATE TABLE orders (id int NOT NULL, txt text, day date NOT NULL, shipped date) PARTITION BY RANGE (day)",
    );
    c.feed(
        "q2",
        "items",
        "CREATE TABLE items (id int PRIMARY KEY)",
        "CREATE TABLE items (id int NOT NULL) PARTITION BY RANGE (id)",
    );
    c.start_job("bt", "q", &[("part_mode", "date_field"), ("part_field", "shipped")]);
    c.source_sql("INSERT INTO orders VALUES (1, 'a', '2019-06-01', '2019-06-03')");
    c.tick("q");
    c.wait_status("bt", "last_error", |e| e.is_some_and(|e| e.contains("partitioned table")));
    let err = c.status("bt", "last_error").unwrap();
    assert!(
        err.contains("table public.orders: parent table public.orders is a partitioned table: it is partitioned by column \"day\", but part_field places its rows by \"shipped\""),
        "{err}"
    );
    assert_eq!(c.count("target", "orders"), 0);
    c.start_job("it", "q2", &[]);
    c.source_sql("INSERT INTO items VALUES (1)");
    c.tick("q2");
    c.wait_status("it", "last_error", |e| e.is_some_and(|e| e.contains("partitioned table")));
    let err = c.status("it", "last_error").unwrap();
    assert!(err.contains("its partition key column \"id\" is not a date, timestamp or timestamptz"), "{err}");
}

/// A parent pg_partman manages works with a job unchanged: rows land in pg_partman's own
/// partitions (its names, premade), the job makes one only for a range pg_partman has not made,
/// and pg_partman's maintenance goes on working.
#[test]
fn a_parent_managed_by_pg_partman() {
    let c = Cluster::start();
    c.feed(
        "q",
        "orders",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text, day date)",
        "CREATE TABLE orders (id int NOT NULL, txt text, day date NOT NULL) PARTITION BY RANGE (day);
         CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman;
         SELECT partman.create_parent('public.orders', 'day', 'native', 'daily', p_premake := 3,
                                      p_start_partition := (current_date - 2)::text);",
    );
    c.start_job("pm", "q", &[("part_mode", "date_field"), ("part_field", "day")]);
    c.source_sql("INSERT INTO orders VALUES (1, 'today', current_date), (2, 'later', current_date + 40)");
    c.tick("q");
    c.wait_caught_up("q", "pm");
    let today = c.value("source", "SELECT to_char(current_date, 'YYYY_MM_DD')").unwrap();
    let later = c.value("source", "SELECT to_char(current_date + 40, 'YYYY_MM_DD')").unwrap();
    let rows = c.query("target", "SELECT tableoid::regclass::text, id::text FROM orders ORDER BY id");
    assert_eq!(
        rows,
        vec![
            vec![Some(format!("orders_p{today}")), Some("1".into())],
            vec![Some(format!("orders_{later}")), Some("2".into())],
        ],
        "pg_partman's partition where it made one; the job's where it had not"
    );
    assert_eq!(c.count("target", "orders_default"), 0);
    assert_eq!(c.value("target", &format!("SELECT to_regclass('orders_{today}')::text")), None);
    // pg_partman's maintenance still runs with the job's partition among its own
    c.exec("target", "SELECT partman.run_maintenance('public.orders')");
}

/// Retention under a native parent: the expired partition the job made is detached, then
/// dropped; the current one stays attached.
#[test]
fn retention_detaches_and_drops_native_partitions() {
    let c = Cluster::start();
    c.feed(
        "q",
        "events_n",
        "CREATE TABLE events_n (id int PRIMARY KEY, day date)",
        "CREATE TABLE events_n (id int NOT NULL, day date NOT NULL) PARTITION BY RANGE (day)",
    );
    c.start_job("rn", "q", &[("part_mode", "date_field"), ("part_field", "day"), ("retention_period", "30 days")]);
    c.source_sql("INSERT INTO events_n VALUES (1, '2019-06-01'), (2, current_date)");
    c.tick("q");
    c.wait_caught_up("q", "rn");
    let today = c.value("source", "SELECT to_char(current_date, 'YYYY_MM_DD')").unwrap();
    let leaves = || {
        column(&c, "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'events_n'::regclass ORDER BY 1")
    };
    c.wait_until("the expired partition dropped", std::time::Duration::from_secs(30), || {
        c.value("target", "SELECT to_regclass('events_n_2019_06_01')::text").is_none()
    });
    assert_eq!(leaves(), vec![format!("events_n_{today}")]);
    assert!(c.log().contains("cube_dispatcher job rn: dropped partition public.events_n_2019_06_01"));
    assert_eq!(c.count("target", "events_n"), 1);
}
