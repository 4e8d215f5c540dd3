//! Parents that are native partitioned tables (`PARTITION BY RANGE` on one date, timestamp or
//! timestamptz column): a row is written into the partition that covers its period, whoever
//! made it (a DBA, pg_partman, or the job as `PARTITION OF` with the period's bounds).

use crate::tx::{catching, SqlError};
use pgrx::prelude::*;

/// The range partition key of a native parent.
#[derive(Debug, Clone)]
pub struct NativeKey {
    pub column: String,
    /// `date`, `timestamp without time zone` or `timestamp with time zone`
    pub type_name: &'static str,
}

impl NativeKey {
    /// For the bounds of a standalone partition: no key, the period in timestamptz.
    pub fn timestamptz() -> NativeKey {
        NativeKey { column: String::new(), type_name: "timestamp with time zone" }
    }
}

/// Why a partitioned parent cannot take rows from a job.
#[derive(Debug)]
pub enum Unsupported {
    /// not one range column of a time type: the text says what it is
    Key(String),
}

/// The partition key of `parent` if it is a partitioned table; Err when it is one this job
/// cannot fill.
pub fn key_of(parent: pg_sys::Oid) -> Result<Result<Option<NativeKey>, Unsupported>, SqlError> {
    let row = catching(|| {
        Spi::connect(|c| {
            let rows = c.select(
                "SELECT c.relkind::text, pt.partstrat::text, pt.partnatts::int, a.attname::text, a.atttypid
                   FROM pg_class c
                   LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
                   LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = pt.partattrs[0]
                  WHERE c.oid = $1",
                Some(1),
                &[parent.into()],
            )?;
            let r = rows.first();
            Ok::<_, pgrx::spi::Error>((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?,
                r.get::<i32>(3)?,
                r.get::<String>(4)?,
                r.get::<pg_sys::Oid>(5)?,
            ))
        })
        .map_err(SqlError::internal)
    })?;
    let (relkind, strategy, columns, column, type_oid) = row;
    if relkind != "p" {
        return Ok(Ok(None));
    }
    let type_name = match type_oid {
        Some(t) if t == pg_sys::DATEOID => Some("date"),
        Some(t) if t == pg_sys::TIMESTAMPOID => Some("timestamp without time zone"),
        Some(t) if t == pg_sys::TIMESTAMPTZOID => Some("timestamp with time zone"),
        _ => None,
    };
    match (strategy.as_deref(), columns, column, type_name) {
        (Some("r"), Some(1), Some(column), Some(type_name)) => Ok(Ok(Some(NativeKey { column, type_name }))),
        (Some("r"), Some(1), Some(column), None) => Ok(Err(Unsupported::Key(format!(
            "its partition key column {column:?} is not a date, timestamp or timestamptz"
        )))),
        (Some("r"), Some(1), None, _) => Ok(Err(Unsupported::Key("its partition key is an expression".into()))),
        _ => Ok(Err(Unsupported::Key("it is not partitioned BY RANGE on one column".into()))),
    }
}

/// The bounds of the period that starts at `start` (a timestamptz text), as literals of the
/// key's type: what `FOR VALUES FROM (..) TO (..)` takes.
pub fn bounds(start: &str, period: &str, key: &NativeKey) -> Result<(String, String), SqlError> {
    let sql = format!(
        "SELECT quote_literal(($1::timestamptz)::{t}), quote_literal(($1::timestamptz + $2::interval)::{t})",
        t = key.type_name
    );
    catching(|| {
        Spi::connect(|c| {
            let rows = c.select(&sql, Some(1), &[start.into(), period.into()])?;
            let r = rows.first();
            Ok::<_, pgrx::spi::Error>((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
            ))
        })
        .map_err(SqlError::internal)
    })
}

/// An existing leaf partition of `parent` whose range holds `start` (a timestamptz text),
/// schema-qualified and quoted; the DEFAULT partition never counts.
pub fn covering(parent: pg_sys::Oid, start: &str, key: &NativeKey) -> Result<Option<String>, SqlError> {
    // bounds as PostgreSQL prints them: FOR VALUES FROM ('...') TO ('...'), or MINVALUE/MAXVALUE
    let sql = format!(
        "SELECT format('%I.%I', n.nspname, c.relname)
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid AND c.relkind = 'r'
           JOIN pg_namespace n ON n.oid = c.relnamespace,
                LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), '^FOR VALUES FROM \\((.*)\\) TO \\((.*)\\)$') m
          WHERE i.inhparent = $1
            AND (m[1] = 'MINVALUE' OR btrim(m[1], '''')::{t} <= ($2::timestamptz)::{t})
            AND (m[2] = 'MAXVALUE' OR btrim(m[2], '''')::{t} > ($2::timestamptz)::{t})
          LIMIT 1",
        t = key.type_name,
    );
    catching(|| Ok(crate::spi::value::<String>(&sql, &[parent.into(), start.into()])))
}
