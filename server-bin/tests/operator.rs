//! What an operator needs to find out why (issue 16): readiness that means "this roster
//! serves", probes by `HEAD`, stop answers that say where the stop left the worker, failure
//! causes in the worker view, listing filters, a runtime's profiles, and process metrics.
//! All through the real server on 127.0.0.1:0 with real processes.
mod common;

use anyhow::{Context as _, Result};
use common::{TestServer, WAIT};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use server_bin::{Config, ServeOptions};

const SPAWN: &str = "/v1/runtimes/local/workers";

/// A loopback port nothing listens on: bound, then let go.
fn closed_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `path` until it answers `status`, or fails after [`WAIT`] with the last answer.
async fn wait_status(server: &TestServer, path: &str, status: StatusCode) -> Result<Value> {
    let last = std::sync::Mutex::new(String::new());
    let last_ref = &last;
    common::eventually(&format!("{path} to answer {status}"), WAIT, || async move {
        let resp = server.get(path).await?;
        *last_ref.lock().unwrap_or_else(|e| e.into_inner()) =
            format!("{} {}", resp.status, resp.text());
        Ok((resp.status == status).then(|| resp.json().unwrap_or(Value::Null)))
    })
    .await
    .with_context(|| {
        format!(
            "last answer: {}",
            last.lock().unwrap_or_else(|e| e.into_inner())
        )
    })
}

// ---------------------------------------------------------------------------------------
// Readiness and probes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_dead_remote_does_not_keep_the_server_unready() -> Result<()> {
    let port = closed_port()?;
    let text = format!(
        r#"
[[runtimes]]
name = "local"
source = "embedded"
allow_commands = true
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]

