//! inotify (through `notify`) on the spool directory and on the directories of the logs
//! being followed. It only speeds things up: every change it reports would also be found by
//! the periodic rescan and the log poll, so a watcher that can't be had (or a file system
//! inotify does not see) costs latency, never correctness.
//!
//! Nothing is queued: an event sets a wake-up ([`Notify`] holds at most one), so a storm of
//! events costs no memory.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// Log path → (worker number, its wake-up), for each log followed.
type LogWakers = HashMap<PathBuf, Vec<(u64, Arc<Notify>)>>;

/// Where an event goes: the discovery task, or the tasks that follow logs.
pub(crate) struct Wakers {
    spool: PathBuf,
    /// Wakes the discovery task for a rescan.
    pub(crate) rescan: Notify,
    /// The spool directory itself was removed or moved: its watch must be made again.
    spool_stale: AtomicBool,
    /// Log path → (worker number, its wake-up).
    logs: Mutex<LogWakers>,
}

impl Wakers {
    fn logs(&self) -> MutexGuard<'_, LogWakers> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called on notify's thread for every event.
    fn handle(&self, event: notify::Result<Event>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::debug!(error = %e, "the directory watcher reported an error");
                self.wake_all();
                return;
            }
        };
        if event.need_rescan() || event.paths.is_empty() {
            self.wake_all();
            return;
        }
        // Opening and reading (our own reads among them) change nothing.
        if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
        {
            return;
        }
        let logs = self.logs();
        for path in &event.paths {
            if path == &self.spool {
                if matches!(event.kind, EventKind::Remove(_) | EventKind::Modify(_)) {
                    self.spool_stale.store(true, Ordering::Release);
                }
                self.rescan.notify_one();
            } else if path.parent() == Some(self.spool.as_path())
                && path.extension().is_some_and(|e| e == "json")
            {
                self.rescan.notify_one();
            }
            if let Some(wakes) = logs.get(path) {
                for (_, wake) in wakes {
                    wake.notify_one();
                }
            }
        }
    }

    fn wake_all(&self) {
        self.rescan.notify_one();
        for wakes in self.logs().values() {
            for (_, wake) in wakes {
                wake.notify_one();
            }
        }
    }
}

struct WatchState {
    watcher: Option<RecommendedWatcher>,
    /// (device, inode) of the spool directory the watch is on.
    spool_id: Option<(u64, u64)>,
    /// Directories watched for logs outside the spool directory, with how many logs in each.
    dirs: HashMap<PathBuf, usize>,
    /// The watcher could not be made; said once in the log.
    reported_failure: bool,
}

/// The watches of one source.
pub(crate) struct DirWatch {
    enabled: bool,
    pub(crate) wakers: Arc<Wakers>,
    state: Mutex<WatchState>,
}

impl fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("DirWatch")
            .field("enabled", &self.enabled)
            .field("watching_spool", &st.spool_id.is_some())
            .field("log_dirs", &st.dirs.len())
            .finish()
    }
}

impl DirWatch {
    pub(crate) fn new(spool: PathBuf, enabled: bool) -> DirWatch {
        DirWatch {
            enabled,
            wakers: Arc::new(Wakers {
                spool,
                rescan: Notify::new(),
                spool_stale: AtomicBool::new(false),
                logs: Mutex::new(HashMap::new()),
            }),
            state: Mutex::new(WatchState {
                watcher: None,
                spool_id: None,
                dirs: HashMap::new(),
                reported_failure: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the watcher if there is none yet; `false` when it can't be had.
    fn watcher<'a>(&self, st: &'a mut WatchState) -> Option<&'a mut RecommendedWatcher> {
        if !self.enabled {
            return None;
        }
        if st.watcher.is_none() {
            let wakers = Arc::clone(&self.wakers);
            match notify::recommended_watcher(move |event| wakers.handle(event)) {
                Ok(w) => st.watcher = Some(w),
                Err(e) => {
                    if !st.reported_failure {
                        st.reported_failure = true;
                        tracing::warn!(error = %e, "no directory watcher; rescanning on the poll interval only");
                    }
                    return None;
                }
            }
        }
        st.watcher.as_mut()
    }

    /// Puts the watch on the spool directory, again if the directory was replaced since.
    /// Blocking (it stats the directory and talks to the watcher's thread).
    pub(crate) fn ensure_spool(&self) {
        if !self.enabled {
            return;
        }
        let spool = self.wakers.spool.clone();
        let id = std::fs::metadata(&spool)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| (m.dev(), m.ino()));
        let stale = self.wakers.spool_stale.swap(false, Ordering::AcqRel);
        let mut st = self.lock();
        if id == st.spool_id && !stale {
            return;
        }
        if st.spool_id.take().is_some() {
            if let Some(w) = st.watcher.as_mut() {
                let _ = w.unwatch(&spool);
            }
        }
        let Some(id) = id else { return };
        let Some(watcher) = self.watcher(&mut st) else {
            return;
        };
        match watcher.watch(&spool, RecursiveMode::NonRecursive) {
            Ok(()) => st.spool_id = Some(id),
            Err(e) => tracing::debug!(error = %e, "the spool directory could not be watched"),
        }
    }

    /// Wakes `wake` on changes of the log at `log` (a path the worker numbered `number`
    /// follows). Blocking.
    pub(crate) fn add_log(&self, number: u64, log: &Path, wake: Arc<Notify>) {
        // The wake-up first, without the watcher's lock: notify's thread takes `logs`.
        self.wakers
            .logs()
            .entry(log.to_path_buf())
            .or_default()
            .push((number, wake));
        let Some(dir) = log.parent().filter(|d| *d != self.wakers.spool) else {
            return;
        };
        let mut st = self.lock();
        if let Some(count) = st.dirs.get_mut(dir) {
            *count += 1;
            return;
        }
        let Some(watcher) = self.watcher(&mut st) else {
            return;
        };
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                st.dirs.insert(dir.to_path_buf(), 1);
            }
            Err(e) => tracing::debug!(error = %e, "a log's directory could not be watched"),
        }
    }

    /// Undoes [`add_log`](Self::add_log). Blocking.
    pub(crate) fn remove_log(&self, number: u64, log: &Path) {
        {
            let mut logs = self.wakers.logs();
            if let Some(wakes) = logs.get_mut(log) {
                wakes.retain(|(n, _)| *n != number);
                if wakes.is_empty() {
                    logs.remove(log);
                }
            }
        }
        let Some(dir) = log.parent() else { return };
        let mut st = self.lock();
        let Some(count) = st.dirs.get_mut(dir) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            st.dirs.remove(dir);
            if let Some(w) = st.watcher.as_mut() {
                let _ = w.unwatch(dir);
            }
        }
    }

    /// Drops the watcher (its thread ends).
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.watcher = None;
        st.spool_id = None;
        st.dirs.clear();
    }
}
