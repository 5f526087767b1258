//! The `RuntimeSource` impl: workers as containers on one engine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::query_parameters::{
    AttachContainerOptions, EventsOptions, KillContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use registry_core::fanout::Subscribers;
use registry_core::output_log::OutputLog;
use registry_core::{
    limits, Capabilities, FailReason, RegistryError, RuntimeSource, SourceEvent, SourceEvents,
    SourceHealth, SourceKey, SourceWorker, SpawnRequest, WorkerState,
};
use time::OffsetDateTime;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::config::{DockerConfig, Mode, DEFAULT_SOCKET};
use crate::engine::{end_of, Facts, Meta, Phase, Plan, LABEL_INSTANCE, LABEL_WORKER};
use crate::error::DockerError;

mod swarm;

/// Events each lifecycle stream holds before it is owed a `Resync`.
const EVENTS_CAPACITY: usize = 64;
/// Input bytes waiting per worker.
const MAX_INPUT_QUEUED: usize = 1 << 20;
/// How long a worker's output has to reach its end once the container died.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Every engine request (not a stream's body) has this long to be answered.
const REQUEST_TIMEOUT_SECS: u64 = 30;
/// How often, and how many times, a `die` whose inspect still says running is looked at
/// again before it is left to a later check.
const DIE_LOOKS: u32 = 20;
const DIE_LOOK_EVERY: Duration = Duration::from_millis(250);
/// After the kill at the end of a grace: how often, and how many times, a worker not yet
/// ended is checked against its container's facts (the `die` event may be late or lost).
const KILL_CHECKS: u32 = 30;
const KILL_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Reconnect backoff: first wait and cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The name of the file in the runtime's state directory holding the instance label.
const INSTANCE_FILE: &str = "docker-instance";
/// The API version spoken: Docker 20.10 and newer, and Podman's compatible API, have it.
const API_VERSION: bollard::ClientVersion = bollard::ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// A `docker` runtime's source: each worker is a container on the engine behind the
/// config's `socket`. See the crate docs for how a worker maps to a container.
///
/// `Debug` shows the runtime and counts; never the socket, a container or an image.
pub struct DockerSource {
    inner: Arc<Inner>,
    follower: AbortHandle,
}

struct Inner {
    runtime: String,
    instance: String,
    config: DockerConfig,
    /// The engine's socket path (internal authority).
    socket: String,
    /// The engine's client, made once the socket exists.
    client: Mutex<Option<Docker>>,
    state: Mutex<State>,
}

struct State {
    workers: BTreeMap<SourceKey, Worker>,
    subs: Subscribers,
    health: SourceHealth,
    /// request_id → the worker it made (or `None` while that spawn is under way), with the
    /// request's hash.
    requests: HashMap<String, (String, Option<SourceKey>)>,
    /// Nonces of spawns under way: their containers may show in a list before the spawn
    /// records them.
    spawning: HashSet<String>,
    /// Bumped whenever a worker is recorded; a reconcile ignores workers recorded after its
    /// list was taken.
    epoch: u64,
    shutting_down: bool,
}

struct Worker {
    view: SourceWorker,
    log: Arc<OutputLog>,
    /// Input queue (`None` once the worker takes no input).
    input: Option<mpsc::Sender<Bytes>>,
    queued: Arc<AtomicUsize>,
    /// Becomes true when the container's output stream has ended.
    drained: watch::Receiver<bool>,
    grace: Duration,
    stop_requested: bool,
    /// When the hard kill of a stop is due, and its timer.
    kill_at: Option<tokio::time::Instant>,
    kill_task: Option<AbortHandle>,
    /// A task is ending the worker (its container died).
    finishing: bool,
    /// The state before the engine went out of reach (while `view.state` is `unknown`).
    before_unknown: Option<WorkerState>,
    recorded_at: u64,
    request_id: Option<String>,
    /// Swarm: tells the output pump that the task has ended (its log stream does not end
    /// by itself).
    task_ended: Option<watch::Sender<bool>>,
}

impl fmt::Debug for DockerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("DockerSource")
            .field("runtime", &self.inner.runtime)
            .field("workers", &st.workers.len())
            .field("health", &st.health.status)
            .finish_non_exhaustive()
    }
}

impl Drop for DockerSource {
    fn drop(&mut self) {
        // The containers keep running; a source built later on the same state directory
        // finds them again by their labels.
        self.follower.abort();
    }
}

impl DockerSource {
    /// A source over the engine `config.socket`, keeping its instance label in
    /// `state_dir`. Checks the config and starts following the engine; call it inside a
    /// tokio runtime. Does not wait for the engine: until it answers the runtime is
    /// `unavailable`.
    pub fn new(config: DockerConfig, state_dir: impl AsRef<Path>) -> Result<Self, RegistryError> {
        config.check().map_err(RegistryError::InvalidRequest)?;
        Self::with_runtime("docker", config, state_dir)
    }

    /// [`new`](Self::new) for the runtime named `runtime` (its containers are labelled so).
    pub fn with_runtime(
        runtime: &str,
        config: DockerConfig,
        state_dir: impl AsRef<Path>,
    ) -> Result<Self, RegistryError> {
        config.check().map_err(RegistryError::InvalidRequest)?;
        let instance = instance_id(state_dir.as_ref())?;
        let socket = config.socket.trim_start_matches("unix://");
        let socket = if socket.is_empty() {
            DEFAULT_SOCKET
        } else {
            socket
        };
        let inner = Arc::new(Inner {
            runtime: runtime.to_string(),
            instance,
            socket: socket.to_string(),
            client: Mutex::new(None),
            config,
            state: Mutex::new(State {
                workers: BTreeMap::new(),
                subs: Subscribers::new(EVENTS_CAPACITY),
                health: SourceHealth::unavailable("connecting to the container engine", None),
                requests: HashMap::new(),
                spawning: HashSet::new(),
                epoch: 0,
                shutting_down: false,
            }),
        });
        let follower = tokio::spawn(follow_engine(Arc::downgrade(&inner))).abort_handle();
        Ok(DockerSource { inner, follower })
    }

