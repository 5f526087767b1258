//! Why a remote runtime is down, as an operator finds it out: the runtime's health message
//! says which failure it is (refused, DNS, not HTTP, timeout, 401, 403, wrong
//! `remote_runtime`) without the address, and the log names the runtime and the address in
//! one warning per change, not one per retry.
//!
//! Every remote here is on loopback: a closed port, a listener that never answers, one that
//! answers with a TLS alert, and real upstream rosters that refuse. The DNS case uses a name
//! in the reserved `.invalid` domain whose first label is 64 bytes, one more than DNS allows:
//! the resolver refuses it before asking any server, so the test sends nothing off the
//! machine.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use server_bin::{Config, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use common::{config, eventually, eventually_seen, TestServer, WAIT};
use server_bin::config::{LoadedToken, Scope};

/// What the sources logged in this test binary (one subscriber for all tests; each test
/// has a runtime name of its own to find its lines by).
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,source_remote=debug")
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .try_init();
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines about runtime `name`.
fn lines_of(name: &str) -> Vec<String> {
    let buf = log().lock().unwrap_or_else(|e| e.into_inner());
    let needle = format!("runtime={name} ");
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// A downstream roster with one remote runtime `name` reaching `url`, with fast retries.
async fn downstream(name: &str, url: &str, extra: &str) -> Result<TestServer> {
    downstream_of(name, url, "local", extra).await
}

/// [`downstream`], following the upstream's runtime `remote_runtime`.
async fn downstream_of(
    name: &str,
    url: &str,
    remote_runtime: &str,
    extra: &str,
) -> Result<TestServer> {
    log();
    let text = format!(
        r#"
[[runtimes]]
name = "{name}"
source = "remote"
url = "{url}"
remote_runtime = "{remote_runtime}"
backoff_base = "20ms"
backoff_cap = "100ms"
connect_timeout = "2s"
request_timeout = "1s"
{extra}
"#
    );
    let config = Config::parse(&text)?;
    TestServer::start_with(config, ServeOptions::default()).await
}

/// Waits until runtime `name` is unavailable with a message containing `expected`, then
/// checks what a client sees everywhere (the runtime, the list, the event snapshot, a spawn
/// answer) for `secrets`, and that the log warned once, naming the runtime and
/// `address`, while several retries failed the same way.
async fn assert_down_because(
    down: &TestServer,
    name: &str,
    expected: &str,
    address: &str,
    secrets: &[String],
) -> Result<Value> {
    let path = format!("/v1/runtimes/{name}");
    let runtime = eventually_seen(&format!("{name} unavailable: {expected}"), WAIT, || async {
        let view = down.get(&path).await?.json()?;
        let msg = view["health"]["message"].as_str().unwrap_or("").to_string();
        if view["health"]["status"] == "unavailable" && msg.contains(expected) {
            Ok(Ok(view))
        } else {
            Ok(Err(view.to_string()))
        }
    })
    .await?;

    // Retries fail the same way: debug lines, and still one warning.
    eventually(&format!("{name}: retries in the log"), WAIT, || async {
        let still = lines_of(name)
            .iter()
            .filter(|l| l.contains("still unavailable"))
            .count();
        Ok((still >= 3).then_some(()))
    })
    .await?;
    let lines = lines_of(name);
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" WARN ") && l.contains("remote runtime unavailable"))
        .collect();
    ensure!(
        warnings.len() == 1,
        "{name}: one warning for one state, got {}:\n{}",
        warnings.len(),
        lines.join("\n")
    );
    ensure!(
        warnings[0].contains(expected) && warnings[0].contains(address),
        "{name}: the warning names the failure and the address {address}: {}",
        warnings[0]
    );

    // Everything a client can read about it.
    down.get("/v1/runtimes").await?;
    let mut events = down.sse("/v1/events", &[]).await?;
    let snapshot = events.next_event().await?;
    ensure!(snapshot.event == "snapshot", "{snapshot:?}");
    drop(events);
    let spawn = down
        .post(
            &format!("/v1/runtimes/{name}/workers"),
            r#"{"profile": "shell", "args": ["true"]}"#,
        )
        .await?;
    ensure!(
        spawn.status == 503,
        "spawn on a down remote: {:?}",
        spawn.body
    );
    down.seen().assert_free_of(secrets)?;
    Ok(runtime)
}

/// The address of a port on loopback that nothing listens on (bound, then closed).
async fn closed_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    drop(listener);
    Ok(addr)
}

/// Serves `answer` on 127.0.0.1:0: each connection is handed to it.
fn listener_task<F, Fut>(listener: TcpListener, answer: F) -> JoinHandle<()>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream));
        }
    })
}

