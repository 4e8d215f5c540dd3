//! Everything that talks to the source database, through dblink called over SPI. The only module
//! that knows dblink. Remote statements are built by PostgreSQL's format() with %L/%s of values
//! that are parameters here, never by pasting text in Rust. dblink's functions are called by
//! their schema-qualified names (dblink is relocatable and usually lives in `public`, where other
//! roles may create look-alikes), and the remote session gets the same pinned search_path as
//! ours (see roles.rs): the events query PgQ builds names some built-ins without a schema.
//!
//! Batch boundaries cost no round trip of their own. When a batch's last chunk has been fetched,
//! one query goes out at once, while that chunk is still being written here: it commits the
//! previous source transaction, begins the next, finishes this batch, takes the next one, opens
//! its cursor and fetches its first chunk. The target commits meanwhile, and the next batch's
//! first events are waiting when it starts. The finish is thus *run* before the target commits
//! but *committed* only with the following boundary query (or `settle`), which is sent after the
//! target's commit and after that commit's WAL is flushed (the target commits without waiting
//! for the disk, see tx.rs); if anything fails first, dropping the connection rolls the finish
//! back and the batch comes again, recognised by its tick (see batch.rs).

use crate::event::{Chunks, RawEvent};
use crate::tx::SqlError;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, PreparedStatement};
use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// One named dblink connection per worker process (a worker serves one job).
const CONN: &str = "cube_dispatcher";
const CURSOR: &str = "cube_dispatcher_events";
/// Events per FETCH. The first FETCH of a batch taken after a pause is small: nothing is written
/// while it is awaited, so a small one lets writing start sooner; later FETCHes (and the first
/// one of a batch taken at a boundary) run while a chunk is written.
const FIRST_CHUNK: usize = 1000;
const CHUNK: usize = 5000;
/// A FETCH's result. ev_time as text: it is only kept for dead letters, so it is not parsed per
/// event.
const FETCH_RESULT: &str = "SELECT ev_id, ev_time, ev_type, ev_data, ev_extra1 FROM dblink.dblink_get_result($1)
                              AS t(ev_id bigint, ev_time text, ev_type text, ev_data text, ev_extra1 text)";
/// dblink needs one more dblink_get_result after each result to free the connection.
const RELEASE: &str = "SELECT * FROM dblink.dblink_get_result($1) AS t(ev_id bigint)";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchInfo {
    pub batch_id: i64,
    pub prev_tick_id: i64,
    pub tick_id: i64,
    pub batch_end: String,
    /// to_char(batch_end, dateformat), computed on the source as the original did.
    pub suffix: Option<String>,
    pub lag: Option<String>,
    /// the source session's TimeZone, in which every partition suffix is computed
    pub time_zone: String,
}

/// What a batch is taken with: the job's queue settings, and how its events are read.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchRequest {
    pub queue: String,
    pub consumer: String,
    /// to_char format of the partition suffix; None: no suffix
    pub dateformat: Option<String>,
    /// pgq.next_batch_custom's min_lag, min_count, min_interval (all None: one tick per batch,
    /// what pgq.next_batch does)
    pub min_lag: Option<String>,
    pub min_count: Option<i32>,
    pub min_interval: Option<String>,
    /// in ev_id order, which keep_latest needs. Unordered (keep_all, where order does not change
    /// the result) the source streams rows at once instead of sorting the whole batch first.
    pub ordered: bool,
    /// ev_time is read only when it is used; the source then spends no time formatting it
    pub with_time: bool,
    /// a receiving helper may send rows decoded already (`decode::predecoded`); not for a pace
    /// that parks events, as dead letters keep ev_data as stored
    pub predecode: bool,
}

