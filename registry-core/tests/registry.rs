//! The registry's behaviour at its boundary: identity, projection, routing, reconciliation,
//! health, the event log and its subscriptions. A scripted source stands in for a runtime
//! so each test can say exactly what the source reports and when.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use registry_core::*;
use time::OffsetDateTime;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

/// A source whose lifecycle stream the test writes.
#[derive(Debug)]
struct Scripted {
    caps: Capabilities,
    workers: Mutex<BTreeMap<String, SourceWorker>>,
    stream: Mutex<Option<mpsc::Sender<SourceEvent>>>,
    opened: AtomicUsize,
    stops: Mutex<Vec<(String, Option<Duration>)>>,
    inputs: Mutex<Vec<(String, Bytes)>>,
    next: AtomicUsize,
    fail_with: Mutex<Option<RegistryError>>,
    /// Spawned workers are reported gone again at once (failed and evicted).
    evict_on_spawn: std::sync::atomic::AtomicBool,
    /// How many more calls of `health` panic, as a bug in a source would.
    panics_in_health: AtomicUsize,
}

impl Scripted {
    fn new(caps: Capabilities) -> Arc<Self> {
        Arc::new(Scripted {
            caps,
            workers: Mutex::new(BTreeMap::new()),
            stream: Mutex::new(None),
            opened: AtomicUsize::new(0),
            stops: Mutex::new(Vec::new()),
            inputs: Mutex::new(Vec::new()),
            next: AtomicUsize::new(1),
            fail_with: Mutex::new(None),
            evict_on_spawn: std::sync::atomic::AtomicBool::new(false),
            panics_in_health: AtomicUsize::new(0),
        })
    }

    fn worker(key: &str, state: WorkerState) -> SourceWorker {
        SourceWorker {
            key: SourceKey::new(key),
            name: Some(format!("name-{key}")),
            labels: BTreeMap::from([(
                "team".to_string(),
                if key.ends_with('1') { "a" } else { "b" }.to_string(),
            )]),
            state,
            exit_code: (state == WorkerState::Exited).then_some(0),
            reason: None,
            created_at: OffsetDateTime::now_utc(),
            started_at: None,
            ended_at: None,
            last_seen_at: None,
            profile: Some("shell".into()),
            args: vec![],
            command: None,
            restarts: 0,
            last_exit: None,
            retry_at: None,
            message: None,
            health: None,
        }
    }

    /// Sets a worker and reports it as an upsert.
    async fn put(&self, w: SourceWorker) {
        self.workers
            .lock()
            .unwrap()
            .insert(w.key.as_str().to_string(), w.clone());
        self.send(SourceEvent::Upsert(w)).await;
    }

    async fn send(&self, event: SourceEvent) {
        let tx = self.stream.lock().unwrap().clone().expect("stream open");
        tx.send(event).await.expect("registry reads the stream");
    }

    /// Ends the current lifecycle stream, as a source that lost its upstream would.
    fn drop_stream(&self) {
        self.stream.lock().unwrap().take();
    }
}

