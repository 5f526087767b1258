//! The `RuntimeSource` impl: workers as batch jobs of one Slurm cluster, through
//! slurmrestd.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use registry_core::fanout::Subscribers;
use registry_core::output_log::{OutputLog, OutputWriter};
use registry_core::{
    limits, ArgsRule, Capabilities, ConfigError, FailReason, HealthStatus, OutputRequest,
    OutputStream, ProfileView, RegistryError, RuntimeSource, SourceEvent, SourceEvents,
    SourceHealth, SourceKey, SourceWorker, SpawnRequest, StreamKind, WorkerState,
};
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::api::{Api, Job};
use crate::config::SlurmConfig;
use crate::error::SlurmError;
use crate::job::{self, command_script, end_of, output_files, phase, End, Meta, Phase, Plan};

/// Events each lifecycle stream holds before it is owed a `Resync`.
const EVENTS_CAPACITY: usize = 64;
/// How often a live job's output files are read for new bytes.
const TAIL_INTERVAL: Duration = Duration::from_millis(200);
/// The most bytes read from one output file at a time.
const TAIL_READ: usize = 256 << 10;
/// A line of stderr held back while it may still turn out to be one of slurmstepd's.
const MAX_HELD_LINE: usize = 4096;
/// Backoff while the cluster is out of reach: first wait and cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How often a cancel that could not be sent is tried again.
const CANCEL_RETRY: Duration = Duration::from_secs(1);
/// Files in the runtime's state directory: the instance id, and one record per job.
const INSTANCE_FILE: &str = "slurm-instance";
const JOBS_DIR: &str = "slurm-jobs";
/// `PATH` of a job whose profile gives none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A `slurm` runtime's source: each worker is a batch job submitted through slurmrestd.
/// See the crate docs for how a worker maps to a job.
///
/// `Debug` shows the runtime and counts; never the URL, a job id, a node or a path.
pub struct SlurmSource {
    inner: Arc<Inner>,
    poller: AbortHandle,
}

struct Inner {
    runtime: String,
    /// Every job of this runtime is named `<prefix><nonce>`.
    prefix: String,
    config: SlurmConfig,
    output_dir: PathBuf,
    jobs_dir: PathBuf,
    api: Api,
    state: Mutex<State>,
}

struct State {
    workers: BTreeMap<SourceKey, Worker>,
    subs: Subscribers,
    health: SourceHealth,
    /// request_id → (the request's hash, the worker it made; `None` while under way).
    requests: HashMap<String, (String, Option<SourceKey>)>,
    /// Job names of submissions under way: the list may show them before they are
    /// recorded.
    spawning: HashSet<String>,
    /// Job ids of this runtime's prefix that are not to be taken up: removed records
    /// whose jobs the controller still lists, jobs without a record file. Only ids the
    /// last list held are kept.
    ignored: HashSet<String>,
    /// Bumped whenever a worker is recorded; a list taken before ignores later records.
    epoch: u64,
    shutting_down: bool,
}

struct Worker {
    view: SourceWorker,
    job_name: String,
    log: Arc<OutputLog>,
    /// Tells the worker's output task how the job ended; it ends the worker once the
    /// output files are read to their end.
    ended: watch::Sender<Option<End>>,
    tail: AbortHandle,
    grace: Duration,
    stop_requested: bool,
    kill_at: Option<tokio::time::Instant>,
    kill_task: Option<AbortHandle>,
    /// The job's end is known; the output task is reading the rest.
    finishing: bool,
    /// The state before the cluster went out of reach (while `unknown`).
    before_unknown: Option<WorkerState>,
    recorded_at: u64,
    request_id: Option<String>,
}

impl fmt::Debug for SlurmSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("SlurmSource")
            .field("runtime", &self.inner.runtime)
            .field("workers", &st.workers.len())
            .field("health", &st.health.status)
            .finish_non_exhaustive()
    }
}

impl Drop for SlurmSource {
    fn drop(&mut self) {
        // The jobs keep running; a source built later on the same state directory takes
        // them up again by their names.
        self.poller.abort();
        let st = self.inner.lock();
        for w in st.workers.values() {
            w.tail.abort();
            if let Some(k) = &w.kill_task {
                k.abort();
            }
        }
    }
}

