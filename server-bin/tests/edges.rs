//! Edge cases of the HTTP server: held connections, shutdown of streams and of sources,
//! cursors on the final event, extreme config values, requests that straddle shutdown.
mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use common::{shell_source, Fake, TestServer, WAIT};
use http::StatusCode;
use registry_core::{Registry, RegistryConfig};
use server_bin::config::Config;
use server_bin::ServeOptions;
use source_embedded::EmbeddedSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// A source that observes workers it does not own
// ---------------------------------------------------------------------------------------

/// The embedded source for spawning and the lifecycle stream, but with the output and
/// shutdown of a source that only observes its workers (as `remote` and `local` do): its
/// output streams end when it lets go at shutdown, without `End`. With `hang`, its
/// shutdown never returns (an upstream that does not answer).
fn observer(inner: EmbeddedSource, hang: bool) -> Fake<EmbeddedSource> {
    let source = Fake::new(inner).with_held_output();
    if hang {
        source.with_hanging_shutdown()
    } else {
        source
    }
}

/// A server whose only runtime, `observed`, is an [`observer`], with one running worker.
async fn start_observer(hang: bool, options: ServeOptions) -> Result<(TestServer, String)> {
    let source = Arc::new(observer(shell_source("")?, hang));
    let server = TestServer::start_with_source("observed", "observer", source, options).await?;
    let resp = server
        .post(
            "/v1/runtimes/observed/workers",
            r#"{"profile": "shell", "args": ["exec sleep 30"]}"#,
        )
        .await?;
    if resp.status != StatusCode::CREATED {
        bail!("spawn answered {}: {}", resp.status, resp.text());
    }
    let id = resp.json()?["id"].as_str().context("an id")?.to_string();
    Ok((server, id))
}

// ---------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------

/// The output stream of a worker whose source lets go at shutdown (its stream closes
/// without `End`) must still end with `event: shutdown`, as every stream does.
#[tokio::test]
async fn output_stream_of_an_observed_worker_ends_with_shutdown() -> Result<()> {
    let (server, id) = start_observer(false, ServeOptions::default()).await?;
    let mut output = server.sse(&format!("/v1/workers/{id}/output"), &[]).await?;
    assert_eq!(output.next_event().await?.event, "state");

    server.stop().await?;

    let rest = output.rest(WAIT).await?;
    let names: Vec<&str> = rest.iter().map(|e| e.event.as_str()).collect();
    // The observer never sends `End`: only the server's own `shutdown` can close this stream.
    assert_eq!(
        names.last(),
        Some(&"shutdown"),
        "the output stream closed without `shutdown`: {names:?}"
    );
    Ok(())
}

/// A source whose shutdown does not return must not keep `roster` from exiting: SIGTERM
/// has to end the process. The server bounds the registry's shutdown by `shutdown_grace`
/// plus 10 s and then drains connections for at most 5 s; the bound here adds 10 s more for
/// a slow machine (the registry itself gives up sooner, after about 7.5 s).
#[tokio::test]
async fn shutdown_finishes_although_a_source_never_finishes_its_own() -> Result<()> {
    let grace = Duration::from_millis(500);
    let options = ServeOptions {
        shutdown_grace: grace,
        ..Default::default()
    };
    let (server, _id) = start_observer(true, options).await?;
    let bound = grace + Duration::from_secs(10 + 5 + 10);
    let stopped = tokio::time::timeout(bound, server.stop()).await;
    assert!(
        stopped.is_ok(),
        "the server was still shutting down {bound:?} after the signal (shutdown_grace {grace:?})"
    );
    Ok(())
}

/// A client that resumed `/v1/events` at the head and saw nothing new gets a final
/// `shutdown` whose `id` is still its cursor. An empty `id:` line clears a browser's
/// last event id, so its reconnect would not resume.
#[tokio::test]
async fn events_shutdown_after_an_empty_replay_keeps_the_cursor() -> Result<()> {
    let server = TestServer::start().await?;
    let mut first = server.sse("/v1/events", &[]).await?;
    let snapshot = first.next_event().await?;
    assert_eq!(snapshot.event, "snapshot");
    let cursor = snapshot.id.context("the snapshot has an id")?;
    drop(first);

    // The stream's head arrives once its subscription is made: shutting down now ends a
    // stream that has replayed nothing.
    let mut resumed = server
        .sse("/v1/events", &[("last-event-id", cursor.as_str())])
        .await?;
    server.stop().await?;
    let rest = resumed.rest(WAIT).await?;
    let last = rest.last().context("the stream sent a final event")?;
    assert_eq!(last.event, "shutdown", "{rest:?}");
    assert_eq!(
        last.id.as_deref(),
        Some(cursor.as_str()),
        "the final event must carry the resume point, not an empty id"
    );
    Ok(())
}

