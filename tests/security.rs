//! Security: jobs run with their owner's rights, an allow-list of tables, nothing for PUBLIC,
//! and identifiers from events never break out of quoting.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::{literal, Cluster};
use std::time::Duration;

const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, txt text)";

/// A cluster that also listens on loopback, where role `op` must log in with a password.
fn with_operator() -> Cluster {
    let c = Cluster::start_with(&["listen_addresses = '127.0.0.1'", "password_encryption = 'scram-sha-256'"]);
    c.hba_prepend("host all op 127.0.0.1/32 scram-sha-256");
    c.create_queue("q");
    c.source_sql(ORDERS);
    c.add_logutriga("orders", "q");
    c.source_sql("CREATE TABLE secret (id int PRIMARY KEY, txt text)");
    c.add_logutriga("secret", "q");
    c.exec("postgres", "CREATE ROLE op LOGIN PASSWORD 'op-Secr3t'");
    c.source_sql("GRANT pgq_reader TO op; GRANT SELECT ON ALL TABLES IN SCHEMA pgq TO op");
    // what a DBA grants an operator (README, "Privileges")
    c.target_sql(&format!(
        "{ORDERS}; CREATE TABLE secret (id int PRIMARY KEY, txt text);
         GRANT USAGE ON SCHEMA cube_dispatcher TO op;
         GRANT EXECUTE ON FUNCTION cube_dispatcher.start(text), cube_dispatcher.stop(text), cube_dispatcher.kill(text),
               cube_dispatcher.reload(text), cube_dispatcher.drop(text), cube_dispatcher.replay_dead_letters(text) TO op;
         GRANT SELECT ON cube_dispatcher.status TO op;
         GRANT CREATE ON SCHEMA public TO op; GRANT SELECT, INSERT, DELETE ON orders TO op;"
    ));
    c
}

fn op_conninfo(c: &Cluster, with_password: bool) -> String {
    let pw = if with_password { " password=op-Secr3t" } else { "" };
    format!("host=127.0.0.1 port={} dbname=source user=op{pw}", c.port)
}

/// Runs SQL in the target as role op (SET ROLE in a superuser session: same rights).
fn as_op(c: &Cluster, sql: &str) -> Result<(), String> {
    c.try_exec("target", &format!("SET ROLE op; {sql}"))
}

#[test]
fn an_operator_runs_its_own_job_with_its_own_rights() {
    let c = with_operator();
    let start = |job: &str, conn: &str| {
        as_op(&c, &format!("SET cube_dispatcher.{job}.src_db = {}; SET cube_dispatcher.{job}.pgq_queue_name = 'q'; SET cube_dispatcher.{job}.loop_delay = '0.2'; SELECT cube_dispatcher.start('{job}')", literal(conn)))
    };
    // dblink's rule for non-superusers: the source connection must use a password
    let err = start("opjob", &op_conninfo(&c, false)).unwrap_err();
    assert!(err.contains("password") && err.contains("cannot register consumer"), "{err}");
    start("opjob", &op_conninfo(&c, true)).unwrap();
    assert_eq!(
        c.value("target", "SELECT pg_get_userbyid(run_as) FROM cube_dispatcher.job WHERE job_name = 'opjob'")
            .as_deref(),
        Some("op")
    );

    c.source_sql("INSERT INTO orders VALUES (1, 'mine')");
    c.tick("q");
    c.wait_caught_up("q", "opjob");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    assert_eq!(c.count("target", &part), 1);
    assert_eq!(
        c.value("target", &format!("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = '{part}'"))
            .as_deref(),
        Some("op"),
        "partitions are created as the job's role"
    );

    // an event for a table the role may not write is an error, never a write
    c.source_sql("INSERT INTO secret VALUES (1, 'not yours')");
    c.tick("q");
    c.wait_status("opjob", "last_error", |e| e.is_some_and(|e| e.contains("permission denied")));
    assert_eq!(
        c.value("target", "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'secret\\_%'").as_deref(),
        Some("0")
    );
    assert_eq!(c.count("target", "secret"), 0);

    // a superuser's job next to it: op cannot stop it, nor read its connection string
    c.start_job("admin", "q", &[]);
    let err = as_op(&c, "SELECT cube_dispatcher.stop('admin')").unwrap_err();
    assert!(err.contains("permission denied for job admin"), "{err}");
    let err = as_op(&c, "SELECT options FROM cube_dispatcher.job").unwrap_err();
    assert!(err.contains("permission denied"), "{err}");
    let seen = c.query("target", "SET ROLE op; SELECT job_name, src_db FROM cube_dispatcher.status ORDER BY 1");
    assert_eq!(seen[0][0].as_deref(), Some("admin"));
    assert_eq!(seen[0][1], None, "another role's connection string is hidden");
    assert_eq!(
        seen[1][1].as_deref(),
        Some(format!("host=127.0.0.1 port={} dbname=source user=op password=********", c.port).as_str())
    );
    // op stops its own job
    as_op(&c, "SELECT cube_dispatcher.stop('opjob')").unwrap();
    assert_eq!(c.status("opjob", "state").as_deref(), Some("stopped"));
    assert!(!c.log().contains("op-Secr3t"), "password in the server log");
}

