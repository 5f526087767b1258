//! Prometheus metrics in the text exposition format (version 0.0.4), written by hand.
//!
//! [`Metrics`] counts what the HTTP layer sees (requests by route and status, their
//! durations, connected SSE clients); [`Metrics::render`] adds what the [`Registry`] knows
//! at that moment (events published, workers by runtime and state, runtime health and
//! diagnostics) and returns the whole text served at `GET /metrics`.
//!
//! Families:
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `roster_http_requests_total` | counter | `method`, `route`, `status` |
//! | `roster_http_request_duration_seconds` | histogram | `route` |
//! | `roster_sse_clients` | gauge | `stream` (`events`, `output`) |
//! | `roster_events_published_total` | counter | |
//! | `roster_workers` | gauge | `runtime`, `state` |
//! | `roster_runtime_health` | gauge | `runtime`, `status` |
//! | `roster_runtime_diagnostics` | gauge | `runtime` |
//! | `roster_worker_health` | gauge | `runtime`, `health` (`unknown`, `healthy`, `unhealthy`) |
//! | `roster_build_info` | gauge (always 1) | `version` |
//! | `process_cpu_seconds_total` | counter | |
//! | `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`, `process_start_time_seconds` | gauge | |
//!
//! The `process_*` families are roster's own process, read from `/proc/self` at each render;
//! a family that can't be read there is left out.
//!
//! Label values are only route templates, methods, status codes, runtime ids (public config
//! names), worker states, worker health, health statuses and the build's version: never a raw path, a worker id, a message or
//! anything else a client or a source chose.
//!
//! Memory is bounded: every label comes from a fixed set. Routes are `&'static str`
//! templates from the routing table (or `"unmatched"`), methods are one of eight names,
//! statuses are `u16`s the server itself chose, stream names are `&'static str`s, and the
//! registry-derived families are computed afresh from the configured runtimes at each
//! render. Nothing a client sends can add a series.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Method;
use registry_core::{HealthStatus, Registry, WorkerState};

mod process;

/// Upper bounds of the duration histogram's buckets: the `le` label as written, and the
/// bound in nanoseconds (compared exactly, no float rounding). `+Inf` is implied.
const BUCKETS: [(&str, u64); 12] = [
    ("0.001", 1_000_000),
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
    ("10", 10_000_000_000),
];

/// The SSE streams whose gauge is always shown, at 0 when nobody is connected.
const STREAMS: [&str; 2] = ["events", "output"];

/// Every health status, with its label value.
const HEALTH: [(HealthStatus, &str); 3] = [
    (HealthStatus::Ready, "ready"),
    (HealthStatus::Degraded, "degraded"),
    (HealthStatus::Unavailable, "unavailable"),
];

/// A limit of the `[server]` table that refuses or closes a connection or a request; its
/// label on `roster_limit_refusals_total` is the key's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections`: a connection refused.
    Connections,
    /// `max_connections_per_peer`: a connection refused.
    ConnectionsPerPeer,
    /// `max_unauthenticated_connections`: the oldest unauthenticated connection closed.
    UnauthenticatedConnections,
    /// `header_read_timeout`: a connection whose request head came too slowly closed.
    HeaderReadTimeout,
    /// `keep_alive_idle_timeout`: an idle keep-alive connection closed.
    KeepAliveIdleTimeout,
    /// `max_headers`: a request refused with `431`.
    Headers,
    /// `max_header_bytes`: a request refused with `431`.
    HeaderBytes,
    /// `max_streams`: a stream refused with `429`.
    Streams,
    /// `max_streams_per_token`: a stream refused with `429`.
    StreamsPerToken,
}

impl Limit {
    /// Every limit, in the order of the counters.
    pub const ALL: [Limit; 9] = [
        Limit::Connections,
        Limit::ConnectionsPerPeer,
        Limit::UnauthenticatedConnections,
        Limit::HeaderReadTimeout,
        Limit::KeepAliveIdleTimeout,
        Limit::Headers,
        Limit::HeaderBytes,
        Limit::Streams,
        Limit::StreamsPerToken,
    ];