pub struct Source {
    /// dblink runs as this role: its password rule then applies to non-superusers.
    role: pg_sys::Oid,
    conninfo: String,
    lifetime: Duration,
    opened_at: Option<Instant>,
    /// the connection string changed: the next connect opens a new connection
    reconnect: bool,
    /// the remote session is inside a transaction this side began
    in_transaction: bool,
    /// A boundary query sent for this request whose results before its FETCH are not read yet.
    ahead: Option<Ahead>,
    /// the batch being read and its request, for the boundary query its end sends
    current: Option<(i64, BatchRequest)>,
    /// a batch read to its end whose finish rides in the next boundary query (or `settle`)
    owed: Option<i64>,
    /// A FETCH sent with dblink_send_query whose result is not read yet: the source produces the
    /// next chunk while this backend writes the current one.
    fetch_in_flight: bool,
    /// the size of the FETCH in flight: a shorter answer means the cursor is exhausted
    asked: usize,
    /// whether the current batch is read before the writer asked for it (`read_early`)
    early: Early,
    /// dblink's schema as an identifier; looked up again for every new connection
    dblink: Option<String>,
    /// The statements run here, planned once per connection (by text and argument types):
    /// a batch runs about ten, a chunk two.
    plans: HashMap<(String, Vec<pg_sys::Oid>), Rc<OwnedPreparedStatement>>,
    /// Where the writer's commits are known to end, when the writer is another process (the
    /// receiving helper's case); None: this process is the writer (its own last commit).
    written_upto: Option<u64>,
}

/// A batch read early sends no boundary query at its end, whose COMMIT would commit the finish
/// of a batch the writer may not have committed yet: that end waits for `release_boundary`.
#[derive(Clone, Copy, PartialEq)]
enum Early {
    No,
    Reading,
    /// its last chunk was read
    Ended,
}

struct Ahead {
    request: BatchRequest,
    /// it began with a COMMIT, whose result comes first
    commit: bool,
    /// it finishes a batch, whose result comes after BEGIN's
    finish: bool,
    /// the size of its FETCH
    first_fetch: usize,
}

/// The schema dblink is installed in, quoted as an identifier.
fn dblink_schema() -> String {
    crate::spi::value::<String>(
        "SELECT quote_ident(n.nspname::text) FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
          WHERE e.extname = 'dblink'",
        &[],
    )
    .unwrap_or_else(|| error!("cube_dispatcher: the dblink extension is not installed in this database"))
}

impl Source {
    /// `sql` planned for these arguments' types, once per connection. Kept plans are replanned
    /// by PostgreSQL itself when what they use changes.
    fn plan(&mut self, sql: &str, args: &[DatumWithOid]) -> Rc<OwnedPreparedStatement> {
        let key = (sql.to_string(), args.iter().map(DatumWithOid::oid).collect::<Vec<_>>());
        if let Some(plan) = self.plans.get(&key) {
            return plan.clone();
        }
        let types: Vec<PgOid> = key.1.iter().map(|&t| PgOid::from(t)).collect();
        // read-write: dblink's functions are volatile, and some statements lock rows remotely
        let plan = Spi::connect(|c| c.prepare_mut(sql, &types).map(PreparedStatement::keep))
            .map(Rc::new)
            .unwrap_or_else(|e| crate::spi::fail(e));
        self.plans.insert(key, plan.clone());
        plan
    }

    fn value<T: FromDatum + IntoDatum>(&mut self, sql: &str, args: &[DatumWithOid]) -> Option<T> {
        let plan = self.plan(sql, args);
        crate::roles::as_role(self.role, || {
            Spi::connect_mut(|c| {
                let rows = c.update(&*plan, Some(1), args)?;
                if rows.is_empty() {
                    Ok(None)
                } else {
                    rows.first().get_one::<T>()
                }
            })
        })
        .unwrap_or_else(|e| crate::spi::fail(e))
    }

    fn run(&mut self, sql: &str, args: &[DatumWithOid]) {
        let plan = self.plan(sql, args);
        crate::roles::as_role(self.role, || Spi::connect_mut(|c| c.update(&*plan, None, args).map(|_| ())))
            .unwrap_or_else(|e| crate::spi::fail(e))
    }