fn secrets_of(addr: SocketAddr) -> Vec<String> {
    vec![addr.to_string(), format!(":{}", addr.port())]
}

#[tokio::test]
async fn a_closed_port_reads_refused() -> Result<()> {
    let addr = closed_port().await?;
    let down = downstream("far-refused", &format!("http://{addr}"), "").await?;
    assert_down_because(
        &down,
        "far-refused",
        "refused the connection",
        &addr.to_string(),
        &secrets_of(addr),
    )
    .await?;
    down.stop().await?;
    Ok(())
}

#[tokio::test]
async fn an_unresolvable_name_reads_dns_failure() -> Result<()> {
    let label = "n".repeat(64);
    let down = downstream("far-dns", &format!("http://{label}.invalid:7411"), "").await?;
    assert_down_because(
        &down,
        "far-dns",
        "could not be resolved (DNS failure)",
        &format!("{label}.invalid:7411"),
        &[label.clone(), ":7411".to_string()],
    )
    .await?;
    down.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_listener_that_never_answers_reads_timeout() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    let task = listener_task(listener, move |stream| {
        // Accepted and held open, never a byte back.
        keep.lock().unwrap_or_else(|e| e.into_inner()).push(stream);
        async {}
    });
    let down = downstream("far-silent", &format!("http://{addr}"), "").await?;
    assert_down_because(
        &down,
        "far-silent",
        "did not answer within `request_timeout`",
        &addr.to_string(),
        &secrets_of(addr),
    )
    .await?;
    down.stop().await?;
    task.abort();
    Ok(())
}

#[tokio::test]
async fn a_tls_port_reads_not_plain_http() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = listener_task(listener, |mut stream| async move {
        // What a TLS server says to a plain-HTTP client: a fatal alert, then it hangs up.
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf).await;
        let _ = stream
            .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46])
            .await;
        let _ = stream.shutdown().await;
    });
    let down = downstream("far-tls", &format!("http://{addr}"), "").await?;
    assert_down_because(
        &down,
        "far-tls",
        "did not answer in plain HTTP",
        &addr.to_string(),
        &secrets_of(addr),
    )
    .await?;
    down.stop().await?;
    task.abort();
    Ok(())
}

/// An upstream roster with one `operate` token.
async fn upstream_with_token(secret: &str) -> Result<TestServer> {
    let options = ServeOptions {
        tokens: vec![LoadedToken {
            name: "downstream".into(),
            scope: Scope::Operate,
            secret: secret.to_string().into(),
        }],
        ..Default::default()
    };
    TestServer::start_with(config(""), options).await
}

#[tokio::test]
async fn a_wrong_token_reads_401_and_names_the_token_setting() -> Result<()> {
    let up = upstream_with_token("the-right-token-a81c").await?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("far.token");
    std::fs::File::create(&token_file)?.write_all(b"a-wrong-token-77e2\n")?;
    let down = downstream(
        "far-token",
        &format!("http://{}", up.addr),
        &format!("token_file = {:?}", token_file.to_str().context("UTF-8")?),
    )
    .await?;
    let mut secrets = secrets_of(up.addr);
    secrets.push("a-wrong-token-77e2".into());
    secrets.push(token_file.display().to_string());
    assert_down_because(
        &down,
        "far-token",
        "refused this registry's token (401 unauthorized)",
        &up.addr.to_string(),
        &secrets,
    )
    .await?;
    down.stop().await?;
    up.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_host_the_upstream_refuses_reads_403() -> Result<()> {
    let up = TestServer::start().await?;
    // `127.1` is 127.0.0.1 to the resolver (no DNS asked), but no loopback name to the
    // upstream's Host check, so it answers 403.
    let url = format!("http://127.1:{}", up.addr.port());
    let down = downstream("far-host", &url, "").await?;
    assert_down_because(
        &down,
        "far-host",
        "refused this registry (403 forbidden)",
        &format!("127.1:{}", up.addr.port()),
        &[
            format!("127.1:{}", up.addr.port()),
            format!(":{}", up.addr.port()),
        ],
    )
    .await?;
    down.stop().await?;
    up.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_remote_runtime_reads_no_such_runtime() -> Result<()> {
    let up = TestServer::start().await?;
    let down = downstream_of(
        "far-name",
        &format!("http://{}", up.addr),
        "gpu-nowhere",
        "",
    )
    .await?;
    let mut secrets = secrets_of(up.addr);
    secrets.push("gpu-nowhere".into());
    assert_down_because(
        &down,
        "far-name",
        "no runtime of the configured `remote_runtime` name",
        &up.addr.to_string(),
        &secrets,
    )
    .await?;
    down.stop().await?;
    up.stop().await?;
    Ok(())
}