    /// The `[server]` key of the limit: the label value and the name in log lines.
    pub fn key(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::ConnectionsPerPeer => "max_connections_per_peer",
            Limit::UnauthenticatedConnections => "max_unauthenticated_connections",
            Limit::HeaderReadTimeout => "header_read_timeout",
            Limit::KeepAliveIdleTimeout => "keep_alive_idle_timeout",
            Limit::Headers => "max_headers",
            Limit::HeaderBytes => "max_header_bytes",
            Limit::Streams => "max_streams",
            Limit::StreamsPerToken => "max_streams_per_token",
        }
    }
}

/// The server's own metrics. Cheap on the request path: one short lock per finished
/// request, none while it runs; connections and refusals are atomic counters.
pub struct Metrics {
    http: Mutex<HttpStats>,
    streams: Mutex<BTreeMap<&'static str, u64>>,
    /// Refusals by limit, in the order of [`Limit::ALL`].
    refusals: [AtomicU64; Limit::ALL.len()],
    /// Connections being served now.
    connections: AtomicU64,
}

/// Request counters and duration histograms, behind one lock.
#[derive(Default)]
struct HttpStats {
    /// (method, route, status) → finished requests.
    requests: BTreeMap<(&'static str, &'static str, u16), u64>,
    /// route → durations.
    durations: BTreeMap<&'static str, Histogram>,
}

/// One route's durations.
#[derive(Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is above every bound.
    buckets: [u64; BUCKETS.len() + 1],
    /// Sum of all observations, in nanoseconds.
    sum_nanos: u128,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, elapsed: Duration) {
        let nanos = elapsed.as_nanos();
        let slot = BUCKETS
            .iter()
            .position(|&(_, bound)| nanos <= u128::from(bound))
            .unwrap_or(BUCKETS.len());
        self.buckets[slot] += 1;
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
        self.count += 1;
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            http: Mutex::new(HttpStats::default()),
            streams: Mutex::new(STREAMS.iter().map(|&s| (s, 0)).collect()),
            refusals: Default::default(),
            connections: AtomicU64::new(0),
        }
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (series, routes) = {
            let http = lock(&self.http);
            (http.requests.len(), http.durations.len())
        };
        let streams = lock(&self.streams).clone();
        f.debug_struct("Metrics")
            .field("request_series", &series)
            .field("routes", &routes)
            .field("sse_clients", &streams)
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .finish()
    }
}

/// Locks, going on after a panic elsewhere: every update is a single increment, so a
/// poisoned lock never guards a half-written value.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `method` label: one of the methods the API knows, or `other`.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
fn header(out: &mut String, name: &str, kind: &str, help: &str) -> fmt::Result {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")
}

/// Nanoseconds as seconds, in a form the format accepts (`0.0015`, `3`).
fn seconds(nanos: u128) -> String {
    let whole = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:09}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

impl Metrics {
    /// No requests seen, no SSE clients.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// One finished request. `route` is the route template (`"/v1/workers/{worker_id}"`)
    /// or `"unmatched"` — never a raw path. Methods other than GET, POST, DELETE, PUT,
    /// PATCH, HEAD and OPTIONS are counted as `other`.
    pub fn observe_request(
        &self,
        method: &Method,
        route: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        let method = method_label(method);
        let mut http = lock(&self.http);
        *http.requests.entry((method, route, status)).or_insert(0) += 1;
        http.durations.entry(route).or_default().observe(elapsed);
    }

    /// An SSE client connected on `stream` (`"events"` or `"output"`); the
    /// `roster_sse_clients` gauge goes down again when the returned guard drops.
    pub fn stream_opened(self: &Arc<Self>, stream: &'static str) -> StreamGuard {
        *lock(&self.streams).entry(stream).or_insert(0) += 1;
        StreamGuard {
            metrics: Arc::clone(self),
            stream,
        }
    }

