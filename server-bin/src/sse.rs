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
    Cursor, EventPayload, OutputEvent, OutputRequest, RegistryError, RuntimeId, StreamItem,
    Subscription, WorkerId, WorkerView,
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
                event = stream.recv() => match event {
                    Some(OutputEvent::Chunk(chunk)) => {
                        self.last_id = chunk.seq;
                        let data = json!({
                            "seq": chunk.seq,
                            "stream": chunk.stream,
                            "data": String::from_utf8_lossy(&chunk.data),
                        });
                        if !self.send("output", &data).await {
                            return;
                        }
                    }
                    Some(OutputEvent::Gap { from, to }) => {
                        self.last_id = to;
                        if !self.send("gap", &json!({ "from": from, "to": to })).await {
                            return;
                        }
                    }
                    Some(OutputEvent::End) => {
                        self.final_state().await;
                        self.send("end", &json!({})).await;
                        return;
                    }
                    None => {
                        // `follow=0` sent what is retained, the worker's record went away,
                        // or the source let go because the server is shutting down.
                        if self.app.is_stopping() {
                            self.out.send(shutdown_frame(&self.last_id.to_string())).await;
                        }
                        return;
                    }
                },
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

async fn next_item(sub: &mut Option<Subscription>) -> Option<Arc<EventPayload>> {
    match sub {
        Some(sub) => sub.next().await.map(|item| item.payload),
        None => pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_id_event_and_one_data_line() {
        let f = frame("00ab-3", "worker.upserted", r#"{"a":"x\ny"}"#);
        assert_eq!(
            &f[..],
            b"id: 00ab-3\nevent: worker.upserted\ndata: {\"a\":\"x\\ny\"}\n\n"
        );
    }
}