    /// After how many unread lifecycle events a stream is owed a `Resync`.
    pub fn events_to_overflow(&self) -> usize {
        EVENTS_CAPACITY
    }

    /// Waits until the engine has answered once (the runtime is `ready`), for at most
    /// `limit`. Returns whether it has.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.inner.lock().health.status == registry_core::HealthStatus::Ready {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The runtime's instance label: made once, kept in the state directory.
fn instance_id(state_dir: &Path) -> Result<String, RegistryError> {
    let path: PathBuf = state_dir.join(INSTANCE_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let text = text.trim();
        if text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(text.to_string());
        }
    }
    std::fs::create_dir_all(state_dir).map_err(|e| {
        RegistryError::internal(format!("creating the state directory {state_dir:?}: {e}"))
    })?;
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| RegistryError::internal(format!("random: {e}")))?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, &id)
        .map_err(|e| RegistryError::internal(format!("writing {path:?}: {e}")))?;
    Ok(id)
}

fn not_found() -> RegistryError {
    RegistryError::WorkerNotFound("no such worker".into())
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Inner {
    /// Whether workers are swarm services (`mode = "swarm"`).
    fn swarm(&self) -> bool {
        self.config.mode == Mode::Swarm
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine's client. bollard checks that the socket exists when a client is made,
    /// so it is made on first use: an engine that is not up yet leaves the runtime
    /// `unavailable` rather than refusing the config.
    fn docker(&self) -> Result<Docker, DockerError> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(docker) = &*client {
            return Ok(docker.clone());
        }
        let docker = Docker::connect_with_unix(&self.socket, REQUEST_TIMEOUT_SECS, &API_VERSION)
            .map_err(|e| DockerError::from_bollard("connect", e))?;
        *client = Some(docker.clone());
        Ok(docker)
    }

    fn label_filter(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_INSTANCE}={}", self.instance)],
        )])
    }

    fn views(st: &State) -> Vec<SourceWorker> {
        st.workers.values().map(|w| w.view.clone()).collect()
    }

    /// Sends `event` to every lifecycle stream; a stream that overflows is repaid with the
    /// whole truth once it has room.
    fn emit(self: &Arc<Self>, st: &mut State, event: SourceEvent) {
        for owed in st.subs.send(&event) {
            let inner = Arc::downgrade(self);
            tokio::spawn(async move {
                let Some(owed) = owed.ready().await else {
                    return;
                };
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let mut st = inner.lock();
                let truth = vec![
                    SourceEvent::Resync(Inner::views(&st)),
                    SourceEvent::Health(st.health.clone()),
                ];
                st.subs.repay(owed, truth);
            });
        }
    }

    fn upsert(self: &Arc<Self>, st: &mut State, key: &SourceKey) {
        if let Some(w) = st.workers.get(key) {
            let event = SourceEvent::Upsert(w.view.clone());
            self.emit(st, event);
        }
    }

    fn set_health(self: &Arc<Self>, st: &mut State, health: SourceHealth) {
        if st.health != health {
            st.health = health.clone();
            self.emit(st, SourceEvent::Health(health));
        }
    }

    fn live_count(st: &State) -> usize {
        st.workers
            .values()
            .filter(|w| !w.view.state.is_terminal())
            .count()
    }

    /// What a request runs, checked against the config.
    fn plan(
        &self,
        req: &SpawnRequest,
    ) -> Result<(Plan, Option<u64>, Option<Duration>), RegistryError> {
        let cfg = &self.config;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        let (mut plan, retention, grace) = match (&req.profile, &req.command) {
            (Some(name), _) => {
                let p = cfg.profiles.get(name).ok_or_else(|| {
                    RegistryError::InvalidRequest(format!(
                        "no profile {:?} in this runtime",
                        name.chars().take(64).collect::<String>()
                    ))
                })?;
                env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                let mut argv = p.command.clone();
                argv.extend(req.args.iter().cloned());
                (
                    Plan {
                        image: p.image.clone(),
                        argv,
                        env: Vec::new(),
                        cwd: p.cwd.as_ref().map(|c| c.to_string_lossy().into_owned()),
                        labels: p.labels.clone(),
                        network: p.network.clone(),
                        memory: p.memory,
                        cpus: p.cpus,
                        pids_limit: p.pids_limit,
                        user: p.user.clone(),
                    },
                    p.output_retention,
                    p.grace,
                )
            }
            (None, Some(command)) => {
                if !cfg.allow_commands {
                    return Err(RegistryError::Forbidden(
                        "this runtime runs profiles only (`allow_commands` is off)".into(),
                    ));
                }
                let image = cfg.image.clone().ok_or_else(|| {
                    RegistryError::Forbidden("this runtime has no image for commands".into())
                })?;
                let mut argv = command.clone();
                argv.extend(req.args.iter().cloned());
                (
                    Plan {
                        image,
                        argv,
                        env: Vec::new(),
                        cwd: None,
                        labels: BTreeMap::new(),
                        network: "none".into(),
                        memory: None,
                        cpus: None,
                        pids_limit: None,
                        user: None,
                    },
                    None,
                    None,
                )
            }
            (None, None) => {
                return Err(RegistryError::InvalidRequest(
                    "one of `profile` or `command` is required".into(),
                ))
            }
        };
        if !cfg.image_allowed(&plan.image) {
            return Err(RegistryError::Forbidden(
                "the image is not among this runtime's `allow_images`".into(),
            ));
        }
        env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        plan.env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        Ok((plan, retention, grace))
    }
}

