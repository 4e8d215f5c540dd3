//! Options with one value for every table or a value per table, as londiste's dispatch handler
//! takes per-table arguments: `value`, or entries `schema.table:value` separated by `;`, where an
//! entry without a table applies to every table not listed (`public.orders:I,U; public.lines:I; I`).
//! Table names are as the triggers write them (unquoted, exact case); no schema means `public`.
//! `TableRules` is what they say together for one table. Pure Rust.

use crate::config::JobConfig;
use crate::decode::{Op, TableName};
use crate::reshape::Reshape;

/// What the job's per-table options say for one table: the writer follows them, start/reload
/// check keep_latest's key against them.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRules {
    /// as the events name it
    pub source: TableName,
    /// the parent its events are written into (table_map)
    pub dest: TableName,
    pub part_field: Option<String>,
    pub event_types: Option<EventTypes>,
    /// fields, skip_fields; None when they leave its rows as they are
    pub reshape: Option<Reshape>,
}

impl JobConfig {
    /// The per-table options for rows of `table`, as the events name it.
    pub fn table_rules(&self, table: TableName) -> TableRules {
        let (s, t) = (table.schema.as_str(), table.table.as_str());
        TableRules {
            dest: self.table_map.as_ref().and_then(|m| m.for_table(s, t)).unwrap_or(&table).clone(),
            part_field: self.part_field.as_ref().and_then(|f| f.column_for(s, t)).map(str::to_string),
            event_types: self.event_types.as_ref().and_then(|e| e.for_table(s, t)).copied(),
            reshape: Reshape::new(
                self.fields.as_ref().and_then(|f| f.for_table(s, t)),
                self.skip_fields.as_ref().and_then(|f| f.for_table(s, t)),
            ),
            source: table,
        }
    }
}

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

    /// The tables listed with a value of their own.
    pub fn tables(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tables.iter().map(|(s, t, _)| (s.as_str(), t.as_str()))
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

/// `fields`: the columns kept, in a comma list, each `src` or `src:dst` to rename it; `*` keeps
/// every column (a table's entry `*` undoes a catch-all list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields(pub Option<Vec<(String, String)>>);

impl EntryValue for Fields {
    const BARE_TABLE: bool = false;
    const EXPECTED: &'static str = "columns separated by ',' (src or src:dst)";
    fn parse_value(text: &str) -> Result<Fields, String> {
        if text.trim() == "*" {
            return Ok(Fields(None));
        }
        let mut kept: Vec<(String, String)> = Vec::new();
        for item in text.split(',').map(str::trim) {
            let (src, dst) = item.split_once(':').map(|(s, d)| (s.trim(), d.trim())).unwrap_or((item, item));
            if src.is_empty() || dst.is_empty() {
                return Err(format!("{item:?} is not a column or src:dst"));
            }
            if kept.iter().any(|(s, _)| s == src) {
                return Err(format!("column {src:?} is listed twice"));
            }
            if kept.iter().any(|(_, d)| d == dst) {
                return Err(format!("two columns would be named {dst:?}"));
            }
            kept.push((src.to_string(), dst.to_string()));
        }
        Ok(Fields(Some(kept)))
    }
}

/// `skip_fields`: columns dropped, separated by ','.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns(pub Vec<String>);

impl EntryValue for Columns {
    const BARE_TABLE: bool = true;
    const EXPECTED: &'static str = "column names separated by ','";
    fn parse_value(text: &str) -> Result<Columns, String> {
        let columns: Vec<String> = text.split(',').map(|c| c.trim().to_string()).collect();
        if columns.iter().any(String::is_empty) {
            return Err("an empty column name".into());
        }
        Ok(Columns(columns))
    }
}

/// `table_map`: the parent the table's events are written into, `schema.table` (no schema:
/// `public`).
impl EntryValue for TableName {
    const BARE_TABLE: bool = true;
    const EXPECTED: &'static str = "a parent table schema.table";
    fn parse_value(text: &str) -> Result<TableName, String> {
        crate::decode::parse_table(Some(text.trim())).map_err(|e| e.to_string())
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
        assert_eq!(
            (f.for_table("public", "items").cloned(), f.for_table("public", "orders")),
            (Some("d".into()), None)
        );
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

    #[test]
    fn fields_and_maps() {
        let f = PerTable::<Fields>::parse("public.orders:id,amount:total; id, note:remark").unwrap();
        let pair = |s: &str, d: &str| (s.to_string(), d.to_string());
        assert_eq!(f.for_table("public", "orders").unwrap().0, Some(vec![pair("id", "id"), pair("amount", "total")]));
        assert_eq!(f.for_table("x", "y").unwrap().0, Some(vec![pair("id", "id"), pair("note", "remark")]));
        // a bare name before ':' is a rename, not a table
        assert_eq!(
            PerTable::<Fields>::parse("amount:total").unwrap().for_table("public", "amount").unwrap().0,
            Some(vec![pair("amount", "total")])
        );
        assert_eq!(PerTable::<Fields>::parse("public.t:*; id").unwrap().for_table("public", "t").unwrap().0, None);
        for bad in ["id,,x", "a:b,c:b", "a,a", "public.t:", "x:"] {
            assert!(PerTable::<Fields>::parse(bad).is_err(), "{bad:?}");
        }
        let m = PerTable::<TableName>::parse("public.orders:bi.orders_hist; lines:lines_hist").unwrap();
        let t = |s: &str, n: &str| TableName { schema: s.into(), table: n.into() };
        assert_eq!(m.for_table("public", "orders"), Some(&t("bi", "orders_hist")));
        assert_eq!(m.for_table("public", "lines"), Some(&t("public", "lines_hist")));
        assert_eq!(m.for_table("public", "other"), None);
        let s = PerTable::<Columns>::parse("secret, pin; public.t:x").unwrap();
        assert_eq!(s.for_table("public", "u").unwrap().0, vec!["secret", "pin"]);
        assert!(PerTable::<Columns>::parse("a,,b").is_err());
    }

    #[test]
    fn rules_of_one_table() {
        use crate::config::tests::{cfg, with};
        let t = |s: &str, n: &str| TableName { schema: s.into(), table: n.into() };
        let c = cfg(&with(&[
            ("table_map", "public.orders:bi.orders_hist"),
            ("fields", "public.orders:id:order_id,amount; *"),
            ("skip_fields", "pin"),
            ("event_types", "public.orders:I,U"),
            ("part_mode", "date_field"),
            ("part_field", "orders:ordered_at; created"),
        ]))
        .unwrap();
        let orders = c.table_rules(t("public", "orders"));
        let pin = Columns(vec!["pin".into()]);
        assert_eq!((orders.source, orders.dest), (t("public", "orders"), t("bi", "orders_hist")));
        assert_eq!(orders.part_field.as_deref(), Some("ordered_at"));
        assert!(orders.event_types.is_some_and(|e| e.applies(Op::Update) && !e.applies(Op::Delete)));
        let kept = Fields::parse_value("id:order_id,amount").unwrap();
        assert_eq!(orders.reshape, Reshape::new(Some(&kept), Some(&pin)));
        let lines = c.table_rules(t("Sales", "Lines"));
        assert_eq!((&lines.source, &lines.dest), (&t("Sales", "Lines"), &t("Sales", "Lines")));
        assert_eq!((lines.part_field.as_deref(), lines.event_types), (Some("created"), None));
        assert_eq!(lines.reshape, Reshape::new(None, Some(&pin)));
        let plain = cfg(&with(&[])).unwrap().table_rules(t("public", "orders"));
        assert_eq!(
            (plain.dest, plain.part_field, plain.event_types, plain.reshape),
            (t("public", "orders"), None, None, None)
        );
    }
}
