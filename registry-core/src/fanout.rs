//! The lifecycle streams of a source: one bounded channel per reader of
//! [`RuntimeSource::events`](crate::RuntimeSource::events), and the rule for a reader that
//! falls behind — it gets nothing more until a fresh `Resync` fits, which it then gets
//! (the trait's "owe a Resync").
//!
//! [`Subscribers`] lives inside the source's own state, under the lock that also guards the
//! workers, so a change and its event are one step. [`Subscribers::send`] returns the
//! streams that just overflowed as [`Owed`]; the source waits (outside its lock) until one
//! has room with [`Owed::ready`], then, under its lock again, computes the whole truth and
//! hands it to [`Subscribers::repay`]:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use registry_core::fanout::{Owed, Subscribers};
//! use registry_core::{SourceEvent, SourceHealth};
//!
//! struct State { subs: Subscribers, workers: Vec<registry_core::SourceWorker> }
//!
//! fn emit(state: &Arc<Mutex<State>>, st: &mut State, event: SourceEvent) {
//!     for owed in st.subs.send(&event) {
//!         let state = Arc::clone(state);
//!         tokio::spawn(async move {
//!             if let Some(owed) = owed.ready().await {
//!                 let mut st = state.lock().unwrap();
//!                 let truth = vec![
//!                     SourceEvent::Resync(st.workers.clone()),
//!                     SourceEvent::Health(SourceHealth::ready()),
//!                 ];
//!                 st.subs.repay(owed, truth);
//!             }
//!         });
//!     }
//! }
//! ```

use tokio::sync::mpsc;

use crate::{SourceEvent, SourceEvents};

/// The room a repayment needs: a `Resync` and the health.
pub const RESYNC_ROOM: usize = 2;

#[derive(Debug)]
struct Sub {
    id: u64,
    tx: mpsc::Sender<SourceEvent>,
    /// An event could not be delivered: the next thing it gets is a `Resync`.
    owes_resync: bool,
}

/// The open lifecycle streams of one source.
#[derive(Debug)]
pub struct Subscribers {
    subs: Vec<Sub>,
    next_id: u64,
    capacity: usize,
}

/// A stream that overflowed and is owed the whole truth; see [`Subscribers::send`].
#[derive(Debug)]
pub struct Owed {
    id: u64,
    tx: mpsc::Sender<SourceEvent>,
}

impl Owed {
    /// Waits until the stream has room for [`RESYNC_ROOM`] events; `None` once its reader
    /// is gone. Nothing else is sent to a stream while it is owed, so the room stays until
    /// [`Subscribers::repay`] uses it.
    pub async fn ready(self) -> Option<Owed> {
        drop(self.tx.reserve_many(RESYNC_ROOM).await.ok()?);
        Some(self)
    }
}

impl Subscribers {
    /// No streams yet; each stream will hold `capacity` events (at least [`RESYNC_ROOM`]).
    pub fn new(capacity: usize) -> Subscribers {
        Subscribers {
            subs: Vec::new(),
            next_id: 0,
            capacity: capacity.max(RESYNC_ROOM),
        }
    }

    /// The events one stream holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Opens a stream whose first events are `first` (the `Resync`, perhaps the health; at
    /// most [`capacity`](Self::capacity) of them).
    pub fn subscribe(&mut self, first: Vec<SourceEvent>) -> SourceEvents {
        debug_assert!(first.len() <= self.capacity);
        let (tx, rx) = mpsc::channel(self.capacity);
        for event in first {
            // A fresh channel has room for them.
            let _ = tx.try_send(event);
        }
        self.subs.push(Sub {
            id: self.next_id,
            tx,
            owes_resync: false,
        });
        self.next_id += 1;
        rx
    }