    /// A connection or request refused or closed at `limit`.
    pub fn refused(&self, limit: Limit) {
        let i = Limit::ALL.iter().position(|&l| l == limit).unwrap_or(0);
        self.refusals[i].fetch_add(1, Ordering::Relaxed);
    }

    /// How many connections or requests `limit` refused or closed so far.
    pub fn refusals(&self, limit: Limit) -> u64 {
        let i = Limit::ALL.iter().position(|&l| l == limit).unwrap_or(0);
        self.refusals[i].load(Ordering::Relaxed)
    }

    /// A connection is served from now on; the returned guard ends it.
    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(Arc::clone(self))
    }

    /// The whole exposition text (`text/plain; version=0.0.4`): the server's own families,
    /// then what `registry` reports now.
    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::with_capacity(4096);
        self.write_all(&mut out, registry)
            .expect("writing to a String cannot fail");
        out
    }

    fn write_all(&self, out: &mut String, registry: &Registry) -> fmt::Result {
        self.write_http(out)?;
        self.write_streams(out)?;
        self.write_limits(out)?;
        write_registry(out, registry)?;
        process::write(out)
    }

    fn write_http(&self, out: &mut String) -> fmt::Result {
        let http = lock(&self.http);

        let name = "roster_http_requests_total";
        header(
            out,
            name,
            "counter",
            "Finished HTTP requests by method, route template and status.",
        )?;
        for (&(method, route, status), count) in &http.requests {
            writeln!(
                out,
                "{name}{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {count}",
                escape_label(method),
                escape_label(route),
            )?;
        }

        let name = "roster_http_request_duration_seconds";
        header(
            out,
            name,
            "histogram",
            "Seconds spent answering HTTP requests, by route template.",
        )?;
        for (&route, hist) in &http.durations {
            let route = escape_label(route);
            let mut cumulative = 0;
            for (&(le, _), n) in BUCKETS.iter().zip(&hist.buckets) {
                cumulative += n;
                writeln!(
                    out,
                    "{name}_bucket{{route=\"{route}\",le=\"{le}\"}} {cumulative}"
                )?;
            }
            writeln!(
                out,
                "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                hist.count
            )?;
            writeln!(
                out,
                "{name}_sum{{route=\"{route}\"}} {}",
                seconds(hist.sum_nanos)
            )?;
            writeln!(out, "{name}_count{{route=\"{route}\"}} {}", hist.count)?;
        }
        Ok(())
    }

    fn write_streams(&self, out: &mut String) -> fmt::Result {
        let streams = lock(&self.streams);
        let name = "roster_sse_clients";
        header(
            out,
            name,
            "gauge",
            "Connected Server-Sent Events clients by stream.",
        )?;
        for (&stream, n) in streams.iter() {
            writeln!(out, "{name}{{stream=\"{}\"}} {n}", escape_label(stream))?;
        }
        Ok(())
    }
}

