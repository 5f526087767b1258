//! Per-worker output capture: a byte-bounded log of chunks and its pull-based readers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{watch, Notify};

use crate::types::Stream;
use crate::utf8::complete_prefix_len;
use crate::util::lock;

/// The largest read from a pipe, and so the largest chunk.
pub(crate) const CHUNK_SIZE: usize = 64 * 1024;

/// One item of a worker's output, as yielded by [`OutputReader::next`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputItem {
    /// Bytes from one stream. `seq` counts chunks of both streams together, from 1, without
    /// holes. `data` is raw: it may hold invalid UTF-8, but never splits a valid character.
    Chunk {
        /// The chunk's sequence number.
        seq: u64,
        /// The stream it came from.
        stream: Stream,
        /// The bytes.
        data: Bytes,
    },
    /// Chunks `from..=to` are no longer retained; the reader continues at the oldest retained.
    Gap {
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// The worker is terminal and every chunk was read. Nothing follows.
    End,
}

#[derive(Debug)]
struct Chunk {
    seq: u64,
    stream: Stream,
    data: Bytes,
}

#[derive(Debug)]
struct LogState {
    /// Retained chunks, with consecutive seqs.
    chunks: VecDeque<Chunk>,
    /// Sum of the retained chunks' lengths.
    bytes: u64,
    /// The seq the next chunk gets.
    next_seq: u64,
    retention: u64,
    /// Set once the worker is terminal and its pipes are drained: no chunk follows.
    ended: bool,
    /// Set when the runtime is gone before the worker ended: no chunk follows, and readers
    /// end (with `None`, not `End`) once they have read what is there.
    closed: bool,
}

/// The retained output of one worker, shared by its pipe readers and its output readers.
///
/// Readers pull from it under a short lock; appends bump a `watch` channel so waiting readers
/// wake up. A reader's progress is its own cursor, so a slow reader holds nothing back.
#[derive(Debug)]
pub(crate) struct OutputLog {
    state: Mutex<LogState>,
    changed: watch::Sender<()>,
}

impl OutputLog {
    pub(crate) fn new(retention: u64) -> Self {
        OutputLog {
            state: Mutex::new(LogState {
                chunks: VecDeque::new(),
                bytes: 0,
                next_seq: 1,
                retention,
                ended: false,
                closed: false,
            }),
            changed: watch::channel(()).0,
        }
    }

    /// Appends a chunk and evicts whole chunks from the front while the rest still holds at
    /// least `retention` bytes, so memory stays below `retention` plus one chunk.
    pub(crate) fn push(&self, stream: Stream, data: Bytes) {
        if data.is_empty() {
            return;
        }
        {
            let mut st = lock(&self.state);
            if st.ended || st.closed {
                return;
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            st.bytes += data.len() as u64;
            st.chunks.push_back(Chunk { seq, stream, data });
            while let Some(front) = st.chunks.front() {
                let len = front.data.len() as u64;
                if st.bytes - len >= st.retention {
                    st.bytes -= len;
                    st.chunks.pop_front();
                } else {
                    break;
                }
            }
        }
        self.changed.send_replace(());
    }

    /// Marks the output complete: readers that have read everything get [`OutputItem::End`].
    pub(crate) fn finish(&self) {
        lock(&self.state).ended = true;
        self.changed.send_replace(());
    }

    /// Marks the output abandoned, because the runtime is gone: readers that have read
    /// everything end without [`OutputItem::End`]. No effect on a finished log.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.send_replace(());
    }

    /// The seq of the last chunk written so far (0 before the first).
    pub(crate) fn last_seq(&self) -> u64 {
        lock(&self.state).next_seq - 1
    }

    /// Bytes currently retained.
    pub(crate) fn retained_bytes(&self) -> u64 {
        lock(&self.state).bytes
    }

    pub(crate) fn reader(self: &Arc<Self>, after: u64, follow: bool) -> OutputReader {
        // Subscribe before looking at the state, so an append after the look still wakes us.
        let changed = self.changed.subscribe();
        let limit = if follow {
            None
        } else {
            let st = lock(&self.state);
            Some(Limit {
                last_seq: st.next_seq - 1,
                ended: st.ended,
            })
        };
        OutputReader {
            log: Arc::clone(self),
            changed,
            after,
            limit,
            done: false,
        }
    }
}

/// Copies one pipe into the log: reads of up to [`CHUNK_SIZE`] bytes, carrying an incomplete
/// trailing UTF-8 sequence into the next chunk and flushing it at end of file. Every read of
/// at least one byte notifies `activity`, so the supervisor knows output still flows.
pub(crate) async fn capture<R>(
    mut pipe: R,
    stream: Stream,
    log: Arc<OutputLog>,
    activity: Arc<Notify>,
) where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut carried = 0usize;
    loop {
        let n = match pipe.read(&mut buf[carried..]).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, stream = stream.as_str(), "worker output read failed");
                break;
            }
        };
        activity.notify_one();
        let filled = carried + n;
        let keep = complete_prefix_len(&buf[..filled]);
        if keep > 0 {
            log.push(stream, Bytes::copy_from_slice(&buf[..keep]));
        }
        buf.copy_within(keep..filled, 0);
        carried = filled - keep;
    }
    if carried > 0 {
        log.push(stream, Bytes::copy_from_slice(&buf[..carried]));
    }
}

/// For `follow = false`: where the reader stops.
#[derive(Debug, Clone, Copy)]
struct Limit {
    last_seq: u64,
    ended: bool,
}

