//! What becomes of a row's column that the partition it is written to lacks, as the job's
//! new_columns says. error: the event fails, naming the column; ignore: the values are left out of
//! the rows and counted, and the column is logged once; add: the column is added to the parent and
//! the partition with the type the source table declares.

use super::{columns_of, quote_ident, run_sql, ApplyError, BatchWriter, EventError, Partition};
use crate::config::NewColumns;
use crate::plan::Change;
use crate::route;

thread_local! {
    /// (parent, column) pairs new_columns = ignore has logged: once per worker, i.e. per job
    static IGNORED: std::cell::RefCell<std::collections::HashSet<(String, String)>> = Default::default();
}

impl Partition {
    fn source_name(&self) -> String {
        route::qualified(&self.source, &quote_ident)
    }
}

impl BatchWriter<'_> {
    /// Columns of a group's rows that the partition lacks, as new_columns says: an error naming
    /// the first (error), added to the parent and the partition (add), or left out of the rows
    /// (ignore: returns which columns to keep).
    pub(super) fn fit_columns(
        &mut self,
        dest: usize,
        head: &Change,
        rows: usize,
    ) -> Result<Option<Vec<bool>>, ApplyError> {
        let part = &self.partitions[dest];
        let missing: Vec<&str> =
            head.row.iter().map(|(c, _)| c.as_ref()).filter(|c| !part.columns.contains_key(*c)).collect();
        if missing.is_empty() {
            return Ok(None);
        }
        match self.job.new_columns {
            NewColumns::Error => self.check_columns(dest, head.ev_id, missing.into_iter()).map(|_| None),
            NewColumns::Ignore => {
                for column in &missing {
                    let first =
                        IGNORED.with(|seen| seen.borrow_mut().insert((part.parent.clone(), column.to_string())));
                    if first {
                        pgrx::log!(
                            "cube_dispatcher {}: column {column:?} of {} is not in {}: its values are ignored (new_columns = ignore; logged once)",
                            self.job.job_name,
                            part.source_name(),
                            part.qualified
                        );
                    }
                }
                self.skipped.values += (missing.len() * rows) as i64;
                Ok(Some(head.row.iter().map(|(c, _)| part.columns.contains_key(c.as_ref())).collect()))
            }
            NewColumns::Add => {
                let missing: Vec<String> = missing.into_iter().map(str::to_string).collect();
                self.add_columns(dest, &missing).map_err(|cause| ApplyError::Event {
                    ev_id: head.ev_id,
                    table: self.partitions[dest].qualified.clone(),
                    cause,
                })?;
                Ok(None)
            }
        }
    }

    /// new_columns = add: each column with the type the source table declares, added to the
    /// parent and (unless the parent is partitioned natively, whose ALTER reaches every
    /// partition) to the partition being written, as the job's role, which must own them.
    fn add_columns(&mut self, dest: usize, columns: &[String]) -> Result<(), EventError> {
        let part = &self.partitions[dest];
        let catalog = self.catalog.as_ref().ok_or(EventError::NoCatalog)?;
        for column in columns {
            let ty = catalog
                .column_type(&part.source, column)
                .map_err(EventError::Sql)?
                .ok_or_else(|| EventError::NoSourceColumn { column: column.clone(), table: part.source_name() })?;
            // the type text is the source's format_type(): checked to be a type name here
            // before it is written into the statement
            let known =
                crate::spi::value::<bool>("SELECT pg_catalog.to_regtype($1) IS NOT NULL", &[ty.as_str().into()]);
            if known != Some(true) {
                return Err(EventError::NoType { column: column.clone(), ty });
            }
            let mut sql = format!("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {ty}", part.parent, quote_ident(column));
            if !part.native_leaf && part.parent != part.qualified {
                sql +=
                    &format!("; ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {ty}", part.qualified, quote_ident(column));
            }
            crate::roles::as_role(self.role, || run_sql(&sql, &[])).map_err(|cause| EventError::AddColumn {
                column: column.clone(),
                table: part.parent.clone(),
                cause,
            })?;
            pgrx::log!(
                "cube_dispatcher {}: added column {} {ty} to {} and {} (new_columns = add)",
                self.job.job_name,
                quote_ident(column),
                part.parent,
                part.qualified
            );
        }
        self.partitions[dest].columns = columns_of(part.relid)?;
        Ok(())
    }
}

/// new_columns = ignore: the group's rows (`rows` index `changes`) with only the columns `keep`
/// marks; the result is a group of its own, in the same order.
pub(super) fn keep_only<'e>(changes: &[Change<'e>], rows: &[usize], keep: &[bool]) -> Vec<Change<'e>> {
    rows.iter()
        .map(|&i| Change {
            row: changes[i].row.iter().zip(keep).filter(|(_, k)| **k).map(|(v, _)| v.clone()).collect(),
            ..changes[i].clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{parse_row, Format, Op};
    use std::rc::Rc;

    #[test]
    fn ignored_columns_are_left_out_of_the_group() {
        let change = |ev_id, data| Change {
            ev_id,
            op: Op::Insert,
            dest: 0,
            pkey: Rc::new(vec!["id".into()]),
            row: parse_row(Format::Url, Some(data)).unwrap(),
        };
        let changes = [change(1, "id=1&new=x&v=a"), change(2, "id=9&new=y&v=b"), change(3, "id=2&new&v")];
        let kept = keep_only(&changes, &[2, 0], &[true, false, true]);
        let shown: Vec<(i64, Vec<String>)> = kept
            .iter()
            .map(|c| {
                let values =
                    c.row.iter().map(|(n, v)| format!("{n}={}", v.map(|e| e.decoded()).unwrap_or("NULL".into())));
                (c.ev_id, values.collect())
            })
            .collect();
        assert_eq!(shown, vec![(3, vec!["id=2".into(), "v=NULL".into()]), (1, vec!["id=1".into(), "v=a".into()])]);
    }
}
