//! Health probes through the HTTP API, against real listeners the test controls: an `http`
//! probe following a server whose answer the test flips, a `tcp` probe following a listener
//! that comes and goes, an `exec` probe following a file; `?health=` and the health metric;
//! `on_unhealthy = "restart"` restarting a worker through its restart policy (same id, the
//! restart count growing). No probe target reaches any byte a client gets.

mod common;

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Context as _, Result};
use common::{eventually, SseEvent, TestServer, WAIT};
use serde_json::{json, Value};
use server_bin::ServeOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

/// A tiny HTTP/1.1 server on loopback answering every request with the status in `status`,
/// counting the requests it answered.
struct FlipServer {
    port: u16,
    status: Arc<AtomicU16>,
    answered: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FlipServer {
    async fn start(status: u16) -> Result<FlipServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let status = Arc::new(AtomicU16::new(status));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, a) = (Arc::clone(&status), Arc::clone(&answered));
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (s, a) = (Arc::clone(&s), Arc::clone(&a));
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 512];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let code = s.load(Ordering::SeqCst);
                    let answer = format!(
                        "HTTP/1.1 {code} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                    a.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok(FlipServer {
            port,
            status,
            answered,
            task,
        })
    }
}

impl Drop for FlipServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener on `127.0.0.1:port` (any port with 0) that accepts and drops connections.
fn listen(port: u16) -> Result<(u16, JoinHandle<()>)> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(([127, 0, 0, 1], port).into())?;
    let listener = socket.listen(64)?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            drop(conn);
        }
    });
    Ok((port, task))
}

