//! The `[server]` table: its serde struct with the defaults, the checks serde does not
//! make, and the rule that an open server listens on loopback only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use registry_core::{de, Redacted, MAX_SUBSCRIBER_QUEUE};
use serde::Deserialize;

use crate::auth::{is_loopback, AllowedHost, AllowedOrigin};

use super::lines::{ConfigFileError, KeyIndex};
use super::tokens::{LoadedToken, TokenSection};
use super::Config;

/// The listen address when neither the file nor a flag gives one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";
/// The state directory when neither the file nor a flag gives one.
const DEFAULT_STATE_DIR: &str = "./.roster";
/// Default request body cap: 1 MiB.
const DEFAULT_MAX_BODY: u64 = 1 << 20;
/// Default time in-flight work gets on shutdown.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default interval between keep-alive comments on event streams.
const DEFAULT_SSE_PING: Duration = Duration::from_secs(15);
/// Default number of registry events kept for resuming streams.
const DEFAULT_EVENT_RETENTION: usize = 10_000;
/// Default approximate bytes of registry events kept: 64 MiB.
const DEFAULT_EVENT_RETENTION_BYTES: u64 = 64 << 20;
/// Default queue length of one stream subscriber.
const DEFAULT_SUBSCRIBER_QUEUE: usize = 1024;
/// Default number of connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default number of connections from one peer (one IPv4 address, one IPv6 /64).
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 256;
/// Default number of connections that have not yet sent a valid token (with tokens).
pub const DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS: usize = 512;
/// Default time from the first byte of a request's head to its end.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a keep-alive connection may sit idle between requests.
pub const DEFAULT_KEEP_ALIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on a request's head (request line and headers): 64 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 << 10;
/// Default cap on a request's header lines.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default number of event streams open at once, below `max_connections` so that streams
/// alone never take every connection slot.
pub const DEFAULT_MAX_STREAMS: usize = 768;
/// Default number of event streams open at once with one token.
pub const DEFAULT_MAX_STREAMS_PER_TOKEN: usize = 256;
/// The largest `max_header_bytes`.
pub const MAX_HEADER_BYTES_LIMIT: u64 = 128 << 10;
/// The smallest `max_header_bytes`: a request line and a few headers.
const MIN_HEADER_BYTES: u64 = 1 << 10;
/// The largest `max_headers`.
pub const MAX_HEADERS_LIMIT: usize = 1000;
/// The largest connection and stream counts.
const MAX_COUNT: usize = 1 << 20;
/// The shortest timeout of a connection.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// The shortest `sse_ping`.
const MIN_SSE_PING: Duration = Duration::from_millis(1);
/// The longest `sse_ping` and `shutdown_grace`.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The `[server]` table. Every key is optional; an unknown key is an error.
///
/// `Debug` does not print `state_dir`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// The address to listen on. Default [`DEFAULT_LISTEN`]. Without tokens it must be a
    /// loopback address (see [`Config::check_listen`]).
    pub listen: SocketAddr,
    /// Where the server keeps its state (the worker id key, each runtime's directory).
    /// Default `./.roster`.
    pub state_dir: Redacted<PathBuf>,
    /// The bearer tokens, `[[server.tokens]]`. None by default.
    pub tokens: Vec<TokenSection>,
    /// `Host` names accepted besides the loopback names, compared without the port. Read
    /// lower-cased, without trailing dots, an IPv6 address without its brackets. Empty by
    /// default.
    pub allowed_hosts: Vec<AllowedHost>,
    /// Origins (`scheme://host[:port]`) accepted on requests with a body besides the
    /// server's own. Compared exactly. Empty by default.
    pub allowed_origins: Vec<AllowedOrigin>,
    /// Request body cap in bytes; written as an integer or as `"1MiB"`, `"512KiB"`, ….
    /// Default 1 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_body: u64,
    /// How long shutdown waits for workers and streams (humantime, e.g. `"10s"`).
    /// Default 10 s.
    #[serde(deserialize_with = "de::duration")]
    pub shutdown_grace: Duration,
    /// Interval between keep-alive comments on event streams. Default 15 s.
    #[serde(deserialize_with = "de::duration")]
    pub sse_ping: Duration,
    /// Registry events kept for resuming streams. Default 10 000.
    pub event_retention: usize,
    /// Approximate bytes of registry events kept (integer or `"64MiB"`). Default 64 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub event_retention_bytes: u64,
    /// Events that may wait for one stream subscriber. Default 1024.
    pub subscriber_queue: usize,
    /// Connections served at once; one more is answered `429` and closed. Default 1024.
    pub max_connections: usize,
    /// Connections served at once from one peer (one IPv4 address, or one IPv6 /64
    /// prefix); one more is answered `429` and closed. Default 256.
    pub max_connections_per_peer: usize,
    /// With tokens configured: connections that have not yet sent a request with a valid
    /// token. One more closes the oldest of them. Default 512.
    pub max_unauthenticated_connections: usize,
    /// How long a request's head (request line and headers) may take to arrive once its
    /// first byte has (humantime). Slower: the connection is closed. Default 10 s.
    #[serde(deserialize_with = "de::duration")]
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request. Default 60 s.
    #[serde(deserialize_with = "de::duration")]
    pub keep_alive_idle_timeout: Duration,
    /// Largest request head in bytes (integer or `"64KiB"`); more is `431`. Default 64 KiB,
    /// at most 128 KiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_header_bytes: u64,
    /// Most header lines in a request; more is `431`. Default 100, at most 1000.
    pub max_headers: usize,
    /// Event streams open at once; one more is `429`. Default 768.
    pub max_streams: usize,
    /// Event streams open at once with one token; one more is `429`. Default 256.
    pub max_streams_per_token: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 7411)),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR).into(),
            tokens: Vec::new(),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_body: DEFAULT_MAX_BODY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            sse_ping: DEFAULT_SSE_PING,
            event_retention: DEFAULT_EVENT_RETENTION,
            event_retention_bytes: DEFAULT_EVENT_RETENTION_BYTES,
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_unauthenticated_connections: DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            keep_alive_idle_timeout: DEFAULT_KEEP_ALIVE_IDLE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_streams: DEFAULT_MAX_STREAMS,
            max_streams_per_token: DEFAULT_MAX_STREAMS_PER_TOKEN,
        }
    }
}

