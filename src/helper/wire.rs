//! The messages between a job's writer and its receiving helper. Requests and replies are small
//! and rare (a few per batch): JSON. Events are the hot path: a chunk is a binary message the
//! writer reads in place, its events' text borrowed from the queue's memory, never copied.
//!
//! A chunk: `C`, the event count (u32), then per event its id (i64), 1 if its ev_data is
//! predecoded (`decode::predecoded`) else 0 (u8), and the lengths of ev_time, ev_type, ev_data
//! and ev_extra1 (u32, u32::MAX for NULL), then all their bytes in that order.
//! Little-endian throughout; both ends are the same build on the same machine, but a length read
//! wrongly must fail a check, not read out of bounds.

use crate::decode::predecoded::Predecoder;
use crate::event::RawEvent;
use crate::source::{BatchInfo, BatchRequest};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// What the writer asks of its helper. Each carries how far the writer's commits go: a finish
/// may only be committed on the source once the commit it follows is durable here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToHelper {
    /// the writer's last commit's WAL end (XactLastCommitEnd)
    pub written_upto: u64,
    /// the source's connection settings as the writer has them now (a reload may change them)
    pub conninfo: String,
    pub lifetime_secs: f64,
    pub ask: Ask,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Ask {
    /// The next batch: its info, then its chunks, then `End`.
    Next(BatchRequest),
    Register {
        queue: String,
        consumer: String,
    },
    Lag {
        queue: String,
        consumer: String,
    },
    TimeZone,
    /// Commit what is owed to the source (the last batch's finish), then answer.
    Settle,
}

/// What the helper sends back, besides chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// First message: the helper runs and is this build.
    Hello { version: String, pid: i32 },
    /// The answer to `Next`: the batch, or none ready.
    Batch(Option<BatchInfo>),
    /// The batch's events were all sent, this many.
    End { events: u64 },
    /// The answer to the other asks.
    Answer(Option<String>),
    /// The ask failed with this PostgreSQL error; the helper has ended.
    Failed { sqlstate: i32, message: String },
}

/// The build and wire format a helper and its writer must share (a library replaced under a
/// running server would otherwise pair an old writer with a new helper).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " wire 2");

const CHUNK: u8 = b'C';
const JSON: u8 = b'J';
const FIELD: usize = 8 + 1 + 4 * 4;
const NULL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed message from the receiving helper: {0}")]
pub struct Malformed(&'static str);

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut out = vec![JSON];
    serde_json::to_writer(&mut out, message).expect("our messages serialize");
    out
}

/// A message from the helper, read in place.
#[derive(Debug)]
pub enum Incoming<'m> {
    Chunk(Vec<RawEvent<'m>>),
    Reply(Reply),
}

pub fn decode_request(message: &[u8]) -> Result<ToHelper, Malformed> {
    match message.split_first() {
        Some((&JSON, json)) => serde_json::from_slice(json).map_err(|_| Malformed("a request that does not parse")),
        _ => Err(Malformed("not a request")),
    }
}

pub fn decode(message: &[u8]) -> Result<Incoming<'_>, Malformed> {
    match message.split_first() {
        Some((&JSON, json)) => {
            serde_json::from_slice(json).map(Incoming::Reply).map_err(|_| Malformed("a reply that does not parse"))
        }
        Some((&CHUNK, body)) => decode_chunk(body).map(Incoming::Chunk),
        _ => Err(Malformed("unknown message")),
    }
}

fn decode_chunk(body: &[u8]) -> Result<Vec<RawEvent<'_>>, Malformed> {
    let short = Malformed("a chunk shorter than it says");
    let n = u32::from_le_bytes(body.get(..4).ok_or(short)?.try_into().expect("4 bytes")) as usize;
    let fixed = body.get(4..).and_then(|b| b.get(..n.checked_mul(FIELD)?)).ok_or(short)?;
    let mut text = &body[4 + fixed.len()..];
    let mut take = |len: u32| -> Result<Option<Cow<'_, str>>, Malformed> {
        if len == NULL {
            return Ok(None);
        }
        let (value, rest) = text.split_at_checked(len as usize).ok_or(short)?;
        text = rest;
        // checked, not assumed: a framing mistake must not make invalid text
        std::str::from_utf8(value).map(|s| Some(Cow::Borrowed(s))).map_err(|_| Malformed("text that is not UTF-8"))
    };
    let mut events = Vec::with_capacity(n);
    for f in fixed.chunks_exact(FIELD) {
        let len = |i: usize| u32::from_le_bytes(f[9 + 4 * i..13 + 4 * i].try_into().expect("4 bytes"));
        let predecoded = match f[8] {
            0 => false,
            1 if len(2) != NULL => true,
            _ => return Err(Malformed("an event with a bad flag")),
        };
        events.push(RawEvent {
            ev_id: i64::from_le_bytes(f[..8].try_into().expect("8 bytes")),
            ev_time: take(len(0))?,
            ev_type: take(len(1))?,
            ev_data: take(len(2))?,
            ev_extra1: take(len(3))?,
            predecoded,
        });
    }
    if !text.is_empty() {
        return Err(Malformed("a chunk longer than it says"));
    }
    Ok(events)
}

