//! The `remote` source when the network between two rosters breaks.
//!
//! An upstream roster (one embedded runtime `local`) sits behind a TCP proxy the test
//! controls: `cut` closes every connection and closes new ones at once, `blackhole` keeps
//! connections open but carries no byte either way (a silent network, no FIN or RST), and
//! `restore` forwards again. A downstream roster has one runtime `far` of kind `remote`
//! that follows the upstream's `local` through the proxy. Everything a client does goes
//! through the downstream's HTTP API, and every byte the downstream sends is kept for the
//! leak search each test ends with.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use server_bin::ServeOptions;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use common::{config, SseClient, SseEvent, TestResponse, TestServer};

/// How long any condition may take to show (generous: the machine may be busy).
const DEADLINE: Duration = Duration::from_secs(20);
/// How long the silent network may take to be noticed (`heartbeat_timeout` is 1 s).
const BLACKHOLE_NOTICED: Duration = Duration::from_secs(10);
/// The most `Retry-After` may say with `backoff_cap = "500ms"` (rounded up, with room).
const RETRY_AFTER_MAX: u64 = 2;
/// The worker of the output test: 200 numbered lines, one every ~50 ms.
const LINES: u64 = 200;
const LINES_SCRIPT: &str =
    "i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo line$i; sleep 0.05; done";

// ---------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Blackhole,
    Cut,
}

/// A TCP proxy on 127.0.0.1:0 to one upstream address.
struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections being forwarded (or held) now.
    live: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = watch::channel(Mode::Forward).0;
        let live = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.subscribe(),
            live.clone(),
        ));
        Ok(Proxy {
            addr,
            mode,
            live,
            accept,
        })
    }

    /// Closes every connection, both sides, and returns once none is left; until
    /// [`Proxy::restore`], new connections are closed as soon as they are accepted.
    async fn cut(&self) -> Result<()> {
        self.mode.send_replace(Mode::Cut);
        let deadline = Instant::now() + DEADLINE;
        while self.live.load(Ordering::SeqCst) > 0 {
            ensure!(
                Instant::now() < deadline,
                "{} connections still open after the cut",
                self.live.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Keeps every connection open but carries nothing more either way; new connections
    /// are accepted and held without reaching the upstream.
    fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Forwards again (what a held connection carried goes on, as after a healed network).
    fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks: aborting it drops them all.
        self.accept.abort();
    }
}

/// Counts a connection task while it lives.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: &Arc<AtomicUsize>) -> Live {
        count.fetch_add(1, Ordering::SeqCst);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    live: Arc<AtomicUsize>,
) {
    let mut conns = JoinSet::new();
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        if *mode.borrow() == Mode::Cut {
            drop(client);
            continue;
        }
        let live = Live::new(&live);
        conns.spawn(connection(client, upstream, mode.clone(), live));
    }
}

/// Resolves once the proxy is cut (or gone).
async fn until_cut(mode: &mut watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m == Mode::Cut).await;
}