    /// Sends `event` to every stream. A stream that is owed a `Resync` gets nothing; one
    /// that is full from now on is owed one and returned, for the caller to repay; a closed
    /// one is dropped.
    #[must_use = "an overflowed stream must be repaid with the whole truth"]
    pub fn send(&mut self, event: &SourceEvent) -> Vec<Owed> {
        let mut owed = Vec::new();
        self.subs.retain_mut(|sub| {
            if sub.owes_resync {
                return true;
            }
            match sub.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.owes_resync = true;
                    owed.push(Owed {
                        id: sub.id,
                        tx: sub.tx.clone(),
                    });
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        owed
    }

    /// Sends an owed stream the whole `truth` (at most [`RESYNC_ROOM`] events, the
    /// `Resync` first), after which it gets every event again. A stream closed or dropped
    /// meanwhile gets nothing.
    pub fn repay(&mut self, owed: Owed, truth: Vec<SourceEvent>) {
        debug_assert!(truth.len() <= RESYNC_ROOM);
        let Some(sub) = self.subs.iter_mut().find(|s| s.id == owed.id) else {
            return;
        };
        for event in truth {
            // `Owed::ready` saw the room, and nothing else was sent since.
            let _ = sub.tx.try_send(event);
        }
        sub.owes_resync = false;
    }

    /// Drops every stream: each ends once its reader has read what it holds.
    pub fn clear(&mut self) {
        self.subs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SourceHealth, SourceKey};

    fn removed(n: u64) -> SourceEvent {
        SourceEvent::Removed(SourceKey::new(n.to_string()))
    }

    #[tokio::test]
    async fn a_full_stream_is_owed_gets_nothing_more_and_is_repaid_with_the_truth() {
        let mut subs = Subscribers::new(3);
        let mut slow = subs.subscribe(vec![SourceEvent::Resync(Vec::new())]);
        let mut fast = subs.subscribe(vec![SourceEvent::Resync(Vec::new())]);
        let mut owed = Vec::new();
        for n in 0..4 {
            owed.extend(subs.send(&removed(n)));
            // The fast reader keeps up.
            while let Ok(event) = fast.try_recv() {
                let _ = event;
            }
        }
        assert_eq!(owed.len(), 1, "only the slow stream overflowed, once");
        // The slow one holds the Resync and 2 events; event 2 did not fit, 3 was skipped.
        assert!(matches!(slow.try_recv(), Ok(SourceEvent::Resync(_))));
        assert!(matches!(slow.try_recv(), Ok(SourceEvent::Removed(k)) if k.as_str() == "0"));
        assert!(matches!(slow.try_recv(), Ok(SourceEvent::Removed(k)) if k.as_str() == "1"));
        let owed = owed
            .pop()
            .unwrap()
            .ready()
            .await
            .expect("the reader is there");
        subs.repay(
            owed,
            vec![
                SourceEvent::Resync(Vec::new()),
                SourceEvent::Health(SourceHealth::ready()),
            ],
        );
        assert!(matches!(slow.try_recv(), Ok(SourceEvent::Resync(_))));
        assert!(matches!(slow.try_recv(), Ok(SourceEvent::Health(_))));
        assert!(subs.send(&removed(9)).is_empty());
        assert!(matches!(slow.try_recv(), Ok(SourceEvent::Removed(k)) if k.as_str() == "9"));
    }

    #[tokio::test]
    async fn a_closed_stream_is_dropped_and_a_cleared_one_ends() {
        let mut subs = Subscribers::new(4);
        drop(subs.subscribe(Vec::new()));
        let mut open = subs.subscribe(Vec::new());
        assert!(subs.send(&removed(1)).is_empty());
        assert_eq!(subs.subs.len(), 1, "the closed stream is gone");
        subs.clear();
        assert!(matches!(open.recv().await, Some(SourceEvent::Removed(_))));
        assert!(
            open.recv().await.is_none(),
            "the stream ends after what it held"
        );
    }

    #[tokio::test]
    async fn an_owed_stream_whose_reader_left_is_not_repaid() {
        let mut subs = Subscribers::new(2);
        let rx = subs.subscribe(vec![removed(0), removed(1)]);
        let owed = subs.send(&removed(2));
        assert_eq!(owed.len(), 1);
        drop(rx);
        assert!(owed.into_iter().next().unwrap().ready().await.is_none());
    }
}
