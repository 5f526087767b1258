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

/// What a person is told when the remote cannot be reached. Deliberately vague: the
/// address is internal authority.
pub(crate) const NO_ANSWER: &str = "the remote runtime does not answer";
pub(crate) const TIMED_OUT: &str = "the remote runtime did not answer in time";
pub(crate) const BAD_TOKEN: &str =
    "the remote roster refused this registry's token; check the runtime's token setting";

/// The client, with the remote's address and token (both [`Redacted`](registry_core::Redacted)
/// in its settings, so the derived `Debug` shows neither).
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    settings: std::sync::Arc<Settings>,
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
        Upstream { client, settings }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
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
            let resp = self.client.request(req).await.map_err(transport)?;
            let status = resp.status();
            let retry_after = retry_after(&resp);
            let bytes = read_limited(resp.into_body()).await?;
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
                Ok(result) => result.map_err(transport)?,
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
            read_limited(resp.into_body()),
        )
        .await
        {
            Ok(Ok(bytes)) => bytes,
            _ => Bytes::new(),
        };
        Err(self.error_from(status, retry_after, &bytes))
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
            "runtime_not_found" => RegistryError::unavailable(
                "the remote roster has no runtime of the configured `remote_runtime` name",
                retry_after,
            ),
            "internal" => RegistryError::internal("the remote roster answered an internal error"),
            // invalid_json, route_not_found, method_not_allowed, unsupported_media_type,
            // origin_not_allowed: this registry asked wrongly, which is its own fault.
            other => RegistryError::internal(format!(
                "the remote roster refused a request of this registry: {other} ({status}): {message}"
            )),
        }
    }
}

/// Reads a body up to [`MAX_ANSWER_BYTES`].
async fn read_limited(mut body: Incoming) -> Result<Bytes, RegistryError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(transport)?;
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

fn retry_after<B>(resp: &Response<B>) -> Option<Duration> {
    resp.headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A failure to talk to the remote at all. The detail (it may name the address) stays
/// in the log.
pub(crate) fn transport(e: impl std::fmt::Display) -> RegistryError {
    tracing::debug!(error = %e, "request to the remote runtime failed");
    RegistryError::unavailable(NO_ANSWER, None)
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