/// Stops an accepting task and waits until its listener is closed.
async fn close(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

/// Spawns `script` with `profile` in runtime `local`.
async fn spawn(server: &TestServer, profile: &str, script: &str) -> Result<String> {
    let body = json!({ "profile": profile, "args": [script] }).to_string();
    server
        .post("/v1/runtimes/local/workers", &body)
        .await?
        .created_id()
}

/// Waits until the worker's health is `status`.
async fn wait_health(server: &TestServer, id: &str, status: &str) -> Result<Value> {
    server
        .wait_worker(id, |w| w["health"]["status"] == status)
        .await
}

/// The ids of `GET /v1/workers?health=…`.
async fn listed(server: &TestServer, health: &str) -> Result<Vec<String>> {
    let page = server
        .get(&format!("/v1/workers?health={health}"))
        .await?
        .json()?;
    Ok(page["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .filter_map(|w| w["id"].as_str().map(str::to_string))
        .collect())
}

/// The value of `roster_worker_health{runtime="local",health=…}`.
async fn metric(server: &TestServer, health: &str) -> Result<String> {
    let text = server.get("/metrics").await?.text();
    let series = format!("roster_worker_health{{runtime=\"local\",health=\"{health}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map(str::to_string)
        .with_context(|| format!("no {series} in {text}"))
}

/// The health statuses, in order and without repeats, of worker `id`'s `worker.upserted`
/// events.
fn health_changes(events: &[SseEvent], id: &str) -> Vec<String> {
    let mut changes: Vec<String> = Vec::new();
    for e in events
        .iter()
        .filter(|e| e.event == "worker.upserted" && e.data["worker"]["id"] == id)
    {
        if let Some(status) = e.data["worker"]["health"]["status"].as_str() {
            if changes.last().map(String::as_str) != Some(status) {
                changes.push(status.to_string());
            }
        }
    }
    changes
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http_probe_follows_the_answers_of_a_real_server() -> Result<()> {
    let web = FlipServer::start(200).await?;
    let target = format!("127.0.0.1:{}", web.port);
    let path = "/healthz-a7f3q";
    let profiles = format!(
        r#"
        [profiles.shell]
        command = ["/bin/sh", "-c"]
        [profiles.web]
        command = ["/bin/sh", "-c"]
        probe = {{ http = "http://{target}{path}", interval = "50ms", timeout = "5s", failure_threshold = 2 }}
        "#
    );
    let server = TestServer::start_with(common::config(&profiles), ServeOptions::default()).await?;
    let mut events = server.sse("/v1/events", &[]).await?;
    let plain = server.spawn_shell("exec sleep 60").await?;
    let id = spawn(&server, "web", "exec sleep 60").await?;

    let healthy = wait_health(&server, &id, "healthy").await?;
    ensure!(healthy["health"]["probe"] == "http", "{healthy}");
    ensure!(healthy["health"]["since"].is_string(), "{healthy}");
    let no_probe = server.get(&format!("/v1/workers/{plain}")).await?.json()?;
    ensure!(
        no_probe.get("health").is_none(),
        "absent without a probe: {no_probe}"
    );
    ensure!(
        listed(&server, "healthy").await? == std::slice::from_ref(&id),
        "only the probed worker"
    );
    ensure!(listed(&server, "unhealthy").await?.is_empty());
    ensure!(metric(&server, "healthy").await? == "1");

    // The server turns sick: after two failures in a row, unhealthy; the worker keeps running.
    web.status.store(503, Ordering::SeqCst);
    let sick = wait_health(&server, &id, "unhealthy").await?;
    ensure!(
        sick["state"] == "running" && sick["restarts"] == 0,
        "{sick}"
    );
    ensure!(
        sick["health"]["since"] != healthy["health"]["since"],
        "{sick}"
    );
    ensure!(listed(&server, "unhealthy").await? == std::slice::from_ref(&id));
    ensure!(listed(&server, "healthy").await?.is_empty());
    ensure!(metric(&server, "unhealthy").await? == "1");
    ensure!(metric(&server, "healthy").await? == "0");

    // A redirect counts as healthy, like any 2xx or 3xx.
    web.status.store(302, Ordering::SeqCst);
    wait_health(&server, &id, "healthy").await?;
    ensure!(
        web.answered.load(Ordering::SeqCst) >= 4,
        "the probe asked the server"
    );

    let bad = server.get("/v1/workers?health=sick").await?;
    ensure!(
        bad.status == 400 && bad.code() == "invalid_request",
        "{}",
        bad.text()
    );

    // Every change was a `worker.upserted`, in order.
    let seen = events
        .read_until(|e| {
            e.event == "worker.upserted"
                && e.data["worker"]["id"] == id.as_str()
                && e.data["worker"]["health"]["status"] == "healthy"
                && e.data["worker"]["health"]["since"] != healthy["health"]["since"]
        })
        .await?;
    let changes = health_changes(&seen, &id);
    ensure!(
        changes == ["unknown", "healthy", "unhealthy", "healthy"],
        "{changes:?}"
    );
    drop(events);

    for w in [&id, &plain] {
        server.post(&format!("/v1/workers/{w}/stop"), "{}").await?;
        server.wait_worker(w, |w| w["state"] == "stopped").await?;
    }
    // Nothing a client got names the probe's address or path.
    server
        .seen()
        .assert_free_of(&[target.clone(), path.to_string()])?;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_probe_follows_a_listener_that_comes_and_goes() -> Result<()> {
    let (port, accepting) = listen(0)?;
    let target = format!("127.0.0.1:{port}");
    let profiles = format!(
        r#"
        [profiles.svc]
        command = ["/bin/sh", "-c"]
        probe = {{ tcp = "{target}", interval = "50ms", timeout = "5s", failure_threshold = 1, success_threshold = 2 }}
        "#
    );
    let server = TestServer::start_with(common::config(&profiles), ServeOptions::default()).await?;
    let id = spawn(&server, "svc", "exec sleep 60").await?;
    let up = wait_health(&server, &id, "healthy").await?;
    ensure!(up["health"]["probe"] == "tcp", "{up}");

    close(accepting).await;
    wait_health(&server, &id, "unhealthy").await?;

    let (_, accepting) = listen(port)?;
    wait_health(&server, &id, "healthy").await?;
    close(accepting).await;

    server.post(&format!("/v1/workers/{id}/stop"), "{}").await?;
    server.wait_worker(&id, |w| w["state"] == "stopped").await?;
    server.seen().assert_free_of(&[target])?;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_probe_follows_its_command_s_exit_code() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let flag = dir.path().join("healthy-flag-k2v9");
    let script = format!("test -e '{}'", flag.display());
    let profiles = format!(
        r#"
        [profiles.job]
        command = ["/bin/sh", "-c"]
        probe = {{ exec = ["/bin/sh", "-c", "{script}"], interval = "50ms", timeout = "5s", failure_threshold = 1 }}
        "#
    );
    let server = TestServer::start_with(common::config(&profiles), ServeOptions::default()).await?;
    let id = spawn(&server, "job", "exec sleep 60").await?;
    let sick = wait_health(&server, &id, "unhealthy").await?;
    ensure!(sick["health"]["probe"] == "exec", "{sick}");

    std::fs::write(&flag, b"")?;
    wait_health(&server, &id, "healthy").await?;
    std::fs::remove_file(&flag)?;
    wait_health(&server, &id, "unhealthy").await?;

    server.post(&format!("/v1/workers/{id}/stop"), "{}").await?;
    server.wait_worker(&id, |w| w["state"] == "stopped").await?;
    server.seen().assert_free_of(&[
        script.clone(),
        "healthy-flag-k2v9".to_string(),
        dir.path().display().to_string(),
    ])?;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unhealthy_worker_is_restarted_through_its_restart_policy() -> Result<()> {
    // A port bound but not listening refuses every connection, and no other test can take
    // it meanwhile: every probe fails.
    let holder = TcpSocket::new_v4()?;
    holder.bind(([127, 0, 0, 1], 0).into())?;
    let port = holder.local_addr()?.port();
    let profiles = format!(
        r#"
        [profiles.flaky]
        command = ["/bin/sh", "-c"]
        restart = "on-failure"
        restart_backoff = {{ base = "20ms", cap = "50ms" }}
        max_restarts = 100
        grace = "5s"
        on_unhealthy = "restart"
        probe = {{ tcp = "127.0.0.1:{port}", interval = "50ms", timeout = "5s", failure_threshold = 1 }}
        "#
    );
    let server = TestServer::start_with(common::config(&profiles), ServeOptions::default()).await?;
    // The worker exits 0 on SIGTERM: a stop for being unhealthy is a failure all the same.
    let id = spawn(
        &server,
        "flaky",
        "trap 'exit 0' TERM; echo run; while :; do sleep 0.05; done",
    )
    .await?;
    let again = server
        .wait_worker(&id, |w| w["restarts"].as_u64().is_some_and(|n| n >= 2))
        .await?;
    ensure!(again["id"] == id.as_str(), "the id is kept: {again}");
    ensure!(again["last_exit"]["at"].is_string(), "{again}");

    // The output marks each restart with its cause.
    let output = server
        .get(&format!("/v1/workers/{id}/output?follow=0"))
        .await?
        .text();
    ensure!(
        output.contains("its health probe failed"),
        "a restart marker names the probe: {output}"
    );

    // A stop ends the policy: the worker ends `stopped` and is not started again.
    server.post(&format!("/v1/workers/{id}/stop"), "{}").await?;
    let end = server.wait_worker(&id, |w| w["state"] == "stopped").await?;
    let restarts = end["restarts"].clone();
    let still = server.get(&format!("/v1/workers/{id}")).await?.json()?;
    ensure!(
        still["restarts"] == restarts && still["state"] == "stopped",
        "{still}"
    );
    server
        .seen()
        .assert_free_of(&[format!("127.0.0.1:{port}")])?;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_probe_that_never_answers_counts_as_failed_at_its_timeout() -> Result<()> {
    // A listener that accepts and never answers: the http probe waits until its timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            // Bounded: the probe opens one connection per interval.
            if conns.len() < 256 {
                conns.push(conn);
            }
        }
    });
    let profiles = format!(
        r#"
        [profiles.mute]
        command = ["/bin/sh", "-c"]
        probe = {{ http = "http://127.0.0.1:{port}/", interval = "50ms", timeout = "100ms", failure_threshold = 2 }}
        "#
    );
    let server = TestServer::start_with(common::config(&profiles), ServeOptions::default()).await?;
    let id = spawn(&server, "mute", "exec sleep 60").await?;
    wait_health(&server, &id, "unhealthy").await?;
    held.abort();
    server.post(&format!("/v1/workers/{id}/stop"), "{}").await?;
    eventually("the worker to stop", WAIT, || async {
        let w = server.get(&format!("/v1/workers/{id}")).await?.json()?;
        Ok((w["state"] == "stopped").then_some(()))
    })
    .await?;
    server.stop().await?;
    Ok(())
}