[[runtimes]]
name = "far"
source = "remote"
url = "http://127.0.0.1:{port}"
remote_runtime = "local"
connect_timeout = "500ms"
"#
    );
    let config = Config::parse(&text)?;
    let server = TestServer::start_with(config, ServeOptions::default()).await?;
    let ready = wait_status(&server, "/readyz", StatusCode::OK).await?;
    assert_eq!(ready, json!({ "status": "ready" }));
    // The remote's own health still says it is down, in the API and in the metrics.
    let far = server.get("/v1/runtimes/far").await?.json()?;
    assert_eq!(far["health"]["status"], "unavailable", "{far}");
    let metrics = server.get("/metrics").await?.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("roster_runtime_health{")
                && l.contains(r#"runtime="far""#)
                && l.contains(r#"status="unavailable""#)
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // And it stays ready while the remote stays down (reconnects go on).
    let resp = server.get("/readyz").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn head_answers_the_probes_without_a_body() -> Result<()> {
    let server = TestServer::start().await?;
    wait_status(&server, "/readyz", StatusCode::OK).await?;
    for path in ["/healthz", "/readyz"] {
        let resp = server.request(Method::HEAD, path, &[], None).await?;
        assert_eq!(resp.status, StatusCode::OK, "HEAD {path}");
        assert!(resp.body.is_empty(), "HEAD {path}: {:?}", resp.text());
        assert!(resp.headers.contains_key("x-request-id"), "HEAD {path}");
    }
    // Other routes keep their methods: HEAD there is still 405, with the allowed ones.
    let resp = server
        .request(Method::HEAD, "/v1/runtimes", &[], None)
        .await?;
    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Stop answers where it left the worker
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn stop_answers_stopping_for_a_worker_that_takes_its_time() -> Result<()> {
    let server = TestServer::start().await?;
    // Ignores SIGTERM, so it stays `stopping` for the whole grace.
    let id = server
        .spawn_shell("trap '' TERM; echo ready; while :; do sleep 0.1; done")
        .await?;
    server.wait_worker(&id, |w| w["state"] == "running").await?;
    let resp = server
        .post(&format!("/v1/workers/{id}/stop"), r#"{"grace_ms": 20000}"#)
        .await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
    let worker = resp.json()?;
    assert_eq!(worker["state"], "stopping", "{worker}");
    assert_eq!(worker["id"], id.as_str());
    // A second stop with no grace ends it; then a third answers the terminal worker.
    let resp = server
        .post(&format!("/v1/workers/{id}/stop"), r#"{"grace_ms": 0}"#)
        .await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED);
    let state = resp.json()?["state"].clone();
    assert!(state == "stopping" || state == "stopped", "{state}");
    server.wait_worker(&id, |w| w["state"] == "stopped").await?;
    let again = server.post(&format!("/v1/workers/{id}/stop"), "{}").await?;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.json()?["state"], "stopped");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn stop_of_an_ended_worker_answers_its_end() -> Result<()> {
    let server = TestServer::start().await?;
    let id = server.spawn_shell("exit 4").await?;
    server.wait_worker(&id, |w| w["state"] == "exited").await?;
    let resp = server.post(&format!("/v1/workers/{id}/stop"), "{}").await?;
    assert_eq!(resp.status, StatusCode::ACCEPTED);
    let worker = resp.json()?;
    assert_eq!(worker["state"], "exited", "{worker}");
    assert_eq!(worker["exit_code"], 4, "{worker}");
    let _ = SPAWN;
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Process metrics
// ---------------------------------------------------------------------------------------

/// The value of the one sample of `name` (no labels) in an exposition text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn metrics_show_the_process_and_the_build() -> Result<()> {
    let server = TestServer::start().await?;
    let text = server.get("/metrics").await?.text();
    for (family, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("roster_build_info", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "{family} {kind}:\n{text}"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        text.contains(&format!("roster_build_info{{version=\"{version}\"}} 1\n")),
        "{text}"
    );
    // The values are this process's: it holds memory and file descriptors (the listener,
    // the connection of this very request), and it started in the past.
    let rss = sample(&text, "process_resident_memory_bytes").context("rss")?;
    assert!(rss > 1_000_000.0, "{rss}");
    let fds = sample(&text, "process_open_fds").context("fds")?;
    assert!(fds >= 4.0, "{fds}");
    let cpu = sample(&text, "process_cpu_seconds_total").context("cpu")?;
    assert!(cpu >= 0.0, "{cpu}");
    let start = sample(&text, "process_start_time_seconds").context("start")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(start > 1_577_836_800.0 && start <= now + 1.0, "{start}");
    // More open connections, more fds: the gauge is read at each render.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(server.addr).await?);
    }
    let more = common::eventually("the new connections to be counted", WAIT, || async {
        let text = server.get("/metrics").await?.text();
        let now = sample(&text, "process_open_fds").unwrap_or(0.0);
        Ok((now >= fds + 8.0).then_some(now))
    })
    .await?;
    assert!(more >= fds + 8.0);
    drop(held);
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Why a worker failed to start
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_program_that_cannot_start_says_why_in_the_worker_view() -> Result<()> {
    let server = TestServer::start().await?;
    let resp = server
        .post(SPAWN, r#"{"command": ["/nonexistent/binary", "x"]}"#)
        .await?;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    let worker = resp.json()?;
    assert_eq!(worker["state"], "failed", "{worker}");
    assert_eq!(worker["reason"], "spawn_failed", "{worker}");
    assert_eq!(
        worker["message"], "program not found: No such file or directory (os error 2)",
        "{worker}"
    );
    // The same on a later GET, in the list and in the registry's event stream.
    let id = worker["id"].as_str().context("an id")?;
    let got = server.get(&format!("/v1/workers/{id}")).await?.json()?;
    assert_eq!(got["message"], worker["message"]);
    let mut events = server.sse("/v1/events", &[]).await?;
    let snapshot = events.next_event().await?;
    let listed = snapshot.data["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["id"] == id).cloned())
        .context("the worker in the snapshot")?;
    assert_eq!(listed["message"], worker["message"]);

    // A worker that runs has no message.
    let ok = server.spawn_shell("exit 0").await?;
    let done = server.wait_worker(&ok, |w| w["state"] == "exited").await?;
    assert!(done["message"].is_null(), "{done}");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_profile_s_host_paths_stay_out_of_the_message() -> Result<()> {
    let home = tempfile::tempdir()?;
    let gone = home.path().join("no-such-dir");
    let program = home.path().join("not-executable.sh");
    std::fs::write(&program, "echo never\n")?;
    let config = common::config(&format!(
        "[profiles.lost]\ncommand = [{:?}]\n[profiles.elsewhere]\ncommand = [\"/bin/true\"]\ncwd = {:?}\n\
         [profiles.plain]\ncommand = [{:?}]\n",
        gone.join("tool").display().to_string(),
        gone.display().to_string(),
        program.display().to_string(),
    ));
    let server = TestServer::start_with(config, ServeOptions::default()).await?;
    let cases = [
        ("lost", "program not found: "),
        ("elsewhere", "working directory not found: "),
        ("plain", "permission denied "),
    ];
    for (profile, start) in cases {
        let body = json!({ "profile": profile }).to_string();
        let resp = server.post(SPAWN, &body).await?;
        assert_eq!(
            resp.status,
            StatusCode::CREATED,
            "{profile}: {}",
            resp.text()
        );
        let worker = resp.json()?;
        assert_eq!(worker["reason"], "spawn_failed", "{worker}");
        let message = worker["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(start), "{profile}: {message}");
        assert!(message.contains("(os error "), "{profile}: {message}");
    }
    // `stop` checks that nothing a client got names the state directory; the profiles'
    // paths are checked here.
    let root = home.path().display().to_string();
    server.seen().assert_free_of(&[root])?;
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_log_names_a_failed_worker_by_its_public_id() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let (mut roster, addr) = common::process::Roster::serve(&state, &[], &[("RUST_LOG", "info")])?;
    let body = r#"{"command": ["/nonexistent/binary"]}"#;
    let resp = common::request_to(addr, Method::POST, SPAWN, &[], Some(body)).await?;
    let id = resp.created_id()?;
    let stderr = &roster.stderr;
    let line = common::eventually("the failure in the log", WAIT, || async {
        Ok(stderr
            .text()
            .lines()
            .find(|l| l.contains("worker failed") && l.contains(&id))
            .map(str::to_string))
    })
    .await?;
    assert!(line.contains("spawn_failed"), "{line}");
    assert!(
        line.contains("program not found: No such file or directory (os error 2)"),
        "{line}"
    );
    roster.terminate()?;
    // No line names a worker by an internal number (`worker=7`).
    let log = roster.stderr.text();
    for (at, _) in log.match_indices("worker=") {
        let next = log[at + "worker=".len()..].chars().next();
        assert!(
            !next.is_some_and(|c| c.is_ascii_digit()),
            "an internal worker number in the log:\n{log}"
        );
    }
    assert!(!log.contains("worker could not be started"), "{log}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Listing filters
// ---------------------------------------------------------------------------------------

/// The names of the workers a `GET /v1/workers…` lists (it must answer 200), sorted.
async fn names(server: &TestServer, query: &str) -> Result<Vec<String>> {
    let resp = server.get(&format!("/v1/workers?{query}")).await?;
    anyhow::ensure!(resp.status == StatusCode::OK, "{query}: {}", resp.text());
    let mut out: Vec<String> = resp.json()?["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .map(|w| w["name"].as_str().unwrap_or("-").to_string())
        .collect();
    out.sort();
    Ok(out)
}

#[tokio::test]
async fn workers_are_listed_by_states_exact_name_and_text() -> Result<()> {
    let server = TestServer::start().await?;
    let spawn = |script: &'static str, name: &'static str, labels: Value| {
        let body = json!({ "profile": "shell", "args": [script], "name": name, "labels": labels });
        let server = &server;
        async move { server.post(SPAWN, &body.to_string()).await?.created_id() }
    };
    let web = spawn("exec sleep 30", "Web-Frontend", json!({ "team": "edge" })).await?;
    let api = spawn("exec sleep 30", "api", json!({ "tier": "Backend" })).await?;
    let done = spawn("exit 0", "web-report", json!({})).await?;
    server
        .wait_worker(&web, |w| w["state"] == "running")
        .await?;
    server
        .wait_worker(&api, |w| w["state"] == "running")
        .await?;
    server
        .wait_worker(&done, |w| w["state"] == "exited")
        .await?;
    let stopping = server
        .post(&format!("/v1/workers/{api}/stop"), r#"{"grace_ms": 0}"#)
        .await?;
    assert_eq!(stopping.status, StatusCode::ACCEPTED);
    server
        .wait_worker(&api, |w| w["state"] == "stopped")
        .await?;

    // A comma list of states: any of them.
    assert_eq!(
        names(&server, "state=running,starting").await?,
        ["Web-Frontend"]
    );
    assert_eq!(
        names(&server, "state=exited,stopped").await?,
        ["api", "web-report"]
    );
    assert_eq!(names(&server, "state=running").await?, ["Web-Frontend"]);
    // The exact name: case and all.
    assert_eq!(names(&server, "name=api").await?, ["api"]);
    assert!(names(&server, "name=API").await?.is_empty());
    assert!(names(&server, "name=ap").await?.is_empty());
    // Text in a name or a label's key or value, without regard to ASCII case.
    assert_eq!(
        names(&server, "q=WEB").await?,
        ["Web-Frontend", "web-report"]
    );
    assert_eq!(names(&server, "q=backend").await?, ["api"]);
    assert_eq!(names(&server, "q=tea").await?, ["Web-Frontend"]);
    assert_eq!(
        names(&server, "q=report&state=exited").await?,
        ["web-report"]
    );
    assert_eq!(names(&server, "q=").await?.len(), 3);
    // Filters combine with paging as before: the same order, a cursor that still works.
    let first = server.get("/v1/workers?q=e&limit=1").await?.json()?;
    let next = first["next_page"].as_str().context("a next page")?;
    let second = server
        .get(&format!("/v1/workers?q=e&limit=1&page={next}"))
        .await?
        .json()?;
    assert_ne!(first["workers"][0]["id"], second["workers"][0]["id"]);

    // Bad input: a clear 400 naming what is wrong; the server goes on serving.
    let cases = [
        ("state=running,zombie".to_string(), "zombie"),
        ("state=running,".to_string(), "unknown state"),
        (format!("q={}", "x".repeat(257)), "`q`"),
        (format!("name={}", "n".repeat(257)), "`name`"),
        ("name=a&name=b".to_string(), "more than once"),
    ];
    for (query, needle) in cases {
        let resp = server.get(&format!("/v1/workers?{query}")).await?;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(resp.code(), "invalid_request", "{query}");
        assert!(resp.text().contains(needle), "{query}: {}", resp.text());
    }
    assert_eq!(names(&server, "").await?.len(), 3);
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A runtime's profiles
// ---------------------------------------------------------------------------------------

const PROFILES: &str = r#"
[[runtimes]]
name = "local"
source = "embedded"
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]
description = "a shell script, given as the one argument"
show_command = true
grace = "3s"
[runtimes.profiles.deploy]
command = ["/opt/secret-tools/deploy.sh", "--key-file=/etc/secret-tools/key"]
cwd = "/srv/private-checkout"
env = { DEPLOY_TOKEN = "tok-very-secret" }
restart = "on-failure"
max_restarts = 3
restart_window = "1m"
"#;

#[tokio::test]
async fn a_runtime_lists_its_profiles_without_what_the_config_keeps_private() -> Result<()> {
    let config = Config::parse(PROFILES)?;
    let server = TestServer::start_with(config, ServeOptions::default()).await?;
    let resp = server.get("/v1/runtimes/local/profiles").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let body = resp.json()?;
    let every = json!(["args", "env", "stdin", "name", "labels", "request_id"]);
    assert_eq!(
        body,
        json!({ "profiles": [
            {
                "name": "deploy", "description": null, "accepts": every, "args": "appended",
                "restart": { "policy": "on-failure", "max_restarts": 3, "window_ms": 60000 },
                "grace_ms": 10000, "command": null,
            },
            {
                "name": "shell", "description": "a shell script, given as the one argument",
                "accepts": every, "args": "appended", "restart": null, "grace_ms": 3000,
                "command": ["/bin/sh", "-c"],
            },
        ]})
    );
    // Nothing private got out: not the command, the working directory or the environment.
    let text = resp.text();
    for secret in [
        "secret-tools",
        "private-checkout",
        "DEPLOY_TOKEN",
        "tok-very-secret",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    // An unknown runtime, and a query parameter the route does not take.
    let resp = server.get("/v1/runtimes/nowhere/profiles").await?;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.code(), "runtime_not_found");
    let resp = server.get("/v1/runtimes/local/profiles?all=1").await?;
    assert_eq!(resp.code(), "invalid_request");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_remote_runtime_lists_its_upstream_s_profiles() -> Result<()> {
    let upstream =
        TestServer::start_with(Config::parse(PROFILES)?, ServeOptions::default()).await?;
    wait_status(&upstream, "/readyz", StatusCode::OK).await?;
    let text = format!(
        "[[runtimes]]\nname = \"far\"\nsource = \"remote\"\nurl = \"http://{}\"\n\
         remote_runtime = \"local\"\n",
        upstream.addr
    );
    let down = TestServer::start_with(Config::parse(&text)?, ServeOptions::default()).await?;
    wait_status(&down, "/readyz", StatusCode::OK).await?;
    let here = common::eventually("the remote's profiles", WAIT, || async {
        let resp = down.get("/v1/runtimes/far/profiles").await?;
        Ok((resp.status == StatusCode::OK).then(|| resp.json().unwrap_or(Value::Null)))
    })
    .await?;
    let there = upstream.get("/v1/runtimes/local/profiles").await?.json()?;
    assert_eq!(here, there);
    assert_eq!(here["profiles"][1]["name"], "shell", "{here}");
    down.stop().await?;
    upstream.stop().await?;
    Ok(())
}
