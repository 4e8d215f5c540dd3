//! What `fields` and `skip_fields` do to a table's rows: keep some columns, rename some, drop
//! some, and what that does to the key keep_latest finds rows by. Pure Rust.

use crate::decode::Row;
use crate::per_table::{Columns, Fields};
use std::borrow::Cow;
use thiserror::Error;

/// One table's `fields` and `skip_fields`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reshape {
    /// kept columns, source name -> target name; None: every column
    keep: Option<Vec<(String, String)>>,
    skip: Vec<String>,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ReshapeError {
    #[error("primary key column {column:?} is dropped by {option}, but keep_latest finds rows by it")]
    KeyDropped { column: String, option: &'static str },
}

impl Reshape {
    /// None when neither option changes the table's rows.
    pub fn new(fields: Option<&Fields>, skip: Option<&Columns>) -> Option<Reshape> {
        let keep = fields.and_then(|f| f.0.clone());
        let skip = skip.map(|s| s.0.clone()).unwrap_or_default();
        (keep.is_some() || !skip.is_empty()).then_some(Reshape { keep, skip })
    }

    /// The column's name in the target, or None when it is dropped.
    fn target_name<'c>(&'c self, column: &str) -> Result<Option<&'c str>, &'static str> {
        if self.skip.iter().any(|s| s == column) {
            return Err("skip_fields");
        }
        match &self.keep {
            None => Ok(None),
            Some(keep) => match keep.iter().find(|(s, _)| s == column) {
                Some((_, d)) => Ok(Some(d.as_str())),
                None => Err("fields"),
            },
        }
    }

    /// The row as the target gets it: columns kept in the event's order, renamed.
    pub fn row<'e>(&self, row: Row<'e>) -> Row<'e> {
        row.into_iter()
            .filter_map(|(c, v)| match self.target_name(&c) {
                Err(_) => None,
                Ok(None) => Some((c, v)),
                Ok(Some(d)) if d == c => Some((c, v)),
                Ok(Some(d)) => Some((Cow::Owned(d.to_string()), v)),
            })
            .collect()
    }

    /// The key columns the target keeps, under their target names.
    pub fn kept_key(&self, pkey: &[String]) -> Vec<String> {
        pkey.iter().filter_map(|k| self.target_name(k).ok().map(|d| d.unwrap_or(k).to_string())).collect()
    }

    /// Whether a column of the target is filled: kept under that name.
    fn fills(&self, target_column: &str) -> bool {
        match &self.keep {
            None => !self.skip.iter().any(|s| s == target_column),
            Some(keep) => keep.iter().any(|(s, d)| d == target_column && !self.skip.contains(s)),
        }
    }

    /// The first column of the target's primary key that no column fills, and the option blamed
    /// for it (skip_fields when it names the column, else fields): start/reload refuse it in
    /// keep_latest, which finds rows by that key.
    pub fn left_out(&self, target_key: &[String]) -> Option<(String, &'static str)> {
        let column = target_key.iter().find(|k| !self.fills(k))?;
        let option = if self.skip.contains(column) { "skip_fields" } else { "fields" };
        Some((column.clone(), option))
    }

    /// The key columns under their target names; a dropped one is an error (keep_latest).
    pub fn key(&self, pkey: &[String]) -> Result<Vec<String>, ReshapeError> {
        pkey.iter()
            .map(|k| match self.target_name(k) {
                Err(option) => Err(ReshapeError::KeyDropped { column: k.clone(), option }),
                Ok(d) => Ok(d.unwrap_or(k).to_string()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{parse_row, Format};
    use crate::per_table::EntryValue;

    fn names(row: &Row) -> Vec<String> {
        row.iter()
            .map(|(c, v)| format!("{c}={}", v.map(|e| e.decoded().into_owned()).unwrap_or("NULL".into())))
            .collect()
    }

    #[test]
    fn keeps_renames_and_drops() {
        let fields = Fields::parse_value("amount:total, id, note").unwrap();
        let skip = Columns::parse_value("note").unwrap();
        let r = Reshape::new(Some(&fields), Some(&skip)).unwrap();
        let row = parse_row(Format::Url, Some("id=1&secret=x&amount=2.5&note")).unwrap();
        assert_eq!(names(&r.row(row)), vec!["id=1", "total=2.5"]);
        assert_eq!(r.key(&["id".to_string()]), Ok(vec!["id".to_string()]));
        assert_eq!(
            r.key(&["note".to_string()]),
            Err(ReshapeError::KeyDropped { column: "note".into(), option: "skip_fields" })
        );
        assert_eq!(
            r.key(&["secret".to_string()]).unwrap_err().to_string(),
            "primary key column \"secret\" is dropped by fields, but keep_latest finds rows by it"
        );
        let renamed = Reshape::new(Some(&Fields::parse_value("id:order_id, x").unwrap()), None).unwrap();
        assert_eq!(renamed.key(&["id".to_string()]), Ok(vec!["order_id".to_string()]));
        assert_eq!(renamed.kept_key(&["id".to_string(), "y".to_string()]), vec!["order_id".to_string()]);
        assert!(renamed.fills("order_id") && renamed.fills("x") && !renamed.fills("id") && !renamed.fills("y"));
        assert!(r.fills("total") && !r.fills("note") && !r.fills("amount"));
    }

    #[test]
    fn a_target_key_left_out() {
        let key = |cols: &[&str]| cols.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        let fields = Fields::parse_value("id:order_id, line, note").unwrap();
        let r = Reshape::new(Some(&fields), Some(&Columns::parse_value("note").unwrap())).unwrap();
        assert_eq!(r.left_out(&key(&["order_id", "line"])), None);
        assert_eq!(r.left_out(&key(&["order_id", "id"])), Some(("id".into(), "fields")));
        assert_eq!(r.left_out(&key(&["note", "x"])), Some(("note".into(), "skip_fields")));
        assert_eq!(r.left_out(&[]), None);
        let only_skip = Reshape::new(None, Some(&Columns::parse_value("pin").unwrap())).unwrap();
        assert_eq!(only_skip.left_out(&key(&["id", "pin"])), Some(("pin".into(), "skip_fields")));
    }

    #[test]
    fn nothing_to_do_is_none() {
        assert_eq!(Reshape::new(None, None), None);
        assert_eq!(Reshape::new(Some(&Fields(None)), None), None);
        let only_skip = Reshape::new(None, Some(&Columns(vec!["pin".into()]))).unwrap();
        let row = parse_row(Format::Json, Some(r#"{"id":1,"pin":"1234","name":"a"}"#)).unwrap();
        assert_eq!(names(&only_skip.row(row)), vec!["id=1", "name=a"]);
    }
}
