//! The registry: runtimes by id, a projection of every worker, routing by worker id, and
//! one event log for all of it.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::Redacted;

use crate::events::{EventLog, LazySnapshot, Pending, Resubscribe, Start};
use crate::table::{PageKey, Record, Table};
use crate::{
    sanitize_message, Capabilities, Diagnostic, EventPayload, FailReason, HealthState,
    HealthStatus, HealthView, IdIssuer, OutputRequest, OutputStream, ProfileView, RegistryError,
    ResetReason, RuntimeId, RuntimeSource, RuntimeView, SourceConfig, SourceEvent, SourceHealth,
    SourceKey, SourceWorker, SpawnRequest, StreamItem, Subscription, WorkerId, WorkerState,
    WorkerView,
};

/// How long `spawn` and `remove` wait for the source's lifecycle stream to confirm the
/// change before they answer from the source's own reply.
const CONFIRM_WAIT: Duration = Duration::from_secs(5);
/// Reconnect backoff for a source's lifecycle stream.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How long shutdown waits for the sources' lifecycle streams to end.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
/// The grace `shutdown` assumes when given none.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How much longer than the grace `shutdown` waits for a source.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);
/// Most diagnostics kept per runtime.
const MAX_DIAGNOSTICS: usize = 100;
/// Largest page of `list_workers`.
pub const MAX_PAGE: usize = 1000;

/// Settings of a [`Registry`]. `Debug` hides the state directory (a path).
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Where the id key lives (created with mode 0700 if missing).
    pub state_dir: Redacted<PathBuf>,
    /// Events kept for resume (default 10,000). Older cursors get a reset.
    pub event_retention: usize,
    /// Bytes of events kept for resume, roughly (default 64 MiB): a second bound, so that
    /// events with large views can't hold much memory.
    pub event_retention_bytes: usize,
    /// Events queued for one subscriber before it counts as lagged (default 1,024; at most
    /// 1,048,576, larger values are clamped).
    pub subscriber_queue: usize,
}

impl RegistryConfig {
    /// The defaults, with state in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        RegistryConfig {
            state_dir: Redacted(state_dir.into()),
            event_retention: 10_000,
            event_retention_bytes: 64 << 20,
            subscriber_queue: 1024,
        }
    }
}

/// Which workers `list_workers` returns. [`WorkerFilter::matches`] is the whole rule; the
/// registry's index narrows a listing by `runtime` and `state` before it applies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerFilter {
    /// Only this runtime's.
    pub runtime: Option<RuntimeId>,
    /// Only in one of these states (empty: any state).
    pub states: Vec<WorkerState>,
    /// Only those that carry every one of these labels.
    pub labels: Vec<(String, String)>,
    /// Only those whose health probe says this (workers without a probe never match).
    pub health: Option<HealthState>,
    /// Only those with exactly this name.
    pub name: Option<String>,
    /// Only those whose name, or a label's key or value, holds this text, compared without
    /// regard to ASCII case (other characters must match exactly). Empty matches all.
    pub text: Option<String>,
}

impl WorkerFilter {
    /// Whether `view` passes every condition of the filter.
    ///
    /// A listing seeks the index by `runtime` and `states` and then applies this to every
    /// worker it walks, so a new condition needs only a clause here (and, if it should not
    /// cost what it skips, a bucket of its own in the index).
    pub fn matches(&self, view: &WorkerView) -> bool {
        self.runtime.as_ref().is_none_or(|r| &view.runtime_id == r)
            && (self.states.is_empty() || self.states.contains(&view.state))
            && self
                .health
                .is_none_or(|h| view.health.is_some_and(|w| w.status == h))
            && self
                .labels
                .iter()
                .all(|(k, val)| view.labels.get(k) == Some(val))
            && self
                .name
                .as_ref()
                .is_none_or(|n| view.name.as_ref() == Some(n))
            && self.text.as_deref().is_none_or(|t| {
                let holds = |hay: &str| contains_ignoring_ascii_case(hay, t);
                view.name.as_deref().is_some_and(holds)
                    || view.labels.iter().any(|(k, v)| holds(k) || holds(v))
            })
    }
}

/// Whether `hay` holds `needle`, ASCII letters compared without case.
fn contains_ignoring_ascii_case(hay: &str, needle: &str) -> bool {
    let (hay, needle) = (hay.as_bytes(), needle.as_bytes());
    needle.is_empty()
        || hay
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// One page of workers, shared with the registry's table: what [`Registry::list_shared`]
/// returns, for a caller that serializes the page and needs no copy of it.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedPage {
    /// Workers, oldest first (by `created_at`, then id).
    pub workers: Vec<Arc<WorkerView>>,
    /// The token for the next page, if there is one.
    pub next_page: Option<String>,
}

/// One page of workers.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Workers, oldest first (by `created_at`, then id).
    pub workers: Vec<WorkerView>,
    /// The token for the next page, if there is one.
    pub next_page: Option<String>,
}