#[async_trait]
impl RuntimeSource for Scripted {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    async fn health(&self) -> SourceHealth {
        let panics = self
            .panics_in_health
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if panics.is_ok() {
            panic!("health check bug");
        }
        SourceHealth::ready()
    }
    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError> {
        Ok(self.workers.lock().unwrap().values().cloned().collect())
    }
    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError> {
        self.workers
            .lock()
            .unwrap()
            .get(key.as_str())
            .cloned()
            .ok_or_else(|| RegistryError::WorkerNotFound(format!("no {}", key.as_str())))
    }
    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError> {
        if let Some(e) = self.fail_with.lock().unwrap().clone() {
            return Err(e);
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let mut w = Scripted::worker(&format!("spawned-{n}"), WorkerState::Running);
        w.name = request.name;
        w.labels = request.labels;
        self.put(w.clone()).await;
        if self.evict_on_spawn.load(Ordering::SeqCst) {
            self.workers.lock().unwrap().remove(w.key.as_str());
            self.send(SourceEvent::Removed(w.key.clone())).await;
        }
        Ok(w)
    }
    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError> {
        self.get(key).await?;
        self.stops
            .lock()
            .unwrap()
            .push((key.as_str().to_string(), grace));
        Ok(())
    }
    async fn input(&self, key: &SourceKey, data: Bytes) -> Result<(), RegistryError> {
        if let Some(e) = self.fail_with.lock().unwrap().clone() {
            return Err(e);
        }
        self.get(key).await?;
        self.inputs
            .lock()
            .unwrap()
            .push((key.as_str().to_string(), data));
        Ok(())
    }
    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError> {
        let w = self.get(key).await?;
        if !w.state.is_terminal() {
            return Err(RegistryError::Conflict("still running".into()));
        }
        self.workers.lock().unwrap().remove(key.as_str());
        self.send(SourceEvent::Removed(key.clone())).await;
        Ok(())
    }
    async fn events(&self) -> Result<SourceEvents, RegistryError> {
        let (tx, rx) = mpsc::channel(64);
        let all = self.list().await?;
        tx.send(SourceEvent::Resync(all)).await.unwrap();
        *self.stream.lock().unwrap() = Some(tx);
        self.opened.fetch_add(1, Ordering::SeqCst);
        Ok(rx)
    }
    async fn output(
        &self,
        key: &SourceKey,
        _: OutputRequest,
    ) -> Result<OutputStream, RegistryError> {
        self.get(key).await?;
        let (tx, rx) = mpsc::channel(4);
        tx.send(OutputEvent::End).await.unwrap();
        Ok(rx)
    }
    async fn shutdown(&self, _grace: Option<Duration>) {
        self.drop_stream();
    }
}

fn rt(name: &str) -> RuntimeId {
    RuntimeId::new(name).unwrap()
}

async fn registry_with(dir: &std::path::Path, sources: &[(&str, Arc<Scripted>)]) -> Registry {
    let registry = Registry::new(RegistryConfig::new(dir)).unwrap();
    for (name, source) in sources {
        registry
            .add_runtime(rt(name), "scripted", source.clone())
            .await
            .unwrap();
    }
    wait_for(|| registry.is_ready()).await;
    registry
}

// Not testkit's `eventually`: testkit reaches HTTP and the sources, and registry-core must
// not, not even as a dev-dependency (tests/architecture.rs checks the lock file).
async fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The id of the one worker the registry lists, once it lists it.
async fn only_worker(reg: &Registry) -> WorkerId {
    let listed = || {
        reg.list_workers(&WorkerFilter::default(), 10, None)
            .unwrap()
            .workers
    };
    wait_for(|| !listed().is_empty()).await;
    let workers = listed();
    assert_eq!(workers.len(), 1, "{workers:?}");
    workers[0].id.clone()
}

async fn next(sub: &mut Subscription) -> StreamItem {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("an event in time")
        .expect("stream open")
}

fn worker_of(item: &StreamItem) -> &WorkerView {
    match &*item.payload {
        EventPayload::WorkerUpserted { worker } => worker,
        other => panic!("expected worker.upserted, got {other:?}"),
    }
}

fn reset_reason(item: &StreamItem) -> ResetReason {
    match &*item.payload {
        EventPayload::Reset { reason } => *reason,
        other => panic!("expected reset, got {other:?}"),
    }
}

fn snapshot_workers(item: &StreamItem) -> Vec<WorkerView> {
    match &*item.payload {
        EventPayload::Snapshot { workers, .. } => workers.clone(),
        other => panic!("expected snapshot, got {other:?}"),
    }
}

#[tokio::test]
async fn spawned_worker_gets_a_public_id_and_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let view = reg
        .spawn(
            &rt("local"),
            SpawnRequest {
                profile: Some("shell".into()),
                name: Some("b1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(view.id.as_str().starts_with("w_"));
    assert_eq!(view.runtime_id, rt("local"));
    assert_eq!(view.name.as_deref(), Some("b1"));
    assert_eq!(reg.worker(&view.id).unwrap(), view);
    let page = reg
        .list_workers(&WorkerFilter::default(), 10, None)
        .unwrap();
    assert_eq!(page.workers, vec![view]);
}

#[tokio::test]
async fn ids_are_stable_across_registry_restarts_and_differ_between_state_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    src.workers
        .lock()
        .unwrap()
        .insert("k1".into(), Scripted::worker("k1", WorkerState::Running));
    let first = registry_with(dir.path(), &[("local", src.clone())]).await;
    let id1 = only_worker(&first).await;
    first.shutdown(None).await;
    drop(first);
    let second = registry_with(dir.path(), &[("local", src.clone())]).await;
    let id2 = only_worker(&second).await;
    assert_eq!(id1, id2);
    let other_dir = tempfile::tempdir().unwrap();
    let third = registry_with(other_dir.path(), &[("local", src)]).await;
    let id3 = only_worker(&third).await;
    assert_ne!(id1, id3);
}

#[tokio::test]
async fn operations_are_routed_to_the_workers_own_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let a = Scripted::new(Capabilities::ALL);
    let b = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("a", a.clone()), ("b", b.clone())]).await;
    let in_b = reg
        .spawn(
            &rt("b"),
            SpawnRequest {
                profile: Some("p".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    reg.stop(&in_b.id, Some(Duration::from_millis(1500)))
        .await
        .unwrap();
    reg.input(&in_b.id, Bytes::from_static(b"hello\n"))
        .await
        .unwrap();
    assert!(a.stops.lock().unwrap().is_empty());
    assert_eq!(
        *b.stops.lock().unwrap(),
        vec![("spawned-1".to_string(), Some(Duration::from_millis(1500)))]
    );
    assert_eq!(
        b.inputs.lock().unwrap()[0].1,
        Bytes::from_static(b"hello\n")
    );
    let mut out = reg
        .output(
            &in_b.id,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(out.recv().await, Some(OutputEvent::End));
}

#[tokio::test]
async fn unknown_runtime_and_worker_ids_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(dir.path(), &[("local", Scripted::new(Capabilities::ALL))]).await;
    let err = reg
        .spawn(
            &rt("nope"),
            SpawnRequest {
                profile: Some("p".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "runtime_not_found");
    assert_eq!(
        reg.runtime(&rt("nope")).unwrap_err().code(),
        "runtime_not_found"
    );
    let ghost: WorkerId = "w_0000000000000000000000000A".parse().unwrap();
    assert_eq!(reg.worker(&ghost).unwrap_err().code(), "worker_not_found");
    assert_eq!(
        reg.stop(&ghost, None).await.unwrap_err().code(),
        "worker_not_found"
    );
    assert_eq!(
        reg.input(&ghost, Bytes::new()).await.unwrap_err().code(),
        "worker_not_found"
    );
    assert_eq!(
        reg.remove(&ghost).await.unwrap_err().code(),
        "worker_not_found"
    );
    let err = reg
        .output(
            &ghost,
            OutputRequest {
                after: 0,
                follow: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "worker_not_found");
    assert!(err.to_string().contains(ghost.as_str()));
}

#[tokio::test]
async fn missing_capabilities_are_unsupported_without_calling_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let caps = Capabilities {
        spawn: false,
        input: false,
        stop: false,
        output: false,
        remove: false,
        restart: false,
    };
    let src = Scripted::new(caps);
    src.workers
        .lock()
        .unwrap()
        .insert("k1".into(), Scripted::worker("k1", WorkerState::Exited));
    let reg = registry_with(dir.path(), &[("legacy", src.clone())]).await;
    let id = only_worker(&reg).await;
    let spawn = reg
        .spawn(
            &rt("legacy"),
            SpawnRequest {
                profile: Some("p".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(spawn.unwrap_err().code(), "unsupported");
    assert_eq!(reg.stop(&id, None).await.unwrap_err().code(), "unsupported");
    assert_eq!(
        reg.input(&id, Bytes::new()).await.unwrap_err().code(),
        "unsupported"
    );
    assert_eq!(reg.remove(&id).await.unwrap_err().code(), "unsupported");
    let out = reg
        .output(
            &id,
            OutputRequest {
                after: 0,
                follow: false,
            },
        )
        .await;
    assert_eq!(out.unwrap_err().code(), "unsupported");
    assert!(src.stops.lock().unwrap().is_empty());
    assert_eq!(reg.runtime(&rt("legacy")).unwrap().capabilities, caps);
}

#[tokio::test]
async fn invalid_spawn_requests_are_refused_before_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let err = reg
        .spawn(&rt("local"), SpawnRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    assert_eq!(
        src.next.load(Ordering::SeqCst),
        1,
        "the source was not asked"
    );
}

#[tokio::test]
async fn source_errors_get_context_and_lose_internal_authority() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let w = reg
        .spawn(
            &rt("local"),
            SpawnRequest {
                profile: Some("p".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    *src.fail_with.lock().unwrap() = Some(RegistryError::Conflict(
        "socket /run/legacy/w1.sock refused, peer 10.0.0.7:7411".into(),
    ));
    let err = reg.input(&w.id, Bytes::new()).await.unwrap_err();
    assert_eq!(err.code(), "conflict");
    let msg = err.to_string();
    assert!(
        !msg.contains("/run/legacy") && !msg.contains("10.0.0.7"),
        "{msg}"
    );
    *src.fail_with.lock().unwrap() = Some(RegistryError::internal("open /etc/secret: denied"));
    let err = reg.input(&w.id, Bytes::new()).await.unwrap_err();
    assert_eq!(err.code(), "internal");
    assert_eq!(err.to_string(), "internal error");
    // A source's not-found message is replaced by the registry's, with the public id.
    let err = reg.stop(&w.id, None).await;
    assert!(err.is_ok());
    src.workers.lock().unwrap().clear();
    let err = reg.stop(&w.id, None).await.unwrap_err();
    assert_eq!(err.to_string(), format!("worker {} not found", w.id));
}

#[tokio::test]
async fn resync_upserts_changes_and_removes_what_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    for k in ["k1", "k2", "k3"] {
        src.workers
            .lock()
            .unwrap()
            .insert(k.into(), Scripted::worker(k, WorkerState::Running));
    }
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let mut sub = reg.subscribe(None, None);
    let before = snapshot_workers(&next(&mut sub).await);
    assert_eq!(before.len(), 3);
    // The whole truth again: k1 exited, k2 gone, k3 unchanged, k4 new.
    let truth = vec![
        Scripted::worker("k1", WorkerState::Exited),
        before_key(&src, "k3"),
        Scripted::worker("k4", WorkerState::Starting),
    ];
    src.send(SourceEvent::Resync(truth)).await;
    let mut upserted = Vec::new();
    let mut removed = Vec::new();
    for _ in 0..3 {
        let item = next(&mut sub).await;
        match &*item.payload {
            EventPayload::WorkerUpserted { worker } => {
                upserted.push((worker.name.clone().unwrap(), worker.state))
            }
            EventPayload::WorkerRemoved { worker_id, .. } => removed.push(worker_id.clone()),
            other => panic!("unexpected {other:?}"),
        }
    }
    upserted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        upserted,
        vec![
            ("name-k1".to_string(), WorkerState::Exited),
            ("name-k4".to_string(), WorkerState::Starting)
        ]
    );
    let k2 = before
        .iter()
        .find(|w| w.name.as_deref() == Some("name-k2"))
        .unwrap();
    assert_eq!(removed, vec![k2.id.clone()]);
    assert_eq!(reg.worker(&k2.id).unwrap_err().code(), "worker_not_found");
    assert_eq!(
        reg.list_workers(&WorkerFilter::default(), 10, None)
            .unwrap()
            .workers
            .len(),
        3
    );
}

fn before_key(src: &Scripted, key: &str) -> SourceWorker {
    src.workers.lock().unwrap()[key].clone()
}

#[tokio::test]
async fn terminal_workers_never_change_and_states_never_move_back() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let mut sub = reg.subscribe(None, None);
    snapshot_workers(&next(&mut sub).await);
    src.put(Scripted::worker("k1", WorkerState::Stopping)).await;
    src.put(Scripted::worker("k1", WorkerState::Running)).await;
    src.put(Scripted::worker("k1", WorkerState::Exited)).await;
    src.put(Scripted::worker("k1", WorkerState::Running)).await;
    let mut failed = Scripted::worker("k1", WorkerState::Failed);
    failed.reason = Some(FailReason::Lost);
    src.put(failed).await;
    src.put(Scripted::worker("k2", WorkerState::Running)).await;
    let mut k1_states = Vec::new();
    loop {
        let item = next(&mut sub).await;
        if let EventPayload::WorkerUpserted { worker } = &*item.payload {
            if worker.name.as_deref() == Some("name-k2") {
                break;
            }
            k1_states.push(worker.state);
        }
    }
    assert_eq!(k1_states, vec![WorkerState::Stopping, WorkerState::Exited]);
}

#[tokio::test]
async fn subscriber_without_cursor_gets_snapshot_then_live_events() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    src.workers
        .lock()
        .unwrap()
        .insert("k1".into(), Scripted::worker("k1", WorkerState::Running));
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let mut sub = reg.subscribe(None, None);
    let snap = next(&mut sub).await;
    match &*snap.payload {
        EventPayload::Snapshot { runtimes, workers } => {
            assert_eq!(runtimes.len(), 1);
            assert_eq!(runtimes[0].workers[&WorkerState::Running], 1);
            assert_eq!(workers.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    src.put(Scripted::worker("k2", WorkerState::Running)).await;
    let live = next(&mut sub).await;
    assert_eq!(worker_of(&live).name.as_deref(), Some("name-k2"));
    assert_eq!(live.cursor.seq(), snap.cursor.seq() + 1);
}

#[tokio::test]
async fn resume_by_cursor_gets_every_later_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let mut sub = reg.subscribe(None, None);
    let snap = next(&mut sub).await;
    for i in 0..20 {
        src.put(Scripted::worker(&format!("k{i}"), WorkerState::Running))
            .await;
    }
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(next(&mut sub).await);
    }
    let resume_at = seen.last().unwrap().cursor.to_string();
    drop(sub);
    // Resumed: events 11..20, each once, in order, with nothing before them.
    let mut resumed = reg.subscribe(Some(&resume_at), None);
    let mut names = Vec::new();
    for _ in 0..10 {
        names.push(worker_of(&next(&mut resumed).await).name.clone().unwrap());
    }
    assert_eq!(
        names,
        (10..20).map(|i| format!("name-k{i}")).collect::<Vec<_>>()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), resumed.next())
            .await
            .is_err(),
        "nothing more"
    );
    assert!(snap.cursor.seq() < seen[0].cursor.seq());
}

#[tokio::test]
async fn runtime_filter_limits_snapshot_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let a = Scripted::new(Capabilities::ALL);
    let b = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("a", a.clone()), ("b", b.clone())]).await;
    let mut sub = reg.subscribe(None, Some(rt("b")));
    match &*next(&mut sub).await.payload {
        EventPayload::Snapshot { runtimes, .. } => {
            assert_eq!(
                runtimes
                    .iter()
                    .map(|r| r.id.to_string())
                    .collect::<Vec<_>>(),
                ["b"]
            )
        }
        other => panic!("{other:?}"),
    }
    a.put(Scripted::worker("x", WorkerState::Running)).await;
    b.put(Scripted::worker("y", WorkerState::Running)).await;
    let item = next(&mut sub).await;
    assert_eq!(worker_of(&item).runtime_id, rt("b"));
}

#[tokio::test]
async fn expired_cursor_gets_reset_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RegistryConfig::new(dir.path());
    config.event_retention = 5;
    let reg = Registry::new(config).unwrap();
    let src = Scripted::new(Capabilities::ALL);
    reg.add_runtime(rt("local"), "scripted", src.clone())
        .await
        .unwrap();
    wait_for(|| reg.is_ready()).await;
    let mut sub = reg.subscribe(None, None);
    let old = next(&mut sub).await.cursor.to_string();
    for i in 0..10 {
        src.put(Scripted::worker(&format!("k{i}"), WorkerState::Running))
            .await;
    }
    wait_for(|| {
        reg.list_workers(&WorkerFilter::default(), 100, None)
            .unwrap()
            .workers
            .len()
            == 10
    })
    .await;
    let mut resumed = reg.subscribe(Some(&old), None);
    assert_eq!(
        reset_reason(&next(&mut resumed).await),
        ResetReason::Expired
    );
    assert_eq!(snapshot_workers(&next(&mut resumed).await).len(), 10);
    // …then live.
    src.put(Scripted::worker("late", WorkerState::Running))
        .await;
    assert_eq!(
        worker_of(&next(&mut resumed).await).name.as_deref(),
        Some("name-late")
    );
}