fn write_registry(out: &mut String, registry: &Registry) -> fmt::Result {
    let name = "roster_events_published_total";
    header(
        out,
        name,
        "counter",
        "Events the registry has published in this run.",
    )?;
    writeln!(out, "{name} {}", registry.events_published())?;

    let runtimes = registry.runtimes();

    let name = "roster_workers";
    header(out, name, "gauge", "Workers by runtime and state.")?;
    for rt in &runtimes {
        let runtime = escape_label(rt.id.as_str());
        for state in WorkerState::ALL {
            let n = rt.workers.get(&state).copied().unwrap_or(0);
            writeln!(
                out,
                "{name}{{runtime=\"{runtime}\",state=\"{}\"}} {n}",
                state.as_str()
            )?;
        }
    }

    let name = "roster_runtime_health";
    header(
        out,
        name,
        "gauge",
        "1 for a runtime's current health status, 0 for the others.",
    )?;
    for rt in &runtimes {
        let runtime = escape_label(rt.id.as_str());
        for (status, label) in HEALTH {
            let v = u8::from(rt.health.status == status);
            writeln!(
                out,
                "{name}{{runtime=\"{runtime}\",status=\"{label}\"}} {v}"
            )?;
        }
    }

    let name = "roster_runtime_diagnostics";
    header(
        out,
        name,
        "gauge",
        "Current diagnostics (problems for an operator) by runtime.",
    )?;
    for rt in &runtimes {
        writeln!(
            out,
            "{name}{{runtime=\"{}\"}} {}",
            escape_label(rt.id.as_str()),
            rt.diagnostics.len()
        )?;
    }

    let name = "roster_worker_health";
    header(
        out,
        name,
        "gauge",
        "Workers with a health probe, by runtime and what the probe says.",
    )?;
    for (runtime, counts) in registry.worker_health_counts() {
        let runtime = escape_label(runtime.as_str());
        for (health, n) in counts {
            writeln!(
                out,
                "{name}{{runtime=\"{runtime}\",health=\"{}\"}} {n}",
                health.as_str()
            )?;
        }
    }
    Ok(())
}

impl Metrics {
    fn write_limits(&self, out: &mut String) -> fmt::Result {
        let name = "roster_connections";
        header(out, name, "gauge", "Connections being served.")?;
        writeln!(out, "{name} {}", self.connections.load(Ordering::Relaxed))?;
        let name = "roster_limit_refusals_total";
        header(
            out,
            name,
            "counter",
            "Connections and requests refused or closed at a limit, by the [server] key of the limit.",
        )?;
        for (limit, n) in Limit::ALL.iter().zip(&self.refusals) {
            writeln!(
                out,
                "{name}{{limit=\"{}\"}} {}",
                limit.key(),
                n.load(Ordering::Relaxed)
            )?;
        }
        Ok(())
    }
}

/// One connection being served; dropping it takes it off the `roster_connections` gauge.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connected SSE client; dropping it takes the client off the `roster_sse_clients`
/// gauge.
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    stream: &'static str,
}

