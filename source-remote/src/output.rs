//! Output streams of remote workers, proxied with `after=<seq>` so the worker's own `seq`
//! carries through every hop.
//!
//! Clients that follow the same worker share one upstream stream (a *hub*): the hub keeps
//! the last `RING_BYTES` of output in a ring and each client reads the ring at its own
//! pace. A client that falls out of the ring, or asks for a point the ring does not hold,
//! reads its own upstream stream from its position instead, so it still gets every chunk
//! the remote retains. A hub's upstream stream closes when its last client goes.
//!
//! A stream that breaks (the remote went away) is reopened after the worker's last `seq`
//! with backoff, for as long as anyone reads it; its readers see nothing of it but a pause.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use registry_core::{
    OutputChunk, OutputEvent, OutputRequest, OutputStream, RegistryError, SourceKey, StreamKind,
    WorkerView,
};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::source::{worker_path, Known, Shared};
use crate::sse::{Event, Item};
use crate::stream::{Backoff, EventReader};

/// The most bytes of output a hub keeps for its readers.
pub(crate) const RING_BYTES: usize = 1 << 20;
/// The most items a hub keeps.
const RING_ITEMS: usize = 4096;
/// Each reader's own queue, in items.
const READER_QUEUE: usize = 64;
/// Items a reader takes from the ring at a time.
const BATCH: usize = 64;

/// The hubs, by remote worker id.
#[derive(Default)]
pub(crate) struct Hubs {
    map: Mutex<HashMap<String, Weak<Hub>>>,
}

impl Hubs {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<Hub>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &str) -> Option<Arc<Hub>> {
        let mut map = self.lock();
        map.retain(|_, hub| hub.strong_count() > 0);
        map.get(key).and_then(Weak::upgrade)
    }

    fn insert(&self, key: &str, hub: &Arc<Hub>) {
        self.lock().insert(key.to_string(), Arc::downgrade(hub));
    }

    /// How many hubs have readers.
    pub(crate) fn live(&self) -> usize {
        let mut map = self.lock();
        map.retain(|_, hub| hub.strong_count() > 0);
        map.len()
    }

    pub(crate) fn close_all(&self) {
        self.lock().clear();
    }
}

/// One shared upstream stream. Readers hold it; when the last lets go, `_stop` drops and
/// the pump stops.
struct Hub {
    core: Arc<Core>,
    _stop: oneshot::Sender<()>,
}

struct Core {
    ring: Mutex<Ring>,
    changed: watch::Sender<u64>,
}

struct Ring {
    /// Items with the last `seq` each covers (a chunk's seq, a gap's `to`).
    items: VecDeque<(u64, OutputEvent)>,
    bytes: usize,
    /// The ring holds everything after `first`.
    first: u64,
    /// The last `seq` the ring covers.
    head: u64,
    ended: bool,
    closed: bool,
}

