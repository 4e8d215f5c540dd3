//! Events in every shape PgQ's triggers send them: pgq.jsontriga and pgq.logutriga rows in one
//! queue, TRUNCATE events under both settings of ignore_truncate, event_types per table. Real
//! triggers on real tables; every expectation is read from the source, never written down.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::Cluster;

/// Every type whose text needs care, one column each.
const WIDE: &str = "(id int PRIMARY KEY, b bool, n numeric, f float8, r real, i8 bigint, i2 smallint, tx text,
    vc varchar(20), js json, jb jsonb, arr int[], tarr text[], by bytea, ts timestamp, tz timestamptz, d date,
    iv interval, u uuid, \"Weird Col\" text)";

/// Rows with every awkward value: control characters, quotes, backslashes, url and JSON
/// specials, non-ASCII, empty strings, NULLs, infinities, NaN, the extremes of the integers.
const AWKWARD: &str = r#"
    (1, true, 12345678901234567890.123456789, 1.5e300, 'NaN', 9223372036854775807, -32768,
     E'a\tb\nc\\d"e''f ä € \x01 %&=+ \r end', 'short', '{"a": [1, 2.50], "k": "v\"q"}', '{"b": null, "u": "\u00e9"}',
     '{1,2,NULL}', '{"x y","z,\"",NULL}', '\x00ff5c41', '2026-12-02 11:00:00.123456', '2026-12-02 11:00:00+00',
     '2026-12-02', '1 day 2 hours', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'w'),
    (2, false, -0.5, 'Infinity', '-Infinity', 0, 0, '', '', 'null', '[]', '{}', '{}', '\x', 'infinity',
     '-infinity', 'infinity', '-1 year', NULL, ''),
    (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"#;

/// The same rows, written through pgq.logutriga into `t_url` and through pgq.jsontriga into
/// `t_json`, in one queue per job, arrive as the source holds them: in keep_latest the last
/// version of each row, in keep_all every version (deletes skipped by event_types). Rows come
/// decoded by a receiving helper (`helper = on`) and, for a third job, as stored (`off`).
#[test]
fn jsontriga_and_logutriga_rows_arrive_as_the_source_holds_them() {
    let c = Cluster::start();
    for q in ["q_latest", "q_all", "q_here"] {
        c.create_queue(q);
    }
    for t in ["t_url", "t_json"] {
        c.source_sql(&format!("CREATE TABLE {t} {WIDE}"));
        c.target_sql(&format!("CREATE TABLE {t} {WIDE}"));
        let trigger = if t == "t_url" { "logutriga" } else { "jsontriga" };
        for q in ["q_latest", "q_all", "q_here"] {
            c.source_sql(&format!(
                "CREATE TRIGGER to_{q} AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE PROCEDURE pgq.{trigger}('{q}')"
            ));
        }
    }
    c.start_job("latest", "q_latest", &[("helper", "on")]);
    let every = [("mode", "keep_all"), ("event_types", "I,U"), ("helper", "on"), ("dateformat", "YYYY_MM")];
    c.start_job("every", "q_all", &every);
    c.start_job("here", "q_here", &[&every[..2], &[("helper", "off"), ("dateformat", "YYYY")]].concat());
    // one transaction, one batch: both formats interleaved, many rows (one COPY across chunks)
    c.source_sql(&format!(
        "BEGIN;
         INSERT INTO t_url VALUES {AWKWARD};
         INSERT INTO t_json SELECT * FROM t_url;
         INSERT INTO t_url (id, tx, n, jb, arr)
              SELECT g, 'row ' || g || E'\\t' || chr(65 + g % 26), g * 1.25, jsonb_build_object('g', g, 's', E'q\"\\\\'), ARRAY[g, -g]
                FROM generate_series(10, 3009) g;
         INSERT INTO t_json SELECT * FROM t_url WHERE id >= 10;
         UPDATE t_url SET tx = tx || ' updated', jb = jb || '{{\"n\": 1}}' WHERE id IN (1, 10);
         UPDATE t_json SET tx = tx || ' updated', jb = jb || '{{\"n\": 1}}' WHERE id IN (1, 10);
         DELETE FROM t_url WHERE id = 2;
         DELETE FROM t_json WHERE id = 2;
         COMMIT;"
    ));
    for q in ["q_latest", "q_all", "q_here"] {
        c.tick(q);
    }
    c.wait_caught_up("q_latest", "latest");
    c.wait_caught_up("q_all", "every");
    c.wait_caught_up("q_here", "here");
    let (day, month) = (c.suffix("YYYY_MM_DD"), c.suffix("YYYY_MM"));
    let source = c.query("source", "SELECT * FROM t_url ORDER BY id");
    assert_eq!(source.len(), 3 + 3000 - 1);
    assert_eq!(c.query("source", "SELECT * FROM t_json ORDER BY id"), source, "the two source tables are equal");
    for t in ["t_url", "t_json"] {
        assert_eq!(c.query("target", &format!("SELECT * FROM {t}_{day} ORDER BY id")), source, "keep_latest {t}");
    }
    // keep_all: every inserted and updated version, the same through both triggers
    let all = |t: &str| c.query("target", &format!("SELECT * FROM {t}_{month} ORDER BY id, tx"));
    assert_eq!(all("t_url").len(), 3 + 3000 + 2);
    assert_eq!(all("t_json"), all("t_url"), "keep_all: both formats give the same rows");
    let year = c.suffix("YYYY");
    for t in ["t_url", "t_json"] {
        let here = c.query("target", &format!("SELECT * FROM {t}_{year} ORDER BY id, tx"));
        assert_eq!(here, all(t), "keep_all {t}: the same rows decoded here as by the helper");
    }
    let latest_versions =
        c.query("target", &format!("SELECT DISTINCT ON (id) * FROM t_json_{month} WHERE id <> 2 ORDER BY id, tx DESC"));
    assert_eq!(latest_versions, source, "keep_all: the last version of each row is the source's");
    assert_eq!(c.status("every", "events_skipped").as_deref(), Some("2"), "the two deletes, skipped by event_types");
    assert_eq!(c.status("latest", "events_skipped").as_deref(), Some("0"));
}

/// A table truncated mid-batch: with ignore_truncate off, keep_latest's partition holds only
/// what came after the truncate; with it on, the truncate is skipped and counted. Both trigger
/// formats send truncates (statement triggers AFTER TRUNCATE).
#[test]
fn truncate_events_follow_ignore_truncate() {
    let c = Cluster::start();
    let tables = [
        ("qa", "a_url", "logutriga"),
        ("qa", "a_json", "jsontriga"),
        ("qb", "b_url", "logutriga"),
        ("qb", "b_json", "jsontriga"),
    ];
    for q in ["qa", "qb"] {
        c.create_queue(q);
    }
    for (q, t, trigger) in tables {
        c.source_sql(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, txt text);
             CREATE TRIGGER rows AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE PROCEDURE pgq.{trigger}('{q}');
             CREATE TRIGGER truncates AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE PROCEDURE pgq.{trigger}('{q}')"
        ));
        c.target_sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY, txt text)"));
    }
    c.start_job("applies", "qa", &[]);
    c.start_job("ignores", "qb", &[("ignore_truncate", "on")]);
    let round = |sql: &str| {
        for (_, t, _) in tables {
            c.source_sql(&sql.replace("$T", t));
        }
        for q in ["qa", "qb"] {
            c.tick(q);
        }
        c.wait_caught_up("qa", "applies");
        c.wait_caught_up("qb", "ignores");
    };
    round("INSERT INTO $T SELECT g, 'first' FROM generate_series(1, 5) g");
    // one batch: rows before the truncate, the truncate, rows after it
    round(
        "INSERT INTO $T SELECT g, 'before' FROM generate_series(6, 7) g; UPDATE $T SET txt = 'changed' WHERE id = 1;
         TRUNCATE $T; INSERT INTO $T SELECT g, 'after' FROM generate_series(8, 9) g",
    );
    let day = c.suffix("YYYY_MM_DD");
    let ids = |t: &str| c.query("target", &format!("SELECT id::text || ' ' || txt FROM {t}_{day} ORDER BY id"));
    for t in ["a_url", "a_json"] {
        assert_eq!(ids(t), c.query("source", &format!("SELECT id::text || ' ' || txt FROM {t} ORDER BY id")), "{t}");
        assert_eq!(ids(t).len(), 2);
    }
    for t in ["b_url", "b_json"] {
        let mut want: Vec<String> = (1..=5).map(|i| format!("{i} first")).collect();
        want[0] = "1 changed".into();
        want.extend(["6 before", "7 before", "8 after", "9 after"].map(String::from));
        assert_eq!(ids(t), want.into_iter().map(|w| vec![Some(w)]).collect::<Vec<_>>(), "{t}");
    }
    assert_eq!(c.status("ignores", "events_skipped").as_deref(), Some("2"));
    assert_eq!(c.status("applies", "events_skipped").as_deref(), Some("0"));
    assert_eq!(c.log().matches("(TRUNCATE) emptied public.a_").count(), 2, "each applied truncate is logged");
}