#[tokio::test]
async fn foreign_epoch_and_malformed_cursors_get_reset_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let first = registry_with(dir.path(), &[("local", src.clone())]).await;
    let mut sub = first.subscribe(None, None);
    let cursor = next(&mut sub).await.cursor.to_string();
    first.shutdown(None).await;
    let second = registry_with(dir.path(), &[("local", src)]).await;
    let mut sub = second.subscribe(Some(&cursor), None);
    assert_eq!(
        reset_reason(&next(&mut sub).await),
        ResetReason::ForeignEpoch
    );
    snapshot_workers(&next(&mut sub).await);
    for bad in ["", "x", "ffffffffffffffff-", "0-0"] {
        let mut sub = second.subscribe(Some(bad), None);
        assert_eq!(
            reset_reason(&next(&mut sub).await),
            ResetReason::Malformed,
            "{bad:?}"
        );
        snapshot_workers(&next(&mut sub).await);
    }
}

#[tokio::test]
async fn a_subscriber_that_never_reads_slows_no_one_and_later_gets_lagged_reset() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RegistryConfig::new(dir.path());
    config.subscriber_queue = 16;
    let reg = Registry::new(config).unwrap();
    let src = Scripted::new(Capabilities::ALL);
    reg.add_runtime(rt("local"), "scripted", src.clone())
        .await
        .unwrap();
    wait_for(|| reg.is_ready()).await;
    let mut stuck = reg.subscribe(None, None);
    let mut reader = reg.subscribe(None, None);
    next(&mut reader).await;
    let counted = Arc::new(AtomicUsize::new(0));
    let reading = tokio::spawn({
        let counted = counted.clone();
        async move {
            while counted.load(Ordering::SeqCst) < 500 {
                match &*next(&mut reader).await.payload {
                    EventPayload::WorkerUpserted { .. } => {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    other => panic!("the reading subscriber got {other:?}"),
                }
            }
        }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    for i in 0..500 {
        src.put(Scripted::worker(&format!("k{i}"), WorkerState::Running))
            .await;
        // A reader that keeps up: it has seen this event before the next is made.
        while counted.load(Ordering::SeqCst) <= i {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reader fell behind"
            );
            tokio::task::yield_now().await;
        }
    }
    tokio::time::timeout(WAIT, reading).await.unwrap().unwrap();
    // The stuck one: the snapshot and what its queue held, each event once and in order,
    // then a reset and a snapshot that has everything.
    let mut last_seq = next(&mut stuck).await.cursor.seq();
    loop {
        let item = next(&mut stuck).await;
        if let EventPayload::Reset { reason } = &*item.payload {
            assert_eq!(*reason, ResetReason::Lagged);
            break;
        }
        assert_eq!(item.cursor.seq(), last_seq + 1);
        last_seq = item.cursor.seq();
    }
    assert_eq!(snapshot_workers(&next(&mut stuck).await).len(), 500);
    src.put(Scripted::worker("after", WorkerState::Running))
        .await;
    assert_eq!(
        worker_of(&next(&mut stuck).await).name.as_deref(),
        Some("name-after")
    );
}

#[tokio::test]
async fn list_filters_by_runtime_state_and_label_and_pages_without_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let a = Scripted::new(Capabilities::ALL);
    let b = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("a", a.clone()), ("b", b.clone())]).await;
    for i in 0..25 {
        let state = if i % 5 == 0 {
            WorkerState::Exited
        } else {
            WorkerState::Running
        };
        a.put(Scripted::worker(&format!("a{i}"), state)).await;
    }
    b.put(Scripted::worker("b1", WorkerState::Running)).await;
    wait_for(|| {
        reg.list_workers(&WorkerFilter::default(), 100, None)
            .unwrap()
            .workers
            .len()
            == 26
    })
    .await;
    let only_b = WorkerFilter {
        runtime: Some(rt("b")),
        ..Default::default()
    };
    assert_eq!(
        reg.list_workers(&only_b, 100, None).unwrap().workers.len(),
        1
    );
    let exited = WorkerFilter {
        states: vec![WorkerState::Exited],
        ..Default::default()
    };
    assert_eq!(
        reg.list_workers(&exited, 100, None).unwrap().workers.len(),
        5
    );
    let team_a = WorkerFilter {
        labels: vec![("team".into(), "a".into())],
        ..Default::default()
    };
    // a1, a11, a21 and b1 end in '1'.
    assert_eq!(
        reg.list_workers(&team_a, 100, None).unwrap().workers.len(),
        4
    );
    // Pages of 7: every worker once, in order, and a removal between pages shifts nothing.
    let mut seen = Vec::new();
    let mut page = reg.list_workers(&WorkerFilter::default(), 7, None).unwrap();
    seen.extend(page.workers.clone());
    let mut removed_one = false;
    while let Some(token) = page.next_page.clone() {
        if !removed_one {
            // Remove an already-seen worker.
            a.send(SourceEvent::Removed(SourceKey::new("a0"))).await;
            wait_for(|| reg.worker(&seen[0].id).is_err()).await;
            removed_one = true;
        }
        page = reg
            .list_workers(&WorkerFilter::default(), 7, Some(&token))
            .unwrap();
        assert!(page.workers.len() <= 7);
        seen.extend(page.workers.clone());
    }
    let ids: Vec<_> = seen.iter().map(|w| w.id.clone()).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids.len(), 26);
    assert_eq!(unique.len(), 26);
    assert_eq!(
        reg.list_workers(&WorkerFilter::default(), 0, None)
            .unwrap_err()
            .code(),
        "invalid_request"
    );
    assert_eq!(
        reg.list_workers(&WorkerFilter::default(), 5, Some("junk"))
            .unwrap_err()
            .code(),
        "invalid_request"
    );
}