impl SlurmSource {
    /// A source for runtime `runtime` over the cluster behind `config.url`, keeping its
    /// records in `state_dir`. Checks the config, reads the token, and starts polling; call
    /// it inside a tokio runtime. Does not wait for the cluster: until it answers the
    /// runtime is `unavailable`.
    pub fn with_runtime(
        runtime: &str,
        config: SlurmConfig,
        state_dir: impl AsRef<Path>,
    ) -> Result<Self, ConfigError> {
        let resolved = config.check(runtime)?;
        let state_dir = state_dir.as_ref();
        let fail = |what: &str, e: std::io::Error| {
            ConfigError::new(runtime, format!("cannot create {what} ({})", e.kind()))
        };
        std::fs::create_dir_all(&resolved.output_dir)
            .map_err(|e| fail("`output_dir`", e).at("output_dir"))?;
        let jobs_dir = state_dir.join(JOBS_DIR);
        std::fs::create_dir_all(&jobs_dir).map_err(|e| fail("the state directory", e))?;
        let instance = instance_id(state_dir).map_err(|e| fail("the instance file", e))?;
        let api = Api::new(&config, resolved.endpoint, resolved.token);
        let inner = Arc::new(Inner {
            runtime: runtime.to_string(),
            prefix: format!("roster-{runtime}-{instance}-"),
            output_dir: resolved.output_dir,
            jobs_dir,
            api,
            config,
            state: Mutex::new(State {
                workers: BTreeMap::new(),
                subs: Subscribers::new(EVENTS_CAPACITY),
                health: SourceHealth::unavailable("the cluster has not answered yet", None),
                requests: HashMap::new(),
                spawning: HashSet::new(),
                ignored: HashSet::new(),
                epoch: 0,
                shutting_down: false,
            }),
        });
        let poller = tokio::spawn(poll(Arc::downgrade(&inner))).abort_handle();
        Ok(SlurmSource { inner, poller })
    }

    /// How many unread lifecycle events make a stream owed a `Resync`.
    pub fn events_to_overflow(&self) -> usize {
        EVENTS_CAPACITY
    }

    /// Waits until the cluster has answered (the runtime is `ready`), for at most `limit`.
    /// Returns whether it has.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.inner.lock().health.status != HealthStatus::Ready {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// The runtime's instance id: 16 hex digits made once and kept in the state directory, so
/// that a restarted `roster` finds its jobs and two registries on one cluster never take
/// each other's.
fn instance_id(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join(INSTANCE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text)
            if text.trim().len() == 16 && text.trim().bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            return Ok(text.trim().to_string())
        }
        _ => {}
    }
    let id = random_hex(8);
    std::fs::write(&path, &id)?;
    Ok(id)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        // Never the case on Linux; the time still tells runs apart.
        let t = OffsetDateTime::now_utc().unix_timestamp_nanos() as u128;
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (t >> ((i % 16) * 8)) as u8);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable digest of a request (without its `request_id`), to tell a repeat from another
/// request under the same id.
fn digest(req: &SpawnRequest) -> String {
    let mut copy = req.clone();
    copy.request_id = None;
    blake3::hash(&serde_json::to_vec(&copy).expect("a request serializes"))
        .to_hex()
        .to_string()
}

fn not_found() -> RegistryError {
    RegistryError::WorkerNotFound("no such worker".into())
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Delays of the reconnect loop: doubling from [`BACKOFF_FIRST`] to [`BACKOFF_CAP`], each
/// drawn from its upper half so that many runtimes do not retry in step.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let ceiling = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_CAP);
        let mut b = [0u8; 2];
        let _ = getrandom::fill(&mut b);
        let share = 0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0;
        ceiling.mul_f64(share)
    }
}

