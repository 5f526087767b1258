//! What every scenario uses: an HTTP/1.1 client, an SSE parser, a Roster daemon in a child
//! process, RSS readings, free loopback ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long any single step may take before a scenario gives up.
pub const WAIT: Duration = Duration::from_secs(60);

/// One kept-alive HTTP/1.1 connection to a loopback server.
#[derive(Debug)]
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    addr: SocketAddr,
}

impl Client {
    /// Connects to `addr` (loopback only).
    pub async fn connect(addr: SocketAddr) -> Result<Client> {
        ensure!(addr.ip().is_loopback(), "the bench only talks to loopback");
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client {
            sender,
            host: format!("127.0.0.1:{}", addr.port()),
            addr,
        })
    }

    /// A request with a JSON body (or none); returns the status and the whole body.
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<(StatusCode, Bytes)> {
        self.request(method, path, body.map(|b| ("application/json", b)), &[])
            .await
    }

    /// One request; returns the status and the whole body.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<(&str, &str)>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes)> {
        // The server closes a kept-alive connection that was idle for long: open a new one.
        if self.sender.is_closed() {
            *self = Client::connect(self.addr).await?;
        }
        let req = self.build(method, path, body, headers)?;
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

    /// Opens a streaming GET (SSE); the response body is read by the caller.
    pub async fn stream(
        mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Incoming, SendRequest<Full<Bytes>>)> {
        let req = self.build(Method::GET, path, None, headers)?;
        let resp = tokio::time::timeout(WAIT, self.sender.send_request(req))
            .await
            .with_context(|| format!("opening {path} timed out"))??;
        ensure!(
            resp.status() == StatusCode::OK,
            "{path} answered {}",
            resp.status()
        );
        Ok((resp.into_body(), self.sender))
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, &str)>,
        headers: &[(&str, &str)],
    ) -> Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some((content_type, _)) = body {
            req = req.header("content-type", content_type);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let bytes = Bytes::from(body.map_or(String::new(), |(_, b)| b.to_owned()));
        Ok(req.body(Full::new(bytes))?)
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    /// `id:` (the cursor), if any.
    pub id: Option<String>,
    /// `event:`.
    pub event: String,
    /// `data:` (one line of JSON for Roster).
    pub data: String,
}

/// An incremental SSE parser: feed it bytes, take whole events out.
///
/// Built so that the bench's own reading does not set the figures it reports: each byte is
/// scanned for the end of its event once (not again with every piece that arrives), taken
/// events are not moved out of the buffer one by one (the buffer is compacted once the
/// consumed part is the larger), and only the field values are copied out.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Where the unconsumed bytes start.
    start: usize,
    /// How far from `start` the end of the next event was looked for already.
    scanned: usize,
}

/// The most bytes one event may take before the stream is called broken.
const MAX_EVENT: usize = 8 << 20;

impl SseParser {
    /// Adds bytes; returns an error when one event grows past 8 MiB.
    pub fn feed(&mut self, data: &[u8]) -> Result<()> {
        if self.start > 0 && self.start >= self.buf.len() - self.start {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
        ensure!(
            self.buf.len() - self.start <= MAX_EVENT,
            "an SSE event over 8 MiB"
        );
        Ok(())
    }

    /// The next whole event, if one is buffered (comments and `retry:` are skipped).
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let pending = &self.buf[self.start..];
            // Back one byte: the first `\n` of the pair may have ended the last scan.
            let from = self.scanned.saturating_sub(1);
            let Some(at) = memchr::memmem::find(&pending[from..], b"\n\n") else {
                self.scanned = pending.len();
                return None;
            };
            let end = from + at;
            let block = &pending[..end];
            let mut ev = SseEvent::default();
            let mut line_start = 0;
            let ends = memchr::memchr_iter(b'\n', block).chain(std::iter::once(block.len()));
            for line_end in ends {
                let line = &block[line_start..line_end];
                line_start = line_end + 1;
                // `from_utf8` first: it checks valid text far faster than the lossy way.
                let text = |value: &[u8]| match std::str::from_utf8(value) {
                    Ok(text) => text.to_owned(),
                    Err(_) => String::from_utf8_lossy(value).into_owned(),
                };
                if let Some(v) = line.strip_prefix(b"id: ") {
                    ev.id = Some(text(v));
                } else if let Some(v) = line.strip_prefix(b"event: ") {
                    ev.event = text(v);
                } else if let Some(v) = line.strip_prefix(b"data: ") {
                    ev.data = text(v);
                }
            }
            self.start += end + 2;
            self.scanned = 0;
            if !ev.event.is_empty() {
                return Some(ev);
            }
        }
    }
}