/// event_types per table: orders takes only inserts, every other table everything.
#[test]
fn event_types_per_table() {
    let c = Cluster::start();
    c.create_queue("q");
    for (t, trigger) in [("orders", "logutriga"), ("lines", "jsontriga")] {
        c.source_sql(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, txt text);
             CREATE TRIGGER rows AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE PROCEDURE pgq.{trigger}('q')"
        ));
        c.target_sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY, txt text)"));
    }
    c.start_job("f", "q", &[("event_types", "public.orders:I; *")]);
    for t in ["orders", "lines"] {
        c.source_sql(&format!(
            "INSERT INTO {t} SELECT g, 'v' FROM generate_series(1, 4) g;
             UPDATE {t} SET txt = 'u' WHERE id = 1; DELETE FROM {t} WHERE id = 2"
        ));
    }
    c.tick("q");
    c.wait_caught_up("q", "f");
    let day = c.suffix("YYYY_MM_DD");
    let rows = |t: &str| c.query("target", &format!("SELECT id::text || txt FROM {t}_{day} ORDER BY id"));
    let want = |v: &[&str]| v.iter().map(|s| vec![Some(s.to_string())]).collect::<Vec<_>>();
    assert_eq!(rows("orders"), want(&["1v", "2v", "3v", "4v"]), "orders: the update and the delete skipped");
    assert_eq!(rows("lines"), want(&["1u", "3v", "4v"]), "lines: everything applied");
    assert_eq!(c.status("f", "events_skipped").as_deref(), Some("2"));
}