/// A hash of everything in a spawn request but its `request_id`.
fn request_hash(req: &SpawnRequest) -> String {
    let mut r = req.clone();
    r.request_id = None;
    let text = serde_json::to_vec(&r).expect("a request serializes");
    blake3::hash(&text).to_hex().to_string()
}

fn fresh_nonce() -> String {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_worker(
    key: SourceKey,
    meta: &Meta,
    state: WorkerState,
    log: Arc<OutputLog>,
    drained: watch::Receiver<bool>,
    recorded_at: u64,
) -> Worker {
    Worker {
        view: SourceWorker {
            key,
            name: meta.name.clone(),
            labels: meta.labels.clone(),
            state,
            exit_code: None,
            reason: None,
            created_at: meta.created_at,
            started_at: None,
            ended_at: None,
            last_seen_at: None,
            profile: meta.profile.clone(),
            args: meta.args.clone(),
            command: meta.command.clone(),
            restarts: 0,
            last_exit: None,
            retry_at: None,
            health: None,
            message: None,
        },
        log,
        input: None,
        queued: Arc::new(AtomicUsize::new(0)),
        drained,
        grace: Duration::from_millis(meta.grace_ms),
        stop_requested: false,
        kill_at: None,
        kill_task: None,
        finishing: false,
        before_unknown: None,
        recorded_at,
        request_id: meta.request_id.clone(),
        task_ended: None,
    }
}

/// How long a swarm task's log stream must be quiet, once the task has ended, before its
/// output counts as drained (the stream itself never ends while the service exists).
const SWARM_QUIET: Duration = Duration::from_millis(500);

/// Copies a container's output stream (attach or logs) into its log, stdout and stderr
/// apart; marks it drained at the end. With `ended` (a swarm task's logs, which never end
/// by themselves), the stream counts as ended once `ended` is true and it has been quiet
/// for [`SWARM_QUIET`].
async fn pump<S>(
    mut stream: S,
    log: Arc<OutputLog>,
    drained: watch::Sender<bool>,
    mut ended: Option<watch::Receiver<bool>>,
) where
    S: Stream<Item = Result<LogOutput, bollard::errors::Error>> + Unpin,
{
    let mut out = log.writer(registry_core::StreamKind::Stdout);
    let mut err = log.writer(registry_core::StreamKind::Stderr);
    loop {
        let item = match &mut ended {
            None => stream.next().await,
            Some(rx) if *rx.borrow() => {
                match tokio::time::timeout(SWARM_QUIET, stream.next()).await {
                    Ok(item) => item,
                    Err(_) => break,
                }
            }
            Some(rx) => tokio::select! {
                item = stream.next() => item,
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The record is gone: nobody waits for this output any more.
                        break;
                    }
                    continue;
                }
            },
        };
        let Some(item) = item else { break };
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                out.write(&message)
            }
            Ok(LogOutput::StdErr { message }) => err.write(&message),
            Ok(LogOutput::StdIn { .. }) => {}
            Err(e) => {
                tracing::debug!(error = %e, "a container's output stream broke off");
                break;
            }
        }
    }
    out.flush();
    err.flush();
    let _ = drained.send(true);
}

/// Writes a worker's queued input to its container's stdin, in order.
async fn write_input(
    mut stdin: Pin<Box<dyn AsyncWrite + Send>>,
    mut rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(data) = rx.recv().await {
        let failed = stdin.write_all(&data).await.is_err() || stdin.flush().await.is_err();
        queued.fetch_sub(data.len(), Ordering::Relaxed);
        if failed {
            break;
        }
    }
    let _ = stdin.shutdown().await;
}

fn input_channel(
    stdin: Pin<Box<dyn AsyncWrite + Send>>,
    queued: Arc<AtomicUsize>,
) -> mpsc::Sender<Bytes> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(write_input(stdin, rx, queued));
    tx
}

