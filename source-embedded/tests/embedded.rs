//! What the embedded source adds to the common contract: its keys, its spawn checks, its
//! shutdown and its `Debug`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use registry_core::{
    Capabilities, HealthStatus, RegistryError, RuntimeSource, SourceEvent, SourceKey, SpawnRequest,
    WorkerState,
};
use source_embedded::{EmbeddedConfig, EmbeddedSource};
use tokio::time::timeout;
use worker_runtime::Profile;

const WAIT: Duration = Duration::from_secs(10);

fn source(max_workers: usize) -> EmbeddedSource {
    let shell = Profile {
        command: vec!["/bin/sh".into(), "-c".into()],
        ..Default::default()
    };
    EmbeddedSource::new(EmbeddedConfig {
        max_workers,
        profiles: BTreeMap::from([("shell".to_string(), shell)]),
        ..Default::default()
    })
    .expect("source starts")
}

fn shell(script: &str) -> SpawnRequest {
    SpawnRequest {
        profile: Some("shell".into()),
        args: vec![script.into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn capabilities_are_all_and_health_is_ready_while_all_is_well() {
    let source = source(4);
    assert_eq!(source.capabilities(), Capabilities::ALL);
    assert_eq!(source.health().await.status, HealthStatus::Ready);
}

#[tokio::test]
async fn a_runtime_without_containment_says_so_in_its_health() -> anyhow::Result<()> {
    let off = EmbeddedSource::new(EmbeddedConfig {
        contain: false,
        ..Default::default()
    })?;
    let health = off.health().await;
    assert_eq!(health.status, HealthStatus::Ready);
    let gap = health
        .diagnostics
        .iter()
        .find(|d| d.code == "not_contained")
        .context("a not_contained diagnostic")?;
    assert!(gap.message.contains("setsid"), "{}", gap.message);
    assert!(!gap.message.contains('/'), "{}", gap.message);
    // Where the host offers cgroup v2, a runtime with the default config contains its
    // workers and has nothing to say; where it doesn't, it says so in the same way.
    let default = source(4).health().await;
    let contained = !default
        .diagnostics
        .iter()
        .any(|d| d.code == "not_contained");
    assert_eq!(default.status, HealthStatus::Ready);
    if contained {
        assert!(default.diagnostics.is_empty(), "{default:?}");
    }
    Ok(())
}

#[tokio::test]
async fn health_is_degraded_once_the_watchdog_is_gone() -> anyhow::Result<()> {
    let source = source(4);
    let pid = source.watchdog_pid();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    assert!(killed.success());
    let deadline = tokio::time::Instant::now() + WAIT;
    let health = loop {
        let health = source.health().await;
        if health.status != HealthStatus::Ready || tokio::time::Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    let message = health.message.context("a degraded health has a message")?;
    assert!(message.contains("watchdog"), "{message}");
    assert!(
        !message.contains('/') && !message.contains(&pid.to_string()),
        "{message}"
    );
    let codes: Vec<&str> = health.diagnostics.iter().map(|d| d.code.as_str()).collect();
    assert_eq!(codes, ["watchdog_gone"]);
    // Until a new watchdog runs, a spawn is refused with a retry hint, not started unguarded.
    match source.spawn(shell("exit 0")).await {
        Err(RegistryError::RuntimeUnavailable { retry_after, .. }) => {
            assert!(retry_after.is_some_and(|r| r >= Duration::from_secs(1)));
        }
        // The new watchdog came first (it comes a second after the loss).
        Ok(worker) => assert!(!matches!(worker.state, WorkerState::Failed)),
        Err(e) => return Err(e.into()),
    }
    // Then it is back, and the runtime is ready and runs workers.
    let deadline = tokio::time::Instant::now() + WAIT;
    while source.health().await.status != HealthStatus::Ready {
        assert!(tokio::time::Instant::now() < deadline, "no new watchdog");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(source.watchdog_pid(), pid);
    let worker = source.spawn(shell("exit 0")).await?;
    assert!(!matches!(worker.state, WorkerState::Failed));
    Ok(())
}

#[tokio::test]
async fn a_key_of_another_runtime_or_in_another_spelling_is_not_found() -> anyhow::Result<()> {
    let (a, b) = (source(4), source(4));
    let worker = a.spawn(shell("exit 0")).await?;
    assert_eq!(
        b.get(&worker.key).await.unwrap_err().code(),
        "worker_not_found"
    );
    let (instance, id) = worker
        .key
        .as_str()
        .split_once(':')
        .context("key has a colon")?;
    for other in [
        format!("{instance}:0{id}"),
        format!("{instance}:+{id}"),
        format!("{instance}:{id}:"),
        format!("{instance}{id}"),
        format!(":{id}"),
        instance.to_string(),
    ] {
        let err = a.get(&SourceKey::new(other.clone())).await.unwrap_err();
        assert_eq!(err.code(), "worker_not_found", "for {other:?}");
    }
    assert!(a.get(&worker.key).await.is_ok());
    Ok(())
}

#[tokio::test]
async fn spawn_checks_profile_commands_and_capacity() -> anyhow::Result<()> {
    let source = source(1);
    let unknown = SpawnRequest {
        profile: Some("nope".into()),
        ..Default::default()
    };
    assert_eq!(
        source.spawn(unknown).await.unwrap_err().code(),
        "invalid_request"
    );
    let command = SpawnRequest {
        command: Some(vec!["/bin/true".into()]),
        ..Default::default()
    };
    assert_eq!(source.spawn(command).await.unwrap_err().code(), "forbidden");
    let both = SpawnRequest {
        command: Some(vec!["/bin/true".into()]),
        ..shell("exit 0")
    };
    assert_eq!(
        source.spawn(both).await.unwrap_err().code(),
        "invalid_request"
    );

    let live = source.spawn(shell("while :; do sleep 0.1; done")).await?;
    assert_eq!(
        source.spawn(shell("exit 0")).await.unwrap_err().code(),
        "capacity_exceeded"
    );
    source
        .stop(&live.key, Some(Duration::from_millis(200)))
        .await?;
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test]
async fn a_program_that_cannot_start_is_failed_with_spawn_failed() -> anyhow::Result<()> {
    let source = EmbeddedSource::new(EmbeddedConfig {
        allow_commands: true,
        ..Default::default()
    })?;
    let worker = source
        .spawn(SpawnRequest {
            command: Some(vec!["/nonexistent/program".into()]),
            ..Default::default()
        })
        .await?;
    assert_eq!(worker.state, WorkerState::Failed);
    assert_eq!(worker.reason, Some(registry_core::FailReason::SpawnFailed));
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_live_workers_and_ends_the_lifecycle_stream() -> anyhow::Result<()> {
    let source = source(4);
    let mut events = source.events().await?;
    assert!(matches!(events.recv().await, Some(SourceEvent::Resync(_))));
    let worker = source.spawn(shell("while :; do sleep 0.1; done")).await?;
    timeout(WAIT, source.shutdown(Some(Duration::from_millis(500)))).await?;
    let ended = source.get(&worker.key).await?;
    assert_eq!(ended.state, WorkerState::Stopped);
    // The stream reports the end, then ends.
    let mut last_state = None;
    while let Some(event) = timeout(WAIT, events.recv()).await? {
        if let SourceEvent::Upsert(w) = event {
            if w.key == worker.key {
                last_state = Some(w.state);
            }
        }
    }
    assert_eq!(last_state, Some(WorkerState::Stopped));
    assert_eq!(
        source.spawn(shell("exit 0")).await.unwrap_err().code(),
        "conflict",
        "a source that was shut down starts nothing"
    );
    Ok(())
}

#[tokio::test]
async fn dropping_a_lifecycle_stream_leaves_the_others_running() -> anyhow::Result<()> {
    let source = source(4);
    let dropped = source.events().await?;
    let mut kept = source.events().await?;
    drop(dropped);
    assert!(matches!(kept.recv().await, Some(SourceEvent::Resync(_))));
    let worker = source.spawn(shell("exit 0")).await?;
    loop {
        match timeout(WAIT, kept.recv()).await?.context("stream open")? {
            SourceEvent::Upsert(w) if w.key == worker.key && w.state.is_terminal() => break,
            _ => {}
        }
    }
    Ok(())
}

#[tokio::test]
async fn debug_shows_nothing_internal() -> anyhow::Result<()> {
    let source = source(4);
    let worker = source.spawn(shell("exit 0")).await?;
    let (instance, _) = worker
        .key
        .as_str()
        .split_once(':')
        .context("key has a colon")?;
    let debug = format!("{source:?}");
    assert!(!debug.contains(instance), "{debug}");
    assert!(!debug.contains("/bin/sh"), "{debug}");
    assert_eq!(debug, "EmbeddedSource { .. }");
    Ok(())
}