#[test]
fn an_operators_job_sets_events_it_may_not_write_aside() {
    let c = with_operator();
    as_op(&c, &format!("SET cube_dispatcher.dl.src_db = {}; SET cube_dispatcher.dl.pgq_queue_name = 'q'; SET cube_dispatcher.dl.loop_delay = '0.2'; SET cube_dispatcher.dl.on_error = 'dead_letter'; SELECT cube_dispatcher.start('dl')", literal(&op_conninfo(&c, true)))).unwrap();
    c.source_sql("INSERT INTO orders VALUES (1, 'mine'); INSERT INTO secret VALUES (1, 'not yours')");
    c.tick("q");
    // the dead letter is the worker's bookkeeping, written with its rights, not the job's
    c.wait_caught_up("q", "dl");
    let letter = c.value("target", "SELECT ev_extra1 || ': ' || error FROM cube_dispatcher.dead_letter").unwrap();
    assert!(
        letter.starts_with("public.secret: event 2") && letter.ends_with("permission denied for table secret"),
        "{letter}"
    );
    assert_eq!(c.count("target", &format!("orders_{}", c.suffix("YYYY_MM_DD"))), 1);
}

#[test]
fn nothing_is_granted_to_public() {
    let c = Cluster::start();
    c.exec("postgres", "CREATE ROLE nobody LOGIN");
    for sql in [
        "SELECT cube_dispatcher.start('x')",
        "SELECT cube_dispatcher.stop('x')",
        "SELECT cube_dispatcher.kill('x')",
        "SELECT cube_dispatcher.reload('x')",
        "SELECT cube_dispatcher.drop('x')",
        "SELECT cube_dispatcher.replay_dead_letters('x')",
        "SELECT * FROM cube_dispatcher.status",
        "SELECT * FROM cube_dispatcher.job",
        "SELECT * FROM cube_dispatcher.job_state",
        "SELECT * FROM cube_dispatcher.dead_letter",
    ] {
        let err = c.try_exec("target", &format!("SET ROLE nobody; {sql}")).unwrap_err();
        assert!(err.contains("permission denied"), "{sql}: {err}");
    }
}

#[test]
fn the_tables_list_refuses_every_other_table() {
    let c = Cluster::start();
    c.create_queue("q");
    c.target_sql(&format!("{ORDERS}; CREATE SCHEMA other; CREATE TABLE other.t (id int PRIMARY KEY)"));
    c.start_job("allow", "q", &[("tables", "public.orders"), ("on_error", "dead_letter")]);
    let jobs_before = c.value("target", "SELECT count(*) FROM cube_dispatcher.job");
    for table in
        ["pg_catalog.pg_authid", "other.t", "cube_dispatcher.job", "cube_dispatcher.job_state", "public.orders"]
    {
        c.source_sql(&format!("SELECT pgq.insert_event('q', 'I:id', 'id=1&txt=x', '{table}', NULL, NULL, NULL)"));
    }
    c.tick("q");
    c.wait_caught_up("q", "allow");
    let errors: Vec<String> = c
        .query("target", "SELECT ev_extra1 || ': ' || error FROM cube_dispatcher.dead_letter ORDER BY ev_id")
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    for e in &errors {
        assert!(e.contains("is not in the job's tables list"), "{e}");
    }
    assert_eq!(c.count("target", &format!("orders_{}", c.suffix("YYYY_MM_DD"))), 1, "the allowed table got its row");
    assert_eq!(c.value("target", "SELECT count(*) FROM cube_dispatcher.job"), jobs_before);
    assert_eq!(c.value("target", "SELECT count(*) FROM pg_tables WHERE schemaname IN ('other', 'pg_catalog', 'cube_dispatcher') AND tablename LIKE '%\\_2%'").as_deref(), Some("0"));
}

