//! `TmuxSource`: the table of workers, the lifecycle streams, and the trait's methods.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use registry_core::fanout::{Owed, Subscribers};
use registry_core::output_log::OutputLog;
use registry_core::{
    ArgsRule, Capabilities, FailReason, HealthStatus, OutputRequest, OutputStream, ProfileView,
    RegistryError, RuntimeSource, SourceEvent, SourceEvents, SourceHealth, SourceKey, SourceWorker,
    SpawnRequest, WorkerState,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::config::{TmuxConfig, MAX_GRACE};
use crate::names::Owner;
use crate::sys::{self, Proc};
use crate::tmux::{self, Tmux};
use crate::worker::{self, Plan};

/// How many lifecycle events a reader of [`RuntimeSource::events`] may leave unread before
/// it is owed a fresh `Resync` in their place.
pub(crate) const EVENTS_BUFFER: usize = 64;

/// Bytes of input that may wait for one worker (besides the spawn request's `stdin`);
/// beyond it `input` is `capacity_exceeded`.
pub(crate) const MAX_PENDING_INPUT: usize = 1 << 20;

/// A [`RuntimeSource`] whose workers are tmux sessions on a tmux server of its own.
///
/// See the [crate docs](crate) for how it runs, stops, feeds and reads its workers. It can do
/// everything ([`Capabilities::ALL`]). Create it inside a tokio runtime; its background
/// tasks end when it is dropped. Dropping it without [`shutdown`](RuntimeSource::shutdown)
/// kills its live sessions (blocking, briefly).
///
/// `Debug` shows counts only: no socket name, session name or path.
pub struct TmuxSource {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for TmuxSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.inner.lock();
        f.debug_struct("TmuxSource")
            .field("workers", &t.workers.len())
            .field("live", &t.live)
            .field("closed", &t.closed)
            .finish_non_exhaustive()
    }
}

/// The state every task of the source shares. Background tasks hold a `Weak` to it.
pub(crate) struct Inner {
    pub(crate) me: Weak<Inner>,
    pub(crate) tmux: Tmux,
    pub(crate) config: TmuxConfig,
    pub(crate) state_dir: PathBuf,
    pub(crate) owner: Owner,
    table: Mutex<Table>,
    /// Wakes the monitor: a worker is now watched, or the source is dropped.
    pub(crate) wake: Arc<Notify>,
    /// Bumped whenever a worker becomes terminal (`shutdown` waits on it).
    ended: watch::Sender<()>,
}

/// Everything about workers, under one lock. Lifecycle events are sent only while it is
/// held, so their order is the order of changes and a `Resync` is a consistent picture.
pub(crate) struct Table {
    pub(crate) workers: BTreeMap<u64, Record>,
    request_ids: HashMap<String, u64>,
    next_id: u64,
    /// Workers not yet terminal.
    pub(crate) live: usize,
    /// Terminal workers, oldest first, with when they ended.
    finished: VecDeque<(u64, Instant)>,
    /// Set by `shutdown` (and drop): no new spawns.
    pub(crate) closed: bool,
    subs: Subscribers,
    health: SourceHealth,
}

/// Where a worker is in the source's hands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The spawn is setting the session up; the spawn task owns it.
    Setup,
    /// The command runs; the monitor watches for the pane's death.
    Watched,
    /// A task is ending it (closing the session, draining the output).
    Ending,
    /// Terminal.
    Done,
}

/// One worker.
pub(crate) struct Record {
    pub(crate) info: SourceWorker,
    /// The request it was spawned with, for `request_id` idempotency.
    request: SpawnRequest,
    pub(crate) session: String,
    pub(crate) log: Arc<OutputLog>,
    /// The grace of a stop that gives none.
    pub(crate) grace: Duration,
    pub(crate) phase: Phase,
    /// The pane's process, once the session exists.
    pub(crate) pane: Option<Proc>,
    pub(crate) stop_requested: bool,
    /// The grace of the stop asked for while the worker was still starting.
    pub(crate) pending_grace: Option<Duration>,
    /// When the SIGKILL of a stop is due.
    pub(crate) kill_at: Option<Instant>,
    pub(crate) kill_timer: Option<AbortHandle>,
    /// The input queue; `None` once the worker is terminal.
    pub(crate) input: Option<InputQueue>,
    /// The queue's receiving end, until the worker runs and its writer task takes it.
    pub(crate) input_rx: Option<mpsc::UnboundedReceiver<InputItem>>,
    /// The task that copies the session's output into `log`.
    pub(crate) reader: Option<JoinHandle<()>>,
    /// How the command ended, once its wrapper said so.
    pub(crate) seen_end: Option<Ending>,
}

