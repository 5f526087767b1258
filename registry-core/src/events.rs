//! The registry's event log: one sequence for all runtimes, cursors, bounded retention,
//! and subscriptions that replay or reset.
//!
//! Every change of the registry's projection is published here under the same lock that
//! changes the projection, so a snapshot and the events after it always fit together.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{RuntimeId, RuntimeView, WorkerId, WorkerView};

/// A position in the event log: the run's epoch and a sequence number.
///
/// On the wire it is an opaque string (`<epoch>-<seq>`, the epoch in hex). A cursor from
/// another run of the registry has another epoch and is answered with a reset.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cursor {
    epoch: u64,
    seq: u64,
}

impl Cursor {
    /// Parses a cursor string; `None` when malformed.
    pub fn parse(text: &str) -> Option<Cursor> {
        let (epoch, seq) = text.split_once('-')?;
        if epoch.len() != 16 || seq.is_empty() || seq.len() > 20 {
            return None;
        }
        Some(Cursor {
            epoch: u64::from_str_radix(epoch, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The sequence number within the run (0: before the first event).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.epoch, self.seq)
    }
}

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cursor({self})")
    }
}

/// Why a subscriber gets a `reset` and a fresh snapshot instead of a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetReason {
    /// The cursor is from an earlier run of the registry.
    ForeignEpoch,
    /// The cursor is older than the retained history.
    Expired,
    /// The cursor is not one this registry issued.
    Malformed,
    /// The subscriber fell more than its bound behind in the event ring.
    Lagged,
}

/// The data of an event. Serializes to the JSON of the SSE `data:` line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventPayload {
    /// `runtime.updated`: health, capabilities or diagnostics of a runtime changed.
    RuntimeUpdated {
        /// The runtime now.
        runtime: RuntimeView,
    },
    /// `worker.upserted`: a worker is new or changed.
    WorkerUpserted {
        /// The worker now.
        worker: WorkerView,
    },
    /// `worker.removed`: a worker's record is gone.
    WorkerRemoved {
        /// Its id.
        worker_id: WorkerId,
        /// Its runtime.
        runtime_id: RuntimeId,
    },
    /// `runtime.removed`: a runtime left the registry (a reload took it out of the
    /// config). Each of its workers left with a `worker.removed` before it.
    RuntimeRemoved {
        /// Its id.
        runtime_id: RuntimeId,
    },
    /// `snapshot`: everything now (filtered like the subscription).
    Snapshot {
        /// Every runtime.
        runtimes: Vec<RuntimeView>,
        /// Every worker.
        workers: Vec<WorkerView>,
    },
    /// `reset`: what the subscriber had is not continued; a snapshot follows.
    Reset {
        /// Why.
        reason: ResetReason,
    },
}

impl EventPayload {
    /// The SSE event type: `runtime.updated`, `runtime.removed`, `worker.upserted`,
    /// `worker.removed`, `snapshot` or `reset`.
    pub fn event_type(&self) -> &'static str {
        match self {
            EventPayload::RuntimeUpdated { .. } => "runtime.updated",
            EventPayload::WorkerUpserted { .. } => "worker.upserted",
            EventPayload::WorkerRemoved { .. } => "worker.removed",
            EventPayload::RuntimeRemoved { .. } => "runtime.removed",
            EventPayload::Snapshot { .. } => "snapshot",
            EventPayload::Reset { .. } => "reset",
        }
    }

    /// Roughly the bytes this payload holds, for the log's byte bound.
    fn approx_size(&self) -> usize {
        const OVERHEAD: usize = 256;
        let strings = |it: &mut dyn Iterator<Item = usize>| it.sum::<usize>();
        OVERHEAD
            + match self {
                EventPayload::WorkerUpserted { worker: w } => {
                    w.name.as_ref().map_or(0, String::len)
                        + w.profile.as_ref().map_or(0, String::len)
                        + w.message.as_ref().map_or(0, String::len)
                        + strings(&mut w.labels.iter().map(|(k, v)| k.len() + v.len()))
                        + strings(&mut w.args.iter().map(String::len))
                        + strings(&mut w.command.iter().flatten().map(String::len))
                }
                EventPayload::RuntimeUpdated { runtime: r } => {
                    r.health.message.as_ref().map_or(0, String::len)
                        + strings(&mut r.diagnostics.iter().map(|d| d.code.len() + d.message.len()))
                }
                EventPayload::WorkerRemoved { .. }
                | EventPayload::RuntimeRemoved { .. }
                | EventPayload::Snapshot { .. }
                | EventPayload::Reset { .. } => 0,
            }
    }

    fn runtime_id(&self) -> Option<&RuntimeId> {
        match self {
            EventPayload::RuntimeUpdated { runtime } => Some(&runtime.id),
            EventPayload::WorkerUpserted { worker } => Some(&worker.runtime_id),
            EventPayload::WorkerRemoved { runtime_id, .. } => Some(runtime_id),
            EventPayload::RuntimeRemoved { runtime_id } => Some(runtime_id),
            EventPayload::Snapshot { .. } | EventPayload::Reset { .. } => None,
        }
    }
}

