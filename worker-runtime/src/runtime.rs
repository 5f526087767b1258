//! The runtime: worker records, spawning, supervision, stopping and housekeeping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::{AbortHandle, JoinHandle};

use crate::config::RuntimeConfig;
use crate::events::{EventLog, EventReader, NewEvent};
use crate::limits::{
    MAX_ARGV_BYTES, MAX_ARG_BYTES, MAX_GRACE, MAX_LABELS, MAX_SHORT_TEXT, MAX_STDIN_BYTES,
};
use crate::output::{capture, OutputReader};
use crate::spawner::Spawner;
use crate::sys;
use crate::types::{
    FailReason, LocalId, Problem, RuntimeError, SpawnSpec, State, Stream, WorkerInfo,
};
use crate::util::lock;
use crate::watchdog::Watchdog;
use registry_core::output_log::OutputLog;

/// PATH given to workers when the host has none, and to the watchdog.
pub(crate) const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How long a worker's pipes may stay open *and idle* after its process group was killed. Only
/// a process that left the group (and so escaped the kill) can hold them open; the worker then
/// ends once no output has come for this long. Each read restarts the wait, so output that is
/// still flowing is never cut, however busy the machine.
const DRAIN_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long to wait for a killed group's last members to disappear before telling the
/// watchdog to forget it anyway.
const FORGET_TIMEOUT: Duration = Duration::from_secs(3);

/// A supervisor of worker processes. Cheap to clone: clones share one runtime.
///
/// When the last clone is dropped, every remaining worker is killed. See the
/// [crate documentation](crate) for the guarantees.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("instance_id", &self.inner.instance_id)
            .finish_non_exhaustive()
    }
}

/// The shared state. Background tasks hold only a `Weak` to it, so dropping the last
/// [`Runtime`] drops it (and its `Drop` kills what is left).
struct Inner {
    config: RuntimeConfig,
    instance_id: String,
    handle: Handle,
    table: Mutex<Table>,
    /// The event ring, also reachable through the table; readers take this clone so that they
    /// never touch the table lock.
    events: Arc<EventLog>,
    spawner: Spawner,
    watchdog: Arc<Watchdog>,
}

/// Everything about workers, under one lock. Events are appended only while this lock is held,
/// so the event order is the order of changes and `snapshot` is atomic.
struct Table {
    workers: BTreeMap<LocalId, Record>,
    request_ids: HashMap<String, LocalId>,
    next_id: u64,
    /// Workers not yet terminal.
    live: usize,
    /// Terminal workers, oldest first, with when they ended.
    finished: VecDeque<(LocalId, Instant)>,
    /// Set by `shutdown`: no new spawns.
    closed: bool,
    events: Arc<EventLog>,
}

struct Record {
    info: WorkerInfo,
    spec: SpawnSpec,
    output: Arc<OutputLog>,
    /// The grace period of this worker when a stop does not give one.
    grace: Duration,
    process: Option<Process>,
    stop_requested: bool,
    /// When the pending SIGKILL of a stop is due.
    kill_at: Option<Instant>,
    /// The one timer task that SIGKILLs at `kill_at`; aborted when it is replaced by an
    /// earlier one and when the worker ends.
    kill_timer: Option<AbortHandle>,
    /// The stdin queue; `None` once stdin is closed or the worker ended.
    stdin: Option<StdinQueue>,
    /// The queue's receiving end until the process exists and its writer task takes it.
    stdin_rx: Option<mpsc::UnboundedReceiver<StdinItem>>,
    /// Set by the writer task when the pipe broke (the worker closed its stdin).
    stdin_broken: Arc<AtomicBool>,
}

struct Process {
    /// The worker's process group, shared with its supervisor task.
    group: Arc<Group>,
}

/// A worker's process group, as its record and its supervisor task share it.
///
/// The group id is the leader's pid, so it names the worker's group only until the leader is
/// reaped. The supervisor marks the group gone before it reaps the leader, and every other
/// signal to the group is sent under the same lock after checking that mark; so no signal can
/// reach a process that reuses the id, also while the runtime is being dropped (when the
/// supervisor can no longer reach the record). A lock, not just an atomic flag: with a flag a
/// sender could check it, the supervisor set it and reap, and the sender then signal.
struct Group {
    pgid: i32,
    gone: Mutex<bool>,
}

impl Group {
    fn new(pgid: i32) -> Self {
        Group {
            pgid,
            gone: Mutex::new(false),
        }
    }

    /// Sends `signal` to the group unless it is marked gone.
    fn signal(&self, signal: i32) {
        let gone = lock(&self.gone);
        if !*gone {
            let _ = sys::signal_group(self.pgid, signal);
        }
    }

    /// Marks the group gone: its leader has exited and is about to be reaped. Only the
    /// supervisor calls it.
    fn mark_gone(&self) {
        *lock(&self.gone) = true;
    }

    /// Whether the leader has exited.
    fn is_gone(&self) -> bool {
        *lock(&self.gone)
    }
}

type StdinItem = (Bytes, Option<OwnedSemaphorePermit>);

struct StdinQueue {
    tx: mpsc::UnboundedSender<StdinItem>,
    /// Bytes that may be pending; each queued item holds permits for its length until written.
    permits: Arc<Semaphore>,
}

/// A validated spawn request, ready to run.
struct Plan {
    argv: Vec<String>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    retention: u64,
    grace: Duration,
}

impl Plan {
    fn command(&self) -> Command {
        let mut command = Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        sys::configure_worker(&mut command, sys::own_pid());
        command
    }
}