    pub fn new(role: pg_sys::Oid, conninfo: &str, lifetime: Duration) -> Source {
        Source {
            role,
            conninfo: conninfo.to_string(),
            lifetime,
            opened_at: None,
            reconnect: false,
            in_transaction: false,
            ahead: None,
            current: None,
            owed: None,
            fetch_in_flight: false,
            asked: 0,
            early: Early::No,
            dblink: None,
            plans: HashMap::new(),
            written_upto: None,
        }
    }

    /// The writer is another process, whose commits end here so far.
    pub fn set_written_upto(&mut self, lsn: u64) {
        self.written_upto = Some(lsn);
    }

    /// A finish is about to be committed here: the batch it finishes must be written there
    /// for good first.
    fn writes_durable(&self) {
        crate::tx::commit_durable(self.written_upto.unwrap_or_else(crate::tx::last_commit_end));
    }

    /// `sql` with `dblink.` replaced by dblink's schema: every call below names it.
    fn dblink(&mut self, sql: &str) -> String {
        let schema = self.dblink.get_or_insert_with(dblink_schema);
        sql.replace("dblink.", &format!("{schema}."))
    }

    /// Takes new settings; a changed connection string applies from the next connect, which
    /// settles and drops the old connection first, so this needs no transaction.
    pub fn reconfigure(&mut self, conninfo: &str, lifetime: Duration) {
        if conninfo != self.conninfo {
            self.conninfo = conninfo.to_string();
            self.reconnect = true;
        }
        self.lifetime = lifetime;
    }

    fn expired(&self) -> bool {
        self.reconnect || self.opened_at.is_none_or(|at| at.elapsed() >= self.lifetime)
    }

    /// Opens the connection, or reopens it once it is older than connection_lifetime (settling
    /// first: only between batches, after the target's commit).
    fn connect(&mut self) {
        if !self.expired() {
            return;
        }
        if self.opened_at.is_some() {
            self.settle();
        }
        // a connection of that name may be left in this session by an earlier failed call
        self.disconnect();
        // dblink reports a failed connection with libpq's message, which never contains the password.
        let sql = self.dblink("SELECT dblink.dblink_connect($1, $2)");
        self.run(&sql, &[CONN.into(), self.conninfo.as_str().into()]);
        let sql = self.dblink("SELECT dblink.dblink_exec($1, $2)");
        // times travel as text: in ISO style, which the target reads back unambiguously
        let pin = format!("SET search_path TO {}; SET DateStyle TO ISO", crate::roles::SAFE_SEARCH_PATH);
        self.run(&sql, &[CONN.into(), pin.as_str().into()]);
        self.opened_at = Some(Instant::now());
    }

    /// Drops the connection, and with it the remote transaction: a finish not committed yet is
    /// undone, and its batch comes again. Safe to call at any time, also after an error: it only
    /// acts if the connection exists.
    pub fn disconnect(&mut self) {
        let sql = self.dblink(
            "SELECT dblink.dblink_disconnect($1) WHERE $1 = ANY (coalesce(dblink.dblink_get_connections(), '{}'))",
        );
        self.run(&sql, &[CONN.into()]);
        self.dblink = None;
        self.plans.clear();
        self.opened_at = None;
        self.reconnect = false;
        self.in_transaction = false;
        self.ahead = None;
        self.current = None;
        self.owed = None;
        self.fetch_in_flight = false;
        self.early = Early::No;
    }

