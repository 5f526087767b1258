//! The registry driving the embedded source end to end — the path the server takes: spawn,
//! output, events, stop, removal, restart and shutdown, with real processes. Everything a
//! client would see is searched for the internal authority behind it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use registry_core::{
    EventPayload, OutputEvent, OutputRequest, Registry, RegistryConfig, RuntimeId, RuntimeSource,
    SpawnRequest, StreamKind, Subscription, WorkerFilter, WorkerId, WorkerState, WorkerView,
};
use source_embedded::{EmbeddedConfig, EmbeddedSource};
use worker_runtime::Profile;

const WAIT: Duration = Duration::from_secs(10);

fn local() -> RuntimeId {
    RuntimeId::new("local").unwrap()
}

async fn registry(state_dir: &std::path::Path) -> Result<(Registry, Arc<EmbeddedSource>)> {
    let shell = Profile {
        command: vec!["/bin/sh".into(), "-c".into()],
        ..Default::default()
    };
    let source = Arc::new(EmbeddedSource::new(EmbeddedConfig {
        profiles: BTreeMap::from([("shell".to_string(), shell)]),
        ..Default::default()
    })?);
    let registry = Registry::new(RegistryConfig::new(state_dir))?;
    registry
        .add_runtime(
            local(),
            "embedded",
            source.clone() as Arc<dyn RuntimeSource>,
        )
        .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !registry.is_ready() {
        if tokio::time::Instant::now() > deadline {
            bail!("the embedded runtime never answered");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((registry, source))
}

fn shell(script: &str) -> SpawnRequest {
    SpawnRequest {
        profile: Some("shell".into()),
        args: vec![script.into()],
        name: Some("e2e".into()),
        ..Default::default()
    }
}

/// Reads a subscription until `id` reaches a terminal state; returns every payload seen.
async fn until_terminal(sub: &mut Subscription, id: &WorkerId) -> Result<Vec<EventPayload>> {
    let mut seen = Vec::new();
    loop {
        let item = tokio::time::timeout(WAIT, sub.next())
            .await
            .context("an event in time")?
            .context("the stream is open")?;
        let done = matches!(&*item.payload,
            EventPayload::WorkerUpserted { worker } if &worker.id == id && worker.state.is_terminal());
        seen.push((*item.payload).clone());
        if done {
            return Ok(seen);
        }
    }
}

async fn wait_state(reg: &Registry, id: &WorkerId, want: WorkerState) -> Result<WorkerView> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let w = reg.worker(id)?;
        if w.state == want {
            return Ok(w);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("worker is {} after {WAIT:?}, expected {want}", w.state);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_output_events_and_removal_through_the_registry() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (reg, source) = registry(dir.path()).await?;
    let mut sub = reg.subscribe(None, None);
    let snapshot = sub.next().await.context("snapshot")?;
    assert!(matches!(&*snapshot.payload, EventPayload::Snapshot { .. }));

    let w = reg
        .spawn(&local(), shell("echo pid=$$; echo oops >&2; exit 4"))
        .await?;
    assert!(w.id.as_str().starts_with("w_"));
    assert_eq!(
        reg.worker(&w.id)?.id,
        w.id,
        "a GET right after spawn sees it"
    );
    let events = until_terminal(&mut sub, &w.id).await?;
    let states: Vec<WorkerState> = events
        .iter()
        .filter_map(|p| match p {
            EventPayload::WorkerUpserted { worker } if worker.id == w.id => Some(worker.state),
            _ => None,
        })
        .collect();
    assert_eq!(states.last(), Some(&WorkerState::Exited), "{states:?}");
    assert!(states.windows(2).all(|s| s[0] != s[1]), "{states:?}");
    let ended = reg.worker(&w.id)?;
    assert_eq!(ended.exit_code, Some(4));

    let mut out = reg
        .output(
            &w.id,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await?;
    let mut stdout = String::new();
    let mut seqs = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, out.recv()).await? {
        match event {
            OutputEvent::Chunk(c) => {
                seqs.push(c.seq);
                if c.stream == StreamKind::Stdout {
                    stdout.push_str(&String::from_utf8_lossy(&c.data));
                }
            }
            OutputEvent::Gap { .. } => bail!("no gap expected"),
            OutputEvent::End => break,
        }
    }
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let pid = stdout
        .trim()
        .strip_prefix("pid=")
        .context("the worker printed its pid")?
        .to_string();

    // Nothing a client sees carries the pid or the source key behind the id.
    let mut seen = serde_json::to_string(&events)?;
    seen.push_str(&serde_json::to_string(&reg.worker(&w.id)?)?);
    seen.push_str(&serde_json::to_string(&reg.runtimes())?);
    seen.push_str(&serde_json::to_string(
        &reg.list_workers(&WorkerFilter::default(), 100, None)?
            .workers,
    )?);
    seen.push_str(&format!("{reg:?} {source:?}"));
    let key = source.list().await?[0].key.clone();
    let instance = key.as_str().split(':').next().unwrap().to_string();
    assert!(!seen.contains(&instance), "the source key leaked: {seen}");
    for needle in [
        format!(":{pid},"),
        format!(":{pid}}}"),
        format!("\"{pid}\""),
    ] {
        assert!(!seen.contains(&needle), "the pid leaked: {seen}");
    }
    assert!(!seen.contains(&dir.path().display().to_string()));

    reg.remove(&w.id).await?;
    assert_eq!(reg.worker(&w.id).unwrap_err().code(), "worker_not_found");
    let removed = tokio::time::timeout(WAIT, sub.next())
        .await?
        .context("open")?;
    assert!(
        matches!(&*removed.payload, EventPayload::WorkerRemoved { worker_id, .. } if worker_id == &w.id),
        "{removed:?}"
    );
    reg.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_through_the_registry_ends_stopped_and_input_reaches_the_worker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (reg, _source) = registry(dir.path()).await?;
    let w = reg
        .spawn(&local(), shell("read line; echo got:$line; sleep 30"))
        .await?;
    reg.input(&w.id, bytes::Bytes::from_static(b"hello\n"))
        .await?;
    let mut out = reg
        .output(
            &w.id,
            OutputRequest {
                after: 0,
                follow: true,
            },
        )
        .await?;
    match tokio::time::timeout(WAIT, out.recv()).await? {
        Some(OutputEvent::Chunk(c)) => assert_eq!(&c.data[..], b"got:hello\n"),
        other => bail!("expected the echoed line, got {other:?}"),
    }
    reg.stop(&w.id, Some(Duration::from_secs(5))).await?;
    wait_state(&reg, &w.id, WorkerState::Stopped).await?;
    // A second stop is a no-op that succeeds, and the state stays.
    reg.stop(&w.id, None).await?;
    assert_eq!(reg.worker(&w.id)?.state, WorkerState::Stopped);
    reg.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_registry_issues_new_ids_for_new_workers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (first, _s1) = registry(dir.path()).await?;
    let a = first.spawn(&local(), shell("true")).await?;
    first.shutdown(None).await;
    drop(first);
    // Same state dir (same id key), new runtime instance: the new worker 1 is not the old.
    let (second, _s2) = registry(dir.path()).await?;
    let b = second.spawn(&local(), shell("true")).await?;
    assert_ne!(a.id, b.id);
    assert_eq!(second.worker(&a.id).unwrap_err().code(), "worker_not_found");
    second.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_shutdown_stops_workers_within_their_grace() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (reg, source) = registry(dir.path()).await?;
    let mut sub = reg.subscribe(None, None);
    sub.next().await.context("snapshot")?;
    let w = reg.spawn(&local(), shell("sleep 30")).await?;
    reg.shutdown(Some(Duration::from_secs(5))).await;
    let listed = source.list().await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, WorkerState::Stopped);
    // The subscription saw the worker stop before it ended.
    let mut last_state = None;
    while let Some(item) = tokio::time::timeout(WAIT, sub.next()).await? {
        if let EventPayload::WorkerUpserted { worker } = &*item.payload {
            if worker.id == w.id {
                last_state = Some(worker.state);
            }
        }
    }
    assert_eq!(last_state, Some(WorkerState::Stopped));
    Ok(())
}