impl Runtime {
    /// Creates a runtime. Call it inside a tokio runtime (multi-threaded or not): its
    /// background tasks run there.
    ///
    /// It starts the runtime's spawner thread and its watchdog process. Fails with
    /// [`RuntimeError::InvalidRequest`] for an invalid config (a profile with an empty
    /// command, `event_retention` of 0) and [`RuntimeError::Internal`] outside a tokio runtime
    /// or when the thread or the watchdog cannot be started.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        if config.event_retention == 0 {
            return Err(RuntimeError::InvalidRequest(
                "event_retention must be at least 1".into(),
            ));
        }
        for (name, profile) in &config.profiles {
            if !matches!(profile.command.first(), Some(p) if !p.is_empty()) {
                return Err(RuntimeError::InvalidRequest(format!(
                    "profile {name:?} has an empty command"
                )));
            }
        }
        let handle = Handle::try_current().map_err(|_| {
            RuntimeError::Internal(
                "the worker runtime must be created inside a tokio runtime".into(),
            )
        })?;
        let watchdog = Arc::new(Watchdog::start().map_err(|e| {
            tracing::error!(error = %e, "cannot start the worker watchdog process");
            RuntimeError::Internal("cannot start the worker watchdog".into())
        })?);
        let spawner = Spawner::start(handle.clone(), Arc::clone(&watchdog)).map_err(|e| {
            tracing::error!(error = %e, "cannot start the worker spawner thread");
            watchdog.close();
            RuntimeError::Internal("cannot start the worker spawner".into())
        })?;
        let events = Arc::new(EventLog::new(
            config.event_retention,
            config.event_retention_bytes,
        ));
        let inner = Arc::new(Inner {
            instance_id: new_instance_id(),
            handle,
            table: Mutex::new(Table {
                workers: BTreeMap::new(),
                request_ids: HashMap::new(),
                next_id: 1,
                live: 0,
                finished: VecDeque::new(),
                closed: false,
                events: Arc::clone(&events),
            }),
            events,
            spawner,
            watchdog,
            config,
        });
        let period = (inner.config.retain_finished / 4)
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(10));
        inner
            .handle
            .spawn(sweep_finished(Arc::downgrade(&inner), period));
        Ok(Runtime { inner })
    }

    /// A random id of this runtime value (16 hex characters): combined with a [`LocalId`] it
    /// names a worker uniquely, also across restarts.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The configuration the runtime was made with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// What is wrong with the runtime's own machinery (its watchdog process, its spawner
    /// thread); empty while all is well.
    pub fn health(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if !self.inner.watchdog.is_alive() {
            problems.push(Problem::WatchdogGone);
        }
        if !self.inner.spawner.is_alive() {
            problems.push(Problem::SpawnerGone);
        }
        problems
    }

    /// The pid of the runtime's watchdog process. For tests only.
    #[doc(hidden)]
    pub fn watchdog_pid(&self) -> u32 {
        self.inner.watchdog.pid()
    }

    /// Starts a worker.
    ///
    /// Errors: an unknown profile, both or neither of `profile` and `command`, an empty argv,
    /// a NUL byte or `=` in the wrong place, or a field beyond the [`limits`](crate::limits)
    /// → [`RuntimeError::InvalidRequest`]; a `command`
    /// where commands are not allowed → [`RuntimeError::Forbidden`]; `max_workers` live
    /// workers already → [`RuntimeError::CapacityExceeded`]; the same `request_id` with a
    /// different spec → [`RuntimeError::Conflict`] (with the same spec, the earlier worker is
    /// returned). After [`Runtime::shutdown`] → [`RuntimeError::Conflict`].
    ///
    /// A program that cannot be executed (not found, bad working directory) is not an error:
    /// the call returns the worker in [`State::Failed`] with [`FailReason::SpawnFailed`].
    ///
    /// The work runs in a task of its own, so a caller that stops waiting leaves no record
    /// half-made.
    pub async fn spawn(&self, spec: SpawnSpec) -> Result<WorkerInfo, RuntimeError> {
        let plan = self.inner.plan(&spec)?;
        let id = {
            let mut table = lock(&self.inner.table);
            if table.closed {
                return Err(RuntimeError::Conflict(
                    "the runtime is shutting down".into(),
                ));
            }
            if let Some(request_id) = &spec.request_id {
                let earlier = table
                    .request_ids
                    .get(request_id)
                    .and_then(|id| table.workers.get(id));
                if let Some(record) = earlier {
                    return if record.spec == spec {
                        Ok(record.info.clone())
                    } else {
                        Err(RuntimeError::Conflict(
                            "request_id was already used for a different spawn request".into(),
                        ))
                    };
                }
            }
            if table.live >= self.inner.config.max_workers {
                return Err(RuntimeError::CapacityExceeded(format!(
                    "the runtime already runs its maximum of {} workers",
                    self.inner.config.max_workers
                )));
            }
            // Reserve the id (and the request_id) before forking, so a concurrent call with
            // the same request_id finds this record instead of spawning a second process.
            self.inner.create_record(&mut table, spec, &plan)
        };
        let task = self
            .inner
            .handle
            .spawn(start_worker(Arc::downgrade(&self.inner), id, plan));
        task.await
            .map_err(|_| RuntimeError::Internal("the spawn was interrupted".into()))?
    }

    /// Every worker record, sorted by id.
    pub fn list(&self) -> Vec<WorkerInfo> {
        let table = lock(&self.inner.table);
        table.workers.values().map(|r| r.info.clone()).collect()
    }

    /// One worker, or [`RuntimeError::NotFound`].
    pub fn get(&self, id: LocalId) -> Result<WorkerInfo, RuntimeError> {
        let table = lock(&self.inner.table);
        table
            .workers
            .get(&id)
            .map(|r| r.info.clone())
            .ok_or(RuntimeError::NotFound)
    }

    /// Stops a worker: SIGTERM to its process group now, SIGKILL after `grace` (the
    /// profile's grace or the runtime's default when `None`; zero means SIGKILL at once; a
    /// grace over [`MAX_GRACE`](crate::limits::MAX_GRACE) is cut to it, also for a worker
    /// still starting).
    ///
    /// Idempotent: `Ok` without effect on a terminal worker, and on a stopping one except that
    /// a shorter grace brings the SIGKILL forward. A worker whose process already exited by
    /// itself (its output still draining) is left to end as `Exited`. Callable from any
    /// thread: the SIGKILL timer runs on the runtime's tokio runtime.
    pub fn stop(&self, id: LocalId, grace: Option<Duration>) -> Result<(), RuntimeError> {
        self.inner.stop(id, grace)
    }

    /// Queues `data` for the worker's stdin. A per-worker task writes it in order.
    ///
    /// [`RuntimeError::Conflict`] once the worker is terminal or its stdin is closed (by
    /// [`Runtime::close_input`] or because the worker closed the pipe);
    /// [`RuntimeError::CapacityExceeded`] while more than `max_pending_input` bytes would be
    /// waiting.
    pub fn input(&self, id: LocalId, data: Bytes) -> Result<(), RuntimeError> {
        let table = lock(&self.inner.table);
        let record = table.workers.get(&id).ok_or(RuntimeError::NotFound)?;
        if record.info.state.is_terminal() {
            return Err(RuntimeError::Conflict("the worker has ended".into()));
        }
        let closed = || RuntimeError::Conflict("the worker's stdin is closed".into());
        let queue = record.stdin.as_ref().ok_or_else(closed)?;
        if record.stdin_broken.load(Ordering::Acquire) {
            return Err(closed());
        }
        if data.is_empty() {
            return Ok(());
        }
        let too_much =
            || RuntimeError::CapacityExceeded("too much input is waiting for the worker".into());
        let len = u32::try_from(data.len()).map_err(|_| too_much())?;
        let permit = match Arc::clone(&queue.permits).try_acquire_many_owned(len) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => return Err(too_much()),
            Err(TryAcquireError::Closed) => return Err(closed()),
        };
        queue.tx.send((data, Some(permit))).map_err(|_| closed())
    }

    /// Closes the worker's stdin once the input queued so far is written (the worker then
    /// reads end of file). Idempotent; `Ok` on a terminal worker.
    ///
    /// This is an addition to the shared API contract.
    pub fn close_input(&self, id: LocalId) -> Result<(), RuntimeError> {
        let mut table = lock(&self.inner.table);
        let record = table.workers.get_mut(&id).ok_or(RuntimeError::NotFound)?;
        // Dropping the sender lets the writer drain the queue, then close the pipe.
        record.stdin = None;
        Ok(())
    }

    /// Removes a terminal worker's record (with a [`RuntimeEvent::Removed`](crate::RuntimeEvent::Removed)
    /// event) and its retained output. [`RuntimeError::Conflict`] while the worker is not
    /// terminal.
    pub fn remove(&self, id: LocalId) -> Result<(), RuntimeError> {
        let mut table = lock(&self.inner.table);
        let record = table.workers.get(&id).ok_or(RuntimeError::NotFound)?;
        if !record.info.state.is_terminal() {
            return Err(RuntimeError::Conflict(
                "the worker is still running; stop it first".into(),
            ));
        }
        table.remove_record(id);
        Ok(())
    }

    /// Every worker record (sorted by id) and the seq of the last event, taken atomically:
    /// [`Runtime::events`] from that seq continues exactly where the snapshot stands.
    pub fn snapshot(&self) -> (Vec<WorkerInfo>, u64) {
        let table = lock(&self.inner.table);
        let workers = table.workers.values().map(|r| r.info.clone()).collect();
        (workers, table.events.last_seq())
    }

    /// A reader of the events with seq greater than `after` (0 for everything retained).
    pub fn events(&self, after: u64) -> EventReader {
        self.inner.events.reader(after)
    }

    /// A reader of a worker's output chunks with seq greater than `after`.
    ///
    /// With `follow`, it waits for new output and ends with [`OutputItem::End`](crate::OutputItem::End)
    /// once the worker is terminal and drained. Without, it returns what is retained now and
    /// stops (with `End` only if the worker is already terminal).
    ///
    /// An `after` beyond the last seq written so far is [`RuntimeError::InvalidRequest`]: no
    /// client can have seen that chunk, so the cursor is not of this worker.
    pub fn output(
        &self,
        id: LocalId,
        after: u64,
        follow: bool,
    ) -> Result<OutputReader, RuntimeError> {
        let table = lock(&self.inner.table);
        let record = table.workers.get(&id).ok_or(RuntimeError::NotFound)?;
        if after > record.output.last_seq() {
            return Err(RuntimeError::InvalidRequest(
                "`after` is past the worker's last output".into(),
            ));
        }
        OutputReader::new(&record.output, after, follow).ok_or_else(|| {
            RuntimeError::InvalidRequest("`after` is past the worker's last output".into())
        })
    }

    /// Output bytes currently retained for a worker. This is an addition to the shared API
    /// contract, for monitoring.
    pub fn retained_output_bytes(&self, id: LocalId) -> Result<u64, RuntimeError> {
        let table = lock(&self.inner.table);
        let record = table.workers.get(&id).ok_or(RuntimeError::NotFound)?;
        Ok(record.output.retained_bytes())
    }

    /// Refuses new spawns, stops every live worker (with `grace`, or each worker's own), and
    /// waits until all of them are terminal.
    pub async fn shutdown(&self, grace: Option<Duration>) {
        // Subscribe first: a worker that ends after the check below still wakes us.
        let mut changed = self.inner.events.subscribe();
        let live: Vec<LocalId> = {
            let mut table = lock(&self.inner.table);
            table.closed = true;
            table
                .workers
                .values()
                .filter(|r| !r.info.state.is_terminal())
                .map(|r| r.info.id)
                .collect()
        };
        for id in live {
            let _ = self.inner.stop(id, grace);
        }
        loop {
            changed.borrow_and_update();
            if lock(&self.inner.table).live == 0 {
                return;
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Inner {
    /// Validates a spawn request against the config and builds what to run.
    fn plan(&self, spec: &SpawnSpec) -> Result<Plan, RuntimeError> {
        let invalid = |m: &str| RuntimeError::InvalidRequest(m.into());
        check_bounds(spec)?;
        let (mut argv, profile) = match (&spec.profile, &spec.command) {
            (Some(_), Some(_)) => {
                return Err(invalid("give either a profile or a command, not both"))
            }
            (None, None) => return Err(invalid("give a profile or a command")),
            (Some(name), None) => {
                let profile = self.config.profiles.get(name).ok_or_else(|| {
                    let known: Vec<&str> =
                        self.config.profiles.keys().map(String::as_str).collect();
                    invalid(&format!(
                        "unknown profile {:?}; this runtime has: {}",
                        name.chars().take(64).collect::<String>(),
                        if known.is_empty() {
                            "no profiles".to_string()
                        } else {
                            known.join(", ")
                        }
                    ))
                })?;
                (profile.command.clone(), Some(profile))
            }
            (None, Some(command)) => {
                if !self.config.allow_commands {
                    return Err(RuntimeError::Forbidden(
                        "this runtime only runs profiles, not commands".into(),
                    ));
                }
                (command.clone(), None)
            }
        };
        argv.extend(spec.args.iter().cloned());
        if !matches!(argv.first(), Some(p) if !p.is_empty()) {
            return Err(invalid("the command is empty"));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(invalid("arguments must not contain NUL bytes"));
        }
        let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
        env.insert(
            "PATH".into(),
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        );
        for key in ["HOME", "LANG"] {
            if let Some(value) = std::env::var_os(key) {
                env.insert(key.into(), value);
            }
        }
        let extra = profile
            .map(|p| &p.env)
            .into_iter()
            .flatten()
            .chain(spec.env.iter());
        for (key, value) in extra {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(
                    "environment names must be non-empty, without '=' or NUL",
                ));
            }
            if value.contains('\0') {
                return Err(invalid("environment values must not contain NUL bytes"));
            }
            env.insert(key.into(), value.into());
        }
        Ok(Plan {
            argv,
            env: env.into_iter().collect(),
            cwd: profile.and_then(|p| p.cwd.clone()),
            retention: profile
                .and_then(|p| p.output_retention)
                .unwrap_or(self.config.output_retention),
            grace: profile
                .and_then(|p| p.grace)
                .unwrap_or(self.config.default_grace)
                .min(MAX_GRACE),
        })
    }

    /// Creates a `Starting` record (with its stdin queue) and announces it.
    fn create_record(&self, table: &mut Table, spec: SpawnSpec, plan: &Plan) -> LocalId {
        let id = LocalId(table.next_id);
        table.next_id += 1;
        let info = WorkerInfo {
            id,
            name: spec.name.clone(),
            labels: spec.labels.clone(),
            state: State::Starting,
            exit_code: None,
            signal: None,
            reason: None,
            created_at: SystemTime::now(),
            started_at: None,
            ended_at: None,
            profile: spec.profile.clone(),
            args: spec.args.clone(),
            command: spec.command.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(text) = spec.stdin.as_ref().filter(|t| !t.is_empty()) {
            // The initial text goes first, outside the pending-input budget.
            let _ = tx.send((Bytes::from(text.clone()), None));
        }
        let permits = self.config.max_pending_input.min(Semaphore::MAX_PERMITS);
        let stdin = StdinQueue {
            tx,
            permits: Arc::new(Semaphore::new(permits)),
        };
        if let Some(request_id) = &spec.request_id {
            table.request_ids.insert(request_id.clone(), id);
        }
        table.live += 1;
        table.workers.insert(
            id,
            Record {
                info,
                spec,
                output: OutputLog::new(plan.retention),
                grace: plan.grace,
                process: None,
                stop_requested: false,
                kill_at: None,
                kill_timer: None,
                stdin: Some(stdin),
                stdin_rx: Some(rx),
                stdin_broken: Arc::new(AtomicBool::new(false)),
            },
        );
        table.upsert(id);
        id
    }

    /// Records that the process could not be started.
    fn spawn_failed(&self, id: LocalId, error: &io::Error) -> Result<WorkerInfo, RuntimeError> {
        tracing::info!(worker = %id, error = %error, "worker could not be started");
        let mut table = lock(&self.table);
        let info = table.end(id, State::Failed, None, None, Some(FailReason::SpawnFailed));
        table.enforce_max_finished(self.config.max_finished);
        info.ok_or(RuntimeError::NotFound)
    }

    /// Wires up a freshly spawned process (the spawner thread has told the watchdog about it
    /// already): output capture, stdin writer, pending stop, supervisor.
    fn started(
        self: &Arc<Self>,
        id: LocalId,
        mut child: Child,
    ) -> Result<WorkerInfo, RuntimeError> {
        let Some(pgid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            // Only possible if the child was already reaped, which nothing does before us.
            return self.spawn_failed(id, &io::Error::other("the child has no pid"));
        };
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let stdin = child.stdin.take();

        let mut table = lock(&self.table);
        let Some(record) = table.workers.get_mut(&id) else {
            // Unreachable: only terminal records are removed. Do not leave the process behind.
            drop(table);
            // Not reaped yet (the wait below does that), so the id is still the worker's.
            let _ = sys::signal_group(pgid, libc::SIGKILL);
            self.handle.spawn(async move {
                let _ = child.wait().await;
            });
            return Err(RuntimeError::Internal("the worker record vanished".into()));
        };
        let log = Arc::clone(&record.output);
        let activity = Arc::new(Notify::new());
        let mut captures: Vec<JoinHandle<()>> = Vec::with_capacity(2);
        if let Some(pipe) = stdout {
            let (log, activity) = (Arc::clone(&log), Arc::clone(&activity));
            captures.push(
                self.handle
                    .spawn(capture(pipe, Stream::Stdout, log, activity)),
            );
        }
        if let Some(pipe) = stderr {
            let (log, activity) = (Arc::clone(&log), Arc::clone(&activity));
            captures.push(
                self.handle
                    .spawn(capture(pipe, Stream::Stderr, log, activity)),
            );
        }
        // Even if stdin was already closed (`close_input` while starting), what was queued
        // before is written first.
        if let (Some(pipe), Some(rx)) = (stdin, record.stdin_rx.take()) {
            self.handle
                .spawn(write_stdin(rx, pipe, Arc::clone(&record.stdin_broken)));
        }
        let group = Arc::new(Group::new(pgid));
        record.process = Some(Process {
            group: Arc::clone(&group),
        });
        record.info.started_at = Some(SystemTime::now());
        if record.stop_requested {
            // A stop arrived while the process was being created: carry it out now.
            let due = record.kill_at.unwrap_or_else(Instant::now);
            if due <= Instant::now() {
                group.signal(libc::SIGKILL);
            } else {
                group.signal(libc::SIGTERM);
                self.arm_kill_timer(record, id, due);
            }
        } else {
            record.info.state = State::Running;
        }
        let info = record.info.clone();
        table.upsert(id);
        drop(table);

        self.handle.spawn(supervise(
            Arc::downgrade(self),
            id,
            child,
            group,
            captures,
            activity,
            log,
        ));
        Ok(info)
    }

    fn stop(self: &Arc<Self>, id: LocalId, grace: Option<Duration>) -> Result<(), RuntimeError> {
        let mut table = lock(&self.table);
        let record = table.workers.get_mut(&id).ok_or(RuntimeError::NotFound)?;
        if record.info.state.is_terminal() {
            return Ok(());
        }
        if record.process.as_ref().is_some_and(|p| p.group.is_gone()) {
            // The leader exited by itself; the worker is ending and keeps its own outcome.
            return Ok(());
        }
        // Cut to a day, so the deadline is always representable: a worker that is starting
        // and one that is running are treated alike.
        let grace = grace.unwrap_or(record.grace).min(MAX_GRACE);
        let due = Instant::now() + grace;
        if record.stop_requested {
            // Already stopping: only an earlier SIGKILL changes anything.
            if record.kill_at.is_some_and(|current| due >= current) {
                return Ok(());
            }
            record.kill_at = Some(due);
        } else {
            record.stop_requested = true;
            record.kill_at = Some(due);
            record.info.state = State::Stopping;
            if let Some(process) = &record.process {
                if !grace.is_zero() {
                    process.group.signal(libc::SIGTERM);
                }
            }
            table.upsert(id);
        }
        let record = table.workers.get_mut(&id).ok_or(RuntimeError::NotFound)?;
        // Before the process exists, `started` carries the stop out itself.
        if let Some(process) = &record.process {
            if grace.is_zero() {
                process.group.signal(libc::SIGKILL);
                if let Some(timer) = record.kill_timer.take() {
                    timer.abort();
                }
            } else {
                self.arm_kill_timer(record, id, due);
            }
        }
        Ok(())
    }

    /// Makes `due` the worker's one pending SIGKILL: starts a timer task and aborts the one it
    /// replaces. Called under the table lock, which orders the replacements.
    fn arm_kill_timer(self: &Arc<Self>, record: &mut Record, id: LocalId, due: Instant) {
        let weak = Arc::downgrade(self);
        let timer = self.handle.spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            if let Some(inner) = weak.upgrade() {
                inner.kill_now(id);
            }
        });
        if let Some(previous) = record.kill_timer.replace(timer.abort_handle()) {
            previous.abort();
        }
    }

    fn kill_now(&self, id: LocalId) {
        let table = lock(&self.table);
        if let Some(record) = table.workers.get(&id) {
            if let Some(process) = &record.process {
                if !record.info.state.is_terminal() {
                    process.group.signal(libc::SIGKILL);
                }
            }
        }
    }

    /// Records how the worker ended. Called after its pipes are drained.
    fn finished(&self, id: LocalId, status: io::Result<ExitStatus>) {
        let mut table = lock(&self.table);
        let Some(record) = table.workers.get(&id) else {
            return;
        };
        let stopped = record.stop_requested;
        let (state, exit_code, signal, reason) = match status {
            Ok(status) => {
                let code = status.code();
                let signal = status.signal();
                if stopped {
                    (State::Stopped, code, signal, None)
                } else if code.is_some() {
                    (State::Exited, code, None, None)
                } else {
                    (State::Failed, None, signal, Some(FailReason::Killed))
                }
            }
            Err(e) => {
                tracing::warn!(worker = %id, error = %e, "cannot read a worker's exit status");
                (State::Failed, None, None, Some(FailReason::Lost))
            }
        };
        table.end(id, state, exit_code, signal, reason);
        table.enforce_max_finished(self.config.max_finished);
    }
}

