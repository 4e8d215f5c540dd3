//! The data path against real PgQ: logutriga events into partitions, both modes, exactly once.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::Cluster;

const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, txt text, val numeric)";

fn row(v: &[Option<&str>]) -> Vec<Option<String>> {
    v.iter().map(|x| x.map(str::to_string)).collect()
}

#[test]
fn keep_latest_default_dateformat() {
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
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
        vec![
            row(&[Some("1"), Some("uno"), Some("2.5")]),
            row(&[Some("2"), Some(""), None]),
            row(&[Some("4"), None, Some("4")])
        ]
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
    c.feed("q", "orders", ORDERS, ORDERS);
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
    assert_eq!(
        c.value("target", &format!("SELECT count(*) FROM pg_constraint WHERE conrelid = '{part}'::regclass"))
            .as_deref(),
        Some("0")
    );

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
    c.feed("q", "orders", ORDERS, ORDERS);
    c.start_job("np", "q", &[("dateformat", "")]);
    c.source_sql("INSERT INTO orders VALUES (1, 'a', 1), (2, 'b', 2); DELETE FROM orders WHERE id = 2;");
    c.tick("q");
    c.wait_caught_up("q", "np");
    assert_eq!(c.rows("orders", "id, txt"), vec![row(&[Some("1"), Some("a")])]);
    assert_eq!(
        c.value("target", "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'orders\\_%'").as_deref(),
        Some("0")
    );
}

