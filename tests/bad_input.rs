//! Bad events injected with pgq.insert_event into real queues: each gives one clear error naming
//! the job, batch, event and table, nothing of its batch is written and the batch stays
//! unfinished (on_error = retry); or, with on_error = dead_letter, it is set aside.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::{literal, Cluster};

struct Case {
    name: &'static str,
    mode: &'static str,
    template: Option<&'static str>,
    ev_type: Option<&'static str>,
    ev_data: Option<&'static str>,
    ev_extra1: Option<&'static str>,
    /// fragments the error must contain (besides job, batch and event id)
    want: &'static [&'static str],
    /// a good event goes first in the batch (not when the failure is the partition itself,
    /// which the first event would already meet)
    good_first: bool,
}

const fn case(
    name: &'static str,
    ev_type: &'static str,
    ev_data: &'static str,
    ev_extra1: Option<&'static str>,
    want: &'static [&'static str],
) -> Case {
    Case {
        name,
        mode: "keep_latest",
        template: None,
        ev_type: Some(ev_type),
        ev_data: Some(ev_data),
        ev_extra1,
        want,
        good_first: true,
    }
}

const ORDERS: Option<&str> = Some("public.orders");
const JSON_INSERT: &str = r#"{"op":"INSERT","table":["public","orders"],"pkey":["id"]}"#;

fn cases() -> Vec<Case> {
    let long: &'static str = Box::leak(format!("public.{}", "t".repeat(60)).into_boxed_str());
    vec![
        case("bad_escape", "I:id", "id=1&txt=%zz", ORDERS, &["table public.orders", "malformed %-escape"]),
        case("trailing_escape", "I:id", "id=1&txt=ab%4", ORDERS, &["table public.orders", "malformed %-escape"]),
        case("bad_utf8", "I:id", "id=1&txt=%ff%fe", ORDERS, &["table public.orders", "not valid UTF-8"]),
        case("unknown_op", "X:id", "id=1", ORDERS, &["table public.orders", "unknown operation \"X\""]),
        case("empty_type", "", "id=1", ORDERS, &["table public.orders", "ev_type is empty"]),
        Case {
            mode: "keep_all",
            ..case(
                "delete_keep_all",
                "D:id",
                "id=1&txt=a",
                ORDERS,
                &["table public.orders", "delete not supported in keep_all mode"],
            )
        },
        Case {
            mode: "keep_all",
            ev_data: None,
            ..case(
                "truncate_keep_all",
                "R",
                "",
                ORDERS,
                &["table public.orders", "truncate not supported in keep_all mode", "ignore_truncate"],
            )
        },
        case(
            "json_malformed",
            JSON_INSERT,
            r#"{"id":1,"txt":"a""#,
            ORDERS,
            &["table public.orders", "ev_data is not valid JSON: EOF"],
        ),
        case(
            "json_not_an_object",
            JSON_INSERT,
            r#"[1,"a"]"#,
            ORDERS,
            &["table public.orders", "ev_data is not valid JSON", "expected an object"],
        ),
        case(
            "json_nul",
            JSON_INSERT,
            r#"{"id":1,"txt":"a\u0000"}"#,
            ORDERS,
            &["table public.orders", "a value holds a NUL character"],
        ),
        case(
            "json_type_no_op",
            r#"{"table":["public","orders"],"pkey":["id"]}"#,
            r#"{"id":1}"#,
            ORDERS,
            &["table public.orders", "ev_type is not valid JSON: missing field `op`"],
        ),
        case(
            "json_type_no_table",
            r#"{"op":"INSERT","pkey":["id"]}"#,
            r#"{"id":1}"#,
            ORDERS,
            &["missing field `table`"],
        ),
        case(
            "json_type_no_pkey",
            r#"{"op":"INSERT","table":["public","orders"]}"#,
            r#"{"id":1}"#,
            ORDERS,
            &["missing field `pkey`"],
        ),
        case(
            "json_unknown_op",
            r#"{"op":"MERGE","table":["public","orders"],"pkey":["id"]}"#,
            r#"{"id":1}"#,
            ORDERS,
            &["unknown operation \"MERGE\""],
        ),
        case("no_pkey", "I:", "id=1&txt=a", ORDERS, &["table public.orders", "keep_latest needs primary key columns"]),
        case("pkey_missing", "I:id", "txt=a", ORDERS, &["table public.orders", "primary key column \"id\" is missing"]),
        case("null_table", "I:id", "id=1", None, &["table (null)", "ev_extra1 (the table name) is missing"]),
        case("empty_table", "I:id", "id=1", Some(""), &["ev_extra1 (the table name) is missing"]),
        case("three_parts", "I:id", "id=1", Some("a.b.c"), &["parent table a.\"b.c\" does not exist"]),
        case(
            "injection",
            "I:id",
            "id=1",
            Some("x\"; drop table orders; --"),
            &["parent table public.\"x\"\"; drop table orders; --\" does not exist"],
        ),
        case("name_too_long", "I:id", "id=1", Some(long), &["over PostgreSQL's limit of 63"]),
        case(
            "no_such_column",
            "I:id",
            "id=1&nosuch=2",
            ORDERS,
            &["column \"nosuch\" does not exist in public.orders_"],
        ),
        case(
            "bad_value",
            "I:id",
            "id=abc&txt=a",
            ORDERS,
            &["table public.orders_", "invalid input syntax for type integer: \"abc\""],
        ),
        Case {
            template: Some("create table _DEST_TABLE (nonsense"),
            good_first: false,
            ..case("bad_template", "I:id", "id=1", ORDERS, &["creating partition public.orders_", "syntax error"])
        },
        case("missing_parent", "I:id", "id=1", Some("public.nosuch"), &["parent table public.nosuch does not exist"]),
    ]
}

