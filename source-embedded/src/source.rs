//! `EmbeddedSource`: the registry's view of a worker runtime in this process.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use registry_core::{
    ArgsRule, Capabilities, Diagnostic, HealthStatus, LastExit, OutputChunk, OutputEvent,
    OutputRequest, OutputStream, ProfileView, RegistryError, RestartView, RuntimeSource,
    SourceConfig, SourceEvent, SourceEvents, SourceHealth, SourceKey, SourceWorker, SpawnRequest,
    WorkerHealth,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use worker_runtime::{
    EventReader, LocalId, OutputItem, OutputReader, Profile, Restart, Runtime, RuntimeEvent,
    WorkerInfo,
};

use crate::error::registry_error;
use crate::EmbeddedConfig;

/// Capacity of each lifecycle stream. A stream left unread loses track once this many events
/// wait in it and the runtime's event ring has moved past the rest; it then gets a `Resync`.
const EVENT_BUFFER: usize = 64;
/// Capacity of each output stream.
const OUTPUT_BUFFER: usize = 64;

/// A [`RuntimeSource`] over a [`worker_runtime::Runtime`] in the same process, driven by
/// direct calls.
///
/// Keys are `"{instance}:{local id}"`, where the instance is the runtime's random
/// [`instance_id`](Runtime::instance_id): a key never names a worker of another runtime
/// value, also across restarts. The source can do everything ([`Capabilities::ALL`]). It is
/// `ready` while the runtime's own machinery works, and `degraded` (with a message and a
/// diagnostic per problem) once its watchdog process or its spawner thread is gone. A
/// watchdog that died is started again by the runtime (spawns meanwhile are
/// `runtime_unavailable`, with a retry hint), and the runtime is `ready` again once it runs.
///
/// Create it inside a tokio runtime. Its streams are fed by tasks of their own, which end
/// when their reader is dropped, when the source is shut down, or when it is dropped.
pub struct EmbeddedSource {
    runtime: Runtime,
    /// Set to `true` by [`RuntimeSource::shutdown`]; dropped with the source. Stream tasks
    /// watch it.
    closing: watch::Sender<bool>,
}

impl EmbeddedSource {
    /// Starts a worker runtime with `config`. Fails with `invalid_request` for an invalid
    /// config (a profile with an empty command, an `event_retention` of 0) and `internal`
    /// outside a tokio runtime.
    pub fn new(config: EmbeddedConfig) -> Result<Self, RegistryError> {
        let runtime = Runtime::new(config).map_err(registry_error)?;
        let (closing, _) = watch::channel(false);
        Ok(EmbeddedSource { runtime, closing })
    }

    /// How many unread lifecycle events make a stream of this source lose track (after
    /// which it gets a fresh `Resync`): the stream's buffer plus the runtime's event ring. At
    /// most; fewer when the events are large enough for the ring's byte bound to evict first.
    pub fn events_to_overflow(&self) -> usize {
        EVENT_BUFFER + self.runtime.config().event_retention + 1
    }

    /// The pid of the runtime's watchdog process. For tests of the source's health only.
    #[doc(hidden)]
    pub fn watchdog_pid(&self) -> u32 {
        self.runtime.watchdog_pid()
    }

    fn keys(&self) -> Keys {
        Keys {
            instance: self.runtime.instance_id().to_string(),
        }
    }

    /// The local id behind `key`; `WorkerNotFound` for a key of another runtime value or
    /// one this source did not make.
    fn local_id(&self, key: &SourceKey) -> Result<LocalId, RegistryError> {
        let not_found = || RegistryError::WorkerNotFound("worker not found".into());
        let (instance, id) = key.as_str().split_once(':').ok_or_else(not_found)?;
        if instance != self.runtime.instance_id() {
            return Err(not_found());
        }
        let local: LocalId = id.parse().map_err(|_| not_found())?;
        // Only the canonical spelling: "01" or "+1" is not the key of worker 1.
        if local.to_string() != id {
            return Err(not_found());
        }
        Ok(local)
    }
}

impl fmt::Debug for EmbeddedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedSource").finish_non_exhaustive()
    }
}

/// Turns the runtime's ids and views into the registry's.
#[derive(Clone)]
struct Keys {
    instance: String,
}

impl Keys {
    fn key(&self, id: LocalId) -> SourceKey {
        SourceKey::new(format!("{}:{}", self.instance, id))
    }

    fn worker(&self, info: WorkerInfo) -> SourceWorker {
        let at = |t: SystemTime| OffsetDateTime::from(t);
        SourceWorker {
            key: self.key(info.id),
            name: info.name,
            labels: info.labels,
            state: info.state,
            exit_code: info.exit_code,
            reason: info.reason,
            created_at: at(info.created_at),
            started_at: info.started_at.map(at),
            ended_at: info.ended_at.map(at),
            last_seen_at: None,
            profile: info.profile,
            args: info.args,
            command: info.command,
            restarts: info.restarts,
            last_exit: info.last_exit.map(|e| LastExit {
                code: e.code,
                reason: e.reason,
                at: at(e.at),
            }),
            retry_at: info.retry_at.map(at),
            message: info.message,
            health: info.health.map(|h| WorkerHealth {
                status: h.status,
                since: at(h.since),
                probe: h.probe,
            }),
        }
    }