/// Bytes for a worker's stdin, with the part of the input budget they hold.
pub(crate) type InputItem = (Bytes, Option<OwnedSemaphorePermit>);

pub(crate) struct InputQueue {
    tx: mpsc::UnboundedSender<InputItem>,
    budget: Arc<Semaphore>,
}

/// How a worker came to its end, as the source saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The pane's process exited with this code.
    Exited(i32),
    /// A signal ended the pane's process.
    Signaled,
    /// The session vanished without the source (killed from outside, or the server died).
    Vanished,
    /// The source ended it: a stop's SIGKILL did not end it, or it was stopped before its
    /// command ran.
    Forced,
    /// The session could not be set up.
    SpawnFailed,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Inner {
    pub(crate) fn new(
        me: Weak<Inner>,
        tmux: Tmux,
        config: TmuxConfig,
        state_dir: PathBuf,
    ) -> Inner {
        Inner {
            me,
            tmux,
            config,
            state_dir,
            owner: Owner::register(),
            table: Mutex::new(Table {
                workers: BTreeMap::new(),
                request_ids: HashMap::new(),
                next_id: 1,
                live: 0,
                finished: VecDeque::new(),
                closed: false,
                subs: Subscribers::new(EVENTS_BUFFER),
                health: SourceHealth::ready(),
            }),
            wake: Arc::new(Notify::new()),
            ended: watch::channel(()).0,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        // Every change under this lock is one step, so a panic leaves it consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker number behind `key`; `WorkerNotFound` for a key this source did not make.
    fn id_of(&self, key: &SourceKey) -> Result<u64, RegistryError> {
        self.owner.worker_of(key.as_str()).ok_or_else(not_found)
    }

    /// Creates a `starting` record with its input queue (the request's `stdin` first) and
    /// reports it.
    fn create_record(&self, t: &mut Table, request: SpawnRequest, plan: &Plan) -> u64 {
        let id = t.next_id;
        t.next_id += 1;
        let session = self.owner.session(id);
        let info = SourceWorker {
            key: SourceKey::new(session.clone()),
            name: request.name.clone(),
            labels: request.labels.clone(),
            state: WorkerState::Starting,
            exit_code: None,
            reason: None,
            created_at: now(),
            started_at: None,
            ended_at: None,
            last_seen_at: None,
            profile: request.profile.clone(),
            args: request.args.clone(),
            command: request.command.clone(),
            restarts: 0,
            last_exit: None,
            retry_at: None,
            message: None,
            health: None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(text) = request.stdin.as_ref().filter(|t| !t.is_empty()) {
            // The initial text goes first, outside the input budget (the request's own
            // limit bounds it).
            let _ = tx.send((Bytes::from(text.0.clone()), None));
        }
        if let Some(request_id) = &request.request_id {
            t.request_ids.insert(request_id.clone(), id);
        }
        t.live += 1;
        t.workers.insert(
            id,
            Record {
                info,
                request,
                session,
                log: OutputLog::new(plan.retention),
                grace: plan.grace,
                phase: Phase::Setup,
                pane: None,
                stop_requested: false,
                pending_grace: None,
                kill_at: None,
                kill_timer: None,
                input: Some(InputQueue {
                    tx,
                    budget: Arc::new(Semaphore::new(MAX_PENDING_INPUT)),
                }),
                input_rx: Some(rx),
                reader: None,
                seen_end: None,
            },
        );
        self.upsert(t, id);
        id
    }

    /// Reports worker `id` as it is now.
    pub(crate) fn upsert(&self, t: &mut Table, id: u64) {
        if let Some(info) = t.workers.get(&id).map(|r| r.info.clone()) {
            self.emit(t, SourceEvent::Upsert(info));
        }
    }

    /// Makes worker `id` terminal: its state from how it ended, its output complete, its
    /// input closed; reports it. Returns it. Nothing happens to a worker already terminal.
    pub(crate) fn end(&self, t: &mut Table, id: u64, how: Ending) -> Option<SourceWorker> {
        let record = t.workers.get_mut(&id)?;
        if record.phase == Phase::Done {
            return Some(record.info.clone());
        }
        let stopped = record.stop_requested;
        let info = &mut record.info;
        (info.state, info.exit_code, info.reason) = match how {
            Ending::Exited(code) if stopped => (WorkerState::Stopped, Some(code), None),
            Ending::Exited(code) => (WorkerState::Exited, Some(code), None),
            Ending::Signaled | Ending::Vanished | Ending::Forced if stopped => {
                (WorkerState::Stopped, None, None)
            }
            Ending::Signaled => (WorkerState::Failed, None, Some(FailReason::Killed)),
            Ending::Vanished => (WorkerState::Failed, None, Some(FailReason::Lost)),
            // Forced is only ever a stop's doing; a spawn that fails is not stopped.
            Ending::Forced => (WorkerState::Stopped, None, None),
            Ending::SpawnFailed => (WorkerState::Failed, None, Some(FailReason::SpawnFailed)),
        };
        info.ended_at = Some(now());
        record.phase = Phase::Done;
        record.input = None;
        record.input_rx = None;
        record.reader = None;
        record.kill_at = None;
        if let Some(timer) = record.kill_timer.take() {
            timer.abort();
        }
        // Terminal and complete at once: a reader that gets `End` finds the worker terminal.
        record.log.finish();
        let info = record.info.clone();
        t.live -= 1;
        t.finished.push_back((id, Instant::now()));
        self.emit(t, SourceEvent::Upsert(info.clone()));
        while t.finished.len() > self.config.max_finished {
            if let Some((old, _)) = t.finished.pop_front() {
                self.remove_record(t, old);
            }
        }
        self.ended.send_replace(());
        // The monitor recomputes when the next record is due for removal.
        self.wake.notify_one();
        Some(info)
    }

    /// Removes a terminal record, its request id and its output, and reports it.
    fn remove_record(&self, t: &mut Table, id: u64) {
        let Some(record) = t.workers.remove(&id) else {
            return;
        };
        if let Some(request_id) = &record.request.request_id {
            if t.request_ids.get(request_id) == Some(&id) {
                t.request_ids.remove(request_id);
            }
        }
        t.finished.retain(|(f, _)| *f != id);
        self.emit(t, SourceEvent::Removed(record.info.key));
    }

    /// Removes the finished records older than `retain_finished`; returns when the next
    /// one is due.
    pub(crate) fn sweep(&self) -> Option<Instant> {
        let mut t = self.lock();
        let now = Instant::now();
        while let Some(&(id, at)) = t.finished.front() {
            let due = at + self.config.retain_finished;
            if due > now {
                return Some(due);
            }
            t.finished.pop_front();
            self.remove_record(&mut t, id);
        }
        None
    }

    /// Sends `event` to every lifecycle stream. A full stream gets nothing more until a
    /// `Resync` can go to it; a closed one is dropped.
    pub(crate) fn emit(&self, t: &mut Table, event: SourceEvent) {
        for owed in t.subs.send(&event) {
            let me = self.me.clone();
            tokio::spawn(async move {
                if let (Some(owed), Some(inner)) = (owed.ready().await, me.upgrade()) {
                    inner.repay(owed);
                }
            });
        }
    }

    /// Sends a stream that overflowed, now that it has room, the whole truth (the workers,
    /// and the health whose change it may have missed).
    fn repay(&self, owed: Owed) {
        let mut t = self.lock();
        let workers = t.workers.values().map(|r| r.info.clone()).collect();
        let truth = vec![
            SourceEvent::Resync(workers),
            SourceEvent::Health(t.health.clone()),
        ];
        t.subs.repay(owed, truth);
    }

    /// Sets the health, reporting a change.
    pub(crate) fn set_health(&self, health: SourceHealth) {
        let mut t = self.lock();
        if t.health != health {
            t.health = health.clone();
            self.emit(&mut t, SourceEvent::Health(health));
        }
    }

    /// Stops worker `id` (see [`RuntimeSource::stop`]).
    pub(crate) fn stop_id(&self, id: u64, grace: Option<Duration>) -> Result<(), RegistryError> {
        let mut t = self.lock();
        let record = t.workers.get_mut(&id).ok_or_else(not_found)?;
        let grace = grace.unwrap_or(record.grace).min(MAX_GRACE);
        match record.phase {
            // Ending already (also when its wrapper has just reported the command's end):
            // it keeps its own outcome.
            Phase::Done | Phase::Ending => Ok(()),
            Phase::Watched if record.seen_end.is_some() => Ok(()),
            Phase::Setup => {
                // The spawn task stops it once the session is set up.
                record.stop_requested = true;
                record.pending_grace = Some(record.pending_grace.map_or(grace, |g| g.min(grace)));
                Ok(())
            }
            Phase::Watched => {
                if record.stop_requested {
                    // A shorter grace brings the kill forward.
                    let at = Instant::now() + grace;
                    if record.kill_at.is_some_and(|k| at < k) {
                        self.arm_kill(record, id, at);
                    }
                    return Ok(());
                }
                record.stop_requested = true;
                self.begin_stop(&mut t, id, grace);
                Ok(())
            }
        }
    }

    /// A watched worker asked to stop: `stopping`, SIGTERM now (SIGKILL for a zero grace),
    /// the kill timer armed.
    pub(crate) fn begin_stop(&self, t: &mut Table, id: u64, grace: Duration) {
        let Some(record) = t.workers.get_mut(&id) else {
            return;
        };
        record.info.state = WorkerState::Stopping;
        if let Some(pane) = record.pane {
            if grace.is_zero() {
                // The wrapper is spared: it reports the end, after all output.
                pane.signal_members(libc::SIGKILL);
            } else {
                // The wrapper ignores it (a handler of its own); the command does not.
                pane.signal_group(libc::SIGTERM);
            }
        }
        self.arm_kill(record, id, Instant::now() + grace);
        self.upsert(t, id);
    }

    /// Input for worker `id` (see [`RuntimeSource::input`]).
    fn input_id(&self, id: u64, data: Bytes) -> Result<(), RegistryError> {
        let t = self.lock();
        let record = t.workers.get(&id).ok_or_else(not_found)?;
        let ended = || RegistryError::Conflict("the worker has ended".into());
        if record.info.state.is_terminal() {
            return Err(ended());
        }
        let queue = record.input.as_ref().ok_or_else(ended)?;
        if data.is_empty() {
            return Ok(());
        }
        let too_much =
            || RegistryError::CapacityExceeded("too much input is waiting for the worker".into());
        let len = u32::try_from(data.len()).map_err(|_| too_much())?;
        let permit = match Arc::clone(&queue.budget).try_acquire_many_owned(len) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => return Err(too_much()),
            Err(TryAcquireError::Closed) => return Err(ended()),
        };
        queue.tx.send((data, Some(permit))).map_err(|_| ended())
    }

    /// Every live worker's session and pane, for the blocking clean-up of `Drop`.
    fn live_sessions(&self) -> Vec<(String, Option<Proc>)> {
        let t = self.lock();
        t.workers
            .values()
            .filter(|r| r.phase != Phase::Done)
            .map(|r| (r.session.clone(), r.pane))
            .collect()
    }
}

/// The tmux program: a path (made absolute), or a name looked up on `PATH`.
fn find_program(program: &Path) -> Option<PathBuf> {
    let here = std::env::current_dir().ok()?;
    if program.components().count() > 1 || program.is_absolute() {
        let path = here.join(program);
        return sys::is_executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| here.join(dir).join(program))
        .find(|p| sys::is_executable(p))
}

fn not_found() -> RegistryError {
    RegistryError::WorkerNotFound("worker not found".into())
}

impl TmuxSource {
    /// A source with `config` (whose `socket_name` defaults to `roster` here; the factory
    /// of [`register`](crate::register) makes it `roster-<runtime name>`), keeping its files
    /// (the workers' output FIFOs, briefly their environment) in `state_dir`, which it
    /// creates when it first needs it.
    ///
    /// Fails with `invalid_request` for a config that is not valid (the message names the
    /// key), when the tmux program is not found or older than 3.3, and with `internal`
    /// outside a tokio runtime. It starts two tasks: the monitor of its workers, and the
    /// clean-up of the sessions an earlier run left on the server (see the crate docs).
    pub fn new(
        config: TmuxConfig,
        state_dir: impl Into<PathBuf>,
    ) -> Result<TmuxSource, RegistryError> {
        let mut config = config;
        config.check().map_err(RegistryError::InvalidRequest)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(RegistryError::internal(
                "a tmux source must be created inside a tokio runtime",
            ));
        }
        let program = find_program(&config.tmux).ok_or_else(|| {
            RegistryError::InvalidRequest(if config.tmux.as_os_str() == "tmux" {
                "`tmux`: tmux is not installed (it is not on PATH); install it (e.g. `apt-get \
                 install tmux`) or set `tmux` to its path"
                    .into()
            } else {
                "`tmux`: the program it names is not an executable file".into()
            })
        })?;
        let socket = config
            .socket_name
            .clone()
            .unwrap_or_else(|| "roster".into());
        let tmux = Tmux::new(program, socket.0);
        match tmux.blocking_version() {
            Ok(Some(version)) if version < tmux::MIN_VERSION => {
                return Err(RegistryError::InvalidRequest(format!(
                    "`tmux`: tmux {}.{} or newer is needed, this one is {}.{}",
                    tmux::MIN_VERSION.0,
                    tmux::MIN_VERSION.1,
                    version.0,
                    version.1
                )));
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "the tmux program does not tell its version");
                return Err(RegistryError::InvalidRequest(
                    "`tmux`: the program does not run as tmux (`tmux -V` failed)".into(),
                ));
            }
        }
        // A profile's relative `cwd` is this process's working directory's.
        if let Ok(here) = std::env::current_dir() {
            for profile in config.profiles.values_mut() {
                if let Some(cwd) = profile.cwd.as_mut() {
                    if cwd.is_relative() {
                        *cwd = here.join(&**cwd).into();
                    }
                }
            }
        }
        let inner = Arc::new_cyclic(|me| Inner::new(me.clone(), tmux, config, state_dir.into()));
        tokio::spawn(worker::monitor(Arc::downgrade(&inner)));
        tokio::spawn(worker::clean_leftovers(Arc::downgrade(&inner)));
        Ok(TmuxSource { inner })
    }

    /// How many unread lifecycle events make a stream of this source lose track (after
    /// which it gets a fresh `Resync`): [`EVENTS_BUFFER`], the first `Resync` included.
    pub fn events_to_overflow(&self) -> usize {
        EVENTS_BUFFER
    }
}

