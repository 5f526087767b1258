//! A worker's retained output, ready to serve [`RuntimeSource::output`]: the piece every
//! source that captures output itself needs.
//!
//! An [`OutputLog`] numbers chunks from 1 without holes, keeps at least the newest
//! `retention` bytes (plus at most one chunk), and serves any number of readers, each at its
//! own pace: a reader's position is its own cursor, so a slow reader holds back neither the
//! writer nor another reader. A reader that asks for chunks no longer retained gets an
//! [`OutputEvent::Gap`] first; once the log is [`finish`](OutputLog::finish)ed, readers that
//! have read everything get [`OutputEvent::End`].
//!
//! An [`OutputWriter`] turns reads of any size (from a pipe, a file, a pty) into chunks that
//! never split a UTF-8 character, since the HTTP API sends chunk data as text.
//!
//! ```
//! # async fn demo() -> Result<(), registry_core::RegistryError> {
//! use registry_core::output_log::OutputLog;
//! use registry_core::{OutputEvent, OutputRequest, StreamKind};
//!
//! let log = OutputLog::new(1024 * 1024);
//! let mut writer = log.writer(StreamKind::Stdout);
//! writer.write("caf\u{e9}\n".as_bytes());
//! writer.flush();
//! log.finish();
//!
//! let mut stream = log.stream(OutputRequest { after: 0, follow: true })?;
//! assert!(matches!(stream.recv().await, Some(OutputEvent::Chunk(c)) if c.seq == 1));
//! assert_eq!(stream.recv().await, Some(OutputEvent::End));
//! assert_eq!(stream.recv().await, None);
//! # Ok(()) }
//! ```
//!
//! [`RuntimeSource::output`]: crate::RuntimeSource::output

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use crate::{OutputChunk, OutputEvent, OutputRequest, OutputStream, RegistryError, StreamKind};

/// The largest chunk an [`OutputWriter`] makes.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Room of each stream made by [`OutputLog::stream`]: a reader this far behind paces only
/// its own stream's task.
pub const STREAM_CAPACITY: usize = 64;

#[derive(Debug)]
struct State {
    /// Retained chunks, with consecutive seqs.
    chunks: VecDeque<OutputChunk>,
    /// Sum of the retained chunks' lengths.
    bytes: u64,
    /// The seq the next chunk gets.
    next_seq: u64,
    retention: u64,
    /// No chunk follows, and readers that read everything get `End`.
    finished: bool,
    /// No chunk follows, and readers end without `End` (the source is gone).
    closed: bool,
}

impl State {
    fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

/// One worker's retained output. Share it as `Arc<OutputLog>`.
///
/// Every worker has one, finished ones included, so it is kept small: one allocation (the
/// `Arc`) for a log that never got a chunk, readers woken through an inline [`Notify`]
/// (a `watch` channel would add a shared block of its own, ~300 bytes, per worker).
pub struct OutputLog {
    state: Mutex<State>,
    /// Woken (every waiter) after each change of `state`.
    changed: Notify,
}

impl fmt::Debug for OutputLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("OutputLog")
            .field("last_seq", &st.last_seq())
            .field("retained_bytes", &st.bytes)
            .field("finished", &st.finished)
            .field("closed", &st.closed)
            .finish()
    }
}