#[tokio::test]
async fn remove_is_confirmed_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    src.put(Scripted::worker("k1", WorkerState::Running)).await;
    let id = only_worker(&reg).await;
    assert_eq!(reg.remove(&id).await.unwrap_err().code(), "conflict");
    src.put(Scripted::worker("k1", WorkerState::Exited)).await;
    wait_for(|| reg.worker(&id).map(|w| w.state) == Ok(WorkerState::Exited)).await;
    reg.remove(&id).await.unwrap();
    assert_eq!(reg.worker(&id).unwrap_err().code(), "worker_not_found");
}

#[tokio::test]
async fn health_changes_publish_runtime_updated_with_since_and_sanitized_message() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let ready_since = reg.runtime(&rt("local")).unwrap().health.since;
    let mut sub = reg.subscribe(None, None);
    next(&mut sub).await;
    let retry_at = OffsetDateTime::now_utc() + Duration::from_secs(4);
    let mut h = SourceHealth::unavailable(
        "cannot reach http://10.9.8.7:7411/v1/events",
        Some(retry_at),
    );
    h.diagnostics.push(Diagnostic {
        code: "descriptor_malformed".into(),
        message: "bad JSON in /run/legacy/a.json".into(),
    });
    src.send(SourceEvent::Health(h.clone())).await;
    let item = next(&mut sub).await;
    let EventPayload::RuntimeUpdated { runtime } = &*item.payload else {
        panic!("{item:?}")
    };
    assert_eq!(runtime.health.status, HealthStatus::Unavailable);
    assert_eq!(runtime.health.retry_at, Some(retry_at));
    assert!(runtime.health.since >= ready_since);
    let msg = runtime.health.message.clone().unwrap();
    assert!(!msg.contains("10.9.8.7") && msg.contains(REDACTED), "{msg}");
    assert!(!runtime.diagnostics[0].message.contains("/run/legacy"));
    assert!(runtime.health.since > ready_since);
    let down_since = runtime.health.since;
    // Another message, same status: published, and `since` stays.
    let mut still = h.clone();
    still.message = Some("still down".into());
    src.send(SourceEvent::Health(still.clone())).await;
    let item = next(&mut sub).await;
    let EventPayload::RuntimeUpdated { runtime } = &*item.payload else {
        panic!("{item:?}")
    };
    assert_eq!(runtime.health.message.as_deref(), Some("still down"));
    assert_eq!(runtime.health.since, down_since);
    // The same health again publishes nothing.
    src.send(SourceEvent::Health(still)).await;
    src.put(Scripted::worker("marker", WorkerState::Running))
        .await;
    assert!(matches!(
        &*next(&mut sub).await.payload,
        EventPayload::WorkerUpserted { .. }
    ));
}

