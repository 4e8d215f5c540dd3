//! pgq.jsontriga's format. ev_type: `{"op":"INSERT","table":["public","t"],"pkey":["id"]}`;
//! ev_data: the row as one JSON object in the table's column order. NULL is `null`, booleans are
//! `true`/`false`, int2/int4/int8 are numbers, timestamps and dates are XSD strings
//! (`"2026-12-02T16:30:00+05:30"`, which PostgreSQL reads back as the same time), and every other
//! type is its text output as a JSON string (numeric, json, arrays, bytea, ...). Parsed by
//! serde_json; a value stays a slice of ev_data until it is written, as url-encoded ones do.

use super::{copy_escapes, DecodeError, Encoded, EventType, Format, Op, Row, DECODING, JSON};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// What jsontriga writes in ev_type; other keys are allowed (a later PgQ may add some).
#[derive(Deserialize)]
struct JsonType {
    op: String,
    table: (String, String),
    pkey: Vec<String>,
}

fn bad(what: &'static str, e: serde_json::Error) -> DecodeError {
    DecodeError::BadJson { what, why: e.to_string() }
}

pub(super) fn parse_type(ev_type: &str) -> Result<EventType, DecodeError> {
    let t: JsonType = serde_json::from_str(ev_type).map_err(|e| bad("ev_type", e))?;
    let op = match t.op.as_str() {
        "INSERT" => Op::Insert,
        "UPDATE" => Op::Update,
        "DELETE" => Op::Delete,
        "TRUNCATE" => Op::Truncate,
        other => return Err(DecodeError::UnknownOp(other.to_string())),
    };
    if t.table.0.is_empty() || t.table.1.is_empty() {
        return Err(DecodeError::BadJson { what: "ev_type", why: "its table has an empty name".into() });
    }
    if t.pkey.iter().any(String::is_empty) {
        return Err(DecodeError::EmptyPkeyColumn(ev_type.to_string()));
    }
    Ok(EventType { op, pkey: t.pkey, format: Format::Json })
}

/// A column name: borrowed from ev_data unless it had escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The row object's members in order, values still JSON text.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of the row's columns")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(Name(name)) = map.next_key()? {
                    members.push((name, map.next_value()?));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// The row in ev_data. Like the url-encoded format, duplicate names are left to the INSERT/COPY
/// to refuse.
pub(super) fn parse_row(data: &str) -> Result<Row<'_>, DecodeError> {
    let Members(members) = serde_json::from_str(data).map_err(|e| bad("ev_data", e))?;
    let mut row: Row = Vec::with_capacity(members.len());
    for (name, raw) in members {
        if name.is_empty() {
            return Err(DecodeError::EmptyColumn);
        }
        if name.contains('\0') {
            return Err(DecodeError::Nul { what: "a column name" });
        }
        row.push((name, value(raw.get())?));
    }
    Ok(row)
}

/// A JSON value as the text PostgreSQL reads the column from.
fn value(raw: &str) -> Result<Option<Encoded<'_>>, DecodeError> {
    Ok(Some(match raw.as_bytes()[0] {
        b'n' => return Ok(None),
        // PostgreSQL's own text for booleans, as logutriga sends them
        b't' => Encoded::literal("t"),
        b'f' => Encoded::literal("f"),
        b'"' => string(raw)?,
        // a number, or a nested object or array (a hand-made event's json column): its JSON text
        _ => Encoded::literal(raw),
    }))
}

/// A JSON string. One without escapes is its own text; one with escapes is checked here by
/// unescaping it once, and unescaped again where it is written.
fn string(raw: &str) -> Result<Encoded<'_>, DecodeError> {
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains('\\') {
        return Ok(Encoded::literal(inner));
    }
    let text: String = serde_json::from_str(raw).map_err(|e| bad("a value", e))?;
    if text.contains('\0') {
        return Err(DecodeError::Nul { what: "a value" });
    }
    Ok(Encoded { raw, needs: DECODING | JSON | copy_escapes(&text) })
}

/// The text of a JSON string that `string` checked.
pub(super) fn unescape(raw: &str) -> String {
    serde_json::from_str(raw).expect("a JSON string checked by parse_row")
}

#[cfg(test)]
mod tests {
    use super::super::{parse_ev_type, parse_row};
    use super::*;

    fn decoded(data: &str) -> Result<Vec<(String, Option<String>)>, DecodeError> {
        parse_row(Format::Json, Some(data))
            .map(|r| r.into_iter().map(|(n, v)| (n.into_owned(), v.map(|e| e.decoded().into_owned()))).collect())
    }

