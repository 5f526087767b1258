//! A Server-Sent-Events parser: the "event stream interpretation" of the WHATWG HTML
//! standard (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>),
//! fed with raw bytes in chunks of any size and split anywhere.
//!
//! Rules followed:
//!
//! - The stream is UTF-8, decoded with replacement (invalid sequences become U+FFFD). Each
//!   line is decoded once it is complete, so a multi-byte character split across chunks is
//!   decoded correctly. One U+FEFF byte order mark at the very start of the stream is dropped
//!   (also when it arrives split across chunks); any later U+FEFF is ordinary text.
//! - A line ends with CRLF, LF or a lone CR. A CR at the end of one chunk followed by an LF at
//!   the start of the next is one line break.
//! - A blank line dispatches the pending event. When the data buffer is empty nothing is
//!   dispatched and the data and event type buffers are reset. Otherwise one trailing LF is
//!   removed from the data, the type is the event type buffer or `"message"` when that is
//!   empty, the id is the last event id buffer, and the data and event type buffers are reset
//!   (the last event id buffer is kept).
//! - A line starting with `:` is a comment, reported as [`Item::Comment`].
//! - Otherwise the line is `field:value`, where one space right after the first `:` is
//!   removed from the value; a line without `:` is a field with an empty value.
//! - `event` sets the event type buffer; `data` appends the value and an LF to the data buffer;
//!   `id` sets the last event id buffer unless the value contains U+0000 (an empty value sets
//!   it to the empty string); `retry` whose value is only ASCII digits is reported as
//!   [`Item::Retry`] (other values, and values too large for a `u64`, are ignored). Every
//!   other field is ignored.
//! - At the end of the stream ([`Parser::finish`]) an incomplete line and an event not yet
//!   dispatched by a blank line are discarded.
//!
//! Bounds: the bytes held for one event — the current incomplete line, the data buffer and
//! the event type buffer — are capped by the `max_event_bytes` given to [`Parser::new`].
//! Exceeding the cap makes [`Parser::feed`] return [`TooLarge`]; the parser then refuses all
//! further input. A long stream of events that are each within the cap is never an error.

use std::borrow::Cow;
use std::fmt;

/// The UTF-8 encoding of U+FEFF, the byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event type ("message" when no `event:` field was given).
    pub event: String,
    /// The data lines joined with '\n' (the final '\n' removed).
    pub data: String,
    /// The last event id buffer at dispatch time (persists across events, "" if never set).
    pub id: String,
}

/// What feeding bytes produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event.
    Event(Event),
    /// A comment line: all of its text after the leading `:`, a leading space included (the
    /// line `: ping` gives `" ping"`). Useful as a heartbeat.
    Comment(String),
    /// A valid `retry:` field: the reconnection time in milliseconds.
    Retry(u64),
}

/// Too much data without a dispatch: the bytes held for one event exceeded the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    /// The limit that was exceeded, in bytes (the `max_event_bytes` of [`Parser::new`]).
    pub limit: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server-sent event exceeds the limit of {} bytes",
            self.limit
        )
    }
}

impl std::error::Error for TooLarge {}

/// An incremental event stream parser: bytes in, [`Item`]s out.
///
/// After [`Parser::finish`] the same parser can read a new stream (for example after a
/// reconnection): the last event id is kept and a byte order mark at the start of the new
/// stream is dropped again.
pub struct Parser {
    /// The cap on `line.len() + data.len() + event_type.len()`.
    max_event_bytes: usize,
    /// The bytes of the current line, not yet terminated (undecoded).
    line: Vec<u8>,
    /// The data buffer.
    data: String,
    /// The event type buffer.
    event_type: String,
    /// The last event id buffer.
    last_event_id: String,
    /// The previous chunk ended with a CR that ended a line: an LF starting the next chunk
    /// belongs to that line break.
    pending_cr: bool,
    /// No line of the current stream has been completed yet, so a byte order mark at the
    /// start of the next completed line is dropped.
    at_stream_start: bool,
    /// The limit was exceeded; every further `feed` fails.
    failed: bool,
}