#[tokio::test]
async fn a_dropped_lifecycle_stream_marks_unavailable_then_reconnects_and_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    assert_eq!(
        reg.runtime(&rt("local")).unwrap().health.status,
        HealthStatus::Ready
    );
    let mut sub = reg.subscribe(None, None);
    next(&mut sub).await;
    // While no stream is open, a worker appears at the source.
    src.workers
        .lock()
        .unwrap()
        .insert("k9".into(), Scripted::worker("k9", WorkerState::Running));
    src.drop_stream();
    let item = next(&mut sub).await;
    let EventPayload::RuntimeUpdated { runtime } = &*item.payload else {
        panic!("{item:?}")
    };
    assert_eq!(runtime.health.status, HealthStatus::Unavailable);
    assert!(runtime.health.retry_at.is_some());
    // The registry reopens the stream: the runtime is ready again, and the first Resync
    // brings the worker in.
    let item = next(&mut sub).await;
    let EventPayload::RuntimeUpdated { runtime } = &*item.payload else {
        panic!("{item:?}")
    };
    assert_eq!(runtime.health.status, HealthStatus::Ready);
    let item = next(&mut sub).await;
    assert_eq!(worker_of(&item).name.as_deref(), Some("name-k9"));
    assert!(src.opened.load(Ordering::SeqCst) >= 2);
    assert_eq!(
        reg.runtime(&rt("local")).unwrap().health.status,
        HealthStatus::Ready
    );
}