#[test]
fn names_built_to_break_out_of_quoting_touch_nothing_else() {
    let c = Cluster::start();
    c.create_queue("q");
    let weird = r#"We;ird "Tab" \ ä -- /*"#;
    let quoted = format!("\"{}\"", weird.replace('"', "\"\""));
    c.target_sql(&format!("{ORDERS}; INSERT INTO orders VALUES (42, 'keep me'); CREATE TABLE public.{quoted} (id int PRIMARY KEY, \"Col;umn\" text)"));
    c.start_job("inj", "q", &[("on_error", "dead_letter"), ("dateformat", "")]);
    let enc = |s: &str| {
        s.bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02x}") })
            .collect::<String>()
    };
    let events = [
        ("I:id".to_string(), "id=1".to_string(), "public.orders\"; DROP TABLE orders; --".to_string()),
        ("I:id".into(), "id=1".into(), "public.orders; DELETE FROM orders".into()),
        ("I:id".into(), format!("id=1&{}=x", enc("txt\" = 'x'; DELETE FROM orders; --")), "public.orders".into()),
        ("D:id".into(), format!("id={}", enc("1 OR 1=1")), "public.orders".into()),
        ("I:id".into(), format!("id=7&{}={}", enc("Col;umn"), enc("it's \"fine\"")), format!("public.{weird}")),
    ];
    for (t, d, e) in &events {
        c.source_sql(&format!(
            "SELECT pgq.insert_event('q', {}, {}, {}, NULL, NULL, NULL)",
            literal(t),
            literal(d),
            literal(e)
        ));
    }
    c.tick("q");
    c.wait_caught_up("q", "inj");
    assert_eq!(c.rows("orders", "id, txt"), vec![vec![Some("42".into()), Some("keep me".into())]], "orders untouched");
    assert_eq!(
        c.value("target", &format!("SELECT id || ' ' || \"Col;umn\" FROM public.{quoted}")).as_deref(),
        Some("7 it's \"fine\""),
        "the oddly named table got exactly its row"
    );
    assert_eq!(c.value("target", "SELECT count(*) FROM cube_dispatcher.dead_letter").as_deref(), Some("4"));
    assert_eq!(c.value("target", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").as_deref(), Some("2"));
}

/// What SQL run with more rights than its caller could reach by an unqualified name, planted in
/// `public` as a hostile role would: (signature, return type, the real thing it passes on to).
/// Each records who ran it; run by anyone but its planter it tries to make the planter a
/// superuser through dblink, so the escalation would survive the rollback of the statement.
const SHADOWS: &[(&str, &str, &str)] = &[
    ("current_setting(text, boolean)", "text", "pg_catalog.current_setting($1, $2)"),
    ("current_setting(text)", "text", "pg_catalog.current_setting($1)"),
    ("now()", "timestamptz", "pg_catalog.now()"),
    ("clock_timestamp()", "timestamptz", "pg_catalog.clock_timestamp()"),
    ("current_database()", "name", "pg_catalog.current_database()"),
    ("set_config(text, text, boolean)", "text", "pg_catalog.set_config($1, $2, $3)"),
    ("to_regclass(text)", "regclass", "pg_catalog.to_regclass($1)"),
    ("format(text)", "text", "pg_catalog.format($1)"),
    ("format(text, text)", "text", "pg_catalog.format($1, $2)"),
    ("format(text, text, text)", "text", "pg_catalog.format($1, $2, $3)"),
    ("format(text, text, text, text)", "text", "pg_catalog.format($1, $2, $3, $4)"),
    ("format(text, integer, text)", "text", "pg_catalog.format($1, $2, $3)"),
    ("quote_ident(text)", "text", "pg_catalog.quote_ident($1)"),
    ("quote_literal(text)", "text", "pg_catalog.quote_literal($1)"),
    ("format_type(oid, integer)", "text", "pg_catalog.format_type($1, $2)"),
    ("hashtextextended(text, bigint)", "bigint", "pg_catalog.hashtextextended($1, $2)"),
    ("pg_advisory_xact_lock(bigint)", "void", "pg_catalog.pg_advisory_xact_lock($1)"),
    ("trap_texteq(text, text)", "boolean", "pg_catalog.texteq($1, $2)"),
    ("trap_textcat(text, text)", "text", "pg_catalog.textcat($1, $2)"),
    ("trap_int8eq(bigint, bigint)", "boolean", "pg_catalog.int8eq($1, $2)"),
];

/// Plants SHADOWS (and operators =, || on text and = on bigint) in schema public of the target,
/// as `role`, which must have CREATE there.
fn plant_traps(c: &Cluster, role: &str) {
    let escalate = literal(&format!("host={} port={} dbname=postgres user={}", c.dir.display(), c.port, c.user));
    let mut sql = format!(
        "SET ROLE {role};
         CREATE FUNCTION public.cube_trap(what text) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, public AS $t$
         BEGIN
           RAISE WARNING 'cube_trap: % ran as %', what, current_user;
           IF current_user <> '{role}' THEN
             PERFORM public.dblink_exec({escalate}, 'ALTER ROLE {role} SUPERUSER');
           END IF;
         EXCEPTION WHEN OTHERS THEN
           RAISE WARNING 'cube_trap: % ran as % and could not escalate: %', what, current_user, SQLERRM;
         END $t$;"
    );
    for (sig, ret, real) in SHADOWS {
        let name = sig.split('(').next().unwrap();
        let body = if *ret == "void" { format!("PERFORM {real}; RETURN;") } else { format!("RETURN {real};") };
        sql.push_str(&format!(
            "CREATE FUNCTION public.{sig} RETURNS {ret} LANGUAGE plpgsql SET search_path = pg_catalog, public
             AS $t$ BEGIN PERFORM public.cube_trap('{name}'); {body} END $t$;"
        ));
    }
    sql.push_str(
        "CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.trap_texteq);
         CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = public.trap_textcat);
         CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.trap_int8eq);",
    );
    c.exec("target", &sql);
    // the traps work: with public first, the planter's own statement runs them (as the planter)
    c.exec("target", &format!("SET ROLE {role}; SET search_path = public, pg_catalog; SELECT now(), 'a'::text = 'a'"));
    for what in ["now", "trap_texteq"] {
        let line = format!("cube_trap: {what} ran as {role}");
        assert!(c.log().contains(&line), "the trap mechanism did not log {line:?}");
    }
}

