//! `LocalSource`: the registry's view of workers an older launcher started on this host.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use registry_core::fanout::{Owed, Subscribers};
use registry_core::output_log::OutputLog;
use registry_core::{
    Capabilities, Diagnostic, HealthStatus, OutputRequest, OutputStream, Redacted, RegistryError,
    RuntimeSource, SourceEvent, SourceEvents, SourceHealth, SourceKey, SourceWorker, SpawnRequest,
    StreamKind, WorkerState,
};
use time::OffsetDateTime;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep, timeout_at, Instant};

use crate::descriptor::Descriptor;
use crate::error::LocalError;
use crate::procfs::{self, Handle, Liveness, Probe};
use crate::spool::{self, Fingerprint, Problem, Scan, Seen, SpoolError};
use crate::tail::{Pumped, Tail, PUMP_BUDGET};
use crate::watch::DirWatch;
use crate::LocalConfig;

/// How many lifecycle events a reader of [`RuntimeSource::events`] may leave unread before
/// it is owed a fresh `Resync` in their place.
pub(crate) const EVENTS_BUFFER: usize = 256;

/// The most diagnostics reported; past it, one more says how many were left out.
pub(crate) const MAX_DIAGNOSTICS: usize = 64;

/// Descriptor files kept track of beyond `max_workers` (bad ones, dismissed ones, ones
/// waiting for room). Files past `max_workers + EXTRA_FILES` (by name) are not looked at.
pub(crate) const EXTRA_FILES: usize = 4096;

/// How long a rescan waits after an inotify event, so that a burst costs one scan.
const DEBOUNCE: Duration = Duration::from_millis(10);

/// How often a live worker's log is looked at when inotify says nothing.
pub(crate) const LOG_POLL: Duration = Duration::from_millis(100);

/// How long an input may wait for the worker's socket (connect and write together).
pub(crate) const INPUT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a missing spool directory is looked for, at most.
const MISSING_RETRY: Duration = Duration::from_secs(1);

/// A [`RuntimeSource`] over the descriptor files of an older launcher. See the crate docs
/// for its rules.
///
/// Build it inside a tokio runtime: it reads the spool directory once at once, then follows
/// it with tasks of its own, which end when the source is shut down or dropped.
pub struct LocalSource {
    inner: Arc<Inner>,
}

struct Inner {
    /// This `Inner`, for the tasks it starts.
    me: Weak<Inner>,
    config: LocalConfig,
    state: Mutex<State>,
    watch: Arc<DirWatch>,
    shutdown: watch::Sender<bool>,
}

/// How the spool directory answered the last look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spool {
    Ok,
    Missing,
    Unreadable(std::io::ErrorKind),
}

/// What this source knows of one descriptor file.
struct FileEntry {
    /// Stable for as long as the file is there: how diagnostics and the log name it.
    number: u64,
    fingerprint: Fingerprint,
    /// Why the file's current version gives no descriptor.
    problem: Option<Problem>,
    /// The worker of this file. Kept while the file is malformed (it may be mid-rewrite).
    worker: Option<SourceKey>,
    /// A good descriptor not followed yet: `max_workers` is reached.
    waiting: Option<Descriptor>,
    /// (pid, start) of a record removed on request or after `retain_finished`: not taken
    /// up again while the file names that process.
    dismissed: Option<(i32, i64)>,
}

/// One worker.
struct Worker {
    key: SourceKey,
    /// The number of its descriptor file.
    number: u64,
    pid: i32,
    started_secs: i64,
    started_at: OffsetDateTime,
    name: Option<String>,
    socket: Option<PathBuf>,
    state: WorkerState,
    ended_at: Option<OffsetDateTime>,
    /// Listed and reported. A worker found already ended becomes visible once its log is
    /// read in, so that when it shows as ended its output is complete.
    visible: bool,
    stop_requested: bool,
    /// How the live process is watched and signalled; `None` when found ended.
    handle: Option<Arc<Handle>>,
    output: Arc<OutputLog>,
    /// The kept connection to the socket, one writer at a time.
    input: Arc<tokio::sync::Mutex<Option<UnixStream>>>,
    /// Ends the worker's task (the record is gone).
    cancel: watch::Sender<bool>,
}