/// One client connection: held while blackholed, then joined to a fresh upstream
/// connection and forwarded both ways until either side closes or the proxy is cut.
async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    _live: Live,
) {
    let now = match mode.wait_for(|m| *m != Mode::Blackhole).await {
        Ok(m) => *m,
        Err(_) => return,
    };
    if now == Mode::Cut {
        return;
    }
    let server = tokio::select! {
        server = TcpStream::connect(upstream) => match server {
            Ok(server) => server,
            Err(_) => return,
        },
        _ = until_cut(&mut mode) => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (up, down) = (mode.clone(), mode.clone());
    tokio::select! {
        _ = async move {
            tokio::join!(
                pipe(client_read, server_write, up),
                pipe(server_read, client_write, down),
            )
        } => {}
        _ = until_cut(&mut mode) => {}
    }
}

/// Copies one direction. What is read while blackholed (data or the end) is held until
/// the proxy forwards again; a cut ends the copy.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        let now = mode.wait_for(|m| *m != Mode::Blackhole).await.map(|m| *m);
        if !matches!(now, Ok(Mode::Forward)) {
            return;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The two rosters
// ---------------------------------------------------------------------------------------

/// Upstream, proxy and downstream. The downstream's [`TestServer`] records every byte it
/// sent to this test's clients.
struct Rig {
    up: TestServer,
    proxy: Proxy,
    down: TestServer,
}

/// Polls `probe` (through testkit) until it finds something (`Ok(Ok(_))`), or fails after
/// [`DEADLINE`] with the last thing it said (`Ok(Err(_))`).
async fn until<T, F, Fut>(what: &str, probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<std::result::Result<T, String>>>,
{
    common::eventually_seen(&format!("timed out waiting for {what}"), DEADLINE, probe).await
}

fn shell(script: &str) -> String {
    json!({ "profile": "shell", "args": [script] }).to_string()
}

/// The answer of a call refused during an outage: `503 runtime_unavailable`, retryable,
/// with a `Retry-After` of whole seconds, at least 1.
fn assert_unavailable(what: &str, resp: &TestResponse) -> Result<()> {
    ensure!(
        resp.status == StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {} {}",
        resp.status,
        resp.text()
    );
    ensure!(
        resp.code() == "runtime_unavailable",
        "{what}: {}",
        resp.text()
    );
    ensure!(
        resp.json()?["error"]["retryable"] == true,
        "{what}: {}",
        resp.text()
    );
    let retry = resp
        .headers
        .get("retry-after")
        .with_context(|| format!("{what}: no Retry-After"))?
        .to_str()?;
    let secs: u64 = retry
        .parse()
        .with_context(|| format!("{what}: Retry-After {retry:?}"))?;
    // The time to the next attempt, at least 1 s; `backoff_cap` is 500 ms.
    ensure!(
        (1..=RETRY_AFTER_MAX).contains(&secs),
        "{what}: Retry-After {secs}"
    );
    Ok(())
}

impl Rig {
    async fn start() -> Result<Rig> {
        let options = ServeOptions {
            sse_ping: Duration::from_millis(200),
            ..Default::default()
        };
        let up = TestServer::start_with(config(""), options.clone()).await?;
        let proxy = Proxy::start(up.addr).await?;
        let text = format!(
            r#"
[[runtimes]]
name = "far"
source = "remote"
url = "http://{}"
remote_runtime = "local"
heartbeat_timeout = "1s"
backoff_cap = "500ms"
connect_timeout = "1s"
request_timeout = "2s"
"#,
            proxy.addr
        );
        let down_config = server_bin::Config::parse(&text)?;
        ensure!(
            down_config.runtimes.len() == 1,
            "the downstream has only the remote runtime"
        );
        let down = TestServer::start_with(down_config, options).await?;
        let rig = Rig { up, proxy, down };
        rig.wait_health("ready").await?;
        Ok(rig)
    }

    /// Restores the network, checks what the downstream sent for the upstream's address,
    /// the proxy's port and the upstream's worker ids, and stops both servers.
    async fn finish(self) -> Result<()> {
        self.proxy.restore();
        self.wait_health("ready").await?;
        self.assert_no_leaks().await?;
        let Rig { up, proxy, down } = self;
        down.stop().await?;
        drop(proxy);
        up.stop().await?;
        Ok(())
    }

    async fn assert_no_leaks(&self) -> Result<()> {
        let up_ids = ids(&self.up.get("/v1/workers?limit=1000").await?.json()?)?;
        let down_ids = self.worker_ids().await?;
        ensure!(!up_ids.is_empty(), "the upstream has workers");
        // Control: the downstream issues ids of its own, so a search for the upstream's
        // ids means something.
        ensure!(
            up_ids.is_disjoint(&down_ids),
            "upstream {up_ids:?}, downstream {down_ids:?}"
        );
        // Control: the record holds what the clients got (the downstream's ids are in it).
        let down_id = down_ids
            .iter()
            .next()
            .context("the downstream has workers")?;
        ensure!(
            self.down
                .seen()
                .assert_free_of(std::slice::from_ref(down_id))
                .is_err(),
            "the record of what the downstream sent is empty"
        );
        let mut needles = vec![
            self.up.addr.to_string(),
            format!(":{}", self.up.addr.port()),
            self.proxy.addr.to_string(),
            format!(":{}", self.proxy.addr.port()),
        ];
        needles.extend(up_ids);
        self.down.seen().assert_free_of(&needles)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<TestResponse> {
        self.down.request(method, path, &[], body).await
    }

    async fn post(&self, path: &str, body: &str) -> Result<TestResponse> {
        self.request(Method::POST, path, Some(body)).await
    }

    async fn get_json(&self, path: &str) -> Result<Value> {
        let resp = self.request(Method::GET, path, None).await?;
        ensure!(
            resp.status == StatusCode::OK,
            "GET {path}: {} {}",
            resp.status,
            resp.text()
        );
        resp.json()
    }

    /// `GET path` for a stream: the status and headers, and the body only when the answer
    /// is no stream (not `200`).
    async fn open(&self, path: &str) -> Result<TestResponse> {
        let (parts, body) = self
            .down
            .send(Method::GET, path, &[], None)
            .await?
            .into_parts();
        let body = if parts.status == StatusCode::OK {
            Bytes::new()
        } else {
            tokio::time::timeout(DEADLINE, body.collect())
                .await
                .context("body timed out")??
                .to_bytes()
        };
        let resp = TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        };
        self.down.seen().record_response(&resp);
        Ok(resp)
    }

    async fn sse(&self, path: &str, headers: &[(&str, &str)]) -> Result<SseClient> {
        self.down.sse(path, headers).await
    }

    /// Spawns `sh -c script` in `far` through the downstream; the downstream's worker id.
    async fn spawn(&self, script: &str) -> Result<String> {
        self.post("/v1/runtimes/far/workers", &shell(script))
            .await?
            .created_id()
    }

    async fn wait_health(&self, status: &str) -> Result<Value> {
        until(&format!("runtime far {status}"), || async move {
            let rt = self.get_json("/v1/runtimes/far").await?;
            Ok(if rt["health"]["status"] == status {
                Ok(rt)
            } else {
                Err(rt.to_string())
            })
        })
        .await
    }

    async fn wait_state(&self, id: &str, state: &str) -> Result<Value> {
        until(&format!("worker {id} {state}"), || async move {
            let w = self.get_json(&format!("/v1/workers/{id}")).await?;
            Ok(if w["state"] == state {
                Ok(w)
            } else {
                Err(w.to_string())
            })
        })
        .await
    }

    /// While the link is down: the runtime is `unavailable` with `since` and `retry_at`,
    /// the live worker `id` is `unknown` with `last_seen_at`, and spawn, input, stop,
    /// reading retained output, remove and following output answer
    /// `503 runtime_unavailable` with `Retry-After`.
    async fn assert_outage(&self, id: &str) -> Result<()> {
        let rt = self.wait_health("unavailable").await?;
        let since = timestamp(&rt["health"]["since"]).context("since")?;
        timestamp(&rt["health"]["retry_at"]).context("retry_at")?;
        let w = self.wait_state(id, "unknown").await?;
        ensure!(w["id"] == id, "{w}");
        // The last word from the upstream came before the outage was noticed.
        let last_seen = timestamp(&w["last_seen_at"]).context("last_seen_at")?;
        ensure!(last_seen <= since, "last_seen_at after since: {w} {rt}");

        let spawn = self
            .post("/v1/runtimes/far/workers", &shell("echo never"))
            .await?;
        assert_unavailable("spawn", &spawn)?;
        let input = self
            .post(&format!("/v1/workers/{id}/input"), r#"{"data":"x\n"}"#)
            .await?;
        assert_unavailable("input", &input)?;
        let stop = self.post(&format!("/v1/workers/{id}/stop"), "{}").await?;
        assert_unavailable("stop", &stop)?;
        let retained = self
            .request(
                Method::GET,
                &format!("/v1/workers/{id}/output?follow=0"),
                None,
            )
            .await?;
        assert_unavailable("output?follow=0", &retained)?;
        let output = self.open(&format!("/v1/workers/{id}/output")).await?;
        assert_unavailable("output", &output)?;
        let remove = self
            .request(Method::DELETE, &format!("/v1/workers/{id}"), None)
            .await?;
        assert_unavailable("remove", &remove)?;

        // Still the same outage: nothing above went through, the worker is still there,
        // and neither `since` nor `last_seen_at` moved while the link stayed down.
        let rt = self.get_json("/v1/runtimes/far").await?;
        ensure!(rt["health"]["status"] == "unavailable", "{rt}");
        ensure!(timestamp(&rt["health"]["since"])? == since, "{rt}");
        let w = self.get_json(&format!("/v1/workers/{id}")).await?;
        ensure!(w["state"] == "unknown", "{w}");
        ensure!(timestamp(&w["last_seen_at"])? == last_seen, "{w}");
        Ok(())
    }

    /// The ids of the workers of `far`.
    async fn worker_ids(&self) -> Result<BTreeSet<String>> {
        ids(&self.get_json("/v1/workers?runtime=far&limit=1000").await?)
    }

    /// After the network is back: `ready`, the same worker `running` again, the same ids
    /// as `before` the outage, and a stop that goes through (the worker ends `stopped`).
    async fn assert_healed(&self, id: &str, before: &BTreeSet<String>) -> Result<()> {
        self.wait_health("ready").await?;
        let w = self.wait_state(id, "running").await?;
        ensure!(w["id"] == id, "{w}");
        let after = self.worker_ids().await?;
        ensure!(&after == before, "ids before {before:?}, after {after:?}");
        let stop = self
            .post(&format!("/v1/workers/{id}/stop"), r#"{"grace_ms":2000}"#)
            .await?;
        ensure!(
            stop.status == StatusCode::ACCEPTED,
            "stop after the heal: {} {}",
            stop.status,
            stop.text()
        );
        self.wait_state(id, "stopped").await?;
        Ok(())
    }
}

fn timestamp(value: &Value) -> Result<OffsetDateTime> {
    let text = value
        .as_str()
        .with_context(|| format!("a timestamp: {value}"))?;
    Ok(OffsetDateTime::parse(text, &Rfc3339)?)
}

/// Reads an event stream up to the first `runtime.updated` that shows `far` unavailable.
async fn first_unavailable(events: &mut SseClient) -> Result<SseEvent> {
    loop {
        let ev = events.next_event().await?;
        if health_of(&ev) == Some("unavailable") {
            return Ok(ev);
        }
    }
}

/// The ids of a `GET /v1/workers` answer.
fn ids(list: &Value) -> Result<BTreeSet<String>> {
    list["workers"]
        .as_array()
        .with_context(|| format!("a worker list: {list}"))?
        .iter()
        .map(|w| {
            w["id"]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("an id: {w}"))
        })
        .collect()
}

/// Reads an output stream until `end` (and the close after it); every event read. Each
/// chunk's `seq` goes to `progress`.
async fn read_output(mut stream: SseClient, progress: watch::Sender<u64>) -> Result<Vec<SseEvent>> {
    let mut events = Vec::new();
    loop {
        let ev = stream
            .next_event()
            .await
            .with_context(|| format!("output stream, after {} events: {events:?}", events.len()))?;
        if ev.event == "output" {
            progress.send_replace(ev.data["seq"].as_u64().context("a seq")?);
        }
        let end = ev.event == "end";
        events.push(ev);
        if end {
            break;
        }
    }
    let rest = stream.next_event_within(DEADLINE).await?;
    ensure!(rest.is_none(), "an event after `end`: {rest:?}");
    Ok(events)
}

/// `(seq, stream, data)` of each `output` event.
fn chunks(events: &[SseEvent]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| {
            (
                e.data["seq"].as_u64().unwrap_or(0),
                e.data["stream"].as_str().unwrap_or("").to_string(),
                e.data["data"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn worker_of<'a>(ev: &'a SseEvent, id: &str) -> Option<&'a Value> {
    match ev.event.as_str() {
        "worker.upserted" => Some(&ev.data["worker"]).filter(|w| w["id"] == id),
        "snapshot" => ev.data["workers"]
            .as_array()?
            .iter()
            .find(|w| w["id"] == id),
        _ => None,
    }
}

fn health_of(ev: &SseEvent) -> Option<&str> {
    (ev.event == "runtime.updated")
        .then(|| ev.data["runtime"]["health"]["status"].as_str())
        .flatten()
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_link_makes_runtime_unavailable_and_worker_unknown_then_heals_with_the_same_id(
) -> Result<()> {
    let rig = Rig::start().await?;
    let id = rig.spawn("sleep 300").await?;
    let ended = rig.spawn("echo done").await?;
    rig.wait_state(&id, "running").await?;
    rig.wait_state(&ended, "exited").await?;
    let before = rig.worker_ids().await?;
    let mut events = rig.sse("/v1/events", &[]).await?;
    ensure!(events.next_event().await?.event == "snapshot");

    rig.proxy.cut().await?;
    // The closed connection tells at once: no waiting for the heartbeat window.
    let down = first_unavailable(&mut events).await?;
    let message = down.data["runtime"]["health"]["message"]
        .as_str()
        .unwrap_or("");
    ensure!(
        !message.is_empty() && !message.contains("heartbeat_timeout"),
        "{down:?}"
    );
    rig.assert_outage(&id).await?;
    // An ended worker stays as it ended, and stopping it again needs no upstream.
    let w = rig.get_json(&format!("/v1/workers/{ended}")).await?;
    ensure!(w["state"] == "exited" && w["exit_code"] == 0, "{w}");
    let stop = rig.post(&format!("/v1/workers/{ended}/stop"), "{}").await?;
    ensure!(
        stop.status == StatusCode::ACCEPTED,
        "stop of an ended worker during the outage: {} {}",
        stop.status,
        stop.text()
    );

    rig.proxy.restore();
    rig.assert_healed(&id, &before).await?;
    let w = rig.get_json(&format!("/v1/workers/{ended}")).await?;
    ensure!(w["state"] == "exited" && w["exit_code"] == 0, "{w}");
    drop(events);
    rig.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_link_is_noticed_by_the_heartbeat_window_and_heals_with_the_same_id() -> Result<()> {
    let rig = Rig::start().await?;
    let id = rig.spawn("sleep 300").await?;
    rig.wait_state(&id, "running").await?;
    let before = rig.worker_ids().await?;
    let mut events = rig.sse("/v1/events", &[]).await?;
    ensure!(events.next_event().await?.event == "snapshot");

    rig.proxy.blackhole();
    let silent_since = Instant::now();
    // No FIN, no RST: only the missed pings (every 200 ms upstream, a 1 s window) tell.
    let down = tokio::time::timeout(BLACKHOLE_NOTICED, first_unavailable(&mut events))
        .await
        .with_context(|| format!("the silent link not noticed in {BLACKHOLE_NOTICED:?}"))??;
    let noticed = silent_since.elapsed();
    let message = down.data["runtime"]["health"]["message"]
        .as_str()
        .unwrap_or("");
    ensure!(
        message.contains("heartbeat_timeout"),
        "not noticed by the heartbeat window ({noticed:?}): {down:?}"
    );
    ensure!(
        rig.proxy.live.load(Ordering::SeqCst) > 0,
        "the blackhole closed its connections"
    );
    rig.assert_outage(&id).await?;

    rig.proxy.restore();
    rig.assert_healed(&id, &before).await?;
    drop(events);
    rig.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resumed_across_the_outage_equal_those_of_a_client_that_stayed() -> Result<()> {
    let rig = Rig::start().await?;
    // A stays connected from before anything happens to the end.
    let mut a = rig.sse("/v1/events", &[]).await?;
    let mut seen_by_a = vec![a.next_event().await?];
    ensure!(seen_by_a[0].event == "snapshot", "{:?}", seen_by_a[0]);

    let id = rig.spawn("sleep 300").await?;
    rig.wait_state(&id, "running").await?;

    // B reads until it has seen the worker running, keeps the last id, and goes.
    let resume_from = {
        let mut b = rig.sse("/v1/events", &[]).await?;
        loop {
            let ev = b.next_event().await?;
            if worker_of(&ev, &id).is_some_and(|w| w["state"] == "running") {
                break ev.id.context("an event id")?;
            }
        }
    };

    rig.proxy.cut().await?;
    rig.wait_health("unavailable").await?;
    rig.wait_state(&id, "unknown").await?;

    // Meanwhile, on the upstream itself: a worker that starts and exits.
    let body =
        json!({ "profile": "shell", "args": ["echo during"], "name": "during-outage" }).to_string();
    let resp = rig.up.post("/v1/runtimes/local/workers", &body).await?;
    ensure!(resp.status == StatusCode::CREATED, "{}", resp.text());
    let up_id = resp.json()?["id"].as_str().context("an id")?.to_string();
    rig.up
        .wait_worker(&up_id, |w| w["state"] == "exited")
        .await?;
    let rt = rig.get_json("/v1/runtimes/far").await?;
    ensure!(rt["health"]["status"] == "unavailable", "{rt}");

    rig.proxy.restore();
    rig.wait_health("ready").await?;
    rig.wait_state(&id, "running").await?;
    let new_id = until("the upstream's new worker downstream, exited", || async {
        let list = rig.get_json("/v1/workers?runtime=far").await?;
        let found = list["workers"]
            .as_array()
            .context("workers")?
            .iter()
            .find(|w| w["name"] == "during-outage" && w["state"] == "exited")
            .and_then(|w| w["id"].as_str())
            .map(str::to_string);
        Ok(found.ok_or_else(|| list.to_string()))
    })
    .await?;
    ensure!(new_id != up_id, "the downstream issues its own ids");

    // A reads until it has seen the whole outage: unavailable, the worker unknown, ready
    // again, the worker running again, the new worker exited.
    let (mut down, mut unknown, mut up, mut back, mut new) = (false, false, false, false, false);
    while !(down && unknown && up && back && new) {
        let ev = a.next_event().await.context("A's stream")?;
        match health_of(&ev) {
            Some("unavailable") => down = true,
            Some("ready") if down => up = true,
            _ => {}
        }
        if let Some(w) = worker_of(&ev, &id) {
            if w["state"] == "unknown" {
                unknown = true;
                ensure!(w["last_seen_at"].is_string(), "{w}");
            } else if unknown && w["state"] == "running" {
                back = true;
            }
        }
        if worker_of(&ev, &new_id).is_some_and(|w| w["state"] == "exited") {
            new = true;
        }
        seen_by_a.push(ev);
    }
    let last = seen_by_a
        .last()
        .and_then(|e| e.id.clone())
        .context("an event id")?;
    let from = seen_by_a
        .iter()
        .position(|e| e.id.as_deref() == Some(resume_from.as_str()))
        .with_context(|| format!("A never got B's last id {resume_from}"))?;
    let expected = &seen_by_a[from + 1..];
    ensure!(
        expected.iter().any(|e| health_of(e) == Some("unavailable"))
            && expected
                .iter()
                .any(|e| worker_of(e, &new_id).is_some_and(|w| w["state"] == "exited")),
        "the outage and the new worker lie after B's last id: {expected:?}"
    );

    // B comes back with its last id and reads up to A's last event.
    let mut b = rig
        .sse("/v1/events", &[("last-event-id", resume_from.as_str())])
        .await?;
    let mut resumed = Vec::new();
    while resumed.len() < expected.len() {
        let ev = b.next_event().await.context("B's resumed stream")?;
        ensure!(
            ev.event != "reset" && ev.event != "snapshot",
            "B needed a {}: {:?}",
            ev.event,
            ev.data
        );
        resumed.push(ev);
    }
    ensure!(
        resumed.last().and_then(|e| e.id.as_deref()) == Some(last.as_str()),
        "B's events end elsewhere than A's"
    );
    for (i, (b_ev, a_ev)) in resumed.iter().zip(expected).enumerate() {
        ensure!(
            b_ev.id == a_ev.id && b_ev.event == a_ev.event && b_ev.data == a_ev.data,
            "event {i} after the resume point differs: B {b_ev:?}, A {a_ev:?}"
        );
    }
    let distinct: BTreeSet<&str> = resumed.iter().filter_map(|e| e.id.as_deref()).collect();
    ensure!(distinct.len() == resumed.len(), "an id twice: {resumed:?}");
    drop((a, b));
    rig.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_stream_carries_on_across_the_outage_without_hole_or_repeat() -> Result<()> {
    let rig = Rig::start().await?;
    let id = rig.spawn(LINES_SCRIPT).await?;
    let first = rig.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    let (progress_tx, mut progress) = watch::channel(0u64);
    let reader = tokio::spawn(read_output(first, progress_tx));

    tokio::time::timeout(DEADLINE, progress.wait_for(|seq| *seq >= 10))
        .await
        .context("no output before the cut")??;
    rig.proxy.cut().await?;
    let cut_at = *progress.borrow();
    rig.wait_health("unavailable").await?;
    // Let the outage last while the worker goes on printing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.proxy.restore();
    rig.wait_health("ready").await?;

    // A second reader after the heal, resuming after the seq the first had at the cut.
    let resume = cut_at.to_string();
    let second = rig
        .sse(
            &format!("/v1/workers/{id}/output"),
            &[("last-event-id", resume.as_str())],
        )
        .await?;
    let second = read_output(second, watch::channel(0).0).await?;
    let first = reader.await??;

    ensure!(!first.iter().any(|e| e.event == "gap"), "a gap: {first:?}");
    ensure!(
        first
            .iter()
            .any(|e| e.event == "state" && e.data["worker"]["state"] == "unknown"),
        "the first reader never saw the outage"
    );
    let got = chunks(&first);
    let seqs: Vec<u64> = got.iter().map(|c| c.0).collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    ensure!(seqs == want, "seqs are not 1..=N: {seqs:?}");
    ensure!(
        seqs.len() as u64 > cut_at,
        "nothing came after the cut at {cut_at}"
    );
    let text: String = got.iter().map(|c| c.2.as_str()).collect();
    let expected: String = (1..=LINES).map(|i| format!("line{i}\n")).collect();
    ensure!(text == expected, "the text differs: {text:?}");
    ensure!(got.iter().all(|c| c.1 == "stdout"), "{got:?}");

    ensure!(second[0].event == "state", "{:?}", second[0]);
    ensure!(
        !second.iter().any(|e| e.event == "gap"),
        "a gap: {second:?}"
    );
    let after: Vec<_> = got.iter().filter(|c| c.0 > cut_at).cloned().collect();
    ensure!(
        chunks(&second) == after,
        "the resumed reader got {:?}, not the chunks after {cut_at}",
        chunks(&second)
    );
    rig.wait_state(&id, "exited").await?;
    rig.finish().await
}

/// Whether a new output stream opens during an outage does not depend on other readers: one
/// asked for while another client follows the worker (and so shares its upstream stream)
/// is `503` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_asked_for_during_an_outage_is_503_also_while_another_reader_follows() -> Result<()>
{
    let rig = Rig::start().await?;
    let id = rig.spawn("echo ready; sleep 300").await?;
    rig.wait_state(&id, "running").await?;
    let before = rig.worker_ids().await?;
    let mut reader = rig.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    while reader.next_event().await?.event != "output" {}

    rig.proxy.cut().await?;
    rig.assert_outage(&id).await?;

    rig.proxy.restore();
    rig.assert_healed(&id, &before).await?;
    while reader.next_event().await?.event != "end" {}
    drop(reader);
    rig.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_downstream_sends_names_the_upstream_address_port_or_ids() -> Result<()> {
    let rig = Rig::start().await?;
    let mut events = rig.sse("/v1/events", &[]).await?;
    ensure!(events.next_event().await?.event == "snapshot");

    // A worker that takes input and echoes it; one on the upstream itself.
    let cat = rig.spawn("cat").await?;
    rig.wait_state(&cat, "running").await?;
    let input = rig
        .post(&format!("/v1/workers/{cat}/input"), r#"{"data":"hello\n"}"#)
        .await?;
    ensure!(input.status == StatusCode::ACCEPTED, "{}", input.text());
    let body = json!({ "profile": "shell", "args": ["echo upstream"], "name": "u" }).to_string();
    let resp = rig.up.post("/v1/runtimes/local/workers", &body).await?;
    ensure!(resp.status == StatusCode::CREATED, "{}", resp.text());
    // Errors the upstream answers, passed on.
    let bad = rig
        .post(
            "/v1/runtimes/far/workers",
            r#"{"profile":"nope","args":["true"]}"#,
        )
        .await?;
    ensure!(
        bad.status.is_client_error(),
        "{} {}",
        bad.status,
        bad.text()
    );

    // Output, then both kinds of outage with everything a client might ask meanwhile.
    let mut output = rig.sse(&format!("/v1/workers/{cat}/output"), &[]).await?;
    loop {
        let ev = output.next_event().await?;
        if ev.event == "output" {
            ensure!(ev.data["data"] == "hello\n", "{ev:?}");
            break;
        }
    }
    rig.proxy.cut().await?;
    rig.assert_outage(&cat).await?;
    rig.get_json("/v1/runtimes").await?;
    rig.get_json("/v1/workers").await?;
    rig.proxy.restore();
    rig.wait_health("ready").await?;
    rig.wait_state(&cat, "running").await?;

    rig.proxy.blackhole();
    rig.assert_outage(&cat).await?;
    rig.get_json("/v1/runtimes").await?;
    rig.proxy.restore();
    rig.wait_health("ready").await?;
    rig.wait_state(&cat, "running").await?;

    // The worker ends; its stream and the event stream show it.
    let stop = rig.post(&format!("/v1/workers/{cat}/stop"), "{}").await?;
    ensure!(stop.status == StatusCode::ACCEPTED, "{}", stop.text());
    loop {
        let ev = output.next_event().await?;
        if ev.event == "end" {
            break;
        }
    }
    let late = rig
        .post(&format!("/v1/workers/{cat}/input"), r#"{"data":"late\n"}"#)
        .await?;
    ensure!(
        late.status.is_client_error(),
        "{} {}",
        late.status,
        late.text()
    );
    loop {
        let ev = events.next_event().await?;
        if worker_of(&ev, &cat).is_some_and(|w| w["state"] == "stopped") {
            break;
        }
    }
    let up_count = ids(&rig.up.get("/v1/workers").await?.json()?)?.len();
    let down_count = ids(&rig.get_json("/v1/workers?runtime=far").await?)?.len();
    ensure!(
        up_count == 2 && down_count == 2,
        "{up_count} upstream, {down_count} downstream"
    );
    drop((events, output));
    rig.finish().await
}