/// The poll loop: one list request per interval; while the cluster is out of reach,
/// backoff, the runtime `unavailable` and its live workers `unknown`.
async fn poll(weak: Weak<Inner>) {
    let mut backoff = Backoff(BACKOFF_FIRST);
    let mut version_checked = false;
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let result = async {
            if !version_checked {
                inner.api.ping().await?;
                version_checked = true;
            }
            let epoch = inner.lock().epoch;
            Ok::<_, SlurmError>((epoch, inner.api.jobs().await?))
        }
        .await;
        let delay = match result {
            Ok((epoch, jobs)) => {
                backoff = Backoff(BACKOFF_FIRST);
                inner.reconcile(epoch, jobs).await;
                inner.config.poll_interval
            }
            Err(e) => {
                tracing::info!(runtime = %inner.runtime, error = %e, "the Slurm cluster does not answer");
                if matches!(e, SlurmError::Unauthorized { .. }) {
                    match inner.config.token() {
                        Ok(token) => inner.api.set_token(token),
                        Err(m) => tracing::warn!(runtime = %inner.runtime, "{m}"),
                    }
                }
                // The cluster may come back upgraded: its version is checked again.
                version_checked = false;
                let delay = backoff.next();
                inner.outage(&e, delay);
                delay
            }
        };
        drop(inner);
        tokio::time::sleep(delay).await;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn views(st: &State) -> Vec<SourceWorker> {
        st.workers.values().map(|w| w.view.clone()).collect()
    }

    /// Sends `event` to every lifecycle stream; one that overflows is repaid with the
    /// whole truth once it has room.
    fn emit(self: &Arc<Self>, st: &mut State, event: SourceEvent) {
        for owed in st.subs.send(&event) {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                let Some(owed) = owed.ready().await else {
                    return;
                };
                if let Some(inner) = weak.upgrade() {
                    let mut st = inner.lock();
                    let truth = vec![
                        SourceEvent::Resync(Inner::views(&st)),
                        SourceEvent::Health(st.health.clone()),
                    ];
                    st.subs.repay(owed, truth);
                }
            });
        }
    }

    fn changed(self: &Arc<Self>, st: &mut State, key: &SourceKey) {
        if let Some(view) = st.workers.get(key).map(|w| w.view.clone()) {
            self.emit(st, SourceEvent::Upsert(view));
        }
    }

    fn set_health(self: &Arc<Self>, st: &mut State, health: SourceHealth) {
        if st.health != health {
            st.health = health.clone();
            self.emit(st, SourceEvent::Health(health));
        }
    }

    fn record_path(&self, job_name: &str) -> PathBuf {
        self.jobs_dir.join(format!("{job_name}.json"))
    }

    /// The cluster is out of reach: the runtime `unavailable` until `delay` has passed,
    /// live workers `unknown`.
    fn outage(self: &Arc<Self>, error: &SlurmError, delay: Duration) {
        let mut st = self.lock();
        let retry_at = now() + delay;
        let message = error.health_message(&self.config.api_version);
        self.set_health(&mut st, SourceHealth::unavailable(message, Some(retry_at)));
        let live: Vec<SourceKey> = st
            .workers
            .iter()
            .filter(|(_, w)| !w.view.state.is_terminal() && w.view.state != WorkerState::Unknown)
            .map(|(k, _)| k.clone())
            .collect();
        for key in live {
            let w = st.workers.get_mut(&key).expect("listed above");
            w.before_unknown = Some(w.view.state);
            w.view.state = WorkerState::Unknown;
            w.view.last_seen_at = Some(now());
            self.changed(&mut st, &key);
        }
    }

    /// Takes a fresh job list (taken when the epoch was `epoch`): health back to ready,
    /// every worker's state from its job, jobs of this runtime not known yet taken up, and
    /// live workers whose job is gone `failed`, `lost`.
    async fn reconcile(self: &Arc<Self>, epoch: u64, jobs: Vec<Job>) {
        let ours: HashMap<String, Job> = jobs
            .into_iter()
            .filter(|j| j.name.starts_with(&self.prefix))
            .map(|j| (j.job_id.to_string(), j))
            .collect();
        let candidates: Vec<(String, String)> = {
            let mut st = self.lock();
            st.ignored.retain(|id| ours.contains_key(id));
            ours.iter()
                .filter(|(id, j)| {
                    !st.workers.contains_key(&SourceKey::new(id.as_str()))
                        && !st.ignored.contains(*id)
                        && !st.spawning.contains(&j.name)
                })
                .map(|(id, j)| (id.clone(), j.name.clone()))
                .collect()
        };
        let mut found = Vec::new();
        for (id, name) in candidates {
            let meta = tokio::fs::read(self.record_path(&name))
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
            found.push((id, name, meta));
        }
        let mut st = self.lock();
        self.set_health(&mut st, SourceHealth::ready());
        for (id, name, meta) in found {
            let key = SourceKey::new(id.as_str());
            if st.workers.contains_key(&key) || st.spawning.contains(&name) {
                continue;
            }
            match meta {
                Some(meta) => self.take_up(&mut st, key, name, meta),
                None => {
                    // No record: removed, or made by a registry whose state is gone.
                    st.ignored.insert(id);
                }
            }
        }
        let keys: Vec<SourceKey> = st.workers.keys().cloned().collect();
        for key in keys {
            match ours.get(key.as_str()) {
                Some(job) => self.apply(&mut st, &key, job),
                None => {
                    let w = st.workers.get_mut(&key).expect("listed above");
                    if w.recorded_at <= epoch && !w.view.state.is_terminal() && !w.finishing {
                        // The controller forgot the job (purged after `MinJobAge`, or its
                        // state was lost): how it ended is not known.
                        w.finishing = true;
                        w.ended.send_replace(Some(End {
                            state: WorkerState::Failed,
                            exit_code: None,
                            reason: Some(FailReason::Lost),
                            message: Some("the cluster no longer knows the job".into()),
                            ended_at: None,
                        }));
                    }
                }
            }
        }
    }

    /// A worker's state from its job in the list.
    fn apply(self: &Arc<Self>, st: &mut State, key: &SourceKey, job: &Job) {
        let Some(w) = st.workers.get_mut(key) else {
            return;
        };
        if w.view.state.is_terminal() || w.finishing {
            return;
        }
        let before = w.view.state;
        let started = || job.start_time.filter(|t| *t > 0).and_then(job::unix);
        let next = match phase(&job.job_state) {
            Phase::Pending if w.stop_requested => WorkerState::Stopping,
            Phase::Pending => WorkerState::Starting,
            Phase::Running => {
                w.view.started_at = w.view.started_at.or_else(started).or_else(|| Some(now()));
                if w.stop_requested {
                    WorkerState::Stopping
                } else {
                    WorkerState::Running
                }
            }
            Phase::Ended => {
                w.view.started_at = w.view.started_at.or_else(started);
                w.finishing = true;
                w.ended.send_replace(Some(end_of(job, w.stop_requested)));
                // Until the output is read: the state it had, not `unknown`.
                match before {
                    WorkerState::Unknown => w.before_unknown.unwrap_or(WorkerState::Running),
                    s => s,
                }
            }
        };
        if next != before {
            w.view.state = next;
            w.before_unknown = None;
            w.view.last_seen_at = None;
            self.changed(st, key);
        }
    }

    /// Takes up a job of this runtime that this source has no record of yet (made before a
    /// restart of `roster`). Its output is read again from the files (at most the newest
    /// `retention` bytes of each).
    fn take_up(self: &Arc<Self>, st: &mut State, key: SourceKey, job_name: String, meta: Meta) {
        st.epoch += 1;
        let grace = Duration::from_millis(meta.grace_ms).min(limits::MAX_GRACE);
        let w = self.new_worker(key.clone(), job_name, &meta, grace, st.epoch, true);
        if let (Some(rid), Some(hash)) = (&meta.request_id, &meta.request_hash) {
            st.requests
                .insert(rid.clone(), (hash.clone(), Some(key.clone())));
        }
        st.workers.insert(key.clone(), w);
        self.changed(st, &key);
    }

    fn new_worker(
        self: &Arc<Self>,
        key: SourceKey,
        job_name: String,
        meta: &Meta,
        grace: Duration,
        recorded_at: u64,
        taken_up: bool,
    ) -> Worker {
        let log = OutputLog::new(meta.retention);
        let (ended, ended_rx) = watch::channel(None);
        let (out, err) = output_files(&self.output_dir, &job_name);
        let tail = tokio::spawn(follow_output(
            Arc::downgrade(self),
            key.clone(),
            [(out, StreamKind::Stdout), (err, StreamKind::Stderr)],
            Arc::clone(&log),
            ended_rx,
            taken_up.then_some(meta.retention),
        ))
        .abort_handle();
        Worker {
            view: SourceWorker {
                key,
                name: meta.name.clone(),
                labels: meta.labels.clone(),
                state: WorkerState::Starting,
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
                message: None,
                health: None,
            },
            job_name,
            log,
            ended,
            tail,
            grace,
            stop_requested: false,
            kill_at: None,
            kill_task: None,
            finishing: false,
            before_unknown: None,
            recorded_at,
            request_id: meta.request_id.clone(),
        }
    }

    /// Ends a worker whose output has been read to its end.
    fn finish(self: &Arc<Self>, key: &SourceKey, end: End) {
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(key) else {
            return;
        };
        if w.view.state.is_terminal() {
            return;
        }
        w.view.state = end.state;
        w.view.exit_code = end.exit_code;
        w.view.reason = end.reason;
        w.view.message = end.message;
        w.view.ended_at = Some(end.ended_at.unwrap_or_else(now));
        w.view.last_seen_at = None;
        w.finishing = false;
        w.log.finish();
        if let Some(task) = w.kill_task.take() {
            task.abort();
        }
        self.changed(&mut st, key);
        self.trim_finished(&mut st);
        let weak = Arc::downgrade(self);
        let key = key.clone();
        let after = self.config.retain_finished;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(inner) = weak.upgrade() {
                let _ = inner.remove_record(&key);
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
        let extra = ended.len() - self.config.max_finished;
        for (_, key) in ended.into_iter().take(extra) {
            self.forget(st, &key);
        }
    }

    /// Drops a terminal worker's record, its record file and its output files.
    fn forget(self: &Arc<Self>, st: &mut State, key: &SourceKey) {
        let Some(w) = st.workers.remove(key) else {
            return;
        };
        w.tail.abort();
        w.log.close();
        if let Some(rid) = &w.request_id {
            st.requests.remove(rid);
        }
        st.ignored.insert(key.as_str().to_string());
        let (out, err) = output_files(&self.output_dir, &w.job_name);
        let record = self.record_path(&w.job_name);
        tokio::spawn(async move {
            for path in [record, out, err] {
                let _ = tokio::fs::remove_file(path).await;
            }
        });
        self.emit(st, SourceEvent::Removed(key.clone()));
    }

    fn remove_record(self: &Arc<Self>, key: &SourceKey) -> Result<(), RegistryError> {
        let mut st = self.lock();
        let w = st.workers.get(key).ok_or_else(not_found)?;
        if !w.view.state.is_terminal() {
            return Err(RegistryError::Conflict(
                "the worker is still running; stop it first".into(),
            ));
        }
        self.forget(&mut st, key);
        Ok(())
    }

    /// What a request runs, checked against the config; with its retention and grace.
    fn plan(&self, req: &SpawnRequest) -> Result<(Plan, u64, Duration), RegistryError> {
        let mut env = BTreeMap::from([("PATH".to_string(), DEFAULT_PATH.to_string())]);
        let (script, profile) = match (&req.profile, &req.command) {
            (Some(name), _) => {
                let p = self.config.profiles.get(name).ok_or_else(|| {
                    RegistryError::InvalidRequest(format!("this runtime has no profile {name:?}"))
                })?;
                let script = match (&p.command, &p.script) {
                    (Some(cmd), _) => {
                        let mut argv = cmd.clone();
                        argv.extend(req.args.iter().cloned());
                        command_script(&argv)
                    }
                    (None, Some(s)) => job::script_with_args(s, &req.args),
                    (None, None) => unreachable!("the config check asks for one"),
                };
                (script, Some(p))
            }
            (None, Some(cmd)) => {
                if !self.config.allow_commands {
                    return Err(RegistryError::Forbidden(
                        "this runtime runs profiles only (`allow_commands` is off)".into(),
                    ));
                }
                let mut argv = cmd.clone();
                argv.extend(req.args.iter().cloned());
                (command_script(&argv), None)
            }
            (None, None) => {
                return Err(RegistryError::InvalidRequest(
                    "one of `profile` or `command` is required".into(),
                ))
            }
        };
        if let Some(p) = profile {
            env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        for (k, v) in req.env.iter() {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(RegistryError::InvalidRequest(
                    "`env`: a name must be non-empty without '=' or NUL, a value without NUL"
                        .into(),
                ));
            }
            env.insert(k.clone(), v.clone());
        }
        let plan = Plan {
            script,
            cwd: profile
                .and_then(|p| p.cwd.as_ref())
                .map_or_else(|| "/tmp".to_string(), |c| c.to_string_lossy().into_owned()),
            env,
            time_limit_min: profile
                .and_then(|p| p.time_limit)
                .map(|t| t.as_secs().div_ceil(60).max(1)),
            cpus: profile.and_then(|p| p.cpus),
            memory_mib: profile.and_then(|p| p.memory).map(|m| m.div_ceil(1 << 20)),
        };
        let retention = profile
            .and_then(|p| p.output_retention)
            .unwrap_or(self.config.output_retention);
        let grace = profile
            .and_then(|p| p.grace)
            .unwrap_or(self.config.grace)
            .min(limits::MAX_GRACE);
        Ok((plan, retention, grace))
    }

    async fn spawn(self: &Arc<Self>, req: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        if req.asks_for_restart() {
            return Err(RegistryError::Unsupported(
                "this runtime does not restart workers (a job that ended is not run again)".into(),
            ));
        }
        if req.stdin.is_some() {
            return Err(RegistryError::Unsupported(
                "this runtime takes no input: a Slurm job has no stdin roster can write to; \
                 leave out `stdin`"
                    .into(),
            ));
        }
        req.validate()?;
        let (plan, retention, grace) = self.plan(&req)?;
        let hash = digest(&req);
        let job_name = format!("{}{}", self.prefix, random_hex(6));
        {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(RegistryError::unavailable(
                    "the runtime is shutting down",
                    None,
                ));
            }
            if st.health.status == HealthStatus::Unavailable {
                let retry = st
                    .health
                    .retry_at
                    .map(|t| Duration::try_from(t - now()).unwrap_or(Duration::ZERO));
                return Err(RegistryError::unavailable(
                    st.health.message.clone().unwrap_or_default(),
                    Some(
                        retry
                            .unwrap_or(Duration::from_secs(1))
                            .max(Duration::from_secs(1)),
                    ),
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
            let live = st
                .workers
                .values()
                .filter(|w| !w.view.state.is_terminal())
                .count();
            if live + st.spawning.len() >= self.config.max_workers {
                return Err(RegistryError::CapacityExceeded(format!(
                    "this runtime runs at most {} workers at once",
                    self.config.max_workers
                )));
            }
            if let Some(rid) = &req.request_id {
                st.requests.insert(rid.clone(), (hash.clone(), None));
            }
            st.spawning.insert(job_name.clone());
        }
        let meta = Meta {
            name: req.name.clone(),
            labels: req.labels.clone(),
            profile: req.profile.clone(),
            args: req.args.clone(),
            command: req.command.clone(),
            created_at: now(),
            request_id: req.request_id.clone(),
            request_hash: req.request_id.as_ref().map(|_| hash.clone()),
            retention,
            grace_ms: grace.as_millis().min(u128::from(u64::MAX)) as u64,
        };
        let result = self.submit(&job_name, &plan, &meta).await;
        let mut st = self.lock();
        st.spawning.remove(&job_name);
        match result {
            Ok(job_id) => {
                let key = SourceKey::new(job_id.to_string());
                st.epoch += 1;
                let w = self.new_worker(key.clone(), job_name, &meta, grace, st.epoch, false);
                let view = w.view.clone();
                st.workers.insert(key.clone(), w);
                if let Some(rid) = &req.request_id {
                    st.requests.insert(rid.clone(), (hash, Some(key.clone())));
                }
                self.changed(&mut st, &key);
                Ok(view)
            }
            Err(e) => {
                if let Some(rid) = &req.request_id {
                    st.requests.remove(rid);
                }
                Err(e)
            }
        }
    }

    /// Writes the job's record file, then submits it; the record goes again if the submit
    /// fails.
    async fn submit(&self, job_name: &str, plan: &Plan, meta: &Meta) -> Result<u64, RegistryError> {
        let record = self.record_path(job_name);
        let text = serde_json::to_vec(meta).expect("a record serializes");
        tokio::fs::write(&record, text).await.map_err(|e| {
            RegistryError::internal(format!("writing a job's record file: {}", e.kind()))
        })?;
        let body = plan.submit_body(
            job_name,
            &self.output_dir,
            self.config.partition.as_deref(),
            self.config.account.as_deref(),
        );
        match self.api.submit(&body).await {
            Ok(id) => Ok(id),
            Err(e) => {
                let _ = tokio::fs::remove_file(&record).await;
                match e.refusal() {
                    Some(why) => {
                        tracing::info!(runtime = %self.runtime, error = %e, "Slurm refused a job");
                        Err(RegistryError::InvalidRequest(format!(
                            "Slurm refused the job: {why}"
                        )))
                    }
                    None => Err(e.into()),
                }
            }
        }
    }

    async fn stop(
        self: &Arc<Self>,
        key: &SourceKey,
        grace: Option<Duration>,
    ) -> Result<(), RegistryError> {
        let (job_id, grace, pending, before) = {
            let mut st = self.lock();
            let w = st.workers.get_mut(key).ok_or_else(not_found)?;
            if w.view.state.is_terminal() {
                return Ok(());
            }
            let grace = grace.unwrap_or(w.grace).min(limits::MAX_GRACE);
            let at = tokio::time::Instant::now() + grace;
            if w.stop_requested {
                // A shorter grace brings the cancel forward.
                if w.kill_at.is_some_and(|due| at < due) {
                    self.schedule_cancel(w, at);
                }
                return Ok(());
            }
            w.stop_requested = true;
            let before = w.view.state;
            let pending = before == WorkerState::Starting;
            if before != WorkerState::Unknown && !w.finishing {
                w.view.state = WorkerState::Stopping;
                self.changed(&mut st, key);
            }
            (key.as_str().to_string(), grace, pending, before)
        };
        // A pending job has no processes to signal; a zero grace is no grace.
        let sent = if pending || grace.is_zero() {
            self.api.kill(&job_id, None).await
        } else {
            match self.api.kill(&job_id, Some("SIGTERM")).await {
                Err(e) if !e.is_outage() => {
                    tracing::info!(error = %e, "signalling a job failed; cancelling it");
                    self.api.kill(&job_id, None).await
                }
                other => other,
            }
        };
        let mut st = self.lock();
        match sent {
            Ok(()) => {
                if let Some(w) = st.workers.get_mut(key) {
                    if !w.view.state.is_terminal() && w.kill_task.is_none() && !grace.is_zero() {
                        self.schedule_cancel(w, tokio::time::Instant::now() + grace);
                    }
                }
                Ok(())
            }
            Err(e) if e.is_outage() => {
                // Nothing was asked of the cluster: the worker is as it was.
                if let Some(w) = st.workers.get_mut(key) {
                    w.stop_requested = false;
                    if w.view.state == WorkerState::Stopping {
                        w.view.state = before;
                        self.changed(&mut st, key);
                    }
                }
                Err(e.into())
            }
            Err(e) => {
                // The job ended meanwhile (Slurm refuses to signal an ended job): the
                // next list says how.
                tracing::info!(error = %e, "cancelling a job failed");
                Ok(())
            }
        }
    }

    /// Cancels the worker's job at `at` (trying again while the cluster is out of reach).
    fn schedule_cancel(self: &Arc<Self>, w: &mut Worker, at: tokio::time::Instant) {
        if let Some(old) = w.kill_task.take() {
            old.abort();
        }
        w.kill_at = Some(at);
        let weak = Arc::downgrade(self);
        let key = w.view.key.clone();
        w.kill_task = Some(
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                loop {
                    let Some(inner) = weak.upgrade() else {
                        return;
                    };
                    let live = inner
                        .lock()
                        .workers
                        .get(&key)
                        .is_some_and(|w| !w.view.state.is_terminal());
                    if !live {
                        return;
                    }
                    match inner.api.kill(key.as_str(), None).await {
                        Err(e) if e.is_outage() => {}
                        _ => return,
                    }
                    drop(inner);
                    tokio::time::sleep(CANCEL_RETRY).await;
                }
            })
            .abort_handle(),
        );
    }

    async fn shutdown(self: &Arc<Self>, grace: Option<Duration>) {
        let live: Vec<(SourceKey, Duration)> = {
            let mut st = self.lock();
            st.shutting_down = true;
            st.workers
                .values()
                .filter(|w| !w.view.state.is_terminal())
                .map(|w| (w.view.key.clone(), grace.unwrap_or(w.grace)))
                .collect()
        };
        let mut longest = Duration::ZERO;
        for (key, g) in &live {
            longest = longest.max(*g);
            if let Err(e) = self.stop(key, Some(*g)).await {
                tracing::warn!(error = %e, "stopping a job at shutdown failed");
            }
        }
        // Every job ends within its grace, Slurm's KillWait and a poll or two; a cluster
        // out of reach gets no longer than that.
        let deadline = tokio::time::Instant::now()
            + longest
            + self.config.poll_interval * 3
            + Duration::from_secs(30);
        loop {
            let left = {
                let st = self.lock();
                live.iter()
                    .filter(|(k, _)| {
                        st.workers
                            .get(k)
                            .is_some_and(|w| !w.view.state.is_terminal())
                    })
                    .count()
            };
            if left == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut st = self.lock();
        for w in st.workers.values() {
            w.log.close();
            w.tail.abort();
        }
        st.subs.clear();
    }
}

/// One output file being followed into the log.
struct FollowedFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    writer: OutputWriter,
    /// stderr only: the start of a line not yet known to be the job's (slurmstepd writes
    /// its own lines, naming the job id and the node, into the job's stderr).
    held: Option<Vec<u8>>,
    buf: Vec<u8>,
}

