//! The registry's event log: one sequence for all runtimes, cursors, bounded retention,
//! and subscriptions that replay or reset.
//!
//! Every change of the registry's projection is published here under the same lock that
//! changes the projection, so a snapshot and the events after it always fit together.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

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
    /// The subscriber fell too far behind and its queue overflowed.
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

/// The largest subscriber queue: a bound per client must stay a bound (and tokio's
/// channels refuse capacities near `usize::MAX`). Larger capacities are clamped to it.
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

struct Subscriber {
    tx: mpsc::Sender<StreamItem>,
    filter: Option<RuntimeId>,
    lagged: Arc<AtomicBool>,
}

/// The ring of retained events and the live subscribers' queues.
pub(crate) struct EventLog {
    epoch: u64,
    last_seq: u64,
    ring: VecDeque<StreamItem>,
    /// Approximate bytes of the retained events (a payload never changes, so its size is the
    /// same when it is evicted as when it came).
    bytes: usize,
    retention: usize,
    max_bytes: usize,
    queue_capacity: usize,
    subscribers: Vec<Subscriber>,
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

impl EventLog {
    pub(crate) fn new(
        epoch: u64,
        retention: usize,
        max_bytes: usize,
        queue_capacity: usize,
    ) -> Self {
        EventLog {
            epoch,
            last_seq: 0,
            ring: VecDeque::with_capacity(retention.min(1024)),
            bytes: 0,
            retention: retention.max(1),
            max_bytes,
            queue_capacity: queue_capacity.clamp(1, MAX_SUBSCRIBER_QUEUE),
            subscribers: Vec::new(),
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

    /// Appends an event, evicting the oldest beyond retention (by count, or by bytes while
    /// more than one event is kept), and offers it to every
    /// matching subscriber without waiting: a full queue marks that subscriber lagged and
    /// drops it from the list (it gets reset + snapshot once it has read what it holds).
    pub(crate) fn publish(&mut self, payload: EventPayload) -> Cursor {
        self.last_seq += 1;
        let item = StreamItem::new(self.head(), payload);
        self.bytes += item.payload.approx_size();
        self.ring.push_back(item.clone());
        while self.ring.len() > self.retention
            || (self.bytes > self.max_bytes && self.ring.len() > 1)
        {
            if let Some(oldest) = self.ring.pop_front() {
                self.bytes -= oldest.payload.approx_size();
            }
        }
        let runtime = item.payload.runtime_id().cloned();
        self.subscribers.retain(|sub| {
            if !matches(&sub.filter, runtime.as_ref()) {
                return !sub.tx.is_closed();
            }
            match sub.tx.try_send(item.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.lagged.store(true, Ordering::Release);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        item.cursor
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
        // The oldest event the client still needs is c.seq + 1; it must be retained (or
        // not exist yet).
        let oldest = self
            .ring
            .front()
            .map_or(self.last_seq + 1, |i| i.cursor.seq);
        if c.seq + 1 < oldest {
            return Start::Reset(ResetReason::Expired);
        }
        let skip = (c.seq + 1 - oldest) as usize;
        Start::Replay(
            self.ring
                .iter()
                .skip(skip)
                .filter(|i| matches(filter, i.payload.runtime_id()))
                .cloned()
                .collect(),
        )
    }

    /// Whether the events after `seq` still retained hold the removal of `worker`.
    pub(crate) fn removed_since(&self, seq: u64, worker: &WorkerId) -> bool {
        self.ring.iter().rev().take_while(|i| i.cursor.seq > seq).any(|i| {
            matches!(&*i.payload, EventPayload::WorkerRemoved { worker_id, .. } if worker_id == worker)
        })
    }

    /// Adds a live subscriber; events published after this call reach its queue. Drops the
    /// subscribers that went away meanwhile, so an idle log does not collect them.
    pub(crate) fn register(
        &mut self,
        filter: Option<RuntimeId>,
    ) -> (mpsc::Receiver<StreamItem>, Arc<AtomicBool>) {
        self.subscribers.retain(|s| !s.tx.is_closed());
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let lagged = Arc::new(AtomicBool::new(false));
        self.subscribers.push(Subscriber {
            tx,
            filter,
            lagged: lagged.clone(),
        });
        (rx, lagged)
    }

    /// Drops every subscriber: their streams end once drained.
    pub(crate) fn close_all(&mut self) {
        self.subscribers.clear();
    }

    #[cfg(test)]
    pub(crate) fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }
}

fn matches(filter: &Option<RuntimeId>, runtime: Option<&RuntimeId>) -> bool {
    match (filter, runtime) {
        (None, _) | (_, None) => true,
        (Some(f), Some(r)) => f == r,
    }
}

/// What a subscription needs from the registry: a fresh snapshot and a new queue, taken
/// together under the registry's lock.
pub(crate) trait Resubscribe: Send + Sync {
    /// Reset + snapshot items and a new live queue; `None` once the registry is shut down.
    fn resubscribe(
        &self,
        reason: ResetReason,
        filter: &Option<RuntimeId>,
    ) -> Option<(Vec<Pending>, mpsc::Receiver<StreamItem>, Arc<AtomicBool>)>;
}

/// A live view of the registry's events from some point on.
///
/// It yields, in order: a `snapshot` (no cursor given) or the retained events after the
/// cursor (a valid one) or `reset` + `snapshot` (a cursor that can't be continued); then live
/// events. If it falls more than its queue's capacity behind, it yields what it holds, then
/// `reset {lagged}` + `snapshot`, and goes on live. It never slows the registry.
pub struct Subscription {
    pending: VecDeque<Pending>,
    rx: mpsc::Receiver<StreamItem>,
    lagged: Arc<AtomicBool>,
    filter: Option<RuntimeId>,
    source: Weak<dyn Resubscribe>,
}

impl Subscription {
    pub(crate) fn new(
        pending: Vec<Pending>,
        rx: mpsc::Receiver<StreamItem>,
        lagged: Arc<AtomicBool>,
        filter: Option<RuntimeId>,
        source: Weak<dyn Resubscribe>,
    ) -> Self {
        Subscription {
            pending: pending.into(),
            rx,
            lagged,
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
    /// has queued up in one go. `None` also when the queue is closed; [`next`](Self::next)
    /// then says what follows (a reset, or the end).
    pub fn try_next(&mut self) -> Option<StreamItem> {
        if let Some(item) = self.pending.pop_front() {
            return Some(item.into_item());
        }
        self.rx.try_recv().ok()
    }

    /// The next item; `None` once the registry has shut down.
    pub async fn next(&mut self) -> Option<StreamItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item.into_item());
            }
            if let Some(item) = self.rx.recv().await {
                return Some(item);
            }
            // The queue is closed: lagged, or the registry is gone.
            if !self.lagged.load(Ordering::Acquire) {
                return None;
            }
            let registry = self.source.upgrade()?;
            let (items, rx, lagged) = registry.resubscribe(ResetReason::Lagged, &self.filter)?;
            self.pending = items.into();
            self.rx = rx;
            self.lagged = lagged;
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("pending", &self.pending.len())
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
        assert_eq!(log.ring.len(), 3);
        assert_eq!(log.head().seq, 1000);
    }

    #[test]
    fn retention_bounds_the_ring_by_bytes_too() {
        let mut log = EventLog::new(1, 1000, 10 * 256, 10);
        for n in 0..100 {
            log.publish(removed(n));
        }
        // Each removal counts 256 bytes: ten fit.
        assert_eq!(log.ring.len(), 10);
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
        assert_eq!(log.ring.len(), 1);
        assert_eq!(log.ring[0].cursor.seq, 2);
    }

    #[test]
    fn a_full_queue_marks_only_that_subscriber_lagged() {
        let mut log = EventLog::new(1, 100, usize::MAX, 4);
        let (mut slow, slow_lagged) = log.register(None);
        let (mut fast, fast_lagged) = log.register(None);
        for n in 0..10 {
            log.publish(removed(n));
            // The fast one keeps up.
            assert_eq!(fast.try_recv().unwrap().cursor.seq, u64::from(n) + 1);
        }
        assert!(slow_lagged.load(Ordering::Acquire));
        assert!(!fast_lagged.load(Ordering::Acquire));
        assert_eq!(log.subscriber_count(), 1);
        // The slow one still gets what its queue held, in order, then the end.
        let held: Vec<u64> = std::iter::from_fn(|| slow.try_recv().ok())
            .map(|i| i.cursor.seq)
            .collect();
        assert_eq!(held, vec![1, 2, 3, 4]);
        assert_eq!(
            slow.try_recv().unwrap_err(),
            mpsc::error::TryRecvError::Disconnected
        );
    }

    #[test]
    fn subscribers_that_went_away_are_dropped_while_idle() {
        let mut log = EventLog::new(1, 10, usize::MAX, 4);
        for _ in 0..100 {
            drop(log.register(None));
        }
        let _kept = log.register(None);
        assert_eq!(log.subscriber_count(), 1);
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
        let (mut other, _) = log.register(Some(RuntimeId::new("other").unwrap()));
        let (mut mine, _) = log.register(Some(RuntimeId::new("old").unwrap()));
        log.publish(EventPayload::RuntimeRemoved {
            runtime_id: RuntimeId::new("old").unwrap(),
        });
        assert_eq!(
            mine.try_recv().unwrap().payload.event_type(),
            "runtime.removed"
        );
        assert!(other.try_recv().is_err());
    }
}
