//! A real `roster` server on 127.0.0.1:0 for tests, and a small HTTP client over hyper that
//! keeps every byte the server sent (for the searches of what a client may never get).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use registry_core::{Registry, RegistryConfig, RuntimeId, RuntimeSource};
use serde_json::Value;
use server_bin::config::Config;
use server_bin::ServeOptions;
use source_embedded::{EmbeddedConfig, EmbeddedSource};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::sse::SseClient;
use crate::{eventually, WAIT};

/// A string no other test (or test run) uses.
pub fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{tag}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running server with its own state directory.
#[derive(Debug)]
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub registry: Registry,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
    /// Every header and body byte this server sent to the harness's clients.
    seen: Seen,
}

/// The bytes a server sent, kept for the search that [`TestServer::stop`] makes: nothing a
/// client gets may name the state directory or `/proc`. Bounded: past 64 MiB the oldest
/// half is dropped.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<u8>>>);

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.0.lock().map_or(0, |seen| seen.len());
        write!(f, "Seen({len} bytes)")
    }
}

impl Seen {
    const LIMIT: usize = 64 << 20;

    pub fn record(&self, bytes: &[u8]) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() + bytes.len() > Self::LIMIT {
            let half = seen.len() / 2;
            seen.drain(..half);
        }
        seen.extend_from_slice(bytes);
    }

    /// Records a whole response: its headers and its body.
    pub fn record_response(&self, resp: &TestResponse) {
        self.record(&header_bytes(&resp.headers));
        self.record(&resp.body);
    }

    /// The recorded bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// Fails when the recorded bytes hold one of `needles`.
    pub fn assert_free_of(&self, needles: &[String]) -> Result<()> {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&seen);
        for needle in needles.iter().filter(|n| !n.is_empty()) {
            if let Some(i) = text.find(needle.as_str()) {
                let from = text[..i]
                    .char_indices()
                    .rev()
                    .nth(120)
                    .map_or(0, |(j, _)| j);
                let to = (i + needle.len() + 120).min(text.len());
                let to = (to..=text.len())
                    .find(|&j| text.is_char_boundary(j))
                    .unwrap_or(text.len());
                bail!("a client got {needle:?}: …{}…", &text[from..to]);
            }
        }
        Ok(())
    }
}

/// Headers as the lines `name: value\n`, for a search of what a client got.
pub fn header_bytes(headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in headers {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The default config (one `embedded` runtime `local`, profile `shell`, commands allowed)
/// with `extra` TOML merged into the runtime's table (e.g. `output_retention = 64`).
pub fn config(extra_runtime_toml: &str) -> Config {
    let mut config = Config::default_embedded();
    let extra: toml::Table = toml::from_str(extra_runtime_toml).expect("valid extra TOML");
    for (k, v) in extra {
        config.runtimes[0].table.insert(k, v);
    }
    config
}

impl TestServer {
    /// The default config and options.
    pub async fn start() -> Result<TestServer> {
        Self::start_with(config(""), ServeOptions::default()).await
    }

    /// A server for `config` (its state dir is replaced by a fresh one) with `options`.
    pub async fn start_with(config: Config, options: ServeOptions) -> Result<TestServer> {
        let dir = tempfile::tempdir()?;
        Self::start_in(dir, config, options).await
    }

    /// A server whose state lives in `dir` (to restart a registry on the same state).
    pub async fn start_in(
        dir: tempfile::TempDir,
        config: Config,
        options: ServeOptions,
    ) -> Result<TestServer> {
        Self::start_in_with(dir, config, &server_bin::default_factories(), options).await
    }

    /// [`TestServer::start_in`] with the source kinds of `factories` (a test package's own
    /// kind added to the default ones, say).
    pub async fn start_in_with(
        dir: tempfile::TempDir,
        mut config: Config,
        factories: &registry_core::SourceFactories,
        options: ServeOptions,
    ) -> Result<TestServer> {
        config.server.state_dir = dir.path().join("state").into();
        let registry = server_bin::build_registry(&config, factories).await?;
        Self::start_registry(registry, dir, options).await
    }

    /// Shuts the server down as SIGTERM would and waits for it, then checks that nothing
    /// a client got names the state directory or `/proc`.
    pub async fn stop(mut self) -> Result<tempfile::TempDir> {
        self.shutdown().await?;
        self.seen
            .assert_free_of(&[self.dir.path().display().to_string(), "/proc/".to_string()])?;
        let dir = tempfile::tempdir()?;
        Ok(std::mem::replace(&mut self.dir, dir))
    }

    async fn shutdown(&mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .context("server did not stop")???;
        }
        Ok(())
    }

    /// Every byte this server sent to the harness's clients so far.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }

    /// One request; `body` is sent as JSON when given.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<TestResponse> {
        let resp = request_to(self.addr, method, path, headers, body).await?;
        self.seen.record_response(&resp);
        Ok(resp)
    }

    /// Sends a request and returns the response with its body unread.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<hyper::Response<Incoming>> {
        send_to(self.addr, method, path, headers, body).await
    }

    pub async fn get(&self, path: &str) -> Result<TestResponse> {
        self.request(Method::GET, path, &[], None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Result<TestResponse> {
        self.request(Method::POST, path, &[], Some(body)).await
    }

    /// Spawns `sh -c script` in runtime `local` and returns the worker's id.
    pub async fn spawn_shell(&self, script: &str) -> Result<String> {
        let body = serde_json::json!({ "profile": "shell", "args": [script] }).to_string();
        self.post("/v1/runtimes/local/workers", &body)
            .await?
            .created_id()
    }

    /// Polls `GET /v1/workers/{id}` until `check` holds, or fails after [`WAIT`].
    pub async fn wait_worker(&self, id: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
        let path = format!("/v1/workers/{id}");
        let last = Mutex::new(Value::Null);
        let (path, check, last_seen) = (&path, &check, &last);
        eventually("the worker to reach the condition", WAIT, || async move {
            let w = self.get(path).await?.json()?;
            let hit = check(&w);
            *last_seen.lock().unwrap_or_else(|e| e.into_inner()) = w.clone();
            Ok(hit.then_some(w))
        })
        .await
        .with_context(|| {
            let w = last.lock().unwrap_or_else(|e| e.into_inner());
            format!("worker never reached the condition: {w}")
        })
    }

    /// Opens an SSE stream.
    pub async fn sse(&self, path: &str, headers: &[(&str, &str)]) -> Result<SseClient> {
        let resp = self.send(Method::GET, path, headers, None).await?;
        if resp.status() != StatusCode::OK {
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            self.seen.record(&header_bytes(&parts.headers));
            self.seen.record(&body);
            bail!(
                "stream answered {}: {}",
                parts.status,
                String::from_utf8_lossy(&body)
            );
        }
        self.seen.record(&header_bytes(resp.headers()));
        Ok(SseClient::new(resp, self.seen.clone()))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Sends `req`, built in full by the caller, to the server at `addr` on a new connection;
/// returns the response with its body unread.
pub async fn send_request_to<B>(
    addr: std::net::SocketAddr,
    req: Request<B>,
) -> Result<hyper::Response<Incoming>>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    send_request_on(TcpStream::connect(addr).await?, req).await
}

/// A connection to `addr` from the local address `local` (another loopback address, say
/// `127.0.0.2`, to stand for another client machine), on a port the kernel picks.
pub async fn connect_from(
    local: std::net::IpAddr,
    addr: std::net::SocketAddr,
) -> Result<TcpStream> {
    let socket = match local {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(std::net::SocketAddr::new(local, 0))?;
    Ok(socket.connect(addr).await?)
}

/// Sends `req` on `stream` (one request on a fresh connection); returns the response with
/// its body unread.
pub async fn send_request_on<B>(
    stream: TcpStream,
    req: Request<B>,
) -> Result<hyper::Response<Incoming>>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .context("request timed out")??)
}

/// Sends one request to the server at `addr` and returns the response with its body unread;
/// `body` is sent as JSON unless the headers name another type.
pub async fn send_to(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<hyper::Response<Incoming>> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{}", addr.port()));
    let has_type = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    if body.is_some() && !has_type {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or("").to_string())))?;
    send_request_to(addr, req).await
}

