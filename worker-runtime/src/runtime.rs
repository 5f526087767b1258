//! The runtime's public face and its records: [`Runtime`]'s calls, the worker table under its
//! one lock (records, request ids, counters, the event ring), stopping, and the sweep of
//! finished records. Planning a spawn lives in [`plan`], a process's supervision from fork to
//! reap in [`supervise`].

mod plan;
mod probing;
mod supervise;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use registry_core::output_log::OutputLog;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::AbortHandle;

use crate::config::{Profile, RuntimeConfig};
use crate::events::{EventLog, EventReader, NewEvent};
use crate::limits::MAX_GRACE;
use crate::output::OutputReader;
use crate::restart::{Decision, Ending, Restarts};
use crate::spawner::Spawner;
use crate::types::{
    FailReason, Health, HealthState, LastExit, LocalId, Problem, RuntimeError, SpawnSpec, State,
    WorkerInfo,
};
use crate::util::lock;
use crate::watchdog::Watchdogs;
use plan::Plan;
pub(crate) use plan::DEFAULT_PATH;
use probing::ProbeRun;
use supervise::{start_worker, Group};

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
    /// The profiles in force: the config's at first, replaced by [`Runtime::set_profiles`].
    /// A spawn and a restart read them when they plan a run.
    profiles: RwLock<Arc<Profiles>>,
    instance_id: String,
    handle: Handle,
    table: Mutex<Table>,
    /// The event ring, also reachable through the table; readers take this clone so that they
    /// never touch the table lock.
    events: Arc<EventLog>,
    spawner: Spawner,
    /// The watchdog process, kept running.
    watchdog: Arc<Watchdogs>,
    /// Permits for health probes running at once (`max_probes`).
    probes: Arc<Semaphore>,
    /// The runtime's cgroup, where workers are contained.
    cgroups: Option<crate::sys::CgroupTree>,
    containment: crate::types::Containment,
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
    /// The restart policy's bookkeeping.
    restarts: Restarts,
    /// The timer task that starts the next run while the worker waits to be restarted;
    /// taken by that task when it fires, aborted by a stop.
    retry_timer: Option<AbortHandle>,
    /// When the current run's process started.
    run_started: Option<Instant>,
    /// The health probe, if the profile has one.
    probe: Option<Arc<ProbeRun>>,
    /// The task probing the current run; aborted when the run ends.
    probe_task: Option<AbortHandle>,
    /// The probe found the current run unhealthy and its group is being stopped, so that
    /// the restart policy starts it again.
    unhealthy_kill: bool,
}

struct Process {
    /// The worker's process group, shared with its supervisor task.
    group: Arc<Group>,
}

type StdinItem = (Bytes, Option<OwnedSemaphorePermit>);

struct StdinQueue {
    tx: mpsc::UnboundedSender<StdinItem>,
    /// Bytes that may be pending; each queued item holds permits for its length until written.
    permits: Arc<Semaphore>,
}

/// Spawn profiles by name.
pub type Profiles = BTreeMap<String, Profile>;

/// The checks every profile passes, at the start and when profiles are replaced.
fn check_profiles(profiles: &Profiles) -> Result<(), RuntimeError> {
    crate::config::profiles_problem(profiles)
        .map_err(|(_, message)| RuntimeError::InvalidRequest(message))
}

impl Inner {
    fn profiles(&self) -> Arc<Profiles> {
        self.profiles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        if let Err((_, message)) = config.problem() {
            return Err(RuntimeError::InvalidRequest(message));
        }
        let handle = Handle::try_current().map_err(|_| {
            RuntimeError::Internal(
                "the worker runtime must be created inside a tokio runtime".into(),
            )
        })?;

        let instance_id = new_instance_id();
        let (cgroups, containment) = if config.contain {
            match crate::sys::CgroupTree::new(
                config.cgroup_root.as_ref().map(|root| root.as_path()),
                &instance_id,
            ) {
                Ok(tree) => (Some(tree), crate::types::Containment::Cgroup),
                Err(why) => {
                    tracing::info!(
                        "workers are not contained in cgroups ({why}); processes that leave a \
                         worker's process group are not stopped with it"
                    );
                    (None, crate::types::Containment::Unavailable(why))
                }
            }
        } else {
            (None, crate::types::Containment::Off)
        };
        let watchdog = Watchdogs::start(&handle, cgroups.as_ref().map(|t| t.dir().to_path_buf()))
            .map_err(|e| {
            tracing::error!(error = %e, "cannot start the worker watchdog process");
            RuntimeError::Internal("cannot start the worker watchdog".into())
        })?;
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
            cgroups,
            containment,
            instance_id,
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
            profiles: RwLock::new(Arc::new(config.profiles.clone())),
            probes: Arc::new(Semaphore::new(config.max_probes)),
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

    /// The configuration the runtime was made with. Its `profiles` are those it started
    /// with; [`profiles`](Self::profiles) gives the ones in force.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The profiles in force now.
    pub fn profiles(&self) -> Arc<Profiles> {
        self.inner.profiles()
    }

    /// Replaces the profiles, as a reload of the config does: spawns from now on, and
    /// the restarts of running workers, use the new ones (a restart whose profile is gone
    /// ends its worker `failed` with reason `spawn_failed`); running processes are not
    /// touched. Refused with [`RuntimeError::InvalidRequest`], changing nothing, for a
    /// profile [`Runtime::new`] would refuse.
    pub fn set_profiles(&self, profiles: Profiles) -> Result<(), RuntimeError> {
        check_profiles(&profiles)?;
        *self
            .inner
            .profiles
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(profiles);
        Ok(())
    }

    /// What is wrong with the runtime's own machinery (its watchdog process, its spawner
    /// thread); empty while all is well. A watchdog that died is started again (after a
    /// backoff of 1 s, doubling up to 30 s), and the problem is gone once the new one holds
    /// every live worker's group.
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

    /// Whether workers are contained in cgroups of their own, and why not when they are not.
    /// Decided when the runtime starts.
    pub fn containment(&self) -> &crate::types::Containment {
        &self.inner.containment
    }

    /// A receiver that sees a new value whenever [`health`](Self::health) may have changed
    /// because the watchdog died or is back. (The spawner threads die only with a panic,
    /// which is not announced; poll `health` for those.)
    pub fn health_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watchdog.changes()
    }

