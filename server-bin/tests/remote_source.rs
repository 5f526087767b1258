//! The remote source up close: readers of one worker share one upstream stream, a slow
//! reader neither loses output nor slows the others, and what the other side sends wrongly
//! is never applied by halves — the link starts over from a fresh snapshot.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use registry_core::{
    OutputEvent, OutputRequest, OutputStream, RuntimeId, RuntimeSource, SourceConfig, SourceEvent,
    SourceKind, SpawnRequest, WorkerState,
};
use server_bin::ServeOptions;
use source_remote::RemoteSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

use common::{config, TestServer, WAIT};

fn remote_at(addr: std::net::SocketAddr, extra: &str) -> Result<RemoteSource> {
    let table: toml::Table =
        format!("url = \"http://{addr}\"\nremote_runtime = \"local\"\n{extra}").parse()?;
    Ok(RemoteSource::from_config(&SourceConfig {
        runtime_id: RuntimeId::new("far")?,
        table: table.into(),
        state_dir: std::env::temp_dir().into(),
    })?)
}

/// The upstream's count of open output streams, from its `/metrics`.
async fn upstream_output_streams(up: &TestServer) -> Result<u64> {
    let text = up.get("/metrics").await?.text();
    text.lines()
        .find(|l| l.starts_with("roster_sse_clients{stream=\"output\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .context("no roster_sse_clients{stream=\"output\"} in the upstream's metrics")
}

/// Reads a stream to its end: every chunk's (seq, text), and whether `End` came.
async fn read_to_end(mut stream: OutputStream) -> Result<(Vec<(u64, String)>, bool)> {
    let mut chunks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, stream.recv()).await {
            Err(_) => bail!(
                "the output stream did not end; {} chunks so far",
                chunks.len()
            ),
            Ok(None) => return Ok((chunks, false)),
            Ok(Some(OutputEvent::End)) => return Ok((chunks, true)),
            Ok(Some(OutputEvent::Chunk(c))) => {
                chunks.push((c.seq, String::from_utf8_lossy(&c.data).into_owned()))
            }
            Ok(Some(OutputEvent::Gap { from, to })) => bail!("unexpected gap {from}..={to}"),
        }
    }
}