/// Encodes `events` as chunk messages of at most about `max` bytes each (an event bigger than
/// that goes alone), handing each to `send`; stops at the first error `send` returns.
/// `predecode`: send the rows of the events that decode decoded (`decode::predecoded`).
pub fn encode_chunks<E>(
    events: &[RawEvent],
    predecode: bool,
    max: usize,
    buf: &mut Vec<u8>,
    mut send: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    // each event's ev_data as sent: a span of `decoded`, or as stored
    let mut decoded = Vec::new();
    let mut predecoder = Predecoder::default();
    let spans: Vec<Option<(usize, usize)>> = events
        .iter()
        .map(|e| {
            let start = decoded.len();
            let done = predecode && predecoder.write(e.ev_type.as_deref(), e.ev_data.as_deref(), &mut decoded);
            done.then_some((start, decoded.len()))
        })
        .collect();
    let fields = |i: usize| -> [Option<&[u8]>; 4] {
        let e = &events[i];
        let data = match spans[i] {
            Some((start, end)) => Some(&decoded[start..end]),
            None => e.ev_data.as_deref().map(str::as_bytes),
        };
        [
            e.ev_time.as_deref().map(str::as_bytes),
            e.ev_type.as_deref().map(str::as_bytes),
            data,
            e.ev_extra1.as_deref().map(str::as_bytes),
        ]
    };
    let size = |i: usize| FIELD + fields(i).iter().map(|f| f.map_or(0, <[u8]>::len)).sum::<usize>();
    let mut from = 0;
    while from < events.len() {
        let mut to = from;
        let mut total = 5;
        while to < events.len() {
            let s = size(to);
            if to > from && total + s > max {
                break;
            }
            to += 1;
            total += s;
        }
        buf.clear();
        buf.reserve(total);
        buf.push(CHUNK);
        buf.extend_from_slice(&((to - from) as u32).to_le_bytes());
        for i in from..to {
            buf.extend_from_slice(&events[i].ev_id.to_le_bytes());
            buf.push(spans[i].is_some() as u8);
            for f in fields(i) {
                buf.extend_from_slice(&f.map_or(NULL, |s| s.len() as u32).to_le_bytes());
            }
        }
        for i in from..to {
            for f in fields(i).into_iter().flatten() {
                buf.extend_from_slice(f);
            }
        }
        send(buf)?;
        from = to;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, data: Option<&'static str>) -> RawEvent<'static> {
        RawEvent {
            ev_id: id,
            ev_time: Some("2026-12-02 10:00:00+00".into()),
            ev_type: Some("I:id".into()),
            ev_data: data.map(Cow::Borrowed),
            ev_extra1: Some("public.orders".into()),
            predecoded: false,
        }
    }

    fn chunks(events: &[RawEvent], max: usize) -> Vec<Vec<u8>> {
        chunks_predecoding(events, false, max)
    }

    fn chunks_predecoding(events: &[RawEvent], predecode: bool, max: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        encode_chunks(events, predecode, max, &mut Vec::new(), |m| {
            out.push(m.to_vec());
            Ok::<_, ()>(())
        })
        .unwrap();
        out
    }

    fn events_of(message: &[u8]) -> Vec<(i64, Option<String>, Option<String>)> {
        match decode(message).unwrap() {
            Incoming::Chunk(evs) => evs
                .iter()
                .map(|e| {
                    (e.ev_id, e.ev_data.as_deref().map(str::to_string), e.ev_extra1.as_deref().map(str::to_string))
                })
                .collect(),
            other => panic!("not a chunk: {other:?}"),
        }
    }

    #[test]
    fn a_chunk_comes_back_as_it_went_nulls_and_unicode_included() {
        let sent = [ev(1, Some("id=1&name=J%C3%BCrgen")), ev(2, None), ev(3, Some("")), ev(4, Some("ünï\tcode"))];
        let messages = chunks(&sent, 1 << 20);
        assert_eq!(messages.len(), 1);
        let back = events_of(&messages[0]);
        let want: Vec<_> = sent
            .iter()
            .map(|e| (e.ev_id, e.ev_data.as_deref().map(str::to_string), Some("public.orders".to_string())))
            .collect();
        assert_eq!(back, want);
        let Incoming::Chunk(evs) = decode(&messages[0]).unwrap() else { unreachable!() };
        assert_eq!(evs[3].ev_time.as_deref(), Some("2026-12-02 10:00:00+00"));
        assert_eq!(evs[1].ev_type.as_deref(), Some("I:id"));
    }

    #[test]
    fn big_chunks_are_split_at_event_boundaries_and_a_huge_event_goes_alone() {
        let huge: &'static str = Box::leak("x".repeat(5000).into_boxed_str());
        let sent: Vec<_> = (1..=10).map(|i| ev(i, Some(if i == 5 { huge } else { "id=1" }))).collect();
        let messages = chunks(&sent, 400);
        assert!(messages.len() >= 3, "{} messages", messages.len());
        let ids: Vec<i64> = messages.iter().flat_map(|m| events_of(m)).map(|e| e.0).collect();
        assert_eq!(ids, (1..=10).collect::<Vec<_>>());
        let alone = messages.iter().find(|m| m.len() > 5000).unwrap();
        assert_eq!(events_of(alone).len(), 1);
        assert!(messages.iter().filter(|m| m.len() < 5000).all(|m| m.len() <= 400));
    }

    #[test]
    fn a_cut_or_padded_chunk_is_refused_not_misread() {
        let message = &chunks(&[ev(1, Some("id=1")), ev(2, Some("id=2"))], 1 << 20)[0];
        for cut in [1, 3, 10, message.len() - 1] {
            assert!(decode(&message[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = message.clone();
        padded.push(b'x');
        assert_eq!(decode(&padded).unwrap_err(), Malformed("a chunk longer than it says"));
        let mut count = message.clone();
        count[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&count).is_err());
        let mut bad_text = message.clone();
        let at = bad_text.len() - 1;
        bad_text[at] = 0xff;
        assert_eq!(decode(&bad_text).unwrap_err(), Malformed("text that is not UTF-8"));
    }

    #[test]
    fn rows_that_decode_are_sent_decoded_the_others_as_stored() {
        use crate::decode::{parse_row, predecoded, Format};

        let mut truncate = ev(4, None);
        truncate.ev_type = Some("R".into());
        let sent = [ev(1, Some("id=1&name=J%C3%BCrgen+M&t=a%09b")), ev(2, Some("id=%zz")), ev(3, None), truncate];
        let messages = chunks_predecoding(&sent, true, 1 << 20);
        let Incoming::Chunk(back) = decode(&messages[0]).unwrap() else { panic!("not a chunk") };
        assert_eq!(back.iter().map(|e| e.predecoded).collect::<Vec<_>>(), [true, false, false, false]);
        let row = predecoded::parse(back[0].ev_data.as_deref().unwrap()).unwrap();
        let text = |row: crate::decode::Row| -> Vec<(String, Option<String>)> {
            row.iter().map(|(n, v)| (n.to_string(), v.map(|v| v.decoded().into_owned()))).collect()
        };
        let want = text(parse_row(Format::Url, sent[0].ev_data.as_deref()).unwrap());
        assert_eq!(want[1], ("name".to_string(), Some("Jürgen M".to_string())));
        assert_eq!(text(row), want);
        for i in 1..4 {
            assert_eq!(back[i].ev_data, sent[i].ev_data);
            assert_eq!(back[i].ev_type, sent[i].ev_type);
        }
        // not asked: all as stored
        let stored = chunks(&sent, 1 << 20);
        let Incoming::Chunk(plain) = decode(&stored[0]).unwrap() else { panic!("not a chunk") };
        assert!(plain.iter().zip(&sent).all(|(b, s)| !b.predecoded && b.ev_data == s.ev_data));
        // a flag other than 0 or 1, or set on a NULL ev_data, is refused
        let mut bad = messages[0].clone();
        bad[5 + 8] = 2;
        assert_eq!(decode(&bad).unwrap_err(), Malformed("an event with a bad flag"));
        let mut bad = messages[0].clone();
        bad[5 + 2 * FIELD + 8] = 1;
        assert_eq!(decode(&bad).unwrap_err(), Malformed("an event with a bad flag"));
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let ask = ToHelper {
            written_upto: 0x1_0000_0042,
            conninfo: "dbname=source password=secret".into(),
            lifetime_secs: 1200.0,
            ask: Ask::Next(BatchRequest {
                queue: "q".into(),
                consumer: "c".into(),
                dateformat: Some("YYYY_MM_DD".into()),
                min_count: Some(10),
                ordered: true,
                ..Default::default()
            }),
        };
        assert_eq!(decode_request(&encode(&ask)).unwrap(), ask);
        let reply = Reply::Failed { sqlstate: 42, message: "boom".into() };
        match decode(&encode(&reply)).unwrap() {
            Incoming::Reply(r) => assert_eq!(r, reply),
            other => panic!("{other:?}"),
        }
        assert!(decode_request(b"Cxxxx").is_err());
        assert!(decode(b"").is_err());
    }
}
