//! `mode = "swarm"`: each worker is a one-replica swarm service that is never restarted
//! (`restart_policy: none`), on the manager behind the config's `socket`; the task may run
//! on any node. The source key is the service id.
//!
//! Swarm's event stream has no task events, so the runtime's services (by their instance
//! label) and their tasks are listed every [`POLL`], two calls for the whole runtime; what
//! a listing finds goes through the same records, output logs and ends as a container's.
//! Output is the service's log stream (it never ends by itself: once the task has ended,
//! it counts as drained when it has been quiet for half a second). Stop scales the service
//! to zero (the engine sends SIGTERM, then SIGKILL after the grace the service was made
//! with) and removes it once its task has ended.

use bollard::query_parameters::{
    InspectServiceOptions, ListServicesOptions, ListTasksOptions, UpdateServiceOptions,
};

use super::*;

/// How often the runtime's services and tasks are listed.
const POLL: Duration = Duration::from_millis(250);

impl Inner {
    /// Spawn: the service is made; the worker is `starting` until its task runs.
    pub(super) async fn create_service(
        self: &Arc<Self>,
        plan: Plan,
        meta: Meta,
        grace: Duration,
    ) -> Result<SourceWorker, RegistryError> {
        let docker = self.docker()?;
        // Swarm would pull a missing image on each node; this source never pulls, so the
        // manager must have it (a node without it refuses the task: `spawn_failed`).
        if let Err(e) = docker.inspect_image(&plan.image).await {
            let e = DockerError::from_bollard("inspect image", e);
            if e.is_not_found() {
                return Err(RegistryError::InvalidRequest(
                    "the image of this profile is not on the container engine (it is never \
                     pulled)"
                        .into(),
                ));
            }
            return Err(e.into());
        }
        let spec = plan.service_spec(&self.runtime, &self.instance, &meta, grace);
        let created = docker
            .create_service(spec, None)
            .await
            .map_err(|e| DockerError::from_bollard("create service", e))
            .map_err(|e| match e.status() {
                Some(503) => RegistryError::unavailable(
                    "the container engine is not a swarm manager",
                    Some(Duration::from_secs(1)),
                ),
                _ => e.into(),
            })?;
        let id = created.id.ok_or_else(|| {
            RegistryError::internal("the engine made a service and gave no id".to_string())
        })?;
        let key = SourceKey::new(id);
        let mut st = self.lock();
        st.epoch += 1;
        self.record_service(&mut st, &docker, key.clone(), &meta, WorkerState::Starting);
        self.upsert(&mut st, &key);
        st.workers
            .get(&key)
            .map(|w| w.view.clone())
            .ok_or_else(not_found)
    }

