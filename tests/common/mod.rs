//! End-to-end harness: a throwaway PostgreSQL 15 cluster with the installed cube_dispatcher
//! preloaded, a `source` database with PgQ and a `target` database with the extension.
//! Everything is torn down in Drop, also when the test panics.
#![allow(dead_code)]

use postgres::{Client, NoTls, SimpleQueryMessage};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// The OS user the server runs as, and the database superuser the tests connect as.
    pub user: String,
    pgqd: Option<Child>,
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Runs a server program as the cluster's owner: `postgres` when we are root (PostgreSQL refuses
/// to run as root), else ourselves.
fn server_cmd(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &format!("{BIN}/{program}")]);
        c
    } else {
        Command::new(format!("{BIN}/{program}"))
    }
}

/// Runs a program to completion; panics with its output if it fails, else returns its stdout.
pub fn run(mut c: Command, what: &str) -> String {
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Cluster {
    /// initdb + start with the extension preloaded; creates `source` (pgq) and `target`
    /// (cube_dispatcher, which brings dblink).
    pub fn start() -> Cluster {
        Self::start_with(&[])
    }

    pub fn start_with(extra_conf: &[&str]) -> Cluster {
        let c = Self::start_bare(extra_conf);
        c.exec("source", "CREATE EXTENSION pgq;");
        c.exec("target", "CREATE EXTENSION cube_dispatcher CASCADE;");
        c
    }

    /// Empty `source` and `target` databases, no extensions.
    pub fn start_bare(extra_conf: &[&str]) -> Cluster {
        let base = if is_root() { 40000 } else { 45000 };
        // a port (and directory) per cluster of this test binary: with 8 slots, a binary's 9th
        // cluster took its 1st one's, and removed its directory while it still ran
        let slot = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        assert!(slot < 32, "more than 32 clusters in one test binary: widen the port range");
        let port = base + (std::process::id() as u16 % 500) * 32 + slot;
        let dir = std::env::temp_dir().join(format!("cube-dispatcher-e2e-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let user = if is_root() {
            let mut chown = Command::new("chown");
            chown.args(["postgres:", dir.to_str().unwrap()]);
            run(chown, "chown");
            "postgres".to_string()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "postgres".into())
        };
        let c = Cluster { dir, port, user, pgqd: None };
        let data = c.data_dir();
        let mut initdb = server_cmd("initdb");
        initdb.args([
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            &c.user.clone(),
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]);
        run(initdb, "initdb");
        let mut conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\nlisten_addresses = ''\n\
             shared_preload_libraries = 'cube_dispatcher'\nmax_worker_processes = 32\nfsync = off\n\
             full_page_writes = off\nlog_line_prefix = '%m [%p] %b '\n\
             log_min_messages = info\n",
            c.dir.display()
        );
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let path = data.join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path).unwrap();
        all.push_str(&conf);
        std::fs::write(&path, all).unwrap();
        c.pg_ctl(&["start", "-w", "-t", "60"]);
        c.exec("postgres", "CREATE DATABASE source");
        c.exec("postgres", "CREATE DATABASE target");
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut c = server_cmd("pg_ctl");
        c.args(["-D", self.data_dir().to_str().unwrap(), "-l", self.log_path().to_str().unwrap()]);
        c.args(args);
        // pgrx prints a Rust backtrace with every error when this is set: noise in the server log
        c.env_remove("RUST_BACKTRACE");
        run(c, &format!("pg_ctl {args:?}"));
    }

    /// What a server-side dblink needs to reach the source database (it does not see PGHOST).
    pub fn src_conninfo(&self) -> String {
        format!("host={} port={} dbname=source user={}", self.dir.display(), self.port, self.user)
    }

    pub fn connect(&self, db: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r =
                postgres::Config::new().host_path(&self.dir).port(self.port).user(&self.user).dbname(db).connect(NoTls);
            match r {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect to {db}: {e}\n{}", self.log_tail()),
            }
        }
    }

    pub fn exec(&self, db: &str, sql: &str) {
        self.connect(db).batch_execute(sql).unwrap_or_else(|e| panic!("{db}: {sql}: {}", err_text(&e)));
    }

    /// Like exec, but returns the error text instead of panicking.
    pub fn try_exec(&self, db: &str, sql: &str) -> Result<(), String> {
        self.connect(db).batch_execute(sql).map_err(|e| err_text(&e))
    }

    /// Like try_exec, but the error is (SQLSTATE, message), so tests can check the code a client sees.
    pub fn try_exec_state(&self, db: &str, sql: &str) -> Result<(), (String, String)> {
        self.connect(db).batch_execute(sql).map_err(|e| match e.as_db_error() {
            Some(d) => (d.code().code().to_string(), d.message().to_string()),
            None => (String::new(), e.to_string()),
        })
    }

    /// Every row of the last statement, each value as text (None for NULL).
    pub fn query(&self, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        let msgs = self.connect(db).simple_query(sql).unwrap_or_else(|e| panic!("{db}: {sql}: {}", err_text(&e)));
        msgs.into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
                _ => None,
            })
            .collect()
    }

    /// Like value, but a failed query (say, while the server restarts) is None.
    pub fn try_value(&self, db: &str, sql: &str) -> Option<String> {
        let mut client = postgres::Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .user(&self.user)
            .dbname(db)
            .connect(NoTls)
            .ok()?;
        let msgs = client.simple_query(sql).ok()?;
        msgs.into_iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
    }

    /// The first value of the first row.
    pub fn value(&self, db: &str, sql: &str) -> Option<String> {
        self.query(db, sql).into_iter().next().and_then(|r| r.into_iter().next().flatten())
    }

    pub fn source_sql(&self, sql: &str) {
        self.exec("source", sql)
    }

    pub fn target_sql(&self, sql: &str) {
        self.exec("target", sql)
    }

    pub fn create_queue(&self, queue: &str) {
        self.exec("source", &format!("SELECT pgq.create_queue('{queue}')"));
    }

    pub fn add_logutriga(&self, table: &str, queue: &str) {
        self.exec(
            "source",
            &format!("CREATE TRIGGER cube_replica AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('{queue}')"),
        );
    }

    pub fn add_jsontriga(&self, table: &str, queue: &str) {
        self.exec(
            "source",
            &format!("CREATE TRIGGER cube_replica_json AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE PROCEDURE pgq.jsontriga('{queue}')"),
        );
    }

    /// One queue carrying both event formats, interleaved: rows with an odd `key` are sent by
    /// pgq.jsontriga, the others by pgq.logutriga (each key always by the same trigger).
    pub fn add_mixed_triggers(&self, table: &str, queue: &str, key: &str) {
        for (name, when, trigger) in
            [("url", format!("NEW.{key} % 2 = 0"), "logutriga"), ("json", format!("NEW.{key} % 2 = 1"), "jsontriga")]
        {
            self.exec(
                "source",
                &format!(
                    "CREATE TRIGGER cube_{name} AFTER INSERT OR UPDATE ON {table} FOR EACH ROW WHEN ({when})
                       EXECUTE PROCEDURE pgq.{trigger}('{queue}');
                     CREATE TRIGGER cube_{name}_del AFTER DELETE ON {table} FOR EACH ROW WHEN ({})
                       EXECUTE PROCEDURE pgq.{trigger}('{queue}')",
                    when.replace("NEW.", "OLD.")
                ),
            );
        }
    }

    /// The usual scene: a queue, a source table whose logutriga trigger feeds it, and the parent
    /// table in the target.
    pub fn feed(&self, queue: &str, table: &str, source_ddl: &str, target_ddl: &str) {
        self.create_queue(queue);
        self.source_sql(source_ddl);
        self.add_logutriga(table, queue);
        self.target_sql(target_ddl);
    }

    /// Closes the current batch: PgQ's ticker alone waits for 500 events or ticker_max_lag.
    pub fn tick(&self, queue: &str) {
        self.exec("source", &format!("SELECT pgq.force_tick('{queue}'); SELECT pgq.ticker();"));
    }

    /// Sets the job's options as ALTER DATABASE target SET cube_dispatcher.<job>.<option>.
    pub fn configure(&self, job: &str, options: &[(&str, &str)]) {
        for (opt, value) in options {
            self.exec("target", &format!("ALTER DATABASE target SET cube_dispatcher.{job}.{opt} = {}", literal(value)));
        }
    }

    /// The common case: a job on `queue` reading the source of this cluster.
    pub fn start_job(&self, job: &str, queue: &str, options: &[(&str, &str)]) -> i32 {
        let conn = self.src_conninfo();
        let mut all = vec![("src_db", conn.as_str()), ("pgq_queue_name", queue), ("loop_delay", "0.2")];
        all.extend_from_slice(options);
        self.configure(job, &all);
        self.value("target", &format!("SELECT cube_dispatcher.start('{job}')")).unwrap().parse().unwrap()
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what}\n--- server log tail ---\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Until the consumer has finished every batch up to the queue's last tick.
    pub fn wait_caught_up(&self, queue: &str, consumer: &str) {
        let sql = format!(
            "SELECT (c.current_batch IS NULL AND c.last_tick = q.last_tick_id)::text
               FROM pgq.get_consumer_info('{queue}', '{consumer}') c, pgq.get_queue_info('{queue}') q"
        );
        self.wait_until(&format!("consumer {consumer} to catch up on {queue}"), Duration::from_secs(60), || {
            self.try_value("source", &sql).as_deref() == Some("true")
        });
    }

    /// A job's row in cube_dispatcher.status, by column name.
    pub fn status(&self, job: &str, column: &str) -> Option<String> {
        self.value("target", &format!("SELECT {column}::text FROM cube_dispatcher.status WHERE job_name = '{job}'"))
    }

    pub fn wait_status(&self, job: &str, column: &str, pred: impl Fn(Option<&str>) -> bool) {
        self.wait_until(&format!("status.{column} of {job}"), Duration::from_secs(60), || {
            pred(self.status(job, column).as_deref())
        });
    }

    /// Rows of a target table, sorted, as text.
    pub fn rows(&self, table: &str, columns: &str) -> Vec<Vec<Option<String>>> {
        self.query("target", &format!("SELECT {columns} FROM {table} ORDER BY 1, 2"))
    }

    pub fn count(&self, db: &str, table: &str) -> i64 {
        self.value(db, &format!("SELECT count(*) FROM {table}")).unwrap().parse().unwrap()
    }

    /// to_char(now(), fmt) on the source, i.e. the partition suffix of a batch closing now.
    pub fn suffix(&self, fmt: &str) -> String {
        self.value("source", &format!("SELECT to_char(now(), '{fmt}')")).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Adds a pg_hba.conf line in front of the others (first match wins) and reloads.
    pub fn hba_prepend(&self, line: &str) {
        let path = self.data_dir().join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{line}\n{old}")).unwrap();
        self.exec("postgres", "SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Crash-like restart: no shutdown checkpoint, workers killed; then wait for connections.
    pub fn restart_immediate(&self) {
        self.pg_ctl(&["restart", "-m", "immediate", "-w", "-t", "60"]);
    }

    /// Starts the real pgqd ticker on the source database; stopped in Drop.
    pub fn start_pgqd(&mut self) {
        let ini = self.dir.join("pgqd.ini");
        std::fs::write(
            &ini,
            format!(
                "[pgqd]\nbase_connstr = host={} port={} user={}\ndatabase_list = source\nlogfile = {}\npidfile = {}\nticker_period = 0.2\ncheck_period = 1\n",
                self.dir.display(),
                self.port,
                self.user,
                self.dir.join("pgqd.log").display(),
                self.dir.join("pgqd.pid").display()
            ),
        )
        .unwrap();
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "pgqd"]);
            c
        } else {
            Command::new("pgqd")
        };
        cmd.arg(&ini).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        self.pgqd = Some(cmd.spawn().expect("start pgqd"));
    }

    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut p) = self.pgqd.take() {
            // pgqd runs under runuser when we are root: stop pgqd itself, then reap runuser
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgqd.pid")) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
            let _ =
                Command::new("pkill").args(["-f", &format!("pgqd {}", self.dir.join("pgqd.ini").display())]).status();
            let _ = p.wait();
        }
        let pid = self.postmaster_pid();
        let mut c = server_cmd("pg_ctl");
        c.args(["-D", self.data_dir().to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
        let _ = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if let Some(pid) = pid {
            // if the postmaster did not go, take it and its children down hard
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        if std::env::var_os("CUBE_KEEP_CLUSTER").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn err_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}