    fn workers(&self, infos: Vec<WorkerInfo>) -> Vec<SourceWorker> {
        infos.into_iter().map(|i| self.worker(i)).collect()
    }
}

#[async_trait]
impl RuntimeSource for EmbeddedSource {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn health(&self) -> SourceHealth {
        health_of(&self.runtime)
    }

    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        Ok(self.keys().workers(self.runtime.list()))
    }

    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        let id = self.local_id(key)?;
        let info = self.runtime.get(id).map_err(registry_error)?;
        Ok(self.keys().worker(info))
    }

    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        // The worker runtime takes the core's request as it is, and validates it itself.
        let info = self.runtime.spawn(request).await.map_err(registry_error)?;
        Ok(self.keys().worker(info))
    }

    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError> {
        let id = self.local_id(key)?;
        self.runtime.stop(id, grace).map_err(registry_error)
    }

    async fn input(&self, key: &SourceKey, data: Bytes) -> Result<(), RegistryError> {
        let id = self.local_id(key)?;
        self.runtime.input(id, data).map_err(registry_error)
    }

    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError> {
        let id = self.local_id(key)?;
        self.runtime.remove(id).map_err(registry_error)
    }

    async fn events(&self) -> Result<SourceEvents, RegistryError> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let keys = self.keys();
        // The snapshot and the seq it stands at are taken atomically, so following the
        // runtime's events from that seq neither misses nor repeats a change.
        let (infos, seq) = self.runtime.snapshot();
        tx.try_send(SourceEvent::Resync(keys.workers(infos)))
            .map_err(|_| RegistryError::internal("a new lifecycle stream has no room"))?;
        let reader = self.runtime.events(seq);
        tokio::spawn(forward_events(
            self.runtime.clone(),
            keys,
            reader,
            tx,
            self.closing.subscribe(),
        ));
        Ok(rx)
    }

    async fn output(
        &self,
        key: &SourceKey,
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        let id = self.local_id(key)?;
        let reader = self
            .runtime
            .output(id, request.after, request.follow)
            .map_err(registry_error)?;
        let (tx, rx) = mpsc::channel(OUTPUT_BUFFER);
        tokio::spawn(forward_output(reader, tx, self.closing.subscribe()));
        Ok(rx)
    }

    async fn profiles(&self) -> Result<Vec<ProfileView>, RegistryError> {
        let config = self.runtime.config();
        Ok(config
            .profiles
            .iter()
            .map(|(name, p)| profile_view(name, p, config.grace))
            .collect())
    }

    async fn shutdown(&self, grace: Option<Duration>) {
        self.runtime.shutdown(grace).await;
        self.closing.send_replace(true);
    }

    /// A change of `profiles` alone (a profile added, changed or removed) is taken in
    /// place: spawns from now on, and restarts, use the new profiles; running workers go
    /// on. Any other key that changed needs a new runtime (`Ok(false)`).
    async fn reconfigure(&self, config: &SourceConfig) -> Result<bool, RegistryError> {
        let mut new: EmbeddedConfig = config
            .parse()
            .map_err(|e| RegistryError::InvalidRequest(e.message))?;
        let profiles = std::mem::take(&mut new.profiles);
        let mut running = self.runtime.config().clone();
        running.profiles.clear();
        if new != running {
            return Ok(false);
        }
        self.runtime
            .set_profiles(profiles)
            .map_err(registry_error)?;
        Ok(true)
    }
}

/// What a client may know of a profile: never its `cwd` or `env`, its command only where the
/// config says `show_command`.
fn profile_view(name: &str, profile: &Profile, default_grace: Duration) -> ProfileView {
    let policy = profile.restart_policy();
    let restart = match policy.restart {
        Restart::Never => None,
        Restart::OnFailure => Some("on-failure"),
        Restart::Always => Some("always"),
    };
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    ProfileView {
        name: name.to_string(),
        description: profile.description.clone(),
        accepts: ProfileView::EVERY_FIELD.map(String::from).to_vec(),
        args: ArgsRule::Appended,
        restart: restart.map(|policy_name| RestartView {
            policy: policy_name.to_string(),
            max_restarts: policy.max_restarts,
            window_ms: millis(policy.window),
        }),
        grace_ms: Some(millis(
            profile
                .grace
                .unwrap_or(default_grace)
                .min(registry_core::limits::MAX_GRACE),
        )),
        command: profile.show_command.then(|| profile.command.clone()),
    }
}

/// How often a lifecycle stream re-checks the runtime's health and reports a change.
const HEALTH_CHECK: Duration = Duration::from_secs(1);