impl fmt::Debug for Parser {
    // Only sizes: the buffers may hold secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parser")
            .field("max_event_bytes", &self.max_event_bytes)
            .field("line_bytes", &self.line.len())
            .field("data_bytes", &self.data.len())
            .field("event_type_bytes", &self.event_type.len())
            .field("last_event_id_bytes", &self.last_event_id.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl Parser {
    /// A parser for a new stream. `max_event_bytes` bounds the bytes buffered for one event
    /// (current line + data buffer + event type); exceeding it makes [`Parser::feed`] return
    /// [`TooLarge`], after which the parser must not be used further: every later `feed`
    /// fails again (create a new parser for a new stream).
    pub fn new(max_event_bytes: usize) -> Self {
        Parser {
            max_event_bytes,
            line: Vec::new(),
            data: String::new(),
            event_type: String::new(),
            last_event_id: String::new(),
            pending_cr: false,
            at_stream_start: true,
            failed: false,
        }
    }

    /// Feeds a chunk (chunks split anywhere: inside a line, between CR and LF, inside a
    /// multi-byte UTF-8 char, inside the BOM) and appends what it produced to `out`.
    ///
    /// On [`TooLarge`], the items produced from the chunk before the limit was exceeded have
    /// been appended to `out`, and the parser must not be used further.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Item>) -> Result<(), TooLarge> {
        if self.failed {
            return Err(self.too_large());
        }
        let mut rest = bytes;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while !rest.is_empty() {
            let Some(end) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
                // No line break in the rest of the chunk: keep it for the next one.
                self.check(rest.len())?;
                self.line.extend_from_slice(rest);
                break;
            };
            let segment = &rest[..end];
            self.check(segment.len())?;
            if self.line.is_empty() {
                self.process_line(segment, out);
            } else {
                self.line.extend_from_slice(segment);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, out);
                self.line = line;
                self.line.clear();
            }
            // Room for a CR or LF that `process_line` added beyond the line's bytes, and for
            // bytes added by replacing invalid UTF-8.
            self.check(0)?;
            let mut next = end + 1;
            if rest[end] == b'\r' {
                match rest.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
            rest = &rest[next..];
        }
        Ok(())
    }

    /// The stream ended: per WHATWG, an event not terminated by a blank line is discarded
    /// (as is an incomplete last line). Resets per-event state: the current line, the data
    /// buffer and the event type buffer. The last event id buffer is kept, and the parser is
    /// ready for a new stream (whose leading byte order mark is dropped again).
    pub fn finish(&mut self) {
        self.line = Vec::new();
        self.data = String::new();
        self.event_type = String::new();
        self.pending_cr = false;
        self.at_stream_start = true;
    }

    /// The last event id buffer ("" if none).
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    fn too_large(&self) -> TooLarge {
        TooLarge {
            limit: self.max_event_bytes,
        }
    }

    /// Fails (for good) when `extra` more line bytes would exceed the limit.
    fn check(&mut self, extra: usize) -> Result<(), TooLarge> {
        let held = self
            .line
            .len()
            .saturating_add(self.data.len())
            .saturating_add(self.event_type.len())
            .saturating_add(extra);
        if held > self.max_event_bytes {
            self.failed = true;
            self.line = Vec::new();
            self.data = String::new();
            self.event_type = String::new();
            return Err(self.too_large());
        }
        Ok(())
    }