/// The largest subscriber bound: the shared ring keeps this many of the newest events at
/// most on its account, so a bound must stay a bound. Larger capacities are clamped to it.
pub const MAX_SUBSCRIBER_QUEUE: usize = 1 << 20;

/// One item of a subscription: an event and the cursor to resume after it.
///
/// Every subscriber of an event gets a clone of the same item, so what one of them encodes
/// for the wire with [`encoded`](Self::encoded) the others reuse.
#[derive(Clone)]
pub struct StreamItem {
    /// Resume after this item with this cursor.
    pub cursor: Cursor,
    /// The event.
    pub payload: Arc<EventPayload>,
    /// The item's wire form, made once by its first reader.
    wire: Arc<OnceLock<Bytes>>,
}

impl StreamItem {
    pub(crate) fn new(cursor: Cursor, payload: EventPayload) -> StreamItem {
        StreamItem {
            cursor,
            payload: Arc::new(payload),
            wire: Arc::default(),
        }
    }

    /// The item's wire form: `encode` runs once per event, for its first reader; every
    /// other subscriber (and a replay of the event) shares those bytes. An encoding must
    /// depend on the item alone.
    pub fn encoded(&self, encode: impl FnOnce(&StreamItem) -> Bytes) -> Bytes {
        self.wire.get_or_init(|| encode(self)).clone()
    }
}

impl fmt::Debug for StreamItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamItem")
            .field("cursor", &self.cursor)
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

/// An item a subscription is yet to yield: ready, or a snapshot whose views are copied
/// into the event only when it is read, outside the registry's lock.
pub(crate) enum Pending {
    Item(StreamItem),
    Snapshot(Box<LazySnapshot>),
}

/// A snapshot's parts, shared with the registry's table.
pub(crate) struct LazySnapshot {
    pub(crate) cursor: Cursor,
    pub(crate) runtimes: Vec<RuntimeView>,
    pub(crate) workers: Vec<Arc<WorkerView>>,
}

impl Pending {
    fn into_item(self) -> StreamItem {
        match self {
            Pending::Item(item) => item,
            Pending::Snapshot(snap) => {
                let LazySnapshot {
                    cursor,
                    runtimes,
                    workers,
                } = *snap;
                let workers = workers.iter().map(|w| (**w).clone()).collect();
                StreamItem::new(cursor, EventPayload::Snapshot { runtimes, workers })
            }
        }
    }
}

/// The shared ring of recent events that every live subscriber reads at its own position.
///
/// The registry appends under its lock (a push and the eviction of what no bound keeps any
/// more, O(1) amortized, whatever the number of subscribers); readers take a read lock only
/// to clone the [`StreamItem`]s after their position, outside the registry's lock.
pub(crate) struct Feed {
    ring: RwLock<Ring>,
}

struct Ring {
    /// Consecutive events: the front's seq, then one more each.
    items: VecDeque<StreamItem>,
    /// Set when the registry has shut down: readers take what is left after their
    /// position, then end.
    closed: bool,
}

