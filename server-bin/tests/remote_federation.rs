//! Registries that follow runtimes of other registries (the `remote` source, SPEC §9): an
//! upstream killed and restarted under a follower, three registries in a chain, a search
//! for internal authority in everything a follower sends, and bearer tokens between
//! registries. (The client scenario that must look the same whether its runtime is
//! `embedded`, `remote` or `tmux` is `examples/roster-tmux/tests/swap.rs`.)
//!
//! In-process servers are `common::TestServer`s; where a process must die or read its
//! token from its environment, the real `roster` binary runs instead.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use server_bin::config::{Config, LoadedToken, Scope};
use server_bin::ServeOptions;

use common::process::{with_marker, Roster};
use common::{
    header_bytes, request_to, unique, Seen, SseClient, SseEvent, TestResponse, TestServer,
};

/// How long a test waits for a condition before it fails.
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Small tools

/// A loopback port that was free a moment ago (bound on port 0, then released), so that a
/// server can be started — and restarted — on it.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` (through testkit) until it gives `Some`, or fails after [`DEADLINE`] with the
/// last thing `check` saw.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(Option<T>, String)>>,
{
    common::eventually_seen(what, DEADLINE, || {
        let look = check();
        async move {
            let (found, last) = look.await?;
            Ok(found.ok_or(last))
        }
    })
    .await
}

/// The response must be an error with this status and `error.code`.
#[track_caller]
fn expect(resp: &TestResponse, status: u16, code: &str) {
    assert_eq!(
        (resp.status.as_u16(), resp.code().as_str()),
        (status, code),
        "{}",
        resp.text()
    );
}