#[test]
fn every_bad_input_gets_one_clear_error_and_writes_nothing() {
    let c = Cluster::start();
    c.source_sql("CREATE TABLE orders (id int PRIMARY KEY, txt text)");
    c.target_sql("CREATE TABLE orders (id int PRIMARY KEY, txt text)");
    let cases = cases();
    let mut bad_ids = Vec::new();
    for (i, k) in cases.iter().enumerate() {
        let q = format!("q_{}", k.name);
        c.create_queue(&q);
        let mut opts = vec![("mode", k.mode)];
        if let Some(t) = k.template {
            opts.push(("part_template", t));
        }
        c.start_job(k.name, &q, &opts);
        // a good event first: it must not be written either, the batch is one unit
        if k.good_first {
            c.source_sql(&format!(
                "SELECT pgq.insert_event('{q}', 'I:id', 'id={}&txt=good', 'public.orders', NULL, NULL, NULL)",
                1000 + i
            ));
        }
        let lit = |v: Option<&str>| v.map(literal).unwrap_or_else(|| "NULL".into());
        let id = c.value(
            "source",
            &format!(
                "SELECT pgq.insert_event('{q}', {}, {}, {}, NULL, NULL, NULL)",
                lit(k.ev_type),
                lit(k.ev_data),
                lit(k.ev_extra1)
            ),
        );
        bad_ids.push(id.unwrap());
        c.tick(&q);
    }
    for (k, ev_id) in cases.iter().zip(&bad_ids) {
        c.wait_status(k.name, "last_error", |e| e.is_some());
        let err = c.status(k.name, "last_error").unwrap();
        let batch =
            c.value("source", &format!("SELECT current_batch FROM pgq.get_consumer_info('q_{0}', '{0}')", k.name));
        let batch = batch.unwrap_or_else(|| panic!("{}: the batch must stay unfinished; error: {err}", k.name));
        assert!(
            err.starts_with(&format!("batch {batch}: event {ev_id}, ")),
            "{}: names batch and event: {err}",
            k.name
        );
        for w in k.want {
            assert!(err.contains(w), "{}: expected {w:?} in: {err}", k.name);
        }
        let line = format!("cube_dispatcher job {}: {err}", k.name);
        assert!(c.log().contains(&line), "{}: log line {line:?} missing", k.name);
        assert_eq!(c.status(k.name, "state").as_deref(), Some("retrying"));
    }
    // nothing of any failing batch was written: not even the good events, not even a partition
    assert_eq!(
        c.value("target", "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'orders\\_%'").as_deref(),
        Some("0")
    );
    assert_eq!(c.value("target", "SELECT count(*) FROM orders").as_deref(), Some("0"));
    assert_eq!(
        c.value("target", "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'x%' OR tablename LIKE 'b.c%'")
            .as_deref(),
        Some("0")
    );
}

