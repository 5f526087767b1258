//! # remote-bench
//!
//! Measures the latency one `remote` hop adds. In one process it starts two `roster`
//! servers on `127.0.0.1:0`: an upstream with one `embedded` runtime `local`, and a
//! downstream whose one runtime `far` is `source = "remote"`, following `local` of the
//! upstream. One worker (`while read l; do echo "$l"; done`) is started through the
//! downstream, and then, interleaved so that machine noise hits both paths alike:
//!
//! 1. `GET /v1/workers/{id}`: `--requests` requests to the upstream (the embedded path,
//!    with the worker's upstream id) and as many to the downstream (the remote path, with
//!    the downstream's id), each over one kept-alive HTTP/1.1 connection.
//! 2. Output chunks: `/v1/workers/{id}/output` streams open on both servers; each of
//!    `--rounds` rounds posts one line with a unique token to the *upstream*'s input
//!    endpoint (the same input path for both) and times, per stream, from sending the input
//!    until the `output` event holding the token arrives.
//!
//! It prints p50 / p90 / p99 / max of both paths, the added latency (remote − embedded)
//! at p50 and p99, and the ratio at p50, with the core count and the build profile.
//!
//! Run it in release, for numbers worth reading:
//!
//! ```sh
//! cargo run --release -p remote-bench
//! cargo run --release -p remote-bench -- --requests 2000 --rounds 500
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use server_bin::{Config, ServeOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long any single step may take before the benchmark gives up.
const WAIT: Duration = Duration::from_secs(15);

/// Requests per server, and output rounds, run before measuring.
const WARMUP_REQUESTS: usize = 200;
const WARMUP_ROUNDS: usize = 20;

/// The worker: echoes each line of its stdin.
const ECHO: &str = r#"while read l; do echo "$l"; done"#;

/// Measures the latency one `remote` hop adds (see the crate's documentation).
#[derive(Debug, Parser)]
#[command(name = "remote-bench")]
struct Args {
    /// `GET /v1/workers/{id}` requests per path (embedded and remote).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    requests: u32,
    /// Output rounds (one input line, timed on both output streams).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;

    // The upstream: one embedded runtime `local`, profile `shell`, commands allowed.
    let upstream = Server::start(Config::default_embedded(), &dir.path().join("upstream")).await?;
    // The downstream: one runtime `far`, following `local` of the upstream.
    let downstream_config = Config::parse(&format!(
        "[[runtimes]]\nname = \"far\"\nsource = \"remote\"\nurl = \"http://{}\"\nremote_runtime = \"local\"\n",
        upstream.addr
    ))
    .map_err(|e| anyhow::anyhow!("the downstream's config: {e}"))?;
    let downstream = Server::start(downstream_config, &dir.path().join("downstream")).await?;

    let outcome = bench(&args, &upstream, &downstream).await;

    // Shut down even when the benchmark failed: the downstream first (it follows the
    // upstream), then the upstream, which stops what is left of its workers.
    let down_stop = downstream.stop().await;
    let up_stop = upstream.stop().await;
    let report = outcome?;
    down_stop.context("stopping the downstream")?;
    up_stop.context("stopping the upstream")?;
    println!("{report}");
    println!("both servers shut down gracefully");
    Ok(())
}

/// Everything between starting the servers and stopping them; returns the report.
async fn bench(args: &Args, upstream: &Server, downstream: &Server) -> Result<String> {
    let mut up = Client::connect(upstream.addr).await?;
    let mut down = Client::connect(downstream.addr).await?;

    // The downstream is ready once its remote runtime has answered.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = down.request(Method::GET, "/readyz", None).await?;
        if status == StatusCode::OK {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the downstream never became ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The worker, started through the downstream.
    let spawn = json!({ "profile": "shell", "args": [ECHO], "name": "remote-bench" });
    let (status, body) = down
        .request(
            Method::POST,
            "/v1/runtimes/far/workers",
            Some(&spawn.to_string()),
        )
        .await?;
    ensure!(
        status == StatusCode::CREATED,
        "spawn through the downstream answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let down_id = id_of(&serde_json::from_slice(&body)?)?;
    let up_id = upstream_id(&mut up).await?;

    let result = measure(
        args, &mut up, &mut down, upstream, downstream, &up_id, &down_id,
    )
    .await;

    // Stop the worker (through the downstream, as it was started) and wait until the
    // upstream has it terminal.
    let stop = down
        .request(
            Method::POST,
            &format!("/v1/workers/{down_id}/stop"),
            Some(r#"{"grace_ms": 2000}"#),
        )
        .await;
    let stopped = match stop {
        Ok((StatusCode::ACCEPTED, _)) => wait_terminal(&mut up, &up_id).await,
        Ok((status, body)) => Err(anyhow::anyhow!(
            "stop answered {status}: {}",
            String::from_utf8_lossy(&body)
        )),
        Err(e) => Err(e),
    };
    let report = result?;
    stopped.context("stopping the worker")?;
    Ok(report)
}

/// Both measurements; returns the report.
async fn measure(
    args: &Args,
    up: &mut Client,
    down: &mut Client,
    upstream: &Server,
    downstream: &Server,
    up_id: &str,
    down_id: &str,
) -> Result<String> {
    let up_path = format!("/v1/workers/{up_id}");
    let down_path = format!("/v1/workers/{down_id}");

    // 1. GET /v1/workers/{id}, interleaved; who goes first alternates each round.
    for _ in 0..WARMUP_REQUESTS {
        timed_get(up, &up_path).await?;
        timed_get(down, &down_path).await?;
    }
    let (requests, rounds) = (args.requests as usize, args.rounds as usize);
    let mut get_up = Vec::with_capacity(requests);
    let mut get_down = Vec::with_capacity(requests);
    for i in 0..requests {
        if i % 2 == 0 {
            get_up.push(timed_get(up, &up_path).await?);
            get_down.push(timed_get(down, &down_path).await?);
        } else {
            get_down.push(timed_get(down, &down_path).await?);
            get_up.push(timed_get(up, &up_path).await?);
        }
    }

    // 2. Output chunks: both streams open, input through the upstream.
    let mut up_stream = OutputStream::open(upstream.addr, up_id).await?;
    let mut down_stream = OutputStream::open(downstream.addr, down_id).await?;
    let input_path = format!("/v1/workers/{up_id}/input");
    let mut out_up = Vec::with_capacity(rounds);
    let mut out_down = Vec::with_capacity(rounds);
    for round in 0..WARMUP_ROUNDS + rounds {
        let token = format!("rb{round:07}z");
        let body = json!({ "data": format!("{token}\n") }).to_string();
        let sent = Instant::now();
        let (status, answer) = up.request(Method::POST, &input_path, Some(&body)).await?;
        ensure!(
            status == StatusCode::ACCEPTED,
            "input answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        let at_up = up_stream
            .wait_for(&token)
            .await
            .context("embedded output")?;
        let at_down = down_stream
            .wait_for(&token)
            .await
            .context("remote output")?;
        if round >= WARMUP_ROUNDS {
            out_up.push(at_up.saturating_duration_since(sent));
            out_down.push(at_down.saturating_duration_since(sent));
        }
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let build = if cfg!(debug_assertions) {
        "debug build (numbers not representative; use --release)"
    } else {
        "release build"
    };
    let mut report = String::new();
    report += &format!(
        "remote-bench: the latency one remote hop adds; one process, one run, loopback\n\
         machine: {cores} cores; {build}\n\
         embedded = the upstream's embedded runtime `local`; remote = the downstream's runtime \
         `far` (source = \"remote\") following it\n\n"
    );
    report += &table(
        &format!(
            "GET /v1/workers/{{id}}: {} requests per path, interleaved, one kept-alive connection \
             per server (after {WARMUP_REQUESTS} warm-up each)",
            args.requests
        ),
        get_up,
        get_down,
    );
    report += "  note: each server answers this GET from its registry's own view of the worker; \
               the downstream does not ask the upstream, so the hop is not on this path\n\n";
    report += &table(
        &format!(
            "output chunk: input POSTed to the upstream -> `output` event with the token, {} \
             rounds, both streams open at once (after {WARMUP_ROUNDS} warm-up)",
            args.rounds
        ),
        out_up,
        out_down,
    );
    Ok(report)
}

/// The id of the only worker of the upstream's runtime `local`.
async fn upstream_id(up: &mut Client) -> Result<String> {
    let (status, body) = up
        .request(Method::GET, "/v1/workers?runtime=local", None)
        .await?;
    ensure!(status == StatusCode::OK, "listing answered {status}");
    let list: Value = serde_json::from_slice(&body)?;
    let workers = list["workers"].as_array().context("a worker list")?;
    ensure!(
        workers.len() == 1,
        "the upstream should have exactly one worker, it has {}",
        workers.len()
    );
    id_of(&workers[0])
}

fn id_of(worker: &Value) -> Result<String> {
    Ok(worker["id"].as_str().context("a worker id")?.to_string())
}

/// Polls the worker on the upstream until it is no longer live.
async fn wait_terminal(up: &mut Client, id: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = up
            .request(Method::GET, &format!("/v1/workers/{id}"), None)
            .await?;
        ensure!(status == StatusCode::OK, "GET worker answered {status}");
        let worker: Value = serde_json::from_slice(&body)?;
        let state = worker["state"].as_str().unwrap_or_default();
        if !matches!(state, "pending" | "starting" | "running" | "stopping") {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the worker did not stop: {worker}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One `GET` and its whole body, timed.
async fn timed_get(client: &mut Client, path: &str) -> Result<Duration> {
    let start = Instant::now();
    let (status, _) = client.request(Method::GET, path, None).await?;
    let took = start.elapsed();
    ensure!(status == StatusCode::OK, "GET {path} answered {status}");
    Ok(took)
}

/// A server running in this process, with its stop switch.
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
}

impl Server {
    async fn start(mut config: Config, state_dir: &Path) -> Result<Server> {
        config.server.state_dir = state_dir.to_path_buf().into();
        let registry =
            server_bin::build_registry(&config, &server_bin::default_factories()).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let options = ServeOptions::from_config(&config.server, Vec::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server_bin::serve_with(
            listener,
            registry,
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Server { addr, stop, task })
    }

    /// Shuts the server down as SIGTERM would, and waits for it.
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the server did not stop in 30 s")??
    }
}

/// One kept-alive HTTP/1.1 connection.
struct Client {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Result<Client> {
        let (sender, host) = handshake(addr).await?;
        Ok(Client { sender, host })
    }

    /// One request; `body` goes as JSON. Returns the status and the whole body.
    async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<(StatusCode, Bytes)> {
        let req = build_request(method, path, &self.host, body)?;
        let exchange = async {
            self.sender.ready().await?;
            let resp = self.sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(WAIT, exchange)
            .await
            .with_context(|| format!("{path} timed out"))?
    }
}

async fn handshake(addr: SocketAddr) -> Result<(SendRequest<Full<Bytes>>, String)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, format!("127.0.0.1:{}", addr.port())))
}

fn build_request(
    method: Method,
    path: &str,
    host: &str,
    body: Option<&str>,
) -> Result<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    Ok(req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?)
}

/// A worker's output stream, read by a task of its own that stamps each frame the moment
/// it arrives.
struct OutputStream {
    events: mpsc::UnboundedReceiver<(String, Value, Instant)>,
    /// Output text received and not yet matched to a token.
    text: String,
    reader: JoinHandle<()>,
}

impl OutputStream {
    async fn open(addr: SocketAddr, id: &str) -> Result<OutputStream> {
        let (mut sender, host) = handshake(addr).await?;
        let path = format!("/v1/workers/{id}/output");
        let req = build_request(Method::GET, &path, &host, None)?;
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .context("opening the output stream timed out")??;
        ensure!(
            resp.status() == StatusCode::OK,
            "{path} answered {}",
            resp.status()
        );
        let (tx, mut events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_sse(resp.into_body(), tx, sender));
        // The stream opens with the worker's `state`.
        let first = tokio::time::timeout(WAIT, events.recv())
            .await
            .context("no first event")?
            .context("the stream ended at once")?;
        ensure!(first.0 == "state", "the first event was {:?}", first.0);
        Ok(OutputStream {
            events,
            text: String::new(),
            reader,
        })
    }

    /// Waits for the `output` event that completes `token`; returns when it arrived.
    async fn wait_for(&mut self, token: &str) -> Result<Instant> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (event, data, at) = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .with_context(|| format!("no output with {token} in time"))?
                .context("the stream ended")?;
            match event.as_str() {
                "output" => {
                    self.text += data["data"].as_str().unwrap_or_default();
                    if let Some(i) = self.text.find(token) {
                        self.text.drain(..i + token.len());
                        return Ok(at);
                    }
                }
                "state" => {}
                "gap" | "end" | "shutdown" | "reset" => bail!("unexpected {event}: {data}"),
                other => bail!("unknown event {other}: {data}"),
            }
        }
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads an SSE body, sending each event with the time its last frame arrived. `_conn`
/// keeps the connection open for as long as the stream is read.
async fn read_sse(
    mut body: Incoming,
    tx: mpsc::UnboundedSender<(String, Value, Instant)>,
    _conn: SendRequest<Full<Bytes>>,
) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let at = Instant::now();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..pos + 2).collect();
            let block = String::from_utf8_lossy(&block[..pos]);
            let (mut event, mut value) = (None, Value::Null);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    value = serde_json::from_str(v).unwrap_or(Value::Null);
                }
            }
            if let Some(event) = event {
                if tx.send((event, value, at)).is_err() {
                    return;
                }
            }
        }
    }
}