/// The registry. Cheap to clone; every clone is the same registry.
///
/// Must be used inside a tokio runtime: each runtime added gets a task that follows its
/// source's lifecycle stream.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: IdIssuer,
    state: Mutex<State>,
    /// Public id → (runtime, source key): routing without the projection's lock.
    ids: DashMap<WorkerId, (RuntimeId, SourceKey)>,
    sources: DashMap<RuntimeId, Arc<Runtime>>,
    /// The tasks that follow each source's lifecycle stream, by runtime.
    followers: Mutex<Vec<(RuntimeId, tokio::task::JoinHandle<()>)>>,
    /// The log's head seq, for waiters on the projection.
    version: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    /// Set when shutdown starts: a lifecycle stream that ends now is no outage.
    stopping: AtomicBool,
    /// Set when shutdown is done: nothing is published any more.
    closed: AtomicBool,
}

struct Runtime {
    kind: String,
    source: Arc<dyn RuntimeSource>,
    caps: Capabilities,
}

struct State {
    log: EventLog,
    workers: Table,
    runtimes: BTreeMap<RuntimeId, RuntimeRecord>,
}

struct RuntimeRecord {
    kind: String,
    caps: Capabilities,
    health: HealthView,
    diagnostics: Vec<Diagnostic>,
    answered: bool,
    /// The registry marked it `unavailable` once (its lifecycle stream failed): its first
    /// attempt is over, so it no longer holds readiness back.
    known_down: bool,
    /// Set while the runtime is being removed or replaced: its follower ends with the
    /// source's stream instead of reconnecting, and spawns are refused.
    retiring: bool,
}

