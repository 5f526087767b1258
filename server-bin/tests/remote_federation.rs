//! Registries that follow runtimes of other registries (the `remote` source, SPEC §9): an
//! upstream killed and restarted under a follower, three registries in a chain, a search
//! for internal authority in everything a follower sends, bearer tokens between registries,
//! and a client scenario that must look the same whether its runtime is `embedded` or
//! `remote`.
//!
//! In-process servers are `common::TestServer`s; where a process must die or read its
//! token from its environment, the real `roster` binary runs instead.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use server_bin::config::{Config, LoadedToken, Scope};
use server_bin::ServeOptions;
use tokio::net::TcpStream;

use common::{Seen, SseClient, SseEvent, TestResponse, TestServer};

/// How long a test waits for a condition before it fails.
const DEADLINE: Duration = Duration::from_secs(20);
/// The pause between two looks at a polled condition.
const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------------------------
// Small tools

/// A string no other test (or test run) uses.
fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{tag}{}x{nanos}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A loopback port that was free a moment ago (bound on port 0, then released), so that a
/// server can be started — and restarted — on it.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` every [`POLL`] until it gives `Some`, or fails after [`DEADLINE`] with the
/// last thing `check` saw.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(Option<T>, String)>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (found, last) = check().await?;
        if let Some(found) = found {
            return Ok(found);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {DEADLINE:?}; last seen: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One request to a server this test did not start in-process.
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<TestResponse> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{}", addr.port()));
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or("").to_string())))?;
    let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .context("request timed out")??;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .context("body timed out")??
        .to_bytes();
    Ok(TestResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

fn record_headers(seen: &Seen, headers: &HeaderMap) {
    for (k, v) in headers {
        seen.record(k.as_str().as_bytes());
        seen.record(b": ");
        seen.record(v.as_bytes());
        seen.record(b"\n");
    }
}

/// Keeps a response's headers and body in `seen`, and hands it on.
fn keep(seen: &Seen, resp: TestResponse) -> TestResponse {
    record_headers(seen, &resp.headers);
    seen.record(&resp.body);
    resp
}

/// A spawn body running `script` under the profile `shell`.
fn shell(script: &str, name: &str) -> String {
    json!({ "profile": "shell", "args": [script], "name": name }).to_string()
}

fn id_of(resp: &TestResponse) -> Result<String> {
    ensure!(
        resp.status == StatusCode::CREATED,
        "spawn answered {}: {}",
        resp.status,
        resp.text()
    );
    Ok(resp.json()?["id"].as_str().context("an id")?.to_string())
}

/// Waits until runtime `rt` of `server` is `ready`.
async fn wait_ready(server: &TestServer, rt: &str) -> Result<Value> {
    let path = format!("/v1/runtimes/{rt}");
    let path = path.as_str();
    eventually(&format!("runtime {rt} ready"), move || async move {
        let v = server.get(path).await?.json()?;
        let ready = v["health"]["status"] == "ready";
        Ok((ready.then(|| v.clone()), v.to_string()))
    })
    .await
}

/// The worker of `server` with this `name`, once it is listed.
async fn by_name(server: &TestServer, name: &str) -> Result<Value> {
    eventually(&format!("a worker named {name}"), move || async move {
        let list = server.get("/v1/workers").await?.json()?;
        let found = list["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["name"] == name).cloned());
        Ok((found, list.to_string()))
    })
    .await
}

/// Reads a stream until it closes.
async fn read_all(stream: &mut SseClient) -> Result<Vec<SseEvent>> {
    stream.rest(DEADLINE).await
}

/// `(seq, data)` of the `output` events.
fn chunks(events: &[SseEvent]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| {
            (
                e.data["seq"].as_u64().unwrap_or(0),
                e.data["data"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The events of a stream, collected by a task of their own while the test goes on.
struct Collector {
    events: Arc<Mutex<Vec<SseEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    fn start(mut stream: SseClient) -> Collector {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.next_event_within(Duration::from_secs(3600)).await {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(ev);
            }
        });
        Collector { events, task }
    }

    fn events(&self) -> Vec<SseEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the events collected so far satisfy `done`.
    async fn wait(&self, what: &str, done: impl Fn(&[SseEvent]) -> bool) -> Result<()> {
        eventually(what, || async {
            let events = self.events();
            let ok = done(&events);
            Ok((ok.then_some(()), format!("{events:#?}")))
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The states a worker went through on an event stream, in order (`state` or
/// `state/reason`).
fn states_of(events: &[SseEvent], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "worker.upserted" && e.data["worker"]["id"] == id)
        .map(|e| {
            let w = &e.data["worker"];
            match w["reason"].as_str() {
                Some(reason) => format!("{}/{reason}", w["state"].as_str().unwrap_or("?")),
                None => w["state"].as_str().unwrap_or("?").to_string(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The roster binary

/// Everything a pipe of the child has written so far, read by a thread of its own.
struct Captured {
    bytes: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Captured {
    fn new(mut from: impl Read + Send + 'static) -> Captured {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (b, d) = (bytes.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => b
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&buf[..n]),
                }
            }
            d.store(true, Ordering::Release);
        });
        Captured { bytes, done }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// A `roster serve` process this test started. Dropping it SIGKILLs and reaps it if it
/// still runs (its workers die with it).
struct Roster {
    child: Child,
    stdout: Captured,
    stderr: Captured,
}

impl Drop for Roster {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Roster {
    /// `roster serve --config <config> --state-dir <state>` with `env` added (`RUST_LOG`
    /// is `info` unless given), once it serves; returns it and its address.
    async fn serve(
        config: &Path,
        state: &Path,
        env: &[(&str, &str)],
    ) -> Result<(Roster, SocketAddr)> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_roster"));
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting roster")?;
        let stdout = Captured::new(child.stdout.take().context("stdout")?);
        let stderr = Captured::new(child.stderr.take().context("stderr")?);
        let mut roster = Roster {
            child,
            stdout,
            stderr,
        };
        let addr = roster.wait_serving().await?;
        Ok((roster, addr))
    }

    /// The address of the `roster is serving listen=…` log line, once it is there.
    async fn wait_serving(&mut self) -> Result<SocketAddr> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let log = self.stderr.text();
            let addr = log
                .lines()
                .find(|l| l.contains("roster is serving"))
                .and_then(|l| l.split_once("listen=")?.1.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            if let Some(addr) = addr {
                return Ok(addr);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("roster exited ({status}) before serving; stderr:\n{log}");
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "roster did not serve in time; stderr:\n{log}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    async fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.wait_exit().await
    }

    /// SIGTERM (a graceful stop), and waits for the process and its pipes to end.
    async fn terminate(&mut self) -> Result<()> {
        ensure!(self.child.try_wait()?.is_none(), "roster already exited");
        let pid = i32::try_from(self.child.id())?;
        // SAFETY: kill(2) on the pid of our own child, not reaped yet; no memory involved.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        self.wait_exit().await
    }

    async fn wait_exit(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.child.try_wait()?.is_none() {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "roster did not exit; stderr:\n{}",
                self.stderr.text()
            );
            tokio::time::sleep(POLL).await;
        }
        while !(self.stdout.done.load(Ordering::Acquire)
            && self.stderr.done.load(Ordering::Acquire))
        {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "roster's pipes stayed open"
            );
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Everything the process wrote to stdout and stderr so far.
    fn output(&self) -> String {
        format!("{}{}", self.stdout.text(), self.stderr.text())
    }
}

/// Live (not zombie) processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        if rest.split_whitespace().next()? == "Z" {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        cmdline
            .contains(marker)
            .then(|| format!("{pid}: {cmdline}"))
    })
    .collect()
}

/// A test server for a config written in TOML (server keys of the file apply too).
async fn server_for(toml: &str) -> Result<TestServer> {
    let config = Config::parse(toml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let options = ServeOptions::from_config(&config.server, Vec::new());
    TestServer::start_with(config, options).await
}

/// A `[[runtimes]]` table of a runtime `name` following runtime `remote` of `upstream`.
fn remote_runtime(name: &str, upstream: SocketAddr, remote: &str, extra: &str) -> String {
    format!(
        "[[runtimes]]\nname = \"{name}\"\nsource = \"remote\"\nurl = \"http://{upstream}\"\n\
         remote_runtime = \"{remote}\"\n{extra}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// 1. The upstream killed and restarted

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_and_restarted_leaves_its_live_workers_lost_under_the_same_ids(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = dir.path().join("upstream.toml");
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\nsse_ping = \"200ms\"\n"),
    )?;
    let state = dir.path().join("state");
    let (mut up, up_addr) = Roster::serve(&config, &state, &[]).await?;
    ensure!(up_addr.port() == port, "{up_addr} is not on port {port}");

    let down = server_for(&remote_runtime(
        "far",
        up_addr,
        "local",
        "heartbeat_timeout = \"1s\"\nbackoff_cap = \"500ms\"",
    ))
    .await?;
    wait_ready(&down, "far").await?;
    let mut stream = down.sse("/v1/events", &[]).await?;
    let first = stream.next_event().await?;
    ensure!(first.event == "snapshot", "{first:?}");
    let events = Collector::start(stream);

    let marker = unique("fedlive");
    let live = id_of(
        &down
            .post(
                "/v1/runtimes/far/workers",
                &shell(&format!("sleep 300; : {marker}"), "live"),
            )
            .await?,
    )?;
    let quick = id_of(
        &down
            .post("/v1/runtimes/far/workers", &shell("echo quick", "quick"))
            .await?,
    )?;
    down.wait_worker(&live, |w| w["state"] == "running").await?;
    let quick_before = down.wait_worker(&quick, |w| w["state"] == "exited").await?;
    let marker_ref = marker.as_str();
    eventually("the live worker's process", move || async move {
        let found = processes_with(marker_ref);
        Ok(((!found.is_empty()).then_some(()), format!("{found:?}")))
    })
    .await?;

    // The upstream dies, and its workers with it.
    events
        .wait("both workers' states on the stream", |evs| {
            states_of(evs, &live).last().map(String::as_str) == Some("running")
                && states_of(evs, &quick).last().map(String::as_str) == Some("exited")
        })
        .await?;
    let before_kill = events.events().len();
    up.kill().await?;
    eventually("the upstream's workers gone", move || async move {
        let left = processes_with(marker_ref);
        Ok((left.is_empty().then_some(()), format!("{left:?}")))
    })
    .await?;

    // The outage: the runtime is unavailable, the live worker unknown since it was last seen.
    let (live_id, quick_id) = (live.as_str(), quick.as_str());
    let d = &down;
    let unknown = eventually("the outage seen downstream", move || async move {
        let rt = d.get("/v1/runtimes/far").await?.json()?;
        let w = d.get(&format!("/v1/workers/{live_id}")).await?.json()?;
        let ok = rt["health"]["status"] == "unavailable" && w["state"] == "unknown";
        Ok((ok.then(|| w.clone()), format!("{rt} {w}")))
    })
    .await?;
    assert!(unknown["last_seen_at"].is_string(), "{unknown}");
    assert_eq!(unknown["id"], live_id);
    let health = down.get("/v1/runtimes/far").await?.json()?["health"].clone();
    assert!(
        health["since"].is_string() && health["retry_at"].is_string(),
        "{health}"
    );
    let quick_during = down.get(&format!("/v1/workers/{quick_id}")).await?.json()?;
    assert_eq!(quick_during, quick_before, "a terminal worker changed");
    let refused = down
        .post("/v1/runtimes/far/workers", &shell("echo during", "during"))
        .await?;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "runtime_unavailable"),
        "{}",
        refused.text()
    );
    assert!(
        refused.headers.contains_key("retry-after"),
        "{:?}",
        refused.headers
    );

    // The upstream comes back on the same port and state directory.
    let (mut up, again) = Roster::serve(&config, &state, &[]).await?;
    ensure!(again == up_addr, "restarted on {again}, not {up_addr}");
    wait_ready(&down, "far").await?;
    let lost = down.wait_worker(&live, |w| w["state"] == "failed").await?;
    assert_eq!(lost["reason"], "lost", "{lost}");
    assert_eq!(lost["id"], live_id, "{lost}");
    assert!(lost["last_seen_at"].is_string(), "{lost}");
    assert!(lost["ended_at"].is_string(), "{lost}");
    eventually("the exited worker removed", move || async move {
        let resp = d.get(&format!("/v1/workers/{quick_id}")).await?;
        let gone = resp.status == StatusCode::NOT_FOUND && resp.code() == "worker_not_found";
        Ok((
            gone.then_some(()),
            format!("{} {}", resp.status, resp.text()),
        ))
    })
    .await?;

    // New spawns work, and the lost worker's record goes on request.
    let fresh = id_of(
        &down
            .post("/v1/runtimes/far/workers", &shell("echo again", "again"))
            .await?,
    )?;
    let done = down.wait_worker(&fresh, |w| w["state"] == "exited").await?;
    assert_eq!(done["exit_code"], 0, "{done}");
    assert!(![live_id, quick_id].contains(&fresh.as_str()));
    let deleted = down
        .request(Method::DELETE, &format!("/v1/workers/{live_id}"), &[], None)
        .await?;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    let after = down.get(&format!("/v1/workers/{live_id}")).await?;
    assert_eq!(
        (after.status, after.code().as_str()),
        (StatusCode::NOT_FOUND, "worker_not_found"),
        "{}",
        after.text()
    );

    // A client of the downstream's events saw all of it, connected throughout.
    let removed = |events: &[SseEvent], id: &str| {
        events
            .iter()
            .any(|e| e.event == "worker.removed" && e.data["worker_id"] == id)
    };
    events
        .wait("the lost worker's removal on the stream", |evs| {
            removed(evs, live_id)
        })
        .await?;
    let seen = events.events();
    assert!(removed(&seen, quick_id), "{seen:#?}");
    assert!(
        states_of(&seen[..before_kill], live_id).ends_with(&["running".to_string()]),
        "{seen:#?}"
    );
    let live_states = states_of(&seen[before_kill..], live_id);
    assert_eq!(
        live_states,
        ["unknown", "failed/lost"],
        "from the kill on, the live worker must go from unknown to failed/lost only"
    );
    let unknown_event = seen[before_kill..]
        .iter()
        .find(|e| {
            e.event == "worker.upserted"
                && e.data["worker"]["id"] == live_id
                && e.data["worker"]["state"] == "unknown"
        })
        .context("the unknown event")?;
    assert!(
        unknown_event.data["worker"]["last_seen_at"].is_string(),
        "{unknown_event:?}"
    );

    up.terminate().await?;
    down.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Three registries in a chain

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_registries_in_a_chain_pass_output_input_stop_and_errors_through() -> Result<()> {
    let a = TestServer::start().await?;
    let b = server_for(&remote_runtime("mid", a.addr, "local", "")).await?;
    let c = server_for(&remote_runtime("top", b.addr, "mid", "")).await?;
    wait_ready(&b, "mid").await?;
    wait_ready(&c, "top").await?;

    // A worker that prints, reads a line and echoes it, all through C.
    let name = unique("echoer");
    let spawned = c
        .post(
            "/v1/runtimes/top/workers",
            &shell("echo first; read l; echo got:$l", &name),
        )
        .await?;
    let c_id = id_of(&spawned)?;
    let body = spawned.json()?;
    assert_eq!(
        (&body["runtime_id"], &body["name"]),
        (&json!("top"), &json!(name)),
        "{body}"
    );
    let mut out = c.sse(&format!("/v1/workers/{c_id}/output"), &[]).await?;
    let mut live = Vec::new();
    loop {
        let ev = out.next_event().await?;
        live.push(ev.clone());
        if ev.event == "output" {
            break;
        }
    }
    let input = c
        .post(
            &format!("/v1/workers/{c_id}/input"),
            &json!({ "data": "hello\n" }).to_string(),
        )
        .await?;
    assert_eq!(input.status, StatusCode::ACCEPTED, "{}", input.text());
    live.extend(read_all(&mut out).await?);
    assert_eq!(
        live.last().map(|e| e.event.as_str()),
        Some("end"),
        "{live:#?}"
    );
    let c_chunks = chunks(&live);
    let seqs: Vec<u64> = c_chunks.iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "{live:#?}");
    let text: String = c_chunks.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(text, "first\ngot:hello\n", "{live:#?}");
    let ended = c.wait_worker(&c_id, |w| w["state"] == "exited").await?;
    assert_eq!(ended["exit_code"], 0, "{ended}");

    // The same worker at B and at A: other ids, same output with the same seqs.
    let b_view = by_name(&b, &name).await?;
    let a_view = by_name(&a, &name).await?;
    assert_eq!(b_view["runtime_id"], "mid", "{b_view}");
    assert_eq!(a_view["runtime_id"], "local", "{a_view}");
    let b_id = b_view["id"].as_str().context("an id")?.to_string();
    let a_id = a_view["id"].as_str().context("an id")?.to_string();
    assert!(
        c_id != b_id && b_id != a_id && a_id != c_id,
        "{c_id} {b_id} {a_id}"
    );
    b.wait_worker(&b_id, |w| w["state"] == "exited" && w["exit_code"] == 0)
        .await?;
    a.wait_worker(&a_id, |w| w["state"] == "exited" && w["exit_code"] == 0)
        .await?;
    for (server, id) in [(&a, &a_id), (&b, &b_id)] {
        let mut own = server
            .sse(&format!("/v1/workers/{id}/output?follow=0"), &[])
            .await?;
        let own = read_all(&mut own).await?;
        assert_eq!(chunks(&own), c_chunks, "{own:#?}");
    }

    // Resuming C's stream after seq 1: exactly the chunks after it, then `end`.
    let mut resumed = c
        .sse(
            &format!("/v1/workers/{c_id}/output"),
            &[("Last-Event-ID", "1")],
        )
        .await?;
    let resumed = read_all(&mut resumed).await?;
    let tail: Vec<&str> = resumed
        .iter()
        .filter(|e| e.event != "state")
        .map(|e| e.event.as_str())
        .collect();
    let mut expected_tail = vec!["output"; c_chunks.len() - 1];
    expected_tail.push("end");
    assert_eq!(tail, expected_tail, "{resumed:#?}");
    assert_eq!(chunks(&resumed), c_chunks[1..].to_vec(), "{resumed:#?}");

    // Input to an ended worker is a conflict, from A through B to C.
    let late = c
        .post(
            &format!("/v1/workers/{c_id}/input"),
            &json!({ "data": "late\n" }).to_string(),
        )
        .await?;
    assert_eq!(
        (late.status, late.code().as_str()),
        (StatusCode::CONFLICT, "conflict"),
        "{}",
        late.text()
    );

    // A long-running worker: DELETE while it runs is a conflict; a stop through C stops it
    // at every hop.
    let long_name = unique("sleeper");
    let long = id_of(
        &c.post("/v1/runtimes/top/workers", &shell("sleep 300", &long_name))
            .await?,
    )?;
    c.wait_worker(&long, |w| w["state"] == "running").await?;
    let b_long = by_name(&b, &long_name).await?["id"]
        .as_str()
        .context("an id")?
        .to_string();
    let a_long = by_name(&a, &long_name).await?["id"]
        .as_str()
        .context("an id")?
        .to_string();
    assert!(long != b_long && b_long != a_long && a_long != long);
    let busy = c
        .request(Method::DELETE, &format!("/v1/workers/{long}"), &[], None)
        .await?;
    assert_eq!(
        (busy.status, busy.code().as_str()),
        (StatusCode::CONFLICT, "conflict"),
        "{}",
        busy.text()
    );
    let stop = c
        .post(&format!("/v1/workers/{long}/stop"), r#"{"grace_ms": 2000}"#)
        .await?;
    assert_eq!(stop.status, StatusCode::ACCEPTED, "{}", stop.text());
    for (server, id) in [(&c, &long), (&b, &b_long), (&a, &a_long)] {
        server.wait_worker(id, |w| w["state"] == "stopped").await?;
    }

    // Errors keep their codes through the chain.
    let bad_profile = c
        .post(
            "/v1/runtimes/top/workers",
            r#"{"profile": "no-such-profile", "args": []}"#,
        )
        .await?;
    assert_eq!(
        (bad_profile.status, bad_profile.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{}",
        bad_profile.text()
    );
    let nobody = format!("w_{}", "0".repeat(26));
    for (path, body) in [
        (format!("/v1/workers/{nobody}/stop"), "{}".to_string()),
        (
            format!("/v1/workers/{nobody}/input"),
            json!({ "data": "x\n" }).to_string(),
        ),
    ] {
        let resp = c.post(&path, &body).await?;
        assert_eq!(
            (resp.status, resp.code().as_str()),
            (StatusCode::NOT_FOUND, "worker_not_found"),
            "{path}: {}",
            resp.text()
        );
    }

    c.stop().await?;
    b.stop().await?;
    a.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Nothing of the upstream reaches a client of the downstream

/// Where `needle` (digits) stands in `text` with no digit on either side.
fn find_number(text: &str, needle: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    text.match_indices(needle).map(|(i, _)| i).find(|&i| {
        let before = i.checked_sub(1).map(|j| bytes[j]);
        let after = bytes.get(i + needle.len()).copied();
        !before.is_some_and(|b| b.is_ascii_digit()) && !after.is_some_and(|b| b.is_ascii_digit())
    })
}

/// The bytes a client got, kept in a [`Seen`] and as text for the number search.
#[derive(Clone, Default)]
struct Transcript {
    seen: Seen,
    text: Arc<Mutex<String>>,
}

impl Transcript {
    fn record(&self, bytes: &[u8]) {
        self.seen.record(bytes);
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_str(&String::from_utf8_lossy(bytes));
    }

    fn keep(&self, resp: TestResponse) -> TestResponse {
        for (k, v) in &resp.headers {
            self.record(format!("{k}: ").as_bytes());
            self.record(v.as_bytes());
            self.record(b"\n");
        }
        self.record(&resp.body);
        resp
    }

    /// Keeps what a stream sent (its headers and every byte read), once done with it.
    fn keep_stream(&self, stream: &SseClient) {
        for (k, v) in &stream.headers {
            self.record(format!("{k}: ").as_bytes());
            self.record(v.as_bytes());
            self.record(b"\n");
        }
        self.record(&stream.raw);
    }

    /// Fails when the bytes hold one of `needles`, or `port` as a number of its own.
    fn assert_free_of(&self, needles: &[String], port: Option<u16>) -> Result<()> {
        self.seen.assert_free_of(needles)?;
        let Some(port) = port else { return Ok(()) };
        let text = self.text.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = find_number(&text, &port.to_string()) {
            let from = text[..i]
                .char_indices()
                .rev()
                .nth(120)
                .map_or(0, |(j, _)| j);
            let to = text[i..]
                .char_indices()
                .nth(120)
                .map_or(text.len(), |(j, _)| i + j);
            bail!("a client got the port {port}: …{}…", &text[from..to]);
        }
        Ok(())
    }
}

/// A request to the downstream, kept in `t`.
async fn req(
    t: &Transcript,
    server: &TestServer,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Result<TestResponse> {
    Ok(t.keep(server.request(method, path, &[], body).await?))
}

fn expect(resp: &TestResponse, status: u16, code: &str) {
    assert_eq!(
        (resp.status.as_u16(), resp.code().as_str()),
        (status, code),
        "{}",
        resp.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_the_upstream_reaches_a_client_of_the_downstream() -> Result<()> {
    const HIDDEN: &str = "hidden-rt-7";
    let token = unique("fed-token-secret-0123456789-");
    let up_config = Config::parse(&format!(
        "[[runtimes]]\nname = \"{HIDDEN}\"\nsource = \"embedded\"\nmax_workers = 3\n\
         [runtimes.profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n"
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let up_options = ServeOptions::from_config(
        &up_config.server,
        vec![LoadedToken {
            name: "federation".into(),
            scope: Scope::Operate,
            secret: token.clone(),
        }],
    );
    let up = TestServer::start_with(up_config, up_options).await?;
    let auth = format!("Bearer {token}");
    let up_get = |path: &'static str| {
        let auth = auth.clone();
        let up = &up;
        async move {
            up.request(Method::GET, path, &[("authorization", &auth)], None)
                .await
        }
    };
    assert_eq!(up_get("/v1/runtimes").await?.status, StatusCode::OK);

    let token_dir = tempfile::tempdir()?;
    let token_file = token_dir.path().join("upstream.token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    let down = server_for(&remote_runtime(
        "r",
        up.addr,
        HIDDEN,
        &format!(
            "token_file = {}",
            serde_json::to_string(token_file.to_str().context("UTF-8")?)?
        ),
    ))
    .await?;
    let t = Transcript::default();
    let d = &down;
    let t_ref = &t;
    eventually("runtime r ready", move || async move {
        let v = req(t_ref, d, Method::GET, "/v1/runtimes/r", None)
            .await?
            .json()?;
        Ok((
            (v["health"]["status"] == "ready").then_some(()),
            v.to_string(),
        ))
    })
    .await?;
    let mut events = down.sse("/v1/events", &[]).await?;
    ensure!(events.next_event().await?.event == "snapshot");

    // Workers: one that echoes its input until stopped, one that ends at once.
    let spawn = |script: &str, name: &str| {
        let body = json!({ "profile": "shell", "args": [script], "name": name,
                           "labels": {"team": "a"} })
        .to_string();
        async move {
            req(
                t_ref,
                d,
                Method::POST,
                "/v1/runtimes/r/workers",
                Some(&body),
            )
            .await
        }
    };
    let long = id_of(&spawn("echo long-start; cat", "long").await?)?;
    let short = id_of(&spawn("echo short-out; echo short-err >&2", "short").await?)?;
    down.wait_worker(&short, |w| w["state"] == "exited").await?;
    down.wait_worker(&long, |w| w["state"] == "running").await?;
    for path in [
        "/v1/runtimes".to_string(),
        "/v1/runtimes/r".to_string(),
        "/v1/workers".to_string(),
        "/v1/workers?runtime=r&label=team=a&limit=1".to_string(),
        "/v1/workers?state=running".to_string(),
        format!("/v1/workers/{long}"),
        format!("/v1/workers/{short}"),
        "/readyz".to_string(),
        "/healthz".to_string(),
    ] {
        let resp = req(&t, d, Method::GET, &path, None).await?;
        assert_eq!(resp.status, StatusCode::OK, "{path}: {}", resp.text());
    }
    let page = req(&t, d, Method::GET, "/v1/workers?limit=1", None)
        .await?
        .json()?;
    let next = page["next_page"].as_str().context("a next page")?;
    req(
        &t,
        d,
        Method::GET,
        &format!("/v1/workers?limit=1&page={next}"),
        None,
    )
    .await?;

    // Output, input, resume, stop.
    let mut done = down
        .sse(&format!("/v1/workers/{short}/output?follow=0"), &[])
        .await?;
    let short_out = read_all(&mut done).await?;
    t.keep_stream(&done);
    assert_eq!(chunks(&short_out).len(), 2, "{short_out:#?}");
    let mut out = down.sse(&format!("/v1/workers/{long}/output"), &[]).await?;
    let first = loop {
        let ev = out.next_event().await?;
        if ev.event == "output" {
            break ev;
        }
    };
    assert_eq!(first.data["data"], "long-start\n");
    let accepted = req(
        &t,
        d,
        Method::POST,
        &format!("/v1/workers/{long}/input"),
        Some(r#"{"data": "echoed-line\n"}"#),
    )
    .await?;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    let echoed = out.next_event().await?;
    assert_eq!(echoed.data["data"], "echoed-line\n", "{echoed:?}");
    let mut resumed = down
        .sse(
            &format!("/v1/workers/{long}/output"),
            &[("Last-Event-ID", "1")],
        )
        .await?;
    let again = resumed.next_event().await?;
    ensure!(again.event == "state", "{again:?}");
    let stop = req(
        &t,
        d,
        Method::POST,
        &format!("/v1/workers/{long}/stop"),
        Some(r#"{"grace_ms": 2000}"#),
    )
    .await?;
    assert_eq!(stop.status, StatusCode::ACCEPTED, "{}", stop.text());
    let rest = read_all(&mut out).await?;
    assert_eq!(
        rest.last().map(|e| e.event.as_str()),
        Some("end"),
        "{rest:#?}"
    );
    t.keep_stream(&out);
    read_all(&mut resumed).await?;
    t.keep_stream(&resumed);
    let again = req(
        &t,
        d,
        Method::POST,
        &format!("/v1/workers/{long}/stop"),
        None,
    )
    .await?;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text());

    // Every error that can be provoked, from this registry and from the upstream.
    let nobody = format!("w_{}", "0".repeat(26));
    let cases: Vec<(Method, String, Option<String>, u16, &str)> = vec![
        (
            Method::POST,
            "/v1/runtimes/r/workers".into(),
            Some(r#"{"profile": "no-such-profile"}"#.into()),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/runtimes/r/workers".into(),
            Some(r#"{"command": ["/bin/echo", "x"]}"#.into()),
            403,
            "forbidden",
        ),
        (
            Method::POST,
            "/v1/runtimes/r/workers".into(),
            Some(r#"{"profile": "shell", "bogus": 1}"#.into()),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/runtimes/r/workers".into(),
            Some("{".into()),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/runtimes/nope/workers".into(),
            Some(r#"{"profile": "shell"}"#.into()),
            404,
            "runtime_not_found",
        ),
        (
            Method::POST,
            format!("/v1/workers/{long}/input"),
            Some(r#"{"data": "late\n"}"#.into()),
            409,
            "conflict",
        ),
        (
            Method::POST,
            format!("/v1/workers/{nobody}/stop"),
            Some("{}".into()),
            404,
            "worker_not_found",
        ),
        (
            Method::POST,
            format!("/v1/workers/{nobody}/input"),
            Some(r#"{"data": "x"}"#.into()),
            404,
            "worker_not_found",
        ),
        (
            Method::GET,
            "/v1/workers/not-an-id".into(),
            None,
            404,
            "worker_not_found",
        ),
        (
            Method::POST,
            format!("/v1/workers/{long}/stop"),
            Some(r#"{"grace_ms": "soon"}"#.into()),
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/nowhere".into(),
            None,
            404,
            "route_not_found",
        ),
        (
            Method::PUT,
            "/v1/runtimes".into(),
            None,
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let resp = req(&t, d, method.clone(), &path, body.as_deref()).await?;
        assert_eq!(
            (resp.status.as_u16(), resp.code().as_str()),
            (status, code),
            "{method} {path}: {}",
            resp.text()
        );
    }
    let text_body = t.keep(
        down.request(
            Method::POST,
            "/v1/runtimes/r/workers",
            &[("content-type", "text/plain")],
            Some("{}"),
        )
        .await?,
    );
    expect(&text_body, 415, "unsupported_media_type");
    let keyed = json!({ "profile": "shell", "args": ["echo keyed"], "request_id": "key-1" });
    let first_keyed = spawn_body(&t, d, &keyed).await?;
    let second_keyed = spawn_body(&t, d, &keyed).await?;
    assert_eq!(first_keyed.json()?["id"], second_keyed.json()?["id"]);
    let other = json!({ "profile": "shell", "args": ["echo other"], "request_id": "key-1" });
    expect(&spawn_body(&t, d, &other).await?, 409, "conflict");
    // The upstream's limit of live workers (3), answered through this registry.
    let mut sleepers = Vec::new();
    let mut refused = None;
    for i in 0..6 {
        let resp = spawn_body(
            &t,
            d,
            &json!({ "profile": "shell", "args": ["sleep 300"], "name": format!("s{i}") }),
        )
        .await?;
        if resp.status == StatusCode::CREATED {
            sleepers.push(id_of(&resp)?);
        } else {
            refused = Some(resp);
            break;
        }
    }
    let refused = refused.context("the upstream never refused a worker")?;
    expect(&refused, 429, "capacity_exceeded");
    let busy = req(
        &t,
        d,
        Method::DELETE,
        &format!("/v1/workers/{}", sleepers[0]),
        None,
    )
    .await?;
    expect(&busy, 409, "conflict");
    for id in &sleepers {
        let resp = req(&t, d, Method::POST, &format!("/v1/workers/{id}/stop"), None).await?;
        assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
    }
    for id in &sleepers {
        down.wait_worker(id, |w| w["state"] == "stopped").await?;
    }
    // The upstream's ids, read from its own list before one of them is deleted.
    let upstream_ids = || async {
        let own = up_get("/v1/workers?limit=1000").await?;
        let ids: Vec<String> = own.json()?["workers"]
            .as_array()
            .context("a list")?
            .iter()
            .filter_map(|w| w["id"].as_str().map(str::to_string))
            .collect();
        anyhow::Ok((ids, own))
    };
    let (mut up_ids, _) = upstream_ids().await?;
    let deleted = req(&t, d, Method::DELETE, &format!("/v1/workers/{short}"), None).await?;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    let gone = req(&t, d, Method::GET, &format!("/v1/workers/{short}"), None).await?;
    expect(&gone, 404, "worker_not_found");
    let metrics = req(&t, d, Method::GET, "/metrics", None).await?;
    assert_eq!(metrics.status, StatusCode::OK);

    // What the upstream itself answers names its ids, and the search finds them there.
    let (later_ids, own) = upstream_ids().await?;
    ensure!(later_ids.len() >= 5, "{}", own.text());
    let control = Transcript::default();
    control.keep(own);
    for id in &later_ids {
        ensure!(
            control
                .assert_free_of(std::slice::from_ref(id), None)
                .is_err(),
            "the search does not find {id} in the upstream's own answer"
        );
    }
    ensure!(control.assert_free_of(&[HIDDEN.to_string()], None).is_err());
    up_ids.extend(later_ids);

    // An outage: the upstream goes away; what the downstream says of it names nothing.
    let up_addr = up.addr;
    up.stop().await?;
    let outage = eventually("the outage", move || async move {
        let v = req(t_ref, d, Method::GET, "/v1/runtimes/r", None)
            .await?
            .json()?;
        let down_now = v["health"]["status"] == "unavailable";
        Ok((down_now.then(|| v.clone()), v.to_string()))
    })
    .await?;
    assert!(outage["health"]["message"].is_string(), "{outage}");
    let refused = spawn_body(&t, d, &json!({ "profile": "shell", "args": ["true"] })).await?;
    expect(&refused, 503, "runtime_unavailable");
    // An output stream asked for during an outage is refused like any call.
    let no_output = req(
        &t,
        d,
        Method::GET,
        &format!("/v1/workers/{long}/output?follow=0"),
        None,
    )
    .await?;
    expect(&no_output, 503, "runtime_unavailable");
    req(&t, d, Method::GET, "/v1/workers", None).await?;
    req(&t, d, Method::GET, "/metrics", None).await?;
    req(&t, d, Method::GET, "/readyz", None).await?;

    // The events stream, read to now.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < deadline {
        if events
            .next_event_within(Duration::from_millis(100))
            .await
            .is_err()
        {
            break;
        }
    }
    t.keep_stream(&events);
    ensure!(
        String::from_utf8_lossy(&events.raw).contains(&long),
        "the events stream saw nothing"
    );

    let mut needles = vec![
        token.clone(),
        token_file.display().to_string(),
        token_dir.path().display().to_string(),
        HIDDEN.to_string(),
        format!("127.0.0.1:{}", up_addr.port()),
        format!("localhost:{}", up_addr.port()),
        "127.0.0.1".to_string(),
    ];
    needles.extend(up_ids.iter().cloned());
    // The search does find what the downstream did send: its own ids; and a port only
    // as a number of its own.
    ensure!(find_number("at 127.0.0.1:41234.", "41234") == Some(13));
    ensure!(find_number("0.000412345 41234", "41234") == Some(12));
    ensure!(find_number("14123456", "41234").is_none());
    ensure!(t
        .assert_free_of(&[long.clone(), short.clone()], None)
        .is_err());
    t.assert_free_of(&needles, Some(up_addr.port()))?;
    down.stop().await?;
    Ok(())
}

async fn spawn_body(t: &Transcript, server: &TestServer, body: &Value) -> Result<TestResponse> {
    req(
        t,
        server,
        Method::POST,
        "/v1/runtimes/r/workers",
        Some(&body.to_string()),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 4. Tokens between registries

/// A `roster serve` on `127.0.0.1:0` for `toml`, in a directory of its own.
async fn serve_file(
    dir: &Path,
    name: &str,
    toml: &str,
    env: &[(&str, &str)],
) -> Result<(Roster, SocketAddr)> {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml)?;
    Roster::serve(&config, &dir.join(format!("{name}-state")), env).await
}

/// An upstream `roster` that requires `secret` (from its environment) and two downstream
/// `roster`s with trace logs following its runtime `local`: one with `secret`, one with
/// `wrong`.
struct TokenSetup {
    up: Roster,
    up_addr: SocketAddr,
    good: Roster,
    good_addr: SocketAddr,
    bad: Roster,
    bad_addr: SocketAddr,
    secret: String,
    wrong: String,
    _dir: tempfile::TempDir,
}

impl TokenSetup {
    async fn start() -> Result<TokenSetup> {
        let dir = tempfile::tempdir()?;
        let u = unique("t");
        let up_var = format!("ROSTER_FED_UP_TOKEN_{u}");
        let down_var = format!("ROSTER_FED_DOWN_TOKEN_{u}");
        let secret = format!("federation-secret-{u}-0123456789");
        let wrong = format!("not-the-secret-{u}-0123456789");
        let (up, up_addr) = serve_file(
            dir.path(),
            "upstream",
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[[server.tokens]]\nname = \"federation\"\n\
                 scope = \"operate\"\ntoken_env = \"{up_var}\"\n"
            ),
            &[(&up_var, &secret)],
        )
        .await?;
        let downstream = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{}",
            remote_runtime(
                "far",
                up_addr,
                "local",
                &format!("token_env = \"{down_var}\""),
            )
        );
        let trace = ("RUST_LOG", "trace");
        let (good, good_addr) = serve_file(
            dir.path(),
            "good",
            &downstream,
            &[(&down_var, &secret), trace],
        )
        .await?;
        let (bad, bad_addr) = serve_file(
            dir.path(),
            "bad",
            &downstream,
            &[(&down_var, &wrong), trace],
        )
        .await?;
        Ok(TokenSetup {
            up,
            up_addr,
            good,
            good_addr,
            bad,
            bad_addr,
            secret,
            wrong,
            _dir: dir,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_between_registries_opens_the_upstream_and_is_never_shown() -> Result<()> {
    let mut s = TokenSetup::start().await?;
    let unauthenticated = call(s.up_addr, Method::GET, "/v1/runtimes", &[], None).await?;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    let mut answers: Vec<TestResponse> = Vec::new();

    // With the right token the runtime works.
    let good = s.good_addr;
    let ready = eventually("the runtime behind the right token", || async {
        let v = call(good, Method::GET, "/v1/runtimes/far", &[], None).await?;
        let text = v.text();
        let ok = v.json()?["health"]["status"] == "ready";
        Ok((ok.then_some(v), text))
    })
    .await?;
    answers.push(ready);
    let spawned = call(
        good,
        Method::POST,
        "/v1/runtimes/far/workers",
        &[],
        Some(&shell("echo token-ok", "tok")),
    )
    .await?;
    let id = id_of(&spawned)?;
    answers.push(spawned);
    let path = format!("/v1/workers/{id}");
    let path = path.as_str();
    let ended = eventually("the worker behind the right token", || async {
        let w = call(good, Method::GET, path, &[], None).await?;
        let text = w.text();
        let done = w.json()?["state"] == "exited";
        Ok((done.then_some(w), text))
    })
    .await?;
    assert_eq!(ended.json()?["exit_code"], 0, "{}", ended.text());
    answers.push(ended);
    let output = call(
        good,
        Method::GET,
        &format!("{path}/output?follow=0"),
        &[],
        None,
    )
    .await?;
    assert!(output.text().contains("token-ok"), "{}", output.text());
    answers.push(output);

    // With a wrong one the runtime is unavailable and spawning is refused.
    let bad = s.bad_addr;
    let unavailable = call(bad, Method::GET, "/v1/runtimes/far", &[], None).await?;
    assert_eq!(
        unavailable.json()?["health"]["status"],
        "unavailable",
        "{}",
        unavailable.text()
    );
    answers.push(unavailable);
    let spawn = call(
        bad,
        Method::POST,
        "/v1/runtimes/far/workers",
        &[],
        Some(&shell("echo never", "never")),
    )
    .await?;
    assert_eq!(
        (spawn.status, spawn.code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "runtime_unavailable"),
        "{}",
        spawn.text()
    );
    assert!(spawn.text().contains("token"), "{}", spawn.text());
    answers.push(spawn);
    answers.push(call(bad, Method::GET, "/metrics", &[], None).await?);
    answers.push(call(good, Method::GET, "/metrics", &[], None).await?);

    s.good.terminate().await?;
    s.bad.terminate().await?;
    s.up.terminate().await?;
    let seen = Seen::default();
    for answer in answers {
        keep(&seen, answer);
    }
    seen.assert_free_of(&[s.secret.clone(), s.wrong.clone()])?;
    for (who, roster) in [
        ("downstream", &s.good),
        ("wrong downstream", &s.bad),
        ("upstream", &s.up),
    ] {
        let log = roster.output();
        for token in [&s.secret, &s.wrong] {
            ensure!(
                !log.contains(token.as_str()),
                "a token in the {who}'s output:\n{log}"
            );
        }
    }
    // The downstreams did log at trace level, their traffic with the upstream too.
    for roster in [&s.good, &s.bad] {
        let log = roster.output();
        ensure!(log.contains("TRACE"), "no trace lines:\n{log}");
    }
    Ok(())
}

/// The remote source knows at once that its token was refused (a `401` on its first
/// connection): the runtime's health says so, and soon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_shows_on_the_runtime_as_refused() -> Result<()> {
    let mut s = TokenSetup::start().await?;
    let bad = s.bad_addr;
    let refused = eventually("the runtime behind a wrong token", || async {
        let v = call(bad, Method::GET, "/v1/runtimes", &[], None).await?;
        let json = v.json()?;
        let health = &json["runtimes"][0]["health"];
        let message = health["message"].as_str().unwrap_or_default();
        let ok = health["status"] == "unavailable"
            && message.contains("token")
            && message.contains("refused");
        Ok((ok.then_some(v), json.to_string()))
    })
    .await?;
    assert!(!refused.text().contains(&s.wrong), "{}", refused.text());
    s.bad.terminate().await?;
    ensure!(!s.bad.output().contains(&s.wrong), "{}", s.bad.output());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Swapping a runtime's source changes nothing a client sees but its `kind`

/// Replaces worker ids by `w#<n>` in the order they first appear, timestamps by `<time>`,
/// and event-stream cursors by `<cursor>`.
fn normalize(value: &Value, ids: &mut HashMap<String, String>) -> Value {
    match value {
        Value::String(s) => {
            let is_id = s.len() == 28
                && s.starts_with("w_")
                && s[2..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
            if is_id {
                let n = ids.len() + 1;
                return Value::String(ids.entry(s.clone()).or_insert(format!("w#{n}")).clone());
            }
            let is_time =
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .is_ok();
            if is_time {
                return Value::String("<time>".into());
            }
            Value::String(s.clone())
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| normalize(v, ids)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalize(v, ids)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Takes every runtime's `kind` out of `value` (in place) and returns them.
fn take_kinds(value: &mut Value) -> Vec<String> {
    let mut kinds = Vec::new();
    match value {
        Value::Object(map) => {
            if map.contains_key("capabilities") {
                if let Some(Value::String(kind)) = map.remove("kind") {
                    kinds.push(kind);
                }
            }
            for v in map.values_mut() {
                kinds.extend(take_kinds(v));
            }
        }
        Value::Array(items) => {
            for v in items {
                kinds.extend(take_kinds(v));
            }
        }
        _ => {}
    }
    kinds
}

/// One step of a client's scenario: what it did, and what it got.
#[derive(Debug, PartialEq)]
struct Step {
    what: &'static str,
    status: u16,
    body: Value,
}

fn events_json(events: &[SseEvent], with_ids: bool) -> Value {
    Value::Array(
        events
            .iter()
            .map(|e| {
                let id = if with_ids { json!(e.id) } else { Value::Null };
                json!({ "id": id, "event": e.event, "data": e.data })
            })
            .collect(),
    )
}

/// The scenario: spawn `echo hi; read l; echo $l` in runtime `r`, get it, read its output,
/// send it a line, wait for its end, read the output again, list, get the runtime; and the
/// `/v1/events` stream all along. Returns the steps, ids and timestamps normalized, and the
/// runtime kinds it saw.
async fn client_scenario(server: &TestServer) -> Result<(Vec<Step>, Vec<String>)> {
    let mut steps = Vec::new();
    let mut step = |what: &'static str, status: StatusCode, body: Value| {
        steps.push((what, status.as_u16(), body));
    };
    wait_ready(server, "r").await?;
    let mut events = server.sse("/v1/events", &[]).await?;
    let snapshot = events.next_event().await?;
    step("snapshot", StatusCode::OK, events_json(&[snapshot], false));

    let spawned = server
        .post(
            "/v1/runtimes/r/workers",
            &json!({ "profile": "shell", "args": ["echo hi; read l; echo $l"],
                     "name": "same", "labels": {"k": "v"} })
            .to_string(),
        )
        .await?;
    let id = id_of(&spawned)?;
    // The answer shows the worker as the registry knows it when the answer is made:
    // `starting`, or already `running` (without or with `started_at`) — a race either kind
    // of runtime may win either way.
    let mut answer = spawned.json()?;
    assert!(
        ["starting", "running"].contains(&answer["state"].as_str().unwrap_or_default()),
        "{answer}"
    );
    answer["state"] = json!("starting or running");
    answer["started_at"] = json!("null or a time");
    step("spawn", spawned.status, answer);
    let location = spawned
        .headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    step(
        "location",
        StatusCode::OK,
        json!(location.replace(&id, "<id>")),
    );
    let running = server.wait_worker(&id, |w| w["state"] == "running").await?;
    step("get running", StatusCode::OK, running);

    let mut out = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    let mut live = Vec::new();
    loop {
        let ev = out.next_event().await?;
        live.push(ev.clone());
        if ev.event == "output" {
            break;
        }
    }
    let input = server
        .post(&format!("/v1/workers/{id}/input"), r#"{"data": "there\n"}"#)
        .await?;
    step("input", input.status, input.json()?);
    live.extend(read_all(&mut out).await?);
    // `state` events come from the registry's event log, output from the source: their
    // relative order is only approximate (docs/DESIGN.md), so each kind is compared in its
    // own order.
    let (states, rest): (Vec<SseEvent>, Vec<SseEvent>) =
        live.into_iter().partition(|e| e.event == "state");
    step("output states", StatusCode::OK, events_json(&states, false));
    step("output chunks", StatusCode::OK, events_json(&rest, true));

    let exited = server.wait_worker(&id, |w| w["state"] == "exited").await?;
    step("get exited", StatusCode::OK, exited);
    let mut again = server
        .sse(&format!("/v1/workers/{id}/output?follow=0"), &[])
        .await?;
    let again = read_all(&mut again).await?;
    step("output again", StatusCode::OK, events_json(&again, true));
    let list = server.get("/v1/workers").await?;
    step("list", list.status, list.json()?);
    let runtime = server.get("/v1/runtimes/r").await?;
    step("runtime", runtime.status, runtime.json()?);
    let runtimes = server.get("/v1/runtimes").await?;
    step("runtimes", runtimes.status, runtimes.json()?);

    let mut seen_events = Vec::new();
    loop {
        let ev = events.next_event().await?;
        let last = ev.event == "worker.upserted" && ev.data["worker"]["state"] == "exited";
        seen_events.push(ev);
        if last {
            break;
        }
    }
    step("events", StatusCode::OK, events_json(&seen_events, false));

    let mut ids = HashMap::new();
    let mut kinds = Vec::new();
    let steps = steps
        .into_iter()
        .map(|(what, status, body)| {
            let mut body = normalize(&body, &mut ids);
            kinds.extend(take_kinds(&mut body));
            Step { what, status, body }
        })
        .collect();
    Ok((steps, kinds))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_tell_a_remote_runtime_from_an_embedded_one_but_by_its_kind() -> Result<()>
{
    let embedded = server_for(
        "[[runtimes]]\nname = \"r\"\nsource = \"embedded\"\n\
         [runtimes.profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n",
    )
    .await?;
    let (by_embedded, embedded_kinds) = client_scenario(&embedded).await?;
    embedded.stop().await?;

    let upstream = server_for(
        "[[runtimes]]\nname = \"inner\"\nsource = \"embedded\"\n\
         [runtimes.profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n",
    )
    .await?;
    let remote = server_for(&remote_runtime("r", upstream.addr, "inner", "")).await?;
    let (by_remote, remote_kinds) = client_scenario(&remote).await?;
    remote.stop().await?;
    upstream.stop().await?;

    assert!(!embedded_kinds.is_empty());
    assert!(
        embedded_kinds.iter().all(|k| k == "embedded"),
        "{embedded_kinds:?}"
    );
    assert_eq!(remote_kinds.len(), embedded_kinds.len(), "{remote_kinds:?}");
    assert!(
        remote_kinds.iter().all(|k| k == "remote"),
        "{remote_kinds:?}"
    );
    for (e, r) in by_embedded.iter().zip(&by_remote) {
        assert_eq!(
            e, r,
            "{}: embedded\n{:#}\nremote\n{:#}",
            e.what, e.body, r.body
        );
    }
    assert_eq!(by_embedded.len(), by_remote.len());
    Ok(())
}
