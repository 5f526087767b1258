//! The listener loop, the per-request pipeline (host, route, token, origin, handler, error,
//! request id, metrics, log line) and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use registry_core::{Registry, RegistryError};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};

use crate::api;
use crate::auth::{Allowed, AllowedHost, AllowedOrigin, Tokens};
use crate::config::{LoadedToken, ServerSection};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::reload::{ReloadConfig, Reloader};
use crate::routes::{resolve, Resolution, UNMATCHED};
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
    /// Connections served at once; more wait to be accepted (default 1024).
    pub max_connections: usize,
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
            max_connections: 1024,
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
    abort: ConnAbort,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
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
    } = pipeline(&app, req).await;
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
    Ok(resp)
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
}

impl Outcome {
    fn early(route: &'static str, error: ApiError) -> Self {
        Outcome {
            route,
            token: None,
            result: Err(error),
        }
    }
}

/// Host → route → token → origin → handler.
async fn pipeline(app: &Arc<App>, req: Request<Incoming>) -> Outcome {
    let gate = app.gate();
    if let Err(e) = gate
        .allowed
        .check_host(req.headers())
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
    let answer = |result| Outcome {
        route: template,
        token,
        result,
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
        options,
    });
    let sighup = app
        .reloader
        .as_ref()
        .is_some_and(Reloader::on_sighup)
        .then(|| reload_on_sighup(app.clone()))
        .transpose()?;
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(app.options.max_connections.max(1)));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit?,
            () = &mut shutdown => break,
        };
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
        let app = app.clone();
        let abort = Arc::new(Notify::new());
        let conn_abort = ConnAbort(abort.clone());
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| handle(app.clone(), conn_abort.clone(), peer, req)),
        );
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            tokio::select! {
                result = watched => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = abort.notified() => {
                    tracing::info!("closed the connection of a stream client that stopped reading");
                }
            }
            drop(permit);
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
