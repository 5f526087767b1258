//! Per-worker output capture: the pipes copied into a byte-bounded log
//! ([`registry_core::output_log::OutputLog`], the log every source that captures output
//! uses), and the pull-based readers of that log in this crate's own types.

use std::io;
use std::sync::Arc;

use bytes::BufMut;
use registry_core::output_log::{OutputLog, OutputReader as LogReader};
use registry_core::{OutputEvent, OutputRequest};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use crate::types::Stream;

/// The largest read from a pipe, and so the largest chunk.
pub(crate) const CHUNK_SIZE: usize = registry_core::output_log::MAX_CHUNK;

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
        data: bytes::Bytes,
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

/// Copies one pipe into the log: chunks of up to [`CHUNK_SIZE`] bytes, never splitting a
/// UTF-8 character between chunks (an incomplete one is carried into the next chunk and
/// flushed at end of file). Every read of at least one byte notifies `activity`, so the
/// supervisor knows output still flows.
///
/// After each read that waited, whatever else the pipe holds already joins the same chunk
/// (reads that do not wait), so output that comes faster than it is read makes fewer,
/// fuller chunks, and a full chunk's buffer becomes the chunk without a copy
/// ([`OutputWriter::write_from`](registry_core::output_log::OutputWriter::write_from)).
pub(crate) async fn capture(
    mut pipe: pipe::Receiver,
    stream: Stream,
    log: Arc<OutputLog>,
    activity: Arc<Notify>,
) {
    let mut writer = log.writer(stream);
    let mut buf: Vec<u8> = Vec::new();
    let mut open = true;
    while open {
        if buf.capacity() < CHUNK_SIZE {
            buf.reserve_exact(CHUNK_SIZE);
        }
        match pipe.read_buf(&mut (&mut buf).limit(CHUNK_SIZE)).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, stream = ?stream, "worker output read failed");
                break;
            }
        }
        activity.notify_one();
        while buf.len() < CHUNK_SIZE {
            let room = CHUNK_SIZE - buf.len();
            match pipe.try_read_buf(&mut (&mut buf).limit(room)) {
                Ok(0) => open = false,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, stream = ?stream, "worker output read failed");
                    open = false;
                }
            }
            break;
        }
        writer.write_from(&mut buf);
    }
    writer.flush();
}

/// Reads one worker's retained output from a position on; see
/// [`Runtime::output`](crate::Runtime::output).
///
/// Pull-based: it keeps only its own cursor, so a slow reader never slows the runtime or
/// another reader. If it falls behind the retention window it gets an [`OutputItem::Gap`].
#[derive(Debug)]
pub struct OutputReader {
    inner: LogReader,
}

impl OutputReader {
    /// A reader of `log` from `after`, which the caller checked is not beyond the last seq.
    pub(crate) fn new(log: &Arc<OutputLog>, after: u64, follow: bool) -> Option<OutputReader> {
        let inner = log.reader(OutputRequest { after, follow }).ok()?;
        Some(OutputReader { inner })
    }

    /// The next item, waiting for new output when following.
    ///
    /// Yields chunks with `seq > after` in order, a [`OutputItem::Gap`] where chunks were
    /// evicted, and [`OutputItem::End`] once the worker is terminal and all was read; `None`
    /// after `End`. Without follow it stops at what was retained when the reader was made
    /// (with `End` only if the worker was terminal then).
    pub async fn next(&mut self) -> Option<OutputItem> {
        Some(match self.inner.next().await? {
            OutputEvent::Chunk(chunk) => OutputItem::Chunk {
                seq: chunk.seq,
                stream: chunk.stream,
                data: chunk.data,
            },
            OutputEvent::Gap { from, to } => OutputItem::Gap { from, to },
            OutputEvent::End => OutputItem::End,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pipe_is_captured_whole_in_chunks_that_keep_characters_and_streams() {
        let text = "é€😀-".repeat(30_000);
        let (mut tx, rx) = pipe::pipe().unwrap();
        let log = OutputLog::new(u64::MAX);
        let activity = Arc::new(Notify::new());
        let task = tokio::spawn(capture(rx, Stream::Stderr, Arc::clone(&log), activity));
        tokio::io::AsyncWriteExt::write_all(&mut tx, text.as_bytes())
            .await
            .unwrap();
        drop(tx);
        task.await.unwrap();
        log.finish();

        let mut reader = OutputReader::new(&log, 0, true).unwrap();
        let mut got = Vec::new();
        let mut next_seq = 1;
        loop {
            match reader.next().await {
                Some(OutputItem::Chunk { seq, stream, data }) => {
                    assert_eq!((seq, stream), (next_seq, Stream::Stderr));
                    std::str::from_utf8(&data).expect("no chunk splits a character");
                    got.extend_from_slice(&data);
                    next_seq += 1;
                }
                Some(OutputItem::End) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, text.as_bytes());
        assert_eq!(reader.next().await, None);
    }

    #[tokio::test]
    async fn a_gap_and_end_come_through_in_this_crate_s_types() {
        let log = OutputLog::new(10);
        for _ in 0..5 {
            log.push(Stream::Stdout, bytes::Bytes::from_static(b"12345"));
        }
        log.finish();
        let mut reader = OutputReader::new(&log, 0, true).unwrap();
        assert_eq!(
            reader.next().await,
            Some(OutputItem::Gap { from: 1, to: 3 })
        );
        assert!(matches!(
            reader.next().await,
            Some(OutputItem::Chunk {
                seq: 4,
                stream: Stream::Stdout,
                ..
            })
        ));
        assert!(matches!(
            reader.next().await,
            Some(OutputItem::Chunk { seq: 5, .. })
        ));
        assert_eq!(reader.next().await, Some(OutputItem::End));
    }
}