    /// Interprets one complete line (without its line break).
    fn process_line(&mut self, mut line: &[u8], out: &mut Vec<Item>) {
        if self.at_stream_start {
            self.at_stream_start = false;
            if let Some(stripped) = line.strip_prefix(BOM) {
                line = stripped;
            }
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        let line: Cow<'_, str> = String::from_utf8_lossy(line);
        if let Some(comment) = line.strip_prefix(':') {
            out.push(Item::Comment(comment.to_owned()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        match field {
            "event" => {
                self.event_type.clear();
                self.event_type.push_str(value);
            }
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            // An id containing U+0000 is ignored (falls through to the last arm).
            "id" if !value.contains('\0') => {
                self.last_event_id.clear();
                self.last_event_id.push_str(value);
            }
            // Only ASCII digits (`parse` alone would accept a leading '+'); the one
            // remaining failure, overflow, is ignored. Other values fall through.
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse::<u64>() {
                    out.push(Item::Retry(ms));
                }
            }
            _ => {}
        }
    }

    /// A blank line: dispatches the pending event, if any.
    fn dispatch(&mut self, out: &mut Vec<Item>) {
        if self.data.is_empty() {
            self.event_type.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        let event_type = std::mem::take(&mut self.event_type);
        let event = if event_type.is_empty() {
            "message".to_owned()
        } else {
            event_type
        };
        out.push(Item::Event(Event {
            event,
            data,
            id: self.last_event_id.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = 1 << 20;

    fn ev(event: &str, data: &str, id: &str) -> Item {
        Item::Event(Event {
            event: event.to_owned(),
            data: data.to_owned(),
            id: id.to_owned(),
        })
    }

    fn msg(data: &str) -> Item {
        ev("message", data, "")
    }

    fn comment(text: &str) -> Item {
        Item::Comment(text.to_owned())
    }

    /// Feeds the chunks in order, then finishes the stream.
    fn parse_chunks(chunks: &[&[u8]]) -> Vec<Item> {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out).unwrap();
        }
        parser.finish();
        out
    }

    fn parse(bytes: &[u8]) -> Vec<Item> {
        parse_chunks(&[bytes])
    }

    // --- The examples of the WHATWG specification ---

    #[test]
    fn spec_stock_example() {
        let stream = b"data: YHOO\ndata: +2\ndata: 10\n\n";
        assert_eq!(parse(stream), vec![msg("YHOO\n+2\n10")]);
    }

    #[test]
    fn spec_four_blocks_example() {
        let stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n";
        assert_eq!(
            parse(stream),
            vec![
                comment(" test stream"),
                ev("message", "first event", "1"),
                ev("message", "second event", ""),
                // Not dispatched: no blank line after the last block.
            ]
        );
        let mut terminated = stream.to_vec();
        terminated.push(b'\n');
        assert_eq!(
            parse(&terminated),
            vec![
                comment(" test stream"),
                ev("message", "first event", "1"),
                ev("message", "second event", ""),
                ev("message", " third event", ""),
            ]
        );
    }

    #[test]
    fn spec_empty_data_example() {
        // Two events: "" and "\n"; the last block has no blank line after it.
        let stream = b"data\n\ndata\ndata\n\ndata:";
        assert_eq!(parse(stream), vec![msg(""), msg("\n")]);
    }

    #[test]
    fn spec_space_after_colon_example() {
        let stream = b"data:test\n\ndata: test\n\n";
        assert_eq!(parse(stream), vec![msg("test"), msg("test")]);
    }

    #[test]
    fn spec_event_types_example() {
        let stream = b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n";
        assert_eq!(
            parse(stream),
            vec![
                ev("add", "73857293", ""),
                ev("remove", "2153", ""),
                ev("add", "113411", ""),
            ]
        );
    }

    #[test]
    fn spec_data_with_two_lines_example() {
        let stream = b"data: This is the first message.\n\ndata: This is the second message, it\ndata: has two lines.\n\ndata: This is the third message.\n\n";
        assert_eq!(
            parse(stream),
            vec![
                msg("This is the first message."),
                msg("This is the second message, it\nhas two lines."),
                msg("This is the third message."),
            ]
        );
    }

    // --- Data, event types, dispatch ---

    #[test]
    fn multi_line_data() {
        let stream = b"data: a\ndata:\ndata: b\ndata:  c\n\n";
        assert_eq!(parse(stream), vec![msg("a\n\nb\n c")]);
    }

    #[test]
    fn only_one_space_and_only_the_first_colon() {
        let stream = b"data:  two spaces\n\ndata:a:b: c\n\ndata:\tx\n\n";
        assert_eq!(
            parse(stream),
            vec![msg(" two spaces"), msg("a:b: c"), msg("\tx")]
        );
    }

    #[test]
    fn blank_line_without_data_resets_event_type() {
        let stream = b"event: first\n\ndata: x\n\n";
        assert_eq!(parse(stream), vec![msg("x")]);
    }

    #[test]
    fn empty_event_type_is_message() {
        let stream = b"event:\ndata: x\n\nevent: a\nevent: b\ndata: y\n\n";
        assert_eq!(parse(stream), vec![msg("x"), ev("b", "y", "")]);
    }

    #[test]
    fn event_type_is_reset_after_dispatch() {
        let stream = b"event: ping\ndata: 1\n\ndata: 2\n\n";
        assert_eq!(parse(stream), vec![ev("ping", "1", ""), msg("2")]);
    }

    #[test]
    fn several_blank_lines_dispatch_once() {
        let stream = b"\n\n\ndata: x\n\n\n\n";
        assert_eq!(parse(stream), vec![msg("x")]);
    }

    #[test]
    fn field_without_colon() {
        // `data` alone appends an empty line; `event` alone sets the empty type.
        let stream = b"event: a\nevent\ndata\ndata\n\ndata\n\n";
        assert_eq!(parse(stream), vec![msg("\n"), msg("")]);
    }

    #[test]
    fn unknown_fields_ignored() {
        let stream = b"foo: bar\nData: x\nDATA: y\ndata : z\nevent_: e\ndata: kept\nbar\n\n";
        assert_eq!(parse(stream), vec![msg("kept")]);
        // A block with only unknown fields dispatches nothing.
        assert_eq!(parse(b"foo: bar\n\n"), vec![]);
    }

    #[test]
    fn field_names_with_leading_space_are_unknown() {
        assert_eq!(parse(b" data: x\n\n"), vec![]);
    }

    // --- Line endings ---

    #[test]
    fn lf_line_endings() {
        assert_eq!(parse(b"data: a\ndata: b\n\n"), vec![msg("a\nb")]);
    }

    #[test]
    fn cr_line_endings() {
        assert_eq!(
            parse(b"data: a\rdata: b\r\rdata: c\r\r"),
            vec![msg("a\nb"), msg("c")]
        );
    }

    #[test]
    fn crlf_line_endings() {
        assert_eq!(
            parse(b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"),
            vec![msg("a\nb"), msg("c")]
        );
    }

    #[test]
    fn mixed_line_endings() {
        // LF, CR, CRLF; then a blank line by CR, and LF CR = two line breaks.
        let stream = b"data: a\ndata: b\rdata: c\r\n\rdata: d\n\revent: e\r\ndata: f\r\n\n";
        assert_eq!(
            parse(stream),
            vec![msg("a\nb\nc"), msg("d"), ev("e", "f", "")]
        );
    }

    #[test]
    fn cr_cr_lf_is_two_breaks() {
        // "\r\r\n": CR, then CRLF: the second break is the blank line.
        assert_eq!(parse(b"data: a\r\r\ndata: b\n\n"), vec![msg("a"), msg("b")]);
    }

    #[test]
    fn crlf_split_across_chunks() {
        // The LF after a chunk-final CR must not count as a second (blank) line.
        let items = parse_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(items, vec![msg("a\nb")]);
    }

    #[test]
    fn chunk_final_cr_then_other_byte() {
        let items = parse_chunks(&[b"data: a\r", b"data: b\r", b"\r"]);
        assert_eq!(items, vec![msg("a\nb")]);
    }

    #[test]
    fn chunk_final_cr_survives_empty_chunks() {
        let items = parse_chunks(&[b"data: a\r", b"", b"", b"\n", b"\r\n"]);
        assert_eq!(items, vec![msg("a")]);
    }

    // --- Splitting ---

    /// A stream that exercises every rule: BOM, all line endings, multi-byte characters,
    /// invalid UTF-8, comments, ids, retry, unknown fields, fields without colon.
    const RICH: &[u8] = b"\xEF\xBB\xBF: hello \xE2\x9C\x93\r\n\
retry: 2500\r\
event: greet\n\
data: h\xC3\xA9llo \xF0\x9F\x98\x80\r\n\
data:  w\xE2\x82\xACrld\r\
id: 42\n\
\r\n\
data\r\
foo: bar\n\
data: bad \xFF\xC3 end\r\r\
id\n\
:\n\
data: after reset\n\n\
retry: 1a\r\n\
id: nul\x00x\r\n\
data: last\r\n\r\n\
data: incomplete\r\n";

    fn rich_expected() -> Vec<Item> {
        vec![
            comment(" hello \u{2713}"),
            Item::Retry(2500),
            ev("greet", "h\u{e9}llo \u{1F600}\n w\u{20AC}rld", "42"),
            ev("message", "\nbad \u{FFFD}\u{FFFD} end", "42"),
            comment(""),
            ev("message", "after reset", ""),
            ev("message", "last", ""),
        ]
    }

    #[test]
    fn rich_stream_whole() {
        assert_eq!(parse(RICH), rich_expected());
    }

    #[test]
    fn every_two_way_split_matches_whole() {
        let whole = parse(RICH);
        for i in 0..=RICH.len() {
            let (a, b) = RICH.split_at(i);
            assert_eq!(parse_chunks(&[a, b]), whole, "split at {i}");
        }
    }

    #[test]
    fn every_three_way_split_matches_whole() {
        let whole = parse(RICH);
        for i in 0..=RICH.len() {
            for j in i..=RICH.len() {
                let chunks = [&RICH[..i], &RICH[i..j], &RICH[j..]];
                assert_eq!(parse_chunks(&chunks), whole, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn byte_by_byte_matches_whole() {
        let chunks: Vec<&[u8]> = RICH.chunks(1).collect();
        assert_eq!(parse_chunks(&chunks), parse(RICH));
    }

    #[test]
    fn items_appear_as_soon_as_the_blank_line_arrives() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser.feed(b"data: a\n", &mut out).unwrap();
        assert_eq!(out, vec![]);
        parser.feed(b"\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("a")]);
        // A lone CR is a complete line break at once: no waiting for a possible LF.
        parser.feed(b"data: b\r\r", &mut out).unwrap();
        assert_eq!(out, vec![msg("a"), msg("b")]);
        parser.feed(b": c\r", &mut out).unwrap();
        assert_eq!(out, vec![msg("a"), msg("b"), comment(" c")]);
    }

    // --- Comments ---

    #[test]
    fn comments() {
        let stream = b": heartbeat\n:\n:no space\n::double\ndata: x\n: inside an event\n\n";
        assert_eq!(
            parse(stream),
            vec![
                comment(" heartbeat"),
                comment(""),
                comment("no space"),
                comment(":double"),
                comment(" inside an event"),
                msg("x"),
            ]
        );
    }

    #[test]
    fn comment_only_stream_dispatches_nothing() {
        assert_eq!(parse(b":\n\n:\n\n"), vec![comment(""), comment("")]);
    }

    // --- Ids ---

    #[test]
    fn id_without_data_updates_buffer_only() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser.feed(b"id: 7\n\n", &mut out).unwrap();
        assert_eq!(out, vec![]);
        assert_eq!(parser.last_event_id(), "7");
        parser.feed(b"data: x\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev("message", "x", "7")]);
    }

    #[test]
    fn id_persists_across_events() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        assert_eq!(parser.last_event_id(), "");
        parser
            .feed(
                b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\ndata: d\nid: 3\n\n",
                &mut out,
            )
            .unwrap();
        assert_eq!(
            out,
            vec![
                ev("message", "a", "1"),
                ev("message", "b", "1"),
                ev("message", "c", "2"),
                // The id set within the block applies to its own event.
                ev("message", "d", "3"),
            ]
        );
        assert_eq!(parser.last_event_id(), "3");
    }

    #[test]
    fn id_with_nul_ignored() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser
            .feed(b"id: good\n\nid: b\x00d\ndata: x\n\n", &mut out)
            .unwrap();
        assert_eq!(out, vec![ev("message", "x", "good")]);
        assert_eq!(parser.last_event_id(), "good");
    }

    #[test]
    fn empty_id_resets() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser
            .feed(
                b"id: 5\ndata: a\n\nid:\ndata: b\n\nid: 6\n\nid\ndata: c\n\n",
                &mut out,
            )
            .unwrap();
        assert_eq!(
            out,
            vec![
                ev("message", "a", "5"),
                ev("message", "b", ""),
                ev("message", "c", ""),
            ]
        );
        assert_eq!(parser.last_event_id(), "");
    }

    #[test]
    fn id_keeps_spaces_after_the_first() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser.feed(b"id:  a b \n\n", &mut out).unwrap();
        assert_eq!(parser.last_event_id(), " a b ");
    }

    #[test]
    fn id_kept_across_finish() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser
            .feed(b"id: 9\ndata: a\n\ndata: lost\n", &mut out)
            .unwrap();
        parser.finish();
        assert_eq!(parser.last_event_id(), "9");
        parser.feed(b"data: b\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev("message", "a", "9"), ev("message", "b", "9")]);
    }

    // --- Retry ---

    #[test]
    fn retry_valid() {
        let stream = b"retry: 10\nretry:0\nretry:3000\nretry: 18446744073709551615\n";
        assert_eq!(
            parse(stream),
            vec![
                Item::Retry(10),
                Item::Retry(0),
                Item::Retry(3000),
                Item::Retry(u64::MAX),
            ]
        );
    }

    #[test]
    fn retry_invalid_ignored() {
        let stream = b"retry: 1a\nretry:\nretry\nretry:  10\nretry: +10\nretry: -1\nretry: 1.5\nretry: 10 \nretry: \xD9\xA1\nretry: 18446744073709551616\nretry: 99999999999999999999999\n";
        assert_eq!(parse(stream), vec![]);
    }

    #[test]
    fn retry_does_not_affect_the_event() {
        let stream = b"data: a\nretry: 5\ndata: b\n\n";
        assert_eq!(parse(stream), vec![Item::Retry(5), msg("a\nb")]);
    }

    // --- Byte order mark and UTF-8 ---

    #[test]
    fn leading_bom_dropped() {
        assert_eq!(parse(b"\xEF\xBB\xBFdata: x\n\n"), vec![msg("x")]);
        // A BOM alone on the first line leaves a blank line.
        assert_eq!(parse(b"\xEF\xBB\xBF\ndata: y\n\n"), vec![msg("y")]);
    }

    #[test]
    fn bom_split_across_chunks() {
        let items = parse_chunks(&[b"\xEF", b"\xBB", b"\xBFdata: x\n\n"]);
        assert_eq!(items, vec![msg("x")]);
        let items = parse_chunks(&[b"\xEF\xBB", b"\xBF", b"data: y\n", b"\n"]);
        assert_eq!(items, vec![msg("y")]);
    }

    #[test]
    fn second_bom_not_dropped() {
        // The second BOM is part of the field name "\u{FEFF}data": an unknown field.
        assert_eq!(parse(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"), vec![]);
        assert_eq!(
            parse_chunks(&[b"\xEF\xBB\xBF", b"\xEF\xBB\xBF", b"data: x\n\n"]),
            vec![]
        );
    }

    #[test]
    fn bom_after_start_not_dropped() {
        assert_eq!(parse(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"), vec![msg("a")]);
        // In a value it is kept as text.
        assert_eq!(parse(b"data: \xEF\xBB\xBFb\n\n"), vec![msg("\u{FEFF}b")]);
    }

    #[test]
    fn partial_bom_is_not_a_bom() {
        // The first two bytes of a BOM followed by other bytes: invalid UTF-8.
        assert_eq!(parse(b"\xEF\xBBdata: x\n\ndata: y\n\n"), vec![msg("y")]);
    }

    #[test]
    fn bom_dropped_again_after_finish() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser.feed(b"\xEF\xBB\xBFdata: a\n\n", &mut out).unwrap();
        parser.finish();
        parser.feed(b"\xEF\xBB\xBFdata: b\n\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("a"), msg("b")]);
    }

    #[test]
    fn invalid_utf8_replaced() {
        let stream = b"data: a\xFFb\n\ndata: \xC3(\n\ndata: \xE2\x82\n\nevent: \xF0\x9F\x98\ndata: \xED\xA0\x80\n\n";
        assert_eq!(
            parse(stream),
            vec![
                msg("a\u{FFFD}b"),
                msg("\u{FFFD}("),
                // A truncated sequence is one replacement character.
                msg("\u{FFFD}"),
                // A surrogate encoding is invalid byte by byte.
                ev("\u{FFFD}", "\u{FFFD}\u{FFFD}\u{FFFD}", ""),
            ]
        );
    }

    #[test]
    fn invalid_utf8_in_field_name_makes_it_unknown() {
        assert_eq!(parse(b"dat\xE1: x\n\ndata: y\n\n"), vec![msg("y")]);
    }

    #[test]
    fn multibyte_split_across_chunks() {
        // "é" is C3 A9; "😀" is F0 9F 98 80.
        let items = parse_chunks(&[b"data: \xC3", b"\xA9 \xF0\x9F", b"\x98", b"\x80\n\n"]);
        assert_eq!(items, vec![msg("\u{e9} \u{1F600}")]);
    }

    // --- End of stream ---

    #[test]
    fn finish_discards_unterminated_event() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser.feed(b"data: a\n\ndata: b\n", &mut out).unwrap();
        parser.finish();
        assert_eq!(out, vec![msg("a")]);
        // The discarded data does not leak into the next stream.
        parser.feed(b"data: c\n\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("a"), msg("c")]);
    }

    #[test]
    fn finish_discards_incomplete_line_and_event_type() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser.feed(b"event: t\ndata: partial", &mut out).unwrap();
        parser.finish();
        parser.feed(b"data: x\n\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("x")]);
    }

    #[test]
    fn finish_forgets_pending_cr() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser.feed(b"data: a\r", &mut out).unwrap();
        parser.finish();
        // The LF starting the new stream is a line break of its own: a blank line.
        parser.feed(b"\ndata: b\n\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("b")]);
    }

    #[test]
    fn stream_without_final_blank_line_in_one_chunk() {
        assert_eq!(parse(b"data: a\n\ndata: b"), vec![msg("a")]);
        assert_eq!(parse(b"data: a\n\ndata: b\r"), vec![msg("a")]);
    }

    // --- Limit ---

    #[test]
    fn too_large_data_across_many_lines() {
        let mut parser = Parser::new(64);
        let mut out = Vec::new();
        let mut result = Ok(());
        for _ in 0..100 {
            result = parser.feed(b"data: 0123456789\n", &mut out);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(TooLarge { limit: 64 }));
        assert_eq!(out, vec![]);
        // The parser stays failed.
        assert_eq!(parser.feed(b"\n", &mut out), Err(TooLarge { limit: 64 }));
        assert_eq!(out, vec![]);
    }

    #[test]
    fn too_large_one_huge_line_without_newline() {
        let mut parser = Parser::new(1000);
        let mut out = Vec::new();
        let chunk = [b'a'; 100];
        let mut fed = 0;
        let err = loop {
            match parser.feed(&chunk, &mut out) {
                Ok(()) => fed += chunk.len(),
                Err(err) => break err,
            }
            assert!(fed <= 1000, "accepted {fed} bytes");
        };
        assert_eq!(err, TooLarge { limit: 1000 });
        assert_eq!(fed, 1000);
        // The same in one chunk.
        let mut parser = Parser::new(1000);
        assert!(parser.feed(&[b'x'; 5000], &mut out).is_err());
        // A huge comment line counts as well.
        let mut parser = Parser::new(10);
        assert!(parser.feed(b": 0123456789", &mut out).is_err());
        assert_eq!(out, vec![]);
    }

    #[test]
    fn too_large_counts_the_event_type() {
        let mut parser = Parser::new(20);
        let mut out = Vec::new();
        parser.feed(b"event: 0123456789\n", &mut out).unwrap();
        assert!(parser.feed(b"data: 0123456789\n", &mut out).is_err());
    }

    #[test]
    fn limit_boundary() {
        // "data: hello" is 11 bytes; the data buffer then holds "hello\n" (6 bytes).
        let mut parser = Parser::new(11);
        let mut out = Vec::new();
        parser.feed(b"data: hello\n\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("hello")]);

        let mut parser = Parser::new(10);
        let mut out = Vec::new();
        assert_eq!(
            parser.feed(b"data: hello\n\n", &mut out),
            Err(TooLarge { limit: 10 })
        );
        assert_eq!(out, vec![]);

        // Data buffer (6) + current line (11) = 17: at the limit, fine; one more byte is not.
        let mut parser = Parser::new(17);
        let mut out = Vec::new();
        parser
            .feed(b"data: hello\ndata: hello\n\n", &mut out)
            .unwrap();
        assert_eq!(out, vec![msg("hello\nhello")]);
        let mut parser = Parser::new(16);
        assert!(parser
            .feed(b"data: hello\ndata: hello\n\n", &mut out)
            .is_err());
    }

    #[test]
    fn too_large_after_utf8_replacement_growth() {
        // 6 invalid bytes become 6 replacement characters (18 bytes) in the data buffer.
        let mut parser = Parser::new(15);
        let mut out = Vec::new();
        assert!(parser
            .feed(b"data:\xFF\xFF\xFF\xFF\xFF\xFF\n", &mut out)
            .is_err());
    }

    #[test]
    fn items_before_the_error_are_kept() {
        let mut parser = Parser::new(16);
        let mut out = Vec::new();
        let result = parser.feed(b"data: a\n\n: hi\ndata: 0123456789abcdef\n\n", &mut out);
        assert_eq!(result, Err(TooLarge { limit: 16 }));
        assert_eq!(out, vec![msg("a"), comment(" hi")]);
    }

    #[test]
    fn many_small_events_are_not_too_large() {
        let mut parser = Parser::new(32);
        let mut out = Vec::new();
        for _ in 0..1000 {
            parser
                .feed(b"event: e\ndata: hello\nid: 1\n\n", &mut out)
                .unwrap();
            parser.feed(b": keep-alive\n", &mut out).unwrap();
        }
        // Also many events within one large chunk.
        let big: Vec<u8> = b"data: hello\r\n\r\n".repeat(1000);
        parser.feed(&big, &mut out).unwrap();
        assert_eq!(out.len(), 3000);
        assert_eq!(out[0], ev("e", "hello", "1"));
        assert_eq!(out[2999], ev("message", "hello", "1"));
    }

    #[test]
    fn zero_limit_accepts_only_blank_lines() {
        let mut parser = Parser::new(0);
        let mut out = Vec::new();
        parser.feed(b"\n\r\n\r", &mut out).unwrap();
        assert!(parser.feed(b"d", &mut out).is_err());
    }

    // --- Misc ---

    #[test]
    fn debug_shows_sizes_only() {
        let mut parser = Parser::new(BIG);
        let mut out = Vec::new();
        parser
            .feed(
                b"id: id-secret\nevent: type-secret\ndata: data-secret\ndata: line-sec",
                &mut out,
            )
            .unwrap();
        let debug = format!("{parser:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("data_bytes: 12"), "{debug}");
        assert!(debug.contains("line_bytes: 14"), "{debug}");
    }

    #[test]
    fn too_large_display() {
        let err = TooLarge { limit: 42 };
        assert_eq!(
            err.to_string(),
            "server-sent event exceeds the limit of 42 bytes"
        );
        let _: &dyn std::error::Error = &err;
    }
}