    /// Records a worker for the service `key` and follows its logs from the start.
    fn record_service(
        &self,
        st: &mut State,
        docker: &Docker,
        key: SourceKey,
        meta: &Meta,
        state: WorkerState,
    ) {
        let log = OutputLog::new(meta.retention);
        let (drained_tx, drained) = watch::channel(false);
        let (ended_tx, ended) = watch::channel(false);
        let mut w = new_worker(
            key.clone(),
            meta,
            state,
            Arc::clone(&log),
            drained,
            st.epoch,
        );
        w.task_ended = Some(ended_tx);
        if let (Some(rid), Some(hash)) = (&meta.request_id, &meta.request_hash) {
            st.requests
                .insert(rid.clone(), (hash.clone(), Some(key.clone())));
        }
        let logs = docker.service_logs(
            key.as_str(),
            Some(LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        tokio::spawn(pump(Box::pin(logs), log, drained_tx, Some(ended)));
        st.workers.insert(key, w);
    }

    /// Stop: the service scaled to zero, so that the engine stops its task with the
    /// service's grace. A service that is gone already is no error (the next listing ends
    /// the worker).
    pub(super) async fn scale_to_zero(&self, key: &SourceKey) -> Result<(), DockerError> {
        let docker = self.docker()?;
        let service = match docker
            .inspect_service(key.as_str(), None::<InspectServiceOptions>)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let e = DockerError::from_bollard("inspect service", e);
                return if e.is_not_found() { Ok(()) } else { Err(e) };
            }
        };
        let (Some(mut spec), Some(version)) = (service.spec, service.version.and_then(|v| v.index))
        else {
            return Err(DockerError::Other {
                what: "inspect service",
                detail: "a service without spec or version".into(),
            });
        };
        if let Some(replicated) = spec.mode.as_mut().and_then(|m| m.replicated.as_mut()) {
            replicated.replicas = Some(0);
        }
        let options = UpdateServiceOptions {
            version: version.min(i32::MAX as u64) as i32,
            ..Default::default()
        };
        match docker
            .update_service(key.as_str(), spec, options, None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = DockerError::from_bollard("update service", e);
                if e.is_not_found() {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Removes the service `key` (gone already is no error).
    pub(super) async fn remove_service(&self, key: &SourceKey) -> Result<(), DockerError> {
        match self.docker()?.delete_service(key.as_str()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = DockerError::from_bollard("remove service", e);
                if e.is_not_found() {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The facts of the service `key`'s task, as a container's; not found when the
    /// service is gone or its node left the swarm.
    pub(super) async fn task_facts(&self, key: &SourceKey) -> Result<Facts, DockerError> {
        let tasks = self.tasks_of(&[key.as_str().to_string()]).await?;
        if let Some(task) = latest_tasks(&tasks).get(key.as_str()) {
            return Facts::from_task(task).ok_or(DockerError::Engine {
                what: "inspect task",
                status: 404,
                message: "the task's node left the swarm".into(),
            });
        }
        // No task yet; no task any more (a service scaled to zero has its task removed
        // once it has shut down); or no service any more.
        self.docker()?
            .inspect_service(key.as_str(), None::<InspectServiceOptions>)
            .await
            .map_err(|e| DockerError::from_bollard("inspect service", e))?;
        Ok(Facts {
            phase: Phase::Created,
            // Unknown: no exit code is reported for it.
            exit_code: -1,
            oom_killed: false,
            start_error: None,
            started_at: None,
            finished_at: None,
            labels: HashMap::new(),
        })
    }

    /// The tasks of these services.
    async fn tasks_of(
        &self,
        services: &[String],
    ) -> Result<Vec<bollard::models::Task>, DockerError> {
        if services.is_empty() {
            return Ok(Vec::new());
        }
        self.docker()?
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([("service".to_string(), services.to_vec())])),
            }))
            .await
            .map_err(|e| DockerError::from_bollard("list tasks", e))
    }
}

/// Each service's newest task (a one-replica service that is never restarted has one;
/// after a scale to zero and back it could have more).
fn latest_tasks(tasks: &[bollard::models::Task]) -> HashMap<&str, &bollard::models::Task> {
    let mut latest: HashMap<&str, &bollard::models::Task> = HashMap::new();
    let index = |t: &bollard::models::Task| t.version.as_ref().and_then(|v| v.index).unwrap_or(0);
    for task in tasks {
        let Some(service) = task.service_id.as_deref() else {
            continue;
        };
        match latest.get(service) {
            Some(known) if index(known) >= index(task) => {}
            _ => {
                latest.insert(service, task);
            }
        }
    }
    latest
}

/// Follows the swarm: lists the runtime's services and tasks every [`POLL`]; on a
/// failure, `unavailable` (live workers `unknown`) and retries with backoff and jitter.
/// A `Resync` follows the first listing and each one after a failure.
pub(super) async fn follow_swarm(inner: Weak<Inner>) {
    let mut backoff = BACKOFF_FIRST;
    let mut owed = true;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        match sync(&strong, owed).await {
            Ok(()) => {
                backoff = BACKOFF_FIRST;
                owed = false;
                {
                    let mut st = strong.lock();
                    strong.set_health(&mut st, SourceHealth::ready());
                }
                drop(strong);
                tokio::time::sleep(POLL).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "the swarm manager does not answer");
                let retry = backoff_with_jitter(backoff);
                // 503: the engine answers but is no swarm manager.
                let message = if e.status() == Some(503) {
                    "the container engine is not a swarm manager"
                } else {
                    "the container engine does not answer"
                };
                lose_contact_with(&strong, retry, message);
                owed = true;
                drop(strong);
                tokio::time::sleep(retry).await;
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

/// One listing: adopts services no record holds (made before a restart of `roster`),
/// moves each live worker on as its task says, ends workers whose service is gone.
async fn sync(inner: &Arc<Inner>, resync: bool) -> Result<(), DockerError> {
    let epoch = inner.lock().epoch;
    let docker = inner.docker()?;
    let services = docker
        .list_services(Some(ListServicesOptions {
            filters: Some(inner.label_filter()),
            ..Default::default()
        }))
        .await
        .map_err(|e| DockerError::from_bollard("list services", e))?;
    let ids: Vec<String> = services.iter().filter_map(|s| s.id.clone()).collect();
    let tasks = inner.tasks_of(&ids).await?;
    let latest = latest_tasks(&tasks);
    let mut seen = HashSet::new();
    for service in &services {
        let Some(id) = service.id.as_deref() else {
            continue;
        };
        let key = SourceKey::new(id.to_string());
        seen.insert(key.clone());
        let facts = latest.get(id).map(|t| Facts::from_task(t));
        if inner.lock().workers.contains_key(&key) {
            refresh_service(inner, &key, facts);
        } else {
            let labels = service
                .spec
                .as_ref()
                .and_then(|s| s.labels.clone())
                .unwrap_or_default();
            adopt_service(inner, &docker, key, &labels, facts);
        }
    }
    let mut st = inner.lock();
    let gone: Vec<(SourceKey, bool)> = st
        .workers
        .iter()
        .filter(|(k, w)| !seen.contains(*k) && w.recorded_at <= epoch)
        .map(|(k, w)| (k.clone(), w.view.state.is_terminal()))
        .collect();
    for (key, terminal) in gone {
        if terminal {
            // Removed from outside after it ended (or by its stop): the record stays
            // until it is removed, as a finished container's does.
            continue;
        }
        drop(st);
        inner.end_lost(&key);
        st = inner.lock();
    }
    if resync {
        let truth = SourceEvent::Resync(Inner::views(&st));
        inner.emit(&mut st, truth);
    }
    Ok(())
}

/// A known worker's service, as the latest listing shows it. `facts`: `None` when it has
/// no task yet, `Some(None)` when its task's node left the swarm.
fn refresh_service(inner: &Arc<Inner>, key: &SourceKey, facts: Option<Option<Facts>>) {
    let mut st = inner.lock();
    let Some(w) = st.workers.get_mut(key) else {
        return;
    };
    if w.view.state.is_terminal() {
        return;
    }
    let was = w.before_unknown.take();
    match facts {
        Some(None) => {
            drop(st);
            inner.end_lost(key);
        }
        Some(Some(f)) if f.phase == Phase::Ended => {
            if let Some(was) = was {
                w.view.state = was;
                w.view.last_seen_at = None;
            }
            drop(st);
            inner.finish_later(key.clone());
        }
        Some(Some(f)) if f.phase == Phase::Running => {
            let mut changed = false;
            if w.view.state == WorkerState::Unknown {
                w.view.state = was.unwrap_or(WorkerState::Running);
                w.view.last_seen_at = None;
                changed = true;
            }
            if w.view.state == WorkerState::Starting {
                w.view.state = WorkerState::Running;
                changed = true;
            }
            if w.view.state != WorkerState::Starting && w.view.started_at.is_none() {
                w.view.started_at = Some(f.started_at.unwrap_or_else(now));
                changed = true;
            }
            if changed {
                inner.upsert(&mut st, key);
            }
        }
        _ => {
            let stopped = w.stop_requested;
            if w.view.state == WorkerState::Unknown {
                w.view.state = was.unwrap_or(WorkerState::Starting);
                w.view.last_seen_at = None;
                inner.upsert(&mut st, key);
            }
            // Scaled to zero by a stop: the engine removes the task once it has shut
            // down (or never makes one), so a listing may never show it ended.
            if stopped && facts.is_none() {
                drop(st);
                inner.finish_later(key.clone());
            }
        }
    }
}

/// A service of this runtime that no record holds: made before a restart of `roster`.
/// Its output is read again from the service's logs, from the start.
fn adopt_service(
    inner: &Arc<Inner>,
    docker: &Docker,
    key: SourceKey,
    labels: &HashMap<String, String>,
    facts: Option<Option<Facts>>,
) {
    let Some(meta) = labels
        .get(LABEL_WORKER)
        .and_then(|text| serde_json::from_str::<Meta>(text).ok())
    else {
        tracing::warn!("a service of this runtime has no readable worker label; left alone");
        return;
    };
    let mut st = inner.lock();
    if st.spawning.contains(&meta.nonce) || st.workers.contains_key(&key) {
        return;
    }
    st.epoch += 1;
    let state = match &facts {
        Some(Some(f)) if f.phase != Phase::Created => WorkerState::Running,
        _ => WorkerState::Starting,
    };
    inner.record_service(&mut st, docker, key.clone(), &meta, state);
    if let (Some(w), Some(Some(f))) = (st.workers.get_mut(&key), &facts) {
        w.view.started_at = f.started_at;
    }
    inner.upsert(&mut st, &key);
    drop(st);
    match facts {
        Some(None) => inner.end_lost(&key),
        Some(Some(f)) if f.phase == Phase::Ended => inner.finish_later(key),
        _ => {}
    }
}
