//! The remote source: a table of the remote runtime's workers kept by following its event
//! stream, and calls forwarded to its API.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use registry_core::fanout::{Owed, Subscribers};
use registry_core::{
    Capabilities, FailReason, OutputRequest, OutputStream, ProfileView, RegistryError,
    RuntimeSource, RuntimeView, SourceEvent, SourceEvents, SourceHealth, SourceKey, SourceWorker,
    SpawnRequest, WorkerId, WorkerState, WorkerView,
};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{scrub, Upstream, FORBIDDEN, NO_SUCH_RUNTIME};
use crate::config::Settings;
use crate::output::Hubs;
use crate::sse::{Event, Item};
use crate::stream::{Backoff, ReadError};

/// How many lifecycle events a reader of [`RuntimeSource::events`] may leave unread before
/// it is owed a fresh `Resync` in their place.
pub(crate) const EVENTS_BUFFER: usize = 256;

/// How long a resumed event stream may take to say whether the remote restarted (its
/// first event is then `reset`) before workers get their last known states back. A roster
/// says it at once: its replay, or its reset and snapshot, then a `: live` comment; the
/// wait only matters for a remote that sends neither.
const HEAL_WAIT: Duration = Duration::from_secs(2);

/// The most workers kept as lost at once (they are removed after `retain_lost` anyway).
const MAX_LOST: usize = 4096;

/// How often lost workers past `retain_lost` are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long a spawn waits for the remote's event stream to bring the new worker as far as
/// the spawn answer before it stores the answer itself.
const SPAWN_CATCH_UP: Duration = Duration::from_secs(2);

/// A runtime of another roster process, followed over its HTTP API.
///
/// Workers are keyed by the remote's worker ids, which never leave this process: the
/// registry issues its own ids from them. See the crate docs for the rules of outages.
pub struct RemoteSource {
    shared: Arc<Shared>,
}

impl fmt::Debug for RemoteSource {
    // Redacting: the address, token and remote ids are internal authority.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("RemoteSource")
            .field("runtime", &self.shared.runtime)
            .field("link", &st.link.name())
            .field("workers", &st.table.len())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    me: Weak<Shared>,
    /// This registry's name for the runtime (for the log).
    pub(crate) runtime: String,
    pub(crate) upstream: Upstream,
    state: Mutex<State>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Bumped whenever the link or the table's sync changes.
    changed: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) hubs: Hubs,
    retain_lost: Duration,
}

/// Where the link to the remote stands.
#[derive(Debug, Clone, PartialEq)]
enum Link {
    /// Never connected yet.
    Connecting,
    /// The event stream is open.
    Up,
    /// The event stream broke; `reason` says how (for people).
    Down { reason: String },
}

impl Link {
    fn name(&self) -> &'static str {
        match self {
            Link::Connecting => "connecting",
            Link::Up => "up",
            Link::Down { .. } => "down",
        }
    }
}

/// One worker of the remote as last known.
#[derive(Debug, Clone)]
struct Entry {
    worker: SourceWorker,
    /// Set once the remote restarted without it: then it is `failed (lost)` here, and
    /// removed `retain_lost` later.
    lost_at: Option<Instant>,
}

impl Entry {
    fn live(worker: SourceWorker) -> Self {
        Entry {
            worker,
            lost_at: None,
        }
    }
}

struct State {
    table: BTreeMap<String, Entry>,
    /// The table holds a whole truth (a snapshot arrived once).
    synced: bool,
    link: Link,
    /// When the next connect is tried, while not up.
    retry_at: Option<(Instant, OffsetDateTime)>,
    /// When anything last came from the remote's event stream.
    last_seen: OffsetDateTime,
    /// The remote's cursor, for resuming.
    cursor: Option<String>,
    /// The reason of a `reset` whose snapshot is still to come.
    pending_reset: Option<String>,
    /// The remote runtime's own health, as its last view said.
    mirrored: Option<SourceHealth>,
    /// The health last reported on the lifecycle streams.
    reported: Option<SourceHealth>,
    subs: Subscribers,
    closed: bool,
}