impl fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuard")
            .field("stream", &self.stream)
            .finish()
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.metrics.streams).get_mut(self.stream) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use http::Method;
    use registry_core::{Registry, RegistryConfig, RuntimeId, RuntimeSource, SpawnRequest};
    use source_embedded::{EmbeddedConfig, EmbeddedSource};

    use super::*;

    /// One sample line, parsed.
    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    fn is_name_start(c: char) -> bool {
        c.is_ascii_alphabetic() || c == '_' || c == ':'
    }

    fn is_name_char(c: char) -> bool {
        is_name_start(c) || c.is_ascii_digit()
    }

    /// A strict parser for one sample line: `name{l="v",…} value`, no timestamp, no
    /// stray spaces, only the three escapes the format knows.
    fn parse_sample(line: &str) -> Result<Sample, String> {
        let err = |what: &str| Err(format!("{what} in {line:?}"));
        let mut chars = line.char_indices().peekable();
        let name_end = loop {
            match chars.peek() {
                Some(&(0, c)) if !is_name_start(c) => return err("bad metric name start"),
                Some(&(i, c)) if !is_name_char(c) => break i,
                Some(_) => {
                    chars.next();
                }
                None => return err("no value"),
            }
        };
        if name_end == 0 {
            return err("empty metric name");
        }
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            loop {
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let key_end = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
                if key_end == 0 || !rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                {
                    return err("bad label name");
                }
                let key = rest[..key_end].to_string();
                rest = &rest[key_end..];
                rest = match rest.strip_prefix("=\"") {
                    Some(r) => r,
                    None => return err("label without =\""),
                };
                let mut value = String::new();
                let mut it = rest.char_indices();
                let end = loop {
                    match it.next() {
                        Some((_, '\\')) => match it.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => return err("bad escape"),
                        },
                        Some((i, '"')) => break i,
                        Some((_, '\n')) => return err("raw line feed in label value"),
                        Some((_, c)) => value.push(c),
                        None => return err("unterminated label value"),
                    }
                };
                rest = &rest[end + 1..];
                if labels.insert(key, value).is_some() {
                    return err("duplicate label");
                }
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after;
                    if rest.starts_with('}') {
                        return err("trailing comma");
                    }
                } else if !rest.starts_with('}') {
                    return err("label not followed by , or }");
                }
            }
        }
        let value = match rest.strip_prefix(' ') {
            Some(v) => v,
            None => return err("no single space before the value"),
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v if !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')) =>
            {
                match v.parse::<f64>() {
                    Ok(x) => x,
                    Err(_) => return err("bad value"),
                }
            }
            _ => return err("bad value (or a timestamp)"),
        };
        Ok(Sample {
            name,
            labels,
            value,
        })
    }

    /// Parses a whole exposition strictly: every comment is a HELP or TYPE line, each
    /// family is typed once, before its samples, and its samples are contiguous; every
    /// sample belongs to a typed family (histograms through their suffixes).
    fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
        if !text.ends_with('\n') {
            return Err("no final line feed".into());
        }
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = BTreeSet::new();
        let mut done = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() {
                return Err("empty line".into());
            }
            if let Some(comment) = line.strip_prefix("# ") {
                let mut parts = comment.splitn(3, ' ');
                let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
                let (Some(kind), Some(name), Some(rest)) = (kind, name, rest) else {
                    return Err(format!("short comment {line:?}"));
                };
                if !name.starts_with(is_name_start) || !name.chars().all(is_name_char) {
                    return Err(format!("bad family name {line:?}"));
                }
                match kind {
                    "HELP" => {
                        if !helped.insert(name.to_string()) {
                            return Err(format!("second HELP {line:?}"));
                        }
                    }
                    "TYPE" => {
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest)
                        {
                            return Err(format!("bad type {line:?}"));
                        }
                        if types.insert(name.to_string(), rest.to_string()).is_some() {
                            return Err(format!("second TYPE {line:?}"));
                        }
                        if let Some(prev) = current.replace(name.to_string()) {
                            done.insert(prev);
                        }
                    }
                    _ => return Err(format!("unexpected comment {line:?}")),
                }
                continue;
            }
            if line.starts_with('#') {
                return Err(format!("bad comment {line:?}"));
            }
            let sample = parse_sample(line)?;
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| sample.name.strip_suffix(s))
                .find(|base| types.get(*base).is_some_and(|t| t == "histogram"))
                .unwrap_or(&sample.name)
                .to_string();
            if !types.contains_key(&family) {
                return Err(format!("sample of an untyped family {line:?}"));
            }
            if current.as_deref() != Some(family.as_str()) || done.contains(&family) {
                return Err(format!("sample outside its family's block {line:?}"));
            }
            samples.push(sample);
        }
        if helped.len() != types.len() {
            return Err("a family without both HELP and TYPE".into());
        }
        Ok(samples)
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
        samples.iter().find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        find(samples, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?}"))
            .value
    }

    /// A registry with one embedded runtime `local` that allows commands.
    async fn registry(dir: &std::path::Path) -> Registry {
        let registry = Registry::new(RegistryConfig::new(dir)).unwrap();
        let source: Arc<dyn RuntimeSource> = Arc::new(
            EmbeddedSource::new(EmbeddedConfig {
                allow_commands: true,
                ..Default::default()
            })
            .unwrap(),
        );
        registry
            .add_runtime(RuntimeId::new("local").unwrap(), "embedded", source)
            .await
            .unwrap();
        registry
    }

    #[test]
    fn metrics_are_send_sync_and_default() {
        fn assert_send_sync<T: Send + Sync + Default>() {}
        assert_send_sync::<Metrics>();
        fn assert_send<T: Send + Sync>() {}
        assert_send::<StreamGuard>();
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(1_500_000), "0.0015");
        assert_eq!(seconds(3_000_000_000), "3");
        assert_eq!(seconds(2_000_000_001), "2.000000001");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("plain"), "plain");
        assert_eq!(escape_label(r"a\b"), r"a\\b");
        assert_eq!(escape_label("say \"hi\""), r#"say \"hi\""#);
        assert_eq!(escape_label("one\ntwo"), r"one\ntwo");
        assert_eq!(escape_label("\\\"\n"), r#"\\\"\n"#);

        // A route with every special character still renders a line the parser reads back.
        let m = Metrics::new();
        m.observe_request(&Method::GET, "/odd\\\"\n", 200, Duration::ZERO);
        let mut out = String::new();
        m.write_http(&mut out).unwrap();
        let line = out
            .lines()
            .find(|l| l.starts_with("roster_http_requests_total{"))
            .unwrap();
        assert_eq!(
            line,
            r#"roster_http_requests_total{method="GET",route="/odd\\\"\n",status="200"} 1"#
        );
        let sample = parse_sample(line).unwrap();
        assert_eq!(sample.labels["route"], "/odd\\\"\n");
    }

    #[test]
    fn requests_and_durations_are_counted() {
        let m = Metrics::new();
        let route = "/v1/workers/{worker_id}";
        m.observe_request(&Method::GET, route, 200, Duration::from_micros(500));
        m.observe_request(&Method::GET, route, 200, Duration::from_millis(1));
        m.observe_request(&Method::GET, route, 404, Duration::from_millis(30));
        m.observe_request(&Method::DELETE, route, 204, Duration::from_secs(11));
        m.observe_request(&Method::TRACE, "unmatched", 404, Duration::from_millis(2));
        let ext = Method::from_bytes(b"BREW").unwrap();
        m.observe_request(&ext, "unmatched", 405, Duration::from_millis(2));

        let mut out = String::new();
        m.write_http(&mut out).unwrap();
        m.write_streams(&mut out).unwrap();
        let s = parse_exposition(&out).unwrap();

        let req = "roster_http_requests_total";
        let labels = |m, r, s| [("method", m), ("route", r), ("status", s)];
        assert_eq!(value(&s, req, &labels("GET", route, "200")), 2.0);
        assert_eq!(value(&s, req, &labels("GET", route, "404")), 1.0);
        assert_eq!(value(&s, req, &labels("DELETE", route, "204")), 1.0);
        assert_eq!(value(&s, req, &labels("other", "unmatched", "404")), 1.0);
        assert_eq!(value(&s, req, &labels("other", "unmatched", "405")), 1.0);
        assert!(!out.contains("TRACE") && !out.contains("BREW"), "{out}");

        let bucket = "roster_http_request_duration_seconds_bucket";
        let b = |le| value(&s, bucket, &[("route", route), ("le", le)]);
        assert_eq!(b("0.001"), 2.0, "the bound itself is inside its bucket");
        assert_eq!(b("0.005"), 2.0);
        assert_eq!(b("0.025"), 2.0);
        assert_eq!(b("0.05"), 3.0);
        assert_eq!(b("10"), 3.0);
        assert_eq!(b("+Inf"), 4.0);
        let count = "roster_http_request_duration_seconds_count";
        assert_eq!(value(&s, count, &[("route", route)]), 4.0);
        assert_eq!(value(&s, count, &[("route", "unmatched")]), 2.0);
        let sum = "roster_http_request_duration_seconds_sum";
        assert!((value(&s, sum, &[("route", route)]) - 11.0315).abs() < 1e-9);

        // Buckets are cumulative and listed in order for every route.
        for r in [route, "unmatched"] {
            let les: Vec<f64> = s
                .iter()
                .filter(|x| x.name == bucket && x.labels["route"] == r)
                .map(|x| x.value)
                .collect();
            assert_eq!(les.len(), BUCKETS.len() + 1);
            assert!(les.windows(2).all(|w| w[0] <= w[1]), "{les:?}");
        }
        assert!(format!("{m:?}").contains("request_series: 5"), "{m:?}");
    }

    #[test]
    fn refusals_are_counted_by_the_key_of_their_limit() {
        let m = Arc::new(Metrics::new());
        m.refused(Limit::ConnectionsPerPeer);
        m.refused(Limit::ConnectionsPerPeer);
        m.refused(Limit::Streams);
        let conn = m.connection_opened();
        let mut out = String::new();
        m.write_limits(&mut out).unwrap();
        let samples = parse_exposition(&out).unwrap();
        let refusals =
            |key: &str| value(&samples, "roster_limit_refusals_total", &[("limit", key)]);
        assert_eq!(refusals("max_connections_per_peer"), 2.0);
        assert_eq!(refusals("max_streams"), 1.0);
        assert_eq!(refusals("max_connections"), 0.0);
        assert_eq!(value(&samples, "roster_connections", &[]), 1.0);
        drop(conn);
        let mut out = String::new();
        m.write_limits(&mut out).unwrap();
        let samples = parse_exposition(&out).unwrap();
        assert_eq!(value(&samples, "roster_connections", &[]), 0.0);
        assert_eq!(m.refusals(Limit::ConnectionsPerPeer), 2);
    }

    #[test]
    fn the_sse_gauge_follows_guards() {
        let m = Arc::new(Metrics::new());
        let gauge = |m: &Metrics, stream: &str| {
            let mut out = String::new();
            m.write_streams(&mut out).unwrap();
            let s = parse_exposition(&out).unwrap();
            value(&s, "roster_sse_clients", &[("stream", stream)])
        };
        assert_eq!(gauge(&m, "events"), 0.0);
        assert_eq!(gauge(&m, "output"), 0.0);
        let a = m.stream_opened("events");
        let b = m.stream_opened("events");
        let c = m.stream_opened("output");
        assert_eq!(gauge(&m, "events"), 2.0);
        assert_eq!(gauge(&m, "output"), 1.0);
        assert!(format!("{c:?}").contains("output"));
        drop(a);
        assert_eq!(gauge(&m, "events"), 1.0);
        drop(c);
        assert_eq!(gauge(&m, "output"), 0.0);
        let moved = std::thread::spawn(move || drop(b));
        moved.join().unwrap();
        assert_eq!(gauge(&m, "events"), 0.0);
    }

    #[tokio::test]
    async fn render_shows_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path()).await;
        let local = RuntimeId::new("local").unwrap();
        let worker = registry
            .spawn(
                &local,
                SpawnRequest {
                    command: Some(vec!["/bin/sh".into(), "-c".into(), "sleep 30".into()]),
                    name: Some("secret-name".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();

        let m = Arc::new(Metrics::new());
        let _guard = m.stream_opened("output");
        m.observe_request(
            &Method::POST,
            "/v1/runtimes/{runtime_id}/workers",
            201,
            Duration::ZERO,
        );
        let text = m.render(&registry);
        let s = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

        for family in [
            "roster_http_requests_total",
            "roster_http_request_duration_seconds",
            "roster_sse_clients",
            "roster_events_published_total",
            "roster_workers",
            "roster_runtime_health",
            "roster_runtime_diagnostics",
            "roster_worker_health",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }

        // Every state is present; the one worker is counted once.
        let workers: Vec<&Sample> = s.iter().filter(|x| x.name == "roster_workers").collect();
        assert_eq!(workers.len(), WorkerState::ALL.len());
        for st in WorkerState::ALL {
            assert!(find(
                &s,
                "roster_workers",
                &[("runtime", "local"), ("state", st.as_str())]
            )
            .is_some());
        }
        assert_eq!(workers.iter().map(|x| x.value).sum::<f64>(), 1.0);
        let live = ["starting", "running"]
            .iter()
            .map(|st| value(&s, "roster_workers", &[("runtime", "local"), ("state", st)]))
            .sum::<f64>();
        assert_eq!(live, 1.0, "{text}");

        // Exactly one health status is set; the embedded runtime answers at once.
        let health = |st| {
            value(
                &s,
                "roster_runtime_health",
                &[("runtime", "local"), ("status", st)],
            )
        };
        assert_eq!(health("ready"), 1.0, "{text}");
        assert_eq!(health("degraded"), 0.0);
        assert_eq!(health("unavailable"), 0.0);
        assert_eq!(
            value(&s, "roster_runtime_diagnostics", &[("runtime", "local")]),
            0.0
        );
        assert_eq!(
            value(&s, "roster_sse_clients", &[("stream", "output")]),
            1.0
        );
        assert_eq!(
            value(&s, "roster_sse_clients", &[("stream", "events")]),
            0.0
        );
        let published = value(&s, "roster_events_published_total", &[]);
        assert!(
            published >= 2.0,
            "runtime.updated and worker.upserted: {published}"
        );
        // The worker may have moved on from `starting` since.
        assert!(published <= registry.events_published() as f64);

        // Nothing but the fixed label sets: no worker id, no name, no command.
        assert!(!text.contains(worker.id.as_str()));
        assert!(!text.contains("secret-name") && !text.contains("sleep"));
        let allowed: BTreeSet<&str> = [
            "method", "route", "status", "le", "stream", "runtime", "state", "health", "version",
            "limit",
        ]
        .into_iter()
        .collect();
        for sample in &s {
            for key in sample.labels.keys() {
                assert!(allowed.contains(key.as_str()), "{key}");
            }
        }

        registry.shutdown(Some(Duration::ZERO)).await;
    }

    #[tokio::test]
    async fn every_line_of_a_busy_render_parses() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path()).await;
        let m = Arc::new(Metrics::new());
        let routes = [
            "/v1/runtimes",
            "/v1/runtimes/{runtime_id}",
            "/v1/workers/{worker_id}/output",
            "unmatched",
        ];
        let methods = [Method::GET, Method::POST, Method::DELETE, Method::CONNECT];
        for (i, route) in routes.iter().enumerate() {
            for (j, method) in methods.iter().enumerate() {
                let status = [200, 201, 404, 503][(i + j) % 4];
                m.observe_request(
                    method,
                    route,
                    status,
                    Duration::from_micros((i * 997 + j * 13) as u64 * 1000),
                );
            }
        }
        let _g = m.stream_opened("events");
        let text = m.render(&registry);
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let non_comment = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples.len(), non_comment);
        assert!(samples
            .iter()
            .all(|s| s.value.is_finite() && s.value >= 0.0));
        registry.shutdown(Some(Duration::ZERO)).await;
    }

    #[test]
    fn the_strict_parser_refuses_malformed_lines() {
        for bad in [
            "",
            "1abc 1",
            "abc",
            "abc  1",
            "abc 1 1700000000",
            "abc one",
            "abc{} 1x",
            "abc{a=\"x} 1",
            "abc{a=\"x\",} 1",
            "abc{a=\"\\t\"} 1",
            "abc{a=\"x\"b=\"y\"} 1",
            "abc{a=x} 1",
            "abc{a=\"1\",a=\"2\"} 1",
            "abc{-a=\"1\"} 1",
        ] {
            assert!(parse_sample(bad).is_err(), "{bad:?} was accepted");
        }
        for good in [
            "abc 1",
            "a:b_c{x=\"\"} 0.5",
            "abc{a=\"\\\\\\\"\\n\"} +Inf",
            "abc{} NaN",
        ] {
            assert!(parse_sample(good).is_ok(), "{good:?} was refused");
        }
        assert!(parse_exposition("# TYPE a gauge\nb 1\n").is_err());
        assert!(parse_exposition("# HELP a x\n# TYPE a gauge\na 1").is_err());
        assert!(
            parse_exposition("# HELP a x\n# TYPE a gauge\n# HELP b y\n# TYPE b gauge\na 1\n")
                .is_err()
        );
        assert!(parse_exposition("# HELP a x\n# TYPE a gauge\na 1\n").is_ok());
    }
}
