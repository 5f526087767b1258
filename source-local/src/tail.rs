//! Following a worker's log file: from its start, then whatever is appended, across
//! truncation and rotation. Blocking; each call runs on the blocking pool.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use registry_core::output_log::{OutputWriter, MAX_CHUNK};

/// The most bytes one [`Tail::pump`] reads while the worker lives before it lets others
/// run (it is called again at once when there is more).
pub(crate) const PUMP_BUDGET: u64 = 1 << 20;

/// What a pump found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pumped {
    /// At the end of the log: wait for more.
    Idle,
    /// The budget is spent and there is more to read.
    More,
    /// The log can't be opened or read (the reason names no path).
    Unreadable(String),
}

/// The read side of one log.
pub(crate) struct Tail {
    path: PathBuf,
    /// The open log and its (device, inode).
    file: Option<(File, (u64, u64))>,
    /// How far the open log has been read.
    offset: u64,
    writer: OutputWriter,
    buf: Vec<u8>,
}

impl fmt::Debug for Tail {
    // Redacting: the path is internal authority.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tail")
            .field("open", &self.file.is_some())
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Tail {
    pub(crate) fn new(path: PathBuf, writer: OutputWriter) -> Tail {
        Tail {
            path,
            file: None,
            offset: 0,
            writer,
            buf: Vec::new(),
        }
    }

    /// Reads what is new, at most about `budget` bytes: opens the log on first use (from
    /// its start), starts again from 0 after a truncation (the file is now shorter than
    /// what was read), and after a rotation (the path names another file) reads the old
    /// file to its end before it opens the new one from 0.
    ///
    /// A truncation is noticed at the end of what was read: a log truncated and written
    /// past the old length before the next look is read on from the old offset. A log
    /// written without `O_APPEND` goes on at the writer's old offset after a truncation,
    /// and the hole reads as NUL bytes; that is the file's content.
    pub(crate) fn pump(&mut self, budget: u64) -> Pumped {
        if self.buf.is_empty() {
            self.buf = vec![0; MAX_CHUNK];
        }
        if self.file.is_none() {
            match open(&self.path) {
                Ok(opened) => {
                    self.file = Some(opened);
                    self.offset = 0;
                }
                Err(e) => return Pumped::Unreadable(io_reason(&e)),
            }
        }
        let mut read = 0u64;
        loop {
            let Some((file, id)) = self.file.as_mut() else {
                return Pumped::Idle;
            };
            match file.read(&mut self.buf) {
                Ok(0) => {
                    let size = match file.metadata() {
                        Ok(m) => m.len(),
                        Err(e) => return Pumped::Unreadable(io_reason(&e)),
                    };
                    if size < self.offset {
                        if let Err(e) = file.seek(SeekFrom::Start(0)) {
                            return Pumped::Unreadable(io_reason(&e));
                        }
                        self.offset = 0;
                        continue;
                    }
                    let rotated = fs::metadata(&self.path)
                        .map(|m| (m.dev(), m.ino()) != *id)
                        .unwrap_or(false);
                    if !rotated {
                        return Pumped::Idle;
                    }
                    // What the writer added to the old file since the last read comes
                    // first; it is bounded by the old file's size now.
                    let rest = size.saturating_sub(self.offset);
                    if rest > 0 {
                        let mut old = file.take(rest);
                        loop {
                            match old.read(&mut self.buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    self.writer.write(&self.buf[..n]);
                                    self.offset += n as u64;
                                    read += n as u64;
                                }
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                Err(_) => break,
                            }
                        }
                    }
                    match open(&self.path) {
                        Ok(opened) => {
                            self.file = Some(opened);
                            self.offset = 0;
                        }
                        // Gone again meanwhile: keep the old one, look again later.
                        Err(_) => return Pumped::Idle,
                    }
                }
                Ok(n) => {
                    self.writer.write(&self.buf[..n]);
                    self.offset += n as u64;
                    read += n as u64;
                    if read >= budget {
                        return Pumped::More;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Pumped::Unreadable(io_reason(&e)),
            }
        }
    }

    /// The last read, once the worker has ended: to the ends of the log as they are now
    /// (the old file and, after a rotation, the new one), bounded by their sizes at this
    /// moment, so that a process left in the group that writes on can't keep it going.
    /// Then whatever the writer held back goes out.
    pub(crate) fn drain(&mut self) {
        let mut limit = MAX_CHUNK as u64;
        match &self.file {
            Some((file, id)) => {
                limit += file
                    .metadata()
                    .map(|m| m.len().saturating_sub(self.offset))
                    .unwrap_or(0);
                if let Ok(m) = fs::metadata(&self.path) {
                    if (m.dev(), m.ino()) != *id {
                        limit += m.len();
                    }
                }
            }
            None => {
                limit += fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
            }
        }
        let mut left = limit;
        while left > 0 {
            let step = left.min(PUMP_BUDGET);
            match self.pump(step) {
                Pumped::More => left = left.saturating_sub(step),
                Pumped::Idle | Pumped::Unreadable(_) => break,
            }
        }
        self.writer.flush();
    }

    /// Whether the log has been opened.
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.file.is_some()
    }
}

fn open(path: &PathBuf) -> io::Result<(File, (u64, u64))> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::from(io::ErrorKind::IsADirectory));
    }
    Ok((file, (meta.dev(), meta.ino())))
}