#[test]
fn per_second_dateformat_splits_batches_into_partitions() {
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
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

#[test]
fn names_types_nulls_and_escapes_survive_the_trip() {
    let c = Cluster::start();
    c.create_queue("q");
    let ddl = r#"CREATE SCHEMA "Sales";
        CREATE TABLE "Sales"."Order Lines" ("OrderId" int, line int, "Note Text" text, amount numeric(12,2),
            at timestamptz, doc jsonb, tags text[], blob bytea, PRIMARY KEY ("OrderId", line))"#;
    c.source_sql(ddl);
    c.add_logutriga(r#""Sales"."Order Lines""#, "q");
    c.target_sql(ddl);
    c.start_job("names", "q", &[]);
    c.source_sql(
        r#"INSERT INTO "Sales"."Order Lines" VALUES
            (1, 1, 'ä€ & = % + \ "quoted" ''single''', 12.5, '2026-01-02 03:04:05+00', '{"a": [1, "x&y"]}', '{a,"b c",NULL}', '\x00ff10'),
            (1, 2, '', NULL, NULL, 'null', '{}', ''),
            (2, 1, NULL, 0, 'infinity', '[]', NULL, NULL);
           UPDATE "Sales"."Order Lines" SET "Note Text" = 'tab	and
newline' WHERE "OrderId" = 2 AND line = 1;
           DELETE FROM "Sales"."Order Lines" WHERE "OrderId" = 1 AND line = 2;"#,
    );
    c.tick("q");
    c.wait_caught_up("q", "names");
    let part = format!(r#""Sales"."Order Lines_{}""#, c.suffix("YYYY_MM_DD"));
    let cols = r#""OrderId", line, "Note Text", amount::text, at::text, doc::text, tags::text, blob::text"#;
    let want = c.query("source", &format!(r#"SELECT {cols} FROM "Sales"."Order Lines" ORDER BY 1, 2"#));
    assert_eq!(want.len(), 2);
    assert_eq!(c.query("target", &format!("SELECT {cols} FROM {part} ORDER BY 1, 2")), want);
    // NULL and '' stay apart
    assert_eq!(
        c.value("target", &format!(r#"SELECT count(*) FROM {part} WHERE "Note Text" IS NULL"#)).as_deref(),
        Some("0")
    );
    assert_eq!(
        c.value("target", &format!(r#"SELECT count(*) FROM {part} WHERE tags IS NULL AND blob IS NULL"#)).as_deref(),
        Some("1")
    );
}

#[test]
fn template_words_are_substituted() {
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
    let template = "create table _DEST_TABLE (like _PARENT including defaults);
        alter table only _DEST_TABLE add constraint _SCHEMA_TABLE_pk primary key (_PKEY);
        create index _SCHEMA_TABLE_txt on _DEST_TABLE (txt);
        comment on table _DEST_TABLE is 'made from _PARENT'";
    c.start_job("tpl", "q", &[("part_template", template)]);
    c.source_sql("INSERT INTO orders VALUES (1, 'a', 1)");
    c.tick("q");
    c.wait_caught_up("q", "tpl");
    let day = c.suffix("YYYY_MM_DD");
    let part = format!("orders_{day}");
    assert_eq!(c.count("target", &part), 1);
    assert_eq!(
        c.value("target", &format!("SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '{part}'::regclass")),
        Some(format!("public_orders_{day}_pk PRIMARY KEY (id)"))
    );
    assert_eq!(
        c.value("target", &format!("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = '{part}'::regclass AND NOT indisprimary")),
        Some(format!("public_orders_{day}_txt"))
    );
    // words inside a string literal are replaced too, as the original did with plain text replace
    assert_eq!(
        c.value("target", &format!("SELECT obj_description('{part}'::regclass)")).as_deref(),
        Some("made from public.orders")
    );
}

#[test]
fn empty_template_makes_a_missing_partition_an_error_until_it_exists() {
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
    c.start_job("nt", "q", &[("part_template", "")]);
    c.source_sql("INSERT INTO orders VALUES (1, 'a', 1), (2, 'b', 2)");
    c.tick("q");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    c.wait_status("nt", "last_error", |e| e.is_some_and(|e| e.contains("does not exist and part_template is empty")));
    let err = c.status("nt", "last_error").unwrap();
    assert!(err.starts_with("batch ") && err.contains(&format!("public.{part}")), "{err}");
    // the DBA creates the partition: the same batch now goes through, once
    c.target_sql(&format!("CREATE TABLE {part} (LIKE orders)"));
    c.wait_caught_up("q", "nt");
    assert_eq!(c.count("target", &part), 2);
    assert_eq!(c.status("nt", "state").as_deref(), Some("running"));
}

#[test]
fn a_bad_event_stalls_the_batch_until_fixed_then_nothing_is_lost() {
    let c = Cluster::start();
    c.feed("q", "orders", "CREATE TABLE orders (id int PRIMARY KEY, txt text)", ORDERS);
    c.start_job("bad", "q", &[]);
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    c.source_sql("INSERT INTO orders VALUES (1, 'a')");
    c.tick("q");
    c.wait_caught_up("q", "bad");
    assert_eq!(c.count("target", &part), 1);

    // the source grows a column the target does not have yet
    c.source_sql("ALTER TABLE orders ADD COLUMN extra text; INSERT INTO orders VALUES (2, 'b', 'x'), (3, 'c', NULL)");
    c.tick("q");
    c.wait_status("bad", "last_error", |e| e.is_some_and(|e| e.contains("column \"extra\" does not exist")));
    let err = c.status("bad", "last_error").unwrap();
    assert!(err.contains("event ") && err.contains(&format!("public.{part}")), "{err}");
    let batch: i64 = err.trim_start_matches("batch ").split(':').next().unwrap().parse().unwrap();
    let log = c.log();
    assert!(
        log.contains(&format!("cube_dispatcher job bad: batch {batch}: event")),
        "one clear log line naming job, batch, event"
    );
    assert_eq!(c.count("target", &part), 1, "nothing of the failing batch is written");
    let active = c.value("source", "SELECT current_batch FROM pgq.get_consumer_info('q', 'bad')");
    assert_eq!(active, Some(batch.to_string()), "the batch stays unfinished on the source");

    c.target_sql(&format!("ALTER TABLE {part} ADD COLUMN extra text"));
    c.wait_caught_up("q", "bad");
    assert_eq!(
        c.rows(&part, "id, extra"),
        vec![row(&[Some("1"), None]), row(&[Some("2"), Some("x")]), row(&[Some("3"), None])]
    );
}

// Each of the next two runs with the job reading the source itself and with its helper.
#[test]
fn a_batch_already_recorded_here_is_only_finished() {
    already_recorded_is_only_finished("off");
}

#[test]
fn a_batch_already_recorded_here_is_only_finished_through_the_helper() {
    already_recorded_is_only_finished("on");
}

fn already_recorded_is_only_finished(helper: &str) {
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
    c.start_job("once", "q", &[("helper", helper)]);
    c.source_sql("INSERT INTO orders VALUES (1, 'a', 1)");
    c.tick("q");
    c.wait_caught_up("q", "once");
    c.target_sql("SELECT cube_dispatcher.stop('once')");

    // A crash after the target commit but before finish_batch: the batch is active on the
    // source and its tick is already recorded here. Reproduce that state by hand.
    c.source_sql("INSERT INTO orders VALUES (2, 'b', 2)");
    c.tick("q");
    let batch = c.value("source", "SELECT pgq.next_batch('q', 'once')").unwrap();
    let tick = c.value("source", &format!("SELECT tick_id FROM pgq.get_batch_info({batch})")).unwrap();
    c.target_sql(&format!("UPDATE cube_dispatcher.job_state SET last_tick_id = {tick} WHERE job_name = 'once'"));

    c.target_sql("SELECT cube_dispatcher.start('once')");
    c.wait_caught_up("q", "once");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    assert_eq!(c.rows(&part, "id, txt"), vec![row(&[Some("1"), Some("a")])], "the recorded batch is not written again");
    assert!(c.log().contains(&format!("batch {batch} was already written here; finishing it on the source")));
}

#[test]
fn a_batch_is_finished_on_the_source_only_once_written_here() {
    finished_only_once_written("off");
}

#[test]
fn a_batch_is_finished_on_the_source_only_once_written_here_through_the_helper() {
    finished_only_once_written("on");
}

fn finished_only_once_written(helper: &str) {
    let c = Cluster::start();
    // no key on the target: an event written twice would show as a second row
    c.feed("q", "orders", ORDERS, "CREATE TABLE orders (id int, txt text, val numeric)");
    c.start_job("cf", "q", &[("dateformat", ""), ("mode", "keep_all"), ("lock_timeout", "1"), ("helper", helper)]);
    c.source_sql("INSERT INTO orders VALUES (1, 'a', 1)");
    c.tick("q");
    c.wait_caught_up("q", "cf");
    let consumer_tick = "SELECT last_tick FROM pgq.get_consumer_info('q', 'cf')";
    let before = c.value("source", consumer_tick);
    // The next batch cannot be written while this lock is held. Its one event is its last chunk,
    // so by the time the worker waits for the lock, the query that finishes the batch on the
    // source (and takes the one after it) has gone out: it must not take effect. A helper has
    // by then also read the batch after it, whose end must not commit that finish either.
    let mut locker = c.connect("target");
    locker.batch_execute("BEGIN; LOCK TABLE orders IN SHARE MODE").unwrap();
    c.source_sql("INSERT INTO orders VALUES (2, 'b', 2)");
    c.tick("q");
    c.source_sql("INSERT INTO orders VALUES (3, 'c', 3)");
    c.tick("q");
    c.wait_status("cf", "last_error", |e| e.is_some_and(|e| e.contains("lock timeout")));
    assert_eq!(c.value("source", consumer_tick), before, "a batch not written here is not finished on the source");
    locker.batch_execute("COMMIT").unwrap();
    c.wait_caught_up("q", "cf");
    let all = vec![row(&[Some("1"), Some("a")]), row(&[Some("2"), Some("b")]), row(&[Some("3"), Some("c")])];
    assert_eq!(c.rows("orders", "id, txt"), all, "every event once");
}

#[test]
fn the_real_pgqd_ticker_drives_the_job() {
    let mut c = Cluster::start();
    c.create_queue("q");
    c.source_sql("SELECT pgq.set_queue_config('q', 'ticker_max_lag', '0.2 seconds')");
    c.source_sql(ORDERS);
    c.add_logutriga("orders", "q");
    c.target_sql(ORDERS);
    c.start_pgqd();
    c.start_job("tick", "q", &[]);
    c.source_sql("INSERT INTO orders SELECT g, 'r' || g, g FROM generate_series(1, 1000) g");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    // no pgq.ticker() call here: only pgqd makes the batch
    c.wait_until("pgqd-ticked rows in the partition", std::time::Duration::from_secs(60), || {
        c.value("target", &format!("SELECT count(*) FROM pg_tables WHERE tablename = '{part}'")).as_deref() == Some("1")
            && c.count("target", &part) == 1000
    });
}

#[test]
fn batches_ending_on_fetch_boundaries_deliver_every_event_once() {
    // The first FETCH of a batch asks for 1000 events, the later ones for 5000: these batch sizes
    // end just before, exactly on and just after a FETCH's end.
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
    // one job reads the source itself, the other through its helper
    c.start_job("latest", "q", &[("helper", "off")]);
    c.start_job("every", "q", &[("mode", "keep_all"), ("dateformat", "YYYY_MM"), ("helper", "on")]);
    let (mut next, mut updated, mut events) = (1, 0, 0);
    for n in [999, 1000, 1001, 6000, 6001] {
        // inserts, then updates of the batch's first rows: versions of one key land in different chunks
        let (ins, upd) = (n - n / 2, n / 2);
        c.source_sql(&format!(
            "INSERT INTO orders SELECT g, 'new', g FROM generate_series({next}, {}) g;
             UPDATE orders SET txt = 'updated' WHERE id BETWEEN {next} AND {}",
            next + ins - 1,
            next + upd - 1
        ));
        c.tick("q");
        c.wait_caught_up("q", "latest");
        c.wait_caught_up("q", "every");
        (next, updated, events) = (next + ins, updated + upd, events + n);
    }
    let latest = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    let all = format!("orders_{}", c.suffix("YYYY_MM"));
    let summary = |t: &str| {
        c.value(
            "target",
            &format!("SELECT count(*) || ' ' || count(DISTINCT id) || ' ' || count(*) FILTER (WHERE txt = 'updated') FROM {t}"),
        )
    };
    assert_eq!(summary(&latest), Some(format!("{0} {0} {updated}", next - 1)));
    assert_eq!(summary(&all), Some(format!("{events} {} {updated}", next - 1)));
    assert_eq!(c.status("latest", "batches_done").as_deref(), Some("5"));
    assert_eq!(c.status("every", "events_done"), Some(events.to_string()));
}

#[test]
fn keep_latest_replaces_and_deletes_by_keys_of_any_type() {
    // single-column keys are deleted with `= ANY(keys)` cast to the key's type; these types take
    // different paths there (no cast for text-like types, a typmod dropped, a multi-word type name)
    let c = Cluster::start();
    let keys = [
        ("k_text", "varchar(20)", "'a b'"),
        ("k_num", "numeric(10,2)", "1.50"),
        ("k_ts", "timestamptz", "'2026-01-02 03:04:05+00'"),
        ("k_uuid", "uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    ];
    c.create_queue("q");
    for (table, ty, _) in keys {
        let ddl = format!("CREATE TABLE {table} (k {ty} PRIMARY KEY, v text)");
        c.source_sql(&ddl);
        c.target_sql(&ddl);
        c.add_logutriga(table, "q");
    }
    c.start_job("types", "q", &[]);
    for (table, _, key) in keys {
        c.source_sql(&format!("INSERT INTO {table} VALUES ({key}, 'first')"));
    }
    c.tick("q");
    c.wait_caught_up("q", "types");
    // a later batch: the key's row from the first batch is replaced, then one more is deleted
    for (table, ty, key) in keys {
        let other = match ty {
            "numeric(10,2)" => "2.25",
            "timestamptz" => "'2026-05-06 07:08:09+00'",
            "uuid" => "'b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12'",
            _ => "'c d'",
        };
        c.source_sql(&format!(
            "UPDATE {table} SET v = 'second' WHERE k = {key}; INSERT INTO {table} VALUES ({other}, 'gone')"
        ));
        c.tick("q");
        c.wait_caught_up("q", "types");
        c.source_sql(&format!("DELETE FROM {table} WHERE k = {other}"));
    }
    c.tick("q");
    c.wait_caught_up("q", "types");
    let day = c.suffix("YYYY_MM_DD");
    for (table, _, key) in keys {
        assert_eq!(
            c.query("target", &format!("SELECT k = {key}, v FROM {table}_{day}")),
            vec![row(&[Some("t"), Some("second")])],
            "{table}"
        );
    }
}

#[test]
fn a_keep_all_batch_switching_tables_and_columns_keeps_every_event_once() {
    // keep_all continues one COPY across chunks of the same table and columns; a chunk that
    // switches table or columns ends it and goes the ordinary way
    let c = Cluster::start();
    c.create_queue("q");
    for t in ["a", "b"] {
        let ddl = format!("CREATE TABLE {t} (id int, txt text)");
        c.source_sql(&ddl);
        c.target_sql(&format!("CREATE TABLE {t} (id int, txt text, extra int)"));
        c.add_logutriga(t, "q");
    }
    c.start_job("mix", "q", &[("mode", "keep_all")]);
    c.source_sql("INSERT INTO a SELECT g, 'a1' FROM generate_series(1, 7000) g");
    c.source_sql("INSERT INTO b SELECT g, 'b' FROM generate_series(1, 4000) g");
    c.source_sql("INSERT INTO a SELECT g, 'a2' FROM generate_series(7001, 9000) g");
    c.source_sql(
        "ALTER TABLE a ADD COLUMN extra int; INSERT INTO a SELECT g, 'a3', g FROM generate_series(9001, 12000) g",
    );
    c.tick("q");
    c.wait_caught_up("q", "mix");
    let day = c.suffix("YYYY_MM_DD");
    let summary = |t: &str| {
        c.value(
            "target",
            &format!("SELECT count(*) || ' ' || count(DISTINCT id) || ' ' || count(extra) || ' ' || string_agg(DISTINCT txt, ',' ORDER BY txt) FROM {t}_{day}"),
        )
    };
    assert_eq!(summary("a").as_deref(), Some("12000 12000 3000 a1,a2,a3"));
    assert_eq!(summary("b").as_deref(), Some("4000 4000 0 b"));
    assert_eq!(c.status("mix", "batches_done").as_deref(), Some("1"));
    assert_eq!(c.status("mix", "events_done").as_deref(), Some("16000"));
}

/// pgq_min_count merges the ticks of a backlog into bigger batches (pgq.next_batch_custom): ten
/// ticks of 100 events go in batches of at least 300 each; fewer than 300 left over wait until
/// the count is reached or, with pgq_min_interval, until a batch would cover that long. Every
/// row once. (Which ticks PgQ merges depends on where the ticks fall, so the test checks what
/// must hold of any merge.)
#[test]
fn pgq_min_count_merges_the_ticks_of_a_backlog() {
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
    c.start_job("m", "q", &[("pgq_min_count", "300")]);
    c.target_sql("SELECT cube_dispatcher.stop('m')");
    c.wait_status("m", "state", |s| s == Some("stopped"));
    // ticks as the ticker makes them: pgq.force_tick would advance the event counter that
    // next_batch_custom counts by a thousand or more per tick
    c.source_sql("SELECT pgq.set_queue_config('q', 'ticker_max_count', '100')");
    let tick_of_100 = |k: i32| {
        c.source_sql(&format!(
            "INSERT INTO orders SELECT g, 't', g FROM generate_series({}, {}) g",
            k * 100 + 1,
            k * 100 + 100
        ));
        c.source_sql("SELECT pgq.ticker('q')");
    };
    (0..10).for_each(tick_of_100);
    let ticks = c.value(
        "source",
        "SELECT count(*) FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue WHERE q.queue_name = 'q'",
    );
    let ticks: i64 = ticks.unwrap().parse().unwrap();
    c.target_sql("SELECT cube_dispatcher.start('m')");
    let done = |col: &str| c.status("m", col).unwrap_or_default().parse::<i64>().unwrap_or(0);
    c.wait_until("batches of the backlog", std::time::Duration::from_secs(30), || done("events_done") >= 700);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (events, batches) = (done("events_done"), done("batches_done"));
    assert!(batches < ticks - 1 && events / batches >= 300, "{events} events in {batches} batches from {ticks} ticks");
    // what is left waits; with pgq_min_interval, a batch that covers a second is taken
    c.configure("m", &[("pgq_min_interval", "1 second")]);
    c.target_sql("SELECT cube_dispatcher.reload('m')");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    tick_of_100(10);
    c.wait_caught_up("q", "m");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    assert_eq!(c.value("target", &format!("SELECT count(DISTINCT id) FROM {part}")).as_deref(), Some("1100"));
    assert_eq!(c.count("target", &part), 1100);
}
