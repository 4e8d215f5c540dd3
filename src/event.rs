//! The event as PgQ stores it, the unit every module passes along: read by source, written by
//! apply, parked by state.

use std::borrow::Cow;

/// Where a batch's events come from, a chunk at a time. The chunk is lent to `f` only: events
/// borrow their text from the fetched result.
pub trait Chunks {
    /// Hands the next chunk to `f` and returns what it returned; None when the batch is done.
    fn next_chunk<R>(&mut self, f: impl FnOnce(&[RawEvent]) -> R) -> Option<R>;
}

/// An event as PgQ stores it, before decoding. Events read from the source borrow their text
/// from the fetched result instead of copying it.
#[derive(Debug, Clone)]
pub struct RawEvent<'a> {
    pub ev_id: i64,
    pub ev_time: Option<Cow<'a, str>>,
    pub ev_type: Option<Cow<'a, str>>,
    pub ev_data: Option<Cow<'a, str>>,
    pub ev_extra1: Option<Cow<'a, str>>,
    /// ev_data holds the row decoded already by a receiving helper (`decode::predecoded`), not
    /// as the trigger encoded it
    pub predecoded: bool,
}

impl RawEvent<'_> {
    /// A copy that owns its text, to keep beyond the fetched result it came from.
    pub fn to_owned_event(&self) -> RawEvent<'static> {
        let own = |v: &Option<Cow<str>>| v.as_deref().map(|s| Cow::Owned(s.to_string()));
        RawEvent {
            ev_id: self.ev_id,
            ev_time: own(&self.ev_time),
            ev_type: own(&self.ev_type),
            ev_data: own(&self.ev_data),
            ev_extra1: own(&self.ev_extra1),
            predecoded: self.predecoded,
        }
    }
}