impl Feed {
    fn read(&self) -> RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ring {
    fn front_seq(&self) -> Option<u64> {
        self.items.front().map(|i| i.cursor.seq)
    }

    /// The retained events after `seq`, oldest first (empty when `seq` is before the ring).
    fn after(&self, seq: u64) -> impl DoubleEndedIterator<Item = &StreamItem> {
        let skip = self
            .front_seq()
            .map_or(0, |front| (seq + 1).saturating_sub(front) as usize);
        self.items.range(skip.min(self.items.len())..)
    }
}

/// The registry's event log: one ring of recent events, shared with the live subscribers,
/// and a notification of its head.
///
/// Publishing is O(1) in the number of subscribers: the event is pushed into the shared
/// ring once and the head is announced on one `watch` channel, which the registry sends
/// after it has released its lock (see [`EventLog::unannounced`]). Each subscriber keeps its
/// own position, filters by runtime itself, and is never waited for.
///
/// Two bounds decide what the ring keeps:
///
/// - the *replay window*: the last `retention` events, and no more than about `max_bytes`
///   of them (the newest is always kept). A cursor is resumed only from within it.
/// - the *subscriber bound*: the last `queue_capacity` events are kept too, even beyond the
///   replay window, so a live subscriber always has its bound's worth to read.
///
/// The ring holds the union, at most `max(retention, queue_capacity)` events; beyond the
/// oldest of them an event is dropped, and a subscriber still positioned before it gets
/// `reset {lagged}` and a snapshot. Memory is therefore bounded by about `max_bytes` plus
/// `queue_capacity` events, whatever the number of subscribers.
pub(crate) struct EventLog {
    epoch: u64,
    last_seq: u64,
    feed: Arc<Feed>,
    /// The oldest seq a cursor can be resumed from (`last_seq + 1` before any event).
    replay_from: u64,
    /// Approximate bytes of the events in the replay window (a payload never changes, so its
    /// size is the same when it leaves the window as when it came).
    bytes: usize,
    retention: usize,
    max_bytes: usize,
    queue_capacity: usize,
    /// The head, announced to the subscribers once the registry's lock is released.
    head_tx: watch::Sender<u64>,
    /// The last seq handed out by [`unannounced`](Self::unannounced).
    announced: u64,
}

/// How a subscription starts: replay or reset.
pub(crate) enum Start {
    /// Send a snapshot first (no cursor given).
    Snapshot,
    /// Replay these, then live.
    Replay(Vec<StreamItem>),
    /// Send reset + snapshot.
    Reset(ResetReason),
}

/// Where a new live reader of the ring starts: the shared ring, the head notification, and
/// its position (the last seq it has already accounted for).
pub(crate) struct LiveStart {
    feed: Arc<Feed>,
    head_rx: watch::Receiver<u64>,
    pos: u64,
    capacity: usize,
}

impl EventLog {
    pub(crate) fn new(
        epoch: u64,
        retention: usize,
        max_bytes: usize,
        queue_capacity: usize,
    ) -> Self {
        let retention = retention.max(1);
        let queue_capacity = queue_capacity.clamp(1, MAX_SUBSCRIBER_QUEUE);
        EventLog {
            epoch,
            last_seq: 0,
            feed: Arc::new(Feed {
                ring: RwLock::new(Ring {
                    items: VecDeque::with_capacity(retention.max(queue_capacity).min(1024)),
                    closed: false,
                }),
            }),
            replay_from: 1,
            bytes: 0,
            retention,
            max_bytes,
            queue_capacity,
            head_tx: watch::channel(0).0,
            announced: 0,
        }
    }

    /// The cursor of the last event.
    pub(crate) fn head(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            seq: self.last_seq,
        }
    }