impl Table {
    /// Appends an `Upserted` event with the worker's current view.
    fn upsert(&self, id: LocalId) {
        if let Some(record) = self.workers.get(&id) {
            self.events.push(NewEvent::Upserted(record.info.clone()));
        }
    }

    /// Makes a worker terminal (once): fields, counters, event, end of output. On a worker
    /// that is terminal already it changes nothing.
    fn end(
        &mut self,
        id: LocalId,
        state: State,
        exit_code: Option<i32>,
        signal: Option<i32>,
        reason: Option<FailReason>,
    ) -> Option<WorkerInfo> {
        let record = self.workers.get_mut(&id)?;
        if record.info.state.is_terminal() {
            return Some(record.info.clone());
        }
        record.info.state = state;
        record.info.exit_code = exit_code;
        record.info.signal = signal;
        record.info.reason = reason;
        record.info.ended_at = Some(SystemTime::now());
        record.stdin = None;
        record.stdin_rx = None;
        record.kill_at = None;
        if let Some(timer) = record.kill_timer.take() {
            timer.abort();
        }
        // The terminal state is published before the output's end, so a reader that gets `End`
        // finds the worker terminal.
        let info = record.info.clone();
        let output = Arc::clone(&record.output);
        self.live -= 1;
        self.finished.push_back((id, Instant::now()));
        self.upsert(id);
        output.finish();
        Some(info)
    }