impl Core {
    fn new(after: u64) -> Arc<Self> {
        Arc::new(Core {
            ring: Mutex::new(Ring {
                items: VecDeque::new(),
                bytes: 0,
                first: after,
                head: after,
                ended: false,
                closed: false,
            }),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an item; the oldest go when the ring is full.
    fn push(&self, event: OutputEvent) {
        let mut ring = self.lock();
        if ring.ended || ring.closed {
            return;
        }
        let covered = match &event {
            OutputEvent::Chunk(c) => c.seq,
            OutputEvent::Gap { to, .. } => *to,
            OutputEvent::End => {
                ring.ended = true;
                ring.head
            }
        };
        ring.bytes += size(&event);
        ring.head = covered;
        ring.items.push_back((covered, event));
        while ring.bytes > RING_BYTES || ring.items.len() > RING_ITEMS {
            let Some((covered, old)) = ring.items.pop_front() else {
                break;
            };
            ring.bytes -= size(&old);
            ring.first = covered;
        }
        drop(ring);
        self.changed.send_modify(|v| *v += 1);
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.send_modify(|v| *v += 1);
    }
}

fn size(event: &OutputEvent) -> usize {
    match event {
        OutputEvent::Chunk(c) => c.data.len() + 32,
        _ => 32,
    }
}

/// Opens a worker's output stream (see the module docs).
pub(crate) async fn open(
    shared: &Arc<Shared>,
    key: &SourceKey,
    request: OutputRequest,
) -> Result<OutputStream, RegistryError> {
    let path = worker_path(key, "/output")?;
    if shared.known(key.as_str())? == Known::Lost {
        // Its output went with the remote's restart: nothing more will come.
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(OutputEvent::End);
        return Ok(rx);
    }
    // Before sharing too: whether a new stream opens must not depend on other readers.
    shared.require_up().await?;
    if request.follow {
        if let Some(hub) = shared.hubs.get(key.as_str()) {
            if let Some(rx) = join(shared, &hub, key, request.after) {
                return Ok(rx);
            }
        }
    }
    let query = if request.follow { "" } else { "&follow=0" };
    let reader = shared
        .upstream
        .open_stream(&format!("{path}?after={}{query}", request.after), None)
        .await?;
    let (tx, rx) = mpsc::channel(READER_QUEUE);
    if !request.follow {
        // What is retained now, then close: nothing to share or reopen.
        let target = Target::Direct(tx);
        tokio::spawn(pump(
            shared.clone(),
            key.clone(),
            Some(reader),
            request.after,
            target,
            false,
        ));
        return Ok(rx);
    }
    let core = Core::new(request.after);
    let (stop, stopped) = oneshot::channel();
    let hub = Arc::new(Hub {
        core: core.clone(),
        _stop: stop,
    });
    if shared.hubs.get(key.as_str()).is_none() {
        shared.hubs.insert(key.as_str(), &hub);
    }
    let target = Target::Ring { core, stopped };
    tokio::spawn(pump(
        shared.clone(),
        key.clone(),
        Some(reader),
        request.after,
        target,
        true,
    ));
    tokio::spawn(read_ring(
        hub,
        tx,
        request.after,
        shared.clone(),
        key.clone(),
    ));
    Ok(rx)
}

/// Joins a hub at `after`, if its ring holds what comes after it.
fn join(shared: &Arc<Shared>, hub: &Arc<Hub>, key: &SourceKey, after: u64) -> Option<OutputStream> {
    {
        let ring = hub.core.lock();
        if ring.closed || after < ring.first || after > ring.head {
            return None;
        }
    }
    let (tx, rx) = mpsc::channel(READER_QUEUE);
    tokio::spawn(read_ring(
        hub.clone(),
        tx,
        after,
        shared.clone(),
        key.clone(),
    ));
    Some(rx)
}

/// Reads a hub's ring from `after` into `tx`; a reader that falls out of the ring reads on
/// from an upstream stream of its own, which it alone paces.
async fn read_ring(
    hub: Arc<Hub>,
    tx: mpsc::Sender<OutputEvent>,
    after: u64,
    shared: Arc<Shared>,
    key: SourceKey,
) {
    if let Some(pos) = drain(&hub, &tx, after).await {
        drop(hub);
        tracing::debug!(runtime = %shared.runtime, "an output reader fell behind the shared stream and reads its own");
        pump(shared, key, None, pos, Target::Direct(tx), true).await;
    }
}

/// Sends the ring's items after `pos` to `tx` until `End`, the hub's close, or the reader
/// leaving. Returns `Some(pos)` if the reader fell out of the ring at `pos`.
async fn drain(hub: &Arc<Hub>, tx: &mpsc::Sender<OutputEvent>, mut pos: u64) -> Option<u64> {
    let mut changed = hub.core.changed.subscribe();
    loop {
        changed.borrow_and_update();
        let (batch, closed) = {
            let ring = hub.core.lock();
            if pos < ring.first {
                return Some(pos);
            }
            let batch: Vec<(u64, OutputEvent)> = ring
                .items
                .iter()
                .filter(|(covered, event)| *covered > pos || matches!(event, OutputEvent::End))
                .take(BATCH)
                .cloned()
                .collect();
            (batch, ring.closed)
        };
        if batch.is_empty() {
            if closed {
                return None;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return None },
                _ = tx.closed() => return None,
            }
            continue;
        }
        for (covered, event) in batch {
            let event = match event {
                OutputEvent::Gap { from, to } => OutputEvent::Gap {
                    from: from.max(pos + 1),
                    to,
                },
                other => other,
            };
            let end = event == OutputEvent::End;
            if tx.send(event).await.is_err() || end {
                return None;
            }
            pos = covered;
        }
    }
}

/// Whether `out` is new after `head`, and moves `head` on.
fn fresh(out: &OutputEvent, head: &mut u64) -> bool {
    match out {
        OutputEvent::Chunk(c) if c.seq <= *head => false,
        OutputEvent::Chunk(c) => {
            *head = c.seq;
            true
        }
        OutputEvent::Gap { to, .. } if *to <= *head => false,
        OutputEvent::Gap { to, .. } => {
            *head = *to;
            true
        }
        OutputEvent::End => true,
    }
}

/// Where a pump puts what it reads.
enum Target {
    /// A hub's ring; stops when the hub's last reader lets go.
    Ring {
        core: Arc<Core>,
        stopped: oneshot::Receiver<()>,
    },
    /// One reader's queue, which paces the pump.
    Direct(mpsc::Sender<OutputEvent>),
}

impl Target {
    /// Resolves when nobody reads any more.
    async fn abandoned(&mut self) {
        match self {
            Target::Ring { stopped, .. } => {
                let _ = stopped.await;
            }
            Target::Direct(tx) => tx.closed().await,
        }
    }

    /// Hands on an item; `false` when nobody reads any more.
    async fn put(&mut self, event: OutputEvent) -> bool {
        match self {
            Target::Ring { core, .. } => {
                core.push(event);
                true
            }
            Target::Direct(tx) => tx.send(event).await.is_ok(),
        }
    }

    /// No more will come (a reader's stream ends without `End`).
    fn close(&self) {
        if let Target::Ring { core, .. } = self {
            core.close();
        }
    }
}

/// Reads a worker's upstream output stream after `head` into `target`. With `reopen`, it
/// reopens the stream after the last `seq` when it breaks, with backoff, while anyone
/// reads and the worker is known; without, it ends with the stream.
async fn pump(
    shared: Arc<Shared>,
    key: SourceKey,
    mut reader: Option<EventReader>,
    mut head: u64,
    mut target: Target,
    reopen: bool,
) {
    let Ok(path) = worker_path(&key, "/output") else {
        return;
    };
    let settings = shared.settings().clone();
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_cap);
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if let Some(mut r) = reader.take() {
            loop {
                let item = tokio::select! {
                    item = r.next() => item,
                    _ = target.abandoned() => return,
                    _ = shutdown.wait_for(|stop| *stop) => { target.close(); return; }
                };
                let Ok(Some(item)) = item else { break };
                let Item::Event(event) = item else { continue };
                match parse(&event) {
                    Parsed::Output(out) => {
                        backoff.reset();
                        if !fresh(&out, &mut head) {
                            continue;
                        }
                        let end = out == OutputEvent::End;
                        if !target.put(out).await || end {
                            return;
                        }
                    }
                    // The remote sends the worker's terminal state before `end`: learning
                    // it here means `get` agrees with `End` when that arrives.
                    Parsed::State(worker) => shared.learn_view(&worker),
                    Parsed::Other => {}
                    Parsed::Break => break,
                }
            }
        }
        if !reopen {
            return;
        }
        // Broken (or not yet open): wait, then reopen after the last seq — unless the
        // worker is gone.
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = target.abandoned() => return,
            _ = shutdown.wait_for(|stop| *stop) => { target.close(); return; }
        }
        match shared.known(key.as_str()) {
            Err(_) => {
                target.close();
                return;
            }
            Ok(Known::Lost) => {
                target.put(OutputEvent::End).await;
                return;
            }
            Ok(_) => {}
        }
        if shared.is_closed() {
            target.close();
            return;
        }
        if shared.check_up().is_err() {
            continue;
        }
        let resume = format!("{path}?after={head}");
        let opened = tokio::select! {
            opened = shared.upstream.open_stream(&resume, None) => opened,
            _ = target.abandoned() => return,
            _ = shutdown.wait_for(|stop| *stop) => { target.close(); return; }
        };
        match opened {
            Ok(opened) => reader = Some(opened),
            Err(e) if e.code() == "worker_not_found" => {
                target.close();
                return;
            }
            Err(_) => {}
        }
    }
}