fn check_complete(chunks: &[(u64, String)], expect: &str) -> Result<()> {
    for (i, (seq, _)) in chunks.iter().enumerate() {
        ensure!(
            *seq == i as u64 + 1,
            "seq {seq} at position {i}: a hole or a repeat"
        );
    }
    let text: String = chunks.iter().map(|(_, t)| t.as_str()).collect();
    ensure!(
        text == expect,
        "text differs: {} bytes, expected {}",
        text.len(),
        expect.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_one_worker_share_one_upstream_stream_and_a_slow_one_loses_nothing() -> Result<()>
{
    // The upstream retains all of it, so any loss would be the proxy's.
    let up = TestServer::start_with(
        config("output_retention = \"16MiB\""),
        ServeOptions::default(),
    )
    .await?;
    let source = remote_at(up.addr, "")?;
    // Its Debug names neither the address nor the port.
    let shown = format!("{source:?}");
    ensure!(
        !shown.contains(&up.addr.ip().to_string()) && !shown.contains(&up.addr.port().to_string()),
        "{shown}"
    );
    // About 3 MiB in 2000 lines, waiting for a go-ahead first so every reader is in place.
    let script = "read go; i=0; while [ $i -lt 2000 ]; do i=$((i+1)); \
                  printf '%05d %01500d\\n' $i 0; done";
    let expect: String = (1..=2000)
        .map(|i| format!("{i:05} {:01500}\n", 0))
        .collect();
    let worker = source
        .spawn(SpawnRequest {
            profile: Some("shell".into()),
            args: vec![script.into()],
            ..Default::default()
        })
        .await?;
    let follow = OutputRequest {
        after: 0,
        follow: true,
    };
    let fast_a = source.output(&worker.key, follow).await?;
    let fast_b = source.output(&worker.key, follow).await?;
    let slow = source.output(&worker.key, follow).await?;
    ensure!(
        source.shared_output_streams() == 1,
        "expected one shared stream, got {}",
        source.shared_output_streams()
    );
    let deadline = Instant::now() + WAIT;
    while upstream_output_streams(&up).await? != 1 {
        ensure!(
            Instant::now() < deadline,
            "expected the upstream to serve exactly one output stream for three readers, it \
             serves {}",
            upstream_output_streams(&up).await?
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    source
        .input(&worker.key, bytes::Bytes::from_static(b"go\n"))
        .await?;
    // The fast readers read everything while the slow one reads nothing.
    let (a, b) = tokio::join!(read_to_end(fast_a), read_to_end(fast_b));
    let (a, a_end) = a?;
    let (b, b_end) = b?;
    ensure!(a_end && b_end, "the fast readers did not get End");
    check_complete(&a, &expect).context("fast reader A")?;
    check_complete(&b, &expect).context("fast reader B")?;
    // The slow one fell out of the 1 MiB ring: it reads on from a stream of its own, and
    // still gets every chunk.
    let (s, s_end) = read_to_end(slow).await?;
    ensure!(s_end, "the slow reader did not get End");
    check_complete(&s, &expect).context("slow reader")?;
    let deadline = Instant::now() + WAIT;
    while source.shared_output_streams() != 0 || upstream_output_streams(&up).await? != 0 {
        ensure!(
            Instant::now() < deadline,
            "streams left open after every reader ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    source.remove(&worker.key).await?;
    source.shutdown(None).await;
    up.stop().await?;
    Ok(())
}

/// A fake upstream: answers each connection's request with the next script, and records
/// the request heads it got.
struct Fake {
    addr: std::net::SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    /// Each script is what to write after a `200` event-stream head (then close), for the
    /// connections in order; later connections get the last one.
    async fn start(scripts: Vec<String>) -> Result<Fake> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((conn, _)) = listener.accept().await {
                let script = scripts[n.min(scripts.len() - 1)].clone();
                n += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = serve_one(conn, &script, &seen).await;
                });
            }
        });
        Ok(Fake { addr, heads })
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn serve_one(mut conn: TcpStream, script: &str, seen: &Mutex<Vec<String>>) -> Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    seen.lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).to_lowercase());
    conn.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
    )
    .await?;
    conn.write_all(script.as_bytes()).await?;
    conn.flush().await?;
    // Hold the connection a moment, as a live stream would, then close it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

const REMOTE_ID: &str = "w_0123456789ABCDEFGHJKMNPQRS";

fn worker_json(state: &str) -> String {
    let exit = if state == "exited" { "0" } else { "null" };
    format!(
        r#"{{"id":"{REMOTE_ID}","runtime_id":"local","name":"fake","labels":{{}},"state":"{state}","exit_code":{exit},"reason":null,"created_at":"2026-01-01T00:00:00Z","started_at":null,"ended_at":null,"last_seen_at":null,"profile":"shell","args":[],"command":null}}"#
    )
}

fn snapshot(state: &str) -> String {
    let runtime = r#"{"id":"local","kind":"embedded","health":{"status":"ready","since":"2026-01-01T00:00:00Z","retry_at":null,"message":null},"capabilities":{"spawn":true,"input":true,"stop":true,"output":true,"remove":true},"workers":{},"diagnostics":[]}"#;
    format!(
        "{{\"runtimes\":[{runtime}],\"workers\":[{}]}}",
        worker_json(state)
    )
}