impl OutputLog {
    /// An empty log that keeps at least the newest `retention` bytes.
    pub fn new(retention: u64) -> Arc<OutputLog> {
        Arc::new(OutputLog {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                bytes: 0,
                next_seq: 1,
                retention,
                finished: false,
                closed: false,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under this lock leaves the state consistent (every change is one step).
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a chunk and returns its seq; `None` for empty data or once the log is
    /// finished or closed. Whole chunks are evicted from the front while the rest still
    /// holds at least `retention` bytes, so memory stays below `retention` plus one chunk.
    pub fn push(&self, stream: StreamKind, data: Bytes) -> Option<u64> {
        if data.is_empty() {
            return None;
        }
        let seq = {
            let mut st = self.lock();
            if st.finished || st.closed {
                return None;
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            st.bytes += data.len() as u64;
            st.chunks.push_back(OutputChunk { seq, stream, data });
            while let Some(front) = st.chunks.front() {
                let len = front.data.len() as u64;
                if st.bytes - len < st.retention {
                    break;
                }
                st.bytes -= len;
                st.chunks.pop_front();
            }
            seq
        };
        self.changed.notify_waiters();
        Some(seq)
    }

    /// Marks the output complete (the worker is terminal and everything it wrote is in):
    /// readers that have read everything get [`OutputEvent::End`]. No effect on a closed log.
    pub fn finish(&self) {
        {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.finished = true;
        }
        self.changed.notify_waiters();
    }

    /// Marks the output abandoned (the source is gone before the worker ended): readers
    /// end without [`OutputEvent::End`] once they have read what is there. No effect on a
    /// finished log.
    pub fn close(&self) {
        {
            let mut st = self.lock();
            if st.finished {
                return;
            }
            st.closed = true;
        }
        self.changed.notify_waiters();
    }

    /// The seq of the newest chunk (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq()
    }

    /// The bytes retained now.
    pub fn retained_bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Whether [`finish`](Self::finish) was called.
    pub fn is_finished(&self) -> bool {
        self.lock().finished
    }

    /// A writer that appends to this log as `stream`.
    pub fn writer(self: &Arc<Self>, stream: StreamKind) -> OutputWriter {
        OutputWriter {
            log: Arc::clone(self),
            stream,
            carry: Vec::new(),
        }
    }

    /// A reader from `after` on, pulled with [`OutputReader::next`].
    ///
    /// `InvalidRequest` when `after` is beyond the newest seq: such a position names output
    /// that does not exist (yet), so following from it could skip chunks silently.
    pub fn reader(self: &Arc<Self>, request: OutputRequest) -> Result<OutputReader, RegistryError> {
        let st = self.lock();
        if request.after > st.last_seq() {
            return Err(RegistryError::InvalidRequest(format!(
                "`after` is {}, but this worker's newest output chunk is {}",
                request.after,
                st.last_seq()
            )));
        }
        let limit = (!request.follow).then_some(Limit {
            last_seq: st.last_seq(),
            finished: st.finished,
        });
        drop(st);
        Ok(OutputReader {
            log: Arc::clone(self),
            after: request.after,
            limit,
            done: false,
        })
    }

    /// The answer to [`RuntimeSource::output`](crate::RuntimeSource::output): a bounded
    /// stream ([`STREAM_CAPACITY`]) fed by a task that ends when the stream is dropped.
    /// Must be called within a tokio runtime.
    pub fn stream(self: &Arc<Self>, request: OutputRequest) -> Result<OutputStream, RegistryError> {
        let mut reader = self.reader(request)?;
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    item = reader.next() => match item {
                        Some(item) => {
                            if tx.send(item).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }
}

/// For `follow: false`: where the reader stops.
#[derive(Debug, Clone, Copy)]
struct Limit {
    last_seq: u64,
    finished: bool,
}

/// Reads one log from a position on; made by [`OutputLog::reader`].
#[derive(Debug)]
pub struct OutputReader {
    log: Arc<OutputLog>,
    /// The last seq yielded (or skipped by a gap).
    after: u64,
    limit: Option<Limit>,
    done: bool,
}

impl OutputReader {
    /// The next item, waiting for new output when following; `None` once the stream is
    /// over (after `End`, at the limit of a non-following reader, or on a closed log).
    pub async fn next(&mut self) -> Option<OutputEvent> {
        loop {
            if self.done {
                return None;
            }
            // Register as a waiter before looking, so a change after the look wakes this
            // future (`notify_waiters` wakes every enabled one): no lost wake-up.
            let log = Arc::clone(&self.log);
            let mut changed = std::pin::pin!(log.changed.notified());
            changed.as_mut().enable();
            if let Some(item) = self.poll() {
                return item;
            }
            changed.await;
        }
    }

    /// `Some(item)` when there is an answer now (`Some(None)`: over), `None` to wait.
    fn poll(&mut self) -> Option<Option<OutputEvent>> {
        let st = self.log.lock();
        let available = self.limit.map_or(st.last_seq(), |l| l.last_seq);
        let want = self.after + 1;
        if want <= available {
            let oldest = st.chunks.front().map_or(st.next_seq, |c| c.seq);
            if want < oldest {
                let to = (oldest - 1).min(available);
                self.after = to;
                return Some(Some(OutputEvent::Gap { from: want, to }));
            }
            // Retained seqs are consecutive, so the wanted chunk sits at a known index.
            let index = usize::try_from(want - oldest).unwrap_or(usize::MAX);
            if let Some(chunk) = st.chunks.get(index) {
                self.after = chunk.seq;
                return Some(Some(OutputEvent::Chunk(chunk.clone())));
            }
        }
        let finished = self.limit.map_or(st.finished, |l| l.finished);
        if finished && want > st.last_seq() {
            self.done = true;
            return Some(Some(OutputEvent::End));
        }
        if self.limit.is_some() || (st.closed && want > st.last_seq()) {
            self.done = true;
            return Some(None);
        }
        None
    }
}

/// Appends reads of any size to a log as one stream, in chunks of at most [`MAX_CHUNK`]
/// bytes that never split a UTF-8 character: an incomplete character at the end of a write
/// is carried into the next one. Invalid bytes are passed on as they are.
#[derive(Debug)]
pub struct OutputWriter {
    log: Arc<OutputLog>,
    stream: StreamKind,
    /// At most 3 bytes: the start of a character cut off by the end of the last write.
    carry: Vec<u8>,
}

impl OutputWriter {
    /// Appends `data`, holding back an incomplete trailing UTF-8 sequence.
    pub fn write(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            let room = MAX_CHUNK - self.carry.len();
            let (take, tail) = rest.split_at(rest.len().min(room));
            rest = tail;
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(take);
            let keep = complete_prefix_len(&buf);
            self.carry = buf.split_off(keep);
            if !buf.is_empty() {
                self.log.push(self.stream, Bytes::from(buf));
            }
        }
    }

    /// Appends the bytes of `buf` as [`write`](Self::write) does, and leaves `buf` empty.
    ///
    /// Where it can, `buf`'s allocation becomes the chunk itself, without a copy: when
    /// nothing is held back from the last write, the bytes fit one chunk, and the allocation
    /// is at most a third larger than the bytes (so the retention, which counts bytes, stays
    /// close to the memory held). `buf` is then left without an allocation. Otherwise the
    /// bytes are copied and `buf` keeps its allocation for the next read.
    pub fn write_from(&mut self, buf: &mut Vec<u8>) {
        let len = buf.len();
        let fits = self.carry.is_empty() && len <= MAX_CHUNK;
        if !fits || len == 0 || buf.capacity() - len > len / 3 {
            self.write(buf);
            buf.clear();
            return;
        }
        let mut data = std::mem::take(buf);
        let keep = complete_prefix_len(&data);
        self.carry = data.split_off(keep);
        if !data.is_empty() {
            self.log.push(self.stream, Bytes::from(data));
        }
    }

    /// Appends whatever is held back (at the end of the output).
    pub fn flush(&mut self) {
        if !self.carry.is_empty() {
            let carried = std::mem::take(&mut self.carry);
            self.log.push(self.stream, Bytes::from(carried));
        }
    }
}

/// How many bytes of `buf` can be emitted now: all but a trailing start of a multi-byte
/// character that is valid so far but cut off (at most 3 bytes).
fn complete_prefix_len(buf: &[u8]) -> usize {
    let len = buf.len();
    for back in 1..=3.min(len) {
        let start = len - back;
        if buf[start] & 0b1100_0000 == 0b1000_0000 {
            // A continuation byte: the character, if any, starts further back.
            continue;
        }
        return match std::str::from_utf8(&buf[start..]) {
            // `error_len() == None`: valid so far, but the input ended.
            Err(e) if e.valid_up_to() == 0 && e.error_len().is_none() => start,
            _ => len,
        };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    async fn collect(log: &Arc<OutputLog>, after: u64, follow: bool) -> Vec<OutputEvent> {
        let mut reader = log.reader(OutputRequest { after, follow }).unwrap();
        let mut out = Vec::new();
        while let Some(item) = reader.next().await {
            out.push(item);
        }
        out
    }

    fn seqs(events: &[OutputEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                OutputEvent::Chunk(c) => c.seq.to_string(),
                OutputEvent::Gap { from, to } => format!("gap {from}-{to}"),
                OutputEvent::End => "end".into(),
            })
            .collect()
    }

    #[test]
    fn retention_keeps_at_least_the_newest_bytes_and_at_most_one_chunk_more() {
        let log = OutputLog::new(100);
        for _ in 0..10 {
            log.push(StreamKind::Stdout, data(30));
        }
        // 4 chunks of 30 hold >= 100; dropping one more would leave 90.
        assert_eq!(log.retained_bytes(), 120);
        assert_eq!(log.last_seq(), 10);
        assert_eq!(log.push(StreamKind::Stdout, Bytes::new()), None);
    }

    #[tokio::test]
    async fn a_reader_behind_the_window_gets_a_gap_then_the_rest_then_end() {
        let log = OutputLog::new(60);
        for _ in 0..5 {
            log.push(StreamKind::Stdout, data(30));
        }
        log.finish();
        assert_eq!(
            seqs(&collect(&log, 0, true).await),
            ["gap 1-3", "4", "5", "end"]
        );
        assert_eq!(
            seqs(&collect(&log, 1, false).await),
            ["gap 2-3", "4", "5", "end"]
        );
        assert_eq!(seqs(&collect(&log, 5, true).await), ["end"]);
    }

    #[tokio::test]
    async fn after_beyond_the_newest_chunk_is_invalid_request() {
        let log = OutputLog::new(60);
        log.push(StreamKind::Stdout, data(1));
        let err = log
            .reader(OutputRequest {
                after: 2,
                follow: true,
            })
            .unwrap_err();
        assert_eq!(err.code(), "invalid_request");
    }

    #[tokio::test]
    async fn a_non_following_reader_stops_at_what_was_there_without_end_while_live() {
        let log = OutputLog::new(1000);
        log.push(StreamKind::Stdout, data(1));
        log.push(StreamKind::Stderr, data(1));
        let mut reader = log
            .reader(OutputRequest {
                after: 0,
                follow: false,
            })
            .unwrap();
        log.push(StreamKind::Stdout, data(1));
        let mut got = Vec::new();
        while let Some(item) = reader.next().await {
            got.push(item);
        }
        assert_eq!(seqs(&got), ["1", "2"]);
    }

    #[tokio::test]
    async fn a_following_stream_wakes_for_new_chunks_and_ends_with_end() {
        let log = OutputLog::new(1000);
        let mut stream = log
            .stream(OutputRequest {
                after: 0,
                follow: true,
            })
            .unwrap();
        let writer_log = Arc::clone(&log);
        tokio::spawn(async move {
            for i in 0..3u8 {
                writer_log.push(StreamKind::Stdout, Bytes::from(vec![b'a' + i]));
                tokio::task::yield_now().await;
            }
            writer_log.finish();
        });
        let mut got = Vec::new();
        while let Some(item) = stream.recv().await {
            got.push(item);
        }
        assert_eq!(seqs(&got), ["1", "2", "3", "end"]);
        assert_eq!(log.push(StreamKind::Stdout, data(1)), None, "finished");
    }

    #[tokio::test]
    async fn a_closed_log_ends_its_readers_without_end() {
        let log = OutputLog::new(1000);
        log.push(StreamKind::Stdout, data(1));
        log.close();
        log.finish();
        assert!(!log.is_finished(), "close wins over a later finish");
        assert_eq!(seqs(&collect(&log, 0, true).await), ["1"]);
    }

    #[tokio::test]
    async fn a_dropped_stream_ends_its_task() {
        let log = OutputLog::new(1000);
        let stream = log
            .stream(OutputRequest {
                after: 0,
                follow: true,
            })
            .unwrap();
        // The stream's task holds the log through its reader.
        assert_eq!(Arc::strong_count(&log), 2);
        drop(stream);
        for _ in 0..1000 {
            if Arc::strong_count(&log) == 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the stream's task still holds the log");
    }

    /// Every retained chunk's bytes, in order, each checked to be within the bound and to
    /// hold whole characters.
    fn joined_whole_chunks(log: &OutputLog) -> Vec<u8> {
        let st = log.lock();
        let mut joined = Vec::new();
        for chunk in &st.chunks {
            assert!(chunk.data.len() <= MAX_CHUNK, "a chunk over the bound");
            std::str::from_utf8(&chunk.data).expect("no chunk splits a character");
            joined.extend_from_slice(&chunk.data);
        }
        joined
    }

    #[test]
    fn the_writer_never_splits_a_character_and_loses_no_byte() {
        let text = "aé€😀z".repeat(40_000);
        let bytes = text.as_bytes();
        for read_size in [1, 2, 3, 5, 7, 4096, MAX_CHUNK - 1, MAX_CHUNK + 3] {
            let log = OutputLog::new(u64::MAX);
            let mut writer = log.writer(StreamKind::Stdout);
            for read in bytes.chunks(read_size) {
                writer.write(read);
            }
            writer.flush();
            assert_eq!(joined_whole_chunks(&log), bytes, "reads of {read_size}");
        }
    }

    #[test]
    fn writing_from_buffers_keeps_characters_whole_and_takes_only_well_filled_ones() {
        let text = "aé€😀z".repeat(40_000);
        let bytes = text.as_bytes();
        for read_size in [1, 3, 4096, MAX_CHUNK / 2, MAX_CHUNK - 1, MAX_CHUNK] {
            let log = OutputLog::new(u64::MAX);
            let mut writer = log.writer(StreamKind::Stdout);
            let mut buf = Vec::new();
            let mut taken = 0;
            for read in bytes.chunks(read_size) {
                if buf.capacity() < MAX_CHUNK {
                    buf.reserve_exact(MAX_CHUNK);
                }
                buf.extend_from_slice(read);
                writer.write_from(&mut buf);
                assert!(buf.is_empty());
                // Taken (left without an allocation) only when at least 3/4 full.
                if buf.capacity() == 0 {
                    assert!(
                        read.len() >= MAX_CHUNK * 3 / 4,
                        "took a buffer of {}",
                        read.len()
                    );
                    taken += 1;
                }
            }
            writer.flush();
            if read_size >= MAX_CHUNK - 1 {
                assert!(taken > 0, "reads of {read_size} were all copied");
            }
            assert_eq!(joined_whole_chunks(&log), bytes, "reads of {read_size}");
        }
    }

    #[test]
    fn invalid_bytes_pass_and_a_cut_tail_is_flushed_at_the_end() {
        let log = OutputLog::new(1000);
        let mut writer = log.writer(StreamKind::Stderr);
        writer.write(&[0xFF, b'a', 0xE2, 0x82]);
        assert_eq!(log.last_seq(), 1);
        writer.flush();
        let st = log.lock();
        let got: Vec<&[u8]> = st.chunks.iter().map(|c| c.data.as_ref()).collect();
        assert_eq!(got, [&[0xFF, b'a'][..], &[0xE2, 0x82][..]]);
        assert!(st.chunks.iter().all(|c| c.stream == StreamKind::Stderr));
    }
}