/// An open SSE response, read event by event.
#[derive(Debug)]
pub struct SseStream {
    body: Incoming,
    parser: SseParser,
    /// Keeps the connection open while the stream is read.
    _conn: SendRequest<Full<Bytes>>,
    /// When the frame holding the buffered events arrived.
    at: Instant,
}

impl SseStream {
    /// Opens `path` on `addr` with these extra headers.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<SseStream> {
        let (body, conn) = Client::connect(addr).await?.stream(path, headers).await?;
        Ok(SseStream {
            body,
            parser: SseParser::default(),
            _conn: conn,
            at: Instant::now(),
        })
    }

    /// The next event and when its last frame arrived; `None` when the stream ended; an
    /// error after `deadline`.
    pub async fn next(&mut self, deadline: Instant) -> Result<Option<(SseEvent, Instant)>> {
        loop {
            if let Some(ev) = self.parser.next_event() {
                return Ok(Some((ev, self.at)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match tokio::time::timeout(left, self.body.frame()).await {
                Err(_) => bail!("the event stream did not deliver in time"),
                Ok(None) => return Ok(None),
                Ok(Some(frame)) => frame?,
            };
            self.at = Instant::now();
            if let Ok(data) = frame.into_data() {
                self.parser.feed(&data)?;
            }
        }
    }
}

/// Reads an SSE stream, handing each event to `on_event` until it returns `false`, the
/// stream ends, or `deadline` passes (an error).
pub async fn read_sse(
    stream: &mut SseStream,
    deadline: Instant,
    mut on_event: impl FnMut(SseEvent, Instant) -> Result<bool>,
) -> Result<()> {
    while let Some((ev, at)) = stream.next(deadline).await? {
        if !on_event(ev, at)? {
            return Ok(());
        }
    }
    Ok(())
}

/// A free loopback port (bound, then let go: fine for a child that binds it at once).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The resident set of a process in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the status of process {pid}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("an empty VmRSS line")?
        .parse()?;
    Ok(kib * 1024)
}

/// Raises this process's open-file limit to its hard limit (1,000 subscribers need more
/// than the usual 1,024).
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `within`.
pub async fn poll<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// Its pid, for RSS readings.
    pub pid: u32,
}

impl Daemon {
    /// Spawns `cmd` with stdout piped; returns the daemon and its stdout lines.
    pub fn spawn(mut cmd: Command) -> Result<(Daemon, tokio::process::ChildStdout)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting a daemon")?;
        let pid = child.id().context("a daemon without a pid")?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok((
            Daemon {
                child: Some(child),
                pid,
            },
            stdout,
        ))
    }

    /// SIGKILL, and wait for it.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(self.pid, libc::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                child.kill().await?;
            }
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid we started; no memory is touched.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// A Roster daemon: this very binary re-run as `roster-bench serve-roster`, a separate
/// process so that its RSS is its own and it can be SIGKILLed.
#[derive(Debug)]
pub struct Roster {
    /// The child.
    pub daemon: Daemon,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// The embedded runtime `local` every scenario uses: profiles `noop` (`/bin/true`) and
/// `shell` (`/bin/sh -c`), room for the records scenario's 100,000 finished workers.
pub fn embedded_config(state_dir: &Path, listen: SocketAddr, max_finished: usize) -> String {
    format!(
        r#"[server]
listen = "{listen}"
state_dir = "{state}"
shutdown_grace = "2s"

[[runtimes]]
name = "local"
source = "embedded"
max_workers = 1024
max_finished = {max_finished}
grace = "1s"
[runtimes.profiles.noop]
command = ["/bin/true"]
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]
"#,
        state = state_dir.display(),
    )
}

