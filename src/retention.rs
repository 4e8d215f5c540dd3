//! retention_period: drops the job's partitions whose whole period ended more than that long
//! ago. Only the job's own: those in its list (`cube_dispatcher.partition`), and tables named
//! exactly `<parent>_<suffix>` of its parents whose suffix reads back under the dateformat (the
//! Python tool's, made before an upgrade) and that no other job lists. Never a parent, never a
//! table whose suffix does not read back. A native partition is detached, then dropped. Runs in a
//! transaction of its own between batches; each drop waits at most lock_timeout and is tried
//! again next time if it could not be done.

use crate::config::JobConfig;
use crate::spi;
use crate::tx::{in_subtransaction, SubError};
use pgrx::prelude::*;

/// A partition to drop, and when its period ended.
struct Expired {
    /// its name in the job's list, if it is listed
    listed: Option<String>,
    /// its name as PostgreSQL quotes it, if the table still exists
    table: Option<String>,
    ended: String,
}

/// What one pass did: the partitions dropped and those that could not be, with why.
#[derive(Default)]
pub struct Pass {
    pub dropped: Vec<(String, String)>,
    pub failed: Vec<(String, String)>,
}

/// One pass for the job; nothing when retention_period is unset.
pub fn run(cfg: &JobConfig, role: pg_sys::Oid, time_zone: &str) -> Pass {
    let mut pass = Pass::default();
    let (Some(retention), Some(period), Some(format)) = (&cfg.retention_period, cfg.period(), cfg.suffix_format())
    else {
        return pass;
    };
    crate::part_time::take_on_time_zone(time_zone);
    let mut expired = listed(&cfg.job_name, &retention.0);
    expired.extend(found_by_name(&cfg.job_name, format, period.interval(), &retention.0));
    for e in expired {
        let dropped = match &e.table {
            None => Ok(()),
            Some(table) => {
                // a native partition is detached from its parent first, then dropped
                let parent: Option<String> = spi::value(
                    "SELECT format('%I.%I', n.nspname, p.relname) FROM pg_inherits i
                       JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace
                      WHERE i.inhrelid = to_regclass($1) AND p.relkind = 'p'",
                    &[table.as_str().into()],
                );
                let mut sql = parent.map(|p| format!("ALTER TABLE {p} DETACH PARTITION {table}; ")).unwrap_or_default();
                sql.push_str(&format!("DROP TABLE {table}"));
                in_subtransaction(|| {
                    crate::roles::as_role(role, || spi::run(&sql, &[]));
                    Ok::<_, ()>(())
                })
            }
        };
        match dropped {
            Ok(()) => {
                if let Some(listed) = &e.listed {
                    spi::run(
                        "DELETE FROM cube_dispatcher.partition WHERE job_name = $1 AND partition = $2",
                        &[cfg.job_name.as_str().into(), listed.as_str().into()],
                    );
                }
                if let Some(table) = e.table {
                    pass.dropped.push((table, e.ended));
                }
            }
            Err(err) => {
                let why = match err {
                    SubError::Raised(e) => e.message,
                    SubError::Returned(()) => String::new(),
                };
                pass.failed.push((e.table.unwrap_or_default(), why));
            }
        }
    }
    pass
}

/// The job's listed partitions whose period ended before now() - retention.
fn listed(job: &str, retention: &str) -> Vec<Expired> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT l.partition, format('%I.%I', n.nspname, t.relname), l.period_end::text
               FROM cube_dispatcher.partition l
               LEFT JOIN pg_class t ON t.oid = to_regclass(l.partition)
               LEFT JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE l.job_name = $1 AND l.period_end <= now() - $2::interval ORDER BY l.period_end, l.partition",
            None,
            &[job.into(), retention.into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let table: Option<String> = r.get(2)?;
            out.push(Expired {
                listed: r.get(1)?,
                // format() of two NULLs is '.': the table is gone
                table: table.filter(|t| t != "."),
                ended: r.get(3)?.unwrap_or_default(),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| spi::fail(e))
}

/// Tables named `<parent>_<suffix>` next to the job's parents, listed by no job, whose suffix
/// reads back under the dateformat and whose period ended before now() - retention.
fn found_by_name(job: &str, format: &str, period: &str, retention: &str) -> Vec<Expired> {
    let candidates: Vec<(String, String)> = Spi::connect(|c| {
        let rows = c.select(
            "SELECT format('%I.%I', n.nspname, t.relname), substr(t.relname, length(p.relname) + 2)
               FROM (SELECT DISTINCT to_regclass(parent) AS oid FROM cube_dispatcher.partition WHERE job_name = $1) j
               JOIN pg_class p ON p.oid = j.oid
               JOIN pg_class t ON t.relnamespace = p.relnamespace AND t.relkind IN ('r', 'p')
                              AND left(t.relname, length(p.relname) + 1) = p.relname || '_'
               JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE NOT EXISTS (SELECT 1 FROM cube_dispatcher.partition l
                                 WHERE l.partition = format('%I.%I', n.nspname, t.relname))
                AND NOT EXISTS (SELECT 1 FROM cube_dispatcher.partition l WHERE to_regclass(l.parent) = t.oid)
              ORDER BY 1",
            None,
            &[job.into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            out.push((r.get(1)?.unwrap_or_default(), r.get(2)?.unwrap_or_default()));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| spi::fail(e));
    let mut out = Vec::new();
    for (partition, suffix) in candidates {
        // to_timestamp raises for a suffix that is not a time at all: one subtransaction each
        let ended = in_subtransaction(|| {
            Ok::<_, ()>(spi::value::<String>(
                "SELECT e::text FROM (SELECT to_timestamp($1, $2) + $3::interval AS e) x
                  WHERE to_char(to_timestamp($1, $2), $2) = $1 AND e <= now() - $4::interval",
                &[suffix.as_str().into(), format.into(), period.into(), retention.into()],
            ))
        });
        if let Ok(Some(ended)) = ended {
            out.push(Expired { listed: None, table: Some(partition), ended });
        }
    }
    out
}
