//! The docker source's own behaviour against the real engine: what the conformance suite
//! cannot see — containers killed from outside, OOM kills, a restart of the source, the
//! labels and limits a container gets, and that nothing internal leaks.

mod common;

use std::collections::BTreeMap;

use bollard::query_parameters::KillContainerOptions;
use registry_core::{
    FailReason, HealthStatus, RuntimeSource, SourceEvent, SpawnRequest, WorkerState, WorkerView,
};
use source_docker::{DockerConfig, DockerSource, Profile};

use common::{read_output, shell, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_from_outside_is_failed_killed() -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    let state = common::StateDir::new(&socket);
    let source = common::source(common::config(&socket), state.path()).await;
    let w = source.spawn(shell("echo up; sleep 600", "victim")).await?;
    read_output(&source, &w.key, Some("up\n")).await?;
    common::client(&socket)
        .kill_container(
            w.key.as_str(),
            Some(KillContainerOptions {
                signal: "SIGKILL".into(),
            }),
        )
        .await?;
    let ended = wait_for(&source, &w.key, "terminal", |w| w.state.is_terminal()).await?;
    assert_eq!(ended.state, WorkerState::Failed, "{ended:?}");
    assert_eq!(ended.reason, Some(FailReason::Killed), "{ended:?}");
    assert!(ended.ended_at.is_some());
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_is_failed_killed_with_exit_code_137() -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    let mut config = common::config(&socket);
    config.profiles.insert(
        "small".into(),
        Profile {
            image: common::IMAGE.into(),
            command: vec!["/bin/sh".into(), "-c".into()],
            network: "none".into(),
            memory: Some(16 << 20),
            ..Default::default()
        },
    );
    let state = common::StateDir::new(&socket);
    let source = common::source(config, state.path()).await;
    let w = source
        .spawn(SpawnRequest {
            profile: Some("small".into()),
            args: vec!["x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived".into()],
            ..Default::default()
        })
        .await?;
    let ended = wait_for(&source, &w.key, "terminal", |w| w.state.is_terminal()).await?;
    assert_eq!(
        (ended.state, ended.reason, ended.exit_code),
        (WorkerState::Failed, Some(FailReason::Killed), Some(137)),
        "{ended:?}"
    );
    let (out, _) = read_output(&source, &w.key, None).await?;
    assert!(!out.contains("survived"), "{out:?}");
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_stderr_and_programs_that_cannot_run_map_as_documented() -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    let mut config = common::config(&socket);
    config.profiles.insert(
        "nobody-here".into(),
        Profile {
            image: common::IMAGE.into(),
            command: vec!["/bin/true".into()],
            network: "none".into(),
            user: Some("no-such-user".into()),
            ..Default::default()
        },
    );
    let state = common::StateDir::new(&socket);
    let source = common::source(config, state.path()).await;
    let w = source
        .spawn(shell("echo out; echo err >&2; exit 3", "codes"))
        .await?;
    let (out, err) = read_output(&source, &w.key, None).await?;
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    let ended = wait_for(&source, &w.key, "terminal", |w| w.state.is_terminal()).await?;
    assert_eq!(
        (ended.state, ended.exit_code),
        (WorkerState::Exited, Some(3))
    );

    // The init runs the program, and reports one it cannot run as a shell does.
    let missing = source
        .spawn(SpawnRequest {
            command: Some(vec!["/no/such/program".into()]),
            ..Default::default()
        })
        .await?;
    let ended = wait_for(&source, &missing.key, "terminal", |w| w.state.is_terminal()).await?;
    assert_eq!(
        (ended.state, ended.exit_code),
        (WorkerState::Exited, Some(127))
    );
    // A container the engine cannot start at all: no such user in the image.
    let unstartable = source
        .spawn(SpawnRequest {
            profile: Some("nobody-here".into()),
            ..Default::default()
        })
        .await?;
    assert_eq!(
        (unstartable.state, unstartable.reason),
        (WorkerState::Failed, Some(FailReason::SpawnFailed)),
        "{unstartable:?}"
    );
    let (out, _) = read_output(&source, &unstartable.key, None).await?;
    assert_eq!(out, "");
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_missing_from_the_engine_is_invalid_request_and_nothing_is_left(
) -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    let mut config = common::config(&socket);
    config.profiles.insert(
        "ghost".into(),
        Profile {
            image: "roster-test/not-there:0".into(),
            command: vec!["/bin/sh".into()],
            network: "none".into(),
            ..Default::default()
        },
    );
    let state = common::StateDir::new(&socket);
    let source = common::source(config, state.path()).await;
    let err = source
        .spawn(SpawnRequest {
            profile: Some("ghost".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request", "{err}");
    assert!(!err.to_string().contains("not-there"), "{err}");
    assert!(source.list().await?.is_empty());
    // The service keeps serving.
    let w = source.spawn(shell("exit 0", "after")).await?;
    wait_for(&source, &w.key, "exited", |w| {
        w.state == WorkerState::Exited
    })
    .await?;
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_carry_roster_labels_the_profile_limits_and_no_network() -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    let mut config = common::config(&socket);
    config.profiles.insert(
        "limited".into(),
        Profile {
            image: common::IMAGE.into(),
            command: vec!["/bin/sh".into(), "-c".into()],
            env: BTreeMap::from([("FROM_PROFILE".to_string(), "p".to_string())]).into(),
            cwd: Some(std::path::PathBuf::from("/tmp").into()),
            labels: BTreeMap::from([("team".to_string(), "a".to_string())]),
            network: "none".into(),
            memory: Some(32 << 20),
            cpus: Some(0.5),
            pids_limit: Some(16),
            user: Some("65534".into()),
            ..Default::default()
        },
    );
    let state = common::StateDir::new(&socket);
    let source = common::source(config, state.path()).await;
    let mut req = SpawnRequest {
        profile: Some("limited".into()),
        args: vec!["echo $FROM_PROFILE $FROM_REQUEST $(pwd) $(id -u); ls /sys/class/net".into()],
        ..Default::default()
    };
    req.env
        .insert("FROM_REQUEST".into(), "secret-value-r".into());
    let w = source.spawn(req).await?;
    let (out, _) = read_output(&source, &w.key, None).await?;
    assert_eq!(
        out, "p secret-value-r /tmp 65534\nlo\n",
        "only loopback: {out:?}"
    );

    let inspect = common::client(&socket)
        .inspect_container(w.key.as_str(), None)
        .await?;
    let labels = inspect.config.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels["roster.runtime"], "test");
    assert_eq!(labels["team"], "a");
    let instance = std::fs::read_to_string(state.path().join("docker-instance"))?;
    assert_eq!(labels["roster.instance"], instance.trim());
    assert!(
        labels.values().all(|v| !v.contains("secret-value-r")),
        "the environment is in no label: {labels:?}"
    );
    let host = inspect.host_config.unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(host.memory, Some(32 << 20));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.pids_limit, Some(16));
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_source_takes_its_containers_up_again_under_the_same_key() -> anyhow::Result<()>
{
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    let state = common::StateDir::new(&socket);
    let first = common::source(common::config(&socket), state.path()).await;
    let mut req = shell("echo before; read line; echo got:$line", "survivor");
    req.labels.insert("team".into(), "b".into());
    let live = first.spawn(req).await?;
    read_output(&first, &live.key, Some("before\n")).await?;
    let done = first.spawn(shell("echo finished; exit 4", "done")).await?;
    wait_for(&first, &done.key, "exited", |w| {
        w.state == WorkerState::Exited
    })
    .await?;
    // `roster` killed: the source goes without a shutdown; its containers keep running.
    drop(first);

    let second = common::source(common::config(&socket), state.path()).await;
    let again = wait_for(&second, &live.key, "running", |w| {
        w.state == WorkerState::Running
    })
    .await?;
    assert_eq!(again.name.as_deref(), Some("survivor"));
    assert_eq!(again.labels.get("team").map(String::as_str), Some("b"));
    assert_eq!(again.profile.as_deref(), Some("shell"));
    assert_eq!(again.created_at, live.created_at);
    let ended = wait_for(&second, &done.key, "exited", |w| w.state.is_terminal()).await?;
    assert_eq!(
        (ended.state, ended.exit_code),
        (WorkerState::Exited, Some(4))
    );
    let (out, _) = read_output(&second, &done.key, None).await?;
    assert_eq!(
        out, "finished\n",
        "output is read again from the engine's logs"
    );
    // Its stdin is attached again.
    second.input(&live.key, "hello\n".into()).await?;
    let (out, _) = read_output(&second, &live.key, None).await?;
    assert_eq!(out, "before\ngot:hello\n");
    assert_eq!(second.list().await?.len(), 2, "each container once");
    second.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_state_directory_never_sees_the_containers() -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    let (a, b) = (
        common::StateDir::new(&socket),
        common::StateDir::new(&socket),
    );
    let mine = common::source(common::config(&socket), a.path()).await;
    let other = common::source(common::config(&socket), b.path()).await;
    let w = mine.spawn(shell("sleep 600", "mine")).await?;
    wait_for(&mine, &w.key, "running", |w| {
        w.state == WorkerState::Running
    })
    .await?;
    assert!(other.list().await?.is_empty());
    assert_eq!(
        other.get(&w.key).await.unwrap_err().code(),
        "worker_not_found"
    );
    mine.shutdown(Some(std::time::Duration::ZERO)).await;
    other.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_internal_leaks_into_views_events_errors_or_debug() -> anyhow::Result<()> {
    let Some(socket) = common::engine().await else {
        return Ok(());
    };
    let state = common::StateDir::new(&socket);
    let source = common::source(common::config(&socket), state.path()).await;
    let mut events = source.events().await?;
    let w = source.spawn(shell("echo hi; exit 1", "leak")).await?;
    wait_for(&source, &w.key, "exited", |w| w.state.is_terminal()).await?;
    let mut text = String::new();
    let id: registry_core::WorkerId = "w_0123456789ABCDEFGHJKMNPQRS".parse()?;
    let runtime = registry_core::RuntimeId::new("test")?;
    while let Ok(Some(event)) =
        tokio::time::timeout(std::time::Duration::from_millis(500), events.recv()).await
    {
        text.push_str(&format!("{event:?}\n"));
        if let SourceEvent::Upsert(w) = &event {
            let view = WorkerView::from_source(id.clone(), runtime.clone(), w);
            text.push_str(&serde_json::to_string(&view)?);
        }
    }
    text.push_str(&format!("{source:?}\n{:?}\n", source.health().await));
    text.push_str(&format!("{:?}\n", source.list().await?));
    for err in [
        source.input(&w.key, "late".into()).await.unwrap_err(),
        source
            .spawn(SpawnRequest {
                profile: Some("nope".into()),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ] {
        text.push_str(&format!("{err} {err:?}\n"));
    }
    let unreachable = DockerSource::with_runtime(
        "test",
        DockerConfig {
            socket: "/srv/no-engine-here.sock".to_string().into(),
            ..common::config(&socket)
        },
        tempfile::tempdir()?.path(),
    )?;
    let health = unreachable.health().await;
    assert_eq!(health.status, HealthStatus::Unavailable);
    text.push_str(&format!("{health:?} {:?}\n", health.message));
    let err = unreachable.spawn(shell("true", "x")).await;
    text.push_str(&format!("{err:?}\n"));

    let inspect = common::client(&socket)
        .inspect_container(w.key.as_str(), None)
        .await?;
    let image_id = inspect.image.unwrap();
    let container = w.key.as_str();
    for secret in [
        container,
        &container[..12],
        image_id.trim_start_matches("sha256:"),
        &socket,
        "/srv/no-engine-here.sock",
        "docker.sock",
        common::IMAGE,
    ] {
        assert!(!text.contains(secret), "{secret:?} leaked into:\n{text}");
    }
    assert!(text.contains("leak"), "the test saw the worker: {text}");
    source.shutdown(None).await;
    unreachable.shutdown(None).await;
    Ok(())
}