impl Roster {
    /// Starts `roster-bench serve-roster --config <file>` with this config text and waits
    /// until it answers `/readyz`.
    pub async fn start(dir: &Path, name: &str, config: &str) -> Result<Roster> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, config)?;
        let (daemon, addr) = start_self(&[
            "serve-roster".as_ref(),
            "--config".as_ref(),
            file.as_os_str(),
        ])
        .await?;
        let roster = Roster { daemon, addr };
        roster.wait_ready(WAIT).await?;
        Ok(roster)
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        let addr = self.addr;
        poll("roster ready", within, || async move {
            let Ok(mut c) = Client::connect(addr).await else {
                return Ok(None);
            };
            let (status, _) = c.json(Method::GET, "/readyz", None).await?;
            Ok((status == StatusCode::OK).then_some(()))
        })
        .await
    }

    /// A new connection to it.
    pub async fn client(&self) -> Result<Client> {
        Client::connect(self.addr).await
    }

    /// Its resident set now.
    pub fn rss(&self) -> Result<u64> {
        rss_bytes(self.daemon.pid)
    }
}

/// Runs this binary with `args` as a daemon that prints `listening ADDR` first.
pub async fn start_self(args: &[&std::ffi::OsStr]) -> Result<(Daemon, SocketAddr)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(args);
    cmd.env("RUST_LOG", "error");
    cmd.stderr(Stdio::null());
    let (daemon, stdout) = Daemon::spawn(cmd)?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .context("the daemon did not say where it listens")??
        .context("the daemon ended at once")?;
    let addr: SocketAddr = line
        .strip_prefix("listening ")
        .context("an unexpected first line from the daemon")?
        .parse()?;
    // Keep reading so that a later line never blocks the daemon on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((daemon, addr))
}

/// Spawns one worker; returns its id.
pub async fn spawn_worker(client: &mut Client, runtime: &str, body: &Value) -> Result<String> {
    let (status, answer) = client
        .json(
            Method::POST,
            &format!("/v1/runtimes/{runtime}/workers"),
            Some(&body.to_string()),
        )
        .await?;
    ensure!(
        status == StatusCode::CREATED,
        "spawn answered {status}: {}",
        String::from_utf8_lossy(&answer)
    );
    let v: Value = serde_json::from_slice(&answer)?;
    Ok(v["id"].as_str().context("a worker id")?.to_string())
}

/// Whether a worker state is terminal.
pub fn terminal(state: &str) -> bool {
    matches!(state, "exited" | "stopped" | "failed")
}

/// Where peers are installed (`bench/peers/install.sh`).
pub fn peers_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ROSTER_BENCH_PEERS") {
        return PathBuf::from(dir);
    }
    workspace_root().join("target").join("bench-peers")
}

/// The workspace root (the bench's manifest directory's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Writes a progress line to stderr.
pub fn progress(line: &str) {
    eprintln!("roster-bench: {line}");
}

/// What one `/v1/events` subscriber saw.
#[derive(Debug, Default)]
pub struct Watched {
    /// `worker.upserted` events of a worker in a terminal state (each worker ends once).
    pub ended: u64,
    /// Every event after the snapshot.
    pub events: u64,
    /// `reset` events (lag, or a lost cursor): each is a loss to this subscriber.
    pub resets: u64,
    /// Milliseconds from a worker's `ended_at` to the event's arrival, when asked for.
    pub latencies_ms: Vec<f64>,
    /// When the last counted end arrived.
    pub last_at: Option<Instant>,
    /// The cursor of the last event seen.
    pub last_id: Option<String>,
}