    fn copy_text(data: &str) -> String {
        let mut buf = Vec::new();
        for (_, v) in parse_row(Format::Json, Some(data)).unwrap() {
            crate::copy_in::push_value(&mut buf, v);
            buf.push(b'|');
        }
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn ev_type_as_jsontriga_writes_it() {
        let t = parse_ev_type(r#"{"op":"INSERT","table":["public","t"],"pkey":["id","Line No"]}"#).unwrap();
        assert_eq!((t.op, t.pkey, t.format), (Op::Insert, vec!["id".to_string(), "Line No".to_string()], Format::Json));
        let ops = [("UPDATE", Op::Update), ("DELETE", Op::Delete), ("TRUNCATE", Op::Truncate)];
        for (text, op) in ops {
            let t = parse_ev_type(&format!(r#"{{"op":"{text}","table":["s","t"],"pkey":[]}}"#)).unwrap();
            assert_eq!((t.op, t.pkey.len()), (op, 0));
        }
        // unknown keys are allowed
        assert!(parse_ev_type(r#"{"op":"INSERT","table":["s","t"],"pkey":[],"x":1}"#).is_ok());
    }

    #[test]
    fn bad_ev_types() {
        let bad = |t: &str| parse_ev_type(t).unwrap_err().to_string();
        assert!(bad(r#"{"table":["s","t"],"pkey":[]}"#).contains("missing field `op`"));
        assert!(bad(r#"{"op":"INSERT","pkey":[]}"#).contains("missing field `table`"));
        assert!(bad(r#"{"op":"INSERT","table":["s","t"]}"#).contains("missing field `pkey`"));
        assert!(bad(r#"{"op":"INSERT","table":["t"],"pkey":[]}"#).starts_with("ev_type is not valid JSON"));
        assert!(bad(r#"{"op":"INSERT","table":["s",""],"pkey":[]}"#).contains("empty name"));
        assert_eq!(bad(r#"{"op":"MERGE","table":["s","t"],"pkey":[]}"#), r#"unknown operation "MERGE" in ev_type"#);
        assert!(bad(r#"{"op":"INSERT","table":["s","t"],"pkey":[""]}"#).contains("empty primary key column"));
        assert!(bad(r#"{"op":"INSERT""#).starts_with("ev_type is not valid JSON: EOF"));
    }

    #[test]
    fn values_as_jsontriga_writes_them() {
        // produced by pgq.jsontriga 3.5 on PostgreSQL 15 (a row of every awkward kind)
        let data = r#"{"id":1,"b":true,"c":false,"n":"12345678901234567890.123456789","f":"1.5e+300","i8":9223372036854775807,"i2":-5,"tx":"a\tb\nc\\d\"e'f ä € \u0001 %&=+","js":"{\"a\": [1, 2.50]}","arr":"{1,2,NULL}","tarr":"{\"x y\",\"z,\\\"\"}","by":"\\x00ff41","tz":"2026-12-02T16:30:00+05:30","z":null,"Weird Col":"w","e":""}"#;
        let s = |v: &str| Some(v.to_string());
        let want = vec![
            ("id", s("1")),
            ("b", s("t")),
            ("c", s("f")),
            ("n", s("12345678901234567890.123456789")),
            ("f", s("1.5e+300")),
            ("i8", s("9223372036854775807")),
            ("i2", s("-5")),
            ("tx", s("a\tb\nc\\d\"e'f ä € \u{1} %&=+")),
            ("js", s(r#"{"a": [1, 2.50]}"#)),
            ("arr", s("{1,2,NULL}")),
            ("tarr", s(r#"{"x y","z,\""}"#)),
            ("by", s(r"\x00ff41")),
            ("tz", s("2026-12-02T16:30:00+05:30")),
            ("z", None),
            ("Weird Col", s("w")),
            ("e", s("")),
        ];
        let want: Vec<(String, Option<String>)> = want.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
        assert_eq!(decoded(data).unwrap(), want);
        // COPY text: escapes where COPY needs them, NULL as \N
        assert_eq!(
            copy_text(r#"{"a":"x\ty","b":null,"c":"\\x00","d":"plain","e":"\"q\""}"#),
            "x\\ty|\\N|\\\\x00|plain|\"q\"|"
        );
    }

    #[test]
    fn hand_made_json_rows() {
        // nested values keep their JSON text; whitespace around members is fine; escaped names
        let got = decoded(" { \"j\" : {\"k\": [1,\n2]} , \"a\\u0062\" : 2.5e3 } ").unwrap();
        assert_eq!(got, vec![("j".into(), Some("{\"k\": [1,\n2]}".into())), ("ab".into(), Some("2.5e3".into()))]);
        assert_eq!(
            copy_text(
                r#"{"j":{"k":[1,
2]}}"#
            ),
            "{\"k\":[1,\\n2]}|"
        );
        assert_eq!(decoded("{}").unwrap(), vec![]);
    }

    #[test]
    fn bad_rows() {
        let err = |d: &str| decoded(d).unwrap_err().to_string();
        assert!(
            err("[1,2]").starts_with("ev_data is not valid JSON: invalid type: sequence, expected an object"),
            "{}",
            err("[1,2]")
        );
        assert!(err("\"id=1\"").contains("expected an object"));
        assert!(err(r#"{"a":1"#).starts_with("ev_data is not valid JSON: EOF"));
        assert!(err(r#"{"a":1} x"#).contains("trailing characters"));
        assert!(err(r#"{"a":"\x"}"#).contains("invalid escape"));
        assert_eq!(err(r#"{"a":"x\u0000y"}"#), "a value holds a NUL character, which PostgreSQL text cannot hold");
        assert_eq!(err(r#"{"a\u0000":1}"#), "a column name holds a NUL character, which PostgreSQL text cannot hold");
        assert_eq!(decoded(r#"{"":1}"#).unwrap_err(), DecodeError::EmptyColumn);
        assert_eq!(parse_row(Format::Json, None).unwrap_err(), DecodeError::NoData);
    }
}
