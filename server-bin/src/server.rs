//! The listener loop, the per-request pipeline (host, route, token, origin, handler, error,
//! request id, metrics, log line) and graceful shutdown.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use registry_core::{Registry, RegistryError};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};

use crate::api;
use crate::auth::{Allowed, AllowedHost, AllowedOrigin, Tokens};
use crate::config::{LoadedToken, ServerSection};
use crate::error::ApiError;
use crate::metrics::{Limit, Metrics};
use crate::reload::{ReloadConfig, Reloader};
use crate::routes::{resolve, Endpoint, Resolution, UNMATCHED};
use crate::wire::Body;

/// How the server behaves, apart from the registry it serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Bearer tokens; none means the server is open, and then it only serves on loopback.
    pub tokens: Vec<LoadedToken>,
    /// Host names and origins accepted besides loopback and same-origin.
    pub allowed_hosts: Vec<AllowedHost>,
    /// Origins accepted for requests that change something, besides the server's own.
    pub allowed_origins: Vec<AllowedOrigin>,
    /// Largest request body (default 1 MiB).
    pub max_body: u64,
    /// How long embedded workers get to stop at shutdown (default 10 s).
    pub shutdown_grace: Duration,
    /// The interval of `: ping` comments on event streams (default 15 s).
    pub sse_ping: Duration,
    /// Connections served at once; one more is answered `429` and closed (default 1024).
    pub max_connections: usize,
    /// Connections served at once from one peer: one IPv4 address, or one IPv6 /64
    /// (default 256).
    pub max_connections_per_peer: usize,
    /// With tokens: connections that have not yet sent a request with a valid token; one
    /// more closes the oldest of them (default 512).
    pub max_unauthenticated_connections: usize,
    /// How long a request head may take from its first byte, and a new connection to send
    /// its first head (default 10 s).
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request (default 60 s).
    pub keep_alive_idle_timeout: Duration,
    /// Largest request head in bytes, request line included (default 64 KiB): `431`.
    pub max_header_bytes: usize,
    /// Most header lines in a request (default 100): `431`.
    pub max_headers: usize,
    /// Event streams open at once (default 768): `429`.
    pub max_streams: usize,
    /// Event streams open at once with one token (default 256): `429`.
    pub max_streams_per_token: usize,
    /// How long a request body may take to arrive (default 30 s); slower is `400`.
    pub body_timeout: Duration,
    /// How long a stream may wait for its client to take the next frame (default 60 s)
    /// before the client counts as gone and its connection is closed.
    pub stream_stall_timeout: Duration,
    /// Where `POST /v1/admin/reload` (and `SIGHUP`, if it says so) reloads the config from;
    /// without it a reload is refused with `409 conflict` (default: none).
    pub reload: Option<ReloadConfig>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions::from_config(&ServerSection::default(), Vec::new())
    }
}

