//! Server-Sent Events: the registry's event stream and a worker's output stream (SPEC §5).
//!
//! Each stream is one task that writes frames into a bounded [`ChannelBody`]. A client that
//! reads slowly makes that task wait; it never makes the registry wait: the registry's
//! per-subscriber queue overflows instead and the client alone gets `reset {lagged}`
//! (events) or a `gap` (output, from the source's retention).

use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::Response;
use http_body_util::BodyExt;
use registry_core::{
    Cursor, EventPayload, OutputChunk, OutputEvent, OutputRequest, RegistryError, RuntimeId,
    StreamItem, StreamKind, Subscription, WorkerId, WorkerView,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{interval_at, Instant, MissedTickBehavior};

use crate::server::{App, ConnAbort};
use crate::wire::{Body, ChannelBody};

/// Frames buffered per client before its task waits for the client.
const CLIENT_BUFFER: usize = 16;
/// How long `end` waits for the registry to show the worker's terminal state.
const FINAL_STATE_WAIT: Duration = Duration::from_secs(2);

/// The first frame: clients reconnect after 1 s.
const RETRY: &[u8] = b"retry: 1000\n\n";
/// The keep-alive comment.
const PING: &[u8] = b": ping\n\n";
/// Sent once on `/v1/events` when the start (snapshot, replay, or reset and snapshot) has
/// gone out: what follows is live. A client that resumed can tell from it that nothing
/// more was missed.
const LIVE: &[u8] = b": live\n\n";

/// One event frame. `data` is one line of JSON (serde_json never writes a raw newline).
pub fn frame(id: &str, event: &str, data: &str) -> Bytes {
    Bytes::from(format!("id: {id}\nevent: {event}\ndata: {data}\n\n"))
}

fn sse_response(body: ChannelBody) -> Response<Body> {
    let mut resp = Response::new(body.boxed());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// The frame that ends a stream when the server shuts down. Without an `id` when there is
/// none to give: an empty one would make a browser forget its resume point.
fn shutdown_frame(id: &str) -> Bytes {
    const DATA: &str = r#"{"reason":"the server is shutting down"}"#;
    if id.is_empty() {
        Bytes::from(format!("event: shutdown\ndata: {DATA}\n\n"))
    } else {
        frame(id, "shutdown", DATA)
    }
}

/// The ping interval, kept within what a timer can hold.
fn ping_interval(configured: Duration) -> tokio::time::Interval {
    let every = configured.clamp(Duration::from_millis(1), Duration::from_secs(3600));
    let mut ping = interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping
}

struct Writer {
    tx: mpsc::Sender<Bytes>,
    /// How long a frame may wait for the client.
    stall: Duration,
    abort: Option<ConnAbort>,
}

impl Writer {
    fn new(tx: mpsc::Sender<Bytes>, app: &App, abort: Option<ConnAbort>) -> Writer {
        Writer {
            tx,
            stall: app.options.stream_stall_timeout,
            abort,
        }
    }

    /// Sends a frame; `false` once the client is gone. A client that takes no frame for
    /// `stall` counts as gone, and its connection is closed: it holds nothing any longer.
    async fn send(&self, bytes: Bytes) -> bool {
        match tokio::time::timeout(self.stall, self.tx.send(bytes)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::info!("a stream client stopped reading; closing its connection");
                if let Some(abort) = &self.abort {
                    abort.close();
                }
                false
            }
        }
    }
}

/// `GET /v1/events`: `retry`, then the subscription's items (snapshot or replay or reset +
/// snapshot, then live), pings, and a final `shutdown` event when the registry shuts down.
pub fn events(
    app: &Arc<App>,
    cursor: Option<&str>,
    runtime: Option<RuntimeId>,
    abort: Option<ConnAbort>,
) -> Response<Body> {
    let mut sub = app.registry.subscribe(cursor, runtime);
    let (tx, body) = ChannelBody::new(CLIENT_BUFFER);
    let guard = app.metrics.stream_opened("events");
    let out = Writer::new(tx, app, abort);
    let mut ping = ping_interval(app.options.sse_ping);
    // Until an item comes, the client's own cursor is the resume point (a malformed one is
    // always followed by a reset, which carries its own).
    let first = cursor.unwrap_or_default().to_string();
    let mut last: Option<Cursor> = None;
    tokio::spawn(async move {
        let _guard = guard;
        if !out.send(Bytes::from_static(RETRY)).await {
            return;
        }
        let mut live = false;
        loop {
            if !live && !sub.catching_up() {
                live = true;
                if !out.send(Bytes::from_static(LIVE)).await {
                    return;
                }
            }
            tokio::select! {
                biased;
                item = sub.next() => {
                    let Some(item) = item else {
                        // The registry shut down: say so and close.
                        let id = last.map_or(first, |c| c.to_string());
                        out.send(shutdown_frame(&id)).await;
                        return;
                    };
                    // This item and what else is queued now go out in one write.
                    let mut batch = Batch::default();
                    let mut next = Some(item);
                    while let Some(item) = next.take() {
                        let Some(frame) = event_frame(&item) else {
                            return;
                        };
                        last = Some(item.cursor);
                        batch.push(frame);
                        if !live && !sub.catching_up() {
                            live = true;
                            batch.push(Bytes::from_static(LIVE));
                        }
                        if batch.len < BATCH_BYTES {
                            next = sub.try_next();
                        }
                    }
                    if !out.send(batch.into_bytes()).await {
                        return;
                    }
                }
                _ = ping.tick() => {
                    if !out.send(Bytes::from_static(PING)).await {
                        return;
                    }
                }
                _ = out.tx.closed() => return,
            }
        }
    });
    sse_response(body)
}

/// Frames queued for one write are gathered up to about this many bytes (a snapshot may
/// be larger on its own; it is never split).
const BATCH_BYTES: usize = 64 * 1024;

/// Frames for one write to a client.
#[derive(Default)]
struct Batch {
    frames: Vec<Bytes>,
    len: usize,
}

impl Batch {
    fn push(&mut self, frame: Bytes) {
        self.len += frame.len();
        self.frames.push(frame);
    }

    /// One frame as it is (shared with every other subscriber), several copied into one
    /// buffer.
    fn into_bytes(mut self) -> Bytes {
        if self.frames.len() == 1 {
            return self.frames.pop().unwrap_or_default();
        }
        let mut buf = BytesMut::with_capacity(self.len);
        for frame in &self.frames {
            buf.extend_from_slice(frame);
        }
        buf.freeze()
    }
}

/// The SSE frame of an event of `/v1/events`, made once per event and shared by every
/// subscriber that gets it. `None` (logged) if it does not serialize.
fn event_frame(item: &StreamItem) -> Option<Bytes> {
    let frame = item.encoded(|item| {
        let mut buf = format!(
            "id: {}\nevent: {}\ndata: ",
            item.cursor,
            item.payload.event_type()
        )
        .into_bytes();
        match serde_json::to_writer(&mut buf, &*item.payload) {
            Ok(()) => {
                buf.extend_from_slice(b"\n\n");
                Bytes::from(buf)
            }
            Err(e) => {
                tracing::error!(error = %e, "an event did not serialize; closing the stream");
                Bytes::new()
            }
        }
    });
    (!frame.is_empty()).then_some(frame)
}

/// `GET /v1/workers/{id}/output`: `retry`, the worker's `state`, then its output after
/// `after` (`output` and `gap`), `state` on every change of the worker, and `end` once it is
/// terminal and drained. Every event's `id` is the last output `seq` sent, so a client resumes
/// with `Last-Event-ID` (or `?after=`) and gets nothing twice.
///
/// With `from_start_if_unknown` (a `Last-Event-ID` resume), a position beyond the worker's
/// newest chunk — one from before a restart of roster or of the source — is served from the
/// start of what is retained (a `gap` first where output was dropped) instead of refused, so
/// a browser's `EventSource` carries on rather than giving up.
pub async fn output(
    app: &Arc<App>,
    id: WorkerId,
    mut after: u64,
    follow: bool,
    from_start_if_unknown: bool,
    abort: Option<ConnAbort>,
) -> Result<Response<Body>, RegistryError> {
    let worker = app.registry.worker(&id)?;
    // Subscribe before opening the output, so no state change falls in between.
    let sub = follow.then(|| {
        app.registry
            .subscribe(None, Some(worker.runtime_id.clone()))
    });
    let stream = match app
        .registry
        .output(&id, OutputRequest { after, follow })
        .await
    {
        Err(RegistryError::InvalidRequest(_)) if from_start_if_unknown && after > 0 => {
            after = 0;
            app.registry
                .output(&id, OutputRequest { after, follow })
                .await?
        }
        opened => opened?,
    };
    let (tx, body) = ChannelBody::new(CLIENT_BUFFER);
    let task = OutputTask {
        out: Writer::new(tx, app, abort),
        app: app.clone(),
        id,
        last_id: after,
        last_state: worker,
        sub,
        closing: app.closing.clone(),
    };
    let guard = app.metrics.stream_opened("output");
    tokio::spawn(async move {
        let _guard = guard;
        task.run(stream).await;
    });
    Ok(sse_response(body))
}

struct OutputTask {
    out: Writer,
    app: Arc<App>,
    id: WorkerId,
    /// The `seq` of the last output or gap sent (the resume point).
    last_id: u64,
    last_state: WorkerView,
    sub: Option<Subscription>,
    closing: tokio::sync::watch::Receiver<bool>,
}

impl OutputTask {
    async fn run(mut self, mut stream: registry_core::OutputStream) {
        if !self.out.send(Bytes::from_static(RETRY)).await {
            return;
        }
        let first = self.last_state.clone();
        if !self.send_state(&first).await {
            return;
        }
        let mut ping = ping_interval(self.app.options.sse_ping);
        loop {
            // Biased: output first, so a worker's last chunks and `end` always go out before
            // a `shutdown` that is ready at the same time.
            tokio::select! {
                biased;
                event = stream.recv() => {
                    if !self.on_output(event, &mut stream).await {
                        return;
                    }
                }
                item = next_item(&mut self.sub) => match item {
                    Some(payload) => {
                        if !self.on_event(&payload).await {
                            return;
                        }
                    }
                    None => self.sub = None,
                },
                _ = self.closing.changed() => {
                    self.out.send(shutdown_frame(&self.last_id.to_string())).await;
                    return;
                }
                _ = ping.tick() => {
                    if !self.out.send(Bytes::from_static(PING)).await {
                        return;
                    }
                }
                _ = self.out.tx.closed() => return,
            }
        }
    }

    /// Sends what one item of the output stream calls for; `false` once the stream is over
    /// (the client left, `end` went out, or the source's stream ended).
    async fn on_output(
        &mut self,
        event: Option<OutputEvent>,
        stream: &mut registry_core::OutputStream,
    ) -> bool {
        let mut event = event;
        loop {
            match event {
                Some(OutputEvent::Chunk(chunk)) => {
                    // Chunks that are ready already go out in the same write; a gap or the
                    // end behind them is handled next, in order.
                    let (frames, next) = self.output_frames(&chunk, stream);
                    if !self.out.send(frames).await {
                        return false;
                    }
                    match next {
                        Some(next) => event = Some(next),
                        None => return true,
                    }
                }
                Some(OutputEvent::Gap { from, to }) => {
                    self.last_id = to;
                    return self.send("gap", &json!({ "from": from, "to": to })).await;
                }
                Some(OutputEvent::End) => {
                    self.final_state().await;
                    self.send("end", &json!({})).await;
                    return false;
                }
                None => {
                    // `follow=0` sent what is retained, the worker's record went away,
                    // or the source let go because the server is shutting down.
                    if self.app.is_stopping() {
                        self.out
                            .send(shutdown_frame(&self.last_id.to_string()))
                            .await;
                    }
                    return false;
                }
            }
        }
    }

    /// The `output` frames of `first` and of the chunks `stream` holds ready behind it, in
    /// one buffer of about [`COALESCE`] bytes at most, and the first item that is not a
    /// chunk, if one was taken. A client that keeps up gets one frame per write; one that is
    /// behind gets fewer, larger writes, and the stream's channel stays within
    /// [`CLIENT_BUFFER`] pieces of that size.
    fn output_frames(
        &mut self,
        first: &OutputChunk,
        stream: &mut registry_core::OutputStream,
    ) -> (Bytes, Option<OutputEvent>) {
        let mut buf = Vec::new();
        push_output_frame(&mut buf, first);
        self.last_id = first.seq;
        while buf.len() < COALESCE {
            match stream.try_recv() {
                Ok(OutputEvent::Chunk(chunk)) => {
                    push_output_frame(&mut buf, &chunk);
                    self.last_id = chunk.seq;
                }
                Ok(other) => return (Bytes::from(buf), Some(other)),
                Err(_) => break,
            }
        }
        (Bytes::from(buf), None)
    }

    async fn send(&self, event: &str, data: &serde_json::Value) -> bool {
        self.out
            .send(frame(&self.last_id.to_string(), event, &data.to_string()))
            .await
    }

    async fn send_state(&mut self, worker: &WorkerView) -> bool {
        self.last_state = worker.clone();
        self.send("state", &json!({ "worker": worker })).await
    }

    /// Sends `state` when the registry's view of this worker changed.
    async fn on_event(&mut self, payload: &EventPayload) -> bool {
        let view = match payload {
            EventPayload::WorkerUpserted { worker } if worker.id == self.id => Some(worker),
            EventPayload::Snapshot { workers, .. } => workers.iter().find(|w| w.id == self.id),
            _ => None,
        };
        match view {
            Some(view) if *view != self.last_state => {
                let view = view.clone();
                self.send_state(&view).await
            }
            _ => true,
        }
    }

    /// Before `end`: the terminal state, waiting a little for the registry to show it.
    async fn final_state(&mut self) {
        let deadline = Instant::now() + FINAL_STATE_WAIT;
        while !self.last_state.state.is_terminal() {
            let Some(sub) = self.sub.as_mut() else { break };
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(item)) => {
                    if !self.on_event(&item.payload).await {
                        return;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        // Without a subscription (`follow=0`), or after the wait: the registry's view now.
        if !self.last_state.state.is_terminal() {
            if let Ok(now) = self.app.registry.worker(&self.id) {
                if now != self.last_state {
                    self.send_state(&now).await;
                }
            }
        }
    }
}

/// How many bytes of `output` frames one write gathers when chunks are waiting.
const COALESCE: usize = 256 * 1024;

/// Appends the `output` frame of `chunk` to `buf`: `id` (the seq), `event: output` and the
/// data line `{"seq":…,"stream":…,"data":"…"}` (the bytes a `serde_json` value of those
/// fields would give), written straight into the buffer: the chunk's text is escaped once,
/// with no intermediate value or string. Invalid UTF-8 is replaced.
fn push_output_frame(buf: &mut Vec<u8>, chunk: &OutputChunk) {
    use std::io::Write as _;
    // `from_utf8` first: it checks valid text far faster than the lossy conversion does.
    let text = match std::str::from_utf8(&chunk.data) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(&chunk.data),
    };
    // Room for the text, its escapes in line-oriented text (a newline takes two bytes) and
    // the frame around it; text of many control characters grows the buffer.
    buf.reserve(text.len() + text.len() / 2 + 96);
    let stream = match chunk.stream {
        StreamKind::Stdout => "stdout",
        StreamKind::Stderr => "stderr",
    };
    // Writes into a Vec cannot fail.
    let _ = write!(
        buf,
        "id: {seq}\nevent: output\ndata: {{\"seq\":{seq},\"stream\":\"{stream}\",\"data\":",
        seq = chunk.seq
    );
    push_json_string(buf, &text);
    buf.extend_from_slice(b"}\n\n");
}

/// What each byte becomes in a JSON string: 0 for itself, else the letter after the
/// backslash (`u` for `\u00XX`). The escapes `serde_json` writes, so the bytes are the same.
const ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0A] = b'n';
    table[0x0C] = b'f';
    table[0x0D] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Appends `text` as a quoted JSON string. Eight bytes at a time: a word without a byte to
/// escape is copied whole, any other byte by byte. (Measured on line-oriented output, this is
/// about 1.5× copying runs between escapes, the way `serde_json` does, and on text with few
/// escapes about 2×.)
fn push_json_string(buf: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    buf.push(b'"');
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        if needs_escape(u64::from_le_bytes(w)) {
            push_escaped_bytes(buf, word);
        } else {
            buf.extend_from_slice(word);
        }
    }
    push_escaped_bytes(buf, words.remainder());
    buf.push(b'"');
}