/// A subscriber of `/v1/events?runtime=local` that counts worker ends until `target`
/// (or until `deadline`, which is not an error: the count says what arrived). `ready`
/// fires once the snapshot is in, so that every later end is a live event.
pub async fn watch_ends(
    addr: SocketAddr,
    target: u64,
    deadline: Instant,
    latency: bool,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<Watched> {
    watch_ends_on(addr, "local", target, deadline, latency, ready).await
}

/// [`watch_ends`] on the runtime `runtime`.
pub async fn watch_ends_on(
    addr: SocketAddr,
    runtime: &str,
    target: u64,
    deadline: Instant,
    latency: bool,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<Watched> {
    let path = format!("/v1/events?runtime={runtime}");
    let mut stream = SseStream::open(addr, &path, &[]).await?;
    let mut seen = Watched::default();
    let mut ready = Some(ready);
    let outcome = read_sse(&mut stream, deadline, |ev, at| {
        seen.last_id = ev.id.clone();
        match ev.event.as_str() {
            "snapshot" => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
                return Ok(true);
            }
            "reset" => seen.resets += 1,
            "worker.upserted" if ended_state(&ev.data) => {
                seen.ended += 1;
                seen.last_at = Some(at);
                if latency {
                    if let Some(ms) = ended_ago_ms(&ev.data) {
                        seen.latencies_ms.push(ms);
                    }
                }
            }
            _ => {}
        }
        seen.events += 1;
        Ok(seen.ended < target)
    })
    .await;
    match outcome {
        Ok(()) => Ok(seen),
        Err(_) if seen.ended > 0 || Instant::now() >= deadline => Ok(seen),
        Err(e) => Err(e),
    }
}

/// Whether an upserted worker's JSON is in a terminal state. A substring test, as this runs
/// for every event of every subscriber; the bench gives no worker a name or label that
/// could hold it.
pub fn ended_state(data: &str) -> bool {
    [
        "\"state\":\"exited\"",
        "\"state\":\"failed\"",
        "\"state\":\"stopped\"",
    ]
    .iter()
    .any(|s| data.contains(s))
}

fn ended_ago_ms(data: &str) -> Option<f64> {
    let v: Value = serde_json::from_str(data).ok()?;
    let ended = v["worker"]["ended_at"].as_str()?;
    let ended =
        time::OffsetDateTime::parse(ended, &time::format_description::well_known::Rfc3339).ok()?;
    let ago = time::OffsetDateTime::now_utc() - ended;
    Some(ago.as_seconds_f64() * 1e3)
}

/// Spawns `n` workers of `body` on runtime `local` with `in_flight` requests at once, each
/// task on its own kept-alive connection. Returns how many were created.
pub async fn spawn_many(addr: SocketAddr, n: usize, in_flight: usize, body: Value) -> Result<u64> {
    spawn_many_on(addr, "local", n, in_flight, body).await
}

/// [`spawn_many`] on the runtime `runtime`.
pub async fn spawn_many_on(
    addr: SocketAddr,
    runtime: &'static str,
    n: usize,
    in_flight: usize,
    body: Value,
) -> Result<u64> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = std::sync::Arc::new(AtomicUsize::new(0));
    let body = std::sync::Arc::new(body);
    let mut tasks = Vec::new();
    for _ in 0..in_flight.min(n.max(1)) {
        let (next, body) = (next.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await?;
            let mut made = 0u64;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                spawn_worker(&mut c, runtime, &body).await?;
                made += 1;
            }
            anyhow::Ok(made)
        }));
    }
    let mut made = 0;
    for t in tasks {
        made += t.await??;
    }
    Ok(made)
}

/// Evaluates `$check` (an `Option`, typically `async { … }.await?`) every 20 ms until it is
/// `Some`, and yields the value; fails the enclosing function after `$within`. A macro, not
/// a function, so that the check may borrow a client mutably.
#[macro_export]
macro_rules! poll_until {
    ($what:expr, $within:expr, $check:expr) => {{
        let within: std::time::Duration = $within;
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(v) = $check {
                break v;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{}: not within {:?}",
                $what,
                within
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_gives_every_event_whole_however_the_bytes_are_cut() {
        let stream = b"retry: 1000\n\n: ping\n\nid: 1\nevent: output\ndata: {\"a\":1}\n\n\
                       id: 2\nevent: gap\ndata: {}\n\nevent: end\ndata: {}\n\n";
        for piece in 1..stream.len() {
            let mut parser = SseParser::default();
            let mut got = Vec::new();
            for bytes in stream.chunks(piece) {
                parser.feed(bytes).unwrap();
                while let Some(ev) = parser.next_event() {
                    got.push((ev.id, ev.event, ev.data));
                }
            }
            let want = vec![
                (Some("1".into()), "output".into(), r#"{"a":1}"#.into()),
                (Some("2".into()), "gap".into(), "{}".into()),
                (None, "end".into(), "{}".into()),
            ];
            assert_eq!(got, want, "pieces of {piece}");
        }
    }
}
