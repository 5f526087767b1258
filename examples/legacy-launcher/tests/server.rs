//! The `local` source behind the real HTTP server (server-bin as a library, on
//! 127.0.0.1:0): the launcher's worker as clients see it, spawning refused, diagnostics on
//! the runtime, output over SSE, input and stop through the API — and a search of every byte
//! the server sent for the spool directory, the log and socket paths, the descriptor's file
//! name and the pid.

#[path = "../../../server-bin/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use http::StatusCode;
use serde_json::{json, Value};
use server_bin::config::Config;
use server_bin::ServeOptions;

use common::{TestServer, WAIT};
use support::launch;

/// A server with one `local` runtime `legacy` on `spool`.
async fn server(spool: &std::path::Path) -> Result<TestServer> {
    let spool_text = toml::Value::String(spool.to_str().context("a UTF-8 path")?.to_string());
    let text = format!(
        "[[runtimes]]\nname = \"legacy\"\nsource = \"local\"\nspool_dir = {spool_text}\n\
         grace = \"2s\"\n"
    );
    let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let factories = server_bin::default_factories();
    ensure!(
        factories.kinds().contains(&"local"),
        "roster's default kinds must hold `local`: {:?}",
        factories.kinds()
    );
    TestServer::start_in_with(
        tempfile::tempdir()?,
        config,
        &factories,
        ServeOptions::default(),
    )
    .await
}

/// Polls `GET /v1/workers?runtime=legacy` until a worker named `name` is there.
async fn listed(server: &TestServer, name: &str) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = server.get("/v1/workers?runtime=legacy").await?.json()?;
        let found = list["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["name"] == name).cloned());
        if let Some(w) = found {
            return Ok(w);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the worker {name:?} was never listed: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ways a pid shows in JSON or text (a bare number could match a timestamp).
fn pid_needles(pid: i32) -> Vec<String> {
    vec![
        format!("\"{pid}\""),
        format!(":{pid},"),
        format!(":{pid}}}"),
        format!("={pid}"),
        format!(" {pid} "),
        format!(" {pid}."),
        format!("/{pid}"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launcher_worker_through_the_api_leaks_nothing() -> Result<()> {
    let spool = tempfile::tempdir()?;
    let server = server(spool.path()).await?;
    let mut events = server.sse("/v1/events?runtime=legacy", &[]).await?;

    let w = launch(
        spool.path(),
        "api-worker",
        "echo hello-from-legacy; while read line; do echo \"got:$line\"; done",
        &[],
    )
    .await?;
    let worker = listed(&server, "api-worker").await?;
    let id = worker["id"].as_str().context("an id")?.to_string();
    assert!(id.starts_with("w_") && id.len() == 28, "{worker}");
    assert_eq!(worker["runtime_id"], "legacy");
    assert_eq!(worker["exit_code"], Value::Null);
    let running = server.wait_worker(&id, |w| w["state"] == "running").await?;
    assert_eq!(running["started_at"], running["created_at"], "{running}");

    // Spawning here is 501 unsupported, and the runtime says why in its capabilities.
    let spawn = server
        .post(
            "/v1/runtimes/legacy/workers",
            &json!({"command": ["/bin/sh", "-c", "exit 0"]}).to_string(),
        )
        .await?;
    assert_eq!(
        spawn.status,
        StatusCode::NOT_IMPLEMENTED,
        "{}",
        spawn.text()
    );
    assert_eq!(spawn.code(), "unsupported");

    // A bad descriptor shows as a diagnostic of the runtime.
    std::fs::write(spool.path().join("zqbadzq.json"), r#"{"pid": true}"#)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let runtime = loop {
        let rt = server.get("/v1/runtimes/legacy").await?.json()?;
        let diagnosed = rt["diagnostics"]
            .as_array()
            .is_some_and(|ds| ds.iter().any(|d| d["code"] == "descriptor_malformed"));
        if diagnosed {
            break rt;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no diagnostic came: {rt}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(runtime["kind"], "local");
    assert_eq!(
        runtime["capabilities"],
        json!({"spawn": false, "input": true, "stop": true, "output": true, "remove": true,
               "restart": false})
    );
    assert_eq!(runtime["health"]["status"], "degraded", "{runtime}");
    let all = server.get("/v1/runtimes").await?.json()?;
    assert!(all.to_string().contains("descriptor_malformed"), "{all}");

    // Output over SSE, input through the API.
    let mut out = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    let is_text = |needle: &'static str| {
        move |e: &common::SseEvent| {
            e.event == "output" && e.data["data"].as_str().is_some_and(|d| d.contains(needle))
        }
    };
    let first = out.read_until(is_text("hello-from-legacy")).await?;
    let chunk = first.last().context("an output event")?;
    assert_eq!(chunk.data["seq"], 1);
    assert_eq!(chunk.data["stream"], "stdout");
    let input = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": "ping\n"}"#)
        .await?;
    assert_eq!(input.status, StatusCode::ACCEPTED, "{}", input.text());
    out.read_until(is_text("got:ping")).await?;

    // Stop through the API: stopped, and the output stream ends with `end`.
    let stop = server
        .post(&format!("/v1/workers/{id}/stop"), r#"{"grace_ms": 2000}"#)
        .await?;
    assert_eq!(stop.status, StatusCode::ACCEPTED, "{}", stop.text());
    let stopped = server.wait_worker(&id, |w| w["state"] == "stopped").await?;
    assert_eq!(stopped["exit_code"], Value::Null);
    let rest = out.rest(WAIT).await?;
    assert_eq!(
        rest.last().map(|e| e.event.as_str()),
        Some("end"),
        "{rest:?}"
    );
    support::wait_until("the worker's end", WAIT, || !w.alive()).await?;
    events
        .read_until(|e| e.event == "worker.upserted" && e.data["worker"]["state"] == "stopped")
        .await?;

    // Input to the ended worker: 409; removing it: 204, then 404.
    let late = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": "late\n"}"#)
        .await?;
    assert_eq!(late.status, StatusCode::CONFLICT, "{}", late.text());
    let removed = server
        .request(
            http::Method::DELETE,
            &format!("/v1/workers/{id}"),
            &[],
            None,
        )
        .await?;
    assert_eq!(removed.status, StatusCode::NO_CONTENT, "{}", removed.text());
    let gone = server.get(&format!("/v1/workers/{id}")).await?;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);

    // Nothing any client got names the internal authority behind the worker.
    let mut needles = vec![
        spool.path().display().to_string(),
        spool
            .path()
            .file_name()
            .context("a temp dir name")?
            .to_string_lossy()
            .into_owned(),
        w.log().display().to_string(),
        w.socket().context("a socket")?.display().to_string(),
        w.descriptor
            .file_stem()
            .context("a descriptor name")?
            .to_string_lossy()
            .into_owned(),
        "zqbadzq".to_string(),
        ".json".to_string(),
        ".sock".to_string(),
        ".log".to_string(),
    ];
    needles.extend(pid_needles(w.pid));
    server.seen().assert_free_of(&needles)?;
    // The search can fail: the pid and the path do reach a client when a worker prints
    // them, which is the worker's business (checked here on the search's own input).
    let probe = common::Seen::default();
    probe.record(format!("{{\"pid\":{}}}", w.pid).as_bytes());
    assert!(probe.assert_free_of(&needles).is_err());

    server.stop().await?;
    Ok(())
}