impl Inner {
    async fn kill(&self, key: &SourceKey, signal: &str) -> Result<(), DockerError> {
        let options = KillContainerOptions {
            signal: signal.to_string(),
        };
        match self
            .docker()?
            .kill_container(key.as_str(), Some(options))
            .await
        {
            Ok(()) => Ok(()),
            // 409: not running any more; 404: gone. The end shows as an event.
            Err(e) => {
                let e = DockerError::from_bollard("kill", e);
                if matches!(e.status(), Some(404) | Some(409) | Some(500)) && !e.is_unreachable() {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn inspect(&self, key: &SourceKey) -> Result<Facts, DockerError> {
        if self.swarm() {
            return self.task_facts(key).await;
        }
        let c = self
            .docker()?
            .inspect_container(key.as_str(), None)
            .await
            .map_err(|e| DockerError::from_bollard("inspect", e))?;
        Ok(Facts::from_inspect(&c))
    }

    /// Schedules the hard kill of a stop at `at`.
    fn schedule_kill(self: &Arc<Self>, w: &mut Worker, at: tokio::time::Instant) {
        if let Some(task) = w.kill_task.take() {
            task.abort();
        }
        w.kill_at = Some(at);
        let inner = Arc::downgrade(self);
        let key = w.view.key.clone();
        w.kill_task = Some(
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                match inner.upgrade() {
                    Some(strong) => {
                        if let Err(e) = strong.kill(&key, "SIGKILL").await {
                            tracing::warn!(error = %e, "killing a container after its grace failed");
                        }
                    }
                    None => return,
                }
                // The end comes as a `die` event. Should the event be late or lost (a
                // loaded engine), or its inspect have seen the container still running,
                // look again: the killed container's facts end the worker.
                for _ in 0..KILL_CHECKS {
                    tokio::time::sleep(KILL_CHECK_EVERY).await;
                    let Some(strong) = inner.upgrade() else {
                        return;
                    };
                    let live = strong
                        .lock()
                        .workers
                        .get(&key)
                        .is_some_and(|w| !w.view.state.is_terminal());
                    if !live {
                        return;
                    }
                    strong.finish_later(key.clone());
                }
            })
            .abort_handle(),
        );
    }

    /// The container died: once its output is drained, the worker ends.
    fn finish_later(self: &Arc<Self>, key: SourceKey) {
        {
            let mut st = self.lock();
            let Some(w) = st.workers.get_mut(&key) else {
                return;
            };
            if w.finishing || w.view.state.is_terminal() {
                return;
            }
            w.finishing = true;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            // An engine may send `die` before its inspect says the container has ended
            // (Podman does, when loaded): look a few times before leaving it to the next
            // check.
            let mut looks = 0;
            let facts = loop {
                looks += 1;
                match inner.inspect(&key).await {
                    Ok(f) if f.phase != Phase::Running => break f,
                    Ok(_) if looks < DIE_LOOKS => {}
                    Err(e) if e.is_not_found() => {
                        // Removed from outside at once: it is lost.
                        inner.end_lost(&key);
                        return;
                    }
                    Err(e) if looks < DIE_LOOKS => {
                        tracing::debug!(error = %e, "inspecting a dead container failed");
                    }
                    _ => {
                        // A later kill check or reconcile looks again.
                        if let Some(w) = inner.lock().workers.get_mut(&key) {
                            w.finishing = false;
                        }
                        return;
                    }
                }
                tokio::time::sleep(DIE_LOOK_EVERY).await;
            };
            let drained = {
                let st = inner.lock();
                st.workers.get(&key).map(|w| {
                    if let Some(ended) = &w.task_ended {
                        let _ = ended.send(true);
                    }
                    w.drained.clone()
                })
            };
            if let Some(mut drained) = drained {
                let _ = tokio::time::timeout(DRAIN_LIMIT, drained.wait_for(|d| *d)).await;
            }
            inner.end_with(&key, &facts);
        });
    }

    /// Ends a worker from its container's facts.
    fn end_with(self: &Arc<Self>, key: &SourceKey, facts: &Facts) {
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(key) else {
            return;
        };
        if w.view.state.is_terminal() {
            return;
        }
        let end = end_of(facts, w.stop_requested);
        w.view.state = end.state;
        w.view.exit_code = end.exit_code;
        w.view.reason = end.reason;
        w.view.ended_at = Some(facts.finished_at.unwrap_or_else(now));
        // The engine's times, so that start and end agree with each other.
        if facts.started_at.is_some() {
            w.view.started_at = facts.started_at;
        }
        w.view.last_seen_at = None;
        w.before_unknown = None;
        self.close_worker(&mut st, key);
    }

    /// The container is gone while the worker was live.
    fn end_lost(self: &Arc<Self>, key: &SourceKey) {
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(key) else {
            return;
        };
        if w.view.state.is_terminal() {
            return;
        }
        if w.stop_requested {
            w.view.state = WorkerState::Stopped;
        } else {
            w.view.state = WorkerState::Failed;
            w.view.reason = Some(FailReason::Lost);
        }
        w.view.ended_at = Some(now());
        w.view.last_seen_at = None;
        self.close_worker(&mut st, key);
    }

    /// The worker just became terminal: finish its output, drop its input, report it, and
    /// schedule its removal.
    fn close_worker(self: &Arc<Self>, st: &mut State, key: &SourceKey) {
        let Some(w) = st.workers.get_mut(key) else {
            return;
        };
        w.log.finish();
        w.input = None;
        w.finishing = false;
        if let Some(task) = w.kill_task.take() {
            task.abort();
        }
        let stopped = w.stop_requested;
        self.upsert(st, key);
        self.trim_finished(st);
        if stopped && self.swarm() {
            // A stopped worker's service goes at once (its output is kept here).
            let inner = Arc::downgrade(self);
            let key = key.clone();
            tokio::spawn(async move {
                if let Some(inner) = inner.upgrade() {
                    if let Err(e) = inner.remove_container(&key).await {
                        tracing::warn!(error = %e, "removing a stopped worker's service failed");
                    }
                }
            });
        }
        let inner = Arc::downgrade(self);
        let key = key.clone();
        let after = self.config.retain_finished;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(inner) = inner.upgrade() {
                let _ = inner.remove_record(&key).await;
            }
        });
    }

    /// At most `max_finished` terminal records: the oldest go first.
    fn trim_finished(self: &Arc<Self>, st: &mut State) {
        let mut ended: Vec<(OffsetDateTime, SourceKey)> = st
            .workers
            .values()
            .filter(|w| w.view.state.is_terminal())
            .map(|w| {
                (
                    w.view.ended_at.unwrap_or(w.view.created_at),
                    w.view.key.clone(),
                )
            })
            .collect();
        if ended.len() <= self.config.max_finished {
            return;
        }
        ended.sort();
        let excess = ended.len() - self.config.max_finished;
        for (_, key) in ended.into_iter().take(excess) {
            self.forget(st, &key);
            let inner = Arc::downgrade(self);
            tokio::spawn(async move {
                if let Some(inner) = inner.upgrade() {
                    inner.remove_container(&key).await.ok();
                }
            });
        }
    }

    /// Drops a record and reports it removed.
    fn forget(self: &Arc<Self>, st: &mut State, key: &SourceKey) {
        if let Some(w) = st.workers.remove(key) {
            if let Some(rid) = &w.request_id {
                st.requests.remove(rid);
            }
            self.emit(st, SourceEvent::Removed(key.clone()));
        }
    }

    async fn remove_container(&self, key: &SourceKey) -> Result<(), DockerError> {
        if self.swarm() {
            return self.remove_service(key).await;
        }
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self
            .docker()?
            .remove_container(key.as_str(), Some(options))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = DockerError::from_bollard("remove", e);
                // Gone already, or being removed.
                if e.is_not_found() || e.status() == Some(409) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Removes a terminal worker's container and record.
    async fn remove_record(self: &Arc<Self>, key: &SourceKey) -> Result<(), RegistryError> {
        {
            let st = self.lock();
            let w = st.workers.get(key).ok_or_else(not_found)?;
            if !w.view.state.is_terminal() {
                return Err(RegistryError::Conflict(
                    "the worker is still running; stop it first".into(),
                ));
            }
        }
        self.remove_container(key).await?;
        let mut st = self.lock();
        self.forget(&mut st, key);
        Ok(())
    }

    /// Opens a container's attach (stdin, and its output when `output`).
    async fn attach(
        &self,
        key: &SourceKey,
        output: bool,
    ) -> Result<bollard::container::AttachContainerResults, DockerError> {
        let options = AttachContainerOptions {
            stream: true,
            stdin: true,
            stdout: output,
            stderr: output,
            logs: false,
            detach_keys: None,
        };
        self.docker()?
            .attach_container(key.as_str(), Some(options))
            .await
            .map_err(|e| DockerError::from_bollard("attach", e))
    }
}