struct State {
    workers: HashMap<SourceKey, Worker>,
    files: BTreeMap<OsString, FileEntry>,
    next_number: u64,
    spool: Spool,
    /// Good descriptors waiting for room (`max_workers`).
    waiting: usize,
    /// Descriptor files past the file table's bound.
    beyond: usize,
    /// Why a live worker's log can't be read, by descriptor number.
    log_problems: BTreeMap<u64, String>,
    subs: Subscribers,
    /// The health last reported on the lifecycle streams.
    reported: Option<SourceHealth>,
    closed: bool,
}

impl fmt::Debug for LocalSource {
    // Redacting: the spool directory, pids and paths are internal authority.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("LocalSource")
            .field("workers", &st.workers.len())
            .field("descriptors", &st.files.len())
            .field("spool", &st.spool)
            .field("watch", &self.inner.watch)
            .finish_non_exhaustive()
    }
}

impl LocalSource {
    /// Starts following `config.spool_dir`. Reads the directory once before it returns,
    /// so that the first `list` already holds what is there. Fails with `invalid_request`
    /// for an invalid config and `internal` outside a tokio runtime.
    pub fn new(mut config: LocalConfig) -> Result<Self, RegistryError> {
        config.validate().map_err(RegistryError::InvalidRequest)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(RegistryError::internal(
                "the local source must be built inside a tokio runtime",
            ));
        }
        config.spool_dir = std::path::absolute(&config.spool_dir)
            .map_err(|e| RegistryError::internal(format!("the spool directory: {e}")))?
            .into();
        let watch = Arc::new(DirWatch::new(config.spool_dir.0.clone(), config.watch));
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            state: Mutex::new(State {
                workers: HashMap::new(),
                files: BTreeMap::new(),
                next_number: 0,
                spool: Spool::Ok,
                waiting: 0,
                beyond: 0,
                log_problems: BTreeMap::new(),
                subs: Subscribers::new(EVENTS_BUFFER),
                reported: None,
                closed: false,
            }),
            watch,
            shutdown: watch::channel(false).0,
            config,
        });
        inner.watch.ensure_spool();
        let first = inner.read_spool();
        inner.apply_scan(first);
        tokio::spawn(discover(Arc::downgrade(&inner), inner.shutdown.subscribe()));
        Ok(LocalSource { inner })
    }

    /// How many unread lifecycle events make this source owe a reader a `Resync` (for the
    /// conformance suite's harness).
    pub fn events_to_overflow(&self) -> usize {
        EVENTS_BUFFER + 1
    }
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        self.inner.close();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under this lock is one step: a panic leaves it consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn max_files(&self) -> usize {
        self.config.max_workers.saturating_add(EXTRA_FILES)
    }

    /// One look at the spool directory, reading the descriptors that changed. Blocking.
    fn read_spool(&self) -> Result<Scan, SpoolError> {
        let known: HashMap<OsString, Fingerprint> = self
            .lock()
            .files
            .iter()
            .map(|(name, e)| (name.clone(), e.fingerprint))
            .collect();
        spool::scan(
            &self.config.spool_dir,
            &known,
            self.max_files(),
            self.config.max_descriptor_bytes,
        )
    }

    /// Rescans on the blocking pool and applies what changed.
    async fn rescan(self: &Arc<Self>) {
        let me = Arc::clone(self);
        let scan = tokio::task::spawn_blocking(move || {
            me.watch.ensure_spool();
            me.read_spool()
        })
        .await;
        match scan {
            Ok(scan) => self.apply_scan(scan),
            Err(e) => tracing::error!(error = %e, "a rescan of the spool directory failed"),
        }
        self.expire();
    }

    /// Brings the records in line with a look at the spool directory.
    fn apply_scan(&self, scan: Result<Scan, SpoolError>) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        let scan = match scan {
            Ok(scan) => scan,
            Err(e) => {
                // Workers are kept: a directory that is briefly gone (a remount, say) must
                // not drop them. One that comes back empty does, at the next look.
                st.spool = match e {
                    SpoolError::Missing => Spool::Missing,
                    SpoolError::Unreadable(kind) => Spool::Unreadable(kind),
                };
                self.refresh_health(&mut st);
                return;
            }
        };
        st.spool = Spool::Ok;
        st.beyond = scan.beyond;
        let present: HashSet<&OsString> = scan.files.iter().map(|(name, _)| name).collect();
        let gone: Vec<OsString> = st
            .files
            .keys()
            .filter(|name| !present.contains(name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(entry) = st.files.remove(&name) {
                if let Some(key) = entry.worker {
                    self.drop_worker(&mut st, &key);
                }
            }
        }
        for (name, seen) in scan.files {
            if let Seen::Changed(fingerprint, content) = seen {
                self.file_changed(&mut st, name, fingerprint, content);
            }
        }
        self.admit(&mut st);
        self.refresh_health(&mut st);
    }

    /// A descriptor file is new or has changed.
    fn file_changed(
        &self,
        st: &mut State,
        name: OsString,
        fingerprint: Fingerprint,
        content: Result<Descriptor, Problem>,
    ) {
        if !st.files.contains_key(&name) {
            st.next_number += 1;
            let number = st.next_number;
            st.files.insert(
                name.clone(),
                FileEntry {
                    number,
                    fingerprint,
                    problem: None,
                    worker: None,
                    waiting: None,
                    dismissed: None,
                },
            );
        }
        let Some(entry) = st.files.get_mut(&name) else {
            return;
        };
        entry.fingerprint = fingerprint;
        let number = entry.number;
        let desc = match content {
            Err(problem) => {
                // The log of the server names the file; the diagnostic only its number.
                tracing::warn!(
                    descriptor = number,
                    file = %name.to_string_lossy(),
                    code = problem.code(),
                    "{}",
                    problem.message("the descriptor")
                );
                entry.problem = Some(problem);
                entry.waiting = None;
                return;
            }
            Ok(desc) => desc.resolve(&self.config.spool_dir),
        };
        entry.problem = None;
        entry.waiting = None;
        let ident = (*desc.pid, desc.started_secs());
        if entry.dismissed.is_some_and(|d| d != ident) {
            entry.dismissed = None;
        }
        let dismissed = entry.dismissed.is_some();
        if let Some(key) = entry.worker.clone() {
            let same = st
                .workers
                .get(&key)
                .is_some_and(|w| (w.pid, w.started_secs) == ident);
            if same {
                self.update_worker(st, &key, desc);
                return;
            }
            // The file now names another process: its old worker is gone.
            if let Some(entry) = st.files.get_mut(&name) {
                entry.worker = None;
            }
            self.drop_worker(st, &key);
        }
        if !dismissed {
            if let Some(entry) = st.files.get_mut(&name) {
                entry.waiting = Some(desc);
            }
        }
    }

    /// A rewritten descriptor of the same process: a live worker takes its new name and
    /// socket. (Its log stays the one first seen.)
    fn update_worker(&self, st: &mut State, key: &SourceKey, desc: Descriptor) {
        let Some(w) = st.workers.get_mut(key) else {
            return;
        };
        if w.state.is_terminal() {
            return;
        }
        let renamed = w.name != desc.name;
        w.name = desc.name;
        let socket = desc.socket.map(Redacted::into_inner);
        if w.socket != socket {
            w.socket = socket;
            if let Ok(mut conn) = w.input.try_lock() {
                *conn = None;
            }
        }
        if renamed && w.visible {
            let view = view(w);
            self.emit(st, SourceEvent::Upsert(view));
        }
    }

    /// Takes up waiting descriptors, by file name, while there is room.
    fn admit(&self, st: &mut State) {
        let waiting: Vec<OsString> = st
            .files
            .iter()
            .filter(|(_, e)| e.waiting.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        let mut left = 0;
        for name in waiting {
            if st.workers.len() >= self.config.max_workers {
                left += 1;
                continue;
            }
            let Some(entry) = st.files.get_mut(&name) else {
                continue;
            };
            let Some(desc) = entry.waiting.take() else {
                continue;
            };
            let number = entry.number;
            let key = self.load(st, &name, number, desc);
            if let Some(entry) = st.files.get_mut(&name) {
                entry.worker = Some(key);
            }
        }
        st.waiting = left;
    }

    /// Makes the record of a descriptor and starts its task.
    fn load(&self, st: &mut State, file: &OsStr, number: u64, desc: Descriptor) -> SourceKey {
        let started_secs = desc.started_secs();
        let pid = *desc.pid;
        let key = key_for(file, pid, started_secs);
        let now = OffsetDateTime::now_utc();
        let (state, ended_at, handle) = match procfs::probe(pid, started_secs) {
            Probe::Alive(handle) => (WorkerState::Running, None, Some(Arc::new(handle))),
            Probe::Gone => (WorkerState::Exited, Some(now), None),
        };
        let output = OutputLog::new(self.config.output_retention);
        let (cancel, cancelled) = watch::channel(false);
        let worker = Worker {
            key: key.clone(),
            number,
            pid,
            started_secs,
            started_at: desc.started_at,
            name: desc.name,
            socket: desc.socket.map(Redacted::into_inner),
            state,
            ended_at,
            visible: handle.is_some(),
            stop_requested: false,
            handle: handle.clone(),
            output: Arc::clone(&output),
            input: Arc::new(tokio::sync::Mutex::new(None)),
            cancel,
        };
        let job = Job {
            key: key.clone(),
            number,
            pid,
            started_secs,
            handle,
            log: desc.log.map(Redacted::into_inner),
            output,
            cancelled,
            poll_interval: self.config.poll_interval,
            watch: Arc::clone(&self.watch),
        };
        let visible = worker.visible.then(|| view(&worker));
        st.workers.insert(key.clone(), worker);
        if let Some(view) = visible {
            self.emit(st, SourceEvent::Upsert(view));
        }
        tokio::spawn(follow(self.me.clone(), job));
        key
    }

    /// Removes a worker's record: its task ends, its output streams end, and it is
    /// reported gone (if it was ever reported).
    fn drop_worker(&self, st: &mut State, key: &SourceKey) {
        let Some(w) = st.workers.remove(key) else {
            return;
        };
        w.cancel.send_replace(true);
        w.output.close();
        st.log_problems.remove(&w.number);
        if w.visible {
            self.emit(st, SourceEvent::Removed(key.clone()));
        }
    }

    /// Removes the record of a terminal worker and remembers its descriptor as dismissed.
    fn dismiss(&self, st: &mut State, key: &SourceKey) {
        let Some(w) = st.workers.get(key) else {
            return;
        };
        let ident = (w.pid, w.started_secs);
        if let Some(entry) = st
            .files
            .values_mut()
            .find(|e| e.worker.as_ref() == Some(key))
        {
            entry.worker = None;
            entry.dismissed = Some(ident);
        }
        self.drop_worker(st, key);
    }

    /// Removes ended records older than `retain_finished`.
    fn expire(&self) {
        let mut st = self.lock();
        let now = OffsetDateTime::now_utc();
        let keep = self.config.retain_finished;
        let old: Vec<SourceKey> = st
            .workers
            .values()
            .filter(|w| w.visible && w.state.is_terminal())
            .filter(|w| w.ended_at.is_some_and(|t| now - t >= keep))
            .map(|w| w.key.clone())
            .collect();
        if old.is_empty() {
            return;
        }
        for key in &old {
            self.dismiss(&mut st, key);
        }
        // Room may have come free for waiting descriptors.
        self.admit(&mut st);
        self.refresh_health(&mut st);
    }

    /// The process of a worker has ended and its log is read: the worker is terminal
    /// (`stopped` if a stop was asked for, else `exited` without an exit code) and shown.
    fn mark_ended(&self, key: &SourceKey) {
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(key) else {
            return;
        };
        if !w.state.is_terminal() {
            w.state = if w.stop_requested {
                WorkerState::Stopped
            } else {
                WorkerState::Exited
            };
            w.ended_at = Some(OffsetDateTime::now_utc());
        }
        w.visible = true;
        let number = w.number;
        let view = view(w);
        self.emit(&mut st, SourceEvent::Upsert(view));
        if st.log_problems.remove(&number).is_some() {
            self.refresh_health(&mut st);
        }
    }

    /// Records why a live worker's log can't be read (`None`: it can now).
    fn set_log_problem(&self, key: &SourceKey, problem: Option<String>) {
        let mut st = self.lock();
        let Some(number) = st.workers.get(key).map(|w| w.number) else {
            return;
        };
        let changed = match problem {
            Some(p) => st.log_problems.insert(number, p.clone()) != Some(p),
            None => st.log_problems.remove(&number).is_some(),
        };
        if changed {
            self.refresh_health(&mut st);
        }
    }

    fn health_of(&self, st: &State) -> SourceHealth {
        let mut health = SourceHealth::ready();
        let mut diagnostics = Vec::new();
        let retry = self.config.poll_interval.min(MISSING_RETRY);
        match st.spool {
            Spool::Ok => {}
            Spool::Missing => {
                let message = "the spool directory does not exist or is not a directory; \
                               looking for it again";
                health =
                    SourceHealth::unavailable(message, Some(OffsetDateTime::now_utc() + retry));
                diagnostics.push(diag("spool_dir_missing", message.to_string()));
            }
            Spool::Unreadable(kind) => {
                let message = format!(
                    "the spool directory can't be read ({}); trying again",
                    match kind {
                        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                        kind => kind.to_string(),
                    }
                );
                health = SourceHealth::unavailable(
                    message.clone(),
                    Some(OffsetDateTime::now_utc() + self.config.poll_interval),
                );
                diagnostics.push(diag("spool_dir_unreadable", message));
            }
        }
        if st.waiting > 0 {
            diagnostics.push(diag(
                "too_many_workers",
                format!(
                    "{} descriptor(s) are not followed yet: this runtime keeps at most {} worker \
                     records (max_workers); they are taken up as records go",
                    st.waiting, self.config.max_workers
                ),
            ));
        }
        if st.beyond > 0 {
            diagnostics.push(diag(
                "too_many_workers",
                format!(
                    "{} descriptor(s) are not looked at: the spool directory holds more than {} \
                     descriptors",
                    st.beyond,
                    self.max_files()
                ),
            ));
        }
        let mut bad: Vec<(u64, &Problem)> = st
            .files
            .values()
            .filter_map(|e| e.problem.as_ref().map(|p| (e.number, p)))
            .collect();
        bad.sort_by_key(|(n, _)| *n);
        for (number, problem) in bad {
            diagnostics.push(diag(
                problem.code(),
                problem.message(&format!("descriptor #{number}")),
            ));
        }
        for (number, why) in &st.log_problems {
            diagnostics.push(diag(
                "log_unreadable",
                format!("the log of descriptor #{number} can't be opened: {why}"),
            ));
        }
        if diagnostics.len() > MAX_DIAGNOSTICS {
            let more = diagnostics.len() - (MAX_DIAGNOSTICS - 1);
            diagnostics.truncate(MAX_DIAGNOSTICS - 1);
            diagnostics.push(diag(
                "more_diagnostics",
                format!("and {more} more problems"),
            ));
        }
        if health.status == HealthStatus::Ready && !diagnostics.is_empty() {
            // It answers, with problems (SPEC: `degraded`).
            health.status = HealthStatus::Degraded;
            health.message = Some(format!(
                "{} problem(s) with the spool directory's descriptors; see the diagnostics",
                diagnostics.len()
            ));
        }
        health.diagnostics = diagnostics;
        health
    }

    /// Reports the health on the lifecycle streams if it changed.
    fn refresh_health(&self, st: &mut State) {
        let health = self.health_of(st);
        if st.reported.as_ref() != Some(&health) {
            st.reported = Some(health.clone());
            self.emit(st, SourceEvent::Health(health));
        }
    }

    fn views(st: &State) -> Vec<SourceWorker> {
        let mut list: Vec<&Worker> = st.workers.values().filter(|w| w.visible).collect();
        list.sort_by_key(|w| (w.started_at, w.number));
        list.into_iter().map(view).collect()
    }

    /// Sends `event` to every lifecycle stream. A full stream gets nothing more until a
    /// `Resync` (and the health) can go to it in one piece; a closed one is dropped.
    fn emit(&self, st: &mut State, event: SourceEvent) {
        for owed in st.subs.send(&event) {
            let me = self.me.clone();
            let mut shutdown = self.shutdown.subscribe();
            tokio::spawn(async move {
                let owed = tokio::select! {
                    owed = owed.ready() => owed,
                    _ = shutdown.wait_for(|s| *s) => return,
                };
                if let (Some(owed), Some(me)) = (owed, me.upgrade()) {
                    me.repay(owed);
                }
            });
        }
    }

    /// Sends a stream that overflowed, now that it has room, the whole truth.
    fn repay(&self, owed: Owed) {
        let mut st = self.lock();
        let truth = vec![
            SourceEvent::Resync(Self::views(&st)),
            SourceEvent::Health(self.health_of(&st)),
        ];
        st.subs.repay(owed, truth);
    }

    /// Stops following: tasks end, output streams of live workers end without `End`,
    /// lifecycle streams end. The processes are left alone.
    fn close(&self) {
        {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            for w in st.workers.values() {
                w.cancel.send_replace(true);
                w.output.close();
            }
            st.subs.clear();
        }
        self.shutdown.send_replace(true);
        self.watch.close();
    }
}