/// An I/O error as words, without a path.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "it does not exist".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::IsADirectory => "it is a directory".into(),
        kind => format!("I/O error ({kind})"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use registry_core::output_log::OutputLog;
    use registry_core::{OutputEvent, OutputRequest, StreamKind};

    use super::*;

    fn text_of(log: &std::sync::Arc<OutputLog>) -> (String, Vec<u64>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = log
                .reader(OutputRequest {
                    after: 0,
                    follow: false,
                })
                .unwrap();
            let mut text = Vec::new();
            let mut seqs = Vec::new();
            while let Some(event) = r.next().await {
                if let OutputEvent::Chunk(c) = event {
                    text.extend_from_slice(&c.data);
                    seqs.push(c.seq);
                }
            }
            (String::from_utf8(text).unwrap(), seqs)
        })
    }

    fn append(path: &std::path::Path, text: &str) {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_tail_follows_appends_truncation_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let log = OutputLog::new(1 << 20);
        let mut tail = Tail::new(path.clone(), log.writer(StreamKind::Stdout));
        assert_eq!(
            tail.pump(PUMP_BUDGET),
            Pumped::Unreadable("it does not exist".into())
        );
        assert!(!tail.is_open());

        append(&path, "one\ntwo\n");
        assert_eq!(tail.pump(PUMP_BUDGET), Pumped::Idle);
        append(&path, "three\n");
        assert_eq!(tail.pump(PUMP_BUDGET), Pumped::Idle);

        // Truncated, then a little written: read from 0 again.
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        append(&path, "4\n");
        assert_eq!(tail.pump(PUMP_BUDGET), Pumped::Idle);

        // Rotated: the old file gets a late line, then a new file appears.
        fs::rename(&path, dir.path().join("w.log.1")).unwrap();
        append(&dir.path().join("w.log.1"), "late\n");
        assert_eq!(tail.pump(PUMP_BUDGET), Pumped::Idle);
        append(&path, "new\n");
        append(&dir.path().join("w.log.1"), "later\n");
        assert_eq!(tail.pump(PUMP_BUDGET), Pumped::Idle);
        append(&path, "end\n");
        tail.drain();

        let (text, seqs) = text_of(&log);
        assert_eq!(text, "one\ntwo\nthree\n4\nlate\nlater\nnew\nend\n");
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want);
    }

    #[test]
    fn a_pump_stops_at_its_budget_and_drain_reads_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        let line = "0123456789abcdef\n";
        let body = line.repeat(300_000);
        fs::write(&path, &body).unwrap();
        let log = OutputLog::new(u64::MAX);
        let mut tail = Tail::new(path, log.writer(StreamKind::Stdout));
        assert_eq!(tail.pump(PUMP_BUDGET), Pumped::More);
        tail.drain();
        let (text, _) = text_of(&log);
        assert_eq!(text.len(), body.len());
        assert!(text == body);
    }
}