/// No planted function or operator ever ran as anyone but `role`, and `role` is no superuser.
fn assert_traps_ran_only_as(c: &Cluster, role: &str, after: &str) {
    let own = format!("ran as {role}");
    let log = c.log();
    let foreign: Vec<&str> = log.lines().filter(|l| l.contains("cube_trap: ") && !l.contains(&own)).collect();
    assert!(foreign.is_empty(), "after {after}: planted code ran with other rights:\n{}", foreign.join("\n"));
    let su = c.value("postgres", &format!("SELECT rolsuper::text FROM pg_catalog.pg_roles WHERE rolname = '{role}'"));
    assert_eq!(su.as_deref(), Some("false"), "after {after}: {role} became a superuser");
}

#[test]
fn control_functions_never_run_what_their_caller_planted() {
    let c = with_operator();
    plant_traps(&c, "op");
    // the operator's own session puts public first, as the attack does
    let call = |f: &str, settings: &str| {
        as_op(&c, &format!("SET search_path = public, pg_catalog; {settings} SELECT cube_dispatcher.{f}('mjob')"))
    };
    let settings = format!(
        "SET cube_dispatcher.mjob.src_db = {}; SET cube_dispatcher.mjob.pgq_queue_name = 'q';
         SET cube_dispatcher.mjob.loop_delay = '0.2'; SET cube_dispatcher.mjob.on_error = 'dead_letter';",
        literal(&op_conninfo(&c, true))
    );
    let attack = |round: i32, what: &str| {
        let _ = call("start", &settings);
        assert_traps_ran_only_as(&c, "op", &format!("start, {what}"));
        // a row op may write and one it may not (a dead letter), so replay has work to do
        c.source_sql(&format!(
            "INSERT INTO orders VALUES ({round}, 'mine'); INSERT INTO secret VALUES ({round}, 'no')"
        ));
        c.tick("q");
        c.wait_caught_up("q", "mjob");
        assert_eq!(c.count("target", "cube_dispatcher.dead_letter"), 1);
        for f in ["reload", "replay_dead_letters", "stop", "start", "kill", "drop"] {
            let _ = call(f, &settings);
            assert_traps_ran_only_as(&c, "op", &format!("{f}, {what}"));
        }
        assert_eq!(c.count("target", "cube_dispatcher.job"), 0, "drop() did its work");
        assert_eq!(c.count("target", &format!("orders_{}", c.suffix("YYYY_MM_DD"))), i64::from(round));
    };
    attack(1, "functions as installed");
    // Without the SET clauses on the definitions, as a 0.1.0 installation has them until
    // ALTER EXTENSION ... UPDATE: the functions still pin the path themselves.
    c.target_sql(
        "ALTER FUNCTION cube_dispatcher.start(text) RESET search_path; ALTER FUNCTION cube_dispatcher.stop(text) RESET search_path;
         ALTER FUNCTION cube_dispatcher.kill(text) RESET search_path; ALTER FUNCTION cube_dispatcher.reload(text) RESET search_path;
         ALTER FUNCTION cube_dispatcher.drop(text) RESET search_path;
         ALTER FUNCTION cube_dispatcher.replay_dead_letters(text) RESET search_path",
    );
    attack(2, "functions without their SET clause");
}

