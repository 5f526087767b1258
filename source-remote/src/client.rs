//! The HTTP client to the other roster: one request shape, one error mapping.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use registry_core::{RegistryError, WorkerId};
use serde::Deserialize;

use crate::config::Settings;
use crate::stream::EventReader;

/// The most bytes of a plain (non-stream) answer that are read.
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// What a person is told when the remote cannot be reached: which failure, and what to
/// check, never the address (internal authority; the log has it).
pub(crate) const NO_ANSWER: &str = "the remote roster answered with a server error";
pub(crate) const TIMED_OUT: &str = "the remote roster accepted the connection but did not answer \
     within `request_timeout`";
pub(crate) const BAD_TOKEN: &str = "the remote roster refused this registry's token (401 \
     unauthorized); check the runtime's `token_env` or `token_file`";
pub(crate) const FORBIDDEN: &str = "the remote roster refused this registry (403 forbidden): \
     it must accept the host name of the runtime's `url` (its `allowed_hosts`) and this \
     registry's token";
pub(crate) const NO_SUCH_RUNTIME: &str = "the remote roster has no runtime of the configured \
     `remote_runtime` name (404 runtime_not_found); check `remote_runtime` against its \
     runtimes";

/// Why a connection to the remote failed, as far as a person can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Nothing listens at the address (`ECONNREFUSED`).
    Refused,
    /// The host name did not resolve.
    Dns,
    /// The TCP connect took longer than `connect_timeout`.
    ConnectTimeout,
    /// The bytes that came back are not HTTP (a TLS port, another protocol).
    NotHttp,
    /// The connection closed or was reset before the answer was whole.
    Closed,
    /// Anything else of the network (unreachable, …).
    Other(std::io::ErrorKind),
}

impl Cause {
    /// What the runtime's health says.
    pub(crate) fn message(self) -> String {
        match self {
            Cause::Refused => "the remote roster refused the connection: nothing listens at the \
                runtime's `url` (is it running there?)"
                .into(),
            Cause::Dns => "the host name of the runtime's `url` could not be resolved (DNS \
                failure)"
                .into(),
            Cause::ConnectTimeout => "connecting to the remote roster timed out (no answer \
                within `connect_timeout`); check the network and the runtime's `url`"
                .into(),
            Cause::NotHttp => "the remote did not answer in plain HTTP (TLS, or another \
                protocol?): the runtime's `url` must name a roster's plain-HTTP port"
                .into(),
            Cause::Closed => "the remote closed the connection before it answered".into(),
            Cause::Other(kind) => format!("the connection to the remote roster failed: {kind}"),
        }
    }

    /// The cause of a client error, found by walking its sources.
    pub(crate) fn of(error: &(dyn std::error::Error + 'static)) -> Cause {
        let mut next = Some(error);
        while let Some(e) = next {
            // hyper-util's connect error is private; its text names the step that failed.
            if e.to_string() == "dns error" {
                return Cause::Dns;
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_parse() || h.is_parse_status() {
                    return Cause::NotHttp;
                }
                if h.is_incomplete_message() || h.is_canceled() {
                    return Cause::Closed;
                }
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind as K;
                return match io.kind() {
                    K::ConnectionRefused => Cause::Refused,
                    K::TimedOut => Cause::ConnectTimeout,
                    K::ConnectionReset
                    | K::ConnectionAborted
                    | K::BrokenPipe
                    | K::UnexpectedEof => Cause::Closed,
                    kind => Cause::Other(kind),
                };
            }
            next = e.source();
        }
        Cause::Closed
    }
}

/// The whole chain of an error's messages, for the log (it may name the address).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

/// The client, with the remote's address and token (both [`Redacted`](registry_core::Redacted)
/// in its settings, so the derived `Debug` shows neither).
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    settings: std::sync::Arc<Settings>,
    /// The detail of the last failure to talk to the remote (it may name the address): for
    /// the log line the link writes when the runtime goes down.
    last_failure: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// The error in an error answer of a roster's API (`{"error": {"code", "message"}}`, SPEC
/// §6), as the remote source and the CLI both read it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorAnswer {
    /// The error code, e.g. `worker_not_found`.
    pub code: String,
    /// The message for people (empty when the answer has none).
    #[serde(default)]
    pub message: String,
}

