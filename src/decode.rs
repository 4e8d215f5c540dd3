//! The two event formats PgQ's triggers write, told apart per event: pgq.logutriga's (`I:id` in
//! `ev_type`, the url-encoded row in `ev_data`) and pgq.jsontriga's (JSON in both, see `json`).
//! Both put the table in `ev_extra1` and decode to the same `Row`, so nothing after this module
//! knows which trigger made an event. Pure Rust so it is tested without a server.

mod json;
pub mod predecoded;

use percent_encoding::percent_decode;
use std::borrow::Cow;
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// TRUNCATE of the table (logutriga `R`, jsontriga `{"op":"TRUNCATE"}`): no row
    Truncate,
}

/// Which trigger made an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// pgq.logutriga: url-encoded
    Url,
    /// pgq.jsontriga: JSON
    Json,
}

/// `ev_type` split into the operation and the primary-key columns logutriga listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType {
    pub op: Op,
    pub pkey: Vec<String>,
    /// how ev_data is encoded
    pub format: Format,
}

/// A table name as the trigger sent it: raw, unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

/// One row: column names (decoded) in the order the trigger wrote them, and values still as
/// they sit in ev_data, `None` for SQL NULL. Values are checked when the row is parsed and
/// decoded only where they are written, so most are never copied.
pub type Row<'a> = Vec<(Cow<'a, str>, Option<Encoded<'a>>)>;

/// A url-encoded value from ev_data that parse_row has checked: its escapes are well formed and
/// it decodes to UTF-8 without NUL. The check also notes what writing it will need, so the
/// common plain value is copied as it is, without looking at it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encoded<'a> {
    raw: &'a str,
    needs: u8,
}

/// A byte COPY text must escape (copy_in::push_value escapes it).
const fn copy_special(b: u8) -> bool {
    matches!(b, b'\\' | b'\n' | b'\r' | b'\t')
}

/// COPY_ESCAPES if text that is its own decoding holds a byte COPY text must escape.
fn copy_escapes(text: &str) -> u8 {
    if text.bytes().any(copy_special) {
        COPY_ESCAPES
    } else {
        0
    }
}

/// The bytes Encoded::check must look at: escapes, '+', and what COPY text escapes.
static NOTABLE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = matches!(i as u8, b'%' | b'+') || copy_special(i as u8);
        i += 1;
    }
    t
};

/// `Encoded::needs` bits
const DECODING: u8 = 1; // has '%' escapes or '+'
const COPY_ESCAPES: u8 = 2; // decodes to a byte COPY text must escape: \ \n \r \t
const LITERAL: u8 = 4; // not url-encoded at all (Encoded::literal)
const JSON: u8 = 8; // a JSON string with escapes, quotes included; decoding unescapes it