    /// Brings the remote session to rest: what is in flight is read and dropped, an owed finish
    /// is run, and the remote transaction commits. Only between batches, after the target's
    /// commit: that commit is what makes committing the finish right.
    pub fn settle(&mut self) {
        if self.ahead.is_some() {
            self.read_ahead();
        }
        self.discard_fetch();
        // a batch read early and not handed out is not finished: it comes again
        self.current = None;
        self.early = Early::No;
        if let Some(batch_id) = self.owed.take() {
            // inside the remote transaction, whose COMMIT below waits for this too; but should
            // there be none, this finish would commit on its own
            self.writes_durable();
            let sql = self.dblink(
                "SELECT r FROM dblink.dblink($1, format('select pgq.finish_batch(%s)', $2::bigint)) AS t(r int)",
            );
            let _: Option<i32> = self.value(&sql, &[CONN.into(), batch_id.into()]);
        }
        if self.in_transaction {
            self.writes_durable();
            let sql = self.dblink("SELECT dblink.dblink_exec($1, 'COMMIT')");
            self.run(&sql, &[CONN.into()]);
            self.in_transaction = false;
        }
    }

    /// pgq.register_consumer is a no-op for a consumer that exists.
    pub fn register(&mut self, queue: &str, consumer: &str) {
        self.settle();
        self.connect();
        let sql = self.dblink(
            "SELECT r FROM dblink.dblink($1, format('select pgq.register_consumer(%L, %L)', $2::text, $3::text)) AS t(r int)",
        );
        let _: Option<i32> = self.value(&sql, &[CONN.into(), queue.into(), consumer.into()]);
    }

    pub fn unregister(&mut self, queue: &str, consumer: &str) {
        self.settle();
        self.connect();
        let sql = self.dblink(
            "SELECT r FROM dblink.dblink($1, format('select pgq.unregister_consumer(%L, %L)', $2::text, $3::text)) AS t(r int)",
        );
        let _: Option<i32> = self.value(&sql, &[CONN.into(), queue.into(), consumer.into()]);
    }

    /// The next batch, with what is needed to process it: its ticks, end time and partition
    /// suffix (to_char evaluated on the source, as the original did), lag, and its events' cursor
    /// open with the first FETCH in flight. Taken from the boundary query sent when the last
    /// batch's events ended, if it asked for the same; else asked for now. None when there is no
    /// batch. Runs in the target transaction that will write the batch, so the previous one has
    /// committed: anything it owes the source is committed here too.
    pub fn next_batch(&mut self, request: &BatchRequest) -> Option<BatchInfo> {
        if self.early != Early::No {
            // a batch read early that the writer did not ask for (see read_early)
            self.settle();
        }
        if self.ahead.as_ref().is_some_and(|a| a.request != *request) {
            // the settings changed since it was sent (reload, another pace): ask again
            self.settle();
        }
        if self.ahead.is_none() {
            self.connect();
            self.send_boundary(request.clone(), FIRST_CHUNK);
        }
        let Some(info) = self.read_ahead() else {
            self.settle();
            return None;
        };
        self.current = Some((info.batch_id, request.clone()));
        Some(info)
    }