/// Follows the engine: reconcile from a labelled list, then its event stream; on a drop,
/// `unavailable` (live workers `unknown`) and reconnect with backoff and jitter.
async fn follow_engine(inner: Weak<Inner>) {
    if inner.upgrade().is_some_and(|i| i.swarm()) {
        return swarm::follow_swarm(inner).await;
    }
    let mut backoff = BACKOFF_FIRST;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        // Events from a second before the list on: nothing between list and stream is
        // missed, and what comes twice is harmless.
        let since = (now().unix_timestamp() - 1).to_string();
        match reconcile(&strong).await {
            Ok(()) => {
                backoff = BACKOFF_FIRST;
                let mut st = strong.lock();
                strong.set_health(&mut st, SourceHealth::ready());
            }
            Err(e) => {
                tracing::debug!(error = %e, "the container engine does not answer");
                let retry = backoff_with_jitter(backoff);
                lose_contact(&strong, retry);
                drop(strong);
                tokio::time::sleep(retry).await;
                backoff = (backoff * 2).min(BACKOFF_CAP);
                continue;
            }
        }
        let Ok(docker) = strong.docker() else {
            drop(strong);
            tokio::time::sleep(backoff_with_jitter(backoff)).await;
            continue;
        };
        let mut filters = strong.label_filter();
        filters.insert("type".into(), vec!["container".into()]);
        let mut events = Box::pin(docker.events(Some(EventsOptions {
            since: Some(since),
            until: None,
            filters: Some(filters),
        })));
        drop(strong);
        loop {
            let Some(item) = events.next().await else {
                break;
            };
            let Some(strong) = inner.upgrade() else {
                return;
            };
            match item {
                Ok(message) => on_event(&strong, message),
                Err(e) => {
                    tracing::debug!(error = %e, "the engine's event stream broke off");
                    break;
                }
            }
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let retry = backoff_with_jitter(backoff);
        lose_contact(&strong, retry);
        drop(strong);
        tokio::time::sleep(retry).await;
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

fn backoff_with_jitter(base: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let frac = u16::from_le_bytes(b) as f64 / u16::MAX as f64;
    base.mul_f64(0.5 + frac / 2.0)
}

/// The engine is out of reach: the runtime is `unavailable`, live workers `unknown`.
fn lose_contact(inner: &Arc<Inner>, retry: Duration) {
    lose_contact_with(inner, retry, "the container engine does not answer");
}

/// [`lose_contact`], with the health message `message` (fixed text: it names nothing).
fn lose_contact_with(inner: &Arc<Inner>, retry: Duration, message: &str) {
    let mut st = inner.lock();
    if st.shutting_down {
        return;
    }
    let retry_at = now() + retry;
    inner.set_health(&mut st, SourceHealth::unavailable(message, Some(retry_at)));
    let keys: Vec<SourceKey> = st
        .workers
        .iter()
        .filter(|(_, w)| !w.view.state.is_terminal() && w.view.state != WorkerState::Unknown)
        .map(|(k, _)| k.clone())
        .collect();
    for key in keys {
        if let Some(w) = st.workers.get_mut(&key) {
            w.before_unknown = Some(w.view.state);
            w.view.state = WorkerState::Unknown;
            w.view.last_seen_at = Some(now());
        }
        inner.upsert(&mut st, &key);
    }
}

fn on_event(inner: &Arc<Inner>, message: bollard::models::EventMessage) {
    let Some(id) = message.actor.and_then(|a| a.id) else {
        return;
    };
    let key = SourceKey::new(id);
    match message.action.as_deref() {
        Some("start") => {
            let mut st = inner.lock();
            if let Some(w) = st.workers.get_mut(&key) {
                if w.view.state == WorkerState::Starting {
                    w.view.state = if w.stop_requested {
                        WorkerState::Stopping
                    } else {
                        WorkerState::Running
                    };
                    w.view.started_at.get_or_insert_with(now);
                    inner.upsert(&mut st, &key);
                }
            }
        }
        Some("die") => inner.finish_later(key),
        Some("destroy") => {
            let mut st = inner.lock();
            let Some(w) = st.workers.get(&key) else {
                return;
            };
            if w.view.state.is_terminal() {
                // Removed from outside after it ended: the record goes too.
                inner.forget(&mut st, &key);
            } else {
                drop(st);
                inner.end_lost(&key);
            }
        }
        _ => {}
    }
}

/// Makes the records agree with the engine's labelled list, and sends every stream a
/// `Resync`.
async fn reconcile(inner: &Arc<Inner>) -> Result<(), DockerError> {
    let epoch = inner.lock().epoch;
    let list = inner
        .docker()?
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(inner.label_filter()),
            ..Default::default()
        }))
        .await
        .map_err(|e| DockerError::from_bollard("list", e))?;
    let mut seen = HashSet::new();
    for summary in list {
        let Some(id) = summary.id else { continue };
        let key = SourceKey::new(id);
        seen.insert(key.clone());
        let facts = match inner.inspect(&key).await {
            Ok(f) => f,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        let known = inner.lock().workers.contains_key(&key);
        if known {
            refresh(inner, &key, &facts);
        } else {
            adopt(inner, key, facts).await;
        }
    }
    let mut st = inner.lock();
    let gone: Vec<SourceKey> = st
        .workers
        .iter()
        .filter(|(k, w)| !seen.contains(*k) && w.recorded_at <= epoch)
        .map(|(k, _)| k.clone())
        .collect();
    for key in gone {
        let terminal = st
            .workers
            .get(&key)
            .is_some_and(|w| w.view.state.is_terminal());
        if terminal {
            inner.forget(&mut st, &key);
        } else {
            drop(st);
            inner.end_lost(&key);
            st = inner.lock();
        }
    }
    let truth = SourceEvent::Resync(Inner::views(&st));
    inner.emit(&mut st, truth);
    Ok(())
}

