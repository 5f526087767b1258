//! Internal authority never leaves the process (SPEC §1): no pid, path, source key, server
//! address or environment value in any response body, header, error message, metric or SSE
//! event, on the happy paths and the error paths alike.
//!
//! One scenario touches every route and many ways to get them wrong, keeps every byte it
//! receives, and then searches all of it. A worker's own output is the worker's to print (one
//! of them prints its pid on purpose), so the `data` of `output` events is left out of the
//! search; every other byte, output events' other fields included, is searched. A spawn's
//! `command` is the client's own request and is shown back by design (§2), so the one
//! command that names a missing program is blanked where a worker's view shows it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use common::{SseClient, TestResponse, TestServer, WAIT};
use http::{HeaderMap, Method};
use registry_core::{Registry, RegistryConfig, RuntimeId, RuntimeSource};
use serde_json::{json, Value};
use server_bin::ServeOptions;
use source_embedded::{EmbeddedConfig, EmbeddedSource};
use tokio::task::JoinHandle;

/// Every byte the client received, by where it came from.
#[derive(Default)]
struct Collected {
    items: Vec<(String, String)>,
    /// The `command` of a spawn that is shown back by design.
    echoed_command: Value,
}

impl Collected {
    fn headers(&mut self, what: &str, headers: &HeaderMap) {
        let text: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        self.items.push((format!("{what} (headers)"), text));
    }

    fn response(&mut self, what: &str, resp: &TestResponse) {
        self.headers(what, &resp.headers);
        let body = match serde_json::from_slice::<Value>(&resp.body) {
            Ok(mut v) => {
                self.blank_echoed_command(&mut v);
                v.to_string()
            }
            Err(_) => resp.text(),
        };
        self.items.push((format!("{what} (body)"), body));
    }

    /// An SSE stream's bytes, each event's `data` parsed (and an `output` event's `data`
    /// field left out).
    fn stream(&mut self, what: &str, headers: &HeaderMap, raw: &[u8]) {
        self.headers(what, headers);
        let text = String::from_utf8_lossy(raw);
        let mut out = String::new();
        for block in text.split("\n\n") {
            let is_output = block.lines().any(|l| l == "event: output");
            for line in block.lines() {
                match line
                    .strip_prefix("data: ")
                    .and_then(|d| serde_json::from_str::<Value>(d).ok())
                {
                    Some(mut data) => {
                        if is_output {
                            if let Some(obj) = data.as_object_mut() {
                                obj.remove("data");
                            }
                        }
                        self.blank_echoed_command(&mut data);
                        out.push_str(&format!("data: {data}\n"));
                    }
                    None => {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
            out.push('\n');
        }
        self.items.push((format!("{what} (stream)"), out));
    }

    fn blank_echoed_command(&self, v: &mut Value) {
        match v {
            Value::Object(map) => {
                if map.get("command") == Some(&self.echoed_command) {
                    map.insert("command".into(), json!(["<the requested command>"]));
                }
                for child in map.values_mut() {
                    self.blank_echoed_command(child);
                }
            }
            Value::Array(items) => {
                for child in items {
                    self.blank_echoed_command(child);
                }
            }
            _ => {}
        }
    }

    /// Every place a needle occurs, with some context.
    fn find(&self, needles: &[(String, String)]) -> Vec<String> {
        let mut found = Vec::new();
        for (what, text) in &self.items {
            for (why, needle) in needles {
                for (at, _) in text.match_indices(needle.as_str()) {
                    let from = floor(text, at.saturating_sub(80));
                    let to = floor(text, (at + needle.len() + 80).min(text.len()));
                    found.push(format!("{why} {needle:?} in {what}: …{}…", &text[from..to]));
                }
            }
        }
        found
    }
}

fn floor(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The ways a pid shows in JSON, a log-like line or a text: a number alone would match
/// timestamps.
fn pid_needles(why: &str, pid: u32) -> Vec<(String, String)> {
    [
        format!("\"{pid}\""),
        format!(":{pid},"),
        format!(":{pid}}}"),
        format!("={pid}"),
        format!(" {pid} "),
    ]
    .into_iter()
    .map(|n| (format!("{why} {pid}"), n))
    .collect()
}

/// Live processes whose command line holds `text`, and their live descendants.
fn processes_with(text: &str) -> Vec<u32> {
    let all: Vec<(u32, u32, String)> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| {
                let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (_, rest) = stat.rsplit_once(')')?;
                let mut fields = rest.split_whitespace();
                if fields.next()? == "Z" {
                    return None;
                }
                let ppid = fields.next()?.parse().ok()?;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                Some((pid, ppid, String::from_utf8_lossy(&cmdline).into_owned()))
            })
            .collect()
        })
        .unwrap_or_default();
    let mut found: Vec<u32> = all
        .iter()
        .filter(|(_, _, c)| c.contains(text))
        .map(|(p, _, _)| *p)
        .collect();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for (pid, ppid, _) in &all {
            if *ppid == parent && !found.contains(pid) {
                found.push(*pid);
            }
        }
        i += 1;
    }
    found
}

