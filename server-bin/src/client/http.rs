//! The one HTTP client of the command line: plain calls, and event streams that resume with
//! the last id after a dropped connection. Streams are read with `source-remote`'s
//! [`EventReader`] (the same SSE parser and silence limit the `remote` source uses).

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use registry_core::Redacted;
use serde_json::Value;
use source_remote::{api_request, Backoff, BuildError, EventReader, ReadError, SseEvent, SseItem};

use super::error::ClientError;

/// The most bytes of a plain answer that are read (a page of 1000 workers fits easily).
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// The largest event a stream may carry: a snapshot of every worker.
const MAX_EVENT_BYTES: usize = 64 << 20;
/// The server pings every 15 s: this long without a byte is a dead connection.
const SILENCE: Duration = Duration::from_secs(45);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Reconnects of a stream: full-jitter backoff from this…
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// …up to this.
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// A client of one server, with its token. The token never appears in `Debug` (it is
/// [`Redacted`]), in a URL or in a message; the address is the user's own.
#[derive(Clone, Debug)]
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `host:port`.
    authority: String,
    /// `http://host:port`, for messages.
    pub(crate) server: String,
    token: Redacted<Option<String>>,
}

impl Api {
    /// A client of `server` (`http://host:port`, or `host:port`).
    pub fn new(server: &str, token: Option<String>) -> Result<Api, ClientError> {
        let authority = parse_server(server)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Api {
            client,
            server: format!("http://{authority}"),
            authority,
            token: Redacted(token),
        })
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        last_event_id: Option<&str>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        api_request(
            method,
            &self.authority,
            path_and_query,
            self.token.as_deref(),
            body,
            last_event_id,
        )
        .map_err(|e| match e {
            BuildError::BadToken => {
                ClientError::Usage("the token is not a valid header value".into())
            }
            BuildError::Http(e) => ClientError::Other(format!("building a request failed: {e}")),
        })
    }

    /// Sends a request and reads its whole answer: the JSON of a success (`Null` for an
    /// empty body), or the API's error.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let req = self.request(method, path_and_query, body, None)?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| self.unreachable(&cause(&e)))?;
            let status = resp.status();
            let bytes = read_limited(resp.into_body())
                .await
                .map_err(|e| self.unreachable(&e))?;
            Ok::<_, ClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| self.unreachable(&"no answer in time"))??;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Other(format!("the server's answer is not JSON: {e}")));
        }
        Err(ClientError::from_answer(status, &bytes))
    }

    /// `GET`.
    pub async fn get(&self, path_and_query: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path_and_query, None).await
    }

    /// Opens an event stream, resuming after `last_event_id`.
    async fn open(
        &self,
        path_and_query: &str,
        last_event_id: Option<&str>,
    ) -> Result<EventReader, ClientError> {
        let mut req = self.request(Method::GET, path_and_query, None, last_event_id)?;
        req.headers_mut().insert(
            header::ACCEPT,
            header::HeaderValue::from_static("text/event-stream"),
        );
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| self.unreachable(&"no answer in time"))?
            .map_err(|e| self.unreachable(&cause(&e)))?;
        let status = resp.status();
        if status == StatusCode::OK {
            return Ok(EventReader::new(resp.into_body(), MAX_EVENT_BYTES, SILENCE));
        }
        let bytes = tokio::time::timeout(REQUEST_TIMEOUT, read_limited(resp.into_body()))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        Err(ClientError::from_answer(status, &bytes))
    }

    /// Follows the stream at `path_and_query` from `cursor` (none: from its start). With
    /// `ends_on_close`, the server closing the stream ends it (a `?follow=0` output stream of
    /// a live worker closes once it has sent what is retained); a broken connection is
    /// still resumed.
    pub fn follow(
        &self,
        path_and_query: String,
        cursor: Option<String>,
        ends_on_close: bool,
    ) -> Follow<'_> {
        Follow {
            api: self,
            path: path_and_query,
            ends_on_close,
            last_id: cursor,
            reader: None,
            connected: false,
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_CAP),
        }
    }

    fn unreachable(&self, detail: &dyn std::fmt::Display) -> ClientError {
        ClientError::Unreachable {
            server: self.server.clone(),
            detail: detail.to_string(),
        }
    }
}

/// An event stream that outlives its connections: after a drop it reconnects with the last
/// id it saw (`Last-Event-ID`), so the server sends every event after it, none twice, and a
/// one-line notice goes to stderr. The first connection failing is an error (the server is
/// not there); later ones are retried with backoff until the server answers again (or, for
/// `runtime_unavailable`, until the runtime does). Another error answer ends the stream.
#[derive(Debug)]
pub struct Follow<'a> {
    api: &'a Api,
    path: String,
    ends_on_close: bool,
    last_id: Option<String>,
    reader: Option<EventReader>,
    /// A connection has worked once.
    connected: bool,
    backoff: Backoff,
}