#[async_trait]
impl RuntimeSource for TmuxSource {
    fn capabilities(&self) -> Capabilities {
        // A tmux session is not restarted: a spawn that asks for a restart policy is refused.
        Capabilities {
            restart: false,
            ..Capabilities::ALL
        }
    }

    async fn health(&self) -> SourceHealth {
        self.inner.lock().health.clone()
    }

    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        let t = self.inner.lock();
        Ok(t.workers.values().map(|r| r.info.clone()).collect())
    }

    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        let id = self.inner.id_of(key)?;
        let t = self.inner.lock();
        t.workers
            .get(&id)
            .map(|r| r.info.clone())
            .ok_or_else(not_found)
    }

    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        if request.asks_for_restart() {
            return Err(RegistryError::Unsupported(
                "this runtime does not restart workers".into(),
            ));
        }
        request.validate()?;
        let plan = Plan::new(&self.inner.config, &request)?;
        let id = {
            let mut t = self.inner.lock();
            if t.closed {
                return Err(RegistryError::Conflict(
                    "the runtime is shutting down".into(),
                ));
            }
            if let Some(request_id) = &request.request_id {
                let earlier = t
                    .request_ids
                    .get(request_id)
                    .and_then(|id| t.workers.get(id));
                if let Some(record) = earlier {
                    return if record.request == request {
                        Ok(record.info.clone())
                    } else {
                        Err(RegistryError::Conflict(
                            "request_id was already used for a different spawn request".into(),
                        ))
                    };
                }
            }
            if t.live >= self.inner.config.max_workers {
                return Err(RegistryError::CapacityExceeded(format!(
                    "the runtime already runs its maximum of {} workers",
                    self.inner.config.max_workers
                )));
            }
            self.inner.create_record(&mut t, request, &plan)
        };
        // In a task of its own, so that a caller that stops waiting leaves no session
        // half set up.
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move { inner.start(id, plan).await })
            .await
            .map_err(|_| RegistryError::internal("the spawn task was interrupted"))?
    }

    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError> {
        let id = self.inner.id_of(key)?;
        self.inner.stop_id(id, grace)
    }

    async fn input(&self, key: &SourceKey, data: Bytes) -> Result<(), RegistryError> {
        let id = self.inner.id_of(key)?;
        self.inner.input_id(id, data)
    }

    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError> {
        let id = self.inner.id_of(key)?;
        let mut t = self.inner.lock();
        let record = t.workers.get(&id).ok_or_else(not_found)?;
        if !record.info.state.is_terminal() {
            return Err(RegistryError::Conflict(
                "the worker is still running; stop it first".into(),
            ));
        }
        self.inner.remove_record(&mut t, id);
        Ok(())
    }

    async fn events(&self) -> Result<SourceEvents, RegistryError> {
        let mut t = self.inner.lock();
        let workers = t.workers.values().map(|r| r.info.clone()).collect();
        let mut first = vec![SourceEvent::Resync(workers)];
        if t.health.status != HealthStatus::Ready {
            first.push(SourceEvent::Health(t.health.clone()));
        }
        let rx = t.subs.subscribe(first);
        if t.closed {
            // After a shutdown the stream ends after the truth.
            t.subs.clear();
        }
        Ok(rx)
    }

    async fn output(
        &self,
        key: &SourceKey,
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        let id = self.inner.id_of(key)?;
        let log = {
            let t = self.inner.lock();
            Arc::clone(&t.workers.get(&id).ok_or_else(not_found)?.log)
        };
        log.stream(request)
    }

    async fn profiles(&self) -> Result<Vec<ProfileView>, RegistryError> {
        // The names, the grace and what a request passes: never the command, `cwd` or `env`
        // (a tmux profile has no key that would show them).
        let config = &self.inner.config;
        Ok(config
            .profiles
            .iter()
            .map(|(name, profile)| ProfileView {
                name: name.clone(),
                description: None,
                accepts: ProfileView::EVERY_FIELD.map(String::from).to_vec(),
                args: ArgsRule::Appended,
                restart: None,
                grace_ms: Some(
                    u64::try_from(
                        profile
                            .grace
                            .unwrap_or(config.grace)
                            .min(MAX_GRACE)
                            .as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                ),
                command: None,
            })
            .collect())
    }

    async fn shutdown(&self, grace: Option<Duration>) {
        let mut ended = self.inner.ended.subscribe();
        // Each worker gets its own grace, cut to the host's bound.
        let live: Vec<(u64, Duration)> = {
            let mut t = self.inner.lock();
            t.closed = true;
            t.workers
                .iter()
                .filter(|(_, r)| !r.info.state.is_terminal())
                .map(|(id, r)| (*id, grace.map_or(r.grace, |cap| r.grace.min(cap))))
                .collect()
        };
        for (id, grace) in live {
            let _ = self.inner.stop_id(id, Some(grace));
        }
        loop {
            ended.borrow_and_update();
            if self.inner.lock().live == 0 {
                break;
            }
            if ended.changed().await.is_err() {
                break;
            }
        }
        // Every worker is terminal: the lifecycle streams end.
        self.inner.lock().subs.clear();
    }
}

impl Drop for TmuxSource {
    fn drop(&mut self) {
        let sessions = self.inner.live_sessions();
        {
            let mut t = self.inner.lock();
            t.closed = true;
            t.subs.clear();
            for record in t.workers.values() {
                // The source is gone: readers of a live worker end without `End`.
                record.log.close();
            }
        }
        for (session, pane) in sessions {
            if let Some(pane) = pane {
                pane.signal_group(libc::SIGKILL);
            }
            let _ = self
                .inner
                .tmux
                .blocking_client()
                .args(["kill-session", "-t", &tmux::session_target(&session)])
                .status();
            let _ = std::fs::remove_file(self.inner.state_dir.join(format!("{session}.out")));
            let _ = std::fs::remove_file(self.inner.state_dir.join(format!("{session}.env")));
        }
        self.inner.owner.retire();
        // The monitor notices the source is gone.
        self.inner.wake.notify_one();
    }
}
