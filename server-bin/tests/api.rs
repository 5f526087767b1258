//! The HTTP API where a client touches it: every route of SPEC §4 with its status and body
//! shape, every error code of SPEC §6 with its status, body and headers, request ids, and
//! concurrent spawns, all against a real server on 127.0.0.1:0 running real processes.
mod common;

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use common::{shell_source, Fake, TestResponse, TestServer};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper::body::Frame;
use registry_core::RegistryError;
use serde_json::{json, Value};
use server_bin::config::{LoadedToken, Scope};
use server_bin::ServeOptions;
use source_embedded::EmbeddedSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where workers of the default runtime are spawned.
const SPAWN: &str = "/v1/runtimes/local/workers";

/// A well-formed worker id that no registry issued.
const UNKNOWN_ID: &str = "w_0123456789ABCDEFGHJKMNPQRS";

const READ_SECRET: &str = "read-secret-for-the-api-tests";
const OPERATE_SECRET: &str = "operate-secret-for-the-api-tests";

// ---------------------------------------------------------------------------------------
// Checks and small clients
// ---------------------------------------------------------------------------------------

/// Whether the contract calls an error code retryable.
fn retryable(code: &str) -> bool {
    matches!(
        code,
        "capacity_exceeded" | "runtime_unavailable" | "upstream_timeout"
    )
}

/// Checks that `resp` is the error `code` with `status` in the contract's shape, and returns
/// its message.
#[track_caller]
fn assert_error(resp: &TestResponse, status: StatusCode, code: &str) -> String {
    let text = resp.text();
    assert_eq!(resp.status, status, "{code}: {text}");
    let content_type = resp
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{code}: content type {content_type:?}"
    );
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {text}"));
    let keys: BTreeSet<&str> = error.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["code", "message", "retryable"]),
        "{text}"
    );
    assert_eq!(error["code"], code, "{text}");
    assert_eq!(error["retryable"], retryable(code), "{text}");
    let message = error["message"].as_str().unwrap_or_default().to_string();
    assert!(message.len() >= 10, "a message a person can read: {text}");
    assert!(
        resp.headers.contains_key("x-request-id"),
        "{code}: no x-request-id"
    );
    message
}

/// The `Retry-After` header in whole seconds.
#[track_caller]
fn retry_after(resp: &TestResponse) -> u64 {
    resp.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in whole seconds: {:?}", resp.headers))
}

/// `POST /v1/runtimes/local/workers` that must answer `201`; the worker.
async fn spawn(server: &TestServer, body: Value) -> Result<Value> {
    let resp = server.post(SPAWN, &body.to_string()).await?;
    anyhow::ensure!(
        resp.status == StatusCode::CREATED,
        "spawn answered {}: {}",
        resp.status,
        resp.text()
    );
    resp.json()
}

/// A worker that lives until it is stopped.
async fn sleeper(server: &TestServer) -> Result<String> {
    server.spawn_shell("exec sleep 30").await
}

fn state_is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |w| w["state"] == state
}

/// The ids of a `GET /v1/workers…` answer (which must be `200`), in order.
async fn listed(server: &TestServer, path: &str) -> Result<Vec<String>> {
    let resp = server.get(path).await?;
    anyhow::ensure!(resp.status == StatusCode::OK, "{path}: {}", resp.text());
    let body = resp.json()?;
    Ok(body["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .map(|w| w["id"].as_str().unwrap_or_default().to_string())
        .collect())
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// Everything a worker wrote, read with `?follow=0` once it is terminal.
async fn output_text(server: &TestServer, id: &str) -> Result<String> {
    let mut stream = server
        .sse(&format!("/v1/workers/{id}/output?follow=0"), &[])
        .await?;
    let events = stream.rest(common::WAIT).await?;
    anyhow::ensure!(
        events.last().is_some_and(|e| e.event == "end"),
        "the stream of a terminal worker ends with `end`: {events:?}"
    );
    Ok(events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| e.data["data"].as_str().unwrap_or_default())
        .collect())
}

/// One request built in full by the test (any `Host`, any body type), on a new connection.
async fn send_request<B>(server: &TestServer, req: Request<B>) -> Result<TestResponse>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(server.addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = tokio::time::timeout(common::WAIT, sender.send_request(req))
        .await
        .context("request timed out")??;
    TestResponse::read(resp).await
}

/// A request body in pieces with no announced length: it goes out chunked.
struct Pieces(VecDeque<Bytes>);

impl Pieces {
    fn new(text: &str, piece: usize) -> Pieces {
        Pieces(
            text.as_bytes()
                .chunks(piece)
                .map(Bytes::copy_from_slice)
                .collect(),
        )
    }
}

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|piece| Ok(Frame::data(piece))))
    }
}

/// Checks that the server still answers `GET /healthz` with `200`.
async fn assert_still_serving(server: &TestServer) -> Result<()> {
    let resp = server.get("/healthz").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()?, json!({ "status": "ok" }));
    Ok(())
}