impl Registry {
    /// A registry with no runtimes. Loads (or creates) the id key in the state directory.
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let issuer = IdIssuer::load_or_create(&config.state_dir)?;
        Self::with_issuer(config, issuer)
    }

    /// A registry with the given id issuer (the state directory is not touched).
    pub fn with_issuer(config: RegistryConfig, issuer: IdIssuer) -> Result<Self, RegistryError> {
        let mut epoch = [0u8; 8];
        getrandom::fill(&mut epoch).map_err(RegistryError::internal)?;
        let log = EventLog::new(
            u64::from_le_bytes(epoch),
            config.event_retention,
            config.event_retention_bytes,
            config.subscriber_queue,
        );
        Ok(Registry {
            inner: Arc::new(Inner {
                issuer,
                state: Mutex::new(State {
                    log,
                    workers: Table::default(),
                    runtimes: BTreeMap::new(),
                }),
                ids: DashMap::new(),
                sources: DashMap::new(),
                followers: Mutex::new(Vec::new()),
                version: watch::channel(0).0,
                shutdown: watch::channel(false).0,
                stopping: AtomicBool::new(false),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Adds a runtime served by `source`, and starts following its lifecycle stream.
    /// `Conflict` if the id is taken.
    pub async fn add_runtime(
        &self,
        id: RuntimeId,
        kind: &str,
        source: Arc<dyn RuntimeSource>,
    ) -> Result<(), RegistryError> {
        let caps = source.capabilities();
        let health = source.health().await;
        {
            let mut st = self.inner.lock();
            if st.runtimes.contains_key(&id) {
                return Err(RegistryError::Conflict(format!(
                    "runtime {id} is configured twice"
                )));
            }
            st.runtimes.insert(
                id.clone(),
                RuntimeRecord {
                    kind: kind.to_string(),
                    caps,
                    health: HealthView {
                        status: HealthStatus::Unavailable,
                        since: OffsetDateTime::now_utc(),
                        retry_at: None,
                        message: None,
                    },
                    diagnostics: Vec::new(),
                    answered: false,
                    retiring: false,
                    known_down: false,
                },
            );
            // Publishes the first runtime.updated.
            self.inner.set_health_locked(&mut st, &id, health, true);
        }
        let runtime = Arc::new(Runtime {
            kind: kind.to_string(),
            source,
            caps,
        });
        self.inner.sources.insert(id.clone(), runtime.clone());
        self.start_follower(id, runtime);
        Ok(())
    }

    /// Starts following the lifecycle stream of `runtime`, which serves `id`.
    fn start_follower(&self, id: RuntimeId, runtime: Arc<Runtime>) {
        let follower = tokio::spawn(supervise_follower(
            Arc::downgrade(&self.inner),
            id.clone(),
            runtime,
            self.inner.shutdown.subscribe(),
        ));
        self.inner
            .followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, follower));
    }

    /// Takes a runtime out of the registry (a reload removed it from the config): its
    /// source is shut down as at [`shutdown`](Self::shutdown) — owned workers are stopped
    /// within each worker's own grace, cut to `grace`, observed ones let go — and the states that
    /// shutdown reports are published; then each of its workers leaves with
    /// `worker.removed`, and the runtime with `runtime.removed`.
    ///
    /// `RuntimeNotFound` for an unknown id; `Conflict` while the runtime is already being
    /// removed or replaced. Meanwhile spawns on it are refused (`runtime_unavailable`);
    /// its workers can still be read, stopped and streamed.
    pub async fn remove_runtime(
        &self,
        id: &RuntimeId,
        grace: Option<Duration>,
    ) -> Result<(), RegistryError> {
        self.retire(id, grace).await?;
        let mut st = self.inner.lock();
        let gone: Vec<WorkerId> = st.workers.ids_of(id);
        for worker in gone {
            self.inner.remove_locked(&mut st, &worker);
        }
        st.runtimes.remove(id);
        self.inner.sources.remove(id);
        if !self.inner.closed.load(Ordering::Acquire) {
            self.inner.publish(
                &mut st,
                EventPayload::RuntimeRemoved {
                    runtime_id: id.clone(),
                },
            );
        }
        Ok(())
    }

    /// Serves an existing runtime with a new source (a reload changed its config in a way
    /// its source can't take in place). The old source is shut down as by
    /// [`remove_runtime`](Self::remove_runtime), its last reports published; then the new
    /// source's first `Resync` decides: a worker it does not report leaves with
    /// `worker.removed` (an `embedded` runtime's, whose keys are new), one it reports again
    /// keeps its id (an observed worker, whose key is the same). A `runtime.updated` marks
    /// the change. The runtime keeps its id throughout; it is not `ready` again until the
    /// new source has answered once.
    ///
    /// `RuntimeNotFound` for an unknown id; `Conflict` while it is already being removed or
    /// replaced (then `source` is not used).
    pub async fn replace_runtime(
        &self,
        id: &RuntimeId,
        kind: &str,
        source: Arc<dyn RuntimeSource>,
        grace: Option<Duration>,
    ) -> Result<(), RegistryError> {
        self.retire(id, grace).await?;
        let caps = source.capabilities();
        let health = source.health().await;
        let runtime = Arc::new(Runtime {
            kind: kind.to_string(),
            source,
            caps,
        });
        {
            // The new source and the end of the retirement together: a spawn never reaches
            // the old source once it is shut down, nor is refused once the new one serves.
            let mut st = self.inner.lock();
            let Some(rec) = st.runtimes.get_mut(id) else {
                return Err(not_found_runtime(id));
            };
            rec.kind = kind.to_string();
            rec.caps = caps;
            rec.answered = false;
            rec.retiring = false;
            self.inner.sources.insert(id.clone(), runtime.clone());
            self.inner.set_health_locked(&mut st, id, health, true);
        }
        self.start_follower(id.clone(), runtime);
        Ok(())
    }

    /// Hands a runtime's source a changed config to take in place
    /// ([`RuntimeSource::reconfigure`]). `Ok(true)` when it did — nothing else changes, and a
    /// `runtime.updated` marks it; `Ok(false)` when the source can't, and then nothing
    /// changed (the caller replaces the runtime).
    pub async fn reconfigure_runtime(
        &self,
        id: &RuntimeId,
        config: &SourceConfig,
    ) -> Result<bool, RegistryError> {
        let rt = self.inner.runtime(id)?;
        let applied = rt
            .source
            .reconfigure(config)
            .await
            .map_err(|e| self.inner.context(e, "reconfigure", id, None))?;
        if applied {
            let mut st = self.inner.lock();
            if let Some(runtime) = st.runtime_view(id) {
                self.inner
                    .publish(&mut st, EventPayload::RuntimeUpdated { runtime });
            }
        }
        Ok(applied)
    }

    /// Marks a runtime retiring, shuts its source down, and waits for its follower to
    /// apply what the source reported until its stream ended (a follower that does not
    /// end in time is stopped).
    async fn retire(&self, id: &RuntimeId, grace: Option<Duration>) -> Result<(), RegistryError> {
        {
            let mut st = self.inner.lock();
            let rec = st
                .runtimes
                .get_mut(id)
                .ok_or_else(|| not_found_runtime(id))?;
            if rec.retiring {
                return Err(RegistryError::Conflict(format!(
                    "runtime {id} is already being removed or replaced"
                )));
            }
            rec.retiring = true;
        }
        let rt = self.inner.runtime(id)?;
        let followers: Vec<tokio::task::JoinHandle<()>> = {
            let mut all = self
                .inner
                .followers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let (mine, rest) = std::mem::take(&mut *all)
                .into_iter()
                .partition(|(r, _)| r == id);
            *all = rest;
            mine.into_iter().map(|(_, f)| f).collect()
        };
        let source = rt.source.clone();
        let mut task = tokio::spawn(async move { source.shutdown(grace).await });
        let deadline =
            tokio::time::Instant::now() + grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE) + SHUTDOWN_MARGIN;
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(runtime = %id, error = %e, "source shutdown panicked"),
            // It goes on in the background: an owned worker is still killed in the end.
            Err(_) => {
                tracing::warn!(runtime = %id, "the runtime's source did not finish shutting down in time; going on without it")
            }
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        for mut follower in followers {
            if tokio::time::timeout_at(deadline, &mut follower)
                .await
                .is_err()
            {
                tracing::warn!(runtime = %id, "the runtime's lifecycle stream did not end after its shutdown");
                follower.abort();
            }
        }
        Ok(())
    }

    /// Every runtime, sorted by id.
    pub fn runtimes(&self) -> Vec<RuntimeView> {
        let st = self.inner.lock();
        st.runtimes
            .keys()
            .filter_map(|id| st.runtime_view(id))
            .collect()
    }

    /// One runtime.
    pub fn runtime(&self, id: &RuntimeId) -> Result<RuntimeView, RegistryError> {
        self.inner
            .lock()
            .runtime_view(id)
            .ok_or_else(|| not_found_runtime(id))
    }

    /// Whether this registry serves: every runtime has answered once (its first whole truth
    /// arrived) or is known to be unavailable (its lifecycle stream could not be had, at
    /// least once). A runtime that is down does not keep the registry unready; its health
    /// says it is down. Only a runtime whose first attempt is still under way does.
    pub fn is_ready(&self) -> bool {
        self.inner
            .lock()
            .runtimes
            .values()
            .all(|r| r.answered || r.known_down)
    }

    /// Workers that have a health probe, counted by runtime and health, for every runtime
    /// (each health state present, 0 where none).
    pub fn worker_health_counts(&self) -> BTreeMap<RuntimeId, BTreeMap<HealthState, u64>> {
        let st = self.inner.lock();
        let mut counts: BTreeMap<RuntimeId, BTreeMap<HealthState, u64>> = st
            .runtimes
            .keys()
            .map(|id| (id.clone(), HealthState::ALL.map(|h| (h, 0)).into()))
            .collect();
        for rec in st.workers.records() {
            if let Some(health) = rec.view.health {
                if let Some(n) = counts
                    .get_mut(&rec.view.runtime_id)
                    .and_then(|c| c.get_mut(&health.status))
                {
                    *n += 1;
                }
            }
        }
        counts
    }

    /// How many events the registry has published in this run (the log's head).
    pub fn events_published(&self) -> u64 {
        self.inner.lock().log.head().seq()
    }

    /// One worker.
    pub fn worker(&self, id: &WorkerId) -> Result<WorkerView, RegistryError> {
        self.worker_shared(id).map(|v| (*v).clone())
    }

    /// One worker, shared with the registry's table (no copy; the view never changes, an
    /// update replaces it).
    pub fn worker_shared(&self, id: &WorkerId) -> Result<Arc<WorkerView>, RegistryError> {
        self.inner
            .lock()
            .workers
            .get(id)
            .map(|r| r.view.clone())
            .ok_or_else(|| not_found_worker(id))
    }

    /// Workers of every runtime that pass `filter`, oldest first, `limit` (1..=1000) at a
    /// time. `page` is the `next_page` of the previous call; a page token survives
    /// changes in between (a removed worker does not shift the pages).
    pub fn list_workers(
        &self,
        filter: &WorkerFilter,
        limit: usize,
        page: Option<&str>,
    ) -> Result<Page, RegistryError> {
        let shared = self.list_shared(filter, limit, page)?;
        Ok(Page {
            workers: shared.workers.iter().map(|v| (**v).clone()).collect(),
            next_page: shared.next_page,
        })
    }

    /// [`list_workers`](Self::list_workers), with the views shared rather than copied.
    ///
    /// The page is read from the index in page order: its cost is the page (and the
    /// workers a filter the index does not hold skips), not the number of workers.
    pub fn list_shared(
        &self,
        filter: &WorkerFilter,
        limit: usize,
        page: Option<&str>,
    ) -> Result<SharedPage, RegistryError> {
        if limit == 0 || limit > MAX_PAGE {
            return Err(RegistryError::InvalidRequest(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        let after = page.map(parse_page_token).transpose()?;
        let (workers, next) = self
            .inner
            .lock()
            .workers
            .page(filter, after.as_ref(), limit);
        Ok(SharedPage {
            workers,
            next_page: next.map(|key| page_token(&key)),
        })
    }

    /// The spawn profiles of `runtime` (see [`RuntimeSource::profiles`]), sorted by name,
    /// their descriptions scrubbed like every source message.
    pub async fn profiles(&self, runtime: &RuntimeId) -> Result<Vec<ProfileView>, RegistryError> {
        let rt = self.inner.runtime(runtime)?;
        let mut profiles = rt
            .source
            .profiles()
            .await
            .map_err(|e| self.inner.context(e, "profiles", runtime, None))?;
        for p in &mut profiles {
            p.description = p.description.as_deref().map(sanitize_message);
        }
        profiles.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(profiles)
    }

    /// Starts a worker in `runtime` and returns it.
    pub async fn spawn(
        &self,
        runtime: &RuntimeId,
        request: SpawnRequest,
    ) -> Result<WorkerView, RegistryError> {
        let rt = self.inner.runtime(runtime)?;
        if !rt.caps.spawn {
            return Err(unsupported(runtime, "start workers"));
        }
        if !rt.caps.restart && request.asks_for_restart() {
            return Err(unsupported(
                runtime,
                "restart workers: leave out `restart`, `restart_backoff`, `max_restarts` and \
                 `restart_window`",
            ));
        }
        request.validate()?;
        if self.inner.is_retiring(runtime) {
            return Err(RegistryError::unavailable(
                format!("runtime {runtime} is being reconfigured; try again shortly"),
                Some(Duration::from_secs(1)),
            ));
        }
        let since = self.inner.lock().log.head().seq();
        let worker = rt
            .source
            .spawn(request)
            .await
            .map_err(|e| self.inner.context(e, "spawn", runtime, None))?;
        let id = self.inner.issuer.worker_id(runtime, &worker.key);
        // The projection changes only through the lifecycle stream (one writer, in order);
        // wait for it to show the worker at least as far as the source answered (a program
        // that could not start is `failed` at once, not the `starting` reported before), so
        // a `GET` right after agrees. A worker that is already gone again (say, failed and
        // evicted at once) is answered as the source reported it.
        let view = WorkerView::from_source(id.clone(), runtime.clone(), &worker);
        let reached = |have: &WorkerView| {
            have.restarts > view.restarts
                || match (have.state.progress(), view.state.progress()) {
                    (Some(have), Some(want)) => have >= want,
                    _ => true,
                }
        };
        let confirmed = self
            .inner
            .await_projection(|st| match st.workers.get(&id) {
                Some(rec) => reached(&rec.view).then(|| (*rec.view).clone()),
                None => st.log.removed_since(since, &id).then(|| view.clone()),
            })
            .await;
        Ok(confirmed.unwrap_or(view))
    }

    /// Asks a worker to stop (SIGTERM now, a hard kill after `grace`) and returns it in the
    /// state the stop moved it to: `stopping`, or terminal when it had ended (or ended
    /// meanwhile). A no-op on a terminal worker, which is returned as it is.
    ///
    /// Like `spawn`, it waits (up to 5 s) for the source's lifecycle stream to show the
    /// change; a worker whose change is not confirmed in time is returned as the projection
    /// holds it then.
    pub async fn stop(
        &self,
        id: &WorkerId,
        grace: Option<Duration>,
    ) -> Result<WorkerView, RegistryError> {
        let (runtime, key, rt) = self.inner.route(id)?;
        if !rt.caps.stop {
            return Err(unsupported(&runtime, "stop workers"));
        }
        // A terminal worker never changes: the second stop succeeds without asking the
        // source (which may be unreachable just then).
        let before = self.worker(id)?;
        if before.state.is_terminal() {
            return Ok(before);
        }
        rt.source
            .stop(&key, grace)
            .await
            .map_err(|e| self.inner.context(e, "stop", &runtime, Some(id)))?;
        let moved = |v: &WorkerView| v.state.progress().is_some_and(|p| p >= 2);
        let confirmed = self
            .inner
            .await_projection(|st| match st.workers.get(id) {
                Some(rec) => moved(&rec.view).then(|| (*rec.view).clone()),
                // Removed right after it ended (a full `max_finished`): as it was last seen.
                None => Some(before.clone()),
            })
            .await;
        match confirmed {
            Some(view) => Ok(view),
            None => self.worker(id).or(Ok(before)),
        }
    }

    /// Writes to a worker's stdin.
    pub async fn input(&self, id: &WorkerId, data: Bytes) -> Result<(), RegistryError> {
        let (runtime, key, rt) = self.inner.route(id)?;
        if !rt.caps.input {
            return Err(unsupported(&runtime, "take input"));
        }
        rt.source
            .input(&key, data)
            .await
            .map_err(|e| self.inner.context(e, "input", &runtime, Some(id)))
    }

    /// Removes a terminal worker's record at once. `Conflict` while it runs.
    pub async fn remove(&self, id: &WorkerId) -> Result<(), RegistryError> {
        let (runtime, key, rt) = self.inner.route(id)?;
        if !rt.caps.remove {
            return Err(unsupported(&runtime, "remove worker records"));
        }
        rt.source
            .remove(&key)
            .await
            .map_err(|e| self.inner.context(e, "remove", &runtime, Some(id)))?;
        let gone = self
            .inner
            .await_projection(|st| (!st.workers.contains(id)).then_some(()))
            .await;
        if gone.is_none() {
            tracing::warn!(runtime = %runtime, worker = %id, "removal not confirmed by the source's stream in time");
        }
        Ok(())
    }

    /// Opens a worker's output stream.
    pub async fn output(
        &self,
        id: &WorkerId,
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        let (runtime, key, rt) = self.inner.route(id)?;
        if !rt.caps.output {
            return Err(unsupported(&runtime, "stream output"));
        }
        rt.source
            .output(&key, request)
            .await
            .map_err(|e| self.inner.context(e, "output", &runtime, Some(id)))
    }

    /// Subscribes to the event log.
    ///
    /// With no cursor: a `snapshot`, then live events. With a cursor of this run that is
    /// still retained: every event after it, none twice, then live. Otherwise (another
    /// run's cursor, an expired or a malformed one): `reset {reason}`, a `snapshot`, then
    /// live. `runtime` limits everything, the snapshot too, to one runtime.
    pub fn subscribe(&self, cursor: Option<&str>, runtime: Option<RuntimeId>) -> Subscription {
        let mut st = self.inner.lock();
        let pending = match st.log.start(cursor, &runtime) {
            Start::Snapshot => vec![st.snapshot_item(&runtime)],
            Start::Replay(items) => items.into_iter().map(Pending::Item).collect(),
            Start::Reset(reason) => st.reset_items(reason, &runtime),
        };
        let (rx, lagged) = st.log.register(runtime.clone());
        if self.inner.closed.load(Ordering::Acquire) {
            st.log.close_all();
        }
        let weak: Weak<dyn Resubscribe> = Arc::downgrade(&self.inner) as Weak<dyn Resubscribe>;
        Subscription::new(pending, rx, lagged, runtime, weak)
    }

    /// Shuts down: every source's [`RuntimeSource::shutdown`] (owned workers are stopped
    /// within `grace`), then the lifecycle followers stop and every subscription ends.
    ///
    /// A source that has not finished `grace` (default 10 s) plus 5 s later is given up on,
    /// so shutting down always ends.
    pub async fn shutdown(&self, grace: Option<Duration>) {
        self.inner.stopping.store(true, Ordering::Release);
        let runtimes: Vec<Arc<Runtime>> = self
            .inner
            .sources
            .iter()
            .map(|e| e.value().clone())
            .collect();
        let tasks: Vec<_> = runtimes
            .into_iter()
            .map(|rt| tokio::spawn(async move { rt.source.shutdown(grace).await }))
            .collect();
        // A source that does not finish within its grace (and a margin) is not waited for:
        // shutting down must end also when a source hangs.
        let deadline =
            tokio::time::Instant::now() + grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE) + SHUTDOWN_MARGIN;
        for mut task in tasks {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "source shutdown panicked"),
                Err(_) => {
                    tracing::warn!(
                        "a source did not finish shutting down in time; going on without it"
                    );
                    task.abort();
                }
            }
        }
        // The sources' streams end once they are shut down: let the followers apply what
        // was reported until then (a source that breaks that promise is not waited for long).
        let followers: Vec<_> = std::mem::take(
            &mut *self
                .inner
                .followers
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        for (_, follower) in followers {
            if tokio::time::timeout_at(deadline, follower).await.is_err() {
                tracing::warn!("a source's lifecycle stream did not end after its shutdown");
            }
        }
        self.inner.closed.store(true, Ordering::Release);
        self.inner.shutdown.send_replace(true);
        self.inner.lock().log.close_all();
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("Registry")
            .field("runtimes", &st.runtimes.keys().collect::<Vec<_>>())
            .field("workers", &st.workers.len())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can't leave the projection half-written in a way
        // later calls would misread (each change is one insert or remove), so go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `id` is being removed or replaced.
    fn is_retiring(&self, id: &RuntimeId) -> bool {
        self.lock().runtimes.get(id).is_some_and(|r| r.retiring)
    }

    fn runtime(&self, id: &RuntimeId) -> Result<Arc<Runtime>, RegistryError> {
        self.sources
            .get(id)
            .map(|r| r.value().clone())
            .ok_or_else(|| not_found_runtime(id))
    }

    fn route(&self, id: &WorkerId) -> Result<(RuntimeId, SourceKey, Arc<Runtime>), RegistryError> {
        let (runtime, key) = self
            .ids
            .get(id)
            .map(|e| e.value().clone())
            .ok_or_else(|| not_found_worker(id))?;
        let rt = self.runtime(&runtime)?;
        Ok((runtime, key, rt))
    }

    /// Puts the registry's context on a source's error, in this one place: a not-found gets
    /// the worker's public id, an internal error's detail goes to the log, every other
    /// message is scrubbed of internal authority.
    fn context(
        &self,
        err: RegistryError,
        op: &'static str,
        runtime: &RuntimeId,
        worker: Option<&WorkerId>,
    ) -> RegistryError {
        match &err {
            RegistryError::WorkerNotFound(_) => match worker {
                Some(w) => err.with_message(format!("worker {w} not found")),
                None => err.with_message("worker not found"),
            },
            RegistryError::Internal { detail } => {
                tracing::error!(runtime = %runtime, op, worker = ?worker, detail = %detail, "source failed");
                err
            }
            _ => err.sanitized(),
        }
    }

    /// Waits until `check` finds what it looks for in the projection, or `CONFIRM_WAIT`.
    async fn await_projection<T>(&self, check: impl Fn(&State) -> Option<T>) -> Option<T> {
        let mut version = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + CONFIRM_WAIT;
        loop {
            if let Some(found) = check(&self.lock()) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, version.changed()).await {
                Ok(Ok(())) => {}
                _ => return check(&self.lock()),
            }
        }
    }

    fn publish(&self, st: &mut State, payload: EventPayload) {
        let cursor = st.log.publish(payload);
        self.version.send_replace(cursor.seq());
    }

    /// Applies one lifecycle event of `runtime`'s source.
    fn apply(&self, runtime: &RuntimeId, event: SourceEvent) {
        let mut st = self.lock();
        if self.closed.load(Ordering::Acquire) || !st.runtimes.contains_key(runtime) {
            return;
        }
        match event {
            SourceEvent::Upsert(worker) => {
                self.upsert_locked(&mut st, runtime, &worker);
            }
            SourceEvent::Removed(key) => {
                let id = self.issuer.worker_id(runtime, &key);
                self.remove_locked(&mut st, &id);
            }
            SourceEvent::Resync(workers) => {
                let mut present = HashSet::with_capacity(workers.len());
                for worker in &workers {
                    present.insert(self.upsert_locked(&mut st, runtime, worker));
                }
                let gone: Vec<WorkerId> = st
                    .workers
                    .ids_of(runtime)
                    .into_iter()
                    .filter(|id| !present.contains(id))
                    .collect();
                // `ids` follows `workers` in upsert_locked and remove_locked: nothing more to
                // sweep.
                for id in gone {
                    self.remove_locked(&mut st, &id);
                }
                if let Some(rec) = st.runtimes.get_mut(runtime) {
                    rec.answered = true;
                }
            }
            SourceEvent::Health(health) => self.set_health_locked(&mut st, runtime, health, false),
        }
    }

    /// Upserts a worker into the projection and publishes `worker.upserted` if its view
    /// changed. A terminal worker never changes again, and a worker never moves back
    /// (`running` after `stopping`, say) — such reports are ignored.
    fn upsert_locked(
        &self,
        st: &mut State,
        runtime: &RuntimeId,
        worker: &SourceWorker,
    ) -> WorkerId {
        let id = self.issuer.worker_id(runtime, &worker.key);
        let view = WorkerView::from_source(id.clone(), runtime.clone(), worker);
        let mut furthest = view.state;
        let old_state = st.workers.get(&id).map(|old| old.view.state);
        if let Some(old) = st.workers.get(&id) {
            let moves_on =
                old.furthest
                    .may_become_across_runs(old.view.restarts, view.state, view.restarts);
            if *old.view == view || !moves_on {
                return id;
            }
            if view.state == WorkerState::Unknown && view.restarts == old.view.restarts {
                furthest = old.furthest;
            }
        }
        if view.state == WorkerState::Failed && old_state != Some(WorkerState::Failed) {
            log_failure(runtime, &view);
        }
        self.ids
            .insert(id.clone(), (runtime.clone(), worker.key.clone()));
        st.workers.insert(Record {
            view: Arc::new(view.clone()),
            furthest,
        });
        self.publish(st, EventPayload::WorkerUpserted { worker: view });
        id
    }

    fn remove_locked(&self, st: &mut State, id: &WorkerId) {
        if let Some(rec) = st.workers.remove(id) {
            self.ids.remove(id);
            self.publish(
                st,
                EventPayload::WorkerRemoved {
                    worker_id: id.clone(),
                    runtime_id: rec.view.runtime_id.clone(),
                },
            );
        }
    }

    /// Records a runtime's health (messages sanitized) and publishes `runtime.updated` when
    /// anything a client sees changed, or always with `force`.
    fn set_health_locked(
        &self,
        st: &mut State,
        runtime: &RuntimeId,
        health: SourceHealth,
        force: bool,
    ) {
        let Some(rec) = st.runtimes.get_mut(runtime) else {
            return;
        };
        let status_changed = rec.health.status != health.status;
        let view = HealthView {
            status: health.status,
            since: if status_changed {
                OffsetDateTime::now_utc()
            } else {
                rec.health.since
            },
            retry_at: health.retry_at,
            message: health.message.as_deref().map(sanitize_message),
        };
        let diagnostics: Vec<Diagnostic> = health
            .diagnostics
            .iter()
            .take(MAX_DIAGNOSTICS)
            .map(|d| Diagnostic {
                code: sanitize_message(&d.code),
                message: sanitize_message(&d.message),
            })
            .collect();
        if !force && view == rec.health && diagnostics == rec.diagnostics {
            return;
        }
        rec.health = view;
        rec.diagnostics = diagnostics;
        if let Some(runtime) = st.runtime_view(runtime) {
            self.publish(st, EventPayload::RuntimeUpdated { runtime });
        }
    }
}

impl Resubscribe for Inner {
    fn resubscribe(
        &self,
        reason: ResetReason,
        filter: &Option<RuntimeId>,
    ) -> Option<(Vec<Pending>, mpsc::Receiver<StreamItem>, Arc<AtomicBool>)> {
        let mut st = self.lock();
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let items = st.reset_items(reason, filter);
        let (rx, lagged) = st.log.register(filter.clone());
        Some((items, rx, lagged))
    }
}

impl State {
    fn runtime_view(&self, id: &RuntimeId) -> Option<RuntimeView> {
        let rec = self.runtimes.get(id)?;
        Some(RuntimeView {
            id: id.clone(),
            kind: rec.kind.clone(),
            health: rec.health.clone(),
            capabilities: rec.caps,
            workers: self.workers.counts(id),
            diagnostics: rec.diagnostics.clone(),
        })
    }

    /// The snapshot as of now. Under the lock it only takes the shared views, in page
    /// order; the subscription copies them into the event outside the lock, when it is read.
    fn snapshot_item(&self, filter: &Option<RuntimeId>) -> Pending {
        let keep = |r: &RuntimeId| filter.as_ref().is_none_or(|f| f == r);
        let runtimes = self
            .runtimes
            .keys()
            .filter(|id| keep(id))
            .filter_map(|id| self.runtime_view(id))
            .collect();
        let by_runtime = WorkerFilter {
            runtime: filter.clone(),
            ..WorkerFilter::default()
        };
        let workers = self.workers.walk(&by_runtime, None).cloned().collect();
        Pending::Snapshot(Box::new(LazySnapshot {
            cursor: self.log.head(),
            runtimes,
            workers,
        }))
    }

    fn reset_items(&self, reason: ResetReason, filter: &Option<RuntimeId>) -> Vec<Pending> {
        vec![
            Pending::Item(StreamItem::new(
                self.log.origin(),
                EventPayload::Reset { reason },
            )),
            self.snapshot_item(filter),
        ]
    }
}

/// Runs [`follow_source`] for one runtime and starts it again, after a growing delay, if it
/// panics: a bug met while applying one event must not leave the runtime unfollowed (and
/// its health frozen) until the registry restarts. The runtime shows `unavailable` while
/// the follower waits to start again; the new one reopens the stream, so the source's
/// first `Resync` brings the table back to the truth.
async fn supervise_follower(
    inner: Weak<Inner>,
    id: RuntimeId,
    runtime: Arc<Runtime>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(follow_source(
            inner.clone(),
            id.clone(),
            runtime.clone(),
            shutdown.clone(),
        ));
        match task.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                // A follower that ran a good while before it failed starts a fresh backoff.
                if started.elapsed() > BACKOFF_CAP * 2 {
                    backoff = BACKOFF_START;
                }
                tracing::error!(
                    runtime = %id,
                    kind = %runtime.kind,
                    retry_in_ms = backoff.as_millis() as u64,
                    "the task following the runtime panicked; starting it again"
                );
            }
            Err(_) => return,
        }
        let message =
            "the registry lost track of the runtime after an internal error; reconnecting";
        if !unavailable_for(
            &inner,
            &id,
            &runtime,
            message.into(),
            backoff,
            &mut shutdown,
        )
        .await
        {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// Follows one source's lifecycle stream for as long as the registry lives: applies its
/// events, marks the runtime `unavailable` while the stream can't be had, and reopens it
/// with capped exponential backoff.
async fn follow_source(
    inner: Weak<Inner>,
    id: RuntimeId,
    runtime: Arc<Runtime>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let opened = tokio::select! {
            opened = runtime.source.events() => opened,
            _ = shutdown.changed() => return,
        };
        let message = match opened {
            Ok(mut events) => {
                // Whatever the runtime was marked while the stream was down, ask it again.
                let health = runtime.source.health().await;
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                strong.apply(&id, SourceEvent::Health(health));
                drop(strong);
                loop {
                    let event = tokio::select! {
                        event = events.recv() => event,
                        _ = shutdown.changed() => return,
                    };
                    let Some(event) = event else { break };
                    let Some(inner) = inner.upgrade() else { return };
                    inner.apply(&id, event);
                    backoff = BACKOFF_START;
                }
                "the runtime stopped reporting; reconnecting".to_string()
            }
            Err(e) => {
                if let Some(detail) = e.internal_detail() {
                    tracing::warn!(runtime = %id, kind = %runtime.kind, %detail, "opening the runtime's lifecycle stream failed");
                }
                sanitize_message(&e.public_message())
            }
        };
        if !unavailable_for(&inner, &id, &runtime, message, backoff, &mut shutdown).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// Marks the runtime `unavailable` with `message` and a `retry_at` one `backoff` away, then
/// waits that long. `false` when following should end instead: the registry is gone or
/// stopping, or shutdown came during the wait.
async fn unavailable_for(
    inner: &Weak<Inner>,
    id: &RuntimeId,
    runtime: &Runtime,
    message: String,
    backoff: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let Some(strong) = inner.upgrade() else {
        return false;
    };
    // A runtime being removed or replaced is not reconnected: its source was shut down.
    if strong.stopping.load(Ordering::Acquire) || strong.is_retiring(id) {
        return false;
    }
    tracing::warn!(runtime = %id, kind = %runtime.kind, reason = %message, "runtime unavailable");
    let retry_at = OffsetDateTime::now_utc() + backoff;
    strong.apply(
        id,
        SourceEvent::Health(SourceHealth::unavailable(message, Some(retry_at))),
    );
    if let Some(rec) = strong.lock().runtimes.get_mut(id) {
        rec.known_down = true;
    }
    drop(strong);
    tokio::select! {
        _ = tokio::time::sleep(backoff) => true,
        _ = shutdown.changed() => false,
    }
}

/// The one log line of a worker's failure, under its public id (the only id an operator can
/// look up): its reason and, where the source gave one, why in words.
fn log_failure(runtime: &RuntimeId, view: &WorkerView) {
    let reason = view.reason.map(FailReason::as_str).unwrap_or_default();
    let message = view.message.as_deref().unwrap_or("");
    tracing::info!(runtime = %runtime, worker = %view.id, %reason, %message, "worker failed");
}

fn page_token((nanos, id): &PageKey) -> String {
    format!("{nanos}.{id}")
}

fn parse_page_token(token: &str) -> Result<PageKey, RegistryError> {
    let bad = || {
        RegistryError::InvalidRequest("page token is not valid; start again without `page`".into())
    };
    let (nanos, id) = token.split_once('.').ok_or_else(bad)?;
    Ok((
        nanos.parse().map_err(|_| bad())?,
        id.parse().map_err(|_| bad())?,
    ))
}

fn not_found_runtime(id: &RuntimeId) -> RegistryError {
    RegistryError::RuntimeNotFound(format!("runtime {id} not found"))
}

fn not_found_worker(id: &WorkerId) -> RegistryError {
    RegistryError::WorkerNotFound(format!("worker {id} not found"))
}

fn unsupported(runtime: &RuntimeId, what: &str) -> RegistryError {
    RegistryError::Unsupported(format!("runtime {runtime} cannot {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_hides_the_state_dir() {
        let text = format!("{:?}", RegistryConfig::new("/var/lib/roster-secret"));
        assert!(!text.contains("roster-secret"), "{text}");
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let id: WorkerId = "w_0123456789ABCDEFGHJKMNPQRS".parse().unwrap();
        let (n, back) = parse_page_token(&format!("123.{id}")).unwrap();
        assert_eq!((n, back), (123, id));
        for bad in ["", "x", "1.w_", "a.w_0123456789ABCDEFGHJKMNPQRS"] {
            assert_eq!(parse_page_token(bad).unwrap_err().code(), "invalid_request");
        }
    }
}