    /// Removes a record, its request_id and its place in the finished queue, with an event.
    fn remove_record(&mut self, id: LocalId) {
        // The sweep and the cap remove the oldest, at the front: taken off first, so that their
        // loops always move on; only a client's remove needs the search below.
        let oldest = self.finished.front().is_some_and(|(first, _)| *first == id);
        if oldest {
            self.finished.pop_front();
        }
        let Some(record) = self.workers.remove(&id) else {
            return;
        };
        if let Some(request_id) = &record.spec.request_id {
            if self.request_ids.get(request_id) == Some(&id) {
                self.request_ids.remove(request_id);
            }
        }
        if record.info.state.is_terminal() {
            if !oldest {
                self.finished.retain(|(finished, _)| *finished != id);
            }
        } else {
            self.live -= 1;
        }
        self.events.push(NewEvent::Removed(id));
    }

    fn enforce_max_finished(&mut self, max_finished: usize) {
        while self.finished.len() > max_finished {
            let Some(&(id, _)) = self.finished.front() else {
                break;
            };
            self.remove_record(id);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let table = self
            .table
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for record in table.workers.values() {
            if record.info.state.is_terminal() {
                continue;
            }
            if let Some(process) = &record.process {
                // A no-op once the supervisor marked the group gone (before reaping).
                process.group.signal(libc::SIGKILL);
            }
            // Readers of a worker that will never end here stop once they have read what is
            // there (a worker still starting has no supervisor that could end its output).
            record.output.close();
            if let Some(timer) = &record.kill_timer {
                timer.abort();
            }
        }
        // The watchdog SIGKILLs whatever it still knows of, then exits.
        self.watchdog.close();
    }
}

/// Refuses a request beyond the [`limits`](crate::limits), naming the field.
fn check_bounds(spec: &SpawnSpec) -> Result<(), RuntimeError> {
    let invalid = |m: String| Err(RuntimeError::InvalidRequest(m));
    let command = spec.command.as_deref().unwrap_or_default();
    for (field, list) in [("command", command), ("args", &spec.args[..])] {
        if list.iter().any(|a| a.len() > MAX_ARG_BYTES) {
            return invalid(format!(
                "an entry of `{field}` is longer than {MAX_ARG_BYTES} bytes"
            ));
        }
    }
    let argv_bytes = command
        .iter()
        .chain(&spec.args)
        .chain(spec.env.iter().flat_map(|(k, v)| [k, v]))
        .fold(0usize, |sum, s| sum.saturating_add(s.len()));
    if argv_bytes > MAX_ARGV_BYTES {
        return invalid(format!(
            "`command`, `args` and `env` together are longer than {MAX_ARGV_BYTES} bytes"
        ));
    }
    if spec
        .stdin
        .as_ref()
        .is_some_and(|s| s.len() > MAX_STDIN_BYTES)
    {
        return invalid(format!("`stdin` is longer than {MAX_STDIN_BYTES} bytes"));
    }
    for (field, text) in [("name", &spec.name), ("request_id", &spec.request_id)] {
        if text.as_ref().is_some_and(|t| t.len() > MAX_SHORT_TEXT) {
            return invalid(format!("`{field}` is longer than {MAX_SHORT_TEXT} bytes"));
        }
    }
    if spec.labels.len() > MAX_LABELS {
        return invalid(format!("`labels` holds more than {MAX_LABELS} entries"));
    }
    for (key, value) in &spec.labels {
        if key.len() > MAX_SHORT_TEXT || value.len() > MAX_SHORT_TEXT {
            return invalid(format!(
                "a key or value of `labels` is longer than {MAX_SHORT_TEXT} bytes"
            ));
        }
    }
    Ok(())
}

/// How long a new worker waits for the watchdog's pipe to hold its group before it is
/// reported running anyway. The writer thread takes a line within microseconds unless the
/// machine is starved or the watchdog stopped reading.
const WATCHED_WITHIN: Duration = Duration::from_secs(5);

/// Waits until the watchdog's pipe holds a new worker's group, so that a worker reported
/// running has its children protected against this process being SIGKILLed (otherwise a
/// client could see `running` and kill the host before the line was written). Gives up after
/// [`WATCHED_WITHIN`]; the line stays queued and is written when the writer can.
async fn wait_until_watched(watched: tokio::sync::oneshot::Receiver<()>) {
    match tokio::time::timeout(WATCHED_WITHIN, watched).await {
        // Written, or the watchdog was given up on (that is reported by `health`).
        Ok(_) => {}
        Err(_) => tracing::warn!(
            "the worker watchdog has not taken a new worker within {WATCHED_WITHIN:?}; the \
             worker runs, its children unprotected until it does"
        ),
    }
}

/// Forks the process (on the spawner thread) and wires it up. Runs as its own task.
async fn start_worker(
    weak: Weak<Inner>,
    id: LocalId,
    plan: Plan,
) -> Result<WorkerInfo, RuntimeError> {
    let gone = || RuntimeError::Internal("the runtime was shut down".into());
    let submitted = {
        let inner = weak.upgrade().ok_or_else(gone)?;
        inner.spawner.submit(plan.command())
    };
    let result = match submitted {
        Ok(reply) => reply
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone"))),
        Err(e) => Err(e),
    };
    let result = match result {
        Ok(spawned) => {
            wait_until_watched(spawned.watched).await;
            Ok(spawned.child)
        }
        Err(e) => Err(e),
    };
    // If the runtime is gone, the child (if any) is dropped here and dies with the spawner
    // thread (PR_SET_PDEATHSIG); tokio reaps it.
    let inner = weak.upgrade().ok_or_else(gone)?;
    match result {
        Ok(child) => inner.started(id, child),
        Err(e) => inner.spawn_failed(id, &e),
    }
}

/// Waits for the worker's leader, marks its group gone, kills the rest of the group, reaps
/// the leader, waits for the pipes to drain, then records the outcome.
async fn supervise(
    weak: Weak<Inner>,
    id: LocalId,
    mut child: Child,
    group: Arc<Group>,
    captures: Vec<JoinHandle<()>>,
    activity: Arc<Notify>,
    log: Arc<OutputLog>,
) {
    let pgid = group.pgid;
    let early_status = wait_for_exit_unreaped(pgid, &mut child).await;
    // From here on nobody else signals the group: the reap below frees the id. Marked on the
    // group itself, so that this holds also when the runtime is being dropped.
    group.mark_gone();
    // A worker is its process group: when the leader is gone, so is the rest. While the
    // leader is an unreaped zombie the group id cannot be reused, so this hits only the worker.
    let _ = sys::signal_group(pgid, libc::SIGKILL);
    let status = match early_status {
        Some(status) => status,
        None => child.wait().await,
    };

    drain(id, captures, &activity).await;

    tokio::spawn(forget_group(weak.clone(), pgid));
    match weak.upgrade() {
        Some(inner) => inner.finished(id, status),
        // The runtime is gone and the record with it: no `End` for a worker nobody can see.
        None => log.close(),
    }
}

/// Waits for the capture tasks to reach end of file. Only a process that left the worker's
/// group can keep the pipes open now; once no output has come for [`DRAIN_IDLE_TIMEOUT`], the
/// captures are cut off.
async fn drain(id: LocalId, captures: Vec<JoinHandle<()>>, activity: &Notify) {
    let aborts: Vec<_> = captures.iter().map(JoinHandle::abort_handle).collect();
    let all_done = async {
        for capture in captures {
            let _ = capture.await;
        }
    };
    tokio::pin!(all_done);
    loop {
        tokio::select! {
            () = &mut all_done => return,
            // A read happened: wait afresh.
            () = activity.notified() => {}
            () = tokio::time::sleep(DRAIN_IDLE_TIMEOUT) => {
                tracing::debug!(worker = %id, "a process outside the worker's group holds its output open");
                for abort in aborts {
                    abort.abort();
                }
                return;
            }
        }
    }
}

/// Waits until the process `pid` has exited, without reaping it.
///
/// Returns `None` when it exited and is still a zombie. It uses a pidfd, or where pidfds are
/// not available (kernels before 5.3) `waitid` with `WNOWAIT` on a blocking thread. Only if
/// both fail does it reap, returning `Some(status)`; then the group kill that follows has a
/// small window in which the group id could have been reused.
async fn wait_for_exit_unreaped(pid: i32, child: &mut Child) -> Option<io::Result<ExitStatus>> {
    wait_unreaped(pid, child, sys::pidfd_open(pid).ok()).await
}

async fn wait_unreaped(
    pid: i32,
    child: &mut Child,
    pidfd: Option<std::os::fd::OwnedFd>,
) -> Option<io::Result<ExitStatus>> {
    if let Some(pidfd) = pidfd {
        if sys::wait_readable(pidfd).await.is_ok() {
            return None;
        }
    }
    // The blocking thread is held for the worker's life. Nothing reaps the child meanwhile:
    // tokio only reaps a child whose `wait` is polled, or one that was dropped.
    match tokio::task::spawn_blocking(move || sys::wait_exited_unreaped(pid)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot wait for a worker without reaping it");
            Some(child.wait().await)
        }
        Err(_) => Some(child.wait().await),
    }
}

