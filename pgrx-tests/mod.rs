//! #[pg_test]s: run inside a real backend by `cargo pgrx test`, each in a transaction that is
//! rolled back afterwards. They drive the writer directly with hand-made events, no worker.

#[pgrx::pg_schema]
mod tests {
    use crate::apply::{quote_ident, BatchWriter};
    use crate::config::{ConfigError, Context, JobConfig, Setting, Word};
    use crate::event::RawEvent;
    use crate::mode::Mode;
    use crate::part_time::Placement;
    use crate::placement::DateFormat;
    use pgrx::prelude::*;

    /// A job as start() would read it from these settings.
    fn job(mode: Mode, template: Option<&str>) -> JobConfig {
        let settings = [
            ("src_db", Some("dbname=x")),
            ("pgq_queue_name", Some("q")),
            ("mode", Some(mode.as_str())),
            ("part_template", template),
        ];
        let lookup = |opt: &str| Setting {
            text: settings.iter().find(|(o, _)| *o == opt).and_then(|(_, v)| v.map(str::to_string)),
            place: opt.to_string(),
        };
        JobConfig::read(&Context { job: "t", current_db: "x" }, &lookup).unwrap()
    }

    fn ev<'a>(id: i64, ty: &'a str, data: &'a str, table: &'a str) -> RawEvent<'a> {
        RawEvent {
            ev_id: id,
            ev_time: None,
            ev_type: Some(ty.into()),
            ev_data: Some(data.into()),
            ev_extra1: Some(table.into()),
            predecoded: false,
        }
    }

    fn me() -> pg_sys::Oid {
        unsafe { pg_sys::GetUserId() }
    }

    fn rows(sql: &str) -> Vec<String> {
        Spi::connect(|c| {
            let mut out = Vec::new();
            for r in c.select(sql, None, &[])? {
                out.push(r.get::<String>(1)?.unwrap_or_default());
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .unwrap()
    }

    #[pg_test]
    fn quote_ident_is_postgres_own() {
        assert_eq!(quote_ident("orders"), "orders");
        assert_eq!(quote_ident("Orders"), "\"Orders\"");
        assert_eq!(quote_ident("order"), "\"order\"", "keywords are quoted");
        assert_eq!(quote_ident("x\"; drop table t; --"), "\"x\"\"; drop table t; --\"");
    }

    #[pg_test]
    fn keep_latest_writes_the_last_version_into_a_new_partition() {
        Spi::run("CREATE TABLE orders (id int PRIMARY KEY, txt text, n numeric)").unwrap();
        let cfg = job(Mode::KeepLatest, None);
        let mut w = BatchWriter::new(&cfg, me(), Placement::fixed(Some("2026_11_24".into())));
        let events = vec![
            ev(1, "I:id", "id=1&txt=a&n=1.5", "public.orders"),
            ev(2, "I:id", "id=2&txt&n=2", "public.orders"),
            ev(3, "U:id", "id=1&txt=b+c&n=1.5", "public.orders"),
            ev(4, "D:id", "id=2&txt&n=2", "public.orders"),
            ev(5, "I:id", "id=3&txt=&n", "public.orders"),
        ];
        w.apply(&events).unwrap();
        let created: Vec<_> =
            w.created.iter().map(|p| (p.parent.as_str(), p.partition.as_str(), p.suffix.as_str())).collect();
        assert_eq!(created, vec![("public.orders", "public.orders_2026_11_24", "2026_11_24")]);
        assert_eq!(
            rows("SELECT id || ':' || coalesce(txt, 'NULL') || ':' || coalesce(n::text, 'NULL') FROM orders_2026_11_24 ORDER BY id"),
            vec!["1:b c:1.5", "3::NULL"]
        );
        // a later chunk of the same batch replaces and deletes across chunks
        w.apply(&[ev(6, "U:id", "id=3&txt=z&n=9", "public.orders"), ev(7, "D:id", "id=1", "public.orders")]).unwrap();
        assert_eq!(rows("SELECT id || ':' || txt FROM orders_2026_11_24 ORDER BY id"), vec!["3:z"]);
    }

    #[pg_test]
    fn row_security_makes_the_writer_use_insert_which_enforces_it() {
        Spi::run(
            "CREATE ROLE cd_rls_tester; CREATE TABLE notes (id int, owner text);
             ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
             CREATE POLICY mine ON notes FOR INSERT TO cd_rls_tester WITH CHECK (owner = 'me');
             GRANT INSERT, SELECT ON notes TO cd_rls_tester; GRANT CREATE ON SCHEMA public TO cd_rls_tester",
        )
        .unwrap();
        let role = Spi::get_one::<pg_sys::Oid>("SELECT 'cd_rls_tester'::regrole::oid").unwrap().unwrap();
        let mut cfg = job(Mode::KeepAll, Some("create table _DEST_TABLE (like _PARENT); alter table _DEST_TABLE enable row level security; create policy mine on _DEST_TABLE for insert with check (owner = 'me'); create policy see on _DEST_TABLE for select using (true)"));
        cfg.dateformat = DateFormat::Off;
        let mut w = BatchWriter::new(&cfg, role, Placement::fixed(None));
        w.apply(&[ev(1, "I:", "id=1&owner=me", "public.notes")]).unwrap();
        let err = w.apply(&[ev(2, "I:", "id=2&owner=you", "public.notes")]).unwrap_err().to_string();
        assert!(err.contains("row-level security"), "{err}");
    }

    #[pg_test]
    fn templates_see_quoted_names() {
        Spi::run(r#"CREATE SCHEMA "Sales"; CREATE TABLE "Sales"."Order Lines" ("Id" int, line int, PRIMARY KEY ("Id", line))"#).unwrap();
        let cfg = job(
            Mode::KeepLatest,
            Some("create table _DEST_TABLE (like _PARENT); alter table only _DEST_TABLE add primary key (_PKEY); create index on _DEST_TABLE (line)"),
        );
        let mut w = BatchWriter::new(&cfg, me(), Placement::fixed(Some("2026_11".into())));
        w.apply(&[ev(1, "I:Id,line", "Id=1&line=2", "Sales.Order Lines")]).unwrap();
        let created: Vec<_> =
            w.created.iter().map(|p| (p.parent.as_str(), p.partition.as_str(), p.suffix.as_str())).collect();
        assert_eq!(created, vec![(r#""Sales"."Order Lines""#, r#""Sales"."Order Lines_2026_11""#, "2026_11")]);
        assert_eq!(
            rows(
                r#"SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '"Sales"."Order Lines_2026_11"'::regclass"#
            ),
            vec![r#"PRIMARY KEY ("Id", line)"#]
        );
    }

    #[pg_test]
    fn mask_password_and_the_status_view() {
        assert_eq!(
            Spi::get_one::<String>("SELECT cube_dispatcher.mask_password('host=h password=s3cret dbname=d')")
                .unwrap()
                .as_deref(),
            Some("host=h password=******** dbname=d")
        );
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM cube_dispatcher.status").unwrap(), Some(0));
    }

    #[pg_test]
    fn every_security_definer_function_pins_its_search_path() {
        let pinned = format!("search_path={}", crate::roles::SAFE_SEARCH_PATH);
        let functions = rows(
            "SELECT p.oid::regprocedure::text || ' ' || coalesce(array_to_string(p.proconfig, ';'), '(none)')
               FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid
              WHERE e.extname = 'cube_dispatcher' AND p.prosecdef ORDER BY 1",
        );
        assert_eq!(functions.len(), 6, "{functions:?}");
        for f in functions {
            assert!(f.ends_with(&format!(" {pinned}")), "{f}");
        }
    }

    #[pg_test]
    fn a_template_runs_restricted_and_leaves_no_setting_behind() {
        Spi::run("CREATE TABLE orders (id int PRIMARY KEY)").unwrap();
        let setting = |name: &str| Spi::get_one::<String>(&format!("SELECT current_setting('{name}')")).unwrap();
        let (path, work_mem) = (setting("search_path"), setting("work_mem"));
        let cfg = job(
            Mode::KeepAll,
            Some("set search_path = public, pg_catalog; select set_config('work_mem', '77MB', false); create table _DEST_TABLE (like _PARENT)"),
        );
        BatchWriter::new(&cfg, me(), Placement::fixed(Some("2026_12_02".into())))
            .apply(&[ev(1, "I:id", "id=1", "public.orders")])
            .unwrap();
        assert_eq!((setting("search_path"), setting("work_mem")), (path, work_mem));
        let cfg = job(Mode::KeepAll, Some("create temp table _SCHEMA_TABLE (like _PARENT)"));
        let err = BatchWriter::new(&cfg, me(), Placement::fixed(Some("2026_12_03".into())))
            .apply(&[ev(2, "I:id", "id=2", "public.orders")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("security-restricted operation"), "{err}");
    }

    #[pg_test]
    fn unreadable_stored_values_stop_instead_of_becoming_defaults() {
        Spi::run(&format!(
            "INSERT INTO cube_dispatcher.job (job_name, options, run_as, enabled) VALUES ('t', '{}', 10, true)",
            job(Mode::KeepAll, None).to_json()
        ))
        .unwrap();
        assert_eq!(crate::state::load_job("t").unwrap().unwrap().config, job(Mode::KeepAll, None));
        let cases = [("mode", "keep_some"), ("log_level", "loud"), ("on_error", "ignore"), ("tables", "public.")];
        for (option, bad) in cases {
            Spi::run(&format!(
                "UPDATE cube_dispatcher.job SET options = jsonb_set(options, '{{{option}}}', to_jsonb('{bad}'::text))"
            ))
            .unwrap();
            let err = crate::state::load_job("t").err().unwrap_or_else(|| panic!("{option} = {bad} was accepted"));
            assert!(
                matches!(&err.err, ConfigError::Invalid { guc, value, .. } if guc == option && value == bad),
                "{option}: {err}"
            );
            Spi::run(&format!("UPDATE cube_dispatcher.job SET options = options - '{option}'")).unwrap();
        }
        Spi::run("UPDATE cube_dispatcher.job SET options = options || '{\"modee\": \"keep_all\"}'").unwrap();
        let err = crate::state::load_job("t").err().expect("an unknown stored option was accepted");
        assert!(err.to_string().contains("modee is not an option of cube_dispatcher; did you mean mode?"), "{err}");
    }

    #[pg_test]
    fn the_status_view_shows_options_with_connection_strings_masked() {
        Spi::run(&format!(
            "INSERT INTO cube_dispatcher.job (job_name, options, run_as, enabled) VALUES ('t', '{}', 10, true)",
            job(Mode::KeepAll, None).to_json().replace("dbname=x", "dbname=x password=hunter2")
        ))
        .unwrap();
        let shown = Spi::get_one::<String>("SELECT options::text FROM cube_dispatcher.status").unwrap().unwrap();
        let want = serde_json::json!({"src_db": "dbname=x password=********", "mode": "keep_all", "tables": null});
        let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&shown[k], v, "{shown}");
        }
        let options = Spi::get_one::<i64>("SELECT count(*) FROM cube_dispatcher.options()").unwrap();
        assert_eq!(options, Some(crate::config::SCHEMA.len() as i64));
    }

    #[pg_test]
    fn one_chunk_of_both_formats_with_a_truncate_in_it() {
        Spi::run("CREATE TABLE orders (id int PRIMARY KEY, txt text, j jsonb)").unwrap();
        let cfg = job(Mode::KeepLatest, None);
        let mut w = BatchWriter::new(&cfg, me(), Placement::fixed(Some("2026_12_02".into())));
        let json = |op: &str| format!(r#"{{"op":"{op}","table":["public","orders"],"pkey":["id"]}}"#);
        let (ins, upd, trunc) = (json("INSERT"), json("UPDATE"), json("TRUNCATE"));
        let events = vec![
            ev(1, &ins, r#"{"id":1,"txt":"tab\there \"q\" \\ \u00e9","j":"{\"a\": [1, 2]}"}"#, "public.orders"),
            ev(2, "I:id", "id=2&txt=url+row&j=%7b%7d", "public.orders"),
            ev(3, &trunc, "{}", "public.orders"),
            ev(4, "I:id", "id=4&txt=after", "public.orders"),
            ev(5, &ins, r#"{"id":5,"txt":null,"j":null}"#, "public.orders"),
            ev(6, &upd, r#"{"id":4,"txt":"after, updated","j":"[true]"}"#, "public.orders"),
        ];
        w.apply(&events).unwrap();
        assert_eq!(
            rows("SELECT id || '|' || coalesce(txt, 'NULL') || '|' || coalesce(j::text, 'NULL') FROM orders_2026_12_02 ORDER BY id"),
            vec!["4|after, updated|[true]", "5|NULL|NULL"]
        );
        // the same rows without the truncate: every JSON value reads back as it was sent
        w.apply(&events[..2]).unwrap();
        assert_eq!(
            rows("SELECT txt || '|' || j::text FROM orders_2026_12_02 WHERE id < 3 ORDER BY id"),
            vec!["tab\there \"q\" \\ é|{\"a\": [1, 2]}", "url row|{}"]
        );
    }

    #[pg_test]
    fn import_ini_gives_statements_that_set_the_job_up() {
        let ini = "[cube_dispatcher]\njob_name = bi_cube\nsrc_db = host=/tmp port=5432 dbname=src\n\
                   pgq_queue_name = q\nmode = keep_all\nlogfile = ~/log/%(job_name)s.log\n\
                   part_template = create table _DEST_TABLE (like _PARENT);\n   comment on table _DEST_TABLE is 'it''s \\ here';\n";
        let got: Vec<String> = Spi::connect(|c| {
            let rows = c.select("SELECT statement FROM cube_dispatcher.import_ini($1)", None, &[ini.into()])?;
            rows.map(|r| r.get::<String>(1).map(Option::unwrap_or_default)).collect::<Result<_, _>>()
        })
        .unwrap();
        let db = Spi::get_one::<String>("SELECT current_database()::text").unwrap().unwrap();
        let alter = |opt: &str, v: &str| {
            format!("ALTER DATABASE {} SET cube_dispatcher.bi_cube.{opt} = {v};", quote_ident(&db))
        };
        assert!(got.contains(&alter("mode", "'keep_all'")), "{got:#?}");
        assert!(got.contains(&alter("src_db", "'host=/tmp port=5432 dbname=src'")), "{got:#?}");
        assert!(got.iter().any(|s| s.starts_with("-- logfile") && s.contains("~/log/bi_cube.log")), "{got:#?}");
        // quotes and backslashes survive PostgreSQL's quoting: run the statements and read them back
        for s in got.iter().filter(|s| s.starts_with("ALTER")) {
            Spi::run(s).unwrap();
        }
        let template = Spi::get_one::<String>(
            "SELECT substr(c, strpos(c, '=') + 1) FROM pg_db_role_setting s, unnest(s.setconfig) c
              WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND c LIKE 'cube_dispatcher.bi_cube.part_template=%'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            template,
            "create table _DEST_TABLE (like _PARENT);\ncomment on table _DEST_TABLE is 'it''s \\ here';"
        );
        // an unknown key: a configuration file error naming it
        let err = crate::tx::in_subtransaction(|| {
            Spi::run(
                "SELECT * FROM cube_dispatcher.import_ini('[cube_dispatcher]
job_name = x
modee = keep_all')",
            )
        });
        let err = match err {
            Err(crate::tx::SubError::Raised(e)) => format!("{:?} {}", e.code, e.message),
            other => panic!("expected an error, got {:?}", other.is_ok()),
        };
        assert!(err.starts_with("ERRCODE_CONFIG_FILE_ERROR"), "{err}");
        assert!(err.contains("modee"), "{err}");
    }
}