    /// The boundary query (see the module's comment). Statements in one simple-protocol query run
    /// in order, each with its own result; FETCH's stays in flight as any other FETCH's does.
    fn send_boundary(&mut self, request: BatchRequest, first_fetch: usize) {
        let sql = self.dblink(
            r#"SELECT dblink.dblink_send_query($1, format('%s BEGIN; %s %s; DO %L; FETCH %s FROM %I',
                 CASE WHEN $2 THEN 'COMMIT;' ELSE '' END,
                 CASE WHEN $4 IS NOT NULL THEN format('select pgq.finish_batch(%s);', $4::int8) ELSE '' END,
                 -- this statement decides the batch: the DO after it finds the same one active
                 format('select b.id, i.prev_tick_id, i.tick_id, i.batch_end, to_char(i.batch_end, %L), i.lag,
                                current_setting(''TimeZone'')
                           from (select batch_id as id
                                   from pgq.next_batch_custom(%L, %L, %L::interval, %L::int4, %L::interval)) b
                           left join lateral pgq.get_batch_info(b.id) i on b.id is not null',
                        coalesce($12, ''), $5::text, $6::text, $7::text, $8::int4, $9::text),
                 format($do$
                   declare
                     c refcursor := %L;
                     b int8;
                     s text;
                   begin
                     -- the batch just taken (an active batch is returned as it is); if none was,
                     -- one taken now is left for the next query, which finds it active
                     select batch_id into b from pgq.next_batch_custom(%L, %L, %L::interval, %L::int4, %L::interval);
                     if b is null then
                       open c no scroll for select null::int8, null::timestamptz, null::text, null::text, null::text where false;
                     else
                       s := pgq.batch_event_sql(b);
                       -- unordered, rows stream at once instead of after a sort of the whole batch
                       -- (pgq.get_batch_cursor removes the same suffix)
                       if not %L::bool then s := regexp_replace(s, ' order by 1$', ''); end if;
                       open c no scroll for execute format('select ev_id, %%s, ev_type, ev_data, ev_extra1 from (%%s) e',
                                                            case when %L::bool then 'ev_time' else 'null::timestamptz' end, s);
                     end if;
                   end $do$,
                   $3::text, $5::text, $6::text, $7::text, $8::int4, $9::text, $10::bool, $11::bool),
                 $13::int4, $3::text))"#,
        );
        if self.in_transaction {
            // its COMMIT commits the finish of a batch written here: written here for good first
            self.writes_durable();
        }
        let r = &request;
        let args = [
            CONN.into(),
            self.in_transaction.into(),
            CURSOR.into(),
            self.owed.into(),
            r.queue.as_str().into(),
            r.consumer.as_str().into(),
            r.min_lag.as_deref().into(),
            r.min_count.into(),
            r.min_interval.as_deref().into(),
            r.ordered.into(),
            r.with_time.into(),
            r.dateformat.as_deref().into(),
            (first_fetch as i32).into(),
        ];
        let _: Option<i32> = self.value(&sql, &args);
        self.ahead = Some(Ahead { request, commit: self.in_transaction, finish: self.owed.is_some(), first_fetch });
        self.owed = None;
        self.in_transaction = true;
    }

    /// Reads the boundary query's results up to its FETCH: the batch, if there is one.
    fn read_ahead(&mut self) -> Option<BatchInfo> {
        let ahead = self.ahead.take()?;
        let status = self.dblink("SELECT * FROM dblink.dblink_get_result($1) AS t(status text)");
        // COMMIT, BEGIN, finish
        for _ in 0..1 + usize::from(ahead.commit) + usize::from(ahead.finish) {
            self.run(&status, &[CONN.into()]);
        }
        let sql = self.dblink(
            "SELECT id, prev_tick_id, tick_id, batch_end, suffix, lag, time_zone FROM dblink.dblink_get_result($1)
               AS t(id bigint, prev_tick_id bigint, tick_id bigint, batch_end text, suffix text, lag text, time_zone text)",
        );
        let dated = ahead.request.dateformat.is_some();
        let plan = self.plan(&sql, &[CONN.into()]);
        let info = crate::roles::as_role(self.role, || {
            Spi::connect(|c| {
                let rows = c.select(&*plan, Some(1), &[CONN.into()])?;
                let row = rows.first();
                let Some(batch_id) = row.get::<i64>(1)? else { return Ok(None) };
                Ok::<_, pgrx::spi::Error>(Some(BatchInfo {
                    batch_id,
                    prev_tick_id: row.get(2)?.unwrap_or_default(),
                    tick_id: row.get(3)?.unwrap_or_default(),
                    batch_end: row.get(4)?.unwrap_or_default(),
                    suffix: if dated { row.get::<String>(5)? } else { None },
                    lag: row.get(6)?,
                    time_zone: row.get(7)?.unwrap_or_default(),
                }))
            })
        })
        .unwrap_or_else(|e| crate::spi::fail(e));
        // DO; the FETCH's result is next
        self.run(&status, &[CONN.into()]);
        self.fetch_in_flight = true;
        self.asked = ahead.first_fetch;
        info
    }

    /// The current batch's last chunk was read: the source takes the next batch while this one
    /// is written.
    fn end_of_batch(&mut self) {
        let next = self.current.as_ref().map(|(_, request)| request.clone());
        self.done_reading();
        if let (Some(next), false) = (next, self.expired()) {
            self.send_boundary(next, CHUNK);
        }
    }

    /// For a receiving helper, while its writer still writes the last batch: the next batch, as
    /// the boundary query in flight took it, with the request it was taken for; None when no
    /// boundary query is in flight or it found no batch. Commits nothing: the last batch's
    /// finish stays uncommitted, and the chunks read until `release_boundary` send no boundary
    /// query (whose COMMIT would commit it). The batch read early is finished only if the
    /// writer asks for it (`release_boundary`); anything else settles, and it comes again.
    pub fn read_early(&mut self) -> Option<(BatchRequest, BatchInfo)> {
        let request = self.ahead.as_ref()?.request.clone();
        let Some(info) = self.read_ahead() else {
            // the next ask sends a boundary query again, behind the empty cursor's FETCH
            self.discard_fetch();
            return None;
        };
        self.current = Some((info.batch_id, request.clone()));
        self.early = Early::Reading;
        Some((request, info))
    }

    /// The writer asked for the batch read early (and its commits, known now, may be waited
    /// for): reading goes on as usual, and a batch end reached early sends its boundary query.
    pub fn release_boundary(&mut self) {
        if std::mem::replace(&mut self.early, Early::No) == Early::Ended {
            self.end_of_batch();
        }
    }

    fn send_fetch(&mut self, n: usize) {
        let sql = self.dblink("SELECT dblink.dblink_send_query($1, format('FETCH %s FROM %I', $2::int, $3::text))");
        let _: Option<i32> = self.value(&sql, &[CONN.into(), (n as i32).into(), CURSOR.into()]);
        self.fetch_in_flight = true;
        self.asked = n;
    }

    /// Nothing more is read of the current batch (all of it was, or it was written here before):
    /// it is to be finished with the next boundary query, after this transaction commits.
    pub fn done_reading(&mut self) {
        self.discard_fetch();
        if let Some((batch_id, _)) = self.current.take() {
            self.owed = Some(batch_id);
        }
    }

    /// A FETCH nobody will read: take its result and the closing empty one.
    fn discard_fetch(&mut self) {
        if self.fetch_in_flight {
            let get = self.dblink(FETCH_RESULT);
            self.run(&get, &[CONN.into()]);
            let release = self.dblink(RELEASE);
            self.run(&release, &[CONN.into()]);
            self.fetch_in_flight = false;
        }
    }

    /// The source session's TimeZone.
    pub fn time_zone(&mut self) -> String {
        self.settle();
        self.connect();
        let sql = self.dblink("SELECT tz FROM dblink.dblink($1, 'select current_setting(''TimeZone'')') AS t(tz text)");
        self.value(&sql, &[CONN.into()]).unwrap_or_default()
    }

    /// pgq.get_consumer_info's lag, for status; None when the consumer is not registered.
    pub fn consumer_lag(&mut self, queue: &str, consumer: &str) -> Option<String> {
        self.settle();
        self.connect();
        let sql = self.dblink(
            "SELECT lag::text FROM dblink.dblink($1, format('select lag from pgq.get_consumer_info(%L, %L)', $2::text, $3::text))
               AS t(lag interval)",
        );
        self.value(&sql, &[CONN.into(), queue.into(), consumer.into()])
    }
}

