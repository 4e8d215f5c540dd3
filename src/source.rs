//! Everything that talks to the source database, through dblink called over SPI. The only module
//! that knows dblink. Remote statements are built by PostgreSQL's format() with %L/%s of values
//! that are parameters here, never by pasting text in Rust. dblink's functions are called by
//! their schema-qualified names (dblink is relocatable and usually lives in `public`, where other
//! roles may create look-alikes), and the remote session gets the same pinned search_path as
//! ours (see roles.rs): the events query PgQ builds names some built-ins without a schema.

use crate::event::{Chunks, RawEvent};
use crate::tx::SqlError;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use std::borrow::Cow;
use std::time::{Duration, Instant};

/// One named dblink connection per worker process (a worker serves one job).
const CONN: &str = "cube_dispatcher";
const CURSOR: &str = "cube_dispatcher_events";
/// Events per FETCH. The first FETCH of a batch is small: nothing is written while it is
/// awaited, so a small one lets writing start sooner; later FETCHes run while a chunk is written.
const FIRST_CHUNK: usize = 1000;
const CHUNK: usize = 5000;

#[derive(Debug, Clone)]
pub struct BatchInfo {
    pub batch_id: i64,
    pub prev_tick_id: i64,
    pub tick_id: i64,
    pub batch_end: String,
    /// to_char(batch_end, dateformat), computed on the source as the original did.
    pub suffix: Option<String>,
    pub lag: Option<String>,
    /// pgq.batch_event_sql(): the query that reads the batch's events
    pub events_sql: String,
    /// the source session's TimeZone, in which every partition suffix is computed
    pub time_zone: String,
}

pub struct Source {
    /// dblink runs as this role: its password rule then applies to non-superusers.
    role: pg_sys::Oid,
    conninfo: String,
    lifetime: Duration,
    opened_at: Option<Instant>,
    cursor_open: bool,
    /// A FETCH sent with dblink_send_query whose result is not read yet: the source produces the
    /// next chunk while this backend writes the current one.
    fetch_in_flight: bool,
    /// the size of the FETCH in flight: a shorter answer means the cursor is exhausted
    asked: usize,
    /// dblink's schema as an identifier; looked up again for every new connection
    dblink: Option<String>,
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
    fn value<T: FromDatum + IntoDatum>(&self, sql: &str, args: &[DatumWithOid]) -> Option<T> {
        crate::roles::as_role(self.role, || crate::spi::value(sql, args))
    }

    fn run(&self, sql: &str, args: &[DatumWithOid]) {
        crate::roles::as_role(self.role, || crate::spi::run(sql, args))
    }

    pub fn new(role: pg_sys::Oid, conninfo: &str, lifetime: Duration) -> Source {
        Source {
            role,
            conninfo: conninfo.to_string(),
            lifetime,
            opened_at: None,
            cursor_open: false,
            fetch_in_flight: false,
            asked: 0,
            dblink: None,
        }
    }

    /// `sql` with `dblink.` replaced by dblink's schema: every call below names it.
    fn dblink(&mut self, sql: &str) -> String {
        let schema = self.dblink.get_or_insert_with(dblink_schema);
        sql.replace("dblink.", &format!("{schema}."))
    }

    /// Takes new settings; a changed connection string applies from the next connect (which
    /// drops the old connection first), so this needs no transaction.
    pub fn reconfigure(&mut self, conninfo: &str, lifetime: Duration) {
        if conninfo != self.conninfo {
            self.opened_at = None;
            self.conninfo = conninfo.to_string();
        }
        self.lifetime = lifetime;
    }

