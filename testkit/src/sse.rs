//! Reading a server's Server-Sent-Events streams in tests: events decoded with the parser
//! `source-remote` follows its upstream with (`source_remote::SseParser`), and a client over a
//! hyper response that keeps every byte it got.
//!
//! An event's `id` is `None` when no `id:` field was given on the stream yet (the SSE "last
//! event id" is empty): roster writes `id:` on every event but a `shutdown` of a stream that
//! has no position, so this is the same as "the event had no `id:` line".

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use source_remote::{SseItem, SseParser};

use crate::server::Seen;
use crate::WAIT;

/// The most bytes one event may hold in a test.
const MAX_EVENT_BYTES: usize = 16 << 20;

/// One event of a stream, its data parsed as JSON.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// The stream's last event id at this event; `None` while none was given.
    pub id: Option<String>,
    /// The event's type.
    pub event: String,
    /// The event's data.
    pub data: Value,
}

/// Bytes of a stream in, events out (comments and `retry:` skipped). Bounded: an event of
/// more than 16 MiB is an error.
#[derive(Debug)]
pub struct SseDecoder {
    parser: SseParser,
    items: Vec<SseItem>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder {
            parser: SseParser::new(MAX_EVENT_BYTES),
            items: Vec::new(),
        }
    }
}

impl SseDecoder {
    /// Feeds `bytes`; returns the events they completed, in order. An event whose data is
    /// not JSON is an error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>> {
        self.parser
            .feed(bytes, &mut self.items)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut events = Vec::new();
        for item in self.items.drain(..) {
            if let SseItem::Event(ev) = item {
                let data = serde_json::from_str(&ev.data)
                    .with_context(|| format!("data is not JSON: {}", ev.data))?;
                events.push(SseEvent {
                    id: (!ev.id.is_empty()).then_some(ev.id),
                    event: ev.event,
                    data,
                });
            }
        }
        Ok(events)
    }
}

/// The events of a whole stream's text.
pub fn parse_events(text: &str) -> Result<Vec<SseEvent>> {
    SseDecoder::default().feed(text.as_bytes())
}

/// A streaming SSE reader that keeps every byte it saw (for leak searches).
#[derive(Debug)]
pub struct SseClient {
    /// The response's headers.
    pub headers: HeaderMap,
    body: Incoming,
    decoder: SseDecoder,
    ready: std::collections::VecDeque<SseEvent>,
    /// Every byte received so far.
    pub raw: Vec<u8>,
    seen: Seen,
    ended: bool,
}

impl SseClient {
    /// A reader of `resp`'s body that also records what it reads in `seen`.
    pub fn new(resp: hyper::Response<Incoming>, seen: Seen) -> SseClient {
        SseClient {
            headers: resp.headers().clone(),
            body: resp.into_body(),
            decoder: SseDecoder::default(),
            ready: Default::default(),
            raw: Vec::new(),
            seen,
            ended: false,
        }
    }

    /// The next event (comments and `retry:` skipped), `None` when the server closed the
    /// stream; fails after `timeout`.
    pub async fn next_event_within(&mut self, timeout: Duration) -> Result<Option<SseEvent>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Ok(Some(ev));
            }
            if self.ended {
                return Ok(None);
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .context("no event in time")?;
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.raw.extend_from_slice(&data);
                        self.seen.record(&data);
                        let events = self.decoder.feed(&data)?;
                        self.ready.extend(events);
                    }
                }
                Some(Err(e)) => bail!("stream error: {e}"),
                None => self.ended = true,
            }
        }
    }

    /// [`Self::next_event_within`] with [`WAIT`]; fails when the stream ends.
    pub async fn next_event(&mut self) -> Result<SseEvent> {
        self.next_event_within(WAIT)
            .await?
            .context("the stream ended")
    }

    /// Reads events up to and including the first one for which `last` holds; returns them
    /// all. Each must come within [`WAIT`].
    pub async fn read_until(&mut self, last: impl Fn(&SseEvent) -> bool) -> Result<Vec<SseEvent>> {
        let mut events = Vec::new();
        loop {
            let ev = self.next_event().await?;
            let done = last(&ev);
            events.push(ev);
            if done {
                return Ok(events);
            }
        }
    }

    /// Reads until the stream closes (or `timeout`), returning the remaining events.
    pub async fn rest(&mut self, timeout: Duration) -> Result<Vec<SseEvent>> {
        let mut out = Vec::new();
        while let Some(ev) = self.next_event_within(timeout).await? {
            out.push(ev);
        }
        Ok(out)
    }

    /// The raw text received so far.
    pub fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_feeds_come_out_whole_with_their_ids() {
        let mut d = SseDecoder::default();
        assert!(
            d.feed(b": ping\n\nevent: shutdown\ndata: {}\n\nid: 7\nevent: out")
                .unwrap()
                .len()
                == 1
        );
        let events = d.feed(b"put\ndata: {\"seq\":7}\n\n").unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id.as_deref(), Some("7"));
        assert_eq!(events[0].event, "output");
        assert_eq!(events[0].data["seq"], 7);
        let first = parse_events("event: shutdown\ndata: {}\n\n").unwrap();
        assert_eq!(first[0].id, None);
    }

    #[test]
    fn data_that_is_not_json_is_an_error() {
        assert!(parse_events("event: x\ndata: nope\n\n").is_err());
    }
}
