//! The runtime's event sequence: a bounded ring of events and its pull-based readers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::types::{LocalId, WorkerInfo};
use crate::util::lock;

/// One entry of the runtime's event sequence, as yielded by [`EventReader::next`].
#[derive(Clone, Debug, PartialEq)]
pub enum RuntimeEvent {
    /// A worker was created or changed; `worker` is its full view after the change.
    Upserted {
        /// The event's sequence number (from 1, no holes).
        seq: u64,
        /// The worker as it is now.
        worker: WorkerInfo,
    },
    /// A worker record was removed.
    Removed {
        /// The event's sequence number.
        seq: u64,
        /// The removed worker.
        id: LocalId,
    },
    /// Events `from..=to` are no longer retained; the reader resumes at the oldest retained
    /// event. A reader that gets this should resynchronise from
    /// [`Runtime::snapshot`](crate::Runtime::snapshot).
    Gap {
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
}

impl RuntimeEvent {
    /// The event's seq; for a gap, the last seq it covers.
    pub fn seq(&self) -> u64 {
        match self {
            RuntimeEvent::Upserted { seq, .. } | RuntimeEvent::Removed { seq, .. } => *seq,
            RuntimeEvent::Gap { to, .. } => *to,
        }
    }
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<RuntimeEvent>,
    next_seq: u64,
    capacity: usize,
}

/// The event ring. Writers append while holding the runtime's table lock (so the order of
/// events is the order of changes, and a snapshot can read "all workers + last seq" at once);
/// readers only take the ring's own lock, briefly.
#[derive(Debug)]
pub(crate) struct EventLog {
    ring: Mutex<Ring>,
    changed: watch::Sender<()>,
}

/// What to append: the seq is assigned by the ring.
pub(crate) enum NewEvent {
    Upserted(WorkerInfo),
    Removed(LocalId),
}

impl EventLog {
    pub(crate) fn new(capacity: usize) -> Self {
        EventLog {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(4096)),
                next_seq: 1,
                capacity: capacity.max(1),
            }),
            changed: watch::channel(()).0,
        }
    }

    pub(crate) fn push(&self, event: NewEvent) {
        {
            let mut ring = lock(&self.ring);
            let seq = ring.next_seq;
            ring.next_seq += 1;
            if ring.events.len() >= ring.capacity {
                ring.events.pop_front();
            }
            ring.events.push_back(match event {
                NewEvent::Upserted(worker) => RuntimeEvent::Upserted { seq, worker },
                NewEvent::Removed(id) => RuntimeEvent::Removed { seq, id },
            });
        }
        self.changed.send_replace(());
    }

    /// The seq of the last event appended (0 before the first).
    pub(crate) fn last_seq(&self) -> u64 {
        lock(&self.ring).next_seq - 1
    }

    /// A receiver that is notified on every append.
    pub(crate) fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    pub(crate) fn reader(self: &Arc<Self>, after: u64) -> EventReader {
        EventReader {
            changed: self.changed.subscribe(),
            log: Arc::clone(self),
            after,
        }
    }
}

/// Reads the runtime's events from a position on; see [`Runtime::events`](crate::Runtime::events).
///
/// Pull-based: it holds only its cursor, so a slow reader never blocks the runtime. If it falls
/// behind the ring it gets a [`RuntimeEvent::Gap`] and continues at the oldest retained event.
#[derive(Debug)]
pub struct EventReader {
    log: Arc<EventLog>,
    changed: watch::Receiver<()>,
    /// The last seq yielded (or skipped by a gap).
    after: u64,
}

impl EventReader {
    /// Waits for and returns the next event (seq greater than the last one returned).
    ///
    /// If the runtime is dropped, this waits forever; drop the reader with the runtime.
    pub async fn next(&mut self) -> RuntimeEvent {
        loop {
            // Mark seen before looking, so an append after the look wakes `changed()`.
            self.changed.borrow_and_update();
            if let Some(event) = self.try_next() {
                return event;
            }
            if self.changed.changed().await.is_err() {
                // The sender lives as long as the log we hold, so this does not happen.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The next event if one is available now, without waiting.
    pub fn try_next(&mut self) -> Option<RuntimeEvent> {
        let ring = lock(&self.log.ring);
        let want = self.after + 1;
        if want >= ring.next_seq {
            return None;
        }
        let oldest = ring.events.front().map_or(ring.next_seq, RuntimeEvent::seq);
        if want < oldest {
            self.after = oldest - 1;
            return Some(RuntimeEvent::Gap {
                from: want,
                to: oldest - 1,
            });
        }
        // Retained seqs are consecutive, so the wanted event sits at a known index.
        let index = usize::try_from(want - oldest).ok()?;
        let event = ring.events.get(index)?.clone();
        self.after = want;
        Some(event)
    }

    /// The seq of the last event returned (or skipped by a gap).
    pub fn position(&self) -> u64 {
        self.after
    }
}