    /// Opens the connection, or reopens it once it is older than connection_lifetime.
    pub fn connect(&mut self) {
        if let Some(at) = self.opened_at {
            if at.elapsed() < self.lifetime {
                return;
            }
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
        self.cursor_open = false;
        self.fetch_in_flight = false;
    }

    /// Drops the connection (and with it any remote transaction and cursor). Safe to call at any
    /// time, also after an error: it only acts if the connection exists.
    pub fn disconnect(&mut self) {
        let sql = self.dblink(
            "SELECT dblink.dblink_disconnect($1) WHERE $1 = ANY (coalesce(dblink.dblink_get_connections(), '{}'))",
        );
        self.run(&sql, &[CONN.into()]);
        self.dblink = None;
        self.opened_at = None;
        self.cursor_open = false;
        self.fetch_in_flight = false;
    }

    /// pgq.register_consumer is a no-op for a consumer that exists.
    pub fn register(&mut self, queue: &str, consumer: &str) {
        self.connect();
        let sql = self.dblink(
            "SELECT r FROM dblink.dblink($1, format('select pgq.register_consumer(%L, %L)', $2::text, $3::text)) AS t(r int)",
        );
        let _: Option<i32> = self.value(&sql, &[CONN.into(), queue.into(), consumer.into()]);
    }

    pub fn unregister(&mut self, queue: &str, consumer: &str) {
        self.connect();
        let sql = self.dblink(
            "SELECT r FROM dblink.dblink($1, format('select pgq.unregister_consumer(%L, %L)', $2::text, $3::text)) AS t(r int)",
        );
        let _: Option<i32> = self.value(&sql, &[CONN.into(), queue.into(), consumer.into()]);
    }

    /// The next batch with everything needed to process it, in one round trip: its ticks, end
    /// time and partition suffix (to_char evaluated on the source, as the original did), lag,
    /// and the SQL that selects its events. None when there is no batch.
    /// `size`: pgq.next_batch_custom's min_lag, min_count, min_interval (all None: one tick per
    /// batch, what pgq.next_batch does).
    pub fn next_batch(
        &mut self,
        queue: &str,
        consumer: &str,
        dateformat: Option<&str>,
        size: &BatchSize,
    ) -> Option<BatchInfo> {
        self.connect();
        let sql = self.dblink(
            "SELECT id, prev_tick_id, tick_id, batch_end::text, suffix, lag::text, events_sql, time_zone
               FROM dblink.dblink($1, format(
                        'select b.id, i.prev_tick_id, i.tick_id, i.batch_end, to_char(i.batch_end, %L), i.lag,
                                case when b.id is not null then pgq.batch_event_sql(b.id) end,
                                current_setting(''TimeZone'')
                           from (select batch_id as id
                                   from pgq.next_batch_custom(%L, %L, %L::interval, %L::int4, %L::interval)) b
                           left join lateral pgq.get_batch_info(b.id) i on b.id is not null',
                        coalesce($4, ''), $2::text, $3::text, $5::text, $6::int4, $7::text))
                     AS t(id bigint, prev_tick_id bigint, tick_id bigint, batch_end timestamptz, suffix text,
                      lag interval, events_sql text, time_zone text)",
        );
        crate::roles::as_role(self.role, || {
            Spi::connect(|c| {
                let args = [
                    CONN.into(),
                    queue.into(),
                    consumer.into(),
                    dateformat.into(),
                    size.min_lag.into(),
                    size.min_count.into(),
                    size.min_interval.into(),
                ];
                let rows = c.select(&sql, Some(1), &args)?;
                let row = rows.first();
                let Some(batch_id) = row.get::<i64>(1)? else { return Ok(None) };
                Ok::<_, pgrx::spi::Error>(Some(BatchInfo {
                    batch_id,
                    prev_tick_id: row.get(2)?.unwrap_or_default(),
                    tick_id: row.get(3)?.unwrap_or_default(),
                    batch_end: row.get(4)?.unwrap_or_default(),
                    suffix: if dateformat.is_some() { row.get::<String>(5)? } else { None },
                    lag: row.get(6)?,
                    events_sql: row.get(7)?.unwrap_or_default(),
                    time_zone: row.get(8)?.unwrap_or_default(),
                }))
            })
        })
        .unwrap_or_else(|e| crate::spi::fail(e))
    }

    /// Declares a remote cursor over the batch's events and asks for the first chunk. Events
    /// are then read with next_chunk(), so memory stays bounded however large the batch is.
    ///
    /// `ordered`: in ev_id order, which keep_latest needs. Unordered (keep_all, where order does
    /// not change the result) the source streams rows at once instead of sorting the whole batch
    /// before the first row; the suffix removed is the one pgq.get_batch_cursor removes too.
    /// `with_time`: ev_time is read only when events may be set aside as dead letters; the
    /// source then spends no time formatting it for every event.
    pub fn open_events(&mut self, batch: &BatchInfo, ordered: bool, with_time: bool) {
        self.connect();
        self.close_events();
        let sql = if ordered { batch.events_sql.as_str() } else { batch.events_sql.trim_end_matches(" order by 1") };
        let open = self.dblink(
            "SELECT dblink.dblink_open($1, $2, format('select ev_id, %s, ev_type, ev_data, ev_extra1 from (%s) e',
                                                      CASE WHEN $4 THEN 'ev_time' ELSE 'null::timestamptz' END, $3::text))",
        );
        self.run(&open, &[CONN.into(), CURSOR.into(), sql.into(), with_time.into()]);
        self.cursor_open = true;
        self.send_fetch(FIRST_CHUNK);
    }

    fn send_fetch(&mut self, n: usize) {
        let sql = self.dblink("SELECT dblink.dblink_send_query($1, format('FETCH %s FROM %I', $2::int, $3::text))");
        let _: Option<i32> = self.value(&sql, &[CONN.into(), (n as i32).into(), CURSOR.into()]);
        self.fetch_in_flight = true;
        self.asked = n;
    }

    /// Closing the cursor also ends the remote read transaction dblink_open began.
    pub fn close_events(&mut self) {
        if self.fetch_in_flight {
            // a FETCH nobody will read: take its result and the closing empty one
            let get = self.dblink(
                "SELECT * FROM dblink.dblink_get_result($1)
                   AS t(ev_id bigint, ev_time text, ev_type text, ev_data text, ev_extra1 text)",
            );
            self.run(&get, &[CONN.into()]);
            let release = self.dblink("SELECT * FROM dblink.dblink_get_result($1) AS t(ev_id bigint)");
            self.run(&release, &[CONN.into()]);
            self.fetch_in_flight = false;
        }
        if self.cursor_open {
            let sql = self.dblink("SELECT dblink.dblink_close($1, $2)");
            self.run(&sql, &[CONN.into(), CURSOR.into()]);
            self.cursor_open = false;
        }
    }

    pub fn finish_batch(&mut self, batch_id: i64) {
        self.connect();
        let sql = self
            .dblink("SELECT r FROM dblink.dblink($1, format('select pgq.finish_batch(%s)', $2::bigint)) AS t(r int)");
        let _: Option<i32> = self.value(&sql, &[CONN.into(), batch_id.into()]);
    }

    /// The source session's TimeZone.
    pub fn time_zone(&mut self) -> String {
        self.connect();
        let sql = self.dblink("SELECT tz FROM dblink.dblink($1, 'select current_setting(''TimeZone'')') AS t(tz text)");
        self.value(&sql, &[CONN.into()]).unwrap_or_default()
    }

    /// pgq.get_consumer_info's lag, for status; None when the consumer is not registered.
    pub fn consumer_lag(&mut self, queue: &str, consumer: &str) -> Option<String> {
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
        // ev_time as text: it is only kept for dead letters, so it is not parsed per event
        let get = self.dblink(
            "SELECT ev_id, ev_time, ev_type, ev_data, ev_extra1 FROM dblink.dblink_get_result($1)
               AS t(ev_id bigint, ev_time text, ev_type text, ev_data text, ev_extra1 text)",
        );
        // dblink needs one more dblink_get_result after each result to free the connection
        let release = self.dblink("SELECT * FROM dblink.dblink_get_result($1) AS t(ev_id bigint)");
        Spi::connect(|c| {
            crate::roles::as_role(role, || c.select(&get, None, &[CONN.into()]))?;
            // SAFETY: the result stays until this Spi::connect ends, after `write`
            let events = unsafe { borrow_events(pg_sys::SPI_tuptable, pg_sys::SPI_processed as usize) };
            self.run(&release, &[CONN.into()]);
            self.fetch_in_flight = false;
            if events.is_empty() {
                return Ok(None);
            }
            if events.len() == asked {
                self.send_fetch(CHUNK);
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
                }
            })
            .collect()
    }
}

/// How big a batch may grow: Skytools 3 consumers' pgq_min_lag, pgq_min_count,
/// pgq_min_interval, as pgq.next_batch_custom takes them.
#[derive(Debug, Clone, Default)]
pub struct BatchSize<'a> {
    pub min_lag: Option<&'a str>,
    pub min_count: Option<i32>,
    pub min_interval: Option<&'a str>,
}

impl<'a> BatchSize<'a> {
    pub fn of(cfg: &'a crate::config::JobConfig) -> BatchSize<'a> {
        BatchSize {
            min_lag: cfg.pgq_min_lag.as_ref().map(|i| i.0.as_str()),
            min_count: cfg.pgq_min_count,
            min_interval: cfg.pgq_min_interval.as_ref().map(|i| i.0.as_str()),
        }
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