/// Whether any of the eight bytes of `w` is below 0x20, a quote or a backslash (the classic
/// "has a zero byte" bit trick, which has no false answers for bytes; bytes of 0x80 and up,
/// the parts of multi-byte characters, never count).
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let is_quote = quote.wrapping_sub(ONES) & !quote & HIGH;
    let is_backslash = backslash.wrapping_sub(ONES) & !backslash & HIGH;
    below_space | is_quote | is_backslash != 0
}

fn push_escaped_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &byte in bytes {
        match ESCAPES[usize::from(byte)] {
            0 => buf.push(byte),
            b'u' => buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xF)],
            ]),
            escape => buf.extend_from_slice(&[b'\\', escape]),
        }
    }
}

async fn next_item(sub: &mut Option<Subscription>) -> Option<Arc<EventPayload>> {
    match sub {
        Some(sub) => sub.next().await.map(|item| item.payload),
        None => pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old way an output frame was made: a JSON value, then a string, then the frame.
    fn output_frame_via_value(chunk: &OutputChunk) -> Vec<u8> {
        let data = json!({
            "seq": chunk.seq,
            "stream": chunk.stream,
            "data": String::from_utf8_lossy(&chunk.data),
        });
        frame(&chunk.seq.to_string(), "output", &data.to_string()).to_vec()
    }

    #[test]
    fn output_frames_are_the_bytes_of_a_json_value_framed() {
        // Every byte value, so every escape; invalid UTF-8; characters of 1 to 4 bytes.
        let mut every: Vec<u8> = (0..=255u8).collect();
        every.extend_from_slice("caf\u{e9} \u{20ac} \u{1f600} \"q\" \\ \u{7f}\u{2028}".as_bytes());
        // Every short length and offset, so each byte falls at each place of a word.
        let mut cycled = Vec::new();
        for n in 0..40 {
            cycled.extend(every.iter().cycle().skip(n * 7).take(n));
            cycled.push(b'x');
        }
        let cases: [&[u8]; 5] = [b"", b"y\ny\ny\n", &every, &[0xE2, 0x82], &cycled];
        for (i, data) in cases.iter().enumerate() {
            let chunk = OutputChunk {
                seq: 7 + i as u64,
                stream: if i % 2 == 0 {
                    StreamKind::Stdout
                } else {
                    StreamKind::Stderr
                },
                data: Bytes::copy_from_slice(data),
            };
            let mut buf = b"before".to_vec();
            push_output_frame(&mut buf, &chunk);
            let mut want = b"before".to_vec();
            want.extend_from_slice(&output_frame_via_value(&chunk));
            assert_eq!(
                String::from_utf8_lossy(&buf),
                String::from_utf8_lossy(&want),
                "case {i}"
            );
        }
    }

    #[test]
    fn frames_carry_id_event_and_one_data_line() {
        let f = frame("00ab-3", "worker.upserted", r#"{"a":"x\ny"}"#);
        assert_eq!(
            &f[..],
            b"id: 00ab-3\nevent: worker.upserted\ndata: {\"a\":\"x\\ny\"}\n\n"
        );
    }
}