#[test]
fn the_worker_ignores_a_database_search_path_that_puts_public_first() {
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
    c.exec("postgres", "CREATE ROLE mallory LOGIN");
    c.target_sql("GRANT CREATE ON SCHEMA public TO mallory");
    plant_traps(&c, "mallory");
    // keep_latest exercises deletes by key, keep_all the continued COPY (into monthly partitions);
    // dead letters and partitions created from the template in both
    c.start_job("latest", "q", &[("on_error", "dead_letter")]);
    c.start_job(
        "every",
        "q",
        &[("mode", "keep_all"), ("on_error", "dead_letter"), ("pgq_consumer_id", "all_c"), ("dateformat", "YYYY_MM")],
    );
    // common in real databases, and what the attack needs: every new session resolves public
    // first. The restart brings the launcher, the resume worker and both job workers up under it.
    c.target_sql("ALTER DATABASE target SET search_path = public, pg_catalog");
    c.restart_immediate();
    // the test's own statements in the target pin their path, so they never run the traps
    let q = |sql: &str| c.value("target", &format!("SET search_path = pg_catalog, public; {sql}"));
    let produce = |from: i32| {
        c.source_sql(&format!(
            "INSERT INTO orders SELECT g, 'v' || g FROM generate_series({from}, {from} + 99) g;
             UPDATE orders SET txt = 'u' WHERE id % 10 = 0; DELETE FROM orders WHERE id % 10 = 1 AND id >= {from};
             SELECT pgq.insert_event('q', 'I:id', 'id=1', 'public.no_such_table', NULL, NULL, NULL);"
        ));
        c.tick("q");
        // checked while waiting: planted code that breaks the worker must not pass for a timeout
        let last_tick = c.value("source", "SELECT last_tick_id FROM pgq.get_queue_info('q')").unwrap();
        c.wait_until("both consumers to catch up", Duration::from_secs(60), || {
            assert_traps_ran_only_as(&c, "mallory", "a batch");
            let done = c.try_value(
                "source",
                &format!("SELECT count(*) FILTER (WHERE current_batch IS NULL AND last_tick = {last_tick}) FROM pgq.get_consumer_info('q')"),
            );
            done.as_deref() == Some("2")
        });
    };
    produce(1);
    produce(1001);
    let day = c.suffix("YYYY_MM_DD");
    assert_eq!(q(&format!("SELECT count(*) FROM public.orders_{day}")).as_deref(), Some("180"), "keep_latest worked");
    let month = c.suffix("YYYY_MM");
    assert_eq!(q(&format!("SELECT count(*) FROM public.orders_{month}")).as_deref(), Some("230"), "keep_all worked");
    assert_eq!(q("SELECT count(*) FROM cube_dispatcher.dead_letter").as_deref(), Some("24"), "dead letters");
    assert_traps_ran_only_as(&c, "mallory", "two batches, dead letters and a restart");
}