/// `ready`, or `degraded` with a message and a diagnostic per problem of the runtime. A
/// runtime whose workers are not contained in cgroups (turned off, or the host offers no
/// writable cgroup v2) says so in a `not_contained` diagnostic, whatever its status: it
/// works as documented, with the one gap that processes leaving a worker's process group
/// outlive it.
fn health_of(runtime: &Runtime) -> SourceHealth {
    let gap = runtime.containment().gap().map(|message| Diagnostic {
        code: "not_contained".into(),
        message,
    });
    let problems = runtime.health();
    if problems.is_empty() {
        return SourceHealth {
            diagnostics: gap.into_iter().collect(),
            ..SourceHealth::ready()
        };
    }
    let message = problems
        .iter()
        .map(|p| p.message())
        .collect::<Vec<_>>()
        .join("; ");
    SourceHealth {
        status: HealthStatus::Degraded,
        message: Some(message),
        diagnostics: problems
            .iter()
            .map(|p| Diagnostic {
                code: p.code().into(),
                message: p.message().into(),
            })
            .chain(gap)
            .collect(),
        ..SourceHealth::ready()
    }
}

/// Feeds one lifecycle stream from the runtime's event sequence, and reports the runtime's
/// health when it changes: at once when the runtime announces it (its watchdog died or is
/// back), and checked every [`HEALTH_CHECK`] besides (a spawner thread that dies says
/// nothing by itself).
///
/// The stream is bounded and this task is the only one that waits on it: while its reader
/// is slow, the task waits in `send` and the runtime's ring moves on. When the task comes
/// back to a ring that no longer holds its position, the runtime says `Gap`, and the stream
/// gets a fresh snapshot as `Resync` and follows on from there.
async fn forward_events(
    runtime: Runtime,
    keys: Keys,
    mut reader: EventReader,
    tx: mpsc::Sender<SourceEvent>,
    mut closing: watch::Receiver<bool>,
) {
    // The registry asks for the health when it opens the stream; report changes after it.
    let mut health = health_of(&runtime);
    // The loss and the return of the watchdog are announced; the rest is polled.
    let mut changes = runtime.health_changes();
    let mut check =
        tokio::time::interval_at(tokio::time::Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let pending = loop {
        // The reader is a cursor over the runtime's ring: cancelling `next` loses nothing.
        let event = tokio::select! {
            event = reader.next() => translate(&runtime, &keys, &mut reader, event),
            _ = async {
                tokio::select! {
                    _ = check.tick() => {}
                    // The sender lives as long as the runtime this task holds.
                    Ok(()) = changes.changed() => {}
                }
            } => {
                let now = health_of(&runtime);
                if now == health {
                    continue;
                }
                health = now.clone();
                SourceEvent::Health(now)
            }
            _ = tx.closed() => return,
            _ = closing.wait_for(|closing| *closing) => break None,
        };
        tokio::select! {
            permit = tx.reserve() => match permit {
                Ok(permit) => permit.send(event),
                Err(_) => return,
            },
            _ = closing.wait_for(|closing| *closing) => break Some(event),
        }
    };
    // Shut down (or dropped): hand over what the runtime reported up to now, in order and
    // as far as the stream has room, and end the stream.
    if let Some(event) = pending {
        if tx.try_send(event).is_err() {
            return;
        }
    }
    while let Some(event) = reader.try_next() {
        let event = translate(&runtime, &keys, &mut reader, event);
        if tx.try_send(event).is_err() {
            return;
        }
    }
}

fn translate(
    runtime: &Runtime,
    keys: &Keys,
    reader: &mut EventReader,
    event: RuntimeEvent,
) -> SourceEvent {
    match event {
        RuntimeEvent::Upserted { worker, .. } => SourceEvent::Upsert(keys.worker(worker)),
        RuntimeEvent::Removed { id, .. } => SourceEvent::Removed(keys.key(id)),
        RuntimeEvent::Gap { from, to } => {
            tracing::debug!(from, to, "lifecycle stream fell behind; sending a resync");
            let (infos, seq) = runtime.snapshot();
            *reader = runtime.events(seq);
            SourceEvent::Resync(keys.workers(infos))
        }
    }
}

/// Feeds one output stream from the runtime's output log of a worker.
async fn forward_output(
    mut reader: OutputReader,
    tx: mpsc::Sender<OutputEvent>,
    mut closing: watch::Receiver<bool>,
) {
    loop {
        let item = tokio::select! {
            item = reader.next() => item,
            _ = tx.closed() => return,
            // Only a dropped source ends output streams early; after a shutdown every worker
            // is terminal, so each stream runs to its `End`.
            _ = closing.wait_for(|_| false) => return,
        };
        let Some(item) = item else { return };
        let event = match item {
            OutputItem::Chunk { seq, stream, data } => {
                OutputEvent::Chunk(OutputChunk { seq, stream, data })
            }
            OutputItem::Gap { from, to } => OutputEvent::Gap { from, to },
            OutputItem::End => OutputEvent::End,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}