#[tokio::test]
async fn a_health_message_ending_in_a_wide_character_is_kept_and_the_runtime_followed() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let mut sub = reg.subscribe(None, None);
    next(&mut sub).await;
    src.send(SourceEvent::Health(SourceHealth::unavailable(
        "upstream says ¡",
        None,
    )))
    .await;
    let item = next(&mut sub).await;
    let EventPayload::RuntimeUpdated { runtime } = &*item.payload else {
        panic!("{item:?}")
    };
    assert_eq!(runtime.health.message.as_deref(), Some("upstream says ¡"));
    // The runtime is still followed: the next health change arrives too.
    src.send(SourceEvent::Health(SourceHealth::ready())).await;
    let item = next(&mut sub).await;
    let EventPayload::RuntimeUpdated { runtime } = &*item.payload else {
        panic!("{item:?}")
    };
    assert_eq!(runtime.health.status, HealthStatus::Ready);
}

#[tokio::test]
async fn a_follower_that_panics_is_started_again_and_the_runtime_heals() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let mut sub = reg.subscribe(None, None);
    next(&mut sub).await;
    // The next two health calls (made when the follower reopens the stream) panic.
    src.panics_in_health.store(2, Ordering::SeqCst);
    src.workers
        .lock()
        .unwrap()
        .insert("k7".into(), Scripted::worker("k7", WorkerState::Running));
    src.drop_stream();
    let mut statuses = Vec::new();
    let healed = loop {
        let item = next(&mut sub).await;
        match &*item.payload {
            EventPayload::RuntimeUpdated { runtime } => {
                statuses.push(runtime.health.status);
                if runtime.health.status == HealthStatus::Unavailable {
                    let msg = runtime.health.message.clone().unwrap_or_default();
                    assert!(!msg.contains("health check bug"), "{msg}");
                }
            }
            EventPayload::WorkerUpserted { worker } => break worker.clone(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(healed.name.as_deref(), Some("name-k7"));
    assert_eq!(src.panics_in_health.load(Ordering::SeqCst), 0);
    assert_eq!(statuses.last(), Some(&HealthStatus::Ready), "{statuses:?}");
    assert!(
        statuses.contains(&HealthStatus::Unavailable),
        "{statuses:?}"
    );
    assert!(src.opened.load(Ordering::SeqCst) >= 4);
    assert!(reg.is_ready());
}

#[tokio::test]
async fn shutdown_ends_every_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(dir.path(), &[("local", Scripted::new(Capabilities::ALL))]).await;
    let mut sub = reg.subscribe(None, None);
    next(&mut sub).await;
    reg.shutdown(None).await;
    assert!(tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn adding_a_runtime_twice_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(dir.path(), &[("local", Scripted::new(Capabilities::ALL))]).await;
    let err = reg
        .add_runtime(rt("local"), "scripted", Scripted::new(Capabilities::ALL))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "conflict");
}

#[tokio::test]
async fn debug_output_never_shows_source_keys() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    src.workers.lock().unwrap().insert(
        "/run/legacy/secret.sock".into(),
        Scripted::worker("/run/legacy/secret.sock", WorkerState::Running),
    );
    src.workers
        .lock()
        .unwrap()
        .values_mut()
        .for_each(|w| w.name = Some("w".into()));
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let listed = reg
        .list_workers(&WorkerFilter::default(), 10, None)
        .unwrap();
    let text = format!("{reg:?} {listed:?} {:?}", src.list().await.unwrap());
    assert!(!text.contains("secret.sock"), "{text}");
    let json = serde_json::to_string(&listed.workers).unwrap();
    assert!(!json.contains("secret.sock"), "{json}");
}