impl FollowedFile {
    fn new(path: PathBuf, stream: StreamKind, log: &Arc<OutputLog>) -> Self {
        FollowedFile {
            path,
            file: None,
            writer: log.writer(stream),
            held: (stream == StreamKind::Stderr).then(Vec::new),
            buf: vec![0; TAIL_READ],
        }
    }

    /// Opens the file once it exists; with `keep`, skips to its newest `keep` bytes.
    async fn open(&mut self, keep: Option<u64>) -> bool {
        if self.file.is_some() {
            return true;
        }
        let Ok(mut file) = tokio::fs::File::open(&self.path).await else {
            return false;
        };
        if let Some(keep) = keep {
            if let Ok(meta) = file.metadata().await {
                use tokio::io::AsyncSeekExt;
                let skip = meta.len().saturating_sub(keep);
                if skip > 0 && file.seek(std::io::SeekFrom::Start(skip)).await.is_err() {
                    return false;
                }
            }
        }
        self.file = Some(file);
        true
    }

    /// Reads what is new (at most [`TAIL_READ`] bytes) into the log; the bytes read.
    async fn step(&mut self) -> usize {
        if !self.open(None).await {
            return 0;
        }
        let file = self.file.as_mut().expect("opened");
        let n = match file.read(&mut self.buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "reading a job's output file failed");
                0
            }
        };
        if n > 0 {
            let data = self.buf[..n].to_vec();
            self.take(&data);
        }
        n
    }

    fn take(&mut self, data: &[u8]) {
        let Some(held) = &mut self.held else {
            self.writer.write(data);
            return;
        };
        held.extend_from_slice(data);
        let mut out = Vec::with_capacity(held.len());
        let mut rest: &[u8] = held;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(i + 1);
            if !is_slurm_line(line) {
                out.extend_from_slice(line);
            }
            rest = tail;
        }
        // A partial line waits only while it may still become one of slurmstepd's.
        let keep = rest.len() <= MAX_HELD_LINE
            && (b"slurmstepd".starts_with(rest) || rest.starts_with(b"slurmstepd"));
        if !keep {
            out.extend_from_slice(rest);
            rest = &[];
        }
        let rest = rest.to_vec();
        *held = rest;
        if !out.is_empty() {
            self.writer.write(&out);
        }
    }

    fn flush(&mut self) {
        if let Some(held) = self.held.as_mut() {
            let rest = std::mem::take(held);
            if !rest.is_empty() && !is_slurm_line(&rest) {
                self.writer.write(&rest);
            }
        }
        self.writer.flush();
    }
}

