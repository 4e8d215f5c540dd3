//! An event's row as a receiving helper hands it to its writer: decoded already, so the writer
//! neither checks nor unescapes a value, it only splits the text. The helper decodes with the
//! same `parse_row` as the writer would, so the two cannot disagree about an event; one that
//! does not decode is sent as stored and fails in the writer, which reports it as always.
//!
//! The form, per column: its name, NUL, a tag, the value unless NULL, NUL. Tags: `N` NULL, `T`
//! text, `E` text holding a byte COPY text escapes. NUL needs no escaping: `parse_row` refuses it
//! in names and values, as PostgreSQL text cannot hold it.

use super::{parse_ev_type, parse_row, DecodeError, Encoded, Format, Op, Row, COPY_ESCAPES, LITERAL};
use std::borrow::Cow;

const NULL: u8 = b'N';
const TEXT: u8 = b'T';
const ESCAPES: u8 = b'E';

/// Appends the row `format` encodes in `ev_data`, in this form; false (nothing appended) when
/// the event has no row to decode (a truncate) or does not decode.
pub fn write(op: Op, format: Format, ev_data: Option<&str>, out: &mut Vec<u8>) -> bool {
    if op == Op::Truncate {
        return false;
    }
    let Ok(row) = parse_row(format, ev_data) else { return false };
    for (name, value) in &row {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        match value {
            None => out.push(NULL),
            Some(v) => {
                out.push(if v.copy_safe() { TEXT } else { ESCAPES });
                v.decode_into(out);
            }
        }
        out.push(0);
    }
    true
}

/// `write` for events as stored, their ev_type parsed here: once for a run of events that share
/// it, as a batch's mostly do.
#[derive(Default)]
pub struct Predecoder {
    last_type: Option<(String, Option<(Op, Format)>)>,
}

impl Predecoder {
    pub fn write(&mut self, ev_type: Option<&str>, ev_data: Option<&str>, out: &mut Vec<u8>) -> bool {
        let ev_type = ev_type.unwrap_or_default();
        let parsed = match &self.last_type {
            Some((last, parsed)) if last == ev_type => *parsed,
            _ => {
                let parsed = parse_ev_type(ev_type).ok().map(|t| (t.op, t.format));
                self.last_type = Some((ev_type.to_string(), parsed));
                parsed
            }
        };
        parsed.is_some_and(|(op, format)| write(op, format, ev_data, out))
    }
}

/// The row `write` wrote.
pub fn parse(data: &str) -> Result<Row<'_>, DecodeError> {
    if !data.is_empty() && !data.ends_with('\0') {
        return Err(DecodeError::Predecoded);
    }
    let mut row: Row = Vec::with_capacity(16);
    let mut fields = data.split_terminator('\0');
    while let Some(name) = fields.next() {
        let value = fields.next().ok_or(DecodeError::Predecoded)?;
        if name.is_empty() {
            return Err(DecodeError::Predecoded);
        }
        // the tag is ASCII: a value that does not start with one does not split here
        let value = match value.split_at_checked(1) {
            Some(("N", "")) => None,
            Some(("T", text)) => Some(Encoded { raw: text, needs: LITERAL }),
            Some(("E", text)) => Some(Encoded { raw: text, needs: LITERAL | COPY_ESCAPES }),
            _ => return Err(DecodeError::Predecoded),
        };
        row.push((Cow::Borrowed(name), value));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy_in::push_value;

    /// Each column as the writer uses it: name, decoded value, COPY text.
    fn seen(row: Row) -> Vec<(String, Option<String>, Vec<u8>)> {
        row.into_iter()
            .map(|(n, v)| {
                let mut copy = Vec::new();
                push_value(&mut copy, v);
                (n.into_owned(), v.map(|e| e.decoded().into_owned()), copy)
            })
            .collect()
    }

    #[test]
    fn a_predecoded_row_is_the_row_the_trigger_encoded() {
        let cases = [
            ("I:id", "id=1&txt=text1&val"),
            ("I:id", "id=2&txt&val=1.5&e="),
            ("U:id", "id=3&t=a+b%2bc&u=%26%3d%25%2B&Camel%20Col=x"),
            ("I:id", "id=4&t=%c3%a4%e2%82%ac&tab=a%09b&nl=a%0Ab&bs=a%5Cb&cr=%0D&raw=a\tb"),
            ("D:id", "id=5"),
            ("I:id", ""),
            (
                r#"{"op":"INSERT","table":["public","t"],"pkey":["id"]}"#,
                r#"{"id":6,"s":"a\tb\\c\"","n":null,"b":true,"j":{"k":[1,2]},"e":""}"#,
            ),
            (r#"{"op":"UPDATE","table":["public","t"],"pkey":["id"]}"#, r#"{"id":7,"ü":"ä€","q":"plain"}"#),
        ];
        for (ev_type, ev_data) in cases {
            let t = parse_ev_type(ev_type).unwrap();
            let mut out = Vec::new();
            assert!(Predecoder::default().write(Some(ev_type), Some(ev_data), &mut out), "{ev_data}");
            let form = std::str::from_utf8(&out).unwrap();
            let direct = parse_row(t.format, Some(ev_data)).unwrap();
            assert_eq!(seen(parse(form).unwrap()), seen(direct), "{ev_data}");
        }
    }

    #[test]
    fn what_does_not_decode_is_left_as_stored() {
        for (ev_type, ev_data) in [
            (Some("I:id"), Some("id=%zz")),
            (Some("I:id"), Some("id=%00")),
            (Some("I:id"), Some("=1")),
            (Some("I:id"), None),
            (Some("X:id"), Some("id=1")),
            (None, Some("id=1")),
            (Some("R"), None),
            (Some("R"), Some("")),
            (Some(r#"{"op":"INSERT","table":["public","t"],"pkey":[]}"#), Some(r#"{"s":"a\u0000"}"#)),
            (Some(r#"{"op":"TRUNCATE","table":["public","t"],"pkey":[]}"#), Some("{}")),
        ] {
            let mut out = b"kept".to_vec();
            // the cache of a good ev_type must not carry over to a bad one, nor the other way
            let mut p = Predecoder::default();
            assert!(p.write(Some("I:id"), Some("id=1"), &mut Vec::new()));
            assert!(!p.write(ev_type, ev_data, &mut out), "{ev_type:?} {ev_data:?}");
            assert!(!p.write(ev_type, ev_data, &mut out), "{ev_type:?} {ev_data:?}");
            assert_eq!(out, b"kept");
        }
    }

    #[test]
    fn a_malformed_form_is_refused() {
        for bad in ["a", "a\0", "a\0T", "a\0X1\0", "a\0Nx\0", "\0T1\0", "a\0\0", "a\0T1\0b"] {
            assert_eq!(parse(bad).unwrap_err(), DecodeError::Predecoded, "{bad:?}");
        }
        assert_eq!(parse("").unwrap(), Vec::new());
        assert_eq!(seen(parse("a\0N\0b\0T\0").unwrap())[1].1.as_deref(), Some(""));
    }
}