impl ErrorAnswer {
    /// The error of an answer's body; `None` when the body is not a roster error body.
    pub fn parse(body: &[u8]) -> Option<ErrorAnswer> {
        #[derive(Deserialize)]
        struct Body {
            error: ErrorAnswer,
        }
        serde_json::from_slice::<Body>(body).ok().map(|b| b.error)
    }
}

impl Upstream {
    pub(crate) fn new(settings: std::sync::Arc<Settings>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .build(connector);
        Upstream {
            client,
            settings,
            last_failure: Default::default(),
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The detail of the last transport failure, taken (`None` if there was none since).
    pub(crate) fn take_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// A failure to talk to the remote at all: `unavailable`, with its [`Cause`]'s message.
    /// The detail (it may name the address) is kept for the log.
    pub(crate) fn transport(&self, e: impl std::error::Error + 'static) -> RegistryError {
        let detail = chain(&e);
        tracing::debug!(error = %detail, "request to the remote runtime failed");
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(detail);
        RegistryError::unavailable(Cause::of(&e).message(), None)
    }

    fn build(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
        last_event_id: Option<&str>,
    ) -> Result<Request<Full<Bytes>>, RegistryError> {
        api_request(
            method,
            &*self.settings.endpoint.authority,
            path_and_query,
            self.settings.token.as_deref(),
            body,
            last_event_id,
        )
        .map_err(|e| match e {
            BuildError::BadToken => {
                RegistryError::internal("the token is not a valid header value")
            }
            BuildError::Http(e) => {
                RegistryError::internal(format!("building a request failed: {e}"))
            }
        })
    }

    /// Sends a request and reads its whole answer within `request_timeout`. A success
    /// answer's JSON (or `Null` for an empty body) is returned; an error answer is mapped.
    pub(crate) async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, RegistryError> {
        let req = self.build(method, path_and_query, body, None)?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| self.transport(e))?;
            let status = resp.status();
            let retry_after = retry_after(&resp);
            let bytes = self.read_limited(resp.into_body()).await?;
            Ok::<_, RegistryError>((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) =
            match tokio::time::timeout(self.settings.request_timeout, work).await {
                Ok(result) => result?,
                Err(_) => return Err(RegistryError::UpstreamTimeout(TIMED_OUT.into())),
            };
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(serde_json::Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                RegistryError::internal(format!("the remote's answer is not JSON: {e}"))
            });
        }
        Err(self.error_from(status, retry_after, &bytes))
    }

    /// Opens an event stream: waits (within `request_timeout`) for a `200` with
    /// `text/event-stream`, and returns a reader of its events as they come, bounded by
    /// `max_event_bytes` and `heartbeat_timeout`.
    pub(crate) async fn open_stream(
        &self,
        path_and_query: &str,
        last_event_id: Option<&str>,
    ) -> Result<EventReader, RegistryError> {
        let mut req = self.build(Method::GET, path_and_query, None, last_event_id)?;
        req.headers_mut().insert(
            header::ACCEPT,
            header::HeaderValue::from_static("text/event-stream"),
        );
        let resp =
            match tokio::time::timeout(self.settings.request_timeout, self.client.request(req))
                .await
            {
                Ok(result) => result.map_err(|e| self.transport(e))?,
                Err(_) => return Err(RegistryError::UpstreamTimeout(TIMED_OUT.into())),
            };
        let status = resp.status();
        if status == StatusCode::OK {
            let is_stream = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            if !is_stream {
                return Err(RegistryError::internal(
                    "the remote answered a stream request without an event stream",
                ));
            }
            return Ok(EventReader::new(
                resp.into_body(),
                self.settings.max_event_bytes,
                self.settings.heartbeat_timeout,
            ));
        }
        let retry_after = retry_after(&resp);
        let bytes = match tokio::time::timeout(
            self.settings.request_timeout,
            self.read_limited(resp.into_body()),
        )
        .await
        {
            Ok(Ok(bytes)) => bytes,
            _ => Bytes::new(),
        };
        Err(self.error_from(status, retry_after, &bytes))
    }

