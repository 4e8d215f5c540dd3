//! Security: jobs run with their owner's rights, an allow-list of tables, nothing for PUBLIC,
//! and identifiers from events never break out of quoting.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::{literal, Cluster};

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
    let err = as_op(&c, "SELECT src_db FROM cube_dispatcher.job").unwrap_err();
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