impl ServeOptions {
    /// The options of a config's `[server]` table with its loaded tokens.
    pub fn from_config(server: &ServerSection, tokens: Vec<LoadedToken>) -> Self {
        ServeOptions {
            tokens,
            allowed_hosts: server.allowed_hosts.clone(),
            allowed_origins: server.allowed_origins.clone(),
            max_body: server.max_body,
            shutdown_grace: server.shutdown_grace,
            sse_ping: server.sse_ping,
            max_connections: server.max_connections,
            max_connections_per_peer: server.max_connections_per_peer,
            max_unauthenticated_connections: server.max_unauthenticated_connections,
            header_read_timeout: server.header_read_timeout,
            keep_alive_idle_timeout: server.keep_alive_idle_timeout,
            max_header_bytes: usize::try_from(server.max_header_bytes).unwrap_or(usize::MAX),
            max_headers: server.max_headers,
            max_streams: server.max_streams,
            max_streams_per_token: server.max_streams_per_token,
            body_timeout: Duration::from_secs(30),
            stream_stall_timeout: Duration::from_secs(60),
            reload: None,
        }
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub struct App {
    pub(crate) registry: Registry,
    pub(crate) options: ServeOptions,
    pub(crate) metrics: Arc<Metrics>,
    /// Who may call; a reload swaps it whole.
    gate: RwLock<Arc<Gate>>,
    /// Reloads the config, when the server has a file to reload.
    pub(crate) reloader: Option<Reloader>,
    /// Becomes `true` once the registry has shut down: streams end with a final event.
    pub(crate) closing: watch::Receiver<bool>,
    /// Set when shutdown starts: requests that would change something are refused.
    stopping: AtomicBool,
    request_prefix: String,
    request_seq: AtomicU64,
    /// The event streams open now (`max_streams`, `max_streams_per_token`).
    streams: Mutex<StreamTable>,
    /// The log lines of limits reached, at most one per limit every 10 s.
    throttle: Throttle,
}

/// The token set and the allowed hosts and origins, which a reload replaces together.
#[derive(Debug)]
pub(crate) struct Gate {
    tokens: Tokens,
    allowed: Allowed,
}

impl Gate {
    pub(crate) fn new(tokens: Tokens, server: &ServerSection) -> Gate {
        Gate {
            tokens,
            allowed: Allowed {
                hosts: server.allowed_hosts.clone(),
                origins: server.allowed_origins.clone(),
            },
        }
    }
}

impl App {
    fn gate(&self) -> Arc<Gate> {
        self.gate.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a reloaded token set and allowed hosts and origins in force: every request
    /// checked from now on is checked against them.
    pub(crate) fn set_gate(&self, gate: Gate) {
        *self.gate.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(gate);
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn next_request_id(&self) -> String {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:06}", self.request_prefix)
    }
}

/// Closes the connection a request came on: a stream whose client stopped reading uses it,
/// since ending the response alone would leave the connection stuck writing to that client.
#[derive(Clone, Debug)]
pub(crate) struct ConnAbort(Arc<Notify>);

impl ConnAbort {
    pub(crate) fn close(&self) {
        self.0.notify_one();
    }
}

/// How often a limit's log line may be written: a flood of refusals makes one line per
/// limit per interval, with the count since the last one.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One rate-limited warning per limit.
#[derive(Debug, Default)]
struct Throttle {
    /// Per limit (in [`Limit::ALL`] order): when its line was last written, and how many
    /// hits came since.
    last: Mutex<[(Option<Instant>, u64); Limit::ALL.len()]>,
}

impl Throttle {
    /// Counts a hit of `limit` on `/metrics` and writes its log line if none was written
    /// in the last [`LOG_EVERY`]. The line names the limit and its value, never a peer.
    fn hit(&self, metrics: &Metrics, limit: Limit, value: impl fmt::Display) {
        metrics.refused(limit);
        let i = Limit::ALL.iter().position(|&l| l == limit).unwrap_or(0);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (at, count) = &mut last[i];
        *count += 1;
        let now = Instant::now();
        if at.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return;
        }
        let hits = std::mem::take(count);
        *at = Some(now);
        drop(last);
        tracing::warn!(
            limit = limit.key(),
            value = %value,
            hits,
            "a connection limit was reached; further hits are logged at most every 10 s \
             (roster_limit_refusals_total counts them all)"
        );
    }
}

/// The peer a connection counts against: its IPv4 address, or its IPv6 /64 (one host
/// commonly holds a whole /64).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = !0u128 << 64;
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// The connections being served: how many, how many per peer, and those that have not yet
/// sent a valid token (oldest first). Bounded by `max_connections`.
#[derive(Debug, Default)]
struct ConnTable {
    open: usize,
    per_peer: HashMap<IpAddr, usize>,
    /// Connection number → its eviction signal, for connections without a valid token yet.
    unauthenticated: BTreeMap<u64, Arc<Notify>>,
    next: u64,
}

/// What the accept loop decided about a new connection.
enum Admission {
    /// Served; `evicted` is the oldest unauthenticated connection, to be closed for it.
    Admitted(Arc<Conn>, Option<Arc<Notify>>),
    /// Refused at this limit.
    Refused(Limit),
}

/// The connection limits, shared by the accept loop and every connection.
#[derive(Debug)]
struct Connections {
    table: Mutex<ConnTable>,
    max: usize,
    per_peer: usize,
    unauthenticated: usize,
}

impl Connections {
    fn new(options: &ServeOptions) -> Arc<Connections> {
        Arc::new(Connections {
            table: Mutex::default(),
            max: options.max_connections.max(1),
            per_peer: options.max_connections_per_peer.max(1),
            unauthenticated: options.max_unauthenticated_connections.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a connection from `peer`, or says which limit refuses it. With
    /// `track_token` (tokens are configured) the connection counts as unauthenticated
    /// until [`Conn::authenticated`]; past that limit the oldest such connection is
    /// evicted, so a flood of connections that never send a token can't keep a client
    /// that does from being served.
    fn admit(self: &Arc<Self>, peer: IpAddr, track_token: bool) -> Admission {
        let key = peer_key(peer);
        let mut t = self.lock();
        if t.open >= self.max {
            return Admission::Refused(Limit::Connections);
        }
        let from_peer = t.per_peer.get(&key).copied().unwrap_or(0);
        if from_peer >= self.per_peer {
            return Admission::Refused(Limit::ConnectionsPerPeer);
        }
        t.open += 1;
        t.per_peer.insert(key, from_peer + 1);
        t.next += 1;
        let id = t.next;
        let evict = Arc::new(Notify::new());
        let mut evicted = None;
        if track_token {
            t.unauthenticated.insert(id, evict.clone());
            if t.unauthenticated.len() > self.unauthenticated {
                evicted = t.unauthenticated.pop_first().map(|(_, signal)| signal);
            }
        }
        drop(t);
        let conn = Arc::new(Conn {
            id,
            key,
            table: self.clone(),
            authenticated: AtomicBool::new(!track_token),
            evict,
            activity: Activity::new(),
        });
        Admission::Admitted(conn, evicted)
    }
}

/// One connection being served: its slot (given back on drop), whether it has sent a valid
/// token, and what it is doing (for the header and idle timeouts).
#[derive(Debug)]
struct Conn {
    id: u64,
    key: IpAddr,
    table: Arc<Connections>,
    authenticated: AtomicBool,
    /// Notified when a newer connection evicts this one.
    evict: Arc<Notify>,
    activity: Arc<Activity>,
}

impl Conn {
    /// The connection sent a request with a valid token: it no longer counts against
    /// `max_unauthenticated_connections`.
    fn authenticated(&self) {
        if !self.authenticated.swap(true, Ordering::AcqRel) {
            self.table.lock().unauthenticated.remove(&self.id);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut t = self.table.lock();
        t.open = t.open.saturating_sub(1);
        if let Some(n) = t.per_peer.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.per_peer.remove(&self.key);
            }
        }
        t.unauthenticated.remove(&self.id);
    }
}

/// "No time": `Activity::head_since` when no request head is on its way.
const NO_HEAD: u64 = u64::MAX;

/// What a connection is doing, for the timeouts hyper does not keep the way the server
/// wants (hyper's `header_read_timeout` also runs while a keep-alive connection is idle,
/// and hyper has no idle timeout): requests in flight, since when it has been idle, and
/// since when the head of its next request has been arriving. Times are milliseconds
/// since the connection was accepted.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Requests whose answer has not been sent in full.
    busy: AtomicU64,
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived (a new connection starts
    /// with one on its way: it must send its first request in time too).
    head_since: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            busy: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Bytes came in: while idle, they start the next request's head.
    fn read_some(&self) {
        if self.busy.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == NO_HEAD
        {
            self.head_since.store(self.now(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// A request arrived whole; its answer is being made until the guard drops.
    fn request(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// Waits until the connection has been idle for `idle`, or a head has been arriving
    /// for `header`; returns which limit that is.
    async fn expired(&self, header: Duration, idle: Duration) -> Limit {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4);
        let (header, idle) = (ms(header), ms(idle));
        loop {
            let changed = self.changed.notified();
            if self.busy.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let head = self.head_since.load(Ordering::Acquire);
            let (deadline, limit) = if head == NO_HEAD {
                let since = self.idle_since.load(Ordering::Acquire);
                (since.saturating_add(idle), Limit::KeepAliveIdleTimeout)
            } else {
                (head.saturating_add(header), Limit::HeaderReadTimeout)
            };
            let now = self.now();
            if now >= deadline {
                if self.busy.load(Ordering::Acquire) == 0 {
                    return limit;
                }
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(deadline - now)) => {}
                () = changed => {}
            }
        }
    }
}

/// One request in flight; when its answer has been sent (hyper drops the body), the
/// connection is idle again.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.head_since.store(NO_HEAD, Ordering::Release);
        a.idle_since.store(a.now(), Ordering::Release);
        if a.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.changed.notify_one();
        }
    }
}

/// A connection's socket, telling its [`Activity`] when bytes come in.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The event streams open now, overall and per token name.
#[derive(Debug, Default)]
struct StreamTable {
    open: usize,
    per_token: HashMap<String, usize>,
}

/// A slot of `max_streams` (and of `max_streams_per_token`, with a token), held by the
/// stream's response body: it is given back when the stream ends.
#[derive(Debug)]
struct StreamSlot {
    app: Arc<App>,
    token: Option<String>,
}

impl App {
    fn streams(&self) -> std::sync::MutexGuard<'_, StreamTable> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream slot for a client with `token` (its name), or `429 capacity_exceeded`.
    fn open_stream(self: &Arc<Self>, token: Option<&str>) -> Result<StreamSlot, ApiError> {
        let o = &self.options;
        let mut t = self.streams();
        let refused = |limit: Limit, what: &str, max: usize| {
            self.throttle.hit(&self.metrics, limit, max);
            ApiError::from(RegistryError::CapacityExceeded(format!(
                "{what} (at most {max}, the server's `{}`); close one or retry later",
                limit.key()
            )))
        };
        if t.open >= o.max_streams {
            drop(t);
            return Err(refused(
                Limit::Streams,
                "too many event streams are open on this server",
                o.max_streams,
            ));
        }
        if let Some(name) = token {
            let n = t.per_token.get(name).copied().unwrap_or(0);
            if n >= o.max_streams_per_token {
                drop(t);
                return Err(refused(
                    Limit::StreamsPerToken,
                    "this token has too many event streams open",
                    o.max_streams_per_token,
                ));
            }
            t.per_token.insert(name.to_string(), n + 1);
        }
        t.open += 1;
        Ok(StreamSlot {
            app: self.clone(),
            token: token.map(str::to_string),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut t = self.app.streams();
        t.open = t.open.saturating_sub(1);
        if let Some(name) = &self.token {
            if let Some(n) = t.per_token.get_mut(name) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    t.per_token.remove(name);
                }
            }
        }
    }
}

/// A response body with what must live as long as it is being sent: the request's
/// [`Busy`] mark, and a stream's slot.
struct Tracked {
    body: Body,
    _busy: Busy,
    _slot: Option<StreamSlot>,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// How many refused connections may be lingering at once (answer sent, waiting briefly
/// for the client's request so that closing doesn't reset the answer away); past it a
/// refused connection is closed at once.
const MAX_LINGERING: usize = 64;
/// How long a refused connection lingers at most.
const LINGER: Duration = Duration::from_millis(250);

/// Answers a connection no slot is left for with `429 capacity_exceeded` (`Retry-After`,
/// `Connection: close`), without waiting for it: what the client already sent is read
/// and dropped, the answer written if the socket takes it at once, then the connection is
/// closed. A refused client is told at once instead of waiting in the kernel's queue.
fn refuse(stream: TcpStream, limit: Limit, lingering: &Arc<Semaphore>) {
    let message = match limit {
        Limit::ConnectionsPerPeer => {
            "too many connections from this address are open; close some or retry later"
        }
        _ => "the server has too many connections open; retry later",
    };
    let answer = ApiError::from(RegistryError::CapacityExceeded(message.into())).to_closing_bytes();
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    if stream.try_write(&answer).is_err() {
        return;
    }
    let Ok(permit) = lingering.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    });
}

/// A client's `x-request-id` is kept when it is short and plain; otherwise the server makes one.
fn client_request_id(req: &Request<Incoming>) -> Option<String> {
    let v = req.headers().get("x-request-id")?.to_str().ok()?;
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| v.to_string())
}

async fn handle(
    app: Arc<App>,
    conn: Arc<Conn>,
    abort: ConnAbort,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Tracked>, Infallible> {
    let started = Instant::now();
    let busy = conn.activity.request();
    req.extensions_mut().insert(abort);
    let request_id = client_request_id(&req).unwrap_or_else(|| app.next_request_id());
    let method = req.method().clone();
    // The path for the log line, only when that line is written (a `Uri` clone shares its
    // bytes; nothing is formatted here).
    let uri = tracing::enabled!(tracing::Level::INFO).then(|| req.uri().clone());
    let Outcome {
        route,
        token,
        result,
        slot,
    } = pipeline(&app, &conn, req).await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(error) => {
            if let Some(detail) = error.internal_detail() {
                tracing::error!(request_id = %request_id, %method, route, detail, "internal error");
            }
            error.to_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    app.metrics.observe_request(&method, route, status, elapsed);
    if let Some(uri) = uri {
        tracing::info!(
            request_id = %request_id,
            %method,
            path = uri.path(),
            route,
            status,
            token = token.as_deref().unwrap_or("-"),
            peer = %peer,
            elapsed_ms = round_ms(elapsed),
            "request"
        );
    }
    // A stream's slot is held for as long as its body is sent; a refused one gives it back.
    let slot = slot.filter(|_| resp.status() == http::StatusCode::OK);
    Ok(resp.map(|body| Tracked {
        body,
        _busy: busy,
        _slot: slot,
    }))
}

/// A duration in milliseconds with two decimals (`0.03`, not `0.030555000000000002`).
fn round_ms(elapsed: Duration) -> f64 {
    (elapsed.as_secs_f64() * 100_000.0).round() / 100.0
}

/// What the pipeline made of a request: its route template (for the metrics and the log),
/// the name of the token it came with (never the token), and the answer.
struct Outcome {
    route: &'static str,
    token: Option<String>,
    result: Result<Response<Body>, ApiError>,
    /// The slot of an event stream.
    slot: Option<StreamSlot>,
}

impl Outcome {
    fn early(route: &'static str, error: ApiError) -> Self {
        Outcome {
            route,
            token: None,
            result: Err(error),
            slot: None,
        }
    }
}

/// `431 headers_too_large` when the request's head is past `max_headers` lines or
/// `max_header_bytes` bytes. The size counts the request line and every header line as
/// written on the wire (`name: value` and CRLF). (hyper itself refuses a head past twice
/// these limits, with a `431` without a body, and closes the connection.)
fn check_head(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let o = &app.options;
    let over = |limit: Limit, what: String, max: usize| {
        app.throttle.hit(&app.metrics, limit, max);
        Err(ApiError::HeadersTooLarge(format!(
            "{what}; this server takes at most {max} (`{}`)",
            limit.key()
        )))
    };
    let lines = req.headers().len();
    if lines > o.max_headers {
        let what = format!("the request has {lines} header lines");
        return over(Limit::Headers, what, o.max_headers);
    }
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let mut bytes = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    for (name, value) in req.headers() {
        bytes += name.as_str().len() + 2 + value.len() + 2;
    }
    if bytes > o.max_header_bytes {
        let what = format!("the request's head is {bytes} bytes");
        return over(Limit::HeaderBytes, what, o.max_header_bytes);
    }
    Ok(())
}

/// Head size → Host → route → token → origin → stream slot → handler.
async fn pipeline(app: &Arc<App>, conn: &Conn, req: Request<Incoming>) -> Outcome {
    let gate = app.gate();
    if let Err(e) = check_head(app, &req)
        .and_then(|()| crate::auth::check_single_credentials(req.headers()))
        .and_then(|()| gate.allowed.check_host(req.headers()))
        .and_then(|()| gate.allowed.check_target(req.uri()))
    {
        return Outcome::early(UNMATCHED, e);
    }
    let path = req.uri().path().to_string();
    let (route, params) = match resolve(req.method(), &path) {
        Resolution::Found(route, params) => (
            route,
            params.into_iter().map(str::to_string).collect::<Vec<_>>(),
        ),
        Resolution::WrongMethod(template, allow) => {
            let method = req.method().clone();
            return Outcome::early(template, ApiError::MethodNotAllowed { method, allow });
        }
        Resolution::NotFound => {
            return Outcome::early(
                UNMATCHED,
                ApiError::RouteNotFound(
                    "no such route; GET /v1/openapi.json lists every route".into(),
                ),
            )
        }
    };
    let template = route.template;
    let token = match gate.tokens.authorize(req.headers(), route.access) {
        Ok(token) => token.map(str::to_string),
        Err(e) => return Outcome::early(template, e),
    };
    if token.is_some() {
        conn.authenticated();
    }
    let slot = if matches!(route.endpoint, Endpoint::Output | Endpoint::Events) {
        Some(app.open_stream(token.as_deref()))
    } else {
        None
    };
    let (slot, refused) = match slot {
        Some(Ok(slot)) => (Some(slot), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let answer = |result| Outcome {
        route: template,
        token,
        result,
        slot,
    };
    if let Err(e) = gate.allowed.check_origin(req.method(), req.headers()) {
        return answer(Err(e));
    }
    if app.is_stopping() && route.method != http::Method::GET {
        return answer(Err(RegistryError::unavailable(
            "the server is shutting down",
            None,
        )
        .into()));
    }
    if let Some(e) = refused {
        return answer(Err(e));
    }
    answer(api::dispatch(app, route.endpoint, &params, req).await)
}

/// Serves `registry` on `listener` with default options until `shutdown` completes.
/// See [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with(listener, registry, ServeOptions::default(), shutdown).await
}

/// Reloads the config at each `SIGHUP` until aborted; the outcome goes to the log (as
/// `reload` writes it). One at a time: a `SIGHUP` during a reload is taken after it.
fn reload_on_sighup(app: Arc<App>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("cannot handle SIGHUP: {e}"))?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            if app.is_stopping() {
                tracing::info!("shutting down; the reload is skipped");
                continue;
            }
            // `reload` logs the outcome or the error itself.
            let _ = crate::reload::reload(&app).await;
        }
    }))
}