#[test]
fn factories_refuse_a_kind_twice_and_name_the_known_kinds() {
    let mut f = SourceFactories::new();
    let build = |_cfg: SourceConfig| -> Result<Arc<dyn RuntimeSource>, ConfigError> {
        Ok(Scripted::new(Capabilities::ALL) as Arc<dyn RuntimeSource>)
    };
    f.register("scripted", build).unwrap();
    f.register("other", build).unwrap();
    assert_eq!(
        f.register("scripted", build).unwrap_err().code(),
        "conflict"
    );
    let cfg = SourceConfig {
        runtime_id: rt("x"),
        table: toml::Table::new().into(),
        state_dir: std::env::temp_dir().into(),
    };
    assert!(f.build("scripted", cfg.clone()).is_ok());
    let err = f.build("tmux", cfg).unwrap_err();
    assert!(err.message.contains("other, scripted"), "{err}");
}

/// Inherent method when `T: Serialize`, the trait's fallback otherwise (autoref
/// specialization): tells at compile time, checked at run time, whether a type serializes.
struct Probe<T>(std::marker::PhantomData<T>);
impl<T: serde::Serialize> Probe<T> {
    fn serializes(&self) -> bool {
        true
    }
}
trait Fallback {
    fn serializes(&self) -> bool {
        false
    }
}
impl<T> Fallback for &Probe<T> {}

#[test]
// The borrow is what makes the probe work: keep the same form for every type.
#[allow(clippy::needless_borrow)]
fn holders_of_internal_authority_are_not_serialize_and_views_are() {
    use std::marker::PhantomData;
    assert!(!(&Probe::<SourceKey>(PhantomData)).serializes());
    assert!(!(&Probe::<SourceWorker>(PhantomData)).serializes());
    assert!(!(&Probe::<SourceEvent>(PhantomData)).serializes());
    assert!(!(&Probe::<SourceConfig>(PhantomData)).serializes());
    assert!(!(&Probe::<IdIssuer>(PhantomData)).serializes());
    assert!((&Probe::<WorkerView>(PhantomData)).serializes());
    assert!((&Probe::<RuntimeView>(PhantomData)).serializes());
    assert!((&Probe::<EventPayload>(PhantomData)).serializes());
}

#[tokio::test]
async fn a_worker_never_moves_back_through_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let mut sub = reg.subscribe(None, None);
    snapshot_workers(&next(&mut sub).await);
    for state in [
        WorkerState::Stopping,
        WorkerState::Unknown,
        WorkerState::Starting,
        WorkerState::Running,
        WorkerState::Stopped,
    ] {
        src.put(Scripted::worker("k1", state)).await;
    }
    src.put(Scripted::worker("k2", WorkerState::Running)).await;
    let mut k1_states = Vec::new();
    loop {
        let item = next(&mut sub).await;
        let worker = worker_of(&item);
        if worker.name.as_deref() == Some("name-k2") {
            break;
        }
        k1_states.push(worker.state);
    }
    assert_eq!(
        k1_states,
        vec![
            WorkerState::Stopping,
            WorkerState::Unknown,
            WorkerState::Stopped
        ]
    );
}