enum Parsed {
    Output(OutputEvent),
    /// The worker as the remote sees it (a `state` event).
    State(Box<WorkerView>),
    Other,
    /// The remote is going away: reopen later.
    Break,
}

fn parse(event: &Event) -> Parsed {
    #[derive(Deserialize)]
    struct Chunk {
        seq: u64,
        stream: StreamKind,
        data: String,
    }
    #[derive(Deserialize)]
    struct Gap {
        from: u64,
        to: u64,
    }
    match event.event.as_str() {
        "output" => match serde_json::from_str::<Chunk>(&event.data) {
            Ok(c) => Parsed::Output(OutputEvent::Chunk(OutputChunk {
                seq: c.seq,
                stream: c.stream,
                data: Bytes::from(c.data),
            })),
            Err(_) => Parsed::Break,
        },
        "gap" => match serde_json::from_str::<Gap>(&event.data) {
            Ok(g) => Parsed::Output(OutputEvent::Gap {
                from: g.from,
                to: g.to,
            }),
            Err(_) => Parsed::Break,
        },
        "end" => Parsed::Output(OutputEvent::End),
        "state" => {
            #[derive(Deserialize)]
            struct State {
                worker: WorkerView,
            }
            match serde_json::from_str::<State>(&event.data) {
                Ok(s) => Parsed::State(Box::new(s.worker)),
                Err(_) => Parsed::Break,
            }
        }
        "shutdown" => Parsed::Break,
        _ => Parsed::Other,
    }
}