/// A server with the default config (one `embedded` runtime `local`) whose source the test
/// holds too, to learn its keys and its watchdog's pid.
async fn server_with_source() -> Result<(TestServer, Arc<EmbeddedSource>)> {
    let dir = tempfile::tempdir()?;
    let registry = Registry::new(RegistryConfig::new(dir.path().join("state")))?;
    let settings: EmbeddedConfig = toml::from_str(
        "allow_commands = true\n[profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n",
    )?;
    let source = Arc::new(EmbeddedSource::new(settings)?);
    registry
        .add_runtime(
            RuntimeId::new("local")?,
            source_embedded::KIND,
            source.clone() as Arc<dyn RuntimeSource>,
        )
        .await?;
    let server = TestServer::start_registry(registry, dir, ServeOptions::default()).await?;
    Ok((server, source))
}

/// Sends `request` as it is and reads the whole answer.
async fn raw_request(addr: std::net::SocketAddr, request: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .context("no answer in time")??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Reads a stream to its end in the background; returns its events' types and its bytes.
fn read_to_end(mut stream: SseClient) -> JoinHandle<(Result<Vec<String>>, HeaderMap, Vec<u8>)> {
    tokio::spawn(async move {
        let events = stream
            .rest(Duration::from_secs(30))
            .await
            .map(|evs| evs.into_iter().map(|e| e.event).collect());
        (events, stream.headers.clone(), stream.raw)
    })
}

/// One request of the scenario: what it is, method, path, headers, body, expected status.
type Call<'a> = (
    &'a str,
    Method,
    String,
    Vec<(&'a str, &'a str)>,
    Option<String>,
    u16,
);

/// The client side of the scenario: every answer is kept.
struct Client<'s> {
    server: &'s TestServer,
    got: Collected,
}

impl Client<'_> {
    /// One request; its answer must have `status`.
    async fn call(
        &mut self,
        (what, method, path, headers, body, status): Call<'_>,
    ) -> Result<TestResponse> {
        let resp = self
            .server
            .request(method.clone(), &path, &headers, body.as_deref())
            .await?;
        self.got.response(what, &resp);
        ensure!(
            resp.status.as_u16() == status,
            "{what}: {method} {path}: expected {status}, got {}: {}",
            resp.status,
            resp.text()
        );
        Ok(resp)
    }

    async fn calls(&mut self, calls: Vec<Call<'_>>) -> Result<()> {
        for call in calls {
            self.call(call).await?;
        }
        Ok(())
    }

    /// A spawn that must succeed; the worker's id.
    async fn spawn(&mut self, what: &str, body: &Value) -> Result<(String, TestResponse)> {
        let resp = self
            .call((
                what,
                Method::POST,
                SPAWN.into(),
                vec![],
                Some(body.to_string()),
                201,
            ))
            .await?;
        Ok((
            resp.json()?["id"].as_str().context("an id")?.to_string(),
            resp,
        ))
    }

    /// Sends `request` as it is; the answer must have one of `statuses`.
    async fn raw(&mut self, what: &str, request: &str, statuses: &[&str]) -> Result<()> {
        let text = raw_request(self.server.addr, request).await?;
        let status = text.split(' ').nth(1).unwrap_or_default();
        ensure!(statuses.contains(&status), "{what}: {text}");
        self.got.items.push((what.to_string(), text));
        Ok(())
    }
}