/// How long shutdown waits for connections to finish after the streams were told to end.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `registry` on `listener` until `shutdown` completes, then shuts down gracefully:
/// stops accepting, refuses requests that would change something, shuts the registry down
/// (workers get `options.shutdown_grace` to stop, and their last events still reach the
/// streams), ends every stream with a final `shutdown` event, and waits a little for
/// connections to finish.
///
/// Without tokens, a listener that is not on loopback is refused.
pub async fn serve_with(
    listener: TcpListener,
    registry: Registry,
    mut options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    if options.tokens.is_empty() && !crate::auth::is_loopback(local.ip()) {
        anyhow::bail!(
            "refusing to serve on a non-loopback address without tokens: anyone who can reach \
             the port could start processes; configure [[server.tokens]] or listen on 127.0.0.1"
        );
    }
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut prefix = [0u8; 4];
    getrandom::fill(&mut prefix).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    // Moved out of the options: the secrets are kept only as the hashes `Tokens` holds.
    let tokens = std::mem::take(&mut options.tokens);
    let reloader = options
        .reload
        .take()
        .map(|r| Reloader::new(r, Tokens::new(&tokens), local));
    let app = Arc::new(App {
        registry: registry.clone(),
        metrics: Arc::new(Metrics::new()),
        gate: RwLock::new(Arc::new(Gate {
            tokens: Tokens::new(&tokens),
            allowed: Allowed {
                hosts: std::mem::take(&mut options.allowed_hosts),
                origins: std::mem::take(&mut options.allowed_origins),
            },
        })),
        reloader,
        closing: closing_rx,
        stopping: AtomicBool::new(false),
        request_prefix: prefix.iter().map(|b| format!("{b:02x}")).collect(),
        request_seq: AtomicU64::new(1),
        streams: Mutex::default(),
        throttle: Throttle::default(),
        options,
    });
    let sighup = app
        .reloader
        .as_ref()
        .is_some_and(Reloader::on_sighup)
        .then(|| reload_on_sighup(app.clone()))
        .transpose()?;
    let graceful = GracefulShutdown::new();
    let connections = Connections::new(&app.options);
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING));
    let mut http = http1::Builder::new();
    // hyper's own header timeout also runs while a keep-alive connection is idle, so both
    // timeouts are kept by `Activity` instead. hyper refuses heads past twice the limits
    // (a `431` without a body); `check_head` answers those in between with a JSON `431`.
    http.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_headers(app.options.max_headers.saturating_mul(2))
        .max_header_size(app.options.max_header_bytes.saturating_mul(2));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let track_token = app.gate().tokens.enabled();
        let conn = match connections.admit(peer.ip(), track_token) {
            Admission::Admitted(conn, evicted) => {
                if let Some(evicted) = evicted {
                    evicted.notify_one();
                    app.throttle.hit(
                        &app.metrics,
                        Limit::UnauthenticatedConnections,
                        connections.unauthenticated,
                    );
                }
                conn
            }
            Admission::Refused(limit) => {
                let value = match limit {
                    Limit::ConnectionsPerPeer => connections.per_peer,
                    _ => connections.max,
                };
                app.throttle.hit(&app.metrics, limit, value);
                refuse(stream, limit, &lingering);
                continue;
            }
        };
        let app = app.clone();
        let abort = Arc::new(Notify::new());
        let conn_abort = ConnAbort(abort.clone());
        let io = Watched {
            inner: stream,
            activity: conn.activity.clone(),
        };
        let service_conn = conn.clone();
        let service_app = app.clone();
        let served = http.serve_connection(
            TokioIo::new(io),
            service_fn(move |req| {
                handle(
                    service_app.clone(),
                    service_conn.clone(),
                    conn_abort.clone(),
                    peer,
                    req,
                )
            }),
        );
        let watched = graceful.watch(served);
        let (header_timeout, idle_timeout) = (
            app.options.header_read_timeout,
            app.options.keep_alive_idle_timeout,
        );
        tokio::spawn(async move {
            let _open = app.metrics.connection_opened();
            tokio::select! {
                result = watched => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = abort.notified() => {
                    tracing::info!("closed the connection of a stream client that stopped reading");
                }
                () = conn.evict.notified() => {
                    tracing::debug!("closed an unauthenticated connection for a newer one");
                }
                limit = conn.activity.expired(header_timeout, idle_timeout) => {
                    match limit {
                        Limit::HeaderReadTimeout => app.throttle.hit(
                            &app.metrics,
                            limit,
                            humantime::format_duration(header_timeout),
                        ),
                        _ => {
                            app.metrics.refused(limit);
                            tracing::debug!("closed an idle keep-alive connection");
                        }
                    }
                }
            }
            drop(conn);
        });
    }
    drop(listener);
    if let Some(task) = sighup {
        task.abort();
    }
    tracing::info!("shutting down: no new connections; stopping workers");
    app.stopping.store(true, Ordering::Release);
    // Idle keep-alive connections close now; streaming ones finish their response.
    let drained = tokio::spawn(graceful.shutdown());
    // The registry gives up on a source that hangs; this bound is a second line.
    let bound = app.options.shutdown_grace + Duration::from_secs(10);
    if tokio::time::timeout(bound, registry.shutdown(Some(app.options.shutdown_grace)))
        .await
        .is_err()
    {
        tracing::warn!("the registry did not finish shutting down in time; going on");
    }
    let _ = closing_tx.send(true);
    if tokio::time::timeout(DRAIN, drained).await.is_err() {
        tracing::warn!("some connections did not finish in time; closing them");
    }
    tracing::info!("shut down");
    Ok(())
}
