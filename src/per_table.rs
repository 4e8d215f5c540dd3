//! Options with one value for every table or a value per table, as londiste's dispatch handler
//! takes per-table arguments: `value`, or entries `schema.table:value` separated by `;`, where an
//! entry without a table applies to every table not listed (`public.orders:I,U; public.lines:I; I`).
//! Table names are as the triggers write them (unquoted, exact case); no schema means `public`.
//! Pure Rust.

use crate::decode::Op;

/// What one entry's value is.
pub trait EntryValue: Sized {
    /// Whether `name:value` with an unqualified name names a table (part_field's `items:d`).
    /// Where a value may itself hold ':' (fields' renames `src:dst`), a table must be written
    /// `schema.table` and `amount:total` is a value.
    const BARE_TABLE: bool;
    /// What the option expects, for errors.
    const EXPECTED: &'static str;
    fn parse_value(text: &str) -> Result<Self, String>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct PerTable<T> {
    /// the setting as given, stored and shown as is
    pub text: String,
    any_table: Option<T>,
    tables: Vec<(String, String, T)>,
}

impl<T: EntryValue> PerTable<T> {
    pub fn parse(text: &str) -> Result<PerTable<T>, String> {
        let mut any_table = None;
        let mut tables: Vec<(String, String, T)> = Vec::new();
        let syntax = || format!("expected {}, or entries schema.table:value separated by ';'", T::EXPECTED);
        for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let table = entry.split_once(':').filter(|(t, _)| {
                let t = t.trim();
                T::BARE_TABLE || (t.contains('.') && !t.contains(','))
            });
            match table {
                None if any_table.is_some() => return Err("more than one entry without a table".into()),
                None => any_table = Some(T::parse_value(entry)?),
                Some((table, value)) => {
                    let table = table.trim();
                    let (schema, table) = table.split_once('.').unwrap_or(("public", table));
                    if schema.is_empty() || table.is_empty() || value.trim().is_empty() {
                        return Err(syntax());
                    }
                    if tables.iter().any(|(s, t, _)| s == schema && t == table) {
                        return Err(format!("table {schema}.{table} is listed twice"));
                    }
                    let value = T::parse_value(value.trim()).map_err(|e| format!("{schema}.{table}: {e}"))?;
                    tables.push((schema.to_string(), table.to_string(), value));
                }
            }
        }
        if any_table.is_none() && tables.is_empty() {
            return Err(syntax());
        }
        Ok(PerTable { text: text.to_string(), any_table, tables })
    }

    /// The value for rows of `schema.table`, if any.
    pub fn for_table(&self, schema: &str, table: &str) -> Option<&T> {
        self.tables.iter().find(|(s, t, _)| s == schema && t == table).map(|(_, _, v)| v).or(self.any_table.as_ref())
    }
}

impl PerTable<String> {
    /// part_field: the column that places rows of `schema.table`, if any.
    pub fn column_for(&self, schema: &str, table: &str) -> Option<&str> {
        self.for_table(schema, table).map(String::as_str)
    }
}

/// A column name (part_field).
impl EntryValue for String {
    const BARE_TABLE: bool = true;
    const EXPECTED: &'static str = "a column name";
    fn parse_value(text: &str) -> Result<String, String> {
        Ok(text.to_string())
    }
}

/// `event_types`: which operations are applied, `I`, `U`, `D` separated by ',' (or `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTypes {
    insert: bool,
    update: bool,
    delete: bool,
}

impl EventTypes {
    /// Whether events of `op` are applied; truncates have their own option (ignore_truncate).
    pub fn applies(&self, op: Op) -> bool {
        match op {
            Op::Insert => self.insert,
            Op::Update => self.update,
            Op::Delete => self.delete,
            Op::Truncate => true,
        }
    }
}

impl EntryValue for EventTypes {
    const BARE_TABLE: bool = true;
    const EXPECTED: &'static str = "event types I, U, D separated by ','";
    fn parse_value(text: &str) -> Result<EventTypes, String> {
        if text.trim() == "*" {
            return Ok(EventTypes { insert: true, update: true, delete: true });
        }
        let mut t = EventTypes { insert: false, update: false, delete: false };
        for word in text.split(',').map(str::trim) {
            match word.to_ascii_uppercase().as_str() {
                "I" => t.insert = true,
                "U" => t.update = true,
                "D" => t.delete = true,
                _ => return Err(format!("{word:?} is not an event type: expected I, U, D separated by ','")),
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_table_columns() {
        let f = PerTable::<String>::parse("public.orders:ordered_at; Sales.Lines : Shipped At ; created").unwrap();
        assert_eq!(f.for_table("public", "orders").map(String::as_str), Some("ordered_at"));
        assert_eq!(f.for_table("Sales", "Lines").map(String::as_str), Some("Shipped At"));
        assert_eq!(f.for_table("public", "items").map(String::as_str), Some("created"));
        let f = PerTable::<String>::parse("items:d").unwrap();
        assert_eq!((f.for_table("public", "items").cloned(), f.for_table("public", "orders")), (Some("d".into()), None));
        for bad in ["", " ; ", "a;b", "t:", ":c", "s.:c", "t:a;t:b", "public.t:a;t:b"] {
            assert!(PerTable::<String>::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn event_types() {
        let t = PerTable::<EventTypes>::parse("public.orders:I,U; lines:i ; *").unwrap();
        let ops = |s: &str, n: &str| {
            let t = t.for_table(s, n).unwrap();
            [Op::Insert, Op::Update, Op::Delete].map(|op| t.applies(op))
        };
        assert_eq!(ops("public", "orders"), [true, true, false]);
        assert_eq!(ops("public", "lines"), [true, false, false]);
        assert_eq!(ops("x", "y"), [true, true, true]);
        let only = PerTable::<EventTypes>::parse("public.orders:D").unwrap();
        assert!(only.for_table("public", "other").is_none());
        let err = PerTable::<EventTypes>::parse("public.orders:I,X").unwrap_err();
        assert_eq!(err, "public.orders: \"X\" is not an event type: expected I, U, D separated by ','");
        assert!(PerTable::<EventTypes>::parse("I;U").unwrap_err().contains("more than one entry without a table"));
    }
}