impl RemoteSource {
    pub(crate) fn new(runtime: &str, settings: Settings, retain_lost: Duration) -> Self {
        let settings = Arc::new(settings);
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            runtime: runtime.to_string(),
            upstream: Upstream::new(settings.clone()),
            state: Mutex::new(State {
                table: BTreeMap::new(),
                synced: false,
                link: Link::Connecting,
                retry_at: None,
                last_seen: OffsetDateTime::now_utc(),
                cursor: None,
                pending_reset: None,
                mirrored: None,
                reported: None,
                subs: Subscribers::new(EVENTS_BUFFER),
                closed: false,
            }),
            shutdown: watch::channel(false).0,
            changed: watch::channel(0).0,
            tasks: Mutex::new(Vec::new()),
            hubs: Hubs::default(),
            retain_lost,
        });
        let source = RemoteSource { shared };
        if tokio::runtime::Handle::try_current().is_ok() {
            source.shared.start();
        }
        source
    }

    /// How many unread lifecycle events make this source owe a reader a `Resync` (for the
    /// conformance suite's harness).
    pub fn events_to_overflow(&self) -> usize {
        EVENTS_BUFFER + 1
    }

    /// How many upstream output streams are shared by readers now (one per followed
    /// worker, however many read it).
    pub fn shared_output_streams(&self) -> usize {
        self.shared.hubs.live()
    }
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the link and the sweeper, once.
    fn start(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if !tasks.is_empty() || *self.shutdown.borrow() {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        tasks.push(tokio::spawn(link(me.clone())));
        tasks.push(tokio::spawn(sweep(me)));
    }

    pub(crate) fn settings(&self) -> &Settings {
        self.upstream.settings()
    }

    /// Waits until `ready` holds of the state, or `limit` passes.
    async fn wait_for(&self, limit: Duration, ready: impl Fn(&State) -> bool) -> bool {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            changed.borrow_and_update();
            if ready(&self.lock()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return ready(&self.lock()),
            }
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// `runtime_unavailable` unless the link is up: calls are not sent into an outage. Before
    /// the first connection has been tried, waits for it (up to `connect_timeout`).
    pub(crate) async fn require_up(&self) -> Result<(), RegistryError> {
        let limit = self.settings().connect_timeout;
        self.wait_for(limit, |st| st.link != Link::Connecting).await;
        self.check_up()
    }

    /// As [`require_up`](Self::require_up), without waiting.
    pub(crate) fn check_up(&self) -> Result<(), RegistryError> {
        let st = self.lock();
        match &st.link {
            Link::Up => Ok(()),
            Link::Connecting => Err(RegistryError::unavailable(
                "the remote runtime has not answered yet",
                st.retry_after(),
            )),
            Link::Down { reason } => {
                Err(RegistryError::unavailable(reason.clone(), st.retry_after()))
            }
        }
    }

    /// What this side knows of a worker; `worker_not_found` for one it does not know.
    pub(crate) fn known(&self, key: &str) -> Result<Known, RegistryError> {
        let st = self.lock();
        let entry = st.table.get(key).ok_or_else(not_found)?;
        Ok(if entry.lost_at.is_some() {
            Known::Lost
        } else if entry.worker.state.is_terminal() {
            Known::Ended
        } else {
            Known::Live
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Records a worker the remote answered with, unless the table already holds it in a
    /// later state.
    fn learn(&self, worker: SourceWorker) -> SourceWorker {
        let mut st = self.lock();
        let key = worker.key.as_str().to_string();
        self.learn_locked(&mut st, worker, false);
        st.view(&key).expect("just looked at")
    }

    /// Stores `worker` unless the table holds it lost or in a later state; with
    /// `listed_only`, only a worker the table holds.
    fn learn_locked(&self, st: &mut State, worker: SourceWorker, listed_only: bool) {
        let newer = match st.table.get(worker.key.as_str()) {
            Some(old) => old.lost_at.is_none() && later_report(&old.worker, &worker),
            None => !listed_only,
        };
        if newer {
            self.store(st, worker);
        }
    }

    /// Puts a worker into the table and reports it.
    fn store(&self, st: &mut State, worker: SourceWorker) {
        let key = worker.key.as_str().to_string();
        st.table.insert(key.clone(), Entry::live(worker));
        if let Some(view) = st.view(&key) {
            self.emit(st, SourceEvent::Upsert(view));
        }
        self.bump();
    }

    /// As [`learn`](Self::learn), for a view the remote sent (only this runtime's).
    pub(crate) fn learn_view(&self, view: &WorkerView) {
        if view.runtime_id.as_str() != self.settings().remote_runtime {
            return;
        }
        // Only workers still listed, asked under the same lock as the store: a late state
        // must not bring a removed one back.
        let mut st = self.lock();
        self.learn_locked(&mut st, from_view(view), true);
    }

    fn forget(&self, key: &str) {
        let mut st = self.lock();
        if st.table.remove(key).is_some() {
            self.emit(&mut st, SourceEvent::Removed(SourceKey::new(key)));
        }
    }

    /// Sends `event` to every lifecycle stream. A full stream gets nothing more until a
    /// `Resync` (and the health) can go to it in one piece; a closed one is dropped.
    fn emit(&self, st: &mut State, event: SourceEvent) {
        for owed in st.subs.send(&event) {
            let me = self.me.clone();
            tokio::spawn(async move {
                if let (Some(owed), Some(me)) = (owed.ready().await, me.upgrade()) {
                    me.repay(owed);
                }
            });
        }
    }

    /// Sends a stream that overflowed, now that it has room, the whole truth.
    fn repay(&self, owed: Owed) {
        let mut st = self.lock();
        let truth = vec![
            SourceEvent::Resync(st.views()),
            SourceEvent::Health(st.health()),
        ];
        st.subs.repay(owed, truth);
    }

    /// Reports the health on the lifecycle streams if it changed.
    fn refresh_health(&self, st: &mut State) {
        let health = st.health();
        if st.reported.as_ref() != Some(&health) {
            st.reported = Some(health.clone());
            self.emit(st, SourceEvent::Health(health));
        }
    }

    /// The event stream answered: back up.
    ///
    /// Returns whether workers wait to be healed: then the caller calls [`heal`](Self::heal)
    /// unless the stream starts with a `reset` (a restarted remote, whose snapshot decides
    /// instead — a worker it lost must not show as running in between).
    fn mark_up(&self) -> bool {
        let mut st = self.lock();
        let was_down = matches!(st.link, Link::Down { .. });
        st.link = Link::Up;
        st.retry_at = None;
        st.last_seen = OffsetDateTime::now_utc();
        self.refresh_health(&mut st);
        let healing = was_down && st.synced;
        drop(st);
        self.bump();
        healing
    }

    /// Gives workers shown `unknown` their last known state back.
    fn heal(&self) {
        let mut st = self.lock();
        let workers = st.views();
        self.emit(&mut st, SourceEvent::Resync(workers));
    }

    /// The link broke: live workers turn `unknown` (with `last_seen_at`) until it is back.
    fn mark_down(&self, reason: String, delay: Duration) {
        let mut st = self.lock();
        let was_up = st.link == Link::Up;
        st.link = Link::Down { reason };
        st.retry_at = Some((Instant::now() + delay, OffsetDateTime::now_utc() + delay));
        if was_up {
            let keys: Vec<String> = st
                .table
                .iter()
                .filter(|(_, e)| !e.worker.state.is_terminal())
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                if let Some(view) = st.view(&key) {
                    self.emit(&mut st, SourceEvent::Upsert(view));
                }
            }
        }
        self.refresh_health(&mut st);
        drop(st);
        self.bump();
    }

    /// Applies one event of the remote's stream. An event that cannot be understood is an
    /// error: the link reconnects without a cursor, so a fresh snapshot replaces whatever
    /// that event would have said — nothing is skipped silently.
    fn apply(&self, event: &Event) -> Result<Flow, String> {
        let not_understood = |what: &str, e: serde_json::Error| {
            tracing::warn!(runtime = %self.runtime, event = what, error = %e, "an event of the remote runtime was not understood");
            "an event of the remote runtime was not understood; reconnecting".to_string()
        };
        let remote_runtime = self.settings().remote_runtime.clone();
        let mut st = self.lock();
        match event.event.as_str() {
            "snapshot" => {
                #[derive(Deserialize)]
                struct Snapshot {
                    runtimes: Vec<RuntimeView>,
                    workers: Vec<WorkerView>,
                }
                let snap: Snapshot =
                    serde_json::from_str(&event.data).map_err(|e| not_understood("snapshot", e))?;
                let restarted = st.pending_reset.take().as_deref() == Some("foreign_epoch");
                let mut table: BTreeMap<String, Entry> = snap
                    .workers
                    .iter()
                    .filter(|w| w.runtime_id.as_str() == remote_runtime)
                    .map(|w| (w.id.as_str().to_string(), Entry::live(from_view(w))))
                    .collect();
                let now = OffsetDateTime::now_utc();
                for (key, mut old) in std::mem::take(&mut st.table) {
                    if table.contains_key(&key) {
                        continue;
                    }
                    if old.lost_at.is_none() && restarted && !old.worker.state.is_terminal() {
                        old.worker.state = WorkerState::Failed;
                        old.worker.reason = Some(FailReason::Lost);
                        old.worker.ended_at = Some(now);
                        old.worker.last_seen_at = Some(st.last_seen);
                        old.lost_at = Some(Instant::now());
                    }
                    if old.lost_at.is_some() {
                        table.insert(key, old);
                    }
                }
                // Lost workers are bounded too: past MAX_LOST, the longest lost go first.
                let mut lost: Vec<(Instant, String)> = table
                    .iter()
                    .filter_map(|(k, e)| Some((e.lost_at?, k.clone())))
                    .collect();
                if lost.len() > MAX_LOST {
                    lost.sort();
                    for (_, key) in &lost[..lost.len() - MAX_LOST] {
                        table.remove(key);
                    }
                }
                st.table = table;
                st.synced = true;
                st.mirrored = snap
                    .runtimes
                    .iter()
                    .find(|r| r.id.as_str() == remote_runtime)
                    .map(|r| mirror(r, &remote_runtime));
                let workers = st.views();
                self.emit(&mut st, SourceEvent::Resync(workers));
                self.bump();
            }
            "reset" => {
                #[derive(Deserialize)]
                struct Reset {
                    reason: String,
                }
                let reset: Reset =
                    serde_json::from_str(&event.data).map_err(|e| not_understood("reset", e))?;
                st.pending_reset = Some(reset.reason);
            }
            "worker.upserted" => {
                #[derive(Deserialize)]
                struct Upserted {
                    worker: WorkerView,
                }
                let up: Upserted = serde_json::from_str(&event.data)
                    .map_err(|e| not_understood("worker.upserted", e))?;
                if up.worker.runtime_id.as_str() == remote_runtime {
                    let frozen = st
                        .table
                        .get(up.worker.id.as_str())
                        .is_some_and(|e| e.lost_at.is_some() || e.worker.state.is_terminal());
                    if !frozen {
                        self.store(&mut st, from_view(&up.worker));
                    }
                }
            }
            "worker.removed" => {
                #[derive(Deserialize)]
                struct Removed {
                    worker_id: String,
                    runtime_id: String,
                }
                let gone: Removed = serde_json::from_str(&event.data)
                    .map_err(|e| not_understood("worker.removed", e))?;
                if gone.runtime_id == remote_runtime && st.table.remove(&gone.worker_id).is_some() {
                    self.emit(
                        &mut st,
                        SourceEvent::Removed(SourceKey::new(gone.worker_id)),
                    );
                }
            }
            "runtime.updated" => {
                #[derive(Deserialize)]
                struct Updated {
                    runtime: RuntimeView,
                }
                let up: Updated = serde_json::from_str(&event.data)
                    .map_err(|e| not_understood("runtime.updated", e))?;
                if up.runtime.id.as_str() == remote_runtime {
                    st.mirrored = Some(mirror(&up.runtime, &remote_runtime));
                }
            }
            "shutdown" => {
                return Ok(Flow::Closing);
            }
            other => {
                tracing::debug!(runtime = %self.runtime, event = other, "ignoring an unknown event type of the remote runtime");
            }
        }
        if !event.id.is_empty() {
            st.cursor = Some(event.id.clone());
        }
        self.refresh_health(&mut st);
        Ok(Flow::Go)
    }

    fn touch(&self) {
        self.lock().last_seen = OffsetDateTime::now_utc();
    }

    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.subs.clear();
    }
}

enum Flow {
    Go,
    Closing,
}

/// A worker as far as a call needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// Not terminal (as last known).
    Live,
    /// Terminal, and the remote has its record.
    Ended,
    /// Lost in a restart of the remote: only this side has its record.
    Lost,
}

/// The one answer for a worker this side does not know (the registry words it).
pub(crate) fn not_found() -> RegistryError {
    RegistryError::WorkerNotFound("worker not found".into())
}

impl State {
    /// A worker as this source reports it: while the link is not up, a live worker is
    /// `unknown` since the last word from the remote.
    fn view(&self, key: &str) -> Option<SourceWorker> {
        let entry = self.table.get(key)?;
        let mut worker = entry.worker.clone();
        if self.link != Link::Up && !worker.state.is_terminal() {
            worker.state = WorkerState::Unknown;
            worker.last_seen_at = Some(self.last_seen);
        }
        Some(worker)
    }

    fn views(&self) -> Vec<SourceWorker> {
        self.table.keys().filter_map(|k| self.view(k)).collect()
    }

    fn retry_after(&self) -> Option<Duration> {
        let wait = self
            .retry_at
            .map(|(at, _)| at.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        // Whole seconds on the wire; never "0".
        Some(wait.max(Duration::from_secs(1)))
    }

    fn health(&self) -> SourceHealth {
        let retry_at = self.retry_at.map(|(_, at)| at);
        match &self.link {
            Link::Connecting => {
                SourceHealth::unavailable("connecting to the remote runtime", retry_at)
            }
            Link::Down { reason } => SourceHealth::unavailable(reason.clone(), retry_at),
            Link::Up if !self.synced => {
                SourceHealth::unavailable("waiting for the remote runtime's first snapshot", None)
            }
            Link::Up => self
                .mirrored
                .clone()
                .unwrap_or_else(|| SourceHealth::unavailable(NO_SUCH_RUNTIME, None)),
        }
    }
}

/// Whether `new` is further along than `old` (so an answer may replace what the stream
/// said).
fn later(old: WorkerState, new: WorkerState) -> bool {
    // Strictly further along by the state-order rule; `unknown` is later than nothing.
    new != old && new != WorkerState::Unknown && old.may_become(new)
}

/// Whether the report `new` of a worker is further along than `old`: a later run (more
/// restarts), or the same run in a [`later`] state.
fn later_report(old: &SourceWorker, new: &SourceWorker) -> bool {
    if new.restarts != old.restarts {
        return old
            .state
            .may_become_across_runs(old.restarts, new.state, new.restarts);
    }
    later(old.state, new.state)
}

/// The remote's view of a worker, keyed by its id there.
fn from_view(view: &WorkerView) -> SourceWorker {
    SourceWorker {
        key: SourceKey::new(view.id.as_str()),
        name: view.name.clone(),
        labels: view.labels.clone(),
        state: view.state,
        exit_code: view.exit_code,
        reason: view.reason,
        created_at: view.created_at,
        started_at: view.started_at,
        ended_at: view.ended_at,
        last_seen_at: view.last_seen_at,
        profile: view.profile.clone(),
        args: view.args.clone(),
        command: view.command.clone(),
        restarts: view.restarts,
        last_exit: view.last_exit,
        retry_at: view.retry_at,
        message: view.message.clone(),
        health: view.health,
    }
}

/// The remote runtime's health, as this runtime's.
fn mirror(view: &RuntimeView, remote_runtime: &str) -> SourceHealth {
    SourceHealth {
        status: view.health.status,
        message: view
            .health
            .message
            .as_deref()
            .map(|m| scrub(m, remote_runtime)),
        retry_at: view.health.retry_at,
        diagnostics: view
            .diagnostics
            .iter()
            .map(|d| registry_core::Diagnostic {
                code: d.code.clone(),
                message: scrub(&d.message, remote_runtime),
            })
            .collect(),
    }
}

/// The path of a worker on the remote; a key that is no remote id is no worker.
pub(crate) fn worker_path(key: &SourceKey, rest: &str) -> Result<String, RegistryError> {
    let id = key.as_str();
    if !WorkerId::has_shape(id) {
        return Err(not_found());
    }
    Ok(format!("/v1/workers/{id}{rest}"))
}

/// Follows the remote's event stream for the life of the source: connect, read, and on
/// any trouble mark the runtime `unavailable` and try again after a backoff with full
/// jitter.
///
/// The log gets one warning when the link goes down and one more each time the reason
/// changes (refused, then DNS, …), naming the runtime, the remote's address and the
/// failure's detail; a retry that fails the same way is a debug line. An `info` line says
/// when the remote answers again.
async fn link(shared: Arc<Shared>) {
    let settings = shared.settings().clone();
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_cap);
    let mut shutdown = shared.shutdown.subscribe();
    let path = format!("/v1/events?runtime={}", settings.remote_runtime.as_str());
    let address = &*settings.endpoint.authority; // the log is the operator's: it names the address
    let mut warned: Option<String> = None;
    loop {
        let down = tokio::select! {
            down = follow(&shared, &path, &mut backoff, &mut warned) => down,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let delay = backoff.next_delay();
        let cause = down.detail.as_deref().unwrap_or("-");
        if warned.as_deref() == Some(down.reason.as_str()) {
            tracing::debug!(runtime = %shared.runtime, %address, cause, retry_in = ?delay, "remote runtime still unavailable: {}", down.reason);
        } else {
            tracing::warn!(runtime = %shared.runtime, %address, cause, retry_in = ?delay, "remote runtime unavailable: {}", down.reason);
            warned = Some(down.reason.clone());
        }
        shared.mark_down(down.reason, delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Why one connection of the event stream ended.
struct Down {
    /// For people: the runtime's health message (no address, no remote name).
    reason: String,
    /// For the log: what the transport or the remote said, which may name the address.
    detail: Option<String>,
}

impl From<String> for Down {
    fn from(reason: String) -> Self {
        Down {
            reason,
            detail: None,
        }
    }
}

impl From<&str> for Down {
    fn from(reason: &str) -> Self {
        Down::from(reason.to_string())
    }
}

/// One connection of the event stream, until it ends; returns why. `warned` is the reason
/// last warned of: once the stream is open again, the recovery is logged and it is cleared.
async fn follow(
    shared: &Arc<Shared>,
    path: &str,
    backoff: &mut Backoff,
    warned: &mut Option<String>,
) -> Down {
    let cursor = shared.lock().cursor.clone();
    let mut reader = match shared.upstream.open_stream(path, cursor.as_deref()).await {
        Ok(reader) => reader,
        Err(e) => {
            let detail = shared.upstream.take_failure();
            if let Some(internal) = e.internal_detail() {
                return Down {
                    reason: "the remote runtime's answer was not understood".into(),
                    detail: Some(internal.to_string()),
                };
            }
            let reason = match &e {
                RegistryError::Forbidden(_) => FORBIDDEN.to_string(),
                other => other.to_string(),
            };
            let detail = detail.or_else(|| match &e {
                RegistryError::Forbidden(m) => Some(format!("403: {m}")),
                _ => None,
            });
            return Down { reason, detail };
        }
    };
    if warned.take().is_some() {
        tracing::info!(runtime = %shared.runtime, address = %*shared.settings().endpoint.authority, "the remote runtime answers again");
    }
    // Only a resumed stream can need healing: a fresh one starts with a snapshot.
    let mut healing = shared.mark_up() && cursor.is_some();
    let mut delivered = false;
    loop {
        let next = if healing {
            // A resumed stream starts at once with what it replays, with `reset`, or (with
            // nothing to replay) with the `: live` comment.
            match tokio::time::timeout(HEAL_WAIT, reader.next()).await {
                Ok(next) => next,
                Err(_) => {
                    healing = false;
                    shared.heal();
                    continue;
                }
            }
        } else {
            reader.next().await
        };
        if healing {
            match &next {
                Ok(Some(Item::Event(e))) if e.event == "reset" => healing = false,
                Ok(Some(Item::Event(_))) | Ok(Some(Item::Comment(_))) => {
                    healing = false;
                    shared.heal();
                }
                _ => {}
            }
        }
        let item = match next {
            Ok(Some(item)) => item,
            Ok(None) => return "the remote runtime closed its event stream; reconnecting".into(),
            Err(e) => {
                if matches!(e, ReadError::TooLarge) {
                    shared.lock().cursor = None;
                }
                return Down {
                    reason: e.message().into(),
                    detail: shared.upstream.take_failure(),
                };
            }
        };
        shared.touch();
        if let Item::Event(event) = item {
            match shared.apply(&event) {
                Ok(Flow::Go) => {}
                Ok(Flow::Closing) => {
                    return "the remote roster is shutting down; reconnecting".into();
                }
                Err(reason) => {
                    shared.lock().cursor = None;
                    return reason.into();
                }
            }
            if !delivered {
                delivered = true;
                backoff.reset();
            }
        }
    }
}

/// Removes lost workers once `retain_lost` has passed.
async fn sweep(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let mut st = shared.lock();
        let expired: Vec<String> = st
            .table
            .iter()
            .filter(|(_, e)| e.lost_at.is_some_and(|t| t.elapsed() >= shared.retain_lost))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            st.table.remove(&key);
            shared.emit(&mut st, SourceEvent::Removed(SourceKey::new(key)));
        }
    }
}

#[async_trait]
impl RuntimeSource for RemoteSource {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn health(&self) -> SourceHealth {
        self.shared.start();
        let st = self.shared.lock();
        st.health()
    }

    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        Ok(self.shared.lock().views())
    }

    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        self.shared.lock().view(key.as_str()).ok_or_else(not_found)
    }

    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        self.shared.require_up().await?;
        let body = serde_json::to_value(&request)
            .map_err(|e| RegistryError::internal(format!("encoding a spawn request: {e}")))?;
        let path = format!(
            "/v1/runtimes/{}/workers",
            self.shared.settings().remote_runtime.as_str()
        );
        let answer = self
            .shared
            .upstream
            .call(Method::POST, &path, Some(&body))
            .await?;
        let view: WorkerView = serde_json::from_value(answer).map_err(|e| {
            RegistryError::internal(format!("the remote's spawn answer is not a worker: {e}"))
        })?;
        // The answer may already be ahead of the remote's event stream (`running` while the
        // `starting` upsert is still on its way): storing it first would make the follower
        // drop the earlier states as stale, and this runtime's clients would miss them. So
        // the events get a moment to bring the worker as far as the answer; only if they
        // don't is the answer stored.
        let worker = from_view(&view);
        let key = worker.key.as_str().to_string();
        let caught_up = |st: &State| {
            st.table
                .get(&key)
                .is_some_and(|old| !later_report(&old.worker, &worker))
        };
        if self.shared.wait_for(SPAWN_CATCH_UP, caught_up).await {
            if let Some(seen) = self.shared.lock().view(&key) {
                return Ok(seen);
            }
        }
        Ok(self.shared.learn(worker))
    }

    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError> {
        let path = worker_path(key, "/stop")?;
        if self.shared.known(key.as_str())? != Known::Live {
            return Ok(());
        }
        self.shared.require_up().await?;
        let body = match grace {
            Some(g) => {
                serde_json::json!({ "grace_ms": u64::try_from(g.as_millis()).unwrap_or(u64::MAX) })
            }
            None => serde_json::json!({}),
        };
        self.shared
            .upstream
            .call(Method::POST, &path, Some(&body))
            .await
            .map(drop)
    }

    async fn input(&self, key: &SourceKey, data: Bytes) -> Result<(), RegistryError> {
        let path = worker_path(key, "/input")?;
        if self.shared.known(key.as_str())? == Known::Lost {
            return Err(RegistryError::Conflict(
                "the worker was lost when its runtime restarted; it takes no input".into(),
            ));
        }
        self.shared.require_up().await?;
        let body = serde_json::json!({ "data": String::from_utf8_lossy(&data) });
        self.shared
            .upstream
            .call(Method::POST, &path, Some(&body))
            .await
            .map(drop)
    }

    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError> {
        let path = worker_path(key, "")?;
        if self.shared.known(key.as_str())? == Known::Lost {
            self.shared.forget(key.as_str());
            return Ok(());
        }
        self.shared.require_up().await?;
        self.shared
            .upstream
            .call(Method::DELETE, &path, None)
            .await?;
        self.shared.forget(key.as_str());
        Ok(())
    }

    async fn events(&self) -> Result<SourceEvents, RegistryError> {
        self.shared.start();
        // The stream starts with the whole truth: wait for the remote's first snapshot.
        // If it does not come in time, the registry marks the runtime unavailable and asks
        // again later, while the link keeps trying.
        let settings = self.shared.settings();
        let limit = settings.connect_timeout + settings.request_timeout;
        // A first attempt that failed ends the wait: the registry shows why at once.
        let settled = |st: &State| st.synced || st.closed || matches!(st.link, Link::Down { .. });
        if !self.shared.wait_for(limit, settled).await || !self.shared.lock().synced {
            return Err(self.shared.check_up().err().unwrap_or_else(|| {
                RegistryError::unavailable("the remote runtime has not answered yet", None)
            }));
        }
        let mut st = self.shared.lock();
        if st.closed {
            return Err(RegistryError::unavailable("the source is shut down", None));
        }
        let first = vec![
            SourceEvent::Resync(st.views()),
            SourceEvent::Health(st.health()),
        ];
        Ok(st.subs.subscribe(first))
    }

    async fn output(
        &self,
        key: &SourceKey,
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        crate::output::open(&self.shared, key, request).await
    }

    async fn profiles(&self) -> Result<Vec<ProfileView>, RegistryError> {
        // The remote runtime's own list, as it answers it: its roster already left out what
        // its config keeps private.
        #[derive(Deserialize)]
        struct Answer {
            profiles: Vec<ProfileView>,
        }
        self.shared.require_up().await?;
        let path = format!(
            "/v1/runtimes/{}/profiles",
            self.shared.settings().remote_runtime.as_str()
        );
        let answer = match self.shared.upstream.call(Method::GET, &path, None).await {
            Ok(answer) => answer,
            // A roster from before profile lists: it does not know the route.
            Err(e)
                if e.internal_detail()
                    .is_some_and(|d| d.contains("route_not_found")) =>
            {
                return Err(RegistryError::Unsupported(
                    "the remote roster is of a version that does not list profiles".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        serde_json::from_value::<Answer>(answer)
            .map(|a| a.profiles)
            .map_err(|e| {
                RegistryError::internal(format!("the remote's profile list is not understood: {e}"))
            })
    }

    async fn shutdown(&self, _grace: Option<Duration>) {
        // The workers belong to the remote: they keep running. Only the connections go.
        self.shared.shutdown.send_replace(true);
        self.shared.close();
        self.shared.bump();
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        self.shared.hubs.close_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_move_a_worker_forward() {
        use WorkerState::*;
        assert!(later(Starting, Running));
        assert!(later(Unknown, Running));
        assert!(!later(Running, Starting));
        assert!(!later(Exited, Failed));
        assert!(later(Stopping, Stopped));
    }

    #[test]
    fn keys_that_are_no_remote_id_are_no_worker() {
        assert!(worker_path(&SourceKey::new("w_0123456789ABCDEFGHJKMNPQRS"), "/stop").is_ok());
        for bad in ["", "w_short", "../../etc", "w_0123456789ABCDEFGHJKMNPQR/"] {
            assert_eq!(
                worker_path(&SourceKey::new(bad), "").unwrap_err().code(),
                "worker_not_found"
            );
        }
    }
}