#[tokio::test]
async fn a_worker_gone_before_spawn_returns_is_not_routed_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    src.evict_on_spawn.store(true, Ordering::SeqCst);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let view = reg
        .spawn(
            &rt("local"),
            SpawnRequest {
                profile: Some("p".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(reg.worker(&view.id).unwrap_err().code(), "worker_not_found");
    // Nothing routes to it any more: the registry forgot the id with the worker.
    assert_eq!(
        reg.stop(&view.id, None).await.unwrap_err().code(),
        "worker_not_found"
    );
    assert!(src.stops.lock().unwrap().is_empty());
}

#[tokio::test]
async fn stop_on_a_terminal_worker_succeeds_without_asking_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = Scripted::new(Capabilities::ALL);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    src.put(Scripted::worker("k1", WorkerState::Exited)).await;
    let id = only_worker(&reg).await;
    *src.fail_with.lock().unwrap() = Some(RegistryError::unavailable("down", None));
    reg.stop(&id, None).await.unwrap();
    reg.stop(&id, Some(Duration::ZERO)).await.unwrap();
    assert!(src.stops.lock().unwrap().is_empty());
    assert_eq!(reg.worker(&id).unwrap().state, WorkerState::Exited);
}

/// Scripted with `keys` running.
fn scripted_with(keys: &[&str]) -> Arc<Scripted> {
    let src = Scripted::new(Capabilities::ALL);
    for k in keys {
        src.workers
            .lock()
            .unwrap()
            .insert(k.to_string(), Scripted::worker(k, WorkerState::Running));
    }
    src
}

#[tokio::test]
async fn removing_a_runtime_removes_its_workers_then_the_runtime_and_leaves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (gone, kept) = (scripted_with(&["k1", "k2"]), scripted_with(&["k9"]));
    let reg = registry_with(dir.path(), &[("gone", gone.clone()), ("kept", kept)]).await;
    let mut sub = reg.subscribe(None, Some(rt("gone")));
    assert_eq!(snapshot_workers(&next(&mut sub).await).len(), 2);

    reg.remove_runtime(&rt("gone"), None).await.unwrap();
    let mut removed = Vec::new();
    loop {
        let item = next(&mut sub).await;
        match &*item.payload {
            EventPayload::WorkerRemoved { runtime_id, .. } => removed.push(runtime_id.clone()),
            EventPayload::RuntimeRemoved { runtime_id } => {
                assert_eq!(runtime_id, &rt("gone"));
                break;
            }
            EventPayload::RuntimeUpdated { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(removed, vec![rt("gone"), rt("gone")]);
    let ids: Vec<RuntimeId> = reg.runtimes().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![rt("kept")]);
    assert_eq!(
        reg.runtime(&rt("gone")).unwrap_err().code(),
        "runtime_not_found"
    );
    let page = reg
        .list_workers(&WorkerFilter::default(), 10, None)
        .unwrap();
    assert_eq!(page.workers.len(), 1);
    assert_eq!(page.workers[0].runtime_id, rt("kept"));
    let err = reg
        .spawn(&rt("gone"), SpawnRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "runtime_not_found");
    // Its follower ended with the stream instead of opening it again: one that reconnected
    // would have done so after its first backoff (100 ms), well within this wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gone.opened.load(Ordering::SeqCst), 1);
    assert!(reg.is_ready());
    // A second removal names the runtime as unknown.
    let err = reg.remove_runtime(&rt("gone"), None).await.unwrap_err();
    assert_eq!(err.code(), "runtime_not_found");
}

#[tokio::test]
async fn replacing_a_runtime_keeps_the_workers_the_new_source_reports_and_routes_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let old = scripted_with(&["k1", "k2"]);
    let reg = registry_with(dir.path(), &[("local", old.clone())]).await;
    let mut sub = reg.subscribe(None, None);
    let before = snapshot_workers(&next(&mut sub).await);
    let id_of = |key: &str| {
        before
            .iter()
            .find(|w| w.name.as_deref() == Some(&format!("name-{key}")))
            .map(|w| w.id.clone())
            .unwrap()
    };
    let (k1, k2) = (id_of("k1"), id_of("k2"));

    // The new source still has k1 (an observed worker: the same key), not k2.
    let new = scripted_with(&["k1"]);
    reg.replace_runtime(&rt("local"), "scripted-2", new.clone(), None)
        .await
        .unwrap();
    let mut removed = Vec::new();
    let mut updated = false;
    while removed.is_empty() {
        let item = next(&mut sub).await;
        match &*item.payload {
            EventPayload::WorkerRemoved { worker_id, .. } => removed.push(worker_id.clone()),
            EventPayload::RuntimeUpdated { runtime } => {
                updated |= runtime.kind == "scripted-2";
            }
            EventPayload::WorkerUpserted { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(updated, "no runtime.updated with the new kind");
    assert_eq!(removed, vec![k2]);
    assert_eq!(reg.worker(&k1).unwrap().state, WorkerState::Running);
    reg.stop(&k1, None).await.unwrap();
    assert_eq!(new.stops.lock().unwrap().len(), 1);
    assert!(old.stops.lock().unwrap().is_empty());
    wait_for(|| reg.is_ready()).await;
    // The old source's stream is not opened again.
    assert_eq!(old.opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_source_that_says_nothing_cannot_reconfigure_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let src = scripted_with(&["k1"]);
    let reg = registry_with(dir.path(), &[("local", src.clone())]).await;
    let config = SourceConfig {
        runtime_id: rt("local"),
        table: toml::Table::new().into(),
        state_dir: dir.path().to_path_buf().into(),
    };
    assert!(!reg
        .reconfigure_runtime(&rt("local"), &config)
        .await
        .unwrap());
    assert_eq!(
        reg.reconfigure_runtime(&rt("other"), &config)
            .await
            .unwrap_err()
            .code(),
        "runtime_not_found"
    );
    assert_eq!(src.opened.load(Ordering::SeqCst), 1);
    assert_eq!(only_worker(&reg).await, only_worker(&reg).await);
}