    /// The cursor that stands before every event of this run. A `reset` carries it, so a
    /// client that reconnects before it saw the snapshot is not resumed past it silently.
    pub(crate) fn origin(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            seq: 0,
        }
    }

    /// Appends an event to the shared ring: O(1) amortized, whatever the number of
    /// subscribers. The replay window drops its oldest beyond retention (by count, or by
    /// bytes while more than one event is kept); the ring drops what neither the window nor
    /// the subscriber bound keeps (see [`EventLog`]).
    ///
    /// Subscribers are not woken here: the caller announces the head with
    /// [`unannounced`](Self::unannounced) and [`announce`] once its lock is released.
    pub(crate) fn publish(&mut self, payload: EventPayload) -> Cursor {
        self.last_seq += 1;
        let item = StreamItem::new(self.head(), payload);
        let cursor = item.cursor;
        self.bytes += item.payload.approx_size();
        let mut ring = self.feed.write();
        ring.items.push_back(item);
        let front = ring.front_seq().unwrap_or(self.last_seq);
        while self.window_len() > self.retention as u64
            || (self.bytes > self.max_bytes && self.window_len() > 1)
        {
            let leaving = &ring.items[(self.replay_from - front) as usize];
            self.bytes -= leaving.payload.approx_size();
            self.replay_from += 1;
        }
        let keep_from = self
            .replay_from
            .min((self.last_seq + 1).saturating_sub(self.queue_capacity as u64));
        while ring.front_seq().is_some_and(|seq| seq < keep_from) {
            ring.items.pop_front();
        }
        cursor
    }

    fn window_len(&self) -> u64 {
        self.last_seq + 1 - self.replay_from
    }

    /// The head and the channel to announce it on, if events were published since the last
    /// call. Taken under the registry's lock; [`announce`] it after the lock is released,
    /// so that waking the subscribers never holds up the registry.
    pub(crate) fn unannounced(&mut self) -> Option<(watch::Sender<u64>, u64)> {
        (self.last_seq > self.announced).then(|| {
            self.announced = self.last_seq;
            (self.head_tx.clone(), self.last_seq)
        })
    }

    /// Decides how a subscription that sends `cursor` starts.
    pub(crate) fn start(&self, cursor: Option<&str>, filter: &Option<RuntimeId>) -> Start {
        let Some(text) = cursor else {
            return Start::Snapshot;
        };
        let Some(c) = Cursor::parse(text) else {
            return Start::Reset(ResetReason::Malformed);
        };
        if c.epoch != self.epoch {
            return Start::Reset(ResetReason::ForeignEpoch);
        }
        if c.seq > self.last_seq {
            return Start::Reset(ResetReason::Malformed);
        }
        // The oldest event the client still needs is c.seq + 1; it must be in the replay
        // window (or not exist yet).
        if c.seq + 1 < self.replay_from {
            return Start::Reset(ResetReason::Expired);
        }
        Start::Replay(
            self.feed
                .read()
                .after(c.seq)
                .filter(|i| matches(filter, i.payload.runtime_id()))
                .cloned()
                .collect(),
        )
    }

    /// Whether the events after `seq` still retained hold the removal of `worker`.
    pub(crate) fn removed_since(&self, seq: u64, worker: &WorkerId) -> bool {
        self.feed.read().after(seq).rev().any(|i| {
            matches!(&*i.payload, EventPayload::WorkerRemoved { worker_id, .. } if worker_id == worker)
        })
    }

    /// A live reader from the head on: every event published after this call is in its
    /// reach. O(1); nothing is registered that publishing would have to visit.
    pub(crate) fn register(&self) -> LiveStart {
        LiveStart {
            feed: self.feed.clone(),
            head_rx: self.head_tx.subscribe(),
            pos: self.last_seq,
            capacity: self.queue_capacity,
        }
    }

    /// Ends every subscription once it has read what the ring holds after its position.
    pub(crate) fn close_all(&mut self) {
        self.feed.write().closed = true;
        // Wake every reader even if nothing new was published (only at shutdown).
        self.head_tx.send_modify(|_| {});
    }

    /// The retained events (the replay window and what the subscriber bound keeps).
    #[cfg(test)]
    fn ring_len(&self) -> usize {
        self.feed.read().items.len()
    }

    /// The live readers (their notification receivers).
    #[cfg(test)]
    pub(crate) fn subscriber_count(&self) -> usize {
        self.head_tx.receiver_count()
    }
}

/// Wakes the subscribers for everything up to `seq` (never backwards: announcements from
/// two threads may arrive out of order). One notification, however many subscribers.
pub(crate) fn announce((tx, seq): (watch::Sender<u64>, u64)) {
    tx.send_if_modified(|head| {
        let newer = seq > *head;
        if newer {
            *head = seq;
        }
        newer
    });
}

fn matches(filter: &Option<RuntimeId>, runtime: Option<&RuntimeId>) -> bool {
    match (filter, runtime) {
        (None, _) | (_, None) => true,
        (Some(f), Some(r)) => f == r,
    }
}

/// What a subscription needs from the registry: a fresh snapshot and a new live position,
/// taken together under the registry's lock.
pub(crate) trait Resubscribe: Send + Sync {
    /// Reset + snapshot items and the live position they fit; `None` once the registry is
    /// shut down.
    fn resubscribe(
        &self,
        reason: ResetReason,
        filter: &Option<RuntimeId>,
    ) -> Option<(Vec<Pending>, LiveStart)>;
}

/// What one look at the ring found.
enum Fill {
    /// Items were taken (or a lag was found): go on yielding.
    Progress,
    /// Nothing new yet.
    Empty,
    /// The registry has shut down and nothing is left after the position.
    Closed,
}