    /// The pid of the runtime's watchdog process (0 while there is none). For tests only.
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
    /// returned). After [`Runtime::shutdown`] → [`RuntimeError::Conflict`]. While the
    /// watchdog is gone and not yet replaced → [`RuntimeError::Unavailable`]: a worker started
    /// then would leave its children behind if the runtime's process were killed.
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
            if !self.inner.watchdog.is_alive() {
                return Err(RuntimeError::Unavailable {
                    message: "the runtime's watchdog is being restarted; no worker is started \
                              until it is back"
                        .into(),
                    retry_after: self.inner.watchdog.retry_after(),
                });
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

    /// Refuses new spawns, stops every live worker with its own grace (the profile's, or the
    /// runtime's default) cut to `max_grace` when one is given, and waits until all of them
    /// are terminal. So a host that must be down within its own shutdown grace passes it here,
    /// and a worker with a shorter grace is still SIGKILLed after its own.
    pub async fn shutdown(&self, max_grace: Option<Duration>) {
        // Subscribe first: a worker that ends after the check below still wakes us.
        let mut changed = self.inner.events.subscribe();
        let live: Vec<(LocalId, Duration)> = {
            let mut table = lock(&self.inner.table);
            table.closed = true;
            table
                .workers
                .values()
                .filter(|r| !r.info.state.is_terminal())
                .map(|r| {
                    let own = r.grace;
                    (r.info.id, max_grace.map_or(own, |cap| own.min(cap)))
                })
                .collect()
        };
        for (id, grace) in live {
            let _ = self.inner.stop(id, Some(grace));
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
            restarts: 0,
            last_exit: None,
            retry_at: None,
            message: None,
            health: plan.probe.as_ref().map(|p| Health {
                status: HealthState::Unknown,
                since: SystemTime::now(),
                probe: p.target.kind(),
            }),
        };
        let probe = plan.probe.clone().map(|p| Arc::new(ProbeRun::new(p, plan)));
        let (stdin, rx) = self.stdin_queue(&spec);
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
                restarts: Restarts::new(plan.restart),
                retry_timer: None,
                run_started: None,
                probe,
                probe_task: None,
                unhealthy_kill: false,
            },
        );
        table.upsert(id);
        id
    }

    /// A fresh stdin queue for a run of the worker, holding the request's initial text.
    fn stdin_queue(&self, spec: &SpawnSpec) -> (StdinQueue, mpsc::UnboundedReceiver<StdinItem>) {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(text) = spec.stdin.as_ref().filter(|t| !t.is_empty()) {
            // The initial text goes first, outside the pending-input budget.
            let _ = tx.send((Bytes::from(text.0.clone()), None));
        }
        let permits = self.config.max_pending_input.min(Semaphore::MAX_PERMITS);
        let queue = StdinQueue {
            tx,
            permits: Arc::new(Semaphore::new(permits)),
        };
        (queue, rx)
    }

    /// Records that the process could not be started, and why (`message`, shown in the
    /// worker's view; the registry logs it under the worker's public id).
    fn spawn_failed(&self, id: LocalId, message: String) -> Result<WorkerInfo, RuntimeError> {
        let mut table = lock(&self.table);
        table.note(id, message);
        let info = table.end(id, State::Failed, None, None, Some(FailReason::SpawnFailed));
        table.enforce_max_finished(self.config.max_finished);
        info.ok_or(RuntimeError::NotFound)
    }

    fn stop(self: &Arc<Self>, id: LocalId, grace: Option<Duration>) -> Result<(), RuntimeError> {
        let mut table = lock(&self.table);
        let record = table.workers.get_mut(&id).ok_or(RuntimeError::NotFound)?;
        if record.info.state.is_terminal() {
            return Ok(());
        }
        if let Some(timer) = record.retry_timer.take() {
            // Waiting to be restarted: the stop ends the policy, and the worker, at once.
            timer.abort();
            record.stop_requested = true;
            table.end(id, State::Stopped, None, None, None);
            table.enforce_max_finished(self.config.max_finished);
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

    /// Records how the worker's process ended, and ends the worker unless its restart policy
    /// starts it again. Called after its pipes are drained.
    fn finished(self: &Arc<Self>, id: LocalId, status: io::Result<ExitStatus>) {
        let mut table = lock(&self.table);
        let closed = table.closed;
        let Some(record) = table.workers.get_mut(&id) else {
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
                // In the view, where the registry logs it under the worker's public id.
                if !record.info.state.is_terminal() {
                    record.info.message = Some(format!("its exit status could not be read: {e}"));
                }
                (State::Failed, None, None, Some(FailReason::Lost))
            }
        };
        let mut reason = reason;
        let ended_by_itself = state == State::Exited || reason == Some(FailReason::Killed);
        if ended_by_itself && !closed && !record.info.state.is_terminal() {
            // Stopped for failing its probe: a failure, whatever the process answered.
            let ending = if exit_code == Some(0) && !record.unhealthy_kill {
                Ending::Success
            } else {
                Ending::Failure
            };
            let ran = record.run_started.map(|t| t.elapsed()).unwrap_or_default();
            match record.restarts.decide(ending, ran, Instant::now()) {
                Decision::End => {}
                Decision::CrashLoop => {
                    let (code, signal) = (exit_code, signal);
                    table.end(id, State::Failed, code, signal, Some(FailReason::CrashLoop));
                    table.enforce_max_finished(self.config.max_finished);
                    return;
                }
                Decision::Restart(delay) => {
                    let last = LastExit {
                        code: exit_code,
                        signal,
                        reason: reason.take(),
                        at: SystemTime::now(),
                    };
                    self.schedule_restart(&mut table, id, delay, last);
                    return;
                }
            }
        }
        table.end(id, state, exit_code, signal, reason);
        table.enforce_max_finished(self.config.max_finished);
    }
}