#[test]
fn dead_letters_let_the_good_events_through_and_replay_later() {
    let c = Cluster::start();
    c.feed(
        "q",
        "orders",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text, extra text)",
        "CREATE TABLE orders (id int PRIMARY KEY, txt text, extra text)",
    );
    // through a helper, which sends rows decoded in bulk, but as stored for dead letters
    c.start_job("dl", "q", &[("on_error", "dead_letter"), ("helper", "on")]);
    // two hand-made bad events, and a real logutriga row with a column the target lacks
    c.source_sql("INSERT INTO orders VALUES (2, 'b', 'x')");
    let bad_value = c
        .value("source", "SELECT pgq.insert_event('q', 'I:id', 'id=zzz&txt=c', 'public.orders', NULL, NULL, NULL)")
        .unwrap();
    let bad_escape = c
        .value("source", "SELECT pgq.insert_event('q', 'I:id', 'id=4&txt=%zz', 'public.orders', NULL, NULL, NULL)")
        .unwrap();
    c.source_sql("INSERT INTO orders VALUES (5, 'e', NULL); UPDATE orders SET txt = 'b2' WHERE id = 2");
    c.source_sql("ALTER TABLE orders ADD COLUMN later int; INSERT INTO orders VALUES (6, 'f', NULL, 7)");
    c.tick("q");
    c.wait_caught_up("q", "dl");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    assert_eq!(
        c.rows(&part, "id, txt"),
        vec![vec![Some("2".into()), Some("b2".into())], vec![Some("5".into()), Some("e".into())]]
    );
    let letters = c.query(
        "target",
        "SELECT ev_id::text, error FROM cube_dispatcher.dead_letter WHERE job_name = 'dl' ORDER BY ev_id",
    );
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(letters[0][0].as_deref(), Some(bad_value.as_str()));
    assert!(
        letters[0][1].as_deref().unwrap().contains("invalid input syntax for type integer: \"zzz\""),
        "{letters:?}"
    );
    assert_eq!(letters[1][0].as_deref(), Some(bad_escape.as_str()));
    assert!(letters[1][1].as_deref().unwrap().contains("malformed %-escape"), "{letters:?}");
    assert!(letters[2][1].as_deref().unwrap().contains("column \"later\" does not exist"), "{letters:?}");
    // a dead letter keeps the event's own time (read from the source only on this slow path)
    let queue_id = c.value("source", "SELECT queue_id FROM pgq.queue WHERE queue_name = 'q'").unwrap();
    let source_time = c.value(
        "source",
        &format!("SELECT extract(epoch FROM ev_time)::text FROM pgq.event_{queue_id} WHERE ev_id = {bad_escape}"),
    );
    let letter_time = c.value(
        "target",
        &format!(
            "SELECT extract(epoch FROM ev_time)::text FROM cube_dispatcher.dead_letter WHERE ev_id = {bad_escape}"
        ),
    );
    assert!(source_time.is_some());
    assert_eq!(letter_time, source_time);
    // and ev_data as stored, byte for byte
    for (i, id) in [(0, &bad_value), (2, &letters[2][0].clone().unwrap())] {
        let data = |db: &str, table: &str| {
            c.value(db, &format!("SELECT ev_data FROM {table} WHERE ev_id = {id}"))
                .unwrap_or_else(|| panic!("letter {i}: no ev_data in {db}"))
        };
        assert_eq!(data("target", "cube_dispatcher.dead_letter"), data("source", &format!("pgq.event_{queue_id}")));
    }
    assert_eq!(c.status("dl", "dead_letters").as_deref(), Some("3"));
    assert!(c.log().contains("3 events could not be written and were stored in cube_dispatcher.dead_letter"));

    // the cause of one is fixed: replay writes it into the batch's partition and forgets it
    c.target_sql(&format!("ALTER TABLE {part} ADD COLUMN later int"));
    assert_eq!(c.value("target", "SELECT cube_dispatcher.replay_dead_letters('dl')").as_deref(), Some("1"));
    assert_eq!(c.value("target", &format!("SELECT later::text FROM {part} WHERE id = 6")).as_deref(), Some("7"));
    assert_eq!(c.status("dl", "dead_letters").as_deref(), Some("2"));
}