impl ServerSection {
    /// The checks on `[server]` that serde does not make, each error at the line of its key.
    /// (Hosts and origins are checked as they are read: see [`AllowedHost`] and
    /// [`AllowedOrigin`].) The entries of `[[server.tokens]]` are checked by
    /// [`TokenSection::check_all`].
    pub(super) fn problems(&self, index: &KeyIndex) -> Vec<ConfigFileError> {
        let key_line = |key: &str| index.line(&format!("server.{key}"));
        let at = |key: &str, message: String| ConfigFileError::new(key_line(key), message);
        let zero =
            |key: &str, what: &str| at(key, format!("`server.{key}` must be at least {what}"));
        let mut errors = Vec::new();
        if self.state_dir.as_os_str().is_empty() {
            errors.push(at(
                "state_dir",
                "`server.state_dir` is empty; give a directory, e.g. \"/var/lib/roster\", or \
                 leave the key out for the default ./.roster"
                    .into(),
            ));
        }
        if self.max_body == 0 {
            errors.push(zero("max_body", "1 byte"));
        }
        if self.sse_ping < MIN_SSE_PING {
            errors.push(zero("sse_ping", "1ms"));
        }
        if self.sse_ping > MAX_INTERVAL {
            errors.push(at(
                "sse_ping",
                "`server.sse_ping` must be at most 1h".into(),
            ));
        }
        if self.shutdown_grace > MAX_INTERVAL {
            errors.push(at(
                "shutdown_grace",
                "`server.shutdown_grace` must be at most 1h".into(),
            ));
        }
        if self.event_retention == 0 {
            errors.push(zero("event_retention", "1"));
        }
        if self.event_retention_bytes == 0 {
            errors.push(zero("event_retention_bytes", "1 byte"));
        }
        if self.subscriber_queue == 0 {
            errors.push(zero("subscriber_queue", "1"));
        }
        if self.subscriber_queue > MAX_SUBSCRIBER_QUEUE {
            errors.push(at(
                "subscriber_queue",
                format!("`server.subscriber_queue` must be at most {MAX_SUBSCRIBER_QUEUE}"),
            ));
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
            (
                "max_unauthenticated_connections",
                self.max_unauthenticated_connections,
            ),
            ("max_streams", self.max_streams),
            ("max_streams_per_token", self.max_streams_per_token),
        ] {
            if value == 0 {
                errors.push(zero(key, "1"));
            } else if value > MAX_COUNT {
                errors.push(at(
                    key,
                    format!("`server.{key}` must be at most {MAX_COUNT}"),
                ));
            }
        }
        for (key, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("keep_alive_idle_timeout", self.keep_alive_idle_timeout),
        ] {
            if value < MIN_TIMEOUT {
                errors.push(zero(key, "1ms"));
            } else if value > MAX_INTERVAL {
                errors.push(at(key, format!("`server.{key}` must be at most 1h")));
            }
        }
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES_LIMIT).contains(&self.max_header_bytes) {
            errors.push(at(
                "max_header_bytes",
                "`server.max_header_bytes` must be from 1KiB to 128KiB".into(),
            ));
        }
        if !(1..=MAX_HEADERS_LIMIT).contains(&self.max_headers) {
            errors.push(at(
                "max_headers",
                format!("`server.max_headers` must be from 1 to {MAX_HEADERS_LIMIT}"),
            ));
        }
        if let Err(e) = TokenSection::check_all(&self.tokens, index) {
            errors.push(e);
        }
        errors
    }
}

impl Config {
    /// Refuses a `listen` address that is not loopback when `tokens` is empty: the API can
    /// start processes, so without tokens anyone who can reach the port could. The message
    /// says how to fix it: configure `[[server.tokens]]`, or listen on `127.0.0.1` or
    /// `[::1]`.
    pub fn check_listen(&self, tokens: &[LoadedToken]) -> Result<(), ConfigFileError> {
        let listen = self.server.listen;
        if !tokens.is_empty() || is_loopback(listen.ip()) {
            return Ok(());
        }
        Err(ConfigFileError::new(
            None,
            format!(
                "refusing to listen on {listen} without tokens: the API can start processes, \
                 so anyone who can reach a non-loopback address could. Configure \
                 [[server.tokens]], or listen on 127.0.0.1 or [::1] (e.g. \
                 listen = \"127.0.0.1:{port}\")",
                port = listen.port()
            ),
        ))
    }
}