/// A line slurmstepd wrote into a job's stderr ("slurmstepd-node: error: *** JOB 12 ON
/// node CANCELLED AT … ***"): it names the job id and the node, so it is not passed on.
fn is_slurm_line(line: &[u8]) -> bool {
    line.starts_with(b"slurmstepd-") || line.starts_with(b"slurmstepd:")
}

/// Follows a job's output files into its log until the job has ended and both are read to
/// their end; then ends the worker.
async fn follow_output(
    weak: Weak<Inner>,
    key: SourceKey,
    files: [(PathBuf, StreamKind); 2],
    log: Arc<OutputLog>,
    mut ended: watch::Receiver<Option<End>>,
    keep: Option<u64>,
) {
    let mut files = files.map(|(path, stream)| FollowedFile::new(path, stream, &log));
    if keep.is_some() {
        for f in &mut files {
            f.open(keep).await;
        }
    }
    loop {
        let end = ended.borrow_and_update().clone();
        let mut read = 0;
        for f in &mut files {
            read += f.step().await;
        }
        if let Some(end) = end {
            if read == 0 {
                for f in &mut files {
                    f.flush();
                }
                if let Some(inner) = weak.upgrade() {
                    inner.finish(&key, end);
                }
                return;
            }
            continue;
        }
        if read == 0 {
            tokio::select! {
                _ = tokio::time::sleep(TAIL_INTERVAL) => {}
                changed = ended.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl RuntimeSource for SlurmSource {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            input: false,
            restart: false,
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
        let _ = (key, data);
        Err(RegistryError::Unsupported(
            "this runtime takes no input: a Slurm job has no stdin roster can write to".into(),
        ))
    }

    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError> {
        self.inner.remove_record(key)
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
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        let log = {
            let st = self.inner.lock();
            Arc::clone(&st.workers.get(key).ok_or_else(not_found)?.log)
        };
        log.stream(request)
    }

    async fn profiles(&self) -> Result<Vec<ProfileView>, RegistryError> {
        let grace = self.inner.config.grace;
        Ok(self
            .inner
            .config
            .profiles
            .iter()
            .map(|(name, p)| ProfileView {
                name: name.clone(),
                description: p.description.clone(),
                accepts: ["args", "env", "name", "labels", "request_id"]
                    .map(String::from)
                    .to_vec(),
                args: ArgsRule::Appended,
                restart: None,
                grace_ms: Some(p.grace.unwrap_or(grace).as_millis() as u64),
                command: None,
            })
            .collect())
    }

    async fn shutdown(&self, grace: Option<Duration>) {
        self.inner.shutdown(grace).await;
        self.poller.abort();
    }
}