/// The registry's view of a worker.
fn view(w: &Worker) -> SourceWorker {
    SourceWorker {
        key: w.key.clone(),
        name: w.name.clone(),
        labels: BTreeMap::new(),
        state: w.state,
        exit_code: None,
        reason: None,
        // The record stands for the process the launcher started: it dates from then.
        created_at: w.started_at,
        started_at: Some(w.started_at),
        ended_at: w.ended_at,
        last_seen_at: None,
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

fn diag(code: &str, message: String) -> Diagnostic {
    Diagnostic {
        code: code.to_string(),
        message,
    }
}

/// The key of the worker a descriptor file names: a hash of the file's name, the pid and
/// the start time, so a descriptor rewritten for another process is another worker, and
/// the key says nothing of any of them.
fn key_for(file: &OsStr, pid: i32, started_secs: i64) -> SourceKey {
    let mut h = blake3::Hasher::new();
    h.update(b"source-local/v1");
    h.update(&(file.len() as u64).to_le_bytes());
    h.update(file.as_bytes());
    h.update(&pid.to_le_bytes());
    h.update(&started_secs.to_le_bytes());
    let hex = h.finalize().to_hex();
    SourceKey::new(format!("local-{}", &hex[..32]))
}

/// What a worker's task needs.
struct Job {
    key: SourceKey,
    number: u64,
    pid: i32,
    started_secs: i64,
    /// `None`: the process had ended when the descriptor was found.
    handle: Option<Arc<Handle>>,
    log: Option<PathBuf>,
    output: Arc<OutputLog>,
    cancelled: watch::Receiver<bool>,
    poll_interval: Duration,
    watch: Arc<DirWatch>,
}

/// A pidfd shared with the record, registered with tokio's reactor.
struct PidfdRef(Arc<Handle>);

impl AsRawFd for PidfdRef {
    fn as_raw_fd(&self) -> RawFd {
        match &*self.0 {
            Handle::Pidfd(fd) => fd.as_raw_fd(),
            // Never made for a handle without a pidfd.
            Handle::Poll => -1,
        }
    }
}

/// Completes when the process has ended: when its pidfd turns readable, or (without one)
/// when `/proc` no longer shows it, looked at every `poll_interval`.
async fn wait_exit(handle: Option<Arc<Handle>>, pid: i32, started_secs: i64, every: Duration) {
    let Some(handle) = handle else { return };
    if let Handle::Pidfd(_) = &*handle {
        // SAFETY: `PidfdRef` holds the `Arc` that owns the pidfd, so the fd stays open and
        // the same for as long as the `AsyncFd` lives, and `as_raw_fd` always returns it.
        let registered = unsafe {
            AsyncFd::register_with_interest(PidfdRef(Arc::clone(&handle)), Interest::READABLE)
        };
        match registered {
            Ok(fd) => {
                // Readable once the process has ended; an error means the same for us.
                let _ = fd.readable().await;
                return;
            }
            Err(e) => tracing::debug!(error = %e, "a pidfd could not be registered; polling it"),
        }
    }
    loop {
        sleep(every).await;
        let ended = match &*handle {
            Handle::Pidfd(fd) => fd.has_exited(),
            Handle::Poll => procfs::liveness(pid, started_secs) != Liveness::Same,
        };
        if ended {
            return;
        }
    }
}

/// Follows one worker: tails its log into its output while the process lives, and when it
/// has ended reads the log to its end, marks the worker terminal, and finishes the output.
/// Ends early (closing the output without `End`) when the record is removed or the source
/// shuts down.
async fn follow(inner: Weak<Inner>, job: Job) {
    let Job {
        key,
        number,
        pid,
        started_secs,
        handle,
        log,
        output,
        mut cancelled,
        poll_interval,
        watch,
    } = job;
    let wake = Arc::new(Notify::new());
    if let Some(path) = &log {
        let (watch, path, wake) = (Arc::clone(&watch), path.clone(), Arc::clone(&wake));
        let _ = tokio::task::spawn_blocking(move || watch.add_log(number, &path, wake)).await;
    }
    let live = handle.is_some();
    let mut tail = log
        .clone()
        .map(|path| Tail::new(path, output.writer(StreamKind::Stdout)));
    let mut exit = pin!(wait_exit(handle, pid, started_secs, poll_interval));
    let mut problem: Option<String> = None;
    let cancelled_early = loop {
        if *cancelled.borrow() {
            break true;
        }
        let mut more = false;
        if let Some(t) = tail.take() {
            let Ok((t, pumped)) = tokio::task::spawn_blocking(move || {
                let mut t = t;
                let pumped = t.pump(PUMP_BUDGET);
                (t, pumped)
            })
            .await
            else {
                // The blocking pool is gone (the runtime shuts down).
                break true;
            };
            tail = Some(t);
            more = pumped == Pumped::More;
            let now = match pumped {
                Pumped::Unreadable(why) if live => Some(why),
                _ => None,
            };
            if now != problem {
                problem = now.clone();
                if let Some(inner) = inner.upgrade() {
                    inner.set_log_problem(&key, now);
                }
            }
        }
        if more {
            continue;
        }
        tokio::select! {
            biased;
            _ = cancelled.wait_for(|c| *c) => break true,
            () = &mut exit => break false,
            () = wake.notified(), if tail.is_some() => {}
            () = sleep(LOG_POLL), if tail.is_some() => {}
        }
    };
    if !cancelled_early {
        if let Some(t) = tail.take() {
            let drained = tokio::task::spawn_blocking(move || {
                let mut t = t;
                t.drain();
                t
            })
            .await;
            drop(drained);
        }
        if let Some(inner) = inner.upgrade() {
            inner.mark_ended(&key);
        }
        output.finish();
    } else {
        output.close();
    }
    if let Some(path) = log {
        let _ = tokio::task::spawn_blocking(move || watch.remove_log(number, &path)).await;
    }
}

/// Follows the spool directory: a rescan on every inotify wake-up (after a short
/// debounce) and every `poll_interval` whatever happens; expired records go at each.
async fn discover(inner: Weak<Inner>, mut shutdown: watch::Receiver<bool>) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let wakers = Arc::clone(&strong.watch.wakers);
    let every = strong.config.poll_interval;
    drop(strong);
    loop {
        let missing = match inner.upgrade() {
            Some(inner) => {
                let spool = inner.lock().spool;
                spool != Spool::Ok
            }
            None => return,
        };
        let period = if missing {
            every.min(MISSING_RETRY)
        } else {
            every
        };
        let woken = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            () = wakers.rescan.notified() => true,
            () = sleep(period) => false,
        };
        if woken {
            sleep(DEBOUNCE).await;
        }
        let Some(inner) = inner.upgrade() else { return };
        if *shutdown.borrow_and_update() {
            return;
        }
        inner.rescan().await;
    }
}