/// Waits until the source lists the one worker in `state`.
async fn wait_listed(source: &RemoteSource, state: WorkerState) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = source.list().await?;
        if list.len() == 1 && list[0].state == state {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "expected the worker {state}, the source lists {:?}",
            list.iter().map(|w| w.state).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_cannot_be_understood_is_never_skipped_the_link_starts_over() -> Result<()> {
    let first = format!(
        "retry: 1000\n\nid: c1\nevent: snapshot\ndata: {}\n\nid: c2\nevent: worker.upserted\ndata: {{\"worker\": 17}}\n\n",
        snapshot("running")
    );
    let second = format!(
        "retry: 1000\n\nid: d1\nevent: snapshot\ndata: {}\n\n",
        snapshot("exited")
    );
    let fake = Fake::start(vec![first, second]).await?;
    let source = remote_at(fake.addr, "backoff_base = \"10ms\"\nbackoff_cap = \"50ms\"")?;
    let mut events = source.events().await?;
    wait_listed(&source, WorkerState::Exited).await?;
    let heads = fake.heads();
    ensure!(heads.len() >= 2, "expected a reconnect, heads: {heads:?}");
    ensure!(
        heads[0].starts_with("get /v1/events?runtime=local ")
            && heads[1].starts_with("get /v1/events?runtime=local "),
        "{heads:?}"
    );
    ensure!(
        !heads[1].contains("last-event-id"),
        "after an event it could not understand, the source must not resume past it: {}",
        heads[1]
    );
    // The lifecycle stream: the first whole truth, then a second one; never a state the
    // broken event might have carried.
    let mut resyncs: Vec<Vec<WorkerState>> = Vec::new();
    while resyncs.len() < 2 || resyncs.last() != Some(&vec![WorkerState::Exited]) {
        match timeout(WAIT, events.recv())
            .await
            .context("no second Resync")?
        {
            Some(SourceEvent::Resync(list)) => {
                resyncs.push(list.iter().map(|w| w.state).collect::<Vec<_>>())
            }
            Some(SourceEvent::Upsert(w)) => ensure!(
                matches!(w.state, WorkerState::Unknown | WorkerState::Running),
                "unexpected upsert {}",
                w.state
            ),
            Some(_) => {}
            None => bail!("the lifecycle stream closed"),
        }
    }
    // Before the second snapshot: the first one's state, or `unknown` while the link was
    // down (the first Resync may come after the broken event was met).
    let (last, before) = resyncs.split_last().expect("two or more");
    ensure!(
        last == &vec![WorkerState::Exited]
            && before
                .iter()
                .all(|r| r == &vec![WorkerState::Running] || r == &vec![WorkerState::Unknown]),
        "expected the first snapshot's state (or unknown), then the second's: {resyncs:?}"
    );
    source.shutdown(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_resumes_from_its_cursor_and_an_unfinished_event_is_dropped() -> Result<()>
{
    // The first connection ends in the middle of an event (no blank line after it): that
    // event must not be applied, and the next request resumes from the last whole one.
    let first = format!(
        "retry: 1000\n\nid: c1\nevent: snapshot\ndata: {}\n\nid: c2\nevent: worker.upserted\ndata: {{\"worker\": {}}}\n",
        snapshot("running"),
        worker_json("exited")
    );
    let second = format!(
        "id: c3\nevent: worker.upserted\ndata: {{\"worker\": {}}}\r\n\r\n",
        worker_json("exited")
    );
    let fake = Fake::start(vec![first, second]).await?;
    let source = remote_at(fake.addr, "backoff_base = \"10ms\"\nbackoff_cap = \"50ms\"")?;
    let mut events = source.events().await?;
    let mut states = Vec::new();
    let deadline = Instant::now() + WAIT;
    while states.last() != Some(&WorkerState::Exited) {
        match tokio::time::timeout_at(deadline, events.recv())
            .await
            .context("the worker never showed exited")?
        {
            Some(SourceEvent::Resync(list)) => states.extend(list.iter().map(|w| w.state)),
            Some(SourceEvent::Upsert(w)) => states.push(w.state),
            Some(_) => {}
            None => bail!("the lifecycle stream closed"),
        }
    }
    let heads = fake.heads();
    ensure!(heads.len() >= 2, "{heads:?}");
    ensure!(
        heads[1].contains("last-event-id: c1\r\n"),
        "expected the resume from the last whole event c1: {}",
        heads[1]
    );
    // running, unknown while the link was down, back to running (or straight on), exited.
    ensure!(states.first() == Some(&WorkerState::Running), "{states:?}");
    let listed: BTreeMap<_, _> = source
        .list()
        .await?
        .into_iter()
        .map(|w| (w.name.clone(), w.state))
        .collect();
    ensure!(
        listed.get(&Some("fake".to_string())) == Some(&WorkerState::Exited),
        "{listed:?}"
    );
    source.shutdown(None).await;
    Ok(())
}