/// A live view of the registry's events from some point on.
///
/// It yields, in order: a `snapshot` (no cursor given) or the retained events after the
/// cursor (a valid one) or `reset` + `snapshot` (a cursor that can't be continued); then live
/// events, read from the registry's shared ring at the subscription's own position and
/// filtered by runtime here, not by the registry.
///
/// Its bound is the subscriber queue (`subscriber_queue` events of its runtime): when it
/// comes back to the ring and finds more than that many events for it after its position,
/// or finds its position already dropped from the ring, it has lagged. It then yields what
/// it can in order (the first events of the bound that are still there, never one after a
/// gap), then `reset {lagged}` + `snapshot`, and goes on live. It never slows the registry.
pub struct Subscription {
    /// The start: snapshot, replay, or reset and snapshot.
    pending: VecDeque<Pending>,
    /// Live items taken from the ring, not yet yielded (at most the bound).
    live: VecDeque<StreamItem>,
    feed: Arc<Feed>,
    head_rx: watch::Receiver<u64>,
    /// The seq of the last event of the ring this subscription has accounted for.
    pos: u64,
    capacity: usize,
    /// It fell behind: after `live`, a reset and a snapshot.
    lagged: bool,
    /// The registry is gone (its notification ended).
    ended: bool,
    filter: Option<RuntimeId>,
    source: Weak<dyn Resubscribe>,
}

impl Subscription {
    pub(crate) fn new(
        pending: Vec<Pending>,
        live: LiveStart,
        filter: Option<RuntimeId>,
        source: Weak<dyn Resubscribe>,
    ) -> Self {
        let LiveStart {
            feed,
            head_rx,
            pos,
            capacity,
        } = live;
        Subscription {
            pending: pending.into(),
            live: VecDeque::new(),
            feed,
            head_rx,
            pos,
            capacity,
            lagged: false,
            ended: false,
            filter,
            source,
        }
    }