/// Reads one worker's retained output from a position on; see
/// [`Runtime::output`](crate::Runtime::output).
///
/// Pull-based: it keeps only its own cursor, so a slow reader never slows the runtime or
/// another reader. If it falls behind the retention window it gets an [`OutputItem::Gap`].
#[derive(Debug)]
pub struct OutputReader {
    log: Arc<OutputLog>,
    changed: watch::Receiver<()>,
    /// The last seq yielded (or skipped by a gap).
    after: u64,
    limit: Option<Limit>,
    done: bool,
}

impl OutputReader {
    /// The next item, waiting for new output when following.
    ///
    /// Yields chunks with `seq > after` in order, a [`OutputItem::Gap`] where chunks were
    /// evicted, and [`OutputItem::End`] once the worker is terminal and all was read; `None`
    /// after `End`. Without follow it stops at what was retained when the reader was made
    /// (with `End` only if the worker was terminal then).
    pub async fn next(&mut self) -> Option<OutputItem> {
        loop {
            if self.done {
                return None;
            }
            // Mark the current version seen *before* looking, so a push after the look makes
            // `changed()` return at once: no lost wake-up.
            self.changed.borrow_and_update();
            if let Some(item) = self.poll_log() {
                return item;
            }
            if self.changed.changed().await.is_err() {
                // Unreachable while we hold the log (it owns the sender); end defensively.
                self.done = true;
                return None;
            }
        }
    }

    /// `Some(item)` when there is something to return now (`Some(None)` = finished), `None`
    /// when the reader has to wait.
    fn poll_log(&mut self) -> Option<Option<OutputItem>> {
        let st = lock(&self.log.state);
        let last_available = match self.limit {
            Some(limit) => limit.last_seq,
            None => st.next_seq - 1,
        };
        let want = self.after + 1;
        if want <= last_available {
            let oldest = st.chunks.front().map_or(st.next_seq, |c| c.seq);
            if want < oldest {
                let to = (oldest - 1).min(last_available);
                self.after = to;
                return Some(Some(OutputItem::Gap { from: want, to }));
            }
            // Retained seqs are consecutive, so the wanted chunk sits at a known index.
            let index = usize::try_from(want - oldest).unwrap_or(usize::MAX);
            if let Some(chunk) = st.chunks.get(index) {
                self.after = chunk.seq;
                return Some(Some(OutputItem::Chunk {
                    seq: chunk.seq,
                    stream: chunk.stream,
                    data: chunk.data.clone(),
                }));
            }
        }
        let ended = match self.limit {
            Some(limit) => limit.ended,
            None => st.ended,
        };
        if ended && want > st.next_seq - 1 {
            self.done = true;
            return Some(Some(OutputItem::End));
        }
        if self.limit.is_some() || (st.closed && want > st.next_seq - 1) {
            self.done = true;
            return Some(None);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn retention_keeps_at_least_the_newest_bytes_and_at_most_one_chunk_more() {
        let log = OutputLog::new(100);
        for _ in 0..50 {
            log.push(Stream::Stdout, data(30));
            let bytes = log.retained_bytes();
            assert!(bytes <= 130, "{bytes}");
        }
        assert!(log.retained_bytes() >= 100);
    }

    #[tokio::test]
    async fn reader_behind_the_window_gets_a_gap_then_the_rest_in_order() {
        let log = Arc::new(OutputLog::new(10));
        for _ in 0..5 {
            log.push(Stream::Stdout, data(5));
        }
        log.finish();
        let mut reader = log.reader(0, true);
        assert_eq!(
            reader.next().await,
            Some(OutputItem::Gap { from: 1, to: 3 })
        );
        for seq in 4..=5 {
            match reader.next().await {
                Some(OutputItem::Chunk { seq: s, .. }) => assert_eq!(s, seq),
                other => panic!("expected chunk {seq}, got {other:?}"),
            }
        }
        assert_eq!(reader.next().await, Some(OutputItem::End));
        assert_eq!(reader.next().await, None);
    }

    #[tokio::test]
    async fn non_following_reader_stops_at_what_was_retained() {
        let log = Arc::new(OutputLog::new(1000));
        log.push(Stream::Stdout, data(1));
        log.push(Stream::Stderr, data(1));
        let mut reader = log.reader(1, false);
        log.push(Stream::Stdout, data(1));
        assert!(matches!(
            reader.next().await,
            Some(OutputItem::Chunk {
                seq: 2,
                stream: Stream::Stderr,
                ..
            })
        ));
        assert_eq!(reader.next().await, None);
    }

    #[tokio::test]
    async fn a_closed_log_ends_its_readers_without_end_after_the_retained_chunks() {
        let log = Arc::new(OutputLog::new(1000));
        let mut waiting = log.reader(0, true);
        log.push(Stream::Stdout, data(1));
        log.close();
        log.push(Stream::Stdout, data(1));
        assert!(matches!(
            waiting.next().await,
            Some(OutputItem::Chunk { seq: 1, .. })
        ));
        assert_eq!(waiting.next().await, None);
        assert_eq!(log.last_seq(), 1, "nothing is appended once closed");
    }

    #[tokio::test]
    async fn following_reader_wakes_up_for_new_chunks_and_end() {
        let log = Arc::new(OutputLog::new(1000));
        let mut reader = log.reader(0, true);
        let writer = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                log.push(Stream::Stdout, Bytes::from_static(b"a"));
                log.finish();
            })
        };
        assert!(matches!(
            reader.next().await,
            Some(OutputItem::Chunk { seq: 1, .. })
        ));
        assert_eq!(reader.next().await, Some(OutputItem::End));
        writer.await.unwrap();
    }
}