/// A known worker's container, seen again after a reconnect.
fn refresh(inner: &Arc<Inner>, key: &SourceKey, facts: &Facts) {
    let mut st = inner.lock();
    let Some(w) = st.workers.get_mut(key) else {
        return;
    };
    if w.view.state.is_terminal() {
        return;
    }
    let was = w.before_unknown.take();
    match facts.phase {
        Phase::Ended => {
            if let Some(was) = was {
                w.view.state = was;
            }
            drop(st);
            inner.finish_later(key.clone());
        }
        Phase::Running | Phase::Created => {
            if w.view.state == WorkerState::Unknown {
                w.view.state = was.unwrap_or(WorkerState::Running);
                w.view.last_seen_at = None;
                inner.upsert(&mut st, key);
            }
        }
    }
}

/// A container of this runtime that no record holds: made before a restart of `roster`.
async fn adopt(inner: &Arc<Inner>, key: SourceKey, facts: Facts) {
    let Some(meta) = facts
        .labels
        .get(LABEL_WORKER)
        .and_then(|text| serde_json::from_str::<Meta>(text).ok())
    else {
        tracing::warn!("a container of this runtime has no readable worker label; left alone");
        return;
    };
    if inner.lock().spawning.contains(&meta.nonce) {
        return;
    }
    let log = OutputLog::new(meta.retention);
    let (drained_tx, drained) = watch::channel(false);
    let running = facts.phase == Phase::Running;
    let Ok(docker) = inner.docker() else {
        return;
    };
    // Output again from the engine's log, from the start.
    let logs = docker.logs(
        key.as_str(),
        Some(LogsOptions {
            follow: running,
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    tokio::spawn(pump(Box::pin(logs), Arc::clone(&log), drained_tx, None));
    let stdin = if running {
        inner.attach(&key, false).await.ok().map(|a| a.input)
    } else {
        None
    };
    let mut st = inner.lock();
    if st.workers.contains_key(&key) {
        return;
    }
    st.epoch += 1;
    let state = match facts.phase {
        Phase::Running => WorkerState::Running,
        Phase::Created => WorkerState::Starting,
        Phase::Ended => WorkerState::Running,
    };
    let mut w = new_worker(key.clone(), &meta, state, log, drained, st.epoch);
    w.view.started_at = facts.started_at;
    if let Some(stdin) = stdin {
        w.input = Some(input_channel(stdin, Arc::clone(&w.queued)));
    }
    if let (Some(rid), Some(hash)) = (&meta.request_id, &meta.request_hash) {
        st.requests
            .insert(rid.clone(), (hash.clone(), Some(key.clone())));
    }
    st.workers.insert(key.clone(), w);
    match facts.phase {
        Phase::Ended => {
            drop(st);
            inner.finish_later(key);
        }
        Phase::Created => {
            // Made, never started: the `roster` that made it died in between.
            let mut f = facts.clone();
            f.start_error.get_or_insert_with(|| "never started".into());
            drop(st);
            inner.end_with(&key, &f);
        }
        Phase::Running => inner.upsert(&mut st, &key),
    }
}

impl Inner {
    async fn spawn(self: &Arc<Self>, req: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        if req.asks_for_restart() {
            // A restart would be a new container; the engine's own restart policy is off.
            return Err(RegistryError::Unsupported(
                "this runtime does not restart workers".into(),
            ));
        }
        req.validate()?;
        if self.swarm() && req.stdin.is_some() {
            return Err(RegistryError::Unsupported(
                "a swarm runtime's workers take no input".into(),
            ));
        }
        let (plan, retention, grace) = self.plan(&req)?;
        let hash = request_hash(&req);
        let nonce = fresh_nonce();
        {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(RegistryError::unavailable(
                    "the runtime is shutting down",
                    None,
                ));
            }
            if let Some(rid) = &req.request_id {
                if let Some((known, key)) = st.requests.get(rid) {
                    if *known != hash {
                        return Err(RegistryError::Conflict(
                            "this request_id was used for another request".into(),
                        ));
                    }
                    return match key.as_ref().and_then(|k| st.workers.get(k)) {
                        Some(w) => Ok(w.view.clone()),
                        None => Err(RegistryError::Conflict(
                            "a spawn with this request_id is under way".into(),
                        )),
                    };
                }
            }
            if Self::live_count(&st) + st.spawning.len() >= self.config.max_workers {
                return Err(RegistryError::CapacityExceeded(format!(
                    "this runtime runs at most {} workers at once",
                    self.config.max_workers
                )));
            }
            if let Some(rid) = &req.request_id {
                st.requests.insert(rid.clone(), (hash.clone(), None));
            }
            st.spawning.insert(nonce.clone());
        }
        let result = self
            .create_and_start(&req, plan, retention, grace, &hash, &nonce)
            .await;
        let mut st = self.lock();
        st.spawning.remove(&nonce);
        if let Some(rid) = &req.request_id {
            match &result {
                Ok(w) => {
                    st.requests.insert(rid.clone(), (hash, Some(w.key.clone())));
                }
                Err(_) => {
                    st.requests.remove(rid);
                }
            }
        }
        result
    }

    async fn create_and_start(
        self: &Arc<Self>,
        req: &SpawnRequest,
        plan: Plan,
        retention: Option<u64>,
        grace: Option<Duration>,
        hash: &str,
        nonce: &str,
    ) -> Result<SourceWorker, RegistryError> {
        let grace = grace.unwrap_or(self.config.grace).min(limits::MAX_GRACE);
        let meta = Meta {
            name: req.name.clone(),
            labels: req.labels.clone(),
            profile: req.profile.clone(),
            args: req.args.clone(),
            command: req.command.clone(),
            created_at: now(),
            request_id: req.request_id.clone(),
            request_hash: req.request_id.as_ref().map(|_| hash.to_string()),
            retention: retention.unwrap_or(self.config.output_retention),
            grace_ms: grace.as_millis().min(u64::MAX as u128) as u64,
            nonce: nonce.to_string(),
        };
        if self.swarm() {
            return self.create_service(plan, meta, grace).await;
        }
        let body = plan.create_body(&self.runtime, &self.instance, &meta);
        let created = self
            .docker()?
            .create_container(None, body)
            .await
            .map_err(|e| DockerError::from_bollard("create", e))
            .map_err(|e| {
                if e.is_not_found() {
                    tracing::warn!(error = %e, "a worker's image is not on the engine");
                    RegistryError::InvalidRequest(
                        "the image of this profile is not on the container engine (it is never \
                         pulled)"
                            .into(),
                    )
                } else {
                    e.into()
                }
            })?;
        let key = SourceKey::new(created.id);
        let log = OutputLog::new(meta.retention);
        let (drained_tx, drained) = watch::channel(false);
        {
            let mut st = self.lock();
            st.epoch += 1;
            let w = new_worker(
                key.clone(),
                &meta,
                WorkerState::Starting,
                Arc::clone(&log),
                drained,
                st.epoch,
            );
            st.workers.insert(key.clone(), w);
            self.upsert(&mut st, &key);
        }
        // Attach before start, so no output is missed and stdin is there from the start.
        let attached = match self.attach(&key, true).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "attaching to a new container failed");
                let _ = drained_tx.send(true);
                return Ok(self.fail_spawn(&key));
            }
        };
        tokio::spawn(pump(attached.output, Arc::clone(&log), drained_tx, None));
        {
            let mut st = self.lock();
            if let Some(w) = st.workers.get_mut(&key) {
                let tx = input_channel(attached.input, Arc::clone(&w.queued));
                if let Some(text) = &req.stdin {
                    let data = Bytes::from(text.as_bytes().to_vec());
                    w.queued.fetch_add(data.len(), Ordering::Relaxed);
                    let _ = tx.try_send(data);
                }
                w.input = Some(tx);
            }
        }
        if let Err(e) = self.docker()?.start_container(key.as_str(), None).await {
            let e = DockerError::from_bollard("start", e);
            tracing::info!(error = %e, "a worker's container did not start");
            return Ok(self.fail_spawn(&key));
        }
        let (view, stop) = {
            let mut st = self.lock();
            let Some(w) = st.workers.get_mut(&key) else {
                return Err(not_found());
            };
            let stop = w.stop_requested;
            if w.view.state == WorkerState::Starting {
                w.view.state = WorkerState::Running;
                w.view.started_at.get_or_insert_with(now);
                self.upsert(&mut st, &key);
            }
            let view = st
                .workers
                .get(&key)
                .map(|w| w.view.clone())
                .ok_or_else(not_found)?;
            (view, stop)
        };
        if stop {
            // Stopped while it was being set up: it never gets a grace.
            let _ = self.kill(&key, "SIGKILL").await;
        }
        Ok(view)
    }

    fn fail_spawn(self: &Arc<Self>, key: &SourceKey) -> SourceWorker {
        let mut st = self.lock();
        if let Some(w) = st.workers.get_mut(key) {
            if !w.view.state.is_terminal() {
                w.view.state = WorkerState::Failed;
                w.view.reason = Some(FailReason::SpawnFailed);
                w.view.ended_at = Some(now());
                self.close_worker(&mut st, key);
            }
        }
        st.workers
            .get(key)
            .map(|w| w.view.clone())
            .expect("the record was just made")
    }

    async fn stop(
        self: &Arc<Self>,
        key: &SourceKey,
        grace: Option<Duration>,
    ) -> Result<(), RegistryError> {
        let (term, at) = {
            let mut st = self.lock();
            let w = st.workers.get_mut(key).ok_or_else(not_found)?;
            if w.view.state.is_terminal() {
                return Ok(());
            }
            let grace = grace.unwrap_or(w.grace).min(limits::MAX_GRACE);
            let at = tokio::time::Instant::now() + grace;
            if w.stop_requested {
                // A shorter grace brings the kill forward.
                if w.kill_at.is_some_and(|due| at < due) {
                    self.schedule_kill(w, at);
                }
                return Ok(());
            }
            w.stop_requested = true;
            let starting = w.view.state == WorkerState::Starting;
            if w.view.state != WorkerState::Unknown {
                w.view.state = WorkerState::Stopping;
            }
            self.upsert(&mut st, key);
            if self.swarm() {
                (false, at)
            } else if starting {
                // The spawn kills it once it has started.
                return Ok(());
            } else {
                (grace > Duration::ZERO, at)
            }
        };
        if self.swarm() {
            // The engine stops the task with the grace the service was made with.
            return Ok(self.scale_to_zero(key).await?);
        }
        if term {
            self.kill(key, "SIGTERM").await?;
            let mut st = self.lock();
            if let Some(w) = st.workers.get_mut(key) {
                if !w.view.state.is_terminal() && w.kill_task.is_none() {
                    self.schedule_kill(w, at);
                }
            }
        } else {
            self.kill(key, "SIGKILL").await?;
        }
        Ok(())
    }

    async fn shutdown(self: &Arc<Self>, grace: Option<Duration>) {
        let live: Vec<SourceKey> = {
            let mut st = self.lock();
            st.shutting_down = true;
            st.workers
                .values()
                .filter(|w| !w.view.state.is_terminal())
                .map(|w| w.view.key.clone())
                .collect()
        };
        let mut longest = Duration::ZERO;
        for key in &live {
            let g = grace.unwrap_or_else(|| {
                self.lock()
                    .workers
                    .get(key)
                    .map_or(self.config.grace, |w| w.grace)
            });
            longest = longest.max(g);
            if let Err(e) = self.stop(key, Some(g)).await {
                tracing::warn!(error = %e, "stopping a worker at shutdown failed");
            }
        }
        // Every live one ends within its grace and a little; an engine out of reach gets
        // no longer than that.
        let deadline = tokio::time::Instant::now() + longest + Duration::from_secs(15);
        loop {
            let left = {
                let st = self.lock();
                live.iter()
                    .filter(|k| {
                        st.workers
                            .get(k)
                            .is_some_and(|w| !w.view.state.is_terminal())
                    })
                    .count()
            };
            if left == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut st = self.lock();
        for w in st.workers.values() {
            w.log.close();
        }
        st.subs.clear();
    }
}