impl Chunks for Source {
    /// Reads the chunk in flight, sends the FETCH for the next one unless this was the last (so
    /// the source works while `write` runs), then hands the events to `write`. None: the batch
    /// is done.
    fn next_chunk<R>(&mut self, write: impl FnOnce(&[RawEvent]) -> R) -> Option<R> {
        if !self.fetch_in_flight {
            return None;
        }
        let role = self.role;
        let asked = self.asked;
        let get = self.dblink(FETCH_RESULT);
        let get = self.plan(&get, &[CONN.into()]);
        let release = self.dblink(RELEASE);
        Spi::connect(|c| {
            crate::roles::as_role(role, || c.select(&*get, None, &[CONN.into()]))?;
            // SAFETY: the result stays until this Spi::connect ends, after `write`
            let events = unsafe { borrow_events(pg_sys::SPI_tuptable, pg_sys::SPI_processed as usize) };
            self.run(&release, &[CONN.into()]);
            self.fetch_in_flight = false;
            if events.len() == asked {
                self.send_fetch(CHUNK);
            } else if self.early == Early::Reading {
                self.early = Early::Ended;
            } else {
                self.end_of_batch();
            }
            if events.is_empty() {
                return Ok(None);
            }
            // not as the job's role: the writer switches to it itself, and the bookkeeping in
            // `write` (dead letters) needs the worker's own rights
            Ok::<_, pgrx::spi::Error>(Some(write(&events)))
        })
        .unwrap_or_else(|e| crate::spi::fail(e))
    }
}