impl Follow<'_> {
    /// The next event (comments and `retry:` are skipped); `None` when the server closed a
    /// stream that ends on close.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, ClientError> {
        loop {
            let Some(reader) = self.reader.as_mut() else {
                match self.api.open(&self.path, self.last_id.as_deref()).await {
                    Ok(reader) => {
                        self.reader = Some(reader);
                        self.connected = true;
                        self.backoff.reset();
                    }
                    Err(ClientError::Unreachable { .. }) if self.connected => {
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    }
                    // A runtime in an outage (a remote one) comes back: wait for it.
                    Err(ClientError::Api { code, .. })
                        if self.connected && code == "runtime_unavailable" =>
                    {
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    }
                    Err(e) => return Err(e),
                }
                continue;
            };
            let why = match reader.next().await {
                Ok(Some(SseItem::Event(event))) => {
                    if !event.id.is_empty() {
                        self.last_id = Some(event.id.clone());
                    }
                    return Ok(Some(event));
                }
                Ok(Some(_)) => continue,
                Ok(None) if self.ends_on_close => {
                    self.reader = None;
                    return Ok(None);
                }
                Ok(None) => "the server closed the stream",
                Err(ReadError::Silent) => "the server went silent",
                Err(ReadError::Broken) => "the connection broke",
                Err(ReadError::TooLarge) => "the server sent an event too large to read",
            };
            self.reader = None;
            let from = match &self.last_id {
                Some(id) => format!("after {id}"),
                None => "from the start".to_string(),
            };
            eprintln!("roster: {why}; reconnecting to {} {from}", self.api.server);
        }
    }
}

/// The innermost cause of a client error ("Connection refused (os error 111)"), which says
/// more than hyper's own "client error (Connect)".
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(source) = inner.source() {
        inner = source;
    }
    inner.to_string()
}

/// `host:port` of a server address: `http://host:port` (a trailing `/` allowed) or bare
/// `host:port`. Only plain HTTP: `roster` serves nothing else.
fn parse_server(server: &str) -> Result<String, ClientError> {
    let bad = |why: &str| ClientError::Usage(format!("--server {server:?}: {why}"));
    let rest = match server.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "the scheme {scheme:?} is not supported; roster speaks http://"
            )))
        }
        None => server,
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
        return Err(bad(
            "give only a scheme, a host and a port, e.g. http://127.0.0.1:7411",
        ));
    }
    let uri: http::Uri = format!("http://{authority}/")
        .parse()
        .map_err(|_| bad("not an address like http://127.0.0.1:7411"))?;
    let authority = uri.authority().map(|a| a.as_str().to_string());
    let authority = authority.ok_or_else(|| bad("no host"))?;
    Ok(if uri.port().is_some() {
        authority
    } else {
        format!("{authority}:80")
    })
}

/// Reads a body up to [`MAX_ANSWER_BYTES`].
async fn read_limited(mut body: Incoming) -> Result<Bytes, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_ANSWER_BYTES {
                return Err("the answer is larger than this client reads".into());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(out))
}

/// A query string (`?a=1&b=2`, or "" when there are no pairs).
pub fn query<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in pairs {
        s.append_pair(k, v);
        any = true;
    }
    if any {
        format!("?{}", s.finish())
    } else {
        String::new()
    }
}

/// One path segment, percent-encoded.
pub fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_are_host_and_port_over_http() {
        assert_eq!(
            parse_server("http://127.0.0.1:7411").unwrap(),
            "127.0.0.1:7411"
        );
        assert_eq!(
            parse_server("http://127.0.0.1:7411/").unwrap(),
            "127.0.0.1:7411"
        );
        assert_eq!(parse_server("localhost:9000").unwrap(), "localhost:9000");
        assert_eq!(parse_server("http://[::1]:7411").unwrap(), "[::1]:7411");
        assert_eq!(
            parse_server("http://roster.internal").unwrap(),
            "roster.internal:80"
        );
        for bad in [
            "https://x:1",
            "http://x:1/api",
            "http://u@x:1",
            "",
            "http://",
        ] {
            assert!(
                matches!(parse_server(bad), Err(ClientError::Usage(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn queries_and_segments_are_encoded() {
        assert_eq!(query([]), "");
        assert_eq!(
            query([("label", "team=a b"), ("state", "running")]),
            "?label=team%3Da+b&state=running"
        );
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(segment("local-1"), "local-1");
    }
}