fn token_options() -> ServeOptions {
    ServeOptions {
        tokens: vec![
            LoadedToken {
                name: "reader".into(),
                scope: Scope::Read,
                secret: READ_SECRET.into(),
            },
            LoadedToken {
                name: "operator".into(),
                scope: Scope::Operate,
                secret: OPERATE_SECRET.into(),
            },
        ],
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// A runtime whose source fails on purpose
// ---------------------------------------------------------------------------------------

/// The detail of the internal error `Faulty::remove` returns: it must reach only the log.
const SECRET_DETAIL: &str = "secret detail /var/lib/x";

/// The embedded source with its failures chosen: no `output` capability, `input` finds the
/// runtime unavailable, `stop` times out, `remove` breaks inside. Spawning, listing and
/// the lifecycle stream are the embedded source's own.
fn faulty(inner: EmbeddedSource) -> Fake<EmbeddedSource> {
    Fake::new(inner)
        .with_capabilities(|c| c.output = false)
        .with_stop(|_| {
            Some(Err(RegistryError::UpstreamTimeout(
                "the runtime did not answer the stop in time".into(),
            )))
        })
        .with_input(|_| {
            Some(Err(RegistryError::unavailable(
                "the runtime is restarting",
                Some(Duration::from_secs(3)),
            )))
        })
        .with_remove(|| Some(Err(RegistryError::internal(SECRET_DETAIL))))
}

/// A server whose only runtime, `wrapped`, is [`faulty`], with one live worker in it.
async fn start_faulty() -> Result<(TestServer, String)> {
    let source = Arc::new(faulty(shell_source("")?));
    let server =
        TestServer::start_with_source("wrapped", "wrapped", source, ServeOptions::default())
            .await?;
    let resp = server
        .post(
            "/v1/runtimes/wrapped/workers",
            r#"{"profile": "shell", "args": ["exec sleep 30"]}"#,
        )
        .await?;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    let id = resp.json()?["id"].as_str().context("an id")?.to_string();
    Ok((server, id))
}

// ---------------------------------------------------------------------------------------
// 1. Every route, with its success status and body shape
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn runtimes_list_shows_id_kind_health_capabilities_counts_and_diagnostics() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server.get("/v1/runtimes").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let body = resp.json()?;
    let keys: Vec<&String> = body.as_object().context("an object")?.keys().collect();
    assert_eq!(keys, ["runtimes"]);
    let runtimes = body["runtimes"].as_array().context("runtimes")?;
    assert_eq!(runtimes.len(), 1, "{body}");
    let rt = &runtimes[0];
    assert_eq!(rt["id"], "local");
    assert_eq!(rt["kind"], "embedded");
    assert!(
        ["ready", "degraded", "unavailable"]
            .contains(&rt["health"]["status"].as_str().unwrap_or("")),
        "{rt}"
    );
    assert!(rt["health"]["since"].is_string(), "{rt}");
    for cap in ["spawn", "input", "stop", "output", "remove"] {
        assert_eq!(rt["capabilities"][cap], true, "{cap}: {rt}");
    }
    let counts = rt["workers"].as_object().context("worker counts")?;
    let states: BTreeSet<&str> = counts.keys().map(String::as_str).collect();
    assert_eq!(
        states,
        BTreeSet::from([
            "starting", "running", "stopping", "exited", "stopped", "failed", "unknown"
        ])
    );
    assert!(counts.values().all(|n| n == 0), "{rt}");
    assert!(rt["diagnostics"].is_array(), "{rt}");

    // A worker shows in the counts.
    let id = server.spawn_shell("true").await?;
    server.wait_worker(&id, state_is("exited")).await?;
    let body = server.get("/v1/runtimes").await?.json()?;
    assert_eq!(body["runtimes"][0]["workers"]["exited"], 1, "{body}");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn one_runtime_is_served_by_its_id() -> Result<()> {
    let server = TestServer::start().await?;
    let all = server.get("/v1/runtimes").await?.json()?;
    let resp = server.get("/v1/runtimes/local").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let one = resp.json()?;
    assert_eq!(one["id"], "local");
    assert_eq!(one["kind"], all["runtimes"][0]["kind"]);
    assert_eq!(one["capabilities"], all["runtimes"][0]["capabilities"]);
    assert_eq!(one["workers"], all["runtimes"][0]["workers"]);
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn spawn_answers_201_with_location_and_the_worker_but_never_its_env() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server
        .post(
            SPAWN,
            &json!({
                "profile": "shell",
                "args": ["exec sleep 30"],
                "env": {"API_TEST_SECRET": "hunter2-env-value"},
                "name": "build-1",
                "labels": {"team": "a"},
            })
            .to_string(),
        )
        .await?;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    let w = resp.json()?;
    let id = w["id"].as_str().context("an id")?;
    assert!(
        id.len() == 28
            && id.starts_with("w_")
            && id[2..]
                .bytes()
                .all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b)),
        "{id}"
    );
    assert_eq!(
        resp.headers.get("location").context("a Location")?,
        &format!("/v1/workers/{id}")
    );
    assert_eq!(w["runtime_id"], "local");
    assert!(
        ["starting", "running"].contains(&w["state"].as_str().unwrap_or("")),
        "{w}"
    );
    assert_eq!(w["profile"], "shell");
    assert_eq!(w["args"], json!(["exec sleep 30"]));
    assert_eq!(w["labels"], json!({"team": "a"}));
    assert_eq!(w["name"], "build-1");
    assert!(w["created_at"].is_string(), "{w}");
    assert!(w.get("env").is_none(), "{w}");
    assert!(!resp.text().contains("hunter2-env-value"), "{w}");

    // GET shows the same worker, still without its environment.
    let resp = server.get(&format!("/v1/workers/{id}")).await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let got = resp.json()?;
    assert_eq!(got["id"], id);
    assert_eq!(got["name"], "build-1");
    assert_eq!(got["labels"], json!({"team": "a"}));
    assert_eq!(got["profile"], "shell");
    assert!(!resp.text().contains("hunter2-env-value"), "{got}");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn workers_are_filtered_by_runtime_state_and_every_label_given() -> Result<()> {
    let server = TestServer::start().await?;
    let spawn_labeled = |script: &'static str, labels: Value| {
        let server = &server;
        async move {
            let w = spawn(
                server,
                json!({"profile": "shell", "args": [script], "labels": labels}),
            )
            .await?;
            anyhow::Ok(w["id"].as_str().context("an id")?.to_string())
        }
    };
    let a = spawn_labeled("true", json!({"team": "a", "tier": "x"})).await?;
    let b = spawn_labeled("true", json!({"team": "a", "tier": "y"})).await?;
    let c = spawn_labeled("exec sleep 30", json!({"team": "b"})).await?;
    server.wait_worker(&a, state_is("exited")).await?;
    server.wait_worker(&b, state_is("exited")).await?;
    server.wait_worker(&c, state_is("running")).await?;

    let resp = server.get("/v1/workers").await?;
    assert_eq!(resp.status, StatusCode::OK);
    let body = resp.json()?;
    assert_eq!(body["next_page"], Value::Null, "{body}");
    assert_eq!(body["workers"].as_array().map(Vec::len), Some(3), "{body}");

    assert_eq!(
        sorted(listed(&server, "/v1/workers?runtime=local").await?),
        sorted(vec![a.clone(), b.clone(), c.clone()])
    );
    assert_eq!(
        listed(&server, "/v1/workers?state=running").await?,
        [c.as_str()]
    );
    assert_eq!(
        sorted(listed(&server, "/v1/workers?label=team=a").await?),
        sorted(vec![a.clone(), b.clone()])
    );
    assert_eq!(
        listed(&server, "/v1/workers?label=team=a&label=tier=x").await?,
        [a.as_str()]
    );
    assert_eq!(
        listed(&server, "/v1/workers?label=team%3Db").await?,
        [c.as_str()]
    );
    assert!(listed(&server, "/v1/workers?label=team=a&label=tier=z")
        .await?
        .is_empty());
    // One key twice with two values: no worker carries both.
    assert!(listed(&server, "/v1/workers?label=team=a&label=team=b")
        .await?
        .is_empty());
    assert_eq!(
        sorted(listed(&server, "/v1/workers?label=team=a&label=team=a").await?),
        sorted(vec![a.clone(), b.clone()])
    );
    assert!(listed(&server, "/v1/workers?state=exited&label=team=b")
        .await?
        .is_empty());
    assert_eq!(
        sorted(
            listed(
                &server,
                "/v1/workers?runtime=local&state=exited&label=team=a"
            )
            .await?
        ),
        sorted(vec![a, b])
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn paging_with_a_limit_returns_every_worker_exactly_once() -> Result<()> {
    let server = TestServer::start().await?;
    let mut spawned = BTreeSet::new();
    for _ in 0..5 {
        spawned.insert(server.spawn_shell("true").await?);
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut path = "/v1/workers?limit=2".to_string();
    loop {
        let resp = server.get(&path).await?;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        let body = resp.json()?;
        let workers = body["workers"].as_array().context("workers")?;
        assert!(workers.len() <= 2, "{body}");
        seen.extend(
            workers
                .iter()
                .map(|w| w["id"].as_str().unwrap_or("").to_string()),
        );
        pages += 1;
        assert!(pages <= 5, "paging does not end: {body}");
        match &body["next_page"] {
            Value::Null => break,
            Value::String(token) => {
                let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
                path = format!("/v1/workers?limit=2&page={token}");
            }
            other => panic!("next_page is a string or null, not {other}"),
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), spawned);
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn input_reaches_stdin_and_comes_back_as_output() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("head -n1").await?;
    let resp = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": "ping\n"}"#)
        .await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
    assert_eq!(resp.json()?, json!({ "accepted_bytes": 5 }));
    let w = server.wait_worker(&id, state_is("exited")).await?;
    assert_eq!(w["exit_code"], 0, "{w}");
    assert_eq!(output_text(&server, &id).await?, "ping\n");

    // The spawn's `stdin` is the first input.
    let w = spawn(
        &server,
        json!({"profile": "shell", "args": ["head -n1"], "stdin": "first\n"}),
    )
    .await?;
    let id = w["id"].as_str().context("an id")?;
    server.wait_worker(id, state_is("exited")).await?;
    assert_eq!(output_text(&server, id).await?, "first\n");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn stop_takes_an_empty_object_no_body_or_a_grace_and_ends_stopped() -> Result<()> {
    // A runtime grace far beyond the stop's own, so that which one applied shows plainly.
    let server =
        TestServer::start_with(common::config(r#"grace = "60s""#), ServeOptions::default()).await?;
    let with_object = sleeper(&server).await?;
    let without_body = sleeper(&server).await?;
    // Ignores SIGTERM, so only the kill after `grace_ms` ends it.
    let stubborn = server
        .spawn_shell("trap '' TERM; echo ready; sleep 30")
        .await?;
    let mut out = server
        .sse(&format!("/v1/workers/{stubborn}/output"), &[])
        .await?;
    let ev = loop {
        let ev = out.next_event().await?;
        if ev.event == "output" {
            break ev;
        }
    };
    assert_eq!(ev.data["data"], "ready\n");
    drop(out);

    let resp = server
        .post(&format!("/v1/workers/{with_object}/stop"), "{}")
        .await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
    assert_eq!(resp.json()?["id"], with_object.as_str());

    let resp = server
        .request(
            Method::POST,
            &format!("/v1/workers/{without_body}/stop"),
            &[],
            None,
        )
        .await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());

    let asked = Instant::now();
    let resp = server
        .post(
            &format!("/v1/workers/{stubborn}/stop"),
            r#"{"grace_ms": 100}"#,
        )
        .await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());

    for id in [&with_object, &without_body, &stubborn] {
        server.wait_worker(id, state_is("stopped")).await?;
    }
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "the kill came {:?} after the stop: after the runtime's 60 s grace, not the stop's 100 ms",
        asked.elapsed()
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn second_stop_on_a_terminal_worker_is_an_accepted_noop() -> Result<()> {
    let server = TestServer::start().await?;
    let id = sleeper(&server).await?;
    let stop = format!("/v1/workers/{id}/stop");
    assert_eq!(server.post(&stop, "{}").await?.status, StatusCode::ACCEPTED);
    let before = server.wait_worker(&id, state_is("stopped")).await?;
    let resp = server.post(&stop, "{}").await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
    assert_eq!(resp.json()?["state"], "stopped");
    assert_eq!(
        server.get(&format!("/v1/workers/{id}")).await?.json()?,
        before
    );

    // A worker that exited by itself is terminal too.
    let done = server.spawn_shell("exit 3").await?;
    server.wait_worker(&done, state_is("exited")).await?;
    let resp = server
        .post(&format!("/v1/workers/{done}/stop"), "{}")
        .await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
    let w = resp.json()?;
    assert_eq!(w["state"], "exited");
    assert_eq!(w["exit_code"], 3);
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn delete_removes_a_terminal_worker_and_then_it_is_not_found() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("true").await?;
    server.wait_worker(&id, state_is("exited")).await?;
    let path = format!("/v1/workers/{id}");
    let resp = server.request(Method::DELETE, &path, &[], None).await?;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{}", resp.text());
    assert!(resp.body.is_empty());
    assert_error(
        &server.get(&path).await?,
        StatusCode::NOT_FOUND,
        "worker_not_found",
    );
    assert!(listed(&server, "/v1/workers").await?.is_empty());
    assert_error(
        &server.request(Method::DELETE, &path, &[], None).await?,
        StatusCode::NOT_FOUND,
        "worker_not_found",
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn health_readiness_metrics_openapi_and_console_are_served() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server.get("/healthz").await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()?, json!({ "status": "ok" }));

    // Ready once the runtime has answered: poll with a deadline.
    let deadline = Instant::now() + common::WAIT;
    let ready = loop {
        let resp = server.get("/readyz").await?;
        if resp.status == StatusCode::OK || Instant::now() > deadline {
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()?, json!({ "status": "ready" }));

    let resp = server.get("/metrics").await?;
    assert_eq!(resp.status, StatusCode::OK);
    let content_type = resp.headers["content-type"].to_str()?;
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = resp.text();
    for name in [
        "roster_http_requests_total{",
        "roster_http_request_duration_seconds",
        "roster_workers",
        "roster_runtime_health",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("roster_http_requests_total{")
                && l.contains(r#"route="/healthz""#)
                && l.contains(r#"status="200""#)),
        "the /healthz request is counted:\n{text}"
    );

    let resp = server.get("/v1/openapi.json").await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(resp.headers["content-type"]
        .to_str()?
        .starts_with("application/json"));
    let doc = resp.json()?;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    assert!(doc["paths"]["/v1/workers/{worker_id}"].is_object());

    let resp = server.get("/").await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(resp.headers["content-type"]
        .to_str()?
        .starts_with("text/html"));
    assert!(resp.text().to_ascii_lowercase().contains("<html"));
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. Every error code the server can produce
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_body_field_is_invalid_request_naming_the_field() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server
        .post(
            SPAWN,
            r#"{"profile": "shell", "args": ["true"], "colour": "red"}"#,
        )
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("colour"), "{message}");

    let id = sleeper(&server).await?;
    let resp = server
        .post(&format!("/v1/workers/{id}/stop"), r#"{"grace": 5}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("grace"), "{message}");
    let resp = server
        .post(
            &format!("/v1/workers/{id}/input"),
            r#"{"data": "x", "eof": true}"#,
        )
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("eof"), "{message}");
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn wrong_field_type_is_invalid_request_naming_the_field() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server
        .post(SPAWN, r#"{"profile": "shell", "args": "echo hi"}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("args"), "{message}");
    let resp = server
        .post(SPAWN, r#"{"profile": "shell", "labels": {"team": 7}}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("labels"), "{message}");
    // The name rules the document gives in words (OpenAPI 3.0 has no keyword for them).
    for (body, field) in [
        (r#"{"profile": "shell", "labels": {"": "a"}}"#, "labels"),
        (r#"{"profile": "shell", "labels": {"a=b": "c"}}"#, "labels"),
        (r#"{"profile": "shell", "labels": {"a,b": "c"}}"#, "labels"),
        (r#"{"profile": "shell", "env": {"": "x"}}"#, "env"),
        (r#"{"profile": "shell", "env": {"A=B": "x"}}"#, "env"),
        (r#"{"profile": "shell", "env": {"A": "x\u0000y"}}"#, "env"),
    ] {
        let resp = server.post(SPAWN, body).await?;
        let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(message.contains(field), "{body}: {message}");
    }
    assert_eq!(listed(&server, "/v1/workers").await?, Vec::<String>::new());

    let id = sleeper(&server).await?;
    let resp = server
        .post(&format!("/v1/workers/{id}/stop"), r#"{"grace_ms": "soon"}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("grace_ms"), "{message}");
    let resp = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": 42}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("data"), "{message}");
    // JSON that is not an object is not read as one (fields by position).
    for body in [
        r#"["shell"]"#,
        r#"["shell", null, ["true"]]"#,
        "null",
        "\"shell\"",
    ] {
        let resp = server.post(SPAWN, body).await?;
        let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(message.contains("object"), "{body}: {message}");
    }
    for body in ["[]", "[100]", "null", "7"] {
        let resp = server.post(&format!("/v1/workers/{id}/stop"), body).await?;
        assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert_eq!(
        listed(&server, "/v1/workers").await?,
        [id.as_str()],
        "nothing was spawned"
    );
    server.wait_worker(&id, state_is("running")).await?;
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn bad_query_parameters_are_invalid_request_saying_what_is_wrong() -> Result<()> {
    let server = TestServer::start().await?;
    let cases = [
        ("/v1/workers?colour=red", "colour"),
        ("/v1/runtimes?verbose=1", "verbose"),
        ("/v1/runtimes/local?x=1", "`x`"),
        ("/v1/workers?state=sleeping", "states are"),
        ("/v1/workers?limit=lots", "limit"),
        ("/v1/workers?limit=0", "limit"),
        ("/v1/workers?limit=5000", "limit"),
        ("/v1/workers?limit=-1", "limit"),
        ("/v1/workers?label=team", "key=value"),
        ("/v1/workers?page=not-a-page", "page"),
        ("/v1/workers?state=running&state=exited", "more than once"),
        ("/v1/events?colour=red", "colour"),
    ];
    for (path, says) in cases {
        let resp = server.get(path).await?;
        let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(message.contains(says), "{path}: {message}");
    }
    let resp = server
        .post(&format!("{SPAWN}?dry_run=1"), r#"{"profile": "shell"}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("dry_run"), "{message}");
    assert!(
        listed(&server, "/v1/workers").await?.is_empty(),
        "nothing was spawned"
    );
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn spawn_with_both_profile_and_command_is_invalid_request() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server
        .post(SPAWN, r#"{"profile": "shell", "command": ["/bin/true"]}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        message.contains("profile") && message.contains("command"),
        "{message}"
    );
    let resp = server.post(SPAWN, r#"{"args": ["true"]}"#).await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        message.contains("profile") && message.contains("command"),
        "{message}"
    );
    let resp = server
        .post(SPAWN, r#"{"profile": "no-such-profile"}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.contains("profile"), "{message}");
    assert!(
        listed(&server, "/v1/workers").await?.is_empty(),
        "nothing was spawned"
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn truncated_or_empty_body_is_invalid_json() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server
        .post(SPAWN, r#"{"profile": "shell", "args": ["tr"#)
        .await?;
    let message = assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");
    assert!(message.contains("JSON"), "{message}");
    let resp = server.post(SPAWN, "").await?;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");
    // Something after the object.
    let resp = server
        .post(SPAWN, r#"{"profile": "shell", "args": ["true"]} {"#)
        .await?;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");
    let resp = server
        .post(SPAWN, r#"{"profile": "shell", "args": ["true"]} junk"#)
        .await?;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");
    assert!(
        listed(&server, "/v1/workers").await?.is_empty(),
        "nothing was spawned"
    );
    let id = sleeper(&server).await?;
    let resp = server
        .post(&format!("/v1/workers/{id}/stop"), "{grace_ms: 1}")
        .await?;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");
    server
        .wait_worker(&id, state_is("running"))
        .await
        .context("a bad stop request stops nothing")?;
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn missing_or_wrong_content_type_is_unsupported_media_type() -> Result<()> {
    let server = TestServer::start().await?;
    let body = r#"{"profile": "shell", "args": ["true"]}"#;
    let resp = server
        .request(
            Method::POST,
            SPAWN,
            &[("content-type", "text/plain")],
            Some(body),
        )
        .await?;
    let message = assert_error(
        &resp,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert!(message.contains("application/json"), "{message}");
    // No content type at all, with a body.
    let req = Request::post(SPAWN)
        .header("host", format!("127.0.0.1:{}", server.addr.port()))
        .body(Full::new(Bytes::from(body)))?;
    let resp = send_request(&server, req).await?;
    assert_error(
        &resp,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    // Parameters on the JSON type are fine.
    let resp = server
        .request(
            Method::POST,
            SPAWN,
            &[("content-type", "application/json; charset=utf-8")],
            Some(body),
        )
        .await?;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    let id = resp.json()?["id"].as_str().context("an id")?.to_string();
    let resp = server
        .request(
            Method::POST,
            &format!("/v1/workers/{id}/input"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Some("data=x"),
        )
        .await?;
    assert_error(
        &resp,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn missing_or_unknown_token_is_unauthorized_with_a_bearer_challenge() -> Result<()> {
    let server = TestServer::start_with(common::config(""), token_options()).await?;
    let wrong = format!("Bearer {READ_SECRET}x");
    let basic = format!("Basic {READ_SECRET}");
    let cases: [&[(&str, &str)]; 3] = [
        &[],
        &[("authorization", wrong.as_str())],
        &[("authorization", basic.as_str())],
    ];
    for headers in cases {
        for path in ["/v1/runtimes", "/v1/workers", "/metrics"] {
            let resp = server.request(Method::GET, path, headers, None).await?;
            assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
            assert_eq!(resp.headers["www-authenticate"], "Bearer", "{path}");
            assert!(!resp.text().contains(READ_SECRET));
        }
        let resp = server
            .request(
                Method::POST,
                SPAWN,
                headers,
                Some(r#"{"profile": "shell"}"#),
            )
            .await?;
        assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // The open routes need no token; a read token reads.
    assert_still_serving(&server).await?;
    let read = format!("Bearer {READ_SECRET}");
    let resp = server
        .request(
            Method::GET,
            "/v1/runtimes",
            &[("authorization", &read)],
            None,
        )
        .await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert!(server
        .registry
        .list_workers(&Default::default(), 10, None)?
        .workers
        .is_empty());
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn read_token_on_an_operate_route_is_forbidden() -> Result<()> {
    let server = TestServer::start_with(common::config(""), token_options()).await?;
    let read = format!("Bearer {READ_SECRET}");
    let operate = format!("Bearer {OPERATE_SECRET}");
    let body = r#"{"profile": "shell", "args": ["exec sleep 30"]}"#;
    let resp = server
        .request(Method::POST, SPAWN, &[("authorization", &read)], Some(body))
        .await?;
    let message = assert_error(&resp, StatusCode::FORBIDDEN, "forbidden");
    assert!(message.contains("operate"), "{message}");
    assert!(!message.contains(READ_SECRET), "{message}");

    let resp = server
        .request(
            Method::POST,
            SPAWN,
            &[("authorization", &operate)],
            Some(body),
        )
        .await?;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    let id = resp.json()?["id"].as_str().context("an id")?.to_string();
    for (method, path, body) in [
        (
            Method::POST,
            format!("/v1/workers/{id}/input"),
            Some(r#"{"data": "x"}"#),
        ),
        (Method::POST, format!("/v1/workers/{id}/stop"), Some("{}")),
        (Method::DELETE, format!("/v1/workers/{id}"), None),
    ] {
        let resp = server
            .request(method.clone(), &path, &[("authorization", &read)], body)
            .await?;
        assert_error(&resp, StatusCode::FORBIDDEN, "forbidden");
    }
    let resp = server
        .request(
            Method::GET,
            &format!("/v1/workers/{id}"),
            &[("authorization", &read)],
            None,
        )
        .await?;
    assert_eq!(resp.status, StatusCode::OK, "the read token reads");
    assert_eq!(
        resp.json()?["state"],
        "running",
        "no forbidden request stopped it"
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn command_where_the_runtime_allows_only_profiles_is_forbidden() -> Result<()> {
    let server = TestServer::start_with(
        common::config("allow_commands = false"),
        ServeOptions::default(),
    )
    .await?;
    let resp = server
        .post(SPAWN, r#"{"command": ["/bin/sh", "-c", "true"]}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::FORBIDDEN, "forbidden");
    assert!(message.contains("command"), "{message}");
    assert!(
        listed(&server, "/v1/workers").await?.is_empty(),
        "nothing was spawned"
    );
    server
        .spawn_shell("true")
        .await
        .context("profiles still work")?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn foreign_host_is_forbidden_and_loopback_names_pass() -> Result<()> {
    let server = TestServer::start().await?;
    let port = server.addr.port();
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
    ] {
        let req = Request::get("/v1/runtimes")
            .header("host", &host)
            .body(Full::new(Bytes::new()))?;
        let resp = send_request(&server, req).await?;
        let message = assert_error(&resp, StatusCode::FORBIDDEN, "forbidden");
        assert!(message.contains("Host"), "{host}: {message}");
        let req = Request::post(SPAWN)
            .header("host", &host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                r#"{"profile": "shell", "args": ["true"]}"#,
            )))?;
        assert_error(
            &send_request(&server, req).await?,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
    }
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let req = Request::get("/v1/runtimes")
            .header("host", &host)
            .body(Full::new(Bytes::new()))?;
        assert_eq!(
            send_request(&server, req).await?.status,
            StatusCode::OK,
            "{host}"
        );
    }
    assert!(
        listed(&server, "/v1/workers").await?.is_empty(),
        "nothing was spawned"
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn foreign_origin_cannot_post_but_the_same_origin_can() -> Result<()> {
    let server = TestServer::start().await?;
    let body = r#"{"profile": "shell", "args": ["true"]}"#;
    for origin in ["http://evil.example", "null", "https://127.0.0.1"] {
        let resp = server
            .request(Method::POST, SPAWN, &[("origin", origin)], Some(body))
            .await?;
        let message = assert_error(&resp, StatusCode::FORBIDDEN, "origin_not_allowed");
        assert!(message.contains("origin"), "{message}");
    }
    assert!(
        listed(&server, "/v1/workers").await?.is_empty(),
        "nothing was spawned"
    );
    // Reading from a foreign page is harmless; the same origin may change things.
    let resp = server
        .request(
            Method::GET,
            "/v1/runtimes",
            &[("origin", "http://evil.example")],
            None,
        )
        .await?;
    assert_eq!(resp.status, StatusCode::OK);
    // …because no answer ever opens itself to other origins (no CORS), preflight included.
    let no_cors = |resp: &common::TestResponse| {
        !resp
            .headers
            .keys()
            .any(|k| k.as_str().starts_with("access-control-"))
    };
    assert!(no_cors(&resp), "{:?}", resp.headers);
    let preflight = server
        .request(
            Method::OPTIONS,
            SPAWN,
            &[
                ("origin", "http://evil.example"),
                ("access-control-request-method", "POST"),
            ],
            None,
        )
        .await?;
    assert_eq!(preflight.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(no_cors(&preflight), "{:?}", preflight.headers);
    let same = format!("http://127.0.0.1:{}", server.addr.port());
    let resp = server
        .request(Method::POST, SPAWN, &[("origin", &same)], Some(body))
        .await?;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn unknown_runtime_is_runtime_not_found() -> Result<()> {
    let server = TestServer::start().await?;
    let cases = [
        (Method::GET, "/v1/runtimes/nope", None),
        (Method::GET, "/v1/runtimes/NOT-A-NAME", None),
        (Method::GET, "/v1/workers?runtime=nope", None),
        (Method::GET, "/v1/events?runtime=nope", None),
        (
            Method::POST,
            "/v1/runtimes/nope/workers",
            Some(r#"{"profile": "shell", "args": ["true"]}"#),
        ),
    ];
    for (method, path, body) in cases {
        let resp = server.request(method, path, &[], body).await?;
        let message = assert_error(&resp, StatusCode::NOT_FOUND, "runtime_not_found");
        assert!(message.contains("runtime"), "{path}: {message}");
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn unknown_or_malformed_worker_id_is_worker_not_found() -> Result<()> {
    let server = TestServer::start().await?;
    for id in [UNKNOWN_ID, "w_short", "42", "w_0123456789abcdefghjkmnpqrs"] {
        for (method, path, body) in [
            (Method::GET, format!("/v1/workers/{id}"), None),
            (Method::DELETE, format!("/v1/workers/{id}"), None),
            (Method::POST, format!("/v1/workers/{id}/stop"), Some("{}")),
            (
                Method::POST,
                format!("/v1/workers/{id}/input"),
                Some(r#"{"data": "x"}"#),
            ),
            (Method::GET, format!("/v1/workers/{id}/output"), None),
        ] {
            let resp = server.request(method.clone(), &path, &[], body).await?;
            let message = assert_error(&resp, StatusCode::NOT_FOUND, "worker_not_found");
            assert!(message.contains("worker"), "{method} {path}: {message}");
        }
    }
    let resp = server.get("/v1/workers/w_short").await?;
    let message = assert_error(&resp, StatusCode::NOT_FOUND, "worker_not_found");
    assert!(
        message.contains("w_"),
        "says what an id looks like: {message}"
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn unknown_path_is_route_not_found() -> Result<()> {
    let server = TestServer::start().await?;
    for path in [
        "/v2/workers",
        "/v1/worker",
        "/v1/workers/",
        "/v1/workers/w_x/output/more",
        "/favicon.ico",
    ] {
        let resp = server.get(path).await?;
        assert_error(&resp, StatusCode::NOT_FOUND, "route_not_found");
    }
    let resp = server.post("/v1/spawn", "{}").await?;
    assert_error(&resp, StatusCode::NOT_FOUND, "route_not_found");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() -> Result<()> {
    let server = TestServer::start().await?;
    let worker = format!("/v1/workers/{UNKNOWN_ID}");
    let cases = [
        (Method::PUT, worker.as_str(), "GET, DELETE"),
        (Method::PATCH, worker.as_str(), "GET, DELETE"),
        (Method::POST, "/v1/runtimes", "GET"),
        (Method::DELETE, "/healthz", "GET, HEAD"),
        (Method::GET, "/v1/runtimes/local/workers", "POST"),
        (Method::DELETE, "/v1/workers", "GET"),
    ];
    for (method, path, allow) in cases {
        let resp = server.request(method.clone(), path, &[], None).await?;
        let message = assert_error(&resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        assert_eq!(resp.headers["allow"], allow, "{method} {path}");
        assert!(message.contains(method.as_str()), "{message}");
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn delete_of_a_running_worker_is_conflict() -> Result<()> {
    let server = TestServer::start().await?;
    let id = sleeper(&server).await?;
    let resp = server
        .request(Method::DELETE, &format!("/v1/workers/{id}"), &[], None)
        .await?;
    assert_error(&resp, StatusCode::CONFLICT, "conflict");
    server.wait_worker(&id, state_is("running")).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn input_to_an_ended_worker_is_conflict() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("true").await?;
    server.wait_worker(&id, state_is("exited")).await?;
    let resp = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": "late\n"}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::CONFLICT, "conflict");
    assert!(message.contains("ended"), "{message}");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn same_request_id_is_the_same_worker_and_with_another_body_a_conflict() -> Result<()> {
    let server = TestServer::start().await?;
    let first = json!({"profile": "shell", "args": ["exec sleep 30"], "request_id": "job-7"});
    let a = spawn(&server, first.clone()).await?;
    let b = spawn(&server, first).await?;
    assert_eq!(a["id"], b["id"]);
    let other = json!({"profile": "shell", "args": ["exec sleep 31"], "request_id": "job-7"});
    let resp = server.post(SPAWN, &other.to_string()).await?;
    let message = assert_error(&resp, StatusCode::CONFLICT, "conflict");
    assert!(message.contains("request_id"), "{message}");
    assert_eq!(listed(&server, "/v1/workers").await?.len(), 1);
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn body_over_max_body_is_payload_too_large_announced_or_chunked() -> Result<()> {
    let options = ServeOptions {
        max_body: 64,
        ..Default::default()
    };
    let server = TestServer::start_with(common::config(""), options).await?;
    let host = format!("127.0.0.1:{}", server.addr.port());
    let big = json!({"profile": "shell", "args": ["true"], "name": "n".repeat(100)}).to_string();
    assert!(big.len() > 64);

    // Announced with Content-Length.
    let resp = server.post(SPAWN, &big).await?;
    let message = assert_error(&resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(message.contains("64"), "{message}");

    // Chunked, with no length announced.
    let req = Request::post(SPAWN)
        .header("host", &host)
        .header("content-type", "application/json")
        .body(Pieces::new(&big, 16))?;
    let resp = send_request(&server, req).await?;
    assert_error(&resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // Under the cap, chunked is read whole.
    let small = r#"{"profile": "shell", "args": ["true"]}"#;
    assert!(small.len() <= 64);
    let req = Request::post(SPAWN)
        .header("host", &host)
        .header("content-type", "application/json")
        .body(Pieces::new(small, 7))?;
    let resp = send_request(&server, req).await?;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    let id = resp.json()?["id"].as_str().context("an id")?.to_string();

    let input = json!({"data": "x".repeat(100)}).to_string();
    let resp = server
        .post(&format!("/v1/workers/{id}/input"), &input)
        .await?;
    assert_error(&resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(listed(&server, "/v1/workers").await?, [id]);
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn spawn_beyond_max_workers_is_capacity_exceeded_with_retry_after() -> Result<()> {
    let server =
        TestServer::start_with(common::config("max_workers = 1"), ServeOptions::default()).await?;
    let first = sleeper(&server).await?;
    let resp = server
        .post(SPAWN, r#"{"profile": "shell", "args": ["exec sleep 30"]}"#)
        .await?;
    assert_error(&resp, StatusCode::TOO_MANY_REQUESTS, "capacity_exceeded");
    assert!(retry_after(&resp) >= 1);
    assert_eq!(listed(&server, "/v1/workers").await?, [first.as_str()]);

    // Room again once the first has ended.
    server
        .post(&format!("/v1/workers/{first}/stop"), "{}")
        .await?;
    server.wait_worker(&first, state_is("stopped")).await?;
    server.spawn_shell("true").await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn missing_capability_is_unsupported() -> Result<()> {
    let (server, id) = start_faulty().await?;
    let caps = server.get("/v1/runtimes/wrapped").await?.json()?;
    assert_eq!(caps["capabilities"]["output"], false, "{caps}");
    for path in [
        format!("/v1/workers/{id}/output"),
        format!("/v1/workers/{id}/output?follow=0"),
    ] {
        let resp = server.get(&path).await?;
        let message = assert_error(&resp, StatusCode::NOT_IMPLEMENTED, "unsupported");
        assert!(message.contains("wrapped"), "names the runtime: {message}");
    }
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn unavailable_runtime_is_503_with_retry_after() -> Result<()> {
    let (server, id) = start_faulty().await?;
    let resp = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": "x"}"#)
        .await?;
    let message = assert_error(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "runtime_unavailable",
    );
    assert!(message.contains("restarting"), "{message}");
    assert_eq!(retry_after(&resp), 3);
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn upstream_timeout_is_504() -> Result<()> {
    let (server, id) = start_faulty().await?;
    let resp = server
        .post(&format!("/v1/workers/{id}/stop"), r#"{"grace_ms": 100}"#)
        .await?;
    let message = assert_error(&resp, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
    assert!(message.contains("in time"), "{message}");
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn internal_error_is_500_with_a_generic_message_and_no_detail() -> Result<()> {
    let (server, id) = start_faulty().await?;
    let resp = server
        .request(Method::DELETE, &format!("/v1/workers/{id}"), &[], None)
        .await?;
    let message = assert_error(&resp, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    let text = resp.text();
    for leak in ["secret", "/var/lib", SECRET_DETAIL] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }
    assert!(message.contains("internal"), "{message}");
    assert_still_serving(&server).await?;
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. A bad request never breaks the server
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_server_keeps_serving_after_every_kind_of_bad_request() -> Result<()> {
    let options = ServeOptions {
        max_body: 256,
        ..Default::default()
    };
    let server = TestServer::start_with(common::config(""), options).await?;
    let id = sleeper(&server).await?;
    let huge = "x".repeat(1000);
    let cases: Vec<(Method, String, Option<&str>, StatusCode)> = vec![
        (
            Method::POST,
            SPAWN.into(),
            Some("{"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            SPAWN.into(),
            Some("\u{0}\u{1}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            SPAWN.into(),
            Some(r#"{"x":1}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            SPAWN.into(),
            Some(&huge),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Method::GET,
            "/v1/workers?limit=%ff".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/workers/%00".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            format!("/v1/workers/{huge}"),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PUT,
            "/".into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::DELETE,
            format!("/v1/workers/{id}"),
            None,
            StatusCode::CONFLICT,
        ),
        (
            Method::POST,
            format!("/v1/workers/{id}/stop"),
            Some("[]"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            format!("/v1/workers/{id}/stop"),
            Some(r#"{"grace_ms": -1}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            format!("/v1/workers/{id}/stop"),
            Some(r#"{"grace_ms": 999999999999}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            format!("/v1/workers/{id}/output?after=x"),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            format!("/v1/workers/{id}/output?follow=maybe"),
            None,
            StatusCode::BAD_REQUEST,
        ),
        // Seqs are int64: one past i64::MAX names no seq.
        (
            Method::GET,
            format!("/v1/workers/{id}/output?after=9223372036854775808"),
            None,
            StatusCode::BAD_REQUEST,
        ),
        // The document says 0 or 1; `true` is refused, not read loosely.
        (
            Method::GET,
            format!("/v1/workers/{id}/output?follow=true"),
            None,
            StatusCode::BAD_REQUEST,
        ),
        // A table written as a list is not read by position.
        (
            Method::POST,
            "/v1/runtimes/local/workers".to_string(),
            Some(r#"{"profile": "shell", "restart_backoff": [null, null]}"#),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (method, path, body, status) in cases {
        let resp = server.request(method.clone(), &path, &[], body).await?;
        assert_eq!(resp.status, status, "{method} {path}: {}", resp.text());
        assert!(!resp.code().is_empty(), "{method} {path}: {}", resp.text());
    }
    // Bytes that are not HTTP, and a request cut off midway.
    for raw in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        &b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nabc"[..],
        &b"POST /v1/runtimes/local/workers HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz\r\n"[..],
    ] {
        let mut stream = TcpStream::connect(server.addr).await?;
        stream.write_all(raw).await?;
        stream.shutdown().await?;
        let mut answer = Vec::new();
        // Answered or reset, either way the server lets go of the connection.
        let _answered = tokio::time::timeout(common::WAIT, stream.read_to_end(&mut answer))
            .await
            .with_context(|| format!("the server holds the connection of {raw:?}"))?;
    }
    assert_still_serving(&server).await?;
    let w = server.wait_worker(&id, state_is("running")).await?;
    assert_eq!(w["id"], id.as_str(), "no bad request touched the worker");
    assert_eq!(listed(&server, "/v1/workers").await?, [id]);
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. Request ids
// ---------------------------------------------------------------------------------------

fn request_id(resp: &TestResponse) -> String {
    resp.headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn every_response_carries_a_request_id() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("true").await?;
    let mut seen = BTreeSet::new();
    for (method, path, body) in [
        (Method::GET, "/healthz".to_string(), None),
        (Method::GET, "/".to_string(), None),
        (Method::GET, "/metrics".to_string(), None),
        (Method::GET, "/v1/runtimes".to_string(), None),
        (Method::GET, format!("/v1/workers/{id}"), None),
        (
            Method::POST,
            SPAWN.to_string(),
            Some(r#"{"profile": "shell", "args": ["true"]}"#),
        ),
        (Method::GET, "/nowhere".to_string(), None),
        (Method::PUT, "/healthz".to_string(), None),
        (Method::GET, format!("/v1/workers/{UNKNOWN_ID}"), None),
        (Method::POST, SPAWN.to_string(), Some("{")),
    ] {
        let resp = server.request(method.clone(), &path, &[], body).await?;
        let rid = request_id(&resp);
        assert!(
            !rid.is_empty(),
            "{method} {path} ({}) has no x-request-id",
            resp.status
        );
        assert!(seen.insert(rid.clone()), "{rid} given twice");
    }
    let stream = server.sse("/v1/events", &[]).await?;
    assert!(
        stream.headers.contains_key("x-request-id"),
        "the event stream has one"
    );
    drop(stream);
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn plain_client_request_id_is_echoed_and_a_bad_one_replaced() -> Result<()> {
    let server = TestServer::start().await?;
    for path in ["/healthz", "/nowhere"] {
        let resp = server
            .request(
                Method::GET,
                path,
                &[("x-request-id", "client-42.a_b:c")],
                None,
            )
            .await?;
        assert_eq!(request_id(&resp), "client-42.a_b:c", "{path}");
    }
    let too_long = "a".repeat(65);
    for bad in [
        too_long.as_str(),
        "has spaces in it",
        "semi;colon",
        "quote\"d",
    ] {
        for path in ["/healthz", "/nowhere"] {
            let resp = server
                .request(Method::GET, path, &[("x-request-id", bad)], None)
                .await?;
            let rid = request_id(&resp);
            assert!(!rid.is_empty() && rid != bad, "{bad:?} was kept on {path}");
            assert!(
                rid.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)),
                "{rid:?}"
            );
        }
    }
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 5. Concurrency
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_spawns_all_succeed_with_distinct_ids() -> Result<()> {
    let server = Arc::new(TestServer::start().await?);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let server = server.clone();
        tasks.spawn(async move {
            let body = json!({"profile": "shell", "args": ["true"], "name": format!("n{i}")});
            let resp = server.post(SPAWN, &body.to_string()).await?;
            anyhow::ensure!(
                resp.status == StatusCode::CREATED,
                "spawn {i} answered {}: {}",
                resp.status,
                resp.text()
            );
            let w = resp.json()?;
            anyhow::ensure!(w["name"] == format!("n{i}"), "spawn {i} got {w}");
            Ok(w["id"].as_str().context("an id")?.to_string())
        });
    }
    let mut ids = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        ids.insert(joined??);
    }
    assert_eq!(ids.len(), 20, "{ids:?}");
    let listed: BTreeSet<String> = listed(&server, "/v1/workers").await?.into_iter().collect();
    assert_eq!(listed, ids);
    let server = Arc::try_unwrap(server).ok().context("every task is done")?;
    server.stop().await?;
    Ok(())
}