impl Table {
    /// Sets the worker's `message` (a cause for people) unless it has ended or has one.
    fn note(&mut self, id: LocalId, message: String) {
        if let Some(record) = self.workers.get_mut(&id) {
            if !record.info.state.is_terminal() && record.info.message.is_none() {
                record.info.message = Some(message);
            }
        }
    }

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
        record.info.retry_at = None;
        if let Some(timer) = record.kill_timer.take() {
            timer.abort();
        }
        if let Some(timer) = record.retry_timer.take() {
            timer.abort();
        }
        if let Some(task) = record.probe_task.take() {
            task.abort();
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
            if let Some(timer) = &record.retry_timer {
                timer.abort();
            }
            if let Some(task) = &record.probe_task {
                task.abort();
            }
        }
        // The watchdog SIGKILLs whatever it still knows of, then exits.
        self.watchdog.close();
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

    #[tokio::test(flavor = "multi_thread")]
    async fn spawns_are_refused_as_unavailable_until_a_new_watchdog_runs() {
        let rt = runtime();
        *lock(&rt.inner.watchdog.starter) = |_| Err(io::Error::other("not in this test"));
        let pid = i32::try_from(rt.watchdog_pid()).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is the runtime's watchdog.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let deadline = Instant::now() + DEADLINE;
        while rt.health().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rt.health(), vec![Problem::WatchdogGone]);
        match rt.spawn(sh("true")).await {
            Err(RuntimeError::Unavailable { retry_after, .. }) => {
                assert!(retry_after >= Duration::from_secs(1));
            }
            other => panic!("a spawn without a watchdog: {other:?}"),
        }
        assert!(rt.list().is_empty(), "a refused spawn leaves no record");
        *lock(&rt.inner.watchdog.starter) = crate::watchdog::Watchdog::start;
        assert!(rt.inner.watchdog.wait_ready(Some(DEADLINE * 2)).await);
        assert_eq!(rt.health(), vec![]);
        let w = rt.spawn(sh("true")).await.unwrap();
        assert_ne!(w.state, State::Failed);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn finished_on_a_terminal_worker_changes_nothing() {
        let rt = runtime();
        let (id, _plan) = starting(&rt, sh("true"));
        let failed = rt.inner.spawn_failed(id, "test".into()).unwrap();
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
}