#[async_trait]
impl RuntimeSource for DockerSource {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            restart: false,
            // A swarm task may run on another machine: there is no stdin to attach to.
            input: !self.inner.swarm(),
            ..Capabilities::ALL
        }
    }

    async fn health(&self) -> SourceHealth {
        self.inner.lock().health.clone()
    }

    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        Ok(Inner::views(&self.inner.lock()))
    }

    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        self.inner
            .lock()
            .workers
            .get(key)
            .map(|w| w.view.clone())
            .ok_or_else(not_found)
    }

    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        self.inner.spawn(request).await
    }

    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError> {
        self.inner.stop(key, grace).await
    }

    async fn input(&self, key: &SourceKey, data: Bytes) -> Result<(), RegistryError> {
        if self.inner.swarm() {
            return Err(RegistryError::Unsupported(
                "a swarm runtime's workers take no input".into(),
            ));
        }
        let st = self.inner.lock();
        let w = st.workers.get(key).ok_or_else(not_found)?;
        let tx = match (&w.input, w.view.state.is_terminal()) {
            (Some(tx), false) => tx,
            _ => {
                return Err(RegistryError::Conflict(
                    "the worker no longer takes input".into(),
                ))
            }
        };
        if data.is_empty() {
            return Ok(());
        }
        if w.queued.load(Ordering::Relaxed) + data.len() > MAX_INPUT_QUEUED {
            return Err(RegistryError::CapacityExceeded(
                "the worker's input queue is full".into(),
            ));
        }
        let len = data.len();
        match tx.try_send(data) {
            Ok(()) => {
                w.queued.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(RegistryError::CapacityExceeded(
                "the worker's input queue is full".into(),
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(RegistryError::Conflict(
                "the worker no longer takes input".into(),
            )),
        }
    }

    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError> {
        self.inner.remove_record(key).await
    }

    async fn events(&self) -> Result<SourceEvents, RegistryError> {
        let mut st = self.inner.lock();
        let first = vec![
            SourceEvent::Resync(Inner::views(&st)),
            SourceEvent::Health(st.health.clone()),
        ];
        Ok(st.subs.subscribe(first))
    }

    async fn output(
        &self,
        key: &SourceKey,
        request: registry_core::OutputRequest,
    ) -> Result<registry_core::OutputStream, RegistryError> {
        let log = {
            let st = self.inner.lock();
            Arc::clone(&st.workers.get(key).ok_or_else(not_found)?.log)
        };
        log.stream(request)
    }

    async fn shutdown(&self, grace: Option<Duration>) {
        self.inner.shutdown(grace).await;
        self.follower.abort();
    }
}