/// Tells the watchdog to forget a group once its last member is gone (or after a while).
async fn forget_group(weak: Weak<Inner>, pgid: i32) {
    let deadline = Instant::now() + FORGET_TIMEOUT;
    let mut pause = Duration::from_millis(2);
    while sys::group_exists(pgid) && Instant::now() < deadline {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    if let Some(inner) = weak.upgrade() {
        inner.watchdog.del(pgid);
    }
}

/// Writes queued input to the worker's stdin, in order; each item's permits return to the
/// budget once it is written. Ends when the queue is closed (the pipe then closes: EOF for the
/// worker) or the pipe breaks.
async fn write_stdin(
    mut queue: mpsc::UnboundedReceiver<StdinItem>,
    mut pipe: ChildStdin,
    broken: Arc<AtomicBool>,
) {
    while let Some((data, _permit)) = queue.recv().await {
        if pipe.write_all(&data).await.is_err() {
            broken.store(true, Ordering::Release);
            return;
        }
    }
}

/// Removes terminal records older than `retain_finished`, every `period`.
async fn sweep_finished(weak: Weak<Inner>, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let retain = inner.config.retain_finished;
        let now = Instant::now();
        let mut table = lock(&inner.table);
        while let Some(&(id, ended)) = table.finished.front() {
            match ended.checked_add(retain) {
                Some(expiry) if expiry <= now => table.remove_record(id),
                _ => break,
            }
        }
    }
}