#[test]
fn control_errors_carry_sqlstates() {
    let c = with_operator();
    let src = literal(&c.src_conninfo());
    let set = |job: &str, extra: &str| {
        format!("SET cube_dispatcher.{job}.src_db = {src}; SET cube_dispatcher.{job}.pgq_queue_name = 'q'; {extra}")
    };
    c.start_job("admin", "q", &[]);
    let cases: Vec<(String, &str)> = vec![
        ("SELECT cube_dispatcher.stop('nosuch')".into(), "42704"),
        ("SELECT cube_dispatcher.kill('nosuch')".into(), "42704"),
        ("SELECT cube_dispatcher.reload('nosuch')".into(), "42704"),
        ("SELECT cube_dispatcher.drop('nosuch')".into(), "42704"),
        ("SELECT cube_dispatcher.replay_dead_letters('nosuch')".into(), "42704"),
        ("SET ROLE op; SELECT cube_dispatcher.stop('admin')".into(), "42501"),
        ("SET ROLE op; SELECT cube_dispatcher.start('admin')".into(), "42501"),
        ("SELECT cube_dispatcher.start('v')".into(), "22023"),
        (set("v", "SET cube_dispatcher.v.mode = 'keep_some';") + " SELECT cube_dispatcher.start('v')", "22023"),
        (set("v", "SET cube_dispatcher.v.loop_delay = 'x';") + " SELECT cube_dispatcher.start('v')", "22023"),
        ("SELECT cube_dispatcher.start('Bad-Name')".into(), "42602"),
        ("SELECT cube_dispatcher.start('admin')".into(), "55000"),
        (
            "SET cube_dispatcher.v.src_db = 'host=127.0.0.1 port=1 dbname=source'; SET cube_dispatcher.v.pgq_queue_name = 'q';
             SELECT cube_dispatcher.start('v')"
                .into(),
            "08001",
        ),
        // dblink's own code for its password rule
        (
            format!(
                "SET ROLE op; SET cube_dispatcher.v.src_db = {}; SET cube_dispatcher.v.pgq_queue_name = 'q'; SELECT cube_dispatcher.start('v')",
                literal(&op_conninfo(&c, false))
            ),
            "2F003",
        ),
    ];
    for (sql, want) in cases {
        let (code, msg) = c.try_exec_state("target", &sql).expect_err(&sql);
        assert_eq!(code, want, "{sql}\n  -> {msg}");
    }
}

#[test]
fn a_tables_list_that_does_not_read_back_stops_the_job_instead_of_allowing_all() {
    let c = Cluster::start();
    c.feed("q", "orders", ORDERS, ORDERS);
    c.start_job("fc", "q", &[("tables", "public.other")]);
    // what only hand-editing the extension's table can do; the worker picks it up as a reload
    c.target_sql(
        "UPDATE cube_dispatcher.job SET options = options || '{\"tables\": \"public.\"}', config_version = config_version + 1
          WHERE job_name = 'fc'",
    );
    c.source_sql("INSERT INTO orders VALUES (1, 'x')");
    c.tick("q");
    c.wait_status("fc", "state", |s| s == Some("stopped"));
    let err = c.status("fc", "last_error").unwrap_or_default();
    assert!(err.contains("stored definition of job fc is unreadable: invalid value \"public.\" for tables"), "{err}");
    assert_eq!(c.value("target", "SELECT enabled::text FROM cube_dispatcher.job").as_deref(), Some("false"));
    assert_eq!(
        c.value("target", "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'orders\\_%'").as_deref(),
        Some("0")
    );
}

/// new_columns = add runs as the job's role: a parent it does not own is a clear error, never
/// a silent drop.
#[test]
fn new_columns_add_needs_the_job_to_own_the_parent() {
    let c = with_operator();
    as_op(
        &c,
        &format!(
            "SET cube_dispatcher.adder.src_db = {}; SET cube_dispatcher.adder.pgq_queue_name = 'q';
             SET cube_dispatcher.adder.loop_delay = '0.2'; SET cube_dispatcher.adder.new_columns = 'add';
             SELECT cube_dispatcher.start('adder')",
            literal(&op_conninfo(&c, true))
        ),
    )
    .unwrap();
    c.source_sql("ALTER TABLE orders ADD COLUMN price numeric; INSERT INTO orders VALUES (1, 'a', 2.5)");
    c.tick("q");
    c.wait_status("adder", "last_error", |e| {
        e.is_some_and(|e| e.contains("adding column \"price\" to public.orders failed: must be owner of table orders"))
    });
    assert_eq!(
        c.value(
            "target",
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname = 'price'"
        )
        .as_deref(),
        Some("0")
    );
    // the DBA hands the table over: the job adds the column and goes on
    c.target_sql("ALTER TABLE orders OWNER TO op");
    c.wait_caught_up("q", "adder");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    assert_eq!(c.value("target", &format!("SELECT price::text FROM {part}")).as_deref(), Some("2.5"));
}