    /// Reads a body up to [`MAX_ANSWER_BYTES`].
    async fn read_limited(&self, mut body: Incoming) -> Result<Bytes, RegistryError> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.transport(e))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > MAX_ANSWER_BYTES {
                    return Err(RegistryError::internal(
                        "the remote's answer is larger than this registry reads",
                    ));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(out))
    }

    /// Maps an error answer of the remote to the same error here: its codes keep their
    /// meaning. Messages are kept (they help: "unknown profile …, known profiles: shell"),
    /// with the remote's worker ids and runtime name taken out.
    fn error_from(
        &self,
        status: StatusCode,
        retry_after: Option<Duration>,
        bytes: &[u8],
    ) -> RegistryError {
        let Some(fields) = ErrorAnswer::parse(bytes) else {
            return if status.is_server_error() {
                RegistryError::unavailable(NO_ANSWER, retry_after)
            } else {
                RegistryError::internal(format!(
                    "the remote answered {status} without an error body"
                ))
            };
        };
        let message = scrub(&fields.message, &self.settings.remote_runtime);
        match fields.code.as_str() {
            "invalid_request" => RegistryError::InvalidRequest(message),
            "forbidden" => RegistryError::Forbidden(message),
            "worker_not_found" => RegistryError::WorkerNotFound(message),
            "conflict" => RegistryError::Conflict(message),
            "payload_too_large" => RegistryError::PayloadTooLarge(message),
            "capacity_exceeded" => RegistryError::CapacityExceeded(message),
            "unsupported" => RegistryError::Unsupported(message),
            "runtime_unavailable" => RegistryError::unavailable(message, retry_after),
            "upstream_timeout" => RegistryError::UpstreamTimeout(message),
            "unauthorized" => RegistryError::unavailable(BAD_TOKEN, retry_after),
            "runtime_not_found" => RegistryError::unavailable(NO_SUCH_RUNTIME, retry_after),
            "internal" => RegistryError::internal("the remote roster answered an internal error"),
            // invalid_json, route_not_found, method_not_allowed, unsupported_media_type,
            // origin_not_allowed: this registry asked wrongly, which is its own fault.
            other => RegistryError::internal(format!(
                "the remote roster refused a request of this registry: {other} ({status}): {message}"
            )),
        }
    }
}

fn retry_after<B>(resp: &Response<B>) -> Option<Duration> {
    resp.headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Takes the remote's worker ids and its runtime's name out of a message.
pub(crate) fn scrub(message: &str, remote_runtime: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for (i, word) in message.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let core = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-');
        if WorkerId::has_shape(core) {
            out.push_str(&word.replace(core, "(worker)"));
        } else if !remote_runtime.is_empty() && core == remote_runtime {
            out.push_str(&word.replace(core, "(runtime)"));
        } else {
            out.push_str(word);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_takes_out_remote_ids_and_the_runtime_name() {
        let m = scrub(
            "worker w_0123456789ABCDEFGHJKMNPQRS of runtime \"gpu-a\" is gone",
            "gpu-a",
        );
        assert_eq!(m, "worker (worker) of runtime \"(runtime)\" is gone");
        assert_eq!(
            scrub("unknown profile \"x\"; known profiles: shell", "local"),
            "unknown profile \"x\"; known profiles: shell"
        );
    }
}

/// Why [`api_request`] could not build a request.
#[derive(Debug)]
pub enum BuildError {
    /// The token holds bytes a header cannot carry.
    BadToken,
    /// The method, path or a header is not valid HTTP.
    Http(http::Error),
}

/// A request to a roster's API at `authority`: the bearer token as a sensitive header,
/// `Last-Event-ID` where a stream resumes, and a JSON body with its content type. The one
/// request builder of the remote source and of the command-line client.
pub fn api_request(
    method: Method,
    authority: &dyn std::fmt::Display,
    path_and_query: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
    last_event_id: Option<&str>,
) -> Result<Request<Full<Bytes>>, BuildError> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{authority}{path_and_query}"));
    if let Some(token) = token {
        let mut value = header::HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| BuildError::BadToken)?;
        value.set_sensitive(true);
        req = req.header(header::AUTHORIZATION, value);
    }
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let body = match body {
        Some(json) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Full::new(Bytes::from(json.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    req.body(body).map_err(BuildError::Http)
}