fn new_instance_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;
    use crate::config::Profile;
    use crate::output::OutputItem;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn runtime() -> Runtime {
        let sh = Profile {
            command: vec!["/bin/sh".into(), "-c".into()],
            ..Default::default()
        };
        Runtime::new(RuntimeConfig {
            profiles: BTreeMap::from([("sh".to_string(), sh)]),
            ..Default::default()
        })
        .unwrap()
    }

    fn sh(script: &str) -> SpawnSpec {
        SpawnSpec {
            profile: Some("sh".into()),
            args: vec![script.into()],
            ..Default::default()
        }
    }

    /// A `Starting` record whose process is not started yet, and its plan.
    fn starting(rt: &Runtime, spec: SpawnSpec) -> (LocalId, Plan) {
        let plan = rt.inner.plan(&spec).unwrap();
        let mut table = lock(&rt.inner.table);
        (rt.inner.create_record(&mut table, spec, &plan), plan)
    }

    /// The state letter of `/proc/<pid>/stat` (`Z` for a zombie).
    fn proc_state(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].chars().next()
    }

    /// Whether `signal` is pending for the whole process `pid` (`ShdPnd`).
    fn shared_pending(pid: i32, signal: i32) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("ShdPnd:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        mask & (1 << (signal - 1)) != 0
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn finished_on_a_terminal_worker_changes_nothing() {
        let rt = runtime();
        let (id, _plan) = starting(&rt, sh("true"));
        let failed = rt
            .inner
            .spawn_failed(id, &io::Error::other("test"))
            .unwrap();
        rt.inner
            .finished(id, Ok(ExitStatus::from_raw(libc::SIGKILL)));
        assert_eq!(rt.get(id).unwrap(), failed);
        assert_eq!(failed.signal, None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dropping_the_runtime_ends_the_readers_of_a_worker_still_starting() {
        let rt = runtime();
        let (id, _plan) = starting(&rt, sh("echo never"));
        let mut reader = rt.output(id, 0, true).unwrap();
        drop(rt);
        let next = tokio::time::timeout(DEADLINE, reader.next()).await;
        assert_eq!(next, Ok(None), "the reader must end, without End");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_grace_beyond_a_day_while_starting_is_cut_not_turned_into_a_kill() {
        let rt = runtime();
        let (id, plan) = starting(
            &rt,
            sh("trap 'echo term' TERM; echo ready; while :; do sleep 0.1; done"),
        );
        rt.stop(id, Some(Duration::MAX)).unwrap();
        let info = start_worker(Arc::downgrade(&rt.inner), id, plan)
            .await
            .unwrap();
        assert_eq!(info.state, State::Stopping);
        // SIGTERM came at once: the shell either died of it before it set its trap, or runs
        // the trap and lives on. It is never SIGKILLed within the grace.
        let mut reader = rt.output(id, 0, true).unwrap();
        let mut text = Vec::new();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !text.ends_with(b"ready\n") && !text.ends_with(b"term\n") {
            match tokio::time::timeout_at(deadline, reader.next()).await {
                Ok(Some(OutputItem::Chunk { data, .. })) => text.extend_from_slice(&data),
                Ok(Some(OutputItem::Gap { .. })) => {}
                Ok(Some(OutputItem::End) | None) => break,
                Err(_) => panic!("no output and no end: {text:?}"),
            }
        }
        let now = rt.get(id).unwrap();
        if now.state.is_terminal() {
            assert_eq!(now.signal, Some(libc::SIGTERM), "{now:?}");
        } else {
            assert_eq!(now.state, State::Stopping);
        }
        rt.stop(id, Some(Duration::ZERO)).unwrap();
        rt.shutdown(Some(Duration::ZERO)).await;
    }

    #[tokio::test]
    async fn without_pidfds_the_wait_for_the_leader_leaves_it_unreaped() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id().unwrap()).unwrap();
        let early = wait_unreaped(pid, &mut child, None).await;
        assert!(early.is_none(), "{early:?}");
        // A zombie still: its pid, and so the group id, cannot have been reused.
        assert_eq!(proc_state(pid), Some('Z'));
        assert_eq!(child.wait().await.unwrap().code(), Some(3));
    }

    #[tokio::test]
    async fn a_group_marked_gone_is_never_signalled() {
        let mut command = Command::new("sleep");
        command.arg("100").process_group(0);
        // SAFETY: between fork and exec, only async-signal-safe calls without allocation.
        unsafe {
            command.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        let pid = i32::try_from(child.id().unwrap()).unwrap();
        let group = Group::new(pid);
        group.mark_gone();
        group.signal(libc::SIGUSR1);
        assert!(!shared_pending(pid, libc::SIGUSR1), "signalled once gone");
        // The check itself sees a signal that was sent: SIGUSR1 is blocked, so it stays pending.
        sys::signal_group(pid, libc::SIGUSR1).unwrap();
        assert!(shared_pending(pid, libc::SIGUSR1));
        child.kill().await.unwrap();
    }

    #[tokio::test]
    async fn the_supervisor_marks_the_group_gone_also_when_the_runtime_is_gone() {
        let child = Command::new("/bin/sh")
            .args(["-c", "exit 0"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id().unwrap()).unwrap();
        let group = Arc::new(Group::new(pid));
        let log = OutputLog::new(1024);
        let supervised = supervise(
            Weak::new(),
            LocalId(1),
            child,
            Arc::clone(&group),
            Vec::new(),
            Arc::new(Notify::new()),
            Arc::clone(&log),
        );
        tokio::time::timeout(DEADLINE, supervised).await.unwrap();
        assert!(group.is_gone());
        let mut reader = OutputReader::new(&log, 0, true).unwrap();
        assert_eq!(reader.next().await, None, "closed, without End");
    }
}