/// fields, skip_fields and table_map: per table, columns kept, renamed and dropped, and events
/// written into another parent; a keep_latest key left out is refused at start(), naming the
/// option, or, for a table only a catch-all entry covers, at its event.
#[test]
fn fields_skip_fields_and_table_map() {
    let c = Cluster::start();
    c.create_queue("q");
    c.source_sql(
        "CREATE TABLE orders (id int PRIMARY KEY, amount numeric, note text, secret text);
         CREATE TABLE users (id int PRIMARY KEY, name text, pin text);
         CREATE TRIGGER r AFTER INSERT OR UPDATE OR DELETE ON orders FOR EACH ROW EXECUTE PROCEDURE pgq.jsontriga('q');
         CREATE TRIGGER r AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('q')",
    );
    c.target_sql(
        "CREATE SCHEMA bi; CREATE TABLE bi.orders_hist (order_id int PRIMARY KEY, total numeric, note text);
         CREATE TABLE users (id int PRIMARY KEY, name text)",
    );
    let opts = [
        ("fields", "public.orders:id:order_id, amount:total, note"),
        ("skip_fields", "pin"),
        ("table_map", "public.orders:bi.orders_hist"),
        ("tables", "bi.orders_hist, public.users"),
    ];
    // leaving out the key of a parent the option names: refused before anything runs
    let conn = c.src_conninfo();
    c.configure(
        "bad",
        &[
            ("src_db", conn.as_str()),
            ("pgq_queue_name", "q"),
            ("fields", "public.orders:amount:total"),
            ("table_map", "public.orders:bi.orders_hist"),
        ],
    );
    let (code, msg) = c.try_exec_state("target", "SELECT cube_dispatcher.start('bad')").unwrap_err();
    assert_eq!(code, "22023", "{msg}");
    assert!(
        msg.contains("cube_dispatcher.bad.fields")
            && msg.contains("leaves out column \"order_id\" of the primary key of bi.orders_hist"),
        "{msg}"
    );

    c.start_job("f", "q", &opts);
    c.source_sql(
        "INSERT INTO orders VALUES (1, 9.5, 'n1', 's1'), (2, 3, NULL, 's2'); UPDATE orders SET amount = 10 WHERE id = 1;
         DELETE FROM orders WHERE id = 2; INSERT INTO users VALUES (7, 'ann', '1234')",
    );
    c.tick("q");
    c.wait_caught_up("q", "f");
    let day = c.suffix("YYYY_MM_DD");
    assert_eq!(
        c.query("target", &format!("SELECT order_id::text, total::text, note FROM bi.orders_hist_{day}")),
        vec![vec![Some("1".into()), Some("10".into()), Some("n1".into())]],
        "renamed, secret not written, the delete found by the renamed key"
    );
    assert_eq!(
        c.query("target", &format!("SELECT id::text, name FROM users_{day}")),
        vec![vec![Some("7".into()), Some("ann".into())]]
    );
    let stray =
        c.value("target", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'orders%'");
    assert_eq!(stray.as_deref(), Some("0"), "nothing written under the source's name");

    // a catch-all entry that leaves out users' key: the event says so
    c.exec("target", "ALTER DATABASE target SET cube_dispatcher.f.skip_fields = 'public.orders:secret; id'");
    c.exec("target", "SELECT cube_dispatcher.reload('f')");
    c.source_sql("INSERT INTO users VALUES (8, 'bob', '0000')");
    c.tick("q");
    c.wait_status("f", "last_error", |e| {
        e.is_some_and(|e| e.contains("primary key column \"id\" is dropped by skip_fields"))
    });
}

/// A column added on the source: new_columns = error retries until a DBA adds it, ignore leaves
/// its values out (logged once, counted), add gives the parent and the partition the column
/// with the source's type; under a native parent the parent's ALTER reaches the partition.
#[test]
fn new_columns_error_ignore_and_add() {
    let c = Cluster::start();
    let jobs = [
        ("je", "error", "logutriga", ""),
        ("ji", "ignore", "jsontriga", ""),
        ("ja", "add", "jsontriga", ""),
        ("jn", "add", "logutriga", " PARTITION BY RANGE (day)"),
    ];
    for (job, _, trigger, native) in jobs {
        let q = format!("q_{job}");
        c.create_queue(&q);
        c.source_sql(&format!(
            "CREATE TABLE t_{job} (id int PRIMARY KEY, day date, txt text);
             CREATE TRIGGER r AFTER INSERT OR UPDATE OR DELETE ON t_{job} FOR EACH ROW EXECUTE PROCEDURE pgq.{trigger}('{q}')"
        ));
        let key = if native.is_empty() { "PRIMARY KEY" } else { "" };
        c.target_sql(&format!("CREATE TABLE t_{job} (id int {key}, day date, txt text){native}"));
    }
    for (job, new_columns, _, native) in jobs {
        let mut opts = vec![("mode", "keep_all"), ("new_columns", new_columns)];
        if !native.is_empty() {
            opts.extend([("part_mode", "date_field"), ("part_field", "day")]);
        }
        c.start_job(job, &format!("q_{job}"), &opts);
    }
    let round = |sql: &str| {
        for (job, ..) in jobs {
            c.source_sql(&sql.replace("$T", &format!("t_{job}")));
            c.tick(&format!("q_{job}"));
        }
    };
    round("INSERT INTO $T VALUES (1, current_date, 'a')");
    round(
        "ALTER TABLE $T ADD COLUMN price numeric(10,2), ADD COLUMN \"Tags\" text[];
         INSERT INTO $T VALUES (2, current_date, 'b', 9.99, '{x,\"y z\"}')",
    );
    for (job, ..) in &jobs[1..] {
        c.wait_caught_up(&format!("q_{job}"), job);
    }
    let day = c.suffix("YYYY_MM_DD");
    // error: the batch waits for a DBA
    c.wait_status("je", "last_error", |e| {
        e.is_some_and(|e| e.contains(&format!("column \"price\" does not exist in public.t_je_{day}")))
    });
    c.target_sql(&format!("ALTER TABLE t_je_{day} ADD COLUMN price numeric(10,2), ADD COLUMN \"Tags\" text[]"));
    c.wait_caught_up("q_je", "je");
    // ignore: rows without the values, counted, one log line per column
    assert_eq!(c.query("target", &format!("SELECT id::text, txt FROM t_ji_{day} ORDER BY id")).len(), 2);
    assert_eq!(c.status("ji", "values_ignored").as_deref(), Some("2"));
    round("INSERT INTO $T VALUES (3, current_date, 'c', 1, NULL)");
    c.wait_caught_up("q_ji", "ji");
    assert_eq!(c.status("ji", "values_ignored").as_deref(), Some("4"));
    assert_eq!(c.log().matches("column \"price\" of public.t_ji is not in").count(), 1, "logged once");
    // add: the source's types, on the parent and the partition; the values are there
    let typed = |table: &str| {
        c.query(
            "target",
            &format!(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
                  WHERE attrelid = '{table}'::regclass AND attname IN ('price', 'Tags') ORDER BY 1"
            ),
        )
    };
    let want = vec![
        vec![Some("Tags".to_string()), Some("text[]".to_string())],
        vec![Some("price".to_string()), Some("numeric(10,2)".to_string())],
    ];
    for table in ["t_ja".to_string(), format!("t_ja_{day}"), "t_jn".to_string(), format!("t_jn_{day}")] {
        assert_eq!(typed(&table), want, "{table}");
    }
    for job in ["je", "ja", "jn"] {
        c.wait_caught_up(&format!("q_{job}"), job);
        // a native parent shows its partitions' rows; the others' rows are in the partition
        let table = if job == "jn" { format!("t_{job}") } else { format!("t_{job}_{day}") };
        let rows = c.query("target", &format!("SELECT id::text, price::text, \"Tags\"::text FROM {table} ORDER BY id"));
        assert_eq!(rows[1], vec![Some("2".into()), Some("9.99".into()), Some("{x,\"y z\"}".into())], "{job}");
    }
    assert!(c.log().contains(&format!("added column price numeric(10,2) to public.t_ja and public.t_ja_{day}")));
}