/// Sends SIGKILL once `grace` has passed, unless the process has ended meanwhile (seen on
/// `waited`, a copy of the pidfd, or through `/proc`) or the source shuts down.
async fn escalate(
    handle: Arc<Handle>,
    waited: Option<Arc<Handle>>,
    pid: i32,
    started_secs: i64,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let waited = waited.unwrap_or_else(|| Arc::new(Handle::Poll));
    let ended = wait_exit(Some(waited), pid, started_secs, LOG_POLL);
    tokio::select! {
        () = sleep(grace) => {}
        () = ended => return,
        _ = shutdown.wait_for(|s| *s) => return,
    }
    match procfs::signal(pid, started_secs, &handle, libc::SIGKILL) {
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "SIGKILL after the grace could not be sent"),
    }
}

#[async_trait]
impl RuntimeSource for LocalSource {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            spawn: false,
            input: true,
            stop: true,
            output: true,
            remove: true,
            restart: false,
        }
    }

    async fn health(&self) -> SourceHealth {
        let st = self.inner.lock();
        self.inner.health_of(&st)
    }

    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        Ok(Inner::views(&self.inner.lock()))
    }

    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        let st = self.inner.lock();
        match st.workers.get(key) {
            Some(w) if w.visible => Ok(view(w)),
            _ => Err(LocalError::NotFound.into()),
        }
    }

    async fn spawn(&self, _request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        Err(LocalError::Spawn.into())
    }

    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError> {
        let (handle, pid, started_secs) = {
            let mut st = self.inner.lock();
            if st.closed {
                return Err(LocalError::ShutDown.into());
            }
            let w = match st.workers.get_mut(key) {
                Some(w) if w.visible => w,
                _ => return Err(LocalError::NotFound.into()),
            };
            if w.state.is_terminal() || w.state == WorkerState::Stopping {
                return Ok(());
            }
            let Some(handle) = w.handle.clone() else {
                return Ok(());
            };
            // Ended, not yet reported: there is nothing to stop.
            if let Handle::Pidfd(fd) = &*handle {
                if fd.has_exited() {
                    return Ok(());
                }
            }
            // Signal 0 asks whether we may signal it at all, before the state says so.
            match procfs::signal(w.pid, w.started_secs, &handle, 0) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    return Err(LocalError::NotPermitted.into())
                }
                Err(e) => return Err(LocalError::Internal(format!("signal 0: {e}")).into()),
            }
            w.stop_requested = true;
            w.state = WorkerState::Stopping;
            let (pid, started_secs) = (w.pid, w.started_secs);
            let view = view(w);
            self.inner.emit(&mut st, SourceEvent::Upsert(view));
            (handle, pid, started_secs)
        };
        let result = procfs::signal(pid, started_secs, &handle, libc::SIGTERM);
        // The worker's task waits on the pidfd already; the escalation waits on a copy.
        let waited = match &*handle {
            Handle::Pidfd(fd) => fd.try_clone().ok().map(|fd| Arc::new(Handle::Pidfd(fd))),
            Handle::Poll => None,
        };
        tokio::spawn(escalate(
            handle,
            waited,
            pid,
            started_secs,
            grace.unwrap_or(self.inner.config.grace),
            self.inner.shutdown.subscribe(),
        ));
        match result {
            Ok(_) => Ok(()),
            Err(e) => Err(LocalError::Internal(format!("SIGTERM: {e}")).into()),
        }
    }

    async fn input(&self, key: &SourceKey, data: Bytes) -> Result<(), RegistryError> {
        let (socket, conn) = {
            let st = self.inner.lock();
            if st.closed {
                return Err(LocalError::ShutDown.into());
            }
            let w = match st.workers.get(key) {
                Some(w) if w.visible => w,
                _ => return Err(LocalError::NotFound.into()),
            };
            if w.state.is_terminal() {
                return Err(LocalError::Ended.into());
            }
            let Some(socket) = w.socket.clone() else {
                return Err(LocalError::NoInput.into());
            };
            (socket, Arc::clone(&w.input))
        };
        let deadline = Instant::now() + INPUT_TIMEOUT;
        let mut kept = timeout_at(deadline, conn.lock())
            .await
            .map_err(|_| LocalError::InputBusy)?;
        let mut fresh = false;
        loop {
            if kept.is_none() {
                let stream = timeout_at(deadline, UnixStream::connect(&socket))
                    .await
                    .map_err(|_| LocalError::InputBusy)?
                    .map_err(|_| LocalError::InputGone)?;
                *kept = Some(stream);
                fresh = true;
            }
            let Some(stream) = kept.as_mut() else {
                continue;
            };
            match timeout_at(deadline, stream.write_all(&data)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(_)) => {
                    // The kept connection broke (the launcher restarted its listener, say):
                    // once more on a new one.
                    *kept = None;
                    if fresh {
                        return Err(LocalError::InputGone.into());
                    }
                }
                Err(_) => {
                    // Part of the bytes may have gone: the connection is not reused.
                    *kept = None;
                    return Err(LocalError::InputBusy.into());
                }
            }
        }
    }

    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError> {
        let mut st = self.inner.lock();
        match st.workers.get(key) {
            Some(w) if w.visible && w.state.is_terminal() => {}
            Some(w) if w.visible => return Err(LocalError::Live.into()),
            _ => return Err(LocalError::NotFound.into()),
        }
        self.inner.dismiss(&mut st, key);
        self.inner.admit(&mut st);
        self.inner.refresh_health(&mut st);
        Ok(())
    }

    async fn events(&self) -> Result<SourceEvents, RegistryError> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(LocalError::ShutDown.into());
        }
        let first = vec![SourceEvent::Resync(Inner::views(&st))];
        Ok(st.subs.subscribe(first))
    }

    async fn output(
        &self,
        key: &SourceKey,
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        let output = {
            let st = self.inner.lock();
            match st.workers.get(key) {
                Some(w) if w.visible => Arc::clone(&w.output),
                _ => return Err(LocalError::NotFound.into()),
            }
        };
        output.stream(request)
    }

    async fn shutdown(&self, _grace: Option<Duration>) {
        // The workers are the launcher's: they keep running.
        let inner = Arc::clone(&self.inner);
        let _ = tokio::task::spawn_blocking(move || inner.close()).await;
    }
}
