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
