//! Where an event goes: the partition name for a batch, and the part_template with its magic words
//! replaced. Pure Rust; identifier quoting is passed in so the backend can use PostgreSQL's own
//! `quote_identifier` while unit tests use a stand-in.

use crate::decode::TableName;
use thiserror::Error;

/// PostgreSQL's NAMEDATALEN - 1: longer names would be silently truncated by the server.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("partition name {name:?} is {len} bytes, over PostgreSQL's limit of 63")]
    NameTooLong { name: String, len: usize },
    #[error("partition suffix {0:?} from dateformat is empty")]
    BadSuffix(String),
}

/// `suffix` is to_char(batch_end, dateformat) evaluated on the source; `None` when partitioning is off.
pub fn partition_of(parent: &TableName, suffix: Option<&str>) -> Result<TableName, RouteError> {
    let table = match suffix {
        None => parent.table.clone(),
        Some(s) if s.is_empty() => return Err(RouteError::BadSuffix(s.to_string())),
        Some(s) => format!("{}_{}", parent.table, s),
    };
    if table.len() > MAX_IDENTIFIER_BYTES {
        return Err(RouteError::NameTooLong { len: table.len(), name: table });
    }
    Ok(TableName { schema: parent.schema.clone(), table })
}

pub fn qualified(t: &TableName, quote: &dyn Fn(&str) -> String) -> String {
    format!("{}.{}", quote(&t.schema), quote(&t.table))
}

/// Replaces _DEST_TABLE, _PARENT, _PKEY, _SCHEMA_TABLE and the words in `more` (_PART_START,
/// _PART_END, _PART_FIELD) in one left-to-right pass, so text that a replacement brings in (a
/// table called `_PARENT`, say) is never replaced again.
pub fn render_template(
    template: &str,
    dest: &TableName,
    parent: &TableName,
    pkey: &[String],
    quote: &dyn Fn(&str) -> String,
    more: &[(&'static str, String)],
) -> String {
    let base: [(&str, String); 4] = [
        ("_DEST_TABLE", qualified(dest, quote)),
        ("_SCHEMA_TABLE", quote(&format!("{}_{}", dest.schema, dest.table))),
        ("_PARENT", qualified(parent, quote)),
        // "id,line" as the original wrote it, visible where a template puts it in a name or comment
        ("_PKEY", pkey.iter().map(|c| quote(c)).collect::<Vec<_>>().join(",")),
    ];
    let words: Vec<&(&str, String)> = base.iter().chain(more).collect();
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    'scan: while !rest.is_empty() {
        for (word, value) in words.iter().copied() {
            if let Some(after) = rest.strip_prefix(word) {
                out.push_str(value);
                rest = after;
                continue 'scan;
            }
        }
        let ch = rest.chars().next().unwrap();
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::Mode;

    /// Stand-in for quote_identifier without the keyword list: the backend uses the real one.
    fn q(s: &str) -> String {
        let plain = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if plain {
            s.to_string()
        } else {
            format!("\"{}\"", s.replace('"', "\"\""))
        }
    }

    fn t(s: &str, n: &str) -> TableName {
        TableName { schema: s.into(), table: n.into() }
    }

    #[test]
    fn partition_names() {
        let (x52, x53) = ("x".repeat(52), "x".repeat(53));
        let cases: Vec<(TableName, Option<&str>, Result<TableName, RouteError>)> = vec![
            (t("public", "orders"), Some("2026_11_24"), Ok(t("public", "orders_2026_11_24"))),
            (t("Sales", "Order Lines"), Some("2026_11"), Ok(t("Sales", "Order Lines_2026_11"))),
            (t("public", "orders"), None, Ok(t("public", "orders"))),
            // 52 + '_' + 10 = 63 bytes: the longest name allowed
            (t("s", &x52), Some("2026_11_24"), Ok(t("s", &format!("{x52}_2026_11_24")))),
            (
                t("s", &x53),
                Some("2026_11_24"),
                Err(RouteError::NameTooLong { name: format!("{x53}_2026_11_24"), len: 64 }),
            ),
            // bytes, not characters: 28 two-byte letters + 11 = 67 bytes
            (
                t("s", &"ä".repeat(28)),
                Some("2026_11_24"),
                Err(RouteError::NameTooLong { name: format!("{}_2026_11_24", "ä".repeat(28)), len: 67 }),
            ),
            (t("s", "o"), Some(""), Err(RouteError::BadSuffix("".into()))),
        ];
        for (parent, suffix, want) in cases {
            assert_eq!(partition_of(&parent, suffix), want, "{parent:?} {suffix:?}");
        }
    }

    #[test]
    fn template_words() {
        let pk = vec!["id".to_string(), "Line No".to_string()];
        let cases: &[(&str, TableName, TableName, &str)] = &[
            (
                Mode::KeepLatest.default_template(),
                t("public", "orders_2026_11_24"),
                t("public", "orders"),
                "create table public.orders_2026_11_24 (like public.orders); alter table only public.orders_2026_11_24 add primary key (id,\"Line No\");",
            ),
            (
                Mode::KeepAll.default_template(),
                t("Sales", "Order Lines_2026"),
                t("Sales", "Order Lines"),
                "create table \"Sales\".\"Order Lines_2026\" (like \"Sales\".\"Order Lines\");",
            ),
            (
                "create index _SCHEMA_TABLE_idx on _DEST_TABLE (_PKEY)",
                t("public", "orders_2026"),
                t("public", "orders"),
                "create index public_orders_2026_idx on public.orders_2026 (id,\"Line No\")",
            ),
            // a replacement is never scanned again, even when the name spells a magic word
            (
                "_DEST_TABLE/_PARENT",
                t("public", "_PARENT_x"),
                t("public", "_PARENT"),
                "public.\"_PARENT_x\"/public.\"_PARENT\"",
            ),
            // quotes inside names are doubled, so a name cannot end the identifier early
            (
                "drop table _PARENT",
                t("public", "x"),
                t("public", "x\"; drop table t; --"),
                "drop table public.\"x\"\"; drop table t; --\"",
            ),
            ("select 'ä' -- _PKEY", t("a", "b"), t("a", "b"), "select 'ä' -- id,\"Line No\""),
        ];
        for (tpl, dest, parent, want) in cases {
            assert_eq!(render_template(tpl, dest, parent, &pk, &q, &[]), *want, "template {tpl:?}");
        }
        // the words a partition's period brings, next to _PARENT which they resemble
        let more = [
            ("_PART_START", "'2026-12-01'".to_string()),
            ("_PART_END", "'2026-12-02'".to_string()),
            ("_PART_FIELD", "day".to_string()),
        ];
        assert_eq!(
            render_template(
                "create table _DEST_TABLE partition of _PARENT for values from (_PART_START) to (_PART_END) -- _PART_FIELD",
                &t("public", "o_2026_12_01"),
                &t("public", "o"),
                &pk,
                &q,
                &more
            ),
            "create table public.o_2026_12_01 partition of public.o for values from ('2026-12-01') to ('2026-12-02') -- day"
        );
    }
}
