//! Restart policies through the HTTP API: each restart of a worker is a `worker.upserted`
//! with its `restarts`, `last_exit` and `retry_at`, and a client that resumes `/v1/events`
//! from a cursor taken mid-way sees every later one, in order, none twice.

mod common;

use anyhow::{ensure, Context as _, Result};
use common::{SseEvent, TestServer};
use serde_json::{json, Value};
use server_bin::ServeOptions;

/// The `worker.upserted` views of worker `id` among `events`.
fn upserts<'a>(events: &'a [SseEvent], id: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e.event == "worker.upserted" && e.data["worker"]["id"] == id)
        .map(|e| &e.data["worker"])
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_restart_is_an_event_a_resuming_client_sees_in_order() -> Result<()> {
    // The restarts come fast (bounds of 20, 40, 80 ms), then the worker fails as a crash loop.
    let profiles = r#"
        [profiles.crashy]
        command = ["/bin/sh", "-c"]
        restart = "on-failure"
        restart_backoff = { base = "20ms", cap = "80ms" }
        max_restarts = 3
    "#;
    let server = TestServer::start_with(common::config(profiles), ServeOptions::default()).await?;
    let mut first = server.sse("/v1/events", &[]).await?;
    let snapshot = first.next_event().await?;
    ensure!(snapshot.event == "snapshot", "{snapshot:?}");

    let body = json!({ "profile": "crashy", "args": ["echo run; exit 4"] }).to_string();
    let id = server
        .post("/v1/runtimes/local/workers", &body)
        .await?
        .created_id()?;
    // Read up to the first restart, then let go of the stream.
    let before = first
        .read_until(|e| {
            e.event == "worker.upserted"
                && e.data["worker"]["id"] == id.as_str()
                && e.data["worker"]["restarts"] == 1
        })
        .await?;
    let cursor = before
        .last()
        .and_then(|e| e.id.clone())
        .context("the event's cursor")?;
    drop(first);

    let end = server.wait_worker(&id, |w| w["state"] == "failed").await?;
    ensure!(end["reason"] == "crash_loop", "{end}");
    ensure!(end["restarts"] == 3 && end["retry_at"].is_null(), "{end}");
    ensure!(end["last_exit"]["code"] == 4, "{end}");

    let mut resumed = server
        .sse("/v1/events", &[("last-event-id", &cursor)])
        .await?;
    let after = resumed
        .read_until(|e| {
            e.event == "worker.upserted"
                && e.data["worker"]["id"] == id.as_str()
                && e.data["worker"]["state"] == "failed"
        })
        .await?;
    ensure!(
        after
            .iter()
            .all(|e| e.event != "snapshot" && e.event != "reset"),
        "a resume within the history is no reset: {after:?}"
    );

    // Together, in order: starting, running, then per restart `starting` with `retry_at` and
    // `last_exit`, `running`; then `failed`.
    let mut seen: Vec<&Value> = upserts(&before, &id);
    seen.extend(upserts(&after, &id));
    let shape: Vec<(String, u64, bool)> = seen
        .iter()
        .map(|w| {
            (
                w["state"].as_str().unwrap_or_default().to_string(),
                w["restarts"].as_u64().unwrap_or(99),
                !w["retry_at"].is_null(),
            )
        })
        .collect();
    let mut expected = vec![
        ("starting".to_string(), 0, false),
        ("running".into(), 0, false),
    ];
    for n in 1..=3 {
        expected.push(("starting".into(), n, true));
        expected.push(("running".into(), n, false));
    }
    expected.push(("failed".into(), 3, false));
    ensure!(shape == expected, "{shape:?}");
    for w in seen.iter().filter(|w| !w["retry_at"].is_null()) {
        ensure!(w["last_exit"]["code"] == 4, "{w}");
        ensure!(w["last_exit"]["at"].is_string(), "{w}");
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spawn_request_gives_its_own_restart_policy() -> Result<()> {
    let profiles = r#"
        [profiles.shell]
        command = ["/bin/sh", "-c"]
        [profiles.guarded]
        command = ["/bin/sh", "-c"]
        restart = "on-failure"
        on_unhealthy = "restart"
        probe = { exec = ["true"], interval = "1h" }
    "#;
    let server = TestServer::start_with(common::config(profiles), ServeOptions::default()).await?;
    let local = server.get("/v1/runtimes/local").await?.json()?;
    ensure!(local["capabilities"]["restart"] == true, "{local}");

    // The profile `shell` never restarts; the request asks for two restarts, then gives up.
    let body = json!({
        "profile": "shell", "args": ["exit 3"], "restart": "on-failure", "max_restarts": 2,
        "restart_backoff": { "base": "10ms", "cap": "20ms" }, "restart_window": "1m",
    })
    .to_string();
    let id = server
        .post("/v1/runtimes/local/workers", &body)
        .await?
        .created_id()?;
    let end = server.wait_worker(&id, |w| w["state"] == "failed").await?;
    ensure!(
        end["reason"] == "crash_loop" && end["restarts"] == 2,
        "{end}"
    );
    // Without restart keys, the profile's policy holds: `shell` never restarts.
    let once = server.spawn_shell("exit 3").await?;
    let end = server
        .wait_worker(&once, |w| w["state"] == "exited")
        .await?;
    ensure!(end["restarts"] == 0, "{end}");

    // Bad restart keys are refused, naming the key; nothing is started.
    for (body, names) in [
        (
            json!({"profile": "shell", "max_restarts": 10001}),
            "max_restarts",
        ),
        (
            json!({"profile": "shell", "restart": "sometimes"}),
            "restart",
        ),
        (
            json!({"profile": "shell", "restart_backoff": {"jitter": "1s"}}),
            "jitter",
        ),
        (
            json!({"profile": "shell", "restart_window": "forever"}),
            "restart_window",
        ),
        (
            json!({"profile": "shell", "restart_backoff": {"cap": "2days"}}),
            "restart_backoff.cap",
        ),
        // A profile that restarts unhealthy workers needs a policy that restarts.
        (
            json!({"profile": "guarded", "restart": "never"}),
            "on_unhealthy",
        ),
    ] {
        let answer = server
            .post("/v1/runtimes/local/workers", &body.to_string())
            .await?;
        ensure!(
            answer.status == 400 && answer.text().contains(names),
            "{body}: {} {}",
            answer.status,
            answer.text()
        );
    }
    let all = server.get("/v1/workers").await?.json()?;
    ensure!(all["workers"].as_array().map(Vec::len) == Some(2), "{all}");
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_without_the_restart_capability_refuses_a_restart_policy() -> Result<()> {
    let source = common::Fake::new(common::shell_source("")?).with_capabilities(|c| {
        c.restart = false;
    });
    let server = TestServer::start_with_source(
        "plain",
        "plain",
        std::sync::Arc::new(source),
        ServeOptions::default(),
    )
    .await?;
    let rt = server.get("/v1/runtimes/plain").await?.json()?;
    ensure!(rt["capabilities"]["restart"] == false, "{rt}");
    for body in [
        json!({"profile": "shell", "args": ["true"], "restart": "always"}),
        json!({"profile": "shell", "args": ["true"], "max_restarts": 1}),
        json!({"profile": "shell", "args": ["true"], "restart_backoff": {}}),
    ] {
        let answer = server
            .post("/v1/runtimes/plain/workers", &body.to_string())
            .await?;
        ensure!(
            answer.status == 501 && answer.code() == "unsupported",
            "{body}: {}",
            answer.text()
        );
        ensure!(answer.text().contains("restart"), "{}", answer.text());
    }
    let none = server.get("/v1/workers").await?.json()?;
    ensure!(
        none["workers"].as_array().is_some_and(Vec::is_empty),
        "{none}"
    );
    // Without restart keys it spawns as ever.
    let body = json!({"profile": "shell", "args": ["true"]}).to_string();
    let id = server
        .post("/v1/runtimes/plain/workers", &body)
        .await?
        .created_id()?;
    server.wait_worker(&id, |w| w["state"] == "exited").await?;
    server.stop().await?;
    Ok(())
}