/// A spawn body running `script` under the profile `shell`.
fn shell(script: &str, name: &str) -> String {
    json!({ "profile": "shell", "args": [script], "name": name }).to_string()
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

/// Whether `event` is a chunk of output.
fn is_output(event: &SseEvent) -> bool {
    event.event == "output"
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

/// Runs a step of the process harness, which blocks while it polls, without holding up the
/// other tasks of this runtime.
fn blocking<T>(step: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(step)
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
    let (mut up, up_addr) = blocking(|| Roster::serve_config(&config, &state, &[]))?;
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
    let live = down
        .post(
            "/v1/runtimes/far/workers",
            &shell(&format!("sleep 300; : {marker}"), "live"),
        )
        .await?
        .created_id()?;
    let quick = down
        .post("/v1/runtimes/far/workers", &shell("echo quick", "quick"))
        .await?
        .created_id()?;
    down.wait_worker(&live, |w| w["state"] == "running").await?;
    let quick_before = down.wait_worker(&quick, |w| w["state"] == "exited").await?;
    let marker_ref = marker.as_str();
    eventually("the live worker's process", move || async move {
        let found = with_marker(marker_ref);
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
    blocking(|| up.kill())?;
    eventually("the upstream's workers gone", move || async move {
        let left = with_marker(marker_ref);
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
    expect(&refused, 503, "runtime_unavailable");
    assert!(
        refused.headers.contains_key("retry-after"),
        "{:?}",
        refused.headers
    );

    // The upstream comes back on the same port and state directory.
    let (mut up, again) = blocking(|| Roster::serve_config(&config, &state, &[]))?;
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
    let fresh = down
        .post("/v1/runtimes/far/workers", &shell("echo again", "again"))
        .await?
        .created_id()?;
    let done = down.wait_worker(&fresh, |w| w["state"] == "exited").await?;
    assert_eq!(done["exit_code"], 0, "{done}");
    assert!(![live_id, quick_id].contains(&fresh.as_str()));
    let deleted = down
        .request(Method::DELETE, &format!("/v1/workers/{live_id}"), &[], None)
        .await?;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    let after = down.get(&format!("/v1/workers/{live_id}")).await?;
    expect(&after, 404, "worker_not_found");

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

    blocking(|| up.terminate())?;
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
    let c_id = spawned.created_id()?;
    let body = spawned.json()?;
    assert_eq!(
        (&body["runtime_id"], &body["name"]),
        (&json!("top"), &json!(name)),
        "{body}"
    );
    let mut out = c.sse(&format!("/v1/workers/{c_id}/output"), &[]).await?;
    let mut live = out.read_until(is_output).await?;
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
    expect(&late, 409, "conflict");

    // A long-running worker: DELETE while it runs is a conflict; a stop through C stops it
    // at every hop.
    let long_name = unique("sleeper");
    let long = c
        .post("/v1/runtimes/top/workers", &shell("sleep 300", &long_name))
        .await?
        .created_id()?;
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
    expect(&busy, 409, "conflict");
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
    expect(&bad_profile, 400, "invalid_request");
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

/// The bytes a client got.
#[derive(Clone, Default)]
struct Transcript {
    seen: Seen,
}

impl Transcript {
    fn record(&self, bytes: &[u8]) {
        self.seen.record(bytes);
    }

    fn keep(&self, resp: TestResponse) -> TestResponse {
        self.record(&header_bytes(&resp.headers));
        self.record(&resp.body);
        resp
    }

    /// Keeps what a stream sent (its headers and every byte read), once done with it.
    fn keep_stream(&self, stream: &SseClient) {
        self.record(&header_bytes(&stream.headers));
        self.record(&stream.raw);
    }

    /// Fails when the bytes hold one of `needles`, or `port` as a number of its own.
    fn assert_free_of(&self, needles: &[String], port: Option<u16>) -> Result<()> {
        self.seen.assert_free_of(needles)?;
        let Some(port) = port else { return Ok(()) };
        let text = self.seen.text();
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
            secret: token.clone().into(),
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
    let long = spawn("echo long-start; cat", "long").await?.created_id()?;
    let short = spawn("echo short-out; echo short-err >&2", "short")
        .await?
        .created_id()?;
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
    let first = out.read_until(is_output).await?.pop().context("an event")?;
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
            sleepers.push(resp.created_id()?);
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
fn serve_file(
    dir: &Path,
    name: &str,
    toml: &str,
    env: &[(&str, &str)],
) -> Result<(Roster, SocketAddr)> {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml)?;
    blocking(|| Roster::serve_config(&config, &dir.join(format!("{name}-state")), env))
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
    fn start() -> Result<TokenSetup> {
        let dir = tempfile::tempdir()?;
        let u = unique("t").replace('-', "_");
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
        )?;
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
        )?;
        let (bad, bad_addr) = serve_file(
            dir.path(),
            "bad",
            &downstream,
            &[(&down_var, &wrong), trace],
        )?;
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
    let mut s = TokenSetup::start()?;
    let unauthenticated = request_to(s.up_addr, Method::GET, "/v1/runtimes", &[], None).await?;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    let mut answers: Vec<TestResponse> = Vec::new();

    // With the right token the runtime works.
    let good = s.good_addr;
    let ready = eventually("the runtime behind the right token", || async {
        let v = request_to(good, Method::GET, "/v1/runtimes/far", &[], None).await?;
        let text = v.text();
        let ok = v.json()?["health"]["status"] == "ready";
        Ok((ok.then_some(v), text))
    })
    .await?;
    answers.push(ready);
    let spawned = request_to(
        good,
        Method::POST,
        "/v1/runtimes/far/workers",
        &[],
        Some(&shell("echo token-ok", "tok")),
    )
    .await?;
    let id = spawned.created_id()?;
    answers.push(spawned);
    let path = format!("/v1/workers/{id}");
    let path = path.as_str();
    let ended = eventually("the worker behind the right token", || async {
        let w = request_to(good, Method::GET, path, &[], None).await?;
        let text = w.text();
        let done = w.json()?["state"] == "exited";
        Ok((done.then_some(w), text))
    })
    .await?;
    assert_eq!(ended.json()?["exit_code"], 0, "{}", ended.text());
    answers.push(ended);
    let output = request_to(
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
    let unavailable = request_to(bad, Method::GET, "/v1/runtimes/far", &[], None).await?;
    assert_eq!(
        unavailable.json()?["health"]["status"],
        "unavailable",
        "{}",
        unavailable.text()
    );
    answers.push(unavailable);
    let spawn = request_to(
        bad,
        Method::POST,
        "/v1/runtimes/far/workers",
        &[],
        Some(&shell("echo never", "never")),
    )
    .await?;
    expect(&spawn, 503, "runtime_unavailable");
    assert!(spawn.text().contains("token"), "{}", spawn.text());
    answers.push(spawn);
    answers.push(request_to(bad, Method::GET, "/metrics", &[], None).await?);
    answers.push(request_to(good, Method::GET, "/metrics", &[], None).await?);

    blocking(|| s.good.terminate())?;
    blocking(|| s.bad.terminate())?;
    blocking(|| s.up.terminate())?;
    let seen = Seen::default();
    for answer in answers {
        seen.record_response(&answer);
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
    let mut s = TokenSetup::start()?;
    let bad = s.bad_addr;
    let refused = eventually("the runtime behind a wrong token", || async {
        let v = request_to(bad, Method::GET, "/v1/runtimes", &[], None).await?;
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
    blocking(|| s.bad.terminate())?;
    ensure!(!s.bad.output().contains(&s.wrong), "{}", s.bad.output());
    Ok(())
}
