//! The slurm source against the real one-node test cluster: how jobs end, what a job
//! runs, a restart of roster, what Slurm refuses, the pinned API version, and that nothing
//! internal reaches a client of the HTTP API.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{shell, wait_for, Dirs, WAIT};
use registry_core::{FailReason, HealthStatus, RuntimeSource, SpawnRequest, WorkerState};
use source_slurm::{Profile, SlurmConfig, SlurmSource};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_from_outside_is_failed_killed_without_slurms_own_lines(
) -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let dirs = Dirs::new(&cluster);
    let source = common::source(cluster.config(dirs.output.path()), &dirs).await;
    let w = source
        .spawn(shell("echo ready; echo before >&2; sleep 300", "outside"))
        .await?;
    common::read_output(&source, &w.key, Some("ready\n")).await?;
    let status = cluster.command("scancel").arg(w.key.as_str()).status()?;
    assert!(status.success(), "scancel failed");
    let ended = wait_for(&source, &w.key, "terminal", WAIT, |w| w.state.is_terminal()).await?;
    assert_eq!(ended.state, WorkerState::Failed, "{ended:?}");
    assert_eq!(ended.reason, Some(FailReason::Killed), "{ended:?}");
    assert!(
        ended
            .message
            .as_deref()
            .is_some_and(|m| m.contains("cancelled")),
        "{ended:?}"
    );
    let (out, err) = common::read_output(&source, &w.key, None).await?;
    assert_eq!(out, "ready\n");
    assert!(err.starts_with("before\n"), "{err:?}");
    assert!(
        !err.contains("slurmstepd") && !err.contains("CANCELLED"),
        "slurmstepd's line (job id, node) reached the output: {err:?}"
    );
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_time_limit_is_failed_killed() -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let dirs = Dirs::new(&cluster);
    let mut config = cluster.config(dirs.output.path());
    // Slurm's smallest limit is a minute; it checks limits every 30 s or so.
    config.profiles.insert(
        "limited".into(),
        Profile {
            command: Some(vec!["/bin/sh".into(), "-c".into()]),
            time_limit: Some(Duration::from_secs(30)),
            ..Default::default()
        },
    );
    let source = common::source(config, &dirs).await;
    let w = source
        .spawn(SpawnRequest {
            profile: Some("limited".into()),
            args: vec!["echo started; sleep 600".into()],
            ..Default::default()
        })
        .await?;
    let ended = wait_for(&source, &w.key, "terminal", Duration::from_secs(240), |w| {
        w.state.is_terminal()
    })
    .await?;
    assert_eq!(
        (ended.state, ended.reason),
        (WorkerState::Failed, Some(FailReason::Killed)),
        "{ended:?}"
    );
    assert!(
        ended
            .message
            .as_deref()
            .is_some_and(|m| m.contains("time limit")),
        "{ended:?}"
    );
    let started = ended.started_at.expect("it ran");
    let took = ended.ended_at.expect("it ended") - started;
    assert!(
        took >= time::Duration::seconds(55),
        "a limit of 30 s is a minute in Slurm; it ended after {took}"
    );
    let (out, err) = common::read_output(&source, &w.key, None).await?;
    assert_eq!(out, "started\n");
    assert!(!err.contains("slurmstepd"), "{err:?}");
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_scripts_arguments_and_environment_map_as_documented() -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let dirs = Dirs::new(&cluster);
    let mut config = cluster.config(dirs.output.path());
    config.profiles.insert(
        "script".into(),
        Profile {
            script: Some("printf '[%s]' \"$@\"; echo \" $FROM_PROFILE $FROM_REQUEST\"".into()),
            env: BTreeMap::from([("FROM_PROFILE".to_string(), "p".to_string())]).into(),
            cwd: Some("/".into()),
            ..Default::default()
        },
    );
    let source = common::source(config, &dirs).await;

    let w = source
        .spawn(shell("echo out; echo err >&2; exit 3", "codes"))
        .await?;
    let (out, err) = common::read_output(&source, &w.key, None).await?;
    let ended = source.get(&w.key).await?;
    assert_eq!(
        (ended.state, ended.exit_code),
        (WorkerState::Exited, Some(3))
    );
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));

    let mut req = SpawnRequest {
        profile: Some("script".into()),
        args: vec!["a b".into(), "it's $HOME".into()],
        ..Default::default()
    };
    req.env
        .insert("FROM_REQUEST".into(), "secret-value-r".into());
    let w = source.spawn(req).await?;
    let (out, _) = common::read_output(&source, &w.key, None).await?;
    assert_eq!(out, "[a b][it's $HOME] p secret-value-r\n");
    let ended = source.get(&w.key).await?;
    assert_eq!(
        (ended.state, ended.exit_code),
        (WorkerState::Exited, Some(0))
    );
    assert!(!format!("{ended:?}").contains("secret-value-r"));

    let w = source.spawn(shell("kill -9 $$", "signalled")).await?;
    let ended = wait_for(&source, &w.key, "terminal", WAIT, |w| w.state.is_terminal()).await?;
    assert_eq!(
        (ended.state, ended.reason),
        (WorkerState::Failed, Some(FailReason::Killed)),
        "{ended:?}"
    );

    let err = source
        .spawn(SpawnRequest {
            stdin: Some("x".to_string().into()),
            ..shell("cat", "input")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unsupported", "{err}");
    let err = source.input(&w.key, "x".into()).await.unwrap_err();
    assert_eq!(err.code(), "unsupported", "{err}");
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_source_takes_its_jobs_up_again_under_the_same_key() -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let dirs = Dirs::new(&cluster);
    let config = cluster.config(dirs.output.path());
    let first = common::source(config.clone(), &dirs).await;
    let w = first
        .spawn(SpawnRequest {
            labels: BTreeMap::from([("team".to_string(), "a".to_string())]),
            request_id: Some("again-1".into()),
            ..shell("echo one; sleep 300", "kept")
        })
        .await?;
    common::read_output(&first, &w.key, Some("one\n")).await?;
    let done = first.spawn(shell("echo done", "ended")).await?;
    wait_for(&first, &done.key, "exited", WAIT, |w| w.state.is_terminal()).await?;
    // roster goes away without a shutdown: the jobs run on.
    drop(first);

    let second = common::source(config, &dirs).await;
    let again = wait_for(&second, &w.key, "running again", WAIT, |w| {
        w.state == WorkerState::Running
    })
    .await?;
    assert_eq!(again.name.as_deref(), Some("kept"));
    assert_eq!(again.labels.get("team").map(String::as_str), Some("a"));
    assert_eq!(again.args, vec!["echo one; sleep 300".to_string()]);
    let ended = wait_for(&second, &done.key, "taken up ended", WAIT, |w| {
        w.state.is_terminal()
    })
    .await?;
    assert_eq!(
        (ended.state, ended.exit_code),
        (WorkerState::Exited, Some(0))
    );
    let (out, _) = common::read_output(&second, &done.key, None).await?;
    assert_eq!(out, "done\n", "the output is read again from the file");
    // The same request_id answers the same worker.
    let repeat = second
        .spawn(SpawnRequest {
            labels: BTreeMap::from([("team".to_string(), "a".to_string())]),
            request_id: Some("again-1".into()),
            ..shell("echo one; sleep 300", "kept")
        })
        .await?;
    assert_eq!(repeat.key, w.key);
    second.stop(&w.key, Some(Duration::from_secs(5))).await?;
    let stopped = wait_for(&second, &w.key, "stopped", WAIT, |w| w.state.is_terminal()).await?;
    assert_eq!(stopped.state, WorkerState::Stopped, "{stopped:?}");

    // A removed record is not taken up again while the cluster still lists its job.
    second.remove(&done.key).await?;
    // Ready means its first list has been taken in (health and records change under one
    // lock): the ended worker is taken up (how it ends there is the job's word: a stop
    // asked of another source is not kept), the removed one is not.
    let third = common::source(cluster.config(dirs.output.path()), &dirs).await;
    third.get(&w.key).await?;
    wait_for(&third, &w.key, "taken up, ended", WAIT, |w| {
        w.state.is_terminal()
    })
    .await?;
    assert_eq!(
        third.get(&done.key).await.unwrap_err().code(),
        "worker_not_found"
    );
    second.shutdown(None).await;
    third.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_slurm_refuses_is_invalid_request_and_leaves_nothing() -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let dirs = Dirs::new(&cluster);
    let config = SlurmConfig {
        partition: Some("no-such-partition".into()),
        ..cluster.config(dirs.output.path())
    };
    let source = common::source(config, &dirs).await;
    let err = source.spawn(shell("true", "refused")).await.unwrap_err();
    assert_eq!(err.code(), "invalid_request", "{err}");
    assert!(err.to_string().contains("partition"), "{err}");
    assert!(source.list().await?.is_empty());
    let records = std::fs::read_dir(dirs.state.path().join("slurm-jobs"))?.count();
    assert_eq!(records, 0, "the record file of a refused job is removed");
    assert_eq!(source.health().await.status, HealthStatus::Ready);
    source.shutdown(None).await;
    Ok(())
}

/// A slurmrestd of the test cluster's that serves only `plugins`, on a free loopback
/// port; killed when dropped.
struct ExtraRest {
    child: std::process::Child,
    url: String,
}

impl ExtraRest {
    fn start(cluster: &common::Cluster, plugins: &str) -> anyhow::Result<ExtraRest> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("/usr/sbin/slurmrestd")
            .env("SLURM_JWT", "daemon")
            .args([
                "-f",
                &cluster.slurm_conf,
                "-a",
                "rest_auth/jwt",
                "-s",
                plugins,
            ])
            .args(["-u", "nobody", "-g", "nogroup"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(ExtraRest {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }
}

impl Drop for ExtraRest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_does_not_serve_the_api_version_is_refused_with_what_it_serves(
) -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let rest = ExtraRest::start(&cluster, "openapi/v0.0.37")?;
    let dirs = Dirs::new(&cluster);
    let pinned = SlurmSource::with_runtime(
        "test",
        SlurmConfig {
            url: rest.url.clone().into(),
            ..cluster.config(dirs.output.path())
        },
        dirs.state.path(),
    )?;
    let health = testkit::eventually("the version to be refused", WAIT, || async {
        let h = pinned.health().await;
        let refused = h
            .message
            .as_deref()
            .is_some_and(|m| m.contains("api_version"));
        Ok(refused.then_some(h))
    })
    .await?;
    assert_eq!(health.status, HealthStatus::Unavailable);
    let message = health.message.unwrap();
    assert!(
        message.contains("v0.0.38") && message.contains("v0.0.37"),
        "{message}"
    );
    assert!(!message.contains("127.0.0.1"), "{message}");
    let err = pinned.spawn(shell("true", "x")).await.unwrap_err();
    assert_eq!(err.code(), "runtime_unavailable", "{err}");
    pinned.shutdown(None).await;

    // The version it serves works.
    let other = Dirs::new(&cluster);
    let served = common::source(
        SlurmConfig {
            url: rest.url.clone().into(),
            api_version: "v0.0.37".into(),
            ..cluster.config(other.output.path())
        },
        &other,
    )
    .await;
    let w = served.spawn(shell("echo on-37", "v37")).await?;
    let (out, _) = common::read_output(&served, &w.key, None).await?;
    assert_eq!(out, "on-37\n");
    served.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_internal_leaks_through_the_http_api() -> anyhow::Result<()> {
    let Some(cluster) = common::cluster().await else {
        return Ok(());
    };
    let output = tempfile::tempdir()?;
    let text = format!(
        r#"
[[runtimes]]
name = "hpc"
source = "slurm"
url = "{url}"
user = "{user}"
token_file = "{token}"
output_dir = "{out}"
poll_interval = "250ms"
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]
"#,
        url = cluster.url,
        user = cluster.user,
        token = cluster.token_file.display(),
        out = output.path().display(),
    );
    let config = server_bin::config::Config::parse(&text)?;
    let server = testkit::TestServer::start_with(config, Default::default()).await?;
    testkit::eventually("the runtime to be ready", WAIT, || async {
        let r = server.get("/v1/runtimes/hpc").await?.json()?;
        Ok((r["health"]["status"] == "ready").then_some(()))
    })
    .await?;
    let mut events = server.sse("/v1/events", &[]).await?;
    let body =
        serde_json::json!({"profile": "shell", "args": ["echo hi; sleep 300"], "name": "leak"});
    let id = server
        .post("/v1/runtimes/hpc/workers", &body.to_string())
        .await?
        .created_id()?;
    testkit::eventually("the worker to run", WAIT, || async {
        let w = server.get(&format!("/v1/workers/{id}")).await?.json()?;
        Ok((w["state"] == "running").then_some(()))
    })
    .await?;
    // Cancelled from outside, so slurmstepd writes its line (job id, node) to stderr.
    let prefix_file = std::fs::read_dir(output.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".out"))
        .expect("the job's output file");
    let job_name = prefix_file.trim_end_matches(".out").to_string();
    let squeue = cluster
        .command("squeue")
        .args(["-h", "-o", "%i", "-n", &job_name])
        .output()?;
    let job_id = String::from_utf8(squeue.stdout)?.trim().to_string();
    assert!(!job_id.is_empty(), "squeue shows the job");
    assert!(cluster.command("scancel").arg(&job_id).status()?.success());
    testkit::eventually("the worker to end", WAIT, || async {
        let w = server.get(&format!("/v1/workers/{id}")).await?.json()?;
        Ok((w["state"] == "failed").then_some(()))
    })
    .await?;
    let mut out = server
        .sse(&format!("/v1/workers/{id}/output?follow=0"), &[])
        .await?;
    let seen = out.rest(Duration::from_secs(5)).await?;
    assert!(
        seen.iter()
            .any(|e| e.event == "output" && e.data["data"] == "hi\n"),
        "{seen:?}"
    );
    // The live event stream: what it sent up to now (it does not close).
    while let Ok(Some(_)) = events.next_event_within(Duration::from_secs(1)).await {}
    for path in [
        "/v1/runtimes",
        "/v1/runtimes/hpc",
        "/v1/workers",
        "/v1/runtimes/hpc/profiles",
    ] {
        server.get(path).await?;
    }
    let input = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": "x"}"#)
        .await?;
    assert_eq!(input.status.as_u16(), 501, "input is unsupported");
    let bad = server
        .post(
            "/v1/runtimes/hpc/workers",
            r#"{"profile": "shell", "stdin": "x", "args": ["true"]}"#,
        )
        .await?;
    assert_eq!(bad.status.as_u16(), 501);
    let token = std::fs::read_to_string(&cluster.token_file)?;
    let authority = cluster.url.trim_start_matches("http://").to_string();
    let needles = vec![
        job_name.clone(),
        job_name[..job_name.len() - 12].to_string(),
        format!("JOB {job_id} "),
        format!("\"{job_id}\""),
        output.path().display().to_string(),
        authority,
        token.trim().to_string(),
        "slurmstepd".to_string(),
        "X-SLURM".to_string(),
    ];
    server.seen().assert_free_of(&needles)?;
    assert!(
        server.seen().text().contains("leak"),
        "the test saw the worker"
    );
    server.stop().await?;
    Ok(())
}