    /// Whether items of the start — the snapshot, the replay from a cursor, or a reset and
    /// its snapshot — are still to be taken; `false` once what follows is live.
    pub fn catching_up(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The next item if one is there now, without waiting: for a reader that writes what
    /// has queued up in one go. `None` also when the subscription lagged or ended;
    /// [`next`](Self::next) then says what follows (a reset, or the end).
    pub fn try_next(&mut self) -> Option<StreamItem> {
        if let Some(item) = self.pending.pop_front() {
            return Some(item.into_item());
        }
        if self.live.is_empty() && !self.lagged {
            self.fill();
        }
        self.live.pop_front()
    }

    /// The next item; `None` once the registry has shut down.
    pub async fn next(&mut self) -> Option<StreamItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item.into_item());
            }
            if let Some(item) = self.live.pop_front() {
                return Some(item);
            }
            if self.lagged {
                let registry = self.source.upgrade()?;
                let (items, live) = registry.resubscribe(ResetReason::Lagged, &self.filter)?;
                self.pending = items.into();
                self.pos = live.pos;
                self.head_rx = live.head_rx;
                self.lagged = false;
                continue;
            }
            // Seen before looking: an event published after the look changes it again.
            self.head_rx.borrow_and_update();
            match self.fill() {
                Fill::Progress => continue,
                Fill::Closed => return None,
                Fill::Empty if self.ended => return None,
                Fill::Empty => {}
            }
            // Cancel-safe: nothing is taken until the next look.
            if self.head_rx.changed().await.is_err() {
                self.ended = true;
            }
        }
    }

    /// Takes the events for this subscription after its position from the ring, up to its
    /// bound, and moves the position past every event it looked at.
    fn fill(&mut self) -> Fill {
        let ring = self.feed.read();
        let nothing = if ring.closed {
            Fill::Closed
        } else {
            Fill::Empty
        };
        let Some(front) = ring.front_seq() else {
            return nothing;
        };
        if self.pos + 1 < front {
            // What came right after the position is gone: nothing more can be given in
            // order.
            self.lagged = true;
            return Fill::Progress;
        }
        for item in ring.after(self.pos) {
            if matches(&self.filter, item.payload.runtime_id()) {
                if self.live.len() == self.capacity {
                    self.lagged = true;
                    break;
                }
                self.live.push_back(item.clone());
            }
            self.pos = item.cursor.seq;
        }
        if self.live.is_empty() && !self.lagged {
            // Nothing after the position, or only other runtimes' events.
            return nothing;
        }
        Fill::Progress
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("pending", &self.pending.len())
            .field("live", &self.live.len())
            .field("pos", &self.pos)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removed(n: u32) -> EventPayload {
        let id: WorkerId = format!("w_{:026}", n).parse().unwrap();
        EventPayload::WorkerRemoved {
            worker_id: id,
            runtime_id: RuntimeId::new(if n % 2 == 0 { "even" } else { "odd" }).unwrap(),
        }
    }

    fn seqs(start: Start) -> Result<Vec<u64>, ResetReason> {
        match start {
            Start::Replay(items) => Ok(items.iter().map(|i| i.cursor.seq).collect()),
            Start::Reset(r) => Err(r),
            Start::Snapshot => panic!("unexpected snapshot"),
        }
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            epoch: 0xfeed,
            seq: 42,
        };
        assert_eq!(c.to_string(), "000000000000feed-42");
        assert_eq!(Cursor::parse(&c.to_string()), Some(c));
        for bad in [
            "",
            "42",
            "feed-42",
            "000000000000feed-",
            "000000000000feed-x",
            "zzzzzzzzzzzzzzzz-1",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn replay_gives_every_event_after_the_cursor_once() {
        let mut log = EventLog::new(7, 100, usize::MAX, 10);
        let cursors: Vec<Cursor> = (0..10).map(|n| log.publish(removed(n))).collect();
        let got = seqs(log.start(Some(&cursors[3].to_string()), &None)).unwrap();
        assert_eq!(got, (5..=10).collect::<Vec<_>>());
        let at_head = seqs(log.start(Some(&log.head().to_string()), &None)).unwrap();
        assert!(at_head.is_empty());
        let from_origin = seqs(log.start(Some(&log.origin().to_string()), &None)).unwrap();
        assert_eq!(from_origin, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn replay_honours_the_runtime_filter() {
        let mut log = EventLog::new(7, 100, usize::MAX, 10);
        for n in 0..6 {
            log.publish(removed(n));
        }
        let even = Some(RuntimeId::new("even").unwrap());
        let got = seqs(log.start(Some(&log.origin().to_string()), &even)).unwrap();
        assert_eq!(got, vec![1, 3, 5]);
    }

    #[test]
    fn expired_foreign_and_malformed_cursors_reset() {
        let mut log = EventLog::new(7, 5, usize::MAX, 10);
        let first = log.publish(removed(0));
        for n in 1..10 {
            log.publish(removed(n));
        }
        assert_eq!(
            seqs(log.start(Some(&first.to_string()), &None)),
            Err(ResetReason::Expired)
        );
        // The oldest retained is 6: a cursor at 5 still works, at 4 not.
        let at5 = Cursor { epoch: 7, seq: 5 };
        assert_eq!(
            seqs(log.start(Some(&at5.to_string()), &None)).unwrap(),
            vec![6, 7, 8, 9, 10]
        );
        let at4 = Cursor { epoch: 7, seq: 4 };
        assert_eq!(
            seqs(log.start(Some(&at4.to_string()), &None)),
            Err(ResetReason::Expired)
        );
        let foreign = Cursor { epoch: 8, seq: 5 };
        assert_eq!(
            seqs(log.start(Some(&foreign.to_string()), &None)),
            Err(ResetReason::ForeignEpoch)
        );
        let ahead = Cursor { epoch: 7, seq: 11 };
        assert_eq!(
            seqs(log.start(Some(&ahead.to_string()), &None)),
            Err(ResetReason::Malformed)
        );
        assert_eq!(
            seqs(log.start(Some("nonsense"), &None)),
            Err(ResetReason::Malformed)
        );
        assert!(matches!(log.start(None, &None), Start::Snapshot));
    }

    #[test]
    fn retention_bounds_the_ring() {
        let mut log = EventLog::new(1, 3, usize::MAX, 10);
        for n in 0..1000 {
            log.publish(removed(n));
        }
        // The replay window is 3; the ring keeps the subscriber bound (10) too.
        assert_eq!(log.window_len(), 3);
        assert_eq!(log.ring_len(), 10);
        assert_eq!(log.head().seq, 1000);
    }

    #[test]
    fn retention_bounds_the_ring_by_bytes_too() {
        let mut log = EventLog::new(1, 1000, 10 * 256, 10);
        for n in 0..100 {
            log.publish(removed(n));
        }
        // Each removal counts 256 bytes: ten fit.
        assert_eq!(log.window_len(), 10);
        assert_eq!(log.ring_len(), 10);
        assert_eq!(log.bytes, 10 * 256);
        let expired = Cursor { epoch: 1, seq: 89 };
        assert_eq!(
            seqs(log.start(Some(&expired.to_string()), &None)),
            Err(ResetReason::Expired)
        );
        // One event larger than the bound is still kept, alone.
        let mut log = EventLog::new(1, 1000, 100, 10);
        log.publish(removed(1));
        log.publish(removed(2));
        assert_eq!(log.window_len(), 1);
        assert_eq!(log.replay_from, 2);
    }

    /// A live reader with no registry behind it (a lag ends it instead of a reset).
    fn reader(log: &EventLog, filter: Option<RuntimeId>) -> Subscription {
        let none: Weak<dyn Resubscribe> = Weak::<NoRegistry>::new();
        Subscription::new(Vec::new(), log.register(), filter, none)
    }

    struct NoRegistry;

    impl Resubscribe for NoRegistry {
        fn resubscribe(
            &self,
            _: ResetReason,
            _: &Option<RuntimeId>,
        ) -> Option<(Vec<Pending>, LiveStart)> {
            None
        }
    }

    #[test]
    fn a_full_queue_marks_only_that_subscriber_lagged() {
        let mut log = EventLog::new(1, 100, usize::MAX, 4);
        let mut slow = reader(&log, None);
        let mut fast = reader(&log, None);
        for n in 0..10 {
            log.publish(removed(n));
            // The fast one keeps up.
            assert_eq!(fast.try_next().unwrap().cursor.seq, u64::from(n) + 1);
        }
        assert!(!fast.lagged);
        // The slow one still gets what its bound holds, in order, then nothing.
        let held: Vec<u64> = std::iter::from_fn(|| slow.try_next())
            .map(|i| i.cursor.seq)
            .collect();
        assert_eq!(held, vec![1, 2, 3, 4]);
        assert!(slow.lagged);
        assert!(!fast.lagged);
    }

    #[test]
    fn subscribers_that_went_away_are_dropped_while_idle() {
        let log = EventLog::new(1, 10, usize::MAX, 4);
        for _ in 0..100 {
            drop(reader(&log, None));
        }
        let _kept = reader(&log, None);
        assert_eq!(log.subscriber_count(), 1);
    }

    /// A registry of nothing but the log: a lagged subscriber's reset and (empty) snapshot
    /// come from it, like the registry's.
    struct LogOnly(std::sync::Mutex<EventLog>);

    impl LogOnly {
        fn new(log: EventLog) -> Arc<LogOnly> {
            Arc::new(LogOnly(std::sync::Mutex::new(log)))
        }

        fn subscribe(self: &Arc<Self>, filter: Option<RuntimeId>) -> Subscription {
            let live = self.0.lock().unwrap().register();
            let weak = Arc::downgrade(self) as Weak<dyn Resubscribe>;
            Subscription::new(Vec::new(), live, filter, weak)
        }

        /// Publishes and wakes the readers, as the registry does once its lock is released.
        fn publish(&self, payload: EventPayload) -> Cursor {
            let mut log = self.0.lock().unwrap();
            let cursor = log.publish(payload);
            let head = log.unannounced();
            drop(log);
            if let Some(head) = head {
                announce(head);
            }
            cursor
        }
    }

    impl Resubscribe for LogOnly {
        fn resubscribe(
            &self,
            reason: ResetReason,
            _: &Option<RuntimeId>,
        ) -> Option<(Vec<Pending>, LiveStart)> {
            let log = self.0.lock().unwrap();
            let items = vec![
                Pending::Item(StreamItem::new(
                    log.origin(),
                    EventPayload::Reset { reason },
                )),
                Pending::Item(StreamItem::new(
                    log.head(),
                    EventPayload::Snapshot {
                        runtimes: Vec::new(),
                        workers: Vec::new(),
                    },
                )),
            ];
            Some((items, log.register()))
        }
    }

    async fn next_now(sub: &mut Subscription) -> StreamItem {
        tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
            .await
            .expect("an item in time")
            .expect("not ended")
    }

    #[tokio::test]
    async fn a_lagging_reader_of_the_shared_ring_gets_what_it_can_then_reset_and_snapshot() {
        let reg = LogOnly::new(EventLog::new(1, 100, usize::MAX, 4));
        let mut slow = reg.subscribe(None);
        let mut fast = reg.subscribe(None);
        for n in 0..10 {
            reg.publish(removed(n));
            assert_eq!(next_now(&mut fast).await.cursor.seq, u64::from(n) + 1);
        }
        // The slow one: its bound's worth in order, each once, then reset and a snapshot
        // at the head; nothing is skipped without a reset saying so.
        let mut got = Vec::new();
        loop {
            let item = next_now(&mut slow).await;
            if let EventPayload::Reset { reason } = &*item.payload {
                assert_eq!(*reason, ResetReason::Lagged);
                assert_eq!(item.cursor.seq, 0, "a reset stands before every event");
                break;
            }
            got.push(item.cursor.seq);
        }
        assert_eq!(got, vec![1, 2, 3, 4]);
        let snapshot = next_now(&mut slow).await;
        assert_eq!(snapshot.payload.event_type(), "snapshot");
        assert_eq!(snapshot.cursor.seq, 10);
        // Then live again, from right after the snapshot, for both.
        reg.publish(removed(10));
        assert_eq!(next_now(&mut slow).await.cursor.seq, 11);
        assert_eq!(next_now(&mut fast).await.cursor.seq, 11);
        assert!(slow.try_next().is_none());
    }

    #[tokio::test]
    async fn a_reader_whose_position_left_the_ring_is_reset_not_skipped_ahead() {
        // A filtered reader whose runtime is quiet while the other's events overrun the
        // ring: the one event it missed is gone, so it gets a reset, never a later event
        // after a silent gap.
        let reg = LogOnly::new(EventLog::new(1, 4, usize::MAX, 4));
        let mut odd = reg.subscribe(Some(RuntimeId::new("odd").unwrap()));
        reg.publish(removed(1));
        for n in 0..10 {
            reg.publish(removed(2 * n));
        }
        reg.publish(removed(3));
        let first = next_now(&mut odd).await;
        assert_eq!(first.payload.event_type(), "reset", "{first:?}");
        let snapshot = next_now(&mut odd).await;
        assert_eq!(snapshot.payload.event_type(), "snapshot");
        assert_eq!(snapshot.cursor.seq, 12);
        reg.publish(removed(5));
        assert_eq!(next_now(&mut odd).await.cursor.seq, 13);
    }

    #[tokio::test]
    async fn readers_with_different_runtime_filters_each_see_exactly_theirs_in_order() {
        let reg = LogOnly::new(EventLog::new(1, 1000, usize::MAX, 1024));
        let even = Some(RuntimeId::new("even").unwrap());
        let odd = Some(RuntimeId::new("odd").unwrap());
        let readers = [even, odd, None].map(|filter| {
            let mut sub = reg.subscribe(filter.clone());
            tokio::spawn(async move {
                let want = if filter.is_some() { 150 } else { 300 };
                let mut seen = Vec::new();
                while seen.len() < want {
                    let item = next_now(&mut sub).await;
                    if let Some(f) = &filter {
                        assert_eq!(item.payload.runtime_id(), Some(f), "{item:?}");
                    }
                    seen.push(item.cursor.seq);
                }
                assert!(sub.try_next().is_none(), "nothing more than its own");
                seen
            })
        });
        for n in 0..300 {
            reg.publish(removed(n));
            if n % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let [evens, odds, all] = readers;
        // Seq n + 1 holds removed(n): the even runtime's are the odd seqs.
        let expect = |rem: u64| (1..=300).filter(|s| s % 2 == rem).collect::<Vec<u64>>();
        assert_eq!(evens.await.unwrap(), expect(1));
        assert_eq!(odds.await.unwrap(), expect(0));
        assert_eq!(all.await.unwrap(), (1..=300).collect::<Vec<u64>>());
    }

    #[test]
    fn payloads_serialize_to_the_spec_shapes() {
        let p = EventPayload::Reset {
            reason: ResetReason::Lagged,
        };
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"reason":"lagged"}"#);
        assert_eq!(p.event_type(), "reset");
        let r = removed(2);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["runtime_id"], "even");
        assert!(json["worker_id"].as_str().unwrap().starts_with("w_"));
        assert_eq!(r.event_type(), "worker.removed");
    }

    #[test]
    fn a_removed_runtime_reads_back_as_itself_not_as_a_removed_worker() {
        let gone = EventPayload::RuntimeRemoved {
            runtime_id: RuntimeId::new("old").unwrap(),
        };
        let text = serde_json::to_string(&gone).unwrap();
        assert_eq!(text, r#"{"runtime_id":"old"}"#);
        assert_eq!(gone.event_type(), "runtime.removed");
        assert_eq!(serde_json::from_str::<EventPayload>(&text).unwrap(), gone);
        let worker = serde_json::to_string(&removed(2)).unwrap();
        assert_eq!(
            serde_json::from_str::<EventPayload>(&worker)
                .unwrap()
                .event_type(),
            "worker.removed"
        );
    }

    #[test]
    fn a_runtime_filter_keeps_the_removal_of_that_runtime() {
        let mut log = EventLog::new(1, 10, usize::MAX, 4);
        let mut other = reader(&log, Some(RuntimeId::new("other").unwrap()));
        let mut mine = reader(&log, Some(RuntimeId::new("old").unwrap()));
        log.publish(EventPayload::RuntimeRemoved {
            runtime_id: RuntimeId::new("old").unwrap(),
        });
        assert_eq!(
            mine.try_next().unwrap().payload.event_type(),
            "runtime.removed"
        );
        assert!(other.try_next().is_none());
    }
}