/// A spawn whose request was accepted before shutdown but whose body arrives after it is
/// refused as shutdown refuses every change: `503 runtime_unavailable` (retryable), not a
/// `409 conflict` from the stopped source.
#[tokio::test]
async fn a_spawn_body_that_arrives_during_shutdown_is_503() -> Result<()> {
    let server = TestServer::start().await?;
    let addr = server.addr;
    let body = r#"{"profile": "shell", "args": ["exit 0"]}"#;
    let (head, tail) = body.split_at(10);
    let mut conn = TcpStream::connect(addr).await?;
    conn.write_all(
        format!(
            "POST /v1/runtimes/local/workers HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\n\r\n{head}",
            addr.port(),
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    // `100 Continue` goes out once the handler reads the body: it now waits for the rest.
    let mut interim = Vec::new();
    let mut buf = [0u8; 256];
    while !interim.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, conn.read(&mut buf))
            .await
            .context("no `100 Continue` in time")??;
        anyhow::ensure!(n > 0, "closed before `100 Continue`");
        interim.extend_from_slice(&buf[..n]);
    }
    let interim = String::from_utf8_lossy(&interim).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100 "), "{interim}");
    // A subscription of the registry ends when the registry has shut down.
    let mut registry_events = server.registry.subscribe(None, None);
    let stopping = tokio::spawn(server.stop());
    tokio::time::timeout(WAIT, async {
        while registry_events.next().await.is_some() {}
    })
    .await
    .context("the registry did not shut down")?;
    // The connection is drained for 5 s: the rest of the body arrives within that.
    conn.write_all(tail.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    stopping.await??;
    let status = answer.lines().next().unwrap_or_default().to_string();
    assert!(
        status.contains(" 503 "),
        "a spawn during shutdown was answered {status:?}: {answer}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Held connections
// ---------------------------------------------------------------------------------------

/// A body that never arrives must not hold a connection (one of at most 1,024) and its
/// handler for ever: after `body_timeout` the request is answered `400` and let go.
#[tokio::test]
async fn a_request_body_that_never_arrives_does_not_hold_the_connection_for_ever() -> Result<()> {
    let options = ServeOptions {
        body_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let server = TestServer::start_with(common::config(""), options).await?;
    let host = format!("127.0.0.1:{}", server.addr.port());
    // A spawn whose body stops after one byte of the 100 announced.
    let mut stalled = TcpStream::connect(server.addr).await?;
    stalled
        .write_all(
            format!(
                "POST /v1/runtimes/local/workers HTTP/1.1\r\nHost: {host}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stalled.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => bail!("reading the answer: {e}"),
            Err(_) => bail!("a request whose body never arrives is still held"),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // Nothing was spawned from half a body.
    let list = server.get("/v1/workers").await?.json()?;
    assert_eq!(list["workers"].as_array().map(Vec::len), Some(0), "{list}");
    server.stop().await?;
    Ok(())
}

/// A stream client that stops reading altogether holds nothing for long: once a frame has
/// waited `stream_stall_timeout` for it, its stream ends and its connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_client_that_stops_reading_is_let_go() -> Result<()> {
    let options = ServeOptions {
        stream_stall_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let server = TestServer::start_with(common::config(""), options).await?;
    let host = format!("127.0.0.1:{}", server.addr.port());
    // A small, fixed receive buffer: loopback autotuning may otherwise grow it (up to
    // `tcp_rmem`'s maximum, 32 MiB on some machines) until it holds most of the events
    // below.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(16 << 10)?;
    let mut idle = socket.connect(server.addr).await?;
    idle.write_all(format!("GET /v1/events HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    // Big events fill the socket buffers and the stream's own queue: each worker carries
    // 200 KiB of arguments, and each of its events carries them again (some 24 MiB in all,
    // against the client's 16 KiB and the server's send buffer, 4 MiB at most by default).
    let arg = "x".repeat(100 << 10);
    for _ in 0..40 {
        let body =
            serde_json::json!({ "profile": "shell", "args": ["true", arg, arg] }).to_string();
        let resp = server.post("/v1/runtimes/local/workers", &body).await?;
        assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    }
    // The client still reads nothing: the server must let it go by itself, and its stream
    // stops being counted. (Reading before that would unblock the stream, and the test
    // would depend on the spawns outlasting the stall timeout.)
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = server.get("/metrics").await?.text();
        if metrics.contains("roster_sse_clients{stream=\"events\"} 0") {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the stream of a client that stopped reading is still counted:\n{metrics}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And its connection is closed: reading what was sent reaches the end.
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, idle.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => bail!(
                "the connection of a client that stopped reading is still open; it read {got} \
                 bytes"
            ),
        }
    }
    server.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Config edge cases
// ---------------------------------------------------------------------------------------

/// An `sse_ping` beyond what a timer can hold is refused by the config, and one given to
/// the library directly is kept within bounds: streams work either way.
#[tokio::test]
async fn a_huge_sse_ping_is_refused_by_the_config_and_harmless_in_the_library() -> Result<()> {
    let err = Config::parse("[server]\nsse_ping = \"300000000000y\"\n").unwrap_err();
    assert_eq!(err.line, Some(2), "{err}");
    assert!(err.message.contains("sse_ping"), "{err}");
    let options = ServeOptions {
        sse_ping: Duration::MAX,
        ..Default::default()
    };
    let server = TestServer::start_with(common::config(""), options).await?;
    let mut events = server.sse("/v1/events", &[]).await?;
    let first = events
        .next_event_within(WAIT)
        .await?
        .context("the event stream closed before its snapshot")?;
    assert_eq!(first.event, "snapshot");
    drop(events);
    server.stop().await?;
    Ok(())
}

/// The config calls an IPv4-mapped loopback address loopback (no tokens needed); the
/// server must agree rather than refuse at start what `check-config` passed.
#[tokio::test]
async fn a_mapped_loopback_listen_address_is_loopback_for_the_server_too() -> Result<()> {
    let config = Config::parse("[server]\nlisten = \"[::ffff:127.0.0.1]:0\"\n")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    config
        .check_listen(&[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Ok(listener) = TcpListener::bind(config.server.listen).await else {
        // No IPv6 here: nothing to compare.
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let registry = Registry::new(RegistryConfig::new(dir.path().join("state")))?;
    let served =
        server_bin::serve_with(listener, registry, ServeOptions::default(), async {}).await;
    assert!(
        served.is_ok(),
        "check_listen passed, serve_with refused: {served:?}"
    );
    Ok(())
}