const SPAWN: &str = "/v1/runtimes/local/workers";
const UNKNOWN: &str = "w_AAAAAAAAAAAAAAAAAAAAAAAAAA";

fn get(what: &str, path: impl Into<String>, status: u16) -> Call<'_> {
    (what, Method::GET, path.into(), vec![], None, status)
}

fn post(what: &str, path: impl Into<String>, body: impl Into<String>, status: u16) -> Call<'_> {
    (
        what,
        Method::POST,
        path.into(),
        vec![],
        Some(body.into()),
        status,
    )
}

fn delete(what: &str, path: impl Into<String>, status: u16) -> Call<'_> {
    (what, Method::DELETE, path.into(), vec![], None, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_internal_reaches_a_client() -> Result<()> {
    let (server, source) = server_with_source().await?;
    let u = format!("{}-{}", std::process::id(), server.addr.port());
    let marker = format!("leak-marker-{u}");
    let secret = format!("SECRET_ENV_VALUE_{u}");
    let missing = format!("/nonexistent/prog-{u}");
    let state_dir = server.dir.path().join("state");
    let address = format!("127.0.0.1:{}", server.addr.port());
    let mut client = Client {
        server: &server,
        got: Collected {
            echoed_command: json!([missing]),
            ..Collected::default()
        },
    };
    let mut pids: Vec<u32> = vec![std::process::id()];
    // Bytes that hold needles by design, to show that the search finds them.
    let mut unsanitized: Vec<(String, String)> = Vec::new();

    // Streams that run through the whole scenario.
    let all_events = read_to_end(server.sse("/v1/events", &[]).await?);
    let local_events = read_to_end(server.sse("/v1/events?runtime=local", &[]).await?);

    // The open routes and the runtimes.
    client
        .calls(vec![
            get("console", "/", 200),
            get("healthz", "/healthz", 200),
            get("readyz", "/readyz", 200),
            get("openapi", "/v1/openapi.json", 200),
            get("runtimes", "/v1/runtimes", 200),
            get("runtime", "/v1/runtimes/local", 200),
            get("no runtime", "/v1/runtimes/nope", 404),
            get("bad runtime", "/v1/runtimes/Bad_Name", 404),
            get("runtimes query", "/v1/runtimes?x=1", 400),
        ])
        .await?;

    // A worker that prints its pid, reads two lines of input and waits.
    let spawn_a = json!({
        "profile": "shell",
        "args": [format!(
            "echo pid=$$; echo to-stderr >&2; read a; read b; echo got=$a,$b; sleep 300; : {marker}"
        )],
        "env": { "LEAK_TEST": secret },
        "name": "leaky",
        "labels": { "team": "leaks" },
        "stdin": "first-line\n",
    });
    let (a, _) = client.spawn("spawn a", &spawn_a).await?;
    let mut a_output = server.sse(&format!("/v1/workers/{a}/output"), &[]).await?;
    let worker_pid = loop {
        let ev = a_output.next_event().await?;
        if ev.event == "output" {
            let text = ev.data["data"].as_str().unwrap_or_default();
            if let Some(pid) = text.lines().find_map(|l| l.strip_prefix("pid=")) {
                break pid.parse::<u32>().context("a pid")?;
            }
        }
    };
    pids.push(worker_pid);
    let a_output = read_to_end(a_output);

    // A worker by command, idempotent by request_id.
    let spawn_b = json!({
        "command": ["/bin/sh", "-c", format!("sleep 300; : {marker}")],
        "env": { "LEAK_TEST": secret },
        "request_id": format!("leak-{u}"),
    });
    let (b, _) = client.spawn("spawn b", &spawn_b).await?;
    let (again, _) = client.spawn("spawn b again", &spawn_b).await?;
    ensure!(again == b, "request_id is idempotent");
    let other = json!({
        "command": ["/bin/sh", "-c", "true"],
        "env": { "LEAK_TEST": secret },
        "request_id": format!("leak-{u}"),
    });
    client
        .call(post("spawn b conflict", SPAWN, other.to_string(), 409))
        .await?;

    // A spawn that fails, and one that exits with a code.
    let spawn_c = json!({ "command": [missing], "env": { "LEAK_TEST": secret } });
    let (c, resp) = client.spawn("spawn c", &spawn_c).await?;
    unsanitized.push(("c as spawned".to_string(), resp.text()));
    let failed = server.wait_worker(&c, |w| w["state"] == "failed").await?;
    ensure!(failed["reason"] == "spawn_failed", "{failed}");
    let (d, _) = client
        .spawn(
            "spawn d",
            &json!({ "profile": "shell", "args": ["echo out; echo err >&2; exit 3"] }),
        )
        .await?;
    server.wait_worker(&d, |w| w["state"] == "exited").await?;

    // Input.
    let input_a = format!("/v1/workers/{a}/input");
    let text_type = vec![("content-type", "text/plain")];
    client
        .calls(vec![
            post("input", &*input_a, r#"{"data":"second-line\n"}"#, 202),
            post(
                "input ended",
                format!("/v1/workers/{c}/input"),
                r#"{"data":"x"}"#,
                409,
            ),
            post("input bad field", &*input_a, r#"{"data":5}"#, 400),
            post(
                "input unknown field",
                &*input_a,
                r#"{"data":"x","more":1}"#,
                400,
            ),
            post("input bad json", &*input_a, r#"{"data":"#, 400),
            post("input empty", &*input_a, "", 400),
            (
                "input type",
                Method::POST,
                input_a.clone(),
                text_type.clone(),
                Some("x".into()),
                415,
            ),
            post(
                "input no worker",
                format!("/v1/workers/{UNKNOWN}/input"),
                r#"{"data":"x"}"#,
                404,
            ),
        ])
        .await?;

    // Every process of the workers runs now: learn the pids and the source's keys.
    let deadline = Instant::now() + WAIT;
    loop {
        let found = processes_with(&marker);
        // a's shell and its sleep, b's shell and its sleep.
        if found.len() >= 4 {
            pids.extend(found);
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the workers' processes: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pids.push(source.watchdog_pid());
    let keys: Vec<String> = source
        .list()
        .await?
        .into_iter()
        .map(|w| w.key.as_str().to_string())
        .collect();
    ensure!(keys.len() == 4, "four workers in the source: {keys:?}");

    // Bad spawns, several with the environment value in them.
    let env = format!(r#""env":{{"K":"{secret}"}}"#);
    client
        .calls(vec![
            post("spawn bad json", SPAWN, r#"{"profile":"#, 400),
            post("spawn empty", SPAWN, "", 400),
            post(
                "spawn unknown field",
                SPAWN,
                format!(r#"{{"profile":"shell",{env},"bogus":1}}"#),
                400,
            ),
            post(
                "spawn both",
                SPAWN,
                format!(r#"{{"profile":"shell","command":["/bin/true"],{env}}}"#),
                400,
            ),
            post("spawn neither", SPAWN, format!("{{{env}}}"), 400),
            post(
                "spawn unknown profile",
                SPAWN,
                format!(r#"{{"profile":"nope",{env}}}"#),
                400,
            ),
            post(
                "spawn empty command",
                SPAWN,
                format!(r#"{{"command":[],{env}}}"#),
                400,
            ),
            post(
                "spawn nul in env",
                SPAWN,
                format!(r#"{{"profile":"shell","env":{{"K":"{secret}\u0000"}}}}"#),
                400,
            ),
            post(
                "spawn env list",
                SPAWN,
                format!(r#"{{"profile":"shell","env":{{"K":["{secret}"]}}}}"#),
                400,
            ),
            post(
                "spawn env number",
                SPAWN,
                format!(r#"{{"profile":"shell","env":{{"K":"{secret}","L":5}}}}"#),
                400,
            ),
            post(
                "spawn nul in command",
                SPAWN,
                format!(r#"{{"command":["{missing}\u0000"]}}"#),
                400,
            ),
            (
                "spawn type",
                Method::POST,
                SPAWN.into(),
                text_type,
                Some("{}".into()),
                415,
            ),
            post(
                "spawn no runtime",
                "/v1/runtimes/nope/workers",
                spawn_c.to_string(),
                404,
            ),
        ])
        .await?;
    // A body over the cap, announced by its length: refused before it is read.
    let port = server.addr.port();
    client
        .raw(
            "spawn too large",
            &format!(
                "POST {SPAWN} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{{{env}",
                2 << 20
            ),
            &["413"],
        )
        .await?;

    // Reading workers.
    client
        .calls(vec![
            get("get a", format!("/v1/workers/{a}"), 200),
            get("get c", format!("/v1/workers/{c}"), 200),
            get("get unknown", format!("/v1/workers/{UNKNOWN}"), 404),
            get("get malformed", "/v1/workers/not-an-id", 404),
            get("list", "/v1/workers", 200),
            get("list runtime", "/v1/workers?runtime=local", 200),
            get("list state", "/v1/workers?state=running", 200),
            get("list failed", "/v1/workers?state=failed", 200),
            get("list label", "/v1/workers?label=team=leaks", 200),
            get("list bad label", "/v1/workers?label=team", 400),
            get("list bad state", "/v1/workers?state=bogus", 400),
            get("list no runtime", "/v1/workers?runtime=nope", 404),
            get("list bad limit", "/v1/workers?limit=abc", 400),
            get("list zero limit", "/v1/workers?limit=0", 400),
            get("list bad page", "/v1/workers?page=garbage", 400),
            get("list unknown param", "/v1/workers?bogus=1", 400),
            get(
                "output unknown",
                format!("/v1/workers/{UNKNOWN}/output"),
                404,
            ),
            get(
                "output bad after",
                format!("/v1/workers/{a}/output?after=abc"),
                400,
            ),
            get(
                "output bad follow",
                format!("/v1/workers/{a}/output?follow=2"),
                400,
            ),
            get("events no runtime", "/v1/events?runtime=nope", 404),
            get("events unknown param", "/v1/events?bogus=1", 400),
            get("no route", "/v2/nothing", 404),
        ])
        .await?;
    let first = client
        .call(get("list page 1", "/v1/workers?limit=1", 200))
        .await?;
    let next = first.json()?["next_page"]
        .as_str()
        .context("a next page")?
        .to_string();
    client
        .call(get(
            "list page 2",
            format!("/v1/workers?limit=1&page={next}"),
            200,
        ))
        .await?;

    // Finished output, whole and resumed, read to its end.
    for (path, headers) in [
        (format!("/v1/workers/{c}/output"), vec![]),
        (format!("/v1/workers/{d}/output?follow=0"), vec![]),
        (format!("/v1/workers/{d}/output?after=1"), vec![]),
        (
            format!("/v1/workers/{d}/output"),
            vec![("last-event-id", "1")],
        ),
    ] {
        let mut s = server.sse(&path, &headers).await?;
        let events = s.rest(WAIT).await?;
        ensure!(
            events.last().is_some_and(|e| e.event == "end"),
            "{path}: {events:?}"
        );
        client.got.stream(&path, &s.headers, &s.raw);
    }

    // Event streams from a malformed and an unknown cursor.
    for cursor in ["garbage", "0123456789abcdef-1"] {
        let mut s = server
            .sse("/v1/events", &[("last-event-id", cursor)])
            .await?;
        let reset = s.next_event().await?;
        ensure!(reset.event == "reset", "{reset:?}");
        s.next_event().await?;
        client
            .got
            .stream(&format!("events from {cursor}"), &s.headers, &s.raw);
    }

    // Host, origin and method checks.
    client
        .raw(
            "foreign host",
            "GET /v1/runtimes HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            &["403"],
        )
        .await?;
    client
        .raw("no host", "GET /v1/runtimes HTTP/1.0\r\n\r\n", &["400"])
        .await?;
    let evil = vec![("origin", "http://evil.example")];
    client
        .calls(vec![
            (
                "foreign origin",
                Method::POST,
                SPAWN.into(),
                evil,
                Some(spawn_a.to_string()),
                403,
            ),
            (
                "wrong method",
                Method::PUT,
                "/v1/runtimes".into(),
                vec![],
                None,
                405,
            ),
            (
                "wrong method on a worker",
                Method::PATCH,
                format!("/v1/workers/{a}"),
                vec![],
                None,
                405,
            ),
        ])
        .await?;

    // Stop, delete.
    let json_type = vec![("content-type", "application/json")];
    let stop = |id: &str| format!("/v1/workers/{id}/stop");
    client
        .calls(vec![
            delete("delete running", format!("/v1/workers/{b}"), 409),
            post(
                "stop bad grace",
                stop(&a),
                r#"{"grace_ms":99999999999}"#,
                400,
            ),
            post("stop bad body", stop(&a), r#"{"grace":1}"#, 400),
            post("stop a", stop(&a), r#"{"grace_ms":2000}"#, 202),
            (
                "stop b",
                Method::POST,
                stop(&b),
                json_type.clone(),
                None,
                202,
            ),
            (
                "stop unknown",
                Method::POST,
                stop(UNKNOWN),
                json_type.clone(),
                None,
                404,
            ),
        ])
        .await?;
    for id in [&a, &b] {
        server.wait_worker(id, |w| w["state"] == "stopped").await?;
    }
    client
        .calls(vec![
            ("stop again", Method::POST, stop(&a), json_type, None, 202),
            delete("delete c", format!("/v1/workers/{c}"), 204),
            delete("delete c again", format!("/v1/workers/{c}"), 404),
            delete("delete d", format!("/v1/workers/{d}"), 204),
            get("metrics", "/metrics", 200),
            get("runtimes at the end", "/v1/runtimes", 200),
            get("list at the end", "/v1/workers", 200),
        ])
        .await?;

    // Shut down: the long streams end.
    let mut got = client.got;
    server.stop().await?;
    for (what, task) in [
        ("events", all_events),
        ("events of local", local_events),
        ("output of a", a_output),
    ] {
        let (events, headers, raw) = task.await?;
        let events = events.with_context(|| format!("{what} did not end"))?;
        ensure!(
            events.last().is_some_and(|e| e == "shutdown" || e == "end"),
            "{what}: {events:?}"
        );
        if what == "output of a" {
            unsanitized.push((what.to_string(), String::from_utf8_lossy(&raw).into_owned()));
        }
        got.stream(what, &headers, &raw);
    }

    // The search.
    let mut needles: Vec<(String, String)> = Vec::new();
    let mut needle = |why: &str, text: String| needles.push((why.to_string(), text));
    needle("the state directory", state_dir.display().to_string());
    needle("the state directory's parent", parent_of(&state_dir));
    needle("a temporary path", "/tmp/".into());
    needle(
        "a temporary path",
        std::env::temp_dir().display().to_string(),
    );
    needle("a /proc path", "/proc".into());
    needle("an environment value", secret.clone());
    needle("the missing program", missing.clone());
    needle("the server's address", address);
    for key in &keys {
        needle("a source key", key.clone());
        if let Some((instance, _)) = key.split_once(':') {
            needle("the source's instance", instance.to_string());
        }
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in &pids {
        needles.extend(pid_needles("a pid", *pid));
    }
    let found = got.find(&needles);
    assert!(
        found.is_empty(),
        "internal authority reached a client ({} places):\n{}",
        found.len(),
        found.join("\n")
    );
    // The search finds what it looks for: in a worker's own output its pid, in a worker's
    // view the command the client asked for.
    let control = Collected {
        items: unsanitized,
        echoed_command: Value::Null,
    }
    .find(&needles);
    let printed = format!("={worker_pid}");
    assert!(control.iter().any(|f| f.contains(&printed)), "{control:#?}");
    assert!(control.iter().any(|f| f.contains(&missing)), "{control:#?}");
    // The search saw the scenario: its events and output are in what was searched.
    let all: String = got.items.iter().map(|(_, t)| t.as_str()).collect();
    assert!(all.contains("worker.upserted") && all.contains("spawn_failed"));
    assert!(all.contains("event: output") && all.contains("event: shutdown"));
    Ok(())
}

fn parent_of(path: &std::path::Path) -> String {
    path.parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// A spawn body whose `env` has the wrong shape must not have its value shown back in the
/// error message: an environment value never appears in one (§1).
#[tokio::test]

async fn an_env_of_the_wrong_shape_is_not_shown_back_in_the_error() -> Result<()> {
    let server = TestServer::start().await?;
    let secret = format!("SECRET_ENV_VALUE_{}", std::process::id());
    for body in [
        json!({ "profile": "shell", "env": format!("K={secret}") }),
        json!({ "profile": "shell", "env": { "K": { "nested": secret } } }),
    ] {
        let resp = server
            .post("/v1/runtimes/local/workers", &body.to_string())
            .await?;
        assert_eq!(resp.status, 400, "{}", resp.text());
        assert!(!resp.text().contains(&secret), "{}", resp.text());
    }
    server.stop().await?;
    Ok(())
}

/// A runtime that lost its watchdog process is `degraded` over the API (the embedded source
/// says so in its health), and neither the message nor the diagnostics name the pid.
#[tokio::test]

async fn a_runtime_without_its_watchdog_is_degraded_and_names_no_pid() -> Result<()> {
    let (server, source) = server_with_source().await?;
    let watchdog = source.watchdog_pid();
    let mut events = server.sse("/v1/events", &[]).await?;
    events.next_event().await?;
    // SAFETY: kill(2) of the helper process of this test's own runtime; no memory involved.
    let killed = unsafe { libc::kill(i32::try_from(watchdog)?, libc::SIGKILL) };
    ensure!(killed == 0, "kill: {}", std::io::Error::last_os_error());

    let mut got = Collected::default();
    let deadline = Instant::now() + WAIT;
    loop {
        let resp = server.get("/v1/runtimes/local").await?;
        got.response("runtime", &resp);
        let rt = resp.json()?;
        if rt["health"]["status"] == "degraded" {
            ensure!(
                rt["diagnostics"].as_array().is_some_and(|d| !d.is_empty()),
                "a degraded runtime says why: {rt}"
            );
            break;
        }
        ensure!(Instant::now() < deadline, "the runtime stayed {rt}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The change is an event too.
    loop {
        let ev = events.next_event().await?;
        if ev.event == "runtime.updated" && ev.data["runtime"]["health"]["status"] == "degraded" {
            break;
        }
    }
    got.stream("events", &events.headers, &events.raw);
    for path in ["/v1/runtimes", "/metrics", "/readyz"] {
        let resp = server.get(path).await?;
        got.response(path, &resp);
    }
    server.stop().await?;
    let mut needles = pid_needles("the watchdog's pid", watchdog);
    needles.extend(pid_needles("the server's pid", std::process::id()));
    let found = got.find(&needles);
    assert!(found.is_empty(), "{}", found.join("\n"));
    Ok(())
}