/// One request to the server at `addr` (one a [`TestServer`] does not stand for, e.g. a
/// `roster` process), read to the end of the response.
pub async fn request_to(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<TestResponse> {
    TestResponse::read(send_to(addr, method, path, headers, body).await?).await
}

/// A whole response.
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    /// Reads the body of `resp` to its end.
    pub async fn read(resp: hyper::Response<Incoming>) -> Result<TestResponse> {
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(WAIT, body.collect())
            .await
            .context("body timed out")??
            .to_bytes();
        Ok(TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON ({}): {}", self.status, self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The `id` of the worker a spawn created; fails unless the answer is `201 Created`.
    pub fn created_id(&self) -> Result<String> {
        if self.status != StatusCode::CREATED {
            bail!("spawn answered {}: {}", self.status, self.text());
        }
        Ok(self.json()?["id"].as_str().context("an id")?.to_string())
    }
}

/// An `embedded` source with the profile `shell` = `["/bin/sh", "-c"]`, and `extra` TOML
/// (more keys of its table, e.g. `max_workers = 1`).
pub fn shell_source(extra: &str) -> Result<EmbeddedSource> {
    let config: EmbeddedConfig = toml::from_str(&format!(
        "{extra}\n[profiles.shell]\ncommand = [\"/bin/sh\", \"-c\"]\n"
    ))?;
    Ok(EmbeddedSource::new(config)?)
}

impl TestServer {
    /// A server whose one runtime, `runtime` (of kind `kind`), is `source`, built by the
    /// test (a [`Fake`](crate::Fake), say), with `options`.
    pub async fn start_with_source(
        runtime: &str,
        kind: &str,
        source: Arc<dyn RuntimeSource>,
        options: ServeOptions,
    ) -> Result<TestServer> {
        let dir = tempfile::tempdir()?;
        let registry = Registry::new(RegistryConfig::new(dir.path().join("state")))?;
        registry
            .add_runtime(RuntimeId::new(runtime)?, kind, source)
            .await?;
        Self::start_registry(registry, dir, options).await
    }

    /// A server for a registry built by the test itself (its runtimes added already), with
    /// its state in `dir`, and `options`.
    pub async fn start_registry(
        registry: Registry,
        dir: tempfile::TempDir,
        options: ServeOptions,
    ) -> Result<TestServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server_bin::serve_with(
            listener,
            registry.clone(),
            options,
            async move {
                let _ = rx.await;
            },
        ));
        Ok(TestServer {
            addr,
            registry,
            dir,
            stop: Some(tx),
            task: Some(task),
            seen: Seen::default(),
        })
    }
}
