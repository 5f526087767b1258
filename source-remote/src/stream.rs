//! Reading an event stream off a response body with a silence limit, and the reconnect
//! delay.

use std::collections::VecDeque;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::sse::{Item, Parser};

/// Why reading a stream stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// Nothing arrived, not even a ping, for the silence limit.
    Silent,
    /// The connection broke.
    Broken,
    /// One event was larger than the limit.
    TooLarge,
}

impl ReadError {
    /// A sentence for a person (no address, no id), worded for a remote runtime.
    pub(crate) fn message(&self) -> &'static str {
        match self {
            ReadError::Silent => {
                "the remote runtime went silent for longer than `heartbeat_timeout`; reconnecting"
            }
            ReadError::Broken => "the connection to the remote runtime broke; reconnecting",
            ReadError::TooLarge => {
                "the remote runtime sent an event larger than `max_event_bytes`; reconnecting"
            }
        }
    }
}

/// An event stream being read: a body, a parser, and what it produced but was not taken yet.
/// The `remote` source reads its upstream with it, and `roster`'s command-line client reads
/// the server's streams with it.
pub struct EventReader {
    body: Incoming,
    parser: Parser,
    ready: VecDeque<Item>,
    scratch: Vec<Item>,
    silence: Duration,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader")
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl EventReader {
    /// A reader of `body`: one event may hold at most `max_event_bytes`, and `silence`
    /// without a byte (pings included) counts as a dead connection.
    pub fn new(body: Incoming, max_event_bytes: usize, silence: Duration) -> Self {
        EventReader {
            body,
            parser: Parser::new(max_event_bytes),
            ready: VecDeque::new(),
            scratch: Vec::new(),
            silence,
        }
    }

    /// The next item; `Ok(None)` when the remote ended the stream (an event it left
    /// unfinished is dropped, as the event-stream rules say).
    pub async fn next(&mut self) -> Result<Option<Item>, ReadError> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Ok(Some(item));
            }
            let frame = match tokio::time::timeout(self.silence, self.body.frame()).await {
                Err(_) => return Err(ReadError::Silent),
                Ok(None) => {
                    self.parser.finish();
                    return Ok(None);
                }
                Ok(Some(Err(_))) => return Err(ReadError::Broken),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.parser
                .feed(&data, &mut self.scratch)
                .map_err(|_| ReadError::TooLarge)?;
            self.ready.extend(self.scratch.drain(..));
        }
    }
}

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(cap, base · 2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays from `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit_random())
    }

    /// Back to the first delay, after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniform number in `[0, 1]`.
fn unit_random() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 1.0;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        let mut b = Backoff::new(base, cap);
        let mut ceilings = Vec::new();
        for n in 0..10u32 {
            let ceiling = (base * 2u32.pow(n)).min(cap);
            let d = b.next_delay();
            assert!(d <= ceiling, "attempt {n}: {d:?} > {ceiling:?}");
            ceilings.push(ceiling);
        }
        assert_eq!(ceilings.last(), Some(&cap));
        b.reset();
        assert!(b.next_delay() <= base);
        // Full jitter: delays spread over the whole range, not bunched at the ceiling.
        let mut b = Backoff::new(cap, cap);
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(delays.iter().any(|d| *d < cap / 4), "{delays:?}");
        assert!(delays.iter().any(|d| *d > cap * 3 / 4), "{delays:?}");
    }
}