/// p50 / p90 / p99 / max of both paths, and what the hop adds.
fn table(title: &str, mut embedded: Vec<Duration>, mut remote: Vec<Duration>) -> String {
    embedded.sort_unstable();
    remote.sort_unstable();
    let row = |name: &str, v: &[Duration]| {
        format!(
            "  {name:<10}{:>12}{:>12}{:>12}{:>12}\n",
            us(pct(v, 50.0)),
            us(pct(v, 90.0)),
            us(pct(v, 99.0)),
            us(v[v.len() - 1]),
        )
    };
    let (e50, r50) = (pct(&embedded, 50.0), pct(&remote, 50.0));
    let (e99, r99) = (pct(&embedded, 99.0), pct(&remote, 99.0));
    let mut out = format!("{title}\n");
    out += &format!(
        "  {:<10}{:>12}{:>12}{:>12}{:>12}\n",
        "", "p50", "p90", "p99", "max"
    );
    out += &row("embedded", &embedded);
    out += &row("remote", &remote);
    out += &format!(
        "  added by the hop: {} at p50, {} at p99; remote/embedded at p50: {:.2}x\n",
        signed_us(r50, e50),
        signed_us(r99, e99),
        r50.as_secs_f64() / e50.as_secs_f64().max(1e-9),
    );
    out
}

/// The nearest-rank percentile of sorted, non-empty samples.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn signed_us(a: Duration, b: Duration) -> String {
    format!("{:+.1} µs", (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
}
