//! The runtime's event sequence: a bounded ring of events and its pull-based readers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::types::{LocalId, WorkerInfo};
use crate::util::lock;

/// One entry of the runtime's event sequence, as yielded by [`EventReader::next`].
// Nearly every event is an `Upserted`: boxing its view would cost an allocation each time
// to save a few hundred bytes on the rare `Removed` and `Gap`.
#[allow(clippy::large_enum_variant)]
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
    /// The approximate size of `events` (see [`approx_size`]).
    bytes: u64,
    max_bytes: u64,
}

/// An event's approximate footprint: the event itself plus the strings of its worker view,
/// each with its `String` header. An estimate, to bound memory, not an exact count.
fn approx_size(event: &RuntimeEvent) -> u64 {
    let fixed = std::mem::size_of::<RuntimeEvent>();
    let RuntimeEvent::Upserted { worker, .. } = event else {
        return fixed as u64;
    };
    let string = |s: &String| std::mem::size_of::<String>() + s.len();
    let strings = worker.name.iter().map(string).sum::<usize>()
        + worker.profile.iter().map(string).sum::<usize>()
        + worker.message.iter().map(string).sum::<usize>()
        + worker
            .labels
            .iter()
            .map(|(k, v)| string(k) + string(v))
            .sum::<usize>()
        + worker.args.iter().map(string).sum::<usize>()
        + worker.command.iter().flatten().map(string).sum::<usize>();
    (fixed + strings) as u64
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
#[allow(clippy::large_enum_variant)] // as for `RuntimeEvent`
pub(crate) enum NewEvent {
    Upserted(WorkerInfo),
    Removed(LocalId),
}

impl EventLog {
    /// A ring of at most `capacity` events and about `max_bytes` bytes (always at least the
    /// newest event).
    pub(crate) fn new(capacity: usize, max_bytes: u64) -> Self {
        EventLog {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(4096)),
                next_seq: 1,
                capacity: capacity.max(1),
                bytes: 0,
                max_bytes,
            }),
            changed: watch::channel(()).0,
        }
    }

    pub(crate) fn push(&self, event: NewEvent) {
        {
            let mut ring = lock(&self.ring);
            let seq = ring.next_seq;
            ring.next_seq += 1;
            let event = match event {
                NewEvent::Upserted(worker) => RuntimeEvent::Upserted { seq, worker },
                NewEvent::Removed(id) => RuntimeEvent::Removed { seq, id },
            };
            ring.bytes += approx_size(&event);
            ring.events.push_back(event);
            // Evict the oldest while over either bound, but keep the newest: a reader behind
            // the ring gets a `Gap`.
            while ring.events.len() > 1
                && (ring.events.len() > ring.capacity || ring.bytes > ring.max_bytes)
            {
                if let Some(old) = ring.events.pop_front() {
                    ring.bytes -= approx_size(&old);
                }
            }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use super::*;
    use crate::types::State;

    fn worker(id: u64, name_len: usize) -> WorkerInfo {
        WorkerInfo {
            id: LocalId(id),
            name: Some("n".repeat(name_len)),
            labels: BTreeMap::new(),
            state: State::Starting,
            exit_code: None,
            signal: None,
            reason: None,
            created_at: SystemTime::now(),
            started_at: None,
            ended_at: None,
            profile: None,
            args: Vec::new(),
            command: None,
            restarts: 0,
            last_exit: None,
            retry_at: None,
            message: None,
            health: None,
        }
    }

    #[test]
    fn the_ring_is_bounded_by_bytes_and_a_reader_behind_it_gets_a_gap() {
        let log = Arc::new(EventLog::new(4096, 100_000));
        for id in 1..=100 {
            log.push(NewEvent::Upserted(worker(id, 10_000)));
            assert!(lock(&log.ring).bytes <= 100_000);
        }
        let kept = lock(&log.ring).events.len();
        assert!((5..=10).contains(&kept), "{kept} events kept");
        let mut reader = log.reader(0);
        let first_kept = 100 - kept as u64 + 1;
        assert_eq!(
            reader.try_next(),
            Some(RuntimeEvent::Gap {
                from: 1,
                to: first_kept - 1
            })
        );
        assert_eq!(reader.try_next().map(|e| e.seq()), Some(first_kept));
    }

    #[test]
    fn the_newest_event_is_kept_even_when_it_alone_is_over_the_bytes() {
        let log = Arc::new(EventLog::new(4096, 10));
        log.push(NewEvent::Upserted(worker(1, 1000)));
        log.push(NewEvent::Upserted(worker(2, 1000)));
        let mut reader = log.reader(1);
        assert!(matches!(
            reader.try_next(),
            Some(RuntimeEvent::Upserted { seq: 2, .. })
        ));
    }
}