/// The events of an SPI result (ev_id, ev_time, ev_type, ev_data, ev_extra1), their text borrowed
/// from the result itself: no copy per event. (pgrx's typed getters would copy each value into
/// the transaction's memory, where a big batch's text would pile up until its commit.)
///
/// SAFETY: `table` must be the current SPI result with `n` rows, alive as long as the events.
unsafe fn borrow_events<'t>(table: *mut pg_sys::SPITupleTable, n: usize) -> Vec<RawEvent<'t>> {
    if table.is_null() {
        return Vec::new();
    }
    // SAFETY: per the contract above; SPI_getbinval reads column i (1-based, all five exist in
    // the query's result) of a tuple of that table, and the text datums point into it
    unsafe {
        let desc = (*table).tupdesc;
        std::slice::from_raw_parts((*table).vals, n)
            .iter()
            .map(|&tuple| {
                let column = |i: i32| {
                    let mut null = false;
                    let datum = pg_sys::SPI_getbinval(tuple, desc, i, &mut null);
                    (datum, null)
                };
                let text = |i: i32| {
                    let (datum, null) = column(i);
                    <&str as FromDatum>::from_polymorphic_datum(datum, null, pg_sys::TEXTOID).map(Cow::Borrowed)
                };
                let (id, null) = column(1);
                RawEvent {
                    ev_id: i64::from_polymorphic_datum(id, null, pg_sys::INT8OID).unwrap_or_default(),
                    ev_time: text(2),
                    ev_type: text(3),
                    ev_data: text(4),
                    ev_extra1: text(5),
                    predecoded: false,
                }
            })
            .collect()
    }
}

/// Questions about the source's catalog, each on a connection of its own: the batch's
/// connection may have a fetch in flight. Rare (new_columns = add), so not worth keeping open.
pub struct SourceCatalog {
    role: pg_sys::Oid,
    conninfo: String,
}

impl SourceCatalog {
    pub fn new(role: pg_sys::Oid, conninfo: &str) -> SourceCatalog {
        SourceCatalog { role, conninfo: conninfo.to_string() }
    }

    /// A column's type as the source declares it (`format_type`, schema-qualified unless in
    /// pg_catalog); None when the table has no such column.
    pub fn column_type(&self, table: &crate::decode::TableName, column: &str) -> Result<Option<String>, SqlError> {
        let qualified = crate::route::qualified(table, &crate::apply::quote_ident);
        let sql = format!(
            "SELECT t FROM {}.dblink($1, format(
                 'set search_path = pg_catalog;
                  select format_type(a.atttypid, a.atttypmod) from pg_attribute a
                   where a.attrelid = to_regclass(%L) and a.attname = %L and a.attnum > 0 and not a.attisdropped',
                 $2::text, $3::text)) AS t(t text)",
            dblink_schema()
        );
        let args = [self.conninfo.as_str().into(), qualified.as_str().into(), column.into()];
        crate::tx::catching(|| Ok(crate::roles::as_role(self.role, || crate::spi::value::<String>(&sql, &args))))
    }
}