impl<'a> Encoded<'a> {
    /// No escapes: the text is its own decoding.
    pub fn plain(&self) -> Option<&'a str> {
        (self.needs & DECODING == 0).then_some(self.raw)
    }

    /// Neither url decoding nor COPY escaping changes it: the text is its own COPY text.
    pub fn copy_plain(&self) -> Option<&'a str> {
        (self.needs & !LITERAL == 0).then_some(self.raw)
    }

    /// Its decoding is its COPY text: nothing in it needs a COPY escape.
    pub fn copy_safe(&self) -> bool {
        self.needs & COPY_ESCAPES == 0
    }

    /// The decoded text; borrowed when the value had no escapes.
    pub fn decoded(&self) -> Cow<'a, str> {
        if let Some(p) = self.plain() {
            return Cow::Borrowed(p);
        }
        if self.needs & JSON != 0 {
            return Cow::Owned(json::unescape(self.raw));
        }
        let mut out = Vec::with_capacity(self.raw.len());
        self.decode_into(&mut out);
        // checked by parse_row
        Cow::Owned(String::from_utf8(out).expect("validated value"))
    }

    /// A value that is text already, not url-encoded: the time the job fills a native parent's
    /// partition key with.
    pub fn literal(text: &'a str) -> Encoded<'a> {
        Encoded { raw: text, needs: LITERAL | copy_escapes(text) }
    }

    /// Appends the decoded bytes to `out`.
    pub fn decode_into(&self, out: &mut Vec<u8>) {
        if let Some(p) = self.plain() {
            out.extend_from_slice(p.as_bytes());
            return;
        }
        if self.needs & JSON != 0 {
            out.extend_from_slice(json::unescape(self.raw).as_bytes());
            return;
        }
        for (n, segment) in self.raw.as_bytes().split(|&b| b == b'+').enumerate() {
            if n > 0 {
                out.push(b' ');
            }
            out.extend(percent_decode(segment));
        }
    }

    /// Feeds the decoded bytes to `f`: '+' is a space, the rest goes through percent_decode.
    pub fn decode_each(&self, mut f: impl FnMut(u8)) {
        if let Some(p) = self.plain() {
            p.bytes().for_each(f);
            return;
        }
        if self.needs & JSON != 0 {
            json::unescape(self.raw).bytes().for_each(f);
            return;
        }
        for (n, segment) in self.raw.as_bytes().split(|&b| b == b'+').enumerate() {
            if n > 0 {
                f(b' ');
            }
            percent_decode(segment).for_each(&mut f);
        }
    }

    /// Checks `raw` in one pass: escapes well formed, no NUL, valid UTF-8 once decoded. Only a
    /// value with escapes of non-ASCII bytes is decoded to check its UTF-8: replacing ASCII
    /// escapes keeps valid text valid. (percent_decode would let a malformed escape through as
    /// literal text; one means the event was not made by logutriga, so it is refused, not guessed.)
    fn check(raw: &'a str, what: &'static str) -> Result<Encoded<'a>, DecodeError> {
        let bytes = raw.as_bytes();
        let (mut needs, mut non_ascii) = (0, false);
        let mut i = 0;
        // most bytes mean nothing here: skip them with one table lookup each
        while let Some(skip) = bytes[i..].iter().position(|&b| NOTABLE[b as usize]) {
            i += skip;
            match bytes[i] {
                b'%' => {
                    let hex = |j: usize| bytes.get(j).and_then(|&c| (c as char).to_digit(16));
                    let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                        return Err(DecodeError::BadEscape { what, pos: i });
                    };
                    let byte = (hi * 16 + lo) as u8;
                    if byte == 0 {
                        // PostgreSQL text cannot hold NUL: say so here, not later in an input function
                        return Err(DecodeError::BadUtf8 { what });
                    }
                    needs |= DECODING | if copy_special(byte) { COPY_ESCAPES } else { 0 };
                    non_ascii |= byte >= 0x80;
                    i += 3;
                    continue;
                }
                b'+' => needs |= DECODING,
                b if copy_special(b) => needs |= COPY_ESCAPES,
                _ => {}
            }
            i += 1;
        }
        let e = Encoded { raw, needs };
        if non_ascii {
            let mut buf = Vec::with_capacity(raw.len());
            e.decode_each(|b| buf.push(b));
            if std::str::from_utf8(&buf).is_err() {
                return Err(DecodeError::BadUtf8 { what });
            }
        }
        Ok(e)
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ev_type is empty")]
    EmptyType,
    #[error("unknown operation {0:?} in ev_type")]
    UnknownOp(String),
    #[error("ev_type {0:?} lists an empty primary key column name")]
    EmptyPkeyColumn(String),
    #[error("ev_extra1 (the table name) is missing")]
    NoTable,
    #[error("ev_extra1 {0:?} is not a valid table name")]
    BadTable(String),
    #[error("malformed %-escape at byte {pos} of {what}")]
    BadEscape { what: &'static str, pos: usize },
    #[error("{what} is not valid UTF-8 after decoding")]
    BadUtf8 { what: &'static str },
    #[error("ev_data has an empty column name")]
    EmptyColumn,
    #[error("ev_data is missing")]
    NoData,
    #[error("{what} is not valid JSON: {why}")]
    BadJson { what: &'static str, why: String },
    #[error("{what} holds a NUL character, which PostgreSQL text cannot hold")]
    Nul { what: &'static str },
    #[error("ev_data as decoded by the receiving helper is malformed")]
    Predecoded,
}

/// logutriga's `I:id,name` / `U:` / `D` / `R` (a bare op is accepted, as the original did), or
/// jsontriga's `{"op":"INSERT","table":[..],"pkey":[..]}`.
pub fn parse_ev_type(ev_type: &str) -> Result<EventType, DecodeError> {
    if ev_type.is_empty() {
        return Err(DecodeError::EmptyType);
    }
    if ev_type.starts_with('{') {
        return json::parse_type(ev_type);
    }
    let (op, keys) = match ev_type.split_once(':') {
        Some((op, keys)) => (op, keys),
        None => (ev_type, ""),
    };
    let op = match op {
        "I" => Op::Insert,
        "U" => Op::Update,
        "D" => Op::Delete,
        "R" => Op::Truncate,
        other => return Err(DecodeError::UnknownOp(other.to_string())),
    };
    let pkey = if keys.is_empty() {
        Vec::new()
    } else {
        let cols: Vec<String> = keys.split(',').map(str::to_string).collect();
        if cols.iter().any(String::is_empty) {
            return Err(DecodeError::EmptyPkeyColumn(ev_type.to_string()));
        }
        cols
    };
    Ok(EventType { op, pkey, format: Format::Url })
}

/// `schema.table`, split at the first '.'; without a '.', the table is in `public`
/// (logutriga always qualifies; hand-made events may not).
pub fn parse_table(ev_extra1: Option<&str>) -> Result<TableName, DecodeError> {
    let raw = ev_extra1.ok_or(DecodeError::NoTable)?;
    if raw.is_empty() {
        return Err(DecodeError::NoTable);
    }
    let (schema, table) = raw.split_once('.').unwrap_or(("public", raw));
    if schema.is_empty() || table.is_empty() || raw.contains('\0') {
        return Err(DecodeError::BadTable(raw.to_string()));
    }
    Ok(TableName { schema: schema.to_string(), table: table.to_string() })
}

/// The row in ev_data, as the trigger that made the event encoded it.
pub fn parse_row(format: Format, ev_data: Option<&str>) -> Result<Row<'_>, DecodeError> {
    let data = ev_data.ok_or(DecodeError::NoData)?;
    match format {
        Format::Url => parse_url_row(data),
        Format::Json => json::parse_row(data),
    }
}

/// logutriga's url encoding: `a=1&b&c=` is a=1, b NULL, c ''. '+' is a space, `%XX` a byte;
/// names are encoded the same way as values.
fn parse_url_row(data: &str) -> Result<Row<'_>, DecodeError> {
    let mut row: Row = Vec::with_capacity(16);
    if data.is_empty() {
        return Ok(row);
    }
    // Duplicate names are not checked here (that would be quadratic per event on the hot path):
    // the INSERT/COPY refuses them with "column specified more than once".
    // byte positions of ASCII delimiters are char boundaries, so the slicing below cannot fail
    let find = |s: &str, b: u8| memchr::memchr(b, s.as_bytes());
    let mut rest = data;
    loop {
        let (pair, more) = match find(rest, b'&') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let (name, value) = match find(pair, b'=') {
            Some(i) => (&pair[..i], Some(&pair[i + 1..])),
            None => (pair, None),
        };
        let name = Encoded::check(name, "a column name")?.decoded();
        if name.is_empty() {
            return Err(DecodeError::EmptyColumn);
        }
        let value = value.map(|v| Encoded::check(v, "a value")).transpose()?;
        row.push((name, value));
        match more {
            Some(m) => rest = m,
            None => return Ok(row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<Cow<'static, str>> {
        Some(Cow::Owned(v.to_string()))
    }

    #[test]
    fn a_literal_is_its_own_text() {
        // '+' and ' ' would mean something in ev_data; a literal is not url-encoded
        let t = Encoded::literal("2026-12-02 07:15:00.5+05:30");
        assert_eq!(t.decoded(), "2026-12-02 07:15:00.5+05:30");
        assert_eq!(t.copy_plain(), Some("2026-12-02 07:15:00.5+05:30"));
        let mut out = Vec::new();
        t.decode_into(&mut out);
        assert_eq!(out, b"2026-12-02 07:15:00.5+05:30");
        assert!(!Encoded::literal("a\tb").copy_safe());
    }

    #[test]
    fn every_format_notes_what_copy_escapes() {
        let copy_safe = |row: Row| row[0].1.unwrap().copy_safe();
        for (byte, escaped) in [('\\', "%5C"), ('\n', "%0A"), ('\r', "%0D"), ('\t', "%09")] {
            let text = format!("a{byte}b");
            let json = format!(r#"{{"v":{}}}"#, serde_json::to_string(&text).unwrap());
            assert!(!Encoded::literal(&text).copy_safe(), "{byte:?}");
            assert!(!copy_safe(parse_row(Format::Url, Some(&format!("v={text}"))).unwrap()), "{byte:?}");
            assert!(!copy_safe(parse_row(Format::Url, Some(&format!("v=a{escaped}b"))).unwrap()), "{byte:?}");
            assert!(!copy_safe(parse_row(Format::Json, Some(&json)).unwrap()), "{byte:?}");
        }
        assert!(Encoded::literal("a b").copy_safe());
        assert!(copy_safe(parse_row(Format::Url, Some("v=a+b%25")).unwrap()));
        assert!(copy_safe(parse_row(Format::Json, Some(r#"{"v":"a \"b\""}"#)).unwrap()));
    }

    #[test]
    fn ev_type_cases() {
        let cases: &[(&str, Result<(Op, &[&str]), DecodeError>)] = &[
            ("I:id", Ok((Op::Insert, &["id"]))),
            ("U:a,b", Ok((Op::Update, &["a", "b"]))),
            ("D:id", Ok((Op::Delete, &["id"]))),
            ("I:", Ok((Op::Insert, &[]))),
            ("I", Ok((Op::Insert, &[]))),
            ("D", Ok((Op::Delete, &[]))),
            ("R", Ok((Op::Truncate, &[]))),
            ("U:Camel Case,x", Ok((Op::Update, &["Camel Case", "x"]))),
            ("", Err(DecodeError::EmptyType)),
            ("X:id", Err(DecodeError::UnknownOp("X".into()))),
            ("i:id", Err(DecodeError::UnknownOp("i".into()))),
            ("INSERT:id", Err(DecodeError::UnknownOp("INSERT".into()))),
            ("I:a,,b", Err(DecodeError::EmptyPkeyColumn("I:a,,b".into()))),
            ("I:a,", Err(DecodeError::EmptyPkeyColumn("I:a,".into()))),
        ];
        for (input, want) in cases {
            let got = parse_ev_type(input).map(|t| (t.op, t.pkey));
            assert!(got.is_err() || parse_ev_type(input).unwrap().format == Format::Url);
            let want = want.clone().map(|(op, k)| (op, k.iter().map(|c| c.to_string()).collect::<Vec<_>>()));
            assert_eq!(got, want, "ev_type {input:?}");
        }
    }

    #[test]
    fn table_cases() {
        let t = |s: &str, n: &str| Ok(TableName { schema: s.into(), table: n.into() });
        let cases: &[(Option<&str>, Result<TableName, DecodeError>)] = &[
            (Some("public.orders"), t("public", "orders")),
            (Some("Sales.Order Lines"), t("Sales", "Order Lines")),
            (Some("a.b.c"), t("a", "b.c")),
            (Some("orders"), t("public", "orders")),
            (Some("x\"; drop table t; --"), t("public", "x\"; drop table t; --")),
            (None, Err(DecodeError::NoTable)),
            (Some(""), Err(DecodeError::NoTable)),
            (Some(".t"), Err(DecodeError::BadTable(".t".into()))),
            (Some("s."), Err(DecodeError::BadTable("s.".into()))),
        ];
        for (input, want) in cases {
            assert_eq!(&parse_table(*input), want, "ev_extra1 {input:?}");
        }
    }

    #[test]
    fn row_cases() {
        type Decoded = Vec<(Cow<'static, str>, Option<Cow<'static, str>>)>;
        let cases: &[(&str, Result<Decoded, DecodeError>)] = &[
            // straight from PgQ's own regression output
            ("id=1&txt=text1&val", Ok(vec![("id".into(), s("1")), ("txt".into(), s("text1")), ("val".into(), None)])),
            ("id=2&txt&val=1.5", Ok(vec![("id".into(), s("2")), ("txt".into(), None), ("val".into(), s("1.5"))])),
            ("emptyvalue=", Ok(vec![("emptyvalue".into(), s(""))])),
            ("", Ok(vec![])),
            ("t=a+b%2bc", Ok(vec![("t".into(), s("a b+c"))])),
            ("t=%26%3d%25%2B", Ok(vec![("t".into(), s("&=%+"))])),
            ("Camel%20Col=x&a%26b=1", Ok(vec![("Camel Col".into(), s("x")), ("a&b".into(), s("1"))])),
            ("t=%c3%a4%e2%82%ac", Ok(vec![("t".into(), s("ä€"))])),
            ("t=%7b1%2c2%7d", Ok(vec![("t".into(), s("{1,2}"))])),
            ("t=%zz", Err(DecodeError::BadEscape { what: "a value", pos: 0 })),
            ("t=ab%4", Err(DecodeError::BadEscape { what: "a value", pos: 2 })),
            ("t=%", Err(DecodeError::BadEscape { what: "a value", pos: 0 })),
            ("%g1=1", Err(DecodeError::BadEscape { what: "a column name", pos: 0 })),
            ("t=%ff%fe", Err(DecodeError::BadUtf8 { what: "a value" })),
            ("t=%e2%82", Err(DecodeError::BadUtf8 { what: "a value" })),
            ("t=ä%2b", Ok(vec![("t".into(), s("ä+"))])),
            ("t=a%2", Err(DecodeError::BadEscape { what: "a value", pos: 1 })),
            ("t=a=b", Ok(vec![("t".into(), s("a=b"))])),
            ("a&b=", Ok(vec![("a".into(), None), ("b".into(), s(""))])),
            ("t=a%00b", Err(DecodeError::BadUtf8 { what: "a value" })),
            ("=1", Err(DecodeError::EmptyColumn)),
            ("a=1&&b=2", Err(DecodeError::EmptyColumn)),
        ];
        for (input, want) in cases {
            let got = parse_row(Format::Url, Some(input))
                .map(|r| r.into_iter().map(|(n, v)| (n, v.map(|e| e.decoded()))).collect::<Vec<_>>());
            assert_eq!(&got, want, "ev_data {input:?}");
        }
        assert_eq!(parse_row(Format::Url, None).unwrap_err(), DecodeError::NoData);
    }
}
